//! Durable record store and process-log sink on SQLite: the embedded default store of the
//! sandbox service.
//!
//! One SQLite file holds every sandbox and process record ([`SqliteStore`], a
//! [`RecordStore`]) and the index of every process's output log ([`SqliteSink`], a
//! [`StreamSink`]); the log bytes themselves live in one append-only segment file per log in a
//! directory next to it (see "Files and schema"). A
//! caller that crashes and restarts opens the same file and finds every sandbox and process,
//! reads their output from any `seq` or byte offset, and — through
//! [`SandboxService::reconcile`](sandbox_core::SandboxService::reconcile) — learns which
//! processes were lost because their writer died. SQLite is bundled (no system library).
//!
//! # Capabilities
//!
//! | | |
//! |---|---|
//! | records | insert, partial patch, get, list with filters and ordering |
//! | logs | single writer per process (in this or any OS process), read from `seq` or byte offset, live `follow` |
//! | durability | each acknowledged append survives `kill -9` of the writer; `flush`/`close` survive power loss |
//! | crash detection | writer liveness by pid + pid start time + boot id (Linux); see below |
//! | concurrency | many tasks and several OS processes on one file; `SQLITE_BUSY` never reaches a caller |
//! | memory | logs are not held in memory: reads and `follow` page through the index and segment files (`follow` at most 256 entries or 1 MiB at a time) |
//!
//! # Store URLs
//!
//! Registered as store scheme `sqlite` ([`SQLITE`]); select it with `SANDBOX_STORE` or an
//! explicit URL. See [`SqliteConfig::from_url`].
//!
//! | URL | database |
//! |---|---|
//! | `sqlite:` | `<data dir>/ekairos-sandbox/sandbox.db` (the default store of the service) |
//! | `sqlite:///abs/path.db` | `/abs/path.db` |
//! | `sqlite:relative/path.db` | relative to the working directory |
//! | `sqlite::memory:` | a private in-memory database (tests) |
//!
//! # Environment
//!
//! | variable | effect |
//! |---|---|
//! | `SANDBOX_STORE` | store URL, read by `sandbox_core::registry::store_url` |
//! | `XDG_DATA_HOME`, `HOME` | where the default file lives (`dirs::data_dir()`) |
//!
//! # Files and schema
//!
//! A missing database file is created with mode 0600 (its `-wal` and `-shm` files get the same
//! mode from SQLite), and a missing parent directory with mode 0700. Log bytes live next to
//! it:
//!
//! ```text
//! /path/sandbox.db            records and the log index (SQLite)
//! /path/sandbox.db-wal, -shm  SQLite's write-ahead log and shared memory
//! /path/sandbox.db.logs/      segment directory, mode 0700
//!     <logId>.ndjson          one log's NDJSON lines, back to back, mode 0600
//! ```
//!
//! A segment file holds exactly the bytes of its log (the concatenation a reader reassembles),
//! written once; SQLite holds one small index row per line (its offset and length in the
//! file). Only in-memory databases (`sqlite::memory:`) keep lines in SQLite, in the index
//! rows. The database runs in WAL
//! mode with `synchronous = NORMAL` and a busy timeout. The schema is versioned with
//! `PRAGMA user_version` and migrated on open ([`SCHEMA_VERSION`]); the file is tagged with
//! `PRAGMA application_id` [`APPLICATION_ID`]. A file that is not a SQLite database, a
//! database of another application, or one with a newer schema is refused with a clear
//! [`Error::InvalidInput`](sandbox_core::Error::InvalidInput) (`sandbox_store_not_a_database`,
//! `sandbox_store_not_a_sandbox_database`, `sandbox_store_schema_too_new`) and never written.
//!
//! Tables and columns carry the attribute names of the TypeScript package's InstantDB schema,
//! so a record moves to the InstantDB store without translation:
//!
//! - `sandbox_sandboxes` (`id`, `status`, `provider`, `externalSandboxId`, `sandboxUrl`,
//!   `timeout`, `runtime`, `vcpus`, `ports` JSON, `purpose`, `params` JSON, `createdAt`,
//!   `updatedAt`, `shutdownAt`, `sandboxUserId`);
//! - `sandbox_processes` (`id`, `sandboxId` — the link to its sandbox —, `kind`, `mode`,
//!   `status`, `provider`, `command`, `args` JSON, `cwd`, `env` JSON, `exitCode`, `signal`,
//!   `externalProcessId`, `streamId`, `streamClientId`, `streamStartedAt`, `streamFinishedAt`,
//!   `streamAbortReason`, `startedAt`, `updatedAt`, `exitedAt`, `metadata` JSON);
//! - `sandbox_process_logs`: one row per log (`logId`, `processId`, `streamId`, `state`
//!   open/closed/aborted, `abortReason`, times, and the writer's identity);
//! - `sandbox_process_chunks`: one index row per chunk (`logId`, `seq`, `byteOffset`,
//!   `byteLength`, `at`, `type`; `line`, the NDJSON line, only in in-memory databases), keyed
//!   by (`logId`, `seq`). The line is the byte range
//!   [`byteOffset`, `byteOffset + byteLength`) of `<database>.logs/<logId>.ndjson`. A log's
//!   entry count and size are those of its last chunk, so an append writes no counter row.
//!
//! # Durability
//!
//! Every [`LogAppender::append`](sandbox_core::LogAppender::append) first writes its lines to
//! the log's segment file, at the log's indexed end (a positional write), then commits their
//! index rows in one transaction before it returns: a chunk is acknowledged, and visible to
//! readers, once its index row is committed. Both the write and a commit in WAL mode with
//! `synchronous = NORMAL` are in the operating system's page cache when they return, so an
//! acknowledged chunk survives `kill -9` (or any crash) of the writing process. A writer that
//! dies between the two leaves bytes past the indexed end of its segment: readers read the
//! byte ranges of indexed rows only, so such a torn tail is never read (and a later append at
//! that offset would overwrite it). An acknowledged chunk can be lost only if the machine
//! itself crashes or loses power before the next `flush`. `flush`, `close` and `abort` fsync
//! the segment file and then commit with `synchronous = FULL`, which fsyncs the write-ahead
//! log and so every earlier commit: after they return the log survives power loss too.
//!
//! Known limit: between flushes, a power loss can leave an index row durable (a checkpoint or
//! another log's `flush` synced the write-ahead log) whose segment bytes were not yet on disk.
//! Reading such a chunk fails with a store error naming the segment instead of returning it,
//! and `reconcile` marks its process `lost`; chunks before it read normally. Process crashes
//! (`kill -9`) are not affected.
//!
//! Chunk bytes are written once (to the segment); the write-ahead log and the database see
//! only index rows of a few dozen bytes. Copying the write-ahead log into the database (a
//! checkpoint, with its fsyncs) is kept out of the writers' commits: SQLite's automatic
//! checkpoint is off and a background thread per open file runs a `PASSIVE` checkpoint after
//! about 32 MiB of log writes or a second of quiet, and a `RESTART` checkpoint once the log
//! passes 64 MiB, so the `-wal` file stays bounded (`journal_size_limit` 64 MiB).
//!
//! # Backups
//!
//! A backup must copy the database **and** its `.logs` directory; a database without its
//! segments still opens, but reading a log whose segment is missing fails with a store error
//! naming the file. For a consistent copy while writers run: copy the database first (with
//! SQLite's online backup API or `VACUUM INTO`, which give a consistent snapshot), then the
//! `.logs` directory. Bytes below a log's indexed end are never rewritten, so
//! segments copied after the database hold everything its index refers to (anything more is
//! past the index and ignored).
//!
//! # Writer liveness
//!
//! A log has exactly one writer, once: [`StreamSink::open_writer`] inserts the log's row in a
//! `BEGIN IMMEDIATE` transaction, so a second writer — in this OS process or another one
//! sharing the file — gets `Conflict` (`sandbox_process_stream_writer_exists`).
//!
//! The row records who holds the writer: the OS process id, that pid's start time
//! (`/proc/<pid>/stat` field 22, in clock ticks since boot), the kernel boot id
//! (`/proc/sys/kernel/random/boot_id`), the pid namespace (`/proc/self/ns/pid`) and a random
//! token naming the writer object. [`LogStatus::writer`](sandbox_core::LogStatus::writer) of an
//! open log is judged from it:
//!
//! - recorded by this very OS process: `Alive` while the writer object (token) exists here,
//!   `Gone` once it was dropped without `close`;
//! - released: a writer object dropped without `close` also records its release
//!   (`writerReleasedAt`, best effort), so other OS processes see `Gone` while its process
//!   keeps running;
//! - another boot id: `Gone` (the machine rebooted; pids started over);
//! - another pid namespace (a container sharing the file): `Unknown`, never judged dead;
//! - otherwise `Alive` when the pid runs with the same start time and is not a zombie, else
//!   `Gone` (the process died, or its pid was reused by another process).
//!
//! No heartbeat is needed, so a writer that is merely slow is never declared dead, and a dead
//! one is recognised at once. On Unix systems without `/proc` the pid is probed with
//! `kill(pid, 0)` (no start time, so a reused pid reads as alive: `lost` is delayed, never
//! wrongly set); elsewhere liveness is `Unknown`. [`StreamSink::abandon`] refuses
//! (`sandbox_process_stream_writer_alive`) unless the writer is `Gone`; `reconcile` leaves the
//! processes of live or unknown writers alone and marks the others `lost` (`writer_lost`).
//!
//! # Following
//!
//! [`StreamSink::follow`] pages through the log and then waits: appends by writers in the same
//! OS process wake followers at once (a `tokio::sync::watch` per log, shared by every handle on
//! the same file); appends from other OS processes are found by polling with backoff (5 ms
//! doubling to 250 ms). The stream ends when the log is closed or aborted.
//!
//! # Concurrency
//!
//! SQLite calls run on tokio's blocking pool, at most 8 at once per database, each on a pooled
//! connection; log appends on a multi-thread runtime run in place (`block_in_place`), which
//! spares a hand-off between threads and a copy of the lines on every append. Writes take the write lock up front (`BEGIN IMMEDIATE`); a busy database is
//! waited for (busy timeout, 5 s) and the operation retried with backoff until
//! [`SqliteConfig::busy_deadline`] (60 s), after which it fails with a retryable
//! [`Error::Store`](sandbox_core::Error::Store). Nothing is half-written: every operation is
//! one transaction.
//!
//! # Benchmarks
//!
//! `cargo bench -p sandbox-sqlite --bench ingest` (64 KiB and 100-byte chunks against a plain
//! file, in the same run: the same pre-encoded NDJSON lines appended one by one on both sides,
//! and, separately, raw output through `ChunkWriter`, which adds JSON encoding) and `cargo bench -p sandbox-sqlite --bench end_to_end` (a `local`
//! sandbox command printing 256 MiB, recorded through the service, against the same command
//! writing to a plain file; with peak memory).
//!
//! # Example
//!
//! ```
//! use sandbox_core::{ChunkType, ChunkWriter, ProcessId, ReadFrom, SandboxId, StreamSink};
//! use sandbox_sqlite::{SqliteConfig, SqliteDatabase};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sandbox_core::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let db = SqliteDatabase::open(&SqliteConfig::file(dir.path().join("sandbox.db")))?;
//! let logs = db.logs();
//!
//! let (sandbox, process) = (SandboxId::new(), ProcessId::new());
//! let mut writer = ChunkWriter::open(&logs, sandbox, process).await?;
//! writer.append(ChunkType::Stdout, Some(sandbox_core::protocol::output_data(b"hello\n"))).await?;
//! writer.close().await?;
//!
//! let page = logs.read(&process, ReadFrom::START, 100).await?;
//! assert_eq!(page.entries[0].chunk()?.text(), Some("hello\n"));
//!
//! // Or through the registry, as the service does:
//! let url = format!("sqlite://{}", dir.path().join("sandbox.db").display());
//! let backend = sandbox_core::registry::open_store(&url, &sandbox_core::Env::process())?;
//! assert!(backend.logs.status(&process).await?.is_some());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod checkpoint;
pub mod config;
mod db;
mod error;
mod liveness;
mod logs;
pub mod schema;
mod segment;
mod store;

use std::path::PathBuf;
use std::sync::Arc;

use sandbox_core::{Env, RecordStore, Result, StoreBackend, StreamSink};

pub use config::{Location, SqliteConfig};
pub use logs::SqliteSink;
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};
pub use store::SqliteStore;

/// Store name and URL scheme.
pub const SQLITE: &str = "sqlite";

/// An open SQLite database: hands out the record store and the stream sink on it.
#[derive(Debug, Clone)]
pub struct SqliteDatabase {
    db: Arc<db::Db>,
    path: Option<PathBuf>,
}

impl SqliteDatabase {
    /// Opens the database, creating the file (mode 0600) and migrating the schema as needed.
    /// Blocks while it does; call it before serving, or from `spawn_blocking`.
    ///
    /// # Errors
    /// `sandbox_store_not_a_database`, `sandbox_store_not_a_sandbox_database` or
    /// `sandbox_store_schema_too_new` for a file this code must not touch (it is left as it
    /// was); a store error when the file cannot be created or opened.
    pub fn open(config: &SqliteConfig) -> Result<Self> {
        Ok(SqliteDatabase {
            db: db::Db::open(config)?,
            path: config.path().map(PathBuf::from),
        })
    }

    /// The record store.
    pub fn records(&self) -> SqliteStore {
        SqliteStore {
            db: self.db.clone(),
        }
    }

    /// The stream sink.
    pub fn logs(&self) -> SqliteSink {
        SqliteSink {
            db: self.db.clone(),
        }
    }

    /// The database file, or `None` for an in-memory database.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// Records and logs as a [`StoreBackend`] for the service; `location` is the file path.
    pub fn backend(&self) -> StoreBackend {
        let records: Arc<dyn RecordStore> = Arc::new(self.records());
        let logs: Arc<dyn StreamSink> = Arc::new(self.logs());
        StoreBackend {
            records,
            logs,
            location: self.db.label().to_string(),
        }
    }
}

/// Opens the store of a `sqlite:` URL: the constructor registered for scheme `sqlite`.
///
/// # Errors
/// See [`SqliteConfig::from_url`] and [`SqliteDatabase::open`].
pub fn open(url: &str, _env: &Env) -> Result<StoreBackend> {
    Ok(SqliteDatabase::open(&SqliteConfig::from_url(url)?)?.backend())
}

sandbox_core::register_store!(SQLITE, open);
