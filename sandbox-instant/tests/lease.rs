//! The writer lease: a writer of another OS process is `Alive` while it renews
//! `sandbox_processes.updatedAt` and `Gone` once the lease is stale, so `reconcile` in another
//! process marks its process lost.

#[path = "support/common.rs"]
mod common;
#[path = "support/run.rs"]
mod run;

use std::future::Future;
use std::time::{Duration, Instant};

use sandbox_core::{
    LogState, ProcessId, ProcessRecord, ProcessStatus, SandboxId, StoreBackend, WriterLiveness,
};
use sandbox_instant::InstantConfig;
use sandbox_testkit::instant::InstantEmulator;
use serde_json::{json, Value};

const BEAT: Duration = Duration::from_millis(20);
const STALE: Duration = Duration::from_millis(500);

fn fast(mut c: InstantConfig) -> InstantConfig {
    c.lease_beat = BEAT;
    c.lease_stale = STALE;
    c
}

/// The writer's side.
fn writer_backend(emu: &InstantEmulator) -> StoreBackend {
    sandbox_instant::backend(fast(common::config(emu))).unwrap()
}

/// Another OS process's view: a second sink with no in-process knowledge of the first.
fn other_backend(emu: &InstantEmulator) -> StoreBackend {
    let uri = emu.base_url().replace("127.0.0.1", "localhost");
    let mut c = fast(InstantConfig::new(common::APP_ID, common::TOKEN, &uri).unwrap());
    c.retry = common::config(emu).retry;
    sandbox_instant::backend(c).unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Polls `check` until it holds, for at most 10 s.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn running_process(backend: &StoreBackend, sandbox: SandboxId) -> ProcessRecord {
    let pid = ProcessId::new();
    let record: ProcessRecord = serde_json::from_value(json!({
        "id": pid.to_string(),
        "sandboxId": sandbox.to_string(),
        "kind": "command",
        "mode": "background",
        "status": "running",
        "provider": "printer",
        "command": "agent",
        "streamClientId": pid.stream_client_id(),
        "startedAt": now_ms(),
    }))
    .unwrap();
    backend.records.insert_process(&record).await.unwrap();
    record
}

async fn writer_seen_from(backend: &StoreBackend, pid: &ProcessId) -> WriterLiveness {
    backend.logs.status(pid).await.unwrap().unwrap().writer
}

fn process_row(emu: &InstantEmulator, pid: &ProcessId) -> Value {
    Value::Object(
        emu.entity("sandbox_processes", &pid.to_string())
            .expect("the process row"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_of_another_process_is_alive_while_it_beats_and_lost_once_stale() {
    let emu = common::emulator().await;
    let mine = writer_backend(&emu);
    let (_svc, sandbox) = run::service_with_sandbox(writer_backend(&emu), 0).await;
    let record = running_process(&mine, sandbox).await;
    let pid = record.id;
    let mut w = mine.logs.open_writer(&pid).await.unwrap();
    let line = sandbox_core::ProcessChunk::new(
        1,
        sandbox_core::ChunkType::Stdout,
        Default::default(),
        Default::default(),
        None,
    )
    .encode();
    w.append(&[sandbox_core::LogEntry {
        seq: 1,
        offset: 0,
        line,
    }])
    .await
    .unwrap();
    w.flush().await.unwrap();

    let other = other_backend(&emu);
    // Alive for well past the stale interval after the start: the heartbeats carry it.
    let started = Instant::now();
    while started.elapsed() < STALE * 3 {
        assert_eq!(
            writer_seen_from(&other, &pid).await,
            WriterLiveness::Alive,
            "after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let beat = process_row(&emu, &pid)["updatedAt"].as_i64().unwrap();
    assert!(beat > record.started_at, "updatedAt was renewed");
    let e = other.logs.abandon(&pid, "x").await.unwrap_err();
    assert_eq!(e.code(), "sandbox_process_stream_writer_alive");

    // The writer dies without closing its log: its lease goes stale.
    drop(w);
    wait_until("the writer to be gone", || async {
        writer_seen_from(&other, &pid).await == WriterLiveness::Gone
    })
    .await;
    // This OS process still answers from what it knows, as before.
    assert_eq!(writer_seen_from(&mine, &pid).await, WriterLiveness::Gone);

    let (other_svc, _) = run::service_with_sandbox(other_backend(&emu), 0).await;
    let report = other_svc.reconcile().await.unwrap();
    assert!(
        report
            .lost
            .iter()
            .any(|(p, why)| *p == pid && why == "writer_lost"),
        "{report:?}"
    );
    let rec = other_svc.process(&pid).await.unwrap();
    assert_eq!(rec.status, ProcessStatus::Lost);
    let status = other.logs.status(&pid).await.unwrap().unwrap();
    assert!(
        matches!(status.state, LogState::Aborted { .. }),
        "{:?}",
        status.state
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_changes_nothing_but_updated_at() {
    let emu = common::emulator().await;
    let mine = writer_backend(&emu);
    let (_svc, sandbox) = run::service_with_sandbox(writer_backend(&emu), 0).await;
    let record = running_process(&mine, sandbox).await;
    let pid = record.id;
    let before = process_row(&emu, &pid);
    emu.clear_requests();
    let mut w = mine.logs.open_writer(&pid).await.unwrap();
    wait_until("two heartbeats", || async {
        emu.requests()
            .iter()
            .filter(|r| r.path == "/admin/transact")
            .count()
            >= 2
    })
    .await;
    w.close().await.unwrap();
    let transacts: Vec<Value> = emu
        .requests()
        .iter()
        .filter(|r| r.path == "/admin/transact")
        .map(|r| r.body.clone())
        .collect();
    for t in &transacts {
        assert_eq!(
            t["steps"],
            json!([[
                "update",
                "sandbox_processes",
                pid.to_string(),
                {"updatedAt": t["steps"][0][3]["updatedAt"]},
                {"upsert": false}
            ]]),
            "{t}"
        );
        assert!(t["steps"][0][3]["updatedAt"].is_i64(), "{t}");
    }
    let mut after = process_row(&emu, &pid);
    assert!(after["updatedAt"].as_i64().unwrap() >= record.started_at);
    let mut before = before;
    before.as_object_mut().unwrap().remove("updatedAt");
    after.as_object_mut().unwrap().remove("updatedAt");
    assert_eq!(before, after);

    // Closed: no more beats.
    let n = emu.requests().len();
    tokio::time::sleep(BEAT * 5).await;
    assert_eq!(emu.requests().len(), n, "{:?}", &emu.requests()[n..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_without_a_process_row_has_no_lease() {
    let emu = common::emulator().await;
    let mine = writer_backend(&emu);
    let other = other_backend(&emu);
    let pid = ProcessId::new();
    let mut w = mine.logs.open_writer(&pid).await.unwrap();
    emu.clear_requests();
    // The first beat finds no row and stops: one transact, then nothing.
    wait_until("the heartbeat", || async {
        emu.requests().iter().any(|r| r.path == "/admin/transact")
    })
    .await;
    tokio::time::sleep(BEAT * 5).await;
    let transacts = emu
        .requests()
        .iter()
        .filter(|r| r.path == "/admin/transact")
        .count();
    assert_eq!(transacts, 1);
    assert!(
        emu.entity("sandbox_processes", &pid.to_string()).is_none(),
        "no row made"
    );
    assert_eq!(
        writer_seen_from(&other, &pid).await,
        WriterLiveness::Unknown
    );
    assert_eq!(writer_seen_from(&mine, &pid).await, WriterLiveness::Alive);
    w.close().await.unwrap();
}
