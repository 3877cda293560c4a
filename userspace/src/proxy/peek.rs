//! What a guest's first bytes on a proxied connection say about where it
//! wants to go: the SNI of a TLS ClientHello, or the Host of an HTTP/1.x
//! request. Pure parsing, bounds-checked, unit-tested.

/// How much the proxy reads before deciding.
pub const PEEK_LIMIT: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstBytes {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A TLS ClientHello; `sni` from its server_name extension. A hello with
    /// an encrypted_client_hello extension is judged by its outer name:
    /// Chromium sends a dummy (GREASE) one in every hello, which cannot be
    /// told from a real one; a real one hides the inner name from us (a
    /// documented limit, like domain fronting).
    Tls { sni: Option<String> },
    /// An HTTP/1.x request head; `host` from its Host header or its
    /// absolute-form target.
    Http { host: Option<String> },
    /// An HTTP/1.x request head that names its destination ambiguously (two
    /// Host headers, an absolute-form target and a Host that differ, a folded
    /// header): servers and proxies disagree on such heads, so it is refused.
    AmbiguousHttp { reason: &'static str },
    /// Something else (or a malformed hello/request).
    Other,
}

pub fn classify(buf: &[u8]) -> FirstBytes {
    match buf.first() {
        None => FirstBytes::NeedMore,
        Some(&TLS_HANDSHAKE) => client_hello_sni(buf),
        Some(b) if b.is_ascii_uppercase() => http_host(buf),
        Some(_) => FirstBytes::Other,
    }
}

const TLS_HANDSHAKE: u8 = 0x16;
const TLS_RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
const EXT_SERVER_NAME: usize = 0;

/// A cursor that fails instead of reading past the end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

/// The SNI of the ClientHello carried by the leading handshake records.
/// A hello may be split over several records (and records over several
/// segments): the handshake message is reassembled from consecutive
/// handshake records, up to PEEK_LIMIT bytes. Anything else before the hello
/// is complete (another record type, an SSLv2 header) is `Other`.
fn client_hello_sni(buf: &[u8]) -> FirstBytes {
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + TLS_RECORD_HEADER) else {
            return need_more(buf);
        };
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != TLS_HANDSHAKE || header[1] != 3 || record_len == 0 {
            return FirstBytes::Other;
        }
        let Some(fragment) = buf.get(pos + TLS_RECORD_HEADER..pos + TLS_RECORD_HEADER + record_len) else {
            return need_more(buf);
        };
        handshake.extend_from_slice(fragment);
        pos += TLS_RECORD_HEADER + record_len;
        if handshake.len() < HANDSHAKE_HEADER {
            continue;
        }
        let message_len = (usize::from(handshake[1]) << 16) | (usize::from(handshake[2]) << 8) | usize::from(handshake[3]);
        if HANDSHAKE_HEADER + message_len > PEEK_LIMIT {
            return FirstBytes::Other;
        }
        if handshake.len() < HANDSHAKE_HEADER + message_len {
            continue;
        }
        return match parse_hello(&handshake[..HANDSHAKE_HEADER + message_len]) {
            Some(sni) => FirstBytes::Tls { sni },
            None => FirstBytes::Other,
        };
    }
}

fn need_more(buf: &[u8]) -> FirstBytes {
    if buf.len() < PEEK_LIMIT { FirstBytes::NeedMore } else { FirstBytes::Other }
}

fn parse_hello(record: &[u8]) -> Option<Option<String>> {
    let mut r = Reader { buf: record, pos: 0 };
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    let mut h = Reader { buf: body, pos: 0 };
    h.take(2 + 32)?; // version, random
    let session = h.u8()?;
    h.take(session)?;
    let suites = h.u16()?;
    h.take(suites)?;
    let compression = h.u8()?;
    h.take(compression)?;
    if h.pos == body.len() {
        return Some(None); // no extensions
    }
    let ext_len = h.u16()?;
    let mut e = Reader { buf: h.take(ext_len)?, pos: 0 };
    let mut sni = None;
    let mut seen_sni = false;
    while e.pos < e.buf.len() {
        let kind = e.u16()?;
        let len = e.u16()?;
        let data = e.take(len)?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        if seen_sni {
            return None; // two server_name extensions: malformed (RFC 8446 4.2)
        }
        seen_sni = true;
        // server_name: list length, then (type, length, name)…
        let mut s = Reader { buf: data, pos: 0 };
        let list = s.u16()?;
        let mut l = Reader { buf: s.take(list)?, pos: 0 };
        while l.pos < l.buf.len() {
            let name_type = l.u8()?;
            let n = l.u16()?;
            let name = l.take(n)?;
            if name_type == 0 {
                if sni.is_some() {
                    return None; // two host names: which one would the server use?
                }
                sni = Some(host_name(name)?);
            }
        }
    }
    Some(sni)
}

/// A host name as the policy matches it: printable ASCII without spaces,
/// lowercase, without the root dot. Anything else (NUL, control bytes,
/// UTF-8) is malformed: a server and the policy could read it differently.
fn host_name(raw: &[u8]) -> Option<String> {
    if raw.is_empty() || !raw.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let name = std::str::from_utf8(raw).ok()?.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// The host an HTTP/1.x request head is for, without its port: from the
/// Host header, or from an absolute-form target (`GET http://h/ HTTP/1.1`),
/// which a server prefers to Host (RFC 9112 3.2.2). Heads that name two
/// hosts are ambiguous.
fn http_host(buf: &[u8]) -> FirstBytes {
    // A first line that is not a request line says enough (a banner of
    // another protocol need not wait for a blank line that never comes).
    if let Some(first_end) = buf.iter().position(|b| *b == b'\n') {
        if request_line(&buf[..first_end]).is_none() {
            return FirstBytes::Other;
        }
    }
    let Some(end) = head_end(buf, 0) else {
        return need_more(buf);
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else { return FirstBytes::Other };
    // Lines end with CRLF or, as servers also accept, a bare LF.
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let Some((method, target)) = lines.next().and_then(|l| request_line(l.as_bytes())) else {
        return FirstBytes::Other;
    };
    let mut host_header = None;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return FirstBytes::AmbiguousHttp { reason: "folded header line" };
        }
        let Some((name, value)) = line.split_once(':') else {
            return FirstBytes::AmbiguousHttp { reason: "header line without a colon" };
        };
        if name != name.trim() {
            return FirstBytes::AmbiguousHttp { reason: "white space before a header's colon" };
        }
        if name.eq_ignore_ascii_case("host") {
            if host_header.is_some() {
                return FirstBytes::AmbiguousHttp { reason: "two Host headers" };
            }
            host_header = Some(normal_host(value.trim()));
        }
    }
    // CONNECT's authority-form target is where the tunnel goes.
    let authority = if method == "CONNECT" { Some(target) } else { absolute_form_authority(target) };
    let absolute = authority.map(normal_host);
    let host = match (absolute, host_header) {
        (Some(a), Some(h)) if a != h => return FirstBytes::AmbiguousHttp { reason: "absolute-form target and Host differ" },
        (Some(a), _) => Some(a),
        (None, h) => h,
    };
    if host.as_deref() == Some("") {
        return FirstBytes::Http { host: None };
    }
    FirstBytes::Http { host }
}

/// The authority of an absolute-form request target, without user info.
fn absolute_form_authority(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    Some(authority.rsplit_once('@').map_or(authority, |(_, host)| host))
}

fn normal_host(host: &str) -> String {
    strip_port(host).trim_end_matches('.').to_ascii_lowercase()
}

/// `name:port`, `[v6]:port`, `[v6]`, `name` → the host part.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    }
}

/// `METHOD TARGET HTTP/1.x` (CR stripped): the method and target.
fn request_line(line: &[u8]) -> Option<(&str, &str)> {
    let line = std::str::from_utf8(line.strip_suffix(b"\r").unwrap_or(line)).ok()?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    (matches!(version, "HTTP/1.1" | "HTTP/1.0") && !method.is_empty() && !target.is_empty()).then_some((method, target))
}

/// Where the head ends (the index of the newline that ends its last
/// line): the first empty line (`\n\n` or `\n\r\n`) at or after `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    let tail = buf.get(start..)?;
    tail.iter().enumerate().find_map(|(i, b)| {
        if *b != b'\n' {
            return None;
        }
        match (tail.get(i + 1), tail.get(i + 2)) {
            (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => Some(start + i),
            _ => None,
        }
    })
}

/// Reads a connection's first bytes incrementally: each pushed chunk costs
/// work in proportion to its own size (a head or hello trickled a byte at a
/// time must not be re-parsed from its start at every byte); the whole
/// buffer is parsed once, when it can be complete.
#[derive(Debug, Default)]
pub struct Peeker {
    buf: Vec<u8>,
    /// HTTP: the terminator was searched for up to here.
    scanned: usize,
    /// TLS: the end of the last complete record, and the handshake bytes
    /// those records carried.
    records_end: usize,
    handshake_len: usize,
}

impl Peeker {
    pub fn push(&mut self, bytes: &[u8]) -> FirstBytes {
        let before = self.buf.len();
        self.buf.extend_from_slice(bytes);
        let verdict = match self.buf.first() {
            None => FirstBytes::NeedMore,
            Some(&TLS_HANDSHAKE) => self.tls_ready(),
            Some(b) if b.is_ascii_uppercase() => self.http_ready(before),
            Some(_) => FirstBytes::Other,
        };
        if verdict == FirstBytes::NeedMore && self.buf.len() >= PEEK_LIMIT {
            return FirstBytes::Other;
        }
        verdict
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn http_ready(&mut self, before: usize) -> FirstBytes {
        let new = &self.buf[before..];
        let first_line_ends_now = new.contains(&b'\n') && !self.buf[..before].contains(&b'\n');
        let complete = head_end(&self.buf, self.scanned).is_some();
        self.scanned = self.buf.len();
        if first_line_ends_now || complete { classify(&self.buf) } else { FirstBytes::NeedMore }
    }

    fn tls_ready(&mut self) -> FirstBytes {
        while let Some(header) = self.buf.get(self.records_end..self.records_end + TLS_RECORD_HEADER) {
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != TLS_HANDSHAKE || header[1] != 3 || len == 0 {
                return classify(&self.buf);
            }
            if self.buf.len() < self.records_end + TLS_RECORD_HEADER + len {
                break;
            }
            self.records_end += TLS_RECORD_HEADER + len;
            self.handshake_len += len;
        }
        let complete = match self.handshake_header() {
            Some(message_len) => self.handshake_len >= HANDSHAKE_HEADER + message_len || HANDSHAKE_HEADER + message_len > PEEK_LIMIT,
            None => false,
        };
        if complete { classify(&self.buf) } else { FirstBytes::NeedMore }
    }

    /// The handshake message's length, once its 4-byte header is in.
    fn handshake_header(&self) -> Option<usize> {
        if self.handshake_len < HANDSHAKE_HEADER {
            return None;
        }
        let mut header = [0u8; HANDSHAKE_HEADER];
        let (mut got, mut pos) = (0, 0);
        while got < HANDSHAKE_HEADER {
            let len = usize::from(u16::from_be_bytes([self.buf[pos + 3], self.buf[pos + 4]]));
            for b in &self.buf[pos + TLS_RECORD_HEADER..pos + TLS_RECORD_HEADER + len] {
                if got == HANDSHAKE_HEADER {
                    break;
                }
                header[got] = *b;
                got += 1;
            }
            pos += TLS_RECORD_HEADER + len;
        }
        Some((usize::from(header[1]) << 16) | (usize::from(header[2]) << 8) | usize::from(header[3]))
    }
}

/// Builds ClientHellos for tests, fuzz seeds and the adversary corpus (the
/// parser's own idea of the format, kept next to it).
pub mod hello {
    /// A ClientHello handshake message (TLS 1.2 layout, one suite) with
    /// these extensions (type, data).
    pub fn message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut message = vec![0x01];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    /// `message` in handshake records of at most `record` bytes each.
    pub fn records(message: &[u8], record: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(record.max(1)) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A server_name extension listing `names` (host_name type).
    pub fn server_name(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for n in names {
            list.push(0u8);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        (0, data)
    }

    /// An ALPN extension offering `protocols`.
    pub fn alpn(protocols: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for p in protocols {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        (16, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello in one record with an optional SNI (and an
    /// unrelated extension after it, which is skipped).
    fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut extensions: Vec<(u16, Vec<u8>)> = sni.map(|n| super::hello::server_name(&[n.as_bytes()])).into_iter().collect();
        extensions.push((0x000b, vec![0x01, 0x00]));
        let message = super::hello::message(&extensions);
        super::hello::records(&message, message.len())
    }

    #[test]
    fn tls_sni() {
        let h = hello(Some("API.Example.com."));
        assert_eq!(classify(&h), FirstBytes::Tls { sni: Some("api.example.com".into()) });
        assert_eq!(classify(&hello(None)), FirstBytes::Tls { sni: None });
        assert_eq!(classify(&h[..3]), FirstBytes::NeedMore);
        assert_eq!(classify(&h[..h.len() - 1]), FirstBytes::NeedMore);
        // Corrupt lengths never read out of bounds.
        for cut in 6..h.len() {
            let mut bad = h.clone();
            bad[cut] = 0xff;
            let _ = classify(&bad);
        }
    }

    #[test]
    fn http_host_header() {
        let req = b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(classify(req), FirstBytes::Http { host: Some("example.com".into()) });
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"), FirstBytes::Http { host: Some("2001:db8::1".into()) });
        assert_eq!(classify(b"GET / HTTP/1.0\r\n\r\n"), FirstBytes::Http { host: None });
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"), FirstBytes::AmbiguousHttp { reason: "two Host headers" });
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a.test\r\nhOsT: a.test\r\n\r\n"), FirstBytes::AmbiguousHttp { reason: "two Host headers" });
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a.test\r\nX: y\r\n b.test\r\n\r\n"), FirstBytes::AmbiguousHttp { reason: "folded header line" });
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost : b.test\r\n\r\n"), FirstBytes::AmbiguousHttp { reason: "white space before a header's colon" });
        assert_eq!(classify(b"GET http://b.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n"), FirstBytes::AmbiguousHttp { reason: "absolute-form target and Host differ" });
        assert_eq!(classify(b"GET http://u:p@A.test:80/x HTTP/1.1\r\nHost: a.test\r\n\r\n"), FirstBytes::Http { host: Some("a.test".into()) });
        assert_eq!(classify(b"GET http://b.test/ HTTP/1.0\r\n\r\n"), FirstBytes::Http { host: Some("b.test".into()) });
        assert_eq!(classify(b"CONNECT b.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n"), FirstBytes::AmbiguousHttp { reason: "absolute-form target and Host differ" });
        assert_eq!(classify(b"GET  / HTTP/1.1\r\nHost: a.test\r\n\r\n"), FirstBytes::Other);
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a.t"), FirstBytes::NeedMore);
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n\r\n"), FirstBytes::Other);
        assert_eq!(classify(b"\x00\x01"), FirstBytes::Other);
    }

    /// A hello split into records of every size, and delivered in every
    /// prefix: the same SNI once complete, NeedMore before.
    #[test]
    fn split_client_hello_is_reassembled() {
        let whole = hello(Some("other.test"));
        let message = &whole[5..];
        for size in [1, 2, 3, 4, 5, 17, message.len() - 1] {
            let mut split = Vec::new();
            for chunk in message.chunks(size) {
                split.extend_from_slice(&[0x16, 0x03, 0x01]);
                split.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
                split.extend_from_slice(chunk);
            }
            assert_eq!(classify(&split), FirstBytes::Tls { sni: Some("other.test".into()) }, "records of {size} bytes");
            for cut in 0..split.len() {
                assert_eq!(classify(&split[..cut]), FirstBytes::NeedMore, "records of {size} bytes, first {cut}");
            }
        }
        // Another record type before the hello is complete: not a hello.
        let mut interleaved = vec![0x16, 0x03, 0x01, 0x00, 0x04];
        interleaved.extend_from_slice(&message[..4]);
        interleaved.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        assert_eq!(classify(&interleaved), FirstBytes::Other);
        // A hello longer than we read is not named.
        let mut huge = vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x00];
        huge.resize(PEEK_LIMIT, 0);
        assert_eq!(classify(&huge), FirstBytes::Other);
    }

    /// Hellos whose SNI is not where the connection goes, or is unreadable.
    #[test]
    fn client_hellos_that_name_nothing_trustworthy() {
        use super::hello::server_name;
        let with_extensions = |extensions: &[(u16, Vec<u8>)]| {
            let message = super::hello::message(extensions);
            super::hello::records(&message, message.len())
        };
        let sni = |n: &[u8]| server_name(&[n]);
        assert_eq!(classify(&with_extensions(&[sni(b"a.test")])), FirstBytes::Tls { sni: Some("a.test".into()) });
        // ECH (or Chromium's GREASE ECH): judged by the outer name.
        assert_eq!(classify(&with_extensions(&[sni(b"public.test"), (0xfe0d, vec![0; 40])])), FirstBytes::Tls { sni: Some("public.test".into()) });
        // Two names, two extensions, bytes a server may read otherwise.
        assert_eq!(classify(&with_extensions(&[server_name(&[b"a.test", b"b.test"])])), FirstBytes::Other);
        assert_eq!(classify(&with_extensions(&[sni(b"a.test"), sni(b"b.test")])), FirstBytes::Other);
        assert_eq!(classify(&with_extensions(&[sni(b"a.test\0.evil")])), FirstBytes::Other);
        assert_eq!(classify(&with_extensions(&[sni(b"a test")])), FirstBytes::Other);
        assert_eq!(classify(&with_extensions(&[sni("\u{e9}.test".as_bytes())])), FirstBytes::Other);
        assert_eq!(classify(&with_extensions(&[sni(b".")])), FirstBytes::Other);
    }

    /// The incremental reader agrees with `classify` on every prefix, byte
    /// by byte, for hellos and heads of every shape.
    #[test]
    fn peeker_agrees_with_classify_byte_by_byte() {
        let whole = hello(Some("other.test"));
        let message = whole[5..].to_vec();
        let mut split = Vec::new();
        for chunk in message.chunks(3) {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            split.extend_from_slice(chunk);
        }
        let inputs: Vec<Vec<u8>> = vec![
            whole,
            split,
            hello(None),
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX: y\r\n\r\nbody".to_vec(),
            b"GET / HTTP/1.1\nHost: a.test\n\n".to_vec(),
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n".to_vec(),
            b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
            b"GET / HTTP/1.1\r\nHost: a.t\xffst\r\n\r\n".to_vec(),
            vec![0x17, 0x03, 0x03, 0, 1, 0],
            vec![0x16, 0x03, 0x01, 0, 0],
        ];
        for input in inputs {
            let mut peeker = Peeker::default();
            let mut last = FirstBytes::NeedMore;
            for (i, b) in input.iter().enumerate() {
                last = peeker.push(&[*b]);
                let reference = classify(&input[..=i]);
                if last != FirstBytes::NeedMore {
                    assert_eq!(last, reference, "{input:?} at {i}");
                    break;
                }
                assert!(reference == FirstBytes::NeedMore || matches!(reference, FirstBytes::Other), "{input:?} at {i}: peeker waits, classify says {reference:?}");
            }
            assert_eq!(last, classify(&input), "{input:?}: whole");
        }
        // A banner of another protocol is decided at its first line end.
        let mut p = Peeker::default();
        assert_eq!(p.push(b"SSH-2.0-OpenSSH"), FirstBytes::NeedMore);
        assert_eq!(p.push(b"\r\n"), FirstBytes::Other);
        assert_eq!(classify(b"GET / HTTP/1.1\nHost: a.test\n\n"), FirstBytes::Http { host: Some("a.test".into()) });
    }
}
