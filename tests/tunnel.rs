//! The tunnel end to end: real clients (curl, git, python) inside a real sandbox, real TLS
//! upstreams on 127.0.0.1 (tests/fixtures), the real `gateway` binary as root. Each upstream
//! logs every request it receives, so "nothing reached it" is read from its log.

mod support;

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Child, ChildStdout, Command, Output, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use support::{live::Live, upstream::*, *};

/// Runs a shell script in the sandbox with the secret in the gateway's environment.
fn sh(run: &Run, script: &str) -> Finished {
    run.finish(
        run.command(&["sh", "-c", script])
            .env("API_TOKEN", SECRET)
            .output()
            .unwrap(),
    )
}

/// Runs python in the sandbox (support's PRELUDE first) with the secret in the gateway's
/// environment.
fn python(run: &Run, body: &str) -> Finished {
    let script = format!("{PRELUDE}\n{body}");
    run.finish(
        run.command(&["python3", "-c", &script])
            .env("API_TOKEN", SECRET)
            .output()
            .unwrap(),
    )
}

/// A run named `name` whose one rule sends api.test to the upstream on `port`, with
/// `rule_lines` (which name the `api` credential), and the credential itself.
fn api_run(name: &str, pki: &Pki, port: u16, rule_lines: &str) -> Run {
    let rules = rule("api.test", port, rule_lines);
    Run::new(
        name,
        &tunnel_policy(name, pki, &format!("{rules}{API_CREDENTIAL}")),
    )
}

// ---------------------------------------------------------------------------------------
// Reading results

/// The value a sandboxed python script printed under `key`.
fn printed<'a>(out: &'a Finished, key: &str) -> &'a Value {
    out.lines
        .iter()
        .find_map(|l| l.get(key))
        .unwrap_or_else(|| panic!("the script printed no `{key}`\n{}", out.describe()))
}

/// A proxy audit record with every field of DESIGN.md and the wanted values.
fn assert_proxy_record(out: &Finished, what: &str, want: &Value) {
    let want = want.as_object().unwrap();
    let found = proxy_records(out).into_iter().any(|r| {
        let complete = [
            "ts",
            "layer",
            "verdict",
            "sandbox",
            "reason",
            "method",
            "host",
            "port",
            "path",
            "status",
            "rule",
            "credential",
        ]
        .iter()
        .all(|k| r.get(*k).is_some());
        complete
            && r["ts"].as_str().is_some_and(|t| t.ends_with('Z'))
            && r["sandbox"].is_string()
            && want.iter().all(|(k, v)| &r[k.as_str()] == v)
    });
    assert!(
        found,
        "no proxy audit record for {what} with all fields and {}\n{}",
        Value::Object(want.clone()),
        out.describe()
    );
}

/// A deny record refusing a request with 403 because no rule matched.
fn assert_not_allowlisted(out: &Finished, method: &str, host: &str, port: u16, path: &str) {
    assert_proxy_record(
        out,
        &format!("{method} {host}:{port}{path}"),
        &json!({
            "verdict": "deny",
            "reason": "not-allowlisted",
            "method": method,
            "host": host,
            "port": port,
            "path": path,
            "status": 403,
            "rule": null,
            "credential": null,
        }),
    );
}

/// A refusal of a host without a rule may come at CONNECT (method CONNECT, no path) or on
/// the intercepted request inside it.
fn assert_host_refused(out: &Finished, host: &str, port: u16, reason: &str) {
    let found = proxy_records(out).into_iter().any(|r| {
        r["verdict"] == "deny"
            && r["reason"] == reason
            && r["host"] == host
            && r["port"] == port
            && r["status"] == 403
            && r.get("rule").is_some()
            && r.get("credential").is_some()
    });
    assert!(
        found,
        "no proxy deny record `{reason}` with status 403 for {host}:{port}\n{}",
        out.describe()
    );
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The forms the secret could leak in: itself, and base64 of it alone or as Basic auth.
fn secret_forms() -> Vec<String> {
    vec![
        SECRET.to_owned(),
        base64(SECRET.as_bytes()),
        base64(format!("x-access-token:{SECRET}").as_bytes()),
    ]
}

fn assert_no_secret(place: &str, text: &str) {
    for form in secret_forms() {
        assert!(
            !text.contains(&form),
            "the secret (as {form:?}) appears in {place}:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn base64_matches_rfc4648() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(
        base64(b"x-access-token:tok123"),
        "eC1hY2Nlc3MtdG9rZW46dG9rMTIz"
    );
}

#[test]
fn curl_gets_the_credential_injected_and_a_forged_one_replaced() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run(
        "tunnel-curl",
        &pki,
        api.port,
        "methods = [\"GET\", \"POST\"]\npaths = [\"/v1/**\", \"/redirect\"]\ncredential = \"api\"",
    );
    let out = sh(
        &run,
        &format!(
            "{CURL}
r plain https://api.test/v1/items?limit=1
r forged -H 'Authorization: Bearer forged-by-the-agent' https://api.test/v1/forged
r connection -H 'Connection: authorization, accept-encoding' https://api.test/v1/connection
r post -X POST -H 'Expect: 100-continue' --data-binary hello https://api.test/v1/post
r redirect https://api.test/redirect
r both-lengths https://api.test/v1/both-lengths
"
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api]);
    for name in ["plain", "forged", "connection", "post"] {
        assert_eq!(reply(&replies, name, &out).code, 200, "{name}\n{}", ctx());
    }
    // An answer framed both ways is read by its chunks, and relayed with that length only.
    let both = reply(&replies, "both-lengths", &out);
    assert_eq!(
        (both.code, both.exit, both.body.trim()),
        (200, 0, "ok"),
        "{}",
        ctx()
    );
    let echo: Value = serde_json::from_str(&reply(&replies, "plain", &out).body).unwrap();
    assert_eq!(echo["path"], "/v1/items?limit=1", "{}", ctx());

    let requests = api.requests();
    let paths: Vec<_> = requests.iter().map(|r| r["path"].clone()).collect();
    assert_eq!(
        paths,
        [
            json!("/v1/items?limit=1"),
            json!("/v1/forged"),
            json!("/v1/connection"),
            json!("/v1/post"),
            json!("/redirect"),
            json!("/v1/both-lengths")
        ],
        "the tunnel must not follow the redirect to /landing\n{}",
        ctx()
    );
    let bearer = format!("Bearer {SECRET}");
    for r in &requests {
        assert_eq!(header(r, "authorization"), [bearer.as_str()], "{r}");
        assert!(
            all_header_values(r)
                .iter()
                .all(|v| !v.contains("forged-by-the-agent")),
            "the agent's Authorization was forwarded: {r}"
        );
        let host = header(r, "host");
        assert!(
            host == ["api.test"] || host == ["api.test:443"],
            "Host sent upstream: {host:?}"
        );
    }
    // A `Connection` naming the tunnel's own headers took neither off.
    assert_eq!(
        header(&requests[2], "accept-encoding"),
        ["identity"],
        "{}",
        ctx()
    );
    assert_eq!(requests[3]["method"], "POST");
    assert_eq!(requests[3]["body_len"], 5);
    // The tunnel answers `100 Continue` itself and sends the body at once: an upstream
    // answering the expectation early would take the body for a request of its own.
    assert!(header(&requests[3], "expect").is_empty(), "{}", ctx());

    let redirect = reply(&replies, "redirect", &out);
    assert_eq!(redirect.code, 302, "{}", ctx());

    let allowed = proxy_records(&out).into_iter().any(|r| {
        r["verdict"] == "allow"
            && r["method"] == "GET"
            && r["host"] == "api.test"
            && r["port"] == 443
            && r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/v1/items"))
            && r["rule"] == 0
            && r["credential"] == "api"
    });
    assert!(allowed, "no allow record for GET /v1/items\n{}", ctx());
}

#[test]
fn wrong_method_wrong_path_and_unlisted_hosts_get_403_and_reach_nothing() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    // Listens, but no rule names it: a request that reached it was let through.
    let other = Server::upstream(&pki, "other");
    let run = api_run(
        "tunnel-deny",
        &pki,
        api.port,
        "methods = [\"GET\"]\npaths = [\"/v1/**\"]\ncredential = \"api\"",
    );
    let out = sh(
        &run,
        &format!(
            "{CURL}
r allowed https://api.test/v1/items
r wrong-method -X DELETE https://api.test/v1/items
r wrong-path https://api.test/admin/users
r unlisted https://other.test/v1/items
r unlisted-local https://localhost:{p}/v1/items
",
            p = other.port
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api, &other]);
    assert_eq!(reply(&replies, "allowed", &out).code, 200, "{}", ctx());
    for name in ["wrong-method", "wrong-path", "unlisted", "unlisted-local"] {
        let r = reply(&replies, name, &out);
        assert!(r.forbidden(), "{name}: {r:?}\n{}", ctx());
    }
    assert_eq!(api.paths(), ["/v1/items"], "{}", ctx());
    assert_eq!(api.requests()[0]["method"], "GET");
    assert!(other.requests().is_empty(), "{}", ctx());

    assert_not_allowlisted(&out, "DELETE", "api.test", 443, "/v1/items");
    assert_not_allowlisted(&out, "GET", "api.test", 443, "/admin/users");
    assert_host_refused(&out, "other.test", 443, "not-allowlisted");
    assert_host_refused(&out, "localhost", other.port, "not-allowlisted");
}

/// A path is let through only if the rule matches it however the upstream reads it: as
/// sent, with `%2F` as `/` (Flask and Django decode it before routing), without `;`
/// parameters (Tomcat, Jetty). Headers that make a framework take another method or path
/// are refused outright. Nothing refused reaches either upstream.
#[test]
fn encoded_slashes_path_parameters_and_override_headers_cannot_widen_a_rule() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let body = format!(
        "{}{}",
        rule(
            "api.test",
            api.port,
            "paths = [\"/v1/*\", \"/files/*.json\", \"/npm/@scope%2f*\", \"/v2/*/info\"]"
        ),
        rule("other.test", other.port, "paths = [\"/v1/**\"]"),
    );
    let run = Run::new(
        "tunnel-path-forms",
        &tunnel_policy("tunnel-path-forms", &pki, &body),
    );
    let out = sh(
        &run,
        &format!(
            "{CURL}
r one-segment --path-as-is https://api.test/v1/items
r slash-under-star --path-as-is https://api.test/v1/admin%2Fdelete_all
r slash-under-globstar --path-as-is https://other.test/v1/admin%2Fdelete_all
r scoped --path-as-is https://api.test/npm/@scope%2fname
r scoped-deeper --path-as-is https://api.test/npm/@scope%2fname%2fx
r json --path-as-is https://api.test/files/report.json
r params --path-as-is 'https://api.test/files/secret;.json'
r triple-encoded-dots --path-as-is https://other.test/v1/%25252e%25252e/admin
r encoded-params-dots --path-as-is https://other.test/v1/..%3b/admin
r overlong-dots --path-as-is https://other.test/v1/%c0%ae%c0%ae/admin
r escaped-hex-slash --path-as-is https://api.test/v1/admin%25%32%46delete_all
r escaped-hex-dots --path-as-is https://other.test/v1/%25%32%65%25%32%65
r method-override -H 'X-HTTP-Method-Override: DELETE' https://api.test/v1/override
r method-override-same -H 'X-HTTP-Method-Override: GET' https://api.test/v1/same
r x-http-method -H 'X-HTTP-Method: DELETE' https://api.test/v1/x-http-method
r x-method-override -H 'X-Method-Override: PUT' https://api.test/v1/x-method-override
r original-url -H 'X-Original-URL: /admin' https://api.test/v1/original
r rewrite-url -H 'X-Rewrite-URL: /admin' https://api.test/v1/rewrite
r original-method -H 'X-Original-Method: DELETE' https://api.test/v1/original-method
r underscore-override -H 'X_HTTP_Method_Override: DELETE' https://api.test/v1/underscore
r method-parameter 'https://api.test/v1/method-parameter?a=1&%5Fmethod=DELETE'
r method-parameter-same 'https://api.test/v1/method-parameter-same?_method=get'
r iis-escape --path-as-is https://other.test/v1/%u002e%u002e/admin
r fullwidth-slash --path-as-is https://api.test/v1/admin%ef%bc%8fdelete_all
r fullwidth-dots --path-as-is https://other.test/v1/%ef%bc%8e%ef%bc%8e/admin
r empty-segment --path-as-is https://api.test/v2//info
r empty-params-segment --path-as-is 'https://api.test/v2/;x/info'
r double-slash-under-globstar --path-as-is https://other.test/v1//deeper
r encoded-question-mark --path-as-is https://api.test/files/secret%3f.json
r encoded-hash --path-as-is https://api.test/files/secret%2523.json
r encoded-line-break --path-as-is 'https://other.test/v1/x%0d%0aX-Injected:%20yes'
"
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api, &other]);
    let code = |name: &str| reply(&replies, name, &out).code;
    for name in [
        "one-segment",
        "slash-under-globstar",
        "scoped",
        "json",
        "method-override-same",
        "method-parameter-same",
        "double-slash-under-globstar",
    ] {
        assert_eq!(code(name), 200, "{name}\n{}", ctx());
    }
    for name in [
        "slash-under-star",
        "scoped-deeper",
        "params",
        "empty-segment",
        "empty-params-segment",
    ] {
        assert_eq!(code(name), 403, "{name}\n{}", ctx());
    }
    for name in [
        "triple-encoded-dots",
        "encoded-params-dots",
        "overlong-dots",
        "escaped-hex-slash",
        "escaped-hex-dots",
        "method-override",
        "x-http-method",
        "x-method-override",
        "original-url",
        "rewrite-url",
        "original-method",
        "underscore-override",
        "method-parameter",
        "iis-escape",
        "fullwidth-slash",
        "fullwidth-dots",
        "encoded-question-mark",
        "encoded-hash",
        "encoded-line-break",
    ] {
        assert_eq!(code(name), 400, "{name}\n{}", ctx());
    }
    assert_eq!(
        api.paths(),
        [
            "/v1/items",
            "/npm/@scope%2fname",
            "/files/report.json",
            "/v1/same",
            "/v1/method-parameter-same?_method=get"
        ],
        "{}",
        ctx()
    );
    assert_eq!(
        other.paths(),
        ["/v1/admin%2Fdelete_all", "/v1//deeper"],
        "{}",
        ctx()
    );

    assert_not_allowlisted(&out, "GET", "api.test", 443, "/v1/admin%2Fdelete_all");
    assert_not_allowlisted(&out, "GET", "api.test", 443, "/npm/@scope%2fname%2fx");
    assert_not_allowlisted(&out, "GET", "api.test", 443, "/files/secret;.json");
    assert_not_allowlisted(&out, "GET", "api.test", 443, "/v2//info");
    assert_not_allowlisted(&out, "GET", "api.test", 443, "/v2/;x/info");
    for path in [
        "/v1/override",
        "/v1/x-http-method",
        "/v1/x-method-override",
        "/v1/original",
        "/v1/rewrite",
        "/v1/original-method",
    ] {
        let records: Vec<&Value> = proxy_records(&out)
            .into_iter()
            .filter(|r| r["path"] == path)
            .collect();
        assert_eq!(records.len(), 1, "{path}: one record\n{}", ctx());
        assert_proxy_record(
            &out,
            path,
            &json!({
                "verdict": "deny",
                "reason": "override-header",
                "method": "GET",
                "host": "api.test",
                "path": path,
                "status": 400,
                "rule": null,
            }),
        );
    }
    for (host, path, reason) in [
        (
            "api.test",
            "/v1/method-parameter?a=1&%5Fmethod=DELETE",
            "override-parameter",
        ),
        ("other.test", "/v1/%u002e%u002e/admin", "unicode-escape"),
        ("api.test", "/v1/underscore", "underscore-in-header-name"),
        (
            "api.test",
            "/v1/admin%ef%bc%8fdelete_all",
            "lookalike-path-separator",
        ),
        (
            "other.test",
            "/v1/%ef%bc%8e%ef%bc%8e/admin",
            "lookalike-path-separator",
        ),
        (
            "api.test",
            "/files/secret%3f.json",
            "encoded-path-delimiter",
        ),
        (
            "api.test",
            "/files/secret%2523.json",
            "encoded-path-delimiter",
        ),
        (
            "other.test",
            "/v1/x%0d%0aX-Injected:%20yes",
            "encoded-control-character",
        ),
    ] {
        assert_proxy_record(
            &out,
            path,
            &json!({
                "verdict": "deny",
                "reason": reason,
                "method": "GET",
                "host": host,
                "path": path,
                "status": 400,
            }),
        );
    }
}

/// Headers that tell an upstream which host, scheme, prefix or client a request came
/// through are the client's own here: an upstream trusting them (a proxy-fix middleware)
/// would route by a host or prefix no rule judged, or take the sandbox for a local
/// address. None of them leaves.
#[test]
fn forwarding_headers_from_the_sandbox_never_reach_the_upstream() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-forwarded", &pki, api.port, "credential = \"api\"");
    let out = sh(
        &run,
        &format!(
            "{CURL}
r forwarded -H 'X-Forwarded-Host: admin.test' -H 'X-Forwarded-Prefix: /admin' -H 'X-Forwarded-Proto: http' -H 'X-Forwarded-For: 127.0.0.1' -H 'Forwarded: host=admin.test;for=127.0.0.1' -H 'X-Real-IP: 127.0.0.1' -H 'X-Kept: yes' https://api.test/v1/forwarded
"
        ),
    );
    let ctx = || described(&out, &[&api]);
    assert_eq!(
        reply(&replies(&out.stdout), "forwarded", &out).code,
        200,
        "{}",
        ctx()
    );
    let requests = api.requests();
    assert_eq!(requests.len(), 1, "{}", ctx());
    for name in [
        "x-forwarded-host",
        "x-forwarded-prefix",
        "x-forwarded-proto",
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(header(&requests[0], name).is_empty(), "{name}\n{}", ctx());
    }
    assert_eq!(header(&requests[0], "x-kept"), ["yes"], "{}", ctx());
}

/// A rule allowing POST does not let a body's `_method=DELETE` through (Rails, Laravel and
/// Express take it as the real method): the chunk naming it never leaves, the request is
/// aborted and refused 400. A field whose value only mentions it, and a file that quotes
/// it, pass; a compressed form is refused before it leaves.
#[test]
fn a_method_named_in_a_form_body_is_refused() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = Run::new(
        "tunnel-form-method",
        &tunnel_policy(
            "tunnel-form-method",
            &pki,
            &rule(
                "api.test",
                api.port,
                "methods = [\"POST\"]\npaths = [\"/v1/**\"]",
            ),
        ),
    );
    let out = sh(
        &run,
        &format!(
            "{CURL}
r urlencoded --data 'title=x&_method=DELETE' https://api.test/v1/urlencoded
r encoded-name --data 'title=x&%5Fmethod=DELETE' https://api.test/v1/encoded-name
r multipart -F title=x -F _method=DELETE https://api.test/v1/multipart
r mentioned --data 'title=_method%3DDELETE' https://api.test/v1/mentioned
r json -H 'Content-Type: application/json' --data '{{\"_method\":\"DELETE\"}}' https://api.test/v1/json
r untyped -H 'Content-Type:' --data '.method=DELETE' https://api.test/v1/untyped
printf '<input type=\"hidden\" name=\"_method\" value=\"delete\">' > /tmp/view.erb
r file -F title=x -F file=@/tmp/view.erb https://api.test/v1/file
printf 'title=x&_method=DELETE' | gzip > /tmp/form.gz
r gzipped -H 'Content-Encoding: gzip' --data-binary @/tmp/form.gz https://api.test/v1/gzipped
printf '{{\"audit\":true}}' | gzip > /tmp/audit.gz
r gzipped-json -H 'Content-Type: application/json' -H 'Content-Encoding: gzip' --data-binary @/tmp/audit.gz https://api.test/v1/gzipped-json
r two-types -H 'Content-Type: text/plain' -H 'Content-Type: application/json' --data '{{\"_method\":\"DELETE\"}}' https://api.test/v1/two-types
"
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api]);
    let code = |name: &str| reply(&replies, name, &out).code;
    // npm sends its audits as gzipped JSON: not a form, so it passes.
    for name in ["mentioned", "file", "gzipped-json"] {
        assert_eq!(code(name), 200, "{name}\n{}", ctx());
    }
    for name in ["urlencoded", "encoded-name", "multipart", "json", "untyped"] {
        assert_eq!(code(name), 400, "{name}\n{}", ctx());
        let path = format!("/v1/{name}");
        assert_proxy_record(
            &out,
            &path,
            &json!({
                "verdict": "deny",
                "reason": "override-parameter",
                "method": "POST",
                "host": "api.test",
                "path": path,
                "status": 400,
                "rule": 0,
            }),
        );
    }
    assert_eq!(code("gzipped"), 400, "{}", ctx());
    assert_eq!(code("two-types"), 400, "{}", ctx());
    assert_proxy_record(
        &out,
        "/v1/two-types",
        &json!({"verdict": "deny", "reason": "duplicate-content-type", "path": "/v1/two-types", "status": 400}),
    );
    assert_proxy_record(
        &out,
        "/v1/gzipped",
        &json!({"verdict": "deny", "reason": "encoded-request-body", "path": "/v1/gzipped", "status": 400}),
    );
    assert_eq!(
        api.paths(),
        ["/v1/mentioned", "/v1/file", "/v1/gzipped-json"],
        "{}",
        ctx()
    );
}

#[test]
fn git_clones_over_https_with_the_token_injected() {
    let pki = Pki::new();
    let repos = pki.scratch.dir.join("repos");
    let work = pki.scratch.dir.join("work");
    let git = |args: &[&str], dir: &Path| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=gateway test",
                "-c",
                "user.email=test@gateway.test",
            ])
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    std::fs::create_dir_all(&repos).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    git(&["init", "-q", "--bare", "-b", "main", "demo.git"], &repos);
    git(&["init", "-q", "-b", "main"], &work);
    std::fs::write(work.join("README"), "cloned through the tunnel\n").unwrap();
    git(&["add", "README"], &work);
    git(&["commit", "-q", "-m", "first"], &work);
    git(
        &[
            "push",
            "-q",
            repos.join("demo.git").to_str().unwrap(),
            "main",
        ],
        &work,
    );

    let server = Server::git(&pki, &repos, SECRET);
    // Without the token the server refuses: a clone that works got it from the tunnel.
    let direct = pki
        .direct_curl("git.test", server.port)
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!(
            "https://git.test:{}/demo.git/info/refs?service=git-upload-pack",
            server.port
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&direct.stdout), "401", "{direct:?}");
    let before = server.requests().len();

    let rules = rule("git.test", server.port, "credential = \"git\"");
    let credential = "[credentials.git]\nenv = \"GIT_TOKEN\"\nbasic_user = \"x-access-token\"\n";
    let run = Run::new(
        "tunnel-git",
        &tunnel_policy("tunnel-git", &pki, &format!("{rules}{credential}")),
    );
    let home = run.scratch.dir.join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let script = format!(
        r#"export HOME={home:?} GIT_TERMINAL_PROMPT=0
cd "$HOME"
git clone -q https://git.test/demo.git demo
echo "git-exit $?"
cat demo/README
echo "--- env"
env
"#,
        home = home.to_str().unwrap()
    );
    let out = run.finish(
        run.command(&["sh", "-c", &script])
            .env("GIT_TOKEN", SECRET)
            .output()
            .unwrap(),
    );
    let ctx = || described(&out, &[&server]);
    assert!(out.stdout.contains("git-exit 0\n"), "{}", ctx());
    assert!(
        out.stdout.contains("cloned through the tunnel"),
        "{}",
        ctx()
    );
    let requests = server.requests().split_off(before);
    assert!(
        requests
            .iter()
            .any(|r| r["method"] == "POST" && r["path"] == "/demo.git/git-upload-pack"),
        "{}",
        ctx()
    );
    let basic = format!(
        "Basic {}",
        base64(format!("x-access-token:{SECRET}").as_bytes())
    );
    for r in &requests {
        assert_eq!(r["status"], 200, "{r}\n{}", ctx());
        assert_eq!(header(r, "authorization"), [basic.as_str()], "{r}");
    }
    assert!(!out.stdout.contains("GIT_TOKEN="), "{}", out.stdout);
    assert_no_secret("the sandbox's output and environment", &out.stdout);
    assert_no_secret("the gateway's stderr", &out.stderr);
}

#[test]
fn python_urllib_goes_through_the_tunnel() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run(
        "tunnel-python",
        &pki,
        api.port,
        "paths = [\"/v1/**\"]\ncredential = \"api\"",
    );
    let out = python(
        &run,
        r#"
import urllib.request, urllib.error
print(json.dumps({"proxies": urllib.request.getproxies()}), flush=True)
req = urllib.request.Request("https://api.test/v1/py?q=1", data=b"from-python", method="POST",
                             headers={"Content-Type": "text/plain"})
with urllib.request.urlopen(req, timeout=20) as resp:
    print(json.dumps({"status": resp.status, "echo": json.loads(resp.read())}), flush=True)
try:
    urllib.request.urlopen("https://api.test/admin", timeout=20)
    print(json.dumps({"denied": 200}), flush=True)
except urllib.error.HTTPError as e:
    print(json.dumps({"denied": e.code}), flush=True)
"#,
    );
    let ctx = || described(&out, &[&api]);
    assert_eq!(printed(&out, "status"), 200, "{}", ctx());
    let echo = printed(&out, "echo");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], "from-python");
    assert_eq!(printed(&out, "denied"), 403, "{}", ctx());
    let requests = api.requests();
    assert_eq!(api.paths(), ["/v1/py?q=1"], "{}", ctx());
    assert_eq!(
        header(&requests[0], "authorization"),
        [format!("Bearer {SECRET}").as_str()]
    );
    assert_eq!(requests[0]["body_len"], 11);
}

/// Node has no proxy support of its own (before NODE_USE_ENV_PROXY); libraries such as
/// https-proxy-agent do what this script does: CONNECT, then TLS over that socket, trusting
/// the CA bundle `run` names in NODE_EXTRA_CA_CERTS.
const NODE_CLIENT: &str = r#"
const http = require("http"), https = require("https"), tls = require("tls");
const proxy = new URL(process.env.HTTPS_PROXY);
function request(method, host, path, body) {
  return new Promise((resolve) => {
    const connect = http.request({ host: proxy.hostname, port: proxy.port, method: "CONNECT",
                                   path: host + ":443", headers: { host: host + ":443" } });
    connect.on("connect", (res, socket) => {
      if (res.statusCode !== 200) { socket.destroy(); return resolve({ connect: res.statusCode }); }
      // With createConnection node uses no agent, so it must be told the port (else 80).
      const req = https.request({ host, port: 443, path, method, headers: { "content-type": "application/json" },
        createConnection: () => tls.connect({ socket, servername: host }) }, (resp) => {
          let data = "";
          resp.on("data", (c) => (data += c));
          resp.on("end", () => resolve({ status: resp.statusCode, body: data }));
        });
      req.on("error", (e) => resolve({ error: String(e) }));
      req.end(body);
    });
    connect.on("error", (e) => resolve({ error: String(e) }));
    connect.end();
  });
}
(async () => {
  const ok = await request("POST", "api.test", "/v1/node", JSON.stringify({ from: "node" }));
  console.log(JSON.stringify({ ok }));
  const denied = await request("GET", "api.test", "/admin");
  console.log(JSON.stringify({ denied }));
  const unlisted = await request("GET", "other.test", "/v1/node");
  console.log(JSON.stringify({ unlisted }));
})();
"#;

#[test]
fn node_goes_through_the_tunnel_trusting_the_ca_bundle() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run(
        "tunnel-node",
        &pki,
        api.port,
        "paths = [\"/v1/**\"]\ncredential = \"api\"",
    );
    let out = run.finish(
        run.command(&["node", "-e", NODE_CLIENT])
            .env("API_TOKEN", SECRET)
            .output()
            .unwrap(),
    );
    let ctx = || described(&out, &[&api]);
    let ok = printed(&out, "ok");
    assert_eq!(ok["status"], 200, "{}", ctx());
    let echo: Value = serde_json::from_str(ok["body"].as_str().unwrap()).unwrap();
    assert_eq!(echo["method"], "POST", "{}", ctx());
    assert_eq!(echo["body"], r#"{"from":"node"}"#, "{}", ctx());
    assert_eq!(printed(&out, "denied")["status"], 403, "{}", ctx());
    assert_eq!(printed(&out, "unlisted")["connect"], 403, "{}", ctx());
    assert_eq!(api.paths(), ["/v1/node"], "{}", ctx());
    assert_eq!(
        header(&api.requests()[0], "authorization"),
        [format!("Bearer {SECRET}").as_str()]
    );
    assert_not_allowlisted(&out, "GET", "api.test", 443, "/admin");
}

#[test]
fn server_sent_events_arrive_one_by_one() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-sse", &pki, api.port, "credential = \"api\"");
    // The upstream sends `second` only after /release, which the client requests only after
    // it read `first`: a tunnel that buffers the stream makes the first read time out.
    let out = python(
        &run,
        &format!(
            "{SSE_EVENTS}{}",
            r#"
import urllib.request
resp = urllib.request.urlopen("https://api.test/sse", timeout=10)
print(json.dumps({"step": "open", "status": resp.status,
                  "type": resp.headers.get("Content-Type")}), flush=True)
print(json.dumps({"step": "event", "data": next_event(resp)}), flush=True)
with urllib.request.urlopen("https://api.test/release", timeout=10) as rel:
    print(json.dumps({"step": "release", "status": rel.status}), flush=True)
print(json.dumps({"step": "event", "data": next_event(resp)}), flush=True)
"#
        ),
    );
    let ctx = || described(&out, &[&api]);
    let steps: Vec<&Value> = out
        .lines
        .iter()
        .filter(|l| l.get("step").is_some())
        .collect();
    assert_eq!(steps.len(), 4, "{}", ctx());
    assert_eq!(steps[0]["status"], 200, "{}", ctx());
    assert!(
        steps[0]["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{}",
        ctx()
    );
    assert_eq!(steps[1]["data"], "first", "{}", ctx());
    assert_eq!(steps[2]["status"], 200, "{}", ctx());
    assert_eq!(steps[3]["data"], "second", "{}", ctx());
    assert_eq!(api.paths(), ["/sse", "/release"], "{}", ctx());
}

/// Python: `connected(host)`, a socket through the tunnel's CONNECT to `host:443`, before any
/// TLS, and the status line of the CONNECT's answer.
const CONNECTED: &str = r#"
def connected(host):
    s = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT), timeout=10)
    s.sendall(("CONNECT %s:443 HTTP/1.1\r\nHost: %s:443\r\n\r\n" % (host, host)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    return s, head.decode(errors="replace").split("\r\n")[0]
"#;

/// An upstream that sends the credential back, in a header or in the body, would hand the
/// sandbox the secret: a header is refused (502) before anything is relayed, a body is cut
/// before the chunk that carries it. Both are recorded.
/// A host the credential is sent to may hand it back to any request, through a rule with no
/// credential or another name routed to the same upstream: every answer is checked for
/// every secret of the policy.
#[test]
fn a_stored_secret_never_reaches_the_sandbox_through_another_rule() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let rules = format!(
        "{}{}{}",
        rule(
            "api.test",
            api.port,
            "paths = [\"/v1/**\"]\ncredential = \"api\""
        ),
        rule(
            "api.test",
            api.port,
            "paths = [\"/public/**\", \"/last-credential\"]"
        ),
        rule("other.test", api.port, ""),
    );
    let run = Run::new(
        "tunnel-stored-echo",
        &tunnel_policy(
            "tunnel-stored-echo",
            &pki,
            &format!("{rules}{API_CREDENTIAL}"),
        ),
    );
    let out = sh(
        &run,
        &format!(
            "{CURL}
r store https://api.test/v1/store
r same-host https://api.test/last-credential
r other-host https://other.test/last-credential
r other-host-gzip --compressed 'https://other.test/last-credential?gzip'
r other-host-gzip-always --compressed 'https://other.test/last-credential?gzip-always'
r plain https://other.test/v1/plain
"
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api]);
    assert_eq!(reply(&replies, "store", &out).code, 200, "{}", ctx());
    assert_eq!(reply(&replies, "plain", &out).code, 200, "{}", ctx());
    // Asked for compression, the upstream is told not to: cut as the others; compressed
    // anyway, it is read decoded and cut too.
    for name in [
        "same-host",
        "other-host",
        "other-host-gzip",
        "other-host-gzip-always",
    ] {
        assert_ne!(reply(&replies, name, &out).exit, 0, "{name}\n{}", ctx());
    }
    assert!(
        !out.stdout.contains(SECRET) && !out.stderr.contains(SECRET),
        "the sandbox saw the secret\n{}",
        ctx()
    );
    for host in ["api.test", "other.test"] {
        assert_proxy_record(
            &out,
            host,
            &json!({
                "verdict": "deny",
                "reason": "secret-in-response",
                "host": host,
                "path": "/last-credential",
                "status": null,
                "credential": null,
            }),
        );
    }
}

#[test]
fn an_upstream_echoing_the_secret_never_reaches_the_sandbox() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-echo", &pki, api.port, "credential = \"api\"");
    let out = sh(
        &run,
        &format!(
            "{CURL}
r header https://api.test/echo-credential?in=header
r body https://api.test/echo-credential?in=body
r reason https://api.test/echo-credential?in=reason
r gzip --compressed https://api.test/echo-credential?in=gzip
r always --compressed https://api.test/echo-credential?in=gzip-always
r deflate --compressed https://api.test/echo-credential?in=deflate-always
r gzip-name https://api.test/echo-credential?in=gzip-name
r te-gzip --raw https://api.test/echo-credential?in=te-gzip
r plain https://api.test/v1/plain
"
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api]);
    assert_eq!(reply(&replies, "header", &out).code, 502, "{}", ctx());
    assert_ne!(reply(&replies, "body", &out).exit, 0, "{}", ctx());
    assert_eq!(reply(&replies, "reason", &out).code, 502, "{}", ctx());
    // Asked for no compression, the upstream sends the body as it is: cut as the plain one.
    assert_ne!(reply(&replies, "gzip", &out).exit, 0, "{}", ctx());
    // Compressed anyway, it is read decoded, and as the bytes are (the secret as the gzip
    // header's file name, which no decoder returns): cut as well.
    for name in ["always", "deflate", "gzip-name"] {
        assert_ne!(reply(&replies, name, &out).exit, 0, "{name}\n{}", ctx());
    }
    // A body whose transfer coding hyper does not take off (`gzip, chunked`) could not be
    // checked: not relayed.
    assert_eq!(reply(&replies, "te-gzip", &out).code, 502, "{}", ctx());
    assert_eq!(reply(&replies, "plain", &out).code, 200, "{}", ctx());
    // The upstream did send it back, each time.
    let echoed = api
        .paths()
        .iter()
        .filter(|p| p.starts_with("/echo-credential"))
        .count();
    assert_eq!(echoed, 8, "{}", ctx());
    assert!(
        !out.stdout.contains(SECRET) && !out.stderr.contains(SECRET),
        "the sandbox saw the secret\n{}",
        ctx()
    );
    for (what, path, reason) in [
        (
            "the echoing header",
            "/echo-credential?in=header",
            "secret-in-response",
        ),
        (
            "the echoing reason",
            "/echo-credential?in=reason",
            "secret-in-response",
        ),
        (
            "the transfer-coded body",
            "/echo-credential?in=te-gzip",
            "encoded-response",
        ),
    ] {
        // The request left with the credential, then its answer was refused.
        assert_proxy_record(
            &out,
            what,
            &json!({"verdict": "allow", "reason": "allowlisted", "path": path, "status": 200}),
        );
        assert_proxy_record(
            &out,
            what,
            &json!({"verdict": "deny", "reason": reason, "path": path, "status": 502}),
        );
    }
    for path in [
        "/echo-credential?in=body",
        "/echo-credential?in=gzip-always",
        "/echo-credential?in=deflate-always",
        "/echo-credential?in=gzip-name",
    ] {
        assert_proxy_record(
            &out,
            "the echoing body, cut after its answer was let through",
            &json!({"verdict": "deny", "reason": "secret-in-response", "path": path, "status": null}),
        );
    }
}

/// While the policy holds a credential, an answer content-encoded although the tunnel asked
/// for none (a stored object, a server that compresses anyway) is read decoded and relayed as
/// it came; one in a coding the tunnel cannot read is refused.
#[test]
fn a_compressed_answer_is_read_decoded_and_relayed_as_it_came() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-coded", &pki, api.port, "credential = \"api\"");
    let out = sh(
        &run,
        &format!(
            "{CURL}
r gzip --compressed https://api.test/compressed
r deflate --compressed 'https://api.test/compressed?deflate'
r saved -o /tmp/saved.gz https://api.test/compressed
echo \"unpacked: $(gzip -dc /tmp/saved.gz | head -c 20)\"
r br --compressed 'https://api.test/compressed?br'
"
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api]);
    for name in ["gzip", "deflate"] {
        let r = reply(&replies, name, &out);
        assert_eq!((r.code, r.exit), (200, 0), "{name}\n{}", ctx());
        assert!(r.body.contains(&"x".repeat(2000)), "{name}\n{}", ctx());
    }
    // Relayed as the upstream sent it: still gzip for a client that does not decode.
    assert_eq!(reply(&replies, "saved", &out).code, 200, "{}", ctx());
    assert!(
        out.stdout.contains("unpacked: {\"compressed\": \"xxx"),
        "{}",
        ctx()
    );
    assert_eq!(reply(&replies, "br", &out).code, 502, "{}", ctx());
    assert_proxy_record(
        &out,
        "the answer in a coding the tunnel cannot read",
        &json!({"verdict": "deny", "reason": "encoded-response", "path": "/compressed?br", "status": 502}),
    );
    let cut = proxy_records(&out)
        .into_iter()
        .filter(|r| r["verdict"] == "deny")
        .count();
    assert_eq!(cut, 1, "{}", ctx());
}

/// A body on a GET goes upstream on a connection closed after it: an upstream that ignores
/// such a body would otherwise read it as the next request, one no rule checked (here a
/// DELETE the policy refuses). A WebSocket handshake, whose connection stays open, may have
/// no body at all.
#[test]
fn a_get_body_cannot_smuggle_a_request_upstream() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run(
        "tunnel-get-body",
        &pki,
        api.port,
        "methods = [\"GET\"]\npaths = [\"/ignores-body\"]\ncredential = \"api\"",
    );
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
import ssl
t = ssl.create_default_context().wrap_socket(connected("api.test")[0], server_hostname="api.test")
smuggled = b"DELETE /smuggled HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\n\r\n"
t.settimeout(10)
def status_line():
    """The status line of the next answer, read whole (its body too), so the next read
    starts at the answer after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = t.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    length = next((int(l.split(":", 1)[1]) for l in lines[1:]
                   if l.lower().startswith("content-length:")), 0)
    while len(rest) < length:
        chunk = t.recv(65536)
        if not chunk:
            break
        rest += chunk
    return lines[0]
for _ in range(2):
    t.sendall(b"GET /ignores-body HTTP/1.1\r\nHost: api.test\r\nContent-Length: "
              + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
    print(json.dumps({{"answer": status_line()}}), flush=True)
# The same as a WebSocket handshake, whose connection would not be closed after it.
t.sendall(b"GET /ignores-body HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\n"
          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
          b"Sec-WebSocket-Version: 13\r\nContent-Length: "
          + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
print(json.dumps({{"upgrade": status_line()}}), flush=True)
# Time for the upstream to read whatever followed on its connections.
time.sleep(1)
"#
        ),
    );
    let ctx = || described(&out, &[&api]);
    let answers: Vec<&Value> = out.lines.iter().filter_map(|l| l.get("answer")).collect();
    assert_eq!(answers, ["HTTP/1.1 200 OK"; 2], "{}", ctx());
    assert_eq!(
        printed(&out, "upgrade"),
        "HTTP/1.1 400 Bad Request",
        "{}",
        ctx()
    );
    let requests = api.requests();
    let paths: Vec<&str> = requests.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(
        paths,
        ["/ignores-body", "/ignores-body"],
        "only the checked requests reach the upstream\n{}",
        ctx()
    );
    for r in &requests {
        assert_eq!(header(r, "connection"), ["close"], "{r}");
    }
}

/// A request let through leaves its record even when its client goes away before the
/// upstream answers, which makes hyper drop the request: the record has no status, since
/// none was relayed. The request did leave, with the credential attached.
#[test]
fn a_request_whose_client_left_before_the_answer_is_recorded() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-client-left", &pki, api.port, "credential = \"api\"");
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
import ssl, urllib.request
t = ssl.create_default_context().wrap_socket(connected("api.test")[0], server_hostname="api.test")
t.sendall(b"GET /held HTTP/1.1\r\nHost: api.test\r\n\r\n")
# Long enough for the request to reach the upstream, which holds it until /release.
time.sleep(1)
t.close()
time.sleep(0.5)
with urllib.request.urlopen("https://api.test/release", timeout=20) as rel:
    print(json.dumps({{"release": rel.status}}), flush=True)
"#
        ),
    );
    let ctx = || described(&out, &[&api]);
    assert_eq!(printed(&out, "release"), 200, "{}", ctx());
    assert_eq!(api.paths(), ["/held", "/release"], "{}", ctx());
    assert_eq!(
        header(&api.requests()[0], "authorization"),
        [format!("Bearer {SECRET}").as_str()],
        "{}",
        ctx()
    );
    assert_proxy_record(
        &out,
        "GET api.test/held, its client gone",
        &json!({
            "verdict": "allow",
            "reason": "allowlisted",
            "method": "GET",
            "host": "api.test",
            "port": 443,
            "path": "/held",
            "status": null,
            "rule": 0,
            "credential": "api",
        }),
    );
}

/// A sandbox client that does not trust the gateway's CA ends the intercepted session in
/// its handshake: nothing goes upstream, and the record says why the session carried
/// nothing.
#[test]
fn a_client_refusing_the_gateways_certificate_is_recorded() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-tls-refused", &pki, api.port, "credential = \"api\"");
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
import ssl
# Trusts only the upstreams' test CA, not the gateway's.
ctx = ssl.create_default_context(cafile={:?})
try:
    ctx.wrap_socket(connected("api.test")[0], server_hostname="api.test")
    print(json.dumps({{"handshake": "ok"}}), flush=True)
except ssl.SSLError as e:
    print(json.dumps({{"handshake": e.reason}}), flush=True)
time.sleep(0.3)
"#,
            pki.ca
        ),
    );
    let ctx = || described(&out, &[&api]);
    assert_eq!(
        printed(&out, "handshake"),
        "CERTIFICATE_VERIFY_FAILED",
        "{}",
        ctx()
    );
    assert!(api.requests().is_empty(), "{}", ctx());
    assert_proxy_record(
        &out,
        "the session whose handshake failed",
        &json!({
            "verdict": "deny",
            "reason": "client-tls-failed",
            "method": "CONNECT",
            "host": "api.test",
            "port": 443,
            "status": null,
        }),
    );
}

/// Once the audit log cannot be written (its disk is full), the tunnel lets nothing through:
/// every request gets 503 `audit-log-failed`, and only requests whose record could be
/// queued before the failure reached the upstream.
#[test]
fn a_full_audit_disk_stops_the_tunnel() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let mut run = api_run("tunnel-audit-full", &pki, api.port, "credential = \"api\"");
    let disk = SmallFs::mount(run.scratch.dir.join("auditfs"), "16k");
    run.audit = disk.0.join("audit.jsonl");
    let out = python(
        &run,
        &format!(
            r#"{STATUS}
statuses = [status("https://api.test/v1/n%d" % i) for i in range(150)]
print(json.dumps({{"statuses": statuses}}), flush=True)
"#
        ),
    );
    let ctx = || described(&out, &[&api]);
    let statuses: Vec<&Value> = printed(&out, "statuses")
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let answered = statuses.iter().take_while(|s| **s == 200).count();
    assert!(
        answered > 0 && answered < statuses.len(),
        "{answered} of {} requests answered before the disk filled\n{}",
        statuses.len(),
        ctx()
    );
    assert!(
        statuses[answered..].iter().all(|s| **s == 503),
        "after the first refusal every request is refused with 503: {statuses:?}\n{}",
        ctx()
    );
    assert_eq!(
        api.paths().len(),
        answered,
        "only the requests answered before the failure reached the upstream\n{}",
        ctx()
    );
    assert!(
        out.stderr.contains("cannot write the audit log"),
        "the gateway says why\n{}",
        ctx()
    );
    assert!(out.stderr.contains("run `gateway cleanup`"), "{}", ctx());
    disk.make_room_and_clean_up();
}

/// Python helpers for a WebSocket client over a socket: the HTTP head, masked text frames,
/// frames read back. After [`CONNECTED`].
const WS_CLIENT: &str = r#"
import ssl, base64, hashlib, struct
def read_head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1")
def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return data
def send_frame(s, opcode, payload, fin=True):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([opcode | (0x80 if fin else 0)])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
def send_text(s, text):
    send_frame(s, 0x1, text.encode())
def recv_frame(s):
    b0, b1 = recv_exact(s, 2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", recv_exact(s, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", recv_exact(s, 8))
    return {"opcode": b0 & 0x0F, "masked": bool(b1 & 0x80), "text": recv_exact(s, n).decode()}
def open_ws(host, extra="", path="/ws"):
    """CONNECT host:443 through the tunnel, TLS, then a WebSocket handshake for `path`:
    (the TLS socket, CONNECT's status line, the handshake's status line, whether
    Sec-WebSocket-Accept was right)."""
    s, connect = connected(host)
    t = ssl.create_default_context().wrap_socket(s, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    t.sendall(("GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: " + key + "\r\n"
               "Sec-WebSocket-Version: 13\r\n" + extra + "\r\n").encode())
    head = read_head(t)
    accept = [l.split(":", 1)[1].strip() for l in head.split("\r\n")
              if l.lower().startswith("sec-websocket-accept:")]
    expected = base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    return t, connect, head.split("\r\n")[0], accept == [expected]
"#;

#[test]
fn websocket_echo_through_connect() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-ws", &pki, api.port, "credential = \"api\"");
    let out = python(
        &run,
        &format!(
            r#"
{CONNECTED}{WS_CLIENT}
t, connect, handshake, accept_ok = open_ws("api.test")
print(json.dumps({{"connect": connect, "handshake": handshake, "accept_ok": accept_ok}}), flush=True)
long = "x" * 300
send_text(t, "hello through the tunnel")
print(json.dumps({{"echo1": recv_frame(t)}}), flush=True)
send_text(t, long)
print(json.dumps({{"echo2_ok": recv_frame(t)["text"] == long}}), flush=True)
"#
        ),
    );
    let ctx = || described(&out, &[&api]);
    assert_eq!(
        printed(&out, "connect")
            .as_str()
            .map(|l| l.split(' ').nth(1)),
        Some(Some("200")),
        "{}",
        ctx()
    );
    assert_eq!(
        printed(&out, "handshake")
            .as_str()
            .map(|l| l.split(' ').nth(1)),
        Some(Some("101")),
        "{}",
        ctx()
    );
    assert_eq!(printed(&out, "accept_ok"), true, "{}", ctx());
    let echo = printed(&out, "echo1");
    assert_eq!(echo["opcode"], 1, "{}", ctx());
    assert_eq!(echo["masked"], false, "{}", ctx());
    assert_eq!(echo["text"], "hello through the tunnel", "{}", ctx());
    assert_eq!(printed(&out, "echo2_ok"), true, "{}", ctx());
    let requests = api.requests();
    assert_eq!(api.paths(), ["/ws"], "{}", ctx());
    assert_eq!(
        header(&requests[0], "authorization"),
        [format!("Bearer {SECRET}").as_str()]
    );
}

/// An upstream that answers the handshake with a wrong Sec-WebSocket-Accept gets no pipe:
/// the client gets 502, and the record says the request was let through (it left,
/// credential attached), as for any upstream failure.
#[test]
fn a_wrong_websocket_accept_is_a_502_recorded_as_let_through() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-ws-accept", &pki, api.port, "credential = \"api\"");
    let out = python(
        &run,
        &format!(
            r#"
{CONNECTED}{WS_CLIENT}
t, connect, handshake, accept_ok = open_ws("api.test", path="/ws-bad-accept")
print(json.dumps({{"handshake": handshake}}), flush=True)
"#
        ),
    );
    let ctx = || described(&out, &[&api]);
    assert_eq!(
        printed(&out, "handshake")
            .as_str()
            .map(|l| l.split(' ').nth(1)),
        Some(Some("502")),
        "{}",
        ctx()
    );
    assert_eq!(api.paths(), ["/ws-bad-accept"], "{}", ctx());
    assert_proxy_record(
        &out,
        "GET /ws-bad-accept",
        &json!({
            "verdict": "allow",
            "reason": "bad-websocket-accept",
            "path": "/ws-bad-accept",
            "status": 502,
            "credential": "api",
        }),
    );
}

/// An upstream may send the credential back in a WebSocket message as in an answer: whole
/// in one frame, or split across two fragments of one message that arrive apart. Nothing of
/// it reaches the client (what came before it does), the connection is closed, and the cut
/// is recorded after the upgrade's record. Compression, which would hide it, is not offered
/// upstream.
#[test]
fn an_upstream_echoing_the_secret_over_a_websocket_never_reaches_the_sandbox() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-ws-echo", &pki, api.port, "credential = \"api\"");
    let out = python(
        &run,
        &format!(
            r#"
{CONNECTED}{WS_CLIENT}
for name, path in (("whole", "/ws-echo-credential"), ("split", "/ws-echo-credential?split")):
    t, connect, handshake, accept_ok = open_ws(
        "api.test", "Sec-WebSocket-Extensions: permessage-deflate\r\n", path=path)
    t.settimeout(10)
    received = b""
    try:
        while True:
            chunk = t.recv(4096)
            if not chunk:
                end = "closed"
                break
            received += chunk
    except TimeoutError:
        end = "timeout"
    except OSError:
        end = "closed"
    print(json.dumps({{name: {{"handshake": handshake, "accept_ok": accept_ok,
                              "received": received.decode("latin-1"), "end": end}}}}),
          flush=True)
"#
        ),
    );
    let ctx = || described(&out, &[&api]);
    assert_no_secret("the sandbox's output", &out.stdout);
    assert_no_secret("the sandbox's errors", &out.stderr);
    for (name, path) in [
        ("whole", "/ws-echo-credential"),
        ("split", "/ws-echo-credential?split"),
    ] {
        let seen = printed(&out, name);
        assert_eq!(
            seen["handshake"].as_str().map(|l| l.split(' ').nth(1)),
            Some(Some("101")),
            "{name}\n{}",
            ctx()
        );
        assert_eq!(seen["accept_ok"], true, "{name}\n{}", ctx());
        // The message before it came through as sent (a server frame, unmasked), and nothing
        // of the frame carrying the secret. Of a fragmented message, what came before the
        // secret may have gone: the first fragment's header (text, not final, 36 bytes) and
        // its text as far as the secret.
        let received = seen["received"].as_str().unwrap();
        let hello = "\u{81}\u{5}hello";
        let may_follow = if name == "whole" {
            ""
        } else {
            "\u{1}$your auth: Bearer "
        };
        assert!(
            received
                .strip_prefix(hello)
                .is_some_and(|rest| may_follow.starts_with(rest)),
            "{name}: {received:?}\n{}",
            ctx()
        );
        assert_eq!(seen["end"], "closed", "{name}\n{}", ctx());
        let records = proxy_records(&out);
        let at = |verdict: &str, reason: &str| {
            records
                .iter()
                .position(|r| r["verdict"] == verdict && r["reason"] == reason && r["path"] == path)
        };
        let (upgraded, cut) = (at("allow", "allowlisted"), at("deny", "secret-in-response"));
        assert!(
            upgraded.is_some() && cut.is_some() && upgraded < cut,
            "{name}: the upgrade's record, then the cut's\n{}",
            ctx()
        );
        assert_proxy_record(
            &out,
            &format!("the WebSocket message echoing the secret ({name})"),
            &json!({
                "verdict": "deny",
                "reason": "secret-in-response",
                "host": "api.test",
                "path": path,
                "status": null,
                "credential": "api",
            }),
        );
    }
    let requests = api.requests();
    assert_eq!(
        api.paths(),
        ["/ws-echo-credential", "/ws-echo-credential?split"],
        "{}",
        ctx()
    );
    for request in &requests {
        // The upstream did get the credential, and no offer of compression.
        assert_eq!(
            header(request, "authorization"),
            [format!("Bearer {SECRET}").as_str()]
        );
        assert!(
            header(request, "sec-websocket-extensions").is_empty(),
            "{}",
            ctx()
        );
    }
}

/// api.test, whose rule names the `api` credential (its placeholder in
/// `$API_TOKEN_PLACEHOLDER`), and other.test, whose rule names none, for a run named `name`.
fn placeholder_hosts(name: &str) -> (Pki, Server, Server, Run) {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let body = format!(
        "{}{}[credentials.api]\nenv = \"API_TOKEN\"\nplaceholder = \"API_TOKEN_PLACEHOLDER\"\n",
        rule("api.test", api.port, "credential = \"api\""),
        rule("other.test", other.port, ""),
    );
    let run = Run::new(name, &tunnel_policy(name, &pki, &body));
    (pki, api, other, run)
}

#[test]
fn a_placeholder_in_a_websocket_message_to_another_host_is_refused() {
    let (_pki, api, other, run) = placeholder_hosts("tunnel-ws-placeholder");
    let out = python(
        &run,
        &format!(
            r#"
{CONNECTED}{WS_CLIENT}
placeholder = os.environ["API_TOKEN_PLACEHOLDER"]
t, connect, handshake, accept_ok = open_ws(
    "other.test", "Sec-WebSocket-Extensions: permessage-deflate\r\n")
print(json.dumps({{"handshake": handshake, "accept_ok": accept_ok}}), flush=True)
send_text(t, "before")
print(json.dumps({{"echo": recv_frame(t)["text"]}}), flush=True)
send_text(t, "token=" + placeholder)
try:
    print(json.dumps({{"after": recv_frame(t)["text"]}}), flush=True)
except TimeoutError:
    print(json.dumps({{"after": "timeout"}}), flush=True)
except (EOFError, OSError):
    print(json.dumps({{"after": "closed"}}), flush=True)
"#
        ),
    );
    let ctx = || described(&out, &[&api, &other]);
    assert_eq!(
        printed(&out, "handshake")
            .as_str()
            .map(|l| l.split(' ').nth(1)),
        Some(Some("101")),
        "{}",
        ctx()
    );
    assert_eq!(printed(&out, "accept_ok"), true, "{}", ctx());
    assert_eq!(printed(&out, "echo"), "before", "{}", ctx());
    assert_eq!(printed(&out, "after"), "closed", "{}", ctx());
    // The frame carrying the placeholder never reached the host; the one before it did.
    assert_eq!(other.ws_frames(), ["before"], "{}", ctx());
    // Compression, which would hide a placeholder from the tunnel, was not offered upstream.
    let upgrade = &other.requests()[0];
    assert!(
        header(upgrade, "sec-websocket-extensions").is_empty(),
        "{}",
        ctx()
    );
    assert!(api.requests().is_empty(), "{}", ctx());
    assert_proxy_record(
        &out,
        "the WebSocket message with a placeholder",
        &json!({
            "verdict": "deny",
            "reason": "placeholder-to-unlisted-host",
            "host": "other.test",
            "port": 443,
            "path": "/ws",
            "status": null,
        }),
    );
    assert_no_secret("the sandbox's output", &out.stdout);
}

/// RFC 6455 lets a ping come between the fragments of a message, and the upstream joins
/// the fragments without it: a placeholder split around a ping is still seen whole.
#[test]
fn a_ping_between_fragments_does_not_hide_a_placeholder() {
    let (_pki, api, other, run) = placeholder_hosts("tunnel-ws-fragments");
    let out = python(
        &run,
        &format!(
            r#"
{CONNECTED}{WS_CLIENT}
placeholder = os.environ["API_TOKEN_PLACEHOLDER"]
t, connect, handshake, accept_ok = open_ws("other.test")
print(json.dumps({{"handshake": handshake, "tail": placeholder[10:]}}), flush=True)
send_frame(t, 0x1, ("token=" + placeholder[:10]).encode(), fin=False)
send_frame(t, 0x9, b"x")
send_frame(t, 0x0, placeholder[10:].encode())
t.settimeout(10)
try:
    while recv_frame(t):
        pass
except (EOFError, OSError):
    print(json.dumps({{"after": "closed"}}), flush=True)
"#
        ),
    );
    let ctx = || described(&out, &[&api, &other]);
    assert_eq!(
        printed(&out, "handshake")
            .as_str()
            .map(|l| l.split(' ').nth(1)),
        Some(Some("101")),
        "{}",
        ctx()
    );
    assert_eq!(printed(&out, "after"), "closed", "{}", ctx());
    let tail = printed(&out, "tail").as_str().unwrap().to_owned();
    let frames = other.ws_frames();
    assert!(
        frames.iter().all(|f| !f.contains(&tail)),
        "the fragment completing the placeholder reached the host: {frames:?}\n{}",
        ctx()
    );
    assert_proxy_record(
        &out,
        "the fragmented WebSocket message with a placeholder",
        &json!({
            "verdict": "deny",
            "reason": "placeholder-to-unlisted-host",
            "host": "other.test",
            "path": "/ws",
            "status": null,
        }),
    );
}

/// An upstream may answer before the body arrives. The tunnel still cuts the body at a
/// placeholder, and that refusal, which reaches no client, is recorded with no status,
/// after the record of the answer.
#[test]
fn a_body_cut_after_the_answer_is_recorded() {
    let (_pki, api, other, run) = placeholder_hosts("tunnel-late-cut");
    let out = python(
        &run,
        &format!(
            r#"
{CONNECTED}
import ssl
placeholder = os.environ["API_TOKEN_PLACEHOLDER"]
s, connect = connected("other.test")
t = ssl.create_default_context().wrap_socket(s, server_hostname="other.test")
body = ("token=" + placeholder + "&" + "x" * 100).encode()
t.sendall(b"POST /early HTTP/1.1\r\nHost: other.test\r\nContent-Length: "
          + str(len(body)).encode() + b"\r\n\r\n")
t.settimeout(10)
head = t.recv(4096).decode(errors="replace").split("\r\n")[0]
print(json.dumps({{"answer": head}}), flush=True)
t.sendall(body)
time.sleep(1)
"#
        ),
    );
    let ctx = || described(&out, &[&api, &other]);
    assert_eq!(printed(&out, "answer"), "HTTP/1.1 200 OK", "{}", ctx());
    assert_proxy_record(
        &out,
        "the answer to POST /early",
        &json!({"verdict": "allow", "path": "/early", "status": 200}),
    );
    assert_proxy_record(
        &out,
        "the body cut after the answer",
        &json!({
            "verdict": "deny",
            "reason": "placeholder-to-unlisted-host",
            "host": "other.test",
            "path": "/early",
            "status": null,
        }),
    );
    let order: Vec<&str> = proxy_records(&out)
        .into_iter()
        .filter(|r| r["path"] == "/early")
        .filter_map(|r| r["verdict"].as_str())
        .collect();
    assert_eq!(
        order,
        ["allow", "deny"],
        "the answer first, then the cut\n{}",
        ctx()
    );
    // The upstream saw the body cut off, never whole.
    let lens: Vec<i64> = other
        .requests()
        .iter()
        .filter(|r| r["path"] == "/early")
        .filter_map(|r| r["body_len"].as_i64())
        .collect();
    assert_eq!(lens, [-1], "{}", ctx());
}

#[test]
fn placeholder_works_toward_its_host_and_is_refused_elsewhere() {
    let (_pki, api, other, run) = placeholder_hosts("tunnel-placeholder");
    let out = sh(
        &run,
        &format!(
            r#"{CURL}
echo "placeholder=$API_TOKEN_PLACEHOLDER"
r api -H "Authorization: Bearer $API_TOKEN_PLACEHOLDER" https://api.test/v1/with-placeholder
r control https://other.test/v1/control
r leak -H "Authorization: Bearer $API_TOKEN_PLACEHOLDER" https://other.test/v1/leak
r leak-header -H "X-Token: $API_TOKEN_PLACEHOLDER" https://other.test/v1/leak-header
r leak-body -X POST --data "token=$API_TOKEN_PLACEHOLDER" https://other.test/v1/leak-body
r api-body -X POST --data "token=$API_TOKEN_PLACEHOLDER" https://api.test/v1/body
r api-echo -H "X-Token: $API_TOKEN_PLACEHOLDER" https://api.test/v1/echo
r leak-name -H "X-$API_TOKEN_PLACEHOLDER: 1" https://other.test/v1/leak-name
echo "--- env"
env
"#
        ),
    );
    let ctx = || described(&out, &[&api, &other]);
    let placeholder = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("placeholder="))
        .unwrap_or_default()
        .to_owned();
    assert!(
        !placeholder.is_empty(),
        "no placeholder in the sandbox\n{}",
        ctx()
    );
    assert!(!placeholder.contains(SECRET), "{}", ctx());
    assert!(
        out.stdout.lines().all(|l| !l.starts_with("API_TOKEN=")),
        "{}",
        ctx()
    );
    assert_no_secret("the sandbox's output and environment", &out.stdout);

    let replies = replies(&out.stdout);
    assert_eq!(reply(&replies, "api", &out).code, 200, "{}", ctx());
    assert_eq!(reply(&replies, "control", &out).code, 200, "{}", ctx());
    // Toward the credential's own host a body may carry the placeholder (it is not swapped).
    assert_eq!(reply(&replies, "api-body", &out).code, 200, "{}", ctx());
    // Nor is it in another header: an upstream echoing headers would show the secret.
    for name in ["leak", "leak-header", "leak-body", "leak-name", "api-echo"] {
        let r = reply(&replies, name, &out);
        assert!(r.forbidden(), "{name}: {r:?}\n{}", ctx());
    }
    let requests = api.requests();
    assert_eq!(
        api.paths(),
        ["/v1/with-placeholder", "/v1/body"],
        "{}",
        ctx()
    );
    assert_eq!(
        header(&requests[0], "authorization"),
        [format!("Bearer {SECRET}").as_str()],
        "{}",
        ctx()
    );
    assert!(
        all_header_values(&requests[0])
            .iter()
            .all(|v| !v.contains(&placeholder)),
        "the placeholder itself reached api.test\n{}",
        ctx()
    );
    assert_eq!(other.paths(), ["/v1/control"], "{}", ctx());
    assert_proxy_record(
        &out,
        "/v1/echo",
        &json!({
            "verdict": "deny",
            "reason": "placeholder-in-other-header",
            "host": "api.test",
            "path": "/v1/echo",
            "status": 403,
            "credential": "api",
        }),
    );
    for path in [
        "/v1/leak",
        "/v1/leak-header",
        "/v1/leak-body",
        "/v1/leak-name",
    ] {
        assert_proxy_record(
            &out,
            path,
            &json!({
                "verdict": "deny",
                "reason": "placeholder-to-unlisted-host",
                "host": "other.test",
                "port": 443,
                "path": path,
                "status": 403,
            }),
        );
    }
}

/// A placeholder is refused in a host name and in a method too, where the URI check did not
/// look: in a CONNECT target (it would leave in DNS, SNI and Host), in an absolute URI's
/// host spelled in upper case (the tunnel lowercases names, so it would leave as the
/// placeholder itself) and as the method; and percent-encoded in the URL, once or twice,
/// which an upstream decodes back. `*.wild.test` matches any such name.
#[test]
fn a_placeholder_in_a_host_name_a_method_or_encoded_in_the_url_is_refused() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let wild = Server::upstream(&pki, "wild");
    let plain = Server::spawn(&pki.scratch.dir, "plain", "upstream.py", &[]);
    let name = "tunnel-placeholder-names";
    let body = format!(
        "{}{}[[http.allow]]\nhost = \"*.wild.test\"\nport = 80\nconnect = \"127.0.0.1:{}\"\n\
         [credentials.api]\nenv = \"API_TOKEN\"\nplaceholder = \"API_TOKEN_PLACEHOLDER\"\n",
        rule("api.test", api.port, "credential = \"api\""),
        rule("*.wild.test", wild.port, ""),
        plain.port,
    );
    let run = Run::new(name, &tunnel_policy(name, &pki, &body));
    let out = python(
        &run,
        r#"
PH = os.environ["API_TOKEN_PLACEHOLDER"]
def status(payload):
    s = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT), timeout=10)
    s.sendall(payload.encode())
    head = s.recv(4096).decode(errors="replace")
    s.close()
    return head.split("\r\n")[0]
say = lambda k, v: print(json.dumps({k: v}), flush=True)
say("connect", status(f"CONNECT {PH}.wild.test:443 HTTP/1.1\r\nHost: {PH}.wild.test:443\r\n\r\n"))
up = PH.upper() + ".wild.test"
say("upper", status(f"GET http://{up}/upper HTTP/1.1\r\nHost: {up}\r\n\r\n"))
say("method", status(f"{PH} http://a.wild.test/method HTTP/1.1\r\nHost: a.wild.test\r\n\r\n"))
say("encoded", status(f"GET http://a.wild.test/e?t=%67{PH[1:]} HTTP/1.1\r\nHost: a.wild.test\r\n\r\n"))
say("twice", status(f"GET http://a.wild.test/e2?t=%2567{PH[1:]} HTTP/1.1\r\nHost: a.wild.test\r\n\r\n"))
say("control", status("GET http://a.wild.test/control HTTP/1.1\r\nHost: a.wild.test\r\n\r\n"))
"#,
    );
    let ctx = || described(&out, &[&api, &wild, &plain]);
    for key in ["connect", "upper", "method", "encoded", "twice"] {
        assert_eq!(
            printed(&out, key),
            "HTTP/1.1 403 Forbidden",
            "{key}\n{}",
            ctx()
        );
    }
    assert_eq!(printed(&out, "control"), "HTTP/1.1 200 OK", "{}", ctx());
    assert_eq!(plain.paths(), ["/control"], "{}", ctx());
    assert!(wild.requests().is_empty(), "{}", ctx());
    let refused = proxy_records(&out)
        .into_iter()
        .filter(|r| r["reason"] == "placeholder-to-unlisted-host" && r["status"] == 403)
        .count();
    assert_eq!(refused, 5, "{}", ctx());
}

/// A credential goes over plain HTTP only where its rule says `plain_http = true`: on any
/// other port too, a plain request would carry it across the network unencrypted.
#[test]
fn a_credential_goes_over_plain_http_only_where_the_rule_says_so() {
    let pki = Pki::new();
    let plain = Server::spawn(&pki.scratch.dir, "plain", "upstream.py", &[]);
    let rule_for = |host: &str, extra: &str| {
        format!(
            "[[http.allow]]\nhost = \"{host}\"\nport = 8080\nconnect = \"127.0.0.1:{}\"\ncredential = \"api\"\n{extra}\n",
            plain.port
        )
    };
    let name = "tunnel-plain-http";
    let body = format!(
        "{}{}{API_CREDENTIAL}",
        rule_for("api.test", ""),
        rule_for("opted.test", "plain_http = true"),
    );
    let run = Run::new(name, &tunnel_policy(name, &pki, &body));
    let out = sh(
        &run,
        &format!(
            "{CURL}\nr refused -x \"$HTTP_PROXY\" http://api.test:8080/v1/x\nr opted -x \"$HTTP_PROXY\" http://opted.test:8080/v1/y\n"
        ),
    );
    let ctx = || described(&out, &[&plain]);
    let replies = replies(&out.stdout);
    assert!(reply(&replies, "refused", &out).forbidden(), "{}", ctx());
    assert_eq!(reply(&replies, "opted", &out).code, 200, "{}", ctx());
    assert_eq!(plain.paths(), ["/v1/y"], "{}", ctx());
    assert_eq!(
        header(&plain.requests()[0], "authorization"),
        [format!("Bearer {SECRET}").as_str()],
        "{}",
        ctx()
    );
    assert_proxy_record(
        &out,
        "GET http://api.test:8080/v1/x",
        &json!({
            "verdict": "deny",
            "reason": "credential-over-plain-http",
            "host": "api.test",
            "port": 8080,
            "status": 403,
            "credential": "api",
        }),
    );
}

/// Plain HTTP to port 443, where a rule means HTTPS, is refused before anything is sent:
/// the credential would cross the network in the clear.
#[test]
fn plain_http_to_port_443_is_refused() {
    let pki = Pki::new();
    let plain = Server::spawn(&pki.scratch.dir, "plain", "upstream.py", &[]);
    let run = api_run("tunnel-http-443", &pki, plain.port, "credential = \"api\"");
    let out = sh(
        &run,
        &format!("{CURL}\nr cleartext -x \"$HTTP_PROXY\" http://api.test:443/v1/x\n"),
    );
    let ctx = || described(&out, &[&plain]);
    assert_eq!(
        reply(&replies(&out.stdout), "cleartext", &out).code,
        400,
        "{}",
        ctx()
    );
    assert!(plain.requests().is_empty(), "{}", ctx());
    assert_proxy_record(
        &out,
        "GET http://api.test:443/v1/x",
        &json!({
            "verdict": "deny",
            "reason": "http-to-port-443",
            "host": null,
            "path": "/v1/x",
            "status": 400,
        }),
    );
}

#[test]
fn a_name_that_resolves_to_loopback_is_refused_without_private() {
    let pki = Pki::new();
    let target = Server::upstream(&pki, "local");
    let policy_with = |extra: &str| {
        tunnel_policy(
            "tunnel-private",
            &pki,
            &format!(
                "[[http.allow]]\nhost = \"localhost\"\nport = {}\n{extra}\n",
                target.port
            ),
        )
    };
    let script = format!(
        "{CURL}\nr local https://localhost:{}/v1/private\n",
        target.port
    );

    let refused = Run::new("tunnel-private", &policy_with(""));
    let out = sh(&refused, &script);
    let ctx = |out: &Finished| described(out, &[&target]);
    let r = reply(&replies(&out.stdout), "local", &out).clone();
    assert!(r.forbidden(), "{r:?}\n{}", ctx(&out));
    assert!(target.requests().is_empty(), "{}", ctx(&out));
    assert_host_refused(&out, "localhost", target.port, "private-address");

    // The same request with `private = true` gets through: the refusal above was the rule.
    let allowed = Run::new("tunnel-private-ok", &policy_with("private = true"));
    let out = sh(&allowed, &script);
    let r = reply(&replies(&out.stdout), "local", &out).clone();
    assert_eq!(r.code, 200, "{r:?}\n{}", ctx(&out));
    assert_eq!(target.paths(), ["/v1/private"], "{}", ctx(&out));
}

#[test]
fn malformed_and_ambiguous_requests_are_never_forwarded() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let body = format!(
        "{}{}{API_CREDENTIAL}",
        rule("api.test", api.port, "credential = \"api\""),
        rule("other.test", other.port, ""),
    );
    let run = Run::new(
        "tunnel-malformed",
        &tunnel_policy("tunnel-malformed", &pki, &body),
    );
    let out = python(
        &run,
        r#"
import ssl
CTX = ssl.create_default_context()
BIG = b"a" * (1 << 20)
def read_head(s):
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
def until_eof(s):
    try:
        while s.recv(65536):
            pass
    except socket.timeout:
        return False
    except OSError:
        pass
    return True
def outcome(s, payload):
    """The status, the x-gateway-reason and Connection headers, and whether the tunnel
    closed the connection after its answer."""
    try:
        s.sendall(payload)
    except OSError:
        return {"outcome": "closed"}
    try:
        data = read_head(s)
    except socket.timeout:
        return {"outcome": "timeout"}
    except OSError:
        return {"outcome": "closed"}
    if not data:
        return {"outcome": "closed"}
    lines = data.split(b"\r\n\r\n")[0].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        return {"outcome": "garbage: " + repr(data[:80])}
    close = headers.get("connection") == "close"
    return {"outcome": status, "reason": headers.get("x-gateway-reason"),
            "connection": headers.get("connection"), "closed_after": close and until_eof(s)}
def tunnel():
    return socket.create_connection((TUNNEL_HOST, TUNNEL_PORT), timeout=10)
def intercepted(sni="api.test"):
    s = tunnel()
    s.sendall(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
    head = read_head(s)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("CONNECT refused: " + repr(head[:80]))
    return CTX.wrap_socket(s, server_hostname=sni)
def case(name, connect, payload):
    try:
        s = connect()
    except ssl.SSLError:
        result = {"outcome": "closed"}
    except Exception as e:
        result = {"outcome": "error: " + repr(e)}
    else:
        result = outcome(s, payload)
    print(json.dumps({"case": name, **result}), flush=True)

case("control", intercepted,
     b"GET /v1/control HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
INNER = {
    "cl-te": b"POST /v1/cl-te HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST /v1/two-cl HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n"
              b"Content-Length: 6\r\n\r\nhello!",
    "same-cl-twice": b"POST /v1/same-cl-twice HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n"
                     b"Content-Length: 5\r\n\r\nhello",
    "obs-fold": b"GET /v1/obs-fold HTTP/1.1\r\nHost: api.test\r\nX-Folded: one\r\n two\r\n\r\n",
    "bare-lf": b"GET /v1/bare-lf HTTP/1.1\nHost: api.test\n\n",
    "bare-cr": b"GET /v1/bare-cr HTTP/1.1\r\nHost: api.test\r\nX-A: a\rb\r\n\r\n",
    "big-header": b"GET /v1/big-header HTTP/1.1\r\nHost: api.test\r\nX-Big: " + BIG + b"\r\n\r\n",
    "host-mismatch": b"GET /v1/host-mismatch HTTP/1.1\r\nHost: other.test\r\n\r\n",
    "dot-params": b"GET /v1/..;/admin HTTP/1.1\r\nHost: api.test\r\n\r\n",
    "cl-list": b"POST /v1/cl-list HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5, 5\r\n\r\nhello",
    # Zero-padded past what the guard keeps of a line; the body hides a second request.
    "cl-padded": b"POST /v1/cl-padded HTTP/1.1\r\nHost: api.test\r\nContent-Length: "
                 + b"0" * 250 + b"30\r\n\r\nXXXXX\r\nContent-Length: 200\r\n\r\n"
                 + b"POST /v1/smuggled HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n"
                 + b"Content-Length: 5\r\n\r\n0\r\n\r\n",
    "dots-encoded-twice": b"GET /v1/%252e%252e/admin HTTP/1.1\r\nHost: api.test\r\n\r\n",
}
for name, payload in INNER.items():
    case(name, intercepted, payload)
case("sni-mismatch", lambda: intercepted(sni="other.test"),
     b"GET /v1/sni-mismatch HTTP/1.1\r\nHost: api.test\r\n\r\n")
OUTER = {
    "connect-bare-lf": b"CONNECT api.test:443 HTTP/1.1\nHost: api.test:443\n\n",
    "connect-obs-fold": b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n"
                        b"X-Folded: one\r\n two\r\n\r\n",
    "connect-big-header": b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\nX-Big: "
                          + BIG + b"\r\n\r\n",
    # No name is longer than 253 characters.
    "long-host": b"GET http://" + b"a." * 2000 + b"api.test/v1/long HTTP/1.1\r\n\r\n",
}
for name, payload in OUTER.items():
    case(name, tunnel, payload)
"#,
    );
    let ctx = || described(&out, &[&api, &other]);
    let outcomes: HashMap<&str, &Value> = out
        .lines
        .iter()
        .filter_map(|l| Some((l["case"].as_str()?, &l["outcome"])))
        .collect();
    assert_eq!(
        outcomes.get("control").copied(),
        Some(&json!(200)),
        "the well-formed control request must pass\n{}",
        ctx()
    );
    // What the head guard refuses (hyper would read these heads one way, another parser
    // another): the tunnel's own 400 naming the reason, the connection closed after it, and
    // one record each, toward the CONNECT target inside a session.
    let guarded = [
        ("cl-te", "content-length-and-transfer-encoding", true),
        ("two-cl", "duplicate-content-length", true),
        ("same-cl-twice", "duplicate-content-length", true),
        ("obs-fold", "obs-fold", true),
        ("bare-lf", "bare-lf", true),
        ("bare-cr", "bare-cr", true),
        ("cl-list", "invalid-content-length", true),
        ("cl-padded", "invalid-content-length", true),
        ("connect-bare-lf", "bare-lf", false),
        ("connect-obs-fold", "obs-fold", false),
    ];
    let answers: HashMap<&str, &Value> = out
        .lines
        .iter()
        .filter_map(|l| Some((l["case"].as_str()?, l)))
        .collect();
    for (name, reason, _) in guarded {
        let got = answers
            .get(name)
            .unwrap_or_else(|| panic!("case {name} did not run\n{}", ctx()));
        assert_eq!(
            [
                &got["outcome"],
                &got["reason"],
                &got["connection"],
                &got["closed_after"]
            ],
            [&json!(400), &json!(reason), &json!("close"), &json!(true)],
            "{name}: expected the tunnel's 400 ({reason}), then the connection closed\n{}",
            ctx()
        );
    }
    for (reason, inside) in guarded.iter().map(|&(_, r, i)| (r, i)) {
        let host = if inside {
            json!("api.test")
        } else {
            Value::Null
        };
        let want = guarded
            .iter()
            .filter(|&&(_, r, i)| r == reason && i == inside)
            .count();
        let records: Vec<&Value> = proxy_records(&out)
            .into_iter()
            .filter(|r| r["reason"] == reason && r["host"] == host)
            .collect();
        assert_eq!(
            records.len(),
            want,
            "one record per head refused for {reason} (inside a session: {inside})\n{}",
            ctx()
        );
        for r in records {
            assert_eq!(
                [&r["verdict"], &r["status"]],
                [&json!("deny"), &json!(400)],
                "{r}\n{}",
                ctx()
            );
            assert!(r["client"].is_string(), "{r}\n{}", ctx());
            if inside {
                assert_eq!(r["port"], 443, "{r}\n{}", ctx());
            }
        }
    }
    let cases = [
        "big-header",
        "host-mismatch",
        "dot-params",
        "dots-encoded-twice",
        "sni-mismatch",
        "connect-big-header",
        "long-host",
    ];
    for name in cases {
        let got = outcomes
            .get(name)
            .unwrap_or_else(|| panic!("case {name} did not run\n{}", ctx()));
        assert!(
            **got == json!(400) || **got == json!(431) || **got == json!("closed"),
            "{name}: expected 400, 431 or a closed connection, got {got}\n{}",
            ctx()
        );
    }
    assert_eq!(api.paths(), ["/v1/control"], "{}", ctx());
    assert!(other.requests().is_empty(), "{}", ctx());
    // Refused inside a session, a request is recorded toward the CONNECT target.
    assert_proxy_record(
        &out,
        "host-mismatch",
        &json!({
            "verdict": "deny",
            "reason": "host-mismatch",
            "host": "api.test",
            "port": 443,
            "path": "/v1/host-mismatch",
        }),
    );
}

/// A good request and a head the guard refuses, pipelined in one write, on a plain proxy
/// connection and inside an intercepted session: the first is answered as ever, the second
/// gets the 400, and nothing after it is read, let alone forwarded.
#[test]
fn a_refused_head_pipelined_after_a_good_request_ends_the_connection_there() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let plain = Server::spawn(&pki.scratch.dir, "plain", "upstream.py", &[]);
    let body = format!(
        "{}[[http.allow]]\nhost = \"plain.test\"\nport = 8080\nconnect = \"127.0.0.1:{}\"\n",
        rule("api.test", api.port, ""),
        plain.port
    );
    let name = "tunnel-pipelined";
    let run = Run::new(name, &tunnel_policy(name, &pki, &body));
    let out = python(
        &run,
        r#"
import ssl
def answers(s, payload):
    """Status and x-gateway-reason of each response, read until the tunnel closes."""
    s.sendall(payload)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        data += b"<still open>"
    except OSError:
        pass
    got = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            got.append({"left": repr(data[:80])})
            break
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        got.append({"status": int(lines[0].split(b" ")[1]),
                    "reason": headers.get("x-gateway-reason")})
        data = rest[int(headers.get("content-length", "0")):]
    return got
def tunnel():
    return socket.create_connection((TUNNEL_HOST, TUNNEL_PORT), timeout=10)
def request(target, host, extra=b""):
    return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"

URL = b"http://plain.test:8080"
print(json.dumps({"plain": answers(tunnel(),
    request(URL + b"/v1/first", b"plain.test:8080")
    + request(URL + b"/v1/second", b"plain.test:8080", b"X-Folded: one\r\n two\r\n")
    + request(URL + b"/v1/third", b"plain.test:8080"))}), flush=True)

s = tunnel()
s.sendall(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
head = s.recv(4096)
assert head.startswith(b"HTTP/1.1 200"), head
tls = ssl.create_default_context().wrap_socket(s, server_hostname="api.test")
print(json.dumps({"inner": answers(tls,
    request(b"/v1/first", b"api.test")
    + request(b"/v1/second", b"api.test", b"Content-Length: 5\r\nContent-Length: 5\r\n") + b"hello"
    + request(b"/v1/third", b"api.test"))}), flush=True)
"#,
    );
    let ctx = || described(&out, &[&api, &plain]);
    assert_eq!(
        printed(&out, "plain"),
        &json!([
            {"status": 200, "reason": null},
            {"status": 400, "reason": "obs-fold"},
        ]),
        "{}",
        ctx()
    );
    assert_eq!(plain.paths(), ["/v1/first"], "{}", ctx());
    assert_eq!(
        printed(&out, "inner"),
        &json!([
            {"status": 200, "reason": null},
            {"status": 400, "reason": "duplicate-content-length"},
        ]),
        "{}",
        ctx()
    );
    assert_eq!(api.paths(), ["/v1/first"], "{}", ctx());
    for (host, port) in [("plain.test", 8080), ("api.test", 443)] {
        assert_proxy_record(
            &out,
            &format!("the first request to {host}"),
            &json!({"verdict": "allow", "host": host, "port": port, "path": "/v1/first"}),
        );
    }
    let refused: Vec<(&Value, &Value)> = proxy_records(&out)
        .into_iter()
        .filter(|r| r["verdict"] == "deny")
        .map(|r| (&r["reason"], &r["host"]))
        .collect();
    assert_eq!(
        refused,
        [
            (&json!("obs-fold"), &Value::Null),
            (&json!("duplicate-content-length"), &json!("api.test")),
        ],
        "{}",
        ctx()
    );
}

/// A head that does not arrive within 10 s is cut and recorded. A keep-alive connection idle
/// for as long between requests is closed by the same timer, without a record: nothing was
/// sent, nothing decided.
#[test]
fn a_request_head_slower_than_the_header_timeout_is_cut() {
    let run = Run::new("tunnel-slow-head", &policy("tunnel-slow-head", ""));
    let out = python(
        &run,
        r#"
idle = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT))
idle.sendall(b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
idle.settimeout(20)
print(json.dumps({"idle_first": idle.recv(4096).decode(errors="replace").split("\r\n")[0]}), flush=True)
s = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT))
s.sendall(b"GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n")
start = time.time()
s.settimeout(60)
try:
    got = s.recv(4096).decode(errors="replace")
except socket.timeout:
    got = "still open"
except ConnectionResetError:
    got = ""
print(json.dumps({"waited": time.time() - start, "got": got}), flush=True)
idle.settimeout(10)
try:
    rest = idle.recv(4096)
except ConnectionResetError:
    rest = b""
print(json.dumps({"idle_closed": rest == b""}), flush=True)
"#,
    );
    let ctx = || out.describe();
    assert_eq!(
        printed(&out, "idle_first"),
        "HTTP/1.1 403 Forbidden",
        "{}",
        ctx()
    );
    assert_eq!(printed(&out, "idle_closed"), true, "{}", ctx());
    let got = printed(&out, "got").as_str().unwrap_or_default();
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 408"),
        "the tunnel kept a stalled request head open: {got:?}\n{}",
        ctx()
    );
    // Cut by the header timeout (10 s), not by anything sooner.
    let waited = printed(&out, "waited").as_f64().unwrap();
    assert!(waited > 8.0, "cut after {waited} s\n{}", ctx());
    let malformed = out
        .audit
        .iter()
        .filter(|r| r["layer"] == "proxy" && r["reason"] == "malformed-request")
        .count();
    assert_eq!(
        malformed,
        1,
        "the slow head only, not the idle connection\n{}",
        ctx()
    );
}

/// Python for the sandbox: a new connection to the tunnel, and the status line of the 403
/// its request gets, printed as `after` (see [`assert_one_more_request_refused`]).
const ONE_MORE_REQUEST: &str = r#"
s = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT))
s.sendall(b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
s.settimeout(20)
print(json.dumps({"after": s.recv(4096).decode(errors="replace").split("\r\n")[0]}), flush=True)
"#;

/// The tunnel still served the request of [`ONE_MORE_REQUEST`] (with a 403: no rule).
fn assert_one_more_request_refused(out: &Finished) {
    assert_eq!(
        printed(out, "after"),
        "HTTP/1.1 403 Forbidden",
        "{}",
        out.describe()
    );
}

/// Python for the sandbox: opens `conns` connections to the tunnel, holds them `hold`
/// seconds, prints its open-file limits and how many the tunnel closed, closes them all,
/// then prints the status line a new connection's request gets.
fn hold_connections(conns: usize, hold: f64) -> String {
    hold_sessions(conns, hold, "")
}

/// Like [`hold_connections`], each connection first running `opening` (python, on `s`).
fn hold_sessions(conns: usize, hold: f64, opening: &str) -> String {
    format!(
        r#"
import resource
print(json.dumps({{"limits": list(resource.getrlimit(resource.RLIMIT_NOFILE))}}), flush=True)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
def opened():
    s = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT))
    {opening}
    return s
conns = [opened() for _ in range({conns})]
time.sleep({hold})
closed = 0
for s in conns:
    s.setblocking(False)
    try:
        if s.recv(1) == b"":
            closed += 1
    except BlockingIOError:
        pass
    except ConnectionResetError:
        closed += 1
print(json.dumps({{"closed": closed}}), flush=True)
for s in conns:
    s.close()
time.sleep(1)
# The permits of closed connections are given back: a new one is served.
{ONE_MORE_REQUEST}"#
    )
}

/// Like [`python`], with the gateway started under open-file limits (soft, hard).
fn python_with_open_files(run: &Run, body: &str, soft: u64, hard: u64) -> Finished {
    use std::os::unix::process::CommandExt as _;
    let script = format!("{PRELUDE}\n{body}");
    let mut cmd = run.command(&["python3", "-c", &script]);
    // SAFETY: setrlimit is async-signal-safe and gets a valid pointer.
    unsafe {
        cmd.pre_exec(move || {
            let limits = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limits) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run.finish(cmd.output().unwrap())
}

/// 1,100 connections from one sandbox: 1,024 are served, the rest closed and recorded. The
/// gateway starts with the soft open-file limit of 1,024 common under systemd: it raises its
/// own (each connection takes two descriptors), and the sandboxed command still starts with
/// the limits the gateway had.
#[test]
fn connections_over_the_sandbox_limit_are_closed_and_recorded() {
    let run = Run::new("tunnel-conn-limit", &policy("tunnel-conn-limit", ""));
    let out = python_with_open_files(&run, &hold_connections(1100, 2.0), 1024, 4096);
    let ctx = || out.describe();
    assert_eq!(printed(&out, "limits"), &json!([1024, 4096]), "{}", ctx());
    assert_eq!(printed(&out, "closed"), 1100 - 1024, "{}", ctx());
    let refused = out
        .audit
        .iter()
        .filter(|r| r["layer"] == "proxy" && r["reason"] == "too-many-connections")
        .count();
    assert_eq!(refused, 1100 - 1024, "{}", ctx());
    assert!(!out.stderr.contains("tunnel accept"), "{}", ctx());
    assert_one_more_request_refused(&out);
}

/// A CONNECT session outlives the HTTP connection it started on (hyper ends that at the
/// upgrade): it holds a connection permit of its own, so sessions a sandbox leaves open
/// count against its limit like connections.
#[test]
fn connect_sessions_count_against_the_sandbox_limit() {
    let run = Run::new(
        "tunnel-session-limit",
        &policy(
            "tunnel-session-limit",
            "[[http.allow]]\nhost = \"api.test\"\n",
        ),
    );
    // A connection over the limit is closed unread: a reset, or an end of stream.
    let opening = r#"head = b""
    try:
        s.sendall(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
        while b"\r\n\r\n" not in head:
            got = s.recv(1)
            if not got:
                break
            head += got
    except (ConnectionResetError, BrokenPipeError):
        head = b""
    STATUSES.append(head.split(b" ")[1].decode() if head else "closed")"#;
    let body = format!(
        "STATUSES = []\n{}\nprint(json.dumps({{\"statuses\": {{k: STATUSES.count(k) for k in set(STATUSES)}}}}), flush=True)\n",
        hold_sessions(1100, 2.0, opening)
    );
    let out = python_with_open_files(&run, &body, 1024, 4096);
    let ctx = || out.describe();
    let statuses = printed(&out, "statuses");
    let open = statuses["200"].as_u64().unwrap_or(0) as usize;
    assert!(
        (1000..=1024).contains(&open),
        "{open} CONNECT sessions open at once: {statuses}\n{}",
        ctx()
    );
    let refused = out
        .audit
        .iter()
        .filter(|r| r["layer"] == "proxy" && r["reason"] == "too-many-connections")
        .count();
    assert_eq!(refused, 1100 - open, "{statuses}\n{}", ctx());
    assert!(!out.stderr.contains("tunnel accept"), "{}", ctx());
    assert_one_more_request_refused(&out);
}

#[test]
fn a_process_outside_every_sandbox_is_refused() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let run = api_run("tunnel-outside", &pki, api.port, "credential = \"api\"");
    let go = run.scratch.dir.join("go");
    let script = format!(
        r#"{CURL}
echo "proxy=$HTTPS_PROXY"
echo "ca=$SSL_CERT_FILE"
i=0
while [ ! -e {go:?} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
r inside https://api.test/v1/inside
"#,
        go = go.to_str().unwrap()
    );
    let mut gateway = run
        .command(&["sh", "-c", &script])
        .env("API_TOKEN", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(gateway.stdout.take().unwrap());
    let read_var = |reader: &mut BufReader<ChildStdout>, prefix: &str| {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix}..., got {line:?}"))
            .to_owned()
    };
    let proxy = read_var(&mut reader, "proxy=");
    let ca_bundle = read_var(&mut reader, "ca=");
    let tunnel = proxy.strip_prefix("http://").unwrap().to_owned();

    // This test process is root and in no sandbox: a full credentialed request through the
    // tunnel, as curl makes it, and a plain absolute-form request on a raw socket.
    let outside = Command::new("curl")
        .args(["-sS", "-m", "10", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{http_connect}"])
        .args(["--proxy", &proxy, "--cacert", &ca_bundle])
        .arg("https://api.test/v1/outside")
        .output()
        .unwrap();
    let codes = String::from_utf8_lossy(&outside.stdout).into_owned();
    let raw = {
        let mut s = TcpStream::connect(&tunnel).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(
            b"GET http://api.test:443/v1/outside-plain HTTP/1.1\r\nHost: api.test:443\r\n\r\n",
        );
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };

    std::fs::write(&go, "").unwrap();
    let mut stdout = String::new();
    reader.read_to_string(&mut stdout).unwrap();
    let mut stderr = String::new();
    gateway
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = gateway.wait().unwrap();
    let out = run.finish(Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    });
    let ctx = || {
        format!(
            "outside curl: {codes} {:?}\nraw answer: {raw:?}\n{}\n{}",
            String::from_utf8_lossy(&outside.stderr),
            out.describe(),
            api.describe()
        )
    };
    assert!(
        !codes.starts_with('2') && !codes.contains(" 2"),
        "outside curl got through: {}",
        ctx()
    );
    let raw_status = raw.split(' ').nth(1).unwrap_or("");
    assert!(
        raw.is_empty() || raw_status.starts_with('4'),
        "outside raw request was not refused: {}",
        ctx()
    );
    assert_eq!(
        reply(&replies(&out.stdout), "inside", &out).code,
        200,
        "the sandbox itself must get through\n{}",
        ctx()
    );
    assert_eq!(api.paths(), ["/v1/inside"], "{}", ctx());
    let refusals = proxy_records(&out)
        .into_iter()
        .filter(|r| r["verdict"] == "deny" && r["reason"] == "not-a-sandbox")
        .count();
    assert!(
        refusals >= 2,
        "one not-a-sandbox record per outside connection\n{}",
        ctx()
    );
}

/// The kernel forgets a sandbox's tunnel socket as it closes: a sandbox client that resets
/// its connection before the tunnel accepts it must not be recorded as another local user.
#[test]
fn a_sandbox_client_reset_before_accept_is_not_taken_for_another_user() {
    let run = Run::new("tunnel-reset-early", &policy("tunnel-reset-early", ""));
    let out = python(
        &run,
        &format!(
            r#"
import struct
for _ in range(500):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.connect((TUNNEL_HOST, TUNNEL_PORT))
    s.close()
{ONE_MORE_REQUEST}"#
        ),
    );
    let ctx = || out.describe();
    let reasons: Vec<&str> = proxy_records(&out)
        .into_iter()
        .filter(|r| r["verdict"] == "deny")
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(
        !reasons.contains(&"not-a-sandbox"),
        "a sandbox's own reset recorded as not-a-sandbox\n{}",
        ctx()
    );
    // Most of the 500 resets land before the accept; each is recorded as what it was.
    let early = reasons
        .iter()
        .filter(|r| **r == "closed-before-accept")
        .count();
    assert!(
        early > 0 && early <= 500,
        "{early} closed-before-accept\n{}",
        ctx()
    );
    assert_one_more_request_refused(&out);
}

/// Nor one that sends its request and closes the usual way, with a FIN (wrk ending a run):
/// the client's socket is gone once the tunnel's end acknowledges the FIN, ~40 ms later.
/// The gateway is stopped (SIGSTOP) while the sandbox connects and closes, so every one of
/// these connections is accepted only after that.
#[test]
fn a_sandbox_client_closed_before_accept_is_not_taken_for_another_user() {
    let run = Run::new("tunnel-fin-early", &policy("tunnel-fin-early", ""));
    let (go, resume) = (run.scratch.dir.join("go"), run.scratch.dir.join("resume"));
    let mut live = Live::python(
        &run,
        &format!(
            r#"
say("ready", True)
wait_for({go:?})
for _ in range(50):
    s = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT))
    s.sendall(b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
    s.close()
time.sleep(0.5)
say("closed", 50)
wait_for({resume:?})
{ONE_MORE_REQUEST}"#
        ),
        &[],
    );
    assert_eq!(live.until("ready"), true);
    live.signal(libc::SIGSTOP);
    std::fs::write(&go, "").unwrap();
    let closed = live.until("closed");
    live.signal(libc::SIGCONT);
    std::fs::write(&resume, "").unwrap();
    let out = live.finish();
    assert_eq!(closed, 50, "{}", out.describe());
    let reasons: Vec<&str> = proxy_records(&out)
        .into_iter()
        .filter(|r| r["verdict"] == "deny")
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "closed-before-accept")
            .count(),
        50,
        "each connection closed before the accept is recorded as such, none as not-a-sandbox: \
         {reasons:?}\n{}",
        out.describe()
    );
    assert_one_more_request_refused(&out);
}

/// Idle upstream connections are bounded per sandbox, however many hosts its `*.` rules let
/// it name: one keep-alive client asks 150 hosts under each of two rules in turn, each over a
/// connection of its own, and the upstream then holds at most the sandbox's 256.
#[test]
fn idle_upstream_connections_are_bounded_across_hosts() {
    let pki = Pki::new();
    let plain = Server::spawn(&pki.scratch.dir, "plain", "upstream.py", &[]);
    let name = "tunnel-idle-bound";
    let run = Run::new(
        name,
        &tunnel_policy(
            name,
            &pki,
            &["many", "more"]
                .map(|d| {
                    format!(
                        "[[http.allow]]\nhost = \"*.{d}.test\"\nport = 80\nconnect = \"127.0.0.1:{}\"\n",
                        plain.port
                    )
                })
                .concat(),
        ),
    );
    let done = run.scratch.dir.join("done");
    let mut live = Live::python(
        &run,
        &format!(
            r#"
import http.client
c = http.client.HTTPConnection(TUNNEL_HOST, int(TUNNEL_PORT))
codes = set()
for i in range(300):
    c.request("GET", f"http://h{{i}}.{{('many', 'more')[i % 2]}}.test/x")
    r = c.getresponse()
    r.read()
    codes.add(r.status)
say("codes", sorted(codes))
wait_for({done:?})
"#
        ),
        &[],
    );
    let codes = live.until("codes");
    // The last connections go back to the pool (or are closed) once their response ends,
    // just after the client has read it; a closed one leaves the count once the upstream's
    // thread has seen it close, later on a busy machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut held = established_to(plain.port);
    while held > 256 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        held = established_to(plain.port);
    }
    std::fs::write(&done, "").unwrap();
    let out = live.finish();
    let ctx = || described(&out, &[&plain]);
    assert_eq!(codes, json!([200]), "{}", ctx());
    assert_eq!(plain.requests().len(), 300, "{}", ctx());
    assert!(
        (250..=256).contains(&held),
        "the upstream holds {held} connections from the tunnel after 300 hosts\n{}",
        ctx()
    );
}

/// TCP connections on 127.0.0.1 established to `port`, counted at the server's end.
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && f[3] == "01"
        })
        .count()
}

/// The tunnel serves on as many worker threads as `--tunnel-threads` says; by default one
/// per CPU, at most 4.
#[test]
fn the_tunnel_runs_on_the_threads_it_is_given() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    for (flags, want) in [(&["--tunnel-threads", "1"][..], 1), (&[][..], cpus.min(4))] {
        let run = Run::new("tunnel-threads", &policy("tunnel-threads", ""));
        let done = run.scratch.dir.join("done");
        let mut live = Live::python_with(
            &run,
            flags,
            &format!(
                "{STATUS}\nsay(\"status\", status(\"http://nowhere.test/\"))\nwait_for({done:?})\n"
            ),
            &[],
        );
        let status = live.until("status");
        let tasks = std::fs::read_dir(format!("/proc/{}/task", live.gateway_pid())).unwrap();
        let threads = tasks
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.starts_with("tunnel-"))
            .count();
        std::fs::write(&done, "").unwrap();
        let out = live.finish();
        assert_eq!(status, 403, "{flags:?}\n{}", out.describe());
        assert_eq!(
            threads,
            want,
            "tunnel threads with {flags:?}\n{}",
            out.describe()
        );
    }
}

/// When the gateway does run out of descriptors, the tunnel pauses before accepting again
/// instead of spinning, and serves again once they are freed.
#[test]
fn the_tunnel_survives_running_out_of_descriptors() {
    let run = Run::new("tunnel-nofile", &policy("tunnel-nofile", ""));
    // Hard 300: the sandbox's 280 connections take the gateway past it. Each failed accept
    // is logged; spinning would log thousands in the 3 s they are held, pausing about 30.
    let out = python_with_open_files(&run, &hold_connections(280, 3.0), 300, 300);
    let ctx = || out.describe();
    let failed = out.stderr.matches("tunnel accept").count();
    assert!(
        failed > 0 && failed <= 60,
        "{failed} failed accepts logged\n{}",
        ctx()
    );
    assert_one_more_request_refused(&out);
}

#[test]
fn the_secret_appears_nowhere() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    // A port nothing listens on: the upstream error must not carry the secret either.
    let down = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let body = format!(
        "{}{}{}[credentials.api]\nenv = \"API_TOKEN\"\nplaceholder = \"API_TOKEN_PLACEHOLDER\"\n",
        rule(
            "api.test",
            api.port,
            "paths = [\"/v1/**\"]\ncredential = \"api\""
        ),
        rule("other.test", other.port, ""),
        rule("down.test", down, "credential = \"api\""),
    );
    let run = Run::new(
        "tunnel-secret",
        &tunnel_policy("tunnel-secret", &pki, &body),
    );
    let script = format!(
        r#"{CURL}
echo "--- env"
env
echo "--- gateway environ"
cat /proc/$PPID/environ 2>&1 | tr '\0' '\n'
r ok -i https://api.test/v1/ok
r forged -i -H 'Authorization: Bearer forged' https://api.test/v1/forged
r denied -i https://api.test/admin
r leak -i -H "Authorization: Bearer $API_TOKEN_PLACEHOLDER" https://other.test/v1/leak
r down -i https://down.test/v1/down
r unlisted -i https://unlisted.test/
"#
    );
    let out = run.finish(
        run.command(&["sh", "-c", &script])
            .env("API_TOKEN", SECRET)
            .env("GATEWAY_LOG", "debug")
            .output()
            .unwrap(),
    );
    let ctx = || described(&out, &[&api]);
    let replies = replies(&out.stdout);
    assert_eq!(reply(&replies, "ok", &out).code, 200, "{}", ctx());
    assert_eq!(reply(&replies, "forged", &out).code, 200, "{}", ctx());
    for name in ["denied", "leak", "unlisted"] {
        let r = reply(&replies, name, &out);
        assert!(r.forbidden(), "{name}: {r:?}\n{}", ctx());
    }
    let down_reply = reply(&replies, "down", &out);
    assert!(
        (500..600).contains(&down_reply.code),
        "down: {down_reply:?}\n{}",
        ctx()
    );
    // Let through by the policy, failed upstream: `allow`, with what the client got.
    assert_proxy_record(
        &out,
        "GET down.test/v1/down",
        &json!({
            "verdict": "allow",
            "reason": "upstream-error",
            "host": "down.test",
            "path": "/v1/down",
            "status": 502,
            "credential": "api",
        }),
    );
    // The secret was in use: the upstream got it.
    let bearer = format!("Bearer {SECRET}");
    assert!(
        api.requests()
            .iter()
            .all(|r| header(r, "authorization") == [bearer.as_str()]),
        "{}",
        ctx()
    );
    assert_eq!(api.paths().len(), 2, "{}", ctx());
    let audit_text = std::fs::read_to_string(&run.audit).unwrap_or_default();
    assert!(
        proxy_records(&out).len() >= 5,
        "one proxy record per decision\n{}",
        ctx()
    );
    assert_no_secret("the audit log", &audit_text);
    assert_no_secret(
        "the sandbox's environment, the responses or the gateway's stdout",
        &out.stdout,
    );
    assert_no_secret("the gateway's stderr", &out.stderr);
    assert!(
        out.stdout.lines().all(|l| !l.starts_with("API_TOKEN=")),
        "{}",
        ctx()
    );
}

#[test]
fn request_bodies_over_the_configured_limit_are_refused() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let rules = rule("api.test", api.port, "credential = \"api\"");
    let run = Run::new(
        "tunnel-body-limit",
        &tunnel_policy(
            "tunnel-body-limit",
            &pki,
            &format!("[tunnel]\nmax_request_body = 1000\n{rules}{API_CREDENTIAL}"),
        ),
    );
    let out = sh(
        &run,
        &format!(
            "{CURL}
head -c 1000 /dev/zero > /tmp/small
head -c 1001 /dev/zero > /tmp/big
r small -X POST --data-binary @/tmp/small https://api.test/v1/upload
r big -X POST --data-binary @/tmp/big https://api.test/v1/upload
r big-chunked -X POST -H 'Transfer-Encoding: chunked' --data-binary @/tmp/big https://api.test/v1/chunked
"
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api]);
    assert_eq!(reply(&replies, "small", &out).code, 200, "{}", ctx());
    assert_eq!(reply(&replies, "big", &out).code, 413, "{}", ctx());
    // A chunked body is cut off at the limit: the upstream never gets a whole request.
    assert_eq!(reply(&replies, "big-chunked", &out).code, 413, "{}", ctx());
    let seen: Vec<(String, i64)> = api
        .requests()
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap_or("").to_owned(),
                r["body_len"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(seen, [("/v1/upload".to_owned(), 1000)], "{}", ctx());
    for path in ["/v1/upload", "/v1/chunked"] {
        assert_proxy_record(
            &out,
            &format!("POST {path}, too large"),
            &json!({
                "verdict": "deny",
                "reason": "request-body-too-large",
                "path": path,
                "status": 413,
            }),
        );
    }
    // The chunked one had left, credential attached, when it was cut: its own record says so.
    assert_proxy_record(
        &out,
        "POST /v1/chunked, sent before the cut",
        &json!({"verdict": "allow", "reason": "allowlisted", "path": "/v1/chunked", "status": null}),
    );
}

/// Python for the sandbox: a TLS 1.3 ClientHello made by hand, to send what no client
/// library would (a second hello after a retry naming another host, an encrypted one).
const HELLO: &str = r#"
import os, struct
def ext(t, d):
    return struct.pack(">HH", t, len(d)) + d
def hello(sni, share, rnd, sid, extra=b""):
    """A TLS 1.3 ClientHello offering x25519, with `share` as its key share (none asks
    the server for a retry), and `extra` extensions at the end."""
    name = sni.encode()
    exts = (ext(0, struct.pack(">HBH", len(name) + 3, 0, len(name)) + name)
            + ext(0x0a, struct.pack(">HH", 2, 0x001d))
            + ext(0x0d, struct.pack(">H", 8) + bytes.fromhex("0403080404010804"))
            + ext(0x2b, bytes([2, 3, 4]))
            + ext(0x33, struct.pack(">H", len(share)) + share) + extra)
    body = (b"\x03\x03" + rnd + bytes([len(sid)]) + sid + struct.pack(">H", 2) + b"\x13\x01"
            + b"\x01\x00" + struct.pack(">H", len(exts)) + exts)
    hs = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs
def share():
    return struct.pack(">HH", 0x1d, 32) + os.urandom(32)
RETRY = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
CCS = b"\x14\x03\x03\x00\x01\x01"
"#;

/// A TLS server (python's ssl, that is OpenSSL) on 127.0.0.1 that prints each SNI it is
/// asked for, killed on drop.
struct SniLogger {
    child: Child,
    port: u16,
    out: BufReader<ChildStdout>,
}

impl SniLogger {
    /// A logger as the upstream of `api.test`'s passthrough rule, in a sandbox named `name`
    /// (the certificates go with the first, kept while the run lasts).
    fn behind_passthrough(name: &str) -> (Pki, Self, Run) {
        let pki = Pki::new();
        let server = Self::start(&pki);
        let rules = rule("api.test", server.port, "passthrough = true");
        let run = Run::new(name, &tunnel_policy(name, &pki, &rules));
        (pki, server, run)
    }

    fn start(pki: &Pki) -> Self {
        let script = format!(
            r#"
import socket, ssl, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({cert:?}, {key:?})
ctx.sni_callback = lambda sock, name, c: print("SNI", name, flush=True)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
print("PORT", srv.getsockname()[1], flush=True)
def serve(c):
    try:
        ctx.wrap_socket(c, server_side=True).recv(100)
    except Exception:
        pass
    finally:
        c.close()
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"#,
            cert = pki.cert.to_str().unwrap(),
            key = pki.key.to_str().unwrap(),
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the TLS server did not start: {line:?}"));
        Self { child, port, out }
    }

    /// The names asked for so far (the server is stopped to read them).
    fn names(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = String::new();
        let _ = self.out.read_to_string(&mut rest);
        rest.lines()
            .filter_map(|l| l.strip_prefix("SNI "))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for SniLogger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A passthrough session's second ClientHello (after a HelloRetryRequest) is checked as the
/// first is: naming another host, it never reaches the upstream, whose SNI callback would
/// otherwise switch to that host's virtual server. Sent at once behind the first, as an
/// attacker may, or after the retry, as clients do.
#[test]
fn a_second_client_hello_after_a_retry_must_name_the_same_host() {
    let (_pki, server, run) = SniLogger::behind_passthrough("tunnel-hello-retry");
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
{HELLO}
def attempt(second_sni, at_once):
    s, status = connected("api.test")
    rnd, sid = os.urandom(32), os.urandom(32)
    second = CCS + hello(second_sni, share(), rnd, sid)
    first = hello("api.test", b"", rnd, sid)
    s.settimeout(5)
    if at_once:
        s.sendall(first + second)
    else:
        s.sendall(first)
    got = b""
    try:
        while RETRY not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        retried = RETRY in got
        if not at_once:
            s.sendall(second)
        after = b""
        while len(after) < 6:
            chunk = s.recv(4096)
            if not chunk:
                break
            after += chunk
    except OSError as e:
        retried, after = RETRY in got, b""
    # A ServerHello after the second hello: the handshake went on.
    print(json.dumps({{"attempt": [second_sni, at_once], "retried": retried,
                      "went_on": after[:1] == b"\x16"}}), flush=True)
    s.close()
attempt("api.test", False)
attempt("other.test", False)
attempt("other.test", True)
"#
        ),
    );
    let ctx = out.describe();
    let attempts: Vec<&Value> = out
        .lines
        .iter()
        .filter(|l| l.get("attempt").is_some())
        .collect();
    assert_eq!(attempts.len(), 3, "{ctx}");
    // The same name again: the retry is spliced as any handshake is.
    assert_eq!(attempts[0]["retried"], true, "{ctx}");
    assert_eq!(attempts[0]["went_on"], true, "{ctx}");
    for a in &attempts[1..] {
        assert_eq!(a["went_on"], false, "{a}\n{ctx}");
    }
    let names = server.names();
    assert!(
        names.iter().all(|n| n == "api.test") && !names.is_empty(),
        "the upstream was asked for {names:?}\n{ctx}"
    );
    let mismatches = proxy_records(&out)
        .into_iter()
        .filter(|r| r["verdict"] == "deny" && r["reason"] == "sni-mismatch")
        .count();
    assert_eq!(mismatches, 2, "{ctx}");
}

/// A spliced ClientHello must name the checked host as it was checked, and nothing
/// encrypted: with an Encrypted ClientHello (or the ESNI draft's extension) a front that
/// decrypts it, as CDNs do, serves the inner name, any site it hosts; with a trailing dot, a
/// front that compares names as written routes it to its default. Neither reaches the
/// upstream, first hello or second (after a retry), and each is recorded.
#[test]
fn a_spliced_hello_must_name_the_checked_host_as_checked_and_nothing_encrypted() {
    let (_pki, server, run) = SniLogger::behind_passthrough("tunnel-hello-sealed");
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
{HELLO}
# An outer ECH (RFC 9849, 5): HKDF-SHA256, AES-128-GCM, config 7, a key, a sealed payload.
ECH = ext(0xfe0d, b"\x00" + struct.pack(">HHB", 1, 1, 7) + struct.pack(">H", 32) + os.urandom(32)
          + struct.pack(">H", 160) + os.urandom(160))
ESNI = ext(0xffce, os.urandom(40))
def attempt(label, first, second=None):
    s, status = connected("api.test")
    s.settimeout(5)
    s.sendall(first)
    got = b""
    try:
        if second is not None:
            while RETRY not in got:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            s.sendall(second)
            got = b""
        while len(got) < 6:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except OSError:
        got = b""
    # A ServerHello (a handshake record): the upstream got the hello and answered.
    print(json.dumps({{"attempt": label, "went_on": got[:1] == b"\x16"}}), flush=True)
    s.close()
def fresh(sni, key_share, extra=b""):
    return hello(sni, key_share, os.urandom(32), os.urandom(32), extra)
attempt("plain", fresh("api.test", share()))
attempt("ech", fresh("api.test", share(), ECH))
attempt("esni", fresh("api.test", share(), ESNI))
attempt("trailing-dot", fresh("api.test.", share()))
rnd, sid = os.urandom(32), os.urandom(32)
attempt("ech-after-retry", hello("api.test", b"", rnd, sid),
        CCS + hello("api.test", share(), rnd, sid, ECH))
"#
        ),
    );
    let ctx = out.describe();
    let went_on = |label: &str| {
        out.lines
            .iter()
            .find(|l| l["attempt"] == label)
            .map(|l| l["went_on"].clone())
    };
    assert_eq!(went_on("plain"), Some(json!(true)), "{ctx}");
    for label in ["ech", "esni", "trailing-dot", "ech-after-retry"] {
        assert_eq!(went_on(label), Some(json!(false)), "{label}\n{ctx}");
    }
    let reasons: Vec<String> = proxy_records(&out)
        .into_iter()
        .filter(|r| r["verdict"] == "deny")
        .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        reasons,
        [
            "encrypted-client-hello",
            "encrypted-client-hello",
            "sni-mismatch",
            "encrypted-client-hello"
        ],
        "{ctx}"
    );
    // The plain hello, and the retry's first: nothing with another name or sealed.
    let names = server.names();
    assert_eq!(names, ["api.test", "api.test"], "{ctx}");
}

/// A splice whose `passthrough` record cannot be written is not opened: here the audit log's
/// disk fills while the tunnel waits for the ClientHello (the CONNECT came while it could
/// still record).
#[test]
fn a_splice_is_not_opened_once_the_audit_log_has_failed() {
    let (_pki, server, mut run) = SniLogger::behind_passthrough("tunnel-hello-unrecorded");
    let disk = SmallFs::mount(run.scratch.dir.join("auditfs"), "16k");
    run.audit = disk.0.join("audit.jsonl");
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
{HELLO}
s, status = connected("api.test")
# Refusals, each with its record, until the tunnel says it can no longer record.
heads = []
for i in range(1000):
    c = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT), timeout=10)
    c.sendall(("GET http://nowhere.test/%s HTTP/1.1\r\nHost: nowhere.test\r\n"
               "Connection: close\r\n\r\n" % ("x" * 500)).encode())
    heads.append(c.recv(4096).decode(errors="replace").split("\r\n")[0])
    c.close()
    if " 503 " in heads[-1]:
        break
s.settimeout(5)
s.sendall(hello("api.test", share(), os.urandom(32), os.urandom(32)))
try:
    got = s.recv(4096)
except OSError:
    got = b""
print(json.dumps({{"status": status, "last": heads[-1], "went_on": got[:1] == b"\x16"}}),
      flush=True)
"#
        ),
    );
    let ctx = out.describe();
    assert!(
        printed(&out, "status")
            .as_str()
            .unwrap_or_default()
            .contains(" 200 "),
        "{ctx}"
    );
    assert!(
        printed(&out, "last")
            .as_str()
            .unwrap_or_default()
            .contains(" 503 "),
        "the log never failed\n{ctx}"
    );
    assert_eq!(printed(&out, "went_on"), false, "{ctx}");
    assert!(server.names().is_empty(), "{ctx}");
    disk.make_room_and_clean_up();
}

/// A spliced handshake the upstream never answers is cut after the hello timeout (10 s),
/// what the client sent after its ClientHello still held back, and recorded: the
/// `passthrough` record alone would read as a session that went on.
#[test]
fn a_spliced_handshake_the_upstream_never_answers_is_cut_and_recorded() {
    let pki = Pki::new();
    // Takes connections and reads them, and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in silent.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &conn, &mut std::io::sink());
            });
        }
    });
    let rules = rule("api.test", port, "passthrough = true");
    let run = Run::new(
        "tunnel-hello-silent",
        &tunnel_policy("tunnel-hello-silent", &pki, &rules),
    );
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
{HELLO}
s, status = connected("api.test")
s.sendall(hello("api.test", share(), os.urandom(32), os.urandom(32)))
start = time.time()
s.settimeout(30)
try:
    got = s.recv(4096)
except OSError:
    got = b""
print(json.dumps({{"status": status, "waited": time.time() - start, "got": len(got)}}), flush=True)
"#
        ),
    );
    let ctx = out.describe();
    assert_eq!(printed(&out, "got"), 0, "{ctx}");
    let waited = printed(&out, "waited").as_f64().unwrap();
    assert!(waited > 8.0, "cut after {waited} s\n{ctx}");
    let reasons: Vec<String> = proxy_records(&out)
        .into_iter()
        .map(|r| format!("{} {}", r["verdict"], r["reason"]))
        .collect();
    assert_eq!(
        reasons,
        [
            r#""allow" "passthrough""#,
            r#""deny" "tls-handshake-timeout""#
        ],
        "{ctx}"
    );
}

/// A passthrough rule's host is only ever spliced; its credential, methods and paths never
/// apply to a request the tunnel reads. Absolute-form `https://` on the proxy port (no
/// CONNECT) to such a host is refused, whichever rule its method and path would match,
/// and so is a CONNECT inside an intercepted session: forwarded, its body (which an
/// upstream may leave unread) would be read as the next request on the pooled connection.
#[test]
fn requests_the_tunnel_would_read_never_reach_a_passthrough_host_or_go_as_connect() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let rules = format!(
        "{}{}{}",
        rule(
            "api.test",
            api.port,
            "passthrough = true\ncredential = \"api\"\nmethods = [\"GET\"]\npaths = [\"/public/**\"]"
        ),
        rule("api.test", api.port, "credential = \"api\""),
        rule("other.test", other.port, "credential = \"api\""),
    );
    let run = Run::new(
        "tunnel-read-passthrough",
        &tunnel_policy(
            "tunnel-read-passthrough",
            &pki,
            &format!("{rules}{API_CREDENTIAL}"),
        ),
    );
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
import ssl
def answer(s):
    s.settimeout(10)
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[0].decode(errors="replace")
for name, head in [
    ("get", b"GET https://api.test/public/x HTTP/1.1\r\nHost: api.test\r\n\r\n"),
    ("post", b"POST https://api.test/x HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\n\r\n"),
]:
    s = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT), timeout=10)
    s.sendall(head)
    print(json.dumps({{name: answer(s)}}), flush=True)
t = ssl.create_default_context().wrap_socket(connected("other.test")[0], server_hostname="other.test")
body = b"DELETE /repos/acme/app HTTP/1.1\r\nX-Pad: "
t.sendall(b"CONNECT https://other.test:443/ HTTP/1.1\r\nHost: other.test\r\nContent-Length: "
          + str(len(body)).encode() + b"\r\n\r\n" + body)
print(json.dumps({{"connect": answer(t)}}), flush=True)
time.sleep(0.5)
"#
        ),
    );
    let ctx = || described(&out, &[&api, &other]);
    for (name, status) in [("get", 403), ("post", 403), ("connect", 405)] {
        assert!(
            printed(&out, name)
                .as_str()
                .is_some_and(|l| l.starts_with(&format!("HTTP/1.1 {status} "))),
            "{name}\n{}",
            ctx()
        );
    }
    assert!(api.requests().is_empty(), "{}", ctx());
    assert!(other.requests().is_empty(), "{}", ctx());
    let records = proxy_records(&out);
    let refused = |reason: &str| {
        records
            .iter()
            .filter(|r| r["verdict"] == "deny" && r["reason"] == reason)
            .count()
    };
    assert_eq!(refused("passthrough-only"), 2, "{}", ctx());
    assert_eq!(refused("connect-in-session"), 1, "{}", ctx());
}

#[test]
fn passthrough_splices_tls_after_the_sni_check() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let rules = rule("api.test", api.port, "passthrough = true");
    let run = Run::new(
        "tunnel-passthrough",
        &tunnel_policy("tunnel-passthrough", &pki, &rules),
    );
    let ca = pki.ca.display();
    let out = sh(
        &run,
        &format!(
            "{CURL}
r spliced --cacert {ca} https://api.test/v1/spliced
r wrong-sni --cacert {ca} --connect-to other.test:443:api.test:443 https://other.test/v1/wrong-sni
"
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api]);
    // Trusting only the upstream's own CA, curl got through: the session was not intercepted.
    assert_eq!(reply(&replies, "spliced", &out).code, 200, "{}", ctx());
    // CONNECT api.test:443 carrying SNI other.test: closed before anything reached upstream.
    assert_ne!(reply(&replies, "wrong-sni", &out).code, 200, "{}", ctx());
    assert_eq!(api.paths(), ["/v1/spliced"], "{}", ctx());
    let records = proxy_records(&out);
    assert!(
        records.iter().any(|r| r["verdict"] == "allow"
            && r["reason"] == "passthrough"
            && r["host"] == "api.test"),
        "no passthrough record\n{}",
        ctx()
    );
    assert!(
        records
            .iter()
            .any(|r| r["verdict"] == "deny" && r["reason"] == "sni-mismatch"),
        "no sni-mismatch record\n{}",
        ctx()
    );
}

/// nginx serving HTTP/2 over TLS (ALPN h2 and http/1.1) on 127.0.0.1, killed on drop. It
/// answers with the protocol it spoke and the Authorization it received.
struct NginxH2 {
    child: Child,
    port: u16,
}

impl NginxH2 {
    fn start(pki: &Pki) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = pki.scratch.dir.join("nginx");
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = format!(
            "error_log {d}/logs/error.log warn;\npid {d}/nginx.pid;\nevents {{}}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             server {{\n# nginx 1.22 (Debian 12): http2 is a listen parameter.\nlisten 127.0.0.1:{port} ssl http2;\nserver_name api.test;\n\
             ssl_certificate {cert};\nssl_certificate_key {key};\n\
             location / {{ set $credential missing; if ($http_authorization = \"Bearer {SECRET}\") {{ set $credential attached; }} return 200 \"$server_protocol $credential\\n\"; }}\n}}\n}}\n",
            d = dir.display(),
            cert = pki.cert.display(),
            key = pki.key.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg("daemon off; master_process off;")
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx is needed for this test (apt-get install nginx-light)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child, port };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "nginx did not start: {}",
            std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
        );
    }
}

impl Drop for NginxH2 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_upstream_is_spoken_to_in_http2_when_it_offers_it() {
    let pki = Pki::new();
    let nginx = NginxH2::start(&pki);
    let run = api_run("tunnel-h2", &pki, nginx.port, "credential = \"api\"");
    let out = sh(&run, &format!("{CURL}\nr h2 https://api.test/v1/proto\n"));
    let replies = replies(&out.stdout);
    let reply = reply(&replies, "h2", &out);
    assert_eq!(reply.code, 200, "{}", out.describe());
    // The sandbox spoke HTTP/1.1 to the tunnel; the tunnel negotiated h2 upstream by ALPN
    // and attached the credential there.
    assert_eq!(reply.body.trim(), "HTTP/2.0 attached", "{}", out.describe());
}

/// Toward an HTTP/2 upstream too, a body carrying a placeholder of a credential the host's
/// rule does not name is refused and recorded as such: hyper reports only a reset stream
/// there, so the reason is the tunnel's own, not found in the error.
#[test]
fn a_placeholder_in_a_body_toward_an_http2_upstream_is_refused() {
    let pki = Pki::new();
    let nginx = NginxH2::start(&pki);
    let name = "tunnel-h2-body";
    // The rule names no credential: the placeholder is not for this host.
    let body = format!(
        "{}[credentials.api]\nenv = \"API_TOKEN\"\nplaceholder = \"API_TOKEN_PLACEHOLDER\"\n",
        rule("api.test", nginx.port, ""),
    );
    let run = Run::new(name, &tunnel_policy(name, &pki, &body));
    let out = sh(
        &run,
        &format!(
            "{CURL}\nr leak -X POST --data-binary \"token=$API_TOKEN_PLACEHOLDER\" https://api.test/v1/upload\n"
        ),
    );
    let replies = replies(&out.stdout);
    let reply = reply(&replies, "leak", &out);
    let records = proxy_records(&out);
    let upload: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["path"] == "/v1/upload")
        .map(|r| {
            (
                r["verdict"].as_str().unwrap_or_default(),
                r["reason"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        upload.contains(&("deny", "placeholder-to-unlisted-host")),
        "{upload:?}\n{}",
        out.describe()
    );
    assert!(!upload.contains(&("allow", "upstream-error")), "{upload:?}");
    assert!(
        reply.forbidden() || reply.code == 200,
        "{reply:?}\n{}",
        out.describe()
    );
}

/// node serving HTTP/2 over TLS on 127.0.0.1, killed on drop: it answers with the trailers
/// of the request it received, and whether the credential came with it.
struct NodeH2 {
    child: Child,
    port: u16,
}

impl NodeH2 {
    fn start(pki: &Pki) -> Self {
        let script = format!(
            r#"
const http2 = require("http2"), fs = require("fs");
const server = http2.createSecureServer(
  {{ key: fs.readFileSync({key:?}), cert: fs.readFileSync({cert:?}) }},
  (req, res) => {{
    req.resume();
    req.on("end", () => res.end(JSON.stringify({{
      trailers: req.trailers,
      credential: req.headers["authorization"] === "Bearer {SECRET}",
    }})));
  }});
server.listen(0, "127.0.0.1", () => console.log("PORT " + server.address().port));
"#,
            key = pki.key.to_str().unwrap(),
            cert = pki.cert.to_str().unwrap(),
        );
        let mut child = Command::new("node")
            .args(["-e", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("node is needed for this test (apt-get install nodejs)");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("node did not start: {line:?}"));
        Self { child, port }
    }
}

impl Drop for NodeH2 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request's trailers would reach an HTTP/2 upstream past every header check (an override
/// header, the agent's own Authorization): none are forwarded.
#[test]
fn request_trailers_never_reach_an_http2_upstream() {
    let pki = Pki::new();
    let node = NodeH2::start(&pki);
    let run = api_run("tunnel-trailers", &pki, node.port, "credential = \"api\"");
    let out = python(
        &run,
        &format!(
            r#"{CONNECTED}
import ssl
t = ssl.create_default_context().wrap_socket(connected("api.test")[0], server_hostname="api.test")
t.settimeout(10)
t.sendall(b"POST /v1/trailers HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n"
          b"Trailer: X-HTTP-Method-Override, Authorization\r\nConnection: close\r\n\r\n"
          b"5\r\nhello\r\n0\r\nX-HTTP-Method-Override: DELETE\r\n"
          b"Authorization: Bearer forged-by-the-agent\r\n\r\n")
data = b""
while True:
    chunk = t.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
def dechunk(b):
    out = b""
    while True:
        size, _, b = b.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        out += b[:n]
        b = b[n + 2:]
print(json.dumps({{"status": head.split(b"\r\n")[0].decode(), "body": dechunk(body).decode(errors="replace")}}), flush=True)
"#
        ),
    );
    assert_eq!(
        printed(&out, "status"),
        "HTTP/1.1 200 OK",
        "{}",
        out.describe()
    );
    let body = printed(&out, "body").as_str().unwrap_or_default();
    let seen: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}\n{}", out.describe()));
    assert_eq!(seen["credential"], true, "{seen}\n{}", out.describe());
    assert_eq!(seen["trailers"], json!({}), "{seen}\n{}", out.describe());
}

#[test]
fn a_credential_read_from_a_file_is_attached_in_its_own_header_and_format() {
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    // Root-only, with the trailing newline editors leave: it is not part of the token.
    let secret_file = pki.scratch.write("api-key", &format!("{SECRET}\n"));
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let body = format!(
        "{}[credentials.key]\nfile = {:?}\nheader = \"x-api-key\"\nformat = \"{{secret}}\"\n",
        rule("api.test", api.port, "credential = \"key\""),
        secret_file.to_str().unwrap()
    );
    let run = Run::new("tunnel-file", &tunnel_policy("tunnel-file", &pki, &body));
    let out = sh(
        &run,
        &format!(
            "{CURL}
r keyed -H 'x-api-key: agent-made-this-up' https://api.test/v1/messages
cat {:?} >/dev/null 2>&1 && echo 'file: readable' || echo 'file: unreadable'
",
            secret_file.to_str().unwrap()
        ),
    );
    let replies = replies(&out.stdout);
    let ctx = || described(&out, &[&api]);
    assert_eq!(reply(&replies, "keyed", &out).code, 200, "{}", ctx());
    let requests = api.requests();
    assert_eq!(requests.len(), 1, "{}", ctx());
    assert_eq!(header(&requests[0], "x-api-key"), [SECRET], "{}", ctx());
    assert!(
        header(&requests[0], "authorization").is_empty(),
        "{}",
        ctx()
    );
    // The sandbox cannot read the file the secret comes from.
    assert!(out.stdout.contains("file: unreadable"), "{}", ctx());
}
