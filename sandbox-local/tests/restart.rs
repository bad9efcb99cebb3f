//! `stop` kills the commands of a sandbox even when another process started them (the CLI in
//! another terminal, or the caller before it crashed and restarted).

mod common;

use std::time::Duration;

use common::{alive, eventually};
use futures::StreamExt;
use sandbox_core::{ExecEvent, Provider, ResumeRequest, SandboxId, StopMode};
use sandbox_local::Isolation;

/// Set (to a mode) only in the child process the test below starts.
const HELPER_MODE_ENV: &str = "SANDBOX_LOCAL_TEST_HELPER_MODE";
const HELPER_ROOT_ENV: &str = "SANDBOX_LOCAL_TEST_HELPER_ROOT";

/// Run in a child process: creates a sandbox, starts a long command, prints what the parent
/// needs to resume the sandbox and the command's pid, and exits without stopping anything.
#[tokio::test]
#[ignore = "helper of stop_kills_commands_another_process_started"]
async fn helper_starts_a_command_and_exits() {
    let (Ok(mode), Ok(root)) = (
        std::env::var(HELPER_MODE_ENV),
        std::env::var(HELPER_ROOT_ENV),
    ) else {
        return;
    };
    let mode = Isolation::ALL
        .into_iter()
        .find(|m| m.as_str() == mode)
        .unwrap();
    let p = common::provider(std::path::Path::new(&root));
    let sb = p
        .create(&sandbox_core::CreateRequest {
            sandbox_id: SandboxId::new(),
            config: common::config(mode, ""),
        })
        .await
        .unwrap();
    let mut exec = sb
        .handle
        .exec(common::sh("echo up; exec sleep 300"))
        .await
        .unwrap();
    assert!(matches!(
        exec.events.next().await,
        Some(Ok(ExecEvent::Stdout(_)))
    ));
    let line = serde_json::json!({
        "externalId": sb.external_id,
        "params": sb.params,
        "pid": exec.external_id,
    });
    println!("HELPER {line}");
    std::process::exit(0);
}

#[tokio::test]
async fn stop_kills_commands_another_process_started() {
    // Under bubblewrap the command dies with the process that started it anyway.
    for mode in common::modes(&[Isolation::Landlock, Isolation::None]).await {
        let root = common::root();
        let out = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "helper_starts_a_command_and_exits",
                "--nocapture",
            ])
            .env(HELPER_MODE_ENV, mode.as_str())
            .env(HELPER_ROOT_ENV, root.path())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("the helper process did not finish")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("HELPER "))
            .unwrap_or_else(|| panic!("{mode}: helper printed {stdout}"));
        let started: serde_json::Value = serde_json::from_str(line).unwrap();
        let pid: i32 = started["pid"].as_str().unwrap().parse().unwrap();
        assert!(alive(pid), "{mode}: the command died with its caller");

        let external_id = started["externalId"].as_str().unwrap().to_string();
        let p = common::provider(root.path());
        let sb = p
            .resume(&ResumeRequest {
                sandbox_id: SandboxId::parse(external_id.trim_start_matches("local:")).unwrap(),
                external_id,
                url: None,
                params: started["params"].clone(),
            })
            .await
            .unwrap();
        sb.stop(StopMode::Delete).await.unwrap();
        eventually(
            "the other process's command to die",
            Duration::from_secs(10),
            || !alive(pid),
        )
        .await;
    }
}
