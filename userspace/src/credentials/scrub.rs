//! Keeping a credential's secret out of what goes back to the guest.
//!
//! The proxy injects the secret into requests to the hosts it is bound to;
//! an upstream that reflects the request (a debug endpoint, an error page
//! quoting the headers, a JSON dump of them) would hand it to the guest. So
//! every response header, body and trailer from a credential host passes
//! through a [`Scrubber`]: a streaming matcher over every form of the
//! secret an honest reflection could carry, which overwrites each match
//! with [`MARKER`] bytes of the same length (a `Content-Length` stays true,
//! nothing is re-framed).
//!
//! The forms ([`secret_forms`]): the raw secret; its percent-encodings
//! (reserved bytes only or every byte, upper- and lower-case hex); its JSON
//! string escapes (minimal, `\/`, Go's `\u003c`-style HTML-safe escapes);
//! its HTML escapes; its hex; and base64 in both alphabets of every one of
//! those text forms, at each of the three byte alignments the secret can
//! have inside a longer base64 string (only the characters that depend on
//! the secret alone: the two or three at each edge that mix in neighbouring
//! bytes are left out, so padding and alignment do not matter). A Basic
//! credential's decoded `user:password` and password are roots too.
//!
//! Every form of [`WINDOW`] bytes or more is matched by its windows of
//! [`WINDOW`] bytes, not as a whole: a reflection that truncates the value
//! (`Authorization: Bearer ghp_1234…`) still has every run of 16 bytes of a
//! form in it, and overlapping window matches redact the whole run. It also
//! keeps the longest pattern at 16 bytes, which bounds what a stream holds
//! back.
//!
//! Streaming: a chunk is emitted at once except for its longest suffix
//! that could still become a match (a prefix of some pattern, at most 15
//! bytes), which waits for the next chunk or the end; the last 15 bytes
//! sent stay as context for matches across the next boundary. So a secret
//! split across two chunks (or frames) is caught, and memory per stream is
//! 15 bytes. Some window of some form starts with almost any character, so
//! many chunks end in a possible start: held bytes also go out once the
//! upstream has been silent for a while ([`Scrubber::release_after`]), or
//! an interactive stream (an upgraded connection, a stream of events not
//! ending in a newline) would wait for its next message. A secret the
//! upstream pauses in the middle of writing is missed up to that pause.
//!
//! What this does not stop: an upstream that means to leak the secret (it
//! has it; it can XOR it, compress it, split it across pauses), encodings
//! not listed (mixed percent-encoding, double encodings beyond those
//! above), and fragments shorter than 16 bytes. Compressed responses are
//! refused by the proxy rather than passed unchecked.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::Engine as _;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("building the secret matcher: {0}")]
    Build(#[from] aho_corasick::BuildError),
    #[error("the secret is empty")]
    Empty,
}

/// What replaces every byte of a match, cyclically (`[REDACTED][REDA…`).
pub const MARKER: &[u8] = b"[REDACTED]";

/// Forms of at least this many bytes are matched by their windows of this
/// length (see the module documentation).
pub const WINDOW: usize = 16;

/// Held-back bytes go out after the upstream has been silent this long
/// (fewer than [`LIKELY`] of them: they are held at the end of many an
/// ordinary chunk)...
pub const SHORT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
/// ... or this long ([`LIKELY`] or more: they look like the secret).
pub const LONG_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// A held suffix this long is probably the secret being written.
pub const LIKELY: usize = 8;

/// Derived forms shorter than this are not matched (a 2-character base64
/// core of a tiny secret would redact half of every body). The raw roots
/// are always matched, whatever their length.
pub const MIN_DERIVED: usize = 6;

/// The compiled patterns of one credential (shared by all its streams).
#[derive(Clone)]
pub struct Patterns {
    inner: Arc<Compiled>,
}

struct Compiled {
    /// Looked at first: no anchor in a chunk, no match in it.
    anchors: Option<Anchors>,
    matcher: AhoCorasick,
    /// Every proper prefix of every pattern: a stream holds back its
    /// longest suffix found here.
    prefixes: HashSet<Box<[u8]>, std::hash::BuildHasherDefault<Fnv>>,
    /// The longest pattern, in bytes.
    longest: usize,
}

/// A fast first look for the patterns: every pattern holds an *anchor*
/// (an aligned 8-byte block of the form it is a window of — a window of 16
/// bytes always covers one whole — or the first up-to-8 bytes of a form
/// short enough to be a pattern itself), and every anchor starts with one
/// of `starts` (its first `len` bytes). So a chunk in which no `len` bytes
/// are one of `starts` holds no match, and [`Anchors::may_match`] tells
/// that with one load, multiply and bit test per byte (against an 8 KiB
/// bitmap of their hashes, an exact lookup only on a set bit), several
/// times faster than the automaton, which takes a few nanoseconds a byte
/// over the hundreds of windows of a secret (too many for its own SIMD
/// prefilter). The automaton then runs only on a chunk that has one.
struct Anchors {
    /// Bytes of each start (the shortest anchor's length, at most 8).
    len: usize,
    /// One bit per [`Anchors::slot`] of every start.
    bits: Box<[u64]>,
    /// The starts themselves, as little-endian integers of `len` bytes.
    starts: HashSet<u64, std::hash::BuildHasherDefault<Fnv>>,
}

/// Bits of [`Anchors::bits`]: 2^16, 8 KiB (stays in the L1 cache).
const ANCHOR_SLOT_BITS: u32 = 16;

/// Starts shorter than this would set too many bits (and match too much
/// ordinary text) to help: the automaton alone then.
const MIN_ANCHOR: usize = 4;

impl Anchors {
    /// The anchors of `forms` (what the patterns were cut from); None when
    /// some are too short to help.
    fn new<'a>(forms: impl Iterator<Item = &'a [u8]>) -> Option<Anchors> {
        let mut anchors: Vec<&[u8]> = Vec::new();
        for form in forms {
            if form.len() > WINDOW {
                anchors.extend((0..=form.len() - 8).step_by(8).map(|at| &form[at..at + 8]));
            } else {
                anchors.push(&form[..form.len().min(8)]);
            }
        }
        let len = anchors.iter().map(|a| a.len()).min()?;
        if len < MIN_ANCHOR {
            return None;
        }
        let mut bits = vec![0u64; (1usize << ANCHOR_SLOT_BITS) / 64].into_boxed_slice();
        let mut starts = HashSet::default();
        for a in anchors {
            let start = Self::word(&a[..len]);
            let slot = Self::slot(start);
            bits[slot / 64] |= 1 << (slot % 64);
            starts.insert(start);
        }
        Some(Anchors { len, bits, starts })
    }

    /// Up to 8 bytes as a little-endian integer.
    fn word(bytes: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        w[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(w)
    }

    /// A start's bit in [`Anchors::bits`] (multiplicative hashing).
    fn slot(start: u64) -> usize {
        (start.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - ANCHOR_SLOT_BITS)) as usize
    }

    /// Whether some `len` bytes of `data` are the start of an anchor:
    /// false means no pattern is in `data`.
    fn may_match(&self, data: &[u8]) -> bool {
        let n = self.len;
        if data.len() < n {
            return false;
        }
        let mask = if n == 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 };
        let hit = |start: u64| {
            let slot = Self::slot(start);
            self.bits[slot / 64] & (1 << (slot % 64)) != 0 && self.starts.contains(&start)
        };
        // Whole 8-byte loads while they fit, then the last few positions.
        let whole = data.len().saturating_sub(7);
        for at in 0..whole {
            let word = u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
            if hit(word & mask) {
                return true;
            }
        }
        (whole..=data.len() - n).any(|at| hit(Self::word(&data[at..at + n])))
    }
}

/// FNV-1a for [`Compiled::prefixes`]: a set fixed when the secret is
/// compiled, looked up with at most [`WINDOW`] − 1 short keys per chunk.
/// Keys chosen by an upstream cannot make a fixed set's lookups slower
/// than its own probe lengths, so SipHash's defence buys nothing here and
/// its cost showed in a small response's scrubbing (`bench proxy`, perf).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Patterns are secret material: only their number.
        f.debug_struct("Patterns").field("count", &self.inner.matcher.patterns_len()).finish_non_exhaustive()
    }
}

impl Patterns {
    /// Matches every form of `secret` and, for `injected_value` (the header
    /// value the proxy sends) of the form `Basic <base64>`, of the decoded
    /// `user:password` and its password.
    pub fn for_secret(secret: &[u8], injected_value: &[u8]) -> Result<Patterns, ScrubError> {
        if secret.is_empty() {
            return Err(ScrubError::Empty);
        }
        let mut roots: Vec<Zeroizing<Vec<u8>>> = vec![Zeroizing::new(secret.to_vec())];
        roots.extend(basic_roots(injected_value));
        let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for root in &roots {
            forms.extend(secret_forms(root));
        }
        Patterns::new(&forms, &roots)
    }

    /// Matches `forms` (derived: dropped below [`MIN_DERIVED`] bytes) and
    /// `roots` (always), each by its windows when long enough.
    pub fn new(forms: &[Zeroizing<Vec<u8>>], roots: &[Zeroizing<Vec<u8>>]) -> Result<Patterns, ScrubError> {
        let mut patterns: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut seen: HashSet<&[u8]> = HashSet::new();
        // What the patterns are cut from (the anchors too: the same list,
        // or the anchors could miss a pattern).
        let derived = forms.iter().filter(|f| f.len() >= MIN_DERIVED);
        let matched: Vec<&[u8]> = roots.iter().filter(|r| !r.is_empty()).chain(derived).map(|f| f.as_slice()).collect();
        for form in matched.iter().copied() {
            let pieces: Vec<&[u8]> = if form.len() > WINDOW { form.windows(WINDOW).collect() } else { vec![form] };
            for piece in pieces {
                if seen.insert(piece) {
                    patterns.push(Zeroizing::new(piece.to_vec()));
                }
            }
        }
        let matcher = AhoCorasickBuilder::new().match_kind(MatchKind::Standard).build(patterns.iter().map(|p| p.as_slice()))?;
        let anchors = Anchors::new(matched.iter().copied());
        let longest = patterns.iter().map(|p| p.len()).max().unwrap_or(1);
        let mut prefixes = HashSet::default();
        for p in &patterns {
            for len in 1..p.len() {
                prefixes.insert(Box::from(&p[..len]));
            }
        }
        Ok(Patterns { inner: Arc::new(Compiled { anchors, matcher, prefixes, longest }) })
    }

    /// A fresh stream.
    pub fn scrubber(&self) -> Scrubber {
        Scrubber { patterns: self.clone(), tail: Vec::new(), tail_mask: Vec::new(), sent: 0, run: 0, redactions: 0 }
    }

    /// `data` in one piece (a header value): the scrubbed bytes, and how
    /// many redactions were made (0: unchanged).
    pub fn scrub(&self, data: &[u8]) -> (Vec<u8>, u64) {
        if !self.is_match(data) {
            return (data.to_vec(), 0);
        }
        let mut s = self.scrubber();
        let mut out = s.push(data).into_owned();
        out.extend(s.finish());
        (out, s.redactions())
    }

    /// Whether both are the same compiled patterns (not a copy).
    pub fn shares(&self, other: &Patterns) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether `data` holds a complete match.
    pub fn is_match(&self, data: &[u8]) -> bool {
        self.inner.is_match(data)
    }

    /// [`Patterns::is_match`] by the automaton alone, without the anchors'
    /// first look (what the fuzz targets check that look against).
    #[doc(hidden)]
    pub fn is_match_by_automaton(&self, data: &[u8]) -> bool {
        self.inner.matcher.is_match(data)
    }
}

impl Compiled {
    /// Whether `data` holds a complete match: the anchors first.
    fn is_match(&self, data: &[u8]) -> bool {
        self.anchors.as_ref().is_none_or(|a| a.may_match(data)) && self.matcher.is_match(data)
    }

    /// The length of the longest suffix of `buf` that could still grow
    /// into a match.
    fn hold(&self, buf: &[u8]) -> usize {
        let most = self.longest.saturating_sub(1).min(buf.len());
        (1..=most).rev().find(|n| self.prefixes.contains(&buf[buf.len() - n..])).unwrap_or(0)
    }
}

/// One stream's state: the last bytes it saw (the context a match across
/// the next chunk boundary needs), of which the first `sent` went out and
/// the rest are held back, and which of them are part of a match.
pub struct Scrubber {
    patterns: Patterns,
    tail: Vec<u8>,
    tail_mask: Vec<bool>,
    sent: usize,
    /// Position in [`MARKER`] of the next redacted byte.
    run: usize,
    redactions: u64,
}

impl Scrubber {
    /// Takes the next chunk; returns what can be sent now (the chunk
    /// itself, not copied, when nothing in it is or may become a match).
    pub fn push<'a>(&mut self, chunk: &'a [u8]) -> Cow<'a, [u8]> {
        let compiled = self.patterns.inner.clone();
        let keep = compiled.longest.saturating_sub(1);
        if self.sent == self.tail.len() && !chunk.is_empty() {
            // Nothing held: the chunk goes as it is unless a match is in
            // it, crosses into it, or may start at its end. With no tail
            // (a response's first chunk) the edge is the chunk's own start.
            let clean = if self.tail.is_empty() {
                !compiled.is_match(chunk) && compiled.hold(chunk) == 0
            } else {
                let edge = [&self.tail[..], &chunk[..chunk.len().min(keep)]].concat();
                let end = if chunk.len() >= keep { chunk } else { &edge[..] };
                !compiled.is_match(&edge[..]) && !compiled.is_match(chunk) && compiled.hold(end) == 0
            };
            if clean {
                self.remember(chunk);
                self.run = 0;
                return Cow::Borrowed(chunk);
            }
        }
        let seen = self.tail.len();
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(chunk);
        let mut mask = std::mem::take(&mut self.tail_mask);
        mask.resize(buf.len(), false);
        for m in compiled.matcher.find_overlapping_iter(&buf[..]) {
            if m.end() <= seen {
                // Wholly inside the tail: found by an earlier push.
                continue;
            }
            let (start, end) = (m.start(), m.end());
            let continues = start > 0 && mask[start - 1];
            if !continues && !mask[start..end].iter().any(|b| *b) {
                self.redactions += 1;
            }
            mask[start..end].fill(true);
        }
        // Hold back the longest suffix that could still grow into a match
        // (of what is not sent yet).
        let hold = compiled.hold(&buf).min(buf.len() - self.sent);
        let emit = buf.len() - hold;
        let out = self.render(&buf[self.sent..emit], &mask[self.sent..emit]);
        let from = buf.len().saturating_sub(keep.max(hold));
        self.sent = emit - from;
        self.tail = buf.split_off(from);
        self.tail_mask = mask.split_off(from);
        Cow::Owned(out)
    }

    /// The end of the stream: the held-back bytes (no longer a possible
    /// match start).
    pub fn finish(&mut self) -> Vec<u8> {
        let tail = std::mem::take(&mut self.tail);
        let mask = std::mem::take(&mut self.tail_mask);
        let out = self.render(&tail[self.sent..], &mask[self.sent..]);
        self.sent = 0;
        out
    }

    /// Redactions so far (a run of overlapping or adjacent matches is one).
    pub fn redactions(&self) -> u64 {
        self.redactions
    }

    /// Bytes held back (for a body's size hint).
    pub fn held(&self) -> usize {
        self.tail.len() - self.sent
    }

    /// How long the upstream may stay silent before the held-back bytes
    /// go out anyway ([`Scrubber::release`]); None when none are held.
    pub fn release_after(&self) -> Option<std::time::Duration> {
        match self.held() {
            0 => None,
            n if n < LIKELY => Some(SHORT_WAIT),
            _ => Some(LONG_WAIT),
        }
    }

    /// Sends the held-back bytes now (the stream carries on: they stay
    /// as context, a match through them redacts what follows).
    pub fn release(&mut self) -> Vec<u8> {
        let (tail, mask) = (std::mem::take(&mut self.tail), std::mem::take(&mut self.tail_mask));
        let out = self.render(&tail[self.sent..], &mask[self.sent..]);
        (self.tail, self.tail_mask) = (tail, mask);
        self.sent = self.tail.len();
        out
    }

    /// Keeps the last bytes of `chunk` (all sent, none matched) as context.
    fn remember(&mut self, chunk: &[u8]) {
        let keep = self.patterns.inner.longest.saturating_sub(1);
        self.tail.extend_from_slice(chunk);
        self.tail_mask.resize(self.tail.len(), false);
        let from = self.tail.len().saturating_sub(keep);
        self.tail.drain(..from);
        self.tail_mask.drain(..from);
        self.sent = self.tail.len();
    }

    fn render(&mut self, bytes: &[u8], mask: &[bool]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        for (b, masked) in bytes.iter().zip(mask) {
            if *masked {
                out.push(MARKER[self.run % MARKER.len()]);
                self.run += 1;
            } else {
                out.push(*b);
                self.run = 0;
            }
        }
        out
    }
}

/// For `Basic <base64>`: the decoded `user:password` and the password.
fn basic_roots(value: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let Some(encoded) = value.get(..6).filter(|p| p.eq_ignore_ascii_case(b"basic ")).map(|_| value[6..].trim_ascii()) else {
        return Vec::new();
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded).map(Zeroizing::new) else {
        return Vec::new();
    };
    let Some(colon) = decoded.iter().position(|b| *b == b':') else {
        return Vec::new();
    };
    let mut roots = vec![Zeroizing::new(decoded.to_vec())];
    if decoded.len() > colon + 1 {
        roots.push(Zeroizing::new(decoded[colon + 1..].to_vec()));
    }
    roots
}

/// The forms of `root` an honest reflection could carry (see the module
/// documentation), deduplicated, `root` itself first.
pub fn secret_forms(root: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut text: Vec<Zeroizing<Vec<u8>>> = vec![Zeroizing::new(root.to_vec())];
    for upper in [true, false] {
        text.push(percent(root, upper, false));
        text.push(percent(root, upper, true));
    }
    text.push(form_encoded(root));
    for style in [Json::Minimal, Json::Slash, Json::HtmlSafe] {
        text.push(json(root, style));
    }
    text.push(html(root, b"&#39;"));
    text.push(html(root, b"&#x27;"));
    let mut forms = Vec::new();
    for t in &text {
        forms.push(t.clone());
        for alphabet in [&base64::engine::general_purpose::STANDARD_NO_PAD, &base64::engine::general_purpose::URL_SAFE_NO_PAD] {
            for alignment in 0..3 {
                let core = base64_core(t, alignment, alphabet);
                // base64 inside a URL or a JSON string of some encoders.
                forms.push(percent(&core, true, false));
                forms.push(json(&core, Json::Slash));
                forms.push(core);
            }
        }
    }
    forms.push(Zeroizing::new(hex(root, b"0123456789abcdef")));
    forms.push(Zeroizing::new(hex(root, b"0123456789ABCDEF")));
    let mut seen = HashSet::new();
    forms.retain(|f| !f.is_empty() && seen.insert(f.to_vec()));
    forms
}

/// The base64 characters of `data` placed `alignment` bytes into a 3-byte
/// group that depend on `data` alone: present in the encoding of any
/// string containing `data` at that alignment.
pub fn base64_core(data: &[u8], alignment: usize, alphabet: &base64::engine::GeneralPurpose) -> Zeroizing<Vec<u8>> {
    let mut shifted = Zeroizing::new(vec![0u8; alignment]);
    shifted.extend_from_slice(data);
    let encoded = Zeroizing::new(alphabet.encode(&shifted[..]).into_bytes());
    // The first group's characters that mix in the bytes before `data`.
    let skip = [0, 2, 3][alignment];
    // The last character of a partial group mixes in the bytes after it.
    let end = match shifted.len() % 3 {
        0 => encoded.len(),
        _ => encoded.len().saturating_sub(1),
    };
    Zeroizing::new(if skip < end { encoded[skip..end].to_vec() } else { Vec::new() })
}

fn percent(data: &[u8], upper: bool, every_byte: bool) -> Zeroizing<Vec<u8>> {
    let digits = if upper { b"0123456789ABCDEF" } else { b"0123456789abcdef" };
    let mut out = Zeroizing::new(Vec::with_capacity(data.len() * 3));
    for &b in data {
        if !every_byte && (b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]);
        }
    }
    out
}

/// `application/x-www-form-urlencoded`: as [`percent`] with a space as `+`.
fn form_encoded(data: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(data.len() * 3));
    for &b in data {
        if b == b' ' {
            out.push(b'+');
        } else {
            out.extend_from_slice(&percent(&[b], true, false));
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Json {
    /// `"` and `\` and control characters (serde_json, Python, JavaScript).
    Minimal,
    /// Also `/` as `\/` (PHP).
    Slash,
    /// Also `<`, `>`, `&` as `\u003c` … (Go's encoding/json).
    HtmlSafe,
}

fn json(data: &[u8], style: Json) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(data.len() + 8));
    for &b in data {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' if matches!(style, Json::Slash) => out.extend_from_slice(b"\\/"),
            b'<' | b'>' | b'&' if matches!(style, Json::HtmlSafe) => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..0x20 | 0x7f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

fn html(data: &[u8], apostrophe: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(data.len() + 8));
    for &b in data {
        match b {
            b'&' => out.extend_from_slice(b"&amp;"),
            b'<' => out.extend_from_slice(b"&lt;"),
            b'>' => out.extend_from_slice(b"&gt;"),
            b'"' => out.extend_from_slice(b"&quot;"),
            b'\'' => out.extend_from_slice(apostrophe),
            _ => out.push(b),
        }
    }
    out
}

fn hex(data: &[u8], digits: &[u8; 16]) -> Vec<u8> {
    data.iter().flat_map(|b| [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

    /// Not a real secret: characters that make every encoding differ.
    const SECRET: &[u8] = b"sk-live/Adv+T3st\"q\\Z~<&>0123456789abcdef";

    fn patterns() -> Patterns {
        Patterns::for_secret(SECRET, b"Bearer sk-live/Adv+T3st\"q\\Z~<&>0123456789abcdef").unwrap()
    }

    /// Every window of every form of `secret` (as `Patterns::new` cuts
    /// them), and the patterns made of them.
    fn windows_of(secret: &[u8], injected: &[u8]) -> (Vec<Vec<u8>>, Patterns) {
        let mut roots: Vec<Zeroizing<Vec<u8>>> = vec![Zeroizing::new(secret.to_vec())];
        roots.extend(basic_roots(injected));
        let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for root in &roots {
            forms.extend(secret_forms(root));
        }
        let mut windows = Vec::new();
        for f in roots.iter().filter(|r| !r.is_empty()).chain(forms.iter().filter(|f| f.len() >= MIN_DERIVED)) {
            if f.len() > WINDOW {
                windows.extend(f.windows(WINDOW).map(<[u8]>::to_vec));
            } else {
                windows.push(f.to_vec());
            }
        }
        (windows, Patterns::for_secret(secret, injected).unwrap())
    }

    #[test]
    fn the_anchors_never_hide_a_window_of_any_form() {
        // Secrets of every length around the window and the anchor sizes,
        // and a Basic credential (its user:password and password roots).
        let mut secrets: Vec<(Vec<u8>, Vec<u8>)> = (4..=40).map(|n| (SECRET[..n].to_vec(), Vec::new())).collect();
        secrets.push((b"dXNlcjpwYXNzd29yZDEyMw==".to_vec(), b"Basic dXNlcjpwYXNzd29yZDEyMw==".to_vec()));
        let filler = b"{\"id\": 42, \"items\": [\"alpha\", \"beta\"], \"note\": \"0123456789 abcdef ABCDEF+/=%\"}";
        for (secret, injected) in &secrets {
            let (windows, p) = windows_of(secret, injected);
            let anchored = p.inner.anchors.is_some();
            assert_eq!(anchored, secret.len() >= MIN_ANCHOR, "anchors for a secret of {} bytes", secret.len());
            for w in &windows {
                // Alone, and inside ordinary bytes at every alignment.
                for lead in 0..9 {
                    let mut text = filler[..lead].to_vec();
                    text.extend_from_slice(w);
                    text.extend_from_slice(&filler[..11]);
                    assert!(p.is_match(&text), "a window of a {}-byte secret's form was missed (lead {lead})", secret.len());
                }
                assert!(p.is_match(w));
            }
            assert!(!p.is_match(filler) && !p.is_match_by_automaton(filler));
        }
    }

    #[test]
    fn the_anchors_agree_with_the_automaton_on_ordinary_text_and_pieces() {
        let (windows, p) = windows_of(SECRET, b"Bearer sk-live/Adv+T3st\"q\\Z~<&>0123456789abcdef");
        assert!(p.inner.anchors.is_some());
        // Pieces of windows (most too short to match) among ordinary bytes,
        // cut at every length: both must say the same of each.
        let mut x: u64 = 0x5eed;
        for _ in 0..3000 {
            let mut text = Vec::new();
            for _ in 0..6 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let w = &windows[(x >> 33) as usize % windows.len()];
                let (from, to) = ((x >> 8) as usize % w.len(), (x >> 20) as usize % (w.len() + 1));
                text.extend_from_slice(&w[from.min(to)..from.max(to)]);
                text.extend_from_slice(&b" ,:\"0aZ"[..(x >> 40) as usize % 8]);
            }
            for end in 0..=text.len() {
                assert_eq!(p.is_match(&text[..end]), p.is_match_by_automaton(&text[..end]), "{:?}", String::from_utf8_lossy(&text[..end]));
            }
        }
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// No run of WINDOW bytes of `form` survives in `out`.
    fn no_window_of(out: &[u8], form: &[u8]) -> bool {
        let w = WINDOW.min(form.len());
        !form.windows(w).any(|piece| contains(out, piece))
    }

    /// The longest run of marker bytes in `out`.
    fn marker_run(out: &[u8]) -> usize {
        (0..out.len()).filter(|i| out[*i] == MARKER[0]).map(|i| out[i..].iter().zip(MARKER.iter().cycle()).take_while(|(a, b)| a == b).count()).max().unwrap_or(0)
    }

    fn stream(p: &Patterns, chunks: &[&[u8]]) -> (Vec<u8>, u64) {
        let mut s = p.scrubber();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&s.push(c));
        }
        out.extend(s.finish());
        (out, s.redactions())
    }

    #[test]
    fn a_split_at_every_offset_is_caught() {
        let p = patterns();
        let body = [b"{\"headers\": {\"authorization\": \"Bearer ".as_slice(), SECRET, b"\"}, \"tail\": true}"].concat();
        let (whole, n) = p.scrub(&body);
        assert_eq!(n, 1);
        assert_eq!(whole.len(), body.len(), "same length: Content-Length stays true");
        assert!(no_window_of(&whole, SECRET) && contains(&whole, b"[REDACTED][REDACTED]"));
        for cut in 0..=body.len() {
            let (out, n) = stream(&p, &[&body[..cut], &body[cut..]]);
            assert_eq!(out, whole, "split at {cut}");
            assert_eq!(n, 1, "split at {cut}");
        }
        // Three pieces, every pair of offsets, and one byte at a time.
        for a in 0..body.len() {
            for b in a..body.len() {
                let (out, _) = stream(&p, &[&body[..a], &body[a..b], &body[b..]]);
                assert_eq!(out, whole, "split at {a} and {b}");
            }
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(stream(&p, &bytes).0, whole);
    }

    #[test]
    fn encodings_are_caught_at_every_alignment() {
        let p = patterns();
        for prefix_len in 0..6 {
            for suffix_len in 0..4 {
                let text = [b"Authorization: Bearer ".as_slice(), SECRET, b"\n"].concat();
                let data = [vec![b'x'; prefix_len], text, vec![b'y'; suffix_len]].concat();
                for (name, encoded) in [
                    ("standard padded", STANDARD.encode(&data)),
                    ("standard", STANDARD_NO_PAD.encode(&data)),
                    ("url-safe padded", URL_SAFE.encode(&data)),
                    ("url-safe", URL_SAFE_NO_PAD.encode(&data)),
                ] {
                    let (out, n) = p.scrub(encoded.as_bytes());
                    assert!(n >= 1, "{name} at {prefix_len}/{suffix_len}");
                    // Of the secret's own characters, at most the few at
                    // each edge that mix in neighbouring bits survive.
                    assert!(marker_run(&out) >= SECRET.len() * 4 / 3 - 4, "{name} at {prefix_len}/{suffix_len}: {}", String::from_utf8_lossy(&out));
                }
            }
        }
        let dumped = serde_json::to_vec(&serde_json::json!({ "authorization": String::from_utf8_lossy(SECRET) })).unwrap();
        let (out, n) = p.scrub(&dumped);
        assert!(n == 1 && no_window_of(&out, &dumped[18..dumped.len() - 2]), "{}", String::from_utf8_lossy(&out));
        for form in [
            percent(SECRET, true, false),
            percent(SECRET, false, false),
            percent(SECRET, true, true),
            json(SECRET, Json::Slash),
            json(SECRET, Json::HtmlSafe),
            html(SECRET, b"&#39;"),
            Zeroizing::new(hex(SECRET, b"0123456789abcdef")),
            percent(&base64_core(SECRET, 1, &STANDARD_NO_PAD), true, false),
        ] {
            let form: Vec<u8> = form.to_vec();
            let data = [b"q=".as_slice(), &form, b"&x=1"].concat();
            let (out, n) = p.scrub(&data);
            assert_eq!(n, 1, "{}", String::from_utf8_lossy(&form));
            assert!(no_window_of(&out, &form) && out.len() == data.len());
        }
    }

    #[test]
    fn fragments_of_a_window_or_more_are_caught_and_text_is_left_alone() {
        let p = patterns();
        // A reflection that truncates the value.
        let truncated = [b"Authorization: Bearer ".as_slice(), &SECRET[..WINDOW], b"..."].concat();
        let (out, n) = p.scrub(&truncated);
        assert_eq!(n, 1);
        assert!(!contains(&out, &SECRET[..WINDOW]));
        let (out, n) = p.scrub(&SECRET[..WINDOW - 1]);
        assert_eq!((out.as_slice(), n), (&SECRET[..WINDOW - 1], 0), "shorter than a window: not recognised");
        let text = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"login\": \"octocat\", \"id\": 1}";
        assert_eq!(p.scrub(text), (text.to_vec(), 0));
        // Two reflections: two redactions, each a run of marker bytes.
        let twice = [SECRET, b" and ".as_slice(), SECRET].concat();
        let (out, n) = p.scrub(&twice);
        assert_eq!(n, 2);
        assert_eq!(&out[..10], MARKER);
        assert_eq!(&out[SECRET.len()..SECRET.len() + 5], b" and ");
        assert_eq!(&out[SECRET.len() + 5..SECRET.len() + 15], MARKER);
    }

    #[test]
    fn streams_hold_back_only_a_possible_match_start() {
        let p = patterns();
        let mut s = p.scrubber();
        // Text that cannot start a match goes out at once (an SSE event).
        let event = b"data: {\"delta\":\"hi\"}\n\n".as_slice();
        assert!(matches!(s.push(event), Cow::Borrowed(e) if e == event), "passed on as it is");
        assert_eq!(s.held(), 0);
        // The first bytes of the secret wait for the rest.
        let out = s.push(&[b"event: x\n".as_slice(), &SECRET[..10]].concat()).into_owned();
        assert_eq!(out, b"event: x\n");
        assert_eq!(s.held(), 10);
        assert_eq!(s.release_after(), Some(LONG_WAIT));
        let out = s.push(&SECRET[10..]).into_owned();
        let rest = s.finish();
        let all = [out, rest].concat();
        assert_eq!(all.len(), SECRET.len());
        assert!(all.iter().all(|b| MARKER.contains(b)));
        assert_eq!(s.redactions(), 1);
        // A byte some window starts with waits briefly: released (the
        // upstream went quiet), it goes out as it is, and stays context.
        let mut s = p.scrubber();
        assert_eq!(&*s.push(b"ab s"), b"ab ");
        assert_eq!(s.release_after(), Some(SHORT_WAIT));
        assert_eq!(s.release(), b"s");
        assert_eq!((s.held(), s.release_after()), (0, None));
        let rest = [s.push(&SECRET[1..]).into_owned(), s.finish()].concat();
        assert_eq!(rest.len(), SECRET.len() - 1);
        assert!(rest.iter().all(|b| MARKER.contains(b)) && s.redactions() == 1, "{}", String::from_utf8_lossy(&rest));
        // Held bytes that turn out not to be the secret come out unchanged.
        let mut s = p.scrubber();
        let out = s.push(&SECRET[..10]).into_owned();
        let out = [out, s.push(b" no").into_owned(), s.finish()].concat();
        assert_eq!(out, [&SECRET[..10], b" no".as_slice()].concat());
        assert_eq!(s.redactions(), 0);
    }

    #[test]
    fn basic_credentials_and_short_secrets() {
        let value = format!("Basic {}", STANDARD.encode("robot:pa55w0rd-of-the-robot"));
        let secret = value[6..].to_string();
        let p = Patterns::for_secret(secret.as_bytes(), value.as_bytes()).unwrap();
        for leak in ["user robot:pa55w0rd-of-the-robot", "password=pa55w0rd-of-the-robot", value.as_str()] {
            let (out, n) = p.scrub(leak.as_bytes());
            assert!(n >= 1 && !contains(&out, b"pa55w0rd-of-the-robot") && !contains(&out, secret.as_bytes()), "{leak}");
        }
        // A short secret is matched raw, never by tiny derived forms.
        let p = Patterns::for_secret(b"abc", b"Bearer abc").unwrap();
        assert_eq!(p.scrub(b"YWJj abc"), (b"YWJj [RE".to_vec(), 1));
        assert!(Patterns::for_secret(b"", b"").is_err());
        assert!(!format!("{p:?}").contains("abc"));
    }
}
