//! The tunnel on its own, for measuring its cost per request: no sandbox, no eBPF, and every
//! loopback client is taken for a sandbox's (no identity check). Built for profilers that
//! cannot run `gateway run` (valgrind knows neither Landlock nor every bpf command); see
//! `tests/bench/tunnel-count.sh`. Never a way to serve anything: it listens where the
//! policy's `[tunnel] listen` says, which must be a loopback address.
//!
//! `tunnel_alone POLICY AUDIT_LOG`: prints the address it listens on, serves until its
//! standard input closes. Secrets come from the environment as for `gateway run`;
//! `TUNNEL_THREADS=N` sets the worker threads as `gateway run --tunnel-threads N` does.

use std::{io::Read as _, net::SocketAddr, path::Path, sync::Arc};

use anyhow::Context as _;
use gateway::{
    audit::AuditLog,
    policy,
    tunnel::{self, ClientIdentity, Doorman, LoadContext, LocalCa, SandboxReader, Secrets, Tunnel},
};

/// Gives every client to the one sandbox: the listener is on loopback and this is a
/// measuring tool.
struct Anyone;

impl ClientIdentity for Anyone {
    fn claim(&self, _peer: SocketAddr) -> Option<usize> {
        Some(0)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [policy_file, audit_file] = args.as_slice() else {
        anyhow::bail!("usage: tunnel_alone POLICY AUDIT_LOG");
    };
    let policy = policy::load(Path::new(policy_file))?;
    anyhow::ensure!(
        policy.tunnel_listen.ip().is_loopback(),
        "tunnel_alone listens on loopback only; [tunnel] listen is {}",
        policy.tunnel_listen
    );
    // No sandbox user: only secret files everyone may read are refused.
    let secrets = Secrets::load(
        &policy,
        &LoadContext {
            command: "tunnel_alone",
            sandbox: SandboxReader::Anyone,
            others: Vec::new(),
            another_user: "run it as another user",
        },
    )?;
    let ca = Arc::new(LocalCa::load_or_create(&tunnel::state_dir().join("ca"))?);
    let audit = AuditLog::open(Path::new(audit_file))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime
        .block_on(tunnel::bind(policy.tunnel_listen))
        .context("binding the tunnel")?;
    println!("{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let threads = runtime.block_on(async {
        let tunnel = Tunnel::new(
            &policy,
            secrets,
            ca,
            audit.clone(),
            &tunnel::EchoRegistry::default(),
            false,
        )?;
        let doorman = Doorman {
            identity: Box::new(Anyone),
            unclaimed: policy.name.clone(),
            audit,
        };
        let threads = std::env::var("TUNNEL_THREADS")
            .ok()
            .map(|n| n.parse().context("TUNNEL_THREADS must be a number"))
            .transpose()?;
        tunnel::spawn_workers(
            vec![tunnel],
            doorman,
            listener,
            stop_rx,
            tunnel::worker_threads(threads),
        )
    })?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let _ = stop_tx.send(true);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
