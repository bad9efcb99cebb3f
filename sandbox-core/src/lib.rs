//! Contracts, service and protocol of the provider-agnostic sandbox service.
//!
//! `sandbox-core` holds everything every backend shares and nothing backend-specific: no HTTP,
//! no SQLite. Three traits are the extension points:
//!
//! - [`Provider`] (with [`SandboxHandle`]): provisions sandboxes and runs commands, reads and
//!   writes files, exposes ports, checkpoints and stops them. One implementation per backend
//!   (`local`, `sprites`, `vercel`, `daytona`, or yours).
//! - [`RecordStore`]: the durable sandbox and process records, with the attribute names of
//!   the TypeScript package `@ekairos/sandbox` so records move between stores unchanged.
//! - [`StreamSink`]: one append-only, resumable log per process, single writer, read from any
//!   `seq` or byte offset and followed live.
//!
//! [`SandboxService`] ties them together; [`register_provider!`] and [`register_store!`] make a
//! backend discoverable by name through `inventory`.
//!
//! # Writing and registering a provider
//!
//! A third-party provider is a crate that depends on `sandbox-core` only:
//!
//! ```
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use bytes::Bytes;
//! use sandbox_core::{
//!     register_provider, unsupported, Capabilities, Checkpoint, CreateRequest, Env, ExecRequest,
//!     Execution, FileWrite, Provider, Provisioned, Result, ResumeRequest, SandboxConfig,
//!     SandboxHandle, StopMode,
//! };
//!
//! /// A provider whose sandboxes can do nothing but exist.
//! struct Void;
//!
//! struct VoidSandbox;
//!
//! #[async_trait]
//! impl Provider for Void {
//!     fn name(&self) -> &str { "void" }
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities { stop: true, ..Capabilities::NONE }
//!     }
//!     async fn create(&self, req: &CreateRequest) -> Result<Provisioned> {
//!         Ok(Provisioned {
//!             handle: Arc::new(VoidSandbox),
//!             external_id: format!("void:{}", req.sandbox_id),
//!             url: None,
//!             params: serde_json::json!({}),
//!             warnings: vec![],
//!         })
//!     }
//!     async fn resume(&self, _req: &ResumeRequest) -> Result<Arc<dyn SandboxHandle>> {
//!         Ok(Arc::new(VoidSandbox))
//!     }
//! }
//!
//! #[async_trait]
//! impl SandboxHandle for VoidSandbox {
//!     fn workspace(&self) -> &str { "/void" }
//!     async fn exec(&self, _: ExecRequest) -> Result<Execution> { unsupported("void", "exec") }
//!     async fn write_files(&self, _: Vec<FileWrite>) -> Result<()> { unsupported("void", "files") }
//!     async fn read_file(&self, _: &str) -> Result<Option<Bytes>> { unsupported("void", "files") }
//!     async fn port_url(&self, _: u16) -> Result<String> { unsupported("void", "port_url") }
//!     async fn checkpoint(&self, _: Option<String>) -> Result<Checkpoint> {
//!         unsupported("void", "checkpoint")
//!     }
//!     async fn list_checkpoints(&self) -> Result<Vec<Checkpoint>> {
//!         unsupported("void", "list_checkpoints")
//!     }
//!     async fn restore(&self, _: &str) -> Result<()> { unsupported("void", "restore") }
//!     async fn stop(&self, _: StopMode) -> Result<()> { Ok(()) }
//! }
//!
//! fn open_void(_config: &SandboxConfig, _env: &Env) -> Result<Arc<dyn Provider>> {
//!     Ok(Arc::new(Void))
//! }
//!
//! // Selected with `"provider": "void"` in the config or SANDBOX_PROVIDER=void.
//! register_provider!("void", open_void);
//!
//! # fn main() {
//! assert!(sandbox_core::registry::provider_names().unwrap().contains(&"void"));
//! # }
//! ```
//!
//! Users then name the crate where it must be linked (`use sandbox_void as _;`), because the
//! linker drops registrations of crates nobody names.

#![warn(missing_docs)]

pub mod bootstrap;
pub mod config;
pub mod error;
pub mod id;
pub mod memory;
pub mod paths;
pub mod protocol;
pub mod provider;
pub mod record;
pub mod registry;
pub mod retry;
pub mod service;
pub mod shell;
pub mod store;
pub mod stream;

pub use bootstrap::{BootstrapContext, Bootstrapper};
pub use config::{Env, ProviderSelector, SandboxConfig, DEFAULT_PROVIDER};
pub use error::{Error, Missing, Result};
pub use id::{ProcessId, SandboxId};
pub use memory::{MemorySink, MemoryStore};
pub use protocol::{ChunkType, ProcessChunk, Transcript};
pub use provider::{
    unsupported, Capabilities, Checkpoint, CreateRequest, ExecControl, ExecEvent, ExecRequest,
    Execution, ExitStatus, FileWrite, Provider, Provisioned, ResumeRequest, SandboxHandle,
    StopMode,
};
pub use record::{
    now_ms, ProcessFilter, ProcessKind, ProcessMode, ProcessPatch, ProcessRecord, ProcessStatus,
    SandboxFilter, SandboxPatch, SandboxRecord, SandboxStatus,
};
pub use registry::StoreBackend;
pub use retry::{Idempotency, RetryPolicy};
pub use service::{
    CommandOutput, CommandSpec, ObservedFinish, ObservedSpec, ProcessOutcome, ProcessRun,
    ReconcileReport, SandboxService,
};
pub use store::RecordStore;
pub use stream::{
    ChunkWriter, LogAppender, LogEntry, LogPage, LogState, LogStatus, ReadFrom, StreamSink,
    WriterLiveness,
};

#[doc(hidden)]
pub mod __private {
    pub use inventory;
}

#[cfg(any(test, feature = "mock"))]
pub use provider::{MockExecControl, MockProvider, MockSandboxHandle};
#[cfg(any(test, feature = "mock"))]
pub use store::MockRecordStore;
