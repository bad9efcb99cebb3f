//! Escape attempts from an isolated sandbox fail and change nothing on the host. Run once per
//! isolation mode the machine offers (bwrap, landlock); `none` promises no confinement beyond
//! the cleared environment and the file API's checks, which are tested for it too.

mod common;

use common::{run, sh};
use sandbox_core::{ExecRequest, FileWrite, Provider, SandboxConfig, StopMode};
use sandbox_local::Isolation;
use std::os::unix::fs::symlink;

const ISOLATED: &[Isolation] = &[Isolation::Bwrap, Isolation::Landlock];

#[tokio::test]
async fn writing_to_the_hosts_tmp_or_the_callers_home_changes_nothing() {
    for mode in common::modes(ISOLATED).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let marker = format!("sandbox-escape-{}", uuid_like());
        let host_tmp = std::path::Path::new("/tmp").join(&marker);
        let home = dirs::home_dir().expect("the caller has a home directory");
        let host_home = home.join(&marker);
        let req = sh("echo pwned > \"/tmp/$MARK\"; echo pwned > \"$CALLER_HOME/$MARK\"; true")
            .env("MARK", &marker)
            .env("CALLER_HOME", home.to_string_lossy());
        let ran = run(sb.handle.as_ref(), req).await;
        assert!(ran.exit.success(), "{mode}: {ran:?}");
        assert!(!host_tmp.exists(), "{mode}: the host's /tmp was written");
        assert!(!host_home.exists(), "{mode}: the caller's home was written");
        if mode == Isolation::Landlock {
            assert!(ran.stderr.contains("Permission denied"), "{mode}: {ran:?}");
        }
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn writing_system_directories_fails() {
    for mode in common::modes(ISOLATED).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let ran = run(sb.handle.as_ref(), sh("echo x >> /etc/hostname")).await;
        assert!(
            !ran.exit.success(),
            "{mode}: appended to /etc/hostname: {ran:?}"
        );
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn killing_a_process_outside_the_sandbox_fails() {
    for mode in common::modes(ISOLATED).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        let mut outside = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = outside.id();
        let ran = run(sb.handle.as_ref(), sh(&format!("kill -9 {pid}"))).await;
        assert!(
            !ran.exit.success(),
            "{mode}: kill reported success: {ran:?}"
        );
        assert!(
            outside.try_wait().unwrap().is_none(),
            "{mode}: the host process {pid} was killed"
        );
        outside.kill().unwrap();
        outside.wait().unwrap();
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn a_symlink_planted_in_the_workspace_does_not_reach_the_host_file() {
    for mode in common::modes(&Isolation::ALL).await {
        let (root, _p, sb) = common::sandbox(mode, "").await;
        let host_file = root.path().join("host-secret.txt");
        std::fs::write(&host_file, "host data").unwrap();
        let ws = sb.handle.workspace().to_string();
        symlink(&host_file, format!("{ws}/planted")).unwrap();
        symlink(root.path(), format!("{ws}/planted-dir")).unwrap();

        for path in ["planted", "planted-dir/host-secret.txt"] {
            let e = sb
                .handle
                .read_file(&format!("{ws}/{path}"))
                .await
                .unwrap_err();
            assert_eq!(
                e.code(),
                "sandbox_path_outside_workspace",
                "{mode}: read {path}"
            );
            let e = sb
                .handle
                .write_files(vec![FileWrite::new(format!("{ws}/{path}"), "pwned")])
                .await
                .unwrap_err();
            assert_eq!(
                e.code(),
                "sandbox_path_outside_workspace",
                "{mode}: write {path}"
            );
        }
        let e = sb
            .handle
            .exec(sandbox_core::ExecRequest::new(["true"]).cwd(format!("{ws}/planted-dir")))
            .await
            .expect_err("a cwd through a planted symlink must be refused");
        assert_eq!(e.code(), "sandbox_path_outside_workspace", "{mode}: cwd");
        if mode != Isolation::None {
            let ran = run(
                sb.handle.as_ref(),
                sh("echo pwned > planted; echo pwned > planted-dir/new"),
            )
            .await;
            assert!(!ran.stdout.contains("pwned"), "{mode}: {ran:?}");
            assert!(
                !root.path().join("new").exists(),
                "{mode}: created a host file"
            );
        }
        assert_eq!(
            std::fs::read_to_string(&host_file).unwrap(),
            "host data",
            "{mode}"
        );
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn network_is_cut_unless_the_sandbox_declares_ports_or_network() {
    // A listening socket completes connections from its backlog: no accept loop needed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    if !std::path::Path::new("/usr/bin/python3").exists() {
        eprintln!("SKIPPED: /usr/bin/python3 is needed as a TCP client inside the sandbox");
        return;
    }
    let probe = format!(
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5); print('connected')"
    );
    let connect = || sandbox_core::ExecRequest::new(["python3", "-c", &probe]);
    for mode in common::modes(ISOLATED).await {
        let (_r1, _p1, cut) = common::sandbox(mode, "").await;
        let ran = run(cut.handle.as_ref(), connect()).await;
        assert!(
            !ran.exit.success() && !ran.stdout.contains("connected"),
            "{mode}: {ran:?}"
        );
        cut.handle.stop(StopMode::Delete).await.unwrap();

        let config = SandboxConfig::from_json(&format!(
            r#"{{"local": {{"isolation": "{mode}", "network": true}}}}"#
        ))
        .unwrap();
        let (_r2, _p2, open) = common::sandbox_with(config).await;
        let ran = run(open.handle.as_ref(), connect()).await;
        assert!(
            ran.exit.success() && ran.stdout.contains("connected"),
            "{mode}: {ran:?}"
        );
        open.handle.stop(StopMode::Delete).await.unwrap();
    }
    drop(listener);
}

fn uuid_like() -> String {
    format!("{}-{}", std::process::id(), sandbox_core::SandboxId::new())
}

#[tokio::test]
async fn device_nodes_and_mounts_are_refused_even_to_a_root_caller() {
    for mode in common::modes(ISOLATED).await {
        let (_root, _p, sb) = common::sandbox(mode, "").await;
        // 8:0 is the first SCSI/virtio disk: a node for it would open the host's disk.
        let ran = run(
            sb.handle.as_ref(),
            sh("mknod disk b 8 0 && echo made-node; mkdir m; mount -t tmpfs none m && echo mounted; \
                mount -o remount,rw /usr && echo remounted; true"),
        )
        .await;
        assert!(!ran.stdout.contains("made-node"), "{mode}: {ran:?}");
        assert!(!ran.stdout.contains("mounted"), "{mode}: {ran:?}");
        assert!(
            !std::path::Path::new(sb.handle.workspace())
                .join("disk")
                .exists(),
            "{mode}"
        );
        sb.handle.stop(StopMode::Delete).await.unwrap();
    }
}

#[tokio::test]
async fn the_callers_home_and_other_sandboxes_are_not_readable() {
    let home = dirs::home_dir().expect("the caller has a home directory");
    let Ok(mut secret) = tempfile::NamedTempFile::new_in(&home) else {
        eprintln!(
            "SKIPPED: cannot create a file in the caller's home {}",
            home.display()
        );
        return;
    };
    std::io::Write::write_all(&mut secret, b"home-secret-7c1d").unwrap();
    for mode in common::modes(ISOLATED).await {
        let (root, p, a) = common::sandbox(mode, "").await;
        let b = p
            .create(&sandbox_core::CreateRequest {
                sandbox_id: sandbox_core::SandboxId::new(),
                config: common::config(mode, ""),
            })
            .await
            .unwrap();
        let other = format!("{}/neighbour.txt", b.handle.workspace());
        b.handle
            .write_files(vec![FileWrite::new(other.clone(), "neighbour-secret-9e2a")])
            .await
            .unwrap();
        let req = sh("cat \"$HOME_FILE\" \"$OTHER_FILE\"; true")
            .env("HOME_FILE", secret.path().to_string_lossy())
            .env("OTHER_FILE", &other);
        let ran = run(a.handle.as_ref(), req).await;
        assert!(
            !ran.stdout.contains("home-secret"),
            "{mode}: read the caller's home"
        );
        assert!(
            !ran.stdout.contains("neighbour-secret"),
            "{mode}: read another sandbox"
        );
        // The sandbox still reads its own files and the system's.
        let ran = run(
            a.handle.as_ref(),
            sh("echo mine > f && cat f /etc/hostname >/dev/null && cat f"),
        )
        .await;
        assert_eq!(ran.stdout, "mine\n", "{mode}: {ran:?}");
        a.handle.stop(StopMode::Delete).await.unwrap();
        b.handle.stop(StopMode::Delete).await.unwrap();
        drop(root);
    }
}

#[tokio::test]
async fn bubblewrap_runs_commands_in_their_own_mount_pid_ipc_uts_and_network_namespaces() {
    const NAMESPACES: [&str; 5] = ["mnt", "pid", "ipc", "uts", "net"];
    let host: Vec<String> = NAMESPACES
        .iter()
        .map(|ns| {
            std::fs::read_link(format!("/proc/self/ns/{ns}"))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let script = "for ns in mnt pid ipc uts net; do readlink /proc/self/ns/$ns; done";
    for mode in common::modes(&[Isolation::Bwrap]).await {
        // Without declared ports every namespace is new; with one the network is the host's.
        for (extra, shared_net) in [("", false), (r#""ports": [18081]"#, true)] {
            let (_root, _p, sb) = common::sandbox(mode, extra).await;
            let ran = run(sb.handle.as_ref(), sh(script)).await;
            assert!(ran.exit.success(), "{mode}: {ran:?}");
            let inside: Vec<&str> = ran.stdout.lines().collect();
            assert_eq!(inside.len(), NAMESPACES.len(), "{mode}: {ran:?}");
            for ((ns, host), inside) in NAMESPACES.iter().zip(&host).zip(inside) {
                let shared = *ns == "net" && shared_net;
                assert_eq!(
                    inside == host,
                    shared,
                    "{mode} {extra}: {ns} namespace inside {inside}, host {host}"
                );
            }
            let ran = run(
                sb.handle.as_ref(),
                ExecRequest::new(["cat", "/proc/sys/kernel/hostname"]),
            )
            .await;
            assert_eq!(ran.stdout.trim(), "sandbox", "{mode}: {ran:?}");
            sb.handle.stop(StopMode::Delete).await.unwrap();
        }
    }
}
