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
