//! [`SpritesConfig`]: the `sprites` section of a [`SandboxConfig`] plus the environment.

use std::fmt;

use sandbox_core::{Env, Error, Result, SandboxConfig, SandboxId};
use serde::{Deserialize, Serialize};

use crate::SPRITES;

/// The API used when neither `SPRITES_API_BASE_URL` nor `SPRITES_API_URL` is set.
pub const DEFAULT_BASE_URL: &str = "https://api.sprites.dev";

/// The workspace root inside a sprite when the config names none: the sprite user's home.
pub const DEFAULT_WORKSPACE: &str = "/home/sprite";

/// Token variables, in the order they are read.
pub const TOKEN_VARS: [&str; 2] = ["SPRITES_API_TOKEN", "SPRITE_TOKEN"];

/// Base URL variables, in the order they are read.
pub const BASE_URL_VARS: [&str; 2] = ["SPRITES_API_BASE_URL", "SPRITES_API_URL"];

/// Variable overriding the default of `deleteOnStop`.
pub const DELETE_ON_STOP_VAR: &str = "SANDBOX_SPRITES_DELETE_ON_STOP";

/// Who may open a sprite's URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UrlAuth {
    /// Only holders of a token (the API's default).
    Sprite,
    /// Anyone.
    Public,
}

impl UrlAuth {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            UrlAuth::Sprite => "sprite",
            UrlAuth::Public => "public",
        }
    }
}

/// `sprites.urlSettings` of the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlSettingsSection {
    /// `sprite` (default) or `public`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<UrlAuth>,
}

/// The `sprites` section of the config, as written in JSON (camelCase).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpritesSection {
    /// Sprite name; default `ekairos-<sandboxId>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Wait for capacity instead of failing when the region is full (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_capacity: Option<bool>,
    /// URL access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_settings: Option<UrlSettingsSection>,
    /// Delete the sprite when the sandbox is stopped (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_on_stop: Option<bool>,
    /// Workspace root inside the sprite (default `/home/sprite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_root: Option<String>,
}

/// Everything the provider needs: the parsed section plus credentials and endpoint.
///
/// Built once by [`SpritesConfig::from_config`]; its `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct SpritesConfig {
    token: String,
    /// API base URL without a trailing slash.
    pub base_url: String,
    /// Fixed sprite name, when configured.
    pub name: Option<String>,
    /// `wait_for_capacity` sent on create.
    pub wait_for_capacity: bool,
    /// `url_settings.auth` sent on create.
    pub url_auth: UrlAuth,
    /// Whether [`sandbox_core::StopMode::Default`] deletes the sprite.
    pub delete_on_stop: bool,
    /// Workspace root inside the sprite.
    pub workspace_root: String,
}

impl fmt::Debug for SpritesConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpritesConfig")
            .field("token", &"<redacted>")
            .field("base_url", &self.base_url)
            .field("name", &self.name)
            .field("wait_for_capacity", &self.wait_for_capacity)
            .field("url_auth", &self.url_auth)
            .field("delete_on_stop", &self.delete_on_stop)
            .field("workspace_root", &self.workspace_root)
            .finish()
    }
}

impl SpritesConfig {
    /// Reads the `sprites` section of `config` and the environment.
    ///
    /// # Errors
    /// [`Error::Unauthorized`] naming `SPRITES_API_TOKEN` / `SPRITE_TOKEN` when no token is
    /// set; [`Error::InvalidInput`] for a malformed section, base URL, sprite name or
    /// workspace root.
    pub fn from_config(config: &SandboxConfig, env: &Env) -> Result<Self> {
        let section: SpritesSection = config.section(SPRITES)?;
        let token = env.first(&TOKEN_VARS).ok_or_else(|| Error::Unauthorized {
            provider: SPRITES.into(),
            message: "Missing required Sprites token env var: SPRITES_API_TOKEN (or SPRITE_TOKEN)"
                .into(),
        })?;
        let base_url = env
            .first(&BASE_URL_VARS)
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        let base_url = validate_base_url(&base_url)?;
        let name = section
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| validate_name(n).map(|()| n.to_string()))
            .transpose()?;
        let workspace_root = section
            .workspace_root
            .as_deref()
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .unwrap_or(DEFAULT_WORKSPACE)
            .trim_end_matches('/')
            .to_string();
        if !workspace_root.starts_with('/') || workspace_root.contains('\0') {
            return Err(Error::invalid(
                "sprites_workspace_invalid",
                format!("sprites.workspaceRoot {workspace_root:?} must be an absolute path"),
            ));
        }
        Ok(SpritesConfig {
            token,
            base_url,
            name,
            wait_for_capacity: section.wait_for_capacity.unwrap_or(true),
            url_auth: section
                .url_settings
                .and_then(|u| u.auth)
                .unwrap_or(UrlAuth::Sprite),
            delete_on_stop: section
                .delete_on_stop
                .or_else(|| env.flag(DELETE_ON_STOP_VAR))
                .unwrap_or(true),
            workspace_root,
        })
    }

    /// The bearer token (for the `Authorization` header only).
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The sprite name for a sandbox: the configured one, else `ekairos-<sandboxId>`.
    pub fn sprite_name(&self, sandbox_id: &SandboxId) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("ekairos-{sandbox_id}"))
    }
}

fn validate_base_url(raw: &str) -> Result<String> {
    let trimmed = raw.trim().trim_end_matches('/');
    let parsed = url::Url::parse(trimmed).map_err(|e| {
        Error::invalid(
            "sprites_base_url_invalid",
            format!("SPRITES_API_BASE_URL {trimmed:?} is not a URL: {e}"),
        )
    })?;
    // Credentials in the URL would show in every message and log that names the endpoint.
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(Error::invalid(
            "sprites_base_url_invalid",
            "SPRITES_API_BASE_URL must not carry credentials: the token goes in SPRITES_API_TOKEN",
        ));
    }
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(Error::invalid(
            "sprites_base_url_invalid",
            format!("SPRITES_API_BASE_URL {trimmed:?} must be an http(s) URL"),
        ));
    }
    Ok(trimmed.to_string())
}

/// Sprite names become part of URLs: lowercase letters, digits and hyphens.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "sprites_name_invalid",
            format!("sprite name {name:?} is invalid: use lowercase letters, digits and hyphens"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn reads_token_base_url_and_section_with_upstream_fallbacks() {
        let cfg = SandboxConfig::from_json(
            r#"{"sprites":{"name":"my-box","waitForCapacity":false,
                "urlSettings":{"auth":"public"},"deleteOnStop":false}}"#,
        )
        .unwrap();
        let c = SpritesConfig::from_config(
            &cfg,
            &env(&[
                ("SPRITES_API_TOKEN", " "),
                ("SPRITE_TOKEN", "tok-123"),
                ("SPRITES_API_URL", "http://127.0.0.1:9/"),
            ]),
        )
        .unwrap();
        assert_eq!(c.token(), "tok-123");
        assert_eq!(c.base_url, "http://127.0.0.1:9");
        assert_eq!(c.name.as_deref(), Some("my-box"));
        assert!(!c.wait_for_capacity);
        assert_eq!(c.url_auth, UrlAuth::Public);
        assert!(!c.delete_on_stop);
        assert_eq!(c.workspace_root, DEFAULT_WORKSPACE);
    }

    #[test]
    fn defaults_are_private_urls_waiting_for_capacity_and_deleting_on_stop() {
        let c = SpritesConfig::from_config(
            &SandboxConfig::default(),
            &env(&[("SPRITES_API_TOKEN", "t")]),
        )
        .unwrap();
        assert_eq!(c.base_url, DEFAULT_BASE_URL);
        assert_eq!(c.url_auth, UrlAuth::Sprite);
        assert!(c.wait_for_capacity && c.delete_on_stop);
        let id = SandboxId::new();
        assert_eq!(c.sprite_name(&id), format!("ekairos-{id}"));
        let c = SpritesConfig::from_config(
            &SandboxConfig::default(),
            &env(&[("SPRITES_API_TOKEN", "t"), (DELETE_ON_STOP_VAR, "no")]),
        )
        .unwrap();
        assert!(!c.delete_on_stop);
    }

    #[test]
    fn a_missing_token_names_both_variables() {
        let e = SpritesConfig::from_config(&SandboxConfig::default(), &env(&[])).unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("SPRITES_API_TOKEN") && msg.contains("SPRITE_TOKEN"),
            "{msg}"
        );
    }

    #[test]
    fn bad_input_is_rejected() {
        let tok = [("SPRITES_API_TOKEN", "t")];
        let bad_name = SandboxConfig::from_json(r#"{"sprites":{"name":"My Box"}}"#).unwrap();
        assert_eq!(
            SpritesConfig::from_config(&bad_name, &env(&tok))
                .unwrap_err()
                .code(),
            "sprites_name_invalid"
        );
        let bad_auth =
            SandboxConfig::from_json(r#"{"sprites":{"urlSettings":{"auth":"x"}}}"#).unwrap();
        assert_eq!(
            SpritesConfig::from_config(&bad_auth, &env(&tok))
                .unwrap_err()
                .code(),
            "sandbox_config_invalid"
        );
        let e = SpritesConfig::from_config(
            &SandboxConfig::default(),
            &env(&[
                ("SPRITES_API_TOKEN", "t"),
                ("SPRITES_API_BASE_URL", "ftp://x"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.code(), "sprites_base_url_invalid");
        let e = SpritesConfig::from_config(
            &SandboxConfig::default(),
            &env(&[
                ("SPRITES_API_TOKEN", "t"),
                (
                    "SPRITES_API_BASE_URL",
                    "https://me:url-secret@proxy.example",
                ),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.code(), "sprites_base_url_invalid");
        assert!(!e.to_string().contains("url-secret"), "{e}");
    }

    #[test]
    fn debug_redacts_the_token() {
        let c = SpritesConfig::from_config(
            &SandboxConfig::default(),
            &env(&[("SPRITES_API_TOKEN", "super-secret-token")]),
        )
        .unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("super-secret-token"), "{d}");
        assert!(d.contains("redacted"));
    }
}
