//! Repository tasks: `cargo xtask <task>`.
//!
//! - `ci`: formatting, clippy with warnings denied, and every test (what CI runs).
//! - `bench [CRATE...]`: the benchmarks (all crates with benches, or the ones named).
//! - `release [--dry-run] [--execute]`: checks and publishes every publishable crate with
//!   `cargo publish --workspace` (dry run unless `--execute`).
//! - `instant-schema`: prints the InstantDB schema the `instant` store expects, as JSON, to push
//!   to an Instant app.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r),
        None => {
            usage();
            exit(2);
        }
    };
    let result = match task {
        "ci" => ci(rest),
        "bench" => bench(rest),
        "release" => release(rest),
        "instant-schema" => instant_schema(),
        "-h" | "--help" | "help" => {
            usage();
            Ok(())
        }
        other => Err(format!("unknown task `{other}`")),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        exit(1);
    }
}

fn usage() {
    eprintln!(
        "usage: cargo xtask <task>\n\n\
         tasks:\n  \
         ci [--dry-run]            fmt --check, clippy -D warnings, all tests\n  \
         bench [CRATE...]          run benchmarks\n  \
         release [--execute]       publish all crates (dry run unless --execute)\n  \
         instant-schema            print the InstantDB schema JSON of the instant store"
    );
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs `cargo <args>`, or prints it under `--dry-run`.
fn run(args: &[&str], dry_run: bool) -> Result<(), String> {
    println!("$ cargo {}", args.join(" "));
    if dry_run {
        return Ok(());
    }
    let mut command = cargo();
    if args.first() == Some(&"doc") {
        command.env("RUSTDOCFLAGS", "-D warnings");
    }
    let status = command
        .args(args)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

/// The steps CI runs; `.ci/run` runs the same commands.
const CI_STEPS: &[&[&str]] = &[
    &["fmt", "--all", "--", "--check"],
    &[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
    &["test", "--workspace"],
    // The facade's registry test with default features and with every backend.
    &["test", "-p", "sandbox"],
    &["test", "-p", "sandbox", "--features", "full"],
    // Documentation builds without warnings (broken links, missing docs); run with
    // RUSTDOCFLAGS="-D warnings".
    &["doc", "--workspace", "--no-deps"],
];

fn ci(rest: &[String]) -> Result<(), String> {
    let dry_run = rest.iter().any(|a| a == "--dry-run");
    for step in CI_STEPS {
        run(step, dry_run)?;
    }
    Ok(())
}

fn bench(rest: &[String]) -> Result<(), String> {
    let mut args = vec!["bench"];
    if rest.is_empty() {
        args.push("--workspace");
    } else {
        for c in rest {
            args.push("-p");
            args.push(c);
        }
    }
    run(&args, false)
}

fn release(rest: &[String]) -> Result<(), String> {
    let execute = rest.iter().any(|a| a == "--execute");
    // Releases start from a state CI accepts.
    ci(&[])?;
    let mut args = vec!["publish", "--workspace"];
    if !execute {
        args.push("--dry-run");
        println!("dry run: pass --execute to publish");
    }
    run(&args, false)
}

fn instant_schema() -> Result<(), String> {
    run(
        &[
            "run",
            "--quiet",
            "-p",
            "sandbox-instant",
            "--example",
            "schema",
        ],
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps() -> Vec<String> {
        CI_STEPS.iter().map(|s| s.join(" ")).collect()
    }

    #[test]
    fn ci_checks_formatting_lints_and_tests() {
        let steps = steps();
        assert!(
            steps.contains(&"fmt --all -- --check".to_string()),
            "{steps:?}"
        );
        assert!(
            steps.contains(&"clippy --workspace --all-targets -- -D warnings".to_string()),
            "{steps:?}"
        );
        assert!(steps.contains(&"test --workspace".to_string()), "{steps:?}");
    }

    #[test]
    fn the_ci_script_runs_the_same_cargo_commands() {
        let script = std::fs::read_to_string(root().join(".ci/run")).unwrap();
        let commands: Vec<String> = script
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_prefix("cargo "))
            .map(str::to_string)
            .collect();
        assert_eq!(commands, steps());
    }

    #[test]
    fn the_readme_names_the_ci_test_command() {
        let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
        let steps = steps();
        let tests: Vec<&str> = readme
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_prefix("cargo test"))
            .collect();
        assert!(
            tests.iter().any(|t| steps.contains(&format!("test{t}"))),
            "none of README.md's test commands {tests:?} is a CI step"
        );
    }
}
