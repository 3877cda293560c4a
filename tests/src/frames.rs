//! Crafted Ethernet frames for BPF_PROG_TEST_RUN. Checksums are left zero:
//! the classifier does not verify them (the receiving stack does).

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An 802.1Q tagged frame carrying IPv4.
pub fn vlan_tagged(dst: [u8; 6], src: [u8; 6], vid: u16, payload: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    inner.extend_from_slice(&vid.to_be_bytes());
    inner.extend_from_slice(&ETH_P_IP.to_be_bytes());
    inner.extend_from_slice(payload);
    ethernet(dst, src, 0x8100, &inner)
}

/// IPv4 header (+ options) and payload. `frag` is the raw flags/offset field.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, options: &[u8], frag: u16, payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "options must be padded to 32 bits");
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + payload.len();
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    h.extend_from_slice(payload);
    h
}

/// IPv6 header; `next` is the first next-header value and `rest` the
/// extension headers and payload.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, rest: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(rest.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(rest);
    h
}

/// An 8-byte IPv6 extension header (hop-by-hop, destination options,
/// routing) with padding.
pub fn ipv6_ext(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// IPv6 fragment header.
pub fn ipv6_fragment(next: u8, offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | more as u16;
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1]);
    h
}

pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// A TCP SYN (20-byte header).
pub fn tcp_syn(src_port: u16, dst_port: u16) -> Vec<u8> {
    tcp_segment(src_port, dst_port, 0x02, &[])
}

/// A TCP segment (20-byte header, checksum not computed) with `flags` and
/// `payload`.
pub fn tcp_segment(src_port: u16, dst_port: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h.extend_from_slice(payload);
    h
}

pub fn icmp_echo(v6: bool) -> Vec<u8> {
    vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1]
}

/// ARP request: who has `target_ip`, tell `sender_ip` (at `sender_mac`).
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender_ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target_ip.octets());
    a
}

/// ICMPv6 neighbour solicitation (135) or advertisement (136) for `target`
/// with a source/target link-layer address option carrying `lladdr`.
pub fn neighbour_discovery(icmp_type: u8, target: Ipv6Addr, lladdr: Option<[u8; 6]>) -> Vec<u8> {
    let mut m = vec![icmp_type, 0, 0, 0, if icmp_type == 136 { 0x60 } else { 0 }, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    if let Some(mac) = lladdr {
        m.extend_from_slice(&[if icmp_type == 135 { 1 } else { 2 }, 1]);
        m.extend_from_slice(&mac);
    }
    m
}

/// ICMPv6 router advertisement (which a guest must never send).
pub fn router_advertisement() -> Vec<u8> {
    vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// The solicited-node multicast address for `ip`.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | o[13] as u16, u16::from_be_bytes([o[14], o[15]]))
}

pub fn multicast_mac(ip: Ipv6Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}
