//! The `RecordStore` contract: sandbox and process records.

use async_trait::async_trait;

use crate::error::Result;
use crate::id::{ProcessId, SandboxId};
use crate::record::{
    ProcessFilter, ProcessPatch, ProcessRecord, SandboxFilter, SandboxPatch, SandboxRecord,
};

/// Durable sandbox and process records.
///
/// Patches are partial updates applied by the store; callers never read-modify-write a whole
/// row. Every method is atomic: on error nothing changed.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait RecordStore: Send + Sync {
    /// Store name for messages (`memory`, `sqlite`, `instant`).
    fn name(&self) -> &str;

    /// Inserts a new sandbox record.
    ///
    /// # Errors
    /// [`crate::Error::Conflict`] when the id exists.
    async fn insert_sandbox(&self, record: &SandboxRecord) -> Result<()>;

    /// Applies a partial update.
    ///
    /// # Errors
    /// [`crate::Error::NotFound`] when there is no such sandbox.
    async fn patch_sandbox(&self, id: &SandboxId, patch: &SandboxPatch) -> Result<()>;

    /// One sandbox, or `None`.
    async fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>>;

    /// Sandboxes matching `filter`, ordered by `createdAt`, then id.
    async fn list_sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<SandboxRecord>>;

    /// Inserts a new process record (linked to its sandbox).
    ///
    /// # Errors
    /// [`crate::Error::Conflict`] when the id exists; [`crate::Error::NotFound`] when the
    /// sandbox does not.
    async fn insert_process(&self, record: &ProcessRecord) -> Result<()>;

    /// Applies a partial update.
    ///
    /// # Errors
    /// [`crate::Error::NotFound`] when there is no such process.
    async fn patch_process(&self, id: &ProcessId, patch: &ProcessPatch) -> Result<()>;

    /// One process, or `None`.
    async fn get_process(&self, id: &ProcessId) -> Result<Option<ProcessRecord>>;

    /// Processes matching `filter`, ordered by `startedAt`, then id.
    async fn list_processes(&self, filter: &ProcessFilter) -> Result<Vec<ProcessRecord>>;
}
