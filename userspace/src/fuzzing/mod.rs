//! Fuzz entry points: the body of every cargo-fuzz target in `fuzz/`, one
//! `pub fn <target>(data: &[u8])` each. They live in the library so the
//! targets stay three lines, and so `cargo test` replays every corpus
//! (`userspace/tests/fuzz_replay.rs`) with no nightly and no cargo-fuzz.
//!
//! Each function parses or decides with the product's own code and then
//! checks invariants: a violated invariant panics, which is what libFuzzer
//! reports as a crash. Inputs that do not parse are fine (that is most of
//! them); a panic inside the product's code is a crash like any other. The
//! invariants are documented on each function.
//!
//! [`frames`] needs root: it runs the real classifier (BPF_PROG_TEST_RUN)
//! against [`crate::fuzzing::model`].

pub mod model;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, OnceLock};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, PROXY_AUTHORIZATION};
use ipnetwork::IpNetwork;
use sbx_net_common::{action, program_names, rule_id, Reason, SandboxConfig, MAX_PORT_VERDICTS};

use crate::policy::compile::{brute_force_verdict, compile, entry_verdict, CompiledPolicy, PortInfo};
use crate::credentials::CredentialBinding;
use crate::proxy::inject::{remove_connection_named, rewrite_headers, strip_sentinels, HOP_BY_HOP};
use crate::datapath::{Datapath, DatapathOptions, EventReader};
use crate::dns::decide::{learned_value, name_verdict, normalise_query_name, plan_answer, AnswerRecord, NameVerdict, RecordFate};
use crate::proxy::peek::{classify, FirstBytes, PEEK_LIMIT};
use crate::policy::{builtin_deny_rules, Policy, Rule, Target};

/// A target's body.
pub type FuzzBody = fn(&[u8]);

/// Every target: its name (the directory of its corpus and the cargo-fuzz
/// target) and its body.
pub const TARGETS: &[(&str, FuzzBody)] = &[
    ("policy", policy),
    ("dns", dns),
    ("peek", peek),
    ("headers", headers),
    ("api", api),
    ("inspect", inspect),
    ("frames", frames),
    ("virtio", virtio),
    ("fleet", fleet),
    ("http_rules", http_rules),
    ("mcp", mcp),
    ("cni", cni),
    ("dns_cache", dns_cache),
    ("address_notifications", address_notifications),
];

/// Targets that need root (the rest are pure).
pub const PRIVILEGED_TARGETS: &[&str] = &["frames"];

/// The host addresses the fuzzed policies are compiled with (denied like
/// the built-in list).
fn host_addresses() -> [IpAddr; 2] {
    [IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)), IpAddr::V6(Ipv6Addr::new(0xfd73, 0x6278, 0, 0, 0, 0, 0, 1))]
}

/// A small deterministic generator, seeded from the input (libFuzzer
/// needs the same input to do the same thing).
struct Rng(u64);

impl Rng {
    fn from(data: &[u8]) -> Rng {
        // FNV-1a: any change of the input changes the stream.
        Rng(data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Policy text → parse → compile, against the brute-force reader.
///
/// Invariants:
/// - a rejected policy names a line of the text (or 0) and a reason;
/// - a compiled policy's rule table is the policy's rules, then the built-in
///   list, then the host addresses (so ids mean what `describe_rule` says);
/// - every trie entry is a canonical prefix, keys are unique, both families
///   have a /0 entry (the trie never misses), an entry carries at most
///   MAX_PORT_VERDICTS distinct port verdicts, no learned overlay;
/// - for sampled addresses (each CIDR rule's first and last address and its
///   neighbours outside, addresses inside, fixed probes such as the cloud
///   metadata address) and ports (every rule's port, others, none, a later
///   fragment), the compiled lookup — the datapath's one LPM lookup — gives
///   exactly the verdict and rule id of [`brute_force_verdict`].
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let policy = match Policy::parse("fuzz.toml", text) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.line <= text.lines().count() + 1, "error line {} past the end of a {}-line text: {e}", e.line, text.lines().count());
            assert!(!e.reason.is_empty(), "an error without a reason");
            return;
        }
    };
    let hosts = host_addresses();
    let Ok(compiled) = compile(&policy, &hosts) else { return };
    let mut rules = policy.rules.clone();
    rules.extend(builtin_deny_rules());
    rules.extend(hosts.iter().map(|a| Rule::builtin_deny(IpNetwork::from(*a), "host address")));
    assert_eq!(compiled.rules[..rules.len().min(compiled.rules.len())], rules[..], "the rule table is the policy's rules, the built-ins, the host addresses");
    assert!(compiled.rules[rules.len()..].iter().all(|r| r.origin == crate::policy::Origin::Exception), "then only derived exception entries");
    check_entries(&compiled);

    let mut rng = Rng::from(data);
    let mut addresses: Vec<IpAddr> = ["169.254.169.254", "8.8.8.8", "10.200.0.1", "127.0.0.1", "::1", "2001:db8::1", "::ffff:127.0.0.1", "fe80::1"]
        .iter()
        .map(|a| a.parse().expect("valid probe"))
        .collect();
    for rule in rules.iter().take(64) {
        let Target::Cidr(net) = rule.target else { continue };
        match net {
            IpNetwork::V4(n) => {
                let (first, last) = (u32::from(n.network()), u32::from(n.broadcast()));
                let inside = first | (rng.next() as u32 & !u32::from(n.mask()));
                for a in [first, last, first.wrapping_sub(1), last.wrapping_add(1), inside] {
                    addresses.push(IpAddr::V4(a.into()));
                }
            }
            IpNetwork::V6(n) => {
                let host_bits = if n.prefix() == 0 { u128::MAX } else { (1u128 << (128 - n.prefix())).wrapping_sub(1) };
                let first = u128::from(n.network());
                let last = first | host_bits;
                let inside = first | ((u128::from(rng.next()) << 64 | u128::from(rng.next())) & host_bits);
                for a in [first, last, first.wrapping_sub(1), last.wrapping_add(1), inside] {
                    addresses.push(IpAddr::V6(a.into()));
                }
            }
        }
    }
    let mut ports: BTreeSet<u16> = rules.iter().filter_map(|r| r.port).take(16).collect();
    ports.extend([1, 443, (rng.next() as u16).max(1)]);
    let port_infos: Vec<PortInfo> =
        ports.into_iter().map(PortInfo::Port).chain([PortInfo::None, PortInfo::NonFirstFragment]).collect();
    for ip in addresses {
        for &port in &port_infos {
            let got = compiled.lookup(ip, port);
            let want = brute_force_verdict(&compiled.rules, policy.default, policy.mode, ip, port);
            assert_eq!(
                got,
                want,
                "{ip} {port:?}: compiled {} ({}), rules say {} ({})",
                got.action,
                compiled.describe_rule(got.rule_id),
                want.action,
                compiled.describe_rule(want.rule_id)
            );
        }
    }
}

fn check_entries(c: &CompiledPolicy) {
    let mut keys = BTreeSet::new();
    let entries = c
        .v4
        .iter()
        .map(|(a, len, v)| (IpNetwork::new(IpAddr::V4(*a), *len), v))
        .chain(c.v6.iter().map(|(a, len, v)| (IpNetwork::new(IpAddr::V6(*a), *len), v)));
    for (net, value) in entries {
        let net = net.expect("an entry's prefix length fits its family");
        assert_eq!(net.network(), net.ip(), "entry {net} has host bits set");
        assert!(keys.insert(net), "two entries for {net}");
        assert!(matches!(value.any_port.action, action::ALLOW | action::DENY | action::AUDIT), "{net}: action {}", value.any_port.action);
        let count = usize::from(value.port_count);
        assert!(count <= MAX_PORT_VERDICTS, "{net}: {count} port verdicts");
        let ports: BTreeSet<u16> = value.ports[..count].iter().map(|p| p.port).collect();
        assert_eq!(ports.len(), count, "{net}: a port twice");
        assert!(!ports.contains(&0), "{net}: port 0");
        assert_eq!((value.learned_until_ns, value.learned_rule_id, value.learned_port), (0, 0, 0), "{net}: a compiled entry with a learned overlay");
    }
    assert!(keys.contains(&"0.0.0.0/0".parse().expect("valid")) && keys.contains(&"::/0".parse().expect("valid")), "no /0 entry");
}

/// The policy the DNS target answers for: names allowed, denied and
/// port-limited, CIDR allows and denies, the built-ins and a host address.
const DNS_POLICY: &str = r#"
name = "fuzz-dns"
[network]
allow = ["allowed.test", "*.one.test", "**.any.test", "git.test:22", "cname.test", "203.0.113.128/25", "10.1.0.0/16", "172.16.5.0/24", "[2001:db8:1::/48]:443"]
deny = ["bad.any.test", "10.0.0.0/8", "198.51.100.0/24", "203.0.113.200:25"]
"#;

fn dns_policy() -> &'static CompiledPolicy {
    static POLICY: OnceLock<CompiledPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let policy = Policy::parse("fuzz-dns.toml", DNS_POLICY).expect("the DNS fuzz policy is valid");
        compile(&policy, &host_addresses()).expect("the DNS fuzz policy compiles")
    })
}

/// A DNS message, as the guest's query and as the upstream's answer.
///
/// Invariants, as a query ([`crate::dns::decide::screen_query`]):
/// - an understood query has a normalised rule name; the query the proxy
///   sends upstream for it parses, asks exactly that question with the
///   guest's id, and screens as the same query; its refusals (REFUSED,
///   NXDOMAIN, SERVFAIL) encode with the guest's id and that rcode;
/// - anything else is dropped, or answered with a response (QR set) that
///   carries the guest's id.
///
/// As an answer ([`plan_answer`] of its records for its question):
/// - one fate per record; only address records are stripped, unless the
///   whole answer is refused (then every record is, and nothing is learned);
/// - an allowed answer's alias chain starts at the question, which the
///   policy allows, and holds no name a deny rule names;
/// - each address is learned once, only from a kept A/AAAA record whose
///   owner is on the chain; never an address a policy rule or the built-in
///   list denies — read rule by rule with [`brute_force_verdict`], not from
///   the trie the plan used — nor an IPv4-compatible address, nor an
///   IPv4-mapped one whose IPv4 address is denied;
/// - a learned address's trie value keeps what its covering entry says for
///   any port, keeps every port deny (a learned allow never beats it), and
///   once expired says exactly what the covering entry says;
/// - the answer re-encoded without the stripped records holds exactly the
///   kept ones.
pub fn dns(data: &[u8]) {
    use crate::dns::decide::{refusal, reencode, screen_query, ChainVerdict, Screened};
    let policy = dns_policy();

    // The guest's side.
    match screen_query(data) {
        Screened::Query(q) => {
            assert_eq!(q.rule_name, normalise_query_name(&q.rule_name), "a rule name that is not normalised");
            let upstream = reencode(&q).unwrap_or_else(|| panic!("no upstream query for an understood query: {q:?}"));
            let m = Message::from_vec(&upstream).unwrap_or_else(|e| panic!("our upstream query does not parse: {e}"));
            assert_eq!((m.id(), m.message_type(), m.queries().len(), m.answers().len()), (q.id, MessageType::Query, 1, 0), "the upstream query");
            match screen_query(&upstream) {
                Screened::Query(again) => assert_eq!((again.id, &again.rule_name, again.qtype), (q.id, &q.rule_name, q.qtype), "the upstream query screens differently"),
                other => panic!("our own upstream query is refused: {other:?}"),
            }
            for code in [ResponseCode::Refused, ResponseCode::NXDomain, ResponseCode::ServFail] {
                let bytes = refusal(&q, code).unwrap_or_else(|| panic!("no {code} reply to {q:?}"));
                let back = Message::from_vec(&bytes).unwrap_or_else(|e| panic!("our {code} reply does not parse: {e}"));
                assert_eq!((back.id(), back.message_type(), back.response_code()), (q.id, MessageType::Response, code));
            }
        }
        Screened::Refused { reply: Some(reply), .. } => {
            assert!(reply.len() >= 12 && reply[..2] == data[..2], "a reply without the guest's id");
            assert!(reply[2] & 0x80 != 0, "a reply that is not a response");
        }
        Screened::Refused { reply: None, .. } => {}
    }

    // The upstream's side.
    let Ok(message) = Message::from_vec(data) else { return };
    let qname = message.queries().first().and_then(|q| crate::dns::decide::checked(q.name()).ok()).unwrap_or_else(|| "allowed.test".into());
    let records: Vec<AnswerRecord> = message.answers().iter().map(crate::dns::server::answer_record).collect();
    let plan = plan_answer(policy, &qname, &records);
    assert_eq!(plan.fates.len(), records.len(), "one fate per record");
    let (rule, port) = match &plan.verdict {
        ChainVerdict::Allowed { rule_id, port } => (*rule_id, *port),
        refused => {
            assert!(plan.learn.is_empty(), "a refused answer ({refused:?}) learns {:?}", plan.learn);
            assert!(plan.fates.iter().all(|f| *f != RecordFate::Keep), "a refused answer ({refused:?}) keeps a record");
            return;
        }
    };
    assert_eq!(plan.chain.first(), Some(&normalise_query_name(&qname)), "the chain does not start at the question");
    assert!(matches!(name_verdict(policy, &plan.chain[0]), NameVerdict::Allowed { .. }), "an allowed answer to a question the policy denies");
    for name in &plan.chain[1..] {
        if let NameVerdict::Denied { rule_id } = name_verdict(policy, name) {
            assert_eq!(rule_id, rule_id::DEFAULT, "{name} on the chain is denied by {}", policy.describe_rule(rule_id));
        }
    }
    let mut kept_addresses = BTreeSet::new();
    for (record, fate) in records.iter().zip(&plan.fates) {
        match (record, fate) {
            (AnswerRecord::Address { ip, .. }, RecordFate::Keep) => {
                kept_addresses.insert(*ip);
            }
            (AnswerRecord::Address { .. }, RecordFate::Strip { .. }) | (_, RecordFate::Keep) => {}
            (other, RecordFate::Strip { reason }) => panic!("stripped a record that is not an address: {other:?} ({reason})"),
        }
    }
    let learned: BTreeSet<IpAddr> = plan.learn.iter().map(|(ip, _)| *ip).collect();
    assert_eq!(learned.len(), plan.learn.len(), "an address learned twice: {:?}", plan.learn);
    assert_eq!(learned, kept_addresses, "learned and kept addresses differ");
    let denied_by_rules = |ip: IpAddr| {
        let v = brute_force_verdict(&policy.rules, policy.default_action, policy.mode, ip, PortInfo::None);
        (v.action == action::DENY && v.rule_id != rule_id::DEFAULT).then(|| policy.describe_rule(v.rule_id))
    };
    for (ip, ttl) in &plan.learn {
        let from_chain = records.iter().any(|r| matches!(r, AnswerRecord::Address { owner: Ok(owner), ip: a, ttl: t } if a == ip && t == ttl && plan.chain.contains(owner)));
        assert!(from_chain, "{ip} (ttl {ttl}) learned from no record on the alias chain of {qname}");
        if let Some(rule) = denied_by_rules(*ip) {
            panic!("{ip} learned although {rule} denies it");
        }
        if let IpAddr::V6(v6) = ip {
            let bits = u128::from(*v6);
            assert!(bits >> 32 != 0, "{ip} learned: IPv4-compatible");
            if bits >> 32 == 0xffff {
                let v4 = IpAddr::V4(Ipv4Addr::from(bits as u32));
                assert!(denied_by_rules(v4).is_none(), "{ip} learned although it maps {v4}, which a rule denies");
            }
        }
        check_learned_value(policy, *ip, rule, port);
    }

    // What the guest receives when records were stripped.
    if plan.fates.iter().any(|f| *f != RecordFate::Keep) {
        let mut stripped = message.clone();
        let kept: Vec<_> = stripped.take_answers().into_iter().zip(&plan.fates).filter(|(_, f)| **f == RecordFate::Keep).map(|(r, _)| r).collect();
        stripped.insert_answers(kept);
        if let Ok(bytes) = stripped.to_vec() {
            let back = Message::from_vec(&bytes).expect("our stripped answer parses");
            let got: Vec<AnswerRecord> = back.answers().iter().map(crate::dns::server::answer_record).collect();
            let want: Vec<AnswerRecord> = records.iter().zip(&plan.fates).filter(|(_, f)| **f == RecordFate::Keep).map(|(r, _)| r.clone()).collect();
            assert_eq!(got, want, "the guest's answer is not the kept records");
        }
    }
}

fn check_learned_value(policy: &CompiledPolicy, ip: IpAddr, rule: u32, port: Option<u16>) {
    const UNTIL: u64 = 1_000;
    let value = learned_value(policy, ip, None, rule, port, UNTIL);
    let base = policy.entry_for(ip).copied().unwrap_or_default();
    assert_eq!(value.any_port, base.any_port, "{ip}: the learned value changed the any-port verdict");
    assert_eq!(value.ports, base.ports, "{ip}: the learned value changed the port verdicts");
    let mut probe_ports: Vec<u16> = base.ports[..usize::from(base.port_count)].iter().map(|p| p.port).collect();
    probe_ports.extend([22, 25, 443, 853]);
    for p in probe_ports {
        let live = entry_verdict(&value, PortInfo::Port(p), UNTIL - 1);
        let expired = entry_verdict(&value, PortInfo::Port(p), UNTIL);
        let covering = entry_verdict(&base, PortInfo::Port(p), 0);
        let port_denied = base.ports[..usize::from(base.port_count)].iter().any(|pv| pv.port == p && pv.action == action::DENY);
        if port_denied {
            assert_eq!(live.action, action::DENY, "{ip}:{p}: a learned allow beat a port deny");
        }
        assert_eq!(expired, covering, "{ip}:{p}: expired, the entry must say what its covering entry says");
    }
}

/// The first bytes of a proxied connection: TLS ClientHello SNI or HTTP Host.
///
/// Invariants:
/// - classify never panics and never reads out of bounds;
/// - a name it returns has no ASCII upper case and no trailing dot (the
///   form the policy matches);
/// - a decision is final: for every prefix shorter than PEEK_LIMIT (the
///   proxy stops reading there), classify is NeedMore or says exactly what
///   it says for the whole input, so the name the proxy decides on is the
///   name the upstream will see;
/// - the empty input needs more.
pub fn peek(data: &[u8]) {
    assert_eq!(classify(&[]), FirstBytes::NeedMore);
    let whole = classify(data);
    let name = match &whole {
        FirstBytes::Tls { sni } => sni.as_deref(),
        FirstBytes::Http { host } => host.as_deref(),
        _ => None,
    };
    if let Some(n) = name {
        assert!(!n.bytes().any(|b| b.is_ascii_uppercase()), "name {n:?} has upper case");
        assert!(!n.ends_with('.'), "name {n:?} ends with a dot");
    }
    // Every cut for short inputs, a sample of cuts for long ones.
    let cuts: Vec<usize> = if data.len() <= 512 {
        (0..data.len()).collect()
    } else {
        let mut rng = Rng::from(data);
        (0..64).map(|_| rng.next() as usize % data.len()).collect()
    };
    for cut in cuts.into_iter().filter(|&c| c < PEEK_LIMIT) {
        let early = classify(&data[..cut]);
        assert!(early == FirstBytes::NeedMore || early == whole, "{cut} bytes say {early:?}, all {} say {whole:?}", data.len());
    }
}

/// A secret no input is likely to contain by chance, from a file like a
/// real deployment's (the only way to make a [`crate::credentials::secrets::Secret`]).
const FUZZ_SECRET: &str = "fz-S3cr3t-7c1e9a";

fn bindings() -> &'static [CredentialBinding] {
    static BINDINGS: OnceLock<Vec<CredentialBinding>> = OnceLock::new();
    BINDINGS.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("sbx-net-fuzz-secret-{}", std::process::id()));
        std::fs::write(&path, format!("{FUZZ_SECRET}\n")).expect("writing the fuzz secret");
        let secret = crate::credentials::secrets::load_secret(&crate::policy::CredentialSource::File(path.display().to_string()));
        let _ = std::fs::remove_file(&path);
        let secret = Arc::new(secret.expect("loading the fuzz secret"));
        [("gh", "Authorization", "Bearer {secret}"), ("key", "X-Api-Key", "{secret}"), ("cookie", "Cookie", "session={secret}; theme=dark"), ("proxy", "Proxy-Authorization", "Basic {secret}")]
            .iter()
            .map(|(name, header, format)| CredentialBinding::new(name, &["api.test".into()], header, format, secret.clone(), false).expect("valid binding"))
            .collect()
    })
}

/// Whether a header value carries a credential sentinel: `sbx-cred:` in
/// any case, or with its colon percent-encoded (what the proxy documents).
fn has_sentinel(value: &[u8]) -> bool {
    [b"sbx-cred:".as_slice(), b"sbx-cred%3a"].iter().any(|p| value.windows(p.len()).any(|w| w.eq_ignore_ascii_case(p)))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The guest's request headers (`name: value` lines after a selector byte
/// that picks the credential and the path), with what their `Connection`
/// names taken out first as a request arrives (or not: another selector
/// bit), through the credential proxy's rewrite (a bound host) or its
/// sentinel strip (any other host); then the same bytes as a response body
/// through the credential's scrubber.
///
/// After `remove_connection_named`: a header a `Connection` value names (a
/// comma-separated token, any case) is gone, unless it is one of the fixed
/// hop-by-hop ones or Host (taken care of elsewhere); every other header
/// keeps exactly its values, in order.
///
/// Invariants, after `rewrite_headers` (of the headers left):
/// - the binding's header carries exactly one value, the configured one;
/// - no other Authorization or Proxy-Authorization value survives;
/// - no value carries a sentinel (the secret goes only in its own header);
/// - the secret appears in no other header unless the guest sent it there;
/// - Accept-Encoding is `identity` alone, Range and If-Range are gone (the
///   scrubber can only check an identity body of the whole representation);
/// - every other header keeps exactly its values without a sentinel, in order.
///
/// After `strip_sentinels`: no value carries a sentinel and every header
/// keeps exactly its values without one, in order.
///
/// The scrubber (fed the bytes in chunks whose sizes come from the input):
/// the same bytes as scrubbing them in one piece, the same length (a
/// Content-Length stays true), and no raw secret and no match left; its
/// fast first look (the anchors) says what the automaton says.
pub fn headers(data: &[u8]) {
    use hyper::header::{ACCEPT_ENCODING, IF_RANGE, RANGE};
    let Some((&selector, rest)) = data.split_first() else { return };
    let mut original = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = &value[value.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(value.len())..];
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            original.append(name, value);
        }
    }
    let binding = &bindings()[usize::from(selector & 3) % bindings().len()];
    let values = |h: &HeaderMap, n: &HeaderName| -> Vec<HeaderValue> { h.get_all(n).iter().cloned().collect() };
    if selector & 8 != 0 {
        let named = |n: &HeaderName| {
            // A value that is not visible ASCII names nothing.
            original.get_all(hyper::header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(n.as_str())))
        };
        let mut left = original.clone();
        remove_connection_named(&mut left);
        for name in original.keys() {
            let goes = named(name) && !HOP_BY_HOP.contains(&name.as_str()) && *name != hyper::header::HOST;
            assert_eq!(values(&left, name), if goes { Vec::new() } else { values(&original, name) }, "{name} after the Connection-named headers went");
        }
        assert!(left.keys().all(|n| original.contains_key(n)), "a header appeared");
        original = left;
    }
    let original = original;
    let clean = |n: &HeaderName| -> Vec<HeaderValue> { original.get_all(n).iter().filter(|v| !has_sentinel(v.as_bytes())).cloned().collect() };
    let secret = FUZZ_SECRET.as_bytes();

    let mut h = original.clone();
    if selector & 4 == 0 {
        rewrite_headers(&mut h, binding);
        assert_eq!(values(&h, &binding.header), vec![binding.value.clone()], "the binding's header must hold exactly its value");
        for role in [AUTHORIZATION, PROXY_AUTHORIZATION] {
            if role != binding.header {
                assert!(h.get(&role).is_none(), "a guest's {role} survived the rewrite");
            }
        }
        assert_eq!(values(&h, &ACCEPT_ENCODING), vec![HeaderValue::from_static("identity")], "Accept-Encoding");
        assert!(h.get(RANGE).is_none() && h.get(IF_RANGE).is_none(), "a range request survived");
        for (name, value) in &h {
            assert!(!has_sentinel(value.as_bytes()), "{name} still carries a sentinel");
            if contains(value.as_bytes(), secret) && *name != binding.header {
                assert!(original.get_all(name).iter().any(|v| contains(v.as_bytes(), secret)), "the secret reached {name}");
            }
        }
        let managed = [binding.header.clone(), AUTHORIZATION, PROXY_AUTHORIZATION, ACCEPT_ENCODING, RANGE, IF_RANGE];
        for name in original.keys().filter(|n| !managed.contains(n)) {
            assert_eq!(values(&h, name), clean(name), "{name}: not exactly its values without a sentinel");
        }
    } else {
        strip_sentinels(&mut h);
        assert!(h.iter().all(|(_, v)| !has_sentinel(v.as_bytes())), "a sentinel survived the strip");
        assert_eq!(h.len(), original.iter().filter(|(_, v)| !has_sentinel(v.as_bytes())).count(), "the strip added or lost values");
        for name in original.keys() {
            assert_eq!(values(&h, name), clean(name), "{name}: not exactly its values without a sentinel");
        }
    }

    // The response side: the same bytes from the upstream, through the
    // streaming scrubber in chunks of 1 to 40 bytes.
    let patterns = &binding.scrub;
    assert_eq!(patterns.is_match(rest), patterns.is_match_by_automaton(rest), "the anchors' first look and the automaton differ");
    let (whole, _) = patterns.scrub(rest);
    let mut scrubber = patterns.scrubber();
    let mut streamed = Vec::with_capacity(rest.len());
    let mut rng = Rng::from(data);
    let mut at = 0;
    while at < rest.len() {
        let end = (at + 1 + rng.next() as usize % 40).min(rest.len());
        streamed.extend_from_slice(&scrubber.push(&rest[at..end]));
        at = end;
    }
    streamed.extend(scrubber.finish());
    assert_eq!(streamed.len(), rest.len(), "the scrubber changed the length");
    assert!(streamed == whole, "scrubbing in chunks and in one piece differ");
    assert!(!contains(&streamed, secret), "the secret went back to the guest");
    assert!(!patterns.is_match(&streamed), "a form of the secret went back to the guest");
}

/// One line of the control socket, as the daemon's server reads it.
///
/// Invariants:
/// - a request line the server accepts serializes and parses back to the
///   same request (what the CLI sends is what the daemon reads);
/// - the server's answer to a bad line is one line of JSON (the protocol
///   is line-delimited) that the client reads back as that error;
/// - the request's free-form parts go through their parsers without a
///   panic: a `policy test` destination (a name comes back normalised) and
///   a `policy apply` text (its errors name the CLI's source path);
/// - a response line the client accepts round-trips as well, and so does a
///   request of the data plane's protocol, in both forms of its trie
///   values (compact, and spelled out for an older data plane).
pub fn api(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else { return };
    // The data plane's requests (a root-only socket, but still a parser):
    // what parses goes back on one line and parses again.
    // Both forms of trie values (compact, and spelled out for an older
    // data plane) read back as the same request.
    if let Ok(request) = serde_json::from_str::<crate::control::dataplane::PlaneRequest>(line) {
        let wire = serde_json::to_string(&request).expect("data plane requests serialize");
        assert!(!wire.contains('\n'), "a data plane request serialized over two lines");
        let again = serde_json::from_str::<crate::control::dataplane::PlaneRequest>(&wire).unwrap_or_else(|e| panic!("a data plane request does not round-trip ({e}): {wire}"));
        let value = |r: &crate::control::dataplane::PlaneRequest| serde_json::to_value(r).expect("serializes");
        assert_eq!(value(&again), value(&request), "a data plane request changed on its way back");
        let spelled = crate::policy::wire::spelled_out(|| serde_json::to_string(&request)).expect("data plane requests serialize");
        let read = serde_json::from_str::<crate::control::dataplane::PlaneRequest>(&spelled).unwrap_or_else(|e| panic!("a request spelled out does not read back ({e}): {spelled}"));
        assert_eq!(value(&read), value(&request), "a request spelled out reads back as another");
    }
    match crate::control::server::parse_request(line) {
        Ok(request) => {
            let wire = serde_json::to_string(&request).expect("requests serialize");
            assert!(!wire.contains('\n'), "a request serialized over two lines");
            assert_eq!(crate::control::server::parse_request(&wire).ok(), Some(request.clone()), "a request does not round-trip: {wire}");
            match &request {
                crate::control::api::Request::PolicyTest { destination, .. } => {
                    if let Ok((crate::policy::explain::Destination::Name(name), _)) = crate::policy::explain::parse_destination(destination) {
                        assert_eq!(crate::policy::normalise_name(&name).as_deref(), Ok(name.as_str()), "destination name not normalised");
                    }
                }
                crate::control::api::Request::PolicyApply { source, text } => {
                    if let Err(e) = Policy::parse(source, text) {
                        assert_eq!(&e.file, source, "a policy error names another file");
                    }
                }
                _ => {}
            }
        }
        Err(response) => {
            let wire = serde_json::to_string(&response).expect("responses serialize");
            assert!(!wire.contains('\n'), "an error response over two lines");
            let back: crate::control::api::Response = serde_json::from_str(&wire).expect("the client reads our error response");
            assert_eq!(back, response);
        }
    }
    if let Ok(response) = serde_json::from_str::<crate::control::api::Response>(line) {
        let wire = serde_json::to_string(&response).expect("responses serialize");
        let back: crate::control::api::Response = serde_json::from_str(&wire).expect("a response round-trips");
        let same = match (&response, &back) {
            (crate::control::api::Response::Ok(a), crate::control::api::Response::Ok(b)) => json_close(a, b),
            (a, b) => a == b,
        };
        assert!(same, "a response does not round-trip: {response:?} came back as {back:?}");
    }
}

/// Equal JSON, numbers within 1e-12 relative: serde_json (without its
/// `float_roundtrip` feature) may read a float one ulp off what it wrote,
/// which the `api` target found (`fuzz/regressions/api/`); a status value
/// shown that far off is not a bug.
fn json_close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_close(x, y)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w))),
        _ => a == b,
    }
}

/// Lines of an `inspect --input` file (the audit log, `-o json` output, a
/// saved daemon stream).
///
/// Invariants, per line the parser accepts as a record:
/// - the compact renderer (with and without colour) and the JSON renderer
///   never panic, and the compact line is one line;
/// - the JSON rendering parses back to the same record (what `-o json`
///   prints, `--input` reads);
/// - every filter criterion, built from the record's own fields (names as
///   globs, addresses, ports, protocol), evaluates without a panic, and a
///   record matches a filter on its own sandbox, verdict and ports.
pub fn inspect(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let Ok(crate::cli::inspect::InputLine::Record(record)) = crate::cli::inspect::parse_input_line(line) else { continue };
        for color in [false, true] {
            let shown = crate::observe::record::compact(&record, color);
            assert!(!shown.contains('\n') || record_has_newline(&record), "a compact line broke over lines: {shown:?}");
        }
        // The renderer slices the time text: give it the line itself too,
        // arbitrary text of arbitrary length (a record with a non-ASCII time
        // once panicked `inspect --input`; see fuzz/regressions/inspect/).
        let mut odd = (*record).clone();
        odd.time = line.to_string();
        let _ = crate::observe::record::compact(&odd, false);
        let json = serde_json::to_string(&record).expect("records serialize");
        let back = crate::cli::inspect::parse_input_line(&json).unwrap_or_else(|e| panic!("-o json output does not read back: {e}: {json}"));
        assert_eq!(back, crate::cli::inspect::InputLine::Record(record.clone()), "a record does not round-trip through -o json");

        use crate::observe::filter::{Criterion, Filter};
        let mut own = vec![(false, Criterion::Sandbox(record.sandbox.clone())), (false, Criterion::Verdict(record.verdict))];
        if record.dst_port != 0 {
            own.push((false, Criterion::Port(record.dst_port)));
        }
        assert!(Filter { criteria: own, since_unix_ns: None }.matches(&record), "a record does not match its own sandbox, verdict and port");
        let mut criteria: Vec<(bool, Criterion)> = record.names().map(|n| (false, Criterion::Domain(n.to_string()))).collect();
        criteria.extend(record.src_ip.iter().chain(record.dst_ip.iter()).map(|ip| (true, Criterion::Ip(IpNetwork::from(*ip)))));
        criteria.push((false, Criterion::Protocol(record.protocol.to_string())));
        criteria.push((true, Criterion::Protocol("dns".into())));
        let _ = Filter { criteria, since_unix_ns: Some(record.time_unix_ns) }.matches(&record);
    }
}

/// Free text (names, rules, paths) may hold a newline; the compact line then
/// shows it as given.
fn record_has_newline(r: &crate::observe::record::FlowRecord) -> bool {
    serde_json::to_string(r).unwrap_or_default().contains("\\n")
}

/// BPF_PROG_TEST_RUN's `lo`: a test run without a device runs on it.
const LO_IFINDEX: u32 = 1;
/// Longest frame fed to the kernel (BPF_PROG_TEST_RUN takes about a page).
pub const MAX_FRAME: usize = 2048;

/// Selector bits: the first byte of a `frames` input, the frame follows.
pub mod frame_selector {
    /// The sandbox has nftables redirects (DNS and proxied TCP ports).
    pub const REDIRECTS: u8 = 1;
    /// The default-allow policy instead of the default-deny one.
    pub const POLICY_B: u8 = 2;
    /// Keep the frame's source MAC and IP as given (else they are set to
    /// the guest's, so most mutations get past anti-spoofing).
    pub const RAW_SOURCE: u8 = 4;
    /// No sandbox on the tap.
    pub const NO_SANDBOX: u8 = 8;
}

/// The default-deny policy of the frame fuzzer: nested allows and denies in
/// both families, port rules, an explicit allow into a built-in range.
pub const FRAME_POLICY_A: &str = r#"
name = "frames-a"
[network]
default = "deny"
allow = ["198.51.100.0/24", "203.0.113.7:443", "203.0.113.7:53", "203.0.113.8:80", "2001:db8:100::/48", "[2001:db8:200::7]:443", "10.1.0.0/16"]
deny = ["198.51.100.16/28", "198.51.100.9:25", "2001:db8:100:10::/64"]
"#;

/// The default-allow policy: denies carve out of it.
pub const FRAME_POLICY_B: &str = r#"
name = "frames-b"
[network]
default = "allow"
allow = ["[2001:db8:300::/48]:22", "169.254.169.0/24:8080"]
deny = ["192.0.2.0/24", "2001:db8:400::/48", "203.0.113.9:443", "198.51.100.0/24:53"]
"#;

/// Ports the frame fuzzer's sandbox has redirected to the credential proxy.
pub const FRAME_PROXIED_PORTS: [u16; 3] = [80, 443, 8080];

/// What one frame did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Kernel and model agree on this reason.
    Agreed(Reason),
    /// BPF_PROG_TEST_RUN refused the frame (too short for its IP header,
    /// too long): nothing to compare.
    Refused,
}

/// The kernel and the model disagree about a frame.
#[derive(Debug)]
pub struct Disagreement {
    pub input: Vec<u8>,
    pub frame: Vec<u8>,
    pub model: (Reason, u32),
    pub kernel_code: i32,
    pub kernel_reason: Option<Reason>,
    pub kernel_event: Option<(Option<Reason>, u32)>,
    pub what: String,
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        write!(
            f,
            "kernel and model disagree ({}): selector {:#04x}, frame {}\n  model: {:?} rule {}\n  kernel: return {}, counted as {:?}, drop event {:?}",
            self.what,
            self.input.first().copied().unwrap_or(0),
            hex(&self.frame),
            self.model.0,
            self.model.1,
            self.kernel_code,
            self.kernel_reason,
            self.kernel_event
        )
    }
}

/// The real classifier, loaded in a network namespace of its own, with one
/// sandbox on `lo` and two policy generations, next to the model.
pub struct FrameHarness {
    datapath: Datapath,
    events: EventReader,
    pub spec: crate::sandbox::SandboxSpec,
    policies: [CompiledPolicy; 2],
    installed: Option<SandboxConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("entering a network namespace of our own: {0} (the frame fuzzer needs root)")]
    Netns(std::io::Error),
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
    #[error("frame fuzzer setup: {0}")]
    Setup(String),
}

impl FrameHarness {
    /// Moves the calling thread into a new, unnamed network namespace (it
    /// goes away with the thread's process: nothing to clean up, even when
    /// libFuzzer exits on a crash) and loads the datapath there.
    pub fn new() -> Result<FrameHarness, HarnessError> {
        // SAFETY: unshare(CLONE_NEWNET) takes no pointers; it changes only
        // the calling thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(HarnessError::Netns(std::io::Error::last_os_error()));
        }
        let mut datapath = Datapath::load(&DatapathOptions { policy_capacity: 4096, flow_capacity: 1024, ..Default::default() })?;
        let events = datapath.take_events()?;
        let spec = crate::sandbox::SandboxSpec::new(7, "fuzz", &crate::sandbox::AddressPools::default()).map_err(|e| HarnessError::Setup(e.to_string()))?;
        let hosts = spec.host_addresses();
        let compile_text = |name: &str, text: &str| -> Result<CompiledPolicy, HarnessError> {
            let policy = Policy::parse(name, text).map_err(|e| HarnessError::Setup(e.to_string()))?;
            compile(&policy, &hosts).map_err(|e| HarnessError::Setup(e.to_string()))
        };
        let policies = [compile_text("frames-a.toml", FRAME_POLICY_A)?, compile_text("frames-b.toml", FRAME_POLICY_B)?];
        for (i, p) in policies.iter().enumerate() {
            datapath.write_policy(i as u32 + 1, p)?;
        }
        Ok(FrameHarness { datapath, events, spec, policies, installed: None })
    }

    /// The config the selector asks for (None: no sandbox on the tap) and
    /// the policy its generation holds.
    fn config(&self, selector: u8) -> (Option<SandboxConfig>, &CompiledPolicy) {
        use frame_selector::*;
        let which = usize::from(selector & POLICY_B != 0);
        let policy = &self.policies[which];
        if selector & NO_SANDBOX != 0 {
            return (None, policy);
        }
        let flags = if selector & REDIRECTS != 0 { sbx_net_common::sandbox_flags::REDIRECTS } else { 0 };
        (Some(self.spec.datapath_config(policy, which as u32 + 1, flags, &FRAME_PROXIED_PORTS)), policy)
    }

    /// The frame a `frames` input stands for: the bytes after the selector,
    /// at most MAX_FRAME of them, with the guest's source MAC and IP unless
    /// the selector keeps them (an IPv6 source that is the guest's
    /// link-local or unspecified address is kept too).
    pub fn frame_of(&self, input: &[u8]) -> Vec<u8> {
        let Some((&selector, rest)) = input.split_first() else { return Vec::new() };
        let mut frame = rest[..rest.len().min(MAX_FRAME)].to_vec();
        if selector & frame_selector::RAW_SOURCE == 0 && frame.len() >= 14 {
            frame[6..12].copy_from_slice(&self.spec.guest_mac);
            match [frame[12], frame[13]] {
                [0x08, 0x00] if frame.len() >= 30 => frame[26..30].copy_from_slice(&self.spec.guest_ipv4.octets()),
                [0x86, 0xdd] if frame.len() >= 38 => {
                    let ll = crate::sandbox::eui64_link_local(self.spec.guest_mac).octets();
                    if frame[22..38] != ll && frame[22..38] != [0; 16] {
                        frame[22..38].copy_from_slice(&self.spec.guest_ipv6.octets());
                    }
                }
                _ => {}
            }
        }
        frame
    }

    /// Runs one input (selector byte, then the frame) through the kernel
    /// and the model and compares: the return code, the reason the kernel
    /// counted, and for a drop the reason and rule of its drop event.
    pub fn check(&mut self, input: &[u8]) -> Result<FrameOutcome, Box<Disagreement>> {
        let Some(&selector) = input.first() else { return Ok(FrameOutcome::Refused) };
        let frame = self.frame_of(input);
        let (cfg, _) = self.config(selector);
        let want = cfg.unwrap_or_default();
        if self.installed != Some(want) {
            self.datapath.write_config(LO_IFINDEX, &want).unwrap_or_else(|e| panic!("writing the sandbox config: {e}"));
            self.installed = Some(want);
        }
        let (cfg, policy) = self.config(selector);
        let model = crate::fuzzing::model::classify(&frame, cfg.as_ref(), policy);

        let before = self.datapath.counters().unwrap_or_else(|e| panic!("reading counters: {e}"));
        let Ok((code, _)) = self.datapath.test_run(program_names::EGRESS, &frame, LO_IFINDEX, 1) else {
            self.events.drain();
            return Ok(FrameOutcome::Refused);
        };
        let after = self.datapath.counters().unwrap_or_else(|e| panic!("reading counters: {e}"));
        let counted: Vec<usize> = (0..Reason::ALL.len()).filter(|&i| after[i].packets != before[i].packets).collect();
        let kernel_reason = match counted.as_slice() {
            [one] => Reason::from_u8(*one as u8),
            _ => None,
        };
        let events = self.events.drain();
        let kernel_event = events.first().map(|e| (Reason::from_u8(e.reason), e.rule_id));
        let disagree = |what: String| {
            Err(Box::new(Disagreement { input: input.to_vec(), frame: frame.clone(), model, kernel_code: code, kernel_reason, kernel_event, what }))
        };
        let passes = model.0.passes();
        if code != if passes { 0 } else { 2 } {
            return disagree("verdict".into());
        }
        if kernel_reason != Some(model.0) {
            return disagree(format!("counted reason (slots {counted:?})"));
        }
        match (passes, events.len()) {
            (true, 0) => {}
            (false, 1) if kernel_event == Some((Some(model.0), model.1)) => {}
            (false, 1) => return disagree("drop event reason or rule".into()),
            (_, n) => return disagree(format!("{n} events")),
        }
        Ok(FrameOutcome::Agreed(model.0))
    }
}

/// A frame (after a selector byte, see [`frame_selector`]) through the real
/// classifier and through [`crate::fuzzing::model`]. Needs root (it loads the eBPF
/// object into a network namespace of its own, once per process).
///
/// Invariant: the kernel's verdict, the reason it counts, and for a drop
/// the reason and rule id of its drop event are the model's.
pub fn frames(data: &[u8]) {
    static HARNESS: OnceLock<Mutex<FrameHarness>> = OnceLock::new();
    let harness = HARNESS.get_or_init(|| Mutex::new(FrameHarness::new().unwrap_or_else(|e| panic!("{e}"))));
    let mut harness = harness.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(d) = harness.check(data) {
        panic!("{d}");
    }
}

/// The microVM's virtio devices against a hostile driver: the input is a
/// sequence of register accesses to a virtio-net device's MMIO window, then
/// a descriptor table and available ring in guest memory that a virtio-blk
/// device on a small image serves.
///
/// Invariants:
/// - the transport never keeps a driver feature the device did not offer;
/// - an activated device has every ready queue a power of two no larger
///   than its maximum, at least one ready queue, VERSION_1 negotiated and
///   the four status bits in order;
/// - config reads past the config space read zeros;
/// - serving any queue contents neither panics nor changes a read-only
///   image, and no more chains come back used than were made available.
pub fn virtio(data: &[u8]) {
    use sbx_vmm::virtio::mmio::MmioTransport;
    use sbx_vmm::virtio::VirtioDevice;
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_FAILED, VIRTIO_F_VERSION_1};

    let (registers, memory_bytes) = data.split_at(data.len().min(240));
    let net = sbx_vmm::virtio::net::NetDevice::new([2, 0x5b, 0, 0, 0, 1]);
    let offered = net.features() | (1 << VIRTIO_F_VERSION_1);
    let mut t = MmioTransport::new(&net);
    for op in registers.chunks_exact(6) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x140) & !3;
        if op[0] & 1 == 0 {
            let mut out = [0u8; 4];
            t.read(offset, &mut out);
            if offset >= 0x100 + 6 {
                assert_eq!(out, [0; 4], "config past its end at {offset:#x}");
            }
        } else {
            let value = u32::from_le_bytes([op[3], op[4], op[5], op[0] >> 1]);
            t.write(offset, &value.to_le_bytes());
        }
        assert_eq!(t.driver_features & !offered, 0, "a feature the device never offered was kept");
        if t.activated() {
            assert_eq!(t.status & VIRTIO_CONFIG_S_FAILED, 0);
            assert_eq!(t.status & 0xf, 0xf, "status bits in order: {:#x}", t.status);
            assert!(t.driver_features & (1 << VIRTIO_F_VERSION_1) != 0);
            assert!(t.queues.iter().any(|q| q.ready));
            for q in t.queues.iter().filter(|q| q.ready) {
                assert!(q.size.is_power_of_two() && q.size <= q.max_size, "{q:?}");
            }
        }
    }
    virtio_blk_queue(memory_bytes);
}

/// The second half of [`virtio`]: guest memory from the input, one queue of
/// 16 at fixed addresses, a 4-sector image.
fn virtio_blk_queue(bytes: &[u8]) {
    use sbx_vmm::virtio::blk::{process_requests, BlockDevice};
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    let Some((&flags, bytes)) = bytes.split_first() else { return };
    let memory: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("64 KiB");
    memory.write_slice(&bytes[..bytes.len().min(0x1_0000)], GuestAddress(0)).expect("inside");
    // Descriptor table at 0 (16 × 16 bytes), available ring at 0x100, used at 0x200.
    let mut queue = virtio_queue::Queue::new(16).expect("16 is a valid size");
    queue.set_size(16);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_ready(true);
    let read_only = flags & 1 != 0;
    let image = tempfile_image();
    let disk = BlockDevice::new(image.try_clone().expect("dup"), read_only, "fuzz").expect("image");
    let before = std::fs::read(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&image))).unwrap_or_default();
    let avail: u16 = memory.read_obj(GuestAddress(0x102)).unwrap_or(0);
    let _ = process_requests(&mut queue, &memory, &disk);
    let used: u16 = memory.read_obj(GuestAddress(0x202)).unwrap_or(0);
    assert!(used <= avail, "more chains used than made available: {used} > {avail}");
    if read_only {
        let after = std::fs::read(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&image))).unwrap_or_default();
        assert_eq!(before, after, "a read-only image changed");
    }
}

/// A 4-sector image, anonymous (a memfd: no file is left behind).
fn tempfile_image() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"sbx-fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a descriptor just returned to us.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(4 * 512).expect("size the image");
    file
}

/// What a fleet host makes of what it reads in etcd: the input is a
/// sequence of store events (puts with arbitrary text, deletes) on keys of
/// every scope, some for this host and some not, with the sink accepting or
/// refusing a plan now and then; and a host status record as `fleet status`
/// reads it.
///
/// Invariants, after every event:
/// - every policy the plan hands the sink parses back from its own text
///   and source and compiles, one per name;
/// - every key in force is either the store's text (valid) or the key's
///   last accepted text: a rejected key never changes what is in force;
/// - deny kept: every deny rule of a wider scope's policy in force is a
///   deny rule of the effective policy of that name, and a wider `default =
///   "deny"` stays (an org deny cannot be lifted by a narrower allow);
/// - a key for another host or group never reaches the plan;
/// - a status record that parses round-trips.
pub fn fleet(data: &[u8]) {
    use crate::fleet::layout::{HostIdentity, Layout, Scope};
    use crate::fleet::reconcile::{FleetView, Refusal};
    use crate::fleet::status::HostStatus;

    if let Ok(status) = serde_json::from_slice::<HostStatus>(data) {
        let wire = serde_json::to_string(&status).expect("statuses serialize");
        assert_eq!(serde_json::from_str::<HostStatus>(&wire).ok(), Some(status), "a host status does not round-trip");
    }
    let layout = Layout { prefix: "/f".into() };
    let me = HostIdentity::new("h1", Some("g1")).expect("valid identity");
    let scopes = [Scope::All, Scope::Group("g1".into()), Scope::Host("h1".into()), Scope::Group("g2".into()), Scope::Host("h2".into())];
    let names = ["default", "web", "x"];
    let mut view = FleetView::new(layout.clone(), me.clone(), Default::default());
    let mut revision = 1i64;
    for chunk in data.split(|b| *b == 0).take(64) {
        let [op, which, text @ ..] = chunk else { continue };
        let scope = &scopes[usize::from(*which) % scopes.len()];
        let name = names[usize::from(*which / 8) % names.len()];
        let key = match which % 31 {
            // Keys of odd shapes the layout must ignore.
            30 => format!("/f/policies/zone/{name}"),
            _ => layout.policy_key(scope, name),
        };
        revision += 1;
        match op % 8 {
            0 => {
                view.delete(&key);
            }
            1 => {
                let plan = view.plan();
                let _ = view.refuse(&plan, &Refusal { policy: Some(name.into()), reason: "fuzz".into() });
            }
            _ => {
                let taken = view.put(&key, String::from_utf8_lossy(text).into_owned(), revision);
                assert_eq!(taken, layout.parse_policy_key(&key).is_some_and(|(s, _)| me.covered_by(&s)), "{key} taken wrongly");
            }
        }
        let plan = view.plan();
        let mut seen = BTreeSet::new();
        for entry in &plan.entries {
            assert!(seen.insert(entry.policy.name.clone()), "two effective policies named {}", entry.policy.name);
            let again = crate::policy::store::PolicyEntry::parse(&entry.source, &entry.text).expect("an effective policy parses back");
            assert_eq!(again.policy.rules, entry.policy.rules, "{} does not parse back the same", entry.source);
            compile(&entry.policy, &[]).expect("an effective policy compiles");
        }
        for (key, stored) in &plan.candidate {
            let (scope, _) = layout.parse_policy_key(key).expect("only policy keys are in force");
            assert!(me.covered_by(&scope), "{key} is for another host");
            assert!(view.store.get(key) == Some(stored) || view.good.get(key) == Some(stored), "{key} in force at a text neither the store's nor the last good one");
        }
        for entry in &plan.entries {
            let mut keys: Vec<(Scope, &String)> = plan
                .candidate
                .keys()
                .filter_map(|k| layout.parse_policy_key(k).filter(|(_, n)| *n == entry.policy.name).map(|(s, _)| (s, k)))
                .collect();
            keys.sort();
            let Some(((_, _), wider)) = keys.split_last() else { panic!("{} has no key in force", entry.policy.name) };
            for (_, key) in wider {
                let Ok(wide) = Policy::parse("wide", &plan.candidate[*key].text) else { continue };
                for rule in wide.rules.iter().filter(|r| r.action == crate::policy::Action::Deny && r.origin == crate::policy::Origin::Policy) {
                    assert!(
                        entry.policy.rules.iter().any(|r| r.action == crate::policy::Action::Deny && r.text == rule.text && (rule.mode.is_audit() || !r.mode.is_audit())),
                        "{key}'s deny {} was lifted (or only audited) in {}", rule.text, entry.source
                    );
                }
                if wide.default == crate::policy::Action::Deny {
                    assert_eq!(entry.policy.default, crate::policy::Action::Deny, "{key}'s default deny was lifted in {}", entry.source);
                    assert!(wide.mode.is_audit() || !entry.policy.mode.is_audit(), "{key}'s default deny is only audited in {}", entry.source);
                }
            }
        }
        if op % 8 != 1 && op % 3 == 0 {
            view.accept(plan);
        }
    }
}

/// `[[http]]` rules and request paths, as the proxy sees them. The input is
/// `path \0 method \0 rule \0 rule …`.
///
/// Invariants:
/// - a normalised path starts with `/`, has no empty, `.` or `..` segment
///   (but a trailing `/`), no `%` escape of an unreserved character or a
///   separator, and normalising it again changes nothing;
/// - a refused path is refused again after any prefix of `/`s is added
///   (refusal does not depend on where the path starts);
/// - deny wins: when a deny rule of a covering block matches, the verdict
///   is a deny, whatever the allows say;
/// - a rule that parses matches its own glob's literal form.
pub fn http_rules(data: &[u8]) {
    use crate::policy::http::{decide, normalise_path, HttpMatcher, HttpRules, HttpVerdict, Mode};
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let raw = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("GET").to_ascii_uppercase();
    match normalise_path(raw) {
        Ok(path) => {
            assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
            let body = path.trim_end_matches('/');
            for segment in body.split('/').skip(1) {
                assert!(!segment.is_empty() && segment != "." && segment != "..", "{raw:?} -> {path:?}");
            }
            for escape in path.match_indices('%').map(|(i, _)| &path[i..(i + 3).min(path.len())]) {
                let value = u8::from_str_radix(&escape[1..], 16).expect("escapes stay well-formed");
                assert!(!(value.is_ascii_alphanumeric() || b"-._~/\\".contains(&value)), "{raw:?} -> {path:?} keeps {escape}");
            }
            assert_eq!(normalise_path(&path).as_deref(), Ok(path.as_str()), "normalising {raw:?} twice differs");
        }
        Err(why) => {
            if raw.starts_with('/') {
                assert_eq!(normalise_path(&format!("//{raw}")), Err(why), "{raw:?}");
            }
        }
    }
    let mut allow = Vec::new();
    let mut deny = Vec::new();
    for (i, entry) in parts.take(16).enumerate() {
        if let Ok(m) = HttpMatcher::parse(entry, i) {
            let literal = format!("/{}", m.glob.iter().map(|g| if g == "**" { "" } else { g.as_str() }).collect::<Vec<_>>().join("/"));
            let literal_method = m.methods.first().cloned().unwrap_or_else(|| "GET".into());
            if !m.glob.iter().any(|g| g == "**") {
                assert!(m.matches(&literal_method, &literal), "{entry:?} does not match {literal:?}");
            }
            if i % 2 == 0 { allow.push(m) } else { deny.push(m) }
        }
    }
    let block = HttpRules { hosts: vec![crate::policy::DomainPattern::Exact("h.test".into())], allow, deny, mode: Mode::Enforce, line: 1 };
    if let Ok(path) = normalise_path(raw) {
        let verdict = decide(std::slice::from_ref(&block), "h.test", &method, &path).expect("the block covers its host");
        if block.deny.iter().any(|m| m.matches(&method, &path)) {
            assert!(matches!(verdict, HttpVerdict::Deny { .. }), "deny lost for {method} {path}");
        }
        assert_eq!(decide(std::slice::from_ref(&block), "other.test", &method, &path), None);
    }
}

/// The MCP request parser and event-stream filter (the body and its
/// invariants live beside them: [`crate::proxy::mcp::fuzz`]).
pub fn mcp(data: &[u8]) {
    crate::proxy::mcp::fuzz(data);
}

/// The CNI plugin's parsers and the VMM hand-off renderings, on hostile
/// text. The input is `KEY=VALUE` lines (the plugin's environment), an
/// empty line, then the network configuration (its stdin). Invariants:
/// - an accepted environment has a container id within the spec's rule, and
///   the sandbox name made from it is one the daemon accepts (1-32 of
///   letters, digits, '-', '_'), the same each time for the same attachment;
/// - an accepted ADD/CHECK configuration names a non-empty policy, and a
///   socket it names (ADD, CHECK or DEL) is absolute;
/// - every refusal is one CNI error object: a numeric `code`, a string
///   `msg`, the version;
/// - a sandbox whose fields are the input's lines renders as shell
///   variables that are safe to `eval` (`NAME='…'`, nothing but `'\''`
///   between quotes), and as Cloud Hypervisor words with no white space or
///   glob character in the tap, or is refused.
pub fn cni(data: &[u8]) {
    use crate::cli::cni::{is_cni_name, parse_config, parse_del_config, parse_env, sandbox_name, stdin_version, CniError, Command as CniCommand};
    use crate::cli::handoff::{render, Format};

    let text = String::from_utf8_lossy(data);
    let (env_part, stdin) = text.split_once("\n\n").unwrap_or((&text, ""));
    let env: Vec<(&str, &str)> = env_part.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |key: &str| env.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v.to_string());
    let version = stdin_version(stdin.as_bytes()).unwrap_or_else(|| "1.0.0".into());
    let refusal = |e: &CniError| {
        let v = e.to_json(&version);
        assert!(v["code"].is_u64() && v["msg"].is_string() && v["cniVersion"].is_string(), "not a CNI error: {v}");
    };
    match parse_env(get) {
        Ok(inv) if inv.command != CniCommand::Version => {
            assert!(is_cni_name(&inv.container_id), "{:?}", inv.container_id);
            let name = sandbox_name("net", &inv.container_id, &inv.ifname);
            assert!(!name.is_empty() && name.len() <= 32 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{name:?}");
            assert_eq!(name, sandbox_name("net", &inv.container_id, &inv.ifname));
        }
        Ok(_) => {}
        Err(e) => refusal(&e),
    }
    match parse_config(stdin.as_bytes()) {
        Ok(conf) => {
            assert!(!conf.policy.is_empty());
            assert!(conf.socket.as_ref().is_none_or(|s| s.is_absolute()), "{:?}", conf.socket);
        }
        Err(e) => refusal(&e),
    }
    match parse_del_config(stdin.as_bytes()) {
        Ok(conf) => assert!(conf.socket.as_ref().is_none_or(|s| s.is_absolute()), "{:?}", conf.socket),
        Err(e) => refusal(&e),
    }

    let lines: Vec<&str> = env_part.lines().collect();
    let field = |i: usize, default: &str| lines.get(i).map_or(default.to_string(), |l| l.to_string());
    let info = crate::control::api::SandboxInfo {
        name: field(0, "s"),
        id: 2,
        policy: field(1, "p"),
        policy_generation: 1,
        tap: field(2, "sbx-2"),
        adopted_tap: true,
        netns: None,
        guest_ipv4: field(3, "10.200.0.6"),
        guest_ipv6: field(4, "fd73:6278:0:2::2"),
        guest_mac: field(5, "02:5b:00:00:00:02"),
        gateway_ipv4: field(6, "10.200.0.5"),
        gateway_ipv6: field(7, "fd73:6278:0:2::1"),
        gateway_mac: field(8, "02:5a:00:00:00:02"),
        ipv4_prefix_len: 30,
        ipv6_prefix_len: 64,
        dns: field(9, "10.200.0.5"),
        ca_cert: field(10, "/var/lib/sbx-net/ca/s/ca.pem"),
        created_unix: 0,
        mounts: Vec::new(),
        vm: None,
    };
    if let Ok(out) = render(Format::Env, &info) {
        assert_eval_safe(&out);
    }
    if let Ok(out) = render(Format::CloudHypervisor, &info) {
        // The words are for an unquoted `$(…)`, whose output the shell only
        // splits and globs (a `$` or a quote in it stays literal).
        let tap = out.split("tap=").nth(1).and_then(|r| r.split(',').next()).unwrap_or("");
        assert!(!tap.is_empty() && !tap.chars().any(|c| c.is_whitespace() || matches!(c, '*' | '?' | '[' | '\\')), "{out:?}");
    }
}

/// `NAME='…'` lines whose values are single-quoted, a quote inside written
/// `'\''`: nothing the shell would expand or split.
fn assert_eval_safe(out: &str) {
    let mut rest = out;
    while !rest.is_empty() {
        let eq = rest.find('=').unwrap_or_else(|| panic!("no `=` in {rest:?}"));
        let name = &rest[..eq];
        assert!(name.starts_with("SBX_NET_") && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'), "{name:?} in {out:?}");
        rest = &rest[eq + 1..];
        loop {
            rest = rest.strip_prefix('\'').unwrap_or_else(|| panic!("an unquoted value in {out:?}"));
            let close = rest.find('\'').unwrap_or_else(|| panic!("an unclosed quote in {out:?}"));
            rest = &rest[close + 1..];
            match rest.strip_prefix("\\'") {
                Some(after) => rest = after,
                None => break,
            }
        }
        if !rest.is_empty() {
            rest = rest.strip_prefix('\n').unwrap_or_else(|| panic!("a value followed by {rest:?} in {out:?}"));
        }
    }
}

/// `dns_cache`: any upstream bytes as an answer to the query its own
/// question makes (RD, no EDNS). Invariants:
/// - the wire reader never panics; a layout it accepts has every TTL field
///   inside the message and a lifetime of at least a second;
/// - what is stored is served within its lifetime, the same length, with
///   the asking query's id, and no TTL larger than stored.
pub fn dns_cache(data: &[u8]) {
    use crate::dns::cache::{answer_layout, AnswerCache, CacheSettings};

    let Some(layout) = answer_layout(data, 300) else { return };
    assert!(layout.keep_seconds >= 1);
    assert!(layout.ttl_offsets.iter().all(|at| at + 4 <= data.len()));
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend_from_slice(&data[12..12 + layout.qname_len]);
    query.extend_from_slice(&data[12 + layout.qname_len..12 + layout.qname_len + 4]);
    let cache = AnswerCache::new(CacheSettings { entries: 4, negative_max_ttl: 300 });
    if cache.put(&query, data, 0) {
        let hit = cache.get(&query, 500_000_000).expect("a stored answer is served within its lifetime");
        assert_eq!(hit.len(), data.len());
        assert_eq!(&hit[..2], &[0x12, 0x34]);
        for at in &layout.ttl_offsets {
            let before = u32::from_be_bytes([data[*at], data[at + 1], data[at + 2], data[at + 3]]);
            let after = u32::from_be_bytes([hit[*at], hit[at + 1], hit[at + 2], hit[at + 3]]);
            assert!(after <= before);
        }
    }
}

/// `address_notifications`: rtnetlink address notifications, which decide
/// whether the host's own addresses must be read again (each is a deny of
/// every sandbox compiled after it). Invariants:
/// - any bytes: no panic;
/// - notifications built from the input (each 18 bytes: new or deleted,
///   IPv4 or IPv6, the address) say "changed" exactly when one of their
///   addresses is the host's to deny;
/// - those notifications cut short anywhere inside the last one say
///   "changed": what cannot be read is never taken for no change.
pub fn address_notifications(data: &[u8]) {
    use crate::sandbox::denies::{address_notification, is_host_address_to_deny, messages_change_host_addresses};
    let pools = crate::sandbox::AddressPools::default();
    let _ = messages_change_host_addresses(data, &pools);
    let (mut buf, mut expected, mut last_start) = (Vec::new(), false, 0);
    for chunk in data.chunks_exact(18) {
        let ip: IpAddr = if chunk[0] & 2 == 0 {
            Ipv4Addr::new(chunk[2], chunk[3], chunk[4], chunk[5]).into()
        } else {
            Ipv6Addr::from(<[u8; 16]>::try_from(&chunk[2..18]).expect("16 bytes")).into()
        };
        expected |= is_host_address_to_deny(ip, &pools);
        last_start = buf.len();
        buf.extend(address_notification(chunk[0] & 1 == 1, ip));
    }
    assert_eq!(messages_change_host_addresses(&buf, &pools), expected, "notifications {buf:?}");
    for cut in last_start + 1..buf.len() {
        assert!(messages_change_host_addresses(&buf[..cut], &pools), "cut to {cut} of {} bytes, read as no change", buf.len());
    }
}

#[cfg(test)]
mod eval_safety_tests {
    use super::assert_eval_safe;

    #[test]
    fn quoted_values_pass() {
        assert_eval_safe("SBX_NET_A='x'\nSBX_NET_B='a'\\''b'\nSBX_NET_C=''");
    }

    #[test]
    #[should_panic(expected = "unquoted")]
    fn an_unquoted_value_is_caught() {
        assert_eval_safe("SBX_NET_A=$(touch /tmp/x)");
    }

    #[test]
    #[should_panic(expected = "followed by")]
    fn text_after_a_closing_quote_is_caught() {
        assert_eval_safe("SBX_NET_A='x';reboot");
    }
}

