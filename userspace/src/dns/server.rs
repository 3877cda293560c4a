//! The DNS proxy every guest reaches through nftables' redirect of port 53
//! (UDP and TCP, to any address). It screens each message (only standard
//! queries it parsed go on), decides the name by the sandbox's domain
//! rules, forwards allowed ones upstream re-encoded (UDP, TCP on
//! truncation), judges the answer's alias chain, writes the answer's
//! addresses into the sandbox's trie entries with their expiry, and only
//! then releases the answer. Queries in flight upstream and DNS-over-TCP
//! connections are capped per sandbox, so one guest cannot starve the
//! others. The decisions are in [`crate::dns`]; this is the I/O.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;

use super::cache::{AnswerCache, CacheSettings};
use super::learned::{guest_addresses, static_exact, LearnedStore};
use super::stats::DnsStats;
use super::upstream::{write_framed, UpstreamClient, UpstreamError};
use crate::util::clock::boot_time_ns;
use crate::util::conn_limit::{AtCap, ConnLimits, InFlight};
use crate::util::udp_batch::{self, ReceivedBatch};
use crate::dns::decide::{
    answer_changes_nothing, answers_query, checked, checked_name, conntrack_pairs, name_verdict, over_cap, plan_answer, planned_value, reencode, refusal, screen_query,
    AnswerRecord, ChainVerdict,
    LearnTiming, LearnedAddr, NameVerdict, RecordFate, Screened,
};
use crate::observe::record::{DnsDetail, FlowRecord, Verdict};
use sbx_net_common::rule_id;
use crate::sandbox::route::Routes;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS proxy: binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("DNS proxy: {0}")]
    Maps(#[from] crate::datapath::learned::LearnedMapsError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// An answer's addresses were not open within the hold timeout: the
    /// answer is not released.
    #[error("DNS proxy: the answer's map write did not finish within {0:?}")]
    HoldTimeout(Duration),
    #[error("DNS proxy: learning {ip}: {source}")]
    MapWrite { ip: IpAddr, source: crate::datapath::learned::LearnedMapsError },
}

impl DnsError {
    /// The flow record's reason for an answer this error held back.
    fn record_reason(&self) -> &'static str {
        match self {
            DnsError::HoldTimeout(_) => "hold_timeout",
            DnsError::MapWrite { .. } => "map_write_failed",
            DnsError::Bind { .. } | DnsError::Maps(_) | DnsError::Upstream(_) => "internal_error",
        }
    }
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
    /// Queries of one sandbox waiting for the upstream at once; past it,
    /// SERVFAIL (the shared pending table must not be one guest's).
    pub max_upstream_per_sandbox: usize,
    pub tcp: DnsTcpLimits,
    /// The answer cache's size ([`crate::dns::cache`]); 0 entries: off.
    pub cache: CacheSettings,
}

/// Default of [`DnsSettings::max_upstream_per_sandbox`].
pub const DEFAULT_MAX_UPSTREAM_PER_SANDBOX: usize = 256;

/// DNS over TCP, per connection and per sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsTcpLimits {
    /// Connections one sandbox may hold open at once; more are closed at
    /// once (with a reset).
    pub max_connections_per_sandbox: usize,
    /// How long a connection may wait for its next query to start (also
    /// the first one).
    pub idle_timeout: Duration,
    /// From a query's first byte to its last, and for writing its answer:
    /// one deadline, not renewed by each byte (a guest trickling bytes
    /// holds a connection no longer than this).
    pub query_timeout: Duration,
}

impl Default for DnsTcpLimits {
    fn default() -> Self {
        DnsTcpLimits { max_connections_per_sandbox: 32, idle_timeout: Duration::from_secs(10), query_timeout: Duration::from_secs(5) }
    }
}

/// Everything the serving tasks share.
pub struct DnsContext {
    pub settings: DnsSettings,
    pub stats: Arc<DnsStats>,
    pub routes: Routes,
    /// The tries and the learned table, changed together (the data plane
    /// also changes them while it switches a policy generation).
    pub learned: Arc<LearnedStore>,
    /// The shared upstream socket and the queries in flight on it (the
    /// HTTP(S) proxy resolves through it too).
    pub upstream: Arc<UpstreamClient>,
    /// The flow stream both proxies report their decisions to.
    pub flows: Arc<crate::observe::hub::FlowHub>,
    /// What each sandbox holds of the shared resources.
    pub slots: DnsSlots,
    /// The host's conntrack table, read once for all the answers that need it.
    pub conntrack: ConntrackReader,
    /// Queries and DNS-over-TCP connections being served.
    pub in_flight: crate::util::conn_limit::InFlight,
    /// Set when the data plane drains: TCP connections close between queries.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// The upstream's answers, kept for their TTL (shared by all sandboxes:
    /// it holds answers, each query is still decided by its own sandbox).
    pub cache: AnswerCache,
}

/// How old a conntrack read may be and still serve an answer's eviction
/// check: a connection opened in the last quarter second may be missed,
/// and its address evicted; the guest then resolves the name again.
const CONNTRACK_MAX_AGE: Duration = Duration::from_millis(250);

type ConntrackPairs = Arc<BTreeSet<(IpAddr, IpAddr)>>;

/// Reads `/proc/net/nf_conntrack` for the answers over their per-name cap:
/// at most one read at a time, shared by every answer that asks within
/// [`CONNTRACK_MAX_AGE`]. The table can be large, and a guest whose name's
/// answers rotate would otherwise start a full read with every answer.
pub struct ConntrackReader {
    last: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, ConntrackPairs)>>>,
    /// The table's text (the proc file; another source in tests).
    source: fn() -> String,
}

impl Default for ConntrackReader {
    fn default() -> Self {
        ConntrackReader { last: Arc::default(), source: || std::fs::read_to_string("/proc/net/nf_conntrack").unwrap_or_default() }
    }
}

impl ConntrackReader {
    /// The (source, destination) pairs of the host's tracked connections.
    pub async fn pairs(&self) -> ConntrackPairs {
        let mut last = self.last.clone().lock_owned().await;
        if let Some((_, pairs)) = last.as_ref().filter(|(at, _)| at.elapsed() < CONNTRACK_MAX_AGE) {
            return pairs.clone();
        }
        // The read runs in a task of its own that keeps the lock until the
        // result is stored: an answer that gives up waiting (hold timeout)
        // does not free the way for a second read of the same table.
        let source = self.source;
        let read = tokio::spawn(async move {
            let pairs: ConntrackPairs = Arc::new(tokio::task::spawn_blocking(move || conntrack_pairs(&source())).await.unwrap_or_default());
            *last = Some((tokio::time::Instant::now(), pairs.clone()));
            pairs
        });
        read.await.unwrap_or_default()
    }
}

/// Per-sandbox counts of the proxy's shared resources.
pub struct DnsSlots {
    /// Open DNS-over-TCP connections.
    pub tcp: Arc<ConnLimits>,
    /// Queries waiting for the upstream.
    pub upstream: Arc<ConnLimits>,
}

impl DnsSlots {
    /// The caps of `settings` (each at least 1: a cap of 0 would mean none).
    pub fn new(settings: &DnsSettings) -> DnsSlots {
        DnsSlots {
            tcp: ConnLimits::new(settings.tcp.max_connections_per_sandbox.max(1)),
            upstream: ConnLimits::new(settings.max_upstream_per_sandbox.max(1)),
        }
    }
}

/// The UDP socket's receive queue: every sandbox's queries wait in it, so it
/// holds a few sandboxes' full bursts (`dns_query_burst_per_sandbox`; a
/// small query takes ~1 KiB of queue) where the kernel's default 208 KiB
/// held about 200 queries.
const UDP_RECEIVE_QUEUE_BYTES: usize = 8 << 20;

/// Binds UDP and TCP on `port`, IPv4 and IPv6 (separate sockets: redirected
/// traffic arrives per family).
pub fn bind(port: u16) -> Result<(Vec<std::net::UdpSocket>, Vec<std::net::TcpListener>), DnsError> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for addr in crate::util::net::wildcard_addrs(port) {
        let err = |source| DnsError::Bind { addr, source };
        let socket = crate::util::net::bound_socket(addr, socket2::Type::DGRAM).map_err(err)?;
        crate::util::net::enlarge_receive_queue(&socket, UDP_RECEIVE_QUEUE_BYTES).map_err(err)?;
        udp.push(socket.into());
        tcp.push(crate::util::net::bound_socket(addr, socket2::Type::STREAM).map_err(err)?.into());
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
    let mut batch = ReceivedBatch::default();
    let mut answers: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(udp_batch::BATCH);
    // A drain aborts this loop, which takes effect at its next wait; under
    // load the socket is always ready, so the loop also stops itself at a
    // batch's end once the drain has begun. The drain waits for the loop to
    // end, then for the queries in flight (each holds a guard until its
    // answer is sent).
    while !*ctx.draining.borrow() {
        match socket.async_io(tokio::io::Interest::READABLE, || batch.receive(socket.as_fd())).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // An unconnected socket's errors are one-shot (a pending
                // ICMP error, ENOMEM): logged, and the loop lets others run.
                tracing::debug!("DNS UDP receive: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        }
        let _batch_in_flight = ctx.in_flight.enter();
        for (bytes, peer) in batch.datagrams() {
            let query = bytes.to_vec();
            let (query_ctx, guard) = (ctx.clone(), ctx.in_flight.enter());
            let reply: std::pin::Pin<Box<dyn std::future::Future<Output = Option<Vec<u8>>> + Send>> =
                Box::pin(async move { answer(&query_ctx, peer, &query, Transport::Udp).await });
            match poll_once(reply) {
                // Sent with the batch, under the batch's guard.
                Polled::Ready(Some(response)) => answers.push((response, peer)),
                Polled::Ready(None) | Polled::Panicked => {}
                Polled::Waiting(reply) => {
                    let socket = socket.clone();
                    tokio::spawn(async move {
                        let _in_flight = guard;
                        if let Some(response) = reply.await {
                            let _ = socket.send_to(&response, peer).await;
                        }
                    });
                }
            }
        }
        send_answers(&socket, &mut answers, &ctx.in_flight);
    }
}

/// Sends the answers ready in one batch with one system call; what the
/// socket cannot take now (its send queue full) is sent by a task of its
/// own, so the serving loop never waits on a send.
fn send_answers(socket: &Arc<UdpSocket>, answers: &mut Vec<(Vec<u8>, SocketAddr)>, in_flight: &InFlight) {
    if answers.is_empty() {
        return;
    }
    let sent = socket.try_io(tokio::io::Interest::WRITABLE, || udp_batch::send_batch(socket.as_fd(), answers)).unwrap_or(0);
    if sent == answers.len() {
        answers.clear();
        return;
    }
    let rest: Vec<_> = answers.drain(..).skip(sent).collect();
    let (socket, guard) = (socket.clone(), in_flight.enter());
    tokio::spawn(async move {
        let _in_flight = guard;
        for (response, peer) in rest {
            let _ = socket.send_to(&response, peer).await;
        }
    });
}

/// What one poll of a query's future gave.
enum Polled<F: std::future::Future> {
    Ready(F::Output),
    /// It has to wait (for the upstream, a lock): poll it again in a task.
    Waiting(F),
    /// It panicked: caught and logged, as in a task of its own.
    Panicked,
}

/// Polls `task` once here, on the serving loop. A cached, denied or
/// refused answer needs nothing from another task: answered at once, it
/// costs no spawn, no trip through the scheduler's queue and no second
/// poll (`bench dns`), and it is sent with the rest of its batch. A query
/// that waits is handed back to be spawned and polled again with its
/// task's waker, which replaces the no-op one of this poll (as the
/// `Future` contract requires of everything it waits on), so no wake-up is
/// lost. A panic is the query's alone: caught, logged, the loop goes on.
fn poll_once<F: std::future::Future + Unpin>(mut task: F) -> Polled<F> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| std::pin::Pin::new(&mut task).poll(&mut cx))) {
        Ok(std::task::Poll::Ready(output)) => Polled::Ready(output),
        Ok(std::task::Poll::Pending) => Polled::Waiting(task),
        Err(_) => {
            tracing::error!("DNS proxy: answering a query panicked; the query is dropped");
            Polled::Panicked
        }
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
    crate::util::conn_limit::accept_loop(listener, "DNS TCP", move |stream, peer| {
        let (ctx, guard) = (ctx.clone(), ctx.in_flight.enter());
        async move {
            let _in_flight = guard;
            serve_tcp_connection(stream, peer, &ctx).await
        }
    })
    .await
}

/// One DNS-over-TCP connection: several framed queries may come on it,
/// pipelined; each is answered in turn. Closed when the sandbox already
/// holds its cap of connections, when no query starts within the idle
/// timeout, or when one does not complete (or its answer is not taken)
/// within the query timeout.
async fn serve_tcp_connection(mut stream: TcpStream, peer: SocketAddr, ctx: &DnsContext) {
    let limits = ctx.settings.tcp;
    let ip = crate::util::net::canonical(peer.ip());
    let sandbox = ctx.routes.read().unwrap_or_else(|p| p.into_inner()).get(&ip).map(|r| r.sandbox.clone());
    // From no sandbox's address: nothing it asks would be answered.
    let Some(sandbox) = sandbox else { return };
    let _permit = match ctx.slots.tcp.try_acquire(&sandbox) {
        Ok(permit) => permit,
        Err(AtCap { first_of_burst: first }) => {
            ctx.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
            if first {
                tracing::warn!(%sandbox, cap = limits.max_connections_per_sandbox, "DNS TCP: the sandbox holds its cap of connections; closing new ones until one ends");
            }
            // A reset: the guest learns at once, and no FIN_WAIT is left here
            // (a zero linger never blocks the close).
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    let mut draining = ctx.draining.subscribe();
    let mut answered = false;
    loop {
        // A draining data plane closes idle connections between queries
        // (RFC 7766 lets a server close; the guest's next query opens a new
        // connection, which the new data plane accepts). Not before a
        // connection's first query, though: a guest that connects does so
        // to ask, and its query may already be here (or on its way) when
        // the drain begins — closing then lost it (`upgrade` under
        // `--stress`: "read length: unexpected end of file"). Bytes already
        // here are read first for the same reason.
        let first = tokio::select! {
            biased;
            read = tokio::time::timeout(limits.idle_timeout, stream.read_u8()) => match read {
                Ok(Ok(b)) => b,
                Ok(Err(_)) => return,
                Err(_) => {
                    ctx.stats.tcp_timeouts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            _ = draining.wait_for(|d| *d), if answered => return,
        };
        let rest = tokio::time::timeout(limits.query_timeout, async {
            let second = stream.read_u8().await?;
            let mut query = vec![0u8; usize::from(u16::from_be_bytes([first, second]))];
            stream.read_exact(&mut query).await?;
            Ok::<_, std::io::Error>(query)
        })
        .await;
        let query = match rest {
            Ok(Ok(query)) => query,
            Ok(Err(_)) => return,
            Err(_) => {
                ctx.stats.tcp_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%sandbox, %peer, "DNS TCP: a query did not arrive within {:?}; closing", limits.query_timeout);
                return;
            }
        };
        let Some(response) = answer(ctx, peer, &query, Transport::Tcp).await else { return };
        match tokio::time::timeout(limits.query_timeout, write_framed(&mut stream, &response)).await {
            Ok(Ok(())) => answered = true,
            Ok(Err(_)) => return,
            Err(_) => {
                ctx.stats.tcp_timeouts.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// The mnemonic dig prints (RFC 6895 names).
fn rcode_name(code: ResponseCode) -> crate::observe::record::Text {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::BADVERS => "BADVERS".into(),
        other => format!("RCODE{}", u16::from(other)).into(),
    }
}

/// The flow record of one query, completed on every way out.
struct QueryLog<'a> {
    ctx: &'a DnsContext,
    sandbox: &'a str,
    peer: SocketAddr,
    transport: Transport,
    query: String,
    qtype: crate::observe::record::Text,
}

impl QueryLog<'_> {
    fn record(&self, verdict: Verdict, reason: &'static str, rule: Option<String>, rcode: crate::observe::record::Text, answers: Vec<IpAddr>, stripped: usize) {
        let protocol = if self.transport == Transport::Udp { "udp" } else { "tcp" };
        let mut r = FlowRecord::new(self.sandbox, "dns", "dns_query", protocol, verdict, reason).with_endpoints(Some(self.peer), None);
        r.dst_port = 53;
        r.rule = rule;
        r.dns = Some(DnsDetail { query: self.query.clone(), qtype: self.qtype.clone(), rcode, answers, stripped });
        self.ctx.flows.publish(r);
    }
}

/// The whole life of one message; `None` sends nothing.
async fn answer(ctx: &DnsContext, peer_addr: SocketAddr, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let screened = screen_query(bytes);
    let peer = crate::util::net::canonical(peer_addr.ip());
    let route = ctx.routes.read().unwrap_or_else(|p| p.into_inner()).get(&peer).cloned();
    let Some(route) = route else {
        // A sandbox being deleted can still send a while; budgeted as one.
        if ctx.flows.log_lines.admits("(no sandbox)") {
            tracing::info!(%peer, "DNS query from no sandbox's address: refused");
        }
        return match screened {
            Screened::Query(q) => refusal(&q, ResponseCode::Refused),
            Screened::Refused { reply, .. } => reply,
        };
    };
    let q = match screened {
        Screened::Query(q) => q,
        Screened::Refused { reply, rcode, reason, query, qtype } => {
            // Never forwarded: the proxy passes on only what it parsed.
            ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            if ctx.flows.log_lines.admits(&route.sandbox) {
                tracing::info!(sandbox = %route.sandbox, name = %query, %qtype, reason, "DNS: message refused without asking upstream");
            }
            let log = QueryLog { ctx, sandbox: &route.sandbox, peer: peer_addr, transport, query, qtype: qtype.into() };
            log.record(Verdict::Denied, reason, None, rcode.map_or("NOREPLY".into(), rcode_name), Vec::new(), 0);
            return reply;
        }
    };
    let qname = q.rule_name.clone();
    let qtype = q.qtype;
    let log = QueryLog { ctx, sandbox: &route.sandbox, peer: peer_addr, transport, query: qname.clone(), qtype: <&'static str>::from(qtype).into() };
    let denied_code = if ctx.settings.refuse_denied { ResponseCode::Refused } else { ResponseCode::NXDomain };
    let (rule, audited) = match name_verdict(&route.policy, &qname) {
        NameVerdict::Denied { rule_id } => {
            let rule = route.policy.describe_rule(rule_id);
            if ctx.flows.log_lines.admits(&route.sandbox) {
                tracing::info!(sandbox = %route.sandbox, name = %qname, %qtype, %rule, "DNS: denied");
            }
            ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
            log.record(Verdict::Denied, "policy", Some(rule), rcode_name(denied_code), Vec::new(), 0);
            return refusal(&q, denied_code);
        }
        NameVerdict::Allowed { rule_id, .. } => (rule_id, None),
        // Only audit-mode rules deny it: resolved and recorded as audit.
        NameVerdict::Audit { rule_id, learn } => (learn.map_or(rule_id::DEFAULT, |(r, _)| r), Some(rule_id)),
    };
    let rule_text = route.policy.describe_rule(rule);
    // What the query's record says when no answer comes back.
    let (query_verdict, query_rule) = match audited {
        Some(id) => (Verdict::Audit, route.policy.describe_rule(id)),
        None => (Verdict::Allowed, rule_text.clone()),
    };
    let servfail = |reason: &'static str| {
        log.record(query_verdict, reason, Some(query_rule.clone()), rcode_name(ResponseCode::ServFail), Vec::new(), 0);
        refusal(&q, ResponseCode::ServFail)
    };
    let Some(upstream) = ctx.settings.upstream else {
        ctx.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
        return servfail("no_upstream");
    };
    let Some(upstream_query) = reencode(&q) else { return servfail("reencode_failed") };
    // A cached answer stands for the upstream's: everything after (the
    // checks, the alias chain, the strip, the map write before release) is
    // the same as for a fresh one. Denied names never got this far.
    let cached = ctx.cache.get(&upstream_query, boot_time_ns());
    let from_cache = cached.is_some();
    if ctx.cache.enabled() {
        let counter = if from_cache { &ctx.stats.cache_hits } else { &ctx.stats.cache_misses };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    let response = if let Some(cached) = cached {
        cached
    } else {
        let permit = match ctx.slots.upstream.try_acquire(&route.sandbox) {
            Ok(permit) => permit,
            Err(AtCap { first_of_burst: first }) => {
                ctx.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                ctx.stats.upstream_busy.fetch_add(1, Ordering::Relaxed);
                if first {
                    tracing::warn!(sandbox = %route.sandbox, cap = ctx.settings.max_upstream_per_sandbox, "DNS: the sandbox has its cap of queries upstream; SERVFAIL until one ends");
                }
                return servfail("upstream_busy");
            }
        };
        let forwarded = ctx.upstream.forward(upstream, &upstream_query, ctx.settings.upstream_timeout).await;
        drop(permit);
        match forwarded {
            Ok(r) => r,
            Err(e) => {
                ctx.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                if let UpstreamError::Busy { .. } = e {
                    ctx.stats.upstream_busy.fetch_add(1, Ordering::Relaxed);
                    return servfail("upstream_busy");
                }
                // A guest chooses which names time out upstream: budgeted too.
                if ctx.flows.log_lines.admits(&route.sandbox) {
                    tracing::warn!(sandbox = %route.sandbox, name = %qname, %upstream, "{e}");
                }
                return servfail("upstream_failed");
            }
        }
    };
    let Ok(mut message) = Message::from_vec(&response) else {
        ctx.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
        return servfail("upstream_malformed");
    };
    if !answers_query(&q, &message) {
        ctx.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
        // A guest chooses the names (and so the upstream answers): budgeted too.
        if ctx.flows.log_lines.admits(&route.sandbox) {
            tracing::warn!(sandbox = %route.sandbox, name = %qname, "DNS upstream answered another question; SERVFAIL");
        }
        return servfail("upstream_mismatch");
    }
    if !from_cache {
        // Stored only when well-formed, matched (checked just above),
        // not truncated, NOERROR or NXDOMAIN ([`AnswerCache::put`]).
        ctx.cache.put(&upstream_query, &response, boot_time_ns());
    }
    let records: Vec<AnswerRecord> = message.answers().iter().map(answer_record).collect();
    let plan = plan_answer(&route.policy, &qname, &records);
    // The rule and port addresses are learned under, and the record.
    let (learn_rule, port, verdict, reason, record_rule) = match &plan.verdict {
        ChainVerdict::Allowed { port, .. } => (rule, *port, Verdict::Allowed, "policy", rule_text.clone()),
        ChainVerdict::Audit { name, rule_id, learn } => {
            let would_deny = route.policy.describe_rule(*rule_id);
            if ctx.flows.log_lines.admits(&route.sandbox) {
                tracing::info!(sandbox = %route.sandbox, name = %qname, denied = %name, rule = %would_deny, "DNS: audit mode, released what would be denied");
            }
            let (learn_rule, port) = learn.unwrap_or((rule_id::DEFAULT, None));
            (learn_rule, port, Verdict::Audit, "audit", would_deny)
        }
        ChainVerdict::Denied { name, rule_id } => {
            // As the guest would have been answered asking for that name.
            let rule = route.policy.describe_rule(*rule_id);
            if ctx.flows.log_lines.admits(&route.sandbox) {
                tracing::info!(sandbox = %route.sandbox, name = %qname, alias = %name, %rule, "DNS: the answer's alias chain reaches a denied name; refused");
            }
            ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
            ctx.stats.alias_denied.fetch_add(1, Ordering::Relaxed);
            log.record(Verdict::Denied, "alias_denied", Some(rule), rcode_name(denied_code), Vec::new(), 0);
            return refusal(&q, denied_code);
        }
        ChainVerdict::Invalid { name, reason } => {
            if ctx.flows.log_lines.admits(&route.sandbox) {
                tracing::info!(sandbox = %route.sandbox, name = %qname, alias = %name, reason, "DNS: the answer's alias chain cannot be judged; refused");
            }
            ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
            ctx.stats.alias_denied.fetch_add(1, Ordering::Relaxed);
            log.record(Verdict::Denied, "alias_invalid", None, rcode_name(ResponseCode::Refused), Vec::new(), 0);
            return refusal(&q, ResponseCode::Refused);
        }
    };
    // Open the addresses before the guest can use them.
    if !plan.learn.is_empty() {
        if let Err(e) = learn(ctx, &route, &qname, &plan.learn, learn_rule, port).await {
            return servfail(e.record_reason());
        }
    }
    let stripped = plan.fates.iter().filter(|f| **f != RecordFate::Keep).count();
    if stripped > 0 {
        let kept: Vec<Record> = message
            .take_answers()
            .into_iter()
            .zip(&plan.fates)
            .filter(|(_, f)| **f == RecordFate::Keep)
            .map(|(r, _)| r)
            .collect();
        message.insert_answers(kept);
        if ctx.flows.log_lines.admits(&route.sandbox) {
            tracing::info!(sandbox = %route.sandbox, name = %qname, stripped, "DNS: stripped answer records (rebinding, or not on the alias chain)");
        }
    }
    if verdict == Verdict::Audit {
        ctx.stats.audit.fetch_add(1, Ordering::Relaxed);
    } else {
        ctx.stats.allowed.fetch_add(1, Ordering::Relaxed);
    }
    ctx.stats.stripped.fetch_add(stripped as u64, Ordering::Relaxed);
    let answers: Vec<IpAddr> = records.iter().zip(&plan.fates).filter(|(_, f)| **f == RecordFate::Keep).filter_map(|(r, _)| match r { AnswerRecord::Address { ip, .. } => Some(*ip), _ => None }).collect();
    log.record(verdict, reason, Some(record_rule), rcode_name(message.response_code()), answers, stripped);
    tracing::debug!(sandbox = %route.sandbox, name = %qname, %qtype, learned = plan.learn.len(), "DNS: answered");
    // Unchanged answers go back as the upstream sent them (with the guest's
    // id: the query sent upstream carried it).
    let out = if stripped == 0 { response } else { message.to_vec().ok()? };
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => q.edns.map_or(512, |e| usize::from(e.max_payload.max(512))),
    };
    if out.len() > limit {
        // Too big for the guest's UDP: tell it to retry over TCP.
        let mut truncated = Message::new();
        truncated
            .set_id(q.id)
            .set_message_type(MessageType::Response)
            .set_op_code(message.op_code())
            .set_recursion_desired(message.recursion_desired())
            .set_recursion_available(message.recursion_available())
            .set_response_code(message.response_code())
            .set_truncated(true);
        truncated.add_queries(message.queries().to_vec());
        return truncated.to_vec().ok();
    }
    Some(out)
}

/// Writes an allowed answer's addresses into the sandbox's trie entries
/// (and the learned table) under the store's writer lock — unless the
/// answer changes nothing learned, which is checked on the read lock
/// first; Err when the answer must not be released. When the answer puts the name over its
/// cap, conntrack is read first, on a blocking thread and before the lock;
/// the whole wait (conntrack, lock) is bounded by the hold timeout.
async fn learn(ctx: &DnsContext, route: &crate::sandbox::route::Route, qname: &str, addresses: &[(IpAddr, u32)], rule: u32, port: Option<u16>) -> Result<(), DnsError> {
    let now = boot_time_ns();
    let held_since = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + ctx.settings.hold_timeout;
    let held_too_long = || {
        // Never release an answer whose addresses are not open yet.
        ctx.stats.hold_timeouts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(sandbox = %route.sandbox, name = %qname, "DNS: map write not done within the hold timeout; SERVFAIL");
        DnsError::HoldTimeout(ctx.settings.hold_timeout)
    };
    let cap = ctx.settings.max_addresses_per_name;
    let untils: Vec<(IpAddr, u64)> = addresses.iter().map(|(ip, ttl)| (*ip, now + ctx.settings.timing.open_seconds(*ttl) * 1_000_000_000)).collect();
    // A name asked again changes nothing: released on the read lock. Its
    // entries are in place in the tries (the table holds an entry only
    // while its trie entry is written) and open past the answer's release
    // (checked); one removed after it — swept once expired, forgotten,
    // evicted by the cap — is as for an answer that took the writer lock.
    let nothing = ctx.learned.read_with(|learned| answer_changes_nothing(learned.by_sandbox.get(&route.sandbox), &route.policy, route.policy_id, qname, &untils, rule, port, cap, now));
    if nothing {
        ctx.stats.record_hold(held_since.elapsed());
        return Ok(());
    }
    let current: Vec<IpAddr> = addresses.iter().map(|(ip, _)| *ip).collect();
    let live_now = || async {
        let guests = guest_addresses(&ctx.routes, &route.sandbox);
        tokio::time::timeout_at(deadline, live_destinations(&ctx.conntrack, &guests)).await.map_err(|_| held_too_long())
    };
    // conntrack is read outside the writer lock, when the name looks over
    // its cap on the read lock...
    let mut live = if cap > 0 && ctx.learned.exceeds_cap(&route.sandbox, qname, &current, cap) { Some(live_now().await?) } else { None };
    let mut change = loop {
        let Ok(change) = tokio::time::timeout_at(deadline, ctx.learned.change()).await else { return Err(held_too_long()) };
        if cap == 0 || live.is_some() {
            break change;
        }
        let over = change.table().by_sandbox.get(&route.sandbox).is_some_and(|t| crate::dns::decide::exceeds_cap(t, qname, &current, cap));
        if !over {
            break change;
        }
        // ...and again when another answer took the name past its cap
        // between that look and the writer lock (at most once: `live` is
        // then known), so the cap holds with every answer.
        drop(change);
        live = Some(live_now().await?);
    };
    // Each address's value, and whether the trie must be written (no other
    // change runs while the writer lock is held).
    let planned: Vec<(IpAddr, sbx_net_common::PolicyValue, bool)> = {
        let learned = change.table();
        let table = learned.by_sandbox.get(&route.sandbox);
        untils
            .iter()
            .map(|(ip, until)| {
                let (value, write) = planned_value(&route.policy, route.policy_id, table.and_then(|t| t.get(ip)), *ip, rule, port, *until);
                (*ip, value, write)
            })
            .collect()
    };
    // The tries, under the writer lock only (readers go on)...
    let mut failed = None;
    let mut written = 0;
    for (ip, value, write) in &planned {
        if *write {
            if let Err(source) = change.maps().insert(route.policy_id, *ip, value) {
                tracing::warn!(sandbox = %route.sandbox, %ip, "learning an address: {source}");
                failed = Some(DnsError::MapWrite { ip: *ip, source });
                break;
            }
        }
        written += 1;
    }
    // ...then the table, for every address whose trie entry is in place
    // (also when a later one failed: the sweep must find them).
    let (maps, mut learned) = change.parts();
    let table = learned.by_sandbox.entry(route.sandbox.clone()).or_default();
    for (ip, value, _) in &planned[..written] {
        let entry = table.entry(*ip).or_insert_with(|| LearnedAddr { policy_id: route.policy_id, value: *value, names: BTreeSet::new(), answered_ns: now });
        entry.policy_id = route.policy_id;
        entry.value = *value;
        entry.answered_ns = now;
        entry.names.insert(qname.to_string());
    }
    if let Some(e) = failed {
        learned.version += 1;
        return Err(e);
    }
    if cap > 0 {
        // Without a conntrack read the name is within its cap (checked
        // under the writer lock above): nothing is over it to forget.
        let evict = over_cap(table, qname, &current, cap, |ip| live.as_ref().is_none_or(|l| l.contains(&ip)));
        for ip in evict {
            let Some(entry) = table.get_mut(&ip) else { continue };
            entry.names.remove(qname);
            if entry.names.is_empty() {
                let policy_id = entry.policy_id;
                table.remove(&ip);
                // Rare (a name past its cap): the trie is written with the
                // table's write lock held, to keep the two together.
                match static_exact(&route.policy, ip) {
                    Some(v) => maps.insert_or_count_failure(policy_id, ip, &v),
                    None => maps.remove(policy_id, ip),
                }
                tracing::info!(sandbox = %route.sandbox, name = %qname, %ip, "DNS: address evicted (per-name cap)");
            }
        }
    }
    learned.version += 1;
    ctx.stats.record_hold(held_since.elapsed());
    Ok(())
}

/// The destinations `guests` have connections to, from the host's
/// conntrack table (unreadable: none).
async fn live_destinations(conntrack: &ConntrackReader, guests: &[IpAddr]) -> BTreeSet<IpAddr> {
    conntrack.pairs().await.iter().filter(|(src, _)| guests.contains(src)).map(|(_, dst)| *dst).collect()
}

/// The DNAME record type (RFC 6672), which the DNS library reads as
/// unknown data.
const DNAME: u16 = 39;

pub fn answer_record(r: &Record) -> AnswerRecord {
    let owner = checked(r.name());
    match r.data() {
        RData::A(a) => AnswerRecord::Address { owner, ip: IpAddr::V4(a.0), ttl: r.ttl() },
        RData::AAAA(a) => AnswerRecord::Address { owner, ip: IpAddr::V6(a.0), ttl: r.ttl() },
        RData::CNAME(c) => AnswerRecord::Cname { owner, target: checked(&c.0) },
        RData::Unknown { code, rdata } if *code == RecordType::Unknown(DNAME) => {
            AnswerRecord::Dname { owner, target: dname_target(rdata.anything()) }
        }
        _ => AnswerRecord::Other,
    }
}

/// A DNAME's target from its RDATA, which must not be compressed (RFC 6672
/// §2.5); anything else is a name no rule can judge.
fn dname_target(rdata: &[u8]) -> crate::dns::decide::CheckedName {
    let mut labels: Vec<&[u8]> = Vec::new();
    let mut at = 0;
    loop {
        let Some(&len) = rdata.get(at) else { return Err(format!("DNAME target cut short ({} bytes)", rdata.len())) };
        if len == 0 {
            break;
        }
        let label = (len <= 63).then(|| rdata.get(at + 1..at + 1 + usize::from(len))).flatten();
        let Some(label) = label else { return Err("DNAME target compressed or cut short".to_string()) };
        labels.push(label);
        at += 1 + usize::from(len);
    }
    checked_name(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    static CONNTRACK_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    fn slow_conntrack() -> String {
        CONNTRACK_READS.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        "ipv4     2 tcp      6 431999 ESTABLISHED src=10.200.0.2 dst=198.51.100.7 sport=40000 dport=443 src=198.51.100.7 dst=10.200.0.2 sport=443 dport=40000 [ASSURED] mark=0 zone=0 use=2\n".into()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conntrack_is_read_once_for_answers_that_ask_together_even_when_they_give_up() {
        let reader = Arc::new(ConntrackReader { last: Arc::default(), source: slow_conntrack });
        // The first asker gives up at once; the read goes on and is shared.
        let gave_up = tokio::time::timeout(Duration::from_millis(1), reader.pairs()).await;
        assert!(gave_up.is_err());
        let askers: Vec<_> = (0..16).map(|_| { let r = reader.clone(); tokio::spawn(async move { r.pairs().await }) }).collect();
        for asker in askers {
            let pairs = asker.await.unwrap();
            assert!(pairs.contains(&("10.200.0.2".parse().unwrap(), "198.51.100.7".parse().unwrap())), "{pairs:?}");
        }
        assert_eq!(CONNTRACK_READS.load(Ordering::SeqCst), 1, "one read served every answer that asked within its age");
        let live = live_destinations(&reader, &["10.200.0.2".parse().unwrap()]).await;
        assert_eq!(live.into_iter().collect::<Vec<_>>(), ["198.51.100.7".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_query_answered_at_once_is_not_spawned_and_one_that_waits_finishes_in_its_task() {
        let at_once: std::pin::Pin<Box<dyn std::future::Future<Output = u32> + Send>> = Box::pin(async { 1 });
        assert!(matches!(poll_once(at_once), Polled::Ready(1)), "answered in the first poll");

        // Waits on a channel whose sender fires only after the no-op poll:
        // the spawned task's own waker must be the one woken.
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let waits: std::pin::Pin<Box<dyn std::future::Future<Output = u32> + Send>> = Box::pin(async move { rx.await.unwrap() + 1 });
        let Polled::Waiting(waiting) = poll_once(waits) else { panic!("waits for the channel") };
        let task = tokio::spawn(waiting);
        tx.send(10).unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), task).await.expect("woken").unwrap(), 11);

        let panics: std::pin::Pin<Box<dyn std::future::Future<Output = u32> + Send>> = Box::pin(async { panic!("a query's own bug") });
        assert!(matches!(poll_once(panics), Polled::Panicked), "caught, the serving loop goes on");
    }

    #[test]
    fn dname_records_are_read_and_their_targets_checked() {
        let name = |labels: &[&[u8]]| -> Vec<u8> { labels.iter().flat_map(|l| [&[l.len() as u8][..], l].concat()).chain([0]).collect() };
        assert_eq!(dname_target(&name(&[b"Denied", b"TEST"])), Ok("denied.test".into()));
        assert!(dname_target(&name(&[b"x.y", b"test"])).is_err());
        assert!(dname_target(&[0xc0, 12]).is_err(), "compressed");
        assert!(dname_target(&[5, b'a']).is_err(), "cut short");
        // A whole answer: DNAME, as the library reads it.
        let mut m = Message::new();
        m.set_message_type(MessageType::Response);
        let rdata = hickory_proto::rr::rdata::NULL::with(name(&[b"denied", b"test"]));
        let record = Record::from_rdata(hickory_proto::rr::Name::from_ascii("dn.allowed.test.").unwrap(), 60, RData::Unknown { code: RecordType::Unknown(DNAME), rdata });
        m.add_answer(record);
        let parsed = Message::from_vec(&m.to_vec().unwrap()).unwrap();
        assert_eq!(answer_record(&parsed.answers()[0]), AnswerRecord::Dname { owner: Ok("dn.allowed.test".into()), target: Ok("denied.test".into()) });
    }
}
