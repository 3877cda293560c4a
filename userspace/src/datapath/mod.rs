//! The loaded eBPF object: programs, maps, TCX attachment, and the writes
//! that install a sandbox's configuration and compiled policy.

pub mod events;
pub mod learned;
pub mod nft;
pub mod tcx;
pub mod write_failures;

use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::tc::{SchedClassifierLinkId, TcAttachOptions, TcAttachType};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfError, EbpfLoader};
use sbx_net_common::{
    map_names, program_names, Counter, FlowEvent, FlowKey, FlowKeyV4, FlowStats, KeyV4, KeyV6, PolicyValue, SandboxConfig,
    COUNTER_ARRAY_LEN, EVENTS_LOST_SLOT, EVENTS_RING_BYTES, MAX_FLOWS, MAX_POLICY_ENTRIES, MAX_SANDBOXES,
    SANDBOX_ID_BITS, SANDBOX_SLOTS, VERDICT_CLASSES,
};

use crate::policy::compile::CompiledPolicy;
use write_failures::{FailedWrite, MapWriteFailures};

/// The object built by build.rs from ebpf/prog.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sbx-net-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("eBPF object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: Box<ProgramError> },
    #[error("attaching {program} to {interface} (TCX ingress): {source}")]
    Attach { program: &'static str, interface: String, source: Box<ProgramError> },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: Box<MapError> },
    #[error("starting aya-log: {0}")]
    Logger(String),
    #[error("pinned link {path}: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source: Box::new(source) }
}

impl FailedWrite for DatapathError {
    fn map(&self) -> Option<&'static str> {
        match self {
            DatapathError::Map { name, .. } | DatapathError::Missing { name, .. } => Some(name),
            _ => None,
        }
    }

    fn entry_was_absent(&self) -> bool {
        matches!(self, DatapathError::Map { source, .. } if source.entry_was_absent())
    }
}

/// DNS-learned entries moving to a new policy generation: those recomputed
/// under the new policy (`carried`), and the old generation's keys.
#[derive(Clone, Debug, Default)]
pub struct LearnedSwitch {
    pub carried: Vec<(IpAddr, PolicyValue)>,
    pub old: Vec<IpAddr>,
}

/// Load-time settings, as plain data.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Capacity of each policy trie (entries are allocated on insert, so a
    /// large capacity costs nothing until used).
    pub policy_capacity: u32,
    /// Forward the program's aya-log output to the `log` facade.
    pub enable_logs: bool,
    /// Pin the maps here (bpffs), reusing maps already pinned there, so
    /// enforcement state outlives the process. `None`: private maps.
    pub pin_dir: Option<PathBuf>,
    /// Size of the event ring buffer in bytes (a power of two, at least a page).
    pub events_ring_bytes: u32,
    /// Capacity of the LRU flow table.
    pub flow_capacity: u32,
    /// Also load the benchmark's step probes (`program_names::BENCH_STEPS`).
    pub bench_steps: bool,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions {
            policy_capacity: MAX_POLICY_ENTRIES,
            enable_logs: false,
            pin_dir: None,
            events_ring_bytes: EVENTS_RING_BYTES,
            flow_capacity: MAX_FLOWS,
            bench_steps: false,
        }
    }
}

/// The maps whose content is enforcement state (pinned when asked).
const PINNED_MAPS: [&str; 9] = [
    map_names::SANDBOX_SLOTS,
    map_names::SANDBOXES,
    map_names::POLICY_V4,
    map_names::POLICY_V6,
    map_names::COUNTERS,
    map_names::EVENTS,
    map_names::FLOWS,
    map_names::FLOWS_V4,
    map_names::SANDBOX_COUNTERS,
];

pub struct Datapath {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pin_dir: Option<PathBuf>,
    /// Removes nobody can act on failing (undo, cleanup), counted.
    write_failures: MapWriteFailures,
}

impl Datapath {
    /// Loads the object and all its programs (verifier included).
    pub fn load(options: &DatapathOptions) -> Result<Datapath, DatapathError> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::POLICY_V4, options.policy_capacity)
            .map_max_entries(map_names::POLICY_V6, options.policy_capacity)
            .map_max_entries(map_names::EVENTS, options.events_ring_bytes)
            .map_max_entries(map_names::FLOWS, options.flow_capacity)
            .map_max_entries(map_names::FLOWS_V4, options.flow_capacity);
        let pin_paths: Vec<(&str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
                PINNED_MAPS.iter().map(|name| (*name, dir.join(name))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            if *name == map_names::COUNTERS {
                drop_stale_counters(path);
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))?;
        // The logger takes the AYA_LOGS ring buffer; it must exist before the
        // programs load and live as long as they do.
        let logger = if options.enable_logs {
            Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(|e| DatapathError::Logger(e.to_string()))?)
        } else {
            None
        };
        let steps: &[&'static str] = if options.bench_steps { &program_names::BENCH_STEPS } else { &[] };
        for &name in [program_names::EGRESS, program_names::BENCH_EMPTY, program_names::BENCH_ONE_LOOKUP].iter().chain(steps) {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing { kind: "program", name })?
                .try_into()
                .map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
            program.load().map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        }
        Ok(Datapath { ebpf, logger, pin_dir: options.pin_dir.clone(), write_failures: MapWriteFailures::default() })
    }

    /// The counts of map writes whose failure was not returned (removes
    /// during undo and cleanup); share it with other writers of the maps.
    pub fn map_write_failures(&self) -> MapWriteFailures {
        self.write_failures.clone()
    }

    /// Instructions the verifier processed for each program of the object
    /// (`bpf_prog_info.verified_insns`, the kernel's `insn_processed`: the
    /// "processed N insns" of the verifier log, against its 1 M limit).
    /// aya 0.14 reads the verifier log only when a load fails, so this is
    /// how a loaded program's count is known. `None`: a kernel before 5.16.
    pub fn verified_instruction_counts(&self) -> Result<Vec<(&'static str, Option<u32>)>, DatapathError> {
        [program_names::EGRESS, program_names::BENCH_EMPTY, program_names::BENCH_ONE_LOOKUP]
            .into_iter()
            .map(|name| {
                let info = self.program(name)?.info().map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
                Ok((name, info.verified_instruction_count()))
            })
            .collect()
    }

    /// A clone of the classifier's fd, for attaching from other threads.
    pub fn egress_program_fd(&self) -> Result<aya::programs::ProgramFd, DatapathError> {
        let name = program_names::EGRESS;
        let fd = self.program(name)?.fd().map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        fd.try_clone().map_err(|e| DatapathError::Program { name, source: Box::new(ProgramError::from(e)) })
    }

    /// Removes the pinned maps (their memory goes with the last user).
    pub fn unpin_maps(&self) -> Result<(), DatapathError> {
        let Some(dir) = &self.pin_dir else { return Ok(()) };
        for name in PINNED_MAPS {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::PinDir { path, source }),
            }
        }
        Ok(())
    }

    /// Attaches the classifier to `interface` (TCX ingress) and pins the link
    /// at `pin`, so it stays attached when this process exits.
    pub fn attach_pinned(&mut self, interface: &str, pin: &Path) -> Result<(), DatapathError> {
        let link_err = |reason: String| DatapathError::Link { path: pin.to_path_buf(), reason };
        let name = program_names::EGRESS;
        let id = self.attach(name, interface)?;
        let link = self
            .program_mut(name)?
            .take_link(id)
            .map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        let fd_link = FdLink::try_from(link).map_err(|e| link_err(e.to_string()))?;
        // Dropping the returned PinnedLink closes our fd; the pin holds the link.
        fd_link.pin(pin).map_err(|e| link_err(e.to_string()))?;
        Ok(())
    }

    /// Re-adopts the link pinned at `pin` (made by this or an earlier
    /// process): atomically swaps the program it runs for this object's
    /// classifier (`bpf_link_update`), so the tap is never without one.
    pub fn adopt_pinned(&mut self, pin: &Path) -> Result<(), DatapathError> {
        let link_err = |reason: String| DatapathError::Link { path: pin.to_path_buf(), reason };
        let name = program_names::EGRESS;
        let pinned = PinnedLink::from_pin(pin).map_err(|e| link_err(e.to_string()))?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| link_err(e.to_string()))?;
        let program = self.program_mut(name)?;
        let id = program.attach_to_link(link).map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        // Drop our fd only (an FdLink's detach just closes it); the pin stays.
        let link = program.take_link(id).map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        drop(link);
        Ok(())
    }

    /// Removes a pinned link: the classifier detaches when the tap's last
    /// reference to it goes (now, unless someone else holds the link).
    pub fn unpin_link(pin: &Path) -> Result<(), DatapathError> {
        match std::fs::remove_file(pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DatapathError::Link { path: pin.to_path_buf(), reason: e.to_string() }),
        }
    }

    /// Forwards pending aya-log records (call when the logger fd is readable).
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }

    pub fn log_fd(&self) -> Option<RawFd> {
        self.logger.as_ref().map(|l| l.as_raw_fd())
    }

    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::Missing { kind: "program", name })?
            .try_into()
            .map_err(|e| DatapathError::Program { name, source: Box::new(e) })
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing { kind: "program", name })?
            .try_into()
            .map_err(|e| DatapathError::Program { name, source: Box::new(e) })
    }

    /// Attaches `program` with TCX to TC ingress (frames from the guest) of
    /// `interface`, in the calling thread's network namespace.
    pub fn attach(&mut self, program: &'static str, interface: &str) -> Result<SchedClassifierLinkId, DatapathError> {
        self.program_mut(program)?
            .attach_with_options(interface, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(|e| DatapathError::Attach { program, interface: interface.to_string(), source: Box::new(e) })
    }

    pub fn detach(&mut self, program: &'static str, link: SchedClassifierLinkId) -> Result<(), DatapathError> {
        self.program_mut(program)?
            .detach(link)
            .map_err(|e| DatapathError::Program { name: program, source: Box::new(e) })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing { kind: "map", name })
    }

    /// Installs a sandbox on the tap with `ifindex`: policy entries first
    /// (under `config.policy_id`), then the config that makes the program use
    /// them, so no packet sees a sandbox without its policy.
    pub fn install_sandbox(
        &mut self,
        ifindex: u32,
        config: &SandboxConfig,
        policy: &CompiledPolicy,
    ) -> Result<(), DatapathError> {
        self.write_policy(config.policy_id, policy)?;
        self.write_config(ifindex, config)
    }

    /// Switches a tap to a new policy generation without a moment of mixed
    /// state: the new entries are written under `config.policy_id` (a fresh
    /// id) while the old ones still decide, then one config write switches
    /// the key prefix, then the old entries are removed. On an error before
    /// the switch, the new entries are removed and the old policy stays.
    pub fn switch_policy(
        &mut self,
        ifindex: u32,
        config: &SandboxConfig,
        policy: &CompiledPolicy,
        old_policy_id: u32,
        old_policy: &CompiledPolicy,
        learned: &LearnedSwitch,
    ) -> Result<(), DatapathError> {
        let written = self
            .write_policy(config.policy_id, policy)
            .and_then(|()| self.write_learned(config.policy_id, &learned.carried))
            .and_then(|()| self.write_config(ifindex, config));
        if let Err(e) = written {
            self.remove_policy(config.policy_id, policy);
            self.remove_learned(config.policy_id, learned.carried.iter().map(|(ip, _)| *ip));
            return Err(e);
        }
        self.remove_policy(old_policy_id, old_policy);
        self.remove_learned(old_policy_id, learned.old.iter().copied());
        Ok(())
    }

    /// Writes learned /32 and /128 entries under `policy_id`.
    pub fn write_learned(&mut self, policy_id: u32, entries: &[(IpAddr, PolicyValue)]) -> Result<(), DatapathError> {
        for (ip, value) in entries {
            match ip {
                IpAddr::V4(a) => {
                    let name = map_names::POLICY_V4;
                    let mut v4: LpmTrie<_, KeyV4, PolicyValue> = LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
                    v4.insert(&key_v4(policy_id, a.octets(), 32), value, 0).map_err(map_err(name))?;
                }
                IpAddr::V6(a) => {
                    let name = map_names::POLICY_V6;
                    let mut v6: LpmTrie<_, KeyV6, PolicyValue> = LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
                    v6.insert(&key_v6(policy_id, a.octets(), 128), value, 0).map_err(map_err(name))?;
                }
            }
        }
        Ok(())
    }

    /// Removes learned /32 and /128 keys (missing ones are fine). Where the
    /// compiled policy has its own entry at such an address, the caller
    /// removes or rewrites it as part of that policy.
    pub fn remove_learned(&mut self, policy_id: u32, ips: impl Iterator<Item = IpAddr>) {
        let failures = self.write_failures.clone();
        for ip in ips {
            match ip {
                IpAddr::V4(a) => {
                    if let Ok(mut v4) = self.map_mut(map_names::POLICY_V4).and_then(|m| LpmTrie::<_, KeyV4, PolicyValue>::try_from(m).map_err(map_err(map_names::POLICY_V4))) {
                        failures.count(map_names::POLICY_V4, v4.remove(&key_v4(policy_id, a.octets(), 32)));
                    }
                }
                IpAddr::V6(a) => {
                    if let Ok(mut v6) = self.map_mut(map_names::POLICY_V6).and_then(|m| LpmTrie::<_, KeyV6, PolicyValue>::try_from(m).map_err(map_err(map_names::POLICY_V6))) {
                        failures.count(map_names::POLICY_V6, v6.remove(&key_v6(policy_id, a.octets(), 128)));
                    }
                }
            }
        }
    }

    /// Writes (or, with an all-zero config, clears) the config of a tap.
    pub fn write_config(&mut self, ifindex: u32, config: &SandboxConfig) -> Result<(), DatapathError> {
        if ifindex < SANDBOX_SLOTS {
            let name = map_names::SANDBOX_SLOTS;
            let mut slots: Array<_, SandboxConfig> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            return write_slot_config(&mut slots, ifindex, config);
        }
        let name = map_names::SANDBOXES;
        let mut sandboxes: HashMap<_, u32, SandboxConfig> = HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        write_hashed_config(&mut sandboxes, ifindex, config)
    }

    /// Writes every entry of `policy` under `policy_id`.
    pub fn write_policy(&mut self, policy_id: u32, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        {
            let mut v4: LpmTrie<_, KeyV4, PolicyValue> =
                LpmTrie::try_from(self.map_mut(map_names::POLICY_V4)?).map_err(map_err(map_names::POLICY_V4))?;
            for (addr, len, value) in &policy.v4 {
                v4.insert(&key_v4(policy_id, addr.octets(), *len), value, 0)
                    .map_err(map_err(map_names::POLICY_V4))?;
            }
        }
        let mut v6: LpmTrie<_, KeyV6, PolicyValue> =
            LpmTrie::try_from(self.map_mut(map_names::POLICY_V6)?).map_err(map_err(map_names::POLICY_V6))?;
        for (addr, len, value) in &policy.v6 {
            v6.insert(&key_v6(policy_id, addr.octets(), *len), value, 0)
                .map_err(map_err(map_names::POLICY_V6))?;
        }
        Ok(())
    }

    /// Removes the sandbox's config (the program then drops its frames as
    /// an unknown sandbox), then its entries.
    pub fn remove_sandbox(&mut self, ifindex: u32, policy_id: u32, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        self.write_config(ifindex, &SandboxConfig::default())?;
        self.remove_policy(policy_id, policy);
        Ok(())
    }

    /// Removes the entries of `policy` under `policy_id` (missing ones are
    /// fine: removal is also the undo of a partial write).
    pub fn remove_policy(&mut self, policy_id: u32, policy: &CompiledPolicy) {
        let failures = self.write_failures.clone();
        if let Ok(map) = self.map_mut(map_names::POLICY_V4) {
            if let Ok(mut v4) = LpmTrie::<_, KeyV4, PolicyValue>::try_from(map) {
                for (addr, len, _) in &policy.v4 {
                    failures.count(map_names::POLICY_V4, v4.remove(&key_v4(policy_id, addr.octets(), *len)));
                }
            }
        }
        if let Ok(map) = self.map_mut(map_names::POLICY_V6) {
            if let Ok(mut v6) = LpmTrie::<_, KeyV6, PolicyValue>::try_from(map) {
                for (addr, len, _) in &policy.v6 {
                    failures.count(map_names::POLICY_V6, v6.remove(&key_v6(policy_id, addr.octets(), *len)));
                }
            }
        }
    }

    /// Entries in the IPv4 and IPv6 policy tries (all sandboxes).
    pub fn policy_entry_counts(&self) -> Result<(usize, usize), DatapathError> {
        let count = |name: &'static str| -> Result<usize, DatapathError> {
            let map = self.ebpf.map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
            Ok(match name {
                map_names::POLICY_V4 => LpmTrie::<_, KeyV4, PolicyValue>::try_from(map).map_err(map_err(name))?.keys().count(),
                _ => LpmTrie::<_, KeyV6, PolicyValue>::try_from(map).map_err(map_err(name))?.keys().count(),
            })
        };
        Ok((count(map_names::POLICY_V4)?, count(map_names::POLICY_V6)?))
    }

    /// Counters by [`sbx_net_common::Reason`] (plus the lost-events slot),
    /// summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>, DatapathError> {
        let name = map_names::COUNTERS;
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
        read_counters(&PerCpuArray::try_from(map).map_err(map_err(name))?)
    }

    /// Packets and bytes of one sandbox by verdict class
    /// ([`sbx_net_common::verdict_class`]).
    pub fn sandbox_counters(&self, sandbox_id: u32) -> Result<[Counter; SANDBOX_VERDICT_CLASSES], DatapathError> {
        let name = map_names::SANDBOX_COUNTERS;
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
        read_sandbox_counters(&Array::try_from(map).map_err(map_err(name))?, sandbox_id)
    }

    /// Zeroes a sandbox id's counters (a new sandbox may reuse the id).
    pub fn reset_sandbox_counters(&mut self, sandbox_id: u32) -> Result<(), DatapathError> {
        let name = map_names::SANDBOX_COUNTERS;
        let mut array: Array<_, Counter> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let base = (sandbox_id % MAX_SANDBOXES) * VERDICT_CLASSES;
        for class in 0..VERDICT_CLASSES {
            array.set(base + class, Counter::default(), 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Flows in the flow tables, IPv4 and IPv6 (walks them: for status,
    /// not per packet).
    pub fn flow_count(&self) -> Result<usize, DatapathError> {
        let v4 = {
            let name = map_names::FLOWS_V4;
            let map = self.ebpf.map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
            HashMap::<_, FlowKeyV4, FlowStats>::try_from(map).map_err(map_err(name))?.keys().count()
        };
        let name = map_names::FLOWS;
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
        Ok(v4 + HashMap::<_, FlowKey, FlowStats>::try_from(map).map_err(map_err(name))?.keys().count())
    }

    /// Takes the drop-event ring buffer out of the object (once).
    pub fn take_events(&mut self) -> Result<EventReader, DatapathError> {
        let name = map_names::EVENTS;
        let map = self.ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
        let ring = RingBuf::try_from(map).map_err(map_err(name))?;
        Ok(EventReader { ring })
    }

    /// Runs `program` once on `frame` with BPF_PROG_TEST_RUN, as if it
    /// arrived on `ifindex`; returns the TC verdict code.
    pub fn test_run(&self, program: &'static str, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(i32, Duration), DatapathError> {
        let ctx = skb_context(ifindex);
        let opts = TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx), repeat, ..Default::default() };
        let result = self
            .program(program)?
            .test_run(opts)
            .map_err(|e| DatapathError::Program { name: program, source: Box::new(e) })?;
        Ok((result.return_value as i32, result.duration))
    }
}

/// Verdict classes the per-sandbox counters use: allowed, denied,
/// redirected, audit ([`sbx_net_common::verdict_class`]).
pub const SANDBOX_VERDICT_CLASSES: usize = 4;
const _: () = assert!(SANDBOX_VERDICT_CLASSES as u32 <= VERDICT_CLASSES && sbx_net_common::verdict_class::AUDIT as usize == SANDBOX_VERDICT_CLASSES - 1);

/// Every slot of the counter array ([`sbx_net_common::Reason`] order, then
/// the lost-events slot), summed over CPUs.
fn read_counters<T: std::borrow::Borrow<MapData>>(array: &PerCpuArray<T, Counter>) -> Result<Vec<Counter>, DatapathError> {
    (0..COUNTER_ARRAY_LEN)
        .map(|i| {
            let per_cpu = array.get(&i, 0).map_err(map_err(map_names::COUNTERS))?;
            Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter { packets: acc.packets + c.packets, bytes: acc.bytes + c.bytes }))
        })
        .collect()
}

/// One sandbox id's counters, by verdict class.
fn read_sandbox_counters<T: std::borrow::Borrow<MapData>>(array: &Array<T, Counter>, sandbox_id: u32) -> Result<[Counter; SANDBOX_VERDICT_CLASSES], DatapathError> {
    let base = (sandbox_id % MAX_SANDBOXES) * VERDICT_CLASSES;
    let mut out = [Counter::default(); SANDBOX_VERDICT_CLASSES];
    for (class, slot) in out.iter_mut().enumerate() {
        *slot = array.get(&(base + class as u32), 0).map_err(map_err(map_names::SANDBOX_COUNTERS))?;
    }
    Ok(out)
}

/// A `struct __sk_buff` for BPF_PROG_TEST_RUN's ctx_in with only `ifindex`
/// set (the kernel then runs the program as if on that device).
fn skb_context(ifindex: u32) -> Vec<u8> {
    // struct __sk_buff is 192 bytes; ifindex is at offset 40.
    let mut ctx = vec![0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

pub fn key_v4(sandbox_id: u32, addr: [u8; 4], prefix_len: u8) -> Key<KeyV4> {
    let mut data = [0u8; 8];
    data[..4].copy_from_slice(&sandbox_id.to_be_bytes());
    data[4..].copy_from_slice(&addr);
    Key::new(SANDBOX_ID_BITS + prefix_len as u32, data)
}

pub fn key_v6(sandbox_id: u32, addr: [u8; 16], prefix_len: u8) -> Key<KeyV6> {
    let mut data = [0u8; 20];
    data[..4].copy_from_slice(&sandbox_id.to_be_bytes());
    data[4..].copy_from_slice(&addr);
    Key::new(SANDBOX_ID_BITS + prefix_len as u32, data)
}

/// A counters map pinned by an older build has one slot per reason *it*
/// knew; aya reuses a pinned map whatever its size, so the new program's
/// later reasons would count nowhere and reading them would fail. Counters
/// are statistics, not enforcement state: a map of the wrong size is
/// unpinned and made afresh (programs still attached keep the old one
/// until they are replaced).
fn drop_stale_counters(path: &Path) {
    let Ok(info) = aya::maps::MapInfo::from_pin(path) else { return };
    if info.max_entries() != sbx_net_common::COUNTER_ARRAY_LEN {
        log::warn!("{}: {} slots pinned by another build, {} expected; counting afresh", path.display(), info.max_entries(), sbx_net_common::COUNTER_ARRAY_LEN);
        let _ = std::fs::remove_file(path);
    }
}

/// A map a daemon pinned in `pin_dir`, opened by path as `T`; `kind` is the
/// map's aya variant (e.g. `Map::RingBuf`).
fn open_pinned<T>(pin_dir: &Path, name: &'static str, kind: fn(MapData) -> aya::maps::Map) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    T::try_from(kind(data)).map_err(map_err(name))
}

/// A tap's config in the slot array (ifindex below [`SANDBOX_SLOTS`]).
fn write_slot_config<T: std::borrow::BorrowMut<MapData>>(slots: &mut Array<T, SandboxConfig>, ifindex: u32, config: &SandboxConfig) -> Result<(), DatapathError> {
    slots.set(ifindex, config, 0).map_err(map_err(map_names::SANDBOX_SLOTS))
}

/// A tap's config in the hash (larger ifindexes); a zero sandbox id removes it.
fn write_hashed_config<T: std::borrow::BorrowMut<MapData>>(sandboxes: &mut HashMap<T, u32, SandboxConfig>, ifindex: u32, config: &SandboxConfig) -> Result<(), DatapathError> {
    let name = map_names::SANDBOXES;
    if config.sandbox_id == 0 {
        // A config already gone is what removing it wanted (aya reports
        // a missing key as the syscall's ENOENT, not KeyNotFound).
        return match sandboxes.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if write_failures::FailedWrite::entry_was_absent(&e) => Ok(()),
            Err(e) => Err(map_err(name)(e)),
        };
    }
    sandboxes.insert(ifindex, config, 0).map_err(map_err(name))
}

/// The per-tap config maps, opened by path: the data plane flips a
/// sandbox's policy id there when it switches the sandbox's generation
/// (with its learned addresses carried under the same lock).
pub struct PinnedConfigs {
    slots: Array<MapData, SandboxConfig>,
    sandboxes: HashMap<MapData, u32, SandboxConfig>,
}

impl PinnedConfigs {
    pub fn open(pin_dir: &Path) -> Result<PinnedConfigs, DatapathError> {
        Ok(PinnedConfigs {
            slots: open_pinned(pin_dir, map_names::SANDBOX_SLOTS, aya::maps::Map::Array)?,
            sandboxes: open_pinned(pin_dir, map_names::SANDBOXES, aya::maps::Map::HashMap)?,
        })
    }

    /// What [`Datapath::write_config`] writes, through the pins.
    pub fn write(&mut self, ifindex: u32, config: &SandboxConfig) -> Result<(), DatapathError> {
        if ifindex < SANDBOX_SLOTS {
            return write_slot_config(&mut self.slots, ifindex, config);
        }
        write_hashed_config(&mut self.sandboxes, ifindex, config)
    }
}

/// The pinned flow tables, opened by path (the reaper's view).
pub struct PinnedFlows {
    v4: HashMap<MapData, FlowKeyV4, FlowStats>,
    v6: HashMap<MapData, FlowKey, FlowStats>,
}

impl PinnedFlows {
    pub fn open(pin_dir: &Path) -> Result<PinnedFlows, DatapathError> {
        Ok(PinnedFlows {
            v4: open_pinned(pin_dir, map_names::FLOWS_V4, aya::maps::Map::LruHashMap)?,
            v6: open_pinned(pin_dir, map_names::FLOWS, aya::maps::Map::LruHashMap)?,
        })
    }

    /// A flow's entry, if the table still holds it.
    pub fn get(&self, key: &crate::datapath::events::AnyFlowKey) -> Option<FlowStats> {
        match key {
            crate::datapath::events::AnyFlowKey::V4(k) => self.v4.get(k, 0).ok(),
            crate::datapath::events::AnyFlowKey::Other(k) => self.v6.get(k, 0).ok(),
        }
    }

    /// Removes every flow of these sandbox ids (before an id is reused, so a
    /// new sandbox's first packets are new flows, not an old sandbox's).
    /// Walks both tables once. Returns the number removed.
    pub fn purge(&mut self, ids: &std::collections::BTreeSet<u32>) -> usize {
        let v4: Vec<FlowKeyV4> = self.v4.keys().flatten().filter(|k| ids.contains(&k.sandbox_id)).collect();
        let v6: Vec<FlowKey> = self.v6.keys().flatten().filter(|k| ids.contains(&k.sandbox_id)).collect();
        let removed = v4.iter().filter(|k| self.v4.remove(k).is_ok()).count();
        removed + v6.iter().filter(|k| self.v6.remove(k).is_ok()).count()
    }
}

/// The pinned per-CPU counter array, opened by path (the flow reader's
/// view of the lost-event count).
pub struct PinnedCounters {
    array: PerCpuArray<MapData, Counter>,
}

impl PinnedCounters {
    pub fn open(pin_dir: &Path) -> Result<PinnedCounters, DatapathError> {
        Ok(PinnedCounters { array: open_pinned(pin_dir, map_names::COUNTERS, aya::maps::Map::PerCpuArray)? })
    }

    /// Events the ring buffer had no room for, summed over CPUs.
    pub fn events_lost(&self) -> u64 {
        self.array.get(&EVENTS_LOST_SLOT, 0).map_or(0, |per_cpu| per_cpu.iter().map(|c| c.packets).sum())
    }
}

/// The pinned maps `/metrics` reads at scrape time, opened by path: the
/// kernel's own numbers, whichever process loaded the maps.
pub struct PinnedStats {
    counters: PerCpuArray<MapData, Counter>,
    sandbox_counters: Array<MapData, Counter>,
    policy_v4: LpmTrie<MapData, KeyV4, PolicyValue>,
    policy_v6: LpmTrie<MapData, KeyV6, PolicyValue>,
    flows_v4: HashMap<MapData, FlowKeyV4, FlowStats>,
    flows_v6: HashMap<MapData, FlowKey, FlowStats>,
    /// Capacity of each policy trie and of each flow table (the kernel's
    /// `max_entries`: a reused pinned map keeps the size it was made with).
    policy_capacity: u32,
    flow_capacity: u32,
}

impl std::fmt::Debug for PinnedStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedStats").field("policy_capacity", &self.policy_capacity).field("flow_capacity", &self.flow_capacity).finish_non_exhaustive()
    }
}

impl PinnedStats {
    pub fn open(pin_dir: &Path) -> Result<PinnedStats, DatapathError> {
        let capacity = |name: &'static str| -> Result<u32, DatapathError> {
            Ok(aya::maps::MapInfo::from_pin(pin_dir.join(name)).map_err(map_err(name))?.max_entries())
        };
        Ok(PinnedStats {
            counters: open_pinned(pin_dir, map_names::COUNTERS, aya::maps::Map::PerCpuArray)?,
            sandbox_counters: open_pinned(pin_dir, map_names::SANDBOX_COUNTERS, aya::maps::Map::Array)?,
            policy_v4: open_pinned(pin_dir, map_names::POLICY_V4, aya::maps::Map::LpmTrie)?,
            policy_v6: open_pinned(pin_dir, map_names::POLICY_V6, aya::maps::Map::LpmTrie)?,
            flows_v4: open_pinned(pin_dir, map_names::FLOWS_V4, aya::maps::Map::LruHashMap)?,
            flows_v6: open_pinned(pin_dir, map_names::FLOWS, aya::maps::Map::LruHashMap)?,
            policy_capacity: capacity(map_names::POLICY_V4)?,
            flow_capacity: capacity(map_names::FLOWS_V4)?,
        })
    }

    /// Counters by [`sbx_net_common::Reason`], then the lost-events slot
    /// ([`EVENTS_LOST_SLOT`]), summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>, DatapathError> {
        read_counters(&self.counters)
    }

    /// Packets and bytes of one sandbox id by verdict class.
    pub fn sandbox_counters(&self, sandbox_id: u32) -> Result<[Counter; SANDBOX_VERDICT_CLASSES], DatapathError> {
        read_sandbox_counters(&self.sandbox_counters, sandbox_id)
    }

    /// Entries in the IPv4 and IPv6 policy tries (walks them).
    pub fn policy_entry_counts(&self) -> (usize, usize) {
        (self.policy_v4.keys().count(), self.policy_v6.keys().count())
    }

    /// Flows in the IPv4 and IPv6 flow tables together (walks them).
    pub fn flow_count(&self) -> usize {
        self.flows_v4.keys().count() + self.flows_v6.keys().count()
    }

    pub fn policy_capacity(&self) -> u32 {
        self.policy_capacity
    }

    pub fn flow_capacity(&self) -> u32 {
        self.flow_capacity
    }
}

/// Reads drop events from the ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    /// Opens the event ring buffer a daemon pinned in `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<EventReader, DatapathError> {
        Ok(EventReader { ring: open_pinned(pin_dir, map_names::EVENTS, aya::maps::Map::RingBuf)? })
    }

    /// Everything queued now.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the program writes whole FlowEvents; the item holds
                // at least size_of::<FlowEvent>() bytes and FlowEvent is POD.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        out
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
