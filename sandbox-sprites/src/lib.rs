//! Provider `sprites`: sandboxes on [Sprites](https://sprites.dev) (Fly.io) through its HTTP
//! and WebSocket API.
//!
//! A sandbox is one sprite, addressed by name (`ekairos-<sandboxId>` unless configured).
//! Create is idempotent (an existing sprite of that name is reused), resume reads the sprite
//! without waking it, commands run over the exec WebSocket with stdout and stderr kept apart,
//! and files go through the filesystem API as raw bytes.
//!
//! # Capabilities
//!
//! | capability    | how                                                                    |
//! |---------------|------------------------------------------------------------------------|
//! | `exec_stream` | WebSocket exec, binary frames `1` stdout, `2` stderr, `3` exit          |
//! | `stdin`       | frames `0` (bytes) and `4` (EOF)                                        |
//! | `timeout`     | enforced by the client: a `SIGKILL` control message, reported timed out |
//! | `files`       | `PUT fs/write?mkdirParents=true`, `GET fs/read` (`ENOENT` = missing)    |
//! | `ports`       | the sprite URL with the port set (8080 is the URL itself)               |
//! | `checkpoints` | `POST checkpoint` (NDJSON; `error` events fail), `GET checkpoints`      |
//! | `restore`     | `POST checkpoints/{id}/restore`, waits for `complete`                   |
//! | `stop`        | `Keep`: kills running exec sessions, the sprite hibernates by itself    |
//! | `delete`      | `DELETE /v1/sprites/{name}` (the default, see `deleteOnStop`)           |
//!
//! Round trips on a warm service: create 1 (2 when the sprite exists), exec 1, read 1,
//! write one per file (sent concurrently), stop 1. Resume costs one `GET`.
//!
//! # Configuration
//!
//! Environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `SPRITES_API_TOKEN` (fallback `SPRITE_TOKEN`) | bearer token; required. A blank value falls through to the next. |
//! | `SPRITES_API_BASE_URL` (fallback `SPRITES_API_URL`) | API base URL, default `https://api.sprites.dev` (trailing `/` removed). |
//! | `SANDBOX_SPRITES_DELETE_ON_STOP` | default of `deleteOnStop` when the config does not say. |
//!
//! The `sprites` section of the config (camelCase, as the TypeScript package writes it):
//!
//! ```json
//! { "provider": "sprites",
//!   "sprites": { "name": "my-sprite", "waitForCapacity": true,
//!                "urlSettings": { "auth": "sprite" }, "deleteOnStop": true,
//!                "workspaceRoot": "/home/sprite" } }
//! ```
//!
//! `urlSettings.auth` defaults to `sprite` (token required), the API's own default; upstream
//! defaulted to `public`. `deleteOnStop` defaults to true and, unlike upstream, is honoured.
//!
//! The record keeps `params.sprites = { id, name, url, urlSettings, deleteOnStop,
//! workspaceRoot }`: never the token.
//!
//! Failures map into [`sandbox_core::Error`] in one place: 401/403 unauthorized, 404 not
//! found, 409 conflict, 413 too large, 429 rate limited (with `Retry-After`), 5xx transient;
//! the server's `error`/`message` stays in the message. Requests are retried through
//! [`sandbox_core::RetryPolicy`] only where that is safe (reads, whole-file writes, deletes,
//! creates by name, refused exec handshakes; checkpoint creation only on 429).
//!
//! # Testing
//!
//! `sandbox_testkit::sprites::SpritesEmulator` (feature `emulator-sprites`) serves this API on
//! `127.0.0.1:0` and runs commands for real through the `local` provider; point
//! `SPRITES_API_BASE_URL` at its `base_url()`. This crate's tests run the provider conformance
//! suite, the fault switches (5xx, 429 with `Retry-After`, dropped and truncated exec,
//! malformed JSON, NDJSON `error` events) and `sandbox run --provider sprites` against it;
//! `cargo bench -p sandbox-sprites --bench round_trips` prints round trips per operation.
//!
//! # Example
//!
//! ```no_run
//! use sandbox_core::{Env, ExecRequest, Provider, CreateRequest, SandboxConfig, SandboxId};
//! use sandbox_sprites::SpritesProvider;
//!
//! # async fn demo() -> sandbox_core::Result<()> {
//! let config = SandboxConfig::from_json(r#"{"provider":"sprites"}"#)?;
//! let provider = SpritesProvider::from_config(&config, &Env::process())?;
//! let sandbox = provider
//!     .create(&CreateRequest { sandbox_id: SandboxId::new(), config })
//!     .await?;
//! let run = sandbox.handle.exec(ExecRequest::new(["uname", "-a"])).await?;
//! # drop(run);
//! # Ok(())
//! # }
//! ```
//!
//! Through the service, link the crate (`use sandbox_sprites as _;`) and select it with
//! `"provider": "sprites"` or `SANDBOX_PROVIDER=sprites`.

#![warn(missing_docs)]

mod client;
pub mod config;
mod error;
pub mod exec;
mod provider;

pub use config::{SpritesConfig, SpritesSection, UrlAuth};
pub use provider::{open, SpritesProvider, SpritesSandbox};

/// The provider's registered name.
pub const SPRITES: &str = "sprites";

sandbox_core::register_provider!(
    "sprites",
    open,
    credentials = ["SPRITES_API_TOKEN", "SPRITE_TOKEN"]
);
