//! Who holds a log's writer, and whether that writer is still alive.
//!
//! A writer is recorded as the OS process that opened it — pid, the pid's start time
//! (`/proc/<pid>/stat` field 22, clock ticks since boot), the kernel boot id and the pid
//! namespace — plus a random token naming the writer object inside that process. See the
//! crate docs, "Writer liveness".

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use sandbox_core::WriterLiveness;

/// The identity of a writer as stored in `sandbox_process_logs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WriterIdentity {
    pub(crate) pid: u32,
    pub(crate) start_time: Option<u64>,
    pub(crate) boot_id: Option<String>,
    pub(crate) pid_namespace: Option<String>,
}

/// This OS process.
pub(crate) fn current() -> &'static WriterIdentity {
    static ME: OnceLock<WriterIdentity> = OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        WriterIdentity {
            pid,
            start_time: proc_stat(pid).map(|s| s.start_time),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
            pid_namespace: std::fs::read_link("/proc/self/ns/pid")
                .ok()
                .map(|p| p.display().to_string()),
        }
    })
}

/// Tokens of the writer objects alive in this OS process.
fn live_tokens() -> &'static Mutex<HashSet<String>> {
    static LIVE: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

fn lock_live() -> std::sync::MutexGuard<'static, HashSet<String>> {
    live_tokens().lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a writer object alive in this process until dropped.
#[derive(Debug)]
pub(crate) struct LiveToken(String);

impl LiveToken {
    pub(crate) fn new() -> Self {
        let token = uuid::Uuid::new_v4().simple().to_string();
        lock_live().insert(token.clone());
        LiveToken(token)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl Drop for LiveToken {
    fn drop(&mut self) {
        lock_live().remove(&self.0);
    }
}

/// Judges the writer recorded as `who` with `token`.
pub(crate) fn judge(who: &WriterIdentity, token: &str) -> WriterLiveness {
    let me = current();
    if who == me {
        // Our own process: the writer lives exactly as long as its object.
        return if lock_live().contains(token) {
            WriterLiveness::Alive
        } else {
            WriterLiveness::Gone
        };
    }
    if let (Some(theirs), Some(ours)) = (&who.boot_id, &me.boot_id) {
        if theirs != ours {
            // The machine rebooted (or it is another machine's /proc): every pid since is new.
            return WriterLiveness::Gone;
        }
    }
    if let (Some(theirs), Some(ours)) = (&who.pid_namespace, &me.pid_namespace) {
        if theirs != ours {
            // A pid of another namespace (container) means nothing here.
            return WriterLiveness::Unknown;
        }
    }
    os_process_liveness(who)
}

#[cfg(target_os = "linux")]
fn os_process_liveness(who: &WriterIdentity) -> WriterLiveness {
    match proc_stat(who.pid) {
        None => WriterLiveness::Gone,
        Some(stat) if stat.zombie => WriterLiveness::Gone,
        Some(stat) => match who.start_time {
            Some(t) if t != stat.start_time => WriterLiveness::Gone, // the pid was reused
            _ => WriterLiveness::Alive,
        },
    }
}

#[cfg(all(unix, not(target_os = "linux")))]
fn os_process_liveness(who: &WriterIdentity) -> WriterLiveness {
    // No start time to compare: a reused pid reads as alive, which only delays `lost`.
    let Ok(pid) = libc::pid_t::try_from(who.pid) else {
        return WriterLiveness::Unknown;
    };
    // SAFETY: signal 0 performs only the existence and permission check.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc == 0 {
        return WriterLiveness::Alive;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ESRCH) => WriterLiveness::Gone,
        Some(libc::EPERM) => WriterLiveness::Alive,
        _ => WriterLiveness::Unknown,
    }
}

#[cfg(not(unix))]
fn os_process_liveness(_who: &WriterIdentity) -> WriterLiveness {
    WriterLiveness::Unknown
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 22: start time in clock ticks after boot.
    pub(crate) start_time: u64,
    /// Field 3 is `Z` or `X`: dead, waiting to be reaped.
    pub(crate) zombie: bool,
}

pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_proc_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its last `)`.
pub(crate) fn parse_proc_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state); field 22 is `fields[19]`.
    let state = fields.first()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        start_time,
        zombie: matches!(*state, "Z" | "X" | "x"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 100 18446744073709551615";
        assert_eq!(
            parse_proc_stat(line),
            Some(ProcStat {
                start_time: 987654,
                zombie: false
            })
        );
        let zombie = line.replace(") S ", ") Z ");
        assert!(parse_proc_stat(&zombie).unwrap().zombie);
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn writer_objects_of_this_process_are_alive_until_dropped() {
        let token = LiveToken::new();
        let me = current().clone();
        assert_eq!(judge(&me, token.as_str()), WriterLiveness::Alive);
        let name = token.as_str().to_string();
        drop(token);
        assert_eq!(judge(&me, &name), WriterLiveness::Gone);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_dead_pid_or_a_reused_pid_is_gone_and_a_running_one_alive() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = proc_stat(pid).expect("the child is running").start_time;
        let who = WriterIdentity {
            pid,
            start_time: Some(start),
            ..current().clone()
        };
        assert_eq!(judge(&who, "t"), WriterLiveness::Alive);
        let reused = WriterIdentity {
            start_time: Some(start + 1),
            ..who.clone()
        };
        assert_eq!(judge(&reused, "t"), WriterLiveness::Gone);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(judge(&who, "t"), WriterLiveness::Gone);
        let rebooted = WriterIdentity {
            boot_id: Some("another-boot".into()),
            ..current().clone()
        };
        assert_eq!(judge(&rebooted, "t"), WriterLiveness::Gone);
    }
}
