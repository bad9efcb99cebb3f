//! Bootstrappers: steps that run after a sandbox is provisioned and before it is `active`
//! (installing the Ekairos runtime, agent skills, ...).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::config::SandboxConfig;
use crate::error::Result;
use crate::id::SandboxId;
use crate::provider::SandboxHandle;

/// What a bootstrapper gets: the config and the new sandbox.
pub struct BootstrapContext<'a> {
    /// The new sandbox's id.
    pub sandbox_id: &'a SandboxId,
    /// Provider name.
    pub provider: &'a str,
    /// The caller's config.
    pub config: &'a SandboxConfig,
    /// The new sandbox: write files and run commands in it.
    pub sandbox: Arc<dyn SandboxHandle>,
}

impl fmt::Debug for BootstrapContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapContext")
            .field("sandbox_id", self.sandbox_id)
            .field("provider", &self.provider)
            .finish()
    }
}

/// A step run on every new sandbox whose config it applies to.
#[async_trait]
pub trait Bootstrapper: Send + Sync {
    /// Name; the result is recorded as `params.<name>`.
    fn name(&self) -> &str;

    /// Whether this config asks for this step.
    fn applies(&self, config: &SandboxConfig) -> bool;

    /// Runs the step; the returned value (never a secret) is recorded in `params`.
    ///
    /// # Errors
    /// Any error fails the create: the provider object is cleaned up and the record says
    /// `error`.
    async fn run(&self, ctx: &BootstrapContext<'_>) -> Result<Value>;
}
