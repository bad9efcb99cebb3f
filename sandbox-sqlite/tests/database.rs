//! The database file: creation, refusal of files it must not touch, migrations, locking.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use futures::StreamExt;
use sandbox_core::{
    now_ms, ChunkType, ChunkWriter, LogState, ProcessId, ReadFrom, RecordStore, SandboxId,
    SandboxRecord, SandboxStatus, StreamSink, WriterLiveness,
};
use sandbox_sqlite::{SqliteConfig, SqliteDatabase, APPLICATION_ID, SCHEMA_VERSION};

fn sandbox(created_at: i64) -> SandboxRecord {
    SandboxRecord {
        id: SandboxId::new(),
        status: SandboxStatus::Active,
        provider: "local".into(),
        external_sandbox_id: None,
        sandbox_url: None,
        timeout: None,
        runtime: None,
        vcpus: None,
        ports: Some(vec![3000]),
        purpose: None,
        params: Some(serde_json::json!({"local": {"root": "/tmp/x"}})),
        created_at,
        updated_at: None,
        shutdown_at: None,
        sandbox_user_id: None,
    }
}

fn open(path: &Path) -> sandbox_core::Result<SqliteDatabase> {
    SqliteDatabase::open(&SqliteConfig::file(path))
}

fn snapshot(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    let meta = std::fs::metadata(path).unwrap();
    (std::fs::read(path).unwrap(), meta.modified().unwrap())
}

#[cfg(unix)]
#[test]
fn a_new_database_file_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/sandbox.db");
    let db = open(&path).unwrap();
    assert_eq!(db.path(), Some(path.as_path()));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "database mode {mode:o}");
    let wal = path.with_extension("db-wal");
    if wal.exists() {
        let mode = std::fs::metadata(&wal).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "WAL mode {mode:o}");
    }
    let parent = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(parent, 0o700, "created directory mode {parent:o}");
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    std::fs::write(&path, b"these are my notes, not a database\n".repeat(200)).unwrap();
    let before = snapshot(&path);
    let e = open(&path).unwrap_err();
    assert_eq!(e.code(), "sandbox_store_not_a_database");
    assert!(e.to_string().contains("notes.db"), "{e}");
    assert_eq!(snapshot(&path), before);
    assert!(!path.with_extension("db-wal").exists());
}

#[test]
fn a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        open(dir.path()).unwrap_err().code(),
        "sandbox_store_not_a_database"
    );
}

#[test]
fn a_newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "CREATE TABLE sandbox_sandboxes (id TEXT); PRAGMA application_id = {APPLICATION_ID}; \
             PRAGMA user_version = {};",
            SCHEMA_VERSION + 1
        ))
        .unwrap();
    }
    let before = snapshot(&path);
    let e = open(&path).unwrap_err();
    assert_eq!(e.code(), "sandbox_store_schema_too_new");
    assert!(
        e.to_string()
            .contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
        "{e}"
    );
    assert_eq!(snapshot(&path), before);
    assert!(!path.with_extension("db-wal").exists());
}

#[test]
fn another_applications_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("browser.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE bookmarks (url TEXT); INSERT INTO bookmarks VALUES ('x');")
            .unwrap();
    }
    let before = snapshot(&path);
    let e = open(&path).unwrap_err();
    assert_eq!(e.code(), "sandbox_store_not_a_sandbox_database");
    assert_eq!(snapshot(&path), before);
}

#[test]
fn a_versioned_database_without_the_sandbox_application_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("versioned.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE notes (t TEXT); PRAGMA user_version = 1;")
            .unwrap();
    }
    let before = snapshot(&path);
    let e = open(&path).unwrap_err();
    assert_eq!(e.code(), "sandbox_store_not_a_sandbox_database");
    assert_eq!(snapshot(&path), before);
}

#[tokio::test]
async fn records_and_logs_survive_reopening_and_the_schema_is_current() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.db");
    let record = sandbox(now_ms());
    let pid = ProcessId::new();
    {
        let db = open(&path).unwrap();
        db.records().insert_sandbox(&record).await.unwrap();
        let logs = db.logs();
        let mut w = ChunkWriter::open(&logs, record.id, pid).await.unwrap();
        w.append(ChunkType::Stdout, None).await.unwrap();
        w.close().await.unwrap();
    }
    let db = open(&path).unwrap();
    assert_eq!(
        db.records().get_sandbox(&record.id).await.unwrap(),
        Some(record)
    );
    let status = db.logs().status(&pid).await.unwrap().unwrap();
    assert_eq!((status.state, status.entries), (LogState::Closed, 1));
    let c = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!((version, mode.as_str()), (SCHEMA_VERSION, "wal"));
    // Records keep the upstream attribute names as columns.
    let cols: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('sandbox_sandboxes')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for want in [
        "externalSandboxId",
        "createdAt",
        "params",
        "ports",
        "sandboxUserId",
    ] {
        assert!(cols.iter().any(|c| c == want), "{want} in {cols:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_longer_than_the_busy_timeout_is_waited_for_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let config = SqliteConfig {
        busy_timeout: Duration::from_millis(1),
        ..SqliteConfig::file(&path)
    };
    let db = SqliteDatabase::open(&config).unwrap();
    let (locked_tx, locked_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn({
        let path = path.clone();
        move || {
            let mut c = rusqlite::Connection::open(&path).unwrap();
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
                .unwrap();
            locked_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            tx.commit().unwrap();
        }
    });
    locked_rx.recv().unwrap();
    let records = db.records();
    let record = sandbox(1);
    let insert = tokio::spawn({
        let record = record.clone();
        async move { records.insert_sandbox(&record).await }
    });
    // Well past the 1 ms busy timeout: the insert keeps waiting rather than failing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !insert.is_finished(),
        "the insert cannot finish while the lock is held"
    );
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    insert.await.unwrap().unwrap();
    assert_eq!(
        db.records().get_sandbox(&record.id).await.unwrap(),
        Some(record)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_past_the_busy_deadline_is_a_retryable_store_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deadline.db");
    let config = SqliteConfig {
        busy_timeout: Duration::from_millis(1),
        busy_deadline: Duration::from_millis(50),
        ..SqliteConfig::file(&path)
    };
    let db = SqliteDatabase::open(&config).unwrap();
    let mut c = rusqlite::Connection::open(&path).unwrap();
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    let record = sandbox(1);
    let e = db.records().insert_sandbox(&record).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert_eq!(e.code(), "store_error");
    assert!(e.to_string().contains("deadline.db"), "{e}");
    tx.rollback().unwrap();
    assert_eq!(db.records().get_sandbox(&record.id).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_write_logs_of_different_processes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("many.db")).unwrap();
    let logs: Arc<dyn StreamSink> = Arc::new(db.logs());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let logs = logs.clone();
        tasks.push(tokio::spawn(async move {
            let pid = ProcessId::new();
            let mut w = ChunkWriter::open(logs.as_ref(), SandboxId::new(), pid)
                .await
                .unwrap();
            for i in 0..200 {
                let data = sandbox_core::protocol::output_data(format!("{i}\n").as_bytes());
                w.append(ChunkType::Stdout, Some(data)).await.unwrap();
            }
            w.close().await.unwrap();
            pid
        }));
    }
    for t in tasks {
        let pid = t.await.unwrap();
        let page = logs.read(&pid, ReadFrom::START, usize::MAX).await.unwrap();
        assert_eq!(page.entries.len(), 200);
        assert_eq!(page.status.state, LogState::Closed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_on_one_file_share_writer_exclusivity_liveness_and_live_follow() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.db");
    let (one, two) = (open(&path).unwrap(), open(&path).unwrap());
    let pid = ProcessId::new();
    let sink = one.logs();
    let mut w = ChunkWriter::open(&sink, SandboxId::new(), pid)
        .await
        .unwrap();
    let other = two.logs();
    assert_eq!(
        other.open_writer(&pid).await.err().unwrap().code(),
        "sandbox_process_stream_writer_exists"
    );
    assert_eq!(
        other.status(&pid).await.unwrap().unwrap().writer,
        WriterLiveness::Alive
    );
    let follow = other.follow(&pid, ReadFrom::START).await.unwrap();
    let follower = tokio::spawn(follow.map(|e| e.unwrap().seq).collect::<Vec<_>>());
    for _ in 0..50 {
        w.append(ChunkType::Stdout, None).await.unwrap();
    }
    drop(w); // without close
    assert_eq!(
        other.status(&pid).await.unwrap().unwrap().writer,
        WriterLiveness::Gone
    );
    other.abandon(&pid, "writer_lost").await.unwrap();
    let seqs = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("the follow ends once the log is abandoned")
        .unwrap();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
}

#[tokio::test]
async fn reads_from_a_byte_offset_start_at_the_first_entry_at_or_after_it() {
    let db = SqliteDatabase::open(&SqliteConfig::memory()).unwrap();
    let logs = db.logs();
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(&logs, SandboxId::new(), pid)
        .await
        .unwrap();
    for _ in 0..5 {
        w.append(ChunkType::Heartbeat, None).await.unwrap();
    }
    w.close().await.unwrap();
    let all = logs.read(&pid, ReadFrom::START, 100).await.unwrap().entries;
    let third = &all[2];
    let at = logs
        .read(&pid, ReadFrom::Offset(third.offset), 100)
        .await
        .unwrap()
        .entries;
    assert_eq!(at.first().map(|e| e.seq), Some(3));
    let inside = logs
        .read(&pid, ReadFrom::Offset(third.offset + 1), 100)
        .await
        .unwrap()
        .entries;
    assert_eq!(inside.first().map(|e| e.seq), Some(4));
    let past = logs
        .read(&pid, ReadFrom::Offset(all[4].end()), 100)
        .await
        .unwrap();
    assert!(past.entries.is_empty());
    assert_eq!(past.status.bytes, all[4].end());
    let two = logs.read(&pid, ReadFrom::Seq(2), 2).await.unwrap().entries;
    assert_eq!(two.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
}
