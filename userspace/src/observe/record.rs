//! Flow records: what `sbx-net inspect` shows and the audit log keeps.
//! Pure: decoding datapath events, filters, time formatting and the compact
//! line format. The daemon side (history, ring-buffer reader, audit file)
//! is in [`crate::observe::hub`].

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
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
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Allowed, Verdict::Denied, Verdict::Redirected];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Redirected => "redirected",
        }
    }

    pub fn parse(text: &str) -> Option<Verdict> {
        match text.to_ascii_lowercase().as_str() {
            "allowed" | "allow" | "forwarded" => Some(Verdict::Allowed),
            "denied" | "deny" | "dropped" | "drop" => Some(Verdict::Denied),
            "redirected" | "redirect" => Some(Verdict::Redirected),
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
    /// "new_flow", "verdict_changed", "drop", "drop_repeat" (datapath),
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

fn event_name(kind: u8) -> &'static str {
    match kind {
        event_kind::NEW_FLOW => "new_flow",
        event_kind::VERDICT_CHANGED => "verdict_changed",
        event_kind::DROP_REPEAT => "drop_repeat",
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
        Some(r) if r.passes() => Verdict::Allowed,
        _ => Verdict::Denied,
    };
    let rule = match (reason, policy) {
        (Some(Reason::Allowed | Reason::PolicyDeny | Reason::DefaultDeny), Some(p)) => Some(p.describe_rule(event.rule_id)),
        (Some(Reason::Allowed | Reason::PolicyDeny | Reason::DefaultDeny), None) => Some(format!("rule #{}", event.rule_id)),
        _ => None,
    };
    let (src_ip, dst_ip) = event_addrs(event);
    let mut record = FlowRecord::new(
        sandbox,
        "datapath",
        event_name(event.kind),
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

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `--since`: a duration back from `now_unix_ns` ("90s", "5m", "2h", "1d")
/// or an RFC 3339 UTC time ("2026-11-28T12:00:00Z", fractions allowed).
pub fn parse_since(text: &str, now_unix_ns: u64) -> Result<u64, String> {
    let bad = || format!("--since {text:?}: expected a duration (30s, 5m, 2h, 1d) or an RFC 3339 UTC time (2026-11-28T12:00:00Z)");
    if let Some(unit) = text.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        if let Ok(n) = text[..text.len() - 1].parse::<u64>() {
            let secs = match unit {
                's' => n,
                'm' => n * 60,
                'h' => n * 3600,
                'd' => n * 86_400,
                _ => return Err(bad()),
            };
            return Ok(now_unix_ns.saturating_sub(secs.saturating_mul(1_000_000_000)));
        }
    }
    let t = text.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let num = |s: &str| s.parse::<u32>().map_err(|_| bad());
    let mut date = date.split('-');
    let (y, mo, d) = (
        date.next().ok_or_else(bad)?.parse::<i64>().map_err(|_| bad())?,
        num(date.next().ok_or_else(bad)?)?,
        num(date.next().ok_or_else(bad)?)?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut hms = hms.split(':');
    let (h, mi, s) = (num(hms.next().ok_or_else(bad)?)?, num(hms.next().ok_or_else(bad)?)?, num(hms.next().ok_or_else(bad)?)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 || date.next().is_some() {
        return Err(bad());
    }
    let frac_ns = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        digits.parse::<u64>().map_err(|_| bad())?
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + s);
    u64::try_from(secs).map(|s| s * 1_000_000_000 + frac_ns).map_err(|_| bad())
}

/// One condition of an `inspect` filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Criterion {
    Sandbox(String),
    Verdict(Verdict),
    /// Shell-style glob (`*`, `?`), case-insensitive, on any of the names.
    Domain(String),
    /// Source or destination inside the network.
    Ip(IpNetwork),
    /// Source or destination port.
    Port(u16),
    Protocol(String),
}

impl Criterion {
    fn kind(&self) -> u8 {
        match self {
            Criterion::Sandbox(_) => 0,
            Criterion::Verdict(_) => 1,
            Criterion::Domain(_) => 2,
            Criterion::Ip(_) => 3,
            Criterion::Port(_) => 4,
            Criterion::Protocol(_) => 5,
        }
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        match self {
            Criterion::Sandbox(s) => &r.sandbox == s,
            Criterion::Verdict(v) => r.verdict == *v,
            Criterion::Domain(g) => r.names().any(|n| glob_match(g, n)),
            Criterion::Ip(net) => [r.src_ip, r.dst_ip].into_iter().flatten().any(|ip| net.contains(ip)),
            Criterion::Port(p) => r.src_port == *p || r.dst_port == *p,
            Criterion::Protocol(p) => {
                r.protocol.eq_ignore_ascii_case(p)
                    || (p.eq_ignore_ascii_case("dns") && r.dns.is_some())
                    || (p.eq_ignore_ascii_case("http") && r.http.is_some())
            }
        }
    }
}

/// Filters of `inspect`: criteria of one kind are alternatives (any may
/// match), kinds must all match, and a negated criterion must not match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub criteria: Vec<(bool, Criterion)>,
    /// Only records at or after this time.
    pub since_unix_ns: Option<u64>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        if self.since_unix_ns.is_some_and(|t| r.time_unix_ns < t) {
            return false;
        }
        let mut kinds: Vec<u8> = self.criteria.iter().filter(|(neg, _)| !neg).map(|(_, c)| c.kind()).collect();
        kinds.dedup();
        let positive_ok = kinds
            .iter()
            .all(|k| self.criteria.iter().any(|(neg, c)| !neg && c.kind() == *k && c.matches(r)));
        positive_ok && self.criteria.iter().filter(|(neg, _)| *neg).all(|(_, c)| !c.matches(r))
    }
}

/// Case-insensitive glob with `*` (any run, dots included) and `?`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let t: Vec<char> = text.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Output format of `inspect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Compact,
    Json,
}

/// The parsed `inspect` command line.
#[derive(Clone, Debug, PartialEq)]
pub struct InspectArgs {
    pub follow: bool,
    pub last: Option<usize>,
    pub output: Output,
    pub input: Option<std::path::PathBuf>,
    pub filter: Filter,
    /// Force colour on or off (default: on when stdout is a terminal).
    pub color: Option<bool>,
}

pub const INSPECT_USAGE: &str = "\
usage: sbx-net inspect [--follow|-f] [--last N] [--since DURATION|TIME] [-o compact|json]
                       [--input FILE] [--color|--no-color] [FILTER...]
filters (a kind given twice matches either; --not negates the next filter):
  --sandbox NAME   --verdict allowed|denied|redirected   --domain GLOB
  --ip CIDR        --port N   --protocol tcp|udp|icmp|icmpv6|arp|dns|http
examples:
  sbx-net inspect --last 20 --sandbox agent-1 --verdict denied
  sbx-net inspect -f --domain '*.github.com' --not --port 443 -o json";

/// Parses `inspect`'s arguments (after the subcommand). `now_unix_ns`
/// anchors relative `--since` values.
pub fn parse_inspect_args(args: &[String], now_unix_ns: u64) -> Result<InspectArgs, String> {
    let mut out = InspectArgs { follow: false, last: None, output: Output::Compact, input: None, filter: Filter::default(), color: None };
    let mut negate = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| format!("{name} needs a value\n{INSPECT_USAGE}"))
        };
        let criterion = match flag {
            "--follow" | "-f" => {
                out.follow = true;
                None
            }
            "--last" | "-n" => {
                let v = value(flag)?;
                out.last = Some(v.parse().map_err(|_| format!("--last {v:?}: expected a count"))?);
                None
            }
            "--since" => {
                out.filter.since_unix_ns = Some(parse_since(&value(flag)?, now_unix_ns)?);
                None
            }
            "-o" | "--output" => {
                let v = value(flag)?;
                out.output = match v.as_str() {
                    "compact" => Output::Compact,
                    "json" | "jsonpb" => Output::Json,
                    _ => return Err(format!("-o {v:?}: expected compact or json")),
                };
                None
            }
            "--input" => {
                out.input = Some(value(flag)?.into());
                None
            }
            "--color" => {
                out.color = Some(true);
                None
            }
            "--no-color" => {
                out.color = Some(false);
                None
            }
            "--not" => {
                if negate {
                    return Err("--not --not: negate a filter once".into());
                }
                negate = true;
                continue;
            }
            "--sandbox" => Some(Criterion::Sandbox(value(flag)?)),
            "--verdict" => {
                let v = value(flag)?;
                Some(Criterion::Verdict(Verdict::parse(&v).ok_or_else(|| format!("--verdict {v:?}: expected allowed, denied or redirected"))?))
            }
            "--domain" => Some(Criterion::Domain(value(flag)?.trim_end_matches('.').to_string())),
            "--ip" => {
                let v = value(flag)?;
                let net = v.parse::<IpNetwork>().map_err(|_| format!("--ip {v:?}: expected an address or CIDR"))?;
                Some(Criterion::Ip(net))
            }
            "--port" => {
                let v = value(flag)?;
                Some(Criterion::Port(v.parse().map_err(|_| format!("--port {v:?}: expected a port number"))?))
            }
            "--protocol" => Some(Criterion::Protocol(value(flag)?.to_ascii_lowercase())),
            "-h" | "--help" => return Err(INSPECT_USAGE.to_string()),
            other => return Err(format!("unknown inspect argument {other:?}\n{INSPECT_USAGE}")),
        };
        match criterion {
            Some(c) => out.filter.criteria.push((std::mem::take(&mut negate), c)),
            None if negate => return Err(format!("--not must precede a filter, not {flag}")),
            None => {}
        }
    }
    if negate {
        return Err("--not at the end: it negates the filter after it".into());
    }
    if out.follow && out.input.is_some() {
        return Err("--follow and --input exclude each other".into());
    }
    Ok(out)
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
            Verdict::Denied => "31",
            Verdict::Redirected => "33",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;
    use crate::policy::Policy;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn record(sandbox: &str, verdict: Verdict, dst: &str, port: u16, domains: &[&str]) -> FlowRecord {
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
    fn times_round_trip() {
        for t in [0u64, 951_782_400_000_000_000, 1_764_331_200_123_456_000, 4_102_444_800_000_000_000] {
            assert_eq!(parse_since(&rfc3339(t), 0).unwrap(), t, "{}", rfc3339(t));
        }
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
        let now = 10_000 * 1_000_000_000;
        assert_eq!(parse_since("90s", now).unwrap(), now - 90_000_000_000);
        assert_eq!(parse_since("2h", now).unwrap(), 10_000_000_000_000 - 7_200_000_000_000);
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("2026-13-01T00:00:00Z", now).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.github.com", "api.github.com"));
        assert!(glob_match("*.github.com", "a.b.github.com"));
        assert!(!glob_match("*.github.com", "github.com"));
        assert!(glob_match("API.test", "api.test"));
        assert!(glob_match("a?i.*", "api.test"));
        assert!(!glob_match("api", "api.test"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn filters_combine_kinds_and_negate() {
        let a = record("a", Verdict::Allowed, "198.51.100.7", 443, &["api.test"]);
        let b = record("b", Verdict::Denied, "203.0.113.9", 22, &[]);
        let c = record("a", Verdict::Denied, "198.51.100.200", 80, &["bad.test"]);
        let pick = |s: &str| -> Vec<String> {
            let f = parse_inspect_args(&args(s), 0).unwrap().filter;
            [&a, &b, &c].iter().filter(|r| f.matches(r)).map(|r| format!("{}:{}", r.sandbox, r.dst_port)).collect()
        };
        assert_eq!(pick(""), ["a:443", "b:22", "a:80"]);
        assert_eq!(pick("--sandbox a"), ["a:443", "a:80"]);
        assert_eq!(pick("--sandbox a --sandbox b --verdict denied"), ["b:22", "a:80"]);
        assert_eq!(pick("--not --sandbox a"), ["b:22"]);
        assert_eq!(pick("--sandbox a --not --verdict allowed"), ["a:80"]);
        assert_eq!(pick("--domain *.test"), ["a:443", "a:80"]);
        assert_eq!(pick("--not --domain bad.*"), ["a:443", "b:22"]);
        assert_eq!(pick("--ip 198.51.100.0/25"), ["a:443"]);
        assert_eq!(pick("--ip 10.200.0.5 --port 22"), ["b:22"]);
        assert_eq!(pick("--protocol udp"), Vec::<String>::new());
        assert_eq!(pick("--protocol TCP --not --port 443 --not --port 80"), ["b:22"]);
    }

    #[test]
    fn bad_inspect_arguments_are_explained() {
        for (line, want) in [
            ("--not", "--not at the end"),
            ("--not --follow", "--not must precede a filter"),
            ("--verdict maybe", "expected allowed, denied or redirected"),
            ("--ip 300.1.1.1", "expected an address or CIDR"),
            ("--port", "--port needs a value"),
            ("-o yaml", "expected compact or json"),
            ("--frobnicate", "unknown inspect argument"),
            ("-f --input x.jsonl", "exclude each other"),
        ] {
            let err = parse_inspect_args(&args(line), 0).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
        let ok = parse_inspect_args(&args("-f --last=5 -o json --since 5m"), 600_000_000_000).unwrap();
        assert!(ok.follow);
        assert_eq!(ok.last, Some(5));
        assert_eq!(ok.output, Output::Json);
        assert_eq!(ok.filter.since_unix_ns, Some(300_000_000_000));
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
