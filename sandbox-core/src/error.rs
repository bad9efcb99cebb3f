//! The one error type of the sandbox service.
//!
//! Every fallible operation in the workspace returns [`Error`]. Each variant is a category a
//! caller can act on, and each error has a stable snake_case [`Error::code`] that matches the
//! TypeScript package's error strings where one exists (`sandbox_not_active:<status>`,
//! `sandbox_process_not_found`, `checkpoint_not_supported`, ...).
//!
//! Messages carry the context needed to act (which sandbox, which provider, which HTTP status)
//! and never a credential: backends build them from response bodies and identifiers only.

use std::time::Duration;

/// Result alias used throughout the workspace.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of thing was not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Missing {
    /// A sandbox record (or the provider's sandbox behind it).
    Sandbox,
    /// A process record.
    Process,
    /// A process log.
    Log,
    /// A checkpoint.
    Checkpoint,
    /// A file inside a sandbox.
    File,
    /// A registered provider.
    Provider,
    /// A registered record store.
    Store,
}

impl Missing {
    fn code(self) -> &'static str {
        match self {
            Missing::Sandbox => "sandbox_not_found",
            Missing::Process => "sandbox_process_not_found",
            Missing::Log => "sandbox_process_stream_missing",
            Missing::Checkpoint => "checkpoint_not_found",
            Missing::File => "sandbox_file_not_found",
            Missing::Provider => "sandbox_provider_unknown",
            Missing::Store => "sandbox_store_unknown",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Missing::Sandbox => "sandbox",
            Missing::Process => "process",
            Missing::Log => "process log",
            Missing::Checkpoint => "checkpoint",
            Missing::File => "file",
            Missing::Provider => "provider",
            Missing::Store => "store",
        }
    }
}

/// Errors of the sandbox service, its providers and its stores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The thing named does not exist.
    #[error("{} not found: {id}{}", what.noun(), hint_suffix(hint))]
    NotFound {
        /// What kind of thing.
        what: Missing,
        /// Its id or name.
        id: String,
        /// What the caller can do (e.g. the registered names).
        hint: Option<String>,
    },

    /// The sandbox exists but its status does not allow the operation.
    #[error("sandbox {sandbox_id} is {status}, not active; create a new sandbox")]
    NotActive {
        /// The sandbox.
        sandbox_id: String,
        /// Its current status.
        status: String,
    },

    /// The caller's input was rejected before anything changed.
    #[error("{message}")]
    InvalidInput {
        /// Stable code, e.g. `sandbox_env_key_invalid:BAD-KEY`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },

    /// The provider cannot do this operation.
    #[error("provider {provider} does not support {operation}")]
    Unsupported {
        /// Provider name.
        provider: String,
        /// Operation name, e.g. `checkpoint`.
        operation: &'static str,
    },

    /// The credentials were missing, invalid or not allowed to do this.
    #[error("{provider}: unauthorized: {message}")]
    Unauthorized {
        /// Provider or store name.
        provider: String,
        /// What was refused and which variables to set; never the credential.
        message: String,
    },

    /// The remote side asked us to slow down.
    #[error("{provider}: rate limited{}: {message}", retry_after.map(|d| format!(" (retry after {}s)", d.as_secs_f64())).unwrap_or_default())]
    RateLimited {
        /// Provider or store name.
        provider: String,
        /// The server's `Retry-After`, when it gave one.
        retry_after: Option<Duration>,
        /// Server message.
        message: String,
    },

    /// A failure that may succeed when retried (5xx, connection reset, ...).
    #[error("{provider}: temporary failure: {message}")]
    Transient {
        /// Provider or store name.
        provider: String,
        /// What failed.
        message: String,
    },

    /// The provider failed in a way a retry will not fix.
    #[error("{provider}: {}{message}", status.map(|s| format!("HTTP {s}: ")).unwrap_or_default())]
    Provider {
        /// Provider name.
        provider: String,
        /// HTTP status, when there was one.
        status: Option<u16>,
        /// What failed, including the server's error message.
        message: String,
    },

    /// The thing already exists, or another writer holds it.
    #[error("{message}")]
    Conflict {
        /// Stable code, e.g. `sandbox_process_stream_writer_exists`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },

    /// The record store or stream sink failed.
    #[error("store {store}: {message}")]
    Store {
        /// Store name (`sqlite`, `memory`, `instant`, ...).
        store: String,
        /// What failed.
        message: String,
        /// Whether retrying may help (busy database, dropped connection).
        retryable: bool,
    },

    /// Data read back did not follow the protocol (a corrupt log line, a malformed response).
    #[error("{message}")]
    Protocol {
        /// Stable code, e.g. `invalid_sandbox_process_stream_chunk`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },

    /// The operation did not finish in time.
    #[error("{operation} timed out after {}ms", elapsed.as_millis())]
    Timeout {
        /// What timed out.
        operation: String,
        /// How long we waited.
        elapsed: Duration,
    },

    /// The command could not be started at all (missing executable, bad cwd, ...).
    #[error("command failed to start: {message}")]
    StartFailed {
        /// Why.
        message: String,
    },
}

fn hint_suffix(hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!(" ({h})"),
        None => String::new(),
    }
}

impl Error {
    /// A stable snake_case code, equal to the TypeScript package's string where one exists.
    pub fn code(&self) -> String {
        match self {
            Error::NotFound { what, .. } => what.code().to_string(),
            Error::NotActive { status, .. } => format!("sandbox_not_active:{status}"),
            Error::InvalidInput { code, .. }
            | Error::Conflict { code, .. }
            | Error::Protocol { code, .. } => code.clone(),
            Error::Unsupported { operation, .. } => match *operation {
                "checkpoint" | "list_checkpoints" | "restore" => "checkpoint_not_supported".into(),
                "port_url" => "sandbox_port_url_not_supported".into(),
                other => format!("{other}_not_supported"),
            },
            Error::Unauthorized { .. } => "unauthorized".into(),
            Error::RateLimited { .. } => "rate_limited".into(),
            Error::Transient { .. } => "transient".into(),
            Error::Provider { .. } => "provider_error".into(),
            Error::Store { .. } => "store_error".into(),
            Error::Timeout { .. } => "timeout".into(),
            Error::StartFailed { .. } => "command_failed_to_start".into(),
        }
    }

    /// Whether the same request may succeed when sent again.
    ///
    /// Timeouts count as retryable here; [`crate::RetryPolicy`] only retries them for
    /// idempotent operations.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RateLimited { .. } | Error::Transient { .. } | Error::Timeout { .. } => true,
            Error::Store { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// The wait the server asked for, when it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Invalid input with a code and a message.
    pub fn invalid(code: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            code: code.into(),
            message: message.into(),
        }
    }

    /// Not found, without a hint.
    pub fn not_found(what: Missing, id: impl Into<String>) -> Self {
        Error::NotFound {
            what,
            id: id.into(),
            hint: None,
        }
    }

    /// A store failure that is not worth retrying.
    pub fn store(store: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Store {
            store: store.into(),
            message: message.to_string(),
            retryable: false,
        }
    }

    /// A provider failure without an HTTP status.
    pub fn provider(provider: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Provider {
            provider: provider.into(),
            status: None,
            message: message.to_string(),
        }
    }

    /// A protocol violation with a code.
    pub fn protocol(code: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Protocol {
            code: code.into(),
            message: message.into(),
        }
    }

    /// Whether this error says the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// Maps an HTTP status and the server's message to an error category, in one place for every
    /// HTTP backend: 401/403 unauthorized, 404 not found, 408 transient, 409 conflict,
    /// 413 invalid input (too large), 429 rate limited, 5xx transient, other 4xx provider errors.
    pub fn from_http_status(
        provider: &str,
        status: u16,
        message: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        let message = message.into();
        match status {
            401 | 403 => Error::Unauthorized {
                provider: provider.into(),
                message,
            },
            404 => Error::NotFound {
                what: Missing::Sandbox,
                id: message,
                hint: None,
            },
            // The server gave up waiting for the request and did not act on it: safe to send
            // again, even for an operation that is not idempotent.
            408 => Error::Transient {
                provider: provider.into(),
                message: format!("HTTP 408: {message}"),
            },
            409 => Error::Conflict {
                code: format!("{provider}_conflict"),
                message: format!("{provider}: HTTP 409: {message}"),
            },
            413 => Error::InvalidInput {
                code: "sandbox_input_too_large".into(),
                message: format!("{provider}: HTTP 413: {message}"),
            },
            429 => Error::RateLimited {
                provider: provider.into(),
                retry_after,
                message,
            },
            500..=599 => Error::Transient {
                provider: provider.into(),
                message: format!("HTTP {status}: {message}"),
            },
            _ => Error::Provider {
                provider: provider.into(),
                status: Some(status),
                message,
            },
        }
    }
}

impl From<std::io::Error> for Error {
    /// I/O errors from local work (temporary files, pipes) are provider errors of `local`
    /// unless a backend maps them itself.
    fn from(e: std::io::Error) -> Self {
        Error::provider("local", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_upstream_strings() {
        let e = Error::NotActive {
            sandbox_id: "x".into(),
            status: "shutdown".into(),
        };
        assert_eq!(e.code(), "sandbox_not_active:shutdown");
        assert_eq!(
            Error::not_found(Missing::Process, "p").code(),
            "sandbox_process_not_found"
        );
        let e = Error::Unsupported {
            provider: "local".into(),
            operation: "checkpoint",
        };
        assert_eq!(e.code(), "checkpoint_not_supported");
        let e = Error::Unsupported {
            provider: "x".into(),
            operation: "port_url",
        };
        assert_eq!(e.code(), "sandbox_port_url_not_supported");
    }

    #[test]
    fn http_statuses_map_to_categories() {
        assert!(matches!(
            Error::from_http_status("p", 401, "no", None),
            Error::Unauthorized { .. }
        ));
        assert!(matches!(
            Error::from_http_status("p", 403, "no", None),
            Error::Unauthorized { .. }
        ));
        assert!(Error::from_http_status("p", 404, "x", None).is_not_found());
        let e = Error::from_http_status("p", 429, "slow", Some(Duration::from_secs(2)));
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert!(Error::from_http_status("p", 503, "x", None).is_retryable());
        assert!(!Error::from_http_status("p", 400, "x", None).is_retryable());
        assert_eq!(
            Error::from_http_status("p", 413, "big", None).code(),
            "sandbox_input_too_large"
        );
    }
}
