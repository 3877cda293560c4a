//! `[[http]]` rules and audit mode at the proxy, end to end (issue 16):
//! real curl (HTTP/1.1 and HTTP/2) and `printf | nc` in a netns guest,
//! HTTPS echo servers with their own test CA in the world (trusted by the
//! daemon via --upstream-ca), names resolved through the DNS proxy. Every
//! request to a host with rules is checked in its normalised form, and the
//! upstream only ever sees that form; a refused request gets 403 with the
//! rule and the connection carries on; what `inspect` shows names method,
//! host, path and rule.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sbx_net::observe::record::{FlowRecord, Verdict};
use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::https::{HttpsEcho, TestCa};
use sbx_net_tests::{require_root, run_in, shell_in, unique_name, wait_for, WorldDns};

const API: &str = "198.51.100.50";
const AUDITED: &str = "198.51.100.51";
const OPEN: &str = "198.51.100.52";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `inspect -o json` of the sandbox: its records.
fn records(h: &DaemonHarness, sandbox: &str) -> Vec<FlowRecord> {
    h.cli_ok(&["inspect", "-o", "json", "--sandbox", sandbox]).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("inspect printed a non-record ({e}): {l}"))).collect()
}

/// The first record after `after` that `wanted` picks, waited for.
fn record_after(h: &DaemonHarness, sandbox: &str, after: u64, what: &str, wanted: impl Fn(&FlowRecord) -> bool) -> FlowRecord {
    wait_for(Duration::from_secs(5), what, || records(h, sandbox).into_iter().find(|r| r.seq > after && wanted(r)))
}

fn last_seq(h: &DaemonHarness, sandbox: &str) -> u64 {
    records(h, sandbox).last().map_or(0, |r| r.seq)
}

fn http_of(r: &FlowRecord) -> (&str, &str, &str, Option<u16>) {
    let d = r.http.as_ref().expect("an http detail");
    (d.method.as_str(), d.host.as_str(), d.path.as_str(), d.status)
}

/// Real curl in the guest: `-s -g -i` and a time limit on every transfer
/// (`sections` are joined by `--next`, each with `common` and a line
/// `connects=N` after its response: the connections it opened).
fn curl(ns: &str, common: &[&str], sections: &[&[&str]]) -> String {
    let mut args: Vec<&str> = Vec::new();
    for (i, section) in sections.iter().enumerate() {
        if i > 0 {
            args.push("--next");
        }
        args.extend(["-s", "-g", "-i", "--max-time", "10", "-w", "connects=%{num_connects}\n"]);
        args.extend_from_slice(common);
        args.extend_from_slice(section);
    }
    let out = run_in(ns, "curl", &args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status lines of curl's output, in order.
fn statuses(out: &str) -> Vec<u16> {
    out.lines().filter(|l| l.starts_with("HTTP/")).filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect()
}

#[test]
fn http_rules_are_checked_on_every_request_in_normal_form() {
    require_root();
    let dir = std::env::temp_dir().join(unique_name("govhttp"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new(&dir);
    let policy = "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\", \"audit.test\", \"open.test\"]\n\
         [[http]]\nhosts = [\"api.test\"]\nallow = [\"GET /repos/**\", \"POST /repos/*/issues\"]\ndeny = [\"DELETE /**\"]\n\
         [[http]]\nhosts = [\"audit.test\"]\ndeny = [\"DELETE /**\"]\nmode = \"audit\"\n";
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
    let h = DaemonHarness::with_args("govhttp", &[("agent.toml", policy)], None, &[upstream.as_str(), upstream_ca.as_str()]);
    for a in [API, AUDITED, OPEN] {
        h.topology.add_world_address(ip(a));
    }
    let _dns = WorldDns::start(&h.topology.world, &[format!("api.test,{API},60"), format!("audit.test,{AUDITED},60"), format!("open.test,{OPEN},60")], &[]);
    let world = &h.topology.world;
    let api = HttpsEcho::start(world, SocketAddr::new(ip(API), 443), &["api.test"], &ca, "");
    let api_plain = HttpsEcho::start_plain(world, SocketAddr::new(ip(API), 80), &ca, "");
    let audited = HttpsEcho::start(world, SocketAddr::new(ip(AUDITED), 443), &["audit.test"], &ca, "");
    let _open = HttpsEcho::start(world, SocketAddr::new(ip(OPEN), 443), &["open.test"], &ca, "");
    let sandbox = unique_name("g");
    let g = h.create_guest(&sandbox, "agent");
    let ns = g["netns"].as_str().unwrap().to_string();
    let sandbox_ca = g["ca_cert"].as_str().unwrap().to_string();
    let seen_all = || [api.seen(), api_plain.seen(), audited.seen()].concat();

    for (proto, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        let common = [proto, "--cacert", sandbox_ca.as_str()];
        let ctx = |what: &str, out: &str| format!("{proto} {what}:\n{out}");
        // Allowed: reaches the upstream, terminated with the sandbox CA
        // although no credential is bound to the host.
        let out = curl(&ns, &common, &[&["https://api.test/repos/a"]]);
        assert!(out.starts_with(&format!("{version} 200")) && out.contains("path: /repos/a"), "{}", ctx("allowed GET", &out));

        // Refused by a rule (403, the rule in X-Sbx-Net-Denied), and the
        // same connection carries the next request.
        let before = last_seq(&h, &sandbox);
        let out = curl(&ns, &common, &[&["-X", "DELETE", "https://api.test/repos/a"], &["https://api.test/repos/b"]]);
        assert_eq!(statuses(&out), [403, 200], "{}", ctx("DELETE then GET", &out));
        assert!(out.to_ascii_lowercase().contains("x-sbx-net-denied: http deny delete /**"), "{}", ctx("DELETE", &out));
        assert!(out.contains("path: /repos/b"), "{}", ctx("GET after DELETE", &out));
        let connects: Vec<&str> = out.lines().filter(|l| l.starts_with("connects=")).collect();
        assert_eq!(connects, ["connects=1", "connects=0"], "{}", ctx("the second request must reuse the connection", &out));
        let r = record_after(&h, &sandbox, before, "the DELETE's record", |r| r.event == "http_request" && r.reason == "http_rule");
        assert_eq!(http_of(&r), ("DELETE", "api.test", "/repos/a", Some(403)), "{r:?}");
        assert_eq!((r.verdict, r.rule.as_deref()), (Verdict::Denied, Some("http deny DELETE /**")), "{r:?}");
        let r = record_after(&h, &sandbox, before, "the GET's record", |r| r.event == "http_request" && r.reason == "allowed");
        assert_eq!(http_of(&r), ("GET", "api.test", "/repos/b", Some(200)), "{r:?}");
        assert_eq!(r.rule.as_deref(), Some("http allow GET /repos/**"), "{r:?}");

        // Path tricks: each is matched (and would be forwarded) in its
        // resolved form, so each lands on the default deny of /admin.
        for trick in [
            vec!["--path-as-is", "https://api.test/repos/../admin"],
            vec!["--path-as-is", "https://api.test/repos/%2e%2e/admin"],
            vec!["--path-as-is", "https://api.test/repos/%2E%2e/admin"],
            vec!["--path-as-is", "https://api.test//admin"],
            vec!["--path-as-is", "https://api.test/repos/./../admin"],
        ] {
            let before = last_seq(&h, &sandbox);
            let out = curl(&ns, &common, &[&trick]);
            assert_eq!(statuses(&out), [403], "{}", ctx(&trick.join(" "), &out));
            assert!(out.to_ascii_lowercase().contains("x-sbx-net-denied: http default deny (api.test)"), "{}", ctx(&trick.join(" "), &out));
            let r = record_after(&h, &sandbox, before, "the trick's record", |r| r.event == "http_request" && r.reason == "http_rule");
            assert_eq!(http_of(&r), ("GET", "api.test", "/admin", Some(403)), "{r:?}");
        }
        // An encoded separator has no one meaning: 400, and recorded.
        let before = last_seq(&h, &sandbox);
        let out = curl(&ns, &common, &[&["--path-as-is", "https://api.test/repos/x%2f..%2f..%2fadmin"], &["https://api.test/repos/c"]]);
        assert_eq!(statuses(&out), [400, 200], "{}", ctx("encoded slashes", &out));
        assert!(out.to_ascii_lowercase().contains("x-sbx-net-denied: encoded '/'"), "{}", ctx("encoded slashes", &out));
        let r = record_after(&h, &sandbox, before, "the 400's record", |r| r.event == "http_request" && r.reason == "bad_request");
        assert_eq!((r.verdict, http_of(&r).3), (Verdict::Denied, Some(400)), "{r:?}");
        // Mixed-case methods are the method.
        let out = curl(&ns, &common, &[&["-X", "dElEtE", "https://api.test/repos/a"]]);
        assert_eq!(statuses(&out), [403], "{}", ctx("dElEtE", &out));
        assert!(out.to_ascii_lowercase().contains("x-sbx-net-denied: http deny delete /**"), "{}", ctx("dElEtE", &out));
        // Allowed after normalising: the upstream gets the normal form.
        let out = curl(&ns, &common, &[&["--path-as-is", "-X", "gEt", "https://api.test//repos/x/../y/./z?q=1"]]);
        assert_eq!(statuses(&out), [200], "{}", ctx("normalised GET", &out));
        assert!(out.contains("path: /repos/y/z") && out.contains("query: q=1"), "{}", ctx("normalised GET", &out));
        assert!(api.seen().contains(&"GET /repos/y/z?q=1".to_string()), "{:?}", api.seen());

        // Audit mode: the deny is recorded as audit, the request goes on.
        let before = last_seq(&h, &sandbox);
        let out = curl(&ns, &common, &[&["-X", "DELETE", "https://audit.test/things/1"]]);
        assert_eq!(statuses(&out), [200], "{}", ctx("audited DELETE", &out));
        let r = record_after(&h, &sandbox, before, "the audited DELETE's record", |r| r.event == "http_request" && r.verdict == Verdict::Audit);
        assert_eq!(http_of(&r), ("DELETE", "audit.test", "/things/1", Some(200)), "{r:?}");
        assert_eq!((r.reason.as_ref(), r.rule.as_deref()), ("audit", Some("http deny DELETE /**")), "{r:?}");
        assert!(audited.seen().contains(&"DELETE /things/1".to_string()), "{:?}", audited.seen());
    }

    // A host without rules is still spliced: its own certificate.
    let out = run_in(&ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--cacert", &sandbox_ca, "https://open.test/"]);
    assert_eq!(out.status.code(), Some(60), "open.test must not be terminated with the sandbox CA");

    // Plain HTTP: the same rules, the same normal form.
    let out = curl(&ns, &["--http1.1"], &[&["-X", "DELETE", "http://api.test/repos/a"], &["http://api.test/repos/d"]]);
    assert_eq!(statuses(&out), [403, 200], "plain DELETE then GET:\n{out}");
    assert!(out.lines().filter(|l| l.starts_with("connects=")).eq(["connects=1", "connects=0"]), "plain: the connection is reused:\n{out}");
    let out = curl(&ns, &[], &[&["--path-as-is", "http://api.test/repos/../admin"]]);
    assert_eq!(statuses(&out), [403], "plain dot segments:\n{out}");
    // An absolute-form request line is checked on its path too.
    let before = last_seq(&h, &sandbox);
    let script = format!(
        "printf 'GET http://api.test/repos/../admin HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\nGET http://api.test/repos/e HTTP/1.1\\r\\nHost: api.test\\r\\nConnection: close\\r\\n\\r\\n' | nc -w 5 {API} 80"
    );
    let out = shell_in(&ns, &["printf", "nc"], &script);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(statuses(&text), [403, 200], "absolute form:\n{text}");
    assert!(text.to_ascii_lowercase().contains("x-sbx-net-denied: http default deny (api.test)") && text.contains("path: /repos/e"), "absolute form:\n{text}");
    let r = record_after(&h, &sandbox, before, "the absolute-form record", |r| r.event == "http_request" && r.reason == "http_rule");
    assert_eq!(http_of(&r), ("GET", "api.test", "/admin", Some(403)), "{r:?}");

    // No upstream ever saw a refused request or a path not in normal form.
    for s in seen_all() {
        let target = s.split_once(' ').map_or("", |(_, t)| t);
        let path = target.split('?').next().unwrap_or_default();
        assert!(!s.starts_with("DELETE /repos"), "an upstream received a refused request: {s}");
        assert!(!path.contains("..") && !path.contains("//") && !path.contains("/./") && !path.contains('%') && !path.contains("admin"), "an upstream received {s:?}");
        assert!(s.split(' ').next().is_some_and(|m| m == m.to_ascii_uppercase()), "an upstream received a mixed-case method: {s}");
    }
    drop(h);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn audit_mode_lets_denied_connections_through_and_records_them() {
    require_root();
    let dir = std::env::temp_dir().join(unique_name("govaudit"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new(&dir);
    // The policy enforces, except one deny in audit mode.
    let policy = "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\"]\n\
         deny = [{ pattern = \"watched.test\", mode = \"audit\" }, \"blocked.test\"]\n";
    // The whole policy in audit mode.
    let trial = "name = \"trial\"\nmode = \"audit\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\"]\n";
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
    let h = DaemonHarness::with_args("govaudit", &[("agent.toml", policy), ("trial.toml", trial)], None, &[upstream.as_str(), upstream_ca.as_str()]);
    for a in [API, AUDITED, OPEN] {
        h.topology.add_world_address(ip(a));
    }
    let _dns = WorldDns::start(&h.topology.world, &[format!("watched.test,{AUDITED},60"), format!("blocked.test,{OPEN},60"), format!("api.test,{API},60")], &[]);
    let world = &h.topology.world;
    let _watched = HttpsEcho::start(world, SocketAddr::new(ip(AUDITED), 443), &["watched.test"], &ca, "");
    let _blocked = HttpsEcho::start(world, SocketAddr::new(ip(OPEN), 443), &["blocked.test"], &ca, "");
    let test_ca = ca.pem_path.to_str().unwrap();

    let sandbox = unique_name("g");
    let g = h.create_guest(&sandbox, "agent");
    let ns = g["netns"].as_str().unwrap().to_string();
    // --resolve: the name is not the DNS proxy's to answer here (whatever
    // it answers for an audited name), the proxy's decision is tested.
    let before = last_seq(&h, &sandbox);
    let resolve_watched = format!("watched.test:443:{AUDITED}");
    let out = curl(&ns, &["--cacert", test_ca, "--resolve", &resolve_watched], &[&["https://watched.test/x"]]);
    assert_eq!(statuses(&out), [200], "an audit-mode deny lets the connection through:\n{out}");
    let r = record_after(&h, &sandbox, before, "the audited connection's record", |r| r.event == "connection" && r.verdict == Verdict::Audit);
    assert!(r.rule.as_deref().is_some_and(|rule| rule.contains("watched.test")), "{r:?}");
    assert_eq!((r.reason.as_ref(), r.server_name.as_deref()), ("audit", Some("watched.test")), "{r:?}");
    let resolve_blocked = format!("blocked.test:443:{OPEN}");
    let out = curl(&ns, &["--cacert", test_ca, "--resolve", &resolve_blocked], &[&["https://blocked.test/x"]]);
    assert!(statuses(&out).is_empty(), "an enforced deny still refuses:\n{out}");

    let trial_sandbox = unique_name("t");
    let g = h.create_guest(&trial_sandbox, "trial");
    let ns = g["netns"].as_str().unwrap().to_string();
    let before = last_seq(&h, &trial_sandbox);
    let out = curl(&ns, &["--cacert", test_ca, "--resolve", &resolve_blocked], &[&["https://blocked.test/y"]]);
    assert_eq!(statuses(&out), [200], "a policy in audit mode lets its default deny through:\n{out}");
    let r = record_after(&h, &trial_sandbox, before, "the audited connection's record", |r| r.event == "connection" && r.verdict == Verdict::Audit);
    assert_eq!((r.rule.as_deref(), r.server_name.as_deref()), (Some("default deny"), Some("blocked.test")), "{r:?}");
    drop(h);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reload_reaches_kept_alive_connections() {
    require_root();
    let dir = std::env::temp_dir().join(unique_name("govreload"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new(&dir);
    let v1 = "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\"]\n[[http]]\nhosts = [\"api.test\"]\nallow = [\"GET /repos/**\"]\n";
    let v2 = "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\"]\n[[http]]\nhosts = [\"api.test\"]\nallow = [\"GET /repos/**\"]\ndeny = [\"GET /repos/secret/**\"]\n";
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
    let h = DaemonHarness::with_args("govreload", &[("agent.toml", v1)], None, &[upstream.as_str(), upstream_ca.as_str()]);
    h.topology.add_world_address(ip(API));
    let _dns = WorldDns::start(&h.topology.world, &[format!("api.test,{API},60")], &[]);
    let api = HttpsEcho::start(&h.topology.world, SocketAddr::new(ip(API), 443), &["api.test"], &ca, "");
    let sandbox = unique_name("g");
    let g = h.create_guest(&sandbox, "agent");
    let guest = sbx_vmm::NetNs::open(g["netns"].as_str().unwrap()).unwrap();
    let config = sbx_net_tests::https::client_config(std::path::Path::new(g["ca_cert"].as_str().unwrap()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (reloaded_tx, reloaded_rx) = std::sync::mpsc::channel::<()>();
    // One kept-alive connection: a request before the reload, two after
    // (the client does not reconnect: a closed connection fails it).
    let statuses = std::thread::scope(|s| {
        let client = s.spawn(|| {
            guest.run(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let mut c = sbx_net_tests::https::KeepAlive::connect(SocketAddr::new(ip(API), 443), "api.test", config).await.expect("connect");
                    let before = c.get("/repos/secret/x").await.expect("before the reload");
                    ready_tx.send(()).unwrap();
                    reloaded_rx.recv_timeout(Duration::from_secs(30)).expect("the reload");
                    let denied = c.get("/repos/secret/x").await.expect("after the reload, on the same connection");
                    let allowed = c.get("/repos/open").await.expect("after the refusal, on the same connection");
                    [before, denied, allowed]
                })
            })
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("the client's first request");
        std::fs::write(h.policy_dir.join("agent.toml"), v2).unwrap();
        h.cli_ok(&["policy", "reload"]);
        reloaded_tx.send(()).unwrap();
        client.join().unwrap().unwrap()
    });
    assert_eq!(statuses, [200, 403, 200], "the rules in force decide each request of a kept-alive connection");
    let seen = api.seen();
    assert_eq!(seen.iter().filter(|s| s.as_str() == "GET /repos/secret/x").count(), 1, "{seen:?}");
    let r = record_after(&h, &sandbox, 0, "the refusal's record", |r| r.event == "http_request" && r.reason == "http_rule");
    assert_eq!((http_of(&r), r.rule.as_deref()), (("GET", "api.test", "/repos/secret/x", Some(403)), Some("http deny GET /repos/secret/**")), "{r:?}");
    drop(h);
    std::fs::remove_dir_all(&dir).unwrap();
}
