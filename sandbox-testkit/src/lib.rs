//! Conformance suites and provider API emulators for the sandbox service.
//!
//! - [`provider::run_provider_suite`], [`store::run_store_suite`],
//!   [`stream::run_stream_suite`]: conformance suites, written once and run against every
//!   implementation of the core traits. Each returns a [`SuiteReport`] whose
//!   [`SuiteReport::assert_passed`] panics listing every failed check by name.
//! - Emulators of the providers' HTTP APIs live in their own modules, each behind a Cargo
//!   feature so a test pulls in only what it uses.

#![warn(missing_docs)]

#[cfg(feature = "emulator-instant")]
pub mod instant;
pub mod provider;
mod report;
#[cfg(feature = "emulator-sprites")]
pub mod sprites;
pub mod store;
pub mod stream;

pub use report::{CheckResult, Outcome, SuiteReport};
