//! `sandbox run --provider sprites -- ...` end to end: the CLI binary against the emulator,
//! pointed at it with `SPRITES_API_BASE_URL`.
//!
//! The binary is the workspace's `target/<profile>/sandbox` (built by `cargo build -p
//! sandbox-cli` or any workspace build); the test says so and skips when it is not there.

use std::path::PathBuf;
use std::time::Duration;

use sandbox_testkit::sprites::SpritesEmulator;

/// `target/<profile>/sandbox`, next to this test's `deps/` directory.
fn cli_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir.join(format!("sandbox{}", std::env::consts::EXE_SUFFIX));
    bin.is_file().then_some(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_run_with_provider_sprites_works_against_the_emulator() {
    let Some(bin) = cli_binary() else {
        eprintln!(
            "SKIPPED: the `sandbox` binary is not built; run `cargo build -p sandbox-cli` \
             (any workspace build does) to run this end-to-end test"
        );
        return;
    };
    let providers = tokio::process::Command::new(&bin)
        .args(["providers"])
        .output()
        .await
        .unwrap();
    if !String::from_utf8_lossy(&providers.stdout).contains("sprites") {
        eprintln!(
            "SKIPPED: {} was built without the `sprites` feature",
            bin.display()
        );
        return;
    }
    let emulator = SpritesEmulator::start("cli-token").await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(&bin)
        .args([
            "run",
            "--provider",
            "sprites",
            "--",
            "sh",
            "-c",
            "echo hello from a sprite; echo warn >&2; exit 3",
        ])
        .env("SPRITES_API_TOKEN", "cli-token")
        .env("SPRITES_API_BASE_URL", emulator.base_url())
        .env(
            "SANDBOX_STORE",
            format!("sqlite://{}", home.path().join("store.db").display()),
        )
        .env_remove("SPRITE_TOKEN")
        .env_remove("SANDBOX_PROVIDER")
        .env_remove("RUST_LOG")
        .current_dir(home.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("sandbox run finishes")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert_eq!(out.stdout, b"hello from a sprite\n", "stderr: {stderr}");
    assert!(stderr.contains("warn"), "{stderr}");
    assert!(!stderr.contains("cli-token"), "the token leaked: {stderr}");

    let calls: Vec<String> = emulator
        .requests()
        .into_iter()
        .map(|(m, p, _)| format!("{m} {}", p.split('/').take(3).collect::<Vec<_>>().join("/")))
        .collect();
    assert_eq!(
        calls.first().map(String::as_str),
        Some("POST /v1/sprites"),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.starts_with("DELETE")),
        "run stops its sandbox: {calls:?}"
    );
    assert!(
        emulator.sprite_names().is_empty(),
        "left {:?}",
        emulator.sprite_names()
    );
}
