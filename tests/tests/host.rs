//! The daemon on a host it did not grow up on: a host namespace with kernel
//! defaults (forwarding off), a second daemon started by mistake, a setting
//! the daemon cannot make, and a reload that fails half way.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::{dig, require_root, run_in, tcp_connects, unique_name, wait_until, WorldDns, WorldServers};

const PORT: u16 = 8080;
const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);

fn allowed_v6() -> Ipv6Addr {
    "2001:db8:100::5".parse().unwrap()
}

const POLICY: &str = r#"
name = "p"
[network]
default = "deny"
allow = ["198.51.100.0/24", "2001:db8:100::/48"]
"#;

/// Whether this kernel forwards IPv6 per interface (`force_forwarding`, 6.17+).
fn per_interface_v6() -> bool {
    sbx_net::sandbox::host::ipv6_per_interface_forwarding(&sbx_net::sandbox::host::read_sysctl)
}

/// `sbx-*` links of the host namespace with their indexes.
fn sandbox_links(h: &DaemonHarness) -> Vec<String> {
    let out = run_in(h.topology.host.name(), "ip", &["-o", "link", "show"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut links: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(": ");
            let index = f.next()?;
            let name = f.next()?.split('@').next()?;
            name.starts_with("sbx-").then(|| format!("{index}:{name}"))
        })
        .collect();
    links.sort();
    links
}

fn sysctl(h: &DaemonHarness, key: &str) -> String {
    let path = sbx_vmm::netlink::sysctl_path(key);
    h.topology.host.run(move || std::fs::read_to_string(path)).expect("enter host").unwrap_or_else(|e| panic!("{key}: {e}")).trim().to_string()
}

#[test]
fn daemon_prepares_a_host_with_kernel_defaults() {
    require_root();
    let mut h = DaemonHarness::prepared("kdef", &[("p.toml", POLICY)], None, &[]);
    let per_interface_v6 = per_interface_v6();
    // The topology leaves the host namespace as the kernel made it.
    for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.uplink.forwarding"] {
        assert_eq!(sysctl(&h, key), "0", "{key} before the daemon");
    }
    h.start_daemon();
    // Per interface, not host-wide: nothing else on the host starts routing
    // (IPv6 needs the global switch on kernels before 6.17).
    assert_eq!(sysctl(&h, "net.ipv4.ip_forward"), "0");
    assert_eq!(sysctl(&h, "net.ipv4.conf.uplink.forwarding"), "1");
    if per_interface_v6 {
        assert_eq!(sysctl(&h, "net.ipv6.conf.all.forwarding"), "0");
        assert_eq!(sysctl(&h, "net.ipv6.conf.uplink.force_forwarding"), "1");
    } else {
        assert_eq!(sysctl(&h, "net.ipv6.conf.all.forwarding"), "1");
    }
    assert_eq!(sysctl(&h, "net.ipv6.conf.uplink.accept_ra"), "2", "the uplink keeps accepting router advertisements");
    assert!(h.log().contains("host prepared"), "each change is logged:\n{}", h.log());

    let status = h.json(&["status", "--json"]);
    let checks = status["host"].as_array().unwrap_or_else(|| panic!("status has no host checks: {status}"));
    let check = |name: &str| checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name}: {checks:?}"));
    assert_eq!(check("net.ipv4.conf.uplink.forwarding")["changed"], true);
    assert_eq!(check("net.ipv4.conf.uplink.forwarding")["found"], "0");
    assert!(checks.iter().any(|c| c["name"] == "RLIMIT_NOFILE (soft)"));
    assert!(checks.iter().any(|c| c["name"] == "/run/netns"));
    let text = String::from_utf8_lossy(&h.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("host: net.ipv4.conf.uplink.forwarding = 1 (set by sbx-net, was 0)"), "{text}");

    // Allowed traffic is forwarded both ways, over IPv4 and IPv6.
    h.topology.add_world_address(ALLOWED_V4.into());
    h.topology.add_world_address(allowed_v6().into());
    let _web = WorldServers::start(&h.topology.world, &[ALLOWED_V4.into(), allowed_v6().into()], PORT);
    let name = unique_name("g");
    let info = h.create_guest(&name, "p");
    let netns = info["netns"].as_str().unwrap().to_string();
    let tap = info["tap"].as_str().unwrap().to_string();
    assert_eq!(sysctl(&h, &format!("net.ipv4.conf.{tap}.forwarding")), "1");
    if per_interface_v6 {
        assert_eq!(sysctl(&h, &format!("net.ipv6.conf.{tap}.force_forwarding")), "1");
    }
    assert!(tcp_connects(&netns, ALLOWED_V4.into(), PORT), "allowed IPv4 connection on a host with kernel defaults");
    assert!(tcp_connects(&netns, allowed_v6().into(), PORT), "allowed IPv6 connection on a host with kernel defaults");
    h.cli_ok(&["sandbox", "delete", &name]);

    // --cleanup puts the host back as the daemon found it.
    h.kill_daemon(libc::SIGTERM);
    let out = h.cleanup();
    assert!(out.status.success(), "cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sysctl(&h, "net.ipv4.conf.uplink.forwarding"), "0");
    let v6 = if per_interface_v6 { "net.ipv6.conf.uplink.force_forwarding" } else { "net.ipv6.conf.all.forwarding" };
    assert_eq!(sysctl(&h, v6), "0");
    assert_eq!(sysctl(&h, "net.ipv6.conf.uplink.accept_ra"), "1");
}

#[test]
fn a_setting_the_daemon_cannot_make_is_a_start_error_naming_it() {
    require_root();
    let h = DaemonHarness::prepared("rosys", &[("p.toml", POLICY)], None, &[]);
    // /proc/sys read-only in a mount namespace of its own: the daemon is
    // started there with nsenter (`ip netns exec` would remount /sys, and
    // the daemon would then rejoin its parent's mount namespace).
    let mut args = h.daemon_args();
    args.drain(..3); // "netns", "exec", NAME
    let script = format!(
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec nsenter --net=/run/netns/{} \"$@\"",
        h.topology.host.name()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script, "sh"])
        .args(&args)
        .output()
        .expect("unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon started without forwarding: {stderr}");
    // The first setting the daemon makes (see sbx_net::sandbox::host::uplink_settings).
    let first = if per_interface_v6() { "net.ipv4.conf.uplink.forwarding" } else { "net.ipv6.conf.all.forwarding" };
    assert!(stderr.contains(&format!("cannot set {first} = 1")), "the error names the sysctl: {stderr}");
    assert!(!h.socket.exists(), "a daemon that refused must not leave a socket");
}

#[test]
fn a_second_daemon_is_refused_and_the_first_keeps_working() {
    require_root();
    let h = DaemonHarness::new("twice", &[("p.toml", POLICY)]);
    h.topology.add_world_address(ALLOWED_V4.into());
    let _web = WorldServers::start(&h.topology.world, &[ALLOWED_V4.into()], PORT);
    let name = unique_name("g");
    let info = h.create_guest(&name, "p");
    let netns = info["netns"].as_str().unwrap().to_string();
    assert!(tcp_connects(&netns, ALLOWED_V4.into(), PORT));
    // The pool full (default tap_pool_size), so nothing moves on its own.
    wait_until(Duration::from_secs(30), "the tap pool to fill", || h.json(&["status", "--json"])["prewarmed_taps"] == 8);
    let links = sandbox_links(&h);

    let pid = h.daemon_pid().expect("running").to_string();
    let other = h.dir.join("other");
    let other_socket = other.join("other.sock").display().to_string();
    let other_state = other.join("state").display().to_string();
    let other_bpf = format!("{}-other", h.bpf_dir.display());
    let host = h.topology.host.name().to_string();
    let world = h.topology.world.name().to_string();
    let own = |flags: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        let mut v: Vec<(&'static str, String)> = vec![("--socket", other_socket.clone())];
        v.extend(flags.iter().map(|(f, x)| (*f, x.to_string())));
        v
    };
    for (netns, overrides) in [
        // Same network namespace, everything else its own: the nftables
        // table, the proxy ports and the forwarding are per namespace.
        (&host, own(&[("--state-dir", &other_state), ("--bpf-dir", &other_bpf)])),
        // Another namespace, same pins (the case that used to delete the
        // first daemon's pre-warmed taps), own state.
        (&world, own(&[("--state-dir", &other_state), ("--uplink", "world0")])),
        // Another namespace, same state, own pins.
        (&world, own(&[("--bpf-dir", &other_bpf), ("--uplink", "world0")])),
    ] {
        let overrides: Vec<(&str, &str)> = overrides.iter().map(|(f, v)| (*f, v.as_str())).collect();
        let out = h.run_other_daemon(netns, &overrides, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "a second daemon {overrides:?} must exit 75: {stderr}");
        assert!(stderr.contains(&format!("pid {pid}")), "names the running daemon's pid: {stderr}");
        assert!(stderr.contains(&h.socket.display().to_string()), "names the running daemon's socket: {stderr}");
    }
    // --cleanup of the same data path through another socket is refused too.
    let mut args = h.daemon_args();
    args.extend(["--cleanup".to_string()]);
    let i = args.iter().position(|a| a == "--socket").unwrap();
    args[i + 1] = other_socket.clone();
    let out = Command::new("ip").args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(75), "--cleanup while the lock is held: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&other_bpf);

    // The first daemon and its sandbox are untouched.
    assert!(tcp_connects(&netns, ALLOWED_V4.into(), PORT), "the first daemon's sandbox lost its traffic");
    let status = h.json(&["status", "--json"]);
    assert_eq!(status["prewarmed_taps"], 8, "pre-warmed taps were taken");
    assert_eq!(status["sandboxes"], 1);
    assert_eq!(sandbox_links(&h), links, "the first daemon's taps (sandbox and pre-warmed) must be untouched");
}

/// A new policy too large for two sandboxes' generations at once: the
/// second switch fails on a full trie (a real map write error), and the
/// first sandbox must go back to where it was — its CIDR rules, and the
/// addresses it had learned from DNS (which the new policy does not allow).
#[test]
fn a_reload_that_fails_half_way_rolls_every_sandbox_back() {
    require_root();
    const OLD: &str = r#"
name = "p"
[network]
default = "deny"
allow = ["198.51.100.0/24", "api.test", "web.test"]
"#;
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let h = DaemonHarness::with_args("rollback", &[("p.toml", OLD)], Some("policy_map_entries = 1000\n"), &[upstream.as_str()]);
    let (api, web): (Ipv4Addr, Ipv4Addr) = (Ipv4Addr::new(203, 0, 113, 5), Ipv4Addr::new(203, 0, 113, 6));
    let new_only = Ipv4Addr::new(11, 0, 0, 1);
    let world = [ALLOWED_V4, api, web, new_only];
    for a in world {
        h.topology.add_world_address(a.into());
    }
    let _web = WorldServers::start(&h.topology.world, &world.map(IpAddr::from), PORT);
    let _dns = WorldDns::start(&h.topology.world, &[format!("api.test,{api},300"), format!("web.test,{web},300")], &[]);
    let guests: Vec<String> = (0..2)
        .map(|i| h.create_guest(&unique_name(&format!("r{i}")), "p")["netns"].as_str().unwrap().to_string())
        .collect();
    for netns in &guests {
        assert_eq!(dig(netns, &["api.test"]).0, "NOERROR");
        assert!(tcp_connects(netns, api.into(), PORT), "{netns}: api.test learned");
    }
    let before = h.json(&["status", "--json"]);
    let entries = |s: &serde_json::Value| s["maps"]["policy_v4_entries"].as_u64().unwrap();
    assert!(entries(&before) < 200, "baseline too large for the test's capacity: {before}");

    // ~600 more IPv4 entries and no names: one sandbox's switch fits, the
    // second's does not.
    let extra: Vec<String> = (0..600).map(|i| format!("\"11.0.{}.{}\"", i / 250, i % 250 + 1)).collect();
    let big = format!("name = \"p\"\n[network]\ndefault = \"deny\"\nallow = [\"198.51.100.0/24\", {}]\n", extra.join(", "));
    let file = h.dir.join("big.toml");
    std::fs::write(&file, big).unwrap();
    let err = h.cli_err(&["policy", "apply", file.to_str().unwrap()]);
    assert!(err.contains("rolled back") && err.contains("1 sandbox(es) already switched"), "{err}");

    let check_unchanged = |h: &DaemonHarness, expected_entries: u64| {
        let after = h.json(&["status", "--json"]);
        assert_eq!(after["policy_generation"], before["policy_generation"], "{after}");
        assert_eq!(entries(&after), expected_entries, "every sandbox back on its old entries: {after}");
        for netns in &guests {
            assert!(tcp_connects(netns, ALLOWED_V4.into(), PORT), "{netns}: old policy's allow");
            assert!(tcp_connects(netns, api.into(), PORT), "{netns}: the address learned before the reload");
            assert!(!tcp_connects(netns, new_only.into(), PORT), "{netns}: the new policy must not be in force");
        }
    };
    check_unchanged(&h, entries(&before));
    // The DNS proxy learns under the generation now in the maps.
    for netns in &guests {
        assert_eq!(dig(netns, &["web.test"]).0, "NOERROR");
        assert!(tcp_connects(netns, web.into(), PORT), "{netns}: a name resolved after the rollback");
    }
    // Nothing of the rejected policy survives a restart either.
    let with_web = entries(&before) + guests.len() as u64;
    let mut h = h;
    h.kill_daemon(libc::SIGKILL);
    h.start_daemon();
    check_unchanged(&h, with_web);
}
