//! The sandbox's place on the host: its cgroup, bpffs pins, run state, user and launch.

pub mod cgroup;
pub mod confine;
pub mod env;
pub mod host;
pub mod launch;
pub mod notify;
pub mod state;
pub mod stdio;
pub mod user;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A host prerequisite is missing; the message says what to install or enable.
    #[error("{0}")]
    Prerequisite(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `--user` names nobody the sandbox may run as.
    #[error("{0}")]
    User(String),
}

impl SandboxError {
    pub fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }
}
