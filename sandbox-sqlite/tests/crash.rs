//! Crash recovery and sharing one database file between OS processes.
//!
//! The test executable re-executes itself as the writing child: the `child_*` tests do nothing
//! unless `SANDBOX_SQLITE_CHILD` names a role, and the parent tests run them with
//! `--exact <name> --nocapture` and the database path in the environment.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sandbox_core::{
    now_ms, ChunkType, ChunkWriter, LogState, MockProvider, MockSandboxHandle, ProcessId,
    ProcessKind, ProcessMode, ProcessRecord, ProcessStatus, ReadFrom, RecordStore, SandboxId,
    SandboxRecord, SandboxService, SandboxStatus, StreamSink, WriterLiveness,
};
use sandbox_sqlite::{SqliteConfig, SqliteDatabase};
use serde_json::json;

const ROLE: &str = "SANDBOX_SQLITE_CHILD";
const DB: &str = "SANDBOX_SQLITE_CHILD_DB";
const SANDBOX: &str = "SANDBOX_SQLITE_CHILD_SANDBOX";
const PROCESS: &str = "SANDBOX_SQLITE_CHILD_PROCESS";
const CHUNKS: &str = "SANDBOX_SQLITE_CHILD_CHUNKS";
/// Bound on every wait for a child.
const LIMIT: Duration = Duration::from_secs(60);

fn open(path: &Path) -> SqliteDatabase {
    SqliteDatabase::open(&SqliteConfig::file(path)).unwrap()
}

fn sandbox_record(id: SandboxId) -> SandboxRecord {
    SandboxRecord {
        id,
        status: SandboxStatus::Active,
        provider: "fake".into(),
        external_sandbox_id: Some(format!("fake:{id}")),
        sandbox_url: None,
        timeout: None,
        runtime: None,
        vcpus: None,
        ports: None,
        purpose: None,
        params: None,
        created_at: now_ms(),
        updated_at: None,
        shutdown_at: None,
        sandbox_user_id: None,
    }
}

fn process_record(id: ProcessId, sandbox: SandboxId) -> ProcessRecord {
    ProcessRecord {
        id,
        sandbox_id: sandbox,
        kind: ProcessKind::Command,
        mode: ProcessMode::Foreground,
        status: ProcessStatus::Running,
        provider: "fake".into(),
        command: "yes".into(),
        args: Some(vec![]),
        cwd: None,
        env: None,
        exit_code: None,
        signal: None,
        external_process_id: None,
        stream_id: Some(id.stream_client_id()),
        stream_client_id: Some(id.stream_client_id()),
        stream_started_at: Some(now_ms()),
        stream_finished_at: None,
        stream_abort_reason: None,
        started_at: now_ms(),
        updated_at: None,
        exited_at: None,
        metadata: Some(json!({ "caller": "crash-test" })),
    }
}

fn text_of(i: u64) -> String {
    format!("chunk {i} {}\n", "x".repeat((i % 97) as usize))
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// Starts this test executable as the child running test `name`.
fn spawn_child(
    name: &str,
    role: &str,
    db: &Path,
    sandbox: SandboxId,
    process: ProcessId,
    chunks: u64,
) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DB, db)
        .env(SANDBOX, sandbox.to_string())
        .env(PROCESS, process.to_string())
        .env(CHUNKS, chunks.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The child's `ack <seq>` lines, as they arrive, through a channel (so waits are bounded).
fn acks(child: &mut Child) -> mpsc::Receiver<u64> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // The harness may print `test child_writer ... ` before the first ack on its line.
            if let Some(at) = line.rfind("ack ") {
                if tx.send(line[at + 4..].trim().parse().unwrap()).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// Child role `writer`: writes `CHUNKS` chunks (0 = until killed) to the log of `PROCESS`,
/// printing `ack <seq>` after each append returned, then closes the log.
#[tokio::test]
async fn child_writer() {
    if env(ROLE).as_deref() != Some("writer") {
        eprintln!("skipped: child_writer runs only as a child of the crash tests");
        return;
    }
    let db = open(Path::new(&env(DB).unwrap()));
    let sandbox = SandboxId::parse(&env(SANDBOX).unwrap()).unwrap();
    let process = ProcessId::parse(&env(PROCESS).unwrap()).unwrap();
    let chunks: u64 = env(CHUNKS).unwrap().parse().unwrap();
    let records = db.records();
    if records.get_sandbox(&sandbox).await.unwrap().is_none() {
        records
            .insert_sandbox(&sandbox_record(sandbox))
            .await
            .unwrap();
    }
    records
        .insert_process(&process_record(process, sandbox))
        .await
        .unwrap();
    let logs = db.logs();
    let mut writer = ChunkWriter::open(&logs, sandbox, process).await.unwrap();
    let mut out = std::io::stdout();
    let mut i = 0;
    while chunks == 0 || i < chunks {
        i += 1;
        let seq = writer
            .append(
                ChunkType::Stdout,
                Some(sandbox_core::protocol::output_data(text_of(i).as_bytes())),
            )
            .await
            .unwrap();
        writeln!(out, "ack {seq}").unwrap();
        out.flush().unwrap();
    }
    writer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_chunks_survive_sigkill_and_reconcile_marks_the_process_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let db = open(&path);
    let (sandbox, process) = (SandboxId::new(), ProcessId::new());
    db.records()
        .insert_sandbox(&sandbox_record(sandbox))
        .await
        .unwrap();

    let mut child = spawn_child("child_writer", "writer", &path, sandbox, process, 0);
    let rx = acks(&mut child);
    let mut acked = Vec::new();
    while acked.len() < 300 {
        acked.push(
            rx.recv_timeout(LIMIT)
                .expect("the child acknowledges chunks"),
        );
    }

    // While the child writes: its writer is alive, a second writer is refused across
    // processes, and reconcile leaves the process alone.
    let logs = db.logs();
    assert_eq!(
        logs.status(&process).await.unwrap().unwrap().writer,
        WriterLiveness::Alive
    );
    let second = logs
        .open_writer(&process)
        .await
        .err()
        .expect("a second writer is refused");
    assert_eq!(second.code(), "sandbox_process_stream_writer_exists");
    let mut fake = MockProvider::new();
    fake.expect_name().return_const("fake".to_string());
    fake.expect_resume().returning(|_| {
        Ok(Arc::new(MockSandboxHandle::new()) as Arc<dyn sandbox_core::SandboxHandle>)
    });
    let service = SandboxService::builder()
        .store(db.backend())
        .provider(Arc::new(fake))
        .use_registry(false)
        .bootstrappers(vec![])
        .build()
        .unwrap();
    let report = service.reconcile().await.unwrap();
    assert_eq!(report.alive, vec![process], "{report:?}");
    assert!(report.lost.is_empty(), "{report:?}");
    let abandon = logs.abandon(&process, "writer_lost").await.unwrap_err();
    assert_eq!(abandon.code(), "sandbox_process_stream_writer_alive");

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Acks printed before the kill may still be in the pipe.
    while let Ok(seq) = rx.recv_timeout(LIMIT) {
        acked.push(seq);
    }
    let last_ack = *acked.last().unwrap();
    assert_eq!(
        acked,
        (1..=last_ack).collect::<Vec<_>>(),
        "acks are 1, 2, 3, ..."
    );

    // A new process (here: a new handle on the file) finds every acknowledged chunk in order.
    drop(db);
    let db = open(&path);
    let logs = db.logs();
    let page = logs
        .read(&process, ReadFrom::START, usize::MAX)
        .await
        .unwrap();
    assert!(
        page.entries.len() as u64 >= last_ack,
        "{} entries < {last_ack} acks",
        page.entries.len()
    );
    let mut offset = 0;
    for (i, e) in page.entries.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!((e.seq, e.offset), (seq, offset), "no gap or duplicate");
        offset = e.end();
        let chunk = e.chunk().unwrap();
        assert_eq!(chunk.text(), Some(text_of(seq).as_str()));
        assert_eq!(chunk.process_id, process.to_string());
    }
    assert_eq!(page.status.state, LogState::Open);
    assert_eq!(
        page.status.writer,
        WriterLiveness::Gone,
        "a killed writer is gone"
    );

    // Reconcile, run over the same database, marks the process lost.
    let mut fake = MockProvider::new();
    fake.expect_name().return_const("fake".to_string());
    fake.expect_resume().returning(|_| {
        Ok(Arc::new(MockSandboxHandle::new()) as Arc<dyn sandbox_core::SandboxHandle>)
    });
    let service = SandboxService::builder()
        .store(db.backend())
        .provider(Arc::new(fake))
        .use_registry(false)
        .bootstrappers(vec![])
        .build()
        .unwrap();
    let report = service.reconcile().await.unwrap();
    assert_eq!(
        report.lost,
        vec![(process, "writer_lost".to_string())],
        "{report:?}"
    );
    let record = db.records().get_process(&process).await.unwrap().unwrap();
    assert_eq!(record.status, ProcessStatus::Lost);
    assert_eq!(record.stream_abort_reason.as_deref(), Some("writer_lost"));
    assert_eq!(
        record.metadata.as_ref().unwrap()["lostReason"],
        "writer_lost"
    );
    assert_eq!(record.metadata.as_ref().unwrap()["caller"], "crash-test");
    let status = logs.status(&process).await.unwrap().unwrap();
    assert_eq!(
        status.state,
        LogState::Aborted {
            reason: "writer_lost".into()
        }
    );
    // A follower of the abandoned log gets every entry and then an end.
    let followed: Vec<_> = tokio::time::timeout(
        LIMIT,
        logs.follow(&process, ReadFrom::START)
            .await
            .unwrap()
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(followed.len(), page.entries.len());
    // A second reconcile finds nothing more to do.
    let again = service.reconcile().await.unwrap();
    assert!(again.lost.is_empty() && again.alive.is_empty(), "{again:?}");
}

/// Child role `dropper`: opens the writer of `PROCESS`, appends one chunk, drops the writer
/// without closing the log, prints `dropped`, and keeps running until its stdin closes.
#[tokio::test]
async fn child_dropper() {
    if env(ROLE).as_deref() != Some("dropper") {
        eprintln!("skipped: child_dropper runs only as a child of the crash tests");
        return;
    }
    let db = open(Path::new(&env(DB).unwrap()));
    let sandbox = SandboxId::parse(&env(SANDBOX).unwrap()).unwrap();
    let process = ProcessId::parse(&env(PROCESS).unwrap()).unwrap();
    db.records()
        .insert_process(&process_record(process, sandbox))
        .await
        .unwrap();
    let logs = db.logs();
    let mut writer = ChunkWriter::open(&logs, sandbox, process).await.unwrap();
    writer.append(ChunkType::Stdout, None).await.unwrap();
    drop(writer);
    println!();
    println!("dropped");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_dropped_unclosed_in_a_running_process_is_gone_for_other_processes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dropped.db");
    let db = open(&path);
    let (sandbox, process) = (SandboxId::new(), ProcessId::new());
    db.records()
        .insert_sandbox(&sandbox_record(sandbox))
        .await
        .unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_dropper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "dropper")
        .env(DB, &path)
        .env(SANDBOX, sandbox.to_string())
        .env(PROCESS, process.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.trim() == "dropped" {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(LIMIT).expect("the child drops its writer");

    // The child still runs; its release reaches the database shortly after the drop.
    let logs = db.logs();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let status = logs.status(&process).await.unwrap().unwrap();
        if status.writer == WriterLiveness::Gone {
            break;
        }
        assert_eq!(status.writer, WriterLiveness::Alive);
        assert!(
            std::time::Instant::now() < deadline,
            "the release was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child is still running"
    );
    logs.abandon(&process, "writer_lost").await.unwrap();
    drop(child.stdin.take()); // let the child end
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_os_processes_append_to_one_file_concurrently_and_nothing_is_lost() {
    const N: u64 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let db = open(&path);
    let sandbox = SandboxId::new();
    db.records()
        .insert_sandbox(&sandbox_record(sandbox))
        .await
        .unwrap();
    let (a, b) = (ProcessId::new(), ProcessId::new());
    let mut children = [
        spawn_child("child_writer", "writer", &path, sandbox, a, N),
        spawn_child("child_writer", "writer", &path, sandbox, b, N),
    ];
    let receivers: Vec<_> = children.iter_mut().map(acks).collect();

    // Follow A from this third process while both write: polling across processes.
    let logs = db.logs();
    let follower = {
        let logs = logs.clone();
        tokio::spawn(async move {
            // The log appears once the child opened its writer.
            let started = std::time::Instant::now();
            let stream = loop {
                match logs.follow(&a, ReadFrom::START).await {
                    Ok(s) => break s,
                    Err(e) if e.is_not_found() && started.elapsed() < LIMIT => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            tokio::time::timeout(LIMIT, stream.map(|e| e.unwrap().seq).collect::<Vec<_>>())
                .await
                .expect("the follow ends when the child closes the log")
        })
    };

    for (child, rx) in children.iter_mut().zip(&receivers) {
        let mut count = 0;
        while let Ok(_seq) = rx.recv_timeout(LIMIT) {
            count += 1;
        }
        assert_eq!(count, N, "the child acknowledged every chunk");
        assert!(child.wait().unwrap().success(), "the child completed");
    }
    for id in [a, b] {
        let page = logs.read(&id, ReadFrom::START, usize::MAX).await.unwrap();
        assert_eq!(page.status.state, LogState::Closed);
        assert_eq!(page.entries.len() as u64, N);
        for (i, e) in page.entries.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1);
            assert_eq!(e.chunk().unwrap().text(), Some(text_of(e.seq).as_str()));
        }
    }
    assert_eq!(follower.await.unwrap(), (1..=N).collect::<Vec<_>>());
}

/// Child role `opener`: announces itself (`<db>.ready.<pid>`), waits for `<db>.go` so that all
/// openers start together, opens the database, then exits 0 (or panics with the error).
#[test]
fn child_opener() {
    if std::env::var(ROLE).as_deref() != Ok("opener") {
        return;
    }
    let path = std::env::var(DB).unwrap();
    std::fs::write(format!("{path}.ready.{}", std::process::id()), b"").unwrap();
    let go = format!("{path}.go");
    let deadline = std::time::Instant::now() + LIMIT;
    while !Path::new(&go).exists() {
        assert!(std::time::Instant::now() < deadline, "never told to go");
        std::hint::spin_loop();
    }
    if let Err(e) = SqliteDatabase::open(&SqliteConfig::file(Path::new(&path))) {
        panic!("open failed: {e} ({})", e.code());
    }
}

#[test]
fn processes_opening_a_new_database_at_once_all_succeed() {
    const OPENERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    for round in 0..10 {
        let path = dir.path().join(format!("new-{round}.db"));
        let children: Vec<Child> = (0..OPENERS)
            .map(|_| {
                Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "child_opener", "--nocapture"])
                    .env(ROLE, "opener")
                    .env(DB, &path)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let ready = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(&format!("new-{round}.db.ready."))
                })
                .count()
        };
        let deadline = std::time::Instant::now() + LIMIT;
        while ready(dir.path()) < OPENERS {
            assert!(
                std::time::Instant::now() < deadline,
                "openers never got ready"
            );
            std::thread::yield_now();
        }
        std::fs::write(format!("{}.go", path.display()), b"").unwrap();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: a concurrent first open failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // And the result is a sandbox database, usable by a later open.
        open(&path);
    }
}
