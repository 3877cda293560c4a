//! The per-sandbox certificate authority of the credential proxy. Each
//! sandbox gets its own CA (so a CA key leaking from one sandbox's proxy
//! state could mint certificates for no other sandbox); the guest is given
//! the CA certificate to trust, and the key never leaves the host's state
//! dir (mode 0600). Leaf certificates for credential hosts are minted on
//! demand, short-lived, and cached.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("sandbox CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("sandbox CA {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("sandbox CA {path}: no certificate in it")]
    NoCertificate { path: String },
}

/// A CA key made ahead of time (by a tap-pool worker, off the create
/// path), for exactly one sandbox: it is moved, never cloned, into
/// [`SandboxCa::with_key`]. Made with [`CaKey::generate_in`], its files are
/// written ahead too, in a directory of its own that
/// [`SandboxCa::save`] renames to the sandbox's. Dropping it unused (a
/// pooled tap dismantled) discards it and its directory.
pub struct CaKey {
    /// Always Some until [`SandboxCa::with_key`] takes it.
    key: Option<KeyPair>,
    prepared: Option<PathBuf>,
}

impl CaKey {
    /// A fresh ECDSA P-256 key, in memory only.
    pub fn generate() -> Result<CaKey, CaError> {
        Ok(CaKey { key: Some(KeyPair::generate()?), prepared: None })
    }

    /// A fresh key, also written ahead into `dir` (made 0700, holding
    /// `ca.key` 0600 and an empty `ca.pem`): the sandbox's save then only
    /// renames the directory and fills `ca.pem` in. Creating files is the
    /// slow part of saving a CA on some filesystems (ext4 without a journal
    /// looks past recently deleted inodes for a free one, ~1 ms after many
    /// deletes), and it happens here, off the create path. A key whose files
    /// could not be written is still a key: the save writes them.
    pub fn generate_in(dir: &Path) -> Result<CaKey, CaError> {
        let mut made = Self::generate()?;
        let pem = made.key.as_ref().map(KeyPair::serialize_pem).unwrap_or_default();
        match write_ca_files(dir, &pem, "") {
            Ok(_) => made.prepared = Some(dir.to_path_buf()),
            Err(e) => {
                tracing::warn!("writing a CA key ahead (the create writes it): {e}");
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        Ok(made)
    }
}

impl Drop for CaKey {
    fn drop(&mut self) {
        if let Some(dir) = self.prepared.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("CaKey(..)")
    }
}

/// How long a minted leaf certificate is valid (and cached).
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub struct SandboxCa {
    sandbox: String,
    /// The issuer leaves are signed by; made at the first leaf for a loaded
    /// CA (a signature the data plane would otherwise pay on every push of
    /// the sandbox, most of which never mint a leaf).
    cert: Option<rcgen::Certificate>,
    key: KeyPair,
    pub cert_pem: String,
    leaves: HashMap<String, Leaf>,
    /// The directory its key was written ahead into (see
    /// [`CaKey::generate_in`]), until [`SandboxCa::save`] moves it.
    prepared: Option<PathBuf>,
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SandboxCa").field("cached_leaves", &self.leaves.len()).finish_non_exhaustive()
    }
}

/// A leaf certificate and its key, DER.
#[derive(Clone)]
pub struct Leaf {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub not_after: SystemTime,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.display().to_string(), source }
}

impl SandboxCa {
    fn params(sandbox: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("sbx-net sandbox {sandbox} CA"));
        dn.push(DnType::OrganizationName, "sbx-net");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    /// A new CA for `sandbox` (ECDSA P-256).
    pub fn generate(sandbox: &str) -> Result<SandboxCa, CaError> {
        Self::with_key(sandbox, CaKey::generate()?)
    }

    /// A new CA for `sandbox` with a key made ahead of time: only the
    /// certificate (which names the sandbox) is signed here.
    pub fn with_key(sandbox: &str, mut key: CaKey) -> Result<SandboxCa, CaError> {
        let Some(pair) = key.key.take() else { return Self::generate(sandbox) };
        // Signed while `key` still owns its directory: a failure removes it.
        let cert = Self::params(sandbox).self_signed(&pair)?;
        let cert_pem = cert.pem();
        Ok(SandboxCa { sandbox: sandbox.to_string(), cert: Some(cert), key: pair, cert_pem, leaves: HashMap::new(), prepared: key.prepared.take() })
    }

    /// Loads the CA `save` wrote (the same key and certificate the guest
    /// already trusts).
    pub fn load(sandbox: &str, dir: &Path) -> Result<SandboxCa, CaError> {
        let key_path = dir.join("ca.key");
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let cert_path = dir.join("ca.pem");
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        // Not what the guest was given (a save cut short): no CA at all,
        // so its credential hosts are refused, not served a broken chain.
        if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(CaError::NoCertificate { path: cert_path.display().to_string() });
        }
        // The issuer for minting leaves is the same parameters re-signed
        // with the same key (the guest trusts the saved PEM): made when the
        // first leaf is.
        Ok(SandboxCa { sandbox: sandbox.to_string(), cert: None, key, cert_pem, leaves: HashMap::new(), prepared: None })
    }

    /// Writes `ca.pem` (world-readable: it is what the guest trusts) and
    /// `ca.key` (0600) into `dir` (made 0700); returns the certificate's
    /// path. A key written ahead (see [`CaKey::generate_in`]) has its
    /// directory renamed to `dir` instead, when `dir` is not there yet.
    pub fn save(&mut self, dir: &Path) -> Result<PathBuf, CaError> {
        let key_pem = self.key.serialize_pem();
        if let Some(prepared) = self.prepared.take() {
            // Both files are filled in where they were made (the key again,
            // so what is on disk is this CA's whatever the directory held),
            // then the finished directory becomes the sandbox's in one
            // rename, which replaces nothing but an empty directory.
            let filled = fill_in(&prepared.join("ca.key"), key_pem.as_bytes()).and_then(|_| fill_in(&prepared.join("ca.pem"), self.cert_pem.as_bytes()));
            if filled.is_ok() && std::fs::rename(&prepared, dir).is_ok() {
                return Ok(dir.join("ca.pem"));
            }
            let _ = std::fs::remove_dir_all(&prepared);
        }
        write_ca_files(dir, &key_pem, &self.cert_pem)
    }

    /// A leaf for `host` signed by this CA, from the cache while it has
    /// more than an hour left.
    pub fn leaf(&mut self, host: &str) -> Result<Leaf, CaError> {
        let now = SystemTime::now();
        if let Some(l) = self.leaves.get(host) {
            if l.not_after > now + Duration::from_secs(3600) {
                return Ok(l.clone());
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        // Backdated a little for guests whose clocks lag.
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + LEAF_LIFETIME).into();
        params.use_authority_key_identifier_extension = true;
        if self.cert.is_none() {
            self.cert = Some(Self::params(&self.sandbox).self_signed(&self.key)?);
        }
        let issuer = self.cert.as_ref().expect("made above");
        let cert = params.signed_by(&key, issuer, &self.key)?;
        let leaf = Leaf { cert_der: cert.der().to_vec(), key_der: key.serialize_der(), not_after: now + LEAF_LIFETIME };
        self.leaves.insert(host.to_string(), leaf.clone());
        Ok(leaf)
    }
}

/// Writes `ca.key` (0600) and `ca.pem` (0644: it is what the guest trusts)
/// into `dir` (made 0700); returns the certificate's path. The key file is
/// created 0600 before a byte is written, so the key is never readable by
/// others, whatever the umask.
fn write_ca_files(dir: &Path, key_pem: &str, cert_pem: &str) -> Result<PathBuf, CaError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The parent is missing (a first sandbox): make the chain.
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        }
        Err(e) => return Err(io_err(dir)(e)),
    }
    let write = |name: &str, mode: u32, bytes: &[u8]| -> Result<PathBuf, CaError> {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&path).map_err(io_err(&path))?;
        // The mode of an existing file, or one the umask narrowed, is
        // set on the open file (no second path lookup).
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io_err(&path))?;
        f.write_all(bytes).map_err(io_err(&path))?;
        Ok(path)
    };
    write("ca.key", 0o600, key_pem.as_bytes())?;
    write("ca.pem", 0o644, cert_pem.as_bytes())
}

/// [`crate::util::fs::fill_in`], its error naming the file.
fn fill_in(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    crate::util::fs::fill_in(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_saves_loads_and_mints_cached_leaves() {
        let dir = std::env::temp_dir().join(format!("sbx-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut ca = SandboxCa::generate("a").unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let path = ca.save(&dir).unwrap();
        assert_eq!(path, dir.join("ca.pem"));
        let mode = std::fs::metadata(dir.join("ca.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = ca.leaf("api.example.com").unwrap();
        let again = ca.leaf("api.example.com").unwrap();
        assert_eq!(first.cert_der, again.cert_der, "leaves are cached");
        assert_ne!(ca.leaf("other.example.com").unwrap().cert_der, first.cert_der);
        let mut loaded = SandboxCa::load("a", &dir).unwrap();
        assert_eq!(loaded.cert_pem, ca.cert_pem);
        assert!(!loaded.leaf("api.example.com").unwrap().cert_der.is_empty());
        // Another sandbox's CA is another key.
        assert_ne!(SandboxCa::generate("b").unwrap().cert_pem, ca.cert_pem);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_written_ahead_becomes_the_sandboxs_directory() {
        let base = std::env::temp_dir().join(format!("sbx-ca-prepared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let spare = base.join(".pool-1");
        let key = CaKey::generate_in(&spare).unwrap();
        assert_eq!(key.prepared.as_deref(), Some(spare.as_path()));
        assert_eq!((mode(&spare), mode(&spare.join("ca.key"))), (0o700, 0o600));
        let key_pem = key.key.as_ref().unwrap().serialize_pem();
        let mut ca = SandboxCa::with_key("a", key).unwrap();
        let dir = base.join("a");
        assert_eq!(ca.save(&dir).unwrap(), dir.join("ca.pem"));
        assert!(!spare.exists(), "renamed, not copied");
        assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), key_pem);
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca.cert_pem);
        assert_eq!((mode(&dir), mode(&dir.join("ca.key")), mode(&dir.join("ca.pem"))), (0o700, 0o600, 0o644));
        assert_eq!(SandboxCa::load("a", &dir).unwrap().cert_pem, ca.cert_pem);

        // A sandbox directory already there (files of an earlier one): the
        // files are written over, and the spare goes.
        let spare = base.join(".pool-2");
        let mut ca = SandboxCa::with_key("a", CaKey::generate_in(&spare).unwrap()).unwrap();
        ca.save(&dir).unwrap();
        assert!(!spare.exists());
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca.cert_pem);
        assert_eq!(SandboxCa::load("a", &dir).unwrap().cert_pem, ca.cert_pem, "the key on disk is the new one");

        // A directory made ahead that lost its key file (removed under
        // it): the save writes both files, and the key on disk is the CA's.
        let spare = base.join(".pool-4");
        let mut ca = SandboxCa::with_key("d", CaKey::generate_in(&spare).unwrap()).unwrap();
        std::fs::remove_file(spare.join("ca.key")).unwrap();
        let d = base.join("d");
        ca.save(&d).unwrap();
        assert!(!spare.exists());
        assert_eq!(std::fs::read_to_string(d.join("ca.key")).unwrap(), ca.key.serialize_pem());
        // A save cut short (an empty certificate) is no CA.
        std::fs::write(d.join("ca.pem"), "").unwrap();
        assert!(matches!(SandboxCa::load("d", &d), Err(CaError::NoCertificate { .. })));

        // A key never used takes its files with it.
        let spare = base.join(".pool-3");
        drop(CaKey::generate_in(&spare).unwrap());
        assert!(!spare.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_key_made_ahead_signs_the_named_ca_and_saves_0600() {
        let dir = std::env::temp_dir().join(format!("sbx-ca-ahead-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let key = CaKey::generate().unwrap();
        assert_eq!(format!("{key:?}"), "CaKey(..)", "Debug never shows the key");
        let key_pem = key.key.as_ref().unwrap().serialize_pem();
        let mut ca = SandboxCa::with_key("ahead", key).unwrap();
        ca.save(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), key_pem);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&dir.join("ca.pem")), 0o644);
        assert_eq!(mode(&dir), 0o700);
        // Saving again (an existing dir and files) keeps the modes.
        std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        ca.save(&dir).unwrap();
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        // What was saved loads as the same CA.
        assert_eq!(SandboxCa::load("ahead", &dir).unwrap().cert_pem, ca.cert_pem);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
