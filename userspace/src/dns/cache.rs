//! The proxy's answer cache: the upstream's answers, kept for their TTL and
//! served again to the next query that would send the upstream the same
//! message. It holds answers, never decisions: a hit goes through the same
//! per-sandbox judgement (alias chain, rebinding strip, map write before
//! the answer leaves) as a miss; it only saves the upstream round trip.
//! Denied names never reach it (they are refused before the lookup).
//!
//! Keyed by the exact message the proxy sends upstream ([`crate::dns::decide::reencode`]),
//! with the id zeroed and the name's letters lowercased: what the proxy
//! forwards (RD, the question, qtype, class, its own OPT with the DO bit
//! and payload size) is what the answer depends on, and nothing else the
//! guest wrote ever reaches the upstream (the CD bit is not forwarded: the
//! upstream validates for everyone, so answers do not depend on it).
//!
//! Bounded: at most `entries` answers of at most [`MAX_CACHED_ANSWER`]
//! bytes each; past it the oldest stored is forgotten first (a guest asking
//! random names only churns the cache, never grows it). Only well-formed,
//! matched, non-truncated NOERROR and NXDOMAIN answers are stored; negative
//! answers (NXDOMAIN, NODATA) for min(SOA TTL, SOA MINIMUM) capped at
//! `negative_max_ttl` (RFC 2308 §5), and not at all without an SOA.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Answers larger than this are not stored (they are rare, and it bounds
/// the cache's memory with its entry count).
pub const MAX_CACHED_ANSWER: usize = 4096;

/// Positive answers are kept at most this long whatever their TTL.
pub const MAX_POSITIVE_TTL: u32 = 3600;

/// Default of [`CacheSettings::entries`].
pub const DEFAULT_CACHE_ENTRIES: usize = 4096;

/// Default of [`CacheSettings::negative_max_ttl`] (RFC 2308 suggests at
/// most 1–3 hours; a sandbox waiting for a name to appear should not wait
/// that long).
pub const DEFAULT_NEGATIVE_MAX_TTL: u32 = 300;

const NS: u64 = 1_000_000_000;
const OPT: u16 = 41;
const SOA: u16 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSettings {
    /// Answers kept at most; 0 turns the cache off.
    pub entries: usize,
    /// Negative answers are kept at most this many seconds.
    pub negative_max_ttl: u32,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings { entries: DEFAULT_CACHE_ENTRIES, negative_max_ttl: DEFAULT_NEGATIVE_MAX_TTL }
    }
}

/// Where the TTLs of an answer are, and how long it may be kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerLayout {
    /// Byte offsets of every record's TTL field (answer, authority and
    /// additional sections; not the OPT record's, which holds flags).
    pub ttl_offsets: Vec<usize>,
    /// The question name's wire length (from offset 12, uncompressed).
    pub qname_len: usize,
    /// Seconds the answer may be served from the cache (at least 1).
    pub keep_seconds: u32,
}

/// The cache key of an upstream query (as [`crate::dns::decide::reencode`]
/// made it): id zeroed, the question name's letters lowercased. `None`
/// when the query has no plain question name at offset 12.
pub fn cache_key(upstream_query: &[u8]) -> Option<Vec<u8>> {
    let len = plain_name_len(upstream_query, 12)?;
    let mut key = upstream_query.to_vec();
    key[0] = 0;
    key[1] = 0;
    key[12..12 + len].make_ascii_lowercase();
    Some(key)
}

/// The length of an uncompressed name at `at` (labels, then the root).
fn plain_name_len(wire: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    loop {
        let len = usize::from(*wire.get(i)?);
        if len == 0 {
            return Some(i + 1 - at);
        }
        if len > 63 {
            return None;
        }
        i += 1 + len;
    }
}

/// Skips a possibly compressed name at `at`; the offset after it.
fn skip_name(wire: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    // A name is at most 255 bytes: at most 128 labels.
    for _ in 0..128 {
        let len = *wire.get(i)?;
        match len {
            0 => return Some(i + 1),
            1..=63 => i += 1 + usize::from(len),
            0xc0..=0xff => {
                wire.get(i + 1)?;
                return Some(i + 2);
            }
            _ => return None,
        }
    }
    None
}

fn u16_at(wire: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*wire.get(at)?, *wire.get(at + 1)?]))
}

fn u32_at(wire: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(wire.get(at..at + 4)?.try_into().ok()?))
}

/// Reads an upstream answer's layout, or `None` when it must not be
/// cached: malformed (anything past the records, a record cut short), not
/// a response, truncated, an rcode other than NOERROR or NXDOMAIN, not
/// exactly one question, a TTL of 0, a negative answer without an SOA, or
/// larger than [`MAX_CACHED_ANSWER`].
pub fn answer_layout(wire: &[u8], negative_max_ttl: u32) -> Option<AnswerLayout> {
    if wire.len() < 12 || wire.len() > MAX_CACHED_ANSWER {
        return None;
    }
    let flags = u16_at(wire, 2)?;
    let response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let truncated = flags & 0x0200 != 0;
    let rcode = flags & 0xf;
    if !response || opcode != 0 || truncated || !(rcode == 0 || rcode == 3) {
        return None;
    }
    if u16_at(wire, 4)? != 1 {
        return None;
    }
    let answers = usize::from(u16_at(wire, 6)?);
    let authority = usize::from(u16_at(wire, 8)?);
    let additional = usize::from(u16_at(wire, 10)?);
    let qname_len = plain_name_len(wire, 12)?;
    let mut at = 12 + qname_len + 4;
    if at > wire.len() {
        return None;
    }
    let mut ttl_offsets = Vec::with_capacity(answers + authority + additional);
    let mut min_ttl = u32::MAX;
    let mut soa_negative: Option<u32> = None;
    let mut extended_rcode = 0u8;
    for section in 0..3 {
        let count = [answers, authority, additional][section];
        for _ in 0..count {
            at = skip_name(wire, at)?;
            let rtype = u16_at(wire, at)?;
            let ttl_at = at + 4;
            let ttl = u32_at(wire, ttl_at)?;
            let rdlen = usize::from(u16_at(wire, at + 8)?);
            let rdata = at + 10;
            let end = rdata.checked_add(rdlen).filter(|e| *e <= wire.len())?;
            if rtype == OPT {
                if section != 2 {
                    return None;
                }
                // The OPT "TTL" is the extended rcode and flags.
                extended_rcode = wire[ttl_at];
            } else {
                // RFC 2181 §8: a TTL with the top bit set is read as 0.
                let ttl = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
                min_ttl = min_ttl.min(ttl);
                ttl_offsets.push(ttl_at);
                if section == 1 && rtype == SOA {
                    // MINIMUM is the last 4 bytes of the SOA's RDATA.
                    let minimum = u32_at(wire, end.checked_sub(4).filter(|m| *m >= rdata)?)?;
                    soa_negative = Some(soa_negative.unwrap_or(u32::MAX).min(ttl.min(minimum)));
                }
            }
            at = end;
        }
    }
    if at != wire.len() || extended_rcode != 0 {
        return None;
    }
    let negative = rcode == 3 || answers == 0;
    let keep = if negative { soa_negative?.min(min_ttl).min(negative_max_ttl) } else { min_ttl.min(MAX_POSITIVE_TTL) };
    (keep > 0).then_some(AnswerLayout { ttl_offsets, qname_len, keep_seconds: keep })
}

struct Entry {
    wire: Vec<u8>,
    layout: AnswerLayout,
    stored_ns: u64,
    serial: u64,
}

impl Entry {
    fn expires_ns(&self) -> u64 {
        self.stored_ns.saturating_add(u64::from(self.layout.keep_seconds) * NS)
    }
}

#[derive(Default)]
struct Inner {
    map: HashMap<Vec<u8>, Entry>,
    /// Keys in the order they were stored, with the serial of that store
    /// (a key stored again has a stale older slot, skipped on eviction).
    order: VecDeque<(Vec<u8>, u64)>,
    serial: u64,
}

/// The answer cache ([module docs](self)).
pub struct AnswerCache {
    settings: CacheSettings,
    inner: Mutex<Inner>,
}

impl AnswerCache {
    pub fn new(settings: CacheSettings) -> AnswerCache {
        AnswerCache { settings, inner: Mutex::default() }
    }

    pub fn enabled(&self) -> bool {
        self.settings.entries > 0
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored answer for `upstream_query` (the message the proxy would
    /// send upstream), as the upstream would answer it now: the query's id
    /// and question spelling, every TTL less the whole seconds it has been
    /// kept. `None` when there is none, or it has expired (then forgotten).
    pub fn get(&self, upstream_query: &[u8], now_ns: u64) -> Option<Vec<u8>> {
        if !self.enabled() {
            return None;
        }
        let key = cache_key(upstream_query)?;
        let (mut wire, offsets, elapsed) = {
            let mut inner = self.lock();
            let entry = inner.map.get(&key)?;
            if now_ns < entry.stored_ns || now_ns >= entry.expires_ns() {
                inner.map.remove(&key);
                return None;
            }
            let elapsed = ((now_ns - entry.stored_ns) / NS) as u32;
            (entry.wire.clone(), entry.layout.ttl_offsets.clone(), elapsed)
        };
        // The guest's id and spelling (the key matched case-insensitively,
        // so the lengths agree).
        wire[..2].copy_from_slice(&upstream_query[..2]);
        let qlen = plain_name_len(upstream_query, 12)?;
        wire.get_mut(12..12 + qlen)?.copy_from_slice(&upstream_query[12..12 + qlen]);
        for at in offsets {
            let ttl = u32_at(&wire, at)?;
            let ttl = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
            wire[at..at + 4].copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
        }
        Some(wire)
    }

    /// Stores the upstream's `answer` to `upstream_query` when it may be
    /// cached (the caller has checked it answers the query); whether it was.
    pub fn put(&self, upstream_query: &[u8], answer: &[u8], now_ns: u64) -> bool {
        if !self.enabled() {
            return false;
        }
        let Some(key) = cache_key(upstream_query) else { return false };
        let Some(layout) = answer_layout(answer, self.settings.negative_max_ttl) else { return false };
        // The answer's question is the query's, letter case aside.
        let qlen = layout.qname_len;
        if qlen + 12 > key.len() || !answer[12..12 + qlen].eq_ignore_ascii_case(&key[12..12 + qlen]) || plain_name_len(&key, 12) != Some(qlen) {
            return false;
        }
        let mut inner = self.lock();
        inner.serial += 1;
        let serial = inner.serial;
        inner.order.push_back((key.clone(), serial));
        inner.map.insert(key, Entry { wire: answer.to_vec(), layout, stored_ns: now_ns, serial });
        while inner.map.len() > self.settings.entries {
            let Some((old, old_serial)) = inner.order.pop_front() else { break };
            if inner.map.get(&old).is_some_and(|e| e.serial == old_serial) {
                inner.map.remove(&old);
            }
        }
        // Stale slots (keys stored again, or expired and forgotten) are
        // dropped when they outnumber the entries, so the queue is bounded
        // too.
        if inner.order.len() > 2 * self.settings.entries.max(16) {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|(k, s)| map.get(k).is_some_and(|e| e.serial == *s));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA as SoaData};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    use crate::dns::decide::{reencode, GuestEdns, StdQuery};

    fn query(name: &str, qtype: RecordType, edns: Option<GuestEdns>, id: u16) -> Vec<u8> {
        let name = Name::from_ascii(name).unwrap();
        let q = StdQuery { id, recursion_desired: true, rule_name: name.to_lowercase().to_string(), name, qtype, edns };
        reencode(&q).unwrap()
    }

    fn answer(q: &[u8], records: &[(&str, u32, [u8; 4])], rcode: ResponseCode, soa: Option<(u32, u32)>) -> Vec<u8> {
        let qm = Message::from_vec(q).unwrap();
        let mut m = Message::new();
        m.set_id(qm.id()).set_message_type(MessageType::Response).set_op_code(OpCode::Query).set_recursion_desired(true).set_response_code(rcode);
        m.add_queries(qm.queries().to_vec());
        for (name, ttl, ip) in records {
            m.add_answer(Record::from_rdata(Name::from_ascii(name).unwrap(), *ttl, RData::A(A::from(std::net::Ipv4Addr::from(*ip)))));
        }
        if let Some((ttl, minimum)) = soa {
            let zone = Name::from_ascii("test.").unwrap();
            let soa = SoaData::new(zone.clone(), Name::from_ascii("admin.test.").unwrap(), 1, 60, 60, 600, minimum);
            m.add_name_server(Record::from_rdata(zone, ttl, RData::SOA(soa)));
        }
        if let Some(e) = qm.extensions() {
            m.set_edns(e.clone());
        }
        m.to_vec().unwrap()
    }

    fn ttls(wire: &[u8]) -> Vec<u32> {
        let m = Message::from_vec(wire).unwrap();
        m.answers().iter().chain(m.name_servers()).map(|r| r.ttl()).collect()
    }

    fn cache(entries: usize) -> AnswerCache {
        AnswerCache::new(CacheSettings { entries, negative_max_ttl: 300 })
    }

    #[test]
    fn hits_carry_the_remaining_ttl_the_guests_id_and_spelling() {
        let c = cache(16);
        let q = query("www.Example.test.", RecordType::A, None, 7);
        let a = answer(&q, &[("www.Example.test.", 60, [198, 51, 100, 5]), ("www.Example.test.", 30, [198, 51, 100, 6])], ResponseCode::NoError, None);
        assert!(c.put(&q, &a, 1000 * NS));
        // Another guest, another id and spelling.
        let q2 = query("WWW.example.TEST.", RecordType::A, None, 99);
        let hit = c.get(&q2, 1000 * NS + 10 * NS + NS / 2).expect("a hit");
        let m = Message::from_vec(&hit).unwrap();
        assert_eq!(m.id(), 99);
        assert_eq!(m.queries()[0].name().to_ascii(), "WWW.example.TEST.");
        assert_eq!(ttls(&hit), [50, 20], "10 whole seconds taken off every TTL");
        // Just before the shortest TTL runs out every TTL is still ≥ 1...
        let late = c.get(&q2, 1000 * NS + 30 * NS - 1).expect("still live");
        assert_eq!(ttls(&late), [31, 1]);
        // ...and at it the answer is never served again.
        assert!(c.get(&q2, 1000 * NS + 30 * NS).is_none());
        assert!(c.is_empty(), "an expired entry is forgotten");
    }

    #[test]
    fn the_key_is_the_upstream_question_qtype_and_edns() {
        let c = cache(16);
        let q = query("a.test.", RecordType::A, None, 1);
        assert!(c.put(&q, &answer(&q, &[("a.test.", 60, [192, 0, 2, 1])], ResponseCode::NoError, None), 0));
        assert!(c.get(&query("A.TEST.", RecordType::A, None, 2), NS).is_some(), "case-insensitive name");
        assert!(c.get(&query("a.test.", RecordType::AAAA, None, 2), NS).is_none(), "qtype");
        assert!(c.get(&query("b.test.", RecordType::A, None, 2), NS).is_none(), "name");
        let do_bit = Some(GuestEdns { max_payload: 1232, dnssec_ok: true });
        let no_do = Some(GuestEdns { max_payload: 1232, dnssec_ok: false });
        assert!(c.get(&query("a.test.", RecordType::A, do_bit, 2), NS).is_none(), "EDNS with DO");
        assert!(c.get(&query("a.test.", RecordType::A, no_do, 2), NS).is_none(), "EDNS without DO");
        let qd = query("a.test.", RecordType::A, do_bit, 3);
        assert!(c.put(&qd, &answer(&qd, &[("a.test.", 60, [192, 0, 2, 9])], ResponseCode::NoError, None), 0));
        assert!(c.get(&query("a.test.", RecordType::A, no_do, 2), NS).is_none(), "DO is part of the key");
        let with_do = c.get(&query("a.test.", RecordType::A, do_bit, 2), NS).unwrap();
        assert_eq!(Message::from_vec(&with_do).unwrap().answers()[0].data(), &RData::A(A::new(192, 0, 2, 9)));
        // The class is always IN and CD never forwarded: the upstream
        // message is the same, so is the key.
        let mut cd = query("a.test.", RecordType::A, None, 4);
        assert_eq!(cache_key(&cd), cache_key(&q));
        cd[3] |= 0x10;
        assert_ne!(cache_key(&cd), cache_key(&q), "were CD ever forwarded, it would be keyed");
    }

    #[test]
    fn only_cacheable_answers_are_stored() {
        let c = cache(16);
        let q = query("a.test.", RecordType::A, None, 1);
        let ok = answer(&q, &[("a.test.", 60, [192, 0, 2, 1])], ResponseCode::NoError, None);
        let mut truncated = ok.clone();
        truncated[2] |= 0x02;
        assert!(!c.put(&q, &truncated, 0), "truncated");
        let servfail = answer(&q, &[], ResponseCode::ServFail, Some((60, 60)));
        assert!(!c.put(&q, &servfail, 0), "SERVFAIL");
        let refused = answer(&q, &[], ResponseCode::Refused, Some((60, 60)));
        assert!(!c.put(&q, &refused, 0), "REFUSED");
        assert!(!c.put(&q, &ok[..ok.len() - 1], 0), "cut short");
        assert!(!c.put(&q, &[ok.clone(), vec![0]].concat(), 0), "trailing bytes");
        assert!(!c.put(&q, &q, 0), "a query, not a response");
        let zero = answer(&q, &[("a.test.", 0, [192, 0, 2, 1])], ResponseCode::NoError, None);
        assert!(!c.put(&q, &zero, 0), "TTL 0");
        let other = query("b.test.", RecordType::A, None, 1);
        assert!(!c.put(&q, &answer(&other, &[("b.test.", 60, [192, 0, 2, 1])], ResponseCode::NoError, None), 0), "another question");
        assert!(!c.put(&q, &answer(&q, &[], ResponseCode::NXDomain, None), 0), "negative without an SOA");
        assert!(c.is_empty());
        assert!(c.put(&q, &ok, 0));
    }

    #[test]
    fn negative_answers_keep_the_soa_minimum_capped() {
        let c = cache(16);
        let q = query("gone.test.", RecordType::A, None, 1);
        // min(SOA TTL 900, MINIMUM 30) = 30.
        assert_eq!(answer_layout(&answer(&q, &[], ResponseCode::NXDomain, Some((900, 30))), 300).unwrap().keep_seconds, 30);
        // NODATA too; min(120, 7200) = 120.
        assert_eq!(answer_layout(&answer(&q, &[], ResponseCode::NoError, Some((120, 7200))), 300).unwrap().keep_seconds, 120);
        // Capped.
        let long = answer(&q, &[], ResponseCode::NXDomain, Some((86400, 86400)));
        assert_eq!(answer_layout(&long, 300).unwrap().keep_seconds, 300);
        assert!(c.put(&q, &long, 0));
        let hit = c.get(&q, 299 * NS).unwrap();
        assert_eq!(Message::from_vec(&hit).unwrap().response_code(), ResponseCode::NXDomain);
        assert!(c.get(&q, 300 * NS).is_none(), "gone at the cap");
        let zero = answer(&q, &[], ResponseCode::NXDomain, Some((60, 0)));
        assert!(!c.put(&q, &zero, 0), "MINIMUM 0: not cached");
    }

    #[test]
    fn random_names_never_grow_it_past_its_bound() {
        let c = cache(64);
        for i in 0..10_000u32 {
            let name = format!("r{i}.test.");
            let q = query(&name, RecordType::A, None, i as u16);
            assert!(c.put(&q, &answer(&q, &[(&name, 60, [192, 0, 2, 1])], ResponseCode::NoError, None), 0));
            assert!(c.len() <= 64);
        }
        assert_eq!(c.len(), 64);
        assert!(c.lock().order.len() <= 2 * 64, "the order queue is bounded too");
        // The newest are kept, the oldest gone.
        assert!(c.get(&query("r9999.test.", RecordType::A, None, 1), NS).is_some());
        assert!(c.get(&query("r0.test.", RecordType::A, None, 1), NS).is_none());
        // Storing one name again and again does not grow the queue either.
        let q = query("same.test.", RecordType::A, None, 1);
        let a = answer(&q, &[("same.test.", 60, [192, 0, 2, 1])], ResponseCode::NoError, None);
        for _ in 0..1000 {
            c.put(&q, &a, 0);
        }
        assert!(c.lock().order.len() <= 2 * 64);
        assert!(c.get(&q, NS).is_some());
        // Too big an answer is not stored; a cache of 0 is off.
        let big: Vec<(String, u32, [u8; 4])> = (0..300).map(|i| ("big.test.".to_string(), 60, [10, 0, (i / 256) as u8, i as u8])).collect();
        let qb = query("big.test.", RecordType::A, None, 1);
        let refs: Vec<(&str, u32, [u8; 4])> = big.iter().map(|(n, t, ip)| (n.as_str(), *t, *ip)).collect();
        assert!(!c.put(&qb, &answer(&qb, &refs, ResponseCode::NoError, None), 0));
        let off = cache(0);
        assert!(!off.put(&q, &a, 0));
        assert!(off.get(&q, NS).is_none());
    }

    #[test]
    fn the_layout_reader_refuses_what_it_cannot_walk() {
        let q = query("a.test.", RecordType::A, None, 1);
        let ok = answer(&q, &[("a.test.", 60, [192, 0, 2, 1])], ResponseCode::NoError, None);
        for cut in 0..ok.len() {
            assert!(answer_layout(&ok[..cut], 300).is_none(), "cut at {cut}");
        }
        // A record count larger than the records present.
        let mut more = ok.clone();
        more[7] = 2;
        assert!(answer_layout(&more, 300).is_none());
        // A compression loop is not followed (names are skipped, not read).
        let layout = answer_layout(&ok, 300).unwrap();
        assert_eq!(layout.ttl_offsets.len(), 1);
        assert_eq!(layout.keep_seconds, 60);
    }
}
