//! The `Provider` contract: one implementation per backend.
//!
//! A [`Provider`] is a factory: it provisions sandboxes ([`Provider::create`]) and rebuilds
//! handles to existing ones from their persisted, secret-free record ([`Provider::resume`]).
//! A [`SandboxHandle`] is one live sandbox: exec, files, ports, checkpoints, stop.
//!
//! An operation a provider cannot do returns [`Error::Unsupported`] and its
//! [`Capabilities`] flag says so; nothing is a silent no-op.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::SandboxConfig;
use crate::error::{Error, Result};
use crate::id::SandboxId;

/// What a provider can do. Every flag that is `false` means the matching operation returns
/// [`Error::Unsupported`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// `exec` streams output while the command runs (not only at the end).
    pub exec_stream: bool,
    /// `exec` accepts stdin.
    pub stdin: bool,
    /// `exec` enforces `timeout` itself.
    pub timeout: bool,
    /// `write_files` / `read_file`.
    pub files: bool,
    /// `port_url`.
    pub ports: bool,
    /// `checkpoint` / `list_checkpoints`.
    pub checkpoints: bool,
    /// `restore`.
    pub restore: bool,
    /// `stop`.
    pub stop: bool,
    /// `stop` can delete the sandbox's resources.
    pub delete: bool,
}

impl Capabilities {
    /// Every capability.
    pub const ALL: Capabilities = Capabilities {
        exec_stream: true,
        stdin: true,
        timeout: true,
        files: true,
        ports: true,
        checkpoints: true,
        restore: true,
        stop: true,
        delete: true,
    };

    /// No capability; set the ones a provider has with struct update syntax.
    pub const NONE: Capabilities = Capabilities {
        exec_stream: false,
        stdin: false,
        timeout: false,
        files: false,
        ports: false,
        checkpoints: false,
        restore: false,
        stop: false,
        delete: false,
    };

    /// `(name, flag)` pairs, for tables and `doctor` output.
    pub fn flags(&self) -> [(&'static str, bool); 9] {
        [
            ("exec_stream", self.exec_stream),
            ("stdin", self.stdin),
            ("timeout", self.timeout),
            ("files", self.files),
            ("ports", self.ports),
            ("checkpoints", self.checkpoints),
            ("restore", self.restore),
            ("stop", self.stop),
            ("delete", self.delete),
        ]
    }
}

/// A command to run: argv, never a shell string. Use [`ExecRequest::shell`] to ask for a
/// shell explicitly.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// argv; `argv[0]` is the program.
    pub argv: Vec<String>,
    /// Working directory: absolute inside the sandbox, already confined by the service.
    pub cwd: Option<String>,
    /// Variables added on top of the provider's minimal base environment.
    pub env: BTreeMap<String, String>,
    /// Bytes fed to stdin, then EOF. `None` means stdin is empty/closed.
    pub stdin: Option<Bytes>,
    /// Kill the whole command after this long and report it as timed out.
    pub timeout: Option<Duration>,
}

impl fmt::Debug for ExecRequest {
    // Env values may be secrets: show the keys only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecRequest")
            .field("argv", &self.argv)
            .field("cwd", &self.cwd)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("stdin_len", &self.stdin.as_ref().map(Bytes::len))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ExecRequest {
    /// Runs `argv` as is.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Runs `script` with `/bin/sh -c`: the only way a shell is involved.
    pub fn shell(script: impl Into<String>) -> Self {
        Self::new(["/bin/sh".to_string(), "-c".to_string(), script.into()])
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets stdin.
    pub fn stdin(mut self, bytes: impl Into<Bytes>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitStatus {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal name (`SIGKILL`, ...), when a signal ended it.
    pub signal: Option<String>,
    /// Whether the provider killed it because its timeout passed.
    pub timed_out: bool,
}

impl ExitStatus {
    /// A normal exit.
    pub fn code(code: i32) -> Self {
        ExitStatus {
            code: Some(code),
            ..Default::default()
        }
    }

    /// Exit code 0 and no signal.
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none() && !self.timed_out
    }
}

/// One event of a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes written to stdout.
    Stdout(Bytes),
    /// Bytes written to stderr.
    Stderr(Bytes),
    /// The command ended. Always the last event; exactly one per execution.
    Exit(ExitStatus),
}

/// Kills a running command.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait ExecControl: Send + Sync {
    /// Kills the command and everything it started. The event stream then ends with an
    /// [`ExecEvent::Exit`] carrying the signal. Killing an ended command is not an error.
    async fn kill(&self) -> Result<()>;
}

/// A running command: its events and a way to kill it.
///
/// The event stream yields stdout/stderr chunks in the order they were produced, then exactly
/// one [`ExecEvent::Exit`], then ends. A stream that ends without an exit, or yields `Err`, means
/// the provider lost the command: the service records the process as `failed`, never as
/// exited with code 0.
pub struct Execution {
    /// Output and exit.
    pub events: BoxStream<'static, Result<ExecEvent>>,
    /// Kill switch, when the provider can kill.
    pub control: Option<Arc<dyn ExecControl>>,
    /// The provider's id for the process, when it has one.
    pub external_id: Option<String>,
}

impl fmt::Debug for Execution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Execution")
            .field("killable", &self.control.is_some())
            .field("external_id", &self.external_id)
            .finish()
    }
}

/// A file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWrite {
    /// Absolute path inside the sandbox, already confined to the workspace by the service.
    pub path: String,
    /// Content.
    pub content: Bytes,
    /// Unix mode bits, when the caller cares (default 0644).
    pub mode: Option<u32>,
}

impl FileWrite {
    /// A file with default mode.
    pub fn new(path: impl Into<String>, content: impl Into<Bytes>) -> Self {
        FileWrite {
            path: path.into(),
            content: content.into(),
            mode: None,
        }
    }
}

/// A checkpoint of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// Provider id (`v3`, a UUID, ...).
    pub id: String,
    /// The caller's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Creation time (epoch ms), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
}

/// What `stop` does with the sandbox's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StopMode {
    /// What the sandbox was configured for at create (`deleteOnStop`, `persistent`, ...).
    #[default]
    Default,
    /// Stop and keep the resources (workspace, persistent sandbox).
    Keep,
    /// Stop and delete the resources.
    Delete,
}

/// Input of [`Provider::create`].
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The durable id the service assigned; use it for deterministic names.
    pub sandbox_id: SandboxId,
    /// The caller's config; the provider reads its own section.
    pub config: SandboxConfig,
}

/// What [`Provider::create`] returns.
pub struct Provisioned {
    /// The live sandbox.
    pub handle: Arc<dyn SandboxHandle>,
    /// The provider's id, stored as `externalSandboxId`.
    pub external_id: String,
    /// Public URL, stored as `sandboxUrl`.
    pub url: Option<String>,
    /// Bookkeeping stored as `params.<provider>`: everything `resume` needs, never a secret.
    pub params: Value,
    /// Things the caller should know (e.g. "no isolation available"), stored on the record.
    pub warnings: Vec<String>,
}

impl fmt::Debug for Provisioned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioned")
            .field("external_id", &self.external_id)
            .field("url", &self.url)
            .field("params", &self.params)
            .field("warnings", &self.warnings)
            .finish()
    }
}

/// Input of [`Provider::resume`]: what the record kept.
#[derive(Debug, Clone)]
pub struct ResumeRequest {
    /// Durable id.
    pub sandbox_id: SandboxId,
    /// `externalSandboxId` of the record.
    pub external_id: String,
    /// `sandboxUrl` of the record.
    pub url: Option<String>,
    /// `params.<provider>` of the record (`Value::Null` when absent).
    pub params: Value,
}

/// A backend that provisions sandboxes.
///
/// Implementations are registered with [`crate::register_provider!`] and built from the
/// config and environment by their constructor. Credentials are read there or at call time and
/// never returned in [`Provisioned::params`].
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Provider: Send + Sync {
    /// Registered name (`local`, `sprites`, ...).
    fn name(&self) -> &str;

    /// What this provider can do.
    fn capabilities(&self) -> Capabilities;

    /// Provisions a new sandbox for `req.sandbox_id`.
    ///
    /// Creates should be idempotent for the same sandbox id (deterministic names, look-up
    /// before create) so a retried create never makes two sandboxes.
    ///
    /// # Errors
    /// Invalid config is [`Error::InvalidInput`]; everything else is the provider's failure.
    /// On error, nothing the provider made for this request is left running when it can help it.
    async fn create(&self, req: &CreateRequest) -> Result<Provisioned>;

    /// Rebuilds a handle to an existing sandbox from its record.
    ///
    /// Must not start, wake or resume the sandbox: stopping a sandbox resumes it first
    /// nowhere. It may check that the sandbox still exists.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the provider no longer has the sandbox.
    async fn resume(&self, req: &ResumeRequest) -> Result<Arc<dyn SandboxHandle>>;
}

/// One live sandbox of a provider.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait SandboxHandle: Send + Sync {
    /// The workspace root inside the sandbox (absolute). Caller paths are confined to it.
    fn workspace(&self) -> &str;

    /// Starts a command.
    ///
    /// # Errors
    /// [`Error::StartFailed`] when the command cannot be started (missing program, bad cwd);
    /// failures after the start arrive on the event stream.
    async fn exec(&self, req: ExecRequest) -> Result<Execution>;

    /// Writes files (binary-safe), creating parent directories.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for paths that escape the workspace (including through symlinks).
    async fn write_files(&self, files: Vec<FileWrite>) -> Result<()>;

    /// Reads a file: `Ok(None)` when it does not exist, `Ok(Some(empty))` when it is empty.
    async fn read_file(&self, path: &str) -> Result<Option<Bytes>>;

    /// URL at which `port` of the sandbox is reachable.
    async fn port_url(&self, port: u16) -> Result<String>;

    /// Takes a checkpoint.
    async fn checkpoint(&self, comment: Option<String>) -> Result<Checkpoint>;

    /// Lists checkpoints, oldest first.
    async fn list_checkpoints(&self) -> Result<Vec<Checkpoint>>;

    /// Restores a checkpoint. On failure the sandbox is as it was.
    async fn restore(&self, checkpoint_id: &str) -> Result<()>;

    /// Stops the sandbox: kills what still runs in it; deletes its resources per `mode`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the provider no longer has it (the service treats that as
    /// already stopped).
    async fn stop(&self, mode: StopMode) -> Result<()>;
}

/// Returns [`Error::Unsupported`] for `operation` of `provider`.
pub fn unsupported<T>(provider: &str, operation: &'static str) -> Result<T> {
    Err(Error::Unsupported {
        provider: provider.to_string(),
        operation,
    })
}
