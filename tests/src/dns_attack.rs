//! DNS messages built byte by byte (what a hostile guest can send, valid or
//! not), a small reader for the answers, clients on raw UDP and TCP sockets
//! in a guest's namespace, and an upstream relay in the world that records
//! every message the DNS proxy sends upstream, byte for byte, and can answer
//! some names itself with records dnsmasq cannot serve (DNAME, records of
//! other owners, names with odd bytes).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sbx_vmm::NetNs;

pub const A: u16 = 1;
pub const NS: u16 = 2;
pub const CNAME: u16 = 5;
pub const SOA: u16 = 6;
pub const TXT: u16 = 16;
pub const AAAA: u16 = 28;
pub const DNAME: u16 = 39;
pub const OPT: u16 = 41;
pub const TSIG: u16 = 250;
pub const IXFR: u16 = 251;
pub const AXFR: u16 = 252;
pub const ANY: u16 = 255;
pub const IN: u16 = 1;
pub const CH: u16 = 3;
/// Header flag: recursion desired.
pub const RD: u16 = 0x0100;

/// The id every crafted query carries.
pub const ID: u16 = 0x5b5b;

/// A header: id [`ID`], `flags`, then QD, AN, NS, AR counts.
pub fn header(flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut h = ID.to_be_bytes().to_vec();
    h.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        h.extend_from_slice(&c.to_be_bytes());
    }
    h
}

/// A name from raw labels (any bytes, lengths as given: a label of 64 is
/// written with a length byte of 64).
pub fn wire_name(labels: &[&[u8]]) -> Vec<u8> {
    let mut n = Vec::new();
    for l in labels {
        n.push(l.len() as u8);
        n.extend_from_slice(l);
    }
    n.push(0);
    n
}

/// The labels of a dotted name (no escapes).
pub fn labels(name: &str) -> Vec<&[u8]> {
    name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()).map(str::as_bytes).collect()
}

pub fn question(labels: &[&[u8]], qtype: u16, class: u16) -> Vec<u8> {
    [wire_name(labels), qtype.to_be_bytes().to_vec(), class.to_be_bytes().to_vec()].concat()
}

/// A standard query (RD) for `labels`.
pub fn query(labels: &[&[u8]], qtype: u16) -> Vec<u8> {
    [header(RD, [1, 0, 0, 0]), question(labels, qtype, IN)].concat()
}

/// A record with an uncompressed owner.
pub fn record(owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    [owner, &rtype.to_be_bytes(), &IN.to_be_bytes(), &ttl.to_be_bytes(), &(rdata.len() as u16).to_be_bytes(), rdata].concat()
}

/// An OPT record: UDP size, version, DO bit, options (code, data).
pub fn opt(size: u16, version: u8, dnssec_ok: bool, options: &[(u16, &[u8])]) -> Vec<u8> {
    let data: Vec<u8> = options.iter().flat_map(|(code, v)| [&code.to_be_bytes()[..], &(v.len() as u16).to_be_bytes(), v].concat()).collect();
    let mut o = vec![0];
    o.extend_from_slice(&OPT.to_be_bytes());
    o.extend_from_slice(&size.to_be_bytes());
    o.extend_from_slice(&[0, version, if dnssec_ok { 0x80 } else { 0 }, 0]);
    o.extend_from_slice(&(data.len() as u16).to_be_bytes());
    o.extend_from_slice(&data);
    o
}

/// What a reply said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub id: u16,
    pub flags: u16,
    /// The mnemonic dig prints (`NOERROR`, `BADVERS`, `RCODE9`, ...),
    /// extended rcode bits from an OPT record included.
    pub rcode: String,
    /// The question's name as it came back, raw.
    pub qname: Vec<u8>,
    /// A and AAAA records of the answer section.
    pub addresses: Vec<IpAddr>,
    pub answer_count: u16,
}

/// The mnemonic of a (possibly extended) rcode.
pub fn rcode_name(code: u16) -> String {
    match code {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        16 => "BADVERS".into(),
        n => format!("RCODE{n}"),
    }
}

/// Skips a (possibly compressed) name at `at`; the offset after it.
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)?;
        if len == 0 {
            return Some(at + 1);
        }
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        at += 1 + usize::from(len);
    }
}

fn u16_at(m: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]))
}

/// Reads a reply; None when it is not a whole DNS message.
pub fn parse_reply(m: &[u8]) -> Option<Reply> {
    let id = u16_at(m, 0)?;
    let flags = u16_at(m, 2)?;
    let (qd, an, ns, ar) = (u16_at(m, 4)?, u16_at(m, 6)?, u16_at(m, 8)?, u16_at(m, 10)?);
    let mut at = 12;
    let mut qname = Vec::new();
    for i in 0..qd {
        let end = skip_name(m, at)?;
        if i == 0 {
            qname = m.get(at..end)?.to_vec();
        }
        at = end + 4;
    }
    let mut addresses = Vec::new();
    let mut high = 0u16;
    for i in 0..(an + ns + ar) {
        at = skip_name(m, at)?;
        let rtype = u16_at(m, at)?;
        let len = usize::from(u16_at(m, at + 8)?);
        let rdata = m.get(at + 10..at + 10 + len)?;
        if i < an {
            match (rtype, len) {
                (A, 4) => addresses.push(IpAddr::from(<[u8; 4]>::try_from(rdata).ok()?)),
                (AAAA, 16) => addresses.push(IpAddr::from(<[u8; 16]>::try_from(rdata).ok()?)),
                _ => {}
            }
        }
        if rtype == OPT && i >= an + ns {
            // The TTL field's first byte: the upper 8 bits of the rcode.
            high = u16::from(*m.get(at + 4)?);
        }
        at += 10 + len;
    }
    Some(Reply { id, flags, rcode: rcode_name(high << 4 | (flags & 0x0f)), qname, addresses, answer_count: an })
}

/// Sends one datagram from a socket in `guest` to `server` and waits up to
/// `wait` for the reply.
pub fn udp_exchange(guest: &NetNs, server: SocketAddr, message: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = guest.run(|| UdpSocket::bind("0.0.0.0:0")).expect("enter guest").expect("bind UDP in the guest");
    socket.send_to(message, server).expect("send the query");
    let started = Instant::now();
    let mut buf = vec![0u8; 65535];
    while started.elapsed() < wait {
        socket.set_read_timeout(Some((wait - started.elapsed()).max(Duration::from_millis(1)))).unwrap();
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from.port() == server.port() => return Some(buf[..n].to_vec()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// A TCP connection from `guest` to `server` (made in the guest's
/// namespace; usable from any thread).
pub fn tcp_connect(guest: &NetNs, server: SocketAddr) -> TcpStream {
    try_tcp_connect(guest, server).expect("connect over TCP")
}

/// [`tcp_connect`] that may fail: a server refusing connections past a cap
/// may reset one before connect() returns.
pub fn try_tcp_connect(guest: &NetNs, server: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = guest.run(|| TcpStream::connect_timeout(&server, Duration::from_secs(3))).expect("enter guest")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes `chunks` (each its own write: the caller decides the framing and
/// the segments) on a new connection and reads up to `replies` framed
/// answers, waiting at most `wait` in all; stops early at EOF or a reset.
pub fn tcp_exchange(guest: &NetNs, server: SocketAddr, chunks: &[Vec<u8>], pause: Duration, replies: usize, wait: Duration) -> Vec<Vec<u8>> {
    let mut stream = tcp_connect(guest, server);
    for chunk in chunks {
        if stream.write_all(chunk).is_err() {
            break;
        }
        // Shapes the attack (one segment per chunk); nothing waited for.
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    let started = Instant::now();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while out.len() < replies && started.elapsed() < wait {
        stream.set_read_timeout(Some((wait - started.elapsed()).max(Duration::from_millis(1)))).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            out.push(buf[2..2 + len].to_vec());
            buf.drain(..2 + len);
        }
    }
    out
}

/// Whether the peer has closed (or reset) `stream`: a read that returns
/// end-of-file or an error other than "nothing yet".
pub fn closed_by_peer(mut stream: &TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// A record the relay answers with.
#[derive(Clone, Debug)]
pub struct Rr {
    pub owner: Vec<u8>,
    pub rtype: u16,
    pub rdata: Vec<u8>,
}

impl Rr {
    pub fn a(owner: &str, ip: [u8; 4]) -> Rr {
        Rr { owner: wire_name(&labels(owner)), rtype: A, rdata: ip.to_vec() }
    }

    pub fn cname(owner: &str, target: &[&[u8]]) -> Rr {
        Rr { owner: wire_name(&labels(owner)), rtype: CNAME, rdata: wire_name(target) }
    }

    /// A DNAME; `target` raw (to send a compressed one too).
    pub fn dname(owner: &str, target: Vec<u8>) -> Rr {
        Rr { owner: wire_name(&labels(owner)), rtype: DNAME, rdata: target }
    }
}

/// The question of a query: (lower-case dotted name, type); None when it
/// does not parse.
pub fn question_of(query: &[u8]) -> Option<(String, u16)> {
    let end = skip_name(query, 12)?;
    let mut name = Vec::new();
    let mut at = 12;
    while at < end - 1 {
        let len = usize::from(query[at]);
        name.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_ascii_lowercase());
        at += 1 + len;
    }
    Some((name.join("."), u16_at(query, end)?))
}

/// An authoritative answer to `query` with `answers`.
pub fn scripted_answer(query: &[u8], answers: &[Rr]) -> Option<Vec<u8>> {
    let end = skip_name(query, 12)? + 4;
    let mut m = query.get(..2)?.to_vec();
    // QR, AA, RD, RA.
    m.extend_from_slice(&0x8580u16.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(query.get(12..end)?);
    for rr in answers {
        m.extend_from_slice(&record(&rr.owner, rr.rtype, 60, &rr.rdata));
    }
    Some(m)
}

type Script = dyn Fn(&str, u16) -> Option<Vec<Rr>> + Send + Sync;

/// The DNS proxy's upstream in tests that watch it: a UDP relay in the
/// world namespace that records every datagram it receives, answers the
/// names its script knows, and passes everything else to a real server
/// (dnsmasq) and its answer back. Stopped on drop.
pub struct UpstreamRelay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    pub addr: SocketAddr,
}

impl UpstreamRelay {
    pub fn start(world: &NetNs, addr: SocketAddr, server: SocketAddr, script: impl Fn(&str, u16) -> Option<Vec<Rr>> + Send + Sync + 'static) -> UpstreamRelay {
        let script: Box<Script> = Box::new(script);
        let (listen, forward) = world
            .run(move || {
                let listen = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind the relay on {addr}: {e}"));
                let forward = UdpSocket::bind(SocketAddr::new(addr.ip(), 0)).expect("bind the relay's forwarding socket");
                forward.connect(server).expect("connect to the real server");
                (listen, forward)
            })
            .expect("enter world");
        listen.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        forward.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (s, log) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = listen.recv_from(&mut buf) else { continue };
                let message = buf[..n].to_vec();
                log.lock().unwrap().push(message.clone());
                let scripted = question_of(&message).and_then(|(name, qtype)| script(&name, qtype)).and_then(|rrs| scripted_answer(&message, &rrs));
                let answer = match scripted {
                    Some(answer) => Some(answer),
                    None => {
                        let _ = forward.send(&message);
                        let mut reply = vec![0u8; 65535];
                        // One query at a time: the answer is to this one (or
                        // none within the read timeout).
                        forward.recv(&mut reply).ok().map(|n| reply[..n].to_vec())
                    }
                };
                if let Some(answer) = answer {
                    let _ = listen.send_to(&answer, from);
                }
            }
        });
        UpstreamRelay { stop, thread: Some(thread), received, addr }
    }

    /// Every datagram received so far, in order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for UpstreamRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `needle` occurs in `haystack`, ASCII case ignored.
pub fn contains_ignoring_case(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_back() {
        let q = query(&labels("AlLoWeD.test"), A);
        assert_eq!(question_of(&q), Some(("allowed.test".into(), A)));
        let answer = scripted_answer(&q, &[Rr::a("allowed.test", [198, 51, 100, 5]), Rr::cname("x.test", &labels("y.test"))]).unwrap();
        let r = parse_reply(&answer).unwrap();
        assert_eq!((r.id, r.rcode.as_str(), r.answer_count), (ID, "NOERROR", 2));
        assert_eq!(r.qname, wire_name(&labels("AlLoWeD.test")));
        assert_eq!(r.addresses, vec!["198.51.100.5".parse::<IpAddr>().unwrap()]);
        // An extended rcode from the OPT record: BADVERS.
        let badvers = [header(0x8000, [0, 0, 0, 1]), opt(1232, 0, false, &[])].concat();
        let mut badvers = badvers;
        let at = badvers.len() - 6;
        badvers[at] = 1;
        assert_eq!(parse_reply(&badvers).unwrap().rcode, "BADVERS");
        assert_eq!(parse_reply(&[1, 2, 3]), None);
        assert!(contains_ignoring_case(b"xxEvIlxx", b"evil") && !contains_ignoring_case(b"xx", b""));
    }
}
