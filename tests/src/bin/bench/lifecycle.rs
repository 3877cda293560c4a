//! `bench lifecycle`: creating and deleting sandboxes through the daemon.

use super::*;

pub(crate) const LIFECYCLE_SANDBOXES: usize = 1000;
/// The daemon's default `tap_pool_size`.
pub(crate) const DEFAULT_TAP_POOL_SIZE: u64 = 8;
pub(crate) const BASELINE_TAPS: usize = 200;
pub(crate) const PACED_SANDBOXES: usize = 200;
pub(crate) const PACE: Duration = Duration::from_millis(25);

/// One row of the lifecycle time table: median, p99 and max of `sorted`
/// (ms), the total when there is one, and the median over `baseline_median`.
pub(crate) fn time_row(label: &str, sorted: &[f64], total: Option<Duration>, baseline_median: f64) {
    let total = total.map_or("–".to_string(), |t| format!("{:.1}", t.as_secs_f64()));
    println!(
        "| {label} | {:.2} | {:.2} | {:.2} | {total} | {:.2} |",
        percentile(sorted, 0.5),
        percentile(sorted, 0.99),
        sorted[sorted.len() - 1],
        percentile(sorted, 0.5) / baseline_median
    );
}

pub(crate) fn meminfo_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Memory in use outside the page cache (as `free` computes "used").
pub(crate) fn used_kb() -> u64 {
    meminfo_kb("MemTotal") - meminfo_kb("MemFree") - meminfo_kb("Buffers") - meminfo_kb("Cached") - meminfo_kb("SReclaimable")
}

pub(crate) fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sum of `memlock` of the BPF maps the daemon holds (its fdinfo).
pub(crate) fn map_memlock_kb(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return 0 };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|t| t.contains("map_type:"))
        .filter_map(|t| t.lines().find(|l| l.starts_with("memlock:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .sum::<u64>()
        / 1024
}

pub(crate) fn lifecycle() -> Result<()> {
    use sbx_net::control::api::{call, Request};
    use sbx_net_tests::daemon::DaemonHarness;

    println!("## Sandbox lifecycle (`cargo xtask bench lifecycle`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    let h = DaemonHarness::new("bench-life", &[]);
    let pid = h.daemon_pid().context("daemon pid")?;

    // Baseline, same run, same namespace: the bare tap work any sandbox
    // needs (TUNSETIFF + persist, MAC, two addresses, up, delete), no daemon.
    let mut base = Vec::with_capacity(BASELINE_TAPS);
    let mut base_delete = Vec::with_capacity(BASELINE_TAPS);
    let pools = AddressPools { ipv4: Ipv4Addr::new(10, 201, 0, 0), ..AddressPools::default() };
    h.topology.host.run(|| -> Result<()> {
        let netlink = sbx_vmm::Netlink::new()?;
        for i in 0..BASELINE_TAPS {
            let mut spec = SandboxSpec::new(i as u32 + 1, "base", &pools)?;
            spec.tap = format!("base-{i}");
            let t = Instant::now();
            let (tap, ifindex) = open_host_tap(&netlink, &spec)?;
            tap.set_persist(true)?;
            drop(tap);
            base.push(ms(t.elapsed()));
            let t = Instant::now();
            netlink.delete_link(ifindex)?;
            base_delete.push(ms(t.elapsed()));
        }
        Ok(())
    })??;

    let timeout = Duration::from_secs(30);
    let mut creates = Vec::with_capacity(LIFECYCLE_SANDBOXES);
    let mut checkpoints = vec![(0usize, used_kb(), rss_kb(pid), map_memlock_kb(pid))];
    let names: Vec<String> = (0..LIFECYCLE_SANDBOXES).map(|i| format!("bench-{i}")).collect();
    let started = Instant::now();
    for (i, name) in names.iter().enumerate() {
        let t = Instant::now();
        call(&h.socket, &Request::SandboxCreate { name: name.clone(), policy: "default".into(), tap: None, netns_guest: false, vm: None }, timeout)
            .with_context(|| format!("creating {name}"))?;
        creates.push(ms(t.elapsed()));
        if (i + 1) % (LIFECYCLE_SANDBOXES / 4) == 0 {
            checkpoints.push((i + 1, used_kb(), rss_kb(pid), map_memlock_kb(pid)));
        }
    }
    let create_total = started.elapsed();
    let status = call(&h.socket, &Request::Status, timeout)?;
    // Paced creates (one every PACE), the way sandboxes arrive on a busy
    // host: the pre-warmed pool keeps up, so no create waits for a TCX attach.
    let mut paced = Vec::with_capacity(PACED_SANDBOXES);
    let paced_names: Vec<String> = (0..PACED_SANDBOXES).map(|i| format!("paced-{i}")).collect();
    // Start with the pool refilled after the burst.
    sbx_net_tests::try_wait_for(Duration::from_secs(60), || {
        let ready = call(&h.socket, &Request::Status, timeout).ok()?["prewarmed_taps"].as_u64()?;
        (ready >= DEFAULT_TAP_POOL_SIZE).then_some(())
    })
    .context("the daemon's pre-warmed tap pool did not refill within 60 s")?;
    for name in &paced_names {
        let next = Instant::now() + PACE;
        let t = Instant::now();
        call(&h.socket, &Request::SandboxCreate { name: name.clone(), policy: "default".into(), tap: None, netns_guest: false, vm: None }, timeout)
            .with_context(|| format!("creating {name}"))?;
        paced.push(ms(t.elapsed()));
        // Pacing: one create every PACE.
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    for name in &paced_names {
        call(&h.socket, &Request::SandboxDelete { name: name.clone() }, timeout)?;
    }
    let mut deletes = Vec::with_capacity(LIFECYCLE_SANDBOXES);
    let started = Instant::now();
    for name in &names {
        let t = Instant::now();
        call(&h.socket, &Request::SandboxDelete { name: name.clone() }, timeout).with_context(|| format!("deleting {name}"))?;
        deletes.push(ms(t.elapsed()));
    }
    let delete_answered = started.elapsed();
    // Deletes answer before the tap is unregistered: wait for the reaper.
    sbx_net_tests::try_wait_for(Duration::from_secs(120), || {
        (call(&h.socket, &Request::Status, timeout).ok()?["taps_being_removed"].as_u64() == Some(0)).then_some(())
    })
    .context("taps of deleted sandboxes still being removed after 120 s")?;
    let delete_total = started.elapsed();
    // The kernel frees deleted links and maps in deferred work: the memory
    // reading waits a fixed second for that, as in every earlier run of
    // this benchmark (there is no signal that it is done).
    std::thread::sleep(Duration::from_secs(1));
    let after = (used_kb(), rss_kb(pid), map_memlock_kb(pid));

    for v in [&mut base, &mut base_delete, &mut creates, &mut deletes, &mut paced] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    println!("### Time per sandbox ({LIFECYCLE_SANDBOXES} created, then deleted; baseline {BASELINE_TAPS} bare taps)\n");
    println!("| operation | median ms | p99 ms | max ms | total s | median / baseline |");
    println!("|---|---:|---:|---:|---:|---:|");
    let create_base = percentile(&base, 0.5);
    let delete_base = percentile(&base_delete, 0.5);
    time_row("baseline: bare tap create (no daemon)", &base, None, create_base);
    time_row("`sandbox create` (tap, addresses, maps, pinned TCX link, nft element, state file)", &creates, Some(create_total), create_base);
    time_row(
        &format!("`sandbox create`, paced one per {} ms ({PACED_SANDBOXES} sandboxes, on top of the {LIFECYCLE_SANDBOXES})", PACE.as_millis()),
        &paced,
        None,
        create_base,
    );
    time_row("baseline: bare tap delete", &base_delete, None, delete_base);
    time_row("`sandbox delete`", &deletes, Some(delete_answered), delete_base);
    println!(
        "\nMean per create over the burst: {:.2} ms ({LIFECYCLE_SANDBOXES} in {:.1} s). Deletes answered in {:.1} s; all {LIFECYCLE_SANDBOXES} taps unregistered after {:.1} s.",
        create_total.as_secs_f64() * 1000.0 / LIFECYCLE_SANDBOXES as f64,
        create_total.as_secs_f64(),
        delete_answered.as_secs_f64(),
        delete_total.as_secs_f64()
    );
    println!("\nTarget: ≤ 10 ms per create (median and p99 above).\n");
    println!("### Memory per sandbox (checkpoints while creating)\n");
    println!("Kernel + daemon = host memory in use outside the page cache (`MemTotal − MemFree − Buffers − Cached − SReclaimable`); of which daemon = its RSS; BPF maps = `memlock` of its map fds. Per sandbox = growth over the previous checkpoint / sandboxes added; equal slopes = linear.\n");
    println!("| sandboxes | kernel + daemon MiB | per sandbox KiB | daemon RSS MiB | per sandbox KiB | BPF maps MiB |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (i, c) in checkpoints.iter().enumerate() {
        let (n, used, rss, maps) = *c;
        let (per_used, per_rss) = if i == 0 {
            ("–".to_string(), "–".to_string())
        } else {
            let (pn, pu, pr, _) = checkpoints[i - 1];
            let dn = (n - pn) as f64;
            (format!("{:.1}", (used as f64 - pu as f64) / dn), format!("{:.1}", (rss as f64 - pr as f64) / dn))
        };
        println!("| {n} | {:.1} | {per_used} | {:.1} | {per_rss} | {:.1} |", used as f64 / 1024.0, rss as f64 / 1024.0, maps as f64 / 1024.0);
    }
    println!(
        "| 0 (after deleting all) | {:.1} | – | {:.1} | – | {:.1} |",
        after.0 as f64 / 1024.0, after.1 as f64 / 1024.0, after.2 as f64 / 1024.0
    );
    println!(
        "\nAt {LIFECYCLE_SANDBOXES} sandboxes the daemon reported {} IPv4 + {} IPv6 policy entries.",
        status["maps"]["policy_v4_entries"], status["maps"]["policy_v6_entries"]
    );
    Ok(())
}
