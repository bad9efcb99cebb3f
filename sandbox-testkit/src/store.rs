//! Conformance suite for [`RecordStore`] implementations.
//!
//! Every check uses fresh ids and a provider name unique to the run, so the suite can run
//! against a store that already holds other records.

use std::sync::Arc;
use std::time::Duration;

use sandbox_core::{
    Error, ProcessFilter, ProcessId, ProcessKind, ProcessMode, ProcessPatch, ProcessRecord,
    ProcessStatus, RecordStore, SandboxFilter, SandboxId, SandboxPatch, SandboxRecord,
    SandboxStatus,
};
use serde_json::json;

use crate::report::{ensure, Context, Outcome, SuiteReport};

const LIMIT: Duration = Duration::from_secs(30);

/// A sandbox record with every attribute set.
pub fn full_sandbox(provider: &str, created_at: i64) -> SandboxRecord {
    let id = SandboxId::new();
    SandboxRecord {
        id,
        status: SandboxStatus::Active,
        provider: provider.to_string(),
        external_sandbox_id: Some(format!("{provider}:{id}")),
        sandbox_url: Some("https://example.test/s".into()),
        timeout: Some(300_000),
        runtime: Some("node22".into()),
        vcpus: Some(2),
        ports: Some(vec![3000, 8080]),
        purpose: Some("conformance".into()),
        params: Some(
            json!({"a": 1, "nested": {"list": [1, "two", null], "t": true}, provider: {"name": "x"}}),
        ),
        created_at,
        updated_at: Some(created_at + 1),
        shutdown_at: None,
        sandbox_user_id: Some("0c8a5f8e-0000-4000-8000-000000000001".into()),
    }
}

/// A process record with every attribute set.
pub fn full_process(sandbox: &SandboxRecord, started_at: i64) -> ProcessRecord {
    let id = ProcessId::new();
    ProcessRecord {
        id,
        sandbox_id: sandbox.id,
        kind: ProcessKind::DevServer,
        mode: ProcessMode::Background,
        status: ProcessStatus::Running,
        provider: sandbox.provider.clone(),
        command: "node".into(),
        args: Some(vec![
            "server.js".into(),
            "--port".into(),
            "3000".into(),
            "é €".into(),
        ]),
        cwd: Some("/workspace/app".into()),
        env: Some(json!({"PORT": "[redacted]"})),
        exit_code: None,
        signal: None,
        external_process_id: Some("ext-1".into()),
        stream_id: Some(id.stream_client_id()),
        stream_client_id: Some(id.stream_client_id()),
        stream_started_at: Some(started_at),
        stream_finished_at: None,
        stream_abort_reason: None,
        started_at,
        updated_at: Some(started_at),
        exited_at: None,
        metadata: Some(json!({"source": "suite", "n": 1.5, "deep": {"x": [true]}})),
    }
}

fn unique_provider() -> String {
    format!("suite-{}", &SandboxId::new().to_string()[..8])
}

/// Runs every store check against `records`.
pub async fn run_store_suite(records: Arc<dyn RecordStore>) -> SuiteReport {
    let mut r = SuiteReport::new(format!("store {}", records.name()));
    let s = &records;

    r.check("sandbox_round_trips_unchanged", LIMIT, async {
        let rec = full_sandbox(&unique_provider(), 1_700_000_000_000);
        s.insert_sandbox(&rec).await.ctx("insert")?;
        let back = s
            .get_sandbox(&rec.id)
            .await
            .ctx("get")?
            .ok_or("inserted sandbox not found")?;
        ensure!(
            back == rec,
            "round trip changed the record:\n in:  {rec:?}\n out: {back:?}"
        );
        let mut minimal = full_sandbox(&unique_provider(), 5);
        minimal.external_sandbox_id = None;
        minimal.sandbox_url = None;
        minimal.timeout = None;
        minimal.runtime = None;
        minimal.vcpus = None;
        minimal.ports = None;
        minimal.purpose = None;
        minimal.params = None;
        minimal.updated_at = None;
        minimal.sandbox_user_id = None;
        s.insert_sandbox(&minimal).await.ctx("insert minimal")?;
        let back = s
            .get_sandbox(&minimal.id)
            .await
            .ctx("get")?
            .ok_or("minimal not found")?;
        ensure!(
            back == minimal,
            "minimal record changed:\n in:  {minimal:?}\n out: {back:?}"
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("missing_sandbox_is_none", LIMIT, async {
        ensure!(
            s.get_sandbox(&SandboxId::new()).await.ctx("get")?.is_none(),
            "unknown id found"
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check(
        "duplicate_sandbox_insert_is_conflict_and_changes_nothing",
        LIMIT,
        async {
            let rec = full_sandbox(&unique_provider(), 10);
            s.insert_sandbox(&rec).await.ctx("insert")?;
            let mut again = rec.clone();
            again.purpose = Some("other".into());
            match s.insert_sandbox(&again).await {
                Err(Error::Conflict { .. }) => {}
                other => {
                    return Err(format!(
                        "duplicate insert gave {other:?}, expected Conflict"
                    ))
                }
            }
            let back = s.get_sandbox(&rec.id).await.ctx("get")?.ok_or("lost")?;
            ensure!(back == rec, "duplicate insert changed the record");
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check(
        "sandbox_patch_changes_only_given_attributes",
        LIMIT,
        async {
            let rec = full_sandbox(&unique_provider(), 20);
            s.insert_sandbox(&rec).await.ctx("insert")?;
            let patch = SandboxPatch {
                status: Some(SandboxStatus::Shutdown),
                shutdown_at: Some(99),
                params: Some(json!({"replaced": true})),
                ..Default::default()
            };
            s.patch_sandbox(&rec.id, &patch).await.ctx("patch")?;
            let mut expected = rec.clone();
            expected.apply(&patch);
            let back = s.get_sandbox(&rec.id).await.ctx("get")?.ok_or("lost")?;
            ensure!(
                back == expected,
                "after patch:\n want {expected:?}\n got  {back:?}"
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check("patch_of_unknown_sandbox_is_not_found", LIMIT, async {
        match s
            .patch_sandbox(
                &SandboxId::new(),
                &SandboxPatch {
                    updated_at: Some(1),
                    ..Default::default()
                },
            )
            .await
        {
            Err(e) if e.is_not_found() => Ok(Outcome::Passed),
            other => Err(format!("gave {other:?}")),
        }
    })
    .await;

    r.check(
        "list_filters_by_status_and_provider_in_created_order",
        LIMIT,
        async {
            let p = unique_provider();
            let mut a = full_sandbox(&p, 300);
            let b = full_sandbox(&p, 100);
            let c = full_sandbox(&p, 200);
            a.status = SandboxStatus::Error;
            for rec in [&a, &b, &c] {
                s.insert_sandbox(rec).await.ctx("insert")?;
            }
            let all = s
                .list_sandboxes(&SandboxFilter {
                    provider: Some(p.clone()),
                    ..Default::default()
                })
                .await
                .ctx("list")?;
            let ids: Vec<_> = all.iter().map(|r| r.id).collect();
            ensure!(
                ids == vec![b.id, c.id, a.id],
                "order by createdAt: got {ids:?}"
            );
            let active = s
                .list_sandboxes(&SandboxFilter {
                    provider: Some(p.clone()),
                    status: Some(SandboxStatus::Active),
                    ..Default::default()
                })
                .await
                .ctx("list active")?;
            let ids: Vec<_> = active.iter().map(|r| r.id).collect();
            ensure!(ids == vec![b.id, c.id], "active filter: got {ids:?}");
            let limited = s
                .list_sandboxes(&SandboxFilter {
                    provider: Some(p.clone()),
                    limit: Some(2),
                    ..Default::default()
                })
                .await
                .ctx("list limit")?;
            ensure!(
                limited.len() == 2 && limited[0].id == b.id,
                "limit 2 gave {} records",
                limited.len()
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check("process_round_trips_unchanged", LIMIT, async {
        let sb = full_sandbox(&unique_provider(), 1);
        s.insert_sandbox(&sb).await.ctx("insert sandbox")?;
        let p = full_process(&sb, 1_700_000_000_123);
        s.insert_process(&p).await.ctx("insert process")?;
        let back = s
            .get_process(&p.id)
            .await
            .ctx("get")?
            .ok_or("inserted process not found")?;
        ensure!(
            back == p,
            "round trip changed the process:\n in:  {p:?}\n out: {back:?}"
        );
        ensure!(
            s.get_process(&ProcessId::new()).await.ctx("get")?.is_none(),
            "unknown process found"
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("process_of_unknown_sandbox_is_refused", LIMIT, async {
        let ghost = full_sandbox(&unique_provider(), 1);
        let p = full_process(&ghost, 1);
        match s.insert_process(&p).await {
            Err(e) if e.is_not_found() => {}
            other => return Err(format!("insert for an unknown sandbox gave {other:?}")),
        }
        ensure!(
            s.get_process(&p.id).await.ctx("get")?.is_none(),
            "refused process was stored"
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("duplicate_process_insert_is_conflict", LIMIT, async {
        let sb = full_sandbox(&unique_provider(), 1);
        s.insert_sandbox(&sb).await.ctx("insert sandbox")?;
        let p = full_process(&sb, 1);
        s.insert_process(&p).await.ctx("insert")?;
        match s.insert_process(&p).await {
            Err(Error::Conflict { .. }) => Ok(Outcome::Passed),
            other => Err(format!("duplicate gave {other:?}")),
        }
    })
    .await;

    r.check(
        "process_patch_changes_only_given_attributes",
        LIMIT,
        async {
            let sb = full_sandbox(&unique_provider(), 1);
            s.insert_sandbox(&sb).await.ctx("insert sandbox")?;
            let p = full_process(&sb, 1);
            s.insert_process(&p).await.ctx("insert")?;
            let patch = ProcessPatch {
                status: Some(ProcessStatus::Killed),
                exit_code: Some(137),
                signal: Some("SIGKILL".into()),
                stream_finished_at: Some(50),
                stream_abort_reason: Some("killed".into()),
                exited_at: Some(50),
                metadata: Some(json!({"chunkCount": 4, "lastSeq": 4})),
                ..Default::default()
            };
            s.patch_process(&p.id, &patch).await.ctx("patch")?;
            let mut expected = p.clone();
            expected.apply(&patch);
            let back = s.get_process(&p.id).await.ctx("get")?.ok_or("lost")?;
            ensure!(
                back == expected,
                "after patch:\n want {expected:?}\n got  {back:?}"
            );
            match s.patch_process(&ProcessId::new(), &patch).await {
                Err(e) if e.is_not_found() => {}
                other => return Err(format!("patch of unknown process gave {other:?}")),
            }
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check(
        "list_processes_filters_by_sandbox_status_and_openness",
        LIMIT,
        async {
            let sb = full_sandbox(&unique_provider(), 1);
            let other = full_sandbox(&unique_provider(), 1);
            s.insert_sandbox(&sb).await.ctx("insert sandbox")?;
            s.insert_sandbox(&other).await.ctx("insert other")?;
            let mut p1 = full_process(&sb, 30);
            let p2 = full_process(&sb, 10);
            let mut p3 = full_process(&sb, 20);
            p1.status = ProcessStatus::Exited;
            p3.status = ProcessStatus::Starting;
            let p4 = full_process(&other, 5);
            for p in [&p1, &p2, &p3, &p4] {
                s.insert_process(p).await.ctx("insert")?;
            }
            let all = s
                .list_processes(&ProcessFilter {
                    sandbox_id: Some(sb.id),
                    ..Default::default()
                })
                .await
                .ctx("list")?;
            let ids: Vec<_> = all.iter().map(|p| p.id).collect();
            ensure!(
                ids == vec![p2.id, p3.id, p1.id],
                "by sandbox, ordered by startedAt: {ids:?}"
            );
            let open = s
                .list_processes(&ProcessFilter {
                    sandbox_id: Some(sb.id),
                    open_only: true,
                    ..Default::default()
                })
                .await
                .ctx("list open")?;
            let ids: Vec<_> = open.iter().map(|p| p.id).collect();
            ensure!(ids == vec![p2.id, p3.id], "open only: {ids:?}");
            let exited = s
                .list_processes(&ProcessFilter {
                    sandbox_id: Some(sb.id),
                    status: Some(ProcessStatus::Exited),
                    ..Default::default()
                })
                .await
                .ctx("list exited")?;
            ensure!(
                exited.len() == 1 && exited[0].id == p1.id,
                "status filter gave {} records",
                exited.len()
            );
            let open_anywhere = s
                .list_processes(&ProcessFilter {
                    open_only: true,
                    ..Default::default()
                })
                .await
                .ctx("list all open")?;
            ensure!(
                open_anywhere.iter().any(|p| p.id == p4.id),
                "open processes of all sandboxes miss one"
            );
            ensure!(
                !open_anywhere.iter().any(|p| p.id == p1.id),
                "open processes include an exited one"
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r
}
