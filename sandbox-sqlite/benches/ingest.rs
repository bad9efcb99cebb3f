//! Chunk ingest throughput of the SQLite sink against a plain file, in the same run.
//!
//! Two comparisons per chunk size:
//!
//! - **stored lines** (the target): the NDJSON lines of the log are encoded once, before
//!   the clock starts (`ProcessChunk::encode`, consecutive seq and offsets). The plain file
//!   writes each line with one `write_all` and `sync_data()` at the end; the sink gets each
//!   line with one `LogAppender::append(&[entry])` (from `StreamSink::open_writer`) and
//!   `close()` at the end. Both store exactly the same bytes; MB/s counts line bytes.
//! - **through `ChunkWriter`** (includes encoding): raw output bytes appended with
//!   `ChunkWriter`, which encodes each chunk as JSON, against writing the raw output bytes to a
//!   plain file; `encoding only` is the same `ChunkWriter` loop into the in-memory sink. MB/s
//!   counts output bytes.
//!
//! Each case runs `INGEST_ROUNDS` times (default 3), the plain file and the sink alternating,
//! and each row shows its fastest round: on a shared machine, interference from other work
//! hits single rounds of either side, and the best round is the one least disturbed.
//!
//! `cargo bench -p sandbox-sqlite --bench ingest` (`INGEST_MIB=<n>` sets the volume of the
//! 64 KiB case, default 256; `INGEST_SMALL=<n>` the number of 100-byte chunks, default 200000;
//! `INGEST_ROUNDS=<n>` the rounds).

use std::io::Write;
use std::time::{Duration, Instant};

use sandbox_core::protocol::output_data;
use sandbox_core::{
    ChunkType, ChunkWriter, LogEntry, ProcessChunk, ProcessId, SandboxId, StreamSink,
};
use sandbox_sqlite::{SqliteConfig, SqliteDatabase};

#[derive(Clone, Copy)]
struct Figure {
    bytes: u64,
    chunks: u64,
    elapsed: Duration,
}

impl Figure {
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }

    fn chunks_s(&self) -> f64 {
        self.chunks as f64 / self.elapsed.as_secs_f64()
    }
}

/// Printable output, like a build log.
fn payload(size: usize, i: u64) -> Vec<u8> {
    let line = format!("line {i:08} of the benchmark output: the quick brown fox jumps over\n");
    line.as_bytes().iter().copied().cycle().take(size).collect()
}

fn plain_file(dir: &std::path::Path, size: usize, chunks: u64) -> Figure {
    let path = dir.join(format!("plain-{size}.log"));
    let mut file = std::fs::File::create(&path).unwrap();
    let data: Vec<Vec<u8>> = (0..16).map(|i| payload(size, i)).collect();
    let start = Instant::now();
    for i in 0..chunks {
        // One write per chunk, as a recorder that persists each read would.
        file.write_all(&data[(i % 16) as usize]).unwrap();
    }
    file.sync_data().unwrap();
    let elapsed = start.elapsed();
    std::fs::remove_file(&path).unwrap();
    Figure {
        bytes: size as u64 * chunks,
        chunks,
        elapsed,
    }
}

async fn sqlite(dir: &std::path::Path, size: usize, chunks: u64) -> Figure {
    let path = dir.join(format!("ingest-{size}.db"));
    let db = SqliteDatabase::open(&SqliteConfig::file(&path)).unwrap();
    let logs = db.logs();
    let pid = ProcessId::new();
    let data: Vec<Vec<u8>> = (0..16).map(|i| payload(size, i)).collect();
    let start = Instant::now();
    let mut w = ChunkWriter::open(&logs as &dyn StreamSink, SandboxId::new(), pid)
        .await
        .unwrap();
    for i in 0..chunks {
        w.append(
            ChunkType::Stdout,
            Some(output_data(&data[(i % 16) as usize])),
        )
        .await
        .unwrap();
    }
    // Close syncs the write-ahead log, like the plain file's final sync.
    w.close().await.unwrap();
    let elapsed = start.elapsed();
    let wal = std::fs::metadata(format!("{}-wal", path.display()))
        .map(|m| m.len())
        .unwrap_or(0);
    let segments: u64 = std::fs::read_dir(format!("{}.logs", path.display()))
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "  (at close: write-ahead log {:.1} MiB, database {:.1} MiB, segments {:.1} MiB)",
        wal as f64 / 1048576.0,
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0,
        segments as f64 / 1048576.0
    );
    drop(db);
    remove_database(&path);
    Figure {
        bytes: size as u64 * chunks,
        chunks,
        elapsed,
    }
}

/// The same appends into the in-memory sink (dropping entries as they come is not possible
/// there, so this case is capped at 64 MiB): the cost of encoding chunks, without storage.
async fn memory(size: usize, chunks: u64) -> Figure {
    let logs = sandbox_core::MemorySink::new();
    let data: Vec<Vec<u8>> = (0..16).map(|i| payload(size, i)).collect();
    let start = Instant::now();
    let mut w = ChunkWriter::open(&logs as &dyn StreamSink, SandboxId::new(), ProcessId::new())
        .await
        .unwrap();
    for i in 0..chunks {
        w.append(
            ChunkType::Stdout,
            Some(output_data(&data[(i % 16) as usize])),
        )
        .await
        .unwrap();
    }
    w.close().await.unwrap();
    Figure {
        bytes: size as u64 * chunks,
        chunks,
        elapsed: start.elapsed(),
    }
}

/// The log of `chunks` output chunks of `size` bytes, encoded as the core writer would.
fn encoded_log(size: usize, chunks: u64) -> Vec<LogEntry> {
    let (sandbox, process) = (SandboxId::new(), ProcessId::new());
    let data: Vec<Vec<u8>> = (0..16).map(|i| payload(size, i)).collect();
    let mut offset = 0;
    (1..=chunks)
        .map(|seq| {
            let line = ProcessChunk::new(
                seq,
                ChunkType::Stdout,
                sandbox,
                process,
                Some(output_data(&data[(seq % 16) as usize])),
            )
            .encode();
            let entry = LogEntry { seq, offset, line };
            offset = entry.end();
            entry
        })
        .collect()
}

fn line_bytes(log: &[LogEntry]) -> u64 {
    log.iter().map(|e| e.line.len() as u64).sum()
}

/// The lines, one `write_all` each, then `sync_data`.
fn plain_file_lines(dir: &std::path::Path, log: &[LogEntry]) -> Figure {
    let path = dir.join("plain-lines.log");
    let mut file = std::fs::File::create(&path).unwrap();
    let start = Instant::now();
    for e in log {
        file.write_all(e.line.as_bytes()).unwrap();
    }
    file.sync_data().unwrap();
    let elapsed = start.elapsed();
    drop(file);
    std::fs::remove_file(&path).unwrap();
    Figure {
        bytes: line_bytes(log),
        chunks: log.len() as u64,
        elapsed,
    }
}

/// The lines, one `append(&[entry])` each, then `close`.
async fn sqlite_lines(dir: &std::path::Path, log: &[LogEntry]) -> Figure {
    let path = dir.join("lines.db");
    let db = SqliteDatabase::open(&SqliteConfig::file(&path)).unwrap();
    let logs = db.logs();
    let start = Instant::now();
    let mut w = logs.open_writer(&ProcessId::new()).await.unwrap();
    for e in log {
        w.append(std::slice::from_ref(e)).await.unwrap();
    }
    w.close().await.unwrap();
    let elapsed = start.elapsed();
    drop(w);
    drop(db);
    remove_database(&path);
    Figure {
        bytes: line_bytes(log),
        chunks: log.len() as u64,
        elapsed,
    }
}

/// Removes a database file and everything stored next to it.
fn remove_database(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let _ = std::fs::remove_dir_all(format!("{}.logs", path.display()));
}

/// The fastest of several rounds of the same case.
fn best(a: Option<Figure>, b: Figure) -> Option<Figure> {
    match a {
        Some(a) if a.elapsed <= b.elapsed => Some(a),
        _ => Some(b),
    }
}

fn print_row(name: &str, f: &Figure, base: &Figure) {
    println!(
        "{:<44} {:>10.1} {:>12.0} {:>10.3} {:>8.2}",
        name,
        f.mb_s(),
        f.chunks_s(),
        f.elapsed.as_secs_f64(),
        f.mb_s() / base.mb_s()
    );
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this once as a smoke test.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let big_mib = if smoke { 4 } else { env_u64("INGEST_MIB", 256) };
    let small = if smoke {
        2_000
    } else {
        env_u64("INGEST_SMALL", 200_000)
    };
    let rounds = if smoke {
        1
    } else {
        env_u64("INGEST_ROUNDS", 3).max(1)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    println!("best of {rounds} rounds per row; ratio = MB/s / plain file MB/s of the same group");
    println!(
        "{:<44} {:>10} {:>12} {:>10} {:>8}",
        "case", "MB/s", "chunks/s", "seconds", "ratio"
    );
    for (size, chunks) in [(64 * 1024, big_mib * 16), (100, small)] {
        let label = if size >= 1024 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        // The comparison: the same stored bytes on both sides, encoded beforehand.
        let log = encoded_log(size, chunks);
        let (mut base, mut db) = (None, None);
        for _ in 0..rounds {
            base = best(base, plain_file_lines(dir.path(), &log));
            db = best(db, rt.block_on(sqlite_lines(dir.path(), &log)));
        }
        let (base, db) = (base.unwrap(), db.unwrap());
        drop(log);
        println!("{label} chunks, same NDJSON lines on both sides (encoded before timing):");
        print_row("  plain file, write_all per line", &base, &base);
        print_row("  sqlite sink, append per line", &db, &base);

        // Through the core writer: includes JSON encoding on the sink side only.
        println!("{label} chunks, through ChunkWriter (sink side includes encoding):");
        let (mut base, mut mem, mut db) = (None, None, None);
        for _ in 0..rounds {
            base = best(base, plain_file(dir.path(), size, chunks));
            let capped = chunks.min((64 << 20) / size as u64);
            mem = best(mem, rt.block_on(memory(size, capped)));
            db = best(db, rt.block_on(sqlite(dir.path(), size, chunks)));
        }
        let (base, mem, db) = (base.unwrap(), mem.unwrap(), db.unwrap());
        print_row("  plain file, raw output bytes", &base, &base);
        print_row("  encoding only (memory sink)", &mem, &base);
        print_row("  sqlite sink, incl. encoding", &db, &base);
    }
    if let Some(rss) = peak_rss_mib() {
        // Includes the encoded lines of the 64 KiB case and the memory sink's 64 MiB.
        println!("peak RSS of the benchmark process: {rss:.1} MiB");
    }
}
