//! Records on the wire: upstream's attribute names and types, links, partial updates, NUL
//! stripping, records written the TypeScript way, and failures that become typed errors.

#[path = "support/common.rs"]
mod common;

use std::time::Duration;

use sandbox_core::{
    ChunkType, ChunkWriter, ProcessId, ProcessPatch, ProcessStatus, RetryPolicy, SandboxId,
    SandboxPatch, SandboxStatus,
};
use sandbox_instant::schema;
use sandbox_testkit::instant::InstantEmulator;
use sandbox_testkit::store::{full_process, full_sandbox};
use serde_json::{json, Value};

fn assert_in_schema(emu: &InstantEmulator, ns: &str, id: &str) -> usize {
    let ent = schema::entity(ns).unwrap();
    let attrs = emu
        .entity(ns, id)
        .unwrap_or_else(|| panic!("{ns} {id} stored"));
    for (name, value) in &attrs {
        let def = ent
            .attr(name)
            .unwrap_or_else(|| panic!("{ns}.{name} is not in upstream's schema"));
        assert!(
            def.value_type.admits(value),
            "{ns}.{name} = {value} is not a {}",
            def.value_type.as_str()
        );
        let json_def = &schema::schema_json()["entities"][ns]["attrs"][name];
        assert_eq!(
            json_def["valueType"],
            def.value_type.as_str(),
            "schema JSON agrees on {name}"
        );
    }
    for def in ent.attrs.iter().filter(|a| a.required) {
        assert!(
            attrs.contains_key(def.name),
            "required {ns}.{} is written",
            def.name
        );
    }
    attrs.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attribute_written_is_in_upstreams_schema_with_its_type_and_records_round_trip() {
    let emu = common::emulator().await;
    let store = common::backend(&emu).records;
    let sandbox = full_sandbox("local", 1_700_000_000_000);
    store.insert_sandbox(&sandbox).await.unwrap();
    let mut process = full_process(&sandbox, 1_700_000_000_100);
    process.exit_code = Some(3);
    process.signal = Some("SIGTERM".into());
    process.stream_finished_at = Some(1_700_000_000_200);
    process.stream_abort_reason = Some("boom".into());
    process.exited_at = Some(1_700_000_000_300);
    let mut shut = sandbox.clone();
    shut.shutdown_at = Some(1_700_000_000_400);
    store.insert_process(&process).await.unwrap();
    store
        .patch_sandbox(
            &sandbox.id,
            &SandboxPatch {
                shutdown_at: shut.shutdown_at,
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let n = assert_in_schema(&emu, "sandbox_sandboxes", &sandbox.id.to_string());
    assert_eq!(
        n, 14,
        "every sandbox attribute but the never-written providerConfig"
    );
    let n = assert_in_schema(&emu, "sandbox_processes", &process.id.to_string());
    assert_eq!(n, 20, "every process attribute");

    assert_eq!(store.get_sandbox(&sandbox.id).await.unwrap(), Some(shut));
    assert_eq!(store.get_process(&process.id).await.unwrap(), Some(process));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_and_its_links_are_created_in_one_transact() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    let sandbox = full_sandbox("local", 1);
    b.records.insert_sandbox(&sandbox).await.unwrap();
    let pid = ProcessId::new();
    let w = ChunkWriter::open(b.logs.as_ref(), sandbox.id, pid)
        .await
        .unwrap();
    let mut p = full_process(&sandbox, 2);
    p.id = pid;
    p.stream_id = Some(w.stream_id().to_string());
    p.stream_client_id = Some(pid.stream_client_id());
    emu.clear_requests();
    b.records.insert_process(&p).await.unwrap();
    let reqs = emu.requests();
    assert_eq!(reqs.len(), 1, "one request: {reqs:?}");
    assert_eq!(reqs[0].path, "/admin/transact");
    assert_eq!(reqs[0].ops, ["create", "link"]);

    let tree = emu.query_direct(json!({"sandbox_processes": {
        "$": {"where": {"id": pid.to_string()}}, "sandbox": {}, "stream": {}}}));
    let row = &tree["sandbox_processes"][0];
    assert_eq!(row["sandbox"][0]["id"], sandbox.id.to_string());
    assert_eq!(row["stream"][0]["id"], w.stream_id());
    assert_eq!(row["stream"][0]["clientId"], pid.stream_client_id());
    assert!(
        row.get("sandboxId").is_none(),
        "sandboxId is the link, not an attribute"
    );
    let back = emu.query_direct(json!({"sandbox_sandboxes": {"$": {"where": {"id": sandbox.id.to_string()}}, "processes": {}}}));
    assert_eq!(
        back["sandbox_sandboxes"][0]["processes"][0]["id"],
        pid.to_string()
    );
    w.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_are_update_steps_with_only_the_changed_attributes() {
    let emu = common::emulator().await;
    let store = common::backend(&emu).records;
    let sandbox = full_sandbox("local", 1);
    store.insert_sandbox(&sandbox).await.unwrap();
    let p = full_process(&sandbox, 2);
    store.insert_process(&p).await.unwrap();
    emu.clear_requests();
    let patch = ProcessPatch {
        status: Some(ProcessStatus::Exited),
        exit_code: Some(0),
        ..Default::default()
    };
    store.patch_process(&p.id, &patch).await.unwrap();
    let reqs = emu.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].body["steps"],
        json!([["update", "sandbox_processes", p.id.to_string(), {"status": "exited", "exitCode": 0}, {"upsert": false}]])
    );
    let e = store
        .patch_process(&ProcessId::new(), &patch)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "sandbox_process_not_found");
    let e = store
        .patch_sandbox(
            &SandboxId::new(),
            &SandboxPatch {
                status: Some(SandboxStatus::Shutdown),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "sandbox_not_found");
    assert!(
        emu.query_direct(json!({"sandbox_sandboxes": {}}))["sandbox_sandboxes"]
            .as_array()
            .unwrap()
            .len()
            == 1,
        "a patch of an unknown id creates nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_is_stripped_from_every_string_written() {
    let emu = common::emulator().await;
    let store = common::backend(&emu).records;
    let sandbox = full_sandbox("local", 1);
    store.insert_sandbox(&sandbox).await.unwrap();
    let mut p = full_process(&sandbox, 2);
    p.command = "ec\0ho".into();
    p.args = Some(vec!["a\0b".into()]);
    p.metadata = Some(json!({"k\0": ["v\0"]}));
    store.insert_process(&p).await.unwrap();
    let got = store.get_process(&p.id).await.unwrap().unwrap();
    assert_eq!(got.command, "echo");
    assert_eq!(got.args, Some(vec!["ab".to_string()]));
    assert_eq!(got.metadata, Some(json!({"k": ["v"]})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_logs_written_the_typescript_way_are_read() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    let (sid, pid) = (SandboxId::new(), ProcessId::new());
    // What upstream's createSandbox / runCommandProcess transact: update (upsert) steps,
    // nulls for unset values, attributes this crate never writes.
    let http = reqwest::Client::new();
    let steps = json!([
        ["update", "sandbox_sandboxes", sid.to_string(), {"status": "active", "provider": "sprites",
            "createdAt": 10, "updatedAt": 11, "providerConfig": {"x": 1}, "params": {"sprites": {"name": "s"}},
            "sandboxUrl": null}],
        ["update", "sandbox_processes", pid.to_string(), {"kind": "command", "mode": "foreground",
            "status": "exited", "provider": "sprites", "command": "ls", "args": ["-la"], "cwd": null,
            "env": {"A": "1"}, "exitCode": 0, "streamClientId": pid.stream_client_id(),
            "streamAbortReason": null, "startedAt": 12, "metadata": {"lastSeq": 2}}],
        ["link", "sandbox_processes", pid.to_string(), {"sandbox": sid.to_string()}],
    ]);
    let r = http
        .post(format!(
            "{}/admin/transact?app_id={}",
            emu.base_url(),
            common::APP_ID
        ))
        .header("app-id", common::APP_ID)
        .bearer_auth(common::TOKEN)
        .json(&json!({"steps": steps}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s = b.records.get_sandbox(&sid).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.provider.as_str(), s.sandbox_url),
        (SandboxStatus::Active, "sprites", None)
    );
    let p = b.records.get_process(&pid).await.unwrap().unwrap();
    assert_eq!(
        (p.sandbox_id, p.exit_code, p.cwd.clone()),
        (sid, Some(0), None)
    );
    let listed = b
        .records
        .list_processes(&sandbox_core::ProcessFilter {
            sandbox_id: Some(sid),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed, vec![p]);

    // And our log is the upstream NDJSON.
    let pid2 = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), sid, pid2).await.unwrap();
    w.append(
        ChunkType::Stdout,
        json!({"text": "hi\n"}).as_object().cloned(),
    )
    .await
    .unwrap();
    w.close().await.unwrap();
    let raw = String::from_utf8(emu.stream_content(&pid2.stream_client_id()).unwrap()).unwrap();
    let v: Value = serde_json::from_str(raw.trim_end()).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["type"], "stdout");
    assert_eq!(v["processId"], pid2.to_string());
    assert_eq!(v["data"]["text"], "hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_responses_become_typed_errors() {
    let emu = common::emulator().await;
    let mut cfg = common::config(&emu);
    cfg.retry = RetryPolicy::none();
    let store = sandbox_instant::backend(cfg).unwrap().records;
    let id = SandboxId::new();

    emu.fail_next(1, 500);
    let e = store.get_sandbox(&id).await.unwrap_err();
    assert_eq!(e.code(), "transient");
    assert!(
        e.is_retryable() && e.to_string().contains("HTTP 500"),
        "{e}"
    );

    emu.respond_raw_next(200, "<html>proxy</html>");
    let e = store.get_sandbox(&id).await.unwrap_err();
    assert_eq!(e.code(), "instant_response_invalid");

    emu.respond_raw_next(502, "Bad Gateway");
    let e = store.get_sandbox(&id).await.unwrap_err();
    assert!(e.to_string().contains("Bad Gateway"), "{e}");

    emu.respond_raw_next(400, "nope");
    let e = store.get_sandbox(&id).await.unwrap_err();
    assert_eq!(e.code(), "store_error");
    assert!(!e.is_retryable());

    emu.rate_limit_next(1, Duration::from_secs(7));
    let e = store.get_sandbox(&id).await.unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));

    let wrong = "0f0f0f0f-dead-4bee-8f00-000000000000";
    let bad = sandbox_instant::backend(
        sandbox_instant::InstantConfig::new(common::APP_ID, wrong, &emu.base_url()).unwrap(),
    )
    .unwrap();
    let e = bad.records.get_sandbox(&id).await.unwrap_err();
    assert_eq!(e.code(), "unauthorized");
    assert!(
        !format!("{e} {e:?}").contains(wrong),
        "the token never appears in an error"
    );
    let e = bad.logs.open_writer(&ProcessId::new()).await.err().unwrap();
    assert_eq!(e.code(), "unauthorized");
    assert!(!format!("{e} {e:?}").contains(wrong));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_and_rate_limits_are_retried() {
    let emu = common::emulator().await;
    let store = common::backend(&emu).records;
    let s = full_sandbox("local", 1);
    emu.fail_next(2, 503);
    store.insert_sandbox(&s).await.unwrap();
    emu.rate_limit_next(1, Duration::ZERO);
    assert_eq!(store.get_sandbox(&s.id).await.unwrap(), Some(s.clone()));
    let e = store.insert_sandbox(&s).await.unwrap_err();
    assert_eq!(e.code(), "sandbox_exists");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_with_a_limit_breaks_start_time_ties_by_id() {
    let emu = common::emulator().await;
    let store = common::backend(&emu).records;
    let s = full_sandbox("local", 1);
    store.insert_sandbox(&s).await.unwrap();
    let mut ids = Vec::new();
    for t in [5, 3, 3, 3, 1] {
        let p = full_process(&s, t);
        ids.push((t, p.id));
        store.insert_process(&p).await.unwrap();
    }
    ids.sort();
    let got = store
        .list_processes(&sandbox_core::ProcessFilter {
            limit: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let got: Vec<_> = got.iter().map(|p| (p.started_at, p.id)).collect();
    assert_eq!(got, ids[..3].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_delays_every_request_by_the_latency_switched_on() {
    let emu = common::emulator().await;
    let store = common::backend(&emu).records;
    let id = SandboxId::new();
    assert_eq!(store.get_sandbox(&id).await.unwrap(), None);
    let latency = Duration::from_millis(150);
    emu.set_latency(latency);
    for _ in 0..2 {
        let started = std::time::Instant::now();
        assert_eq!(store.get_sandbox(&id).await.unwrap(), None);
        assert!(started.elapsed() >= latency, "{:?}", started.elapsed());
    }
    emu.set_latency(Duration::ZERO);
    assert_eq!(emu.requests().len(), 3, "each request is logged once");
}
