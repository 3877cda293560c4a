//! DNS decisions, pure: which names a sandbox may resolve (and which rule
//! says so), which records of an upstream answer it may see, and which
//! addresses become reachable, for how long, with what trie value. The DNS
//! proxy ([`crate::dns_proxy`]) does the I/O around these.

use std::collections::BTreeSet;
use std::net::IpAddr;

use sbx_net_common::{action, rule_id, PolicyValue};

use crate::compile::{CompiledPolicy, PortInfo};
use crate::policy::{Action, Target};

/// What the policy says about resolving a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Resolve; learned addresses open for `port` only when set.
    Allowed { rule_id: u32, port: Option<u16> },
    /// NXDOMAIN (or REFUSED): a deny rule, or the default.
    Denied { rule_id: u32 },
}

/// Lower-case, no trailing dot: how query names are compared with rules
/// (query names are ASCII on the wire; IDNA happens when rules are parsed).
pub fn normalise_query_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Deny wins (a `name:port` deny denies the name: fail closed); then an
/// any-port allow; then a port allow (addresses open for that port only);
/// then the default — which never opens a name by itself, even when it is
/// `allow`: addresses are then reachable by the default anyway.
pub fn name_verdict(policy: &CompiledPolicy, name: &str) -> NameVerdict {
    let matching = |wanted: Action| {
        policy.rules.iter().enumerate().filter(move |(_, r)| {
            r.action == wanted && matches!(&r.target, Target::Domain(p) if p.matches(name))
        })
    };
    if let Some((i, _)) = matching(Action::Deny).next() {
        return NameVerdict::Denied { rule_id: i as u32 + 1 };
    }
    let allows: Vec<(usize, Option<u16>)> = matching(Action::Allow).map(|(i, r)| (i, r.port)).collect();
    if let Some(&(i, _)) = allows.iter().find(|(_, port)| port.is_none()) {
        return NameVerdict::Allowed { rule_id: i as u32 + 1, port: None };
    }
    if let Some(&(i, port)) = allows.first() {
        return NameVerdict::Allowed { rule_id: i as u32 + 1, port };
    }
    if policy.default_verdict.action == action::ALLOW {
        NameVerdict::Allowed { rule_id: rule_id::DEFAULT, port: None }
    } else {
        NameVerdict::Denied { rule_id: rule_id::DEFAULT }
    }
}

/// One answer record, as far as the plan cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerRecord {
    Cname { owner: String, target: String },
    Address { owner: String, ip: IpAddr, ttl: u32 },
    Other,
}

/// What happens to one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordFate {
    Keep,
    /// An address the guest must not see: rebinding into a denied range,
    /// or an address not on the queried name's CNAME chain.
    Strip { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerPlan {
    pub fates: Vec<RecordFate>,
    /// Addresses to open, with their TTL as answered.
    pub learn: Vec<(IpAddr, u32)>,
}

/// Longest CNAME chain followed.
const MAX_CNAME_CHAIN: usize = 16;

/// Plans an allowed answer to `qname`: the names on its CNAME chain, their
/// A/AAAA records kept and learned unless a policy or built-in deny covers
/// the address (a deny the policy's own explicit allow overrides is already
/// resolved in the compiled trie), everything else untouched.
pub fn plan_answer(policy: &CompiledPolicy, qname: &str, records: &[AnswerRecord]) -> AnswerPlan {
    let mut chain: BTreeSet<String> = BTreeSet::from([normalise_query_name(qname)]);
    for _ in 0..MAX_CNAME_CHAIN {
        let before = chain.len();
        for r in records {
            if let AnswerRecord::Cname { owner, target } = r {
                if chain.contains(&normalise_query_name(owner)) {
                    chain.insert(normalise_query_name(target));
                }
            }
        }
        if chain.len() == before {
            break;
        }
    }
    let mut fates = Vec::with_capacity(records.len());
    let mut learn = Vec::new();
    for r in records {
        let fate = match r {
            AnswerRecord::Address { owner, ip, ttl } => {
                if !chain.contains(&normalise_query_name(owner)) {
                    RecordFate::Strip { reason: format!("{owner} is not on the CNAME chain of {qname}") }
                } else {
                    let v = policy.lookup(*ip, PortInfo::None);
                    if v.action == action::DENY && v.rule_id != rule_id::DEFAULT {
                        RecordFate::Strip { reason: format!("{ip} is in a denied range: {}", policy.describe_rule(v.rule_id)) }
                    } else {
                        if !learn.iter().any(|(a, _)| a == ip) {
                            learn.push((*ip, *ttl));
                        }
                        RecordFate::Keep
                    }
                }
            }
            _ => RecordFate::Keep,
        };
        fates.push(fate);
    }
    AnswerPlan { fates, learn }
}

/// How long a learned address stays open, as plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnTiming {
    pub min_ttl: u32,
    pub max_ttl: u32,
    /// Extra seconds for clients that keep using an address past its TTL.
    pub grace: u32,
}

impl Default for LearnTiming {
    fn default() -> Self {
        LearnTiming { min_ttl: 5, max_ttl: 3600, grace: 30 }
    }
}

impl LearnTiming {
    /// Seconds the address stays open for an answer with `ttl`.
    pub fn open_seconds(&self, ttl: u32) -> u64 {
        u64::from(ttl.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))) + u64::from(self.grace)
    }
}

/// The trie value for a learned /32 or /128: everything the covering entry
/// says (the most specific entry alone decides, so it must carry its
/// covering entries' verdicts), plus the learned allow. An existing learned
/// allow for the same address is extended, never shortened.
pub fn learned_value(
    policy: &CompiledPolicy,
    ip: IpAddr,
    existing: Option<&PolicyValue>,
    rule: u32,
    port: Option<u16>,
    until_ns: u64,
) -> PolicyValue {
    let mut value = match existing {
        Some(v) => *v,
        None => policy.entry_for(ip).copied().unwrap_or_default(),
    };
    if value.learned_until_ns != 0 && value.learned_port != port.unwrap_or(0) {
        // Two names with different port rules on one address: open it for
        // any port only if both allow any port; otherwise keep the wider
        // (any-port) grant when one of them has it.
        if value.learned_port == 0 || port.is_none() {
            value.learned_port = 0;
        }
    } else {
        value.learned_port = port.unwrap_or(0);
    }
    if until_ns > value.learned_until_ns {
        value.learned_until_ns = until_ns;
        value.learned_rule_id = rule;
    }
    value
}

/// One learned address of one sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearnedAddr {
    pub policy_id: u32,
    pub value: PolicyValue,
    pub names: BTreeSet<String>,
    /// Boot-time ns of the last answer that carried this address.
    pub answered_ns: u64,
}

/// Per-name cap: which of `name`'s older addresses to forget so that at
/// most `cap` remain — never one of `current` (the answer just given), never
/// one with a live flow, least recently answered first. An answer larger
/// than the cap is kept whole.
pub fn over_cap(
    table: &std::collections::HashMap<IpAddr, LearnedAddr>,
    name: &str,
    current: &[IpAddr],
    cap: usize,
    live: impl Fn(IpAddr) -> bool,
) -> Vec<IpAddr> {
    let mut older: Vec<(&IpAddr, &LearnedAddr)> =
        table.iter().filter(|(ip, l)| l.names.contains(name) && !current.contains(ip)).collect();
    let total = older.len() + current.len();
    let excess = total.saturating_sub(cap.max(current.len()));
    if excess == 0 {
        return Vec::new();
    }
    older.sort_by_key(|(ip, l)| (l.answered_ns, **ip));
    older.into_iter().map(|(ip, _)| *ip).filter(|ip| !live(*ip)).take(excess).collect()
}

/// (source, destination) of every connection in `/proc/net/nf_conntrack`
/// text, original direction.
pub fn conntrack_pairs(text: &str) -> BTreeSet<(IpAddr, IpAddr)> {
    text.lines()
        .filter_map(|line| {
            let mut src = None;
            let mut dst = None;
            for field in line.split_whitespace() {
                if let Some(v) = field.strip_prefix("src=") {
                    if src.is_none() {
                        src = v.parse::<IpAddr>().ok();
                    }
                } else if let Some(v) = field.strip_prefix("dst=") {
                    if dst.is_none() {
                        dst = v.parse::<IpAddr>().ok();
                    }
                }
            }
            Some((src?, dst?))
        })
        .collect()
}

/// A learned address under a new policy: kept for the names the new policy
/// still allows (their rule and port decide), dropped when none is, or when
/// the address now falls in a denied range. Expiry is unchanged.
pub fn carry_learned(new: &CompiledPolicy, ip: IpAddr, old: &LearnedAddr) -> Option<(PolicyValue, BTreeSet<String>)> {
    let v = new.lookup(ip, PortInfo::None);
    if v.action == action::DENY && v.rule_id != rule_id::DEFAULT {
        return None;
    }
    let mut value: Option<PolicyValue> = None;
    let mut names = BTreeSet::new();
    for name in &old.names {
        if let NameVerdict::Allowed { rule_id, port } = name_verdict(new, name) {
            value = Some(learned_value(new, ip, value.as_ref(), rule_id, port, old.value.learned_until_ns));
            names.insert(name.clone());
        }
    }
    value.map(|v| (v, names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::policy::Policy;

    const P: &str = r#"
name = "t"
[network]
allow = ["allowed.test", "*.one.test", "**.any.test", "git.test:22", "203.0.113.128/25", "cname.test"]
deny = ["bad.any.test", "10.0.0.0/8"]
"#;

    fn policy() -> CompiledPolicy {
        compile(&Policy::parse("t.toml", P).unwrap(), &["10.200.0.5".parse().unwrap()]).unwrap()
    }

    fn rule_text(p: &CompiledPolicy, v: &NameVerdict) -> String {
        match v {
            NameVerdict::Allowed { rule_id, .. } | NameVerdict::Denied { rule_id } => p.describe_rule(*rule_id),
        }
    }

    #[test]
    fn name_rules() {
        let p = policy();
        assert_eq!(rule_text(&p, &name_verdict(&p, "allowed.test")), "allow allowed.test");
        assert!(matches!(name_verdict(&p, "a.one.test"), NameVerdict::Allowed { port: None, .. }));
        assert!(matches!(name_verdict(&p, "a.b.one.test"), NameVerdict::Denied { rule_id: 0 }));
        assert!(matches!(name_verdict(&p, "one.test"), NameVerdict::Denied { rule_id: 0 }));
        assert!(matches!(name_verdict(&p, "x.y.any.test"), NameVerdict::Allowed { .. }));
        assert!(matches!(name_verdict(&p, "any.test"), NameVerdict::Denied { .. }));
        assert_eq!(rule_text(&p, &name_verdict(&p, "bad.any.test")), "deny bad.any.test");
        assert!(matches!(name_verdict(&p, "git.test"), NameVerdict::Allowed { port: Some(22), .. }));
        assert_eq!(rule_text(&p, &name_verdict(&p, "unlisted.test")), "default deny");
        assert_eq!(normalise_query_name("Allowed.TEST."), "allowed.test");
    }

    fn addr(owner: &str, ip: &str) -> AnswerRecord {
        AnswerRecord::Address { owner: owner.into(), ip: ip.parse().unwrap(), ttl: 60 }
    }

    #[test]
    fn answers_follow_cname_chains_and_strip_rebinding() {
        let p = policy();
        let records = vec![
            AnswerRecord::Cname { owner: "cname.test.".into(), target: "mid.elsewhere.".into() },
            AnswerRecord::Cname { owner: "mid.elsewhere.".into(), target: "end.elsewhere.".into() },
            addr("end.elsewhere.", "198.51.100.7"),
            addr("end.elsewhere.", "2001:db8::7"),
            addr("end.elsewhere.", "10.1.2.3"),
            addr("end.elsewhere.", "127.0.0.1"),
            addr("end.elsewhere.", "169.254.169.254"),
            addr("end.elsewhere.", "::ffff:10.0.0.1"),
            addr("end.elsewhere.", "10.200.0.5"),
            addr("unrelated.test.", "198.51.100.9"),
            AnswerRecord::Other,
        ];
        let plan = plan_answer(&p, "cname.test", &records);
        assert_eq!(plan.learn, vec![("198.51.100.7".parse().unwrap(), 60), ("2001:db8::7".parse().unwrap(), 60)]);
        let stripped: Vec<usize> = plan.fates.iter().enumerate().filter(|(_, f)| *f != &RecordFate::Keep).map(|(i, _)| i).collect();
        assert_eq!(stripped, vec![4, 5, 6, 7, 8, 9]);
        match &plan.fates[4] {
            RecordFate::Strip { reason } => assert!(reason.contains("deny 10.0.0.0/8"), "{reason}"),
            f => panic!("{f:?}"),
        }
        // A CNAME loop ends.
        let looped = vec![
            AnswerRecord::Cname { owner: "a.".into(), target: "b.".into() },
            AnswerRecord::Cname { owner: "b.".into(), target: "a.".into() },
        ];
        assert!(plan_answer(&p, "a", &looped).learn.is_empty());
    }

    #[test]
    fn learned_addresses_follow_the_new_policy() {
        let old = policy();
        let until = 1_000;
        let learned = LearnedAddr {
            answered_ns: 0,
            policy_id: 7,
            value: learned_value(&old, "198.51.100.5".parse().unwrap(), None, 1, None, until),
            names: ["allowed.test".to_string(), "a.one.test".to_string()].into(),
        };
        // Still allowed by one name: kept, same expiry, only that name.
        let narrower = compile(&Policy::parse("t.toml", "name = \"t\"\n[network]\nallow = [\"*.one.test\"]\n").unwrap(), &[]).unwrap();
        let (v, names) = carry_learned(&narrower, "198.51.100.5".parse().unwrap(), &learned).unwrap();
        assert_eq!(v.learned_until_ns, until);
        assert_eq!(names.into_iter().collect::<Vec<_>>(), vec!["a.one.test"]);
        // No name allowed any more, or the address now denied: dropped.
        let none = compile(&Policy::parse("t.toml", "name = \"t\"\n[network]\nallow = [\"other.test\"]\n").unwrap(), &[]).unwrap();
        assert!(carry_learned(&none, "198.51.100.5".parse().unwrap(), &learned).is_none());
        let denied = compile(&Policy::parse("t.toml", "name = \"t\"\n[network]\nallow = [\"allowed.test\"]\ndeny = [\"198.51.100.0/24\"]\n").unwrap(), &[]).unwrap();
        assert!(carry_learned(&denied, "198.51.100.5".parse().unwrap(), &learned).is_none());
    }

    #[test]
    fn per_name_cap_keeps_the_answer_and_live_flows() {
        let p = policy();
        let entry = |names: &[&str], at: u64| LearnedAddr {
            policy_id: 1,
            value: learned_value(&p, "198.51.100.1".parse().unwrap(), None, 1, None, 100),
            names: names.iter().map(|n| n.to_string()).collect(),
            answered_ns: at,
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut t = std::collections::HashMap::new();
        t.insert(ip("198.51.100.1"), entry(&["cdn.test"], 1));
        t.insert(ip("198.51.100.2"), entry(&["cdn.test"], 2));
        t.insert(ip("198.51.100.3"), entry(&["cdn.test", "other.test"], 3));
        t.insert(ip("198.51.100.4"), entry(&["cdn.test"], 4));
        t.insert(ip("198.51.100.9"), entry(&["other.test"], 0));
        let current = [ip("198.51.100.4")];
        assert_eq!(over_cap(&t, "cdn.test", &current, 2, |_| false), vec![ip("198.51.100.1"), ip("198.51.100.2")]);
        // A live flow protects the oldest; the next oldest goes instead.
        assert_eq!(over_cap(&t, "cdn.test", &current, 2, |a| a == ip("198.51.100.1")), vec![ip("198.51.100.2"), ip("198.51.100.3")]);
        assert!(over_cap(&t, "cdn.test", &current, 4, |_| false).is_empty());
        // An answer bigger than the cap is kept whole.
        let big = [ip("198.51.100.1"), ip("198.51.100.2"), ip("198.51.100.3"), ip("198.51.100.4")];
        assert!(over_cap(&t, "cdn.test", &big, 2, |_| false).is_empty());
        let text = "ipv4     2 tcp      6 431999 ESTABLISHED src=10.200.0.6 dst=198.51.100.1 sport=1 dport=80 src=198.51.100.1 dst=192.0.2.1 sport=80 dport=1 [ASSURED] mark=0 use=1\n\
                    ipv6     10 tcp      6 60 SYN_SENT src=fd73:6278:0000:0001:0000:0000:0000:0002 dst=2001:0db8:0100:0000:0000:0000:0000:0005 sport=2 dport=80 [UNREPLIED] src=2001:0db8:0100:0000:0000:0000:0000:0005 dst=fd73:6278:0000:0001:0000:0000:0000:0002 sport=80 dport=2\n";
        let pairs = conntrack_pairs(text);
        assert!(pairs.contains(&(ip("10.200.0.6"), ip("198.51.100.1"))));
        assert!(pairs.contains(&(ip("fd73:6278:0:1::2"), ip("2001:db8:100::5"))));
        assert_eq!(pairs.len(), 2);
    }

    #[test]
    fn timing_and_values() {
        let t = LearnTiming { min_ttl: 5, max_ttl: 300, grace: 30 };
        assert_eq!(t.open_seconds(0), 35);
        assert_eq!(t.open_seconds(60), 90);
        assert_eq!(t.open_seconds(86_400), 330);
        let p = policy();
        // Inside an allowed CIDR: the covering entry's verdict is carried.
        let ip: IpAddr = "203.0.113.200".parse().unwrap();
        let v = learned_value(&p, ip, None, 1, None, 100);
        assert_eq!(v.any_port.action, action::ALLOW);
        assert_eq!((v.learned_until_ns, v.learned_port, v.learned_rule_id), (100, 0, 1));
        // A later, shorter answer never shortens; another name's port rule
        // does not narrow an any-port grant.
        let v2 = learned_value(&p, ip, Some(&v), 4, Some(22), 50);
        assert_eq!((v2.learned_until_ns, v2.learned_port, v2.learned_rule_id), (100, 0, 1));
        let v3 = learned_value(&p, "198.51.100.1".parse().unwrap(), None, 4, Some(22), 10);
        assert_eq!(v3.learned_port, 22);
        assert_eq!(v3.any_port.action, action::DENY);
    }
}
