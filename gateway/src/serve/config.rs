//! The `gateway serve` config file: the shared tunnel address, the audit log, and one
//! `[[sandbox]]` per cgroup with the policy file that governs it.
//!
//! ```toml
//! version = 1
//! name = "agents-host"            # `sandbox` of records about connections no sandbox made
//! listen = "127.0.0.1:3128"       # the tunnel, shared by every sandbox
//! audit_log = "/var/log/gateway/audit.jsonl"
//! audit_max_bytes = "100M"        # optional rotation, as `run --audit-max-bytes`
//!
//! [[sandbox]]
//! cgroup = "agents/alice"         # under the cgroup v2 root; created when missing
//! policy = "alice.toml"           # relative to this file
//! ```

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Component, Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    audit,
    policy::{self, Located, Policy, PolicyError, Severity},
    tunnel,
};

/// `name` when the config gives none.
pub const DEFAULT_NAME: &str = "gateway";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: Spanned<i64>,
    name: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    audit_log: Option<PathBuf>,
    audit_max_bytes: Option<Spanned<String>>,
    threads: Option<Spanned<i64>>,
    #[serde(default)]
    sandbox: Vec<RawSandbox>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    cgroup: Spanned<String>,
    policy: Spanned<PathBuf>,
    user: Option<Spanned<String>>,
}

/// A checked config with every sandbox's policy read and checked.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub name: String,
    pub listen: SocketAddr,
    pub audit_log: PathBuf,
    pub audit_max_bytes: Option<u64>,
    /// The tunnel's worker threads; the default when `None`.
    pub threads: Option<usize>,
    pub sandboxes: Vec<SandboxEntry>,
}

#[derive(Debug)]
pub struct SandboxEntry {
    /// Relative to the cgroup v2 root.
    pub cgroup: PathBuf,
    pub policy_file: PathBuf,
    pub policy: Policy,
    /// The only user whose connections to the tunnel this sandbox may make (`user`).
    pub user: Option<u32>,
}

/// Reads and checks the config, then every policy it names. The first file with errors is
/// reported whole (`FILE:LINE:COL: message` per error), so `main` exits 2 with it.
pub fn load(file: &Path) -> Result<Config, PolicyError> {
    let text = crate::trusted_file::read_to_string(file, "the serve config")
        .map_err(|e| one_error(file, 1, 1, format!("cannot read the serve config: {e}")))?;
    let raw: Raw = toml::from_str(&text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(&text, s.start));
        one_error(file, line, col, e.message().to_owned())
    })?;
    let mut errors = Vec::new();
    let mut error = |span: std::ops::Range<usize>, message: String| {
        let (line, col) = line_col(&text, span.start);
        errors.push(Located {
            line,
            col,
            severity: Severity::Error,
            message,
        });
    };
    if *raw.version.get_ref() != 1 {
        error(raw.version.span(), "version must be 1".into());
    }
    let name = match &raw.name {
        None => DEFAULT_NAME.to_owned(),
        Some(n) if policy::valid_name(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            error(
                n.span(),
                "bad name: use 1-64 letters, digits, `-`, `_` or `.`".into(),
            );
            String::new()
        }
    };
    let default_listen: SocketAddr = policy::DEFAULT_LISTEN.parse().expect("the default parses");
    let listen = match &raw.listen {
        None => default_listen,
        Some(l) => policy::listen_address("listen", l.get_ref()).unwrap_or_else(|e| {
            error(l.span(), e);
            default_listen
        }),
    };
    let audit_max_bytes = match &raw.audit_max_bytes {
        None => None,
        Some(s) => match audit::cli::parse_size(s.get_ref()) {
            Ok(n) => Some(n),
            Err(e) => {
                error(s.span(), e);
                None
            }
        },
    };
    let threads = raw
        .threads
        .as_ref()
        .and_then(|t| match usize::try_from(*t.get_ref()) {
            Ok(n) if (1..=tunnel::MAX_THREADS).contains(&n) => Some(n),
            _ => {
                error(
                    t.span(),
                    format!("threads must be 1 to {}", tunnel::MAX_THREADS),
                );
                None
            }
        });
    if raw.sandbox.is_empty() {
        error(
            0..0,
            "no [[sandbox]]: add one per cgroup, with `cgroup` and `policy`".into(),
        );
    }
    let base = file.parent().unwrap_or(Path::new("."));
    let mut cgroups: Vec<(PathBuf, std::ops::Range<usize>)> = Vec::new();
    let mut users: HashMap<u32, usize> = HashMap::new();
    let mut wanted = Vec::new();
    for s in &raw.sandbox {
        let user = s.user.as_ref().and_then(|u| match user_id(u.get_ref()) {
            Ok(uid) => {
                let (line, _) = line_col(&text, u.span().start);
                if let Some(other) = users.insert(uid, line) {
                    error(
                        u.span(),
                        format!(
                            "user `{}` is already the user of the sandbox of line {other}: processes of one user can take each other's tunnel connections, so each sandbox needs a user of its own",
                            u.get_ref()
                        ),
                    );
                }
                Some(uid)
            }
            Err(why) => {
                error(u.span(), why);
                None
            }
        });
        match cgroup_path(s.cgroup.get_ref()) {
            Ok(path) => {
                for (other, at) in &cgroups {
                    let (line, _) = line_col(&text, at.start);
                    if *other == path {
                        error(
                            s.cgroup.span(),
                            format!(
                                "cgroup `{}` is already the sandbox of line {line}",
                                s.cgroup.get_ref()
                            ),
                        );
                    } else if path.starts_with(other) || other.starts_with(&path) {
                        error(
                            s.cgroup.span(),
                            format!(
                                "cgroup `{}` nests with the one of line {line}: sandboxes cannot be inside one another",
                                s.cgroup.get_ref()
                            ),
                        );
                    }
                }
                cgroups.push((path.clone(), s.cgroup.span()));
                wanted.push((path, s, user));
            }
            Err(why) => error(s.cgroup.span(), why),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyError {
            file: file.to_owned(),
            errors,
        });
    }

    // The config is sound: now each policy, with its own file's errors.
    let mut sandboxes = Vec::with_capacity(wanted.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    for (cgroup, s, user) in wanted {
        let policy_file = base.join(s.policy.get_ref());
        let policy = policy::load(&policy_file)?;
        let at = line_col(&text, s.policy.span().start);
        if policy.name == "." || policy.name == ".." {
            return Err(one_error(
                file,
                at.0,
                at.1,
                format!(
                    "policy {} is named `{}`: under serve the name is also a directory name (/run/gateway/serve/NAME); give the policy another `name`",
                    policy_file.display(),
                    policy.name
                ),
            ));
        }
        if policy.name == name {
            return Err(one_error(
                file,
                at.0,
                at.1,
                format!(
                    "policy {} is named `{}` like this config: records of connections no sandbox made carry the config's `name`, so an auditor could not tell them from this sandbox's; give one of them another name",
                    policy_file.display(),
                    policy.name
                ),
            ));
        }
        if let Some(line) = names.insert(policy.name.clone(), at.0) {
            return Err(one_error(
                file,
                at.0,
                at.1,
                format!(
                    "policy {} is named `{}` like the policy of line {line}: each sandbox needs its own `name`, which its audit records carry",
                    policy_file.display(),
                    policy.name
                ),
            ));
        }
        if policy.tunnel_listen != listen
            && policy.tunnel_listen.to_string() != policy::DEFAULT_LISTEN
        {
            return Err(one_error(
                file,
                at.0,
                at.1,
                format!(
                    "policy {} sets `[tunnel] listen = \"{}\"`, but under serve every sandbox shares the tunnel at the config's `listen`: remove it from the policy or set `listen` here",
                    policy_file.display(),
                    policy.tunnel_listen
                ),
            ));
        }
        sandboxes.push(SandboxEntry {
            cgroup,
            policy_file,
            policy,
            user,
        });
    }
    Ok(Config {
        file: file.to_owned(),
        name,
        listen,
        audit_log: raw.audit_log.unwrap_or_else(|| audit::DEFAULT_LOG.into()),
        audit_max_bytes,
        threads,
        sandboxes,
    })
}

/// A sandbox's `user`: a name from the user database, or a number.
fn user_id(text: &str) -> Result<u32, String> {
    let uid = match text.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => match nix::unistd::User::from_name(text) {
            Ok(Some(user)) => user.uid.as_raw(),
            Ok(None) => return Err(format!("no user `{text}` on this host")),
            Err(e) => return Err(format!("looking up user `{text}`: {e}")),
        },
    };
    match uid {
        0 => Err("a sandbox's user cannot be root: root can take any process's sockets".into()),
        gateway_common::ANY_UID => Err(format!("user `{text}` is not a valid user id")),
        uid => Ok(uid),
    }
}

/// The cgroup relative to the cgroup v2 root: `agents/alice`, or `/agents/alice` meaning
/// the same. Only plain components, so it cannot climb out of the root.
fn cgroup_path(text: &str) -> Result<PathBuf, String> {
    let path = Path::new(text);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(part) => out.push(part),
            _ => {
                return Err(format!(
                    "bad cgroup `{text}`: give it relative to the cgroup v2 root (e.g. `agents/alice`), without `.` or `..`"
                ));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(
            "the cgroup v2 root cannot be a sandbox: name a cgroup under it, e.g. `agents/alice`"
                .into(),
        );
    }
    Ok(out)
}

fn one_error(file: &Path, line: usize, col: usize, message: String) -> PolicyError {
    PolicyError {
        file: file.to_owned(),
        errors: vec![Located {
            line,
            col,
            severity: Severity::Error,
            message,
        }],
    }
}

/// 1-based line and column (in characters) of byte `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(config: &str, policies: &[(&str, &str)]) -> Result<Config, String> {
        let dir = std::env::temp_dir().join(format!(
            "gateway-serve-config-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in policies {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let file = dir.join("serve.toml");
        std::fs::write(&file, config).unwrap();
        let out = load(&file).map_err(|e| e.to_string().replace(&*dir.to_string_lossy(), "D"));
        std::fs::remove_dir_all(&dir).unwrap();
        out
    }

    /// A FIFO as the config, or as a policy it names, is refused at once, naming the file.
    #[test]
    fn a_fifo_is_not_read_as_the_config_or_a_policy() {
        let dir = crate::test_fs::Dir::new("serve-config-fifo");
        let config = dir.0.join("serve.toml");
        let fifo = |path: &Path| {
            let _ = std::fs::remove_file(path);
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        };
        fifo(&config);
        let within = crate::test_fs::within_seconds;
        let e = within(&config, load)
            .expect("reading a FIFO as the config waited for a writer")
            .unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "{}:1:1: cannot read the serve config: it is not a regular file",
                config.display()
            )),
            "{e}"
        );
        std::fs::remove_file(&config).unwrap();
        std::fs::write(
            &config,
            "version = 1\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\n",
        )
        .unwrap();
        fifo(&dir.0.join("a.toml"));
        let e = within(&config, load)
            .expect("reading a FIFO as a policy waited for a writer")
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("a.toml:1:1: cannot read policy file: it is not a regular file"),
            "{e}"
        );
    }

    const A: (&str, &str) = ("a.toml", "version = 1\nname = \"a\"\n");
    const B: (&str, &str) = ("b.toml", "version = 1\nname = \"b\"\n");

    #[test]
    fn two_sandboxes_with_defaults() {
        let c = check(
            "version = 1\n[[sandbox]]\ncgroup = \"agents/a\"\npolicy = \"a.toml\"\n[[sandbox]]\ncgroup = \"/agents/b\"\npolicy = \"b.toml\"\n",
            &[A, B],
        )
        .unwrap();
        assert_eq!(c.name, DEFAULT_NAME);
        assert_eq!(c.listen.to_string(), policy::DEFAULT_LISTEN);
        assert_eq!(c.audit_log, Path::new(audit::DEFAULT_LOG));
        let cgroups: Vec<_> = c.sandboxes.iter().map(|s| s.cgroup.clone()).collect();
        assert_eq!(
            cgroups,
            [PathBuf::from("agents/a"), PathBuf::from("agents/b")]
        );
        assert_eq!(c.sandboxes[1].policy.name, "b");
        assert_eq!(c.threads, None);
    }

    #[test]
    fn threads_are_one_to_the_maximum() {
        let with = |n: &str| {
            check(
                &format!(
                    "version = 1\nthreads = {n}\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\n"
                ),
                &[A],
            )
        };
        assert_eq!(with("2").unwrap().threads, Some(2));
        for bad in ["0", "-1", "257"] {
            let e = with(bad).unwrap_err();
            assert!(
                e.starts_with("D/serve.toml:2:11: threads must be 1 to 256"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let e = check(
            "version = 1\nlisten = \"10.0.0.1:3128\"\naudit_max_bytes = \"lots\"\n[[sandbox]]\ncgroup = \"../etc\"\npolicy = \"a.toml\"\n[[sandbox]]\ncgroup = \"/\"\npolicy = \"a.toml\"\n",
            &[A],
        )
        .unwrap_err();
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        assert!(
            lines[0].starts_with("D/serve.toml:2:10: listen must be a loopback"),
            "{e}"
        );
        assert!(
            lines[1].starts_with("D/serve.toml:3:19: `lots` is not a size"),
            "{e}"
        );
        assert!(
            lines[2].starts_with("D/serve.toml:5:10: bad cgroup `../etc`"),
            "{e}"
        );
        assert!(
            lines[3].starts_with("D/serve.toml:8:10: the cgroup v2 root"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_missing_sandboxes_are_errors() {
        let e = check("version = 1\nlisten_on = \"x\"\n", &[]).unwrap_err();
        assert!(
            e.starts_with("D/serve.toml:2:1: unknown field `listen_on`"),
            "{e}"
        );
        let e = check("version = 1\n", &[]).unwrap_err();
        assert!(e.contains("no [[sandbox]]"), "{e}");
        let e = check(
            "version = 1\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\nuid = 5\n",
            &[A],
        )
        .unwrap_err();
        assert!(e.contains("unknown field `uid`"), "{e}");
    }

    #[test]
    fn each_sandbox_needs_a_user_of_its_own_and_never_root() {
        let two = |a: &str, b: &str| {
            format!(
                "version = 1\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\nuser = \"{a}\"\n[[sandbox]]\ncgroup = \"b\"\npolicy = \"b.toml\"\nuser = \"{b}\"\n"
            )
        };
        let c = check(&two("4242", "nobody"), &[A, B]).unwrap();
        let users: Vec<_> = c.sandboxes.iter().map(|s| s.user).collect();
        assert_eq!(users, [Some(4242), Some(65534)]);
        let e = check(&two("65534", "nobody"), &[A, B]).unwrap_err();
        assert!(
            e.contains(
                "D/serve.toml:9:8: user `nobody` is already the user of the sandbox of line 5"
            ),
            "{e}"
        );
        let e = check(&two("root", "no-such-user-here"), &[A, B]).unwrap_err();
        assert!(
            e.contains("D/serve.toml:5:8: a sandbox's user cannot be root"),
            "{e}"
        );
        assert!(
            e.contains("D/serve.toml:9:8: no user `no-such-user-here` on this host"),
            "{e}"
        );
        let none = check(
            "version = 1\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\n",
            &[A],
        )
        .unwrap();
        assert_eq!(none.sandboxes[0].user, None);
    }

    #[test]
    fn duplicate_and_nested_cgroups_are_refused() {
        let e = check(
            "version = 1\n[[sandbox]]\ncgroup = \"agents\"\npolicy = \"a.toml\"\n[[sandbox]]\ncgroup = \"agents/b\"\npolicy = \"b.toml\"\n[[sandbox]]\ncgroup = \"/agents\"\npolicy = \"b.toml\"\n",
            &[A, B],
        )
        .unwrap_err();
        assert!(
            e.contains("D/serve.toml:6:10: cgroup `agents/b` nests with the one of line 3"),
            "{e}"
        );
        assert!(
            e.contains("D/serve.toml:9:10: cgroup `/agents` is already the sandbox of line 3"),
            "{e}"
        );
    }

    #[test]
    fn policies_are_checked_and_need_their_own_names() {
        let e = check(
            "version = 1\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"bad.toml\"\n",
            &[("bad.toml", "version = 1\nnmae = \"x\"\n")],
        )
        .unwrap_err();
        assert!(e.starts_with("D/bad.toml:2:1:"), "{e}");
        let e = check(
            "version = 1\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\n[[sandbox]]\ncgroup = \"b\"\npolicy = \"a.toml\"\n",
            &[A],
        )
        .unwrap_err();
        assert!(
            e.starts_with(
                "D/serve.toml:7:10: policy D/a.toml is named `a` like the policy of line 4"
            ),
            "{e}"
        );
        let e = check(
            "version = 1\nname = \"a\"\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\n",
            &[A],
        )
        .unwrap_err();
        assert!(
            e.starts_with("D/serve.toml:5:10: policy D/a.toml is named `a` like this config"),
            "{e}"
        );
    }

    #[test]
    fn the_example_config_loads() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/serve/serve.toml");
        let c = load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.name, "agents-host");
        assert_eq!(c.listen.to_string(), "127.0.0.1:3128");
        assert_eq!(c.audit_max_bytes, Some(100 << 20));
        let names: Vec<_> = c.sandboxes.iter().map(|s| s.policy.name.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert_eq!(c.sandboxes[0].cgroup, Path::new("agents/reviewer"));
    }

    #[test]
    fn a_policy_named_like_a_directory_link_is_refused() {
        let e = check(
            "version = 1\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\n",
            &[("a.toml", "version = 1\nname = \"..\"\n")],
        )
        .unwrap_err();
        assert!(
            e.contains("is named `..`: under serve the name is also a directory"),
            "{e}"
        );
    }

    #[test]
    fn a_policy_may_not_move_the_shared_tunnel() {
        let moved = (
            "a.toml",
            "version = 1\nname = \"a\"\n[tunnel]\nlisten = \"127.0.0.1:9999\"\n",
        );
        let e = check(
            "version = 1\nlisten = \"127.0.0.1:3128\"\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\n",
            &[moved],
        )
        .unwrap_err();
        assert!(
            e.contains("sets `[tunnel] listen = \"127.0.0.1:9999\"`"),
            "{e}"
        );
        check(
            "version = 1\nlisten = \"127.0.0.1:9999\"\n[[sandbox]]\ncgroup = \"a\"\npolicy = \"a.toml\"\n",
            &[moved],
        )
        .unwrap();
    }
}
