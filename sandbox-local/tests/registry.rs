//! The crate registers itself as `local`.

use sandbox_core::{registry, Env, SandboxConfig};
use sandbox_local as _;

#[test]
fn local_is_registered_and_opens_from_config_and_env() {
    assert!(registry::provider_names().unwrap().contains(&"local"));
    let env = Env::from_pairs([("SANDBOX_LOCAL_ROOT", "/var/tmp/sandbox-local-registry-test")]);
    let provider = registry::open_provider("local", &SandboxConfig::default(), &env).unwrap();
    assert_eq!(provider.name(), sandbox_local::LOCAL);
    assert!(provider.capabilities().flags().iter().all(|(_, on)| *on));
}

#[test]
fn a_bad_isolation_value_fails_at_open() {
    let env = Env::from_pairs([
        ("SANDBOX_LOCAL_ROOT", "/var/tmp/x"),
        ("SANDBOX_LOCAL_ISOLATION", "chroot"),
    ]);
    let e = registry::open_provider("local", &SandboxConfig::default(), &env)
        .err()
        .expect("chroot is not a mode");
    assert_eq!(e.code(), "sandbox_local_isolation_invalid");
}
