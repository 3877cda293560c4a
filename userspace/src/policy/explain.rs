//! `sbx-net policy test SANDBOX HOST[:PORT]`: what would happen to a
//! connection, and which rule decides. Pure: the same compiled policy the
//! datapath holds, and the same redirect ports nftables uses.

use std::net::IpAddr;

use serde::Serialize;
use sbx_net_common::action;

use crate::policy::compile::{name_verdict, CompiledPolicy, NameVerdict, PortInfo};
use crate::policy::{normalise_name, Origin};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Ip(IpAddr),
    Name(String),
}

/// `HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 address.
pub fn parse_destination(text: &str) -> Result<(Destination, Option<u16>), String> {
    let bad_port = |p: &str| format!("{p:?} is not a port (1-65535)");
    let parse_port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad_port(p));
    if let Some(rest) = text.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']').ok_or_else(|| format!("{text:?}: missing ']'"))?;
        let ip: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None if tail.is_empty() => None,
            None => return Err(format!("{text:?}: expected ':PORT' after ']'")),
        };
        return Ok((Destination::Ip(ip), port));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((Destination::Ip(ip), None));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, Some(parse_port(p)?)),
        None => (text, None),
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((Destination::Ip(ip), port));
    }
    Ok((Destination::Name(normalise_name(host)?), port))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TestOutcome {
    /// `allowed`, `denied` or `audit` (would be denied; audit mode lets it
    /// through and records it).
    pub verdict: &'static str,
    /// The deciding rule as written (`deny 10.0.0.0/8`, `default deny`;
    /// for an audit, the rule that would deny; where an exception let it
    /// through, the allow and the exception).
    pub rule: String,
    /// Where the connection goes and who decides it (with the explanation
    /// first, when there is one).
    pub path: String,
    /// Why, when the rule alone does not say: an audit, an exception.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
}

/// Redirects in force (from the daemon config).
#[derive(Clone, Debug)]
pub struct Redirects<'a> {
    pub proxied_ports: &'a [u16],
}

/// What a rule id means beyond its text: an audit (`would be denied by …`)
/// or an exception (`… does not apply …`).
fn explain(policy: &CompiledPolicy, action: u8, rule_id: u32) -> Option<String> {
    let rule = policy.describe_rule(rule_id);
    if action == action::AUDIT {
        return Some(format!("would be denied by `{rule}`; audit mode: allowed and recorded"));
    }
    let derived = policy.rules.get((rule_id as usize).wrapping_sub(1)).filter(|r| r.origin == Origin::Exception)?;
    // Derived text: `ALLOW (DENY except EXCEPTION)`; an allow's text has no " (".
    let (allow, excepted) = derived.text.split_once(" (")?;
    let excepted = excepted.strip_suffix(')').unwrap_or(excepted);
    Some(format!("`{excepted}`: the exception lifts the deny here, and `{allow}` decides"))
}

fn outcome(verdict: &'static str, rule: String, explanation: Option<String>, path: String) -> TestOutcome {
    let path = match &explanation {
        Some(e) => format!("{e}; {path}"),
        None => path,
    };
    TestOutcome { verdict, rule, path, explanation }
}

pub fn test_destination(policy: &CompiledPolicy, dest: &Destination, port: Option<u16>, redirects: &Redirects<'_>) -> TestOutcome {
    let path = match port {
        Some(53) => "redirected to the DNS proxy (UDP/TCP 53 to any address)".to_string(),
        Some(p) if redirects.proxied_ports.contains(&p) => {
            format!("TCP {p} redirected to the credential proxy, which applies this verdict; other protocols go direct")
        }
        _ => "direct, judged by eBPF on the tap".to_string(),
    };
    match dest {
        Destination::Ip(ip) => {
            let info = port.map_or(PortInfo::None, PortInfo::Port);
            let v = policy.lookup(*ip, info);
            outcome(verdict_name(v.action), policy.describe_rule(v.rule_id), explain(policy, v.action, v.rule_id), path)
        }
        // Decided as the DNS proxy decides it.
        Destination::Name(name) => match name_verdict(policy, name) {
            NameVerdict::Denied { rule_id } if rule_id == sbx_net_common::rule_id::DEFAULT => outcome(
                "denied",
                policy.describe_rule(rule_id),
                None,
                format!("{path}; no rule allows it, so the DNS proxy answers NXDOMAIN and no address opens"),
            ),
            NameVerdict::Denied { rule_id } => {
                outcome("denied", policy.describe_rule(rule_id), None, format!("{path}; the DNS proxy answers NXDOMAIN"))
            }
            NameVerdict::Allowed { rule_id, port: Some(only) } if port.is_some_and(|p| p != only) => outcome(
                "denied",
                policy.describe_rule(rule_id),
                explain(policy, action::ALLOW, rule_id),
                format!("{path}; the name resolves but its addresses open for port {only} only"),
            ),
            NameVerdict::Allowed { rule_id, .. } if rule_id == sbx_net_common::rule_id::DEFAULT => {
                outcome(verdict_name(policy.default_verdict.action), policy.describe_rule(rule_id), None, path)
            }
            NameVerdict::Allowed { rule_id, .. } => outcome(
                "allowed",
                policy.describe_rule(rule_id),
                explain(policy, action::ALLOW, rule_id),
                format!("{path}; only the addresses of its DNS answers open, for their TTL"),
            ),
            NameVerdict::Audit { rule_id, learn } => {
                let opens = match learn {
                    Some((allow, _)) => format!("its answers' addresses open as `{}` allows them", policy.describe_rule(allow)),
                    None => "no address opens for it; the default passes its packets, audited".to_string(),
                };
                outcome("audit", policy.describe_rule(rule_id), explain(policy, action::AUDIT, rule_id), format!("{path}; the DNS proxy answers it and records it as audit; {opens}"))
            }
        },
    }
}

/// What `policy test` is asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestQuery {
    /// `HOST[:PORT]`, an address.
    Destination(Destination, Option<u16>),
    /// `METHOD URL`: one HTTP request, as the proxy would check it.
    Http { method: String, host: String, port: u16, path: String },
    /// `call TOOL URL`: an MCP `tools/call` to the server at URL.
    McpCall { tool: String, host: String, port: u16 },
}

/// `HOST[:PORT]`, `METHOD http[s]://HOST[:PORT]/PATH` or
/// `call TOOL http[s]://HOST[:PORT]/PATH`.
pub fn parse_query(text: &str) -> Result<TestQuery, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let url = |u: &str| crate::policy::McpServer::parse_url(u).map(|(host, port, _, path)| (host, port, path));
    match words.as_slice() {
        [one] => parse_destination(one).map(|(d, p)| TestQuery::Destination(d, p)),
        ["call", tool, u] => {
            let (host, port, _) = url(u)?;
            Ok(TestQuery::McpCall { tool: tool.to_string(), host, port })
        }
        [method, u] => {
            if !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(format!("{method:?} is not an HTTP method"));
            }
            let (scheme_host, raw_path) = match u.find("://").map(|i| i + 3).and_then(|start| u[start..].find('/').map(|j| start + j)) {
                Some(i) => (&u[..i], &u[i..]),
                None => (*u, "/"),
            };
            let (host, port, _) = url(scheme_host)?;
            let raw_path = raw_path.split(['?', '#']).next().unwrap_or("/");
            let path = crate::policy::http::normalise_path(raw_path).map_err(|e| format!("{u:?}: {}", e.reason()))?;
            Ok(TestQuery::Http { method: crate::policy::http::normalise_method(method), host, port, path })
        }
        _ => Err(format!("{text:?}: expected HOST[:PORT], METHOD URL or call TOOL URL")),
    }
}

/// [`test_destination`] for any query: an HTTP request or an MCP call is
/// first a connection to its host (refused there, it goes no further),
/// then checked as the proxy checks it.
pub fn test_query(policy: &CompiledPolicy, query: &TestQuery, redirects: &Redirects<'_>) -> TestOutcome {
    let (host, port) = match query {
        TestQuery::Destination(d, p) => return test_destination(policy, d, *p, redirects),
        TestQuery::Http { host, port, .. } | TestQuery::McpCall { host, port, .. } => (host, *port),
    };
    let connection = test_destination(policy, &Destination::Name(host.clone()), Some(port), redirects);
    if connection.verdict == "denied" {
        return TestOutcome { path: format!("{}; the proxy refuses the connection (TLS alert, or 403 over plain HTTP)", connection.path), ..connection };
    }
    match query {
        TestQuery::Http { method, path, .. } => match crate::policy::http::decide(&policy.http, host, method, path) {
            None => TestOutcome { path: format!("{}; no [[http]] rules for {host}: every request passes", connection.path), ..connection },
            Some(crate::policy::http::HttpVerdict::Allow { rule }) => {
                let rule = rule.unwrap_or(connection.rule);
                outcome(connection.verdict, rule, connection.explanation, format!("terminated at the proxy with the sandbox CA; {method} {path} is forwarded"))
            }
            Some(crate::policy::http::HttpVerdict::Deny { rule, audit: true }) => outcome(
                "audit",
                rule.clone(),
                Some(format!("would be denied by `{rule}`; audit mode: allowed and recorded")),
                format!("terminated at the proxy with the sandbox CA; {method} {path} is forwarded and recorded as audit"),
            ),
            Some(crate::policy::http::HttpVerdict::Deny { rule, audit: false }) => outcome(
                "denied",
                rule.clone(),
                None,
                format!("terminated at the proxy with the sandbox CA; {method} {path} gets 403 with `X-Sbx-Net-Denied: {rule}`, the connection stays usable"),
            ),
        },
        TestQuery::McpCall { tool, .. } => match crate::policy::mcp::server_for(&policy.mcp, host, port) {
            None => TestOutcome { path: format!("{}; {host}:{port} is not a listed MCP server: just a host", connection.path), ..connection },
            Some(server) => match server.decide_tool(tool) {
                crate::policy::mcp::ToolVerdict::Allow { rule } => {
                    outcome(connection.verdict, rule, connection.explanation, format!("terminated at the proxy; the call to {tool} is forwarded"))
                }
                crate::policy::mcp::ToolVerdict::Deny { rule, audit: true } => outcome(
                    "audit",
                    rule.clone(),
                    Some(format!("would be denied by `{rule}`; audit mode: allowed and recorded")),
                    format!("terminated at the proxy; the call to {tool} is forwarded and recorded as audit"),
                ),
                crate::policy::mcp::ToolVerdict::Deny { rule, audit: false } => outcome(
                    "denied",
                    rule.clone(),
                    None,
                    format!("terminated at the proxy; the call gets a JSON-RPC error `sbx-net: denied by {rule}` and never reaches the server"),
                ),
            },
        },
        TestQuery::Destination(..) => unreachable!("returned above"),
    }
}

fn verdict_name(a: u8) -> &'static str {
    match a {
        action::ALLOW => "allowed",
        action::AUDIT => "audit",
        _ => "denied",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;
    use crate::policy::Policy;

    const P: &str = r#"
name = "t"
[network]
allow = ["198.51.100.0/24", "**.example.com", "api.example.com", "git.example.org:22"]
deny = ["198.51.100.16/28", "bad.example.com"]
"#;

    #[test]
    fn parses_destinations() {
        assert_eq!(parse_destination("1.2.3.4:80").unwrap(), (Destination::Ip("1.2.3.4".parse().unwrap()), Some(80)));
        assert_eq!(parse_destination("[2001:db8::1]:443").unwrap().1, Some(443));
        assert_eq!(parse_destination("2001:db8::1").unwrap().1, None);
        assert_eq!(parse_destination("Example.COM.").unwrap(), (Destination::Name("example.com".into()), None));
        assert!(parse_destination("example.com:0").is_err());
        assert!(parse_destination("example.com:http").is_err());
        assert!(parse_destination("[::1").is_err());
    }

    #[test]
    fn explains_verdicts() {
        let compiled = compile(&Policy::parse("t.toml", P).unwrap(), &[]).unwrap();
        let r = Redirects { proxied_ports: &[80, 443] };
        let t = |s: &str| {
            let (d, p) = parse_destination(s).unwrap();
            test_destination(&compiled, &d, p, &r)
        };
        assert_eq!((t("198.51.100.5:8080").verdict, t("198.51.100.5:8080").rule.as_str()), ("allowed", "allow 198.51.100.0/24"));
        assert_eq!(t("198.51.100.20").rule, "deny 198.51.100.16/28");
        assert_eq!(t("203.0.113.1").rule, "default deny");
        assert_eq!(t("10.1.2.3").rule, "builtin deny 10.0.0.0/8 (private)");
        assert!(t("198.51.100.5:443").path.contains("credential proxy"));
        assert_eq!(t("a.b.example.com").rule, "allow **.example.com");
        assert_eq!(t("bad.example.com").verdict, "denied");
        assert_eq!(t("bad.example.com").rule, "deny bad.example.com");
        assert_eq!(t("example.com").rule, "default deny");
        assert!(t("example.com").path.contains("NXDOMAIN"));
        assert_eq!(t("git.example.org:22").verdict, "allowed");
        assert_eq!(t("git.example.org:443").verdict, "denied");
        assert!(t("x.example.com:53").path.contains("DNS proxy"));
    }

    #[test]
    fn explains_http_requests_and_mcp_calls() {
        let text = r#"name = "t"
[network]
allow = ["api.test", "mcp.test", "other.test"]
[[http]]
hosts = ["api.test"]
allow = ["GET /repos/**"]
deny = ["DELETE /**"]
[[mcp]]
url = "https://mcp.test/mcp"
tools = ["search"]
"#;
        let compiled = compile(&Policy::parse("t.toml", text).unwrap(), &[]).unwrap();
        let r = Redirects { proxied_ports: &[80, 443] };
        let t = |s: &str| test_query(&compiled, &parse_query(s).unwrap(), &r);
        let get = t("get https://api.test/repos/%2e%2e/repos/x");
        assert_eq!((get.verdict, get.rule.as_str()), ("allowed", "http allow GET /repos/**"));
        assert!(get.path.contains("GET /repos/x is forwarded"), "{}", get.path);
        let delete = t("DELETE https://api.test/repos/x");
        assert_eq!((delete.verdict, delete.rule.as_str()), ("denied", "http deny DELETE /**"));
        assert!(delete.path.contains("403 with `X-Sbx-Net-Denied: http deny DELETE /**`"), "{}", delete.path);
        assert_eq!(t("GET https://api.test/admin").rule, "http default deny (api.test)");
        assert_eq!(t("GET https://other.test/admin").rule, "allow other.test");
        assert_eq!(t("GET https://unlisted.test/").verdict, "denied");
        assert!(parse_query("GET https://api.test/a%2fb").is_err());
        let call = t("call delete_repo https://mcp.test/mcp");
        assert_eq!((call.verdict, call.rule.as_str()), ("denied", "mcp https://mcp.test/mcp tools search (tool \"delete_repo\" not listed)"));
        assert!(call.path.contains("JSON-RPC error"), "{}", call.path);
        assert_eq!(t("call search https://mcp.test/mcp").verdict, "allowed");
        assert!(t("call search https://other.test/mcp").path.contains("not a listed MCP server"));
    }

    #[test]
    fn explains_audits_and_exceptions() {
        let text = r#"name = "t"
mode = "audit"
[network]
default = "deny"
allow = ["**.corp.test", "198.51.0.0/16"]
deny = [{ pattern = "**.corp.test", except = ["jira.corp.test"] }, { pattern = "198.51.100.0/24", except = ["198.51.100.128/25"] }, "bad.test"]
"#;
        let compiled = compile(&Policy::parse("t.toml", text).unwrap(), &[]).unwrap();
        let r = Redirects { proxied_ports: &[443] };
        let t = |s: &str| {
            let (d, p) = parse_destination(s).unwrap();
            test_destination(&compiled, &d, p, &r)
        };
        let jira = t("jira.corp.test");
        assert_eq!((jira.verdict, jira.rule.as_str()), ("allowed", "allow **.corp.test (deny **.corp.test except jira.corp.test)"));
        assert!(jira.path.starts_with("`deny **.corp.test except jira.corp.test`: the exception lifts the deny here, and `allow **.corp.test` decides; "), "{}", jira.path);
        let git = t("git.corp.test");
        assert_eq!((git.verdict, git.rule.as_str()), ("audit", "deny **.corp.test"));
        assert_eq!(git.explanation.as_deref(), Some("would be denied by `deny **.corp.test`; audit mode: allowed and recorded"));
        assert!(git.path.contains("as `allow **.corp.test` allows them"), "{}", git.path);
        let unlisted = t("unlisted.test");
        assert_eq!((unlisted.verdict, unlisted.rule.as_str()), ("audit", "default deny"));
        assert!(unlisted.path.contains("no address opens"), "{}", unlisted.path);
        let ip = t("198.51.100.200:80");
        assert_eq!((ip.verdict, ip.rule.as_str()), ("allowed", "allow 198.51.0.0/16 (deny 198.51.100.0/24 except 198.51.100.128/25)"));
        let ip = t("198.51.100.1:80");
        assert_eq!((ip.verdict, ip.rule.as_str()), ("audit", "deny 198.51.100.0/24"));
        assert!(ip.path.starts_with("would be denied by `deny 198.51.100.0/24`; audit mode: allowed and recorded; direct"), "{}", ip.path);
        assert_eq!(t("169.254.169.254").verdict, "denied", "built-ins are never audited");
        assert_eq!(t("192.0.2.1").verdict, "audit");
    }
}
