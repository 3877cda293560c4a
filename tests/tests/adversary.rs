//! Attacks from a hostile guest, each with the outcome it must have. Raw
//! packets are built here and sent from the guest's namespace with a raw
//! socket (the guest is root in its VM); what leaves the host is watched on
//! the world's side of the uplink with a packet socket.
//!
//! The first class: packets on the redirected ports (DNS, 80, 443) that
//! conntrack would not redirect — invalid TCP flag combinations, a bad
//! checksum — which the classifier lets through for nftables to redirect and
//! which would otherwise be forwarded as they are, to any address.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::frames;
use sbx_net_tests::{require_root, unique_name, WorldServers};
use sbx_vmm::NetNs;

const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
const DENIED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const OPEN_PORT: u16 = 8080;

const POLICY_V6: &str = r#"
name = "p"
[network]
default = "deny"
allow = ["198.51.100.0/24", "2001:db8:100::/48"]
"#;

const POLICY: &str = r#"
name = "p"
[network]
default = "deny"
allow = ["198.51.100.0/24"]
"#;

use sbx_net_common::tcp_flag::{ACK, FIN, RST, SYN};

/// The Internet checksum of `parts` concatenated.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, protocol]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// A TCP segment with `flags` and `payload`; its checksum right or not.
fn tcp(src: Ipv4Addr, dst: Ipv4Addr, dst_port: u16, flags: u8, payload: &[u8], good_checksum: bool) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&40000u16.to_be_bytes());
    s.extend_from_slice(&dst_port.to_be_bytes());
    s.extend_from_slice(&0x1000_0001u32.to_be_bytes());
    s.extend_from_slice(&(if flags & ACK != 0 { 0x2000_0001u32 } else { 0 }).to_be_bytes());
    s.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    s.extend_from_slice(payload);
    let sum = checksum(&[&pseudo_header(src, dst, libc::IPPROTO_TCP as u8, s.len()), &s]);
    let sum = if good_checksum { sum } else { sum ^ 0x5a5a };
    s[16..18].copy_from_slice(&sum.to_be_bytes());
    frames::ipv4(src, dst, libc::IPPROTO_TCP as u8, &[], 0x4000, &s)
}

/// A UDP datagram with a wrong (non-zero) checksum.
fn udp_bad_checksum(src: Ipv4Addr, dst: Ipv4Addr, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = frames::udp(40001, dst_port, payload);
    let sum = checksum(&[&pseudo_header(src, dst, libc::IPPROTO_UDP as u8, d.len()), &d]) ^ 0x5a5a;
    d[6..8].copy_from_slice(&sum.to_be_bytes());
    frames::ipv4(src, dst, libc::IPPROTO_UDP as u8, &[], 0x4000, &d)
}

fn check(rc: libc::c_int, what: &str) -> libc::c_int {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
    rc
}

/// Sends whole IPv4 packets (header included) from the calling thread's
/// namespace.
fn send_raw(packets: &[(Ipv4Addr, Vec<u8>)]) {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) }, "raw socket");
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for (dst, packet) in packets {
        let addr = libc::sockaddr_in { sin_family: libc::AF_INET as u16, sin_port: 0, sin_addr: libc::in_addr { s_addr: u32::from(*dst).to_be() }, sin_zero: [0; 8] };
        // SAFETY: packet and addr outlive the call; the lengths are theirs.
        let rc = unsafe {
            libc::sendto(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0, (&addr as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32)
        };
        check(rc as libc::c_int, "sendto");
    }
}

/// A packet socket on one interface of the calling thread's namespace: every
/// IP packet that crosses it, from the moment it is opened.
struct Watch {
    fd: OwnedFd,
}

impl Watch {
    fn open(ifindex: u32) -> Watch {
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(all)) }, "packet socket");
        // SAFETY: fd was just returned by socket(2).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll lives across the call; the length is its size.
        check(
            unsafe { libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) },
            "bind packet socket",
        );
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: timeout lives across the call; the length is its size.
        check(
            unsafe {
                libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&timeout as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32)
            },
            "SO_RCVTIMEO",
        );
        Watch { fd }
    }

    /// The next packet, if one arrives within the socket's timeout.
    fn next(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: buf is ours and as long as we say.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then(|| buf[..n as usize].to_vec())
    }

    /// Packets seen until one carries `last` (or the deadline passes).
    fn until(&self, last: &[u8], deadline: Duration) -> Vec<Vec<u8>> {
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        while started.elapsed() < deadline {
            // SAFETY: buf is ours and as long as we say.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let packet = buf[..n as usize].to_vec();
            let done = contains(&packet, last);
            seen.push(packet);
            if done {
                return seen;
            }
        }
        panic!("the control packet never crossed the uplink within {deadline:?}: the watch proves nothing");
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn packets_conntrack_would_not_redirect_never_leave() {
    require_root();
    let h = DaemonHarness::new("escape", &[("p.toml", POLICY)]);
    h.topology.add_world_address(ALLOWED.into());
    h.topology.add_world_address(DENIED.into());
    let _open = WorldServers::start(&h.topology.world, &[ALLOWED.into()], OPEN_PORT);
    let info = h.create_guest(&unique_name("g"), "p");
    let guest_ip: Ipv4Addr = info["guest_ipv4"].as_str().unwrap().parse().unwrap();
    let guest = NetNs::open(info["netns"].as_str().unwrap()).expect("guest namespace");

    let mut attacks: Vec<(String, Ipv4Addr, Vec<u8>)> = Vec::new();
    for dst in [DENIED, METADATA, ALLOWED] {
        for port in [80u16, 443, 53] {
            for (flags, name) in [(FIN, "FIN"), (SYN | FIN, "SYN+FIN"), (0, "no flags"), (SYN | ACK, "SYN+ACK"), (RST, "RST"), (FIN | ACK, "FIN+ACK")] {
                let marker = format!("escape-{:03}", attacks.len());
                attacks.push((format!("TCP {name} with data to {dst}:{port}"), dst, tcp(guest_ip, dst, port, flags, marker.as_bytes(), true)));
            }
            let marker = format!("escape-{:03}", attacks.len());
            attacks.push((format!("TCP SYN with a bad checksum to {dst}:{port}"), dst, tcp(guest_ip, dst, port, SYN, marker.as_bytes(), false)));
        }
        let marker = format!("escape-{:03}", attacks.len());
        attacks.push((format!("UDP with a bad checksum to {dst}:53"), dst, udp_bad_checksum(guest_ip, dst, 53, marker.as_bytes())));
    }
    // The control: a connection start the policy allows, on a port nothing
    // redirects. Sent last; once it is seen, anything sent before it that
    // was going to cross the uplink has.
    let control = b"control-allowed".to_vec();
    let mut packets: Vec<(Ipv4Addr, Vec<u8>)> = attacks.iter().map(|(_, dst, p)| (*dst, p.clone())).collect();
    packets.push((ALLOWED, tcp(guest_ip, ALLOWED, OPEN_PORT, SYN, &control, true)));

    let world0 = h.topology.world_netlink.link_index("world0").expect("world0");
    // Opened (in the world namespace, where the socket stays) before
    // anything is sent.
    let watch = h.topology.world.run(|| Watch::open(world0)).expect("enter world");
    guest.run(|| send_raw(&packets)).expect("enter guest");
    let seen = watch.until(&control, Duration::from_secs(15));
    let escaped: Vec<&str> = attacks
        .iter()
        .enumerate()
        .filter(|(i, _)| seen.iter().any(|p| contains(p, format!("escape-{i:03}").as_bytes())))
        .map(|(_, (what, _, _))| what.as_str())
        .collect();
    assert!(escaped.is_empty(), "{} of {} left by the uplink: {escaped:#?}", escaped.len(), attacks.len());
}

/// What the daemon must do with one hostile frame: drop it in the
/// classifier and say why in `inspect` (the datapath's reason name).
struct FrameAttack {
    class: &'static str,
    name: String,
    frame: Vec<u8>,
    reason: &'static str,
    /// The attack's unique TCP/UDP source port, when it has one: its
    /// `inspect` record is then found by it.
    src_port: Option<u16>,
}

/// The `atkNNNNN` marker an attack frame carries, if any.
fn marker_of(frame: &[u8]) -> Option<&[u8]> {
    let at = frame.windows(3).position(|w| w == b"atk")?;
    Some(&frame[at..(at + 8).min(frame.len())])
}

/// Sends whole Ethernet frames out of `ifindex` in the calling thread's
/// namespace (as a VM's driver would put them on its tap).
fn send_frames(ifindex: u32, frames: &[&[u8]]) {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) }, "packet socket");
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for frame in frames {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and sll outlive the call; the lengths are theirs.
        let rc = unsafe {
            libc::sendto(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        };
        check(rc as libc::c_int, "sendto (packet socket)");
    }
}

fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16).expect("hex MAC byte")).collect();
    bytes.try_into().expect("six MAC bytes")
}

/// An IPv4 packet with its header checksum filled in (the kernel drops a
/// wrong one on receipt, before anything else could judge it).
fn ipv4_checked(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, options: &[u8], frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = frames::ipv4(src, dst, protocol, options, frag, payload);
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let sum = checksum(&[&p[..ihl]]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Layer 2, 3 and 4 attacks and isolation breaches from a guest, as raw
/// frames on its own interface: every one is dropped by the classifier,
/// attributed in `inspect` with the reason, and never crosses the uplink or
/// reaches the other sandbox. Then the daemon is killed and the corpus sent
/// again: the pinned classifier and nftables hold without it.
#[test]
fn hostile_frames_are_dropped_attributed_and_hold_while_the_daemon_is_down() {
    use frames::*;
    use sbx_net_tests::{UPLINK_HOST_V4, UPLINK_HOST_V6};
    use std::net::Ipv6Addr;
    require_root();
    let mut h = DaemonHarness::new("frames", &[("p.toml", POLICY_V6)]);
    h.topology.add_world_address(ALLOWED.into());
    h.topology.add_world_address(DENIED.into());
    let _open = WorldServers::start(&h.topology.world, &[ALLOWED.into()], OPEN_PORT);
    let name = unique_name("g");
    let info = h.create_guest(&name, "p");
    let other = h.create_guest(&unique_name("o"), "p");
    let guest = NetNs::open(info["netns"].as_str().unwrap()).expect("guest namespace");
    let other_ns = NetNs::open(other["netns"].as_str().unwrap()).expect("other guest namespace");
    let ip4 = |v: &serde_json::Value, k: &str| -> Ipv4Addr { v[k].as_str().unwrap().parse().unwrap() };
    let ip6 = |v: &serde_json::Value, k: &str| -> Ipv6Addr { v[k].as_str().unwrap().parse().unwrap() };
    let (me4, me6, gw4, gw6) = (ip4(&info, "guest_ipv4"), ip6(&info, "guest_ipv6"), ip4(&info, "gateway_ipv4"), ip6(&info, "gateway_ipv6"));
    let (mac, gw_mac) = (parse_mac(info["guest_mac"].as_str().unwrap()), parse_mac(info["gateway_mac"].as_str().unwrap()));
    let (other4, other6) = (ip4(&other, "guest_ipv4"), ip6(&other, "guest_ipv6"));
    let ll = sbx_net::sandbox::eui64_link_local(mac);
    let allowed6: Ipv6Addr = "2001:db8:100::5".parse().unwrap();

    let mut attacks: Vec<FrameAttack> = Vec::new();
    let mut next_port = 31000u16;
    let mut port = || {
        next_port += 1;
        next_port
    };
    let mut add = |class: &'static str, name: &str, frame: Vec<u8>, reason: &'static str, src_port: Option<u16>| {
        attacks.push(FrameAttack { class, name: name.to_string(), frame, reason, src_port });
    };
    let mark = |port: u16| format!("atk{port}").into_bytes();
    let eth4 = |p: Vec<u8>| ethernet(gw_mac, mac, ETH_P_IP, &p);
    let eth6 = |p: Vec<u8>| ethernet(gw_mac, mac, ETH_P_IPV6, &p);
    let udp4 = |src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16| ipv4_checked(src, dst, 17, &[], 0, &udp(sport, dport, &mark(sport)));
    let tcp4 = |dst: Ipv4Addr, sport: u16, dport: u16, flags: u8| ipv4_checked(me4, dst, 6, &[], 0, &tcp_segment(sport, dport, flags, &mark(sport)));

    // Layer 2.
    let p = port();
    add("L2", "802.1Q tag around an allowed packet", vlan_tagged(gw_mac, mac, 5, &udp4(me4, ALLOWED, p, OPEN_PORT)), "vlan_tagged", None);
    add("L2", "802.1ad (QinQ) tag", ethernet(gw_mac, mac, 0x88a8, &[0; 46]), "vlan_tagged", None);
    add("L2", "0x9100 QinQ tag", ethernet(gw_mac, mac, 0x9100, &[0; 46]), "vlan_tagged", None);
    add("L2", "LLDP", ethernet([0x01, 0x80, 0xc2, 0, 0, 0x0e], mac, 0x88cc, &[0; 46]), "unknown_ethertype", None);
    add("L2", "PPPoE discovery", ethernet([0xff; 6], mac, 0x8863, &[0; 46]), "unknown_ethertype", None);
    add("L2", "MPLS unicast", ethernet(gw_mac, mac, 0x8847, &[0; 46]), "unknown_ethertype", None);
    add("L2", "802.3 length field (LLC), not an ethertype", ethernet(gw_mac, mac, 46, &[0; 46]), "unknown_ethertype", None);
    add("L2", "IPv4 ethertype carrying an IPv6 header", ethernet(gw_mac, mac, ETH_P_IP, &ipv6(me6, allowed6, 17, &udp(1, 9, b"x"))), "malformed", None);
    let p = port();
    add("L2", "foreign source MAC", ethernet(gw_mac, [2, 0, 0, 0, 0, 9], ETH_P_IP, &udp4(me4, ALLOWED, p, OPEN_PORT)), "spoofed_mac", None);
    let p = port();
    add("L2", "broadcast source MAC", ethernet(gw_mac, [0xff; 6], ETH_P_IP, &udp4(me4, ALLOWED, p, OPEN_PORT)), "spoofed_mac", None);
    add("L2", "ARP for an uplink neighbour", ethernet([0xff; 6], mac, ETH_P_ARP, &arp_request(mac, me4, UPLINK_HOST_V4)), "bad_neighbour_discovery", None);
    add("L2", "ARP claiming the other sandbox's address", ethernet([0xff; 6], mac, ETH_P_ARP, &arp_request(mac, other4, gw4)), "bad_neighbour_discovery", None);
    add("L2", "ARP claiming another MAC", ethernet([0xff; 6], mac, ETH_P_ARP, &arp_request([2, 0, 0, 0, 0, 9], me4, gw4)), "bad_neighbour_discovery", None);
    let mut gratuitous = arp_request(mac, gw4, gw4);
    gratuitous[7] = 2;
    add("L2", "gratuitous ARP reply claiming the gateway", ethernet([0xff; 6], mac, ETH_P_ARP, &gratuitous), "bad_neighbour_discovery", None);
    let nd = |src: Ipv6Addr, dst: Ipv6Addr, body: Vec<u8>| ethernet(multicast_mac(dst), mac, ETH_P_IPV6, &ipv6(src, dst, 58, &body));
    add("L2", "NS for the other sandbox", nd(ll, solicited_node(other6), neighbour_discovery(135, other6, Some(mac))), "bad_neighbour_discovery", None);
    add("L2", "NA claiming the gateway's address", nd(ll, "ff02::1".parse().unwrap(), neighbour_discovery(136, gw6, Some(mac))), "bad_neighbour_discovery", None);
    add("L2", "NS carrying another MAC", nd(ll, solicited_node(gw6), neighbour_discovery(135, gw6, Some([2, 0, 0, 0, 0, 9]))), "bad_neighbour_discovery", None);
    add("L2", "router advertisement", nd(ll, "ff02::1".parse().unwrap(), router_advertisement()), "bad_neighbour_discovery", None);
    add("L2", "DAD probe for the gateway's address", nd(Ipv6Addr::UNSPECIFIED, solicited_node(gw6), neighbour_discovery(135, gw6, None)), "bad_neighbour_discovery", None);

    // Layer 3: options, fragments, extension headers.
    let lsrr = [0x83, 7, 4, 198, 51, 100, 5, 0];
    let ssrr = [0x89, 7, 4, 198, 51, 100, 5, 0];
    let p = port();
    add("L3", "IPv4 loose source route via an allowed hop", eth4(ipv4_checked(me4, ALLOWED, 17, &lsrr, 0, &udp(p, 9, &mark(p)))), "source_routed", None);
    let p = port();
    add("L3", "IPv4 strict source route", eth4(ipv4_checked(me4, ALLOWED, 17, &ssrr, 0, &udp(p, 9, &mark(p)))), "source_routed", None);
    add("L3", "IPv4 option with length 1", eth4(ipv4_checked(me4, ALLOWED, 17, &[0x44, 1, 0, 0], 0, &{ let p = port(); udp(p, 9, &mark(p)) })), "malformed", None);
    let mut short_ihl = ipv4_checked(me4, ALLOWED, 17, &[], 0, &udp(1, 9, b"x"));
    short_ihl[0] = 0x44;
    add("L3", "IPv4 IHL below 5", eth4(short_ihl), "malformed", None);
    add("L3", "IPv4 tiny first fragment cutting the TCP header", eth4(ipv4_checked(me4, DENIED, 6, &[], 0x2000, &tcp_segment(port(), 80, 0x02, b"")[..8])), "malformed", None);
    add("L3", "IPv4 later fragment to a denied address", eth4(ipv4_checked(me4, DENIED, 6, &[], 0x2001, &[0x41; 16])), "default_deny", None);
    add("L3", "IPv4 overlapping fragment (offset 1) rewriting ports", eth4(ipv4_checked(me4, METADATA, 6, &[], 1, &tcp_segment(80, 80, 0x02, b"")[..8])), "policy_deny", None);
    let p = port();
    add("L3", "IPv6 routing header (type 0)", eth6(ipv6(me6, allowed6, 43, &[[17, 2, 0, 1, 0, 0, 0, 0].as_slice(), &[0; 16], &udp(p, 9, &mark(p))].concat())), "source_routed", None);
    let mut deep = Vec::new();
    for _ in 0..7 {
        deep.extend(ipv6_ext(60));
    }
    let last = deep.len() - 8;
    deep[last] = 17;
    deep.extend({ let p = port(); udp(p, 9, &mark(p)) });
    add("L3", "IPv6 seven extension headers", eth6(ipv6(me6, allowed6, 60, &deep)), "source_routed", None);
    let mut hop_then_route = ipv6_ext(43);
    hop_then_route.extend([17, 2, 0, 1, 0, 0, 0, 0]);
    hop_then_route.extend([0; 16]);
    hop_then_route.extend({ let p = port(); udp(p, 9, &mark(p)) });
    add("L3", "IPv6 hop-by-hop then a routing header", eth6(ipv6(me6, allowed6, 0, &hop_then_route)), "source_routed", None);
    let mut later = ipv6_fragment(17, 1, false);
    later.extend([0x41; 16]);
    add("L3", "IPv6 later fragment to an unlisted address", eth6(ipv6(me6, "2001:db8:300::1".parse().unwrap(), 44, &later)), "default_deny", None);
    let mut tiny = ipv6_fragment(6, 0, true);
    tiny.extend(&tcp_segment(port(), 443, 0x02, b"")[..8]);
    add("L3", "IPv6 tiny first fragment cutting the TCP header", eth6(ipv6(me6, allowed6, 44, &tiny)), "malformed", None);
    // Transition forms and other embeddings of IPv4.
    for (what, dst) in [
        ("IPv4-mapped loopback", "::ffff:127.0.0.1"),
        ("IPv4-compatible metadata address", "::a9fe:a9fe"),
        ("NAT64 metadata address", "64:ff9b::a9fe:a9fe"),
        ("local NAT64", "64:ff9b:1::a9fe:a9fe"),
        ("6to4 of the metadata address", "2002:a9fe:a9fe::1"),
        ("Teredo", "2001:0:a9fe:a9fe::1"),
        ("the uplink's link-local neighbour", "fe80::1"),
        ("all-nodes multicast", "ff02::1"),
        ("the other sandbox's IPv6", &other6.to_string()),
        ("the gateway's IPv6", &gw6.to_string()),
        ("the host's uplink IPv6", &UPLINK_HOST_V6.to_string()),
        ("IPv6 loopback", "::1"),
    ] {
        let p = port();
        add("L3", &format!("IPv6 to {what}"), eth6(ipv6(me6, dst.parse().unwrap(), 17, &udp(p, 9, &mark(p)))), "policy_deny", Some(p));
    }
    for (what, dst) in [
        ("limited broadcast", Ipv4Addr::BROADCAST),
        ("mDNS multicast", Ipv4Addr::new(224, 0, 0, 251)),
        ("the metadata service", METADATA),
        ("loopback", Ipv4Addr::LOCALHOST),
        ("0.0.0.0", Ipv4Addr::UNSPECIFIED),
        ("the gateway", gw4),
        ("the host's uplink address", UPLINK_HOST_V4),
        ("the other sandbox", other4),
        ("the sandbox pool's broadcast", Ipv4Addr::new(10, 200, 255, 255)),
    ] {
        let p = port();
        add("L3", &format!("UDP to {what}"), eth4(udp4(me4, dst, p, 9)), "policy_deny", Some(p));
    }
    for (what, protocol) in [("GRE", 47u8), ("IP-in-IP", 4), ("IPv6-in-IPv4 (6in4)", 41), ("ESP", 50), ("SCTP", 132), ("IGMP", 2)] {
        let p = port();
        let inner = ipv4_checked(me4, DENIED, 17, &[], 0, &udp(p, 9, &mark(p)));
        add("L3", &format!("{what} to an allowed address"), eth4(ipv4_checked(me4, ALLOWED, protocol, &[], 0, &inner)), "unknown_protocol", None);
    }
    add("L3", "IPv6 no-next-header to an allowed address", eth6(ipv6(me6, allowed6, 59, &[0; 8])), "unknown_protocol", None);
    for (what, src) in [("the other sandbox", other4), ("the gateway", gw4), ("0.0.0.0", Ipv4Addr::UNSPECIFIED), ("an allowed server", ALLOWED), ("the host's uplink", UPLINK_HOST_V4)] {
        let p = port();
        add("L3", &format!("IPv4 source spoofed as {what}"), eth4(udp4(src, ALLOWED, p, OPEN_PORT)), "spoofed_ip", None);
    }
    add("L3", "IPv6 source spoofed as the other sandbox", eth6(ipv6(other6, allowed6, 17, &{ let p = port(); udp(p, 9, &mark(p)) })), "spoofed_ip", None);
    add("L3", "IPv6 unspecified source with UDP", eth6(ipv6(Ipv6Addr::UNSPECIFIED, allowed6, 17, &{ let p = port(); udp(p, 9, &mark(p)) })), "spoofed_ip", None);

    // Layer 4.
    let p = port();
    add("L4", "UDP to an unlisted address", eth4(udp4(me4, DENIED, p, 9)), "default_deny", Some(p));
    let p = port();
    add("L4", "TCP SYN to an unlisted address", eth4(tcp4(DENIED, p, 22, 0x02)), "default_deny", Some(p));
    let p = port();
    add("L4", "ICMP echo to an unlisted address", eth4(ipv4_checked(me4, DENIED, 1, &[], 0, &icmp_echo(false))), "default_deny", None);
    let _ = p;
    for (what, flags) in [("SYN+FIN", 0x03u8), ("no flags", 0), ("SYN+ACK", 0x12), ("FIN", 0x01), ("SYN+RST", 0x06), ("all flags (xmas)", 0x3f)] {
        let p = port();
        add("L4", &format!("IPv6 TCP {what} to a redirected port"), eth6(ipv6(me6, "2001:db8:300::1".parse().unwrap(), 6, &tcp_segment(p, 443, flags, &mark(p)))), "invalid_tcp_flags", Some(p));
        let p = port();
        add("L4", &format!("IPv4 TCP {what} to the metadata service on 80"), eth4(tcp4(METADATA, p, 80, flags)), "invalid_tcp_flags", Some(p));
    }

    let guest_eth0 = guest.run(|| sbx_vmm::Netlink::new().and_then(|nl| nl.link_index("eth0"))).expect("enter guest").expect("guest eth0");
    let other_eth0 = other_ns.run(|| sbx_vmm::Netlink::new().and_then(|nl| nl.link_index("eth0"))).expect("enter other").expect("other eth0");
    let world0 = h.topology.world_netlink.link_index("world0").expect("world0");
    let control_port = 30999u16;
    let control = eth4(ipv4_checked(me4, ALLOWED, 6, &[], 0x4000, &tcp(me4, ALLOWED, OPEN_PORT, SYN, b"control", true)[20..]));
    let _ = control_port;

    let run_corpus = |world: &NetNs, round: &str| {
        let watch = world.run(|| Watch::open(world0)).expect("enter world");
        let other_watch = other_ns.run(|| Watch::open(other_eth0)).expect("enter other");
        let mut all: Vec<&[u8]> = attacks.iter().map(|a| a.frame.as_slice()).collect();
        all.push(&control);
        guest.run(|| send_frames(guest_eth0, &all)).expect("enter guest");
        let seen = watch.until(b"control", Duration::from_secs(15));
        // Frames reach the other guest only through the host, which routes
        // no later than it forwards to the world: drain what arrived.
        let mut at_other = Vec::new();
        while let Some(p) = other_watch.next() {
            at_other.push(p);
        }
        let leaked: Vec<String> = attacks
            .iter()
            .filter_map(|a| marker_of(&a.frame).map(|m| (a, m)))
            .filter(|(_, m)| seen.iter().chain(&at_other).any(|p| contains(p, m)))
            .map(|(a, _)| format!("[{}] {}", a.class, a.name))
            .collect();
        assert!(leaked.is_empty(), "{round}: {} of {} attacks crossed the uplink or reached the other sandbox: {leaked:#?}", leaked.len(), attacks.len());
    };
    run_corpus(&h.topology.world, "daemon running");

    // Every attack is attributed, with the reason it was dropped for.
    let records = || -> Vec<serde_json::Value> {
        let out = h.cli(&["inspect", "--sandbox", &name, "-o", "json"]);
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    let mut missing = Vec::new();
    sbx_net_tests::try_wait_for(Duration::from_secs(15), || {
        let records = records();
        missing = attacks
            .iter()
            .filter(|a| {
                !records.iter().any(|r| {
                    r["source"] == "datapath" && r["reason"] == a.reason && a.src_port.is_none_or(|p| r["src_port"] == p)
                })
            })
            .map(|a| format!("[{}] {} (expected {})", a.class, a.name, a.reason))
            .collect();
        missing.is_empty().then_some(())
    });
    assert!(missing.is_empty(), "attacks without their inspect record: {missing:#?}");
    let classes: std::collections::BTreeMap<&str, usize> = attacks.iter().fold(Default::default(), |mut m, a| {
        *m.entry(a.class).or_default() += 1;
        m
    });
    eprintln!("{} frame attacks blocked and attributed: {classes:?}", attacks.len());

    // Restart: with the daemon killed, the pinned classifier and the
    // nftables table still hold.
    h.kill_daemon(libc::SIGKILL);
    run_corpus(&h.topology.world, "daemon killed");
    h.start_daemon();
}

/// A flood of denied packets from one guest cannot rotate every tenant's
/// evidence out of the shared audit log: past its budget its lines are
/// counted, not written, another sandbox's denial is still written, and the
/// log says how many were suppressed.
#[test]
fn a_flood_of_denials_keeps_other_tenants_in_the_audit_log() {
    use frames::*;
    require_root();
    let config = "audit_lines_per_second = 5\naudit_burst = 20\n";
    let h = DaemonHarness::with_args("auditflood", &[("p.toml", POLICY)], Some(config), &[]);
    let flood_name = unique_name("flood");
    let flooder = h.create_guest(&flood_name, "p");
    let quiet_name = unique_name("quiet");
    let quiet = h.create_guest(&quiet_name, "p");
    let flood_ns = NetNs::open(flooder["netns"].as_str().unwrap()).unwrap();
    let me4: Ipv4Addr = flooder["guest_ipv4"].as_str().unwrap().parse().unwrap();
    let (mac, gw_mac) = (parse_mac(flooder["guest_mac"].as_str().unwrap()), parse_mac(flooder["gateway_mac"].as_str().unwrap()));
    // 500 new denied flows (one per destination port), bounded in count.
    let flood: Vec<Vec<u8>> = (0..500u16).map(|i| ethernet(gw_mac, mac, ETH_P_IP, &ipv4_checked(me4, DENIED, 17, &[], 0, &udp(40000, 1000 + i, b"flood")))).collect();
    let eth0 = flood_ns.run(|| sbx_vmm::Netlink::new().and_then(|nl| nl.link_index("eth0"))).unwrap().unwrap();
    let started = Instant::now();
    flood_ns.run(|| send_frames(eth0, &flood.iter().map(Vec::as_slice).collect::<Vec<_>>())).unwrap();
    // The quiet sandbox's one denial, after the flood.
    assert!(!sbx_net_tests::tcp_connects(quiet["netns"].as_str().unwrap(), DENIED.into(), 22));
    let audit_path = h.state_dir.join("audit.log");
    let lines_of = |sandbox: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit_path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|r| r["sandbox"] == sandbox).collect()
    };
    sbx_net_tests::wait_until(Duration::from_secs(15), "the quiet sandbox's denial in the audit log", || !lines_of(&quiet_name).is_empty());
    sbx_net_tests::wait_until(Duration::from_secs(15), "the flood counted as suppressed", || {
        h.metrics().lines().any(|l| l.starts_with("sbx_net_audit_suppressed_total ") && !l.ends_with(" 0"))
    });
    let written = lines_of(&flood_name).iter().filter(|r| r["event"] != "audit_suppressed").count();
    let budget = 20 + 5 * (started.elapsed().as_secs() as usize + 1);
    assert!(written <= budget, "the flooding sandbox wrote {written} audit lines (budget {budget})");
    assert!(written >= 20, "its first {written} denials (the burst) are written");
    assert!(lines_of(&flood_name).iter().any(|r| r["event"] == "audit_suppressed"), "the log says that the flood's records are being suppressed");
}
