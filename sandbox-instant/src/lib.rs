//! InstantDB record store and process-log streams for the sandbox service.
//!
//! `sandbox-instant` keeps sandbox and process records in an InstantDB app, with the entities,
//! attributes and links of the TypeScript package `@ekairos/sandbox`, and each process's log in
//! an InstantDB stream, so records and logs written here are read by the TypeScript package
//! and the other way round. It speaks the admin HTTP API only (no SDK): `POST /admin/query`,
//! `POST /admin/transact`, and the streams protocol over `POST /admin/sse` +
//! `POST /admin/sse/push`.
//!
//! # What is stored where
//!
//! | Data | InstantDB | Notes |
//! |---|---|---|
//! | [`SandboxRecord`](sandbox_core::SandboxRecord) | entity `sandbox_sandboxes` | attribute names as upstream (`status`, `provider`, `externalSandboxId`, `createdAt`, ...) |
//! | [`ProcessRecord`](sandbox_core::ProcessRecord) | entity `sandbox_processes` | `sandboxId` is the link `sandbox` (reverse `processes`), not an attribute |
//! | process → stream | link `stream` (reverse `$streams.sandboxProcesses`) | made in the same transact that creates the process |
//! | process log | a `$streams` stream with client id `sandbox-process:<processId>` | NDJSON chunks of [`sandbox_core::protocol`], UTF-8 byte offsets |
//!
//! Inserts are one `create` step (plus the process's `link` step, in the same transact);
//! patches are one `update` step with `{"upsert": false}` carrying only the changed
//! attributes. NUL characters are stripped from every string (the server refuses them).
//! The schema to push to your app is [`schema::schema_json`] (`cargo xtask instant-schema`
//! prints it).
//!
//! # Capabilities
//!
//! | Trait | Implemented by | Notes |
//! |---|---|---|
//! | [`RecordStore`](sandbox_core::RecordStore) | [`InstantStore`] | insert conflicts and patches of unknown ids are typed errors, in one request each |
//! | [`StreamSink`](sandbox_core::StreamSink) | [`InstantSink`] | one writer per log; batched appends; reconnect-and-resend on a dropped session; readers from any `seq` or byte offset; live follow |
//! | writer liveness | [`InstantSink`] | writers of this OS process from what it knows; others by their lease (below) |
//!
//! # Round trips
//!
//! One SSE session per sink carries every writer and reader. A recorded process run costs,
//! besides its appends: one `start-stream` push (answered with the stream id), one transact
//! creating the process with both links, one final transact. Appends are queued and sent
//! when [`InstantConfig::batch_bytes`] are waiting, after [`InstantConfig::batch_delay`], or
//! on flush/close; `close` sends the end of the stream with the last batch and waits for the
//! server's `stream-flushed` with `done`. `cargo bench -p sandbox-instant --bench requests`
//! prints the counts and the wall time with 20 ms latency against an unbatched baseline.
//!
//! Limits: `read` and `status` fetch the log from its start (or from the byte offset asked
//! for) and cut locally; a log whose writer lives in another OS process is abandoned by
//! marking its `$streams` entity done through transact.
//!
//! # Writer lease
//!
//! A writer's liveness must be visible to other OS processes, so that `reconcile` there can
//! mark a process whose writer died as lost. The lease is the process row's existing
//! `updatedAt` attribute (no attribute outside upstream's schema):
//!
//! - While a writer is open it renews the lease every [`InstantConfig::lease_beat`]
//!   ([`config::LEASE_BEAT`], 15 s): one `update` step with `{"upsert": false}` on
//!   `sandbox_processes[<processId>]` setting only `updatedAt` to now (epoch ms). It runs in
//!   the background, off the path of any append, and stops on close, abort or drop. The first
//!   renewal comes one interval after the writer opens, so a short run costs no request for
//!   it. A log without a process row (the update finds nothing) has no lease: the renewal
//!   stops after that one attempt, and nothing is created.
//! - Cost: one small transact per open log per 15 s.
//! - `status` (and `read`) of an open log whose writer is not in this OS process reads the
//!   row's `updatedAt` (`startedAt` when absent) with one query: within
//!   [`InstantConfig::lease_stale`] ([`config::LEASE_STALE`], 60 s) of now, or ahead of it,
//!   the writer is `Alive`; older, `Gone`; a process row in a terminal status holds no lease
//!   (`Gone`); no process row, `Unknown`. Writers of this OS process are answered from what
//!   it knows, as before.
//! - `abandon` refuses a log whose writer holds the lease.
//! - Clocks: the writer's clock sets `updatedAt`, the reader's clock judges it. A skew up to
//!   `lease_stale - lease_beat` (45 s by default) is tolerated; a reader whose clock runs
//!   ahead by more sees a live writer as gone, one behind only sees a dead one later.
//!   Any other write of `updatedAt` (the service's patches) also renews the lease, which is
//!   why a terminal status ends it.
//!
//! # Configuration
//!
//! | Variable | Meaning |
//! |---|---|
//! | `INSTANT_APP_ID` | the app id (required unless the store URL names it) |
//! | `INSTANT_APP_ADMIN_TOKEN` | the admin token (required; never logged, printed or put in an error) |
//! | `INSTANT_API_URI` | API base URL, default `https://api.instantdb.com` |
//!
//! Store URLs (`SANDBOX_STORE` or an explicit URL): `instant:` takes everything from the
//! environment; `instant://<app-id>@<host[:port]>` names the app and the API host (`https`,
//! or `http` for `127.0.0.1`/`localhost`). The token always comes from the environment; a URL
//! carrying one is refused.
//!
//! # Example
//!
//! ```no_run
//! use sandbox_core::{registry, Env, SandboxFilter};
//! use sandbox_instant as _; // links the `instant` registration
//!
//! # async fn demo() -> sandbox_core::Result<()> {
//! // INSTANT_APP_ID and INSTANT_APP_ADMIN_TOKEN are set in the environment.
//! let backend = registry::open_store("instant:", &Env::process())?;
//! let sandboxes = backend.records.list_sandboxes(&SandboxFilter::default()).await?;
//! println!("{} sandboxes in {}", sandboxes.len(), backend.location);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod client;
pub mod config;
mod error;
pub mod schema;
mod session;
mod store;
mod streams;

use std::sync::Arc;

use sandbox_core::{Env, Result, StoreBackend};

pub use config::InstantConfig;
pub use store::InstantStore;
pub use streams::InstantSink;

/// Store scheme and name: `instant`.
pub const INSTANT: &str = "instant";

/// The record store and stream sink of one app, sharing one HTTP client.
///
/// # Errors
/// Only when the HTTP client cannot be built; nothing is sent until first use.
pub fn backend(config: InstantConfig) -> Result<StoreBackend> {
    let location = config.location();
    let client = client::InstantClient::new(config)?;
    Ok(StoreBackend {
        records: Arc::new(InstantStore::new(client.clone())),
        logs: Arc::new(InstantSink::new(client)),
        location,
    })
}

/// Opens the store for a URL (`instant:` or `instant://<app-id>@<host>`) and the environment.
///
/// # Errors
/// Invalid URL, or a missing `INSTANT_APP_ID` / `INSTANT_APP_ADMIN_TOKEN`.
pub fn open(url: &str, env: &Env) -> Result<StoreBackend> {
    backend(InstantConfig::from_url(url, env)?)
}

sandbox_core::register_store!("instant", open);
