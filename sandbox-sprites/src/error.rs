//! The one place where Sprites failures become [`sandbox_core::Error`].
//!
//! HTTP statuses go through [`Error::from_http_status`] (401/403 unauthorized, 409 conflict,
//! 413 too large, 429 rate limited with `Retry-After`, 5xx transient); 404 is refined here
//! into "sprite", "file" or "checkpoint" not found. The server's JSON `error`/`message` is kept
//! in the message, with the operation and the sprite it concerned. No credential is ever part
//! of a message: only names, statuses and response bodies are.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use sandbox_core::{Error, Missing};
use serde_json::Value;

use crate::SPRITES;

/// What a failed request was about, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subject<'a> {
    /// The sprite itself (create, get, delete, exec).
    Sprite(&'a str),
    /// A file inside the sprite.
    File(&'a str, &'a str),
    /// A checkpoint of the sprite.
    Checkpoint(&'a str, &'a str),
}

impl Subject<'_> {
    fn sprite(&self) -> &str {
        match self {
            Subject::Sprite(s) | Subject::File(s, _) | Subject::Checkpoint(s, _) => s,
        }
    }
}

/// The server's error body, JSON (`{"error", "message", "code"}`) or plain text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    /// `error`: a code (`already_exists`) or, on filesystem endpoints, the message.
    pub error: Option<String>,
    /// `message`.
    pub message: Option<String>,
    /// `code` of filesystem errors (`ENOENT`, `EISDIR`, ...).
    pub code: Option<String>,
    /// The body when it was not JSON.
    pub text: Option<String>,
}

impl ErrorBody {
    /// Parses a response body; never fails.
    pub fn parse(body: &[u8]) -> Self {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => {
                let s = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_string);
                ErrorBody {
                    error: s("error"),
                    message: s("message"),
                    code: s("code"),
                    text: None,
                }
            }
            _ => {
                let text = String::from_utf8_lossy(body).trim().to_string();
                ErrorBody {
                    text: (!text.is_empty()).then(|| truncate(&text, 500)),
                    ..Default::default()
                }
            }
        }
    }

    /// `error: message`, whichever parts the server sent.
    pub fn summary(&self, status: u16) -> String {
        let parts: Vec<&str> = [&self.error, &self.message, &self.text]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        if parts.is_empty() {
            format!("request failed with HTTP {status}")
        } else {
            parts.join(": ")
        }
    }

    /// Whether the server said the thing already exists (409 per Fly's guides, 400 per the
    /// generated API page).
    pub fn says_already_exists(&self) -> bool {
        [&self.error, &self.message, &self.text, &self.code]
            .into_iter()
            .flatten()
            .any(|s| {
                let s = s.to_ascii_lowercase();
                s.contains("already_exists") || s.contains("already exists") || s == "eexist"
            })
    }

    /// Whether a filesystem endpoint said the path does not exist.
    pub fn is_enoent(&self) -> bool {
        self.code.as_deref() == Some("ENOENT")
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `Retry-After` in seconds (fractions allowed); an HTTP date is ignored.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let secs: f64 = v.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// Maps a non-success HTTP response to an error.
pub(crate) fn from_status(
    operation: &str,
    subject: Subject<'_>,
    status: u16,
    body: &ErrorBody,
    retry_after: Option<Duration>,
) -> Error {
    let detail = body.summary(status);
    if status == 404 {
        // Filesystem endpoints say ENOENT for a missing path; any other 404 is the sprite (or
        // the checkpoint named) itself.
        return match subject {
            Subject::File(_, path) if body.is_enoent() => Error::NotFound {
                what: Missing::File,
                id: path.to_string(),
                hint: Some(format!("{operation}: {detail}")),
            },
            Subject::Checkpoint(sprite, id) => Error::NotFound {
                what: Missing::Checkpoint,
                id: id.to_string(),
                hint: Some(format!("sprite {sprite}: {detail}")),
            },
            _ => Error::NotFound {
                what: Missing::Sandbox,
                id: format!("sprite {}", subject.sprite()),
                hint: Some(format!("{operation}: {detail}")),
            },
        };
    }
    let message = format!("{operation} (sprite {}): {detail}", subject.sprite());
    Error::from_http_status(SPRITES, status, message, retry_after)
}

/// A transport failure (connect, reset, timeout) while doing `operation`.
pub(crate) fn from_transport(operation: &str, sprite: &str, e: &reqwest::Error) -> Error {
    // reqwest's Display may include the URL; it carries no credential (the token is a header).
    let what = format!("{operation} (sprite {sprite})");
    if e.is_timeout() {
        Error::Timeout {
            operation: format!("{SPRITES} {what}"),
            elapsed: Duration::ZERO,
        }
    } else if e.is_connect() || e.is_request() || e.is_body() {
        Error::Transient {
            provider: SPRITES.into(),
            message: format!("{what}: {}", source_chain(e)),
        }
    } else {
        Error::provider(SPRITES, format!("{what}: {}", source_chain(e)))
    }
}

/// A WebSocket failure during exec.
pub(crate) fn from_websocket(
    operation: &str,
    sprite: &str,
    e: &tokio_tungstenite::tungstenite::Error,
) -> Error {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let what = format!("{operation} (sprite {sprite})");
    match e {
        WsError::Http(resp) => {
            let body = ErrorBody::parse(resp.body().as_deref().unwrap_or_default());
            let ra = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
            from_status(
                operation,
                Subject::Sprite(sprite),
                resp.status().as_u16(),
                &body,
                ra,
            )
        }
        WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed => Error::Transient {
            provider: SPRITES.into(),
            message: format!("{what}: connection lost: {e}"),
        },
        WsError::Protocol(_) => Error::Transient {
            provider: SPRITES.into(),
            message: format!("{what}: connection lost: {e}"),
        },
        other => Error::provider(SPRITES, format!("{what}: {other}")),
    }
}

/// A response the protocol does not allow (malformed JSON, a truncated frame).
pub(crate) fn malformed(operation: &str, sprite: &str, what: impl std::fmt::Display) -> Error {
    Error::Provider {
        provider: SPRITES.into(),
        status: None,
        message: format!("{operation} (sprite {sprite}): malformed response: {what}"),
    }
}

fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_categories_with_the_server_message() {
        let body = ErrorBody::parse(br#"{"error":"bad_token","message":"token expired"}"#);
        let e = from_status("create", Subject::Sprite("s1"), 401, &body, None);
        assert!(matches!(e, Error::Unauthorized { .. }));
        assert!(e.to_string().contains("token expired"), "{e}");
        assert!(e.to_string().contains("s1"), "{e}");

        let e = from_status(
            "get",
            Subject::Sprite("s1"),
            404,
            &ErrorBody::default(),
            None,
        );
        assert_eq!(e.code(), "sandbox_not_found");
        let enoent = ErrorBody::parse(br#"{"error":"no such file","code":"ENOENT"}"#);
        let e = from_status("write", Subject::File("s1", "/a/b"), 404, &enoent, None);
        assert_eq!(e.code(), "sandbox_file_not_found");
        let e = from_status(
            "write",
            Subject::File("s1", "/a/b"),
            404,
            &ErrorBody::default(),
            None,
        );
        assert_eq!(
            e.code(),
            "sandbox_not_found",
            "a 404 without ENOENT is the sprite"
        );
        let e = from_status(
            "restore",
            Subject::Checkpoint("s1", "v9"),
            404,
            &ErrorBody::default(),
            None,
        );
        assert_eq!(e.code(), "checkpoint_not_found");
        let e = from_status(
            "create",
            Subject::Sprite("s"),
            409,
            &ErrorBody::default(),
            None,
        );
        assert!(matches!(e, Error::Conflict { .. }));
        let e = from_status(
            "write",
            Subject::Sprite("s"),
            413,
            &ErrorBody::default(),
            None,
        );
        assert_eq!(e.code(), "sandbox_input_too_large");
        let e = from_status(
            "x",
            Subject::Sprite("s"),
            429,
            &ErrorBody::default(),
            Some(Duration::from_secs(2)),
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        let e = from_status(
            "x",
            Subject::Sprite("s"),
            502,
            &ErrorBody::parse(b"bad gateway"),
            None,
        );
        assert!(e.is_retryable());
        assert!(e.to_string().contains("bad gateway"));
        let e = from_status("x", Subject::Sprite("s"), 400, &ErrorBody::default(), None);
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("HTTP 400"), "{e}");
    }

    #[test]
    fn error_bodies_are_read_whatever_their_shape() {
        assert!(ErrorBody::parse(br#"{"error":"already_exists"}"#).says_already_exists());
        assert!(ErrorBody::parse(b"sprite already exists").says_already_exists());
        assert!(!ErrorBody::parse(br#"{"error":"nope"}"#).says_already_exists());
        assert!(
            ErrorBody::parse(br#"{"error":"no such file","code":"ENOENT","path":"/x"}"#)
                .is_enoent()
        );
        assert_eq!(
            ErrorBody::parse(b"").summary(500),
            "request failed with HTTP 500"
        );
        assert_eq!(
            ErrorBody::parse(b"{not json").text.as_deref(),
            Some("{not json")
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_ignores_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(RETRY_AFTER, "0.5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }
}
