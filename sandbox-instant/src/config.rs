//! `InstantConfig`: which app, which API, which admin token; read once and validated.

use std::fmt;
use std::time::Duration;

use sandbox_core::{Env, Error, Result, RetryPolicy};

/// Default `INSTANT_API_URI`.
pub const DEFAULT_API_URI: &str = "https://api.instantdb.com";

/// How often an open writer renews its lease (`sandbox_processes.updatedAt`), by default.
pub const LEASE_BEAT: Duration = Duration::from_secs(15);
/// How old a lease may be before the writer of another OS process counts as gone, by default.
pub const LEASE_STALE: Duration = Duration::from_secs(60);

/// Environment variable holding the app id.
pub const ENV_APP_ID: &str = "INSTANT_APP_ID";
/// Environment variable holding the admin token.
pub const ENV_ADMIN_TOKEN: &str = "INSTANT_APP_ADMIN_TOKEN";
/// Environment variable holding the API base URL.
pub const ENV_API_URI: &str = "INSTANT_API_URI";

/// Connection settings of the `instant` store. `Debug` never shows the admin token.
#[derive(Clone)]
pub struct InstantConfig {
    /// The app id (a UUID).
    pub app_id: String,
    /// The admin token. Sent only in the `authorization` header.
    admin_token: String,
    /// API base URL without a trailing `/`.
    pub api_uri: String,
    /// A writer sends its queued output once this many bytes are waiting.
    pub batch_bytes: usize,
    /// ... or once the oldest queued output has waited this long.
    pub batch_delay: Duration,
    /// How long to wait for the server's answer on the SSE channel.
    pub sse_timeout: Duration,
    /// Retries of HTTP calls (429, 5xx, connection errors) and of stream reconnects.
    pub retry: RetryPolicy,
    /// How often an open writer renews its lease ([`LEASE_BEAT`]).
    pub lease_beat: Duration,
    /// How old a lease may be before its writer counts as gone ([`LEASE_STALE`]).
    pub lease_stale: Duration,
}

impl fmt::Debug for InstantConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstantConfig")
            .field("app_id", &self.app_id)
            .field("admin_token", &"<redacted>")
            .field("api_uri", &self.api_uri)
            .field("batch_bytes", &self.batch_bytes)
            .field("batch_delay", &self.batch_delay)
            .field("sse_timeout", &self.sse_timeout)
            .field("retry", &self.retry)
            .field("lease_beat", &self.lease_beat)
            .field("lease_stale", &self.lease_stale)
            .finish()
    }
}

fn missing(var: &str) -> Error {
    Error::Unauthorized {
        provider: crate::INSTANT.into(),
        message: format!("{var} is not set; set {ENV_APP_ID} and {ENV_ADMIN_TOKEN}"),
    }
}

impl InstantConfig {
    /// A config with explicit values and default tuning.
    ///
    /// # Errors
    /// Invalid input when the app id or token is blank or the URI is not `http(s)://`.
    pub fn new(app_id: &str, admin_token: &str, api_uri: &str) -> Result<Self> {
        let app_id = app_id.trim();
        if app_id.is_empty() {
            return Err(missing(ENV_APP_ID));
        }
        if admin_token.trim().is_empty() {
            return Err(missing(ENV_ADMIN_TOKEN));
        }
        let api_uri = api_uri.trim().trim_end_matches('/');
        let parsed = url::Url::parse(api_uri).map_err(|e| {
            Error::invalid(
                "instant_api_uri_invalid",
                format!("{ENV_API_URI} {api_uri:?} is not a URL: {e}"),
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https")
            || !parsed.username().is_empty()
            || parsed.password().is_some()
        {
            return Err(Error::invalid(
                "instant_api_uri_invalid",
                format!(
                    "{ENV_API_URI} must be an http(s) URL without credentials, got scheme {:?}",
                    parsed.scheme()
                ),
            ));
        }
        Ok(InstantConfig {
            app_id: app_id.to_string(),
            admin_token: admin_token.trim().to_string(),
            api_uri: api_uri.to_string(),
            batch_bytes: 64 * 1024,
            batch_delay: Duration::from_millis(25),
            sse_timeout: Duration::from_secs(15),
            retry: RetryPolicy::default(),
            lease_beat: LEASE_BEAT,
            lease_stale: LEASE_STALE,
        })
    }

    /// Reads `INSTANT_APP_ID`, `INSTANT_APP_ADMIN_TOKEN` and `INSTANT_API_URI` (default
    /// [`DEFAULT_API_URI`]).
    ///
    /// # Errors
    /// Unauthorized naming the missing variable; invalid input for a bad URI.
    pub fn from_env(env: &Env) -> Result<Self> {
        let app_id = env
            .first(&[ENV_APP_ID])
            .ok_or_else(|| missing(ENV_APP_ID))?;
        let token = env
            .first(&[ENV_ADMIN_TOKEN])
            .ok_or_else(|| missing(ENV_ADMIN_TOKEN))?;
        let uri = env
            .first(&[ENV_API_URI])
            .unwrap_or_else(|| DEFAULT_API_URI.to_string());
        Self::new(&app_id, &token, &uri)
    }

    /// Reads a store URL: `instant:` (everything from the environment) or
    /// `instant://<app-id>@<host[:port]>` (app id and API host from the URL; `https`, or
    /// `http` for a loopback host). The admin token always comes from
    /// `INSTANT_APP_ADMIN_TOKEN`: a URL carrying a password is refused.
    ///
    /// # Errors
    /// Invalid input for a malformed URL or one with a password; unauthorized when a variable
    /// is missing.
    pub fn from_url(url: &str, env: &Env) -> Result<Self> {
        let url = url.trim();
        let rest = url
            .split_once(':')
            .filter(|(s, _)| s.eq_ignore_ascii_case(crate::INSTANT))
            .map(|(_, r)| r)
            .ok_or_else(|| bad_url("the scheme must be instant:"))?;
        if rest.is_empty() || rest == "//" {
            return Self::from_env(env);
        }
        let authority = rest
            .strip_prefix("//")
            .ok_or_else(|| bad_url("expected instant: or instant://<app-id>@<host>"))?
            .trim_end_matches('/');
        let (user, host) = authority
            .rsplit_once('@')
            .ok_or_else(|| bad_url("expected instant://<app-id>@<host>"))?;
        if user.contains(':') {
            return Err(bad_url(
                "a store URL must not carry the admin token; set INSTANT_APP_ADMIN_TOKEN",
            ));
        }
        if host.is_empty() || host.contains('/') {
            return Err(bad_url("expected instant://<app-id>@<host[:port]>"));
        }
        let hostname = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let scheme = if matches!(hostname, "127.0.0.1" | "localhost" | "[::1]") {
            "http"
        } else {
            "https"
        };
        let token = env
            .first(&[ENV_ADMIN_TOKEN])
            .ok_or_else(|| missing(ENV_ADMIN_TOKEN))?;
        Self::new(user, &token, &format!("{scheme}://{host}"))
    }

    /// Where the data lives, for messages: API URI and app id, never the token.
    pub fn location(&self) -> String {
        format!("{} (app {})", self.api_uri, self.app_id)
    }

    pub(crate) fn admin_token(&self) -> &str {
        &self.admin_token
    }
}

fn bad_url(why: &str) -> Error {
    // The URL itself is not echoed: it might hold a secret by mistake.
    Error::invalid(
        "instant_store_url_invalid",
        format!("invalid instant store URL: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "8a3e4c1d-0000-4000-8000-00000000abcd";

    #[test]
    fn debug_redacts_the_admin_token() {
        let c = InstantConfig::new("app", TOKEN, "https://api.instantdb.com/").unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains(TOKEN), "{d}");
        assert!(d.contains("<redacted>"));
        assert_eq!(c.api_uri, "https://api.instantdb.com");
        assert!(!c.location().contains(TOKEN));
    }

    #[test]
    fn env_supplies_everything_with_a_default_uri() {
        let env = Env::from_pairs([(ENV_APP_ID, "app-1"), (ENV_ADMIN_TOKEN, TOKEN)]);
        let c = InstantConfig::from_url("instant:", &env).unwrap();
        assert_eq!(c.app_id, "app-1");
        assert_eq!(c.api_uri, DEFAULT_API_URI);
        let env = Env::from_pairs([
            (ENV_APP_ID, "app-1"),
            (ENV_ADMIN_TOKEN, TOKEN),
            (ENV_API_URI, "http://127.0.0.1:9/"),
        ]);
        assert_eq!(
            InstantConfig::from_env(&env).unwrap().api_uri,
            "http://127.0.0.1:9"
        );
    }

    #[test]
    fn url_names_app_and_host_but_never_the_token() {
        let env = Env::from_pairs([(ENV_ADMIN_TOKEN, TOKEN)]);
        let c = InstantConfig::from_url("instant://app-2@127.0.0.1:4000", &env).unwrap();
        assert_eq!(
            (c.app_id.as_str(), c.api_uri.as_str()),
            ("app-2", "http://127.0.0.1:4000")
        );
        let c = InstantConfig::from_url("instant://app-2@api.instantdb.com", &env).unwrap();
        assert_eq!(c.api_uri, "https://api.instantdb.com");
        let e = InstantConfig::from_url(&format!("instant://app:{TOKEN}@h"), &env).unwrap_err();
        assert_eq!(e.code(), "instant_store_url_invalid");
        assert!(!e.to_string().contains(TOKEN));
    }

    #[test]
    fn missing_variables_are_named() {
        let e = InstantConfig::from_env(&Env::from_pairs([(ENV_APP_ID, "a")])).unwrap_err();
        assert_eq!(e.code(), "unauthorized");
        assert!(e.to_string().contains(ENV_ADMIN_TOKEN));
        let e = InstantConfig::from_env(&Env::from_pairs([(ENV_ADMIN_TOKEN, TOKEN)])).unwrap_err();
        assert!(e.to_string().contains(ENV_APP_ID));
        let env = Env::from_pairs([
            (ENV_APP_ID, "a"),
            (ENV_ADMIN_TOKEN, TOKEN),
            (ENV_API_URI, "ftp://x"),
        ]);
        assert_eq!(
            InstantConfig::from_env(&env).unwrap_err().code(),
            "instant_api_uri_invalid"
        );
    }
}
