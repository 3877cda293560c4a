//! `cargo xtask demo`: a sandbox on the embedded default policy, a private
//! "internet", real traffic from the guest, the drops with their rules.
//! Everything lives in namespaces made here and removed at the end.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result};
use sbx_net::datapath::{Datapath, DatapathOptions};
use sbx_net::flow::DropRecord;
use sbx_net::policy::Policy;
use sbx_net::sandbox::{AddressPools, HostSandbox, SandboxSpec};
use sbx_net_common::Reason;
use sbx_net_tests::{curl, ping, tcp_connects, Topology, WorldServers};

fn main() -> Result<()> {
    let policy = Policy::embedded_default();
    println!("== sbx-net demo: embedded policy {:?} (default {})", policy.name, policy.default.as_str());
    for rule in policy.cidr_rules() {
        println!("   {}", rule.describe());
    }
    println!("   ({} domain rules, enforced through the DNS proxy; none opens an address by itself)", policy.domain_rules().count());

    let topology = Topology::new("demo");
    topology.enter_host();
    // The demo world impersonates a few internet hosts, inside its own namespace.
    let github: IpAddr = Ipv4Addr::new(140, 82, 112, 3).into();
    let github_v6: IpAddr = "2606:50c0:8000::154".parse()?;
    let unlisted: IpAddr = Ipv4Addr::new(203, 0, 113, 7).into();
    let metadata: IpAddr = Ipv4Addr::new(169, 254, 169, 254).into();
    let private: IpAddr = Ipv4Addr::new(10, 0, 0, 5).into();
    let world = [github, github_v6, unlisted, metadata, private];
    for ip in world {
        topology.add_world_address(ip);
    }
    let _servers = WorldServers::start(&topology.world, &world, 80);

    let mut datapath = Datapath::load(&DatapathOptions::default()).context("loading the eBPF datapath")?;
    let mut events = datapath.take_events()?;
    let spec = SandboxSpec::new(1, "demo", &AddressPools::default())?;
    let sandbox = HostSandbox::create(&mut datapath, &topology.host_netlink, spec, &policy, true, 0)
        .context("creating the sandbox")?;
    let s = &sandbox.spec;
    println!(
        "\n== sandbox {:?}: tap {} (TCX ingress: sbx_egress), guest netns {}\n   guest {} / {} mac {}, gateway {} / {}",
        s.name,
        s.tap,
        s.netns,
        s.guest_ipv4,
        s.guest_ipv6,
        s.guest_mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        s.gateway_ipv4,
        s.gateway_ipv6
    );

    let guest = s.netns.clone();
    println!("\n== traffic from the guest (real curl / ping / nc in netns {guest})");
    let show = |what: &str, ok: bool| println!("   {:<52} {}", what, if ok { "ALLOWED" } else { "blocked" });
    let body = curl(&guest, &format!("http://{github}/"));
    show(&format!("curl http://{github}/  (140.82.112.0/20)"), body.is_some());
    if let Some(body) = body {
        println!("      response: {}", body.trim());
    }
    show(&format!("ping {github}"), ping(&guest, github));
    show(&format!("curl http://[{github_v6}]/  (2606:50c0::/32)"), curl(&guest, &format!("http://[{github_v6}]/")).is_some());
    show(&format!("curl http://{unlisted}/  (not in the policy)"), curl(&guest, &format!("http://{unlisted}/")).is_some());
    show(&format!("curl http://{metadata}/latest/meta-data  (metadata)"), curl(&guest, &format!("http://{metadata}/latest/meta-data")).is_some());
    show(&format!("nc -z {private} 80  (private range)"), tcp_connects(&guest, private, 80));
    show(&format!("nc -z {} 22  (the host itself)", s.gateway_ipv4), tcp_connects(&guest, s.gateway_ipv4.into(), 22));

    std::thread::sleep(Duration::from_millis(200));
    println!("\n== drop events from the ring buffer (first of each flow, with the deciding rule)");
    let mut seen = std::collections::BTreeSet::new();
    for ev in events.drain() {
        let record = DropRecord::from_event(&ev, Some(&sandbox.policy));
        let key = (record.protocol, record.dst, record.dst_port, record.reason);
        if seen.insert(key) {
            println!("   {record}");
        }
    }

    println!("\n== datapath counters (packets)");
    let counters = datapath.counters()?;
    for reason in Reason::ALL {
        let c = counters[reason as usize];
        if c.packets > 0 {
            println!("   {:<24} {:>6}", reason.name(), c.packets);
        }
    }

    sandbox.delete(&mut datapath)?;
    println!("\n== cleaned up: sandbox, tap, guest, host and world namespaces removed");
    Ok(())
}
