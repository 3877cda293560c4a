//! DNS decisions, pure: which queries the proxy forwards at all (and how
//! they are re-encoded), which names a sandbox may resolve (and which rule
//! says so), which records of an upstream answer it may see, and which
//! addresses become reachable, for how long, with what trie value. The DNS
//! proxy ([`crate::dns::server`]) does the I/O around these.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};
use sbx_net_common::{action, rule_id, PolicyValue};

use crate::policy::compile::{CompiledPolicy, PortInfo};
// Name decisions are the policy's (`policy test` explains them too); the
// DNS proxy's callers find them here as before.
pub use crate::policy::compile::{is_plain_name, name_verdict, NameVerdict};
use crate::policy::compile::{plain_byte, plain_label, MAX_NAME_TEXT};

/// Lower-case, no trailing dot: how a name already in text form (SNI, Host,
/// tests) is compared with rules. Names from the wire go through
/// [`checked_name`] instead, which looks at the label bytes themselves.
pub fn normalise_query_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A name from the wire as rules see it: `Ok` is the lower-case dotted form
/// (every label plain, see [`checked_name`]); `Err` is a presentation form
/// with escapes, for logs only, of a name no rule may judge.
pub type CheckedName = Result<String, String>;

/// An `xn--` label must be a valid A-label: it decodes, and the decoded
/// name encodes back to exactly this label (rules hold A-labels made by
/// UTS #46 processing, so any other spelling is not the name a rule means).
fn valid_a_label(label: &str) -> bool {
    let (unicode, decoded) = idna::domain_to_unicode(label);
    decoded.is_ok() && idna::domain_to_ascii(&unicode).is_ok_and(|again| again == label)
}

/// The labels of a wire name, escaped as in zone files (`\.`, `\000`).
pub fn presentation<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut out = String::new();
    for label in labels {
        for &b in label {
            if plain_byte(b) {
                out.push(char::from(b));
            } else if b.is_ascii_graphic() {
                out.push('\\');
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\{b:03}"));
            }
        }
        out.push('.');
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// Turns a wire name into the string rules are matched against, label by
/// label: case folded (0x20 randomisation still matches), no trailing dot,
/// and refused (`Err`) unless every label is plain and every `xn--` label a
/// valid A-label.
pub fn checked_name<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> CheckedName {
    let labels: Vec<&[u8]> = labels.into_iter().collect();
    if !labels.iter().all(|l| plain_label(l)) {
        return Err(presentation(labels));
    }
    let text = labels.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect::<Vec<_>>().join(".");
    if text.len() > MAX_NAME_TEXT || text.split('.').any(|l| l.starts_with("xn--") && !valid_a_label(l)) {
        return Err(presentation(labels));
    }
    Ok(text)
}

/// [`checked_name`] of a parsed name.
pub fn checked(name: &Name) -> CheckedName {
    checked_name(name.iter())
}

/// The EDNS a guest asked with, as far as it is passed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestEdns {
    pub max_payload: u16,
    pub dnssec_ok: bool,
}

/// A standard query the proxy understood: the only thing it forwards, and
/// only re-encoded from these fields ([`reencode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StdQuery {
    pub id: u16,
    pub recursion_desired: bool,
    /// As the guest sent it (case kept: a client checking 0x20 randomisation
    /// finds its own spelling in the answer).
    pub name: Name,
    /// The name as rules see it.
    pub rule_name: String,
    pub qtype: RecordType,
    pub edns: Option<GuestEdns>,
}

/// What to do with a guest's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Screened {
    Query(StdQuery),
    /// Answered by the proxy itself (`reply`), or dropped when `reply` is
    /// `None` (no header to answer, or a response sent as a query).
    Refused { reply: Option<Vec<u8>>, rcode: Option<ResponseCode>, reason: &'static str, query: String, qtype: String },
}

/// The UDP payload size the proxy advertises upstream (DNS flag day 2020:
/// no fragmentation on common paths).
pub const UPSTREAM_UDP_PAYLOAD: u16 = 1232;

/// A reply made of the query's header alone: same id, opcode and RD, RA
/// set, no sections (for messages the proxy does not parse further: only
/// their header is read, which any 12 bytes are).
fn header_reply(query: &Header, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Header::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(rcode);
    reply.to_bytes().ok()
}

/// A reply echoing `query`'s one question with `rcode`.
fn question_reply(query: &Message, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(rcode);
    m.add_queries(query.queries().to_vec());
    if rcode.high() != 0 {
        // The upper rcode bits travel in an OPT record (BADVERS).
        m.set_edns(Edns::new());
    }
    m.to_vec().ok()
}

/// The reply to an understood query refused by the proxy (a denied name,
/// an alias chain through one, no upstream).
pub fn refusal(q: &StdQuery, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(q.id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(q.recursion_desired)
        .set_recursion_available(true)
        .set_response_code(rcode);
    m.add_query(Query::query(q.name.clone(), q.qtype));
    m.to_vec().ok()
}

/// Meta query types the proxy does not forward: zone transfers (AXFR,
/// IXFR), MAILA/MAILB, OPT, TKEY/TSIG. ANY is an ordinary query here (its
/// name decides; its addresses are learned like any answer's).
fn refused_qtype(qtype: RecordType) -> bool {
    matches!(u16::from(qtype), 41 | 249 | 250 | 251 | 252 | 253 | 254)
}

/// The opcode's mnemonic (RFC 6895).
pub fn opcode_name(opcode: u8) -> String {
    match opcode {
        0 => "QUERY".into(),
        1 => "IQUERY".into(),
        2 => "STATUS".into(),
        4 => "NOTIFY".into(),
        5 => "UPDATE".into(),
        6 => "DSO".into(),
        n => format!("OPCODE{n}"),
    }
}

/// Decides what to do with a guest's message before anything else looks at
/// it: only an opcode-QUERY message with exactly one question, nothing in
/// the answer and authority sections, at most an OPT record (version 0) in
/// the additional section, class IN, a plain name, and no meta type is a
/// [`Screened::Query`]. Everything else is answered here: NOTIMP for other
/// opcodes, FORMERR for what is malformed, REFUSED for names no rule can
/// judge and meta types, BADVERS for an EDNS version above 0.
pub fn screen_query(bytes: &[u8]) -> Screened {
    let refused = |reply: Option<Vec<u8>>, rcode: Option<ResponseCode>, reason: &'static str, query: String, qtype: String| Screened::Refused {
        reply,
        rcode,
        reason,
        query,
        qtype,
    };
    let none = || String::new();
    // The header alone first: it parses from any 12 bytes, so even a
    // message whose sections are garbage is answered by its opcode and
    // counts, with its id.
    let Ok(header) = Header::from_bytes(bytes) else {
        return refused(None, None, "malformed", none(), none());
    };
    if header.message_type() == MessageType::Response {
        // A response sent as a query: answering it could make two servers
        // answer each other forever.
        return refused(None, None, "malformed", none(), none());
    }
    if header.op_code() != OpCode::Query {
        // Recorded with the zone (or name) it names, when that parses.
        let zone = Message::from_vec(bytes).ok().and_then(|m| m.queries().first().map(|q| presentation(q.name().iter()))).unwrap_or_default();
        let reply = header_reply(&header, ResponseCode::NotImp);
        return refused(reply, Some(ResponseCode::NotImp), "opcode", zone, opcode_name(u8::from(header.op_code())));
    }
    let formerr = || refused(header_reply(&header, ResponseCode::FormErr), Some(ResponseCode::FormErr), "malformed", String::new(), String::new());
    if header.query_count() != 1 || header.answer_count() != 0 || header.name_server_count() != 0 {
        return formerr();
    }
    let Ok(message) = Message::from_vec(bytes) else { return formerr() };
    if !message.additionals().is_empty() || !message.signature().is_empty() {
        return formerr();
    }
    let question = &message.queries()[0];
    let qtype = question.query_type();
    let qtype_text = qtype.to_string();
    let rule_name = match checked(question.name()) {
        Ok(n) => n,
        Err(shown) => {
            return refused(question_reply(&message, ResponseCode::Refused), Some(ResponseCode::Refused), "invalid_name", shown, qtype_text);
        }
    };
    if question.query_class() != DNSClass::IN {
        return refused(question_reply(&message, ResponseCode::Refused), Some(ResponseCode::Refused), "qclass", rule_name, qtype_text);
    }
    if refused_qtype(qtype) {
        return refused(question_reply(&message, ResponseCode::Refused), Some(ResponseCode::Refused), "qtype", rule_name, qtype_text);
    }
    let edns = match message.extensions() {
        Some(e) if e.version() != 0 => {
            return refused(question_reply(&message, ResponseCode::BADVERS), Some(ResponseCode::BADVERS), "edns_version", rule_name, qtype_text);
        }
        Some(e) => Some(GuestEdns { max_payload: e.max_payload(), dnssec_ok: e.flags().dnssec_ok }),
        None => None,
    };
    Screened::Query(StdQuery {
        id: message.id(),
        recursion_desired: message.recursion_desired(),
        name: question.name().clone(),
        rule_name,
        qtype,
        edns,
    })
}

/// The message the proxy sends upstream for `q`: fresh, with the guest's
/// id, RD and question, and at most the proxy's own OPT record (version 0,
/// a sane UDP size, the DO bit kept). Nothing else the guest wrote (flags,
/// options, other records, trailing bytes) reaches the upstream.
pub fn reencode(q: &StdQuery) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(q.id).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(q.recursion_desired);
    m.add_query(Query::query(q.name.clone(), q.qtype));
    if let Some(guest) = q.edns {
        let mut edns = Edns::new();
        edns.set_version(0).set_max_payload(guest.max_payload.clamp(512, UPSTREAM_UDP_PAYLOAD)).set_dnssec_ok(guest.dnssec_ok);
        m.set_edns(edns);
    }
    m.to_vec().ok()
}

/// Whether an upstream message answers `q`: a response to a standard
/// query, for its question (names compared case-insensitively), or one
/// with no question and no answers (some servers' errors).
pub fn answers_query(q: &StdQuery, response: &Message) -> bool {
    if response.message_type() != MessageType::Response || response.op_code() != OpCode::Query {
        return false;
    }
    match response.queries() {
        [] => response.answers().is_empty(),
        [question] => question.query_type() == q.qtype && question.query_class() == DNSClass::IN && checked(question.name()).as_ref() == Ok(&q.rule_name),
        _ => false,
    }
}

/// One answer record, as far as the plan cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerRecord {
    Cname { owner: CheckedName, target: CheckedName },
    /// `owner`'s subtree is an alias of `target`'s (RFC 6672).
    Dname { owner: CheckedName, target: CheckedName },
    Address { owner: CheckedName, ip: IpAddr, ttl: u32 },
    Other,
}

/// What happens to one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordFate {
    Keep,
    /// An address the guest must not see: rebinding into a denied range,
    /// or an address not on the queried name's alias chain.
    Strip { reason: String },
}

/// What the policy says about an answer as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainVerdict {
    /// Learn (the question's rule is credited), for `port` only when set:
    /// the ports every name on the chain allows.
    Allowed { rule_id: u32, port: Option<u16> },
    /// A name on the alias chain is denied (`rule_id`): the answer is
    /// refused as a query for that name would be.
    Denied { name: String, rule_id: u32 },
    /// Released and recorded as audit: `name` (on the chain, or an address
    /// of the answer) would have been denied by `rule_id`, in audit mode.
    /// Addresses are learned under `learn` (the rule and port that allow
    /// the question once audit-mode rules are set aside); `None`: none are.
    Audit { name: String, rule_id: u32, learn: Option<(u32, Option<u16>)> },
    /// The chain cannot be judged (a name no rule can match, too long, port
    /// rules that leave no port): refused.
    Invalid { name: String, reason: &'static str },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerPlan {
    pub verdict: ChainVerdict,
    /// The question, then each alias in the order it was reached.
    pub chain: Vec<String>,
    pub fates: Vec<RecordFate>,
    /// Addresses to open, with their TTL as answered (empty unless the
    /// verdict is `Allowed`, or `Audit` with something to learn under).
    pub learn: Vec<(IpAddr, u32)>,
}

/// Most aliases followed from one question (a longer chain is refused).
const MAX_CNAME_CHAIN: usize = 16;

/// `name` with its suffix `owner` replaced by `target` (DNAME substitution),
/// if `name` lies strictly below `owner`.
fn dname_substitute(name: &str, owner: &str, target: &str) -> Option<String> {
    let head = name.strip_suffix(owner)?.strip_suffix('.')?;
    if head.is_empty() {
        return None;
    }
    Some(if target.is_empty() { head.to_string() } else { format!("{head}.{target}") })
}

/// The names reachable from `qname` through the answer's CNAME and DNAME
/// records; Err: (a name, why) when the chain cannot be judged.
fn alias_chain(qname: &str, records: &[AnswerRecord]) -> Result<Vec<String>, (String, &'static str)> {
    let mut chain = vec![qname.to_string()];
    let add = |chain: &mut Vec<String>, name: &CheckedName| -> Result<bool, (String, &'static str)> {
        match name {
            Ok(n) if chain.contains(n) => Ok(false),
            Ok(n) if chain.len() > MAX_CNAME_CHAIN => Err((n.clone(), "alias chain too long")),
            Ok(n) => {
                chain.push(n.clone());
                Ok(true)
            }
            Err(shown) => Err((shown.clone(), "an alias no rule can judge")),
        }
    };
    loop {
        let mut grew = false;
        for r in records {
            match r {
                AnswerRecord::Cname { owner: Ok(owner), target } if chain.contains(owner) => grew |= add(&mut chain, target)?,
                AnswerRecord::Dname { owner: Ok(owner), target } => {
                    let below: Vec<String> = chain.iter().filter(|n| dname_substitute(n, owner, "").is_some()).cloned().collect();
                    for name in below {
                        let target = match target {
                            Ok(t) => t,
                            Err(shown) => return Err((shown.clone(), "an alias no rule can judge")),
                        };
                        let synthesized = dname_substitute(&name, owner, target).filter(|n| n.len() <= MAX_NAME_TEXT);
                        let Some(synthesized) = synthesized else { return Err((name, "DNAME substitution too long")) };
                        grew |= add(&mut chain, &Ok(synthesized))?;
                    }
                }
                _ => {}
            }
        }
        if !grew {
            return Ok(chain);
        }
    }
}

/// Why the guest must not get `ip` under `policy`, if it must not: a
/// policy or built-in deny covers it (a deny the policy's own explicit
/// allow overrides is already resolved in the compiled trie), it is an
/// IPv4-compatible address (deprecated, routed as IPv4 by some hosts), or
/// it embeds an IPv4 address such a deny covers (IPv4-mapped, NAT64, 6to4,
/// Teredo — also when the policy allows the IPv6 prefix itself).
pub fn denied_address(policy: &CompiledPolicy, ip: IpAddr) -> Option<String> {
    let denied_by = |ip: IpAddr| {
        let v = policy.lookup(ip, PortInfo::None);
        (v.action == action::DENY && v.rule_id != rule_id::DEFAULT).then(|| policy.describe_rule(v.rule_id))
    };
    if let Some(rule) = denied_by(ip) {
        return Some(format!("{ip} is in a denied range: {rule}"));
    }
    let IpAddr::V6(v6) = ip else { return None };
    if u128::from(v6) >> 32 == 0 {
        return Some(format!("{ip} is IPv4-compatible (deprecated, embeds {})", Ipv4Addr::from(u128::from(v6) as u32)));
    }
    let v4 = embedded_v4(v6)?;
    denied_by(IpAddr::V4(v4)).map(|rule| format!("{ip} embeds {v4}, in a denied range: {rule}"))
}

/// The audit-mode deny rule that would strip `ip` (see [`denied_address`]):
/// the answer keeps it, its address is not learned (the trie's audit entry
/// passes and reports its packets), and the answer is recorded as audit.
pub fn audited_address(policy: &CompiledPolicy, ip: IpAddr) -> Option<u32> {
    let audited_by = |ip: IpAddr| {
        let v = policy.lookup(ip, PortInfo::None);
        (v.action == action::AUDIT && v.rule_id != rule_id::DEFAULT).then_some(v.rule_id)
    };
    audited_by(ip).or_else(|| match ip {
        IpAddr::V6(v6) => embedded_v4(v6).and_then(|v4| audited_by(IpAddr::V4(v4))),
        IpAddr::V4(_) => None,
    })
}

/// The IPv4 address an IPv6 address carries by a well-known embedding.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let s = ip.segments();
    let low32 = Ipv4Addr::from(bits as u32);
    let mapped = bits >> 32 == 0xffff;
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    // RFC 8215 local-use prefix (64:ff9b:1::/48), in practice a /96 too.
    let local_nat64 = s[..3] == [0x64, 0xff9b, 1];
    if mapped || nat64 || local_nat64 {
        return Some(low32);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::from(((u32::from(s[1])) << 16) | u32::from(s[2])));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        // Teredo: the client's address, inverted, in the last 32 bits.
        return Some(Ipv4Addr::from(!(bits as u32)));
    }
    None
}

/// Plans an answer to `qname` (a checked name): its alias chain (CNAME and
/// DNAME records from the question on; records of other owners are never
/// learned), the question judged like a query and every alias on the chain
/// against the deny rules — one denied name refuses the whole answer as a
/// query for it would be — then the chain's A/AAAA records kept and learned
/// unless their address must not be seen ([`denied_address`]).
///
/// An alias the policy merely does not list (the default) does not refuse:
/// allowed names routinely alias into CDN names no policy lists, and
/// whoever serves an allowed zone can answer any address directly anyway.
/// A deny rule is a statement about a name, so it holds wherever the name
/// appears.
pub fn plan_answer(policy: &CompiledPolicy, qname: &str, records: &[AnswerRecord]) -> AnswerPlan {
    let qname = normalise_query_name(qname);
    let refuse = |chain: Vec<String>, verdict: ChainVerdict| {
        let reason = match &verdict {
            ChainVerdict::Denied { name, rule_id } => format!("{name} on the alias chain is denied: {}", policy.describe_rule(*rule_id)),
            ChainVerdict::Invalid { name, reason } => format!("{name}: {reason}"),
            ChainVerdict::Allowed { .. } | ChainVerdict::Audit { .. } => String::new(),
        };
        AnswerPlan { verdict, chain, fates: vec![RecordFate::Strip { reason }; records.len()], learn: Vec::new() }
    };
    let chain = match alias_chain(&qname, records) {
        Ok(chain) => chain,
        Err((name, reason)) => return refuse(vec![qname], ChainVerdict::Invalid { name, reason }),
    };
    let mut credited = None;
    let mut port: Option<u16> = None;
    // The first name (or address) only an audit-mode rule would deny, and
    // whether the question falls to the default with nothing to learn.
    let mut audit: Option<(String, u32)> = None;
    let mut learn_nothing = false;
    for (position, name) in chain.iter().enumerate() {
        let (credit, p) = match name_verdict(policy, name) {
            NameVerdict::Denied { rule_id } if position > 0 && rule_id == rule_id::DEFAULT => continue,
            NameVerdict::Denied { rule_id } => {
                let verdict = ChainVerdict::Denied { name: name.clone(), rule_id };
                return refuse(chain, verdict);
            }
            NameVerdict::Audit { rule_id, learn } => {
                // An alias only the default would deny does not refuse (see
                // above), so it is no audit either.
                if position == 0 || rule_id != rule_id::DEFAULT {
                    audit.get_or_insert((name.clone(), rule_id));
                }
                match learn {
                    Some(l) => l,
                    None => {
                        learn_nothing |= position == 0;
                        continue;
                    }
                }
            }
            NameVerdict::Allowed { rule_id, port } => (rule_id, port),
        };
        credited.get_or_insert(credit);
        match (port, p) {
            (_, None) => {}
            (None, Some(p)) => port = Some(p),
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(_)) => {
                let verdict = ChainVerdict::Invalid { name: name.clone(), reason: "port rules on the alias chain leave no port" };
                return refuse(chain, verdict);
            }
        }
    }
    let mut fates = Vec::with_capacity(records.len());
    let mut learn = Vec::new();
    for r in records {
        let fate = match r {
            AnswerRecord::Address { owner, ip, ttl } => match owner {
                Ok(o) if chain.contains(o) => match denied_address(policy, *ip) {
                    Some(reason) => RecordFate::Strip { reason },
                    None => {
                        if let Some(rule) = audited_address(policy, *ip) {
                            audit.get_or_insert((ip.to_string(), rule));
                        } else if !learn_nothing && !learn.iter().any(|(a, _)| a == ip) {
                            learn.push((*ip, *ttl));
                        }
                        RecordFate::Keep
                    }
                },
                Ok(o) => RecordFate::Strip { reason: format!("{o} is not on the alias chain of {qname}") },
                Err(shown) => RecordFate::Strip { reason: format!("{shown} is not on the alias chain of {qname}") },
            },
            _ => RecordFate::Keep,
        };
        fates.push(fate);
    }
    let rule_id = credited.unwrap_or(rule_id::DEFAULT);
    let verdict = match audit {
        Some((name, audit_rule)) => ChainVerdict::Audit { name, rule_id: audit_rule, learn: (!learn_nothing).then_some((rule_id, port)) },
        None => ChainVerdict::Allowed { rule_id, port },
    };
    AnswerPlan { verdict, chain, fates, learn }
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

/// How long an address's last answer may be ago before a new answer must
/// record it again: the per-name cap forgets the least recently answered
/// first, to within this.
pub const ANSWERED_RESOLUTION_NS: u64 = 1_000_000_000;

/// One allowed answer's address against what is learned already: the value
/// its trie entry must hold, and whether the trie must be written. Expiry
/// moves in whole seconds, so an entry that already says the same to within
/// one is kept as it is (no syscall).
pub fn planned_value(policy: &CompiledPolicy, policy_id: u32, existing: Option<&LearnedAddr>, ip: IpAddr, rule: u32, port: Option<u16>, until_ns: u64) -> (PolicyValue, bool) {
    let existing = existing.filter(|l| l.policy_id == policy_id).map(|l| l.value);
    let value = learned_value(policy, ip, existing.as_ref(), rule, port, until_ns);
    match existing {
        Some(e) if e.learned_port == value.learned_port && e.learned_until_ns + 1_000_000_000 > value.learned_until_ns => (e, false),
        _ => (value, true),
    }
}

/// Whether an allowed answer leaves what is learned as it is: each of its
/// addresses (with the expiry it would get) is open for `policy_id` as
/// [`planned_value`] would leave it and for more than
/// [`ANSWERED_RESOLUTION_NS`] yet (also with a TTL, minimum and grace of
/// 0), already under `name`, answered within [`ANSWERED_RESOLUTION_NS`],
/// and the name is within its cap (0: none). Such an answer — the common
/// one, a name asked again — needs no writer lock and no write. (The cap
/// forgets the least recently answered first: to within that resolution.)
#[allow(clippy::too_many_arguments)]
pub fn answer_changes_nothing(
    table: Option<&std::collections::HashMap<IpAddr, LearnedAddr>>,
    policy: &CompiledPolicy,
    policy_id: u32,
    name: &str,
    addresses: &[(IpAddr, u64)],
    rule: u32,
    port: Option<u16>,
    cap: usize,
    now_ns: u64,
) -> bool {
    let Some(table) = table else { return false };
    let current: Vec<IpAddr> = addresses.iter().map(|(ip, _)| *ip).collect();
    if cap > 0 && exceeds_cap(table, name, &current, cap) {
        return false;
    }
    addresses.iter().all(|(ip, until_ns)| {
        let Some(entry) = table.get(ip) else { return false };
        entry.names.contains(name)
            && entry.value.learned_until_ns > now_ns + ANSWERED_RESOLUTION_NS
            && entry.answered_ns + ANSWERED_RESOLUTION_NS > now_ns
            && !planned_value(policy, policy_id, Some(entry), *ip, rule, port, *until_ns).1
    })
}

/// One learned address of one sandbox.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    let (mut older, excess) = older_over_cap(table, name, current, cap);
    if excess == 0 {
        return Vec::new();
    }
    older.sort_by_key(|(ip, l)| (l.answered_ns, **ip));
    older.into_iter().map(|(ip, _)| *ip).filter(|ip| !live(*ip)).take(excess).collect()
}

/// Whether [`over_cap`] would forget any of `name`'s addresses, and so ask
/// which of them have live flows (worth reading conntrack for).
pub fn exceeds_cap(table: &std::collections::HashMap<IpAddr, LearnedAddr>, name: &str, current: &[IpAddr], cap: usize) -> bool {
    older_over_cap(table, name, current, cap).1 > 0
}

/// `name`'s addresses other than `current`, and how many of them are
/// beyond the cap.
fn older_over_cap<'a>(table: &'a std::collections::HashMap<IpAddr, LearnedAddr>, name: &str, current: &[IpAddr], cap: usize) -> (Vec<(&'a IpAddr, &'a LearnedAddr)>, usize) {
    let older: Vec<(&IpAddr, &LearnedAddr)> = table.iter().filter(|(ip, l)| l.names.contains(name) && !current.contains(ip)).collect();
    let total = older.len() + current.len();
    let excess = total.saturating_sub(cap.max(current.len()));
    (older, excess)
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
/// still allows (their rule and port decide; a name only audited counts
/// when it has a rule to learn under), dropped when none is, or when the
/// address now falls in a denied (or audited) range. Expiry is unchanged.
pub fn carry_learned(new: &CompiledPolicy, ip: IpAddr, old: &LearnedAddr) -> Option<(PolicyValue, BTreeSet<String>)> {
    let v = new.lookup(ip, PortInfo::None);
    // Never over a policy deny, nor over an audited one (the audit entry
    // must keep reporting its packets as audit).
    if v.action != action::ALLOW && v.rule_id != rule_id::DEFAULT {
        return None;
    }
    let mut value: Option<PolicyValue> = None;
    let mut names = BTreeSet::new();
    for name in &old.names {
        if let Some((rule_id, port)) = name_verdict(new, name).learn() {
            value = Some(learned_value(new, ip, value.as_ref(), rule_id, port, old.value.learned_until_ns));
            names.insert(name.clone());
        }
    }
    value.map(|v| (v, names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;
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
        p.describe_rule(v.rule_id())
    }

    fn parsed(text: &str) -> CompiledPolicy {
        compile(&Policy::parse("t.toml", text).unwrap(), &["10.200.0.5".parse().unwrap()]).unwrap()
    }

    #[test]
    fn name_exceptions_lift_their_deny_and_are_named() {
        let p = parsed(
            r#"name = "t"
[network]
allow = ["**.corp.test", "wiki.other.test"]
deny = [{ pattern = "**.corp.test", except = ["jira.corp.test"] }, { pattern = "**.other.test", except = ["wiki.other.test"] }, "bad.test"]
"#,
        );
        let jira = name_verdict(&p, "jira.corp.test");
        assert!(matches!(jira, NameVerdict::Allowed { port: None, .. }), "{jira:?}");
        assert_eq!(rule_text(&p, &jira), "allow **.corp.test (deny **.corp.test except jira.corp.test)");
        assert_eq!(rule_text(&p, &name_verdict(&p, "git.corp.test")), "deny **.corp.test");
        assert!(matches!(name_verdict(&p, "git.corp.test"), NameVerdict::Denied { .. }));
        assert_eq!(rule_text(&p, &name_verdict(&p, "wiki.other.test")), "allow wiki.other.test (deny **.other.test except wiki.other.test)");
        // An exception under a default allow names the default.
        let d = parsed("name = \"t\"\n[network]\ndefault = \"allow\"\ndeny = [{ pattern = \"**.corp.test\", except = [\"*.wiki.corp.test\"] }]\n");
        assert_eq!(rule_text(&d, &name_verdict(&d, "a.wiki.corp.test")), "default allow (deny **.corp.test except *.wiki.corp.test)");
        assert_eq!(rule_text(&d, &name_verdict(&d, "a.b.wiki.corp.test")), "deny **.corp.test");
        // Under a default deny with no allow, the exception opens nothing.
        let n = parsed("name = \"t\"\n[network]\ndeny = [{ pattern = \"**.corp.test\", except = [\"jira.corp.test\"] }]\n");
        assert_eq!(name_verdict(&n, "jira.corp.test"), NameVerdict::Denied { rule_id: rule_id::DEFAULT });
    }

    #[test]
    fn audit_mode_names_resolve_recorded_and_learn_only_what_an_allow_opens() {
        let p = parsed(
            r#"name = "t"
mode = "audit"
[network]
allow = ["**.corp.test", "git.test:22"]
deny = ["bad.corp.test", { pattern = "worse.corp.test", mode = "enforce" }]
"#,
        );
        // A deny in audit mode over an allow: audited, learned under the allow.
        let bad = name_verdict(&p, "bad.corp.test");
        assert_eq!(rule_text(&p, &bad), "deny bad.corp.test");
        let NameVerdict::Audit { learn: Some((allow, None)), .. } = bad else { panic!("{bad:?}") };
        assert_eq!(p.describe_rule(allow), "allow **.corp.test");
        // The audit-mode default: audited, nothing learned.
        assert_eq!(name_verdict(&p, "unlisted.test"), NameVerdict::Audit { rule_id: rule_id::DEFAULT, learn: None });
        assert!(matches!(name_verdict(&p, "git.test"), NameVerdict::Allowed { port: Some(22), .. }));
        assert!(matches!(name_verdict(&p, "worse.corp.test"), NameVerdict::Denied { .. }), "an explicit enforce stays enforced");
        // A rule's own mode beats its policy's (an explicit enforce stays
        // enforced in an audit policy: CompiledPolicy::is_audit); a
        // rule-level audit under an enforced policy: an enforced deny or
        // default still denies.
        let r = parsed(
            r#"name = "t"
[network]
allow = ["**.corp.test"]
deny = [{ pattern = "bad.corp.test", mode = "audit" }, { pattern = "**.x.test", mode = "audit" }, "worse.corp.test"]
"#,
        );
        let bad = name_verdict(&r, "bad.corp.test");
        assert!(matches!(bad, NameVerdict::Audit { learn: Some(_), .. }), "{bad:?}");
        assert_eq!(rule_text(&r, &name_verdict(&r, "worse.corp.test")), "deny worse.corp.test");
        assert_eq!(name_verdict(&r, "a.x.test"), NameVerdict::Denied { rule_id: rule_id::DEFAULT }, "without the audited deny, the enforced default denies");
    }

    #[test]
    fn audit_mode_answers_are_released_and_audited_addresses_not_learned() {
        let p = parsed(
            r#"name = "t"
mode = "audit"
[network]
allow = ["allowed.test", "cname.test"]
deny = ["198.51.100.0/24", "denied.test"]
"#,
        );
        let addr = |owner: &str, ip: &str| AnswerRecord::Address { owner: Ok(owner.into()), ip: ip.parse().unwrap(), ttl: 60 };
        // An allowed name answering into an audit-mode deny: kept, not learned, audit.
        let plan = plan_answer(&p, "allowed.test", &[addr("allowed.test", "198.51.100.5"), addr("allowed.test", "203.0.113.5"), addr("allowed.test", "10.0.0.1")]);
        assert_eq!(plan.fates[0], RecordFate::Keep);
        assert!(matches!(plan.fates[2], RecordFate::Strip { .. }), "a built-in deny is still stripped");
        assert_eq!(plan.learn, vec![("203.0.113.5".parse().unwrap(), 60)]);
        let ChainVerdict::Audit { name, rule_id, learn: Some(_) } = &plan.verdict else { panic!("{:?}", plan.verdict) };
        assert_eq!((name.as_str(), p.describe_rule(*rule_id).as_str()), ("198.51.100.5", "deny 198.51.100.0/24"));
        // A name only the audit default denies: released, nothing learned.
        let plan = plan_answer(&p, "unlisted.test", &[addr("unlisted.test", "203.0.113.9")]);
        assert!(plan.learn.is_empty());
        assert!(matches!(plan.verdict, ChainVerdict::Audit { rule_id: 0, learn: None, .. }), "{:?}", plan.verdict);
        // An alias into an audit-mode denied name: released, audited, the question's addresses learned.
        let plan = plan_answer(&p, "cname.test", &[AnswerRecord::Cname { owner: Ok("cname.test".into()), target: Ok("denied.test".into()) }, addr("denied.test", "203.0.113.7")]);
        let ChainVerdict::Audit { name, rule_id, learn: Some((credit, None)) } = &plan.verdict else { panic!("{:?}", plan.verdict) };
        assert_eq!((name.as_str(), p.describe_rule(*rule_id).as_str(), p.describe_rule(*credit).as_str()), ("denied.test", "deny denied.test", "allow cname.test"));
        assert_eq!(plan.learn.len(), 1);
        // Learned addresses are never carried over an audited range.
        let learned = LearnedAddr { answered_ns: 0, policy_id: 1, value: learned_value(&p, "198.51.100.5".parse().unwrap(), None, 1, None, 10), names: ["allowed.test".to_string()].into() };
        assert!(carry_learned(&p, "198.51.100.5".parse().unwrap(), &learned).is_none());
        assert!(carry_learned(&p, "203.0.113.5".parse().unwrap(), &learned).is_some());
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
        assert!(matches!(name_verdict(&p, "worse.corp.test"), NameVerdict::Denied { .. }), "an explicit enforce stays enforced");
        assert_eq!(rule_text(&p, &name_verdict(&p, "unlisted.test")), "default deny");
        assert_eq!(normalise_query_name("Allowed.TEST."), "allowed.test");
    }

    /// A record owner or alias target as the proxy reads it off the wire.
    fn n(text: &str) -> CheckedName {
        let name = Name::from_ascii(text).unwrap();
        checked(&name)
    }

    fn addr(owner: &str, ip: &str) -> AnswerRecord {
        AnswerRecord::Address { owner: n(owner), ip: ip.parse().unwrap(), ttl: 60 }
    }

    fn cname(owner: &str, target: &str) -> AnswerRecord {
        AnswerRecord::Cname { owner: n(owner), target: n(target) }
    }

    fn stripped(plan: &AnswerPlan) -> Vec<usize> {
        plan.fates.iter().enumerate().filter(|(_, f)| *f != &RecordFate::Keep).map(|(i, _)| i).collect()
    }

    #[test]
    fn answers_follow_cname_chains_and_strip_rebinding() {
        let p = policy();
        let records = vec![
            cname("cname.test.", "mid.x.any.test."),
            cname("mid.x.any.test.", "end.x.any.test."),
            addr("end.x.any.test.", "198.51.100.7"),
            addr("end.x.any.test.", "2001:db8::7"),
            addr("end.x.any.test.", "10.1.2.3"),
            addr("end.x.any.test.", "127.0.0.1"),
            addr("end.x.any.test.", "169.254.169.254"),
            addr("end.x.any.test.", "::ffff:10.0.0.1"),
            addr("end.x.any.test.", "10.200.0.5"),
            addr("unrelated.test.", "198.51.100.9"),
            AnswerRecord::Other,
        ];
        let plan = plan_answer(&p, "cname.test", &records);
        assert_eq!(plan.verdict, ChainVerdict::Allowed { rule_id: 6, port: None });
        assert_eq!(plan.chain, vec!["cname.test", "mid.x.any.test", "end.x.any.test"]);
        assert_eq!(plan.learn, vec![("198.51.100.7".parse().unwrap(), 60), ("2001:db8::7".parse().unwrap(), 60)]);
        assert_eq!(stripped(&plan), vec![4, 5, 6, 7, 8, 9]);
        match &plan.fates[4] {
            RecordFate::Strip { reason } => assert!(reason.contains("deny 10.0.0.0/8"), "{reason}"),
            f => panic!("{f:?}"),
        }
        // A CNAME loop ends (and its names are judged: none is allowed).
        let looped = vec![cname("a.one.test.", "b.one.test."), cname("b.one.test.", "a.one.test.")];
        let plan = plan_answer(&p, "a.one.test", &looped);
        assert!(plan.learn.is_empty());
        assert_eq!(plan.chain, vec!["a.one.test", "b.one.test"]);
    }

    /// Issue 12: `pivot → denied` opened the denied name's address,
    /// credited to the allow rule of the pivot.
    #[test]
    fn an_alias_chain_through_a_denied_name_refuses_the_whole_answer() {
        let p = policy();
        // An explicit deny on the chain.
        let records = vec![cname("pivot.one.test.", "bad.any.test."), addr("bad.any.test.", "198.51.100.15")];
        let plan = plan_answer(&p, "pivot.one.test", &records);
        assert_eq!(plan.verdict, ChainVerdict::Denied { name: "bad.any.test".into(), rule_id: 7 });
        assert_eq!(p.describe_rule(7), "deny bad.any.test");
        assert!(plan.learn.is_empty());
        assert_eq!(stripped(&plan), vec![0, 1]);
        // An alias only the default denies (a CDN name) is followed, however
        // deep and in any letter case; its address is learned for the question.
        let records = vec![cname("pivot.one.test.", "x.y.any.test."), cname("X.Y.ANY.TEST.", "unlisted.test."), addr("unlisted.test.", "198.51.100.20")];
        let plan = plan_answer(&p, "pivot.one.test", &records);
        assert!(matches!(plan.verdict, ChainVerdict::Allowed { .. }), "{:?}", plan.verdict);
        assert_eq!(plan.learn.len(), 1);
        // ...but a deny rule holds wherever on the chain its name appears.
        let records = vec![cname("pivot.one.test.", "unlisted.test."), cname("UNLISTED.test.", "bad.any.test."), addr("bad.any.test.", "198.51.100.15")];
        assert_eq!(plan_answer(&p, "pivot.one.test", &records).verdict, ChainVerdict::Denied { name: "bad.any.test".into(), rule_id: 7 });
        // A DNAME: the subtree of an allowed name aliased into a denied one.
        let dname = |owner: &str, target: &str| AnswerRecord::Dname { owner: n(owner), target: n(target) };
        let records = vec![dname("dn.any.test.", "any.test."), cname("bad.dn.any.test.", "bad.any.test."), addr("bad.any.test.", "198.51.100.15")];
        let plan = plan_answer(&p, "bad.dn.any.test", &records);
        assert_eq!(plan.verdict, ChainVerdict::Denied { name: "bad.any.test".into(), rule_id: 7 });
        // ...also when the server left out the synthesized CNAME.
        let records = vec![dname("dn.any.test.", "any.test."), addr("bad.any.test.", "198.51.100.15")];
        assert_eq!(plan_answer(&p, "bad.dn.any.test", &records).verdict, ChainVerdict::Denied { name: "bad.any.test".into(), rule_id: 7 });
        // A DNAME into an allowed subtree is followed and learned.
        let records = vec![dname("dn.any.test.", "y.any.test."), addr("x.y.any.test.", "198.51.100.13")];
        let plan = plan_answer(&p, "x.dn.any.test", &records);
        assert_eq!(plan.verdict, ChainVerdict::Allowed { rule_id: 3, port: None });
        assert_eq!(plan.chain, vec!["x.dn.any.test", "x.y.any.test"]);
        assert_eq!(plan.learn, vec![("198.51.100.13".parse().unwrap(), 60)]);
        // A DNAME whose owner is not above a chain name changes nothing.
        let records = vec![dname("other.test.", "bad.any.test."), addr("x.dn.any.test.", "198.51.100.13")];
        assert_eq!(plan_answer(&p, "x.dn.any.test", &records).chain, vec!["x.dn.any.test"]);
        // An alias no rule can judge, and a chain too long: refused.
        let odd = AnswerRecord::Cname { owner: n("a.one.test."), target: checked_name([&b"x.y"[..], b"any", b"test"]) };
        assert!(matches!(plan_answer(&p, "a.one.test", &[odd]).verdict, ChainVerdict::Invalid { .. }));
        let long: Vec<AnswerRecord> = (0..20).map(|i| cname(&format!("h{i}.any.test."), &format!("h{}.any.test.", i + 1))).collect();
        let plan = plan_answer(&p, "h0.any.test", &long);
        assert!(matches!(&plan.verdict, ChainVerdict::Invalid { reason, .. } if reason.contains("too long")), "{plan:?}");
        // Port rules narrow the chain: an any-port name aliasing a port rule
        // opens that port only.
        let records = vec![cname("a.one.test.", "git.test."), addr("git.test.", "198.51.100.30")];
        let plan = plan_answer(&p, "a.one.test", &records);
        assert_eq!(plan.verdict, ChainVerdict::Allowed { rule_id: 2, port: Some(22) });
        assert_eq!(plan.learn.len(), 1);
    }

    #[test]
    fn addresses_embedding_a_denied_ipv4_are_stripped() {
        // The policy allows the NAT64 prefix explicitly (a NAT64 host): the
        // embedded address still decides.
        let allowing = "name = \"t\"\n[network]\nallow = [\"a.test\", \"64:ff9b::/96\", \"2002::/16\", \"2001::/32\"]\n";
        let p = compile(&Policy::parse("t.toml", allowing).unwrap(), &["192.0.2.1".parse().unwrap()]).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (addr, why) in [
            ("::ffff:169.254.169.254", "IPv4-mapped"),
            ("64:ff9b::a9fe:a9fe", "embeds 169.254.169.254"),
            ("64:ff9b::7f00:1", "embeds 127.0.0.1"),
            ("64:ff9b::c000:201", "embeds 192.0.2.1"),
            ("2002:a9fe:a9fe::1", "embeds 169.254.169.254"),
            ("2001:0:4136:e378:8000:63bf:5601:5601", "embeds 169.254.169.254"),
            ("::a9fe:a9fe", "IPv4-compatible"),
            ("::c633:6405", "IPv4-compatible"),
            ("::1", "loopback"),
        ] {
            let reason = denied_address(&p, ip(addr)).unwrap_or_else(|| panic!("{addr} was not stripped"));
            assert!(reason.contains(why), "{addr}: {reason}");
        }
        assert_eq!(denied_address(&p, ip("64:ff9b::c633:6405")), None, "NAT64 of a public address");
        assert_eq!(denied_address(&p, ip("2001:db8::1")), None);
        assert_eq!(denied_address(&p, ip("198.51.100.5")), None);
    }

    #[test]
    fn wire_names_become_rule_names_label_by_label() {
        let name = |labels: &[&[u8]]| checked_name(labels.iter().copied());
        assert_eq!(name(&[b"AlLoWeD", b"TeSt"]), Ok("allowed.test".to_string()), "0x20 randomisation folds");
        assert_eq!(name(&[b"_sip", b"_tcp", b"x-1", b"test"]), Ok("_sip._tcp.x-1.test".to_string()));
        assert_eq!(name(&[]), Ok(String::new()), "the root");
        // Bytes a rule cannot stand for: refused, shown escaped.
        assert_eq!(name(&[b"x.one", b"test"]), Err("x\\.one.test.".to_string()), "a dot inside a label is not two labels");
        assert_eq!(name(&[b"x\0", b"one", b"test"]), Err("x\\000.one.test.".to_string()));
        assert_eq!(name(&[b"a b", b"test"]), Err("a\\032b.test.".to_string()));
        assert_eq!(name(&["bücher".as_bytes(), b"test"]), Err("b\\195\\188cher.test.".to_string()), "raw UTF-8 is not its A-label");
        assert_eq!(name(&[b"*", b"one", b"test"]), Err("\\*.one.test.".to_string()));
        // A-labels must be valid and canonical.
        assert_eq!(name(&[b"XN--BCHER-KVA", b"test"]), Ok("xn--bcher-kva.test".to_string()));
        assert!(name(&[b"xn--a", b"test"]).is_err());
        assert!(name(&[b"xn--abc-", b"test"]).is_err(), "decodes to plain ASCII");
        let long = [&[b'a'; 63][..], &[b'b'; 63], &[b'c'; 63], &[b'd'; 62]];
        assert!(name(&long).is_err(), "254 characters");
        assert!(name(&long[..3]).is_ok());
    }

    #[test]
    fn names_that_are_not_plain_match_no_rule() {
        let p = policy();
        // As text (the SNI or Host of the HTTP proxy), an escaped dot.
        assert_eq!(name_verdict(&p, "x\\.one.test"), NameVerdict::Denied { rule_id: rule_id::DEFAULT });
        assert_eq!(name_verdict(&p, "a b.one.test"), NameVerdict::Denied { rule_id: rule_id::DEFAULT });
        assert!(matches!(name_verdict(&p, "x.one.test"), NameVerdict::Allowed { .. }));
        assert!(is_plain_name("") && is_plain_name("a-b._c.test") && !is_plain_name("a..test") && !is_plain_name("*.test"));
    }

    fn header(flags: u16, counts: [u16; 4]) -> Vec<u8> {
        let mut h = vec![0x12, 0x34];
        h.extend_from_slice(&flags.to_be_bytes());
        for c in counts {
            h.extend_from_slice(&c.to_be_bytes());
        }
        h
    }

    fn question(labels: &[&[u8]], qtype: u16, class: u16) -> Vec<u8> {
        let mut q = Vec::new();
        for l in labels {
            q.push(l.len() as u8);
            q.extend_from_slice(l);
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&class.to_be_bytes());
        q
    }

    /// An OPT record: UDP size, version, DO, options.
    fn opt(size: u16, version: u8, dnssec_ok: bool, options: &[(u16, &[u8])]) -> Vec<u8> {
        let mut o = vec![0, 0, 41];
        o.extend_from_slice(&size.to_be_bytes());
        o.extend_from_slice(&[0, version, if dnssec_ok { 0x80 } else { 0 }, 0]);
        let data: Vec<u8> = options.iter().flat_map(|(code, v)| [&code.to_be_bytes()[..], &(v.len() as u16).to_be_bytes(), v].concat()).collect();
        o.extend_from_slice(&(data.len() as u16).to_be_bytes());
        o.extend_from_slice(&data);
        o
    }

    const RD: u16 = 0x0100;
    const A: u16 = 1;
    const IN: u16 = 1;
    const ALLOWED: &[&[u8]] = &[b"allowed", b"test"];

    fn query(labels: &[&[u8]], qtype: u16) -> Vec<u8> {
        [header(RD, [1, 0, 0, 0]), question(labels, qtype, IN)].concat()
    }

    /// (rcode, reason) of a refusal; panics on a query that passes.
    fn refused(bytes: &[u8]) -> (Option<ResponseCode>, &'static str) {
        match screen_query(bytes) {
            Screened::Refused { reply, rcode, reason, .. } => {
                if let (Some(reply), Some(code)) = (&reply, rcode) {
                    let m = Message::from_vec(reply).unwrap_or_else(|e| panic!("our reply does not parse: {e}"));
                    // (BADVERS and BADSIG share code 16: compare numbers.)
                    assert_eq!((m.id(), m.message_type(), u16::from(m.response_code())), (0x1234, MessageType::Response, u16::from(code)));
                }
                assert_eq!(reply.is_some(), rcode.is_some());
                (rcode, reason)
            }
            Screened::Query(q) => panic!("passed: {q:?}"),
        }
    }

    /// Issue 12: other opcodes, several questions and extra records went
    /// upstream byte for byte.
    #[test]
    fn only_standard_queries_with_one_question_pass() {
        for opcode in [1u16, 2, 3, 4, 5, 6, 15] {
            let q = [header(RD | opcode << 11, [1, 0, 0, 0]), question(ALLOWED, 6, IN)].concat();
            assert_eq!(refused(&q), (Some(ResponseCode::NotImp), "opcode"), "opcode {opcode}");
            let reply = match screen_query(&q) {
                Screened::Refused { reply, qtype, .. } => {
                    assert_eq!(qtype, opcode_name(opcode as u8));
                    reply.unwrap()
                }
                other => panic!("{other:?}"),
            };
            assert_eq!((reply[2] >> 3) & 0x0f, opcode as u8, "the reply keeps the opcode");
        }
        // The reply is the query's header alone: its id, opcode and RD, with
        // QR and RA; the query's other bits (AA, TC, Z, CD) and counts are not echoed.
        let odd = [0x12, 0x34, 5 << 3 | 0x04 | 0x02 | 0x01, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        match screen_query(&odd) {
            Screened::Refused { reply: Some(reply), rcode: Some(ResponseCode::NotImp), .. } => {
                assert_eq!(reply, [0x12, 0x34, 0x80 | 5 << 3 | 0x01, 0x80 | 4, 0, 0, 0, 0, 0, 0, 0, 0]);
            }
            other => panic!("{other:?}"),
        }
        // UPDATE with prerequisite and update sections.
        let update = [header(5 << 11, [1, 1, 1, 0]), question(ALLOWED, 6, IN), vec![0xc0, 12, 0, 1, 0, 255, 0, 0, 0, 0, 0, 0], vec![0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]].concat();
        assert_eq!(refused(&update), (Some(ResponseCode::NotImp), "opcode"));
        // No reply at all: a cut header, a response.
        assert_eq!(refused(&[0x12, 0x34, 1]), (None, "malformed"));
        assert_eq!(refused(&[header(0x8000 | RD, [1, 0, 0, 0]), question(ALLOWED, A, IN)].concat()), (None, "malformed"));
        let formerr = (Some(ResponseCode::FormErr), "malformed");
        assert_eq!(refused(&header(RD, [0, 0, 0, 0])), formerr, "qdcount 0");
        assert_eq!(refused(&[header(RD, [2, 0, 0, 0]), question(ALLOWED, A, IN), question(&[b"denied", b"test"], A, IN)].concat()), formerr, "qdcount 2");
        let a_record = vec![0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 51, 100, 5];
        for counts in [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]] {
            assert_eq!(refused(&[header(RD, counts), question(ALLOWED, A, IN), a_record.clone()].concat()), formerr, "extra record {counts:?}");
        }
        let two_opts = [header(RD, [1, 0, 0, 2]), question(ALLOWED, A, IN), opt(1232, 0, false, &[]), opt(1232, 0, false, &[])].concat();
        assert_eq!(refused(&two_opts), formerr);
        // Names the parser must refuse: a pointer loop, a pointer past the
        // end, a label of 64, a name over 255, a cut question.
        assert_eq!(refused(&[header(RD, [1, 0, 0, 0]), vec![0xc0, 12, 0, 1, 0, 1]].concat()), formerr, "pointer to itself");
        assert_eq!(refused(&[header(RD, [1, 0, 0, 0]), vec![0xc0, 200, 0, 1, 0, 1]].concat()), formerr, "pointer past the end");
        assert_eq!(refused(&query(&[&[b'a'; 64], b"test"], A)), formerr, "label of 64");
        assert_eq!(refused(&query(&[&[b'a'; 63], &[b'b'; 63], &[b'c'; 63], &[b'd'; 63], b"test"], A)), formerr, "name over 255");
        let cut = query(ALLOWED, A);
        assert_eq!(refused(&cut[..cut.len() - 3]), formerr, "no class");
    }

    #[test]
    fn names_classes_types_and_edns_versions_are_screened() {
        let refused_for = |reason| (Some(ResponseCode::Refused), reason);
        assert_eq!(refused(&query(&[b"x.allowed", b"test"], A)), refused_for("invalid_name"));
        assert_eq!(refused(&query(&[b"x\0", b"allowed", b"test"], A)), refused_for("invalid_name"));
        assert_eq!(refused(&query(&["bücher".as_bytes(), b"test"], A)), refused_for("invalid_name"));
        assert_eq!(refused(&[header(RD, [1, 0, 0, 0]), question(&[b"version", b"bind"], 16, 3)].concat()), refused_for("qclass"));
        for meta in [252u16, 251, 250, 249, 41] {
            assert_eq!(refused(&query(ALLOWED, meta)), refused_for("qtype"), "qtype {meta}");
        }
        let v1 = [header(RD, [1, 0, 0, 1]), question(ALLOWED, A, IN), opt(1232, 1, false, &[])].concat();
        assert_eq!(refused(&v1), (Some(ResponseCode::BADVERS), "edns_version"));
        // ANY is a query like another.
        assert!(matches!(screen_query(&query(ALLOWED, 255)), Screened::Query(_)));
    }

    #[test]
    fn forwarded_queries_are_reencoded_from_what_was_parsed() {
        let evil = b"EVIL-OPTION-PAYLOAD";
        // AD, CD, TC, Z set; an unknown option and a cookie; a huge UDP size;
        // DO; 0x20 spelling; trailing garbage.
        let flags = RD | 0x0020 | 0x0010 | 0x0200 | 0x0040;
        let bytes = [header(flags, [1, 0, 0, 1]), question(&[b"AlLoWeD", b"tEsT"], A, IN), opt(65535, 0, true, &[(65001, evil), (10, &[1; 8])]), b"TRAILING".to_vec()].concat();
        let Screened::Query(q) = screen_query(&bytes) else { panic!("refused") };
        assert_eq!(q.rule_name, "allowed.test");
        assert_eq!(q.edns, Some(GuestEdns { max_payload: 65535, dnssec_ok: true }));
        let out = reencode(&q).unwrap();
        assert!(!out.windows(evil.len()).any(|w| w == evil) && !out.windows(8).any(|w| w == b"TRAILING"));
        let expected = [header(RD, [1, 0, 0, 1]), question(&[b"AlLoWeD", b"tEsT"], A, IN), opt(UPSTREAM_UDP_PAYLOAD, 0, true, &[])].concat();
        assert_eq!(out, expected, "a fresh message: id, RD, the question as sent, our OPT");
        // No EDNS asked, none sent; a tiny size is raised to 512.
        let Screened::Query(plain) = screen_query(&query(ALLOWED, A)) else { panic!() };
        assert_eq!(reencode(&plain).unwrap(), query(ALLOWED, A));
        let small = [header(RD, [1, 0, 0, 1]), question(ALLOWED, A, IN), opt(100, 0, false, &[])].concat();
        let Screened::Query(small) = screen_query(&small) else { panic!() };
        assert_eq!(Message::from_vec(&reencode(&small).unwrap()).unwrap().max_payload(), 512);
        // Answers must be to our question.
        let mut answer = Message::from_vec(&reencode(&q).unwrap()).unwrap();
        answer.set_message_type(MessageType::Response);
        assert!(answers_query(&q, &answer));
        answer.queries_mut()[0].set_name(Name::from_ascii("denied.test.").unwrap());
        assert!(!answers_query(&q, &answer));
        answer.queries_mut().clear();
        assert!(answers_query(&q, &answer), "an error without a question");
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
    fn a_name_asked_again_changes_nothing_only_when_all_is_in_place() {
        let p = policy();
        let s = 1_000_000_000u64;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b) = (ip("198.51.100.5"), ip("198.51.100.6"));
        let now = 100 * s;
        let entry = |until: u64, names: &[&str], answered: u64| LearnedAddr {
            policy_id: 7,
            value: learned_value(&p, a, None, 1, None, until),
            names: names.iter().map(|n| n.to_string()).collect(),
            answered_ns: answered,
        };
        let mut t = std::collections::HashMap::new();
        t.insert(a, entry(now + 60 * s, &["allowed.test"], now - s / 2));
        let asked = |t: &std::collections::HashMap<IpAddr, LearnedAddr>, addrs: &[(IpAddr, u64)], policy_id: u32, port: Option<u16>, cap: usize| {
            answer_changes_nothing(Some(t), &p, policy_id, "allowed.test", addrs, 1, port, cap, now)
        };
        // Same name, an expiry within a second of the entry's, answered
        // half a second ago: nothing to do.
        assert!(asked(&t, &[(a, now + 60 * s)], 7, None, 0));
        assert!(asked(&t, &[(a, now + 60 * s + s / 2)], 7, None, 0));
        assert!(asked(&t, &[(a, now + 60 * s)], 7, None, 4), "within its cap");
        // The expiry moves on by a second or more: the trie is written.
        assert!(!asked(&t, &[(a, now + 61 * s)], 7, None, 0));
        // Open for any port already: a name with a port rule keeps it so.
        assert!(asked(&t, &[(a, now + 60 * s)], 7, Some(443), 0));
        // Another policy generation, an address not learned, no table for
        // the sandbox: written.
        assert!(!asked(&t, &[(a, now + 60 * s)], 8, None, 0));
        assert!(!asked(&t, &[(a, now + 60 * s), (b, now + 60 * s)], 7, None, 0));
        assert!(!answer_changes_nothing(None, &p, 7, "allowed.test", &[(a, now + 60 * s)], 1, None, 0, now));
        // Learned under another name only: this name is recorded.
        assert!(!answer_changes_nothing(Some(&t), &p, 7, "other.test", &[(a, now + 60 * s)], 1, None, 0, now));
        // Answered more than a second ago: recorded again (the cap's order).
        t.insert(a, entry(now + 60 * s, &["allowed.test"], now - 2 * s));
        assert!(!asked(&t, &[(a, now + 60 * s)], 7, None, 0));
        // About to expire (a TTL, minimum and grace of 0): written.
        t.insert(a, entry(now + s / 2, &["allowed.test"], now));
        assert!(!asked(&t, &[(a, now)], 7, None, 0));
        // Over its cap: the writer lock decides what to forget.
        t.insert(a, entry(now + 60 * s, &["allowed.test"], now));
        t.insert(b, entry(now + 60 * s, &["allowed.test"], now));
        assert!(asked(&t, &[(a, now + 60 * s)], 7, None, 2));
        assert!(!asked(&t, &[(a, now + 60 * s)], 7, None, 1));
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
        assert!(exceeds_cap(&t, "cdn.test", &current, 2) && !exceeds_cap(&t, "cdn.test", &current, 4) && !exceeds_cap(&t, "other.test", &current, 3));
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
