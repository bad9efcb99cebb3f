//! In-memory `RecordStore` and `StreamSink`: real implementations for tests and for callers
//! that need no durability. Registered as store `memory` (`memory:`), a fresh empty store per
//! open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::watch;

use crate::config::Env;
use crate::error::{Error, Missing, Result};
use crate::id::{ProcessId, SandboxId};
use crate::record::{
    ProcessFilter, ProcessPatch, ProcessRecord, SandboxFilter, SandboxPatch, SandboxRecord,
};
use crate::registry::StoreBackend;
use crate::store::RecordStore;
use crate::stream::{
    LogAppender, LogEntry, LogPage, LogState, LogStatus, ReadFrom, StreamSink, WriterLiveness,
};

const NAME: &str = "memory";

/// Records in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Records>,
}

#[derive(Debug, Default)]
struct Records {
    sandboxes: HashMap<SandboxId, SandboxRecord>,
    processes: HashMap<ProcessId, ProcessRecord>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn conflict(what: &str, id: impl std::fmt::Display) -> Error {
    Error::Conflict {
        code: format!("{what}_exists"),
        message: format!("{what} {id} already exists"),
    }
}

#[async_trait]
impl RecordStore for MemoryStore {
    fn name(&self) -> &str {
        NAME
    }

    async fn insert_sandbox(&self, record: &SandboxRecord) -> Result<()> {
        let mut g = self.lock();
        if g.sandboxes.contains_key(&record.id) {
            return Err(conflict("sandbox", record.id));
        }
        g.sandboxes.insert(record.id, record.clone());
        Ok(())
    }

    async fn patch_sandbox(&self, id: &SandboxId, patch: &SandboxPatch) -> Result<()> {
        let mut g = self.lock();
        let r = g
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| Error::not_found(Missing::Sandbox, id.to_string()))?;
        r.apply(patch);
        Ok(())
    }

    async fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>> {
        Ok(self.lock().sandboxes.get(id).cloned())
    }

    async fn list_sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<SandboxRecord>> {
        let g = self.lock();
        let mut v: Vec<_> = g
            .sandboxes
            .values()
            .filter(|r| filter.matches(r))
            .cloned()
            .collect();
        v.sort_by_key(|r| (r.created_at, r.id));
        if let Some(n) = filter.limit {
            v.truncate(n);
        }
        Ok(v)
    }

    async fn insert_process(&self, record: &ProcessRecord) -> Result<()> {
        let mut g = self.lock();
        if g.processes.contains_key(&record.id) {
            return Err(conflict("sandbox_process", record.id));
        }
        if !g.sandboxes.contains_key(&record.sandbox_id) {
            return Err(Error::not_found(
                Missing::Sandbox,
                record.sandbox_id.to_string(),
            ));
        }
        g.processes.insert(record.id, record.clone());
        Ok(())
    }

    async fn patch_process(&self, id: &ProcessId, patch: &ProcessPatch) -> Result<()> {
        let mut g = self.lock();
        let r = g
            .processes
            .get_mut(id)
            .ok_or_else(|| Error::not_found(Missing::Process, id.to_string()))?;
        r.apply(patch);
        Ok(())
    }

    async fn get_process(&self, id: &ProcessId) -> Result<Option<ProcessRecord>> {
        Ok(self.lock().processes.get(id).cloned())
    }

    async fn list_processes(&self, filter: &ProcessFilter) -> Result<Vec<ProcessRecord>> {
        let g = self.lock();
        let mut v: Vec<_> = g
            .processes
            .values()
            .filter(|r| filter.matches(r))
            .cloned()
            .collect();
        v.sort_by_key(|r| (r.started_at, r.id));
        if let Some(n) = filter.limit {
            v.truncate(n);
        }
        Ok(v)
    }
}

/// Process logs in memory. Followers are woken on every append.
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    logs: Arc<Mutex<HashMap<ProcessId, Log>>>,
}

#[derive(Debug)]
struct Log {
    stream_id: String,
    entries: Vec<LogEntry>,
    bytes: u64,
    state: LogState,
    writer: Weak<()>,
    changed: watch::Sender<u64>,
}

impl Log {
    fn status(&self) -> LogStatus {
        LogStatus {
            stream_id: self.stream_id.clone(),
            state: self.state.clone(),
            entries: self.entries.len() as u64,
            bytes: self.bytes,
            writer: if self.writer.strong_count() > 0 {
                WriterLiveness::Alive
            } else {
                WriterLiveness::Gone
            },
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProcessId, Log>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn no_log(id: &ProcessId) -> Error {
    Error::not_found(Missing::Log, id.to_string())
}

struct MemoryAppender {
    sink: MemorySink,
    process_id: ProcessId,
    stream_id: String,
    _token: Arc<()>,
    done: bool,
}

#[async_trait]
impl LogAppender for MemoryAppender {
    fn stream_id(&self) -> &str {
        &self.stream_id
    }

    async fn append(&mut self, entries: &[LogEntry]) -> Result<()> {
        if self.done {
            return Err(Error::Conflict {
                code: "sandbox_process_stream_closed".into(),
                message: format!("the log of process {} is closed", self.process_id),
            });
        }
        let mut g = self.sink.lock();
        let log = g
            .get_mut(&self.process_id)
            .ok_or_else(|| no_log(&self.process_id))?;
        // Check the whole batch before storing any of it.
        let (_, off) =
            crate::stream::check_continuity(entries, log.entries.len() as u64 + 1, log.bytes)?;
        log.entries.extend_from_slice(entries);
        log.bytes = off;
        log.bump();
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.finish(LogState::Closed)
    }

    async fn abort(&mut self, reason: &str) -> Result<()> {
        self.finish(LogState::Aborted {
            reason: reason.to_string(),
        })
    }
}

impl MemoryAppender {
    fn finish(&mut self, state: LogState) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut g = self.sink.lock();
        let log = g
            .get_mut(&self.process_id)
            .ok_or_else(|| no_log(&self.process_id))?;
        log.state = state;
        log.writer = Weak::new();
        log.bump();
        Ok(())
    }
}

#[async_trait]
impl StreamSink for MemorySink {
    fn name(&self) -> &str {
        NAME
    }

    async fn open_writer(&self, process_id: &ProcessId) -> Result<Box<dyn LogAppender>> {
        let mut g = self.lock();
        if g.contains_key(process_id) {
            return Err(Error::Conflict {
                code: "sandbox_process_stream_writer_exists".into(),
                message: format!(
                    "the log of process {process_id} already has a writer; a log has exactly one"
                ),
            });
        }
        let token = Arc::new(());
        let stream_id = process_id.stream_client_id();
        g.insert(
            *process_id,
            Log {
                stream_id: stream_id.clone(),
                entries: Vec::new(),
                bytes: 0,
                state: LogState::Open,
                writer: Arc::downgrade(&token),
                changed: watch::channel(0).0,
            },
        );
        Ok(Box::new(MemoryAppender {
            sink: self.clone(),
            process_id: *process_id,
            stream_id,
            _token: token,
            done: false,
        }))
    }

    async fn read(&self, process_id: &ProcessId, from: ReadFrom, max: usize) -> Result<LogPage> {
        let g = self.lock();
        let log = g.get(process_id).ok_or_else(|| no_log(process_id))?;
        let entries = log
            .entries
            .iter()
            .filter(|e| from.includes(e))
            .take(max)
            .cloned()
            .collect();
        Ok(LogPage {
            entries,
            status: log.status(),
        })
    }

    async fn follow(
        &self,
        process_id: &ProcessId,
        from: ReadFrom,
    ) -> Result<BoxStream<'static, Result<LogEntry>>> {
        let rx = {
            let g = self.lock();
            g.get(process_id)
                .ok_or_else(|| no_log(process_id))?
                .changed
                .subscribe()
        };
        struct St {
            sink: MemorySink,
            id: ProcessId,
            from: ReadFrom,
            rx: watch::Receiver<u64>,
            buf: std::collections::VecDeque<LogEntry>,
            done: bool,
        }
        let st = St {
            sink: self.clone(),
            id: *process_id,
            from,
            rx,
            buf: Default::default(),
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
                let finished = {
                    let g = st.sink.lock();
                    match g.get(&st.id) {
                        Some(log) => {
                            let from = st.from;
                            st.buf
                                .extend(log.entries.iter().filter(|e| from.includes(e)).cloned());
                            Some(log.state.is_finished())
                        }
                        None => None,
                    }
                };
                let Some(finished) = finished else {
                    st.done = true;
                    let e = no_log(&st.id);
                    return Some((Err(e), st));
                };
                if !st.buf.is_empty() {
                    continue;
                }
                if finished {
                    st.done = true;
                    continue;
                }
                if st.rx.changed().await.is_err() {
                    st.done = true;
                }
            }
        })))
    }

    async fn status(&self, process_id: &ProcessId) -> Result<Option<LogStatus>> {
        Ok(self.lock().get(process_id).map(Log::status))
    }

    async fn abandon(&self, process_id: &ProcessId, reason: &str) -> Result<()> {
        let mut g = self.lock();
        let log = g.get_mut(process_id).ok_or_else(|| no_log(process_id))?;
        if log.state.is_finished() {
            return Ok(());
        }
        if log.writer.strong_count() > 0 {
            return Err(Error::Conflict {
                code: "sandbox_process_stream_writer_alive".into(),
                message: format!("the writer of process {process_id} is still alive"),
            });
        }
        log.state = LogState::Aborted {
            reason: reason.to_string(),
        };
        log.bump();
        Ok(())
    }
}

/// A fresh memory store and sink.
pub fn memory_backend() -> StoreBackend {
    StoreBackend {
        records: Arc::new(MemoryStore::new()),
        logs: Arc::new(MemorySink::new()),
        location: "memory".into(),
    }
}

fn open_memory(_url: &str, _env: &Env) -> Result<StoreBackend> {
    Ok(memory_backend())
}

crate::register_store!("memory", open_memory);
