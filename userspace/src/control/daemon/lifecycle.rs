//! Creating and deleting sandboxes: the request checks, the id and tap, the
//! install through [`SandboxHost`](crate::sandbox::install::SandboxHost),
//! the sandbox's CA, the record; and the delete that leaves the tap
//! fail-closed until the reaper unregisters it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::control::api::{SandboxInfo, VmCreate};
use crate::control::state::{text_hash, PolicyText, SandboxRecord};
use crate::credentials::ca::{PreparedCa, SandboxCa};
use crate::policy::compile::CompiledPolicy;
use crate::policy::store::PolicyEntry;
use crate::sandbox::guest_pump::stop_pump;
use crate::sandbox::install::{remove_from_host, InstallRequest, InstalledSandbox, TapSource};
use crate::sandbox::tap_pool::reap_pin_name;
use crate::sandbox::vm_process::{spawn_vm, stop_vm, VmBoot, VmDisk, VmSpec, SERVE_SCRIPT};
use crate::sandbox::{ifindex_of, SandboxSpec};

use super::reaper::{purge_flows, ReapJob};
use super::{io_err, now_unix, Daemon, DaemonError};

/// What `sandbox create` asks for.
struct CreateRequest<'a> {
    name: &'a str,
    policy: &'a str,
    /// The external VMM's tap to adopt.
    tap: Option<&'a str>,
    netns_guest: bool,
    vm: Option<VmCreate>,
}

/// The test guest's memory when `--vm` does not say.
const DEFAULT_VM_MEMORY_MIB: u32 = 64;

impl Daemon {
    pub(super) fn create(&mut self, name: &str, policy: &str, tap: Option<&str>, netns_guest: bool, vm: Option<VmCreate>) -> Result<SandboxInfo, DaemonError> {
        // The pool refills after the reply (see `TapPool::take` and
        // `Daemon::after_reply`), whatever the create's outcome.
        self.taps_taken += 1;
        self.create_now(CreateRequest { name, policy, tap, netns_guest, vm })
    }

    fn create_now(&mut self, request: CreateRequest<'_>) -> Result<SandboxInfo, DaemonError> {
        let CreateRequest { name, policy, .. } = request;
        let entry = self.check_create(&request)?;
        let (id, source, prepared_ca) = self.claim_id(&request)?;
        let (spec, compiled, policy_id) = match self.compile(id, &request, &entry) {
            Ok(compiled) => compiled,
            Err(e) => {
                // The CA (and the directory it was written ahead into)
                // goes before the id is free for a worker to make anew.
                drop(prepared_ca);
                self.pool.release(id);
                return Err(e);
            }
        };
        // The CA first: the data plane loads it with the route.
        let started = Instant::now();
        let ca = self.make_ca(name, prepared_ca);
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "create: CA saved");
        // The data plane reads the route (~0.15 ms: an 8 KB line parsed)
        // while the kernel work runs here; the create waits for its answer
        // before replying, so a guest's first connection is never refused.
        // Written and read on this thread: a thread woken to push it began
        // ~0.45 ms late (p50, `bench lifecycle` on a 2-vCPU VM).
        let plane_entry = self.plane_entry_for(&spec, policy, compiled.clone(), policy_id, ca.is_some());
        let link = self.shared.link.clone();
        let started = Instant::now();
        let pushed = link.upsert_begin(plane_entry);
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "create: route sent to the data plane");
        let install = InstallRequest { spec, policy: &entry.policy, policy_id, tap: source, netns_guest: request.netns_guest };
        let installed = self.host.install_compiled(install, compiled);
        // Read on every way out (dropping it does): the link's next call
        // (a failed create's remove) must not meet this answer. And read
        // now: the link stays locked until then.
        let started = Instant::now();
        pushed.finish();
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "create: waited for the data plane's route");
        let installed = match installed {
            Ok(installed) => installed,
            Err(e) => {
                self.shared.link.remove(name);
                let _ = std::fs::remove_dir_all(self.config.sandbox_ca_dir(name));
                self.pool.release(id);
                return Err(e.into());
            }
        };
        if let Some(ca) = ca {
            if request.netns_guest {
                if let Err(e) = trust_in_guest(&installed.spec.netns, &ca.lock().unwrap_or_else(|p| p.into_inner()).cert_pem) {
                    tracing::warn!(sandbox = %name, "guest trust store: {e}");
                }
            }
            self.in_force.cas.insert(name.to_string(), ca);
        }
        let started = Instant::now();
        let record = self.record_created(&request, &entry, &installed);
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "create: state saved after kernel work");
        // The daemon's table as the data plane's, also when the record was
        // not saved (the sandbox is installed and in memory either way).
        self.publish_own_route(name, &installed.spec);
        let record = record?;
        let record = match &request.vm {
            Some(vm) => self.start_vm(record, &installed, vm)?,
            None => record,
        };
        tracing::info!(sandbox = %name, tap = %installed.spec.tap, policy = %policy, "sandbox created");
        self.info(&record)
    }

    /// Starts the sandbox's microVM on its tap (the policy's mounts as its
    /// disks); a VM that does not come up takes the sandbox with it.
    fn start_vm(&mut self, mut record: SandboxRecord, installed: &InstalledSandbox, vm: &VmCreate) -> Result<SandboxRecord, DaemonError> {
        let spec = &installed.spec;
        let vm_spec = VmSpec {
            sandbox: record.name.clone(),
            tap: spec.tap.clone(),
            mac: spec.guest_mac,
            ipv4: spec.guest_ipv4,
            ipv4_prefix_len: crate::sandbox::SANDBOX_IPV4_PREFIX_LEN,
            gateway_ipv4: spec.gateway_ipv4,
            ipv6: spec.guest_ipv6,
            ipv6_prefix_len: crate::sandbox::SANDBOX_IPV6_PREFIX_LEN,
            gateway_ipv6: spec.gateway_ipv6,
            dns: spec.gateway_ipv4.into(),
            memory_mib: vm.memory_mib.unwrap_or(DEFAULT_VM_MEMORY_MIB),
            vcpus: 1,
            disks: installed.policy.filesystem.iter().map(|m| VmDisk { path: m.host.clone(), read_only: m.mode == crate::policy::MountMode::ReadOnly }).collect(),
            boot: VmBoot::Probe { script: vm.probe.clone().unwrap_or_else(|| SERVE_SCRIPT.to_string()) },
            console: Some(self.host.settings.vm_log(&record.name)),
        };
        let spec_file = self.config.state_dir.join(format!("vm-{}.json", record.name));
        let log = self.host.settings.vm_log(&record.name);
        // A new VM's console starts empty (not after an old one's).
        let _ = std::fs::remove_file(&log);
        let started = vm_spec.check().map_err(DaemonError::from).and_then(|()| Ok(spawn_vm(&self.host.settings.pump_exe, &vm_spec, &spec_file, &log)?));
        match started {
            Ok(pid) => {
                record.vm_pid = Some(pid);
                self.state.sandboxes.insert(record.name.clone(), record.clone());
                self.state.save_sandbox(&self.config.state_dir, &record.name)?;
                tracing::info!(sandbox = %record.name, pid, "microVM running");
                Ok(record)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&spec_file);
                if let Err(undo) = self.delete(&record.name) {
                    tracing::error!(sandbox = %record.name, "undoing a sandbox whose VM did not start: {undo}");
                }
                Err(e)
            }
        }
    }

    /// Refuses what cannot be created; returns the policy to enforce.
    fn check_create(&self, request: &CreateRequest<'_>) -> Result<PolicyEntry, DaemonError> {
        if self.state.sandboxes.contains_key(request.name) {
            return Err(DaemonError::SandboxExists(request.name.to_string()));
        }
        if request.tap.is_some() && request.netns_guest {
            return Err(DaemonError::TapWithNetnsGuest);
        }
        if request.vm.is_some() && (request.tap.is_some() || request.netns_guest) {
            return Err(DaemonError::VmWithOtherGuest);
        }
        let entry = self.policies.set.get(request.policy).cloned().ok_or_else(|| DaemonError::NoSuchPolicy {
            name: request.policy.to_string(),
            known: self.policies.set.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        if let Some(tap) = request.tap {
            sbx_vmm::tap::validate_ifname(tap).map_err(DaemonError::BadTapName)?;
            if self.state.sandboxes.values().any(|s| s.tap == tap) {
                return Err(DaemonError::TapTaken(tap.to_string()));
            }
        }
        Ok(entry)
    }

    /// The new sandbox's id, with a pre-warmed tap (attached already) and
    /// the CA made for it when one is ready and no tap is adopted.
    fn claim_id(&self, request: &CreateRequest<'_>) -> Result<(u32, TapSource, Option<PreparedCa>), DaemonError> {
        if request.tap.is_none() {
            if let Some(taken) = self.pool.take() {
                return Ok((taken.id, TapSource::Pooled { ifindex: taken.ifindex }, taken.ca));
            }
        }
        let id = self.pool.allocate().ok_or(DaemonError::PoolFull)?;
        Ok((id, if request.tap.is_some() { TapSource::Adopted } else { TapSource::New }, None))
    }

    /// The new sandbox's addressing, its policy compiled for it, and the
    /// fresh id of that policy generation.
    fn compile(&mut self, id: u32, request: &CreateRequest<'_>, entry: &PolicyEntry) -> Result<(SandboxSpec, Arc<CompiledPolicy>, u32), DaemonError> {
        let mut spec = SandboxSpec::new(id, request.name, &self.config.pools())?;
        if let Some(adopted) = request.tap {
            spec.tap = adopted.to_string();
        }
        let started = Instant::now();
        let compiled = Arc::new(self.host.compile_for(&entry.policy, &spec)?);
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "create: compiled");
        Ok((spec, compiled, self.state.take_policy_id()))
    }

    /// The sandbox's own CA for the credential proxy (the guest is told
    /// where its certificate is: `ca_cert`; the key stays in the state
    /// dir), saved. `prepared` was made ahead for this sandbox by the tap
    /// pool (moved here, so used once); without one, a CA is made now.
    /// None: no CA, so the sandbox's credential hosts are refused.
    ///
    /// While a data plane of an older build serves (its upgrade failed),
    /// the CA names the sandbox, as that build makes its leaves' issuer.
    fn make_ca(&self, name: &str, prepared: Option<PreparedCa>) -> Option<Arc<Mutex<SandboxCa>>> {
        let prepared = match prepared {
            Some(prepared) => Ok(prepared),
            None => PreparedCa::generate(),
        };
        let ca = prepared.and_then(|prepared| match self.shared.link.serves_key_named_cas() {
            true => SandboxCa::from_prepared(prepared),
            false => SandboxCa::from_prepared_naming(name, prepared),
        });
        match ca.and_then(|mut ca| ca.save(&self.config.sandbox_ca_dir(name)).map(|_| ca)) {
            Ok(ca) => Some(Arc::new(Mutex::new(ca))),
            Err(e) => {
                tracing::warn!(sandbox = %name, "no CA for the credential proxy: {e}");
                None
            }
        }
    }

    /// Records the installed sandbox (state file, policy in force).
    fn record_created(&mut self, request: &CreateRequest<'_>, entry: &PolicyEntry, installed: &InstalledSandbox) -> Result<SandboxRecord, DaemonError> {
        let hash = text_hash(&entry.source, &entry.text);
        self.state.policy_texts.insert(hash.clone(), PolicyText { source: entry.source.clone(), text: entry.text.clone() });
        let record = SandboxRecord {
            id: installed.spec.id,
            name: request.name.to_string(),
            policy: request.policy.to_string(),
            tap: installed.spec.tap.clone(),
            adopted_tap: installed.adopted_tap,
            netns_guest: request.netns_guest,
            pump_pid: installed.pump_pid,
            vm_pid: None,
            policy_id: installed.policy_id,
            policy_hash: hash,
            policy_generation: self.state.policy_generation,
            created_unix: now_unix(),
        };
        self.state.sandboxes.insert(request.name.to_string(), record.clone());
        self.in_force.policies.insert(request.name.to_string(), installed.policy.clone());
        self.state.save_sandbox(&self.config.state_dir, request.name)?;
        Ok(record)
    }

    pub(super) fn delete(&mut self, name: &str) -> Result<(), DaemonError> {
        let record = self.state.sandboxes.get(name).cloned().ok_or_else(|| DaemonError::NoSuchSandbox(name.to_string()))?;
        let spec = self.spec(&record)?;
        // The VM first: it lets go of the tap, then the tap goes.
        let mut vm_left = Vec::new();
        if let Some(pid) = record.vm_pid {
            if let Err(e) = stop_vm(pid, name) {
                vm_left.push(e.to_string());
            }
            let _ = std::fs::remove_file(self.config.state_dir.join(format!("vm-{name}.json")));
        }
        // Clear the tap's datapath slot while its ifindex still names it:
        // from here on the classifier drops the tap's frames.
        let ifindex = ifindex_of(&record.tap);
        if let Some(policy) = self.in_force.policies.remove(name) {
            match ifindex {
                Some(i) => self.host.datapath.remove_sandbox(i, record.policy_id, &policy)?,
                None => self.host.datapath.remove_policy(record.policy_id, &policy),
            }
        }
        let mut left = vm_left;
        left.extend(match (record.adopted_tap, ifindex) {
            (false, Some(ifindex)) => self.hand_to_reaper(&record, &spec, ifindex)?,
            _ => {
                let left = remove_from_host(&self.host.netlink, &self.host.nft, &self.host.settings.link_pin(name), &spec, record.pump_pid, record.adopted_tap);
                purge_flows(&self.config.bpf_dir, &BTreeSet::from([record.id]));
                self.pool.release(record.id);
                left
            }
        });
        // The data plane forgets its learned addresses and flow series too.
        self.unpublish_routes(&spec);
        self.in_force.cas.remove(name);
        let _ = std::fs::remove_dir_all(self.config.sandbox_ca_dir(name));
        self.state.sandboxes.remove(name);
        self.state.prune_texts();
        self.state.save_sandbox(&self.config.state_dir, name)?;
        if !left.is_empty() {
            tracing::error!(sandbox = %name, "deleted, but left: {}", left.join("; "));
            return Err(DaemonError::Left { name: name.to_string(), left });
        }
        tracing::info!(sandbox = %name, "sandbox deleted");
        Ok(())
    }

    /// Unregistering a netdev waits for RCU several times (~35 ms here); the
    /// reaper does it after we answer. Until then the tap stays
    /// fail-closed: classifier attached (its pin is renamed, not removed),
    /// slot empty, out of the nftables set. Returns what is left.
    fn hand_to_reaper(&mut self, record: &SandboxRecord, spec: &SandboxSpec, ifindex: u32) -> Result<Vec<String>, DaemonError> {
        let mut left = Vec::new();
        if let Some(pid) = record.pump_pid {
            if let Err(e) = stop_pump(pid, &record.name, &spec.netns) {
                left.push(e.to_string());
            }
        }
        if let Err(e) = self.host.nft.remove_tap(&record.tap) {
            left.push(format!("nftables element {} ({e})", record.tap));
        }
        let reap_pin = self.host.settings.link_pin(&reap_pin_name(record.id));
        std::fs::rename(self.host.settings.link_pin(&record.name), &reap_pin).map_err(io_err(&reap_pin))?;
        let job = ReapJob { id: record.id, tap: record.tap.clone(), ifindex, pin: reap_pin };
        left.extend(self.reaper.reap(job, &self.host.netlink, &self.config.bpf_dir));
        Ok(left)
    }
}

/// Makes a netns guest trust its sandbox's CA: `ip netns exec` shows
/// /etc/netns/NETNS/ssl as the guest's /etc/ssl, so that becomes a copy of
/// the host's with the CA appended to the bundle (curl, openssl, Python's
/// ssl read it). Removed with the guest's namespace.
pub(super) fn trust_in_guest(netns: &str, ca_pem: &str) -> std::io::Result<()> {
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
