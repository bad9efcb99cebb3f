//! `SandboxService`: the orchestration callers use.
//!
//! It ties a record store, a stream sink and providers together: every sandbox and process is
//! a record, every recorded process's output is a durable log written live while it runs.
//! Provider handles and records are cached per service, so a warm operation costs one
//! provider call.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::bootstrap::{BootstrapContext, Bootstrapper};
use crate::config::{Env, SandboxConfig};
use crate::error::{Error, Missing, Result};
use crate::id::{ProcessId, SandboxId};
use crate::paths::confine;
use crate::protocol::{output_data, ChunkType, OutputDecoder, ProcessChunk, Transcript};
use crate::provider::{
    Capabilities, Checkpoint, CreateRequest, ExecControl, ExecEvent, ExecRequest, ExitStatus,
    FileWrite, Provider, ResumeRequest, SandboxHandle, StopMode,
};
use crate::record::{
    now_ms, ProcessFilter, ProcessKind, ProcessMode, ProcessPatch, ProcessRecord, ProcessStatus,
    SandboxFilter, SandboxPatch, SandboxRecord, SandboxStatus,
};
use crate::registry::{self, StoreBackend};
use crate::shell::validate_env;
use crate::store::RecordStore;
use crate::stream::{ChunkWriter, LogEntry, LogPage, ReadFrom, StreamSink, WriterLiveness};

/// Reason recorded on processes still open when their sandbox stops.
pub const REASON_SANDBOX_STOPPED: &str = "sandbox_stopped";
/// Reason recorded on processes whose log writer died.
pub const REASON_WRITER_LOST: &str = "writer_lost";
/// Reason recorded on processes of a sandbox the provider no longer has.
pub const REASON_SANDBOX_GONE: &str = "sandbox_gone";

/// How live output is grouped into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalescing {
    /// A chunk is written once this many bytes are buffered.
    pub max_bytes: usize,
    /// A chunk is written at most this long after its first byte arrived.
    pub max_delay: Duration,
}

impl Default for Coalescing {
    fn default() -> Self {
        Coalescing {
            max_bytes: 64 * 1024,
            max_delay: Duration::from_millis(25),
        }
    }
}

/// A recorded command: what to run and how to file it.
#[derive(Debug, Clone, Default)]
pub struct CommandSpec {
    /// The command.
    pub request: ExecRequest,
    /// Kind (default `command`).
    pub kind: Option<ProcessKind>,
    /// Mode (default `foreground`).
    pub mode: Option<ProcessMode>,
    /// Caller metadata stored on the record.
    pub metadata: Option<Map<String, Value>>,
}

impl CommandSpec {
    /// A `command`/`foreground` process running `request`.
    pub fn new(request: ExecRequest) -> Self {
        CommandSpec {
            request,
            ..Default::default()
        }
    }
}

/// A process run elsewhere whose output is mirrored into a log.
#[derive(Debug, Clone, Default)]
pub struct ObservedSpec {
    /// argv of the observed command.
    pub argv: Vec<String>,
    /// Its working directory.
    pub cwd: Option<String>,
    /// Its environment keys (values are not stored).
    pub env_keys: Vec<String>,
    /// Kind.
    pub kind: Option<ProcessKind>,
    /// Mode.
    pub mode: Option<ProcessMode>,
    /// The provider's id for it.
    pub external_process_id: Option<String>,
    /// Caller metadata.
    pub metadata: Option<Map<String, Value>>,
}

/// How an observed process ended.
#[derive(Debug, Clone, Default)]
pub struct ObservedFinish {
    /// Final status; default `exited` for code 0 or none, else `failed`.
    pub status: Option<ProcessStatus>,
    /// Exit code.
    pub exit_code: Option<i64>,
    /// Error text, written as an `error` chunk and `streamAbortReason`.
    pub error_text: Option<String>,
    /// Metadata merged into the record's.
    pub metadata: Option<Map<String, Value>>,
}

impl ObservedFinish {
    /// The process exited with `code` (status from the code: `exited` for 0, else `failed`).
    pub fn exit(code: i64) -> Self {
        ObservedFinish {
            exit_code: Some(code),
            ..Default::default()
        }
    }
}

/// Result of a buffered [`SandboxService::run_command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// How it ended.
    pub exit: ExitStatus,
    /// All of stdout.
    pub stdout: Bytes,
    /// All of stderr.
    pub stderr: Bytes,
}

/// How a recorded process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessOutcome {
    /// The process.
    pub process_id: ProcessId,
    /// Final status.
    pub status: ProcessStatus,
    /// Exit code, when it exited.
    pub exit_code: Option<i64>,
    /// Signal, when one ended it.
    pub signal: Option<String>,
    /// Why it failed, when the service or provider failed.
    pub error: Option<String>,
}

/// What [`SandboxService::reconcile`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileReport {
    /// Processes marked `lost`, with the reason.
    pub lost: Vec<(ProcessId, String)>,
    /// Processes whose log had ended but whose record had not: finalised from the log.
    pub finalized: Vec<ProcessId>,
    /// Sandboxes the provider no longer has, now `shutdown`.
    pub gone: Vec<SandboxId>,
    /// Processes left alone because their writer is alive (or cannot be judged).
    pub alive: Vec<ProcessId>,
    /// Things that could not be checked (a provider without credentials, ...).
    pub skipped: Vec<String>,
    /// Sandboxes left `creating` by a create that stopped (its process died) more than the
    /// grace period ago, now `error` with `create_interrupted`.
    #[serde(default)]
    pub interrupted: Vec<SandboxId>,
}

/// How long a sandbox may stay `creating` before `reconcile` takes its create for dead.
pub const CREATE_GRACE: Duration = Duration::from_secs(15 * 60);

struct Running {
    sandbox_id: SandboxId,
    provider: String,
    control: Option<Arc<dyn ExecControl>>,
    killed: Arc<AtomicBool>,
    done: watch::Receiver<Option<ProcessOutcome>>,
}

struct Inner {
    records: Arc<dyn RecordStore>,
    logs: Arc<dyn StreamSink>,
    env: Env,
    defaults: SandboxConfig,
    use_registry: bool,
    providers: Mutex<HashMap<String, Arc<dyn Provider>>>,
    bootstrappers: Vec<Arc<dyn Bootstrapper>>,
    handles: Mutex<HashMap<SandboxId, Arc<dyn SandboxHandle>>>,
    /// Capabilities by provider name, from the provider instance that made or resumed a
    /// sandbox (so checking them never builds another provider).
    capabilities: Mutex<HashMap<String, Capabilities>>,
    /// Sandboxes this service is creating right now.
    creating: Mutex<std::collections::HashSet<SandboxId>>,
    create_grace: Duration,
    cache: Mutex<HashMap<SandboxId, SandboxRecord>>,
    running: Mutex<HashMap<ProcessId, Running>>,
    observed: Mutex<HashMap<ProcessId, Arc<tokio::sync::Mutex<Option<ChunkWriter>>>>>,
    coalescing: Coalescing,
}

/// The sandbox service. Cheap to clone; clones share caches.
#[derive(Clone)]
pub struct SandboxService {
    inner: Arc<Inner>,
}

impl fmt::Debug for SandboxService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxService")
            .field("records", &self.inner.records.name())
            .field("logs", &self.inner.logs.name())
            .finish()
    }
}

/// Builds a [`SandboxService`].
pub struct ServiceBuilder {
    records: Option<Arc<dyn RecordStore>>,
    logs: Option<Arc<dyn StreamSink>>,
    env: Env,
    defaults: SandboxConfig,
    use_registry: bool,
    providers: HashMap<String, Arc<dyn Provider>>,
    bootstrappers: Option<Vec<Arc<dyn Bootstrapper>>>,
    coalescing: Coalescing,
    create_grace: Duration,
}

impl fmt::Debug for ServiceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBuilder")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("use_registry", &self.use_registry)
            .finish()
    }
}

impl Default for ServiceBuilder {
    fn default() -> Self {
        ServiceBuilder {
            records: None,
            logs: None,
            env: Env::process(),
            defaults: SandboxConfig::default(),
            use_registry: true,
            providers: HashMap::new(),
            bootstrappers: None,
            coalescing: Coalescing::default(),
            create_grace: CREATE_GRACE,
        }
    }
}

impl ServiceBuilder {
    /// Uses a store backend (records and logs).
    pub fn store(mut self, backend: StoreBackend) -> Self {
        self.records = Some(backend.records);
        self.logs = Some(backend.logs);
        self
    }

    /// Uses this record store.
    pub fn records(mut self, records: Arc<dyn RecordStore>) -> Self {
        self.records = Some(records);
        self
    }

    /// Uses this stream sink.
    pub fn logs(mut self, logs: Arc<dyn StreamSink>) -> Self {
        self.logs = Some(logs);
        self
    }

    /// Uses this provider for its name (instead of the registry's).
    pub fn provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.providers.insert(provider.name().to_string(), provider);
        self
    }

    /// Environment used to build providers and resolve the provider name.
    pub fn env(mut self, env: Env) -> Self {
        self.env = env;
        self
    }

    /// Config used to build providers for existing sandboxes (resume, stop, reconcile).
    pub fn config(mut self, config: SandboxConfig) -> Self {
        self.defaults = config;
        self
    }

    /// Whether providers missing from [`ServiceBuilder::provider`] come from the registry
    /// (default true).
    pub fn use_registry(mut self, yes: bool) -> Self {
        self.use_registry = yes;
        self
    }

    /// Uses exactly these bootstrappers (default: the registered ones).
    pub fn bootstrappers(mut self, list: Vec<Arc<dyn Bootstrapper>>) -> Self {
        self.bootstrappers = Some(list);
        self
    }

    /// How long a sandbox may stay `creating` before `reconcile` takes its create for dead
    /// (default [`CREATE_GRACE`]).
    pub fn create_grace(mut self, grace: Duration) -> Self {
        self.create_grace = grace;
        self
    }

    /// How live output is grouped into chunks.
    pub fn coalescing(mut self, c: Coalescing) -> Self {
        self.coalescing = c;
        self
    }

    /// Builds the service.
    ///
    /// # Errors
    /// No store given; a duplicate bootstrapper registration.
    pub fn build(self) -> Result<SandboxService> {
        let (Some(records), Some(logs)) = (self.records, self.logs) else {
            return Err(Error::invalid(
                "sandbox_service_store_required",
                "the service needs a record store and a stream sink",
            ));
        };
        let bootstrappers = match self.bootstrappers {
            Some(b) => b,
            None => registry::bootstrappers()?
                .into_iter()
                .map(|(_, b)| b)
                .collect(),
        };
        Ok(SandboxService {
            inner: Arc::new(Inner {
                records,
                logs,
                env: self.env,
                defaults: self.defaults,
                use_registry: self.use_registry,
                providers: Mutex::new(self.providers),
                bootstrappers,
                handles: Mutex::new(HashMap::new()),
                capabilities: Mutex::new(HashMap::new()),
                creating: Mutex::new(Default::default()),
                create_grace: self.create_grace,
                cache: Mutex::new(HashMap::new()),
                running: Mutex::new(HashMap::new()),
                observed: Mutex::new(HashMap::new()),
                coalescing: self.coalescing,
            }),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn merge_params(base: Option<&Map<String, Value>>, extra: Map<String, Value>) -> Value {
    let mut m = base.cloned().unwrap_or_default();
    m.extend(extra);
    Value::Object(m)
}

fn redact_env(keys: impl IntoIterator<Item = String>) -> Option<Value> {
    let m: Map<String, Value> = keys
        .into_iter()
        .map(|k| (k, Value::String("[redacted]".into())))
        .collect();
    (!m.is_empty()).then_some(Value::Object(m))
}

impl SandboxService {
    /// A builder.
    pub fn builder() -> ServiceBuilder {
        ServiceBuilder::default()
    }

    /// A service over a store backend, with providers and bootstrappers from the registry.
    ///
    /// # Errors
    /// See [`ServiceBuilder::build`].
    pub fn new(backend: StoreBackend) -> Result<Self> {
        Self::builder().store(backend).build()
    }

    /// The record store.
    pub fn records(&self) -> &Arc<dyn RecordStore> {
        &self.inner.records
    }

    /// The stream sink.
    pub fn logs(&self) -> &Arc<dyn StreamSink> {
        &self.inner.logs
    }

    /// The provider called `name`: given to the builder, else built from the registry with the
    /// service's config (and cached).
    ///
    /// # Errors
    /// Unknown provider (listing the registered ones), or its constructor's error.
    pub fn provider(&self, name: &str) -> Result<Arc<dyn Provider>> {
        if let Some(p) = lock(&self.inner.providers).get(name) {
            return Ok(p.clone());
        }
        if !self.inner.use_registry {
            let known: Vec<_> = lock(&self.inner.providers).keys().cloned().collect();
            return Err(Error::NotFound {
                what: Missing::Provider,
                id: name.to_string(),
                hint: Some(format!("providers of this service: {}", known.join(", "))),
            });
        }
        let p = registry::open_provider(name, &self.inner.defaults, &self.inner.env)?;
        lock(&self.inner.providers).insert(name.to_string(), p.clone());
        Ok(p)
    }

    fn provider_for_create(&self, name: &str, config: &SandboxConfig) -> Result<Arc<dyn Provider>> {
        if let Some(p) = lock(&self.inner.providers).get(name) {
            return Ok(p.clone());
        }
        if !self.inner.use_registry {
            return self.provider(name);
        }
        // The create config carries the provider's own section: build from it.
        registry::open_provider(name, config, &self.inner.env)
    }

    // ---- sandboxes ---------------------------------------------------------------------

    /// Creates a sandbox: writes a `creating` record, provisions it, runs bootstrappers, and
    /// marks it `active`.
    ///
    /// # Errors
    /// On a provider or bootstrap failure the provider object is cleaned up, the record says
    /// `error` with the message in `params.error`, and the error is returned.
    pub async fn create(&self, config: &SandboxConfig) -> Result<SandboxRecord> {
        let name = config.provider_name(&self.inner.env);
        let provider = self.provider_for_create(&name, config)?;
        lock(&self.inner.capabilities).insert(name.clone(), provider.capabilities());
        let id = SandboxId::new();
        let _in_flight = InFlightCreate::new(&self.inner.creating, id);
        let now = now_ms();
        let mut record = SandboxRecord {
            id,
            status: SandboxStatus::Creating,
            provider: name.clone(),
            external_sandbox_id: None,
            sandbox_url: None,
            timeout: config.timeout_ms.map(|t| t as i64),
            runtime: config.runtime.clone(),
            vcpus: config
                .resources
                .as_ref()
                .and_then(|r| r.vcpus)
                .map(|v| v as i64),
            ports: config.ports.clone(),
            purpose: config.purpose.clone(),
            params: config.params.clone().map(Value::Object),
            created_at: now,
            updated_at: Some(now),
            shutdown_at: None,
            sandbox_user_id: None,
        };
        self.inner.records.insert_sandbox(&record).await?;

        let provisioned = match provider
            .create(&CreateRequest {
                sandbox_id: id,
                config: config.clone(),
            })
            .await
        {
            Ok(p) => p,
            Err(e) => {
                self.mark_create_failed(&mut record, config, &e).await;
                return Err(e);
            }
        };
        let handle = provisioned.handle.clone();

        let mut extra = Map::new();
        extra.insert(name.clone(), provisioned.params.clone());
        if !provisioned.warnings.is_empty() {
            extra.insert("warnings".into(), json!(provisioned.warnings));
        }
        for b in &self.inner.bootstrappers {
            if !b.applies(config) {
                continue;
            }
            let ctx = BootstrapContext {
                sandbox_id: &id,
                provider: &name,
                config,
                sandbox: handle.clone(),
            };
            match b.run(&ctx).await {
                Ok(v) => {
                    extra.insert(b.name().to_string(), v);
                }
                Err(e) => {
                    let e = bootstrap_failure(&name, b.name(), e);
                    self.cleanup(&handle).await;
                    self.mark_create_failed(&mut record, config, &e).await;
                    return Err(e);
                }
            }
        }

        let patch = SandboxPatch {
            status: Some(SandboxStatus::Active),
            external_sandbox_id: Some(provisioned.external_id.clone()),
            sandbox_url: provisioned.url.clone(),
            params: Some(merge_params(config.params.as_ref(), extra)),
            updated_at: Some(now_ms()),
            ..Default::default()
        };
        if let Err(e) = self.inner.records.patch_sandbox(&id, &patch).await {
            // The record cannot say `active`: do not leave a provider object nobody tracks.
            self.cleanup(&handle).await;
            self.mark_create_failed(&mut record, config, &e).await;
            return Err(e);
        }
        record.apply(&patch);
        lock(&self.inner.handles).insert(id, handle);
        lock(&self.inner.cache).insert(id, record.clone());
        Ok(record)
    }

    async fn cleanup(&self, handle: &Arc<dyn SandboxHandle>) {
        if let Err(e) = handle.stop(StopMode::Delete).await {
            tracing::warn!(error = %e, "cleanup of a failed create did not complete");
        }
    }

    async fn mark_create_failed(
        &self,
        record: &mut SandboxRecord,
        config: &SandboxConfig,
        e: &Error,
    ) {
        let mut extra = Map::new();
        extra.insert("error".into(), Value::String(e.to_string()));
        let patch = SandboxPatch {
            status: Some(SandboxStatus::Error),
            params: Some(merge_params(config.params.as_ref(), extra)),
            updated_at: Some(now_ms()),
            ..Default::default()
        };
        match self.inner.records.patch_sandbox(&record.id, &patch).await {
            Ok(()) => record.apply(&patch),
            Err(pe) => {
                tracing::warn!(sandbox = %record.id, error = %pe, "could not record the failed create")
            }
        }
    }

    /// The record of a sandbox, read from the store.
    ///
    /// # Errors
    /// Not found.
    pub async fn get(&self, id: &SandboxId) -> Result<SandboxRecord> {
        let r = self
            .inner
            .records
            .get_sandbox(id)
            .await?
            .ok_or_else(|| Error::not_found(Missing::Sandbox, id.to_string()))?;
        lock(&self.inner.cache).insert(*id, r.clone());
        Ok(r)
    }

    /// Sandboxes matching `filter`.
    ///
    /// # Errors
    /// The store's.
    pub async fn list(&self, filter: &SandboxFilter) -> Result<Vec<SandboxRecord>> {
        self.inner.records.list_sandboxes(filter).await
    }

    async fn record(&self, id: &SandboxId) -> Result<SandboxRecord> {
        if let Some(r) = lock(&self.inner.cache).get(id) {
            return Ok(r.clone());
        }
        self.get(id).await
    }

    fn require_active(record: &SandboxRecord) -> Result<()> {
        if record.status != SandboxStatus::Active {
            return Err(Error::NotActive {
                sandbox_id: record.id.to_string(),
                status: record.status.to_string(),
            });
        }
        Ok(())
    }

    async fn resume(&self, record: &SandboxRecord) -> Result<Arc<dyn SandboxHandle>> {
        let provider = self.provider(&record.provider)?;
        let external = record.external_sandbox_id.as_deref().ok_or_else(|| {
            Error::not_found(Missing::Sandbox, format!("{} (no external id)", record.id))
        })?;
        provider
            .resume(&ResumeRequest {
                sandbox_id: record.id,
                external_id: external.to_string(),
                url: record.sandbox_url.clone(),
                params: record.provider_params().cloned().unwrap_or(Value::Null),
            })
            .await
    }

    /// The cached handle of an active sandbox, resuming it on first use.
    async fn active(&self, id: &SandboxId) -> Result<(SandboxRecord, Arc<dyn SandboxHandle>)> {
        let record = self.record(id).await?;
        Self::require_active(&record)?;
        if let Some(h) = lock(&self.inner.handles).get(id) {
            return Ok((record, h.clone()));
        }
        match self.resume(&record).await {
            Ok(h) => {
                lock(&self.inner.handles).insert(*id, h.clone());
                Ok((record, h))
            }
            Err(e) if e.is_not_found() => {
                self.mark_gone(&record).await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn mark_gone(&self, record: &SandboxRecord) -> Result<()> {
        let now = now_ms();
        let patch = SandboxPatch {
            status: Some(SandboxStatus::Shutdown),
            shutdown_at: Some(now),
            updated_at: Some(now),
            ..Default::default()
        };
        self.inner.records.patch_sandbox(&record.id, &patch).await?;
        self.forget(&record.id, Some(&patch));
        self.mark_open_processes_lost(&record.id, REASON_SANDBOX_GONE)
            .await?;
        Ok(())
    }

    fn forget(&self, id: &SandboxId, patch: Option<&SandboxPatch>) {
        lock(&self.inner.handles).remove(id);
        let mut cache = lock(&self.inner.cache);
        match patch {
            Some(p) => {
                if let Some(r) = cache.get_mut(id) {
                    r.apply(p);
                }
            }
            None => {
                cache.remove(id);
            }
        }
    }

    /// Re-reads the record and rebuilds the provider handle (without starting anything).
    ///
    /// # Errors
    /// Not found, not active, or the provider's error.
    pub async fn reconnect(&self, id: &SandboxId) -> Result<SandboxRecord> {
        lock(&self.inner.handles).remove(id);
        let record = self.get(id).await?;
        self.active(id).await?;
        Ok(record)
    }

    /// Stops a sandbox: kills processes this service runs in it, stops it at the provider
    /// (never resuming or starting it first), marks it `shutdown` and its still-open processes
    /// `lost` with reason `sandbox_stopped`. Stopping a stopped sandbox does nothing.
    ///
    /// # Errors
    /// Not found; a provider failure (the record is then unchanged, so the stop can be retried).
    pub async fn stop(&self, id: &SandboxId, mode: StopMode) -> Result<SandboxRecord> {
        let record = self.get(id).await?;
        if record.status.is_terminal() {
            return Ok(record);
        }
        self.kill_running(id).await;
        if record.external_sandbox_id.is_some() {
            let cached = lock(&self.inner.handles).get(id).cloned();
            let handle = match cached {
                Some(h) => Some(h),
                None => match self.resume(&record).await {
                    Ok(h) => Some(h),
                    Err(e) if e.is_not_found() => None,
                    Err(e) => return Err(e),
                },
            };
            if let Some(h) = handle {
                match h.stop(mode).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let now = now_ms();
        let patch = SandboxPatch {
            status: Some(SandboxStatus::Shutdown),
            shutdown_at: Some(now),
            updated_at: Some(now),
            ..Default::default()
        };
        self.inner.records.patch_sandbox(id, &patch).await?;
        let mut record = record;
        record.apply(&patch);
        self.forget(id, Some(&patch));
        self.mark_open_processes_lost(id, REASON_SANDBOX_STOPPED)
            .await?;
        Ok(record)
    }

    async fn kill_running(&self, id: &SandboxId) {
        let targets: Vec<_> = lock(&self.inner.running)
            .iter()
            .filter(|(_, r)| r.sandbox_id == *id)
            .map(|(p, r)| (*p, r.control.clone(), r.killed.clone(), r.done.clone()))
            .collect();
        for (pid, control, killed, mut done) in targets {
            killed.store(true, Ordering::SeqCst);
            if let Some(c) = control {
                if let Err(e) = c.kill().await {
                    tracing::warn!(process = %pid, error = %e, "kill failed");
                }
            }
            // The run's own task records it as killed; give it a moment to do so.
            let _ =
                tokio::time::timeout(Duration::from_secs(10), done.wait_for(|o| o.is_some())).await;
        }
    }

    async fn mark_open_processes_lost(
        &self,
        id: &SandboxId,
        reason: &str,
    ) -> Result<Vec<ProcessId>> {
        let open = self
            .inner
            .records
            .list_processes(&ProcessFilter {
                sandbox_id: Some(*id),
                open_only: true,
                ..Default::default()
            })
            .await?;
        let mut lost = Vec::new();
        for p in open {
            self.mark_lost(&p, reason).await?;
            lost.push(p.id);
        }
        Ok(lost)
    }

    async fn mark_lost(&self, p: &ProcessRecord, reason: &str) -> Result<()> {
        let now = now_ms();
        let mut metadata = p
            .metadata
            .as_ref()
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        metadata.insert("lostReason".into(), Value::String(reason.into()));
        let patch = ProcessPatch {
            status: Some(ProcessStatus::Lost),
            stream_finished_at: Some(p.stream_finished_at.unwrap_or(now)),
            stream_abort_reason: Some(reason.into()),
            exited_at: Some(now),
            updated_at: Some(now),
            metadata: Some(Value::Object(metadata)),
            ..Default::default()
        };
        self.inner.records.patch_process(&p.id, &patch).await?;
        // An observed process this service writes: end its log here (`abandon` refuses a live
        // writer), so the service stops appending to a process it recorded as lost.
        let held = lock(&self.inner.observed).remove(&p.id);
        if let Some(slot) = held {
            if let Some(writer) = slot.lock().await.take() {
                if let Err(e) = writer.abort(reason).await {
                    tracing::warn!(process = %p.id, error = %e, "could not end the log of a lost process");
                }
            }
        }
        // Close the log too, when its writer is gone; a live writer elsewhere keeps it.
        if let Err(e) = self.inner.logs.abandon(&p.id, reason).await {
            if !e.is_not_found() {
                tracing::debug!(process = %p.id, error = %e, "log left open");
            }
        }
        Ok(())
    }

    // ---- commands ----------------------------------------------------------------------

    /// Checks what can be checked without the sandbox, so bad input costs no provider call.
    fn check_command(req: &ExecRequest) -> Result<()> {
        if req.argv.is_empty() || req.argv[0].trim().is_empty() {
            return Err(Error::invalid(
                "sandbox_command_required",
                "a command is required",
            ));
        }
        if req.argv.iter().any(|a| a.contains('\0')) {
            return Err(Error::invalid(
                "sandbox_command_invalid",
                "command arguments cannot contain NUL bytes",
            ));
        }
        validate_env(&req.env)
    }

    fn prepare(
        &self,
        record: &SandboxRecord,
        handle: &dyn SandboxHandle,
        mut req: ExecRequest,
    ) -> Result<ExecRequest> {
        Self::check_command(&req)?;
        // A provider that cannot honour stdin or a timeout says so; never ignore them.
        if req.stdin.is_some() || req.timeout.is_some() {
            let known = lock(&self.inner.capabilities)
                .get(&record.provider)
                .copied();
            let caps = match known {
                Some(c) => c,
                None => {
                    let c = self.provider(&record.provider)?.capabilities();
                    lock(&self.inner.capabilities).insert(record.provider.clone(), c);
                    c
                }
            };
            for (asked, has, operation) in [
                (req.stdin.is_some(), caps.stdin, "stdin"),
                (req.timeout.is_some(), caps.timeout, "timeout"),
            ] {
                if asked && !has {
                    return Err(Error::Unsupported {
                        provider: record.provider.clone(),
                        operation,
                    });
                }
            }
        }
        let root = handle.workspace().to_string();
        req.cwd = Some(match req.cwd.as_deref() {
            Some(c) => confine(&root, c)?,
            None => root,
        });
        Ok(req)
    }

    /// Runs a command and returns all of its output once it ends. Nothing is recorded.
    ///
    /// # Errors
    /// Invalid input (env keys, cwd outside the workspace), not active, start failures, and a
    /// provider that loses the command.
    pub async fn run_command(&self, id: &SandboxId, req: ExecRequest) -> Result<CommandOutput> {
        Self::check_command(&req)?;
        let (record, handle) = self.active(id).await?;
        let req = self.prepare(&record, handle.as_ref(), req)?;
        let mut exec = handle.exec(req).await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(ev) = exec.events.next().await {
            match ev? {
                ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                ExecEvent::Stderr(b) => err.extend_from_slice(&b),
                ExecEvent::Exit(exit) => {
                    return Ok(CommandOutput {
                        exit,
                        stdout: out.into(),
                        stderr: err.into(),
                    })
                }
            }
        }
        Err(no_exit(&record.provider))
    }

    /// Starts a recorded process: a `running` record, a log whose output is written live while
    /// the command runs, and a handle to wait for, kill, read or follow it.
    ///
    /// # Errors
    /// Invalid input, not active, a store failure before the start (nothing runs), or a
    /// start failure (the record then says `failed` and the log says why).
    pub async fn spawn(&self, id: &SandboxId, spec: CommandSpec) -> Result<ProcessRun> {
        Self::check_command(&spec.request)?;
        let (record, handle) = self.active(id).await?;
        let req = self.prepare(&record, handle.as_ref(), spec.request.clone())?;
        let pid = ProcessId::new();
        let mut writer = ChunkWriter::open(self.inner.logs.as_ref(), *id, pid).await?;
        let now = now_ms();
        let proc_record = ProcessRecord {
            id: pid,
            sandbox_id: *id,
            kind: spec.kind.unwrap_or(ProcessKind::Command),
            mode: spec.mode.unwrap_or(ProcessMode::Foreground),
            status: ProcessStatus::Running,
            provider: record.provider.clone(),
            command: req.argv[0].clone(),
            args: Some(req.argv[1..].to_vec()),
            cwd: req.cwd.clone(),
            env: redact_env(req.env.keys().cloned()),
            exit_code: None,
            signal: None,
            external_process_id: None,
            stream_id: Some(writer.stream_id().to_string()),
            stream_client_id: Some(pid.stream_client_id()),
            stream_started_at: Some(now),
            stream_finished_at: None,
            stream_abort_reason: None,
            started_at: now,
            updated_at: Some(now),
            exited_at: None,
            metadata: spec
                .metadata
                .clone()
                .map(|m| crate::protocol::strip_nul_value(Value::Object(m))),
        };
        if let Err(e) = self.inner.records.insert_process(&proc_record).await {
            let _ = writer.abort("record_insert_failed").await;
            return Err(e);
        }
        let status_data = json!({
            "status": "running",
            "command": proc_record.command,
            "args": proc_record.args,
            "cwd": proc_record.cwd,
        });
        if let Err(e) = writer
            .append(ChunkType::Status, status_data.as_object().cloned())
            .await
        {
            self.finish_failed(&proc_record, writer, &e.to_string(), spec.metadata.as_ref())
                .await;
            return Err(e);
        }
        let exec = match handle.exec(req).await {
            Ok(x) => x,
            Err(e) => {
                self.finish_failed(&proc_record, writer, &e.to_string(), spec.metadata.as_ref())
                    .await;
                return Err(e);
            }
        };
        if let Some(ext) = &exec.external_id {
            let _ = self
                .inner
                .records
                .patch_process(
                    &pid,
                    &ProcessPatch {
                        external_process_id: Some(ext.clone()),
                        ..Default::default()
                    },
                )
                .await;
        }
        let (done_tx, done_rx) = watch::channel(None);
        let killed = Arc::new(AtomicBool::new(false));
        lock(&self.inner.running).insert(
            pid,
            Running {
                sandbox_id: *id,
                provider: record.provider.clone(),
                control: exec.control.clone(),
                killed: killed.clone(),
                done: done_rx.clone(),
            },
        );
        let stream_id = writer.stream_id().to_string();
        let svc = self.clone();
        let provider = record.provider.clone();
        let metadata = spec.metadata.clone();
        let result = Arc::new(Mutex::new(None));
        let result_task = result.clone();
        tokio::spawn(async move {
            let outcome = svc
                .pump(pid, provider, writer, exec, killed, metadata)
                .await;
            let shared = outcome.as_ref().ok().cloned();
            *lock(&result_task) = Some(outcome);
            lock(&svc.inner.running).remove(&pid);
            let _ = done_tx.send(shared.or_else(|| {
                Some(ProcessOutcome {
                    process_id: pid,
                    status: ProcessStatus::Failed,
                    exit_code: None,
                    signal: None,
                    error: Some("the run failed".into()),
                })
            }));
        });
        Ok(ProcessRun {
            service: self.clone(),
            sandbox_id: *id,
            process_id: pid,
            stream_id,
            done: done_rx,
            result,
        })
    }

    /// Writes the failure of a process that never ran, closes its log and finalises its record.
    async fn finish_failed(
        &self,
        p: &ProcessRecord,
        mut writer: ChunkWriter,
        message: &str,
        metadata: Option<&Map<String, Value>>,
    ) {
        let _ = writer
            .append(
                ChunkType::Error,
                json!({ "message": message }).as_object().cloned(),
            )
            .await;
        let _ = writer
            .append(
                ChunkType::Exit,
                json!({ "exitCode": null, "status": "failed" })
                    .as_object()
                    .cloned(),
            )
            .await;
        let last = writer.last_seq();
        let _ = writer.close().await;
        let now = now_ms();
        let mut md = metadata.cloned().unwrap_or_default();
        md.insert("error".into(), Value::String(message.into()));
        md.insert("chunkCount".into(), json!(last));
        md.insert("lastSeq".into(), json!(last));
        let _ = self
            .inner
            .records
            .patch_process(
                &p.id,
                &ProcessPatch {
                    status: Some(ProcessStatus::Failed),
                    stream_finished_at: Some(now),
                    stream_abort_reason: Some(message.into()),
                    exited_at: Some(now),
                    updated_at: Some(now),
                    metadata: Some(Value::Object(md)),
                    ..Default::default()
                },
            )
            .await;
    }

    /// Moves a command's events into its log, coalescing output, then finalises the record.
    async fn pump(
        &self,
        pid: ProcessId,
        provider: String,
        mut writer: ChunkWriter,
        mut exec: crate::provider::Execution,
        killed: Arc<AtomicBool>,
        metadata: Option<Map<String, Value>>,
    ) -> Result<ProcessOutcome> {
        let c = self.inner.coalescing;
        let mut pending: Option<(ChunkType, Vec<u8>)> = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut decoders = [OutputDecoder::new(), OutputDecoder::new()];
        let end: std::result::Result<ExitStatus, String>;
        let control = exec.control.clone();

        loop {
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, exec.events.next()).await.ok(),
                    None => Some(exec.events.next().await),
                }
            };
            let event = next.await;
            let event = match event {
                None => {
                    // Coalescing deadline: write what is buffered.
                    if let Some((kind, bytes)) = pending.take() {
                        if let Err(e) = write_output(&mut writer, kind, &bytes).await {
                            kill_quietly(&control).await;
                            return self.abort_run(pid, writer, e, metadata).await;
                        }
                    }
                    deadline = None;
                    continue;
                }
                Some(ev) => ev,
            };
            match event {
                Some(Ok(ExecEvent::Stdout(b))) | Some(Ok(ExecEvent::Stderr(b))) if b.is_empty() => {
                }
                Some(Ok(ev @ (ExecEvent::Stdout(_) | ExecEvent::Stderr(_)))) => {
                    let (kind, bytes, idx) = match ev {
                        ExecEvent::Stdout(b) => (ChunkType::Stdout, b, 0),
                        ExecEvent::Stderr(b) => (ChunkType::Stderr, b, 1),
                        ExecEvent::Exit(_) => unreachable!(),
                    };
                    if pending.as_ref().is_some_and(|(k, _)| *k != kind) {
                        let (k, buf) = pending.take().expect("checked");
                        if let Err(e) = write_output(&mut writer, k, &buf).await {
                            kill_quietly(&control).await;
                            return self.abort_run(pid, writer, e, metadata).await;
                        }
                        deadline = None;
                    }
                    let ready = decoders[idx].push(&bytes);
                    if ready.is_empty() {
                        continue;
                    }
                    let buf = &mut pending.get_or_insert_with(|| (kind, Vec::new())).1;
                    buf.extend_from_slice(&ready);
                    if buf.len() >= c.max_bytes {
                        let (k, buf) = pending.take().expect("just set");
                        if let Err(e) = write_output(&mut writer, k, &buf).await {
                            kill_quietly(&control).await;
                            return self.abort_run(pid, writer, e, metadata).await;
                        }
                        deadline = None;
                    } else if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + c.max_delay);
                    }
                }
                Some(Ok(ExecEvent::Exit(status))) => {
                    end = Ok(status);
                    break;
                }
                Some(Err(e)) => {
                    end = Err(e.to_string());
                    break;
                }
                None => {
                    end = Err(no_exit(&provider).to_string());
                    break;
                }
            }
        }

        // Flush what is buffered, then whatever the decoders still carry.
        let mut tail: Vec<(ChunkType, Vec<u8>)> = Vec::new();
        if let Some(p) = pending.take() {
            tail.push(p);
        }
        for (idx, kind) in [(0, ChunkType::Stdout), (1, ChunkType::Stderr)] {
            let rest = decoders[idx].finish();
            if !rest.is_empty() {
                tail.push((kind, rest));
            }
        }
        for (kind, bytes) in tail {
            if let Err(e) = write_output(&mut writer, kind, &bytes).await {
                return self.abort_run(pid, writer, e, metadata).await;
            }
        }

        let (status, exit_code, signal, error) = match &end {
            Ok(exit) => {
                let status =
                    if killed.load(Ordering::SeqCst) || exit.timed_out || exit.signal.is_some() {
                        ProcessStatus::Killed
                    } else if exit.code == Some(0) {
                        ProcessStatus::Exited
                    } else {
                        ProcessStatus::Failed
                    };
                (status, exit.code.map(i64::from), exit.signal.clone(), None)
            }
            Err(msg) => (ProcessStatus::Failed, None, None, Some(msg.clone())),
        };
        let write_end = async {
            if let Some(msg) = &error {
                writer
                    .append(
                        ChunkType::Error,
                        json!({ "message": msg }).as_object().cloned(),
                    )
                    .await?;
            }
            let mut data = json!({ "exitCode": exit_code, "status": status.as_str() });
            if let Some(s) = &signal {
                data["signal"] = json!(s);
            }
            if let Ok(exit) = &end {
                if exit.timed_out {
                    data["timedOut"] = json!(true);
                }
            }
            writer
                .append(ChunkType::Exit, data.as_object().cloned())
                .await?;
            Ok::<_, Error>(())
        };
        if let Err(e) = write_end.await {
            return self.abort_run(pid, writer, e, metadata).await;
        }
        let last = writer.last_seq();
        if let Err(e) = writer.close().await {
            return self.fail_record(pid, &e, metadata).await;
        }
        let now = now_ms();
        let mut md = metadata.unwrap_or_default();
        md.insert("chunkCount".into(), json!(last));
        md.insert("lastSeq".into(), json!(last));
        if let Some(msg) = &error {
            md.insert("error".into(), Value::String(msg.clone()));
        }
        let patch = ProcessPatch {
            status: Some(status),
            exit_code,
            signal: signal.clone(),
            stream_finished_at: Some(now),
            stream_abort_reason: error.clone(),
            exited_at: Some(now),
            updated_at: Some(now),
            metadata: Some(Value::Object(md)),
            ..Default::default()
        };
        self.inner.records.patch_process(&pid, &patch).await?;
        Ok(ProcessOutcome {
            process_id: pid,
            status,
            exit_code,
            signal,
            error,
        })
    }

    /// The log could not be written: abort it and record the process as failed.
    async fn abort_run(
        &self,
        pid: ProcessId,
        writer: ChunkWriter,
        e: Error,
        metadata: Option<Map<String, Value>>,
    ) -> Result<ProcessOutcome> {
        let _ = writer.abort(&format!("log_write_failed: {e}")).await;
        self.fail_record(pid, &e, metadata).await
    }

    async fn fail_record(
        &self,
        pid: ProcessId,
        e: &Error,
        metadata: Option<Map<String, Value>>,
    ) -> Result<ProcessOutcome> {
        let now = now_ms();
        let mut md = metadata.unwrap_or_default();
        md.insert("error".into(), Value::String(e.to_string()));
        let _ = self
            .inner
            .records
            .patch_process(
                &pid,
                &ProcessPatch {
                    status: Some(ProcessStatus::Failed),
                    stream_finished_at: Some(now),
                    stream_abort_reason: Some(format!("log_write_failed: {e}")),
                    exited_at: Some(now),
                    updated_at: Some(now),
                    metadata: Some(Value::Object(md)),
                    ..Default::default()
                },
            )
            .await;
        Err(Error::Store {
            store: self.inner.logs.name().to_string(),
            message: format!("the log of process {pid} could not be written: {e}"),
            retryable: false,
        })
    }

    /// Kills a process this service runs. It is then recorded as `killed`.
    ///
    /// # Errors
    /// Not found when this service does not run it; the provider's kill error.
    pub async fn kill(&self, pid: &ProcessId) -> Result<()> {
        let (control, killed, provider) = {
            let g = lock(&self.inner.running);
            let r = g
                .get(pid)
                .ok_or_else(|| Error::not_found(Missing::Process, pid.to_string()))?;
            (r.control.clone(), r.killed.clone(), r.provider.clone())
        };
        let Some(control) = control else {
            return Err(Error::Unsupported {
                provider,
                operation: "kill",
            });
        };
        // Only a kill that was delivered makes the end `killed`; a failed one leaves the
        // process to end as it will.
        killed.store(true, Ordering::SeqCst);
        let result = control.kill().await;
        if result.is_err() {
            killed.store(false, Ordering::SeqCst);
        }
        result
    }

    // ---- logs --------------------------------------------------------------------------

    /// The record of a process.
    ///
    /// # Errors
    /// Not found.
    pub async fn process(&self, pid: &ProcessId) -> Result<ProcessRecord> {
        self.inner
            .records
            .get_process(pid)
            .await?
            .ok_or_else(|| Error::not_found(Missing::Process, pid.to_string()))
    }

    /// Processes matching `filter`.
    ///
    /// # Errors
    /// The store's.
    pub async fn processes(&self, filter: &ProcessFilter) -> Result<Vec<ProcessRecord>> {
        self.inner.records.list_processes(filter).await
    }

    /// Reads up to `max` log entries of a process from `from`.
    ///
    /// # Errors
    /// Unknown process, no log.
    pub async fn read_log(&self, pid: &ProcessId, from: ReadFrom, max: usize) -> Result<LogPage> {
        self.process(pid).await?;
        self.inner.logs.read(pid, from, max).await
    }

    /// Follows a process log from `from` until it is closed or aborted.
    ///
    /// # Errors
    /// Unknown process, no log.
    pub async fn follow_log(
        &self,
        pid: &ProcessId,
        from: ReadFrom,
    ) -> Result<BoxStream<'static, Result<LogEntry>>> {
        self.process(pid).await?;
        let entries = self.inner.logs.follow(pid, from).await?;
        Ok(watch_writer(entries, self.inner.logs.clone(), *pid))
    }

    /// Reads a whole log and joins its output.
    ///
    /// # Errors
    /// Unknown process, no log, a malformed line.
    pub async fn transcript(&self, pid: &ProcessId) -> Result<Transcript> {
        let mut t = Transcript::default();
        let mut from = ReadFrom::START;
        loop {
            let page = self.read_log(pid, from, 4096).await?;
            let Some(last) = page.entries.last() else {
                return Ok(t);
            };
            from = ReadFrom::Seq(last.seq + 1);
            for e in &page.entries {
                t.push(&e.chunk()?);
            }
        }
    }

    // ---- observed processes --------------------------------------------------------------

    /// Records a process that runs elsewhere: a `running` record and a log whose single writer
    /// this service keeps until [`SandboxService::finish_observed`].
    ///
    /// # Errors
    /// Not active; store failures.
    pub async fn start_observed(&self, id: &SandboxId, spec: ObservedSpec) -> Result<ProcessId> {
        let record = self.record(id).await?;
        Self::require_active(&record)?;
        if spec.argv.is_empty() || spec.argv[0].trim().is_empty() {
            return Err(Error::invalid(
                "sandbox_command_required",
                "a command is required",
            ));
        }
        if let Some(bad) = spec
            .env_keys
            .iter()
            .find(|k| !crate::shell::is_valid_env_key(k))
        {
            return Err(Error::invalid(
                format!("sandbox_env_key_invalid:{bad}"),
                format!(
                    "sandbox_env_key_invalid:{bad}: environment variable names must match ^[A-Za-z_][A-Za-z0-9_]*$"
                ),
            ));
        }
        let pid = ProcessId::new();
        let mut writer = ChunkWriter::open(self.inner.logs.as_ref(), *id, pid).await?;
        let now = now_ms();
        let mut md = spec.metadata.clone().unwrap_or_default();
        md.insert("observed".into(), json!(true));
        let rec = ProcessRecord {
            id: pid,
            sandbox_id: *id,
            kind: spec.kind.unwrap_or(ProcessKind::Command),
            mode: spec.mode.unwrap_or(ProcessMode::Foreground),
            status: ProcessStatus::Running,
            provider: record.provider.clone(),
            command: crate::protocol::strip_nul(&spec.argv[0]),
            args: Some(
                spec.argv[1..]
                    .iter()
                    .map(|a| crate::protocol::strip_nul(a))
                    .collect(),
            ),
            cwd: spec.cwd.clone(),
            env: redact_env(spec.env_keys.clone()),
            exit_code: None,
            signal: None,
            external_process_id: spec.external_process_id.clone(),
            stream_id: Some(writer.stream_id().to_string()),
            stream_client_id: Some(pid.stream_client_id()),
            stream_started_at: Some(now),
            stream_finished_at: None,
            stream_abort_reason: None,
            started_at: now,
            updated_at: Some(now),
            exited_at: None,
            metadata: Some(crate::protocol::strip_nul_value(Value::Object(md))),
        };
        if let Err(e) = self.inner.records.insert_process(&rec).await {
            let _ = writer.abort("record_insert_failed").await;
            return Err(e);
        }
        let status_data = json!({
            "status": "running",
            "command": rec.command,
            "args": rec.args,
            "cwd": rec.cwd,
            "externalProcessId": rec.external_process_id,
        });
        if let Err(e) = writer
            .append(ChunkType::Status, status_data.as_object().cloned())
            .await
        {
            // Nobody will write this log: do not leave a `running` record behind.
            let md = rec.metadata.as_ref().and_then(Value::as_object);
            self.finish_failed(&rec, writer, &e.to_string(), md).await;
            return Err(e);
        }
        lock(&self.inner.observed).insert(pid, Arc::new(tokio::sync::Mutex::new(Some(writer))));
        Ok(pid)
    }

    fn observed_writer(
        &self,
        pid: &ProcessId,
    ) -> Result<Arc<tokio::sync::Mutex<Option<ChunkWriter>>>> {
        lock(&self.inner.observed).get(pid).cloned().ok_or_else(|| Error::Conflict {
            code: "sandbox_process_stream_writer_elsewhere".into(),
            message: format!(
                "process {pid} is not an open observed process of this service; only the service that started it can append"
            ),
        })
    }

    /// Appends a chunk to an observed process's log; returns its `seq`.
    ///
    /// # Errors
    /// The process is not an open observed process of this service.
    pub async fn append_observed(
        &self,
        pid: &ProcessId,
        kind: ChunkType,
        data: Option<Map<String, Value>>,
    ) -> Result<u64> {
        let w = self.observed_writer(pid)?;
        let mut g = w.lock().await;
        let writer = g.as_mut().ok_or_else(|| Error::Conflict {
            code: "sandbox_process_stream_closed".into(),
            message: format!("process {pid} is finished"),
        })?;
        writer.append(kind, keep_nul_output(kind, data)).await
    }

    /// Ends an observed process: writes an `error` chunk when there is error text, always an
    /// `exit` chunk, closes the log and finalises the record.
    ///
    /// # Errors
    /// The process is not an open observed process of this service; store failures.
    pub async fn finish_observed(
        &self,
        pid: &ProcessId,
        fin: ObservedFinish,
    ) -> Result<ProcessOutcome> {
        let w = self.observed_writer(pid)?;
        let mut g = w.lock().await;
        let mut writer = g.take().ok_or_else(|| Error::Conflict {
            code: "sandbox_process_stream_closed".into(),
            message: format!("process {pid} is finished"),
        })?;
        let status = fin.status.unwrap_or(match fin.exit_code {
            None | Some(0) => ProcessStatus::Exited,
            _ => ProcessStatus::Failed,
        });
        if !status.is_terminal() {
            *g = Some(writer);
            return Err(Error::invalid(
                "sandbox_process_status_invalid",
                format!("{status} is not a final status"),
            ));
        }
        let appended = async {
            if let Some(msg) = &fin.error_text {
                writer
                    .append(
                        ChunkType::Error,
                        json!({ "message": msg }).as_object().cloned(),
                    )
                    .await?;
            }
            let mut data = json!({ "exitCode": fin.exit_code, "status": status.as_str() });
            if let Some(msg) = &fin.error_text {
                data["message"] = json!(msg);
            }
            writer
                .append(ChunkType::Exit, data.as_object().cloned())
                .await
        }
        .await;
        if let Err(e) = appended {
            // The log is still open: keep its writer so the finish can be retried.
            *g = Some(writer);
            return Err(e);
        }
        let last = writer.last_seq();
        let closed = writer.close().await;
        drop(g);
        // The writer is spent either way; a log left open is then judged by `reconcile`.
        lock(&self.inner.observed).remove(pid);
        closed?;
        let rec = self.process(pid).await?;
        let mut md = rec
            .metadata
            .as_ref()
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        md.extend(fin.metadata.unwrap_or_default());
        md.insert("lastSeq".into(), json!(last));
        md.insert("chunkCount".into(), json!(last));
        if let Some(msg) = &fin.error_text {
            md.insert("error".into(), json!(msg));
        }
        let now = now_ms();
        self.inner
            .records
            .patch_process(
                pid,
                &ProcessPatch {
                    status: Some(status),
                    exit_code: fin.exit_code,
                    stream_finished_at: Some(now),
                    stream_abort_reason: fin.error_text.clone(),
                    exited_at: Some(now),
                    updated_at: Some(now),
                    metadata: Some(crate::protocol::strip_nul_value(Value::Object(md))),
                    ..Default::default()
                },
            )
            .await?;
        Ok(ProcessOutcome {
            process_id: *pid,
            status,
            exit_code: fin.exit_code,
            signal: None,
            error: fin.error_text,
        })
    }

    // ---- files, ports, checkpoints -------------------------------------------------------

    /// Writes files into the sandbox workspace. Every path is checked before anything is
    /// written.
    ///
    /// # Errors
    /// A path outside the workspace (nothing is written), not active, the provider's error.
    pub async fn write_files(&self, id: &SandboxId, files: Vec<FileWrite>) -> Result<()> {
        let (_, handle) = self.active(id).await?;
        let root = handle.workspace().to_string();
        let files = files
            .into_iter()
            .map(|mut f| {
                f.path = confine(&root, &f.path)?;
                if f.path == root {
                    return Err(Error::invalid(
                        "sandbox_path_invalid",
                        "cannot write to the workspace root itself",
                    ));
                }
                Ok(f)
            })
            .collect::<Result<Vec<_>>>()?;
        if files.is_empty() {
            return Ok(());
        }
        handle.write_files(files).await
    }

    /// Reads a file: `None` when it does not exist.
    ///
    /// # Errors
    /// A path outside the workspace, not active, the provider's error.
    pub async fn read_file(&self, id: &SandboxId, path: &str) -> Result<Option<Bytes>> {
        let (_, handle) = self.active(id).await?;
        let path = confine(handle.workspace(), path)?;
        handle.read_file(&path).await
    }

    /// URL at which `port` of the sandbox is reachable.
    ///
    /// # Errors
    /// Port 0, not active, unsupported.
    pub async fn port_url(&self, id: &SandboxId, port: u16) -> Result<String> {
        if port == 0 {
            return Err(Error::invalid(
                "sandbox_port_invalid",
                "port must be 1-65535",
            ));
        }
        let (_, handle) = self.active(id).await?;
        handle.port_url(port).await
    }

    /// Takes a checkpoint; records its id as `params.<provider>.lastCheckpointId`.
    ///
    /// # Errors
    /// Not active, unsupported (`checkpoint_not_supported`), the provider's error.
    pub async fn checkpoint(&self, id: &SandboxId, comment: Option<String>) -> Result<Checkpoint> {
        let (record, handle) = self.active(id).await?;
        let cp = handle.checkpoint(comment).await?;
        self.note_provider_param(&record, "lastCheckpointId", &cp.id)
            .await;
        Ok(cp)
    }

    /// Lists checkpoints, oldest first.
    ///
    /// # Errors
    /// Not active, unsupported, the provider's error.
    pub async fn list_checkpoints(&self, id: &SandboxId) -> Result<Vec<Checkpoint>> {
        let (_, handle) = self.active(id).await?;
        handle.list_checkpoints().await
    }

    /// Restores a checkpoint; records it as `params.<provider>.lastRestoredCheckpointId`.
    ///
    /// # Errors
    /// Empty id (`checkpoint_id_required`), not active, unsupported, the provider's error.
    pub async fn restore(&self, id: &SandboxId, checkpoint_id: &str) -> Result<()> {
        if checkpoint_id.trim().is_empty() {
            return Err(Error::invalid(
                "checkpoint_id_required",
                "a checkpoint id is required",
            ));
        }
        let (record, handle) = self.active(id).await?;
        handle.restore(checkpoint_id.trim()).await?;
        self.note_provider_param(&record, "lastRestoredCheckpointId", checkpoint_id.trim())
            .await;
        Ok(())
    }

    async fn note_provider_param(&self, record: &SandboxRecord, key: &str, value: &str) {
        let mut params = record
            .params
            .as_ref()
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let section = params
            .entry(record.provider.clone())
            .or_insert_with(|| json!({}));
        if !section.is_object() {
            *section = json!({});
        }
        section[key] = json!(value);
        let patch = SandboxPatch {
            params: Some(Value::Object(params)),
            updated_at: Some(now_ms()),
            ..Default::default()
        };
        match self.inner.records.patch_sandbox(&record.id, &patch).await {
            Ok(()) => {
                if let Some(r) = lock(&self.inner.cache).get_mut(&record.id) {
                    r.apply(&patch);
                }
            }
            Err(e) => tracing::warn!(sandbox = %record.id, error = %e, "could not record {key}"),
        }
    }

    // ---- recovery ----------------------------------------------------------------------

    /// After a restart: marks processes whose log writer died `lost` (`writer_lost`),
    /// finalises records whose log ended but whose record did not, and marks sandboxes the
    /// provider no longer has `shutdown` (their open processes `lost`, `sandbox_gone`).
    /// Processes with a live writer are left alone.
    ///
    /// # Errors
    /// Store failures.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let open = self
            .inner
            .records
            .list_processes(&ProcessFilter {
                open_only: true,
                ..Default::default()
            })
            .await?;
        for p in open {
            if lock(&self.inner.running).contains_key(&p.id)
                || lock(&self.inner.observed).contains_key(&p.id)
            {
                report.alive.push(p.id);
                continue;
            }
            match self.inner.logs.status(&p.id).await? {
                None => {
                    self.mark_lost(&p, REASON_WRITER_LOST).await?;
                    report.lost.push((p.id, REASON_WRITER_LOST.into()));
                }
                Some(s) if s.state.is_finished() => {
                    if self.finalize_from_log(&p).await? {
                        report.finalized.push(p.id);
                    } else {
                        let reason = match &s.state {
                            crate::stream::LogState::Aborted { reason } => reason.clone(),
                            _ => REASON_WRITER_LOST.into(),
                        };
                        self.mark_lost(&p, &reason).await?;
                        report.lost.push((p.id, reason));
                    }
                }
                Some(s) if s.writer == WriterLiveness::Gone => {
                    self.mark_lost(&p, REASON_WRITER_LOST).await?;
                    report.lost.push((p.id, REASON_WRITER_LOST.into()));
                }
                Some(_) => report.alive.push(p.id),
            }
        }

        let active = self
            .inner
            .records
            .list_sandboxes(&SandboxFilter {
                status: Some(SandboxStatus::Active),
                ..Default::default()
            })
            .await?;
        self.reconcile_creates(&mut report).await?;
        for s in active {
            if lock(&self.inner.handles).contains_key(&s.id) {
                continue;
            }
            match self.resume(&s).await {
                Ok(h) => {
                    lock(&self.inner.handles).insert(s.id, h);
                }
                Err(e) if e.is_not_found() => {
                    self.mark_gone(&s).await?;
                    report.gone.push(s.id);
                }
                Err(e) => report
                    .skipped
                    .push(format!("sandbox {} ({}): {e}", s.id, s.provider)),
            }
        }
        Ok(report)
    }

    /// Sandboxes `creating` for longer than the grace period, whose create does not run in
    /// this service, were left by a create that died: they become `error`. Their provider
    /// object, if the provider made one, may remain: its external id was never recorded.
    async fn reconcile_creates(&self, report: &mut ReconcileReport) -> Result<()> {
        let creating = self
            .inner
            .records
            .list_sandboxes(&SandboxFilter {
                status: Some(SandboxStatus::Creating),
                ..Default::default()
            })
            .await?;
        let cutoff = now_ms() - self.inner.create_grace.as_millis() as i64;
        for s in creating {
            if s.created_at > cutoff || lock(&self.inner.creating).contains(&s.id) {
                continue;
            }
            let mut params = s
                .params
                .as_ref()
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            params.insert(
                "error".into(),
                json!(format!(
                    "create_interrupted: the create of this sandbox stopped before it was \
                     active; a {} object may remain at the provider",
                    s.provider
                )),
            );
            let patch = SandboxPatch {
                status: Some(SandboxStatus::Error),
                params: Some(Value::Object(params)),
                updated_at: Some(now_ms()),
                ..Default::default()
            };
            self.inner.records.patch_sandbox(&s.id, &patch).await?;
            report.interrupted.push(s.id);
        }
        Ok(())
    }

    /// A process whose log holds an `exit` chunk gets its final status from it.
    /// A log with a malformed line cannot say how the process ended: it is not finalised from
    /// it (and one corrupt log does not stop the reconciliation of the others).
    async fn finalize_from_log(&self, p: &ProcessRecord) -> Result<bool> {
        let t = match self.transcript(&p.id).await {
            Ok(t) => t,
            Err(e @ Error::Protocol { .. }) => {
                tracing::warn!(process = %p.id, error = %e, "log unreadable; not finalised from it");
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let Some(status) = t
            .status
            .as_deref()
            .and_then(|s| ProcessStatus::parse(s).ok())
        else {
            return Ok(false);
        };
        if !status.is_terminal() {
            return Ok(false);
        }
        let now = now_ms();
        self.inner
            .records
            .patch_process(
                &p.id,
                &ProcessPatch {
                    status: Some(status),
                    exit_code: t.exit_code,
                    stream_finished_at: Some(now),
                    exited_at: Some(now),
                    updated_at: Some(now),
                    ..Default::default()
                },
            )
            .await?;
        Ok(true)
    }
}

/// The error of a failed bootstrap step: its category kept (an invalid skill stays invalid
/// input, a missing token unauthorized, a 503 transient), its message naming the step. A
/// not-found or not-active from inside the step is about something the step looked for, not
/// about the sandbox being created, so it becomes a provider error.
fn bootstrap_failure(provider: &str, step: &str, e: Error) -> Error {
    let context = |message: String| format!("bootstrap step `{step}` failed: {message}");
    match e {
        Error::InvalidInput { code, message } => Error::InvalidInput {
            code,
            message: context(message),
        },
        Error::Unauthorized { provider, message } => Error::Unauthorized {
            provider,
            message: context(message),
        },
        Error::RateLimited {
            provider,
            retry_after,
            message,
        } => Error::RateLimited {
            provider,
            retry_after,
            message: context(message),
        },
        Error::Transient { provider, message } => Error::Transient {
            provider,
            message: context(message),
        },
        Error::Provider {
            provider,
            status,
            message,
        } => Error::Provider {
            provider,
            status,
            message: context(message),
        },
        Error::Conflict { code, message } => Error::Conflict {
            code,
            message: context(message),
        },
        Error::Store {
            store,
            message,
            retryable,
        } => Error::Store {
            store,
            message: context(message),
            retryable,
        },
        Error::Protocol { code, message } => Error::Protocol {
            code,
            message: context(message),
        },
        Error::StartFailed { message } => Error::StartFailed {
            message: context(message),
        },
        Error::Timeout { operation, elapsed } => Error::Timeout {
            operation: context(operation),
            elapsed,
        },
        e @ Error::Unsupported { .. } => e,
        other => Error::provider(provider, context(other.to_string())),
    }
}

/// Output text holding NUL loses it in `data.text` (InstantDB rejects NUL): keep the exact
/// bytes in `data.base64`, as for a recorded run's output.
fn keep_nul_output(
    kind: ChunkType,
    data: Option<Map<String, Value>>,
) -> Option<Map<String, Value>> {
    let mut data = data?;
    if matches!(kind, ChunkType::Stdout | ChunkType::Stderr) && !data.contains_key("base64") {
        if let Some(text) = data.get("text").and_then(Value::as_str) {
            if text.contains('\0') {
                let exact = output_data(text.as_bytes());
                data.extend(exact);
            }
        }
    }
    Some(data)
}

/// How long a follower waits for the next entry before it asks whether the log's writer is
/// still alive.
const WRITER_WATCH: Duration = Duration::from_secs(2);

/// Ends a follow with `sandbox_process_writer_lost` when the log is still open but its writer
/// is gone (it died without closing the log): otherwise the follower would wait until someone
/// runs `reconcile`.
fn watch_writer(
    entries: BoxStream<'static, Result<LogEntry>>,
    logs: Arc<dyn StreamSink>,
    pid: ProcessId,
) -> BoxStream<'static, Result<LogEntry>> {
    Box::pin(futures::stream::unfold(
        (entries, logs, false),
        move |(mut entries, logs, done)| async move {
            if done {
                return None;
            }
            loop {
                // Timing out `next` is safe: the follow stream keeps its own state.
                match tokio::time::timeout(WRITER_WATCH, entries.next()).await {
                    Ok(Some(item)) => return Some((item, (entries, logs, false))),
                    Ok(None) => return None,
                    Err(_) => match logs.status(&pid).await {
                        Ok(Some(s))
                            if !s.state.is_finished() && s.writer == WriterLiveness::Gone =>
                        {
                            let e = Error::protocol(
                                "sandbox_process_writer_lost",
                                format!(
                                    "the writer of process {pid} died without closing its log; \
                                     `reconcile` marks it lost"
                                ),
                            );
                            return Some((Err(e), (entries, logs, true)));
                        }
                        _ => continue,
                    },
                }
            }
        },
    ))
}

/// Marks a sandbox as being created by this service for as long as it lives.
struct InFlightCreate<'a> {
    set: &'a Mutex<std::collections::HashSet<SandboxId>>,
    id: SandboxId,
}

impl<'a> InFlightCreate<'a> {
    fn new(set: &'a Mutex<std::collections::HashSet<SandboxId>>, id: SandboxId) -> Self {
        lock(set).insert(id);
        InFlightCreate { set, id }
    }
}

impl Drop for InFlightCreate<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

fn no_exit(provider: &str) -> Error {
    Error::provider(
        provider,
        "the command's output ended without an exit status (connection lost?)",
    )
}

async fn kill_quietly(control: &Option<Arc<dyn ExecControl>>) {
    if let Some(c) = control {
        if let Err(e) = c.kill().await {
            tracing::warn!(error = %e, "could not kill a command whose log failed");
        }
    }
}

async fn write_output(writer: &mut ChunkWriter, kind: ChunkType, bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    writer
        .append(kind, Some(output_data(bytes)))
        .await
        .map(|_| ())
}

/// A recorded process started by [`SandboxService::spawn`].
pub struct ProcessRun {
    service: SandboxService,
    sandbox_id: SandboxId,
    process_id: ProcessId,
    stream_id: String,
    done: watch::Receiver<Option<ProcessOutcome>>,
    result: Arc<Mutex<Option<Result<ProcessOutcome>>>>,
}

impl fmt::Debug for ProcessRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessRun")
            .field("sandbox_id", &self.sandbox_id)
            .field("process_id", &self.process_id)
            .finish()
    }
}

impl ProcessRun {
    /// The sandbox.
    pub fn sandbox_id(&self) -> SandboxId {
        self.sandbox_id
    }

    /// The process.
    pub fn process_id(&self) -> ProcessId {
        self.process_id
    }

    /// Id of its log (`streamId`).
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// `sandbox-process:<processId>`.
    pub fn stream_client_id(&self) -> String {
        self.process_id.stream_client_id()
    }

    /// Waits for the process to end and its record to be final.
    ///
    /// # Errors
    /// The log or the record could not be written (the process was killed then).
    pub async fn wait(&self) -> Result<ProcessOutcome> {
        let mut done = self.done.clone();
        let _ = done.wait_for(|o| o.is_some()).await;
        // Taken and replaced under one lock, so a concurrent `wait` sees the copy, never a gap.
        let mut slot = lock(&self.result);
        let taken = slot.take();
        match taken {
            Some(r) => {
                // Keep a copy for later calls.
                let copy = match &r {
                    Ok(o) => Ok(o.clone()),
                    Err(e) => Err(Error::Store {
                        store: self.service.inner.logs.name().to_string(),
                        message: e.to_string(),
                        retryable: false,
                    }),
                };
                *slot = Some(copy);
                r
            }
            None => {
                drop(slot);
                done.borrow()
                    .clone()
                    .ok_or_else(|| Error::provider("unknown", "the run ended without an outcome"))
            }
        }
    }

    /// Kills the process; it is then recorded as `killed`.
    ///
    /// # Errors
    /// The provider's kill error.
    pub async fn kill(&self) -> Result<()> {
        match self.service.kill(&self.process_id).await {
            Err(e) if e.is_not_found() => Ok(()), // already ended
            other => other,
        }
    }

    /// Reads up to `max` log entries from `from`.
    ///
    /// # Errors
    /// See [`SandboxService::read_log`].
    pub async fn read(&self, from: ReadFrom, max: usize) -> Result<Vec<ProcessChunk>> {
        self.service
            .read_log(&self.process_id, from, max)
            .await?
            .entries
            .iter()
            .map(LogEntry::chunk)
            .collect()
    }

    /// Follows the log from `from` until it closes.
    ///
    /// # Errors
    /// See [`SandboxService::follow_log`].
    pub async fn follow(&self, from: ReadFrom) -> Result<BoxStream<'static, Result<LogEntry>>> {
        self.service.follow_log(&self.process_id, from).await
    }

    /// Waits for the end and returns the exact stdout/stderr bytes from the log.
    ///
    /// # Errors
    /// See [`ProcessRun::wait`] and [`SandboxService::transcript`].
    pub async fn output(&self) -> Result<(ProcessOutcome, Transcript)> {
        let outcome = self.wait().await?;
        let t = self.service.transcript(&self.process_id).await?;
        Ok((outcome, t))
    }
}

/// `BTreeMap` env helpers for callers building requests from `K=V` strings.
///
/// # Errors
/// A pair without `=`, or an invalid key.
pub fn parse_env_pairs<S: AsRef<str>>(pairs: &[S]) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for p in pairs {
        let p = p.as_ref();
        let (k, v) = p.split_once('=').ok_or_else(|| {
            Error::invalid(
                format!("sandbox_env_key_invalid:{p}"),
                format!("sandbox_env_key_invalid:{p}: expected KEY=VALUE"),
            )
        })?;
        env.insert(k.to_string(), v.to_string());
    }
    validate_env(&env)?;
    Ok(env)
}

#[cfg(test)]
mod tests;
