//! The `inet sbx_net` table committed through netlink in a private namespace,
//! read back with the real `nft` tool.

use sbx_net::datapath::nft::{NftConfig, Nftables, PacketRate};
use sbx_net_tests::{require_root, run_in, unique_name};
use sbx_vmm::NetNs;

fn config() -> NftConfig {
    NftConfig {
        dns_port: 5353,
        proxy_port: 15001,
        proxied_ports: vec![80, 443],
        uplink: Some("uplink0".into()),
        pool_v4: "10.200.0.0/16".parse().unwrap(),
        pool_v6: "fd73:6278::/48".parse().unwrap(),
        dns_queries_per_sandbox: Some(PacketRate { per_second: 1000, burst: 500 }),
        new_connections_per_sandbox: Some(PacketRate { per_second: 200, burst: 100 }),
    }
}

fn list(ns: &str) -> String {
    let out = run_in(ns, "nft", &["list", "table", "inet", "sbx_net"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn table_is_readable_and_taps_change_atomically() {
    require_root();
    let ns = NetNs::create(&unique_name("nft")).expect("namespace");
    let name = ns.name().to_string();
    ns.run(|| {
        let nft = Nftables::new();
        nft.install(&config(), &["sbx-1".into(), "fc-tap0".into()]).expect("install");
        let text = list(&name);
        for expected in [
            "iifname @sandbox_taps udp dport 53",
            "redirect to :5353",
            "tcp dport 443",
            "redirect to :15001",
            "comment \"sandbox DNS (any resolver) to the DNS proxy\"",
            "oifname \"uplink0\" ip saddr 10.200.0.0/16",
            "masquerade",
            "ip6 saddr fd73:6278::/48",
            "ct state established,related",
            "iifname @sandbox_taps oifname @sandbox_taps",
            "\"sbx-1\"",
            "\"fc-tap0\"",
            "icmpv6 type nd-neighbor-solicit",
            "udp dport 5353 update @dns_queries_per_tap { iif timeout 1m limit rate over 1000/second burst 500 packets } counter packets 0 bytes 0 drop",
            "set dns_queries_per_tap {",
            "tcp dport 15001 ct state new update @new_connections_per_tap { iif timeout 1m limit rate over 200/second burst 100 packets } counter packets 0 bytes 0 drop",
            "set new_connections_per_tap {",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        nft.add_tap("sbx-2").expect("add tap");
        assert!(list(&name).contains("\"sbx-2\""));
        nft.remove_tap("sbx-1").expect("remove tap");
        let text = list(&name);
        assert!(!text.contains("\"sbx-1\"") && text.contains("\"sbx-2\"") && text.contains("\"fc-tap0\""), "{text}");
        // Re-installing replaces the table in one transaction (restart).
        nft.install(&config(), &["sbx-2".into()]).expect("reinstall");
        let text = list(&name);
        assert_eq!(text.matches("redirect to :5353").count(), 2, "{text}");
        nft.remove().expect("remove");
        nft.remove().expect("removing a missing table is fine");
        let out = run_in(&name, "nft", &["list", "tables"]);
        assert!(!String::from_utf8_lossy(&out.stdout).contains("sbx_net"));
    })
    .expect("run in namespace");
}
