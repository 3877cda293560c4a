//! The host service: owns the datapath (pinned maps and links), the nftables
//! table, the taps and the netns-guest pumps, and the persisted state that
//! lets a restarted daemon re-adopt all of them without a gap.
//!
//! All mutations run on one control thread ([`Daemon::handle`]), so requests
//! are serialised; the proxies read the routing table it publishes.
//!
//! By concern: starting and re-adopting what an earlier process left
//! (`adopt`), creating and deleting sandboxes (`lifecycle`), applying and
//! reloading policies (`policy_switch`), the table the proxies read
//! (`routes`), the thread that unregisters deleted taps (`reaper`), the
//! read-only answers (`status`) and `--cleanup` (`cleanup`).

mod adopt;
mod cleanup;
mod fleet;
mod lifecycle;
mod policy_switch;
mod reaper;
mod routes;
mod status;

pub use cleanup::cleanup;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;

use crate::control::api::{ErrorKind, Request, Response};
use crate::control::config::DaemonConfig;
use crate::control::state::{SandboxRecord, State, StateError};
use crate::credentials::ca::SandboxCa;
use crate::credentials::secrets::SecretStore;
use crate::datapath::nft::NftError;
use crate::datapath::{Datapath, DatapathError, DatapathOptions};
use crate::control::dataplane::link::DataplaneLink;
use crate::policy::compile::CompiledPolicy;
use crate::policy::store::{load_policies, PolicyEntry, PolicySet};
use crate::policy::PolicyError;
use crate::sandbox::guest_pump::PumpError;
use crate::sandbox::host::HostCheck;
use crate::sandbox::install::{HostSettings, InstallError, SandboxHost};
use crate::sandbox::route::Routes;
use crate::sandbox::tap_pool::TapPool;
use crate::sandbox::{SandboxError, SandboxSpec};

use self::reaper::Reaper;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no sandbox named {0:?}")]
    NoSuchSandbox(String),
    #[error("no policy named {name:?} (known: {known})")]
    NoSuchPolicy { name: String, known: String },
    #[error("sandbox {0:?} already exists")]
    SandboxExists(String),
    #[error("tap {0} already belongs to a sandbox")]
    TapTaken(String),
    #[error("--tap and --netns-guest exclude each other: an adopted tap's guest is the VMM's")]
    TapWithNetnsGuest,
    #[error("--vm excludes --tap and --netns-guest: the sandbox's one guest is its microVM, on a tap the daemon makes")]
    VmWithOtherGuest,
    #[error(transparent)]
    Vm(#[from] crate::sandbox::vm_process::VmProcessError),
    #[error(transparent)]
    BadTapName(sbx_vmm::tap::TapError),
    #[error("the address pools are full")]
    PoolFull,
    #[error("policy {policy:?} is used by sandbox {sandbox:?} and would no longer exist")]
    PolicyInUse { policy: String, sandbox: String },
    #[error("{0}")]
    BadDestination(String),
    #[error("inspect is a stream; the client's control-socket thread serves it")]
    StreamRequest,
    #[error("no policy text recorded for {0}")]
    NoPolicyText(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Pump(#[from] PumpError),
    #[error(transparent)]
    Netlink(#[from] sbx_vmm::netlink::NetlinkError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Dns(#[from] crate::dns::server::DnsError),
    #[error(transparent)]
    Host(#[from] crate::sandbox::host::HostError),
    #[error(transparent)]
    NetNs(#[from] sbx_vmm::netns::NetNsError),
    #[error(transparent)]
    Plane(#[from] crate::control::dataplane::PlaneError),
    /// The sandbox is deleted (no longer enforced, out of the state), but
    /// these pieces of it could not be removed.
    #[error("sandbox {name} deleted, but not everything went: {}", left.join("; "))]
    Left { name: String, left: Vec<String> },
    /// A reload or apply failed at one sandbox; the ones already switched
    /// were put back, so every sandbox stays on the generation it had.
    #[error("policy change not applied: switching sandbox {sandbox} failed: {source}; {rolled_back} sandbox(es) already switched were rolled back{}", rollback_failures(.failed_rollbacks))]
    RolledBack { sandbox: String, source: Box<DaemonError>, rolled_back: usize, failed_rollbacks: Vec<String> },
    #[error("cleanup left: {}", .0.join("; "))]
    CleanupLeft(Vec<String>),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error("this host takes its policies from {0}: change them there (`sbx-net policy push FILE --etcd …`)")]
    FleetManaged(String),
}

impl DaemonError {
    /// What kind of failure this is for the client (and the CLI's exit status).
    pub fn kind(&self) -> ErrorKind {
        match self {
            DaemonError::NoSuchSandbox(_) | DaemonError::NoSuchPolicy { .. } => ErrorKind::NotFound,
            DaemonError::SandboxExists(_) | DaemonError::Install(InstallError::InterfaceExists(_)) => ErrorKind::AlreadyExists,
            DaemonError::TapTaken(_)
            | DaemonError::PoolFull
            | DaemonError::PolicyInUse { .. }
            | DaemonError::FleetManaged(_)
            | DaemonError::Sandbox(SandboxError::PoolExhausted { .. }) => ErrorKind::Conflict,
            DaemonError::TapWithNetnsGuest
            | DaemonError::VmWithOtherGuest
            | DaemonError::BadTapName(_)
            | DaemonError::BadDestination(_)
            | DaemonError::StreamRequest
            | DaemonError::Sandbox(SandboxError::InvalidName(_)) => ErrorKind::Invalid,
            DaemonError::Policy(_) | DaemonError::Install(InstallError::Compile(_)) => ErrorKind::InvalidPolicy,
            DaemonError::RolledBack { source, .. } => source.kind(),
            _ => ErrorKind::Internal,
        }
    }
}

fn rollback_failures(failed: &[String]) -> String {
    if failed.is_empty() {
        String::new()
    } else {
        format!("; NOT rolled back (still on the new generation): {}", failed.join(", "))
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io { path: path.display().to_string(), source }
}

fn now_unix() -> u64 {
    crate::util::clock::unix_now_ns() / 1_000_000_000
}

/// The policies the daemon knows, their secrets, and how reloading went.
struct Policies {
    set: PolicySet,
    /// Credential secrets of the policies in `set` (re-read on every change).
    secrets: SecretStore,
    reload_failures: u64,
    last_reload_error: Option<String>,
}

impl Policies {
    /// The policy directory and the applied policies; when they do not
    /// load, the embedded default plus the policy texts the sandboxes
    /// enforce (fail closed: every sandbox keeps its policy).
    fn load(config: &DaemonConfig, state: &State, fleet: &[PolicyEntry]) -> Policies {
        let (set, last_reload_error) = match load_policies(config.policy_dir.as_deref(), &config.applied_policy_dir()) {
            Ok(set) => (fleet::overlay(set, fleet), None),
            Err(e) => {
                tracing::error!("policies not loaded, keeping the ones in force: {e}");
                let set = load_policies(None, Path::new("/nonexistent")).expect("embedded default loads");
                let mut set = fleet::overlay(set, fleet);
                for text in state.policy_texts.values() {
                    if let Ok(entry) = PolicyEntry::parse(&text.source, &text.text) {
                        set.insert(entry.policy.name.clone(), entry);
                    }
                }
                (set, Some(e.to_string()))
            }
        };
        Policies {
            secrets: SecretStore::load(set.values().map(|e| &e.policy)),
            set,
            reload_failures: u64::from(last_reload_error.is_some()),
            last_reload_error,
        }
    }

    /// Makes `set` the policies in force; secrets are re-read on every
    /// apply and reload.
    fn replace(&mut self, set: PolicySet) {
        self.secrets = SecretStore::load(set.values().map(|e| &e.policy));
        self.set = set;
    }
}

/// Per running sandbox, what the daemon keeps beyond the state.
#[derive(Default)]
struct InForce {
    /// The compiled policy in force (what the maps hold).
    policies: HashMap<String, Arc<CompiledPolicy>>,
    /// The sandbox's CA (its certificate goes into netns guests).
    cas: HashMap<String, Arc<Mutex<SandboxCa>>>,
}

/// Where the control thread publishes what it decides.
struct Shared {
    /// The daemon's copy of the route table (`/metrics` names sandboxes by it).
    routes: Routes,
    /// The data plane: the proxies, the learned addresses, the flow stream.
    link: DataplaneLink,
}

pub struct Daemon {
    config: DaemonConfig,
    /// The datapath, nftables and netlink every sandbox is installed through.
    host: SandboxHost,
    state: State,
    policies: Policies,
    in_force: InForce,
    shared: Shared,
    /// Sandbox ids and pre-warmed taps.
    pool: TapPool,
    /// Taps taken from the pool since the last reply: the workers are woken
    /// for them once it has gone (see [`Daemon::after_reply`]).
    taps_taken: usize,
    /// Unregisters deleted sandboxes' taps after the delete is answered.
    reaper: Reaper,
    started: Instant,
    /// What the daemon found and set on the host at start (`status`).
    host_checks: Vec<HostCheck>,
    /// The numbers `/metrics` shows of the daemon, published on change.
    metrics: crate::control::metrics::DaemonMetrics,
    /// A fleet host's policies from etcd (None: local policies only).
    fleet: Option<fleet::FleetRole>,
}

/// The sandbox installer's settings for this configuration.
fn host_settings(config: &DaemonConfig, exe: PathBuf) -> HostSettings {
    HostSettings {
        pools: config.pools(),
        nft: config.nft(),
        links_dir: config.bpf_dir.join("links"),
        pump_exe: exe,
        log_dir: config.state_dir.clone(),
    }
}

impl Daemon {
    /// Loads the datapath (re-using pinned maps), the state and the policies,
    /// re-adopts every recorded sandbox and installs the nftables table.
    pub fn start(config: DaemonConfig, routes: Routes) -> Result<Daemon, DaemonError> {
        std::fs::create_dir_all(&config.state_dir).map_err(io_err(&config.state_dir))?;
        let host_checks = adopt::prepare_host(&config)?;
        let datapath = Datapath::load(&DatapathOptions {
            pin_dir: Some(config.bpf_dir.clone()),
            events_ring_bytes: config.events_ring_bytes,
            flow_capacity: config.flow_table_size,
            policy_capacity: config.policy_map_entries,
            ..Default::default()
        })?;
        let state = State::load(&config.state_dir)?;
        let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
        let fleet = fleet::FleetRole::load(&config)?;
        let policies = Policies::load(&config, &state, fleet.as_ref().map_or(&[][..], |f| &f.entries));
        let pool = TapPool::new(state.sandboxes.values().map(|r| r.id), config.pools().capacity());
        let datapath_write_failures = datapath.map_write_failures();
        // After the maps are pinned (the data plane opens them by path),
        // before the sandboxes are re-adopted (their switches go through it).
        let link = DataplaneLink::open(&config, exe.clone())?;
        let reaper = Reaper::start(pool.clone(), config.bpf_dir.clone())?;
        let host = SandboxHost::new(datapath, host_settings(&config, exe))?;
        let mut daemon = Daemon {
            config,
            host,
            state,
            policies,
            in_force: InForce::default(),
            shared: Shared { routes, link },
            pool,
            taps_taken: 0,
            reaper,
            started: Instant::now(),
            host_checks,
            metrics: crate::control::metrics::DaemonMetrics::new(datapath_write_failures),
            fleet,
        };
        daemon.adopt_all()?;
        daemon.start_pool()?;
        // A data plane of another build (the daemon was upgraded) hands its
        // listeners to one of ours; failing that, it serves on (`status`
        // shows the mismatch).
        match daemon.shared.link.upgrade_if_other_build() {
            Ok(Some(report)) => tracing::info!(%report, "data plane upgraded to the daemon's build"),
            Ok(None) => {}
            Err(e) => tracing::error!("upgrading the data plane failed; the old build serves on: {e}"),
        }
        daemon.publish_metrics();
        Ok(daemon)
    }

    pub fn metrics(&self) -> &crate::control::metrics::DaemonMetrics {
        &self.metrics
    }

    fn publish_metrics(&self) {
        self.metrics.publish(&self.state, self.policies.reload_failures, self.policies.last_reload_error.is_some(), &self.policies.secrets);
    }

    /// The daemon's side of the data plane.
    pub fn link(&self) -> &DataplaneLink {
        &self.shared.link
    }

    /// A recorded sandbox's addressing.
    fn spec(&self, record: &SandboxRecord) -> Result<SandboxSpec, DaemonError> {
        let mut spec = SandboxSpec::new(record.id, &record.name, &self.config.pools())?;
        spec.tap = record.tap.clone();
        Ok(spec)
    }

    /// Work a request left for after its reply: the pool's refill. Making
    /// a tap takes rtnl and a TCX attach and, on a small host, the CPU the
    /// reply needs: woken before the reply, the workers would delay it.
    pub fn after_reply(&mut self) {
        for _ in 0..std::mem::take(&mut self.taps_taken) {
            self.pool.refill();
        }
    }

    /// One request, answered.
    pub fn handle(&mut self, request: Request) -> Response {
        let started = Instant::now();
        let op = serde_json::to_value(&request).ok().and_then(|v| v["op"].as_str().map(str::to_string)).unwrap_or_default();
        let response = match self.answer(request) {
            Ok(v) => Response::Ok(v),
            Err(e) => Response::error(e.kind(), e.to_string()),
        };
        // Only requests change what the daemon publishes.
        self.publish_metrics();
        tracing::debug!(%op, elapsed_us = started.elapsed().as_micros() as u64, "request handled");
        response
    }

    fn answer(&mut self, request: Request) -> Result<serde_json::Value, DaemonError> {
        match request {
            Request::SandboxCreate { name, policy, tap, netns_guest, vm } => self.create(&name, &policy, tap.as_deref(), netns_guest, vm).map(|info| json!(info)),
            Request::SandboxList => Ok(json!(self.state.sandboxes.values().filter_map(|r| self.info(r).ok()).collect::<Vec<_>>())),
            Request::SandboxShow { name } => match self.state.sandboxes.get(&name) {
                Some(r) => self.info(r).map(|i| json!(i)),
                None => Err(DaemonError::NoSuchSandbox(name)),
            },
            Request::SandboxDelete { name } => self.delete(&name).map(|()| json!({ "deleted": name })),
            Request::PolicyApply { .. } if self.fleet.is_some() => {
                Err(DaemonError::FleetManaged(self.config.fleet.as_ref().map(|f| f.source.clone()).unwrap_or_default()))
            }
            Request::PolicyApply { source, text } => self.apply(&source, &text),
            Request::PolicyList => Ok(self.policy_list()),
            Request::PolicyReload => self.reload(),
            Request::PolicyTest { sandbox, destination } => self.policy_test(&sandbox, &destination),
            Request::Status => self.status(),
            Request::Upgrade => Ok(self.shared.link.upgrade()?),
            // Streams are served by the client's control-socket thread, not here.
            Request::Inspect { .. } => Err(DaemonError::StreamRequest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_tell_their_kind() {
        let kind = |e: DaemonError| e.kind();
        assert_eq!(kind(DaemonError::NoSuchSandbox("a".into())), ErrorKind::NotFound);
        assert_eq!(kind(DaemonError::NoSuchPolicy { name: "p".into(), known: "default".into() }), ErrorKind::NotFound);
        assert_eq!(kind(DaemonError::SandboxExists("a".into())), ErrorKind::AlreadyExists);
        assert_eq!(kind(InstallError::InterfaceExists("sbx-1".into()).into()), ErrorKind::AlreadyExists);
        assert_eq!(kind(DaemonError::PoolFull), ErrorKind::Conflict);
        assert_eq!(kind(DaemonError::TapTaken("fc-tap0".into())), ErrorKind::Conflict);
        assert_eq!(kind(DaemonError::TapWithNetnsGuest), ErrorKind::Invalid);
        assert_eq!(kind(SandboxError::InvalidName("bad name".into()).into()), ErrorKind::Invalid);
        let bad_policy = PolicyError { file: "p.toml".into(), line: 3, reason: "bare *".into() };
        assert_eq!(kind(bad_policy.into()), ErrorKind::InvalidPolicy);
        let rolled_back = DaemonError::RolledBack { sandbox: "a".into(), source: Box::new(DaemonError::PoolFull), rolled_back: 0, failed_rollbacks: vec![] };
        assert_eq!(kind(rolled_back), ErrorKind::Conflict, "a rolled-back change is the kind of what stopped it");
        assert_eq!(kind(DaemonError::Left { name: "a".into(), left: vec!["tap sbx-1".into()] }), ErrorKind::Internal);
    }
}
