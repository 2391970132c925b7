//! The gateway's local CA: made on first use, key readable by root only, reused across runs.
//! It mints one leaf certificate per intercepted host, valid for a week and cached for a
//! day, at most [`MAX_LEAVES`] at a time (under a `*.` rule the sandbox picks the names).

use std::{
    collections::HashMap,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// How many leaves are kept; minting another drops the oldest.
const MAX_LEAVES: usize = 1024;

/// A leaf is minted anew after this, long before it expires, so a gateway that runs for weeks
/// never presents an expired one.
const LEAF_REUSE: Duration = Duration::days(1);

/// Where the CA lives unless `GATEWAY_STATE_DIR` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gateway";

pub struct LocalCa {
    cert: Certificate,
    key: KeyPair,
    pem: String,
    /// One key for every leaf: minting stays cheap and nothing the sandbox sees depends on it.
    leaf_key: KeyPair,
    /// By host: the settings presenting its leaf, and when that was minted.
    leaves: Mutex<HashMap<String, (Arc<ServerConfig>, OffsetDateTime)>>,
}

pub fn state_dir() -> PathBuf {
    std::env::var_os("GATEWAY_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
}

impl LocalCa {
    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        let (params, key) = if key_path.exists() {
            owner_only(dir, &key_path)?;
            let key_pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading the gateway CA key {}", key_path.display()))?;
            let cert_pem = std::fs::read_to_string(&cert_path)
                .with_context(|| format!("reading the gateway CA {}", cert_path.display()))?;
            let key = KeyPair::from_pem(&key_pem).with_context(|| {
                format!(
                    "{} is not a PEM private key: remove it and {} to make a new CA",
                    key_path.display(),
                    cert_path.display()
                )
            })?;
            let params = CertificateParams::from_ca_cert_pem(&cert_pem)
                .with_context(|| format!("{} is not a PEM CA certificate", cert_path.display()))?;
            (params, key)
        } else {
            create(dir, &cert_path, &key_path)?
        };
        let cert = params.self_signed(&key).context("loading the gateway CA")?;
        let pem = std::fs::read_to_string(&cert_path)?;
        Ok(Self {
            cert,
            key,
            pem,
            leaf_key: KeyPair::generate().context("generating the leaf key")?,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate the sandbox trusts, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// TLS server settings presenting a certificate for `host` (a canonical host).
    pub fn server_config(&self, host: &str) -> anyhow::Result<Arc<ServerConfig>> {
        self.server_config_at(host, OffsetDateTime::now_utc())
    }

    fn server_config_at(
        &self,
        host: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Arc<ServerConfig>> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, minted)) = leaves.get(host)
            && now - *minted < LEAF_REUSE
        {
            return Ok(c.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        params.distinguished_name = name(host);
        params.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(7);
        let leaf = params.signed_by(&self.leaf_key, &self.cert, &self.key)?;
        // The leaf alone: clients hold the CA from the bundle `run` wrote.
        let chain = vec![leaf.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(super::crypto())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if leaves.len() >= MAX_LEAVES && !leaves.contains_key(host) {
            let oldest = leaves
                .iter()
                .min_by_key(|(_, (_, minted))| *minted)
                .map(|(h, _)| h.clone());
            if let Some(oldest) = oldest {
                leaves.remove(&oldest);
            }
        }
        leaves.insert(host.to_owned(), (config.clone(), now));
        Ok(config)
    }
}

/// Whoever can read the CA key can mint certificates every sandbox trusts, and whoever can
/// write its directory can replace it: both must be the gateway's user alone, as `create`
/// made them.
fn owner_only(dir: &Path, key_path: &Path) -> anyhow::Result<()> {
    let uid = nix::unistd::geteuid().as_raw();
    let fix = format!(
        "chown {uid} and chmod 600 it (its directory 700), or remove {} to make a new CA (sandboxes started before keep trusting the old one until they end)",
        dir.display()
    );
    let key = std::fs::symlink_metadata(key_path)
        .with_context(|| format!("reading the gateway CA key {}", key_path.display()))?;
    anyhow::ensure!(
        key.file_type().is_file(),
        "the gateway CA key {} is not a regular file: {fix}",
        key_path.display()
    );
    anyhow::ensure!(
        key.uid() == uid && key.mode() & 0o077 == 0,
        "the gateway CA key {} is owned by uid {} with mode {:o}, so others may read it: {fix}",
        key_path.display(),
        key.uid(),
        key.mode() & 0o7777
    );
    let d = std::fs::metadata(dir)
        .with_context(|| format!("reading the gateway CA directory {}", dir.display()))?;
    anyhow::ensure!(
        d.uid() == uid && d.mode() & 0o022 == 0,
        "the gateway CA directory {} is owned by uid {} with mode {:o}, so others may replace the key: {fix}",
        dir.display(),
        d.uid(),
        d.mode() & 0o7777
    );
    Ok(())
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn create(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<(CertificateParams, KeyPair)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the gateway state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name("gateway local CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    let cert = params.clone().self_signed(&key)?;
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, key_pem.as_bytes()))
        .with_context(|| format!("writing the gateway CA key {}", key_path.display()))?;
    std::fs::write(cert_path, cert.pem())
        .with_context(|| format!("writing the gateway CA {}", cert_path.display()))?;
    tracing::info!("created the gateway CA at {}", cert_path.display());
    Ok((params, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> LocalCa {
        let dir = std::env::temp_dir().join(format!("gateway-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = LocalCa::load_or_create(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        ca
    }

    #[test]
    fn a_key_others_may_read_or_replace_is_refused() {
        let dir = std::env::temp_dir().join(format!("gateway-ca-modes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        LocalCa::load_or_create(&dir).unwrap();
        let key = dir.join("ca-key.pem");
        let chmod = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let refusal = || match LocalCa::load_or_create(&dir) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert_eq!(refusal(), "", "as created");
        chmod(&key, 0o644);
        assert!(
            refusal().contains("with mode 644, so others may read it"),
            "{}",
            refusal()
        );
        chmod(&key, 0o600);
        chmod(&dir, 0o777);
        assert!(
            refusal().contains("so others may replace the key"),
            "{}",
            refusal()
        );
        chmod(&dir, 0o755);
        assert_eq!(refusal(), "", "a directory others may read is fine");
        std::fs::remove_file(&key).unwrap();
        std::os::unix::fs::symlink(dir.join("ca.pem"), &key).unwrap();
        assert!(refusal().contains("is not a regular file"), "{}", refusal());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leaves_are_reused_for_a_day_and_bounded_in_number() {
        let ca = ca();
        let now = OffsetDateTime::now_utc();
        let first = ca.server_config_at("api.test", now).unwrap();
        let again = ca
            .server_config_at("api.test", now + Duration::hours(23))
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again), "reused within a day");
        let renewed = ca
            .server_config_at("api.test", now + Duration::hours(25))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed), "minted anew after a day");
        for i in 0..MAX_LEAVES + 10 {
            ca.server_config_at(&format!("h{i}.test"), now + Duration::hours(26))
                .unwrap();
        }
        let leaves = ca.leaves.lock().unwrap();
        assert_eq!(leaves.len(), MAX_LEAVES);
        assert!(!leaves.contains_key("api.test"), "the oldest went first");
    }
}
