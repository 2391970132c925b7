//! Secrets, read at start and on each reload, attached at the boundary, never printed.
//! Placeholders stand in for them inside the sandbox.

use std::{collections::BTreeMap, fmt, sync::Arc};

use base64::Engine as _;
use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::secret_file::{self, SandboxReader};
use crate::policy::{Credential, Policy, SecretSource};

/// One credential ready to attach. `Debug` never shows the secret.
pub struct Secret {
    pub name: String,
    pub header: HeaderName,
    /// The header value as sent upstream, marked sensitive so hyper never logs it, and
    /// wiped when its last copy is dropped.
    header_value: HeaderValue,
    pub placeholder: Option<Placeholder>,
    /// What of the secret an upstream could send back: the secret, and for Basic auth the
    /// encoded pair it travels as. A response carrying one is never relayed. Wiped when the
    /// last copy is dropped. Shared, so checking an answer costs no copy of them.
    echoes: Arc<[Bytes]>,
}

#[derive(Clone)]
pub struct Placeholder {
    /// The sandbox's environment variable that holds it.
    pub var: String,
    pub value: String,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// `what_to_do` says where to export it, for the command that reads it.
    #[error("credential `{name}` reads its secret from ${var}, which is not set{what_to_do}")]
    EnvMissing {
        name: String,
        var: String,
        what_to_do: String,
    },
    #[error(
        "credential `{name}`: cannot read secret file {path}: {source} (it must be readable by root)"
    )]
    File {
        name: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Someone it must not reach could read or replace the file; never says what is in it.
    #[error("credential `{name}`: secret file {path} {why}: {fix}")]
    FileExposed {
        name: String,
        path: std::path::PathBuf,
        why: String,
        fix: String,
    },
    #[error(
        "--keep-env {var}: credential `{name}` reads its secret from ${var}, which never reaches the sandbox: drop --keep-env {var}"
    )]
    KeptCredentialVariable { name: String, var: String },
    #[error(
        "credential `{name}` reads its secret from ${var}, which is not valid UTF-8 text: a secret is one line of text"
    )]
    EnvNotText { name: String, var: String },
    #[error(
        "credential `{name}` sets placeholder ${var}, which the sandbox's environment does not have: placeholder credentials cannot be added by reload: restart the sandbox"
    )]
    PlaceholderAdded { name: String, var: String },
    #[error("credential `{name}`: the secret is empty")]
    Empty { name: String },
    #[error(
        "credential `{name}`: the secret holds a control character (a line break, a tab, a NUL): a secret is one line of text; check the variable or file"
    )]
    Control { name: String },
    #[error(
        "credential `{name}`: header `{header}` or the formatted secret is not a valid HTTP header (control characters?)"
    )]
    Header { name: String, header: String },
}

pub struct Secrets(BTreeMap<String, Secret>);

/// What reading the secrets needs besides the policy: which command reads them, for what it
/// tells a policy author, and who runs in the sandbox, who must not be able to read a secret
/// file.
#[derive(Debug, Clone)]
pub struct LoadContext {
    /// `gateway run` or `gateway serve`.
    pub command: &'static str,
    pub sandbox: SandboxReader,
    /// The users of the other sandboxes the same tunnel serves (`serve`): a secret file one
    /// of them could read would hand it this sandbox's credential.
    pub others: Vec<SandboxReader>,
    /// How to run the sandbox as another user, e.g. "run CMD as another user (--user)".
    pub another_user: &'static str,
}

impl LoadContext {
    /// Everyone who must not reach a secret file or replace an allowed socket or a policy
    /// file: the sandbox's user, then the other sandboxes', each with how messages name it.
    pub fn readers(&self) -> impl Iterator<Item = (&SandboxReader, Whose)> {
        std::iter::once((&self.sandbox, Whose::Own))
            .chain(self.others.iter().map(|r| (r, Whose::Other)))
    }
}

/// Whose user is judged: the sandbox's own, or (serve) another sandbox's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    Own,
    Other,
}

impl Whose {
    pub fn user(self) -> &'static str {
        match self {
            Self::Own => crate::unix_reach::THE_SANDBOX_USER,
            Self::Other => "the user of another sandbox this gateway serves",
        }
    }

    pub fn no_user(self) -> &'static str {
        match self {
            Self::Own => "the sandbox has no `user`",
            Self::Other => "another sandbox this gateway serves has no `user`",
        }
    }

    pub fn command(self) -> &'static str {
        match self {
            Self::Own => "the sandboxed command",
            Self::Other => "a command in another sandbox",
        }
    }
}

impl LoadContext {
    /// For unit tests: `gateway run`, and only world-readable files refused.
    #[cfg(test)]
    pub fn for_test() -> Self {
        Self {
            command: "gateway run",
            sandbox: SandboxReader::Anyone,
            others: Vec::new(),
            another_user: "run CMD as another user (--user)",
        }
    }
}

/// The placeholders exported into the sandbox's environment at start, by credential name.
/// That environment cannot change, so these are the only placeholders a reload may use.
#[derive(Clone, Default)]
pub struct Placeholders(BTreeMap<String, Placeholder>);

impl Secrets {
    pub fn load(policy: &Policy, context: &LoadContext) -> Result<Self, CredentialError> {
        let mut out = BTreeMap::new();
        for (name, cred) in &policy.credentials {
            out.insert(name.clone(), load_one(name, cred, context, false)?);
        }
        Ok(Self(out))
    }

    /// Reads every secret of `policy` again (environment, files) for a reload. A credential
    /// keeps the placeholder it was started with; one whose placeholder the sandbox was not
    /// started with is refused.
    pub fn reload(
        policy: &Policy,
        started: &Placeholders,
        context: &LoadContext,
    ) -> Result<Self, CredentialError> {
        let mut out = BTreeMap::new();
        for (name, cred) in &policy.credentials {
            let kept = match &cred.placeholder {
                None => None,
                Some(var) => match started.0.get(name) {
                    Some(p) if p.var == *var => Some(p.clone()),
                    _ => {
                        return Err(CredentialError::PlaceholderAdded {
                            name: name.clone(),
                            var: var.clone(),
                        });
                    }
                },
            };
            let mut secret = load_one(name, cred, context, true)?;
            secret.placeholder = kept;
            out.insert(name.clone(), secret);
        }
        Ok(Self(out))
    }

    /// The placeholders these secrets export, to hand to later reloads.
    pub fn placeholders(&self) -> Placeholders {
        Placeholders(
            self.0
                .iter()
                .filter_map(|(name, s)| Some((name.clone(), s.placeholder.clone()?)))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.0.get(name)
    }

    /// `(variable, placeholder)` pairs for the sandbox's environment.
    pub fn placeholder_env(&self) -> Vec<(String, String)> {
        self.0
            .values()
            .filter_map(|s| s.placeholder.as_ref())
            .map(|p| (p.var.clone(), p.value.clone()))
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.0.values()
    }

    /// Every secret's texts together (shared, not copied): what no answer may carry.
    pub fn all_echoes(&self) -> Arc<[Bytes]> {
        self.iter().flat_map(|s| s.echoes.iter().cloned()).collect()
    }

    /// The credential whose placeholder `name` holds, ignoring case: a host name (the
    /// tunnel lowercases it, DNS ignores case) or a method.
    pub fn placeholder_in(&self, name: &str) -> Option<&Secret> {
        self.iter().find(|s| {
            s.placeholder.as_ref().is_some_and(|p| {
                name.as_bytes()
                    .windows(p.value.len())
                    .any(|w| w.eq_ignore_ascii_case(p.value.as_bytes()))
            })
        })
    }
}

impl Secret {
    pub fn header_value(&self) -> HeaderValue {
        self.header_value.clone()
    }

    #[cfg(test)]
    pub fn echoes(&self) -> &Arc<[Bytes]> {
        &self.echoes
    }
}

/// One credential's secret, read from its variable or file. `reload`: the gateway is running,
/// so its environment can no longer change.
fn load_one(
    name: &str,
    cred: &Credential,
    context: &LoadContext,
    reload: bool,
) -> Result<Secret, CredentialError> {
    let raw = match &cred.source {
        SecretSource::Env(var) => Zeroizing::new(std::env::var(var).map_err(|e| match e {
            std::env::VarError::NotUnicode(_) => CredentialError::EnvNotText {
                name: name.into(),
                var: var.clone(),
            },
            std::env::VarError::NotPresent => CredentialError::EnvMissing {
                name: name.into(),
                var: var.clone(),
                what_to_do: if reload {
                    format!(
                        " in the environment {0} started with, which a reload cannot change: export it and restart {0}",
                        context.command
                    )
                } else {
                    format!(": export it in the environment of {}", context.command)
                },
            },
        })?),
        SecretSource::File(path) => {
            if let Some((exposed, whose)) = context
                .readers()
                .find_map(|(reader, whose)| Some((secret_file::exposure(path, reader)?, whose)))
            {
                return Err(CredentialError::FileExposed {
                    name: name.into(),
                    path: path.clone(),
                    why: exposed.why(whose),
                    fix: exposed.fix(path, context.another_user),
                });
            }
            secret_file::read(path).map_err(|source| CredentialError::File {
                name: name.into(),
                path: path.clone(),
                source,
            })?
        }
    };
    // Files usually end in a newline that is not part of the token. Spaces around it are
    // no part of it either: an upstream trims them from the header (RFC 9110, 5.5), so one
    // that echoed the value would send back text the answer scan did not look for.
    let value = Zeroizing::new(raw.trim_ascii().to_owned());
    if value.is_empty() {
        return Err(CredentialError::Empty { name: name.into() });
    }
    if value.bytes().any(|b| b.is_ascii_control()) {
        // Checked here for every format: base64 (Basic) would carry a line break or a NUL
        // upstream where a header could not.
        return Err(CredentialError::Control { name: name.into() });
    }
    let header_err = || CredentialError::Header {
        name: name.into(),
        header: cred.header.clone(),
    };
    let header = HeaderName::from_bytes(cred.header.as_bytes()).map_err(|_| header_err())?;
    // Built in place, with room reserved up front: a String that grew would leave its old
    // buffer, with part of the secret in it, unwiped.
    let mut formatted = Zeroizing::new(String::new());
    let mut echoes = vec![wiped(value.as_str())];
    match &cred.basic_user {
        Some(user) => {
            let pair = Zeroizing::new(format!("{user}:{}", value.as_str()));
            formatted.reserve_exact("Basic ".len() + pair.len().div_ceil(3) * 4);
            formatted.push_str("Basic ");
            base64::engine::general_purpose::STANDARD
                .encode_string(pair.as_bytes(), &mut formatted);
            echoes.push(wiped(&formatted["Basic ".len()..]));
        }
        None => {
            let parts: Vec<&str> = cred.format.split("{secret}").collect();
            formatted.reserve_exact(cred.format.len() + (parts.len() - 1) * value.len());
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    formatted.push_str(&value);
                }
                formatted.push_str(part);
            }
        }
    }
    with_escaped_spellings(&mut echoes);
    let mut header_value = HeaderValue::from_maybe_shared(Bytes::from_owner(Wiped(formatted)))
        .map_err(|_| header_err())?;
    header_value.set_sensitive(true);
    let placeholder = cred.placeholder.as_ref().map(|var| Placeholder {
        var: var.clone(),
        value: new_placeholder(name),
    });
    Ok(Secret {
        name: name.into(),
        header,
        header_value,
        placeholder,
        echoes: echoes.into(),
    })
}

/// Adds how an upstream would quote each echo back where that differs from the echo: JSON
/// (`/` as `\/`, as PHP writes it; `"` and `\`) and percent-encoded (upper- and lower-case
/// hex; everything reserved, or all but `/`). Other encoders' mixes (Go's `PathEscape`
/// keeps `+` and `=`) are not listed. Secrets with `/`, `+` or `=` (AWS keys, Basic auth's
/// base64) otherwise pass a check that looks for them only as sent.
fn with_escaped_spellings(echoes: &mut Vec<Bytes>) {
    /// What percent-encoders leave as it is: RFC 3986's unreserved characters (JavaScript's
    /// `encodeURIComponent`, Go's `QueryEscape`, for these secrets' characters), and those
    /// with `/` (Python's `quote`).
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    const PATH: &percent_encoding::AsciiSet = &UNRESERVED.remove(b'/');
    let sent = echoes.len();
    for i in 0..sent {
        let Ok(text) = std::str::from_utf8(&echoes[i]) else {
            continue;
        };
        let mut spellings = Vec::with_capacity(5);
        let mut json = Zeroizing::new(String::with_capacity(text.len() * 2));
        for c in text.chars() {
            match c {
                '"' | '\\' | '/' => json.push('\\'),
                _ => {}
            }
            json.push(c);
        }
        spellings.push(json);
        for set in [UNRESERVED, PATH] {
            // Built at a size it cannot outgrow, as the other copies: no unwiped old buffer.
            let mut upper = Zeroizing::new(String::with_capacity(text.len() * 3));
            for part in percent_encoding::utf8_percent_encode(text, set) {
                upper.push_str(part);
            }
            spellings.push(Zeroizing::new(lower_hex(&upper)));
            spellings.push(upper);
        }
        for spelling in &spellings {
            if !echoes.iter().any(|e| e == spelling.as_bytes()) {
                echoes.push(wiped(spelling));
            }
        }
    }
}

/// `text` with the hex digits of its percent-escapes in lower case.
fn lower_hex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut escape = 0;
    for c in text.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A copy of `text` wiped when its last `Bytes` is dropped, made at its final size.
fn wiped(text: &str) -> Bytes {
    let mut copy = Zeroizing::new(String::with_capacity(text.len()));
    copy.push_str(text);
    Bytes::from_owner(Wiped(copy))
}

/// A header value's bytes: they are wiped when the last `Bytes` sharing them is dropped.
struct Wiped(Zeroizing<String>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Unguessable, so the sandbox cannot make the proxy swap in a secret by guessing, and
/// recognisable in a log.
fn new_placeholder(name: &str) -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("gateway-placeholder-{name}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Credential, DEFAULT_LISTEN};

    fn policy(credentials: &[(&str, &str, Option<&str>)]) -> Policy {
        Policy {
            name: "t".into(),
            tunnel_listen: DEFAULT_LISTEN.parse().unwrap(),
            max_request_body: None,
            network: Vec::new(),
            unix: Vec::new(),
            http: Vec::new(),
            credentials: credentials
                .iter()
                .map(|(name, file, placeholder)| {
                    (
                        name.to_string(),
                        Credential {
                            source: SecretSource::File(file.into()),
                            header: "Authorization".into(),
                            format: "Bearer {secret}".into(),
                            basic_user: None,
                            placeholder: placeholder.map(str::to_owned),
                        },
                    )
                })
                .collect(),
            upstream_ca: Vec::new(),
        }
    }

    fn secret_file(name: &str, value: &str) -> String {
        let path = std::env::temp_dir().join(format!(
            "gateway-credentials-test-{}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, value).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.to_str().unwrap().to_owned()
    }

    fn ctx() -> LoadContext {
        LoadContext::for_test()
    }

    fn placeholder(s: &Secrets, name: &str) -> Option<(String, String)> {
        s.get(name)?
            .placeholder
            .as_ref()
            .map(|p| (p.var.clone(), p.value.clone()))
    }

    #[test]
    fn a_reload_keeps_each_placeholder_and_reads_the_secret_again() {
        let file = secret_file("keep", "first");
        let started = Secrets::load(&policy(&[("api", &file, Some("API_PH"))]), &ctx()).unwrap();
        let before = placeholder(&started, "api").unwrap();
        assert!(before.1.starts_with("gateway-placeholder-api-"));

        std::fs::write(&file, "second").unwrap();
        let reloaded = Secrets::reload(
            &policy(&[("api", &file, Some("API_PH")), ("plain", &file, None)]),
            &started.placeholders(),
            &ctx(),
        )
        .unwrap();
        assert_eq!(placeholder(&reloaded, "api"), Some(before.clone()));
        assert_eq!(placeholder(&reloaded, "plain"), None);
        assert_eq!(
            reloaded.get("api").unwrap().header_value(),
            "Bearer second",
            "the secret is read again"
        );
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn a_reload_cannot_add_a_placeholder() {
        let file = secret_file("add", "s3cret-value");
        let started = Secrets::load(&policy(&[("api", &file, None)]), &ctx()).unwrap();
        for (creds, name) in [
            // A new credential with a placeholder.
            (
                vec![("api", file.as_str(), None), ("new", &file, Some("NEW_PH"))],
                "new",
            ),
            // An existing credential that gains one.
            (vec![("api", file.as_str(), Some("API_PH"))], "api"),
        ] {
            let err = Secrets::reload(&policy(&creds), &started.placeholders(), &ctx())
                .err()
                .expect("refused");
            let text = err.to_string();
            assert!(
                matches!(err, CredentialError::PlaceholderAdded { .. }),
                "{text}"
            );
            assert!(text.contains(&format!("`{name}`")), "{text}");
            assert!(
                text.contains(
                    "placeholder credentials cannot be added by reload: restart the sandbox"
                ),
                "{text}"
            );
            assert!(!text.contains("s3cret-value"), "{text}");
        }
        // Another variable for a placeholder the sandbox has is a new one too.
        let with = Secrets::load(&policy(&[("api", &file, Some("API_PH"))]), &ctx()).unwrap();
        assert!(
            Secrets::reload(
                &policy(&[("api", &file, Some("OTHER_PH"))]),
                &with.placeholders(),
                &ctx()
            )
            .is_err()
        );
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn header_values_are_built_from_the_format_or_basic_auth() {
        let file = secret_file("format", "s3cret\n");
        let cred = |format: &str, basic_user: Option<&str>| Credential {
            source: SecretSource::File(file.clone().into()),
            header: "Authorization".into(),
            format: format.into(),
            basic_user: basic_user.map(str::to_owned),
            placeholder: None,
        };
        let value = |c: &Credential| load_one("c", c, &ctx(), false).unwrap().header_value();
        assert_eq!(value(&cred("Bearer {secret}", None)), "Bearer s3cret");
        assert_eq!(value(&cred("{secret}:{secret}", None)), "s3cret:s3cret");
        assert_eq!(value(&cred("token", None)), "token");
        // base64("x-access-token:s3cret")
        assert_eq!(
            value(&cred("unused {secret}", Some("x-access-token"))),
            "Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0"
        );
        assert!(value(&cred("Bearer {secret}", None)).is_sensitive());
        // What an answer must not carry: the secret, and the pair as Basic auth sends it.
        let echoes = |c: &Credential| load_one("c", c, &ctx(), false).unwrap().echoes().to_vec();
        assert_eq!(echoes(&cred("Bearer {secret}", None)), ["s3cret"]);
        assert_eq!(
            echoes(&cred("", Some("x-access-token"))),
            ["s3cret", "eC1hY2Nlc3MtdG9rZW46czNjcmV0"]
        );
        // And as an upstream would quote them back, where that differs.
        let file = secret_file("escaped", "a/b+c=\"d\n");
        let cred = Credential {
            source: SecretSource::File(file.clone().into()),
            header: "Authorization".into(),
            format: "Bearer {secret}".into(),
            basic_user: None,
            placeholder: None,
        };
        assert_eq!(
            echoes(&cred),
            [
                "a/b+c=\"d",
                "a\\/b+c=\\\"d",
                "a%2fb%2bc%3d%22d",
                "a%2Fb%2Bc%3D%22d",
                "a/b%2bc%3d%22d",
                "a/b%2Bc%3D%22d"
            ]
        );
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn spaces_around_a_secret_are_not_part_of_it_and_control_characters_are_refused() {
        let cred = |file: &str, basic_user: Option<&str>| Credential {
            source: SecretSource::File(file.into()),
            header: "Authorization".into(),
            format: "Bearer {secret}".into(),
            basic_user: basic_user.map(str::to_owned),
            placeholder: None,
        };
        // An upstream trims the header's value: an echo of it is found only if the scan
        // looks for the secret as trimmed.
        let file = secret_file("spaced", " \ts3cret \r\n");
        let secret = load_one("c", &cred(&file, None), &ctx(), false).unwrap();
        assert_eq!(secret.header_value(), "Bearer s3cret");
        assert_eq!(secret.echoes().to_vec(), ["s3cret"]);
        let _ = std::fs::remove_file(&file);
        for (what, text) in [
            ("two lines", "first\nsecond\n"),
            ("a NUL", "s3c\0ret"),
            ("a control byte", "s3c\x01ret"),
            ("a tab inside", "s3c\tret"),
        ] {
            let file = secret_file("control", text);
            for basic_user in [None, Some("x-access-token")] {
                let e = load_one("c", &cred(&file, basic_user), &ctx(), false)
                    .err()
                    .unwrap_or_else(|| panic!("{what} {basic_user:?}"));
                assert!(
                    matches!(e, CredentialError::Control { .. }),
                    "{what} {basic_user:?}: {e}"
                );
                assert!(!e.to_string().contains("s3c"), "{e}");
            }
            let _ = std::fs::remove_file(&file);
        }
    }

    #[test]
    fn a_missing_variable_is_to_be_exported_where_the_command_runs() {
        let var = format!("GATEWAY_UNIT_TEST_UNSET_{}", std::process::id());
        let cred = Credential {
            source: SecretSource::Env(var.clone()),
            header: "Authorization".into(),
            format: "Bearer {secret}".into(),
            basic_user: None,
            placeholder: None,
        };
        let serve = LoadContext {
            command: "gateway serve",
            ..ctx()
        };
        let message = |reload| {
            load_one("api", &cred, &serve, reload)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            message(false),
            format!(
                "credential `api` reads its secret from ${var}, which is not set: export it in the environment of gateway serve"
            )
        );
        assert_eq!(
            message(true),
            format!(
                "credential `api` reads its secret from ${var}, which is not set in the environment gateway serve started with, which a reload cannot change: export it and restart gateway serve"
            )
        );
        // Set, but not text: said so, not "not set", and without the value.
        let bad = format!("GATEWAY_UNIT_TEST_NOT_TEXT_{}", std::process::id());
        // SAFETY: a variable of this test's own, which no other thread reads or writes.
        unsafe {
            std::env::set_var(
                &bad,
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"s3c\xffret"),
            )
        };
        let cred = Credential {
            source: SecretSource::Env(bad.clone()),
            ..cred
        };
        let e = load_one("api", &cred, &serve, false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "credential `api` reads its secret from ${bad}, which is not valid UTF-8 text: a secret is one line of text"
            )
        );
    }

    #[test]
    fn a_secret_file_the_sandbox_may_read_is_refused_without_its_contents() {
        let file = secret_file("exposed", "s3cret-exposed");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Secrets::load(&policy(&[("api", &file, None)]), &ctx())
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(matches!(err, CredentialError::FileExposed { .. }), "{text}");
        assert!(
            text.starts_with(&format!(
                "credential `api`: secret file {file} is readable by everyone (mode 644)"
            )),
            "{text}"
        );
        assert!(
            text.ends_with(&format!("chown root:root {file} && chmod 600 {file}")),
            "{text}"
        );
        assert!(!text.contains("s3cret"), "{text}");
        let _ = std::fs::remove_file(&file);
    }
}
