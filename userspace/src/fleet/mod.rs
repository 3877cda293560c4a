//! Fleet policy source: hosts take their policies from etcd (an existing
//! distributed store, not a home-made control plane), apply each change
//! atomically as `policy apply` does, keep enforcing their last good set
//! when the store is away, and publish what they enforce.
//!
//! [`layout`] says where keys live, [`reconcile`] turns keys into the
//! policies a host enforces (validation, precedence, refusals; pure),
//! [`watch`] is the loop against the store, [`cache`] the last good set
//! on disk, [`status`] what each host publishes, [`light`] the benchmark's
//! light hosts.

pub mod cache;
pub mod layout;
pub mod light;
pub mod reconcile;
pub mod source;
pub mod status;
pub mod watch;

use serde::{Deserialize, Serialize};

pub use layout::{HostIdentity, Layout, Scope};
pub use source::{EtcdOptions, EtcdSource};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("policy source {url}: {reason}")]
    BadSource { url: String, reason: String },
    #[error("{0}")]
    BadOptions(String),
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd: {0} timed out")]
    Timeout(String),
    #[error("etcd: {0}")]
    Session(String),
    #[error("{what}: {source}")]
    Write { what: String, source: std::io::Error },
}

/// The daemon's `[fleet]` configuration (flags override it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// `etcd://HOST:PORT[,HOST:PORT…]/PREFIX` (`etcds://` for TLS).
    pub source: String,
    /// This host's name in the fleet (default: the kernel's hostname).
    pub host_name: Option<String>,
    pub host_group: Option<String>,
    /// How long a starting daemon waits for its first read of the store
    /// before it serves on the set it cached.
    pub initial_sync_ms: u64,
    pub etcd: EtcdOptions,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig { source: String::new(), host_name: None, host_group: None, initial_sync_ms: 3000, etcd: EtcdOptions::default() }
    }
}

impl FleetConfig {
    pub fn source(&self) -> Result<EtcdSource, FleetError> {
        EtcdSource::parse(&self.source)
    }

    pub fn identity(&self) -> Result<HostIdentity, FleetError> {
        let name = match &self.host_name {
            Some(n) => n.clone(),
            None => hostname(),
        };
        HostIdentity::new(&name, self.host_group.as_deref()).map_err(FleetError::BadOptions)
    }

}

/// The kernel's hostname (uname).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}
