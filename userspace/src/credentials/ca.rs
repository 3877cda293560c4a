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

/// A sandbox CA made ahead of time (by a tap-pool worker, off the create
/// path), for exactly one sandbox: it is moved, never cloned, into
/// [`SandboxCa::from_prepared`]. Its key is made and its certificate signed
/// here: the certificate names its key (a fingerprint), not the sandbox,
/// which is not known yet. Made with [`PreparedCa::generate_in`], its files
/// are written ahead too, in a directory of its own that
/// [`SandboxCa::save`] renames to the sandbox's. Dropping it unused (a
/// pooled tap dismantled) discards it and its directory.
pub struct PreparedCa {
    /// Always Some until [`SandboxCa::from_prepared`] takes it.
    made: Option<MadeCa>,
    prepared: Option<PathBuf>,
}

/// A key and the self-signed CA certificate it signed.
struct MadeCa {
    key: KeyPair,
    cert: rcgen::Certificate,
    cert_pem: String,
}

impl MadeCa {
    /// A fresh ECDSA P-256 key and its CA certificate.
    fn generate() -> Result<MadeCa, CaError> {
        let key = KeyPair::generate()?;
        let cert = ca_params(&key_subject(&key)).self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(MadeCa { key, cert, cert_pem })
    }
}

impl PreparedCa {
    /// A fresh CA, in memory only.
    pub fn generate() -> Result<PreparedCa, CaError> {
        Ok(PreparedCa { made: Some(MadeCa::generate()?), prepared: None })
    }

    /// A fresh CA, also written ahead into `dir` (made 0700, holding
    /// `ca.key` 0600 and `ca.pem` 0644): the sandbox's save then only
    /// renames the directory. Creating files is the slow part of saving a
    /// CA on some filesystems (ext4 without a journal looks past recently
    /// deleted inodes for a free one, ~1 ms after many deletes), and signing
    /// its certificate a third of a create's CPU (~0.3 ms of `bench
    /// lifecycle`'s paced create): both happen here, off the create path. A
    /// CA whose files could not be written is still a CA: the save writes
    /// them.
    pub fn generate_in(dir: &Path) -> Result<PreparedCa, CaError> {
        let mut ahead = Self::generate()?;
        let made = ahead.made.as_ref().expect("made above");
        match write_ca_files(dir, &made.key.serialize_pem(), &made.cert_pem) {
            Ok(_) => ahead.prepared = Some(dir.to_path_buf()),
            Err(e) => {
                tracing::warn!("writing a CA ahead (the create writes it): {e}");
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        Ok(ahead)
    }
}

impl Drop for PreparedCa {
    fn drop(&mut self) {
        if let Some(dir) = self.prepared.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl std::fmt::Debug for PreparedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("PreparedCa(..)")
    }
}

/// How long a minted leaf certificate is valid (and cached).
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub struct SandboxCa {
    /// The subject its certificate names (the issuer of its leaves).
    subject: String,
    /// The issuer leaves are signed by; made at the first leaf for a loaded
    /// CA (a signature the data plane would otherwise pay on every push of
    /// the sandbox, most of which never mint a leaf).
    cert: Option<rcgen::Certificate>,
    key: CaKeyPair,
    pub cert_pem: String,
    leaves: HashMap<String, Leaf>,
    /// The directory it was written ahead into (see
    /// [`PreparedCa::generate_in`]), until [`SandboxCa::save`] moves it.
    prepared: Option<PathBuf>,
}

/// A CA's key: a loaded CA's stays text until its first leaf, so that
/// loading one (the data plane, for every sandbox pushed to it, most of
/// which never mint a leaf) costs no key parse and no public-key check.
enum CaKeyPair {
    Parsed(Box<KeyPair>),
    Pem(String),
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

/// The common name of a CA made for `key`: its public key's fingerprint
/// (the first 8 bytes of its SHA-256), so that the name can be made again
/// from the key alone when the CA is loaded, and no two CAs share it.
fn key_subject(key: &KeyPair) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    let fingerprint: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sbx-net sandbox CA {fingerprint}")
}

/// The common name of a CA made by a build before CAs were made ahead of
/// their sandbox (loaded from the state dir after an upgrade).
fn named_subject(sandbox: &str) -> String {
    format!("sbx-net sandbox {sandbox} CA")
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "sbx-net");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl SandboxCa {
    /// A new CA (ECDSA P-256).
    pub fn generate() -> Result<SandboxCa, CaError> {
        Self::from_prepared(PreparedCa::generate()?)
    }

    /// The CA made ahead for this sandbox: nothing is signed here.
    pub fn from_prepared(mut ahead: PreparedCa) -> Result<SandboxCa, CaError> {
        let Some(MadeCa { key, cert, cert_pem }) = ahead.made.take() else { return Self::generate() };
        let subject = key_subject(&key);
        Ok(SandboxCa { subject, cert: Some(cert), key: CaKeyPair::Parsed(Box::new(key)), cert_pem, leaves: HashMap::new(), prepared: ahead.prepared.take() })
    }

    /// The key made ahead, its CA certificate signed again naming
    /// `sandbox` (as builds before CAs were made ahead named it), for a data
    /// plane of such a build: it makes its leaves' issuer from that name.
    /// The files written ahead hold the other certificate: they go, and
    /// the save writes this CA's.
    pub fn from_prepared_naming(sandbox: &str, mut ahead: PreparedCa) -> Result<SandboxCa, CaError> {
        let key = match ahead.made.take() {
            Some(made) => made.key,
            None => KeyPair::generate()?,
        };
        drop(ahead);
        let subject = named_subject(sandbox);
        let cert = ca_params(&subject).self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(SandboxCa { subject, cert: Some(cert), key: CaKeyPair::Parsed(Box::new(key)), cert_pem, leaves: HashMap::new(), prepared: None })
    }

    /// Loads the CA `save` wrote for `sandbox` (the same key and
    /// certificate the guest already trusts). The key is parsed at the
    /// first leaf: a key that does not parse fails that leaf (the
    /// connection is refused), as a CA that did not load would.
    pub fn load(sandbox: &str, dir: &Path) -> Result<SandboxCa, CaError> {
        let key_path = dir.join("ca.key");
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let cert_path = dir.join("ca.pem");
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        // Not what the guest was given (a save cut short): no CA at all,
        // so its credential hosts are refused, not served a broken chain.
        let Some(Ok(der)) = rustls_pemfile::certs(&mut cert_pem.as_bytes()).next() else {
            return Err(CaError::NoCertificate { path: cert_path.display().to_string() });
        };
        // The subject its leaves must name as their issuer: an older
        // build's names the sandbox; this build's names the key, known
        // once the key is parsed.
        let named = named_subject(sandbox);
        let subject = if contains(der.as_ref(), named.as_bytes()) { named } else { String::new() };
        // The issuer for minting leaves is the same parameters re-signed
        // with the same key (the guest trusts the saved PEM): made when the
        // first leaf is.
        Ok(SandboxCa { subject, cert: None, key: CaKeyPair::Pem(key_pem), cert_pem, leaves: HashMap::new(), prepared: None })
    }

    /// Writes `ca.pem` (world-readable: it is what the guest trusts) and
    /// `ca.key` (0600) into `dir` (made 0700); returns the certificate's
    /// path. A CA made ahead (see [`PreparedCa::generate_in`]) has its
    /// directory renamed to `dir` instead, when `dir` is not there yet or
    /// is empty.
    pub fn save(&mut self, dir: &Path) -> Result<PathBuf, CaError> {
        let key_pem = match &self.key {
            CaKeyPair::Parsed(key) => key.serialize_pem(),
            CaKeyPair::Pem(pem) => pem.clone(),
        };
        if let Some(prepared) = self.prepared.take() {
            // The finished directory becomes the sandbox's in one rename,
            // which replaces nothing but an empty directory; its files are
            // checked to be whole first (sizes: no read, no write).
            let whole = |name: &str, len: usize| std::fs::metadata(prepared.join(name)).is_ok_and(|m| m.is_file() && m.len() == len as u64);
            if whole("ca.key", key_pem.len()) && whole("ca.pem", self.cert_pem.len()) && std::fs::rename(&prepared, dir).is_ok() {
                return Ok(dir.join("ca.pem"));
            }
            let _ = std::fs::remove_dir_all(&prepared);
        }
        write_ca_files(dir, &key_pem, &self.cert_pem)
    }

    /// Parses a loaded CA's key (at its first use).
    fn parse_key(&mut self) -> Result<(), CaError> {
        if let CaKeyPair::Pem(pem) = &self.key {
            let key = KeyPair::from_pem(pem)?;
            if self.subject.is_empty() {
                self.subject = key_subject(&key);
            }
            self.key = CaKeyPair::Parsed(Box::new(key));
        }
        Ok(())
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
        self.parse_key()?;
        let CaKeyPair::Parsed(issuer_key) = &self.key else { unreachable!("parsed above") };
        let issuer = match &mut self.cert {
            Some(cert) => cert,
            empty => empty.insert(ca_params(&self.subject).self_signed(issuer_key)?),
        };
        let cert = params.signed_by(&key, issuer, issuer_key)?;
        let leaf = Leaf { cert_der: cert.der().to_vec(), key_der: key.serialize_der(), not_after: now + LEAF_LIFETIME };
        self.leaves.insert(host.to_string(), leaf.clone());
        Ok(leaf)
    }
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `leaf` is a valid server certificate for `host` to a client
    /// that trusts `ca_pem` alone (rustls's own verifier, as a guest's
    /// rustls or curl would check it).
    fn chains(ca_pem: &str, leaf: &Leaf, host: &str) -> Result<(), String> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(rustls::crypto::ring::default_provider())).build().unwrap();
        let end_entity = CertificateDer::from(leaf.cert_der.clone());
        let name = ServerName::try_from(host.to_string()).unwrap();
        verifier.verify_server_cert(&end_entity, &[], &name, &[], UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
    }
    use std::sync::Arc;

    /// A path of this test process's under the temp dir, with nothing there.
    fn no_dir_yet(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sbx-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn key_pem(ca: &SandboxCa) -> String {
        match &ca.key {
            CaKeyPair::Parsed(key) => key.serialize_pem(),
            CaKeyPair::Pem(pem) => pem.clone(),
        }
    }

    #[test]
    fn generates_saves_loads_and_mints_cached_leaves_that_chain_to_it() {
        let dir = no_dir_yet("test");
        let mut ca = SandboxCa::generate().unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let path = ca.save(&dir).unwrap();
        assert_eq!(path, dir.join("ca.pem"));
        let mode = std::fs::metadata(dir.join("ca.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = ca.leaf("api.example.com").unwrap();
        let again = ca.leaf("api.example.com").unwrap();
        assert_eq!(first.cert_der, again.cert_der, "leaves are cached");
        chains(&ca.cert_pem, &first, "api.example.com").unwrap();
        assert!(chains(&ca.cert_pem, &first, "other.example.com").is_err(), "a leaf is for its host only");
        assert_ne!(ca.leaf("other.example.com").unwrap().cert_der, first.cert_der);
        // Loaded, the key is parsed only at the first leaf, and the leaves
        // chain to the certificate the guest was given.
        let mut loaded = SandboxCa::load("a", &dir).unwrap();
        assert_eq!(loaded.cert_pem, ca.cert_pem);
        assert!(matches!(loaded.key, CaKeyPair::Pem(_)), "not parsed on load");
        chains(&ca.cert_pem, &loaded.leaf("api.example.com").unwrap(), "api.example.com").unwrap();
        // Another sandbox's CA is another key, and trusts none of these.
        let other = SandboxCa::generate().unwrap();
        assert_ne!(other.cert_pem, ca.cert_pem);
        assert_ne!(other.subject, ca.subject, "the name is the key's");
        assert!(chains(&other.cert_pem, &first, "api.example.com").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ca_saved_by_an_older_build_naming_its_sandbox_still_mints_leaves_that_chain() {
        let dir = no_dir_yet("named");
        let key = KeyPair::generate().unwrap();
        let cert = ca_params(&named_subject("old-box")).self_signed(&key).unwrap();
        write_ca_files(&dir, &key.serialize_pem(), &cert.pem()).unwrap();
        let mut loaded = SandboxCa::load("old-box", &dir).unwrap();
        assert_eq!(loaded.subject, "sbx-net sandbox old-box CA");
        chains(&cert.pem(), &loaded.leaf("api.example.com").unwrap(), "api.example.com").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ca_made_ahead_can_be_named_for_an_older_data_plane() {
        let base = no_dir_yet("naming");
        std::fs::create_dir_all(&base).unwrap();
        let spare = base.join(".pool-1");
        let ahead = PreparedCa::generate_in(&spare).unwrap();
        let made_pem = ahead.made.as_ref().unwrap().key.serialize_pem();
        let mut ca = SandboxCa::from_prepared_naming("box", ahead).unwrap();
        assert!(!spare.exists(), "the files made ahead hold the other certificate");
        let dir = base.join("box");
        ca.save(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), made_pem, "the key made ahead");
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca.cert_pem);
        // What an older build does with it: the issuer made again from the
        // sandbox's name and the key.
        let older_issuer = ca_params(&named_subject("box")).self_signed(&KeyPair::from_pem(&made_pem).unwrap()).unwrap();
        let host_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["h.example".to_string()]).unwrap();
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&host_key, &older_issuer, &KeyPair::from_pem(&made_pem).unwrap()).unwrap();
        let leaf = Leaf { cert_der: leaf.der().to_vec(), key_der: Vec::new(), not_after: SystemTime::now() };
        chains(&ca.cert_pem, &leaf, "h.example").unwrap();
        // And this build, loading it.
        let mut loaded = SandboxCa::load("box", &dir).unwrap();
        chains(&ca.cert_pem, &loaded.leaf("h.example").unwrap(), "h.example").unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_key_that_does_not_parse_fails_the_first_leaf() {
        let dir = no_dir_yet("badkey");
        let mut ca = SandboxCa::generate().unwrap();
        ca.save(&dir).unwrap();
        std::fs::write(dir.join("ca.key"), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let mut loaded = SandboxCa::load("a", &dir).unwrap();
        assert!(loaded.leaf("api.example.com").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ca_written_ahead_becomes_the_sandboxs_directory() {
        let base = no_dir_yet("prepared");
        std::fs::create_dir_all(&base).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let spare = base.join(".pool-1");
        let ahead = PreparedCa::generate_in(&spare).unwrap();
        assert_eq!(ahead.prepared.as_deref(), Some(spare.as_path()));
        assert_eq!((mode(&spare), mode(&spare.join("ca.key")), mode(&spare.join("ca.pem"))), (0o700, 0o600, 0o644));
        let made_pem = ahead.made.as_ref().unwrap().key.serialize_pem();
        let mut ca = SandboxCa::from_prepared(ahead).unwrap();
        let dir = base.join("a");
        assert_eq!(ca.save(&dir).unwrap(), dir.join("ca.pem"));
        assert!(!spare.exists(), "renamed, not copied");
        assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), made_pem);
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca.cert_pem);
        assert_eq!((mode(&dir), mode(&dir.join("ca.key")), mode(&dir.join("ca.pem"))), (0o700, 0o600, 0o644));
        let mut loaded = SandboxCa::load("a", &dir).unwrap();
        assert_eq!(loaded.cert_pem, ca.cert_pem);
        chains(&ca.cert_pem, &loaded.leaf("h.example").unwrap(), "h.example").unwrap();
        let leaf = ca.leaf("h.example").unwrap();
        chains(&ca.cert_pem, &leaf, "h.example").unwrap();

        // A sandbox directory already there (files of an earlier one): the
        // files are written over, and the spare goes.
        let spare = base.join(".pool-2");
        let mut ca = SandboxCa::from_prepared(PreparedCa::generate_in(&spare).unwrap()).unwrap();
        ca.save(&dir).unwrap();
        assert!(!spare.exists());
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca.cert_pem);
        assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), key_pem(&ca), "the key on disk is the new one");

        // A directory made ahead that lost a file, or whose file was cut
        // short: the save writes both files, and the key on disk is the CA's.
        for damage in [|d: &Path| std::fs::remove_file(d.join("ca.key")).unwrap(), |d: &Path| std::fs::write(d.join("ca.pem"), "-----BEGIN").unwrap()] {
            let spare = base.join(".pool-4");
            let mut ca = SandboxCa::from_prepared(PreparedCa::generate_in(&spare).unwrap()).unwrap();
            damage(&spare);
            let d = base.join("d");
            let _ = std::fs::remove_dir_all(&d);
            ca.save(&d).unwrap();
            assert!(!spare.exists());
            assert_eq!(std::fs::read_to_string(d.join("ca.key")).unwrap(), key_pem(&ca));
            assert_eq!(std::fs::read_to_string(d.join("ca.pem")).unwrap(), ca.cert_pem);
        }
        // A save cut short (an empty certificate) is no CA.
        let d = base.join("d");
        std::fs::write(d.join("ca.pem"), "").unwrap();
        assert!(matches!(SandboxCa::load("d", &d), Err(CaError::NoCertificate { .. })));

        // A CA never used takes its files with it.
        let spare = base.join(".pool-3");
        drop(PreparedCa::generate_in(&spare).unwrap());
        assert!(!spare.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_ca_made_ahead_in_memory_saves_0600() {
        let dir = no_dir_yet("ahead");
        let ahead = PreparedCa::generate().unwrap();
        assert_eq!(format!("{ahead:?}"), "PreparedCa(..)", "Debug never shows the key");
        let made_pem = ahead.made.as_ref().unwrap().key.serialize_pem();
        let mut ca = SandboxCa::from_prepared(ahead).unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE"));
        ca.save(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), made_pem);
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
