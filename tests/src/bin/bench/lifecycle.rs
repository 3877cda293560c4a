//! `bench lifecycle`: creating and deleting sandboxes through the daemon.

use super::*;

pub(crate) const LIFECYCLE_SANDBOXES: usize = 1000;
/// The daemon's default `tap_pool_size`.
pub(crate) const DEFAULT_TAP_POOL_SIZE: u64 = 8;
pub(crate) const BASELINE_TAPS: usize = 200;
pub(crate) const PACED_SANDBOXES: usize = 200;
pub(crate) const PACE: Duration = Duration::from_millis(25);

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

/// Rounds of each configuration (bare taps, the daemon), alternating.
pub(crate) const ROUNDS: usize = 5;

/// One round of the bare-tap baseline: create and delete times (ms).
pub(crate) struct BaseRound {
    create: Vec<f64>,
    delete: Vec<f64>,
}

/// One round of the daemon: a burst of creates, paced creates, deletes.
pub(crate) struct DaemonRound {
    /// Sorted, ms.
    burst: Vec<f64>,
    burst_total: Duration,
    paced: Vec<f64>,
    /// A request that does nothing (`sandbox show` of a name not there),
    /// paced as the creates are: the control socket's round trip to a
    /// daemon whose threads were asleep, which every create pays too.
    paced_noop: Vec<f64>,
    deletes: Vec<f64>,
    delete_answered: Duration,
    delete_total: Duration,
    /// (sandboxes, host used KiB, daemon RSS KiB, map memlock KiB).
    checkpoints: Vec<(usize, u64, u64, u64)>,
    after: (u64, u64, u64),
    status: serde_json::Value,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// The bare tap work any sandbox needs (TUNSETIFF + persist, MAC, two
/// addresses, up, delete), no daemon, in the daemon's namespace.
fn base_round(h: &sbx_net_tests::daemon::DaemonHarness) -> Result<BaseRound> {
    let mut create = Vec::with_capacity(BASELINE_TAPS);
    let mut delete = Vec::with_capacity(BASELINE_TAPS);
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
            create.push(ms(t.elapsed()));
            let t = Instant::now();
            netlink.delete_link(ifindex)?;
            delete.push(ms(t.elapsed()));
        }
        Ok(())
    })??;
    Ok(BaseRound { create: sorted(create), delete: sorted(delete) })
}

fn daemon_round(h: &sbx_net_tests::daemon::DaemonHarness, pid: u32) -> Result<DaemonRound> {
    use sbx_net::control::api::{call, Request};
    let timeout = Duration::from_secs(30);
    let create = |name: &str| -> Result<f64> {
        let t = Instant::now();
        call(&h.socket, &Request::SandboxCreate { name: name.to_string(), policy: "default".into(), tap: None, netns_guest: false, vm: None }, timeout)
            .with_context(|| format!("creating {name}"))?;
        Ok(ms(t.elapsed()))
    };
    // Every round starts with the pool full and no tap being removed.
    let settled = || {
        sbx_net_tests::try_wait_for(Duration::from_secs(120), || {
            let status = call(&h.socket, &Request::Status, timeout).ok()?;
            (status["prewarmed_taps"].as_u64()? >= DEFAULT_TAP_POOL_SIZE && status["taps_being_removed"].as_u64() == Some(0)).then_some(())
        })
        .context("the daemon's tap pool did not refill (or deleted taps were not removed) within 120 s")
    };
    settled()?;
    let mut burst = Vec::with_capacity(LIFECYCLE_SANDBOXES);
    let mut checkpoints = vec![(0usize, used_kb(), rss_kb(pid), map_memlock_kb(pid))];
    let names: Vec<String> = (0..LIFECYCLE_SANDBOXES).map(|i| format!("bench-{i}")).collect();
    let started = Instant::now();
    for (i, name) in names.iter().enumerate() {
        burst.push(create(name)?);
        if (i + 1) % (LIFECYCLE_SANDBOXES / 4) == 0 {
            checkpoints.push((i + 1, used_kb(), rss_kb(pid), map_memlock_kb(pid)));
        }
    }
    let burst_total = started.elapsed();
    let status = call(&h.socket, &Request::Status, timeout)?;
    // Paced creates (one every PACE), the way sandboxes arrive on a busy
    // host: the pre-warmed pool keeps up, so no create waits for a TCX
    // attach. Started with the pool refilled after the burst.
    settled()?;
    let mut paced_noop = Vec::with_capacity(PACED_SANDBOXES);
    for _ in 0..PACED_SANDBOXES {
        let next = Instant::now() + PACE;
        let t = Instant::now();
        let answer = call(&h.socket, &Request::SandboxShow { name: "not-there".into() }, timeout);
        paced_noop.push(ms(t.elapsed()));
        anyhow::ensure!(answer.is_err(), "`sandbox show` of a sandbox that is not there answered {answer:?}");
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let mut paced = Vec::with_capacity(PACED_SANDBOXES);
    let paced_names: Vec<String> = (0..PACED_SANDBOXES).map(|i| format!("paced-{i}")).collect();
    for name in &paced_names {
        let next = Instant::now() + PACE;
        paced.push(create(name)?);
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
    Ok(DaemonRound { burst: sorted(burst), burst_total, paced: sorted(paced), paced_noop: sorted(paced_noop), deletes: sorted(deletes), delete_answered, delete_total, checkpoints, after, status })
}

pub(crate) fn lifecycle() -> Result<()> {
    use sbx_net_tests::daemon::DaemonHarness;

    println!("## Sandbox lifecycle (`cargo xtask bench lifecycle`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    let h = DaemonHarness::new("bench-life", &[]);
    let pid = h.daemon_pid().context("daemon pid")?;

    // Baseline rounds and daemon rounds alternate, same namespace.
    let mut bases = Vec::new();
    let mut rounds = Vec::new();
    alternating(2, ROUNDS, |config| {
        if config == 0 {
            bases.push(base_round(&h)?);
        } else {
            rounds.push(daemon_round(&h, pid)?);
        }
        Ok(())
    })?;

    const S: &str = "lifecycle";
    let per = |f: &dyn Fn(&DaemonRound) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let base_create = record(S, "bare tap create p50", "ms", Better::Lower, &bases.iter().map(|b| percentile(&b.create, 0.5)).collect::<Vec<_>>());
    let base_create_p99 = bases.iter().map(|b| percentile(&b.create, 0.99)).collect::<Vec<_>>();
    let base_delete = record(S, "bare tap delete p50", "ms", Better::Lower, &bases.iter().map(|b| percentile(&b.delete, 0.5)).collect::<Vec<_>>());
    let base_delete_p99 = bases.iter().map(|b| percentile(&b.delete, 0.99)).collect::<Vec<_>>();
    let burst_total = record(S, "burst of 1000 creates", "s", Better::Lower, &per(&|r| r.burst_total.as_secs_f64()));
    let burst_p50 = record(S, "burst create p50", "ms", Better::Lower, &per(&|r| percentile(&r.burst, 0.5)));
    let burst_p99 = record(S, "burst create p99", "ms", Better::Lower, &per(&|r| percentile(&r.burst, 0.99)));
    let paced_p50 = record(S, "paced create p50", "ms", Better::Lower, &per(&|r| percentile(&r.paced, 0.5)));
    let paced_p99 = record(S, "paced create p99", "ms", Better::Lower, &per(&|r| percentile(&r.paced, 0.99)));
    let noop_p50 = record(S, "paced no-op request p50", "ms", Better::Lower, &per(&|r| percentile(&r.paced_noop, 0.5)));
    let noop_p99 = per(&|r| percentile(&r.paced_noop, 0.99));
    let delete_p50 = record(S, "delete p50", "ms", Better::Lower, &per(&|r| percentile(&r.deletes, 0.5)));
    let delete_p99 = per(&|r| percentile(&r.deletes, 0.99));
    let delete_answered = per(&|r| r.delete_answered.as_secs_f64());
    let delete_total = per(&|r| r.delete_total.as_secs_f64());
    let spread = |v: &[f64], d: usize| Figure { suite: S.into(), name: String::new(), unit: String::new(), better: Better::Lower, runs: v.to_vec() }.spread(d);

    println!(
        "### Time per sandbox ({LIFECYCLE_SANDBOXES} created back to back, then {PACED_SANDBOXES} paced, then all deleted; baseline {BASELINE_TAPS} bare taps; {ROUNDS} alternating rounds each, median (min–max) over the rounds)\n"
    );
    println!("| operation | median ms | p99 ms | total s | median / baseline |");
    println!("|---|---:|---:|---:|---:|");
    let row = |label: &str, p50: &Figure, p99: &[f64], total: Option<&[f64]>, base: &Figure| {
        let total = total.map_or("–".to_string(), |t| spread(t, 1));
        println!("| {label} | {} | {} | {total} | {:.2} |", p50.spread(2), spread(p99, 2), p50.median() / base.median());
    };
    row("baseline: bare tap create (no daemon)", &base_create, &base_create_p99, None, &base_create);
    row(
        &format!("`sandbox create`, burst of {LIFECYCLE_SANDBOXES} back to back (tap, addresses, maps, pinned TCX link, nft element, CA, state file)"),
        &burst_p50,
        &burst_p99.runs,
        Some(&burst_total.runs),
        &base_create,
    );
    row(&format!("`sandbox create`, paced one per {} ms ({PACED_SANDBOXES} sandboxes, on top of the {LIFECYCLE_SANDBOXES})", PACE.as_millis()), &paced_p50, &paced_p99.runs, None, &base_create);
    row(
        &format!("a request that does nothing (`sandbox show` of a name not there), paced one per {} ms: the control socket's round trip", PACE.as_millis()),
        &noop_p50,
        &noop_p99,
        None,
        &base_create,
    );
    row("baseline: bare tap delete", &base_delete, &base_delete_p99, None, &base_delete);
    row("`sandbox delete`", &delete_p50, &delete_p99, Some(&delete_answered), &base_delete);
    println!(
        "\nMean per create over the burst: {} ms. Deletes answered in {} s; all {LIFECYCLE_SANDBOXES} taps unregistered after {} s.\n",
        spread(&per(&|r| r.burst_total.as_secs_f64() * 1000.0 / LIFECYCLE_SANDBOXES as f64), 2),
        spread(&delete_answered, 1),
        spread(&delete_total, 1)
    );
    check_target(S, "paced create median ≤ 2 ms", format!("{} ms", paced_p50.spread(2)), paced_p50.median() <= 2.0);
    check_target(S, "paced create p99 ≤ 10 ms", format!("{} ms", paced_p99.spread(2)), paced_p99.median() <= 10.0);
    check_target(S, "burst of 1000 creates ≤ 5 s", format!("{} s", burst_total.spread(1)), burst_total.median() <= 5.0);

    let first = &rounds[0];
    println!("\n### Memory per sandbox (checkpoints while creating, first round)\n");
    println!("Kernel + daemon = host memory in use outside the page cache (`MemTotal − MemFree − Buffers − Cached − SReclaimable`); of which daemon = its RSS; BPF maps = `memlock` of its map fds. Per sandbox = growth over the previous checkpoint / sandboxes added; equal slopes = linear.\n");
    println!("| sandboxes | kernel + daemon MiB | per sandbox KiB | daemon RSS MiB | per sandbox KiB | BPF maps MiB |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (i, c) in first.checkpoints.iter().enumerate() {
        let (n, used, rss, maps) = *c;
        let (per_used, per_rss) = if i == 0 {
            ("–".to_string(), "–".to_string())
        } else {
            let (pn, pu, pr, _) = first.checkpoints[i - 1];
            let dn = (n - pn) as f64;
            (format!("{:.1}", (used as f64 - pu as f64) / dn), format!("{:.1}", (rss as f64 - pr as f64) / dn))
        };
        println!("| {n} | {:.1} | {per_used} | {:.1} | {per_rss} | {:.1} |", used as f64 / 1024.0, rss as f64 / 1024.0, maps as f64 / 1024.0);
    }
    for (k, r) in rounds.iter().enumerate() {
        println!(
            "| 0 (after deleting all, round {}) | {:.1} | – | {:.1} | – | {:.1} |",
            k + 1,
            r.after.0 as f64 / 1024.0,
            r.after.1 as f64 / 1024.0,
            r.after.2 as f64 / 1024.0
        );
    }
    println!(
        "\nAt {LIFECYCLE_SANDBOXES} sandboxes the daemon reported {} IPv4 + {} IPv6 policy entries.",
        first.status["maps"]["policy_v4_entries"], first.status["maps"]["policy_v6_entries"]
    );
    Ok(())
}
