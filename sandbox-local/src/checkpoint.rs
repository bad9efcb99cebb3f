//! Checkpoints: a gzip-compressed tar of the workspace per checkpoint, with a JSON sidecar
//! (`<id>.tar.gz` + `<id>.json` under `<root>/<sandboxId>/checkpoints/`).
//!
//! Restore unpacks into a staging directory next to the workspace and swaps the two with
//! `renameat2(RENAME_EXCHANGE)`: the workspace is either wholly old or wholly new, and a failed
//! unpack leaves it untouched.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};

use sandbox_core::{now_ms, Checkpoint, Error, Missing, Result};

use crate::error;
use crate::provider::Layout;

/// The sidecar of a checkpoint archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sidecar {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    created_at: i64,
}

fn archive_path(layout: &Layout, id: &str) -> PathBuf {
    layout.checkpoints.join(format!("{id}.tar.gz"))
}

fn sidecar_path(layout: &Layout, id: &str) -> PathBuf {
    layout.checkpoints.join(format!("{id}.json"))
}

/// Ids are UUIDs we made; anything else cannot name a checkpoint (and must not name a path).
fn is_checkpoint_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Archives the workspace as a new checkpoint.
pub(crate) fn create(layout: &Layout, comment: Option<String>) -> Result<Checkpoint> {
    let id = uuid::Uuid::new_v4().to_string();
    let created_at = now_ms();
    std::fs::create_dir_all(&layout.checkpoints)
        .map_err(|e| error::io("create the checkpoints directory", e))?;
    let partial = layout.checkpoints.join(format!(".{id}.partial"));
    let result = (|| -> std::io::Result<()> {
        let file = File::create(&partial)?;
        let gz = GzEncoder::new(BufWriter::with_capacity(1 << 20, file), Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        append_tree(&mut tar, &layout.workspace, Path::new(""))?;
        let mut out = tar.into_inner()?.finish()?;
        out.flush()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&partial, archive_path(layout, &id))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(error::io("archive the workspace", e));
    }
    let sidecar = Sidecar {
        id: id.clone(),
        comment: comment.clone(),
        created_at,
    };
    let json = serde_json::to_vec(&sidecar).map_err(|e| Error::provider(crate::LOCAL, e))?;
    let tmp = layout.checkpoints.join(format!(".{id}.json.partial"));
    std::fs::write(&tmp, json)
        .and_then(|_| std::fs::rename(&tmp, sidecar_path(layout, &id)))
        .map_err(|e| error::io("record the checkpoint", e))?;
    Ok(Checkpoint {
        id,
        comment,
        created_at: Some(created_at),
    })
}

/// Appends the contents of `dir` under `name`, without following symlinks. Sockets and
/// devices are skipped: they cannot be restored meaningfully (a socket's server is gone).
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    name: &Path,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let entry_name = name.join(entry.file_name());
        // A running command may delete what was just listed: it is simply not in the archive.
        let meta = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            meta => meta?,
        };
        let kind = meta.file_type();
        if kind.is_socket() || kind.is_char_device() || kind.is_block_device() {
            continue;
        }
        if kind.is_file() {
            // O_NONBLOCK: a FIFO swapped in after the stat must not block the open.
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
            {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                file => file?,
            };
            let meta = file.metadata()?;
            if meta.is_file() {
                append_file(tar, &entry_name, &meta, file)?;
            }
            continue;
        }
        if kind.is_fifo() {
            // tar's own FIFO path sets an empty link name, which it then refuses.
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            header.set_entry_type(tar::EntryType::Fifo);
            header.set_size(0);
            tar.append_data(&mut header, &entry_name, std::io::empty())?;
            continue;
        }
        match tar.append_path_with_name(&path, &entry_name) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            appended => appended?,
        }
        if kind.is_dir() {
            match append_tree(tar, &path, &entry_name) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                appended => appended?,
            }
        }
    }
    Ok(())
}

/// Appends a regular file with exactly the size `meta` gives. A file a command is still
/// writing would otherwise be copied past that size (forever, if it keeps growing) or short
/// of it, and every entry after it would be unreadable.
fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &Path,
    meta: &std::fs::Metadata,
    file: impl Read,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    let len = meta.len();
    header.set_size(len);
    // Bytes past `len` are left out; a file that shrank is padded with zeros.
    let data = file.take(len).chain(std::io::repeat(0)).take(len);
    tar.append_data(&mut header, name, data)
}

/// Every checkpoint, oldest first.
pub(crate) fn list(layout: &Layout) -> Result<Vec<Checkpoint>> {
    let entries = match std::fs::read_dir(&layout.checkpoints) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(error::io("list checkpoints", e)),
    };
    let mut sidecars = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| error::io("list checkpoints", e))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !is_checkpoint_id(id) || !archive_path(layout, id).exists() {
            continue;
        }
        let text = std::fs::read(entry.path()).map_err(|e| error::io("read a checkpoint", e))?;
        let sidecar: Sidecar = serde_json::from_slice(&text).map_err(|e| {
            Error::protocol(
                "sandbox_local_checkpoint_corrupt",
                format!("checkpoint record {id} is unreadable: {e}"),
            )
        })?;
        sidecars.push(sidecar);
    }
    sidecars.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(sidecars
        .into_iter()
        .map(|s| Checkpoint {
            id: s.id,
            comment: s.comment,
            created_at: Some(s.created_at),
        })
        .collect())
}

/// Replaces the workspace with checkpoint `id`, atomically.
pub(crate) fn restore(layout: &Layout, id: &str) -> Result<()> {
    let archive = archive_path(layout, id);
    if !is_checkpoint_id(id) || !archive.is_file() || !sidecar_path(layout, id).is_file() {
        return Err(Error::not_found(Missing::Checkpoint, id));
    }
    let staging = layout
        .dir
        .join(format!(".restore-{}", uuid::Uuid::new_v4()));
    let unpacked = (|| -> std::io::Result<()> {
        std::fs::create_dir(&staging)?;
        let mut tar = tar::Archive::new(GzDecoder::new(BufReader::with_capacity(
            1 << 20,
            File::open(&archive)?,
        )));
        tar.set_preserve_permissions(true);
        tar.set_preserve_mtime(true);
        tar.set_unpack_xattrs(false);
        tar.set_overwrite(true);
        tar.unpack(&staging)?;
        let mode = std::fs::metadata(&layout.workspace)?.permissions().mode();
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
    })();
    if let Err(e) = unpacked {
        remove_tree(&staging);
        return Err(error::io(
            format!("restore checkpoint {id} (workspace unchanged)"),
            e,
        ));
    }
    if let Err(e) = exchange(&staging, &layout.workspace) {
        remove_tree(&staging);
        return Err(error::io(
            format!("restore checkpoint {id} (workspace unchanged)"),
            e,
        ));
    }
    // `staging` now holds the previous workspace.
    remove_tree(&staging);
    Ok(())
}

/// Swaps two directories atomically.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD is ignored for absolute paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes a directory tree, making read-only directories writable first when needed (a
/// sandboxed command may have `chmod`ed them).
pub(crate) fn remove_tree(path: &Path) {
    if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
        return;
    }
    make_writable(path);
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a local sandbox directory");
    }
}

fn make_writable(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let _ = std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(meta.permissions().mode() | 0o700),
        );
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                make_writable(&entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&dir.path().canonicalize().unwrap(), "s");
        layout.create().unwrap();
        (dir, layout)
    }

    #[test]
    fn restore_brings_back_content_modes_and_removes_newer_files() {
        let (_d, l) = layout();
        let ws = &l.workspace;
        std::fs::create_dir_all(ws.join("sub/empty")).unwrap();
        std::fs::write(ws.join("sub/script.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            ws.join("sub/script.sh"),
            std::fs::Permissions::from_mode(0o751),
        )
        .unwrap();
        std::fs::write(ws.join("kept"), "v1").unwrap();
        std::os::unix::fs::symlink("kept", ws.join("link")).unwrap();
        let cp = create(&l, Some("first".into())).unwrap();

        std::fs::write(ws.join("kept"), "v2").unwrap();
        std::fs::remove_file(ws.join("sub/script.sh")).unwrap();
        std::fs::write(ws.join("newer"), "x").unwrap();
        restore(&l, &cp.id).unwrap();

        assert_eq!(std::fs::read_to_string(ws.join("kept")).unwrap(), "v1");
        assert!(!ws.join("newer").exists());
        let mode = std::fs::metadata(ws.join("sub/script.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o751);
        assert!(ws.join("sub/empty").is_dir());
        assert_eq!(
            std::fs::read_link(ws.join("link")).unwrap(),
            Path::new("kept")
        );
        let leftovers: Vec<_> = std::fs::read_dir(&l.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".restore-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn list_is_oldest_first_with_comments() {
        let (_d, l) = layout();
        let a = create(&l, Some("a".into())).unwrap();
        let b = create(&l, None).unwrap();
        let listed = list(&l).unwrap();
        assert_eq!(listed.len(), 2);
        let ids: Vec<_> = listed.iter().map(|c| c.id.as_str()).collect();
        if a.created_at == b.created_at {
            assert!(ids.contains(&a.id.as_str()) && ids.contains(&b.id.as_str()));
        } else {
            assert_eq!(ids, [a.id.as_str(), b.id.as_str()]);
        }
        assert_eq!(
            listed
                .iter()
                .find(|c| c.id == a.id)
                .unwrap()
                .comment
                .as_deref(),
            Some("a")
        );
    }

    #[test]
    fn a_corrupt_archive_fails_and_leaves_the_workspace_as_it_was() {
        let (_d, l) = layout();
        std::fs::write(l.workspace.join("f"), "before").unwrap();
        let cp = create(&l, None).unwrap();
        std::fs::write(l.workspace.join("f"), "current").unwrap();
        std::fs::write(archive_path(&l, &cp.id), b"not a gzip stream").unwrap();
        assert!(restore(&l, &cp.id).is_err());
        assert_eq!(
            std::fs::read_to_string(l.workspace.join("f")).unwrap(),
            "current"
        );
    }

    #[test]
    fn unknown_or_malformed_ids_are_not_found() {
        let (_d, l) = layout();
        for id in ["00000000-0000-4000-8000-000000000000", "../../etc", ""] {
            assert_eq!(
                restore(&l, id).unwrap_err().code(),
                "checkpoint_not_found",
                "{id:?}"
            );
        }
    }
}

#[cfg(test)]
mod special_files {
    use super::*;

    /// Entry names and contents of a gzip tar.
    fn entries(archive: &Path) -> Vec<(String, Vec<u8>)> {
        let mut tar = tar::Archive::new(GzDecoder::new(File::open(archive).unwrap()));
        tar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn a_file_that_changes_size_while_archived_keeps_its_stat_size_and_the_archive_readable() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        let big = dir.path().join("big");
        std::fs::write(&small, "0123").unwrap();
        std::fs::write(&big, "0123456789").unwrap();
        let out = dir.path().join("a.tar.gz");
        let gz = GzEncoder::new(File::create(&out).unwrap(), Compression::fast());
        let mut tar = tar::Builder::new(gz);
        // Grew after the stat: stat of `small`, content of `big`.
        let meta = std::fs::metadata(&small).unwrap();
        append_file(
            &mut tar,
            Path::new("grew"),
            &meta,
            File::open(&big).unwrap(),
        )
        .unwrap();
        // Shrank after the stat.
        let meta = std::fs::metadata(&big).unwrap();
        append_file(
            &mut tar,
            Path::new("shrank"),
            &meta,
            File::open(&small).unwrap(),
        )
        .unwrap();
        tar.append_path_with_name(&small, "after").unwrap();
        tar.into_inner().unwrap().finish().unwrap();
        assert_eq!(
            entries(&out),
            [
                ("grew".to_string(), b"0123".to_vec()),
                ("shrank".to_string(), b"0123\0\0\0\0\0\0".to_vec()),
                ("after".to_string(), b"0123".to_vec()),
            ]
        );
    }

    #[test]
    fn a_checkpoint_taken_while_a_file_grows_restores() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(&dir.path().canonicalize().unwrap(), "s");
        l.create().unwrap();
        std::fs::write(l.workspace.join("a-log"), vec![b'x'; 4 << 20]).unwrap();
        std::fs::write(l.workspace.join("z-after"), "after").unwrap();
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let writer = {
            let done = done.clone();
            let mut log = std::fs::OpenOptions::new()
                .append(true)
                .open(l.workspace.join("a-log"))
                .unwrap();
            // Bounded, so a checkpoint that chases the end of the file still ends.
            std::thread::spawn(move || {
                for _ in 0..(32 << 20) / 4096 {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    log.write_all(&[b'y'; 4096]).unwrap();
                }
            })
        };
        let cp = create(&l, None);
        done.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let cp = cp.unwrap();
        std::fs::remove_file(l.workspace.join("z-after")).unwrap();
        restore(&l, &cp.id).unwrap();
        assert_eq!(
            std::fs::read_to_string(l.workspace.join("z-after")).unwrap(),
            "after"
        );
        assert!(std::fs::metadata(l.workspace.join("a-log")).unwrap().len() >= 4 << 20);
    }

    #[test]
    fn sockets_and_fifos_in_the_workspace_do_not_break_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(&dir.path().canonicalize().unwrap(), "s");
        l.create().unwrap();
        std::fs::write(l.workspace.join("file"), "data").unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(l.workspace.join("app.sock")).unwrap();
        let fifo = std::ffi::CString::new(l.workspace.join("pipe").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let cp = create(&l, None).unwrap();
        std::fs::remove_file(l.workspace.join("file")).unwrap();
        restore(&l, &cp.id).unwrap();
        assert_eq!(
            std::fs::read_to_string(l.workspace.join("file")).unwrap(),
            "data"
        );
    }
}
