//! `sbx-net policy learn`: the smallest policy that would have allowed
//! what a sandbox did. Pure: it takes what was observed (plain values the
//! caller makes from flow records, see [`crate::cli::learn`]: the policy
//! layer comes before the flow records' layer) and writes a policy text,
//! which it parses and compiles before handing it back.
//!
//! How it generalises, and no further:
//! - **Names, not addresses.** A flow to an address the sandbox resolved a
//!   name to is learned as that name (the datapath opens a name's answers
//!   to the sandbox). Only a flow no resolved name explains is learned as
//!   its exact address — and so is a proxied connection that named nothing
//!   (no SNI, no Host): the proxy decides those by address rules alone.
//! - **Ports.** A name is allowed on one port or on all of them (the DNS
//!   path opens a name's addresses for one rule), so a name used on exactly
//!   one port gets `:port`, a name used on several (or by ICMP, without a
//!   port) gets none and its comment lists the ports. An address gets one
//!   rule per port (the classifier keeps up to [`MAX_PORT_VERDICTS`] per
//!   prefix), or none past that. An `[[mcp]]` server's host is always
//!   allowed without a port: the policy requires it.
//! - **Wildcards** only where [`SIBLINGS`] or more names one label under
//!   the same parent were used (`a.cdn.test`, `b.cdn.test` → `*.cdn.test`),
//!   never under a parent of fewer than [`MIN_WILDCARD_PARENT_LABELS`]
//!   labels (never `*.com`), never `**`, and never over a name that was
//!   denied while recording (the wildcard would let it through).
//! - **HTTP**: `[[http]]` per host with the requests seen; paths that differ
//!   in one segment only, used [`SIBLINGS`] or more times, become one glob
//!   with `*` there (repeated until nothing collapses); never `**`; methods
//!   sharing a glob are joined (`GET,POST /x`).
//! - **MCP**: `[[mcp]]` per server URL with the tools called.
//!
//! Denied records are not learned; they are listed in comments. Every entry
//! carries a comment with how often it was seen and when (first, last).
//! The order is deterministic: the same observations in any order give the
//! same text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use sbx_net_common::MAX_PORT_VERDICTS;
use serde::Serialize;

use crate::policy::compile::{compile, CompileError};
use crate::policy::http::{normalise_method, normalise_path};
use crate::policy::{normalise_name, DomainPattern, McpServer, Policy, PolicyError};

/// Names (or paths) used before a wildcard (or `*` segment) covers them.
pub const SIBLINGS: usize = 2;
/// A wildcard's parent has at least this many labels: `*.cdn.test`, never `*.test`.
pub const MIN_WILDCARD_PARENT_LABELS: usize = 2;
/// Denied and resolved-only groups listed in comments at most (a guest can
/// make as many distinct ones as it likes); past it, a count.
pub const MAX_LISTED: usize = 200;
/// Concrete paths (or names) quoted in a glob's (wildcard's) comment.
const MAX_EXAMPLES: usize = 5;
/// Guest-chosen text in a comment is cut to this many characters.
const MAX_COMMENT_TEXT: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    /// A bug: what was written does not read back. The text is kept to
    /// show what went wrong.
    #[error("the learned policy does not parse (please report this): {source}\n--- learned policy ---\n{text}")]
    Parse { source: PolicyError, text: String },
    #[error("the learned policy does not compile: {source}\n--- learned policy ---\n{text}")]
    Compile { source: CompileError, text: String },
}

/// When something was observed: Unix nanoseconds and RFC 3339 (the caller
/// formats it; this layer has no clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At {
    pub unix_ns: u64,
    pub rfc3339: String,
}

/// What happened to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed, or let through in audit mode: what the sandbox did.
    Used,
    /// Refused: not learned, listed.
    Denied { rule: Option<String> },
}

/// One thing the sandbox did (or tried).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A DNS query, with the addresses the sandbox got.
    Resolved { name: String, answers: Vec<IpAddr> },
    /// A flow (datapath) or a proxied connection. `names`: the names the
    /// sandbox resolved to the address (datapath) or sent (SNI, Host);
    /// `by_address`: nothing named it and only address rules can allow it
    /// (a proxied connection without SNI or Host), so no DNS answer may
    /// name it either. `port` 0: a protocol without ports.
    Flow { protocol: String, addr: Option<IpAddr>, port: u16, names: Vec<String>, by_address: bool },
    /// An HTTP request the proxy read; `credential`: the one injected.
    Http { host: String, addr: Option<IpAddr>, port: u16, method: String, path: String, credential: Option<String> },
    /// An MCP JSON-RPC message on an `[[mcp]]` server's endpoint.
    Mcp { server: String, method: String, tool: Option<String> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub at: At,
    pub outcome: Outcome,
    pub seen: Seen,
}

/// How often and when.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Uses {
    pub count: u64,
    pub first: String,
    pub last: String,
    #[serde(skip)]
    first_ns: u64,
    #[serde(skip)]
    last_ns: u64,
}

impl Uses {
    fn add(&mut self, at: &At) {
        if self.count == 0 || at.unix_ns < self.first_ns {
            self.first_ns = at.unix_ns;
            self.first = at.rfc3339.clone();
        }
        if self.count == 0 || at.unix_ns > self.last_ns {
            self.last_ns = at.unix_ns;
            self.last = at.rfc3339.clone();
        }
        self.count += 1;
    }

    fn merge(&mut self, other: &Uses) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 || other.first_ns < self.first_ns {
            self.first_ns = other.first_ns;
            self.first = other.first.clone();
        }
        if self.count == 0 || other.last_ns > self.last_ns {
            self.last_ns = other.last_ns;
            self.last = other.last.clone();
        }
        self.count += other.count;
    }

    fn describe(&self, unit: &str) -> String {
        let plural = if self.count == 1 { "" } else { "s" };
        format!("{} {unit}{plural}, first {}, last {}", self.count, self.first, self.last)
    }
}

/// The caller's part: the policy's name and what the header says about
/// where the observations came from and how complete they are.
#[derive(Clone, Debug, Default)]
pub struct LearnOptions {
    pub sandbox: String,
    pub name: String,
    /// Header comment lines: the source and the window.
    pub source: Vec<String>,
    /// Warnings (lost records, a window the source does not cover).
    pub warnings: Vec<String>,
}

/// One `[network] allow` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkEntry {
    pub rule: String,
    /// The names a wildcard stands for (the name itself otherwise; empty
    /// for an address).
    pub names: Vec<String>,
    /// The ports it was used on (0: no port, e.g. ICMP).
    pub ports: Vec<u16>,
    /// Whether the rule names its (one) port.
    #[serde(skip)]
    pub ported: bool,
    #[serde(flatten)]
    pub uses: Uses,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpAllow {
    pub rule: String,
    /// Some of the paths it stands for.
    pub paths: Vec<String>,
    #[serde(flatten)]
    pub uses: Uses,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpEntry {
    pub host: String,
    pub allow: Vec<HttpAllow>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct McpTool {
    pub tool: String,
    #[serde(flatten)]
    pub uses: Uses,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct McpEntry {
    pub url: String,
    /// Tools called; none: the server was used without a `tools/call`, and
    /// no `[[mcp]]` block is written (it needs a tool).
    pub tools: Vec<McpTool>,
    /// Every message on the endpoint.
    pub messages: Uses,
}

/// A group of refused (or only resolved) things, for the comments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listed {
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(flatten)]
    pub uses: Uses,
}

/// The learned policy: its text (TOML, checked) and the evidence behind
/// each entry (what `-o json` prints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Learned {
    pub name: String,
    pub sandbox: String,
    /// Observations of the sandbox considered.
    pub observations: usize,
    pub network: Vec<NetworkEntry>,
    pub http: Vec<HttpEntry>,
    pub mcp: Vec<McpEntry>,
    /// Names resolved but never connected to: not learned.
    pub resolved_only: Vec<Listed>,
    pub denied: Vec<Listed>,
    /// Denied groups past [`MAX_LISTED`], counted only.
    pub denied_unlisted: usize,
    /// What could not be learned, and other things a reviewer must know.
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
    pub toml: String,
}

/// A policy name from a sandbox name: `<sandbox>-learned`, any character a
/// policy name may not have replaced by `-`.
pub fn default_name(sandbox: &str) -> String {
    let clean: String = sandbox.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect();
    format!("{}-learned", if clean.is_empty() { "sandbox" } else { clean.as_str() })
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Name(String),
    Addr(IpAddr),
}

#[derive(Clone, Debug, Default)]
struct DestUse {
    ports: BTreeMap<u16, Uses>,
    uses: Uses,
    /// An `[[mcp]]` server's host: allowed without a port.
    mcp: bool,
}

impl DestUse {
    fn add(&mut self, port: u16, at: &At) {
        self.ports.entry(port).or_default().add(at);
        self.uses.add(at);
    }

    fn merge(&mut self, other: &DestUse) {
        for (port, uses) in &other.ports {
            self.ports.entry(*port).or_default().merge(uses);
        }
        self.uses.merge(&other.uses);
        self.mcp |= other.mcp;
    }
}

#[derive(Clone, Debug, Default)]
struct PathUse {
    uses: Uses,
    examples: BTreeSet<String>,
}

impl PathUse {
    fn merge(&mut self, other: PathUse) {
        self.uses.merge(&other.uses);
        self.examples.extend(other.examples);
        while self.examples.len() > MAX_EXAMPLES {
            self.examples.pop_last();
        }
    }
}

#[derive(Default)]
struct McpUse {
    tools: BTreeMap<String, Uses>,
    messages: Uses,
}

/// Everything gathered from the observations, before it is generalised.
#[derive(Default)]
struct Gathered {
    dests: BTreeMap<Dest, DestUse>,
    /// host → method → path glob segments → use.
    http: BTreeMap<String, BTreeMap<String, BTreeMap<Vec<String>, PathUse>>>,
    mcp: BTreeMap<String, McpUse>,
    resolved: BTreeMap<String, Uses>,
    denied: BTreeMap<(String, Option<String>), Uses>,
    /// Names in denied observations: no wildcard may cover them.
    denied_names: BTreeSet<String>,
    /// credential → hosts it was injected for.
    credentials: BTreeMap<String, BTreeSet<String>>,
    notes: BTreeSet<String>,
}

/// Text from the guest, made safe and short for a one-line comment.
fn comment_text(text: &str) -> String {
    let mut out: String = text.chars().map(|c| if c.is_control() { '?' } else { c }).take(MAX_COMMENT_TEXT).collect();
    if text.chars().count() > MAX_COMMENT_TEXT {
        out.push('…');
    }
    out
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn addr_port(addr: IpAddr, port: u16) -> String {
    match (addr, port) {
        (_, 0) => addr.to_string(),
        (IpAddr::V6(a), p) => format!("[{a}]:{p}"),
        (a, p) => format!("{a}:{p}"),
    }
}

/// A request path as glob segments that match it (and what they stand
/// for), or why it cannot be written. A segment a glob cannot spell
/// literally (an escape, a `*`, a space) is written as `*`.
fn path_glob(raw: &str) -> Result<(Vec<String>, String), &'static str> {
    let raw = raw.split(['?', '#']).next().unwrap_or("");
    let path = normalise_path(raw).map_err(|e| e.reason())?;
    let segments = path[1..]
        .split('/')
        .map(|s| {
            let plain = !s.chars().any(|c| c.is_control() || c.is_whitespace() || matches!(c, '%' | '*' | '?' | '#' | '\\'));
            if plain { s.to_string() } else { "*".to_string() }
        })
        .collect();
    Ok((segments, path))
}

fn plain_method(method: &str) -> Option<String> {
    let m = normalise_method(method.trim());
    (!m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')).then_some(m)
}

fn valid_tool(tool: &str) -> bool {
    !tool.is_empty() && tool != "*" && tool.len() <= 128 && !tool.chars().any(char::is_control)
}

/// A name as rules hold it, if it is one (not an address).
fn rule_name(name: &str) -> Option<String> {
    let name = normalise_name(name).ok()?;
    (name.parse::<IpAddr>().is_err() && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')).then_some(name)
}

/// An HTTP host as sent (maybe with a port), as a rule name.
fn host_name(host: &str) -> Option<String> {
    let host = host.trim();
    let bare = match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    rule_name(bare)
}

fn gather(observations: &[Observation]) -> Gathered {
    let mut g = Gathered::default();
    // In time order, so a flow is named by answers given before it.
    let mut ordered: Vec<&Observation> = observations.iter().collect();
    ordered.sort_by_key(|o| o.at.unix_ns);
    let mut answered: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for o in ordered {
        let at = &o.at;
        match (&o.outcome, &o.seen) {
            (Outcome::Used, Seen::Resolved { name, answers }) => {
                let Some(name) = rule_name(name) else { continue };
                g.resolved.entry(name.clone()).or_default().add(at);
                for a in answers {
                    answered.entry(*a).or_default().insert(name.clone());
                }
            }
            (Outcome::Used, Seen::Flow { protocol, addr, port, names, by_address }) => {
                let mut named: BTreeSet<String> = names.iter().filter_map(|n| rule_name(n)).collect();
                if named.is_empty() && !by_address {
                    if let Some(known) = addr.and_then(|a| answered.get(&a)) {
                        named.clone_from(known);
                    }
                }
                if *by_address {
                    named.clear();
                }
                if !named.is_empty() {
                    for name in named {
                        g.dests.entry(Dest::Name(name)).or_default().add(*port, at);
                    }
                } else if let Some(a) = addr {
                    g.dests.entry(Dest::Addr(*a)).or_default().add(*port, at);
                } else {
                    g.notes.insert(format!("a {} flow without a destination address was not learned", comment_text(protocol)));
                }
            }
            (Outcome::Used, Seen::Http { host, addr, port, method, path, credential }) => {
                let Some(name) = host_name(host) else {
                    // An address as Host: the proxy decides it by address.
                    match addr {
                        Some(a) => g.dests.entry(Dest::Addr(*a)).or_default().add(*port, at),
                        None => {
                            g.notes.insert(format!("HTTP requests to host {:?} were not learned: not a name or address", comment_text(host)));
                        }
                    }
                    continue;
                };
                g.dests.entry(Dest::Name(name.clone())).or_default().add(*port, at);
                if let Some(c) = credential {
                    g.credentials.entry(c.clone()).or_default().insert(name.clone());
                }
                let Some(method) = plain_method(method) else {
                    g.notes.insert(format!("an HTTP request to {name} with method {:?} cannot be written as a rule: not learned", comment_text(method)));
                    continue;
                };
                match path_glob(path) {
                    Ok((glob, shown)) => {
                        let entry = g.http.entry(name).or_default().entry(method).or_default().entry(glob).or_default();
                        entry.uses.add(at);
                        if entry.examples.len() < MAX_EXAMPLES {
                            entry.examples.insert(shown);
                        }
                    }
                    Err(why) => {
                        g.notes.insert(format!("{method} {name}{} cannot be written as a rule ({why}): not learned", comment_text(path)));
                    }
                }
            }
            (Outcome::Used, Seen::Mcp { server, method, tool }) => {
                let Ok((host, port, ..)) = McpServer::parse_url(server.trim()) else {
                    g.notes.insert(format!("MCP server {:?} is not a URL a policy can name: not learned", comment_text(server)));
                    continue;
                };
                let dest = g.dests.entry(Dest::Name(host)).or_default();
                dest.mcp = true;
                dest.add(port, at);
                let entry = g.mcp.entry(server.trim().to_string()).or_default();
                entry.messages.add(at);
                if method == "tools/call" {
                    match tool {
                        Some(t) if valid_tool(t) => entry.tools.entry(t.clone()).or_default().add(at),
                        other => {
                            g.notes.insert(format!("a tools/call of {:?} on {} cannot be written as a tool name: not learned", comment_text(other.as_deref().unwrap_or("")), comment_text(server)));
                        }
                    }
                }
            }
            (Outcome::Denied { rule }, seen) => {
                let (what, names) = denied_what(seen);
                g.denied_names.extend(names);
                g.denied.entry((what, rule.as_deref().map(comment_text))).or_default().add(at);
            }
        }
    }
    g
}

/// How a refused observation is listed, and the names it involves.
fn denied_what(seen: &Seen) -> (String, Vec<String>) {
    match seen {
        Seen::Resolved { name, .. } => (format!("dns {}", comment_text(name)), rule_name(name).into_iter().collect()),
        Seen::Flow { protocol, addr, port, names, .. } => {
            let dst = addr.map_or_else(|| "-".to_string(), |a| addr_port(a, *port));
            let named: Vec<String> = names.iter().filter_map(|n| rule_name(n)).collect();
            let shown = if named.is_empty() { String::new() } else { format!(" ({})", comment_text(&named.join(","))) };
            (format!("{} {dst}{shown}", comment_text(protocol)), named)
        }
        Seen::Http { host, method, path, .. } => {
            (format!("http {} {}{}", comment_text(method), comment_text(host), comment_text(path)), host_name(host).into_iter().collect())
        }
        Seen::Mcp { server, method, tool } => {
            let what = match tool {
                Some(t) => format!("mcp {} {} on {}", comment_text(method), comment_text(t), comment_text(server)),
                None => format!("mcp {} on {}", comment_text(method), comment_text(server)),
            };
            (what, McpServer::parse_url(server.trim()).map(|(h, ..)| vec![h]).unwrap_or_default())
        }
    }
}

/// Names one label under a parent of enough labels, used by
/// [`SIBLINGS`] or more, become `*.parent` (unless it would cover a
/// denied name). Returns (pattern, names it stands for, use).
fn generalise_names(names: BTreeMap<String, DestUse>, denied: &BTreeSet<String>) -> Vec<(String, Vec<String>, DestUse)> {
    let mut by_parent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in names.keys() {
        if let Some((_, parent)) = name.split_once('.') {
            if parent.split('.').count() >= MIN_WILDCARD_PARENT_LABELS {
                by_parent.entry(parent.to_string()).or_default().push(name.clone());
            }
        }
    }
    let mut wildcarded: BTreeMap<String, String> = BTreeMap::new();
    for (parent, children) in &by_parent {
        let pattern = DomainPattern::OneLabel(parent.clone());
        if children.len() >= SIBLINGS && !denied.iter().any(|d| pattern.matches(d)) {
            for child in children {
                wildcarded.insert(child.clone(), parent.clone());
            }
        }
    }
    let mut out: BTreeMap<String, (Vec<String>, DestUse)> = BTreeMap::new();
    for (name, uses) in names {
        let (pattern, member) = match wildcarded.get(&name) {
            Some(parent) => (format!("*.{parent}"), name),
            None => (name.clone(), name),
        };
        let entry = out.entry(pattern).or_default();
        entry.0.push(member);
        entry.1.merge(&uses);
    }
    out.into_iter().map(|(pattern, (members, uses))| (pattern, members, uses)).collect()
}

fn network_entries(dests: BTreeMap<Dest, DestUse>, denied: &BTreeSet<String>) -> Vec<NetworkEntry> {
    let mut names = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for (dest, uses) in dests {
        match dest {
            Dest::Name(n) => {
                names.insert(n, uses);
            }
            Dest::Addr(a) => {
                addrs.insert(a, uses);
            }
        }
    }
    let mut entries = Vec::new();
    for (pattern, members, uses) in generalise_names(names, denied) {
        let ports: Vec<u16> = uses.ports.keys().copied().collect();
        let (rule, ported) = match ports.as_slice() {
            [port] if *port != 0 && !uses.mcp => (format!("{pattern}:{port}"), true),
            _ => (pattern, false),
        };
        entries.push(NetworkEntry { rule, names: members, ports, ported, uses: uses.uses });
    }
    for (addr, uses) in addrs {
        let ports: Vec<u16> = uses.ports.keys().copied().collect();
        if ports.contains(&0) || ports.len() > MAX_PORT_VERDICTS {
            entries.push(NetworkEntry { rule: addr.to_string(), names: Vec::new(), ports, ported: false, uses: uses.uses });
        } else {
            for (port, port_uses) in uses.ports {
                entries.push(NetworkEntry { rule: addr_port(addr, port), names: Vec::new(), ports: vec![port], ported: true, uses: port_uses });
            }
        }
    }
    entries
}

/// Globs of one method: paths differing in one segment, [`SIBLINGS`] or
/// more, merge into one with `*` there; repeated until nothing merges. In
/// each round the largest groups merge first (then the later segment: an
/// id is more often last), each glob in one merge at most, so
/// `/repos/{a,b,c}/issues` + `/repos/c/pulls` give `/repos/*/issues` and
/// `/repos/c/pulls`. A glob already `*` there absorbs the literals.
fn collapse_paths(mut globs: BTreeMap<Vec<String>, PathUse>) -> BTreeMap<Vec<String>, PathUse> {
    /// (segment position, the glob with `*` there) → the globs it stands for.
    type Groups = BTreeMap<(usize, Vec<String>), Vec<Vec<String>>>;
    loop {
        let mut groups: Groups = BTreeMap::new();
        for glob in globs.keys() {
            for position in 0..glob.len() {
                let mut key = glob.clone();
                key[position] = "*".to_string();
                groups.entry((position, key)).or_default().push(glob.clone());
            }
        }
        let mut ranked: Vec<_> = groups.into_iter().filter(|(_, members)| members.len() >= SIBLINGS).collect();
        if ranked.is_empty() {
            return globs;
        }
        ranked.sort_by(|((pa, ka), ma), ((pb, kb), mb)| mb.len().cmp(&ma.len()).then(pb.cmp(pa)).then(ka.cmp(kb)));
        for ((_, key), members) in ranked {
            if !members.iter().all(|m| globs.contains_key(m)) {
                continue;
            }
            let mut merged = PathUse::default();
            for member in members {
                merged.merge(globs.remove(&member).expect("checked above"));
            }
            globs.entry(key).or_default().merge(merged);
        }
    }
}

fn http_entries(http: BTreeMap<String, BTreeMap<String, BTreeMap<Vec<String>, PathUse>>>) -> Vec<HttpEntry> {
    http.into_iter()
        .map(|(host, methods)| {
            // glob text → (methods, use)
            let mut by_glob: BTreeMap<String, (BTreeSet<String>, PathUse)> = BTreeMap::new();
            for (method, globs) in methods {
                for (glob, uses) in collapse_paths(globs) {
                    let entry = by_glob.entry(format!("/{}", glob.join("/"))).or_default();
                    entry.0.insert(method.clone());
                    entry.1.merge(uses);
                }
            }
            let allow = by_glob
                .into_iter()
                .map(|(glob, (methods, uses))| HttpAllow {
                    rule: format!("{} {glob}", methods.into_iter().collect::<Vec<_>>().join(",")),
                    paths: uses.examples.into_iter().collect(),
                    uses: uses.uses,
                })
                .collect();
            HttpEntry { host, allow }
        })
        .collect()
}

fn listed(groups: BTreeMap<(String, Option<String>), Uses>) -> (Vec<Listed>, usize) {
    let total = groups.len();
    let shown: Vec<Listed> = groups.into_iter().take(MAX_LISTED).map(|((what, rule), uses)| Listed { what, rule, uses }).collect();
    let left = total - shown.len();
    (shown, left)
}

/// Learns the policy for `options.sandbox` from `observations` (all of
/// them that sandbox's, in any order) and checks that it parses and
/// compiles.
pub fn learn(observations: &[Observation], options: &LearnOptions) -> Result<Learned, LearnError> {
    let mut g = gather(observations);
    // Only a host with an [[mcp]] block written must be allowed portless.
    let with_block: BTreeSet<String> =
        g.mcp.iter().filter(|(_, m)| !m.tools.is_empty()).filter_map(|(url, _)| McpServer::parse_url(url).ok().map(|(host, ..)| host)).collect();
    for (dest, uses) in g.dests.iter_mut() {
        uses.mcp = matches!(dest, Dest::Name(n) if with_block.contains(n));
    }
    let connected: BTreeSet<String> = g.dests.keys().filter_map(|d| if let Dest::Name(n) = d { Some(n.clone()) } else { None }).collect();
    let resolved_only: BTreeMap<(String, Option<String>), Uses> =
        std::mem::take(&mut g.resolved).into_iter().filter(|(name, _)| !connected.contains(name)).map(|(name, uses)| ((name, None), uses)).collect();
    let (resolved_only, _) = listed(resolved_only);
    let network = network_entries(std::mem::take(&mut g.dests), &g.denied_names);
    let http = http_entries(std::mem::take(&mut g.http));
    let mcp: Vec<McpEntry> = std::mem::take(&mut g.mcp)
        .into_iter()
        .map(|(url, m)| McpEntry { url, tools: m.tools.into_iter().map(|(tool, uses)| McpTool { tool, uses }).collect(), messages: m.messages })
        .collect();
    let (denied, denied_unlisted) = listed(std::mem::take(&mut g.denied));
    let mut notes: Vec<String> = g.notes.into_iter().collect();
    for (credential, hosts) in &g.credentials {
        notes.push(format!(
            "credential {:?} was injected into requests to {}: copy its [[credentials]] block from the sandbox's policy to keep that",
            comment_text(credential),
            hosts.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    for m in mcp.iter().filter(|m| m.tools.is_empty()) {
        notes.push(format!(
            "MCP server {} was used without a tools/call: no [[mcp]] block (it needs a tool), so its host is decided by [network] alone",
            comment_text(&m.url)
        ));
    }
    let mut learned = Learned {
        name: options.name.clone(),
        sandbox: options.sandbox.clone(),
        observations: observations.len(),
        network,
        http,
        mcp,
        resolved_only,
        denied,
        denied_unlisted,
        notes,
        warnings: options.warnings.clone(),
        toml: String::new(),
    };
    let text = render(&learned, options);
    let policy = Policy::parse(&format!("<learned for {}>", options.sandbox), &text).map_err(|source| LearnError::Parse { source, text: text.clone() })?;
    compile(&policy, &[]).map_err(|source| LearnError::Compile { source, text: text.clone() })?;
    learned.toml = text;
    Ok(learned)
}

fn comment_lines(out: &mut String, prefix: &str, text: &str) {
    for line in text.lines() {
        let _ = writeln!(out, "{prefix}{}", line.chars().map(|c| if c.is_control() { '?' } else { c }).collect::<String>());
    }
}

fn render(l: &Learned, options: &LearnOptions) -> String {
    let mut out = String::new();
    comment_lines(&mut out, "# ", &format!("Learned by `sbx-net policy learn` from what sandbox {:?} did.", comment_text(&l.sandbox)));
    for line in &options.source {
        comment_lines(&mut out, "# ", line);
    }
    out.push_str("# Each entry says how often it was seen and when (first, last). Review it, then\n# enforce it: `sbx-net policy apply FILE` (or `policy check FILE` first).\n");
    for w in &l.warnings {
        comment_lines(&mut out, "# WARNING: ", w);
    }
    for n in &l.notes {
        comment_lines(&mut out, "# NOTE: ", n);
    }
    let _ = writeln!(out, "name = {}", quoted(&l.name));
    out.push_str("\n[network]\ndefault = \"deny\"\n");
    if l.network.is_empty() {
        out.push_str("# Nothing allowed was recorded: this policy denies everything.\nallow = []\n");
    } else {
        out.push_str("allow = [\n");
        for e in &l.network {
            let mut about = e.uses.describe("time");
            if e.rule.starts_with("*.") {
                let shown: Vec<&str> = e.names.iter().take(MAX_EXAMPLES).map(String::as_str).collect();
                let more = if e.names.len() > MAX_EXAMPLES { format!(" and {} more", e.names.len() - MAX_EXAMPLES) } else { String::new() };
                let _ = write!(about, "; {}{more}", shown.join(", "));
            }
            if !e.ported && e.ports.iter().any(|p| *p != 0) {
                let ports: Vec<String> = e.ports.iter().map(|p| if *p == 0 { "no port (ICMP)".to_string() } else { p.to_string() }).collect();
                let _ = write!(about, "; ports {}", ports.join(", "));
            }
            let _ = writeln!(out, "  {},  # {about}", quoted(&e.rule));
        }
        out.push_str("]\n");
    }
    if !l.resolved_only.is_empty() {
        out.push_str("# Resolved but never connected to, not learned (they will not resolve):\n");
        for r in &l.resolved_only {
            let _ = writeln!(out, "#   {}: {}", r.what, r.uses.describe("query"));
        }
    }
    for h in &l.http {
        let _ = writeln!(out, "\n[[http]]\nhosts = [{}]\nallow = [", quoted(&h.host));
        for a in &h.allow {
            let mut about = a.uses.describe("request");
            let literal = a.paths.len() == 1 && a.rule.ends_with(&format!(" {}", a.paths[0]));
            if !literal && !a.paths.is_empty() {
                let shown: Vec<String> = a.paths.iter().map(|p| comment_text(p)).collect();
                let _ = write!(about, "; e.g. {}", shown.join(", "));
            }
            let _ = writeln!(out, "  {},  # {about}", quoted(&a.rule));
        }
        out.push_str("]\n");
    }
    for m in l.mcp.iter().filter(|m| !m.tools.is_empty()) {
        let _ = writeln!(out, "\n[[mcp]]\nurl = {}  # {}\ntools = [", quoted(&m.url), m.messages.describe("message"));
        for t in &m.tools {
            let _ = writeln!(out, "  {},  # {}", quoted(&t.tool), t.uses.describe("call"));
        }
        out.push_str("]\n");
    }
    if !l.denied.is_empty() {
        out.push_str("\n# denied, not learned:\n");
        for d in &l.denied {
            let rule = d.rule.as_ref().map(|r| format!(" ({r})")).unwrap_or_default();
            let _ = writeln!(out, "#   {}: {}{rule}", d.what, d.uses.describe("time"));
        }
        if l.denied_unlisted > 0 {
            let _ = writeln!(out, "#   … and {} more denied destinations (see `sbx-net inspect --verdict denied`)", l.denied_unlisted);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: u64) -> At {
        At { unix_ns: second * 1_000_000_000, rfc3339: format!("t{second}") }
    }

    fn used(second: u64, seen: Seen) -> Observation {
        Observation { at: at(second), outcome: Outcome::Used, seen }
    }

    fn flow(addr: &str, port: u16, names: &[&str]) -> Seen {
        Seen::Flow { protocol: "tcp".into(), addr: Some(addr.parse().unwrap()), port, names: names.iter().map(|n| n.to_string()).collect(), by_address: false }
    }

    fn options() -> LearnOptions {
        LearnOptions { sandbox: "s".into(), name: "s-learned".into(), ..LearnOptions::default() }
    }

    fn globs(paths: &[&str]) -> BTreeMap<Vec<String>, PathUse> {
        paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut u = PathUse::default();
                u.uses.add(&at(i as u64));
                (path_glob(p).unwrap().0, u)
            })
            .collect()
    }

    fn shown(g: &BTreeMap<Vec<String>, PathUse>) -> Vec<String> {
        g.keys().map(|k| format!("/{}", k.join("/"))).collect()
    }

    #[test]
    fn uses_keep_count_first_and_last_in_any_order() {
        let mut u = Uses::default();
        for s in [5, 1, 9, 3] {
            u.add(&at(s));
        }
        assert_eq!((u.count, u.first.as_str(), u.last.as_str()), (4, "t1", "t9"));
        let mut other = Uses::default();
        other.add(&at(0));
        u.merge(&other);
        assert_eq!((u.count, u.first.as_str(), u.last.as_str()), (5, "t0", "t9"));
        assert_eq!(u.describe("call"), "5 calls, first t0, last t9");
    }

    #[test]
    fn sibling_paths_collapse_one_segment_at_a_time() {
        assert_eq!(shown(&collapse_paths(globs(&["/items/1", "/items/2", "/items/3"]))), ["/items/*"]);
        assert_eq!(shown(&collapse_paths(globs(&["/items/1"]))), ["/items/1"], "one path is not a sibling group");
        assert_eq!(shown(&collapse_paths(globs(&["/a/1/x", "/b/2/y"]))), ["/a/1/x", "/b/2/y"], "two segments differ");
        // Groups merge, then the merged globs merge again.
        assert_eq!(shown(&collapse_paths(globs(&["/r/a/issues", "/r/b/issues", "/r/a/pulls", "/r/b/pulls"]))), ["/r/*/*"]);
        // Different depths never merge, and nothing becomes `**`.
        assert_eq!(shown(&collapse_paths(globs(&["/x", "/x/y"]))), ["/x", "/x/y"]);
        let used: u64 = collapse_paths(globs(&["/items/1", "/items/2", "/items/3"])).values().map(|u| u.uses.count).sum();
        assert_eq!(used, 3, "merging keeps every use");
    }

    #[test]
    fn request_paths_become_globs_that_match_them() {
        for (raw, want) in [("/a/b", "/a/b"), ("/a/./b/../c", "/a/c"), ("/a//b", "/a/b"), ("/%7Euser", "/~user"), ("/a?x=1", "/a"), ("/a%20b/c", "/*/c"), ("/**/x", "/*/x"), ("/", "/"), ("/dir/", "/dir/")] {
            let (glob, _) = path_glob(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            let text = format!("/{}", glob.join("/"));
            assert_eq!(text, want, "{raw}");
            let matcher = crate::policy::http::HttpMatcher::parse(&format!("GET {text}"), 1).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert!(matcher.matches("GET", &normalise_path(raw.split('?').next().unwrap()).unwrap()), "{raw} is matched by {text}");
        }
        assert!(path_glob("/%2F").is_err() && path_glob("x").is_err());
    }

    #[test]
    fn wildcards_need_siblings_a_deep_parent_and_no_denied_name_under_them() {
        let dest = || {
            let mut d = DestUse::default();
            d.add(443, &at(1));
            d
        };
        let names: BTreeMap<String, DestUse> = ["a.cdn.test", "b.cdn.test", "a.test", "b.test", "x.y.test"].iter().map(|n| (n.to_string(), dest())).collect();
        let patterns: Vec<String> = generalise_names(names.clone(), &BTreeSet::new()).into_iter().map(|(p, ..)| p).collect();
        assert_eq!(patterns, ["*.cdn.test", "a.test", "b.test", "x.y.test"]);
        let denied: BTreeSet<String> = ["evil.cdn.test".to_string()].into();
        let patterns: Vec<String> = generalise_names(names, &denied).into_iter().map(|(p, ..)| p).collect();
        assert_eq!(patterns, ["a.cdn.test", "a.test", "b.cdn.test", "b.test", "x.y.test"]);
    }

    #[test]
    fn observations_make_a_checked_policy() {
        let observations = [
            used(1, Seen::Resolved { name: "API.test.".into(), answers: vec!["198.51.100.7".parse().unwrap()] }),
            used(2, flow("198.51.100.7", 443, &[])),
            used(3, Seen::Http { host: "api.test:443".into(), addr: None, port: 443, method: "get".into(), path: "/v1/user".into(), credential: None }),
            used(4, Seen::Mcp { server: "https://mcp.test/mcp".into(), method: "tools/call".into(), tool: Some("search".into()) }),
            Observation { at: at(5), outcome: Outcome::Denied { rule: Some("default deny".into()) }, seen: flow("203.0.113.9", 22, &[]) },
        ];
        let l = learn(&observations, &options()).unwrap();
        assert_eq!(l.network.iter().map(|e| e.rule.as_str()).collect::<Vec<_>>(), ["api.test:443", "mcp.test"]);
        assert_eq!(l.network[0].uses.count, 2, "the flow and the request");
        assert_eq!(l.http[0].allow[0].rule, "GET /v1/user");
        assert_eq!(l.denied, [Listed { what: "tcp 203.0.113.9:22".into(), rule: Some("default deny".into()), uses: { let mut u = Uses::default(); u.add(&at(5)); u } }]);
        let p = Policy::parse("x", &l.toml).unwrap();
        assert_eq!((p.name.as_str(), p.default, p.http.len(), p.mcp.len()), ("s-learned", crate::policy::Action::Deny, 1, 1));
    }

    #[test]
    fn a_name_the_policy_rejects_fails_the_self_check_clearly() {
        let bad = LearnOptions { name: "no spaces allowed".into(), ..options() };
        let err = learn(&[], &bad).unwrap_err().to_string();
        assert!(err.starts_with("the learned policy does not parse"), "{err}");
        assert!(err.contains("--- learned policy ---"), "{err}");
        assert_eq!(default_name(""), "sandbox-learned");
    }

    #[test]
    fn text_from_the_guest_is_quoted_and_kept_to_one_line() {
        assert_eq!(quoted("a\"b\\c\nd"), "\"a\\\"b\\\\c\\u000Ad\"");
        assert_eq!(comment_text("x\ny\u{7}"), "x?y?");
        assert_eq!(comment_text(&"z".repeat(500)).chars().count(), MAX_COMMENT_TEXT + 1);
    }
}
