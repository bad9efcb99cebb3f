//! The facade links exactly the backends its enabled features name: no registration is
//! dropped by the linker, and none appears that no feature asked for.
//! Run with the default features and with `--features full`.

use sandbox::registry;

/// `(feature enabled, provider name)` for every provider feature of the facade.
fn expected_providers() -> Vec<&'static str> {
    let features: &[(bool, &str)] = &[
        (cfg!(feature = "local"), "local"),
        (cfg!(feature = "sprites"), "sprites"),
    ];
    let mut v: Vec<_> = features
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
    v.sort_unstable();
    v
}

/// `memory` plus `(feature enabled, store scheme)` for every store feature of the facade.
fn expected_stores() -> Vec<&'static str> {
    let features: &[(bool, &str)] = &[
        (true, "memory"),
        (cfg!(feature = "sqlite"), "sqlite"),
        (cfg!(feature = "instant"), "instant"),
    ];
    let mut v: Vec<_> = features
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn registered_providers_are_exactly_the_enabled_features() {
    let names = registry::provider_names().expect("no duplicate provider registration");
    assert_eq!(names, expected_providers());
}

#[test]
fn registered_stores_are_memory_plus_the_enabled_features() {
    let schemes = registry::store_schemes().expect("no duplicate store registration");
    assert_eq!(schemes, expected_stores());
}

/// Every backend crate of the workspace has a facade feature of its short name, and `full`
/// enables all of them: a backend that lands without its feature fails here.
#[test]
fn every_backend_crate_of_the_workspace_has_a_feature_in_full() {
    let facade = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = facade.parent().expect("the facade lives in the workspace");
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let manifest = std::fs::read_to_string(facade.join("Cargo.toml")).unwrap();
    let not_backends = ["sandbox", "sandbox-cli", "sandbox-core", "sandbox-testkit"];
    let members = workspace
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .expect("the workspace lists its members")
        .0;
    let backends: Vec<&str> = members
        .lines()
        .map(|l| l.trim().trim_end_matches(',').trim_matches('"'))
        .filter(|m| m.starts_with("sandbox-") && !not_backends.contains(m))
        .collect();
    assert!(backends.contains(&"sandbox-local"), "{backends:?}");
    let full = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("full = "))
        .expect("the facade has a `full` feature");
    for crate_name in backends {
        let short = crate_name.trim_start_matches("sandbox-");
        assert!(
            manifest.lines().any(|l| l
                .trim()
                .starts_with(&format!("{short} = [\"dep:{crate_name}\"]"))),
            "feature `{short}` links {crate_name}"
        );
        assert!(
            full.contains(&format!("\"{short}\"")),
            "`full` enables `{short}`: {full}"
        );
    }
}
