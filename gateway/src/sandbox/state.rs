//! What a run leaves on the host, recorded so a later run or `gateway cleanup` can remove it
//! after a crash.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use serde::{Deserialize, Serialize};

use super::{SandboxError, cgroup::Cgroup, host::BPFFS};
use crate::{
    audit::AuditLog,
    kernel::{self, PinnedEvents},
    policy::count,
};

/// Per-run state directories live here (tmpfs: gone after reboot, as are the pins).
pub const RUN_DIR: &str = "/run/gateway";

#[derive(Debug, Serialize, Deserialize)]
pub struct RunState {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat, so a reused pid is not mistaken for the owner.
    pub start_time: u64,
    pub sandbox: String,
    pub cgroup_dir: PathBuf,
    pub pin_dir: PathBuf,
    /// A cgroup `gateway serve` was given rather than made: cleanup kills what is in it but
    /// leaves the directory.
    #[serde(default)]
    pub keep_cgroup: bool,
    /// The audit log the run writes (absolute), and its rotation size: cleanup writes there
    /// what the run's programs refused after its gateway died. `None` in the state of a
    /// gateway from before it was recorded.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    #[serde(default)]
    pub audit_max_bytes: Option<u64>,
}

/// The file in a run's state directory that says how much of its lost-event count is in the
/// audit log already (see [`kernel::EventReader::run`]).
pub const LOST_REPORTED: &str = "lost-reported";

/// The file in a run's state directory that counts the refusals the run could not record,
/// the log having failed: those its event reader had taken off the ring (see
/// [`kernel::EventReader::run`]) and those its seccomp notifier answered. `gateway cleanup`
/// reports them as lost.
pub const UNRECORDED: &str = "unrecorded";

/// The id of this run: the gateway's pid, which is unique among live runs.
pub fn run_id() -> String {
    std::process::id().to_string()
}

pub fn run_dir(id: &str) -> PathBuf {
    Path::new(RUN_DIR).join(id)
}

pub fn pin_dir(id: &str) -> PathBuf {
    Path::new(BPFFS).join("gateway").join(id)
}

impl RunState {
    pub fn save(&self, dir: &Path) -> Result<(), SandboxError> {
        std::fs::create_dir_all(dir).map_err(SandboxError::io("creating", dir))?;
        let file = dir.join("state.json");
        let json = serde_json::to_vec_pretty(self).expect("state serializes");
        std::fs::write(&file, json).map_err(SandboxError::io("writing", &file))
    }

    /// A gateway killed but not yet reaped by its parent (a zombie) is gone: it holds
    /// nothing any more, and its parent may never reap it.
    fn alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }
}

fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X"))
}

pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses; the fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// One crashed run cleaned up, and what became of the refusals its programs made after its
/// gateway died.
pub struct Cleaned {
    pub sandbox: String,
    pub pid: u32,
    pub saved: Saved,
}

pub enum Saved {
    /// Written to the run's audit log: `refusals` kernel records, and `lost` more refusals
    /// counted in an `events-lost` record.
    Written {
        log: PathBuf,
        refusals: u64,
        lost: u64,
    },
    /// They could not be saved, for this reason.
    Unsaved(&'static str),
}

impl fmt::Display for Cleaned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (gateway pid {}): ", self.sandbox, self.pid)?;
        match &self.saved {
            Saved::Written {
                log,
                refusals,
                lost,
            } => {
                write!(
                    f,
                    "{} saved to {}",
                    count(*refusals as usize, "refusal"),
                    log.display()
                )?;
                if *lost > 0 {
                    write!(
                        f,
                        ", and {lost} more that the kernel could not queue recorded as lost (events-lost)"
                    )?;
                }
                Ok(())
            }
            Saved::Unsaved(why) => write!(
                f,
                "the refusals its programs made after the gateway died could not be saved: {why}"
            ),
        }
    }
}

/// What [`clean_stale`] did: the runs cleaned up, and for each one it had to leave, why.
#[derive(Default)]
pub struct Cleanup {
    pub cleaned: Vec<Cleaned>,
    pub failed: Vec<anyhow::Error>,
    /// State directories another cleanup was handling: left to it.
    pub busy: Vec<PathBuf>,
}

/// Removes what crashed runs left behind: their sandboxes are killed, the refusals their
/// programs made since are written to their audit logs, their links unpinned and cgroups
/// removed. A run that cannot be cleaned up is left as it is, for a later cleanup, and the
/// others are still cleaned.
pub fn clean_stale() -> Result<Cleanup, anyhow::Error> {
    let mut cleanup = Cleanup::default();
    let entries = match std::fs::read_dir(RUN_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cleanup),
        Err(e) => return Err(anyhow::anyhow!("reading {RUN_DIR}: {e}")),
    };
    for entry in entries {
        let dir = entry?.path();
        // One cleanup of a run at a time: two gateways starting together would otherwise
        // both read its ring, and record its refusals twice or garbled. The lock lasts until
        // the run's state is gone; whoever does not get it leaves the run to the other.
        let Ok(dir_file) = std::fs::File::open(&dir) else {
            continue;
        };
        let _cleaning = match Flock::lock(dir_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => {
                cleanup.busy.push(dir);
                continue;
            }
            Err((_, e)) => {
                cleanup
                    .failed
                    .push(anyhow::anyhow!("locking {}: {e}", dir.display()));
                continue;
            }
        };
        let Ok(text) = std::fs::read(dir.join("state.json")) else {
            continue;
        };
        let state: RunState = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("skipping {}: unreadable state ({e})", dir.display());
                continue;
            }
        };
        if state.alive() {
            continue;
        }
        match clean_one(&dir, &state) {
            Ok(saved) => cleanup.cleaned.push(Cleaned {
                sandbox: state.sandbox,
                pid: state.pid,
                saved,
            }),
            Err(e) => cleanup.failed.push(e.context(format!(
                "sandbox {} (gateway pid {}, state in {})",
                state.sandbox,
                state.pid,
                dir.display()
            ))),
        }
    }
    Ok(cleanup)
}

fn clean_one(dir: &Path, state: &RunState) -> anyhow::Result<Saved> {
    // Kill first: the pinned links keep the sandbox locked until it is gone, and nothing
    // is refused any more once it is.
    if state.cgroup_dir.exists() {
        let cgroup = Cgroup::open(state.cgroup_dir.clone())?;
        if state.keep_cgroup {
            cgroup.kill()?;
            cgroup.release_hold()?;
        } else {
            cgroup.destroy()?;
        }
    }
    let saved = save_refusals(dir, state)?;
    kernel::remove_pin_dir(&state.pin_dir)?;
    std::fs::remove_dir_all(dir)?;
    Ok(saved)
}

/// Writes the refusals left in the run's pinned ring (and its lost count) to its audit log,
/// and unpins its links once they are in the file.
///
/// When the log cannot be written, everything is left as it is and the error says so: the
/// sandbox is dead by now, so its programs staying attached costs nothing but kernel memory,
/// while unpinning would destroy the only copy of its refusals. Which way that goes is the
/// operator's to decide, once told; a later cleanup retries.
fn save_refusals(dir: &Path, state: &RunState) -> anyhow::Result<Saved> {
    let Some(log) = &state.audit_log else {
        return Ok(Saved::Unsaved(
            "its state, from an older gateway, does not say where its audit log is",
        ));
    };
    let pinned = PinnedEvents::open(&state.pin_dir).with_context(|| {
        format!(
            "opening the event maps pinned in {}; they stay pinned: run `gateway cleanup` again, or remove that directory to drop the refusals in them",
            state.pin_dir.display()
        )
    })?;
    let Some(mut pinned) = pinned else {
        if kernel::has_links(&state.pin_dir)? {
            return Ok(Saved::Unsaved(
                "its programs were attached by a gateway that did not pin their event maps",
            ));
        }
        // It died before any program was attached: nothing was refused.
        return Ok(Saved::Written {
            log: log.clone(),
            refusals: 0,
            lost: 0,
        });
    };
    let keep = |what: &str, links_pinned: bool| {
        format!(
            "{what}; the sandbox is dead, and {} in {} with the refusals not yet saved: make {} writable (space, permissions, mount) and run `gateway cleanup` again",
            if links_pinned {
                "its programs stay pinned"
            } else {
                "its programs are detached but their event maps stay pinned"
            },
            state.pin_dir.display(),
            log.display()
        )
    };
    let audit = AuditLog::open_with(log, state.audit_max_bytes)
        .with_context(|| keep("the refusals could not be saved", true))?;
    let mark = dir.join(LOST_REPORTED);
    let mut reported = kernel::read_lost_mark(&mark)
        .with_context(|| keep("reading how much of the lost count is in the log", true))?;
    // Refusals the live reader took off the ring and could not record: lost, and said so.
    let unrecorded_file = dir.join(UNRECORDED);
    let mut unrecorded = kernel::read_lost_mark(&unrecorded_file).with_context(|| {
        keep(
            "reading how many refusals the live reader could not record",
            true,
        )
    })?;
    let (mut refusals, mut lost) = (0, 0);
    // Once with the links pinned; again after they are gone, for what a process placed in
    // a kept cgroup meanwhile was refused: nothing can add to the ring after that.
    for links_pinned in [true, false] {
        let saved = pinned.save_events(&audit, &state.sandbox);
        let total = pinned.lost_total();
        let newly_lost = match &total {
            Ok(t) if *t > reported => t - reported,
            _ => 0,
        };
        let appended = saved.and_then(|n| {
            if newly_lost + unrecorded > 0 {
                audit.append(&kernel::lost_record(
                    &state.sandbox,
                    newly_lost + unrecorded,
                ))?;
            }
            audit.sync().map(|()| n)
        });
        let n = appended.map_err(|e| {
            anyhow::Error::from(e).context(keep(
                "writing the refusals (those already taken off the kernel's ring, at most the ring's size, may be missing from the log)",
                links_pinned,
            ))
        })?;
        if unrecorded > 0 {
            // At once: whatever fails next, a retry must not report them again.
            std::fs::remove_file(&unrecorded_file).with_context(|| {
                keep(
                    "removing the count of unrecorded refusals now in the log (a retry reports them again)",
                    links_pinned,
                )
            })?;
        }
        let total = total.with_context(|| keep("reading the lost-event counter", links_pinned))?;
        refusals += n;
        lost += newly_lost + std::mem::take(&mut unrecorded);
        if newly_lost > 0 {
            kernel::write_lost_mark(&mark, total).with_context(|| {
                keep(
                    "recording that the lost count is in the log (a retry records it again)",
                    links_pinned,
                )
            })?;
            reported = total;
        }
        if links_pinned {
            kernel::unpin_links(&state.pin_dir)?;
        }
    }
    Ok(Saved::Written {
        log: log.clone(),
        refusals,
        lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_process_not_yet_reaped_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let state = RunState {
            pid,
            start_time: process_start_time(pid).unwrap(),
            sandbox: "t".into(),
            cgroup_dir: PathBuf::new(),
            pin_dir: PathBuf::new(),
            keep_cgroup: false,
            audit_log: None,
            audit_max_bytes: None,
        };
        // Exited, and left unreaped until the end of the test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !is_zombie(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!state.alive());
        child.wait().unwrap();
        let me = std::process::id();
        let running = RunState {
            pid: me,
            start_time: process_start_time(me).unwrap(),
            ..state
        };
        assert!(running.alive());
    }

    #[test]
    fn state_from_before_the_audit_log_was_recorded_still_reads() {
        let old =
            r#"{"pid": 7, "start_time": 1, "sandbox": "s", "cgroup_dir": "/c", "pin_dir": "/p"}"#;
        let state: RunState = serde_json::from_str(old).unwrap();
        assert_eq!(state.audit_log, None);
        assert_eq!(state.audit_max_bytes, None);
    }

    #[test]
    fn cleanup_says_what_became_of_the_refusals() {
        let cleaned = |saved| {
            Cleaned {
                sandbox: "agent".into(),
                pid: 42,
                saved,
            }
            .to_string()
        };
        let written = |refusals, lost| Saved::Written {
            log: "/var/log/gateway/audit.jsonl".into(),
            refusals,
            lost,
        };
        assert_eq!(
            cleaned(written(1, 0)),
            "agent (gateway pid 42): 1 refusal saved to /var/log/gateway/audit.jsonl"
        );
        assert_eq!(
            cleaned(written(12, 3)),
            "agent (gateway pid 42): 12 refusals saved to /var/log/gateway/audit.jsonl, and 3 more that the kernel could not queue recorded as lost (events-lost)"
        );
        assert!(cleaned(Saved::Unsaved("why")).ends_with("could not be saved: why"));
    }
}
