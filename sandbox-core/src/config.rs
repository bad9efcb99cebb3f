//! `SandboxConfig`: the TypeScript package's JSON config, and the environment it is read with.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The provider used when neither the config nor `SANDBOX_PROVIDER` names one: the provider
/// that works offline (upstream defaults to `sprites`).
pub const DEFAULT_PROVIDER: &str = "local";

/// How a config names its provider: `"sprites"` or `{ "kind": "sprites" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProviderSelector {
    /// `"provider": "local"`.
    Name(String),
    /// `"provider": { "kind": "local" }`.
    Object {
        /// Provider name.
        kind: String,
    },
}

impl ProviderSelector {
    /// The provider name, trimmed and lower-cased; `None` when empty.
    pub fn name(&self) -> Option<String> {
        let raw = match self {
            ProviderSelector::Name(n) => n,
            ProviderSelector::Object { kind } => kind,
        };
        let n = raw.trim().to_ascii_lowercase();
        (!n.is_empty()).then_some(n)
    }
}

/// `resources` of a config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<f64>,
}

/// `dataset` of a config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetConfig {
    /// Enables dataset tooling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// One file of a skill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillFile {
    /// Path inside the skill directory.
    pub path: String,
    /// Content, base64.
    pub content_base64: String,
}

/// An agent skill to install into the sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillConfig {
    /// Skill name (its directory name).
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its files.
    #[serde(default)]
    pub files: Vec<SkillFile>,
}

/// The TypeScript package's `SandboxConfig` (camelCase JSON).
///
/// Provider sections (`vercel`, `daytona`, `sprites`, `local`, and any third-party key) are kept
/// as raw JSON in [`SandboxConfig::sections`]; each provider crate parses its own with
/// [`SandboxConfig::section`].
///
/// Its `Debug` output shows no value that may be a credential: provider sections (which may
/// hold `token`, `apiKey`, ...) and `env` appear as their keys only, skills as their names.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxConfig {
    /// Provider selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderSelector>,
    /// Provider runtime (`node22`, `python3.13`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Maximum lifetime in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<f64>,
    /// Ports to expose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    /// Resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Free-form purpose, stored on the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Free-form params, copied into the record's `params`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Map<String, Value>>,
    /// Runtime binding env for the Ekairos bootstrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Map<String, Value>>,
    /// Ekairos domain for the runtime bootstrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<Value>,
    /// Dataset tooling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetConfig>,
    /// Skills to install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skills: Option<Vec<SkillConfig>>,
    /// Provider sections and any other keys, as raw JSON.
    #[serde(flatten)]
    pub sections: BTreeMap<String, Value>,
}

impl std::fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn keys(v: &Value) -> Vec<&str> {
            v.as_object()
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default()
        }
        f.debug_struct("SandboxConfig")
            .field("provider", &self.provider)
            .field("runtime", &self.runtime)
            .field("timeout_ms", &self.timeout_ms)
            .field("ports", &self.ports)
            .field("resources", &self.resources)
            .field("purpose", &self.purpose)
            .field(
                "params_keys",
                &self.params.as_ref().map(|m| m.keys().collect::<Vec<_>>()),
            )
            .field(
                "env_keys",
                &self.env.as_ref().map(|m| m.keys().collect::<Vec<_>>()),
            )
            .field("domain", &self.domain.as_ref().map(|_| "…"))
            .field("dataset", &self.dataset)
            .field(
                "skills",
                &self
                    .skills
                    .as_ref()
                    .map(|v| v.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()),
            )
            .field(
                "sections",
                &self
                    .sections
                    .iter()
                    .map(|(k, v)| (k.as_str(), keys(v)))
                    .collect::<BTreeMap<_, _>>(),
            )
            .finish()
    }
}

impl SandboxConfig {
    /// Parses a config from JSON text.
    ///
    /// # Errors
    /// Malformed JSON or a field of the wrong type is invalid input naming the field.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| Error::invalid("sandbox_config_invalid", format!("invalid config: {e}")))
    }

    /// The provider this config selects: `config.provider` (string or `{kind}`), else
    /// `SANDBOX_PROVIDER`, else [`DEFAULT_PROVIDER`]. Names are trimmed and lower-cased; an
    /// unknown name is returned as is, so the registry can say which names exist.
    pub fn provider_name(&self, env: &Env) -> String {
        self.provider
            .as_ref()
            .and_then(ProviderSelector::name)
            .or_else(|| {
                env.get("SANDBOX_PROVIDER")
                    .map(|v| v.trim().to_ascii_lowercase())
                    .filter(|v| !v.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_PROVIDER.to_string())
    }

    /// The raw section of a provider, e.g. `config.sprites`.
    pub fn raw_section(&self, name: &str) -> Option<&Value> {
        self.sections.get(name).filter(|v| !v.is_null())
    }

    /// Parses the section of a provider into its own config type; a missing section is
    /// `T::default()`.
    ///
    /// # Errors
    /// A section of the wrong shape is invalid input naming the section.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T> {
        match self.raw_section(name) {
            None => Ok(T::default()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                Error::invalid(
                    "sandbox_config_invalid",
                    format!("invalid `{name}` section in config: {e}"),
                )
            }),
        }
    }
}

/// The environment variables a provider or store is configured from.
///
/// `Env::process()` reads the real environment at call time; `Env::from_pairs` gives tests a
/// fixed one. Values are only ever looked up by name, never listed or printed.
#[derive(Clone, Default)]
pub struct Env {
    fixed: Option<Arc<BTreeMap<String, String>>>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.fixed {
            None => f.write_str("Env(process)"),
            Some(m) => f
                .debug_struct("Env")
                .field("keys", &m.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Env { fixed: None }
    }

    /// A fixed environment.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Env {
            fixed: Some(Arc::new(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            )),
        }
    }

    /// The value of a variable, if set (an empty value counts as set).
    pub fn get(&self, key: &str) -> Option<String> {
        match &self.fixed {
            None => std::env::var(key).ok(),
            Some(m) => m.get(key).cloned(),
        }
    }

    /// The first of `keys` that is set to a non-blank value, trimmed. Unlike upstream, an empty
    /// value does not stop the chain.
    pub fn first(&self, keys: &[&str]) -> Option<String> {
        keys.iter().find_map(|k| {
            self.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        })
    }

    /// A boolean variable, read like upstream's `parseOptionalBoolean`: `1,true,yes,y,on` are
    /// true, `0,false,no,n,off` false, anything else (or unset) `None`.
    pub fn flag(&self, key: &str) -> Option<bool> {
        parse_optional_bool(&self.get(key)?)
    }
}

/// Upstream's `parseOptionalBoolean`.
pub fn parse_optional_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "on" => Some(true),
        "0" | "false" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_upstream_field_and_keeps_sections() {
        let cfg = SandboxConfig::from_json(
            r#"{
              "provider": {"kind": "Sprites"},
              "runtime": "node22", "timeoutMs": 60000, "ports": [3000, 8080],
              "resources": {"vcpus": 2}, "purpose": "codex", "params": {"a": 1},
              "env": {"K": "v"}, "domain": {"name": "d"}, "dataset": {"enabled": true},
              "skills": [{"name": "s", "files": [{"path": "a.md", "contentBase64": "aGk="}]}],
              "sprites": {"name": "x", "waitForCapacity": false},
              "vercel": {"profile": "ephemeral"}, "acme": {"zone": "eu"}
            }"#,
        )
        .unwrap();
        assert_eq!(
            cfg.provider_name(&Env::from_pairs::<&str, &str>([])),
            "sprites"
        );
        assert_eq!(cfg.ports, Some(vec![3000, 8080]));
        assert_eq!(
            cfg.skills.as_ref().unwrap()[0].files[0].content_base64,
            "aGk="
        );
        assert_eq!(cfg.raw_section("acme").unwrap()["zone"], "eu");
        assert!(cfg.raw_section("sprites").is_some());
        assert!(cfg.raw_section("daytona").is_none());
    }

    #[test]
    fn provider_resolution_order() {
        let env = Env::from_pairs([("SANDBOX_PROVIDER", " Vercel ")]);
        let none = Env::from_pairs::<&str, &str>([]);
        let cfg = SandboxConfig::default();
        assert_eq!(cfg.provider_name(&none), "local");
        assert_eq!(cfg.provider_name(&env), "vercel");
        let cfg = SandboxConfig::from_json(r#"{"provider":"daytona"}"#).unwrap();
        assert_eq!(cfg.provider_name(&env), "daytona");
        let cfg = SandboxConfig::from_json(r#"{"provider":"  "}"#).unwrap();
        assert_eq!(cfg.provider_name(&env), "vercel");
    }

    #[test]
    fn bad_config_is_invalid_input() {
        let e = SandboxConfig::from_json(r#"{"ports": "x"}"#).unwrap_err();
        assert_eq!(e.code(), "sandbox_config_invalid");
        #[derive(Deserialize, Default, Debug)]
        #[allow(dead_code)]
        struct S {
            name: Option<String>,
        }
        let cfg = SandboxConfig::from_json(r#"{"s": {"name": 3}}"#).unwrap();
        assert!(cfg
            .section::<S>("s")
            .unwrap_err()
            .to_string()
            .contains("`s`"));
    }

    #[test]
    fn debug_output_shows_no_credential() {
        let cfg = SandboxConfig::from_json(
            r#"{
              "provider": "vercel", "purpose": "codex",
              "params": {"apiKey": "p-s3cret"},
              "env": {"INSTANT_ADMIN_TOKEN": "e-s3cret"},
              "domain": {"token": "d-s3cret"},
              "skills": [{"name": "review", "files": [{"path": "a.md", "contentBase64": "czNjcmV0"}]}],
              "vercel": {"token": "v-s3cret", "projectId": "prj"},
              "acme": "a-s3cret"
            }"#,
        )
        .unwrap();
        let req = crate::provider::CreateRequest {
            sandbox_id: crate::SandboxId::new(),
            config: cfg.clone(),
        };
        for shown in [format!("{cfg:?}"), format!("{req:?}"), format!("{cfg:#?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(!shown.contains("czNjcmV0"), "{shown}");
            for visible in ["vercel", "token", "INSTANT_ADMIN_TOKEN", "review", "codex"] {
                assert!(shown.contains(visible), "{visible} missing from {shown}");
            }
        }
    }

    #[test]
    fn env_chain_skips_blank_values_and_parses_flags() {
        let env = Env::from_pairs([("A", ""), ("B", " tok "), ("F", "Yes")]);
        assert_eq!(env.first(&["A", "B"]).as_deref(), Some("tok"));
        assert_eq!(env.flag("F"), Some(true));
        assert_eq!(env.flag("A"), None);
        assert!(!format!("{env:?}").contains("tok"));
    }
}
