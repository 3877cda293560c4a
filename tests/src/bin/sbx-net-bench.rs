//! `cargo xtask bench datapath`: the classifier's cost per packet
//! (BPF_PROG_TEST_RUN) against two references measured in the same run —
//! an empty TC program (harness overhead) and a program doing one LPM lookup
//! on the same frame (the floor for any LPM-based verdict) — for 10 to 1M
//! rules; and small-UDP packets/s from a netns guest through the tap with and
//! without the program attached. Prints a Markdown report.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;
use sbx_net::compile::compile_rules;
use sbx_net::datapath::{Datapath, DatapathOptions};
use sbx_net::policy::{builtin_deny_rules, Action, Origin, Policy, Rule, Target};
use sbx_net::sandbox::{open_host_tap, AddressPools, SandboxSpec};
use sbx_net_common::program_names;
use sbx_net_tests::frames::*;
use sbx_net_tests::{unique_name, Topology};
use sbx_vmm::{NetNs, NetnsGuest};

const RULE_COUNTS: [usize; 4] = [10, 10_000, 100_000, 1_000_000];
const REPEAT: u32 = 200_000;
const SAMPLES: usize = 7;
/// Runs of each configuration in the packets/s benchmark.
const RUNS: usize = 6;

fn main() -> Result<()> {
    let suite = std::env::args().nth(1).unwrap_or_else(|| "datapath".into());
    if suite != "datapath" {
        bail!("unknown benchmark suite {suite:?} (available: datapath)");
    }
    println!("## Datapath (`cargo xtask bench datapath`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    per_packet_cost()?;
    tap_throughput()?;
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median ns per run of `program` on `frame` over SAMPLES batches of REPEAT.
fn ns_per_packet(dp: &Datapath, program: &'static str, frame: &[u8]) -> Result<f64> {
    let mut samples = Vec::new();
    for _ in 0..SAMPLES {
        let (_, d) = dp.test_run(program, frame, 1, REPEAT)?;
        samples.push(d.as_nanos() as f64);
    }
    Ok(median(samples))
}

fn rules_v4(n: usize) -> Vec<Rule> {
    // n distinct /24s from 11.0.0.0 (outside every built-in range), half
    // allow, half deny.
    (0..n)
        .map(|i| {
            let net = ipnetwork::Ipv4Network::new(Ipv4Addr::from(0x0b00_0000u32 + ((i as u32) << 8)), 24).unwrap();
            bench_rule(IpNetwork::V4(net), i)
        })
        .collect()
}

fn rules_v6(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let addr = Ipv6Addr::from((0x2a00u128 << 112) | ((i as u128) << 80));
            bench_rule(IpNetwork::V6(ipnetwork::Ipv6Network::new(addr, 48).unwrap()), i)
        })
        .collect()
}

fn bench_rule(net: IpNetwork, i: usize) -> Rule {
    Rule {
        action: if i.is_multiple_of(2) { Action::Allow } else { Action::Deny },
        target: Target::Cidr(net),
        port: None,
        origin: Origin::Policy,
        text: net.to_string(),
        line: 0,
    }
}

fn per_packet_cost() -> Result<()> {
    let ns = NetNs::create(&unique_name("bench")).context("bench netns")?;
    ns.enter_current_thread()?;
    let spec = SandboxSpec::new(1, "bench", &AddressPools::default())?;
    let guest_mac = spec.guest_mac;
    println!("### Cost per packet (BPF_PROG_TEST_RUN, median of {SAMPLES} × {REPEAT} runs, ns)\n");
    println!("Hit: destination inside an allow rule. Miss: no rule covers it (policy default `allow`, so both pass and neither emits an event).\n");
    println!("| family | rules | case | empty program | one LPM lookup (floor) | sbx_egress | sbx_egress / floor |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    for v6 in [false, true] {
        for &n in &RULE_COUNTS {
            let mut rules = if v6 { rules_v6(n) } else { rules_v4(n) };
            rules.extend(builtin_deny_rules());
            let compiled = compile_rules("bench", Action::Allow, rules)?;
            let mut dp = Datapath::load(&DatapathOptions::default())?;
            let started = Instant::now();
            dp.install_sandbox(1, &spec.datapath_config(&compiled, spec.id, 0, &[]), &compiled)?;
            let install = started.elapsed();
            let hit_index = (n / 2) & !1; // an allow rule
            let cases: [(&str, IpAddr); 2] = if v6 {
                [
                    ("hit", Ipv6Addr::from((0x2a00u128 << 112) | ((hit_index as u128) << 80) | 5).into()),
                    ("miss", "2a01::5".parse::<Ipv6Addr>()?.into()),
                ]
            } else {
                [
                    ("hit", Ipv4Addr::from(0x0b00_0000u32 + ((hit_index as u32) << 8) + 5).into()),
                    ("miss", Ipv4Addr::new(203, 0, 113, 5).into()),
                ]
            };
            for (case, dst) in cases {
                let frame = match dst {
                    IpAddr::V4(d) => ethernet(spec.gateway_mac, guest_mac, ETH_P_IP, &ipv4(spec.guest_ipv4, d, 17, &[], 0, &udp(4000, 443, &[0; 18]))),
                    IpAddr::V6(d) => ethernet(spec.gateway_mac, guest_mac, ETH_P_IPV6, &ipv6(spec.guest_ipv6, d, 17, &udp(4000, 443, &[0; 18]))),
                };
                let (code, _) = dp.test_run(program_names::EGRESS, &frame, 1, 1)?;
                if code != 0 {
                    bail!("{case} frame to {dst} was dropped; the benchmark must measure the pass path");
                }
                let empty = ns_per_packet(&dp, program_names::BENCH_EMPTY, &frame)?;
                let floor = ns_per_packet(&dp, program_names::BENCH_ONE_LOOKUP, &frame)?;
                let full = ns_per_packet(&dp, program_names::EGRESS, &frame)?;
                println!(
                    "| IPv{} | {n} | {case} | {empty:.0} | {floor:.0} | {full:.0} | {:.2}× |",
                    if v6 { 6 } else { 4 },
                    full / floor
                );
            }
            eprintln!("(installed {} entries in {:.2?})", compiled.entry_count(), install);
        }
    }
    println!();
    Ok(())
}

/// Packets that left the host by the uplink (read in the host namespace).
fn uplink_tx_packets(host: &NetNs) -> Result<u64> {
    let dev = host.run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))??;
    for line in dev.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("uplink:") {
            let fields: Vec<u64> = rest.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            return fields.get(9).copied().context("tx_packets field");
        }
    }
    bail!("no uplink in /proc/net/dev")
}

/// Sends small UDP datagrams from the guest for `duration` (bounded in
/// count too); returns packets forwarded out of the uplink per second.
fn measure_pps(guest: &NetNs, host: &NetNs, dst: SocketAddr, duration: Duration) -> Result<f64> {
    const MAX_PACKETS: u64 = 50_000_000;
    let before = uplink_tx_packets(host)?;
    let started = Instant::now();
    guest.run(|| -> Result<()> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(dst)?;
        let payload = [0u8; 18];
        let mut sent = 0u64;
        while started.elapsed() < duration && sent < MAX_PACKETS {
            // ENOBUFS when the tap queue is full: the pump is the bottleneck.
            let _ = sock.send(&payload);
            sent += 1;
        }
        Ok(())
    })??;
    // Let the pump drain what is queued.
    std::thread::sleep(Duration::from_millis(200));
    let elapsed = started.elapsed().as_secs_f64() - 0.2;
    Ok((uplink_tx_packets(host)? - before) as f64 / elapsed)
}

fn tap_throughput() -> Result<()> {
    let topology = Topology::new("benchpps");
    topology.enter_host();
    let sink = Ipv4Addr::new(198, 51, 100, 5);
    topology.add_world_address(sink.into());
    let dst = SocketAddr::new(sink.into(), 9);
    // A bound socket so the world does not answer with ICMP unreachables.
    let _sink = topology.world.run(move || UdpSocket::bind(dst))??;

    let mut dp = Datapath::load(&DatapathOptions::default())?;
    let spec = SandboxSpec::new(1, &unique_name("p"), &AddressPools::default())?;
    let policy = Policy::parse("bench.toml", "name = \"bench\"\n[network]\nallow = [\"198.51.100.0/24\"]\n")?;
    let compiled = sbx_net::compile(&policy, &spec.host_addresses())?;
    // The sandbox's host side without attaching: the benchmark attaches and
    // detaches the program itself.
    let (tap, ifindex) = open_host_tap(&topology.host_netlink, &spec)?;
    dp.install_sandbox(ifindex, &spec.datapath_config(&compiled, spec.id, 0, &[]), &compiled)?;
    let guest = NetnsGuest::start(&spec.netns, tap, &spec.guest_network())?;

    let duration = Duration::from_secs(2);
    // Warm up neighbour resolution.
    measure_pps(guest.netns(), &topology.host, dst, Duration::from_millis(300))?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    // Alternate, and alternate which goes first, so drift favours neither.
    for round in 0..RUNS {
        for attached in [round % 2 == 0, round % 2 == 1] {
            if attached {
                let link = dp.attach(program_names::EGRESS, &spec.tap)?;
                with.push(measure_pps(guest.netns(), &topology.host, dst, duration)?);
                dp.detach(program_names::EGRESS, link)?;
            } else {
                without.push(measure_pps(guest.netns(), &topology.host, dst, duration)?);
            }
        }
    }
    let (w, wo) = (median(with.clone()), median(without.clone()));
    println!("### Small UDP packets from a netns guest through the tap (packets/s out of the uplink, median of {RUNS} × {}s, alternating)\n", duration.as_secs());
    println!("| configuration | packets/s | runs |");
    println!("|---|---:|---|");
    println!("| no program on the tap | {wo:.0} | {} |", fmt_runs(&without));
    println!("| sbx_egress attached (TCX) | {w:.0} | {} |", fmt_runs(&with));
    println!("\nWith / without: **{:.1} %**.\n", 100.0 * w / wo);
    drop(guest);
    Ok(())
}

fn fmt_runs(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
}
