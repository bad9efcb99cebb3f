//! Start-up time of the `sandbox` binary: median wall time of `sandbox --version` and of
//! `sandbox ls` on an empty store, each also given as a ratio to spawning `true` (the cost of
//! starting any process on this machine), measured in the same run. The three are measured
//! round-robin so that load from elsewhere on the machine affects them alike.
//!
//! `cargo bench -p sandbox-cli --bench startup`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 41;

fn time_once(mut c: Command) -> Duration {
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let start = Instant::now();
    let status = c.status().expect("spawn");
    let elapsed = start.elapsed();
    assert!(status.success(), "{c:?} failed: {status}");
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let bin = env!("CARGO_BIN_EXE_sandbox");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}", dir.path().join("bench.db").display());
    let local_root = dir.path().join("local");

    let baseline = || Command::new("true");
    let version = || {
        let mut c = Command::new(bin);
        c.arg("--version");
        c
    };
    let ls = || {
        let mut c = Command::new(bin);
        c.arg("ls")
            .env("SANDBOX_STORE", &store)
            .env("SANDBOX_LOCAL_ROOT", &local_root);
        c
    };
    // Warm-up: page cache, and the store file created by the first `ls`.
    for _ in 0..3 {
        time_once(baseline());
        time_once(version());
        time_once(ls());
    }
    let (mut t_base, mut t_version, mut t_ls) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        t_base.push(time_once(baseline()));
        t_version.push(time_once(version()));
        t_ls.push(time_once(ls()));
    }
    let (base, version, ls) = (median(t_base), median(t_version), median(t_ls));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ratio = |d: Duration| d.as_secs_f64() / base.as_secs_f64();
    println!("startup (median of {RUNS} runs, round-robin)");
    println!("  baseline `true`      {:>8.2} ms", ms(base));
    println!(
        "  sandbox --version    {:>8.2} ms  ({:.2}x baseline)",
        ms(version),
        ratio(version)
    );
    println!(
        "  sandbox ls (empty)   {:>8.2} ms  ({:.2}x baseline)",
        ms(ls),
        ratio(ls)
    );
}
