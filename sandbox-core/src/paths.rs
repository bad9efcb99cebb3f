//! Confinement of caller-given paths to a sandbox workspace.
//!
//! Paths inside a sandbox are POSIX strings, whatever the host is. [`confine`] resolves a
//! caller's path lexically against the workspace root and refuses anything that would leave
//! it. Symlinks are a provider's concern: a provider with a real filesystem (e.g. `local`)
//! must also refuse paths whose existing components resolve outside the root.

use crate::error::{Error, Result};

/// Resolves `path` against the absolute `root` and returns the normalised absolute path.
///
/// Relative paths are joined to `root`; absolute paths must lie under `root`; `.` and `..`
/// are resolved lexically and may not climb above `root`.
///
/// # Errors
/// `sandbox_path_invalid` for an empty path or one with NUL; `sandbox_path_outside_workspace`
/// for one that leaves `root`.
pub fn confine(root: &str, path: &str) -> Result<String> {
    if path.is_empty() || path.trim().is_empty() {
        return Err(Error::invalid("sandbox_path_invalid", "path is empty"));
    }
    if path.contains('\0') || root.contains('\0') {
        return Err(Error::invalid(
            "sandbox_path_invalid",
            format!("path {:?} contains a NUL byte", path.replace('\0', "\\0")),
        ));
    }
    let root_parts = normalise(root).ok_or_else(|| {
        Error::invalid(
            "sandbox_path_invalid",
            format!("workspace root {root:?} is not absolute"),
        )
    })?;
    let outside = || {
        Error::invalid(
            "sandbox_path_outside_workspace",
            format!("path {path:?} is outside the sandbox workspace {root}"),
        )
    };
    let mut parts: Vec<&str> = if path.starts_with('/') {
        Vec::new()
    } else {
        root_parts.clone()
    };
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                // Climbing above the root is refused even when the path comes back down.
                if parts.len() <= root_parts.len() && !path.starts_with('/') {
                    return Err(outside());
                }
                if parts.pop().is_none() {
                    return Err(outside());
                }
            }
            c => parts.push(c),
        }
    }
    if parts.len() < root_parts.len() || parts[..root_parts.len()] != root_parts[..] {
        return Err(outside());
    }
    Ok(format!("/{}", parts.join("/")))
}

/// `root` split into components, or `None` when not absolute.
fn normalise(root: &str) -> Option<Vec<&str>> {
    if !root.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for comp in root.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Some(parts)
}

/// `path` relative to `root`, for a path [`confine`] accepted (empty for the root itself).
pub fn relative_to<'a>(root: &str, path: &'a str) -> &'a str {
    let root = root.trim_end_matches('/');
    path.strip_prefix(root)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_paths_inside() {
        assert_eq!(confine("/w", "a/b.txt").unwrap(), "/w/a/b.txt");
        assert_eq!(confine("/w/", "./a//b/../c").unwrap(), "/w/a/c");
        assert_eq!(confine("/w", "/w/x").unwrap(), "/w/x");
        assert_eq!(confine("/w", ".").unwrap(), "/w");
        assert_eq!(relative_to("/w", "/w/a/c"), "a/c");
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "/w2/x",
            "/w/../etc",
            "..",
            "a/../..",
        ] {
            let e = confine("/w", bad).unwrap_err();
            assert_eq!(e.code(), "sandbox_path_outside_workspace", "{bad}");
        }
        assert_eq!(
            confine("/w", "").unwrap_err().code(),
            "sandbox_path_invalid"
        );
        assert_eq!(
            confine("/w", "a\0b").unwrap_err().code(),
            "sandbox_path_invalid"
        );
    }
}
