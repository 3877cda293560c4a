//! Enforcement on a real tap, without the daemon around it: a sandbox put
//! on the host by the daemon's own installer (tap, classifier on a pinned
//! TCX link, nftables table, netns guest behind the pump process), a world
//! namespace with servers, and real ping / nc / curl in the guest: allowed
//! CIDRs are reachable over IPv4 and IPv6, nested denies and unlisted
//! addresses are dropped with a drop event naming the rule, and spoofed
//! sources cannot send. Each test builds and tears down its own namespaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use sbx_net::control::config::DaemonConfig;
use sbx_net::datapath::{Datapath, DatapathOptions, EventReader};
use sbx_net::observe::record::{compact, from_event};
use sbx_net::policy::Policy;
use sbx_net::sandbox::install::{HostSettings, InstallRequest, InstalledSandbox, SandboxHost, TapSource};
use sbx_net::sandbox::SandboxSpec;
use sbx_net_common::{FlowEvent, Reason};
use sbx_net_tests::daemon::sbx_net_bin;
use sbx_net_tests::{curl, ping, require_root, run_in, tcp_connects, try_wait_for, udp_exchange, unique_name, Topology, WorldServers};

const PORT: u16 = 8080;
const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
const NESTED_DENY_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const UNLISTED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);

fn allowed_v6() -> Ipv6Addr {
    "2001:db8:100::5".parse().unwrap()
}
fn nested_deny_v6() -> Ipv6Addr {
    "2001:db8:100:10::1".parse().unwrap()
}
fn unlisted_v6() -> Ipv6Addr {
    "2001:db8:300::1".parse().unwrap()
}

const POLICY: &str = r#"
name = "e2e"
[network]
default = "deny"
allow = ["198.51.100.0/24", "2001:db8:100::/48", "example.com"]
deny = ["198.51.100.16/28", "2001:db8:100:10::/64"]
"#;

struct Setup {
    /// Events drained but not yet matched by a wait.
    pending: Vec<FlowEvent>,
    sandbox: Option<InstalledSandbox>,
    host: SandboxHost,
    events: EventReader,
    /// The bpffs directory of the sandbox's pinned link.
    pins: PathBuf,
    /// The guest pump's log.
    logs: PathBuf,
    _servers: WorldServers,
    /// Held so the namespaces live as long as the sandbox.
    _topology: Topology,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        require_root();
        let topology = Topology::new(tag);
        topology.enter_host();
        // No daemon here: prepare the uplink as the daemon does at start
        // (the taps get theirs when the installer makes them).
        let uplink = sbx_net::sandbox::host::uplink_settings(&["uplink".to_string()], &sbx_net::sandbox::host::read_sysctl);
        sbx_net::sandbox::host::apply(&uplink, false).expect("uplink forwarding");
        let world: Vec<IpAddr> = vec![
            ALLOWED_V4.into(),
            NESTED_DENY_V4.into(),
            UNLISTED_V4.into(),
            allowed_v6().into(),
            nested_deny_v6().into(),
            unlisted_v6().into(),
        ];
        for ip in &world {
            topology.add_world_address(*ip);
        }
        let servers = WorldServers::start(&topology.world, &world, PORT);
        let mut datapath = Datapath::load(&DatapathOptions::default()).expect("load eBPF");
        let events = datapath.take_events().unwrap();
        let name = unique_name("g");
        let pins = PathBuf::from("/sys/fs/bpf").join(&name);
        let logs = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&logs).expect("log dir");
        // The daemon's defaults: its pools, nftables table and proxied ports.
        let config = DaemonConfig { uplink: Some("uplink".into()), ..DaemonConfig::default() };
        let settings = HostSettings { pools: config.pools(), nft: config.nft(), links_dir: pins.join("links"), pump_exe: sbx_net_bin(), log_dir: logs.clone() };
        let mut host = SandboxHost::new(datapath, settings).expect("netlink in the host namespace");
        host.install_table(&[]).expect("nftables table");
        let spec = SandboxSpec::new(1, &name, &config.pools()).unwrap();
        let policy = Policy::parse("e2e.toml", POLICY).unwrap();
        let sandbox = host
            .install(InstallRequest { spec, policy: &policy, policy_id: 1, tap: TapSource::New, netns_guest: true })
            .expect("install a sandbox with a netns guest");
        Setup { pending: Vec::new(), sandbox: Some(sandbox), host, events, pins, logs, _servers: servers, _topology: topology }
    }

    fn sandbox(&self) -> &InstalledSandbox {
        self.sandbox.as_ref().unwrap()
    }

    fn guest(&self) -> String {
        self.sandbox().spec.netns.clone()
    }

    /// Drop events until `pred` matches one (or the deadline passes).
    fn wait_for_event(&mut self, what: &str, pred: impl Fn(&FlowEvent) -> bool) -> FlowEvent {
        let found = try_wait_for(Duration::from_secs(20), || {
            self.pending.extend(self.events.drain());
            let i = self.pending.iter().position(&pred)?;
            Some(self.pending.remove(i))
        });
        if let Some(event) = found {
            return event;
        }
        let seen: Vec<String> =
            self.pending.iter().map(|ev| compact(&from_event(ev, "e2e", Some(&self.sandbox().policy), vec![], 0), false)).collect();
        panic!("no drop event for {what}; saw: {seen:#?}");
    }

    fn counter(&self, reason: Reason) -> u64 {
        self.host.datapath.counters().unwrap()[reason as usize].packets
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(sandbox) = self.sandbox.take() {
            let left = self.host.uninstall(&sandbox);
            if !left.is_empty() {
                eprintln!("uninstalling {} left: {}", sandbox.spec.name, left.join("; "));
            }
        }
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

fn dst_is(ev: &FlowEvent, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => ev.ip_version == 4 && ev.dst_addr[..4] == v4.octets(),
        IpAddr::V6(v6) => ev.ip_version == 6 && ev.dst_addr == v6.octets(),
    }
}

fn allowed_reachable(s: &Setup, dst: IpAddr) {
    let g = s.guest();
    assert!(ping(&g, dst), "ICMP to allowed {dst}");
    assert!(tcp_connects(&g, dst, PORT), "TCP to allowed {dst}");
    assert_eq!(udp_exchange(&g, dst, PORT, "ping-udp"), "ping-udp", "UDP to allowed {dst}");
    let url = match dst {
        IpAddr::V4(a) => format!("http://{a}:{PORT}/"),
        IpAddr::V6(a) => format!("http://[{a}]:{PORT}/"),
    };
    assert_eq!(curl(&g, &url).as_deref(), Some(format!("hello from {dst}\n").as_str()), "curl {url}");
}

fn denied(s: &mut Setup, dst: IpAddr, rule: &str) {
    let g = s.guest();
    assert!(!ping(&g, dst), "ICMP to {dst} must be dropped");
    assert!(!tcp_connects(&g, dst, PORT), "TCP to {dst} must be dropped");
    assert_eq!(udp_exchange(&g, dst, PORT, "nope"), "", "UDP to {dst} must be dropped");
    let ev = s.wait_for_event(&format!("TCP to {dst}"), |ev| dst_is(ev, dst) && ev.protocol == 6 && ev.dst_port == PORT);
    let record = from_event(&ev, "e2e", Some(&s.sandbox().policy), vec![], 0);
    assert_eq!(record.rule.as_deref(), Some(rule), "{}", compact(&record, false));
    s.wait_for_event(&format!("UDP to {dst}"), |ev| dst_is(ev, dst) && ev.protocol == 17);
}

#[test]
fn guest_reaches_allowed_cidr_ipv4() {
    let s = Setup::new("v4ok");
    allowed_reachable(&s, ALLOWED_V4.into());
}

#[test]
fn guest_reaches_allowed_cidr_ipv6() {
    let s = Setup::new("v6ok");
    allowed_reachable(&s, allowed_v6().into());
}

#[test]
fn nested_deny_and_unlisted_dropped_ipv4() {
    let mut s = Setup::new("v4no");
    denied(&mut s, NESTED_DENY_V4.into(), "deny 198.51.100.16/28");
    denied(&mut s, UNLISTED_V4.into(), "default deny");
    // The gateway (the host itself) is not reachable either.
    let gw = s.sandbox().spec.gateway_ipv4;
    assert!(!tcp_connects(&s.guest(), gw.into(), 22));
    // Allowed traffic still flows next to the drops.
    assert!(ping(&s.guest(), ALLOWED_V4.into()));
}

#[test]
fn nested_deny_and_unlisted_dropped_ipv6() {
    let mut s = Setup::new("v6no");
    denied(&mut s, nested_deny_v6().into(), "deny 2001:db8:100:10::/64");
    denied(&mut s, unlisted_v6().into(), "default deny");
    assert!(ping(&s.guest(), allowed_v6().into()));
}

#[test]
fn spoofed_sources_cannot_send() {
    let mut s = Setup::new("spoof");
    let g = s.guest();
    assert!(ping(&g, ALLOWED_V4.into()), "baseline");

    // Another sandbox's IPv4 as source.
    let spoofed_ip_before = s.counter(Reason::SpoofedIp);
    assert!(run_in(&g, "ip", &["addr", "add", "10.200.0.10/32", "dev", "eth0"]).status.success());
    assert!(!run_in(&g, "ping", &["-n", "-c", "1", "-W", "1", "-I", "10.200.0.10", "198.51.100.5"]).status.success());
    let ev = s.wait_for_event("spoofed IPv4", |ev| ev.reason == Reason::SpoofedIp as u8 && ev.ip_version == 4);
    assert_eq!(ev.src_addr[..4], [10, 200, 0, 10]);

    // And IPv6.
    assert!(run_in(&g, "ip", &["-6", "addr", "add", "fd73:6278:0:2::2/128", "dev", "eth0", "nodad"]).status.success());
    assert!(!run_in(&g, "ping", &["-n", "-c", "1", "-W", "1", "-I", "fd73:6278:0:2::2", "2001:db8:100::5"]).status.success());
    s.wait_for_event("spoofed IPv6", |ev| ev.reason == Reason::SpoofedIp as u8 && ev.ip_version == 6);
    assert!(s.counter(Reason::SpoofedIp) >= spoofed_ip_before + 2);

    // A foreign source MAC: nothing gets through, not even ARP.
    assert!(run_in(&g, "ip", &["link", "set", "eth0", "address", "02:00:00:00:00:99"]).status.success());
    assert!(run_in(&g, "ip", &["neigh", "flush", "dev", "eth0"]).status.success());
    assert!(!ping(&g, ALLOWED_V4.into()), "spoofed MAC must be dropped");
    s.wait_for_event("spoofed MAC", |ev| ev.reason == Reason::SpoofedMac as u8);
}
