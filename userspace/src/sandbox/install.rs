//! Putting a sandbox on the host and taking it off again: the tap (new,
//! pre-warmed or adopted) with its gateway side, the policy compiled for
//! this host, the datapath config, the classifier's pinned TCX link, the
//! nftables membership and the netns guest's pump. The daemon installs every
//! sandbox through [`SandboxHost::install`], and the enforcement tests and
//! the datapath benchmark do too, so they exercise what production runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sbx_net_common::{sandbox_flags, SandboxConfig};
use sbx_vmm::netlink::NetlinkError;
use sbx_vmm::Netlink;

use crate::datapath::nft::{NftConfig, NftError, Nftables};
use crate::datapath::{Datapath, DatapathError};
use crate::policy::compile::{CompileError, CompiledPolicy};
use crate::policy::Policy;
use crate::sandbox::denies::{compile_for_sandbox, HostAddresses};
use crate::sandbox::guest_pump::{spawn_pump, stop_pump, PumpError, PumpSpec};
use crate::sandbox::tap_pool::pool_pin_name;
use crate::sandbox::{configure_host_side, ifindex_of, open_host_tap, AddressPools, SandboxError, SandboxSpec};

/// The datapath flags every sandbox runs with: its DNS and proxied ports
/// pass to nftables' redirects (the proxies), and its flows are tracked
/// (for `inspect` and the metrics).
pub const SANDBOX_FLAGS: u32 = sandbox_flags::REDIRECTS | sandbox_flags::FLOWS;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("interface {0} already exists (not ours)")]
    InterfaceExists(String),
    #[error("pre-warmed tap {0} changed under us")]
    PooledTapChanged(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("reading the host's addresses: {0}")]
    HostAddresses(#[source] NetlinkError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("making tap {tap} persistent: {source}")]
    Persist { tap: String, source: sbx_vmm::tap::TapError },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Pump(#[from] PumpError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.display().to_string(), source }
}

/// What every sandbox on this host shares, as plain data.
#[derive(Clone, Debug)]
pub struct HostSettings {
    pub pools: AddressPools,
    /// The nftables table. Its redirected ports are the sandboxes'
    /// proxied ports too: the classifier lets them pass because the table
    /// sends them to the proxy.
    pub nft: NftConfig,
    /// The bpffs directory of the sandboxes' pinned links.
    pub links_dir: PathBuf,
    /// The `sbx-net` executable that runs netns guests' pumps
    /// (`sbx-net __guest-pump`).
    pub pump_exe: PathBuf,
    /// Where the pumps write their logs.
    pub log_dir: PathBuf,
}

impl HostSettings {
    /// Where a sandbox's classifier link is pinned.
    pub fn link_pin(&self, sandbox: &str) -> PathBuf {
        self.links_dir.join(sandbox)
    }

    /// The log of a sandbox's microVM: its console and the VMM's messages.
    pub fn vm_log(&self, sandbox: &str) -> PathBuf {
        self.log_dir.join(format!("vm-{sandbox}.log"))
    }

    /// The log of a sandbox's guest pump.
    pub fn pump_log(&self, sandbox: &str) -> PathBuf {
        self.log_dir.join(format!("guest-{sandbox}.log"))
    }
}

/// Where a sandbox's tap comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// A new persistent tap named as the spec says; no interface may have
    /// that name yet.
    New,
    /// A pre-warmed tap of the pool (`sbx-<id>`, see
    /// [`crate::sandbox::tap_pool`]): made, given its gateway side, its
    /// classifier attached and pinned under its pool name.
    Pooled { ifindex: u32 },
    /// A tap an external VMM made (the spec's `tap`): given its gateway side
    /// here, left to the VMM (down) when the sandbox goes.
    Adopted,
}

/// One sandbox to put on the host.
pub struct InstallRequest<'a> {
    /// Its addressing, with the tap name to use.
    pub spec: SandboxSpec,
    pub policy: &'a Policy,
    /// The trie key prefix of the policy generation (fresh for each).
    pub policy_id: u32,
    pub tap: TapSource,
    /// Start a netns guest on the tap (`ip netns exec sbx-NAME …`).
    pub netns_guest: bool,
}

/// A sandbox on the host, as [`SandboxHost::install`] left it.
#[derive(Debug)]
pub struct InstalledSandbox {
    pub spec: SandboxSpec,
    pub ifindex: u32,
    /// The policy compiled for this sandbox on this host (what its trie
    /// entries hold).
    pub policy: Arc<CompiledPolicy>,
    pub policy_id: u32,
    /// The netns guest's pump process.
    pub pump_pid: Option<u32>,
    pub adopted_tap: bool,
}

/// A step of an install that failed half way, to undo (newest first).
enum Undo {
    DeleteTap { ifindex: u32 },
    Unpin(PathBuf),
    ClearDatapath { ifindex: u32, policy_id: u32 },
    LeaveNftSet(String),
}

/// The kernel pieces every sandbox on this host goes through: the loaded
/// datapath, the nftables table, a netlink socket of the calling thread's
/// namespace, and the settings they share.
pub struct SandboxHost {
    pub datapath: Datapath,
    pub nft: Nftables,
    pub netlink: Netlink,
    pub settings: HostSettings,
    /// The host's addresses to deny, read again only after they changed.
    addresses: std::sync::Mutex<HostAddresses>,
}

impl SandboxHost {
    /// Works in the calling thread's network namespace (where the netlink
    /// socket is opened, and where taps are looked up and attached to).
    pub fn new(datapath: Datapath, settings: HostSettings) -> Result<SandboxHost, InstallError> {
        // Subscribed before the first read, in the same namespace.
        let addresses = std::sync::Mutex::new(HostAddresses::new());
        Ok(SandboxHost { datapath, nft: Nftables::new(), netlink: Netlink::new()?, settings, addresses })
    }

    /// Replaces the nftables table, with `taps` as the sandbox taps (one
    /// transaction; [`SandboxHost::install`] adds to it).
    pub fn install_table(&self, taps: &[String]) -> Result<(), InstallError> {
        Ok(self.nft.install(&self.settings.nft, taps)?)
    }

    /// `policy` compiled for the sandbox `spec` with the host's addresses
    /// as they are now (see [`crate::sandbox::denies`]; kept between
    /// compiles until the kernel announces a change).
    pub fn compile_for(&self, policy: &Policy, spec: &SandboxSpec) -> Result<CompiledPolicy, InstallError> {
        let addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner()).get(&self.netlink, &self.settings.pools).map_err(InstallError::HostAddresses)?;
        Ok(compile_for_sandbox(policy, spec, &addresses, &self.settings.pools)?)
    }

    /// The tap's datapath config for `policy` under `policy_id`.
    pub fn datapath_config(&self, spec: &SandboxSpec, policy: &CompiledPolicy, policy_id: u32) -> SandboxConfig {
        spec.datapath_config(policy, policy_id, SANDBOX_FLAGS, &self.settings.nft.proxied_ports)
    }

    /// Puts a sandbox on the host: tap, policy, config, pinned link, nftables
    /// membership, pump. Undoes its own steps on an error.
    pub fn install(&mut self, request: InstallRequest<'_>) -> Result<InstalledSandbox, InstallError> {
        let started = Instant::now();
        let compiled = Arc::new(self.compile_for(request.policy, &request.spec)?);
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "install: compiled");
        self.install_compiled(request, compiled)
    }

    /// [`SandboxHost::install`] with `request.policy` compiled already for
    /// `request.spec` ([`SandboxHost::compile_for`]): the daemon hands the
    /// compiled policy to the data plane while the kernel work runs.
    pub fn install_compiled(&mut self, request: InstallRequest<'_>, compiled: Arc<CompiledPolicy>) -> Result<InstalledSandbox, InstallError> {
        let InstallRequest { spec, policy_id, tap, netns_guest, .. } = request;
        if tap == TapSource::New && self.netlink.link_exists(&spec.tap) {
            return Err(InstallError::InterfaceExists(spec.tap));
        }
        let pin = self.settings.link_pin(&spec.name);
        let links_dir = pin.parent().expect("a pin has a parent");
        std::fs::create_dir_all(links_dir).map_err(io_err(links_dir))?;
        let mut undo = Vec::new();
        match self.install_steps(&spec, &compiled, policy_id, tap, netns_guest, &mut undo) {
            Ok((ifindex, pump_pid)) => Ok(InstalledSandbox { spec, ifindex, policy: compiled, policy_id, pump_pid, adopted_tap: tap == TapSource::Adopted }),
            Err(e) => {
                self.undo(undo, &compiled);
                Err(e)
            }
        }
    }

    /// The steps of [`SandboxHost::install`], each registering its undo in
    /// `undo`: (ifindex, pump pid).
    fn install_steps(
        &mut self,
        spec: &SandboxSpec,
        compiled: &CompiledPolicy,
        policy_id: u32,
        tap: TapSource,
        netns_guest: bool,
        undo: &mut Vec<Undo>,
    ) -> Result<(u32, Option<u32>), InstallError> {
        let started = Instant::now();
        let step = |what: &str| tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "install: {what}");
        let ifindex = self.ready_tap(spec, tap, undo)?;
        step("tap ready");
        self.write_datapath(spec, compiled, policy_id, ifindex, undo)?;
        step("maps written");
        self.pin_classifier(spec, tap, undo)?;
        step("link pinned");
        self.nft.add_tap(&spec.tap)?;
        undo.push(Undo::LeaveNftSet(spec.tap.clone()));
        step("nft element added");
        let pump_pid = if netns_guest {
            Some(spawn_pump(&self.settings.pump_exe, &PumpSpec::new(spec), &self.settings.pump_log(&spec.name))?)
        } else {
            None
        };
        Ok((ifindex, pump_pid))
    }

    /// The sandbox's tap with its gateway side: its ifindex.
    fn ready_tap(&mut self, spec: &SandboxSpec, tap: TapSource, undo: &mut Vec<Undo>) -> Result<u32, InstallError> {
        match tap {
            TapSource::Adopted => {
                let ifindex = self.netlink.link_index(&spec.tap)?;
                configure_host_side(&self.netlink, spec, ifindex)?;
                Ok(ifindex)
            }
            TapSource::Pooled { ifindex } => {
                undo.push(Undo::DeleteTap { ifindex });
                undo.push(Undo::Unpin(self.settings.link_pin(&pool_pin_name(spec.id))));
                if ifindex_of(&spec.tap) != Some(ifindex) {
                    return Err(InstallError::PooledTapChanged(spec.tap.clone()));
                }
                Ok(ifindex)
            }
            TapSource::New => {
                let (tap, ifindex) = open_host_tap(&self.netlink, spec)?;
                undo.push(Undo::DeleteTap { ifindex });
                // Persistent: the tap outlives this fd (the pump or VMM
                // opens it) and the process that made it.
                tap.set_persist(true).map_err(|source| InstallError::Persist { tap: spec.tap.clone(), source })?;
                Ok(ifindex)
            }
        }
    }

    /// The policy entries and the config that makes the classifier use them.
    fn write_datapath(&mut self, spec: &SandboxSpec, compiled: &CompiledPolicy, policy_id: u32, ifindex: u32, undo: &mut Vec<Undo>) -> Result<(), InstallError> {
        let config = self.datapath_config(spec, compiled, policy_id);
        // The id may have served an earlier sandbox: its traffic is not ours.
        self.datapath.reset_sandbox_counters(spec.id)?;
        self.datapath.install_sandbox(ifindex, &config, compiled)?;
        undo.push(Undo::ClearDatapath { ifindex, policy_id });
        Ok(())
    }

    /// The classifier on the tap, its link pinned under the sandbox's name
    /// (a pooled tap's link is attached already: its pin is renamed).
    fn pin_classifier(&mut self, spec: &SandboxSpec, tap: TapSource, undo: &mut Vec<Undo>) -> Result<(), InstallError> {
        let pin = self.settings.link_pin(&spec.name);
        if let TapSource::Pooled { .. } = tap {
            std::fs::rename(self.settings.link_pin(&pool_pin_name(spec.id)), &pin).map_err(io_err(&pin))?;
        } else {
            self.datapath.attach_pinned(&spec.tap, &pin)?;
        }
        undo.push(Undo::Unpin(pin));
        Ok(())
    }

    fn undo(&mut self, steps: Vec<Undo>, compiled: &CompiledPolicy) {
        for step in steps.into_iter().rev() {
            match step {
                Undo::DeleteTap { ifindex } => {
                    let _ = self.netlink.delete_link(ifindex);
                }
                Undo::Unpin(pin) => {
                    let _ = Datapath::unpin_link(&pin);
                }
                Undo::ClearDatapath { ifindex, policy_id } => {
                    self.datapath.map_write_failures().count(sbx_net_common::map_names::SANDBOXES, self.datapath.remove_sandbox(ifindex, policy_id, compiled));
                }
                Undo::LeaveNftSet(tap) => {
                    let _ = self.nft.remove_tap(&tap);
                }
            }
        }
    }

    /// Takes a sandbox off the host: its map entries and config, then
    /// everything [`remove_from_host`] removes. Returns what is left.
    pub fn uninstall(&mut self, sandbox: &InstalledSandbox) -> Vec<String> {
        let mut left = Vec::new();
        if let Err(e) = self.datapath.remove_sandbox(sandbox.ifindex, sandbox.policy_id, &sandbox.policy) {
            left.push(format!("datapath entries of {} ({e})", sandbox.spec.name));
        }
        left.extend(remove_from_host(&self.netlink, &self.nft, &self.settings.link_pin(&sandbox.spec.name), &sandbox.spec, sandbox.pump_pid, sandbox.adopted_tap));
        left
    }
}

/// Removes a sandbox's kernel pieces except its map entries: the pump and
/// guest namespace, the nftables element, the pinned link `pin`, and the
/// tap when it is ours (an adopted tap is set down instead: without its
/// classifier and nftables membership it must not carry traffic). Needs no
/// loaded datapath (`daemon --cleanup` runs it). Every piece is attempted;
/// returns what is left.
pub fn remove_from_host(netlink: &Netlink, nft: &Nftables, pin: &Path, spec: &SandboxSpec, pump_pid: Option<u32>, adopted_tap: bool) -> Vec<String> {
    let mut left = Vec::new();
    if let Some(pid) = pump_pid {
        if let Err(e) = stop_pump(pid, &spec.name, &spec.netns) {
            left.push(e.to_string());
        }
    }
    if let Err(e) = nft.remove_tap(&spec.tap) {
        left.push(format!("nftables element {} ({e})", spec.tap));
    }
    if let Err(e) = Datapath::unpin_link(pin) {
        left.push(format!("pinned link {} ({e})", pin.display()));
    }
    if adopted_tap {
        if let Ok(ifindex) = netlink.link_index(&spec.tap) {
            if let Err(e) = netlink.set_down(ifindex) {
                left.push(format!("adopted tap {} still up ({e})", spec.tap));
            }
        }
    } else if let Ok(ifindex) = netlink.link_index(&spec.tap) {
        // A persistent tap must be un-persisted or deleted by netlink.
        if let Err(e) = netlink.delete_link(ifindex) {
            left.push(format!("tap {} ({e})", spec.tap));
        }
    }
    // Verified, unless an error above already named it.
    if !adopted_tap && ifindex_of(&spec.tap).is_some() && !left.iter().any(|l| l.starts_with(&format!("tap {}", spec.tap))) {
        left.push(format!("tap {}", spec.tap));
    }
    if pin.exists() && !left.iter().any(|l| l.starts_with("pinned link")) {
        left.push(format!("pinned link {}", pin.display()));
    }
    left
}
