//! Sandbox and process records, with the attribute names and status strings of the TypeScript
//! package's InstantDB schema (`sandbox_sandboxes`, `sandbox_processes`), so a record moves
//! between stores without translation.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::{ProcessId, SandboxId};

/// Milliseconds since the Unix epoch: the time unit of every record.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $s)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire string.
            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $s,)+ }
            }

            /// Parses the wire string.
            ///
            /// # Errors
            /// An unknown string is invalid input.
            pub fn parse(s: &str) -> crate::Result<Self> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(crate::Error::invalid(
                        concat!("invalid_", stringify!($name)),
                        format!(concat!("unknown ", stringify!($name), " {:?}; expected one of: {}"), other,
                            [$($s),+].join(", ")),
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> crate::Result<Self> {
                Self::parse(s)
            }
        }
    };
}

string_enum!(
    /// Lifecycle of a sandbox: `creating → active → shutdown`, `creating → error`.
    SandboxStatus {
        /// Record written, provider object being provisioned.
        Creating = "creating",
        /// Ready to serve operations.
        Active = "active",
        /// Stopped; terminal.
        Shutdown = "shutdown",
        /// Provisioning failed; terminal. `params.error` says why.
        Error = "error",
        /// Declared by the upstream schema; never written by this service.
        Recreating = "recreating",
    }
);

string_enum!(
    /// Lifecycle of a process: `running → exited | failed | killed | lost`.
    ProcessStatus {
        /// Declared by the upstream schema.
        Starting = "starting",
        /// Running; its log is open.
        Running = "running",
        /// Declared by the upstream schema.
        Detached = "detached",
        /// Ended with exit code 0.
        Exited = "exited",
        /// Ended with a non-zero exit code, or the service failed to run it.
        Failed = "failed",
        /// Killed by a signal, a timeout or a caller.
        Killed = "killed",
        /// Its writer died or its sandbox stopped before it ended.
        Lost = "lost",
    }
);

impl ProcessStatus {
    /// Whether the process has ended (`exited`, `failed`, `killed`, `lost`).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ProcessStatus::Exited
                | ProcessStatus::Failed
                | ProcessStatus::Killed
                | ProcessStatus::Lost
        )
    }
}

impl SandboxStatus {
    /// Whether nothing moves the sandbox out of this status.
    pub fn is_terminal(&self) -> bool {
        matches!(self, SandboxStatus::Shutdown | SandboxStatus::Error)
    }
}

string_enum!(
    /// What a process is for (upstream `SANDBOX_PROCESS_KINDS`).
    ProcessKind {
        /// A one-off command (default).
        Command = "command",
        /// A long-running service.
        Service = "service",
        /// A Codex app server.
        CodexAppServer = "codex-app-server",
        /// A development server.
        DevServer = "dev-server",
        /// A test runner.
        TestRunner = "test-runner",
        /// A file watcher.
        Watcher = "watcher",
    }
);

string_enum!(
    /// Foreground or background (upstream `SANDBOX_PROCESS_MODES`).
    ProcessMode {
        /// The caller waits for it (default).
        Foreground = "foreground",
        /// The caller does not wait for it.
        Background = "background",
    }
);

/// A row of `sandbox_sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxRecord {
    /// Durable id.
    pub id: SandboxId,
    /// Lifecycle status.
    pub status: SandboxStatus,
    /// Provider name (`local`, `sprites`, ...).
    pub provider: String,
    /// The provider's own id (`local:<id>`, sprite name, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_sandbox_id: Option<String>,
    /// Public URL of the sandbox, when the provider has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_url: Option<String>,
    /// Maximum lifetime in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Provider runtime (`node22`, `python3.13`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<i64>,
    /// Declared ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    /// Free-form purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Caller params plus provider bookkeeping (`params.<provider>`), never secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    /// Creation time (epoch ms).
    pub created_at: i64,
    /// Last update (epoch ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
    /// When it was stopped (epoch ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_at: Option<i64>,
    /// The Instant user the sandbox acts as, for runtime-aware sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_user_id: Option<String>,
}

impl SandboxRecord {
    /// The provider's bookkeeping section `params.<provider>`, if any.
    pub fn provider_params(&self) -> Option<&Value> {
        self.params.as_ref()?.get(&self.provider)
    }

    /// Applies a patch to this in-memory copy, exactly as a store applies it.
    pub fn apply(&mut self, patch: &SandboxPatch) {
        if let Some(v) = patch.status {
            self.status = v;
        }
        if let Some(v) = &patch.external_sandbox_id {
            self.external_sandbox_id = Some(v.clone());
        }
        if let Some(v) = &patch.sandbox_url {
            self.sandbox_url = Some(v.clone());
        }
        if let Some(v) = &patch.params {
            self.params = Some(v.clone());
        }
        if let Some(v) = patch.updated_at {
            self.updated_at = Some(v);
        }
        if let Some(v) = patch.shutdown_at {
            self.shutdown_at = Some(v);
        }
        if let Some(v) = &patch.sandbox_user_id {
            self.sandbox_user_id = Some(v.clone());
        }
    }
}

/// A partial update of a sandbox record: only the attributes that are `Some` change.
/// Serialises to exactly those attributes (camelCase).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPatch {
    /// New status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SandboxStatus>,
    /// Provider id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_sandbox_id: Option<String>,
    /// Public URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_url: Option<String>,
    /// Replaces `params` as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    /// Update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
    /// Stop time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_at: Option<i64>,
    /// Instant sandbox user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_user_id: Option<String>,
}

/// A row of `sandbox_processes`, with its sandbox link as `sandboxId`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    /// Durable id.
    pub id: ProcessId,
    /// The sandbox it runs in (the `sandbox` link upstream).
    pub sandbox_id: SandboxId,
    /// What it is for.
    pub kind: ProcessKind,
    /// Foreground or background.
    pub mode: ProcessMode,
    /// Lifecycle status.
    pub status: ProcessStatus,
    /// Provider of its sandbox.
    pub provider: String,
    /// argv\[0\].
    pub command: String,
    /// argv\[1..\].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Working directory inside the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Environment keys with redacted values: values are never persisted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Value>,
    /// Exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Terminating signal, when it was killed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The provider's id for the process (observed processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_process_id: Option<String>,
    /// Id of its log in the stream sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    /// `sandbox-process:<processId>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_client_id: Option<String>,
    /// When the log was opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_started_at: Option<i64>,
    /// When the log was closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_finished_at: Option<i64>,
    /// Why the log ended early, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_abort_reason: Option<String>,
    /// Start time (epoch ms).
    pub started_at: i64,
    /// Last update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
    /// End time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_at: Option<i64>,
    /// Caller metadata plus bookkeeping (`observed`, `lastSeq`, `chunkCount`, `lostReason`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

impl ProcessRecord {
    /// Applies a patch to this in-memory copy, exactly as a store applies it.
    pub fn apply(&mut self, patch: &ProcessPatch) {
        if let Some(v) = patch.status {
            self.status = v;
        }
        if let Some(v) = patch.exit_code {
            self.exit_code = Some(v);
        }
        if let Some(v) = &patch.signal {
            self.signal = Some(v.clone());
        }
        if let Some(v) = &patch.external_process_id {
            self.external_process_id = Some(v.clone());
        }
        if let Some(v) = &patch.stream_id {
            self.stream_id = Some(v.clone());
        }
        if let Some(v) = patch.stream_finished_at {
            self.stream_finished_at = Some(v);
        }
        if let Some(v) = &patch.stream_abort_reason {
            self.stream_abort_reason = Some(v.clone());
        }
        if let Some(v) = patch.updated_at {
            self.updated_at = Some(v);
        }
        if let Some(v) = patch.exited_at {
            self.exited_at = Some(v);
        }
        if let Some(v) = &patch.metadata {
            self.metadata = Some(v.clone());
        }
    }

    /// argv: `command` followed by `args`.
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec![self.command.clone()];
        v.extend(self.args.iter().flatten().cloned());
        v
    }
}

/// A partial update of a process record: only the attributes that are `Some` change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessPatch {
    /// New status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ProcessStatus>,
    /// Exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Terminating signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Provider process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_process_id: Option<String>,
    /// Log id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    /// Log close time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_finished_at: Option<i64>,
    /// Why the log ended early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_abort_reason: Option<String>,
    /// Update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
    /// End time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_at: Option<i64>,
    /// Replaces `metadata` as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// Which sandboxes to list. Results are ordered by `createdAt`, then id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxFilter {
    /// Only this status.
    pub status: Option<SandboxStatus>,
    /// Only this provider.
    pub provider: Option<String>,
    /// At most this many (the oldest first).
    pub limit: Option<usize>,
}

impl SandboxFilter {
    /// Whether a record passes the filter (ignoring `limit`).
    pub fn matches(&self, r: &SandboxRecord) -> bool {
        self.status.is_none_or(|s| s == r.status)
            && self.provider.as_deref().is_none_or(|p| p == r.provider)
    }
}

/// Which processes to list. Results are ordered by `startedAt`, then id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessFilter {
    /// Only processes of this sandbox.
    pub sandbox_id: Option<SandboxId>,
    /// Only this status.
    pub status: Option<ProcessStatus>,
    /// Only processes whose status is not terminal.
    pub open_only: bool,
    /// At most this many.
    pub limit: Option<usize>,
}

impl ProcessFilter {
    /// Whether a record passes the filter (ignoring `limit`).
    pub fn matches(&self, r: &ProcessRecord) -> bool {
        self.sandbox_id.is_none_or(|s| s == r.sandbox_id)
            && self.status.is_none_or(|s| s == r.status)
            && (!self.open_only || !r.status.is_terminal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_serialise_to_upstream_strings() {
        assert_eq!(
            serde_json::to_string(&ProcessKind::CodexAppServer).unwrap(),
            "\"codex-app-server\""
        );
        assert_eq!(
            SandboxStatus::parse("shutdown").unwrap(),
            SandboxStatus::Shutdown
        );
        assert!(ProcessStatus::parse("zombie").is_err());
        let terminal: Vec<_> = ProcessStatus::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(terminal, ["exited", "failed", "killed", "lost"]);
    }

    #[test]
    fn records_use_upstream_attribute_names() {
        let r = SandboxRecord {
            id: SandboxId::new(),
            status: SandboxStatus::Active,
            provider: "local".into(),
            external_sandbox_id: Some("local:x".into()),
            sandbox_url: None,
            timeout: Some(1),
            runtime: None,
            vcpus: None,
            ports: Some(vec![3000]),
            purpose: None,
            params: None,
            created_at: 5,
            updated_at: Some(6),
            shutdown_at: None,
            sandbox_user_id: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        for k in [
            "externalSandboxId",
            "createdAt",
            "updatedAt",
            "ports",
            "timeout",
        ] {
            assert!(keys.contains(&k.to_string()), "{k} in {keys:?}");
        }
        let back: SandboxRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn patches_serialise_only_changed_attributes() {
        let p = ProcessPatch {
            status: Some(ProcessStatus::Lost),
            stream_abort_reason: Some("writer_lost".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"status":"lost","streamAbortReason":"writer_lost"})
        );
    }
}
