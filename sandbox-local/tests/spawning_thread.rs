//! Commands outlive the thread that started them: bubblewrap's `--die-with-parent` follows the
//! spawning *thread*, and tokio retires idle blocking-pool threads (and worker threads that ran
//! `block_in_place`).

mod common;

use std::time::Duration;

use common::{eventually, sh};
use futures::StreamExt;
use sandbox_core::{ExecEvent, StopMode};
use sandbox_local::Isolation;

#[test]
fn a_command_survives_the_exit_of_the_thread_that_started_it() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_keep_alive(Duration::from_millis(50))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for mode in common::modes(&Isolation::ALL).await {
            let (_root, _p, sb) = common::sandbox(mode, "").await;
            let handle = tokio::runtime::Handle::current();
            let sandbox = sb.handle.clone();
            // Started from a blocking-pool thread, which retires once idle.
            let (tid, mut exec) = tokio::task::spawn_blocking(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let exec = handle.block_on(sandbox.exec(sh(
                    "echo up; while [ ! -e go ]; do sleep 0.02; done; echo done",
                )));
                (tid, exec.unwrap())
            })
            .await
            .unwrap();
            assert!(matches!(
                exec.events.next().await,
                Some(Ok(ExecEvent::Stdout(_)))
            ));
            eventually(
                "the spawning thread to retire",
                Duration::from_secs(20),
                || !std::path::Path::new(&format!("/proc/self/task/{tid}")).exists(),
            )
            .await;
            std::fs::write(format!("{}/go", sb.handle.workspace()), "").unwrap();
            let (mut out, mut exit) = (Vec::new(), None);
            tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(ev) = exec.events.next().await {
                    match ev.unwrap() {
                        ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                        ExecEvent::Stderr(_) => {}
                        ExecEvent::Exit(e) => exit = Some(e),
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{mode}: the command did not finish"));
            let exit = exit.unwrap();
            assert!(
                exit.success() && out == b"done\n",
                "{mode}: killed with its thread: {exit:?} {:?}",
                String::from_utf8_lossy(&out)
            );
            sb.handle.stop(StopMode::Delete).await.unwrap();
        }
    });
}
