//! How the emulator runs a sprite's commands for real: a process group on this machine, in
//! the sprite's directory, with a minimal environment.
//!
//! Kept behind [`CommandRunner`] so the emulator can move to another runner (the `local`
//! provider) without touching the wire code.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct RunSpec {
    /// Program (looked up in `PATH` when it has no slash).
    pub program: String,
    /// Arguments after argv\[0\].
    pub args: Vec<String>,
    /// argv\[0\] as the caller gave it.
    pub arg0: String,
    /// Host directory to run in.
    pub cwd: PathBuf,
    /// The complete environment.
    pub env: BTreeMap<String, String>,
    /// Whether stdin is piped (otherwise it is empty).
    pub stdin: bool,
}

/// A started command.
#[derive(Debug)]
pub(crate) struct Running {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: ChildStdout,
    pub stderr: ChildStderr,
    /// Process group to signal.
    pub pgid: i32,
}

/// Starts commands for the emulator.
pub(crate) trait CommandRunner: Send + Sync {
    /// Starts `spec`.
    fn spawn(&self, spec: &RunSpec) -> io::Result<Running>;
}

/// Runs commands as host processes, each in its own process group.
#[derive(Debug, Default)]
pub(crate) struct HostRunner;

impl CommandRunner for HostRunner {
    fn spawn(&self, spec: &RunSpec) -> io::Result<Running> {
        let mut cmd = Command::new(&spec.program);
        cmd.arg0(&spec.arg0)
            .args(&spec.args)
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(&spec.env)
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pgid = child.id().map(|p| p as i32).unwrap_or(0);
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("no stderr pipe"))?;
        Ok(Running {
            child,
            stdin,
            stdout,
            stderr,
            pgid,
        })
    }
}

/// Sends `SIGKILL` to a whole process group.
pub(crate) fn kill_group(pgid: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals the group; it touches no memory of ours.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// The exit code a shell would report: the code, or 128 + the signal.
pub(crate) fn exit_code(status: &std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + s).min(255) as u8,
        (None, None) => 255,
    }
}
