//! What a guest's first bytes on a proxied connection say about where it
//! wants to go: the SNI of a TLS ClientHello, or the Host of an HTTP/1.x
//! request. Pure parsing, bounds-checked, unit-tested.

/// How much the proxy reads before deciding.
pub const PEEK_LIMIT: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstBytes {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A TLS ClientHello; `sni` when it names a host.
    Tls { sni: Option<String> },
    /// An HTTP/1.x request head; `host` from its Host header.
    Http { host: Option<String> },
    /// Something else (or a malformed hello/request).
    Other,
}

pub fn classify(buf: &[u8]) -> FirstBytes {
    match buf.first() {
        None => FirstBytes::NeedMore,
        Some(0x16) => client_hello_sni(buf),
        Some(b) if b.is_ascii_uppercase() => http_host(buf),
        Some(_) => FirstBytes::Other,
    }
}

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

/// The SNI host name of a ClientHello in the first TLS record (a hello
/// split across records is read from the first record only: clients send
/// the extensions in the first one).
fn client_hello_sni(buf: &[u8]) -> FirstBytes {
    if buf.len() < 5 {
        return FirstBytes::NeedMore;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf[1] != 3 || record_len == 0 {
        return FirstBytes::Other;
    }
    let Some(record) = buf.get(5..5 + record_len) else {
        return if buf.len() < PEEK_LIMIT { FirstBytes::NeedMore } else { FirstBytes::Other };
    };
    match parse_hello(record) {
        Some(sni) => FirstBytes::Tls { sni },
        None => FirstBytes::Other,
    }
}

fn parse_hello(record: &[u8]) -> Option<Option<String>> {
    let mut r = Reader { buf: record, pos: 0 };
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let body = r.take(len.min(record.len() - r.pos))?;
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
    while e.pos < e.buf.len() {
        let kind = e.u16()?;
        let len = e.u16()?;
        let data = e.take(len)?;
        if kind != 0 {
            continue;
        }
        // server_name: list length, then (type, length, name)…
        let mut s = Reader { buf: data, pos: 0 };
        let list = s.u16()?;
        let mut l = Reader { buf: s.take(list)?, pos: 0 };
        while l.pos < l.buf.len() {
            let name_type = l.u8()?;
            let n = l.u16()?;
            let name = l.take(n)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
    }
    Some(None)
}

/// The Host header of an HTTP/1.x request head, without its port.
fn http_host(buf: &[u8]) -> FirstBytes {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() < PEEK_LIMIT { FirstBytes::NeedMore } else { FirstBytes::Other };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else { return FirstBytes::Other };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    if !request_line.ends_with("HTTP/1.1") && !request_line.ends_with("HTTP/1.0") {
        return FirstBytes::Other;
    }
    let mut hosts = lines.filter_map(|l| l.split_once(':')).filter(|(k, _)| k.trim().eq_ignore_ascii_case("host")).map(|(_, v)| v.trim());
    let host = hosts.next();
    if hosts.next().is_some() {
        // Two Host headers: ambiguous on purpose; treat as no host.
        return FirstBytes::Http { host: None };
    }
    FirstBytes::Http { host: host.map(strip_port).map(|h| h.trim_end_matches('.').to_ascii_lowercase()) }
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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2-style ClientHello with an optional SNI.
    fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            ext.extend_from_slice(&0u16.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        // An unrelated extension first would also be skipped; add one after.
        ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
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
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"), FirstBytes::Http { host: None });
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a.t"), FirstBytes::NeedMore);
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n\r\n"), FirstBytes::Other);
        assert_eq!(classify(b"\x00\x01"), FirstBytes::Other);
    }
}
