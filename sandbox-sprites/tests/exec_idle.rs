//! An exec whose caller keeps only the event stream (drops the kill control) waits for the
//! command without burning CPU. Alone in its test binary so the process CPU time it measures
//! is its own.

#![cfg(target_os = "linux")]

use std::time::Duration;

use futures::StreamExt;
use sandbox_core::{
    CreateRequest, Env, ExecEvent, ExecRequest, Provider, SandboxConfig, SandboxId,
};
use sandbox_sprites::SpritesProvider;
use sandbox_testkit::sprites::SpritesEmulator;

/// User plus system CPU time of this process, from `/proc/self/stat` (USER_HZ = 100).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_command_without_its_kill_control_waits_without_spinning() {
    let emu = SpritesEmulator::start("t").await.unwrap();
    let env = Env::from_pairs([
        ("SPRITES_API_TOKEN", emu.token().to_string()),
        ("SPRITES_API_BASE_URL", emu.base_url()),
    ]);
    let p = SpritesProvider::from_config(&SandboxConfig::default(), &env).unwrap();
    let sb = p
        .create(&CreateRequest {
            sandbox_id: SandboxId::new(),
            config: SandboxConfig::default(),
        })
        .await
        .unwrap()
        .handle;
    let mut exec = sb.exec(ExecRequest::new(["sleep", "2"])).await.unwrap();
    // The caller only reads the stream: the control (and with it every kill sender) is gone.
    exec.control = None;
    let before = cpu_time();
    let mut exit = None;
    while let Some(ev) = exec.events.next().await {
        if let ExecEvent::Exit(e) = ev.unwrap() {
            exit = Some(e);
        }
    }
    let used = cpu_time() - before;
    assert!(exit.expect("an exit status").success());
    // Waiting costs next to nothing; a polling loop would use most of a core for 2 s.
    assert!(
        used < Duration::from_millis(500),
        "waiting for a 2 s command used {used:?} of CPU"
    );
}
