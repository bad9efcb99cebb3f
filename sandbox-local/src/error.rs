//! Mapping of local failures into [`sandbox_core::Error`], in one place.

use std::io;
use std::path::Path;

use sandbox_core::Error;

use crate::LOCAL;

/// An I/O failure while doing `what` (with the sandbox or path it concerned).
pub(crate) fn io(what: impl std::fmt::Display, e: io::Error) -> Error {
    Error::provider(LOCAL, format!("{what}: {e}"))
}

/// A caller path that leaves the workspace (lexically or through a symlink).
pub(crate) fn outside(path: &str, workspace: &Path) -> Error {
    Error::invalid(
        "sandbox_path_outside_workspace",
        format!(
            "path {path:?} resolves outside the sandbox workspace {}",
            workspace.display()
        ),
    )
}

/// A caller path that cannot name a file (a directory, a device, through a regular file).
pub(crate) fn not_a_file(path: &str, why: &str) -> Error {
    Error::invalid("sandbox_path_invalid", format!("path {path:?} {why}"))
}

/// The sandbox directory is gone.
pub(crate) fn sandbox_gone(sandbox_id: &str) -> Error {
    Error::NotFound {
        what: sandbox_core::Missing::Sandbox,
        id: format!("{LOCAL}:{sandbox_id}"),
        hint: Some("its workspace directory no longer exists".into()),
    }
}

/// A failed background task (panic or cancellation).
pub(crate) fn task(what: &str, e: tokio::task::JoinError) -> Error {
    Error::provider(LOCAL, format!("{what} failed: {e}"))
}
