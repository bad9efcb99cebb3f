//! `SqliteStore`: sandbox and process records in `sandbox_sandboxes` and `sandbox_processes`.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params_from_iter, Connection, OptionalExtension, Row, TransactionBehavior};
use sandbox_core::{
    Error, Missing, ProcessFilter, ProcessId, ProcessKind, ProcessMode, ProcessPatch,
    ProcessRecord, ProcessStatus, RecordStore, Result, SandboxFilter, SandboxId, SandboxPatch,
    SandboxRecord, SandboxStatus,
};
use serde_json::Value;

use crate::db::Db;
use crate::error::{DbError, DbResult};
use crate::SQLITE;

/// Sandbox and process records in a SQLite database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) db: Arc<Db>,
}

const SANDBOX_COLUMNS: &str = "id, status, provider, externalSandboxId, sandboxUrl, timeout, \
    runtime, vcpus, ports, purpose, params, createdAt, updatedAt, shutdownAt, sandboxUserId";

const PROCESS_COLUMNS: &str = "id, sandboxId, kind, mode, status, provider, command, args, cwd, \
    env, exitCode, signal, externalProcessId, streamId, streamClientId, streamStartedAt, \
    streamFinishedAt, streamAbortReason, startedAt, updatedAt, exitedAt, metadata";

/// Processes whose status is not terminal (`ProcessStatus::is_terminal`).
const NOT_TERMINAL: &str = "status NOT IN ('exited', 'failed', 'killed', 'lost')";

fn conflict(what: &str, id: impl std::fmt::Display) -> DbError {
    DbError::Domain(Error::Conflict {
        code: format!("{what}_exists"),
        message: format!("{what} {id} already exists"),
    })
}

fn json_text<T: serde::Serialize>(v: &Option<T>) -> Option<String> {
    v.as_ref()
        .map(|v| serde_json::to_string(v).expect("JSON values serialise"))
}

/// A stored value that does not decode: the database was edited by hand or is damaged.
fn corrupt(column: &str, why: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("column {column}: {why}").into(),
    )
}

fn json_col<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    column: &str,
) -> rusqlite::Result<Option<T>> {
    let text: Option<String> = row.get(column)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt(column, e)))
        .transpose()
}

fn parsed<T>(row: &Row<'_>, column: &str, parse: fn(&str) -> Result<T>) -> rusqlite::Result<T> {
    let text: String = row.get(column)?;
    parse(&text).map_err(|e| corrupt(column, e))
}

fn sandbox_from_row(row: &Row<'_>) -> rusqlite::Result<SandboxRecord> {
    Ok(SandboxRecord {
        id: parsed(row, "id", SandboxId::parse)?,
        status: parsed(row, "status", SandboxStatus::parse)?,
        provider: row.get("provider")?,
        external_sandbox_id: row.get("externalSandboxId")?,
        sandbox_url: row.get("sandboxUrl")?,
        timeout: row.get("timeout")?,
        runtime: row.get("runtime")?,
        vcpus: row.get("vcpus")?,
        ports: json_col(row, "ports")?,
        purpose: row.get("purpose")?,
        params: json_col(row, "params")?,
        created_at: row.get("createdAt")?,
        updated_at: row.get("updatedAt")?,
        shutdown_at: row.get("shutdownAt")?,
        sandbox_user_id: row.get("sandboxUserId")?,
    })
}

fn process_from_row(row: &Row<'_>) -> rusqlite::Result<ProcessRecord> {
    Ok(ProcessRecord {
        id: parsed(row, "id", ProcessId::parse)?,
        sandbox_id: parsed(row, "sandboxId", SandboxId::parse)?,
        kind: parsed(row, "kind", ProcessKind::parse)?,
        mode: parsed(row, "mode", ProcessMode::parse)?,
        status: parsed(row, "status", ProcessStatus::parse)?,
        provider: row.get("provider")?,
        command: row.get("command")?,
        args: json_col(row, "args")?,
        cwd: row.get("cwd")?,
        env: json_col(row, "env")?,
        exit_code: row.get("exitCode")?,
        signal: row.get("signal")?,
        external_process_id: row.get("externalProcessId")?,
        stream_id: row.get("streamId")?,
        stream_client_id: row.get("streamClientId")?,
        stream_started_at: row.get("streamStartedAt")?,
        stream_finished_at: row.get("streamFinishedAt")?,
        stream_abort_reason: row.get("streamAbortReason")?,
        started_at: row.get("startedAt")?,
        updated_at: row.get("updatedAt")?,
        exited_at: row.get("exitedAt")?,
        metadata: json_col(row, "metadata")?,
    })
}

/// `SET a = ?, b = ?` for the attributes a patch changes; `id = id` when it changes none, so
/// the statement still tells whether the row exists.
struct Assignments {
    columns: Vec<&'static str>,
    values: Vec<SqlValue>,
}

impl Assignments {
    fn new() -> Self {
        Assignments {
            columns: Vec::new(),
            values: Vec::new(),
        }
    }

    fn set(&mut self, column: &'static str, value: Option<SqlValue>) {
        if let Some(v) = value {
            self.columns.push(column);
            self.values.push(v);
        }
    }

    /// Runs the update; whether a row matched.
    fn apply(mut self, conn: &Connection, table: &str, id: String) -> rusqlite::Result<bool> {
        let set = if self.columns.is_empty() {
            "id = id".to_string()
        } else {
            self.columns
                .iter()
                .map(|c| format!("{c} = ?"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.values.push(SqlValue::Text(id));
        let sql = format!("UPDATE {table} SET {set} WHERE id = ?");
        Ok(conn.execute(&sql, params_from_iter(self.values))? == 1)
    }
}

fn text(v: &Option<String>) -> Option<SqlValue> {
    v.clone().map(SqlValue::Text)
}

fn int(v: Option<i64>) -> Option<SqlValue> {
    v.map(SqlValue::Integer)
}

fn json(v: &Option<Value>) -> Option<SqlValue> {
    json_text(v).map(SqlValue::Text)
}

fn sandbox_patch(p: &SandboxPatch) -> Assignments {
    let mut a = Assignments::new();
    a.set(
        "status",
        p.status.map(|s| SqlValue::Text(s.as_str().into())),
    );
    a.set("externalSandboxId", text(&p.external_sandbox_id));
    a.set("sandboxUrl", text(&p.sandbox_url));
    a.set("params", json(&p.params));
    a.set("updatedAt", int(p.updated_at));
    a.set("shutdownAt", int(p.shutdown_at));
    a.set("sandboxUserId", text(&p.sandbox_user_id));
    a
}

fn process_patch(p: &ProcessPatch) -> Assignments {
    let mut a = Assignments::new();
    a.set(
        "status",
        p.status.map(|s| SqlValue::Text(s.as_str().into())),
    );
    a.set("exitCode", int(p.exit_code));
    a.set("signal", text(&p.signal));
    a.set("externalProcessId", text(&p.external_process_id));
    a.set("streamId", text(&p.stream_id));
    a.set("streamFinishedAt", int(p.stream_finished_at));
    a.set("streamAbortReason", text(&p.stream_abort_reason));
    a.set("updatedAt", int(p.updated_at));
    a.set("exitedAt", int(p.exited_at));
    a.set("metadata", json(&p.metadata));
    a
}

fn limit(n: Option<usize>) -> i64 {
    n.map(|n| n.min(i64::MAX as usize) as i64).unwrap_or(-1)
}

impl SqliteStore {
    fn insert_sandbox_tx(conn: &mut Connection, r: &SandboxRecord) -> DbResult<()> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = r.id.to_string();
        let exists = tx
            .query_row(
                "SELECT 1 FROM sandbox_sandboxes WHERE id = ?",
                [&id],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Err(conflict("sandbox", &id));
        }
        tx.execute(
            &format!("INSERT INTO sandbox_sandboxes ({SANDBOX_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"),
            rusqlite::params![
                id,
                r.status.as_str(),
                r.provider,
                r.external_sandbox_id,
                r.sandbox_url,
                r.timeout,
                r.runtime,
                r.vcpus,
                json_text(&r.ports),
                r.purpose,
                json_text(&r.params),
                r.created_at,
                r.updated_at,
                r.shutdown_at,
                r.sandbox_user_id,
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn insert_process_tx(conn: &mut Connection, r: &ProcessRecord) -> DbResult<()> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = r.id.to_string();
        let exists = tx
            .query_row(
                "SELECT 1 FROM sandbox_processes WHERE id = ?",
                [&id],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Err(conflict("sandbox_process", &id));
        }
        let sandbox = r.sandbox_id.to_string();
        let has_sandbox = tx
            .query_row(
                "SELECT 1 FROM sandbox_sandboxes WHERE id = ?",
                [&sandbox],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !has_sandbox {
            return Err(DbError::Domain(Error::not_found(Missing::Sandbox, sandbox)));
        }
        tx.execute(
            &format!("INSERT INTO sandbox_processes ({PROCESS_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"),
            rusqlite::params![
                id,
                sandbox,
                r.kind.as_str(),
                r.mode.as_str(),
                r.status.as_str(),
                r.provider,
                r.command,
                json_text(&r.args),
                r.cwd,
                json_text(&r.env),
                r.exit_code,
                r.signal,
                r.external_process_id,
                r.stream_id,
                r.stream_client_id,
                r.stream_started_at,
                r.stream_finished_at,
                r.stream_abort_reason,
                r.started_at,
                r.updated_at,
                r.exited_at,
                json_text(&r.metadata),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }
}

#[async_trait]
impl RecordStore for SqliteStore {
    fn name(&self) -> &str {
        SQLITE
    }

    async fn insert_sandbox(&self, record: &SandboxRecord) -> Result<()> {
        let record = record.clone();
        self.db
            .run("insert sandbox", move |c| {
                Self::insert_sandbox_tx(c, &record)
            })
            .await
    }

    async fn patch_sandbox(&self, id: &SandboxId, patch: &SandboxPatch) -> Result<()> {
        let (id, patch) = (*id, patch.clone());
        self.db
            .run("patch sandbox", move |c| {
                if sandbox_patch(&patch).apply(c, "sandbox_sandboxes", id.to_string())? {
                    Ok(())
                } else {
                    Err(Error::not_found(Missing::Sandbox, id.to_string()).into())
                }
            })
            .await
    }

    async fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>> {
        let id = id.to_string();
        self.db
            .run("get sandbox", move |c| {
                Ok(c.prepare_cached(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandbox_sandboxes WHERE id = ?"
                ))?
                .query_row([&id], sandbox_from_row)
                .optional()?)
            })
            .await
    }

    async fn list_sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<SandboxRecord>> {
        let f = filter.clone();
        self.db
            .run("list sandboxes", move |c| {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandbox_sandboxes \
                     WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR provider = ?2) \
                     ORDER BY createdAt, id LIMIT ?3"
                ))?;
                let rows = stmt.query_map(
                    rusqlite::params![f.status.map(|s| s.as_str()), f.provider, limit(f.limit)],
                    sandbox_from_row,
                )?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await
    }

    async fn insert_process(&self, record: &ProcessRecord) -> Result<()> {
        let record = record.clone();
        self.db
            .run("insert process", move |c| {
                Self::insert_process_tx(c, &record)
            })
            .await
    }

    async fn patch_process(&self, id: &ProcessId, patch: &ProcessPatch) -> Result<()> {
        let (id, patch) = (*id, patch.clone());
        self.db
            .run("patch process", move |c| {
                if process_patch(&patch).apply(c, "sandbox_processes", id.to_string())? {
                    Ok(())
                } else {
                    Err(Error::not_found(Missing::Process, id.to_string()).into())
                }
            })
            .await
    }

    async fn get_process(&self, id: &ProcessId) -> Result<Option<ProcessRecord>> {
        let id = id.to_string();
        self.db
            .run("get process", move |c| {
                Ok(c.prepare_cached(&format!(
                    "SELECT {PROCESS_COLUMNS} FROM sandbox_processes WHERE id = ?"
                ))?
                .query_row([&id], process_from_row)
                .optional()?)
            })
            .await
    }

    async fn list_processes(&self, filter: &ProcessFilter) -> Result<Vec<ProcessRecord>> {
        let f = filter.clone();
        self.db
            .run("list processes", move |c| {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {PROCESS_COLUMNS} FROM sandbox_processes \
                     WHERE (?1 IS NULL OR sandboxId = ?1) AND (?2 IS NULL OR status = ?2) \
                     AND (?3 = 0 OR {NOT_TERMINAL}) \
                     ORDER BY startedAt, id LIMIT ?4"
                ))?;
                let rows = stmt.query_map(
                    rusqlite::params![
                        f.sandbox_id.map(|s| s.to_string()),
                        f.status.map(|s| s.as_str()),
                        f.open_only,
                        limit(f.limit)
                    ],
                    process_from_row,
                )?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_only_filter_excludes_exactly_the_terminal_statuses() {
        let terminal: Vec<_> = ProcessStatus::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        assert_eq!(
            format!("status NOT IN ({})", terminal.join(", ")),
            NOT_TERMINAL
        );
    }
}
