//! Running a recorded command with its output streamed live, and turning how it ended into
//! the exit code of `sandbox`.

use std::io::Write;

use futures::StreamExt;
use sandbox::{
    ChunkType, CommandSpec, ProcessOutcome, ProcessStatus, ReadFrom, SandboxId, SandboxService,
};

use crate::output::{
    Context, Failure, Output, EXIT_INTERRUPTED, EXIT_RUN_ERROR, EXIT_START_FAILED,
};

/// How a live command ended.
#[derive(Debug)]
pub struct LiveEnd {
    /// The final record of the process.
    pub outcome: ProcessOutcome,
    /// Whether Ctrl-C interrupted it.
    pub interrupted: bool,
}

impl LiveEnd {
    /// The exit code of `sandbox` for this command: its own code, 128 + signal number when a
    /// signal ended it, 130 after Ctrl-C, 1 when it failed without a code.
    pub fn exit_code(&self) -> u8 {
        if self.interrupted {
            return EXIT_INTERRUPTED;
        }
        let o = &self.outcome;
        match o.status {
            ProcessStatus::Exited | ProcessStatus::Failed => match o.exit_code {
                Some(c) => (c & 0xff) as u8,
                None => 1,
            },
            ProcessStatus::Killed => {
                let n = o.signal.as_deref().and_then(signal_number).unwrap_or(9);
                128u8.saturating_add(n)
            }
            _ => 1,
        }
    }
}

/// The Linux number of a signal given as `SIGKILL`, `KILL` or `9`.
pub fn signal_number(name: &str) -> Option<u8> {
    let n = name.trim().trim_start_matches("SIG");
    if let Ok(v) = n.parse::<u8>() {
        return Some(v);
    }
    let table = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("ILL", 4),
        ("TRAP", 5),
        ("ABRT", 6),
        ("BUS", 7),
        ("FPE", 8),
        ("KILL", 9),
        ("USR1", 10),
        ("SEGV", 11),
        ("USR2", 12),
        ("PIPE", 13),
        ("ALRM", 14),
        ("TERM", 15),
        ("XCPU", 24),
        ("XFSZ", 25),
    ];
    table
        .iter()
        .find(|(s, _)| s.eq_ignore_ascii_case(n))
        .map(|(_, v)| *v)
}

/// Where output of a followed log goes.
pub struct LogPrinter {
    json: bool,
    broken: bool,
}

impl LogPrinter {
    /// Raw bytes to stdout/stderr, or the log's NDJSON lines to stdout in `--json` mode.
    pub fn new(out: Output) -> Self {
        LogPrinter {
            json: out.json,
            broken: false,
        }
    }

    /// Prints one log entry. Returns false once stdout or stderr is closed (e.g. `| head`).
    pub fn print(&mut self, entry: &sandbox::LogEntry) -> sandbox::Result<bool> {
        if self.broken {
            return Ok(false);
        }
        let written = if self.json {
            let mut o = std::io::stdout().lock();
            o.write_all(entry.line.as_bytes()).and_then(|_| o.flush())
        } else {
            let chunk = entry.chunk()?;
            let bytes = chunk.output_bytes().unwrap_or_default();
            match chunk.kind {
                ChunkType::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&bytes).and_then(|_| o.flush())
                }
                ChunkType::Stderr => {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&bytes).and_then(|_| e.flush())
                }
                _ => Ok(()),
            }
        };
        if written.is_err() {
            self.broken = true;
        }
        Ok(!self.broken)
    }
}

/// Ctrl-C, caught from the moment this value exists. (`tokio::signal::ctrl_c()` installs its
/// handler only when first polled, so a Ctrl-C just before that would kill `sandbox` and leave
/// the command running and recorded `running`.)
#[derive(Debug)]
pub struct Interrupt {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
    #[cfg(windows)]
    signal: Option<tokio::signal::windows::CtrlC>,
}

impl Interrupt {
    /// Installs the handler; from now on Ctrl-C no longer ends `sandbox` but is reported by
    /// [`Interrupt::recv`]. Must be called inside the runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
        #[cfg(windows)]
        let signal = tokio::signal::windows::ctrl_c();
        let signal = signal
            .map_err(|e| tracing::warn!(error = %e, "cannot catch Ctrl-C"))
            .ok();
        Interrupt { signal }
    }

    /// Resolves at the next Ctrl-C (at once if one came since the last call); never when the
    /// handler could not be installed.
    pub async fn recv(&mut self) {
        if let Some(s) = &mut self.signal {
            if s.recv().await.is_some() {
                return;
            }
        }
        std::future::pending().await
    }
}

/// Spawns `spec` in the sandbox, prints its output as it arrives, and waits for its end.
/// Ctrl-C (caught by `interrupt`) kills the command (it is recorded as `killed`) and is
/// reported in [`LiveEnd`]; one that came before this call kills it as soon as it started.
pub async fn run_live(
    service: &SandboxService,
    id: &SandboxId,
    spec: CommandSpec,
    out: Output,
    interrupt: &mut Interrupt,
) -> Result<LiveEnd, Failure> {
    let argv0 = spec.request.argv.first().cloned().unwrap_or_default();
    let run = service.spawn(id, spec).await.map_err(|e| {
        let exit = if matches!(e, sandbox::Error::StartFailed { .. }) {
            EXIT_START_FAILED
        } else {
            EXIT_RUN_ERROR
        };
        Failure {
            context: format!("run `{argv0}` in sandbox {id}"),
            error: e,
            exit,
        }
    })?;
    let pid = run.process_id();
    tracing::info!(sandbox = %id, process = %pid, "command started");
    let ctx = || format!("output of process {pid} in sandbox {id}");
    let mut log = run
        .follow(ReadFrom::START)
        .await
        .context(ctx)
        .map_err(run_error)?;
    let mut printer = LogPrinter::new(out);
    let mut interrupted = false;
    let mut killed_for_pipe = false;
    loop {
        tokio::select! {
            entry = log.next() => match entry {
                None => break,
                Some(entry) => {
                    let entry = entry.context(ctx).map_err(run_error)?;
                    if !printer.print(&entry).context(ctx).map_err(run_error)? && !killed_for_pipe {
                        // Nobody reads the output any more: stop the command rather than run blind.
                        killed_for_pipe = true;
                        let _ = run.kill().await;
                    }
                }
            },
            () = interrupt.recv(), if !interrupted => {
                interrupted = true;
                out.note(format!("interrupted: killing process {pid}"));
                if let Err(e) = run.kill().await {
                    tracing::warn!(process = %pid, error = %e, "kill after Ctrl-C failed");
                }
            }
        }
    }
    let outcome = run
        .wait()
        .await
        .context(|| format!("wait for process {pid} in sandbox {id}"))
        .map_err(run_error)?;
    Ok(LiveEnd {
        outcome,
        interrupted,
    })
}

fn run_error(mut f: Failure) -> Failure {
    f.exit = EXIT_RUN_ERROR;
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox::ProcessId;

    fn end(status: ProcessStatus, code: Option<i64>, signal: Option<&str>) -> LiveEnd {
        LiveEnd {
            outcome: ProcessOutcome {
                process_id: ProcessId::new(),
                status,
                exit_code: code,
                signal: signal.map(str::to_string),
                error: None,
            },
            interrupted: false,
        }
    }

    #[test]
    fn exit_code_is_the_commands_own_or_128_plus_signal() {
        assert_eq!(end(ProcessStatus::Exited, Some(0), None).exit_code(), 0);
        assert_eq!(end(ProcessStatus::Failed, Some(3), None).exit_code(), 3);
        assert_eq!(end(ProcessStatus::Failed, None, None).exit_code(), 1);
        assert_eq!(
            end(ProcessStatus::Killed, None, Some("SIGKILL")).exit_code(),
            137
        );
        assert_eq!(
            end(ProcessStatus::Killed, None, Some("SIGTERM")).exit_code(),
            143
        );
        assert_eq!(end(ProcessStatus::Killed, None, None).exit_code(), 137);
        assert_eq!(end(ProcessStatus::Lost, None, None).exit_code(), 1);
        let mut e = end(ProcessStatus::Killed, None, Some("SIGKILL"));
        e.interrupted = true;
        assert_eq!(e.exit_code(), 130);
    }

    #[test]
    fn signal_names_and_numbers_parse() {
        assert_eq!(signal_number("SIGINT"), Some(2));
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGWHAT"), None);
    }
}
