//! Process logs over the streams protocol: batching, dropped sessions, file parts, liveness.

#[path = "support/common.rs"]
mod common;

use std::time::Duration;

use futures::StreamExt;
use sandbox_core::{
    ChunkType, ChunkWriter, LogState, ProcessId, ReadFrom, SandboxId, StreamSink, WriterLiveness,
};
use serde_json::json;

fn text(i: usize) -> Option<serde_json::Map<String, serde_json::Value>> {
    json!({ "text": format!("line {i} ü€𝄞\n") })
        .as_object()
        .cloned()
}

async fn read_all(logs: &dyn StreamSink, pid: &ProcessId) -> Vec<sandbox_core::LogEntry> {
    logs.read(pid, ReadFrom::START, usize::MAX)
        .await
        .unwrap()
        .entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_sse_sessions_during_a_long_log_lose_and_duplicate_nothing() {
    let emu = common::emulator().await;
    // Parts of the log are flushed, the rest sits in the server's buffer and is discarded
    // with each dropped session: the writer must resend exactly that rest.
    emu.set_flush_byte_limit(100_000);
    let b = common::backend(&emu);
    let (sid, pid) = (SandboxId::new(), ProcessId::new());
    let mut w = ChunkWriter::open(b.logs.as_ref(), sid, pid).await.unwrap();
    // A follower started before the output must see every line exactly once too.
    let follower = b.logs.follow(&pid, ReadFrom::START).await.unwrap();
    let follow_task = tokio::spawn(follower.collect::<Vec<_>>());
    let n = 3000;
    let mut drops = 0;
    for i in 1..=n {
        w.append(ChunkType::Stdout, text(i)).await.unwrap();
        if i % 400 == 0 {
            drops += emu.drop_sse_sessions();
        }
    }
    assert!(drops >= 5, "sessions were dropped mid-stream ({drops})");
    w.close().await.unwrap();
    let starts = emu
        .requests()
        .iter()
        .filter(|r| r.ops.iter().any(|o| o == "start-stream"))
        .count();
    assert!(
        starts > 1,
        "the writer reconnected with its token ({starts} start-stream)"
    );

    let entries = read_all(b.logs.as_ref(), &pid).await;
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
    let mut offset = 0;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.offset, offset, "offsets continue without gap");
        assert_eq!(
            e.chunk().unwrap().text(),
            Some(format!("line {} ü€𝄞\n", i + 1).as_str())
        );
        offset = e.end();
    }
    let stored = emu.stream_content(&pid.stream_client_id()).unwrap();
    assert_eq!(
        stored.len() as u64,
        offset,
        "the server holds exactly the bytes written"
    );
    assert!(
        emu.stream_parts(&pid.stream_client_id()) > 1,
        "the log was flushed to several file parts"
    );

    let followed = tokio::time::timeout(Duration::from_secs(30), follow_task)
        .await
        .unwrap()
        .unwrap();
    let followed: Vec<u64> = followed.into_iter().map(|e| e.unwrap().seq).collect();
    assert_eq!(followed, (1..=n as u64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_small_writes_are_sent_in_few_requests() {
    let emu = common::emulator().await;
    let b = common::backend_without_timer(&emu);
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), ProcessId::new())
        .await
        .unwrap();
    emu.clear_requests();
    for i in 0..10_000 {
        w.append(
            ChunkType::Stdout,
            json!({"text": format!("{i}\n")}).as_object().cloned(),
        )
        .await
        .unwrap();
    }
    w.close().await.unwrap();
    let appends = emu
        .requests()
        .iter()
        .filter(|r| r.ops.iter().any(|o| o == "append-stream"))
        .count();
    assert!(
        appends <= 100,
        "{appends} append requests for 10,000 writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_sent_after_the_batch_delay_without_a_flush() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    w.append(ChunkType::Stdout, text(1)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while emu
        .stream_content(&pid.stream_client_id())
        .unwrap()
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queued append was never sent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let page = b.logs.read(&pid, ReadFrom::START, 10).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.status.state, LogState::Open);
    assert_eq!(page.status.writer, WriterLiveness::Alive);
    w.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_a_byte_offset_start_at_the_next_whole_line() {
    let emu = common::emulator().await;
    emu.set_flush_byte_limit(100);
    let b = common::backend(&emu);
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    for i in 1..=20 {
        w.append(ChunkType::Stdout, text(i)).await.unwrap();
    }
    w.close().await.unwrap();
    let all = read_all(b.logs.as_ref(), &pid).await;
    let e7 = &all[6];
    let from_line = b
        .logs
        .read(&pid, ReadFrom::Offset(e7.offset), 100)
        .await
        .unwrap();
    assert_eq!(from_line.entries.first().map(|e| e.seq), Some(7));
    let mid = b
        .logs
        .read(&pid, ReadFrom::Offset(e7.offset + 3), 100)
        .await
        .unwrap();
    assert_eq!(mid.entries.first().map(|e| e.seq), Some(8));
    assert_eq!(mid.entries.len(), 13);
    assert_eq!(mid.entries, all[7..].to_vec());
    let from_seq = b.logs.read(&pid, ReadFrom::Seq(19), 100).await.unwrap();
    assert_eq!(from_seq.entries, all[18..].to_vec());
    assert_eq!(from_seq.status.state, LogState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_is_alive_then_gone_in_this_process_and_unknown_elsewhere() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    // Another process's view: same app reached through another spelling of the host.
    let other_uri = emu.base_url().replace("127.0.0.1", "localhost");
    let other = sandbox_instant::backend(
        sandbox_instant::InstantConfig::new(common::APP_ID, common::TOKEN, &other_uri).unwrap(),
    )
    .unwrap();
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    w.append(ChunkType::Stdout, text(1)).await.unwrap();
    w.flush().await.unwrap();
    assert_eq!(
        b.logs.status(&pid).await.unwrap().unwrap().writer,
        WriterLiveness::Alive
    );
    assert_eq!(
        other.logs.status(&pid).await.unwrap().unwrap().writer,
        WriterLiveness::Unknown
    );

    let e = other
        .logs
        .open_writer(&pid)
        .await
        .err()
        .expect("a second writer is refused by the server");
    assert_eq!(e.code(), "sandbox_process_stream_writer_exists");

    drop(w);
    let s = b.logs.status(&pid).await.unwrap().unwrap();
    assert_eq!((s.writer, s.entries), (WriterLiveness::Gone, 1));
    b.logs.abandon(&pid, "writer_lost").await.unwrap();
    let s = other.logs.status(&pid).await.unwrap().unwrap();
    assert_eq!(
        s.state,
        LogState::Aborted {
            reason: "writer_lost".into()
        }
    );
    assert_eq!(s.entries, 1, "what the dropped writer wrote is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_open_log_is_abandoned_through_its_streams_entity() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    let other_uri = emu.base_url().replace("127.0.0.1", "localhost");
    let other = sandbox_instant::backend(
        sandbox_instant::InstantConfig::new(common::APP_ID, common::TOKEN, &other_uri).unwrap(),
    )
    .unwrap();
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    w.append(ChunkType::Stdout, text(1)).await.unwrap();
    w.flush().await.unwrap();
    let follower = other.logs.follow(&pid, ReadFrom::START).await.unwrap();
    other.logs.abandon(&pid, "sandbox_stopped").await.unwrap();
    let got: Vec<_> = tokio::time::timeout(Duration::from_secs(10), follower.collect::<Vec<_>>())
        .await
        .expect("the follower ends when the log is abandoned");
    assert_eq!(got.len(), 1);
    let s = other.logs.status(&pid).await.unwrap().unwrap();
    assert_eq!(
        s.state,
        LogState::Aborted {
            reason: "sandbox_stopped".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pushes_and_rate_limits_are_retried_without_loss() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    for i in 1..=50 {
        if i == 10 {
            emu.fail_next(1, 500);
        }
        if i == 30 {
            emu.rate_limit_next(1, Duration::ZERO);
        }
        w.append(ChunkType::Stdout, text(i)).await.unwrap();
        w.flush().await.unwrap();
    }
    w.close().await.unwrap();
    let seqs: Vec<u64> = read_all(b.logs.as_ref(), &pid)
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_on_the_sse_channel_become_typed_errors() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    w.append(ChunkType::Stdout, text(1)).await.unwrap();
    w.close().await.unwrap();

    emu.fail_next_subscription("permission denied for $streams");
    let e = b.logs.read(&pid, ReadFrom::START, 10).await.unwrap_err();
    assert_eq!(e.code(), "store_error");
    assert!(e.to_string().contains("permission denied"), "{e}");

    emu.fail_next_subscription("stream unavailable");
    let mut f = b.logs.follow(&pid, ReadFrom::START).await.unwrap();
    let first = f.next().await.unwrap().unwrap_err();
    assert!(first.to_string().contains("stream unavailable"), "{first}");
    assert!(f.next().await.is_none(), "the follow ends after the error");

    // A session the server ended is reopened by the next reader, unseen by the caller.
    assert!(emu.drop_sse_sessions() >= 1);
    assert_eq!(read_all(b.logs.as_ref(), &pid).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_is_not_acknowledged_and_can_be_written_again() {
    let emu = common::emulator().await;
    let mut cfg = common::config(&emu);
    cfg.batch_bytes = 1;
    let b = sandbox_instant::backend(cfg).unwrap();
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    w.append(ChunkType::Stdout, text(1)).await.unwrap();
    emu.fail_next(1000, 503);
    let e = w.append(ChunkType::Stdout, text(2)).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert_eq!(w.last_seq(), 1, "the failed chunk took no seq");
    emu.clear_faults();
    assert_eq!(w.append(ChunkType::Stdout, text(2)).await.unwrap(), 2);
    w.close().await.unwrap();
    let seqs: Vec<u64> = read_all(b.logs.as_ref(), &pid)
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_is_a_writer_conflict_only_when_the_server_says_the_log_is_taken() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    let pid = ProcessId::new();
    emu.fail_next_stream_op("start-stream", "permission denied for $streams");
    let e = b.logs.open_writer(&pid).await.err().unwrap();
    assert_eq!(e.code(), "store_error", "{e}");
    assert!(e.to_string().contains("permission denied"), "{e}");

    // The refusal left no writer behind: the log can be opened now.
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    w.append(ChunkType::Stdout, text(1)).await.unwrap();
    w.flush().await.unwrap();

    // Another process's writer with its own reconnect token is refused by the server.
    let other_uri = emu.base_url().replace("127.0.0.1", "localhost");
    let other = sandbox_instant::backend(
        sandbox_instant::InstantConfig::new(common::APP_ID, common::TOKEN, &other_uri).unwrap(),
    )
    .unwrap();
    let e = other.logs.open_writer(&pid).await.err().unwrap();
    assert_eq!(e.code(), "sandbox_process_stream_writer_exists", "{e}");
    w.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_log_is_read_whole_when_the_server_answers_part_by_part() {
    let emu = common::emulator().await;
    emu.set_flush_byte_limit(200);
    let b = common::backend(&emu);
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    for i in 1..=30 {
        w.append(ChunkType::Stdout, text(i)).await.unwrap();
        w.flush().await.unwrap();
    }
    w.close().await.unwrap();
    let parts = emu.stream_parts(&pid.stream_client_id());
    assert!(parts > 3, "{parts} parts");

    emu.spread_subscription_answers(Some(Duration::from_millis(20)));
    let page = b
        .logs
        .read(&pid, ReadFrom::START, usize::MAX)
        .await
        .unwrap();
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    assert_eq!(page.status.state, LogState::Closed);
    let status = b.logs.status(&pid).await.unwrap().unwrap();
    assert_eq!(status.entries, 30);
    assert_eq!(
        status.bytes,
        emu.stream_content(&pid.stream_client_id()).unwrap().len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulators_sse_session_opens_with_a_retry_line_and_traces_every_message() {
    let emu = common::emulator().await;
    let mut resp = reqwest::Client::new()
        .post(format!(
            "{}/admin/sse?app_id={}",
            emu.base_url(),
            common::APP_ID
        ))
        .header("app-id", common::APP_ID)
        .bearer_auth(common::TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut first = String::new();
    while !first.contains("\n\n") {
        let chunk = resp.chunk().await.unwrap().expect("the session stays open");
        first.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(first.starts_with("retry:"), "{first:?}");
    let data = first
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .expect("a data line");
    let init: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(init["op"], "sse-init");
    assert!(init["trace-id"].is_string(), "{init}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_outlives_many_dropped_sessions_spread_over_a_long_log() {
    let emu = common::emulator().await;
    let b = common::backend(&emu);
    let pid = ProcessId::new();
    let mut w = ChunkWriter::open(b.logs.as_ref(), SandboxId::new(), pid)
        .await
        .unwrap();
    let mut follower = b.logs.follow(&pid, ReadFrom::START).await.unwrap();
    let n = 30;
    for i in 1..=n {
        w.append(ChunkType::Stdout, text(i)).await.unwrap();
        w.flush().await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(10), follower.next())
            .await
            .expect("the follower keeps up")
            .expect("the follow goes on")
            .unwrap();
        assert_eq!(e.seq, i as u64);
        // The follower is between two reads: it sees this drop on its next one.
        assert!(emu.drop_sse_sessions() >= 1);
    }
    w.close().await.unwrap();
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(10), follower.collect::<Vec<_>>())
        .await
        .expect("the follow ends with the log");
    assert!(rest.is_empty(), "{rest:?}");
}
