//! Conformance suite for [`Provider`] implementations.
//!
//! Drives the provider directly (create, exec, files, ports, checkpoints, resume, stop) and
//! then through [`SandboxService`] over the memory store, for the recorded, live-streamed run.
//! Sandboxes need a POSIX `/bin/sh` with `printf`, `cat`, `sleep`, `mkdir` and `pwd`.
//! Every capability flag that is `false` must make its operation return
//! [`Error::Unsupported`]; such checks are reported as skipped, never silently.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sandbox_core::memory::memory_backend;
use sandbox_core::{
    ChunkType, CommandSpec, CreateRequest, Error, ExecEvent, ExecRequest, ExitStatus, FileWrite,
    ProcessStatus, Provider, ReadFrom, ResumeRequest, SandboxConfig, SandboxHandle, SandboxId,
    SandboxService, SandboxStatus, StopMode,
};

use crate::report::{ensure, Context, Outcome, SuiteReport};

const LIMIT: Duration = Duration::from_secs(60);

/// Everything one execution produced.
#[derive(Debug, Default)]
pub struct Collected {
    /// stdout bytes.
    pub stdout: Vec<u8>,
    /// stderr bytes.
    pub stderr: Vec<u8>,
    /// Every exit event (a correct provider yields exactly one, last).
    pub exits: Vec<ExitStatus>,
    /// Whether an event came after the exit.
    pub events_after_exit: bool,
}

/// Runs `req` on `sandbox` and collects every event.
///
/// # Errors
/// The start error or the first error on the event stream, as text.
pub async fn collect(sandbox: &dyn SandboxHandle, req: ExecRequest) -> Result<Collected, String> {
    let mut exec = sandbox.exec(req).await.ctx("exec")?;
    let mut c = Collected::default();
    while let Some(ev) = exec.events.next().await {
        if !c.exits.is_empty() {
            c.events_after_exit = true;
        }
        match ev.ctx("exec event")? {
            ExecEvent::Stdout(b) => c.stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => c.stderr.extend_from_slice(&b),
            ExecEvent::Exit(e) => c.exits.push(e),
        }
    }
    Ok(c)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["/bin/sh", "-c", script])
}

fn one_exit(c: &Collected) -> Result<&ExitStatus, String> {
    ensure!(
        c.exits.len() == 1,
        "expected exactly one exit event, got {}",
        c.exits.len()
    );
    ensure!(!c.events_after_exit, "events arrived after the exit event");
    Ok(&c.exits[0])
}

fn is_unsupported<T: std::fmt::Debug>(r: &Result<T, Error>) -> Result<(), String> {
    match r {
        Err(Error::Unsupported { .. }) => Ok(()),
        other => Err(format!("declared unsupported, but the call gave {other:?}")),
    }
}

fn join(root: &str, rel: &str) -> String {
    format!("{}/{}", root.trim_end_matches('/'), rel)
}

/// Runs every provider check against `provider`, creating sandboxes from `config`.
pub async fn run_provider_suite(provider: Arc<dyn Provider>, config: SandboxConfig) -> SuiteReport {
    let mut r = SuiteReport::new(format!("provider {}", provider.name()));
    let caps = provider.capabilities();
    let id = SandboxId::new();
    let provisioned = match provider
        .create(&CreateRequest {
            sandbox_id: id,
            config: config.clone(),
        })
        .await
    {
        Ok(p) => p,
        Err(e) => {
            r.check("create_provisions_a_sandbox", LIMIT, async move {
                Err(format!("create failed: {e}"))
            })
            .await;
            return r;
        }
    };
    let sb = provisioned.handle.clone();
    let root = sb.workspace().to_string();
    let s = sb.as_ref();

    r.check("create_provisions_a_sandbox", LIMIT, async {
        ensure!(!provisioned.external_id.is_empty(), "empty external id");
        ensure!(root.starts_with('/'), "workspace {root:?} is not absolute");
        ensure!(
            provisioned.params.is_object() || provisioned.params.is_null(),
            "params are not a JSON object: {}",
            provisioned.params
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check(
        "exec_streams_stdout_and_stderr_separately_then_one_exit",
        LIMIT,
        async {
            let c = collect(s, sh("printf out1; printf err1 >&2; printf out2")).await?;
            let exit = one_exit(&c)?;
            ensure!(exit.success(), "exit {exit:?}");
            ensure!(
                c.stdout == b"out1out2",
                "stdout {:?}",
                String::from_utf8_lossy(&c.stdout)
            );
            ensure!(
                c.stderr == b"err1",
                "stderr {:?}",
                String::from_utf8_lossy(&c.stderr)
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check("exec_reports_the_exit_code", LIMIT, async {
        let c = collect(s, sh("exit 7")).await?;
        let exit = one_exit(&c)?;
        ensure!(exit.code == Some(7), "exit {exit:?}, expected code 7");
        ensure!(!exit.success(), "exit 7 reported as success");
        Ok(Outcome::Passed)
    })
    .await;

    r.check("exec_output_is_binary_safe", LIMIT, async {
        let c = collect(s, sh("printf 'a\\000b\\377c'")).await?;
        one_exit(&c)?;
        ensure!(c.stdout == b"a\0b\xffc", "stdout bytes {:?}", c.stdout);
        Ok(Outcome::Passed)
    })
    .await;

    r.check("exec_runs_argv_without_a_shell", LIMIT, async {
        let c = collect(s, ExecRequest::new(["printf", "%s|", "a b", "$HOME", ";x"])).await?;
        one_exit(&c)?;
        ensure!(
            c.stdout == b"a b|$HOME|;x|",
            "argv was reinterpreted: {:?}",
            String::from_utf8_lossy(&c.stdout)
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("exec_passes_env_and_cwd", LIMIT, async {
        let c = collect(s, sh("mkdir -p sub/dir")).await?;
        ensure!(
            one_exit(&c)?.success(),
            "mkdir failed: {}",
            String::from_utf8_lossy(&c.stderr)
        );
        let req = sh("printf '%s:' \"$SUITE_VALUE\"; pwd")
            .env("SUITE_VALUE", "it's \"quoted\" $x")
            .cwd(join(&root, "sub/dir"));
        let c = collect(s, req).await?;
        ensure!(
            one_exit(&c)?.success(),
            "stderr {}",
            String::from_utf8_lossy(&c.stderr)
        );
        let out = String::from_utf8_lossy(&c.stdout).to_string();
        ensure!(
            out.starts_with("it's \"quoted\" $x:"),
            "env value arrived as {out:?}"
        );
        ensure!(out.trim_end().ends_with("/sub/dir"), "cwd was {out:?}");
        Ok(Outcome::Passed)
    })
    .await;

    r.check("exec_feeds_stdin", LIMIT, async {
        let input = Bytes::from_static(b"line one\nline \x00two\n");
        let req = ExecRequest::new(["cat"]).stdin(input.clone());
        if !caps.stdin {
            is_unsupported(&s.exec(req).await.map(|_| ()))?;
            return Ok(Outcome::Skipped("stdin unsupported (verified)".into()));
        }
        let c = collect(s, req).await?;
        one_exit(&c)?;
        ensure!(c.stdout == input, "cat echoed {:?}", c.stdout);
        Ok(Outcome::Passed)
    })
    .await;

    r.check(
        "exec_timeout_kills_and_keeps_partial_output",
        LIMIT,
        async {
            if !caps.timeout {
                return Ok(Outcome::Skipped(
                    "provider does not enforce timeouts".into(),
                ));
            }
            let start = Instant::now();
            let c = collect(
                s,
                sh("echo started; sleep 30; echo never").timeout(Duration::from_secs(1)),
            )
            .await?;
            let exit = one_exit(&c)?;
            ensure!(
                exit.timed_out,
                "exit after timeout {exit:?}, expected timed_out"
            );
            ensure!(!exit.success(), "timed out command reported success");
            ensure!(
                c.stdout == b"started\n",
                "partial output {:?}",
                String::from_utf8_lossy(&c.stdout)
            );
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "timeout took {:?}",
                start.elapsed()
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check("exec_kill_ends_the_command", LIMIT, async {
        let mut exec = s.exec(sh("echo ready; sleep 30")).await.ctx("exec")?;
        let Some(control) = exec.control.clone() else {
            return Ok(Outcome::Skipped("provider gives no kill control".into()));
        };
        let start = Instant::now();
        // Wait for the command to be running before killing it.
        let mut seen = Vec::new();
        while !seen.ends_with(b"ready\n") {
            match exec.events.next().await {
                Some(Ok(ExecEvent::Stdout(b))) => seen.extend_from_slice(&b),
                Some(Ok(ExecEvent::Stderr(_))) => {}
                other => return Err(format!("before kill: {other:?}")),
            }
        }
        control.kill().await.ctx("kill")?;
        let mut exits = Vec::new();
        while let Some(ev) = exec.events.next().await {
            if let ExecEvent::Exit(e) = ev.ctx("event after kill")? {
                exits.push(e);
            }
        }
        ensure!(exits.len() == 1, "{} exit events after kill", exits.len());
        ensure!(
            !exits[0].success(),
            "killed command reported success: {:?}",
            exits[0]
        );
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "kill took {:?}",
            start.elapsed()
        );
        control.kill().await.ctx("kill of an ended command")?;
        Ok(Outcome::Passed)
    })
    .await;

    r.check("exec_of_a_missing_program_never_succeeds", LIMIT, async {
        match s
            .exec(ExecRequest::new(["/nonexistent/program-7f3a"]))
            .await
        {
            Err(_) => Ok(Outcome::Passed),
            Ok(mut exec) => {
                let mut exit = None;
                while let Some(ev) = exec.events.next().await {
                    match ev {
                        Ok(ExecEvent::Exit(e)) => exit = Some(e),
                        Ok(_) => {}
                        Err(_) => return Ok(Outcome::Passed),
                    }
                }
                let exit = exit.ok_or("no exit event")?;
                ensure!(!exit.success(), "missing program reported success");
                Ok(Outcome::Passed)
            }
        }
    })
    .await;

    let file = join(&root, "suite/nested/dir/data.bin");
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();

    r.check(
        "files_round_trip_binary_content_and_create_parents",
        LIMIT,
        async {
            let res = s
                .write_files(vec![FileWrite::new(file.clone(), all_bytes.clone())])
                .await;
            if !caps.files {
                is_unsupported(&res)?;
                return Ok(Outcome::Skipped("files unsupported (verified)".into()));
            }
            res.ctx("write_files")?;
            let back = s
                .read_file(&file)
                .await
                .ctx("read_file")?
                .ok_or("written file is missing")?;
            ensure!(
                back.as_ref() == &all_bytes[..],
                "read {} bytes, differing from the {} written",
                back.len(),
                all_bytes.len()
            );
            s.write_files(vec![FileWrite::new(file.clone(), "short")])
                .await
                .ctx("overwrite")?;
            let back = s
                .read_file(&file)
                .await
                .ctx("read_file")?
                .ok_or("missing after overwrite")?;
            ensure!(back.as_ref() == b"short", "overwrite left {:?}", back);
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check(
        "read_of_missing_file_is_none_and_empty_file_is_empty",
        LIMIT,
        async {
            if !caps.files {
                return Ok(Outcome::Skipped("files unsupported".into()));
            }
            let missing = s
                .read_file(&join(&root, "suite/absent.txt"))
                .await
                .ctx("read missing")?;
            ensure!(missing.is_none(), "missing file read as {missing:?}");
            let empty = join(&root, "suite/empty.txt");
            s.write_files(vec![FileWrite::new(empty.clone(), Bytes::new())])
                .await
                .ctx("write empty")?;
            let back = s.read_file(&empty).await.ctx("read empty")?;
            ensure!(
                back.as_deref() == Some(&b""[..]),
                "empty file read as {back:?}"
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check("files_and_exec_see_the_same_workspace", LIMIT, async {
        if !caps.files {
            return Ok(Outcome::Skipped("files unsupported".into()));
        }
        s.write_files(vec![FileWrite::new(
            join(&root, "suite/from-api.txt"),
            "api",
        )])
        .await
        .ctx("write")?;
        let c = collect(
            s,
            sh("cat suite/from-api.txt; printf shell > suite/from-shell.txt").cwd(root.clone()),
        )
        .await?;
        ensure!(
            one_exit(&c)?.success(),
            "stderr {}",
            String::from_utf8_lossy(&c.stderr)
        );
        ensure!(
            c.stdout == b"api",
            "exec read {:?}",
            String::from_utf8_lossy(&c.stdout)
        );
        let back = s
            .read_file(&join(&root, "suite/from-shell.txt"))
            .await
            .ctx("read")?;
        ensure!(
            back.as_deref() == Some(&b"shell"[..]),
            "read_file saw {back:?}"
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("port_url_for_a_declared_port", LIMIT, async {
        let port = config
            .ports
            .as_ref()
            .and_then(|p| p.first().copied())
            .unwrap_or(3000);
        let res = s.port_url(port).await;
        if !caps.ports {
            is_unsupported(&res)?;
            return Ok(Outcome::Skipped("ports unsupported (verified)".into()));
        }
        if config.ports.as_ref().is_none_or(|p| p.is_empty()) {
            return Ok(Outcome::Skipped("the suite config declares no port".into()));
        }
        let url = res.ctx("port_url")?;
        ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "port url {url:?}"
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("checkpoint_and_restore_bring_files_back", LIMIT, async {
        if !caps.checkpoints {
            is_unsupported(&s.checkpoint(Some("suite".into())).await)?;
            is_unsupported(&s.list_checkpoints().await)?;
            return Ok(Outcome::Skipped(
                "checkpoints unsupported (verified)".into(),
            ));
        }
        let kept = join(&root, "cp/kept.txt");
        let later = join(&root, "cp/later.txt");
        s.write_files(vec![FileWrite::new(kept.clone(), "one")])
            .await
            .ctx("write")?;
        let cp = s
            .checkpoint(Some("before change".into()))
            .await
            .ctx("checkpoint")?;
        ensure!(!cp.id.is_empty(), "empty checkpoint id");
        let list = s.list_checkpoints().await.ctx("list_checkpoints")?;
        ensure!(
            list.iter().any(|c| c.id == cp.id),
            "list {list:?} lacks {}",
            cp.id
        );
        s.write_files(vec![
            FileWrite::new(kept.clone(), "two"),
            FileWrite::new(later.clone(), "new"),
        ])
        .await
        .ctx("write after checkpoint")?;
        let res = s.restore(&cp.id).await;
        if !caps.restore {
            is_unsupported(&res)?;
            return Ok(Outcome::Passed);
        }
        res.ctx("restore")?;
        let back = s.read_file(&kept).await.ctx("read kept")?;
        ensure!(
            back.as_deref() == Some(&b"one"[..]),
            "after restore kept.txt is {back:?}"
        );
        let gone = s.read_file(&later).await.ctx("read later")?;
        ensure!(
            gone.is_none(),
            "a file created after the checkpoint survived the restore"
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("resume_rebuilds_a_working_handle", LIMIT, async {
        let again = provider
            .resume(&ResumeRequest {
                sandbox_id: id,
                external_id: provisioned.external_id.clone(),
                url: provisioned.url.clone(),
                params: provisioned.params.clone(),
            })
            .await
            .ctx("resume")?;
        ensure!(
            again.workspace() == root,
            "resumed workspace {} != {root}",
            again.workspace()
        );
        let c = collect(again.as_ref(), sh("printf resumed")).await?;
        ensure!(
            one_exit(&c)?.success() && c.stdout == b"resumed",
            "exec on resumed handle"
        );
        if caps.files {
            let back = again
                .read_file(&join(&root, "suite/from-api.txt"))
                .await
                .ctx("read")?;
            ensure!(
                back.as_deref() == Some(&b"api"[..]),
                "resumed handle reads {back:?}"
            );
        }
        Ok(Outcome::Passed)
    })
    .await;

    r.check(
        "stop_with_delete_makes_the_sandbox_unusable",
        LIMIT,
        async {
            if !caps.stop {
                is_unsupported(&s.stop(StopMode::Delete).await)?;
                return Ok(Outcome::Skipped("stop unsupported (verified)".into()));
            }
            s.stop(StopMode::Delete).await.ctx("stop")?;
            let resumed = provider
                .resume(&ResumeRequest {
                    sandbox_id: id,
                    external_id: provisioned.external_id.clone(),
                    url: provisioned.url.clone(),
                    params: provisioned.params.clone(),
                })
                .await;
            match resumed {
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(format!("resume after delete gave {e}, expected not found")),
                Ok(h) => {
                    let ran = collect(h.as_ref(), sh("true")).await;
                    ensure!(
                        ran.is_err()
                            || ran
                                .as_ref()
                                .is_ok_and(|c| c.exits.iter().all(|e| !e.success())),
                        "a deleted sandbox still runs commands"
                    );
                }
            }
            match s.stop(StopMode::Delete).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(format!("second stop gave {e}")),
            }
            Ok(Outcome::Passed)
        },
    )
    .await;

    service_checks(&mut r, provider.clone(), config).await;
    r
}

/// Checks that go through the service: a recorded run streamed live into the log.
async fn service_checks(r: &mut SuiteReport, provider: Arc<dyn Provider>, config: SandboxConfig) {
    let caps = provider.capabilities();
    let service = match SandboxService::builder()
        .store(memory_backend())
        .provider(provider.clone())
        .use_registry(false)
        .bootstrappers(vec![])
        .build()
    {
        Ok(s) => s,
        Err(e) => {
            r.check("service_builds", LIMIT, async move { Err(e.to_string()) })
                .await;
            return;
        }
    };
    let mut config = config;
    config.provider = Some(sandbox_core::ProviderSelector::Name(
        provider.name().to_string(),
    ));

    r.check(
        "service_recorded_run_streams_output_while_running",
        LIMIT,
        async {
            let rec = service.create(&config).await.ctx("service create")?;
            ensure!(
                rec.status == SandboxStatus::Active,
                "created sandbox is {}",
                rec.status
            );
            // A streaming provider with files: the command waits (up to 20 s) for a file the
            // check writes once it has seen `one` in the log, so `one` is in the log while the
            // command runs however slow the machine is. Otherwise it sleeps 2 s.
            let gated = caps.exec_stream && caps.files;
            let gate = if gated {
                "i=0; while [ ! -e .suite-go ] && [ $i -lt 20 ]; do sleep 1; i=$((i+1)); done"
            } else {
                "sleep 2"
            };
            let run = service
                .spawn(
                    &rec.id,
                    CommandSpec::new(sh(&format!("echo one; echo warn >&2; {gate}; echo two"))),
                )
                .await
                .ctx("spawn")?;
            let mut follow = run.follow(ReadFrom::START).await.ctx("follow")?;
            let mut saw_one_while_running = false;
            let mut types = Vec::new();
            let mut seqs = Vec::new();
            while let Some(entry) = follow.next().await {
                let entry = entry.ctx("follow item")?;
                let chunk = entry.chunk().ctx("decode")?;
                if chunk.kind == ChunkType::Stdout
                    && chunk.text().is_some_and(|t| t.contains("one"))
                    && !saw_one_while_running
                {
                    let p = service.process(&run.process_id()).await.ctx("process")?;
                    saw_one_while_running = p.status == ProcessStatus::Running;
                    if gated {
                        service
                            .write_files(&rec.id, vec![FileWrite::new(".suite-go", "go")])
                            .await
                            .ctx("write the gate file")?;
                    }
                }
                types.push(chunk.kind);
                seqs.push(chunk.seq);
            }
            let outcome = run.wait().await.ctx("wait")?;
            ensure!(
                outcome.status == ProcessStatus::Exited && outcome.exit_code == Some(0),
                "outcome {outcome:?}"
            );
            ensure!(
                types.first() == Some(&ChunkType::Status),
                "first chunk {:?}",
                types.first()
            );
            ensure!(
                types.last() == Some(&ChunkType::Exit),
                "last chunk {:?}",
                types.last()
            );
            ensure!(
                types.iter().filter(|t| **t == ChunkType::Exit).count() == 1,
                "exit chunks: {types:?}"
            );
            ensure!(
                seqs == (1..=seqs.len() as u64).collect::<Vec<_>>(),
                "seqs {seqs:?}"
            );
            if caps.exec_stream {
                ensure!(
                    saw_one_while_running,
                    "output appeared in the log only after the command ended"
                );
            }
            let (_, t) = run.output().await.ctx("output")?;
            ensure!(
                t.stdout == b"one\ntwo\n",
                "stdout {:?}",
                String::from_utf8_lossy(&t.stdout)
            );
            ensure!(
                t.stderr == b"warn\n",
                "stderr {:?}",
                String::from_utf8_lossy(&t.stderr)
            );
            let p = service.process(&run.process_id()).await.ctx("process")?;
            ensure!(
                p.status == ProcessStatus::Exited && p.exit_code == Some(0),
                "record {p:?}"
            );
            ensure!(
                p.stream_client_id.as_deref() == Some(&run.stream_client_id()[..]),
                "stream client id"
            );

            let failed = service
                .spawn(&rec.id, CommandSpec::new(sh("exit 3")))
                .await
                .ctx("spawn failing")?
                .wait()
                .await
                .ctx("wait failing")?;
            ensure!(
                failed.status == ProcessStatus::Failed && failed.exit_code == Some(3),
                "failing run {failed:?}"
            );

            let stopped = service
                .stop(&rec.id, StopMode::Delete)
                .await
                .ctx("service stop")?;
            ensure!(
                stopped.status == SandboxStatus::Shutdown,
                "after stop: {}",
                stopped.status
            );
            match service.run_command(&rec.id, sh("true")).await {
                Err(e) => ensure!(
                    e.code() == "sandbox_not_active:shutdown",
                    "exec after stop gave {}",
                    e.code()
                ),
                Ok(_) => return Err("exec after stop ran".into()),
            }
            Ok(Outcome::Passed)
        },
    )
    .await;
}
