//! Benchmarks of the local provider, each against a baseline measured in the same run:
//!
//! - exec overhead: `/bin/true` through the provider (per isolation mode) vs a direct tokio
//!   spawn with piped output;
//! - output throughput: 1 GiB of stdout (`head -c 1073741824 /dev/zero`) through exec vs the
//!   same command read through a plain pipe;
//! - create + stop of an empty sandbox: median.
//!
//! Run: `cargo bench -p sandbox-local --bench local`. `SANDBOX_LOCAL_BENCH_ITERS` sets the
//! number of spawns per measurement (default 300).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sandbox_core::{
    CreateRequest, Env, ExecEvent, ExecRequest, Provider, SandboxConfig, SandboxHandle, SandboxId,
    StopMode,
};
use sandbox_local::{Isolation, LocalProvider, ROOT_ENV};
use tokio::io::AsyncReadExt;

const GIB: u64 = 1 << 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn provider(root: &std::path::Path) -> Arc<LocalProvider> {
    let env = Env::from_pairs([(ROOT_ENV, root.to_string_lossy().into_owned())]);
    Arc::new(LocalProvider::from_config(&SandboxConfig::default(), &env).unwrap())
}

async fn create(p: &LocalProvider, config: SandboxConfig) -> Arc<dyn SandboxHandle> {
    p.create(&CreateRequest {
        sandbox_id: SandboxId::new(),
        config,
    })
    .await
    .unwrap()
    .handle
}

fn mode_config(mode: Isolation) -> SandboxConfig {
    SandboxConfig::from_json(&format!(r#"{{"local": {{"isolation": "{mode}"}}}}"#)).unwrap()
}

/// Runs `req` to its exit, counting stdout bytes.
async fn drain(sb: &dyn SandboxHandle, req: ExecRequest) -> u64 {
    let mut exec = sb.exec(req).await.unwrap();
    let mut bytes = 0;
    while let Some(ev) = exec.events.next().await {
        match ev.unwrap() {
            ExecEvent::Stdout(b) => bytes += b.len() as u64,
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(e) => assert!(e.success(), "{e:?}"),
        }
    }
    bytes
}

async fn direct_true() {
    let out = tokio::process::Command::new("/bin/true")
        .env_clear()
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
}

async fn plain_pipe(bytes: u64) -> u64 {
    let mut child = tokio::process::Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = out.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert!(child.wait().await.unwrap().success());
    total
}

async fn bench_exec_overhead(root: &std::path::Path, modes: &[Isolation], iters: usize) {
    println!("## exec overhead: /bin/true, median of {iters} runs");
    let p = provider(root);
    for mode in modes {
        let sb = create(&p, mode_config(*mode)).await;
        // Warm-up: detection, ruleset cache, page cache.
        for _ in 0..10 {
            direct_true().await;
            drain(sb.as_ref(), ExecRequest::new(["/bin/true"])).await;
        }
        let (mut direct, mut through) = (Vec::new(), Vec::new());
        // Interleaved so both see the same machine state.
        for _ in 0..iters {
            let t = Instant::now();
            direct_true().await;
            direct.push(t.elapsed());
            let t = Instant::now();
            drain(sb.as_ref(), ExecRequest::new(["/bin/true"])).await;
            through.push(t.elapsed());
        }
        let (d, t) = (median(direct), median(through));
        println!(
            "exec_overhead mode={mode:<8} direct={:>8.3}ms provider={:>8.3}ms ratio={:.2}x",
            d.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() / d.as_secs_f64()
        );
        sb.stop(StopMode::Delete).await.unwrap();
    }
}

async fn bench_throughput(root: &std::path::Path, modes: &[Isolation], bytes: u64) {
    println!(
        "## output throughput: {} MiB of stdout, best of 3",
        bytes >> 20
    );
    let p = provider(root);
    for mode in modes {
        let sb = create(&p, mode_config(*mode)).await;
        let req = ExecRequest::new(["head", "-c", &bytes.to_string(), "/dev/zero"]);
        let (mut pipe, mut exec) = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            let t = Instant::now();
            assert_eq!(plain_pipe(bytes).await, bytes);
            pipe = pipe.min(t.elapsed());
            let t = Instant::now();
            assert_eq!(drain(sb.as_ref(), req.clone()).await, bytes);
            exec = exec.min(t.elapsed());
        }
        let gibs = |d: Duration| bytes as f64 / GIB as f64 / d.as_secs_f64();
        println!(
            "throughput mode={mode:<8} pipe={:>6.2}GiB/s exec={:>6.2}GiB/s ratio={:.2}x",
            gibs(pipe),
            gibs(exec),
            gibs(exec) / gibs(pipe)
        );
        sb.stop(StopMode::Delete).await.unwrap();
    }
}

async fn bench_create_stop(root: &std::path::Path, iters: usize) {
    let p = provider(root);
    let (mut baseline, mut times) = (Vec::new(), Vec::new());
    for i in 0..iters {
        // Baseline: the same directories made and removed with std::fs, no provider.
        let t = Instant::now();
        let dir = root.join(format!("baseline-{i}"));
        for sub in ["workspace", "checkpoints", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
        baseline.push(t.elapsed());
        let t = Instant::now();
        let sb = create(&p, SandboxConfig::default()).await;
        sb.stop(StopMode::Delete).await.unwrap();
        times.push(t.elapsed());
    }
    let (b, m) = (median(baseline), median(times));
    println!(
        "create_stop (auto isolation, delete): median {:.3}ms over {iters} runs; \
         mkdir+rm of the same layout {:.3}ms; ratio={:.2}x",
        m.as_secs_f64() * 1e3,
        b.as_secs_f64() * 1e3,
        m.as_secs_f64() / b.as_secs_f64()
    );
}

fn main() {
    let iters: usize = std::env::var("SANDBOX_LOCAL_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sandbox-local-bench");
    std::fs::create_dir_all(&base).unwrap();
    let root = tempfile::tempdir_in(base).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let modes = LocalProvider::offered_isolations().await;
        println!("isolation modes offered here: {modes:?}");
        bench_exec_overhead(root.path(), &modes, iters).await;
        bench_throughput(root.path(), &modes, GIB).await;
        bench_create_stop(root.path(), 101).await;
    });
}
