//! The DNS proxy's counters and its hold-time histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters the daemon reports in `status` and `/metrics`.
#[derive(Debug)]
pub struct DnsStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
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
            refused: AtomicU64::new(0),
            alias_denied: AtomicU64::new(0),
            upstream_busy: AtomicU64::new(0),
            tcp_refused: AtomicU64::new(0),
            tcp_timeouts: AtomicU64::new(0),
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
            "upstream_failures": self.upstream_failures.load(Ordering::Relaxed),
            "records_stripped": self.stripped.load(Ordering::Relaxed),
            "hold_timeouts": self.hold_timeouts.load(Ordering::Relaxed),
            "queries_refused": self.refused.load(Ordering::Relaxed),
            "answers_alias_denied": self.alias_denied.load(Ordering::Relaxed),
            "upstream_busy": self.upstream_busy.load(Ordering::Relaxed),
            "tcp_connections_refused": self.tcp_refused.load(Ordering::Relaxed),
            "tcp_connections_timed_out": self.tcp_timeouts.load(Ordering::Relaxed),
            "hold_max_us": self.hold_max_us.load(Ordering::Relaxed),
        })
    }
}

