//! Flow records: what `sbx-net inspect` shows and the audit log keeps.
//! Pure: decoding datapath events, time formatting and the compact line
//! format (a record's one-line reading, as JSON is its machine one; used by
//! `inspect`, the tests and the fuzz targets). `inspect`'s filters are in
//! [`crate::observe::filter`]; the daemon side (history, ring-buffer
//! reader, audit file) is in [`crate::observe::hub`].

use std::fmt::Write as _;
use std::net::IpAddr;

use sbx_net_common::{event_kind, FlowEvent, Reason};
use serde::{Deserialize, Serialize};

use crate::datapath::events::event_addrs;
use crate::policy::compile::CompiledPolicy;

/// Record text that is usually a constant (no allocation per record).
pub type Text = std::borrow::Cow<'static, str>;

/// What happened to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    Denied,
    /// Passed by the datapath to the host's DNS or credential proxy, which
    /// decides (and reports) on its own.
    Redirected,
    /// Would have been denied by `rule`, which is in audit mode: let
    /// through and recorded.
    Audit,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [Verdict::Allowed, Verdict::Denied, Verdict::Redirected, Verdict::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Redirected => "redirected",
            Verdict::Audit => "audit",
        }
    }

    pub fn parse(text: &str) -> Option<Verdict> {
        match text.to_ascii_lowercase().as_str() {
            "allowed" | "allow" | "forwarded" => Some(Verdict::Allowed),
            "denied" | "deny" | "dropped" | "drop" => Some(Verdict::Denied),
            "redirected" | "redirect" => Some(Verdict::Redirected),
            "audit" | "audited" => Some(Verdict::Audit),
            _ => None,
        }
    }
}

/// DNS detail of a query the DNS proxy answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsDetail {
    pub query: String,
    /// Record type asked for ("A", "AAAA", ...).
    pub qtype: Text,
    /// Response code sent to the guest ("NOERROR", "NXDOMAIN", ...).
    pub rcode: Text,
    /// Addresses in the answer the guest got (after stripping).
    #[serde(default)]
    pub answers: Vec<IpAddr>,
    /// Records removed from the answer (rebinding protection).
    #[serde(default)]
    pub stripped: usize,
}

/// HTTP detail of a request the credential proxy terminated or forwarded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpDetail {
    pub method: String,
    pub host: String,
    pub path: String,
    /// Status sent back to the guest (absent when the upstream failed).
    #[serde(default)]
    pub status: Option<u16>,
}

/// MCP detail of one JSON-RPC message the proxy checked on an `[[mcp]]`
/// server's endpoint (arguments are never recorded).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpDetail {
    /// The server's URL as the policy lists it.
    pub server: String,
    /// JSON-RPC method (`tools/call`, `tools/list`, `initialize`, ...).
    pub method: String,
    /// The tool, for `tools/call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// Whether a credential was injected (its name only, never its value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialDetail {
    pub name: String,
    pub injected: bool,
    /// Why it was not injected, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// `secret_redacted` records: how many times the secret (or an
    /// encoding of it) was cut out of the response sent to the guest.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redactions: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One record of the flow stream. Field names are stable (documented in
/// the README); optional detail is omitted when absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Position in the daemon's stream (increasing; in an unfiltered
    /// `--follow`, a gap is records the client missed).
    #[serde(default)]
    pub seq: u64,
    /// Wall-clock time, RFC 3339 UTC.
    pub time: String,
    pub time_unix_ns: u64,
    /// Sandbox name ("" for a frame on a tap no sandbox owns).
    pub sandbox: String,
    /// Who reported it: "datapath", "dns" or "proxy".
    pub source: Text,
    /// "new_flow", "verdict_changed", "drop", "drop_repeat", "audit",
    /// "audit_repeat" (datapath; the last two: an audited packet passed),
    /// "dns_query" (dns), "connection", "http_request", "secret_redacted" (proxy).
    pub event: Text,
    /// "egress": from the sandbox (the only direction a sandbox starts flows).
    pub direction: Text,
    /// "tcp", "udp", "icmp", "icmpv6", "arp", "ip", "other".
    pub protocol: Text,
    #[serde(default)]
    pub src_ip: Option<IpAddr>,
    #[serde(default)]
    pub src_port: u16,
    #[serde(default)]
    pub dst_ip: Option<IpAddr>,
    #[serde(default)]
    pub dst_port: u16,
    pub verdict: Verdict,
    /// The datapath's reason ("allowed", "default_deny", "spoofed_ip", ...)
    /// or the proxy's ("policy", "misdirected", "upstream_failed", ...).
    pub reason: Text,
    /// The deciding rule as written in the policy (`deny 198.18.4.0/28`,
    /// `allow api.test`, `default deny`); absent when no rule decided.
    #[serde(default)]
    pub rule: Option<String>,
    /// Names the sandbox resolved to the destination (or asked for).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Packets and bytes: for `new_flow` / `verdict_changed` as read from
    /// `inspect`'s history, the flow's totals so far (while the flow table
    /// holds it; the first packet in the audit log and live records); for
    /// `drop_repeat`, those dropped since the flow's previous report.
    #[serde(default)]
    pub packets: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpDetail>,
    /// The name the guest asked the proxy for: TLS SNI or HTTP Host
    /// (connection records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpDetail>,
}

impl FlowRecord {
    /// A record with the common fields set; time and seq are filled in when
    /// it is published.
    pub fn new(sandbox: &str, source: &'static str, event: &'static str, protocol: &'static str, verdict: Verdict, reason: &'static str) -> FlowRecord {
        FlowRecord {
            seq: 0,
            time: String::new(),
            time_unix_ns: 0,
            sandbox: sandbox.to_string(),
            source: Text::Borrowed(source),
            event: Text::Borrowed(event),
            direction: Text::Borrowed("egress"),
            protocol: Text::Borrowed(protocol),
            src_ip: None,
            src_port: 0,
            dst_ip: None,
            dst_port: 0,
            verdict,
            reason: Text::Borrowed(reason),
            rule: None,
            domains: Vec::new(),
            packets: 0,
            bytes: 0,
            dns: None,
            http: None,
            server_name: None,
            credential: None,
            mcp: None,
        }
    }

    pub fn with_endpoints(mut self, src: Option<std::net::SocketAddr>, dst: Option<std::net::SocketAddr>) -> FlowRecord {
        if let Some(s) = src {
            self.src_ip = Some(crate::util::net::canonical(s.ip()));
            self.src_port = s.port();
        }
        if let Some(d) = dst {
            self.dst_ip = Some(crate::util::net::canonical(d.ip()));
            self.dst_port = d.port();
        }
        self
    }

    /// Every name the record is about: resolved names, the DNS query, the
    /// HTTP host and TLS server name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.domains
            .iter()
            .map(String::as_str)
            .chain(self.dns.as_ref().map(|d| d.query.as_str()))
            .chain(self.http.as_ref().map(|h| h.host.as_str()))
            .chain(self.server_name.as_deref())
    }

    pub fn credential_injected(&self) -> bool {
        self.credential.as_ref().is_some_and(|c| c.injected)
    }
}

pub fn protocol_name(ethertype: u16, protocol: u8) -> &'static str {
    match (ethertype, protocol) {
        (0x0806, _) => "arp",
        (_, 6) => "tcp",
        (_, 17) => "udp",
        (_, 1) => "icmp",
        (_, 58) => "icmpv6",
        (0x0800, _) | (0x86dd, _) => "ip",
        _ => "other",
    }
}

fn event_name(kind: u8, reason: Option<Reason>) -> &'static str {
    // An audited packet passed: its per-packet and repeat reports are not drops.
    let audit = reason == Some(Reason::Audit);
    match kind {
        event_kind::NEW_FLOW => "new_flow",
        event_kind::VERDICT_CHANGED => "verdict_changed",
        event_kind::DROP_REPEAT if audit => "audit_repeat",
        event_kind::DROP_REPEAT => "drop_repeat",
        _ if audit => "audit",
        _ => "drop",
    }
}

/// A datapath event as a record: `sandbox` and `policy` are the event's
/// sandbox (when known), `domains` the names it resolved to the destination,
/// `time_unix_ns` the event's wall-clock time.
pub fn from_event(event: &FlowEvent, sandbox: &str, policy: Option<&CompiledPolicy>, domains: Vec<String>, time_unix_ns: u64) -> FlowRecord {
    let reason = Reason::from_u8(event.reason);
    let verdict = match reason {
        Some(Reason::Redirected) => Verdict::Redirected,
        Some(Reason::Audit) => Verdict::Audit,
        Some(r) if r.passes() => Verdict::Allowed,
        _ => Verdict::Denied,
    };
    let rule = match (reason, policy) {
        (Some(Reason::Allowed | Reason::PolicyDeny | Reason::DefaultDeny | Reason::Audit), Some(p)) => Some(p.describe_rule(event.rule_id)),
        (Some(Reason::Allowed | Reason::PolicyDeny | Reason::DefaultDeny | Reason::Audit), None) => Some(format!("rule #{}", event.rule_id)),
        _ => None,
    };
    let (src_ip, dst_ip) = event_addrs(event);
    let mut record = FlowRecord::new(
        sandbox,
        "datapath",
        event_name(event.kind, reason),
        protocol_name(event.ethertype, event.protocol),
        verdict,
        reason.map(Reason::name).unwrap_or("unknown"),
    );
    record.time_unix_ns = time_unix_ns;
    record.time = rfc3339(time_unix_ns);
    record.src_ip = src_ip;
    record.dst_ip = dst_ip;
    record.src_port = event.src_port;
    record.dst_port = event.dst_port;
    record.rule = rule;
    record.domains = domains;
    record.packets = event.packets.max(1);
    record.bytes = if event.bytes == 0 { u64::from(event.packet_len) } else { event.bytes };
    record
}

/// `unix_ns` as RFC 3339 UTC with microseconds.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn endpoint(addr: Option<IpAddr>, port: u16) -> String {
    match (addr, port) {
        (None, 0) => "-".into(),
        (None, p) => format!("*:{p}"),
        (Some(IpAddr::V6(a)), p) if p != 0 => format!("[{a}]:{p}"),
        (Some(a), p) if p != 0 => format!("{a}:{p}"),
        (Some(a), _) => a.to_string(),
    }
}

/// One readable line. With `color`, the verdict is coloured (ANSI).
pub fn compact(r: &FlowRecord, color: bool) -> String {
    let verdict = r.verdict.as_str().to_ascii_uppercase();
    let verdict = if color {
        let code = match r.verdict {
            Verdict::Allowed => "32",
            Verdict::Redirected => "33",
            Verdict::Audit => "35",
            Verdict::Denied => "31",
        };
        format!("\x1b[{code}m{verdict:<10}\x1b[0m")
    } else {
        format!("{verdict:<10}")
    };
    let mut line = format!(
        "{} {} {verdict} {} {} -> {}",
        // The time of day of an RFC 3339 time; any other text (an `--input`
        // file may hold anything) as given, never sliced inside a character.
        r.time.get(11..26).unwrap_or(r.time.as_str()),
        if r.sandbox.is_empty() { "-" } else { r.sandbox.as_str() },
        r.protocol,
        endpoint(r.src_ip, r.src_port),
        endpoint(r.dst_ip, r.dst_port),
    );
    if !r.domains.is_empty() {
        let _ = write!(line, " ({})", r.domains.join(","));
    }
    if let Some(d) = &r.dns {
        let _ = write!(line, " dns {} {} {}", d.qtype, d.query, d.rcode);
        if !d.answers.is_empty() {
            let answers: Vec<String> = d.answers.iter().map(ToString::to_string).collect();
            let _ = write!(line, " [{}]", answers.join(" "));
        }
        if d.stripped > 0 {
            let _ = write!(line, " stripped={}", d.stripped);
        }
    }
    if let Some(name) = &r.server_name {
        let _ = write!(line, " name={name}");
    }
    if let Some(h) = &r.http {
        let _ = write!(line, " http {} {}{}", h.method, h.host, h.path);
        if let Some(s) = h.status {
            let _ = write!(line, " {s}");
        }
    }
    if let Some(c) = &r.credential {
        match (&c.failure, c.injected) {
            (_, true) => {
                let _ = write!(line, " credential={} injected", c.name);
            }
            (Some(f), false) => {
                let _ = write!(line, " credential={} NOT injected: {f}", c.name);
            }
            (None, false) => {
                let _ = write!(line, " credential={} not injected", c.name);
            }
        }
        if c.redactions > 0 {
            let _ = write!(line, " redactions={}", c.redactions);
        }
    }
    if r.source == "datapath" && !(r.event == "new_flow" && r.packets <= 1) {
        let _ = write!(line, " {} pkts {} B", r.packets, r.bytes);
    }
    let _ = write!(line, " {}", r.event);
    match &r.rule {
        Some(rule) => {
            let _ = write!(line, " rule=\"{rule}\"");
        }
        None if r.verdict == Verdict::Denied => {
            let _ = write!(line, " reason={}", r.reason);
        }
        None => {}
    }
    line
}

/// A datapath record for tests (here and in `inspect`'s): TCP from
/// 10.200.0.5:40000 to `dst`:`port` at 2025-11-28T12:00:00Z.
#[cfg(test)]
pub(crate) fn test_record(sandbox: &str, verdict: Verdict, dst: &str, port: u16, domains: &[&str]) -> FlowRecord {
    let mut r = FlowRecord::new(sandbox, "datapath", "new_flow", "tcp", verdict, "allowed");
    r.dst_ip = Some(dst.parse().unwrap());
    r.dst_port = port;
    r.src_ip = Some("10.200.0.5".parse().unwrap());
    r.src_port = 40000;
    r.domains = domains.iter().map(|d| d.to_string()).collect();
    r.time_unix_ns = 1_764_331_200_000_000_000;
    r.time = rfc3339(r.time_unix_ns);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;
    use crate::policy::Policy;

    use super::test_record as record;

    #[test]
    fn a_default_deny_event_reads_well() {
        let policy = Policy::parse("t", "name = \"t\"\n[network]\nallow = [\"198.51.100.0/24\"]\n").unwrap();
        let compiled = compile(&policy, &[]).unwrap();
        let mut ev = FlowEvent { sandbox_id: 3, ethertype: 0x0800, protocol: 17, ip_version: 4, kind: event_kind::NEW_FLOW, ..Default::default() };
        ev.src_addr[..4].copy_from_slice(&[10, 200, 0, 14]);
        ev.dst_addr[..4].copy_from_slice(&[203, 0, 113, 7]);
        ev.src_port = 40000;
        ev.dst_port = 9;
        ev.reason = Reason::DefaultDeny as u8;
        ev.rule_id = 0;
        ev.packets = 1;
        ev.bytes = 60;
        let r = from_event(&ev, "agent", Some(&compiled), vec![], 1_764_331_200_123_456_000);
        assert_eq!(r.verdict, Verdict::Denied);
        assert_eq!(r.rule.as_deref(), Some("default deny"));
        assert_eq!(r.time, "2025-11-28T12:00:00.123456Z");
        assert_eq!(
            compact(&r, false),
            "12:00:00.123456 agent DENIED     udp 10.200.0.14:40000 -> 203.0.113.7:9 new_flow rule=\"default deny\""
        );
    }

    #[test]
    fn an_audit_event_is_an_audit_record_with_the_rule() {
        let policy = Policy::parse("t", "name = \"t\"\nmode = \"audit\"\n[network]\nallow = [\"198.51.100.0/24\"]\n").unwrap();
        let compiled = compile(&policy, &[]).unwrap();
        let mut ev = FlowEvent { sandbox_id: 3, ethertype: 0x0800, protocol: 6, ip_version: 4, kind: event_kind::NEW_FLOW, ..Default::default() };
        ev.reason = Reason::Audit as u8;
        ev.action = sbx_net_common::action::AUDIT;
        let r = from_event(&ev, "agent", Some(&compiled), vec![], 1_764_331_200_000_000_000);
        assert_eq!((r.verdict, r.reason.as_ref(), r.rule.as_deref(), r.event.as_ref()), (Verdict::Audit, "audit", Some("default deny"), "new_flow"));
        ev.kind = event_kind::DROP_REPEAT;
        assert_eq!(from_event(&ev, "agent", Some(&compiled), vec![], 1).event, "audit_repeat");
        ev.kind = event_kind::DROP;
        assert_eq!(from_event(&ev, "agent", Some(&compiled), vec![], 1).event, "audit");
    }

    #[test]
    fn records_round_trip_through_json() {
        let mut r = record("a", Verdict::Allowed, "198.51.100.7", 443, &["api.test"]);
        r.http = Some(HttpDetail { method: "GET".into(), host: "api.test".into(), path: "/v1".into(), status: Some(200) });
        r.credential = Some(CredentialDetail { name: "gh".into(), injected: true, failure: None, redactions: 0 });
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("\"dns\""), "absent detail is omitted: {text}");
        assert_eq!(serde_json::from_str::<FlowRecord>(&text).unwrap(), r);
        let line = compact(&r, true);
        assert!(line.contains("\x1b[32mALLOWED"), "{line}");
        assert!(line.contains("http GET api.test/v1 200 credential=gh injected"), "{line}");
    }
}
