//! `sbx-net dataplane`: the process that serves the guests' DNS and HTTP(S)
//! on the listening sockets it was given, with the routing state the daemon
//! pushes. Without that state it refuses everything (no route, no answer).
//!
//! Life: started (listeners inherited, config on stdin) → given the state
//! (`apply`) → `start` (learned addresses restored, listeners read) → on
//! `drain`, stops reading them, saves the learned addresses for its
//! successor, finishes its connections and exits.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinHandle;

use super::{build_id, Listeners, PlaneError, PlaneRequest, SandboxEntry, SwitchRequest};

/// Lock order, everywhere: the learned store's writer lock before the
/// table's (a switch holds the first while it publishes the route), never
/// the other way (forgetting happens after the table is released).
use crate::control::config::DaemonConfig;
use crate::credentials::ca::SandboxCa;
use crate::credentials::secrets::Secret;
use crate::credentials::CredentialBinding;
use crate::datapath::learned::LearnedMaps;
use crate::datapath::write_failures::MapWriteFailures;
use crate::datapath::PinnedConfigs;
use crate::dns::decide::{carry_learned, LearnedAddr};
use crate::dns::learned::{Learned, LearnedStore};
use crate::dns::server::{self as dns_proxy, DnsContext};
use crate::observe::hub::FlowHub;
use crate::proxy::ProxyContext;
use crate::sandbox::route::{Route, Routes};

/// How long a draining data plane waits for the DNS queries it took to be
/// answered before it saves the learned addresses (an upstream timeout
/// bounds each query).
const DNS_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// One sandbox as the data plane knows it.
struct Known {
    policy_id: u32,
    addresses: [IpAddr; 2],
}

/// The routing state and what it is built from.
#[derive(Default)]
struct Table {
    version: u64,
    known: BTreeMap<String, Known>,
    /// CAs by sandbox, loaded once (their leaf caches are kept).
    cas: HashMap<String, (PathBuf, Arc<Mutex<SandboxCa>>)>,
    /// Secrets by (credential, value hash): one per value, so a policy's
    /// sandboxes share its scrubbing patterns (rebuilt by every `apply`).
    secrets: HashMap<(String, u64), Arc<Secret>>,
    /// The daemon's sandboxes as of the last `apply` (None before one).
    recorded: Option<Vec<String>>,
}

/// What serving needs beyond the table (made at `start`).
struct Serving {
    learned: Arc<LearnedStore>,
    configs: Mutex<PinnedConfigs>,
    dns: Arc<DnsContext>,
    proxy: Arc<ProxyContext>,
    /// The listener loops, the event reader and the expiry task: a drain
    /// aborts them (connections already accepted run on).
    loops: Vec<JoinHandle<()>>,
    /// The DNS UDP loops (also in `loops`): a drain waits for them to end
    /// before it counts the queries in flight, as a loop ending a batch
    /// may still be taking queries.
    dns_udp_loops: Vec<tokio::task::AbortHandle>,
    /// The DNS proxy's thread (its UDP loops, their queries, the upstream
    /// answers), kept as long as the data plane serves.
    _dns_thread: crate::util::conn_threads::ConnThreads,
}

struct Plane {
    config: DaemonConfig,
    runtime: tokio::runtime::Handle,
    routes: Routes,
    flows: Arc<FlowHub>,
    dns_stats: Arc<crate::dns::stats::DnsStats>,
    write_failures: MapWriteFailures,
    table: Mutex<Table>,
    /// Copies of the listeners (for `listeners`); the originals go to the
    /// serving tasks at `start`.
    held: Listeners,
    unstarted: Mutex<Option<Listeners>>,
    serving: Mutex<Option<Arc<Serving>>>,
    metrics: Mutex<Option<Arc<crate::observe::metrics::Metrics>>>,
    /// This process's socket before it takes the well-known name at `start`.
    own_socket: PathBuf,
    exit: mpsc::Sender<()>,
    started_at: Instant,
    /// Bumped with every route change (proxied connections look again).
    policy_changes: tokio::sync::watch::Sender<u64>,
    /// Whether the tries were searched for learned entries the restored
    /// snapshot lacked (once, when both serving and the state are in).
    untracked_taken: std::sync::atomic::AtomicBool,
}

/// Runs the data plane until it drains or is stopped. `ready` gets one
/// line once the socket answers.
pub fn run(config: DaemonConfig, listeners: Listeners, mut ready: impl Write) -> Result<(), PlaneError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let own_socket = config.state_dir.join(format!("dataplane.{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&own_socket);
    let api = UnixListener::bind(&own_socket).map_err(|source| PlaneError::Connect { path: own_socket.display().to_string(), source })?;
    std::fs::set_permissions(&own_socket, std::fs::Permissions::from_mode(0o600))?;
    let (exit, exited) = mpsc::channel();
    let plane = Arc::new(Plane {
        routes: Arc::default(),
        flows: Arc::new(FlowHub::new(&config.flow_log())),
        dns_stats: Arc::default(),
        write_failures: MapWriteFailures::default(),
        table: Mutex::default(),
        held: listeners.try_clone()?,
        unstarted: Mutex::new(Some(listeners)),
        serving: Mutex::default(),
        metrics: Mutex::default(),
        own_socket,
        exit,
        started_at: Instant::now(),
        policy_changes: tokio::sync::watch::Sender::new(0),
        untracked_taken: Default::default(),
        runtime: runtime.handle().clone(),
        config,
    });
    tracing::info!(pid = std::process::id(), build = build_id(), listeners = ?plane.held.addresses(), "data plane up; waiting for its state");
    let accepting = plane.clone();
    std::thread::Builder::new()
        .name("plane-api".into())
        .spawn(move || {
            for stream in api.incoming() {
                let Ok(stream) = stream else { continue };
                let plane = accepting.clone();
                let _ = std::thread::Builder::new().name("plane-client".into()).spawn(move || plane.serve_client(stream));
            }
        })
        .map_err(PlaneError::Io)?;
    let _ = writeln!(ready, "ready {}", plane.own_socket.display());
    let _ = ready.flush();
    drop(ready);
    let _ = exited.recv();
    // Audit lines queued so far reach the disk; the connections left die
    // with the process (counted by the drain).
    plane.flows.sync_audit();
    let _ = std::fs::remove_file(&plane.own_socket);
    std::process::exit(0);
}

/// A request line. An upsert (one per sandbox created: ~8 KB with its
/// compiled policy) is read straight into its fields: the tagged enum's
/// way buffers the whole object first and took ~2× as long (~0.27 ms of
/// a create, `bench lifecycle`). The same wire form either way; anything
/// the direct read does not take goes the general way.
fn parse_request(line: &str) -> serde_json::Result<PlaneRequest> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct UpsertLine {
        #[allow(dead_code)]
        op: UpsertOp,
        version: u64,
        sandbox: Box<SandboxEntry>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum UpsertOp {
        Upsert,
    }
    if line.starts_with("{\"op\":\"upsert\",") {
        if let Ok(UpsertLine { version, sandbox, .. }) = serde_json::from_str::<UpsertLine>(line) {
            return Ok(PlaneRequest::Upsert { version, sandbox });
        }
    }
    serde_json::from_str::<PlaneRequest>(line)
}

fn reply_line(result: Result<serde_json::Value, String>) -> Vec<u8> {
    let mut line = serde_json::to_vec(&result).expect("replies serialize");
    line.push(b'\n');
    line
}

impl Plane {
    fn serve_client(self: Arc<Self>, stream: UnixStream) {
        let Ok(read_half) = stream.try_clone() else { return };
        let mut reader = BufReader::new(read_half);
        let mut writer = stream;
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            let received = std::time::Instant::now();
            let request = parse_request(&line);
            let parsed = received.elapsed();
            let bytes = line.len();
            line.clear();
            let result = match request {
                Err(e) => Err(format!("bad request: {e}")),
                Ok(PlaneRequest::Listeners) => {
                    let (kinds, fds) = self.held.described();
                    // One message: the kinds, with the descriptors attached.
                    let body = reply_line(Ok(json!(kinds)));
                    if crate::util::fd_pass::send_with_fds(&writer, &body, &fds).is_err() {
                        return;
                    }
                    continue;
                }
                Ok(PlaneRequest::Inspect { follow }) => {
                    let table = crate::datapath::PinnedFlows::open(&self.config.bpf_dir).ok();
                    let fd = writer.as_raw_fd();
                    let _ = self.flows.serve_inspect(&mut std::io::BufWriter::new(writer), follow, table.as_ref(), || crate::util::net::peer_closed(fd));
                    return;
                }
                Ok(PlaneRequest::Drain { seconds }) => {
                    let answer = self.drain();
                    if writer.write_all(&reply_line(answer)).is_err() {
                        tracing::warn!("the daemon went away during the drain; draining anyway");
                    }
                    let closed = self.finish(Duration::from_secs(seconds));
                    let _ = writer.write_all(&reply_line(Ok(json!({ "exited": { "closed": closed } }))));
                    let _ = self.exit.send(());
                    return;
                }
                Ok(PlaneRequest::Stop) => {
                    let _ = writer.write_all(&reply_line(Ok(json!({ "stopping": std::process::id() }))));
                    let _ = self.exit.send(());
                    return;
                }
                Ok(request) => self.answer(request),
            };
            let answered = received.elapsed();
            if writer.write_all(&reply_line(result)).is_err() {
                return;
            }
            tracing::debug!(bytes, parse_us = parsed.as_micros() as u64, answer_us = (answered - parsed).as_micros() as u64, reply_us = (received.elapsed() - answered).as_micros() as u64, "data plane: request served");
        }
    }

    fn answer(&self, request: PlaneRequest) -> Result<serde_json::Value, String> {
        match request {
            PlaneRequest::Hello => Ok(self.hello()),
            PlaneRequest::Apply { version, sandboxes, recorded } => self.apply(version, sandboxes, recorded),
            PlaneRequest::Upsert { version, sandbox } => {
                let mut table = self.lock_table();
                let route = self.route(&mut table, &sandbox);
                self.publish(&mut table, version, vec![(*sandbox, route)], &[]);
                Ok(json!({ "version": version }))
            }
            PlaneRequest::Remove { version, sandbox } => {
                let forgotten = {
                    let mut table = self.lock_table();
                    self.publish(&mut table, version, Vec::new(), std::slice::from_ref(&sandbox))
                };
                for (name, policy_id) in forgotten {
                    self.forget(&name, Some(policy_id));
                }
                Ok(json!({ "version": version }))
            }
            PlaneRequest::Switch { version, switch } => self.switch(version, *switch),
            PlaneRequest::LearnedTable { sandbox } => {
                let serving = self.serving().ok_or("the data plane has not started")?;
                Ok(json!(serving.learned.sandbox_table(&sandbox).into_iter().collect::<Vec<_>>()))
            }
            PlaneRequest::Start => self.start(),
            PlaneRequest::Stats => Ok(self.stats()),
            PlaneRequest::Metrics => Ok(json!(self.metrics.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|m| m.openmetrics()).unwrap_or_default())),
            PlaneRequest::Listeners | PlaneRequest::Inspect { .. } | PlaneRequest::Drain { .. } | PlaneRequest::Stop => unreachable!("served by serve_client"),
        }
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serving(&self) -> Option<Arc<Serving>> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn hello(&self) -> serde_json::Value {
        json!({
            "build": build_id(),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "snapshot_version": self.lock_table().version,
            "serving": self.serving().is_some(),
            "uptime_seconds": self.started_at.elapsed().as_secs(),
            "config": super::config_hash(&self.config),
            // Reads trie values compact (see `crate::policy::wire`).
            "compact_policy_values": true,
            // Mints leaves for a CA named by its key (see
            // `crate::credentials::ca`); older builds, only for one naming
            // its sandbox.
            "key_named_cas": true,
        })
    }

    fn stats(&self) -> serde_json::Value {
        let serving = self.serving();
        json!({
            "build": build_id(),
            "pid": std::process::id(),
            "snapshot_version": self.lock_table().version,
            "serving": serving.is_some(),
            "dns": self.dns_stats.to_json(),
            "learned_addresses": serving.as_ref().map_or(0, |s| s.learned.count()),
            "in_flight": serving.as_ref().map(|s| json!({ "dns": s.dns.in_flight.count(), "proxy": s.proxy.in_flight.count() })),
        })
    }

    /// The route the proxies use for `entry`, with its secrets and CA.
    fn route(&self, table: &mut Table, entry: &SandboxEntry) -> Arc<Route> {
        let credentials = entry
            .credentials
            .iter()
            .filter_map(|c| {
                use std::hash::{Hash, Hasher};
                let mut h = std::hash::DefaultHasher::new();
                c.secret.hash(&mut h);
                let key = (c.name.clone(), h.finish());
                let secret = match table.secrets.get(&key) {
                    Some(s) if s.expose() == c.secret => s.clone(),
                    _ => {
                        let s = Arc::new(Secret::from_value(c.secret.clone()));
                        table.secrets.insert(key, s.clone());
                        s
                    }
                };
                CredentialBinding::new(&c.name, &c.hosts, &c.header, &c.format, secret, c.allow_plaintext)
                    .map_err(|e| tracing::warn!(sandbox = %entry.name, "{e}"))
                    .ok()
                    .map(Arc::new)
            })
            .collect();
        // A CA loaded before is kept only while it is the one on disk: a
        // sandbox made again under the same name (after a delete or a failed
        // create whose removal never arrived) has a new CA in the same
        // directory, and its guest trusts only that one.
        let still_on_disk = |dir: &PathBuf, ca: &Mutex<SandboxCa>| std::fs::read_to_string(dir.join("ca.pem")).is_ok_and(|pem| pem == ca.lock().unwrap_or_else(|p| p.into_inner()).cert_pem);
        let ca = entry.ca_dir.as_ref().and_then(|dir| match table.cas.get(&entry.name) {
            Some((loaded_from, ca)) if loaded_from == dir && still_on_disk(dir, ca) => Some(ca.clone()),
            _ => match SandboxCa::load(&entry.name, dir) {
                Ok(ca) => {
                    let ca = Arc::new(Mutex::new(ca));
                    table.cas.insert(entry.name.clone(), (dir.clone(), ca.clone()));
                    Some(ca)
                }
                Err(e) => {
                    tracing::error!(sandbox = %entry.name, "CA not loaded; its credential hosts are refused: {e}");
                    None
                }
            },
        });
        Arc::new(Route { sandbox: entry.name.clone(), id: entry.id, policy: entry.policy.clone(), policy_id: entry.policy_id, credentials, ca })
    }

    /// Puts `upserts` in and takes `removals` out, in one write of the
    /// route table (the version moves with it); returns the removed
    /// sandboxes with their policy ids, for [`Plane::forget`] once the
    /// table is released.
    fn publish(&self, table: &mut Table, version: u64, upserts: Vec<(SandboxEntry, Arc<Route>)>, removals: &[String]) -> Vec<(String, u32)> {
        let mut forgotten = Vec::new();
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            for name in removals {
                if let Some(known) = table.known.remove(name) {
                    for a in known.addresses {
                        routes.remove(&a);
                    }
                    forgotten.push((name.clone(), known.policy_id));
                }
            }
            for (entry, route) in upserts {
                let addresses = [IpAddr::V4(entry.guest_ipv4), IpAddr::V6(entry.guest_ipv6)];
                if let Some(old) = table.known.insert(entry.name.clone(), Known { policy_id: entry.policy_id, addresses }) {
                    for a in old.addresses.iter().filter(|a| !addresses.contains(a)) {
                        routes.remove(a);
                    }
                }
                for a in addresses {
                    routes.insert(a, route.clone());
                }
            }
            table.version = version;
        }
        self.policy_changes.send_replace(version);
        for (name, _) in &forgotten {
            table.cas.remove(name);
        }
        forgotten
    }

    /// A deleted sandbox's learned addresses (tries and table) and flow
    /// series. Call without the table lock (see the lock order above).
    fn forget(&self, sandbox: &str, policy_id: Option<u32>) {
        if let Some(serving) = self.serving() {
            let mut change = serving.learned.blocking_change();
            if let Some(table) = change.remove_sandbox(sandbox) {
                for (ip, learned) in table {
                    change.maps().remove(policy_id.unwrap_or(learned.policy_id), ip);
                }
            }
        }
        self.flows.forget_sandbox(sandbox);
    }

    /// The learned addresses of sandboxes the daemon no longer has.
    fn forget_unrecorded(&self) {
        let Some(recorded) = self.lock_table().recorded.clone() else { return };
        let Some(serving) = self.serving() else { return };
        let stale: Vec<String> = serving.learned.blocking_change().table().by_sandbox.keys().filter(|n| !recorded.contains(n)).cloned().collect();
        for name in stale {
            tracing::info!(sandbox = %name, "forgetting the learned addresses of a sandbox the daemon no longer has");
            self.forget(&name, None);
        }
    }

    /// Once serving with the daemon's state: takes in the live learned
    /// entries of the tries the restored snapshot lacked (a crashed data
    /// plane learned them after its last snapshot), so they expire.
    fn take_untracked(&self) {
        use std::sync::atomic::Ordering;
        let Some(serving) = self.serving() else { return };
        let sandboxes: Vec<(String, u32)> = {
            let table = self.lock_table();
            if table.recorded.is_none() {
                return;
            }
            table.known.iter().map(|(name, k)| (name.clone(), k.policy_id)).collect()
        };
        if self.untracked_taken.swap(true, Ordering::SeqCst) {
            return;
        }
        let taken = serving.learned.adopt_untracked(&sandboxes, crate::util::clock::boot_time_ns());
        if taken > 0 {
            tracing::info!(taken, "learned addresses in the maps but not in the snapshot (learned after it): taken in, to expire with the kernel's entries");
        }
    }

    fn apply(&self, version: u64, sandboxes: Vec<SandboxEntry>, recorded: Option<Vec<String>>) -> Result<serde_json::Value, String> {
        let count = sandboxes.len();
        {
            let mut table = self.lock_table();
            // A sandbox left out is only unrouted (refused); what it learned
            // goes only when the daemon no longer records it.
            let gone: Vec<String> = table.known.keys().filter(|k| !sandboxes.iter().any(|s| &s.name == *k)).cloned().collect();
            table.secrets.clear();
            let upserts: Vec<_> = sandboxes
                .into_iter()
                .map(|s| {
                    let route = self.route(&mut table, &s);
                    (s, route)
                })
                .collect();
            self.publish(&mut table, version, upserts, &gone);
            if recorded.is_some() {
                table.recorded = recorded;
            }
        }
        self.forget_unrecorded();
        self.take_untracked();
        Ok(json!({ "version": version, "sandboxes": count }))
    }

    /// Restores the learned addresses, builds the proxies' contexts, reads
    /// the listeners, and takes the well-known socket name.
    fn start(&self) -> Result<serde_json::Value, String> {
        let Some(listeners) = self.unstarted.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(json!({ "started": false, "already": true }));
        };
        let config = &self.config;
        let maps = LearnedMaps::open(&config.bpf_dir, self.write_failures.clone()).map_err(|e| e.to_string())?;
        let restored = Learned::restore(&config.learned_snapshot(), &maps);
        let learned = Arc::new(LearnedStore::new(maps, restored));
        let configs = PinnedConfigs::open(&config.bpf_dir).map_err(|e| e.to_string())?;
        // The DNS proxy's UDP loops, the queries they take and the upstream
        // answers all run on one thread of their own: no hand-off between
        // threads per query, and no proxied connection in the way. The
        // proxy's connections each run to their end on a serving thread
        // (one per CPU).
        let dns_thread = crate::util::conn_threads::ConnThreads::start(1, "dns").map_err(|e| format!("starting the DNS thread: {e}"))?;
        let threads = Arc::new(crate::util::conn_threads::ConnThreads::per_cpu("serve").map_err(|e| format!("starting the serving threads: {e}"))?);
        let upstream = Arc::new(crate::dns::upstream::UpstreamClient::default().sharing(config.dns_share_upstream_queries).receiving_on(dns_thread.handle()));
        let settings = dns_proxy::DnsSettings {
            upstream: config.upstream_resolver(),
            timing: crate::dns::decide::LearnTiming { min_ttl: config.dns_min_ttl, max_ttl: config.dns_max_ttl, grace: config.dns_grace },
            refuse_denied: config.dns_refuse_denied,
            upstream_timeout: Duration::from_secs(3),
            max_addresses_per_name: config.dns_max_addresses_per_name,
            hold_timeout: Duration::from_millis(500),
            max_upstream_per_sandbox: dns_proxy::DEFAULT_MAX_UPSTREAM_PER_SANDBOX,
            tcp: config.dns_tcp_limits(),
            cache: crate::dns::cache::CacheSettings { entries: config.dns_cache_entries, ..Default::default() },
        };
        let settings_cache = settings.cache;
        let dns = Arc::new(DnsContext {
            slots: dns_proxy::DnsSlots::new(&settings),
            conntrack: Default::default(),
            settings,
            routes: self.routes.clone(),
            learned: learned.clone(),
            stats: self.dns_stats.clone(),
            upstream: upstream.clone(),
            flows: self.flows.clone(),
            in_flight: Default::default(),
            draining: tokio::sync::watch::Sender::new(false),
            cache: crate::dns::cache::AnswerCache::new(settings_cache),
        });
        let proxy = Arc::new(ProxyContext {
            routes: self.routes.clone(),
            flows: self.flows.clone(),
            learned: learned.clone(),
            resolver: crate::proxy::ProxyResolver { client: upstream, upstream: dns.settings.upstream, timeout: dns.settings.upstream_timeout },
            upstream_tls: crate::proxy::inject::upstream_tls(config.upstream_ca.as_deref()).map_err(|e| e.to_string())?,
            guest_tls: Default::default(),
            limits: config.proxy_limits(),
            upstream_requests: config.upstream_requests(),
            in_flight: Default::default(),
            policy_changes: self.policy_changes.subscribe(),
            threads,
        });
        let mut metrics = crate::observe::metrics::Metrics::default();
        self.flows.metrics.register(metrics.registry());
        self.dns_stats.register(learned.clone(), metrics.registry());
        metrics.registry().register("dataplane_map_write_failures", "Learned-address map writes and removes of the data plane that failed where no caller could act on it, by map", self.write_failures.family());
        *self.metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(metrics));

        // The well-known name first: a data plane that serves is always the
        // one `sbx-net` and a restarted daemon find.
        std::fs::rename(&self.own_socket, self.config.dataplane_socket()).map_err(|e| format!("taking {}: {e}", self.config.dataplane_socket().display()))?;
        let _entered = self.runtime.enter();
        let mut loops = Vec::new();
        for l in listeners.proxy {
            loops.push(self.runtime.spawn(crate::proxy::serve(l, proxy.clone())));
        }
        let mut dns_udp_loops = Vec::new();
        for u in listeners.dns_udp {
            let udp_loop = dns_thread.spawn(dns_proxy::serve_udp(u, dns.clone()));
            dns_udp_loops.push(udp_loop.abort_handle());
            loops.push(udp_loop);
        }
        for t in listeners.dns_tcp {
            loops.push(self.runtime.spawn(dns_proxy::serve_tcp(t, dns.clone())));
        }
        loops.push(self.runtime.spawn(crate::observe::ingest::read_datapath_events(config.bpf_dir.clone(), self.flows.clone(), self.routes.clone(), learned.clone())));
        let gc_routes = self.routes.clone();
        loops.push(self.runtime.spawn(crate::dns::learned::collect_expired(learned.clone(), config.learned_snapshot(), move |sandbox| {
            let table = gc_routes.read().unwrap_or_else(|p| p.into_inner());
            table.values().find(|r| r.sandbox == sandbox).map(|r| r.policy.clone())
        })));
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Serving { learned, configs: Mutex::new(configs), dns, proxy, loops, dns_udp_loops, _dns_thread: dns_thread }));
        // Sandboxes deleted while no data plane served keep nothing learned;
        // what the running ones learned after the snapshot is taken in.
        self.forget_unrecorded();
        self.take_untracked();
        tracing::info!(version = self.lock_table().version, "data plane serving");
        Ok(json!({ "started": true }))
    }

    /// A generation switch (see [`SwitchRequest`]); on a failure, what was
    /// written under the new id is taken out again and the tap keeps the
    /// old generation.
    fn switch(&self, version: u64, switch: SwitchRequest) -> Result<serde_json::Value, String> {
        let serving = self.serving().ok_or("the data plane has not started")?;
        let SwitchRequest { sandbox, ifindex, config, old_policy_id, restore } = switch;
        let new_id = sandbox.policy_id;
        let mut change = serving.learned.blocking_change();
        let table = change.sandbox(&sandbox.name);
        let old_ips: Vec<IpAddr> = table.keys().copied().collect();
        // A rollback also carries what the sandbox had learned before the
        // failed switch; what was learned since wins.
        let mut sources: HashMap<IpAddr, LearnedAddr> = restore.unwrap_or_default().into_iter().collect();
        sources.extend(table);
        let mut carried = HashMap::new();
        for (ip, entry) in &sources {
            if let Some((value, names)) = carry_learned(&sandbox.policy, *ip, entry) {
                carried.insert(*ip, LearnedAddr { policy_id: new_id, value, names, answered_ns: entry.answered_ns });
            }
        }
        let mut written = Vec::new();
        let mut result = Ok(());
        for (ip, addr) in &carried {
            if let Err(e) = change.maps().insert(new_id, *ip, &addr.value) {
                result = Err(e.to_string());
                break;
            }
            written.push(*ip);
        }
        if result.is_ok() {
            result = serving.configs.lock().unwrap_or_else(|p| p.into_inner()).write(ifindex, &config).map_err(|e| e.to_string());
        }
        if let Err(e) = result {
            for ip in written {
                change.maps().remove(new_id, ip);
            }
            return Err(format!("switching {} in the data plane: {e}", sandbox.name));
        }
        // The route moves before the lock goes: answers from now on are
        // learned under the generation in force.
        {
            let mut t = self.lock_table();
            let route = self.route(&mut t, &sandbox);
            self.publish(&mut t, version, vec![(sandbox.clone(), route)], &[]);
        }
        for ip in old_ips {
            change.maps().remove(old_policy_id, ip);
        }
        let count = carried.len();
        change.replace_sandbox(&sandbox.name, carried);
        Ok(json!({ "version": version, "carried": count }))
    }

    /// Stops taking work: aborts the listener loops, closes idle DNS TCP
    /// connections, waits for DNS queries in flight, saves the learned
    /// addresses for the next data plane. Proxied connections go on.
    fn drain(&self) -> Result<serde_json::Value, String> {
        let Some(serving) = self.serving() else {
            return Ok(json!({ "drained": true, "serving": false }));
        };
        for task in &serving.loops {
            task.abort();
        }
        serving.dns.draining.send_replace(true);
        let deadline = Instant::now() + DNS_DRAIN_LIMIT;
        while serving.dns_udp_loops.iter().any(|l| !l.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        while serving.dns.in_flight.count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let dns_left = serving.dns.in_flight.count();
        if dns_left > 0 {
            tracing::warn!(dns_left, "DNS queries still in flight at the drain limit: what they learn is not handed over");
        }
        // Sealed: a periodic write still in flight cannot overwrite it.
        serving.learned.save_snapshot(&self.config.learned_snapshot()).map_err(|e| e.to_string())?;
        let proxied = serving.proxy.in_flight.count();
        tracing::info!(proxied, "data plane draining: listeners handed over, learned addresses saved");
        Ok(json!({ "drained": true, "dns_left": dns_left, "proxied": proxied }))
    }

    /// Waits for the proxied connections to end, at most `limit`; returns
    /// how many were still open (and are closed by the exit).
    fn finish(&self, limit: Duration) -> usize {
        let Some(serving) = self.serving() else { return 0 };
        let deadline = Instant::now() + limit;
        let open = || serving.proxy.in_flight.count() + serving.dns.in_flight.count();
        while open() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let closed = open();
        if closed > 0 {
            tracing::warn!(closed, limit_seconds = limit.as_secs(), "drain time over: closing the connections left");
        } else {
            tracing::info!("drained: every connection finished");
        }
        closed
    }
}

/// Reads what the daemon passes a starting data plane: the configuration
/// (JSON on stdin) and the listeners (inherited descriptors, kinds in
/// [`super::INHERITED_FDS_ENV`]).
pub fn inherited(stdin: impl std::io::Read) -> Result<(DaemonConfig, Listeners), PlaneError> {
    let config: DaemonConfig = serde_json::from_reader(stdin).map_err(|e| PlaneError::Spawn(format!("configuration on stdin: {e}")))?;
    let kinds: Vec<String> = std::env::var(super::INHERITED_FDS_ENV)
        .map_err(|_| PlaneError::Spawn(format!("{} is not set: `sbx-net dataplane` is started by the daemon", super::INHERITED_FDS_ENV)))?
        .split(',')
        .map(str::to_string)
        .collect();
    // SAFETY: the daemon's contract (link::spawn) puts exactly these
    // descriptors at 3.. and nothing else of ours is there yet.
    let fds = unsafe { crate::util::fd_pass::take_inherited(kinds.len()) }?;
    let listeners = Listeners::from_fds(&kinds, fds, &config)?;
    Ok((config, listeners))
}

/// Whether a path is a data plane socket file of this state dir (for cleanup).
pub fn is_plane_socket(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("dataplane.") && n.ends_with(".sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert_line(version: u64) -> String {
        serde_json::to_string(&upsert(version)).unwrap()
    }

    fn upsert(version: u64) -> PlaneRequest {
        let policy = crate::policy::compile::compile(&crate::policy::Policy::embedded_default(), &[]).unwrap();
        let entry = SandboxEntry {
            name: "a".into(),
            id: 7,
            guest_ipv4: "10.200.0.6".parse().unwrap(),
            guest_ipv6: "fd00::6".parse().unwrap(),
            policy_id: 3,
            policy: Arc::new(policy),
            credentials: Vec::new(),
            ca_dir: Some("/state/ca/a".into()),
        };
        PlaneRequest::Upsert { version, sandbox: Box::new(entry) }
    }

    #[test]
    fn an_upsert_read_directly_is_the_upsert_sent_and_anything_else_goes_the_general_way() {
        let line = upsert_line(42);
        let direct = parse_request(&line).unwrap();
        let general = serde_json::from_str::<PlaneRequest>(&line).unwrap();
        let (PlaneRequest::Upsert { version, sandbox }, PlaneRequest::Upsert { version: v, sandbox: s }) = (direct, general) else { panic!("an upsert") };
        assert_eq!((version, v, sandbox.id, sandbox.policy_id, sandbox.ca_dir.as_deref()), (42, 42, 7, 3, Some(Path::new("/state/ca/a"))));
        assert_eq!(serde_json::to_value(&*sandbox).unwrap(), serde_json::to_value(&*s).unwrap(), "the same entry both ways");
        // Not an upsert, or one the direct read refuses: as before.
        assert!(matches!(parse_request(r#"{"op":"remove","version":1,"sandbox":"a"}"#), Ok(PlaneRequest::Remove { .. })));
        let extra = line.replacen(r#""version":42"#, r#""version":42,"later_field":1"#, 1);
        assert!(matches!(parse_request(&extra), Ok(PlaneRequest::Upsert { version: 42, .. })), "a field this build does not know is ignored as before");
        assert!(parse_request(&line[..line.len() / 2]).is_err(), "a cut line is an error either way");
    }

    #[test]
    fn a_data_plane_that_does_not_say_it_reads_compact_values_is_sent_them_spelled_out() {
        use super::super::{PlaneConnection, PolicyValueForm};
        let dir = std::env::temp_dir().join(format!("sbx-plane-form-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
        let sent = |hello: serde_json::Value| {
            let mut conn = PlaneConnection::connect(&dir.join("s"), Duration::from_secs(5)).unwrap();
            conn.set_form(PolicyValueForm::from_hello(&hello));
            let (accepted, _) = listener.accept().unwrap();
            conn.send(&upsert(9)).unwrap();
            let mut line = String::new();
            BufReader::new(accepted).read_line(&mut line).unwrap();
            line
        };
        let compact = sent(json!({ "build": "this", "compact_policy_values": true }));
        let older = sent(json!({ "build": "0.1.0+older" }));
        let value_of = |line: &str| serde_json::from_str::<serde_json::Value>(line).unwrap()["sandbox"]["policy"]["v4"][0][2].clone();
        assert!(value_of(&compact).is_array(), "{compact}");
        // What an older build's derive reads: every field by name.
        let spelled = value_of(&older);
        assert!(spelled["ports"].as_array().is_some_and(|p| p.len() == sbx_net_common::MAX_PORT_VERDICTS), "{spelled}");
        let derived = serde_json::from_value::<sbx_net_common::PolicyValue>(spelled).unwrap();
        let PlaneRequest::Upsert { sandbox, .. } = upsert(9) else { unreachable!() };
        assert_eq!(derived, sandbox.policy.v4[0].2);
        assert!(compact.len() * 2 < older.len(), "compact {} bytes, spelled out {}", compact.len(), older.len());
        // This build reads both as the entry sent.
        for line in [&compact, &older] {
            let Ok(PlaneRequest::Upsert { sandbox: read, .. }) = parse_request(line) else { panic!("an upsert") };
            assert_eq!(read.policy, sandbox.policy);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_fuzz_seed_of_an_upsert_reads_in_both_forms() {
        let line = include_str!("../../../../fuzz/corpus/api/plane-upsert");
        let Ok(PlaneRequest::Upsert { sandbox, .. }) = parse_request(line) else { panic!("the seed is an upsert") };
        let (v4, v6) = (&sandbox.policy.v4[1].2, &sandbox.policy.v6[1].2);
        assert_eq!((v4.port_count, v4.ports[1].port, v6.any_port.rule_id), (2, 80, 1), "compact v4, spelled-out v6");
    }
}
