//! `sbx-net policy learn SANDBOX`: reads what the sandbox did from the
//! daemon's flow history (or saved records), turns the flow records into
//! the plain observations [`crate::policy::learn`] generalises, and prints
//! the learned policy (TOML, or JSON with the evidence).
//!
//! The source is the daemon's in-memory flow history, the one `inspect`
//! reads: it is the only place that keeps allowed flows, DNS answers and
//! proxied requests (the audit log keeps denials and credential use only).
//! It is bounded (`flow_history` records, every sandbox together), so when
//! records were evicted and the history starts after `--since` (or no
//! `--since` was given), the policy says so in a warning, on stderr too:
//! what the sandbox did before the history's first record is not learned.
//! `--input` learns from saved records instead (`inspect -o json` output,
//! the audit log and its rotated files).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::api::{call, inspect_stream, ClientError, ErrorKind, Request};
use crate::observe::filter::Since;
use crate::observe::hub::{Lost, StreamLine};
use crate::observe::record::{rfc3339, FlowRecord, Verdict};
use crate::policy::learn::{default_name, learn, At, LearnError, LearnOptions, Learned, Observation, Outcome, Seen};

/// `sbx-net policy learn`.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct LearnArgs {
    /// The sandbox whose traffic to learn from.
    pub sandbox: String,
    /// Only what it did from this time on: a duration back (30s, 5m, 2h, 1d) or an RFC 3339 UTC time.
    #[arg(long, value_name = "DURATION|TIME", value_parser = Since::parse)]
    pub since: Option<Since>,
    /// Output: the policy (toml), or the policy and the evidence behind each entry (json).
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT", default_value_t = LearnOutput::Toml)]
    pub output: LearnOutput,
    /// The learned policy's name (default: SANDBOX-learned).
    #[arg(long)]
    pub name: Option<String>,
    /// Learn from these files of flow records (`inspect -o json` output, the audit log) instead of the daemon's history.
    #[arg(long, value_name = "FILE")]
    pub input: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LearnOutput {
    Toml,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum LearnCliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: not a flow record: {reason}")]
    BadRecord { path: String, line: usize, reason: String },
    #[error(transparent)]
    Learn(#[from] LearnError),
    #[error("writing the output: {0}")]
    Write(std::io::Error),
}

/// A flow record as an observation, if it is one: records of what the
/// sandbox did (allowed or audit) or was refused (denied). Redirected
/// datapath records are left to the proxies' own records of the same
/// connection; the audit log's notices and secret redactions are not
/// traffic.
pub fn observation(r: &FlowRecord) -> Option<Observation> {
    let outcome = match r.verdict {
        Verdict::Allowed | Verdict::Audit => Outcome::Used,
        Verdict::Denied => Outcome::Denied { rule: r.rule.clone() },
        Verdict::Redirected => return None,
    };
    if r.source == "audit" || r.event == "secret_redacted" {
        return None;
    }
    let seen = if let Some(m) = &r.mcp {
        Seen::Mcp { server: m.server.clone(), method: m.method.clone(), tool: m.tool.clone() }
    } else if let Some(h) = &r.http {
        Seen::Http {
            host: h.host.clone(),
            addr: r.dst_ip,
            port: r.dst_port,
            method: h.method.clone(),
            path: h.path.clone(),
            credential: r.credential.as_ref().filter(|c| c.injected).map(|c| c.name.clone()),
        }
    } else if let Some(d) = &r.dns {
        Seen::Resolved { name: d.query.clone(), answers: d.answers.clone() }
    } else {
        match (r.source.as_ref(), r.event.as_ref()) {
            // A repeat is the same flow again: its first record counts.
            ("datapath", "new_flow" | "verdict_changed" | "drop") => {
                Seen::Flow { protocol: r.protocol.to_string(), addr: r.dst_ip, port: r.dst_port, names: r.domains.clone(), by_address: false }
            }
            ("proxy", "connection") => {
                // The name the guest sent decides a proxied connection; one
                // that sent none is decided by address rules only.
                let named = r.server_name.as_deref().filter(|n| n.parse::<std::net::IpAddr>().is_err());
                Seen::Flow {
                    protocol: r.protocol.to_string(),
                    addr: r.dst_ip,
                    port: r.dst_port,
                    names: named.map(|n| vec![n.to_string()]).unwrap_or_default(),
                    by_address: named.is_none(),
                }
            }
            _ => return None,
        }
    };
    Some(Observation { at: At { unix_ns: r.time_unix_ns, rfc3339: rfc3339(r.time_unix_ns) }, outcome, seen })
}

/// The records read, and what the reading says about their completeness.
#[derive(Default)]
struct Source {
    records: Vec<FlowRecord>,
    lost: Lost,
    /// Header lines naming the source.
    describe: Vec<String>,
    /// Whether the source is the daemon's bounded history.
    history: bool,
}

fn read_inputs(paths: &[PathBuf]) -> Result<Source, LearnCliError> {
    let mut source = Source::default();
    for path in paths {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| LearnCliError::Read { path: shown.clone(), source: e })?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| LearnCliError::Read { path: shown.clone(), source: e })?;
            if line.trim().is_empty() {
                continue;
            }
            match crate::cli::inspect::parse_input_line(&line) {
                Ok(crate::cli::inspect::InputLine::Record(r)) => source.records.push(*r),
                Ok(crate::cli::inspect::InputLine::Lost(l)) => {
                    source.lost.ring_buffer = source.lost.ring_buffer.max(l.ring_buffer);
                    source.lost.history_evicted = source.lost.history_evicted.max(l.history_evicted);
                    source.lost.follower_lagged += l.follower_lagged;
                }
                Ok(crate::cli::inspect::InputLine::EndOfHistory) => {}
                Err(reason) => return Err(LearnCliError::BadRecord { path: shown, line: n + 1, reason }),
            }
        }
    }
    let files: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    source.describe.push(format!("Source: flow records in {}.", files.join(", ")));
    Ok(source)
}

fn read_daemon(socket: &Path, sandbox: &str) -> Result<(Source, Option<ClientError>), LearnCliError> {
    // Whether the daemon knows the sandbox; one deleted since may still
    // have records in the history, which are learned from all the same.
    let unknown = match call(socket, &Request::SandboxShow { name: sandbox.to_string() }, Duration::from_secs(30)) {
        Ok(_) => None,
        Err(e @ ClientError::Daemon { kind: ErrorKind::NotFound, .. }) => Some(e),
        Err(e) => return Err(e.into()),
    };
    let mut source = Source { history: true, ..Source::default() };
    for line in inspect_stream(socket, false)? {
        match line? {
            StreamLine::Lost(l) => source.lost = l,
            StreamLine::Flow(r) => source.records.push(*r),
            StreamLine::EndOfHistory => break,
        }
    }
    source.describe.push("Source: the daemon's flow history (what `sbx-net inspect` shows).".to_string());
    Ok((source, unknown))
}

/// Warnings about what the source may be missing in the window from
/// `since_ns` (None: everything the sandbox ever did).
fn coverage_warnings(source: &Source, since_ns: Option<u64>) -> Vec<String> {
    let mut warnings = Vec::new();
    if source.history && source.lost.history_evicted > 0 {
        let oldest = source.records.iter().map(|r| r.time_unix_ns).filter(|t| *t > 0).min();
        let uncovered = match (oldest, since_ns) {
            (Some(oldest), Some(since)) => since < oldest,
            _ => true,
        };
        if uncovered {
            let from = oldest.map(rfc3339).unwrap_or_else(|| "now".to_string());
            warnings.push(format!(
                "the daemon's history starts at {from} ({} older records were evicted; `flow_history` in the daemon's configuration sets its size): what the sandbox did before then is not learned",
                source.lost.history_evicted
            ));
        }
    }
    if source.lost.ring_buffer > 0 {
        warnings.push(format!("{} datapath events were lost (the ring buffer was full): flows may be missing", source.lost.ring_buffer));
    }
    if source.lost.follower_lagged > 0 {
        warnings.push(format!("{} records were missed while the stream was saved: flows may be missing", source.lost.follower_lagged));
    }
    warnings
}

/// Learns from the records of `sandbox` at or after `since_ns`; the
/// records of other sandboxes are ignored. Pure.
pub fn learn_from_records(records: &[FlowRecord], sandbox: &str, since_ns: Option<u64>, mut options: LearnOptions) -> Result<Learned, LearnError> {
    let mine: Vec<&FlowRecord> = records.iter().filter(|r| r.sandbox == sandbox && since_ns.is_none_or(|s| r.time_unix_ns >= s)).collect();
    for r in mine.iter().filter(|r| r.source == "audit") {
        if let Some(why) = &r.rule {
            options.warnings.push(format!("the audit log says: {why}"));
        }
    }
    let observations: Vec<Observation> = mine.iter().filter_map(|r| observation(r)).collect();
    let times: Vec<u64> = mine.iter().map(|r| r.time_unix_ns).collect();
    let window = match (times.iter().min(), times.iter().max()) {
        (Some(first), Some(last)) => format!("{} records of the sandbox, from {} to {}", mine.len(), rfc3339(*first), rfc3339(*last)),
        _ => "no records of the sandbox".to_string(),
    };
    let since = since_ns.map(|s| format!(" (since {})", rfc3339(s))).unwrap_or_default();
    options.source.push(format!("{window}{since}."));
    options.sandbox = sandbox.to_string();
    learn(&observations, &options)
}

/// Runs `policy learn`; a relative `--since` counts back from `now_unix_ns`.
/// Warnings go to `err` as well as into the policy's header.
pub fn run(socket: &Path, args: &LearnArgs, now_unix_ns: u64, out: &mut impl Write, err: &mut impl Write) -> Result<(), LearnCliError> {
    let since_ns = args.since.map(|s| s.unix_ns(now_unix_ns));
    let (source, unknown) = if args.input.is_empty() { read_daemon(socket, &args.sandbox)? } else { (read_inputs(&args.input)?, None) };
    let has_records = source.records.iter().any(|r| r.sandbox == args.sandbox);
    if !has_records {
        if let Some(ClientError::Daemon { message, .. }) = unknown {
            return Err(ClientError::Daemon { kind: ErrorKind::NotFound, message: format!("{message}, and the daemon's history has no records of it: nothing to learn from") }.into());
        }
        if !args.input.is_empty() {
            let _ = writeln!(err, "sbx-net policy learn: no records of sandbox {:?} in the input", args.sandbox);
        }
    } else if unknown.is_some() {
        let _ = writeln!(err, "sbx-net policy learn: sandbox {:?} no longer exists; learning from its records in the history", args.sandbox);
    }
    let mut options = LearnOptions {
        sandbox: args.sandbox.clone(),
        name: args.name.clone().unwrap_or_else(|| default_name(&args.sandbox)),
        source: source.describe.clone(),
        warnings: coverage_warnings(&source, since_ns),
    };
    options.source.push("Allowed and audit records are learned; denied ones are listed at the end.".to_string());
    let learned = learn_from_records(&source.records, &args.sandbox, since_ns, options)?;
    for w in &learned.warnings {
        let _ = writeln!(err, "sbx-net policy learn: warning: {w}");
    }
    let text = match args.output {
        LearnOutput::Toml => learned.toml.clone(),
        LearnOutput::Json => serde_json::to_string_pretty(&learned).expect("the learned policy serializes") + "\n",
    };
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(LearnCliError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::decide::{name_verdict, NameVerdict};
    use crate::observe::record::{test_record, CredentialDetail, DnsDetail, HttpDetail, McpDetail};
    use crate::policy::Policy;

    const T0: u64 = 1_764_331_200_000_000_000;
    const SECOND: u64 = 1_000_000_000;

    fn at(r: FlowRecord, second: u64) -> FlowRecord {
        let mut r = r;
        r.time_unix_ns = T0 + second * SECOND;
        r.time = rfc3339(r.time_unix_ns);
        r
    }

    /// A datapath flow of sandbox "agent" at T0 + `second`.
    fn flow(verdict: Verdict, dst: &str, port: u16, domains: &[&str], second: u64) -> FlowRecord {
        at(test_record("agent", verdict, dst, port, domains), second)
    }

    fn icmp(dst: &str, domains: &[&str], second: u64) -> FlowRecord {
        let mut r = flow(Verdict::Allowed, dst, 0, domains, second);
        r.protocol = "icmp".into();
        r
    }

    fn dns(name: &str, answers: &[&str], verdict: Verdict, second: u64) -> FlowRecord {
        let mut r = FlowRecord::new("agent", "dns", "dns_query", "udp", verdict, "policy");
        r.dst_port = 53;
        r.dns = Some(DnsDetail { query: name.into(), qtype: "A".into(), rcode: "NOERROR".into(), answers: answers.iter().map(|a| a.parse().unwrap()).collect(), stripped: 0 });
        if verdict == Verdict::Denied {
            r.rule = Some(format!("deny {name}"));
        }
        at(r, second)
    }

    fn http(host: &str, method: &str, path: &str, verdict: Verdict, second: u64) -> FlowRecord {
        let mut r = FlowRecord::new("agent", "proxy", "http_request", "tcp", verdict, "allowed");
        r.dst_ip = Some("198.51.100.80".parse().unwrap());
        r.dst_port = 80;
        r.domains = vec![host.into()];
        r.http = Some(HttpDetail { method: method.into(), host: host.into(), path: path.into(), status: Some(200) });
        at(r, second)
    }

    fn mcp(method: &str, tool: Option<&str>, verdict: Verdict, second: u64) -> FlowRecord {
        let mut r = FlowRecord::new("agent", "proxy", "mcp_request", "mcp", verdict, "allowed");
        r.dst_ip = Some("198.51.100.90".parse().unwrap());
        r.dst_port = 443;
        r.mcp = Some(McpDetail { server: "https://mcp.test/mcp".into(), method: method.into(), tool: tool.map(str::to_string) });
        at(r, second)
    }

    fn learned(records: &[FlowRecord]) -> Learned {
        learn_from_records(records, "agent", None, LearnOptions { name: default_name("agent"), ..LearnOptions::default() }).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rules(l: &Learned) -> Vec<&str> {
        l.network.iter().map(|e| e.rule.as_str()).collect()
    }

    fn policy(l: &Learned) -> crate::policy::compile::CompiledPolicy {
        crate::policy::compile::compile(&Policy::parse("learned.toml", &l.toml).unwrap(), &[]).unwrap()
    }

    #[test]
    fn nothing_recorded_is_a_deny_all_policy_that_says_so() {
        let l = learned(&[]);
        assert!(l.network.is_empty() && l.http.is_empty() && l.mcp.is_empty());
        assert!(l.toml.contains("name = \"agent-learned\""), "{}", l.toml);
        assert!(l.toml.contains("default = \"deny\""), "{}", l.toml);
        assert!(l.toml.contains("# Nothing allowed was recorded: this policy denies everything.\nallow = []"), "{}", l.toml);
        assert!(l.toml.contains("no records of the sandbox"), "{}", l.toml);
        let p = policy(&l);
        assert_eq!(name_verdict(&p, "api.test"), NameVerdict::Denied { rule_id: 0 });
        // Only denials: still nothing learned, and they are listed.
        let l = learned(&[dns("evil.test", &[], Verdict::Denied, 1), dns("evil.test", &[], Verdict::Denied, 5)]);
        assert!(l.network.is_empty());
        assert!(l.toml.contains("# denied, not learned:\n#   dns evil.test: 2 times, first 2025-11-28T12:00:01.000000Z, last 2025-11-28T12:00:05.000000Z (deny evil.test)"), "{}", l.toml);
    }

    #[test]
    fn destinations_are_named_by_dns_else_learned_as_addresses() {
        let l = learned(&[
            flow(Verdict::Allowed, "198.51.100.7", 443, &["api.test"], 10),
            flow(Verdict::Allowed, "198.51.100.7", 443, &["api.test"], 20),
            // The datapath did not name it, but the sandbox was answered
            // api2.test for that address before.
            dns("api2.test", &["198.51.100.8"], Verdict::Allowed, 1),
            flow(Verdict::Audit, "198.51.100.8", 8443, &[], 2),
            // Nothing names this one.
            flow(Verdict::Allowed, "203.0.113.5", 9, &[], 3),
            flow(Verdict::Denied, "203.0.113.66", 22, &[], 4),
            // Redirected records are the proxy's to report.
            flow(Verdict::Redirected, "198.51.100.9", 443, &["proxied.test"], 5),
        ]);
        assert_eq!(rules(&l), ["api.test:443", "api2.test:8443", "203.0.113.5:9"]);
        let api = &l.network[0];
        assert_eq!((api.uses.count, api.uses.first.as_str(), api.uses.last.as_str()), (2, "2025-11-28T12:00:10.000000Z", "2025-11-28T12:00:20.000000Z"));
        assert!(l.toml.contains("  \"api.test:443\",  # 2 times, first 2025-11-28T12:00:10.000000Z, last 2025-11-28T12:00:20.000000Z\n"), "{}", l.toml);
        assert!(l.toml.contains("#   tcp 203.0.113.66:22: 1 time"), "{}", l.toml);
        assert!(!l.toml.contains("proxied.test"), "{}", l.toml);
        let p = policy(&l);
        assert_eq!(name_verdict(&p, "api.test"), NameVerdict::Allowed { rule_id: 1, port: Some(443) });
        assert!(matches!(name_verdict(&p, "other.test"), NameVerdict::Denied { .. }));
        let addr = |a: &str, port| p.lookup(a.parse().unwrap(), crate::policy::compile::PortInfo::Port(port)).action;
        assert_eq!((addr("203.0.113.5", 9), addr("203.0.113.5", 10), addr("203.0.113.66", 22)), (sbx_net_common::action::ALLOW, sbx_net_common::action::DENY, sbx_net_common::action::DENY));
    }

    #[test]
    fn a_proxied_connection_that_named_nothing_is_learned_by_address() {
        let mut named = FlowRecord::new("agent", "proxy", "connection", "tcp", Verdict::Allowed, "allowed");
        named.dst_ip = Some("198.51.100.7".parse().unwrap());
        named.dst_port = 443;
        named.server_name = Some("api.test".into());
        let mut nameless = named.clone();
        nameless.server_name = None;
        nameless.dst_ip = Some("198.51.100.8".parse().unwrap());
        let l = learned(&[dns("cdn.test", &["198.51.100.8"], Verdict::Allowed, 0), at(named, 1), at(nameless, 2)]);
        assert_eq!(rules(&l), ["api.test:443", "198.51.100.8:443"], "{}", l.toml);
        assert!(l.toml.contains("# Resolved but never connected to, not learned (they will not resolve):\n#   cdn.test: 1 query"), "{}", l.toml);
    }

    #[test]
    fn ports_are_named_only_when_one_was_used() {
        let l = learned(&[
            flow(Verdict::Allowed, "198.51.100.7", 80, &["web.test"], 1),
            flow(Verdict::Allowed, "198.51.100.7", 443, &["web.test"], 2),
            icmp("198.51.100.9", &["ping.test"], 3),
            flow(Verdict::Allowed, "203.0.113.5", 9, &[], 4),
            flow(Verdict::Allowed, "203.0.113.5", 22, &[], 5),
            flow(Verdict::Allowed, "2001:db8::5", 443, &[], 6),
            icmp("203.0.113.6", &[], 7),
        ]);
        assert_eq!(rules(&l), ["ping.test", "web.test", "203.0.113.5:9", "203.0.113.5:22", "203.0.113.6", "[2001:db8::5]:443"], "{}", l.toml);
        assert!(l.toml.contains("  \"web.test\",  # 2 times, first 2025-11-28T12:00:01.000000Z, last 2025-11-28T12:00:02.000000Z; ports 80, 443\n"), "{}", l.toml);
        let p = policy(&l);
        assert_eq!(name_verdict(&p, "web.test"), NameVerdict::Allowed { rule_id: 2, port: None });
        assert_eq!(name_verdict(&p, "ping.test"), NameVerdict::Allowed { rule_id: 1, port: None });
    }

    #[test]
    fn wildcards_only_over_enough_siblings_under_a_deep_enough_parent() {
        let l = learned(&[
            flow(Verdict::Allowed, "198.51.100.1", 8080, &["a.cdn.test"], 1),
            flow(Verdict::Allowed, "198.51.100.2", 8080, &["b.cdn.test"], 2),
            flow(Verdict::Allowed, "198.51.100.2", 8080, &["b.cdn.test"], 3),
            // The parent itself is not one label under itself.
            flow(Verdict::Allowed, "198.51.100.3", 8080, &["cdn.test"], 4),
            // Siblings directly under a one-label parent: never `*.test`.
            flow(Verdict::Allowed, "198.51.100.4", 443, &["one.test"], 5),
            flow(Verdict::Allowed, "198.51.100.5", 443, &["two.test"], 6),
            // A lone child stays exact.
            flow(Verdict::Allowed, "198.51.100.6", 443, &["x.solo.test"], 7),
            // Siblings of a name denied while recording: a wildcard would let it in.
            flow(Verdict::Allowed, "198.51.100.7", 443, &["x.corp.test"], 8),
            flow(Verdict::Allowed, "198.51.100.8", 443, &["y.corp.test"], 9),
            dns("evil.corp.test", &[], Verdict::Denied, 10),
            // Different ports under one wildcard: no port.
            flow(Verdict::Allowed, "198.51.100.9", 80, &["p.mix.test"], 11),
            flow(Verdict::Allowed, "198.51.100.10", 443, &["q.mix.test"], 12),
        ]);
        assert_eq!(
            rules(&l),
            ["*.cdn.test:8080", "*.mix.test", "cdn.test:8080", "one.test:443", "two.test:443", "x.corp.test:443", "x.solo.test:443", "y.corp.test:443"],
            "{}",
            l.toml
        );
        let cdn = &l.network[0];
        assert_eq!((cdn.names.clone(), cdn.uses.count), (vec!["a.cdn.test".to_string(), "b.cdn.test".to_string()], 3));
        assert!(l.toml.contains("\"*.cdn.test:8080\",  # 3 times, first 2025-11-28T12:00:01.000000Z, last 2025-11-28T12:00:03.000000Z; a.cdn.test, b.cdn.test\n"), "{}", l.toml);
        assert!(l.toml.contains("\"*.mix.test\",  # 2 times, first 2025-11-28T12:00:11.000000Z, last 2025-11-28T12:00:12.000000Z; p.mix.test, q.mix.test; ports 80, 443"), "{}", l.toml);
        let p = policy(&l);
        assert!(matches!(name_verdict(&p, "c.cdn.test"), NameVerdict::Allowed { port: Some(8080), .. }));
        assert!(matches!(name_verdict(&p, "evil.corp.test"), NameVerdict::Denied { .. }));
        assert!(matches!(name_verdict(&p, "three.test"), NameVerdict::Denied { .. }));
        assert!(!l.toml.contains("**"), "{}", l.toml);
    }

    #[test]
    fn http_requests_become_rules_per_host_with_sibling_paths_collapsed() {
        let l = learned(&[
            http("api.test", "GET", "/repos/a/issues", Verdict::Allowed, 1),
            http("api.test", "GET", "/repos/b/issues", Verdict::Audit, 2),
            http("api.test", "get", "/repos/c/issues?page=2", Verdict::Allowed, 3),
            http("api.test", "GET", "/repos/c/pulls", Verdict::Allowed, 4),
            http("api.test", "POST", "/repos/a/issues", Verdict::Allowed, 5),
            http("api.test", "GET", "/user", Verdict::Allowed, 6),
            http("api.test", "POST", "/user", Verdict::Allowed, 7),
            // Dot segments and escapes are resolved as the proxy resolves them.
            http("api.test", "GET", "/docs/./x/../%61bout", Verdict::Allowed, 8),
            http("api.test", "DELETE", "/repos/a", Verdict::Denied, 9),
            http("web.test", "GET", "/", Verdict::Allowed, 10),
        ]);
        assert_eq!(l.http.iter().map(|h| h.host.as_str()).collect::<Vec<_>>(), ["api.test", "web.test"]);
        let allow: Vec<&str> = l.http[0].allow.iter().map(|a| a.rule.as_str()).collect();
        assert_eq!(allow, ["GET /docs/about", "GET /repos/*/issues", "POST /repos/a/issues", "GET /repos/c/pulls", "GET,POST /user"], "{}", l.toml);
        assert_eq!(l.http[0].allow[1].uses.count, 3);
        assert!(l.toml.contains("\"GET /repos/*/issues\",  # 3 requests, first 2025-11-28T12:00:01.000000Z, last 2025-11-28T12:00:03.000000Z; e.g. /repos/a/issues, /repos/b/issues, /repos/c/issues\n"), "{}", l.toml);
        assert!(l.toml.contains("#   http DELETE api.test/repos/a: 1 time"), "{}", l.toml);
        assert_eq!(rules(&l), ["api.test:80", "web.test:80"]);
        let p = Policy::parse("l.toml", &l.toml).unwrap();
        let decide = |method: &str, path: &str| crate::policy::http::decide(&p.http, "api.test", method, path);
        assert!(matches!(decide("GET", "/repos/zz/issues"), Some(crate::policy::http::HttpVerdict::Allow { .. })), "{:?}", decide("GET", "/repos/zz/issues"));
        assert!(matches!(decide("DELETE", "/repos/a"), Some(crate::policy::http::HttpVerdict::Deny { .. })));
        assert!(matches!(decide("GET", "/admin"), Some(crate::policy::http::HttpVerdict::Deny { .. })));
        assert!(!l.toml.contains("**"), "{}", l.toml);
    }

    #[test]
    fn collapsing_repeats_until_nothing_merges_and_needs_siblings() {
        let l = learned(&[
            http("api.test", "GET", "/a/x", Verdict::Allowed, 1),
            http("api.test", "GET", "/a/y", Verdict::Allowed, 2),
            http("api.test", "GET", "/b/x", Verdict::Allowed, 3),
            http("api.test", "GET", "/one", Verdict::Allowed, 4),
        ]);
        let allow: Vec<&str> = l.http[0].allow.iter().map(|a| a.rule.as_str()).collect();
        // /a/x and /a/y merge (last segment first); /a/* and /b/x differ in two.
        assert_eq!(allow, ["GET /a/*", "GET /b/x", "GET /one"], "{}", l.toml);
    }

    #[test]
    fn mcp_tools_called_become_the_servers_allowlist() {
        let l = learned(&[
            mcp("initialize", None, Verdict::Allowed, 1),
            mcp("tools/list", None, Verdict::Allowed, 2),
            mcp("tools/call", Some("search"), Verdict::Allowed, 3),
            mcp("tools/call", Some("search"), Verdict::Audit, 4),
            mcp("tools/call", Some("fetch"), Verdict::Allowed, 5),
            mcp("tools/call", Some("delete_repo"), Verdict::Denied, 6),
        ]);
        assert_eq!(l.mcp.len(), 1);
        assert_eq!(l.mcp[0].tools.iter().map(|t| (t.tool.as_str(), t.uses.count)).collect::<Vec<_>>(), [("fetch", 1), ("search", 2)]);
        // The policy requires an [[mcp]] host allowed without a port.
        assert_eq!(rules(&l), ["mcp.test"]);
        assert!(l.toml.contains("[[mcp]]\nurl = \"https://mcp.test/mcp\"  # 5 messages, first"), "{}", l.toml);
        assert!(l.toml.contains("  \"search\",  # 2 calls, first 2025-11-28T12:00:03.000000Z, last 2025-11-28T12:00:04.000000Z\n"), "{}", l.toml);
        assert!(l.toml.contains("#   mcp tools/call delete_repo on https://mcp.test/mcp: 1 time"), "{}", l.toml);
        let p = Policy::parse("l.toml", &l.toml).unwrap();
        assert!(p.mcp[0].allows_tool("search") && !p.mcp[0].allows_tool("delete_repo"));
        // A server used without any tools/call gets no block, and a note.
        let l = learned(&[mcp("tools/list", None, Verdict::Allowed, 1)]);
        assert!(l.toml.contains("# NOTE: MCP server https://mcp.test/mcp was used without a tools/call"), "{}", l.toml);
        assert!(!l.toml.contains("\n[[mcp]]\n"), "{}", l.toml);
        assert_eq!(rules(&l), ["mcp.test:443"], "no block, so the port may be named");
    }

    #[test]
    fn the_output_is_the_same_whatever_the_order_of_the_records() {
        let mut records = vec![
            flow(Verdict::Allowed, "198.51.100.1", 8080, &["a.cdn.test"], 1),
            flow(Verdict::Allowed, "198.51.100.2", 8080, &["b.cdn.test"], 2),
            http("api.test", "GET", "/repos/a", Verdict::Allowed, 3),
            http("api.test", "GET", "/repos/b", Verdict::Allowed, 4),
            mcp("tools/call", Some("search"), Verdict::Allowed, 5),
            dns("evil.test", &[], Verdict::Denied, 6),
            flow(Verdict::Denied, "203.0.113.9", 22, &[], 7),
            flow(Verdict::Allowed, "203.0.113.5", 9, &[], 8),
        ];
        let first = learned(&records).toml;
        records.reverse();
        assert_eq!(learned(&records).toml, first);
        records.swap(0, 5);
        records.swap(2, 7);
        assert_eq!(learned(&records).toml, first);
    }

    #[test]
    fn hostile_names_paths_and_tools_never_break_the_policy() {
        let mut weird_host = http("bad host\n[network]", "GET", "/x", Verdict::Allowed, 1);
        weird_host.dst_ip = Some("198.51.100.80".parse().unwrap());
        let l = learned(&[
            weird_host,
            http("api.test", "GET", "/a\"b/c", Verdict::Allowed, 2),
            http("api.test", "GET", "/%2A/**/x y", Verdict::Allowed, 3),
            http("api.test", "G ET", "/z", Verdict::Allowed, 4),
            http("api.test", "GET", "/%2F", Verdict::Allowed, 5),
            mcp("tools/call", Some("say \"hi\"\\"), Verdict::Allowed, 6),
            mcp("tools/call", Some("*"), Verdict::Allowed, 7),
            dns("x\ny = 1", &[], Verdict::Denied, 8),
        ]);
        let p = Policy::parse("l.toml", &l.toml).unwrap_or_else(|e| panic!("{e}\n{}", l.toml));
        assert_eq!(p.http.len(), 1, "{}", l.toml);
        let allow: Vec<&str> = l.http[0].allow.iter().map(|a| a.rule.as_str()).collect();
        assert_eq!(allow, ["GET /*/*/*", "GET /a\"b/c"], "{}", l.toml);
        assert_eq!(l.mcp[0].tools.iter().map(|t| t.tool.as_str()).collect::<Vec<_>>(), ["say \"hi\"\\"]);
        assert!(p.mcp[0].allows_tool("say \"hi\"\\") && !p.mcp[0].allows_tool("other"));
        assert!(l.notes.iter().any(|n| n.contains("encoded '/'")), "{:?}", l.notes);
        assert!(l.notes.iter().any(|n| n.contains("method \"G ET\"")), "{:?}", l.notes);
        assert!(l.toml.lines().all(|line| !line.starts_with("y = 1") && !line.starts_with("[network]]")), "{}", l.toml);
        assert_eq!(l.toml.matches("\n[network]\n").count(), 1, "{}", l.toml);
    }

    #[test]
    fn only_the_sandboxs_records_from_since_on_are_learned() {
        let mut other = flow(Verdict::Allowed, "198.51.100.1", 443, &["other.test"], 50);
        other.sandbox = "someone-else".into();
        let records = [flow(Verdict::Allowed, "198.51.100.2", 443, &["old.test"], 1), flow(Verdict::Allowed, "198.51.100.3", 443, &["new.test"], 100), other];
        let l = learn_from_records(&records, "agent", Some(T0 + 60 * SECOND), LearnOptions { name: "n".into(), ..LearnOptions::default() }).unwrap();
        assert_eq!(rules(&l), ["new.test:443"]);
        assert!(l.toml.contains("# 1 records of the sandbox, from 2025-11-28T12:01:40.000000Z to 2025-11-28T12:01:40.000000Z (since 2025-11-28T12:01:00.000000Z)."), "{}", l.toml);
    }

    #[test]
    fn credentials_used_and_audit_log_notices_are_told() {
        let mut injected = http("api.test", "GET", "/user", Verdict::Allowed, 1);
        injected.credential = Some(CredentialDetail { name: "gh".into(), injected: true, failure: None, redactions: 0 });
        let mut suppressed = FlowRecord::new("agent", "audit", "audit_suppressed", "other", Verdict::Denied, "rate_limit");
        suppressed.rule = Some("3 audit records of this sandbox were over its budget and not written".into());
        let l = learned(&[injected, at(suppressed, 2)]);
        assert!(l.toml.contains("# NOTE: credential \"gh\" was injected into requests to api.test"), "{}", l.toml);
        assert!(l.toml.contains("# WARNING: the audit log says: 3 audit records"), "{}", l.toml);
        assert!(l.denied.is_empty(), "a notice is not a denial");
    }

    #[test]
    fn a_history_that_does_not_reach_back_to_since_is_a_warning() {
        let source = |evicted| Source {
            records: vec![flow(Verdict::Allowed, "198.51.100.1", 443, &["a.test"], 100)],
            lost: Lost { ring_buffer: 0, history_evicted: evicted, follower_lagged: 0 },
            describe: Vec::new(),
            history: true,
        };
        assert!(coverage_warnings(&source(0), None).is_empty());
        assert!(coverage_warnings(&source(5), Some(T0 + 200 * SECOND)).is_empty(), "the window starts after the history does");
        let w = coverage_warnings(&source(5), Some(T0));
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("the daemon's history starts at 2025-11-28T12:01:40.000000Z (5 older records were evicted"), "{w:?}");
        assert_eq!(coverage_warnings(&source(5), None).len(), 1);
    }

    #[test]
    fn learn_arguments_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: LearnArgs,
        }
        let a = Cli::try_parse_from(["learn", "agent", "--since", "5m", "-o", "json", "--name", "x", "--input", "a.jsonl", "--input", "b.jsonl"]).unwrap().args;
        assert_eq!((a.sandbox.as_str(), a.output, a.name.as_deref(), a.input.len()), ("agent", LearnOutput::Json, Some("x"), 2));
        assert_eq!(a.since.map(|s| s.unix_ns(600 * SECOND)), Some(300 * SECOND));
        assert!(Cli::try_parse_from(["learn", "agent", "-o", "yaml"]).is_err());
        assert!(Cli::try_parse_from(["learn"]).is_err());
        assert_eq!(default_name("my sandbox/1"), "my-sandbox-1-learned");
    }

    #[test]
    fn learns_from_saved_records_and_says_what_the_saved_stream_lost() {
        let dir = std::env::temp_dir().join(format!("sbx-net-learn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("saved.jsonl");
        let record = serde_json::to_string(&flow(Verdict::Allowed, "198.51.100.7", 443, &["api.test"], 1)).unwrap();
        let lost = serde_json::to_string(&StreamLine::Lost(Lost { ring_buffer: 3, history_evicted: 0, follower_lagged: 0 })).unwrap();
        std::fs::write(&file, format!("{lost}\n{record}\n\n")).unwrap();
        let args = LearnArgs { sandbox: "agent".into(), since: None, output: LearnOutput::Toml, name: None, input: vec![file.clone()] };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        run(Path::new("/nonexistent.sock"), &args, T0, &mut out, &mut err).unwrap();
        let (out, err) = (String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap());
        assert!(out.contains(&format!("# Source: flow records in {}.", file.display())), "{out}");
        assert!(out.contains("\"api.test:443\",  # 1 time"), "{out}");
        assert!(out.contains("# WARNING: 3 datapath events were lost"), "{out}");
        assert!(err.contains("warning: 3 datapath events were lost"), "{err}");
        std::fs::write(&file, "{not a record}\n").unwrap();
        let bad = run(Path::new("/nonexistent.sock"), &args, T0, &mut Vec::new(), &mut Vec::new()).unwrap_err().to_string();
        assert!(bad.contains("saved.jsonl:1: not a flow record"), "{bad}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
