//! End to end through the real daemon and CLI: sandbox creation and the
//! refusals (with their exit codes), per-sandbox policy, isolation from the
//! host, from other sandboxes and from inbound connections, what list /
//! show / status / metrics / nftables say, delete, atomic reload under
//! traffic, malformed policies, kill -9 and restart, and adoption of an
//! external tap.
//! Real ping / nc / curl run in netns guests; the world namespace serves.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::{
    curl, require_root, run_in, tcp_connects, unique_name, wait_until, NcListener, Pinger, WorldServers, UPLINK_HOST_V4, UPLINK_WORLD_V4,
};

const PORT: u16 = 8080;
const A_ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
const A_DENIED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const B_ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

fn a_allowed_v6() -> Ipv6Addr {
    "2001:db8:100::5".parse().unwrap()
}

/// Sandbox A: 198.51.100.0/24 (minus a /28), the uplink /24 (to prove the
/// host's own port isolation is nftables' doing), and the sandbox pool (to
/// prove tap→tap is dropped by nftables even where eBPF would allow it).
const POLICY_A: &str = r#"
name = "team-a"
[network]
default = "deny"
allow = ["198.51.100.0/24", "2001:db8:100::/48", "192.0.2.0/24", "10.200.0.0/16"]
deny = ["198.51.100.16/28"]
"#;

const POLICY_B: &str = r#"
name = "team-b"
[network]
default = "deny"
allow = ["203.0.113.0/24"]
"#;

fn ip(v: &serde_json::Value, key: &str) -> IpAddr {
    v[key].as_str().unwrap_or_else(|| panic!("{key} missing in {v}")).parse().unwrap()
}

/// A daemon with the team-a and team-b policies, a world serving A's and
/// B's addresses (and the world's uplink address) on PORT and on 80, a host
/// service on port 2222, and one netns-guest sandbox per team.
struct TwoTeams {
    h: DaemonHarness,
    a_name: String,
    b_name: String,
    /// `sandbox create` output of each.
    a: serde_json::Value,
    b: serde_json::Value,
    a_ns: String,
    b_ns: String,
    _servers: [WorldServers; 3],
}

impl TwoTeams {
    fn start(tag: &str) -> TwoTeams {
        require_root();
        let h = DaemonHarness::new(tag, &[("a.toml", POLICY_A), ("b.toml", POLICY_B)]);
        for addr in [A_ALLOWED, A_DENIED, B_ALLOWED] {
            h.topology.add_world_address(addr.into());
        }
        h.topology.add_world_address(a_allowed_v6().into());
        let world_addrs: Vec<IpAddr> = vec![A_ALLOWED.into(), A_DENIED.into(), B_ALLOWED.into(), a_allowed_v6().into(), UPLINK_WORLD_V4.into()];
        let web = WorldServers::start(&h.topology.world, &world_addrs, PORT);
        let http = WorldServers::start(&h.topology.world, &world_addrs, 80);
        // A host service on every host address (the uplink's, the gateways').
        let host_service = WorldServers::start(&h.topology.host, &[IpAddr::from(Ipv4Addr::UNSPECIFIED)], 2222);
        let (a_name, b_name) = (unique_name("a"), unique_name("b"));
        let a = h.create_guest(&a_name, "team-a");
        let b = h.create_guest(&b_name, "team-b");
        let (a_ns, b_ns) = (a["netns"].as_str().unwrap().to_string(), b["netns"].as_str().unwrap().to_string());
        TwoTeams { h, a_name, b_name, a, b, a_ns, b_ns, _servers: [web, http, host_service] }
    }
}

#[test]
fn control_socket_is_root_only() {
    require_root();
    let h = DaemonHarness::new("sock", &[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&h.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket must be root-only");
}

/// The control socket's threads serve a client each to its end: clients
/// that connect and say nothing (or half a line) must never leave the
/// socket without a thread for the next one.
#[test]
fn silent_clients_never_hold_the_control_socket() {
    require_root();
    let h = DaemonHarness::new("silent", &[]);
    use std::io::Write;
    let mut silent: Vec<std::os::unix::net::UnixStream> = (0..12).map(|_| std::os::unix::net::UnixStream::connect(&h.socket).unwrap()).collect();
    silent[0].write_all(b"{\"op\":\"sta").unwrap();
    for _ in 0..5 {
        let status = sbx_net::control::api::call(&h.socket, &sbx_net::control::api::Request::Status, std::time::Duration::from_secs(10)).expect("status answered beside 12 silent clients");
        assert!(status.is_object(), "{status}");
    }
    drop(silent);
    // And again once they are gone (their threads ended or went back to accept).
    sbx_net::control::api::call(&h.socket, &sbx_net::control::api::Request::Status, std::time::Duration::from_secs(10)).expect("status after the silent clients left");
}

#[test]
fn create_prints_the_sandbox_network_and_a_ca_of_its_own() {
    let t = TwoTeams::start("create");
    let (a, b) = (&t.a, &t.b);
    for key in ["name", "tap", "netns", "guest_ipv4", "guest_ipv6", "guest_mac", "gateway_ipv4", "gateway_ipv6", "dns", "ca_cert"] {
        assert!(a.get(key).is_some(), "create output lacks {key}: {a}");
    }
    assert!(a["tap"].as_str().unwrap().len() <= 15);
    // Each sandbox has its own CA for the credential proxy: a real CA
    // certificate for the guest, its key kept root-only on the host.
    use std::os::unix::fs::PermissionsExt;
    let ca = a["ca_cert"].as_str().unwrap().to_string();
    let text = sbx_net_tests::host_command("openssl").args(["x509", "-noout", "-text", "-in", &ca]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    // Its name is its key's fingerprint (the CA is made ahead, before the
    // sandbox's name is known): no two sandboxes' CAs share it.
    let subject = |pem: &str| {
        let out = sbx_net_tests::host_command("openssl").args(["x509", "-noout", "-subject", "-nameopt", "multiline", "-in", pem]).output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).to_string();
        out.lines().find_map(|l| l.trim().strip_prefix("commonName").map(|v| v.trim_start_matches([' ', '=']).to_string())).unwrap_or_else(|| panic!("no common name in {out}"))
    };
    let (name_a, name_b) = (subject(&ca), subject(b["ca_cert"].as_str().unwrap()));
    let fingerprint = name_a.strip_prefix("sbx-net sandbox CA ").unwrap_or_else(|| panic!("CA named {name_a:?}"));
    assert!(fingerprint.len() == 16 && fingerprint.bytes().all(|c| c.is_ascii_hexdigit()), "{name_a:?}");
    assert_ne!(name_a, name_b);
    assert!(text.contains("CA:TRUE"), "{text}");
    let key = Path::new(&ca).with_file_name("ca.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_ne!(std::fs::read_to_string(&ca).unwrap(), std::fs::read_to_string(b["ca_cert"].as_str().unwrap()).unwrap());
    assert_ne!(a["guest_ipv4"], b["guest_ipv4"]);
    assert_ne!(a["guest_mac"], b["guest_mac"]);
    let resolv = std::fs::read_to_string(Path::new("/etc/netns").join(&t.a_ns).join("resolv.conf")).unwrap();
    assert!(resolv.contains(a["dns"].as_str().unwrap()), "{resolv}");
}

/// The tap pool makes each ready tap's CA key ahead of time: more creates
/// than the pool holds (pooled taps and new ones) give every sandbox a key
/// of its own, never one another sandbox had (also not a recreated
/// sandbox of the same name), each only in its own 0600 file in a 0700 dir.
#[test]
fn every_sandbox_pooled_or_not_gets_a_ca_key_no_other_had() {
    require_root();
    use std::os::unix::fs::PermissionsExt;
    let h = DaemonHarness::new("cakeys", &[("team-a.toml", POLICY_A)]);
    let names: Vec<String> = (0..12).map(|i| unique_name(&format!("k{i}"))).collect();
    let key_of = |created: &serde_json::Value| {
        let key = Path::new(created["ca_cert"].as_str().expect("a CA certificate")).with_file_name("ca.key");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "{}", key.display());
        assert_eq!(std::fs::metadata(key.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::read_to_string(&key).unwrap()
    };
    let mut keys: Vec<String> = names.iter().map(|n| key_of(&h.json(&["sandbox", "create", n, "--policy", "team-a"]))).collect();
    h.cli_ok(&["sandbox", "delete", &names[0]]);
    keys.push(key_of(&h.json(&["sandbox", "create", &names[0], "--policy", "team-a"])));
    let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "a CA key was given to two sandboxes");
    // Nowhere else under the daemon's directories.
    let mut copies = 0;
    let mut dirs = vec![h.dir.clone(), h.state_dir.clone()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if !seen.insert(path.clone()) {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(keys[1].trim())) {
                copies += 1;
            }
        }
    }
    assert_eq!(copies, 1, "a sandbox's CA key is in its key file only");
}

#[test]
fn duplicate_names_unknown_policies_and_missing_sandboxes_are_refused() {
    require_root();
    let h = DaemonHarness::new("refuse", &[("a.toml", POLICY_A)]);
    let a_name = unique_name("a");
    h.create_guest(&a_name, "team-a");
    // Duplicate names and unknown policies are refused.
    assert!(h.cli_err(&["sandbox", "create", &a_name, "--policy", "team-a"]).contains("already exists"));
    assert!(h.cli_err(&["sandbox", "create", "x", "--policy", "nope"]).contains("no policy named"));
    // Each with the exit status its kind has (README "Exit codes").
    let exit = |args: &[&str]| h.cli(args).status.code();
    assert_eq!(exit(&["sandbox", "create", &a_name, "--policy", "team-a"]), Some(73), "a duplicate name: EX_CANTCREAT");
    assert_eq!(exit(&["sandbox", "show", "NOSUCH"]), Some(66), "no such sandbox: EX_NOINPUT");
    assert_eq!(exit(&["sandbox", "create", "x", "--policy", "nope"]), Some(66), "no such policy: EX_NOINPUT");
}

#[test]
fn each_sandbox_reaches_what_its_policy_allows_and_only_that() {
    let t = TwoTeams::start("reach");
    let (a_ns, b_ns) = (&t.a_ns, &t.b_ns);
    assert!(tcp_connects(a_ns, A_ALLOWED.into(), PORT));
    assert!(tcp_connects(a_ns, a_allowed_v6().into(), PORT));
    assert!(!tcp_connects(a_ns, A_DENIED.into(), PORT));
    assert!(!tcp_connects(a_ns, B_ALLOWED.into(), PORT));
    assert!(tcp_connects(b_ns, B_ALLOWED.into(), PORT));
    assert!(!tcp_connects(b_ns, A_ALLOWED.into(), PORT));

    // Port 80 goes through the daemon's transparent proxy, which applies the
    // same policy: allowed works end to end, denied is refused.
    assert_eq!(curl(a_ns, &format!("http://{A_ALLOWED}/")).as_deref(), Some(format!("hello from {A_ALLOWED}\n").as_str()));
    assert_eq!(curl(a_ns, &format!("http://{A_DENIED}/")), None);
    assert_eq!(curl(b_ns, &format!("http://{A_ALLOWED}/")), None);

    // policy test names the deciding rule.
    let out = t.h.cli_ok(&["policy", "test", &t.a_name, "198.51.100.20:443"]);
    assert!(out.contains("denied") && out.contains("deny 198.51.100.16/28"), "{out}");
    let out = t.h.cli_ok(&["policy", "test", &t.b_name, "198.51.100.5"]);
    assert!(out.contains("denied") && out.contains("default deny"), "{out}");
}

#[test]
fn host_services_other_sandboxes_and_inbound_connections_are_unreachable() {
    let t = TwoTeams::start("isolate");
    let (h, a_ns, b_ns) = (&t.h, &t.a_ns, &t.b_ns);
    // Host ports: the uplink /24 is allowed by A's policy, yet the host's own
    // service is not reachable (nftables input), while the world's is.
    assert!(tcp_connects(a_ns, UPLINK_WORLD_V4.into(), PORT));
    assert!(!tcp_connects(a_ns, UPLINK_HOST_V4.into(), 2222));
    assert!(!tcp_connects(a_ns, ip(&t.a, "gateway_ipv4"), 2222));
    // DNS to a hard-coded resolver lands on the daemon's DNS proxy, which
    // answers by A's policy (no rule names this one).
    let (status, _) = sbx_net_tests::dig(a_ns, &["@203.0.113.99", "unlisted.example"]);
    assert_eq!(status, "NXDOMAIN");

    // Tap to tap: allowed by A's policy (10.200.0.0/16), dropped by nftables.
    let _b_listener = NcListener::start(b_ns, 9000);
    assert!(!tcp_connects(a_ns, ip(&t.b, "guest_ipv4"), 9000));
    // The proxy trusts source addresses, so only taps may reach it: a
    // connection from the world to the host's proxy port goes nowhere.
    assert!(!tcp_connects(h.topology.world.name(), UPLINK_HOST_V4.into(), 15001));
    // Inbound: the world cannot open a connection to a guest.
    assert!(!tcp_connects(h.topology.world.name(), ip(&t.b, "guest_ipv4"), 9000));
}

#[test]
fn list_show_status_metrics_and_nftables_agree() {
    let t = TwoTeams::start("agree");
    let h = &t.h;
    let list = h.json(&["sandbox", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(h.json(&["sandbox", "show", &t.b_name])["policy"], "team-b");
    let status = h.json(&["status", "--json"]);
    assert_eq!(status["sandboxes"], 2);
    // Prometheus scrapes the same numbers on the host namespace's loopback.
    let metrics = h.metrics();
    assert!(metrics.contains("sbx_net_sandboxes 2"), "{metrics}");
    assert!(metrics.contains("sbx_net_datapath_packets_total{reason=\"default_deny\"}"), "{metrics}");
    assert!(!metrics.contains("# EOF"), "curl asks for no OpenMetrics: the classic text format\n{metrics}");
    let om = h.metrics_with(&["-H", "Accept: application/openmetrics-text; version=1.0.0"]);
    assert!(om.trim_end().ends_with("# EOF"), "OpenMetrics when asked for");
    assert!(!metrics.contains("10.200."), "no addresses in metric labels");
    assert!(status["maps"]["policy_v4_entries"].as_u64().unwrap() > 0);
    let table = h.nft_table();
    for tap in [&t.a["tap"], &t.b["tap"]] {
        assert!(table.contains(&format!("\"{}\"", tap.as_str().unwrap())), "{table}");
    }
}

#[test]
fn delete_removes_exactly_the_sandboxs_own_pieces() {
    let t = TwoTeams::start("delete");
    let (h, a, b) = (&t.h, &t.a, &t.b);
    let ca = a["ca_cert"].as_str().unwrap().to_string();
    // Delete A: exactly its pieces go; B keeps working. (The pool may
    // pre-warm a new tap under the freed name: compare interface indexes.)
    let a_ifindex = h.topology.host_netlink.link_index(a["tap"].as_str().unwrap()).unwrap();
    h.cli_ok(&["sandbox", "delete", &t.a_name]);
    let table = h.nft_table();
    assert!(!table.contains(&format!("\"{}\"", a["tap"].as_str().unwrap())), "{table}");
    assert!(table.contains(&format!("\"{}\"", b["tap"].as_str().unwrap())), "{table}");
    assert!(!Path::new("/run/netns").join(&t.a_ns).exists());
    assert!(!h.bpf_dir.join("links").join(&t.a_name).exists());
    assert!(h.bpf_dir.join("links").join(&t.b_name).exists());
    // The tap is unregistered just after the answer (it is fail-closed
    // until then: empty datapath slot, out of the nftables set).
    wait_until(Duration::from_secs(20), "the tap of the deleted sandbox to go", || {
        let links = run_in(h.topology.host.name(), "ip", &["-o", "link", "show"]);
        !String::from_utf8_lossy(&links.stdout).lines().any(|l| l.starts_with(&format!("{a_ifindex}:")))
    });
    assert!(tcp_connects(&t.b_ns, B_ALLOWED.into(), PORT));
    assert!(h.cli_err(&["sandbox", "show", &t.a_name]).contains("no sandbox"));
    assert!(!Path::new(&ca).exists(), "the deleted sandbox's CA stays behind");
}

const POLICY_V1: &str = r#"
name = "agent"
[network]
default = "deny"
allow = ["198.51.100.0/24"]
deny = ["198.51.100.16/28"]
"#;

/// Same verdicts for the two probed addresses, different rules elsewhere,
/// so every reload really switches a generation.
const POLICY_V2: &str = r#"
name = "agent"
[network]
default = "deny"
allow = ["198.51.100.0/25", "198.51.100.128/25", "192.0.2.128/25"]
deny = ["198.51.100.16/28", "198.51.100.200/29"]
"#;

/// A daemon with the `agent` policy (V1) and a world serving an address it
/// allows and one it denies.
fn agent_daemon(tag: &str) -> (DaemonHarness, WorldServers) {
    let h = DaemonHarness::new(tag, &[("agent.toml", POLICY_V1)]);
    for addr in [A_ALLOWED, A_DENIED] {
        h.topology.add_world_address(addr.into());
    }
    let web = WorldServers::start(&h.topology.world, &[A_ALLOWED.into(), A_DENIED.into()], PORT);
    (h, web)
}

#[test]
fn reload_under_traffic_and_malformed_policies() {
    require_root();
    let (h, _web) = agent_daemon("reload");
    let g = h.create_guest(&unique_name("g"), "agent");
    let ns = g["netns"].as_str().unwrap().to_string();
    let name = g["name"].as_str().unwrap().to_string();
    assert!(tcp_connects(&ns, A_ALLOWED.into(), PORT));

    // 400 echoes each, 10 ms apart, while the policy is switched 20 times.
    let allowed = Pinger::start(&ns, A_ALLOWED.into(), 400, 10);
    let denied = Pinger::start(&ns, A_DENIED.into(), 400, 10);
    let before = h.json(&["status", "--json"])["policy_generation"].as_u64().unwrap();
    for i in 0..20 {
        let text = if i % 2 == 0 { POLICY_V2 } else { POLICY_V1 };
        std::fs::write(h.policy_dir.join("agent.toml"), text).unwrap();
        let out = h.json(&["policy", "reload"]);
        assert_eq!(out["sandboxes_switched"].as_array().unwrap().len(), 1, "{out}");
        // Pacing, not waiting: spreads the 20 reloads over the pingers'
        // 4 s, so echoes are in flight across every switch.
        std::thread::sleep(Duration::from_millis(150));
    }
    let (sent, received) = allowed.finish();
    assert!(sent >= 390, "sent {sent}");
    assert_eq!(received, sent, "allowed echoes lost during reloads");
    let (sent, received) = denied.finish();
    assert!(sent >= 390, "sent {sent}");
    assert_eq!(received, 0, "denied echoes got through during reloads");
    let after = h.json(&["status", "--json"])["policy_generation"].as_u64().unwrap();
    assert_eq!(after, before + 20);

    // A malformed policy file: reload is refused with file, line and reason,
    // and the old policy stays in force.
    std::fs::write(h.policy_dir.join("agent.toml"), "name = \"agent\"\n[network]\nallow = [\"198.51.100.0/33\"]\n").unwrap();
    let err = h.cli_err(&["policy", "reload"]);
    assert!(err.contains("agent.toml:3:"), "{err}");
    assert!(tcp_connects(&ns, A_ALLOWED.into(), PORT));
    assert!(!tcp_connects(&ns, A_DENIED.into(), PORT));
    let status = h.json(&["status", "--json"]);
    assert!(status["reload_failures"].as_u64().unwrap() >= 1);
    assert!(status["last_reload_error"].as_str().unwrap().contains("agent.toml:3"));
    let bad = h.dir.join("bad.toml");
    std::fs::write(&bad, "name = \"agent\"\n[network]\nallow = [\"*\"]\n").unwrap();
    let err = h.cli_err(&["policy", "apply", bad.to_str().unwrap()]);
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(tcp_connects(&ns, A_ALLOWED.into(), PORT));
    // `policy check` agrees without a daemon.
    assert!(h.cli_err(&["policy", "check", bad.to_str().unwrap()]).contains("bad.toml:3:"));

    // A valid apply takes effect at once (and survives the broken dir file).
    let good = h.dir.join("closed.toml");
    std::fs::write(&good, "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"203.0.113.0/24\"]\n").unwrap();
    h.cli_ok(&["policy", "apply", good.to_str().unwrap()]);
    assert!(!tcp_connects(&ns, A_ALLOWED.into(), PORT));
    let out = h.cli_ok(&["policy", "test", &name, &format!("{A_ALLOWED}:{PORT}")]);
    assert!(out.contains("default deny"), "{out}");
    let list = h.json(&["policy", "list"]);
    assert!(list.as_array().unwrap().iter().any(|p| p["name"] == "agent" && p["sandboxes"].as_array().unwrap().len() == 1), "{list}");

    // Credential secrets are read on apply/reload, reported as available or
    // not (with why), and their values never leave the daemon's memory.
    let secret_file = h.dir.join("token");
    let secret = "sbx-test-s3cr3t-value-7f3a";
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let with_cred = h.dir.join("cred.toml");
    std::fs::write(
        &with_cred,
        format!(
            "name = \"agent\"\n[network]\nallow = [\"203.0.113.0/24\", \"api.test\"]\n[[credentials]]\nname = \"api\"\nhosts = [\"api.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{}\" }}\n",
            secret_file.display()
        ),
    )
    .unwrap();
    h.cli_ok(&["policy", "apply", with_cred.to_str().unwrap()]);
    let status = h.cli_ok(&["status", "--json"]);
    assert!(status.contains("\"credential\":\"api\"") || status.contains("\"credential\": \"api\""), "{status}");
    let creds = &h.json(&["status", "--json"])["credentials"];
    assert_eq!(creds[0]["available"], true, "{creds}");
    std::fs::remove_file(&secret_file).unwrap();
    h.cli_ok(&["policy", "apply", with_cred.to_str().unwrap()]);
    let creds = &h.json(&["status", "--json"])["credentials"];
    assert_eq!(creds[0]["available"], false, "{creds}");
    assert!(creds[0]["reason"].as_str().unwrap().contains("cannot read"), "{creds}");
    for text in [status, h.cli_ok(&["policy", "list"]), h.log()] {
        assert!(!text.contains(secret), "the secret leaked");
    }
}

#[test]
fn kill_9_and_restart_keep_enforcement() {
    require_root();
    let (mut h, _web) = agent_daemon("restart");
    let g = h.create_guest(&unique_name("g"), "agent");
    let ns = g["netns"].as_str().unwrap().to_string();
    let name = g["name"].as_str().unwrap().to_string();

    let traffic = |verdict: &str| h.json(&["status", "--json"])["sandbox_traffic"][&name][verdict]["packets"].as_u64().unwrap_or(0);
    let (allowed_before, denied_before) = (traffic("allowed"), traffic("denied"));
    let allowed = Pinger::start(&ns, A_ALLOWED.into(), 300, 10);
    let denied = Pinger::start(&ns, A_DENIED.into(), 300, 10);
    // Kill the daemon with both pingers' echoes flowing through the classifier.
    wait_until(Duration::from_secs(20), "both pingers' echoes reaching the classifier", || {
        traffic("allowed") >= allowed_before + 10 && traffic("denied") >= denied_before + 10
    });
    h.kill_daemon(libc::SIGKILL);
    // The daemon is gone: enforcement is not.
    assert!(tcp_connects(&ns, A_ALLOWED.into(), PORT), "allowed flow broke with the daemon dead");
    assert!(!tcp_connects(&ns, A_DENIED.into(), PORT), "denied flow opened with the daemon dead");
    assert!(h.nft_table().contains(g["tap"].as_str().unwrap()));
    h.start_daemon();
    let (sent, received) = allowed.finish();
    assert!(sent >= 290, "sent {sent}");
    assert_eq!(received, sent, "allowed echoes lost across kill -9 and restart");
    let (_, received) = denied.finish();
    assert_eq!(received, 0, "denied echoes passed across kill -9 and restart");

    // Re-adopted: same sandbox, still enforced, and manageable.
    let show = h.json(&["sandbox", "show", &name]);
    assert_eq!(show["tap"], g["tap"]);
    assert!(tcp_connects(&ns, A_ALLOWED.into(), PORT));
    assert!(!tcp_connects(&ns, A_DENIED.into(), PORT));
    // A policy edited while the daemon was down is picked up at restart.
    h.kill_daemon(libc::SIGTERM);
    std::fs::write(h.policy_dir.join("agent.toml"), "name = \"agent\"\n[network]\nallow = [\"198.51.100.16/28\"]\n").unwrap();
    h.start_daemon();
    assert!(tcp_connects(&ns, A_DENIED.into(), PORT));
    assert!(!tcp_connects(&ns, A_ALLOWED.into(), PORT));
    h.cli_ok(&["sandbox", "delete", &name]);
    assert!(!Path::new("/run/netns").join(&ns).exists());
}

#[test]
fn adopts_an_external_vmm_tap() {
    require_root();
    let (h, _web) = agent_daemon("adopt");
    // A tap made the way Firecracker's docs make one.
    let host = h.topology.host.name().to_string();
    let made = run_in(&host, "ip", &["tuntap", "add", "dev", "fc-tap0", "mode", "tap"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let name = unique_name("vm");
    // A tap that is not there: the create fails after its CA was made and
    // its route pushed to the data plane (both run before the kernel
    // work), and takes both back: the name is free again.
    let refused = h.cli_err(&["sandbox", "create", &name, "--policy", "agent", "--tap", "fc-nosuch0"]);
    assert!(refused.contains("fc-nosuch0"), "{refused}");
    assert!(!h.state_dir.join("ca").join(&name).exists(), "the failed create's CA is removed");
    assert!(!h.cli_ok(&["sandbox", "list"]).contains(&name));
    let vm = h.json(&["sandbox", "create", &name, "--policy", "agent", "--tap", "fc-tap0"]);
    assert_eq!(vm["tap"], "fc-tap0");
    assert_eq!(vm["adopted_tap"], true);
    // Play the VMM: attach to the tap and run a guest with the addresses
    // `create` printed.
    let spec = sbx_net::sandbox::SandboxSpec::new(vm["id"].as_u64().unwrap() as u32, &name, &Default::default()).unwrap();
    let tap = h.topology.host.run(|| sbx_vmm::Tap::open("fc-tap0")).unwrap().expect("open the adopted tap");
    let guest_ns = format!("{}-g", unique_name("vm"));
    let guest = sbx_vmm::NetnsGuest::start(&guest_ns, tap, &spec.guest_network()).expect("guest");
    assert_eq!(vm["guest_mac"], sbx_net::control::api::format_mac(spec.guest_mac));
    assert!(tcp_connects(&guest_ns, A_ALLOWED.into(), PORT));
    assert!(!tcp_connects(&guest_ns, A_DENIED.into(), PORT));
    // Delete: the tap stays (it is the VMM's) but is down, so it carries
    // nothing without its classifier.
    h.cli_ok(&["sandbox", "delete", &name]);
    let link = run_in(&host, "ip", &["-o", "link", "show", "fc-tap0"]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("fc-tap0") && !link.contains(",UP"), "{link}");
    assert!(!tcp_connects(&guest_ns, A_ALLOWED.into(), PORT));
    drop(guest);
    run_in(&host, "ip", &["link", "del", "fc-tap0"]);
}

#[test]
fn cleanup_removes_everything_it_made() {
    require_root();
    let mut h = DaemonHarness::new("cleanup", &[("agent.toml", POLICY_V1)]);
    let g = h.create_guest(&unique_name("g"), "agent");
    let plain = h.json(&["sandbox", "create", &unique_name("p"), "--policy", "default"]);
    let host = h.topology.host.name().to_string();
    let pump = h.json(&["status", "--json"]);
    assert_eq!(pump["sandboxes"], 2);
    // A running daemon must be stopped first.
    let out = h.cleanup();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("stop it"), "{out:?}");
    h.kill_daemon(libc::SIGKILL);
    let out = h.cleanup();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // No sandbox tap and no pre-warmed tap is left.
    let links = String::from_utf8_lossy(&run_in(&host, "ip", &["-o", "link", "show"]).stdout).into_owned();
    assert!(!links.contains(": sbx-"), "{links}");
    assert!(!links.contains(g["tap"].as_str().unwrap()) && !links.contains(plain["tap"].as_str().unwrap()));
    assert!(!Path::new("/run/netns").join(g["netns"].as_str().unwrap()).exists());
    let tables = String::from_utf8_lossy(&run_in(&host, "nft", &["list", "tables"]).stdout).into_owned();
    assert!(!tables.contains("sbx_net"), "{tables}");
    assert!(!h.bpf_dir.exists(), "pins left in {}", h.bpf_dir.display());
    assert!(!h.state_dir.join("sandboxes").exists() && !h.state_dir.join("meta.json").exists());
}
