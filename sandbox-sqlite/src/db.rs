//! Connections and the blocking-work bridge.
//!
//! rusqlite is synchronous: every operation runs on tokio's blocking pool (log appends on a
//! multi-thread runtime run in place instead, with `block_in_place`) with a connection taken
//! from a small per-database pool (file databases open more connections on demand; an
//! in-memory database has exactly one). Writes use `BEGIN IMMEDIATE`, so a transaction never
//! has to upgrade a read lock; a busy database is waited for (busy timeout) and the whole
//! operation is retried with backoff until the busy deadline, so `SQLITE_BUSY` never reaches a
//! caller as such.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use sandbox_core::{Error, Result};

use crate::checkpoint::Checkpointer;
use crate::config::{Location, SqliteConfig};
use crate::error::{self, DbError, DbResult};
use crate::schema;
use crate::segment::Segments;

/// Operations of one database running at once (and so its connections, all kept open): SQLite
/// serialises writers anyway, and a cap keeps a burst of tasks from opening a connection each.
const MAX_CONCURRENT: usize = 8;

/// First 16 bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// An open database: the pool and what it needs to open more connections.
pub(crate) struct Db {
    config: SqliteConfig,
    /// The path for messages (or `:memory:`).
    label: String,
    /// Identifies this database among all open in this OS process (for notifications).
    pub(crate) key: String,
    idle: Mutex<Vec<Connection>>,
    permits: tokio::sync::Semaphore,
    /// The single connection of an in-memory database.
    memory: Option<Mutex<Connection>>,
    /// Background checkpoints of a file database.
    checkpointer: Option<Checkpointer>,
    /// Where a file database keeps its logs' bytes; `None` for an in-memory database, whose
    /// lines stay in its chunk rows.
    pub(crate) segments: Option<Segments>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("location", &self.label).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Db {
    /// Opens (creating with mode 0600 when missing) and migrates the database. Blocking.
    pub(crate) fn open(config: &SqliteConfig) -> Result<Arc<Db>> {
        match &config.location {
            Location::Memory => {
                let label = ":memory:".to_string();
                let mut conn =
                    Connection::open_in_memory().map_err(|e| error::map_sql(e, &label, "open"))?;
                conn.busy_timeout(config.busy_timeout)
                    .map_err(|e| error::map_sql(e, &label, "open"))?;
                configure(&conn, config).map_err(|e| e.into_core(&label, "open"))?;
                schema::migrate(&mut conn, &label).map_err(|e| e.into_core(&label, "migrate"))?;
                Ok(Arc::new(Db {
                    config: config.clone(),
                    key: format!("memory:{}", uuid::Uuid::new_v4()),
                    label,
                    idle: Mutex::new(Vec::new()),
                    permits: tokio::sync::Semaphore::new(MAX_CONCURRENT),
                    memory: Some(Mutex::new(conn)),
                    checkpointer: None,
                    segments: None,
                }))
            }
            Location::File(path) => {
                let label = path.display().to_string();
                prepare_file(path, &label)?;
                let conn = open_and_migrate(path, config, &label)?;
                let segments = Segments::open(path)?;
                let key = std::fs::canonicalize(path)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| label.clone());
                let checkpointer = Checkpointer::start(path, config, &label);
                Ok(Arc::new(Db {
                    config: config.clone(),
                    key,
                    label,
                    idle: Mutex::new(vec![conn]),
                    permits: tokio::sync::Semaphore::new(MAX_CONCURRENT),
                    memory: None,
                    checkpointer,
                    segments: Some(segments),
                }))
            }
        }
    }

    /// Tells the checkpointer that about `bytes` were committed to the write-ahead log.
    pub(crate) fn wrote(&self, bytes: u64) {
        if let Some(c) = &self.checkpointer {
            c.wrote(bytes);
        }
    }

    /// The database file path, or `:memory:`.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// Runs `op` on a connection, on the blocking pool, retrying it while the database is busy.
    /// `op` must leave no transaction open on error (rusqlite rolls back on drop).
    pub(crate) async fn run<T, F>(self: &Arc<Self>, operation: &'static str, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Connection) -> DbResult<T> + Send + 'static,
    {
        // The semaphore is never closed, so `acquire` cannot fail.
        let _permit = self.permits.acquire().await.ok();
        let db = self.clone();
        match tokio::task::spawn_blocking(move || db.run_blocking(operation, op)).await {
            Ok(r) => r,
            Err(e) => Err(Error::store(
                crate::SQLITE,
                format!(
                    "{operation} on {}: the database task failed: {e}",
                    self.label
                ),
            )),
        }
    }

    /// Runs `op` like [`Db::run`], but on the calling thread when the runtime can lend it
    /// (`block_in_place` on a multi-thread runtime): no hand-off to another thread and no
    /// need for `op` to own its data. Returns `None`, without running `op`, on a
    /// current-thread runtime (or outside a runtime): use [`Db::run`] there.
    pub(crate) async fn run_in_place<T, F>(
        &self,
        operation: &'static str,
        op: F,
    ) -> Option<Result<T>>
    where
        F: FnMut(&mut Connection) -> DbResult<T>,
    {
        use tokio::runtime::{Handle, RuntimeFlavor};
        if !matches!(
            Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(RuntimeFlavor::MultiThread)
        ) {
            return None;
        }
        let _permit = self.permits.acquire().await.ok();
        Some(tokio::task::block_in_place(|| {
            self.run_blocking(operation, op)
        }))
    }

    /// [`Db::run`] on the current thread.
    pub(crate) fn run_blocking<T, F>(&self, operation: &'static str, mut op: F) -> Result<T>
    where
        F: FnMut(&mut Connection) -> DbResult<T>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(2);
        loop {
            let result = self.with_connection(&mut op);
            match result {
                Err(e) if e.is_busy() && start.elapsed() < self.config.busy_deadline => {
                    tracing::debug!(location = %self.label, operation, "database busy, retrying");
                    // Jitter, so two busy writers do not retry in lockstep.
                    std::thread::sleep(backoff + Duration::from_micros(fastrand::u64(0..500)));
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                other => return other.map_err(|e| e.into_core(&self.label, operation)),
            }
        }
    }

    fn with_connection<T, F>(&self, op: &mut F) -> DbResult<T>
    where
        F: FnMut(&mut Connection) -> DbResult<T>,
    {
        if let Some(m) = &self.memory {
            return op(&mut lock(m));
        }
        let taken = lock(&self.idle).pop();
        let mut conn = match taken {
            Some(c) => c,
            None => match &self.config.location {
                Location::File(p) => open_file(p, &self.config)?,
                Location::Memory => unreachable!("memory databases have their connection"),
            },
        };
        let r = op(&mut conn);
        // A connection stuck in a transaction (should not happen) is not reused.
        if conn.is_autocommit() {
            let mut idle = lock(&self.idle);
            if idle.len() < MAX_CONCURRENT {
                idle.push(conn);
            }
        }
        r
    }
}

/// Creates a missing file with mode 0600; refuses an existing file that is not a database.
fn prepare_file(path: &Path, label: &str) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(parent)
                .map_err(|e| error::io(&parent.display().to_string(), "create directory", e))?;
        }
    }
    let mut create = OpenOptions::new();
    create.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut create, 0o600);
    match create.open(path) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(error::io(label, "create", e)),
    }
    let mut file = std::fs::File::open(path).map_err(|e| error::io(label, "open", e))?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(Error::invalid(
            "sandbox_store_not_a_database",
            format!("{label} is a directory, not a SQLite database file"),
        ));
    }
    let mut head = Vec::with_capacity(16);
    (&mut file)
        .take(16)
        .read_to_end(&mut head)
        .map_err(|e| error::io(label, "read", e))?;
    // An empty file is an empty database to SQLite; anything else must carry the magic.
    if !head.is_empty() && head.as_slice() != SQLITE_MAGIC {
        return Err(error::not_a_database(label));
    }
    Ok(())
}

/// Opens a file database, refuses a foreign or newer one before WAL mode writes to its header,
/// and migrates it. Processes opening a new file at the same moment wait for each other (the
/// journal-mode switch and the first migration take locks) until the busy deadline.
fn open_and_migrate(path: &Path, config: &SqliteConfig, label: &str) -> Result<Connection> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(2);
    loop {
        let attempt = open_raw(path, config).and_then(|mut c| {
            schema::check_compatible(&c, label)?;
            configure(&c, config)?;
            schema::migrate(&mut c, label)?;
            Ok(c)
        });
        match attempt {
            Err(e) if e.is_busy() && start.elapsed() < config.busy_deadline => {
                std::thread::sleep(backoff + Duration::from_micros(fastrand::u64(0..500)));
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            other => return other.map_err(|e| e.into_core(label, "open")),
        }
    }
}

pub(crate) fn open_file(path: &Path, config: &SqliteConfig) -> DbResult<Connection> {
    let conn = open_raw(path, config)?;
    configure(&conn, config)?;
    Ok(conn)
}

/// Opens a connection without changing anything in the file.
fn open_raw(path: &Path, config: &SqliteConfig) -> DbResult<Connection> {
    // No CREATE flag: the file was created (0600) by `prepare_file`.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(config.busy_timeout)?;
    Ok(conn)
}

fn configure(conn: &Connection, config: &SqliteConfig) -> DbResult<()> {
    if config.location != Location::Memory {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::Domain(Error::store(
                crate::SQLITE,
                format!("the database refused WAL mode (journal_mode is {mode})"),
            )));
        }
        // A committed transaction survives the death of this process (it is in the OS);
        // `flush` upgrades to a synced commit for power loss.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        // Checkpoints (copying the log into the database, with fsyncs) run on the background
        // checkpointer, not inside a writer's commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    }
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}
