//! The provider conformance suite, run against `sprites` through the Sprites API emulator.

use std::sync::Arc;

use sandbox_core::{Env, SandboxConfig};
use sandbox_sprites::SpritesProvider;
use sandbox_testkit::provider::run_provider_suite;
use sandbox_testkit::sprites::SpritesEmulator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sprites_passes_the_provider_conformance_suite() {
    let emulator = SpritesEmulator::start("conformance-token").await.unwrap();
    let env = Env::from_pairs([
        ("SPRITES_API_TOKEN", "conformance-token".to_string()),
        ("SPRITES_API_BASE_URL", emulator.base_url()),
    ]);
    let config = SandboxConfig::from_json(r#"{"provider":"sprites","ports":[3000]}"#).unwrap();
    let provider = SpritesProvider::from_config(&config, &env).unwrap();
    let report = run_provider_suite(Arc::new(provider), config).await;
    report.assert_passed();
    // Every sprite the suite made was deleted by its stops.
    assert!(
        emulator.sprite_names().is_empty(),
        "left behind: {:?}",
        emulator.sprite_names()
    );
}
