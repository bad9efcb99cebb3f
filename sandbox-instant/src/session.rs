//! The admin SSE session that carries stream traffic: `POST /admin/sse` for server→client
//! messages, `POST /admin/sse/push` for client→server ones.
//!
//! One session is shared by every writer and reader of a sink. When it ends (network, server,
//! a refused push), it is marked closed, every waiting party is woken by its channel closing,
//! and the next user opens a new one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::InstantClient;
use crate::error::InstantError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Routes {
    /// Replies awaited by `client-event-id` (start-stream).
    pending: HashMap<String, oneshot::Sender<Value>>,
    /// Writer traffic by `stream-id` (stream-flushed, append-failed, error).
    writers: HashMap<String, mpsc::UnboundedSender<Value>>,
    /// Reader traffic by the subscribe's `client-event-id` (stream-append, error).
    subs: HashMap<String, mpsc::UnboundedSender<Value>>,
}

/// One open SSE session. `Debug` never shows the `sse-token`: it is the session's credential.
pub(crate) struct Session {
    client: InstantClient,
    machine_id: String,
    session_id: String,
    sse_token: String,
    routes: Mutex<Routes>,
    closed: watch::Sender<bool>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("machine_id", &self.machine_id)
            .field("session_id", &self.session_id)
            .field("sse_token", &"<redacted>")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.reader).take() {
            h.abort();
        }
    }
}

/// Incremental parser of `text/event-stream`: `data:` lines (with or without a space), `:`
/// comments, `retry:`; an empty line ends an event.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    /// Feeds bytes; returns the JSON messages of completed events (arrays are flattened).
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<Value> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if !self.data.is_empty() {
                    let text = self.data.join("\n");
                    self.data.clear();
                    match serde_json::from_str::<Value>(&text) {
                        Ok(Value::Array(a)) => out.extend(a),
                        Ok(v) => out.push(v),
                        Err(e) => {
                            tracing::warn!(error = %e, "instant: SSE event is not JSON; ignored")
                        }
                    }
                }
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data
                    .push(rest.strip_prefix(' ').unwrap_or(rest).to_string());
            }
            // `:` comments, `retry:`, `event:` and `id:` lines carry nothing we use.
        }
        out
    }
}

impl Session {
    /// Opens a session and waits for `sse-init`.
    pub(crate) async fn connect(client: &InstantClient) -> Result<Arc<Session>, InstantError> {
        let resp = client.sse_open().await?;
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        let timeout = client.config.sse_timeout;
        let mut early = Vec::new();
        let init = tokio::time::timeout(timeout, async {
            loop {
                match body.next().await {
                    Some(Ok(b)) => {
                        let mut msgs = parser.feed(&b).into_iter();
                        for m in msgs.by_ref() {
                            if m["op"] == "sse-init" {
                                early.extend(msgs);
                                return Ok(m);
                            }
                        }
                    }
                    Some(Err(e)) => {
                        return Err(InstantError::SessionLost(format!("SSE stream failed: {e}")))
                    }
                    None => {
                        return Err(InstantError::SessionLost(
                            "SSE stream ended before sse-init".into(),
                        ))
                    }
                }
            }
        })
        .await
        .map_err(|_| InstantError::NoAnswer {
            waited: timeout,
            what: "sse-init".into(),
        })??;
        let field = |k: &str| {
            init.get(k)
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| InstantError::Malformed(format!("sse-init without {k}")))
        };
        let session = Arc::new(Session {
            client: client.clone(),
            machine_id: field("machine-id")?,
            session_id: field("session-id")?,
            sse_token: field("sse-token")?,
            routes: Mutex::new(Routes::default()),
            closed: watch::channel(false).0,
            reader: Mutex::new(None),
        });
        for m in early {
            session.dispatch(m);
        }
        let weak = Arc::downgrade(&session);
        let task = tokio::spawn(async move {
            while let Some(chunk) = body.next().await {
                let Ok(bytes) = chunk else { break };
                let Some(s) = weak.upgrade() else { return };
                for m in parser.feed(&bytes) {
                    s.dispatch(m);
                }
            }
            if let Some(s) = weak.upgrade() {
                s.close();
            }
        });
        *lock(&session.reader) = Some(task);
        Ok(session)
    }

    /// Whether the session has ended.
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Ends the session: every waiting party sees its channel close.
    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
        let routes = std::mem::take(&mut *lock(&self.routes));
        drop(routes);
        if let Some(h) = lock(&self.reader).take() {
            h.abort();
        }
    }

    fn dispatch(&self, m: Value) {
        let op = m["op"].as_str().unwrap_or_default();
        let event = m["client-event-id"].as_str().unwrap_or_default();
        let mut r = lock(&self.routes);
        match op {
            "start-stream-ok" => {
                if let Some(tx) = r.pending.remove(event) {
                    let _ = tx.send(m);
                }
            }
            "stream-flushed" | "append-failed" => {
                if let Some(tx) = m["stream-id"].as_str().and_then(|s| r.writers.get(s)) {
                    let _ = tx.send(m.clone());
                }
            }
            "stream-append" => {
                if let Some(tx) = r.subs.get(event) {
                    let _ = tx.send(m.clone());
                }
            }
            "error" => {
                if let Some(tx) = r.pending.remove(event) {
                    let _ = tx.send(m);
                } else if let Some(tx) = r.subs.get(event) {
                    let _ = tx.send(m.clone());
                } else {
                    let sid = m["stream-id"]
                        .as_str()
                        .or_else(|| m["original-event"]["stream-id"].as_str())
                        .unwrap_or_default();
                    match r.writers.get(sid) {
                        Some(tx) => {
                            let _ = tx.send(m.clone());
                        }
                        None => {
                            tracing::warn!(message = %m["message"], "instant: unrouted error on the stream channel")
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Sends messages. A refused push ends the session, as the official SDK does.
    pub(crate) async fn push(&self, messages: Vec<Value>) -> Result<(), InstantError> {
        if self.is_closed() {
            return Err(InstantError::SessionLost("session closed".into()));
        }
        let body = json!({
            "machine_id": self.machine_id,
            "session_id": self.session_id,
            "sse_token": self.sse_token,
            "messages": messages,
        });
        let r = self.client.sse_push(&body).await;
        if r.is_err() {
            self.close();
        }
        r
    }

    /// Sends one message and waits for the reply with the same `client-event-id`.
    pub(crate) async fn request(
        &self,
        mut msg: Value,
        timeout: Duration,
    ) -> Result<Value, InstantError> {
        let event = uuid::Uuid::new_v4().to_string();
        msg["client-event-id"] = json!(event);
        let (tx, rx) = oneshot::channel();
        lock(&self.routes).pending.insert(event.clone(), tx);
        if let Err(e) = self.push(vec![msg]).await {
            lock(&self.routes).pending.remove(&event);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(InstantError::SessionLost(
                "the session ended before the reply".into(),
            )),
            Err(_) => {
                lock(&self.routes).pending.remove(&event);
                Err(InstantError::NoAnswer {
                    waited: timeout,
                    what: "the server's reply".into(),
                })
            }
        }
    }

    /// Routes writer traffic of `stream_id` to the returned channel.
    pub(crate) fn writer_route(&self, stream_id: &str) -> mpsc::UnboundedReceiver<Value> {
        let (tx, rx) = mpsc::unbounded_channel();
        if !self.is_closed() {
            lock(&self.routes).writers.insert(stream_id.to_string(), tx);
        }
        rx
    }

    /// Stops routing writer traffic of `stream_id`.
    pub(crate) fn drop_writer_route(&self, stream_id: &str) {
        lock(&self.routes).writers.remove(stream_id);
    }

    /// Subscribes to a stream from a byte offset; traffic arrives on the returned channel.
    pub(crate) async fn subscribe(
        &self,
        client_id: &str,
        offset: u64,
    ) -> Result<(String, mpsc::UnboundedReceiver<Value>), InstantError> {
        let event = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.routes).subs.insert(event.clone(), tx);
        let mut msg =
            json!({"client-event-id": event, "op": "subscribe-stream", "client-id": client_id});
        if offset > 0 {
            msg["offset"] = json!(offset);
        }
        if let Err(e) = self.push(vec![msg]).await {
            lock(&self.routes).subs.remove(&event);
            return Err(e);
        }
        Ok((event, rx))
    }

    /// Ends a subscription (best effort).
    pub(crate) async fn unsubscribe(&self, event: &str) {
        lock(&self.routes).subs.remove(event);
        if !self.is_closed() {
            let msg = json!({
                "client-event-id": uuid::Uuid::new_v4().to_string(),
                "op": "unsubscribe-stream",
                "subscribe-event-id": event,
            });
            let _ = self.push(vec![msg]).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn debug_output_of_a_session_never_shows_its_sse_token() {
        let token = "c1d2e3f4-0000-4000-8000-00000000beef";
        let emu = sandbox_testkit::instant::InstantEmulator::start("app", token).await;
        let config = crate::InstantConfig::new("app", token, &emu.base_url()).unwrap();
        let client = InstantClient::new(config).unwrap();
        let session = Session::connect(&client).await.unwrap();
        let shown = format!("{session:?}");
        assert!(!shown.contains(&session.sse_token), "{shown}");
        assert!(shown.contains(&session.session_id));
    }

    #[test]
    fn parser_handles_framing_variants() {
        let mut p = SseParser::default();
        let mut got = p.feed(b"retry: 1000\n: keep-alive\n\ndata:{\"op\":\"a\"}\n\nda");
        got.extend(p.feed(b"ta: [{\"op\":\"b\"},{\"op\":\"c\"}]\r\n\r\n"));
        let ops: Vec<_> = got
            .iter()
            .map(|m| m["op"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ops, ["a", "b", "c"]);
    }
}
