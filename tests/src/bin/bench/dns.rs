//! `bench dns`: the DNS proxy against the upstream directly and peer resolvers.

use super::*;

pub(crate) const DNS_RATE: u32 = 10_000;
pub(crate) const DNS_SECONDS: u64 = 3;
pub(crate) const DNS_WINDOW: usize = 32;
pub(crate) const DNS_MAX_RUNS: usize = 5;
pub(crate) const DNS_MAX_SECONDS: u64 = 2;

/// A DNS query for `name` (A, recursion desired) with `id`.
pub(crate) fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(32);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

pub(crate) struct DnsRun {
    p50_us: f64,
    p99_us: f64,
    answered: usize,
    sent: usize,
}

/// Queries `target` from the current thread's namespace at `rate` for
/// `seconds` (open loop); latency per answered query.
pub(crate) fn fixed_rate(target: SocketAddr, rate: u32, seconds: u64) -> Result<DnsRun> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let total = (u64::from(rate) * seconds) as usize;
    let sent_at: std::sync::Arc<Vec<std::sync::atomic::AtomicU64>> = std::sync::Arc::new((0..65536).map(|_| std::sync::atomic::AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let receiver = {
        let socket = socket.try_clone()?;
        let sent_at = sent_at.clone();
        std::thread::spawn(move || {
            let mut latencies = Vec::with_capacity(total);
            let mut buf = [0u8; 1500];
            let deadline = Instant::now() + Duration::from_secs(seconds + 2);
            while latencies.len() < total && Instant::now() < deadline {
                if let Ok(n) = socket.recv(&mut buf) {
                    if n >= 12 {
                        let id = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                        let t = sent_at[id].swap(0, std::sync::atomic::Ordering::Relaxed);
                        if t != 0 {
                            latencies.push((epoch.elapsed().as_nanos() as u64 - t) as f64 / 1000.0);
                        }
                    }
                }
            }
            latencies
        })
    };
    let interval = Duration::from_nanos(1_000_000_000 / u64::from(rate));
    // Sleep most of each gap instead of spinning: on 2 cores a spinning
    // sender would take a core from the paths being measured. A 1 ns timer
    // slack makes the sleeps precise.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let start = Instant::now();
    for i in 0..total {
        let due = start + interval * i as u32;
        let now = Instant::now();
        if due > now + Duration::from_micros(30) {
            std::thread::sleep(due - now - Duration::from_micros(20));
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let id = (i % 65536) as u16;
        sent_at[id as usize].store(epoch.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        let _ = socket.send(&dns_query(id, "bench.test"));
    }
    let mut latencies = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if latencies.is_empty() {
        bail!("no answers from {target}");
    }
    Ok(DnsRun { p50_us: percentile(&latencies, 0.5), p99_us: percentile(&latencies, 0.99), answered: latencies.len(), sent: total })
}

/// Closed loop with DNS_WINDOW queries in flight: (answers per second,
/// answers).
pub(crate) fn max_rate(target: SocketAddr, seconds: u64) -> Result<(f64, u64)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut next_id: u16 = 0;
    for _ in 0..DNS_WINDOW {
        socket.send(&dns_query(next_id, "bench.test"))?;
        next_id = next_id.wrapping_add(1);
    }
    let start = Instant::now();
    let mut answered = 0u64;
    let mut buf = [0u8; 1500];
    while start.elapsed() < Duration::from_secs(seconds) {
        // On a timeout (a lost query) another goes in flight all the same,
        // so the window stays full.
        if socket.recv(&mut buf).is_ok() {
            answered += 1;
        }
        socket.send(&dns_query(next_id, "bench.test"))?;
        next_id = next_id.wrapping_add(1);
    }
    Ok((answered as f64 / start.elapsed().as_secs_f64(), answered))
}

/// Debian's unbound forwarding "." to `upstream`, on `addr:port` in the
/// world namespace: the bench's own child (no daemon, no chroot, no
/// remote control, no root hints: it only forwards), its config in a temp
/// dir; killed and the dir removed on drop. `cache`: false keeps unbound's
/// caches at their minimum and every TTL at 0 (`cache-max-ttl: 0`,
/// `cache-max-negative-ttl: 0`), so each query goes upstream.
pub(crate) struct UnboundPeer {
    child: Option<sbx_net_tests::Background>,
    dir: std::path::PathBuf,
}

impl UnboundPeer {
    pub(crate) fn start(ns: &NetNs, addr: IpAddr, port: u16, upstream: SocketAddr, cache: bool) -> Result<UnboundPeer> {
        let dir = std::env::temp_dir().join(unique_name("bench-unbound"));
        std::fs::create_dir_all(&dir)?;
        // The struct first: the dir goes on drop even if the start fails.
        let mut peer = UnboundPeer { child: None, dir: dir.clone() };
        let cache_lines = if cache {
            "    msg-cache-size: 4m\n    rrset-cache-size: 8m\n"
        } else {
            // unbound has no "off": the smallest caches, and nothing in
            // them outlives its store (cache-max-ttl 0).
            "    msg-cache-size: 0\n    rrset-cache-size: 0\n    key-cache-size: 0\n    neg-cache-size: 0\n    cache-max-ttl: 0\n    cache-max-negative-ttl: 0\n    cache-min-ttl: 0\n"
        };
        let config = format!(
            "server:\n    interface: {addr}@{port}\n    port: {port}\n    do-daemonize: no\n    chroot: \"\"\n    username: \"\"\n    directory: \"{dir}\"\n    pidfile: \"\"\n    use-syslog: no\n    logfile: \"\"\n    verbosity: 0\n    num-threads: 1\n    do-ip6: no\n    access-control: 0.0.0.0/0 allow\n    module-config: \"iterator\"\n    local-zone: \"test.\" nodefault\n    do-not-query-localhost: no\n    prefetch: no\n    serve-expired: no\n    harden-referral-path: no\n{cache_lines}remote-control:\n    control-enable: no\nforward-zone:\n    name: \".\"\n    forward-addr: {}@{}\n",
            upstream.ip(),
            upstream.port(),
            dir = dir.display(),
        );
        let conf = dir.join("unbound.conf");
        std::fs::write(&conf, config)?;
        let child = sbx_net_tests::netns_command(ns.name(), "unbound")
            .args(["-d", "-c"])
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("unbound.log"))?)
            .spawn()
            .context("spawn unbound")?;
        let child = peer.child.insert(sbx_net_tests::Background(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                bail!("unbound exited with {status}: {}", std::fs::read_to_string(dir.join("unbound.log")).unwrap_or_default());
            }
            let out = sbx_net_tests::run_in(ns.name(), "dig", &["+short", "+time=1", "+tries=1", "-p", &port.to_string(), &format!("@{addr}"), "bench.test"]);
            if out.status.success() && !out.stdout.is_empty() {
                return Ok(peer);
            }
            if Instant::now() > deadline {
                bail!("unbound on {addr}:{port} did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl UnboundPeer {
    /// The unbound process (`ip netns exec` execs it in place).
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.0.id())
    }
}

impl Drop for UnboundPeer {
    fn drop(&mut self) {
        drop(self.child.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One measured run of a path: latency at DNS_RATE, then the maximum rate
/// with the CPU time per answer it took: the answering process's
/// (`server_us`, user and system, all its threads) and the whole
/// machine's (`machine_us`: the guest's client, the netns guest's frame
/// pump, the kernel's packet path, the upstream, the server).
struct PathRun {
    fixed: DnsRun,
    max: f64,
    server_us: f64,
    machine_us: f64,
}

fn measure(guest: &NetNs, target: SocketAddr, server: u32) -> Result<PathRun> {
    let fixed = guest.run(|| fixed_rate(target, DNS_RATE, DNS_SECONDS))??;
    let server_cpu = || tree_cpu_us(server).0;
    let (server_before, machine_before) = (server_cpu(), machine_busy_us());
    let (max, answered) = guest.run(|| max_rate(target, DNS_MAX_SECONDS))??;
    let per_answer = |cpu: f64| cpu / answered.max(1) as f64;
    Ok(PathRun { fixed, max, server_us: per_answer(server_cpu() - server_before), machine_us: per_answer(machine_busy_us() - machine_before) })
}

/// Queries `target` until it answers (the proxy after a restart, a peer's
/// first forward), at most 15 s.
fn warm_up(guest: &NetNs, target: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match guest.run(|| fixed_rate(target, 1000, 1))? {
            Ok(r) if r.answered * 10 >= r.sent * 9 => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => continue,
            Ok(r) => bail!("{target} answered {}/{} while warming up", r.answered, r.sent),
            Err(e) => return Err(e),
        }
    }
}

/// One path of a table: (what, short name, address, the answering
/// process's pid).
type DnsPath<'a> = (&'a str, &'a str, SocketAddr, u32);

/// One table of paths measured alternating: the upstream directly first
/// (the added latency's base), then sbx-net, then the peers.
fn dns_table(guest: &NetNs, phase: &str, key: &str, paths: &[DnsPath]) -> Result<Vec<(Figure, Figure, Figure)>> {
    for (_, _, target, _) in paths {
        warm_up(guest, *target)?;
    }
    let runs = alternating(paths.len(), DNS_MAX_RUNS, |i| measure(guest, paths[i].2, paths[i].3))?;
    // Added latency per round: each run against the baseline run of the
    // same round.
    let base: Vec<(f64, f64)> = runs[0].iter().map(|r| (r.fixed.p50_us, r.fixed.p99_us)).collect();
    println!("### {phase}: latency at {DNS_RATE} queries/s for {DNS_SECONDS} s and the maximum rate ({DNS_WINDOW} in flight), from a netns guest; medians of {DNS_MAX_RUNS} alternating runs (min–max)\n");
    println!("| path | p50 µs | p99 µs | added p50 µs | added p99 µs | answered | max queries/s | server CPU µs/answer | machine CPU µs/answer |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut figures = Vec::new();
    for ((what, short, _, _), runs) in paths.iter().zip(&runs) {
        let p50: Vec<f64> = runs.iter().map(|r| r.fixed.p50_us).collect();
        let p99: Vec<f64> = runs.iter().map(|r| r.fixed.p99_us).collect();
        let added50: Vec<f64> = runs.iter().zip(&base).map(|(r, b)| r.fixed.p50_us - b.0).collect();
        let added99: Vec<f64> = runs.iter().zip(&base).map(|(r, b)| r.fixed.p99_us - b.1).collect();
        let max: Vec<f64> = runs.iter().map(|r| r.max).collect();
        let server: Vec<f64> = runs.iter().map(|r| r.server_us).collect();
        let machine: Vec<f64> = runs.iter().map(|r| r.machine_us).collect();
        let answered: usize = runs.iter().map(|r| r.fixed.answered).sum();
        let sent: usize = runs.iter().map(|r| r.fixed.sent).sum();
        let qps = record("dns", &format!("dns {short} {key} queries/s"), "queries/s", Better::Higher, &max);
        let a50 = record("dns", &format!("dns {short} {key} p50 added"), "µs", Better::Lower, &added50);
        let a99 = record("dns", &format!("dns {short} {key} p99 added"), "µs", Better::Lower, &added99);
        let server = record("dns", &format!("dns {short} {key} server cpu/answer"), "µs", Better::Lower, &server);
        let machine = record("dns", &format!("dns {short} {key} machine cpu/answer"), "µs", Better::Lower, &machine);
        println!(
            "| {what} | {} | {} | {} | {} | {answered}/{sent} | {} | {} | {} |",
            Figure { runs: p50, ..a50.clone() }.spread(0),
            Figure { runs: p99, ..a99.clone() }.spread(0),
            a50.spread(0),
            a99.spread(0),
            qps.spread(0),
            server.spread(1),
            machine.spread(1)
        );
        figures.push((qps, a50, a99));
    }
    println!();
    Ok(figures)
}

/// The daemon's settings for the cache-off table, then the cached one.
const BENCH_DNS_CONFIG: &str = "dns_cache_entries = 0\ndns_queries_per_second_per_sandbox = 0\n";
const BENCH_CACHED_CONFIG: &str = "dns_queries_per_second_per_sandbox = 0\n";

pub(crate) fn dns_bench() -> Result<()> {
    use sbx_net_tests::daemon::DaemonHarness;
    use sbx_net_tests::WorldDns;

    println!("## DNS proxy (`cargo xtask bench dns`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    let forwarder: IpAddr = Ipv4Addr::new(198, 51, 100, 53).into();
    let unbound_addr: IpAddr = Ipv4Addr::new(198, 51, 100, 54).into();
    let upstream: IpAddr = sbx_net_tests::UPLINK_WORLD_V4.into();
    let policy = format!(
        "name = \"bench\"\n[network]\ndefault = \"deny\"\nallow = [\"bench.test\", \"{upstream}/32:5353\", \"{forwarder}/32\", \"{unbound_addr}/32\"]\n"
    );
    let upstream_flag = format!("--upstream-dns={upstream}:53");
    // sbx-net first with its answer cache off, like for like with peers
    // whose caches are off; then restarted with it on. One guest sends the
    // whole load, past the per-sandbox query meter's 1000/s: the meter is
    // off, as the peers have none (unbound's ip-ratelimit is off by default).
    let mut h = DaemonHarness::with_args("bench-dns", &[("bench.toml", policy.as_str())], Some(BENCH_DNS_CONFIG), &[upstream_flag.as_str()]);
    h.topology.add_world_address(forwarder);
    h.topology.add_world_address(unbound_addr);
    let records = vec!["--local=/test/".to_string(), "--host-record=bench.test,198.51.100.5,300".to_string()];
    let _auth = WorldDns::start_with(&h.topology.world, upstream, 53, &records);
    let auth_direct = WorldDns::start_with(&h.topology.world, upstream, 5353, &records);
    // The peers, one hop from the guest as the proxy is, forwarding to the
    // same upstream: with their caches off, and on.
    let dnsmasq = WorldDns::start_with(&h.topology.world, forwarder, 5300, &[format!("--server={upstream}#53"), "--cache-size=0".into()]);
    let dnsmasq_cached = WorldDns::start_with(&h.topology.world, forwarder, 5302, &[format!("--server={upstream}#53"), "--cache-size=1000".into()]);
    let up = SocketAddr::new(upstream, 53);
    let unbound = UnboundPeer::start(&h.topology.world, unbound_addr, 5301, up, false)?;
    let unbound_cached = UnboundPeer::start(&h.topology.world, unbound_addr, 5303, up, true)?;
    let g = h.create_guest("bench", "bench");
    let guest = NetNs::open(g["netns"].as_str().context("netns")?)?;

    let direct = ("upstream directly (baseline)", "upstream", SocketAddr::new(upstream, 5353), auth_direct.pid());
    let proxy = SocketAddr::new(upstream, 53);
    let uncached = dns_table(
        &guest,
        "Caches off",
        "uncached",
        &[
            direct,
            ("sbx-net DNS proxy (port 53, redirected), cache off", "sbx-net", proxy, sole_dataplane_pid(&h.state_dir)?),
            ("dnsmasq forwarding, --cache-size=0 (peer)", "dnsmasq", SocketAddr::new(forwarder, 5300), dnsmasq.pid()),
            ("unbound forwarding, cache-max-ttl 0 (peer)", "unbound", SocketAddr::new(unbound_addr, 5301), unbound.pid()),
        ],
    )?;
    let stats_off = h.json(&["status", "--json"]);
    h.kill_daemon(libc::SIGTERM);
    std::fs::write(h.dir.join("daemon.toml"), BENCH_CACHED_CONFIG)?;
    h.start_daemon();
    let cached = dns_table(
        &guest,
        "Caches on",
        "cached",
        &[
            direct,
            ("sbx-net, answer cached", "sbx-net", proxy, sole_dataplane_pid(&h.state_dir)?),
            ("dnsmasq forwarding, --cache-size=1000 (peer)", "dnsmasq", SocketAddr::new(forwarder, 5302), dnsmasq_cached.pid()),
            ("unbound forwarding, caches on (peer)", "unbound", SocketAddr::new(unbound_addr, 5303), unbound_cached.pid()),
        ],
    )?;
    let stats_on = h.json(&["status", "--json"]);
    let better_peer = |t: &[(Figure, Figure, Figure)]| {
        let (d, u) = (t[2].0.median(), t[3].0.median());
        if d >= u { ("dnsmasq", d) } else { ("unbound", u) }
    };
    for (label, table) in [("cache off vs peers' caches off", &uncached), ("cached vs peers' caches on", &cached)] {
        let (peer, peer_qps) = better_peer(table);
        let ratio = table[1].0.median() / peer_qps;
        check_target("dns", &format!("queries/s ≥ 1.2× the better peer ({label})"), format!("{ratio:.2}× {peer}"), ratio >= 1.2);
    }
    let (a50, a99) = (uncached[1].1.median(), uncached[1].2.median());
    check_target("dns", &format!("added p50 ≤ 100 µs at {DNS_RATE} queries/s (cache off)"), format!("{a50:+.0} µs"), a50 <= 100.0);
    check_target("dns", &format!("added p99 ≤ 1 ms at {DNS_RATE} queries/s (cache off)"), format!("{a99:+.0} µs"), a99 <= 1000.0);
    println!("\nsbx-net answer-cache hit: added p50 {} µs, p99 {} µs (medians, min–max).", cached[1].1.spread(0), cached[1].2.spread(0));
    println!("\nDaemon counters, cache off: {}\n\nDaemon counters, cache on: {}", stats_off["dns"], stats_on["dns"]);
    Ok(())
}
