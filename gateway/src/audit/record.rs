//! One audit record, with the fields DESIGN.md lists.

use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Kernel,
    Proxy,
    /// The gateway's own notes (a reload, a restarted hash chain).
    Gateway,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Deny,
    Allow,
    /// Something the gateway did, not a decision on traffic.
    Note,
}

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub ts: String,
    pub layer: Layer,
    pub verdict: Verdict,
    pub sandbox: String,
    pub reason: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelFields>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyFields>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadFields>,
    /// Refusals the kernel could not report because the ring buffer was full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
}

/// Fields of a refusal seen by an eBPF program.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KernelFields {
    pub hook: &'static str,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    pub proto: String,
    pub dst: Option<String>,
}

/// Fields of a decision made by the tunnel. `rule` and `credential` are always present, null
/// when none applied; the credential is named, never its value.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct ProxyFields {
    pub method: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub rule: Option<usize>,
    pub credential: Option<String>,
    /// The client's address as the tunnel saw it.
    pub client: String,
}

/// Fields of a policy reload: what was put in force, or why nothing was.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ReloadFields {
    pub policy_file: String,
    /// Reloads put in force since start (the first policy is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// `3 http rules, 1 network rule, 2 credentials`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_rules: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_rules: Option<usize>,
    /// Reading, checking and compiling the file, filling the kernel maps and switching both
    /// the kernel and the tunnel to the new policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<f64>,
    /// Why the reload was refused: `FILE:LINE:COL: message` lines as `policy check` prints
    /// them, or what else stood in the way. Never a secret.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Record {
    pub fn new(layer: Layer, verdict: Verdict, sandbox: &str, reason: &str) -> Self {
        Self {
            ts: now_rfc3339(),
            layer,
            verdict,
            sandbox: sandbox.to_owned(),
            reason: reason.to_owned(),
            kernel: None,
            proxy: None,
            reload: None,
            lost: None,
        }
    }
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
