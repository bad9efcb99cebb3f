//! HTTP requests of one recorded process run against the emulator.

#[path = "support/common.rs"]
mod common;
#[path = "support/run.rs"]
mod run;

use sandbox_core::{ProcessStatus, ReadFrom};

fn count(emu: &sandbox_testkit::instant::InstantEmulator, path: &str, op: Option<&str>) -> usize {
    emu.requests()
        .iter()
        .filter(|r| r.path == path && op.is_none_or(|o| r.ops.iter().any(|x| x == o)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_run_needs_three_round_trips_besides_its_batched_appends() {
    let emu = common::emulator().await;
    let chunks = 500;
    let (svc, sandbox) =
        run::service_with_sandbox(common::backend_without_timer(&emu), chunks).await;
    emu.clear_requests();
    let outcome = run::recorded_run(&svc, &sandbox).await;
    assert_eq!(outcome.status, ProcessStatus::Exited);
    let all = emu.requests();
    let appends = count(&emu, "/admin/sse/push", Some("append-stream"));
    let others = all.len() - appends;
    // start-stream, the transact creating the process with its links, the final transact;
    // plus one SSE session opened by the sink (shared by every later run).
    assert_eq!(count(&emu, "/admin/sse", None), 1, "{all:?}");
    assert_eq!(count(&emu, "/admin/sse/push", Some("start-stream")), 1);
    assert_eq!(count(&emu, "/admin/transact", None), 2);
    assert_eq!(
        count(&emu, "/admin/query", None),
        0,
        "no lookups on the way"
    );
    assert_eq!(others, 4, "{all:?}");
    assert!(
        appends <= 10,
        "{appends} append requests for {chunks} chunks"
    );

    let log = svc
        .logs()
        .read(&outcome.process_id, ReadFrom::START, usize::MAX)
        .await
        .unwrap();
    assert_eq!(
        log.entries.len(),
        chunks + 2,
        "status, every output chunk, exit"
    );

    // A second run reuses the session: three requests besides appends.
    emu.clear_requests();
    run::recorded_run(&svc, &sandbox).await;
    let appends = count(&emu, "/admin/sse/push", Some("append-stream"));
    assert_eq!(emu.requests().len() - appends, 3, "{:?}", emu.requests());
}
