//! The one place where InstantDB failures become [`sandbox_core::Error`].
//!
//! Messages are built from the server's `type`/`message`, the operation and identifiers; the
//! admin token is only ever in a request header, so it cannot reach an error.

use std::time::Duration;

use sandbox_core::{Error, Missing};

use crate::INSTANT;

/// A failure as seen on the wire, before it is given a category.
#[derive(Debug)]
pub(crate) enum InstantError {
    /// A non-200 answer, with the body's `type` and `message` when it was JSON.
    Http {
        status: u16,
        kind: Option<String>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The request did not complete.
    Transport {
        connect: bool,
        timeout: bool,
        /// The timeout that applied.
        limit: Duration,
        message: String,
    },
    /// A 200 answer whose body is not what the protocol says.
    Malformed(String),
    /// An `error` message on the SSE channel.
    Channel { message: String },
    /// The SSE session ended or was refused while we waited on it.
    SessionLost(String),
    /// No answer on the SSE channel in time.
    NoAnswer { waited: Duration, what: String },
}

/// What was being done, so the same wire failure can mean different things.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// A read.
    Query,
    /// A transact creating an entity: "exists" means conflict.
    Insert(Missing, String),
    /// A transact with `upsert: false`: "doesn't exist" means not found.
    Patch(Missing, String),
    /// Another transact.
    Transact,
    /// Stream traffic of a log (client id).
    Stream(String),
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Query => "query".into(),
            Op::Insert(_, id) => format!("insert {id}"),
            Op::Patch(_, id) => format!("update {id}"),
            Op::Transact => "transact".into(),
            Op::Stream(c) => format!("stream {c}"),
        }
    }
}

fn noun(what: Missing) -> &'static str {
    match what {
        Missing::Sandbox => "sandbox",
        Missing::Process => "sandbox_process",
        _ => "record",
    }
}

impl InstantError {
    /// Maps into the core error with the operation's context.
    pub(crate) fn into_core(self, op: &Op) -> Error {
        let ctx = op.describe();
        match self {
            InstantError::Http {
                status,
                kind,
                message,
                retry_after,
            } => {
                let kind_s = kind.as_deref().unwrap_or("");
                let lower = message.to_ascii_lowercase();
                match (status, kind_s) {
                    (400, "record-not-found") => Error::Unauthorized {
                        provider: INSTANT.into(),
                        message: format!(
                            "the server rejected the app id / admin token pair (HTTP 400 record-not-found) during {ctx}; check INSTANT_APP_ID and INSTANT_APP_ADMIN_TOKEN"
                        ),
                    },
                    (400, "validation-failed") if lower.contains("exist") => match op {
                        Op::Insert(what, id) if !lower.contains("don't exist") => Error::Conflict {
                            code: format!("{}_exists", noun(*what)),
                            message: format!("{} {id} already exists", noun(*what)),
                        },
                        Op::Patch(what, id) => Error::not_found(*what, id.clone()),
                        _ => store(status, kind_s, &message, &ctx),
                    },
                    (401 | 403, _) => Error::Unauthorized {
                        provider: INSTANT.into(),
                        message: format!("HTTP {status} during {ctx}: {message}"),
                    },
                    (429, _) => Error::RateLimited {
                        provider: INSTANT.into(),
                        retry_after,
                        message: format!("{ctx}: {message}"),
                    },
                    (500..=599, _) => Error::Transient {
                        provider: INSTANT.into(),
                        message: format!("HTTP {status} during {ctx}: {message}"),
                    },
                    _ => store(status, kind_s, &message, &ctx),
                }
            }
            InstantError::Transport {
                connect,
                timeout,
                limit,
                message,
            } => {
                if timeout {
                    Error::Timeout {
                        operation: format!("{INSTANT} {ctx}"),
                        elapsed: limit,
                    }
                } else if connect {
                    Error::Transient {
                        provider: INSTANT.into(),
                        message: format!("cannot connect during {ctx}: {message}"),
                    }
                } else {
                    Error::Store {
                        store: INSTANT.into(),
                        message: format!("connection failed during {ctx}: {message}"),
                        // A read can be repeated; a write may have been applied.
                        retryable: matches!(op, Op::Query | Op::Stream(_)),
                    }
                }
            }
            InstantError::Malformed(m) => Error::protocol(
                "instant_response_invalid",
                format!("{INSTANT}: unexpected answer during {ctx}: {m}"),
            ),
            InstantError::Channel { message } => Error::Store {
                store: INSTANT.into(),
                message: format!("{ctx}: server error on the stream channel: {message}"),
                retryable: false,
            },
            InstantError::SessionLost(m) => Error::Store {
                store: INSTANT.into(),
                message: format!("{ctx}: stream session lost: {m}"),
                retryable: true,
            },
            InstantError::NoAnswer { waited, what } => Error::Timeout {
                operation: format!("{INSTANT} {ctx}: waiting for {what}"),
                elapsed: waited,
            },
        }
    }
}

fn store(status: u16, kind: &str, message: &str, ctx: &str) -> Error {
    let kind = if kind.is_empty() {
        String::new()
    } else {
        format!(" {kind}")
    };
    Error::Store {
        store: INSTANT.into(),
        message: format!("HTTP {status}{kind} during {ctx}: {message}"),
        retryable: false,
    }
}

/// Reads an error body: `{"type","message"}` JSON, or the raw text for anything else.
pub(crate) fn from_body(status: u16, body: &[u8], retry_after: Option<Duration>) -> InstantError {
    let (kind, message) = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) if v.is_object() => {
            let mut message = v
                .get("message")
                .and_then(|t| t.as_str())
                .map(String::from)
                .unwrap_or_else(|| v.to_string());
            // Older servers say only "Validation failed for tx-step" and put the reason in
            // `hint.errors[].message`.
            for e in v["hint"]["errors"].as_array().into_iter().flatten() {
                if let Some(m) = e["message"].as_str().filter(|m| !message.contains(*m)) {
                    message.push_str(": ");
                    message.push_str(m);
                }
            }
            (
                v.get("type").and_then(|t| t.as_str()).map(String::from),
                message,
            )
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(300).collect();
            (
                None,
                if text.is_empty() {
                    "(empty body)".into()
                } else {
                    text
                },
            )
        }
    };
    InstantError::Http {
        status,
        kind,
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_conflicts_and_patch_misses_are_typed() {
        let e = from_body(
            400,
            br#"{"type":"validation-failed","message":"Creating entities that exist: x"}"#,
            None,
        )
        .into_core(&Op::Insert(Missing::Process, "p".into()));
        assert_eq!(e.code(), "sandbox_process_exists");
        let e = from_body(
            400,
            br#"{"type":"validation-failed","message":"Updating entities that don't exist"}"#,
            None,
        )
        .into_core(&Op::Patch(Missing::Sandbox, "s".into()));
        assert_eq!(e.code(), "sandbox_not_found");
    }

    #[test]
    fn a_timed_out_call_reports_the_limit_it_hit() {
        let e = InstantError::Transport {
            connect: false,
            timeout: true,
            limit: Duration::from_secs(60),
            message: "operation timed out".into(),
        }
        .into_core(&Op::Query);
        assert_eq!(e.code(), "timeout");
        assert!(e.to_string().contains("after 60000ms"), "{e}");
    }

    #[test]
    fn reasons_given_only_in_the_hint_are_read() {
        let body = br#"{"type":"validation-failed","message":"Validation failed for tx-step",
            "hint":{"data-type":"tx-step","errors":[{"message":"Creating entities that exist: 1"}]}}"#;
        let e = from_body(400, body, None).into_core(&Op::Insert(Missing::Sandbox, "s".into()));
        assert_eq!(e.code(), "sandbox_exists");
    }

    #[test]
    fn statuses_and_bodies_map_to_categories() {
        let e = from_body(
            400,
            br#"{"type":"record-not-found","message":"Record not found: app-admin-token"}"#,
            None,
        )
        .into_core(&Op::Query);
        assert_eq!(e.code(), "unauthorized");
        let e = from_body(429, b"{}", Some(Duration::from_secs(2))).into_core(&Op::Query);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        let e = from_body(503, b"<html>bad gateway</html>", None).into_core(&Op::Transact);
        assert!(e.is_retryable());
        assert!(e.to_string().contains("bad gateway"));
        let e = from_body(418, b"teapot", None).into_core(&Op::Query);
        assert_eq!(e.code(), "store_error");
        assert!(e.to_string().contains("418"));
    }
}
