//! The wire calls of the Sprites API: one method per endpoint, retries through the core
//! [`RetryPolicy`], every failure mapped by [`crate::error`].

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sandbox_core::{Error, Idempotency, Result, RetryPolicy};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::SpritesConfig;
use crate::error::{self, ErrorBody, Subject};

/// Timeout of a plain JSON request (the SDK's default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of a create, which may wait for capacity (the SDK's value).
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Timeout of a file transfer.
const FILE_TIMEOUT: Duration = Duration::from_secs(300);

/// A sprite as the API describes it (the fields this crate uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct SpriteInfo {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
}

/// Body of `POST /v1/sprites`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CreateSprite<'a> {
    pub name: &'a str,
    pub wait_for_capacity: bool,
    pub url_settings: UrlSettings<'a>,
}

/// `url_settings` on the wire.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UrlSettings<'a> {
    pub auth: &'a str,
}

/// One entry of `GET /v1/sprites/{name}/checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct CheckpointInfo {
    #[serde(alias = "checkpoint_id")]
    pub id: String,
    #[serde(default)]
    pub create_time: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// One entry of `GET /v1/sprites/{name}/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ExecSession {
    pub id: Value,
    #[serde(default)]
    pub is_active: Option<bool>,
}

/// One event of a checkpoint or restore NDJSON stream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ProgressEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
}

/// How a request may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryMode {
    /// Safe to repeat (GET, PUT of a whole file, DELETE, create by deterministic name).
    Idempotent,
    /// Retried only when the server refused to start it (429, or a 5xx before anything ran).
    NotIdempotent,
    /// Retried only on 429: a 5xx may have done the work (checkpoint creation).
    RateLimitOnly,
}

/// The WebSocket of an exec session.
pub(crate) type ExecSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// HTTP and WebSocket client of one Sprites API endpoint and token.
#[derive(Clone)]
pub(crate) struct SpritesClient {
    http: reqwest::Client,
    base_url: String,
    token: String,
    retry: RetryPolicy,
}

impl std::fmt::Debug for SpritesClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpritesClient")
            .field("base_url", &self.base_url)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl SpritesClient {
    pub fn new(config: &SpritesConfig, retry: RetryPolicy) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("sandbox-sprites/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                Error::provider(crate::SPRITES, format!("cannot build HTTP client: {e}"))
            })?;
        Ok(SpritesClient {
            http,
            base_url: config.base_url.clone(),
            token: config.token().to_string(),
            retry,
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Runs `op` under the retry policy, restricted by `mode`.
    async fn retrying<T, F, Fut>(&self, mode: RetryMode, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let idempotency = match mode {
            RetryMode::Idempotent => Idempotency::Idempotent,
            _ => Idempotency::NonIdempotent,
        };
        self.retry
            .run_if(
                idempotency,
                |err| mode != RetryMode::RateLimitOnly || matches!(err, Error::RateLimited { .. }),
                op,
            )
            .await
    }

    /// Sends one request; a non-2xx answer becomes an error.
    async fn send(
        &self,
        operation: &str,
        subject: Subject<'_>,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let resp = build()
            .send()
            .await
            .map_err(|e| error::from_transport(operation, sprite_of(subject), &e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.failure(operation, subject, resp).await)
    }

    async fn failure(&self, operation: &str, subject: Subject<'_>, resp: Response) -> Error {
        let status = resp.status().as_u16();
        let retry_after = error::retry_after(resp.headers());
        let body = resp.bytes().await.unwrap_or_default();
        error::from_status(
            operation,
            subject,
            status,
            &ErrorBody::parse(&body),
            retry_after,
        )
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        operation: &str,
        sprite: &str,
        resp: Response,
    ) -> Result<T> {
        let body = resp
            .bytes()
            .await
            .map_err(|e| error::from_transport(operation, sprite, &e))?;
        serde_json::from_slice(&body).map_err(|e| error::malformed(operation, sprite, e))
    }

    // ---- sprites -----------------------------------------------------------------------

    /// `GET /v1/sprites/{name}`.
    pub async fn get_sprite(&self, name: &str) -> Result<SpriteInfo> {
        let path = format!("/v1/sprites/{name}");
        self.retrying(RetryMode::Idempotent, || async {
            let resp = self
                .send("get sprite", Subject::Sprite(name), || {
                    self.request(Method::GET, &path)
                        .header("accept", "application/json")
                        .timeout(REQUEST_TIMEOUT)
                })
                .await?;
            Self::json("get sprite", name, resp).await
        })
        .await
    }

    /// `POST /v1/sprites`; an existing sprite of that name is looked up and returned.
    ///
    /// Creates are idempotent by name, so a retried create never makes two sprites.
    pub async fn create_sprite(&self, body: &CreateSprite<'_>) -> Result<SpriteInfo> {
        let name = body.name;
        let created = self
            .retrying(RetryMode::Idempotent, || async {
                let resp = self
                    .http
                    .post(self.url("/v1/sprites"))
                    .bearer_auth(&self.token)
                    .json(body)
                    .timeout(CREATE_TIMEOUT)
                    .send()
                    .await
                    .map_err(|e| error::from_transport("create sprite", name, &e))?;
                let status = resp.status();
                if status.is_success() {
                    // The sprite exists now whatever the body says: an unreadable answer is
                    // followed by a read of the sprite rather than an error that leaks it.
                    return match Self::json::<SpriteInfo>("create sprite", name, resp).await {
                        Ok(info) => Ok(Some(info)),
                        Err(e @ Error::Provider { .. }) => {
                            tracing::debug!(sprite = name, error = %e, "reading the sprite back");
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    };
                }
                let retry_after = error::retry_after(resp.headers());
                let bytes = resp.bytes().await.unwrap_or_default();
                let parsed = ErrorBody::parse(&bytes);
                let exists = status == StatusCode::CONFLICT
                    || (status == StatusCode::BAD_REQUEST && parsed.says_already_exists());
                if exists {
                    return Ok(None);
                }
                Err(error::from_status(
                    "create sprite",
                    Subject::Sprite(name),
                    status.as_u16(),
                    &parsed,
                    retry_after,
                ))
            })
            .await?;
        match created {
            Some(info) => Ok(info),
            None => self.get_sprite(name).await,
        }
    }

    /// `DELETE /v1/sprites/{name}`.
    pub async fn delete_sprite(&self, name: &str) -> Result<()> {
        let path = format!("/v1/sprites/{name}");
        self.retrying(RetryMode::Idempotent, || async {
            self.send("delete sprite", Subject::Sprite(name), || {
                self.request(Method::DELETE, &path).timeout(REQUEST_TIMEOUT)
            })
            .await
            .map(drop)
        })
        .await
    }

    // ---- files -------------------------------------------------------------------------

    /// `PUT /v1/sprites/{name}/fs/write?path=..&mkdirParents=true`: raw bytes, one request.
    pub async fn write_file(
        &self,
        name: &str,
        path: &str,
        content: &Bytes,
        mode: Option<u32>,
    ) -> Result<()> {
        let url = format!("/v1/sprites/{name}/fs/write");
        let mode = mode.map(|m| format!("{:04o}", m & 0o7777));
        self.retrying(RetryMode::Idempotent, || async {
            self.send("write file", Subject::File(name, path), || {
                let mut query: Vec<(&str, &str)> = vec![
                    ("path", path),
                    ("workingDir", "/"),
                    ("mkdirParents", "true"),
                ];
                if let Some(m) = &mode {
                    query.push(("mode", m));
                }
                self.request(Method::PUT, &url)
                    .query(&query)
                    .header("content-type", "application/octet-stream")
                    .body(content.clone())
                    .timeout(FILE_TIMEOUT)
            })
            .await
            .map(drop)
        })
        .await
    }

    /// `GET /v1/sprites/{name}/fs/read?path=..`: `None` when the file does not exist.
    pub async fn read_file(&self, name: &str, path: &str) -> Result<Option<Bytes>> {
        let url = format!("/v1/sprites/{name}/fs/read");
        self.retrying(RetryMode::Idempotent, || async {
            let resp = self
                .request(Method::GET, &url)
                .query(&[("path", path), ("workingDir", "/")])
                .timeout(FILE_TIMEOUT)
                .send()
                .await
                .map_err(|e| error::from_transport("read file", name, &e))?;
            let status = resp.status();
            if status.is_success() {
                return resp
                    .bytes()
                    .await
                    .map(Some)
                    .map_err(|e| error::from_transport("read file", name, &e));
            }
            let retry_after = error::retry_after(resp.headers());
            let bytes = resp.bytes().await.unwrap_or_default();
            let body = ErrorBody::parse(&bytes);
            // A 404 from the filesystem says ENOENT; a 404 without it is the sprite itself.
            if status == StatusCode::NOT_FOUND && body.is_enoent() {
                return Ok(None);
            }
            Err(error::from_status(
                "read file",
                Subject::Sprite(name),
                status.as_u16(),
                &body,
                retry_after,
            ))
        })
        .await
    }

    // ---- checkpoints -------------------------------------------------------------------

    /// `POST /v1/sprites/{name}/checkpoint`: the NDJSON progress events.
    pub async fn create_checkpoint(
        &self,
        name: &str,
        comment: Option<&str>,
    ) -> Result<Vec<ProgressEvent>> {
        let path = format!("/v1/sprites/{name}/checkpoint");
        let body = match comment {
            Some(c) => serde_json::json!({ "comment": c }),
            None => serde_json::json!({}),
        };
        self.retrying(RetryMode::RateLimitOnly, || async {
            let resp = self
                .send("create checkpoint", Subject::Sprite(name), || {
                    self.request(Method::POST, &path).json(&body)
                })
                .await?;
            read_progress("create checkpoint", name, resp).await
        })
        .await
    }

    /// `GET /v1/sprites/{name}/checkpoints` (a bare array; `{checkpoints: [...]}` accepted).
    pub async fn list_checkpoints(&self, name: &str) -> Result<Vec<CheckpointInfo>> {
        let path = format!("/v1/sprites/{name}/checkpoints");
        self.retrying(RetryMode::Idempotent, || async {
            let resp = self
                .send("list checkpoints", Subject::Sprite(name), || {
                    self.request(Method::GET, &path)
                        .header("accept", "application/json")
                        .timeout(REQUEST_TIMEOUT)
                })
                .await?;
            let v: Value = Self::json("list checkpoints", name, resp).await?;
            let list = match v {
                Value::Array(_) => v,
                Value::Object(mut m) => m.remove("checkpoints").unwrap_or(Value::Null),
                _ => Value::Null,
            };
            serde_json::from_value(list).map_err(|e| error::malformed("list checkpoints", name, e))
        })
        .await
    }

    /// `POST /v1/sprites/{name}/checkpoints/{id}/restore`: the NDJSON progress events.
    pub async fn restore_checkpoint(&self, name: &str, id: &str) -> Result<Vec<ProgressEvent>> {
        let path = format!(
            "/v1/sprites/{name}/checkpoints/{}/restore",
            url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
        );
        // Restoring the same checkpoint twice ends in the same state.
        self.retrying(RetryMode::Idempotent, || async {
            let resp = self
                .send("restore checkpoint", Subject::Checkpoint(name, id), || {
                    self.request(Method::POST, &path)
                })
                .await?;
            read_progress("restore checkpoint", name, resp).await
        })
        .await
    }

    // ---- exec --------------------------------------------------------------------------

    /// `GET /v1/sprites/{name}/exec`: the exec sessions (bare array or `{sessions: [...]}`).
    pub async fn list_exec_sessions(&self, name: &str) -> Result<Vec<ExecSession>> {
        let path = format!("/v1/sprites/{name}/exec");
        self.retrying(RetryMode::Idempotent, || async {
            let resp = self
                .send("list exec sessions", Subject::Sprite(name), || {
                    self.request(Method::GET, &path)
                        .header("accept", "application/json")
                        .timeout(REQUEST_TIMEOUT)
                })
                .await?;
            let v: Value = Self::json("list exec sessions", name, resp).await?;
            let list = match v {
                Value::Array(_) => v,
                Value::Object(mut m) => m.remove("sessions").unwrap_or(Value::Array(vec![])),
                _ => Value::Array(vec![]),
            };
            serde_json::from_value(list)
                .map_err(|e| error::malformed("list exec sessions", name, e))
        })
        .await
    }

    /// `POST /v1/sprites/{name}/exec/{session}/kill?signal=SIGKILL`.
    pub async fn kill_exec_session(&self, name: &str, session: &str) -> Result<()> {
        let path = format!("/v1/sprites/{name}/exec/{session}/kill");
        self.retrying(RetryMode::Idempotent, || async {
            let resp = self
                .send("kill exec session", Subject::Sprite(name), || {
                    self.request(Method::POST, &path)
                        .query(&[("signal", "SIGKILL"), ("timeout", "5s")])
                })
                .await?;
            // The NDJSON progress is read to its end so the kill has finished when we return.
            let _ = resp.bytes().await;
            Ok(())
        })
        .await
    }

    /// Opens `wss://…/v1/sprites/{name}/exec?cmd=..&path=..&dir=..&env=K=V[&stdin=true]`.
    ///
    /// Only the handshake is retried: a refused handshake ran nothing.
    pub async fn connect_exec(&self, name: &str, query: &[(&str, String)]) -> Result<ExecSocket> {
        let mut url = url::Url::parse(&self.url(&format!("/v1/sprites/{name}/exec")))
            .map_err(|e| Error::invalid("sprites_base_url_invalid", e.to_string()))?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme).map_err(|()| {
            Error::invalid("sprites_base_url_invalid", "cannot use as WebSocket URL")
        })?;
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        self.retrying(RetryMode::NotIdempotent, || async {
            let mut request = url
                .as_str()
                .into_client_request()
                .map_err(|e| error::from_websocket("exec", name, &e))?;
            let auth =
                format!("Bearer {}", self.token)
                    .parse()
                    .map_err(|_| Error::Unauthorized {
                        provider: crate::SPRITES.into(),
                        message: "the Sprites token is not a valid header value".into(),
                    })?;
            request.headers_mut().insert("authorization", auth);
            let (socket, _) =
                tokio::time::timeout(REQUEST_TIMEOUT, tokio_tungstenite::connect_async(request))
                    .await
                    .map_err(|_| Error::Timeout {
                        operation: format!("sprites exec handshake (sprite {name})"),
                        elapsed: REQUEST_TIMEOUT,
                    })?
                    .map_err(|e| error::from_websocket("exec", name, &e))?;
            Ok(socket)
        })
        .await
    }
}

fn sprite_of<'a>(subject: Subject<'a>) -> &'a str {
    match subject {
        Subject::Sprite(s) | Subject::File(s, _) | Subject::Checkpoint(s, _) => s,
    }
}

/// Reads an NDJSON progress stream to its end. An `error` event is an error even with HTTP
/// 200; a stream that ends without `complete` is an error too.
async fn read_progress(
    operation: &str,
    sprite: &str,
    resp: Response,
) -> Result<Vec<ProgressEvent>> {
    let body = resp
        .bytes()
        .await
        .map_err(|e| error::from_transport(operation, sprite, &e))?;
    parse_progress(operation, sprite, &body)
}

pub(crate) fn parse_progress(
    operation: &str,
    sprite: &str,
    body: &[u8],
) -> Result<Vec<ProgressEvent>> {
    let mut events = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let ev: ProgressEvent = serde_json::from_slice(line)
            .map_err(|e| error::malformed(operation, sprite, format!("NDJSON line: {e}")))?;
        if ev.kind == "error" {
            let msg = ev
                .error
                .as_ref()
                .or(ev.data.as_ref())
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_else(|| "unknown error".into());
            return Err(Error::Provider {
                provider: crate::SPRITES.into(),
                status: Some(200),
                message: format!("{operation} (sprite {sprite}) failed: {msg}"),
            });
        }
        let complete = ev.kind == "complete";
        events.push(ev);
        if complete {
            return Ok(events);
        }
    }
    Err(Error::Provider {
        provider: crate::SPRITES.into(),
        status: None,
        message: format!(
            "{operation} (sprite {sprite}): the progress stream ended without `complete`"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_needs_complete_and_fails_on_error_events() {
        let ok = b"{\"type\":\"info\",\"data\":\"Creating\"}\n{\"type\":\"complete\",\"data\":\"Checkpoint v8 created\"}\n";
        let evs = parse_progress("op", "s", ok).unwrap();
        assert_eq!(evs.last().unwrap().kind, "complete");

        let err = b"{\"type\":\"info\",\"data\":\"x\"}\n{\"type\":\"error\",\"error\":\"Checkpoint failed: disk full\"}\n";
        let e = parse_progress("op", "s", err).unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");

        let e = parse_progress("op", "s", b"{\"type\":\"info\",\"data\":\"x\"}\n").unwrap_err();
        assert!(e.to_string().contains("without `complete`"), "{e}");

        let e = parse_progress("op", "s", b"{\"type\":\"info\",\"da").unwrap_err();
        assert!(matches!(e, Error::Provider { .. }));
        assert!(e.to_string().contains("malformed"), "{e}");
    }
}
