//! Background checkpoints of the write-ahead log.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold, so one
//! writer in a thousand pays for copying the log into the database and two fsyncs. Here a
//! thread per open file database does that work instead: a `PASSIVE` checkpoint (never blocks
//! writers) after every few MiB written or a second of quiet, and a `RESTART` checkpoint once
//! the log is large, so that the next writer starts the log over and it stays bounded.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use crate::config::SqliteConfig;

/// Bytes committed before a checkpoint is asked for.
const TRIGGER_BYTES: u64 = 32 << 20;
/// Log size (in pages) past which the checkpoint also restarts the log.
const RESTART_PAGES: i64 = 16 * 1024;
/// A quiet database is checkpointed after this long.
const IDLE: Duration = Duration::from_secs(1);

/// Handle of the checkpoint thread; the thread ends (after a last checkpoint) when this is
/// dropped.
pub(crate) struct Checkpointer {
    pending: Arc<AtomicU64>,
    signal: SyncSender<()>,
}

impl Checkpointer {
    /// Starts the thread; `None` (automatic checkpoints stay off, the log grows until the
    /// next open) only when no thread can be started.
    pub(crate) fn start(path: &Path, config: &SqliteConfig, label: &str) -> Option<Self> {
        let (signal, rx) = mpsc::sync_channel(1);
        let pending = Arc::new(AtomicU64::new(0));
        let (path, config, counter) = (path.to_path_buf(), config.clone(), pending.clone());
        let spawned = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let conn = match crate::db::open_file(&path, &config) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = ?e, "no checkpointer");
                        return;
                    }
                };
                loop {
                    match rx.recv_timeout(IDLE) {
                        Ok(()) => {}
                        Err(RecvTimeoutError::Timeout) if counter.load(Ordering::Relaxed) == 0 => {
                            continue
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {
                            checkpoint(&conn, "PASSIVE");
                            return;
                        }
                    }
                    counter.store(0, Ordering::Relaxed);
                    if let Some(log_pages) = checkpoint(&conn, "PASSIVE") {
                        if log_pages >= RESTART_PAGES {
                            checkpoint(&conn, "RESTART");
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Checkpointer { pending, signal }),
            Err(e) => {
                tracing::warn!(location = label, error = %e, "cannot start the checkpointer");
                None
            }
        }
    }

    /// Counts committed bytes and wakes the thread past the trigger.
    pub(crate) fn wrote(&self, bytes: u64) {
        let before = self.pending.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes >= TRIGGER_BYTES {
            match self.signal.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {}
            }
        }
    }
}

/// Runs `PRAGMA wal_checkpoint(mode)`; the log's size in pages, or `None` when it failed
/// (busy: the next round tries again).
fn checkpoint(conn: &Connection, mode: &str) -> Option<i64> {
    let sql = format!("PRAGMA wal_checkpoint({mode})");
    match conn.query_row(&sql, [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))) {
        Ok((_busy, log_pages)) => Some(log_pages),
        Err(e) => {
            tracing::debug!(mode, error = %e, "checkpoint skipped");
            None
        }
    }
}
