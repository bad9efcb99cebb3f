//! Chunk ingest throughput: process output appended through `ChunkWriter` into the SQLite
//! sink, against writing the same output bytes to a plain file, in the same run.
//!
//! `cargo bench -p sandbox-sqlite --bench ingest` (`INGEST_MIB=<n>` sets the volume of the
//! 64 KiB case, default 256; `INGEST_SMALL=<n>` the number of 100-byte chunks, default 200000).

use std::io::Write;
use std::time::{Duration, Instant};

use sandbox_core::protocol::output_data;
use sandbox_core::{ChunkType, ChunkWriter, ProcessId, SandboxId, StreamSink};
use sandbox_sqlite::{SqliteConfig, SqliteDatabase};

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
    println!(
        "  (write-ahead log at close: {:.1} MiB; database: {:.1} MiB)",
        wal as f64 / 1048576.0,
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0
    );
    drop(db);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    println!(
        "{:<28} {:>10} {:>12} {:>10} {:>8}",
        "case", "MB/s", "chunks/s", "seconds", "ratio"
    );
    for (size, chunks) in [(64 * 1024, big_mib * 16), (100, small)] {
        let base = plain_file(dir.path(), size, chunks);
        let mem = rt.block_on(memory(size, chunks.min((64 << 20) / size as u64)));
        let db = rt.block_on(sqlite(dir.path(), size, chunks));
        let label = if size >= 1024 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        for (name, f) in [
            ("plain file", &base),
            ("encoding only", &mem),
            ("sqlite sink", &db),
        ] {
            println!(
                "{:<28} {:>10.1} {:>12.0} {:>10.3} {:>8.2}",
                format!("{name}, {label} chunks"),
                f.mb_s(),
                f.chunks_s(),
                f.elapsed.as_secs_f64(),
                f.mb_s() / base.mb_s()
            );
        }
    }
    if let Some(rss) = peak_rss_mib() {
        // Includes the memory sink's 64 MiB of kept entries.
        println!("peak RSS of the benchmark process: {rss:.1} MiB");
    }
}
