//! The DNS proxy every guest reaches through nftables' redirect of port 53
//! (UDP and TCP, to any address). It decides each query by the sandbox's
//! domain rules, forwards allowed ones upstream (UDP, TCP on truncation;
//! the query's EDNS0 passes through), writes the answer's addresses into
//! the sandbox's trie entries with their expiry, and only then releases the
//! answer. The decisions are in [`crate::dns`]; this is the I/O.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Map, MapData};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record};
use sbx_net_common::{map_names, KeyV4, KeyV6, PolicyValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::compile::CompiledPolicy;
use crate::datapath::{key_v4, key_v6};
use crate::dns::{learned_value, over_cap, LearnedAddr, name_verdict, normalise_query_name, plan_answer, AnswerRecord, LearnTiming, NameVerdict, RecordFate};
use crate::flow::{DnsDetail, FlowRecord, Verdict};
use crate::proxy::Routes;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS proxy: binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("DNS proxy: opening pinned map {name}: {reason}")]
    Map { name: &'static str, reason: String },
}

/// The proxy's settings, as plain data.
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// Where allowed queries go; `None`: answer SERVFAIL.
    pub upstream: Option<SocketAddr>,
    pub timing: LearnTiming,
    /// Answer denied names REFUSED instead of NXDOMAIN.
    pub refuse_denied: bool,
    pub upstream_timeout: Duration,
    /// How long an answer may wait for its map write before SERVFAIL.
    pub hold_timeout: Duration,
    /// At most this many learned addresses per name (older ones without a
    /// live flow are forgotten first); 0: no cap.
    pub max_addresses_per_name: usize,
}

/// Boot-time nanoseconds, the clock the classifier compares expiries with
/// (`bpf_ktime_get_boot_ns`).
pub fn boot_time_ns() -> u64 {
    // SAFETY: clock_gettime writes one timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Learned addresses per sandbox (what the tries hold beyond the compiled
/// policy), for expiry and for carrying them across policy generations.
#[derive(Default)]
pub struct Learned {
    pub by_sandbox: HashMap<String, HashMap<IpAddr, LearnedAddr>>,
    /// Bumped on every change, so the snapshot is rewritten only then.
    pub version: u64,
}

/// One line of the snapshot: what a restarted daemon needs besides the
/// trie entry itself (which survives in the pinned map).
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotEntry {
    sandbox: String,
    ip: IpAddr,
    policy_id: u32,
    names: BTreeSet<String>,
}

impl Learned {
    /// Writes the name↔address knowledge to `path` (atomically).
    pub fn write_snapshot(&self, path: &Path) -> std::io::Result<()> {
        let entries: Vec<SnapshotEntry> = self
            .by_sandbox
            .iter()
            .flat_map(|(sandbox, t)| {
                t.iter().map(|(ip, l)| SnapshotEntry { sandbox: sandbox.clone(), ip: *ip, policy_id: l.policy_id, names: l.names.clone() })
            })
            .collect();
        crate::state::write_atomic(path, &serde_json::to_vec(&entries).map_err(std::io::Error::other)?)
    }

    /// Restores the table from the snapshot and the tries: an entry is back
    /// only if the trie still holds a live learned value for it.
    pub fn restore(path: &Path, maps: &LearnedMaps) -> Learned {
        let mut learned = Learned::default();
        let Ok(bytes) = std::fs::read(path) else { return learned };
        let Ok(entries) = serde_json::from_slice::<Vec<SnapshotEntry>>(&bytes) else {
            tracing::warn!(path = %path.display(), "unreadable learned-address snapshot; starting empty");
            return learned;
        };
        let now = boot_time_ns();
        for e in entries {
            let Some(value) = maps.get(e.policy_id, e.ip) else { continue };
            if value.learned_until_ns > now {
                learned.by_sandbox.entry(e.sandbox).or_default().insert(e.ip, LearnedAddr { policy_id: e.policy_id, value, names: e.names, answered_ns: now });
            }
        }
        learned
    }
}

/// The pinned policy tries, opened by this component.
pub struct LearnedMaps {
    v4: LpmTrie<MapData, KeyV4, PolicyValue>,
    v6: LpmTrie<MapData, KeyV6, PolicyValue>,
}

impl LearnedMaps {
    pub fn open(pin_dir: &Path) -> Result<LearnedMaps, DnsError> {
        let open = |name: &'static str| -> Result<MapData, DnsError> {
            MapData::from_pin(pin_dir.join(name)).map_err(|e| DnsError::Map { name, reason: e.to_string() })
        };
        let v4 = LpmTrie::try_from(Map::LpmTrie(open(map_names::POLICY_V4)?))
            .map_err(|e| DnsError::Map { name: map_names::POLICY_V4, reason: e.to_string() })?;
        let v6 = LpmTrie::try_from(Map::LpmTrie(open(map_names::POLICY_V6)?))
            .map_err(|e| DnsError::Map { name: map_names::POLICY_V6, reason: e.to_string() })?;
        Ok(LearnedMaps { v4, v6 })
    }

    pub fn insert(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue) -> Result<(), String> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(&key_v4(policy_id, a.octets(), 32), value, 0),
            IpAddr::V6(a) => self.v6.insert(&key_v6(policy_id, a.octets(), 128), value, 0),
        }
        .map_err(|e| e.to_string())
    }

    /// The entry the trie holds for exactly this address (the longest match
    /// of a full-length key is the exact entry when there is one).
    pub fn get(&self, policy_id: u32, ip: IpAddr) -> Option<PolicyValue> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&key_v4(policy_id, a.octets(), 32), 0).ok(),
            IpAddr::V6(a) => self.v6.get(&key_v6(policy_id, a.octets(), 128), 0).ok(),
        }
    }

    pub fn remove(&mut self, policy_id: u32, ip: IpAddr) {
        let _ = match ip {
            IpAddr::V4(a) => self.v4.remove(&key_v4(policy_id, a.octets(), 32)),
            IpAddr::V6(a) => self.v6.remove(&key_v6(policy_id, a.octets(), 128)),
        };
    }
}

/// Counters the daemon reports in `status` and `/metrics`.
#[derive(Debug)]
pub struct DnsStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub stripped: AtomicU64,
    pub hold_timeouts: AtomicU64,
    /// Longest wait for the map write, µs.
    pub hold_max_us: AtomicU64,
    /// How long answers were held for their map writes (seconds).
    pub hold_seconds: prometheus_client::metrics::histogram::Histogram,
}

/// Hold-time buckets: 10 µs .. 500 ms (the hold timeout).
pub const HOLD_BUCKETS: [f64; 12] = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.1, 0.5];

/// A fresh hold-time histogram with [`HOLD_BUCKETS`].
pub fn hold_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(HOLD_BUCKETS)
}

impl Default for DnsStats {
    fn default() -> Self {
        DnsStats {
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            stripped: AtomicU64::new(0),
            hold_timeouts: AtomicU64::new(0),
            hold_max_us: AtomicU64::new(0),
            hold_seconds: hold_histogram(),
        }
    }
}

impl DnsStats {
    fn record_hold(&self, waited: Duration) {
        self.hold_max_us.fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
        self.hold_seconds.observe(waited.as_secs_f64());
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "queries_allowed": self.allowed.load(Ordering::Relaxed),
            "queries_denied": self.denied.load(Ordering::Relaxed),
            "upstream_failures": self.upstream_failures.load(Ordering::Relaxed),
            "records_stripped": self.stripped.load(Ordering::Relaxed),
            "hold_timeouts": self.hold_timeouts.load(Ordering::Relaxed),
            "hold_max_us": self.hold_max_us.load(Ordering::Relaxed),
        })
    }
}

/// The tries' handles and the learned table, under one async-aware lock
/// (the daemon's control thread takes it with `blocking_lock`).
pub type SharedLearned = Arc<tokio::sync::Mutex<(LearnedMaps, Learned)>>;

/// Everything the serving tasks share.
pub struct DnsContext {
    pub settings: DnsSettings,
    pub stats: Arc<DnsStats>,
    pub routes: Routes,
    /// The maps and the learned table move together under one lock, which
    /// the daemon also takes while it switches a policy generation.
    pub state: SharedLearned,
    /// The shared upstream socket and the queries in flight on it.
    pub upstream: UpstreamClient,
    /// TLS to upstreams for the credential proxy.
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// The flow stream both proxies report their decisions to.
    pub flows: Arc<crate::flow_log::FlowHub>,
}

/// Binds UDP and TCP on `port`, IPv4 and IPv6 (separate sockets: redirected
/// traffic arrives per family).
pub fn bind(port: u16) -> Result<(Vec<std::net::UdpSocket>, Vec<std::net::TcpListener>), DnsError> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for addr in crate::proxy::wildcard_addrs(port) {
        let err = |source| DnsError::Bind { addr, source };
        udp.push(crate::proxy::bound_socket(addr, socket2::Type::DGRAM).map_err(err)?.into());
        tcp.push(crate::proxy::bound_socket(addr, socket2::Type::STREAM).map_err(err)?.into());
    }
    Ok((udp, tcp))
}

pub async fn serve_udp(socket: std::net::UdpSocket, ctx: Arc<DnsContext>) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!("DNS UDP socket: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
        let query = buf[..n].to_vec();
        let (socket, ctx) = (socket.clone(), ctx.clone());
        tokio::spawn(async move {
            if let Some(response) = answer(&ctx, peer, &query, Transport::Udp).await {
                let _ = socket.send_to(&response, peer).await;
            }
        });
    }
}

pub async fn serve_tcp(listener: std::net::TcpListener, ctx: Arc<DnsContext>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("DNS TCP listener: {e}");
            return;
        }
    };
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else { continue };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Several queries may come on one connection; each is framed.
            while let Ok(Ok(query)) = tokio::time::timeout(Duration::from_secs(10), read_framed(&mut stream)).await {
                let Some(response) = answer(&ctx, peer, &query, Transport::Tcp).await else { break };
                if write_framed(&mut stream, &response).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// The mnemonic dig prints (RFC 6895 names).
fn rcode_name(code: ResponseCode) -> crate::flow::Text {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)).into(),
    }
}

/// A response with `code` and the query's id, opcode and question: what
/// the proxy answers itself (denied, refused, malformed, upstream failure).
pub(crate) fn reply(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    m.add_queries(query.queries().to_vec());
    m.to_vec().ok()
}

/// The whole life of one query; `None` sends nothing (unparseable input).
async fn answer(ctx: &DnsContext, peer_addr: std::net::SocketAddr, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    if query.message_type() != MessageType::Query || query.queries().len() != 1 {
        return reply(&query, ResponseCode::FormErr);
    }
    let peer = crate::proxy::canonical(peer_addr.ip());
    let route = ctx.routes.read().unwrap_or_else(|p| p.into_inner()).get(&peer).cloned();
    let Some(route) = route else {
        tracing::info!(%peer, "DNS query from no sandbox's address: refused");
        return reply(&query, ResponseCode::Refused);
    };
    let qname = normalise_query_name(&query.queries()[0].name().to_ascii());
    let qtype = query.queries()[0].query_type();
    // The flow record of this query, completed on every way out.
    let record = |verdict: Verdict, reason: &'static str, rule: Option<String>, rcode: ResponseCode, answers: Vec<IpAddr>, stripped: usize| {
        let mut r = FlowRecord::new(&route.sandbox, "dns", "dns_query", if transport == Transport::Udp { "udp" } else { "tcp" }, verdict, reason)
            .with_endpoints(Some(peer_addr), None);
        r.dst_port = 53;
        r.rule = rule;
        r.dns = Some(DnsDetail { query: qname.clone(), qtype: <&'static str>::from(qtype).into(), rcode: rcode_name(rcode), answers, stripped });
        ctx.flows.publish(r);
    };
    let (rule, port) = match name_verdict(&route.policy, &qname) {
        NameVerdict::Denied { rule_id } => {
            let rule = route.policy.describe_rule(rule_id);
            tracing::info!(sandbox = %route.sandbox, name = %qname, %qtype, %rule, "DNS: denied");
            ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
            let code = if ctx.settings.refuse_denied { ResponseCode::Refused } else { ResponseCode::NXDomain };
            record(Verdict::Denied, "policy", Some(rule), code, Vec::new(), 0);
            return reply(&query, code);
        }
        NameVerdict::Allowed { rule_id, port } => (rule_id, port),
    };
    let rule_text = route.policy.describe_rule(rule);
    let Some(upstream) = ctx.settings.upstream else {
        ctx.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
        record(Verdict::Allowed, "no_upstream", Some(rule_text), ResponseCode::ServFail, Vec::new(), 0);
        return reply(&query, ResponseCode::ServFail);
    };
    let response = match ctx.upstream.forward(upstream, bytes, ctx.settings.upstream_timeout).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(sandbox = %route.sandbox, name = %qname, %upstream, "DNS upstream: {e}");
            ctx.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            record(Verdict::Allowed, "upstream_failed", Some(rule_text), ResponseCode::ServFail, Vec::new(), 0);
            return reply(&query, ResponseCode::ServFail);
        }
    };
    let mut message = Message::from_vec(&response).ok()?;
    let records: Vec<AnswerRecord> = message.answers().iter().map(answer_record).collect();
    let plan = plan_answer(&route.policy, &qname, &records);
    // Open the addresses before the guest can use them.
    if !plan.learn.is_empty() {
        let now = boot_time_ns();
        let held_since = std::time::Instant::now();
        let Ok(mut guard) = tokio::time::timeout(ctx.settings.hold_timeout, ctx.state.lock()).await else {
            // Never release an answer whose addresses are not open yet.
            ctx.stats.hold_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(sandbox = %route.sandbox, name = %qname, "DNS: map write not done within the hold timeout; SERVFAIL");
            record(Verdict::Allowed, "hold_timeout", Some(rule_text), ResponseCode::ServFail, Vec::new(), 0);
            return reply(&query, ResponseCode::ServFail);
        };
        let (maps, learned) = &mut *guard;
        let table = learned.by_sandbox.entry(route.sandbox.clone()).or_default();
        for (ip, ttl) in &plan.learn {
            let until = now + ctx.settings.timing.open_seconds(*ttl) * 1_000_000_000;
            let existing = table.get(ip).filter(|l| l.policy_id == route.policy_id).map(|l| l.value);
            let value = learned_value(&route.policy, *ip, existing.as_ref(), rule, port, until);
            // Expiry moves in whole seconds: skip the syscall when the entry
            // already says the same to within one.
            let unchanged = existing.is_some_and(|e| {
                e.learned_port == value.learned_port && e.learned_until_ns + 1_000_000_000 > value.learned_until_ns
            });
            if !unchanged {
                if let Err(e) = maps.insert(route.policy_id, *ip, &value) {
                    tracing::warn!(sandbox = %route.sandbox, %ip, "learning an address: {e}");
                    record(Verdict::Allowed, "map_write_failed", Some(rule_text), ResponseCode::ServFail, Vec::new(), 0);
                    return reply(&query, ResponseCode::ServFail);
                }
            }
            let value = if unchanged { existing.unwrap_or(value) } else { value };
            let entry = table
                .entry(*ip)
                .or_insert_with(|| LearnedAddr { policy_id: route.policy_id, value, names: BTreeSet::new(), answered_ns: now });
            entry.policy_id = route.policy_id;
            entry.value = value;
            entry.answered_ns = now;
            entry.names.insert(qname.clone());
        }
        if ctx.settings.max_addresses_per_name > 0 {
            let current: Vec<IpAddr> = plan.learn.iter().map(|(ip, _)| *ip).collect();
            let guests = guest_addresses(&ctx.routes, &route.sandbox);
            let mut flows: Option<BTreeSet<(IpAddr, IpAddr)>> = None;
            let live = |ip: IpAddr| {
                let pairs = flows.get_or_insert_with(|| {
                    crate::dns::conntrack_pairs(&std::fs::read_to_string("/proc/net/nf_conntrack").unwrap_or_default())
                });
                guests.iter().any(|g| pairs.contains(&(*g, ip)))
            };
            let live = std::cell::RefCell::new(live);
            let evict = over_cap(table, &qname, &current, ctx.settings.max_addresses_per_name, |ip| (live.borrow_mut())(ip));
            for ip in evict {
                let Some(entry) = table.get_mut(&ip) else { continue };
                entry.names.remove(&qname);
                if entry.names.is_empty() {
                    let policy_id = entry.policy_id;
                    table.remove(&ip);
                    match static_exact(&route.policy, ip) {
                        Some(v) => {
                            let _ = maps.insert(policy_id, ip, &v);
                        }
                        None => maps.remove(policy_id, ip),
                    }
                    tracing::info!(sandbox = %route.sandbox, name = %qname, %ip, "DNS: address evicted (per-name cap)");
                }
            }
        }
        learned.version += 1;
        ctx.stats.record_hold(held_since.elapsed());
    }
    let stripped = plan.fates.iter().filter(|f| **f != RecordFate::Keep).count();
    if stripped > 0 {
        strip_answers(&mut message, &plan.fates);
        tracing::info!(sandbox = %route.sandbox, name = %qname, stripped, "DNS: stripped answer records (rebinding)");
    }
    ctx.stats.allowed.fetch_add(1, Ordering::Relaxed);
    ctx.stats.stripped.fetch_add(stripped as u64, Ordering::Relaxed);
    let answers: Vec<IpAddr> = records.iter().zip(&plan.fates).filter(|(_, f)| **f == RecordFate::Keep).filter_map(|(r, _)| match r { AnswerRecord::Address { ip, .. } => Some(*ip), _ => None }).collect();
    record(Verdict::Allowed, "policy", Some(rule_text), message.response_code(), answers, stripped);
    tracing::debug!(sandbox = %route.sandbox, name = %qname, %qtype, learned = plan.learn.len(), "DNS: answered");
    // Unchanged answers go back as the upstream sent them (id restored).
    let out = if stripped == 0 { response } else { message.to_vec().ok()? };
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => query.extensions().as_ref().map_or(512, |e| usize::from(e.max_payload().max(512))),
    };
    if out.len() > limit {
        // Too big for the guest's UDP: tell it to retry over TCP.
        return truncated(&message);
    }
    Some(out)
}

/// Removes from the answer section the records `fates` (one per answer, in
/// order) strip; the rest stay in their order.
pub(crate) fn strip_answers(message: &mut Message, fates: &[RecordFate]) {
    let kept: Vec<Record> = message
        .take_answers()
        .into_iter()
        .zip(fates)
        .filter(|(_, f)| **f == RecordFate::Keep)
        .map(|(r, _)| r)
        .collect();
    message.insert_answers(kept);
}

/// The empty, truncated (TC) form of `message`: the guest retries over TCP.
pub(crate) fn truncated(message: &Message) -> Option<Vec<u8>> {
    let mut truncated = Message::new();
    truncated
        .set_id(message.id())
        .set_message_type(MessageType::Response)
        .set_op_code(message.op_code())
        .set_recursion_desired(message.recursion_desired())
        .set_recursion_available(message.recursion_available())
        .set_response_code(message.response_code())
        .set_truncated(true);
    truncated.add_queries(message.queries().to_vec());
    truncated.to_vec().ok()
}

pub fn answer_record(r: &Record) -> AnswerRecord {
    let owner = r.name().to_ascii();
    match r.data() {
        RData::A(a) => AnswerRecord::Address { owner, ip: IpAddr::V4(a.0), ttl: r.ttl() },
        RData::AAAA(a) => AnswerRecord::Address { owner, ip: IpAddr::V6(a.0), ttl: r.ttl() },
        RData::CNAME(c) => AnswerRecord::Cname { owner, target: c.0.to_ascii() },
        _ => AnswerRecord::Other,
    }
}

/// One UDP socket per upstream family for all queries, with our own query
/// ids (guests' ids may collide), and TCP on truncation.
pub struct UpstreamClient {
    sockets: tokio::sync::OnceCell<UpstreamSocket>,
}

struct UpstreamSocket {
    socket: Arc<UdpSocket>,
    pending: Arc<Mutex<HashMap<u16, tokio::sync::oneshot::Sender<Vec<u8>>>>>,
    next_id: std::sync::atomic::AtomicU16,
}

impl Default for UpstreamClient {
    fn default() -> Self {
        UpstreamClient { sockets: tokio::sync::OnceCell::new() }
    }
}

impl UpstreamClient {
    async fn socket(&self, upstream: SocketAddr) -> std::io::Result<&UpstreamSocket> {
        self.sockets
            .get_or_try_init(|| async move {
                let bind: SocketAddr =
                    if upstream.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
                let socket = Arc::new(UdpSocket::bind(bind).await?);
                socket.connect(upstream).await?;
                let pending: Arc<Mutex<HashMap<u16, tokio::sync::oneshot::Sender<Vec<u8>>>>> = Arc::default();
                let (rx_socket, rx_pending) = (socket.clone(), pending.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65535];
                    loop {
                        let Ok(n) = rx_socket.recv(&mut buf).await else { continue };
                        if n < 12 {
                            continue;
                        }
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        let waiter = rx_pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        if let Some(tx) = waiter {
                            let _ = tx.send(buf[..n].to_vec());
                        }
                    }
                });
                Ok::<_, std::io::Error>(UpstreamSocket { socket, pending, next_id: std::sync::atomic::AtomicU16::new(rand_id()) })
            })
            .await
    }

    /// Forwards `query` (the guest's bytes; the answer comes back with the
    /// guest's id); on a truncated UDP answer, asks again over TCP.
    pub async fn forward(&self, upstream: SocketAddr, query: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
        if query.len() < 12 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "short query"));
        }
        let guest_id = [query[0], query[1]];
        let s = self.socket(upstream).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // An id not in flight (65536 ids; a full table waits for the timeout).
        let mut id = s.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut pending = s.pending.lock().unwrap_or_else(|p| p.into_inner());
            while pending.contains_key(&id) {
                id = s.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            pending.insert(id, tx);
        }
        let mut ours = query.to_vec();
        ours[..2].copy_from_slice(&id.to_be_bytes());
        s.socket.send(&ours).await?;
        let answered = tokio::time::timeout(timeout, rx).await;
        s.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let mut response = match answered {
            Ok(Ok(r)) => r,
            _ => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer over UDP")),
        };
        // TC bit: byte 2, bit 1.
        if response[2] & 0x02 != 0 {
            response = tokio::time::timeout(timeout, async {
                let mut stream = TcpStream::connect(upstream).await?;
                write_framed(&mut stream, query).await?;
                read_framed(&mut stream).await
            })
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer over TCP"))??;
        }
        response[..2].copy_from_slice(&guest_id);
        Ok(response)
    }
}

/// A start for upstream query ids that is not predictable across restarts.
fn rand_id() -> u16 {
    (boot_time_ns() ^ u64::from(std::process::id()).rotate_left(17)) as u16
}

/// Removes expired learned addresses from the tries (the classifier already
/// ignores them; this frees the entries), once a second.
pub async fn collect_expired(
    state: SharedLearned,
    snapshot: std::path::PathBuf,
    policies: impl Fn(&str) -> Option<Arc<CompiledPolicy>> + Send + 'static,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut written = u64::MAX;
    loop {
        tick.tick().await;
        let now = boot_time_ns();
        let mut guard = state.lock().await;
        let (maps, learned) = &mut *guard;
        let mut changed = false;
        for (sandbox, table) in learned.by_sandbox.iter_mut() {
            let policy = policies(sandbox);
            table.retain(|ip, l| {
                if l.value.learned_until_ns > now {
                    return true;
                }
                // Put back what the policy itself says at this exact
                // address, if it has an entry there; else drop the key.
                let exact = policy.as_ref().and_then(|p| static_exact(p, *ip));
                match exact {
                    Some(v) => {
                        let _ = maps.insert(l.policy_id, *ip, &v);
                    }
                    None => maps.remove(l.policy_id, *ip),
                }
                changed = true;
                false
            });
        }
        learned.by_sandbox.retain(|_, t| !t.is_empty());
        if changed {
            learned.version += 1;
        }
        if learned.version != written {
            match learned.write_snapshot(&snapshot) {
                Ok(()) => written = learned.version,
                Err(e) => tracing::warn!(path = %snapshot.display(), "writing the learned-address snapshot: {e}"),
            }
        }
    }
}

/// The sandbox's guest addresses (both families) from the routing table.
fn guest_addresses(routes: &Routes, sandbox: &str) -> Vec<IpAddr> {
    routes.read().unwrap_or_else(|p| p.into_inner()).iter().filter(|(_, r)| r.sandbox == sandbox).map(|(ip, _)| *ip).collect()
}

fn static_exact(policy: &CompiledPolicy, ip: IpAddr) -> Option<PolicyValue> {
    match ip {
        IpAddr::V4(a) => policy.v4.iter().find(|(n, len, _)| *len == 32 && *n == a).map(|(_, _, v)| *v),
        IpAddr::V6(a) => policy.v6.iter().find(|(n, len, _)| *len == 128 && *n == a).map(|(_, _, v)| *v),
    }
}
