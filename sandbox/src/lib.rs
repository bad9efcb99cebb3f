//! Provider-agnostic code-execution sandboxes: one API over local processes and cloud
//! sandboxes, with every sandbox and process recorded durably and every process's output kept
//! as a resumable log.
//!
//! This crate is the facade: it re-exports [`sandbox_core`] (the service, the traits, the
//! records, the errors) and links the backend crates selected by Cargo features, so that their
//! registrations are present in [`registry`] without the caller naming them.
//!
//! # Features
//!
//! | Feature   | Default | Crate            | Registers                                  |
//! |-----------|---------|------------------|--------------------------------------------|
//! | *(none)*  | always  | `sandbox-core`   | store `memory` (`memory:`)                 |
//! | `local`   | yes     | [`sandbox-local`](local) | provider `local`                   |
//! | `sqlite`  | yes     | [`sandbox-sqlite`](sqlite) | store `sqlite` (`sqlite:`, `sqlite:///path.db`) |
//! | `sprites` | no      | [`sandbox-sprites`](sprites) | provider `sprites`             |
//! | `instant` | no      | [`sandbox-instant`](instant) | store `instant` (`instant:`)   |
//! | `full`    | no      | all of the above | every backend whose crate exists           |
//!
//! Backends whose crates are not in the workspace yet (`vercel`, `daytona`, `skills`) get
//! their feature when their crate lands: a feature that linked nothing would be a silent
//! no-op. Each enabled backend crate is re-exported under its short name (`sandbox::local`,
//! `sandbox::sqlite`, ...) for its own configuration types, which also links it so its
//! registration is present.
//!
//! # Environment
//!
//! | Variable           | Meaning                                                        |
//! |--------------------|----------------------------------------------------------------|
//! | `SANDBOX_PROVIDER` | provider used when the config names none (default `local`)     |
//! | `SANDBOX_STORE`    | store URL used when none is given (default: SQLite in the user's data directory) |
//!
//! Each backend documents its own variables: `SANDBOX_LOCAL_ROOT`, `SANDBOX_LOCAL_ISOLATION`
//! (`local`); `SPRITES_API_TOKEN`, `SPRITES_API_BASE_URL` (`sprites`); `INSTANT_APP_ID`,
//! `INSTANT_APP_ADMIN_TOKEN`, `INSTANT_API_URI` (`instant`).
//!
//! # Example
//!
//! ```
//! use sandbox::{registry, Env, SandboxService};
//!
//! # fn main() -> sandbox::Result<()> {
//! // `memory:` is always registered; the default store is SQLite when the `sqlite` feature is on.
//! let backend = registry::open_store("memory:", &Env::process())?;
//! let service = SandboxService::builder().store(backend).build()?;
//! assert_eq!(service.records().name(), "memory");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub use sandbox_core::*;

/// The `local` provider (feature `local`).
#[cfg(feature = "local")]
pub use sandbox_local as local;

/// The SQLite store (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub use sandbox_sqlite as sqlite;

/// The `sprites` provider (feature `sprites`).
#[cfg(feature = "sprites")]
pub use sandbox_sprites as sprites;

/// The InstantDB store (feature `instant`).
#[cfg(feature = "instant")]
pub use sandbox_instant as instant;

/// The repository README's Rust examples, compiled as doctests so they keep up with the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExamples;
