//! One audit record, with the fields DESIGN.md lists.

use serde::Serialize;
use std::{cell::RefCell, time::SystemTime};

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
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Deny,
    Allow,
    /// Learn mode let through what the policy refuses; the reason says why it would have.
    WouldDeny,
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
    /// On a kernel refusal written as a second ends: the refusals like it (the same hook,
    /// reason, user, command, protocol and destination; any process, the last one's pid
    /// given) that came in that second after the first, which had a record of its own. The
    /// record stands for them all, not for one more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeats: Option<u64>,
    /// On a `refusals-suppressed` record: refusals past the limit of different refusals one
    /// sandbox may have recorded in a second, counted here without their fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

/// Fields of a refusal seen by an eBPF program.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Hash)]
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
    /// The client's address as the tunnel saw it (written as text, `ADDR:PORT`).
    pub client: Option<std::net::SocketAddr>,
}

/// The most bytes of a method, host or path a proxy record keeps. A client may send a
/// 64 KiB path; a record that size for each refusal would let one sandbox fill the log
/// thirty times faster than with ordinary records.
pub const MAX_FIELD: usize = 2048;

impl ProxyFields {
    /// Cuts a method, host or path longer than [`MAX_FIELD`] bytes (at a character
    /// boundary) and says how much was left out: `/a/b...[61440 more bytes]`.
    pub fn bounded(mut self) -> Self {
        for field in [&mut self.method, &mut self.host, &mut self.path]
            .into_iter()
            .flatten()
        {
            if field.len() > MAX_FIELD {
                let end = field.floor_char_boundary(MAX_FIELD);
                let dropped = field.len() - end;
                field.truncate(end);
                field.push_str(&format!("...[{dropped} more bytes]"));
            }
        }
        self
    }
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
    /// The refusals a kernel record stands for: one, or its `repeats` or `suppressed` count.
    pub fn refusals(&self) -> u64 {
        self.suppressed.or(self.repeats).unwrap_or(1)
    }

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
            repeats: None,
            suppressed: None,
        }
    }
}

pub fn now_rfc3339() -> String {
    let mut out = Vec::with_capacity(32);
    push_now_rfc3339(&mut out);
    String::from_utf8(out).expect("a timestamp is ASCII")
}

/// Appends [`now_rfc3339`]'s text to `out`.
pub fn push_now_rfc3339(out: &mut Vec<u8>) {
    // Seconds and nanoseconds straight from the clock: the calendar date is only worked out
    // when the second changes.
    match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => push_rfc3339_at(out, since.as_secs() as i64, since.subsec_nanos()),
        Err(_) => {
            let t = OffsetDateTime::now_utc();
            push_rfc3339_at(out, t.unix_timestamp(), t.nanosecond());
        }
    }
}

thread_local! {
    /// The last whole second formatted on this thread, without its `Z`: every record of a
    /// busy second shares it and only the fraction is written anew.
    static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

/// The same text as `time`'s RFC 3339 formatting of a UTC time: the fraction has as many
/// digits as it needs, none when it is zero.
#[cfg(test)]
fn rfc3339(t: OffsetDateTime) -> String {
    let mut out = Vec::new();
    push_rfc3339_at(&mut out, t.unix_timestamp(), t.nanosecond());
    String::from_utf8(out).expect("a timestamp is ASCII")
}

/// Appends [`rfc3339`]'s text for the time `unix` seconds and `nanos` nanoseconds after the
/// epoch.
fn push_rfc3339_at(out: &mut Vec<u8>, unix: i64, nanos: u32) {
    SECOND.with_borrow_mut(|(second, whole)| {
        if *second != unix {
            let Ok(text) = OffsetDateTime::from_unix_timestamp(unix)
                .map_err(|_| ())
                .and_then(|t| t.format(&Rfc3339).map_err(|_| ()))
            else {
                out.extend_from_slice(b"1970-01-01T00:00:00Z");
                return;
            };
            *whole = text.trim_end_matches('Z').to_owned();
            *second = unix;
        }
        out.extend_from_slice(whole.as_bytes());
        let mut nanos = nanos;
        if nanos != 0 {
            // Nine digits, trailing zeros dropped, without the formatting machinery.
            let mut digits = [b'0'; 9];
            for d in digits.iter_mut().rev() {
                *d = b'0' + (nanos % 10) as u8;
                nanos /= 10;
            }
            let end = digits.iter().rposition(|&d| d != b'0').map_or(0, |i| i + 1);
            out.push(b'.');
            out.extend_from_slice(&digits[..end]);
        }
        out.push(b'Z');
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_as_time_writes_them() {
        let base = OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap();
        for nanos in [0, 1, 10, 100_000_000, 123_456_789, 999_999_999, 500_000] {
            for offset in [0, 1, 0, 86_400] {
                let t = (base + time::Duration::seconds(offset))
                    .replace_nanosecond(nanos)
                    .unwrap();
                assert_eq!(
                    rfc3339(t),
                    t.format(&Rfc3339).unwrap(),
                    "{nanos} +{offset}s"
                );
            }
        }
        let now = OffsetDateTime::parse(&now_rfc3339(), &Rfc3339).unwrap();
        assert!((now - OffsetDateTime::now_utc()).abs() < time::Duration::seconds(5));
    }

    #[test]
    fn long_fields_are_cut_and_say_so() {
        // A multi-byte character across the cut: the cut goes before it.
        let path = format!("/{}é{}", "a".repeat(MAX_FIELD - 2), "b".repeat(60_000));
        let fields = ProxyFields {
            method: Some("GET".into()),
            host: Some("api.test".into()),
            path: Some(path.clone()),
            ..Default::default()
        }
        .bounded();
        let cut = fields.path.unwrap();
        assert!(cut.len() < MAX_FIELD + 32, "{} bytes kept", cut.len());
        let kept = &cut[..cut.find("...[").unwrap()];
        assert!(path.starts_with(kept) && kept.len() == MAX_FIELD - 1);
        assert!(cut.ends_with(&format!("...[{} more bytes]", path.len() - kept.len())));
        assert_eq!(fields.method.as_deref(), Some("GET"));
        assert_eq!(fields.host.as_deref(), Some("api.test"));
    }

    #[test]
    fn verdicts_are_written_as_design_md_names_them() {
        let name = |v: Verdict| serde_json::to_string(&v).unwrap();
        assert_eq!(name(Verdict::Deny), r#""deny""#);
        assert_eq!(name(Verdict::Allow), r#""allow""#);
        assert_eq!(name(Verdict::WouldDeny), r#""would-deny""#);
    }
}
