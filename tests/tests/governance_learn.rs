//! `sbx-net policy learn` end to end: a guest uses two sibling names and
//! one plain-HTTP path with real curl; the policy learned from the
//! daemon's flow history is checked, applied, and a new sandbox on it can
//! do exactly that again while an unrecorded name, an unrecorded port of a
//! recorded name and an unrecorded address are denied. Also: learning for
//! a sandbox the daemon does not know fails clearly.

use std::net::IpAddr;
use std::time::Duration;

use sbx_net::observe::record::FlowRecord;
use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::{dig, require_root, run_in, tcp_connects, try_wait_for, unique_name, WorldDns, WorldServers};

const A: &str = "198.51.100.11";
const B: &str = "198.51.100.12";
const WEB: &str = "198.51.100.13";
const OTHER: &str = "198.51.100.14";

/// The policy the traffic is recorded under: audit mode over a default
/// deny, so what the guest does is let through and recorded with verdict
/// audit (the workflow: run in audit, learn, review, enforce): nothing is
/// allowed, every name and address the guest uses is audited — through
/// the classifier, the DNS proxy and the proxy alike.
const RECORD: &str = "name = \"record\"\nmode = \"audit\"\n[network]\ndefault = \"deny\"\n";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `curl URL` from namespace `ns`: the body, or None when it failed.
fn get(ns: &str, url: &str) -> Option<String> {
    let out = run_in(ns, "curl", &["-s", "-f", "--max-time", "5", url]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn history(h: &DaemonHarness, sandbox: &str) -> Vec<FlowRecord> {
    h.cli_ok(&["inspect", "-o", "json", "--sandbox", sandbox]).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[test]
fn a_learned_policy_allows_what_was_recorded_and_denies_the_rest() {
    require_root();
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let h = DaemonHarness::with_args("learn", &[("record.toml", RECORD)], None, &[upstream.as_str()]);
    let all = [A, B, WEB, OTHER].map(ip);
    for a in all {
        h.topology.add_world_address(a);
    }
    let _on_8080 = WorldServers::start(&h.topology.world, &all, 8080);
    let _on_80 = WorldServers::start(&h.topology.world, &all, 80);
    let records: Vec<String> = [("a.cdn.test", A), ("b.cdn.test", B), ("web.test", WEB), ("other.test", OTHER)].iter().map(|(n, a)| format!("{n},{a},60")).collect();
    let _dns = WorldDns::start(&h.topology.world, &records, &[]);

    // Record: two sibling names on 8080 (the datapath, named by DNS) and
    // one plain-HTTP request (the proxy reads it).
    let recorder = unique_name("rec");
    let ns = h.create_guest(&recorder, "record")["netns"].as_str().unwrap().to_string();
    assert_eq!(get(&ns, "http://a.cdn.test:8080/").as_deref(), Some(format!("hello from {A}\n").as_str()));
    assert_eq!(get(&ns, "http://b.cdn.test:8080/").as_deref(), Some(format!("hello from {B}\n").as_str()));
    assert_eq!(get(&ns, "http://web.test/repos/x").as_deref(), Some(format!("hello from {WEB}\n").as_str()));
    let seen = try_wait_for(Duration::from_secs(20), || {
        let records = history(&h, &recorder);
        // Audited flows carry no names (audit mode never learns an address):
        // `policy learn` names them from the DNS answers in the history.
        let flow = |a: &str| records.iter().any(|r| r.source == "datapath" && r.dst_ip == Some(ip(a)) && r.dst_port == 8080);
        let request = records.iter().any(|r| r.http.as_ref().is_some_and(|x| x.host == "web.test" && x.path == "/repos/x"));
        (flow(A) && flow(B) && request).then_some(())
    });
    assert!(seen.is_some(), "the recorded traffic is in the history:\n{}", h.cli_ok(&["inspect", "--sandbox", &recorder]));

    eprintln!("--- sbx-net inspect --sandbox {recorder} ---\n{}", h.cli_ok(&["inspect", "--sandbox", &recorder]));
    let learned = h.cli_ok(&["policy", "learn", &recorder]);
    // Shown with --nocapture: the README's example is a run of this.
    eprintln!("--- sbx-net policy learn {recorder} ---\n{learned}");
    let name = format!("{recorder}-learned");
    for want in [
        format!("name = \"{name}\""),
        "default = \"deny\"".to_string(),
        "\"*.cdn.test:8080\",  # 2 times, first ".to_string(),
        "; a.cdn.test, b.cdn.test\n".to_string(),
        "\"web.test:80\",  # ".to_string(),
        "[[http]]\nhosts = [\"web.test\"]\nallow = [\n  \"GET /repos/x\",  # 1 request, first ".to_string(),
    ] {
        assert!(learned.contains(&want), "{want:?} missing from the learned policy:\n{learned}");
    }
    assert!(!learned.contains("other.test") && !learned.contains(OTHER), "nothing unrecorded is learned:\n{learned}");
    // The evidence as JSON, and a window with nothing in it.
    let json: serde_json::Value = serde_json::from_str(&h.cli_ok(&["policy", "learn", &recorder, "-o", "json"])).unwrap();
    assert_eq!(json["network"][0]["rule"], "*.cdn.test:8080");
    assert_eq!(json["network"][0]["count"], 2);
    assert!(json["toml"].as_str().is_some_and(|t| t.contains("\"*.cdn.test:8080\"") && t.contains("\"GET /repos/x\"")), "{json}");
    assert_eq!(json["http"][0]["allow"][0]["rule"], "GET /repos/x");
    let empty = h.cli_ok(&["policy", "learn", &recorder, "--since", "2099-01-01T00:00:00Z"]);
    assert!(empty.contains("this policy denies everything.\nallow = []"), "{empty}");

    // The unrecorded destinations are reachable under the recording
    // policy (audit lets them through): what the learned one denies
    // below, it denies by itself.
    assert_eq!(get(&ns, "http://other.test:8080/").as_deref(), Some(format!("hello from {OTHER}\n").as_str()));
    assert!(get(&ns, "http://web.test:8080/").is_some());
    assert!(get(&ns, "http://web.test/admin").is_some());

    // Enforce: apply the learned policy, put a new sandbox on it.
    let file = h.dir.join("learned.toml");
    std::fs::write(&file, &learned).unwrap();
    h.cli_ok(&["policy", "check", file.to_str().unwrap()]);
    h.cli_ok(&["policy", "apply", file.to_str().unwrap()]);
    let enforced = unique_name("enf");
    let ns2 = h.create_guest(&enforced, &name)["netns"].as_str().unwrap().to_string();
    assert_eq!(get(&ns2, "http://a.cdn.test:8080/").as_deref(), Some(format!("hello from {A}\n").as_str()), "recorded, allowed");
    assert_eq!(get(&ns2, "http://b.cdn.test:8080/").as_deref(), Some(format!("hello from {B}\n").as_str()), "recorded, allowed");
    assert_eq!(get(&ns2, "http://web.test/repos/x").as_deref(), Some(format!("hello from {WEB}\n").as_str()), "recorded, allowed");
    assert_eq!(dig(&ns2, &["other.test"]).0, "NXDOMAIN", "an unrecorded name does not resolve");
    assert!(get(&ns2, "http://other.test:8080/").is_none(), "an unrecorded name is denied");
    assert!(!tcp_connects(&ns2, ip(OTHER), 8080), "an unrecorded address is denied");
    assert!(get(&ns2, "http://web.test:8080/").is_none(), "a recorded name on an unrecorded port is denied");
    let (_, head) = sbx_net_tests::curl_head(&ns2, &["http://web.test/admin"]);
    assert!(head.starts_with("HTTP/1.1 403") && head.to_ascii_lowercase().contains("x-sbx-net-denied:"), "an unrecorded path is refused by the learned [[http]] rules:\n{head}");
    // The denials carry the learned policy's default.
    let denied = try_wait_for(Duration::from_secs(20), || {
        let records = history(&h, &enforced);
        records.iter().any(|r| r.dst_ip == Some(ip(OTHER)) && r.rule.as_deref() == Some("default deny")).then_some(())
    });
    assert!(denied.is_some(), "the denied flow names the default:\n{}", h.cli_ok(&["inspect", "--sandbox", &enforced]));
    eprintln!("--- sbx-net inspect --sandbox {enforced} ---\n{}", h.cli_ok(&["inspect", "--sandbox", &enforced]));
}

#[test]
fn learning_for_an_unknown_sandbox_fails_clearly() {
    require_root();
    let h = DaemonHarness::new("learn-unknown", &[]);
    let out = h.cli(&["policy", "learn", "no-such-sandbox"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(66), "EX_NOINPUT: {stderr}");
    assert!(stderr.contains("no sandbox named \"no-such-sandbox\"") && stderr.contains("nothing to learn from"), "{stderr}");
    assert!(out.stdout.is_empty(), "no policy is printed: {}", String::from_utf8_lossy(&out.stdout));
}
