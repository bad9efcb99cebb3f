//! Start-up time of the `sandbox` binary: median wall time of `sandbox --version` and of
//! `sandbox ls` on an empty store, each also given as a ratio to spawning `/bin/true` (the
//! cost of starting any process on this machine), measured in the same run.
//!
//! `cargo bench -p sandbox-cli --bench startup`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 31;

fn median(mut cmd: impl FnMut() -> Command) -> Duration {
    // One warm-up run so the page cache holds the binary.
    let _ = cmd().status();
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let mut c = cmd();
            c.stdout(Stdio::null()).stderr(Stdio::null());
            let start = Instant::now();
            let status = c.status().expect("spawn");
            let elapsed = start.elapsed();
            assert!(status.success(), "{c:?} failed: {status}");
            elapsed
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

fn main() {
    let bin = env!("CARGO_BIN_EXE_sandbox");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}", dir.path().join("bench.db").display());
    let local_root = dir.path().join("local");

    let baseline = median(|| Command::new("true"));
    let version = median(|| {
        let mut c = Command::new(bin);
        c.arg("--version");
        c
    });
    let ls = median(|| {
        let mut c = Command::new(bin);
        c.arg("ls")
            .env("SANDBOX_STORE", &store)
            .env("SANDBOX_LOCAL_ROOT", &local_root);
        c
    });
    let ratio = |d: Duration| d.as_secs_f64() / baseline.as_secs_f64();
    println!("startup (median of {RUNS} runs)");
    println!(
        "  baseline `true`      {:>8.2} ms",
        baseline.as_secs_f64() * 1e3
    );
    println!(
        "  sandbox --version    {:>8.2} ms  ({:.1}x baseline)",
        version.as_secs_f64() * 1e3,
        ratio(version)
    );
    println!(
        "  sandbox ls (empty)   {:>8.2} ms  ({:.1}x baseline)",
        ls.as_secs_f64() * 1e3,
        ratio(ls)
    );
}
