//! Conformance suite for [`StreamSink`] implementations.
//!
//! Every check uses fresh process ids, so the suite can run against a sink that already holds
//! other logs. Readers are only guaranteed to see entries after the writer's `flush`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sandbox_core::{
    ChunkType, ChunkWriter, Error, LogEntry, LogState, ProcessChunk, ProcessId, ReadFrom,
    SandboxId, StreamSink, WriterLiveness,
};
use serde_json::{json, Map, Value};

use crate::report::{ensure, Context, Outcome, SuiteReport};

const LIMIT: Duration = Duration::from_secs(30);

fn text(t: &str) -> Option<Map<String, Value>> {
    json!({ "text": t }).as_object().cloned()
}

async fn writer(logs: &Arc<dyn StreamSink>) -> Result<(ProcessId, ChunkWriter), String> {
    let pid = ProcessId::new();
    let w = ChunkWriter::open(logs.as_ref(), SandboxId::new(), pid)
        .await
        .ctx("open_writer")?;
    Ok((pid, w))
}

async fn write_n(w: &mut ChunkWriter, n: usize) -> Result<(), String> {
    for i in 1..=n {
        w.append(ChunkType::Stdout, text(&format!("line {i}\n")))
            .await
            .ctx("append")?;
    }
    w.flush().await.ctx("flush")
}

async fn read_all(
    logs: &Arc<dyn StreamSink>,
    pid: &ProcessId,
    from: ReadFrom,
) -> Result<Vec<LogEntry>, String> {
    let page = logs.read(pid, from, 10_000).await.ctx("read")?;
    Ok(page.entries)
}

fn seqs(entries: &[LogEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq).collect()
}

/// Runs every stream check against `logs`.
pub async fn run_stream_suite(logs: Arc<dyn StreamSink>) -> SuiteReport {
    let mut r = SuiteReport::new(format!("stream {}", logs.name()));
    let l = &logs;

    r.check("second_writer_is_refused", LIMIT, async {
        let (pid, mut w) = writer(l).await?;
        write_n(&mut w, 1).await?;
        match l.open_writer(&pid).await {
            Err(e @ Error::Conflict { .. }) => ensure!(
                e.code() == "sandbox_process_stream_writer_exists",
                "second writer refused with code {}, expected sandbox_process_stream_writer_exists",
                e.code()
            ),
            Err(e) => {
                return Err(format!(
                    "second writer refused with {e:?}, expected Conflict"
                ))
            }
            Ok(_) => return Err("a second writer was accepted while the first is open".into()),
        }
        w.close().await.ctx("close")?;
        ensure!(
            l.open_writer(&pid).await.is_err(),
            "a writer was accepted for a closed log; a log has one writer, once"
        );
        let entries = read_all(l, &pid, ReadFrom::START).await?;
        ensure!(
            entries.len() == 1,
            "log changed by refused writers: {} entries",
            entries.len()
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("appends_keep_seq_and_byte_offsets", LIMIT, async {
        let (pid, mut w) = writer(l).await?;
        write_n(&mut w, 5).await?;
        let entries = read_all(l, &pid, ReadFrom::START).await?;
        ensure!(
            seqs(&entries) == vec![1, 2, 3, 4, 5],
            "seqs {:?}",
            seqs(&entries)
        );
        let mut off = 0;
        for e in &entries {
            ensure!(
                e.offset == off,
                "entry {} at offset {}, expected {off}",
                e.seq,
                e.offset
            );
            ensure!(
                e.line.ends_with('\n'),
                "entry {} is not a full NDJSON line",
                e.seq
            );
            let c = e.chunk().ctx("decode")?;
            ensure!(c.seq == e.seq, "chunk seq {} != entry seq {}", c.seq, e.seq);
            ensure!(
                c.process_id == pid.to_string(),
                "processId {} in log of {pid}",
                c.process_id
            );
            ensure!(
                c.text() == Some(&format!("line {}\n", e.seq)[..]),
                "text of {} is {:?}",
                e.seq,
                c.text()
            );
            off = e.end();
        }
        let st = l
            .status(&pid)
            .await
            .ctx("status")?
            .ok_or("status of a written log is None")?;
        ensure!(
            st.entries == 5 && st.bytes == off,
            "status says {} entries / {} bytes, expected 5 / {off}",
            st.entries,
            st.bytes
        );
        ensure!(
            st.state == LogState::Open,
            "state {:?}, expected open",
            st.state
        );
        ensure!(
            st.stream_id == w.stream_id(),
            "status stream id {} != writer's {}",
            st.stream_id,
            w.stream_id()
        );
        w.close().await.ctx("close")?;
        let st = l.status(&pid).await.ctx("status")?.ok_or("status None")?;
        ensure!(
            st.state == LogState::Closed,
            "state after close {:?}",
            st.state
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check("read_from_seq_returns_exactly_later_chunks", LIMIT, async {
        let (pid, mut w) = writer(l).await?;
        write_n(&mut w, 5).await?;
        let e = read_all(l, &pid, ReadFrom::Seq(3)).await?;
        ensure!(seqs(&e) == vec![3, 4, 5], "from seq 3 got {:?}", seqs(&e));
        let e = read_all(l, &pid, ReadFrom::Seq(0)).await?;
        ensure!(
            seqs(&e) == vec![1, 2, 3, 4, 5],
            "from seq 0 got {:?}",
            seqs(&e)
        );
        let e = read_all(l, &pid, ReadFrom::Seq(6)).await?;
        ensure!(e.is_empty(), "from seq 6 got {:?}", seqs(&e));
        let page = l.read(&pid, ReadFrom::Seq(2), 2).await.ctx("read max 2")?;
        ensure!(
            seqs(&page.entries) == vec![2, 3],
            "max 2 from seq 2 got {:?}",
            seqs(&page.entries)
        );
        w.close().await.ctx("close")?;
        Ok(Outcome::Passed)
    })
    .await;

    r.check(
        "read_from_byte_offset_returns_chunks_starting_there",
        LIMIT,
        async {
            let (pid, mut w) = writer(l).await?;
            write_n(&mut w, 4).await?;
            let all = read_all(l, &pid, ReadFrom::START).await?;
            let third = all.get(2).ok_or("fewer than 3 entries")?;
            let e = read_all(l, &pid, ReadFrom::Offset(third.offset)).await?;
            ensure!(
                seqs(&e) == vec![3, 4],
                "from offset of seq 3 got {:?}",
                seqs(&e)
            );
            let end = all.last().map(LogEntry::end).unwrap_or(0);
            let e = read_all(l, &pid, ReadFrom::Offset(end)).await?;
            ensure!(e.is_empty(), "from the end offset got {:?}", seqs(&e));
            w.close().await.ctx("close")?;
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check("offsets_count_utf8_bytes", LIMIT, async {
        let (pid, mut w) = writer(l).await?;
        w.append(ChunkType::Stdout, text("né€😀\n"))
            .await
            .ctx("append")?;
        let big = "é".repeat(300_000); // 600 KB line
        w.append(ChunkType::Stdout, text(&big))
            .await
            .ctx("append big")?;
        w.append(ChunkType::Stderr, text("end"))
            .await
            .ctx("append")?;
        w.flush().await.ctx("flush")?;
        let e = read_all(l, &pid, ReadFrom::START).await?;
        ensure!(e.len() == 3, "{} entries", e.len());
        ensure!(
            e[1].offset == e[0].line.len() as u64,
            "second offset {} != first line's byte length {}",
            e[1].offset,
            e[0].line.len()
        );
        ensure!(
            e[1].chunk().ctx("decode big")?.text() == Some(&big[..]),
            "big chunk text changed"
        );
        let from = read_all(l, &pid, ReadFrom::Offset(e[2].offset)).await?;
        ensure!(
            seqs(&from) == vec![3],
            "from third offset got {:?}",
            seqs(&from)
        );
        w.close().await.ctx("close")?;
        Ok(Outcome::Passed)
    })
    .await;

    r.check(
        "out_of_order_append_is_refused_and_changes_nothing",
        LIMIT,
        async {
            let pid = ProcessId::new();
            let mut a = l.open_writer(&pid).await.ctx("open_writer")?;
            let chunk = ProcessChunk::new(2, ChunkType::Stdout, SandboxId::new(), pid, text("x"));
            let bad = LogEntry {
                seq: 2,
                offset: 0,
                line: chunk.encode(),
            };
            ensure!(
                a.append(&[bad]).await.is_err(),
                "an entry with seq 2 was accepted as the first"
            );
            let chunk = ProcessChunk::new(1, ChunkType::Stdout, SandboxId::new(), pid, text("x"));
            let bad = LogEntry {
                seq: 1,
                offset: 7,
                line: chunk.encode(),
            };
            ensure!(
                a.append(&[bad]).await.is_err(),
                "an entry at offset 7 was accepted as the first"
            );
            a.flush().await.ctx("flush")?;
            let e = read_all(l, &pid, ReadFrom::START).await?;
            ensure!(e.is_empty(), "refused appends left {} entries", e.len());
            a.close().await.ctx("close")?;
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check("append_after_close_fails", LIMIT, async {
        let pid = ProcessId::new();
        let mut a = l.open_writer(&pid).await.ctx("open_writer")?;
        a.close().await.ctx("close")?;
        let chunk = ProcessChunk::new(1, ChunkType::Stdout, SandboxId::new(), pid, text("x"));
        let e = LogEntry {
            seq: 1,
            offset: 0,
            line: chunk.encode(),
        };
        let appended = a.append(&[e]).await;
        let flushed = a.flush().await;
        ensure!(
            appended.is_err() || flushed.is_err(),
            "append after close was accepted"
        );
        let e = read_all(l, &pid, ReadFrom::START).await?;
        ensure!(e.is_empty(), "closed log grew to {} entries", e.len());
        Ok(Outcome::Passed)
    })
    .await;

    r.check("read_of_unknown_log_is_not_found", LIMIT, async {
        let pid = ProcessId::new();
        match l.read(&pid, ReadFrom::START, 10).await {
            Err(e) if e.is_not_found() => {}
            other => return Err(format!("read of unknown log gave {other:?}")),
        }
        ensure!(
            l.status(&pid).await.ctx("status")?.is_none(),
            "status of unknown log is Some"
        );
        match l.follow(&pid, ReadFrom::START).await {
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(format!("follow of unknown log gave {e:?}")),
            Ok(_) => return Err("follow of unknown log gave a stream".into()),
        }
        Ok(Outcome::Passed)
    })
    .await;

    r.check("follow_sees_live_appends_and_ends_on_close", LIMIT, async {
        let (pid, mut w) = writer(l).await?;
        let mut follow = l.follow(&pid, ReadFrom::START).await.ctx("follow")?;
        w.append(ChunkType::Stdout, text("first"))
            .await
            .ctx("append")?;
        w.flush().await.ctx("flush")?;
        let first = tokio::time::timeout(Duration::from_secs(10), follow.next())
            .await
            .map_err(|_| {
                "follower did not see the first chunk before the second was written".to_string()
            })?
            .ok_or("follow ended early")?
            .ctx("follow item")?;
        ensure!(first.seq == 1, "first followed seq {}", first.seq);
        write_n(&mut w, 2).await?;
        w.close().await.ctx("close")?;
        let rest: Vec<_> = follow.collect().await;
        let rest: Result<Vec<_>, _> = rest.into_iter().collect();
        let rest = rest.ctx("follow item")?;
        ensure!(
            seqs(&rest) == vec![2, 3],
            "after the first, follow gave {:?}",
            seqs(&rest)
        );
        Ok(Outcome::Passed)
    })
    .await;

    r.check(
        "follow_from_seq_skips_earlier_and_ends_on_abort",
        LIMIT,
        async {
            let (pid, mut w) = writer(l).await?;
            write_n(&mut w, 3).await?;
            let follow = l.follow(&pid, ReadFrom::Seq(3)).await.ctx("follow")?;
            w.abort("boom").await.ctx("abort")?;
            let got: Result<Vec<_>, _> = follow.collect::<Vec<_>>().await.into_iter().collect();
            let got = got.ctx("follow item")?;
            ensure!(
                seqs(&got) == vec![3],
                "follow from seq 3 gave {:?}",
                seqs(&got)
            );
            let st = l.status(&pid).await.ctx("status")?.ok_or("status None")?;
            ensure!(
                st.state
                    == LogState::Aborted {
                        reason: "boom".into()
                    },
                "state after abort {:?}",
                st.state
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check(
        "follow_of_a_finished_log_returns_it_and_ends",
        LIMIT,
        async {
            let (pid, mut w) = writer(l).await?;
            write_n(&mut w, 2).await?;
            w.close().await.ctx("close")?;
            let got: Result<Vec<_>, _> = l
                .follow(&pid, ReadFrom::START)
                .await
                .ctx("follow")?
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect();
            ensure!(
                seqs(&got.ctx("follow item")?) == vec![1, 2],
                "follow of closed log"
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check(
        "dropped_writer_is_gone_and_can_be_abandoned",
        LIMIT,
        async {
            let (pid, mut w) = writer(l).await?;
            write_n(&mut w, 1).await?;
            let st = l.status(&pid).await.ctx("status")?.ok_or("status None")?;
            ensure!(
                st.writer == WriterLiveness::Alive,
                "writer liveness while held: {:?}",
                st.writer
            );
            match l.abandon(&pid, "writer_lost").await {
                Err(Error::Conflict { .. }) => {}
                other => {
                    return Err(format!(
                        "abandon while the writer is alive gave {other:?}, expected Conflict"
                    ))
                }
            }
            drop(w);
            // Dropping is synchronous for the object; give an async sink a bounded moment to notice.
            let mut liveness = WriterLiveness::Alive;
            for _ in 0..100 {
                liveness = l
                    .status(&pid)
                    .await
                    .ctx("status")?
                    .ok_or("status None")?
                    .writer;
                if liveness != WriterLiveness::Alive {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ensure!(
                liveness == WriterLiveness::Gone,
                "writer liveness after drop: {liveness:?}"
            );
            l.abandon(&pid, "writer_lost").await.ctx("abandon")?;
            let st = l.status(&pid).await.ctx("status")?.ok_or("status None")?;
            ensure!(
                st.state
                    == LogState::Aborted {
                        reason: "writer_lost".into()
                    },
                "state after abandon {:?}",
                st.state
            );
            let got = read_all(l, &pid, ReadFrom::START).await?;
            ensure!(
                seqs(&got) == vec![1],
                "abandon changed the entries: {:?}",
                seqs(&got)
            );
            Ok(Outcome::Passed)
        },
    )
    .await;

    r.check(
        "logs_of_different_processes_are_independent",
        LIMIT,
        async {
            let (a, mut wa) = writer(l).await?;
            let (b, mut wb) = writer(l).await?;
            let ta = async {
                write_n(&mut wa, 20).await?;
                wa.close().await.ctx("close a")
            };
            let tb = async {
                write_n(&mut wb, 30).await?;
                wb.close().await.ctx("close b")
            };
            let (ra, rb) = tokio::join!(ta, tb);
            ra?;
            rb?;
            ensure!(read_all(l, &a, ReadFrom::START).await?.len() == 20, "log a");
            ensure!(read_all(l, &b, ReadFrom::START).await?.len() == 30, "log b");
            Ok(Outcome::Passed)
        },
    )
    .await;

    r
}
