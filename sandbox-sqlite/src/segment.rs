//! Segment files: the bytes of the logs of a file database.
//!
//! Each log's NDJSON lines live in one append-only file, `<database>.logs/<logId>.ndjson`
//! (directory mode 0700, files 0600), written once; SQLite keeps one index row per line
//! (`sandbox_process_chunks`: seq, byte offset, byte length, time, type). A writer writes a
//! line at the log's indexed end (a positional write, so bytes a crashed writer left past the
//! index are overwritten, never appended after) and then commits its index row. Readers read
//! the byte ranges of indexed rows only: whatever lies past the index is invisible.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use sandbox_core::{Error, ProcessId};

use crate::error::{DbError, DbResult};
use crate::SQLITE;

/// The segment directory of a file database.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
}

/// `<database>.logs`, next to the database file.
pub(crate) fn dir_of(database: &Path) -> PathBuf {
    let mut name = OsString::from(database.as_os_str());
    name.push(".logs");
    PathBuf::from(name)
}

fn store_error(message: String) -> DbError {
    DbError::Domain(Error::store(SQLITE, message))
}

impl Segments {
    /// Opens the segment directory of `database`, creating it (mode 0700) when missing.
    pub(crate) fn open(database: &Path) -> sandbox_core::Result<Segments> {
        let dir = dir_of(database);
        let mut b = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        match b.create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => {
                return Err(Error::store(
                    SQLITE,
                    format!("create the log segment directory {}: {e}", dir.display()),
                ))
            }
        }
        Ok(Segments { dir })
    }

    /// The segment file of log `log_id`.
    pub(crate) fn path(&self, log_id: i64) -> PathBuf {
        self.dir.join(format!("{log_id}.ndjson"))
    }

    /// Creates (or empties: a leftover of a log id whose creation was rolled back) the segment
    /// of a new log, mode 0600.
    pub(crate) fn create(&self, log_id: i64) -> DbResult<SegmentFile> {
        let path = self.path(log_id);
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(&path) {
            Ok(file) => Ok(SegmentFile { file, path }),
            Err(e) => Err(store_error(format!(
                "create the log segment {}: {e}",
                path.display()
            ))),
        }
    }

    /// Reads `len` bytes at `offset` of the segment of log `log_id` (of process `id`).
    pub(crate) fn read(
        &self,
        log_id: i64,
        id: &ProcessId,
        offset: u64,
        len: usize,
    ) -> DbResult<Vec<u8>> {
        let path = self.path(log_id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(store_error(format!(
                    "the log segment {} of process {id} is missing: the database indexes its \
                     output but the file is gone. The `.logs` directory next to the database \
                     file is part of the store; restore it with the database",
                    path.display()
                )))
            }
            Err(e) => {
                return Err(store_error(format!(
                    "open the log segment {} of process {id}: {e}",
                    path.display()
                )))
            }
        };
        let mut buf = vec![0; len];
        match read_exact_at(&file, &mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(store_error(format!(
                "the log segment {} of process {id} is shorter than its index ({len} bytes at \
                 offset {offset} are indexed): the file was truncated or replaced",
                path.display()
            ))),
            Err(e) => Err(store_error(format!(
                "read the log segment {} of process {id}: {e}",
                path.display()
            ))),
        }
    }
}

/// The open segment of a log, held by its writer.
#[derive(Debug)]
pub(crate) struct SegmentFile {
    file: File,
    path: PathBuf,
}

impl SegmentFile {
    /// Writes `bytes` at `offset`. Once this returns the bytes are in the operating system's
    /// page cache: they survive the death of this process.
    pub(crate) fn write_at(&self, bytes: &[u8], offset: u64) -> DbResult<()> {
        write_all_at(&self.file, bytes, offset).map_err(|e| {
            store_error(format!(
                "write the log segment {}: {e}",
                self.path.display()
            ))
        })
    }

    /// Makes every write durable (power loss included).
    pub(crate) fn sync(&self) -> DbResult<()> {
        self.file
            .sync_data()
            .map_err(|e| store_error(format!("sync the log segment {}: {e}", self.path.display())))
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut bytes: &[u8], mut offset: u64) -> io::Result<()> {
    while !bytes.is_empty() {
        match std::os::windows::fs::FileExt::seek_write(file, bytes, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
