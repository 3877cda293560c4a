//! `cargo xtask bench datapath`: the classifier's cost per packet
//! (BPF_PROG_TEST_RUN) against two references measured in the same run —
//! an empty TC program (harness overhead) and a program doing one LPM lookup
//! on the same frame (the floor for any LPM-based verdict) — for 10 to 1M
//! rules; and small-UDP packets/s from a netns guest through the tap with and
//! without the program attached. Prints a Markdown report.
//!
//! `cargo xtask bench lifecycle`: creating and deleting 1000 sandboxes
//! through the real daemon (its socket API, no CLI process per call),
//! against a bare tap set up the same way without the daemon, and kernel +
//! daemon memory per sandbox at four checkpoints (linearity).
//!
//! `cargo xtask bench dns`: from a netns guest, DNS latency at a fixed rate
//! and the maximum rate, to the same authoritative upstream directly, through
//! sbx-net's DNS proxy, and through dnsmasq forwarding to it (the peer).
//!
//! `cargo xtask bench proxy`: HTTPS requests with credential injection on
//! kept-alive connections from a netns guest, through sbx-net's credential
//! proxy and through mitmproxy doing the same injection, against the same
//! server reached directly; and 8 HTTP/2 streams at once on one guest
//! connection, sent upstream concurrently (now) and one at a time (before,
//! measured in the same run by restarting the daemon with the
//! `bench_serial_upstream_requests` baseline key).
//!
//! `cargo xtask bench fleet`: 100 hosts (10 real daemons, 90 light hosts)
//! taking a policy from one real etcd: the time from `policy push` to the
//! new version in force on every host, and the idle fleet's cost in etcd
//! (bench/fleet.rs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;
use sbx_net::policy::compile::compile_rules;
use sbx_net::datapath::{Datapath, DatapathOptions};
use sbx_net::policy::{builtin_deny_rules, Action, Origin, Policy, Rule, Target};
use sbx_net::sandbox::{open_host_tap, AddressPools, SandboxSpec};
use sbx_net_common::{program_names, sandbox_flags};
use sbx_net_tests::frames::*;
use sbx_net_tests::{unique_name, Topology};
use sbx_vmm::NetNs;

// Not binaries of their own: cargo takes only src/bin/*.rs and src/bin/*/main.rs.
#[path = "bench/common.rs"]
mod common;
#[path = "bench/datapath.rs"]
mod datapath;
#[path = "bench/lifecycle.rs"]
mod lifecycle;
#[path = "bench/dns.rs"]
mod dns;
#[path = "bench/proxy.rs"]
mod proxy;
#[path = "bench/upgrade.rs"]
mod upgrade;
#[path = "bench/vmm.rs"]
mod vmm;
#[path = "bench/fleet.rs"]
mod fleet;
#[path = "bench/report.rs"]
mod report;

use common::*;
use datapath::*;
use dns::*;
use lifecycle::*;
use proxy::*;
use upgrade::*;
use vmm::*;

/// Every suite, in the order `all` runs them.
const SUITES: [&str; 7] = ["datapath", "lifecycle", "dns", "proxy", "upgrade", "vmm", "fleet"];

/// `sbx-net-bench SUITE [--json FILE] [--compare FILE]`, or
/// `sbx-net-bench all [--out DIR] [--compare FILE] [--only SUITE,…]`, or
/// `sbx-net-bench summarize RUN.json…` (runs side by side).
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let suite = args.first().cloned().unwrap_or_else(|| "datapath".into());
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(std::path::PathBuf::from);
    let (json, compare, out) = (flag("--json"), flag("--compare"), flag("--out"));
    if suite == "summarize" {
        // `summarize RUN.json…`: consecutive runs side by side.
        let runs = args[1..].iter().map(|p| report::RunFile::read(std::path::Path::new(p))).collect::<Result<Vec<_>>>()?;
        print!("{}", report::summarize(&runs));
        return Ok(());
    }
    if suite == "all" {
        // `--only a,b`: a subset, in the order of SUITES (for a quick re-run).
        let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1));
        let suites: Vec<&str> = match only {
            Some(list) => {
                let wanted: Vec<&str> = list.split(',').collect();
                if let Some(unknown) = wanted.iter().find(|w| !SUITES.contains(w)) {
                    bail!("--only: unknown suite {unknown:?} (available: {})", SUITES.join(", "));
                }
                SUITES.iter().copied().filter(|s| wanted.contains(s)).collect()
            }
            None => SUITES.to_vec(),
        };
        return report::run_all(&suites, out.as_deref(), compare.as_deref());
    }
    run_suite(&suite)?;
    let run = report::RunFile::from_recorded(&[suite.as_str()]);
    if let Some(path) = json {
        run.write(&path)?;
    }
    if let Some(before) = compare {
        report::print_comparison(&report::RunFile::read(&before)?, &run);
    }
    Ok(())
}

fn run_suite(suite: &str) -> Result<()> {
    match suite {
        "datapath" => datapath_bench(),
        "flows" => flow_table_cost(),
        "steps" => step_costs(),
        "events" => event_rate(),
        "pps" => tap_throughput("datapath"),
        "lifecycle" => lifecycle(),
        "dns" => dns_bench(),
        "proxy" => proxy_bench(),
        "upgrade" => upgrade_bench(),
        "vmm" => vmm_bench(),
        "fleet" => fleet::fleet_bench(),
        _ => bail!("unknown benchmark suite {suite:?} (available: all, {})", SUITES.join(", ")),
    }
}
