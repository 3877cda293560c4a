//! `cargo xtask demo`: the real daemon in a private host namespace, a
//! sandbox on the embedded default policy with a netns guest, a private
//! "internet", real traffic from the guest, the drops with the rules that
//! decided them, `policy test`, `status`, the nftables table, and a kill -9
//! of the daemon that leaves enforcement in place. Everything lives in
//! namespaces made here and is removed at the end (`daemon --cleanup`).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sbx_net::observe::record::FlowRecord;
use sbx_net::policy::Policy;
use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::{curl, ping, run_in, tcp_connects, try_wait_for, WorldServers};

/// Every program the demo runs: a missing one stops it before it starts,
/// naming its package, instead of showing an empty section later.
const PROGRAMS: &[&str] = &["ip", "nft", "curl", "ping", "nc", "dig", "dnsmasq"];

fn show(what: &str, ok: bool) {
    println!("   {:<56} {}", what, if ok { "ALLOWED" } else { "blocked" });
}

/// `nft list table inet sbx_net` in the daemon's namespace; an error
/// unless it printed the table.
fn nft_table(h: &DaemonHarness) -> Result<String> {
    let out = run_in(h.topology.host.name(), "nft", &["list", "table", "inet", "sbx_net"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("nft list table inet sbx_net failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    if table.trim().is_empty() {
        bail!("nft list table inet sbx_net printed nothing");
    }
    Ok(table)
}

/// How many records the daemon's history has of `sandbox` to `dst:port`.
fn records_to(h: &DaemonHarness, sandbox: &str, dst: IpAddr, port: u16) -> usize {
    let out = h.cli(&["inspect", "--sandbox", sandbox, "-o", "json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<FlowRecord>(l).ok())
        .filter(|r| r.dst_ip == Some(dst) && r.dst_port == port)
        .count()
}

/// A microVM on a sandbox tap: the project's test guest under KVM, its own
/// TCP/IP stack (smoltcp) behind virtio-net, running a probe; each result
/// line the guest printed on its console, as allowed or blocked.
fn microvm(h: &DaemonHarness, github: IpAddr, unlisted: IpAddr, metadata: IpAddr, anthropic: IpAddr) -> Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("\n== microVM: skipped (no /dev/kvm on this machine)");
        return Ok(());
    }
    let probe = format!(
        "timeout 3000\nping {github}\ntcp {github}:22 hello\nhttp {github}:80 /\n\
         timeout 1500\ntcp {unlisted}:22 x\nping {metadata}\ntcp {anthropic}:22 before\n\
         timeout 3000\nresolve api.anthropic.com\ntcp {anthropic}:22 after\nresolve evil.example.com\nspoof 10.9.9.9 {github}:22 x\n"
    );
    let file = std::env::temp_dir().join(sbx_net_tests::unique_name("demo-probe"));
    std::fs::write(&file, &probe)?;
    println!("\n$ sbx-net sandbox create vm --policy default --vm --probe demo.probe   (a KVM microVM on the sandbox's tap)");
    let info = h.json(&["sandbox", "create", "vm", "--policy", "default", "--vm", "--probe", file.to_str().context("probe path")?]);
    let _ = std::fs::remove_file(&file);
    println!("   VMM pid {} ({}), console {}", info["vm"]["pid"], info["vm"]["state"].as_str().unwrap_or(""), info["vm"]["console"].as_str().unwrap_or(""));
    let console = std::path::PathBuf::from(info["vm"]["console"].as_str().context("console")?);
    let text = try_wait_for(Duration::from_secs(60), || std::fs::read_to_string(&console).ok().filter(|c| c.contains(r#""event":"done""#)))
        .context("the VM's probe did not finish within 60 s")?;
    println!("== traffic from the microVM (its own stack: smoltcp in ring 3, virtio-net on the tap; the same classifier and proxies)");
    for line in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        let op = line["op"].as_str().unwrap_or("");
        let what = match op {
            "" => {
                if line["event"] == "boot" {
                    println!("   guest up: mac {} ipv4 {} devices {}", line["mac"].as_str().unwrap_or(""), line["ipv4"].as_str().unwrap_or(""), line["devices"]);
                }
                continue;
            }
            "resolve" => format!("resolve {}  {}", line["name"].as_str().unwrap_or(""), line["addrs"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" ")).unwrap_or_else(|| line["error"].as_str().unwrap_or("").to_string())),
            "spoof" => format!("udp from forged {} to {} (sent; dropped on the tap)", line["from"].as_str().unwrap_or(""), line["to"].as_str().unwrap_or("")),
            "http" => format!("http GET {}{}  -> {}", line["to"].as_str().unwrap_or(""), line["path"].as_str().unwrap_or(""), line["status"]),
            _ => format!("{op} {}", line["to"].as_str().unwrap_or("")),
        };
        let ok = match op {
            "tcp" => line["connected"] == true,
            "spoof" => false,
            _ => line["ok"] == true,
        };
        show(&what, ok);
    }
    print!("{}", h.cli_ok(&["inspect", "--sandbox", "vm", "--verdict", "denied", "--not", "--protocol", "icmpv6", "--last", "6", "--no-color"]));
    print!("{}", h.cli_ok(&["sandbox", "delete", "vm"]));
    Ok(())
}

fn main() -> Result<()> {
    for program in PROGRAMS {
        sbx_net_tests::tools::locate(program).map_err(anyhow::Error::msg)?;
    }
    let policy = Policy::embedded_default();
    println!("== sbx-net demo: embedded policy {:?} (default {})", policy.name, policy.default.as_str());
    for rule in policy.cidr_rules() {
        println!("   {}", rule.describe());
    }
    println!("   ({} domain rules, enforced through the DNS proxy; none opens an address by itself)", policy.domain_rules().count());

    let upstream = format!("--upstream-dns={}:53", sbx_net_tests::UPLINK_WORLD_V4);
    let mut h = DaemonHarness::with_args("demo", &[], None, &[upstream.as_str()]);
    println!("\n== sbx-net daemon running in namespace {} (socket {})", h.topology.host.name(), h.socket.display());
    // The demo world impersonates a few internet hosts, inside its own namespace.
    let github: IpAddr = Ipv4Addr::new(140, 82, 112, 3).into();
    let github_v6: IpAddr = "2606:50c0:8000::154".parse()?;
    let unlisted: IpAddr = Ipv4Addr::new(203, 0, 113, 7).into();
    let metadata: IpAddr = Ipv4Addr::new(169, 254, 169, 254).into();
    let private: IpAddr = Ipv4Addr::new(10, 0, 0, 5).into();
    let anthropic: IpAddr = Ipv4Addr::new(203, 0, 113, 10).into();
    let world = [github, github_v6, unlisted, metadata, private, anthropic];
    for ip in world {
        h.topology.add_world_address(ip);
    }
    let _servers = WorldServers::start(&h.topology.world, &world, 80);
    let _ssh = WorldServers::start(&h.topology.world, &world, 22);
    // The demo's "internet DNS": authoritative answers for a few names,
    // one of them pointing at the cloud metadata address (rebinding).
    let zone: Vec<String> = [
        "--local=/com/",
        "--host-record=api.anthropic.com,203.0.113.10,60",
        "--host-record=evil.example.com,203.0.113.7,60",
        "--host-record=github.com,140.82.112.3,60",
        "--host-record=api.github.com,169.254.169.254,140.82.112.6,60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _dns = sbx_net_tests::WorldDns::start_with(&h.topology.world, sbx_net_tests::UPLINK_WORLD_V4.into(), 53, &zone);

    println!("\n$ sbx-net sandbox create demo --policy default --netns-guest");
    let created = h.cli_ok(&["sandbox", "create", "demo", "--policy", "default", "--netns-guest"]);
    print!("{created}");
    let info: serde_json::Value = serde_json::from_str(&created)?;
    let guest = info["netns"].as_str().context("netns")?.to_string();
    let gateway: IpAddr = info["gateway_ipv4"].as_str().context("gateway")?.parse()?;

    println!("\n== traffic from the guest (real curl / ping / nc in netns {guest}; HTTP goes through the daemon's transparent proxy)");
    let body = curl(&guest, &format!("http://{github}/"));
    show(&format!("curl http://{github}/  (140.82.112.0/20)"), body.is_some());
    if let Some(body) = body {
        println!("      response: {}", body.trim());
    }
    show(&format!("ping {github}"), ping(&guest, github));
    show(&format!("nc -z {github} 22"), tcp_connects(&guest, github, 22));
    show(&format!("curl http://[{github_v6}]/  (2606:50c0::/32)"), curl(&guest, &format!("http://[{github_v6}]/")).is_some());
    show(&format!("nc -z {unlisted} 22  (not in the policy)"), tcp_connects(&guest, unlisted, 22));
    show(&format!("curl http://{unlisted}/  (not in the policy)"), curl(&guest, &format!("http://{unlisted}/")).is_some());
    show(&format!("ping {metadata}  (cloud metadata)"), ping(&guest, metadata));
    show(&format!("nc -z {private} 22  (private range)"), tcp_connects(&guest, private, 22));
    show(&format!("nc -z {gateway} 22  (the host itself)"), tcp_connects(&guest, gateway, 22));

    println!("\n== DNS from the guest (real dig; every port-53 query lands on the daemon's DNS proxy)");
    show(&format!("nc -z {anthropic} 22  (before resolving api.anthropic.com)"), tcp_connects(&guest, anthropic, 22));
    for (args, what) in [
        (vec!["api.anthropic.com"], "allowed name"),
        (vec!["evil.example.com"], "unlisted name"),
        (vec!["@8.8.8.8", "evil.example.com"], "hard-coded resolver"),
        (vec!["api.github.com"], "answer with 169.254.169.254 in it"),
    ] {
        let (status, answers) = sbx_net_tests::dig(&guest, &args);
        println!("   dig {:<36} {status:<9} {}   ({what})", args.join(" "), answers.iter().map(|a| a.rsplit(' ').next().unwrap_or("")).collect::<Vec<_>>().join(" "));
    }
    show(&format!("nc -z {anthropic} 22  (after: the answer's address, for its TTL)"), tcp_connects(&guest, anthropic, 22));

    // Datapath decisions reach the history through the ring buffer a
    // moment later: show it once both connections to {anthropic}:22 above
    // (two flows, whatever their verdicts) are in it.
    try_wait_for(Duration::from_secs(20), || (records_to(&h, "demo", anthropic, 22) >= 2).then_some(()))
        .context("the daemon's history does not show the last connections after 20 s")?;
    println!("\n$ sbx-net inspect --sandbox demo --not --protocol icmpv6 --last 40   (every decision, with the rule that made it)");
    print!("{}", h.cli_ok(&["inspect", "--sandbox", "demo", "--not", "--protocol", "icmpv6", "--last", "40", "--no-color"]));
    println!("\n$ sbx-net inspect --verdict denied --not --protocol dns -o json --last 1");
    print!("{}", h.cli_ok(&["inspect", "--verdict", "denied", "--not", "--protocol", "dns", "-o", "json", "--last", "1"]));
    let refused = sbx_net_tests::run_in(&guest, "curl", &["-s", "-i", "--max-time", "3", &format!("http://{unlisted}/")]);
    let refused = String::from_utf8_lossy(&refused.stdout);
    println!("   HTTP to {unlisted} is refused by the proxy (same policy): {}", refused.lines().find(|l| l.starts_with("X-Sbx-Net-Denied")).unwrap_or("(no answer)"));

    for dest in ["169.254.169.254:80", "140.82.112.3:443", "203.0.113.7:22", "api.anthropic.com:443", "evil.example.com"] {
        println!("\n$ sbx-net policy test demo {dest}");
        print!("{}", h.cli_ok(&["policy", "test", "demo", dest]));
    }
    println!("\n$ sbx-net status");
    print!("{}", h.cli_ok(&["status"]));
    println!("\n$ nft list table inet sbx_net   (in the host namespace)");
    print!("{}", nft_table(&h)?);

    let plane_pid = |h: &DaemonHarness| h.json(&["status", "--json"])["dataplane"]["pid"].clone();
    let before = plane_pid(&h);
    println!("\n== kill -9 the daemon: enforcement stays in the kernel, the data plane (pid {before}: DNS and HTTP(S) proxies) serves on");
    h.kill_daemon(libc::SIGKILL);
    show(&format!("curl http://{github}/  (daemon dead; the data plane proxies)"), curl(&guest, &format!("http://{github}/")).is_some());
    show(&format!("nc -z {github} 22  (daemon dead)"), tcp_connects(&guest, github, 22));
    show(&format!("nc -z {unlisted} 22  (daemon dead)"), tcp_connects(&guest, unlisted, 22));
    h.start_daemon();
    println!("\n== restarted: the daemon re-adopted the sandbox (pinned link swapped atomically, maps and nftables kept) and the data plane (pid {})", plane_pid(&h));
    print!("{}", h.cli_ok(&["sandbox", "list"]));
    show(&format!("curl http://{github}/  (same data plane)"), curl(&guest, &format!("http://{github}/")).is_some());
    println!("\n$ sbx-net upgrade   (listening sockets handed to a new data plane; the old one drains)");
    print!("{}", h.cli_ok(&["upgrade"]));
    show(&format!("curl http://{github}/  (new data plane)"), curl(&guest, &format!("http://{github}/")).is_some());

    microvm(&h, github, unlisted, metadata, anthropic)?;

    println!("\n$ sbx-net sandbox delete demo");
    print!("{}", h.cli_ok(&["sandbox", "delete", "demo"]));
    drop(h);
    println!("\n== cleaned up: daemon --cleanup, host / world / guest namespaces and pins removed");
    Ok(())
}
