//! `LocalConfig`: the `local` section of a sandbox config, and the settings resolved from it
//! and the environment.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use sandbox_core::{Env, Error, Result, SandboxConfig};

use crate::isolation::IsolationMode;
use crate::LOCAL;

/// Environment variable naming the directory that holds every local sandbox.
pub const ROOT_ENV: &str = "SANDBOX_LOCAL_ROOT";

/// Environment variable selecting the isolation mode: `auto|bwrap|landlock|none`.
pub const ISOLATION_ENV: &str = "SANDBOX_LOCAL_ISOLATION";

/// The `local` section of a config (camelCase JSON). Every field is optional.
///
/// ```json
/// { "local": { "isolation": "bwrap", "persistent": false, "deleteOnStop": true,
///              "root": "/var/lib/sandboxes", "network": false } }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    /// `auto` (default: strongest available), `bwrap`, `landlock` or `none`. Wins over
    /// `SANDBOX_LOCAL_ISOLATION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<IsolationMode>,
    /// Keep the workspace when the sandbox stops (same as `deleteOnStop: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Delete the workspace when the sandbox stops (default `true`). The TypeScript package's
    /// `cleanup` is read as this field.
    #[serde(default, alias = "cleanup", skip_serializing_if = "Option::is_none")]
    pub delete_on_stop: Option<bool>,
    /// Directory holding the sandboxes. Wins over `SANDBOX_LOCAL_ROOT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Give sandboxed commands the host network even without declared ports (bubblewrap
    /// unshares the network otherwise; Landlock denies TCP bind/connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<bool>,
}

impl LocalConfig {
    /// Reads the `local` section of `config`.
    ///
    /// # Errors
    /// A section of the wrong shape (e.g. an unknown isolation mode) is invalid input.
    pub fn from_config(config: &SandboxConfig) -> Result<Self> {
        config.section::<LocalConfig>(LOCAL)
    }

    /// `self` with every field `other` sets replaced by `other`'s value. `persistent` and
    /// `deleteOnStop` say the same thing: when `other` sets either, both come from `other`.
    pub fn overridden_by(&self, other: &LocalConfig) -> LocalConfig {
        let (persistent, delete_on_stop) =
            if other.persistent.is_some() || other.delete_on_stop.is_some() {
                (other.persistent, other.delete_on_stop)
            } else {
                (self.persistent, self.delete_on_stop)
            };
        LocalConfig {
            isolation: other.isolation.or(self.isolation),
            persistent,
            delete_on_stop,
            root: other.root.clone().or_else(|| self.root.clone()),
            network: other.network.or(self.network),
        }
    }

    /// Whether stopping the sandbox deletes its workspace.
    ///
    /// # Errors
    /// `persistent: true` together with `deleteOnStop: true` is contradictory input.
    pub fn delete_on_stop(&self) -> Result<bool> {
        match (self.persistent, self.delete_on_stop) {
            (Some(true), Some(true)) => Err(Error::invalid(
                "sandbox_local_config_invalid",
                "local.persistent: true contradicts local.deleteOnStop: true; set only one",
            )),
            (_, Some(delete)) => Ok(delete),
            (Some(persistent), None) => Ok(!persistent),
            (None, None) => Ok(true),
        }
    }
}

/// What a [`crate::LocalProvider`] is built with: the provider-wide defaults. Each `create`
/// may override them with the `local` section of its own config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettings {
    /// Directory holding `<sandboxId>/workspace`, `<sandboxId>/checkpoints`, `<sandboxId>/tmp`.
    pub root: PathBuf,
    /// Defaults for every sandbox (root already resolved into [`LocalSettings::root`]).
    pub defaults: LocalConfig,
}

impl LocalSettings {
    /// Resolves the settings: the config's `local` section, then `SANDBOX_LOCAL_ISOLATION` and
    /// `SANDBOX_LOCAL_ROOT`, then the user's data directory.
    ///
    /// # Errors
    /// A malformed `local` section or isolation value; no root at all (no data directory).
    pub fn resolve(config: &SandboxConfig, env: &Env) -> Result<Self> {
        let mut defaults = LocalConfig::from_config(config)?;
        if defaults.isolation.is_none() {
            if let Some(v) = env.first(&[ISOLATION_ENV]) {
                defaults.isolation = Some(v.parse().map_err(|e: Error| {
                    Error::invalid(e.code(), format!("{ISOLATION_ENV}: {e}"))
                })?);
            }
        }
        defaults.delete_on_stop()?;
        let root = match defaults.root.take() {
            Some(root) => root,
            None => match env.first(&[ROOT_ENV]) {
                Some(root) => PathBuf::from(root),
                None => default_root()?,
            },
        };
        if !root.is_absolute() {
            return Err(Error::invalid(
                "sandbox_local_root_invalid",
                format!(
                    "local sandbox root {} must be an absolute path",
                    root.display()
                ),
            ));
        }
        Ok(LocalSettings { root, defaults })
    }
}

/// `<data dir>/ekairos-sandbox/local`.
fn default_root() -> Result<PathBuf> {
    dirs::data_dir()
        .map(|d| d.join("ekairos-sandbox").join("local"))
        .ok_or_else(|| {
            Error::invalid(
                "sandbox_local_root_invalid",
                format!("no user data directory on this machine: set {ROOT_ENV}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> SandboxConfig {
        SandboxConfig::from_json(json).unwrap()
    }

    #[test]
    fn section_fields_parse_in_camel_case() {
        let c = LocalConfig::from_config(&cfg(
            r#"{"local": {"isolation": "landlock", "persistent": true, "root": "/r", "network": true}}"#,
        ))
        .unwrap();
        assert_eq!(c.isolation, Some(IsolationMode::Landlock));
        assert_eq!(c.persistent, Some(true));
        assert_eq!(c.root, Some(PathBuf::from("/r")));
        assert!(!c.delete_on_stop().unwrap());
        let c = LocalConfig::from_config(&cfg(r#"{"local": {"deleteOnStop": false}}"#)).unwrap();
        assert!(!c.delete_on_stop().unwrap());
        // Upstream's `cleanup`; its `basePath` and `env` are ignored, not errors.
        let c = LocalConfig::from_config(&cfg(
            r#"{"local": {"cleanup": false, "basePath": "/w", "env": {"A": "b"}}}"#,
        ))
        .unwrap();
        assert!(!c.delete_on_stop().unwrap());
        assert!(LocalConfig::default().delete_on_stop().unwrap());
    }

    #[test]
    fn unknown_isolation_mode_is_invalid_input() {
        let e =
            LocalConfig::from_config(&cfg(r#"{"local": {"isolation": "docker"}}"#)).unwrap_err();
        assert_eq!(e.code(), "sandbox_config_invalid");
        let env = Env::from_pairs([(ISOLATION_ENV, "jail"), (ROOT_ENV, "/r")]);
        let e = LocalSettings::resolve(&SandboxConfig::default(), &env).unwrap_err();
        assert_eq!(e.code(), "sandbox_local_isolation_invalid");
        assert!(e.to_string().contains(ISOLATION_ENV));
    }

    #[test]
    fn config_wins_over_environment_which_wins_over_data_dir() {
        let env = Env::from_pairs([(ISOLATION_ENV, "none"), (ROOT_ENV, "/from-env")]);
        let s = LocalSettings::resolve(&SandboxConfig::default(), &env).unwrap();
        assert_eq!(s.root, PathBuf::from("/from-env"));
        assert_eq!(s.defaults.isolation, Some(IsolationMode::None));
        let s = LocalSettings::resolve(
            &cfg(r#"{"local": {"isolation": "bwrap", "root": "/from-config"}}"#),
            &env,
        )
        .unwrap();
        assert_eq!(s.root, PathBuf::from("/from-config"));
        assert_eq!(s.defaults.isolation, Some(IsolationMode::Bwrap));
    }

    #[test]
    fn relative_root_and_contradictory_persistence_are_refused() {
        let env = Env::from_pairs([(ROOT_ENV, "relative/dir")]);
        let e = LocalSettings::resolve(&SandboxConfig::default(), &env).unwrap_err();
        assert_eq!(e.code(), "sandbox_local_root_invalid");
        let e = LocalSettings::resolve(
            &cfg(r#"{"local": {"persistent": true, "deleteOnStop": true, "root": "/r"}}"#),
            &Env::default(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "sandbox_local_config_invalid");
    }

    #[test]
    fn per_sandbox_section_overrides_provider_defaults() {
        let base = LocalConfig {
            isolation: Some(IsolationMode::Auto),
            network: Some(false),
            ..Default::default()
        };
        let over = LocalConfig {
            network: Some(true),
            persistent: Some(true),
            ..Default::default()
        };
        let merged = base.overridden_by(&over);
        assert_eq!(merged.isolation, Some(IsolationMode::Auto));
        assert_eq!(merged.network, Some(true));
        assert_eq!(merged.persistent, Some(true));
    }

    #[test]
    fn a_sandbox_persistence_setting_replaces_the_providers_either_way() {
        let persistent = LocalConfig {
            persistent: Some(true),
            ..Default::default()
        };
        let delete = LocalConfig {
            delete_on_stop: Some(true),
            ..Default::default()
        };
        assert!(persistent.overridden_by(&delete).delete_on_stop().unwrap());
        assert!(!delete.overridden_by(&persistent).delete_on_stop().unwrap());
        let keep = LocalConfig {
            delete_on_stop: Some(false),
            ..Default::default()
        };
        assert!(!keep
            .overridden_by(&LocalConfig::default())
            .delete_on_stop()
            .unwrap());
    }
}
