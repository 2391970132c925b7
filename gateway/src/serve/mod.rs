//! `gateway serve`: a daemon that locks down several existing sandbox cgroups, each under its
//! own policy, behind one tunnel. The kernel tells the tunnel which sandbox made each client
//! connection, and that sandbox's policy, credentials, connection limit and upstream pools
//! serve it. Whoever launches the sandboxed processes (a container runtime, systemd, a
//! script) places them in the cgroup and gives them the environment file serve writes.

pub mod config;
pub mod leave;
pub mod replaced;

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    audit::AuditLog,
    kernel::{self, Enforcer, EventReader},
    reload::{Reloader, Started},
    run::SandboxClients,
    sandbox::{
        cgroup::Cgroup,
        env,
        state::{self, RUN_DIR, RunState},
    },
    tunnel::{self, EchoRegistry, LoadContext, LocalCa, SandboxReader, Secrets, Tunnel},
};

pub use config::Config;

pub const NOT_ROOT: &str = "gateway serve needs root (CAP_BPF, CAP_SYS_ADMIN): run it with sudo";

/// Where each sandbox's environment file and CA bundle go: `<ENV_DIR>/<name>/`.
pub fn env_dir(sandbox: &str) -> PathBuf {
    Path::new(RUN_DIR).join("serve").join(sandbox)
}

/// Runs until SIGINT or SIGTERM; returns the status `gateway` exits with.
pub fn serve(config_file: &Path) -> anyhow::Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(NOT_ROOT);
    }
    nix::sys::prctl::set_dumpable(false).context("making the gateway non-dumpable")?;
    let config = config::load(config_file)?;
    // Every secret read before anything is created: a missing one, or a file the sandbox's
    // user could read, is the policy author's.
    let secrets = (0..config.sandboxes.len())
        .map(|i| Secrets::load(&config.sandboxes[i].policy, &load_context(&config, i)))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, sandbox) in config.sandboxes.iter().enumerate() {
        for (reader, whose) in load_context(&config, i).readers() {
            crate::unix_reach::check(&sandbox.policy, reader, whose.user())
                .with_context(|| format!("sandbox {}", sandbox.policy.name))?;
        }
        tunnel::check_upstream_ca(&sandbox.policy)
            .with_context(|| format!("sandbox {}", sandbox.policy.name))?;
        // Taken as they stand (nothing sandboxed has run yet); a reload will refuse them.
        crate::trusted_file::warn_at_start(
            &sandbox.policy_file,
            &sandbox.policy,
            &load_context(&config, i),
        );
    }
    let (ca, cgroup_root) = crate::run::prepare_host()?;
    for (i, sandbox) in config.sandboxes.iter().enumerate() {
        leave::check(
            &cgroup_root,
            &sandbox.cgroup,
            &load_context(&config, i).sandbox,
        )?;
    }
    let audit = AuditLog::open_with(&config.audit_log, config.audit_max_bytes)?;
    let runtime = crate::run::supervisor_runtime()?;
    let written = audit.clone();
    let status = runtime.block_on(supervise(&config, &cgroup_root, secrets, ca, audit));
    let synced = written.sync();
    let code = status?;
    synced?;
    Ok(code)
}

/// How serve reads sandbox `index`'s secrets: a secret file its `user`, or another
/// sandbox's, could read is refused, and for a sandbox without `user` one that everyone may
/// read.
fn load_context(config: &Config, index: usize) -> LoadContext {
    let reader = |entry: &config::SandboxEntry| match entry.user {
        Some(uid) => SandboxReader::user(uid, None),
        None => SandboxReader::Anyone,
    };
    LoadContext {
        command: "gateway serve",
        sandbox: reader(&config.sandboxes[index]),
        others: (config.sandboxes.iter().enumerate())
            .filter(|&(i, _)| i != index)
            .map(|(_, entry)| reader(entry))
            .collect(),
        another_user: "give the sandbox another `user`",
    }
}

/// One sandbox with its programs attached.
struct Attached {
    name: String,
    cgroup: Cgroup,
    /// Directories serve made for the cgroup, deepest last; removed at exit.
    created: Vec<PathBuf>,
    enforcer: Enforcer,
    /// Holds the state a later gateway needs to clean up after a crash.
    run_dir: PathBuf,
}

impl Attached {
    /// Unpins the programs of a sandbox already emptied and removes its state; returns the
    /// cgroup directories serve made for it, for the caller to remove once no other sandbox
    /// is inside them.
    fn teardown(self) -> (Vec<PathBuf>, anyhow::Result<()>) {
        let detached = self.enforcer.detach();
        let released = self.cgroup.release_hold();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir_all(env_dir(&self.name));
        let name = &self.name;
        let done = detached
            .map_err(anyhow::Error::from)
            .and_then(|()| released.map_err(anyhow::Error::from))
            .with_context(|| format!("sandbox {name}"));
        (self.created, done)
    }
}

/// Attaches the programs of sandbox `index` to its cgroup, after recording how to undo it.
fn attach(
    config: &Config,
    index: usize,
    cgroup_root: &Path,
    tunnel_addr: SocketAddr,
    tunnel_listener: BorrowedFd<'_>,
) -> anyhow::Result<Attached> {
    let entry = &config.sandboxes[index];
    // Absolute, for a `gateway cleanup` run anywhere; before anything is made.
    let audit_log = std::path::absolute(&config.audit_log).with_context(|| {
        format!(
            "resolving the audit log path {}",
            config.audit_log.display()
        )
    })?;
    let (cgroup, created) = Cgroup::open_or_create(cgroup_root, &entry.cgroup)?;
    let undo_created = |created: &[PathBuf]| {
        for dir in created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    };
    // A process already inside may hold sockets made before the programs were attached,
    // which the address hooks would never judge.
    match cgroup.populated() {
        Ok(false) => {}
        Ok(true) => {
            undo_created(&created);
            anyhow::bail!(
                "cgroup {} already has processes: serve locks down only empty cgroups, so nothing inside holds a socket made before the lockdown; stop them (echo 1 > {}/cgroup.kill) and start serve before placing processes there",
                cgroup.dir().display(),
                cgroup.dir().display()
            );
        }
        Err(e) => {
            undo_created(&created);
            return Err(e.into());
        }
    }
    let id = format!("{}-{index}", state::run_id());
    let run_dir = state::run_dir(&id);
    let run_state = RunState {
        pid: std::process::id(),
        start_time: state::process_start_time(std::process::id()).unwrap_or(0),
        sandbox: entry.policy.name.clone(),
        cgroup_dir: cgroup.dir().to_owned(),
        pin_dir: state::pin_dir(&id),
        keep_cgroup: created.is_empty(),
        audit_log: Some(audit_log),
        audit_max_bytes: config.audit_max_bytes,
    };
    // Saved before anything is attached, so a crash at any later point can be cleaned up.
    if let Err(e) = run_state.save(&run_dir) {
        undo_created(&created);
        return Err(e.into());
    }
    // While serve runs, the cgroup cannot be removed (and made again without programs).
    if let Err(e) = cgroup.hold() {
        let _ = std::fs::remove_dir_all(&run_dir);
        undo_created(&created);
        return Err(e.into());
    }
    let attached = Enforcer::attach(&kernel::Target {
        cgroup_dir: cgroup.dir(),
        cgroup_id: cgroup.id(),
        tunnel: tunnel_addr,
        tunnel_listener,
        tunnel_uid: entry.user,
        policy: &entry.policy,
        pin_dir: &run_state.pin_dir,
    });
    match attached {
        Ok(enforcer) => Ok(Attached {
            name: entry.policy.name.clone(),
            cgroup,
            created,
            enforcer,
            run_dir,
        }),
        Err(e) => {
            let _ = kernel::remove_pin_dir(&run_state.pin_dir);
            let _ = std::fs::remove_dir_all(&run_dir);
            let _ = cgroup.release_hold();
            undo_created(&created);
            Err(anyhow::Error::from(e).context(format!(
                "attaching the programs of sandbox {} to {}",
                entry.policy.name,
                cgroup.dir().display()
            )))
        }
    }
}

async fn supervise(
    config: &Config,
    cgroup_root: &Path,
    secrets: Vec<Secrets>,
    ca: Arc<LocalCa>,
    audit: AuditLog,
) -> anyhow::Result<i32> {
    // Before anything exists: SIGHUP's default action would end the gateway without cleanup.
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let listener = tunnel::bind(config.listen)
        .await
        .with_context(|| format!("binding the tunnel at {}", config.listen))?;
    let tunnel_addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut attached: Vec<Attached> = Vec::with_capacity(config.sandboxes.len());
    let mut readers = Vec::new();
    let mut tunnel_threads = Vec::new();
    let outcome: anyhow::Result<i32> = async {
        for index in 0..config.sandboxes.len() {
            attached.push(attach(
                config,
                index,
                cgroup_root,
                tunnel_addr,
                listener.as_fd(),
            )?);
        }
        let mut tunnels = Vec::with_capacity(attached.len());
        let mut clients = Vec::with_capacity(attached.len());
        let mut reloaders = Vec::with_capacity(attached.len());
        // One for every sandbox: an upstream two sandboxes reach may hand one's secret to
        // the other's request.
        let echoes = EchoRegistry::default();
        for ((index, sandbox), secrets) in attached.iter_mut().enumerate().zip(secrets) {
            let entry = &config.sandboxes[index];
            let policy = &entry.policy;
            let reader: EventReader = sandbox.enforcer.events()?;
            readers.push(tokio::spawn(reader.run(
                audit.clone(),
                policy.name.clone(),
                stop_rx.clone(),
                sandbox.run_dir.clone(),
            )));
            clients.push((sandbox.enforcer.tunnel_clients()?, sandbox.cgroup.id()));
            let mut vars = env::variables(
                tunnel_addr,
                &write_bundle(&sandbox.name, ca.pem()).context("writing the CA bundle")?,
            );
            vars.extend(secrets.placeholder_env());
            let env_file = env_dir(&sandbox.name).join("env");
            env::write_env_file(&env_file, &vars)
                .with_context(|| format!("writing {}", env_file.display()))?;
            let started = Started::new(policy, secrets.placeholders(), load_context(config, index));
            let proxy = Tunnel::new(policy, secrets, ca.clone(), audit.clone(), &echoes, false)
                .with_context(|| format!("starting the tunnel for sandbox {}", policy.name))?;
            reloaders.push(Reloader::new(
                &entry.policy_file,
                policy.clone(),
                started,
                sandbox
                    .enforcer
                    .policy_maps()
                    .context("the kernel policy maps were already taken")?,
                proxy.policy_handle(),
                audit.clone(),
            ));
            tunnels.push(proxy);
            if entry.user.is_none() {
                tracing::warn!(
                    sandbox = %policy.name,
                    "no `user` in its [[sandbox]]: any user's processes in the cgroup may use the tunnel, and processes of one user can take each other's tunnel connections, across sandboxes too; give each sandbox a user of its own"
                );
            }
            tracing::info!(
                sandbox = %policy.name,
                cgroup = %sandbox.cgroup.dir().display(),
                policy = %entry.policy_file.display(),
                env_file = %env_file.display(),
                "sandbox locked down"
            );
        }
        let doorman = tunnel::Doorman {
            identity: Box::new(SandboxClients(clients)),
            unclaimed: config.name.clone(),
            audit: audit.clone(),
        };
        tunnel_threads = tunnel::spawn_workers(
            tunnels,
            doorman,
            listener,
            stop_rx.clone(),
            tunnel::worker_threads(config.threads),
        )
        .context("starting the tunnel's threads")?;
        tracing::info!(
            tunnel = %tunnel_addr,
            sandboxes = attached.len(),
            audit_log = %audit.path().display(),
            "serving; SIGHUP reloads every sandbox's policy, SIGINT or SIGTERM stops (killing every sandbox)"
        );
        // A recursive delete takes the hold with the cgroup: looked at every second.
        let mut every_second = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = every_second.tick() => {
                    for sandbox in &attached {
                        replaced::check(&sandbox.name, &sandbox.cgroup, &audit);
                    }
                }
                _ = sighup.recv() => {
                    // Each policy is reloaded or refused on its own; one sandbox's broken
                    // file leaves the others' reloads in force.
                    tokio::task::block_in_place(|| {
                        for r in &mut reloaders {
                            r.on_signal();
                        }
                    });
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
        }
        tracing::info!("stopping: killing every sandbox, then detaching");
        Ok(0)
    }
    .await;

    // Kill first: the tunnel stops only once nothing inside can still use it.
    let mut failures = Vec::new();
    let mut emptied = Vec::with_capacity(attached.len());
    for sandbox in &attached {
        let killed = sandbox.cgroup.kill();
        emptied.push(killed.is_ok());
        if let Err(e) = killed {
            failures.push(anyhow::Error::from(e).context(format!(
                "sandbox {}: it could not be emptied; its programs stay attached (no egress): run `gateway cleanup` once it is",
                sandbox.name
            )));
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for t in tunnel_threads {
            let _ = t.join();
        }
    })
    .await;
    let mut drained = Vec::with_capacity(readers.len());
    for task in readers {
        drained.push(match task.await {
            Ok(read) => read.map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::Error::from(e).context("kernel event reader")),
        });
    }
    // Everything the readers queued is in the file, or the log has failed: then every
    // sandbox's ring may hold refusals that exist nowhere else.
    let logged = audit.sync();
    let mut created = Vec::new();
    // A sandbox whose reader was never started (startup failed on the way) has nothing
    // unread to save.
    let mut drained = drained.into_iter();
    for (sandbox, emptied) in attached.into_iter().zip(emptied) {
        let drained = drained.next().unwrap_or(Ok(()));
        if !emptied {
            // Detaching would let out what survived; the pins and the state stay for cleanup.
            continue;
        }
        if let Some(e) = drained
            .err()
            .or_else(|| logged.as_ref().err().map(|e| anyhow::anyhow!("{e}")))
        {
            // Detaching would destroy them; the sandbox is dead, so its programs staying
            // attached costs nothing. `gateway cleanup` saves them.
            failures.push(e.context(format!(
                "sandbox {}: it is dead, and its programs stay pinned in {} with the refusals not yet in the log: {}",
                sandbox.name,
                sandbox.enforcer.pin_dir().display(),
                crate::run::remedy(&audit)
            )));
            // For launching into a sandbox this serve no longer serves.
            let _ = std::fs::remove_dir_all(env_dir(&sandbox.name));
            continue;
        }
        let (made, done) = sandbox.teardown();
        created.extend(made);
        if let Err(e) = done {
            failures.push(e);
        }
    }
    // Deepest first: a parent serve made for two sandboxes goes after both.
    for dir in created.iter().rev() {
        if let Err(e) = std::fs::remove_dir(dir) {
            failures
                .push(anyhow::Error::from(e).context(format!("removing cgroup {}", dir.display())));
        }
    }
    let status = match outcome {
        Ok(status) => status,
        Err(e) => {
            // What teardown found must not be lost behind the first error.
            for f in &failures {
                tracing::error!("{f:#}");
            }
            return Err(e);
        }
    };
    let mut failures = failures.into_iter();
    let Some(first) = failures.next() else {
        return Ok(status);
    };
    // One is returned; the others must not be lost.
    for e in failures {
        tracing::error!("{e:#}");
    }
    Err(first)
}

fn write_bundle(sandbox: &str, ca_pem: &str) -> std::io::Result<PathBuf> {
    let dir = env_dir(sandbox);
    std::fs::create_dir_all(&dir)?;
    env::write_ca_bundle(&dir, ca_pem)
}
