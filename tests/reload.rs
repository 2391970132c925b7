//! SIGHUP to `gateway run` while the sandbox works: the policy file read again and put in
//! force in the tunnel and the kernel maps at once, or refused with the old policy left in
//! force. Real gateway as root, real TLS upstreams and listeners on 127.0.0.1.

mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{live::Live, upstream::*, *};

/// Starts `body` (after `status()`) in the sandbox of `run`, the credential in the
/// gateway's environment.
fn python<'a>(run: &'a Run, body: &str) -> Live<'a> {
    Live::python(run, &format!("{STATUS}\n{body}"), &[("API_TOKEN", SECRET)])
}

/// Replaces the policy file, then sends SIGHUP to the gateway and waits for the audit record
/// of the outcome: the `nth` reload record (counting from 1).
fn reload(live: &Live, policy: &str, nth: usize) -> Value {
    std::fs::write(&live.run.policy, policy).unwrap();
    live.signal(libc::SIGHUP);
    note_within(live, nth, Duration::from_secs(30))
}

/// Waits up to `limit` for the `nth` reload record (counting from 1).
fn note_within(live: &Live, nth: usize, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let notes: Vec<Value> = live
            .run
            .audit_records()
            .into_iter()
            .filter(|r| r["layer"] == "gateway" && r.get("policy_file").is_some())
            .collect();
        if let Some(note) = notes.get(nth - 1) {
            return note.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no audit record of reload {nth}\n--- stderr\n{}",
            live.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn printed<'a>(out: &'a Finished, key: &str) -> &'a Value {
    out.lines
        .iter()
        .find_map(|l| l.get(key))
        .unwrap_or_else(|| panic!("the script printed no `{key}`\n{}", out.describe()))
}

fn proxy_record<'a>(out: &'a Finished, verdict: &str, host: &str) -> Option<&'a Value> {
    out.audit
        .iter()
        .find(|r| r["layer"] == "proxy" && r["verdict"] == verdict && r["host"] == host)
}

fn assert_reload_refused(note: &Value, out_stderr: &str, wanted: &str) {
    assert_eq!(note["verdict"], "deny", "{note}");
    assert_eq!(note["reason"], "policy-reload-refused", "{note}");
    let errors: Vec<&str> = note["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in {note}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        errors.iter().any(|e| e.contains(wanted)),
        "no error with {wanted:?} in {note}"
    );
    for e in errors {
        assert!(
            out_stderr.contains(e),
            "the error {e:?} is not on the gateway's stderr\n{out_stderr}"
        );
    }
}

#[test]
fn a_reload_allows_a_new_host_and_an_open_stream_carries_on() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let api_rule = rule("api.test", api.port, "credential = \"api\"");
    let before = tunnel_policy("reload-allow", &pki, &format!("{api_rule}{API_CREDENTIAL}"));
    let after = tunnel_policy(
        "reload-allow",
        &pki,
        &format!(
            "{api_rule}{}{API_CREDENTIAL}",
            rule("other.test", other.port, "credential = \"api\"")
        ),
    );
    let run = Run::new("reload-allow", &before);
    let go = run.scratch.dir.join("go");
    // The stream is opened under the first policy and read to its end after the reload; the
    // upstream sends its second event only once /release was requested.
    let mut live = python(
        &run,
        &format!(
            r#"{SSE_EVENTS}
stream = urllib.request.urlopen("https://api.test/sse", timeout=30)
say("first", next_event(stream))
say("b_before", status("https://other.test/v1/before"))
wait_for({go:?})
say("b_after", status("https://other.test/v1/after"))
say("release", status("https://api.test/release"))
say("second", next_event(stream))
say("rest", next_event(stream))
"#,
            go = go.to_str().unwrap()
        ),
    );
    assert_eq!(live.until("first"), "first");
    assert_eq!(live.until("b_before"), 403);
    let note = reload(&live, &after, 1);
    std::fs::write(&go, "").unwrap();
    let out = live.finish();
    let ctx = || described(&out, &[&api, &other]);

    assert_eq!(note["layer"], "gateway", "{note}");
    assert_eq!(note["verdict"], "note", "{note}");
    assert_eq!(note["reason"], "policy-reloaded", "{note}");
    assert_eq!(note["sandbox"], "reload-allow", "{note}");
    assert_eq!(note["generation"], 1, "{note}");
    assert_eq!(note["http_rules"], 2, "{note}");
    assert_eq!(note["network_rules"], 0, "{note}");
    assert!(
        note["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("2 http rules, 0 network rules, 1 credential")),
        "{note}"
    );
    let elapsed = note["elapsed_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(elapsed < 1000.0, "reload took {elapsed} ms\n{note}");

    assert!(out.status.success(), "{}", ctx());
    assert_eq!(printed(&out, "b_after"), 200, "{}", ctx());
    assert_eq!(printed(&out, "release"), 200, "{}", ctx());
    assert_eq!(
        printed(&out, "second"),
        "second",
        "the stream opened before the reload was cut\n{}",
        ctx()
    );
    assert_eq!(printed(&out, "rest"), "end of stream", "{}", ctx());

    assert_eq!(other.paths(), ["/v1/after"], "{}", ctx());
    let bearer = format!("Bearer {SECRET}");
    assert_eq!(
        header(&other.requests()[0], "authorization"),
        [bearer.as_str()],
        "{}",
        ctx()
    );
    assert_eq!(api.paths(), ["/sse", "/release"], "{}", ctx());
    assert!(
        proxy_record(&out, "deny", "other.test").is_some(),
        "{}",
        ctx()
    );
    let allowed = proxy_record(&out, "allow", "other.test").unwrap_or_else(|| panic!("{}", ctx()));
    assert_eq!(allowed["rule"], 1, "{}", ctx());
    assert_eq!(allowed["credential"], "api", "{}", ctx());
    assert!(out.stderr.contains("policy reloaded"), "{}", ctx());
    for (place, text) in [("stderr", &out.stderr), ("stdout", &out.stdout)] {
        assert!(!text.contains(SECRET), "the secret is in the {place}");
    }
    let log = std::fs::read_to_string(&run.audit).unwrap();
    assert!(!log.contains(SECRET), "the secret is in the audit log");
}

#[test]
fn a_refused_reload_leaves_the_old_policy_in_force() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let good = tunnel_policy(
        "reload-refused",
        &pki,
        &format!(
            "{}{API_CREDENTIAL}",
            rule("api.test", api.port, "credential = \"api\"")
        ),
    );
    // Every kind of refusal, each with what would open other.test if it went through.
    let other_rule = rule("other.test", other.port, "");
    let broken = format!(
        "{good}{other_rule}[[network.allow]]\ncidr = \"127.0.0.300/32\"\nports = [80]\n\
         [[http.allow]]\nhots = \"x.test\"\n"
    );
    let placeholder = good.replace(
        API_CREDENTIAL,
        &format!("{other_rule}[credentials.api]\nenv = \"API_TOKEN\"\nplaceholder = \"API_PH\"\n"),
    );
    let moved = format!("{good}{other_rule}[tunnel]\nlisten = \"127.0.0.1:9\"\n")
        .replace("name = \"reload-refused\"", "name = \"renamed\"");

    let run = Run::new("reload-refused", &good);
    let go = run.scratch.dir.join("go");
    let mut live = python(
        &run,
        &format!(
            r#"
say("ready", True)
wait_for({go:?})
say("a", status("https://api.test/v1/a"))
say("b", status("https://other.test/v1/b"))
"#,
            go = go.to_str().unwrap()
        ),
    );
    assert_eq!(live.until("ready"), true);
    let broken_note = reload(&live, &broken, 1);
    let placeholder_note = reload(&live, &placeholder, 2);
    let moved_note = reload(&live, &moved, 3);
    // The file `policy check` reads is the broken one again, for the same messages.
    std::fs::write(&run.policy, &broken).unwrap();
    let check = Command::new(gateway_bin())
        .args(["policy", "check"])
        .arg(&run.policy)
        .output()
        .unwrap();
    std::fs::write(&go, "").unwrap();
    let out = live.finish();
    let ctx = || described(&out, &[&api, &other]);

    assert_eq!(check.status.code(), Some(2), "{check:?}");
    let check_lines: Vec<String> = String::from_utf8_lossy(&check.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(check_lines.len() >= 2, "{check_lines:?}");
    assert_eq!(
        broken_note["errors"],
        serde_json::json!(check_lines),
        "a refused reload reports what policy check reports\n{}",
        ctx()
    );
    assert_reload_refused(&broken_note, &out.stderr, "127.0.0.300");
    assert_reload_refused(
        &placeholder_note,
        &out.stderr,
        "placeholder credentials cannot be added by reload: restart the sandbox",
    );
    assert_reload_refused(&moved_note, &out.stderr, "[tunnel] listen");
    assert_reload_refused(&moved_note, &out.stderr, "sandbox's name");
    for note in [&broken_note, &placeholder_note, &moved_note] {
        assert_eq!(note["layer"], "gateway", "{note}");
        assert_eq!(note["sandbox"], "reload-refused", "{note}");
    }

    assert!(out.status.success(), "{}", ctx());
    assert_eq!(printed(&out, "a"), 200, "{}", ctx());
    assert_eq!(printed(&out, "b"), 403, "{}", ctx());
    assert_eq!(api.paths(), ["/v1/a"], "{}", ctx());
    assert_eq!(
        header(&api.requests()[0], "authorization"),
        [format!("Bearer {SECRET}").as_str()],
        "the credential in force is still attached\n{}",
        ctx()
    );
    assert!(other.requests().is_empty(), "{}", ctx());
    assert!(!out.stderr.contains(SECRET), "the secret is on stderr");
}

#[test]
fn a_reload_adds_and_removes_kernel_allowances() {
    let added = HostTcp::bind("127.0.0.1:0");
    let removed = HostTcp::bind("127.0.0.1:0");
    let scratch = Scratch::new("reload-unix");
    let unix = HostUnix::bind(&scratch.dir, "added.sock");
    let net = |port: u16| {
        format!(
            "[[network.allow]]\ncidr = \"127.0.0.1/32\"\nports = [{port}]\nprotocol = \"tcp\"\n"
        )
    };
    let before = policy("reload-kernel", &net(removed.port));
    let after = policy(
        "reload-kernel",
        &format!(
            "{}[[unix.allow]]\npath = {:?}\n",
            net(added.port),
            unix.path.to_str().unwrap()
        ),
    );
    let run = Run::new("reload-kernel", &before);
    let go = run.scratch.dir.join("go");
    let mut live = python(
        &run,
        &format!(
            r#"
def tcp(port):
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
def unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.close()
report("added-before", lambda: tcp({a}))
report("removed-before", lambda: tcp({r}))
report("unix-before", lambda: unix({u:?}))
say("ready", True)
wait_for({go:?})
report("added-after", lambda: tcp({a}))
report("removed-after", lambda: tcp({r}))
report("unix-after", lambda: unix({u:?}))
"#,
            a = added.port,
            r = removed.port,
            u = unix.path.to_str().unwrap(),
            go = go.to_str().unwrap()
        ),
    );
    assert_eq!(live.until("ready"), true);
    assert_eq!(added.accepted(), 0);
    assert_eq!(removed.accepted(), 1);
    assert_eq!(unix.accepted(), 0);
    let note = reload(&live, &after, 1);
    std::fs::write(&go, "").unwrap();
    let out = live.finish();

    assert_eq!(
        note["reason"],
        "policy-reloaded",
        "{note}\n{}",
        out.describe()
    );
    assert_eq!(note["network_rules"], 1, "{note}");
    assert!(out.status.success(), "{}", out.describe());
    out.assert_refused("added-before");
    out.assert_open("removed-before");
    out.assert_refused("unix-before");
    out.assert_open("added-after");
    out.assert_refused("removed-after");
    out.assert_open("unix-after");
    assert_eq!(added.accepted(), 1, "{}", out.describe());
    assert_eq!(removed.accepted(), 0, "{}", out.describe());
    assert_eq!(unix.accepted(), 1, "{}", out.describe());
    out.assert_audited("connect4", &format!("127.0.0.1:{}", added.port));
    out.assert_audited("connect4", &format!("127.0.0.1:{}", removed.port));
    out.assert_audited("unix_connect", unix.path.to_str().unwrap());
}

/// A secret a reload rotates or removes may still be stored upstream (a stored-request
/// inspector, a log page) and handed to the next request: every answer is still checked for
/// it, and asked uncompressed, after the new policy no longer holds it, and after the policy
/// holds no credential at all.
#[test]
fn a_secret_a_reload_retired_never_reaches_the_sandbox() {
    use std::os::unix::fs::PermissionsExt as _;
    let old = "gwtest-retired-secret-Vb72Kx";
    let new = "gwtest-rotated-secret-Pz39Qm";
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let inspector = rule("api.test", api.port, "paths = [\"/last-credential\"]");
    let run = Run::new("reload-retired", "");
    let secret = run.scratch.write("secret-a", old);
    // Root's alone: a secret file the sandbox's user could read is refused.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let with_credential = tunnel_policy(
        "reload-retired",
        &pki,
        &format!(
            "{inspector}{}[credentials.a]\nfile = {:?}\n",
            rule("api.test", api.port, "credential = \"a\""),
            secret.to_str().unwrap()
        ),
    );
    let without = tunnel_policy("reload-retired", &pki, &inspector);
    std::fs::write(&run.policy, &with_credential).unwrap();
    let (rotated, removed) = (
        run.scratch.dir.join("rotated"),
        run.scratch.dir.join("removed"),
    );
    // Each fetch asks for compression; what the sandbox printed is read for the secret.
    let mut live = python(
        &run,
        &format!(
            r#"
def fetch(url):
    req = urllib.request.Request(url, headers={{"Accept-Encoding": "gzip"}})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return {{"status": r.status, "body": r.read().decode(errors="replace")}}
    except Exception as e:
        return {{"error": type(e).__name__}}
say("one", status("https://api.test/v1/one"))
wait_for({rotated:?})
say("rotated", fetch("https://api.test/last-credential"))
wait_for({removed:?})
say("removed", fetch("https://api.test/last-credential"))
"#,
            rotated = rotated.to_str().unwrap(),
            removed = removed.to_str().unwrap(),
        ),
    );
    assert_eq!(live.until("one"), 200);
    std::fs::write(&secret, new).unwrap();
    let rotation = reload(&live, &with_credential, 1);
    std::fs::write(&rotated, "").unwrap();
    live.until("rotated");
    let removal = reload(&live, &without, 2);
    std::fs::write(&removed, "").unwrap();
    let out = live.finish();
    let ctx = || described(&out, &[&api]);

    assert_eq!(rotation["reason"], "policy-reloaded", "{}", ctx());
    assert_eq!(removal["reason"], "policy-reloaded", "{}", ctx());
    assert!(out.status.success(), "{}", ctx());
    assert_eq!(
        api.paths(),
        ["/v1/one", "/last-credential", "/last-credential"],
        "{}",
        ctx()
    );
    assert_eq!(
        header(&api.requests()[0], "authorization"),
        [format!("Bearer {old}").as_str()],
        "{}",
        ctx()
    );
    // The upstream did send the retired secret back each time: neither answer was relayed
    // whole, both cuts were recorded, and neither request asked for compression.
    for key in ["rotated", "removed"] {
        assert!(
            printed(&out, key).get("error").is_some(),
            "{key}\n{}",
            ctx()
        );
    }
    assert!(
        !out.stdout.contains(old),
        "the sandbox saw the retired secret\n{}",
        ctx()
    );
    let cuts = out
        .audit
        .iter()
        .filter(|r| {
            r["layer"] == "proxy"
                && r["verdict"] == "deny"
                && r["reason"] == "secret-in-response"
                && r["path"] == "/last-credential"
                && r["status"].is_null()
        })
        .count();
    assert_eq!(cuts, 2, "{}", ctx());
    for stored in &api.requests()[1..] {
        assert_eq!(header(stored, "accept-encoding"), ["identity"], "{}", ctx());
    }
    let log = std::fs::read_to_string(&run.audit).unwrap();
    for text in [&out.stderr, &log] {
        assert!(!text.contains(old) && !text.contains(new), "{}", ctx());
    }
}

/// A FIFO at the policy file's path (or a device: /dev/zero would never end) is not waited
/// on: the reload is refused at once, and the gateway still serves the sandbox and stops
/// on SIGTERM.
#[test]
fn a_fifo_as_the_policy_file_is_refused_at_once_and_sigterm_still_stops_run() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let good = tunnel_policy(
        "reload-fifo",
        &pki,
        &format!(
            "{}{API_CREDENTIAL}",
            rule("api.test", api.port, "credential = \"api\"")
        ),
    );
    let run = Run::new("reload-fifo", &good);
    let go = run.scratch.dir.join("go");
    let mut live = python(
        &run,
        &format!(
            r#"
say("ready", True)
wait_for({go:?})
say("a", status("https://api.test/v1/a"))
say("sleeping", True)
time.sleep(600)
"#,
            go = go.to_str().unwrap()
        ),
    );
    assert_eq!(live.until("ready"), true);
    let fifo = Fifo::replace(&run.policy);
    let sent = Instant::now();
    live.signal(libc::SIGHUP);
    let note = note_within(&live, 1, Duration::from_secs(10));
    let took = sent.elapsed();
    std::fs::write(&go, "").unwrap();
    assert_eq!(live.until("a"), 200, "{}", live.stderr());
    assert_eq!(live.until("sleeping"), true);
    live.signal(libc::SIGTERM);
    let out = live.finish_within(Duration::from_secs(20));
    drop(fifo);

    assert_reload_refused(&note, &out.stderr, "not a regular file");
    assert!(took < Duration::from_secs(5), "the refusal took {took:?}");
    // CMD ended by the SIGTERM the gateway passed on: 128 + 15.
    assert_eq!(out.status.code(), Some(143), "{}", out.describe());
    assert_eq!(api.paths(), ["/v1/a"], "{}", out.describe());
}

/// The policy file is the operator's: a reload must not put in force what the sandbox could
/// have written there itself. A file its user owns, or whose group it is in may write, or an
/// upstream CA file it owns, is refused on SIGHUP (with a warning at start), the old policy
/// staying in force; the same file only root may write goes through.
#[test]
fn a_policy_file_the_sandbox_user_may_write_is_not_reloaded() {
    use std::os::unix::fs::{PermissionsExt as _, chown};
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let good = tunnel_policy(
        "reload-writable",
        &pki,
        &format!(
            "{}{API_CREDENTIAL}",
            rule("api.test", api.port, "credential = \"api\"")
        ),
    );
    // What the sandbox would write there: a host its policy refuses.
    let opened = format!("{good}{}", rule("other.test", other.port, ""));
    let run = Run::new("reload-writable", &good);
    // Run's sandbox user is nobody (uid 65534, group 65534).
    chown(&run.policy, Some(65534), Some(65534)).unwrap();
    let refused_go = run.scratch.dir.join("refused");
    let go = run.scratch.dir.join("go");
    let mut live = python(
        &run,
        &format!(
            r#"
say("ready", True)
wait_for({refused_go:?})
say("b_refused", status("https://other.test/v1/refused"))
wait_for({go:?})
say("b_after", status("https://other.test/v1/after"))
"#,
            refused_go = refused_go.to_str().unwrap(),
            go = go.to_str().unwrap()
        ),
    );
    assert_eq!(live.until("ready"), true);
    let policy = run.policy.display().to_string();
    let started = live.stderr();
    let owned_note = reload(&live, &opened, 1);
    // Root's, but nobody's group may write it.
    chown(&run.policy, Some(0), Some(65534)).unwrap();
    std::fs::set_permissions(&run.policy, std::fs::Permissions::from_mode(0o664)).unwrap();
    let group_note = reload(&live, &opened, 2);
    // The policy file only root may write, but an upstream CA it names the sandbox's own.
    chown(&run.policy, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&run.policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    chown(&pki.ca, Some(65534), None).unwrap();
    let ca_note = reload(&live, &opened, 3);
    std::fs::write(&refused_go, "").unwrap();
    // The host the rewritten file opens stays closed (before the fix: 200).
    assert_eq!(live.until("b_refused"), 403, "{}", live.stderr());
    // Only root may write either: the same policy goes through.
    chown(&pki.ca, Some(0), None).unwrap();
    let ok_note = reload(&live, &opened, 4);
    std::fs::write(&go, "").unwrap();
    let out = live.finish();
    let ctx = || described(&out, &[&api, &other]);

    assert_reload_refused(
        &owned_note,
        &out.stderr,
        &format!("policy file {policy}: it is owned by uid 65534, the sandbox's user"),
    );
    assert_reload_refused(&owned_note, &out.stderr, "only root may write");
    assert_reload_refused(
        &group_note,
        &out.stderr,
        "group 65534, a group of the sandbox's user, may write it (mode 664)",
    );
    assert_reload_refused(
        &ca_note,
        &out.stderr,
        &format!(
            "[tls] upstream_ca {}: it is owned by uid 65534, the sandbox's user",
            pki.ca.display()
        ),
    );
    for part in [
        &format!("policy file {policy}"),
        "owned by uid 65534, the sandbox's user",
        "SIGHUP reloads of this file will be refused",
    ] {
        assert!(started.contains(part), "no {part:?} at start\n{started}");
    }
    assert_eq!(ok_note["reason"], "policy-reloaded", "{ok_note}\n{}", ctx());
    assert!(out.status.success(), "{}", ctx());
    assert_eq!(printed(&out, "b_after"), 200, "{}", ctx());
    assert_eq!(other.paths(), ["/v1/after"], "{}", ctx());
}
