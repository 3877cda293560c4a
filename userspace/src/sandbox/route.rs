//! The host's table of running sandboxes, by guest address: what the DNS
//! proxy, the HTTP(S) proxy and the flow records look a packet's or a
//! connection's sandbox up in. The daemon keeps it current.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use crate::policy::compile::CompiledPolicy;

/// What the proxy knows about one guest address.
#[derive(Debug)]
pub struct Route {
    pub sandbox: String,
    /// The sandbox id (datapath events carry it).
    pub id: u32,
    pub policy: Arc<CompiledPolicy>,
    /// The trie key prefix of the policy generation in force.
    pub policy_id: u32,
    /// Credentials of the sandbox's policy whose secrets are loaded.
    pub credentials: Vec<Arc<crate::credentials::CredentialBinding>>,
    /// The sandbox's CA (for terminating TLS to credential hosts).
    pub ca: Option<Arc<std::sync::Mutex<crate::credentials::ca::SandboxCa>>>,
}

/// Guest address → its sandbox, kept current by the daemon.
pub type Routes = Arc<RwLock<HashMap<IpAddr, Arc<Route>>>>;

