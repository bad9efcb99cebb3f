//! The segment files of a file database: each log's lines are written once, to
//! `<database>.logs/<logId>.ndjson`, and SQLite holds only their index.

use std::io::Write;
use std::path::{Path, PathBuf};

use sandbox_core::protocol::output_data;
use sandbox_core::{ChunkType, ChunkWriter, Error, ProcessId, ReadFrom, SandboxId, StreamSink};
use sandbox_sqlite::{SqliteConfig, SqliteDatabase};

fn open(path: &Path) -> SqliteDatabase {
    SqliteDatabase::open(&SqliteConfig::file(path)).unwrap()
}

/// The only segment file of the database at `db`.
fn only_segment(db: &Path) -> PathBuf {
    let dir = PathBuf::from(format!("{}.logs", db.display()));
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

async fn write_log(db: &SqliteDatabase, process: ProcessId, texts: &[&str]) -> ChunkWriter {
    let logs = db.logs();
    let mut w = ChunkWriter::open(&logs, SandboxId::new(), process)
        .await
        .unwrap();
    for t in texts {
        w.append(ChunkType::Stdout, Some(output_data(t.as_bytes())))
            .await
            .unwrap();
    }
    w
}

/// A file database in a temporary directory holding one closed log of `texts`.
struct ClosedLog {
    _dir: tempfile::TempDir,
    path: PathBuf,
    db: SqliteDatabase,
    process: ProcessId,
    segment: PathBuf,
}

async fn closed_log(texts: &[&str]) -> ClosedLog {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.db");
    let db = open(&path);
    let process = ProcessId::new();
    write_log(&db, process, texts).await.close().await.unwrap();
    let segment = only_segment(&path);
    ClosedLog {
        _dir: dir,
        path,
        db,
        process,
        segment,
    }
}

fn texts(page: &sandbox_core::LogPage) -> Vec<String> {
    page.entries
        .iter()
        .map(|e| e.chunk().unwrap().text().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn lines_are_stored_once_in_the_segment_and_sqlite_holds_only_their_index() {
    let ClosedLog {
        _dir,
        path,
        db,
        process,
        segment,
    } = closed_log(&["one\n", "two\n", "three\n"]).await;
    assert_eq!(segment.file_name().unwrap(), "1.ndjson");
    let page = db
        .logs()
        .read(&process, ReadFrom::START, 100)
        .await
        .unwrap();
    let joined: String = page.entries.iter().map(|e| e.line.as_str()).collect();
    assert_eq!(std::fs::read_to_string(&segment).unwrap(), joined);
    assert_eq!(page.status.bytes, joined.len() as u64);

    let c = rusqlite::Connection::open(&path).unwrap();
    let (rows, with_text, bytes): (i64, i64, i64) = c
        .query_row(
            "SELECT count(*), count(line), sum(byteLength) FROM sandbox_process_chunks",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((rows, with_text, bytes), (3, 0, joined.len() as i64));
}

#[cfg(unix)]
#[tokio::test]
async fn segment_files_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.db");
    let db = open(&path);
    let w = write_log(&db, ProcessId::new(), &["private\n"]).await;
    w.close().await.unwrap();
    let segment = only_segment(&path);
    let mode = std::fs::metadata(&segment).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "segment mode {mode:o}");
    let dir_mode = std::fs::metadata(segment.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "segment directory mode {dir_mode:o}");
}

#[tokio::test]
async fn a_torn_tail_past_the_index_is_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.db");
    let process = ProcessId::new();
    {
        let db = open(&path);
        let w = write_log(&db, process, &["a\n", "b\n"]).await;
        // A writer that died between writing its line and committing the index leaves bytes
        // past the indexed end: here, half a line.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(only_segment(&path))
            .unwrap();
        file.write_all(br#"{"version":1,"at":"2026-01-01T00:00:00.000Z","seq":3,"#)
            .unwrap();
        drop(w);
    }
    let db = open(&path);
    let logs = db.logs();
    let page = logs.read(&process, ReadFrom::START, 100).await.unwrap();
    assert_eq!(texts(&page), ["a\n", "b\n"]);
    let end = page.entries[1].end();
    assert_eq!(page.status.entries, 2);
    assert_eq!(page.status.bytes, end);
    assert!(std::fs::metadata(only_segment(&path)).unwrap().len() > end);
    // Nothing is found at or past the indexed end either.
    let past = logs
        .read(&process, ReadFrom::Offset(end), 100)
        .await
        .unwrap();
    assert!(past.entries.is_empty());
    let past = logs.read(&process, ReadFrom::Seq(3), 100).await.unwrap();
    assert!(past.entries.is_empty());
}

#[tokio::test]
async fn the_next_append_overwrites_bytes_left_past_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.db");
    let db = open(&path);
    let process = ProcessId::new();
    let mut w = write_log(&db, process, &["first\n"]).await;
    // Bytes of an append whose commit failed, longer than the next line.
    let garbage = vec![b'#'; 4096];
    std::fs::OpenOptions::new()
        .append(true)
        .open(only_segment(&path))
        .unwrap()
        .write_all(&garbage)
        .unwrap();
    w.append(ChunkType::Stdout, Some(output_data(b"second\n")))
        .await
        .unwrap();
    w.close().await.unwrap();
    let page = db
        .logs()
        .read(&process, ReadFrom::START, 100)
        .await
        .unwrap();
    assert_eq!(texts(&page), ["first\n", "second\n"]);
    let bytes = std::fs::read(only_segment(&path)).unwrap();
    let second = &page.entries[1];
    assert_eq!(
        &bytes[second.offset as usize..second.end() as usize],
        second.line.as_bytes(),
        "the line was written at the indexed end"
    );
    let followed: Vec<_> = futures::StreamExt::collect::<Vec<_>>(
        db.logs().follow(&process, ReadFrom::START).await.unwrap(),
    )
    .await;
    assert_eq!(followed.len(), 2);
}

fn assert_store_error(e: Error, needles: &[&str]) {
    match &e {
        Error::Store { store, message, .. } => {
            assert_eq!(store, "sqlite");
            for n in needles {
                assert!(message.contains(n), "{n:?} in {message}");
            }
        }
        other => panic!("expected a store error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_segment_file_is_a_clear_store_error() {
    let ClosedLog {
        _dir,
        db,
        process,
        segment,
        ..
    } = closed_log(&["lost\n"]).await;
    std::fs::remove_file(&segment).unwrap();
    let logs = db.logs();
    let e = logs.read(&process, ReadFrom::START, 100).await.unwrap_err();
    assert_store_error(e, &["missing", &segment.display().to_string(), ".logs"]);
    // The index still answers what it knows.
    let status = logs.status(&process).await.unwrap().unwrap();
    assert_eq!(status.entries, 1);
}

#[tokio::test]
async fn a_segment_shorter_than_its_index_is_a_clear_store_error() {
    let ClosedLog {
        _dir,
        db,
        process,
        segment,
        ..
    } = closed_log(&["kept\n", "cut\n"]).await;
    let len = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let logs = db.logs();
    let first = logs.read(&process, ReadFrom::START, 1).await.unwrap();
    assert_eq!(texts(&first), ["kept\n"]);
    let e = logs.read(&process, ReadFrom::START, 100).await.unwrap_err();
    assert_store_error(
        e,
        &["shorter than its index", &segment.display().to_string()],
    );
}

#[tokio::test]
async fn a_zeroed_tail_after_a_power_loss_is_refused_not_returned_as_output() {
    let ClosedLog {
        _dir,
        db,
        process,
        segment,
        ..
    } = closed_log(&["kept\n", "lost\n"]).await;
    // What a file system shows after losing unsynced data: the right length, zeros inside.
    let logs = db.logs();
    let second = logs.read(&process, ReadFrom::Seq(2), 1).await.unwrap();
    let offset = second.entries[0].offset;
    let len = second.entries[0].line.len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; len], offset).unwrap();
    let first = logs.read(&process, ReadFrom::START, 1).await.unwrap();
    assert_eq!(texts(&first), ["kept\n"]);
    let e = logs.read(&process, ReadFrom::START, 100).await.unwrap_err();
    assert_store_error(e, &["seq 2", &segment.display().to_string()]);
}

#[tokio::test]
async fn an_in_memory_database_keeps_lines_without_files() {
    let db = SqliteDatabase::open(&SqliteConfig::memory()).unwrap();
    let process = ProcessId::new();
    let w = write_log(&db, process, &["in memory\n"]).await;
    w.close().await.unwrap();
    let page = db
        .logs()
        .read(&process, ReadFrom::START, 100)
        .await
        .unwrap();
    assert_eq!(texts(&page), ["in memory\n"]);
    let sink: &dyn StreamSink = &db.logs();
    assert_eq!(sink.name(), "sqlite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_out_of_order_is_refused_before_the_segment_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.db");
    let db = open(&path);
    let logs = db.logs();
    let process = ProcessId::new();
    let mut w = logs.open_writer(&process).await.unwrap();
    let first = sandbox_core::LogEntry {
        seq: 1,
        offset: 0,
        line: "{\"first\":1}\n".into(),
    };
    w.append(std::slice::from_ref(&first)).await.unwrap();
    let before = std::fs::read(only_segment(&path)).unwrap();
    // Seq 1 again, at offset 0: it would overwrite the acknowledged line.
    let again = sandbox_core::LogEntry {
        line: "{\"other\":1}\n".into(),
        ..first.clone()
    };
    let e = w.append(&[again]).await.unwrap_err();
    assert_eq!(e.code(), "sandbox_process_stream_gap");
    assert_eq!(std::fs::read(only_segment(&path)).unwrap(), before);
    let next = sandbox_core::LogEntry {
        seq: 2,
        offset: first.end(),
        line: "{\"second\":2}\n".into(),
    };
    w.append(&[next]).await.unwrap();
    w.close().await.unwrap();
    let page = logs.read(&process, ReadFrom::START, 10).await.unwrap();
    let lines: Vec<_> = page.entries.iter().map(|e| e.line.as_str()).collect();
    assert_eq!(lines, ["{\"first\":1}\n", "{\"second\":2}\n"]);
}
