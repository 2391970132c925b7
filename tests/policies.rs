//! `gateway policy check` and `gateway policy explain`, run as the real binary: every error
//! class at its exact line and column, all errors of a file at once, warnings that do not
//! refuse, every example in policies/ valid, and an allowed and a denied request for each.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn example(name: &str) -> PathBuf {
    examples_dir().join(name)
}

/// A directory of its own for the policies one test writes, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("gateway-policies-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let file = self.0.join(name);
        std::fs::write(&file, text).unwrap();
        file
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn ran(out: Output) -> Ran {
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check(files: &[&Path]) -> Ran {
    ran(gateway()
        .args(["policy", "check"])
        .args(files)
        .output()
        .unwrap())
}

/// Checks `text` as a policy file and returns its messages with the file name cut off
/// (`LINE:COL: message`), asserting the exit code.
fn messages(text: &str, code: i32) -> Vec<String> {
    let scratch = Scratch::new("messages");
    let file = scratch.write("p.toml", text);
    let r = check(&[&file]);
    assert_eq!(
        r.code,
        Some(code),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    let prefix = format!("{}:", file.display());
    r.stderr
        .lines()
        .map(|l| {
            l.strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("not FILE:LINE:COL: {l}"))
                .to_owned()
        })
        .collect()
}

/// The only error of a policy that has exactly one.
fn only_error(text: &str) -> String {
    let m = messages(text, 2);
    assert_eq!(m.len(), 1, "{m:#?}");
    m.into_iter().next().unwrap()
}

#[test]
fn every_example_policy_passes_check() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "anthropic.toml",
        "default-deny.toml",
        "github.toml",
        "internal-database.toml",
        "mcp-remote.toml",
        "package-mirror.toml",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let r = check(&refs);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // Examples are clean: not even a warning.
    assert_eq!(r.stderr, "", "examples should check without warnings");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), files.len(), "{}", r.stdout);
    for (line, file) in lines.iter().zip(&files) {
        assert!(
            line.starts_with(&format!("{}: ok (", file.display())),
            "{line}"
        );
    }
    assert!(
        r.stdout.contains(&format!(
            "{}: ok (3 http rules, 0 network rules, 2 credentials)",
            example("github.toml").display()
        )),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!(
            "{}: ok (0 http rules, 1 network rule, 0 credentials)",
            example("internal-database.toml").display()
        )),
        "{}",
        r.stdout
    );
}

#[test]
fn unknown_key_with_did_you_mean() {
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\nmethod = [\"GET\"]\n"),
        "4:1: unknown key `method` in [[http.allow]]: did you mean `methods`?"
    );
    assert_eq!(
        only_error("version = 1\n\n[tunnel]\n  lisen = \"127.0.0.1:0\"\n"),
        "4:3: unknown key `lisen` in [tunnel]: did you mean `listen`?"
    );
    // Far from every key: the keys are listed instead.
    assert_eq!(
        only_error(
            "version = 1\n[[network.allow]]\ncidr = \"10.0.0.1\"\nports = [1]\ncolour = 3\n"
        ),
        "5:1: unknown key `colour` in [[network.allow]]: expected one of `cidr`, `ports`, `protocol`"
    );
}

#[test]
fn wrong_type() {
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\nport = \"443\"\n"),
        "4:8: `port` must be an integer, found a string"
    );
    assert_eq!(
        only_error("version = 1\n[[network.allow]]\ncidr = \"10.0.0.1\"\nports = 5432\n"),
        "4:9: `ports` must be an array of ports (write ports = [5432]), found an integer"
    );
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\nmethods = [\"GET\", 7]\n"),
        "4:19: each entry of `methods` must be a string, found an integer"
    );
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\nprivate = \"yes\"\n"),
        "4:11: `private` must be true or false, found a string"
    );
    assert_eq!(
        only_error("version = 1\n[http.allow]\nhost = \"a.test\"\n"),
        "2:1: `http.allow` must be an array of tables (write each entry under its own [[http.allow]] header), found a table"
    );
}

#[test]
fn missing_required_key() {
    assert_eq!(
        only_error("version = 1\n\n[[http.allow]]\nport = 8443\n"),
        "3:1: missing required key `host` in [[http.allow]]: add host = \"api.example.com\""
    );
    assert_eq!(
        only_error("version = 1\n[[network.allow]]\ncidr = \"10.0.0.1\"\n"),
        "2:1: missing required key `ports` in [[network.allow]]: add ports = [PORT] (numbers or \"8000-8100\" ranges)"
    );
    assert_eq!(
        only_error("name = \"x\"\n"),
        "1:1: missing required key `version`: start the file with `version = 1`"
    );
}

#[test]
fn bad_cidr() {
    assert_eq!(
        only_error("version = 1\n[[network.allow]]\ncidr = \"10.0.0.0/33\"\nports = [22]\n"),
        "3:8: bad CIDR `10.0.0.0/33`: expected an address or prefix like \"10.0.0.0/8\""
    );
    assert_eq!(
        only_error("version = 1\n[[network.allow]]\ncidr = \"db.internal\"\nports = [22]\n"),
        "3:8: bad CIDR `db.internal`: expected an address or prefix like \"10.0.0.0/8\""
    );
}

#[test]
fn bad_port_or_range() {
    let m = messages(
        "version = 1\n[[network.allow]]\ncidr = \"10.0.0.1\"\nports = [0, \"9000-8000\", 70000, \"http\"]\n",
        2,
    );
    assert_eq!(
        m,
        [
            "4:10: bad port `0`: expected 1-65535 or a range like \"8000-8100\"",
            "4:13: bad port range `9000-8000`: 9000 is above 8000",
            "4:26: bad port 70000: expected 1-65535",
            "4:33: bad port `http`: expected 1-65535 or a range like \"8000-8100\"",
        ]
    );
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\nport = 0\n"),
        "4:8: bad port 0: expected 1-65535"
    );
    assert_eq!(
        only_error("version = 1\n[[network.allow]]\ncidr = \"10.0.0.1\"\nports = []\n"),
        "4:9: ports must list at least one port"
    );
}

#[test]
fn bad_method() {
    assert_eq!(
        only_error(
            "version = 1\n[[http.allow]]\nhost = \"a.test\"\nmethods = [\"GET\", \"GET /\"]\n"
        ),
        "4:19: bad method `GET /`: expected an HTTP method such as \"GET\""
    );
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\nmethods = []\n"),
        "4:11: `methods = []` would allow every method: leave `methods` out to allow any, or list them"
    );
}

#[test]
fn bad_glob() {
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\npaths = [\"/v1/[a\"]\n"),
        "4:10: bad path glob `/v1/[a`: invalid range pattern (at character 5)"
    );
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\npaths = [\"/v1/a**\"]\n"),
        "4:10: bad path glob `/v1/a**`: recursive wildcards must form a single path component (at character 5)"
    );
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\npaths = [\"v1/**\"]\n"),
        "4:10: bad path glob `v1/**`: request paths start with `/`, so this never matches; write e.g. \"/v1/**\""
    );
    // The path is matched as sent: `/public/%73ecret` is no `s...` there.
    for glob in [
        "/public/[!s]*",
        "/public/[^s]*",
        "/public/[ -rt-~]*",
        "/public/[%a]*",
    ] {
        assert_eq!(
            only_error(&format!(
                "version = 1\n[[http.allow]]\nhost = \"a.test\"\npaths = [\"{glob}\"]\n"
            )),
            format!(
                "4:10: bad path glob `{glob}`: a class that matches `%` (negated, `[!...]`, or a range over it, `[ -~]`) would match an escaped form of what it leaves out (`%73` for `s`), which the upstream decodes; list what is allowed instead"
            )
        );
    }
    // A class that cannot match `%` is fine.
    let fine = "version = 1\n[[http.allow]]\nhost = \"a.test\"\npaths = [\"/v[0-9]/[a-z]*\"]\n";
    assert!(messages(fine, 0).is_empty());
}

#[test]
fn bad_host_pattern() {
    let rule =
        |host: &str| only_error(&format!("version = 1\n[[http.allow]]\nhost = \"{host}\"\n"));
    assert_eq!(
        rule("api.*.com"),
        "3:8: bad host pattern `api.*.com`: `*` may only be the whole first label, as in \"*.github.com\" (any name below github.com)"
    );
    assert_eq!(
        rule("https://api.github.com/"),
        "3:8: bad host `https://api.github.com/`: write the host name alone, without scheme or path, e.g. \"api.github.com\""
    );
    assert_eq!(
        rule("api.github.com:443"),
        "3:8: bad host `api.github.com:443`: put the port in `port`, not in `host`"
    );
    assert_eq!(
        rule("a..b"),
        "3:8: bad host `a..b`: not a valid host name or IP address"
    );
    assert_eq!(
        rule("*.10.0.0.1"),
        "3:8: bad host pattern `*.10.0.0.1`: `*.` must be followed by a domain name, not an address"
    );
}

#[test]
fn unknown_credential() {
    let text = "version = 1\n[[http.allow]]\nhost = \"api.github.com\"\ncredential = \"githb\"\n\
                [credentials.github]\nenv = \"GITHUB_TOKEN\"\n";
    // The near miss is suggested; the declared credential is then unused (a warning).
    assert_eq!(
        messages(text, 2),
        [
            "4:14: unknown credential `githb`: did you mean `github`?",
            "5:14: warning: credential `github` is not named by any [[http.allow]] rule: it is never attached (its variable is only removed from CMD's environment)",
        ]
    );
    assert_eq!(
        only_error("version = 1\n[[http.allow]]\nhost = \"a.test\"\ncredential = \"nope\"\n"),
        "4:14: unknown credential `nope`: define it under [credentials.nope]"
    );
}

#[test]
fn credential_with_no_source_or_two() {
    let rule = "[[http.allow]]\nhost = \"a.test\"\ncredential = \"c\"\n";
    assert_eq!(
        only_error(&format!(
            "version = 1\n{rule}\n[credentials.c]\nheader = \"x-api-key\"\n"
        )),
        "6:1: credential `c` has no source: set `env` (an environment variable) or `file`"
    );
    assert_eq!(
        only_error(&format!(
            "version = 1\n{rule}\n[credentials.c]\nenv = \"C\"\nfile = \"/etc/c\"\n"
        )),
        "8:1: credential `c` has two sources: set only one of `env` and `file`"
    );
}

#[test]
fn unsupported_version() {
    assert_eq!(
        only_error("version = 2\n"),
        "1:11: unsupported policy version 2: this gateway reads version 1"
    );
    assert_eq!(
        only_error("version = \"1\"\n"),
        "1:11: `version` must be the integer 1, found a string"
    );
}

#[test]
fn duplicate_rule() {
    let text = "version = 1\n\
                [[http.allow]]\nhost = \"api.github.com\"\nmethods = [\"GET\", \"HEAD\"]\n\
                [[http.allow]]\nhost = \"API.github.com\"\nmethods = [\"HEAD\", \"GET\"]\n";
    assert_eq!(
        only_error(text),
        "5:1: duplicate rule: rule 1 matches exactly the requests rule 0 (line 2) matches, and the first match wins; remove one"
    );
    let net = "version = 1\n[[network.allow]]\ncidr = \"10.0.0.0/8\"\nports = [5432]\n\
               [[network.allow]]\ncidr = \"10.0.0.0/8\"\nports = [5432]\n";
    assert_eq!(
        only_error(net),
        "5:1: duplicate rule: network rule 1 allows exactly what network rule 0 (line 2) allows; remove one"
    );
}

#[test]
fn shadowed_rule_is_a_warning_and_exit_0() {
    let text = "version = 1\n\
                [[http.allow]]\nhost = \"*.github.com\"\n\
                [[http.allow]]\nhost = \"api.github.com\"\nmethods = [\"GET\"]\npaths = [\"/repos/**\"]\n\
                [[http.allow]]\nhost = \"x.test\"\npaths = [\"/v1/**\"]\n\
                [[http.allow]]\nhost = \"x.test\"\nmethods = [\"POST\"]\npaths = [\"/v1/messages\"]\n";
    let scratch = Scratch::new("shadow");
    let file = scratch.write("shadow.toml", text);
    let r = check(&[&file]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let f = file.display();
    assert_eq!(
        r.stderr,
        format!(
            "{f}:4:1: warning: rule 1 can never match: rule 0 (line 2) comes first and matches every request it would\n\
             {f}:11:1: warning: rule 3 can never match: rule 2 (line 8) comes first and matches every request it would\n"
        )
    );
    assert_eq!(
        r.stdout,
        format!("{f}: ok (4 http rules, 0 network rules, 0 credentials, 2 warnings)\n")
    );
}

/// Whoever can read a credential's file has the secret: check warns (`run` and `serve`
/// refuse it when the sandbox's user is among them).
#[test]
fn a_secret_file_others_may_read_is_a_warning() {
    use std::os::unix::fs::PermissionsExt as _;
    let scratch = Scratch::new("secret-file-mode");
    let secret = "gwtest-policy-check-secret-Kk08";
    let token = scratch.write("token", secret);
    let t = token.to_str().unwrap();
    let text = format!(
        "version = 1\n[[http.allow]]\nhost = \"api.test\"\ncredential = \"api\"\n[credentials.api]\nfile = {t:?}\n"
    );
    let file = scratch.write("p.toml", &text);
    let f = file.display();
    for (mode, readable) in [(0o640, "group-readable"), (0o604, "world-readable")] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        let r = check(&[&file]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(
            r.stderr,
            format!(
                "{f}:6:8: warning: secret file {t} is {readable} (mode {mode:o}): whoever can read it has the secret, and gateway run and serve refuse it when the sandbox's user can; make it root's alone: chown root:root {t} && chmod 600 {t}\n"
            )
        );
        assert!(!r.stderr.contains(secret) && !r.stdout.contains(secret));
        assert!(r.stdout.ends_with(", 1 warning)\n"), "{}", r.stdout);
    }
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = check(&[&file]);
    assert_eq!((r.code, r.stderr.as_str()), (Some(0), ""));
}

#[test]
fn toml_syntax_error_is_located() {
    let m = messages(
        "version = 1\n[[http.allow]]\nhost = \"a.test\nport = 1\n",
        2,
    );
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].starts_with("3:15: TOML syntax error"), "{m:?}");
}

#[test]
fn all_errors_of_a_file_at_once() {
    let text = r#"version = 1
[tunnel]
listen = "0.0.0.0:3128"

[[network.allow]]
cidr = "10.0.0.0/33"
ports = [22]

[[http.allow]]
host = "api.github.com"
methds = ["GET"]

[[http.allow]]
host = "*.github.com"
paths = ["/[x"]
credential = "gh"

[credentials.gh]
env = "GITHUB_TOKEN"
file = "/etc/gh"
"#;
    assert_eq!(
        messages(text, 2),
        [
            "3:10: tunnel.listen must be a loopback address (127.0.0.0/8 or [::1])",
            "6:8: bad CIDR `10.0.0.0/33`: expected an address or prefix like \"10.0.0.0/8\"",
            "11:1: unknown key `methds` in [[http.allow]]: did you mean `methods`?",
            "15:10: bad path glob `/[x`: invalid range pattern (at character 2)",
            "20:1: credential `gh` has two sources: set only one of `env` and `file`",
        ]
    );
}

#[test]
fn several_files_each_reported_and_exit_2() {
    let scratch = Scratch::new("several");
    let good = scratch.write("good.toml", "version = 1\n");
    let bad = scratch.write("bad.toml", "version = 3\n");
    let r = check(&[&good, &bad]);
    assert_eq!(r.code, Some(2));
    assert_eq!(
        r.stdout,
        format!(
            "{}: ok (0 http rules, 0 network rules, 0 credentials)\n",
            good.display()
        )
    );
    assert_eq!(
        r.stderr,
        format!(
            "{}:1:11: unsupported policy version 3: this gateway reads version 1\n",
            bad.display()
        )
    );
}

#[test]
fn run_refuses_a_broken_policy_with_the_same_messages() {
    // `run` needs root before it reads the policy; as root it refuses here, before it
    // creates anything.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: gateway run needs root");
        return;
    }
    let scratch = Scratch::new("run");
    let file = scratch.write(
        "broken.toml",
        "version = 1\n[[http.allow]]\nhost = \"a.test\"\nmethod = [\"GET\"]\ncredential = \"x\"\n",
    );
    let checked = check(&[&file]);
    let r = ran(gateway()
        .args(["run", "--policy"])
        .arg(&file)
        .args(["--", "true"])
        .output()
        .unwrap());
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert_eq!(checked.code, Some(2));
    assert!(r.stderr.contains(&checked.stderr), "{}", r.stderr);
    assert!(
        checked
            .stderr
            .contains(":4:1: unknown key `method` in [[http.allow]]: did you mean `methods`?")
    );
}

/// The line of the `[[http.allow]]` header of rule `index` (0-based) in `file`.
fn rule_line(file: &Path, index: usize) -> usize {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("[[http.allow]]"))
        .nth(index)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("no rule {index} in {}", file.display()))
}

fn explain(file: &Path, method: &str, url: &str) -> Ran {
    ran(gateway()
        .args(["policy", "explain", "--policy"])
        .arg(file)
        .args([method, url])
        .output()
        .unwrap())
}

fn assert_allowed(name: &str, method: &str, url: &str, rule: usize, credential: Option<&str>) {
    let file = example(name);
    let r = explain(&file, method, url);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let tail = match credential {
        Some(c) => format!("credential {c}"),
        None => "no credential".to_owned(),
    };
    assert_eq!(
        r.stdout,
        format!(
            "allow: rule {rule} ({}:{}), {tail}\n",
            file.display(),
            rule_line(&file, rule)
        ),
        "{method} {url}"
    );
}

fn assert_denied(name: &str, method: &str, url: &str) {
    let r = explain(&example(name), method, url);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        r.stdout,
        format!("deny: no rule matches {method} {url} (not-allowlisted)\n")
    );
}

#[test]
fn explain_default_deny() {
    // Nothing goes through the tunnel, not even the loopback.
    assert_denied("default-deny.toml", "GET", "https://example.com/");
    assert_denied("default-deny.toml", "GET", "http://127.0.0.1/");
}

#[test]
fn explain_internal_database() {
    // Its exception is kernel-level ([[network.allow]]); the tunnel allows nothing.
    assert_denied("internal-database.toml", "GET", "http://127.0.0.1:5432/");
    assert_denied(
        "internal-database.toml",
        "POST",
        "https://api.github.com/graphql",
    );
}

#[test]
fn explain_github() {
    let f = "github.toml";
    assert_allowed(
        f,
        "GET",
        "https://api.github.com/repos/acme/app/pulls?state=open",
        0,
        Some("github_api"),
    );
    assert_allowed(
        f,
        "GET",
        "https://github.com/acme/app.git/info/refs?service=git-upload-pack",
        1,
        Some("github_git"),
    );
    assert_allowed(
        f,
        "POST",
        "https://github.com/acme/app.git/git-upload-pack",
        2,
        Some("github_git"),
    );
    assert_denied(f, "POST", "https://api.github.com/repos/acme/app/issues");
    assert_denied(
        f,
        "POST",
        "https://github.com/acme/app.git/git-receive-pack",
    );
    assert_denied(f, "GET", "https://github.com/acme/app/settings");
}

#[test]
fn explain_anthropic() {
    let f = "anthropic.toml";
    assert_allowed(
        f,
        "POST",
        "https://api.anthropic.com/v1/messages",
        0,
        Some("anthropic"),
    );
    assert_allowed(
        f,
        "GET",
        "https://api.anthropic.com/v1/models/claude-x",
        1,
        Some("anthropic"),
    );
    assert_denied(f, "GET", "https://api.anthropic.com/v1/messages");
    assert_denied(f, "POST", "https://api.anthropic.com/v1/files");
}

#[test]
fn explain_mcp_remote() {
    let f = "mcp-remote.toml";
    for method in ["POST", "GET", "DELETE"] {
        assert_allowed(f, method, "https://mcp.example.com/mcp", 0, Some("mcp"));
    }
    assert_denied(f, "PUT", "https://mcp.example.com/mcp");
    assert_denied(f, "POST", "https://mcp.example.com/admin");
    assert_denied(f, "POST", "https://other.example.com/mcp");
}

#[test]
fn explain_package_mirror() {
    let f = "package-mirror.toml";
    assert_allowed(f, "GET", "https://pypi.org/simple/requests/", 0, None);
    assert_allowed(
        f,
        "GET",
        "https://files.pythonhosted.org/packages/ab/cd/requests-2.32.0-py3-none-any.whl",
        1,
        None,
    );
    assert_allowed(f, "GET", "https://registry.npmjs.org/left-pad", 2, None);
    assert_allowed(
        f,
        "GET",
        "https://registry.npmjs.org/@types%2fnode",
        2,
        None,
    );
    assert_denied(f, "POST", "https://upload.pypi.org/legacy/");
    assert_denied(f, "PUT", "https://registry.npmjs.org/left-pad");
}

#[test]
fn explain_other_refusals_name_the_tunnel_reason() {
    let f = example("github.toml");
    let r = explain(&f, "GET", "https://api.github.com/repos/../user");
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.ends_with("(dot-segment-in-path)\n"),
        "{}",
        r.stdout
    );
    let r = explain(&f, "TRACE", "https://api.github.com/");
    assert!(r.stdout.ends_with("(trace-refused)\n"), "{}", r.stdout);
}

#[test]
fn explain_usage_errors_exit_2() {
    let f = example("github.toml");
    let r = explain(&f, "GET", "api.github.com/repos");
    assert_eq!(r.code, Some(2));
    assert_eq!(
        r.stderr,
        "gateway policy explain: bad URL `api.github.com/repos`: expected an absolute http:// or https:// URL, like https://api.example.com/path\n"
    );
    assert_eq!(r.stdout, "");
    let scratch = Scratch::new("explain");
    let broken = scratch.write("broken.toml", "version = 1\n[[http.allow]]\nhots = \"x\"\n");
    let r = explain(&broken, "GET", "https://x/");
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr
            .contains(":3:1: unknown key `hots` in [[http.allow]]: did you mean `host`?"),
        "{}",
        r.stderr
    );
}

#[test]
fn duplicates_are_found_beside_errors_in_other_rules() {
    // Rule 1 is broken; rules 0 and 2 are still compared, under their own numbers.
    let text = "version = 1\n\
                [[http.allow]]\nhost = \"a.test\"\n\
                [[http.allow]]\nhost = \"b.test\"\nport = -1\n\
                [[http.allow]]\nhost = \"a.test\"\n";
    assert_eq!(
        messages(text, 2),
        [
            "6:8: bad port -1: expected 1-65535",
            "7:1: duplicate rule: rule 2 matches exactly the requests rule 0 (line 2) matches, and the first match wins; remove one",
        ]
    );
}
