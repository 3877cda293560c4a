//! Policy compilation: IP/CIDR rules → fully resolved LPM trie entries.
//!
//! The datapath does one LPM lookup per packet and the most specific entry
//! alone decides, so every entry must already say what all of its covering
//! rules say. For an entry at prefix P, the addresses that land on it are
//! exactly those under P and under no more specific entry, and the rules
//! covering them are exactly the rules whose prefix contains P. So each
//! entry is resolved from the rules containing its own prefix:
//!
//! 1. a policy deny that applies wins, whatever its specificity;
//! 2. else the most specific policy allow, if it is at least as specific as
//!    the most specific built-in deny (the built-in list yields only to an
//!    explicit allow);
//! 3. else the built-in deny;
//! 4. else the policy default.
//!
//! `:port` rules apply only to their port; each entry carries the port
//! verdicts that differ from its any-port verdict.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use sbx_net_common::{action, rule_id, PolicyValue, PortVerdict, Verdict, MAX_PORT_VERDICTS};

use crate::policy::{builtin_deny_rules, Action, Mount, Origin, Policy, Rule, Target};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("policy {policy}: {prefix} needs {count} port-specific verdicts; at most {MAX_PORT_VERDICTS} per prefix are supported")]
    TooManyPorts { policy: String, prefix: String, count: usize },
}

/// A compiled policy for one sandbox: trie entries (without the sandbox id,
/// which the datapath prefixes) and the table that explains rule ids.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompiledPolicy {
    pub policy_name: String,
    pub default_action: Action,
    /// What a trie miss means.
    pub default_verdict: Verdict,
    pub v4: Vec<(Ipv4Addr, u8, PolicyValue)>,
    pub v6: Vec<(Ipv6Addr, u8, PolicyValue)>,
    /// Rule id `i + 1` is `rules[i]`; id 0 is the default.
    pub rules: Vec<Rule>,
    /// The policy's `[filesystem]` mounts, for the VM that runs the sandbox
    /// (absent from forms serialized before mounts existed: none).
    #[serde(default)]
    pub filesystem: Vec<Mount>,
    /// The policy's own mode (`audit`: its denies are only recorded).
    #[serde(default)]
    pub mode: crate::policy::Mode,
    /// `[[http]]` rules the credential proxy checks each request against.
    #[serde(default)]
    pub http: Vec<crate::policy::HttpRules>,
    /// `[[mcp]]` servers whose JSON-RPC the proxy checks.
    #[serde(default)]
    pub mcp: Vec<crate::policy::McpServer>,
}

impl CompiledPolicy {
    /// The rule as written, for attribution (`deny 10.0.0.0/8`, `default deny`).
    pub fn describe_rule(&self, id: u32) -> String {
        if id == rule_id::DEFAULT {
            return format!("default {}", self.default_action.as_str());
        }
        match self.rules.get(id as usize - 1) {
            Some(rule) => rule.describe(),
            None if id == rule_id::NONE => "no rule (dropped before policy)".into(),
            None => format!("unknown rule #{id}"),
        }
    }

    /// Whether a deny by rule `id` is only audited: the rule is in audit
    /// mode (its own, or its policy's when it names none), or — for the
    /// default — the policy is. The built-in list is always enforced.
    pub fn is_audit(&self, id: u32) -> bool {
        if id == rule_id::DEFAULT {
            return self.mode.is_audit();
        }
        match self.rules.get((id as usize).wrapping_sub(1)) {
            Some(rule) => rule.origin == Origin::Policy && rule.mode.is_audit(),
            None => false,
        }
    }

    pub fn entry_count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// What the datapath decides for `dst`: the longest matching entry, then
    /// [`entry_verdict`]. A reference for tests; the kernel does the same.
    pub fn lookup(&self, dst: IpAddr, port: PortInfo) -> Verdict {
        match self.entry_for(dst) {
            Some(value) => entry_verdict(value, port, 0),
            None => self.default_verdict,
        }
    }

    /// The most specific entry covering `dst` (the one the datapath's LPM
    /// lookup finds).
    pub fn entry_for(&self, dst: IpAddr) -> Option<&PolicyValue> {
        match dst {
            IpAddr::V4(ip) => {
                let a = u32::from(ip) as u128;
                self.v4
                    .iter()
                    .filter(|(net, len, _)| mask(a, *len, 32) == u32::from(*net) as u128)
                    .max_by_key(|(_, len, _)| *len)
                    .map(|(_, _, v)| v)
            }
            IpAddr::V6(ip) => {
                let a = u128::from(ip);
                self.v6
                    .iter()
                    .filter(|(net, len, _)| mask(a, *len, 128) == u128::from(*net))
                    .max_by_key(|(_, len, _)| *len)
                    .map(|(_, _, v)| v)
            }
        }
    }
}

/// What the packet tells about its destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortInfo {
    /// TCP or UDP, first fragment or unfragmented.
    Port(u16),
    /// ICMP: no ports.
    None,
    /// A non-first fragment: the ports are in another packet.
    NonFirstFragment,
}

/// One trie entry's verdict — the same decision the eBPF program makes.
/// A port deny beats a live learned allow, which beats the static verdict.
pub fn entry_verdict(value: &PolicyValue, port: PortInfo, now_ns: u64) -> Verdict {
    let ports = &value.ports[..(value.port_count as usize).min(MAX_PORT_VERDICTS)];
    let port_verdict = match port {
        PortInfo::Port(p) => ports.iter().find(|pv| pv.port == p).map(|pv| Verdict::new(pv.action, pv.rule_id)),
        _ => None,
    };
    if let Some(v) = port_verdict.filter(|v| v.action == action::DENY) {
        return v;
    }
    if value.learned_until_ns != 0 {
        let port_ok = match port {
            PortInfo::Port(p) => value.learned_port == 0 || value.learned_port == p,
            _ => value.learned_port == 0,
        };
        if port_ok && now_ns < value.learned_until_ns {
            return Verdict::new(action::ALLOW, value.learned_rule_id);
        }
    }
    if let Some(v) = port_verdict {
        return v;
    }
    if port == PortInfo::NonFirstFragment && value.any_port.action != action::ALLOW {
        if let Some(pv) = ports.iter().find(|pv| pv.action == action::ALLOW) {
            return Verdict::new(pv.action, pv.rule_id);
        }
    }
    value.any_port
}

/// Compiles `policy` for a sandbox whose host-side addresses are
/// `host_addresses` (denied like the built-in list).
pub fn compile(policy: &Policy, host_addresses: &[IpAddr]) -> Result<CompiledPolicy, CompileError> {
    let host: Vec<(IpNetwork, &str)> = host_addresses.iter().map(|a| (IpNetwork::from(*a), "host address")).collect();
    compile_with_denies(policy, &host)
}

/// [`compile`] with any extra built-in denies (network, purpose): the
/// host's addresses, the sandbox pools.
pub fn compile_with_denies(policy: &Policy, extra: &[(IpNetwork, &str)]) -> Result<CompiledPolicy, CompileError> {
    let mut rules = policy.rules.clone();
    rules.extend(builtin_deny_rules());
    for (network, purpose) in extra {
        rules.push(Rule::builtin_deny(*network, purpose));
    }
    let mut compiled = compile_rules(&policy.name, policy.default, rules)?;
    compiled.filesystem = policy.filesystem.clone();
    compiled.mode = policy.mode;
    compiled.http = policy.http.clone();
    compiled.mcp = policy.mcp.clone();
    Ok(compiled)
}

/// Compiles an explicit rule list (domain rules are carried in the table but
/// produce no entries).
pub fn compile_rules(policy_name: &str, default: Action, rules: Vec<Rule>) -> Result<CompiledPolicy, CompileError> {
    let default_verdict = Verdict::new(action_code(default), rule_id::DEFAULT);
    let mut v4_rules = Vec::new();
    let mut v6_rules = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let id = index as u32 + 1;
        match rule.target {
            Target::Cidr(IpNetwork::V4(net)) => v4_rules.push(CidrRule {
                addr: u32::from(net.network()) as u128,
                len: net.prefix(),
                id,
                rule,
            }),
            Target::Cidr(IpNetwork::V6(net)) => v6_rules.push(CidrRule {
                addr: u128::from(net.network()),
                len: net.prefix(),
                id,
                rule,
            }),
            Target::Domain(_) => {}
        }
    }
    let v4 = compile_family(policy_name, 32, &v4_rules, default_verdict)?
        .into_iter()
        .map(|(a, len, v)| (Ipv4Addr::from(a as u32), len, v))
        .collect();
    let v6 = compile_family(policy_name, 128, &v6_rules, default_verdict)?
        .into_iter()
        .map(|(a, len, v)| (Ipv6Addr::from(a), len, v))
        .collect();
    Ok(CompiledPolicy {
        policy_name: policy_name.to_string(),
        default_action: default,
        default_verdict,
        v4,
        v6,
        rules,
        filesystem: Vec::new(),
        mode: crate::policy::Mode::Enforce,
        http: Vec::new(),
        mcp: Vec::new(),
    })
}

fn action_code(a: Action) -> u8 {
    match a {
        Action::Allow => action::ALLOW,
        Action::Deny => action::DENY,
    }
}

struct CidrRule<'a> {
    addr: u128,
    len: u8,
    id: u32,
    rule: &'a Rule,
}

/// `addr` (of `width` bits, right-aligned) with all but the top `len` bits cleared.
fn mask(addr: u128, len: u8, width: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let shift = width - len;
    (addr >> shift) << shift
}

fn compile_family(
    policy_name: &str,
    width: u8,
    rules: &[CidrRule<'_>],
    default: Verdict,
) -> Result<Vec<(u128, u8, PolicyValue)>, CompileError> {
    let mut by_prefix: HashMap<(u128, u8), Vec<usize>> = HashMap::with_capacity(rules.len());
    let mut lengths = BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        by_prefix.entry((r.addr, r.len)).or_default().push(i);
        lengths.insert(r.len);
    }
    // A /0 entry always exists, so the trie never misses: the default then
    // belongs to the policy generation like every other entry.
    by_prefix.entry((0, 0)).or_default();
    lengths.insert(0);
    let lengths: Vec<u8> = lengths.into_iter().collect();
    let mut out = Vec::with_capacity(by_prefix.len());
    let mut covering: Vec<&CidrRule<'_>> = Vec::new();
    let mut prefixes: Vec<(u128, u8)> = by_prefix.keys().copied().collect();
    prefixes.sort_unstable();
    for (addr, len) in prefixes {
        covering.clear();
        for &l in lengths.iter().take_while(|&&l| l <= len) {
            if let Some(ids) = by_prefix.get(&(mask(addr, l, width), l)) {
                covering.extend(ids.iter().map(|&i| &rules[i]));
            }
        }
        let any_port = resolve(&covering, None, default);
        let mut ports: Vec<u16> = covering.iter().filter_map(|r| r.rule.port).collect();
        ports.sort_unstable();
        ports.dedup();
        let mut port_verdicts = Vec::new();
        for port in ports {
            let v = resolve(&covering, Some(port), default);
            if v != any_port {
                port_verdicts.push(PortVerdict { rule_id: v.rule_id, port, action: v.action, _pad: 0 });
            }
        }
        if port_verdicts.len() > MAX_PORT_VERDICTS {
            let prefix = if width == 32 {
                format!("{}/{len}", Ipv4Addr::from(addr as u32))
            } else {
                format!("{}/{len}", Ipv6Addr::from(addr))
            };
            return Err(CompileError::TooManyPorts {
                policy: policy_name.to_string(),
                prefix,
                count: port_verdicts.len(),
            });
        }
        let mut value = PolicyValue { any_port, port_count: port_verdicts.len() as u8, ..Default::default() };
        value.ports[..port_verdicts.len()].copy_from_slice(&port_verdicts);
        out.push((addr, len, value));
    }
    Ok(out)
}

/// The verdict for addresses covered by exactly `covering`, for `port`
/// (`None`: a verdict that must hold for any port, so port rules don't apply).
fn resolve(covering: &[&CidrRule<'_>], port: Option<u16>, default: Verdict) -> Verdict {
    let applies = |r: &&&CidrRule<'_>| r.rule.port.is_none() || (port.is_some() && r.rule.port == port);
    // Most specific first; on a tie the earlier rule.
    let best = |action: Action, origin: Origin| {
        covering
            .iter()
            .filter(applies)
            .filter(|r| r.rule.action == action && r.rule.origin == origin)
            .min_by_key(|r| (std::cmp::Reverse(r.len), r.id))
    };
    if let Some(deny) = best(Action::Deny, Origin::Policy) {
        return Verdict::new(action::DENY, deny.id);
    }
    let allow = best(Action::Allow, Origin::Policy);
    let builtin = best(Action::Deny, Origin::Builtin);
    match (allow, builtin) {
        (Some(a), Some(b)) if a.len >= b.len => Verdict::new(action::ALLOW, a.id),
        (_, Some(b)) => Verdict::new(action::DENY, b.id),
        (Some(a), None) => Verdict::new(action::ALLOW, a.id),
        (None, None) => default,
    }
}

/// The reference reading of a rule list: the semantics in plain words, rule
/// by rule, with no trie and no precomputation. The compiled trie must agree
/// with it for every address and port (unit tests, and the `policy` fuzz
/// target in [`crate::fuzzing`]). `rules` is the full list the ids index
/// (id `i + 1` is `rules[i]`), built-ins included, as [`compile`] makes it.
///
/// A rule applies to `ip` when its prefix contains `ip` and it has no port or
/// the packet's port. Then: any applicable policy deny denies (the most
/// specific one, then the earliest, is named); else the most specific
/// applicable policy allow wins over built-in denies no more specific than
/// it; else the most specific built-in deny; else the default. A later
/// fragment (its ports are in another packet) denied for any port passes
/// when some port on this address is allowed: its first fragment was judged
/// with ports (the lowest such port names the rule).
pub fn brute_force_verdict(rules: &[Rule], default: Action, ip: IpAddr, port: PortInfo) -> Verdict {
    let judge = |packet_port: Option<u16>| -> Verdict {
        let applicable: Vec<(u32, u8, &Rule)> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r.target {
                Target::Cidr(net) if net.contains(ip) && (r.port.is_none() || (packet_port.is_some() && r.port == packet_port)) => {
                    Some((i as u32 + 1, net.prefix(), r))
                }
                _ => None,
            })
            .collect();
        let most_specific = |action: Action, origin: Origin| {
            applicable
                .iter()
                .filter(|(_, _, r)| r.action == action && r.origin == origin)
                .min_by_key(|(id, len, _)| (std::cmp::Reverse(*len), *id))
                .map(|(id, len, _)| (*id, *len))
        };
        if let Some((id, _)) = most_specific(Action::Deny, Origin::Policy) {
            return Verdict::new(action::DENY, id);
        }
        match (most_specific(Action::Allow, Origin::Policy), most_specific(Action::Deny, Origin::Builtin)) {
            (Some((allow, allow_len)), Some((_, builtin_len))) if allow_len >= builtin_len => Verdict::new(action::ALLOW, allow),
            (_, Some((builtin, _))) => Verdict::new(action::DENY, builtin),
            (Some((allow, _)), None) => Verdict::new(action::ALLOW, allow),
            (None, None) => Verdict::new(action_code(default), rule_id::DEFAULT),
        }
    };
    match port {
        PortInfo::Port(p) => judge(Some(p)),
        PortInfo::None => judge(None),
        PortInfo::NonFirstFragment => {
            let any = judge(None);
            if any.action == action::ALLOW {
                return any;
            }
            let mut ports: Vec<u16> = rules
                .iter()
                .filter(|r| matches!(r.target, Target::Cidr(net) if net.contains(ip)))
                .filter_map(|r| r.port)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            ports.into_iter().map(|p| judge(Some(p))).find(|v| v.action == action::ALLOW).unwrap_or(any)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn policy(allow: &[&str], deny: &[&str], default: &str) -> Policy {
        let list = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let text = format!(
            "name = \"t\"\n[network]\ndefault = \"{default}\"\nallow = [{}]\ndeny = [{}]\n",
            list(allow),
            list(deny)
        );
        Policy::parse("t.toml", &text).unwrap()
    }

    fn verdict(c: &CompiledPolicy, dst: &str, port: PortInfo) -> (u8, String) {
        let v = c.lookup(dst.parse().unwrap(), port);
        (v.action, c.describe_rule(v.rule_id))
    }

    const A: u8 = action::ALLOW;
    const D: u8 = action::DENY;

    #[test]
    fn deny_nested_in_allow_and_allow_nested_in_deny() {
        let p = policy(
            &["198.51.100.0/24", "203.0.113.8/29"],
            &["198.51.100.16/28", "203.0.113.0/24"],
            "deny",
        );
        let c = compile(&p, &[]).unwrap();
        let tcp = PortInfo::Port(80);
        assert_eq!(verdict(&c, "198.51.100.5", tcp), (A, "allow 198.51.100.0/24".into()));
        assert_eq!(verdict(&c, "198.51.100.20", tcp), (D, "deny 198.51.100.16/28".into()));
        // The allow inside a deny is stored as the deny.
        assert_eq!(verdict(&c, "203.0.113.9", tcp), (D, "deny 203.0.113.0/24".into()));
        assert_eq!(verdict(&c, "192.0.2.1", tcp), (D, "default deny".into()));
    }

    #[test]
    fn builtin_list_yields_only_to_an_explicit_allow() {
        let p = policy(&["0.0.0.0/0", "10.1.0.0/16", "::/0"], &[], "deny");
        let c = compile(&p, &["10.200.0.1".parse().unwrap()]).unwrap();
        let icmp = PortInfo::None;
        assert_eq!(verdict(&c, "8.8.8.8", icmp), (A, "allow 0.0.0.0/0".into()));
        assert_eq!(verdict(&c, "10.1.2.3", icmp), (A, "allow 10.1.0.0/16".into()));
        assert_eq!(verdict(&c, "10.2.0.1", icmp), (D, "builtin deny 10.0.0.0/8 (private)".into()));
        assert_eq!(
            verdict(&c, "169.254.169.254", icmp),
            (D, "builtin deny 169.254.0.0/16 (link-local, cloud metadata)".into())
        );
        assert_eq!(verdict(&c, "10.200.0.1", icmp), (D, "builtin deny 10.200.0.1/32 (host address)".into()));
        assert_eq!(verdict(&c, "::1", icmp).0, D);
        assert_eq!(verdict(&c, "::ffff:127.0.0.1", icmp).0, D);
        assert_eq!(verdict(&c, "2001:db8::1", icmp), (A, "allow ::/0".into()));
    }

    #[test]
    fn default_allow_still_denies_builtins_and_denies() {
        let p = policy(&[], &["198.51.100.0/24"], "allow");
        let c = compile(&p, &[]).unwrap();
        assert_eq!(verdict(&c, "8.8.8.8", PortInfo::None), (A, "default allow".into()));
        assert_eq!(verdict(&c, "198.51.100.1", PortInfo::None).0, D);
        assert_eq!(verdict(&c, "127.0.0.1", PortInfo::None).0, D);
    }

    #[test]
    fn port_rules() {
        let p = policy(
            &["198.51.100.0/24", "203.0.113.7:443", "[2001:db8::/32]:22"],
            &["198.51.100.9:25"],
            "deny",
        );
        let c = compile(&p, &[]).unwrap();
        assert_eq!(verdict(&c, "198.51.100.9", PortInfo::Port(80)).0, A);
        assert_eq!(verdict(&c, "198.51.100.9", PortInfo::Port(25)), (D, "deny 198.51.100.9:25".into()));
        assert_eq!(verdict(&c, "198.51.100.9", PortInfo::None).0, A);
        assert_eq!(verdict(&c, "203.0.113.7", PortInfo::Port(443)), (A, "allow 203.0.113.7:443".into()));
        assert_eq!(verdict(&c, "203.0.113.7", PortInfo::Port(80)), (D, "default deny".into()));
        assert_eq!(verdict(&c, "203.0.113.7", PortInfo::None), (D, "default deny".into()));
        // A later fragment of an allowed port's datagram passes.
        assert_eq!(verdict(&c, "203.0.113.7", PortInfo::NonFirstFragment).0, A);
        assert_eq!(verdict(&c, "2001:db8::5", PortInfo::Port(22)).0, A);
        assert_eq!(verdict(&c, "2001:db8::5", PortInfo::Port(23)).0, D);
    }

    #[test]
    fn too_many_ports_is_a_clear_error() {
        let allows: Vec<String> = (1..=9).map(|p| format!("203.0.113.7:{p}")).collect();
        let allows: Vec<&str> = allows.iter().map(String::as_str).collect();
        let p = policy(&allows, &[], "deny");
        let e = compile(&p, &[]).unwrap_err();
        assert!(e.to_string().contains("203.0.113.7/32 needs 9 port-specific verdicts"), "{e}");
    }

    #[test]
    fn domain_rules_allow_nothing_by_themselves() {
        let p = policy(&["example.com", "**.example.org"], &[], "deny");
        let c = compile(&p, &[]).unwrap();
        assert!(c.v4.iter().all(|(_, _, v)| v.any_port.action == D && v.port_count == 0));
        assert!(c.v6.iter().all(|(_, _, v)| v.any_port.action == D && v.port_count == 0));
    }

    #[test]
    fn learned_overlay_respects_port_denies_and_expiry() {
        let mut v = PolicyValue { any_port: Verdict::new(D, 0), ..Default::default() };
        v.ports[0] = PortVerdict { rule_id: 7, port: 25, action: D, _pad: 0 };
        v.port_count = 1;
        v.learned_until_ns = 1000;
        v.learned_rule_id = 9;
        assert_eq!(entry_verdict(&v, PortInfo::Port(443), 999), Verdict::new(A, 9));
        assert_eq!(entry_verdict(&v, PortInfo::Port(25), 999), Verdict::new(D, 7));
        assert_eq!(entry_verdict(&v, PortInfo::Port(443), 1000), Verdict::new(D, 0));
        v.learned_port = 443;
        assert_eq!(entry_verdict(&v, PortInfo::Port(80), 1), Verdict::new(D, 0));
        assert_eq!(entry_verdict(&v, PortInfo::None, 1), Verdict::new(D, 0));
    }

    /// The resolved trie agrees with a brute-force reading of the rules on
    /// random policies and random addresses.
    #[test]
    fn compiled_trie_matches_brute_force_semantics() {
        let mut seed = 0x5eed_1234_u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..200 {
            let mut rules = Vec::new();
            for _ in 0..(rand() % 12 + 1) {
                // Addresses in 198.51.0.0/16 so prefixes nest often.
                let len = 16 + (rand() % 17) as u8;
                let addr = 0xc633_0000u32 | (rand() as u32 & 0xffff);
                let net = ipnetwork::Ipv4Network::new(Ipv4Addr::from(addr), len).unwrap();
                let net = ipnetwork::Ipv4Network::new(net.network(), len).unwrap();
                let port = if rand() % 3 == 0 { Some((rand() % 3) as u16 + 22) } else { None };
                let origin = if rand() % 5 == 0 { Origin::Builtin } else { Origin::Policy };
                let action = if origin == Origin::Builtin || rand() % 2 == 0 { Action::Deny } else { Action::Allow };
                rules.push(Rule {
                    action,
                    target: Target::Cidr(IpNetwork::V4(net)),
                    port: if origin == Origin::Builtin { None } else { port },
                    origin,
                    text: net.to_string(),
                    line: 0,
                    except: Vec::new(),
                    mode: crate::policy::Mode::Enforce,
                });
            }
            let default = if rand() % 2 == 0 { Action::Deny } else { Action::Allow };
            let c = compile_rules("r", default, rules.clone()).unwrap();
            for _ in 0..200 {
                let ip = Ipv4Addr::from(0xc633_0000u32 | (rand() as u32 & 0xffff));
                for port in [PortInfo::Port(22), PortInfo::Port(23), PortInfo::Port(80), PortInfo::None, PortInfo::NonFirstFragment] {
                    let got = c.lookup(IpAddr::V4(ip), port);
                    let want = brute_force_verdict(&rules, default, IpAddr::V4(ip), port);
                    assert_eq!(got, want, "{ip} {port:?} rules={rules:#?}");
                }
            }
        }
    }
}
