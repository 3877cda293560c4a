//! `bench vmm`: the microVM monitor on a sandbox tap.

use super::*;

/// Frames the host received on `tap` (what its VM sent), read in the
/// host namespace.
pub(crate) fn tap_rx_packets(host: &NetNs, tap: &str) -> Result<u64> {
    let dev = host.run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))??;
    let prefix = format!("{tap}:");
    for line in dev.lines() {
        if let Some(rest) = line.trim_start().strip_prefix(prefix.as_str()) {
            let fields: Vec<u64> = rest.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            return fields.get(1).copied().context("rx_packets field");
        }
    }
    bail!("no {tap} in /proc/net/dev")
}

/// One run of the test guest on `tap` with `probe`: its result lines, and
/// the time from the monitor's start (VM creation) to the first frame the
/// host saw on the tap.
pub(crate) fn vm_probe_run(host: &NetNs, tap: &str, mac: [u8; 6], net: &sbx_vmm::probe::ProbeNetwork, probe: &str, limit: Duration) -> Result<(Vec<serde_json::Value>, Duration)> {
    use sbx_vmm::vm::MicroVm;
    let before = tap_rx_packets(host, tap)?;
    let started = Instant::now();
    let memory = 64 << 20;
    let mut vm = MicroVm::new(memory)?;
    let tap_fd = sbx_vmm::Tap::open(tap)?;
    vm.add_device(Box::new(sbx_vmm::virtio::net::NetMmio::new(mac, tap_fd)?))?;
    sbx_vmm::probe::boot(&mut vm, memory, &sbx_vmm::probe::script(net, probe)?)?;
    let kicker = vm.kicker();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let host_name = host.name().to_string();
    let tap_name = tap.to_string();
    let watcher = std::thread::spawn(move || -> Option<Duration> {
        // The first frame, watched from another thread while the vCPU runs.
        let host = NetNs::open(&host_name).ok()?;
        let mut first = None;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if first.is_none() && tap_rx_packets(&host, &tap_name).ok()? > before {
                first = Some(started.elapsed());
            }
            if done_rx.try_recv().is_ok() {
                // The run may have ended after the check above: look once
                // more (a frame it sent then is late by at most a poll).
                if first.is_none() && tap_rx_packets(&host, &tap_name).ok()? > before {
                    first = Some(started.elapsed());
                }
                return first;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        kicker.stop(Duration::from_secs(5));
        first
    });
    let end = vm.run(u64::MAX);
    let _ = done_tx.send(());
    let first = watcher.join().map_err(|_| anyhow::anyhow!("watcher panicked"))?;
    let console = String::from_utf8_lossy(&vm.console()).into_owned();
    let end = end?;
    if end != sbx_vmm::vm::RunEnd::Exited(0) {
        bail!("the guest ended with {end:?}: {console}");
    }
    let results = console.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    Ok((results, first.context("no frame on the tap")?))
}

pub(crate) fn op_result<'a>(results: &'a [serde_json::Value], op: &str) -> Result<&'a serde_json::Value> {
    results.iter().find(|r| r["op"] == op).with_context(|| format!("no {op} result in {results:?}"))
}

/// `cargo xtask bench vmm`: the microVM monitor on a sandbox tap installed
/// as the daemon installs it (classifier, flow table, nftables): start to
/// first frame; small-UDP packets/s from the guest through virtio-net and
/// the tap, with and without the classifier, beside the netns frame pump;
/// TCP bulk from the guest's smoltcp (ring 3) to the world.
pub(crate) fn vmm_bench() -> Result<()> {
    use std::io::Read;
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is absent: the microVM benchmark needs KVM");
    }
    const STARTS: usize = 20;
    const UDP_COUNT: u64 = 100_000;
    const TCP_BYTES: u64 = 64 << 20;

    let topology = Topology::new("benchvmm");
    topology.enter_host();
    // No daemon here: prepare the uplink as the daemon does at start.
    let uplink = sbx_net::sandbox::host::uplink_settings(&["uplink".to_string()], &sbx_net::sandbox::host::read_sysctl);
    sbx_net::sandbox::host::apply(&uplink, false)?;
    let sink = Ipv4Addr::new(198, 51, 100, 5);
    topology.add_world_address(sink.into());
    let udp_dst = SocketAddr::new(sink.into(), 9);
    let _udp_sink = topology.world.run(move || UdpSocket::bind(udp_dst))??;
    // A TCP sink that reads and drops, one connection at a time, until stopped.
    let tcp_dst = SocketAddr::new(sink.into(), 5001);
    let listener = topology.world.run(move || std::net::TcpListener::bind(tcp_dst))??;
    listener.set_nonblocking(true)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_sink = stop.clone();
    let tcp_sink = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while !stop_sink.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });

    let mut bench = BenchSandbox::install("v", false)?;
    let (spec, pin) = (bench.sandbox.spec.clone(), bench.host.settings.link_pin(&bench.sandbox.spec.name));
    let net = sbx_vmm::probe::ProbeNetwork {
        ipv4: Some((spec.guest_ipv4, sbx_net::sandbox::SANDBOX_IPV4_PREFIX_LEN, spec.gateway_ipv4)),
        ipv6: None,
        dns: vec![],
    };
    let host_ns = &topology.host;
    let run = |probe: &str| {
        let started = Instant::now();
        let result = vm_probe_run(host_ns, &spec.tap, spec.guest_mac, &net, probe, Duration::from_secs(120));
        eprintln!("[vmm] {:?} in {:.0} ms: {}", probe.lines().last().unwrap_or(""), started.elapsed().as_secs_f64() * 1000.0, match &result {
            Ok((r, first)) => format!("first frame after {:.1} ms; {}", first.as_secs_f64() * 1000.0, r.iter().filter(|v| v.get("op").is_some()).map(|v| v.to_string()).collect::<Vec<_>>().join(" ")),
            Err(e) => e.to_string(),
        });
        result
    };

    // Start to first frame (the guest's first ARP request), as installed.
    let ping = format!("timeout 2000\nping {sink}\n");
    let (warm, _) = run(&ping)?;
    if op_result(&warm, "ping")?["ok"] != true {
        bail!("the guest cannot reach the world: {warm:?}");
    }
    let mut starts = Vec::new();
    for _ in 0..STARTS {
        starts.push(run(&ping)?.1.as_secs_f64() * 1000.0);
    }
    starts.sort_by(f64::total_cmp);

    // Packets/s and bulk, alternating with and without the classifier.
    let udp = format!("timeout 60000\nping {sink}\nudpflood {udp_dst} {UDP_COUNT} 18\n");
    let tcp = format!("timeout 60000\ntcpsend {tcp_dst} {TCP_BYTES}\n");
    let (mut udp_with, mut udp_without, mut tcp_with, mut tcp_without) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut out_of_uplink = Vec::new();
    let datapath = &mut bench.host.datapath;
    // Installed means attached: each configuration below detaches or
    // re-attaches the classifier through its pin.
    let mut is_attached = true;
    for round in 0..RUNS {
        for attached in [round % 2 == 0, round % 2 != 0] {
            if attached && !is_attached {
                reattach(datapath, &spec.tap, &pin)?;
            } else if !attached && is_attached {
                Datapath::unpin_link(&pin)?;
            }
            is_attached = attached;
            let before = uplink_tx_packets(host_ns)?;
            let (r, _) = run(&udp)?;
            let flood = op_result(&r, "udpflood")?;
            let pps = flood["sent"].as_f64().unwrap_or(0.0) / (flood["micros"].as_f64().unwrap_or(1.0) / 1e6);
            out_of_uplink.push((uplink_tx_packets(host_ns)? - before) as f64 / UDP_COUNT as f64);
            let (r, _) = run(&tcp)?;
            let bulk = op_result(&r, "tcpsend")?;
            if bulk["ok"] != true {
                bail!("tcpsend failed: {bulk}");
            }
            let mbit = bulk["sent"].as_f64().unwrap_or(0.0) * 8.0 / bulk["micros"].as_f64().unwrap_or(1.0);
            if attached {
                udp_with.push(pps);
                tcp_with.push(mbit);
            } else {
                udp_without.push(pps);
                tcp_without.push(mbit);
            }
        }
    }
    if !is_attached {
        reattach(datapath, &spec.tap, &pin)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tcp_sink.join();
    drop(bench);

    println!("## MicroVM (`cargo xtask bench vmm`)\n");
    println!("Machine: {} cores, kernel {}; KVM through kvm_pvm: the test guest's ring 0 is emulated, its ring 3 (smoltcp, the virtio driver) native.\n", num_cpus(), kernel());
    println!("The VM runs on a sandbox tap installed as the daemon installs it (TCX classifier with the flow table, nftables table and element); virtio-net is served in userspace by the device thread (ioeventfd in, tap writes out).\n");
    println!("### Monitor start to the first frame on the tap ({STARTS} starts)\n");
    println!("From `MicroVm::new` (KVM VM, memory, vCPU) through loading the guest, its ring-0 set-up, the virtio-net driver's start, to the guest's first ARP request counted on the tap.\n");
    println!("| median | p90 | max | target |");
    println!("|---:|---:|---:|---|");
    println!("| {:.1} ms | {:.1} ms | {:.1} ms | ≤ 20 ms |\n", starts[STARTS / 2], starts[STARTS * 9 / 10], starts[STARTS - 1]);
    record("vmm", "vm start to first frame", "ms", Better::Lower, &starts);
    check_target("vmm", "monitor start to first frame ≤ 20 ms (median)", format!("{:.1} ms", starts[STARTS / 2]), starts[STARTS / 2] <= 20.0);
    println!();
    let (uw, uwo) = (median(udp_with.clone()), median(udp_without.clone()));
    println!("### Small UDP from the guest through virtio-net and the tap (packets/s as the guest sent them, {UDP_COUNT} per run, median of {RUNS}, alternating)\n");
    println!("| configuration | packets/s | runs |");
    println!("|---|---:|---|");
    println!("| no program on the tap | {uwo:.0} | {} |", fmt_runs(&udp_without));
    println!("| sbx_egress + flow table (as the daemon runs it) | {uw:.0} | {} |", fmt_runs(&udp_with));
    println!("\nWith / without: **{:.1} %** (target ≥ 95 %). Datagrams out of the uplink per datagram sent: {} (min).\n", 100.0 * uw / uwo, out_of_uplink.iter().cloned().fold(f64::INFINITY, f64::min));
    record("vmm", "vm udp packets/s, no program", "packets/s", Better::Higher, &udp_without);
    record("vmm", "vm udp packets/s, classifier + flows", "packets/s", Better::Higher, &udp_with);
    check_target("vmm", "VM UDP packets/s with the classifier ≥ 95 % of none", format!("{:.1} %", 100.0 * uw / uwo), uw >= 0.95 * uwo);
    println!();
    let (tw, two) = (median(tcp_with.clone()), median(tcp_without.clone()));
    println!("### TCP bulk from the guest (smoltcp in ring 3) to the world ({} MiB per run, Mbit/s until every byte is acknowledged, median of {RUNS})\n", TCP_BYTES >> 20);
    println!("| configuration | Mbit/s | runs |");
    println!("|---|---:|---|");
    println!("| no program on the tap | {two:.0} | {} |", fmt_runs(&tcp_without));
    println!("| sbx_egress + flow table | {tw:.0} | {} |", fmt_runs(&tcp_with));
    println!("\nWith / without: **{:.1} %**.\n", 100.0 * tw / two);
    record("vmm", "vm tcp Mbit/s, classifier + flows", "Mbit/s", Better::Higher, &tcp_with);
    println!("Beside it, in the same run, the netns frame pump (a netns guest on a tap of the same kind, as `bench datapath` measures it; its figures and target are this suite's):\n");
    tap_throughput("vmm")
}
