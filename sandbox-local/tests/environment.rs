//! The caller's environment does not reach sandboxed commands: they get the minimal base
//! (`HOME` = the workspace, `LANG`, `PATH`, `TERM`, `TMPDIR`) plus what the request passes.

mod common;

use common::run;
use sandbox_core::{ExecRequest, StopMode};
use sandbox_local::Isolation;

#[tokio::test]
async fn the_callers_environment_is_not_visible_inside() {
    // Cargo hands the test process variables of its own: they stand for the caller's secrets
    // (setting one here would race with the other tests' spawns).
    let caller_value = std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo");
    let caller_entry = format!("CARGO_MANIFEST_DIR={caller_value}");
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let ran = run(sb.handle.as_ref(), ExecRequest::new(["env"])).await;
        assert!(ran.exit.success(), "{mode}: {ran:?}");
        assert!(
            !ran.stdout.contains(&caller_entry),
            "{mode}: the caller's environment leaked: {}",
            ran.stdout
        );
        assert!(
            ran.stdout
                .contains(&format!("PATH={}\n", sandbox_local::BASE_PATH)),
            "{mode}: PATH is not the base one: {}",
            ran.stdout
        );
        let keys: Vec<&str> = ran
            .stdout
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| *k != "PWD" && *k != "SHLVL" && *k != "_")
            .collect();
        assert_eq!(
            keys,
            ["HOME", "LANG", "PATH", "TERM", "TMPDIR"],
            "{mode}: base env"
        );
        assert!(
            ran.stdout
                .contains(&format!("HOME={}\n", sb.handle.workspace())),
            "{mode}: HOME is not the workspace: {}",
            ran.stdout
        );
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn request_variables_override_the_base_environment() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let req = ExecRequest::new(["/bin/sh", "-c", "printf '%s|%s' \"$PATH\" \"$GREETING\""])
            .env("PATH", "/usr/bin:/bin")
            .env("GREETING", "hello world");
        let ran = run(sb.handle.as_ref(), req).await;
        assert_eq!(ran.stdout, "/usr/bin:/bin|hello world", "{mode}: {ran:?}");
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn an_isolated_command_cannot_read_a_host_process_environment_through_proc() {
    // /proc/<pid>/environ shows the environment a process was started with: start one.
    let mut host = std::process::Command::new("sleep")
        .arg("60")
        .env("HOST_PROCESS_SECRET", "hunter3-do-not-leak")
        .spawn()
        .unwrap();
    let pid = host.id().to_string();
    let modes = common::modes(&Isolation::ALL).await;
    for mode in modes {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let req = ExecRequest::new(["/bin/sh", "-c", "tr '\\0' '\\n' < /proc/$HOST_PID/environ"])
            .env("HOST_PID", &pid);
        let ran = run(sb.handle.as_ref(), req).await;
        let leaked = ran.stdout.contains("hunter3-do-not-leak");
        if mode == Isolation::None {
            // Without isolation the host's /proc is open: this is what the warning is about.
            assert!(leaked, "none: the check itself does not work: {ran:?}");
        } else {
            assert!(!leaked, "{mode}: read a host process's environment");
        }
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
    host.kill().unwrap();
    host.wait().unwrap();
}
