//! Sandbox lifecycle: ports, params and resume, persistence on stop, checkpoints seen from
//! inside the sandbox.

mod common;

use std::time::Duration;

use common::{run, sh};
use sandbox_core::{
    CreateRequest, ExecRequest, FileWrite, Provider, ResumeRequest, SandboxConfig, SandboxId,
    StopMode,
};
use sandbox_local::{Isolation, LocalParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(url: &str) -> std::io::Result<String> {
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /index.html HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::test]
async fn a_page_served_from_the_sandbox_is_fetched_through_port_url() {
    if !std::path::Path::new("/usr/bin/python3").exists() {
        eprintln!("SKIPPED: /usr/bin/python3 is needed to serve a page from the sandbox");
        return;
    }
    for mode in common::modes(&Isolation::ALL).await {
        let port = free_port();
        let (_root, _p, sb) = common::sandbox(mode, &format!(r#""ports": [{port}]"#)).await;
        let ws = sb.handle.workspace().to_string();
        sb.handle
            .write_files(vec![FileWrite::new(
                format!("{ws}/index.html"),
                "<h1>from the sandbox</h1>",
            )])
            .await
            .unwrap();
        let server = sb
            .handle
            .exec(ExecRequest::new([
                "python3".to_string(),
                "-m".into(),
                "http.server".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
            ]))
            .await
            .unwrap();
        let url = sb.handle.port_url(port).await.unwrap();
        assert_eq!(url, format!("http://127.0.0.1:{port}"));
        let page = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match http_get(&url).await {
                    Ok(page) => return page,
                    // The server is still starting: retry on connection refused.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{mode}: the server never answered at {url}"));
        assert!(page.starts_with("HTTP/1.0 200"), "{mode}: {page}");
        assert!(page.contains("<h1>from the sandbox</h1>"), "{mode}: {page}");

        let undeclared = sb.handle.port_url(port.wrapping_add(1)).await.unwrap_err();
        assert_eq!(undeclared.code(), "sandbox_port_not_declared");
        server.control.unwrap().kill().await.unwrap();
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn params_hold_what_resume_needs_and_resume_starts_nothing() {
    for mode in common::modes(&Isolation::ALL).await {
        let (root, p, sb) = common::sandbox(mode, r#""ports": [3000]"#).await;
        let params: LocalParams = serde_json::from_value(sb.params.clone()).unwrap();
        assert_eq!(params.isolation, mode);
        assert_eq!(params.ports, vec![3000]);
        assert!(params.network, "declared ports give network access");
        assert!(!params.persistent);
        assert_eq!(params.workspace, sb.handle.workspace());
        assert!(sb.warnings.is_empty(), "{mode}: {:?}", sb.warnings);
        assert!(sb.external_id.starts_with("local:"));
        let workspace = std::path::Path::new(sb.handle.workspace());
        assert!(workspace.starts_with(root.path().canonicalize().unwrap()));
        assert!(workspace.ends_with("workspace"));

        let sandbox_id = SandboxId::parse(sb.external_id.trim_start_matches("local:")).unwrap();
        let req = ResumeRequest {
            sandbox_id,
            external_id: sb.external_id.clone(),
            url: None,
            params: sb.params.clone(),
        };
        let again = p.resume(&req).await.unwrap();
        assert_eq!(again.workspace(), sb.handle.workspace());
        let ran = run(again.as_ref(), sh("echo resumed > r.txt && cat r.txt")).await;
        assert_eq!(ran.stdout, "resumed\n", "{mode}");

        let wrong = ResumeRequest {
            external_id: "local:someone-else".into(),
            ..req.clone()
        };
        assert!(p.resume(&wrong).await.is_err());
        sb.handle.stop(StopMode::Delete).await.unwrap();
        assert!(p.resume(&req).await.err().unwrap().is_not_found(), "{mode}");
        assert!(sb
            .handle
            .stop(StopMode::Delete)
            .await
            .unwrap_err()
            .is_not_found());
    }
}

#[tokio::test]
async fn stop_deletes_the_workspace_unless_the_sandbox_is_persistent() {
    let root = common::root();
    let p = common::provider(root.path());
    let create = |json: &str| {
        let config = SandboxConfig::from_json(json).unwrap();
        let p = p.clone();
        async move {
            p.create(&CreateRequest {
                sandbox_id: SandboxId::new(),
                config,
            })
            .await
            .unwrap()
        }
    };
    let ephemeral = create(r#"{"local": {"isolation": "none"}}"#).await;
    let persistent = create(r#"{"local": {"isolation": "none", "persistent": true}}"#).await;
    let kept = create(r#"{"local": {"isolation": "none", "deleteOnStop": false}}"#).await;
    for sb in [&ephemeral, &persistent, &kept] {
        let ws = sb.handle.workspace().to_string();
        sb.handle
            .write_files(vec![FileWrite::new(format!("{ws}/f"), "x")])
            .await
            .unwrap();
        sb.handle.stop(StopMode::Default).await.unwrap();
    }
    assert!(!std::path::Path::new(ephemeral.handle.workspace()).exists());
    assert!(std::path::Path::new(persistent.handle.workspace())
        .join("f")
        .exists());
    assert!(std::path::Path::new(kept.handle.workspace())
        .join("f")
        .exists());
    persistent.handle.stop(StopMode::Delete).await.unwrap();
    assert!(!std::path::Path::new(persistent.handle.workspace()).exists());
}

#[tokio::test]
async fn restore_seen_from_inside_brings_back_files_and_modes() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let h = sb.handle.as_ref();
        let ran = run(
            h,
            sh("mkdir d && echo v1 > d/f && chmod 751 d/f && echo gone > deleted"),
        )
        .await;
        assert!(ran.exit.success(), "{mode}: {ran:?}");
        let cp = h.checkpoint(Some("v1".into())).await.unwrap();
        assert_eq!(cp.comment.as_deref(), Some("v1"));
        assert!(cp.created_at.is_some());
        let ran = run(h, sh("echo v2 > d/f && rm deleted && echo new > created")).await;
        assert!(ran.exit.success(), "{mode}: {ran:?}");
        h.restore(&cp.id).await.unwrap();
        let ran = run(
            h,
            sh("cat d/f deleted; stat -c %a d/f; test -e created && echo created-survived; true"),
        )
        .await;
        assert_eq!(ran.stdout, "v1\ngone\n751\n", "{mode}: {ran:?}");
        let ids: Vec<_> = h
            .list_checkpoints()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, vec![cp.id.clone()]);
        // After a restore the workspace is a new directory: commands must still be able to write.
        let ran = run(h, sh("echo after > after.txt && cat after.txt")).await;
        assert_eq!(ran.stdout, "after\n", "{mode}: {ran:?}");
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn an_unavailable_isolation_mode_is_refused_at_create() {
    let offered = sandbox_local::LocalProvider::offered_isolations().await;
    let root = common::root();
    let p = common::provider(root.path());
    for mode in [Isolation::Bwrap, Isolation::Landlock] {
        let result = p
            .create(&CreateRequest {
                sandbox_id: SandboxId::new(),
                config: common::config(mode, ""),
            })
            .await;
        match result {
            Ok(sb) => {
                assert!(offered.contains(&mode));
                sb.handle.stop(StopMode::Delete).await.unwrap();
            }
            Err(e) => {
                assert!(
                    !offered.contains(&mode),
                    "{mode} is offered but create failed: {e}"
                );
                assert_eq!(e.code(), "sandbox_local_isolation_unavailable");
            }
        }
    }
    // auto takes the strongest mode offered.
    let sb = p
        .create(&CreateRequest {
            sandbox_id: SandboxId::new(),
            config: SandboxConfig::default(),
        })
        .await
        .unwrap();
    let params: LocalParams = serde_json::from_value(sb.params.clone()).unwrap();
    assert_eq!(params.isolation, offered[0]);
    assert_eq!(sb.warnings.is_empty(), offered[0] != Isolation::None);
    sb.handle.stop(StopMode::Delete).await.unwrap();
}

#[tokio::test]
async fn a_restore_through_one_handle_leaves_another_handle_able_to_write() {
    for mode in common::modes(&Isolation::ALL).await {
        let (_root, p, sb) = common::sandbox(mode, "").await;
        let other = p
            .resume(&ResumeRequest {
                sandbox_id: SandboxId::parse(sb.external_id.trim_start_matches("local:")).unwrap(),
                external_id: sb.external_id.clone(),
                url: None,
                params: sb.params.clone(),
            })
            .await
            .unwrap();
        let ran = run(other.as_ref(), sh("echo before > f && cat f")).await;
        assert_eq!(ran.stdout, "before\n", "{mode}: {ran:?}");
        let cp = sb.handle.checkpoint(None).await.unwrap();
        sb.handle.restore(&cp.id).await.unwrap();
        // The workspace is a new directory now: the other handle's commands still write in it.
        let ran = run(other.as_ref(), sh("echo after > g && cat f g")).await;
        assert_eq!(ran.stdout, "before\nafter\n", "{mode}: {ran:?}");
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn the_isolation_variable_selects_the_mode_and_the_config_wins_over_it() {
    let modes = common::modes(&[Isolation::Landlock]).await;
    for mode in modes {
        let root = common::root();
        let env = sandbox_core::Env::from_pairs([
            (
                sandbox_local::ROOT_ENV,
                root.path().to_string_lossy().into_owned(),
            ),
            (sandbox_local::ISOLATION_ENV, mode.as_str().to_string()),
        ]);
        let p = sandbox_local::LocalProvider::from_config(&SandboxConfig::default(), &env).unwrap();
        for (config, expected) in [
            (SandboxConfig::default(), mode),
            (common::config(Isolation::None, ""), Isolation::None),
        ] {
            let sb = p
                .create(&CreateRequest {
                    sandbox_id: SandboxId::new(),
                    config,
                })
                .await
                .unwrap();
            let params: LocalParams = serde_json::from_value(sb.params.clone()).unwrap();
            assert_eq!(params.isolation, expected);
            sb.handle.stop(StopMode::Delete).await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_relative_root_in_a_sandbox_config_is_invalid_input() {
    let root = common::root();
    let p = common::provider(root.path());
    let created = p
        .create(&CreateRequest {
            sandbox_id: SandboxId::new(),
            config: SandboxConfig::from_json(
                r#"{"local": {"isolation": "none", "root": "relative/sandboxes"}}"#,
            )
            .unwrap(),
        })
        .await;
    match created {
        Err(e) => assert_eq!(e.code(), "sandbox_local_root_invalid"),
        Ok(_) => panic!("a relative root was accepted"),
    }
    assert!(!std::path::Path::new("relative").exists());
}
