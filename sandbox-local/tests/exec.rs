//! Commands: streaming, exit codes and signals, timeouts and kills of whole process groups.

mod common;

use std::time::Duration;

use common::{alive, eventually, run, sh};
use futures::StreamExt;
use sandbox_core::{Error, ExecEvent, ExecRequest, StopMode};
use sandbox_local::Isolation;

#[tokio::test]
async fn output_streams_while_the_command_runs() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let mut exec = sb
            .handle
            .exec(sh("echo first; echo warning >&2; sleep 300; echo never"))
            .await
            .unwrap();
        // Both lines arrive long before the command could end on its own.
        let (mut out, mut err) = (Vec::new(), Vec::new());
        tokio::time::timeout(Duration::from_secs(20), async {
            while out != b"first\n" || err != b"warning\n" {
                match exec.events.next().await {
                    Some(Ok(ExecEvent::Stdout(b))) => out.extend_from_slice(&b),
                    Some(Ok(ExecEvent::Stderr(b))) => err.extend_from_slice(&b),
                    other => panic!("{mode}: {other:?} before the output"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{mode}: output did not stream: {out:?} {err:?}"));
        exec.control.clone().unwrap().kill().await.unwrap();
        let mut exits = 0;
        while let Some(ev) = exec.events.next().await {
            match ev.unwrap() {
                ExecEvent::Exit(_) => exits += 1,
                other => panic!("{mode}: {other:?} after kill"),
            }
        }
        assert_eq!(exits, 1, "{mode}");
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group_and_keeps_partial_output() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        // The background sleep is a grandchild: it must die with the command.
        let req = sh("sleep 300 & echo \"bg $!\"; sleep 300").timeout(Duration::from_secs(2));
        let ran = run(sb.handle.as_ref(), req).await;
        assert!(ran.exit.timed_out, "{mode}: {ran:?}");
        assert_eq!(ran.exit.signal.as_deref(), Some("SIGKILL"), "{mode}");
        assert_eq!(ran.exit.code, None, "{mode}");
        assert!(
            ran.stdout.starts_with("bg "),
            "{mode}: partial output lost: {ran:?}"
        );
        if mode != Isolation::Bwrap {
            // Host pids (bubblewrap's are namespaced; its namespace ends with the command).
            let bg: i32 = ran.stdout.trim().trim_start_matches("bg ").parse().unwrap();
            eventually(
                "the background child to die",
                Duration::from_secs(10),
                || !alive(bg),
            )
            .await;
        }
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn kill_reports_sigkill_and_a_signal_exit_is_reported_by_name() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let mut exec = sb.handle.exec(sh("echo up; exec sleep 300")).await.unwrap();
        assert!(matches!(
            exec.events.next().await,
            Some(Ok(ExecEvent::Stdout(_)))
        ));
        exec.control.clone().unwrap().kill().await.unwrap();
        let mut last = None;
        while let Some(ev) = exec.events.next().await {
            last = Some(ev.unwrap());
        }
        match last {
            Some(ExecEvent::Exit(e)) => {
                assert_eq!(e.signal.as_deref(), Some("SIGKILL"), "{mode}: {e:?}");
                assert!(!e.timed_out, "{mode}");
            }
            other => panic!("{mode}: last event {other:?}"),
        }
        let ran = run(sb.handle.as_ref(), sh("exit 42")).await;
        assert_eq!(ran.exit.code, Some(42), "{mode}");
        if mode != Isolation::Bwrap {
            // Under bubblewrap a signal inside shows as exit code 128+n (bwrap's own status).
            let ran = run(sb.handle.as_ref(), sh("kill -TERM $$")).await;
            assert_eq!(
                ran.exit.signal.as_deref(),
                Some("SIGTERM"),
                "{mode}: {ran:?}"
            );
        }
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn a_missing_program_or_cwd_fails_to_start() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let ws = sb.handle.workspace().to_string();
        for req in [
            ExecRequest::new(["no-such-program-3b1f"]),
            ExecRequest::new(["/usr/bin/no-such-program-3b1f"]),
            ExecRequest::new(["true"]).cwd(format!("{ws}/missing/dir")),
        ] {
            match sb.handle.exec(req.clone()).await {
                Err(Error::StartFailed { .. }) => {}
                other => panic!("{mode}: {req:?} gave {other:?}"),
            }
        }
        match sb.handle.exec(ExecRequest::new(Vec::<String>::new())).await {
            Err(e) => assert_eq!(e.code(), "sandbox_command_empty"),
            Ok(_) => panic!("{mode}: empty argv started"),
        }
        for req in [
            ExecRequest::new(["printf", "a\0b"]),
            ExecRequest::new(["true"]).env("K", "a\0b"),
        ] {
            match sb.handle.exec(req.clone()).await {
                Err(Error::InvalidInput { .. }) => {}
                Err(e) => panic!("{mode}: {req:?} gave {e:?}"),
                Ok(_) => panic!("{mode}: {req:?} started"),
            }
        }
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn large_output_arrives_complete_and_in_order() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let ran = run(sb.handle.as_ref(), sh("seq 1 200000")).await;
        assert!(ran.exit.success(), "{mode}");
        let expected: String = (1..=200_000).map(|n| format!("{n}\n")).collect();
        assert!(
            ran.stdout == expected,
            "{mode}: {} bytes differ",
            ran.stdout.len()
        );
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn stop_kills_every_running_command() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let mut a = sb.handle.exec(sh("echo a; exec sleep 300")).await.unwrap();
        let mut b = sb.handle.exec(sh("echo b; exec sleep 300")).await.unwrap();
        for exec in [&mut a, &mut b] {
            assert!(matches!(
                exec.events.next().await,
                Some(Ok(ExecEvent::Stdout(_)))
            ));
        }
        let pids: Vec<i32> = [&a, &b]
            .iter()
            .map(|e| e.external_id.as_deref().unwrap().parse().unwrap())
            .collect();
        sb.handle.stop(StopMode::Keep).await.unwrap();
        for exec in [&mut a, &mut b] {
            let mut last = None;
            while let Some(ev) = exec.events.next().await {
                last = Some(ev.unwrap());
            }
            assert!(
                matches!(&last, Some(ExecEvent::Exit(e)) if e.signal.as_deref() == Some("SIGKILL")),
                "{mode}: {last:?}"
            );
        }
        for pid in pids {
            assert!(!alive(pid), "{mode}: {pid} survived stop");
        }
        match sb.handle.exec(ExecRequest::new(["true"])).await {
            Err(e) => assert_eq!(e.code(), "sandbox_not_active:shutdown", "{mode}"),
            Ok(_) => panic!("{mode}: exec after stop"),
        }
    }
}

#[tokio::test]
async fn stop_through_a_resumed_handle_kills_commands_started_through_the_first() {
    use sandbox_core::{Provider, ResumeRequest, SandboxId};
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, p, sb) = common::sandbox(mode, "").await;
        let mut exec = sb.handle.exec(sh("echo up; exec sleep 300")).await.unwrap();
        assert!(matches!(
            exec.events.next().await,
            Some(Ok(ExecEvent::Stdout(_)))
        ));
        let resumed = p
            .resume(&ResumeRequest {
                sandbox_id: SandboxId::parse(sb.external_id.trim_start_matches("local:")).unwrap(),
                external_id: sb.external_id.clone(),
                url: None,
                params: sb.params.clone(),
            })
            .await
            .unwrap();
        resumed.stop(StopMode::Delete).await.unwrap();
        let mut last = None;
        while let Some(ev) = exec.events.next().await {
            last = Some(ev.unwrap());
        }
        assert!(
            matches!(&last, Some(ExecEvent::Exit(e)) if e.signal.as_deref() == Some("SIGKILL")),
            "{mode}: {last:?}"
        );
        assert!(
            !std::path::Path::new(sb.handle.workspace()).exists(),
            "{mode}"
        );
    }
}

#[tokio::test]
async fn stop_does_not_wait_for_a_consumer_that_never_reads() {
    for mode in common::modes(&[Isolation::None]).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        // Far more output than the event buffer holds, and nobody reads it.
        let exec = sb.handle.exec(sh("yes")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), sb.handle.stop(StopMode::Delete))
            .await
            .expect("stop waited for the unread events")
            .unwrap();
        drop(exec);
    }
}

#[tokio::test]
async fn stdin_larger_than_a_pipe_buffer_reaches_the_command_whole() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        // 4 MiB echoed back while it is still being fed: neither side may wait for the other.
        let input: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut exec = sb
            .handle
            .exec(ExecRequest::new(["cat"]).stdin(input.clone()))
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut exit = None;
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(ev) = exec.events.next().await {
                match ev.unwrap() {
                    ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                    ExecEvent::Stderr(b) => panic!("{mode}: stderr {b:?}"),
                    ExecEvent::Exit(e) => exit = Some(e),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{mode}: cat did not finish"));
        assert!(exit.unwrap().success(), "{mode}");
        assert!(
            out == input,
            "{mode}: {} bytes back of {}",
            out.len(),
            input.len()
        );
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}
