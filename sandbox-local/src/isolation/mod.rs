//! Isolation modes: detection of what this machine offers, and wrapping of a command in the
//! chosen mode.
//!
//! | mode       | confinement                                                                  |
//! |------------|------------------------------------------------------------------------------|
//! | `bwrap`    | mount, pid, ipc, uts namespaces (+ net unless ports/network); system dirs read-only; workspace read-write; private `/tmp` |
//! | `landlock` | writes only in the workspace and the private tmp; no reads of the caller's home, other sandboxes, per-process `/proc` files; no signals outside; TCP denied unless ports/network |
//! | `none`     | none: an ordinary child process (reported as a warning on the sandbox)       |

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use sandbox_core::{Error, Result};

pub(crate) mod bwrap;
pub(crate) mod landlock;
pub(crate) mod none;

/// The isolation a sandbox actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// bubblewrap namespaces.
    Bwrap,
    /// Landlock filesystem (and, where the kernel can, network and signal) restrictions.
    Landlock,
    /// No isolation.
    None,
}

impl Isolation {
    /// Every mode, strongest first.
    pub const ALL: [Isolation; 3] = [Isolation::Bwrap, Isolation::Landlock, Isolation::None];

    /// `bwrap`, `landlock` or `none`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Isolation::Bwrap => "bwrap",
            Isolation::Landlock => "landlock",
            Isolation::None => "none",
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The isolation a caller asks for (`local.isolation`, `SANDBOX_LOCAL_ISOLATION`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsolationMode {
    /// The strongest mode available: bwrap, else landlock, else none (with a warning).
    #[default]
    Auto,
    /// bubblewrap; an error when unavailable.
    #[serde(alias = "bubblewrap")]
    Bwrap,
    /// Landlock; an error when unavailable.
    Landlock,
    /// No isolation.
    None,
}

impl FromStr for IsolationMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(IsolationMode::Auto),
            "bwrap" | "bubblewrap" => Ok(IsolationMode::Bwrap),
            "landlock" => Ok(IsolationMode::Landlock),
            "none" => Ok(IsolationMode::None),
            _ => Err(Error::invalid(
                "sandbox_local_isolation_invalid",
                format!("unknown isolation mode {s:?}: expected auto, bwrap, landlock or none"),
            )),
        }
    }
}

/// What this machine offers, detected once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    /// Absolute path of a `bwrap` that ran `/bin/true` in fresh namespaces, or why not.
    pub bwrap: std::result::Result<PathBuf, String>,
    /// The kernel's Landlock ABI version, or why Landlock is unusable.
    pub landlock_abi: std::result::Result<i32, String>,
}

impl Availability {
    /// Whether `isolation` can be used here.
    pub fn offers(&self, isolation: Isolation) -> bool {
        match isolation {
            Isolation::Bwrap => self.bwrap.is_ok(),
            Isolation::Landlock => self.landlock_abi.is_ok(),
            Isolation::None => true,
        }
    }

    /// The modes this machine offers, strongest first (always ends with `none`).
    pub fn offered(&self) -> Vec<Isolation> {
        Isolation::ALL
            .into_iter()
            .filter(|i| self.offers(*i))
            .collect()
    }

    /// The mode to use for `requested`, and the warning to store when it is `none` by default.
    ///
    /// # Errors
    /// `sandbox_local_isolation_unavailable` when an explicitly requested mode is not offered:
    /// never a silent downgrade.
    pub fn choose(&self, requested: IsolationMode) -> Result<(Isolation, Option<String>)> {
        let unavailable = |mode: &str, why: &str| {
            Error::invalid(
                "sandbox_local_isolation_unavailable",
                format!("isolation mode {mode} is not available on this machine: {why}"),
            )
        };
        match requested {
            IsolationMode::Bwrap => match &self.bwrap {
                Ok(_) => Ok((Isolation::Bwrap, None)),
                Err(why) => Err(unavailable("bwrap", why)),
            },
            IsolationMode::Landlock => match &self.landlock_abi {
                Ok(_) => Ok((Isolation::Landlock, None)),
                Err(why) => Err(unavailable("landlock", why)),
            },
            IsolationMode::None => Ok((Isolation::None, None)),
            IsolationMode::Auto => {
                if self.bwrap.is_ok() {
                    Ok((Isolation::Bwrap, None))
                } else if self.landlock_abi.is_ok() {
                    Ok((Isolation::Landlock, None))
                } else {
                    Ok((
                        Isolation::None,
                        Some(format!(
                            "no isolation available: commands run unconfined as the calling user \
                             (bwrap: {}; landlock: {})",
                            self.bwrap.as_ref().err().map_or("ok", String::as_str),
                            self.landlock_abi
                                .as_ref()
                                .err()
                                .map_or("ok", String::as_str),
                        )),
                    ))
                }
            }
        }
    }
}

/// Detects (once per process, then cached) which isolation modes this machine offers.
///
/// Detecting bubblewrap runs it once; call this from a blocking context
/// (`tokio::task::spawn_blocking`) the first time.
pub fn availability() -> &'static Availability {
    static DETECTED: OnceLock<Availability> = OnceLock::new();
    DETECTED.get_or_init(|| Availability {
        bwrap: bwrap::detect(),
        landlock_abi: landlock::detect(),
    })
}

/// Everything needed to run one command in a sandbox.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    /// argv as the caller gave it.
    pub argv: &'a [String],
    /// Resolved working directory (inside the workspace).
    pub cwd: &'a Path,
    /// The complete environment of the command.
    pub env: &'a BTreeMap<String, String>,
    /// The workspace (same absolute path inside and outside the sandbox).
    pub workspace: &'a Path,
    /// The sandbox's private tmp on the host.
    pub private_tmp: &'a Path,
    /// Whether the command may use the network.
    pub network: bool,
}

/// Finds `program` the way `execvp` would, with `PATH` from `env`, looking through `map` to
/// translate a sandbox path into the host path that backs it.
pub(crate) fn program_exists(
    program: &str,
    env: &BTreeMap<String, String>,
    cwd: &Path,
    map: impl Fn(&Path) -> PathBuf,
) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(map(p))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = Path::new(program);
        return executable(&if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        });
    }
    let path = env.get("PATH").map(String::as_str).unwrap_or("");
    path.split(':')
        .filter(|d| !d.is_empty())
        .any(|dir| executable(&Path::new(dir).join(program)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avail(bwrap: bool, landlock: bool) -> Availability {
        Availability {
            bwrap: if bwrap {
                Ok(PathBuf::from("/usr/bin/bwrap"))
            } else {
                Err("not installed".into())
            },
            landlock_abi: if landlock {
                Ok(4)
            } else {
                Err("kernel without landlock".into())
            },
        }
    }

    #[test]
    fn auto_picks_the_strongest_mode_offered() {
        assert_eq!(
            avail(true, true).choose(IsolationMode::Auto).unwrap().0,
            Isolation::Bwrap
        );
        assert_eq!(
            avail(false, true).choose(IsolationMode::Auto).unwrap().0,
            Isolation::Landlock
        );
        let (mode, warning) = avail(false, false).choose(IsolationMode::Auto).unwrap();
        assert_eq!(mode, Isolation::None);
        let warning = warning.expect("auto falling back to none must warn");
        assert!(warning.starts_with("no isolation available"), "{warning}");
        assert!(warning.contains("not installed"), "{warning}");
    }

    #[test]
    fn an_unavailable_explicit_mode_is_an_error_not_a_downgrade() {
        let e = avail(false, true).choose(IsolationMode::Bwrap).unwrap_err();
        assert_eq!(e.code(), "sandbox_local_isolation_unavailable");
        assert!(e.to_string().contains("not installed"));
        let e = avail(true, false)
            .choose(IsolationMode::Landlock)
            .unwrap_err();
        assert_eq!(e.code(), "sandbox_local_isolation_unavailable");
        let (mode, warning) = avail(true, true).choose(IsolationMode::None).unwrap();
        assert_eq!((mode, warning), (Isolation::None, None));
    }

    #[test]
    fn mode_names_parse_case_insensitively() {
        assert_eq!(
            "BWRAP".parse::<IsolationMode>().unwrap(),
            IsolationMode::Bwrap
        );
        assert_eq!(
            "bubblewrap".parse::<IsolationMode>().unwrap(),
            IsolationMode::Bwrap
        );
        assert_eq!(
            " auto ".parse::<IsolationMode>().unwrap(),
            IsolationMode::Auto
        );
        assert_eq!(
            "docker".parse::<IsolationMode>().unwrap_err().code(),
            "sandbox_local_isolation_invalid"
        );
        assert_eq!(avail(false, false).offered(), vec![Isolation::None]);
    }

    #[test]
    fn program_lookup_follows_path_like_execvp() {
        let env = BTreeMap::from([("PATH".to_string(), "/nonexistent:/bin".to_string())]);
        let id = |p: &Path| p.to_path_buf();
        assert!(program_exists("sh", &env, Path::new("/"), id));
        assert!(program_exists("/bin/sh", &env, Path::new("/"), id));
        assert!(!program_exists(
            "no-such-program-xyz",
            &env,
            Path::new("/"),
            id
        ));
        assert!(!program_exists("./no-such", &env, Path::new("/"), id));
    }
}
