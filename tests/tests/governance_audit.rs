//! Audit mode and deny exceptions end to end (issue 16): the real daemon,
//! real `nc`/`dig` in netns guests, a real authoritative server (dnsmasq)
//! for the `test` zone in the world namespace. An audit-mode policy lets
//! through what it would deny and records it as `audit` with the rule (in
//! the classifier and the DNS proxy, counted apart in `/metrics`), never
//! the built-in denies; switching it to enforce is an ordinary apply.
//! Exceptions lift a deny for names and CIDRs, and the records name both.

use std::net::IpAddr;
use std::time::Duration;

use sbx_net::observe::record::{FlowRecord, Verdict};
use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::{dig, require_root, tcp_connects, try_wait_for, unique_name, WorldDns, WorldServers};

const PORT: u16 = 8080;

const AUDITED: &str = r#"name = "audited"
mode = "audit"
[network]
default = "deny"
allow = ["allowed.test", "watched.test"]
deny = ["watched.test"]
"#;

const CORP: &str = r#"name = "corp"
[network]
default = "deny"
allow = ["**.corp.test", "198.51.100.0/24"]
deny = [
  { pattern = "**.corp.test", except = ["jira.corp.test"] },
  { pattern = "198.51.100.32/28", except = ["198.51.100.40/29"] },
]
"#;

const METADATA: &str = "169.254.169.254";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn records() -> Vec<String> {
    ["allowed.test,198.51.100.5,60", "unlisted.test,198.51.100.21,60", "jira.corp.test,203.0.113.10,60", "git.corp.test,203.0.113.11,60", "watched.test,198.51.100.22,60"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn world_addrs() -> Vec<IpAddr> {
    ["198.51.100.5", "198.51.100.20", "198.51.100.21", "198.51.100.22", "198.51.100.33", "198.51.100.41", "203.0.113.10", "203.0.113.11", METADATA].iter().map(|s| ip(s)).collect()
}

/// The daemon with both policies, the world's DNS and a server on PORT at
/// every world address (the metadata address too: only the classifier keeps
/// a guest from it).
fn setup(tag: &str) -> (DaemonHarness, WorldDns, WorldServers) {
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let h = DaemonHarness::with_args(tag, &[("audited.toml", AUDITED), ("corp.toml", CORP)], None, &[upstream.as_str()]);
    for a in world_addrs() {
        h.topology.add_world_address(a);
    }
    let dns = WorldDns::start(&h.topology.world, &records(), &[]);
    let servers = WorldServers::start(&h.topology.world, &world_addrs(), PORT);
    (h, dns, servers)
}

/// `inspect -o json` of one sandbox.
fn inspect(h: &DaemonHarness, sandbox: &str) -> Vec<FlowRecord> {
    let out = h.cli(&["inspect", "-o", "json", "--sandbox", sandbox]);
    assert!(out.status.success(), "inspect: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("inspect printed a non-record ({e}): {l}")))
        .collect()
}

fn show(records: &[FlowRecord]) -> String {
    records.iter().map(|r| sbx_net::observe::record::compact(r, false)).collect::<Vec<_>>().join("\n")
}

/// Waits (datapath records come through the ring buffer) until every
/// predicate matches a record of `sandbox`; panics naming the first that
/// never did.
/// A record the test waits for: what it is, and how to know it.
type Wanted<'a> = (&'a str, &'a dyn Fn(&FlowRecord) -> bool);

fn wait_for_records(h: &DaemonHarness, sandbox: &str, wanted: &[Wanted<'_>]) -> Vec<FlowRecord> {
    let found = try_wait_for(Duration::from_secs(20), || {
        let records = inspect(h, sandbox);
        wanted.iter().all(|(_, pred)| records.iter().any(pred)).then_some(records)
    });
    found.unwrap_or_else(|| {
        let records = inspect(h, sandbox);
        let missing: Vec<&str> = wanted.iter().filter(|(_, pred)| !records.iter().any(pred)).map(|(what, _)| *what).collect();
        panic!("no record for {missing:?} in:\n{}", show(&records))
    })
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

fn datapath_to(r: &FlowRecord, dst: &str) -> bool {
    r.source == "datapath" && r.dst_ip == Some(ip(dst)) && r.dst_port == PORT
}

fn dns_for(r: &FlowRecord, name: &str) -> bool {
    r.dns.as_ref().is_some_and(|d| d.query == name && d.qtype == "A")
}

#[test]
fn audit_mode_lets_through_and_records_what_it_would_deny_until_enforced() {
    require_root();
    let (h, _dns, _servers) = setup("audit");
    let guest = h.create_guest(&unique_name("au"), "audited");
    let (name, ns) = (guest["name"].as_str().unwrap().to_string(), guest["netns"].as_str().unwrap().to_string());

    // (a) No rule allows these; the audit-mode default lets them through.
    assert!(tcp_connects(&ns, ip("198.51.100.20"), PORT), "audit mode: an unlisted address connects");
    let (status, answers) = dig(&ns, &["unlisted.test"]);
    assert_eq!(status, "NOERROR", "audit mode: an unlisted name resolves");
    assert!(answers.iter().any(|l| l.ends_with("A 198.51.100.21")), "{answers:?}");
    assert!(tcp_connects(&ns, ip("198.51.100.21"), PORT), "its answer's address passes (audited by the default)");
    // An allowed name stays simply allowed.
    assert_eq!(dig(&ns, &["allowed.test"]).0, "NOERROR");
    // A name an (audited) deny covers but an allow would let through:
    // resolved, recorded as audit, its address learned under the allow
    // (its flow is then the allow's, not the audited default's).
    assert_eq!(dig(&ns, &["watched.test"]).0, "NOERROR");
    assert!(tcp_connects(&ns, ip("198.51.100.22"), PORT), "the audited name's learned address");
    // (b) The built-in denies are enforced in every mode.
    assert!(!tcp_connects(&ns, ip(METADATA), PORT), "audit mode must not open the metadata address");

    let records = wait_for_records(
        &h,
        &name,
        &[
            ("audited flow to 198.51.100.20", &|r| datapath_to(r, "198.51.100.20") && r.verdict == Verdict::Audit),
            ("audited flow to 198.51.100.21", &|r| datapath_to(r, "198.51.100.21") && r.verdict == Verdict::Audit),
            ("audited query", &|r| dns_for(r, "unlisted.test")),
            ("allowed query", &|r| dns_for(r, "allowed.test")),
            ("audited query of watched.test", &|r| dns_for(r, "watched.test")),
            ("flow to watched.test", &|r| datapath_to(r, "198.51.100.22")),
            ("metadata", &|r| datapath_to(r, METADATA)),
        ],
    );
    let all = show(&records);
    let find = |pred: &dyn Fn(&FlowRecord) -> bool| records.iter().find(|r| pred(r)).cloned().unwrap_or_else(|| panic!("{all}"));
    let flow = find(&|r| datapath_to(r, "198.51.100.20") && r.event == "new_flow");
    assert_eq!((flow.verdict, flow.reason.as_ref(), flow.rule.as_deref()), (Verdict::Audit, "audit", Some("default deny")), "{all}");
    let query = find(&|r| dns_for(r, "unlisted.test"));
    assert_eq!((query.verdict, query.rule.as_deref()), (Verdict::Audit, Some("default deny")), "{all}");
    assert_eq!(query.dns.as_ref().unwrap().answers, vec![ip("198.51.100.21")]);
    let allowed = find(&|r| dns_for(r, "allowed.test"));
    assert_eq!((allowed.verdict, allowed.rule.as_deref()), (Verdict::Allowed, Some("allow allowed.test")), "{all}");
    let watched = find(&|r| dns_for(r, "watched.test"));
    assert_eq!((watched.verdict, watched.reason.as_ref(), watched.rule.as_deref()), (Verdict::Audit, "audit", Some("deny watched.test")), "{all}");
    let flow = find(&|r| datapath_to(r, "198.51.100.22"));
    assert_eq!((flow.verdict, flow.rule.as_deref()), (Verdict::Allowed, Some("allow watched.test")), "learned as usual: {all}");
    for r in records.iter().filter(|r| datapath_to(r, METADATA)) {
        assert_eq!((r.verdict, r.rule.as_deref()), (Verdict::Denied, Some("builtin deny 169.254.0.0/16 (link-local, cloud metadata)")), "{all}");
    }

    // Metrics count audit verdicts apart.
    let text = h.metrics();
    assert!(metric(&text, "sbx_net_datapath_packets_total{reason=\"audit\"}") >= 2.0, "{text}");
    assert!(metric(&text, &format!("sbx_net_sandbox_packets_total{{sandbox=\"{name}\",verdict=\"audit\"}}")) >= 2.0);
    assert!(metric(&text, &format!("sbx_net_flows_total{{sandbox=\"{name}\",verdict=\"audit\"}}")) >= 2.0);
    assert!(metric(&text, "sbx_net_dns_queries_total{outcome=\"audit\"}") >= 2.0);
    assert!(metric(&text, "sbx_net_datapath_packets_total{reason=\"policy_deny\"}") >= 1.0, "the metadata drop");

    // policy test explains the audit.
    let out = h.cli_ok(&["policy", "test", &name, "198.51.100.20:8080"]);
    assert!(out.contains("audit") && out.contains("would be denied by `default deny`; audit mode: allowed and recorded"), "{out}");

    // Enforce: the same policy without the mode, an ordinary apply.
    let enforced = h.dir.join("audited-enforce.toml");
    std::fs::write(&enforced, AUDITED.replace("mode = \"audit\"\n", "")).unwrap();
    h.cli_ok(&["policy", "apply", enforced.to_str().unwrap()]);
    assert!(!tcp_connects(&ns, ip("198.51.100.20"), PORT), "enforced: the unlisted address is denied");
    assert!(!tcp_connects(&ns, ip("198.51.100.21"), PORT), "enforced: the audited answer's address is denied");
    assert_eq!(dig(&ns, &["unlisted.test"]).0, "NXDOMAIN", "enforced: the unlisted name is denied");
    assert_eq!(dig(&ns, &["watched.test"]).0, "NXDOMAIN", "enforced: the deny denies");
    assert!(!tcp_connects(&ns, ip("198.51.100.22"), PORT), "enforced: its learned address closes with the reload");
    assert_eq!(dig(&ns, &["allowed.test"]).0, "NOERROR");
    assert!(!tcp_connects(&ns, ip(METADATA), PORT));
    let records = wait_for_records(
        &h,
        &name,
        &[("a denied flow to 198.51.100.20", &|r| datapath_to(r, "198.51.100.20") && r.verdict == Verdict::Denied)],
    );
    let denied = records.iter().rev().find(|r| dns_for(r, "unlisted.test")).unwrap();
    assert_eq!((denied.verdict, denied.rule.as_deref()), (Verdict::Denied, Some("default deny")), "{}", show(&records));
}

#[test]
fn exceptions_lift_a_deny_and_records_name_both() {
    require_root();
    let (h, _dns, _servers) = setup("except");
    let guest = h.create_guest(&unique_name("ex"), "corp");
    let (name, ns) = (guest["name"].as_str().unwrap().to_string(), guest["netns"].as_str().unwrap().to_string());

    // Names: the exception resolves and connects, its neighbour does not.
    let (status, answers) = dig(&ns, &["jira.corp.test"]);
    assert_eq!(status, "NOERROR", "{answers:?}");
    assert!(tcp_connects(&ns, ip("203.0.113.10"), PORT), "jira's learned address");
    assert_eq!(dig(&ns, &["git.corp.test"]).0, "NXDOMAIN");
    assert!(!tcp_connects(&ns, ip("203.0.113.11"), PORT));
    // CIDRs: the excepted sub-range connects, a neighbour in the deny does not.
    assert!(tcp_connects(&ns, ip("198.51.100.41"), PORT), "inside the exception");
    assert!(!tcp_connects(&ns, ip("198.51.100.33"), PORT), "denied, outside the exception");
    assert!(tcp_connects(&ns, ip("198.51.100.5"), PORT), "the allow outside the deny");

    let name_rule = "allow **.corp.test (deny **.corp.test except jira.corp.test)";
    let cidr_rule = "allow 198.51.100.0/24 (deny 198.51.100.32/28 except 198.51.100.40/29)";
    let records = wait_for_records(
        &h,
        &name,
        &[
            ("jira query", &|r| dns_for(r, "jira.corp.test")),
            ("git query", &|r| dns_for(r, "git.corp.test")),
            ("flow to jira", &|r| datapath_to(r, "203.0.113.10")),
            ("flow to the excepted address", &|r| datapath_to(r, "198.51.100.41")),
            ("flow to its denied neighbour", &|r| datapath_to(r, "198.51.100.33")),
        ],
    );
    let all = show(&records);
    let find = |pred: &dyn Fn(&FlowRecord) -> bool| records.iter().find(|r| pred(r)).cloned().unwrap_or_else(|| panic!("{all}"));
    let jira = find(&|r| dns_for(r, "jira.corp.test"));
    assert_eq!((jira.verdict, jira.rule.as_deref()), (Verdict::Allowed, Some(name_rule)), "{all}");
    let git = find(&|r| dns_for(r, "git.corp.test"));
    assert_eq!((git.verdict, git.rule.as_deref()), (Verdict::Denied, Some("deny **.corp.test")), "{all}");
    let flow = find(&|r| datapath_to(r, "203.0.113.10"));
    assert_eq!((flow.verdict, flow.rule.as_deref()), (Verdict::Allowed, Some(name_rule)), "the learned address carries the rule: {all}");
    let flow = find(&|r| datapath_to(r, "198.51.100.41"));
    assert_eq!((flow.verdict, flow.rule.as_deref()), (Verdict::Allowed, Some(cidr_rule)), "{all}");
    let flow = find(&|r| datapath_to(r, "198.51.100.33"));
    assert_eq!((flow.verdict, flow.rule.as_deref()), (Verdict::Denied, Some("deny 198.51.100.32/28")), "{all}");

    // policy test names the deny and the exception.
    let out = h.cli_ok(&["policy", "test", &name, "198.51.100.41:8080"]);
    assert!(out.contains(cidr_rule) && out.contains("the exception lifts the deny"), "{out}");
    let out = h.cli_ok(&["policy", "test", &name, "jira.corp.test"]);
    assert!(out.contains(name_rule), "{out}");
    let out = h.cli_ok(&["policy", "test", &name, "git.corp.test"]);
    assert!(out.contains("denied") && out.contains("deny **.corp.test"), "{out}");
}
