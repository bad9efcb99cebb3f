//! Files of a workspace: symlink-safe resolution, binary-safe reads and writes.
//!
//! The service confines caller paths lexically; here every existing component is resolved
//! (symlinks followed by hand, at most 40 hops) and the result must stay in the workspace.
//! The final component is opened with `O_NOFOLLOW`, and the opened file's real path is checked
//! again, so a symlink swapped in between resolution and open is refused too.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;

use sandbox_core::{paths, FileWrite, Result};

use crate::error;

const MAX_SYMLINK_HOPS: usize = 40;

/// Resolves the caller's absolute `path` to a real host path inside `workspace` (which must be
/// canonical). Components that do not exist yet are kept as they are.
///
/// # Errors
/// `sandbox_path_outside_workspace` when the path or a symlink on it leaves the workspace.
pub(crate) fn resolve(workspace: &Path, path: &str) -> Result<PathBuf> {
    let ws = workspace.to_string_lossy();
    let confined = paths::confine(&ws, path)?;
    let relative = paths::relative_to(&ws, &confined);
    let mut pending: VecDeque<OsString> = Path::new(relative)
        .components()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let mut resolved = workspace.to_path_buf();
    let mut hops = 0;
    let mut missing = false;
    while let Some(component) = pending.pop_front() {
        if component == ".." {
            resolved.pop();
            continue;
        }
        if component == "." || component.is_empty() {
            continue;
        }
        let candidate = resolved.join(&component);
        if missing {
            resolved = candidate;
            continue;
        }
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(error::not_a_file(path, "has too many levels of symlinks"));
                }
                let target = std::fs::read_link(&candidate)
                    .map_err(|e| error::io(format!("read link {}", candidate.display()), e))?;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for c in target.components().rev() {
                    match c {
                        Component::RootDir | Component::Prefix(_) => {}
                        other => pending.push_front(other.as_os_str().to_os_string()),
                    }
                }
            }
            Ok(_) => resolved = candidate,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing = true;
                resolved = candidate;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(error::not_a_file(
                    path,
                    "goes through something that is not a directory",
                ));
            }
            Err(e) => return Err(error::io(format!("inspect {}", candidate.display()), e)),
        }
    }
    if !resolved.starts_with(workspace) {
        return Err(error::outside(path, workspace));
    }
    Ok(resolved)
}

/// The real path of an open file, from `/proc/self/fd`.
fn opened_path(file: &File) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

/// Writes `files` into `workspace`: every path is resolved before anything is written.
pub(crate) fn write_all(workspace: &Path, files: &[FileWrite]) -> Result<()> {
    let mut targets = Vec::with_capacity(files.len());
    for f in files {
        let target = resolve(workspace, &f.path)?;
        if target == workspace {
            return Err(error::not_a_file(&f.path, "is the workspace root itself"));
        }
        if target.is_dir() {
            return Err(error::not_a_file(&f.path, "is a directory"));
        }
        targets.push(target);
    }
    for (f, target) in files.iter().zip(&targets) {
        write_one(workspace, f, target)?;
    }
    Ok(())
}

fn write_one(workspace: &Path, f: &FileWrite, target: &Path) -> Result<()> {
    let parent = target.parent().unwrap_or(workspace);
    std::fs::create_dir_all(parent)
        .map_err(|e| error::io(format!("create directories for {:?}", f.path), e))?;
    let existed = target.exists();
    // O_NONBLOCK: opening a FIFO the sandbox planted must not hang (no effect on regular files).
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(target)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => error::outside(&f.path, workspace),
            Some(libc::EISDIR) => error::not_a_file(&f.path, "is a directory"),
            // A FIFO without a reader.
            Some(libc::ENXIO) => error::not_a_file(&f.path, "is not a regular file"),
            _ => error::io(format!("open {:?} for writing", f.path), e),
        })?;
    // A parent swapped for a symlink after resolution shows up here: refuse, undo the create.
    if !opened_path(&file).is_some_and(|p| p.starts_with(workspace)) {
        if !existed {
            let _ = std::fs::remove_file(target);
        }
        return Err(error::outside(&f.path, workspace));
    }
    let meta = file
        .metadata()
        .map_err(|e| error::io(format!("inspect {:?}", f.path), e))?;
    if !meta.is_file() {
        return Err(error::not_a_file(&f.path, "is not a regular file"));
    }
    file.set_len(0)
        .and_then(|_| file.write_all(&f.content))
        .map_err(|e| error::io(format!("write {:?}", f.path), e))?;
    if let Some(mode) = f.mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| error::io(format!("chmod {:?}", f.path), e))?;
    }
    Ok(())
}

/// Reads a file of `workspace`: `None` when it does not exist.
pub(crate) fn read(workspace: &Path, path: &str) -> Result<Option<Bytes>> {
    let target = resolve(workspace, path)?;
    // O_NONBLOCK: opening a FIFO must not hang; only regular files are read.
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&target)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(error::outside(path, workspace))
        }
        Err(e) => return Err(error::io(format!("open {path:?}"), e)),
    };
    if !opened_path(&file).is_some_and(|p| p.starts_with(workspace)) {
        return Err(error::outside(path, workspace));
    }
    let meta = file
        .metadata()
        .map_err(|e| error::io(format!("inspect {path:?}"), e))?;
    if meta.is_dir() {
        return Err(error::not_a_file(path, "is a directory"));
    }
    if !meta.is_file() {
        return Err(error::not_a_file(path, "is not a regular file"));
    }
    let mut content = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut content)
        .map_err(|e| error::io(format!("read {path:?}"), e))?;
    Ok(Some(Bytes::from(content)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn workspace() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().canonicalize().unwrap().join("workspace");
        std::fs::create_dir(&ws).unwrap();
        (dir, ws)
    }

    fn p(ws: &Path, rel: &str) -> String {
        format!("{}/{rel}", ws.display())
    }

    #[test]
    fn round_trips_binary_content_and_creates_parents() {
        let (_d, ws) = workspace();
        let content: Vec<u8> = (0..=255u8).chain([0, 0, 0xff]).collect();
        write_all(&ws, &[FileWrite::new(p(&ws, "a/b/c.bin"), content.clone())]).unwrap();
        assert_eq!(read(&ws, &p(&ws, "a/b/c.bin")).unwrap().unwrap(), content);
    }

    #[test]
    fn missing_is_none_and_empty_is_some_empty() {
        let (_d, ws) = workspace();
        assert_eq!(read(&ws, &p(&ws, "nope")).unwrap(), None);
        assert_eq!(read(&ws, &p(&ws, "no/such/dir/file")).unwrap(), None);
        write_all(&ws, &[FileWrite::new(p(&ws, "empty"), Vec::new())]).unwrap();
        assert_eq!(read(&ws, &p(&ws, "empty")).unwrap(), Some(Bytes::new()));
    }

    #[test]
    fn overwriting_shrinks_and_mode_is_applied() {
        let (_d, ws) = workspace();
        write_all(&ws, &[FileWrite::new(p(&ws, "f"), "long content")]).unwrap();
        let mut f = FileWrite::new(p(&ws, "f"), "x");
        f.mode = Some(0o750);
        write_all(&ws, &[f]).unwrap();
        assert_eq!(read(&ws, &p(&ws, "f")).unwrap().unwrap(), "x");
        let mode = std::fs::metadata(ws.join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
    }

    #[test]
    fn a_symlink_planted_to_a_host_file_is_refused_for_read_and_write() {
        let (d, ws) = workspace();
        let secret = d.path().join("host-secret");
        std::fs::write(&secret, "host data").unwrap();
        symlink(&secret, ws.join("link")).unwrap();
        symlink(d.path(), ws.join("dirlink")).unwrap();
        for path in ["link", "dirlink/host-secret", "dirlink/new-file"] {
            let e = read(&ws, &p(&ws, path)).unwrap_err();
            assert_eq!(e.code(), "sandbox_path_outside_workspace", "{path}");
            let e = write_all(&ws, &[FileWrite::new(p(&ws, path), "pwned")]).unwrap_err();
            assert_eq!(e.code(), "sandbox_path_outside_workspace", "{path}");
        }
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host data");
        assert!(!d.path().join("new-file").exists());
    }

    #[test]
    fn a_symlink_that_stays_inside_is_followed() {
        let (_d, ws) = workspace();
        std::fs::create_dir(ws.join("real")).unwrap();
        symlink("real", ws.join("alias")).unwrap();
        symlink("../workspace/real/f", ws.join("rel-file")).unwrap();
        write_all(&ws, &[FileWrite::new(p(&ws, "alias/f"), "via alias")]).unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.join("real/f")).unwrap(),
            "via alias"
        );
        assert_eq!(
            read(&ws, &p(&ws, "rel-file")).unwrap().unwrap(),
            "via alias"
        );
    }

    #[test]
    fn one_bad_path_in_a_batch_writes_nothing() {
        let (_d, ws) = workspace();
        let e = write_all(
            &ws,
            &[
                FileWrite::new(p(&ws, "good"), "x"),
                FileWrite::new("/etc/passwd", "x"),
            ],
        )
        .unwrap_err();
        assert_eq!(e.code(), "sandbox_path_outside_workspace");
        assert!(!ws.join("good").exists());
    }

    #[test]
    fn writing_to_a_fifo_is_refused_without_blocking() {
        let (_d, ws) = workspace();
        let fifo = std::ffi::CString::new(ws.join("pipe").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        // Nobody reads the FIFO: a blocking open would never return.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = p(&ws, "pipe");
        let ws2 = ws.clone();
        std::thread::spawn(move || {
            let _ = tx.send(write_all(&ws2, &[FileWrite::new(path, "x")]));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("write_files blocked on a FIFO");
        assert_eq!(result.unwrap_err().code(), "sandbox_path_invalid");
        // And with a reader holding it open, it is still not written as a file.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(ws.join("pipe"))
            .unwrap();
        let e = write_all(&ws, &[FileWrite::new(p(&ws, "pipe"), "x")]).unwrap_err();
        assert_eq!(e.code(), "sandbox_path_invalid");
        drop(reader);
    }

    #[test]
    fn directories_and_the_root_are_not_files() {
        let (_d, ws) = workspace();
        std::fs::create_dir(ws.join("dir")).unwrap();
        assert_eq!(
            read(&ws, &p(&ws, "dir")).unwrap_err().code(),
            "sandbox_path_invalid"
        );
        let e = write_all(&ws, &[FileWrite::new(p(&ws, "dir"), "x")]).unwrap_err();
        assert_eq!(e.code(), "sandbox_path_invalid");
        let e = write_all(&ws, &[FileWrite::new(ws.display().to_string(), "x")]).unwrap_err();
        assert_eq!(e.code(), "sandbox_path_invalid");
    }
}
