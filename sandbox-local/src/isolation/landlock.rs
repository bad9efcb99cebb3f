//! Landlock: the command may write only in the workspace and the private tmp, may not signal
//! processes outside its domain (ABI 6+), and gets no TCP unless the sandbox declares ports or
//! network access (ABI 4+). It reads no file under `/proc` but a few global ones: Landlock
//! does not stop reading `/proc/<pid>/environ` of the caller's other processes (same user), so
//! per-process files, `/proc/self` included, are closed to it.
//!
//! The ruleset is built in the parent (it opens paths and allocates); the child only calls
//! `prctl(PR_SET_NO_NEW_PRIVS)` and `landlock_restrict_self`, both async-signal-safe, between
//! fork and exec.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    Scope, ABI,
};
use tokio::process::Command;

use sandbox_core::{Error, Result};

use super::Launch;

/// The newest ABI whose rights this crate has been tested with; newer kernels still enforce it.
const TESTED_ABI: ABI = ABI::V6;

/// Character devices a command may write to.
const WRITABLE_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Everything in the workspace and the private tmp but device nodes.
fn sandbox_rights() -> landlock::BitFlags<AccessFs> {
    AccessFs::from_all(TESTED_ABI) & !(AccessFs::MakeChar | AccessFs::MakeBlock)
}

/// Files of /proc that say nothing about other processes.
const READABLE_PROC_FILES: &[&str] = &[
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/loadavg",
    "/proc/uptime",
    "/proc/version",
    "/proc/filesystems",
];

/// The kernel's Landlock ABI version (`landlock_create_ruleset(NULL, 0, VERSION)`).
pub(crate) fn detect() -> std::result::Result<i32, String> {
    // SAFETY: the version query takes no pointer and has no side effect.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v >= 1 {
        Ok(v as i32)
    } else {
        let err = std::io::Error::last_os_error();
        Err(match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => {
                "Landlock is built into the kernel but not enabled at boot".into()
            }
            Some(libc::ENOSYS) => "the kernel has no Landlock support".into(),
            _ => format!("Landlock version query failed: {err}"),
        })
    }
}

/// Builds the ruleset of a sandbox: read and execute everywhere but in /proc (a few global
/// files excepted), everything in the workspace and the private tmp, writes to a few harmless
/// devices.
pub(crate) fn ruleset(
    workspace: &Path,
    private_tmp: &Path,
    sandboxes_root: &Path,
    network: bool,
) -> Result<Arc<OwnedFd>> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::provider(
            crate::LOCAL,
            format!("cannot build the Landlock ruleset ({what}): {e}"),
        )
    };
    let mut attr = Ruleset::default()
        .handle_access(AccessFs::from_all(TESTED_ABI))
        .map_err(|e| fail("filesystem rights", &e))?
        .scope(Scope::from_all(TESTED_ABI))
        .map_err(|e| fail("scopes", &e))?;
    if !network {
        attr = attr
            .handle_access(AccessNet::from_all(TESTED_ABI))
            .map_err(|e| fail("network rights", &e))?;
    }
    let path_fd = |p: &Path| PathFd::new(p).map_err(|e| fail(&p.display().to_string(), &e));
    // Listing any directory is allowed; reading files everywhere except /proc (another
    // process's `environ` holds the caller's secrets), the caller's home and the other sandboxes.
    let mut created = attr
        .create()
        .map_err(|e| fail("create", &e))?
        .add_rule(PathBeneath::new(
            path_fd(Path::new("/"))?,
            AccessFs::ReadDir,
        ))
        .map_err(|e| fail("/", &e))?;
    let mut hidden = vec![PathBuf::from("/proc")];
    hidden.extend(dirs::home_dir().and_then(|h| h.canonicalize().ok()));
    hidden.extend(sandboxes_root.canonicalize().ok());
    for path in readable_paths(Path::new("/"), &hidden) {
        // Entries that vanish or cannot be opened (dangling symlinks) are simply not granted.
        if let Ok(fd) = PathFd::new(&path) {
            created = created
                .add_rule(PathBeneath::new(fd, AccessFs::from_read(TESTED_ABI)))
                .map_err(|e| fail(&path.display().to_string(), &e))?;
        }
    }
    for file in READABLE_PROC_FILES {
        if let Ok(fd) = PathFd::new(file) {
            created = created
                .add_rule(PathBeneath::new(fd, AccessFs::ReadFile))
                .map_err(|e| fail(file, &e))?;
        }
    }
    created = created
        .add_rule(PathBeneath::new(path_fd(workspace)?, sandbox_rights()))
        .map_err(|e| fail("workspace", &e))?
        .add_rule(PathBeneath::new(path_fd(private_tmp)?, sandbox_rights()))
        .map_err(|e| fail("tmp", &e))?;
    for dev in WRITABLE_DEVICES {
        if let Ok(fd) = PathFd::new(dev) {
            created = created
                .add_rule(PathBeneath::new(fd, AccessFs::from_file(TESTED_ABI)))
                .map_err(|e| fail(dev, &e))?;
        }
    }
    let fd: Option<OwnedFd> = created.into();
    fd.map(Arc::new)
        .ok_or_else(|| fail("create", &"the kernel does not enforce Landlock"))
}

/// `argv` run directly, restricted by `ruleset` in the child before it executes.
pub(crate) fn command(launch: &Launch<'_>, ruleset: Arc<OwnedFd>) -> Command {
    let mut cmd = super::none::command(launch);
    let raw = ruleset.as_raw_fd();
    // SAFETY: the closure only makes raw syscalls (async-signal-safe) and builds io::Errors
    // from errno; `ruleset` is kept alive by the closure until the spawn is done.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &ruleset;
            drop_capabilities()?;
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::syscall(libc::SYS_landlock_restrict_self, raw, 0u32) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// The entries under `dir` to grant reading so that nothing in `hidden` (canonical paths) is
/// readable: siblings of hidden paths are granted whole, their ancestors are descended into.
fn readable_paths(dir: &Path, hidden: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut granted = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let real = path.canonicalize().unwrap_or_else(|_| path.clone());
        let is_symlink = entry.file_type().is_ok_and(|t| t.is_symlink());
        if hidden.iter().any(|h| *h == real || *h == path) {
            continue;
        }
        if hidden.iter().any(|h| h.starts_with(&real)) {
            // A symlink to an ancestor is reached again through its real path.
            if !is_symlink {
                granted.extend(readable_paths(&path, hidden));
            }
            continue;
        }
        granted.push(path);
    }
    granted
}

/// Drops every capability (bounding, ambient, effective, permitted, inheritable). A root
/// caller's commands would otherwise keep root's capabilities under Landlock (raw devices,
/// `ptrace`, ...). Raw syscalls only: this runs between fork and exec.
///
/// # Safety
/// Only for a freshly forked child.
unsafe fn drop_capabilities() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    // SAFETY: plain syscalls on this process; failures are harmless (an unprivileged caller has
    // no capability to drop) except capset's, which is reported.
    unsafe {
        for cap in 0..64 {
            // EINVAL past the last capability, EPERM without CAP_SETPCAP: nothing to drop.
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let mut header = Header {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_paths_and_only_them_are_left_out_of_the_readable_set() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        for d in ["home/alice/.ssh", "home/bob", "usr/bin", "srv/sandboxes/a"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(base.join("home"), base.join("users")).unwrap();
        let hidden = [base.join("home/alice"), base.join("srv/sandboxes")];
        let mut granted = readable_paths(&base, &hidden);
        granted.sort();
        assert_eq!(granted, [base.join("home/bob"), base.join("usr")]);
    }
}
