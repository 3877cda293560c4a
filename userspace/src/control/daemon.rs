//! The host service: owns the datapath (pinned maps and links), the nftables
//! table, the taps and the netns-guest pumps, and the persisted state that
//! lets a restarted daemon re-adopt all of them without a gap.
//!
//! All mutations run on one control thread ([`Daemon::handle`]), so requests
//! are serialised; the proxies read the routing table it publishes.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sbx_net_common::{sandbox_flags, Reason, EVENTS_LOST_SLOT};
use sbx_vmm::Netlink;
use serde_json::json;

use crate::control::api::{format_mac, Request, Response, SandboxInfo};
use crate::credentials::ca::SandboxCa;
use crate::credentials::secrets::SecretStore;
use crate::policy::compile::{CompileError, CompiledPolicy};
use crate::control::config::DaemonConfig;
use crate::datapath::{Datapath, DatapathError, DatapathOptions};
use crate::policy::explain::{parse_destination, test_destination, Redirects};
use crate::datapath::LearnedSwitch;
use crate::dns::decide::{carry_learned, LearnedAddr};
use crate::datapath::learned::LearnedMaps;
use crate::dns::learned::{Learned, LearnedStore};
use crate::sandbox::guest_pump::{pump_alive, spawn_pump, stop_pump, PumpError, PumpSpec};
use crate::datapath::nft::{NftError, Nftables};
use crate::policy::{Policy, PolicyError};
use crate::policy::store::{load_policies, PolicyEntry, PolicySet};
use crate::sandbox::route::{Route, Routes};
use crate::sandbox::{configure_host_side, open_host_tap, SandboxError, SandboxSpec};
use crate::control::state::{text_hash, PolicyText, SandboxRecord, State, StateError};
use crate::sandbox::tap_pool::{dismantle_pooled, pool_pin_name, reap_pin_name, PoolSettings, TapPool};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Compile(#[from] CompileError),
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
    #[error(transparent)]
    Tap(#[from] sbx_vmm::tap::TapError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Dns(#[from] crate::dns::server::DnsError),
    #[error(transparent)]
    Host(#[from] crate::sandbox::host::HostError),
    #[error(transparent)]
    NetNs(#[from] sbx_vmm::netns::NetNsError),
    #[error("{0}")]
    Invalid(String),
    /// The sandbox is deleted (no longer enforced, out of the state), but
    /// these pieces of it could not be removed.
    #[error("sandbox {name} deleted, but not everything went: {}", left.join("; "))]
    Left { name: String, left: Vec<String> },
    /// A reload or apply failed at one sandbox; the ones already switched
    /// were put back, so every sandbox stays on the generation it had.
    #[error("policy change not applied: switching sandbox {sandbox} failed: {source}; {rolled_back} sandbox(es) already switched were rolled back{}", rollback_failures(.failed_rollbacks))]
    RolledBack { sandbox: String, source: Box<DaemonError>, rolled_back: usize, failed_rollbacks: Vec<String> },
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

pub struct Daemon {
    config: DaemonConfig,
    datapath: Datapath,
    nft: Nftables,
    netlink: Netlink,
    state: State,
    policies: PolicySet,
    /// The compiled policy in force per sandbox (what the maps hold).
    in_force: HashMap<String, Arc<CompiledPolicy>>,
    routes: Routes,
    pool: TapPool,
    reaper: std::sync::mpsc::Sender<ReapJob>,
    dns_stats: Arc<crate::dns::stats::DnsStats>,
    /// Each sandbox's CA (credential proxy).
    cas: HashMap<String, Arc<std::sync::Mutex<SandboxCa>>>,
    /// Credential secrets of the policies in force.
    secrets: SecretStore,
    /// Addresses of the host's interfaces (outside the pools), at start.
    /// The DNS proxy's learned addresses and its handles on the tries.
    dns_state: Arc<LearnedStore>,
    /// Taps handed to the reaper and not yet gone.
    reaping: Arc<std::sync::atomic::AtomicUsize>,
    /// The flow stream (a deleted sandbox's metric series go with it).
    flows: Arc<crate::observe::hub::FlowHub>,
    exe: PathBuf,
    started: Instant,
    /// What the daemon found and set on the host at start (`status`).
    host_checks: Vec<crate::sandbox::host::HostCheck>,
    /// Deleted sandboxes' taps and pins the reaper could not remove.
    reap_failures: Arc<std::sync::Mutex<Vec<String>>>,
    reload_failures: u64,
    last_reload_error: Option<String>,
}

impl Daemon {
    /// Loads the datapath (re-using pinned maps), the state and the policies,
    /// re-adopts every recorded sandbox and installs the nftables table.
    pub fn start(config: DaemonConfig, routes: Routes, flows: Arc<crate::observe::hub::FlowHub>) -> Result<Daemon, DaemonError> {
        std::fs::create_dir_all(&config.state_dir).map_err(io_err(&config.state_dir))?;
        let host_checks = prepare_host(&config)?;
        let datapath = Datapath::load(&DatapathOptions {
            pin_dir: Some(config.bpf_dir.clone()),
            events_ring_bytes: config.events_ring_bytes,
            flow_capacity: config.flow_table_size,
            policy_capacity: config.policy_map_entries,
            ..Default::default()
        })?;
        let state = State::load(&config.state_dir)?;
        let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
        let (policies, last_reload_error) = match load_policies(config.policy_dir.as_deref(), &config.applied_policy_dir()) {
            Ok(set) => (set, None),
            Err(e) => {
                // Fail closed: sandboxes keep the policy text they enforce.
                tracing::error!("policies not loaded, keeping the ones in force: {e}");
                let mut set = load_policies(None, Path::new("/nonexistent")).expect("embedded default loads");
                for text in state.policy_texts.values() {
                    if let Ok(entry) = PolicyEntry::parse(&text.source, &text.text) {
                        set.insert(entry.policy.name.clone(), entry);
                    }
                }
                (set, Some(e.to_string()))
            }
        };
        let pool = TapPool::new(state.sandboxes.values().map(|r| r.id), config.pools().capacity());
        let reaping = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let maps = LearnedMaps::open(&config.bpf_dir).map_err(crate::dns::server::DnsError::from)?;
        let learned = Learned::restore(&config.learned_snapshot(), &maps);
        let dns_state = Arc::new(LearnedStore::new(maps, learned));
        let reap_failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let reaper = start_reaper(pool.clone(), reaping.clone(), config.bpf_dir.clone(), reap_failures.clone())?;
        let mut daemon = Daemon {
            config,
            datapath,
            nft: Nftables::new(),
            netlink: Netlink::new()?,
            state,
            policies,
            in_force: HashMap::new(),
            routes,
            reaper,
            reaping,
            flows,
            dns_state,
            dns_stats: Arc::default(),
            cas: HashMap::new(),
            secrets: SecretStore::default(),
            pool,
            exe,
            started: Instant::now(),
            host_checks,
            reap_failures,
            reload_failures: u64::from(last_reload_error.is_some()),
            last_reload_error,
        };
        daemon.secrets = SecretStore::load(daemon.policies.values().map(|e| &e.policy));
        daemon.adopt_all()?;
        daemon.start_pool()?;
        Ok(daemon)
    }

    /// Removes pre-warmed taps an earlier process left, then starts the
    /// workers that keep `tap_pool_size` taps ready.
    fn start_pool(&mut self) -> Result<(), DaemonError> {
        let owned: BTreeSet<String> = self.state.sandboxes.values().map(|r| r.tap.clone()).collect();
        let links_dir = self.config.bpf_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        let stale = dismantle_pooled(&self.netlink, &links_dir, &owned);
        if stale > 0 {
            tracing::info!(stale, "removed pre-warmed taps of an earlier run");
        }
        let settings = PoolSettings {
            size: self.config.tap_pool_size,
            workers: self.config.tap_pool_workers,
            pools: self.config.pools(),
            links_dir,
        };
        self.pool.start(settings, self.datapath.egress_program_fd()?);
        Ok(())
    }

    /// Switches a sandbox to a new policy generation, carrying its
    /// DNS-learned addresses (recomputed under the new policy) into it. The
    /// learned store's writer lock is held throughout, so no answer is
    /// learned into the generation being left.
    fn switch_generation(
        &mut self,
        sandbox: &str,
        ifindex: u32,
        config: &sbx_net_common::SandboxConfig,
        new: &CompiledPolicy,
        (old_policy_id, old): (u32, &CompiledPolicy),
        restore: Option<&HashMap<IpAddr, LearnedAddr>>,
    ) -> Result<(), DaemonError> {
        let dns_state = self.dns_state.clone();
        let mut change = dns_state.blocking_change();
        let table = change.sandbox(sandbox);
        let mut switch = LearnedSwitch::default();
        let mut carried = Vec::new();
        // A rollback also carries what the sandbox had learned before the
        // failed switch (the new policy may have dropped some of it); what
        // was learned since wins.
        let mut sources: HashMap<IpAddr, &LearnedAddr> = restore.map(|r| r.iter().map(|(ip, e)| (*ip, e)).collect()).unwrap_or_default();
        for (ip, entry) in table.iter() {
            switch.old.push(*ip);
            sources.insert(*ip, entry);
        }
        for (ip, entry) in sources {
            if let Some((value, names)) = carry_learned(new, ip, entry) {
                switch.carried.push((ip, value));
                carried.push((ip, LearnedAddr { policy_id: config.policy_id, value, names, answered_ns: entry.answered_ns }));
            }
        }
        // Old learned keys at an address the old policy also has an entry
        // for are removed with the old policy; the rest are removed here.
        self.datapath.switch_policy(ifindex, config, new, old_policy_id, old, &switch)?;
        change.replace_sandbox(sandbox, carried.into_iter().collect());
        Ok(())
    }

    /// Removes a sandbox's learned addresses from the tries and the table.
    fn forget_learned(&mut self, sandbox: &str, policy_id: u32) {
        let dns_state = self.dns_state.clone();
        let mut change = dns_state.blocking_change();
        if let Some(table) = change.remove_sandbox(sandbox) {
            self.datapath.remove_learned(policy_id, table.keys().copied());
        }
    }

    pub fn dns_stats(&self) -> Arc<crate::dns::stats::DnsStats> {
        self.dns_stats.clone()
    }

    /// The DNS proxy's shared state (learned addresses, trie handles).
    pub fn dns_state(&self) -> Arc<LearnedStore> {
        self.dns_state.clone()
    }

    /// The host's own addresses a sandbox must not reach, compiled in as
    /// built-in denies (so DNS answers pointing there are stripped too): its
    /// gateway addresses, and every address of the host's interfaces outside
    /// the sandbox pools (those are private ranges, denied anyway). Read at
    /// every compile: an address added since the daemon started is the
    /// host's too. (Between compiles the kernel still keeps guests off host
    /// addresses: local delivery meets the input chain's drop, and the
    /// proxies never connect to a local address.)
    fn denied_host_addresses(&self, spec: &SandboxSpec) -> Vec<IpAddr> {
        let mut out = spec.host_addresses();
        for ip in &host_interface_addresses(&self.config.ipv4_pool, &self.config.ipv6_pool) {
            if !out.contains(ip) {
                out.push(*ip);
            }
        }
        out
    }

    /// `policy` compiled for one sandbox: the built-in denies plus the
    /// host's addresses and the sandbox pools (another sandbox is never a
    /// destination: the forward chain drops tap to tap, and this keeps the
    /// proxies from connecting there when a wide CIDR like 10.0.0.0/8 is
    /// allowed).
    fn compile_for(&self, policy: &Policy, spec: &SandboxSpec) -> Result<CompiledPolicy, CompileError> {
        let mut denies: Vec<(ipnetwork::IpNetwork, &str)> = self.denied_host_addresses(spec).into_iter().map(|a| (a.into(), "host address")).collect();
        denies.push((self.config.ipv4_pool.into(), "sandbox pool"));
        denies.push((self.config.ipv6_pool.into(), "sandbox pool"));
        crate::policy::compile::compile_with_denies(policy, &denies)
    }

    fn flags(&self) -> u32 {
        sandbox_flags::REDIRECTS | sandbox_flags::FLOWS
    }

    fn spec(&self, record: &SandboxRecord) -> Result<SandboxSpec, DaemonError> {
        let mut spec = SandboxSpec::new(record.id, &record.name, &self.config.pools())?;
        spec.tap = record.tap.clone();
        Ok(spec)
    }

    /// Re-adopts every sandbox in the state: swaps the program behind its
    /// pinned link (atomically), brings its policy up to date with a
    /// generation switch, restarts a dead pump, then replaces the nftables
    /// table in one transaction.
    fn adopt_all(&mut self) -> Result<(), DaemonError> {
        let names: Vec<String> = self.state.sandboxes.keys().cloned().collect();
        for name in &names {
            let record = &self.state.sandboxes[name];
            if ifindex_of(&record.tap).is_none() {
                // Taps do not outlive the host (nor do pins and maps): after
                // a reboot, or when a VMM removed its adopted tap, there is
                // nothing left to enforce on.
                tracing::warn!(sandbox = %name, tap = %record.tap, "tap is gone; forgetting the sandbox");
                if let Some(pid) = record.pump_pid {
                    if let Ok(spec) = self.spec(record) {
                        if let Err(e) = stop_pump(pid, name, &spec.netns) {
                            tracing::warn!(sandbox = %name, "{e}");
                        }
                    }
                }
                let _ = Datapath::unpin_link(&self.config.link_pin(name));
                self.state.sandboxes.remove(name);
                continue;
            }
            if let Err(e) = self.adopt(name) {
                tracing::error!(sandbox = %name, "re-adopting: {e}");
            }
        }
        self.install_nft()?;
        self.state.prune_texts();
        self.state.save(&self.config.state_dir)?;
        self.publish_routes();
        Ok(())
    }

    fn adopt(&mut self, name: &str) -> Result<(), DaemonError> {
        let record = self.state.sandboxes[name].clone();
        let spec = self.spec(&record)?;
        let old_text = self
            .state
            .policy_texts
            .get(&record.policy_hash)
            .cloned()
            .ok_or_else(|| DaemonError::Invalid(format!("no policy text recorded for {name}")))?;
        let old = self.compile_for(&Policy::parse(&old_text.source, &old_text.text)?, &spec)?;
        let ifindex = self.netlink.link_index(&record.tap)?;
        let pin = self.config.link_pin(name);
        if pin.exists() {
            self.datapath.adopt_pinned(&pin)?;
        } else {
            self.datapath.attach_pinned(&record.tap, &pin)?;
        }
        let mut current = Arc::new(old);
        if let Some(entry) = self.policies.get(&record.policy).cloned() {
            let hash = text_hash(&entry.source, &entry.text);
            if hash != record.policy_hash {
                let new = self.compile_for(&entry.policy, &spec)?;
                let policy_id = self.state.take_policy_id();
                let cfg = spec.datapath_config(&new, policy_id, self.flags(), &self.config.proxied_ports);
                self.switch_generation(name, ifindex, &cfg, &new, (record.policy_id, &current), None)?;
                self.state.policy_generation += 1;
                let r = self.state.sandboxes.get_mut(name).expect("present");
                r.policy_id = policy_id;
                r.policy_hash = hash.clone();
                r.policy_generation = self.state.policy_generation;
                self.state.policy_texts.insert(hash, PolicyText { source: entry.source.clone(), text: entry.text.clone() });
                current = Arc::new(new);
                tracing::info!(sandbox = %name, policy = %record.policy, "policy changed while the daemon was down: switched");
            } else {
                // Same policy: refresh the config (flags, proxied ports) in place.
                let cfg = spec.datapath_config(&current, record.policy_id, self.flags(), &self.config.proxied_ports);
                self.datapath.write_config(ifindex, &cfg)?;
            }
        } else {
            tracing::warn!(sandbox = %name, policy = %record.policy, "policy no longer exists; keeping the one in force");
        }
        self.in_force.insert(name.to_string(), current);
        let ca_dir = self.config.sandbox_ca_dir(name);
        match SandboxCa::load(name, &ca_dir) {
            Ok(ca) => {
                self.cas.insert(name.to_string(), Arc::new(std::sync::Mutex::new(ca)));
            }
            Err(e) => tracing::warn!(sandbox = %name, "sandbox CA not loaded: {e}"),
        }
        if record.netns_guest {
            let alive = record.pump_pid.is_some_and(|pid| pump_alive(pid, name));
            if !alive {
                let pid = spawn_pump(&self.exe, &PumpSpec::new(&spec), &self.pump_log(name))?;
                self.state.sandboxes.get_mut(name).expect("present").pump_pid = Some(pid);
                // A new guest namespace: give it the CA again.
                if let Some(ca) = self.cas.get(name) {
                    let pem = ca.lock().unwrap_or_else(|p| p.into_inner()).cert_pem.clone();
                    if let Err(e) = trust_in_guest(&spec.netns, &pem) {
                        tracing::warn!(sandbox = %name, "guest trust store: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    fn install_nft(&self) -> Result<(), DaemonError> {
        let taps: Vec<String> = self.state.sandboxes.values().map(|s| s.tap.clone()).collect();
        self.nft.install(&self.config.nft(), &taps)?;
        Ok(())
    }

    fn pump_log(&self, name: &str) -> PathBuf {
        self.config.state_dir.join(format!("guest-{name}.log"))
    }

    fn publish_routes(&self) {
        let mut table = HashMap::new();
        for (name, record) in &self.state.sandboxes {
            let (Ok(spec), Some(route)) = (self.spec(record), self.route(name)) else { continue };
            table.insert(IpAddr::V4(spec.guest_ipv4), route.clone());
            table.insert(IpAddr::V6(spec.guest_ipv6), route);
        }
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// The credentials of `policy` whose secrets are loaded, ready to inject.
    fn bindings(&self, policy: &str) -> Vec<Arc<crate::credentials::CredentialBinding>> {
        let Some(entry) = self.policies.get(policy) else { return Vec::new() };
        entry
            .policy
            .credentials
            .iter()
            .filter_map(|c| {
                let secret = self.secrets.secrets.get(&(policy.to_string(), c.name.clone()))?.as_ref().ok()?.clone();
                match crate::credentials::CredentialBinding::new(&c.name, &c.hosts, &c.header, &c.format, secret, c.allow_plaintext) {
                    Ok(b) => Some(Arc::new(b)),
                    Err(e) => {
                        tracing::warn!(policy, "{e}");
                        None
                    }
                }
            })
            .collect()
    }

    /// What the proxies need to know about a sandbox's traffic.
    fn route(&self, name: &str) -> Option<Arc<Route>> {
        let record = self.state.sandboxes.get(name)?;
        Some(Arc::new(Route {
            sandbox: name.to_string(),
            id: record.id,
            policy: self.in_force.get(name)?.clone(),
            policy_id: record.policy_id,
            credentials: self.bindings(&record.policy),
            ca: self.cas.get(name).cloned(),
        }))
    }

    fn publish_route(&self, name: &str, spec: &SandboxSpec) {
        let Some(route) = self.route(name) else { return };
        let mut table = self.routes.write().unwrap_or_else(|p| p.into_inner());
        table.insert(IpAddr::V4(spec.guest_ipv4), route.clone());
        table.insert(IpAddr::V6(spec.guest_ipv6), route);
    }

    fn unpublish_routes(&self, spec: &SandboxSpec) {
        let mut table = self.routes.write().unwrap_or_else(|p| p.into_inner());
        table.remove(&IpAddr::V4(spec.guest_ipv4));
        table.remove(&IpAddr::V6(spec.guest_ipv6));
    }

    /// One request, answered.
    pub fn handle(&mut self, request: Request) -> Response {
        let started = Instant::now();
        let op = serde_json::to_value(&request).ok().and_then(|v| v["op"].as_str().map(str::to_string)).unwrap_or_default();
        let response = self.handle_inner(request);
        tracing::debug!(%op, elapsed_us = started.elapsed().as_micros() as u64, "request handled");
        response
    }

    fn handle_inner(&mut self, request: Request) -> Response {
        let result = match request {
            Request::SandboxCreate { name, policy, tap, netns_guest } => {
                self.create(&name, &policy, tap.as_deref(), netns_guest).map(|info| json!(info))
            }
            Request::SandboxList => Ok(json!(self
                .state
                .sandboxes
                .values()
                .filter_map(|r| self.info(r).ok())
                .collect::<Vec<_>>())),
            Request::SandboxShow { name } => match self.state.sandboxes.get(&name) {
                Some(r) => self.info(r).map(|i| json!(i)),
                None => Err(DaemonError::Invalid(format!("no sandbox named {name:?}"))),
            },
            Request::SandboxDelete { name } => self.delete(&name).map(|()| json!({ "deleted": name })),
            Request::PolicyApply { source, text } => self.apply(&source, &text),
            Request::PolicyList => Ok(self.policy_list()),
            Request::PolicyReload => self.reload(),
            Request::PolicyTest { sandbox, destination } => self.policy_test(&sandbox, &destination),
            Request::Status => self.status(),
            // Streams are served by the client's socket thread, not here.
            Request::Inspect { .. } => Err(DaemonError::Invalid("inspect is a stream; the socket thread serves it".into())),
        };
        match result {
            Ok(v) => Response::Ok(v),
            Err(e) => Response::Error(e.to_string()),
        }
    }

    fn info(&self, record: &SandboxRecord) -> Result<SandboxInfo, DaemonError> {
        let spec = self.spec(record)?;
        Ok(SandboxInfo {
            name: record.name.clone(),
            id: record.id,
            policy: record.policy.clone(),
            policy_generation: record.policy_generation,
            tap: record.tap.clone(),
            adopted_tap: record.adopted_tap,
            netns: record.netns_guest.then(|| spec.netns.clone()),
            guest_ipv4: spec.guest_ipv4.to_string(),
            guest_ipv6: spec.guest_ipv6.to_string(),
            guest_mac: format_mac(spec.guest_mac),
            gateway_ipv4: spec.gateway_ipv4.to_string(),
            gateway_ipv6: spec.gateway_ipv6.to_string(),
            gateway_mac: format_mac(spec.gateway_mac),
            ipv4_prefix_len: crate::sandbox::SANDBOX_IPV4_PREFIX_LEN,
            ipv6_prefix_len: crate::sandbox::SANDBOX_IPV6_PREFIX_LEN,
            dns: spec.gateway_ipv4.to_string(),
            ca_cert: {
                let path = self.config.sandbox_ca_dir(&record.name).join("ca.pem");
                if path.exists() {
                    path.display().to_string()
                } else {
                    String::new()
                }
            },
            created_unix: record.created_unix,
        })
    }

    fn create(&mut self, name: &str, policy_name: &str, tap: Option<&str>, netns_guest: bool) -> Result<SandboxInfo, DaemonError> {
        if self.state.sandboxes.contains_key(name) {
            return Err(DaemonError::Invalid(format!("sandbox {name:?} already exists")));
        }
        if tap.is_some() && netns_guest {
            return Err(DaemonError::Invalid("--tap and --netns-guest exclude each other: an adopted tap's guest is the VMM's".into()));
        }
        let entry = self.policies.get(policy_name).ok_or_else(|| {
            DaemonError::Invalid(format!(
                "no policy named {policy_name:?} (known: {})",
                self.policies.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let entry = entry.clone();
        if let Some(tap) = tap {
            sbx_vmm::tap::validate_ifname(tap)?;
            if self.state.sandboxes.values().any(|s| s.tap == tap) {
                return Err(DaemonError::Invalid(format!("tap {tap} already belongs to a sandbox")));
            }
        }
        // A pre-warmed tap (attached already) when there is one.
        let pooled = if tap.is_none() { self.pool.take() } else { None };
        let id = match pooled {
            Some((id, _)) => id,
            None => self.pool.allocate().ok_or_else(|| DaemonError::Invalid("the address pools are full".into()))?,
        };
        let result = self.create_with_id(id, pooled.map(|(_, ifindex)| ifindex), name, &entry, tap, netns_guest);
        if result.is_err() {
            self.pool.release(id);
        }
        let (spec, compiled, policy_id, pump_pid) = result?;
        // The sandbox's own CA for the credential proxy; the guest is told
        // where its certificate is (`ca_cert`), the key stays in the state dir.
        let ca_dir = self.config.sandbox_ca_dir(name);
        match SandboxCa::generate(name).and_then(|ca| ca.save(&ca_dir).map(|_| ca)) {
            Ok(ca) => {
                if netns_guest {
                    if let Err(e) = trust_in_guest(&spec.netns, &ca.cert_pem) {
                        tracing::warn!(sandbox = %name, "guest trust store: {e}");
                    }
                }
                self.cas.insert(name.to_string(), Arc::new(std::sync::Mutex::new(ca)));
            }
            Err(e) => tracing::warn!(sandbox = %name, "no CA for the credential proxy: {e}"),
        }
        let t1 = Instant::now();
        let hash = text_hash(&entry.source, &entry.text);
        self.state.policy_texts.insert(hash.clone(), PolicyText { source: entry.source.clone(), text: entry.text.clone() });
        let record = SandboxRecord {
            id,
            name: name.to_string(),
            policy: policy_name.to_string(),
            tap: spec.tap.clone(),
            adopted_tap: tap.is_some(),
            netns_guest,
            pump_pid,
            policy_id,
            policy_hash: hash,
            policy_generation: self.state.policy_generation,
            created_unix: now_unix(),
        };
        self.state.sandboxes.insert(name.to_string(), record.clone());
        self.in_force.insert(name.to_string(), Arc::new(compiled));
        self.state.save(&self.config.state_dir)?;
        tracing::debug!(elapsed_us = t1.elapsed().as_micros() as u64, "create: state saved after kernel work");
        self.publish_route(name, &spec);
        tracing::info!(sandbox = %name, tap = %spec.tap, policy = %policy_name, "sandbox created");
        self.info(&record)
    }

    /// The kernel side of `create`: tap (pooled, adopted or new), maps,
    /// pinned link, nftables element, pump. Undoes its own steps on error.
    #[allow(clippy::type_complexity)]
    fn create_with_id(
        &mut self,
        id: u32,
        pooled_ifindex: Option<u32>,
        name: &str,
        entry: &PolicyEntry,
        tap: Option<&str>,
        netns_guest: bool,
    ) -> Result<(SandboxSpec, CompiledPolicy, u32, Option<u32>), DaemonError> {
        let mut spec = SandboxSpec::new(id, name, &self.config.pools())?;
        if let Some(tap) = tap {
            spec.tap = tap.to_string();
        } else if pooled_ifindex.is_none() && self.netlink.link_exists(&spec.tap) {
            return Err(DaemonError::Invalid(format!("interface {} already exists (not ours)", spec.tap)));
        }
        let tc = Instant::now();
        let compiled = self.compile_for(&entry.policy, &spec)?;
        tracing::debug!(elapsed_us = tc.elapsed().as_micros() as u64, "create: compiled");
        let policy_id = self.state.take_policy_id();
        let pin = self.config.link_pin(name);
        std::fs::create_dir_all(pin.parent().expect("pin has a parent")).map_err(io_err(&pin))?;

        let t0 = Instant::now();
        // Each step registers its undo; on an error they run in reverse.
        let mut undo: Vec<Box<dyn FnOnce(&mut Daemon)>> = Vec::new();
        let result = (|| -> Result<Option<u32>, DaemonError> {
            let ifindex = match (tap, pooled_ifindex) {
                (Some(tap), _) => {
                    let ifindex = self.netlink.link_index(tap)?;
                    configure_host_side(&self.netlink, &spec, ifindex)?;
                    ifindex
                }
                (None, Some(ifindex)) => {
                    let pool_pin = self.config.link_pin(&pool_pin_name(id));
                    undo.push(Box::new(move |d: &mut Daemon| {
                        let _ = Datapath::unpin_link(&pool_pin);
                        let _ = d.netlink.delete_link(ifindex);
                    }));
                    if ifindex_of(&spec.tap) != Some(ifindex) {
                        return Err(DaemonError::Invalid(format!("pre-warmed tap {} changed under us", spec.tap)));
                    }
                    ifindex
                }
                (None, None) => {
                    let (tap, ifindex) = open_host_tap(&self.netlink, &spec)?;
                    // Persistent: the tap outlives this fd (the pump or VMM
                    // opens it) and the daemon process.
                    tap.set_persist(true)?;
                    drop(tap);
                    undo.push(Box::new(move |d: &mut Daemon| {
                        let _ = d.netlink.delete_link(ifindex);
                    }));
                    ifindex
                }
            };
            tracing::debug!(elapsed_us = t0.elapsed().as_micros() as u64, "create: tap ready");
            let cfg = spec.datapath_config(&compiled, policy_id, self.flags(), &self.config.proxied_ports);
            // The id may have served an earlier sandbox: its traffic is not ours.
            self.datapath.reset_sandbox_counters(id)?;
            self.datapath.install_sandbox(ifindex, &cfg, &compiled)?;
            tracing::debug!(elapsed_us = t0.elapsed().as_micros() as u64, "create: maps written");
            let c = compiled.clone();
            undo.push(Box::new(move |d: &mut Daemon| {
                let _ = d.datapath.remove_sandbox(ifindex, policy_id, &c);
            }));
            if pooled_ifindex.is_some() && tap.is_none() {
                let pool_pin = self.config.link_pin(&pool_pin_name(id));
                std::fs::rename(&pool_pin, &pin).map_err(io_err(&pin))?;
            } else {
                self.datapath.attach_pinned(&spec.tap, &pin)?;
            }
            let p = pin.clone();
            undo.push(Box::new(move |_| {
                let _ = Datapath::unpin_link(&p);
            }));
            tracing::debug!(elapsed_us = t0.elapsed().as_micros() as u64, "create: link pinned");
            self.nft.add_tap(&spec.tap)?;
            tracing::debug!(elapsed_us = t0.elapsed().as_micros() as u64, "create: nft element added");
            let t = spec.tap.clone();
            undo.push(Box::new(move |d: &mut Daemon| {
                let _ = d.nft.remove_tap(&t);
            }));
            if netns_guest {
                return Ok(Some(spawn_pump(&self.exe, &PumpSpec::new(&spec), &self.pump_log(name))?));
            }
            Ok(None)
        })();
        match result {
            Ok(pump_pid) => Ok((spec, compiled, policy_id, pump_pid)),
            Err(e) => {
                for step in undo.into_iter().rev() {
                    step(self);
                }
                Err(e)
            }
        }
    }

    fn delete(&mut self, name: &str) -> Result<(), DaemonError> {
        let record = self
            .state
            .sandboxes
            .get(name)
            .cloned()
            .ok_or_else(|| DaemonError::Invalid(format!("no sandbox named {name:?}")))?;
        let spec = self.spec(&record)?;
        // Clear the tap's datapath slot while its ifindex still names it:
        // from here on the classifier drops the tap's frames.
        let ifindex = ifindex_of(&record.tap);
        if let Some(policy) = self.in_force.remove(name) {
            match ifindex {
                Some(i) => self.datapath.remove_sandbox(i, record.policy_id, &policy)?,
                None => self.datapath.remove_policy(record.policy_id, &policy),
            }
        }
        self.forget_learned(name, record.policy_id);
        let mut left = Vec::new();
        match (record.adopted_tap, ifindex) {
            (false, Some(ifindex)) => {
                // Unregistering a netdev waits for RCU several times (~35 ms
                // here); the reaper does it after we answer. Until then the
                // tap stays fail-closed: classifier attached (its pin is
                // renamed, not removed), slot empty, out of the nftables set.
                if let Some(pid) = record.pump_pid {
                    if let Err(e) = stop_pump(pid, &record.name, &spec.netns) {
                        left.push(e.to_string());
                    }
                }
                if let Err(e) = self.nft.remove_tap(&record.tap) {
                    left.push(format!("nftables element {} ({e})", record.tap));
                }
                let reap_pin = self.config.link_pin(&reap_pin_name(record.id));
                std::fs::rename(self.config.link_pin(name), &reap_pin).map_err(io_err(&reap_pin))?;
                let job = ReapJob { id: record.id, tap: record.tap.clone(), ifindex, pin: reap_pin };
                self.reaping.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if let Err(e) = self.reaper.send(job) {
                    let id = e.0.id;
                    left.extend(unregister(&self.netlink, e.0));
                    purge_flows(&self.config.bpf_dir, &BTreeSet::from([id]));
                    self.pool.release(id);
                    self.reaping.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            _ => {
                left.extend(teardown(&self.netlink, &self.nft, &self.config, &record, &spec));
                purge_flows(&self.config.bpf_dir, &BTreeSet::from([record.id]));
                self.pool.release(record.id);
            }
        }
        self.unpublish_routes(&spec);
        self.flows.forget_sandbox(name);
        self.cas.remove(name);
        let _ = std::fs::remove_dir_all(self.config.sandbox_ca_dir(name));
        self.state.sandboxes.remove(name);
        self.state.prune_texts();
        self.state.save(&self.config.state_dir)?;
        if !left.is_empty() {
            tracing::error!(sandbox = %name, "deleted, but left: {}", left.join("; "));
            return Err(DaemonError::Left { name: name.to_string(), left });
        }
        tracing::info!(sandbox = %name, "sandbox deleted");
        Ok(())
    }

    /// Switches every sandbox to `new` (already validated as a whole):
    /// compile all first, then one generation switch per changed sandbox.
    fn switch_to(&mut self, new: PolicySet) -> Result<serde_json::Value, DaemonError> {
        let mut plans = Vec::new();
        for (name, record) in &self.state.sandboxes {
            let entry = new.get(&record.policy).ok_or_else(|| {
                DaemonError::Invalid(format!("policy {:?} is used by sandbox {name:?} and would no longer exist", record.policy))
            })?;
            let hash = text_hash(&entry.source, &entry.text);
            if hash == record.policy_hash {
                continue;
            }
            let spec = self.spec(record)?;
            let compiled = self.compile_for(&entry.policy, &spec)?;
            plans.push((name.clone(), spec, compiled, hash, entry.clone()));
        }
        let generation = self.state.policy_generation + 1;
        // Each switched sandbox with what it had, to put back if a later
        // one fails: a policy set is in force everywhere or nowhere.
        let mut switched: Vec<Switched> = Vec::new();
        for (name, spec, compiled, hash, entry) in plans {
            let before = Switched {
                record: self.state.sandboxes[&name].clone(),
                policy: self.in_force[&name].clone(),
                learned: self.dns_state.sandbox_table(&name),
            };
            if let Err(e) = self.switch_sandbox(&name, &spec, Arc::new(compiled), generation, None) {
                let rolled_back = switched.len();
                let failed_rollbacks = self.roll_back(switched);
                self.state.prune_texts();
                // The records carry the policy ids now in the maps, and the
                // DNS proxy must learn under those.
                self.publish_routes();
                self.state.save(&self.config.state_dir)?;
                return Err(DaemonError::RolledBack { sandbox: name, source: Box::new(e), rolled_back, failed_rollbacks });
            }
            let r = self.state.sandboxes.get_mut(&name).expect("present");
            r.policy_hash = hash.clone();
            self.state.policy_texts.insert(hash, PolicyText { source: entry.source.clone(), text: entry.text.clone() });
            switched.push(before);
        }
        let switched: Vec<String> = switched.into_iter().map(|s| s.record.name).collect();
        self.state.policy_generation = generation;
        self.policies = new;
        // Secrets are re-read on every apply and reload.
        self.secrets = SecretStore::load(self.policies.values().map(|e| &e.policy));
        self.state.prune_texts();
        self.state.save(&self.config.state_dir)?;
        self.publish_routes();
        Ok(json!({ "policy_generation": generation, "sandboxes_switched": switched, "policies": self.policies.keys().collect::<Vec<_>>() }))
    }

    /// One sandbox to `compiled` under a fresh policy id (map writes first,
    /// then the record and the in-force policy).
    fn switch_sandbox(
        &mut self,
        name: &str,
        spec: &SandboxSpec,
        compiled: Arc<CompiledPolicy>,
        generation: u64,
        restore: Option<&HashMap<IpAddr, LearnedAddr>>,
    ) -> Result<(), DaemonError> {
        let record = self.state.sandboxes[name].clone();
        let ifindex = self.netlink.link_index(&record.tap)?;
        let policy_id = self.state.take_policy_id();
        let cfg = spec.datapath_config(&compiled, policy_id, self.flags(), &self.config.proxied_ports);
        let old = self.in_force[name].clone();
        self.switch_generation(name, ifindex, &cfg, &compiled, (record.policy_id, &old), restore)?;
        let r = self.state.sandboxes.get_mut(name).expect("present");
        r.policy_id = policy_id;
        r.policy_generation = generation;
        self.in_force.insert(name.to_string(), compiled);
        Ok(())
    }

    /// Puts sandboxes back on the policy they had (newest first), each under
    /// a fresh id as any switch is; returns the ones that could not be.
    fn roll_back(&mut self, switched: Vec<Switched>) -> Vec<String> {
        let mut failed = Vec::new();
        for Switched { record: before, policy: old, learned } in switched.into_iter().rev() {
            let name = before.name.clone();
            let result = self.spec(&before).and_then(|spec| self.switch_sandbox(&name, &spec, old, before.policy_generation, Some(&learned)));
            match result {
                Ok(()) => {
                    let r = self.state.sandboxes.get_mut(&name).expect("present");
                    r.policy_hash = before.policy_hash;
                    tracing::warn!(sandbox = %name, "rolled back to its policy generation {}", before.policy_generation);
                }
                Err(e) => {
                    tracing::error!(sandbox = %name, "rolling back failed, it stays on the new generation: {e}");
                    failed.push(name);
                }
            }
        }
        failed
    }

    fn apply(&mut self, source: &str, text: &str) -> Result<serde_json::Value, DaemonError> {
        let entry = PolicyEntry::parse(source, text)?;
        let applied_dir = self.config.applied_policy_dir();
        let stored = applied_dir.join(format!("{}.toml", entry.policy.name));
        // Kept under its stored path, so a restart reads the same text.
        let entry = PolicyEntry { source: stored.display().to_string(), ..entry };
        let mut new = self.policies.clone();
        new.insert(entry.policy.name.clone(), entry.clone());
        // Validate everything before anything changes.
        for record in self.state.sandboxes.values().filter(|r| r.policy == entry.policy.name) {
            self.compile_for(&entry.policy, &self.spec(record)?)?;
        }
        let previous = std::fs::read(&stored).ok();
        crate::util::fs::write_atomic(&stored, text.as_bytes()).map_err(io_err(&stored))?;
        let result = self.switch_to(new);
        if result.is_err() {
            // Not in force, so not kept: a restart must not pick it up.
            let restored = match previous {
                Some(bytes) => crate::util::fs::write_atomic(&stored, &bytes),
                None => std::fs::remove_file(&stored),
            };
            if let Err(e) = restored {
                tracing::error!(path = %stored.display(), "restoring the applied policy file: {e}");
            }
        }
        result
    }

    fn reload(&mut self) -> Result<serde_json::Value, DaemonError> {
        let loaded = load_policies(self.config.policy_dir.as_deref(), &self.config.applied_policy_dir()).map_err(|e| {
            self.reload_failures += 1;
            self.last_reload_error = Some(e.to_string());
            DaemonError::from(e)
        });
        let result = loaded.and_then(|set| self.switch_to(set));
        match &result {
            Ok(_) => self.last_reload_error = None,
            Err(e) => {
                self.last_reload_error = Some(e.to_string());
                tracing::error!("policy reload rejected, the policies in force stay: {e}");
            }
        }
        result
    }

    fn policy_list(&self) -> serde_json::Value {
        let list: Vec<_> = self
            .policies
            .values()
            .map(|e| {
                let users: Vec<&String> = self.state.sandboxes.values().filter(|r| r.policy == e.policy.name).map(|r| &r.name).collect();
                json!({
                    "name": e.policy.name,
                    "source": e.source,
                    "default": e.policy.default.as_str(),
                    "rules": e.policy.rules.len(),
                    "credentials": e.policy.credentials.len(),
                    "sandboxes": users,
                })
            })
            .collect();
        json!(list)
    }

    fn policy_test(&self, sandbox: &str, destination: &str) -> Result<serde_json::Value, DaemonError> {
        let policy = self.in_force.get(sandbox).ok_or_else(|| DaemonError::Invalid(format!("no sandbox named {sandbox:?}")))?;
        let (dest, port) = parse_destination(destination).map_err(DaemonError::Invalid)?;
        let outcome = test_destination(policy, &dest, port, &Redirects { proxied_ports: &self.config.proxied_ports });
        Ok(json!({
            "sandbox": sandbox,
            "destination": destination,
            "policy": policy.policy_name,
            "verdict": outcome.verdict,
            "rule": outcome.rule,
            "path": outcome.path,
        }))
    }

    fn status(&self) -> Result<serde_json::Value, DaemonError> {
        let (v4, v6) = self.datapath.policy_entry_counts()?;
        let counters = self.datapath.counters()?;
        let mut traffic = serde_json::Map::new();
        for record in self.state.sandboxes.values() {
            let c = self.datapath.sandbox_counters(record.id)?;
            let class = |c: sbx_net_common::Counter| json!({ "packets": c.packets, "bytes": c.bytes });
            traffic.insert(record.name.clone(), json!({ "allowed": class(c[0]), "denied": class(c[1]), "redirected": class(c[2]) }));
        }
        let mut by_reason = serde_json::Map::new();
        for reason in Reason::ALL {
            let c = counters[reason as usize];
            by_reason.insert(reason.name().to_string(), json!({ "packets": c.packets, "bytes": c.bytes }));
        }
        Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "sandboxes": self.state.sandboxes.len(),
            "sandbox_names": self.state.sandboxes.keys().collect::<Vec<_>>(),
            "policy_generation": self.state.policy_generation,
            "policies": self.policies.iter().map(|(name, e)| json!({
                "name": name,
                "source": e.source,
                "sandboxes": self.state.sandboxes.values().filter(|r| &r.policy == name).count(),
            })).collect::<Vec<_>>(),
            "reload_failures": self.reload_failures,
            "prewarmed_taps": self.pool.ready_count(),
            "credentials": self.secrets.report(),
            "taps_being_removed": self.reaping.load(std::sync::atomic::Ordering::SeqCst),
            "dns": self.dns_stats.to_json(),
            "learned_addresses": self.dns_state.count(),
            "last_reload_error": self.last_reload_error,
            "maps": {
                "policy_v4_entries": v4,
                "policy_v6_entries": v6,
                "policy_capacity_per_family": self.config.policy_map_entries,
                "sandbox_slots_used": self.state.sandboxes.len(),
                "sandbox_slots": sbx_net_common::SANDBOX_SLOTS,
                "flows": self.datapath.flow_count()?,
                "flow_capacity": self.config.flow_table_size,
            },
            "sandbox_traffic": traffic,
            "datapath": by_reason,
            "events_lost": counters[EVENTS_LOST_SLOT as usize].packets,
            "bpf_dir": self.config.bpf_dir,
            "state_dir": self.config.state_dir,
            "host": self.host_checks,
            "reap_failures": *self.reap_failures.lock().unwrap_or_else(|p| p.into_inner()),
        }))
    }
}

/// Prepares what the data path needs on a host with kernel defaults (see
/// [`crate::sandbox::host`]) and records the host's original values for `--cleanup`.
fn prepare_host(config: &DaemonConfig) -> Result<Vec<crate::sandbox::host::HostCheck>, DaemonError> {
    use crate::sandbox::host::{self, HostCheck, HostError, HostOriginals};
    let uplinks = match &config.uplink {
        Some(uplink) if ifindex_of(uplink).is_none() => return Err(HostError::NoUplink(uplink.clone()).into()),
        Some(uplink) => vec![uplink.clone()],
        None => host::default_route_interfaces(),
    };
    let mut checks = Vec::new();
    if uplinks.is_empty() {
        tracing::warn!("no --uplink and no default route: sandbox traffic has no way out until one exists (then restart)");
        checks.push(HostCheck {
            name: "uplink".into(),
            found: None,
            value: "none (no --uplink, no default route)".into(),
            changed: false,
            why: "the interface sandbox traffic leaves by".into(),
        });
    }
    let settings = host::uplink_settings(&uplinks, &host::read_sysctl);
    // Recorded before anything changes: a start that fails half way still
    // lets `--cleanup` put back what it did change.
    let mut originals = HostOriginals::load(&config.state_dir);
    if originals.record(&settings, &host::read_sysctl) {
        originals.save(&config.state_dir)?;
    }
    checks.extend(host::apply(&settings, true)?);
    checks.push(host::raise_nofile_limit()?);
    let made = sbx_vmm::netns::prepare_run_dir()?;
    if made {
        tracing::info!("host prepared: /run/netns made a shared mount point, as `ip netns` does");
    }
    checks.push(HostCheck {
        name: sbx_vmm::netns::NETNS_RUN_DIR.into(),
        found: Some(if made { "plain directory" } else { "shared mount point" }.into()),
        value: "shared mount point".into(),
        changed: made,
        why: "guest namespaces stay deletable when other tools use `ip netns`".into(),
    });
    Ok(checks)
}

/// Unicast addresses of this namespace's interfaces, except loopback,
/// link-local and the sandbox pools.
fn host_interface_addresses(pool_v4: &ipnetwork::Ipv4Network, pool_v6: &ipnetwork::Ipv6Network) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return out;
    }
    let mut p = list;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned; ifa_addr, when set,
        // points at a sockaddr of the family it names.
        unsafe {
            let addr = (*p).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
    }
    // SAFETY: list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    out.retain(|ip| match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !pool_v4.contains(*a),
        IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80 && !pool_v6.contains(*a),
    });
    out.sort();
    out.dedup();
    out
}

/// Makes a netns guest trust its sandbox's CA: `ip netns exec` shows
/// /etc/netns/NETNS/ssl as the guest's /etc/ssl, so that becomes a copy of
/// the host's with the CA appended to the bundle (curl, openssl, Python's
/// ssl read it). Removed with the guest's namespace.
fn trust_in_guest(netns: &str, ca_pem: &str) -> std::io::Result<()> {
    let target = Path::new("/etc/netns").join(netns).join("ssl");
    copy_tree(Path::new("/etc/ssl"), &target)?;
    let bundle = target.join("certs/ca-certificates.crt");
    let mut text = std::fs::read_to_string(&bundle).unwrap_or_default();
    if !text.ends_with('\n') && !text.is_empty() {
        text.push('\n');
    }
    text.push_str(ca_pem);
    // Replace (not append through) a symlink into the host's store.
    let _ = std::fs::remove_file(&bundle);
    std::fs::write(&bundle, text)
}

/// Copies a directory tree, keeping symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            let _ = std::fs::remove_file(&dst);
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            // Unreadable directories (private keys) are left out.
            if std::fs::read_dir(&src).is_ok() {
                copy_tree(&src, &dst)?;
            }
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// The interface index of `name` in our namespace (no rtnl lock, unlike a
/// netlink request, so it never waits behind a TCX attach).
fn ifindex_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// A sandbox a policy change switched, with what it had before (to roll back to).
struct Switched {
    record: SandboxRecord,
    policy: Arc<CompiledPolicy>,
    learned: HashMap<IpAddr, LearnedAddr>,
}

/// A deleted sandbox's tap, to unregister after the delete is answered.
pub struct ReapJob {
    id: u32,
    tap: String,
    ifindex: u32,
    pin: PathBuf,
}

/// Deletes the tap (which detaches its classifier), then drops the link's
/// pin; returns what is left.
fn unregister(netlink: &Netlink, job: ReapJob) -> Vec<String> {
    let mut left = Vec::new();
    if ifindex_of(&job.tap) == Some(job.ifindex) {
        if let Err(e) = netlink.delete_link(job.ifindex) {
            left.push(format!("tap {} ({e})", job.tap));
        }
    }
    if let Err(e) = Datapath::unpin_link(&job.pin) {
        left.push(e.to_string());
    }
    if ifindex_of(&job.tap) == Some(job.ifindex) && left.is_empty() {
        left.push(format!("tap {}", job.tap));
    }
    for l in &left {
        tracing::error!(tap = %job.tap, "deleted sandbox's {l} is left");
    }
    left
}

/// Forgets the flows of sandbox ids about to be reused.
fn purge_flows(bpf_dir: &Path, ids: &BTreeSet<u32>) {
    match crate::datapath::PinnedFlows::open(bpf_dir) {
        Ok(mut flows) => {
            let removed = flows.purge(ids);
            tracing::debug!(?ids, removed, "flows of deleted sandboxes purged");
        }
        Err(e) => tracing::warn!("purging flows: {e}"),
    }
}

/// Unregisters deleted sandboxes' taps after the delete was answered, then
/// purges their flows (one walk of the flow tables per batch of deletes) and
/// frees their ids.
/// What it could not remove is kept for `status` (`reap_failures`).
fn start_reaper(
    pool: TapPool,
    reaping: Arc<std::sync::atomic::AtomicUsize>,
    bpf_dir: PathBuf,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
) -> Result<std::sync::mpsc::Sender<ReapJob>, DaemonError> {
    let (tx, rx) = std::sync::mpsc::channel::<ReapJob>();
    let netlink = Netlink::new()?;
    std::thread::Builder::new()
        .name("tap-reaper".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                jobs.extend(rx.try_iter());
                let ids: BTreeSet<u32> = jobs.iter().map(|j| j.id).collect();
                let count = jobs.len();
                for job in jobs {
                    let left = unregister(&netlink, job);
                    if !left.is_empty() {
                        failures.lock().unwrap_or_else(|p| p.into_inner()).extend(left);
                    }
                }
                purge_flows(&bpf_dir, &ids);
                for id in ids {
                    pool.release(id);
                }
                reaping.fetch_sub(count, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .map_err(|e| DaemonError::Io { path: "tap reaper thread".into(), source: e })?;
    Ok(tx)
}

/// Removes a sandbox's kernel pieces except its map entries: the pump and
/// guest namespace, the nftables element, the pinned link, and the tap when
/// it is ours. Every piece is attempted; returns what is left.
fn teardown(netlink: &Netlink, nft: &Nftables, config: &DaemonConfig, record: &SandboxRecord, spec: &SandboxSpec) -> Vec<String> {
    let mut left = Vec::new();
    if let Some(pid) = record.pump_pid {
        if let Err(e) = stop_pump(pid, &record.name, &spec.netns) {
            left.push(e.to_string());
        }
    }
    if let Err(e) = nft.remove_tap(&record.tap) {
        left.push(format!("nftables element {} ({e})", record.tap));
    }
    let pin = config.link_pin(&record.name);
    if let Err(e) = Datapath::unpin_link(&pin) {
        left.push(format!("pinned link {} ({e})", pin.display()));
    }
    if record.adopted_tap {
        // The VMM's tap stays, but down: without its classifier and its
        // nftables membership it must not carry traffic (fail closed).
        if let Ok(ifindex) = netlink.link_index(&record.tap) {
            if let Err(e) = netlink.set_down(ifindex) {
                left.push(format!("adopted tap {} still up ({e})", record.tap));
            }
        }
    } else if let Ok(ifindex) = netlink.link_index(&record.tap) {
        // A persistent tap must be un-persisted or deleted by netlink.
        if let Err(e) = netlink.delete_link(ifindex) {
            left.push(format!("tap {} ({e})", record.tap));
        }
    }
    // Verified, unless an error above already named it.
    if !record.adopted_tap && ifindex_of(&record.tap).is_some() && !left.iter().any(|l| l.starts_with(&format!("tap {}", record.tap))) {
        left.push(format!("tap {}", record.tap));
    }
    if pin.exists() && !left.iter().any(|l| l.starts_with("pinned link")) {
        left.push(format!("pinned link {}", pin.display()));
    }
    left
}

/// `sbx-net daemon --cleanup`: removes everything the daemon made (taps,
/// pumps and guest namespaces, links, nftables table, pinned maps, state),
/// without a running daemon.
pub fn cleanup(config: &DaemonConfig) -> Result<Vec<String>, DaemonError> {
    let mut done = Vec::new();
    let state = State::load(&config.state_dir)?;
    let netlink = Netlink::new()?;
    let nft = Nftables::new();
    let mut left = Vec::new();
    for record in state.sandboxes.values() {
        let spec = SandboxSpec::new(record.id, &record.name, &config.pools()).map(|mut s| {
            s.tap = record.tap.clone();
            s
        })?;
        let sandbox_left = teardown(&netlink, &nft, config, record, &spec);
        if sandbox_left.is_empty() {
            done.push(format!("sandbox {} (tap {})", record.name, record.tap));
        }
        left.extend(sandbox_left.into_iter().map(|l| format!("sandbox {}: {l}", record.name)));
    }
    let owned: BTreeSet<String> = state.sandboxes.values().filter(|r| r.adopted_tap).map(|r| r.tap.clone()).collect();
    let pooled = dismantle_pooled(&netlink, &config.bpf_dir.join("links"), &owned);
    done.push(format!("{pooled} pre-warmed taps"));
    nft.remove()?;
    done.push("nftables table inet sbx_net".into());
    // Pinned maps: unpinning drops them once no program uses them.
    if config.bpf_dir.exists() {
        let _ = std::fs::remove_dir_all(config.bpf_dir.join("links"));
        match std::fs::remove_dir_all(&config.bpf_dir) {
            Ok(()) => done.push(format!("pins under {}", config.bpf_dir.display())),
            Err(e) => left.push(format!("pins under {} ({e})", config.bpf_dir.display())),
        }
    }
    let host = crate::sandbox::host::HostOriginals::load(&config.state_dir);
    for restored in host.restore() {
        done.push(format!("host setting restored: {restored}"));
    }
    let _ = std::fs::remove_file(crate::sandbox::host::HostOriginals::path(&config.state_dir));
    State::remove_files(&config.state_dir)?;
    let _ = std::fs::remove_dir_all(config.state_dir.join("ca"));
    let _ = std::fs::remove_file(config.learned_snapshot());
    for path in [config.applied_policy_dir()] {
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else if path.exists() {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(&config.state_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("guest-") && name.ends_with(".log") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(&config.state_dir);
    done.push(format!("state in {}", config.state_dir.display()));
    if !left.is_empty() {
        return Err(DaemonError::Invalid(format!("cleanup left: {}", left.join("; "))));
    }
    Ok(done)
}
