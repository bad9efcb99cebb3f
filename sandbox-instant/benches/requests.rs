//! Requests and wall time of one recorded process run (start, N output chunks, finish)
//! against the InstantDB emulator, batched appends versus a baseline that sends every chunk
//! in its own request (what upstream does), measured in the same run.
//!
//! `cargo bench -p sandbox-instant --bench requests`

#[path = "../tests/support/common.rs"]
mod common;
#[path = "../tests/support/run.rs"]
mod run;

use std::time::{Duration, Instant};

use sandbox_testkit::instant::InstantEmulator;

struct Figures {
    total: usize,
    appends: usize,
    wall: Duration,
}

async fn measure(
    emu: &InstantEmulator,
    chunks: usize,
    batched: bool,
    latency: Duration,
) -> Figures {
    let mut cfg = common::config(emu);
    if !batched {
        cfg.batch_bytes = 0;
    }
    let backend = sandbox_instant::backend(cfg).unwrap();
    let (svc, sandbox) = run::service_with_sandbox(backend, chunks).await;
    emu.set_latency(latency);
    emu.clear_requests();
    let start = Instant::now();
    let outcome = run::recorded_run(&svc, &sandbox).await;
    let wall = start.elapsed();
    emu.set_latency(Duration::ZERO);
    assert_eq!(outcome.status, sandbox_core::ProcessStatus::Exited);
    let reqs = emu.requests();
    let appends = reqs
        .iter()
        .filter(|r| r.ops.iter().any(|o| o == "append-stream"))
        .count();
    Figures {
        total: reqs.len(),
        appends,
        wall,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let emu = common::emulator().await;
        println!(
            "one recorded process run (status + N stdout chunks + exit), requests to the emulator:"
        );
        println!(
            "{:>7} {:>22} {:>22} {:>8}",
            "chunks", "batched total/appends", "baseline total/appends", "ratio"
        );
        for n in [10, 1_000, 10_000] {
            let b = measure(&emu, n, true, Duration::ZERO).await;
            let u = measure(&emu, n, false, Duration::ZERO).await;
            println!(
                "{n:>7} {:>14}/{:<7} {:>14}/{:<7} {:>7.3}",
                b.total,
                b.appends,
                u.total,
                u.appends,
                b.total as f64 / u.total as f64
            );
        }
        let latency = Duration::from_millis(20);
        println!(
            "\nwall time with {} ms latency per request:",
            latency.as_millis()
        );
        println!(
            "{:>7} {:>12} {:>12} {:>8}",
            "chunks", "batched", "baseline", "ratio"
        );
        for n in [10, 200] {
            let b = measure(&emu, n, true, latency).await;
            let u = measure(&emu, n, false, latency).await;
            println!(
                "{n:>7} {:>10.0}ms {:>10.0}ms {:>8.3}",
                b.wall.as_secs_f64() * 1e3,
                u.wall.as_secs_f64() * 1e3,
                b.wall.as_secs_f64() / u.wall.as_secs_f64()
            );
        }
    });
}
