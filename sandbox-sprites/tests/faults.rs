//! Failure behaviour against the emulator's fault switches, and request counts per operation.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sandbox_core::memory::memory_backend;
use sandbox_core::{
    CommandSpec, CreateRequest, Env, Error, ExecEvent, ExecRequest, FileWrite, ProcessStatus,
    Provider, ResumeRequest, RetryPolicy, SandboxConfig, SandboxHandle, SandboxId, SandboxService,
    SandboxStatus, StopMode,
};
use sandbox_sprites::SpritesProvider;
use sandbox_testkit::sprites::SpritesEmulator;

const TOKEN: &str = "fault-test-token";

async fn emulator() -> SpritesEmulator {
    SpritesEmulator::start(TOKEN).await.unwrap()
}

fn provider_with(emu: &SpritesEmulator, token: &str, section: &str) -> SpritesProvider {
    let env = Env::from_pairs([
        ("SPRITES_API_TOKEN", token.to_string()),
        ("SPRITES_API_BASE_URL", emu.base_url()),
    ]);
    let config = SandboxConfig::from_json(&format!(r#"{{"sprites":{section}}}"#)).unwrap();
    // Short backoffs keep the retry tests quick; Retry-After is still honoured in full.
    SpritesProvider::from_config(&config, &env)
        .unwrap()
        .with_retry_policy(RetryPolicy {
            initial_backoff: Duration::from_millis(20),
            ..RetryPolicy::default()
        })
}

fn provider(emu: &SpritesEmulator) -> SpritesProvider {
    provider_with(emu, TOKEN, "{}")
}

async fn create(p: &SpritesProvider) -> sandbox_core::Result<sandbox_core::Provisioned> {
    p.create(&CreateRequest {
        sandbox_id: SandboxId::new(),
        config: SandboxConfig::default(),
    })
    .await
}

fn paths(emu: &SpritesEmulator) -> Vec<String> {
    emu.requests()
        .into_iter()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect()
}

fn service(p: SpritesProvider) -> SandboxService {
    SandboxService::builder()
        .store(memory_backend())
        .provider(Arc::new(p))
        .use_registry(false)
        .bootstrappers(vec![])
        .build()
        .unwrap()
}

fn sprites_config() -> SandboxConfig {
    SandboxConfig::from_json(r#"{"provider":"sprites"}"#).unwrap()
}

#[tokio::test]
async fn a_500_on_create_is_retried_and_makes_one_sprite() {
    let emu = emulator().await;
    emu.fail_next(1, 500);
    let p = provider(&emu);
    let made = create(&p).await.unwrap();
    assert_eq!(emu.sprite_names(), vec![made.external_id.clone()]);
    assert_eq!(paths(&emu), vec!["POST /v1/sprites", "POST /v1/sprites"]);
}

#[tokio::test]
async fn a_500_after_the_sprite_was_made_still_ends_with_one_sprite() {
    let emu = emulator().await;
    emu.fail_next_after_handling(1, 502);
    let p = provider(&emu);
    let made = create(&p).await.unwrap();
    assert_eq!(emu.sprite_names(), vec![made.external_id.clone()]);
    // The retried create finds the name taken and looks the sprite up.
    assert_eq!(
        paths(&emu),
        vec![
            "POST /v1/sprites".to_string(),
            "POST /v1/sprites".to_string(),
            format!("GET /v1/sprites/{}", made.external_id),
        ]
    );
}

#[tokio::test]
async fn a_delete_retried_after_a_late_500_reports_the_sprite_gone() {
    let emu = emulator().await;
    let made = create(&provider(&emu)).await.unwrap();
    emu.fail_next_after_handling(1, 500);
    let e = made.handle.stop(StopMode::Delete).await.unwrap_err();
    // The first DELETE worked; its retry finds nothing, which the service treats as stopped.
    assert!(e.is_not_found(), "{e}");
    assert!(emu.sprite_names().is_empty());
}

#[tokio::test]
async fn a_create_whose_sprite_exists_reuses_it() {
    let emu = emulator().await;
    let p = provider_with(&emu, TOKEN, r#"{"name":"fixed-name"}"#);
    let first = create(&p).await.unwrap();
    emu.clear_requests();
    let second = create(&p).await.unwrap();
    assert_eq!(first.external_id, "fixed-name");
    assert_eq!(second.external_id, "fixed-name");
    assert_eq!(emu.sprite_names(), vec!["fixed-name".to_string()]);
    assert_eq!(
        paths(&emu),
        vec!["POST /v1/sprites", "GET /v1/sprites/fixed-name"]
    );
}

#[tokio::test]
async fn a_taken_name_answered_with_400_already_exists_is_reused_too() {
    let emu = emulator().await;
    emu.answer_taken_names_with(400);
    let p = provider_with(&emu, TOKEN, r#"{"name":"fixed-name"}"#);
    create(&p).await.unwrap();
    emu.clear_requests();
    let again = create(&p).await.unwrap();
    assert_eq!(again.external_id, "fixed-name");
    assert_eq!(
        paths(&emu),
        vec!["POST /v1/sprites", "GET /v1/sprites/fixed-name"]
    );
}

#[tokio::test]
async fn the_create_requests_own_section_applies() {
    let emu = emulator().await;
    let p = provider(&emu);
    let made = p
        .create(&CreateRequest {
            sandbox_id: SandboxId::new(),
            config: SandboxConfig::from_json(
                r#"{"sprites":{"name":"from-request","urlSettings":{"auth":"public"},"deleteOnStop":false}}"#,
            )
            .unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(made.external_id, "from-request");
    assert_eq!(made.params["urlSettings"]["auth"], "public");
    assert_eq!(made.params["deleteOnStop"], false);
    assert!(
        !made.params.to_string().contains(TOKEN),
        "params hold no secret"
    );
}

#[tokio::test]
async fn bad_exec_input_is_rejected_before_any_request() {
    let emu = emulator().await;
    let sb = create(&provider(&emu)).await.unwrap().handle;
    emu.clear_requests();
    let e = sb
        .exec(ExecRequest::new(["env"]).env("BAD-KEY", "v"))
        .await
        .expect_err("invalid env key");
    assert_eq!(e.code(), "sandbox_env_key_invalid:BAD-KEY");
    let e = sb.exec(ExecRequest::default()).await.expect_err("no argv");
    assert_eq!(e.code(), "sandbox_command_required");
    assert_eq!(emu.request_count(), 0);
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out() {
    let emu = emulator().await;
    emu.rate_limit_next(1, Duration::from_millis(1200));
    let p = provider(&emu);
    create(&p).await.unwrap();
    let log = emu.requests();
    assert_eq!(log.len(), 2, "{:?}", paths(&emu));
    let gap = log[1].2.duration_since(log[0].2);
    assert!(gap >= Duration::from_millis(1200), "retried after {gap:?}");
    assert_eq!(emu.sprite_names().len(), 1);
}

#[tokio::test]
async fn a_429_without_retries_is_rate_limited_with_the_servers_wait() {
    let emu = emulator().await;
    emu.rate_limit_next(1, Duration::from_secs(7));
    let p = provider(&emu).with_retry_policy(RetryPolicy::none());
    let e = create(&p).await.unwrap_err();
    assert!(matches!(e, Error::RateLimited { .. }), "{e:?}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    assert!(emu.sprite_names().is_empty());
}

#[tokio::test]
async fn persistent_5xx_ends_as_a_transient_error_after_the_policy_gives_up() {
    let emu = emulator().await;
    emu.fail_next(10, 503);
    let p = provider(&emu);
    let e = create(&p).await.unwrap_err();
    assert!(matches!(e, Error::Transient { .. }), "{e:?}");
    assert_eq!(
        emu.request_count(),
        RetryPolicy::default().max_attempts as usize
    );
}

#[tokio::test]
async fn an_invalid_token_is_unauthorized_and_never_echoed() {
    let emu = emulator().await;
    let p = provider_with(&emu, "wrong-secret-token", "{}");
    let e = create(&p).await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    assert!(!e.to_string().contains("wrong-secret-token"), "{e}");
    assert!(!format!("{e:?}").contains("wrong-secret-token"));
    assert!(!format!("{p:?}").contains("wrong-secret-token"));
    assert_eq!(emu.request_count(), 1, "unauthorized is not retried");
}

#[tokio::test]
async fn malformed_json_is_a_provider_error() {
    let emu = emulator().await;
    let p = provider(&emu);
    let made = create(&p).await.unwrap();
    emu.corrupt_next_json(1);
    let e = p
        .resume(&ResumeRequest {
            sandbox_id: SandboxId::new(),
            external_id: made.external_id.clone(),
            url: None,
            params: made.params.clone(),
        })
        .await
        .err()
        .expect("a malformed sprite body must not resume");
    assert!(matches!(e, Error::Provider { .. }), "{e:?}");
    assert!(e.to_string().contains("malformed"), "{e}");
}

#[tokio::test]
async fn a_malformed_create_answer_reads_the_made_sprite_back_instead_of_leaking_it() {
    let emu = emulator().await;
    let p = provider(&emu);
    emu.corrupt_next_json(1);
    let made = create(&p).await.unwrap();
    assert_eq!(emu.sprite_names(), vec![made.external_id.clone()]);
    assert_eq!(
        paths(&emu),
        vec![
            "POST /v1/sprites".to_string(),
            format!("GET /v1/sprites/{}", made.external_id),
        ]
    );
    // When the read is malformed too, the create fails as a provider error.
    emu.corrupt_next_json(2);
    let e = create(&p).await.unwrap_err();
    assert!(matches!(e, Error::Provider { .. }), "{e:?}");
    assert!(e.to_string().contains("malformed"), "{e}");
}

#[tokio::test]
async fn a_truncated_exit_frame_is_a_provider_error_not_an_exit() {
    let emu = emulator().await;
    let p = provider(&emu);
    let sb = create(&p).await.unwrap().handle;
    emu.truncate_next_exec();
    let mut exec = sb.exec(ExecRequest::new(["echo", "hi"])).await.unwrap();
    let mut out = Vec::new();
    let mut failure = None;
    while let Some(ev) = exec.events.next().await {
        match ev {
            Ok(ExecEvent::Stdout(b)) => out.extend_from_slice(&b),
            Ok(ExecEvent::Exit(e)) => panic!("a truncated frame became an exit: {e:?}"),
            Ok(_) => {}
            Err(e) => failure = Some(e),
        }
    }
    assert_eq!(out, b"hi\n");
    let e = failure.expect("the stream must end with an error");
    assert!(matches!(e, Error::Provider { .. }), "{e:?}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[tokio::test]
async fn a_connection_dropped_mid_exec_is_an_error_never_exit_zero() {
    let emu = emulator().await;
    let p = provider(&emu);
    let sb = create(&p).await.unwrap().handle;
    emu.drop_next_exec();
    let mut exec = sb
        .exec(ExecRequest::shell("echo one; sleep 5; echo two"))
        .await
        .unwrap();
    let mut events = Vec::new();
    let mut failure = None;
    while let Some(ev) = exec.events.next().await {
        match ev {
            Ok(ev) => events.push(ev),
            Err(e) => failure = Some(e),
        }
    }
    assert!(
        !events.iter().any(|e| matches!(e, ExecEvent::Exit(_))),
        "{events:?}"
    );
    let e = failure.expect("a dropped connection must surface as an error");
    assert!(e.is_retryable(), "connection loss is transient: {e:?}");
}

#[tokio::test]
async fn a_recorded_process_whose_connection_drops_ends_failed() {
    let emu = emulator().await;
    let svc = service(provider(&emu));
    let rec = svc.create(&sprites_config()).await.unwrap();
    emu.drop_next_exec();
    let run = svc
        .spawn(
            &rec.id,
            CommandSpec::new(ExecRequest::shell("echo one; sleep 5; echo two")),
        )
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), run.wait())
        .await
        .expect("the run ends once its connection drops")
        .unwrap();
    assert_eq!(outcome.status, ProcessStatus::Failed, "{outcome:?}");
    assert_eq!(outcome.exit_code, None);
    let record = svc.process(&run.process_id()).await.unwrap();
    assert_eq!(record.status, ProcessStatus::Failed);
    assert_eq!(record.exit_code, None);
    let (_, transcript) = run.output().await.unwrap();
    assert_eq!(transcript.stdout, b"one\n");
}

#[tokio::test]
async fn an_error_event_in_a_200_checkpoint_stream_is_an_error() {
    let emu = emulator().await;
    let p = provider(&emu);
    let sb = create(&p).await.unwrap().handle;
    emu.fail_next_checkpoint("Checkpoint failed: disk full");
    let e = sb.checkpoint(None).await.unwrap_err();
    assert!(e.to_string().contains("disk full"), "{e}");
    assert!(sb.list_checkpoints().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_checkpoint_id_missing_from_the_messages_is_taken_from_the_list() {
    let emu = emulator().await;
    let p = provider(&emu);
    let sb = create(&p).await.unwrap().handle;
    emu.hide_checkpoint_ids(true);
    emu.clear_requests();
    let cp = sb.checkpoint(Some("first".into())).await.unwrap();
    assert_eq!(cp.id, "v1");
    assert_eq!(cp.comment.as_deref(), Some("first"));
    let name = sb_name(&emu);
    assert_eq!(
        paths(&emu),
        vec![
            format!("POST /v1/sprites/{name}/checkpoint"),
            format!("GET /v1/sprites/{name}/checkpoints"),
        ]
    );
}

#[tokio::test]
async fn restoring_an_unknown_checkpoint_is_checkpoint_not_found() {
    let emu = emulator().await;
    let sb = create(&provider(&emu)).await.unwrap().handle;
    let e = sb.restore("v42").await.unwrap_err();
    assert_eq!(e.code(), "checkpoint_not_found", "{e}");
}

#[tokio::test]
async fn reading_from_a_deleted_sprite_is_not_found_rather_than_a_missing_file() {
    let emu = emulator().await;
    let sb = create(&provider(&emu)).await.unwrap().handle;
    sb.stop(StopMode::Delete).await.unwrap();
    let e = sb.read_file("/home/sprite/x").await.unwrap_err();
    assert_eq!(e.code(), "sandbox_not_found", "{e}");
    let e = sb.stop(StopMode::Delete).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn stop_keep_kills_running_commands_and_keeps_the_sprite() {
    let emu = emulator().await;
    let p = provider_with(&emu, TOKEN, r#"{"deleteOnStop":false}"#);
    let made = create(&p).await.unwrap();
    let name = made.external_id.clone();
    assert_eq!(made.params["deleteOnStop"], false);
    let mut exec = made
        .handle
        .exec(ExecRequest::shell("echo ready; sleep 30"))
        .await
        .unwrap();
    assert!(matches!(
        exec.events.next().await,
        Some(Ok(ExecEvent::Stdout(_)))
    ));
    made.handle.stop(StopMode::Default).await.unwrap();
    assert_eq!(
        emu.sprite_names(),
        vec![name.clone()],
        "deleteOnStop=false keeps it"
    );
    let rest: Vec<_> =
        tokio::time::timeout(Duration::from_secs(10), exec.events.collect::<Vec<_>>())
            .await
            .expect("the killed command's stream ends");
    assert!(
        rest.iter()
            .any(|e| matches!(e, Ok(ExecEvent::Exit(s)) if !s.success())),
        "{rest:?}"
    );
    assert_eq!(emu.running_commands(&name), 0);
}

#[tokio::test]
async fn a_missing_program_fails_to_start() {
    let emu = emulator().await;
    let sb = create(&provider(&emu)).await.unwrap().handle;
    let e = sb
        .exec(ExecRequest::new(["definitely-not-a-program-8c1d"]))
        .await
        .expect_err("must not start");
    assert_eq!(e.code(), "command_failed_to_start", "{e}");
}

#[tokio::test]
async fn resume_costs_one_read_and_wakes_nothing() {
    let emu = emulator().await;
    let p = provider(&emu);
    let made = create(&p).await.unwrap();
    emu.clear_requests();
    let again = p
        .resume(&ResumeRequest {
            sandbox_id: SandboxId::new(),
            external_id: made.external_id.clone(),
            url: made.url.clone(),
            params: made.params.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        paths(&emu),
        vec![format!("GET /v1/sprites/{}", made.external_id)]
    );
    assert_eq!(again.workspace(), "/home/sprite");
    let e = p
        .resume(&ResumeRequest {
            sandbox_id: SandboxId::new(),
            external_id: "no-such-sprite".into(),
            url: None,
            params: serde_json::Value::Null,
        })
        .await
        .err()
        .unwrap();
    assert!(e.is_not_found(), "{e}");
}

/// Request counts on a warm service: the targets of the issue.
#[tokio::test]
async fn warm_operations_cost_the_fewest_round_trips() {
    let emu = emulator().await;
    let svc = service(provider(&emu));
    let count = |before: usize| emu.request_count() - before;

    let before = emu.request_count();
    let rec = svc.create(&sprites_config()).await.unwrap();
    assert_eq!(rec.status, SandboxStatus::Active);
    assert_eq!(count(before), 1, "create: {:?}", paths(&emu));

    let before = emu.request_count();
    let out = svc
        .run_command(&rec.id, ExecRequest::new(["echo", "hi"]))
        .await
        .unwrap();
    assert_eq!(out.stdout.as_ref(), b"hi\n");
    assert_eq!(count(before), 1, "run_command");

    let before = emu.request_count();
    let run = svc
        .spawn(&rec.id, CommandSpec::new(ExecRequest::new(["true"])))
        .await
        .unwrap();
    assert_eq!(run.wait().await.unwrap().status, ProcessStatus::Exited);
    assert_eq!(count(before), 1, "recorded run");

    let before = emu.request_count();
    svc.write_files(
        &rec.id,
        vec![
            FileWrite::new("a.txt", "a"),
            FileWrite::new("d/b.txt", "b"),
            FileWrite::new("d/e/c.bin", vec![0u8, 255]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(count(before), 3, "write_files of 3");

    let before = emu.request_count();
    let back = svc.read_file(&rec.id, "d/e/c.bin").await.unwrap();
    assert_eq!(back.as_deref(), Some(&[0u8, 255][..]));
    assert_eq!(count(before), 1, "read_file");

    let before = emu.request_count();
    svc.stop(&rec.id, StopMode::Default).await.unwrap();
    assert_eq!(count(before), 1, "stop: {:?}", paths(&emu));
    assert!(emu.sprite_names().is_empty());
}

/// The only sprite of the emulator.
fn sb_name(emu: &SpritesEmulator) -> String {
    let names = emu.sprite_names();
    assert_eq!(names.len(), 1, "{names:?}");
    names[0].clone()
}

#[tokio::test]
async fn exec_passes_env_and_cwd_natively_and_files_written_by_commands_are_readable() {
    let emu = emulator().await;
    let sb: Arc<dyn SandboxHandle> = create(&provider(&emu)).await.unwrap().handle;
    sb.write_files(vec![FileWrite::new("/home/sprite/w/.keep", "")])
        .await
        .unwrap();
    let mut exec = sb
        .exec(
            ExecRequest::new(["sh", "-c", "printf '%s' \"$GREETING\" > out.txt; echo done"])
                .cwd("/home/sprite/w")
                .env("GREETING", "it's $HOME; rm -rf /"),
        )
        .await
        .unwrap();
    let mut exit = None;
    while let Some(ev) = exec.events.next().await {
        if let ExecEvent::Exit(e) = ev.unwrap() {
            exit = Some(e);
        }
    }
    assert!(exit.unwrap().success());
    let back = sb.read_file("/home/sprite/w/out.txt").await.unwrap();
    assert_eq!(back.as_deref(), Some(&b"it's $HOME; rm -rf /"[..]));
}

#[tokio::test]
async fn create_sends_wait_for_capacity_and_url_auth_in_snake_case() {
    let emu = emulator().await;
    let made = create(&provider(&emu)).await.unwrap();
    let body = emu.create_body(&made.external_id).unwrap();
    assert_eq!(body["name"], made.external_id.as_str());
    assert_eq!(body["wait_for_capacity"], true);
    assert_eq!(body["url_settings"]["auth"], "sprite", "private by default");

    let p = provider_with(
        &emu,
        TOKEN,
        r#"{"name":"configured","waitForCapacity":false,"urlSettings":{"auth":"public"}}"#,
    );
    create(&p).await.unwrap();
    let body = emu.create_body("configured").unwrap();
    assert_eq!(body["wait_for_capacity"], false);
    assert_eq!(body["url_settings"]["auth"], "public");
}

#[tokio::test]
async fn the_emulator_adds_its_latency_to_every_request() {
    let emu = emulator().await;
    let p = provider(&emu);
    let made = create(&p).await.unwrap();
    emu.set_latency(Duration::from_millis(150));
    emu.clear_requests();
    let start = std::time::Instant::now();
    let resume = ResumeRequest {
        sandbox_id: SandboxId::new(),
        external_id: made.external_id.clone(),
        url: made.url.clone(),
        params: made.params.clone(),
    };
    p.resume(&resume).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
    emu.set_latency(Duration::ZERO);
    p.resume(&resume).await.unwrap();
    let log = emu.requests();
    assert_eq!(log.len(), 2, "{:?}", paths(&emu));
    assert!(
        log[0].2 >= start && log[1].2 >= log[0].2,
        "arrival times in order"
    );
}

#[tokio::test]
async fn a_path_written_twice_in_one_call_keeps_its_last_content() {
    let emu = emulator().await;
    let sb = create(&provider(&emu)).await.unwrap().handle;
    emu.clear_requests();
    sb.write_files(vec![
        FileWrite::new("/home/sprite/same.txt", "first"),
        FileWrite::new("/home/sprite/other.txt", "other"),
        FileWrite::new("/home/sprite/same.txt", "second"),
    ])
    .await
    .unwrap();
    // Concurrent writes of one path would race: it is written once.
    assert_eq!(emu.request_count(), 2, "{:?}", paths(&emu));
    let back = sb.read_file("/home/sprite/same.txt").await.unwrap();
    assert_eq!(back.as_deref(), Some(&b"second"[..]));
}
