//! A userspace model of the eBPF classifier (ebpf/prog/src/main.rs and
//! net.rs): frame bytes, the tap's config and its compiled policy in, the
//! reason and rule id the kernel program would report out. Pure Rust, no
//! syscalls; the frame fuzzer ([`crate::fuzzing::FrameHarness`]) runs every
//! frame through both and any disagreement is a bug in one of them.
//!
//! Written from the program's verdict order, not from its code: parse
//! (Ethernet, ARP, IPv4 with options and fragments, IPv6 with extension
//! headers, TCP/UDP/ICMP) → anti-spoof → redirected ports (with the TCP
//! flags conntrack would track) → one lookup in the compiled trie → default.
//! Learned (DNS) entries are left out: the model is for frames, and the
//! harness installs none. Offsets that the program reads directly and those
//! it reads with `bpf_skb_load_bytes` are the same here: BPF_PROG_TEST_RUN
//! hands the program a linear frame.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sbx_net_common::{action, rule_id, sandbox_flags, Reason, SandboxConfig};

use crate::policy::compile::{entry_verdict, CompiledPolicy, PortInfo};

const ETH_HLEN: usize = 14;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
/// The program walks this many IPv6 extension headers, then gives up.
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// And this many IPv4 option steps (40 bytes of options at most).
const MAX_IPV4_OPTION_STEPS: usize = 40;

/// The TCP flag combinations conntrack tracks (so the nftables redirect
/// catches them), without SYN+ACK, masked to FIN|SYN|RST|ACK|URG: SYN,
/// SYN|URG, RST, RST|ACK, FIN|ACK, FIN|ACK|URG, ACK, ACK|URG. Listed here
/// rather than taken from `sbx_net_common` so the differential checks that
/// function too.
const REDIRECTABLE_TCP_FLAGS: [u8; 8] = [0x02, 0x22, 0x04, 0x14, 0x11, 0x31, 0x10, 0x30];
const TCP_FLAG_MASK: u8 = 0x01 | 0x02 | 0x04 | 0x10 | 0x20;

/// What the parser learned about an IP packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedIp {
    pub dst: Option<IpAddr>,
    pub protocol: u8,
    /// Destination port of a TCP/UDP first fragment (or unfragmented packet).
    pub dst_port: Option<u16>,
    /// A non-first fragment: no transport header.
    pub later_fragment: bool,
    pub tcp_flags: u8,
}

impl ParsedIp {
    /// How the policy lookup sees the packet's port.
    pub fn port_info(&self) -> PortInfo {
        match (self.dst_port, self.later_fragment) {
            (Some(p), _) => PortInfo::Port(p),
            (None, true) => PortInfo::NonFirstFragment,
            (None, false) => PortInfo::None,
        }
    }
}

enum Parsed {
    NeighbourDiscovery,
    Ip(ParsedIp),
}

/// The classifier's verdict for `frame` on a tap whose config is `cfg`
/// (`None`, or sandbox id 0: no sandbox on the tap) and whose policy
/// generation `cfg.policy_id` holds `policy`: (reason, rule id), the rule
/// being [`rule_id::NONE`] for everything decided before the policy lookup.
pub fn classify(frame: &[u8], cfg: Option<&SandboxConfig>, policy: &CompiledPolicy) -> (Reason, u32) {
    let Some(cfg) = cfg.filter(|c| c.sandbox_id != 0) else {
        return (Reason::UnknownSandbox, rule_id::NONE);
    };
    match parse(frame, cfg) {
        Err(reason) => (reason, rule_id::NONE),
        Ok(Parsed::NeighbourDiscovery) => (Reason::NeighbourDiscovery, rule_id::NONE),
        Ok(Parsed::Ip(ip)) if redirected(cfg, &ip) => {
            if ip.protocol == IPPROTO_TCP && !REDIRECTABLE_TCP_FLAGS.contains(&(ip.tcp_flags & TCP_FLAG_MASK)) {
                (Reason::InvalidTcpFlags, rule_id::NONE)
            } else {
                (Reason::Redirected, rule_id::NONE)
            }
        }
        Ok(Parsed::Ip(ip)) => decide(cfg, policy, &ip),
    }
}

/// DNS to any address and TCP to the proxied ports go to nftables' redirect.
fn redirected(cfg: &SandboxConfig, ip: &ParsedIp) -> bool {
    if cfg.flags & sandbox_flags::REDIRECTS == 0 {
        return false;
    }
    let Some(port) = ip.dst_port else { return false };
    let tcp = ip.protocol == IPPROTO_TCP;
    (port == 53 && (tcp || ip.protocol == IPPROTO_UDP)) || (tcp && cfg.proxied_tcp_ports.iter().any(|&p| p != 0 && p == port))
}

/// One LPM lookup: the most specific entry's verdict, or the default on a miss.
fn decide(cfg: &SandboxConfig, policy: &CompiledPolicy, ip: &ParsedIp) -> (Reason, u32) {
    let dst = ip.dst.expect("an IP packet has a destination");
    let verdict = match policy.entry_for(dst) {
        // No learned entries: their clock does not matter.
        Some(value) => entry_verdict(value, ip.port_info(), 0),
        None => cfg.default_verdict,
    };
    let reason = if verdict.action == action::ALLOW {
        Reason::Allowed
    } else if verdict.action == action::AUDIT {
        Reason::Audit
    } else if verdict.rule_id == rule_id::DEFAULT {
        Reason::DefaultDeny
    } else {
        Reason::PolicyDeny
    };
    (reason, verdict.rule_id)
}

/// `n` bytes at `off`, or Malformed: the program's bounds checks.
fn bytes(frame: &[u8], off: usize, n: usize) -> Result<&[u8], Reason> {
    off.checked_add(n).and_then(|end| frame.get(off..end)).ok_or(Reason::Malformed)
}

fn byte(frame: &[u8], off: usize) -> Result<u8, Reason> {
    bytes(frame, off, 1).map(|b| b[0])
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn parse(frame: &[u8], cfg: &SandboxConfig) -> Result<Parsed, Reason> {
    let src_mac = bytes(frame, 6, 6)?;
    let ethertype = be16(bytes(frame, 12, 2)?);
    if src_mac != cfg.guest_mac {
        return Err(Reason::SpoofedMac);
    }
    match ethertype {
        0x0806 => parse_arp(frame, cfg),
        0x0800 => parse_ipv4(frame, cfg),
        0x86dd => parse_ipv6(frame, cfg),
        0x8100 | 0x88a8 | 0x9100 => Err(Reason::VlanTagged),
        _ => Err(Reason::UnknownEthertype),
    }
}

/// IPv4-over-Ethernet requests and replies from the guest's own MAC and
/// address, about its gateway.
fn parse_arp(frame: &[u8], cfg: &SandboxConfig) -> Result<Parsed, Reason> {
    let arp = bytes(frame, ETH_HLEN, 28)?;
    let header_ok = arp[..6] == [0, 1, 0x08, 0x00, 6, 4] && matches!(be16(&arp[6..8]), 1 | 2);
    if !header_ok || arp[8..14] != cfg.guest_mac || arp[14..18] != cfg.guest_ipv4 || arp[24..28] != cfg.gateway_ipv4 {
        return Err(Reason::BadNeighbourDiscovery);
    }
    Ok(Parsed::NeighbourDiscovery)
}

fn parse_ipv4(frame: &[u8], cfg: &SandboxConfig) -> Result<Parsed, Reason> {
    let ip = bytes(frame, ETH_HLEN, 20)?;
    if ip[0] >> 4 != 4 {
        return Err(Reason::Malformed);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(Reason::Malformed);
    }
    if ip[12..16] != cfg.guest_ipv4 {
        return Err(Reason::SpoofedIp);
    }
    if ihl > 20 {
        check_ipv4_options(frame, ETH_HLEN + 20, ETH_HLEN + ihl)?;
    }
    let protocol = ip[9];
    let first_fragment = be16(&ip[6..8]) & 0x1fff == 0;
    let mut parsed = ParsedIp {
        dst: Some(IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]))),
        protocol,
        ..Default::default()
    };
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP if !first_fragment => parsed.later_fragment = true,
        IPPROTO_TCP | IPPROTO_UDP => transport(frame, ETH_HLEN + ihl, &mut parsed)?,
        IPPROTO_ICMP if first_fragment => {
            bytes(frame, ETH_HLEN + ihl, 4)?;
        }
        IPPROTO_ICMP => parsed.later_fragment = true,
        _ => return Err(Reason::UnknownProtocol),
    }
    Ok(Parsed::Ip(parsed))
}

/// The whole TCP (20 bytes) or UDP (8 bytes) header must be there: no
/// tiny-fragment games with the ports or the flags.
fn transport(frame: &[u8], l4: usize, parsed: &mut ParsedIp) -> Result<(), Reason> {
    let need = if parsed.protocol == IPPROTO_TCP { 20 } else { 8 };
    let header = bytes(frame, l4, need)?;
    parsed.dst_port = Some(be16(&header[2..4]));
    if parsed.protocol == IPPROTO_TCP {
        parsed.tcp_flags = header[13];
    }
    Ok(())
}

/// Loose (0x83) and strict (0x89) source routing are dropped: the header's
/// destination would be only the first hop.
fn check_ipv4_options(frame: &[u8], start: usize, end: usize) -> Result<(), Reason> {
    let mut off = start;
    for _ in 0..MAX_IPV4_OPTION_STEPS {
        if off >= end {
            return Ok(());
        }
        match byte(frame, off)? {
            0 => return Ok(()),
            1 => off += 1,
            0x83 | 0x89 => return Err(Reason::SourceRouted),
            _ => {
                let len = byte(frame, off + 1)?;
                if len < 2 {
                    return Err(Reason::Malformed);
                }
                off += usize::from(len);
            }
        }
    }
    if off > end {
        return Err(Reason::Malformed);
    }
    Ok(())
}

fn parse_ipv6(frame: &[u8], cfg: &SandboxConfig) -> Result<Parsed, Reason> {
    let ip = bytes(frame, ETH_HLEN, 40)?;
    if ip[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let src: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
    let dst: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
    let unspecified = src == [0; 16];
    if !unspecified && src != cfg.guest_ipv6 && src != cfg.guest_ipv6_link_local {
        return Err(Reason::SpoofedIp);
    }
    // Hop-by-hop and destination options are skipped, a routing header is
    // source routing, a fragment header is read; more than six is too many.
    let mut next = ip[6];
    let mut off = ETH_HLEN + 40;
    let mut first_fragment = true;
    let mut transport_found = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS => {
                let h = bytes(frame, off, 2)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            IPPROTO_ROUTING => return Err(Reason::SourceRouted),
            IPPROTO_FRAGMENT => {
                let h = bytes(frame, off, 4)?;
                next = h[0];
                off += 8;
                if be16(&h[2..4]) >> 3 != 0 {
                    first_fragment = false;
                    transport_found = true;
                    break;
                }
            }
            _ => {
                transport_found = true;
                break;
            }
        }
    }
    if !transport_found {
        return Err(Reason::SourceRouted);
    }
    let mut parsed = ParsedIp { dst: Some(IpAddr::V6(Ipv6Addr::from(dst))), protocol: next, ..Default::default() };
    match next {
        IPPROTO_TCP | IPPROTO_UDP => {
            if unspecified {
                return Err(Reason::SpoofedIp);
            }
            if !first_fragment {
                parsed.later_fragment = true;
            } else {
                transport(frame, off, &mut parsed)?;
            }
            Ok(Parsed::Ip(parsed))
        }
        IPPROTO_ICMPV6 if !first_fragment => {
            if unspecified {
                return Err(Reason::SpoofedIp);
            }
            parsed.later_fragment = true;
            Ok(Parsed::Ip(parsed))
        }
        IPPROTO_ICMPV6 => icmpv6(frame, cfg, off, unspecified, &dst, parsed),
        _ => Err(Reason::UnknownProtocol),
    }
}

/// Neighbour discovery between the guest and its gateway passes with the
/// guest's own addresses only; router advertisements, redirects and MLD
/// queries never; MLD reports only to link-scope multicast; other ICMPv6
/// goes to the policy.
fn icmpv6(frame: &[u8], cfg: &SandboxConfig, off: usize, unspecified: bool, dst: &[u8; 16], parsed: ParsedIp) -> Result<Parsed, Reason> {
    let is = |target: &[u8], a: &[u8; 16], b: &[u8; 16]| target == a || target == b;
    match byte(frame, off)? {
        133 => {
            check_link_layer_option(frame, cfg, off + 8)?;
            Ok(Parsed::NeighbourDiscovery)
        }
        135 => {
            let target = bytes(frame, off + 8, 16)?;
            let allowed = if unspecified {
                is(target, &cfg.guest_ipv6, &cfg.guest_ipv6_link_local)
            } else {
                is(target, &cfg.gateway_ipv6, &cfg.gateway_ipv6_link_local)
            };
            if !allowed {
                return Err(Reason::BadNeighbourDiscovery);
            }
            check_link_layer_option(frame, cfg, off + 24)?;
            Ok(Parsed::NeighbourDiscovery)
        }
        136 => {
            let target = bytes(frame, off + 8, 16)?;
            if unspecified || !is(target, &cfg.guest_ipv6, &cfg.guest_ipv6_link_local) {
                return Err(Reason::BadNeighbourDiscovery);
            }
            check_link_layer_option(frame, cfg, off + 24)?;
            Ok(Parsed::NeighbourDiscovery)
        }
        134 | 137 | 130 => Err(Reason::BadNeighbourDiscovery),
        131 | 132 | 143 if dst[0] == 0xff && dst[1] == 0x02 => Ok(Parsed::NeighbourDiscovery),
        131 | 132 | 143 => Err(Reason::BadNeighbourDiscovery),
        _ if unspecified => Err(Reason::SpoofedIp),
        _ => Ok(Parsed::Ip(parsed)),
    }
}

/// A source/target link-layer address option first among the options must
/// carry the guest's MAC; a message too short for an option has none.
fn check_link_layer_option(frame: &[u8], cfg: &SandboxConfig, off: usize) -> Result<(), Reason> {
    let Ok(option) = bytes(frame, off, 8) else { return Ok(()) };
    if (option[0] == 1 || option[0] == 2) && option[1] == 1 && option[2..8] != cfg.guest_mac {
        return Err(Reason::BadNeighbourDiscovery);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;
    use crate::policy::Policy;
    use crate::sandbox::{AddressPools, SandboxSpec};

    fn setup(flags: u32) -> (SandboxSpec, SandboxConfig, CompiledPolicy) {
        let spec = SandboxSpec::new(7, "m", &AddressPools::default()).unwrap();
        let text = "name = \"m\"\n[network]\nallow = [\"198.51.100.0/24\", \"203.0.113.7:443\"]\ndeny = [\"198.51.100.16/28\"]\n";
        let policy = compile(&Policy::parse("m.toml", text).unwrap(), &spec.host_addresses()).unwrap();
        let cfg = spec.datapath_config(&policy, 7, flags, &[443]);
        (spec, cfg, policy)
    }

    fn v4_tcp(spec: &SandboxSpec, dst: [u8; 4], port: u16, flags: u8) -> Vec<u8> {
        let mut f = spec.gateway_mac.to_vec();
        f.extend_from_slice(&spec.guest_mac);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&spec.guest_ipv4.octets());
        f.extend_from_slice(&dst);
        f.extend_from_slice(&[0x9c, 0x40]);
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f
    }

    #[test]
    fn verdict_order() {
        let (spec, cfg, policy) = setup(sandbox_flags::REDIRECTS);
        let v = |frame: &[u8]| classify(frame, Some(&cfg), &policy).0;
        assert_eq!(v(&v4_tcp(&spec, [198, 51, 100, 5], 80, 0x02)), Reason::Allowed);
        assert_eq!(v(&v4_tcp(&spec, [198, 51, 100, 20], 80, 0x02)), Reason::PolicyDeny);
        assert_eq!(v(&v4_tcp(&spec, [192, 0, 2, 1], 80, 0x02)), Reason::DefaultDeny);
        assert_eq!(v(&v4_tcp(&spec, [192, 0, 2, 1], 443, 0x02)), Reason::Redirected);
        assert_eq!(v(&v4_tcp(&spec, [192, 0, 2, 1], 443, 0x12)), Reason::InvalidTcpFlags, "SYN+ACK");
        assert_eq!(v(&v4_tcp(&spec, [192, 0, 2, 1], 53, 0x03)), Reason::InvalidTcpFlags, "SYN+FIN");
        assert_eq!(v(&v4_tcp(&spec, [192, 0, 2, 1], 53, 0x18)), Reason::Redirected, "ACK+PSH");
        let mut spoofed = v4_tcp(&spec, [198, 51, 100, 5], 80, 0x02);
        spoofed[26] ^= 1;
        assert_eq!(v(&spoofed), Reason::SpoofedIp);
        spoofed[6] ^= 1;
        assert_eq!(v(&spoofed), Reason::SpoofedMac);
        assert_eq!(v(&v4_tcp(&spec, [198, 51, 100, 5], 80, 0x02)[..14 + 20 + 19]), Reason::Malformed);
        assert_eq!(classify(&v4_tcp(&spec, [198, 51, 100, 5], 80, 0x02), None, &policy), (Reason::UnknownSandbox, rule_id::NONE));
        // Without redirects the port is judged by the policy.
        let (_, plain, _) = setup(0);
        assert_eq!(classify(&v4_tcp(&spec, [192, 0, 2, 1], 443, 0x12), Some(&plain), &policy).0, Reason::DefaultDeny);
    }

    #[test]
    fn the_flag_list_is_the_common_crates() {
        for flags in 0..=255u8 {
            assert_eq!(REDIRECTABLE_TCP_FLAGS.contains(&(flags & TCP_FLAG_MASK)), sbx_net_common::tcp_flags_may_redirect(flags), "{flags:#04x}");
        }
    }
}
