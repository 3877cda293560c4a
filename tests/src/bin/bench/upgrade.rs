//! `bench upgrade`: load across a data-plane upgrade, and crash recovery.

use super::*;

/// HTTPS requests per second (over `UPGRADE_CONNECTIONS` kept-alive
/// connections to a credential host) and DNS queries per second the guest
/// sends while the data plane is upgraded.
pub(crate) const UPGRADE_HTTPS_RATE: u32 = 200;
pub(crate) const UPGRADE_CONNECTIONS: usize = 8;
pub(crate) const UPGRADE_DNS_RATE: u32 = 1000;
/// The run; the upgrade comes in its middle.
pub(crate) const UPGRADE_SECONDS: u64 = 10;
/// Data-plane crashes measured (each restarts it).
pub(crate) const CRASHES: usize = 5;

/// One request or query: when it was sent (ms into the run), how long it
/// took, whether it succeeded.
#[derive(Clone, Copy)]
pub(crate) struct Sample {
    at_ms: u64,
    latency_us: f64,
    ok: bool,
}

/// `cargo xtask bench upgrade`: steady HTTPS and DNS load from a netns
/// guest across `sbx-net upgrade` (the listeners handed to a new data plane
/// while the old one drains): failures (target 0) and the p99 latency in
/// the second around the switch against the steady state of the same run;
/// then the time a `kill -9`ed data plane takes to serve again.
pub(crate) fn upgrade_bench() -> Result<()> {
    use sbx_net_tests::daemon::DaemonHarness;
    use sbx_net_tests::https::{HttpsEcho, TestCa};
    use sbx_net_tests::WorldDns;

    println!("## Upgrade under load (`cargo xtask bench upgrade`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    let dir = std::env::temp_dir().join(unique_name("bench-upgrade"));
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new(&dir);
    let secret = "sbx-bench-secret-upgrade";
    std::fs::write(dir.join("token"), secret)?;
    let server: IpAddr = Ipv4Addr::new(198, 51, 100, 40).into();
    let policy = format!(
        "name = \"bench\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\"]\n\
         [[credentials]]\nname = \"api\"\nhosts = [\"api.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{}\" }}\n",
        dir.join("token").display()
    );
    let upstream = format!("--upstream-dns={}:53", sbx_net_tests::UPLINK_WORLD_V4);
    let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
    // The guest's DNS load is the default per-sandbox meter's own rate
    // (1000/s): the meter stays on, well above it, so what is measured is
    // the upgrade's handover and not the meter's edge.
    let config = format!("dns_queries_per_second_per_sandbox = {}\n", 4 * UPGRADE_DNS_RATE);
    let h = DaemonHarness::with_args("bench-upgrade", &[("bench.toml", policy.as_str())], Some(&config), &[upstream.as_str(), upstream_ca.as_str()]);
    h.topology.add_world_address(server);
    let _dns = WorldDns::start(&h.topology.world, &["api.test,198.51.100.40,300".into()], &[]);
    let _upstream = HttpsEcho::start(&h.topology.world, SocketAddr::new(server, 443), &["api.test"], &ca, secret);
    let g = h.create_guest("bench", "bench");
    let guest = NetNs::open(g["netns"].as_str().context("netns")?)?;
    let sandbox_ca = std::path::PathBuf::from(g["ca_cert"].as_str().context("ca_cert")?);
    let resolver = SocketAddr::new(g["gateway_ipv4"].as_str().context("gateway")?.parse()?, 53);
    sbx_net_tests::dig(guest.name(), &["api.test"]);

    let before = h.json(&["status", "--json"])["dataplane"]["pid"].clone();
    let start = Instant::now();
    let (switch_tx, switch_rx) = std::sync::mpsc::channel();
    let upgrader = {
        let h = &h;
        move || {
            std::thread::sleep(Duration::from_secs(UPGRADE_SECONDS / 2));
            let at = start.elapsed();
            let out = h.cli(&["upgrade"]);
            let _ = switch_tx.send((at, start.elapsed(), out));
        }
    };
    let (https, dns) = std::thread::scope(|scope| {
        scope.spawn(upgrader);
        guest.run(|| upgrade_load(SocketAddr::new(server, 443), "api.test", &sandbox_ca, resolver, start))
    })?;
    let (https, dns) = (https?, dns?);
    let (asked, answered, out) = switch_rx.recv()?;
    if !out.status.success() {
        bail!("sbx-net upgrade failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let after = h.json(&["status", "--json"])["dataplane"].clone();
    let switch_ms = asked.as_millis() as u64;
    println!(
        "`sbx-net upgrade` at {:.1} s into a {UPGRADE_SECONDS} s run (answered after {} ms): data plane {before} → {} ({}).\n",
        asked.as_secs_f64(),
        (answered - asked).as_millis(),
        after["pid"],
        String::from_utf8_lossy(&out.stdout).trim()
    );
    println!("| load | sent | failed | steady p50 µs | steady p99 µs | p99 µs in the second around the switch | around / steady |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut failures = Vec::new();
    for (key, what, samples) in [
        ("https", format!("HTTPS GET, {UPGRADE_HTTPS_RATE}/s over {UPGRADE_CONNECTIONS} kept-alive connections (credential host)"), &https),
        ("dns", format!("DNS over UDP, {UPGRADE_DNS_RATE}/s"), &dns),
    ] {
        let failed = samples.iter().filter(|s| !s.ok).count();
        // Steady: the whole run after a 1 s warm-up, but for the 2 s
        // around the switch; around: the second centred on it.
        let sorted = |keep: &dyn Fn(&Sample) -> bool| {
            let mut v: Vec<f64> = samples.iter().filter(|s| s.ok && keep(s)).map(|s| s.latency_us).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let steady = sorted(&|s| s.at_ms >= 1000 && (s.at_ms + 1000 < switch_ms || s.at_ms > switch_ms + 1000));
        let around = sorted(&|s| s.at_ms + 500 >= switch_ms && s.at_ms <= switch_ms + 500);
        if steady.is_empty() || around.is_empty() {
            bail!("{what}: no answered samples to compare ({} steady, {} around the switch)", steady.len(), around.len());
        }
        let (p50, p99, around99) = (percentile(&steady, 0.5), percentile(&steady, 0.99), percentile(&around, 0.99));
        println!("| {what} | {} | **{failed}** | {p50:.0} | {p99:.0} | {around99:.0} | {:.1}× |", samples.len(), around99 / p99);
        record("upgrade", &format!("upgrade {key} failed"), "requests", Better::Lower, &[failed as f64]);
        record("upgrade", &format!("upgrade {key} p99 around the switch"), "µs", Better::Lower, &[around99]);
        failures.push((key, failed, samples.len()));
    }
    println!();
    for (key, failed, sent) in failures {
        check_target("upgrade", &format!("0 failed {key} across the upgrade"), format!("{failed} of {sent}"), failed == 0);
    }
    println!();

    // kill -9 of the data plane: the daemon holds the listeners open and
    // starts another; a query sent right after the kill waits in the socket
    // buffer and is answered by the new one.
    let mut recoveries = Vec::new();
    for _ in 0..CRASHES {
        let pid = h.json(&["status", "--json"])["dataplane"]["pid"].as_i64().context("data plane pid")?;
        let query = sbx_net_tests::dns_attack::query(&sbx_net_tests::dns_attack::labels("api.test"), 1);
        // SAFETY: kill on the data plane's pid, from the daemon's status.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let killed = Instant::now();
        let reply = sbx_net_tests::dns_attack::udp_exchange(&guest, resolver, &query, Duration::from_secs(5));
        let took = killed.elapsed();
        if reply.is_none() {
            bail!("no answer within 5 s of killing the data plane");
        }
        recoveries.push(took.as_secs_f64() * 1000.0);
        sbx_net_tests::wait_until(Duration::from_secs(10), "the daemon sees the new data plane", || h.json(&["status", "--json"])["dataplane"]["running"] == true);
    }
    recoveries.sort_by(f64::total_cmp);
    println!("### `kill -9` of the data plane ({CRASHES} times)\n");
    println!("| query sent right after the kill: answered after (ms) | median | max |");
    println!("|---|---:|---:|");
    println!("| {} | **{:.0}** | {:.0} |", recoveries.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "), recoveries[CRASHES / 2], recoveries[CRASHES - 1]);
    println!("\nNothing is refused meanwhile: the daemon holds the listening sockets.\n");
    record("upgrade", "crash to served again", "ms", Better::Lower, &recoveries);
    check_target("upgrade", "a crashed data plane serves again within 200 ms", format!("max {:.0} ms", recoveries[CRASHES - 1]), recoveries[CRASHES - 1] <= 200.0);
    println!();
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The guest side of [`upgrade_bench`]: runs in the guest namespace.
pub(crate) fn upgrade_load(server: SocketAddr, name: &str, ca: &std::path::Path, resolver: SocketAddr, start: Instant) -> (Result<Vec<Sample>>, Result<Vec<Sample>>) {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return (Err(e.into()), Err(anyhow::anyhow!("no runtime"))),
    };
    let end = start + Duration::from_secs(UPGRADE_SECONDS);
    let at_ms = move |t: Instant| t.duration_since(start).as_millis() as u64;
    rt.block_on(async move {
        let config = sbx_net_tests::https::client_config(ca);
        let https = async {
            let mut conns = Vec::new();
            for _ in 0..UPGRADE_CONNECTIONS {
                conns.push(sbx_net_tests::https::KeepAlive::connect(server, name, config.clone()).await?);
            }
            let per_conn = Duration::from_secs_f64(UPGRADE_CONNECTIONS as f64 / f64::from(UPGRADE_HTTPS_RATE));
            let tasks: Vec<_> = conns
                .into_iter()
                .enumerate()
                .map(|(i, mut c)| {
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + per_conn.mul_f64(i as f64 / UPGRADE_CONNECTIONS as f64), per_conn);
                        while Instant::now() < end {
                            tick.tick().await;
                            let sent = Instant::now();
                            let ok = matches!(tokio::time::timeout(Duration::from_secs(5), c.get("/bench")).await, Ok(Ok(200)));
                            out.push(Sample { at_ms: at_ms(sent), latency_us: sent.elapsed().as_secs_f64() * 1e6, ok });
                        }
                        out
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await?);
            }
            Ok::<_, anyhow::Error>(all)
        };
        let dns = async {
            let socket = std::sync::Arc::new(tokio::net::UdpSocket::bind("0.0.0.0:0").await?);
            socket.connect(resolver).await?;
            let answered: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u16, Instant>>> = Default::default();
            let reader = {
                let (socket, answered) = (socket.clone(), answered.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 1500];
                    while let Ok(n) = socket.recv(&mut buf).await {
                        if n >= 4 && buf[3] & 0x0f == 0 {
                            answered.lock().unwrap().insert(u16::from_be_bytes([buf[0], buf[1]]), Instant::now());
                        }
                    }
                })
            };
            let template = sbx_net_tests::dns_attack::query(&sbx_net_tests::dns_attack::labels(name), 1);
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(UPGRADE_DNS_RATE)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut id: u16 = 0;
            let mut sent = Vec::new();
            while Instant::now() < end {
                tick.tick().await;
                id = id.wrapping_add(1);
                let mut q = template.clone();
                q[..2].copy_from_slice(&id.to_be_bytes());
                let now = Instant::now();
                let _ = socket.send(&q).await;
                sent.push((id, now));
            }
            // Answers still on their way get 3 s.
            tokio::time::sleep(Duration::from_secs(3)).await;
            reader.abort();
            let answered = answered.lock().unwrap();
            Ok::<_, anyhow::Error>(
                sent.into_iter()
                    .map(|(id, at)| match answered.get(&id).filter(|t| **t >= at) {
                        Some(t) => Sample { at_ms: at_ms(at), latency_us: t.duration_since(at).as_secs_f64() * 1e6, ok: true },
                        None => Sample { at_ms: at_ms(at), latency_us: 0.0, ok: false },
                    })
                    .collect(),
            )
        };
        tokio::join!(https, dns)
    })
}
