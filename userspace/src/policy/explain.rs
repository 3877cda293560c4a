//! `sbx-net policy test SANDBOX HOST[:PORT]`: what would happen to a
//! connection, and which rule decides. Pure: the same compiled policy the
//! datapath holds, and the same redirect ports nftables uses.

use std::net::IpAddr;

use serde::Serialize;
use sbx_net_common::action;

use crate::policy::compile::{CompiledPolicy, PortInfo};
use crate::policy::{normalise_name, Action, Target};

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
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    /// The deciding rule as written (`deny 10.0.0.0/8`, `default deny`).
    pub rule: String,
    /// Where the connection goes and who decides it.
    pub path: String,
}

/// Redirects in force (from the daemon config).
#[derive(Clone, Debug)]
pub struct Redirects<'a> {
    pub proxied_ports: &'a [u16],
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
            TestOutcome { verdict: verdict_name(v.action), rule: policy.describe_rule(v.rule_id), path }
        }
        Destination::Name(name) => {
            let applies = |action: Action| {
                policy.rules.iter().find(|r| {
                    r.action == action
                        && matches!(&r.target, Target::Domain(p) if p.matches(name))
                        && (r.port.is_none() || r.port == port)
                })
            };
            if let Some(rule) = applies(Action::Deny) {
                return TestOutcome { verdict: "denied", rule: rule.describe(), path: format!("{path}; the DNS proxy answers NXDOMAIN") };
            }
            if let Some(rule) = applies(Action::Allow) {
                return TestOutcome {
                    verdict: "allowed",
                    rule: rule.describe(),
                    path: format!("{path}; only the addresses of its DNS answers open, for their TTL"),
                };
            }
            let verdict = verdict_name(policy.default_verdict.action);
            let path = if verdict == "denied" {
                format!("{path}; no rule names it, so the DNS proxy answers NXDOMAIN and no address opens")
            } else {
                path
            };
            TestOutcome { verdict, rule: policy.describe_rule(0), path }
        }
    }
}

fn verdict_name(a: u8) -> &'static str {
    if a == action::ALLOW {
        "allowed"
    } else {
        "denied"
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
}
