//! The `StreamSink` contract: one durable, append-only, resumable log per process.
//!
//! A log is a sequence of NDJSON lines ([`crate::protocol::ProcessChunk`]). Exactly one writer
//! per process: [`StreamSink::open_writer`] refuses a second one, in this OS process or another.
//! The core [`ChunkWriter`] assigns `seq` (1, 2, 3, ...) and byte offsets; sinks store what
//! they are given and check that `seq` and offsets continue without gap.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::id::{ProcessId, SandboxId};
use crate::protocol::{ChunkType, ProcessChunk};

/// One stored line of a log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// 1-based sequence number.
    pub seq: u64,
    /// UTF-8 byte offset of the line's first byte in the log.
    pub offset: u64,
    /// The NDJSON line, including its trailing `\n`.
    pub line: String,
}

impl LogEntry {
    /// Byte offset just past this line.
    pub fn end(&self) -> u64 {
        self.offset + self.line.len() as u64
    }

    /// Parses the line.
    ///
    /// # Errors
    /// [`Error::Protocol`] with the upstream codes for a malformed line.
    pub fn chunk(&self) -> Result<ProcessChunk> {
        ProcessChunk::decode(&self.line)
    }
}

/// Where to start reading a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// Entries with `seq >= n` (`Seq(1)` or `Seq(0)` is the whole log).
    Seq(u64),
    /// Entries whose first byte is at or after this byte offset.
    Offset(u64),
}

impl ReadFrom {
    /// The whole log.
    pub const START: ReadFrom = ReadFrom::Seq(1);

    /// Whether `entry` is at or after this position.
    pub fn includes(&self, entry: &LogEntry) -> bool {
        match *self {
            ReadFrom::Seq(n) => entry.seq >= n,
            ReadFrom::Offset(o) => entry.offset >= o,
        }
    }
}

/// Whether a log still accepts appends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LogState {
    /// A writer may append.
    Open,
    /// Closed normally.
    Closed,
    /// Ended early, with a reason.
    Aborted {
        /// Why.
        reason: String,
    },
}

impl LogState {
    /// Closed or aborted.
    pub fn is_finished(&self) -> bool {
        !matches!(self, LogState::Open)
    }
}

/// Whether the writer of an open log is still alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriterLiveness {
    /// A writer holds the log and is alive.
    Alive,
    /// No live writer holds the open log: whoever wrote it died or dropped it unclosed.
    Gone,
    /// The sink cannot tell (e.g. a remote sink with no lease information).
    Unknown,
}

/// What a sink knows of one log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStatus {
    /// Id of the log in the sink (`streamId`).
    pub stream_id: String,
    /// Open, closed or aborted.
    pub state: LogState,
    /// Number of entries.
    pub entries: u64,
    /// Total bytes.
    pub bytes: u64,
    /// Liveness of the writer (meaningful while `state` is open).
    pub writer: WriterLiveness,
}

/// A page of a log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogPage {
    /// Entries in order.
    pub entries: Vec<LogEntry>,
    /// The log's status when the page was read.
    pub status: LogStatus,
}

/// Checks that `entries` continue a log whose next entry is `next_seq` at byte `next_offset`,
/// without gap; returns the log's next seq and offset after them. Sinks call this on a whole
/// batch before storing any of it.
///
/// # Errors
/// `sandbox_process_stream_gap` naming the first entry out of place.
pub fn check_continuity(
    entries: &[LogEntry],
    next_seq: u64,
    next_offset: u64,
) -> Result<(u64, u64)> {
    let (mut seq, mut off) = (next_seq, next_offset);
    for e in entries {
        if e.seq != seq || e.offset != off {
            return Err(Error::protocol(
                "sandbox_process_stream_gap",
                format!(
                    "append out of order: got seq {} at offset {}, expected seq {seq} at offset {off}",
                    e.seq, e.offset
                ),
            ));
        }
        seq += 1;
        off = e.end();
    }
    Ok((seq, off))
}

/// The sink's half of a writer: stores entries the core [`ChunkWriter`] prepared.
#[async_trait]
pub trait LogAppender: Send {
    /// Id of the log (`streamId`).
    fn stream_id(&self) -> &str;

    /// Appends entries. Their `seq` and `offset` continue the log without gap; a sink refuses
    /// anything else with [`Error::Protocol`].
    ///
    /// When this returns `Ok`, the entries are acknowledged: a sink that batches makes them
    /// durable no later than [`LogAppender::flush`].
    async fn append(&mut self, entries: &[LogEntry]) -> Result<()>;

    /// Makes every appended entry durable.
    async fn flush(&mut self) -> Result<()>;

    /// Flushes and closes the log; the writer is released.
    async fn close(&mut self) -> Result<()>;

    /// Flushes and marks the log aborted with `reason`; the writer is released.
    async fn abort(&mut self, reason: &str) -> Result<()>;
}

/// Durable per-process logs.
#[async_trait]
pub trait StreamSink: Send + Sync {
    /// Sink name for messages.
    fn name(&self) -> &str;

    /// Creates the log of `process_id` and takes its single writer.
    ///
    /// # Errors
    /// [`Error::Conflict`] with code `sandbox_process_stream_writer_exists` when the log
    /// already exists (a writer holds it, or it was written before): a log has one writer,
    /// once.
    async fn open_writer(&self, process_id: &ProcessId) -> Result<Box<dyn LogAppender>>;

    /// Reads up to `max` entries from `from`.
    ///
    /// # Errors
    /// [`Error::NotFound`] (`Missing::Log`) when there is no such log.
    async fn read(&self, process_id: &ProcessId, from: ReadFrom, max: usize) -> Result<LogPage>;

    /// Streams entries from `from`, waiting for new ones, until the log is closed or aborted;
    /// the stream then ends.
    ///
    /// # Errors
    /// [`Error::NotFound`] when there is no such log.
    async fn follow(
        &self,
        process_id: &ProcessId,
        from: ReadFrom,
    ) -> Result<BoxStream<'static, Result<LogEntry>>>;

    /// What the sink knows of a log, or `None`.
    async fn status(&self, process_id: &ProcessId) -> Result<Option<LogStatus>>;

    /// Marks an open log whose writer is gone as aborted with `reason` (used by `reconcile`).
    ///
    /// # Errors
    /// [`Error::Conflict`] when a live writer still holds the log.
    async fn abandon(&self, process_id: &ProcessId, reason: &str) -> Result<()>;
}

/// The single writer of a process log: assigns `seq`, `at` and byte offsets, encodes chunks as
/// NDJSON and hands them to the sink.
pub struct ChunkWriter {
    appender: Box<dyn LogAppender>,
    sandbox_id: SandboxId,
    process_id: ProcessId,
    next_seq: u64,
    next_offset: u64,
    finished: bool,
}

impl fmt::Debug for ChunkWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkWriter")
            .field("process_id", &self.process_id)
            .field("stream_id", &self.appender.stream_id())
            .field("next_seq", &self.next_seq)
            .field("next_offset", &self.next_offset)
            .finish()
    }
}

impl ChunkWriter {
    /// Opens the single writer of `process_id`'s log.
    ///
    /// # Errors
    /// See [`StreamSink::open_writer`].
    pub async fn open(
        sink: &dyn StreamSink,
        sandbox_id: SandboxId,
        process_id: ProcessId,
    ) -> Result<Self> {
        let appender = sink.open_writer(&process_id).await?;
        Ok(ChunkWriter {
            appender,
            sandbox_id,
            process_id,
            next_seq: 1,
            next_offset: 0,
            finished: false,
        })
    }

    /// Id of the log in the sink.
    pub fn stream_id(&self) -> &str {
        self.appender.stream_id()
    }

    /// Sequence number of the last chunk written (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.next_offset
    }

    /// Builds, encodes and appends one chunk; returns its `seq`.
    ///
    /// # Errors
    /// The sink's error; the chunk is then not acknowledged and `seq` is not consumed.
    pub async fn append(
        &mut self,
        kind: ChunkType,
        data: Option<Map<String, Value>>,
    ) -> Result<u64> {
        if self.finished {
            return Err(Error::Conflict {
                code: "sandbox_process_stream_closed".into(),
                message: format!("the log of process {} is already closed", self.process_id),
            });
        }
        let chunk = ProcessChunk::new(self.next_seq, kind, self.sandbox_id, self.process_id, data);
        let line = chunk.encode();
        let entry = LogEntry {
            seq: self.next_seq,
            offset: self.next_offset,
            line,
        };
        self.appender.append(std::slice::from_ref(&entry)).await?;
        self.next_seq += 1;
        self.next_offset = entry.end();
        Ok(entry.seq)
    }

    /// Makes every appended chunk durable.
    pub async fn flush(&mut self) -> Result<()> {
        self.appender.flush().await
    }

    /// Closes the log.
    pub async fn close(mut self) -> Result<()> {
        self.finished = true;
        self.appender.close().await
    }

    /// Aborts the log with a reason.
    pub async fn abort(mut self, reason: &str) -> Result<()> {
        self.finished = true;
        self.appender.abort(reason).await
    }
}

/// Follows a log by polling [`StreamSink::read`] with backoff (from `min` up to `max` between
/// empty polls) until the log is finished. Sinks without push notification use this for
/// [`StreamSink::follow`].
pub fn poll_follow<S>(
    sink: S,
    process_id: ProcessId,
    from: ReadFrom,
    min: Duration,
    max: Duration,
) -> BoxStream<'static, Result<LogEntry>>
where
    S: std::ops::Deref + Send + Sync + 'static,
    S::Target: StreamSink,
{
    struct State<S> {
        sink: S,
        from: ReadFrom,
        buffered: std::collections::VecDeque<LogEntry>,
        delay: Duration,
        done: bool,
    }
    let state = State {
        sink,
        from,
        buffered: Default::default(),
        delay: min,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(e) = st.buffered.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            match st.sink.read(&process_id, st.from, 1024).await {
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                Ok(page) => {
                    if let Some(last) = page.entries.last() {
                        st.from = ReadFrom::Seq(last.seq + 1);
                        st.delay = min;
                        st.buffered.extend(page.entries);
                        continue;
                    }
                    if page.status.state.is_finished() {
                        st.done = true;
                        continue;
                    }
                    tokio::time::sleep(st.delay).await;
                    st.delay = (st.delay * 2).min(max);
                }
            }
        }
    }))
}
