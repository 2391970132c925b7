//! Learn mode end to end: `gateway run --learn` under a policy that allows nothing over HTTP
//! lets a sandboxed client reach local TLS upstreams, records each request `would-deny`, and
//! still refuses what learn mode must never let through; `gateway policy suggest` turns the
//! log into a policy that, without `--learn`, allows those requests and nothing more. Every
//! upstream listens on 127.0.0.1; nothing leaves loopback.

mod support;

use std::{net::TcpListener, process::Command};

use serde_json::{Value, json};
use support::{upstream::*, *};

const SECRET: &str = "gwtest-learn-secret-Vb7Qx2Lk9Pz4";
/// A credential no rule names, with a placeholder in the sandbox: sent anywhere, it leaks.
const PLACEHOLDER_CREDENTIAL: &str =
    "[credentials.api]\nenv = \"API_TOKEN\"\nplaceholder = \"API_TOKEN_PLACEHOLDER\"\n";

/// Python for the sandbox, `python3 SCRIPT A_PORT DIRECT_PORT`: raw requests inside a CONNECT
/// to localhost:A_PORT (which learn mode intercepts), then a direct TCP connection that only
/// the kernel judges. One JSON line per case.
const RAW_CLIENT: &str = r#"
import json, os, socket, ssl, sys
A, DIRECT = int(sys.argv[1]), int(sys.argv[2])
PROXY_HOST, PROXY_PORT = os.environ["HTTP_PROXY"].split("//")[-1].rsplit(":", 1)
def report(case, outcome):
    print(json.dumps({"case": case, "outcome": outcome}), flush=True)
def read_head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
def intercepted():
    s = socket.create_connection((PROXY_HOST, int(PROXY_PORT)), timeout=10)
    s.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (A, A))
    head = read_head(s)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("CONNECT refused: " + repr(head[:80]))
    return ssl.create_default_context().wrap_socket(s, server_hostname="localhost")
def status(payload):
    try:
        s = intercepted()
    except Exception as e:
        return "error: " + repr(e)
    try:
        s.sendall(payload)
        data = read_head(s)
    except OSError:
        return "closed"
    if not data:
        return "closed"
    return int(data.split(b" ", 2)[1])
if A:
    report("cl-te", status(b"POST /v1/smuggle HTTP/1.1\r\nHost: localhost:%d\r\n"
                           b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % A))
    report("trace", status(b"TRACE /v1/trace HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % A))
try:
    socket.create_connection(("127.0.0.1", DIRECT), timeout=5).close()
    report("direct", "open")
except OSError as e:
    report("direct", e.errno)
"#;

/// Runs `script` (curl calls, then the python client) in the sandbox.
fn run_in_sandbox(run: &Run, flags: &[&str], script: &str) -> Finished {
    run.finish(
        run.command_with(flags, &["sh", "-c", script])
            .env("API_TOKEN", SECRET)
            .output()
            .unwrap(),
    )
}

fn outcome<'a>(out: &'a Finished, case: &str) -> &'a Value {
    out.lines
        .iter()
        .find(|l| l["case"] == case)
        .map(|l| &l["outcome"])
        .unwrap_or_else(|| panic!("case `{case}` did not run\n{}", out.describe()))
}

/// The one proxy record for `method host:port path`.
fn record<'a>(out: &'a Finished, method: &str, host: &str, port: u16, path: &str) -> &'a Value {
    let found: Vec<&Value> = proxy_records(out)
        .into_iter()
        .filter(|r| {
            r["method"] == method && r["host"] == host && r["port"] == port && r["path"] == path
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want one proxy record for {method} {host}:{port}{path}\n{}",
        out.describe()
    );
    found[0]
}

fn assert_fields(out: &Finished, record: &Value, want: &Value) {
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(
            &record[k.as_str()],
            v,
            "`{k}` of {record}\n{}",
            out.describe()
        );
    }
    for k in ["ts", "sandbox", "client", "status"] {
        assert!(
            record.get(k).is_some_and(|v| !v.is_null()),
            "{record} lacks {k}"
        );
    }
}

fn gateway(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(gateway_bin()).args(args).output().unwrap()
}

fn describe_output(o: &std::process::Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn learn_mode_records_would_deny_and_suggest_writes_a_policy_that_allows_just_that() {
    let pki = Pki::new();
    let a = Server::upstream(&pki, "a");
    let b = Server::upstream(&pki, "b");
    let direct = HostTcp::bind("127.0.0.1:0");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (pa, pb) = (a.port, b.port);
    let learning = Run::new(
        "learn",
        &tunnel_policy("learner", &pki, PLACEHOLDER_CREDENTIAL),
    );
    let client = learning.scratch.write("client.py", RAW_CLIENT);
    let script = format!(
        r#"{CURL}
r get-item https://localhost:{pa}/v1/items/1
r post-item -X POST -d '{{"name":"x"}}' https://localhost:{pa}/v1/items
r get-repo https://127.0.0.1:{pb}/repo/x
r down https://localhost:{closed}/v1/down
r leak -H "Authorization: Bearer $API_TOKEN_PLACEHOLDER" https://localhost:{pa}/v1/leak
r metadata https://[fe80::1]:8443/latest/meta-data
python3 {client} {pa} {port}
"#,
        client = client.display(),
        port = direct.port,
    );
    let out = run_in_sandbox(&learning, &["--learn"], &script);
    let ctx = |out: &Finished| format!("{}\n{}\n{}", out.describe(), a.describe(), b.describe());
    assert!(
        out.stderr.contains("LEARN MODE"),
        "no learn-mode warning on stderr\n{}",
        ctx(&out)
    );

    // The three requests no rule allows got through, without any credential...
    let answered = replies(&out.stdout);
    for name in ["get-item", "post-item", "get-repo"] {
        let r = reply(&answered, name, &out);
        assert_eq!(r.code, 200, "{name}: {r:?}\n{}", ctx(&out));
    }
    assert_eq!(reply(&answered, "down", &out).code, 502, "{}", ctx(&out));
    assert_eq!(a.paths(), ["/v1/items/1", "/v1/items"], "{}", ctx(&out));
    assert_eq!(b.paths(), ["/repo/x"], "{}", ctx(&out));
    for r in a.requests().iter().chain(b.requests().iter()) {
        let values = r["headers"].as_array().unwrap();
        assert!(
            values
                .iter()
                .all(|h| !h[0].as_str().unwrap().eq_ignore_ascii_case("authorization")),
            "a credential reached the upstream: {r}"
        );
    }
    assert!(!out.stdout.contains(SECRET) && !out.stderr.contains(SECRET));
    // ...each recorded `would-deny`, with every proxy field; they resolve to loopback, so
    // the reason they would have been refused is the private address.
    let learned = json!({
        "layer": "proxy", "verdict": "would-deny", "reason": "private-address",
        "rule": null, "credential": null,
    });
    for (method, host, port, path) in [
        ("GET", "localhost", pa, "/v1/items/1"),
        ("POST", "localhost", pa, "/v1/items"),
        ("GET", "127.0.0.1", pb, "/repo/x"),
    ] {
        let r = record(&out, method, host, port, path);
        assert_fields(&out, r, &learned);
        assert_eq!(r["status"], 200, "{r}");
    }
    let down = record(&out, "GET", "localhost", closed, "/v1/down");
    assert_fields(&out, down, &learned);
    assert_eq!(down["status"], 502, "{down}");

    // What learn mode never lets through stays refused, and reaches nothing.
    let leak = reply(&answered, "leak", &out);
    assert!(leak.forbidden(), "leak: {leak:?}\n{}", ctx(&out));
    assert_fields(
        &out,
        record(&out, "GET", "localhost", pa, "/v1/leak"),
        &json!({"verdict": "deny", "reason": "placeholder-to-unlisted-host", "status": 403}),
    );
    // Link-local (where clouds serve instance credentials) is refused before any dial; an
    // fe80:: address without a zone cannot be dialled anyway, so nothing leaves the host.
    let metadata = reply(&answered, "metadata", &out);
    assert!(
        metadata.forbidden(),
        "metadata: {metadata:?}\n{}",
        ctx(&out)
    );
    assert_fields(
        &out,
        record(&out, "GET", "fe80::1", 8443, "/latest/meta-data"),
        &json!({"verdict": "deny", "reason": "private-address", "status": 403}),
    );
    let smuggled = outcome(&out, "cl-te");
    assert!(
        *smuggled == json!(400) || *smuggled == json!("closed"),
        "CL+TE: {smuggled}\n{}",
        ctx(&out)
    );
    assert_eq!(outcome(&out, "trace"), &json!(405), "{}", ctx(&out));
    assert_fields(
        &out,
        record(&out, "TRACE", "localhost", pa, "/v1/trace"),
        &json!({"verdict": "deny", "reason": "trace-refused", "status": 405}),
    );
    assert!(
        proxy_records(&out)
            .iter()
            .all(|r| r["path"] != "/v1/smuggle" || r["verdict"] == "deny"),
        "{}",
        ctx(&out)
    );
    // The kernel is not relaxed: the direct connection was refused and recorded.
    assert_eq!(outcome(&out, "direct"), &json!(EPERM), "{}", ctx(&out));
    assert_eq!(direct.accepted(), 0);
    let dst = format!("127.0.0.1:{}", direct.port);
    assert!(
        out.audit.iter().any(|r| r["layer"] == "kernel"
            && r["verdict"] == "deny"
            && r["hook"] == "connect4"
            && r["dst"] == dst.as_str()),
        "no kernel refusal of {dst}\n{}",
        ctx(&out)
    );

    // `audit --verdict would-deny` shows the learned requests and nothing else.
    let listed = gateway(&[
        "audit".as_ref(),
        "--log".as_ref(),
        learning.audit.as_os_str(),
        "--verdict".as_ref(),
        "would-deny".as_ref(),
        "--json".as_ref(),
    ]);
    assert!(listed.status.success(), "{}", describe_output(&listed));
    let listed = json_lines(&String::from_utf8_lossy(&listed.stdout));
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(listed.iter().all(|r| r["verdict"] == "would-deny"));

    // The suggestion: valid as written, and it names what was seen.
    let suggested = learning.scratch.dir.join("suggested.toml");
    let suggest = gateway(&[
        "policy".as_ref(),
        "suggest".as_ref(),
        "--from".as_ref(),
        learning.audit.as_os_str(),
        "-o".as_ref(),
        suggested.as_os_str(),
    ]);
    assert!(suggest.status.success(), "{}", describe_output(&suggest));
    let text = std::fs::read_to_string(&suggested).unwrap();
    assert!(
        text.starts_with(&format!(
            "# Generated by `gateway policy suggest` from the audit log {}",
            learning.audit.display()
        )),
        "{text}"
    );
    let check = gateway(&["policy".as_ref(), "check".as_ref(), suggested.as_os_str()]);
    assert!(
        check.status.success(),
        "{}\n{text}",
        describe_output(&check)
    );
    for want in [
        format!(
            "host = \"localhost\"\nport = {pa}\nmethods = [\"GET\", \"POST\"]\npaths = [\"/v1/items\", \"/v1/items/1\"]\nprivate = true\n"
        ),
        format!(
            "host = \"127.0.0.1\"\nport = {pb}\nmethods = [\"GET\"]\npaths = [\"/repo/x\"]\nprivate = true\n"
        ),
        format!(
            "cidr = \"127.0.0.1/32\"\nports = [{}]\nprotocol = \"tcp\"\n",
            direct.port
        ),
    ] {
        assert!(text.contains(&want), "missing:\n{want}\nin:\n{text}");
    }
    for refused in ["/v1/leak", "/v1/smuggle", "/v1/trace"] {
        assert!(!text.contains(refused), "{refused} was learned:\n{text}");
    }

    // Without --learn, the suggested policy (plus the test CA, as its author would add)
    // allows those requests, the direct connection too, and refuses anything else.
    let enforcing = Run::new(
        "learn-enforce",
        &format!(
            "{text}\n[tls]\nupstream_ca = [{:?}]\n",
            pki.ca.to_str().unwrap()
        ),
    );
    let script = format!(
        r#"{CURL}
r get-item https://localhost:{pa}/v1/items/1
r post-item -X POST -d '{{"name":"x"}}' https://localhost:{pa}/v1/items
r get-repo https://127.0.0.1:{pb}/repo/x
r delete-item -X DELETE https://localhost:{pa}/v1/items/1
r other-path https://127.0.0.1:{pb}/repo/y
python3 {client} 0 {port}
"#,
        client = client.display(),
        port = direct.port,
    );
    let out = run_in_sandbox(&enforcing, &[], &script);
    assert!(!out.stderr.contains("LEARN MODE"), "{}", ctx(&out));
    let answered = replies(&out.stdout);
    for (name, method, host, port, path) in [
        ("get-item", "GET", "localhost", pa, "/v1/items/1"),
        ("post-item", "POST", "localhost", pa, "/v1/items"),
        ("get-repo", "GET", "127.0.0.1", pb, "/repo/x"),
    ] {
        let r = reply(&answered, name, &out);
        assert_eq!(r.code, 200, "{name}: {r:?}\n{}", ctx(&out));
        let rec = record(&out, method, host, port, path);
        assert_fields(
            &out,
            rec,
            &json!({"verdict": "allow", "reason": "allowlisted", "status": 200}),
        );
        assert!(rec["rule"].is_u64(), "{rec}");
    }
    for (name, method, host, port, path) in [
        ("delete-item", "DELETE", "localhost", pa, "/v1/items/1"),
        ("other-path", "GET", "127.0.0.1", pb, "/repo/y"),
    ] {
        let r = reply(&answered, name, &out);
        assert!(r.forbidden(), "{name}: {r:?}\n{}", ctx(&out));
        assert_fields(
            &out,
            record(&out, method, host, port, path),
            &json!({"verdict": "deny", "reason": "not-allowlisted", "status": 403, "rule": null}),
        );
    }
    assert!(
        out.audit.iter().all(|r| r["verdict"] != "would-deny"),
        "{}",
        ctx(&out)
    );
    assert_eq!(
        a.paths(),
        ["/v1/items/1", "/v1/items", "/v1/items/1", "/v1/items"],
        "{}",
        ctx(&out)
    );
    assert_eq!(b.paths(), ["/repo/x", "/repo/x"], "{}", ctx(&out));
    assert_eq!(outcome(&out, "direct"), &json!("open"), "{}", ctx(&out));
    assert_eq!(direct.accepted(), 1);
}
