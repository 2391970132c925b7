//! Everything the tunnel takes from a policy, as one value a reload replaces whole.
//!
//! A request loads the snapshot in force once (one atomic load) and decides, attaches its
//! credential and picks its upstream pool from that one snapshot. A reload stores a new one;
//! whatever already holds the old one (a request in flight, its streaming body, a spliced or
//! WebSocket pipe) carries on with it, and the next request gets the new one. What answers
//! are scanned for is not the snapshot's: every snapshot's secrets go to the gateway's
//! [`EchoRegistry`] before it is put in force, and stay there after it is replaced.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{
    credentials::Secrets, echo_registry::EchoRegistry, pool::Pool, rules::Rules, upstream,
};
use crate::policy::Policy;

pub struct Snapshot {
    /// Counts reloads; a worker rebuilds its upstream pools when it sees a new one.
    pub(super) generation: u64,
    pub(super) rules: Rules,
    pub(super) secrets: Secrets,
    /// Largest request body forwarded, in bytes.
    pub(super) max_request_body: Option<u64>,
    /// Upstream TLS settings: system roots plus `[tls] upstream_ca`, read once per policy.
    pub(super) upstream_tls: rustls::ClientConfig,
}

impl Snapshot {
    /// Compiles `policy` for the tunnel. Reads the upstream CA files; touches nothing in force.
    pub fn new(policy: &Policy, secrets: Secrets) -> anyhow::Result<Self> {
        Ok(Self {
            generation: 0,
            rules: Rules::new(&policy.http)?,
            secrets,
            max_request_body: policy.max_request_body,
            upstream_tls: upstream::client_tls(&policy.upstream_ca)?,
        })
    }
}

/// The snapshot in force, shared by every worker and by whoever reloads. Cheap to clone.
#[derive(Clone)]
pub struct PolicyHandle {
    in_force: Arc<ArcSwap<Snapshot>>,
    /// Where each snapshot's secrets are registered before it is put in force, so that no
    /// answer to a request sent with a secret is relayed unread for it.
    echoes: EchoRegistry,
}

impl PolicyHandle {
    pub(super) fn new(snapshot: Snapshot, echoes: EchoRegistry) -> Self {
        echoes.register(&snapshot.secrets.all_echoes());
        Self {
            in_force: Arc::new(ArcSwap::from_pointee(snapshot)),
            echoes,
        }
    }

    /// The snapshot in force, kept for as long as the caller holds it.
    pub fn current(&self) -> Arc<Snapshot> {
        self.in_force.load_full()
    }

    /// Puts `next` in force for every request that starts from now on; returns its
    /// generation and the snapshot it replaced (to be dropped when the caller likes: a large
    /// one takes a while). Reloads come one at a time (the supervisor's SIGHUP loop), so
    /// reading the generation and swapping need no lock between them.
    pub fn replace(&self, mut next: Snapshot) -> (u64, Arc<Snapshot>) {
        self.echoes.register(&next.secrets.all_echoes());
        next.generation = self.in_force.load().generation + 1;
        let generation = next.generation;
        (generation, self.in_force.swap(Arc::new(next)))
    }
}

/// One worker's upstream pools and the snapshot generation they were made for.
pub(super) struct Pools {
    generation: u64,
    upstreams: upstream::Upstreams,
}

impl Pools {
    pub(super) fn new(snapshot: &Snapshot, budget: &upstream::Budget) -> Self {
        Self {
            generation: snapshot.generation,
            upstreams: upstream::Upstreams::new(&snapshot.rules, &snapshot.upstream_tls, budget),
        }
    }
}

/// A worker's pools, replaced the first time the worker serves a request of a newer
/// snapshot. Pooled connections of the old pools close once nothing in flight uses them.
/// Every generation draws on the sandbox's one budget.
pub(super) struct WorkerPools(ArcSwap<Pools>, upstream::Budget);

impl WorkerPools {
    pub(super) fn new(snapshot: &Snapshot, budget: &upstream::Budget) -> Self {
        Self(
            ArcSwap::from_pointee(Pools::new(snapshot, budget)),
            budget.clone(),
        )
    }

    /// The pool of rule `rule` of `snapshot`; with `None`, learn mode's pool.
    pub(super) fn pool(&self, snapshot: &Snapshot, rule: Option<usize>) -> Arc<Pool> {
        let pick = |u: &upstream::Upstreams| match rule {
            Some(rule) => u.pool(rule),
            None => u.learn(),
        };
        let pools = self.0.load();
        if pools.generation == snapshot.generation {
            return pick(&pools.upstreams);
        }
        let fresh = Arc::new(Pools::new(snapshot, &self.1));
        let pool = pick(&fresh.upstreams);
        // A request of an older snapshot gets pools of its own rather than setting the
        // worker back.
        if snapshot.generation > pools.generation {
            self.0.store(fresh);
        }
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HttpRule;

    fn policy(hosts: &[&str]) -> Policy {
        Policy {
            name: "t".into(),
            tunnel_listen: crate::policy::DEFAULT_LISTEN.parse().unwrap(),
            max_request_body: None,
            network: Vec::new(),
            unix: Vec::new(),
            http: hosts
                .iter()
                .map(|h| HttpRule::for_test(h, &[], &[]))
                .collect(),
            credentials: Default::default(),
            upstream_ca: Vec::new(),
        }
    }

    fn snapshot(hosts: &[&str]) -> Snapshot {
        let p = policy(hosts);
        Snapshot::new(
            &p,
            Secrets::load(&p, &crate::tunnel::LoadContext::for_test()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_held_snapshot_survives_a_replace_and_the_next_load_sees_the_new_one() {
        let handle = PolicyHandle::new(snapshot(&["a.test"]), EchoRegistry::default());
        let held = handle.current();
        let (generation, old) = handle.replace(snapshot(&["a.test", "b.test"]));
        assert_eq!(generation, 1);
        assert!(Arc::ptr_eq(&old, &held));
        assert_eq!(held.generation, 0);
        assert_eq!(held.rules.iter().count(), 1);
        let now = handle.current();
        assert_eq!(now.generation, 1);
        assert_eq!(now.rules.iter().count(), 2);
        assert_eq!(handle.replace(snapshot(&["c.test"])).0, 2);
    }

    #[test]
    fn a_replaced_snapshots_secrets_stay_scanned_for() {
        use std::os::unix::fs::PermissionsExt as _;
        let file = std::env::temp_dir().join(format!(
            "gateway-snapshot-test-{}-rotated",
            std::process::id()
        ));
        let with_secret = |value: &str| {
            std::fs::write(&file, value).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            let mut p = policy(&["a.test"]);
            p.credentials.insert(
                "api".into(),
                crate::policy::Credential {
                    source: crate::policy::SecretSource::File(file.clone()),
                    header: "Authorization".into(),
                    format: "Bearer {secret}".into(),
                    basic_user: None,
                    placeholder: None,
                },
            );
            let secrets = Secrets::load(&p, &crate::tunnel::LoadContext::for_test()).unwrap();
            Snapshot::new(&p, secrets).unwrap()
        };
        let echoes = EchoRegistry::default();
        let handle = PolicyHandle::new(with_secret("s3cret-old"), echoes.clone());
        handle.replace(with_secret("s3cret-new"));
        // The policy in force holds no credential any more: both are still looked for.
        handle.replace(snapshot(&["a.test"]));
        let scan = echoes.current().unwrap();
        assert!(scan.found_in(b"last: Bearer s3cret-old"));
        assert!(scan.found_in(b"last: Bearer s3cret-new"));
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn worker_pools_follow_newer_snapshots_only() {
        let handle = PolicyHandle::new(snapshot(&["a.test"]), EchoRegistry::default());
        let old = handle.current();
        let pools = WorkerPools::new(&old, &upstream::Budget::default());
        handle.replace(snapshot(&["a.test", "b.test"]));
        let new = handle.current();
        let _ = pools.pool(&new, Some(1));
        assert_eq!(pools.0.load().generation, 1);
        // Rule 0 of the old snapshot still gets a pool; the worker stays on generation 1.
        let _ = pools.pool(&old, Some(0));
        assert_eq!(pools.0.load().generation, 1);
    }
}
