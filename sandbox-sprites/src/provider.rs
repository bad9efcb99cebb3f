//! [`SpritesProvider`] and [`SpritesSandbox`]: the [`Provider`] contract on the Sprites API.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sandbox_core::{
    Capabilities, Checkpoint, CreateRequest, Env, Error, ExecRequest, Execution, FileWrite,
    Provider, Provisioned, Result, ResumeRequest, RetryPolicy, SandboxConfig, SandboxHandle,
    StopMode,
};
use serde_json::{json, Value};

use crate::client::{CheckpointInfo, CreateSprite, SpriteInfo, SpritesClient, UrlSettings};
use crate::config::{validate_name, SpritesConfig, SpritesSection};
use crate::{exec, SPRITES};

/// How many file transfers run at once in one `write_files`.
const FILE_CONCURRENCY: usize = 8;

/// The `sprites` provider: provisions sprites and rebuilds handles to them by name.
#[derive(Debug, Clone)]
pub struct SpritesProvider {
    config: SpritesConfig,
    client: SpritesClient,
}

impl SpritesProvider {
    /// A provider for `config`, retrying with the default [`RetryPolicy`].
    ///
    /// # Errors
    /// The HTTP client cannot be built (no TLS roots).
    pub fn new(config: SpritesConfig) -> Result<Self> {
        let client = SpritesClient::new(&config, RetryPolicy::default())?;
        Ok(SpritesProvider { config, client })
    }

    /// Reads the `sprites` section of `config` and the environment.
    ///
    /// # Errors
    /// See [`SpritesConfig::from_config`].
    pub fn from_config(config: &SandboxConfig, env: &Env) -> Result<Self> {
        Self::new(SpritesConfig::from_config(config, env)?)
    }

    /// Replaces the retry policy (e.g. [`RetryPolicy::none`] in tests of failures).
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.client = self.client.with_retry(retry);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SpritesConfig {
        &self.config
    }

    /// The provider's config with the create request's own `sprites` section applied.
    fn config_for(&self, config: &SandboxConfig) -> Result<SpritesConfig> {
        let section: SpritesSection = config.section(SPRITES)?;
        let mut c = self.config.clone();
        if let Some(name) = section
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            validate_name(name)?;
            c.name = Some(name.to_string());
        }
        if let Some(w) = section.wait_for_capacity {
            c.wait_for_capacity = w;
        }
        if let Some(a) = section.url_settings.and_then(|u| u.auth) {
            c.url_auth = a;
        }
        if let Some(d) = section.delete_on_stop {
            c.delete_on_stop = d;
        }
        if let Some(w) = section
            .workspace_root
            .as_deref()
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            if !w.starts_with('/') {
                return Err(Error::invalid(
                    "sprites_workspace_invalid",
                    format!("sprites.workspaceRoot {w:?} must be an absolute path"),
                ));
            }
            c.workspace_root = w.trim_end_matches('/').to_string();
        }
        Ok(c)
    }

    fn sandbox(
        &self,
        info: &SpriteInfo,
        url: Option<String>,
        delete_on_stop: bool,
        workspace: String,
    ) -> SpritesSandbox {
        SpritesSandbox {
            client: self.client.clone(),
            name: info.name.clone(),
            url,
            delete_on_stop,
            workspace,
        }
    }
}

/// The constructor registered as `sprites`.
pub fn open(config: &SandboxConfig, env: &Env) -> Result<Arc<dyn Provider>> {
    Ok(Arc::new(SpritesProvider::from_config(config, env)?))
}

#[async_trait]
impl Provider for SpritesProvider {
    fn name(&self) -> &str {
        SPRITES
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    /// One `POST /v1/sprites` for a new sprite; an existing sprite of the same
    /// (deterministic) name is looked up and reused, so a retried create makes one sprite.
    async fn create(&self, req: &CreateRequest) -> Result<Provisioned> {
        let config = self.config_for(&req.config)?;
        let name = config.sprite_name(&req.sandbox_id);
        let info = self
            .client
            .create_sprite(&CreateSprite {
                name: &name,
                wait_for_capacity: config.wait_for_capacity,
                url_settings: UrlSettings {
                    auth: config.url_auth.as_str(),
                },
            })
            .await?;
        let url = info.url.clone().filter(|u| !u.trim().is_empty());
        let params = json!({
            "id": info.id,
            "name": info.name,
            "url": url,
            "urlSettings": { "auth": config.url_auth.as_str() },
            "deleteOnStop": config.delete_on_stop,
            "workspaceRoot": config.workspace_root,
        });
        let handle = self.sandbox(
            &info,
            url.clone(),
            config.delete_on_stop,
            config.workspace_root.clone(),
        );
        Ok(Provisioned {
            handle: Arc::new(handle),
            external_id: info.name,
            url,
            params,
            warnings: vec![],
        })
    }

    /// One `GET /v1/sprites/{name}`: checks the sprite exists (a read does not wake it) and
    /// refreshes its URL.
    async fn resume(&self, req: &ResumeRequest) -> Result<Arc<dyn SandboxHandle>> {
        let name = req
            .params
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or(&req.external_id)
            .to_string();
        validate_name(&name)?;
        let info = self.client.get_sprite(&name).await?;
        let url = info
            .url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .or_else(|| req.url.clone());
        let delete_on_stop = req
            .params
            .get("deleteOnStop")
            .and_then(Value::as_bool)
            .unwrap_or(self.config.delete_on_stop);
        let workspace = req
            .params
            .get("workspaceRoot")
            .and_then(Value::as_str)
            .filter(|w| w.starts_with('/'))
            .map(str::to_string)
            .unwrap_or_else(|| self.config.workspace_root.clone());
        Ok(Arc::new(self.sandbox(
            &info,
            url,
            delete_on_stop,
            workspace,
        )))
    }
}

/// One sprite.
#[derive(Debug, Clone)]
pub struct SpritesSandbox {
    client: SpritesClient,
    name: String,
    url: Option<String>,
    delete_on_stop: bool,
    workspace: String,
}

impl SpritesSandbox {
    /// The sprite's name (its id in the API).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sprite's public URL, when it has one.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }
}

#[async_trait]
impl SandboxHandle for SpritesSandbox {
    fn workspace(&self) -> &str {
        &self.workspace
    }

    /// One WebSocket session; argv, `dir` and `env` go as query parameters, never as a shell
    /// string.
    async fn exec(&self, req: ExecRequest) -> Result<Execution> {
        exec::start(&self.client, &self.name, req).await
    }

    /// One `fs/write` per file, sent concurrently. A path given twice is written once, with
    /// its last content, as writing in order would leave it.
    async fn write_files(&self, files: Vec<FileWrite>) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        let mut files: Vec<FileWrite> = files
            .into_iter()
            .rev()
            .filter(|f| seen.insert(f.path.clone()))
            .collect();
        files.reverse();
        futures::stream::iter(files)
            .map(|f| async move {
                self.client
                    .write_file(&self.name, &f.path, &f.content, f.mode)
                    .await
            })
            .buffer_unordered(FILE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
    }

    /// One `fs/read`; `ENOENT` is `None`.
    async fn read_file(&self, path: &str) -> Result<Option<Bytes>> {
        self.client.read_file(&self.name, path).await
    }

    /// The sprite URL with `port` set; 8080 (what the sprite URL serves) is the URL itself.
    async fn port_url(&self, port: u16) -> Result<String> {
        let base = self
            .url
            .as_deref()
            .map(|u| u.trim().trim_end_matches('/'))
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                Error::provider(
                    SPRITES,
                    format!("sprites_url_missing: sprite {} has no URL", self.name),
                )
            })?;
        Ok(port_url(base, port))
    }

    async fn checkpoint(&self, comment: Option<String>) -> Result<Checkpoint> {
        let comment = comment
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        let events = self
            .client
            .create_checkpoint(&self.name, comment.as_deref())
            .await?;
        let from_messages = events
            .iter()
            .filter_map(|e| e.data.as_ref().and_then(Value::as_str))
            .filter_map(checkpoint_id_in)
            .next_back();
        let id = match from_messages {
            Some(id) => id,
            // The id is only in human-readable text; when it is not there, the newest entry of
            // the list is the one just made.
            None => self
                .list_checkpoints()
                .await?
                .pop()
                .map(|c| c.id)
                .ok_or_else(|| {
                    Error::provider(
                        SPRITES,
                        format!("sprites_checkpoint_id_missing: sprite {}", self.name),
                    )
                })?,
        };
        Ok(Checkpoint {
            id,
            comment,
            created_at: Some(sandbox_core::now_ms()),
        })
    }

    async fn list_checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let mut list: Vec<Checkpoint> = self
            .client
            .list_checkpoints(&self.name)
            .await?
            .into_iter()
            .map(to_checkpoint)
            .collect();
        list.sort_by_key(|c| (c.created_at.unwrap_or(i64::MIN), version_number(&c.id)));
        Ok(list)
    }

    /// Waits for the restore's `complete` event; an `error` event is an error.
    async fn restore(&self, checkpoint_id: &str) -> Result<()> {
        self.client
            .restore_checkpoint(&self.name, checkpoint_id)
            .await
            .map(drop)
    }

    /// `Delete` (or `Default` with `deleteOnStop`) deletes the sprite: one request. `Keep`
    /// kills the sprite's running exec sessions and leaves it to hibernate.
    async fn stop(&self, mode: StopMode) -> Result<()> {
        let delete = match mode {
            StopMode::Delete => true,
            StopMode::Keep => false,
            StopMode::Default => self.delete_on_stop,
        };
        if delete {
            return self.client.delete_sprite(&self.name).await;
        }
        for s in self.client.list_exec_sessions(&self.name).await? {
            if s.is_active == Some(false) {
                continue;
            }
            let id =
                s.id.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| s.id.to_string());
            match self.client.kill_exec_session(&self.name, &id).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn to_checkpoint(c: CheckpointInfo) -> Checkpoint {
    Checkpoint {
        created_at: c.create_time.as_deref().and_then(parse_rfc3339_ms),
        comment: c.comment.filter(|s| !s.is_empty()),
        id: c.id,
    }
}

fn version_number(id: &str) -> u64 {
    id.strip_prefix('v')
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `port` on the sprite URL: 8080 is the URL itself; an unparsable URL gets `:<port>` appended.
pub(crate) fn port_url(base: &str, port: u16) -> String {
    if port == 8080 {
        return base.to_string();
    }
    match url::Url::parse(base) {
        Ok(mut u) if u.has_host() => match u.set_port(Some(port)) {
            Ok(()) => u.as_str().trim_end_matches('/').to_string(),
            Err(()) => format!("{base}:{port}"),
        },
        _ => format!("{base}:{port}"),
    }
}

/// The checkpoint id in a progress message: the last `Checkpoint vN` or `ID: vN`.
pub(crate) fn checkpoint_id_in(text: &str) -> Option<String> {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '.' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let mut found = None;
    for pair in words.windows(2) {
        let lead = pair[0].to_ascii_lowercase();
        let candidate = pair[1];
        let is_version = candidate.len() > 1
            && candidate.starts_with(['v', 'V'])
            && candidate[1..].bytes().all(|b| b.is_ascii_digit());
        if is_version && matches!(lead.as_str(), "checkpoint" | "id:" | "id") {
            found = Some(format!("v{}", &candidate[1..]));
        }
    }
    found
}

/// Epoch milliseconds of an RFC 3339 time (`2026-01-05T10:30:00.5Z`, `...+02:00`).
pub(crate) fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !matches!(s.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let f = &frac[..digits];
        millis = format!("{f:0<3}")[..3].parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
            // `get`: a server's text may put a multi-byte character where digits belong.
            let oh: i64 = r.get(1..3)?.parse().ok()?;
            let om: i64 = r.get(4..6)?.parse().ok()?;
            let sign = if r.starts_with('-') { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_ids_come_from_the_last_matching_message() {
        assert_eq!(
            checkpoint_id_in("Checkpoint v8 created").as_deref(),
            Some("v8")
        );
        assert_eq!(checkpoint_id_in("Saved. ID: v12").as_deref(), Some("v12"));
        assert_eq!(checkpoint_id_in("Creating checkpoint..."), None);
        assert_eq!(checkpoint_id_in("checkpoint vX"), None);
        assert_eq!(
            checkpoint_id_in("Checkpoint v1 then Checkpoint v2").as_deref(),
            Some("v2")
        );
    }

    #[test]
    fn port_urls_follow_upstream() {
        assert_eq!(
            port_url("https://a-1.sprites.app", 8080),
            "https://a-1.sprites.app"
        );
        assert_eq!(
            port_url("https://a-1.sprites.app", 3000),
            "https://a-1.sprites.app:3000"
        );
        assert_eq!(port_url("not a url", 3000), "not a url:3000");
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-01-05T10:30:00Z"),
            Some(1_767_609_000_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-01-05T10:30:00.25Z"),
            Some(1_767_609_000_250)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-01-05T12:30:00+02:00"),
            Some(1_767_609_000_000)
        );
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
        // Malformed server text is no time, never a panic.
        assert_eq!(parse_rfc3339_ms("2026-01-05T10:30:00+0é00"), None);
        assert_eq!(parse_rfc3339_ms("2026-01-05T10:30:00+01é0"), None);
        assert_eq!(parse_rfc3339_ms("2026-01-05T10:30:00.é"), None);
        assert_eq!(parse_rfc3339_ms("2026-01-05é10:30:00Z"), None);
    }
}
