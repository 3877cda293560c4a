//! The loaded eBPF object: programs, maps, TCX attachment, and the writes
//! that install a sandbox's configuration and compiled policy.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::tc::{SchedClassifierLinkId, TcAttachOptions, TcAttachType};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfError, EbpfLoader};
use sbx_net_common::{
    map_names, program_names, Counter, FlowEvent, KeyV4, KeyV6, PolicyValue, SandboxConfig,
    COUNTER_ARRAY_LEN, MAX_POLICY_ENTRIES, SANDBOX_ID_BITS, SANDBOX_SLOTS,
};

use crate::compile::CompiledPolicy;

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
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source: Box::new(source) }
}

/// Load-time settings, as plain data.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Capacity of each policy trie (entries are allocated on insert, so a
    /// large capacity costs nothing until used).
    pub policy_capacity: u32,
    /// Forward the program's aya-log output to the `log` facade.
    pub enable_logs: bool,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions { policy_capacity: MAX_POLICY_ENTRIES, enable_logs: false }
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Datapath {
    /// Loads the object and all its programs (verifier included).
    pub fn load(options: &DatapathOptions) -> Result<Datapath, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::POLICY_V4, options.policy_capacity)
            .map_max_entries(map_names::POLICY_V6, options.policy_capacity)
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        // The logger takes the AYA_LOGS ring buffer; it must exist before the
        // programs load and live as long as they do.
        let logger = if options.enable_logs {
            Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(|e| DatapathError::Logger(e.to_string()))?)
        } else {
            None
        };
        for name in [program_names::EGRESS, program_names::BENCH_EMPTY, program_names::BENCH_ONE_LOOKUP] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing { kind: "program", name })?
                .try_into()
                .map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
            program.load().map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        }
        Ok(Datapath { ebpf, logger })
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

    /// Installs a sandbox on the tap with `ifindex`: policy entries first,
    /// then the config that makes the program use them, so no packet sees a
    /// sandbox without its policy.
    pub fn install_sandbox(
        &mut self,
        ifindex: u32,
        config: &SandboxConfig,
        policy: &CompiledPolicy,
    ) -> Result<(), DatapathError> {
        self.write_policy(config.sandbox_id, policy)?;
        self.write_config(ifindex, config)
    }

    /// Writes (or, with an all-zero config, clears) the config of a tap.
    fn write_config(&mut self, ifindex: u32, config: &SandboxConfig) -> Result<(), DatapathError> {
        if ifindex < SANDBOX_SLOTS {
            let name = map_names::SANDBOX_SLOTS;
            let mut slots: Array<_, SandboxConfig> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            return slots.set(ifindex, config, 0).map_err(map_err(name));
        }
        let name = map_names::SANDBOXES;
        let mut sandboxes: HashMap<_, u32, SandboxConfig> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        if config.sandbox_id == 0 {
            return match sandboxes.remove(&ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(name)(e)),
            };
        }
        sandboxes.insert(ifindex, config, 0).map_err(map_err(name))
    }

    /// Writes every entry of `policy` under `sandbox_id`.
    pub fn write_policy(&mut self, sandbox_id: u32, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        {
            let mut v4: LpmTrie<_, KeyV4, PolicyValue> =
                LpmTrie::try_from(self.map_mut(map_names::POLICY_V4)?).map_err(map_err(map_names::POLICY_V4))?;
            for (addr, len, value) in &policy.v4 {
                v4.insert(&key_v4(sandbox_id, addr.octets(), *len), value, 0)
                    .map_err(map_err(map_names::POLICY_V4))?;
            }
        }
        let mut v6: LpmTrie<_, KeyV6, PolicyValue> =
            LpmTrie::try_from(self.map_mut(map_names::POLICY_V6)?).map_err(map_err(map_names::POLICY_V6))?;
        for (addr, len, value) in &policy.v6 {
            v6.insert(&key_v6(sandbox_id, addr.octets(), *len), value, 0)
                .map_err(map_err(map_names::POLICY_V6))?;
        }
        Ok(())
    }

    /// Removes the sandbox's config (the program then drops its frames as
    /// an unknown sandbox), then its entries.
    pub fn remove_sandbox(&mut self, ifindex: u32, sandbox_id: u32, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        self.write_config(ifindex, &SandboxConfig::default())?;
        {
            let mut v4: LpmTrie<_, KeyV4, PolicyValue> =
                LpmTrie::try_from(self.map_mut(map_names::POLICY_V4)?).map_err(map_err(map_names::POLICY_V4))?;
            for (addr, len, _) in &policy.v4 {
                let _ = v4.remove(&key_v4(sandbox_id, addr.octets(), *len));
            }
        }
        let mut v6: LpmTrie<_, KeyV6, PolicyValue> =
            LpmTrie::try_from(self.map_mut(map_names::POLICY_V6)?).map_err(map_err(map_names::POLICY_V6))?;
        for (addr, len, _) in &policy.v6 {
            let _ = v6.remove(&key_v6(sandbox_id, addr.octets(), *len));
        }
        Ok(())
    }

    /// Counters by [`sbx_net_common::Reason`] (plus the lost-events slot),
    /// summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>, DatapathError> {
        let name = map_names::COUNTERS;
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
        let array: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err(name))?;
        (0..COUNTER_ARRAY_LEN)
            .map(|i| {
                let per_cpu = array.get(&i, 0).map_err(map_err(name))?;
                Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                }))
            })
            .collect()
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

/// Reads drop events from the ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
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
