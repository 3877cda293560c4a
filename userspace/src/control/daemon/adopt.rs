//! Starting over what an earlier process left: the host preparation, the
//! recorded sandboxes (re-adopted without a gap in enforcement), the
//! nftables table and the pool of pre-warmed taps.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::control::config::DaemonConfig;
use crate::control::state::{text_hash, PolicyText};
use crate::credentials::ca::SandboxCa;
use crate::datapath::Datapath;
use crate::policy::Policy;
use crate::sandbox::guest_pump::{pump_alive, spawn_pump, stop_pump, PumpSpec};
use crate::sandbox::host::HostCheck;
use crate::sandbox::ifindex_of;
use crate::sandbox::tap_pool::{dismantle_pooled, remove_prepared, PoolSettings};

use super::lifecycle::trust_in_guest;
use super::{io_err, Daemon, DaemonError};

impl Daemon {
    /// Removes pre-warmed taps an earlier process left, then starts the
    /// workers that keep `tap_pool_size` taps ready.
    pub(super) fn start_pool(&mut self) -> Result<(), DaemonError> {
        let owned: BTreeSet<String> = self.state.sandboxes.values().map(|r| r.tap.clone()).collect();
        let links_dir = self.host.settings.links_dir.clone();
        std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        let stale = dismantle_pooled(&self.host.netlink, &links_dir, &owned);
        if stale > 0 {
            tracing::info!(stale, "removed pre-warmed taps of an earlier run");
        }
        let ca_dir = self.config.sandbox_cas_dir();
        let state_dir = self.config.state_dir.clone();
        if remove_prepared(&state_dir, &ca_dir) > 0 {
            tracing::debug!("removed CAs and record files an earlier run's pool made ahead");
        }
        for dir in [ca_dir.clone(), state_dir.join("sandboxes")] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let settings = PoolSettings {
            size: self.config.tap_pool_size,
            workers: self.config.tap_pool_workers,
            pools: self.config.pools(),
            links_dir,
            ca_dir,
            state_dir,
        };
        self.pool.start(settings, self.host.datapath.egress_program_fd()?);
        Ok(())
    }

    /// Re-adopts every sandbox in the state: swaps the program behind its
    /// pinned link (atomically), brings its policy up to date with a
    /// generation switch, restarts a dead pump, then replaces the nftables
    /// table in one transaction.
    pub(super) fn adopt_all(&mut self) -> Result<(), DaemonError> {
        let names: Vec<String> = self.state.sandboxes.keys().cloned().collect();
        for name in &names {
            let record = &self.state.sandboxes[name];
            if ifindex_of(&record.tap).is_none() {
                // Taps do not outlive the host (nor do pins and maps): after
                // a reboot, or when a VMM removed its adopted tap, there is
                // nothing left to enforce on.
                tracing::warn!(sandbox = %name, tap = %record.tap, "tap is gone; forgetting the sandbox");
                if let Some(pid) = record.vm_pid {
                    if let Err(e) = crate::sandbox::vm_process::stop_vm(pid, name) {
                        tracing::warn!(sandbox = %name, "{e}");
                    }
                }
                if let Some(pid) = record.pump_pid {
                    if let Ok(spec) = self.spec(record) {
                        if let Err(e) = stop_pump(pid, name, &spec.netns) {
                            tracing::warn!(sandbox = %name, "{e}");
                        }
                    }
                }
                let _ = Datapath::unpin_link(&self.host.settings.link_pin(name));
                self.state.sandboxes.remove(name);
                continue;
            }
            if let Err(e) = self.adopt(name) {
                tracing::error!(sandbox = %name, "re-adopting: {e}");
            }
        }
        let taps: Vec<String> = self.state.sandboxes.values().map(|s| s.tap.clone()).collect();
        self.host.install_table(&taps)?;
        self.state.prune_texts();
        self.state.save(&self.config.state_dir)?;
        self.publish_routes();
        Ok(())
    }

    fn adopt(&mut self, name: &str) -> Result<(), DaemonError> {
        let record = self.state.sandboxes[name].clone();
        let spec = self.spec(&record)?;
        let old_text = self.state.policy_texts.get(&record.policy_hash).cloned().ok_or_else(|| DaemonError::NoPolicyText(name.to_string()))?;
        let old = self.host.compile_for(&Policy::parse(&old_text.source, &old_text.text)?, &spec)?;
        let ifindex = self.host.netlink.link_index(&record.tap)?;
        let pin = self.host.settings.link_pin(name);
        if pin.exists() {
            self.host.datapath.adopt_pinned(&pin)?;
        } else {
            self.host.datapath.attach_pinned(&record.tap, &pin)?;
        }
        let mut current = Arc::new(old);
        if let Some(entry) = self.policies.set.get(&record.policy).cloned() {
            let hash = text_hash(&entry.source, &entry.text);
            if hash != record.policy_hash {
                let new = self.host.compile_for(&entry.policy, &spec)?;
                let policy_id = self.state.take_policy_id();
                let cfg = self.host.datapath_config(&spec, &new, policy_id);
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
                let cfg = self.host.datapath_config(&spec, &current, record.policy_id);
                self.host.datapath.write_config(ifindex, &cfg)?;
            }
        } else {
            tracing::warn!(sandbox = %name, policy = %record.policy, "policy no longer exists; keeping the one in force");
        }
        self.in_force.policies.insert(name.to_string(), current);
        let ca_dir = self.config.sandbox_ca_dir(name);
        match SandboxCa::load(name, &ca_dir) {
            Ok(ca) => {
                self.in_force.cas.insert(name.to_string(), Arc::new(Mutex::new(ca)));
            }
            Err(e) => tracing::warn!(sandbox = %name, "sandbox CA not loaded: {e}"),
        }
        if record.netns_guest {
            let alive = record.pump_pid.is_some_and(|pid| pump_alive(pid, name));
            if !alive {
                let pid = spawn_pump(&self.host.settings.pump_exe, &PumpSpec::new(&spec), &self.host.settings.pump_log(name))?;
                self.state.sandboxes.get_mut(name).expect("present").pump_pid = Some(pid);
                // A new guest namespace: give it the CA again.
                if let Some(ca) = self.in_force.cas.get(name) {
                    let pem = ca.lock().unwrap_or_else(|p| p.into_inner()).cert_pem.clone();
                    if let Err(e) = trust_in_guest(&spec.netns, &pem) {
                        tracing::warn!(sandbox = %name, "guest trust store: {e}");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Prepares what the data path needs on a host with kernel defaults (see
/// [`crate::sandbox::host`]) and records the host's original values for `--cleanup`.
pub(super) fn prepare_host(config: &DaemonConfig) -> Result<Vec<HostCheck>, DaemonError> {
    use crate::sandbox::host::{self, HostError, HostOriginals};
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
