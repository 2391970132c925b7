//! SIGHUP to `gateway run`: the policy file is read again and put in force whole, in the
//! kernel maps and in the tunnel, or refused whole with the policy in force left as it was.
//!
//! Everything that can fail (judging who could have written the file and its upstream CAs,
//! reading and checking the file, reading the secrets, compiling the rules and the map
//! entries, reading the upstream CAs) happens before anything in force changes. A file the
//! sandbox's user could have written is refused: the sandbox has run since the start, and
//! what it wrote there would otherwise be put in force (`trusted_file`). Then the kernel
//! switches (the one step that can still fail, and undoes itself), then the tunnel. What the
//! running sandbox was started with cannot change: its name, the tunnel's address, its
//! environment and its Landlock scopes. A policy that would need them changed is refused
//! with "restart the sandbox".

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    audit::{AuditLog, Layer, Record, ReloadFields, Verdict},
    kernel::{Compiled, KernelError, PolicyMaps},
    policy::{self, Policy, PolicyError, SecretSource, UnixRule},
    trusted_file,
    tunnel::{CredentialError, LoadContext, Placeholders, PolicyHandle, Secrets, Snapshot},
};

/// Audit reasons of the two outcomes.
pub const RELOADED: &str = "policy-reloaded";
pub const REFUSED: &str = "policy-reload-refused";

/// What the sandbox was started with and no reload can change.
pub struct Started {
    /// The placeholders in CMD's environment.
    pub placeholders: Placeholders,
    /// The variables removed from CMD's environment: those a credential read, and (`run`)
    /// those whose names look like secrets.
    pub removed_env: BTreeSet<String>,
    /// Whether the Landlock scope that refuses outside abstract sockets was left off.
    pub abstract_unix: bool,
    /// Who runs in the sandbox (a reloaded secret file is judged against it as at start, and
    /// the policy file and its upstream CAs by whether it could have written them), and which
    /// command reads the secrets.
    pub secrets: LoadContext,
}

impl Started {
    pub fn new(policy: &Policy, placeholders: Placeholders, secrets: LoadContext) -> Self {
        Self {
            placeholders,
            removed_env: policy.secret_env_vars().map(str::to_owned).collect(),
            abstract_unix: lists_abstract_socket(policy),
            secrets,
        }
    }
}

/// Does the policy allow an abstract unix socket (so the sandbox needs to reach one)?
pub fn lists_abstract_socket(policy: &Policy) -> bool {
    policy
        .unix
        .iter()
        .any(|r| matches!(r, UnixRule::Abstract(_)))
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not read or check: the messages `policy check` prints.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    /// The new policy changes what only a restart can; one message per change.
    #[error("{}", .0.join("\n"))]
    Restart(Vec<String>),
    #[error("{0}")]
    Credential(#[from] CredentialError),
    #[error("{0}")]
    UnixPath(#[from] crate::unix_reach::Replaceable),
    /// The policy file, or an upstream CA file, may have been written by the sandbox's user.
    #[error("{0}")]
    Writable(#[from] crate::trusted_file::Writable),
    #[error("{0}")]
    Kernel(#[from] KernelError),
    /// The tunnel's rules or upstream TLS settings could not be built.
    #[error("{0:#}")]
    Tunnel(anyhow::Error),
}

impl ReloadError {
    /// One line per problem, for the log and the audit record.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Policy(e) => e.errors.iter().map(|l| l.render(&e.file)).collect(),
            Self::Restart(why) => why.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// A reload that went through.
#[derive(Debug)]
pub struct Reloaded {
    pub generation: u64,
    pub summary: String,
    pub http_rules: usize,
    pub network_rules: usize,
    /// From reading the file to both switches done.
    pub elapsed: Duration,
    /// Of `elapsed`: reading and checking the file.
    pub checked: Duration,
    /// Of `elapsed`: filling the kernel's spare buffer while the tunnel's rules compile.
    pub prepared: Duration,
    /// Emptying the kernel buffer the old policy was in, after the switch.
    pub cleared: Duration,
}

/// Holds what a reload replaces: the kernel's policy maps and the tunnel's snapshot.
pub struct Reloader {
    path: PathBuf,
    in_force: Policy,
    started: Started,
    maps: PolicyMaps,
    tunnel: PolicyHandle,
    audit: AuditLog,
}

impl Reloader {
    pub fn new(
        path: &Path,
        in_force: Policy,
        started: Started,
        maps: PolicyMaps,
        tunnel: PolicyHandle,
        audit: AuditLog,
    ) -> Self {
        Self {
            path: path.to_owned(),
            in_force,
            started,
            maps,
            tunnel,
            audit,
        }
    }

    /// Reloads, then reports the outcome on stderr and in the audit log.
    pub fn on_signal(&mut self) {
        tracing::info!("SIGHUP: reloading {}", self.path.display());
        let mut fields = ReloadFields {
            policy_file: self.path.display().to_string(),
            ..Default::default()
        };
        let mut record = match self.reload() {
            Ok(done) => {
                let elapsed_ms = millis(done.elapsed);
                tracing::info!(
                    generation = done.generation,
                    elapsed_ms,
                    check_ms = millis(done.checked),
                    prepare_ms = millis(done.prepared),
                    cleared_ms = millis(done.cleared),
                    "policy reloaded: {}",
                    done.summary
                );
                fields.generation = Some(done.generation);
                fields.summary = Some(done.summary);
                fields.http_rules = Some(done.http_rules);
                fields.network_rules = Some(done.network_rules);
                fields.elapsed_ms = Some(elapsed_ms);
                Record::new(Layer::Gateway, Verdict::Note, &self.in_force.name, RELOADED)
            }
            Err(e) => {
                tracing::error!(
                    "policy reload refused; the policy in force stays: {}",
                    self.path.display()
                );
                fields.errors = e.lines();
                for line in &fields.errors {
                    tracing::error!("{line}");
                }
                Record::new(Layer::Gateway, Verdict::Deny, &self.in_force.name, REFUSED)
            }
        };
        record.reload = Some(fields);
        if let Err(e) = self.audit.append(&record) {
            tracing::error!("{e}");
        }
    }

    /// Puts the policy file in force, or leaves the one in force and says why.
    pub fn reload(&mut self) -> Result<Reloaded, ReloadError> {
        let start = Instant::now();
        // Judged against the sandbox's user and, under serve, every other sandbox's.
        if let Some(written) = trusted_file::writable_by_any(
            trusted_file::POLICY_FILE,
            &self.path,
            &self.started.secrets,
        ) {
            return Err(written.into());
        }
        let checked = policy::check(&self.path)?;
        for w in &checked.warnings {
            tracing::warn!("{}", w.render(&self.path));
        }
        let next = checked.policy;
        let check_done = start.elapsed();
        let restart = needs_restart(&self.in_force, &next, &self.started, |var| {
            std::env::var_os(var).is_some()
        });
        if !restart.is_empty() {
            return Err(ReloadError::Restart(restart));
        }
        trusted_file::check_upstream_ca(&next, &self.started.secrets)?;
        let secrets = Secrets::reload(&next, &self.started.placeholders, &self.started.secrets)?;
        for (reader, whose) in self.started.secrets.readers() {
            crate::unix_reach::check(&next, reader, whose.user())?;
        }

        // The kernel's spare buffer fills (system calls) while another thread compiles the
        // tunnel's rules and reads the upstream CAs; nothing is in force until both are done.
        let prepare = Instant::now();
        let (filled, snapshot) = std::thread::scope(|scope| {
            let tunnel = scope.spawn(|| Snapshot::new(&next, secrets));
            let filled = Compiled::new(&next).and_then(|c| self.maps.fill_spare(&c));
            let snapshot = tunnel
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("building the tunnel's rules panicked")));
            (filled, snapshot)
        });
        filled?;
        let snapshot = match snapshot {
            Ok(s) => s,
            Err(e) => {
                self.maps.abandon_spare();
                return Err(ReloadError::Tunnel(e));
            }
        };
        let prepared = prepare.elapsed();

        // Both switches, back to back: the kernel's (one map update), then the tunnel's.
        self.maps.switch()?;
        let (generation, retired) = self.tunnel.replace(snapshot);
        let elapsed = start.elapsed();
        drop(retired);

        let clearing = Instant::now();
        if let Err(e) = self.maps.clear_retired() {
            // The programs no longer read that buffer; the next reload empties it first.
            tracing::warn!("emptying the retired policy buffer: {e}");
        }
        let done = Reloaded {
            generation,
            summary: next.summary(),
            http_rules: next.http.len(),
            network_rules: next.network.len(),
            elapsed,
            checked: check_done,
            prepared,
            cleared: clearing.elapsed(),
        };
        self.in_force = next;
        Ok(done)
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// What in `next` a running sandbox cannot take without a restart, one message each.
/// `gateway_has` tells whether a variable is in the gateway's (and so CMD's) environment.
fn needs_restart(
    current: &Policy,
    next: &Policy,
    started: &Started,
    gateway_has: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut why = Vec::new();
    if next.name != current.name {
        why.push(format!(
            "name changes from {:?} to {:?}: the sandbox's name cannot change by reload: \
             restart the sandbox",
            current.name, next.name
        ));
    }
    if next.tunnel_listen != current.tunnel_listen {
        why.push(format!(
            "[tunnel] listen changes from {} to {}: the tunnel's address cannot change by \
             reload: restart the sandbox",
            current.tunnel_listen, next.tunnel_listen
        ));
    }
    if lists_abstract_socket(next) && !started.abstract_unix {
        why.push(
            "[[unix.allow]] lists an abstract socket, and the sandbox was started without one \
             (its Landlock scope refuses outside abstract sockets): restart the sandbox"
                .into(),
        );
    }
    for (name, cred) in &next.credentials {
        if let SecretSource::Env(var) = &cred.source
            && !started.removed_env.contains(var)
            && gateway_has(var)
        {
            why.push(format!(
                "credential `{name}` reads ${var}, which the sandbox's environment still \
                 holds (it was passed on at start): restart the sandbox"
            ));
        }
    }
    why
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(extra: &str) -> Policy {
        policy::parse(
            Path::new("p.toml"),
            &format!("version = 1\nname = \"box\"\n{extra}"),
        )
        .unwrap()
    }

    fn started(p: &Policy) -> Started {
        Started::new(p, Placeholders::default(), LoadContext::for_test())
    }

    const CRED: &str = "[credentials.api]\nenv = \"API_TOKEN\"\n";

    #[test]
    fn rules_may_change_freely() {
        let current = policy(CRED);
        let next = policy(&format!(
            "{CRED}[[http.allow]]\nhost = \"b.test\"\ncredential = \"api\"\n\
             [[network.allow]]\ncidr = \"127.0.0.1/32\"\nports = [5432]\n\
             [[unix.allow]]\npath = \"/run/x.sock\"\n"
        ));
        assert!(needs_restart(&current, &next, &started(&current), |_| true).is_empty());
    }

    #[test]
    fn name_and_listen_changes_are_refused() {
        let current = policy("");
        let mut next = policy("[tunnel]\nlisten = \"127.0.0.1:8080\"\n");
        next.name = "other".into();
        let why = needs_restart(&current, &next, &started(&current), |_| true);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("\"box\" to \"other\""), "{why:?}");
        assert!(why[1].contains("127.0.0.1:0 to 127.0.0.1:8080"), "{why:?}");
        assert!(why.iter().all(|w| w.ends_with("restart the sandbox")));
    }

    #[test]
    fn an_abstract_socket_needs_a_sandbox_started_with_one() {
        let without = policy("");
        let with = policy("[[unix.allow]]\npath = \"@agent\"\n");
        assert!(lists_abstract_socket(&with), "the fixture must list one");
        let why = needs_restart(&without, &with, &started(&without), |_| true);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(needs_restart(&with, &with, &started(&with), |_| true).is_empty());
    }

    #[test]
    fn a_secret_variable_the_sandbox_still_holds_is_refused() {
        let current = policy("");
        let next = policy(CRED);
        let why = needs_restart(&current, &next, &started(&current), |v| v == "API_TOKEN");
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("$API_TOKEN"), "{why:?}");
        // Unset in the gateway: the sandbox cannot hold it (the secret read refuses instead).
        assert!(needs_restart(&current, &next, &started(&current), |_| false).is_empty());
        // Removed at start: fine.
        assert!(needs_restart(&next, &next, &started(&next), |_| true).is_empty());
    }
}
