//! `cargo xtask bench fleet` (issue 15): a fleet of 100 hosts on this
//! machine taking policy `fleet` from one real etcd, and the time from
//! `sbx-net policy push` to the new version being in force on every host.
//!
//! - **10 real daemons**, each in its own host namespace (the tests'
//!   `DaemonHarness`: its own pin dir, state dir, socket), started with
//!   `--policy-source etcd://… --host-name real-I` and running one sandbox on
//!   policy `fleet`. In force = an address of the push's new CIDR is allowed
//!   by the sandbox's generation in the daemon's pinned IPv4 trie, read back
//!   with bpf(2) exactly as the classifier looks it up (the sandbox's
//!   `policy_id` from the pinned slot array, then one LPM lookup).
//! - **90 light hosts**, one `sbx-net __fleet-light-hosts` process in a
//!   namespace of its own (each host its own etcd connection, the daemon's
//!   watch / validate / merge / compile path). In force = the host's status
//!   key shows `in_force[KEY] ≥` the push's revision, as seen by a watch on
//!   the status prefix.
//! - **etcd** (Debian's `etcd-server`) in a namespace of its own with a
//!   bridge; every host namespace joins the bridge with a veth, so hosts
//!   reach etcd over a link, not loopback. Nothing touches the root
//!   namespace's routes, nftables or forwarding.
//!
//! Also the idle fleet's cost: etcd's CPU (utime + stime) and RSS over 10 s
//! with no watcher (before any host starts) and with the 100 hosts watching.
//! Every wait is bounded; namespaces, pin dirs and processes go on drop,
//! also on failure.

use std::collections::HashMap;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, Map, MapData, MapError};
use sbx_net::datapath::key_v4;
use sbx_net_common::{action, map_names, KeyV4, PolicyValue, SandboxConfig, SANDBOX_SLOTS};
use sbx_net_tests::daemon::{sbx_net_bin, DaemonHarness};
use sbx_net_tests::{netns_command, unique_name, Background};
use sbx_vmm::NetNs;

use super::{kernel, num_cpus, percentile, rss_kb};

const REAL_HOSTS: usize = 10;
const LIGHT_HOSTS: usize = 90;
const PUSHES: usize = 50;
/// Pushes before the measured ones (connections and caches warm), not counted.
const WARMUP_PUSHES: usize = 2;
/// A push not in force everywhere by then fails the benchmark.
const PUSH_DEADLINE: Duration = Duration::from_secs(30);
/// Between one push in force everywhere and the next.
const PAUSE_BETWEEN_PUSHES: Duration = Duration::from_millis(250);
/// Until every host reports the initial policy.
const FLEET_READY_DEADLINE: Duration = Duration::from_secs(120);
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// The seed's org-wide propagation: "within five minutes".
const SEED_SECONDS: f64 = 300.0;
const PREFIX: &str = "fleetbench";
const POLICY: &str = "fleet";
/// etcd's ports inside its own namespace (nothing else listens there).
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// The fleet's link network: the bridge in etcd's namespace…
const ETCD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
/// …the light-host namespace…
const LIGHT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 250);

/// …and real host `i`.
fn real_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 254, 0, 10 + i as u8)
}

/// The CIDR push `k` adds to the allow list, and an address in it.
/// 198.18.0.0/15 (benchmarking, RFC 2544) is not on the built-in deny list.
fn push_cidr(k: usize) -> (String, Ipv4Addr) {
    let k = u8::try_from(k).expect("at most 256 pushes");
    (format!("198.18.{k}.0/24"), Ipv4Addr::new(198, 18, k, 1))
}

/// Policy `fleet` after `pushes` pushes: default deny, one allowed /24 per
/// push so far (plus one that is there from the start).
fn policy_text(pushes: usize) -> String {
    let mut allow = vec!["\"198.19.255.0/24\"".to_string()];
    allow.extend((0..pushes).map(|k| format!("\"{}\"", push_cidr(k).0)));
    format!("name = \"{POLICY}\"\n\n[network]\ndefault = \"deny\"\nallow = [{}]\n", allow.join(", "))
}

pub fn fleet_bench() -> Result<()> {
    sbx_net_tests::require_root();
    println!("## Fleet (`cargo xtask bench fleet`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    let dir = TempDir::new("fleet-bench")?;
    let net = FleetNet::new()?;
    let etcd = FleetEtcd::start(&net.etcd, &dir.0)?;
    let local_url = format!("etcd://127.0.0.1:{ETCD_CLIENT_PORT}/{PREFIX}");
    let host_url = format!("etcd://{ETCD_ADDR}:{ETCD_CLIENT_PORT}/{PREFIX}");

    let policy_file = dir.0.join(format!("{POLICY}.toml"));
    std::fs::write(&policy_file, policy_text(0))?;
    let initial = push_now(&net.etcd, &local_url, &policy_file)?;
    let policy_key = initial.key.clone();
    eprintln!("[fleet] etcd up in {}; {policy_key} at revision {}", net.etcd.name(), initial.revision);

    // etcd alone: the policy key, no client.
    std::thread::sleep(Duration::from_secs(1));
    let quiet = idle_sample(&[etcd.pid()], IDLE_WINDOW)?;

    let mut light = start_light_hosts(&net, &host_url, &dir.0)?;
    let mut reals = Vec::with_capacity(REAL_HOSTS);
    for i in 0..REAL_HOSTS {
        reals.push(RealHost::start(i, &net, &host_url)?);
        eprintln!("[fleet] real-{i} up");
    }
    wait_fleet_ready(&etcd, &policy_key, initial.revision, &mut light, &dir.0)?;
    eprintln!("[fleet] all {} hosts enforce {policy_key}@{}", REAL_HOSTS + LIGHT_HOSTS, initial.revision);

    // The idle fleet: nothing pushed, nothing of the benchmark's connected.
    std::thread::sleep(Duration::from_secs(2));
    let daemon_pids: Vec<u32> = reals.iter().filter_map(|r| r.harness.daemon_pid()).collect();
    let mut pids = vec![etcd.pid(), light.0.id()];
    pids.extend(&daemon_pids);
    let busy = idle_sample(&pids, IDLE_WINDOW)?;

    let watcher = StatusWatcher::start(&net.etcd, &policy_key);
    watcher.wait_connected(Duration::from_secs(10))?;
    let mut samples = Vec::with_capacity(PUSHES);
    for k in 0..WARMUP_PUSHES + PUSHES {
        std::fs::write(&policy_file, policy_text(k + 1))?;
        let sample = measure_push(k, &net, &local_url, &policy_file, &reals, &watcher, &mut light, &dir.0)
            .with_context(|| format!("push {} ({})", k + 1, push_cidr(k).0))?;
        if k >= WARMUP_PUSHES {
            samples.push(sample);
        }
        std::thread::sleep(PAUSE_BETWEEN_PUSHES);
    }
    let fleet = fleet_status(&net.etcd, &local_url)?;
    drop(watcher);

    report(&samples, &quiet, &busy, &daemon_pids, &fleet);
    Ok(())
}

/// A directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ip ARGS…`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// etcd's namespace with the bridge `fleetbr` (10.254.0.1/24), and the
/// light hosts' namespace on it. Dropping the namespaces removes the bridge
/// and every veth.
struct FleetNet {
    etcd: NetNs,
    light: NetNs,
}

impl FleetNet {
    fn new() -> Result<FleetNet> {
        let etcd = NetNs::create(&unique_name("fleet-etcd")).context("etcd netns")?;
        let light = NetNs::create(&unique_name("fleet-light")).context("light-host netns")?;
        let net = FleetNet { etcd, light };
        let e = net.etcd.name();
        ip(&["-n", e, "link", "set", "lo", "up"])?;
        ip(&["-n", e, "link", "add", "fleetbr", "type", "bridge"])?;
        ip(&["-n", e, "addr", "add", &format!("{ETCD_ADDR}/24"), "dev", "fleetbr"])?;
        ip(&["-n", e, "link", "set", "fleetbr", "up"])?;
        ip(&["-n", net.light.name(), "link", "set", "lo", "up"])?;
        net.join(net.light.name(), "frlight", LIGHT_ADDR)?;
        Ok(net)
    }

    /// Joins namespace `ns` to the bridge: `etcd0` there with `addr`/24,
    /// its peer `port` on the bridge.
    fn join(&self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        let e = self.etcd.name();
        ip(&["-n", e, "link", "add", port, "type", "veth", "peer", "name", "etcd0", "netns", ns])?;
        ip(&["-n", e, "link", "set", port, "master", "fleetbr"])?;
        ip(&["-n", e, "link", "set", port, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "etcd0"])?;
        ip(&["-n", ns, "link", "set", "etcd0", "up"])
    }
}

/// A real etcd in the fleet's etcd namespace, listening on the bridge
/// address (the hosts) and on loopback (the benchmark's own clients).
/// Killed, and its data dir removed, on drop.
struct FleetEtcd {
    child: Child,
    ns: String,
    log: PathBuf,
}

impl FleetEtcd {
    fn start(ns: &NetNs, dir: &Path) -> Result<FleetEtcd> {
        let log_path = dir.join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let clients = format!("http://{ETCD_ADDR}:{ETCD_CLIENT_PORT},http://127.0.0.1:{ETCD_CLIENT_PORT}");
        let advertise = format!("http://{ETCD_ADDR}:{ETCD_CLIENT_PORT}");
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let child = netns_command(ns.name(), "etcd")
            .args(["--name", "sbx-fleet-bench", "--data-dir"])
            .arg(dir.join("etcd-data"))
            .args(["--listen-client-urls", &clients, "--advertise-client-urls", &advertise])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("sbx-fleet-bench={peer}")])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn etcd")?;
        let mut etcd = FleetEtcd { child, ns: ns.name().to_string(), log: log_path };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = etcd.child.try_wait()? {
                bail!("etcd exited with {status}:\n{}", etcd.log_tail());
            }
            if etcd.etcdctl(&["endpoint", "health"])?.status.success() {
                return Ok(etcd);
            }
            if Instant::now() >= deadline {
                bail!("etcd did not answer within 30 s:\n{}", etcd.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// etcd's own pid (`ip netns exec` execs it in place).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        netns_command(&self.ns, "etcdctl")
            .args(["--endpoints", &format!("127.0.0.1:{ETCD_CLIENT_PORT}"), "--command-timeout=5s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .context("running etcdctl")
    }

    fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for FleetEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `sbx-net policy push`'s answer.
struct Pushed {
    key: String,
    revision: i64,
}

/// `sbx-net policy push FILE --etcd URL`, run in etcd's namespace.
fn push_command(ns: &NetNs, url: &str, file: &Path) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns.name()]).arg(sbx_net_bin()).args(["policy", "push"]).arg(file).args(["--etcd", url]);
    command
}

fn parse_pushed(out: &Output) -> Result<Pushed> {
    if !out.status.success() {
        bail!("sbx-net policy push failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).with_context(|| format!("policy push printed no JSON: {text}"))?;
    Ok(Pushed {
        key: v["key"].as_str().with_context(|| format!("no key in {v}"))?.to_string(),
        revision: v["revision"].as_i64().with_context(|| format!("no revision in {v}"))?,
    })
}

fn push_now(ns: &NetNs, url: &str, file: &Path) -> Result<Pushed> {
    parse_pushed(&push_command(ns, url, file).output().context("running sbx-net policy push")?)
}

/// One real daemon with one sandbox on policy `fleet`, and the pinned maps
/// the benchmark reads its verdicts from.
struct RealHost {
    probe: TrieProbe,
    harness: DaemonHarness,
}

impl RealHost {
    fn start(i: usize, net: &FleetNet, url: &str) -> Result<RealHost> {
        let name = format!("real-{i}");
        let mut harness = DaemonHarness::prepared(&format!("fleet{i}"), &[], None, &["--policy-source", url, "--host-name", name.as_str()]);
        net.join(harness.topology.host.name(), &format!("fr{i}"), real_addr(i))?;
        harness.start_daemon();
        let created = harness.json(&["sandbox", "create", &format!("fleet-{i}"), "--policy", POLICY]);
        let tap = created["tap"].as_str().with_context(|| format!("sandbox create printed no tap: {created}"))?;
        let ifindex = harness.topology.host_netlink.link_index(tap).with_context(|| format!("{name}: tap {tap}"))?;
        let probe = TrieProbe::open(&harness.bpf_dir, ifindex).with_context(|| format!("{name}: pinned maps in {}", harness.bpf_dir.display()))?;
        Ok(RealHost { probe, harness })
    }
}

/// A sandbox's verdicts as the classifier finds them: its config in the
/// pinned slot array (by the tap's ifindex) names the generation in force,
/// whose entries the pinned IPv4 trie holds under that `policy_id`.
struct TrieProbe {
    slots: Array<MapData, SandboxConfig>,
    v4: LpmTrie<MapData, KeyV4, PolicyValue>,
    ifindex: u32,
}

impl TrieProbe {
    fn open(pin_dir: &Path, ifindex: u32) -> Result<TrieProbe> {
        if ifindex >= SANDBOX_SLOTS {
            bail!("tap ifindex {ifindex} is beyond the slot array (its config is in the hash map)");
        }
        let slots = Array::try_from(Map::Array(MapData::from_pin(pin_dir.join(map_names::SANDBOX_SLOTS))?))?;
        let v4 = LpmTrie::try_from(Map::LpmTrie(MapData::from_pin(pin_dir.join(map_names::POLICY_V4))?))?;
        Ok(TrieProbe { slots, v4, ifindex })
    }

    /// Whether the sandbox's policy in force allows `dst` (any port).
    fn allows(&self, dst: Ipv4Addr) -> Result<bool> {
        let config = self.slots.get(&self.ifindex, 0)?;
        if config.sandbox_id == 0 {
            bail!("no sandbox config on ifindex {}", self.ifindex);
        }
        match self.v4.get(&key_v4(config.policy_id, dst.octets(), 32), 0) {
            Ok(value) => Ok(value.any_port.action == action::ALLOW),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// The 90 light hosts: one process in the light namespace; killed on drop.
fn start_light_hosts(net: &FleetNet, url: &str, dir: &Path) -> Result<Background> {
    let log = std::fs::File::create(dir.join("light-hosts.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", net.light.name()])
        .arg(sbx_net_bin())
        .args(["__fleet-light-hosts", "--etcd", url, "--count", &LIGHT_HOSTS.to_string(), "--name-prefix", "light-"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawn sbx-net __fleet-light-hosts")?;
    Ok(Background(child))
}

fn light_failed(light: &mut Background, dir: &Path) -> Result<()> {
    if let Some(status) = light.0.try_wait()? {
        bail!("the light-host process exited with {status}:\n{}", tail(&dir.join("light-hosts.log")));
    }
    Ok(())
}

/// The benchmark's host names.
fn host_names() -> Vec<String> {
    (0..REAL_HOSTS).map(|i| format!("real-{i}")).chain((0..LIGHT_HOSTS).map(|i| format!("light-{i}"))).collect()
}

/// Waits until every host's status key says it enforces `key` at
/// `revision` or later (etcdctl reads, every 500 ms).
fn wait_fleet_ready(etcd: &FleetEtcd, key: &str, revision: i64, light: &mut Background, dir: &Path) -> Result<()> {
    let deadline = Instant::now() + FLEET_READY_DEADLINE;
    let status_prefix = format!("/{PREFIX}/status/");
    loop {
        light_failed(light, dir)?;
        let ready = hosts_in_force(etcd, &status_prefix, key, revision)?;
        let missing: Vec<String> = host_names().into_iter().filter(|h| !ready.contains(h)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "after {FLEET_READY_DEADLINE:?}, {} hosts do not report {key}@{revision} in their status: {}\n--- light hosts ---\n{}",
                missing.len(),
                missing.join(" "),
                tail(&dir.join("light-hosts.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The hosts whose status key (under `status_prefix`) shows `key` in force
/// at `revision` or later: one `etcdctl get -w json` (keys and values in
/// base64, so a value's own newlines do not matter).
fn hosts_in_force(etcd: &FleetEtcd, status_prefix: &str, key: &str, revision: i64) -> Result<std::collections::BTreeSet<String>> {
    use base64::Engine;
    let out = etcd.etcdctl(&["get", "--prefix", "-w", "json", status_prefix])?;
    if !out.status.success() {
        bail!("etcdctl get {status_prefix}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).context("etcdctl get -w json")?;
    let decode = |v: &serde_json::Value| v.as_str().and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok());
    let mut ready = std::collections::BTreeSet::new();
    for kv in got["kvs"].as_array().into_iter().flatten() {
        let (Some(k), Some(v)) = (decode(&kv["key"]), decode(&kv["value"])) else { continue };
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&v) else { continue };
        if status["in_force"][key].as_i64().is_some_and(|r| r >= revision) {
            let k = String::from_utf8_lossy(&k);
            ready.insert(k.rsplit('/').next().unwrap_or_default().to_string());
        }
    }
    Ok(ready)
}

/// What the status watch has seen of each host: the revisions of the
/// policy key it reported in force, each with when the watch saw it.
#[derive(Default)]
struct FleetView {
    connected: bool,
    error: Option<String>,
    hosts: HashMap<String, Vec<(i64, Instant)>>,
}

impl FleetView {
    /// When `host` first reported `revision` or later.
    fn in_force_at(&self, host: &str, revision: i64) -> Option<Instant> {
        self.hosts.get(host)?.iter().find(|(r, _)| *r >= revision).map(|(_, at)| *at)
    }

    fn record(&mut self, key: &str, value: &[u8], policy_key: &str, at: Instant) {
        let Some(host) = key.rsplit('/').next() else { return };
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(value) else { return };
        let Some(revision) = status["in_force"][policy_key].as_i64() else { return };
        let seen = self.hosts.entry(host.to_string()).or_default();
        if seen.last().is_none_or(|(r, _)| revision > *r) {
            seen.push((revision, at));
        }
    }
}

/// A watch on PREFIX/status/ (etcd-client, from etcd's namespace, on a
/// thread of its own); stopped on drop.
struct StatusWatcher {
    view: Arc<Mutex<FleetView>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatusWatcher {
    fn start(etcd_ns: &NetNs, policy_key: &str) -> StatusWatcher {
        let view = Arc::new(Mutex::new(FleetView::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, key, v, s) = (etcd_ns.name().to_string(), policy_key.to_string(), view.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let result = (|| -> Result<()> {
                // The watch's socket is made in etcd's namespace.
                NetNs::open(&ns)?.enter_current_thread()?;
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(watch_statuses(&v, &s, &key))
            })();
            if let Err(e) = result {
                v.lock().expect("view lock").error = Some(format!("{e:#}"));
            }
        });
        StatusWatcher { view, stop, thread: Some(thread) }
    }

    fn check(&self) -> Result<()> {
        if let Some(e) = &self.view.lock().expect("view lock").error {
            bail!("the status watch failed: {e}");
        }
        Ok(())
    }

    fn wait_connected(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !self.view.lock().expect("view lock").connected {
            self.check()?;
            if Instant::now() >= deadline {
                bail!("the status watch did not start within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for StatusWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn watch_statuses(view: &Mutex<FleetView>, stop: &AtomicBool, policy_key: &str) -> Result<()> {
    use etcd_client::{EventType, GetOptions, WatchOptions};
    let prefix = format!("/{PREFIX}/status/");
    let mut client = tokio::time::timeout(
        Duration::from_secs(5),
        etcd_client::Client::connect([format!("127.0.0.1:{ETCD_CLIENT_PORT}")], None),
    )
    .await
    .context("connecting to etcd: timed out")??;
    let got = client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
    let now = Instant::now();
    {
        let mut view = view.lock().expect("view lock");
        for kv in got.kvs() {
            view.record(kv.key_str()?, kv.value(), policy_key, now);
        }
    }
    let revision = got.header().context("get without header")?.revision();
    let mut stream = client.watch(prefix.as_str(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1))).await?;
    view.lock().expect("view lock").connected = true;
    while !stop.load(Ordering::Relaxed) {
        // Bounded, so `stop` is seen within 200 ms.
        let Ok(message) = tokio::time::timeout(Duration::from_millis(200), stream.message()).await else { continue };
        let Some(response) = message? else { bail!("etcd ended the watch") };
        if response.canceled() {
            bail!("etcd cancelled the watch: {}", response.cancel_reason());
        }
        let now = Instant::now();
        let mut view = view.lock().expect("view lock");
        for event in response.events() {
            if let (EventType::Put, Some(kv)) = (event.event_type(), event.kv()) {
                view.record(kv.key_str()?, kv.value(), policy_key, now);
            }
        }
    }
    Ok(())
}

/// One push: ms from the push command's start to each host having it.
struct PushSample {
    command_ms: f64,
    real_ms: Vec<f64>,
    /// The real daemons' own status keys (acknowledged, as light hosts are measured).
    real_status_ms: Vec<f64>,
    light_ms: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn measure_push(
    k: usize,
    net: &FleetNet,
    url: &str,
    file: &Path,
    reals: &[RealHost],
    watcher: &StatusWatcher,
    light: &mut Background,
    dir: &Path,
) -> Result<PushSample> {
    let (_, probe_addr) = push_cidr(k);
    let lights: Vec<String> = (0..LIGHT_HOSTS).map(|i| format!("light-{i}")).collect();
    let started = Instant::now();
    let deadline = started + PUSH_DEADLINE;
    let mut command = Background(push_command(&net.etcd, url, file).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("spawn sbx-net policy push")?);
    let mut pushed: Option<(Pushed, f64)> = None;
    let mut real_at: Vec<Option<f64>> = vec![None; reals.len()];
    loop {
        for (at, host) in real_at.iter_mut().zip(reals) {
            if at.is_none() && host.probe.allows(probe_addr)? {
                *at = Some(ms_since(started));
            }
        }
        if pushed.is_none() {
            if let Some(status) = command.0.try_wait()? {
                let command_ms = ms_since(started);
                let mut stdout = Vec::new();
                let mut stderr = Vec::new();
                command.0.stdout.take().context("piped stdout")?.read_to_end(&mut stdout)?;
                command.0.stderr.take().context("piped stderr")?.read_to_end(&mut stderr)?;
                pushed = Some((parse_pushed(&Output { status, stdout, stderr })?, command_ms));
            }
        }
        let lights_done = match &pushed {
            Some((p, _)) => {
                let view = watcher.view.lock().expect("view lock");
                lights.iter().all(|h| view.in_force_at(h, p.revision).is_some())
            }
            None => false,
        };
        if lights_done && real_at.iter().all(Option::is_some) {
            break;
        }
        if Instant::now() >= deadline {
            let late_real: Vec<String> = real_at.iter().enumerate().filter(|(_, a)| a.is_none()).map(|(i, _)| format!("real-{i}")).collect();
            bail!(
                "not in force everywhere after {PUSH_DEADLINE:?} (push done: {}; real daemons without it: {late_real:?})",
                pushed.is_some()
            );
        }
        watcher.check()?;
        light_failed(light, dir)?;
        // Polling: ten pinned-map reads a round; 1 ms is the resolution.
        std::thread::sleep(Duration::from_millis(1));
    }
    let (pushed, command_ms) = pushed.expect("the loop ends after the push");
    // The daemons' status keys may trail their maps: wait for them too
    // (bounded by the same deadline).
    let real_names: Vec<String> = (0..reals.len()).map(|i| format!("real-{i}")).collect();
    let acked = |view: &FleetView, hosts: &[String]| -> Option<Vec<f64>> {
        hosts.iter().map(|h| view.in_force_at(h, pushed.revision).map(|at| (at - started).as_secs_f64() * 1000.0)).collect()
    };
    let (real_status_ms, light_ms) = loop {
        {
            let view = watcher.view.lock().expect("view lock");
            if let (Some(r), Some(l)) = (acked(&view, &real_names), acked(&view, &lights)) {
                break (r, l);
            }
        }
        if Instant::now() >= deadline {
            bail!("the real daemons' status keys do not show revision {} after {PUSH_DEADLINE:?}", pushed.revision);
        }
        watcher.check()?;
        std::thread::sleep(Duration::from_millis(5));
    };
    let real_ms: Vec<f64> = real_at.into_iter().map(|a| a.expect("all set")).collect();
    eprintln!(
        "[fleet] push {:>2} rev {}: command {command_ms:.0} ms, real max {:.0} ms, light max {:.0} ms",
        k + 1,
        pushed.revision,
        real_ms.iter().copied().fold(0.0, f64::max),
        light_ms.iter().copied().fold(0.0, f64::max)
    );
    Ok(PushSample { command_ms, real_ms, real_status_ms, light_ms })
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// `sbx-net fleet status --json` at the end: (hosts listed, rejections).
fn fleet_status(ns: &NetNs, url: &str) -> Result<(usize, usize)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(sbx_net_bin())
        .args(["fleet", "status", "--etcd", url, "--json"])
        .output()
        .context("running sbx-net fleet status")?;
    if !out.status.success() {
        bail!("sbx-net fleet status failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fleet status --json")?;
    let hosts = v["hosts"].as_array().context("no hosts in fleet status")?;
    let rejected = hosts.iter().map(|h| h["rejected"].as_array().map_or(0, Vec::len)).sum();
    Ok((hosts.len(), rejected))
}

/// CPU (utime + stime, all threads) of processes over a window, and their
/// RSS at its end.
struct Idle {
    /// Per pid: % of one core over the window.
    cpu_percent: Vec<f64>,
    rss_kb: Vec<u64>,
    window: Duration,
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // After "pid (comm) ": state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("stat without comm")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn idle_sample(pids: &[u32], window: Duration) -> Result<Idle> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect::<Result<_>>()?;
    let started = Instant::now();
    std::thread::sleep(window);
    let after: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect::<Result<_>>()?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_percent = before.iter().zip(&after).map(|(b, a)| (a - b) as f64 / ticks_per_second / seconds * 100.0).collect();
    Ok(Idle { cpu_percent, rss_kb: pids.iter().map(|p| rss_kb(*p)).collect(), window })
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// `| label | what | p50 | p99 | max | 300 s / p99 |` of `values` (ms).
fn row(label: &str, what: &str, values: Vec<f64>) {
    let v = sorted(values);
    let p99 = percentile(&v, 0.99);
    println!(
        "| {label} | {what} | {:.0} | {p99:.0} | {:.0} | {:.0}× |",
        percentile(&v, 0.5),
        v[v.len() - 1],
        SEED_SECONDS * 1000.0 / p99
    );
}

fn report(samples: &[PushSample], quiet: &Idle, busy: &Idle, daemon_pids: &[u32], fleet: &(usize, usize)) {
    let slowest = |f: &dyn Fn(&PushSample) -> Vec<f64>| -> Vec<f64> { samples.iter().map(|s| max(&f(s))).collect() };
    let all = |s: &PushSample| -> Vec<f64> { s.real_ms.iter().chain(&s.light_ms).copied().collect() };
    println!("### From `policy push` to every host ({PUSHES} pushes, each adding a /24 to the allow list of policy `{POLICY}`)\n");
    println!(
        "{REAL_HOSTS} real daemons (each in its own host namespace, one sandbox on `{POLICY}`) and {LIGHT_HOSTS} light hosts (one `sbx-net __fleet-light-hosts` process), all watching one etcd over veths. Time from the start of the `sbx-net policy push` process. Real daemon: an address of the new /24 allowed by the sandbox's generation in force in its pinned trie (read back with bpf(2), polled every ms). Light host: its status key shows the policy key in force at the push's revision or later (a watch on the status prefix). {WARMUP_PUSHES} warm-up pushes not counted. Percentiles by nearest rank: of {PUSHES} pushes, p99 is the slowest.\n"
    );
    println!("| hosts | per push | p50 ms | p99 ms | max ms | seed's 300 s / p99 |");
    println!("|---|---|---:|---:|---:|---:|");
    row(&format!("all {}", REAL_HOSTS + LIGHT_HOSTS), "slowest host", slowest(&all));
    row(&format!("{REAL_HOSTS} real daemons"), "slowest daemon's pinned trie", slowest(&|s| s.real_ms.clone()));
    row(&format!("{LIGHT_HOSTS} light hosts"), "slowest light host's status key", slowest(&|s| s.light_ms.clone()));
    row(&format!("{REAL_HOSTS} real daemons"), "slowest daemon's status key", slowest(&|s| s.real_status_ms.clone()));
    row("any one host", &format!("every host of every push ({} samples)", samples.len() * (REAL_HOSTS + LIGHT_HOSTS)), samples.iter().flat_map(&all).collect());
    row("the push itself", "`sbx-net policy push` process, start to exit", samples.iter().map(|s| s.command_ms).collect());
    let p99_all = percentile(&sorted(slowest(&all)), 0.99);
    println!("\n{:.0}× faster than the seed's five minutes at p99.\n", SEED_SECONDS * 1000.0 / p99_all);
    crate::common::record("fleet", "push to every host (slowest host per push)", "ms", crate::common::Better::Lower, &slowest(&all));
    crate::common::record("fleet", "push to every host p99", "ms", crate::common::Better::Lower, &[p99_all]);
    crate::common::check_target("fleet", "p99 < 1 s from `policy push` to every host", format!("{p99_all:.0} ms"), p99_all < 1000.0);
    println!();
    println!("`sbx-net fleet status` after the run: {} hosts, {} rejections.\n", fleet.0, fleet.1);

    println!("### Idle fleet ({:.0} s, nothing pushed)\n", busy.window.as_secs_f64());
    println!("CPU = utime + stime of the process (all threads) over the window, % of one core; RSS at its end.\n");
    println!("| process | etcd watchers | CPU % | RSS MiB |");
    println!("|---|---:|---:|---:|");
    let mib = |kb: u64| kb as f64 / 1024.0;
    println!("| etcd, before any host started | 0 | {:.2} | {:.1} |", quiet.cpu_percent[0], mib(quiet.rss_kb[0]));
    println!(
        "| etcd, the {} hosts up (a watch and a status lease each) | {} | {:.2} | {:.1} |",
        REAL_HOSTS + LIGHT_HOSTS,
        REAL_HOSTS + LIGHT_HOSTS,
        busy.cpu_percent[0],
        mib(busy.rss_kb[0])
    );
    println!(
        "| `__fleet-light-hosts` ({LIGHT_HOSTS} hosts; per host: {:.0} KiB) | {LIGHT_HOSTS} | {:.2} | {:.1} |",
        busy.rss_kb[1] as f64 / LIGHT_HOSTS as f64,
        busy.cpu_percent[1],
        mib(busy.rss_kb[1])
    );
    let daemons_cpu: f64 = busy.cpu_percent[2..].iter().sum();
    let daemons_rss: u64 = busy.rss_kb[2..].iter().sum();
    println!(
        "| {} real daemons together (without their data planes) | {} | {daemons_cpu:.2} | {:.1} |",
        daemon_pids.len(),
        daemon_pids.len(),
        mib(daemons_rss)
    );
    println!(
        "\netcd with {} watchers / with none: CPU {:.2} / {:.2} % of a core, RSS {:.1} / {:.1} MiB.\n",
        REAL_HOSTS + LIGHT_HOSTS,
        busy.cpu_percent[0],
        quiet.cpu_percent[0],
        mib(busy.rss_kb[0]),
        mib(quiet.rss_kb[0])
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_add_allowed_cidrs_off_the_builtin_deny_list() {
        let policy = sbx_net::Policy::parse("fleet.toml", &policy_text(3)).unwrap();
        assert_eq!(policy.name, POLICY);
        assert_eq!(policy.rules.len(), 4);
        for k in 0..WARMUP_PUSHES + PUSHES {
            let (cidr, addr) = push_cidr(k);
            let net: ipnetwork::IpNetwork = cidr.parse().unwrap();
            assert!(net.contains(addr.into()));
            for rule in sbx_net::policy::builtin_deny_rules() {
                if let sbx_net::policy::Target::Cidr(deny) = rule.target {
                    assert!(!deny.contains(addr.into()), "{addr} is denied by the built-in {deny}");
                }
            }
        }
    }

    #[test]
    fn status_view_keeps_the_first_sighting_of_each_revision() {
        let key = "/fleetbench/policies/all/fleet";
        let mut view = FleetView::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        let status = |rev: i64| format!(r#"{{"host":"light-1","in_force":{{"{key}":{rev}}}}}"#);
        view.record("/fleetbench/status/light-1", status(7).as_bytes(), key, t0);
        view.record("/fleetbench/status/light-1", status(7).as_bytes(), key, t1);
        view.record("/fleetbench/status/light-1", status(9).as_bytes(), key, t1);
        assert_eq!(view.in_force_at("light-1", 7), Some(t0));
        assert_eq!(view.in_force_at("light-1", 8), Some(t1));
        assert_eq!(view.in_force_at("light-1", 10), None);
        assert_eq!(view.in_force_at("light-2", 1), None);
    }

    #[test]
    fn cpu_ticks_reads_this_process() {
        assert!(cpu_ticks(std::process::id()).is_ok());
    }
}
