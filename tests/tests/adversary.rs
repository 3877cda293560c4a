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

const POLICY: &str = r#"
name = "p"
[network]
default = "deny"
allow = ["198.51.100.0/24"]
"#;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

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
