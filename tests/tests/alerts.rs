//! The Prometheus rules and the Grafana dashboard shipped in `packaging/`
//! (issue 17, item 7), checked with the real tools against the real daemon:
//!
//! - `promtool check rules` accepts the rules file and `promtool test rules`
//!   passes its unit tests, which show every alert both firing and not;
//! - the dashboard is a Grafana model of schema 36 or later whose data
//!   source is a template variable, and each of its queries (panel targets
//!   and the `label_values` of its variables) is PromQL promtool accepts;
//! - every metric the rules and the dashboard name is a family a real daemon
//!   (a fleet host, so the fleet families are served too, with a sandbox,
//!   denied DNS and datagrams, and an HTTP request through the proxy)
//!   serves on `/metrics`: renaming a metric fails here; the daemon's
//!   state gauges the alerts read (data plane up, no policy load error)
//!   are served with their healthy values, and a failed upstream connect
//!   is counted in the connect-time histogram as `outcome="failed"`;
//! - a real Prometheus server loads the rules, scrapes that daemon and
//!   evaluates every rule without error; the recording rules yield the
//!   sandbox's series, moving; the one alert that is due (a credential whose secret
//!   file is missing) is raised, naming its policy and credential, and no
//!   other; every dashboard query runs on it; the daemon killed, its
//!   target is down and the down alert is due;
//! - the state gauges two alerts read follow a real daemon: one started with
//!   a bad policy dir reports `sbx_net_policy_reload_error 1` from its first
//!   scrape until a reload works; its data plane killed while it cannot be
//!   started again reports `sbx_net_dataplane_up 0` until a restart works.
//!
//! What `/metrics` itself looks like (promtool check metrics, the counters
//! moving) is tests/tests/observability.rs's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use sbx_net_tests::prometheus::PrometheusServer;
use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::etcd::EtcdServer;
use sbx_net_tests::{dig, require_root, try_wait_for, unique_name, wait_until, Background, WorldServers};
use serde_json::Value;

/// A scratch directory, removed on drop (a failing test too leaves nothing
/// behind). Declare it before what writes into it (Prometheus), so that
/// is dropped, and stopped, first.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn packaging(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging").join(path)
}

fn rules_file() -> PathBuf {
    packaging("prometheus/sbx-net.rules.yml")
}

fn rules_tests_file() -> PathBuf {
    packaging("prometheus/sbx-net.rules.test.yml")
}

fn dashboard() -> Value {
    let path = packaging("grafana/sbx-net.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn text(out: &Output) -> String {
    format!("exit {:?}\n{}{}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn promtool(args: &[&str]) -> Output {
    sbx_net_tests::host_command("promtool").args(args).stdin(Stdio::null()).output().expect("run promtool")
}

// ---------------------------------------------------------------------------
// PromQL, as far as the checks need it: the metric names an expression
// selects, and Grafana's template variables substituted.

/// PromQL's keywords and aggregation operators: never metric names where
/// they stand (an aggregation is followed by `by`/`without` or `(`).
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "sum", "min", "max", "avg", "group", "stddev",
    "stdvar", "count", "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio", "inf", "nan",
];
/// Keywords whose parenthesised list holds label names, not expressions.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The index just past the bracket that closes the one at `open`, skipping
/// quoted strings (a `}` in a label value does not close a selector).
fn past_closing(chars: &[char], open: usize) -> usize {
    let (opening, closing) = (chars[open], match chars[open] {
        '(' => ')',
        '[' => ']',
        '{' => '}',
        c => panic!("no bracket: {c}"),
    });
    let mut depth = 0;
    let mut i = open;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = past_string(chars, i) - 1,
            c if c == opening => depth += 1,
            c if c == closing => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!("unbalanced {opening} in {:?}", chars.iter().collect::<String>())
}

fn past_string(chars: &[char], open: usize) -> usize {
    let quote = chars[open];
    let mut i = open + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    panic!("unterminated string in {:?}", chars.iter().collect::<String>())
}

/// The metric names an expression selects: identifiers that are not
/// functions (followed by `(`), keywords, label names (inside `{}` or a
/// `by (…)` list), strings, numbers or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = past_string(&chars, i);
        } else if c == '{' || c == '[' {
            // Label matchers; a range or subquery.
            i = past_closing(&chars, i);
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration (5m, 1e3, 0x1f).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let before_paren = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if before_paren {
                    i = past_closing(&chars, next);
                }
            } else if !before_paren && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// What each Grafana variable of the dashboard is replaced with so its
/// queries are plain PromQL: the multi-value variables by the regex their
/// "All" stands for, Grafana's own intervals by a duration.
fn substitute(query: &str) -> String {
    let values = BTreeMap::from([("instance", ".+"), ("sandbox", ".+"), ("__rate_interval", "5m"), ("__interval", "1m"), ("__range", "1h")]);
    let mut out = String::new();
    let mut rest = query;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {query:?}"));
            (braced[..end].split(':').next().unwrap(), &braced[end + 1..])
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let value = values.get(name).unwrap_or_else(|| panic!("the dashboard uses ${name}, which is not one of its variables ({query:?})"));
        out.push_str(value);
        rest = tail;
    }
    assert!(!rest.contains("[["), "the deprecated [[var]] syntax in {query:?}");
    out.push_str(rest);
    out
}

/// `label_values(SELECTOR, LABEL)` (or `label_values(LABEL)`): the selector
/// (None for the second form) and the label.
fn label_values(query: &str) -> (Option<String>, String) {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("a template variable's query is not label_values(…): {query:?}"));
    let (selector, label) = match inner.rfind(',') {
        Some(comma) => (Some(inner[..comma].trim().to_string()), inner[comma + 1..].trim()),
        None => (None, inner.trim()),
    };
    assert!(!label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "not a label name in {query:?}: {label:?}");
    (selector, label.to_string())
}

/// One panel query: its panel's title and the expression.
struct Query {
    panel: String,
    expr: String,
}

/// Every query of the dashboard as written (variables not substituted):
/// the panels' targets and the selectors of the variables' label_values.
fn dashboard_queries(d: &Value) -> Vec<Query> {
    let mut queries = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {:?}: a target without an expr: {t}", p["title"]));
            queries.push(Query { panel: p["title"].as_str().unwrap_or("?").to_string(), expr: expr.to_string() });
        }
    }
    for v in variables(d).iter().filter(|v| v["type"] == "query") {
        if let (Some(selector), _) = label_values(&variable_query(v)) {
            queries.push(Query { panel: format!("variable {}", v["name"]), expr: selector });
        }
    }
    queries
}

/// The panels, those inside collapsed rows included; rows themselves left out.
fn panels(d: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        all.extend(p["panels"].as_array().into_iter().flatten());
        if p["type"] != "row" {
            all.push(p);
        }
    }
    all
}

fn variables(d: &Value) -> &Vec<Value> {
    d["templating"]["list"].as_array().expect("templating.list")
}

/// A query variable's query: a string in older models, `{query: …}` since Grafana 10.
fn variable_query(v: &Value) -> String {
    v["query"].as_str().or_else(|| v["query"]["query"].as_str()).unwrap_or_else(|| panic!("variable {} has no query", v["name"])).to_string()
}

/// `promtool check rules` of `exprs` written as recording rules (each
/// one's origin in a comment above it); Err with what promtool said and the
/// file when it refuses one.
fn promtool_check(exprs: &[(String, String)], dir: &Path) -> Result<(), String> {
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (origin, expr)) in exprs.iter().enumerate() {
        // A JSON string is a YAML double-quoted scalar.
        file.push_str(&format!("      # {}\n      - record: dashboard_query_{i}\n        expr: {}\n", origin.replace('\n', " "), Value::from(expr.as_str())));
    }
    let path = dir.join("dashboard-queries.rules.yml");
    std::fs::write(&path, &file).unwrap();
    let out = promtool(&["check", "rules", path.to_str().unwrap()]);
    let counted = String::from_utf8_lossy(&out.stdout).contains(&format!("SUCCESS: {} rules found", exprs.len()));
    if out.status.success() && counted {
        Ok(())
    } else {
        Err(format!("{}\n{file}", text(&out)))
    }
}

// ---------------------------------------------------------------------------
// The rules file and its unit tests.

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let rules = rules_file();
    let out = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(out.status.success(), "promtool check rules:\n{}", text(&out));
    // The unit tests run from their own directory: rule_files is relative.
    let tests = rules_tests_file();
    let out = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("SUCCESS"), "promtool test rules:\n{}", text(&out));
}

#[test]
fn every_alert_has_unit_tests_that_fire_it_and_that_do_not() {
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert:")).map(str::trim).collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    // Each `alertname:` line of the tests is followed by `exp_alerts: []`
    // (must not fire) or `exp_alerts:` and a list (must fire).
    let tests = std::fs::read_to_string(rules_tests_file()).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let mut cases: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname:") {
            let entry = cases.entry(name.trim()).or_default();
            match lines.get(i + 1) {
                Some(&"exp_alerts: []") => entry.1 += 1,
                Some(&"exp_alerts:") => entry.0 += 1,
                other => panic!("alertname {name} is followed by {other:?}"),
            }
        }
    }
    for alert in &alerts {
        let (fires, silent) = cases.get(alert).copied().unwrap_or_default();
        assert!(fires > 0 && silent > 0, "{alert}: {fires} test case(s) where it fires, {silent} where it must not; both are needed");
        // The shape every alert keeps: severity, a `for:`, and what an
        // operator reads.
        let block: String = rules.split("- alert: ").find(|b| b.starts_with(&format!("{alert}\n"))).unwrap().to_string();
        for key in ["for:", "severity:", "summary:", "description:", "runbook:"] {
            assert!(block.contains(key), "{alert} has no {key}:\n{block}");
        }
        assert!(block.contains("$labels.instance") || block.contains("absent("), "{alert} does not name its host:\n{block}");
    }
    for name in cases.keys() {
        assert!(alerts.contains(name), "the tests name an alert the rules do not define: {name}");
    }
}

// ---------------------------------------------------------------------------
// The dashboard, without a daemon.

#[test]
fn dashboard_is_a_grafana_model_whose_every_query_promtool_accepts() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", d["schemaVersion"]);
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "uid {}", d["uid"]);
    let vars = variables(&d);
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    assert_eq!((var("datasource")["type"].as_str(), var("datasource")["query"].as_str()), (Some("datasource"), Some("prometheus")));
    for (name, label) in [("instance", "instance"), ("sandbox", "sandbox")] {
        let v = var(name);
        assert_eq!(v["type"], "query", "${name}");
        assert_eq!(label_values(&variable_query(v)).1, label, "${name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "${name}");
    }
    // Every panel and every target reads the chosen data source.
    let mut ids = BTreeSet::new();
    let all = panels(&d);
    assert!(all.len() >= 20, "{} panels", all.len());
    for p in &all {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "panel id {} twice", p["id"]);
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title:?}: {t}");
            assert!(refs.insert(t["refId"].as_str().expect("refId")), "panel {title:?}: refId twice");
        }
        let g = &p["gridPos"];
        assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24, "panel {title:?} is wider than the grid");
    }
    // The panels the issue asks for, by what they query.
    let queries = dashboard_queries(&d);
    let all_exprs: String = queries.iter().map(|q| q.expr.as_str()).collect::<Vec<_>>().join("\n");
    for needed in [
        "sbx_net:datapath_packets:rate5m",
        "sbx_net:sandbox_packets:rate5m",
        "sbx_net:sandbox_bytes:rate5m",
        "sbx_net:dns_queries:rate5m",
        "sbx_net:dns_hold_seconds:p99_5m",
        "sbx_net:proxy_requests:rate5m",
        "sbx_net:proxy_connect_seconds:p99_5m",
        "sbx_net:policy_map_occupancy:ratio",
        "sbx_net:flow_table_occupancy:ratio",
        "sbx_net_events_lost_total",
        "sbx_net_policy_reload_failures_total",
        "sbx_net_dataplane_up",
        "sbx_net_fleet_connected",
        "sandbox=~\"$sandbox\"",
    ] {
        assert!(all_exprs.contains(needed), "no panel queries {needed}");
    }
    let dir = ScratchDir::new("dash");
    let exprs: Vec<(String, String)> = queries.iter().map(|q| (q.panel.clone(), substitute(&q.expr))).collect();
    let checked = promtool_check(&exprs, &dir);
    // promtool really refuses what is not PromQL (a check that cannot fail
    // checks nothing).
    let broken = promtool_check(&[("broken".into(), "sum by (sandbox (rate(x[5m]))".into())], &dir);
    checked.unwrap_or_else(|e| panic!("promtool refuses a dashboard query:\n{e}"));
    assert!(broken.is_err(), "promtool accepted a broken expression");
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names("sum by (instance, sandbox) (rate(sbx_net_a_total{x=\"y}\", le=~\"$z\"}[5m] offset 1h)) / on (instance) group_left (family) sbx_net_b > bool 0.9"),
        ["sbx_net_a_total", "sbx_net_b"]
    );
    assert_eq!(names("histogram_quantile(0.99, sum without (le) (rate(sbx_net_h_bucket[1m:10s])))"), ["sbx_net_h_bucket"]);
    assert_eq!(names("absent(up{job=\"sbx-net\"}) or count(sbx_net:c:rate5m) by (x) unless sbx_net_d"), ["sbx_net:c:rate5m", "sbx_net_d", "up"]);
    assert_eq!(names("topk(3, sbx_net_e) and sbx_net_f offset 5m # sbx_net_comment"), ["sbx_net_e", "sbx_net_f"]);
    assert_eq!(substitute("rate(x{i=~\"$instance\", s=~\"${sandbox}\"}[$__rate_interval])"), "rate(x{i=~\".+\", s=~\".+\"}[5m])");
    assert_eq!(label_values("label_values(sbx_net_x{instance=~\"$instance\"}, sandbox)"), (Some("sbx_net_x{instance=~\"$instance\"}".to_string()), "sandbox".to_string()));
    assert_eq!(label_values("label_values(instance)"), (None, "instance".to_string()));
}

// ---------------------------------------------------------------------------
// Against a real daemon and a real Prometheus server.

/// The families `/metrics` declares (`# TYPE name type`, the classic text
/// format: counters with their `_total`), by name.
fn served_families(metrics: &str) -> BTreeMap<String, String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// Whether a name a query selects is a series of a served family: the
/// family itself, or a histogram's (summary's) `_bucket`, `_sum`, `_count`.
fn is_served(name: &str, families: &BTreeMap<String, String>) -> bool {
    if families.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix).map(|stem| (suffix, stem)))
        .any(|(suffix, stem)| match families.get(stem).map(String::as_str) {
            Some("histogram") => true,
            Some("summary") => *suffix != "_bucket",
            _ => false,
        })
}

/// A fleet host (a real etcd in its namespace holding its one policy), so
/// it serves the fleet families too, with one sandbox. The policy's
/// credential reads a secret file that does not exist.
struct FleetHost {
    // Dropped in this order: the daemon before its harness cleans up.
    daemon: Option<Background>,
    _etcd: EtcdServer,
    _web: WorldServers,
    h: DaemonHarness,
}

const HOST: &str = "alerts-h1";

impl FleetHost {
    fn start(tag: &str) -> FleetHost {
        let h = DaemonHarness::prepared(tag, &[], None, &[]);
        let etcd = EtcdServer::start(h.topology.host.name());
        let web: std::net::IpAddr = WEB.parse().unwrap();
        h.topology.add_world_address(web);
        h.topology.add_world_address(NOT_LISTENING.parse().unwrap());
        let servers = WorldServers::start(&h.topology.world, &[web], 80);
        let missing = h.dir.join("secret-that-is-not-there");
        let policy = format!(
            "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\", \"198.51.100.0/24\"]\ndeny = [\"evil.test\"]\n\
             [[credentials]]\nname = \"gh\"\nhosts = [\"api.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{}\" }}\n",
            missing.display()
        );
        etcd.put("/sbx/policies/all/agent", &policy);
        let mut daemon = Background(h.spawn_daemon_process(&["--policy-source".into(), etcd.url("sbx"), "--host-name".into(), HOST.into()]));
        wait_until(Duration::from_secs(30), "the fleet daemon to answer on its socket", || {
            daemon.assert_running("sbx-net daemon");
            h.cli(&["status"]).status.success()
        });
        FleetHost { daemon: Some(daemon), _etcd: etcd, _web: servers, h }
    }
}

/// The world's web server the policy allows (TCP 80 goes through the proxy).
const WEB: &str = "198.51.100.40";
/// An allowed world address where nothing listens: the proxy's upstream
/// connect is refused.
const NOT_LISTENING: &str = "198.51.100.41";

/// A denied name, three denied datagrams (the world has nothing at
/// 203.0.113.7, and the policy's default is deny) and an allowed HTTP
/// request through the proxy.
fn traffic(ns: &str) {
    let (status, _) = dig(ns, &["evil.test"]);
    assert_eq!(status, "NXDOMAIN", "a denied name");
    let body = sbx_net_tests::curl(ns, &format!("http://{WEB}/"));
    assert!(body.is_some_and(|b| b.contains(WEB)), "HTTP through the proxy to {WEB}");
    sbx_vmm::NetNs::open(ns)
        .unwrap()
        .run(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            for port in 7000..7003u16 {
                let _ = socket.send_to(b"x", ("203.0.113.7", port));
            }
        })
        .unwrap();
}

#[test]
fn rules_and_dashboard_name_only_served_metrics_and_evaluate_on_a_live_daemon() {
    require_root();
    let mut host = FleetHost::start("alerts");
    let h = &host.h;
    let name = unique_name("g");
    let guest = h.create_guest(&name, "agent");
    let ns = guest["netns"].as_str().expect("netns").to_string();
    // A little of everything the per-sandbox and DNS families count: a
    // denied name, a denied flow (the world has nothing at 203.0.113.7).
    traffic(&ns);
    let denied_series = format!("sbx_net_sandbox_packets_total{{sandbox=\"{name}\",verdict=\"denied\"}}");
    let metrics = sbx_net_tests::wait_for(Duration::from_secs(20), "the sandbox's denied packets on /metrics", || {
        let m = h.metrics();
        m.lines().any(|l| l.starts_with(&denied_series) && !l.ends_with(" 0")).then_some(m)
    });
    assert!(metrics.contains("sbx_net_credential_available{policy=\"agent\",credential=\"gh\"} 0"), "the missing secret on /metrics:\n{metrics}");
    assert!(!metrics.contains("sbx_net_proxy_connect_seconds_count{outcome=\"ok\"} 0"), "the proxied request's connect time on /metrics:\n{metrics}");
    // The state gauges the alerts read, served with their healthy values.
    for line in ["sbx_net_dataplane_up 1", "sbx_net_policy_reload_error 0"] {
        assert!(metrics.lines().any(|l| l == line), "{line:?} not on /metrics:\n{metrics}");
    }
    // A connect the upstream refuses is timed too, as a failure.
    assert_eq!(sbx_net_tests::curl(&ns, &format!("http://{NOT_LISTENING}/")), None, "nothing listens at {NOT_LISTENING}");
    let failed = "sbx_net_proxy_connect_seconds_count{outcome=\"failed\"} 1";
    let metrics = sbx_net_tests::wait_for(Duration::from_secs(20), "the failed upstream connect on /metrics", || {
        let m = h.metrics();
        m.lines().any(|l| l == failed).then_some(m)
    });
    let families = served_families(&metrics);
    assert!(families.contains_key("sbx_net_fleet_connected"), "a fleet host serves the fleet families:\n{metrics}");

    // A real Prometheus loads the rules, scrapes the daemon, evaluates.
    let dir = ScratchDir::new("prom");
    let prometheus = PrometheusServer::start(h.topology.host.name(), &dir, "127.0.0.1:19091", Some(&rules_file()));
    let rules = try_wait_for(Duration::from_secs(60), || {
        let rules = prometheus.rules();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown")).then_some(rules)
    })
    .unwrap_or_else(|| panic!("prometheus did not load and evaluate the rules in 60 s:\n{}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()));
    let broken: Vec<String> = rules.iter().filter(|r| r["health"] != "ok").map(|r| format!("{}: {} ({})", r["name"], r["health"], r["lastError"])).collect();
    assert!(broken.is_empty(), "rules that do not evaluate: {broken:#?}");

    // Every metric a rule or the dashboard names is served, bar the
    // recording rules' own and Prometheus's `up`.
    let recorded: BTreeSet<String> = rules.iter().filter(|r| r["type"] == "recording").map(|r| r["name"].as_str().unwrap().to_string()).collect();
    assert!(recorded.len() >= 8, "{recorded:?}");
    let mut used: Vec<(String, String)> = rules.iter().map(|r| (format!("rule {}", r["name"]), r["query"].as_str().unwrap().to_string())).collect();
    let d = dashboard();
    used.extend(dashboard_queries(&d).into_iter().map(|q| (format!("dashboard panel {:?}", q.panel), q.expr)));
    let mut unknown = Vec::new();
    let mut checked = BTreeSet::new();
    for (origin, expr) in &used {
        for metric in metric_names(expr) {
            if metric == "up" || recorded.contains(&metric) {
                continue;
            }
            if !is_served(&metric, &families) {
                unknown.push(format!("{metric} (in {origin}: {expr})"));
            }
            checked.insert(metric);
        }
    }
    assert!(unknown.is_empty(), "metrics the daemon does not serve:\n{}\n--- served families ---\n{}", unknown.join("\n"), families.keys().cloned().collect::<Vec<_>>().join("\n"));
    assert!(checked.len() >= 25, "the extraction found too few names to be trusted: {checked:?}");
    // A dashboard name that is neither served nor recorded would have been
    // reported above; and the dashboard only uses recording rules that exist.
    for q in dashboard_queries(&d) {
        for metric in metric_names(&q.expr).into_iter().filter(|m| m.contains(':')) {
            assert!(recorded.contains(&metric), "panel {:?} uses {metric}, which no recording rule defines", q.panel);
        }
    }

    // The recording rules yield this sandbox's series and the occupancy;
    // the rates move with traffic sent once Prometheus scrapes.
    try_wait_for(Duration::from_secs(30), || prometheus.query("up{job=\"sbx-net\"} == 1").ok().filter(|r| !r.is_empty()))
        .expect("prometheus scraping the daemon within 30 s");
    traffic(&ns);
    for promql in [
        format!("sbx_net:sandbox_packets:rate5m{{sandbox=\"{name}\",verdict=\"denied\"}} > 0"),
        format!("sbx_net:flows:rate5m{{sandbox=\"{name}\",verdict=\"denied\"}}"),
        "sbx_net:dns_queries:rate5m{outcome=\"denied\"} > 0".to_string(),
        "sbx_net:datapath_packets:rate5m".to_string(),
        "sbx_net:policy_map_occupancy:ratio{family=\"ipv4\"} >= 0".to_string(),
        "sbx_net:flow_table_occupancy:ratio > 0".to_string(),
        "sbx_net:proxy_requests:rate5m{outcome=\"allowed\"} > 0".to_string(),
        "sbx_net:proxy_connect_seconds:p99_5m > 0".to_string(),
    ] {
        try_wait_for(Duration::from_secs(60), || prometheus.query(&promql).ok().filter(|r| !r.is_empty()))
            .unwrap_or_else(|| panic!("{promql}: no series from the recording rules in 60 s"));
    }

    // The one alert due is raised, naming what to fix; none other is.
    let mut last = Vec::new();
    let alerts = try_wait_for(Duration::from_secs(60), || {
        last = prometheus.alerts()?;
        let names: BTreeSet<&str> = last.iter().filter_map(|a| a["labels"]["alertname"].as_str()).collect();
        (names == BTreeSet::from(["SbxNetCredentialUnavailable"])).then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("expected exactly SbxNetCredentialUnavailable pending or firing, got {last:#?}"));
    let labels = &alerts[0]["labels"];
    assert_eq!((labels["policy"].as_str(), labels["credential"].as_str(), labels["severity"].as_str()), (Some("agent"), Some("gh"), Some("warning")), "{alerts:#?}");
    let summary = alerts[0]["annotations"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("gh") && summary.contains("agent") && summary.contains("127.0.0.1:9464"), "{summary}");

    // Every dashboard query runs on this Prometheus, and the variables list
    // this host and this sandbox.
    for q in dashboard_queries(&d) {
        let promql = substitute(&q.expr);
        prometheus.query(&promql).unwrap_or_else(|e| panic!("panel {:?}: prometheus refuses {promql}: {e}", q.panel));
    }
    for (var, want) in [("instance", "127.0.0.1:9464"), ("sandbox", name.as_str())] {
        let v = variables(&d).iter().find(|v| v["name"] == var).unwrap();
        let (selector, label) = label_values(&variable_query(v));
        let selector = substitute(&selector.expect("a selector"));
        let result = prometheus.query(&selector).unwrap_or_else(|e| panic!("${var}: {e}"));
        assert!(result.iter().any(|s| s["metric"][&label] == want), "${var} ({selector}, {label}) does not list {want}: {result:?}");
    }

    // The daemon stops: the target is down, and the down alert is due.
    drop(host.daemon.take());
    try_wait_for(Duration::from_secs(30), || prometheus.alerts().filter(|a| a.iter().any(|a| a["labels"]["alertname"] == "SbxNetDaemonDown")))
        .unwrap_or_else(|| panic!("no SbxNetDaemonDown pending after the daemon stopped: {:#?}", prometheus.alerts()));
}

/// Puts a file moved aside back where it was, on drop (a failing test too).
struct MovedAside {
    path: PathBuf,
    aside: PathBuf,
}

impl MovedAside {
    fn new(path: &Path) -> MovedAside {
        let aside = path.with_extension("aside");
        std::fs::rename(path, &aside).unwrap();
        MovedAside { path: path.to_path_buf(), aside }
    }
}

impl Drop for MovedAside {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.aside, &self.path);
    }
}

/// One line of `/metrics` equal to `line`, waited for.
fn wait_for_metric(h: &DaemonHarness, line: &str) -> String {
    let mut last = String::new();
    try_wait_for(Duration::from_secs(20), || {
        last = h.metrics();
        last.lines().any(|l| l == line).then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("{line:?} not on /metrics within 20 s:\n{last}\n--- daemon log ---\n{}", h.log()))
}

/// The inputs of SbxNetPolicyReloadFailed and SbxNetDataplaneDown on a real
/// daemon: one that starts with a bad policy dir reports the error from its
/// first scrape (its failure counter never rises after that) until a reload
/// works; a data plane killed while it cannot be started again (its
/// executable moved away) is reported down until a restart works.
#[test]
fn state_gauges_follow_the_policy_load_and_the_data_plane() {
    require_root();
    let mut h = DaemonHarness::prepared("alerts-st", &[("agent.toml", "name = \"agent\"\n[network]\nallow = [\"198.51.100.0/33\"]\n")], None, &[]);
    // A private copy of the executable, so that it can be moved away.
    let bin = h.dir.join("sbx-net");
    if std::fs::hard_link(sbx_net_tests::daemon::sbx_net_bin(), &bin).is_err() {
        std::fs::copy(sbx_net_tests::daemon::sbx_net_bin(), &bin).unwrap();
    }
    h.use_binary(bin.clone());
    h.start_daemon();
    // The daemon keeps running (and starting data planes from) its copy;
    // the CLI and the harness's cleanup use the shared one.
    h.use_binary(sbx_net_tests::daemon::sbx_net_bin());

    let status = h.json(&["status", "--json"]);
    assert!(status["last_reload_error"].as_str().is_some_and(|e| e.contains("agent.toml")), "{status}");
    let metrics = h.metrics();
    for line in ["sbx_net_policy_reload_error 1", "sbx_net_policy_reload_failures_total 1", "sbx_net_dataplane_up 1"] {
        assert!(metrics.lines().any(|l| l == line), "{line:?} not on /metrics at start:\n{metrics}");
    }
    std::fs::write(h.policy_dir.join("agent.toml"), "name = \"agent\"\n[network]\nallow = [\"198.51.100.0/24\"]\n").unwrap();
    h.cli_ok(&["policy", "reload"]);
    let metrics = wait_for_metric(&h, "sbx_net_policy_reload_error 0");
    assert!(metrics.lines().any(|l| l == "sbx_net_policy_reload_failures_total 1"), "the count stays:\n{metrics}");

    // The data plane dies and cannot be started again: down.
    let pid = h.json(&["status", "--json"])["dataplane"]["pid"].as_u64().expect("the data plane's pid") as libc::pid_t;
    let aside = MovedAside::new(&bin);
    // SAFETY: kill on the pid the daemon reports for its data plane.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill the data plane {pid}");
    wait_for_metric(&h, "sbx_net_dataplane_up 0");
    let status = h.json(&["status", "--json"]);
    assert_eq!(status["dataplane"]["running"], false, "{status}");
    // A netns guest's pump cannot be started either (it runs the same
    // executable): the create fails with the reason and is undone, and the
    // daemon lives on to answer (a failed exec once panicked its thread).
    let refused = h.cli(&["sandbox", "create", "nopump", "--policy", "agent", "--netns-guest"]);
    assert!(!refused.status.success(), "a sandbox was created without its pump: {}", String::from_utf8_lossy(&refused.stdout));
    eprintln!("create without a pump: {}", String::from_utf8_lossy(&refused.stderr));
    let list = h.json(&["sandbox", "list", "-o", "json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "the failed create was not undone: {list}");
    // Its executable back: the next restart works, and it is up.
    drop(aside);
    let metrics = wait_for_metric(&h, "sbx_net_dataplane_up 1");
    assert!(metrics.lines().any(|l| l == "sbx_net_dataplane_restarts_total 1"), "{metrics}");
}
