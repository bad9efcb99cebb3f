//! How results and errors are shown: human text or JSON, and the exit codes.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sandbox::Error;
use serde_json::{json, Value};

/// Exit code of a failure of `sandbox` itself (store, provider, bad input, not found).
pub const EXIT_ERROR: u8 = 1;
/// Exit code of a usage error (unknown option, missing or malformed argument), as clap's.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of `run`/`exec` when `sandbox` itself failed before or around the command, so it
/// cannot be confused with the command's own exit code 1 (the `docker run` convention).
pub const EXIT_RUN_ERROR: u8 = 125;
/// Exit code of `run`/`exec` when the command could not be started in the sandbox.
pub const EXIT_START_FAILED: u8 = 127;
/// Exit code after Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// A failure of the `sandbox` command: what it was doing, the error, and its exit code.
#[derive(Debug)]
pub struct Failure {
    /// What failed, e.g. `exec in sandbox 3f1c…`.
    pub context: String,
    /// The error.
    pub error: Error,
    /// Exit code.
    pub exit: u8,
}

impl Failure {
    /// A failure with the default exit code.
    pub fn new(context: impl Into<String>, error: Error) -> Self {
        Failure {
            context: context.into(),
            error,
            exit: EXIT_ERROR,
        }
    }

    /// What the user can do next, for the errors where that is not already in the message.
    pub fn hint(&self) -> Option<String> {
        let code = self.error.code();
        let hint = match code.as_str() {
            "sandbox_not_found" => "list sandboxes with `sandbox ls`",
            "sandbox_process_not_found" => {
                "list the processes of a sandbox with `sandbox ps SANDBOX_ID`"
            }
            "sandbox_provider_unknown" => {
                "choose one with --provider, SANDBOX_PROVIDER or the config's `provider`"
            }
            "sandbox_store_unknown" | "sandbox_store_url_invalid" => {
                "use --store or SANDBOX_STORE, e.g. sqlite:///path/to/sandbox.db"
            }
            "unauthorized" => {
                "check the provider's credentials: `sandbox doctor` lists which are set"
            }
            "invalid_sandbox_id" => {
                "sandbox ids are the UUIDs printed by `sandbox create` and `sandbox ls`"
            }
            "invalid_process_id" => "process ids are the UUIDs printed by `sandbox ps SANDBOX_ID`",
            "sandbox_file_not_found" => "paths are relative to the sandbox workspace",
            "command_failed_to_start" => "check the command name and --cwd",
            c if c.ends_with("_not_supported") => {
                "`sandbox providers` shows what each provider can do"
            }
            _ => return None,
        };
        Some(hint.to_string())
    }
}

/// Helper to attach context to a core result.
pub trait Context<T> {
    /// Wraps the error with what was being done.
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Failure>;
}

impl<T> Context<T> for sandbox::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(what(), e))
    }
}

/// Where and how output goes.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// Machine-readable output.
    pub json: bool,
    /// No progress or notes on stderr.
    pub quiet: bool,
}

impl Output {
    /// Prints a result: `value` as JSON in `--json` mode, else `human`.
    pub fn result(&self, value: &Value, human: impl FnOnce() -> String) {
        let text = if self.json {
            format!("{value}\n")
        } else {
            let h = human();
            if h.is_empty() || h.ends_with('\n') {
                h
            } else {
                format!("{h}\n")
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    /// A note for humans on stderr (not in `--json` or `--quiet` mode).
    pub fn note(&self, text: impl AsRef<str>) {
        if !self.json && !self.quiet {
            eprintln!("{}", text.as_ref());
        }
    }

    /// Reports a failure on stderr: one line, or `{"error": {...}}` in `--json` mode.
    pub fn failure(&self, f: &Failure) {
        let hint = f.hint();
        if self.json {
            let mut err = json!({
                "code": f.error.code(),
                "message": f.error.to_string(),
                "context": f.context,
            });
            if let Some(h) = hint {
                err["hint"] = json!(h);
            }
            eprintln!("{}", json!({ "error": err }));
        } else {
            let mut line = format!("error: {}: {}", f.context, f.error);
            if let Some(h) = hint {
                line.push_str(&format!(" ({h})"));
            }
            eprintln!("{line}");
        }
    }

    /// A spinner on stderr while a slow step runs, only when stderr is a terminal.
    pub fn spinner(&self, message: impl Into<String>) -> Spinner {
        if self.json || self.quiet || !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(style);
        }
        bar.set_message(message.into());
        bar.enable_steady_tick(Duration::from_millis(100));
        Spinner(Some(bar))
    }
}

/// A running spinner; cleared when dropped.
#[derive(Debug)]
pub struct Spinner(Option<ProgressBar>);

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Epoch milliseconds as ISO-8601.
pub fn time(ms: i64) -> String {
    sandbox::protocol::iso8601_ms(ms)
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}
