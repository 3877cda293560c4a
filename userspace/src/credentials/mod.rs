//! What a sandbox may be given without holding it: the secrets (loaded
//! from the host, zeroized), each credential bound to its hosts with the
//! header it is sent in, the patterns that find the secret again in
//! anything coming back, and the sandbox's own CA for terminating TLS to
//! those hosts. The proxy ([`crate::proxy`]) does the I/O with them.

pub mod ca;
pub mod scrub;
pub mod secrets;

use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue};

use scrub::Patterns;
use secrets::Secret;

#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error("credential {name}: {header:?} is not a header name")]
    HeaderName { name: String, header: String },
    #[error("credential {name}: the formatted value is not a valid header value")]
    HeaderValue { name: String },
    #[error("credential {name}: {source}")]
    Scrub { name: String, source: scrub::ScrubError },
}

/// A credential as the proxy uses it.
pub struct CredentialBinding {
    pub name: String,
    pub hosts: Vec<String>,
    pub header: HeaderName,
    /// `format` with `{secret}` replaced: the header value to send.
    pub value: HeaderValue,
    /// The secret alone (kept for its lifetime and zeroing; it is sent
    /// only inside `value`).
    pub secret: Arc<Secret>,
    /// Every form of the secret, for scrubbing responses.
    pub scrub: Patterns,
    /// Inject into plain HTTP too.
    pub allow_plaintext: bool,
}

impl std::fmt::Debug for CredentialBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialBinding").field("name", &self.name).field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

impl CredentialBinding {
    pub fn new(name: &str, hosts: &[String], header: &str, format: &str, secret: Arc<Secret>, allow_plaintext: bool) -> Result<CredentialBinding, BindingError> {
        let header_name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| BindingError::HeaderName { name: name.to_string(), header: header.to_string() })?;
        let formatted = zeroize::Zeroizing::new(format.replace("{secret}", secret.expose()));
        let mut value = HeaderValue::from_str(&formatted).map_err(|_| BindingError::HeaderValue { name: name.to_string() })?;
        value.set_sensitive(true);
        let scrub = secret.scrub_patterns(formatted.as_bytes()).map_err(|source| BindingError::Scrub { name: name.to_string(), source })?;
        Ok(CredentialBinding {
            name: name.to_string(),
            hosts: hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            header: header_name,
            value,
            secret,
            scrub,
            allow_plaintext,
        })
    }

    pub fn covers(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
    }
}

