//! Wire calls of the InstantDB admin API: query, transact, the SSE session and file parts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sandbox_core::{Idempotency, Result};
use serde_json::{json, Value};

use crate::config::InstantConfig;
use crate::error::{from_body, InstantError, Op};

/// Admin SDK version we present ourselves as (the wire format we follow).
const SDK_VERSION: &str = "v1.0.67";

/// A cheap-to-clone client of one app.
#[derive(Clone, Debug)]
pub(crate) struct InstantClient {
    http: reqwest::Client,
    pub(crate) config: Arc<InstantConfig>,
}

/// Limit of a whole admin call (query, transact, push).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit of connecting; the SSE session itself has no end.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit of fetching one flushed part of a stream.
const FILE_TIMEOUT: Duration = Duration::from_secs(120);

/// `limit` is the timeout that applied, reported when it is what failed.
fn transport(e: reqwest::Error, limit: Duration) -> InstantError {
    // reqwest messages name the URL, which holds no credential (the token is a header).
    InstantError::Transport {
        connect: e.is_connect(),
        timeout: e.is_timeout(),
        limit,
        message: e.to_string(),
    }
}

fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    h.get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

impl InstantClient {
    pub(crate) fn new(config: InstantConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| {
                sandbox_core::Error::store(
                    crate::INSTANT,
                    format!("cannot build the HTTP client: {e}"),
                )
            })?;
        Ok(InstantClient {
            http,
            config: Arc::new(config),
        })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}{path}?app_id={}",
            self.config.api_uri, self.config.app_id
        )
    }

    fn admin(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.header("content-type", "application/json")
            .header("app-id", &self.config.app_id)
            .bearer_auth(self.config.admin_token())
    }

    async fn post_json(&self, path: &str, body: &Value) -> Result<Value, InstantError> {
        let rb = self
            .admin(self.http.post(self.url(path)))
            .header("Instant-Admin-Version", SDK_VERSION)
            .header("Instant-Core-Version", SDK_VERSION)
            .timeout(CALL_TIMEOUT)
            .body(body.to_string());
        let resp = rb.send().await.map_err(|e| transport(e, CALL_TIMEOUT))?;
        let status = resp.status().as_u16();
        let ra = retry_after(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| transport(e, CALL_TIMEOUT))?;
        if status != 200 {
            return Err(from_body(status, &bytes, ra));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            InstantError::Malformed(format!("HTTP 200 with a body that is not JSON ({e})"))
        })
    }

    /// `POST /admin/query`; retried like any read.
    pub(crate) async fn query(&self, q: Value) -> Result<Value> {
        let body = json!({ "query": q, "inference?": false });
        self.config
            .retry
            .run(Idempotency::Idempotent, || async {
                let v = self
                    .post_json("/admin/query", &body)
                    .await
                    .map_err(|e| e.into_core(&Op::Query))?;
                if !v.is_object() {
                    return Err(
                        InstantError::Malformed("query result is not an object".into())
                            .into_core(&Op::Query),
                    );
                }
                Ok(v)
            })
            .await
    }

    /// `POST /admin/transact`; `op` gives failures their meaning. Retried on 429/5xx and
    /// connection failures, where the server applied nothing.
    pub(crate) async fn transact(&self, steps: Vec<Value>, op: Op) -> Result<u64> {
        let body = json!({ "steps": steps, "throw-on-missing-attrs?": false });
        self.config
            .retry
            .run(Idempotency::NonIdempotent, || async {
                let v = self
                    .post_json("/admin/transact", &body)
                    .await
                    .map_err(|e| e.into_core(&op))?;
                v.get("tx-id").and_then(Value::as_u64).ok_or_else(|| {
                    InstantError::Malformed(format!("transact answer without tx-id: {v}"))
                        .into_core(&op)
                })
            })
            .await
    }

    /// `POST /admin/sse`: the response whose body is the event stream.
    pub(crate) async fn sse_open(&self) -> Result<reqwest::Response, InstantError> {
        let body = json!({
            "inference?": false,
            "versions": {"@instantdb/admin": SDK_VERSION, "@instantdb/core": SDK_VERSION},
        });
        let resp = self
            .admin(self.http.post(self.url("/admin/sse")))
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| transport(e, CONNECT_TIMEOUT))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let ra = retry_after(resp.headers());
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(from_body(status, &bytes, ra));
        }
        Ok(resp)
    }

    /// `POST /admin/sse/push`: no auth headers, the session's token is the credential.
    pub(crate) async fn sse_push(&self, body: &Value) -> Result<(), InstantError> {
        let resp = self
            .http
            .post(self.url("/admin/sse/push"))
            .header("content-type", "application/json")
            .timeout(CALL_TIMEOUT)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| transport(e, CALL_TIMEOUT))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let ra = retry_after(resp.headers());
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(from_body(status, &bytes, ra));
        }
        Ok(())
    }

    /// Fetches a flushed file part. No admin headers: the URL is its own credential and may
    /// point at another host, so neither the URL nor the answer's body (storage services echo
    /// the signature in some errors) goes into an error.
    pub(crate) async fn get_file(&self, url: &str) -> Result<Bytes, InstantError> {
        let resp = self
            .http
            .get(url)
            .timeout(FILE_TIMEOUT)
            .send()
            .await
            .map_err(|e| transport(e.without_url(), FILE_TIMEOUT))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(InstantError::Http {
                status,
                kind: None,
                message: "fetching a flushed part of the stream failed".into(),
                retry_after: retry_after(resp.headers()),
            });
        }
        resp.bytes()
            .await
            .map_err(|e| transport(e.without_url(), FILE_TIMEOUT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNATURE: &str = "X-Amz-Signature=5ec2e7";

    #[tokio::test]
    async fn failed_file_part_fetches_never_show_the_presigned_url() {
        let token = "c1d2e3f4-0000-4000-8000-00000000beef";
        let emu = sandbox_testkit::instant::InstantEmulator::start("app", token).await;
        let config = InstantConfig::new("app", token, &emu.base_url()).unwrap();
        let client = InstantClient::new(config).unwrap();
        let op = Op::Stream("sandbox-process:p".into());

        emu.respond_raw_next(
            403,
            &format!("<Error>SignatureDoesNotMatch {SIGNATURE}</Error>"),
        );
        let url = format!("{}/emulator/files/part?{SIGNATURE}", emu.base_url());
        let e = client.get_file(&url).await.unwrap_err().into_core(&op);
        assert!(e.to_string().contains("403"), "{e}");
        assert!(!format!("{e} {e:?}").contains(SIGNATURE), "{e:?}");

        // Nothing listens on port 1 of the loopback address.
        let url = format!("http://127.0.0.1:1/part?{SIGNATURE}");
        let e = client.get_file(&url).await.unwrap_err().into_core(&op);
        assert!(!format!("{e} {e:?}").contains(SIGNATURE), "{e:?}");
    }
}
