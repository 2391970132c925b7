//! The sandbox cgroup: created root-owned so the sandbox cannot write it, killed whole.

use std::{
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::SandboxError;

/// Parent of every sandbox cgroup, under the cgroup v2 root.
pub const PARENT: &str = "gateway";

/// An empty child `gateway serve` keeps in each sandbox cgroup while it runs: the kernel
/// refuses to remove a cgroup that has children, and a cgroup removed and made again under
/// the same name would have none of the sandbox's programs.
pub const HOLD: &str = "gateway-hold";

pub struct Cgroup {
    dir: PathBuf,
    id: u64,
}

impl Cgroup {
    /// Creates `<root>/gateway/<name>`, mode 0755 and owned by root.
    pub fn create(root: &Path, name: &str) -> Result<Self, SandboxError> {
        let parent = root.join(PARENT);
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o755);
        if !parent.is_dir() {
            builder
                .create(&parent)
                .or_else(|e| if parent.is_dir() { Ok(()) } else { Err(e) })
                .map_err(SandboxError::io("creating cgroup", &parent))?;
        }
        let dir = parent.join(name);
        builder
            .create(&dir)
            .map_err(SandboxError::io("creating cgroup", &dir))?;
        Self::open(dir)
    }

    /// Opens `<root>/<path>` for `gateway serve`, creating it and any missing parent (mode
    /// 0755, owned by root). Returns the directories it created, deepest last.
    pub fn open_or_create(root: &Path, path: &Path) -> Result<(Self, Vec<PathBuf>), SandboxError> {
        let mut created = Vec::new();
        let mut dir = root.to_owned();
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o755);
        for part in path.iter() {
            dir.push(part);
            match builder.create(&dir) {
                Ok(()) => created.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => {
                    // Whatever this call made is undone; the caller never saw it.
                    for made in created.iter().rev() {
                        let _ = std::fs::remove_dir(made);
                    }
                    return Err(SandboxError::io("creating cgroup", &dir)(e));
                }
            }
        }
        Ok((Self::open(dir)?, created))
    }

    pub fn open(dir: PathBuf) -> Result<Self, SandboxError> {
        let meta = std::fs::metadata(&dir).map_err(SandboxError::io("reading cgroup", &dir))?;
        // On cgroup v2 the directory's inode number is the id bpf_get_current_cgroup_id sees.
        Ok(Self {
            id: meta.ino(),
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Kills every process in the cgroup and waits until it is empty.
    pub fn kill(&self) -> Result<(), SandboxError> {
        let kill = self.dir.join("cgroup.kill");
        std::fs::write(&kill, "1").map_err(SandboxError::io("writing", &kill))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.populated()? {
            if Instant::now() > deadline {
                return Err(SandboxError::Prerequisite(format!(
                    "processes in {} survived cgroup.kill for 10 s",
                    self.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Whether any process is in the cgroup or below it.
    pub fn populated(&self) -> Result<bool, SandboxError> {
        let events = self.dir.join("cgroup.events");
        let text =
            std::fs::read_to_string(&events).map_err(SandboxError::io("reading", &events))?;
        Ok(text.lines().any(|l| l == "populated 1"))
    }

    /// Makes the [`HOLD`] child, or keeps the one a crashed gateway left.
    pub fn hold(&self) -> Result<(), SandboxError> {
        let hold = self.dir.join(HOLD);
        match std::fs::DirBuilder::new().mode(0o755).create(&hold) {
            Err(e) if !(e.kind() == std::io::ErrorKind::AlreadyExists && hold.is_dir()) => {
                Err(SandboxError::io("creating cgroup", &hold)(e))
            }
            _ => Ok(()),
        }
    }

    /// Removes the [`HOLD`] child, if there is one; the cgroup must be empty.
    pub fn release_hold(&self) -> Result<(), SandboxError> {
        let hold = self.dir.join(HOLD);
        match std::fs::remove_dir(&hold) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(SandboxError::io("removing cgroup", &hold)(e))
            }
            _ => Ok(()),
        }
    }

    /// Kills what is left and removes the directory.
    pub fn destroy(self) -> Result<(), SandboxError> {
        if !self.dir.exists() {
            return Ok(());
        }
        self.kill()?;
        self.release_hold()?;
        std::fs::remove_dir(&self.dir).map_err(SandboxError::io("removing cgroup", &self.dir))
    }
}
