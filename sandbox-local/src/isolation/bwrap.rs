//! bubblewrap: each command in fresh mount, pid, ipc and uts namespaces (and a fresh network
//! namespace unless the sandbox declares ports or network access).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::Launch;

/// System directories bound read-only (or recreated as symlinks, on merged-/usr systems).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// Finds `bwrap` and checks it can really create the namespaces we use: user namespaces may
/// be disabled even where the binary is installed.
pub(crate) fn detect() -> Result<PathBuf, String> {
    let bwrap =
        find_bwrap().ok_or_else(|| "bwrap is not installed (package bubblewrap)".to_string())?;
    let out = std::process::Command::new(&bwrap)
        .args(namespace_args(false))
        .args([
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "/bin/true",
        ])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bwrap.display()))?;
    if out.status.success() {
        Ok(bwrap)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{} cannot create namespaces here ({}): {}",
            bwrap.display(),
            out.status,
            stderr.trim()
        ))
    }
}

fn find_bwrap() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/local/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
}

fn namespace_args(network: bool) -> Vec<&'static str> {
    let mut args = vec![
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        // A new session detaches from the caller's terminal (no TIOCSTI injection).
        "--new-session",
    ];
    if !network {
        args.push("--unshare-net");
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // bwrap run by root keeps root's capabilities inside; with them a command could
        // remount the read-only binds or mknod and mount the host's disk.
        args.extend(["--cap-drop", "ALL"]);
    }
    args
}

/// The host path that backs `path` inside the sandbox: the workspace is bound at its own
/// path, `/tmp` is the private tmp, everything else is the host's (read-only).
pub(crate) fn host_path(path: &Path, workspace: &Path, private_tmp: &Path) -> PathBuf {
    if path.starts_with(workspace) {
        return path.to_path_buf();
    }
    match path.strip_prefix("/tmp") {
        Ok(rest) => private_tmp.join(rest),
        Err(_) => path.to_path_buf(),
    }
}

/// `bwrap <namespaces> <mounts> --chdir <cwd> -- argv...`, with the environment of `launch`.
pub(crate) fn command(bwrap: &Path, launch: &Launch<'_>) -> Command {
    let mut args: Vec<OsString> = namespace_args(launch.network)
        .into_iter()
        .map(OsString::from)
        .collect();
    args.extend(["--hostname", "sandbox"].map(OsString::from));
    for dir in SYSTEM_DIRS {
        let p = Path::new(dir);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(p) {
                    args.extend([OsString::from("--symlink"), target.into(), p.into()]);
                }
            }
            Ok(m) if m.is_dir() => {
                args.extend([OsString::from("--ro-bind"), p.into(), p.into()]);
            }
            _ => {}
        }
    }
    args.extend(["--dev", "/dev", "--proc", "/proc"].map(OsString::from));
    // /tmp first: a workspace that lies under the host's /tmp is then mounted over it.
    args.extend([
        OsString::from("--bind"),
        launch.private_tmp.into(),
        OsString::from("/tmp"),
        OsString::from("--bind"),
        launch.workspace.into(),
        launch.workspace.into(),
        OsString::from("--chdir"),
        launch.cwd.into(),
        OsString::from("--"),
    ]);
    args.extend(launch.argv.iter().map(OsString::from));
    let mut cmd = Command::new(bwrap);
    cmd.args(args).env_clear().envs(launch.env);
    cmd
}
