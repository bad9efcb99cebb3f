//! The one place where SQLite failures become [`sandbox_core::Error`].

use std::fmt;

use rusqlite::ErrorCode;
use sandbox_core::Error;

use crate::SQLITE;

/// A failure inside a database operation: SQLite's own, or a domain error the operation
/// decided on (conflict, not found, gap) while its transaction was open.
pub(crate) enum DbError {
    /// SQLite failed.
    Sql(rusqlite::Error),
    /// The operation refused (and rolled back).
    Domain(Error),
}

impl fmt::Debug for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Sql(e) => write!(f, "Sql({e})"),
            DbError::Domain(e) => write!(f, "Domain({e})"),
        }
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sql(e)
    }
}

impl From<Error> for DbError {
    fn from(e: Error) -> Self {
        DbError::Domain(e)
    }
}

/// Result of a database operation.
pub(crate) type DbResult<T> = std::result::Result<T, DbError>;

impl DbError {
    /// Another connection holds a lock: the operation may simply run again.
    pub(crate) fn is_busy(&self) -> bool {
        matches!(
            self,
            DbError::Sql(e) if matches!(
                e.sqlite_error_code(),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
            )
        )
    }

    /// The core error, with the database location and the operation for context.
    pub(crate) fn into_core(self, location: &str, operation: &str) -> Error {
        match self {
            DbError::Domain(e) => e,
            DbError::Sql(e) => map_sql(e, location, operation),
        }
    }
}

/// Maps a SQLite failure of `operation` on the database at `location`.
pub(crate) fn map_sql(e: rusqlite::Error, location: &str, operation: &str) -> Error {
    let code = e.sqlite_error_code();
    match code {
        Some(ErrorCode::NotADatabase) => not_a_database(location),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Store {
            store: SQLITE.into(),
            message: format!(
                "{operation} on {location}: the database stayed locked by another connection \
                 past the busy deadline"
            ),
            retryable: true,
        },
        Some(ErrorCode::DatabaseCorrupt) => Error::store(
            SQLITE,
            format!("{operation} on {location}: the database file is corrupt ({e})"),
        ),
        Some(ErrorCode::DiskFull) => Error::store(
            SQLITE,
            format!("{operation} on {location}: the disk is full"),
        ),
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            Error::store(
                SQLITE,
                format!("{operation} on {location}: cannot write the database file ({e}); check its permissions and those of its directory"),
            )
        }
        _ => Error::store(SQLITE, format!("{operation} on {location}: {e}")),
    }
}

/// The file exists and is not a SQLite database: it is left untouched.
pub(crate) fn not_a_database(location: &str) -> Error {
    Error::invalid(
        "sandbox_store_not_a_database",
        format!(
            "{location} is not a SQLite database; it was left untouched. \
             Point the store at another file (SANDBOX_STORE=sqlite:///path/to/sandbox.db)"
        ),
    )
}

/// An I/O failure while preparing the database file.
pub(crate) fn io(location: &str, operation: &str, e: std::io::Error) -> Error {
    Error::store(SQLITE, format!("{operation} {location}: {e}"))
}
