//! sbx-net TC classifier: attached with TCX to TC ingress of every sandbox
//! tap, i.e. it sees every frame the guest sends. Verdict order (see
//! ARCHITECTURE.md): parse → anti-spoof → one LPM lookup → policy default.
#![no_std]
#![no_main]
// The BPF target has no `fetch_add` on atomics; the intrinsic lowers to
// BPF_ATOMIC add (an XADD when the result is unused).
#![feature(core_intrinsics)]
// Word-wide packet loads at any alignment (net::Span).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod net;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use sbx_net_common::{
    action, event_kind, BENCH_POLICY_ID, rule_id, sandbox_flags, tcp_flags_may_redirect, verdict_class, Counter, FlowEvent, FlowKey, FlowKeyV4, FlowStats, KeyV4,
    KeyV6, PolicyValue, Reason, SandboxConfig, Verdict, COUNTER_ARRAY_LEN, DROP_REPORT_INTERVAL_NS,
    EVENTS_LOST_SLOT, EVENTS_RING_BYTES, MAX_FLOWS, MAX_POLICY_ENTRIES, MAX_PORT_VERDICTS, MAX_PROXIED_PORTS,
    MAX_SANDBOXES, SANDBOX_COUNTER_SLOTS, SANDBOX_ID_BITS, SANDBOX_SLOTS, VERDICT_CLASSES,
};

use net::{Packet, ParseError, IPPROTO_TCP, IPPROTO_UDP};

/// Sandbox config by tap ifindex, for ifindex < SANDBOX_SLOTS (the common
/// case): an array lookup the verifier inlines. Unused slots are zero
/// (sandbox id 0 is never assigned).
#[map]
static SBX_SANDBOX_SLOTS: Array<SandboxConfig> = Array::with_max_entries(SANDBOX_SLOTS, 0);

/// Sandbox config for taps with larger ifindexes.
#[map]
static SBX_SANDBOXES: HashMap<u32, SandboxConfig> = HashMap::with_max_entries(MAX_SANDBOXES, 0);

/// Where a config from [`SBX_SANDBOXES`] is copied for the packet.
#[map]
static SBX_CONFIG_SCRATCH: PerCpuArray<SandboxConfig> = PerCpuArray::with_max_entries(1, 0);

/// The tap's config. From the array it is read in place (a copy to the
/// stack cost more than every other step of the verdict but the trie
/// lookup); an array slot is updated in place, so at worst a packet sees
/// its own sandbox's old and new config mixed, never another sandbox's.
/// From the hash map it is copied once into a per-CPU slot: a preallocated
/// hash map hands a replaced value's element to the next update on that
/// CPU, so a pointer kept for the whole packet could come to hold another
/// sandbox's config mid-verdict (review of issue 19). A tap with a large
/// ifindex makes the verifier walk the program once more with the copied
/// value; the budget test keeps that in check.
#[inline(always)]
fn sandbox_config(ifindex: u32) -> Option<&'static SandboxConfig> {
    let found = if ifindex < SANDBOX_SLOTS {
        SBX_SANDBOX_SLOTS.get(ifindex)
    } else {
        // SAFETY: the value is only read, once, into this CPU's slot; TC
        // programs run with migration disabled, so no other packet uses
        // the slot before this one's verdict.
        let value = unsafe { SBX_SANDBOXES.get(&ifindex) }?;
        let slot = SBX_CONFIG_SCRATCH.get_ptr_mut(0)?;
        // SAFETY: `slot` is this CPU's element of a one-entry per-CPU
        // array, valid for the program's run.
        unsafe {
            *slot = *value;
            Some(&*slot)
        }
    };
    found.filter(|c| c.sandbox_id != 0)
}

#[map]
static SBX_POLICY_V4: LpmTrie<KeyV4, PolicyValue> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);

#[map]
static SBX_POLICY_V6: LpmTrie<KeyV6, PolicyValue> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);

#[map]
static SBX_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_ARRAY_LEN, 0);

#[map]
static SBX_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Flows of sandboxes with [`sandbox_flags::FLOWS`]: 5-tuple → packets,
/// bytes, first/last seen, latest verdict. LRU: the oldest flows make room.
#[map]
static SBX_FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// The same for IPv4 flows (a 20-byte key: cheaper to hash per packet).
#[map]
static SBX_FLOWS_V4: LruHashMap<FlowKeyV4, FlowStats> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

// The flow keys' addresses are filled a word at a time (`net::copy_words`).
const _: () = {
    use core::mem::{align_of, offset_of};
    assert!(align_of::<FlowKeyV4>() >= 4 && offset_of!(FlowKeyV4, src_addr) == 4 && offset_of!(FlowKeyV4, dst_addr) == 8);
    assert!(align_of::<FlowKey>() >= 4 && offset_of!(FlowKey, src_addr) == 4 && offset_of!(FlowKey, dst_addr) == 20);
};

/// Per-CPU scratch space for the flow key and a new flow's value: the
/// classifier's stack (512 bytes) is already taken by the parsed packet and
/// the sandbox config. A map value may serve as a map key.
#[repr(C)]
pub struct FlowScratch {
    key: FlowKey,
    key_v4: FlowKeyV4,
    stats: FlowStats,
}

#[map]
static SBX_FLOW_SCRATCH: PerCpuArray<FlowScratch> = PerCpuArray::with_max_entries(1, 0);

/// Packets and bytes per sandbox and verdict class, shared across CPUs and
/// updated atomically (a per-CPU array this size would be multiplied by
/// every possible CPU; an uncontended atomic add costs no measurable time).
#[map]
static SBX_SANDBOX_COUNTERS: Array<Counter> = Array::with_max_entries(SANDBOX_COUNTER_SLOTS, 0);

#[classifier]
pub fn sbx_egress(ctx: TcContext) -> i32 {
    egress::<{ upto::ALL }>(ctx)
}

/// How far [`egress`] goes: the whole verdict, or (the benchmark's probes,
/// `program_names::BENCH_STEPS`) up to and including one step of it.
mod upto {
    pub const CONFIG: u8 = 1;
    pub const SCRATCH: u8 = 2;
    pub const PARSE: u8 = 3;
    pub const DECIDE: u8 = 4;
    pub const ALL: u8 = u8::MAX;
}

#[classifier]
pub fn sbx_bench_upto_config(ctx: TcContext) -> i32 {
    egress::<{ upto::CONFIG }>(ctx)
}

#[classifier]
pub fn sbx_bench_upto_scratch(ctx: TcContext) -> i32 {
    egress::<{ upto::SCRATCH }>(ctx)
}

#[classifier]
pub fn sbx_bench_upto_parse(ctx: TcContext) -> i32 {
    egress::<{ upto::PARSE }>(ctx)
}

#[classifier]
pub fn sbx_bench_upto_decide(ctx: TcContext) -> i32 {
    egress::<{ upto::DECIDE }>(ctx)
}

/// The classifier's verdict, or its first `UPTO` steps (see [`upto`]; a
/// constant, so each program has only its own code).
#[inline(always)]
fn egress<const UPTO: u8>(ctx: TcContext) -> i32 {
    // SAFETY: ctx.skb.skb is the __sk_buff the kernel passed us; reading its
    // ifindex field is a plain context access the verifier checks.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(cfg) = sandbox_config(ifindex) else {
        return finish(&ctx, None, &Packet::empty(), Reason::UnknownSandbox, rule_id::NONE);
    };
    if UPTO == upto::CONFIG {
        return TC_ACT_OK;
    }
    // The packet is parsed straight into this CPU's scratch slot (no copy
    // of it afterwards). Every parse path ends here with its own constants
    // (protocol, ports known or not, the reason): passed on as they are,
    // the verifier would walk the flow tracking and reporting below once
    // per path. Read back from a map value they are plain unknowns, and the
    // paths join.
    let Some(slot) = SBX_VERDICT_SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: this CPU's scratch slot, ours until the program returns (TC
    // programs run with migration disabled); nothing else refers to it.
    let packet = unsafe {
        net::zero_packet(&raw mut (*slot).packet);
        &mut (*slot).packet
    };
    if UPTO == upto::SCRATCH {
        return TC_ACT_OK;
    }
    if UPTO == upto::PARSE {
        return if net::parse(&ctx, cfg, packet).is_ok() { TC_ACT_OK } else { TC_ACT_SHOT };
    }
    let (reason, rule) = match net::parse(&ctx, cfg, packet) {
        Ok(net::Parsed::NeighbourDiscovery) => (Reason::NeighbourDiscovery, rule_id::NONE),
        Ok(net::Parsed::Ip) if redirected(cfg, packet) => {
            // The port alone lets a packet through to nftables; only what
            // conntrack will track (and so redirect) may use it.
            if packet.protocol == IPPROTO_TCP && !tcp_flags_may_redirect(packet.tcp_flags) {
                (Reason::InvalidTcpFlags, rule_id::NONE)
            } else {
                (Reason::Redirected, rule_id::NONE)
            }
        }
        Ok(net::Parsed::Ip) => decide(cfg, packet),
        Err(ParseError(reason)) => (reason, rule_id::NONE),
    };
    if UPTO == upto::DECIDE {
        // The rule too, so that reading it is not optimised away.
        return if reason.passes() && rule != rule_id::NONE { TC_ACT_OK } else { TC_ACT_SHOT };
    }
    // SAFETY: as above. The stores are volatile and the pointer passes
    // through black_box (a compiler barrier) so that the compiler does not
    // hand the stored values on to the reads below: they must come from
    // the map.
    let (verdicted, reason, rule) = unsafe {
        core::ptr::write_volatile(&raw mut (*slot).reason, reason as u8);
        core::ptr::write_volatile(&raw mut (*slot).rule, rule);
        let slot = core::hint::black_box(slot);
        (&*slot, core::ptr::read_volatile(&raw const (*slot).reason), core::ptr::read_volatile(&raw const (*slot).rule))
    };
    let Some(reason) = Reason::from_u8(reason) else {
        return TC_ACT_SHOT;
    };
    finish(&ctx, Some(cfg), &verdicted.packet, reason, rule)
}

/// A parsed packet and its verdict, passed through [`SBX_VERDICT_SCRATCH`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Verdicted {
    packet: Packet,
    reason: u8,
    _pad: [u8; 3],
    rule: u32,
}

#[map]
static SBX_VERDICT_SCRATCH: PerCpuArray<Verdicted> = PerCpuArray::with_max_entries(1, 0);

/// Step 3 of the verdict order: DNS to any address and TCP to the proxied
/// ports go to the host's proxies (nftables redirects them there).
#[inline(always)]
fn redirected(cfg: &SandboxConfig, packet: &Packet) -> bool {
    if cfg.flags & sandbox_flags::REDIRECTS == 0 || !packet.has_ports {
        return false;
    }
    let tcp = packet.protocol == IPPROTO_TCP;
    if packet.dst_port == 53 && (tcp || packet.protocol == IPPROTO_UDP) {
        return true;
    }
    if !tcp {
        return false;
    }
    let mut i = 0;
    while i < MAX_PROXIED_PORTS {
        let port = cfg.proxied_tcp_ports[i];
        if port != 0 && port == packet.dst_port {
            return true;
        }
        i += 1;
    }
    false
}

/// DNS-over-TLS (TCP 853) and QUIC (UDP 443) would carry names past the
/// DNS and credential proxies: an address learned from DNS does not open
/// them; only a policy rule (a CIDR, or a `:853` / `:443` port rule) does.
#[inline(always)]
fn resolver_bypass(packet: &Packet) -> bool {
    packet.has_ports
        && ((packet.protocol == IPPROTO_TCP && packet.dst_port == 853) || (packet.protocol == IPPROTO_UDP && packet.dst_port == 443))
}

/// The policy verdict for a parsed IP packet: one LPM lookup.
#[inline(always)]
fn decide(cfg: &SandboxConfig, packet: &Packet) -> (Reason, u32) {
    let id = cfg.policy_id.to_be_bytes();
    let value = if packet.ip_version == 4 {
        let mut key = Key::new(SANDBOX_ID_BITS + 32, [0u8; 8]);
        key.data[..4].copy_from_slice(&id);
        // SAFETY: a Key<[u8; 8]> is 4-aligned (its u32 prefix length), so
        // the address half of its data (offset 8) is too; the packet's
        // address is 8-aligned (see net::Packet).
        unsafe { net::copy_words::<1>(key.data[4..].as_mut_ptr(), packet.dst.as_ptr()) };
        SBX_POLICY_V4.get(&key)
    } else {
        let mut key = Key::new(SANDBOX_ID_BITS + 128, [0u8; 20]);
        key.data[..4].copy_from_slice(&id);
        // SAFETY: as above (the address starts at offset 8 of the key).
        unsafe { net::copy_words::<4>(key.data[4..].as_mut_ptr(), packet.dst.as_ptr()) };
        SBX_POLICY_V6.get(&key)
    };
    let verdict = match value {
        Some(value) => entry_verdict(value, packet),
        None => cfg.default_verdict,
    };
    let reason = if verdict.action == action::ALLOW {
        Reason::Allowed
    } else if verdict.action == action::AUDIT {
        // A deny in audit mode: passes, reported as the deny (same rule).
        Reason::Audit
    } else if verdict.rule_id == rule_id::DEFAULT {
        Reason::DefaultDeny
    } else {
        Reason::PolicyDeny
    };
    (reason, verdict.rule_id)
}

/// What one resolved trie entry says for this packet. A port deny (or
/// audit) beats a learned allow; a learned allow beats the static verdict
/// (it is never written over a policy deny or audit).
#[inline(always)]
fn entry_verdict(value: &PolicyValue, packet: &Packet) -> Verdict {
    // Most entries (every /0 default among them) carry neither port
    // verdicts nor a learned allow: their verdict is the static one.
    if value.port_count == 0 && value.learned_until_ns == 0 {
        return value.any_port;
    }
    let mut port_verdict: Option<Verdict> = None;
    if packet.has_ports {
        let count = value.port_count as usize;
        for i in 0..MAX_PORT_VERDICTS {
            if i >= count {
                break;
            }
            let pv = &value.ports[i];
            if pv.port == packet.dst_port {
                port_verdict = Some(Verdict::new(pv.action, pv.rule_id));
                break;
            }
        }
    }
    if let Some(v) = port_verdict {
        if v.action != action::ALLOW {
            return v;
        }
    }
    if value.learned_until_ns != 0
        && (value.learned_port == 0 || (packet.has_ports && value.learned_port == packet.dst_port))
        && !resolver_bypass(packet)
    {
        // SAFETY: helper with no arguments.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if now < value.learned_until_ns {
            return Verdict::new(action::ALLOW, value.learned_rule_id);
        }
    }
    if let Some(v) = port_verdict {
        return v;
    }
    if !packet.has_ports && packet.port_unknown && value.any_port.action != action::ALLOW {
        // Non-first fragment: no ports to judge. Its first fragment was judged
        // with ports, and a receiver cannot reassemble without it, so pass
        // when some port on this address is allowed.
        let count = value.port_count as usize;
        for i in 0..MAX_PORT_VERDICTS {
            if i >= count {
                break;
            }
            let pv = &value.ports[i];
            if pv.action == action::ALLOW {
                return Verdict::new(pv.action, pv.rule_id);
            }
        }
    }
    value.any_port
}

#[inline(always)]
fn finish(
    ctx: &TcContext,
    cfg: Option<&SandboxConfig>,
    packet: &Packet,
    reason: Reason,
    rule: u32,
) -> i32 {
    let len = ctx.len();
    if let Some(counter) = SBX_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len as u64;
        }
    }
    let verdict = if reason.passes() { TC_ACT_OK } else { TC_ACT_SHOT };
    let sandbox_id = cfg.map(|c| c.sandbox_id).unwrap_or(0);
    // One report call site: every inlined copy of it costs stack.
    let event = match cfg {
        Some(cfg) if cfg.flags & sandbox_flags::FLOWS != 0 => track_flow(cfg, packet, reason, rule, len),
        _ if reason.reported_like_a_drop() => Some((event_kind::DROP, 1, len as u64)),
        _ => None,
    };
    if let Some((kind, packets, bytes)) = event {
        report(ctx, sandbox_id, packet, reason, rule, kind, packets, bytes);
    }
    if verdict == TC_ACT_SHOT {
        if let Some(cfg) = cfg {
            if cfg.flags & sandbox_flags::LOG_DROPS != 0 {
                debug!(
                    ctx,
                    "sbx {} drop reason={} rule={} proto={} dport={}",
                    cfg.sandbox_id,
                    reason as u8,
                    rule,
                    packet.protocol,
                    packet.dst_port
                );
            }
        }
    }
    verdict
}

/// Adds to a counter other CPUs may update too (BPF_ATOMIC add).
///
/// # Safety
/// `target` must point to a u64 field of a map value (8-byte aligned, as
/// every u64 field of our #[repr(C)] values is), valid while the program runs.
#[inline(always)]
unsafe fn atomic_add(target: *mut u64, value: u64) {
    // SAFETY: guaranteed by the caller (above).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(target, value) };
}

/// Flow tracking for a sandbox with [`sandbox_flags::FLOWS`]: per-sandbox
/// counters, the LRU flow table, and events for new flows, verdict changes
/// and denied flows (at most one per flow per DROP_REPORT_INTERVAL_NS).
/// Neighbour discovery is counted but not tracked as a flow.
#[inline(always)]
fn track_flow(cfg: &SandboxConfig, packet: &Packet, reason: Reason, rule: u32, len: u32) -> Option<(u8, u64, u64)> {
    let class = match reason {
        Reason::Allowed | Reason::NeighbourDiscovery => verdict_class::ALLOWED,
        Reason::Redirected => verdict_class::REDIRECTED,
        Reason::Audit => verdict_class::AUDIT,
        _ => verdict_class::DENIED,
    };
    let slot = (cfg.sandbox_id % MAX_SANDBOXES) * VERDICT_CLASSES + class;
    if let Some(counter) = SBX_SANDBOX_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a map value; both fields are updated atomically.
        unsafe {
            atomic_add(&raw mut (*counter).packets, 1);
            atomic_add(&raw mut (*counter).bytes, len as u64);
        }
    }
    if reason == Reason::NeighbourDiscovery {
        return None;
    }
    let scratch = SBX_FLOW_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot, ours until the program returns; the
    // key and the value are distinct fields.
    let (stats, key_v4, key) = unsafe { (&mut (*scratch).stats, &mut (*scratch).key_v4, &mut (*scratch).key) };
    if packet.ip_version == 4 {
        key_v4.sandbox_id = cfg.sandbox_id;
        // SAFETY: FlowKeyV4 is 4-aligned with its addresses at offsets 4
        // and 8 (one word each); the packet's are 8-aligned.
        unsafe {
            net::copy_words::<1>(key_v4.src_addr.as_mut_ptr(), packet.src.as_ptr());
            net::copy_words::<1>(key_v4.dst_addr.as_mut_ptr(), packet.dst.as_ptr());
        }
        key_v4.src_port = packet.src_port;
        key_v4.dst_port = packet.dst_port;
        key_v4.ethertype = packet.ethertype;
        key_v4.protocol = packet.protocol;
        key_v4._pad = 0;
        update_flow(&SBX_FLOWS_V4, key_v4, stats, reason, rule, len)
    } else {
        key.sandbox_id = cfg.sandbox_id;
        // SAFETY: FlowKey is 4-aligned and its addresses sit at offsets 4
        // and 20; the packet's are 8-aligned.
        unsafe {
            net::copy_words::<4>(key.src_addr.as_mut_ptr(), packet.src.as_ptr());
            net::copy_words::<4>(key.dst_addr.as_mut_ptr(), packet.dst.as_ptr());
        }
        key.src_port = packet.src_port;
        key.dst_port = packet.dst_port;
        key.ethertype = packet.ethertype;
        key.protocol = packet.protocol;
        key.ip_version = packet.ip_version;
        update_flow(&SBX_FLOWS, key, stats, reason, rule, len)
    }
}

/// Counts a packet in its flow's entry; says what to report, if anything.
/// `fresh` is scratch space for a new flow's value.
///
/// An established allowed flow (the common packet) reads only jiffies (an
/// inlined load); the clock is read for new flows and denied packets.
#[inline(always)]
fn update_flow<K>(
    flows: &LruHashMap<K, FlowStats>,
    key: &K,
    fresh: &mut FlowStats,
    reason: Reason,
    rule: u32,
    len: u32,
) -> Option<(u8, u64, u64)> {
    // SAFETY: helper with no arguments.
    let tick = unsafe { bpf_jiffies64() };
    if let Some(stats) = flows.get_ptr_mut(key) {
        // SAFETY: a map value. Counters are added atomically; the other
        // fields are single stores (a race between CPUs at worst reports a
        // flow twice).
        unsafe {
            atomic_add(&raw mut (*stats).packets, 1);
            atomic_add(&raw mut (*stats).bytes, len as u64);
            (*stats).last_seen_jiffies = tick;
            let changed = (*stats).reason != reason as u8 || (*stats).rule_id != rule;
            // An audited flow is reported like the denied flow it would
            // be (repeats at most once a second), never silently passed.
            if !changed && !reason.reported_like_a_drop() {
                return None;
            }
            // Tick resolution is enough for the one-second report interval.
            // SAFETY: helper with no arguments.
            let now = bpf_ktime_get_coarse_ns();
            let kind = if changed {
                event_kind::VERDICT_CHANGED
            } else if now.wrapping_sub((*stats).last_report_ns) >= DROP_REPORT_INTERVAL_NS {
                event_kind::DROP_REPEAT
            } else {
                return None;
            };
            (*stats).reason = reason as u8;
            (*stats).rule_id = rule;
            (*stats).last_report_ns = now;
            let (packets, bytes) = ((*stats).packets, (*stats).bytes);
            let packets_since = packets.wrapping_sub((*stats).reported_packets);
            let bytes_since = bytes.wrapping_sub((*stats).reported_bytes);
            (*stats).reported_packets = packets;
            (*stats).reported_bytes = bytes;
            if kind == event_kind::DROP_REPEAT {
                return Some((kind, packets_since, bytes_since));
            }
            return Some((kind, 1, len as u64));
        }
    }
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    fresh.first_seen_ns = now;
    fresh.last_seen_jiffies = tick;
    fresh.last_report_ns = now;
    fresh.packets = 1;
    fresh.bytes = len as u64;
    fresh.reported_packets = 1;
    fresh.reported_bytes = len as u64;
    fresh.rule_id = rule;
    fresh.reason = reason as u8;
    // SAFETY: the field of a value we hold a reference to.
    unsafe { zero_pad(&raw mut fresh._pad) };
    // A full table evicts its least recently used flow; an insert error
    // (out of memory) only loses the tracking, never the verdict.
    let _ = flows.insert(key, fresh, 0);
    Some((event_kind::NEW_FLOW, 1, len as u64))
}

/// Zeroes padding a byte at a time: assigning `[0; N]` to an odd-sized
/// byte array compiles to a call of a memset subprogram — a BPF-to-BPF
/// call and return (through the return thunk where the CPU needs one) on
/// the first packet of every flow and in every event.
///
/// # Safety
/// `pad` must be valid for writes of N bytes.
#[inline(always)]
unsafe fn zero_pad<const N: usize>(pad: *mut [u8; N]) {
    let bytes = pad as *mut u8;
    let mut i = 0;
    while i < N {
        // SAFETY: i < N, inside the caller's array. Volatile: LLVM would
        // merge plain stores back into the memset call.
        unsafe { core::ptr::write_volatile(bytes.add(i), 0) };
        i += 1;
    }
}

/// Puts one event on the ring buffer, or counts it as lost. Fields are
/// stored straight into the reserved record (no stack copy).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report(ctx: &TcContext, sandbox_id: u32, packet: &Packet, reason: Reason, rule: u32, kind: u8, packets: u64, bytes: u64) {
    let Some(mut entry) = SBX_EVENTS.reserve::<FlowEvent>(0) else {
        if let Some(lost) = SBX_COUNTERS.get_ptr_mut(EVENTS_LOST_SLOT) {
            // SAFETY: per-CPU slot, only this CPU writes it while we run.
            unsafe { (*lost).packets += 1 };
        }
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, writable FlowEvent-sized record that
    // only we own until submit; every field (padding included) is written.
    unsafe {
        (*e).timestamp_ns = bpf_ktime_get_boot_ns();
        (*e).sandbox_id = sandbox_id;
        (*e).rule_id = rule;
        (*e).ifindex = (*ctx.skb.skb).ifindex;
        (*e).packet_len = ctx.len();
        (*e).ethertype = packet.ethertype;
        (*e).src_port = packet.src_port;
        (*e).dst_port = packet.dst_port;
        (*e).reason = reason as u8;
        (*e).action = reason.action();
        (*e).protocol = packet.protocol;
        (*e).ip_version = packet.ip_version;
        (*e).kind = kind;
        zero_pad(&raw mut (*e)._pad);
        // FlowEvent's addresses sit at offsets 40 and 56 of an 8-aligned
        // record; the packet's are 8-aligned.
        net::copy_words::<4>((*e).src_addr.as_mut_ptr(), packet.src.as_ptr());
        net::copy_words::<4>((*e).dst_addr.as_mut_ptr(), packet.dst.as_ptr());
        (*e).packets = packets;
        (*e).bytes = bytes;
    }
    entry.submit(0);
}

/// Benchmark reference: the cost of running any TC program at all.
#[classifier]
pub fn sbx_bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Benchmark reference: the floor for any LPM-based verdict — read the
/// destination at a fixed offset and do one lookup with the key
/// `sbx_egress` builds (policy generation [`BENCH_POLICY_ID`], the same
/// prefix lengths), so a "miss" finds the generation's /0 entry as the real
/// program does. Returns TC_ACT_OK when it found an allow entry, TC_ACT_SHOT
/// for a deny entry and TC_ACT_UNSPEC when the trie had nothing: the
/// benchmark checks it did the same lookup work as the real program.
#[classifier]
pub fn sbx_bench_one_lookup(ctx: TcContext) -> i32 {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + 54 > end {
        return TC_ACT_SHOT;
    }
    let id = BENCH_POLICY_ID.to_be_bytes();
    // SAFETY: bounds checked above; 14-byte Ethernet header precedes.
    let ethertype = unsafe { *((data + 12) as *const [u8; 2]) };
    let found = if ethertype == [0x08, 0x00] {
        let mut key: KeyV4 = [0; 8];
        key[..4].copy_from_slice(&id);
        // SAFETY: bounds checked above (14 + 16 + 4 <= 54).
        key[4..].copy_from_slice(unsafe { &*((data + 30) as *const [u8; 4]) });
        SBX_POLICY_V4.get(&Key::new(SANDBOX_ID_BITS + 32, key)).map(|v| v.any_port.action)
    } else {
        let mut key: KeyV6 = [0; 20];
        key[..4].copy_from_slice(&id);
        // SAFETY: bounds checked above (14 + 24 + 16 = 54).
        key[4..].copy_from_slice(unsafe { &*((data + 38) as *const [u8; 16]) });
        SBX_POLICY_V6.get(&Key::new(SANDBOX_ID_BITS + 128, key)).map(|v| v.any_port.action)
    };
    match found {
        Some(action::DENY) => TC_ACT_SHOT,
        Some(_) => TC_ACT_OK,
        None => TC_ACT_UNSPEC,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
