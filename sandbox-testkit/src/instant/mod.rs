//! A stateful emulator of the InstantDB admin HTTP API (`reference/provider-apis.md` §4), for
//! testing the `instant` store without an account.
//!
//! It serves, on `127.0.0.1:0`:
//!
//! - `POST /admin/query`: the InstaQL subset the store uses (`where` on `id`, attributes and
//!   link paths such as `sandbox.id`, `$in`, `$isNull`, comparisons, `and`/`or`; `limit`,
//!   `offset`, `order` on top-level namespaces; nested link expansion; `fields`);
//! - `POST /admin/transact`: `create`, `update` (with `{"upsert": false}`), `merge`, `link`,
//!   `unlink`, `delete`, atomically; strings with NUL are refused like the real server does;
//! - `POST /admin/sse` + `POST /admin/sse/push`: the streams protocol with its real message
//!   shapes (`sse-init`, `start-stream[-ok]`, `append-stream`, `stream-flushed`,
//!   `append-failed`, `subscribe-stream`, `stream-append`, `unsubscribe-stream`, `error`),
//!   byte-offset appends, reconnect tokens, and flushes to file parts served over HTTP;
//! - the admin auth check (`authorization: Bearer <token>` and `app-id`), answered like the
//!   real server with HTTP 400 `record-not-found`.
//!
//! Fault switches: [`InstantEmulator::drop_sse_sessions`], [`InstantEmulator::fail_next`],
//! [`InstantEmulator::rate_limit_next`], [`InstantEmulator::respond_raw_next`],
//! [`InstantEmulator::fail_next_subscription`], [`InstantEmulator::fail_next_stream_op`],
//! [`InstantEmulator::set_latency`], [`InstantEmulator::set_flush_byte_limit`],
//! [`InstantEmulator::spread_subscription_answers`]; every request is in
//! [`InstantEmulator::requests`].
//!
//! Unflushed stream bytes of a writer whose SSE session drops are discarded (the strict reading
//! of the server's contract), so a writer must resend from the flushed offset.

mod db;

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use db::Db;

/// One request the emulator received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path without the query string (`/admin/transact`).
    pub path: String,
    /// Operations carried: transact step actions, push message ops, query namespaces.
    pub ops: Vec<String>,
    /// The JSON body, or `null` when there was none or it was not JSON.
    pub body: Value,
}

#[derive(Debug, Default)]
struct Faults {
    fail: Vec<u16>,
    rate_limit: Vec<Duration>,
    raw: Vec<(u16, String)>,
    latency: Duration,
}

#[derive(Debug)]
struct Session {
    sse_token: String,
    machine_id: String,
    tx: mpsc::UnboundedSender<Value>,
    /// Subscriptions by the subscribe message's `client-event-id`.
    subs: HashMap<String, Sub>,
}

#[derive(Debug, Clone)]
struct Sub {
    client_id: Option<String>,
    stream_id: Option<String>,
    offset: u64,
    started: bool,
}

#[derive(Debug)]
struct StreamState {
    id: String,
    client_id: String,
    reconnect_token: String,
    data: Vec<u8>,
    flushed: usize,
    /// `(start, len, path)` of each flushed part.
    parts: Vec<(usize, usize, String)>,
    owner: Option<String>,
    done: bool,
    abort_reason: Option<String>,
}

#[derive(Debug)]
struct Inner {
    db: Db,
    sessions: HashMap<String, Session>,
    streams: HashMap<String, StreamState>,
    by_client: HashMap<String, String>,
    files: HashMap<String, Vec<u8>>,
    flush_limit: usize,
    /// Answer a subscription with one message per part, this far apart (`None`: one answer).
    spread_answers: Option<Duration>,
    /// `(op, message)`: `error` answers for the next stream messages with that op.
    stream_op_errors: Vec<(String, String)>,
}

#[derive(Debug)]
struct Shared {
    app_id: String,
    admin_token: String,
    base_url: String,
    inner: Mutex<Inner>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<RecordedRequest>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running emulator; the server stops when this is dropped.
#[derive(Debug)]
pub struct InstantEmulator {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for InstantEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Default flush limit: the buffer is written to a file part past this many bytes.
pub const DEFAULT_FLUSH_BYTE_LIMIT: usize = 1 << 20;

impl InstantEmulator {
    /// Starts an emulator for one app on `127.0.0.1:0`.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(app_id: &str, admin_token: &str) -> InstantEmulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            app_id: app_id.to_string(),
            admin_token: admin_token.to_string(),
            base_url: format!("http://{addr}"),
            inner: Mutex::new(Inner {
                db: Db::default(),
                sessions: HashMap::new(),
                streams: HashMap::new(),
                by_client: HashMap::new(),
                files: HashMap::new(),
                flush_limit: DEFAULT_FLUSH_BYTE_LIMIT,
                spread_answers: None,
                stream_op_errors: Vec::new(),
            }),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/admin/query", post(query))
            .route("/admin/transact", post(transact))
            .route("/admin/sse", post(sse_open))
            .route("/admin/sse/push", post(sse_push))
            .route("/emulator/files/{*path}", get(file))
            .layer(middleware::from_fn_with_state(shared.clone(), front))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        InstantEmulator { shared, task }
    }

    /// `http://127.0.0.1:<port>`: the `INSTANT_API_URI` to use.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.log).clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// Closes every open SSE session, as a network failure would; writers' unflushed bytes are
    /// discarded. Returns how many sessions were closed.
    pub fn drop_sse_sessions(&self) -> usize {
        let mut g = lock(&self.shared.inner);
        let ids: Vec<String> = g.sessions.keys().cloned().collect();
        for id in &ids {
            end_session(&mut g, id);
        }
        ids.len()
    }

    /// Number of open SSE sessions.
    pub fn sse_sessions(&self) -> usize {
        lock(&self.shared.inner).sessions.len()
    }

    /// Answers the next `n` requests with `status` and a JSON error body.
    pub fn fail_next(&self, n: usize, status: u16) {
        lock(&self.shared.faults)
            .fail
            .extend(std::iter::repeat_n(status, n));
    }

    /// Forgets every pending failure switched on with `fail_next`, `rate_limit_next` and
    /// `respond_raw_next`.
    pub fn clear_faults(&self) {
        let mut f = lock(&self.shared.faults);
        f.fail.clear();
        f.rate_limit.clear();
        f.raw.clear();
    }

    /// Answers the next `n` requests with 429 `rate-limited` and `Retry-After`.
    pub fn rate_limit_next(&self, n: usize, retry_after: Duration) {
        lock(&self.shared.faults)
            .rate_limit
            .extend(std::iter::repeat_n(retry_after, n));
    }

    /// Answers the next request with `status` and `body` as `text/plain` (a non-JSON answer).
    pub fn respond_raw_next(&self, status: u16, body: &str) {
        lock(&self.shared.faults)
            .raw
            .push((status, body.to_string()));
    }

    /// Answers the next subscribe-stream with an `error` message on the SSE channel.
    pub fn fail_next_subscription(&self, message: &str) {
        self.fail_next_stream_op("subscribe-stream", message);
    }

    /// Answers the next stream message with `op` (`start-stream`, `append-stream`,
    /// `subscribe-stream`) with an `error` message carrying `message` on the SSE channel,
    /// instead of handling it.
    pub fn fail_next_stream_op(&self, op: &str, message: &str) {
        lock(&self.shared.inner)
            .stream_op_errors
            .push((op.to_string(), message.to_string()));
    }

    /// Delays every request by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.shared.faults).latency = latency;
    }

    /// Answers each new subscription with one `stream-append` per flushed part, then the
    /// buffer, then `done`, each in its own SSE event `gap` after the previous one (a server
    /// may split its answer so); `None` goes back to one answer. Meant for finished streams:
    /// live appends are not held back behind the spread answer.
    pub fn spread_subscription_answers(&self, gap: Option<Duration>) {
        lock(&self.shared.inner).spread_answers = gap;
    }

    /// Flushes a stream's buffer to a file part once it holds at least `bytes` bytes.
    pub fn set_flush_byte_limit(&self, bytes: usize) {
        lock(&self.shared.inner).flush_limit = bytes.max(1);
    }

    /// The attributes of one entity, without its id and links.
    pub fn entity(&self, namespace: &str, id: &str) -> Option<Map<String, Value>> {
        lock(&self.shared.inner).db.get(namespace, id).cloned()
    }

    /// Runs an InstaQL query directly (no HTTP, no log), for assertions.
    ///
    /// # Panics
    /// On an invalid query.
    pub fn query_direct(&self, q: Value) -> Value {
        lock(&self.shared.inner)
            .db
            .query(&q)
            .unwrap_or_else(|e| panic!("query failed: {}", e.message))
    }

    /// The full content of the stream with `client_id` (flushed and buffered), if any.
    pub fn stream_content(&self, client_id: &str) -> Option<Vec<u8>> {
        let g = lock(&self.shared.inner);
        let id = g.by_client.get(client_id)?;
        g.streams.get(id).map(|s| s.data.clone())
    }

    /// Number of file parts the stream with `client_id` was flushed to.
    pub fn stream_parts(&self, client_id: &str) -> usize {
        let g = lock(&self.shared.inner);
        g.by_client
            .get(client_id)
            .and_then(|id| g.streams.get(id))
            .map_or(0, |s| s.parts.len())
    }
}

fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": kind, "message": message})
}

fn bad_request(kind: &str, message: &str) -> Response {
    let body = if kind == "validation-failed" {
        // The server's shape: a summary naming the input, the reasons in `hint.errors`.
        json!({"type": kind, "message": format!("Validation failed for tx-step: {message}"),
            "hint": {"data-type": "tx-step", "errors": [{"message": message}]}})
    } else {
        error_body(kind, message)
    };
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// Logging, faults, latency and the admin auth check, in front of every route.
async fn front(State(sh): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let parsed: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let ops = match path.as_str() {
        "/admin/transact" => parsed["steps"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x[0].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        "/admin/sse/push" => parsed["messages"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x["op"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        "/admin/query" => parsed["query"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
        _ => vec![],
    };
    lock(&sh.log).push(RecordedRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        ops,
        body: parsed.clone(),
    });
    let (latency, fault) = {
        let mut f = lock(&sh.faults);
        let fault = if !f.raw.is_empty() {
            let (s, b) = f.raw.remove(0);
            Some(
                (
                    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    [("content-type", "text/plain")],
                    b,
                )
                    .into_response(),
            )
        } else if !f.rate_limit.is_empty() {
            let d = f.rate_limit.remove(0);
            Some(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", d.as_secs().to_string())],
                    Json(error_body("rate-limited", "too many requests")),
                )
                    .into_response(),
            )
        } else if !f.fail.is_empty() {
            let s = f.fail.remove(0);
            Some(
                (
                    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    Json(error_body("server-error", "injected failure")),
                )
                    .into_response(),
            )
        } else {
            None
        };
        (f.latency, fault)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(r) = fault {
        return r;
    }
    let needs_auth = path.starts_with("/admin/") && path != "/admin/sse/push";
    if needs_auth {
        let h = &parts.headers;
        let header = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let bearer = header("authorization")
            .strip_prefix("Bearer ")
            .unwrap_or_default();
        if header("app-id") != sh.app_id || bearer != sh.admin_token {
            return bad_request("record-not-found", "Record not found: app-admin-token");
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn query(State(sh): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("param-malformed", "body is not JSON");
    };
    let Some(q) = v.get("query") else {
        return bad_request("param-missing", "missing query");
    };
    match lock(&sh.inner).db.query(q) {
        Ok(r) => Json(r).into_response(),
        Err(e) => bad_request(e.kind, &e.message),
    }
}

async fn transact(State(sh): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("param-malformed", "body is not JSON");
    };
    let Some(steps) = v.get("steps").and_then(Value::as_array) else {
        return bad_request("param-missing", "missing steps");
    };
    let mut g = lock(&sh.inner);
    match g.db.transact(steps) {
        Ok((tx, touched)) => {
            for (ns, id) in touched {
                if ns == "$streams" {
                    sync_stream_from_entity(&mut g, &sh.base_url, &id);
                }
            }
            Json(json!({"tx-id": tx})).into_response()
        }
        Err(e) => bad_request(e.kind, &e.message),
    }
}

/// A `$streams` entity changed through transact (an admin marking it done): apply to the stream.
fn sync_stream_from_entity(g: &mut Inner, base: &str, id: &str) {
    let Some(attrs) = g.db.get("$streams", id).cloned() else {
        return;
    };
    let done = attrs.get("done").and_then(Value::as_bool).unwrap_or(false);
    let Some(s) = g.streams.get_mut(id) else {
        return;
    };
    if done && !s.done {
        s.done = true;
        s.abort_reason = attrs
            .get("abortReason")
            .and_then(Value::as_str)
            .map(String::from);
        let sid = s.id.clone();
        flush(g, base, &sid);
        notify_done(g, &sid);
    }
}

async fn file(State(sh): State<Arc<Shared>>, Path(path): Path<String>) -> Response {
    match lock(&sh.inner).files.get(&path) {
        Some(b) => ([("content-type", "application/octet-stream")], b.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

/// The SSE body: ends the session when the client goes away.
struct SessionStream {
    rx: mpsc::UnboundedReceiver<Value>,
    shared: Arc<Shared>,
    session_id: String,
    /// The server's first event carries a `retry:` line.
    started: bool,
}

/// Every server message carries a `trace-id`, as the real server's do.
fn with_trace_id(mut v: Value) -> Value {
    match &mut v {
        Value::Array(a) => a.iter_mut().for_each(|m| {
            m["trace-id"] = json!(uuid::Uuid::new_v4().to_string());
        }),
        Value::Object(m) => {
            m.insert("trace-id".into(), json!(uuid::Uuid::new_v4().to_string()));
        }
        _ => {}
    }
    v
}

impl Stream for SessionStream {
    type Item = Result<Event, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.rx.poll_recv(cx);
        polled.map(|o| {
            o.map(|v| {
                let mut event = Event::default();
                if !std::mem::replace(&mut self.started, true) {
                    event = event.retry(Duration::from_millis(1000));
                }
                Ok(event.data(with_trace_id(v).to_string()))
            })
        })
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        let mut g = lock(&self.shared.inner);
        end_session(&mut g, &self.session_id);
    }
}

fn end_session(g: &mut Inner, session_id: &str) {
    if g.sessions.remove(session_id).is_none() {
        return;
    }
    for s in g.streams.values_mut() {
        if s.owner.as_deref() == Some(session_id) {
            s.owner = None;
            if !s.done {
                // Strict contract: bytes the server had not flushed are gone with the session.
                s.data.truncate(s.flushed);
            }
        }
    }
}

async fn sse_open(State(sh): State<Arc<Shared>>, _body: axum::body::Bytes) -> Response {
    let (tx, rx) = mpsc::unbounded_channel();
    let session_id = uuid::Uuid::new_v4().to_string();
    let machine_id = uuid::Uuid::new_v4().to_string();
    let sse_token = uuid::Uuid::new_v4().to_string();
    let _ = tx.send(json!({
        "op": "sse-init",
        "machine-id": machine_id,
        "session-id": session_id,
        "sse-token": sse_token,
    }));
    lock(&sh.inner).sessions.insert(
        session_id.clone(),
        Session {
            sse_token,
            machine_id,
            tx,
            subs: HashMap::new(),
        },
    );
    let stream = SessionStream {
        rx,
        shared: sh.clone(),
        session_id,
        started: false,
    };
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response()
}

fn send(g: &Inner, session: &str, msgs: Vec<Value>) {
    if let Some(s) = g.sessions.get(session) {
        match msgs.len() {
            0 => {}
            1 => {
                let _ = s.tx.send(msgs.into_iter().next().unwrap_or_default());
            }
            // Several messages of one push go out as one JSON array, as the server does.
            _ => {
                let _ = s.tx.send(Value::Array(msgs));
            }
        }
    }
}

fn error_msg(event_id: &Value, original: &Value, message: &str) -> Value {
    json!({
        "op": "error",
        "client-event-id": event_id,
        "original-event": original,
        "message": message,
        "type": "validation-failed",
        "status": 400,
    })
}

async fn sse_push(
    State(sh): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    _headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if q.get("app_id") != Some(&sh.app_id) {
        return bad_request("param-missing", "missing app_id");
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("param-malformed", "body is not JSON");
    };
    let session_id = v["session_id"].as_str().unwrap_or_default().to_string();
    let mut g = lock(&sh.inner);
    let valid = g.sessions.get(&session_id).is_some_and(|s| {
        Some(s.sse_token.as_str()) == v["sse_token"].as_str()
            && Some(s.machine_id.as_str()) == v["machine_id"].as_str()
    });
    if !valid {
        return bad_request("session-missing", "no such SSE session");
    }
    let mut out: Vec<Value> = Vec::new();
    for msg in v["messages"].as_array().cloned().unwrap_or_default() {
        handle_message(&mut g, &sh.base_url, &session_id, &msg, &mut out);
    }
    send(&g, &session_id, out);
    Json(json!({})).into_response()
}

fn handle_message(g: &mut Inner, base: &str, session: &str, msg: &Value, out: &mut Vec<Value>) {
    let event_id = msg["client-event-id"].clone();
    let op = msg["op"].as_str().unwrap_or_default();
    if let Some(i) = g.stream_op_errors.iter().position(|(o, _)| o == op) {
        let (_, m) = g.stream_op_errors.remove(i);
        out.push(error_msg(&event_id, msg, &m));
        return;
    }
    match msg["op"].as_str().unwrap_or_default() {
        "start-stream" => {
            let (Some(client_id), Some(token)) =
                (msg["client-id"].as_str(), msg["reconnect-token"].as_str())
            else {
                out.push(error_msg(
                    &event_id,
                    msg,
                    "client-id and reconnect-token are required",
                ));
                return;
            };
            if let Some(sid) = g.by_client.get(client_id).cloned() {
                let s = g.streams.get_mut(&sid).expect("indexed stream");
                if s.reconnect_token != token {
                    out.push(error_msg(&event_id, msg, "Reconnect token is invalid"));
                    return;
                }
                let old = s.owner.replace(session.to_string());
                if !s.done {
                    s.data.truncate(s.flushed);
                }
                let offset = s.data.len();
                if let Some(old) = old.filter(|o| o != session) {
                    send(
                        g,
                        &old,
                        vec![
                            json!({"op": "error", "stream-id": sid, "message": "another session took over the stream"}),
                        ],
                    );
                }
                out.push(json!({
                    "op": "start-stream-ok", "client-event-id": event_id,
                    "stream-id": sid, "client-id": client_id, "offset": offset,
                }));
            } else {
                let sid = uuid::Uuid::new_v4().to_string();
                g.streams.insert(
                    sid.clone(),
                    StreamState {
                        id: sid.clone(),
                        client_id: client_id.to_string(),
                        reconnect_token: token.to_string(),
                        data: Vec::new(),
                        flushed: 0,
                        parts: Vec::new(),
                        owner: Some(session.to_string()),
                        done: false,
                        abort_reason: None,
                    },
                );
                g.by_client.insert(client_id.to_string(), sid.clone());
                let mut attrs = Map::new();
                attrs.insert("clientId".into(), json!(client_id));
                attrs.insert("done".into(), json!(false));
                attrs.insert("size".into(), json!(0));
                g.db.put("$streams", &sid, attrs);
                out.push(json!({
                    "op": "start-stream-ok", "client-event-id": event_id,
                    "stream-id": sid, "client-id": client_id, "offset": 0,
                }));
                start_pending_subs(g, base, &sid);
            }
        }
        "append-stream" => {
            let sid = msg["stream-id"].as_str().unwrap_or_default().to_string();
            let Some(s) = g.streams.get_mut(&sid) else {
                out.push(error_msg(&event_id, msg, "Stream not found"));
                return;
            };
            if s.owner.as_deref() != Some(session) || s.done {
                out.push(json!({"op": "append-failed", "stream-id": sid}));
                return;
            }
            let offset = msg["offset"].as_u64().unwrap_or(u64::MAX);
            if offset != s.data.len() as u64 {
                out.push(json!({"op": "append-failed", "stream-id": sid}));
                return;
            }
            let start = s.data.len();
            for c in msg["chunks"].as_array().into_iter().flatten() {
                s.data
                    .extend_from_slice(c.as_str().unwrap_or_default().as_bytes());
            }
            let done = msg["done"].as_bool().unwrap_or(false);
            if done {
                s.done = true;
                s.abort_reason = msg["abort-reason"].as_str().map(String::from);
            }
            let content = String::from_utf8_lossy(&s.data[start..]).into_owned();
            let needs_flush = done || s.data.len() - s.flushed >= g.flush_limit;
            if !content.is_empty() {
                notify_append(g, &sid, start, &content);
            }
            if needs_flush {
                flush(g, base, &sid);
                let s = &g.streams[&sid];
                out.push(json!({
                    "op": "stream-flushed", "stream-id": sid,
                    "offset": s.flushed, "done": s.done,
                }));
            }
            if done {
                notify_done(g, &sid);
            }
        }
        "subscribe-stream" => {
            let sub = Sub {
                client_id: msg["client-id"].as_str().map(String::from),
                stream_id: msg["stream-id"].as_str().map(String::from),
                offset: msg["offset"].as_u64().unwrap_or(0),
                started: false,
            };
            if sub.client_id.is_none() && sub.stream_id.is_none() {
                out.push(error_msg(
                    &event_id,
                    msg,
                    "client-id or stream-id is required",
                ));
                return;
            }
            let Some(key) = event_id.as_str().map(String::from) else {
                out.push(error_msg(&event_id, msg, "client-event-id is required"));
                return;
            };
            let sid = sub.stream_id.clone().or_else(|| {
                sub.client_id
                    .as_ref()
                    .and_then(|c| g.by_client.get(c).cloned())
            });
            if let Some(sess) = g.sessions.get_mut(session) {
                sess.subs.insert(key.clone(), sub);
            }
            if let Some(sid) = sid.filter(|s| g.streams.contains_key(s)) {
                let msgs = initial_messages(g, base, session, &key, &sid);
                match (g.spread_answers, g.sessions.get(session)) {
                    (Some(gap), Some(sess)) => {
                        let tx = sess.tx.clone();
                        let msgs: Vec<Value> = msgs.into_iter().flat_map(spread).collect();
                        tokio::spawn(async move {
                            for m in msgs {
                                tokio::time::sleep(gap).await;
                                let _ = tx.send(m);
                            }
                        });
                    }
                    _ => out.extend(msgs),
                }
            }
        }
        "unsubscribe-stream" => {
            let key = msg["subscribe-event-id"].as_str().unwrap_or_default();
            if let Some(sess) = g.sessions.get_mut(session) {
                sess.subs.remove(key);
            }
        }
        other => out.push(error_msg(&event_id, msg, &format!("unknown op {other:?}"))),
    }
}

fn file_url(base: &str, path: &str) -> String {
    format!("{base}/emulator/files/{path}")
}

/// What a new subscriber gets: flushed parts from its offset on, the buffer, and `done`.
fn initial_messages(g: &mut Inner, base: &str, session: &str, key: &str, sid: &str) -> Vec<Value> {
    let Some(sub) = g
        .sessions
        .get_mut(session)
        .and_then(|s| s.subs.get_mut(key))
    else {
        return vec![];
    };
    sub.started = true;
    sub.stream_id = Some(sid.to_string());
    let want = sub.offset as usize;
    let s = &g.streams[sid];
    let parts: Vec<&(usize, usize, String)> = s
        .parts
        .iter()
        .filter(|(st, len, _)| st + len > want)
        .collect();
    let mut msg = json!({
        "op": "stream-append", "client-event-id": key,
        "stream-id": sid, "client-id": s.client_id,
    });
    let start = parts
        .first()
        .map_or(want.max(s.flushed).min(s.data.len()), |p| p.0);
    msg["offset"] = json!(start);
    if !parts.is_empty() {
        msg["files"] = Value::Array(
            parts
                .iter()
                .map(|(_, len, path)| json!({"url": file_url(base, path), "size": len}))
                .collect(),
        );
    }
    let from = want.max(s.flushed).min(s.data.len());
    if !s.done {
        msg["content"] = json!(String::from_utf8_lossy(&s.data[from..]));
    }
    let mut v = vec![msg];
    if s.done {
        let mut d = json!({"op": "stream-append", "client-event-id": key, "stream-id": sid,
            "client-id": s.client_id, "done": true});
        if let Some(r) = &s.abort_reason {
            d["abort-reason"] = json!(r);
        }
        v.push(d);
    }
    v
}

/// One `stream-append` per file part of `m`, then one for its buffered content.
fn spread(m: Value) -> Vec<Value> {
    let files = m["files"].as_array().cloned().unwrap_or_default();
    let Some(mut offset) = m["offset"].as_u64().filter(|_| !files.is_empty()) else {
        return vec![m];
    };
    let mut out = Vec::new();
    for f in files {
        let mut part = m.clone();
        if let Some(o) = part.as_object_mut() {
            o.remove("content");
        }
        part["offset"] = json!(offset);
        offset += f["size"].as_u64().unwrap_or(0);
        part["files"] = json!([f]);
        out.push(part);
    }
    if m.get("content").is_some() {
        let mut rest = m.clone();
        if let Some(o) = rest.as_object_mut() {
            o.remove("files");
        }
        rest["offset"] = json!(offset);
        out.push(rest);
    }
    out
}

fn start_pending_subs(g: &mut Inner, base: &str, sid: &str) {
    let client = g.streams[sid].client_id.clone();
    let pending: Vec<(String, String)> = g
        .sessions
        .iter()
        .flat_map(|(sess, s)| {
            s.subs
                .iter()
                .filter(|(_, sub)| !sub.started && sub.client_id.as_deref() == Some(&client))
                .map(|(k, _)| (sess.clone(), k.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    for (sess, key) in pending {
        let msgs = initial_messages(g, base, &sess, &key, sid);
        send(g, &sess, msgs);
    }
}

fn subscribers(g: &Inner, sid: &str) -> Vec<(String, String)> {
    g.sessions
        .iter()
        .flat_map(|(sess, s)| {
            s.subs
                .iter()
                .filter(|(_, sub)| sub.started && sub.stream_id.as_deref() == Some(sid))
                .map(|(k, _)| (sess.clone(), k.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn notify_append(g: &Inner, sid: &str, offset: usize, content: &str) {
    let client = &g.streams[sid].client_id;
    for (sess, key) in subscribers(g, sid) {
        send(
            g,
            &sess,
            vec![
                json!({"op": "stream-append", "client-event-id": key, "stream-id": sid,
                "client-id": client, "offset": offset, "content": content}),
            ],
        );
    }
}

fn notify_done(g: &Inner, sid: &str) {
    let s = &g.streams[sid];
    for (sess, key) in subscribers(g, sid) {
        let mut d = json!({"op": "stream-append", "client-event-id": key, "stream-id": sid,
            "client-id": s.client_id, "done": true});
        if let Some(r) = &s.abort_reason {
            d["abort-reason"] = json!(r);
        }
        send(g, &sess, vec![d]);
    }
}

/// Writes the unflushed buffer to a new file part and updates the `$streams` entity.
fn flush(g: &mut Inner, _base: &str, sid: &str) {
    let Some(s) = g.streams.get_mut(sid) else {
        return;
    };
    if s.data.len() > s.flushed {
        let path = format!("$stream/{}/{}", s.id, s.parts.len());
        let bytes = s.data[s.flushed..].to_vec();
        s.parts.push((s.flushed, bytes.len(), path.clone()));
        s.flushed = s.data.len();
        g.files.insert(path, bytes);
    }
    let s = &g.streams[sid];
    let mut attrs = Map::new();
    attrs.insert("size".into(), json!(s.flushed));
    attrs.insert("done".into(), json!(s.done));
    if let Some(r) = &s.abort_reason {
        attrs.insert("abortReason".into(), json!(r));
    }
    let id = s.id.clone();
    g.db.put("$streams", &id, attrs);
}
