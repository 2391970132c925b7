//! A record's JSON line. The tunnel makes one per request, on the request path, so proxy
//! records (and bare ones) are written here directly: field names as literal bytes, strings
//! copied as they are unless they need escaping. The bytes are exactly those serde's derived
//! `Serialize` writes (the tests hold the two together); kernel and reload records, rare,
//! still go through serde.

use std::net::SocketAddr;

use super::record::{Layer, ProxyFields, Record, Verdict};

/// Appends `record` to `out` as one JSON object, no newline.
pub fn write(record: &Record, out: &mut Vec<u8>) {
    // Every field named, so that a new one cannot be left out unnoticed.
    let Record {
        ts,
        layer,
        verdict,
        sandbox,
        reason,
        kernel,
        proxy,
        reload,
        lost,
        repeats,
        suppressed,
    } = record;
    if kernel.is_some() || reload.is_some() || repeats.is_some() || suppressed.is_some() {
        serde_json::to_writer(out, record).expect("audit records always serialize");
        return;
    }
    out.extend_from_slice(b"{\"ts\":");
    string(out, ts);
    after_ts(out, *layer, *verdict, sandbox, reason);
    if let Some(proxy) = proxy {
        proxy_fields(proxy, out);
    }
    if let Some(lost) = lost {
        out.extend_from_slice(b",\"lost\":");
        number(out, lost);
    }
    out.push(b'}');
}

/// Appends the line [`write`] makes of a proxy record stamped now, from borrowed parts: no
/// [`Record`] is built on the request path.
pub fn write_proxy_now(
    out: &mut Vec<u8>,
    verdict: Verdict,
    sandbox: &str,
    reason: &str,
    fields: &ProxyFields,
) {
    // The timestamp needs no escaping: digits, `-`, `:`, `.`, `T` and `Z`.
    out.extend_from_slice(b"{\"ts\":\"");
    super::record::push_now_rfc3339(out);
    out.push(b'"');
    after_ts(out, Layer::Proxy, verdict, sandbox, reason);
    proxy_fields(fields, out);
    out.push(b'}');
}

fn after_ts(out: &mut Vec<u8>, layer: Layer, verdict: Verdict, sandbox: &str, reason: &str) {
    out.extend_from_slice(b",\"layer\":\"");
    out.extend_from_slice(layer_name(layer).as_bytes());
    out.extend_from_slice(b"\",\"verdict\":\"");
    out.extend_from_slice(verdict_name(verdict).as_bytes());
    out.extend_from_slice(b"\",\"sandbox\":");
    string(out, sandbox);
    out.extend_from_slice(b",\"reason\":");
    string(out, reason);
}

fn proxy_fields(p: &ProxyFields, out: &mut Vec<u8>) {
    let ProxyFields {
        method,
        host,
        port,
        path,
        status,
        rule,
        credential,
        client,
    } = p;
    out.extend_from_slice(b",\"method\":");
    optional(out, method.as_deref(), string);
    out.extend_from_slice(b",\"host\":");
    optional(out, host.as_deref(), string);
    out.extend_from_slice(b",\"port\":");
    optional(out, *port, number);
    out.extend_from_slice(b",\"path\":");
    optional(out, path.as_deref(), string);
    out.extend_from_slice(b",\"status\":");
    optional(out, *status, number);
    out.extend_from_slice(b",\"rule\":");
    optional(out, *rule, number);
    out.extend_from_slice(b",\"credential\":");
    optional(out, credential.as_deref(), string);
    out.extend_from_slice(b",\"client\":");
    optional(out, *client, address);
}

fn layer_name(l: Layer) -> &'static str {
    match l {
        Layer::Kernel => "kernel",
        Layer::Proxy => "proxy",
        Layer::Gateway => "gateway",
    }
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Deny => "deny",
        Verdict::Allow => "allow",
        Verdict::WouldDeny => "would-deny",
        Verdict::Note => "note",
    }
}

fn optional<T>(out: &mut Vec<u8>, value: Option<T>, write: fn(&mut Vec<u8>, T)) {
    match value {
        Some(v) => write(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string; serde_json escapes control characters, `"` and `\` only.
fn string(out: &mut Vec<u8>, s: &str) {
    // One table lookup a byte, folded without branches.
    if s.bytes()
        .fold(false, |escape, b| escape | ESCAPED[usize::from(b)])
    {
        serde_json::to_writer(out, s).expect("a string serializes");
        return;
    }
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// The bytes serde_json writes escaped.
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

fn number<N: serde::Serialize>(out: &mut Vec<u8>, n: N) {
    serde_json::to_writer(out, &n).expect("a number serializes");
}

/// `ADDR:PORT` as a string, as serde writes a socket address.
fn address(out: &mut Vec<u8>, addr: SocketAddr) {
    let SocketAddr::V4(v4) = addr else {
        serde_json::to_writer(out, &addr).expect("an address serializes");
        return;
    };
    out.push(b'"');
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        number(out, octet);
    }
    out.push(b':');
    number(out, v4.port());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{KernelFields, ReloadFields};

    fn same_as_serde(record: &Record) {
        let mut ours = Vec::new();
        write(record, &mut ours);
        let serde = serde_json::to_vec(record).unwrap();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(serde).unwrap()
        );
    }

    fn proxy(fields: ProxyFields) -> Record {
        let mut r = Record::new(Layer::Proxy, Verdict::Allow, "box", "allowlisted");
        r.proxy = Some(fields);
        r
    }

    #[test]
    fn proxy_records_are_written_as_serde_writes_them() {
        same_as_serde(&proxy(ProxyFields::default()));
        same_as_serde(&proxy(ProxyFields {
            method: Some("GET".into()),
            host: Some("api.github.com".into()),
            port: Some(443),
            path: Some("/repos/acme/widgets?q=\"x\"\\y\n\u{1}é/€".into()),
            status: Some(200),
            rule: Some(usize::MAX),
            credential: Some("github".into()),
            client: Some("127.0.0.1:54321".parse().unwrap()),
        }));
        same_as_serde(&proxy(ProxyFields {
            client: Some("[::1]:8080".parse().unwrap()),
            host: Some("0.0.0.0".into()),
            port: Some(0),
            ..ProxyFields::default()
        }));
        same_as_serde(&proxy(ProxyFields {
            client: Some("255.255.255.255:65535".parse().unwrap()),
            ..ProxyFields::default()
        }));
        for layer in [Layer::Kernel, Layer::Proxy, Layer::Gateway] {
            for verdict in [
                Verdict::Deny,
                Verdict::Allow,
                Verdict::WouldDeny,
                Verdict::Note,
            ] {
                let mut r = Record::new(layer, verdict, "a \"box\"", "why\t");
                same_as_serde(&r);
                r.lost = Some(7);
                same_as_serde(&r);
            }
        }
    }

    #[test]
    fn a_proxy_record_stamped_now_is_the_record_serde_writes() {
        let fields = ProxyFields {
            method: Some("GET".into()),
            host: Some("api.github.com".into()),
            port: Some(443),
            path: Some("/a?\"\\\n".into()),
            client: Some("127.0.0.1:5".parse().unwrap()),
            ..ProxyFields::default()
        };
        for verdict in [Verdict::Deny, Verdict::Allow, Verdict::WouldDeny] {
            let mut line = Vec::new();
            write_proxy_now(&mut line, verdict, "a \"box\"", "why\t", &fields);
            let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let mut record = Record::new(Layer::Proxy, verdict, "a \"box\"", "why\t");
            record.ts = parsed["ts"].as_str().unwrap().to_owned();
            record.proxy = Some(fields.clone());
            assert_eq!(
                String::from_utf8(line).unwrap(),
                serde_json::to_string(&record).unwrap()
            );
            time::OffsetDateTime::parse(&record.ts, &time::format_description::well_known::Rfc3339)
                .unwrap();
        }
    }

    #[test]
    fn other_records_go_through_serde() {
        let mut kernel = Record::new(Layer::Kernel, Verdict::Deny, "box", "connect");
        kernel.kernel = Some(KernelFields {
            hook: "connect4",
            pid: 1,
            uid: 2,
            comm: "curl".into(),
            proto: "tcp".into(),
            dst: None,
        });
        same_as_serde(&kernel);
        let mut reload = Record::new(Layer::Gateway, Verdict::Note, "box", "reloaded");
        reload.reload = Some(ReloadFields::default());
        same_as_serde(&reload);
    }
}
