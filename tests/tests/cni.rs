//! The hand-off to runtimes and VMMs against a real daemon: `sbx-net-cni`
//! driven exactly as a CNI runtime drives a plugin (the CNI_* environment
//! and nothing else, the network configuration on stdin, run in the
//! runtime's network namespace, which is the daemon's, entered with setns
//! as a runtime does, so /sys stays the test's), every answer
//! validated against JSON Schemas written from the CNI 1.0.0 spec
//! (tests/cni/*.schema.json) by an independent validator (check-jsonschema),
//! then the test microVM booted on the tap ADD returned, resolving an
//! allowed name and connecting to it, and refused a denied address; and
//! `sandbox create/show -o firecracker|cloud-hypervisor|env`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sbx_net::observe::record::Verdict;
use sbx_net_tests::daemon::{sbx_net_bin, DaemonHarness};
use sbx_net_tests::{output_with_stdin, require_root, require_tool, run_in, unique_name, wait_for, wait_until, WorldDns, WorldServers};
use sbx_vmm::NetNs;
use serde_json::{json, Value};

/// allowed.test's answer; only the name opens it.
const BY_NAME: &str = "203.0.113.60";
/// Never allowed.
const DENIED: &str = "198.51.100.20";
const PORT: u16 = 8080;
const POLICY: &str = r#"name = "agents"
[network]
default = "deny"
allow = ["allowed.test"]
"#;
const CHECK_JSONSCHEMA: &str = "/opt/sbx-net/mcp-venv/bin/check-jsonschema";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The plugin: `SBX_NET_CNI_BIN`, or beside the `sbx-net` the tests run.
fn cni_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SBX_NET_CNI_BIN") {
        return PathBuf::from(p);
    }
    let bin = sbx_net_bin().with_file_name("sbx-net-cni");
    assert!(bin.exists(), "{} is missing: run `cargo build -p sbx-net --bins` (cargo xtask test does) or set SBX_NET_CNI_BIN", bin.display());
    bin
}

struct World {
    h: DaemonHarness,
    _servers: (WorldServers, WorldDns),
}

impl World {
    fn start(tag: &str) -> World {
        require_root();
        let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
        let h = DaemonHarness::with_args(tag, &[("agents.toml", POLICY)], None, &[upstream.as_str()]);
        for a in [BY_NAME, DENIED] {
            h.topology.add_world_address(ip(a));
        }
        let servers = WorldServers::start(&h.topology.world, &[ip(BY_NAME), ip(DENIED)], PORT);
        let dns = WorldDns::start(&h.topology.world, &[format!("allowed.test,{BY_NAME},300")], &[]);
        World { h, _servers: (servers, dns) }
    }

    /// The configuration a runtime derives from the shipped network
    /// configuration list (packaging/cni/10-sbx-net.conflist): its one
    /// plugin object with the list's cniVersion and name inserted; this
    /// test's policy and socket in place of the defaults.
    fn config(&self) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/cni/10-sbx-net.conflist");
        let list: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let plugins = list["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 1, "{list}");
        let mut plugin = plugins[0].clone();
        assert_eq!(plugin["type"].as_str(), cni_bin().file_name().and_then(|n| n.to_str()), "the runtime finds the plugin by its type");
        plugin["cniVersion"] = list["cniVersion"].clone();
        plugin["name"] = list["name"].clone();
        plugin["policy"] = json!("agents");
        plugin["socket"] = json!(self.h.socket);
        plugin
    }
}

/// One container's attachment, as the runtime sees it.
struct Attachment {
    container_id: String,
    /// The container's network namespace (the runtime makes it first).
    netns: NetNs,
    ifname: &'static str,
}

impl Attachment {
    fn new() -> Attachment {
        let netns = NetNs::create(&unique_name("ctr")).expect("the container's netns");
        // A containerd-style id: 64 hex digits, unique to this run.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let container_id = format!("{:08x}{nanos:056x}", std::process::id());
        Attachment { container_id, netns, ifname: "eth0" }
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns.name())
    }

    /// Runs the plugin as a runtime does: in the runtime's (the daemon's)
    /// network namespace, with an environment of the CNI variables (and
    /// PATH) only, the configuration on stdin.
    fn plugin(&self, w: &World, command: &str, config: &[u8]) -> Output {
        let mut run = in_runtime_netns(w);
        run.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", self.netns_path())
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=agent")
            .env("CNI_PATH", cni_bin().parent().unwrap())
            .arg(cni_bin())
            .stderr(std::process::Stdio::piped());
        output_with_stdin(&mut run, config)
    }
}

/// `nsenter --net` into the daemon's namespace, the runtime's: setns only,
/// like a runtime (unlike `ip netns exec`, which also mounts a /sys of the
/// namespace), so a plugin that looked for the tap in /sys/class/net would
/// look in the test's namespace and not find it.
fn in_runtime_netns(w: &World) -> Command {
    let mut command = Command::new(require_tool("nsenter"));
    command.arg(format!("--net=/run/netns/{}", w.h.topology.host.name()));
    command
}

/// stdout as JSON (Null when empty), panicking with everything on garbage.
fn stdout_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("the plugin printed no JSON ({e}): {text}\nstderr: {}", String::from_utf8_lossy(&out.stderr)))
}

/// Validates `instance` against tests/cni/`schema` with check-jsonschema;
/// Err is the validator's report.
fn validate(dir: &Path, schema: &str, instance: &Value) -> Result<(), String> {
    require_tool(CHECK_JSONSCHEMA);
    let file = dir.join(format!("{}.json", unique_name("instance")));
    std::fs::write(&file, serde_json::to_vec_pretty(instance).unwrap()).unwrap();
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("cni").join(schema);
    let out = Command::new(CHECK_JSONSCHEMA).arg("--schemafile").arg(&schema).arg(&file).output().expect("run check-jsonschema");
    let _ = std::fs::remove_file(&file);
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))),
    }
}

fn assert_valid(dir: &Path, schema: &str, instance: &Value) {
    if let Err(report) = validate(dir, schema, instance) {
        panic!("{instance:#} does not validate against {schema}:\n{report}");
    }
}

/// A failed invocation: non-zero exit, a CNI error (schema-valid) with `code`.
fn assert_cni_error(dir: &Path, out: &Output, code: u64, what: &str) -> Value {
    let e = stdout_json(out);
    assert!(!out.status.success(), "{what}: exit status 0 with {e}");
    assert_valid(dir, "error.schema.json", &e);
    assert_eq!(e["code"].as_u64(), Some(code), "{what}: {e}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    e
}

fn kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("skipped the microVM part: /dev/kvm is absent (no KVM in this kernel)");
    false
}

/// `sbx-net vm run SANDBOX --probe SCRIPT` in the daemon's namespace,
/// where the tap is, bounded in time: the guest's JSON lines and the process.
fn vm_run(w: &World, sandbox: &str, script: &str) -> (Vec<Value>, Output) {
    let probe = w.h.dir.join(unique_name("probe"));
    std::fs::write(&probe, script).unwrap();
    let mut command = Command::new("timeout");
    command.args(["120", "ip", "netns", "exec", w.h.topology.host.name()]).arg(sbx_net_bin()).arg("--socket").arg(&w.h.socket);
    let out = command.args(["vm", "run", sandbox, "--probe"]).arg(&probe).output().unwrap();
    let results = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    (results, out)
}

fn nth<'a>(results: &'a [Value], op: &str, n: usize) -> &'a Value {
    results.iter().filter(|r| r["op"] == op).nth(n).unwrap_or_else(|| panic!("no {op} #{n} in {results:#?}"))
}

fn link_exists(w: &World, name: &str) -> bool {
    run_in(w.h.topology.host.name(), "ip", &["link", "show", "dev", name]).status.success()
}

#[test]
fn a_runtime_adds_checks_and_deletes_and_the_vm_on_the_tap_meets_the_policy() {
    let w = World::start("cni");
    let dir = w.h.dir.clone();
    let a = Attachment::new();
    let config = serde_json::to_vec(&w.config()).unwrap();

    // VERSION: the input's version and what the plugin speaks.
    let out = a.plugin(&w, "VERSION", br#"{"cniVersion":"1.0.0"}"#);
    assert!(out.status.success());
    let version = stdout_json(&out);
    assert_valid(&dir, "version.schema.json", &version);
    assert_eq!(version, json!({ "cniVersion": "1.0.0", "supportedVersions": ["1.0.0"] }));

    // 1.1's GC is a command 1.0 does not have: an invalid CNI_COMMAND.
    let e = assert_cni_error(&dir, &a.plugin(&w, "GC", &serde_json::to_vec(&w.config()).unwrap()), 4, "GC");
    assert!(e["msg"].as_str().unwrap().contains("GC"), "{e}");

    // Refusals, before anything reaches the daemon.
    let mut old = w.config();
    old["cniVersion"] = json!("0.4.0");
    let e = assert_cni_error(&dir, &a.plugin(&w, "ADD", &serde_json::to_vec(&old).unwrap()), 1, "an old cniVersion");
    assert_eq!(e["cniVersion"], "0.4.0", "errors carry the configuration's version");
    assert_cni_error(&dir, &a.plugin(&w, "ADD", b"{\"cniVersion\": \"1.0.0\", "), 6, "a configuration that is not JSON");
    let mut no_policy = w.config();
    no_policy.as_object_mut().unwrap().remove("policy");
    assert_cni_error(&dir, &a.plugin(&w, "ADD", &serde_json::to_vec(&no_policy).unwrap()), 7, "no policy");
    let mut unknown_policy = w.config();
    unknown_policy["policy"] = json!("nonexistent");
    let e = assert_cni_error(&dir, &a.plugin(&w, "ADD", &serde_json::to_vec(&unknown_policy).unwrap()), 7, "a policy the daemon does not have");
    assert!(e["details"].as_str().unwrap().contains("nonexistent"), "{e}");
    assert!(w.h.json(&["sandbox", "list", "--json"]).as_array().unwrap().is_empty(), "a refused ADD left a sandbox");

    // ADD: a schema-valid 1.0.0 result naming the daemon's sandbox.
    let out = a.plugin(&w, "ADD", &config);
    let result = stdout_json(&out);
    assert!(out.status.success(), "ADD failed: {result}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_valid(&dir, "result-1.0.schema.json", &result);
    // The validator is not vacuous: the same result without ips fails.
    let mut broken = result.clone();
    broken.as_object_mut().unwrap().remove("ips");
    assert!(validate(&dir, "result-1.0.schema.json", &broken).is_err(), "the result schema accepted a result without ips");
    let sandboxes = w.h.json(&["sandbox", "list", "--json"]);
    let sandboxes = sandboxes.as_array().unwrap();
    assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");
    let name = sandboxes[0]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with(&format!("cni-{}-", &a.container_id[..12])), "{name}");
    let info = w.h.json(&["sandbox", "show", &name]);
    let tap = info["tap"].as_str().unwrap();
    assert_eq!(result["interfaces"], json!([
        { "name": tap, "mac": info["gateway_mac"], "sandbox": "" },
        { "name": "eth0", "mac": info["guest_mac"], "sandbox": a.netns_path() },
    ]));
    assert_eq!(result["ips"], json!([
        { "address": format!("{}/30", info["guest_ipv4"].as_str().unwrap()), "gateway": info["gateway_ipv4"], "interface": 1 },
        { "address": format!("{}/64", info["guest_ipv6"].as_str().unwrap()), "gateway": info["gateway_ipv6"], "interface": 1 },
    ]));
    assert_eq!(result["routes"], json!([{ "dst": "0.0.0.0/0", "gw": info["gateway_ipv4"] }, { "dst": "::/0", "gw": info["gateway_ipv6"] }]));
    assert_eq!(result["dns"], json!({ "nameservers": [info["dns"]] }));
    assert!(link_exists(&w, tap), "the tap {tap} is not in the daemon's (the runtime's) namespace");
    // ADD again without DEL: the attachment exists.
    assert_cni_error(&dir, &a.plugin(&w, "ADD", &config), 101, "a second ADD");

    // CHECK with the result as prevResult: success, nothing printed.
    let mut with_prev = w.config();
    with_prev["prevResult"] = result.clone();
    let with_prev = serde_json::to_vec(&with_prev).unwrap();
    let out = a.plugin(&w, "CHECK", &with_prev);
    assert!(out.status.success() && out.stdout.is_empty(), "CHECK: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // A prevResult that is not what the daemon has fails CHECK.
    let mut wrong = w.config();
    wrong["prevResult"] = result.clone();
    wrong["prevResult"]["interfaces"][1]["mac"] = json!("02:00:00:00:00:99");
    assert_cni_error(&dir, &a.plugin(&w, "CHECK", &serde_json::to_vec(&wrong).unwrap()), 102, "CHECK with a wrong MAC");
    // The operator tightened the configuration's policy: the sandbox still
    // enforces the old one, so CHECK fails and names both.
    let mut stricter = w.config();
    stricter["policy"] = json!("strict");
    stricter["prevResult"] = result.clone();
    let e = assert_cni_error(&dir, &a.plugin(&w, "CHECK", &serde_json::to_vec(&stricter).unwrap()), 102, "CHECK with another policy");
    assert!(e["msg"].as_str().unwrap().contains("\"agents\"") && e["msg"].as_str().unwrap().contains("\"strict\""), "{e}");

    // Traffic through the tap ADD returned: the test microVM on it.
    if kvm() {
        let script = format!(
            "timeout 4000\n\
             resolve allowed.test\n\
             tcp {BY_NAME}:{PORT} GET / HTTP/1.0\\r\\n\\r\\n\n\
             timeout 1500\n\
             tcp {DENIED}:{PORT} denied\n"
        );
        let (r, out) = vm_run(&w, &name, &script);
        let console = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "vm run failed ({:?}): {}\n{console}", out.status, String::from_utf8_lossy(&out.stderr));
        let boot = r.iter().find(|v| v["event"] == "boot").unwrap_or_else(|| panic!("no boot line: {console}"));
        assert_eq!(boot["mac"], result["interfaces"][1]["mac"], "the VM's NIC has the MAC ADD returned");
        assert_eq!(Some(format!("{}/30", boot["ipv4"].as_str().unwrap_or_default())), result["ips"][0]["address"].as_str().map(str::to_string), "{console}");
        assert_eq!(nth(&r, "resolve", 0)["addrs"], json!([BY_NAME]), "through the resolver ADD returned: {console}");
        assert!(nth(&r, "tcp", 0)["received"].as_str().unwrap_or_default().contains(&format!("hello from {BY_NAME}")), "allowed by name: {console}");
        assert_eq!(nth(&r, "tcp", 1)["connected"], false, "the denied address: {console}");
        wait_for(Duration::from_secs(10), "the datapath's drop record for the denied address", || {
            let records = w.h.cli_ok(&["inspect", "-o", "json", "--sandbox", &name]);
            records
                .lines()
                .filter_map(|l| serde_json::from_str::<sbx_net::observe::record::FlowRecord>(l).ok())
                .find(|r| r.dst_ip == Some(ip(DENIED)) && r.verdict == Verdict::Denied)
        });
    }

    // DEL: the sandbox goes, and its tap, even after the operator upgraded
    // and edited the configuration (a version ADD refuses, no policy, an
    // ipam): DEL reads only the name and socket. DEL again (and without a
    // netns) succeeds.
    let mut edited = w.config();
    edited["cniVersion"] = json!("0.4.0");
    edited.as_object_mut().unwrap().remove("policy");
    edited["ipam"] = json!({ "type": "host-local" });
    let out = a.plugin(&w, "DEL", &serde_json::to_vec(&edited).unwrap());
    assert!(out.status.success() && out.stdout.is_empty(), "DEL: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(w.h.cli(&["sandbox", "show", &name]).status.code() == Some(66), "the sandbox outlived DEL");
    wait_until(Duration::from_secs(15), "the tap removed after DEL", || !link_exists(&w, tap));
    let out = a.plugin(&w, "DEL", &with_prev);
    assert!(out.status.success(), "DEL again: {}", String::from_utf8_lossy(&out.stdout));
    drop(a.netns);
    let gone = Attachment { container_id: a.container_id.clone(), netns: NetNs::create(&unique_name("ctr2")).unwrap(), ifname: "eth0" };
    let mut del = in_runtime_netns(&w);
    del.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", &gone.container_id)
        .env("CNI_IFNAME", "eth0")
        .arg(cni_bin());
    let out = output_with_stdin(&mut del, &config);
    assert!(out.status.success(), "DEL without CNI_NETNS: {}", String::from_utf8_lossy(&out.stdout));
    // CHECK of a deleted attachment fails.
    assert_cni_error(&dir, &gone.plugin(&w, "CHECK", &with_prev), 102, "CHECK after DEL");

    // The daemon down: try again later, for ADD and for DEL (which must not
    // claim a sandbox it could not delete is gone).
    let mut w = w;
    w.h.kill_daemon(libc::SIGTERM);
    let e = assert_cni_error(&dir, &gone.plugin(&w, "ADD", &config), 11, "ADD with the daemon down");
    assert!(e["details"].as_str().unwrap().contains(w.h.socket.to_str().unwrap()), "{e}");
    assert_cni_error(&dir, &gone.plugin(&w, "DEL", &config), 11, "DEL with the daemon down");
}

#[test]
fn sandbox_create_prints_what_firecracker_cloud_hypervisor_and_scripts_need() {
    let w = World::start("cnh");
    let show = |name: &str| w.h.json(&["sandbox", "show", name]);

    // Firecracker: its network-interfaces array, the kernel's ip=, the CA.
    let fc_name = unique_name("fc");
    let fc = w.h.json(&["sandbox", "create", &fc_name, "--policy", "agents", "-o", "firecracker"]);
    let info = show(&fc_name);
    let tap = info["tap"].as_str().unwrap();
    assert_eq!(fc["network-interfaces"], json!([{ "iface_id": "eth0", "host_dev_name": tap, "guest_mac": info["guest_mac"] }]));
    assert!(link_exists(&w, tap), "the tap {tap} Firecracker is told to open does not exist");
    let boot_args = format!("ip={}::{}:255.255.255.252::eth0:off:{}", info["guest_ipv4"].as_str().unwrap(), info["gateway_ipv4"].as_str().unwrap(), info["dns"].as_str().unwrap());
    assert_eq!(fc["boot_args"], boot_args.as_str());
    assert_eq!(fc["ipv6"]["address"], format!("{}/64", info["guest_ipv6"].as_str().unwrap()).as_str());
    assert_eq!(fc["ipv6"]["gateway"], info["gateway_ipv6"]);
    let ca = fc["ca_cert"].as_str().expect("a CA path");
    assert_eq!(ca, info["ca_cert"].as_str().unwrap());
    let pem = std::fs::read_to_string(ca).unwrap_or_else(|e| panic!("the CA {ca}: {e}"));
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert!(!pem.contains("PRIVATE KEY"), "the CA file a VMM copies into the guest holds a key");
    // `sandbox show -o firecracker` says the same.
    let again: Value = serde_json::from_str(&w.h.cli_ok(&["sandbox", "show", &fc_name, "-o", "firecracker"])).unwrap();
    assert_eq!(again, fc);

    // Cloud Hypervisor: --net on the existing tap, and --cmdline.
    let ch_name = unique_name("ch");
    let text = w.h.cli_ok(&["sandbox", "create", &ch_name, "--policy", "agents", "-o", "cloud-hypervisor"]);
    let info = show(&ch_name);
    let tap = info["tap"].as_str().unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{text}");
    assert_eq!(words[0], "--net");
    assert_eq!(words[1], format!("tap={tap},mac={},num_queues=2", info["guest_mac"].as_str().unwrap()));
    assert!(link_exists(&w, tap));
    assert_eq!(words[2], "--cmdline");
    assert!(words[3].starts_with(&format!("ip={}::", info["guest_ipv4"].as_str().unwrap())), "{text}");
    // An adopted tap whose name a shell would glob (the kernel allows '['):
    // no words for an unquoted $(…), while Firecracker's JSON carries it.
    // The tap lives in the topology's namespace, which goes with the test.
    let glob_tap = "ch[0]";
    let made = run_in(w.h.topology.host.name(), "ip", &["tuntap", "add", "dev", glob_tap, "mode", "tap"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let adopted = unique_name("glob");
    w.h.cli_ok(&["sandbox", "create", &adopted, "--policy", "agents", "--tap", glob_tap]);
    let refusal = w.h.cli_err(&["sandbox", "show", &adopted, "-o", "cloud-hypervisor"]);
    assert!(refusal.contains("glob character") && refusal.contains(glob_tap), "{refusal}");
    let fc: Value = serde_json::from_str(&w.h.cli_ok(&["sandbox", "show", &adopted, "-o", "firecracker"])).unwrap();
    assert_eq!(fc["network-interfaces"][0]["host_dev_name"], glob_tap);
    w.h.cli_ok(&["sandbox", "delete", &adopted]);

    // Shell variables: sh's eval gives back the values.
    let env_name = unique_name("env");
    let text = w.h.cli_ok(&["sandbox", "create", &env_name, "--policy", "agents", "-o", "env"]);
    let info = show(&env_name);
    let script = r#"eval "$1"; printf '%s\n' "$SBX_NET_NAME" "$SBX_NET_TAP" "$SBX_NET_GUEST_MAC" "$SBX_NET_GUEST_IPV4" "$SBX_NET_GATEWAY_IPV4" "$SBX_NET_GUEST_IPV6" "$SBX_NET_GATEWAY_IPV6" "$SBX_NET_DNS" "$SBX_NET_CA_CERT" "$SBX_NET_POLICY" "$SBX_NET_KERNEL_IP_ARG""#;
    let out = Command::new(require_tool("sh")).args(["-c", script, "sh", &text]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let values: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let field = |k: &str| info[k].as_str().unwrap().to_string();
    let kernel = format!("ip={}::{}:255.255.255.252::eth0:off:{}", field("guest_ipv4"), field("gateway_ipv4"), field("dns"));
    assert_eq!(
        values,
        [
            env_name.clone(),
            field("tap"),
            field("guest_mac"),
            field("guest_ipv4"),
            field("gateway_ipv4"),
            field("guest_ipv6"),
            field("gateway_ipv6"),
            field("dns"),
            field("ca_cert"),
            "agents".to_string(),
            kernel,
        ]
    );
    assert!(link_exists(&w, &field("tap")));
    // A tap that has a guest already is not handed to a VMM.
    let busy = unique_name("ng");
    w.h.create_guest(&busy, "agents");
    let refusal = w.h.cli_err(&["sandbox", "show", &busy, "-o", "firecracker"]);
    assert!(refusal.contains("already has a guest"), "{refusal}");
    w.h.cli_ok(&["sandbox", "delete", &busy]);
    // `-o json` stays the daemon's answer, on one line.
    let json_text = w.h.cli_ok(&["sandbox", "show", &env_name, "-o", "json"]);
    assert_eq!(serde_json::from_str::<Value>(&json_text).unwrap(), info);
    for name in [&fc_name, &ch_name, &env_name] {
        w.h.cli_ok(&["sandbox", "delete", name]);
    }
}
