//! The `inventory` registry: providers and stores registered by test items in this binary.

use std::sync::Arc;

use async_trait::async_trait;
use sandbox_core::registry::{self, ProviderRegistration};
use sandbox_core::{
    register_provider, register_store, Capabilities, CreateRequest, Env, Error, Provider,
    Provisioned, Result, ResumeRequest, SandboxConfig, SandboxHandle, StoreBackend,
};

/// A provider that only knows its name.
struct Named(&'static str);

#[async_trait]
impl Provider for Named {
    fn name(&self) -> &str {
        self.0
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }
    async fn create(&self, _: &CreateRequest) -> Result<Provisioned> {
        Err(Error::provider(self.0, "test provider cannot create"))
    }
    async fn resume(&self, _: &ResumeRequest) -> Result<Arc<dyn SandboxHandle>> {
        Err(Error::provider(self.0, "test provider cannot resume"))
    }
}

fn open_zeta(_: &SandboxConfig, _: &Env) -> Result<Arc<dyn Provider>> {
    Ok(Arc::new(Named("test-zeta")))
}

fn open_alpha(config: &SandboxConfig, env: &Env) -> Result<Arc<dyn Provider>> {
    // A constructor reads its own config section and env; a missing credential is its error.
    if env.get("ALPHA_TOKEN").is_none() && config.raw_section("test-alpha").is_none() {
        return Err(Error::Unauthorized {
            provider: "test-alpha".into(),
            message: "set ALPHA_TOKEN".into(),
        });
    }
    Ok(Arc::new(Named("test-alpha")))
}

// Registered out of order: lists must come back sorted.
register_provider!("test-zeta", open_zeta);
register_provider!("test-alpha", open_alpha, credentials = ["ALPHA_TOKEN"]);

fn open_teststore(url: &str, _: &Env) -> Result<StoreBackend> {
    let mut b = sandbox_core::memory::memory_backend();
    b.location = url.to_string();
    Ok(b)
}

register_store!("teststore", open_teststore);

fn no_env() -> Env {
    Env::from_pairs(Vec::<(String, String)>::new())
}

#[test]
fn registered_providers_are_listed_sorted() {
    let names = registry::provider_names().unwrap();
    assert!(
        names.contains(&"test-alpha") && names.contains(&"test-zeta"),
        "{names:?}"
    );
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    let regs = registry::provider_registrations().unwrap();
    assert_eq!(regs.iter().map(|r| r.name).collect::<Vec<_>>(), names);
}

#[test]
fn a_provider_is_found_and_built_by_name() {
    let reg = registry::provider_registration("test-alpha").unwrap();
    assert_eq!(reg.name, "test-alpha");
    assert_eq!(reg.credential_vars, ["ALPHA_TOKEN"]);
    let env = Env::from_pairs([("ALPHA_TOKEN", "t0ken")]);
    let p = registry::open_provider("test-alpha", &SandboxConfig::default(), &env).unwrap();
    assert_eq!(p.name(), "test-alpha");
    assert!(registry::provider_registration("test-zeta")
        .unwrap()
        .credential_vars
        .is_empty());
}

#[test]
fn a_constructor_error_is_returned_as_is() {
    let e = registry::open_provider("test-alpha", &SandboxConfig::default(), &no_env())
        .err()
        .unwrap();
    assert_eq!(e.code(), "unauthorized");
    let config = SandboxConfig::from_json(r#"{"provider":"test-alpha","test-alpha":{}}"#).unwrap();
    registry::open_provider("test-alpha", &config, &no_env()).unwrap();
}

#[test]
fn an_unknown_provider_is_not_found_and_lists_the_registered_names() {
    let e = registry::open_provider("nope", &SandboxConfig::default(), &no_env())
        .err()
        .unwrap();
    assert_eq!(e.code(), "sandbox_provider_unknown");
    assert!(e.is_not_found());
    let msg = e.to_string();
    assert!(msg.contains("nope"), "{msg}");
    let names = registry::provider_names().unwrap().join(", ");
    assert!(msg.contains(&names), "{msg} should list {names}");
}

#[test]
fn duplicate_names_are_refused() {
    let regs = [
        ProviderRegistration::new("dup", open_zeta, &[]),
        ProviderRegistration::new("other", open_alpha, &[]),
        ProviderRegistration::new("dup", open_alpha, &[]),
    ];
    let e = registry::index_by_name("provider", regs.iter(), |r| r.name).unwrap_err();
    assert_eq!(e.code(), "sandbox_registry_duplicate");
    assert!(e.to_string().contains("`dup`"), "{e}");

    let unique = registry::index_by_name("provider", regs[..2].iter(), |r| r.name).unwrap();
    assert_eq!(unique.keys().copied().collect::<Vec<_>>(), ["dup", "other"]);
}

#[test]
fn store_schemes_include_memory_and_test_stores_sorted() {
    let schemes = registry::store_schemes().unwrap();
    assert!(schemes.contains(&"memory"), "{schemes:?}");
    assert!(schemes.contains(&"teststore"), "{schemes:?}");
    let mut sorted = schemes.clone();
    sorted.sort_unstable();
    assert_eq!(schemes, sorted);
}

#[tokio::test]
async fn memory_store_opens_from_its_url_fresh_each_time() {
    let a = registry::open_store("memory:", &no_env()).unwrap();
    assert_eq!(a.records.name(), "memory");
    assert_eq!(a.logs.name(), "memory");
    let b = registry::open_store("MEMORY:", &no_env()).unwrap();
    let rec = sandbox_core::SandboxRecord {
        id: sandbox_core::SandboxId::new(),
        status: sandbox_core::SandboxStatus::Active,
        provider: "test-zeta".into(),
        external_sandbox_id: None,
        sandbox_url: None,
        timeout: None,
        runtime: None,
        vcpus: None,
        ports: None,
        purpose: None,
        params: None,
        created_at: 1,
        updated_at: None,
        shutdown_at: None,
        sandbox_user_id: None,
    };
    a.records.insert_sandbox(&rec).await.unwrap();
    assert!(b.records.get_sandbox(&rec.id).await.unwrap().is_none());

    let t = registry::open_store("teststore://somewhere", &no_env()).unwrap();
    assert_eq!(t.location, "teststore://somewhere");
}

#[test]
fn bad_store_urls_are_typed_errors() {
    for url in ["", "no-scheme", ":nothing"] {
        let e = registry::open_store(url, &no_env()).err().unwrap();
        assert_eq!(e.code(), "sandbox_store_url_invalid", "{url:?}");
    }
    let e = registry::open_store("bogus:///x.db", &no_env())
        .err()
        .unwrap();
    assert_eq!(e.code(), "sandbox_store_unknown");
    let msg = e.to_string();
    assert!(msg.contains("bogus"), "{msg}");
    assert!(msg.contains("memory") && msg.contains("teststore"), "{msg}");
}

#[test]
fn store_url_prefers_explicit_then_env_then_default() {
    let env = Env::from_pairs([("SANDBOX_STORE", "memory:")]);
    assert_eq!(
        registry::store_url(Some("teststore:x"), &env),
        "teststore:x"
    );
    assert_eq!(registry::store_url(Some("  "), &env), "memory:");
    assert_eq!(
        registry::store_url(None, &no_env()),
        registry::DEFAULT_STORE_URL
    );
}
