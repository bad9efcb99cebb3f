//! `SandboxService` failure paths and guarantees, driven by `mockall` mocks of the provider
//! traits and of the record store, with the in-memory store and sink where a real one is
//! simpler than a mock.
//!
//! A mock with no expectation for a method panics when the service calls it, so a test that
//! sets none for `resume`/`exec`/`stop` also asserts that the service does not call them.

use std::sync::atomic::AtomicBool;

use async_trait::async_trait;
use futures::FutureExt;
use mockall::predicate::eq;
use tokio::sync::mpsc;

use super::*;
use crate::config::ProviderSelector;
use crate::memory::{MemorySink, MemoryStore};
use crate::provider::{
    Capabilities, Execution, MockExecControl, MockProvider, MockSandboxHandle, Provisioned,
};
use crate::store::MockRecordStore;
use crate::stream::{LogAppender, LogState};

const PROVIDER: &str = "mock";
const WORKSPACE: &str = "/workspace";
const EXTERNAL_ID: &str = "mock-sandbox-1";
/// Upper bound for waiting on a real condition; never reached when the code is right.
const WAIT: Duration = Duration::from_secs(10);

// ---- fixtures ----------------------------------------------------------------------------

fn config() -> SandboxConfig {
    SandboxConfig {
        provider: Some(ProviderSelector::Name(PROVIDER.into())),
        params: json!({ "team": "core" }).as_object().cloned(),
        ..Default::default()
    }
}

fn provider() -> MockProvider {
    let mut p = MockProvider::new();
    p.expect_name().return_const(PROVIDER.to_string());
    p.expect_capabilities().return_const(Capabilities::ALL);
    p
}

fn handle() -> MockSandboxHandle {
    let mut h = MockSandboxHandle::new();
    h.expect_workspace().return_const(WORKSPACE.to_string());
    h
}

fn provisioned(handle: MockSandboxHandle) -> Provisioned {
    Provisioned {
        handle: Arc::new(handle),
        external_id: EXTERNAL_ID.into(),
        url: None,
        params: json!({ "region": "test" }),
        warnings: vec![],
    }
}

/// A provider whose `create` hands out `handle`, once.
fn provider_creating(handle: MockSandboxHandle) -> MockProvider {
    let mut p = provider();
    p.expect_create()
        .times(1)
        .return_once(move |_| Ok(provisioned(handle)));
    p
}

/// A provider whose `resume` hands out `handle`, once.
fn provider_resuming(handle: MockSandboxHandle) -> MockProvider {
    let mut p = provider();
    p.expect_resume()
        .times(1)
        .return_once(move |_| Ok(Arc::new(handle) as Arc<dyn SandboxHandle>));
    p
}

struct Fixture {
    svc: SandboxService,
    records: Arc<MemoryStore>,
    logs: MemorySink,
}

impl Fixture {
    fn new(provider: MockProvider) -> Self {
        Self::build(provider, None, vec![], Coalescing::default())
    }

    fn build(
        provider: MockProvider,
        records: Option<Arc<dyn RecordStore>>,
        bootstrappers: Vec<Arc<dyn Bootstrapper>>,
        coalescing: Coalescing,
    ) -> Self {
        let memory = Arc::new(MemoryStore::new());
        let logs = MemorySink::new();
        let svc = SandboxService::builder()
            .records(records.unwrap_or_else(|| memory.clone()))
            .logs(Arc::new(logs.clone()))
            .provider(Arc::new(provider))
            .use_registry(false)
            .bootstrappers(bootstrappers)
            .env(Env::from_pairs([("SANDBOX_PROVIDER", PROVIDER)]))
            .coalescing(coalescing)
            .build()
            .unwrap();
        Fixture {
            svc,
            records: memory,
            logs,
        }
    }

    /// A second service over the same store and sink (e.g. after a restart).
    fn restarted(&self, provider: MockProvider) -> SandboxService {
        SandboxService::builder()
            .records(self.records.clone())
            .logs(Arc::new(self.logs.clone()))
            .provider(Arc::new(provider))
            .use_registry(false)
            .bootstrappers(vec![])
            .env(Env::from_pairs([("SANDBOX_PROVIDER", PROVIDER)]))
            .build()
            .unwrap()
    }

    async fn seed_sandbox(&self, status: SandboxStatus) -> SandboxRecord {
        let r = sandbox_record(status);
        self.records.insert_sandbox(&r).await.unwrap();
        r
    }

    async fn seed_process(&self, sandbox: &SandboxId) -> ProcessRecord {
        let p = process_record(sandbox);
        self.records.insert_process(&p).await.unwrap();
        p
    }

    async fn sandbox(&self, id: &SandboxId) -> SandboxRecord {
        self.records.get_sandbox(id).await.unwrap().unwrap()
    }

    async fn process(&self, id: &ProcessId) -> ProcessRecord {
        self.records.get_process(id).await.unwrap().unwrap()
    }

    async fn processes(&self) -> Vec<ProcessRecord> {
        self.records
            .list_processes(&ProcessFilter::default())
            .await
            .unwrap()
    }

    async fn log(&self, pid: &ProcessId) -> (Vec<ProcessChunk>, LogState) {
        let page = self.logs.read(pid, ReadFrom::START, 10_000).await.unwrap();
        let chunks = page.entries.iter().map(|e| e.chunk().unwrap()).collect();
        (chunks, page.status.state)
    }

    fn caches_handle(&self, id: &SandboxId) -> bool {
        lock(&self.svc.inner.handles).contains_key(id)
    }

    fn runs(&self, pid: &ProcessId) -> bool {
        lock(&self.svc.inner.running).contains_key(pid)
    }
}

fn sandbox_record(status: SandboxStatus) -> SandboxRecord {
    SandboxRecord {
        id: SandboxId::new(),
        status,
        provider: PROVIDER.into(),
        external_sandbox_id: Some(EXTERNAL_ID.into()),
        sandbox_url: None,
        timeout: None,
        runtime: None,
        vcpus: None,
        ports: None,
        purpose: None,
        params: Some(json!({ PROVIDER: { "region": "test" } })),
        created_at: now_ms(),
        updated_at: None,
        shutdown_at: None,
        sandbox_user_id: None,
    }
}

fn process_record(sandbox: &SandboxId) -> ProcessRecord {
    let id = ProcessId::new();
    ProcessRecord {
        id,
        sandbox_id: *sandbox,
        kind: ProcessKind::Command,
        mode: ProcessMode::Foreground,
        status: ProcessStatus::Running,
        provider: PROVIDER.into(),
        command: "sleep".into(),
        args: Some(vec!["60".into()]),
        cwd: Some(WORKSPACE.into()),
        env: None,
        exit_code: None,
        signal: None,
        external_process_id: None,
        stream_id: Some(id.stream_client_id()),
        stream_client_id: Some(id.stream_client_id()),
        stream_started_at: Some(now_ms()),
        stream_finished_at: None,
        stream_abort_reason: None,
        started_at: now_ms(),
        updated_at: None,
        exited_at: None,
        metadata: None,
    }
}

/// An execution whose events are exactly `events`.
fn scripted(events: Vec<Result<ExecEvent>>) -> Execution {
    Execution {
        events: futures::stream::iter(events).boxed(),
        control: None,
        external_id: None,
    }
}

/// An execution fed by the test through a channel it holds open: the command runs until the
/// test sends `Exit` (or drops the sender).
fn live() -> (mpsc::UnboundedSender<Result<ExecEvent>>, Execution) {
    let (tx, rx) = mpsc::unbounded_channel();
    let events = futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
    )
    .boxed();
    (
        tx,
        Execution {
            events,
            control: None,
            external_id: Some("pid-42".into()),
        },
    )
}

/// A live execution whose kill (expected once) ends it with `signal`.
fn killable_by(signal: &'static str) -> (mpsc::UnboundedSender<Result<ExecEvent>>, Execution) {
    let (tx, mut exec) = live();
    let mut control = MockExecControl::new();
    let tx_kill = tx.clone();
    control.expect_kill().times(1).returning(move || {
        let _ = tx_kill.send(Ok(ExecEvent::Exit(ExitStatus {
            code: None,
            signal: Some(signal.into()),
            timed_out: false,
        })));
        Ok(())
    });
    exec.control = Some(Arc::new(control));
    (tx, exec)
}

fn stdout(s: &str) -> Result<ExecEvent> {
    Ok(ExecEvent::Stdout(Bytes::copy_from_slice(s.as_bytes())))
}

fn stderr(s: &str) -> Result<ExecEvent> {
    Ok(ExecEvent::Stderr(Bytes::copy_from_slice(s.as_bytes())))
}

fn exit(code: i32) -> Result<ExecEvent> {
    Ok(ExecEvent::Exit(ExitStatus::code(code)))
}

fn kinds(chunks: &[ProcessChunk]) -> Vec<ChunkType> {
    chunks.iter().map(|c| c.kind).collect()
}

async fn next_chunk(follow: &mut BoxStream<'static, Result<LogEntry>>) -> ProcessChunk {
    tokio::time::timeout(WAIT, follow.next())
        .await
        .expect("a chunk arrives")
        .expect("the log is still open")
        .unwrap()
        .chunk()
        .unwrap()
}

async fn wait(run: &ProcessRun) -> Result<ProcessOutcome> {
    tokio::time::timeout(WAIT, run.wait())
        .await
        .expect("the run ends")
}

/// Which store writes fail.
#[derive(Clone, Default)]
struct Faults {
    insert_sandbox: Arc<AtomicBool>,
    activation: Arc<AtomicBool>,
    insert_process: Arc<AtomicBool>,
    patch_process: Arc<AtomicBool>,
}

fn disk_full() -> Error {
    Error::store("mockdb", "disk full")
}

/// A `MockRecordStore` that delegates to a memory store, failing the writes `faults` switch on.
fn faulty_store(memory: Arc<MemoryStore>, faults: &Faults) -> MockRecordStore {
    // The memory store never awaits, so its futures are ready at once.
    fn now<T>(f: impl std::future::Future<Output = T>) -> T {
        f.now_or_never().expect("the memory store is synchronous")
    }
    let mut s = MockRecordStore::new();
    s.expect_name().return_const("mockdb".to_string());
    let (m, f) = (memory.clone(), faults.insert_sandbox.clone());
    s.expect_insert_sandbox().returning(move |r| {
        if f.load(Ordering::SeqCst) {
            return Err(disk_full());
        }
        now(m.insert_sandbox(r))
    });
    let (m, f) = (memory.clone(), faults.activation.clone());
    s.expect_patch_sandbox().returning(move |id, p| {
        if f.load(Ordering::SeqCst) && p.status == Some(SandboxStatus::Active) {
            return Err(disk_full());
        }
        now(m.patch_sandbox(id, p))
    });
    let m = memory.clone();
    s.expect_get_sandbox()
        .returning(move |id| now(m.get_sandbox(id)));
    let m = memory.clone();
    s.expect_list_sandboxes()
        .returning(move |f| now(m.list_sandboxes(f)));
    let (m, f) = (memory.clone(), faults.insert_process.clone());
    s.expect_insert_process().returning(move |r| {
        if f.load(Ordering::SeqCst) {
            return Err(disk_full());
        }
        now(m.insert_process(r))
    });
    let (m, f) = (memory.clone(), faults.patch_process.clone());
    s.expect_patch_process().returning(move |id, p| {
        if f.load(Ordering::SeqCst) {
            return Err(disk_full());
        }
        now(m.patch_process(id, p))
    });
    let m = memory.clone();
    s.expect_get_process()
        .returning(move |id| now(m.get_process(id)));
    let m = memory;
    s.expect_list_processes()
        .returning(move |f| now(m.list_processes(f)));
    s
}

impl Fixture {
    /// A service whose record store is a `MockRecordStore` over this fixture's memory store.
    fn with_faults(provider: MockProvider, faults: &Faults) -> Self {
        let memory = Arc::new(MemoryStore::new());
        let store = faulty_store(memory.clone(), faults);
        let mut f = Self::build(
            provider,
            Some(Arc::new(store)),
            vec![],
            Coalescing::default(),
        );
        f.records = memory;
        f
    }
}

/// A stream sink over a memory sink whose appends fail while `fail_appends` is on.
#[derive(Clone)]
struct FlakySink {
    inner: MemorySink,
    fail_appends: Arc<AtomicBool>,
}

struct FlakyAppender {
    inner: Box<dyn LogAppender>,
    fail: Arc<AtomicBool>,
}

#[async_trait]
impl LogAppender for FlakyAppender {
    fn stream_id(&self) -> &str {
        self.inner.stream_id()
    }

    async fn append(&mut self, entries: &[LogEntry]) -> Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::store("flaky", "log volume full"));
        }
        self.inner.append(entries).await
    }

    async fn flush(&mut self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }

    async fn abort(&mut self, reason: &str) -> Result<()> {
        self.inner.abort(reason).await
    }
}

#[async_trait]
impl StreamSink for FlakySink {
    fn name(&self) -> &str {
        "flaky"
    }

    async fn open_writer(&self, pid: &ProcessId) -> Result<Box<dyn LogAppender>> {
        Ok(Box::new(FlakyAppender {
            inner: self.inner.open_writer(pid).await?,
            fail: self.fail_appends.clone(),
        }))
    }

    async fn read(&self, pid: &ProcessId, from: ReadFrom, max: usize) -> Result<LogPage> {
        self.inner.read(pid, from, max).await
    }

    async fn follow(
        &self,
        pid: &ProcessId,
        from: ReadFrom,
    ) -> Result<BoxStream<'static, Result<LogEntry>>> {
        self.inner.follow(pid, from).await
    }

    async fn status(&self, pid: &ProcessId) -> Result<Option<crate::stream::LogStatus>> {
        self.inner.status(pid).await
    }

    async fn abandon(&self, pid: &ProcessId, reason: &str) -> Result<()> {
        self.inner.abandon(pid, reason).await
    }
}

/// A fixture with one sandbox created through a service whose log appends fail on demand.
async fn warm_with_flaky_log(
    h: MockSandboxHandle,
    coalescing: Coalescing,
) -> (Fixture, SandboxId, Arc<AtomicBool>) {
    let records = Arc::new(MemoryStore::new());
    let logs = MemorySink::new();
    let fail = Arc::new(AtomicBool::new(false));
    let svc = SandboxService::builder()
        .records(records.clone())
        .logs(Arc::new(FlakySink {
            inner: logs.clone(),
            fail_appends: fail.clone(),
        }))
        .provider(Arc::new(provider_creating(h)))
        .use_registry(false)
        .bootstrappers(vec![])
        .coalescing(coalescing)
        .build()
        .unwrap();
    let sid = svc.create(&config()).await.unwrap().id;
    (Fixture { svc, records, logs }, sid, fail)
}

struct Step {
    name: &'static str,
    fails: bool,
}

#[async_trait]
impl Bootstrapper for Step {
    fn name(&self) -> &str {
        self.name
    }

    fn applies(&self, _: &SandboxConfig) -> bool {
        true
    }

    async fn run(&self, _: &BootstrapContext<'_>) -> Result<Value> {
        if self.fails {
            Err(Error::StartFailed {
                message: "npm: not found".into(),
            })
        } else {
            Ok(json!({ "installed": ["skill-a"] }))
        }
    }
}

// ---- create ------------------------------------------------------------------------------

#[tokio::test]
async fn create_records_provider_params_and_bootstrap_results_and_caches_the_handle() {
    let p = provider_creating(handle());
    let f = Fixture::build(
        p,
        None,
        vec![Arc::new(Step {
            name: "skills",
            fails: false,
        })],
        Coalescing::default(),
    );
    let rec = f.svc.create(&config()).await.unwrap();
    assert_eq!(rec.status, SandboxStatus::Active);
    let stored = f.sandbox(&rec.id).await;
    assert_eq!(stored, rec);
    assert_eq!(stored.external_sandbox_id.as_deref(), Some(EXTERNAL_ID));
    let params = stored.params.unwrap();
    assert_eq!(params["team"], "core");
    assert_eq!(params[PROVIDER]["region"], "test");
    assert_eq!(params["skills"]["installed"][0], "skill-a");
    assert!(f.caches_handle(&rec.id));
}

#[tokio::test]
async fn create_failing_at_the_provider_records_error_and_caches_no_handle() {
    let mut p = provider();
    p.expect_create()
        .times(1)
        .returning(|_| Err(Error::provider(PROVIDER, "quota exceeded")));
    let f = Fixture::new(p);

    let err = f.svc.create(&config()).await.unwrap_err();
    assert_eq!(err.code(), "provider_error");

    let all = f.svc.list(&SandboxFilter::default()).await.unwrap();
    assert_eq!(all.len(), 1, "the creating record stays, as `error`");
    let rec = &all[0];
    assert_eq!(rec.status, SandboxStatus::Error);
    let params = rec.params.as_ref().unwrap();
    assert!(
        params["error"].as_str().unwrap().contains("quota exceeded"),
        "{params}"
    );
    assert_eq!(params["team"], "core", "caller params are kept");
    assert!(rec.external_sandbox_id.is_none());
    assert!(!f.caches_handle(&rec.id));
    let e = f
        .svc
        .run_command(&rec.id, ExecRequest::new(["true"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "sandbox_not_active:error");
}

#[tokio::test]
async fn a_failing_bootstrap_step_deletes_the_provider_object_and_records_error() {
    let mut h = handle();
    h.expect_stop()
        .with(eq(StopMode::Delete))
        .times(1)
        .returning(|_| Ok(()));
    let f = Fixture::build(
        provider_creating(h),
        None,
        vec![Arc::new(Step {
            name: "runtime",
            fails: true,
        })],
        Coalescing::default(),
    );

    let err = f.svc.create(&config()).await.unwrap_err();
    assert!(err.to_string().contains("runtime"), "{err}");
    assert!(err.to_string().contains("npm: not found"), "{err}");

    let all = f.svc.list(&SandboxFilter::default()).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].status, SandboxStatus::Error);
    let msg = all[0].params.as_ref().unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("npm: not found"), "{msg}");
    assert!(!f.caches_handle(&all[0].id));
}

/// A bootstrap step that fails with a given error.
struct FailingStep(fn() -> Error);

#[async_trait]
impl Bootstrapper for FailingStep {
    fn name(&self) -> &str {
        "skills"
    }

    fn applies(&self, _: &SandboxConfig) -> bool {
        true
    }

    async fn run(&self, _: &BootstrapContext<'_>) -> Result<Value> {
        Err((self.0)())
    }
}

#[tokio::test]
async fn a_failing_bootstrap_step_keeps_its_error_category() {
    type Case = (fn() -> Error, &'static str, bool);
    let cases: [Case; 4] = [
        (
            || Error::invalid("sandbox_skill_name_required", "a skill needs a name"),
            "sandbox_skill_name_required",
            false,
        ),
        (
            || Error::Unauthorized {
                provider: "instant".into(),
                message: "set INSTANT_ADMIN_TOKEN".into(),
            },
            "unauthorized",
            false,
        ),
        (
            || Error::Transient {
                provider: "instant".into(),
                message: "HTTP 503".into(),
            },
            "transient",
            true,
        ),
        (
            || Error::not_found(Missing::File, "/skills/a.md"),
            "provider_error",
            false,
        ),
    ];
    for (make, code, retryable) in cases {
        let mut h = handle();
        h.expect_stop()
            .with(eq(StopMode::Delete))
            .times(1)
            .returning(|_| Ok(()));
        let f = Fixture::build(
            provider_creating(h),
            None,
            vec![Arc::new(FailingStep(make))],
            Coalescing::default(),
        );
        let err = f.svc.create(&config()).await.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert_eq!(err.is_retryable(), retryable, "{err}");
        assert!(err.to_string().contains("`skills`"), "{err}");
        let all = f.svc.list(&SandboxFilter::default()).await.unwrap();
        assert_eq!(all[0].status, SandboxStatus::Error);
    }
}

#[tokio::test]
async fn a_failing_activation_write_deletes_the_provider_object_and_returns_the_error() {
    let mut h = handle();
    h.expect_stop()
        .with(eq(StopMode::Delete))
        .times(1)
        .returning(|_| Ok(()));
    let faults = Faults::default();
    faults.activation.store(true, Ordering::SeqCst);
    let f = Fixture::with_faults(provider_creating(h), &faults);

    let err = f.svc.create(&config()).await.unwrap_err();
    assert_eq!(err.code(), "store_error");
    assert!(err.to_string().contains("disk full"), "{err}");

    let all = f
        .records
        .list_sandboxes(&SandboxFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].status, SandboxStatus::Error, "never `active`");
    assert!(!f.caches_handle(&all[0].id));
}

// ---- commands ----------------------------------------------------------------------------

/// A fixture with one sandbox created through the service (its handle is cached).
async fn warm(h: MockSandboxHandle, coalescing: Coalescing) -> (Fixture, SandboxId) {
    let f = Fixture::build(provider_creating(h), None, vec![], coalescing);
    let rec = f.svc.create(&config()).await.unwrap();
    (f, rec.id)
}

#[tokio::test]
async fn a_command_that_fails_to_start_is_recorded_failed_with_a_closed_log() {
    let mut h = handle();
    h.expect_exec().times(1).returning(|_| {
        Err(Error::StartFailed {
            message: "no such file: nope".into(),
        })
    });
    let (f, sid) = warm(h, Coalescing::default()).await;

    let err = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["nope"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "command_failed_to_start");

    let procs = f.processes().await;
    assert_eq!(procs.len(), 1);
    let p = &procs[0];
    assert_eq!(p.status, ProcessStatus::Failed);
    assert_eq!(p.exit_code, None);
    assert!(p.exited_at.is_some() && p.stream_finished_at.is_some());
    assert!(p
        .stream_abort_reason
        .as_deref()
        .unwrap()
        .contains("no such file"));
    assert!(!f.runs(&p.id));

    let (chunks, state) = f.log(&p.id).await;
    assert_eq!(
        kinds(&chunks),
        [ChunkType::Status, ChunkType::Error, ChunkType::Exit]
    );
    assert_eq!(chunks[2].data.as_ref().unwrap()["status"], "failed");
    assert_eq!(state, LogState::Closed);
    assert_eq!(chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3]);
}

#[tokio::test]
async fn an_event_stream_that_ends_without_exit_is_a_failure_not_a_success() {
    let mut h = handle();
    h.expect_exec()
        .times(1)
        .returning(|_| Ok(scripted(vec![stdout("partial")])));
    h.expect_exec()
        .times(1)
        .returning(|_| Ok(scripted(vec![stdout("partial")])));
    let (f, sid) = warm(h, Coalescing::default()).await;

    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["build"])))
        .await
        .unwrap();
    let outcome = wait(&run).await.unwrap();
    assert_eq!(outcome.status, ProcessStatus::Failed);
    assert_eq!(outcome.exit_code, None);
    assert!(outcome.error.is_some());

    let rec = f.process(&run.process_id()).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    assert_eq!(rec.exit_code, None);
    let (chunks, state) = f.log(&run.process_id()).await;
    assert_eq!(
        kinds(&chunks),
        [
            ChunkType::Status,
            ChunkType::Stdout,
            ChunkType::Error,
            ChunkType::Exit
        ]
    );
    assert_eq!(chunks[1].text(), Some("partial"));
    assert_eq!(chunks[3].data.as_ref().unwrap()["status"], "failed");
    assert_eq!(state, LogState::Closed);

    // Buffered: an error, never an output with exit code 0.
    let err = f
        .svc
        .run_command(&sid, ExecRequest::new(["build"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "provider_error");
}

#[tokio::test]
async fn an_error_in_the_middle_of_the_event_stream_fails_the_process() {
    let lost = || Error::Transient {
        provider: PROVIDER.into(),
        message: "connection reset".into(),
    };
    let mut h = handle();
    h.expect_exec()
        .times(1)
        .returning(move |_| Ok(scripted(vec![stdout("a"), Err(lost()), exit(0)])));
    h.expect_exec()
        .times(1)
        .returning(move |_| Ok(scripted(vec![stdout("a"), Err(lost()), exit(0)])));
    let (f, sid) = warm(h, Coalescing::default()).await;

    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["build"])))
        .await
        .unwrap();
    let outcome = wait(&run).await.unwrap();
    assert_eq!(outcome.status, ProcessStatus::Failed);
    assert_ne!(outcome.exit_code, Some(0));
    assert!(outcome.error.unwrap().contains("connection reset"));
    let rec = f.process(&run.process_id()).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    assert_eq!(rec.exit_code, None);
    let t = f.svc.transcript(&run.process_id()).await.unwrap();
    assert_eq!(t.stdout, b"a");
    assert_eq!(t.status.as_deref(), Some("failed"));
    assert!(t.errors[0].contains("connection reset"));

    let err = f
        .svc
        .run_command(&sid, ExecRequest::new(["build"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "transient");
}

#[tokio::test]
async fn live_output_is_coalesced_and_readable_before_the_command_exits() {
    let (tx, exec) = live();
    let mut h = handle();
    h.expect_exec().times(1).return_once(move |_| Ok(exec));
    // Size-triggered chunks only: the delay never fires during the test.
    let coalescing = Coalescing {
        max_bytes: 8,
        max_delay: Duration::from_secs(3600),
    };
    let (f, sid) = warm(h, coalescing).await;

    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["build"])))
        .await
        .unwrap();
    assert_eq!(
        f.process(&run.process_id())
            .await
            .external_process_id
            .as_deref(),
        Some("pid-42")
    );
    let mut follow = run.follow(ReadFrom::START).await.unwrap();
    assert_eq!(next_chunk(&mut follow).await.kind, ChunkType::Status);

    for piece in ["abc", "def", "ghi"] {
        tx.send(stdout(piece)).unwrap();
    }
    let out = next_chunk(&mut follow).await;
    assert_eq!(out.kind, ChunkType::Stdout);
    assert_eq!(out.text(), Some("abcdefghi"), "three reads, one chunk");
    assert_eq!(out.seq, 2);
    // Still running: the output was written while the command ran.
    assert_eq!(
        f.process(&run.process_id()).await.status,
        ProcessStatus::Running
    );
    assert!(f.runs(&run.process_id()));

    // reconcile leaves a process this service runs alone.
    let report = f.svc.reconcile().await.unwrap();
    assert_eq!(report.alive, [run.process_id()]);
    assert!(report.lost.is_empty() && report.finalized.is_empty());

    tx.send(stdout("tail")).unwrap();
    tx.send(exit(0)).unwrap();
    let outcome = wait(&run).await.unwrap();
    assert_eq!(outcome.status, ProcessStatus::Exited);
    assert_eq!(outcome.exit_code, Some(0));

    let rest: Vec<_> = tokio::time::timeout(WAIT, follow.collect::<Vec<_>>())
        .await
        .expect("follow ends when the log closes");
    let rest: Vec<_> = rest
        .into_iter()
        .map(|e| e.unwrap().chunk().unwrap())
        .collect();
    assert_eq!(kinds(&rest), [ChunkType::Stdout, ChunkType::Exit]);
    assert_eq!(rest[0].text(), Some("tail"));
    let rec = f.process(&run.process_id()).await;
    assert_eq!(rec.status, ProcessStatus::Exited);
    assert_eq!(rec.exit_code, Some(0));
    assert_eq!(rec.metadata.unwrap()["lastSeq"], 4);
    assert!(!f.runs(&run.process_id()));
}

#[tokio::test(start_paused = true)]
async fn output_is_flushed_after_the_coalescing_delay_while_the_command_runs() {
    let (tx, exec) = live();
    let mut h = handle();
    h.expect_exec().times(1).return_once(move |_| Ok(exec));
    let (f, sid) = warm(h, Coalescing::default()).await;
    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["serve"])))
        .await
        .unwrap();
    let mut follow = run.follow(ReadFrom::START).await.unwrap();
    assert_eq!(next_chunk(&mut follow).await.kind, ChunkType::Status);

    tx.send(stdout("x")).unwrap();
    tx.send(stdout("y")).unwrap();
    // Time is paused: it advances to the coalescing deadline once everything is idle.
    let out = next_chunk(&mut follow).await;
    assert_eq!(out.text(), Some("xy"));
    // A switch of stream ends the pending chunk, in order.
    tx.send(stderr("e")).unwrap();
    tx.send(stdout("z")).unwrap();
    let a = next_chunk(&mut follow).await;
    let b = next_chunk(&mut follow).await;
    assert_eq!((a.kind, a.text()), (ChunkType::Stderr, Some("e")));
    assert_eq!((b.kind, b.text()), (ChunkType::Stdout, Some("z")));
    assert_eq!(
        f.process(&run.process_id()).await.status,
        ProcessStatus::Running
    );
    drop(tx);
    assert_eq!(wait(&run).await.unwrap().status, ProcessStatus::Failed);
}

#[tokio::test]
async fn a_character_split_across_reads_is_carried_not_replaced() {
    let euro = "€".as_bytes().to_vec();
    let mut h = handle();
    h.expect_exec().times(1).return_once(move |_| {
        Ok(scripted(vec![
            Ok(ExecEvent::Stdout(Bytes::copy_from_slice(&euro[..1]))),
            Ok(ExecEvent::Stdout(Bytes::copy_from_slice(&euro[1..]))),
            Ok(ExecEvent::Stdout(Bytes::from_static(b"\xFF!"))),
            exit(0),
        ]))
    });
    let (f, sid) = warm(h, Coalescing::default()).await;
    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["print"])))
        .await
        .unwrap();
    let (outcome, t) = run.output().await.unwrap();
    assert_eq!(outcome.status, ProcessStatus::Exited);
    assert_eq!(t.stdout, b"\xE2\x82\xAC\xFF!", "bytes survive exactly");
    let (chunks, _) = f.log(&run.process_id()).await;
    let texts: String = chunks
        .iter()
        .filter(|c| c.kind == ChunkType::Stdout)
        .filter_map(|c| c.text())
        .collect();
    assert!(texts.starts_with('€'), "{texts:?}");
}

#[tokio::test]
async fn kill_ends_a_running_process_as_killed() {
    let (tx, exec) = killable_by("SIGKILL");
    let mut h = handle();
    h.expect_exec().times(1).return_once(move |_| Ok(exec));
    let (f, sid) = warm(h, Coalescing::default()).await;
    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["sleep", "60"])))
        .await
        .unwrap();
    run.kill().await.unwrap();
    let outcome = wait(&run).await.unwrap();
    assert_eq!(outcome.status, ProcessStatus::Killed);
    assert_eq!(outcome.signal.as_deref(), Some("SIGKILL"));
    let rec = f.process(&run.process_id()).await;
    assert_eq!(rec.status, ProcessStatus::Killed);
    assert_eq!(rec.signal.as_deref(), Some("SIGKILL"));
    drop(tx);
}

#[tokio::test]
async fn a_kill_that_cannot_be_delivered_does_not_mark_the_process_killed() {
    // No kill control at all, then a control whose kill fails: both are errors, and the
    // command that then exits 0 is `exited`, not `killed`.
    for with_control in [false, true] {
        let (tx, mut exec) = live();
        if with_control {
            let mut control = MockExecControl::new();
            control.expect_kill().times(1).returning(|| {
                Err(Error::Transient {
                    provider: "local".into(),
                    message: "connection reset".into(),
                })
            });
            exec.control = Some(Arc::new(control));
        }
        let mut h = handle();
        h.expect_exec().times(1).return_once(move |_| Ok(exec));
        let (f, sid) = warm(h, Coalescing::default()).await;
        let run = f
            .svc
            .spawn(&sid, CommandSpec::new(ExecRequest::new(["sleep", "60"])))
            .await
            .unwrap();
        let err = run.kill().await.unwrap_err();
        if with_control {
            assert_eq!(err.code(), "transient", "{err}");
        } else {
            assert_eq!(err.code(), "kill_not_supported", "{err}");
            assert!(!err.to_string().contains("unknown"), "{err}");
        }
        tx.send(Ok(ExecEvent::Exit(ExitStatus::code(0)))).unwrap();
        let outcome = wait(&run).await.unwrap();
        assert_eq!(
            outcome.status,
            ProcessStatus::Exited,
            "control: {with_control}"
        );
        assert_eq!(
            f.process(&run.process_id()).await.status,
            ProcessStatus::Exited
        );
    }
}

// ---- warm operations ---------------------------------------------------------------------

#[tokio::test]
async fn warm_operations_cost_one_provider_call() {
    let mut h = handle();
    h.expect_exec()
        .times(2)
        .returning(|_| Ok(scripted(vec![stdout("ok"), exit(0)])));
    h.expect_read_file()
        .times(1)
        .returning(|_| Ok(Some(Bytes::from_static(b"x"))));
    // Created here: no `resume` expectation, so a resume would panic.
    let (f, sid) = warm(h, Coalescing::default()).await;
    for _ in 0..2 {
        let out = f
            .svc
            .run_command(&sid, ExecRequest::new(["echo", "ok"]))
            .await
            .unwrap();
        assert_eq!(out.stdout, "ok");
        assert!(out.exit.success());
    }
    assert_eq!(f.svc.read_file(&sid, "a.txt").await.unwrap().unwrap(), "x");
}

#[tokio::test]
async fn a_cold_service_resumes_once_then_reuses_the_handle() {
    let mut h = handle();
    h.expect_exec()
        .times(2)
        .returning(|_| Ok(scripted(vec![exit(0)])));
    let f = Fixture::new(provider_resuming(h));
    let sb = f.seed_sandbox(SandboxStatus::Active).await;
    for _ in 0..2 {
        f.svc
            .run_command(&sb.id, ExecRequest::new(["true"]))
            .await
            .unwrap();
    }
    assert!(f.caches_handle(&sb.id));
}

// ---- stop --------------------------------------------------------------------------------

#[tokio::test]
async fn stop_when_the_provider_no_longer_has_the_sandbox_marks_it_shutdown() {
    let mut p = provider();
    p.expect_resume()
        .times(1)
        .returning(|_| Err(Error::not_found(Missing::Sandbox, EXTERNAL_ID)));
    let f = Fixture::new(p);
    let sb = f.seed_sandbox(SandboxStatus::Active).await;
    let open = f.seed_process(&sb.id).await;

    let rec = f.svc.stop(&sb.id, StopMode::Default).await.unwrap();
    assert_eq!(rec.status, SandboxStatus::Shutdown);
    assert!(rec.shutdown_at.is_some());
    assert_eq!(f.sandbox(&sb.id).await.status, SandboxStatus::Shutdown);
    let p = f.process(&open.id).await;
    assert_eq!(p.status, ProcessStatus::Lost);
    assert_eq!(
        p.stream_abort_reason.as_deref(),
        Some(REASON_SANDBOX_STOPPED)
    );
    assert_eq!(p.metadata.unwrap()["lostReason"], REASON_SANDBOX_STOPPED);
}

#[tokio::test]
async fn stop_of_a_cached_handle_the_provider_lost_marks_it_shutdown() {
    let mut h = handle();
    h.expect_stop()
        .times(1)
        .returning(|_| Err(Error::not_found(Missing::Sandbox, EXTERNAL_ID)));
    let (f, sid) = warm(h, Coalescing::default()).await;
    let rec = f.svc.stop(&sid, StopMode::Default).await.unwrap();
    assert_eq!(rec.status, SandboxStatus::Shutdown);
    assert!(!f.caches_handle(&sid));
}

#[tokio::test]
async fn stop_of_a_stopped_sandbox_makes_no_provider_call() {
    // No `resume` expectation: any provider call panics.
    let f = Fixture::new(provider());
    for status in [SandboxStatus::Shutdown, SandboxStatus::Error] {
        let sb = f.seed_sandbox(status).await;
        let rec = f.svc.stop(&sb.id, StopMode::Delete).await.unwrap();
        assert_eq!(rec, sb, "unchanged");
        assert_eq!(f.sandbox(&sb.id).await, sb);
    }
}

#[tokio::test]
async fn stop_resumes_once_and_only_stops() {
    let mut h = handle();
    // The handle allows exactly one `stop`; any exec, restore or second call panics.
    h.expect_stop()
        .with(eq(StopMode::Keep))
        .times(1)
        .returning(|_| Ok(()));
    let f = Fixture::new(provider_resuming(h));
    let sb = f.seed_sandbox(SandboxStatus::Active).await;
    let rec = f.svc.stop(&sb.id, StopMode::Keep).await.unwrap();
    assert_eq!(rec.status, SandboxStatus::Shutdown);
    // Stopping again is a no-op: no second resume, no second stop.
    let again = f.svc.stop(&sb.id, StopMode::Keep).await.unwrap();
    assert_eq!(again.status, SandboxStatus::Shutdown);
}

#[tokio::test]
async fn a_failing_provider_stop_leaves_the_record_unchanged_for_a_retry() {
    let mut h = handle();
    h.expect_stop().times(1).returning(|_| {
        Err(Error::Transient {
            provider: PROVIDER.into(),
            message: "502".into(),
        })
    });
    let (f, sid) = warm(h, Coalescing::default()).await;
    let err = f.svc.stop(&sid, StopMode::Default).await.unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(f.sandbox(&sid).await.status, SandboxStatus::Active);
}

#[tokio::test]
async fn stop_kills_the_processes_it_runs_and_records_them_killed() {
    let (tx, exec) = killable_by("SIGTERM");
    let mut h = handle();
    h.expect_exec().times(1).return_once(move |_| Ok(exec));
    h.expect_stop().times(1).returning(|_| Ok(()));
    let (f, sid) = warm(h, Coalescing::default()).await;
    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["serve"])))
        .await
        .unwrap();

    f.svc.stop(&sid, StopMode::Default).await.unwrap();
    let rec = f.process(&run.process_id()).await;
    assert_eq!(rec.status, ProcessStatus::Killed);
    assert_eq!(wait(&run).await.unwrap().status, ProcessStatus::Killed);
    drop(tx);
}

// ---- store failures ----------------------------------------------------------------------

#[tokio::test]
async fn a_failing_process_insert_runs_nothing_and_leaves_nothing_running() {
    let mut h = handle();
    h.expect_exec().never();
    let faults = Faults::default();
    let f = Fixture::with_faults(provider_creating(h), &faults);
    let sid = f.svc.create(&config()).await.unwrap().id;
    faults.insert_process.store(true, Ordering::SeqCst);

    let err = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["build"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "store_error");
    assert!(f.processes().await.is_empty());
    assert!(lock(&f.svc.inner.running).is_empty());

    let err = f
        .svc
        .start_observed(
            &sid,
            ObservedSpec {
                argv: vec!["agent".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "store_error");
    assert!(f.processes().await.is_empty());
    assert!(lock(&f.svc.inner.observed).is_empty());
}

#[tokio::test]
async fn a_failing_final_record_write_is_an_error_and_reconcile_repairs_it() {
    let (tx, exec) = live();
    let mut h = handle();
    h.expect_exec().times(1).return_once(move |_| Ok(exec));
    let faults = Faults::default();
    let f = Fixture::with_faults(provider_creating(h), &faults);
    let sid = f.svc.create(&config()).await.unwrap().id;
    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["build"])))
        .await
        .unwrap();
    let pid = run.process_id();

    faults.patch_process.store(true, Ordering::SeqCst);
    tx.send(stdout("done")).unwrap();
    tx.send(exit(0)).unwrap();
    let err = wait(&run).await.unwrap_err();
    assert_eq!(err.code(), "store_error");
    // The service does not think it still runs the process.
    assert!(!f.runs(&pid));
    assert!(f.svc.kill(&pid).await.unwrap_err().is_not_found());
    // The log is complete; the record could not be finalised.
    let (chunks, state) = f.log(&pid).await;
    assert_eq!(chunks.last().unwrap().kind, ChunkType::Exit);
    assert_eq!(state, LogState::Closed);
    assert_eq!(f.process(&pid).await.status, ProcessStatus::Running);

    // Once the store works again, reconcile finalises the record from the log.
    faults.patch_process.store(false, Ordering::SeqCst);
    let report = f.svc.reconcile().await.unwrap();
    assert_eq!(report.finalized, [pid]);
    let rec = f.process(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Exited);
    assert_eq!(rec.exit_code, Some(0));
}

// ---- status guards and input validation --------------------------------------------------

#[tokio::test]
async fn operations_on_a_sandbox_that_is_not_active_are_refused_with_its_status() {
    // No expectations: any provider call panics.
    let f = Fixture::new(provider());
    for status in [
        SandboxStatus::Creating,
        SandboxStatus::Shutdown,
        SandboxStatus::Error,
    ] {
        let id = f.seed_sandbox(status).await.id;
        let want = format!("sandbox_not_active:{status}");
        let codes = [
            f.svc
                .run_command(&id, ExecRequest::new(["true"]))
                .await
                .unwrap_err()
                .code(),
            f.svc
                .spawn(&id, CommandSpec::new(ExecRequest::new(["true"])))
                .await
                .unwrap_err()
                .code(),
            f.svc
                .start_observed(
                    &id,
                    ObservedSpec {
                        argv: vec!["agent".into()],
                        ..Default::default()
                    },
                )
                .await
                .unwrap_err()
                .code(),
            f.svc
                .write_files(&id, vec![FileWrite::new("a.txt", "x")])
                .await
                .unwrap_err()
                .code(),
            f.svc.read_file(&id, "a.txt").await.unwrap_err().code(),
            f.svc.port_url(&id, 3000).await.unwrap_err().code(),
            f.svc.checkpoint(&id, None).await.unwrap_err().code(),
            f.svc.list_checkpoints(&id).await.unwrap_err().code(),
            f.svc.restore(&id, "v1").await.unwrap_err().code(),
            f.svc.reconnect(&id).await.unwrap_err().code(),
        ];
        for (i, code) in codes.iter().enumerate() {
            assert_eq!(code, &want, "operation #{i} on a {status} sandbox");
        }
    }
    assert!(f.processes().await.is_empty());
}

#[tokio::test]
async fn invalid_commands_change_nothing_and_make_no_provider_call() {
    // Cold service, no `resume` expectation: validation happens before any provider call.
    let f = Fixture::new(provider());
    let sid = f.seed_sandbox(SandboxStatus::Active).await.id;
    let bad = [
        (
            ExecRequest::new(["env"]).env("BAD-KEY", "v"),
            "sandbox_env_key_invalid:BAD-KEY",
        ),
        (
            ExecRequest::new(Vec::<String>::new()),
            "sandbox_command_required",
        ),
        (ExecRequest::new([" "]), "sandbox_command_required"),
        (ExecRequest::new(["a\0b"]), "sandbox_command_invalid"),
    ];
    for (req, code) in bad {
        let e = f.svc.run_command(&sid, req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code);
        let e = f.svc.spawn(&sid, CommandSpec::new(req)).await.unwrap_err();
        assert_eq!(e.code(), code);
    }
    assert!(f.processes().await.is_empty());
    assert!(!f.caches_handle(&sid));
    assert_eq!(f.sandbox(&sid).await.status, SandboxStatus::Active);
}

#[tokio::test]
async fn paths_outside_the_workspace_change_nothing() {
    let mut h = handle();
    h.expect_exec().never();
    h.expect_write_files().never();
    h.expect_read_file().never();
    let (f, sid) = warm(h, Coalescing::default()).await;
    for cwd in ["..", "/etc", "a/../../x"] {
        let req = ExecRequest::new(["ls"]).cwd(cwd);
        let e = f.svc.run_command(&sid, req.clone()).await.unwrap_err();
        assert_eq!(e.code(), "sandbox_path_outside_workspace", "{cwd}");
        let e = f.svc.spawn(&sid, CommandSpec::new(req)).await.unwrap_err();
        assert_eq!(e.code(), "sandbox_path_outside_workspace", "{cwd}");
    }
    // One bad path among good ones: nothing is written.
    let e = f
        .svc
        .write_files(
            &sid,
            vec![
                FileWrite::new("ok.txt", "x"),
                FileWrite::new("../escape.txt", "x"),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "sandbox_path_outside_workspace");
    let e = f.svc.read_file(&sid, "/etc/passwd").await.unwrap_err();
    assert_eq!(e.code(), "sandbox_path_outside_workspace");
    assert_eq!(
        f.svc.port_url(&sid, 0).await.unwrap_err().code(),
        "sandbox_port_invalid"
    );
    assert_eq!(
        f.svc.restore(&sid, " ").await.unwrap_err().code(),
        "checkpoint_id_required"
    );
    assert!(f.processes().await.is_empty());
}

#[tokio::test]
async fn commands_run_in_the_confined_cwd_with_env_keys_recorded_but_not_values() {
    let mut h = handle();
    h.expect_exec()
        .withf(|req| {
            req.cwd.as_deref() == Some("/workspace/app")
                && req.env.get("API_TOKEN").map(String::as_str) == Some("s3cret")
        })
        .times(1)
        .returning(|_| Ok(scripted(vec![exit(0)])));
    let (f, sid) = warm(h, Coalescing::default()).await;
    let run = f
        .svc
        .spawn(
            &sid,
            CommandSpec::new(
                ExecRequest::new(["ls"])
                    .cwd("./app/")
                    .env("API_TOKEN", "s3cret"),
            ),
        )
        .await
        .unwrap();
    wait(&run).await.unwrap();
    let rec = f.process(&run.process_id()).await;
    assert_eq!(rec.cwd.as_deref(), Some("/workspace/app"));
    let stored = serde_json::to_string(&rec).unwrap();
    assert!(stored.contains("API_TOKEN"));
    assert!(!stored.contains("s3cret"), "{stored}");
    let (chunks, _) = f.log(&run.process_id()).await;
    assert!(chunks.iter().all(|c| !c.encode().contains("s3cret")));
    let shown = format!("{:?}", ExecRequest::new(["ls"]).env("API_TOKEN", "s3cret"));
    assert!(!shown.contains("s3cret"), "{shown}");
}

// ---- observed processes ------------------------------------------------------------------

fn observed_spec() -> ObservedSpec {
    ObservedSpec {
        argv: vec!["codex".into(), "app-server".into()],
        external_process_id: Some("agent-7".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_observed_start_with_a_bad_env_key_records_nothing() {
    let (f, sid) = warm(handle(), Coalescing::default()).await;
    let spec = ObservedSpec {
        env_keys: vec!["HOME".into(), "BAD-KEY".into()],
        ..observed_spec()
    };
    let err = f.svc.start_observed(&sid, spec).await.unwrap_err();
    assert_eq!(err.code(), "sandbox_env_key_invalid:BAD-KEY");
    assert!(f.processes().await.is_empty());
    assert!(lock(&f.svc.inner.observed).is_empty());
}

#[tokio::test]
async fn observed_output_with_nul_keeps_its_exact_bytes() {
    let (f, sid) = warm(handle(), Coalescing::default()).await;
    let pid = f.svc.start_observed(&sid, observed_spec()).await.unwrap();
    let raw = json!({ "text": "a\u{0}b" }).as_object().cloned();
    f.svc
        .append_observed(&pid, ChunkType::Stdout, raw)
        .await
        .unwrap();
    f.svc
        .finish_observed(&pid, ObservedFinish::default())
        .await
        .unwrap();
    let page = f.svc.read_log(&pid, ReadFrom::Seq(2), 1).await.unwrap();
    let chunk = page.entries[0].chunk().unwrap();
    assert_eq!(chunk.text(), Some("ab"));
    assert_eq!(f.svc.transcript(&pid).await.unwrap().stdout, b"a\0b");
}

fn text(s: &str) -> Option<Map<String, Value>> {
    Some(output_data(s.as_bytes()))
}

#[tokio::test]
async fn observed_processes_append_in_order_and_finish_with_exit() {
    let (f, sid) = warm(handle(), Coalescing::default()).await;
    let pid = f.svc.start_observed(&sid, observed_spec()).await.unwrap();
    let rec = f.process(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Running);
    assert_eq!(rec.external_process_id.as_deref(), Some("agent-7"));
    assert_eq!(rec.metadata.as_ref().unwrap()["observed"], true);

    assert_eq!(
        f.svc
            .append_observed(&pid, ChunkType::Stdout, text("hello "))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        f.svc
            .append_observed(&pid, ChunkType::Stdout, text("world"))
            .await
            .unwrap(),
        3
    );
    // A second instance (another OS process, after a restart) cannot write this log.
    let other = f.restarted(provider_resuming(handle()));
    let e = other
        .append_observed(&pid, ChunkType::Stdout, text("intruder"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "sandbox_process_stream_writer_elsewhere");
    let e = other
        .finish_observed(&pid, ObservedFinish::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), "sandbox_process_stream_writer_elsewhere");
    // Nor does its reconcile take the process for lost: the writer is alive.
    let report = other.reconcile().await.unwrap();
    assert_eq!(report.alive, [pid]);
    assert!(report.lost.is_empty());

    let outcome = f
        .svc
        .finish_observed(&pid, ObservedFinish::exit(0))
        .await
        .unwrap();
    assert_eq!(outcome.status, ProcessStatus::Exited);
    let (chunks, state) = f.log(&pid).await;
    assert_eq!(
        kinds(&chunks),
        [
            ChunkType::Status,
            ChunkType::Stdout,
            ChunkType::Stdout,
            ChunkType::Exit
        ]
    );
    assert_eq!(
        chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(chunks[3].data.as_ref().unwrap()["exitCode"], 0);
    assert_eq!(state, LogState::Closed);
    let rec = f.process(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Exited);
    assert_eq!(rec.exit_code, Some(0));
    assert_eq!(rec.metadata.as_ref().unwrap()["lastSeq"], 4);
    assert_eq!(rec.metadata.as_ref().unwrap()["observed"], true);

    let e = f
        .svc
        .append_observed(&pid, ChunkType::Stdout, text("late"))
        .await
        .unwrap_err();
    assert!(
        e.code().starts_with("sandbox_process_stream_"),
        "{}",
        e.code()
    );
}

#[tokio::test]
async fn an_observed_failure_writes_error_then_exit() {
    let (f, sid) = warm(handle(), Coalescing::default()).await;
    let pid = f.svc.start_observed(&sid, observed_spec()).await.unwrap();
    let outcome = f
        .svc
        .finish_observed(
            &pid,
            ObservedFinish {
                exit_code: Some(2),
                error_text: Some("agent crashed".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome.status, ProcessStatus::Failed);
    let t = f.svc.transcript(&pid).await.unwrap();
    assert_eq!(t.errors, ["agent crashed"]);
    assert_eq!(t.exit_code, Some(2));
    let rec = f.process(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    assert_eq!(rec.stream_abort_reason.as_deref(), Some("agent crashed"));
}

#[tokio::test]
async fn stopping_a_sandbox_ends_its_observed_processes() {
    let mut h = handle();
    h.expect_stop().times(1).returning(|_| Ok(()));
    let (f, sid) = warm(h, Coalescing::default()).await;
    let pid = f.svc.start_observed(&sid, observed_spec()).await.unwrap();
    f.svc.stop(&sid, StopMode::Default).await.unwrap();

    let rec = f.process(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Lost);
    assert_eq!(
        rec.stream_abort_reason.as_deref(),
        Some(REASON_SANDBOX_STOPPED)
    );
    // The log ends too, and the service no longer holds a writer it would append with.
    let (_, state) = f.log(&pid).await;
    assert!(state.is_finished(), "{state:?}");
    assert!(f
        .svc
        .append_observed(&pid, ChunkType::Stdout, text("late"))
        .await
        .is_err());
    let report = f.svc.reconcile().await.unwrap();
    assert!(report.alive.is_empty(), "{report:?}");
}

// ---- reconcile ---------------------------------------------------------------------------

#[tokio::test]
async fn reconcile_marks_dead_writers_lost_leaves_live_ones_and_finalises_from_the_log() {
    let f = Fixture::new(provider_resuming(handle()));
    let sid = f.seed_sandbox(SandboxStatus::Active).await.id;

    // Its writer died without closing the log.
    let dead = f.seed_process(&sid).await;
    let mut w = ChunkWriter::open(&f.logs, sid, dead.id).await.unwrap();
    w.append(ChunkType::Status, None).await.unwrap();
    drop(w);
    // Its writer is alive (held here).
    let alive = f.seed_process(&sid).await;
    let mut live_writer = ChunkWriter::open(&f.logs, sid, alive.id).await.unwrap();
    live_writer.append(ChunkType::Status, None).await.unwrap();
    // Its log ended with an exit chunk, but the record was never finalised.
    let ended = f.seed_process(&sid).await;
    let mut w = ChunkWriter::open(&f.logs, sid, ended.id).await.unwrap();
    w.append(ChunkType::Status, None).await.unwrap();
    w.append(
        ChunkType::Exit,
        json!({ "exitCode": 3, "status": "failed" })
            .as_object()
            .cloned(),
    )
    .await
    .unwrap();
    w.close().await.unwrap();
    // It never got a log at all.
    let no_log = f.seed_process(&sid).await;

    let report = f.svc.reconcile().await.unwrap();
    let mut lost = report.lost.clone();
    lost.sort();
    let mut want = vec![
        (dead.id, REASON_WRITER_LOST.to_string()),
        (no_log.id, REASON_WRITER_LOST.to_string()),
    ];
    want.sort();
    assert_eq!(lost, want);
    assert_eq!(report.alive, [alive.id]);
    assert_eq!(report.finalized, [ended.id]);
    assert!(report.gone.is_empty());

    let d = f.process(&dead.id).await;
    assert_eq!(d.status, ProcessStatus::Lost);
    assert_eq!(d.stream_abort_reason.as_deref(), Some(REASON_WRITER_LOST));
    assert_eq!(
        f.log(&dead.id).await.1,
        LogState::Aborted {
            reason: REASON_WRITER_LOST.into()
        }
    );
    assert_eq!(f.process(&alive.id).await.status, ProcessStatus::Running);
    assert_eq!(
        live_writer
            .append(ChunkType::Heartbeat, None)
            .await
            .unwrap(),
        2
    );
    let e = f.process(&ended.id).await;
    assert_eq!(e.status, ProcessStatus::Failed);
    assert_eq!(e.exit_code, Some(3));
    assert_eq!(f.process(&no_log.id).await.status, ProcessStatus::Lost);
    // The active sandbox was checked once and its handle kept.
    assert!(f.caches_handle(&sid));
}

#[tokio::test]
async fn reconcile_marks_a_process_with_a_corrupt_log_lost_and_goes_on() {
    let f = Fixture::new(provider_resuming(handle()));
    let sid = f.seed_sandbox(SandboxStatus::Active).await.id;
    // A closed log whose only line is not a chunk.
    let corrupt = f.seed_process(&sid).await;
    let mut appender = f.logs.open_writer(&corrupt.id).await.unwrap();
    appender
        .append(&[LogEntry {
            seq: 1,
            offset: 0,
            line: "not json\n".into(),
        }])
        .await
        .unwrap();
    appender.close().await.unwrap();
    // A dead writer after it, which must still be handled.
    let dead = f.seed_process(&sid).await;
    let mut w = ChunkWriter::open(&f.logs, sid, dead.id).await.unwrap();
    w.append(ChunkType::Status, None).await.unwrap();
    drop(w);

    let report = f.svc.reconcile().await.unwrap();
    let mut lost: Vec<_> = report.lost.iter().map(|(p, _)| *p).collect();
    lost.sort();
    let mut want = vec![corrupt.id, dead.id];
    want.sort();
    assert_eq!(lost, want);
    assert!(report.finalized.is_empty());
    assert_eq!(f.process(&corrupt.id).await.status, ProcessStatus::Lost);
    assert_eq!(f.process(&dead.id).await.status, ProcessStatus::Lost);
}

#[tokio::test]
async fn reconcile_marks_sandboxes_the_provider_no_longer_has_shutdown() {
    let mut p = provider();
    p.expect_resume()
        .times(1)
        .returning(|_| Err(Error::not_found(Missing::Sandbox, EXTERNAL_ID)));
    let f = Fixture::new(p);
    let sid = f.seed_sandbox(SandboxStatus::Active).await.id;
    let report = f.svc.reconcile().await.unwrap();
    assert_eq!(report.gone, [sid]);
    assert_eq!(f.sandbox(&sid).await.status, SandboxStatus::Shutdown);
}

// ---- log write failures ------------------------------------------------------------------

#[tokio::test]
async fn a_log_that_cannot_be_written_kills_the_command_and_fails_the_process() {
    let (tx, mut exec) = live();
    let mut control = MockExecControl::new();
    control.expect_kill().times(1).returning(|| Ok(()));
    exec.control = Some(Arc::new(control));
    let mut h = handle();
    h.expect_exec().times(1).return_once(move |_| Ok(exec));
    let one_byte_chunks = Coalescing {
        max_bytes: 1,
        max_delay: Duration::from_secs(3600),
    };
    let (f, sid, fail) = warm_with_flaky_log(h, one_byte_chunks).await;
    let run = f
        .svc
        .spawn(&sid, CommandSpec::new(ExecRequest::new(["build"])))
        .await
        .unwrap();
    fail.store(true, Ordering::SeqCst);
    tx.send(stdout("x")).unwrap();

    let err = wait(&run).await.unwrap_err();
    assert_eq!(err.code(), "store_error");
    assert!(!f.runs(&run.process_id()));
    let rec = f.process(&run.process_id()).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    assert!(rec
        .stream_abort_reason
        .unwrap()
        .starts_with("log_write_failed"));
    let (_, state) = f.log(&run.process_id()).await;
    assert!(matches!(state, LogState::Aborted { .. }), "{state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_concurrent_wait_on_a_failed_run_sees_the_failure() {
    let (tx, mut exec) = live();
    let mut control = MockExecControl::new();
    control.expect_kill().times(1).returning(|| Ok(()));
    exec.control = Some(Arc::new(control));
    let mut h = handle();
    h.expect_exec().times(1).return_once(move |_| Ok(exec));
    let one_byte_chunks = Coalescing {
        max_bytes: 1,
        max_delay: Duration::from_secs(3600),
    };
    let (f, sid, fail) = warm_with_flaky_log(h, one_byte_chunks).await;
    let run = Arc::new(
        f.svc
            .spawn(&sid, CommandSpec::new(ExecRequest::new(["build"])))
            .await
            .unwrap(),
    );
    let waiters: Vec<_> = (0..16)
        .map(|_| {
            let run = run.clone();
            tokio::spawn(async move { wait(&run).await })
        })
        .collect();
    fail.store(true, Ordering::SeqCst);
    tx.send(stdout("x")).unwrap();
    for w in waiters {
        let got = w.await.unwrap();
        assert_eq!(got.unwrap_err().code(), "store_error");
    }
}

#[tokio::test]
async fn an_observed_start_whose_log_cannot_be_written_leaves_no_running_record() {
    let (f, sid, fail) = warm_with_flaky_log(handle(), Coalescing::default()).await;
    fail.store(true, Ordering::SeqCst);
    let err = f
        .svc
        .start_observed(&sid, observed_spec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "store_error");
    assert!(lock(&f.svc.inner.observed).is_empty());
    for p in f.processes().await {
        assert!(p.status.is_terminal(), "{:?} left {}", p.id, p.status);
        let (_, state) = f.log(&p.id).await;
        assert!(state.is_finished(), "{state:?}");
    }
}

#[tokio::test]
async fn a_failed_observed_finish_can_be_retried() {
    let (f, sid, fail) = warm_with_flaky_log(handle(), Coalescing::default()).await;
    let pid = f.svc.start_observed(&sid, observed_spec()).await.unwrap();
    fail.store(true, Ordering::SeqCst);
    let err = f
        .svc
        .finish_observed(&pid, ObservedFinish::exit(0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "store_error");
    assert_eq!(f.process(&pid).await.status, ProcessStatus::Running);

    fail.store(false, Ordering::SeqCst);
    let outcome = f
        .svc
        .finish_observed(&pid, ObservedFinish::exit(0))
        .await
        .unwrap();
    assert_eq!(outcome.status, ProcessStatus::Exited);
    let (chunks, state) = f.log(&pid).await;
    assert_eq!(kinds(&chunks), [ChunkType::Status, ChunkType::Exit]);
    assert_eq!(chunks[1].seq, 2);
    assert_eq!(state, LogState::Closed);
    assert_eq!(f.process(&pid).await.status, ProcessStatus::Exited);
}

// ---- more of the contract ----------------------------------------------------------------

#[tokio::test]
async fn a_transient_resume_failure_leaves_the_record_active_and_is_retried() {
    let mut p = provider();
    let mut seq = mockall::Sequence::new();
    p.expect_resume()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| {
            Err(Error::Transient {
                provider: PROVIDER.into(),
                message: "connection reset".into(),
            })
        });
    let mut h = handle();
    h.expect_exec()
        .times(1)
        .returning(|_| Ok(scripted(vec![exit(0)])));
    p.expect_resume()
        .times(1)
        .in_sequence(&mut seq)
        .return_once(move |_| Ok(Arc::new(h) as Arc<dyn SandboxHandle>));
    let f = Fixture::new(p);
    let sid = f.seed_sandbox(SandboxStatus::Active).await.id;

    let e = f
        .svc
        .run_command(&sid, ExecRequest::new(["true"]))
        .await
        .unwrap_err();
    assert!(e.is_retryable());
    assert_eq!(f.sandbox(&sid).await.status, SandboxStatus::Active);
    assert!(!f.caches_handle(&sid));
    f.svc
        .run_command(&sid, ExecRequest::new(["true"]))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_operation_on_a_sandbox_the_provider_lost_marks_it_shutdown() {
    let mut p = provider();
    p.expect_resume()
        .times(1)
        .returning(|_| Err(Error::not_found(Missing::Sandbox, EXTERNAL_ID)));
    let f = Fixture::new(p);
    let sid = f.seed_sandbox(SandboxStatus::Active).await.id;
    let open = f.seed_process(&sid).await;
    let e = f.svc.read_file(&sid, "a.txt").await.unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(f.sandbox(&sid).await.status, SandboxStatus::Shutdown);
    let p = f.process(&open.id).await;
    assert_eq!(p.status, ProcessStatus::Lost);
    assert_eq!(p.stream_abort_reason.as_deref(), Some(REASON_SANDBOX_GONE));
    // The cached record follows: the next call is refused without asking the provider.
    let e = f.svc.read_file(&sid, "a.txt").await.unwrap_err();
    assert_eq!(e.code(), "sandbox_not_active:shutdown");
}

#[tokio::test]
async fn checkpoints_are_recorded_in_the_provider_params() {
    let mut h = handle();
    h.expect_checkpoint()
        .with(eq(Some("before upgrade".to_string())))
        .times(1)
        .returning(|comment| {
            Ok(Checkpoint {
                id: "v1".into(),
                comment,
                created_at: Some(1),
            })
        });
    h.expect_list_checkpoints().times(1).returning(|| {
        Ok(vec![Checkpoint {
            id: "v1".into(),
            comment: None,
            created_at: Some(1),
        }])
    });
    h.expect_restore()
        .with(eq("v1"))
        .times(1)
        .returning(|_| Ok(()));
    let (f, sid) = warm(h, Coalescing::default()).await;

    let cp = f
        .svc
        .checkpoint(&sid, Some("before upgrade".into()))
        .await
        .unwrap();
    assert_eq!(cp.id, "v1");
    assert_eq!(f.svc.list_checkpoints(&sid).await.unwrap().len(), 1);
    f.svc.restore(&sid, " v1 ").await.unwrap();

    let params = f.sandbox(&sid).await.params.unwrap();
    assert_eq!(params[PROVIDER]["lastCheckpointId"], "v1");
    assert_eq!(params[PROVIDER]["lastRestoredCheckpointId"], "v1");
    assert_eq!(
        params[PROVIDER]["region"], "test",
        "provider bookkeeping is kept"
    );
    assert_eq!(params["team"], "core");
}

#[tokio::test]
async fn an_unsupported_operation_is_a_typed_error() {
    let mut h = handle();
    h.expect_checkpoint()
        .returning(|_| crate::provider::unsupported(PROVIDER, "checkpoint"));
    h.expect_port_url()
        .returning(|_| crate::provider::unsupported(PROVIDER, "port_url"));
    let (f, sid) = warm(h, Coalescing::default()).await;
    assert_eq!(
        f.svc.checkpoint(&sid, None).await.unwrap_err().code(),
        "checkpoint_not_supported"
    );
    assert_eq!(
        f.svc.port_url(&sid, 8080).await.unwrap_err().code(),
        "sandbox_port_url_not_supported"
    );
    let params = f.sandbox(&sid).await.params.unwrap();
    assert!(params[PROVIDER].get("lastCheckpointId").is_none());
}

#[tokio::test]
async fn exit_statuses_map_to_process_statuses() {
    let cases = [
        (ExitStatus::code(0), ProcessStatus::Exited),
        (ExitStatus::code(3), ProcessStatus::Failed),
        (
            ExitStatus {
                code: None,
                signal: Some("SIGSEGV".into()),
                timed_out: false,
            },
            ProcessStatus::Killed,
        ),
        (
            ExitStatus {
                code: Some(124),
                signal: None,
                timed_out: true,
            },
            ProcessStatus::Killed,
        ),
    ];
    let mut h = handle();
    for (exit_status, _) in cases.clone() {
        h.expect_exec().times(1).return_once(move |_| {
            Ok(scripted(vec![
                stderr("why"),
                Ok(ExecEvent::Exit(exit_status)),
            ]))
        });
    }
    let (f, sid) = warm(h, Coalescing::default()).await;
    for (exit_status, want) in cases {
        let run = f
            .svc
            .spawn(&sid, CommandSpec::new(ExecRequest::new(["x"])))
            .await
            .unwrap();
        let outcome = wait(&run).await.unwrap();
        assert_eq!(outcome.status, want, "{exit_status:?}");
        // A second wait gives the same answer.
        assert_eq!(wait(&run).await.unwrap(), outcome);
        let rec = f.process(&run.process_id()).await;
        assert_eq!(rec.status, want);
        assert_eq!(rec.exit_code, exit_status.code.map(i64::from));
        assert_eq!(rec.signal, exit_status.signal);
        let (chunks, _) = f.log(&run.process_id()).await;
        let last = chunks.last().unwrap();
        assert_eq!(last.kind, ChunkType::Exit);
        let data = last.data.as_ref().unwrap();
        assert_eq!(data["status"], want.as_str());
        assert_eq!(data.get("timedOut").is_some(), exit_status.timed_out);
        let t = f.svc.transcript(&run.process_id()).await.unwrap();
        assert_eq!(t.stderr, b"why");
    }
}

#[tokio::test]
async fn create_with_an_unknown_provider_writes_nothing() {
    let f = Fixture::new(provider());
    let config = SandboxConfig {
        provider: Some(ProviderSelector::Name("elsewhere".into())),
        ..Default::default()
    };
    let e = f.svc.create(&config).await.unwrap_err();
    assert_eq!(e.code(), "sandbox_provider_unknown");
    assert!(
        e.to_string().contains(PROVIDER),
        "lists the known ones: {e}"
    );
    assert!(f
        .svc
        .list(&SandboxFilter::default())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let f = Fixture::new(provider());
    let sid = SandboxId::new();
    assert_eq!(
        f.svc.get(&sid).await.unwrap_err().code(),
        "sandbox_not_found"
    );
    assert_eq!(
        f.svc
            .stop(&sid, StopMode::Default)
            .await
            .unwrap_err()
            .code(),
        "sandbox_not_found"
    );
    assert_eq!(
        f.svc
            .run_command(&sid, ExecRequest::new(["true"]))
            .await
            .unwrap_err()
            .code(),
        "sandbox_not_found"
    );
    let pid = ProcessId::new();
    assert_eq!(
        f.svc.process(&pid).await.unwrap_err().code(),
        "sandbox_process_not_found"
    );
    assert_eq!(
        f.svc
            .read_log(&pid, ReadFrom::START, 10)
            .await
            .unwrap_err()
            .code(),
        "sandbox_process_not_found"
    );
    assert!(f.svc.kill(&pid).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn a_store_that_cannot_record_the_sandbox_provisions_nothing() {
    // No `create` expectation: provisioning would panic.
    let faults = Faults::default();
    faults.insert_sandbox.store(true, Ordering::SeqCst);
    let f = Fixture::with_faults(provider(), &faults);
    let e = f.svc.create(&config()).await.unwrap_err();
    assert_eq!(e.code(), "store_error");
    assert!(f
        .records
        .list_sandboxes(&SandboxFilter::default())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn concurrent_observed_appends_get_distinct_consecutive_seqs() {
    let (f, sid) = warm(handle(), Coalescing::default()).await;
    let pid = f.svc.start_observed(&sid, observed_spec()).await.unwrap();
    let appends = (0..40).map(|i| {
        let svc = f.svc.clone();
        tokio::spawn(async move {
            svc.append_observed(&pid, ChunkType::Stdout, text(&format!("{i};")))
                .await
                .unwrap()
        })
    });
    let mut seqs: Vec<u64> = futures::future::join_all(appends)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (2..42).collect::<Vec<_>>());
    let (chunks, _) = f.log(&pid).await;
    assert_eq!(
        chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
        (1..42).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn reconnect_rebuilds_the_handle_without_starting_anything() {
    let mut p = provider_creating(handle());
    // Only `resume`: nothing on the new handle may be called.
    p.expect_resume()
        .times(1)
        .return_once(|_| Ok(Arc::new(handle()) as Arc<dyn SandboxHandle>));
    let f = Fixture::new(p);
    let sid = f.svc.create(&config()).await.unwrap().id;
    let rec = f.svc.reconnect(&sid).await.unwrap();
    assert_eq!(rec.status, SandboxStatus::Active);
    assert!(f.caches_handle(&sid));
}

// ---- capabilities ------------------------------------------------------------------------

#[tokio::test]
async fn stdin_or_timeout_a_provider_cannot_honour_is_unsupported_not_ignored() {
    let mut p = MockProvider::new();
    p.expect_name().return_const(PROVIDER.to_string());
    p.expect_capabilities().return_const(Capabilities {
        exec_stream: true,
        files: true,
        ..Capabilities::NONE
    });
    // No `exec` expectation: the request must be refused before it reaches the provider.
    let h = handle();
    p.expect_create()
        .times(1)
        .return_once(move |_| Ok(provisioned(h)));
    let f = Fixture::build(p, None, vec![], Coalescing::default());
    let sid = f.svc.create(&config()).await.unwrap().id;

    let with_stdin = ExecRequest::new(["cat"]).stdin("input");
    let e = f.svc.run_command(&sid, with_stdin).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unsupported {
                operation: "stdin",
                ..
            }
        ),
        "{e:?}"
    );
    let with_timeout = ExecRequest::new(["sleep", "9"]).timeout(Duration::from_secs(1));
    let e = f
        .svc
        .spawn(&sid, CommandSpec::new(with_timeout))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "timeout_not_supported");
    let processes = f
        .svc
        .processes(&ProcessFilter {
            sandbox_id: Some(sid),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(processes.is_empty(), "a refused spawn left {processes:?}");
}

// ---- following a log whose writer died -------------------------------------------------

#[tokio::test(start_paused = true)]
async fn following_a_log_whose_writer_died_ends_with_writer_lost_instead_of_waiting() {
    let f = Fixture::new(provider());
    let sandbox = sandbox_record(SandboxStatus::Active);
    f.records.insert_sandbox(&sandbox).await.unwrap();
    let process = process_record(&sandbox.id);
    f.records.insert_process(&process).await.unwrap();
    // A writer elsewhere wrote one chunk and died without closing the log.
    let mut writer = ChunkWriter::open(&f.logs, sandbox.id, process.id)
        .await
        .unwrap();
    writer
        .append(ChunkType::Stdout, Some(output_data(b"partial")))
        .await
        .unwrap();
    drop(writer);

    let mut follow = f
        .svc
        .follow_log(&process.id, ReadFrom::START)
        .await
        .unwrap();
    let first = follow.next().await.unwrap().unwrap();
    assert_eq!(first.seq, 1);
    let e = tokio::time::timeout(WAIT, follow.next())
        .await
        .expect("the follower kept waiting for a dead writer")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), "sandbox_process_writer_lost");
    assert!(
        follow.next().await.is_none(),
        "the follow goes on after the error"
    );
}

#[tokio::test(start_paused = true)]
async fn following_a_log_with_a_live_writer_keeps_waiting() {
    let f = Fixture::new(provider());
    let sandbox = sandbox_record(SandboxStatus::Active);
    f.records.insert_sandbox(&sandbox).await.unwrap();
    let process = process_record(&sandbox.id);
    f.records.insert_process(&process).await.unwrap();
    let mut writer = ChunkWriter::open(&f.logs, sandbox.id, process.id)
        .await
        .unwrap();
    let mut follow = f
        .svc
        .follow_log(&process.id, ReadFrom::START)
        .await
        .unwrap();
    // Several watch intervals pass with the writer alive and silent: no error, no end.
    let waited = tokio::time::timeout(Duration::from_secs(30), follow.next()).await;
    assert!(waited.is_err(), "follow ended or failed: {waited:?}");
    writer
        .append(ChunkType::Stdout, Some(output_data(b"late")))
        .await
        .unwrap();
    writer.close().await.unwrap();
    assert_eq!(follow.next().await.unwrap().unwrap().seq, 1);
    assert!(follow.next().await.is_none());
}

// ---- interrupted creates -----------------------------------------------------------------

#[tokio::test]
async fn reconcile_marks_a_create_that_died_error_after_the_grace_period() {
    let f = Fixture::new(provider());
    let mut stale = sandbox_record(SandboxStatus::Creating);
    stale.external_sandbox_id = None;
    stale.created_at = now_ms() - CREATE_GRACE.as_millis() as i64 - 1_000;
    let mut fresh = sandbox_record(SandboxStatus::Creating);
    fresh.external_sandbox_id = None;
    fresh.created_at = now_ms();
    f.records.insert_sandbox(&stale).await.unwrap();
    f.records.insert_sandbox(&fresh).await.unwrap();

    let report = f.svc.reconcile().await.unwrap();
    assert_eq!(report.interrupted, vec![stale.id]);
    let stale = f.svc.get(&stale.id).await.unwrap();
    assert_eq!(stale.status, SandboxStatus::Error);
    let why = stale.params.as_ref().unwrap()["error"].as_str().unwrap();
    assert!(why.starts_with("create_interrupted"), "{why}");
    assert_eq!(
        f.svc.get(&fresh.id).await.unwrap().status,
        SandboxStatus::Creating,
        "a create still within its grace period was touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_leaves_a_create_running_in_this_service_alone() {
    // The provider's create blocks (one worker thread) until the test releases it.
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let mut p = provider();
    let h = handle();
    p.expect_create().times(1).return_once(move |_| {
        wait.recv().unwrap();
        Ok(provisioned(h))
    });
    let records = Arc::new(MemoryStore::new());
    let svc = SandboxService::builder()
        .records(records.clone())
        .logs(Arc::new(MemorySink::new()))
        .provider(Arc::new(p))
        .use_registry(false)
        .bootstrappers(vec![])
        .env(Env::from_pairs([("SANDBOX_PROVIDER", PROVIDER)]))
        .create_grace(Duration::ZERO)
        .build()
        .unwrap();
    let creating = tokio::spawn({
        let svc = svc.clone();
        async move { svc.create(&config()).await }
    });
    let filter = SandboxFilter {
        status: Some(SandboxStatus::Creating),
        ..Default::default()
    };
    let id = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(r) = records.list_sandboxes(&filter).await.unwrap().pop() {
                return r.id;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the create never wrote its record");

    let report = svc.reconcile().await.unwrap();
    assert!(report.interrupted.is_empty(), "{report:?}");
    assert_eq!(svc.get(&id).await.unwrap().status, SandboxStatus::Creating);
    release.send(()).unwrap();
    let created = creating.await.unwrap().unwrap();
    assert_eq!(created.status, SandboxStatus::Active);
}
