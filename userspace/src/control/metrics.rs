//! The daemon's own families for `/metrics`: its build and uptime, the
//! sandboxes it enforces, the policy generation, rejected policy loads,
//! whether the credentials' secrets loaded, and the map writes whose
//! failure no caller could act on. The daemon publishes its numbers
//! whenever they may have changed ([`DaemonMetrics::publish`]); a scrape
//! reads them without asking the control thread.

use std::time::Instant;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::control::state::State;
use crate::credentials::secrets::SecretStore;
use crate::datapath::write_failures::MapWriteFailures;
use crate::observe::metrics::{encode_gauge, CollectWith};

type Label = [(&'static str, &'static str); 1];

/// Shared handles: the daemon sets them, the registry reads them.
#[derive(Clone, Debug)]
pub struct DaemonMetrics {
    started: Instant,
    sandboxes: Gauge,
    policy_generation: Gauge,
    reload_failures: Counter,
    credentials: Family<Label, Gauge>,
    map_write_failures: MapWriteFailures,
}

impl DaemonMetrics {
    /// Counting from now; `map_write_failures` is the datapath's.
    pub fn new(map_write_failures: MapWriteFailures) -> DaemonMetrics {
        DaemonMetrics {
            started: Instant::now(),
            sandboxes: Gauge::default(),
            policy_generation: Gauge::default(),
            reload_failures: Counter::default(),
            credentials: Family::default(),
            map_write_failures,
        }
    }

    /// Sets the numbers from the daemon's state: the sandboxes and policy
    /// generation in force, the policy loads rejected so far (a running
    /// total: the counter moves up to it) and the credentials of the
    /// policies in force by whether their secret loaded.
    pub fn publish(&self, state: &State, reload_failures: u64, secrets: &SecretStore) {
        self.sandboxes.set(state.sandboxes.len() as i64);
        self.policy_generation.set(state.policy_generation as i64);
        self.reload_failures.inc_by(reload_failures.saturating_sub(self.reload_failures.get()));
        let available = secrets.secrets.values().filter(|s| s.is_ok()).count();
        self.credentials.get_or_create(&[("state", "available")]).set(available as i64);
        self.credentials.get_or_create(&[("state", "unavailable")]).set((secrets.secrets.len() - available) as i64);
    }

    pub fn register(&self, registry: &mut Registry) {
        let build: Family<Label, Gauge> = Family::default();
        build.get_or_create(&[("version", env!("CARGO_PKG_VERSION"))]).set(1);
        registry.register("build_info", "sbx-net daemon build", build);
        let started = self.started;
        registry.register_collector(Box::new(CollectWith("uptime", move |encoder: &mut DescriptorEncoder| {
            encode_gauge(encoder, "uptime_seconds", "Seconds since the daemon started", started.elapsed().as_secs() as i64)
        })));
        registry.register("sandboxes", "Sandboxes enforced", self.sandboxes.clone());
        registry.register("policy_generation", "Policy generation in force", self.policy_generation.clone());
        registry.register("policy_reload_failures", "Policy loads and reloads rejected", self.reload_failures.clone());
        registry.register("credentials", "Credentials of the policies in force, by whether their secret loaded", self.credentials.clone());
        registry.register("map_write_failures", "eBPF map writes and removes that failed where no caller could act on it (undo, cleanup, expiry), by map", self.map_write_failures.family());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_the_daemon_numbers() {
        let failures = MapWriteFailures::default();
        let metrics = DaemonMetrics::new(failures.clone());
        let mut registry = Registry::with_prefix("sbx_net");
        metrics.register(&mut registry);
        let mut state = State::default();
        state.policy_generation = 3;
        let mut secrets = SecretStore::default();
        secrets.secrets.insert(("p".into(), "gh".into()), Err("no such file".into()));
        metrics.publish(&state, 1, &secrets);
        metrics.publish(&state, 1, &secrets);
        let no_space = aya::sys::SyscallError { call: "bpf_map_update_elem", io_error: std::io::Error::from_raw_os_error(libc::E2BIG) };
        failures.count("SBX_POLICY_V4", Err(aya::maps::MapError::SyscallError(no_space)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let build = format!("sbx_net_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        for line in [
            build.as_str(),
            "sbx_net_sandboxes 0",
            "sbx_net_policy_generation 3",
            "sbx_net_policy_reload_failures_total 1",
            "sbx_net_credentials{state=\"available\"} 0",
            "sbx_net_credentials{state=\"unavailable\"} 1",
            "sbx_net_map_write_failures_total{map=\"SBX_POLICY_V4\"} 1",
            "# TYPE sbx_net_uptime_seconds gauge",
            "# HELP sbx_net_uptime_seconds Seconds since the daemon started.",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        // The counter follows the daemon's running total, never back.
        metrics.publish(&state, 4, &secrets);
        assert_eq!(metrics.reload_failures.get(), 4);
    }
}
