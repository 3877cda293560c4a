//! Restart and upgrade without cutting anyone off: a guest holds a direct
//! TCP flow, kept-alive HTTP/1.1 and HTTP/2 connections to a spliced host
//! and to a credential host, a 25 s server-sent-events stream through the
//! credential proxy and DNS queries every 50 ms over UDP and TCP, across
//! (a) `kill -9` of the daemon and its restart, (c) a policy reload that
//! keeps them allowed and (b) an upgrade to a different build — with zero
//! errors. Then (d) `kill -9` of the data plane itself: new connections and
//! queries work again at once, and nothing passes unchecked meanwhile.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::https::{HttpsEcho, TestCa};
use sbx_net_tests::live_load::{LineEcho, LiveLoad, LoadTargets};
use sbx_net_tests::{require_root, unique_name, wait_until, WorldDns};

const KEEP: &str = "198.51.100.64";

const SECRET: &str = "sbx-upgrade-secret-5d1e";
const SPLICED: &str = "198.51.100.60";
const CREDENTIAL: &str = "198.51.100.61";
const DIRECT: &str = "198.51.100.62";
const DENIED: &str = "198.51.100.63";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn policy(secret_file: &std::path::Path, extra_allow: &str) -> String {
    policy_allowing(secret_file, &format!("\"spliced.test\", \"api.test\", \"keep.test\", \"{DIRECT}\"{extra_allow}"))
}

fn policy_allowing(secret_file: &std::path::Path, allow: &str) -> String {
    format!(
        "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [{allow}]\n\
         [[credentials]]\nname = \"api\"\nhosts = [\"api.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{}\" }}\n",
        secret_file.display()
    )
}

/// The daemon's view of its data plane.
fn plane(h: &DaemonHarness) -> serde_json::Value {
    h.json(&["status", "--json"])["dataplane"].clone()
}

/// A copy of the binary that is another build (same code, other bytes).
fn other_build(h: &DaemonHarness) -> PathBuf {
    let copy = h.dir.join("sbx-net-next");
    let mut bytes = std::fs::read(sbx_net_tests::daemon::sbx_net_bin()).unwrap();
    bytes.extend_from_slice(b"\0sbx-net test build marker\0");
    std::fs::write(&copy, bytes).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    copy
}

/// A daemon with the `agent` policy, the world's servers (spliced.test,
/// api.test with a credential, denied.test, a line echo, DNS for them and
/// keep.test) and a netns guest.
struct World {
    h: DaemonHarness,
    ca: TestCa,
    secret_file: PathBuf,
    guest: serde_json::Value,
    _servers: (WorldDns, [HttpsEcho; 3], LineEcho),
}

impl World {
    fn start(tag: &str) -> World {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new(&dir);
        let secret_file = dir.join("token");
        std::fs::write(&secret_file, SECRET).unwrap();
        let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
        let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
        let text = policy(&secret_file, "");
        let h = DaemonHarness::with_args(tag, &[("agent.toml", text.as_str())], None, &[upstream.as_str(), upstream_ca.as_str()]);
        for a in [SPLICED, CREDENTIAL, DIRECT, DENIED] {
            h.topology.add_world_address(ip(a));
        }
        let records = [format!("spliced.test,{SPLICED},300"), format!("api.test,{CREDENTIAL},300"), format!("denied.test,{DENIED},300"), format!("keep.test,{KEEP},300")];
        let dns = WorldDns::start(&h.topology.world, &records, &[]);
        let https = [
            HttpsEcho::start(&h.topology.world, SocketAddr::new(ip(SPLICED), 443), &["spliced.test"], &ca, ""),
            HttpsEcho::start(&h.topology.world, SocketAddr::new(ip(CREDENTIAL), 443), &["api.test"], &ca, SECRET),
            HttpsEcho::start(&h.topology.world, SocketAddr::new(ip(DENIED), 443), &["denied.test"], &ca, ""),
        ];
        let echo = LineEcho::start(&h.topology.world, SocketAddr::new(ip(DIRECT), 7000));
        let guest = h.create_guest(&unique_name("g"), "agent");
        World { h, ca, secret_file, guest, _servers: (dns, https, echo) }
    }

    fn netns(&self) -> String {
        self.guest["netns"].as_str().unwrap().to_string()
    }

    /// The live load's targets, with an SSE stream of `sse_events`.
    fn targets(&self, sse_events: u32) -> LoadTargets {
        let gateway: IpAddr = self.guest["gateway_ipv4"].as_str().unwrap().parse().unwrap();
        LoadTargets {
            direct: SocketAddr::new(ip(DIRECT), 7000),
            spliced: ("spliced.test".into(), SocketAddr::new(ip(SPLICED), 443)),
            credential: ("api.test".into(), SocketAddr::new(ip(CREDENTIAL), 443)),
            world_ca: self.ca.pem_path.clone(),
            sandbox_ca: PathBuf::from(self.guest["ca_cert"].as_str().unwrap()),
            dns: SocketAddr::new(gateway, 53),
            dns_name: "keep.test".into(),
            sse_events,
            every: Duration::from_millis(50),
        }
    }
}

#[test]
fn live_connections_survive_daemon_restart_reload_upgrade_and_a_data_plane_crash() {
    require_root();
    let mut w = World::start("upg");
    let ns = w.netns();
    let first = plane(&w.h);
    assert_eq!(first["build_matches_daemon"], true, "{first}");
    let first_pid = first["pid"].as_u64().unwrap();
    let targets = w.targets(250);
    let (h, secret_file, g) = (&mut w.h, &w.secret_file, &w.guest);
    let load = LiveLoad::start(&ns, targets);
    load.wait_for_progress(&Default::default(), 5, Duration::from_secs(30));

    // (a) kill -9 of the daemon, and a restart: the data plane serves on and
    // is adopted (same process), not replaced.
    let before = load.oks();
    h.kill_daemon(libc::SIGKILL);
    load.wait_for_progress(&before, 10, Duration::from_secs(20));
    h.start_daemon();
    let adopted = plane(h);
    assert_eq!(adopted["pid"].as_u64(), Some(first_pid), "the restarted daemon adopted the running data plane: {adopted}");
    load.wait_for_progress(&before, 30, Duration::from_secs(20));

    // (c) a policy reload that keeps every destination allowed.
    let before = load.oks();
    let reloaded = policy(secret_file, ", \"203.0.113.0/24\"");
    std::fs::write(h.policy_dir.join("agent.toml"), &reloaded).unwrap();
    let out = h.json(&["policy", "reload"]);
    assert_eq!(out["sandboxes_switched"].as_array().unwrap().len(), 1, "{out}");
    load.wait_for_progress(&before, 20, Duration::from_secs(20));

    // (b) an upgrade: a daemon of another build takes over (as after a
    // package upgrade and `systemctl restart`), and hands the listeners to a
    // data plane of its own build while the old one drains.
    let before = load.oks();
    h.kill_daemon(libc::SIGTERM);
    h.use_binary(other_build(h));
    h.start_daemon();
    let upgraded = plane(h);
    assert_eq!(upgraded["build_matches_daemon"], true, "{upgraded}");
    assert_ne!(upgraded["pid"].as_u64(), Some(first_pid), "a new data plane serves: {upgraded}");
    assert_ne!(upgraded["build"], first["build"], "{upgraded}");
    load.wait_for_progress(&before, 30, Duration::from_secs(20));
    assert!(h.log().contains("data plane upgraded"), "{}", h.log());

    let report = load.finish();
    for (stream, r) in &report {
        assert!(r.errors.is_empty(), "{stream}: {} errors across restart, reload and upgrade: {:?}\nall: {report:?}", r.errors.len(), r.errors);
    }
    assert_eq!(report["sse-credential"].ok, 250, "{report:?}");
    for stream in ["direct-tcp", "h1-spliced", "h2-spliced", "h1-credential", "h2-credential", "dns-udp", "dns-tcp"] {
        assert!(report[stream].ok >= 150, "{stream}: {report:?}");
    }
    // The old data plane finished its connections (the SSE stream) and left.
    wait_until(Duration::from_secs(40), "the old data plane exits after its drain", || !std::path::Path::new(&format!("/proc/{first_pid}")).exists());
    assert!(h.log().contains("drained"), "{}", h.log());

    // (d) kill -9 of the data plane. First, one whose last learned-address
    // snapshot is gone (as if it learned everything after writing it): the
    // next one finds the learned entries in the maps and takes them in, so
    // they expire as they should.
    let learned_before = plane(h)["stats"]["learned_addresses"].as_u64().unwrap();
    assert!(learned_before >= 1, "the guest resolved keep.test: {learned_before}");
    let _ = std::fs::remove_file(h.state_dir.join("learned.json"));
    let crashed = upgraded["pid"].as_u64().unwrap();
    // SAFETY: kill on the data plane's pid, read from the daemon's status.
    unsafe { libc::kill(crashed as i32, libc::SIGKILL) };
    wait_until(Duration::from_secs(10), "a new data plane serves", || {
        let p = plane(h);
        p["pid"].as_u64().is_some_and(|pid| pid != crashed) && p["running"] == true
    });
    assert_eq!(plane(h)["stats"]["learned_addresses"].as_u64(), Some(learned_before), "learned entries the snapshot lacked were not taken in");
    assert!(h.log().contains("not in the snapshot (learned after it): taken in"), "found through the snapshot, not the maps: {}", h.log());

    // Then: a new connection and a query made right after the kill are
    // answered (the listeners were held open meanwhile); a denied
    // destination stays denied.
    let victim = plane(h)["pid"].as_u64().unwrap() as i32;
    let sandbox_ca = g["ca_cert"].as_str().unwrap().to_string();
    // SAFETY: kill on the data plane's pid, read from the daemon's status.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let killed = Instant::now();
    let (code, body) = sbx_net_tests::curl_head(&ns, &["--max-time", "10", "--cacert", &sandbox_ca, "https://api.test/after-crash"]);
    let answered = killed.elapsed();
    assert_eq!(code, Some(0), "{body}");
    assert!(body.contains("authorization: <injected>"), "{body}");
    let (code, body) = sbx_net_tests::curl_head(&ns, &["--max-time", "10", "-k", "--resolve", &format!("denied.test:443:{DENIED}"), "https://denied.test/"]);
    assert_ne!(code, Some(0), "a denied host was reached across the crash: {body}");
    let restarted = plane(h);
    assert_ne!(restarted["pid"].as_u64(), Some(victim as u64), "{restarted}");
    assert_eq!(restarted["restarts"], 2, "{restarted}");
    println!("data plane killed: a new HTTPS request (DNS + TLS + credential) answered {} ms after the kill", answered.as_millis());
    assert!(answered < Duration::from_secs(2), "served again only after {answered:?}");
}

/// (3) A reload keeps what the new policy still allows and cuts what it
/// does not: spliced connections to a name the new policy drops are
/// closed (recorded as `policy_changed`), kept-alive requests to a
/// credential host it drops are refused per request with the rule, and
/// every other stream carries on without an error.
#[test]
fn a_reload_cuts_only_what_the_new_policy_no_longer_allows() {
    require_root();
    let w = World::start("cut");
    let (h, secret_file) = (&w.h, &w.secret_file);
    let name = w.guest["name"].as_str().unwrap().to_string();
    let load = LiveLoad::start(&w.netns(), w.targets(20));
    load.wait_for_progress(&Default::default(), 20, Duration::from_secs(30));

    // spliced.test leaves the policy: its open connections are cut.
    let cut_spliced = load.elapsed_ms();
    let without_spliced = policy_allowing(secret_file, &format!("\"api.test\", \"keep.test\", \"{DIRECT}\""));
    std::fs::write(h.policy_dir.join("agent.toml"), &without_spliced).unwrap();
    h.json(&["policy", "reload"]);
    wait_until(Duration::from_secs(10), "the spliced streams see their connections cut", || {
        let errors = load.errors();
        errors.contains_key("h1-spliced") && errors.contains_key("h2-spliced")
    });
    let records = h.cli_ok(&["inspect", "-o", "json", "--sandbox", &name]);
    assert!(records.lines().any(|l| l.contains("\"policy_changed\"") && l.contains("spliced.test")), "no policy_changed record: {records}");

    // api.test leaves it too: the next request on the kept-alive
    // connections is refused with the rule.
    let cut_credential = load.elapsed_ms();
    // (A credential must be for an allowed host: it goes with it.)
    let without_api = format!("name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"keep.test\", \"{DIRECT}\"]\n");
    std::fs::write(h.policy_dir.join("agent.toml"), &without_api).unwrap();
    h.json(&["policy", "reload"]);
    wait_until(Duration::from_secs(10), "the credential streams see 403", || {
        let errors = load.errors();
        ["h1-credential", "h2-credential"].iter().all(|s| errors.get(s).is_some_and(|e| e.iter().any(|(_, why)| why.contains("403"))))
    });
    let before = load.oks();
    let kept = ["direct-tcp", "dns-udp", "dns-tcp"];
    let since: std::collections::BTreeMap<&'static str, u64> = before.iter().map(|(k, v)| (*k, if kept.contains(k) { *v } else { 0 })).collect();
    load.wait_for_progress(&since, 10, Duration::from_secs(20));
    let report = load.finish();
    for stream in kept {
        assert!(report[stream].errors.is_empty(), "{stream} broke across reloads that keep it allowed: {:?}", report[stream].errors);
    }
    for stream in ["h1-spliced", "h2-spliced"] {
        assert!(report[stream].errors.iter().all(|(at, _)| *at >= cut_spliced), "{stream} failed before its name left the policy: {:?}", report[stream].errors);
    }
    for stream in ["h1-credential", "h2-credential"] {
        assert!(report[stream].errors.iter().all(|(at, _)| *at >= cut_credential), "{stream} failed before its host left the policy: {:?}", report[stream].errors);
    }
}
