//! Registration of providers, stores and bootstrappers through `inventory`.
//!
//! A backend crate registers itself with [`crate::register_provider!`] or
//! [`crate::register_store!`]; it need not name `inventory`. Registrations in a crate that no
//! code names are dropped by the linker, so binaries and tests name every backend crate they
//! want (`use sandbox_local as _;`).
//!
//! Iteration order of `inventory` is unspecified: every list here is sorted, and a name
//! registered twice is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::bootstrap::Bootstrapper;
use crate::config::{Env, SandboxConfig};
use crate::error::{Error, Missing, Result};
use crate::provider::Provider;
use crate::store::RecordStore;
use crate::stream::StreamSink;

/// Builds a provider from the config and environment.
pub type ProviderConstructor = fn(&SandboxConfig, &Env) -> Result<Arc<dyn Provider>>;

/// Opens a store from its URL and the environment.
pub type StoreConstructor = fn(&str, &Env) -> Result<StoreBackend>;

/// Builds a bootstrapper.
pub type BootstrapperConstructor = fn() -> Arc<dyn Bootstrapper>;

/// A record store and the stream sink that goes with it.
#[derive(Clone)]
pub struct StoreBackend {
    /// Records.
    pub records: Arc<dyn RecordStore>,
    /// Process logs.
    pub logs: Arc<dyn StreamSink>,
    /// Where the data lives, for `doctor` (a path or a URL without credentials).
    pub location: String,
}

impl fmt::Debug for StoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreBackend")
            .field("records", &self.records.name())
            .field("logs", &self.logs.name())
            .field("location", &self.location)
            .finish()
    }
}

/// A provider registration.
#[derive(Debug)]
pub struct ProviderRegistration {
    /// Provider name (`config.provider`, `SANDBOX_PROVIDER`).
    pub name: &'static str,
    /// Constructor.
    pub constructor: ProviderConstructor,
    /// Names of the environment variables holding its credentials (for `doctor`; values are
    /// never read for display).
    pub credential_vars: &'static [&'static str],
}

impl ProviderRegistration {
    /// For [`crate::register_provider!`].
    pub const fn new(
        name: &'static str,
        constructor: ProviderConstructor,
        credential_vars: &'static [&'static str],
    ) -> Self {
        ProviderRegistration {
            name,
            constructor,
            credential_vars,
        }
    }
}

/// A store registration.
#[derive(Debug)]
pub struct StoreRegistration {
    /// URL scheme (`sqlite`, `memory`, `instant`).
    pub scheme: &'static str,
    /// Constructor.
    pub constructor: StoreConstructor,
}

impl StoreRegistration {
    /// For [`crate::register_store!`].
    pub const fn new(scheme: &'static str, constructor: StoreConstructor) -> Self {
        StoreRegistration {
            scheme,
            constructor,
        }
    }
}

/// A bootstrapper registration.
#[derive(Debug)]
pub struct BootstrapperRegistration {
    /// Name; its result is recorded as `params.<name>`.
    pub name: &'static str,
    /// Constructor.
    pub constructor: BootstrapperConstructor,
}

impl BootstrapperRegistration {
    /// For [`crate::register_bootstrapper!`].
    pub const fn new(name: &'static str, constructor: BootstrapperConstructor) -> Self {
        BootstrapperRegistration { name, constructor }
    }
}

inventory::collect!(ProviderRegistration);
inventory::collect!(StoreRegistration);
inventory::collect!(BootstrapperRegistration);

/// Registers a provider: `register_provider!("name", constructor)` or
/// `register_provider!("name", constructor, credentials = ["TOKEN_VAR", ...])`.
#[macro_export]
macro_rules! register_provider {
    ($name:expr, $ctor:expr $(, credentials = [$($var:expr),* $(,)?])? $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::registry::ProviderRegistration::new($name, $ctor, &[$($($var),*)?])
        }
    };
}

/// Registers a store for a URL scheme: `register_store!("scheme", constructor)`.
#[macro_export]
macro_rules! register_store {
    ($scheme:expr, $ctor:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::registry::StoreRegistration::new($scheme, $ctor)
        }
    };
}

/// Registers a bootstrapper: `register_bootstrapper!("name", constructor)`.
#[macro_export]
macro_rules! register_bootstrapper {
    ($name:expr, $ctor:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::registry::BootstrapperRegistration::new($name, $ctor)
        }
    };
}

/// Indexes registrations by name, refusing duplicates.
///
/// # Errors
/// `sandbox_registry_duplicate` naming the first name registered twice.
pub fn index_by_name<'a, T>(
    kind: &str,
    items: impl IntoIterator<Item = &'a T>,
    name: impl Fn(&T) -> &'static str,
) -> Result<BTreeMap<&'static str, &'a T>>
where
    T: 'a,
{
    let mut map = BTreeMap::new();
    for item in items {
        if map.insert(name(item), item).is_some() {
            return Err(Error::Conflict {
                code: "sandbox_registry_duplicate".into(),
                message: format!(
                    "{kind} `{}` is registered twice; link only one crate that registers it",
                    name(item)
                ),
            });
        }
    }
    Ok(map)
}

fn providers() -> Result<BTreeMap<&'static str, &'static ProviderRegistration>> {
    index_by_name("provider", inventory::iter::<ProviderRegistration>, |r| {
        r.name
    })
}

fn stores() -> Result<BTreeMap<&'static str, &'static StoreRegistration>> {
    index_by_name("store", inventory::iter::<StoreRegistration>, |r| r.scheme)
}

/// Registered provider names, sorted.
///
/// # Errors
/// A duplicate registration.
pub fn provider_names() -> Result<Vec<&'static str>> {
    Ok(providers()?.into_keys().collect())
}

/// Registered provider registrations, sorted by name.
///
/// # Errors
/// A duplicate registration.
pub fn provider_registrations() -> Result<Vec<&'static ProviderRegistration>> {
    Ok(providers()?.into_values().collect())
}

/// Registered store schemes, sorted.
///
/// # Errors
/// A duplicate registration.
pub fn store_schemes() -> Result<Vec<&'static str>> {
    Ok(stores()?.into_keys().collect())
}

/// Registered bootstrappers, sorted by name.
///
/// # Errors
/// A duplicate registration.
pub fn bootstrappers() -> Result<Vec<(&'static str, Arc<dyn Bootstrapper>)>> {
    Ok(index_by_name(
        "bootstrapper",
        inventory::iter::<BootstrapperRegistration>,
        |r| r.name,
    )?
    .into_iter()
    .map(|(n, r)| (n, (r.constructor)()))
    .collect())
}

/// The registration of provider `name`.
///
/// # Errors
/// Unknown name: not found, listing the registered names.
pub fn provider_registration(name: &str) -> Result<&'static ProviderRegistration> {
    let all = providers()?;
    all.get(name).copied().ok_or_else(|| Error::NotFound {
        what: Missing::Provider,
        id: name.to_string(),
        hint: Some(format!("registered providers: {}", list(all.keys()))),
    })
}

/// Builds provider `name` from the config and environment.
///
/// # Errors
/// Unknown name (listing the registered ones), or the constructor's error.
pub fn open_provider(name: &str, config: &SandboxConfig, env: &Env) -> Result<Arc<dyn Provider>> {
    (provider_registration(name)?.constructor)(config, env)
}

/// The store URL to use: `explicit`, else `SANDBOX_STORE`, else [`DEFAULT_STORE_URL`].
pub fn store_url(explicit: Option<&str>, env: &Env) -> String {
    explicit
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| env.first(&["SANDBOX_STORE"]))
        .unwrap_or_else(|| DEFAULT_STORE_URL.to_string())
}

/// The embedded default store: SQLite in the user's data directory.
pub const DEFAULT_STORE_URL: &str = "sqlite:";

/// Opens the store for `url` by its scheme (`sqlite:///path`, `memory:`, `instant://...`).
///
/// # Errors
/// A URL without a scheme is invalid input; an unknown scheme lists the registered ones.
pub fn open_store(url: &str, env: &Env) -> Result<StoreBackend> {
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::invalid(
                "sandbox_store_url_invalid",
                format!("store URL {url:?} has no scheme; use e.g. sqlite:///path/to/file.db or memory:"),
            )
        })?;
    let all = stores()?;
    let reg = all.get(scheme.as_str()).ok_or_else(|| Error::NotFound {
        what: Missing::Store,
        id: scheme.clone(),
        hint: Some(format!("registered stores: {}", list(all.keys()))),
    })?;
    (reg.constructor)(url, env)
}

fn list<'a>(names: impl Iterator<Item = &'a &'static str>) -> String {
    let v: Vec<&str> = names.copied().collect();
    if v.is_empty() {
        "none (link a backend crate)".into()
    } else {
        v.join(", ")
    }
}
