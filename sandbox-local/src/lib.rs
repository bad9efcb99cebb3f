//! The `local` provider of the sandbox service: isolated sandboxes on this machine, the
//! embedded default that needs no account anywhere.
//!
//! Each sandbox is a directory `<root>/<sandboxId>/` holding its `workspace/` (reported by
//! [`SandboxHandle::workspace`](sandbox_core::SandboxHandle::workspace) as an absolute host
//! path, and bound at that same path inside the sandbox), its `checkpoints/` and a private
//! `tmp/`. Its external id is `local:<sandboxId>`.
//!
//! Commands are argv (a shell only with [`ExecRequest::shell`](sandbox_core::ExecRequest::shell)),
//! run in the strongest isolation the machine offers, with a cleared environment: a minimal
//! base (`PATH`, `HOME` = the workspace, `LANG`, `TERM`, `TMPDIR`) plus the request's variables.
//! Nothing of the caller's environment leaks in. Each command leads its own process group, which
//! a timeout, a kill or `stop` ends with `SIGKILL`.
//!
//! # Isolation
//!
//! | mode       | what confines a command                                                           |
//! |------------|-----------------------------------------------------------------------------------|
//! | `bwrap`    | bubblewrap: new mount, pid, ipc, uts namespaces; system directories (`/usr`, `/etc`, `/opt`, ...) read-only and nothing else of the host (no home, no other sandbox); the workspace read-write; a private `/tmp`; the network unshared unless the sandbox declares ports or `network: true`; no capabilities |
//! | `landlock` | Landlock: writes only in the workspace and the private tmp; nothing read from the caller's home, the other sandboxes or per-process files of `/proc` (another process's `environ` would leak the caller's secrets); no signals to processes outside (kernel ABI 6+); no TCP unless ports or `network: true` (ABI 4+); no capabilities |
//! | `none`     | nothing: a plain child process; the sandbox record carries a warning              |
//!
//! `auto` (the default) picks bwrap, else landlock, else none with the warning. Asking for a
//! mode the machine does not offer is an error, never a silent downgrade. Bubblewrap is detected
//! by running it once (user namespaces may be disabled even where it is installed).
//!
//! # Limits
//!
//! - Under `landlock` and `none`, a process that leaves its process group (`setsid`,
//!   `setpgid`) survives a timeout, a kill and `stop`; under `bwrap` the pid namespace ends with
//!   the command, so nothing survives.
//! - Under `bwrap`, a command killed by a signal *inside* the sandbox is reported as exit code
//!   `128 + n` (bubblewrap's own exit status); timeouts and kills report `SIGKILL`.
//! - Under `landlock`, per-process files of `/proc` (`/proc/self/...` included) cannot be read.
//! - When a command ends, whatever it left running in its process group is killed with it.
//! - Each running command's process group is recorded under `<sandboxId>/running/`, so `stop`
//!   also kills commands another process started (or the caller did before it restarted).
//! - `restore` swaps the workspace directory: commands still running keep the old one.
//!
//! # Capabilities
//!
//! | capability    | local | notes                                                        |
//! |---------------|-------|--------------------------------------------------------------|
//! | `exec_stream` | yes   | stdout and stderr stream live, separately, 64 KiB reads      |
//! | `stdin`       | yes   | fed then closed                                              |
//! | `timeout`     | yes   | kills the process group, keeps partial output, `timed_out`   |
//! | `files`       | yes   | binary-safe; symlink escapes refused                         |
//! | `ports`       | yes   | `http://127.0.0.1:<port>` for declared ports                 |
//! | `checkpoints` | yes   | gzip tar of the workspace, with id, comment, time            |
//! | `restore`     | yes   | atomic swap of the workspace; a failed restore changes nothing |
//! | `stop`        | yes   | kills what runs                                              |
//! | `delete`      | yes   | deletes the sandbox directory unless persistent              |
//!
//! # Configuration
//!
//! The `local` section of the config ([`LocalConfig`], camelCase):
//!
//! | field          | default                | meaning                                           |
//! |----------------|------------------------|---------------------------------------------------|
//! | `isolation`    | `auto`                 | `auto`, `bwrap`, `landlock` or `none`             |
//! | `persistent`   | `false`                | keep the workspace on stop                        |
//! | `deleteOnStop` | `true`                 | delete the workspace on stop (`false` = persistent); upstream's `cleanup` is read as this |
//! | `root`         | see below              | directory holding the sandboxes                   |
//! | `network`      | `false`                | host network even without declared ports          |
//!
//! Environment variables (the config wins over them):
//!
//! | variable                  | meaning                                                      |
//! |---------------------------|--------------------------------------------------------------|
//! | `SANDBOX_LOCAL_ROOT`      | root directory; default `<user data dir>/ekairos-sandbox/local` |
//! | `SANDBOX_LOCAL_ISOLATION` | `auto`, `bwrap`, `landlock` or `none`                        |
//!
//! Top-level `ports` declares the ports a sandbox serves; `port_url` answers only for those.
//! `params.local` of the sandbox record ([`LocalParams`]) holds what `resume` needs: the
//! isolation chosen, persistence, ports, network, root and workspace; never a secret.
//!
//! # Example
//!
//! ```no_run
//! use sandbox_core::{CreateRequest, Env, ExecEvent, ExecRequest, Provider, SandboxConfig, SandboxId};
//! use futures::StreamExt;
//!
//! # async fn run() -> sandbox_core::Result<()> {
//! let config = SandboxConfig::from_json(r#"{"local": {"isolation": "auto"}}"#)?;
//! let provider = sandbox_local::LocalProvider::from_config(&config, &Env::process())?;
//! let sandbox = provider
//!     .create(&CreateRequest { sandbox_id: SandboxId::new(), config })
//!     .await?;
//! let mut run = sandbox.handle.exec(ExecRequest::new(["echo", "hello"])).await?;
//! while let Some(event) = run.events.next().await {
//!     if let ExecEvent::Stdout(bytes) = event? {
//!         print!("{}", String::from_utf8_lossy(&bytes));
//!     }
//! }
//! sandbox.handle.stop(Default::default()).await?;
//! # Ok(()) }
//! ```
//!
//! Linking: registered as `local` with [`sandbox_core::register_provider!`]; name the crate
//! (`use sandbox_local as _;`) where the registration must be kept by the linker.

#![warn(missing_docs)]

use std::sync::Arc;

use sandbox_core::{Env, Provider, Result, SandboxConfig};

mod checkpoint;
pub mod config;
mod error;
mod exec;
mod files;
pub mod isolation;
mod provider;

pub use config::{LocalConfig, LocalSettings, ISOLATION_ENV, ROOT_ENV};
pub use exec::BASE_PATH;
pub use isolation::{availability, Availability, Isolation, IsolationMode};
pub use provider::{LocalParams, LocalProvider, LocalSandbox};

/// Name of this provider.
pub const LOCAL: &str = "local";

/// Registry constructor: [`LocalProvider::from_config`].
pub fn open(config: &SandboxConfig, env: &Env) -> Result<Arc<dyn Provider>> {
    Ok(Arc::new(LocalProvider::from_config(config, env)?))
}

sandbox_core::register_provider!("local", open);
