//! `sandbox`: create code-execution sandboxes on any registered provider, run commands in them
//! with live, durably recorded output, copy files, expose ports, checkpoint, restore and stop
//! them. On a machine with no account anywhere it uses the embedded default: provider `local`
//! and a SQLite store in the user's data directory.
//!
//! ```text
//! $ sandbox run -- sh -c 'echo hello; exit 3'      # create, run (output live), stop
//! hello
//! $ echo $?
//! 3
//! $ id=$(sandbox create --port 8080)
//! $ sandbox exec "$id" --cwd app -e MODE=dev -- make test
//! $ sandbox cp ./data.bin "$id":in/data.bin && sandbox cp "$id":out.bin ./out.bin
//! $ sandbox ps "$id"; sandbox logs PROCESS_ID --follow --from-seq 10
//! $ sandbox stop "$id"
//! ```
//!
//! # Backends (Cargo features)
//!
//! | Feature   | Default | Links                                           |
//! |-----------|---------|-------------------------------------------------|
//! | `local`   | yes     | provider `local` (`sandbox-local`)              |
//! | `sqlite`  | yes     | store `sqlite` (`sandbox-sqlite`)               |
//! | `sprites` | yes     | provider `sprites` (`sandbox-sprites`)          |
//! | `instant` | yes     | store `instant` (`sandbox-instant`)             |
//! | `full`    | no      | every backend of the facade crate `sandbox`     |
//!
//! The store `memory:` is always there (nothing persists between invocations).
//!
//! # Environment
//!
//! | Variable | Meaning |
//! |---|---|
//! | `SANDBOX_PROVIDER` | provider when neither `--provider` nor the config's `provider` names one (else `local`) |
//! | `SANDBOX_STORE` | store URL when `--store` is not given (else SQLite in the user's data directory) |
//! | `RUST_LOG` | log filter on stderr; overrides `-v`/`-q` |
//! | `SANDBOX_LOCAL_ROOT`, `SANDBOX_LOCAL_ISOLATION` | where `local` keeps sandboxes; which isolation it uses |
//! | `SPRITES_API_TOKEN`, `SPRITES_API_BASE_URL`, ... | provider credentials and endpoints (`sandbox doctor` lists which are set, never their values) |
//! | `INSTANT_APP_ID`, `INSTANT_APP_ADMIN_TOKEN`, `INSTANT_API_URI` | the `instant` store |
//!
//! Output formats and exit codes are in `sandbox --help` ([`AFTER_HELP`]).

#![warn(missing_docs)]

mod commands;
mod copy;
mod live;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::output::{Output, EXIT_ERROR, EXIT_USAGE};

// Name every backend crate so its `inventory` registration is linked into the binary.
#[allow(unused_imports)]
use sandbox as _;

/// Shown at the end of `sandbox --help`.
const AFTER_HELP: &str = "\
Environment:
  SANDBOX_PROVIDER  provider when neither --provider nor the config's `provider` names one (else `local`)
  SANDBOX_STORE     store URL when --store is not given (default: SQLite in the user's data directory)
  RUST_LOG          log filter, overrides -v/-q (e.g. RUST_LOG=sandbox_core=debug)
  Each provider reads its own credentials; `sandbox doctor` lists which are set.

Output:
  Results go to stdout; notes, progress and errors to stderr. With --json, results are one JSON
  document on stdout (run/exec/logs: the process log's NDJSON lines, then for run/exec a final
  {\"sandboxId\",\"processId\",\"status\",\"exitCode\",...} line) and errors are
  {\"error\": {\"code\", \"message\", \"context\", \"hint\"?}} on stderr.

Exit codes:
  0        success
  1        sandbox failed (bad input, not found, store or provider error)
  2        usage error (unknown option, missing argument)
  run/exec: the command's exit code; 128+N when signal N ended it; 1 when it failed without a
           code; 125 when sandbox failed around it; 127 when it could not start; 130 after Ctrl-C";

/// The `sandbox` command.
#[derive(Debug, Parser)]
#[command(name = "sandbox", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Provider for new sandboxes [env: SANDBOX_PROVIDER]; for `ls`, a filter
    #[arg(long, global = true, value_name = "NAME")]
    pub provider: Option<String>,
    /// Record store URL, e.g. sqlite:///path/sandbox.db or memory: [env: SANDBOX_STORE]
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,
    /// JSON config file (the TypeScript package's SandboxConfig)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Machine-readable output (JSON on stdout, JSON errors on stderr)
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug, -vvv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors on stderr: no progress, no notes
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// A command run inside a sandbox.
#[derive(Debug, Args, Clone)]
pub struct CommandArgs {
    /// Working directory inside the sandbox (relative to its workspace)
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Environment variable for the command (repeatable)
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// The command and its arguments (argv; no shell is involved)
    #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// What a new sandbox gets, on top of the config file.
#[derive(Debug, Args, Clone, Default)]
pub struct CreateArgs {
    /// Port to expose (repeatable; `sandbox port ID PORT` gives its URL)
    #[arg(long = "port", short = 'p', value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Free-form purpose stored on the record
    #[arg(long, value_name = "TEXT")]
    pub purpose: Option<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a sandbox, run a command with its output streamed live, stop the sandbox
    Run {
        /// Keep the sandbox after the command ends (its id is printed on stderr)
        #[arg(long)]
        keep: bool,
        /// What the new sandbox gets.
        #[command(flatten)]
        create: CreateArgs,
        /// The command to run.
        #[command(flatten)]
        command: CommandArgs,
    },
    /// Create a sandbox and print its id
    Create {
        /// What the new sandbox gets.
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List sandboxes (oldest first)
    Ls {
        /// Only sandboxes with this status (creating, active, shutdown, error)
        #[arg(long)]
        status: Option<String>,
        /// Only active sandboxes
        #[arg(long, short = 'a', conflicts_with = "status")]
        active: bool,
    },
    /// Show a sandbox's record
    Show {
        /// Sandbox id
        id: String,
    },
    /// Run a recorded command in a sandbox, output streamed live
    Exec {
        /// Sandbox id
        id: String,
        /// The command to run.
        #[command(flatten)]
        command: CommandArgs,
    },
    /// List the processes of a sandbox
    Ps {
        /// Sandbox id
        id: String,
    },
    /// Print the output of a process from its durable log
    Logs {
        /// Process id
        process_id: String,
        /// Keep printing while the process runs, until its log ends
        #[arg(long, short = 'f')]
        follow: bool,
        /// Start at this log sequence number (1 is the first chunk)
        #[arg(long, value_name = "N", default_value_t = 1)]
        from_seq: u64,
    },
    /// Copy a file between the host and a sandbox: `cp ./a ID:b` or `cp ID:b ./a` (`-` is stdin/stdout)
    Cp {
        /// Source: a host path, `-`, or SANDBOX_ID:PATH
        src: String,
        /// Destination: a host path, `-`, or SANDBOX_ID:PATH
        dst: String,
    },
    /// Print the URL at which a port of a sandbox is reachable
    Port {
        /// Sandbox id
        id: String,
        /// Port number
        port: u16,
    },
    /// Take a checkpoint of a sandbox and print its id
    Checkpoint {
        /// Sandbox id
        id: String,
        /// A comment stored with the checkpoint
        #[arg(short = 'm', long = "message", value_name = "COMMENT")]
        comment: Option<String>,
    },
    /// List the checkpoints of a sandbox
    Checkpoints {
        /// Sandbox id
        id: String,
    },
    /// Restore a sandbox to a checkpoint
    Restore {
        /// Sandbox id
        id: String,
        /// Checkpoint id
        checkpoint: String,
    },
    /// Stop a sandbox (its running processes are killed)
    Stop {
        /// Sandbox id
        id: String,
        /// Also delete the sandbox's resources (workspace, provider object)
        #[arg(long)]
        delete: bool,
    },
    /// After a crash: mark processes whose writer died `lost` and sandboxes the provider no longer has `shutdown`
    Reconcile,
    /// List registered providers and whether their credentials are set
    Providers,
    /// Report the store, providers, local isolation and credentials in use
    Doctor,
}

fn init_tracing(g: &Global) {
    let level = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Parses the command line; a usage error is `{"error": {...}}` on stderr when `--json` was given.
fn parse_cli() -> Result<Cli, ExitCode> {
    let err = match Cli::try_parse() {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    // `use_stderr` is false for --help and --version, which are not errors.
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if !json || !err.use_stderr() {
        err.exit();
    }
    let rendered = err.render().to_string();
    let message = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    let error = serde_json::json!({
        "code": "sandbox_usage_invalid",
        "message": message,
        "context": "read the command line",
        "hint": "see `sandbox --help`",
    });
    eprintln!("{}", serde_json::json!({ "error": error }));
    Err(ExitCode::from(EXIT_USAGE))
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_tracing(&cli.global);
    let out = Output {
        json: cli.global.json,
        quiet: cli.global.quiet,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(commands::dispatch(cli.command, cli.global, out));
    // Background log writers of ended commands have finished; do not wait for idle tasks.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            out.failure(&failure);
            ExitCode::from(failure.exit)
        }
    }
}
