//! The crate registers itself as `sprites`, with its credential variables, and its
//! constructor reads the config and environment.

use sandbox_core::registry::{open_provider, provider_registration};
use sandbox_core::{Env, SandboxConfig};
use sandbox_sprites as _;

#[test]
fn sprites_is_registered_with_its_credential_variables() {
    let reg = provider_registration("sprites").expect("registered");
    assert_eq!(reg.credential_vars, &["SPRITES_API_TOKEN", "SPRITE_TOKEN"]);
}

#[test]
fn the_registered_constructor_builds_the_provider_or_names_the_missing_token() {
    let config = SandboxConfig::from_json(r#"{"provider":"sprites"}"#).unwrap();
    let env = Env::from_pairs([("SPRITE_TOKEN", "t")]);
    let p = open_provider("sprites", &config, &env).unwrap();
    assert_eq!(p.name(), "sprites");
    assert!(p.capabilities().exec_stream && p.capabilities().checkpoints);

    let e = open_provider("sprites", &config, &Env::from_pairs::<&str, &str>([]))
        .err()
        .expect("no token");
    assert_eq!(e.code(), "unauthorized");
    assert!(e.to_string().contains("SPRITES_API_TOKEN"), "{e}");
}
