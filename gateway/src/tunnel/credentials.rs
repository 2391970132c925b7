//! Secrets, read once at start, attached at the boundary, never printed. Placeholders stand in
//! for them inside the sandbox.

use std::{collections::BTreeMap, fmt};

use base64::Engine as _;
use hyper::header::{HeaderName, HeaderValue};
use rand::RngCore as _;
use zeroize::Zeroizing;

use crate::policy::{Credential, Policy, SecretSource};

/// One credential ready to attach. `Debug` never shows the secret.
pub struct Secret {
    pub name: String,
    pub header: HeaderName,
    value: Zeroizing<String>,
    /// The header value as sent upstream, marked sensitive so hyper never logs it.
    header_value: HeaderValue,
    pub placeholder: Option<Placeholder>,
}

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
    #[error(
        "credential `{name}` reads its secret from ${var}, which is not set: export it in the environment of gateway run"
    )]
    EnvMissing { name: String, var: String },
    #[error(
        "credential `{name}`: cannot read secret file {path}: {source} (it must be readable by root)"
    )]
    File {
        name: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("credential `{name}`: the secret is empty")]
    Empty { name: String },
    #[error(
        "credential `{name}`: header `{header}` or the formatted secret is not a valid HTTP header (control characters?)"
    )]
    Header { name: String, header: String },
}

pub struct Secrets(BTreeMap<String, Secret>);

impl Secrets {
    pub fn load(policy: &Policy) -> Result<Self, CredentialError> {
        let mut out = BTreeMap::new();
        for (name, cred) in &policy.credentials {
            out.insert(name.clone(), load_one(name, cred)?);
        }
        Ok(Self(out))
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
}

impl Secret {
    pub fn header_value(&self) -> HeaderValue {
        self.header_value.clone()
    }

    /// `text` with every placeholder of this credential replaced by the raw secret.
    pub fn swap_placeholder(&self, text: &str) -> Option<HeaderValue> {
        let p = self.placeholder.as_ref()?;
        let swapped = Zeroizing::new(text.replace(&p.value, &self.value));
        let mut v = HeaderValue::from_str(&swapped).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

fn load_one(name: &str, cred: &Credential) -> Result<Secret, CredentialError> {
    let raw = match &cred.source {
        SecretSource::Env(var) => {
            Zeroizing::new(std::env::var(var).map_err(|_| CredentialError::EnvMissing {
                name: name.into(),
                var: var.clone(),
            })?)
        }
        SecretSource::File(path) => {
            Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                CredentialError::File {
                    name: name.into(),
                    path: path.clone(),
                    source,
                }
            })?)
        }
    };
    // Files usually end in a newline that is not part of the token.
    let value = Zeroizing::new(raw.trim_end_matches(['\n', '\r']).to_owned());
    if value.is_empty() {
        return Err(CredentialError::Empty { name: name.into() });
    }
    let header_err = || CredentialError::Header {
        name: name.into(),
        header: cred.header.clone(),
    };
    let header = HeaderName::from_bytes(cred.header.as_bytes()).map_err(|_| header_err())?;
    let formatted = Zeroizing::new(match &cred.basic_user {
        Some(user) => {
            let pair = Zeroizing::new(format!("{user}:{}", value.as_str()));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
            )
        }
        None => cred.format.replace("{secret}", &value),
    });
    let mut header_value = HeaderValue::from_str(&formatted).map_err(|_| header_err())?;
    header_value.set_sensitive(true);
    let placeholder = cred.placeholder.as_ref().map(|var| Placeholder {
        var: var.clone(),
        value: new_placeholder(name),
    });
    Ok(Secret {
        name: name.into(),
        header,
        value,
        header_value,
        placeholder,
    })
}

/// Unguessable, so the sandbox cannot make the proxy swap in a secret by guessing, and
/// recognisable in a log.
fn new_placeholder(name: &str) -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("gateway-placeholder-{name}-{hex}")
}
