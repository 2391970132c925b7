//! The environment `run` gives CMD (DESIGN.md): the tunnel as proxy and the CA bundle, and
//! what it leaves out of the gateway's own: the variables credentials read, and those whose
//! names look like secrets.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::{
    policy::{Policy, SecretSource},
    tunnel::CredentialError,
};

/// Name parts that mark a variable as a secret.
const SECRET_WORDS: [&str; 8] = [
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "PASSPHRASE",
    "APIKEY",
    "CREDENTIAL",
    "CREDENTIALS",
];

/// Does a variable's name look like it holds a secret? In any case: one of its parts (split
/// on `_` and every other character that is not a letter or digit) is a word of
/// [`SECRET_WORDS`], or it ends in `_KEY` or contains `_KEY_`. So AWS_SECRET_ACCESS_KEY,
/// OPENAI_API_KEY, GITHUB_TOKEN and DB_PASSWORD do; KEYBOARD, MONKEY and SSH_AUTH_SOCK do not.
pub fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.ends_with("_KEY")
        || upper.contains("_KEY_")
        || upper
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|part| SECRET_WORDS.contains(&part))
}

/// What `run` removes from the environment CMD inherits.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// Every variable to remove.
    pub remove: Vec<OsString>,
    /// Of those, the ones no credential reads, removed for their names alone (sorted): the
    /// warning names them.
    pub by_name: Vec<String>,
}

/// Decides what to remove of `present` (the names in the gateway's environment): every
/// variable a credential reads, and every one whose name looks like a secret, except those
/// `keep` names and those the gateway sets itself (the placeholders). Keeping a variable a
/// credential reads is an error.
pub fn removal(
    present: impl IntoIterator<Item = OsString>,
    policy: &Policy,
    keep: &[String],
) -> Result<Removal, CredentialError> {
    for (name, cred) in &policy.credentials {
        if let SecretSource::Env(var) = &cred.source
            && keep.contains(var)
        {
            return Err(CredentialError::KeptCredentialVariable {
                name: name.clone(),
                var: var.clone(),
            });
        }
    }
    let credential_vars: BTreeSet<&str> = policy.secret_env_vars().collect();
    let placeholders: BTreeSet<&str> = policy
        .credentials
        .values()
        .filter_map(|c| c.placeholder.as_deref())
        .collect();
    let mut out = Removal {
        remove: credential_vars.iter().map(OsString::from).collect(),
        by_name: Vec::new(),
    };
    for var in present {
        let name = var.to_string_lossy();
        if credential_vars.contains(&*name)
            || placeholders.contains(&*name)
            || keep.iter().any(|k| *k == name)
            || !looks_secret(&name)
        {
            continue;
        }
        out.by_name.push(name.into_owned());
        out.remove.push(var);
    }
    out.by_name.sort();
    Ok(out)
}

/// System CA bundles, in the order distributions place them.
const SYSTEM_ROOTS: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Writes the CA bundle CMD trusts: the system roots plus the gateway CA that signs the
/// tunnel's intercepted sessions. Readable by everyone: it holds only public certificates.
pub fn write_ca_bundle(dir: &Path, gateway_ca: &str) -> std::io::Result<PathBuf> {
    let mut bundle = Vec::new();
    if let Some(roots) = SYSTEM_ROOTS.iter().find(|p| Path::new(p).is_file()) {
        bundle = std::fs::read(roots)?;
    }
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(gateway_ca.as_bytes());
    let path = dir.join("ca-bundle.pem");
    std::fs::write(&path, bundle)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok(path)
}

pub fn variables(tunnel: SocketAddr, ca_bundle: &Path) -> Vec<(String, String)> {
    let proxy = format!("http://{tunnel}");
    let ca = ca_bundle.display().to_string();
    let mut vars: Vec<(String, String)> =
        ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
            .into_iter()
            .map(|k| (k.to_owned(), proxy.clone()))
            .collect();
    vars.extend(["NO_PROXY", "no_proxy"].map(|k| (k.to_owned(), String::new())));
    vars.extend(
        [
            "SSL_CERT_FILE",
            "CURL_CA_BUNDLE",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "GIT_SSL_CAINFO",
        ]
        .map(|k| (k.to_owned(), ca.clone())),
    );
    vars
}

/// Writes `vars` as `KEY='value'` lines, the form both systemd's `EnvironmentFile=` and a
/// shell's `set -a; . FILE` read, for `gateway serve`'s launchers. Readable by everyone: it
/// holds the tunnel's address, CA paths and placeholders, never a secret.
pub fn write_env_file(path: &Path, vars: &[(String, String)]) -> std::io::Result<()> {
    let mut text = String::new();
    for (key, value) in vars {
        if value.contains(['\'', '\n', '\\']) {
            return Err(std::io::Error::other(format!(
                "environment variable {key} holds a quote, backslash or newline; it cannot be written to {}",
                path.display()
            )));
        }
        text.push_str(&format!("{key}='{value}'\n"));
    }
    std::fs::write(path, text)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn secret_looking_names() {
        for name in [
            "AWS_SECRET_ACCESS_KEY",
            "OPENAI_API_KEY",
            "GITHUB_TOKEN",
            "DB_PASSWORD",
            "github_token",
            "Db_Passwd",
            "GPG_PASSPHRASE",
            "MY_APIKEY",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "AZURE_CREDENTIAL",
            "CLIENT_SECRET",
            "SECRET",
            "TOKEN",
            "X-TOKEN",
            "npm.token",
            "SSH_KEY",
            "ssh_key",
            "GPG_KEY_ID",
            "_KEY",
        ] {
            assert!(looks_secret(name), "{name}");
        }
        for name in [
            "KEYBOARD",
            "MONKEY",
            "SSH_AUTH_SOCK",
            "PATH",
            "LANG",
            "FOO_BAR",
            "HOME",
            "KEY",
            "KEY_FILE",
            "KEYS_DIR",
            "TOKENIZER_PATH",
            "SECRETARY",
            "PASSWORDLESS",
            "XKB_KEYMAP",
            "",
        ] {
            assert!(!looks_secret(name), "{name}");
        }
    }

    fn policy(extra: &str) -> Policy {
        crate::policy::parse(Path::new("p.toml"), &format!("version = 1\n{extra}")).unwrap()
    }

    fn names(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn removal_spares_kept_set_and_ordinary_variables() {
        let p = policy(
            "[credentials.a]\nenv = \"CRED_VAR\"\n[credentials.b]\nenv = \"OTHER\"\nplaceholder = \"GH_TOKEN\"\n",
        );
        let present = names(&[
            "PATH",
            "OPENAI_API_KEY",
            "CRED_VAR",
            "GH_TOKEN",
            "GITHUB_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "KEYBOARD",
        ]);
        let r = removal(present, &p, &["GITHUB_TOKEN".to_owned()]).unwrap();
        assert_eq!(r.by_name, ["AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY"]);
        let mut removed = r.remove.clone();
        removed.sort();
        assert_eq!(
            removed,
            names(&[
                "AWS_SECRET_ACCESS_KEY",
                "CRED_VAR",
                "OPENAI_API_KEY",
                "OTHER"
            ])
        );
        let e = removal(names(&[]), &p, &["CRED_VAR".to_owned()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--keep-env CRED_VAR: credential `a` reads its secret from $CRED_VAR, which never reaches the sandbox: drop --keep-env CRED_VAR"
        );
    }
}
