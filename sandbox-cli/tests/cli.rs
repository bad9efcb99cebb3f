//! End-to-end tests of the `sandbox` binary against the embedded default (`local` provider,
//! SQLite store), each in its own temporary directory.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use assert_cmd::Command;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary home for one test: its own store and local sandbox root.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Self {
        Home {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn store_url(&self) -> String {
        format!("sqlite://{}", self.path().join("store.db").display())
    }

    fn local_root(&self) -> PathBuf {
        self.path().join("local")
    }

    fn std_cmd(&self) -> StdCommand {
        let mut c = StdCommand::new(env!("CARGO_BIN_EXE_sandbox"));
        c.env("SANDBOX_STORE", self.store_url())
            .env("SANDBOX_LOCAL_ROOT", self.local_root())
            .env_remove("SANDBOX_PROVIDER")
            .env_remove("RUST_LOG")
            .current_dir(self.path());
        c
    }

    fn cmd(&self) -> Command {
        let mut c = Command::from_std(self.std_cmd());
        c.timeout(TIMEOUT);
        c
    }

    /// Runs `sandbox ARGS`, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run sandbox");
        assert!(
            out.status.success(),
            "sandbox {args:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs `sandbox --json ARGS`, asserts success, parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
    }

    /// Runs `sandbox --json ARGS` expecting failure; returns the exit code and the JSON error.
    fn json_err(&self, args: &[&str]) -> (i32, Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cmd().args(&all).output().expect("run sandbox");
        assert!(!out.status.success(), "sandbox {args:?} should fail");
        let text = String::from_utf8_lossy(&out.stderr);
        let line = text.lines().last().unwrap_or_default();
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{args:?}: stderr is not a JSON error ({e}): {text}"));
        (out.status.code().unwrap_or(-1), v["error"].clone())
    }

    fn create(&self) -> String {
        let id = self.ok(&["create"]).trim().to_string();
        assert_eq!(id.len(), 36, "create prints a UUID, got {id:?}");
        id
    }

    /// Everything the store holds, to check that a failed command changed nothing.
    fn snapshot(&self) -> Value {
        let sandboxes = self.json(&["ls"]);
        let mut processes = Vec::new();
        for s in sandboxes.as_array().unwrap() {
            processes.push(self.json(&["ps", s["id"].as_str().unwrap()]));
        }
        serde_json::json!({ "sandboxes": sandboxes, "processes": processes })
    }
}

/// Spawns `sandbox ARGS` with piped stdout and a thread that forwards its lines.
fn spawn_lines(home: &Home, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = home
        .std_cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sandbox");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn expect_line(rx: &mpsc::Receiver<String>, want: &str) {
    let line = rx
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|e| panic!("no line {want:?} within {TIMEOUT:?}: {e}"));
    assert_eq!(line, want);
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "child did not exit within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// The one process of a sandbox, waiting (bounded) until it is recorded.
fn only_process(home: &Home, id: &str) -> Value {
    eventually(&format!("a process recorded in {id}"), || {
        let ps = home.json(&["ps", id]);
        ps.as_array().and_then(|a| a.first()).cloned()
    })
}

// ---- run ---------------------------------------------------------------------------------

#[test]
fn run_streams_output_and_propagates_the_exit_code() {
    let home = Home::new();
    let out = home
        .cmd()
        .args(["run", "--", "sh", "-c", "echo out; echo err >&2; exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, b"out\n");
    // stderr is not a terminal here: no spinner, no notes, only the command's own stderr.
    // (A machine without isolation adds one `warning:` line from create, by design.)
    let stderr = String::from_utf8(out.stderr).unwrap();
    let own: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("warning: sandbox"))
        .collect();
    assert_eq!(own, ["err"], "{stderr}");
    let ok = home.cmd().args(["run", "--", "true"]).output().unwrap();
    assert_eq!(ok.status.code(), Some(0));
}

#[test]
fn run_stops_its_sandbox_unless_kept() {
    let home = Home::new();
    home.ok(&["run", "--", "true"]);
    let ls = home.json(&["ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["status"], "shutdown");
    assert_eq!(ls[0]["provider"], "local");

    home.ok(&["run", "--keep", "--", "true"]);
    let active = home.json(&["ls", "--status", "active"]);
    assert_eq!(active.as_array().unwrap().len(), 1, "{active}");
}

#[test]
fn run_json_prints_log_lines_then_the_outcome() {
    let home = Home::new();
    let out = home
        .cmd()
        .args(["--json", "run", "--", "sh", "-c", "printf hi; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["type"] == "stdout" && l["data"]["text"] == "hi"));
    let last = lines.last().unwrap();
    assert_eq!(last["exitCode"], 3);
    assert_eq!(last["status"], "failed");
}

// ---- exec, ps, logs ----------------------------------------------------------------------

#[test]
fn exec_is_recorded_with_cwd_and_env() {
    let home = Home::new();
    let id = home.create();
    home.ok(&["exec", &id, "--", "mkdir", "sub"]);
    let out = home
        .cmd()
        .args([
            "exec",
            &id,
            "--cwd",
            "sub",
            "--env",
            "GREETING=hi there",
            "--",
        ])
        .args(["sh", "-c", "echo \"$GREETING\" from $(basename \"$PWD\")"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hi there from sub\n");
    let ps = home.json(&["ps", &id]);
    assert_eq!(ps.as_array().unwrap().len(), 2);
    let p = &ps[1];
    assert_eq!(p["status"], "exited");
    assert_eq!(p["exitCode"], 0);
    assert_eq!(
        p["env"]["GREETING"], "[redacted]",
        "env values are never stored"
    );
    let logs = home.ok(&["logs", p["id"].as_str().unwrap()]);
    assert_eq!(logs, "hi there from sub\n");
}

#[test]
fn logs_follow_picks_up_from_seq_while_the_command_runs() {
    let home = Home::new();
    let id = home.create();
    // The command prints `one`, then waits for a gate file that the test writes later.
    let (mut exec, exec_out) = spawn_lines(
        &home,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo one; while [ ! -e gate ]; do sleep 0.02; done; echo two",
        ],
    );
    expect_line(&exec_out, "one");
    let p = only_process(&home, &id);
    assert_eq!(p["status"], "running");
    let pid = p["id"].as_str().unwrap().to_string();

    // seq 1 is the `running` status chunk, seq 2 carries `one`.
    let (mut follow, follow_out) = spawn_lines(
        &home,
        &["--json", "logs", &pid, "--follow", "--from-seq", "2"],
    );
    let chunk = |rx: &mpsc::Receiver<String>| -> Value {
        let line = rx
            .recv_timeout(TIMEOUT)
            .expect("a log line within the timeout");
        serde_json::from_str(&line).expect("NDJSON")
    };
    let first = chunk(&follow_out);
    assert_eq!(
        (first["seq"].as_u64(), first["data"]["text"].as_str()),
        (Some(2), Some("one\n"))
    );
    assert!(
        follow.try_wait().unwrap().is_none(),
        "follow waits while the log is open"
    );

    // Only now may the command go on: `two` reaches the follower live.
    let gate = home.path().join("gate");
    std::fs::write(&gate, b"").unwrap();
    home.ok(&["cp", gate.to_str().unwrap(), &format!("{id}:gate")]);
    let second = chunk(&follow_out);
    assert_eq!(
        (second["seq"].as_u64(), second["data"]["text"].as_str()),
        (Some(3), Some("two\n"))
    );
    let exit = chunk(&follow_out);
    assert_eq!(
        (exit["type"].as_str(), exit["data"]["status"].as_str()),
        (Some("exit"), Some("exited"))
    );
    assert!(
        wait_exit(&mut follow).success(),
        "{}",
        stderr_of(&mut follow)
    );
    expect_line(&exec_out, "two");
    assert!(wait_exit(&mut exec).success());

    assert_eq!(home.ok(&["logs", &pid, "--from-seq", "3"]), "two\n");
    assert_eq!(home.ok(&["logs", &pid]), "one\ntwo\n");
}

// ---- files -------------------------------------------------------------------------------

#[test]
fn cp_copies_binary_content_both_ways() {
    let home = Home::new();
    let id = home.create();
    let content: Vec<u8> = (0..=255u8)
        .cycle()
        .take(70_000)
        .chain([0xff, 0xfe, 0x00, 0xc3])
        .collect();
    let src = home.path().join("data.bin");
    std::fs::write(&src, &content).unwrap();

    home.ok(&["cp", src.to_str().unwrap(), &format!("{id}:dir/data.bin")]);
    let back = home.path().join("back.bin");
    home.ok(&["cp", &format!("{id}:dir/data.bin"), back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), content);

    // The same bytes come through a recorded command's log.
    let out = home
        .cmd()
        .args(["exec", &id, "--", "cat", "dir/data.bin"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, content);

    // `-` is stdin as a source...
    home.cmd()
        .args(["cp", "-", &format!("{id}:from-stdin.bin")])
        .write_stdin(content.clone())
        .assert()
        .success();
    let out = home
        .cmd()
        .args(["exec", &id, "--", "cmp", "from-stdin.bin", "dir/data.bin"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // ...and stdout as a destination.
    let out = home
        .cmd()
        .args(["cp", &format!("{id}:dir/data.bin"), "-"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, content);
}

#[test]
fn cp_of_a_missing_sandbox_file_fails_and_writes_nothing() {
    let home = Home::new();
    let id = home.create();
    let dest = home.path().join("never.txt");
    let (code, err) = home.json_err(&["cp", &format!("{id}:missing.txt"), dest.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err["code"], "sandbox_file_not_found");
    assert!(!dest.exists());
}

#[test]
fn port_gives_the_url_of_a_declared_port() {
    let home = Home::new();
    let id = home
        .ok(&["create", "--port", "8080", "--purpose", "web"])
        .trim()
        .to_string();
    let shown = home.json(&["show", &id]);
    assert_eq!(shown["ports"], serde_json::json!([8080]));
    assert_eq!(shown["purpose"], "web");
    let url = home.ok(&["port", &id, "8080"]);
    assert!(
        url.starts_with("http") && url.trim_end().ends_with("8080"),
        "{url}"
    );
    let (code, err) = home.json_err(&["port", &id, "0"]);
    assert_eq!(
        (code, err["code"].as_str()),
        (1, Some("sandbox_port_invalid"))
    );
}

// ---- checkpoints, stop -------------------------------------------------------------------

#[test]
fn checkpoint_and_restore_bring_back_the_workspace() {
    let home = Home::new();
    let id = home.create();
    home.ok(&["exec", &id, "--", "sh", "-c", "echo v1 > state.txt"]);
    let cp = home.json(&["checkpoint", &id, "-m", "first"]);
    let cp_id = cp["id"].as_str().expect("checkpoint id").to_string();
    home.ok(&["exec", &id, "--", "sh", "-c", "echo v2 > state.txt"]);
    assert_eq!(home.ok(&["cp", &format!("{id}:state.txt"), "-"]), "v2\n");

    let list = home.json(&["checkpoints", &id]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == cp_id.as_str() && c["comment"] == "first"),
        "{list}"
    );

    home.ok(&["restore", &id, &cp_id]);
    assert_eq!(home.ok(&["cp", &format!("{id}:state.txt"), "-"]), "v1\n");
}

#[test]
fn stop_shuts_the_sandbox_down_and_later_commands_say_so() {
    let home = Home::new();
    let id = home.create();
    let stopped = home.json(&["stop", &id]);
    assert_eq!(stopped["status"], "shutdown");
    assert_eq!(home.json(&["show", &id])["status"], "shutdown");
    let (code, err) = home.json_err(&["exec", &id, "--", "true"]);
    assert_eq!(code, 125);
    assert_eq!(err["code"], "sandbox_not_active:shutdown");
    // Stopping again is not an error.
    home.ok(&["stop", &id]);
}

// ---- interruption and recovery -------------------------------------------------------------

#[test]
fn reconcile_marks_the_process_of_a_killed_exec_lost() {
    let home = Home::new();
    let id = home.create();
    let (mut exec, out) = spawn_lines(
        &home,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo started; while [ ! -e gate ]; do sleep 0.02; done",
        ],
    );
    expect_line(&out, "started");
    let pid = only_process(&home, &id)["id"].as_str().unwrap().to_string();
    exec.kill().unwrap(); // SIGKILL: the CLI cannot record anything
    wait_exit(&mut exec);
    assert_eq!(
        only_process(&home, &id)["status"],
        "running",
        "nobody has recorded the end yet"
    );

    let report = home.json(&["reconcile"]);
    let lost: Vec<&str> = report["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l[0].as_str().unwrap())
        .collect();
    assert_eq!(lost, [pid.as_str()], "{report}");
    assert_eq!(only_process(&home, &id)["status"], "lost");
    // Let the orphaned command end.
    let gate = home.path().join("gate");
    std::fs::write(&gate, b"").unwrap();
    home.ok(&["cp", gate.to_str().unwrap(), &format!("{id}:gate")]);
    home.ok(&["stop", &id]);
}

fn interrupt(child: &Child) {
    // SAFETY: plain kill(2) on a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
}

#[test]
fn ctrl_c_during_exec_kills_the_command_and_records_it_killed() {
    let home = Home::new();
    let id = home.create();
    let (mut exec, out) = spawn_lines(
        &home,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo started; while true; do sleep 0.02; done",
        ],
    );
    expect_line(&out, "started");
    interrupt(&exec);
    let status = wait_exit(&mut exec);
    assert_eq!(status.code(), Some(130), "{}", stderr_of(&mut exec));
    assert_eq!(only_process(&home, &id)["status"], "killed");
    assert_eq!(
        home.json(&["show", &id])["status"],
        "active",
        "exec leaves the sandbox running"
    );
}

#[test]
fn ctrl_c_during_run_kills_the_command_and_stops_the_sandbox() {
    let home = Home::new();
    let (mut run, out) = spawn_lines(
        &home,
        &[
            "run",
            "--",
            "sh",
            "-c",
            "echo started; while true; do sleep 0.02; done",
        ],
    );
    expect_line(&out, "started");
    interrupt(&run);
    let status = wait_exit(&mut run);
    assert_eq!(status.code(), Some(130), "{}", stderr_of(&mut run));
    let ls = home.json(&["ls"]);
    assert_eq!(ls[0]["status"], "shutdown");
    let id = ls[0]["id"].as_str().unwrap();
    assert_eq!(only_process(&home, id)["status"], "killed");
}

/// Waits (bounded) until `probe` returns something.
fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ctrl_c_as_soon_as_run_has_recorded_its_sandbox_still_stops_it() {
    let home = Home::new();
    // No output: nothing tells the test how far `run` has got, only the store does.
    let (mut run, _out) = spawn_lines(
        &home,
        &["run", "--", "sh", "-c", "while true; do sleep 0.02; done"],
    );
    let id = eventually("a sandbox is recorded", || {
        let ls = home.json(&["ls"]);
        ls.get(0).map(|s| s["id"].as_str().unwrap().to_string())
    });
    interrupt(&run);
    let status = wait_exit(&mut run);
    assert_eq!(status.code(), Some(130), "{}", stderr_of(&mut run));
    assert_eq!(home.json(&["show", &id])["status"], "shutdown");
    let ps = home.json(&["ps", &id]);
    assert!(
        ps.as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "killed"),
        "the command never ran or was killed: {ps}"
    );
}

#[test]
fn ctrl_c_before_any_output_of_exec_kills_the_command() {
    let home = Home::new();
    let id = home.create();
    let (mut exec, _out) = spawn_lines(
        &home,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "while true; do sleep 0.02; done",
        ],
    );
    only_process(&home, &id);
    interrupt(&exec);
    let status = wait_exit(&mut exec);
    assert_eq!(status.code(), Some(130), "{}", stderr_of(&mut exec));
    assert_eq!(only_process(&home, &id)["status"], "killed");
}

/// Runs `sandbox ARGS` with stderr on a pseudo-terminal; returns stdout and what the terminal showed.
fn with_terminal_stderr(home: &Home, args: &[&str]) -> (std::process::Output, String) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors, which are owned by the `File`s below.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let reader = std::thread::spawn(move || {
        let mut shown = Vec::new();
        let mut master = master;
        // Ends with EIO once the child, the last holder of the terminal's other side, exits.
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            shown.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&shown).into_owned()
    });
    let child = home
        .std_cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("spawn sandbox");
    let out = child.wait_with_output().expect("wait");
    (out, reader.join().unwrap())
}

#[test]
fn slow_steps_show_a_spinner_when_stderr_is_a_terminal() {
    let home = Home::new();
    let (out, shown) = with_terminal_stderr(&home, &["create"]);
    assert!(out.status.success(), "{shown}");
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(id.len(), 36, "the id alone on stdout: {id:?}");
    assert!(shown.contains("creating a local sandbox"), "{shown:?}");

    let (out, shown) = with_terminal_stderr(&home, &["stop", &id]);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("stopping sandbox {id}")),
        "{shown:?}"
    );

    // Machine-readable output never gets one.
    let (out, shown) = with_terminal_stderr(&home, &["--json", "create"]);
    assert!(out.status.success(), "{shown}");
    assert!(!shown.contains("creating"), "{shown:?}");
}

// ---- machine-readable output ---------------------------------------------------------------

#[test]
fn json_output_parses_for_every_listing_command() {
    let home = Home::new();
    assert_eq!(home.json(&["ls"]), serde_json::json!([]));
    let created = home.json(&["create"]);
    let id = created["id"].as_str().unwrap();
    assert_eq!(created["status"], "active");
    assert_eq!(home.json(&["show", id])["id"], id);
    assert_eq!(home.json(&["ls"]).as_array().unwrap().len(), 1);
    assert!(home.json(&["ps", id]).is_array());
    assert!(home
        .json(&["providers"])
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "local"));
    let report = home.json(&["reconcile"]);
    assert!(report["lost"].is_array());
    let doctor = home.json(&["doctor"]);
    assert_eq!(doctor["store"]["ok"], true);
}

#[test]
fn doctor_reports_store_providers_isolation_and_credentials_by_name_only() {
    let home = Home::new();
    let out = home
        .cmd()
        .args(["--json", "doctor"])
        .env("SPRITES_API_TOKEN", "very-secret-token-value")
        .env("SANDBOX_VERCEL_TOKEN", "another-secret-value")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("very-secret-token-value") && !text.contains("another-secret-value"));
    let d: Value = serde_json::from_str(&text).unwrap();
    assert!(
        d["store"]["location"]
            .as_str()
            .unwrap()
            .contains(home.path().to_str().unwrap()),
        "{d}"
    );
    assert_eq!(d["defaultProvider"], "local");
    // The binary links exactly the backends of its features.
    let on = |pairs: &[(bool, &str)]| -> Value {
        pairs
            .iter()
            .filter(|(enabled, _)| *enabled)
            .map(|(_, n)| *n)
            .collect()
    };
    assert_eq!(
        d["providers"],
        on(&[
            (cfg!(feature = "local"), "local"),
            (cfg!(feature = "sprites"), "sprites")
        ])
    );
    assert_eq!(
        d["stores"],
        on(&[
            (cfg!(feature = "instant"), "instant"),
            (true, "memory"),
            (cfg!(feature = "sqlite"), "sqlite")
        ])
    );
    assert!(d["localIsolation"]["available"].is_array(), "{d}");
    assert!(d["localIsolation"]["auto"].is_string(), "{d}");
    if cfg!(feature = "sprites") {
        let sprites = d["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["provider"] == "sprites")
            .expect("sprites credentials reported");
        assert_eq!(sprites["set"], serde_json::json!(["SPRITES_API_TOKEN"]));
        assert_eq!(sprites["unset"], serde_json::json!(["SPRITE_TOKEN"]));
    }
    // The human form too.
    let human = home
        .cmd()
        .arg("doctor")
        .env("SPRITES_API_TOKEN", "very-secret-token-value")
        .output()
        .unwrap();
    let human = String::from_utf8(human.stdout).unwrap();
    assert!(!human.contains("very-secret-token-value"));
    assert!(human.contains("isolation:"));
}

#[test]
fn ls_filters_by_status_and_provider() {
    let home = Home::new();
    let kept = home.create();
    home.ok(&["run", "--", "true"]);
    let active = home.json(&["ls", "--status", "active"]);
    assert_eq!(active.as_array().unwrap().len(), 1);
    assert_eq!(active[0]["id"], kept.as_str());
    assert_eq!(
        home.json(&["ls", "--status", "shutdown"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        home.json(&["ls", "--provider", "local"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        home.json(&["ls", "--provider", "sprites"]),
        serde_json::json!([])
    );
    let (code, _) = home.json_err(&["ls", "--status", "sleeping"]);
    assert_eq!(code, 1);
}

#[test]
fn config_file_is_the_typescript_packages_json() {
    let home = Home::new();
    let config = home.path().join("sandbox.json");
    std::fs::write(
        &config,
        r#"{"provider": "local", "purpose": "ci", "params": {"ticket": 7}}"#,
    )
    .unwrap();
    let created = home.json(&["--config", config.to_str().unwrap(), "create"]);
    assert_eq!(created["purpose"], "ci");
    assert_eq!(created["params"]["ticket"], 7);

    std::fs::write(&config, r#"{"provider": "nosuch"}"#).unwrap();
    let (_, err) = home.json_err(&["--config", config.to_str().unwrap(), "create"]);
    assert_eq!(err["code"], "sandbox_provider_unknown");
    // --provider beats the config's provider.
    home.ok(&[
        "--config",
        config.to_str().unwrap(),
        "--provider",
        "local",
        "create",
    ]);

    std::fs::write(&config, r#"{"ports": "not a list"}"#).unwrap();
    let (_, err) = home.json_err(&["--config", config.to_str().unwrap(), "create"]);
    assert_eq!(err["code"], "sandbox_config_invalid");
    assert_eq!(home.json(&["ls"]).as_array().unwrap().len(), 2);
}

#[test]
fn store_and_provider_options_beat_their_environment_variables() {
    let home = Home::new();
    let other = format!("sqlite://{}", home.path().join("other.db").display());
    let created = home.json(&["--store", &other, "create"]);
    assert_eq!(created["provider"], "local");
    // The sandbox is in the --store database, not in SANDBOX_STORE's.
    assert_eq!(home.json(&["ls"]), serde_json::json!([]));
    let listed = home.json(&["--store", &other, "ls"]);
    assert_eq!(listed[0]["id"], created["id"]);
    let doctor = home.json(&["--store", &other, "doctor"]);
    assert!(
        doctor["store"]["location"]
            .as_str()
            .unwrap()
            .contains("other.db"),
        "{doctor}"
    );

    let out = home
        .cmd()
        .args(["--json", "--provider", "local", "create"])
        .env("SANDBOX_PROVIDER", "nosuch")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(home.json(&["ls"]).as_array().unwrap().len(), 1);
}

#[test]
fn verbose_logs_go_to_stderr_and_quiet_silences_notes() {
    let home = Home::new();
    let out = home
        .cmd()
        .args(["-v", "run", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("command started"));
    assert!(out.stdout.is_empty());
    let out = home
        .cmd()
        .args(["-q", "run", "--keep", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = home
        .cmd()
        .args(["run", "--keep", "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("sandbox ")),
        "--keep names the sandbox: {stderr}"
    );
}

// ---- bad input -----------------------------------------------------------------------------

#[test]
fn unknown_sandbox_id_is_a_clear_error_that_changes_nothing() {
    let home = Home::new();
    let id = home.create();
    let before = home.snapshot();
    let unknown = "3f1c2b7e-8d4a-4c1e-9b2f-0a1b2c3d4e5f";
    let (code, err) = home.json_err(&["exec", unknown, "--", "true"]);
    assert_eq!(code, 125);
    assert_eq!(err["code"], "sandbox_not_found");
    assert!(err["message"].as_str().unwrap().contains(unknown));
    let (code, err) = home.json_err(&["stop", unknown]);
    assert_eq!(code, 1);
    assert_eq!(err["code"], "sandbox_not_found");
    // The human form is one line naming the sandbox and what to do.
    let out = home.cmd().args(["show", unknown]).output().unwrap();
    let text = String::from_utf8(out.stderr).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("error: ") && text.contains(unknown) && text.contains("sandbox ls"));
    assert_eq!(home.snapshot(), before);
    let _ = id;
}

#[test]
fn malformed_ids_are_rejected_before_anything_happens() {
    let home = Home::new();
    home.create();
    let before = home.snapshot();
    let (code, err) = home.json_err(&["exec", "not-a-uuid", "--", "true"]);
    assert_eq!(code, 125);
    assert_eq!(err["code"], "invalid_sandbox_id");
    let (_, err) = home.json_err(&["logs", "12345"]);
    assert_eq!(err["code"], "invalid_process_id");
    let (_, err) = home.json_err(&["cp", "nope:file", "x"]);
    assert_eq!(err["code"], "invalid_sandbox_id");
    assert_eq!(home.snapshot(), before);
}

#[test]
fn unknown_provider_lists_the_registered_ones_and_creates_nothing() {
    let home = Home::new();
    let (code, err) = home.json_err(&["--provider", "nosuch", "create"]);
    assert_eq!(code, 1);
    assert_eq!(err["code"], "sandbox_provider_unknown");
    assert!(err["message"].as_str().unwrap().contains("local"), "{err}");
    let out = home
        .cmd()
        .args(["run", "--", "true"])
        .env("SANDBOX_PROVIDER", "nosuch")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(
        text.contains("nosuch") && text.contains("registered providers: "),
        "{text}"
    );
    assert_eq!(home.json(&["ls"]), serde_json::json!([]));
}

#[test]
fn paths_escaping_the_workspace_are_refused_and_nothing_is_written() {
    let home = Home::new();
    let id = home.create();
    let before = home.snapshot();
    let src = home.path().join("evil.txt");
    std::fs::write(&src, b"evil").unwrap();
    for dest in [
        "../../../escaped.txt",
        "/etc/escaped.txt",
        "a/../../escaped.txt",
    ] {
        let (code, err) = home.json_err(&["cp", src.to_str().unwrap(), &format!("{id}:{dest}")]);
        assert_eq!(code, 1);
        assert!(
            err["code"].as_str().unwrap().starts_with("sandbox_path"),
            "{err}"
        );
    }
    let (_, err) = home.json_err(&["exec", &id, "--cwd", "../..", "--", "true"]);
    assert_eq!(err["code"], "sandbox_path_outside_workspace");
    let (_, err) = home.json_err(&["cp", &format!("{id}:../../../etc/passwd"), "-"]);
    assert_eq!(err["code"], "sandbox_path_outside_workspace");
    for dir in [home.path().to_path_buf(), home.local_root()] {
        assert!(!dir.join("escaped.txt").exists());
    }
    assert_eq!(home.snapshot(), before);
}

#[test]
fn bad_env_keys_are_refused_before_anything_runs() {
    let home = Home::new();
    let id = home.create();
    let before = home.snapshot();
    let (code, err) = home.json_err(&["exec", &id, "--env", "BAD-KEY=1", "--", "true"]);
    assert_eq!(code, 125);
    assert_eq!(err["code"], "sandbox_env_key_invalid:BAD-KEY");
    let (_, err) = home.json_err(&["exec", &id, "--env", "NOEQUALS", "--", "true"]);
    assert!(err["code"]
        .as_str()
        .unwrap()
        .starts_with("sandbox_env_key_invalid"));
    let (_, err) = home.json_err(&["run", "--env", "1X=y", "--", "true"]);
    assert_eq!(err["code"], "sandbox_env_key_invalid:1X");
    assert_eq!(
        home.snapshot(),
        before,
        "no sandbox or process was recorded"
    );
}

#[test]
fn every_bad_input_is_one_error_line_that_says_what_failed() {
    let home = Home::new();
    let id = home.create();
    let src = home.path().join("f.txt");
    std::fs::write(&src, b"x").unwrap();
    let unknown = "3f1c2b7e-8d4a-4c1e-9b2f-0a1b2c3d4e5f";
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["show".into(), unknown.into()], unknown),
        (
            vec![
                "exec".into(),
                "not-a-uuid".into(),
                "--".into(),
                "true".into(),
            ],
            "sandbox id",
        ),
        (vec!["logs".into(), "12345".into()], "process id"),
        (
            vec!["--provider".into(), "nosuch".into(), "create".into()],
            "nosuch",
        ),
        (
            vec![
                "exec".into(),
                id.clone(),
                "--env".into(),
                "BAD-KEY=1".into(),
                "--".into(),
                "true".into(),
            ],
            "BAD-KEY",
        ),
        (
            vec![
                "cp".into(),
                src.to_str().unwrap().into(),
                format!("{id}:../../x"),
            ],
            &id,
        ),
        (
            vec!["ls".into(), "--status".into(), "sleeping".into()],
            "sleeping",
        ),
        (vec!["--store".into(), "bogus".into(), "ls".into()], "bogus"),
    ];
    let before = home.snapshot();
    for (args, names) in &cases {
        let out = home.cmd().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let text = String::from_utf8(out.stderr).unwrap();
        assert_eq!(text.lines().count(), 1, "{args:?}: {text}");
        assert!(
            text.starts_with("error: ") && text.contains(names),
            "{args:?}: {text}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert_eq!(home.snapshot(), before);
}

// ---- the README --------------------------------------------------------------------------

/// The README's `cargo run -p sandbox-cli -- ARGS` commands, and the packages its `cargo test`
/// commands name.
fn readme_commands() -> (PathBuf, Vec<Vec<String>>, Vec<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = [
        root.join("README.md"),
        root.join("sandbox-cli/README-draft.md"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("README.md (or sandbox-cli/README-draft.md) exists");
    let text = std::fs::read_to_string(&readme).unwrap();
    let mut runs = Vec::new();
    let mut packages = Vec::new();
    for line in text.lines().map(str::trim) {
        let line = line.trim_start_matches("$ ");
        let words = shell_words(line);
        if let Some(rest) = line.strip_prefix("cargo run -p sandbox-cli -- ") {
            runs.push(shell_words(rest));
        } else if words.first().map(String::as_str) == Some("cargo")
            && words.get(1).map(String::as_str) == Some("test")
        {
            let mut it = words.iter();
            while let Some(w) = it.next() {
                if w == "-p" || w == "--package" {
                    packages.extend(it.next().cloned());
                }
            }
            packages.push(String::new()); // marks that a test command was found
        }
    }
    (readme, runs, packages)
}

/// Splits a command line on whitespace, honouring single and double quotes.
fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[test]
fn readme_commands_exist_as_written() {
    let (readme, runs, packages) = readme_commands();
    assert!(
        !runs.is_empty(),
        "{} has a `cargo run -p sandbox-cli -- ...` command",
        readme.display()
    );
    assert!(
        !packages.is_empty(),
        "{} has a `cargo test` command",
        readme.display()
    );
    let home = Home::new();
    for args in &runs {
        let out = home.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "README command `sandbox {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for p in packages.iter().filter(|p| !p.is_empty()) {
        assert!(
            root.join(p).join("Cargo.toml").exists(),
            "README names package {p}, which does not exist"
        );
    }
}

/// The usages in the first column of the README's table of `sandbox` commands, e.g.
/// `run [--keep] [-p PORT]... -- CMD...`.
fn readme_usages() -> Vec<String> {
    let (readme, _, _) = readme_commands();
    let text = std::fs::read_to_string(readme).unwrap();
    let table = text
        .split_once("## The `sandbox` command")
        .expect("the README has a section on the `sandbox` command")
        .1;
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| cell.split(" / ").map(str::to_string).collect::<Vec<_>>())
        .map(|u| u.trim().trim_matches('`').to_string())
        .filter(|u| !u.is_empty() && !u.starts_with("Command") && !u.starts_with('-'))
        .collect()
}

#[test]
fn readme_command_table_names_real_commands_and_options() {
    let usages = readme_usages();
    assert!(usages.len() >= 15, "{usages:?}");
    let home = Home::new();
    for usage in &usages {
        let sub = usage.split_whitespace().next().unwrap();
        let help = home.ok(&[sub, "--help"]);
        let flags = usage
            .split_whitespace()
            .map(|w| w.trim_start_matches('['))
            .filter(|w| w.starts_with('-') && *w != "--");
        for flag in flags {
            let flag: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let known = help.match_indices(&flag).any(|(i, _)| {
                let next = help[i + flag.len()..].chars().next();
                !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
            });
            assert!(
                known,
                "README: `sandbox {usage}`: {sub} has no option {flag}"
            );
        }
    }
}

#[test]
fn version_and_usage_errors() {
    let home = Home::new();
    let out = home.ok(&["--version"]);
    assert_eq!(out.trim(), format!("sandbox {}", env!("CARGO_PKG_VERSION")));
    let usage = home.cmd().output().unwrap();
    assert_eq!(
        usage.status.code(),
        Some(2),
        "no subcommand is a usage error"
    );
    let usage = home.cmd().args(["run"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2), "run needs a command");
    // With --json a usage error is a JSON error too.
    let (code, err) = home.json_err(&["port", "x", "99999"]);
    assert_eq!(code, 2);
    assert_eq!(err["code"], "sandbox_usage_invalid");
    assert!(err["message"].as_str().unwrap().contains("99999"), "{err}");
    let (code, err) = home.json_err(&["nosuchcommand"]);
    assert_eq!(
        (code, err["code"].as_str()),
        (2, Some("sandbox_usage_invalid"))
    );
    // ...but --help stays help, and a `--json` after `--` belongs to the command.
    home.ok(&["--json", "--help"]);
    let usage = home
        .cmd()
        .args(["--bogus", "run", "--", "echo", "--json"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).starts_with("error: "));
    assert_eq!(
        home.json(&["ls"]),
        serde_json::json!([]),
        "usage errors change nothing"
    );
}
