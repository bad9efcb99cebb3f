//! Schema and migrations, versioned with `PRAGMA user_version`.
//!
//! Migrations run on open, inside one `BEGIN IMMEDIATE` transaction, so two processes opening
//! a fresh file at once apply them exactly once. A database written by a newer version of this
//! crate (`user_version` above [`SCHEMA_VERSION`]), or another application's database, is
//! refused before anything is written to it.

use rusqlite::{Connection, TransactionBehavior};
use sandbox_core::Error;

use crate::error::{DbError, DbResult};

/// Schema version this code writes and understands.
pub const SCHEMA_VERSION: i64 = 1;

/// `PRAGMA application_id` of a sandbox database ("EKSB").
pub const APPLICATION_ID: i64 = 0x454B_5342;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE sandbox_sandboxes (
    id                TEXT PRIMARY KEY NOT NULL,
    status            TEXT NOT NULL,
    provider          TEXT NOT NULL,
    externalSandboxId TEXT,
    sandboxUrl        TEXT,
    timeout           INTEGER,
    runtime           TEXT,
    vcpus             INTEGER,
    ports             TEXT,    -- JSON array of numbers
    purpose           TEXT,
    params            TEXT,    -- JSON
    createdAt         INTEGER NOT NULL,
    updatedAt         INTEGER,
    shutdownAt        INTEGER,
    sandboxUserId     TEXT
) STRICT;
CREATE INDEX sandbox_sandboxes_created ON sandbox_sandboxes (createdAt, id);
CREATE INDEX sandbox_sandboxes_status ON sandbox_sandboxes (status, createdAt);
CREATE INDEX sandbox_sandboxes_external ON sandbox_sandboxes (externalSandboxId);

CREATE TABLE sandbox_processes (
    id                 TEXT PRIMARY KEY NOT NULL,
    sandboxId          TEXT NOT NULL REFERENCES sandbox_sandboxes (id),
    kind               TEXT NOT NULL,
    mode               TEXT NOT NULL,
    status             TEXT NOT NULL,
    provider           TEXT NOT NULL,
    command            TEXT NOT NULL,
    args               TEXT,    -- JSON array of strings
    cwd                TEXT,
    env                TEXT,    -- JSON object, values redacted
    exitCode           INTEGER,
    signal             TEXT,
    externalProcessId  TEXT,
    streamId           TEXT,
    streamClientId     TEXT,
    streamStartedAt    INTEGER,
    streamFinishedAt   INTEGER,
    streamAbortReason  TEXT,
    startedAt          INTEGER NOT NULL,
    updatedAt          INTEGER,
    exitedAt           INTEGER,
    metadata           TEXT     -- JSON
) STRICT;
CREATE INDEX sandbox_processes_started ON sandbox_processes (startedAt, id);
CREATE INDEX sandbox_processes_sandbox ON sandbox_processes (sandboxId, startedAt);
CREATE INDEX sandbox_processes_status ON sandbox_processes (status, startedAt);

-- One row per process log. The writer* columns identify the OS process holding its single
-- writer (see the crate docs, "Writer liveness").
CREATE TABLE sandbox_process_logs (
    logId              INTEGER PRIMARY KEY,
    processId          TEXT NOT NULL UNIQUE,
    streamId           TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('open', 'closed', 'aborted')),
    abortReason        TEXT,
    openedAt           INTEGER NOT NULL,
    finishedAt         INTEGER,
    flushedAt          INTEGER,
    writerPid          INTEGER NOT NULL,
    writerStartTime    INTEGER,
    writerBootId       TEXT,
    writerPidNamespace TEXT,
    writerToken        TEXT NOT NULL,
    writerReleasedAt   INTEGER  -- set when the writer object was dropped without close
) STRICT;

-- One row per chunk, in (log, seq) order: the index of the log's NDJSON lines. A file
-- database keeps the lines themselves in the log's segment file, `<database>.logs/<logId>.ndjson`,
-- at [byteOffset, byteOffset + byteLength), and `line` is NULL; an in-memory database keeps
-- them in `line`. `at` and `type` are copied from the line for queries. `logId` (not the
-- 36-byte process id) keeps rows and index entries small. The log's length is that of its
-- last chunk (byteOffset + byteLength): no counter row is rewritten on every append, and
-- bytes of the segment past it (a write whose commit never happened) are never read.
-- Index rows are small: a WITHOUT ROWID table keyed by (logId, seq) is one b-tree, and an
-- append touches little more than its last leaf page. Offsets grow with seq (seqs of a log
-- are 1, 2, 3, ... without gap), so a read from a byte offset binary-searches the key: no
-- second index to update on every append.
CREATE TABLE sandbox_process_chunks (
    logId      INTEGER NOT NULL,  -- sandbox_process_logs.logId
    seq        INTEGER NOT NULL,
    byteOffset INTEGER NOT NULL,
    byteLength INTEGER NOT NULL,
    at         TEXT,
    "type"     TEXT,
    line       TEXT,              -- in-memory databases only
    PRIMARY KEY (logId, seq)
) STRICT, WITHOUT ROWID;
"#];

/// Checks that `conn` holds a sandbox database this code can use, and migrates it to
/// [`SCHEMA_VERSION`]. Refuses, without writing, a newer schema or a foreign database.
pub(crate) fn migrate(conn: &mut Connection, location: &str) -> DbResult<()> {
    check_compatible(conn, location)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Read again under the write lock: another process may have migrated meanwhile.
    let version = check_compatible(&tx, location)?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tracing::debug!(location, to = from + 1, "sqlite schema migrated");
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// The schema version of a database this code may use.
///
/// The header fields and the table count are read in one read transaction: read one by one,
/// another process's first migration could commit in between and a half-seen new database
/// would look foreign.
pub(crate) fn check_compatible(conn: &Connection, location: &str) -> DbResult<i64> {
    if !conn.is_autocommit() {
        return read_compatible(conn, location);
    }
    conn.execute_batch("BEGIN DEFERRED")?;
    let result = read_compatible(conn, location);
    // Only reads happened: ending the transaction cannot lose anything.
    let _ = conn.execute_batch("ROLLBACK");
    result
}

fn read_compatible(conn: &Connection, location: &str) -> DbResult<i64> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let app: i64 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    if app != 0 && app != APPLICATION_ID {
        return Err(foreign(
            location,
            &format!("its application_id is {app:#x}"),
        ));
    }
    if version > 0 && app != APPLICATION_ID {
        // Every version this crate wrote carries its application_id.
        return Err(foreign(
            location,
            &format!("it has schema version {version} but no sandbox application_id"),
        ));
    }
    if version > SCHEMA_VERSION {
        return Err(DbError::Domain(Error::invalid(
            "sandbox_store_schema_too_new",
            format!(
                "{location} has schema version {version}, newer than the {SCHEMA_VERSION} this \
                 version understands; it was left untouched. Upgrade the sandbox tools."
            ),
        )));
    }
    if version == 0 {
        let objects: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
        if objects > 0 {
            return Err(foreign(
                location,
                "it already holds tables of another application",
            ));
        }
    }
    Ok(version)
}

fn foreign(location: &str, why: &str) -> DbError {
    DbError::Domain(Error::invalid(
        "sandbox_store_not_a_sandbox_database",
        format!(
            "{location} is a SQLite database of another application ({why}); it was left \
             untouched. Point the store at another file."
        ),
    ))
}
