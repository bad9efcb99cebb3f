//! Shared set-up of the integration tests: one provider per isolation mode, rooted in a fresh
//! directory under the target dir (not under /tmp, so host-/tmp escape checks are unambiguous).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sandbox_core::{
    CreateRequest, Env, ExecEvent, ExecRequest, ExitStatus, Provider, Provisioned, SandboxConfig,
    SandboxHandle, SandboxId,
};
use sandbox_local::{Isolation, LocalProvider, ROOT_ENV};

/// Set (e.g. `bwrap,landlock`) where the machine must offer those modes: CI sets it so a
/// missing bubblewrap fails instead of skipping.
pub const REQUIRE_ENV: &str = "SANDBOX_LOCAL_REQUIRE_ISOLATION";

/// The modes to test on this machine, printing why others are skipped.
pub async fn modes(wanted: &[Isolation]) -> Vec<Isolation> {
    let offered = LocalProvider::offered_isolations().await;
    let required = std::env::var(REQUIRE_ENV).unwrap_or_default();
    let mut run = Vec::new();
    for mode in wanted {
        if offered.contains(mode) {
            run.push(*mode);
        } else if required.split(',').any(|r| r.trim() == mode.as_str()) {
            panic!(
                "{REQUIRE_ENV} requires {mode} isolation, which this machine does not offer: {:?}",
                sandbox_local::availability()
            );
        } else {
            eprintln!(
                "SKIPPED for {mode}: this machine does not offer it ({:?}); install bubblewrap / \
                 use a kernel with Landlock to run these checks",
                sandbox_local::availability()
            );
        }
    }
    run
}

/// A fresh root directory under the target dir.
pub fn root() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sandbox-local-tests");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("root-")
        .tempdir_in(base)
        .unwrap()
}

/// Config JSON with `"local": {"isolation": <mode>, ...extra}` merged in.
pub fn config(mode: Isolation, extra: &str) -> SandboxConfig {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    SandboxConfig::from_json(&format!(r#"{{"local": {{"isolation": "{mode}"}}{extra}}}"#)).unwrap()
}

/// A provider rooted at `root`.
pub fn provider(root: &Path) -> Arc<LocalProvider> {
    let env = Env::from_pairs([(ROOT_ENV, root.to_string_lossy().into_owned())]);
    Arc::new(LocalProvider::from_config(&SandboxConfig::default(), &env).unwrap())
}

/// A sandbox in `mode`, with `extra` top-level config JSON (e.g. `"ports": [8080]`).
pub async fn sandbox(
    mode: Isolation,
    extra: &str,
) -> (tempfile::TempDir, Arc<LocalProvider>, Provisioned) {
    sandbox_with(config(mode, extra)).await
}

/// A sandbox created from `config`, under a fresh root.
pub async fn sandbox_with(
    config: SandboxConfig,
) -> (tempfile::TempDir, Arc<LocalProvider>, Provisioned) {
    let dir = root();
    let p = provider(dir.path());
    let provisioned = p
        .create(&CreateRequest {
            sandbox_id: SandboxId::new(),
            config: config.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("create with {config:?}: {e}"));
    (dir, p, provisioned)
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
    pub exit: ExitStatus,
}

/// Runs `req` to the end (bounded: 60 s).
pub async fn run(sb: &dyn SandboxHandle, req: ExecRequest) -> Ran {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut exec = sb.exec(req).await.expect("exec");
        let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
        while let Some(ev) = exec.events.next().await {
            match ev.expect("event") {
                ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                ExecEvent::Stderr(b) => err.extend_from_slice(&b),
                ExecEvent::Exit(e) => {
                    assert!(exit.is_none(), "two exit events");
                    exit = Some(e)
                }
            }
        }
        Ran {
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            exit: exit.expect("no exit event"),
        }
    })
    .await
    .expect("command did not finish within 60 s")
}

/// `/bin/sh -c script`.
pub fn sh(script: &str) -> ExecRequest {
    ExecRequest::shell(script)
}

/// Whether a host process exists (and is not a zombie we have not reaped).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (bounded) until `cond` holds.
pub async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
