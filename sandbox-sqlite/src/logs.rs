//! `SqliteSink`: process logs, one row per log in `sandbox_process_logs`, one index row per
//! chunk in `sandbox_process_chunks`, and the chunks' bytes in the log's segment file (see
//! [`crate::segment`]; in-memory databases keep them in the index rows).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use sandbox_core::{
    now_ms, Error, LogAppender, LogEntry, LogPage, LogState, LogStatus, Missing, ProcessId,
    ReadFrom, Result, StreamSink, WriterLiveness,
};
use tokio::sync::watch;

use crate::db::Db;
use crate::error::{DbError, DbResult};
use crate::liveness::{self, LiveToken, WriterIdentity};
use crate::segment::{SegmentFile, Segments};
use crate::SQLITE;

/// Shortest wait between two polls of a followed log that another OS process writes.
const POLL_MIN: Duration = Duration::from_millis(5);
/// Longest wait between two polls.
const POLL_MAX: Duration = Duration::from_millis(250);
/// A follower reads at most this many entries at once...
const FOLLOW_PAGE_ENTRIES: usize = 256;
/// ...and stops a page once it holds this many bytes, so memory stays flat.
const FOLLOW_PAGE_BYTES: usize = 1 << 20;

/// Process logs in a SQLite database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteSink {
    pub(crate) db: Arc<Db>,
}

fn no_log(id: &ProcessId) -> Error {
    Error::not_found(Missing::Log, id.to_string())
}

fn closed(id: &ProcessId) -> Error {
    Error::Conflict {
        code: "sandbox_process_stream_closed".into(),
        message: format!("the log of process {id} is closed"),
    }
}

// ---- in-process notification --------------------------------------------------------------

/// A counter per (database, process) bumped on every change, shared by all writers and
/// followers of this OS process. Entries die with their last holder.
type Hub = Mutex<HashMap<(String, ProcessId), Weak<watch::Sender<u64>>>>;

fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(Default::default)
}

fn channel(db: &Db, id: &ProcessId) -> Arc<watch::Sender<u64>> {
    let mut map = hub().lock().unwrap_or_else(|p| p.into_inner());
    let key = (db.key.clone(), *id);
    if let Some(tx) = map.get(&key).and_then(Weak::upgrade) {
        return tx;
    }
    if map.len() >= 64 {
        map.retain(|_, w| w.strong_count() > 0);
    }
    let tx = Arc::new(watch::channel(0).0);
    map.insert(key, Arc::downgrade(&tx));
    tx
}

// ---- rows ---------------------------------------------------------------------------------

/// The `sandbox_process_logs` row.
struct LogRow {
    stream_id: String,
    state: LogState,
    entries: u64,
    bytes: u64,
    writer: WriterIdentity,
    token: String,
    /// The writer object was dropped without closing the log.
    released: bool,
    /// Key of the log's chunks.
    log_id: i64,
}

impl LogRow {
    fn load(conn: &Connection, id: &ProcessId) -> rusqlite::Result<Option<LogRow>> {
        conn.prepare_cached(
            "SELECT l.streamId, l.state, l.abortReason, last.seq, \
             last.byteOffset + last.byteLength, l.writerPid, l.writerStartTime, l.writerBootId, \
             l.writerPidNamespace, l.writerToken, l.writerReleasedAt, l.logId \
             FROM sandbox_process_logs AS l \
             LEFT JOIN sandbox_process_chunks AS last ON last.logId = l.logId AND last.seq = \
                 (SELECT max(seq) FROM sandbox_process_chunks WHERE logId = l.logId) \
             WHERE l.processId = ?1",
        )?
        .query_row([id.to_string()], |r| {
            let state: String = r.get(1)?;
            let state = match state.as_str() {
                "open" => LogState::Open,
                "closed" => LogState::Closed,
                _ => LogState::Aborted {
                    reason: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                },
            };
            Ok(LogRow {
                stream_id: r.get(0)?,
                state,
                entries: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                bytes: r.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
                writer: WriterIdentity {
                    pid: r.get::<_, i64>(5)? as u32,
                    start_time: r.get::<_, Option<i64>>(6)?.map(|t| t as u64),
                    boot_id: r.get(7)?,
                    pid_namespace: r.get(8)?,
                },
                token: r.get(9)?,
                released: r.get::<_, Option<i64>>(10)?.is_some(),
                log_id: r.get(11)?,
            })
        })
        .optional()
    }

    fn liveness(&self) -> WriterLiveness {
        if self.state.is_finished() || self.released {
            WriterLiveness::Gone
        } else {
            liveness::judge(&self.writer, &self.token)
        }
    }

    fn status(&self) -> LogStatus {
        LogStatus {
            stream_id: self.stream_id.clone(),
            state: self.state.clone(),
            entries: self.entries,
            bytes: self.bytes,
            writer: self.liveness(),
        }
    }
}

/// Reads entries from `from` (at most `max`, and stopping after `max_bytes` once one is read)
/// with the log's status, in one snapshot. With `segments` (a file database) the lines are
/// read from the log's segment file, for indexed rows only.
fn read_page(
    conn: &mut Connection,
    segments: Option<&Segments>,
    id: &ProcessId,
    from: ReadFrom,
    max: usize,
    max_bytes: usize,
) -> DbResult<LogPage> {
    let tx = conn.transaction()?; // deferred: a read snapshot
    let row = LogRow::load(&tx, id)?.ok_or_else(|| no_log(id))?;
    let log = row.log_id;
    let first_seq: Option<i64> = match from {
        ReadFrom::Seq(n) => Some(n.max(1).min(i64::MAX as u64) as i64),
        // Offsets grow with seq, so the entries at or after an offset are those from the
        // first seq whose offset reaches it.
        ReadFrom::Offset(o) => first_seq_at_or_after(&tx, log, row.entries, o)?,
    };
    // (seq, offset, length, line when stored in the row)
    let mut index: Vec<(u64, u64, usize, Option<String>)> = Vec::new();
    if let (Some(first), true) = (first_seq, max > 0) {
        let mut stmt = tx.prepare_cached(
            "SELECT seq, byteOffset, byteLength, line FROM sandbox_process_chunks \
             WHERE logId = ? AND seq >= ? ORDER BY seq LIMIT ?",
        )?;
        let limit = max.min(i64::MAX as usize) as i64;
        let mut rows = stmt.query(rusqlite::params![log, first, limit])?;
        let mut bytes = 0usize;
        while let Some(r) = rows.next()? {
            let len = r.get::<_, i64>(2)? as usize;
            bytes = bytes.saturating_add(len);
            index.push((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                len,
                r.get(3)?,
            ));
            if bytes >= max_bytes {
                break;
            }
        }
    }
    drop(tx);
    let entries = match (segments, index.first(), index.last()) {
        // A file database: one read of the indexed range; offsets are contiguous.
        (Some(segments), Some(first), Some(last)) => {
            let start = first.1;
            let len = (last.1 + last.2 as u64 - start) as usize;
            let bytes = segments.read(log, id, start, len)?;
            let mut entries = Vec::with_capacity(index.len());
            for (seq, offset, len, _) in index {
                let at = (offset - start) as usize;
                let raw = &bytes[at..at + len];
                // Every stored line is one JSON object and its newline; anything else (zeros
                // left by a power loss, a damaged file) is refused, never returned as output.
                let line = std::str::from_utf8(raw)
                    .ok()
                    .filter(|l| l.starts_with('{') && l.ends_with('\n'))
                    .ok_or_else(|| {
                        DbError::Domain(Error::store(
                            SQLITE,
                            format!(
                                "the log segment {} of process {id} does not hold the line \
                                 indexed at offset {offset} (seq {seq}): the file was damaged \
                                 or lost its tail in a power failure",
                                segments.path(log).display()
                            ),
                        ))
                    })?;
                entries.push(LogEntry {
                    seq,
                    offset,
                    line: line.to_string(),
                });
            }
            entries
        }
        (Some(_), _, _) => Vec::new(),
        (None, _, _) => index
            .into_iter()
            .map(|(seq, offset, _, line)| LogEntry {
                seq,
                offset,
                line: line.unwrap_or_default(),
            })
            .collect(),
    };
    Ok(LogPage {
        entries,
        status: row.status(),
    })
}

/// The first seq of log `log` (whose seqs are `1..=entries`) starting at or after byte
/// `offset`, by binary search: offsets grow with seq.
fn first_seq_at_or_after(
    conn: &Connection,
    log: i64,
    entries: u64,
    offset: u64,
) -> rusqlite::Result<Option<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT byteOffset FROM sandbox_process_chunks WHERE logId = ? AND seq = ?",
    )?;
    let mut offset_of = |seq: u64| -> rusqlite::Result<u64> {
        stmt.query_row(rusqlite::params![log, seq as i64], |r| r.get::<_, i64>(0))
            .map(|o| o as u64)
    };
    // Invariant: every seq below `lo` starts before `offset`; `hi` (if a chunk) at or after.
    let (mut lo, mut hi) = (1, entries + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if offset_of(mid)? >= offset {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok((lo <= entries).then_some(lo as i64))
}

/// The `at` and `type` of a chunk line, for the query columns; `None` for lines that are not
/// chunks (the sink stores what it is given).
fn chunk_head(line: &str) -> ChunkHead {
    #[derive(serde::Deserialize)]
    struct Head {
        at: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    // The core writer puts `data` (the bulk) last: parse only what precedes it. A `,"data":`
    // cannot sit inside a string (its quote is unescaped), so the cut is structural; a cut
    // inside a nested object fails to parse and falls back to the whole line.
    if let Some(cut) = line.find(",\"data\":") {
        let mut head = String::with_capacity(cut + 1);
        head.push_str(&line[..cut]);
        head.push('}');
        if let Ok(h) = serde_json::from_str::<Head>(&head) {
            return (h.at, h.kind);
        }
    }
    match serde_json::from_str::<Head>(line) {
        Ok(h) => (h.at, h.kind),
        Err(_) => (None, None),
    }
}

// ---- writer -------------------------------------------------------------------------------

struct SqliteAppender {
    db: Arc<Db>,
    process_id: ProcessId,
    /// The log's segment file (file databases).
    segment: Option<Arc<SegmentFile>>,
    /// The seq and byte offset of the next entry: the log's indexed end. Held by each append
    /// from its segment write to its commit and advanced by the append itself, so an append
    /// whose future was dropped while its database work ran on is accounted for.
    position: Arc<Mutex<Position>>,
    stream_id: String,
    token: Arc<LiveToken>,
    notify: Arc<watch::Sender<u64>>,
    done: bool,
}

/// Checks, in the writer's transaction, that the log is still open and still ours.
fn check_owner(conn: &Connection, id: &ProcessId, token: &str) -> DbResult<LogRow> {
    let row = LogRow::load(conn, id)?.ok_or_else(|| no_log(id))?;
    if row.state.is_finished() || row.token != token {
        return Err(closed(id).into());
    }
    Ok(row)
}

/// A chunk's `at` and `type` columns.
type ChunkHead = (Option<String>, Option<String>);

/// Refuses a batch that does not continue the log at `seq`, `offset`.
fn check_batch(seq: u64, off: u64, batch: &[LogEntry]) -> Result<()> {
    sandbox_core::stream::check_continuity(batch, seq, off).map(|_| ())
}

/// Commits the index rows of `batch` (and, without a segment file, the lines).
fn append_tx(
    conn: &mut Connection,
    id: &ProcessId,
    token: &str,
    batch: &[LogEntry],
    heads: &[ChunkHead],
    lines_in_rows: bool,
) -> DbResult<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let row = check_owner(&tx, id, token)?;
    // Check the whole batch before storing any of it.
    check_batch(row.entries + 1, row.bytes, batch)?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO sandbox_process_chunks \
             (logId, seq, byteOffset, byteLength, at, \"type\", line) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )?;
        for (e, (at, kind)) in batch.iter().zip(heads) {
            insert.execute(rusqlite::params![
                row.log_id,
                e.seq as i64,
                e.offset as i64,
                e.line.len() as i64,
                at,
                kind,
                lines_in_rows.then_some(e.line.as_str())
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The seq and byte offset of a log's next entry.
#[derive(Debug, Clone, Copy)]
struct Position {
    seq: u64,
    offset: u64,
}

/// One append: the lines go to the segment at the indexed end (over any bytes a failed
/// earlier attempt left there), then their index rows are committed. A chunk is visible, and
/// acknowledged, only once both happened. The writer's position is held throughout, so two
/// appends never interleave and a batch that does not continue the log is refused before
/// anything is written.
fn append_op(
    c: &mut Connection,
    id: &ProcessId,
    token: &LiveToken,
    segment: Option<&SegmentFile>,
    position: &Mutex<Position>,
    batch: &[LogEntry],
) -> DbResult<()> {
    let mut pos = position.lock().unwrap_or_else(|p| p.into_inner());
    check_batch(pos.seq, pos.offset, batch)?;
    if let Some(segment) = segment {
        for e in batch {
            segment.write_at(e.line.as_bytes(), e.offset)?;
        }
    }
    let heads: Vec<_> = batch.iter().map(|e| chunk_head(&e.line)).collect();
    append_tx(c, id, token.as_str(), batch, &heads, segment.is_none())?;
    if let Some(last) = batch.last() {
        *pos = Position {
            seq: last.seq + 1,
            offset: last.end(),
        };
    }
    Ok(())
}

/// A commit with `synchronous = FULL`: fsyncs the write-ahead log, and with it every commit
/// before, so the log survives power loss too.
fn synced_update(
    conn: &mut Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> DbResult<usize> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    let result = (|| -> DbResult<usize> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(sql, params)?;
        tx.commit()?;
        Ok(n)
    })();
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    result
}

impl SqliteAppender {
    async fn finish(&mut self, state: LogState) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let (id, token, segment) = (self.process_id, self.token.clone(), self.segment.clone());
        let (name, reason) = match &state {
            LogState::Closed => ("closed", None),
            LogState::Aborted { reason } => ("aborted", Some(reason.clone())),
            LogState::Open => ("open", None),
        };
        self.db
            .run("close log", move |c| {
                if let Some(segment) = &segment {
                    segment.sync()?;
                }
                {
                    let tx = c.transaction()?;
                    check_owner(&tx, &id, token.as_str())?;
                }
                let now = now_ms();
                let n = synced_update(
                    c,
                    "UPDATE sandbox_process_logs SET state = ?, abortReason = ?, finishedAt = ?, \
                     flushedAt = ? WHERE processId = ? AND writerToken = ? AND state = 'open'",
                    rusqlite::params![name, reason, now, now, id.to_string(), token.as_str()],
                )?;
                if n == 0 {
                    return Err(closed(&id).into());
                }
                Ok(())
            })
            .await?;
        self.done = true;
        self.notify.send_modify(|v| *v += 1);
        Ok(())
    }
}

impl Drop for SqliteAppender {
    /// A writer dropped without `close` is recorded as released, so other OS processes see it
    /// `Gone` while this one keeps running. Best effort, off the async runtime: should it not
    /// happen, the pid check still applies.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (db, id, token) = (
            self.db.clone(),
            self.process_id,
            self.token.as_str().to_string(),
        );
        let release = move || {
            let result = db.run_blocking("release log writer", |c| {
                c.execute(
                    "UPDATE sandbox_process_logs SET writerReleasedAt = ? \
                     WHERE processId = ? AND writerToken = ? AND state = 'open'",
                    rusqlite::params![now_ms(), id.to_string(), token],
                )?;
                Ok(())
            });
            if let Err(e) = result {
                tracing::debug!(process = %id, error = %e, "could not record the writer's release");
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("sqlite-release".into())
            .spawn(release)
        {
            tracing::debug!(process = %self.process_id, error = %e, "could not record the writer's release");
        }
    }
}

#[async_trait]
impl LogAppender for SqliteAppender {
    fn stream_id(&self) -> &str {
        &self.stream_id
    }

    async fn append(&mut self, entries: &[LogEntry]) -> Result<()> {
        if self.done {
            return Err(closed(&self.process_id));
        }
        if entries.is_empty() {
            return Ok(());
        }
        // What the commit adds to the write-ahead log: a few b-tree pages (plus the lines in
        // an in-memory database, which has no write-ahead log).
        let bytes: u64 = 3 * 4096 + 64 * entries.len() as u64;
        let id = self.process_id;
        let in_place = self
            .db
            .run_in_place("append to log", |c| {
                let segment = self.segment.as_deref();
                append_op(c, &id, &self.token, segment, &self.position, entries)
            })
            .await;
        match in_place {
            Some(result) => result?,
            None => {
                let (token, segment) = (self.token.clone(), self.segment.clone());
                let position = self.position.clone();
                let batch: Vec<_> = entries.to_vec();
                self.db
                    .run("append to log", move |c| {
                        append_op(c, &id, &token, segment.as_deref(), &position, &batch)
                    })
                    .await?
            }
        }
        self.db.wrote(bytes);
        self.notify.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let (id, token, segment) = (self.process_id, self.token.clone(), self.segment.clone());
        self.db
            .run("flush log", move |c| {
                // The lines first, then the write-ahead log that indexes them.
                if let Some(segment) = &segment {
                    segment.sync()?;
                }
                synced_update(
                    c,
                    "UPDATE sandbox_process_logs SET flushedAt = ? WHERE processId = ? AND writerToken = ?",
                    rusqlite::params![now_ms(), id.to_string(), token.as_str()],
                )
                .map(|_| ())
            })
            .await
    }

    async fn close(&mut self) -> Result<()> {
        self.finish(LogState::Closed).await
    }

    async fn abort(&mut self, reason: &str) -> Result<()> {
        self.finish(LogState::Aborted {
            reason: reason.to_string(),
        })
        .await
    }
}

// ---- sink ---------------------------------------------------------------------------------

impl SqliteSink {
    /// Reads one page; see [`StreamSink::read`].
    async fn page(
        &self,
        id: ProcessId,
        from: ReadFrom,
        max: usize,
        max_bytes: usize,
    ) -> Result<LogPage> {
        let db = self.db.clone();
        self.db
            .run("read log", move |c| {
                read_page(c, db.segments.as_ref(), &id, from, max, max_bytes)
            })
            .await
    }
}

#[async_trait]
impl StreamSink for SqliteSink {
    fn name(&self) -> &str {
        SQLITE
    }

    async fn open_writer(&self, process_id: &ProcessId) -> Result<Box<dyn LogAppender>> {
        let id = *process_id;
        let token = Arc::new(LiveToken::new());
        let stream_id = id.stream_client_id();
        let (t, s) = (token.clone(), stream_id.clone());
        let db = self.db.clone();
        let segment = self
            .db
            .run("open log writer", move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let pid = id.to_string();
                let exists = tx
                    .query_row(
                        "SELECT 1 FROM sandbox_process_logs WHERE processId = ?",
                        [&pid],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                if exists {
                    return Err(DbError::Domain(Error::Conflict {
                        code: "sandbox_process_stream_writer_exists".into(),
                        message: format!(
                            "the log of process {id} already has a writer; a log has exactly one"
                        ),
                    }));
                }
                let me = liveness::current();
                tx.execute(
                    "INSERT INTO sandbox_process_logs (processId, streamId, state, openedAt, \
                     writerPid, writerStartTime, writerBootId, writerPidNamespace, writerToken) \
                     VALUES (?, ?, 'open', ?, ?, ?, ?, ?, ?)",
                    rusqlite::params![
                        pid,
                        s,
                        now_ms(),
                        me.pid as i64,
                        me.start_time.map(|t| t as i64),
                        me.boot_id,
                        me.pid_namespace,
                        t.as_str()
                    ],
                )?;
                // The segment exists before the log does: a reader never finds a log whose
                // file was not created.
                let segment = match &db.segments {
                    Some(segments) => Some(Arc::new(segments.create(tx.last_insert_rowid())?)),
                    None => None,
                };
                tx.commit()?;
                Ok(segment)
            })
            .await?;
        let notify = channel(&self.db, &id);
        notify.send_modify(|v| *v += 1);
        Ok(Box::new(SqliteAppender {
            db: self.db.clone(),
            process_id: id,
            segment,
            position: Arc::new(Mutex::new(Position { seq: 1, offset: 0 })),
            stream_id,
            token,
            notify,
            done: false,
        }))
    }

    async fn read(&self, process_id: &ProcessId, from: ReadFrom, max: usize) -> Result<LogPage> {
        self.page(*process_id, from, max, usize::MAX).await
    }

    async fn follow(
        &self,
        process_id: &ProcessId,
        from: ReadFrom,
    ) -> Result<BoxStream<'static, Result<LogEntry>>> {
        // Subscribe before the first read so no append between the two is missed.
        let notify = channel(&self.db, process_id);
        let rx = notify.subscribe();
        // A missing log is an error of `follow` itself, not of the stream.
        self.status(process_id)
            .await?
            .ok_or_else(|| no_log(process_id))?;
        struct Follow {
            sink: SqliteSink,
            id: ProcessId,
            from: ReadFrom,
            rx: watch::Receiver<u64>,
            _notify: Arc<watch::Sender<u64>>,
            buf: VecDeque<LogEntry>,
            delay: Duration,
            done: bool,
        }
        let st = Follow {
            sink: self.clone(),
            id: *process_id,
            from,
            rx,
            _notify: notify,
            buf: VecDeque::new(),
            delay: POLL_MIN,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(e) = st.buf.pop_front() {
                    st.from = ReadFrom::Seq(e.seq + 1);
                    return Some((Ok(e), st));
                }
                if st.done {
                    return None;
                }
                st.rx.mark_unchanged();
                match st
                    .sink
                    .page(st.id, st.from, FOLLOW_PAGE_ENTRIES, FOLLOW_PAGE_BYTES)
                    .await
                {
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    Ok(page) if !page.entries.is_empty() => {
                        st.delay = POLL_MIN;
                        st.buf.extend(page.entries);
                    }
                    Ok(page) if page.status.state.is_finished() => st.done = true,
                    Ok(_) => {
                        // Woken at once by writers in this process; polled for the others.
                        tokio::select! {
                            _ = st.rx.changed() => {}
                            _ = tokio::time::sleep(st.delay) => {
                                st.delay = (st.delay * 2).min(POLL_MAX);
                            }
                        }
                    }
                }
            }
        })))
    }

    async fn status(&self, process_id: &ProcessId) -> Result<Option<LogStatus>> {
        let id = *process_id;
        self.db
            .run("log status", move |c| {
                Ok(LogRow::load(c, &id)?.map(|r| r.status()))
            })
            .await
    }

    async fn abandon(&self, process_id: &ProcessId, reason: &str) -> Result<()> {
        let (id, reason) = (*process_id, reason.to_string());
        let changed = self
            .db
            .run("abandon log", move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let row = LogRow::load(&tx, &id)?.ok_or_else(|| no_log(&id))?;
                if row.state.is_finished() {
                    return Ok(false);
                }
                match row.liveness() {
                    WriterLiveness::Gone => {}
                    WriterLiveness::Alive => {
                        return Err(DbError::Domain(Error::Conflict {
                            code: "sandbox_process_stream_writer_alive".into(),
                            message: format!(
                                "the writer of process {id} is still alive (pid {})",
                                row.writer.pid
                            ),
                        }))
                    }
                    WriterLiveness::Unknown => {
                        return Err(DbError::Domain(Error::Conflict {
                            code: "sandbox_process_stream_writer_alive".into(),
                            message: format!(
                                "the writer of process {id} (pid {} in another pid namespace) \
                                 cannot be judged from here; it is treated as alive",
                                row.writer.pid
                            ),
                        }))
                    }
                }
                tx.execute(
                    "UPDATE sandbox_process_logs SET state = 'aborted', abortReason = ?, \
                     finishedAt = ? WHERE processId = ?",
                    rusqlite::params![reason, now_ms(), id.to_string()],
                )?;
                tx.commit()?;
                Ok(true)
            })
            .await?;
        if changed {
            channel(&self.db, process_id).send_modify(|v| *v += 1);
        }
        Ok(())
    }
}
