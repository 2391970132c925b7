use std::path::Path;

use super::parse;
use crate::policy::{PortRange, Protocol, SecretSource, UnixRule};

fn errors(text: &str) -> Vec<String> {
    parse(Path::new("p.toml"), text)
        .expect_err("policy should be refused")
        .to_string()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn minimal_policy_defaults() {
    let p = parse(Path::new("p.toml"), "version = 1\n").unwrap();
    assert_eq!(p.name, "sandbox");
    assert_eq!(p.tunnel_listen.to_string(), "127.0.0.1:0");
    assert!(p.network.is_empty() && p.http.is_empty());
}

#[test]
fn full_network_and_credentials() {
    let text = r#"
version = 1
name = "db"
[tunnel]
listen = "[::1]:0"
[[network.allow]]
cidr = "127.0.0.1/32"
ports = [5432, "8000-8100"]
protocol = "udp"
[[unix.allow]]
path = "@ns"
[credentials.gh]
env = "GITHUB_TOKEN"
[[http.allow]]
host = "API.github.com"
credential = "gh"
"#;
    let p = parse(Path::new("p.toml"), text).unwrap();
    assert_eq!(p.network[0].protocol, Protocol::Udp);
    assert_eq!(
        p.network[0].ports,
        vec![
            PortRange::single(5432),
            PortRange {
                first: 8000,
                last: 8100
            }
        ]
    );
    assert_eq!(p.unix, vec![UnixRule::Abstract(b"ns".to_vec())]);
    assert_eq!(p.http[0].host, "api.github.com");
    assert_eq!(p.http[0].port, 443);
    assert_eq!(
        p.credentials["gh"].source,
        SecretSource::Env("GITHUB_TOKEN".into())
    );
    assert_eq!(p.secret_env_vars().collect::<Vec<_>>(), ["GITHUB_TOKEN"]);
}

#[test]
fn unknown_key_points_at_it() {
    let e = errors("version = 1\n[tunnel]\nlisten = \"127.0.0.1:0\"\nlistne = 1\n");
    assert_eq!(e.len(), 1);
    assert_eq!(
        e[0],
        "p.toml:4:1: unknown key `listne` in [tunnel]: did you mean `listen`?"
    );
}

#[test]
fn unknown_key_without_near_miss_lists_the_keys() {
    let e = errors(
        "version = 1
[[unix.allow]]
path = \"/run/x.sock\"
mode = 1
",
    );
    assert_eq!(
        e,
        ["p.toml:4:1: unknown key `mode` in [[unix.allow]]: expected one of `path`"]
    );
}

#[test]
fn structural_and_semantic_errors_in_different_rules_all_reported() {
    let text = r#"version = 1
[[http.allow]]
host = "a.test"
method = ["GET"]
[[network.allow]]
cidr = "10.0.0.0/33"
ports = [22]
[[http.allow]]
host = "b.test"
port = "443"
"#;
    let e = errors(text);
    assert_eq!(
        e,
        [
            "p.toml:4:1: unknown key `method` in [[http.allow]]: did you mean `methods`?",
            "p.toml:6:8: bad CIDR `10.0.0.0/33`: expected an address or prefix like \"10.0.0.0/8\"",
            "p.toml:10:8: `port` must be an integer, found a string",
        ]
    );
}

#[test]
fn warnings_alone_do_not_refuse() {
    let text = "version = 1\n[[http.allow]]\nhost = \"*.x.test\"\n[[http.allow]]\nhost = \"a.x.test\"\nmethods = [\"GET\"]\n";
    let checked = super::check_text(Path::new("p.toml"), text).unwrap();
    assert_eq!(checked.http_lines, [2, 4]);
    assert_eq!(checked.warnings.len(), 1);
    assert_eq!(
        checked.warnings[0].render(Path::new("p.toml")),
        "p.toml:4:1: warning: rule 1 can never match: rule 0 (line 2) comes first and matches every request it would"
    );
}

#[test]
fn dotted_keys_and_inline_tables_are_located() {
    let text = "version = 1\ncredentials.gh.env = \"GH\"\ncredentials.gh.fromat = \"x\"\nhttp.allow = [{ host = \"a.test\", credential = \"gh\", privat = true }]\n";
    let e = errors(text);
    assert_eq!(
        e,
        [
            "p.toml:3:16: unknown key `fromat` in [credentials.gh]: did you mean `format`?",
            "p.toml:4:53: unknown key `privat` in [[http.allow]]: did you mean `private`?",
        ]
    );
}

#[test]
fn all_semantic_errors_at_once() {
    let text = r#"version = 2
[[network.allow]]
cidr = "10.0.0.0/33"
ports = [0]
[[http.allow]]
host = "x"
credential = "nope"
[credentials.empty]
header = "X"
"#;
    let e = errors(text);
    assert!(
        e.iter()
            .any(|l| l.starts_with("p.toml:1:11: unsupported policy version 2")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|l| l.starts_with("p.toml:3:8: bad CIDR")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|l| l.starts_with("p.toml:4:10: bad port")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|l| l.starts_with("p.toml:7:14: unknown credential `nope`")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|l| l.contains("credential `empty` has no source")),
        "{e:?}"
    );
}

#[test]
fn tunnel_must_be_loopback() {
    let e = errors("version = 1\n[tunnel]\nlisten = \"0.0.0.0:3128\"\n");
    assert!(
        e[0].starts_with("p.toml:3:10: tunnel.listen must be a loopback"),
        "{e:?}"
    );
}

#[test]
fn network_duplicates_ignore_port_order_and_keep_rule_numbers() {
    let text = r#"version = 1
[[network.allow]]
cidr = "10.0.0.1/32"
ports = [443, 80]
[[network.allow]]
cidr = "10.0.0.2/32"
ports = [0]
[[network.allow]]
cidr = "10.0.0.1"
ports = [80, 443]
[[network.allow]]
cidr = "10.0.0.1/32"
ports = [80, 443]
protocol = "udp"
"#;
    assert_eq!(
        errors(text),
        [
            "p.toml:7:10: bad port `0`: expected 1-65535 or a range like \"8000-8100\"",
            "p.toml:8:1: duplicate rule: network rule 2 allows exactly what network rule 0 (line 2) allows; remove one",
        ]
    );
}

#[test]
fn plain_http_is_an_opt_in_for_credentials() {
    let warnings = |rule: &str| -> Vec<String> {
        let text = format!(
            "version = 1\n[[http.allow]]\nhost = \"a.test\"\n{rule}\n[credentials.c]\nenv = \"C\"\n"
        );
        let checked = super::check_text(Path::new("p.toml"), &text).unwrap();
        checked
            .warnings
            .iter()
            .map(|w| w.render(Path::new("p.toml")))
            .collect()
    };
    let port_80 = warnings("port = 80\ncredential = \"c\"");
    assert_eq!(port_80.len(), 1, "{port_80:?}");
    assert!(
        port_80[0].starts_with("p.toml:5:1: warning: the credential is attached over HTTPS only"),
        "{port_80:?}"
    );
    assert!(warnings("port = 80\ncredential = \"c\"\nplain_http = true").is_empty());
    assert!(warnings("port = 8443\ncredential = \"c\"").is_empty());
    let pointless = warnings(
        "port = 80\nplain_http = true\n[[http.allow]]\nhost = \"b.test\"\ncredential = \"c\"",
    );
    assert_eq!(pointless.len(), 1, "{pointless:?}");
    assert!(
        pointless[0].starts_with(
            "p.toml:5:1: warning: plain_http only lets a credential go over plain HTTP"
        ),
        "{pointless:?}"
    );
    let rule = &super::check_text(
        Path::new("p.toml"),
        "version = 1\n[[http.allow]]\nhost = \"a.test\"\ncredential = \"c\"\nplain_http = true\n[credentials.c]\nenv = \"C\"\n",
    )
    .unwrap()
    .policy
    .http[0];
    assert!(rule.plain_http);
}

fn warnings_of(text: &str) -> Vec<String> {
    super::check_text(Path::new("p.toml"), text)
        .unwrap()
        .warnings
        .iter()
        .map(|w| w.render(Path::new("p.toml")))
        .collect()
}

#[test]
fn a_network_rule_for_a_huge_range_is_a_warning() {
    let net = |cidr: &str, ports: &str| {
        warnings_of(&format!(
            "version = 1\n[[network.allow]]\ncidr = \"{cidr}\"\nports = {ports}\n"
        ))
    };
    for (cidr, ports, which) in [
        ("0.0.0.0/0", "[\"1-65535\"]", "on every port"),
        ("::/0", "[\"1-1000\", \"1001-65535\"]", "on every port"),
        ("0.0.0.0/7", "[\"1-65535\"]", "on every port"),
        ("2000::/3", "[\"1-65535\"]", "on every port"),
        ("2001:db8::/31", "[\"1-65535\"]", "on every port"),
        // A few ports do not make the range any smaller.
        ("0.0.0.0/0", "[53, 443]", "on ports 53, 443"),
        ("::/0", "[443]", "on port 443"),
    ] {
        let w = net(cidr, ports);
        assert_eq!(
            w,
            [format!(
                "p.toml:3:8: warning: cidr `{cidr}` opens the kernel to that whole range directly, {which}: connections to it bypass the tunnel, so no [[http.allow]] rule, credential or private-address check applies to them and they are not audited as requests; list only the addresses the sandbox needs"
            )],
            "{cidr} {ports}"
        );
    }
    for (cidr, ports) in [
        ("10.0.0.0/8", "[\"1-65535\"]"),
        ("127.0.0.1/32", "[5432]"),
        ("2001:db8::/32", "[\"1-65535\"]"),
        ("fd00::/64", "[443]"),
    ] {
        assert_eq!(net(cidr, ports), Vec::<String>::new(), "{cidr} {ports}");
    }
}

/// The example's comment says a `GH_TOKEN` placeholder lets gh start: gh sends it to
/// api.github.com, so it must sit on the credential that host's rule names (anywhere else
/// the tunnel refuses it, `placeholder-to-unlisted-host`).
#[test]
fn the_github_example_placeholder_is_on_the_credential_gh_uses() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/github.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let commented = "# placeholder = \"GH_TOKEN\"";
    assert_eq!(text.matches(commented).count(), 1, "the example changed");
    let enabled = text.replace(commented, "placeholder = \"GH_TOKEN\"");
    let p = parse(&file, &enabled).unwrap();
    let (holder, _) = p
        .credentials
        .iter()
        .find(|(_, c)| c.placeholder.as_deref() == Some("GH_TOKEN"))
        .unwrap();
    let api: Vec<_> = p
        .http
        .iter()
        .filter(|r| r.host == "api.github.com")
        .map(|r| r.credential.as_deref())
        .collect();
    assert_eq!(
        api,
        [Some(holder.as_str())],
        "gh's API calls carry the placeholder"
    );
}

#[test]
fn a_connect_to_a_private_address_without_private_is_a_warning() {
    let rule = |connect: &str, extra: &str| {
        warnings_of(&format!(
            "version = 1\n[[http.allow]]\nhost = \"api.test\"\nconnect = \"{connect}\"\n{extra}"
        ))
    };
    for connect in [
        "127.0.0.1:8443",
        "10.1.2.3:443",
        "169.254.169.254:80",
        "[::1]:443",
    ] {
        assert_eq!(
            rule(connect, ""),
            [format!(
                "p.toml:4:11: warning: connect `{connect}` is not a public address: it is dialled as written, since the private-address check (`private = true`) applies only to names the tunnel resolves; say `private = true` to make that explicit"
            )],
            "{connect}"
        );
        assert_eq!(rule(connect, "private = true\n"), Vec::<String>::new());
    }
}

#[test]
fn a_glob_that_is_no_glob_once_read_as_the_tunnel_reads_paths_is_an_error() {
    assert_eq!(
        errors("version = 1\n[[http.allow]]\nhost = \"a.test\"\npaths = [\"/v1/[;]x\"]\n"),
        [
            "p.toml:4:10: bad path glob `/v1/[;]x`: read as an upstream may read a path (`%2f` as `/`, `;parameters` dropped) it is `/v1/[`, which is no glob: invalid range pattern; leave `/` and `;` out of `[...]`"
        ]
    );
    // npm's scoped packages and path parameters outside `[...]` are fine.
    let fine =
        "version = 1\n[[http.allow]]\nhost = \"a.test\"\npaths = [\"/@scope%2f*\", \"/a;v=1/*\"]\n";
    assert!(super::check_text(Path::new("p.toml"), fine).is_ok());
}

#[test]
fn a_credential_header_the_tunnel_removes_or_refuses_is_an_error() {
    for (name, why) in [
        ("Proxy-Authorization", "hop-by-hop"),
        ("Transfer-Encoding", "hop-by-hop"),
        ("Host", "the request itself"),
        ("X-HTTP-Method-Override", "path or method"),
    ] {
        let text = format!("version = 1\n[credentials.c]\nenv = \"C\"\nheader = \"{name}\"\n");
        let e = errors(&text);
        assert!(
            e.iter().any(|l| l.starts_with("p.toml:4:10: header `")
                && l.contains("cannot carry a credential")
                && l.contains(why)),
            "{name}: {e:?}"
        );
    }
}

#[test]
fn a_passthrough_rule_beside_a_credential_for_its_upstream_is_a_warning() {
    let policy = |spliced: &str| {
        warnings_of(&format!(
            "version = 1\n[[http.allow]]\nhost = \"api.example.com\"\ncredential = \"api\"\nconnect = \"192.0.2.1:443\"\nprivate = true\n\n[[http.allow]]\n{spliced}passthrough = true\n\n[credentials.api]\nenv = \"API_TOKEN\"\n"
        ))
    };
    for spliced in [
        "host = \"API.example.com\"\nport = 8443\n",
        "host = \"*.example.com\"\n",
        "host = \"other.example.org\"\nconnect = \"192.0.2.1:443\"\nprivate = true\n",
    ] {
        assert_eq!(
            policy(spliced),
            [
                "p.toml:8:1: warning: passthrough rule 1 splices TLS unread to an upstream rule 0 (line 2) sends credential `api` to: an answer through rule 1 is not checked for the secret, so one that upstream stores or echoes would reach the sandbox; intercept this host instead"
            ],
            "{spliced}"
        );
    }
    for spliced in [
        "host = \"example.com\"\n",
        "host = \"*.example.org\"\n",
        "host = \"other.example.org\"\nconnect = \"192.0.2.2:443\"\nprivate = true\n",
    ] {
        assert_eq!(policy(spliced), Vec::<String>::new(), "{spliced}");
    }
}

/// A FIFO at the policy's path is refused at once (a reload reads it in the supervisor, which
/// would stop handling its signals), and so is a device; the message names the file.
#[test]
fn a_fifo_or_a_device_is_not_read_as_a_policy() {
    let dir = crate::test_fs::Dir::new("policy-fifo");
    let fifo = dir.0.join("p.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let e = crate::test_fs::within_seconds(&fifo, super::check)
        .expect("reading a FIFO as the policy waited for a writer")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:1:1: cannot read policy file: it is not a regular file (a FIFO or a device would block the gateway, or never end): the policy file must be a regular file",
            fifo.display()
        )
    );
    let zero = dir.0.join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let e = super::check(&zero).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
}
