//! HTTP round trips and wall time per operation of the `sprites` provider through the
//! service, against the emulator with 20 ms added to every request.
//!
//! `cargo bench -p sandbox-sprites --bench round_trips`
//!
//! Wall times are reported as multiples of one round trip (`GET /v1/sprites/{name}`) measured
//! in the same run, next to the request counts of the TypeScript package. Nothing is
//! asserted: the request counts are asserted in `tests/faults.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_core::memory::memory_backend;
use sandbox_core::Provider;
use sandbox_core::{
    CommandSpec, Env, ExecRequest, FileWrite, ResumeRequest, SandboxConfig, SandboxId,
    SandboxService, StopMode,
};
use sandbox_sprites::SpritesProvider;
use sandbox_testkit::sprites::SpritesEmulator;

const LATENCY: Duration = Duration::from_millis(20);
const ROUNDS: usize = 5;

struct Row {
    op: &'static str,
    upstream: &'static str,
    requests: Vec<usize>,
    times: Vec<Duration>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let emu = SpritesEmulator::start("bench-token")
        .await
        .expect("emulator");
    let env = Env::from_pairs([
        ("SPRITES_API_TOKEN", "bench-token".to_string()),
        ("SPRITES_API_BASE_URL", emu.base_url()),
    ]);
    let config = SandboxConfig::from_json(r#"{"provider":"sprites"}"#).unwrap();
    let provider = Arc::new(SpritesProvider::from_config(&config, &env).unwrap());
    let svc = SandboxService::builder()
        .store(memory_backend())
        .provider(provider.clone())
        .use_registry(false)
        .bootstrappers(vec![])
        .build()
        .unwrap();
    emu.set_latency(LATENCY);

    let mut rows = vec![
        Row {
            op: "create",
            upstream: "4",
            requests: vec![],
            times: vec![],
        },
        Row {
            op: "run_command",
            upstream: "3",
            requests: vec![],
            times: vec![],
        },
        Row {
            op: "recorded process run",
            upstream: "3",
            requests: vec![],
            times: vec![],
        },
        Row {
            op: "write_files (3 files)",
            upstream: "5",
            requests: vec![],
            times: vec![],
        },
        Row {
            op: "read_file",
            upstream: "3",
            requests: vec![],
            times: vec![],
        },
        Row {
            op: "stop",
            upstream: "5",
            requests: vec![],
            times: vec![],
        },
        Row {
            op: "resume (cold service)",
            upstream: "-",
            requests: vec![],
            times: vec![],
        },
    ];
    let mut baseline = Vec::new();

    for _ in 0..ROUNDS {
        macro_rules! measure {
            ($i:expr, $e:expr) => {{
                let before = emu.request_count();
                let t = Instant::now();
                let v = $e;
                rows[$i].times.push(t.elapsed());
                rows[$i].requests.push(emu.request_count() - before);
                v
            }};
        }
        let rec = measure!(0, svc.create(&config).await.unwrap());
        let name = rec.external_sandbox_id.clone().unwrap();

        // One plain round trip: the unit the wall times are expressed in.
        let probe = ResumeRequest {
            sandbox_id: SandboxId::new(),
            external_id: name.clone(),
            url: None,
            params: serde_json::Value::Null,
        };
        let t = Instant::now();
        let _ = provider.resume(&probe).await.unwrap();
        baseline.push(t.elapsed());

        measure!(
            1,
            svc.run_command(&rec.id, ExecRequest::new(["true"]))
                .await
                .unwrap()
        );
        measure!(2, {
            let run = svc
                .spawn(&rec.id, CommandSpec::new(ExecRequest::new(["true"])))
                .await
                .unwrap();
            run.wait().await.unwrap()
        });
        measure!(
            3,
            svc.write_files(
                &rec.id,
                vec![
                    FileWrite::new("a.txt", "a"),
                    FileWrite::new("b/b.txt", "b"),
                    FileWrite::new("c/c.txt", "c"),
                ],
            )
            .await
            .unwrap()
        );
        measure!(4, svc.read_file(&rec.id, "a.txt").await.unwrap());
        // A fresh service has no cached handle: its first use resumes.
        let cold = SandboxService::builder()
            .records(svc.records().clone())
            .logs(svc.logs().clone())
            .provider(provider.clone())
            .use_registry(false)
            .bootstrappers(vec![])
            .build()
            .unwrap();
        measure!(6, cold.reconnect(&rec.id).await.unwrap());
        measure!(5, svc.stop(&rec.id, StopMode::Default).await.unwrap());
    }

    let unit = median(baseline);
    println!(
        "sprites provider round trips, {ROUNDS} rounds, {} ms latency per request",
        LATENCY.as_millis()
    );
    println!(
        "one round trip (GET sprite) median: {:.1} ms",
        unit.as_secs_f64() * 1e3
    );
    println!(
        "{:<24} {:>9} {:>9} {:>12} {:>14}",
        "operation", "requests", "upstream", "median ms", "x round trip"
    );
    for r in rows {
        let reqs = r.requests.iter().max().copied().unwrap_or(0);
        let m = median(r.times);
        println!(
            "{:<24} {:>9} {:>9} {:>12.1} {:>14.2}",
            r.op,
            reqs,
            r.upstream,
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() / unit.as_secs_f64()
        );
    }
}
