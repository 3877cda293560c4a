//! The TLS server configurations the credential proxy terminates guests'
//! connections with: one per sandbox and credential host, holding the leaf
//! the sandbox's CA minted for that host, built once and shared by every
//! connection (and their resumed sessions) until the leaf nears its expiry,
//! the sandbox's CA is another one, or the sandbox is gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::credentials::ca::{CaError, SandboxCa};

#[derive(Debug, thiserror::Error)]
pub enum GuestTlsError {
    #[error("{0}")]
    Leaf(#[from] CaError),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A configuration is rebuilt this long before its leaf expires: as long
/// ahead as [`SandboxCa::leaf`] renews the leaves it caches, so a rebuilt
/// configuration gets a fresh leaf.
const RENEW_BEFORE: Duration = Duration::from_secs(3600);

/// Configurations kept at most (least recently used go first): a sandbox
/// has a few credential hosts, a host a few hundred sandboxes.
pub const DEFAULT_CAPACITY: usize = 1024;

/// The configurations by (sandbox, host).
pub struct GuestTlsConfigs {
    entries: Mutex<Entries>,
    capacity: usize,
}

#[derive(Default)]
struct Entries {
    by_key: HashMap<(String, String), Entry>,
    /// Bumped on every use, for least-recently-used eviction.
    clock: u64,
}

struct Entry {
    /// The CA that signed the leaf: the entry holds only while the sandbox
    /// still has this very CA (a deleted sandbox's CA is dropped with it; a
    /// re-created sandbox of the same name has a new one).
    ca: Weak<Mutex<SandboxCa>>,
    config: Arc<rustls::ServerConfig>,
    not_after: SystemTime,
    used: u64,
}

impl Entry {
    fn holds_for(&self, ca: &Arc<Mutex<SandboxCa>>, now: SystemTime) -> bool {
        self.ca.upgrade().is_some_and(|c| Arc::ptr_eq(&c, ca)) && self.fresh(now)
    }

    fn fresh(&self, now: SystemTime) -> bool {
        self.not_after > now + RENEW_BEFORE
    }
}

impl Default for GuestTlsConfigs {
    fn default() -> Self {
        GuestTlsConfigs::with_capacity(DEFAULT_CAPACITY)
    }
}

impl GuestTlsConfigs {
    pub fn with_capacity(capacity: usize) -> GuestTlsConfigs {
        GuestTlsConfigs { entries: Mutex::default(), capacity: capacity.max(1) }
    }

    /// The configuration for `host` in `sandbox`, whose CA is `ca`.
    pub fn get(&self, sandbox: &str, host: &str, ca: &Arc<Mutex<SandboxCa>>) -> Result<Arc<rustls::ServerConfig>, GuestTlsError> {
        self.get_at(sandbox, host, ca, SystemTime::now())
    }

    fn get_at(&self, sandbox: &str, host: &str, ca: &Arc<Mutex<SandboxCa>>, now: SystemTime) -> Result<Arc<rustls::ServerConfig>, GuestTlsError> {
        let key = (sandbox.to_string(), host.to_string());
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.clock += 1;
            let clock = entries.clock;
            if let Some(e) = entries.by_key.get_mut(&key).filter(|e| e.holds_for(ca, now)) {
                e.used = clock;
                return Ok(e.config.clone());
            }
        }
        // Built outside the lock (minting a leaf signs a certificate): two
        // first connections at once may both build; the later one is kept.
        let leaf = ca.lock().unwrap_or_else(|p| p.into_inner()).leaf(host)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(leaf.cert_der)], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der)))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.clock += 1;
        let used = entries.clock;
        // On every miss (rare: once per sandbox and host a day), whatever no
        // longer holds goes: a deleted sandbox's leaf keys are not kept
        // until the cache fills. Then, when still full, the least recently used.
        entries.by_key.retain(|_, e| e.ca.strong_count() > 0 && e.fresh(now));
        if !entries.by_key.contains_key(&key) && entries.by_key.len() >= self.capacity {
            let oldest = entries.by_key.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                entries.by_key.remove(&oldest);
            }
        }
        entries.by_key.insert(key, Entry { ca: Arc::downgrade(ca), config: config.clone(), not_after: leaf.not_after, used });
        Ok(config)
    }

    /// Configurations cached now.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::ca::LEAF_LIFETIME;

    fn ca() -> Arc<Mutex<SandboxCa>> {
        Arc::new(Mutex::new(SandboxCa::generate().unwrap()))
    }

    #[test]
    fn one_config_per_sandbox_and_host_until_its_leaf_or_ca_changes() {
        let cache = GuestTlsConfigs::with_capacity(8);
        let (a, b) = (ca(), ca());
        let first = cache.get("a", "api.test", &a).unwrap();
        assert!(Arc::ptr_eq(&first, &cache.get("a", "api.test", &a).unwrap()), "built once, shared");
        assert_eq!(first.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(!Arc::ptr_eq(&first, &cache.get("a", "other.test", &a).unwrap()), "another host, another leaf");
        assert!(!Arc::ptr_eq(&first, &cache.get("b", "api.test", &b).unwrap()), "another sandbox, another CA");
        assert_eq!(cache.len(), 3);
        // The sandbox re-created under its name has a new CA: rebuilt, and
        // the config trusted by the old CA's guests is not served to it.
        let again = ca();
        let renewed = cache.get("a", "api.test", &again).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed) && Arc::ptr_eq(&renewed, &cache.get("a", "api.test", &again).unwrap()));
        assert_eq!(cache.len(), 3, "replaced, not added");
        // Near the leaves' expiry (as the CA renews its own cache): rebuilt,
        // and the others, as old, go with that miss.
        let late = SystemTime::now() + LEAF_LIFETIME - RENEW_BEFORE + Duration::from_secs(60);
        assert!(!Arc::ptr_eq(&renewed, &cache.get_at("a", "api.test", &again, late).unwrap()));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_gone_sandboxes_first() {
        let cache = GuestTlsConfigs::with_capacity(2);
        let (a, b, c) = (ca(), ca(), ca());
        let first_a = cache.get("a", "api.test", &a).unwrap();
        cache.get("b", "api.test", &b).unwrap();
        // `a` is used again, so `b` is the least recently used.
        cache.get("a", "api.test", &a).unwrap();
        cache.get("c", "api.test", &c).unwrap();
        assert_eq!(cache.len(), 2);
        assert!(Arc::ptr_eq(&first_a, &cache.get("a", "api.test", &a).unwrap()), "the recently used entry stayed");
        let entries = || cache.entries.lock().unwrap().by_key.keys().map(|(s, _)| s.clone()).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(entries(), ["a".to_string(), "c".to_string()].into());
        // A deleted sandbox (its CA dropped) makes room before anyone in
        // use, even when it was used last.
        cache.get("c", "api.test", &c).unwrap();
        drop(c);
        let d = ca();
        cache.get("d", "api.test", &d).unwrap();
        assert_eq!(entries(), ["a".to_string(), "d".to_string()].into());
        // And goes at the next miss, full or not.
        let big = GuestTlsConfigs::with_capacity(8);
        let (e, f) = (ca(), ca());
        big.get("e", "api.test", &e).unwrap();
        drop(e);
        big.get("f", "api.test", &f).unwrap();
        assert_eq!(big.len(), 1);
    }
}
