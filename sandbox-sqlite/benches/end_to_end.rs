//! End to end: a command in a `local` sandbox printing 256 MiB, recorded live through the
//! service into SQLite, against the same command with its output sent to a plain file, in the
//! same run; with the peak memory of the recording process.
//!
//! `cargo bench -p sandbox-sqlite --bench end_to_end` (`E2E_MIB=<n>` sets the volume, default
//! 256).

use std::time::{Duration, Instant};

use sandbox_core::{CommandSpec, Env, ExecRequest, SandboxConfig, SandboxService, StopMode};
use sandbox_sqlite::{SqliteConfig, SqliteDatabase};

/// VmHWM (peak resident memory) of this process, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resets VmHWM to the current resident size (Linux `clear_refs` 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let mib: u64 = if smoke {
        4
    } else {
        std::env::var("E2E_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
    };
    let bytes = mib << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDatabase::open(&SqliteConfig::file(dir.path().join("e2e.db"))).unwrap();
    let config = SandboxConfig::from_json(&format!(
        r#"{{"provider": "local", "local": {{"root": "{}"}}}}"#,
        dir.path().join("sandboxes").display()
    ))
    .unwrap();
    let provider: std::sync::Arc<dyn sandbox_core::Provider> = std::sync::Arc::new(
        sandbox_local::LocalProvider::from_config(&config, &Env::process()).unwrap(),
    );
    let service = SandboxService::builder()
        .store(db.backend())
        .provider(provider)
        .use_registry(false)
        .bootstrappers(vec![])
        .build()
        .unwrap();
    let printer = format!(
        "yes 'a line of build output from the benchmark, seventy-odd bytes long....' | head -c {bytes}"
    );

    rt.block_on(async {
        let sandbox = service.create(&config).await.unwrap();

        // Baseline: the same command, its output redirected to a file in the workspace.
        let start = Instant::now();
        let out = service
            .run_command(
                &sandbox.id,
                ExecRequest::shell(format!("{printer} > plain.out")),
            )
            .await
            .unwrap();
        let plain = start.elapsed();
        assert!(out.exit.success(), "{out:?}");

        // Recorded: output streamed live into the SQLite log.
        reset_peak_rss();
        let rss_before = peak_rss_mib();
        let start = Instant::now();
        let run = service
            .spawn(
                &sandbox.id,
                CommandSpec::new(ExecRequest::shell(printer.clone())),
            )
            .await
            .unwrap();
        let outcome = run.wait().await.unwrap();
        let recorded = start.elapsed();
        let peak = peak_rss_mib();
        assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
        let status = service
            .logs()
            .status(&run.process_id())
            .await
            .unwrap()
            .unwrap();

        let rate = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
        println!(
            "{:<34} {:>9} {:>9} {:>7}",
            "case", "MB/s", "seconds", "ratio"
        );
        println!(
            "{:<34} {:>9.1} {:>9.3} {:>7.2}",
            format!("plain file, {mib} MiB"),
            rate(plain),
            plain.as_secs_f64(),
            1.0
        );
        println!(
            "{:<34} {:>9.1} {:>9.3} {:>7.2}",
            format!("recorded into sqlite, {mib} MiB"),
            rate(recorded),
            recorded.as_secs_f64(),
            plain.as_secs_f64() / recorded.as_secs_f64()
        );
        println!(
            "log: {} chunks, {:.1} MiB of NDJSON; isolation: {}",
            status.entries,
            status.bytes as f64 / 1048576.0,
            sandbox
                .params
                .as_ref()
                .and_then(|p| p.pointer("/local/isolation"))
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into())
        );
        println!("peak RSS while recording: {peak:.1} MiB (resident before: {rss_before:.1} MiB)");
        service.stop(&sandbox.id, StopMode::Delete).await.unwrap();
    });
}
