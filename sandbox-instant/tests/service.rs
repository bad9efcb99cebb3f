//! The sandbox service on the `instant` store: recorded runs, observed processes, stop and
//! reconcile from a second service instance (another OS process's view).

#[path = "support/common.rs"]
mod common;
#[path = "support/run.rs"]
mod run;

use sandbox_core::service::ObservedFinish;
use sandbox_core::{ChunkType, LogState, ObservedSpec, ProcessStatus, ReadFrom, StopMode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observed_processes_keep_one_writer_and_end_with_their_exit() {
    let emu = common::emulator().await;
    let (svc, sandbox) = run::service_with_sandbox(common::backend(&emu), 0).await;
    let pid = svc
        .start_observed(
            &sandbox,
            ObservedSpec {
                argv: vec!["agent".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..5 {
        svc.append_observed(
            &pid,
            ChunkType::Stdout,
            json!({"text": format!("{i}\n")}).as_object().cloned(),
        )
        .await
        .unwrap();
    }
    let outcome = svc
        .finish_observed(&pid, ObservedFinish::exit(0))
        .await
        .unwrap();
    assert_eq!(outcome.status, ProcessStatus::Exited);
    let t = svc.transcript(&pid).await.unwrap();
    assert_eq!(t.stdout, b"0\n1\n2\n3\n4\n".to_vec());
    assert_eq!(t.exit_code, Some(0));
    let rec = svc.process(&pid).await.unwrap();
    assert_eq!(rec.status, ProcessStatus::Exited);
    assert_eq!(rec.stream_client_id, Some(pid.stream_client_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_sandbox_marks_open_processes_lost_and_aborts_their_logs() {
    let emu = common::emulator().await;
    let (svc, sandbox) = run::service_with_sandbox(common::backend(&emu), 0).await;
    let pid = svc
        .start_observed(
            &sandbox,
            ObservedSpec {
                argv: vec!["agent".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    svc.append_observed(
        &pid,
        ChunkType::Stdout,
        json!({"text": "x\n"}).as_object().cloned(),
    )
    .await
    .unwrap();

    // Another OS process (a second service over the same app) sees the writer's lease held
    // (the process row is fresh), so reconcile leaves the process alone.
    let other_uri = emu.base_url().replace("127.0.0.1", "localhost");
    let other = sandbox_instant::backend(
        sandbox_instant::InstantConfig::new(common::APP_ID, common::TOKEN, &other_uri).unwrap(),
    )
    .unwrap();
    let (other_svc, _) = run::service_with_sandbox(other, 0).await;
    let report = other_svc.reconcile().await.unwrap();
    assert!(report.alive.contains(&pid), "{report:?}");

    svc.stop(&sandbox, StopMode::Default).await.unwrap();
    let rec = svc.process(&pid).await.unwrap();
    assert_eq!(rec.status, ProcessStatus::Lost);
    let page = svc.read_log(&pid, ReadFrom::START, 100).await.unwrap();
    assert!(page.status.state.is_finished(), "{:?}", page.status.state);
    assert!(matches!(
        page.status.state,
        LogState::Aborted { .. } | LogState::Closed
    ));
}
