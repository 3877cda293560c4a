//! The daemon's flow stream: one hub merging the datapath's ring-buffer
//! events with the DNS and proxy decisions, a bounded history, live
//! followers, the audit log (every deny and every credential injection),
//! and the counters `/metrics` exports. Nothing is dropped silently: events
//! the ring buffer could not take, records that fell out of the history and
//! records a slow follower missed are all counted.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::datapath::events::AnyFlowKey;
use crate::util::clock::unix_now_ns;

use super::audit::{suppression_record, Admit, AuditBudgets, AuditCounters, AuditLog, AuditWriter};
use super::record::{FlowRecord, Verdict};

type Labels = Vec<(String, String)>;

/// Where and how much to keep, as plain data.
#[derive(Clone, Debug)]
pub struct FlowLogSettings {
    /// Records kept in memory for `inspect --last`.
    pub history: usize,
    /// The audit log (JSONL); rotated to `.1`, `.2`, ... past `audit_max_bytes`.
    pub audit_path: PathBuf,
    pub audit_max_bytes: u64,
    /// Rotated files kept besides the live one.
    pub audit_keep: usize,
    /// Audit lines one sandbox may write per second on average, and in a
    /// burst: past them its lines are counted, not written, so a flood from
    /// one guest cannot rotate every tenant's evidence out of the log.
    pub audit_lines_per_second: u32,
    pub audit_burst: u32,
}

/// Loss counters, sent to `inspect` clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    /// Datapath events the ring buffer had no room for (kernel counter).
    pub ring_buffer: u64,
    /// Records that fell out of the bounded history.
    pub history_evicted: u64,
    /// Live records this follower was too slow to receive.
    #[serde(default)]
    pub follower_lagged: u64,
}

impl Lost {
    pub fn any(&self) -> bool {
        self.ring_buffer + self.history_evicted + self.follower_lagged > 0
    }
}

/// One line of the `inspect` stream from the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine {
    Flow(Box<FlowRecord>),
    Lost(Lost),
    /// The history has been sent (a follower then gets live records).
    EndOfHistory,
}

/// Labels of [`FlowMetrics::flows`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub sandbox: String,
    pub verdict: &'static str,
}

/// Buckets of [`FlowMetrics::proxy_connect_seconds`]: 1 ms .. 10 s (the
/// decision alone is microseconds; a resolution or a slow upstream, seconds).
pub const PROXY_CONNECT_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How a proxied connection's upstream connect ended: the `outcome` label
/// of [`FlowMetrics::proxy_connect_seconds`] (two values, never more).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Connected to one of the allowed addresses.
    Ok,
    /// Every allowed address refused, was unreachable or timed out.
    Failed,
}

/// The label set of [`ConnectOutcome`].
type OutcomeLabel = [(&'static str, &'static str); 1];

/// Connect times by [`ConnectOutcome`], each with [`PROXY_CONNECT_BUCKETS`].
pub type ConnectHistograms = Family<OutcomeLabel, Histogram, fn() -> Histogram>;

impl ConnectOutcome {
    fn label(self) -> OutcomeLabel {
        match self {
            ConnectOutcome::Ok => [("outcome", "ok")],
            ConnectOutcome::Failed => [("outcome", "failed")],
        }
    }
}

fn proxy_connect_histogram() -> Histogram {
    Histogram::new(PROXY_CONNECT_BUCKETS)
}

/// Counters of the flow stream for `/metrics` (shared handles: the hub
/// and the proxies count, the registry reads).
#[derive(Clone)]
pub struct FlowMetrics {
    /// Datapath flows started, by sandbox and verdict; a deleted sandbox's
    /// series go with it ([`FlowHub::forget_sandbox`]).
    pub flows: Family<FlowLabels, Counter>,
    /// Proxy decisions by outcome (allowed, denied, misdirected, upstream_failed).
    pub proxy_requests: Family<Labels, Counter>,
    pub credentials_injected: Counter,
    pub credential_failures: Counter,
    /// Secrets (or encodings of them) cut out of responses to guests.
    pub secret_redactions: Counter,
    pub audit_records: Counter,
    pub audit_write_failures: Counter,
    /// Audit lines not written because their sandbox was over its budget.
    pub audit_suppressed: Counter,
    /// Audit lines not written because the writer's queue was full (a
    /// publisher never waits for the disk).
    pub audit_dropped: Counter,
    /// How long the proxy took from a connection's first bytes to its
    /// upstream connection: the decision, any name resolution and the TCP
    /// connect (what the proxy adds before the guest's bytes flow), by
    /// outcome: a failed connect is observed too, at the time it took to
    /// fail, so a degrading upstream shows in the quantiles instead of
    /// leaving them (see [`FlowMetrics::observe_proxy_connect`]).
    pub proxy_connect_seconds: ConnectHistograms,
}

impl Default for FlowMetrics {
    fn default() -> Self {
        FlowMetrics {
            flows: Family::default(),
            proxy_requests: Family::default(),
            credentials_injected: Counter::default(),
            credential_failures: Counter::default(),
            secret_redactions: Counter::default(),
            audit_records: Counter::default(),
            audit_write_failures: Counter::default(),
            audit_suppressed: Counter::default(),
            audit_dropped: Counter::default(),
            proxy_connect_seconds: Family::new_with_constructor(proxy_connect_histogram),
        }
    }
}

impl FlowMetrics {
    /// One proxied connection's time to its upstream connect (or to the
    /// last address failing).
    pub fn observe_proxy_connect(&self, outcome: ConnectOutcome, seconds: f64) {
        self.proxy_connect_seconds.get_or_create(&outcome.label()).observe(seconds);
    }

    /// Registers the flow stream's, the proxies' and the audit log's families.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("flows", "Flows the datapath saw start, by sandbox and verdict", self.flows.clone());
        registry.register("proxy_requests", "Proxy decisions (connections and HTTP requests) by outcome", self.proxy_requests.clone());
        registry.register("credentials_injected", "Requests a credential was injected into", self.credentials_injected.clone());
        registry.register("secret_redactions", "Secrets (or encodings of them) cut out of responses from credential hosts", self.secret_redactions.clone());
        registry.register("credential_failures", "Requests to a credential host sent without the credential (secret unavailable)", self.credential_failures.clone());
        registry.register("audit_records", "Records written to the audit log", self.audit_records.clone());
        registry.register("audit_write_failures", "Audit records that could not be written", self.audit_write_failures.clone());
        registry.register("audit_suppressed", "Audit records not written: their sandbox was over its audit budget", self.audit_suppressed.clone());
        registry.register("audit_dropped", "Audit records not written: the audit writer's queue was full", self.audit_dropped.clone());
        registry.register(
            "proxy_connect_seconds",
            "Time from a proxied connection's first bytes to its upstream connection (decision, name resolution, TCP connect), by outcome: ok, or failed (every allowed address refused, unreachable or timed out; observed at the time it took to fail)",
            self.proxy_connect_seconds.clone(),
        );
    }
}

/// A stored record, with the flow-table key of a datapath flow (to show the
/// flow's totals so far when the history is read).
type Stored = (Arc<FlowRecord>, Option<AnyFlowKey>);

struct History {
    records: VecDeque<Stored>,
    capacity: usize,
    next_seq: u64,
    evicted: u64,
}

pub struct FlowHub {
    history: Mutex<History>,
    live: broadcast::Sender<Arc<FlowRecord>>,
    /// Each sandbox's audit budget, checked by the publisher: a flood is
    /// suppressed before it reaches the writer's queue.
    audit_budgets: Mutex<AuditBudgets>,
    /// The audit log's writer thread and its bounded queue.
    audit: AuditWriter,
    /// The kernel's lost-event counter, as last read by the ring reader.
    pub ring_lost: AtomicU64,
    pub metrics: FlowMetrics,
    /// `metrics.proxy_requests`' counter of each outcome counted so far: a
    /// request counts without building the family's label set (three
    /// allocations) and hashing it.
    proxy_outcomes: std::sync::RwLock<std::collections::HashMap<&'static str, Counter>>,
    /// Each sandbox's budget of the log lines its decisions write (a
    /// denial, a refusal), shared by the DNS proxy and the HTTP(S) proxy.
    pub log_lines: super::audit::LogBudget,
}

/// Buffer of live records per follower before it counts as lagging.
const FOLLOWER_BUFFER: usize = 8192;
/// How often an idle follower looks for new records (and whether its
/// client is still there): the latency `inspect --follow` adds at most.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// Audit jobs (a record, with its suppression notice) waiting for the
/// writer thread at most: a burst of that many denials is absorbed while
/// the disk is slow; past it lines are dropped and counted.
const AUDIT_QUEUE_JOBS: usize = 16_384;
/// How long a caller waits for the audit writer to catch up (a slow or
/// hung disk must not hold the control thread or a client forever).
const AUDIT_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl FlowHub {
    /// A hub whose audit log is written by a thread of its own (started
    /// here, ended when the hub goes).
    pub fn new(settings: &FlowLogSettings) -> FlowHub {
        let metrics = FlowMetrics::default();
        let counters = AuditCounters { written: metrics.audit_records.clone(), write_failures: metrics.audit_write_failures.clone(), dropped: metrics.audit_dropped.clone() };
        let log = AuditLog::new(&settings.audit_path, settings.audit_max_bytes, settings.audit_keep);
        FlowHub {
            history: Mutex::new(History { records: VecDeque::new(), capacity: settings.history.max(1), next_seq: 1, evicted: 0 }),
            live: broadcast::channel(FOLLOWER_BUFFER).0,
            audit_budgets: Mutex::new(AuditBudgets::new(settings.audit_lines_per_second, settings.audit_burst)),
            audit: AuditWriter::start(log, AUDIT_QUEUE_JOBS, counters),
            ring_lost: AtomicU64::new(0),
            metrics,
            proxy_outcomes: Default::default(),
            log_lines: super::audit::LogBudget::new(),
        }
    }

    /// Stamps (time, seq), counts, audits and stores a record.
    pub fn publish(&self, record: FlowRecord) {
        self.publish_flow(record, None);
    }

    /// [`FlowHub::publish`] for a datapath record whose flow is in the
    /// flow table under `key`.
    pub fn publish_flow(&self, mut record: FlowRecord, key: Option<AnyFlowKey>) {
        if record.time_unix_ns == 0 {
            record.time_unix_ns = unix_now_ns();
        }
        if record.time.is_empty() {
            record.time = crate::observe::record::rfc3339(record.time_unix_ns);
        }
        if record.source == "datapath" && record.event == "new_flow" {
            self.metrics.flows.get_or_create(&FlowLabels { sandbox: record.sandbox.clone(), verdict: record.verdict.as_str() }).inc();
        }
        if let Some(c) = &record.credential {
            if record.event == "secret_redacted" {
                // The request's own record counted the injection.
                self.metrics.secret_redactions.inc_by(c.redactions);
            } else if c.injected {
                self.metrics.credentials_injected.inc();
            } else if c.failure.is_some() {
                self.metrics.credential_failures.inc();
            }
        }
        let record = {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            record.seq = h.next_seq;
            h.next_seq += 1;
            let record = Arc::new(record);
            if h.records.len() == h.capacity {
                h.records.pop_front();
                h.evicted += 1;
            }
            h.records.push_back((record.clone(), key));
            // Queued while the history lock is held: a record `inspect` can
            // see is already queued for the audit log, so the sync in
            // `serve_inspect` covers it.
            // Audit verdicts are denials in waiting: the audit log keeps
            // them as it keeps denials, for review before enforcing.
            if matches!(record.verdict, Verdict::Denied | Verdict::Audit) || record.credential_injected() {
                self.audit(&record);
            }
            record
        };
        // No follower is fine.
        let _ = self.live.send(record);
    }

    /// Queues `record` for the audit log within its sandbox's budget; the
    /// first line admitted after a suppression is preceded by a record
    /// saying how many were suppressed. Never waits for the writer.
    fn audit(&self, record: &Arc<FlowRecord>) {
        // What a credential did is never dropped for what a guest flooded.
        let budgeted = !(record.credential_injected() || record.event == "secret_redacted");
        let admit = if budgeted {
            self.audit_budgets.lock().unwrap_or_else(|p| p.into_inner()).admit(&record.sandbox, crate::util::clock::boot_time_ns())
        } else {
            Admit::Write { suppressed_before: 0 }
        };
        let lines = match admit {
            Admit::Write { suppressed_before: 0 } => vec![record.clone()],
            Admit::Write { suppressed_before } => vec![Arc::new(suppression_record(record, suppressed_before, false)), record.clone()],
            Admit::SuppressFirst => {
                self.metrics.audit_suppressed.inc();
                vec![Arc::new(suppression_record(record, 0, true))]
            }
            Admit::Suppress => {
                self.metrics.audit_suppressed.inc();
                return;
            }
        };
        self.audit.submit(lines);
    }

    /// Waits (blocking, bounded) until every audit line queued so far is
    /// written; false when the writer did not catch up in time. For the
    /// control thread, `inspect` clients and shutdown, never a proxy task.
    pub fn sync_audit(&self) -> bool {
        self.audit.sync(AUDIT_SYNC_TIMEOUT)
    }

    /// A follower's receiver; take it before [`FlowHub::history`] and skip
    /// live records at or below the history's last seq.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.live.subscribe()
    }

    /// The history, oldest first, and what is lost so far.
    pub fn history(&self) -> (Vec<Arc<FlowRecord>>, Lost) {
        let (records, lost) = self.history_with_keys();
        (records.into_iter().map(|(r, _)| r).collect(), lost)
    }

    fn history_with_keys(&self) -> (Vec<Stored>, Lost) {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let lost = Lost { ring_buffer: self.ring_lost.load(Ordering::Relaxed), history_evicted: h.evicted, follower_lagged: 0 };
        (h.records.iter().cloned().collect(), lost)
    }

    /// Drops a deleted sandbox's per-sandbox counts (its metric series),
    /// writing how many of its audit records went unwritten, if any, and
    /// waits until its audit lines are on disk. Blocking (the control
    /// thread calls it).
    pub fn forget_sandbox(&self, sandbox: &str) {
        let suppressed = self.audit_budgets.lock().unwrap_or_else(|p| p.into_inner()).forget(sandbox).filter(|n| *n > 0);
        if let Some(suppressed) = suppressed {
            let mut last = FlowRecord::new(sandbox, "audit", "audit_suppressed", "other", Verdict::Denied, "rate_limit");
            last.time_unix_ns = unix_now_ns();
            last.time = crate::observe::record::rfc3339(last.time_unix_ns);
            self.audit.submit(vec![Arc::new(suppression_record(&last, suppressed, false))]);
        }
        self.sync_audit();
        for verdict in Verdict::ALL {
            self.metrics.flows.remove(&FlowLabels { sandbox: sandbox.to_string(), verdict: verdict.as_str() });
        }
    }

    pub fn count_proxy(&self, outcome: &'static str) {
        let known = self.proxy_outcomes.read().unwrap_or_else(|p| p.into_inner()).get(outcome).cloned();
        let counter = known.unwrap_or_else(|| {
            // The family's counter itself (a handle on the same count).
            let counter = self.metrics.proxy_requests.get_or_create(&vec![("outcome".into(), outcome.into())]).clone();
            self.proxy_outcomes.write().unwrap_or_else(|p| p.into_inner()).insert(outcome, counter.clone());
            counter
        });
        counter.inc();
    }

    /// Writes the stream for one `inspect` client: the loss counters, the
    /// history, an end-of-history marker, then (with `follow`) live records
    /// until the client goes away. Blocking (runs on a client thread).
    /// With `flows`, a flow's `new_flow` / `verdict_changed` record shows
    /// the flow's packets and bytes so far (while the table holds it).
    /// `client_gone` is asked while no record comes, so a follower whose
    /// client went away ends without waiting for the next record.
    pub fn serve_inspect(
        &self,
        out: &mut impl std::io::Write,
        follow: bool,
        flows: Option<&crate::datapath::PinnedFlows>,
        client_gone: impl Fn() -> bool,
    ) -> std::io::Result<()> {
        let mut live = self.subscribe();
        let (records, lost) = self.history_with_keys();
        // Whatever this client is shown is in the audit log by now (each
        // record was queued before it entered the history).
        self.sync_audit();
        let last_seq = records.last().map_or(0, |(r, _)| r.seq);
        let line = |out: &mut dyn std::io::Write, l: &StreamLine| -> std::io::Result<()> {
            let mut text = serde_json::to_string(l).expect("stream lines serialize");
            text.push('\n');
            out.write_all(text.as_bytes())
        };
        line(out, &StreamLine::Lost(lost))?;
        for (r, key) in records {
            let mut r = (*r).clone();
            if let (Some(flows), Some(key)) = (flows, key) {
                if r.event == "new_flow" || r.event == "verdict_changed" {
                    if let Some(stats) = flows.get(&key) {
                        r.packets = stats.packets;
                        r.bytes = stats.bytes;
                    }
                }
            }
            line(out, &StreamLine::Flow(Box::new(r)))?;
        }
        line(out, &StreamLine::EndOfHistory)?;
        out.flush()?;
        if !follow {
            return Ok(());
        }
        let mut lagged = 0;
        loop {
            match live.try_recv() {
                Ok(r) if r.seq <= last_seq => continue,
                Ok(r) => line(out, &StreamLine::Flow(Box::new((*r).clone())))?,
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    lagged += n;
                    let mut lost = self.history().1;
                    lost.follower_lagged = lagged;
                    line(out, &StreamLine::Lost(lost))?;
                }
                Err(broadcast::error::TryRecvError::Empty) => {
                    out.flush()?;
                    if client_gone() {
                        return Ok(());
                    }
                    std::thread::sleep(FOLLOW_POLL);
                    continue;
                }
                Err(broadcast::error::TryRecvError::Closed) => return Ok(()),
            }
        }
    }
}

/// One proxied connection's identity, for the records of its requests.
#[derive(Clone)]
pub struct FlowContext {
    pub hub: Arc<FlowHub>,
    /// Shared, not copied, by the records of a connection's requests.
    pub sandbox: Arc<str>,
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    /// The rule that allowed the connection.
    pub rule: Arc<str>,
}

impl FlowContext {
    /// Publishes a connection-level decision (before any HTTP is read).
    pub fn connection(&self, verdict: Verdict, reason: &'static str, rule: Option<String>, server_name: Option<&str>) {
        let mut r = FlowRecord::new(&self.sandbox, "proxy", "connection", "tcp", verdict, reason).with_endpoints(Some(self.src), Some(self.dst));
        r.rule = rule;
        r.server_name = server_name.map(str::to_string);
        self.hub.count_proxy(match verdict {
            Verdict::Denied => "denied",
            _ if reason == "upstream_failed" => "upstream_failed",
            _ => "allowed",
        });
        self.hub.publish(r);
    }

    /// Publishes one MCP JSON-RPC message the proxy checked: `verdict`
    /// allowed, denied (answered with a JSON-RPC error, never forwarded)
    /// or audit (forwarded, would have been denied); `rule` the `[[mcp]]`
    /// entry that decided.
    pub fn mcp(&self, verdict: Verdict, reason: &'static str, rule: &str, detail: crate::observe::record::McpDetail) {
        let mut r = FlowRecord::new(&self.sandbox, "proxy", "mcp_request", "mcp", verdict, reason).with_endpoints(Some(self.src), Some(self.dst));
        r.rule = Some(rule.to_string());
        r.mcp = Some(detail);
        self.hub.count_proxy(match verdict {
            Verdict::Denied => "mcp_denied",
            Verdict::Audit => "audit",
            _ => "mcp_allowed",
        });
        self.hub.publish(r);
    }

    /// Publishes one HTTP request the proxy terminated or forwarded.
    /// `status`: what the guest got back; `credential`: injected or not (and why).
    pub fn http(&self, method: &str, host: &str, path: &str, status: Option<u16>, reason: &'static str, credential: Option<crate::observe::record::CredentialDetail>) {
        // Anything but a forwarded request (or one the upstream failed) is
        // the proxy refusing it: misdirected, bad_request, connect_refused,
        // compressed_response, malformed_request.
        let verdict = match reason {
            "allowed" | "upstream_failed" => Verdict::Allowed,
            "audit" => Verdict::Audit,
            _ => Verdict::Denied,
        };
        let mut r = FlowRecord::new(&self.sandbox, "proxy", "http_request", "tcp", verdict, reason).with_endpoints(Some(self.src), Some(self.dst));
        r.rule = Some(self.rule.to_string());
        r.domains = vec![host.to_string()];
        r.http = Some(crate::observe::record::HttpDetail { method: method.to_string(), host: host.to_string(), path: path.to_string(), status });
        r.credential = credential;
        self.hub.count_proxy(reason);
        self.hub.publish(r);
    }

    /// Publishes that `count` occurrences of `credential`'s secret were cut
    /// out of the response to a request (once the response has ended).
    /// Denied, so it is audited and `inspect --verdict denied` shows it.
    pub fn secret_redacted(&self, method: &str, host: &str, path: &str, status: Option<u16>, credential: &str, count: u64) {
        let mut r = FlowRecord::new(&self.sandbox, "proxy", "secret_redacted", "tcp", Verdict::Denied, "secret_redacted").with_endpoints(Some(self.src), Some(self.dst));
        r.rule = Some(self.rule.to_string());
        r.domains = vec![host.to_string()];
        r.http = Some(crate::observe::record::HttpDetail { method: method.to_string(), host: host.to_string(), path: path.to_string(), status });
        r.credential = Some(crate::observe::record::CredentialDetail { name: credential.to_string(), injected: true, failure: None, redactions: count });
        self.hub.publish(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn rec(n: u16, verdict: Verdict) -> FlowRecord {
        let mut r = FlowRecord::new("a", "datapath", "new_flow", "tcp", verdict, "x");
        r.dst_port = n;
        r
    }

    #[test]
    fn proxy_outcomes_count_in_the_family_prometheus_reads() {
        let dir = std::env::temp_dir().join(format!("sbx-net-hub-outcomes-{}", std::process::id()));
        let hub = FlowHub::new(&FlowLogSettings { history: 3, audit_path: dir.join("audit.log"), audit_max_bytes: 1 << 20, audit_keep: 1, audit_lines_per_second: 0, audit_burst: 0 });
        for outcome in ["allowed", "allowed", "denied", "allowed"] {
            hub.count_proxy(outcome);
        }
        let count = |o: &str| hub.metrics.proxy_requests.get_or_create(&vec![("outcome".into(), o.into())]).get();
        assert_eq!((count("allowed"), count("denied"), count("audit")), (3, 1, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn history_is_bounded_and_counts_what_it_forgets() {
        let dir = std::env::temp_dir().join(format!("sbx-net-hub-{}", std::process::id()));
        let hub = FlowHub::new(&FlowLogSettings { history: 3, audit_path: dir.join("audit.log"), audit_max_bytes: 1 << 20, audit_keep: 1, audit_lines_per_second: 0, audit_burst: 0 });
        for n in 0..5 {
            hub.publish(rec(n, Verdict::Allowed));
        }
        let (records, lost) = hub.history();
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(lost.history_evicted, 2);
        let mut out = Vec::new();
        hub.serve_inspect(&mut out, false, None, || false).unwrap();
        let lines: Vec<StreamLine> = String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(matches!(lines[0], StreamLine::Lost(Lost { history_evicted: 2, .. })));
        assert!(matches!(lines.last(), Some(StreamLine::EndOfHistory)));
        assert_eq!(lines.len(), 5);
        // Allowed records are not audited.
        assert!(!dir.join("audit.log").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn proxy_connect_time_is_a_histogram_on_metrics() {
        let metrics = FlowMetrics::default();
        metrics.observe_proxy_connect(ConnectOutcome::Ok, 0.002);
        metrics.observe_proxy_connect(ConnectOutcome::Ok, 3.0);
        metrics.observe_proxy_connect(ConnectOutcome::Failed, 10.0);
        let mut registry = Registry::with_prefix("sbx_net");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE sbx_net_proxy_connect_seconds histogram",
            "sbx_net_proxy_connect_seconds_bucket{le=\"0.001\",outcome=\"ok\"} 0",
            "sbx_net_proxy_connect_seconds_bucket{le=\"0.0025\",outcome=\"ok\"} 1",
            "sbx_net_proxy_connect_seconds_bucket{le=\"2.5\",outcome=\"ok\"} 1",
            "sbx_net_proxy_connect_seconds_bucket{le=\"5.0\",outcome=\"ok\"} 2",
            "sbx_net_proxy_connect_seconds_count{outcome=\"ok\"} 2",
            "sbx_net_proxy_connect_seconds_bucket{le=\"5.0\",outcome=\"failed\"} 0",
            "sbx_net_proxy_connect_seconds_bucket{le=\"10.0\",outcome=\"failed\"} 1",
            "sbx_net_proxy_connect_seconds_count{outcome=\"failed\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn flow_counts_go_with_their_sandbox() {
        let dir = std::env::temp_dir().join(format!("sbx-net-counts-{}", std::process::id()));
        let hub = FlowHub::new(&FlowLogSettings { history: 4, audit_path: dir.join("audit.log"), audit_max_bytes: 1 << 20, audit_keep: 1, audit_lines_per_second: 0, audit_burst: 0 });
        for sandbox in ["a", "b", "a"] {
            let mut r = rec(1, Verdict::Allowed);
            r.sandbox = sandbox.into();
            hub.publish(r);
        }
        let count = |hub: &FlowHub, sandbox: &str| hub.metrics.flows.get(&FlowLabels { sandbox: sandbox.into(), verdict: "allowed" }).map(|c| c.get());
        assert_eq!((count(&hub, "a"), count(&hub, "b")), (Some(2), Some(1)));
        hub.forget_sandbox("a");
        assert_eq!((count(&hub, "a"), count(&hub, "b")), (None, Some(1)));
    }

    #[test]
    fn a_slow_follower_is_told_what_it_missed() {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("sbx-net-follow-{}", std::process::id()));
        let hub = Arc::new(FlowHub::new(&FlowLogSettings { history: 10, audit_path: dir.join("audit.log"), audit_max_bytes: 1 << 20, audit_keep: 1, audit_lines_per_second: 0, audit_burst: 0 }));
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let serving = hub.clone();
        let follower = std::thread::spawn(move || serving.serve_inspect(&mut writer, true, None, || false));
        let mut lines = std::io::BufReader::new(reader).lines();
        while !lines.next().unwrap().unwrap().contains("end_of_history") {}
        // The client reads nothing while 20 000 records are published: its
        // socket fills, the follower blocks, the live channel overflows.
        const SENT: u64 = 20_000;
        for n in 0..SENT {
            hub.publish(rec(n as u16, Verdict::Allowed));
        }
        let (mut received, mut lagged) = (0u64, 0u64);
        for line in lines.by_ref() {
            match serde_json::from_str::<StreamLine>(&line.unwrap()).unwrap() {
                StreamLine::Lost(l) => lagged = l.follower_lagged,
                StreamLine::Flow(r) => {
                    received += 1;
                    if r.seq == SENT {
                        break;
                    }
                }
                StreamLine::EndOfHistory => {}
            }
        }
        assert!(lagged > 0, "the overflow is reported");
        assert_eq!(received + lagged, SENT, "every record is received or counted as missed");
        drop(lines);
        hub.publish(rec(1, Verdict::Allowed));
        assert!(follower.join().unwrap().is_err(), "the follower ends when its client goes");
        // An idle follower notices its client left without a new record.
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let serving = hub.clone();
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = gone.clone();
        let idle = std::thread::spawn(move || serving.serve_inspect(&mut writer, true, None, || seen.load(Ordering::Relaxed)));
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(reader);
        gone.store(true, Ordering::Relaxed);
        assert!(idle.join().unwrap().is_ok());
    }

    #[test]
    fn audit_log_rotates_by_size_and_keeps_whole_lines() {
        let dir = std::env::temp_dir().join(format!("sbx-net-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.log");
        let line_len = serde_json::to_string(&rec(1000, Verdict::Denied)).unwrap().len() as u64 + 1;
        let mut log = AuditLog::new(&path, line_len * 3, 2);
        for n in 1000..1010 {
            log.append(&rec(n, Verdict::Denied)).unwrap();
        }
        let read = |p: &Path| -> Vec<u16> {
            std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str::<FlowRecord>(l).unwrap().dst_port).collect()
        };
        assert_eq!(read(&path), [1009]);
        assert_eq!(read(&dir.join("audit.log.1")), [1006, 1007, 1008]);
        assert_eq!(read(&dir.join("audit.log.2")), [1003, 1004, 1005]);
        assert!(!dir.join("audit.log.3").exists(), "only `keep` rotated files");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A new writer continues the file it finds.
        let mut again = AuditLog::new(&path, line_len * 3, 2);
        again.append(&rec(1010, Verdict::Denied)).unwrap();
        assert_eq!(read(&path), [1009, 1010]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn audited_records_are_on_disk_once_the_hub_syncs_and_after_forget() {
        let dir = std::env::temp_dir().join(format!("sbx-net-hub-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.log");
        // A budget of 2 lines in a burst, refilled far slower than the test runs.
        let hub = FlowHub::new(&FlowLogSettings { history: 100, audit_path: path.clone(), audit_max_bytes: 1 << 20, audit_keep: 1, audit_lines_per_second: 1, audit_burst: 2 });
        for n in 0..5 {
            hub.publish(rec(n, Verdict::Denied));
        }
        let mut injected = FlowRecord::new("a", "proxy", "http_request", "tcp", Verdict::Allowed, "allowed");
        injected.credential = Some(crate::observe::record::CredentialDetail { name: "gh".into(), injected: true, failure: None, redactions: 0 });
        hub.publish(injected);
        hub.publish(rec(9, Verdict::Allowed));
        assert!(hub.sync_audit());
        let read = || -> Vec<FlowRecord> { std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect() };
        let events = |records: &[FlowRecord]| records.iter().map(|r| (r.event.to_string(), r.dst_port, r.packets)).collect::<Vec<_>>();
        let written = read();
        assert_eq!(
            events(&written),
            [("new_flow".into(), 0, 0), ("new_flow".into(), 1, 0), ("audit_suppressed".into(), 0, 0), ("http_request".into(), 0, 0)],
            "two within the budget, the notice that suppression starts, the credential's record (never budgeted); the allowed flow is not audited"
        );
        assert_eq!(written.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 0, 6], "audited records carry the stream's seq (a notice is not in the stream)");
        // Deleting the sandbox writes what is pending, and returns only once it is on disk.
        hub.forget_sandbox("a");
        let after = read();
        assert_eq!(events(&after[4..]), [("audit_suppressed".into(), 0, 3)]);
        assert_eq!((hub.metrics.audit_records.get(), hub.metrics.audit_suppressed.get(), hub.metrics.audit_dropped.get()), (5, 3, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn audit_budget_is_per_sandbox_and_reports_what_it_suppressed() {
        let second = 1_000_000_000u64;
        let mut b = AuditBudgets::new(10, 20);
        let t0 = 5 * second;
        for i in 0..20 {
            assert_eq!(b.admit("flood", t0), Admit::Write { suppressed_before: 0 }, "burst line {i}");
        }
        assert_eq!(b.admit("flood", t0), Admit::SuppressFirst);
        for _ in 1..100 {
            assert_eq!(b.admit("flood", t0), Admit::Suppress);
        }
        // Another sandbox is untouched by the flood.
        assert_eq!(b.admit("quiet", t0), Admit::Write { suppressed_before: 0 });
        // A tenth of a second later one more token: the line says 100 went.
        assert_eq!(b.admit("flood", t0 + second / 10), Admit::Write { suppressed_before: 100 });
        assert_eq!(b.admit("flood", t0 + second / 10), Admit::SuppressFirst);
        assert_eq!(b.forget("flood"), Some(1), "deleting the sandbox reports what is pending");
        assert_eq!(b.admit("flood", t0 + second / 10), Admit::Write { suppressed_before: 0 }, "a new sandbox of that name starts full");
        // Refills up to the burst only.
        for _ in 0..20 {
            assert!(matches!(b.admit("flood", t0 + 100 * second), Admit::Write { .. }));
        }
        assert_eq!(b.admit("flood", t0 + 100 * second), Admit::SuppressFirst);
        let mut off = AuditBudgets::new(0, 0);
        for _ in 0..10_000 {
            assert_eq!(off.admit("x", t0), Admit::Write { suppressed_before: 0 });
        }
    }
}
