//! Where the database lives: parsing of `sqlite:` store URLs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sandbox_core::{Error, Result};

/// Directory under the user's data directory that holds the default database.
pub const DATA_DIR_NAME: &str = "ekairos-sandbox";

/// File name of the default database.
pub const DEFAULT_FILE_NAME: &str = "sandbox.db";

/// Where a database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A file on disk.
    File(PathBuf),
    /// A private in-memory database (`sqlite::memory:`), gone when the last handle is dropped.
    Memory,
}

/// Settings of a SQLite store.
///
/// Built from a store URL with [`SqliteConfig::from_url`] or directly with
/// [`SqliteConfig::file`] / [`SqliteConfig::memory`].
#[derive(Clone, PartialEq, Eq)]
pub struct SqliteConfig {
    /// Where the database lives.
    pub location: Location,
    /// How long one statement waits for another connection's lock before the store retries it
    /// (the store keeps retrying up to [`SqliteConfig::busy_deadline`]).
    pub busy_timeout: Duration,
    /// How long an operation keeps retrying a busy database before it fails with a retryable
    /// store error.
    pub busy_deadline: Duration,
}

impl fmt::Debug for SqliteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteConfig")
            .field("location", &self.location)
            .field("busy_timeout", &self.busy_timeout)
            .field("busy_deadline", &self.busy_deadline)
            .finish()
    }
}

impl SqliteConfig {
    /// A database in the file at `path` (created with mode 0600 when missing).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            location: Location::File(path.into()),
            busy_timeout: Duration::from_secs(5),
            busy_deadline: Duration::from_secs(60),
        }
    }

    /// A private in-memory database.
    pub fn memory() -> Self {
        SqliteConfig {
            location: Location::Memory,
            ..Self::file("")
        }
    }

    /// The default database: `<data dir>/ekairos-sandbox/sandbox.db`, where the data directory
    /// is `dirs::data_dir()` (`$XDG_DATA_HOME` or `~/.local/share` on Linux,
    /// `~/Library/Application Support` on macOS).
    ///
    /// # Errors
    /// `sandbox_store_url_invalid` when the platform has no data directory (no `HOME`).
    pub fn default_path() -> Result<PathBuf> {
        let base = dirs::data_dir().ok_or_else(|| {
            Error::invalid(
                "sandbox_store_url_invalid",
                "no user data directory (is HOME set?); give the database path explicitly, \
                 e.g. SANDBOX_STORE=sqlite:///path/to/sandbox.db",
            )
        })?;
        Ok(base.join(DATA_DIR_NAME).join(DEFAULT_FILE_NAME))
    }

    /// Parses a store URL.
    ///
    /// | URL | database |
    /// |---|---|
    /// | `sqlite:` or `sqlite://` | the default file, see [`SqliteConfig::default_path`] |
    /// | `sqlite:///abs/path.db` | `/abs/path.db` |
    /// | `sqlite:/abs/path.db` | `/abs/path.db` |
    /// | `sqlite:relative/path.db` | `relative/path.db`, relative to the working directory |
    /// | `sqlite::memory:` | a private in-memory database |
    ///
    /// The path is taken literally (no percent-decoding, no query string).
    ///
    /// # Errors
    /// `sandbox_store_url_invalid` for another scheme, a URL with a host
    /// (`sqlite://host/path`), or a path with a NUL byte.
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        let invalid = |why: &str| {
            Error::invalid(
                "sandbox_store_url_invalid",
                format!(
                    "invalid SQLite store URL {url:?}: {why}; use sqlite:///abs/path.db, \
                     sqlite:relative/path.db, sqlite::memory: or sqlite: for the default file"
                ),
            )
        };
        let rest = match url.split_once(':') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(crate::SQLITE) => rest,
            _ => return Err(invalid("the scheme is not `sqlite`")),
        };
        if rest.contains('\0') {
            return Err(invalid("the path contains a NUL byte"));
        }
        if rest == ":memory:" {
            return Ok(Self::memory());
        }
        let path = if let Some(after) = rest.strip_prefix("//") {
            if after.is_empty() {
                return Ok(Self::file(Self::default_path()?));
            }
            if !after.starts_with('/') {
                return Err(invalid(
                    "a host is not allowed (three slashes before an absolute path)",
                ));
            }
            after
        } else {
            rest
        };
        if path.is_empty() {
            return Ok(Self::file(Self::default_path()?));
        }
        Ok(Self::file(path))
    }

    /// The database file, or `None` for an in-memory database.
    pub fn path(&self) -> Option<&Path> {
        match &self.location {
            Location::File(p) => Some(p),
            Location::Memory => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_relative_and_memory_urls() {
        assert_eq!(
            SqliteConfig::from_url("sqlite:///var/data/s.db")
                .unwrap()
                .location,
            Location::File("/var/data/s.db".into())
        );
        assert_eq!(
            SqliteConfig::from_url("sqlite:/var/data/s.db")
                .unwrap()
                .location,
            Location::File("/var/data/s.db".into())
        );
        assert_eq!(
            SqliteConfig::from_url("sqlite:data/s.db").unwrap().location,
            Location::File("data/s.db".into())
        );
        assert_eq!(
            SqliteConfig::from_url("SQLite::memory:").unwrap().location,
            Location::Memory
        );
    }

    #[test]
    fn empty_path_is_the_default_file_in_the_data_dir() {
        let Ok(default) = SqliteConfig::default_path() else {
            eprintln!("skipped: this machine has no user data directory");
            return;
        };
        assert!(
            default.ends_with("ekairos-sandbox/sandbox.db"),
            "{default:?}"
        );
        for url in ["sqlite:", "sqlite://", " sqlite: "] {
            assert_eq!(
                SqliteConfig::from_url(url).unwrap().path(),
                Some(default.as_path())
            );
        }
    }

    #[test]
    fn other_schemes_hosts_and_nul_are_invalid() {
        for bad in [
            "memory:",
            "postgres://x/y",
            "sqlite://host/x.db",
            "sqlite:a\0b",
            "nocolon",
        ] {
            let e = SqliteConfig::from_url(bad).unwrap_err();
            assert_eq!(e.code(), "sandbox_store_url_invalid", "{bad:?}");
        }
    }
}
