//! The frame fuzzer as a test: the real classifier (BPF_PROG_TEST_RUN)
//! against its userspace model (`sbx_net::fuzzing::model`), on (a) every file of
//! `fuzz/corpus/frames/` and `fuzz/regressions/frames/` and (b) frames from a
//! deterministic mutator over valid seed frames, bounded in count and time.
//! A disagreement is a bug in one of the two; the failure prints the frame.
//!
//! The seeds here are also the committed corpus (checked to be equal;
//! `SBX_NET_WRITE_FRAME_SEEDS=1 cargo test -p sbx-net-tests --test
//! frame_model committed_frame_seeds` rewrites `fuzz/corpus/frames/`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sbx_net::fuzzing::{frame_selector as sel, FrameHarness, FrameOutcome};
use sbx_net::sandbox::{eui64_link_local, AddressPools, SandboxSpec};
use sbx_net_tests::frames::*;
use sbx_net_tests::require_root;

/// Mutated frames per run, and the time they may take at most.
const MUTATED_FRAMES: usize = 20_000;
const MUTATION_BUDGET: Duration = Duration::from_secs(90);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The harness's sandbox (the same spec `FrameHarness` uses).
fn spec() -> SandboxSpec {
    SandboxSpec::new(7, "fuzz", &AddressPools::default()).unwrap()
}

/// Named seeds: a selector byte (see `frame_selector`), then a valid frame
/// for the harness's sandbox, one per path of the classifier.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let s = spec();
    let (mac, gw) = (s.guest_mac, s.gateway_mac);
    let v4 = |dst: Ipv4Addr, proto: u8, options: &[u8], frag: u16, l4: &[u8]| ethernet(gw, mac, ETH_P_IP, &ipv4(s.guest_ipv4, dst, proto, options, frag, l4));
    let v6 = |src: Ipv6Addr, dst: Ipv6Addr, next: u8, rest: &[u8]| ethernet(gw, mac, ETH_P_IPV6, &ipv6(src, dst, next, rest));
    let with = |selector: u8, frame: Vec<u8>| {
        let mut input = vec![selector];
        input.extend(frame);
        input
    };
    let allowed = Ipv4Addr::new(198, 51, 100, 5);
    let allowed6: Ipv6Addr = "2001:db8:100::5".parse().unwrap();
    let ll = eui64_link_local(mac);
    let mut chain = ipv6_ext(60);
    chain.extend(ipv6_ext(17));
    chain.extend(udp(1, 53, b"x"));
    let mut routing = ipv6_ext(17);
    routing.extend(udp(1, 53, b"x"));
    let mut deep = Vec::new();
    for _ in 0..7 {
        deep.extend(ipv6_ext(60));
    }
    let mut first6 = ipv6_fragment(6, 0, true);
    first6.extend(tcp_segment(1, 443, 0x02, &[0; 16]));
    let mut later6 = ipv6_fragment(17, 4, false);
    later6.extend([0; 32]);
    let nd = |src, dst, msg: Vec<u8>| ethernet(multicast_mac(dst), mac, ETH_P_IPV6, &ipv6(src, dst, 58, &msg));
    let gw6 = s.gateway_ipv6;
    let arp = |tip| ethernet([0xff; 6], mac, ETH_P_ARP, &arp_request(mac, s.guest_ipv4, tip));
    let mld = vec![143, 0, 0, 0, 0, 0, 0, 0];
    vec![
        ("v4-udp-dns-redirected", with(sel::REDIRECTS, v4(allowed, 17, &[], 0, &udp(5000, 53, b"query")))),
        ("v4-udp-allowed", with(0, v4(allowed, 17, &[], 0, &udp(5000, 53, b"x")))),
        ("v4-tcp-syn-proxied", with(sel::REDIRECTS, v4(Ipv4Addr::new(192, 0, 2, 80), 6, &[], 0, &tcp_segment(40000, 443, 0x02, &[])))),
        ("v4-tcp-synack-proxied", with(sel::REDIRECTS, v4(Ipv4Addr::new(192, 0, 2, 80), 6, &[], 0, &tcp_segment(40000, 443, 0x12, &[])))),
        ("v4-tcp-synfin-dns", with(sel::REDIRECTS, v4(allowed, 6, &[], 0, &tcp_segment(40000, 53, 0x03, &[])))),
        ("v4-tcp-ackpsh-8080", with(sel::REDIRECTS | sel::POLICY_B, v4(Ipv4Addr::new(192, 0, 2, 80), 6, &[], 0, &tcp_segment(40000, 8080, 0x18, b"GET /")))),
        ("v4-tcp-nested-deny", with(0, v4(Ipv4Addr::new(198, 51, 100, 20), 6, &[], 0, &tcp_syn(40000, 80)))),
        ("v4-tcp-port-deny", with(0, v4(Ipv4Addr::new(198, 51, 100, 9), 6, &[], 0, &tcp_syn(40000, 25)))),
        ("v4-tcp-default-deny", with(0, v4(Ipv4Addr::new(192, 0, 2, 99), 6, &[], 0, &tcp_syn(1, 22)))),
        ("v4-icmp-allowed", with(0, v4(allowed, 1, &[], 0, &icmp_echo(false)))),
        ("v4-options-record-route", with(0, v4(allowed, 17, &[1, 1, 7, 7, 4, 0, 0, 0, 0, 0, 0, 0], 0, &udp(1, 7, b"x")))),
        ("v4-options-lsrr", with(0, v4(allowed, 17, &[0x83, 7, 4, 198, 51, 100, 5, 0], 0, &udp(1, 7, b"x")))),
        ("v4-first-fragment", with(0, v4(allowed, 17, &[], 0x2000, &udp(1, 7, &[0; 32])))),
        ("v4-later-fragment-port-rule", with(0, v4(Ipv4Addr::new(203, 0, 113, 7), 6, &[], 4, &[0; 32]))),
        ("v4-metadata-policy-b", with(sel::POLICY_B, v4(Ipv4Addr::new(169, 254, 169, 254), 6, &[], 0, &tcp_syn(1, 8080)))),
        ("v4-private-allowed", with(0, v4(Ipv4Addr::new(10, 1, 2, 3), 17, &[], 0, &udp(1, 9, b"")))),
        ("v4-gre", with(0, v4(allowed, 47, &[], 0, &[0; 8]))),
        ("v4-no-sandbox", with(sel::NO_SANDBOX, v4(allowed, 17, &[], 0, &udp(1, 7, b"x")))),
        ("v6-udp-allowed", with(0, v6(s.guest_ipv6, allowed6, 17, &udp(1, 53, b"x")))),
        ("v6-tcp-link-local-source", with(sel::REDIRECTS, v6(ll, allowed6, 6, &tcp_segment(1, 80, 0x10, b"x")))),
        ("v6-nested-deny", with(0, v6(s.guest_ipv6, "2001:db8:100:10::1".parse().unwrap(), 6, &tcp_syn(2, 443)))),
        ("v6-ext-headers", with(0, v6(s.guest_ipv6, allowed6, 0, &chain))),
        ("v6-routing-header", with(0, v6(s.guest_ipv6, allowed6, 43, &routing))),
        ("v6-too-many-ext", with(0, v6(s.guest_ipv6, allowed6, 60, &deep))),
        ("v6-first-fragment-tcp", with(sel::REDIRECTS, v6(s.guest_ipv6, "2001:db8:200::7".parse().unwrap(), 44, &first6))),
        ("v6-later-fragment", with(0, v6(s.guest_ipv6, allowed6, 44, &later6))),
        ("v6-ipv4-mapped", with(sel::POLICY_B, v6(s.guest_ipv6, "::ffff:127.0.0.1".parse().unwrap(), 6, &tcp_syn(1, 80)))),
        ("v6-icmp-echo", with(0, v6(s.guest_ipv6, allowed6, 58, &icmp_echo(true)))),
        ("v6-ns-gateway", with(0, nd(ll, solicited_node(gw6), neighbour_discovery(135, gw6, Some(mac))))),
        ("v6-dad", with(0, nd(Ipv6Addr::UNSPECIFIED, solicited_node(s.guest_ipv6), neighbour_discovery(135, s.guest_ipv6, None)))),
        ("v6-na-own", with(0, nd(ll, gw6, neighbour_discovery(136, s.guest_ipv6, Some(mac))))),
        ("v6-router-advertisement", with(0, nd(ll, "ff02::1".parse().unwrap(), router_advertisement()))),
        ("v6-mld2-report", with(0, nd(ll, "ff02::16".parse().unwrap(), mld))),
        ("arp-gateway", with(0, arp(s.gateway_ipv4))),
        ("arp-other-host", with(0, arp(Ipv4Addr::new(10, 200, 0, 10)))),
        ("vlan-8021q", with(0, vlan_tagged(gw, mac, 5, &ipv4(s.guest_ipv4, allowed, 17, &[], 0, &udp(1, 7, b"x"))))),
        ("lldp", with(0, ethernet(gw, mac, 0x88cc, &[0; 40]))),
        ("spoofed-mac-raw", with(sel::RAW_SOURCE, ethernet(gw, [2, 0, 0, 0, 0, 0x99], ETH_P_IP, &ipv4(s.guest_ipv4, allowed, 17, &[], 0, &udp(1, 7, b"x"))))),
    ]
}

/// A deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// Byte values that steer parsers: lengths, protocol numbers, option kinds,
/// ICMPv6 types, flags.
const INTERESTING: [u8; 24] = [0, 1, 2, 4, 5, 6, 8, 0x0f, 0x10, 0x11, 0x12, 0x14, 17, 0x20, 0x3f, 43, 44, 58, 60, 0x7f, 0x80, 0x83, 0x89, 0xff];
const ETHERTYPES: [u16; 9] = [0x0800, 0x86dd, 0x0806, 0x8100, 0x88a8, 0x9100, 0x88cc, 0x0600, 0x05dc];
const PORTS: [u16; 10] = [53, 80, 443, 8080, 853, 22, 25, 0, 1, 65535];

/// One mutant of `seed` (selector byte + frame): one to four edits, most of
/// them in the headers.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut f = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let header_offset = |rng: &mut Rng, len: usize| 1 + rng.below(len.saturating_sub(1).min(96));
        match rng.below(11) {
            0 => {
                let at = header_offset(rng, f.len());
                f[at] ^= 1 << rng.below(8);
            }
            1 => {
                let at = header_offset(rng, f.len());
                f[at] = rng.pick(&INTERESTING);
            }
            2 => {
                let at = 1 + rng.below(f.len() - 1);
                f[at] = rng.next() as u8;
            }
            3 => {
                let keep = 15 + rng.below(f.len().saturating_sub(15));
                f.truncate(keep.max(15));
            }
            4 => {
                for _ in 0..1 + rng.below(64) {
                    f.push(rng.next() as u8);
                }
            }
            5 => {
                let at = header_offset(rng, f.len());
                f.insert(at, rng.pick(&INTERESTING));
            }
            6 if f.len() > 16 => {
                let at = header_offset(rng, f.len());
                f.remove(at);
            }
            7 if f.len() >= 15 => {
                let t = rng.pick(&ETHERTYPES).to_be_bytes();
                f[13..15].copy_from_slice(&t);
            }
            8 => {
                // The destination port of a simple IPv4 or IPv6 header.
                let l4 = match (f.get(13..15), f.get(15)) {
                    (Some([0x08, 0x00]), Some(b)) => 1 + 14 + usize::from(b & 0x0f) * 4,
                    (Some([0x86, 0xdd]), _) => 1 + 14 + 40,
                    _ => continue,
                };
                if f.len() >= l4 + 4 {
                    f[l4 + 2..l4 + 4].copy_from_slice(&rng.pick(&PORTS).to_be_bytes());
                }
            }
            9 => {
                // TCP flags of a simple IPv4 or IPv6 header.
                let at = match f.get(13..15) {
                    Some([0x08, 0x00]) => 1 + 14 + 20 + 13,
                    _ => 1 + 14 + 40 + 13,
                };
                if at < f.len() {
                    f[at] = rng.next() as u8;
                }
            }
            _ => {
                f[0] = rng.below(8) as u8;
                if rng.below(64) == 0 {
                    f[0] |= sel::NO_SANDBOX;
                }
            }
        }
    }
    f
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn kernel_agrees_with_model_on_frames() {
    require_root();
    let mut harness = FrameHarness::new().unwrap_or_else(|e| panic!("{e}"));
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused = 0;
    let mut refused_examples: Vec<String> = Vec::new();
    let mut disagreements = Vec::new();
    let mut run = |harness: &mut FrameHarness, name: &str, input: &[u8], disagreements: &mut Vec<String>| match harness.check(input) {
        Ok(FrameOutcome::Agreed(reason)) => *reasons.entry(reason.name().to_string()).or_default() += 1,
        Ok(FrameOutcome::Refused) => {
            refused += 1;
            if refused_examples.len() < 3 {
                refused_examples.push(hex(input));
            }
        }
        Err(d) => disagreements.push(format!("{name} (input {}): {d}", hex(input))),
    };

    // (a) The committed corpus and regressions.
    let mut corpus = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join("frames")) else { continue };
        for entry in dir {
            let path = entry.unwrap().path();
            run(&mut harness, &path.display().to_string(), &std::fs::read(&path).unwrap(), &mut disagreements);
            corpus += 1;
        }
    }
    assert!(corpus > 0, "fuzz/corpus/frames/ is empty");

    // (b) The seeds, then mutants of them.
    let seeds = seeds();
    for (name, input) in &seeds {
        run(&mut harness, name, input, &mut disagreements);
    }
    let mut rng = Rng(0x5eed_f4a3_e5c1_0001);
    let started = Instant::now();
    let mut mutated = 0;
    while mutated < MUTATED_FRAMES && started.elapsed() < MUTATION_BUDGET {
        let (name, seed) = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed);
        run(&mut harness, &format!("mutant {mutated} of {name}"), &input, &mut disagreements);
        mutated += 1;
    }
    eprintln!(
        "frames: {corpus} corpus files, {} seeds, {mutated} mutants in {:.1?}; refused by BPF_PROG_TEST_RUN: {refused} (e.g. {refused_examples:?}); agreed: {reasons:?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(mutated >= 1000, "only {mutated} mutants in {MUTATION_BUDGET:?}: the machine is too slow for this test to mean much");
    assert!(
        disagreements.is_empty(),
        "{} disagreements between the classifier and its model; the first ones:\n{}",
        disagreements.len(),
        disagreements.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The committed `fuzz/corpus/frames/` holds exactly [`seeds`]: a change to
/// the seeds without the corpus (or the other way) fails here. With
/// `SBX_NET_WRITE_FRAME_SEEDS=1` it rewrites the corpus from them instead.
#[test]
fn committed_frame_seeds_are_the_generated_ones() {
    let dir = fuzz_dir().join("corpus/frames");
    if std::env::var_os("SBX_NET_WRITE_FRAME_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, input) in seeds() {
            std::fs::write(dir.join(name), input).unwrap();
        }
        return;
    }
    for (name, input) in seeds() {
        let committed = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e} (SBX_NET_WRITE_FRAME_SEEDS=1 writes the corpus)"));
        assert_eq!(committed, input, "{name}: the committed seed differs from the generated one (SBX_NET_WRITE_FRAME_SEEDS=1 rewrites the corpus)");
    }
}
