//! The DNS proxy's counters and its hold-time histogram, and the families
//! it registers for `/metrics`: read from these counters and from the
//! learned store at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use crate::dns::learned::LearnedStore;
use crate::observe::metrics::{encode_counter, encode_counters, encode_gauge, CollectWith};

/// Counters the daemon reports in `status` and the proxy registers for
/// `/metrics` ([`DnsStats::register`]).
#[derive(Debug)]
pub struct DnsStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Queries only audit-mode rules would deny: answered, recorded as
    /// audit (not counted in `allowed`).
    pub audit: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub stripped: AtomicU64,
    pub hold_timeouts: AtomicU64,
    /// Messages answered (or dropped) by the proxy itself without asking
    /// upstream: other opcodes, malformed messages, names no rule can judge,
    /// meta types (also counted in `denied`).
    pub refused: AtomicU64,
    /// Answers refused because their alias chain reached a denied name
    /// (also counted in `denied`).
    pub alias_denied: AtomicU64,
    /// SERVFAILs because the sandbox's or the shared pending table was full
    /// (also counted in `upstream_failures`).
    pub upstream_busy: AtomicU64,
    /// DNS-over-TCP connections closed at once: the sandbox held its cap.
    pub tcp_refused: AtomicU64,
    /// DNS-over-TCP connections closed by the idle or query deadline.
    pub tcp_timeouts: AtomicU64,
    /// Allowed queries answered from the answer cache, and those that were
    /// not (counted only while the cache is on).
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
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
            audit: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            stripped: AtomicU64::new(0),
            hold_timeouts: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            alias_denied: AtomicU64::new(0),
            upstream_busy: AtomicU64::new(0),
            tcp_refused: AtomicU64::new(0),
            tcp_timeouts: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            hold_max_us: AtomicU64::new(0),
            hold_seconds: hold_histogram(),
        }
    }
}

impl DnsStats {
    pub fn record_hold(&self, waited: Duration) {
        self.hold_max_us.fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
        self.hold_seconds.observe(waited.as_secs_f64());
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "queries_allowed": self.allowed.load(Ordering::Relaxed),
            "queries_denied": self.denied.load(Ordering::Relaxed),
            "queries_audit": self.audit.load(Ordering::Relaxed),
            "upstream_failures": self.upstream_failures.load(Ordering::Relaxed),
            "records_stripped": self.stripped.load(Ordering::Relaxed),
            "hold_timeouts": self.hold_timeouts.load(Ordering::Relaxed),
            "queries_refused": self.refused.load(Ordering::Relaxed),
            "answers_alias_denied": self.alias_denied.load(Ordering::Relaxed),
            "upstream_busy": self.upstream_busy.load(Ordering::Relaxed),
            "tcp_connections_refused": self.tcp_refused.load(Ordering::Relaxed),
            "tcp_connections_timed_out": self.tcp_timeouts.load(Ordering::Relaxed),
            "hold_max_us": self.hold_max_us.load(Ordering::Relaxed),
            "cache_hits": self.cache_hits.load(Ordering::Relaxed),
            "cache_misses": self.cache_misses.load(Ordering::Relaxed),
        })
    }

    /// Registers the DNS proxy's families: its counters and hold-time
    /// histogram, and the learned addresses in force (counted in `learned`
    /// at scrape time).
    pub fn register(self: &Arc<Self>, learned: Arc<LearnedStore>, registry: &mut Registry) {
        registry.register("dns_hold_seconds", "Time an answer was held while its addresses were written to the maps", self.hold_seconds.clone());
        let stats = self.clone();
        registry.register_collector(Box::new(CollectWith("dns", move |encoder: &mut DescriptorEncoder| {
            // The endpoint renders off the async workers, so waiting for
            // the store's lock here is fine.
            let learned = learned.count();
            stats.encode(encoder, learned)
        })));
    }

    /// The counter families, and the learned-address gauge at `learned`.
    fn encode(&self, encoder: &mut DescriptorEncoder, learned: usize) -> Result<(), std::fmt::Error> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let queries = [("allowed", &self.allowed), ("denied", &self.denied), ("audit", &self.audit), ("upstream_failure", &self.upstream_failures)];
        encode_counters(encoder, "dns_queries", "DNS queries by outcome", queries.map(|(outcome, c)| ([("outcome", outcome)], load(c))))?;
        encode_counter(encoder, "dns_records_stripped", "Answer records stripped (rebinding)", load(&self.stripped))?;
        encode_counter(encoder, "dns_hold_timeouts", "Answers not released because the map write took too long", load(&self.hold_timeouts))?;
        encode_gauge(encoder, "learned_addresses", "DNS-learned addresses in force", learned as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exported_as_they_count() {
        let stats = Arc::new(DnsStats::default());
        stats.allowed.fetch_add(7, Ordering::Relaxed);
        stats.denied.fetch_add(3, Ordering::Relaxed);
        stats.audit.fetch_add(2, Ordering::Relaxed);
        stats.stripped.fetch_add(1, Ordering::Relaxed);
        stats.record_hold(Duration::from_micros(200));
        let read = stats.clone();
        let text = crate::observe::metrics::collected_text(move |e| read.encode(e, 4));
        for line in [
            "sbx_net_dns_queries_total{outcome=\"allowed\"} 7",
            "sbx_net_dns_queries_total{outcome=\"denied\"} 3",
            "sbx_net_dns_queries_total{outcome=\"audit\"} 2",
            "sbx_net_dns_queries_total{outcome=\"upstream_failure\"} 0",
            "sbx_net_dns_records_stripped_total 1",
            "sbx_net_dns_hold_timeouts_total 0",
            "# TYPE sbx_net_learned_addresses gauge",
            "sbx_net_learned_addresses 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        // A later scrape sees later counts: nothing is copied at registration.
        stats.denied.fetch_add(1, Ordering::Relaxed);
        let read = stats.clone();
        assert!(crate::observe::metrics::collected_text(move |e| read.encode(e, 0)).contains("sbx_net_dns_queries_total{outcome=\"denied\"} 4"));
        let mut registry = prometheus_client::registry::Registry::with_prefix("sbx_net");
        registry.register("dns_hold_seconds", "Held", stats.hold_seconds.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("sbx_net_dns_hold_seconds_bucket{le=\"0.00025\"} 1"), "{text}");
    }
}
