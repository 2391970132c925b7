//! `gateway run`: cgroup, programs, tunnel, then CMD; everything undone when CMD ends.

use std::{
    os::{fd::AsFd as _, unix::process::ExitStatusExt as _},
    path::PathBuf,
    process::ExitStatus,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    signal::unix::{Signal as SignalStream, SignalKind, signal},
    sync::watch,
};

use crate::{
    audit::{self, AuditLog},
    kernel::{self, Enforcer, TunnelClients},
    policy::{self, Policy},
    reload::{self, Reloader, Started},
    sandbox::{
        cgroup::Cgroup,
        confine::Confinement,
        env, host,
        launch::Launch,
        notify,
        state::{self, RunState},
        stdio,
        user::{self, SandboxUser},
    },
    tunnel::{self, LoadContext, LocalCa, SandboxReader, Secrets, Tunnel},
};

pub struct RunArgs {
    pub policy: PathBuf,
    pub audit_log: Option<PathBuf>,
    pub audit_max_bytes: Option<u64>,
    pub user: Option<String>,
    pub command: Vec<String>,
    /// Learn mode: the tunnel lets through what no rule allows, recorded `would-deny`.
    pub learn: bool,
    /// The tunnel's worker threads; the default when `None`.
    pub tunnel_threads: Option<usize>,
    /// Variables CMD inherits although their names look like secrets (`--keep-env`).
    pub keep_env: Vec<String>,
}

pub const NOT_ROOT: &str = "gateway run needs root (CAP_BPF, CAP_SYS_ADMIN): run it with sudo";

/// Runs CMD in a new sandbox and returns the status `gateway` exits with.
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(NOT_ROOT);
    }
    // Before anything is made: a network socket as CMD's stdio is a way out no hook sees.
    stdio::check()?;
    // The gateway holds the credentials and the sandbox's kernel objects: no core dumps, and
    // no ptrace by same-uid processes.
    nix::sys::prctl::set_dumpable(false).context("making the gateway non-dumpable")?;
    let policy = policy::load(&args.policy)?;
    if args.learn {
        tracing::warn!(
            policy = %args.policy.display(),
            "LEARN MODE: the tunnel forwards HTTP requests this policy refuses (without any credential) and records each as `would-deny`; the kernel still refuses everything else. Never use it for real work; turn the log into a policy with `gateway policy suggest`"
        );
    }
    let user = user::resolve(args.user.as_deref())?;
    // Secrets first: a missing one, or a file CMD's user could read, is the policy author's
    // to fix before anything is created.
    let load = LoadContext {
        command: "gateway run",
        sandbox: SandboxReader::user(user.uid.as_raw(), Some(user.gid.as_raw())),
        others: Vec::new(),
        another_user: "run CMD as another user (--user)",
    };
    let secrets = Secrets::load(&policy, &load)?;
    crate::unix_reach::check(&policy, &load.sandbox, crate::unix_reach::THE_SANDBOX_USER)?;
    crate::tunnel::check_upstream_ca(&policy)?;
    // Taken as they stand (nothing sandboxed has run yet); a reload will refuse them.
    crate::trusted_file::warn_at_start(&args.policy, &policy, &load);
    let removal = env::removal(
        std::env::vars_os().map(|(name, _)| name),
        &policy,
        &args.keep_env,
    )?;
    if !removal.by_name.is_empty() {
        tracing::warn!(
            "not passed to CMD, their names look like secrets (values not shown): {}; to pass one on, name it with --keep-env NAME",
            removal.by_name.join(", ")
        );
    }
    let (ca, cgroup_root) = prepare_host()?;
    let audit_path = args
        .audit_log
        .clone()
        .unwrap_or_else(|| audit::DEFAULT_LOG.into());
    let audit = AuditLog::open_with(&audit_path, args.audit_max_bytes)?;
    // Absolute: `gateway cleanup` may run anywhere.
    let audit_log = std::path::absolute(&audit_path)
        .with_context(|| format!("resolving the audit log path {}", audit_path.display()))?;

    let id = state::run_id();
    let run_dir = state::run_dir(&id);
    let run_state = RunState {
        pid: std::process::id(),
        start_time: state::process_start_time(std::process::id()).unwrap_or(0),
        sandbox: policy.name.clone(),
        cgroup_dir: cgroup_root.join(crate::sandbox::cgroup::PARENT).join(&id),
        pin_dir: state::pin_dir(&id),
        keep_cgroup: false,
        audit_log: Some(audit_log),
        audit_max_bytes: args.audit_max_bytes,
    };
    // Saved before anything exists, so a crash at any later point can be cleaned up.
    run_state.save(&run_dir)?;

    let runtime = supervisor_runtime()?;
    let written = audit.clone();
    let status = runtime.block_on(supervise(
        Sandbox {
            policy: &policy,
            policy_file: &args.policy,
            user: &user,
            command: &args.command,
            run_state: &run_state,
            run_dir: &run_dir,
            learn: args.learn,
            tunnel_threads: tunnel::worker_threads(args.tunnel_threads),
            load,
            removal,
        },
        audit,
        secrets,
        ca,
    ));
    // Nothing is lost on exit: every queued record is in the file before `run` returns.
    let synced = written.sync();
    let code = status?;
    synced?;
    Ok(code)
}

/// What `run` and `serve` need of the host before they create anything: the gateway CA, the
/// kernel's BTF, the cgroup v2 root and bpffs. What crashed gateways left behind is removed
/// first, so their sandboxes (still without egress) are killed and their programs unpinned.
pub(crate) fn prepare_host() -> anyhow::Result<(Arc<LocalCa>, PathBuf)> {
    let ca = Arc::new(
        LocalCa::load_or_create(&tunnel::state_dir().join("ca"))
            .context("loading the gateway CA")?,
    );
    host::check_btf()?;
    host::raise_open_files();
    let cgroup_root = host::cgroup2_root()?;
    host::ensure_bpffs()?;
    let stale = state::clean_stale().context("removing what a crashed gateway left behind")?;
    for gone in &stale.cleaned {
        tracing::warn!("cleaned up after a crashed gateway: {gone}");
    }
    if !stale.failed.is_empty() {
        // What a crashed gateway left (its refusals among it) is dealt with before a new
        // one starts; each error says what to do.
        let each: Vec<String> = stale.failed.iter().map(|e| format!("{e:#}")).collect();
        anyhow::bail!("cleaning up after a crashed gateway: {}", each.join("\n"));
    }
    Ok((ca, cgroup_root))
}

/// The supervisor's runtime: signals, kernel events, the sandbox's lifetime. The tunnel has
/// threads of its own.
pub(crate) fn supervisor_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// What one `run` sets up, borrowed for the life of the sandbox.
struct Sandbox<'a> {
    policy: &'a Policy,
    /// Read again on SIGHUP.
    policy_file: &'a std::path::Path,
    user: &'a SandboxUser,
    command: &'a [String],
    run_state: &'a RunState,
    run_dir: &'a std::path::Path,
    learn: bool,
    tunnel_threads: usize,
    /// How the secrets were read, to read them the same way on reload.
    load: LoadContext,
    /// What CMD does not inherit of the gateway's environment.
    removal: env::Removal,
}

/// The kernel's record of tunnel clients of each sandbox the tunnel serves (`run` has one,
/// `serve` several): the index of the sandbox whose map holds the client, narrowed to its
/// cgroup. Each sandbox's programs write only its own map.
pub(crate) struct SandboxClients(pub(crate) Vec<(TunnelClients, u64)>);

impl tunnel::ClientIdentity for SandboxClients {
    fn claim(&self, peer: std::net::SocketAddr) -> Option<usize> {
        self.0
            .iter()
            .position(|(clients, cgroup_id)| clients.claim(peer) == Some(*cgroup_id))
    }
}

async fn supervise(
    sandbox: Sandbox<'_>,
    audit: AuditLog,
    secrets: Secrets,
    ca: Arc<LocalCa>,
) -> anyhow::Result<i32> {
    let Sandbox {
        policy,
        policy_file,
        user,
        command,
        run_state,
        run_dir,
        learn,
        tunnel_threads: threads,
        load,
        removal,
    } = sandbox;
    // Before anything exists: SIGHUP's default action would end the gateway without cleanup.
    let mut sighup = signal(SignalKind::hangup())?;
    let listener = match tunnel::bind(policy.tunnel_listen).await {
        Ok(l) => l,
        Err(e) => {
            // Nothing was made yet: no state for the next run to take for a crash.
            let _ = std::fs::remove_dir_all(run_dir);
            return Err(anyhow::Error::from(e)
                .context(format!("binding the tunnel at {}", policy.tunnel_listen)));
        }
    };
    let tunnel_addr = listener.local_addr()?;
    let cgroup_name = run_state
        .cgroup_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("cgroup path has no name")?;
    let root = run_state
        .cgroup_dir
        .parent()
        .and_then(|p| p.parent())
        .context("cgroup path has no root")?;
    let cgroup = Cgroup::create(root, cgroup_name)?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let attached = Enforcer::attach(&kernel::Target {
        cgroup_dir: cgroup.dir(),
        cgroup_id: cgroup.id(),
        tunnel: tunnel_addr,
        tunnel_listener: listener.as_fd(),
        // One command, launched by the gateway as one user, with no way to another's.
        tunnel_uid: None,
        policy,
        pin_dir: &run_state.pin_dir,
    });
    let mut enforcer = match attached {
        Ok(e) => e,
        Err(e) => {
            let _ = cgroup.destroy();
            let _ = kernel::remove_pin_dir(&run_state.pin_dir);
            let _ = std::fs::remove_dir_all(run_dir);
            return Err(e.into());
        }
    };
    // From here on every error still goes through the teardown below.
    let mut events = None;
    let mut tunnel_threads = Vec::new();
    // Refusals the seccomp notifier could not record (the log having failed).
    let mut seccomp_unrecorded = 0;
    let outcome: anyhow::Result<i32> = async {
        let reader = enforcer.events()?;
        let clients = SandboxClients(vec![(enforcer.tunnel_clients()?, cgroup.id())]);
        events = Some(tokio::spawn(reader.run(
            audit.clone(),
            policy.name.clone(),
            stop_rx.clone(),
            run_dir.to_owned(),
        )));
        let placeholders = secrets.placeholder_env();
        let mut started = Started::new(policy, secrets.placeholders(), load);
        // A later credential may read one of these: the sandbox does not hold it.
        started.removed_env.extend(removal.by_name.iter().cloned());
        let echoes = tunnel::EchoRegistry::default();
        let proxy = Tunnel::new(policy, secrets, ca.clone(), audit.clone(), &echoes, learn)
            .context("starting the tunnel")?;
        let mut reloader = Reloader::new(
            policy_file,
            policy.clone(),
            started,
            enforcer
                .policy_maps()
                .context("the kernel policy maps were already taken")?,
            proxy.policy_handle(),
            audit.clone(),
        );
        let doorman = tunnel::Doorman {
            identity: Box::new(clients),
            unclaimed: policy.name.clone(),
            audit: audit.clone(),
        };
        tunnel_threads = tunnel::spawn_workers(vec![proxy], doorman, listener, stop_rx, threads)
            .context("starting the tunnel's threads")?;
        tracing::info!(
            sandbox = %policy.name,
            tunnel = %tunnel_addr,
            cgroup = %cgroup.dir().display(),
            audit_log = %audit.path().display(),
            learn,
            "sandbox ready"
        );
        let bundle = env::write_ca_bundle(run_dir, ca.pem()).context("writing the CA bundle")?;
        let mut env = env::variables(tunnel_addr, &bundle);
        env.extend(placeholders);
        launch_and_wait(
            policy,
            Signals {
                sighup: &mut sighup,
                reloader: &mut reloader,
            },
            user,
            command,
            &cgroup,
            (env, removal.remove),
            (&audit, &mut seccomp_unrecorded),
        )
        .await
    }
    .await;

    // Teardown runs whatever happened above: kill, stop, drain, detach, remove.
    let killed = cgroup.kill();
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for t in tunnel_threads {
            let _ = t.join();
        }
    })
    .await;
    let drained: anyhow::Result<()> = match events {
        Some(task) => match task.await {
            Ok(read) => read.map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::Error::from(e).context("kernel event reader")),
        },
        None => Ok(()),
    };
    if let Err(e) = killed {
        // Something survived cgroup.kill: detaching now would let it out. The programs stay
        // pinned and the run's state stays for `gateway cleanup`.
        return Err(anyhow::Error::from(e).context(
            "the sandbox could not be emptied; its programs stay attached (no egress): run `gateway cleanup` once it is",
        ));
    }
    // Everything the reader queued is in the file, or the log has failed.
    let drained = drained.and_then(|()| audit.sync().map_err(anyhow::Error::from));
    if seccomp_unrecorded > 0 {
        // For `gateway cleanup`, with the event reader's.
        if let Err(e) = kernel::add_unrecorded(run_dir, seccomp_unrecorded) {
            tracing::error!(
                "cannot keep the count of {seccomp_unrecorded} unrecorded seccomp refusals: {e}"
            );
        }
    }
    if let Err(e) = drained {
        // The refusals still in the kernel's ring (and its lost count) exist nowhere else:
        // detaching would destroy them. The sandbox is dead, so its programs staying
        // attached costs nothing; `gateway cleanup` saves them once the log can be written.
        match &outcome {
            Ok(status) => tracing::warn!("the sandboxed command exited with status {status}"),
            Err(e) => tracing::error!("{e:#}"),
        }
        return Err(e.context(format!(
            "the sandbox is dead, and its programs stay pinned in {} with the refusals not yet in the log: {}",
            run_state.pin_dir.display(),
            remedy(&audit)
        )));
    }
    let detached = enforcer.detach();
    let removed = cgroup.destroy();
    let _ = std::fs::remove_dir_all(run_dir);
    let status = outcome?;
    detached?;
    removed?;
    Ok(status)
}

/// What to do about refusals left pinned because they could not be recorded.
pub(crate) fn remedy(audit: &AuditLog) -> String {
    if audit.has_failed() {
        format!(
            "make {} writable (space, permissions, mount) and run `gateway cleanup`",
            audit.path().display()
        )
    } else {
        "run `gateway cleanup` to record them".into()
    }
}

/// SIGHUP and what it does while CMD runs.
struct Signals<'a> {
    sighup: &'a mut SignalStream,
    reloader: &'a mut Reloader,
}

/// Starts CMD and waits for it. `(env, remove)`: the variables set for CMD, and those of the
/// gateway's environment it does not inherit; `(audit, unrecorded)`: the log, and the count
/// the seccomp notifier's refusals that did not reach it are added to.
async fn launch_and_wait(
    policy: &Policy,
    signals: Signals<'_>,
    user: &SandboxUser,
    command: &[String],
    cgroup: &Cgroup,
    (env, remove): (Vec<(String, String)>, Vec<std::ffi::OsString>),
    (audit, unrecorded): (&AuditLog, &mut u64),
) -> anyhow::Result<i32> {
    // Handlers first: a signal that arrives once CMD runs must be forwarded, not kill us.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let Signals { sighup, reloader } = signals;
    let confinement = Confinement::prepare(reload::lists_abstract_socket(policy))?;
    let (program, args) = command.split_first().context("no command given after --")?;
    let procs = cgroup.procs();
    let mut child = Launch {
        program,
        args,
        user,
        cgroup_procs: &procs,
        env,
        remove,
        confine: confinement.child_side(),
    }
    .spawn()?;
    let listener = confinement.receive_listener()?;
    let stop = Arc::new(AtomicBool::new(false));
    let _notifier = NotifierThread {
        thread: Some({
            let (audit, sandbox, stop) = (audit.clone(), policy.name.clone(), stop.clone());
            std::thread::spawn(move || notify::serve(listener, audit, sandbox, stop))
        }),
        stop,
        unrecorded,
    };
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut forwarded = false;
    let status: ExitStatus = loop {
        let signal = tokio::select! {
            status = child.wait() => break status?,
            _ = sighup.recv() => {
                // Up to a second for a very large policy: the supervisor waits, the tunnel
                // and the kernel event reader do not.
                tokio::task::block_in_place(|| reloader.on_signal());
                continue;
            }
            _ = sigint.recv() => Signal::SIGINT,
            _ = sigterm.recv() => Signal::SIGTERM,
        };
        if forwarded {
            // A second signal: the command had its chance to exit cleanly.
            tracing::warn!("{signal} again: killing the sandbox");
            cgroup.kill()?;
            continue;
        }
        if let Some(pid) = pid {
            tracing::info!("forwarding {signal} to the sandboxed command (again to kill it)");
            let _ = nix::sys::signal::kill(pid, signal);
        }
        forwarded = true;
    };
    Ok(exit_code(status))
}

/// The seccomp notifier's thread, stopped and joined however CMD's wait ends; the refusals
/// it could not record are added to `unrecorded`.
struct NotifierThread<'a> {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
    unrecorded: &'a mut u64,
}

impl Drop for NotifierThread<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            *self.unrecorded += thread.join().unwrap_or(0);
        }
    }
}

/// CMD's status as `gateway` passes it on: its code, or 128+N when signal N killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
