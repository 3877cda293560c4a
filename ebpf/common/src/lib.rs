//! Types shared by the sbx-net eBPF classifier and userspace.
//!
//! Every type here is `#[repr(C)]`, has explicit padding (so no uninitialised
//! byte ever reaches a map or the ring buffer) and is the exact layout the
//! kernel sees. Userspace enables the `user` feature to get `aya::Pod`.
#![no_std]

/// Map names, as the eBPF object declares them and userspace looks them up.
pub mod map_names {
    pub const SANDBOXES: &str = "SBX_SANDBOXES";
    pub const SANDBOX_SLOTS: &str = "SBX_SANDBOX_SLOTS";
    pub const POLICY_V4: &str = "SBX_POLICY_V4";
    pub const POLICY_V6: &str = "SBX_POLICY_V6";
    pub const COUNTERS: &str = "SBX_COUNTERS";
    pub const EVENTS: &str = "SBX_EVENTS";
    pub const FLOWS: &str = "SBX_FLOWS";
    pub const FLOWS_V4: &str = "SBX_FLOWS_V4";
    pub const SANDBOX_COUNTERS: &str = "SBX_SANDBOX_COUNTERS";
}

/// Program names in the object.
pub mod program_names {
    /// The classifier on TC ingress of every sandbox tap.
    pub const EGRESS: &str = "sbx_egress";
    /// Benchmark reference: returns TC_ACT_OK and nothing else.
    pub const BENCH_EMPTY: &str = "sbx_bench_empty";
    /// Benchmark reference: one LPM lookup keyed on the frame's IPv4/IPv6
    /// destination, the floor for any LPM-based verdict.
    pub const BENCH_ONE_LOOKUP: &str = "sbx_bench_one_lookup";
    /// Benchmark probes: `sbx_egress` stopped after one step of its verdict
    /// (the sandbox's config; its scratch slot cleared; the frame parsed
    /// and checked; the policy decided), so that the benchmark can say
    /// where the classifier's time goes. Each returns TC_ACT_OK when its
    /// last step passed. Loaded only with `DatapathOptions::bench_steps`.
    pub const BENCH_STEPS: [&str; 4] = ["sbx_bench_upto_config", "sbx_bench_upto_scratch", "sbx_bench_upto_parse", "sbx_bench_upto_decide"];
}

/// Default capacities; userspace may override them at load time.
pub const MAX_SANDBOXES: u32 = 4096;
/// Taps whose ifindex is below this find their config in an array indexed
/// by ifindex (one inlined load); larger ifindexes use the hash map.
pub const SANDBOX_SLOTS: u32 = 65_536;
pub const MAX_POLICY_ENTRIES: u32 = 2 * 1024 * 1024;
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Default capacity of the LRU flow table (userspace may override it).
pub const MAX_FLOWS: u32 = 65_536;
/// A denied flow is reported again (with the packets dropped since) when
/// its last report is at least this old: a flood of one flow costs one
/// event per second, not one per packet.
pub const DROP_REPORT_INTERVAL_NS: u64 = 1_000_000_000;

/// Per-sandbox counters: slot `(sandbox_id % MAX_SANDBOXES) * VERDICT_CLASSES
/// + class`. Ids are allocated lowest-free, so they stay below
/// `MAX_SANDBOXES` unless that many sandboxes exist at once.
pub mod verdict_class {
    pub const ALLOWED: u32 = 0;
    pub const DENIED: u32 = 1;
    pub const REDIRECTED: u32 = 2;
    /// Passed by an audit-mode deny ([`super::Reason::Audit`]).
    pub const AUDIT: u32 = 3;
}
pub const VERDICT_CLASSES: u32 = 4;
pub const SANDBOX_COUNTER_SLOTS: u32 = MAX_SANDBOXES * VERDICT_CLASSES;

/// What a ring-buffer event reports.
pub mod event_kind {
    /// A dropped packet (sandboxes without flow tracking, and frames that
    /// belong to no sandbox), one event per packet.
    pub const DROP: u8 = 0;
    /// The first packet of a flow (allowed, redirected or denied).
    pub const NEW_FLOW: u8 = 1;
    /// A known flow whose verdict changed (e.g. after a policy change).
    pub const VERDICT_CHANGED: u8 = 2;
    /// A denied (or audited) flow still being attempted: the packets since
    /// its last report.
    pub const DROP_REPEAT: u8 = 3;
}

/// What a policy entry says about traffic.
pub mod action {
    /// Let the packet through.
    pub const ALLOW: u8 = 1;
    /// Drop the packet.
    pub const DENY: u8 = 2;
    /// A deny in audit mode: let the packet through, report it as the
    /// deny it would have been (same rule id).
    pub const AUDIT: u8 = 3;
}

/// Rule ids with a fixed meaning. Every other id indexes the rule table
/// userspace keeps for the sandbox's compiled policy.
pub mod rule_id {
    /// The policy default decided.
    pub const DEFAULT: u32 = 0;
    /// No rule: the packet was dropped before the policy lookup (parse,
    /// anti-spoof, unknown sandbox). The drop reason says why.
    pub const NONE: u32 = u32::MAX;
}

/// Why a packet passed or was dropped. Also the index into [`COUNTER_SLOTS`]
/// of the per-CPU counter array.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Allowed by a policy rule (or an allow default).
    Allowed = 0,
    /// ARP / IPv6 neighbour discovery between the guest and its gateway.
    NeighbourDiscovery = 1,
    /// Denied by a policy rule (explicit or built-in deny list).
    PolicyDeny = 2,
    /// Denied by the policy default.
    DefaultDeny = 3,
    /// Source MAC is not the sandbox's.
    SpoofedMac = 4,
    /// Source IP is not the sandbox's.
    SpoofedIp = 5,
    /// VLAN / QinQ tagged frame.
    VlanTagged = 6,
    /// Ethertype other than ARP, IPv4, IPv6.
    UnknownEthertype = 7,
    /// Truncated or malformed header.
    Malformed = 8,
    /// ARP or neighbour discovery that is not between guest and gateway, or
    /// that carries another host's addresses.
    BadNeighbourDiscovery = 9,
    /// IPv4 source-route options, IPv6 routing headers or too many IPv6
    /// extension headers: the header's destination would not be the real one.
    SourceRouted = 10,
    /// Transport protocol other than TCP, UDP, ICMP, ICMPv6.
    UnknownProtocol = 11,
    /// The interface carries the program but no sandbox is configured on it.
    UnknownSandbox = 12,
    /// DNS (port 53) or a proxied TCP port: passed to nftables, which
    /// redirects it to the host's DNS or credential proxy.
    Redirected = 13,
    /// A TCP segment on a redirected port whose flags no connection can
    /// carry (SYN+FIN, SYN+ACK as a first packet, FIN alone, none…):
    /// conntrack calls it invalid, so nftables would not redirect it, and it
    /// must not pass on the strength of the port alone.
    InvalidTcpFlags = 14,
    /// Would have been denied by a policy rule (or default) in audit mode:
    /// passed, and reported as that deny.
    Audit = 15,
}

pub const COUNTER_SLOTS: u32 = 16;
/// Extra counter slot: drop events that did not fit in the ring buffer.
pub const EVENTS_LOST_SLOT: u32 = COUNTER_SLOTS;
/// Length of the per-CPU counter array.
pub const COUNTER_ARRAY_LEN: u32 = COUNTER_SLOTS + 1;

impl Reason {
    pub const ALL: [Reason; COUNTER_SLOTS as usize] = [
        Reason::Allowed,
        Reason::NeighbourDiscovery,
        Reason::PolicyDeny,
        Reason::DefaultDeny,
        Reason::SpoofedMac,
        Reason::SpoofedIp,
        Reason::VlanTagged,
        Reason::UnknownEthertype,
        Reason::Malformed,
        Reason::BadNeighbourDiscovery,
        Reason::SourceRouted,
        Reason::UnknownProtocol,
        Reason::UnknownSandbox,
        Reason::Redirected,
        Reason::InvalidTcpFlags,
        Reason::Audit,
    ];

    pub fn from_u8(value: u8) -> Option<Reason> {
        Reason::ALL.get(value as usize).copied()
    }

    pub fn passes(self) -> bool {
        matches!(self, Reason::Allowed | Reason::NeighbourDiscovery | Reason::Redirected | Reason::Audit)
    }

    /// Whether the packet is reported like a drop (every packet without
    /// flow tracking, at most once a second per flow with it): the drops
    /// and the audited passes.
    pub fn reported_like_a_drop(self) -> bool {
        !self.passes() || self == Reason::Audit
    }

    /// The [`action`] an event reports for this reason.
    pub fn action(self) -> u8 {
        if self == Reason::Audit {
            action::AUDIT
        } else if self.passes() {
            action::ALLOW
        } else {
            action::DENY
        }
    }

    /// Stable snake_case name, used in events, metrics labels and output.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::NeighbourDiscovery => "neighbour_discovery",
            Reason::PolicyDeny => "policy_deny",
            Reason::DefaultDeny => "default_deny",
            Reason::SpoofedMac => "spoofed_mac",
            Reason::SpoofedIp => "spoofed_ip",
            Reason::VlanTagged => "vlan_tagged",
            Reason::UnknownEthertype => "unknown_ethertype",
            Reason::Malformed => "malformed",
            Reason::BadNeighbourDiscovery => "bad_neighbour_discovery",
            Reason::SourceRouted => "source_routed",
            Reason::UnknownProtocol => "unknown_protocol",
            Reason::UnknownSandbox => "unknown_sandbox",
            Reason::Redirected => "redirected",
            Reason::InvalidTcpFlags => "invalid_tcp_flags",
            Reason::Audit => "audit",
        }
    }
}

/// TCP header flag bits (byte 13 of the header).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// Whether a guest's TCP segment to a redirected port may pass to nftables:
/// its flags must be a connection start (which the redirect catches) or a
/// segment of a connection (whose conntrack entry carries the redirect).
/// This is Linux conntrack's `tcp_valid_flags` (PSH, ECE and CWR ignored)
/// without SYN+ACK: a guest never answers a connection on a redirected port.
#[inline(always)]
pub const fn tcp_flags_may_redirect(flags: u8) -> bool {
    use tcp_flag::*;
    let f = flags & (FIN | SYN | RST | ACK | URG);
    f == SYN || f == SYN | URG || f == RST || f == RST | ACK || f == FIN | ACK || f == FIN | ACK | URG || f == ACK || f == ACK | URG
}

/// An action and the rule that chose it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct Verdict {
    pub rule_id: u32,
    pub action: u8,
    pub _pad: [u8; 3],
}

impl Verdict {
    pub const fn new(action: u8, rule_id: u32) -> Self {
        Verdict { rule_id, action, _pad: [0; 3] }
    }
}

/// A verdict for one destination port (TCP and UDP), overriding the entry's
/// any-port verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct PortVerdict {
    pub rule_id: u32,
    pub port: u16,
    pub action: u8,
    pub _pad: u8,
}

/// Port-specific verdicts one trie entry can carry. A compiled policy that
/// needs more on one prefix is rejected with a clear error.
pub const MAX_PORT_VERDICTS: usize = 8;

/// Value of an LPM trie entry. Because the most specific entry alone decides,
/// it is fully resolved when the policy is compiled: it already says what
/// every covering rule says (deny wins), including the default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct PolicyValue {
    /// Verdict for any port (and for ICMP and non-first fragments).
    pub any_port: Verdict,
    /// DNS-learned allow overlay: effective while `bpf_ktime_get_boot_ns()`
    /// is below this (0 = no overlay). The overlay is only ever written on
    /// entries whose static verdict is not a policy deny.
    pub learned_until_ns: u64,
    pub learned_rule_id: u32,
    /// Port the learned overlay is restricted to (0 = any).
    pub learned_port: u16,
    pub port_count: u8,
    pub _pad: u8,
    pub ports: [PortVerdict; MAX_PORT_VERDICTS],
}

/// LPM key data for IPv4: sandbox id (big-endian) then the address (network
/// order). Prefix length = 32 + address prefix length.
pub type KeyV4 = [u8; 8];
/// LPM key data for IPv6: sandbox id (big-endian) then the address.
pub type KeyV6 = [u8; 20];

/// Bits of the sandbox id that lead every key.
pub const SANDBOX_ID_BITS: u32 = 32;

/// The policy generation the benchmark floor (`sbx_bench_one_lookup`) looks
/// up: the benchmark installs its policy under this id, so the floor's key
/// is the one `sbx_egress` builds for the same frame.
pub const BENCH_POLICY_ID: u32 = 1;

/// Per-tap configuration, keyed by the tap's ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct SandboxConfig {
    pub sandbox_id: u32,
    /// What a trie miss means (the policy default) and its rule id.
    pub default_verdict: Verdict,
    pub flags: u32,
    /// The key prefix of this sandbox's trie entries. A policy change writes
    /// the new entries under a fresh id and then switches this one word, so
    /// no packet ever sees a mix of two policies.
    pub policy_id: u32,
    /// With [`sandbox_flags::REDIRECTS`]: TCP ports nftables redirects to the
    /// credential proxy (0 = unused slot).
    pub proxied_tcp_ports: [u16; MAX_PROXIED_PORTS],
    pub guest_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    pub guest_ipv4: [u8; 4],
    pub gateway_ipv4: [u8; 4],
    pub guest_ipv6: [u8; 16],
    pub guest_ipv6_link_local: [u8; 16],
    pub gateway_ipv6: [u8; 16],
    pub gateway_ipv6_link_local: [u8; 16],
}

pub const MAX_PROXIED_PORTS: usize = 4;

/// Sandbox flags.
pub mod sandbox_flags {
    /// Emit a debug log line (aya-log) for each drop.
    pub const LOG_DROPS: u32 = 1;
    /// nftables redirects this tap's DNS and proxied TCP ports to the host's
    /// proxies: pass those before the policy lookup (the proxies judge them).
    pub const REDIRECTS: u32 = 2;
    /// Track flows in the LRU flow table, count per sandbox, and report
    /// new flows and (rate-limited) denied flows on the ring buffer.
    pub const FLOWS: u32 = 4;
}

/// One packet counter slot (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of the IPv4 LRU flow table: the sandbox and the 5-tuple. IPv4 has
/// its own table so the per-packet hash covers 20 bytes, not 44.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    pub sandbox_id: u32,
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub ethertype: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Key of the LRU flow table for IPv6 (and non-IP frames): the sandbox
/// and the frame's 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub sandbox_id: u32,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub ethertype: u16,
    pub protocol: u8,
    pub ip_version: u8,
}

/// Value of the LRU flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) of the
    /// first packet.
    pub first_seen_ns: u64,
    /// Kernel jiffies at the latest packet (the cheapest clock on the
    /// per-packet path; userspace converts with the kernel's tick rate).
    pub last_seen_jiffies: u64,
    /// When the flow was last reported on the ring buffer (coarse ns).
    pub last_report_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// `packets` and `bytes` at the last report (a repeat report carries
    /// the difference).
    pub reported_packets: u64,
    pub reported_bytes: u64,
    /// The latest packet's verdict.
    pub rule_id: u32,
    pub reason: u8,
    pub _pad: [u8; 3],
}

/// Sent on the ring buffer: see [`event_kind`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_boot_ns()` at the verdict.
    pub timestamp_ns: u64,
    pub sandbox_id: u32,
    pub rule_id: u32,
    pub ifindex: u32,
    pub packet_len: u32,
    /// Ethertype in host order (0x0800, 0x86dd, 0x0806, ...).
    pub ethertype: u16,
    pub src_port: u16,
    pub dst_port: u16,
    /// [`Reason`] as u8.
    pub reason: u8,
    /// [`action`] value.
    pub action: u8,
    /// IP protocol number (6, 17, 1, 58), 0 when not IP.
    pub protocol: u8,
    /// 4 or 6, 0 when not IP.
    pub ip_version: u8,
    /// [`event_kind`] value.
    pub kind: u8,
    pub _pad: [u8; 5],
    /// Addresses in network order; IPv4 uses the first 4 bytes.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Packets and bytes this event reports (1 and the frame for a single
    /// packet; since the last report for [`event_kind::DROP_REPEAT`]).
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and
    // integer arrays with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for Verdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortVerdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SandboxConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowStats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Verdict>(), 8);
        assert_eq!(size_of::<PortVerdict>(), 8);
        assert_eq!(size_of::<PolicyValue>(), 8 + 8 + 4 + 2 + 1 + 1 + 8 * MAX_PORT_VERDICTS);
        assert_eq!(size_of::<SandboxConfig>(), 4 + 8 + 4 + 4 + 2 * MAX_PROXIED_PORTS + 6 + 6 + 4 + 4 + 16 * 4);
        assert_eq!(size_of::<FlowEvent>(), 8 + 4 * 4 + 2 * 3 + 4 + 1 + 5 + 32 + 16);
        assert_eq!(size_of::<FlowKey>(), 4 + 32 + 2 * 3 + 2);
        assert_eq!(size_of::<FlowKeyV4>(), 4 + 8 + 2 * 3 + 2);
        assert_eq!(size_of::<FlowStats>(), 7 * 8 + 4 + 4);
    }

    #[test]
    fn reasons_round_trip_through_u8() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_u8(reason as u8), Some(reason));
        }
        assert_eq!(Reason::from_u8(COUNTER_SLOTS as u8), None);
    }

    #[test]
    fn redirectable_tcp_flags_are_conntracks_valid_set_without_syn_ack() {
        use tcp_flag::*;
        for ok in [SYN, SYN | PSH, SYN | URG, ACK, ACK | PSH, ACK | URG, FIN | ACK, FIN | ACK | PSH, RST, RST | ACK, ACK | 0x40 | 0x80] {
            assert!(tcp_flags_may_redirect(ok), "{ok:#04x}");
        }
        for bad in [0, FIN, SYN | FIN, SYN | ACK, SYN | RST, FIN | RST, FIN | RST | ACK, PSH, URG, FIN | PSH | URG, SYN | FIN | RST | ACK | PSH | URG] {
            assert!(!tcp_flags_may_redirect(bad), "{bad:#04x}");
        }
        // Exactly the 8 combinations of FIN/SYN/RST/ACK/URG pass.
        assert_eq!((0u8..=255).filter(|f| f & !(FIN | SYN | RST | ACK | URG) == 0 && tcp_flags_may_redirect(*f)).count(), 8);
    }
}
