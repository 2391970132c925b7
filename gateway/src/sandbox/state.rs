//! What a run leaves on the host, recorded so a later run or `gateway cleanup` can remove it
//! after a crash.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{SandboxError, cgroup::Cgroup, host::BPFFS};

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
}

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

/// Removes what crashed runs left behind: their sandboxes are killed, links unpinned and
/// cgroups removed. Returns the sandboxes cleaned.
pub fn clean_stale() -> Result<Vec<String>, anyhow::Error> {
    let mut cleaned = Vec::new();
    let entries = match std::fs::read_dir(RUN_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cleaned),
        Err(e) => return Err(anyhow::anyhow!("reading {RUN_DIR}: {e}")),
    };
    for entry in entries {
        let dir = entry?.path();
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
        // Kill first: the pinned links keep the sandbox locked until it is gone.
        if state.cgroup_dir.exists() {
            let cgroup = Cgroup::open(state.cgroup_dir.clone())?;
            if state.keep_cgroup {
                cgroup.kill()?;
            } else {
                cgroup.destroy()?;
            }
        }
        crate::kernel::remove_pin_dir(&state.pin_dir)?;
        std::fs::remove_dir_all(&dir)?;
        cleaned.push(format!("{} (gateway pid {})", state.sandbox, state.pid));
    }
    Ok(cleaned)
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
}
