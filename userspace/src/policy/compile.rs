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
//!
//! Exceptions (`{ pattern = "10.0.0.0/8", except = ["10.1.0.0/16"] }`) add
//! entries at their own prefixes, where their deny does not apply; an
//! allow (or the default) that decides there because of one is credited to
//! a derived rule-table entry naming both (`allow … (deny … except …)`).
//! Audit mode: a policy deny in audit mode (its own or its policy's) steps
//! aside like an exception, and when what then decides would let the
//! packet through, the entry says [`action::AUDIT`] with the deny's id: the
//! datapath passes it and reports it as that deny. Built-in denies are
//! always enforced.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use sbx_net_common::{action, rule_id, PolicyValue, PortVerdict, Verdict, MAX_PORT_VERDICTS};

use crate::policy::{builtin_deny_rules, Action, DomainPattern, Exception, Mode, Mount, Origin, Policy, Rule, Target};

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
    /// Written compact (see [`crate::policy::wire`]).
    #[serde(with = "crate::policy::wire::trie_entries")]
    pub v4: Vec<(Ipv4Addr, u8, PolicyValue)>,
    #[serde(with = "crate::policy::wire::trie_entries")]
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
    /// `rules`' descriptions, made once on first use.
    #[serde(skip)]
    pub rule_texts: RuleTexts,
}

/// The rules' descriptions ([`Rule::describe`]), made on first use and
/// kept: the rule that decided is recorded for every DNS answer and every
/// proxied request, and formatting it each time was a measurable part of
/// both. Made from `rules` (never changed after compiling), so it takes no
/// part in equality or in the serialized form.
#[derive(Clone, Default)]
pub struct RuleTexts(std::sync::OnceLock<Box<[String]>>);

impl PartialEq for RuleTexts {
    fn eq(&self, _: &RuleTexts) -> bool {
        true
    }
}

impl std::fmt::Debug for RuleTexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuleTexts")
    }
}

impl CompiledPolicy {
    /// The rule as written, for attribution (`deny 10.0.0.0/8`, `default deny`).
    pub fn describe_rule(&self, id: u32) -> String {
        if id == rule_id::DEFAULT {
            return format!("default {}", self.default_action.as_str());
        }
        let texts = self.rule_texts.0.get_or_init(|| self.rules.iter().map(Rule::describe).collect());
        match texts.get(id as usize - 1) {
            Some(text) => text.clone(),
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

    /// The id of the derived entry `text` ([`exception_text`]), if the
    /// compiler made one.
    pub fn exception_rule_id(&self, text: &str) -> Option<u32> {
        self.rules.iter().position(|r| r.origin == Origin::Exception && r.text == text).map(|i| i as u32 + 1)
    }

    /// The verdict for traffic an exception of `deny` let through to the
    /// allow `allow` (`None`: the default, an allow): its derived entry's id,
    /// or `allow`'s own when there is none (a policy compiled before
    /// exceptions were attributed).
    pub fn excepted_rule_id(&self, allow: Option<u32>, deny: u32, exception: &Exception) -> u32 {
        let allow_rule = allow.and_then(|id| self.rules.get((id as usize).wrapping_sub(1)));
        let Some(deny_rule) = self.rules.get((deny as usize).wrapping_sub(1)) else { return allow.unwrap_or(rule_id::DEFAULT) };
        self.exception_rule_id(&exception_text(allow_rule, deny_rule, exception)).unwrap_or(allow.unwrap_or(rule_id::DEFAULT))
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
/// A port deny (or audit) beats a live learned allow, which beats the
/// static verdict.
pub fn entry_verdict(value: &PolicyValue, port: PortInfo, now_ns: u64) -> Verdict {
    let ports = &value.ports[..(value.port_count as usize).min(MAX_PORT_VERDICTS)];
    let port_verdict = match port {
        PortInfo::Port(p) => ports.iter().find(|pv| pv.port == p).map(|pv| Verdict::new(pv.action, pv.rule_id)),
        _ => None,
    };
    if let Some(v) = port_verdict.filter(|v| v.action != action::ALLOW) {
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
    let mut compiled = compile_rules_in_mode(&policy.name, policy.default, policy.mode, rules)?;
    compiled.filesystem = policy.filesystem.clone();
    compiled.http = policy.http.clone();
    compiled.mcp = policy.mcp.clone();
    Ok(compiled)
}

/// Compiles an explicit rule list (domain rules are carried in the table but
/// produce no entries).
pub fn compile_rules(policy_name: &str, default: Action, rules: Vec<Rule>) -> Result<CompiledPolicy, CompileError> {
    compile_rules_in_mode(policy_name, default, Mode::Enforce, rules)
}

/// [`compile_rules`] for a policy in `mode` (`audit`: its denies and its
/// default deny are only recorded).
pub fn compile_rules_in_mode(policy_name: &str, default: Action, mode: Mode, rules: Vec<Rule>) -> Result<CompiledPolicy, CompileError> {
    let default_verdict = default_verdict(default, mode);
    let mut derived = Derived { base: rules.len(), rules: Vec::new() };
    let (v4, v6) = {
        let mut v4_rules = Vec::new();
        let mut v6_rules = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            if rule.origin == Origin::Exception {
                continue;
            }
            let id = index as u32 + 1;
            let audit = rule_is_audit(mode, rule);
            // Only the exceptions of the rule's own family (the parser
            // allows no other).
            let except = |rule: &Rule| -> Vec<(u128, u8, usize)> {
                rule.except
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| match (e.target.clone(), &rule.target) {
                        (Target::Cidr(IpNetwork::V4(n)), Target::Cidr(IpNetwork::V4(_))) => Some((u32::from(n.network()) as u128, n.prefix(), i)),
                        (Target::Cidr(IpNetwork::V6(n)), Target::Cidr(IpNetwork::V6(_))) => Some((u128::from(n.network()), n.prefix(), i)),
                        _ => None,
                    })
                    .collect()
            };
            match rule.target {
                Target::Cidr(IpNetwork::V4(net)) => v4_rules.push(CidrRule {
                    addr: u32::from(net.network()) as u128,
                    len: net.prefix(),
                    id,
                    rule,
                    audit,
                    except: except(rule),
                }),
                Target::Cidr(IpNetwork::V6(net)) => v6_rules.push(CidrRule {
                    addr: u128::from(net.network()),
                    len: net.prefix(),
                    id,
                    rule,
                    audit,
                    except: except(rule),
                }),
                Target::Domain(_) => {}
            }
        }
        let v4 = compile_family(policy_name, 32, &v4_rules, default_verdict, &mut derived)?
            .into_iter()
            .map(|(a, len, v)| (Ipv4Addr::from(a as u32), len, v))
            .collect::<Vec<_>>();
        let v6 = compile_family(policy_name, 128, &v6_rules, default_verdict, &mut derived)?
            .into_iter()
            .map(|(a, len, v)| (Ipv6Addr::from(a), len, v))
            .collect::<Vec<_>>();
        derive_name_exceptions(&rules, default, &mut derived);
        (v4, v6)
    };
    let mut rules = rules;
    rules.extend(derived.rules);
    Ok(CompiledPolicy {
        policy_name: policy_name.to_string(),
        default_action: default,
        default_verdict,
        v4,
        v6,
        rules,
        filesystem: Vec::new(),
        mode,
        http: Vec::new(),
        mcp: Vec::new(),
        rule_texts: RuleTexts::default(),
    })
}

/// What a trie miss (and the /0 entries' rule-less addresses) mean.
fn default_verdict(default: Action, mode: Mode) -> Verdict {
    match default {
        Action::Deny if mode.is_audit() => Verdict::new(action::AUDIT, rule_id::DEFAULT),
        other => Verdict::new(action_code(other), rule_id::DEFAULT),
    }
}

/// Whether a deny by `rule` is only audited (see
/// [`CompiledPolicy::is_audit`]): a rule carries its own mode, its
/// policy's when it names none (resolved when the policy is parsed), so an
/// explicit `mode = "enforce"` stays enforced in an audit policy. `_mode`,
/// the policy's, decides only the default.
fn rule_is_audit(_mode: Mode, rule: &Rule) -> bool {
    rule.origin == Origin::Policy && rule.mode.is_audit()
}

/// How a verdict an exception let through is attributed: the allow that
/// decided (`None`: the default allow), then the deny and its exception,
/// e.g. `allow **.corp.test (deny **.corp.test except jira.corp.test)`.
pub fn exception_text(allow: Option<&Rule>, deny: &Rule, exception: &Exception) -> String {
    let allow = allow.map_or_else(|| "default allow".to_string(), Rule::describe);
    format!("{allow} ({})", exception.describe(deny))
}

/// Derived rule-table entries made while compiling (ids after the rules').
struct Derived {
    base: usize,
    rules: Vec<Rule>,
}

impl Derived {
    /// The id of the entry for an exception of `deny` that let traffic
    /// through to `allow` (`None`: the default allow), made on first use.
    fn id(&mut self, allow: Option<&Rule>, deny: &Rule, exception: &Exception) -> u32 {
        let text = exception_text(allow, deny, exception);
        let index = match self.rules.iter().position(|r| r.text == text) {
            Some(i) => i,
            None => {
                self.rules.push(Rule {
                    action: Action::Allow,
                    target: exception.target.clone(),
                    port: allow.and_then(|a| a.port),
                    origin: Origin::Exception,
                    text,
                    line: deny.line,
                    except: Vec::new(),
                    mode: Mode::Enforce,
                });
                self.rules.len() - 1
            }
        };
        (self.base + index) as u32 + 1
    }
}

/// Whether some name matches both patterns.
pub fn patterns_overlap(a: &DomainPattern, b: &DomainPattern) -> bool {
    use DomainPattern::*;
    // `x` is `y` or lies below it.
    let at_or_under = |x: &str, y: &str| x == y || x.strip_suffix(y).is_some_and(|head| head.ends_with('.'));
    match (a, b) {
        (Exact(n), p) | (p, Exact(n)) => p.matches(n),
        (OneLabel(x), OneLabel(y)) => x == y,
        (OneLabel(one), AnyDepth(any)) | (AnyDepth(any), OneLabel(one)) => at_or_under(one, any),
        (AnyDepth(x), AnyDepth(y)) => at_or_under(x, y) || at_or_under(y, x),
    }
}

/// The derived entries names need (they are decided per query, so every
/// pair that can meet is made here): each domain deny's exception with
/// each domain allow some name of the exception can match, and with the
/// default when it allows.
fn derive_name_exceptions(rules: &[Rule], default: Action, derived: &mut Derived) {
    let policy_domain = |r: &&Rule, action: Action| r.origin == Origin::Policy && r.action == action && matches!(r.target, Target::Domain(_));
    for deny in rules.iter().filter(|r| policy_domain(r, Action::Deny)) {
        for exception in &deny.except {
            let Target::Domain(inner) = &exception.target else { continue };
            for allow in rules.iter().filter(|r| policy_domain(r, Action::Allow)) {
                if matches!(&allow.target, Target::Domain(p) if patterns_overlap(p, inner)) {
                    derived.id(Some(allow), deny, exception);
                }
            }
            if default == Action::Allow {
                derived.id(None, deny, exception);
            }
        }
    }
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
    /// A deny only audited.
    audit: bool,
    /// A deny's exceptions (address, prefix length, index in the rule's
    /// list), in its list's order.
    except: Vec<(u128, u8, usize)>,
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
    derived: &mut Derived,
) -> Result<Vec<(u128, u8, PolicyValue)>, CompileError> {
    let mut by_prefix: HashMap<(u128, u8), Vec<usize>> = HashMap::with_capacity(rules.len());
    let mut lengths = BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        by_prefix.entry((r.addr, r.len)).or_default().push(i);
        lengths.insert(r.len);
        // An exception's addresses are decided without its deny: they
        // need an entry of their own.
        for &(addr, len, _) in &r.except {
            by_prefix.entry((addr, len)).or_default();
            lengths.insert(len);
        }
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
        let at = Entry { addr, len, width, default };
        let any_port = resolve(&covering, None, &at, derived);
        let mut ports: Vec<u16> = covering.iter().filter_map(|r| r.rule.port).collect();
        ports.sort_unstable();
        ports.dedup();
        let mut port_verdicts = Vec::new();
        for port in ports {
            let v = resolve(&covering, Some(port), &at, derived);
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

/// The entry being resolved, and what the policy's default says.
struct Entry {
    addr: u128,
    len: u8,
    width: u8,
    default: Verdict,
}

/// The verdict for addresses covered by exactly `covering` (all within the
/// entry `at`), for `port` (`None`: a verdict that must hold for any port,
/// so port rules don't apply).
fn resolve(covering: &[&CidrRule<'_>], port: Option<u16>, at: &Entry, derived: &mut Derived) -> Verdict {
    let applies = |r: &&&CidrRule<'_>| r.rule.port.is_none() || (port.is_some() && r.rule.port == port);
    // The first of a deny's exceptions that holds the whole entry: there,
    // the deny does not apply.
    let exception = |r: &CidrRule<'_>| r.except.iter().find(|&&(addr, len, _)| len <= at.len && mask(at.addr, len, at.width) == addr).map(|e| e.2);
    // Most specific first; on a tie the earlier rule.
    let best = |keep: &dyn Fn(&CidrRule<'_>) -> bool| {
        covering.iter().filter(applies).filter(|r| keep(r)).min_by_key(|r| (std::cmp::Reverse(r.len), r.id)).copied()
    };
    let policy_deny = |r: &CidrRule<'_>| r.rule.action == Action::Deny && r.rule.origin == Origin::Policy;
    if let Some(deny) = best(&|r| policy_deny(r) && !r.audit && exception(r).is_none()) {
        return Verdict::new(action::DENY, deny.id);
    }
    let audited = best(&|r| policy_deny(r) && r.audit && exception(r).is_none());
    let excepted = best(&|r| policy_deny(r) && exception(r).is_some());
    let allow = best(&|r| r.rule.action == Action::Allow && r.rule.origin == Origin::Policy);
    let builtin = best(&|r| r.rule.action == Action::Deny && r.rule.origin == Origin::Builtin);
    let decided = match (allow, builtin) {
        (Some(a), Some(b)) if a.len >= b.len => Some(a),
        (_, Some(b)) => return Verdict::new(action::DENY, b.id),
        (Some(a), None) => Some(a),
        (None, None) => None,
    };
    let base = decided.map_or(at.default, |a| Verdict::new(action::ALLOW, a.id));
    if base.action == action::DENY {
        return base;
    }
    if let Some(deny) = audited {
        // Without the audit-mode denies this would pass: it passes, as the
        // deny that would have decided.
        return Verdict::new(action::AUDIT, deny.id);
    }
    match excepted {
        Some(deny) if base.action == action::ALLOW => {
            let e = &deny.rule.except[exception(deny).expect("an excepted deny has its exception")];
            Verdict::new(action::ALLOW, derived.id(decided.map(|a| a.rule), deny.rule, e))
        }
        _ => base,
    }
}

// ---- Names: how the domain rules decide a name (the DNS proxy, the
// HTTP(S) proxy's SNI/Host check and `policy test` all ask here).

/// What the policy says about resolving a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Resolve; learned addresses open for `port` only when set.
    Allowed { rule_id: u32, port: Option<u16> },
    /// NXDOMAIN (or REFUSED): a deny rule, or the default.
    Denied { rule_id: u32 },
    /// Denied only by audit-mode rules (or the audit-mode default deny):
    /// resolved and recorded as audit with `rule_id`, the rule that would
    /// have denied it. `learn`: the rule (and port) that allows the name
    /// once the audit-mode rules are set aside — its addresses are learned
    /// as usual; `None`: it falls to the default, nothing is learned (an
    /// audit-mode default passes its packets, audited, anyway).
    Audit { rule_id: u32, learn: Option<(u32, Option<u16>)> },
}

impl NameVerdict {
    /// The rule a record names: the one that allows, denies, or would have
    /// denied.
    pub fn rule_id(&self) -> u32 {
        match self {
            NameVerdict::Allowed { rule_id, .. } | NameVerdict::Denied { rule_id } | NameVerdict::Audit { rule_id, .. } => *rule_id,
        }
    }

    /// Whether the name resolves (allowed, or only audited).
    pub fn resolves(&self) -> bool {
        !matches!(self, NameVerdict::Denied { .. })
    }

    /// The rule and port its addresses are learned under, if any.
    pub fn learn(&self) -> Option<(u32, Option<u16>)> {
        match self {
            NameVerdict::Allowed { rule_id, port } => Some((*rule_id, *port)),
            NameVerdict::Audit { learn, .. } => *learn,
            NameVerdict::Denied { .. } => None,
        }
    }
}

/// The longest name in text form (255 octets on the wire).
pub(crate) const MAX_NAME_TEXT: usize = 253;

/// A byte rules can compare: letters, digits, '-' and '_' (SRV-style
/// labels). A '.' inside a label (`x\.allowed.test`) is not one: joined
/// with dots, that label would read as two and match `*.allowed.test`,
/// while upstream it is another name altogether; NUL, spaces and raw
/// non-ASCII (UTF-8 instead of an A-label) likewise have no rule form.
pub(crate) fn plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

pub(crate) fn plain_label(label: &[u8]) -> bool {
    !label.is_empty() && label.len() <= 63 && label.iter().all(|b| plain_byte(*b))
}

/// Whether `name` (text, dotted) is made of plain labels only: the only
/// names a rule may match.
pub fn is_plain_name(name: &str) -> bool {
    name.is_empty() || (name.len() <= MAX_NAME_TEXT && name.split('.').all(|l| plain_label(l.as_bytes())))
}

/// Deny wins (a `name:port` deny denies the name: fail closed); then an
/// any-port allow; then a port allow (addresses open for that port only);
/// then the default — which never opens a name by itself, even when it is
/// `allow`: addresses are then reachable by the default anyway. A name that
/// is not plain (see [`is_plain_name`]) matches no rule: only the default
/// speaks for it.
///
/// A deny does not apply to a name one of its exceptions matches
/// ([`Rule::exception_for_name`]): the allows and the default
/// decide, and an allow an exception let through is credited to the
/// compiled entry naming both (`allow … (deny … except …)`). An audit-mode
/// deny steps aside the same way, but when what then decides would let the
/// name resolve, the verdict is [`NameVerdict::Audit`] with that deny; an
/// enforced deny (or an enforced default deny) still denies.
pub fn name_verdict(policy: &CompiledPolicy, name: &str) -> NameVerdict {
    let plain = is_plain_name(name);
    let matching = |wanted: Action| {
        policy.rules.iter().enumerate().filter(move |(_, r)| {
            plain && r.origin != Origin::Exception && r.action == wanted && matches!(&r.target, Target::Domain(p) if p.matches(name))
        })
    };
    let id = |i: usize| i as u32 + 1;
    let mut audited = None;
    let mut excepted = None;
    for (i, rule) in matching(Action::Deny) {
        match rule.exception_for_name(name) {
            Some(exception) => {
                excepted.get_or_insert((id(i), exception));
            }
            None if policy.is_audit(id(i)) => {
                audited.get_or_insert(id(i));
            }
            None => return NameVerdict::Denied { rule_id: id(i) },
        }
    }
    let credit = |allow: Option<u32>| match excepted {
        Some((deny, exception)) => policy.excepted_rule_id(allow, deny, exception),
        None => allow.unwrap_or(rule_id::DEFAULT),
    };
    let allows: Vec<(usize, Option<u16>)> = matching(Action::Allow).map(|(i, r)| (i, r.port)).collect();
    let base = if let Some(&(i, _)) = allows.iter().find(|(_, port)| port.is_none()) {
        NameVerdict::Allowed { rule_id: credit(Some(id(i))), port: None }
    } else if let Some(&(i, port)) = allows.first() {
        NameVerdict::Allowed { rule_id: credit(Some(id(i))), port }
    } else if policy.default_verdict.action == action::ALLOW {
        NameVerdict::Allowed { rule_id: credit(None), port: None }
    } else if policy.default_verdict.action == action::AUDIT {
        NameVerdict::Audit { rule_id: rule_id::DEFAULT, learn: None }
    } else {
        NameVerdict::Denied { rule_id: rule_id::DEFAULT }
    };
    match (audited, base) {
        (Some(deny), NameVerdict::Allowed { rule_id, port }) => NameVerdict::Audit { rule_id: deny, learn: Some((rule_id, port)) },
        (Some(deny), NameVerdict::Audit { .. }) => NameVerdict::Audit { rule_id: deny, learn: None },
        (_, base) => base,
    }
}

/// The reference reading of a rule list: the semantics in plain words, rule
/// by rule, with no trie and no precomputation. The compiled trie must agree
/// with it for every address and port (unit tests, and the `policy` fuzz
/// target in [`crate::fuzzing`]). `rules` is the full table the ids index
/// (id `i + 1` is `rules[i]`), built-ins and derived entries included, as
/// [`compile`] makes it; `mode` is the policy's.
///
/// A rule applies to `ip` when its prefix contains `ip` and it has no port or
/// the packet's port; a deny does not apply where one of its exceptions
/// contains `ip`. Then: any applicable enforced policy deny denies (the most
/// specific one, then the earliest, is named); else what decides without
/// the policy denies — the most specific applicable policy allow over
/// built-in denies no more specific than it, else the most specific
/// built-in deny, else the default (in audit mode a default deny is an
/// audit) — except that, when that lets the packet through, an applicable
/// audit-mode deny turns it into an audit of that deny, and otherwise an
/// allow an exception let through is credited to the derived entry naming
/// the allow and the exception ([`exception_text`]). A later fragment (its
/// ports are in another packet) not allowed for any port passes when some
/// port on this address is allowed: its first fragment was judged with
/// ports (the lowest such port names the rule).
pub fn brute_force_verdict(rules: &[Rule], default: Action, mode: Mode, ip: IpAddr, port: PortInfo) -> Verdict {
    let judge = |packet_port: Option<u16>| -> Verdict {
        let applicable: Vec<(u32, u8, &Rule)> = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.origin != Origin::Exception)
            .filter_map(|(i, r)| match r.target {
                Target::Cidr(net) if net.contains(ip) && (r.port.is_none() || (packet_port.is_some() && r.port == packet_port)) => {
                    Some((i as u32 + 1, net.prefix(), r))
                }
                _ => None,
            })
            .collect();
        let most_specific = |keep: &dyn Fn(&Rule) -> bool| {
            applicable
                .iter()
                .filter(|(_, _, r)| keep(r))
                .min_by_key(|(id, len, _)| (std::cmp::Reverse(*len), *id))
                .map(|(id, len, r)| (*id, *len, *r))
        };
        let policy_deny = |r: &Rule| r.action == Action::Deny && r.origin == Origin::Policy;
        let excepted = |r: &Rule| r.exception_for_ip(ip).is_some();
        if let Some((id, _, _)) = most_specific(&|r| policy_deny(r) && !excepted(r) && !rule_is_audit(mode, r)) {
            return Verdict::new(action::DENY, id);
        }
        let allow = most_specific(&|r| r.action == Action::Allow && r.origin == Origin::Policy);
        let decided = match (allow, most_specific(&|r| r.action == Action::Deny && r.origin == Origin::Builtin)) {
            (Some(a), Some((_, builtin_len, _))) if a.1 >= builtin_len => Some(a),
            (_, Some((builtin, _, _))) => return Verdict::new(action::DENY, builtin),
            (allow, None) => allow,
        };
        let base = match decided {
            Some((id, _, _)) => Verdict::new(action::ALLOW, id),
            None => default_verdict(default, mode),
        };
        if base.action == action::DENY {
            return base;
        }
        if let Some((id, _, _)) = most_specific(&|r| policy_deny(r) && !excepted(r) && rule_is_audit(mode, r)) {
            return Verdict::new(action::AUDIT, id);
        }
        match most_specific(&|r| policy_deny(r) && excepted(r)) {
            Some((_, _, deny)) if base.action == action::ALLOW => {
                let exception = deny.exception_for_ip(ip).expect("excepted");
                let text = exception_text(decided.map(|(_, _, r)| r), deny, exception);
                let id = rules.iter().position(|r| r.origin == Origin::Exception && r.text == text);
                // No derived entry where one is due: a verdict no compiled
                // trie gives, so the comparison fails and says so.
                Verdict::new(action::ALLOW, id.map_or(rule_id::NONE, |i| i as u32 + 1))
            }
            _ => base,
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
                .filter(|r| r.origin != Origin::Exception && matches!(r.target, Target::Cidr(net) if net.contains(ip)))
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
        // A port audit is a port deny that passes: a learned allow does
        // not turn it into an allow either.
        v.learned_port = 0;
        v.ports[0].action = action::AUDIT;
        assert_eq!(entry_verdict(&v, PortInfo::Port(25), 999), Verdict::new(action::AUDIT, 7));
    }

    fn parsed(text: &str) -> CompiledPolicy {
        compile(&Policy::parse("t.toml", text).unwrap(), &[]).unwrap()
    }

    #[test]
    fn cidr_exceptions_lift_their_deny_and_name_both() {
        let c = parsed(
            r#"name = "t"
[network]
default = "allow"
allow = ["198.51.0.0/16"]
deny = [{ pattern = "198.51.100.0/24", except = ["198.51.100.16/28", "198.51.100.64/26"] }, "198.51.100.70:25",
        { pattern = "203.0.113.0/24", except = ["203.0.113.128/25"] }]
"#,
        );
        let tcp = PortInfo::Port(80);
        assert_eq!(verdict(&c, "198.51.100.5", tcp), (D, "deny 198.51.100.0/24".into()));
        assert_eq!(verdict(&c, "198.51.100.17", tcp), (A, "allow 198.51.0.0/16 (deny 198.51.100.0/24 except 198.51.100.16/28)".into()));
        assert_eq!(verdict(&c, "198.51.100.70", tcp), (A, "allow 198.51.0.0/16 (deny 198.51.100.0/24 except 198.51.100.64/26)".into()));
        // Another deny still applies inside the exception.
        assert_eq!(verdict(&c, "198.51.100.70", PortInfo::Port(25)), (D, "deny 198.51.100.70:25".into()));
        // Under the default allow, the default is named with the exception.
        assert_eq!(verdict(&c, "203.0.113.200", tcp), (A, "default allow (deny 203.0.113.0/24 except 203.0.113.128/25)".into()));
        assert_eq!(verdict(&c, "203.0.113.100", tcp), (D, "deny 203.0.113.0/24".into()));
        // The trie has entries at the exception prefixes.
        assert!(c.v4.iter().any(|(a, len, _)| *a == Ipv4Addr::new(198, 51, 100, 16) && *len == 28));
        // An exception inside a built-in deny does not open it.
        let b = parsed("name = \"t\"\n[network]\ndefault = \"allow\"\ndeny = [{ pattern = \"10.0.0.0/8\", except = [\"10.1.0.0/16\"] }]\n");
        assert_eq!(verdict(&b, "10.1.2.3", tcp), (D, "builtin deny 10.0.0.0/8 (private)".into()));
        // A default deny is not "let through" by an exception.
        let d = parsed("name = \"t\"\n[network]\ndeny = [{ pattern = \"198.51.100.0/24\", except = [\"198.51.100.0/25\"] }]\n");
        assert_eq!(verdict(&d, "198.51.100.1", tcp), (D, "default deny".into()));
    }

    #[test]
    fn audit_mode_passes_what_policy_denies_would_drop_but_never_builtins() {
        let c = parsed(
            r#"name = "t"
mode = "audit"
[network]
allow = ["198.51.100.0/24", "10.1.0.0/16"]
deny = ["198.51.100.16/28", "198.51.100.9:25"]
"#,
        );
        let tcp = PortInfo::Port(80);
        assert_eq!(c.default_verdict, Verdict::new(action::AUDIT, rule_id::DEFAULT));
        assert_eq!(verdict(&c, "203.0.113.1", tcp), (action::AUDIT, "default deny".into()));
        assert_eq!(verdict(&c, "198.51.100.17", tcp), (action::AUDIT, "deny 198.51.100.16/28".into()));
        assert_eq!(verdict(&c, "198.51.100.9", PortInfo::Port(25)), (action::AUDIT, "deny 198.51.100.9:25".into()));
        assert_eq!(verdict(&c, "198.51.100.9", tcp), (A, "allow 198.51.100.0/24".into()));
        assert_eq!(verdict(&c, "10.1.0.1", tcp), (A, "allow 10.1.0.0/16".into()));
        for builtin in ["10.2.0.1", "169.254.169.254", "127.0.0.1", "::1"] {
            assert_eq!(verdict(&c, builtin, tcp).0, D, "{builtin}");
        }
        let host = compile(&Policy::parse("t.toml", "name = \"t\"\nmode = \"audit\"\n[network]\ndefault = \"allow\"\n").unwrap(), &["192.0.2.1".parse().unwrap()]).unwrap();
        assert_eq!(verdict(&host, "192.0.2.1", tcp), (D, "builtin deny 192.0.2.1/32 (host address)".into()));
        // A rule's own audit mode: an enforced deny or default still drops.
        let r = parsed(
            r#"name = "t"
[network]
allow = ["198.51.100.0/24"]
deny = [{ pattern = "198.51.100.0/25", mode = "audit" }, "198.51.100.0/26", { pattern = "203.0.113.0/24", mode = "audit" }]
"#,
        );
        assert_eq!(verdict(&r, "198.51.100.100", tcp), (action::AUDIT, "deny 198.51.100.0/25".into()));
        assert_eq!(verdict(&r, "198.51.100.1", tcp), (D, "deny 198.51.100.0/26".into()));
        assert_eq!(verdict(&r, "203.0.113.1", tcp), (D, "default deny".into()), "without the audited deny, the default denies");
        assert!(r.is_audit(2) && !r.is_audit(3) && !r.is_audit(1) && !r.is_audit(rule_id::DEFAULT));
    }

    #[test]
    fn name_exception_entries_are_made_for_every_allow_they_can_meet() {
        let c = parsed(
            r#"name = "t"
[network]
default = "allow"
allow = ["**.corp.test", "jira.corp.test:443", "other.test"]
deny = [{ pattern = "**.corp.test", except = ["jira.corp.test", "*.wiki.corp.test"] }]
"#,
        );
        let derived: Vec<String> = c.rules.iter().filter(|r| r.origin == Origin::Exception).map(Rule::describe).collect();
        assert_eq!(
            derived,
            [
                "allow **.corp.test (deny **.corp.test except jira.corp.test)",
                "allow jira.corp.test:443 (deny **.corp.test except jira.corp.test)",
                "default allow (deny **.corp.test except jira.corp.test)",
                "allow **.corp.test (deny **.corp.test except *.wiki.corp.test)",
                "default allow (deny **.corp.test except *.wiki.corp.test)",
            ]
        );
        let deny = c.rules.iter().position(|r| r.text == "**.corp.test" && r.action == Action::Deny).unwrap() as u32 + 1;
        let exc = &c.rules[deny as usize - 1].except[0];
        assert_eq!(c.describe_rule(c.excepted_rule_id(Some(1), deny, exc)), "allow **.corp.test (deny **.corp.test except jira.corp.test)");
        assert_eq!(c.describe_rule(c.excepted_rule_id(None, deny, exc)), "default allow (deny **.corp.test except jira.corp.test)");
    }

    #[test]
    fn domain_pattern_overlap_agrees_with_names() {
        let pat = |s: &str| match crate::policy::parse_rule(s).unwrap().0 {
            Target::Domain(p) => p,
            Target::Cidr(_) => unreachable!(),
        };
        let patterns = ["a.test", "b.a.test", "c.b.a.test", "*.a.test", "*.b.a.test", "**.a.test", "**.b.a.test", "*.test", "**.test", "x.other", "**.other"];
        let names = ["a.test", "b.a.test", "c.b.a.test", "d.c.b.a.test", "z.a.test", "x.test", "x.other", "y.x.other", "test"];
        for x in patterns {
            for y in patterns {
                let (px, py) = (pat(x), pat(y));
                let witnessed = names.iter().any(|n| px.matches(n) && py.matches(n));
                assert_eq!(patterns_overlap(&px, &py), witnessed, "{x} / {y}");
            }
        }
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
        // Verdicts seen: [excepted, allow, deny, audit] — the fuzz must
        // reach every kind, or it tests less than it claims.
        let mut seen = [0usize; 4];
        for _round in 0..300 {
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
                // Policy denies: sometimes in audit mode, sometimes with
                // exceptions (narrower, possibly nested, possibly several).
                let mut except = Vec::new();
                if action == Action::Deny && origin == Origin::Policy && len < 32 {
                    for _ in 0..(rand() % 3) {
                        let inner_len = len + 1 + (rand() % u64::from(32 - len)) as u8;
                        let inner = u32::from(net.network()) | (rand() as u32 & !u32::from(net.mask()));
                        let inner = ipnetwork::Ipv4Network::new(Ipv4Addr::from(inner), inner_len).unwrap();
                        let inner = ipnetwork::Ipv4Network::new(inner.network(), inner_len).unwrap();
                        except.push(crate::policy::Exception { target: Target::Cidr(IpNetwork::V4(inner)), text: inner.to_string() });
                    }
                }
                let audit = action == Action::Deny && rand() % 4 == 0;
                rules.push(Rule {
                    action,
                    target: Target::Cidr(IpNetwork::V4(net)),
                    port: if origin == Origin::Builtin { None } else { port },
                    origin,
                    text: net.to_string(),
                    line: 0,
                    except,
                    mode: if audit { Mode::Audit } else { Mode::Enforce },
                });
            }
            let default = if rand() % 2 == 0 { Action::Deny } else { Action::Allow };
            let mode = if rand() % 4 == 0 { Mode::Audit } else { Mode::Enforce };
            let c = compile_rules_in_mode("r", default, mode, rules.clone()).unwrap();
            assert_eq!(c.rules[..rules.len()], rules[..]);
            for _ in 0..200 {
                let ip = Ipv4Addr::from(0xc633_0000u32 | (rand() as u32 & 0xffff));
                for port in [PortInfo::Port(22), PortInfo::Port(23), PortInfo::Port(80), PortInfo::None, PortInfo::NonFirstFragment] {
                    let got = c.lookup(IpAddr::V4(ip), port);
                    let want = brute_force_verdict(&c.rules, default, mode, IpAddr::V4(ip), port);
                    assert_eq!(got, want, "{ip} {port:?} {mode:?} rules={rules:#?}");
                    seen[usize::from(got.action)] += 1;
                    if c.rules.get((got.rule_id as usize).wrapping_sub(1)).is_some_and(|r| r.origin == Origin::Exception) {
                        seen[0] += 1;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n > 100), "verdict kinds seen (excepted, allow, deny, audit): {seen:?}");
    }
}