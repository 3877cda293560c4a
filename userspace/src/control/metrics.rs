//! The daemon's own families for `/metrics`: its build and uptime, the
//! sandboxes it enforces, the policy generation, rejected policy loads
//! (how many, and whether the last one failed),
//! whether the credentials' secrets loaded (in total, and each one by
//! policy and credential name, so an alert can say which to fix), and the
//! map writes whose failure no caller could act on. The daemon publishes its numbers
//! whenever they may have changed ([`DaemonMetrics::publish`]); a scrape
//! reads them without asking the control thread.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::control::state::State;
use crate::credentials::secrets::SecretStore;
use crate::datapath::write_failures::MapWriteFailures;
use crate::observe::metrics::{encode_gauge, CollectWith};

type Label = [(&'static str, &'static str); 1];

/// One credential of a policy in force. Both names come from the operator's
/// policy files (a few per host), never from a guest.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct CredentialLabels {
    pub policy: String,
    pub credential: String,
}

/// Shared handles: the daemon sets them, the registry reads them.
#[derive(Clone, Debug)]
pub struct DaemonMetrics {
    started: Instant,
    sandboxes: Gauge,
    policy_generation: Gauge,
    reload_failures: Counter,
    /// 1 while the last policy load (at start, a reload or a fleet change)
    /// failed, i.e. while `sbx-net status` shows `last_reload_error`. The
    /// counter alone cannot say so: a daemon that starts with a bad policy
    /// dir has it at 1 from its first scrape (no increase to see), and a
    /// failure stays current however long ago it was counted.
    reload_error: Gauge,
    credentials: Family<Label, Gauge>,
    /// 1 when the credential's secret loaded, 0 when its source could not
    /// be read; one series per credential of the policies in force.
    credential_available: Family<CredentialLabels, Gauge>,
    /// The series of `credential_available` published last, so a credential
    /// whose policy went away loses its series instead of reading 0 forever.
    published_credentials: Arc<Mutex<BTreeSet<CredentialLabels>>>,
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
            reload_error: Gauge::default(),
            credentials: Family::default(),
            credential_available: Family::default(),
            published_credentials: Arc::default(),
            map_write_failures,
        }
    }

    /// Sets the numbers from the daemon's state: the sandboxes and policy
    /// generation in force, the policy loads rejected so far (a running
    /// total: the counter moves up to it), whether the last load failed,
    /// and the credentials of the policies in force by whether their
    /// secret loaded.
    pub fn publish(&self, state: &State, reload_failures: u64, last_reload_failed: bool, secrets: &SecretStore) {
        self.sandboxes.set(state.sandboxes.len() as i64);
        self.policy_generation.set(state.policy_generation as i64);
        self.reload_failures.inc_by(reload_failures.saturating_sub(self.reload_failures.get()));
        self.reload_error.set(i64::from(last_reload_failed));
        let available = secrets.secrets.values().filter(|s| s.is_ok()).count();
        self.credentials.get_or_create(&[("state", "available")]).set(available as i64);
        self.credentials.get_or_create(&[("state", "unavailable")]).set((secrets.secrets.len() - available) as i64);
        let current: BTreeSet<CredentialLabels> = secrets.secrets.keys().map(|(policy, credential)| CredentialLabels { policy: policy.clone(), credential: credential.clone() }).collect();
        let mut published = self.published_credentials.lock().unwrap_or_else(|p| p.into_inner());
        for gone in published.difference(&current) {
            self.credential_available.remove(gone);
        }
        for ((policy, credential), secret) in &secrets.secrets {
            let labels = CredentialLabels { policy: policy.clone(), credential: credential.clone() };
            self.credential_available.get_or_create(&labels).set(i64::from(secret.is_ok()));
        }
        *published = current;
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
        registry.register(
            "policy_reload_error",
            "1 while the last policy load (start, reload or fleet change) was rejected and the daemon runs on the policies it had (sbx-net status: last_reload_error), 0 once one succeeds",
            self.reload_error.clone(),
        );
        registry.register("credentials", "Credentials of the policies in force, by whether their secret loaded", self.credentials.clone());
        registry.register(
            "credential_available",
            "1 when the secret of a credential of a policy in force loaded, 0 when its source could not be read",
            self.credential_available.clone(),
        );
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
        metrics.publish(&state, 1, true, &secrets);
        metrics.publish(&state, 1, true, &secrets);
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
            "sbx_net_policy_reload_error 1",
            "sbx_net_credentials{state=\"available\"} 0",
            "sbx_net_credentials{state=\"unavailable\"} 1",
            "sbx_net_map_write_failures_total{map=\"SBX_POLICY_V4\"} 1",
            "# TYPE sbx_net_uptime_seconds gauge",
            "# HELP sbx_net_uptime_seconds Seconds since the daemon started.",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        // The counter follows the daemon's running total, never back.
        metrics.publish(&state, 4, true, &secrets);
        assert_eq!(metrics.reload_failures.get(), 4);
        // A reload that succeeds clears the error; the count stays.
        metrics.publish(&state, 4, false, &secrets);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.lines().any(|l| l == "sbx_net_policy_reload_error 0"), "{text}");
        assert!(text.lines().any(|l| l == "sbx_net_policy_reload_failures_total 4"), "{text}");
    }

    fn rendered(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn each_credential_says_whether_its_secret_loaded_and_goes_with_its_policy() {
        let metrics = DaemonMetrics::new(MapWriteFailures::default());
        let mut registry = Registry::with_prefix("sbx_net");
        metrics.register(&mut registry);
        let state = State::default();
        // No credential yet: the family is declared, with no series.
        metrics.publish(&state, 0, false, &SecretStore::default());
        let text = rendered(&registry);
        assert!(text.contains("# TYPE sbx_net_credential_available gauge\n"), "{text}");
        assert!(!text.contains("sbx_net_credential_available{"), "{text}");

        let mut secrets = SecretStore::default();
        secrets.secrets.insert(("agent".into(), "gh".into()), Err("cannot read /etc/sbx-net/gh: NotFound".into()));
        secrets.secrets.insert(("agent".into(), "npm".into()), Ok(Arc::new(crate::credentials::secrets::Secret::from_value("s3cr3t".into()))));
        secrets.secrets.insert(("ci".into(), "gh".into()), Err("environment variable GH is not set".into()));
        metrics.publish(&state, 0, false, &secrets);
        let text = rendered(&registry);
        for line in [
            "sbx_net_credential_available{policy=\"agent\",credential=\"gh\"} 0",
            "sbx_net_credential_available{policy=\"agent\",credential=\"npm\"} 1",
            "sbx_net_credential_available{policy=\"ci\",credential=\"gh\"} 0",
            "sbx_net_credentials{state=\"unavailable\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("s3cr3t") && !text.contains("NotFound"), "neither a secret nor why it failed goes into a label: {text}");

        // The secret file appears and policy `ci` goes: its series goes
        // with it (no 0 left to fire an alert for a policy not in force).
        secrets.secrets.remove(&("ci".to_string(), "gh".to_string()));
        secrets.secrets.insert(("agent".into(), "gh".into()), Ok(Arc::new(crate::credentials::secrets::Secret::from_value("t0ken".into()))));
        metrics.publish(&state, 0, false, &secrets);
        let text = rendered(&registry);
        let mut series: Vec<&str> = text.lines().filter(|l| l.starts_with("sbx_net_credential_available{")).collect();
        series.sort_unstable();
        assert_eq!(
            series,
            ["sbx_net_credential_available{policy=\"agent\",credential=\"gh\"} 1", "sbx_net_credential_available{policy=\"agent\",credential=\"npm\"} 1"],
            "{text}"
        );
    }
}
