//! [`LocalProvider`] and its [`LocalSandbox`] handles.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use sandbox_core::{
    Capabilities, Checkpoint, CreateRequest, Env, Error, ExecRequest, Execution, FileWrite,
    Provider, Provisioned, Result, ResumeRequest, SandboxConfig, SandboxHandle, SandboxId,
    StopMode,
};

use crate::config::{LocalConfig, LocalSettings};
use crate::error;
use crate::exec::{self, ProcessTable};
use crate::isolation::{self, Isolation, IsolationMode};
use crate::{checkpoint, files, LOCAL};

/// Where a sandbox lives on the host: `<root>/<sandboxId>/{workspace,checkpoints,tmp}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// `<root>/<sandboxId>`.
    pub dir: PathBuf,
    /// The workspace, bound read-write into the sandbox at the same path.
    pub workspace: PathBuf,
    /// Checkpoint archives.
    pub checkpoints: PathBuf,
    /// The sandbox's private `/tmp`.
    pub tmp: PathBuf,
}

impl Layout {
    /// The layout of `sandbox_id` under `root` (`root` canonical).
    pub(crate) fn new(root: &Path, sandbox_id: &str) -> Self {
        let dir = root.join(sandbox_id);
        Layout {
            workspace: dir.join("workspace"),
            checkpoints: dir.join("checkpoints"),
            tmp: dir.join("tmp"),
            dir,
        }
    }

    /// The directory holding every sandbox.
    pub(crate) fn root(&self) -> PathBuf {
        self.dir.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// Creates the directories (idempotent): the sandbox directory is private to its owner.
    pub(crate) fn create(&self) -> std::io::Result<()> {
        let mut private = std::fs::DirBuilder::new();
        private.recursive(true).mode(0o700);
        private.create(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        for d in [&self.workspace, &self.checkpoints, &self.tmp] {
            private.create(d)?;
        }
        // The private tmp behaves like /tmp for programs that check its mode.
        std::fs::set_permissions(&self.tmp, std::fs::Permissions::from_mode(0o1777))
    }
}

/// What `params.local` of a sandbox record holds: everything `resume` needs, no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalParams {
    /// The isolation mode chosen at create.
    pub isolation: Isolation,
    /// Whether `stop` keeps the workspace by default.
    pub persistent: bool,
    /// Declared ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Whether commands get the host network.
    pub network: bool,
    /// The root directory the sandbox lives under.
    pub root: PathBuf,
    /// The workspace (absolute host path).
    pub workspace: String,
}

/// The `local` provider: sandboxes are directories under a root on this machine, commands run
/// in the strongest isolation available.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    settings: LocalSettings,
}

impl LocalProvider {
    /// A provider with explicit settings.
    pub fn new(settings: LocalSettings) -> Self {
        LocalProvider { settings }
    }

    /// A provider configured from the config's `local` section and the environment
    /// (`SANDBOX_LOCAL_ROOT`, `SANDBOX_LOCAL_ISOLATION`).
    ///
    /// # Errors
    /// Invalid input for a malformed section or variable.
    pub fn from_config(config: &SandboxConfig, env: &Env) -> Result<Self> {
        Ok(Self::new(LocalSettings::resolve(config, env)?))
    }

    /// The settings this provider was built with.
    pub fn settings(&self) -> &LocalSettings {
        &self.settings
    }

    /// The isolation modes this machine offers, strongest first (detected once per process).
    pub async fn offered_isolations() -> Vec<Isolation> {
        detected().await.offered()
    }

    async fn root(&self, override_root: Option<&Path>) -> Result<PathBuf> {
        let root = override_root.unwrap_or(&self.settings.root).to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&root)
                .and_then(|_| root.canonicalize())
                .map_err(|e| {
                    error::io(
                        format!("create the local sandbox root {}", root.display()),
                        e,
                    )
                })
        })
        .await
        .map_err(|e| error::task("create the local sandbox root", e))?
    }
}

async fn detected() -> &'static isolation::Availability {
    tokio::task::spawn_blocking(isolation::availability)
        .await
        .unwrap_or_else(|_| isolation::availability())
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        LOCAL
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn create(&self, req: &CreateRequest) -> Result<Provisioned> {
        let own = LocalConfig::from_config(&req.config)?;
        let merged = self.settings.defaults.overridden_by(&own);
        let delete_on_stop = merged.delete_on_stop()?;
        let (isolation, warning) = detected()
            .await
            .choose(merged.isolation.unwrap_or(IsolationMode::Auto))?;
        let ports = req.config.ports.clone().unwrap_or_default();
        let network = merged.network.unwrap_or(false) || !ports.is_empty();
        if let Some(root) = own.root.as_ref().filter(|r| !r.is_absolute()) {
            // Relative to whatever the caller's working directory happens to be: refused, as
            // for the provider's own root.
            return Err(Error::invalid(
                "sandbox_local_root_invalid",
                format!(
                    "local sandbox root {} must be an absolute path",
                    root.display()
                ),
            ));
        }
        let root = self.root(own.root.as_deref()).await?;
        let sandbox_id = req.sandbox_id.to_string();
        let layout = Layout::new(&root, &sandbox_id);
        let created = layout.clone();
        tokio::task::spawn_blocking(move || created.create())
            .await
            .map_err(|e| error::task("create the sandbox directories", e))?
            .map_err(|e| error::io(format!("create sandbox {sandbox_id}"), e))?;
        let params = LocalParams {
            isolation,
            persistent: !delete_on_stop,
            ports,
            network,
            root,
            workspace: layout.workspace.to_string_lossy().into_owned(),
        };
        let handle = LocalSandbox::new(req.sandbox_id, layout, &params);
        Ok(Provisioned {
            handle: Arc::new(handle),
            external_id: format!("{LOCAL}:{}", req.sandbox_id),
            url: None,
            params: serde_json::to_value(&params).map_err(|e| Error::provider(LOCAL, e))?,
            warnings: warning.into_iter().collect(),
        })
    }

    async fn resume(&self, req: &ResumeRequest) -> Result<Arc<dyn SandboxHandle>> {
        let expected = format!("{LOCAL}:{}", req.sandbox_id);
        if req.external_id != expected {
            return Err(Error::invalid(
                "sandbox_local_external_id_invalid",
                format!(
                    "external id {:?} is not {expected:?}: not a local sandbox of this record",
                    req.external_id
                ),
            ));
        }
        let params: LocalParams = serde_json::from_value(req.params.clone()).map_err(|e| {
            Error::invalid(
                "sandbox_local_params_invalid",
                format!(
                    "params.local of sandbox {} cannot be read: {e}",
                    req.sandbox_id
                ),
            )
        })?;
        let layout = Layout::new(&params.root, &req.sandbox_id.to_string());
        if !layout.workspace.is_dir() {
            return Err(error::sandbox_gone(&req.sandbox_id.to_string()));
        }
        Ok(Arc::new(LocalSandbox::new(req.sandbox_id, layout, &params)))
    }
}

/// A directory's `(dev, ino)`.
type DirId = (u64, u64);

/// What a handle and its running commands share.
#[derive(Debug)]
pub(crate) struct SandboxContext {
    pub sandbox_id: SandboxId,
    pub layout: Layout,
    /// `layout.workspace` as reported to callers.
    pub workspace: String,
    pub isolation: Isolation,
    pub network: bool,
    pub ports: Vec<u16>,
    pub delete_on_stop: bool,
    pub processes: Arc<ProcessTable>,
    stopped: AtomicBool,
    /// Built once per workspace directory (rules name inodes: a restore, through this handle or
    /// another one, invalidates it), with the workspace's `(dev, ino)` it was built for.
    landlock: Mutex<Option<(DirId, Arc<OwnedFd>)>>,
}

impl SandboxContext {
    /// Whether `stop` was called on this handle.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub(crate) fn ensure_running(&self) -> Result<()> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(Error::NotActive {
                sandbox_id: self.sandbox_id.to_string(),
                status: "shutdown".into(),
            });
        }
        if !self.layout.workspace.is_dir() {
            return Err(error::sandbox_gone(&self.sandbox_id.to_string()));
        }
        Ok(())
    }

    /// Checks that this sandbox's isolation still works on this machine (a resumed sandbox may
    /// have moved); returns the bwrap path for bwrap.
    pub(crate) async fn require(&self, isolation: Isolation) -> Result<PathBuf> {
        let avail = detected().await;
        let why = match isolation {
            Isolation::Bwrap => match &avail.bwrap {
                Ok(path) => return Ok(path.clone()),
                Err(why) => why.clone(),
            },
            Isolation::Landlock => match &avail.landlock_abi {
                Ok(_) => return Ok(PathBuf::new()),
                Err(why) => why.clone(),
            },
            Isolation::None => return Ok(PathBuf::new()),
        };
        Err(Error::StartFailed {
            message: format!(
                "sandbox {} runs with {isolation} isolation, which this machine no longer offers: {why}",
                self.sandbox_id
            ),
        })
    }

    pub(crate) fn landlock_ruleset(&self) -> Result<Arc<OwnedFd>> {
        use std::os::unix::fs::MetadataExt;
        let workspace = std::fs::metadata(&self.layout.workspace)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| error::io("inspect the workspace", e))?;
        let mut cached = self.landlock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_for, fd)) = cached.as_ref() {
            if *built_for == workspace {
                return Ok(fd.clone());
            }
        }
        let fd = isolation::landlock::ruleset(
            &self.layout.workspace,
            &self.layout.tmp,
            &self.layout.root(),
            self.network,
        )?;
        *cached = Some((workspace, fd.clone()));
        Ok(fd)
    }

    fn forget_landlock_ruleset(&self) {
        *self.landlock.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// A handle to one local sandbox.
#[derive(Debug, Clone)]
pub struct LocalSandbox {
    ctx: Arc<SandboxContext>,
}

impl LocalSandbox {
    fn new(sandbox_id: SandboxId, layout: Layout, params: &LocalParams) -> Self {
        let processes = ProcessTable::for_sandbox(&layout.dir);
        LocalSandbox {
            ctx: Arc::new(SandboxContext {
                sandbox_id,
                workspace: layout.workspace.to_string_lossy().into_owned(),
                layout,
                isolation: params.isolation,
                network: params.network,
                ports: params.ports.clone(),
                delete_on_stop: !params.persistent,
                processes,
                stopped: AtomicBool::new(false),
                landlock: Mutex::new(None),
            }),
        }
    }

    /// The isolation this sandbox's commands run with.
    pub fn isolation(&self) -> Isolation {
        self.ctx.isolation
    }

    /// Number of commands still running in this sandbox (started by this process).
    pub fn running_commands(&self) -> usize {
        self.ctx.processes.len()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&SandboxContext) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || f(&ctx))
            .await
            .map_err(|e| error::task(what, e))?
    }
}

#[async_trait]
impl SandboxHandle for LocalSandbox {
    fn workspace(&self) -> &str {
        &self.ctx.workspace
    }

    async fn exec(&self, req: ExecRequest) -> Result<Execution> {
        exec::spawn(&self.ctx, req).await
    }

    async fn write_files(&self, files: Vec<FileWrite>) -> Result<()> {
        self.ctx.ensure_running()?;
        self.blocking("write files", move |ctx| {
            files::write_all(&ctx.layout.workspace, &files)
        })
        .await
    }

    async fn read_file(&self, path: &str) -> Result<Option<Bytes>> {
        self.ctx.ensure_running()?;
        let path = path.to_string();
        self.blocking("read a file", move |ctx| {
            files::read(&ctx.layout.workspace, &path)
        })
        .await
    }

    async fn port_url(&self, port: u16) -> Result<String> {
        self.ctx.ensure_running()?;
        if !self.ctx.ports.contains(&port) {
            return Err(Error::invalid(
                "sandbox_port_not_declared",
                format!(
                    "port {port} is not declared for sandbox {} (declared: {:?}); add it to `ports` at create",
                    self.ctx.sandbox_id, self.ctx.ports
                ),
            ));
        }
        Ok(format!("http://127.0.0.1:{port}"))
    }

    async fn checkpoint(&self, comment: Option<String>) -> Result<Checkpoint> {
        self.ctx.ensure_running()?;
        self.blocking("checkpoint", move |ctx| {
            checkpoint::create(&ctx.layout, comment)
        })
        .await
    }

    async fn list_checkpoints(&self) -> Result<Vec<Checkpoint>> {
        self.ctx.ensure_running()?;
        self.blocking("list checkpoints", |ctx| checkpoint::list(&ctx.layout))
            .await
    }

    async fn restore(&self, checkpoint_id: &str) -> Result<()> {
        self.ctx.ensure_running()?;
        let id = checkpoint_id.to_string();
        self.blocking("restore", move |ctx| {
            let restored = checkpoint::restore(&ctx.layout, &id);
            ctx.forget_landlock_ruleset();
            restored
        })
        .await
    }

    async fn stop(&self, mode: StopMode) -> Result<()> {
        self.ctx.stopped.store(true, Ordering::SeqCst);
        self.ctx.processes.kill_all().await;
        if !self.ctx.layout.dir.is_dir() {
            return Err(error::sandbox_gone(&self.ctx.sandbox_id.to_string()));
        }
        // Commands started by another process, or before the caller restarted.
        self.blocking("kill recorded commands", |ctx| {
            exec::records::kill_all(&ctx.layout.dir);
            Ok(())
        })
        .await?;
        let delete = match mode {
            StopMode::Default => self.ctx.delete_on_stop,
            StopMode::Keep => false,
            StopMode::Delete => true,
        };
        if delete {
            self.blocking("delete the sandbox", |ctx| {
                checkpoint::remove_tree(&ctx.layout.dir);
                if ctx.layout.dir.exists() {
                    return Err(Error::provider(
                        LOCAL,
                        format!("could not delete {}", ctx.layout.dir.display()),
                    ));
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
}
