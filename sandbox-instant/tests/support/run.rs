//! A recorded process run through the real `SandboxService`, with a provider whose command
//! prints `chunks` lines: what the request counts and the benchmark measure.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sandbox_core::service::Coalescing;
use sandbox_core::{
    unsupported, Capabilities, Checkpoint, CommandSpec, CreateRequest, ExecEvent, ExecRequest,
    Execution, ExitStatus, FileWrite, ProcessOutcome, Provider, Provisioned, Result, ResumeRequest,
    SandboxConfig, SandboxHandle, SandboxId, SandboxService, StopMode, StoreBackend,
};

/// A provider whose every command prints `chunks` lines, one output event each, then exits 0.
pub struct Printer {
    pub chunks: usize,
}

struct PrinterSandbox {
    chunks: usize,
}

#[async_trait]
impl Provider for Printer {
    fn name(&self) -> &str {
        "printer"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            stop: true,
            ..Capabilities::NONE
        }
    }
    async fn create(&self, req: &CreateRequest) -> Result<Provisioned> {
        Ok(Provisioned {
            handle: Arc::new(PrinterSandbox {
                chunks: self.chunks,
            }),
            external_id: format!("printer:{}", req.sandbox_id),
            url: None,
            params: serde_json::json!({}),
            warnings: vec![],
        })
    }
    async fn resume(&self, _req: &ResumeRequest) -> Result<Arc<dyn SandboxHandle>> {
        Ok(Arc::new(PrinterSandbox {
            chunks: self.chunks,
        }))
    }
}

#[async_trait]
impl SandboxHandle for PrinterSandbox {
    fn workspace(&self) -> &str {
        "/work"
    }
    async fn exec(&self, _req: ExecRequest) -> Result<Execution> {
        let mut events: Vec<Result<ExecEvent>> = (0..self.chunks)
            .map(|i| Ok(ExecEvent::Stdout(Bytes::from(format!("output line {i}\n")))))
            .collect();
        events.push(Ok(ExecEvent::Exit(ExitStatus::code(0))));
        Ok(Execution {
            events: Box::pin(futures::stream::iter(events)),
            control: None,
            external_id: None,
        })
    }
    async fn write_files(&self, _: Vec<FileWrite>) -> Result<()> {
        unsupported("printer", "files")
    }
    async fn read_file(&self, _: &str) -> Result<Option<Bytes>> {
        unsupported("printer", "files")
    }
    async fn port_url(&self, _: u16) -> Result<String> {
        unsupported("printer", "port_url")
    }
    async fn checkpoint(&self, _: Option<String>) -> Result<Checkpoint> {
        unsupported("printer", "checkpoint")
    }
    async fn list_checkpoints(&self) -> Result<Vec<Checkpoint>> {
        unsupported("printer", "list_checkpoints")
    }
    async fn restore(&self, _: &str) -> Result<()> {
        unsupported("printer", "restore")
    }
    async fn stop(&self, _: StopMode) -> Result<()> {
        Ok(())
    }
}

/// A service over `backend` with an active `printer` sandbox; each output event is one chunk.
pub async fn service_with_sandbox(
    backend: StoreBackend,
    chunks: usize,
) -> (SandboxService, SandboxId) {
    let svc = SandboxService::builder()
        .store(backend)
        .provider(Arc::new(Printer { chunks }))
        .use_registry(false)
        .bootstrappers(vec![])
        .coalescing(Coalescing {
            max_bytes: 1,
            max_delay: Duration::ZERO,
        })
        .build()
        .unwrap();
    let config = SandboxConfig::from_json(r#"{"provider": "printer"}"#).unwrap();
    let record = svc.create(&config).await.unwrap();
    (svc, record.id)
}

/// One recorded run: record, log with `status`, every output chunk and `exit`, final record.
pub async fn recorded_run(svc: &SandboxService, sandbox: &SandboxId) -> ProcessOutcome {
    let spec = CommandSpec::new(ExecRequest {
        argv: vec!["print".into()],
        ..Default::default()
    });
    let run = svc.spawn(sandbox, spec).await.unwrap();
    run.wait().await.unwrap()
}
