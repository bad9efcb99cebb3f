//! Conformance suites and provider API emulators for the sandbox service.
//!
//! - [`provider`], [`store`], [`stream`]: conformance suites, written once and run against
//!   every implementation of the core traits.
//! - Emulators of the providers' HTTP APIs live in their own modules, each behind a Cargo
//!   feature so a test pulls in only what it uses.
