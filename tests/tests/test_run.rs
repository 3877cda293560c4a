//! The real classifier, fed crafted frames through BPF_PROG_TEST_RUN: every
//! parse path, anti-spoof rule and verdict, with the drop event it emits.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sbx_net::policy::compile::{compile, CompiledPolicy, PortInfo};
use sbx_net::sandbox::denies::compile_for_sandbox;
use sbx_net::datapath::{Datapath, DatapathOptions, EventReader};
use sbx_net::policy::Policy;
use sbx_net::sandbox::{eui64_link_local, AddressPools, SandboxSpec};
use sbx_net_common::{action, program_names, rule_id, FlowEvent, Reason};
use sbx_net_tests::frames::*;
use sbx_net_tests::{require_root, unique_name};
use sbx_vmm::NetNs;

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
/// BPF_PROG_TEST_RUN without a device runs "on" loopback.
const LO_IFINDEX: u32 = 1;

const POLICY: &str = r#"
name = "test-run"
[network]
default = "deny"
allow = ["198.51.100.0/24", "203.0.113.7:443", "2001:db8:100::/48", "[2001:db8:200::7]:443"]
deny = ["198.51.100.16/28", "2001:db8:100:10::/64"]
"#;

struct Harness {
    _ns: NetNs,
    datapath: Datapath,
    events: EventReader,
    spec: SandboxSpec,
    policy: CompiledPolicy,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_policy(POLICY)
    }

    fn with_policy(text: &str) -> Harness {
        Harness::with_options(text, &DatapathOptions::default())
    }

    fn with_options(text: &str, options: &DatapathOptions) -> Harness {
        require_root();
        // A private namespace so "loopback" is ours alone.
        let ns = NetNs::create(&unique_name("tr")).expect("netns");
        ns.enter_current_thread().expect("enter netns");
        let mut datapath = Datapath::load(options).expect("load eBPF");
        let events = datapath.take_events().expect("events");
        let spec = SandboxSpec::new(7, "tr", &AddressPools::default()).unwrap();
        // Compiled as the daemon compiles it for a sandbox (a namespace of
        // our own has no host addresses but loopback). The classifier runs
        // on loopback, no tap: the flags are each test's own.
        let policy = compile_for_sandbox(&Policy::parse("test-run.toml", text).unwrap(), &spec, &[], &AddressPools::default()).unwrap();
        datapath
            .install_sandbox(LO_IFINDEX, &spec.datapath_config(&policy, spec.id, 0, &[]), &policy)
            .expect("install sandbox");
        Harness { _ns: ns, datapath, events, spec, policy }
    }

    fn run(&mut self, frame: &[u8]) -> (i32, Vec<FlowEvent>) {
        let (code, _) = self.datapath.test_run(program_names::EGRESS, frame, LO_IFINDEX, 1).unwrap_or_else(|e| panic!("test run of a {}-byte frame: {e:?}", frame.len()));
        (code, self.events.drain())
    }

    fn gw_mac(&self) -> [u8; 6] {
        self.spec.gateway_mac
    }
    fn mac(&self) -> [u8; 6] {
        self.spec.guest_mac
    }

    fn v4(&self, dst: Ipv4Addr, proto: u8, options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
        ethernet(self.gw_mac(), self.mac(), ETH_P_IP, &ipv4(self.spec.guest_ipv4, dst, proto, options, frag, l4))
    }

    fn v6(&self, src: Ipv6Addr, dst: Ipv6Addr, next: u8, rest: &[u8]) -> Vec<u8> {
        ethernet(self.gw_mac(), self.mac(), ETH_P_IPV6, &ipv6(src, dst, next, rest))
    }

    /// Asserts a pass with no event.
    fn passes(&mut self, what: &str, frame: &[u8]) {
        let (code, events) = self.run(frame);
        assert_eq!(code, TC_ACT_OK, "{what}: expected pass, got drop {events:?}");
        assert!(events.is_empty(), "{what}: a pass must not emit a drop event");
    }

    /// Asserts a drop with exactly one event carrying `reason`; returns it.
    fn drops(&mut self, what: &str, frame: &[u8], reason: Reason) -> FlowEvent {
        let (code, events) = self.run(frame);
        assert_eq!(code, TC_ACT_SHOT, "{what}: expected drop");
        assert_eq!(events.len(), 1, "{what}: one drop event");
        let ev = events[0];
        assert_eq!(Reason::from_u8(ev.reason), Some(reason), "{what}: reason");
        let expected_sandbox = if reason == Reason::UnknownSandbox { 0 } else { 7 };
        assert_eq!(ev.sandbox_id, expected_sandbox, "{what}: sandbox id");
        assert_eq!(ev.action, action::DENY);
        ev
    }
}

const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
const NESTED_DENY_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const UNLISTED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const PORT_ONLY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

fn allowed_v6() -> Ipv6Addr {
    "2001:db8:100::5".parse().unwrap()
}

#[test]
fn ipv4_verdicts_and_drop_events() {
    let mut h = Harness::new();
    h.passes("udp to allowed", &h.v4(ALLOWED_V4, 17, &[], 0, &udp(5000, 53, b"x")));
    h.passes("tcp to allowed", &h.v4(ALLOWED_V4, 6, &[], 0, &tcp_syn(40000, 80)));
    h.passes("icmp to allowed", &h.v4(ALLOWED_V4, 1, &[], 0, &icmp_echo(false)));

    let ev = h.drops("tcp to nested deny", &h.v4(NESTED_DENY_V4, 6, &[], 0, &tcp_syn(40000, 80)), Reason::PolicyDeny);
    assert_eq!(h.policy.describe_rule(ev.rule_id), "deny 198.51.100.16/28");
    assert_eq!((ev.ip_version, ev.protocol, ev.src_port, ev.dst_port), (4, 6, 40000, 80));
    assert_eq!(&ev.src_addr[..4], &h.spec.guest_ipv4.octets());
    assert_eq!(&ev.dst_addr[..4], &NESTED_DENY_V4.octets());

    let ev = h.drops("udp to unlisted", &h.v4(UNLISTED_V4, 17, &[], 0, &udp(1, 9, b"")), Reason::DefaultDeny);
    assert_eq!(ev.rule_id, rule_id::DEFAULT);
    assert_eq!(h.policy.describe_rule(ev.rule_id), "default deny");

    h.passes("port rule, its port", &h.v4(PORT_ONLY_V4, 6, &[], 0, &tcp_syn(1, 443)));
    h.drops("port rule, other port", &h.v4(PORT_ONLY_V4, 6, &[], 0, &tcp_syn(1, 80)), Reason::DefaultDeny);
    h.drops("port rule, icmp", &h.v4(PORT_ONLY_V4, 1, &[], 0, &icmp_echo(false)), Reason::DefaultDeny);

    let ev = h.drops("metadata", &h.v4(Ipv4Addr::new(169, 254, 169, 254), 6, &[], 0, &tcp_syn(1, 80)), Reason::PolicyDeny);
    assert_eq!(h.policy.describe_rule(ev.rule_id), "builtin deny 169.254.0.0/16 (link-local, cloud metadata)");
    let ev = h.drops("the gateway", &h.v4(h.spec.gateway_ipv4, 6, &[], 0, &tcp_syn(1, 22)), Reason::PolicyDeny);
    assert_eq!(h.policy.describe_rule(ev.rule_id), format!("builtin deny {}/32 (host address)", h.spec.gateway_ipv4));
    h.drops("gre", &h.v4(ALLOWED_V4, 47, &[], 0, &[0; 8]), Reason::UnknownProtocol);
}

/// The benchmark's step probes (`bench datapath`'s breakdown of where the
/// classifier's time goes) load, and each stops after its own step: a
/// spoofed source passes the probes that stop before the parse and fails
/// the later ones; a denied destination passes the parse and fails the
/// decision.
#[test]
fn bench_step_probes_stop_after_their_step() {
    let h = Harness::with_options(POLICY, &DatapathOptions { bench_steps: true, ..Default::default() });
    let allowed = h.v4(ALLOWED_V4, 17, &[], 0, &udp(5000, 443, b"x"));
    let spoofed = ethernet(h.gw_mac(), h.mac(), ETH_P_IP, &ipv4(Ipv4Addr::new(10, 99, 0, 1), ALLOWED_V4, 17, &[], 0, &udp(5000, 443, b"x")));
    let denied = h.v4(UNLISTED_V4, 17, &[], 0, &udp(5000, 443, b"x"));
    let [config, scratch, parse, decide] = program_names::BENCH_STEPS;
    let cases: [(&[u8], [i32; 4]); 3] = [
        (&allowed, [TC_ACT_OK; 4]),
        (&spoofed, [TC_ACT_OK, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_SHOT]),
        (&denied, [TC_ACT_OK, TC_ACT_OK, TC_ACT_OK, TC_ACT_SHOT]),
    ];
    for (case, (frame, expected)) in ["allowed", "spoofed source", "denied destination"].iter().zip(cases) {
        for (program, want) in [config, scratch, parse, decide].into_iter().zip(expected) {
            let (code, _) = h.datapath.test_run(program, frame, LO_IFINDEX, 1).expect("test run");
            assert_eq!(code, want, "{program} on the {case} frame");
        }
    }
}

#[test]
fn ipv4_options_and_fragments() {
    let mut h = Harness::new();
    // NOP NOP + record route (7, len 7, ptr 4, one slot) + EOL = 12 bytes.
    let record_route = [1, 1, 7, 7, 4, 0, 0, 0, 0, 0, 0, 0];
    h.passes("options without source routing", &h.v4(ALLOWED_V4, 17, &record_route, 0, &udp(1, 7, b"x")));
    let lsrr = [0x83, 7, 4, 198, 51, 100, 5, 0];
    h.drops("loose source route", &h.v4(ALLOWED_V4, 17, &lsrr, 0, &udp(1, 7, b"x")), Reason::SourceRouted);
    let ssrr = [1, 0x89, 7, 4, 198, 51, 100, 5];
    h.drops("strict source route", &h.v4(ALLOWED_V4, 17, &ssrr, 0, &udp(1, 7, b"x")), Reason::SourceRouted);
    let bad_len = [0x44, 1, 0, 0];
    h.drops("option with length < 2", &h.v4(ALLOWED_V4, 17, &bad_len, 0, &udp(1, 7, b"x")), Reason::Malformed);
    // Options before a denied destination: the options path still reaches the verdict.
    h.drops("options, denied dst", &h.v4(NESTED_DENY_V4, 6, &record_route, 0, &tcp_syn(1, 80)), Reason::PolicyDeny);

    const MF: u16 = 0x2000;
    h.passes("first fragment, allowed", &h.v4(ALLOWED_V4, 17, &[], MF, &udp(1, 7, &[0; 32])));
    h.passes("later fragment, allowed", &h.v4(ALLOWED_V4, 17, &[], 4, &[0; 32]));
    h.drops("later fragment, unlisted", &h.v4(UNLISTED_V4, 17, &[], 4, &[0; 32]), Reason::DefaultDeny);
    h.passes("later fragment of an allowed port", &h.v4(PORT_ONLY_V4, 6, &[], 4, &[0; 32]));
    h.drops(
        "first fragment too short for the TCP header",
        &h.v4(ALLOWED_V4, 6, &[], MF, &tcp_syn(1, 80)[..8]),
        Reason::Malformed,
    );
}

#[test]
fn ipv6_verdicts_extension_headers_and_fragments() {
    let mut h = Harness::new();
    let src = h.spec.guest_ipv6;
    let dst = allowed_v6();
    h.passes("udp to allowed", &h.v6(src, dst, 17, &udp(1, 53, b"x")));
    h.passes("icmpv6 echo to allowed", &h.v6(src, dst, 58, &icmp_echo(true)));
    let ll = eui64_link_local(h.spec.guest_mac);
    h.passes("from the link-local address", &h.v6(ll, dst, 6, &tcp_syn(1, 80)));

    let ev = h.drops(
        "nested deny",
        &h.v6(src, "2001:db8:100:10::1".parse().unwrap(), 6, &tcp_syn(2, 443)),
        Reason::PolicyDeny,
    );
    assert_eq!(h.policy.describe_rule(ev.rule_id), "deny 2001:db8:100:10::/64");
    assert_eq!((ev.ip_version, ev.protocol, ev.dst_port), (6, 6, 443));
    assert_eq!(ev.dst_addr, "2001:db8:100:10::1".parse::<Ipv6Addr>().unwrap().octets());
    h.drops("unlisted", &h.v6(src, "2001:db8:300::1".parse().unwrap(), 17, &udp(1, 9, b"")), Reason::DefaultDeny);
    h.passes("port rule", &h.v6(src, "2001:db8:200::7".parse().unwrap(), 6, &tcp_syn(1, 443)));
    h.drops("port rule, other port", &h.v6(src, "2001:db8:200::7".parse().unwrap(), 6, &tcp_syn(1, 22)), Reason::DefaultDeny);
    h.drops("ipv4-mapped", &h.v6(src, "::ffff:127.0.0.1".parse().unwrap(), 6, &tcp_syn(1, 80)), Reason::PolicyDeny);

    // hop-by-hop → destination options → UDP: ports still found.
    let mut chain = ipv6_ext(60);
    chain.extend(ipv6_ext(17));
    chain.extend(udp(1, 53, b"x"));
    h.passes("extension headers, allowed", &h.v6(src, dst, 0, &chain));
    let mut chain = ipv6_ext(6);
    chain.extend(tcp_syn(1, 80));
    h.drops("extension header, port-rule miss", &h.v6(src, "2001:db8:200::7".parse().unwrap(), 60, &chain), Reason::DefaultDeny);
    let mut routing = ipv6_ext(17);
    routing.extend(udp(1, 53, b"x"));
    h.drops("routing header", &h.v6(src, dst, 43, &routing), Reason::SourceRouted);
    let mut deep = Vec::new();
    for _ in 0..7 {
        deep.extend(ipv6_ext(60));
    }
    h.drops("too many extension headers", &h.v6(src, dst, 60, &deep), Reason::SourceRouted);

    let mut first = ipv6_fragment(17, 0, true);
    first.extend(udp(1, 53, &[0; 32]));
    h.passes("first fragment", &h.v6(src, dst, 44, &first));
    let mut later = ipv6_fragment(17, 4, false);
    later.extend([0; 32]);
    h.passes("later fragment, allowed", &h.v6(src, dst, 44, &later));
    h.drops("later fragment, unlisted", &h.v6(src, "2001:db8:300::1".parse().unwrap(), 44, &later), Reason::DefaultDeny);
}

#[test]
fn layer2_and_truncation() {
    let mut h = Harness::new();
    let inner = ipv4(h.spec.guest_ipv4, ALLOWED_V4, 17, &[], 0, &udp(1, 7, b"x"));
    h.drops("802.1Q tag", &vlan_tagged(h.gw_mac(), h.mac(), 5, &inner), Reason::VlanTagged);
    h.drops("802.1ad tag", &ethernet(h.gw_mac(), h.mac(), 0x88a8, &[0; 40]), Reason::VlanTagged);
    h.drops("LLDP", &ethernet(h.gw_mac(), h.mac(), 0x88cc, &[0; 40]), Reason::UnknownEthertype);
    // The kernel's BPF_PROG_TEST_RUN refuses IP frames shorter than the IP
    // header, so truncation is exercised past it (and on ARP above).
    let full = h.v4(ALLOWED_V4, 17, &[], 0, &udp(1, 7, b"x"));
    h.drops("UDP header cut short", &full[..14 + 20 + 4], Reason::Malformed);
    let mut ihl_too_long = full[..14 + 20].to_vec();
    ihl_too_long[14] = 0x4f; // claims 40 bytes of options that are not there
    h.drops("IHL past the end", &ihl_too_long, Reason::Malformed);
    let mut ihl_too_short = full.clone();
    ihl_too_short[14] = 0x44;
    h.drops("IHL below 5", &ihl_too_short, Reason::Malformed);
    let v6 = h.v6(h.spec.guest_ipv6, allowed_v6(), 6, &tcp_syn(1, 80));
    h.drops("TCP header cut short", &v6[..14 + 40 + 10], Reason::Malformed);
    let hop_by_hop_missing = h.v6(h.spec.guest_ipv6, allowed_v6(), 0, &[]);
    h.drops("extension header missing", &hop_by_hop_missing, Reason::Malformed);
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    h.drops("IPv4 ethertype, version 6", &bad_version, Reason::Malformed);
}

#[test]
fn anti_spoofing() {
    let mut h = Harness::new();
    let frame = h.v4(ALLOWED_V4, 17, &[], 0, &udp(1, 7, b"x"));
    let mut other_mac = frame.clone();
    other_mac[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    h.drops("foreign source MAC", &other_mac, Reason::SpoofedMac);
    let spoofed = ethernet(h.gw_mac(), h.mac(), ETH_P_IP, &ipv4(Ipv4Addr::new(10, 200, 0, 10), ALLOWED_V4, 17, &[], 0, &udp(1, 7, b"x")));
    h.drops("another sandbox's IPv4", &spoofed, Reason::SpoofedIp);
    let spoofed6 = h.v6("fd73:6278:0:2::2".parse().unwrap(), allowed_v6(), 17, &udp(1, 7, b"x"));
    h.drops("another sandbox's IPv6", &spoofed6, Reason::SpoofedIp);
    h.drops("unspecified source, UDP", &h.v6(Ipv6Addr::UNSPECIFIED, allowed_v6(), 17, &udp(1, 7, b"x")), Reason::SpoofedIp);

    // ARP: only guest ↔ gateway, only with the guest's own addresses.
    let bcast = [0xff; 6];
    let guest_mac = h.mac();
    let arp = |mac, sip, tip| ethernet(bcast, guest_mac, ETH_P_ARP, &arp_request(mac, sip, tip));
    h.passes("ARP for the gateway", &arp(h.mac(), h.spec.guest_ipv4, h.spec.gateway_ipv4));
    h.drops("ARP for another host", &arp(h.mac(), h.spec.guest_ipv4, Ipv4Addr::new(10, 200, 0, 10)), Reason::BadNeighbourDiscovery);
    h.drops("ARP claiming another IP", &arp(h.mac(), Ipv4Addr::new(10, 200, 0, 10), h.spec.gateway_ipv4), Reason::BadNeighbourDiscovery);
    h.drops("ARP claiming another MAC", &arp([2, 0, 0, 0, 0, 9], h.spec.guest_ipv4, h.spec.gateway_ipv4), Reason::BadNeighbourDiscovery);
    h.drops("ARP truncated", &ethernet(bcast, h.mac(), ETH_P_ARP, &[0, 1, 8, 0]), Reason::Malformed);

    // Neighbour discovery.
    let ll = eui64_link_local(h.spec.guest_mac);
    let gw = h.spec.gateway_ipv6;
    let nd = |src, dst, msg: Vec<u8>| ethernet(multicast_mac(dst), guest_mac, ETH_P_IPV6, &ipv6(src, dst, 58, &msg));
    h.passes("NS for the gateway", &nd(ll, solicited_node(gw), neighbour_discovery(135, gw, Some(h.mac()))));
    h.passes("NS for the gateway's link-local", &nd(ll, solicited_node(gw), neighbour_discovery(135, eui64_link_local(h.gw_mac()), None)));
    h.passes("DAD for its own address", &nd(Ipv6Addr::UNSPECIFIED, solicited_node(h.spec.guest_ipv6), neighbour_discovery(135, h.spec.guest_ipv6, None)));
    h.passes("NA for its own address", &nd(ll, gw, neighbour_discovery(136, h.spec.guest_ipv6, Some(h.mac()))));
    let other: Ipv6Addr = "fd73:6278:0:2::2".parse().unwrap();
    h.drops("NS for another host", &nd(ll, solicited_node(other), neighbour_discovery(135, other, None)), Reason::BadNeighbourDiscovery);
    h.drops("NA for another address", &nd(ll, gw, neighbour_discovery(136, other, Some(h.mac()))), Reason::BadNeighbourDiscovery);
    h.drops("NS with another MAC", &nd(ll, solicited_node(gw), neighbour_discovery(135, gw, Some([2, 0, 0, 0, 0, 9]))), Reason::BadNeighbourDiscovery);
    h.drops("DAD for another address", &nd(Ipv6Addr::UNSPECIFIED, solicited_node(other), neighbour_discovery(135, other, None)), Reason::BadNeighbourDiscovery);
    h.drops("router advertisement", &nd(ll, "ff02::1".parse().unwrap(), router_advertisement()), Reason::BadNeighbourDiscovery);
}

#[test]
fn unknown_sandbox_and_counters() {
    let mut h = Harness::new();
    let frame = h.v4(ALLOWED_V4, 17, &[], 0, &udp(1, 7, b"x"));
    h.passes("configured", &frame);
    let before = h.datapath.counters().unwrap();
    h.datapath.remove_sandbox(LO_IFINDEX, h.spec.id, &h.policy.clone()).unwrap();
    let ev = h.drops("after removal", &frame, Reason::UnknownSandbox);
    assert_eq!(ev.sandbox_id, 0);
    let after = h.datapath.counters().unwrap();
    assert_eq!(after[Reason::UnknownSandbox as usize].packets, before[Reason::UnknownSandbox as usize].packets + 1);
    assert_eq!(after[Reason::UnknownSandbox as usize].bytes, before[Reason::UnknownSandbox as usize].bytes + frame.len() as u64);
    assert!(before[Reason::Allowed as usize].packets >= 1);
}

/// The kernel's verdicts agree with the userspace model of the compiled
/// trie for thousands of random destinations and ports.
#[test]
fn kernel_agrees_with_compiled_policy() {
    let mut h = Harness::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let bases: [u32; 4] = [0xc633_6400, 0xcb00_7100, 0xa9fe_a900, 0x0ac8_0000]; // 198.51.100/24, 203.0.113/24, 169.254.169/24, 10.200/24
    for _ in 0..2000 {
        let dst = Ipv4Addr::from(bases[(rand() % 4) as usize] | (rand() as u32 & 0xff));
        let port = [80u16, 443, 22][(rand() % 3) as usize];
        let frame = h.v4(dst, 6, &[], 0, &tcp_syn(1000, port));
        let want = h.policy.lookup(IpAddr::V4(dst), PortInfo::Port(port));
        let (code, events) = h.run(&frame);
        if want.action == action::ALLOW {
            assert_eq!(code, TC_ACT_OK, "{dst}:{port}");
        } else {
            assert_eq!(code, TC_ACT_SHOT, "{dst}:{port}");
            assert_eq!(events[0].rule_id, want.rule_id, "{dst}:{port}");
        }
    }
}

/// On a redirected port the classifier passes only what conntrack will
/// track and nftables redirect: a connection start or a segment of a
/// connection. Every other flag combination (FIN alone, SYN+FIN, SYN+ACK,
/// none…) is dropped whatever the destination, over IPv4 and IPv6, with and
/// without headers of variable length before the TCP header.
#[test]
fn redirected_ports_pass_only_trackable_tcp_flags() {
    use sbx_net_common::{sandbox_flags, tcp_flag::*};
    let mut h = Harness::new();
    let cfg = h.spec.datapath_config(&h.policy, h.spec.id, sandbox_flags::REDIRECTS, &[80, 443]);
    h.datapath.write_config(LO_IFINDEX, &cfg).unwrap();
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    let v6_dst: Ipv6Addr = "2001:db8:999::1".parse().unwrap();
    let nop_option = [1u8, 1, 1, 0]; // NOP NOP NOP EOL: ihl 6, read with bpf_skb_load_bytes
    let passing = [SYN, SYN | PSH, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, ACK | URG];
    let invalid = [0, FIN, SYN | FIN, SYN | ACK, SYN | RST, FIN | RST, PSH, FIN | PSH | URG, SYN | FIN | RST | ACK | PSH | URG];
    for port in [80u16, 443, 53] {
        for dst in [UNLISTED_V4, metadata, NESTED_DENY_V4] {
            for options in [&[][..], &nop_option[..]] {
                for flags in passing {
                    h.passes(&format!("{flags:#04x} to {dst}:{port} options {options:?}"), &h.v4(dst, 6, options, 0, &tcp_segment(4000, port, flags, b"x")));
                }
                for flags in invalid {
                    h.drops(&format!("{flags:#04x} to {dst}:{port} options {options:?}"), &h.v4(dst, 6, options, 0, &tcp_segment(4000, port, flags, b"payload")), Reason::InvalidTcpFlags);
                }
            }
        }
        for flags in invalid {
            let plain = h.v6(h.spec.guest_ipv6, v6_dst, 6, &tcp_segment(4000, port, flags, b"p"));
            h.drops(&format!("v6 {flags:#04x} :{port}"), &plain, Reason::InvalidTcpFlags);
            let mut chained = ipv6_ext(6);
            chained.extend(tcp_segment(4000, port, flags, b"p"));
            h.drops(&format!("v6 dstopts {flags:#04x} :{port}"), &h.v6(h.spec.guest_ipv6, v6_dst, 60, &chained), Reason::InvalidTcpFlags);
        }
        h.passes(&format!("v6 SYN :{port}"), &h.v6(h.spec.guest_ipv6, v6_dst, 6, &tcp_segment(4000, port, SYN, b"")));
    }
    // Not a redirected port: the policy decides, flags or not.
    h.drops("FIN to an unlisted address on 22", &h.v4(UNLISTED_V4, 6, &[], 0, &tcp_segment(4000, 22, FIN, b"")), Reason::DefaultDeny);
    h.passes("FIN to an allowed address on 22", &h.v4(ALLOWED_V4, 6, &[], 0, &tcp_segment(4000, 22, FIN, b"")));
    // UDP to 53 carries no flags: redirected as before.
    h.passes("udp 53", &h.v4(UNLISTED_V4, 17, &[], 0, &udp(4000, 53, b"q")));
}

/// With flow tracking (as the daemon runs sandboxes): one event per new
/// flow whatever its verdict, none for the flow's later packets, a denied
/// flow re-reported at most once a second with the packets since, a
/// verdict change reported, and per-sandbox counters by verdict class.
#[test]
fn flow_table_reports_new_flows_once() {
    use sbx_net_common::{event_kind, sandbox_flags};
    let mut h = Harness::new();
    let tracked = h.spec.datapath_config(&h.policy, h.spec.id, sandbox_flags::FLOWS | sandbox_flags::REDIRECTS, &[443]);
    h.datapath.write_config(LO_IFINDEX, &tracked).unwrap();
    h.datapath.reset_sandbox_counters(h.spec.id).unwrap();

    let allowed = h.v4(ALLOWED_V4, 17, &[], 0, &udp(4000, 9, b"x"));
    let (code, events) = h.run(&allowed);
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(events.len(), 1, "a new allowed flow is reported: {events:?}");
    assert_eq!((events[0].kind, events[0].action, events[0].packets), (event_kind::NEW_FLOW, action::ALLOW, 1));
    for _ in 0..5 {
        let (code, events) = h.run(&allowed);
        assert_eq!(code, TC_ACT_OK);
        assert!(events.is_empty(), "the same flow again: no event");
    }
    // Another source port is another flow; IPv6 has its own table.
    assert_eq!(h.run(&h.v4(ALLOWED_V4, 17, &[], 0, &udp(4001, 9, b"x"))).1.len(), 1);
    let v6 = h.v6(h.spec.guest_ipv6, allowed_v6(), 17, &udp(4000, 9, b"x"));
    assert_eq!(h.run(&v6).1.len(), 1);
    assert!(h.run(&v6).1.is_empty());

    let denied = h.v4(UNLISTED_V4, 6, &[], 0, &tcp_syn(5000, 22));
    let (code, events) = h.run(&denied);
    assert_eq!(code, TC_ACT_SHOT);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].kind, Reason::from_u8(events[0].reason), events[0].rule_id), (event_kind::NEW_FLOW, Some(Reason::DefaultDeny), rule_id::DEFAULT));
    for _ in 0..9 {
        assert!(h.run(&denied).1.is_empty(), "retries within a second are counted, not reported");
    }
    // The rate limit under test is a second of the kernel's monotonic clock,
    // the one Instant and sleep use: letting it pass is the test, so this is
    // a sleep (BPF_PROG_TEST_RUN is synchronous; there is nothing to wait on).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (_, events) = h.run(&denied);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].kind, events[0].packets), (event_kind::DROP_REPEAT, 10), "the packets since the last report");
    assert_eq!(events[0].bytes, 10 * denied.len() as u64, "and their bytes");

    // Redirected (the proxied port) is a flow too.
    let redirected = h.v4(UNLISTED_V4, 6, &[], 0, &tcp_syn(5001, 443));
    let (code, events) = h.run(&redirected);
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(Reason::from_u8(events[0].reason), Some(Reason::Redirected));

    // A policy change that denies the allowed flow: reported as a change.
    let mut closed = tracked;
    closed.default_verdict = sbx_net_common::Verdict::new(action::DENY, rule_id::DEFAULT);
    let deny_all = compile(&Policy::parse("deny.toml", "name = \"d\"\n[network]\ndefault = \"deny\"\n").unwrap(), &[]).unwrap();
    h.datapath.switch_policy(LO_IFINDEX, &sbx_net_common::SandboxConfig { policy_id: 99, ..closed }, &deny_all, h.spec.id, &h.policy.clone(), &Default::default()).unwrap();
    let (code, events) = h.run(&allowed);
    assert_eq!(code, TC_ACT_SHOT);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].kind, events[0].action), (event_kind::VERDICT_CHANGED, action::DENY));

    let c = h.datapath.sandbox_counters(h.spec.id).unwrap();
    assert_eq!(c[0].packets, 1 + 5 + 1 + 2, "allowed");
    assert_eq!(c[1].packets, 1 + 9 + 1 + 1, "denied");
    assert_eq!(c[2].packets, 1, "redirected");
    assert_eq!(h.datapath.flow_count().unwrap(), 5);
}

/// A deleted sandbox's flows are purged before its id is reused: the next
/// sandbox with that id sees its first packets reported as new flows.
#[test]
fn purged_flows_are_new_again() {
    use sbx_net_common::{event_kind, sandbox_flags};
    require_root();
    let ns = NetNs::create(&unique_name("trp")).expect("netns");
    ns.enter_current_thread().expect("enter netns");
    let pins = std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("trp"));
    let mut datapath = Datapath::load(&DatapathOptions { pin_dir: Some(pins.clone()), ..Default::default() }).expect("load eBPF");
    let mut events = datapath.take_events().unwrap();
    let spec = SandboxSpec::new(7, "trp", &AddressPools::default()).unwrap();
    let policy = compile_for_sandbox(&Policy::parse("test-run.toml", POLICY).unwrap(), &spec, &[], &AddressPools::default()).unwrap();
    datapath.install_sandbox(LO_IFINDEX, &spec.datapath_config(&policy, spec.id, sandbox_flags::FLOWS, &[]), &policy).unwrap();
    let frames: Vec<Vec<u8>> = [ALLOWED_V4, UNLISTED_V4]
        .iter()
        .map(|d| ethernet(spec.gateway_mac, spec.guest_mac, ETH_P_IP, &ipv4(spec.guest_ipv4, *d, 17, &[], 0, &udp(4000, 9, b"x"))))
        .collect();
    let mut run = |frame: &[u8]| {
        datapath.test_run(program_names::EGRESS, frame, LO_IFINDEX, 1).unwrap();
        events.drain()
    };
    for f in &frames {
        assert_eq!(run(f)[0].kind, event_kind::NEW_FLOW);
        assert!(run(f).is_empty());
    }
    let mut flows = sbx_net::datapath::PinnedFlows::open(&pins).unwrap();
    assert_eq!(flows.purge(&[8].into()), 0, "another sandbox's id purges nothing");
    assert_eq!(flows.purge(&[7].into()), 2);
    for f in &frames {
        assert_eq!(run(f)[0].kind, event_kind::NEW_FLOW, "new again after the purge");
    }
    drop(flows);
    datapath.unpin_maps().unwrap();
    let _ = std::fs::remove_dir(&pins);
}

/// Audit mode: a packet an audit-mode deny (or the audit-mode default)
/// would drop passes, is counted under its own reason and reported as the
/// deny with verdict audit; a flow keeps being reported as audited (at
/// most once a second, like a denied one) and counts in its own class.
/// The built-in denies still drop.
#[test]
fn audit_verdicts_pass_and_are_reported_as_the_deny() {
    use sbx_net_common::{event_kind, sandbox_flags};
    let mut h = Harness::with_policy(&format!("mode = \"audit\"\n{POLICY}"));
    let before = h.datapath.counters().unwrap();
    let audited = |h: &mut Harness, what: &str, frame: &[u8]| -> FlowEvent {
        let (code, events) = h.run(frame);
        assert_eq!(code, TC_ACT_OK, "{what}: an audited packet passes");
        assert_eq!(events.len(), 1, "{what}: reported like the drop it would be: {events:?}");
        assert_eq!((Reason::from_u8(events[0].reason), events[0].action), (Some(Reason::Audit), action::AUDIT), "{what}");
        events[0]
    };
    let frame = h.v4(NESTED_DENY_V4, 6, &[], 0, &tcp_syn(40000, 80));
    let ev = audited(&mut h, "nested deny", &frame);
    assert_eq!(h.policy.describe_rule(ev.rule_id), "deny 198.51.100.16/28");
    let frame = h.v4(UNLISTED_V4, 17, &[], 0, &udp(1, 9, b""));
    let ev = audited(&mut h, "unlisted", &frame);
    assert_eq!(h.policy.describe_rule(ev.rule_id), "default deny");
    h.passes("allowed", &h.v4(ALLOWED_V4, 6, &[], 0, &tcp_syn(40000, 80)));
    let ev = h.drops("metadata", &h.v4(Ipv4Addr::new(169, 254, 169, 254), 6, &[], 0, &tcp_syn(1, 80)), Reason::PolicyDeny);
    assert_eq!(h.policy.describe_rule(ev.rule_id), "builtin deny 169.254.0.0/16 (link-local, cloud metadata)");
    h.drops("the gateway", &h.v4(h.spec.gateway_ipv4, 6, &[], 0, &tcp_syn(1, 22)), Reason::PolicyDeny);
    let after = h.datapath.counters().unwrap();
    assert_eq!(after[Reason::Audit as usize].packets, before[Reason::Audit as usize].packets + 2, "audit has its own counter");
    assert_eq!(after[Reason::PolicyDeny as usize].packets, before[Reason::PolicyDeny as usize].packets + 2);

    let tracked = h.spec.datapath_config(&h.policy, h.spec.id, sandbox_flags::FLOWS, &[]);
    assert_eq!(tracked.default_verdict.action, action::AUDIT, "a trie miss is audited too");
    h.datapath.write_config(LO_IFINDEX, &tracked).unwrap();
    h.datapath.reset_sandbox_counters(h.spec.id).unwrap();
    let flow = h.v4(UNLISTED_V4, 6, &[], 0, &tcp_syn(5000, 443));
    let ev = audited(&mut h, "new audited flow", &flow);
    assert_eq!((ev.kind, ev.rule_id), (event_kind::NEW_FLOW, rule_id::DEFAULT));
    for _ in 0..4 {
        let (code, events) = h.run(&flow);
        assert_eq!(code, TC_ACT_OK);
        assert!(events.is_empty(), "within a second an audited flow is counted, not reported: {events:?}");
    }
    // The one-second report interval of the kernel's clock is what is
    // tested: nothing to wait on but the clock (BPF_PROG_TEST_RUN is synchronous).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let ev = audited(&mut h, "audited flow, a second later", &flow);
    assert_eq!((ev.kind, ev.packets), (event_kind::DROP_REPEAT, 5), "still audit, never silently allowed");
    let c = h.datapath.sandbox_counters(h.spec.id).unwrap();
    assert_eq!((c[0].packets, c[1].packets, c[3].packets), (0, 0, 6), "the audit class counts them");
}

/// A tap whose ifindex is past the slot array has its config in the hash
/// map: the classifier reads it there and judges its frames the same way
/// (pass, policy deny, anti-spoof, flow events).
#[test]
fn configs_of_large_ifindexes_come_from_the_hash_map() {
    let mut h = Harness::new();
    const LARGE: u32 = 70_000;
    const { assert!(LARGE >= sbx_net_common::SANDBOX_SLOTS) };
    let out = std::process::Command::new("ip")
        .args(["link", "add", "sbxbig", "index", &LARGE.to_string(), "type", "veth", "peer", "name", "sbxbig1"])
        .output()
        .expect("run ip");
    assert!(out.status.success(), "ip link add: {}", String::from_utf8_lossy(&out.stderr));
    let flows = h.spec.datapath_config(&h.policy, h.spec.id, sbx_net_common::sandbox_flags::FLOWS, &[]);
    h.datapath.install_sandbox(LARGE, &flows, &h.policy.clone()).expect("install on the large ifindex");
    let run = |h: &mut Harness, frame: &[u8]| -> (i32, Vec<FlowEvent>) {
        let (code, _) = h.datapath.test_run(program_names::EGRESS, frame, LARGE, 1).expect("test run");
        (code, h.events.drain())
    };
    let allowed = h.v4(ALLOWED_V4, 17, &[], 0, &udp(1, 7, b"x"));
    let (code, events) = run(&mut h, &allowed);
    assert_eq!(code, TC_ACT_OK, "allowed frame on the large ifindex");
    assert_eq!(events.len(), 1, "a new-flow event");
    assert_eq!((events[0].sandbox_id, events[0].ifindex), (7, LARGE));
    assert_eq!(&events[0].dst_addr[..4], &ALLOWED_V4.octets());
    let (code, events) = run(&mut h, &allowed);
    assert_eq!((code, events.len()), (TC_ACT_OK, 0), "an established flow passes silently");
    let denied = h.v4(NESTED_DENY_V4, 17, &[], 0, &udp(1, 7, b"x"));
    let (code, events) = run(&mut h, &denied);
    assert_eq!(code, TC_ACT_SHOT, "policy deny on the large ifindex");
    assert_eq!(Reason::from_u8(events[0].reason), Some(Reason::PolicyDeny));
    let v6 = h.v6(h.spec.guest_ipv6, allowed_v6(), 17, &udp(1, 7, b"x"));
    let (code, events) = run(&mut h, &v6);
    assert_eq!(code, TC_ACT_OK, "allowed IPv6 frame on the large ifindex");
    assert_eq!(events[0].dst_addr, allowed_v6().octets(), "the event carries the whole IPv6 address");
    let spoofed = ethernet(h.gw_mac(), h.mac(), ETH_P_IP, &ipv4(Ipv4Addr::new(10, 9, 9, 9), ALLOWED_V4, 17, &[], 0, &udp(1, 7, b"x")));
    let (code, events) = run(&mut h, &spoofed);
    assert_eq!(code, TC_ACT_SHOT, "spoofed source on the large ifindex");
    assert_eq!(Reason::from_u8(events[0].reason), Some(Reason::SpoofedIp));
    // The loopback sandbox is untouched by the other one.
    h.passes("loopback sandbox", &allowed);
}
