//! The environment `run` gives CMD (DESIGN.md): the tunnel as proxy and the CA bundle.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

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
