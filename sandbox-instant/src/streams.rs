//! `InstantSink`: process logs as InstantDB streams, over the admin SSE session.
//!
//! - One writer per client id `sandbox-process:<processId>`, holding a random reconnect token.
//! - Appends are queued and sent in batches (when `batch_bytes` are waiting, after
//!   `batch_delay`, or on flush/close), each as one `append-stream` at its UTF-8 byte offset.
//! - The writer keeps every byte the server has not acknowledged with `stream-flushed`; when
//!   the session drops or the server answers `append-failed`, it reconnects with its token and
//!   resends from the flushed offset the server reports, so nothing is lost or duplicated.
//! - Readers subscribe from a byte offset; flushed parts arrive as file URLs, fetched and
//!   concatenated; followers resubscribe from where they were if the session drops.
//! - An open writer renews its lease (the process row's `updatedAt`) in the background; the
//!   liveness of a writer of another OS process is judged by the lease's age.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use sandbox_core::{
    Error, LogAppender, LogEntry, LogPage, LogState, LogStatus, Missing, ProcessChunk, ProcessId,
    ProcessStatus, ReadFrom, Result, StreamSink, WriterLiveness,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::client::InstantClient;
use crate::error::{InstantError, Op};
use crate::schema::PROCESSES;
use crate::session::Session;
use crate::INSTANT;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What this OS process knows of the writers it opened.
struct LocalWriter {
    alive: Weak<()>,
    /// The writer of a log dropped without close, kept so `abandon` can end it properly.
    orphan: Option<Arc<tokio::sync::Mutex<WriterCore>>>,
}

fn local_writers() -> &'static Mutex<HashMap<String, LocalWriter>> {
    static W: OnceLock<Mutex<HashMap<String, LocalWriter>>> = OnceLock::new();
    W.get_or_init(Default::default)
}

/// The `instant` stream sink.
#[derive(Debug, Clone)]
pub struct InstantSink {
    inner: Arc<SinkInner>,
}

#[derive(Debug)]
struct SinkInner {
    client: InstantClient,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
}

impl SinkInner {
    /// The open session, or a new one.
    async fn session(&self) -> Result<Arc<Session>> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let s = self
            .client
            .config
            .retry
            .run(sandbox_core::Idempotency::Idempotent, || async {
                Session::connect(&self.client)
                    .await
                    .map_err(|e| e.into_core(&Op::Stream("session".into())))
            })
            .await?;
        *slot = Some(s.clone());
        Ok(s)
    }

    fn key(&self, client_id: &str) -> String {
        format!(
            "{}|{}|{client_id}",
            self.client.config.api_uri, self.client.config.app_id
        )
    }
}

/// A `$streams` row.
#[derive(Debug, Clone)]
struct StreamRow {
    id: String,
    done: bool,
    abort_reason: Option<String>,
}

impl InstantSink {
    pub(crate) fn new(client: InstantClient) -> Self {
        InstantSink {
            inner: Arc::new(SinkInner {
                client,
                session: tokio::sync::Mutex::new(None),
            }),
        }
    }

    async fn lookup(&self, client_id: &str) -> Result<Option<StreamRow>> {
        let r = self
            .inner
            .client
            .query(json!({"$streams": {"$": {"where": {"clientId": client_id}}}}))
            .await?;
        let row = r["$streams"].as_array().and_then(|a| a.first()).cloned();
        Ok(row.map(|v| StreamRow {
            id: v["id"].as_str().unwrap_or_default().to_string(),
            done: v["done"].as_bool().unwrap_or(false),
            abort_reason: v["abortReason"].as_str().map(String::from),
        }))
    }

    /// What this OS process knows of the log's writer; `None` when it is not one of ours.
    fn local_liveness(&self, client_id: &str) -> Option<WriterLiveness> {
        match lock(local_writers()).get(&self.inner.key(client_id)) {
            Some(w) if w.alive.strong_count() > 0 => Some(WriterLiveness::Alive),
            Some(_) => Some(WriterLiveness::Gone),
            None => None,
        }
    }

    /// The writer's lease, for a writer of another OS process: the process row's `updatedAt`
    /// (`startedAt` when absent), renewed every `lease_beat` by an open writer. Within
    /// `lease_stale` of now (or ahead of it) is `Alive`, older is `Gone`; a process row in a
    /// terminal status holds no lease (`Gone`); no process row is `Unknown`. One query.
    async fn lease(&self, process_id: &ProcessId) -> Result<WriterLiveness> {
        let r = self
            .inner
            .client
            .query(json!({ PROCESSES.name: {"$": {
                "where": {"id": process_id.to_string()},
                "fields": ["updatedAt", "startedAt", "status"],
            }}}))
            .await?;
        let Some(row) = r[PROCESSES.name].as_array().and_then(|a| a.first()) else {
            return Ok(WriterLiveness::Unknown);
        };
        let terminal = row["status"]
            .as_str()
            .and_then(|s| ProcessStatus::parse(s).ok())
            .is_some_and(|s| s.is_terminal());
        if terminal {
            return Ok(WriterLiveness::Gone);
        }
        let Some(beat) = row["updatedAt"]
            .as_f64()
            .or_else(|| row["startedAt"].as_f64())
        else {
            return Ok(WriterLiveness::Unknown);
        };
        let stale = self.inner.client.config.lease_stale.as_millis() as f64;
        Ok(if now_ms() as f64 - beat <= stale {
            WriterLiveness::Alive
        } else {
            WriterLiveness::Gone
        })
    }

    /// Reads what the log holds now, from `start`. A log known to be `finished` is read until
    /// the server's `done` (or for `sse_timeout`), however many messages its answer takes.
    async fn snapshot(
        &self,
        client_id: &str,
        start: u64,
        align: bool,
        finished: bool,
    ) -> Result<Snapshot> {
        let op = Op::Stream(client_id.to_string());
        let mut dec = LineDecoder::new(start, align);
        let mut snap = Snapshot::default();
        let timeout = self.inner.client.config.sse_timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let session = self.inner.session().await?;
            let (event, mut rx) = match session.subscribe(client_id, dec.expected()).await {
                Ok(x) => x,
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = ?e, "instant: subscribe failed; retrying");
                    continue;
                }
                Err(e) => return Err(e.into_core(&op)),
            };
            let first = tokio::time::timeout(timeout, rx.recv()).await;
            let mut msgs = match first {
                Ok(Some(m)) => vec![m],
                Ok(None) if attempt < 3 => continue,
                Ok(None) => {
                    return Err(InstantError::SessionLost("while reading".into()).into_core(&op))
                }
                Err(_) => {
                    session.unsubscribe(&event).await;
                    return Err(InstantError::NoAnswer {
                        waited: timeout,
                        what: "the stream's content".into(),
                    }
                    .into_core(&op));
                }
            };
            while let Ok(m) = rx.try_recv() {
                msgs.push(m);
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut lost = false;
            loop {
                for m in msgs.drain(..) {
                    let end = apply_message(&self.inner.client, &mut dec, &m, &op).await?;
                    snap.entries.extend(dec.take());
                    if let Some(state) = end {
                        snap.state = Some(state);
                    }
                }
                if !finished || snap.state.is_some() {
                    break;
                }
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => msgs.push(m),
                    Ok(None) => {
                        lost = true;
                        break;
                    }
                    // A log ended through its `$streams` entity may never be announced as
                    // done: what arrived is what there is.
                    Err(_) => {
                        tracing::warn!(client_id, "instant: no done for a finished stream");
                        break;
                    }
                }
            }
            if lost {
                // The session ended mid-answer: read on from where we are.
                if attempt < 3 {
                    continue;
                }
                return Err(InstantError::SessionLost("while reading".into()).into_core(&op));
            }
            session.unsubscribe(&event).await;
            snap.end = dec.expected();
            return Ok(snap);
        }
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    entries: Vec<LogEntry>,
    state: Option<LogState>,
    end: u64,
}

/// Turns a stream's bytes back into NDJSON entries, whatever the message boundaries.
#[derive(Debug)]
struct LineDecoder {
    buf: Vec<u8>,
    buf_start: u64,
    /// Started at an offset that may be inside a line: drop the first partial line.
    align: bool,
    out: Vec<LogEntry>,
}

impl LineDecoder {
    fn new(start: u64, align: bool) -> Self {
        LineDecoder {
            buf: Vec::new(),
            buf_start: start,
            align: align && start > 0,
            out: Vec::new(),
        }
    }

    /// The next byte offset wanted.
    fn expected(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    fn feed(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let expected = self.expected();
        if offset > expected {
            return Err(Error::protocol(
                "sandbox_process_stream_gap",
                format!(
                    "{INSTANT}: stream bytes from {offset} arrived while {expected} was expected"
                ),
            ));
        }
        let skip = (expected - offset) as usize;
        if skip >= bytes.len() {
            return Ok(());
        }
        self.buf.extend_from_slice(&bytes[skip..]);
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let offset = self.buf_start;
            self.buf_start += line.len() as u64;
            let align = std::mem::take(&mut self.align);
            let parsed = String::from_utf8(line)
                .ok()
                .and_then(|l| ProcessChunk::decode(&l).ok().map(|c| (l, c)));
            match parsed {
                Some((line, chunk)) => self.out.push(LogEntry {
                    seq: chunk.seq,
                    offset,
                    line,
                }),
                // A line cut by the start offset is not a line of ours.
                None if align => {}
                None => {
                    return Err(Error::protocol(
                        "invalid_sandbox_process_stream_chunk",
                        format!("{INSTANT}: the log line at byte {offset} is not a process chunk"),
                    ))
                }
            }
        }
        Ok(())
    }

    fn take(&mut self) -> Vec<LogEntry> {
        std::mem::take(&mut self.out)
    }
}

/// Applies one reader message; returns the final state when the stream ended.
async fn apply_message(
    client: &InstantClient,
    dec: &mut LineDecoder,
    m: &Value,
    op: &Op,
) -> Result<Option<LogState>> {
    if m["op"] == "error" {
        let msg = m["message"].as_str().unwrap_or("unknown error").to_string();
        return Err(InstantError::Channel { message: msg }.into_core(op));
    }
    if let Some(e) = m.get("error").filter(|e| !e.is_null()) {
        let msg = e
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| e.to_string());
        return Err(InstantError::Channel { message: msg }.into_core(op));
    }
    if let Some(offset) = m["offset"].as_u64() {
        let mut payload = Vec::new();
        for f in m["files"].as_array().into_iter().flatten() {
            let url = f["url"].as_str().ok_or_else(|| {
                InstantError::Malformed("a stream file part without url".into()).into_core(op)
            })?;
            payload.extend_from_slice(&client.get_file(url).await.map_err(|e| e.into_core(op))?);
        }
        if let Some(c) = m["content"].as_str() {
            payload.extend_from_slice(c.as_bytes());
        }
        dec.feed(offset, &payload)?;
    }
    if m["done"].as_bool() == Some(true) {
        return Ok(Some(match m["abort-reason"].as_str() {
            Some(r) => LogState::Aborted {
                reason: r.to_string(),
            },
            None => LogState::Closed,
        }));
    }
    Ok(None)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Renews the lease of an open writer: every `every`, one `update` of the process row's
/// `updatedAt` (never creating the row). Stops for good when the row does not exist.
fn spawn_heartbeat(
    client: InstantClient,
    process_id: &ProcessId,
    every: Duration,
) -> tokio::task::AbortHandle {
    let pid = process_id.to_string();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let step = json!([
                "update",
                PROCESSES.name,
                pid,
                {"updatedAt": now_ms()},
                {"upsert": false}
            ]);
            let op = Op::Patch(Missing::Process, pid.clone());
            match client.transact(vec![step], op).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    tracing::debug!(process = %pid, "instant: no process row; no writer lease");
                    return;
                }
                Err(e) => {
                    tracing::debug!(process = %pid, error = %e, "instant: lease renewal failed")
                }
            }
        }
    })
    .abort_handle()
}

fn writer_exists(client_id: &str, why: &str) -> Error {
    Error::Conflict {
        code: "sandbox_process_stream_writer_exists".into(),
        message: format!("the log {client_id} already has a writer ({why}); a log has exactly one"),
    }
}

/// Drops the bytes before `flushed` from `retained` (which starts at byte `start`).
///
/// An offset that is not past `start`, beyond the retained bytes or inside a character is
/// ignored: keeping more than needed only means resending bytes the server skips.
fn forget_flushed(retained: &mut String, start: &mut u64, flushed: u64) {
    let Some(cut) = flushed.checked_sub(*start).map(|c| c as usize) else {
        return;
    };
    if cut == 0 || cut > retained.len() || !retained.is_char_boundary(cut) {
        return;
    }
    retained.drain(..cut);
    *start = flushed;
}

/// The server's `error` answer to a `start-stream`. It means another writer holds the log
/// only when it is about the reconnect token; anything else (permissions, server trouble)
/// is a failure of the store.
fn start_refused(client_id: &str, reply: &Value) -> Error {
    let msg = reply["message"].as_str().unwrap_or("refused by the server");
    let lower = msg.to_ascii_lowercase();
    if lower.contains("reconnect token") || lower.contains("already") {
        writer_exists(client_id, msg)
    } else {
        InstantError::Channel {
            message: msg.to_string(),
        }
        .into_core(&Op::Stream(client_id.to_string()))
    }
}

/// The writer's state, shared with its batching timer.
struct WriterCore {
    sink: Arc<SinkInner>,
    client_id: String,
    token: String,
    stream_id: String,
    session: Arc<Session>,
    events: mpsc::UnboundedReceiver<Value>,
    /// Bytes from `retained_start` to `end`: everything not yet acknowledged as flushed.
    retained: String,
    retained_start: u64,
    sent: u64,
    end: u64,
    next_seq: u64,
    finished: bool,
    timer_armed: bool,
    deferred: Option<Error>,
}

impl WriterCore {
    fn op(&self) -> Op {
        Op::Stream(self.client_id.clone())
    }

    /// Takes in the server's writer messages; true when the writer must reconnect.
    fn drain_events(&mut self) -> bool {
        let mut reconnect = self.session.is_closed();
        loop {
            match self.events.try_recv() {
                Ok(m) => reconnect |= self.on_event(&m),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    reconnect = true;
                    break;
                }
            }
        }
        reconnect
    }

    /// Returns true when the event asks for a reconnect.
    fn on_event(&mut self, m: &Value) -> bool {
        match m["op"].as_str() {
            Some("stream-flushed") => {
                let f = m["offset"].as_u64().unwrap_or(0).min(self.sent);
                forget_flushed(&mut self.retained, &mut self.retained_start, f);
                false
            }
            _ => true,
        }
    }

    /// Reconnects with the reconnect token; afterwards `sent` is the server's flushed offset.
    async fn reconnect(&mut self) -> Result<()> {
        let op = self.op();
        let policy = self.sink.client.config.retry.clone();
        let timeout = self.sink.client.config.sse_timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result: Result<u64> = async {
                let session = self.sink.session().await?;
                let events = session.writer_route(&self.stream_id);
                let reply = session
                    .request(
                        json!({"op": "start-stream", "client-id": self.client_id, "reconnect-token": self.token}),
                        timeout,
                    )
                    .await
                    .map_err(|e| e.into_core(&op))?;
                if reply["op"] == "error" {
                    return Err(start_refused(&self.client_id, &reply));
                }
                self.session = session;
                self.events = events;
                Ok(reply["offset"].as_u64().unwrap_or(0))
            }
            .await;
            let err = match result {
                Ok(f) if f >= self.retained_start && f <= self.end => {
                    let cut = (f - self.retained_start) as usize;
                    if !self.retained.is_char_boundary(cut) {
                        return Err(Error::protocol(
                            "sandbox_process_stream_corrupt",
                            format!(
                                "{INSTANT}: stream {} flushed offset {f} splits a character",
                                self.client_id
                            ),
                        ));
                    }
                    self.retained.drain(..cut);
                    self.retained_start = f;
                    self.sent = f;
                    tracing::debug!(client_id = %self.client_id, offset = f, "instant: stream writer reconnected");
                    return Ok(());
                }
                // The server may briefly report an older flushed offset than it acknowledged.
                Ok(f) => Error::Store {
                    store: INSTANT.into(),
                    message: format!(
                        "stream {}: server reports {f} bytes flushed; this writer holds {}..{}",
                        self.client_id, self.retained_start, self.end
                    ),
                    retryable: true,
                },
                Err(e) => e,
            };
            if !(err.is_retryable() || matches!(err, Error::Timeout { .. }))
                || attempt >= policy.max_attempts.max(3)
            {
                return Err(err);
            }
            tokio::time::sleep(policy.backoff(&err, attempt)).await;
        }
    }

    /// Sends everything queued (and the end of the stream when `done` is given).
    async fn push_pending(&mut self, done: Option<Option<&str>>) -> Result<()> {
        let policy = self.sink.client.config.retry.clone();
        let mut attempt = 0;
        loop {
            if self.drain_events() {
                self.reconnect().await?;
            }
            if self.sent == self.end && done.is_none() {
                return Ok(());
            }
            let from = (self.sent - self.retained_start) as usize;
            let chunks: Vec<&str> = if from < self.retained.len() {
                vec![&self.retained[from..]]
            } else {
                vec![]
            };
            let mut msg = json!({
                "client-event-id": uuid::Uuid::new_v4().to_string(),
                "op": "append-stream",
                "stream-id": self.stream_id,
                "chunks": chunks,
                "offset": self.sent,
                "done": done.is_some(),
            });
            if let Some(Some(reason)) = done {
                msg["abort-reason"] = json!(reason);
            }
            match self.session.push(vec![msg]).await {
                Ok(()) => {
                    self.sent = self.end;
                    return Ok(());
                }
                Err(e) => {
                    attempt += 1;
                    let err = e.into_core(&self.op());
                    if attempt >= policy.max_attempts.max(3) {
                        return Err(err);
                    }
                    tracing::debug!(error = %err, "instant: append failed; reconnecting");
                    // The push ended the session; the next round reconnects and resends.
                    tokio::time::sleep(policy.backoff(&err, attempt)).await;
                }
            }
        }
    }

    /// Whether the server already holds the stream as done.
    async fn stream_done(&self) -> Result<bool> {
        let r = self
            .sink
            .client
            .query(json!({"$streams": {"$": {"where": {"id": self.stream_id}}}}))
            .await?;
        Ok(r["$streams"][0]["done"].as_bool() == Some(true))
    }

    /// Ends the stream and waits until the server flushed all of it.
    async fn finish(&mut self, reason: Option<&str>) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        let timeout = self.sink.client.config.sse_timeout;
        let policy = self.sink.client.config.retry.clone();
        let mut rounds = 0;
        'send: loop {
            rounds += 1;
            self.push_pending(Some(reason)).await?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Err(_) => {
                        return Err(InstantError::NoAnswer {
                            waited: timeout,
                            what: "stream-flushed".into(),
                        }
                        .into_core(&self.op()))
                    }
                    Ok(Some(m)) if m["op"] == "stream-flushed" => {
                        self.on_event(&m);
                        if m["done"].as_bool() == Some(true)
                            && m["offset"].as_u64() == Some(self.end)
                        {
                            self.finished = true;
                            self.session.drop_writer_route(&self.stream_id);
                            return Ok(());
                        }
                    }
                    // append-failed, an error, or the session ended: reconnect and resend.
                    Ok(_) => {
                        if rounds >= policy.max_attempts.max(3) {
                            return Err(InstantError::SessionLost("while closing".into())
                                .into_core(&self.op()));
                        }
                        self.reconnect().await?;
                        if self.sent == self.end && self.stream_done().await? {
                            // The end arrived before the session dropped.
                            self.finished = true;
                            self.session.drop_writer_route(&self.stream_id);
                            return Ok(());
                        }
                        continue 'send;
                    }
                }
            }
        }
    }
}

/// The writer of one log.
pub(crate) struct InstantAppender {
    core: Arc<tokio::sync::Mutex<WriterCore>>,
    stream_id: String,
    key: String,
    alive: Option<Arc<()>>,
    /// The lease renewal running while the writer is open.
    heartbeat: tokio::task::AbortHandle,
    batch_bytes: u64,
    batch_delay: Duration,
}

impl Drop for InstantAppender {
    fn drop(&mut self) {
        self.heartbeat.abort();
        let mut g = lock(local_writers());
        // Still registered means not closed: keep the writer so `abandon` can end the stream
        // with everything that was written.
        if let Some(w) = g.get_mut(&self.key) {
            w.orphan = Some(self.core.clone());
        }
        self.alive.take();
    }
}

#[async_trait]
impl LogAppender for InstantAppender {
    fn stream_id(&self) -> &str {
        &self.stream_id
    }

    async fn append(&mut self, entries: &[LogEntry]) -> Result<()> {
        let mut c = self.core.lock().await;
        if c.finished {
            return Err(Error::Conflict {
                code: "sandbox_process_stream_closed".into(),
                message: format!("the log {} is closed", c.client_id),
            });
        }
        if c.deferred.take().is_some() {
            // A timed send failed; what it carried is still held. Retry before taking more.
            c.push_pending(None).await?;
        }
        let (seq, off) = sandbox_core::stream::check_continuity(entries, c.next_seq, c.end)?;
        let (old_seq, old_end) = (c.next_seq, c.end);
        for e in entries {
            c.retained.push_str(&e.line);
        }
        c.next_seq = seq;
        c.end = off;
        if c.end - c.sent >= self.batch_bytes {
            if let Err(e) = c.push_pending(None).await {
                // Not acknowledged: the caller may append the same entries again.
                if c.sent <= old_end {
                    // Trims stop at the flushed offset, at most `sent`: the new bytes are the tail.
                    let keep = c.retained.len() - (off - old_end) as usize;
                    c.retained.truncate(keep);
                    c.next_seq = old_seq;
                    c.end = old_end;
                }
                return Err(e);
            }
            return Ok(());
        }
        if !c.timer_armed && c.end > c.sent {
            c.timer_armed = true;
            let core = Arc::downgrade(&self.core);
            let delay = self.batch_delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Some(core) = core.upgrade() else { return };
                let mut c = core.lock().await;
                c.timer_armed = false;
                if !c.finished {
                    if let Err(e) = c.push_pending(None).await {
                        c.deferred = Some(e);
                    }
                }
            });
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let mut c = self.core.lock().await;
        // A failed timed send is retried here with everything still held.
        c.deferred = None;
        if c.finished {
            return Ok(());
        }
        c.push_pending(None).await
    }

    async fn close(&mut self) -> Result<()> {
        self.end(None).await
    }

    async fn abort(&mut self, reason: &str) -> Result<()> {
        self.end(Some(reason)).await
    }
}

impl InstantAppender {
    async fn end(&mut self, reason: Option<&str>) -> Result<()> {
        let mut c = self.core.lock().await;
        c.deferred = None;
        c.finish(reason).await?;
        self.heartbeat.abort();
        // A closed log needs no local record: the server refuses any new writer for it.
        lock(local_writers()).remove(&self.key);
        Ok(())
    }
}

#[async_trait]
impl StreamSink for InstantSink {
    fn name(&self) -> &str {
        INSTANT
    }

    async fn open_writer(&self, process_id: &ProcessId) -> Result<Box<dyn LogAppender>> {
        let client_id = process_id.stream_client_id();
        let key = self.inner.key(&client_id);
        let alive = Arc::new(());
        {
            let mut g = lock(local_writers());
            if g.contains_key(&key) {
                return Err(writer_exists(&client_id, "opened before in this process"));
            }
            g.insert(
                key.clone(),
                LocalWriter {
                    alive: Arc::downgrade(&alive),
                    orphan: None,
                },
            );
        }
        let result = self.start_writer(&client_id).await;
        let (session, stream_id, token) = match result {
            Ok(x) => x,
            Err(e) => {
                lock(local_writers()).remove(&key);
                return Err(e);
            }
        };
        let events = session.writer_route(&stream_id);
        let cfg = &self.inner.client.config;
        let core = WriterCore {
            sink: self.inner.clone(),
            client_id,
            token,
            stream_id: stream_id.clone(),
            session,
            events,
            retained: String::new(),
            retained_start: 0,
            sent: 0,
            end: 0,
            next_seq: 1,
            finished: false,
            timer_armed: false,
            deferred: None,
        };
        Ok(Box::new(InstantAppender {
            core: Arc::new(tokio::sync::Mutex::new(core)),
            stream_id,
            key,
            alive: Some(alive),
            heartbeat: spawn_heartbeat(self.inner.client.clone(), process_id, cfg.lease_beat),
            batch_bytes: cfg.batch_bytes as u64,
            batch_delay: cfg.batch_delay,
        }))
    }

    async fn read(&self, process_id: &ProcessId, from: ReadFrom, max: usize) -> Result<LogPage> {
        let client_id = process_id.stream_client_id();
        let row = self
            .lookup(&client_id)
            .await?
            .ok_or_else(|| Error::not_found(Missing::Log, process_id.to_string()))?;
        let (start, align) = match from {
            ReadFrom::Seq(_) => (0, false),
            ReadFrom::Offset(o) => (o, true),
        };
        let snap = self.snapshot(&client_id, start, align, row.done).await?;
        let total = snap.entries.last().map_or(0, |e| e.seq);
        let entries: Vec<LogEntry> = snap
            .entries
            .into_iter()
            .filter(|e| from.includes(e))
            .take(max)
            .collect();
        let state = snap.state.unwrap_or_else(|| row_state(&row));
        Ok(LogPage {
            entries,
            status: LogStatus {
                stream_id: row.id,
                writer: self.writer_for(process_id, &client_id, &state).await?,
                state,
                entries: total,
                bytes: snap.end,
            },
        })
    }

    async fn follow(
        &self,
        process_id: &ProcessId,
        from: ReadFrom,
    ) -> Result<BoxStream<'static, Result<LogEntry>>> {
        let client_id = process_id.stream_client_id();
        if self.lookup(&client_id).await?.is_none() {
            return Err(Error::not_found(Missing::Log, process_id.to_string()));
        }
        let (start, align) = match from {
            ReadFrom::Seq(_) => (0, false),
            ReadFrom::Offset(o) => (o, true),
        };
        struct Follow {
            sink: InstantSink,
            client_id: String,
            from: ReadFrom,
            dec: LineDecoder,
            sub: Option<(Arc<Session>, String, mpsc::UnboundedReceiver<Value>)>,
            buffered: std::collections::VecDeque<LogEntry>,
            done: bool,
            drops: u32,
        }
        let st = Follow {
            sink: self.clone(),
            client_id,
            from,
            dec: LineDecoder::new(start, align),
            sub: None,
            buffered: Default::default(),
            done: false,
            drops: 0,
        };
        Ok(Box::pin(futures::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(e) = st.buffered.pop_front() {
                    return Some((Ok(e), st));
                }
                if st.done {
                    if let Some((s, ev, _)) = st.sub.take() {
                        s.unsubscribe(&ev).await;
                    }
                    return None;
                }
                let op = Op::Stream(st.client_id.clone());
                if st.sub.is_none() {
                    let sub = async {
                        let s = st.sink.inner.session().await?;
                        let (ev, rx) = s
                            .subscribe(&st.client_id, st.dec.expected())
                            .await
                            .map_err(|e| e.into_core(&op))?;
                        Ok::<_, Error>((s, ev, rx))
                    }
                    .await;
                    match sub {
                        Ok(x) => st.sub = Some(x),
                        Err(e) => {
                            st.done = true;
                            return Some((Err(e), st));
                        }
                    }
                }
                let msg = match st.sub.as_mut() {
                    Some((_, _, rx)) => rx.recv().await,
                    None => None,
                };
                let Some(m) = msg else {
                    // The session ended: resubscribe from where we are. Only drops in a row,
                    // with nothing received between them, end the follow.
                    st.sub = None;
                    st.drops += 1;
                    if st.drops > 20 {
                        st.done = true;
                        let e = InstantError::SessionLost(
                            "too many dropped sessions while following".into(),
                        )
                        .into_core(&op);
                        return Some((Err(e), st));
                    }
                    continue;
                };
                st.drops = 0;
                let client = st.sink.inner.client.clone();
                match apply_message(&client, &mut st.dec, &m, &op).await {
                    Ok(end) => {
                        let from = st.from;
                        st.buffered
                            .extend(st.dec.take().into_iter().filter(|e| from.includes(e)));
                        if end.is_some() {
                            st.done = true;
                        }
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
        })))
    }

    async fn status(&self, process_id: &ProcessId) -> Result<Option<LogStatus>> {
        let client_id = process_id.stream_client_id();
        let Some(row) = self.lookup(&client_id).await? else {
            return Ok(None);
        };
        let snap = self.snapshot(&client_id, 0, false, row.done).await?;
        let state = snap.state.unwrap_or_else(|| row_state(&row));
        Ok(Some(LogStatus {
            stream_id: row.id,
            writer: self.writer_for(process_id, &client_id, &state).await?,
            state,
            entries: snap.entries.len() as u64,
            bytes: snap.end,
        }))
    }

    async fn abandon(&self, process_id: &ProcessId, reason: &str) -> Result<()> {
        let client_id = process_id.stream_client_id();
        let key = self.inner.key(&client_id);
        let local = {
            let g = lock(local_writers());
            g.get(&key)
                .map(|w| (w.alive.strong_count() > 0, w.orphan.clone()))
        };
        match local {
            Some((true, _)) => {
                return Err(Error::Conflict {
                    code: "sandbox_process_stream_writer_alive".into(),
                    message: format!("the writer of process {process_id} is still alive"),
                })
            }
            Some((false, Some(core))) => {
                let mut c = core.lock().await;
                c.finish(Some(reason)).await?;
                lock(local_writers()).remove(&key);
                return Ok(());
            }
            _ => {}
        }
        // A writer of another OS process: refused while its lease is held, else mark the
        // `$streams` entity itself.
        if self.lease(process_id).await? == WriterLiveness::Alive {
            return Err(Error::Conflict {
                code: "sandbox_process_stream_writer_alive".into(),
                message: format!("the writer of process {process_id} holds its lease"),
            });
        }
        let row = self
            .lookup(&client_id)
            .await?
            .ok_or_else(|| Error::not_found(Missing::Log, process_id.to_string()))?;
        if row.done {
            return Ok(());
        }
        let step = json!(["update", "$streams", row.id, {"done": true, "abortReason": reason}]);
        self.inner.client.transact(vec![step], Op::Transact).await?;
        Ok(())
    }
}

fn row_state(row: &StreamRow) -> LogState {
    match (&row.abort_reason, row.done) {
        (Some(r), true) => LogState::Aborted { reason: r.clone() },
        (None, true) => LogState::Closed,
        _ => LogState::Open,
    }
}

impl InstantSink {
    async fn writer_for(
        &self,
        process_id: &ProcessId,
        client_id: &str,
        state: &LogState,
    ) -> Result<WriterLiveness> {
        if state.is_finished() {
            return Ok(WriterLiveness::Gone);
        }
        match self.local_liveness(client_id) {
            Some(l) => Ok(l),
            None => self.lease(process_id).await,
        }
    }

    async fn start_writer(&self, client_id: &str) -> Result<(Arc<Session>, String, String)> {
        let op = Op::Stream(client_id.to_string());
        let token = uuid::Uuid::new_v4().to_string();
        let timeout = self.inner.client.config.sse_timeout;
        let policy = self.inner.client.config.retry.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let session = self.inner.session().await?;
            let reply = session
                .request(
                    json!({"op": "start-stream", "client-id": client_id, "reconnect-token": token}),
                    timeout,
                )
                .await;
            match reply {
                Ok(r) if r["op"] == "error" => return Err(start_refused(client_id, &r)),
                Ok(r) => {
                    let offset = r["offset"].as_u64().unwrap_or(0);
                    if offset != 0 {
                        return Err(writer_exists(client_id, "the stream already holds data"));
                    }
                    let sid = r["stream-id"].as_str().map(String::from).ok_or_else(|| {
                        InstantError::Malformed("start-stream-ok without stream-id".into())
                            .into_core(&op)
                    })?;
                    return Ok((session, sid, token));
                }
                Err(e) => {
                    let err = e.into_core(&op);
                    if !err.is_retryable() || attempt >= policy.max_attempts {
                        return Err(err);
                    }
                    tokio::time::sleep(policy.backoff(&err, attempt)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64) -> String {
        let c = ProcessChunk::new(
            seq,
            sandbox_core::ChunkType::Stdout,
            Default::default(),
            Default::default(),
            None,
        );
        c.encode()
    }

    #[tokio::test]
    async fn debug_output_of_a_sink_with_an_open_writer_shows_no_credential() {
        let token = "c1d2e3f4-0000-4000-8000-00000000beef";
        let emu = sandbox_testkit::instant::InstantEmulator::start("app", token).await;
        let config = crate::InstantConfig::new("app", token, &emu.base_url()).unwrap();
        let sink = InstantSink::new(InstantClient::new(config).unwrap());
        let mut w = sink.open_writer(&ProcessId::new()).await.unwrap();
        let sse_token = emu
            .requests()
            .iter()
            .find_map(|r| r.body["sse_token"].as_str().map(String::from))
            .expect("a push carried the session's token");
        let shown = format!("{sink:?}");
        assert!(
            shown.contains("session_id"),
            "the session is shown: {shown}"
        );
        assert!(!shown.contains(&sse_token), "{shown}");
        assert!(!shown.contains(token), "{shown}");
        w.close().await.unwrap();
    }

    #[test]
    fn flushed_offsets_inside_a_character_or_out_of_range_keep_the_bytes() {
        let mut retained = "aé€b".to_string();
        let mut start = 100;
        forget_flushed(&mut retained, &mut start, 102);
        assert_eq!((retained.as_str(), start), ("aé€b", 100), "inside é");
        forget_flushed(&mut retained, &mut start, 99);
        forget_flushed(&mut retained, &mut start, 200);
        assert_eq!((retained.as_str(), start), ("aé€b", 100));
        forget_flushed(&mut retained, &mut start, 103);
        assert_eq!((retained.as_str(), start), ("€b", 103));
        forget_flushed(&mut retained, &mut start, 107);
        assert_eq!((retained.as_str(), start), ("", 107));
    }

    #[test]
    fn decoder_joins_split_lines_and_skips_duplicates() {
        let all = format!("{}{}", line(1), line(2));
        let b = all.as_bytes();
        let mut d = LineDecoder::new(0, false);
        d.feed(0, &b[..10]).unwrap();
        assert!(d.take().is_empty());
        d.feed(0, &b[..30]).unwrap();
        d.feed(30, &b[30..]).unwrap();
        let got = d.take();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(got[1].offset, line(1).len() as u64);
        assert!(
            d.feed(b.len() as u64 + 5, b"x").is_err(),
            "a gap is an error"
        );
    }

    #[test]
    fn decoder_started_mid_line_drops_the_partial_line() {
        let all = format!("{}{}", line(1), line(2));
        let mut d = LineDecoder::new(5, true);
        d.feed(5, &all.as_bytes()[5..]).unwrap();
        assert_eq!(d.take().iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
        let l1 = line(1).len() as u64;
        let mut d = LineDecoder::new(l1, true);
        d.feed(l1, &all.as_bytes()[l1 as usize..]).unwrap();
        assert_eq!(
            d.take().iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2],
            "a start at a line start keeps it"
        );
    }
}
