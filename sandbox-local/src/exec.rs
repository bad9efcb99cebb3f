//! Running commands: spawn in the sandbox's isolation, stream stdout/stderr live, enforce the
//! timeout, report exactly one exit, and kill whole process groups.
//!
//! Every command is the leader of a new process group; a timeout, a kill or `stop` sends
//! `SIGKILL` to the whole group. When the command itself exits, what it left running in its
//! group is killed too, so a command's processes end with it in every isolation mode (under
//! bubblewrap its pid namespace ends with it anyway).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use sandbox_core::{Error, ExecControl, ExecEvent, ExecRequest, Execution, ExitStatus, Result};

use crate::isolation::{self, Isolation, Launch};
use crate::provider::SandboxContext;

/// Size of each read from a command's stdout/stderr.
const READ_BUF: usize = 64 * 1024;

/// Events buffered between the pipe readers and the consumer (backpressure beyond that).
const EVENT_BUFFER: usize = 64;

/// After the command exits, a pipe still held open by an escaped grandchild is read until it
/// has been idle this long.
const IDLE_AFTER_EXIT: Duration = Duration::from_millis(200);

/// How long `stop` waits for killed commands to be reaped.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// `PATH` of the minimal base environment.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One running command's process group.
#[derive(Debug)]
pub(crate) struct ProcessGroup {
    pgid: i32,
    /// Set once the leader is reaped: the pgid may then be reused, so it is never signalled.
    reaped: Mutex<bool>,
    done: watch::Receiver<bool>,
}

impl ProcessGroup {
    fn kill(&self) {
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // SAFETY: plain syscall; the group exists until its leader is reaped.
            unsafe {
                libc::killpg(self.pgid, libc::SIGKILL);
            }
        }
    }
}

/// The commands running in one sandbox.
#[derive(Debug, Default)]
pub(crate) struct ProcessTable {
    next: AtomicU64,
    running: Mutex<HashMap<u64, Arc<ProcessGroup>>>,
}

impl ProcessTable {
    /// The table of the sandbox living in `dir`, shared by every live handle of this process,
    /// so `stop` through a resumed handle also kills commands started through another one.
    pub(crate) fn for_sandbox(dir: &Path) -> Arc<ProcessTable> {
        static TABLES: OnceLock<Mutex<HashMap<PathBuf, Weak<ProcessTable>>>> = OnceLock::new();
        let mut tables = TABLES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(table) = tables.get(dir).and_then(Weak::upgrade) {
            return table;
        }
        tables.retain(|_, t| t.strong_count() > 0);
        let table = Arc::new(ProcessTable::default());
        tables.insert(dir.to_path_buf(), Arc::downgrade(&table));
        table
    }

    fn insert(&self, group: Arc<ProcessGroup>) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, group);
        key
    }

    fn remove(&self, key: u64) {
        self.lock().remove(&key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ProcessGroup>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of commands still running.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Kills every running command's group and waits (bounded) until each is reaped.
    pub(crate) async fn kill_all(&self) {
        let groups: Vec<Arc<ProcessGroup>> = self.lock().values().cloned().collect();
        for g in &groups {
            g.kill();
        }
        for g in groups {
            let mut done = g.done.clone();
            let _ = tokio::time::timeout(STOP_WAIT, done.wait_for(|d| *d)).await;
        }
    }
}

/// Records of the process groups started in a sandbox: `<sandbox dir>/running/<pgid>` holding
/// the leader's start time, so `stop` from another process (or after the caller restarted)
/// still finds the commands it must kill. The start time guards against a reused pid.
pub(crate) mod records {
    use std::path::{Path, PathBuf};

    fn dir(sandbox_dir: &Path) -> PathBuf {
        sandbox_dir.join("running")
    }

    /// The start time (clock ticks since boot) of `pid`, from `/proc/<pid>/stat`.
    fn start_time(pid: i32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name; `starttime` is field 22 of the whole line.
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(19)?.parse().ok()
    }

    /// The process group of `pid`.
    fn pgid_of(stat: &str) -> Option<i32> {
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(2)?.parse().ok()
    }

    /// Whether any process is still in group `pgid`.
    fn group_has_members(pgid: i32) -> bool {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return false;
        };
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<i32>().is_ok())
                && std::fs::read_to_string(e.path().join("stat"))
                    .ok()
                    .and_then(|s| pgid_of(&s))
                    == Some(pgid)
        })
    }

    /// Records the group led by `pgid` (best effort: an unrecorded command is still killed by
    /// this process's own `stop`).
    pub(crate) fn add(sandbox_dir: &Path, pgid: i32) {
        let Some(start) = start_time(pgid) else {
            return;
        };
        let dir = dir(sandbox_dir);
        // Not recursive: a sandbox directory deleted meanwhile is not brought back.
        let made = match std::fs::create_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            made => made,
        };
        if let Err(e) =
            made.and_then(|_| std::fs::write(dir.join(pgid.to_string()), start.to_string()))
        {
            tracing::warn!(error = %e, "could not record a local sandbox command");
        }
    }

    /// Forgets the group led by `pgid`.
    pub(crate) fn remove(sandbox_dir: &Path, pgid: i32) {
        let _ = std::fs::remove_file(dir(sandbox_dir).join(pgid.to_string()));
    }

    /// Kills every recorded group that is still the one recorded, and forgets them all.
    pub(crate) fn kill_all(sandbox_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir(sandbox_dir)) else {
            return;
        };
        for entry in entries.flatten() {
            let pgid = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok());
            let recorded = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            if let (Some(pgid), Some(recorded)) = (pgid, recorded) {
                let same_leader = start_time(pgid) == Some(recorded);
                // A dead leader's pid stays reserved while its group has members.
                let orphaned_group = start_time(pgid).is_none() && group_has_members(pgid);
                if pgid > 1 && (same_leader || orphaned_group) {
                    // SAFETY: plain syscall on a group this sandbox started.
                    unsafe {
                        libc::killpg(pgid, libc::SIGKILL);
                    }
                }
            }
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// [`ExecControl`] of one command.
#[derive(Debug)]
struct GroupControl(Arc<ProcessGroup>);

#[async_trait]
impl ExecControl for GroupControl {
    async fn kill(&self) -> Result<()> {
        self.0.kill();
        Ok(())
    }
}

/// The base environment plus the request's variables (which win).
pub(crate) fn environment(
    ctx: &SandboxContext,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let tmp = match ctx.isolation {
        Isolation::Bwrap => "/tmp".to_string(),
        _ => ctx.layout.tmp.to_string_lossy().into_owned(),
    };
    let mut env = BTreeMap::from([
        ("PATH".to_string(), BASE_PATH.to_string()),
        ("HOME".to_string(), ctx.workspace.clone()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        // Output goes to pipes, not a terminal.
        ("TERM".to_string(), "dumb".to_string()),
        ("TMPDIR".to_string(), tmp),
    ]);
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Starts `req` in the sandbox.
pub(crate) async fn spawn(ctx: &Arc<SandboxContext>, req: ExecRequest) -> Result<Execution> {
    ctx.ensure_running()?;
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(Error::invalid(
            "sandbox_command_empty",
            "a command needs at least a program name",
        ));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::invalid(
            "sandbox_command_invalid",
            "command arguments cannot contain NUL bytes",
        ));
    }
    sandbox_core::shell::validate_env(&req.env)?;
    let workspace = ctx.layout.workspace.clone();
    let cwd = match &req.cwd {
        None => workspace.clone(),
        Some(cwd) => crate::files::resolve(&workspace, cwd)?,
    };
    if !cwd.is_dir() {
        return Err(Error::StartFailed {
            message: format!(
                "working directory {} does not exist in sandbox {}",
                cwd.display(),
                ctx.sandbox_id
            ),
        });
    }
    let env = environment(ctx, &req.env);
    let launch = Launch {
        argv: &req.argv,
        cwd: &cwd,
        env: &env,
        workspace: &workspace,
        private_tmp: &ctx.layout.tmp,
        network: ctx.network,
    };
    let mut cmd = match ctx.isolation {
        Isolation::None => isolation::none::command(&launch),
        Isolation::Landlock => {
            ctx.require(Isolation::Landlock).await?;
            isolation::landlock::command(&launch, ctx.landlock_ruleset()?)
        }
        Isolation::Bwrap => {
            let bwrap = ctx.require(Isolation::Bwrap).await?;
            // bwrap would start and then fail inside: report a missing program up front.
            let private_tmp = &ctx.layout.tmp;
            let found = isolation::program_exists(&req.argv[0], &env, &cwd, |p: &Path| {
                isolation::bwrap::host_path(p, &workspace, private_tmp)
            });
            if !found {
                return Err(Error::StartFailed {
                    message: format!("{}: no such program in the sandbox", req.argv[0]),
                });
            }
            isolation::bwrap::command(&bwrap, &launch)
        }
    };
    cmd.process_group(0)
        .stdin(if req.stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false);
    let spawned = match ctx.isolation {
        Isolation::Bwrap => spawn_from_lasting_thread(cmd).await,
        _ => cmd.spawn(),
    };
    let mut child = spawned.map_err(|e| Error::StartFailed {
        message: format!("{}: {e}", req.argv[0]),
    })?;
    let pid = child.id().unwrap_or_default() as i32;
    let (done_tx, done_rx) = watch::channel(false);
    let group = Arc::new(ProcessGroup {
        pgid: pid,
        reaped: Mutex::new(false),
        done: done_rx,
    });
    let key = ctx.processes.insert(group.clone());
    records::add(&ctx.layout.dir, pid);
    // A `stop` that began after this command passed `ensure_running` has already listed the
    // running commands: this one ends here instead of outliving the sandbox.
    if ctx.is_stopped() {
        group.kill();
    }

    if let (Some(mut stdin), Some(bytes)) = (child.stdin.take(), req.stdin) {
        tokio::spawn(async move {
            // A command that does not read its stdin closes the pipe: not an error.
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let (exited_tx, exited_rx) = watch::channel(false);
    let stdout = child
        .stdout
        .take()
        .map(|out| tokio::spawn(pump(out, tx.clone(), ExecEvent::Stdout, exited_rx.clone())));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(pump(err, tx.clone(), ExecEvent::Stderr, exited_rx)));

    let timeout = req.timeout;
    let waiter_group = group.clone();
    let waiter_ctx = ctx.clone();
    tokio::spawn(async move {
        let mut timed_out = false;
        let waited = match timeout {
            None => child.wait().await,
            Some(limit) => {
                tokio::select! {
                    status = child.wait() => status,
                    _ = tokio::time::sleep(limit) => {
                        timed_out = true;
                        waiter_group.kill();
                        child.wait().await
                    }
                }
            }
        };
        // Whatever the command left in its group ends with it.
        waiter_group.kill();
        *waiter_group
            .reaped
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        // Reaped is what `stop` waits for, even if nobody consumes the events.
        waiter_ctx.processes.remove(key);
        records::remove(&waiter_ctx.layout.dir, pid);
        let _ = done_tx.send(true);
        let _ = exited_tx.send(true);
        for reader in [stdout, stderr].into_iter().flatten() {
            let _ = reader.await;
        }
        let event = match waited {
            Ok(status) => Ok(ExecEvent::Exit(ExitStatus {
                code: status.code(),
                signal: status.signal().map(signal_name),
                timed_out,
            })),
            Err(e) => Err(crate::error::io("wait for the command", e)),
        };
        let _ = tx.send(event).await;
    });

    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (event, rx))
    })
    .boxed();
    Ok(Execution {
        events,
        control: Some(Arc::new(GroupControl(group))),
        external_id: Some(pid.to_string()),
    })
}

/// Spawns `cmd` from a thread that lives as long as the process. bubblewrap's
/// `--die-with-parent` (`PR_SET_PDEATHSIG`) fires when the *thread* that forked it exits, and
/// tokio retires idle blocking-pool threads and workers that ran `block_in_place`.
async fn spawn_from_lasting_thread(
    mut cmd: tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    type Job = Box<dyn FnOnce() + Send>;
    static SPAWNER: OnceLock<Option<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sandbox-local-spawner".into())
            .spawn(move || rx.into_iter().for_each(|job| job()))
            .ok()
            .map(|_| tx)
    });
    let Some(spawner) = spawner else {
        return Err(std::io::Error::other(
            "no thread to start bubblewrap from could be created",
        ));
    };
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        // The child is registered with the caller's runtime, which reaps it.
        let _entered = runtime.enter();
        let _ = tx.send(cmd.spawn());
    });
    let gone = || std::io::Error::other("the thread that starts bubblewrap is gone");
    spawner.send(job).map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

/// Forwards one pipe as events until EOF, or until it has been idle for a while after the
/// command exited. Keeps draining when the consumer is gone so the command never blocks.
async fn pump<R: AsyncRead + Unpin>(
    mut pipe: R,
    tx: mpsc::Sender<Result<ExecEvent>>,
    wrap: fn(Bytes) -> ExecEvent,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut after_exit = false;
    let mut consumer_gone = false;
    loop {
        if buf.capacity() < READ_BUF / 2 {
            buf.reserve(READ_BUF);
        }
        let read = if after_exit {
            match tokio::time::timeout(IDLE_AFTER_EXIT, pipe.read_buf(&mut buf)).await {
                Ok(read) => read,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                read = pipe.read_buf(&mut buf) => read,
                _ = exited.wait_for(|e| *e) => {
                    after_exit = true;
                    continue;
                }
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let chunk = buf.split().freeze();
                if !consumer_gone && tx.send(Ok(wrap(chunk))).await.is_err() {
                    consumer_gone = true;
                }
            }
        }
    }
}

/// `SIGKILL` for 9, ...; `SIG<n>` for numbers without a name.
pub(crate) fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        n => return format!("SIG{n}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_are_the_conventional_ones() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(64), "SIG64");
    }
}
