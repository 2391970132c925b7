//! `gateway serve`: several cgroups locked down behind one tunnel, each sandbox under its own
//! policy, credentials and audit name; the kernel tells the tunnel which sandbox made each
//! connection. Real gateway as root, real cgroups, curl inside, TLS upstreams on 127.0.0.1.
//! Run by `cargo xtask test` (README.md).

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{upstream::*, *};

/// A second credential's value, for sandbox B.
const SECRET_B: &str = "gwtest-secret-b-Qw3rTy8UiOp2";

/// A running `gateway serve`.
struct Serve {
    child: Child,
    stderr: PathBuf,
    audit: PathBuf,
}

impl Serve {
    /// Starts serve with `config` and waits until it serves (or panics with its stderr).
    fn start(scratch: &Scratch, config: &str) -> Self {
        let config = scratch.write("serve.toml", config);
        let stderr = scratch.dir.join("serve.stderr");
        let child = Command::new(gateway_bin())
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("API_TOKEN", SECRET)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut serve = Self {
            child,
            stderr,
            audit: scratch.dir.join("audit.jsonl"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !serve.log().contains("serving;") {
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!("serve exited with {status} before serving\n{}", serve.log());
            }
            assert!(
                Instant::now() < deadline,
                "serve not ready\n{}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        serve
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn audit_records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .map(|t| json_lines(&t))
            .unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is our own child.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }

    fn stop(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().unwrap();
        (status, self.log())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// `script` run by sh inside cgroup `cgroup` (relative to the cgroup v2 root) as nobody,
/// with the environment file serve wrote for sandbox `name`: what a launcher does.
fn in_sandbox(cgroup: &str, name: &str, script: &str) -> Command {
    in_sandbox_as(65534, cgroup, name, script)
}

/// [`in_sandbox`] as user `uid`.
fn in_sandbox_as(uid: u32, cgroup: &str, name: &str, script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            r#"echo $$ > "$1/cgroup.procs" && set -a && . "$2" && set +a && exec setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs sh -c "$3""#,
        ))
        .arg("sh")
        .arg(cgroup2_root().join(cgroup))
        .arg(env_file(name))
        .arg(script)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir("/")
        .stdin(Stdio::null());
    c
}

/// A `sleep 60` placed in the cgroup at `dir` (absolute) by the host, as anything could.
fn sleeper_in(dir: &Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && exec sleep 60"#)
        .arg("sh")
        .arg(dir)
        .spawn()
        .unwrap()
}

fn env_file(sandbox: &str) -> PathBuf {
    Path::new("/run/gateway/serve").join(sandbox).join("env")
}

/// The tunnel's address, as the environment file of `sandbox` gives it.
fn tunnel_of(sandbox: &str) -> std::net::SocketAddr {
    let env = std::fs::read_to_string(env_file(sandbox)).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix("HTTPS_PROXY='http://"))
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no HTTPS_PROXY in the env file\n{env}"))
        .parse()
        .unwrap()
}

fn run(c: &mut Command) -> (Output, String) {
    let out = c.output().unwrap();
    let text = format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Runs serve with `config` (written to `scratch`), for a test that expects it to refuse:
/// one that does not runs until stopped, 30 s, then timeout's exit 124.
fn serve_refusing(scratch: &Scratch, config: &str) -> (Output, String) {
    let config = scratch.write("serve.toml", config);
    run(Command::new("timeout")
        .args(["30", gateway_bin(), "serve", "--config"])
        .arg(&config)
        .current_dir("/"))
}

fn curl_replies(out: &Output) -> std::collections::HashMap<String, Reply> {
    replies(&String::from_utf8_lossy(&out.stdout))
}

fn proxy(records: &[Value], sandbox: &str, verdict: &str, host: &str) -> bool {
    records.iter().any(|r| {
        r["layer"] == "proxy"
            && r["sandbox"] == sandbox
            && r["verdict"] == verdict
            && r["host"] == host
    })
}

/// A serve config auditing to `audit.jsonl` in `scratch`, one sandbox per name: cgroup
/// `parent/NAME` under policy `NAME.toml`.
fn host_config(scratch: &Scratch, parent: &str, names: &[&str]) -> String {
    let mut config = format!(
        "version = 1\nname = \"serve-host\"\naudit_log = {:?}\n",
        scratch.dir.join("audit.jsonl").to_str().unwrap()
    );
    for name in names {
        config.push_str(&format!(
            "[[sandbox]]\ncgroup = \"{parent}/{name}\"\npolicy = \"{name}.toml\"\n"
        ));
    }
    config
}

/// A cgroup made for a test, as an operator gives serve one: on drop, everything in it is
/// killed, and it is removed with every cgroup below it.
struct GivenCgroup(PathBuf);

impl GivenCgroup {
    fn new(name: &str) -> Self {
        let dir = cgroup2_root().join(name);
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for GivenCgroup {
    fn drop(&mut self) {
        fn remove_tree(dir: &Path) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&entry.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(100));
        remove_tree(&self.0);
    }
}

/// Audit records, one JSON line each, for a failing test's message.
fn test_cgroup(tag: &str) -> String {
    format!("gateway-test-serve-{}-{tag}", std::process::id())
}

#[test]
fn one_tunnel_serves_two_sandboxes_each_under_its_own_policy() {
    assert_root();
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let scratch = Scratch::new("serve");
    let secret_b = scratch.write("secret-b", SECRET_B);
    // Root's alone: serve refuses a secret file everyone may read.
    std::fs::set_permissions(
        &secret_b,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let a = tunnel_policy(
        "serve-a",
        &pki,
        &format!(
            "{}{API_CREDENTIAL}",
            rule("api.test", api.port, "credential = \"api\"")
        ),
    );
    let b = tunnel_policy(
        "serve-b",
        &pki,
        &format!(
            "{}[credentials.other]\nfile = {:?}\nformat = \"Token {{secret}}\"\n",
            rule("other.test", other.port, "credential = \"other\""),
            secret_b.to_str().unwrap()
        ),
    );
    scratch.write("a.toml", &a);
    scratch.write("b.toml", &b);
    let parent = test_cgroup("ab");
    let serve = Serve::start(&scratch, &host_config(&scratch, &parent, &["a", "b"]));

    let env_a = std::fs::read_to_string(env_file("serve-a")).unwrap();
    let env_b = std::fs::read_to_string(env_file("serve-b")).unwrap();
    let proxy_line = env_a
        .lines()
        .find(|l| l.starts_with("HTTPS_PROXY="))
        .unwrap_or_else(|| panic!("no HTTPS_PROXY in the env file\n{env_a}"))
        .to_owned();
    assert!(
        env_b.contains(&proxy_line),
        "the sandboxes do not share the tunnel\n{env_a}\n{env_b}"
    );
    assert!(env_a.contains("SSL_CERT_FILE='/run/gateway/serve/serve-a/ca-bundle.pem'"));

    let script = |first: &str, second: &str| {
        format!(
            "{CURL}\nr {first} https://{first}/v1/{first}\nr {second} https://{second}/v1/{second}\npython3 -c 'import socket; s=socket.socket(); s.settimeout(5); s.connect((\"127.0.0.1\", {}))' 2>&1 | tail -1\n",
            api.port
        )
    };
    let (out_a, ctx_a) = run(&mut in_sandbox(
        &format!("{parent}/a"),
        "serve-a",
        &script("api.test", "other.test"),
    ));
    let (out_b, ctx_b) = run(&mut in_sandbox(
        &format!("{parent}/b"),
        "serve-b",
        &script("other.test", "api.test"),
    ));
    // A host process outside every sandbox, through the same tunnel.
    let tunnel = proxy_line
        .trim_start_matches("HTTPS_PROXY=")
        .trim_matches('\'')
        .to_owned();
    let (host_out, host_ctx) = run(Command::new("curl")
        .args(["-sS", "-m", "10", "-x", &tunnel, "http://api.test/v1/host"])
        .env_clear());
    let records = serve.audit_records();
    let ctx = || {
        format!(
            "--- sandbox a\n{ctx_a}\n--- sandbox b\n{ctx_b}\n--- host\n{host_ctx}\n--- api\n{}\n--- other\n{}\n--- serve\n{}\n--- audit\n{}",
            api.describe(),
            other.describe(),
            serve.log(),
            joined(&records)
        )
    };

    let ra = curl_replies(&out_a);
    let rb = curl_replies(&out_b);
    let got = |r: &std::collections::HashMap<String, Reply>, n: &str| {
        r.get(n)
            .cloned()
            .unwrap_or_else(|| panic!("no reply {n}\n{}", ctx()))
    };
    assert_eq!(got(&ra, "api.test").code, 200, "{}", ctx());
    assert!(got(&ra, "other.test").forbidden(), "{}", ctx());
    assert_eq!(got(&rb, "other.test").code, 200, "{}", ctx());
    assert!(got(&rb, "api.test").forbidden(), "{}", ctx());
    // Each upstream saw only its own sandbox's request, with that sandbox's credential.
    assert_eq!(api.paths(), ["/v1/api.test"], "{}", ctx());
    assert_eq!(other.paths(), ["/v1/other.test"], "{}", ctx());
    assert_eq!(
        header(&api.requests()[0], "authorization"),
        [format!("Bearer {SECRET}")],
        "{}",
        ctx()
    );
    assert_eq!(
        header(&other.requests()[0], "authorization"),
        [format!("Token {SECRET_B}")],
        "{}",
        ctx()
    );
    // Each refusal carries the name of the sandbox that made the request.
    assert!(proxy(&records, "serve-a", "allow", "api.test"), "{}", ctx());
    assert!(
        proxy(&records, "serve-a", "deny", "other.test"),
        "{}",
        ctx()
    );
    assert!(
        proxy(&records, "serve-b", "allow", "other.test"),
        "{}",
        ctx()
    );
    assert!(proxy(&records, "serve-b", "deny", "api.test"), "{}", ctx());
    // The kernel refuses a direct connection from either sandbox, under its own name.
    for (out, sandbox) in [(&out_a, "serve-a"), (&out_b, "serve-b")] {
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("PermissionError"),
            "{}",
            ctx()
        );
        let dst = format!("127.0.0.1:{}", api.port);
        assert!(
            records.iter().any(|r| r["layer"] == "kernel"
                && r["sandbox"] == sandbox
                && r["hook"] == "connect4"
                && r["dst"] == dst),
            "{}",
            ctx()
        );
    }
    // The host process got nothing and was recorded under the config's name.
    assert!(!host_out.status.success(), "{}", ctx());
    assert!(
        records.iter().any(|r| r["layer"] == "proxy"
            && r["sandbox"] == "serve-host"
            && r["reason"] == "not-a-sandbox"),
        "{}",
        ctx()
    );
    for text in [&env_a, &env_b, &serve.log(), &ctx_a, &ctx_b] {
        assert!(
            !text.contains(SECRET) && !text.contains(SECRET_B),
            "{}",
            ctx()
        );
    }

    // A clean stop removes what serve made: cgroups, pins, environment files.
    let (status, log) = serve.stop();
    assert!(status.success(), "serve exited with {status}\n{log}");
    assert!(!cgroup2_root().join(&parent).exists(), "{log}");
    assert!(!env_file("serve-a").exists() && !env_file("serve-b").exists());
    let audit = std::fs::read_to_string(scratch.dir.join("audit.jsonl")).unwrap();
    assert!(!audit.contains(SECRET) && !audit.contains(SECRET_B));
}

/// A secret one sandbox's credential sends may come back to another: an upstream both reach
/// (a stored-request inspector, a log page) hands it to whichever request comes next. Every
/// sandbox's answers are checked for every sandbox's secrets, those of a sandbox whose
/// policy has no credential at all included.
#[test]
fn a_secret_one_sandbox_sent_never_reaches_another() {
    assert_root();
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let scratch = Scratch::new("serve-cross-echo");
    scratch.write(
        "a.toml",
        &tunnel_policy(
            "serve-echo-a",
            &pki,
            &format!(
                "{}{API_CREDENTIAL}",
                rule("api.test", api.port, "credential = \"api\"")
            ),
        ),
    );
    scratch.write(
        "b.toml",
        &tunnel_policy("serve-echo-b", &pki, &rule("api.test", api.port, "")),
    );
    let parent = test_cgroup("echo");
    let serve = Serve::start(&scratch, &host_config(&scratch, &parent, &["a", "b"]));
    let (out_a, ctx_a) = run(&mut in_sandbox(
        &format!("{parent}/a"),
        "serve-echo-a",
        &format!("{CURL}\nr store https://api.test/v1/store\n"),
    ));
    // Asking for compression: the upstream must be told not to, or the answer could not be
    // read for the secret.
    let (out_b, ctx_b) = run(&mut in_sandbox(
        &format!("{parent}/b"),
        "serve-echo-b",
        &format!(
            "{CURL}\nr stored --compressed https://api.test/last-credential\nr plain https://api.test/v1/plain\n"
        ),
    ));
    let records = serve.audit_records();
    let ctx = || {
        format!(
            "--- sandbox a\n{ctx_a}\n--- sandbox b\n{ctx_b}\n--- api\n{}\n--- serve\n{}\n--- audit\n{}",
            api.describe(),
            serve.log(),
            joined(&records)
        )
    };
    let got = |out: &Output, n: &str| {
        curl_replies(out)
            .get(n)
            .cloned()
            .unwrap_or_else(|| panic!("no reply {n}\n{}", ctx()))
    };
    assert_eq!(got(&out_a, "store").code, 200, "{}", ctx());
    assert_eq!(
        api.paths(),
        ["/v1/store", "/last-credential", "/v1/plain"],
        "{}",
        ctx()
    );
    // The upstream did hand sandbox A's secret to sandbox B's request: cut, and recorded
    // under B's name.
    assert_ne!(got(&out_b, "stored").exit, 0, "{}", ctx());
    assert_eq!(got(&out_b, "plain").code, 200, "{}", ctx());
    assert!(
        !ctx_b.contains(SECRET),
        "sandbox B saw sandbox A's secret\n{}",
        ctx()
    );
    assert!(
        records.iter().any(|r| r["layer"] == "proxy"
            && r["sandbox"] == "serve-echo-b"
            && r["verdict"] == "deny"
            && r["reason"] == "secret-in-response"
            && r["path"] == "/last-credential"
            && r["status"].is_null()
            && r["credential"].is_null()),
        "{}",
        ctx()
    );
    let stored = &api.requests()[1];
    assert_eq!(header(stored, "accept-encoding"), ["identity"], "{}", ctx());
    assert!(header(stored, "authorization").is_empty(), "{}", ctx());
}

/// With `user`, only that user's connections to the tunnel come from the sandbox: another
/// user's processes there, which could take (or be taken) another sandbox's connections,
/// are refused by the kernel and recorded.
#[test]
fn a_sandbox_with_a_user_serves_only_that_user() {
    assert_root();
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let scratch = Scratch::new("serve-user");
    let tunnel_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // 0.0.0.0 reaches 127.0.0.1: listed, it must still be the sandbox's user's only.
    let policy = tunnel_policy(
        "serve-user",
        &pki,
        &format!(
            "{}{API_CREDENTIAL}[[network.allow]]\ncidr = \"0.0.0.0/32\"\nports = [{tunnel_port}]\n",
            rule("api.test", api.port, "credential = \"api\"")
        ),
    );
    scratch.write("u.toml", &policy);
    let parent = test_cgroup("user");
    let config = format!(
        "{}user = \"4242\"\n",
        host_config(&scratch, &parent, &["u"])
    )
    .replacen(
        "version = 1\n",
        &format!("version = 1\nlisten = \"127.0.0.1:{tunnel_port}\"\n"),
        1,
    );
    let serve = Serve::start(&scratch, &config);
    let cgroup = format!("{parent}/u");
    let script = format!(
        "{CURL}\nr api https://api.test/v1/user\npython3 -c 'import socket; socket.create_connection((\"0.0.0.0\", {tunnel_port}), timeout=5); print(\"zero: connected\")' 2>&1 | tail -1\n"
    );
    let (own, own_ctx) = run(&mut in_sandbox_as(4242, &cgroup, "serve-user", &script));
    let (other, other_ctx) = run(&mut in_sandbox_as(4243, &cgroup, "serve-user", &script));
    let refused = |r: &Value| {
        r["layer"] == "kernel"
            && r["sandbox"] == "serve-user"
            && r["reason"] == "not-the-sandbox-user"
            && r["uid"] == 4243
    };
    let zero = format!("0.0.0.0:{tunnel_port}");
    let refused_zero = |r: &Value| refused(r) && r["dst"] == zero.as_str();
    // Kernel events reach the log a moment after the call they refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !serve.audit_records().iter().any(refused_zero) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let records = serve.audit_records();
    let ctx = || {
        format!(
            "--- as 4242\n{own_ctx}\n--- as 4243\n{other_ctx}\n--- serve\n{}\n--- audit\n{}",
            serve.log(),
            joined(&records)
        )
    };
    let reply = |out: &Output| curl_replies(out).get("api").cloned();
    assert_eq!(reply(&own).map(|r| r.code), Some(200), "{}", ctx());
    assert_ne!(reply(&other).map(|r| r.code), Some(200), "{}", ctx());
    let said = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said(&own).contains("zero: connected"), "{}", ctx());
    assert!(said(&other).contains("PermissionError"), "{}", ctx());
    assert_eq!(api.paths(), ["/v1/user"], "{}", ctx());
    assert!(records.iter().any(refused), "{}", ctx());
    assert!(records.iter().any(refused_zero), "{}", ctx());
}

#[test]
fn serve_refuses_busy_cgroups_reloads_on_sighup_and_kills_its_sandboxes_at_exit() {
    assert_root();
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let scratch = Scratch::new("serve-reload");
    let cgroup = test_cgroup("given");
    let given = GivenCgroup::new(&cgroup);
    let dir = given.0.clone();
    let config = format!(
        "version = 1\naudit_log = {:?}\n[[sandbox]]\ncgroup = \"{cgroup}\"\npolicy = \"p.toml\"\n",
        scratch.dir.join("audit.jsonl").to_str().unwrap()
    );
    let config_file = scratch.write("serve.toml", &config);
    let closed = tunnel_policy("serve-reload", &pki, "");
    scratch.write("p.toml", &closed);

    // A process already in the cgroup could hold a socket made before the lockdown.
    let mut early = sleeper_in(&dir);
    std::thread::sleep(Duration::from_millis(200));
    let (refused, ctx) = run(Command::new(gateway_bin())
        .args(["serve", "--config"])
        .arg(&config_file));
    assert_eq!(refused.status.code(), Some(1), "{ctx}");
    assert!(ctx.contains("already has processes"), "{ctx}");
    assert!(
        early.try_wait().unwrap().is_none(),
        "serve killed a process it refused to take over"
    );
    assert!(dir.is_dir(), "serve removed a cgroup it was given");
    let _ = early.kill();
    let _ = early.wait();

    let serve = Serve::start(&scratch, &config);
    let curl = format!("{CURL}\nr api https://api.test/v1/reload\n");
    let (before, before_ctx) = run(&mut in_sandbox(&cgroup, "serve-reload", &curl));
    scratch.write(
        "p.toml",
        &tunnel_policy("serve-reload", &pki, &rule("api.test", api.port, "")),
    );
    serve.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !serve
        .audit_records()
        .iter()
        .any(|r| r["reason"] == "policy-reloaded" && r["sandbox"] == "serve-reload")
    {
        assert!(Instant::now() < deadline, "no reload\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (after, after_ctx) = run(&mut in_sandbox(&cgroup, "serve-reload", &curl));
    let ctx = || format!("{before_ctx}\n{after_ctx}\n{}", serve.log());
    assert!(curl_replies(&before)["api"].forbidden(), "{}", ctx());
    assert_eq!(curl_replies(&after)["api"].code, 200, "{}", ctx());
    assert_eq!(api.paths(), ["/v1/reload"], "{}", ctx());

    // Emptied, the cgroup still cannot be removed while serve runs: one made again under
    // its name would have none of the sandbox's programs.
    let removed = std::fs::remove_dir(&dir);
    assert_eq!(
        removed.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EBUSY)),
        "{}",
        ctx()
    );

    // A recursive delete removes the hold first, then the cgroup: made again, it has none
    // of the programs. Serve finds it within a second, kills what was placed in it, records
    // it, and keeps the hold of a cgroup that is still the sandbox's.
    std::fs::remove_dir(dir.join("gateway-hold")).unwrap();
    std::fs::remove_dir(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let mut placed = sleeper_in(&dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    while placed.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "a process in the remade cgroup lived on\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        serve.audit_records().iter().any(|r| r["layer"] == "gateway"
            && r["verdict"] == "deny"
            && r["reason"] == "sandbox-cgroup-replaced"
            && r["sandbox"] == "serve-reload"),
        "{}",
        serve.log()
    );
    assert!(
        serve.log().contains("removed and made again"),
        "{}",
        serve.log()
    );

    // A sandboxed process still running when serve stops is killed, not left without a
    // tunnel; the cgroup serve was given stays.
    let mut lingering = in_sandbox(&cgroup, "serve-reload", "exec sleep 600")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (status, log) = serve.stop();
    assert!(status.success(), "serve exited with {status}\n{log}");
    let killed = lingering.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed),
        Some(libc::SIGKILL),
        "{log}"
    );
    assert!(dir.is_dir(), "serve removed a cgroup it was given\n{log}");
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
        "",
        "{log}"
    );
    // Left as it was given: removable again.
    assert!(!dir.join("gateway-hold").exists(), "{log}");
}

#[test]
fn config_errors_name_file_line_and_column() {
    assert_root();
    let scratch = Scratch::new("serve-config");
    let config = scratch.write(
        "serve.toml",
        "version = 1\nlisten = \"0.0.0.0:3128\"\n[[sandbox]]\ncgroup = \"x\"\npolicy = \"missing.toml\"\n",
    );
    let (out, ctx) = run(Command::new(gateway_bin())
        .args(["serve", "--config"])
        .arg(&config));
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{}:2:10: listen must be a loopback address",
            config.display()
        )),
        "{ctx}"
    );
    let config = scratch.write(
        "serve.toml",
        "version = 1\n[[sandbox]]\ncgroup = \"x\"\npolicy = \"missing.toml\"\n",
    );
    let (out, ctx) = run(Command::new(gateway_bin())
        .args(["serve", "--config"])
        .arg(&config));
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.toml:1:1: cannot read policy file"),
        "{ctx}"
    );
    assert!(!cgroup2_root().join("x").exists(), "{ctx}");
    // A file the policy names that cannot be read stops serve before anything exists too.
    let cgroup = test_cgroup("badca");
    scratch.write(
        "p.toml",
        &policy(
            "serve-badca",
            "[tls]\nupstream_ca = [\"/nonexistent/ca.pem\"]\n",
        ),
    );
    let config = scratch.write(
        "serve.toml",
        &format!("version = 1\n[[sandbox]]\ncgroup = \"{cgroup}\"\npolicy = \"p.toml\"\n"),
    );
    let (out, ctx) = run(Command::new(gateway_bin())
        .args(["serve", "--config"])
        .arg(&config));
    assert!(!out.status.success(), "{ctx}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"),
        "{ctx}"
    );
    assert!(!cgroup2_root().join(&cgroup).exists(), "{ctx}");
}

#[test]
fn a_crashed_serve_leaves_its_sandbox_without_egress_until_the_next_serve_cleans_up() {
    assert_root();
    let scratch = Scratch::new("serve-crash");
    let cgroup = test_cgroup("crash");
    let config = format!(
        "version = 1\naudit_log = {:?}\n[[sandbox]]\ncgroup = \"{cgroup}\"\npolicy = \"p.toml\"\n",
        scratch.dir.join("audit.jsonl").to_str().unwrap()
    );
    scratch.write("p.toml", &policy("serve-crash", ""));
    let mut serve = Serve::start(&scratch, &config);
    let host = HostTcp::bind("127.0.0.1:0");
    let mut lingering = in_sandbox(&cgroup, "serve-crash", "exec sleep 600")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    serve.signal(libc::SIGKILL);
    let _ = serve.child.wait();
    // The programs stay pinned: no tunnel, and no other way out. The tunnel's port is free
    // now; an unprivileged host process that takes it gets nothing of the sandbox.
    let squatter = Squatter::bind(tunnel_of("serve-crash"));
    let probe = format!(
        r#"python3 -c '
import socket, os
def attempt(port):
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port)); return "connected"
    except OSError as e:
        return str(e.errno)
proxy = os.environ["HTTP_PROXY"].rsplit(":", 1)[1]
print("direct", attempt({}), "tunnel", attempt(int(proxy)))
'"#,
        host.port
    );
    let (out, ctx) = run(&mut in_sandbox(&cgroup, "serve-crash", &probe));
    let squatted = squatter.stop();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("direct {} tunnel {}", libc::EPERM, libc::EPERM),
        "{ctx}\nthe squatter got: {squatted:?}"
    );
    assert!(squatted.is_empty(), "{squatted:?}\n{ctx}");
    assert_eq!(host.accepted(), 0);

    // The next serve kills what the crashed one left inside, unpins, and takes over.
    let serve = Serve::start(&scratch, &config);
    let killed = lingering.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed),
        Some(libc::SIGKILL),
        "{}",
        serve.log()
    );
    assert!(
        serve
            .log()
            .contains("cleaned up after a crashed gateway: serve-crash"),
        "{}",
        serve.log()
    );
    let (out, ctx) = run(&mut in_sandbox(&cgroup, "serve-crash", &probe));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("direct {} tunnel connected", libc::EPERM),
        "{ctx}\n{}",
        serve.log()
    );
    let (status, log) = serve.stop();
    assert!(status.success(), "serve exited with {status}\n{log}");
    assert!(!cgroup2_root().join(&cgroup).exists(), "{log}");
}

/// Python for a served sandbox: in a user and network namespace of its own, listens on the
/// tunnel's address and port (argv 1, 2) and connects to that listener from port argv 3, so
/// the kernel sees a connection to "the tunnel" from 127.0.0.1:<argv 3>; holds the attempt
/// while the test connects from that same address in the host's namespace.
const OWN_NETNS: &str = r#"
import ctypes, fcntl, json, os, socket, struct, sys, time
host, port, client_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x40000000) != 0:
    print(json.dumps({"unshare": os.strerror(ctypes.get_errno())}), flush=True)
    sys.exit(1)
# lo up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP), as root of the new namespaces.
flags = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ifr = fcntl.ioctl(flags, 0x8913, struct.pack("16sH14x", b"lo", 0))
fcntl.ioctl(flags, 0x8914, struct.pack("16sH14x", b"lo", struct.unpack("16sH", ifr[:18])[1] | 1))
listener = socket.socket()
listener.bind((host, port))
listener.listen()
client = socket.socket()
client.bind((host, client_port))
# The kernel would record a tunnel client as its SYN leaves; the handshake need not finish
# (the cgroup's packet filter drops the listener's answer, so the SYN is retried meanwhile).
client.setblocking(False)
print(json.dumps({"held": True, "connect": client.connect_ex((host, port))}), flush=True)
time.sleep(10)
"#;

/// When the audit log fails (its disk full), serve's exit does not detach the sandbox's
/// programs and so destroy the refusals still in their ring: it fails, saying what to do,
/// and `gateway cleanup` saves them once the log has room.
#[test]
fn refusals_a_full_audit_log_could_not_take_outlive_serve_for_cleanup() {
    assert_root();
    let scratch = Scratch::new("serve-full");
    let disk = SmallFs::mount(scratch.dir.join("auditfs"), "16k");
    let log = disk.0.join("audit.jsonl");
    let cgroup = test_cgroup("full");
    let config = format!(
        "version = 1\naudit_log = {:?}\n[[sandbox]]\ncgroup = \"{cgroup}\"\npolicy = \"p.toml\"\n",
        log.to_str().unwrap()
    );
    scratch.write("p.toml", &policy("serve-full", ""));
    let serve = Serve::start(&scratch, &config);
    let after = HostTcp::bind("127.0.0.1:0");
    // Refusals to 200 ports below the ephemeral range (a record is ~300 bytes; repeats of
    // one refusal would make one record) until the log is surely full, then to `after`:
    // only the ring can hold those.
    let script = format!(
        r#"python3 -c '
import socket, time
def attempt(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close(); return 1
    except OSError:
        return 0
opened = sum(attempt(1000 + i) for i in range(200))
time.sleep(1.5)
print(opened + sum(attempt({}) for _ in range(20)))
'"#,
        after.port
    );
    let (out, ctx) = run(&mut in_sandbox(&cgroup, "serve-full", &script));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{ctx}");
    let (status, stderr) = serve.stop();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("sandbox serve-full: it is dead, and its programs stay pinned in /sys/fs/bpf/gateway/")
            && stderr.contains(&format!(
                " with the refusals not yet in the log: make {} writable (space, permissions, mount) and run `gateway cleanup`",
                log.display()
            )),
        "{stderr}"
    );
    let read = || json_lines(&std::fs::read_to_string(&log).unwrap());
    let dst = format!("127.0.0.1:{}", after.port);
    let to_after = |records: &[Value]| {
        records
            .iter()
            .filter(|r| r["hook"] == "connect4" && r["dst"] == dst && r["sandbox"] == "serve-full")
            .count()
    };
    assert_eq!(to_after(&read()), 0, "the log was not full yet");

    disk.make_room_and_clean_up();
    let records = read();
    let lost: u64 = lost_in(&records);
    // The reader took none of them off the ring: the log had failed before.
    assert_eq!(to_after(&records), 20, "{lost} lost\n{}", joined(&records));
    assert_eq!(after.accepted(), 0);
    assert!(
        !cgroup2_root().join(&cgroup).exists(),
        "cleanup left the cgroup"
    );
    assert_chain_verifies(&log);
}

/// The kernel only records tunnel clients in the tunnel's own network namespace. A served
/// sandbox (serve starts no process, so no seccomp filter of the gateway's stops it) that
/// makes a network namespace and connects there to its own listener on the tunnel's address
/// and port must not make an entry that a host process connecting from the same address and
/// port is then claimed by. That connection is refused at connect, too (`not-the-tunnel`):
/// the listener that would take it is not the gateway's.
#[test]
fn a_sandbox_in_a_network_namespace_of_its_own_makes_no_tunnel_client() {
    assert_root();
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let scratch = Scratch::new("serve-netns");
    scratch.write(
        "a.toml",
        &tunnel_policy(
            "serve-netns",
            &pki,
            &format!(
                "{}{API_CREDENTIAL}",
                rule("api.test", api.port, "credential = \"api\"")
            ),
        ),
    );
    let script = scratch.write("own_netns.py", OWN_NETNS);
    let parent = test_cgroup("netns");
    let serve = Serve::start(&scratch, &host_config(&scratch, &parent, &["a"]));
    let tunnel = tunnel_of("serve-netns");
    let client_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sandbox = in_sandbox(
        &format!("{parent}/a"),
        "serve-netns",
        &format!(
            "python3 {} {} {} {client_port}",
            script.display(),
            tunnel.ip(),
            tunnel.port()
        ),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut held = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sandbox.stdout.take().unwrap()),
        &mut held,
    )
    .unwrap();
    if !held.contains("held") {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut sandbox.stderr.take().unwrap(), &mut err);
        panic!(
            "the sandbox did not connect: {held:?}\n{err}\n{}",
            serve.log()
        );
    }
    // A host process, outside every sandbox, from the same address and port.
    let (host, host_ctx) = run(Command::new("python3").args([
        "-c",
        r#"
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.connect((sys.argv[2], int(sys.argv[3])))
s.sendall(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
s.settimeout(10)
try:
    print(s.recv(4096).decode(errors="replace").split("\r\n")[0])
except OSError as e:
    print("closed:", e)
"#,
        &client_port.to_string(),
        &tunnel.ip().to_string(),
        &tunnel.port().to_string(),
    ]));
    let answer = String::from_utf8_lossy(&host.stdout).into_owned();
    let _ = sandbox.kill();
    let _ = sandbox.wait();
    let records = serve.audit_records();
    let (_, log) = serve.stop();
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "the host process was taken for the sandbox: {answer:?}\n{host_ctx}\n{log}"
    );
    let client = format!("127.0.0.1:{client_port}");
    assert!(
        records
            .iter()
            .any(|r| r["reason"] == "not-a-sandbox" && r["client"] == client.as_str()),
        "no not-a-sandbox record for {client}\n{records:?}\n{log}"
    );
    // The sandbox's own connection never left: what listens on the tunnel's address in its
    // namespace is not the gateway's tunnel. Refused at connect, and recorded.
    let held: serde_json::Value = serde_json::from_str(&held).unwrap();
    assert_eq!(held["connect"], libc::EPERM, "{held}\n{log}");
    assert!(
        records.iter().any(|r| r["reason"] == "not-the-tunnel"
            && r["sandbox"] == "serve-netns"
            && r["hook"] == "connect4"
            && r["dst"] == tunnel.to_string().as_str()),
        "no not-the-tunnel record\n{records:?}\n{log}"
    );
}

/// Serve reads every secret before it creates anything, and refuses a secret file the
/// sandbox's user could read (or, for a sandbox without `user`, anyone could).
#[test]
fn serve_refuses_secret_files_its_sandboxes_could_read() {
    use std::os::unix::fs::PermissionsExt as _;
    assert_root();
    let scratch = Scratch::new("serve-secret-file");
    let secret = "gwtest-serve-file-secret-Hh61";
    let file = scratch.write("token", &format!("{secret}\n"));
    std::os::unix::fs::chown(&file, Some(4242), Some(4242)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = file.to_str().unwrap();
    scratch.write(
        "f.toml",
        &policy(
            "serve-file",
            &format!(
                "[[http.allow]]\nhost = \"api.test\"\ncredential = \"api\"\n[credentials.api]\nfile = {path:?}\n"
            ),
        ),
    );
    let parent = test_cgroup("secret-file");
    // A serve that does not refuse would run until stopped: 30 s, then timeout's exit 124.
    let serve = |config: &str| serve_refusing(&scratch, config);
    let (out, ctx) = serve(&format!(
        "{}user = \"4242\"\n",
        host_config(&scratch, &parent, &["f"])
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    for part in [
        "credential `api`",
        &format!("secret file {path} is owned by uid 4242, the sandbox's user"),
        &format!("chown root:root {path} && chmod 600 {path}"),
        "`user`",
    ] {
        assert!(stderr.contains(part), "no {part:?}\n{ctx}");
    }
    assert!(!stderr.contains(secret), "{ctx}");
    assert!(!cgroup2_root().join(&parent).exists(), "{ctx}");

    // Without `user` only what everyone may read is known to be readable inside.
    std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (out, ctx) = serve(&host_config(&scratch, &parent, &["f"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(
        stderr.contains(&format!(
            "secret file {path} is readable by everyone (mode 644)"
        )),
        "{ctx}"
    );
    assert!(!stderr.contains(secret), "{ctx}");
    assert!(!cgroup2_root().join(&parent).exists(), "{ctx}");

    // One tunnel serves every sandbox: another sandbox's user must not read it either
    // (nobody, through its group nogroup; 4242 could not).
    std::os::unix::fs::chown(&file, Some(0), Some(65534)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    scratch.write("g.toml", &policy("serve-file-other", ""));
    let config = host_config(&scratch, &parent, &["f", "g"]).replace(
        "policy = \"f.toml\"\n",
        "policy = \"f.toml\"\nuser = \"4242\"\n",
    ) + "user = \"65534\"\n";
    let (out, ctx) = serve(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(
        stderr.contains(&format!(
            "secret file {path} is readable by group 65534 (mode 640), a group of the user of another sandbox this gateway serves, so a command in another sandbox could read the secret itself"
        )),
        "{ctx}"
    );
    assert!(!stderr.contains(secret), "{ctx}");
    assert!(!cgroup2_root().join(&parent).exists(), "{ctx}");
}

/// A secret variable missing under serve is to be exported where serve runs.
#[test]
fn a_missing_secret_variable_names_the_command_that_reads_it() {
    assert_root();
    let scratch = Scratch::new("serve-missing-env");
    scratch.write(
        "m.toml",
        &policy(
            "serve-missing",
            "[[http.allow]]\nhost = \"api.test\"\ncredential = \"api\"\n[credentials.api]\nenv = \"GATEWAY_TEST_UNSET_TOKEN\"\n",
        ),
    );
    let parent = test_cgroup("missing-env");
    let config = scratch.write("serve.toml", &host_config(&scratch, &parent, &["m"]));
    let (out, ctx) = run(Command::new(gateway_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("GATEWAY_TEST_UNSET_TOKEN"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(
        stderr.contains("$GATEWAY_TEST_UNSET_TOKEN, which is not set: export it in the environment of gateway serve"),
        "{ctx}"
    );
    assert!(!stderr.contains("gateway run"), "{ctx}");
    assert!(!cgroup2_root().join(&parent).exists(), "{ctx}");
}

/// A cgroup inside a subtree delegated to the sandbox's user (systemd's `Delegate=yes` hands
/// it `cgroup.procs`): the kernel lets whoever may write the common ancestor's `cgroup.procs`
/// move a process between two cgroups, so a sandboxed process could move itself up to the
/// parent, where none of the sandbox's programs are. Serve refuses such a cgroup before
/// anything starts, with or without `user` in the config.
#[test]
fn serve_refuses_a_cgroup_its_sandbox_could_move_out_of() {
    assert_root();
    let scratch = Scratch::new("serve-leave");
    let parent = test_cgroup("leave");
    let given = GivenCgroup::new(&parent);
    let dir = given.0.clone();
    let delegate = nix::unistd::Uid::from_raw(4401);
    nix::unistd::chown(&dir, Some(delegate), None).unwrap();
    nix::unistd::chown(&dir.join("cgroup.procs"), Some(delegate), None).unwrap();

    // What a process of that user in a cgroup below could do: move itself up.
    let probe = dir.join("probe");
    std::fs::create_dir(&probe).unwrap();
    let moved = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/probe/cgroup.procs" && exec setpriv --reuid=4401 --regid=4401 --clear-groups sh -c 'echo $$ > "$0/cgroup.procs" && cat /proc/self/cgroup' "$1""#)
        .arg("sh")
        .arg(&dir)
        .output()
        .unwrap();
    let unified = String::from_utf8_lossy(&moved.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned));
    assert_eq!(
        unified,
        Some(format!("/{parent}")),
        "the premise: {moved:?}"
    );

    scratch.write("a.toml", &policy("serve-leave", ""));
    for user in ["user = \"4401\"\n", ""] {
        let config = format!("{}{user}", host_config(&scratch, &parent, &["a"]));
        let (out, _) = serve_refusing(&scratch, &config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{user:?}\n{stderr}");
        assert!(
            stderr.contains(&format!("{}/cgroup.procs may be written by", dir.display())),
            "{user:?}\n{stderr}"
        );
        assert!(!dir.join("a").exists(), "{user:?}\n{stderr}");
    }
}

/// Waits up to `limit` for a reload record of each sandbox in `sandboxes` after the first
/// `seen` records; returns them in that order.
fn reload_notes(serve: &Serve, seen: usize, sandboxes: &[&str], limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let notes: Vec<Value> = serve
            .audit_records()
            .into_iter()
            .filter(|r| r["layer"] == "gateway" && r.get("policy_file").is_some())
            .skip(seen)
            .collect();
        let found: Vec<Value> = sandboxes
            .iter()
            .filter_map(|s| notes.iter().find(|r| r["sandbox"] == *s).cloned())
            .collect();
        if found.len() == sandboxes.len() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no reload record of each of {sandboxes:?} within {limit:?}\n{notes:?}\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn refused_with(note: &Value, wanted: &str) -> bool {
    note["reason"] == "policy-reload-refused"
        && note["errors"].as_array().is_some_and(|e| {
            e.iter()
                .any(|l| l.as_str().is_some_and(|l| l.contains(wanted)))
        })
}

/// Sandbox A's user owns A's policy file: from inside, A rewrites it to send sandbox B's
/// secret (a file only root may read) with A's requests to B's host. At the operator's next
/// SIGHUP, A's reload is refused (serve warned of it at start) and B's goes through; B's
/// upstream never sees B's secret from A. Nor is the file reloaded once it is the user's of
/// the other sandbox: that user could have written it as well.
#[test]
fn a_sandbox_cannot_rewrite_its_policy_file_to_take_another_sandbox_s_secret() {
    use std::os::unix::fs::{PermissionsExt as _, chown};
    assert_root();
    let pki = Pki::new();
    let api = Server::upstream(&pki, "api");
    let other = Server::upstream(&pki, "other");
    let scratch = Scratch::new("serve-own-policy");
    let secret_b = scratch.write("secret-b", SECRET_B);
    std::fs::set_permissions(&secret_b, std::fs::Permissions::from_mode(0o600)).unwrap();
    let a = tunnel_policy(
        "serve-own-a",
        &pki,
        &format!(
            "{}{API_CREDENTIAL}",
            rule("api.test", api.port, "credential = \"api\"")
        ),
    );
    let b_credential = format!(
        "[credentials.other]\nfile = {:?}\nformat = \"Token {{secret}}\"\n",
        secret_b.to_str().unwrap()
    );
    let b = tunnel_policy(
        "serve-own-b",
        &pki,
        &format!(
            "{}{b_credential}",
            rule("other.test", other.port, "credential = \"other\"")
        ),
    );
    let evil = format!(
        "{a}{}{}",
        rule("other.test", other.port, "credential = \"stolen\""),
        b_credential.replace("credentials.other", "credentials.stolen")
    );
    let a_file = scratch.write("a.toml", &a);
    chown(&a_file, Some(4301), Some(4301)).unwrap();
    scratch.write("b.toml", &b);
    scratch.write("evil.toml", &evil);
    let parent = test_cgroup("own-policy");
    let config = format!(
        "version = 1\naudit_log = {:?}\n\
         [[sandbox]]\ncgroup = \"{parent}/a\"\npolicy = \"a.toml\"\nuser = \"4301\"\n\
         [[sandbox]]\ncgroup = \"{parent}/b\"\npolicy = \"b.toml\"\nuser = \"4302\"\n",
        scratch.dir.join("audit.jsonl").to_str().unwrap()
    );
    let serve = Serve::start(&scratch, &config);
    let started = serve.log();
    let a_cgroup = format!("{parent}/a");
    let (rewrite, rewrite_ctx) = run(&mut in_sandbox_as(
        4301,
        &a_cgroup,
        "serve-own-a",
        &format!("cat {0}/evil.toml > {0}/a.toml", scratch.dir.display()),
    ));
    assert!(rewrite.status.success(), "{rewrite_ctx}");
    assert_eq!(std::fs::read_to_string(&a_file).unwrap(), evil);
    serve.signal(libc::SIGHUP);
    let notes = reload_notes(
        &serve,
        0,
        &["serve-own-a", "serve-own-b"],
        Duration::from_secs(30),
    );
    // The same file, B's user's now.
    chown(&a_file, Some(4302), Some(4302)).unwrap();
    serve.signal(libc::SIGHUP);
    let others = reload_notes(
        &serve,
        2,
        &["serve-own-a", "serve-own-b"],
        Duration::from_secs(30),
    );
    let (after, after_ctx) = run(&mut in_sandbox_as(
        4301,
        &a_cgroup,
        "serve-own-a",
        &format!("{CURL}\nr other https://other.test/v1/stolen\n"),
    ));
    let (status, log) = serve.stop();
    // Not the upstream's log: it would show B's secret.
    let ctx = || {
        format!(
            "{after_ctx}\n--- other's paths\n{:?}\n--- notes\n{notes:?}\n{others:?}\n--- serve\n{log}",
            other.paths()
        )
    };

    let a_path = a_file.display().to_string();
    // B's secret never left with A's request (before the fix it did, and got a 200).
    let leaked = other.requests().iter().any(|r| {
        header(r, "authorization")
            .iter()
            .any(|v| v.contains(SECRET_B))
    });
    assert!(!leaked, "B's secret reached B's upstream from A\n{}", ctx());
    assert!(other.requests().is_empty(), "{}", ctx());
    assert!(curl_replies(&after)["other"].forbidden(), "{}", ctx());
    assert!(
        refused_with(
            &notes[0],
            &format!("policy file {a_path}: it is owned by uid 4301, the sandbox's user")
        ),
        "{}",
        ctx()
    );
    assert_eq!(notes[1]["reason"], "policy-reloaded", "{}", ctx());
    assert!(
        refused_with(
            &others[0],
            &format!(
                "policy file {a_path}: it is owned by uid 4302, the user of another sandbox this gateway serves, so a command in another sandbox could have rewritten it"
            )
        ),
        "{}",
        ctx()
    );
    assert_eq!(others[1]["reason"], "policy-reloaded", "{}", ctx());
    for part in [
        format!("policy file {a_path}: it is owned by uid 4301, the sandbox's user"),
        "SIGHUP reloads of this file will be refused".to_owned(),
    ] {
        assert!(started.contains(&part), "no {part:?} at start\n{started}");
    }
    assert!(status.success(), "{}", ctx());
    assert!(!log.contains(SECRET_B) && !after_ctx.contains(SECRET_B));
}

/// A FIFO at one sandbox's policy path: its reload is refused at once, the other sandbox's
/// goes through, and serve still stops on SIGTERM.
#[test]
fn a_fifo_as_a_served_policy_file_is_refused_and_the_others_still_reload() {
    assert_root();
    let scratch = Scratch::new("serve-fifo");
    scratch.write("a.toml", &policy("serve-fifo-a", ""));
    scratch.write("b.toml", &policy("serve-fifo-b", ""));
    let parent = test_cgroup("fifo");
    let serve = Serve::start(&scratch, &host_config(&scratch, &parent, &["a", "b"]));
    let fifo = Fifo::replace(&scratch.dir.join("a.toml"));
    let sent = Instant::now();
    serve.signal(libc::SIGHUP);
    let notes = reload_notes(
        &serve,
        0,
        &["serve-fifo-a", "serve-fifo-b"],
        Duration::from_secs(10),
    );
    let took = sent.elapsed();
    let stopping = Instant::now();
    let (status, log) = serve.stop();
    let stop_took = stopping.elapsed();
    drop(fifo);

    assert!(
        refused_with(&notes[0], "not a regular file"),
        "{notes:?}\n{log}"
    );
    assert_eq!(notes[1]["reason"], "policy-reloaded", "{notes:?}\n{log}");
    assert!(took < Duration::from_secs(5), "the reloads took {took:?}");
    assert!(status.success(), "serve exited with {status}\n{log}");
    assert!(
        stop_took < Duration::from_secs(10),
        "stopping took {stop_took:?}"
    );
}
