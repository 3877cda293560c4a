//! `bench datapath`: cost per packet, flow table, tap packets/s, events.

use super::*;

pub(crate) fn datapath_bench() -> Result<()> {
    println!("## Datapath (`cargo xtask bench datapath`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    verifier_counts()?;
    per_packet_cost()?;
    step_costs()?;
    flow_table_cost()?;
    tap_throughput("datapath")?;
    event_rate()?;
    Ok(())
}

pub(crate) const RULE_COUNTS: [usize; 4] = [10, 10_000, 100_000, 1_000_000];
pub(crate) const REPEAT: u32 = 200_000;
pub(crate) const SAMPLES: usize = 7;
/// Runs of each configuration in the microVM's packets/s and bulk rounds.
pub(crate) const RUNS: usize = 6;
/// Rounds and seconds per configuration of the tap's packets/s from a
/// netns guest: the classifier is under 1 % of the bottleneck thread's
/// time there (perf, BENCHMARKS.md), while one round's share swings by
/// ±8 % on a 2-vCPU VM (the sender, the pump and the host's forwarding
/// share two cores); twelve rounds of 1 s, not six of 2 s, give the
/// median more rounds in the same time.
pub(crate) const TAP_ROUNDS: usize = 12;
pub(crate) const TAP_SECONDS: u64 = 1;

/// Instructions the verifier processed per program (the "processed N
/// insns" of its log; the kernel's limit is 1 M, the test budget 25 %).
pub(crate) fn verifier_counts() -> Result<()> {
    let dp = Datapath::load(&DatapathOptions::default())?;
    println!("### Verifier (instructions processed, limit 1 000 000)\n");
    println!("| program | processed | of the limit |");
    println!("|---|---:|---:|");
    for (name, count) in dp.verified_instruction_counts()? {
        match count {
            Some(n) => println!("| {name} | {n} | {:.1} % |", f64::from(n) / 10_000.0),
            None => println!("| {name} | (kernel does not report it) | |"),
        }
    }
    println!();
    Ok(())
}

/// Frames of distinct flows per first-packet run (the ring buffer holds
/// ~2300 events; it is drained after each run).
pub(crate) const FIRST_PACKET_FRAMES: usize = 800;
/// Alternating rounds of the first-packet runs.
pub(crate) const FIRST_PACKET_ROUNDS: usize = 5;

/// The cost of a flow's first packet: single runs (repeat 1) of the
/// classifier, one per frame (each a new flow); the median of the run.
pub(crate) fn first_packet_ns(dp: &Datapath, events: &mut sbx_net::datapath::EventReader, frames: &[Vec<u8>]) -> Result<f64> {
    let mut samples = Vec::with_capacity(frames.len());
    for frame in frames {
        let (_, d) = dp.test_run(program_names::EGRESS, frame, 1, 1)?;
        samples.push(d.as_nanos() as f64);
    }
    events.drain();
    Ok(median(samples))
}

/// The flow table and its events against the verdict alone: the same
/// program, sandbox config with and without `sandbox_flags::FLOWS`,
/// alternating run by run.
pub(crate) fn flow_table_cost() -> Result<()> {
    let ns = NetNs::create(&unique_name("benchflow")).context("bench netns")?;
    ns.enter_current_thread()?;
    let spec = SandboxSpec::new(1, "bench", &AddressPools::default())?;
    println!("### Flow table and events (BPF_PROG_TEST_RUN; verdict alone = the same program, sandbox without flow tracking; alternating)\n");
    println!("Established: the same frame {REPEAT} times per run ({SAMPLES} rounds), i.e. a flow already in the LRU table (lookup, two atomic adds, last-seen). First packets: {FIRST_PACKET_ROUNDS} rounds of {FIRST_PACKET_FRAMES} frames of distinct flows, one run each (a run's figure is the median of its frames; includes the single run's timer overhead on both sides): LRU insert and a ring-buffer event. Ratio: per round; median (min–max).\n");
    println!("| rules | case | verdict alone ns | with flow table + events ns | above ns | ratio |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut verdicts = Vec::new();
    for n in [10usize, 10_000] {
        let mut rules = rules_v4(n);
        rules.extend(builtin_deny_rules());
        let compiled = compile_rules("bench", Action::Deny, rules)?;
        let mut dp = Datapath::load(&DatapathOptions::default())?;
        let mut events = dp.take_events()?;
        let plain = spec.datapath_config(&compiled, spec.id, 0, &[]);
        let tracked = spec.datapath_config(&compiled, spec.id, sandbox_flags::FLOWS, &[]);
        let configs = [plain, tracked];
        dp.install_sandbox(1, &plain, &compiled)?;
        let frame_to = |dst: Ipv4Addr, sport: u16| {
            ethernet(spec.gateway_mac, spec.guest_mac, ETH_P_IP, &ipv4(spec.guest_ipv4, dst, 17, &[], 0, &udp(sport, 443, &[0; 18])))
        };
        let hit = (n / 2) & !1;
        let allowed = Ipv4Addr::from(0x0b00_0000u32 + ((hit as u32) << 8) + 5);
        let denied = Ipv4Addr::from(0x0b00_0000u32 + (((hit + 1) as u32) << 8) + 5);
        let row = |case: &str, key: &str, runs: Vec<Vec<f64>>| {
            let above: Vec<f64> = runs[1].iter().zip(&runs[0]).map(|(w, a)| w - a).collect();
            let ratio: Vec<f64> = runs[1].iter().zip(&runs[0]).map(|(w, a)| w / a).collect();
            let alone = record("datapath", &format!("flows {n} rules {key} alone"), "ns", Better::Lower, &runs[0]);
            let with = record("datapath", &format!("flows {n} rules {key} tracked"), "ns", Better::Lower, &runs[1]);
            let ratio = record("datapath", &format!("flows {n} rules {key} / alone"), "x", Better::Lower, &ratio);
            let above = Figure { suite: "datapath".into(), name: "above".into(), unit: "ns".into(), better: Better::Lower, runs: above };
            println!("| {n} | {case} | {} | {} | {} | {}× |", alone.spread(0), with.spread(0), above.spread(0), ratio.spread(2));
            ratio.median()
        };
        for (case, key, frame) in [
            ("allowed, established flow", "established", frame_to(allowed, 4000)),
            ("denied, repeated (with flows: an event a second; alone: one a packet)", "denied repeated", frame_to(denied, 4000)),
        ] {
            let runs = alternating(2, SAMPLES, |k| {
                dp.write_config(1, &configs[k])?;
                let (_, d) = dp.test_run(program_names::EGRESS, &frame, 1, REPEAT)?;
                events.drain();
                Ok(d.as_nanos() as f64)
            })?;
            let ratio = row(case, key, runs);
            if key == "established" {
                verdicts.push((format!("{n} rules, established flow: ≤ 1.5× the verdict alone"), ratio, 1.5));
            }
        }
        for (case, key, dst, base) in [
            ("allowed, first packet of a flow (new-flow event)", "allowed first packet", allowed, 10_000u16),
            ("denied, first packet of a flow (an event in both)", "denied first packet", denied, 20_000u16),
        ] {
            // Every run takes flows no earlier run has seen.
            let mut next = [0u16, 0u16];
            let runs = alternating(2, FIRST_PACKET_ROUNDS, |k| {
                let start = base + (k as u16) * 5000 + next[k];
                next[k] += FIRST_PACKET_FRAMES as u16;
                let frames: Vec<Vec<u8>> = (0..FIRST_PACKET_FRAMES as u16).map(|i| frame_to(dst, start + i)).collect();
                dp.write_config(1, &configs[k])?;
                first_packet_ns(&dp, &mut events, &frames)
            })?;
            let ratio = row(case, key, runs);
            if key == "allowed first packet" {
                verdicts.push((format!("{n} rules, first packet of a flow: ≤ 2× an untracked one"), ratio, 2.0));
            }
        }
    }
    println!();
    for (target, ratio, limit) in verdicts {
        check_target("datapath", &target, format!("{ratio:.2}×"), ratio <= limit);
    }
    println!();
    Ok(())
}

/// Events per second the daemon takes from the ring buffer without loss:
/// a netns guest opens new denied flows (one datagram each, distinct
/// 5-tuples) at paced rates for 2 s; the classifier's per-sandbox counter
/// says how many it saw, the flow stream's sequence how many the daemon
/// published, the kernel's counter how many did not fit.
pub(crate) fn event_rate() -> Result<()> {
    let policy = "name = \"agent\"\n[network]\ndefault = \"deny\"\n";
    let h = sbx_net_tests::daemon::DaemonHarness::with_args("benchev", &[("agent.toml", policy)], Some("flow_history = 1000\n"), &[]);
    let name = unique_name("ev");
    let g = h.create_guest(&name, "agent");
    let guest = NetNs::open(g["netns"].as_str().context("netns")?)?;
    let snapshot = || -> Result<(u64, u64, u64)> {
        let status = h.json(&["status", "--json"]);
        let seen = status["sandbox_traffic"][&name]["denied"]["packets"].as_u64().context("sandbox counters")?;
        let (seq, lost) = stream_position(&h)?;
        Ok((seen, seq, lost))
    };
    println!("### Flow events through the daemon (new denied flows from a netns guest, 2 s per rate, default 256 KiB ring buffer)\n");
    println!("| offered flows/s | reached the classifier /s | published by the daemon /s | lost in the ring buffer | lost % |");
    println!("|---:|---:|---:|---:|---:|");
    let mut next_flow = 0u64;
    let mut rates = LosslessRate::default();
    for rate in [5_000u64, 10_000, 25_000, 50_000, 100_000, 200_000] {
        let (seen0, seq0, lost0) = snapshot()?;
        let seconds = 2.0;
        let first = next_flow;
        next_flow += rate * 2;
        guest.run(|| -> Result<()> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            let started = Instant::now();
            // Paced in 1 ms batches; bounded by count and time.
            let per_ms = (rate / 1000).max(1);
            let mut i = first;
            while i < first + rate * 2 && started.elapsed() < Duration::from_secs(4) {
                let due = started + Duration::from_micros((i - first) * 1_000_000 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    // Pacing: the batch's send time.
                    std::thread::sleep(wait);
                }
                for _ in 0..per_ms {
                    // A fresh 5-tuple each: 203.0.113.0/24 × ports 1024..61024.
                    let dst = Ipv4Addr::new(203, 0, 113, ((i / 60_000) % 250) as u8 + 1);
                    let _ = socket.send_to(b"x", (dst, 1024 + (i % 60_000) as u16));
                    i += 1;
                }
            }
            Ok(())
        })??;
        // Each datagram that reached the classifier is one event: measure
        // once the daemon has published or counted lost every one (on a
        // timeout, report what there is).
        let accounted = |(seen1, seq1, lost1): &(u64, u64, u64)| seq1.saturating_sub(seq0) + (lost1 - lost0) >= seen1 - seen0;
        let settled = sbx_net_tests::try_wait_for(Duration::from_secs(30), || snapshot().ok().filter(&accounted));
        let (seen1, seq1, lost1) = match settled {
            Some(s) => s,
            None => snapshot()?,
        };
        let (seen, published, lost) = (seen1 - seen0, seq1.saturating_sub(seq0), lost1 - lost0);
        let lost_pct = 100.0 * lost as f64 / seen.max(1) as f64;
        println!(
            "| {rate} | {:.0} | {:.0} | {lost} | {lost_pct:.2} |",
            seen as f64 / seconds,
            published as f64 / seconds
        );
        rates.add(rate as f64, published as f64 / seconds, lost_pct);
    }
    println!("\n{} (the guest's frame pump is the limit above ~195 k/s).\n", rates.summary("rate"));
    synthetic_event_rate(&h, &g)?;
    Ok(())
}

/// The daemon's flow stream so far: the last record's seq (every record
/// published gets the next one) and the kernel's lost-event count.
pub(crate) fn stream_position(h: &sbx_net_tests::daemon::DaemonHarness) -> Result<(u64, u64)> {
    let lost = h.json(&["status", "--json"])["events_lost"].as_u64().context("events_lost")?;
    let last = h.cli_ok(&["inspect", "-o", "json", "--last", "1"]);
    let seq = serde_json::from_str::<serde_json::Value>(last.trim()).ok().and_then(|v| v["seq"].as_u64()).unwrap_or(0);
    Ok((seq, lost))
}

/// Beyond what a guest's pump can send: frames of new denied flows run
/// through BPF_PROG_TEST_RUN as if on the sandbox's tap, by a program that
/// shares the daemon's pinned maps (its ring buffer included).
pub(crate) fn synthetic_event_rate(h: &sbx_net_tests::daemon::DaemonHarness, g: &serde_json::Value) -> Result<()> {
    h.topology.enter_host();
    let dp = Datapath::load(&DatapathOptions { pin_dir: Some(h.bpf_dir.clone()), ..Default::default() })?;
    let tap = g["tap"].as_str().context("tap")?;
    let ifindex = h.topology.host_netlink.link_index(tap)?;
    let mac = |key: &str| -> Result<[u8; 6]> {
        let text = g[key].as_str().context("mac")?;
        let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
        bytes.try_into().map_err(|_| anyhow::anyhow!("bad mac {text}"))
    };
    let (guest_mac, gateway_mac) = (mac("guest_mac")?, mac("gateway_mac")?);
    let guest_ip: Ipv4Addr = g["guest_ipv4"].as_str().context("guest_ipv4")?.parse()?;
    println!("### Flow events through the daemon, synthetic (BPF_PROG_TEST_RUN on the sandbox's tap sharing the daemon's maps; 2 s per rate)\n");
    println!("| offered events/s | generated /s | published by the daemon /s | lost in the ring buffer | lost % |");
    println!("|---:|---:|---:|---:|---:|");
    let mut n = 0u64;
    let mut rates = LosslessRate::default();
    for rate in [200_000u64, 400_000, 800_000] {
        let (seq0, lost0) = stream_position(h)?;
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < rate * 2 && started.elapsed() < Duration::from_secs(3) {
            let due = started + Duration::from_micros(sent * 1_000_000 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                // Pacing: the batch's run time.
                std::thread::sleep(wait);
            }
            for _ in 0..100 {
                let dst = Ipv4Addr::new(198, 18, ((n / 60_000) % 250) as u8, 1 + ((n / 15_000_000) % 250) as u8);
                let frame = ethernet(gateway_mac, guest_mac, ETH_P_IP, &ipv4(guest_ip, dst, 17, &[], 0, &udp(1024 + (n % 60_000) as u16, 9, b"x")));
                dp.test_run(program_names::EGRESS, &frame, ifindex, 1)?;
                n += 1;
                sent += 1;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        // Every run made one event: measure once the daemon has published
        // or counted lost each (on a timeout, report what there is).
        let accounted = |(seq1, lost1): &(u64, u64)| seq1.saturating_sub(seq0) + (lost1 - lost0) >= sent;
        let settled = sbx_net_tests::try_wait_for(Duration::from_secs(30), || stream_position(h).ok().filter(&accounted));
        let (seq1, lost1) = match settled {
            Some(s) => s,
            None => stream_position(h)?,
        };
        let (published, lost) = (seq1.saturating_sub(seq0), lost1 - lost0);
        println!(
            "| {rate} | {:.0} | {:.0} | {lost} | {:.2} |",
            sent as f64 / seconds,
            published as f64 / seconds,
            100.0 * lost as f64 / sent.max(1) as f64
        );
        rates.add(rate as f64, published as f64 / seconds, 100.0 * lost as f64 / sent.max(1) as f64);
    }
    println!("\n{}.\n", rates.summary("synthetic rate"));
    Ok(())
}

/// The rows of an event-rate table, for its summary line.
#[derive(Default)]
struct LosslessRate {
    /// The highest published events/s of a row that lost none.
    best: Option<f64>,
    /// The row that lost the least: (loss %, offered rate).
    least_loss: Option<(f64, f64)>,
}

impl LosslessRate {
    fn add(&mut self, offered: f64, published: f64, lost_pct: f64) {
        if lost_pct == 0.0 {
            self.best = Some(self.best.map_or(published, |b| b.max(published)));
        }
        if self.least_loss.is_none_or(|(l, _)| lost_pct < l) {
            self.least_loss = Some((lost_pct, offered));
        }
    }

    /// "Highest rate with no event lost: …", or, when every row lost some,
    /// which lost the least (never a rate of 0 that no row measured).
    fn summary(&self, what: &str) -> String {
        match (self.best, self.least_loss) {
            (Some(best), _) => format!("Highest {what} with no event lost: **{best:.0} events/s**"),
            (None, Some((pct, offered))) => format!("Every {what} lost events: the least, **{pct:.2} %**, at {offered:.0} offered/s"),
            (None, None) => format!("No {what} was measured"),
        }
    }
}

pub(crate) fn rules_v4(n: usize) -> Vec<Rule> {
    // n distinct /24s from 11.0.0.0 (outside every built-in range), half
    // allow, half deny.
    (0..n)
        .map(|i| {
            let net = ipnetwork::Ipv4Network::new(Ipv4Addr::from(0x0b00_0000u32 + ((i as u32) << 8)), 24).unwrap();
            bench_rule(IpNetwork::V4(net), i)
        })
        .collect()
}

pub(crate) fn rules_v6(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let addr = Ipv6Addr::from((0x2a00u128 << 112) | ((i as u128) << 80));
            bench_rule(IpNetwork::V6(ipnetwork::Ipv6Network::new(addr, 48).unwrap()), i)
        })
        .collect()
}

pub(crate) fn bench_rule(net: IpNetwork, i: usize) -> Rule {
    Rule {
        action: if i.is_multiple_of(2) { Action::Allow } else { Action::Deny },
        target: Target::Cidr(net),
        port: None,
        origin: Origin::Policy,
        text: net.to_string(),
        line: 0,
        except: Vec::new(),
        mode: sbx_net::policy::Mode::Enforce,
    }
}

/// An address inside an allow rule of `rules_v4(n)` / `rules_v6(n)`.
pub(crate) fn hit_destination(v6: bool, n: usize) -> IpAddr {
    let allow_rule = (n / 2) & !1;
    if v6 {
        Ipv6Addr::from((0x2a00u128 << 112) | ((allow_rule as u128) << 80) | 5).into()
    } else {
        Ipv4Addr::from(0x0b00_0000u32 + ((allow_rule as u32) << 8) + 5).into()
    }
}

/// The per-packet benchmarks' frame: UDP to port 443 from the guest.
pub(crate) fn bench_frame(spec: &SandboxSpec, dst: IpAddr) -> Vec<u8> {
    match dst {
        IpAddr::V4(d) => ethernet(spec.gateway_mac, spec.guest_mac, ETH_P_IP, &ipv4(spec.guest_ipv4, d, 17, &[], 0, &udp(4000, 443, &[0; 18]))),
        IpAddr::V6(d) => ethernet(spec.gateway_mac, spec.guest_mac, ETH_P_IPV6, &ipv6(spec.guest_ipv6, d, 17, &udp(4000, 443, &[0; 18]))),
    }
}

/// Issue 19's per-packet targets: the verdict within this ratio of the
/// one-lookup floor and this many ns above it, hits and misses, 10..1M rules.
pub(crate) const FLOOR_RATIO_TARGET: f64 = 1.3;
pub(crate) const ABOVE_FLOOR_TARGET_NS: f64 = 25.0;

pub(crate) fn per_packet_cost() -> Result<()> {
    let ns = NetNs::create(&unique_name("bench")).context("bench netns")?;
    ns.enter_current_thread()?;
    let spec = SandboxSpec::new(1, "bench", &AddressPools::default())?;
    println!("### Cost per packet (BPF_PROG_TEST_RUN; {SAMPLES} alternating rounds of {REPEAT} runs of each program; ns per run, median (min–max))\n");
    println!("Hit: destination inside an allow rule. Miss: no rule covers it (policy default `allow`, so both pass and neither emits an event); the generation's /0 default entry decides, and the floor's lookup (same key, same generation) finds that entry too. Above floor and ratio: per round, sbx_egress against the floor of the same round.\n");
    println!("| family | rules | case | empty program | one LPM lookup (floor) | sbx_egress | above floor ns | sbx_egress / floor |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    let mut verdicts = Vec::new();
    for v6 in [false, true] {
        for &n in &RULE_COUNTS {
            let mut rules = if v6 { rules_v6(n) } else { rules_v4(n) };
            rules.extend(builtin_deny_rules());
            let compiled = compile_rules("bench", Action::Allow, rules)?;
            let mut dp = Datapath::load(&DatapathOptions::default())?;
            let started = Instant::now();
            // The floor looks up generation BENCH_POLICY_ID: install under it.
            dp.install_sandbox(1, &spec.datapath_config(&compiled, sbx_net_common::BENCH_POLICY_ID, 0, &[]), &compiled)?;
            let install = started.elapsed();
            let cases: [(&str, IpAddr); 2] = if v6 {
                [("hit", hit_destination(true, n)), ("miss", "2a01::5".parse::<Ipv6Addr>()?.into())]
            } else {
                [("hit", hit_destination(false, n)), ("miss", Ipv4Addr::new(203, 0, 113, 5).into())]
            };
            let family = if v6 { 6 } else { 4 };
            for (case, dst) in cases {
                let frame = bench_frame(&spec, dst);
                let (code, _) = dp.test_run(program_names::EGRESS, &frame, 1, 1)?;
                if code != 0 {
                    bail!("{case} frame to {dst} was dropped; the benchmark must measure the pass path");
                }
                // Same work: the floor must find an allow entry (the rule
                // for a hit, the generation's /0 for a miss), as sbx_egress does.
                let (floor_code, _) = dp.test_run(program_names::BENCH_ONE_LOOKUP, &frame, 1, 1)?;
                if floor_code != 0 {
                    bail!("the floor's lookup for the {case} frame to {dst} found no allow entry (returned {floor_code}): not the lookup sbx_egress does");
                }
                let programs = [program_names::BENCH_EMPTY, program_names::BENCH_ONE_LOOKUP, program_names::EGRESS];
                let runs = alternating(programs.len(), SAMPLES, |k| {
                    let (_, d) = dp.test_run(programs[k], &frame, 1, REPEAT)?;
                    Ok(d.as_nanos() as f64)
                })?;
                let (empty, floor, full) = (&runs[0], &runs[1], &runs[2]);
                let above: Vec<f64> = full.iter().zip(floor).map(|(f, l)| f - l).collect();
                let ratio: Vec<f64> = full.iter().zip(floor).map(|(f, l)| f / l).collect();
                let name = format!("ipv{family} {n} rules {case}");
                let above = record("datapath", &format!("{name} ns above floor"), "ns", Better::Lower, &above);
                let ratio = record("datapath", &format!("{name} / floor"), "x", Better::Lower, &ratio);
                let full_fig = record("datapath", &format!("{name} sbx_egress"), "ns", Better::Lower, full);
                let floor_fig = Figure { suite: "datapath".into(), name: "floor".into(), unit: "ns".into(), better: Better::Lower, runs: floor.clone() };
                let empty_fig = Figure { suite: "datapath".into(), name: "empty".into(), unit: "ns".into(), better: Better::Lower, runs: empty.clone() };
                println!(
                    "| IPv{family} | {n} | {case} | {} | {} | {} | {} | {}× |",
                    empty_fig.spread(0),
                    floor_fig.spread(0),
                    full_fig.spread(0),
                    above.spread(0),
                    ratio.spread(2)
                );
                verdicts.push((name, ratio.median(), above.median()));
            }
            eprintln!("(installed {} entries in {:.2?})", compiled.entry_count(), install);
        }
    }
    println!();
    for (name, ratio, above) in verdicts {
        check_target(
            "datapath",
            &format!("{name}: ≤ {FLOOR_RATIO_TARGET}× the floor and ≤ {ABOVE_FLOOR_TARGET_NS:.0} ns above it"),
            format!("{ratio:.2}×, {above:+.0} ns"),
            ratio <= FLOOR_RATIO_TARGET && above <= ABOVE_FLOOR_TARGET_NS,
        );
    }
    println!();
    Ok(())
}

/// Rounds of the step breakdown (more than the per-packet table's: a step
/// is a few ns, and each figure is a difference of two programs' times).
pub(crate) const STEP_ROUNDS: usize = 15;

/// Where `sbx_egress`'s time goes on its commonest path (a hit, 10 rules):
/// the probes that stop after each step, run alternating with the empty
/// program, the floor and the whole classifier; each step's cost is the
/// median over rounds of its probe minus the probe before it.
pub(crate) fn step_costs() -> Result<()> {
    let ns = NetNs::create(&unique_name("benchsteps")).context("bench netns")?;
    ns.enter_current_thread()?;
    let spec = SandboxSpec::new(1, "bench", &AddressPools::default())?;
    println!("### Where the classifier's time goes (IPv4 and IPv6, 10 rules, hit; {STEP_ROUNDS} alternating rounds of {REPEAT} runs)\n");
    println!("Each probe is `sbx_egress` stopped after a step; a step's figure is the median over rounds of its probe minus the previous one. The floor's own lookup (floor minus empty program) is beside the decision step, which does that lookup.\n");
    println!("| family | config read | scratch cleared | parse + anti-spoof | decide (trie lookup) | floor's lookup | counters, flow check, return | total above floor |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let [config, scratch, parse, decide] = program_names::BENCH_STEPS;
    let programs = [program_names::BENCH_EMPTY, program_names::BENCH_ONE_LOOKUP, config, scratch, parse, decide, program_names::EGRESS];
    for v6 in [false, true] {
        let n = 10;
        let mut rules = if v6 { rules_v6(n) } else { rules_v4(n) };
        rules.extend(builtin_deny_rules());
        let compiled = compile_rules("bench", Action::Allow, rules)?;
        let mut dp = Datapath::load(&DatapathOptions { bench_steps: true, ..Default::default() })?;
        dp.install_sandbox(1, &spec.datapath_config(&compiled, sbx_net_common::BENCH_POLICY_ID, 0, &[]), &compiled)?;
        let frame = bench_frame(&spec, hit_destination(v6, n));
        // Every probe must take the path measured: each step passes.
        for program in programs {
            let (code, _) = dp.test_run(program, &frame, 1, 1)?;
            if code != 0 {
                bail!("{program} returned {code} for the hit frame: not the path the breakdown measures");
            }
        }
        let runs = alternating(programs.len(), STEP_ROUNDS, |k| {
            let (_, d) = dp.test_run(programs[k], &frame, 1, REPEAT)?;
            Ok(d.as_nanos() as f64)
        })?;
        let family = if v6 { 6 } else { 4 };
        let step = |name: &str, later: usize, earlier: usize| {
            let diff: Vec<f64> = runs[later].iter().zip(&runs[earlier]).map(|(l, e)| l - e).collect();
            record("datapath", &format!("ipv{family} step {name}"), "ns", Better::Lower, &diff).spread(0)
        };
        println!(
            "| IPv{family} | {} | {} | {} | {} | {} | {} | {} |",
            step("config read", 2, 0),
            step("scratch cleared", 3, 2),
            step("parse", 4, 3),
            step("decide", 5, 4),
            step("floor lookup", 1, 0),
            step("finish", 6, 5),
            step("total above floor", 6, 1),
        );
    }
    println!();
    Ok(())
}

/// Packets that left the host by the uplink (read in the host namespace).
pub(crate) fn uplink_tx_packets(host: &NetNs) -> Result<u64> {
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
pub(crate) fn measure_pps(guest: &NetNs, host: &NetNs, dst: SocketAddr, duration: Duration) -> Result<f64> {
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
    // Let the pump drain what is queued: a fixed part of every run (the
    // rate below takes it out again), not a wait for a condition.
    std::thread::sleep(Duration::from_millis(200));
    let elapsed = started.elapsed().as_secs_f64() - 0.2;
    Ok((uplink_tx_packets(host)? - before) as f64 / elapsed)
}

/// A sandbox the benchmark installed, taken off the host (pump and guest
/// namespace, tap, pinned link, log) when dropped, also when a run fails.
pub(crate) struct BenchSandbox {
    pub(crate) host: sbx_net::sandbox::install::SandboxHost,
    pub(crate) sandbox: sbx_net::sandbox::install::InstalledSandbox,
    pub(crate) pins: std::path::PathBuf,
    pub(crate) logs: std::path::PathBuf,
}

impl BenchSandbox {
    /// Sandbox 1 on a new tap, allowed 198.51.100.0/24, put on the host
    /// (in the current namespace) by the daemon's installer, with a netns
    /// guest behind the pump or with the tap free for a VM.
    pub(crate) fn install(tag: &str, netns_guest: bool) -> Result<BenchSandbox> {
        use sbx_net::sandbox::install::{HostSettings, InstallRequest, SandboxHost, TapSource};
        let name = unique_name(tag);
        let pins = std::path::PathBuf::from("/sys/fs/bpf").join(&name);
        let logs = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&logs)?;
        let config = sbx_net::control::config::DaemonConfig { uplink: Some("uplink".into()), ..Default::default() };
        let settings = HostSettings { pools: config.pools(), nft: config.nft(), links_dir: pins.join("links"), pump_exe: sbx_net_tests::daemon::sbx_net_bin(), log_dir: logs.clone() };
        let installed = (|| -> Result<(SandboxHost, sbx_net::sandbox::install::InstalledSandbox)> {
            let mut host = SandboxHost::new(Datapath::load(&DatapathOptions::default())?, settings)?;
            host.install_table(&[])?;
            let policy = Policy::parse("bench.toml", "name = \"bench\"\n[network]\nallow = [\"198.51.100.0/24\"]\n")?;
            let spec = SandboxSpec::new(1, &name, &config.pools())?;
            let sandbox = host.install(InstallRequest { spec, policy: &policy, policy_id: 1, tap: TapSource::New, netns_guest })?;
            Ok((host, sandbox))
        })();
        match installed {
            Ok((host, sandbox)) => Ok(BenchSandbox { host, sandbox, pins, logs }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&pins);
                let _ = std::fs::remove_dir_all(&logs);
                Err(e)
            }
        }
    }
}

impl Drop for BenchSandbox {
    fn drop(&mut self) {
        let left = self.host.uninstall(&self.sandbox);
        if !left.is_empty() {
            eprintln!("removing the benchmark's sandbox left: {}", left.join("; "));
        }
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// Attaches the classifier to `tap` through `pin`. A link whose pin was
/// just removed is released by the kernel in a work item: until then the
/// program is still on the tap, and attaching it again fails with EEXIST;
/// wait (at most 5 s) for that. Returns how long it waited.
pub(crate) fn reattach(dp: &mut Datapath, tap: &str, pin: &std::path::Path) -> Result<Duration> {
    let started = Instant::now();
    loop {
        match dp.attach_pinned(tap, pin) {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) => {
                let e = anyhow::Error::from(e);
                let exists = e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::EEXIST)));
                if !exists || started.elapsed() > Duration::from_secs(5) {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// The sandbox is put on the host by the daemon's installer (tap, nftables
/// table and element, pinned TCX link, the netns guest's pump process), so
/// every configuration includes the nftables path the daemon's sandboxes
/// take; the classifier is detached and re-attached through its pin. The
/// figures and the target are recorded under `suite` (`bench vmm` runs
/// this too, beside its VM's own figures: a run file must not hold one
/// target name twice).
pub(crate) fn tap_throughput(suite: &str) -> Result<()> {
    use sbx_net::sandbox::install::SANDBOX_FLAGS;

    let topology = Topology::new("benchpps");
    topology.enter_host();
    let sink = Ipv4Addr::new(198, 51, 100, 5);
    topology.add_world_address(sink.into());
    let dst = SocketAddr::new(sink.into(), 9);
    // A bound socket so the world does not answer with ICMP unreachables.
    let _sink = topology.world.run(move || UdpSocket::bind(dst))??;

    let mut bench = BenchSandbox::install("p", true)?;
    let (spec, ifindex, pin) = (bench.sandbox.spec.clone(), bench.sandbox.ifindex, bench.host.settings.link_pin(&bench.sandbox.spec.name));
    let guest = NetNs::open(&spec.netns)?;
    let plain = spec.datapath_config(&bench.sandbox.policy, bench.sandbox.policy_id, 0, &[]);
    let as_installed = bench.host.datapath_config(&spec, &bench.sandbox.policy, bench.sandbox.policy_id);
    assert_eq!(as_installed.flags, SANDBOX_FLAGS);
    let datapath = &mut bench.host.datapath;
    // Start without the program: the runs below attach it as they need it.
    Datapath::unpin_link(&pin)?;

    let duration = Duration::from_secs(TAP_SECONDS);
    // Warm up neighbour resolution.
    measure_pps(&guest, &topology.host, dst, Duration::from_millis(300))?;
    let mut waited = Duration::ZERO;
    // 0: no program, 1: sbx_egress without flows, 2: as the daemon runs it.
    let runs = alternating(3, TAP_ROUNDS, |config| match config {
        0 => measure_pps(&guest, &topology.host, dst, duration),
        _ => {
            datapath.write_config(ifindex, if config == 1 { &plain } else { &as_installed })?;
            waited = waited.max(reattach(datapath, &spec.tap, &pin)?);
            let pps = measure_pps(&guest, &topology.host, dst, duration);
            Datapath::unpin_link(&pin)?;
            pps
        }
    })?;
    let (without, with, with_flows) = (&runs[0], &runs[1], &runs[2]);
    let share = |runs: &[f64]| -> Vec<f64> { runs.iter().zip(without).map(|(w, wo)| 100.0 * w / wo).collect() };
    let wo = record(suite, "tap packets/s, no program", "packets/s", Better::Higher, without);
    let w = record(suite, "tap packets/s, sbx_egress", "packets/s", Better::Higher, with);
    let wf = record(suite, "tap packets/s, sbx_egress + flows", "packets/s", Better::Higher, with_flows);
    let w_share = record(suite, "tap sbx_egress % of no program", "%", Better::Higher, &share(with));
    let wf_share = record(suite, "tap sbx_egress + flows % of no program", "%", Better::Higher, &share(with_flows));
    println!("### Small UDP packets from a netns guest through the tap (packets/s out of the uplink, {TAP_ROUNDS} alternating rounds × {}s; median (min–max))\n", duration.as_secs());
    println!("The sandbox is installed as the daemon installs it (nftables table, guest pump process); only the classifier comes and goes (longest wait for the kernel to release a detached link: {} ms). Shares: per round, against the no-program run of the same round.\n", waited.as_millis());
    println!("| configuration | packets/s | runs | % of no program |");
    println!("|---|---:|---|---:|");
    println!("| no program on the tap | {} | {} | |", wo.spread(0), fmt_runs(without));
    println!("| sbx_egress attached (TCX) | {} | {} | {} |", w.spread(0), fmt_runs(with), w_share.spread(1));
    println!("| sbx_egress + flow table (as the daemon runs it) | {} | {} | {} |", wf.spread(0), fmt_runs(with_flows), wf_share.spread(1));
    println!();
    check_target(suite, "tap with flow tracking ≥ 95 % of no program", format!("{:.1} %", wf_share.median()), wf_share.median() >= 95.0);
    println!();
    drop(guest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::LosslessRate;

    #[test]
    fn a_table_whose_every_rate_lost_events_says_so() {
        let mut rates = LosslessRate::default();
        rates.add(200_000.0, 150_000.0, 1.1);
        rates.add(400_000.0, 300_000.0, 0.07);
        assert_eq!(rates.summary("rate"), "Every rate lost events: the least, **0.07 %**, at 400000 offered/s");
        rates.add(5_000.0, 4_990.0, 0.0);
        assert_eq!(rates.summary("rate"), "Highest rate with no event lost: **4990 events/s**");
    }
}
