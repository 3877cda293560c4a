//! Real microVMs on sandbox taps: the daemon makes the sandbox, `sbx-net
//! vm run` (or `sandbox create --vm`) runs the project's test guest on its
//! tap under KVM, and the guest's own TCP/IP stack (smoltcp, in ring 3)
//! probes the world through virtio-net: allowed, nested-deny and unlisted
//! addresses over ICMP, UDP and TCP, DNS through the proxy, a credential
//! injected over plain HTTP, a spoofed source, its disks, another
//! sandbox's VM, and a daemon killed under it.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use sbx_net::observe::record::{FlowRecord, Verdict};
use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::https::{HttpsEcho, TestCa};
use sbx_net_tests::{require_root, unique_name, wait_for, WorldDns, WorldServers};
use serde_json::Value;

const SECRET: &str = "vm-legacy-key-1234";
const ALLOWED: &str = "198.51.100.5";
const NESTED_DENY: &str = "198.51.100.20";
const UNLISTED: &str = "203.0.113.50";
/// What allowed.test resolves to: outside every allowed CIDR, so only
/// the DNS answer can open it; its neighbour is never an answer.
const BY_NAME: &str = "203.0.113.60";
const BY_NAME_SIBLING: &str = "203.0.113.61";
const PLAIN_API: &str = "198.51.100.42";
const PORT: u16 = 8080;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("skipped: /dev/kvm is absent (no KVM in this kernel)");
    false
}

fn policy(secret: &Path, ro: &Path, rw: &Path) -> String {
    format!(
        r#"name = "vm"
[network]
default = "deny"
allow = ["198.51.100.0/24", "allowed.test", "plainapi.test"]
deny = ["198.51.100.16/28"]

[[credentials]]
name = "legacy"
hosts = ["plainapi.test"]
header = "X-Api-Key"
format = "{{secret}}"
source = {{ file = "{}" }}
allow_plaintext = true

[filesystem]
mounts = [
  {{ host = "{}", guest = "/data", mode = "ro" }},
  {{ host = "{}", guest = "/work", mode = "rw" }},
]
"#,
        secret.display(),
        ro.display(),
        rw.display()
    )
}

struct World {
    h: DaemonHarness,
    dir: PathBuf,
    rw_image: PathBuf,
    _servers: (WorldServers, WorldDns, HttpsEcho),
}

impl World {
    fn start(tag: &str) -> World {
        require_root();
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new(&dir);
        let secret = dir.join("legacy.key");
        std::fs::write(&secret, SECRET).unwrap();
        let (ro, rw) = (dir.join("ro.img"), dir.join("rw.img"));
        let mut image = b"read-only-content".to_vec();
        image.resize(1 << 20, 0);
        std::fs::write(&ro, &image).unwrap();
        std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
        let text = policy(&secret, &ro, &rw);
        let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
        let h = DaemonHarness::with_args(tag, &[("vm.toml", text.as_str())], None, &[upstream.as_str()]);
        let world = [ALLOWED, NESTED_DENY, UNLISTED, BY_NAME, BY_NAME_SIBLING, PLAIN_API];
        for a in world {
            h.topology.add_world_address(ip(a));
        }
        let servers = WorldServers::start(&h.topology.world, &world[..5].iter().map(|a| ip(a)).collect::<Vec<_>>(), PORT);
        let dns = WorldDns::start(&h.topology.world, &[format!("allowed.test,{BY_NAME},300"), format!("denied.test,{UNLISTED},300"), format!("plainapi.test,{PLAIN_API},300")], &[]);
        let plain = HttpsEcho::start_plain(&h.topology.world, SocketAddr::new(ip(PLAIN_API), 80), &ca, SECRET);
        World { h, dir, rw_image: rw, _servers: (servers, dns, plain) }
    }

    /// `sbx-net vm run SANDBOX --probe SCRIPT ARGS` in the daemon's
    /// namespace (where the tap is), bounded in time: the guest's result
    /// lines and the process's output.
    fn vm_run(&self, sandbox: &str, script: &str, args: &[&str]) -> (Vec<Value>, Output) {
        let probe = self.dir.join(unique_name("probe"));
        std::fs::write(&probe, script).unwrap();
        let mut command = std::process::Command::new("timeout");
        command.args(["120", "ip", "netns", "exec", self.h.topology.host.name()]).arg(sbx_net_tests::daemon::sbx_net_bin()).arg("--socket").arg(&self.h.socket);
        command.args(["vm", "run", sandbox, "--probe"]).arg(&probe).args(args);
        let out = command.output().unwrap();
        (results(&String::from_utf8_lossy(&out.stdout)), out)
    }

    fn records(&self, sandbox: &str) -> Vec<FlowRecord> {
        self.h.cli_ok(&["inspect", "-o", "json", "--sandbox", sandbox]).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a record ({e}): {l}"))).collect()
    }
}

/// The guest's JSON lines in a console.
fn results(console: &str) -> Vec<Value> {
    console.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect()
}

/// The result of the `n`th command `op` (0-based).
fn nth<'a>(results: &'a [Value], op: &str, n: usize) -> &'a Value {
    results.iter().filter(|r| r["op"] == op).nth(n).unwrap_or_else(|| panic!("no {op} #{n} in {results:#?}"))
}

fn dropped_with(records: &[FlowRecord], dst: &str, rule: &str) -> bool {
    records.iter().any(|r| r.source == "datapath" && r.dst_ip == Some(ip(dst)) && r.verdict == Verdict::Denied && r.rule.as_deref() == Some(rule))
}

#[test]
fn a_vm_on_a_sandbox_tap_meets_the_policy_over_its_own_stack() {
    if !kvm() {
        return;
    }
    let w = World::start("mvm");
    let name = unique_name("v");
    let sandbox = w.h.json(&["sandbox", "create", &name, "--policy", "vm"]);
    let guest_ip = sandbox["guest_ipv4"].as_str().unwrap().to_string();
    // Where a spoofed datagram would land if it got through.
    let spoof_sink = w.h.topology.world.run(|| UdpSocket::bind(SocketAddr::new(ip(ALLOWED), 9999))).unwrap().unwrap();
    spoof_sink.set_nonblocking(true).unwrap();
    let script = format!(
        "timeout 4000\n\
         ping {ALLOWED}\n\
         udp {ALLOWED}:{PORT} hello-udp\n\
         tcp {ALLOWED}:{PORT} GET / HTTP/1.0\\r\\n\\r\\n\n\
         timeout 1500\n\
         ping {NESTED_DENY}\n\
         udp {NESTED_DENY}:{PORT} nested\n\
         tcp {NESTED_DENY}:{PORT} nested\n\
         ping {UNLISTED}\n\
         tcp {UNLISTED}:{PORT} unlisted\n\
         tcp {BY_NAME}:{PORT} before\n\
         timeout 4000\n\
         resolve allowed.test\n\
         tcp {BY_NAME}:{PORT} GET / HTTP/1.0\\r\\n\\r\\n\n\
         timeout 1500\n\
         tcp {BY_NAME_SIBLING}:{PORT} sibling\n\
         resolve denied.test\n\
         timeout 4000\n\
         http plainapi.test:80 /legacy\n\
         spoof 10.9.9.9 {ALLOWED}:9999 spoofed\n\
         spoof {ALLOWED} {ALLOWED}:9999 spoofed\n\
         disk 0 info\n\
         disk 0 read 0\n\
         disk 0 write 0 overwrite\n\
         disk 1 write 0 written-by-the-guest\n\
         disk 1 read 0\n\
         disk 1 read 0 2048\n\
         disk 1 read 0 512\n\
         disk 0 read 0 2048\n"
    );
    let (r, out) = w.vm_run(&name, &script, &["--mem", "64"]);
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "vm run failed ({:?}): {stderr}\n{console}", out.status);
    assert!(console.contains(r#""event":"done""#), "{console}");
    let boot = r.iter().find(|v| v["event"] == "boot").expect("boot line");
    assert_eq!(boot["mac"], sandbox["guest_mac"], "the NIC has the sandbox's MAC");
    assert_eq!(boot["ipv4"].as_str(), Some(guest_ip.as_str()));
    assert_eq!(boot["devices"], serde_json::json!(["net", "block", "block"]), "the NIC and one disk per mount");

    // The allowed CIDR over ICMP, UDP and TCP.
    assert_eq!(nth(&r, "ping", 0)["ok"], true, "{console}");
    assert_eq!(nth(&r, "udp", 0)["reply"], "hello-udp", "{console}");
    assert!(nth(&r, "tcp", 0)["received"].as_str().unwrap().contains(&format!("hello from {ALLOWED}")), "{console}");
    // The nested deny and the unlisted address: nothing comes back.
    assert_eq!(nth(&r, "ping", 1)["ok"], false, "{console}");
    assert_eq!(nth(&r, "udp", 1)["ok"], false, "{console}");
    assert_eq!(nth(&r, "tcp", 1)["connected"], false, "{console}");
    assert_eq!(nth(&r, "ping", 2)["ok"], false, "{console}");
    assert_eq!(nth(&r, "tcp", 2)["connected"], false, "{console}");
    // A name opens exactly its answer.
    assert_eq!(nth(&r, "tcp", 3)["connected"], false, "before the answer: {console}");
    assert_eq!(nth(&r, "resolve", 0)["addrs"], serde_json::json!([BY_NAME]), "{console}");
    assert!(nth(&r, "tcp", 4)["received"].as_str().unwrap().contains(&format!("hello from {BY_NAME}")), "after the answer: {console}");
    assert_eq!(nth(&r, "tcp", 5)["connected"], false, "the answer's neighbour: {console}");
    assert_eq!(nth(&r, "resolve", 1)["ok"], false, "denied.test: {console}");
    // Plain HTTP to the allow_plaintext host arrives with the credential.
    let http = nth(&r, "http", 0);
    assert_eq!(http["status"], 200, "{console}");
    assert!(http["body"].as_str().unwrap().contains("x-api-key: <injected>"), "{console}");
    assert!(!console.contains(SECRET), "the secret reached the guest");
    // Spoofed sources are sent by the guest and dropped on the tap.
    assert_eq!(nth(&r, "spoof", 0)["ok"], true, "{console}");
    let mut buf = [0u8; 64];
    assert!(spoof_sink.recv_from(&mut buf).is_err(), "a spoofed datagram reached the world");
    // The disks: the read-only one reads and refuses a write; the other
    // takes one, on the host's image.
    assert_eq!(nth(&r, "disk", 0)["read_only"], true, "{console}");
    assert_eq!(nth(&r, "disk", 1)["data"], "read-only-content", "{console}");
    assert_eq!(nth(&r, "disk", 2)["ok"], false, "a write to the read-only disk: {console}");
    assert_eq!(nth(&r, "disk", 3)["ok"], true, "{console}");
    assert_eq!(nth(&r, "disk", 4)["data"], "written-by-the-guest", "{console}");
    assert!(std::fs::read(&w.rw_image).unwrap().starts_with(b"written-by-the-guest"));
    // Large requests (1 MiB, then 256 KiB) under the VMM's seccomp filter.
    for (n, bytes) in [(5, 1 << 20), (6, 256 << 10), (7, 1 << 20)] {
        assert_eq!(nth(&r, "disk", n)["bytes"], bytes, "{console}");
    }

    // The datapath's drops name their rules; DNS records the refusal.
    let records = wait_for(Duration::from_secs(10), "drop records for the VM's denied flows", || {
        let records = w.records(&name);
        (dropped_with(&records, NESTED_DENY, "deny 198.51.100.16/28") && dropped_with(&records, UNLISTED, "default deny")).then_some(records)
    });
    assert!(records.iter().any(|r| r.reason == "spoofed_ip"), "no spoof drop: {records:#?}");
    // A Linux kernel cannot boot on kvm_pvm: `vm run --kernel` says so at
    // once (before opening anything), on a host that has it.
    if Path::new("/sys/module/kvm_pvm").exists() {
        let mut command = std::process::Command::new("timeout");
        command.args(["60", "ip", "netns", "exec", w.h.topology.host.name()]).arg(sbx_net_tests::daemon::sbx_net_bin()).arg("--socket").arg(&w.h.socket);
        let out = command.args(["vm", "run", &name, "--kernel", "/nonexistent/bzImage"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("kvm_pvm") && stderr.contains("--probe"), "{stderr}");
    }
    assert!(records.iter().any(|r| r.verdict == Verdict::Denied && r.dns.as_ref().is_some_and(|d| d.query == "denied.test" && d.rcode == "NXDOMAIN")), "{records:#?}");
    w.h.cli_ok(&["sandbox", "delete", &name]);
}

/// A field of /proc/PID/status.
fn proc_status(pid: u64, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string())).unwrap_or_default()
}

/// `sandbox create --vm`: the daemon runs the VM in its own hardened
/// process; another sandbox's VM cannot reach it; a daemon killed with
/// SIGKILL leaves the VM enforced; `sandbox delete` stops it.
#[test]
fn daemon_run_vms_are_hardened_isolated_and_outlive_a_killed_daemon() {
    if !kvm() {
        return;
    }
    let mut w = World::start("mvd");
    // A serves: answers ping and echoes UDP port 7 until it is stopped.
    let a = unique_name("a");
    let a_info = w.h.json(&["sandbox", "create", &a, "--policy", "vm", "--vm"]);
    let a_ip = a_info["guest_ipv4"].as_str().unwrap().to_string();
    let vm = &a_info["vm"];
    assert_eq!(vm["state"], "running", "{a_info}");
    let pid = vm["pid"].as_u64().unwrap();
    let console = PathBuf::from(vm["console"].as_str().unwrap());
    wait_for(Duration::from_secs(20), "A's guest serving", || std::fs::read_to_string(&console).ok().filter(|c| c.contains(r#""op":"serve","ok":true"#)));
    // The VMM holds no capability, may not gain any, and runs under the filter.
    assert_eq!(proc_status(pid, "CapEff:"), "0000000000000000");
    assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");
    assert_eq!(proc_status(pid, "Seccomp:"), "2", "filter mode");
    assert!(proc_status(pid, "Uid:").starts_with("65534"), "the VMM runs as nobody");

    // B, in another sandbox with the same policy: the world yes, A no.
    let b = unique_name("b");
    w.h.json(&["sandbox", "create", &b, "--policy", "vm"]);
    let script = format!("timeout 3000\nping {ALLOWED}\ntimeout 1500\nping {a_ip}\nudp {a_ip}:7 hello-a\n");
    let (r, out) = w.vm_run(&b, &script, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(nth(&r, "ping", 0)["ok"], true, "{r:#?}");
    assert_eq!(nth(&r, "ping", 1)["ok"], false, "B reached A: {r:#?}");
    assert_eq!(nth(&r, "udp", 0)["ok"], false, "B reached A's echo: {r:#?}");
    let records = wait_for(Duration::from_secs(10), "B's drops toward A", || {
        let records = w.records(&b);
        records.iter().any(|r| r.dst_ip == Some(ip(&a_ip)) && r.verdict == Verdict::Denied).then_some(records)
    });
    assert!(records.iter().any(|r| r.dst_ip == Some(ip(&a_ip)) && r.rule.as_deref().is_some_and(|rule| rule.contains("(sandbox pool)"))), "{records:#?}");

    // C runs its probe after the daemon is gone (SIGKILL).
    let c = unique_name("c");
    let probe = w.dir.join("late.probe");
    std::fs::write(&probe, format!("sleep 3000\ntimeout 3000\nping {ALLOWED}\ntimeout 1500\nping {UNLISTED}\ntcp {NESTED_DENY}:{PORT} x\n")).unwrap();
    let c_info = w.h.json(&["sandbox", "create", &c, "--policy", "vm", "--vm", "--probe", probe.to_str().unwrap()]);
    let c_console = PathBuf::from(c_info["vm"]["console"].as_str().unwrap());
    w.h.kill_daemon(libc::SIGKILL);
    let text = wait_for(Duration::from_secs(30), "C's probe done with the daemon dead", || std::fs::read_to_string(&c_console).ok().filter(|c| c.contains(r#""event":"done""#)));
    let r = results(&text);
    assert_eq!(nth(&r, "ping", 0)["ok"], true, "{text}");
    assert_eq!(nth(&r, "ping", 1)["ok"], false, "{text}");
    assert_eq!(nth(&r, "tcp", 0)["connected"], false, "{text}");
    assert!(proc_status(pid, "State:").starts_with('S') || proc_status(pid, "State:").starts_with('R'), "A's VM outlived the daemon");

    // A restarted daemon reports both VMs; deleting A stops its VMM with SIGTERM.
    w.h.start_daemon();
    let shown = w.h.json(&["sandbox", "show", &a]);
    assert_eq!(shown["vm"]["state"], "running", "{shown}");
    assert_eq!(w.h.json(&["sandbox", "show", &c])["vm"]["state"], "exited");
    w.h.cli_ok(&["sandbox", "delete", &a]);
    assert!(proc_status(pid, "State:").is_empty() || proc_status(pid, "State:").starts_with('Z'), "A's VMM is gone");
    let a_log = std::fs::read_to_string(&console).unwrap();
    assert!(a_log.contains("stopped (SIGTERM)"), "{a_log}");
    for s in [&b, &c] {
        w.h.cli_ok(&["sandbox", "delete", s]);
    }
}
