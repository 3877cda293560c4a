//! Attacks on the transparent proxy from a hostile guest: first bytes that
//! hide, split or double the name a connection is for, and connections that
//! try to starve other tenants. Each row sends raw bytes from the guest's
//! namespace to a redirected port and says what must come back and what
//! `inspect` must record.
//!
//! The world's servers answer anything with "hello from ADDR": any such
//! bytes reaching the guest mean the proxy let the connection through.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::{dig, require_root, unique_name, WorldDns, WorldServers};
use sbx_vmm::NetNs;

const LEARNED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
const CONNECTION_CAP: usize = 8;

const POLICY: &str = r#"
name = "agent"
[network]
default = "deny"
allow = ["allowed.test"]
"#;

/// A policy a corporate network might write: all of 10/8 allowed.
const WIDE: &str = r#"
name = "wide"
[network]
default = "deny"
allow = ["allowed.test", "10.0.0.0/8"]
"#;

/// What the guest must get back.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    /// A TLS fatal access_denied alert from the proxy.
    TlsAccessDenied,
    /// `HTTP/1.1 <status>` from the proxy, never the server's page.
    Http(u16),
    /// The connection closed (or reset) without a byte.
    Closed,
    /// The server's page: the positive controls.
    Served,
}

struct ProxyAttack {
    class: &'static str,
    name: &'static str,
    port: u16,
    /// Written in this many pieces (with a flush between them): segments.
    pieces: usize,
    bytes: Vec<u8>,
    outcome: Outcome,
    /// The proxy's flow record reason ("policy", "ambiguous_request"…).
    reason: Option<&'static str>,
}

use sbx_net::proxy::peek::hello::{alpn, message as hello_message, records, server_name};

fn corpus(gateway: Ipv4Addr) -> Vec<ProxyAttack> {
    use Outcome::*;
    let tls = |name, message: Vec<u8>, record: usize, pieces: usize, outcome, reason| ProxyAttack { class: "TLS", name, port: 443, pieces, bytes: records(&message, record), outcome, reason };
    let http = |name, head: String, outcome, reason| ProxyAttack { class: "HTTP", name, port: 80, pieces: 1, bytes: head.into_bytes(), outcome, reason };
    let other_sni = hello_message(&[server_name(&[b"other.test"])]);
    let allowed_sni = hello_message(&[server_name(&[b"allowed.test"])]);
    vec![
        tls("hello split over 16-byte records, SNI of another name", other_sni.clone(), 16, 1, TlsAccessDenied, Some("policy")),
        tls("hello split over 1-byte records, SNI of another name", other_sni.clone(), 1, 1, TlsAccessDenied, Some("policy")),
        tls("hello in one record sent a few bytes per segment, SNI of another name", other_sni.clone(), 4096, 9, TlsAccessDenied, Some("policy")),
        tls("hello without SNI to an address learned for an allowed name", hello_message(&[alpn(&[b"h2"])]), 4096, 1, TlsAccessDenied, Some("policy")),
        tls("hello with an IP-literal SNI (the learned address)", hello_message(&[server_name(&[b"198.51.100.5"])]), 4096, 1, TlsAccessDenied, Some("policy")),
        tls("ECH-like hello whose outer SNI is another name", hello_message(&[server_name(&[b"other.test"]), (0xfe0d, vec![0; 64])]), 4096, 1, TlsAccessDenied, Some("policy")),
        tls("ALPN h2 with the SNI of another name", hello_message(&[alpn(&[b"h2", b"http/1.1"]), server_name(&[b"other.test"])]), 4096, 1, TlsAccessDenied, Some("policy")),
        tls("two names in one server_name extension", hello_message(&[server_name(&[b"allowed.test", b"other.test"])]), 4096, 1, Closed, Some("policy")),
        tls("two server_name extensions", hello_message(&[server_name(&[b"allowed.test"]), server_name(&[b"other.test"])]), 4096, 1, Closed, Some("policy")),
        tls("NUL inside the SNI", hello_message(&[server_name(&[b"allowed.test\0.other.test"])]), 4096, 1, Closed, Some("policy")),
        tls("denied SNI upper-cased with a root dot", hello_message(&[server_name(&[b"OTHER.test."])]), 4096, 1, TlsAccessDenied, Some("policy")),
        ProxyAttack { class: "TLS", name: "application data before any hello", port: 443, pieces: 1, bytes: vec![0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5], outcome: Closed, reason: Some("policy") },
        ProxyAttack { class: "TLS", name: "SSLv2-style hello", port: 443, pieces: 1, bytes: vec![0x80, 0x2e, 0x01, 0x03, 0x01, 0, 0x15, 0, 0, 0, 0x10], outcome: Closed, reason: Some("policy") },
        tls("control: a split hello for the allowed name is spliced", allowed_sni, 16, 1, Served, Some("allowed")),
        http("HTTP/1.0 without Host to the learned address", "GET / HTTP/1.0\r\n\r\n".into(), Http(403), Some("policy")),
        http("two Host headers", "GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: other.test\r\n\r\n".into(), Http(400), Some("ambiguous_request")),
        http("absolute-form target for another host", "GET http://other.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n".into(), Http(400), Some("ambiguous_request")),
        http("absolute-form target without Host", "GET http://other.test/ HTTP/1.0\r\n\r\n".into(), Http(403), Some("policy")),
        http("obs-folded header line hiding a Host", "GET / HTTP/1.1\r\nHost: allowed.test\r\nX-A: b\r\n Host: other.test\r\n\r\n".into(), Http(400), Some("ambiguous_request")),
        http("white space before the colon of Host", "GET / HTTP/1.1\r\nHost : other.test\r\nHost: allowed.test\r\n\r\n".into(), Http(400), Some("ambiguous_request")),
        http("CONNECT to another host under an allowed Host", "CONNECT other.test:443 HTTP/1.1\r\nHost: allowed.test\r\n\r\n".into(), Http(400), Some("ambiguous_request")),
        http("Host of another name", "GET / HTTP/1.1\r\nHost: other.test\r\n\r\n".into(), Http(403), Some("policy")),
        http("IP-literal Host (the learned address)", "GET / HTTP/1.1\r\nHost: 198.51.100.5\r\n\r\n".into(), Http(403), Some("policy")),
        http("user info in an absolute-form target", "GET http://allowed.test@other.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n".into(), Http(403), Some("policy")),
        ProxyAttack { class: "HTTP", name: "another protocol on port 80", port: 80, pieces: 1, bytes: b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(), outcome: Closed, reason: Some("policy") },
        ProxyAttack {
            class: "isolation",
            name: "the gateway's own port 80, by address",
            port: 80,
            pieces: 1,
            bytes: format!("GET / HTTP/1.1\r\nHost: {gateway}\r\n\r\n").into_bytes(),
            outcome: Http(403),
            reason: Some("policy"),
        },
        http("control: the allowed name by Host", "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n".into(), Served, Some("allowed")),
    ]
}

/// Sends the attack from the guest and returns what came back (until close
/// or 5 s).
fn send(dst: IpAddr, attack: &ProxyAttack) -> Vec<u8> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::new(dst, attack.port), Duration::from_secs(5)).expect("connect to the redirected port");
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let piece = attack.bytes.len().div_ceil(attack.pieces);
    for chunk in attack.bytes.chunks(piece) {
        if stream.write_all(chunk).is_err() {
            break;
        }
        stream.flush().unwrap();
    }
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
}

fn judge(outcome: Outcome, got: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(got);
    if text.contains("hello from") && outcome != Outcome::Served {
        return Err(format!("reached the server: {text:?}"));
    }
    let ok = match outcome {
        Outcome::TlsAccessDenied => got == [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49],
        Outcome::Http(status) => text.starts_with(&format!("HTTP/1.1 {status} ")) && text.contains("X-Sbx-Net-Denied: "),
        Outcome::Closed => got.is_empty(),
        Outcome::Served => text.contains("hello from 198.51.100.5"),
    };
    if ok { Ok(()) } else { Err(format!("expected {outcome:?}, got {text:?}")) }
}

/// The first-bytes deadline of the starvation test: long enough for the
/// cap to be observed on a loaded machine while the idle connections last.
const FIRST_BYTES: Duration = Duration::from_secs(4);

fn setup(tag: &str) -> (DaemonHarness, WorldDns, Vec<WorldServers>) {
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let config = format!("proxy_connections_per_sandbox = {CONNECTION_CAP}\nproxy_first_bytes_timeout_ms = {}\n", FIRST_BYTES.as_millis());
    let h = DaemonHarness::with_args(tag, &[("agent.toml", POLICY), ("wide.toml", WIDE)], Some(&config), &[upstream.as_str()]);
    h.topology.add_world_address(LEARNED.into());
    let dns = WorldDns::start(&h.topology.world, &["allowed.test,198.51.100.5,60".to_string(), "other.test,198.51.100.5,60".to_string()], &[]);
    let servers = [80, 443].iter().map(|&p| WorldServers::start(&h.topology.world, &[LEARNED.into()], p)).collect();
    (h, dns, servers)
}

fn proxy_records(h: &DaemonHarness, sandbox: &str) -> Vec<serde_json::Value> {
    let out = h.cli(&["inspect", "--sandbox", sandbox, "-o", "json"]);
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|r| r["source"] == "proxy").collect()
}

#[test]
fn names_the_proxy_cannot_trust_are_refused() {
    require_root();
    let (h, _dns, _servers) = setup("advproxy");
    let name = unique_name("a");
    let info = h.create_guest(&name, "agent");
    let ns = info["netns"].as_str().unwrap().to_string();
    let guest = NetNs::open(&ns).expect("guest namespace");
    let gateway: Ipv4Addr = info["gateway_ipv4"].as_str().unwrap().parse().unwrap();
    // The guest resolves the allowed name: its address is learned (and on
    // a shared server, it is also other.test's).
    let (status, answers) = dig(&ns, &["allowed.test"]);
    assert_eq!(status, "NOERROR", "{answers:?}");

    let attacks = corpus(gateway);
    let mut failures = Vec::new();
    for (i, attack) in attacks.iter().enumerate() {
        let dst = if attack.class == "isolation" { IpAddr::V4(gateway) } else { IpAddr::V4(LEARNED) };
        let got = guest.run(|| send(dst, attack)).expect("enter guest");
        if let Err(e) = judge(attack.outcome, &got) {
            failures.push(format!("#{i} [{}] {}: {e}", attack.class, attack.name));
        }
        if attack.class == "isolation" {
            let text = String::from_utf8_lossy(&got);
            if text.contains(&gateway.to_string()) && !text.contains(&format!("Host: {gateway}")) {
                failures.push(format!("#{i} the refusal names the host's address: {text:?}"));
            }
            assert!(text.contains("X-Sbx-Net-Denied: builtin deny (host address)"), "{text}");
        }
    }
    assert!(failures.is_empty(), "{} of {} proxy attacks got through or were answered wrongly:\n{}", failures.len(), attacks.len(), failures.join("\n"));

    // Another sandbox through the proxy, from a policy allowing all of
    // 10/8 (the sandbox pool is in it): refused by the pool's built-in
    // deny, never connected to.
    let wide = h.create_guest(&unique_name("w"), "wide");
    let wide_ns = NetNs::open(wide["netns"].as_str().unwrap()).unwrap();
    let victim: Ipv4Addr = info["guest_ipv4"].as_str().unwrap().parse().unwrap();
    let probe = ProxyAttack { class: "isolation", name: "another sandbox by address under a 10/8 allow", port: 80, pieces: 1, bytes: b"GET / HTTP/1.0\r\n\r\n".to_vec(), outcome: Outcome::Http(403), reason: None };
    let got = wide_ns.run(|| send(IpAddr::V4(victim), &probe)).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403 ") && text.contains("(sandbox pool)"), "{}: {text:?}", probe.name);

    // Every connection has its record, with the reason it was refused.
    let mut wanted: Vec<(&str, usize)> = Vec::new();
    for a in &attacks {
        let reason = a.reason.expect("every row names its record");
        match wanted.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => wanted.push((reason, 1)),
        }
    }
    let mut counted = Vec::new();
    let recorded = sbx_net_tests::try_wait_for(Duration::from_secs(10), || {
        let records = proxy_records(&h, &name);
        counted = wanted.iter().map(|(reason, n)| (*reason, *n, records.iter().filter(|r| r["reason"] == *reason).count())).collect();
        counted.iter().all(|(_, want, got)| got >= want).then_some(())
    });
    assert!(recorded.is_some(), "proxy records by reason (reason, wanted, recorded): {counted:?}");
    eprintln!("{} proxy attacks refused and recorded", attacks.len());
}

/// One guest holding idle or trickling connections cannot starve another:
/// its connections beyond the cap are refused at once and recorded, a
/// head that trickles in is cut at the first-bytes deadline, and the other
/// sandbox is served throughout.
#[test]
fn one_guest_cannot_starve_the_proxy() {
    require_root();
    let (h, _dns, _servers) = setup("starve");
    let hog = unique_name("hog");
    let hog_ns = NetNs::open(h.create_guest(&hog, "agent")["netns"].as_str().unwrap()).unwrap();
    let victim = h.create_guest(&unique_name("v"), "agent");
    let victim_ns = NetNs::open(victim["netns"].as_str().unwrap()).unwrap();
    let served = |ns: &NetNs| {
        let control = &corpus(Ipv4Addr::UNSPECIFIED).into_iter().find(|a| a.name == "control: the allowed name by Host").unwrap();
        ns.run(|| send(IpAddr::V4(LEARNED), control)).unwrap()
    };
    // The cap's worth of idle connections (no first byte ever).
    let open_idle = || hog_ns.run(|| TcpStream::connect_timeout(&SocketAddr::new(LEARNED.into(), 80), Duration::from_secs(5))).unwrap();
    let mut idle: Vec<TcpStream> = (0..CONNECTION_CAP).map(|_| open_idle().expect("idle connection")).collect();
    // One more from the hog: refused at once (once the proxy has accepted
    // the idle ones: until then a connection may still get through).
    let extra = || {
        hog_ns
            .run(|| {
                let started = Instant::now();
                // Refused at once may mean reset before connect() returns.
                let mut s = match TcpStream::connect_timeout(&SocketAddr::new(LEARNED.into(), 80), Duration::from_secs(5)) {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (Vec::new(), started.elapsed()),
                    Err(e) => panic!("connect: {e}"),
                };
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                (out, started.elapsed())
            })
            .unwrap()
    };
    let refused_in = sbx_net_tests::wait_for(Duration::from_secs(10), "a connection past the cap refused", || {
        // On a loaded machine a probe may be accepted before an idle
        // connection, which is then the one refused: replace it, try again.
        idle.retain(|c| !sbx_net_tests::dns_attack::closed_by_peer(c));
        while idle.len() < CONNECTION_CAP {
            idle.extend(open_idle().ok());
        }
        let (out, took) = extra();
        out.is_empty().then_some(took)
    });
    assert!(refused_in < FIRST_BYTES, "refused at once, not after a deadline: {refused_in:?}");
    // The victim is served meanwhile.
    assert!(String::from_utf8_lossy(&served(&victim_ns)).contains("hello from"), "the other sandbox is served while one is at its cap");
    // The idle connections are cut at the first-bytes deadline,
    // then the hog is served again.
    let cut = hog_ns
        .run(|| {
            idle.into_iter()
                .map(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let started = Instant::now();
                    let mut out = Vec::new();
                    let _ = s.read_to_end(&mut out);
                    (started.elapsed(), out)
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    for (waited, out) in &cut {
        assert!(*waited < FIRST_BYTES + Duration::from_secs(4), "an idle connection was held {waited:?}");
        assert!(!String::from_utf8_lossy(out).contains("hello from"));
    }
    assert!(String::from_utf8_lossy(&served(&hog_ns)).contains("hello from"), "the cap frees as connections end");
    // A head trickled a byte at a time is cut at the deadline too, however
    // often a byte arrives.
    let trickled = hog_ns
        .run(|| {
            let mut s = TcpStream::connect_timeout(&SocketAddr::new(LEARNED.into(), 80), Duration::from_secs(5)).unwrap();
            s.set_nodelay(true).unwrap();
            let started = Instant::now();
            for b in b"GET / HTTP/1.1\r\nHost: allowed.test\r\nX-Slow: ".iter().chain([b'a'; 200].iter()) {
                if s.write_all(&[*b]).is_err() || started.elapsed() > FIRST_BYTES + Duration::from_secs(6) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50)); // the attack's own pacing
            }
            started.elapsed()
        })
        .unwrap();
    assert!(trickled < FIRST_BYTES + Duration::from_secs(4), "a trickled head was read for {trickled:?}");
    let records = proxy_records(&h, &hog);
    assert!(records.iter().any(|r| r["reason"] == "connection_limit"), "the refused connection is recorded: {records:?}");
}

/// An address the host gains after the daemon started is the host's too:
/// a sandbox created since has it as a built-in deny (403, the rule without
/// the address), and one created before, whose policy was compiled without
/// it, is still never connected to the host's service behind it.
#[test]
fn an_address_the_host_gains_later_is_never_a_destination() {
    require_root();
    let (h, _dns, _servers) = setup("hostlater");
    let before = h.create_guest(&unique_name("b"), "wide");
    let late: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
    let uplink = h.topology.host_netlink.link_index("uplink").unwrap();
    h.topology.host_netlink.add_address(uplink, late.into(), 32).unwrap();
    // A service of the host's on that address.
    let service = h.topology.host.run(|| std::net::TcpListener::bind((late, 80))).unwrap().expect("host service");
    service.set_nonblocking(true).unwrap();
    let after = h.create_guest(&unique_name("a"), "wide");
    let probe = ProxyAttack { class: "isolation", name: "an address the host gained later", port: 80, pieces: 1, bytes: b"GET / HTTP/1.0\r\n\r\n".to_vec(), outcome: Outcome::Http(403), reason: None };
    for (which, guest) in [("created after", &after), ("created before", &before)] {
        let ns = NetNs::open(guest["netns"].as_str().unwrap()).unwrap();
        let got = ns.run(|| send(IpAddr::V4(late), &probe)).unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(!text.contains(&late.to_string()), "{which}: the refusal names the host's address: {text:?}");
        if which == "created after" {
            assert!(text.starts_with("HTTP/1.1 403 ") && text.contains("X-Sbx-Net-Denied: builtin deny (host address)"), "{which}: {text:?}");
        } else {
            assert!(!text.starts_with("HTTP/1.1 200"), "{which}: {text:?}");
        }
        assert!(matches!(service.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "{which}: a guest's connection reached the host's service");
    }
}

/// A guest that never lets go cannot keep an old data plane alive: at an
/// upgrade, connections it holds open without a byte (proxy and DNS over
/// TCP) are closed — idle DNS-over-TCP ones at once, the proxy's at the
/// drain deadline, counted — and the old process exits; the new one serves
/// the guest's next connection meanwhile.
#[test]
fn a_guest_cannot_pin_an_old_data_plane() {
    require_root();
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let h = DaemonHarness::with_args("pin", &[("agent.toml", POLICY)], Some("dataplane_drain_seconds = 2\n"), &[upstream.as_str()]);
    h.topology.add_world_address(LEARNED.into());
    let _dns = WorldDns::start(&h.topology.world, &["allowed.test,198.51.100.5,60".to_string()], &[]);
    let _servers = WorldServers::start(&h.topology.world, &[LEARNED.into()], 80);
    let g = h.create_guest(&unique_name("g"), "agent");
    let ns = NetNs::open(g["netns"].as_str().unwrap()).unwrap();
    let gateway: Ipv4Addr = g["gateway_ipv4"].as_str().unwrap().parse().unwrap();
    let old = h.json(&["status", "--json"])["dataplane"]["pid"].as_u64().unwrap();
    const HELD: usize = 6;
    let (proxied, dns): (Vec<TcpStream>, Vec<TcpStream>) = ns
        .run(|| {
            let proxied = (0..HELD).map(|_| TcpStream::connect_timeout(&SocketAddr::new(LEARNED.into(), 80), Duration::from_secs(5)).unwrap()).collect();
            let dns = (0..HELD).map(|_| TcpStream::connect_timeout(&SocketAddr::new(gateway.into(), 53), Duration::from_secs(5)).unwrap()).collect();
            (proxied, dns)
        })
        .unwrap();
    sbx_net_tests::wait_until(Duration::from_secs(10), "the old data plane holds the guest's connections", || {
        h.json(&["status", "--json"])["dataplane"]["stats"]["in_flight"]["proxy"].as_u64().unwrap_or(0) >= HELD as u64
    });
    h.cli_ok(&["upgrade"]);
    // The DNS-over-TCP connections are closed at once (between queries).
    for mut c in dns {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        assert!(matches!(c.read(&mut byte), Ok(0) | Err(_)), "an idle DNS-over-TCP connection kept the old data plane");
    }
    // The new data plane serves the guest meanwhile.
    let (code, body) = sbx_net_tests::curl_head(ns.name(), &["--max-time", "5", "http://allowed.test/"]);
    assert_eq!(code, Some(0), "{body}");
    // The proxy's held connections are cut at the deadline and counted;
    // the old process is gone.
    sbx_net_tests::wait_until(Duration::from_secs(20), "the old data plane exits at its drain deadline", || !std::path::Path::new(&format!("/proc/{old}")).exists());
    for mut c in proxied {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)), "a held connection outlived the drain");
    }
    sbx_net_tests::wait_until(Duration::from_secs(10), "the drain's count reaches /metrics", || {
        h.metrics().lines().any(|l| l.strip_prefix("sbx_net_dataplane_drain_closed_total ").and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v >= HELD as f64))
    });
}

/// A guest churning connections to the proxy as fast as it can (connect,
/// drop; bounded in time and count) cannot hold up another sandbox: the
/// proxy's listening socket and its accept queue are shared, and a full
/// queue would drop every sandbox's new connections alike (each then
/// waits for its SYN to be sent again, a second later).
#[test]
fn a_connection_flood_from_one_guest_does_not_hold_up_another() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    require_root();
    const FLOODERS: usize = 4;
    let (h, _dns, _servers) = setup("churn");
    let hog_ns = NetNs::open(h.create_guest(&unique_name("hog"), "agent")["netns"].as_str().unwrap()).unwrap();
    let victim = h.create_guest(&unique_name("v"), "agent");
    let victim_ns = NetNs::open(victim["netns"].as_str().unwrap()).unwrap();
    let (stop, connects) = (AtomicBool::new(false), AtomicU64::new(0));
    let target = SocketAddr::new(LEARNED.into(), 80);
    // The victim's request, answered and closed: how long it took.
    let served_in = || {
        victim_ns
            .run(|| {
                let asked = Instant::now();
                let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(10)).expect("the victim's connect");
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n").unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                (String::from_utf8_lossy(&out).contains("hello from"), asked.elapsed())
            })
            .unwrap()
    };
    let (served, unloaded) = served_in();
    assert!(served, "the victim is served without a flood");
    std::thread::scope(|s| {
        for _ in 0..FLOODERS {
            s.spawn(|| {
                hog_ns.run(|| {
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) && connects.load(Ordering::Relaxed) < 2_000_000 {
                        let _ = TcpStream::connect_timeout(&target, Duration::from_millis(200));
                        connects.fetch_add(1, Ordering::Relaxed);
                    }
                })
            });
        }
        sbx_net_tests::wait_until(Duration::from_secs(15), "the flood to get going", || connects.load(Ordering::Relaxed) > 3_000);
        let mut slowest = Duration::ZERO;
        for round in 0..10 {
            let (served, took) = served_in();
            slowest = slowest.max(took);
            assert!(served, "round {round}: the other sandbox was not served during the flood");
        }
        let during = connects.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        eprintln!("the other sandbox served 10 times during the flood (slowest {slowest:?}, {unloaded:?} without it); the hog tried {during} connections");
        assert!(slowest < Duration::from_secs(1), "the other sandbox waited {slowest:?} (a SYN dropped for a full accept queue is sent again after 1 s)");
        let status = h.json(&["status", "--json"]);
        let metered = status["meter_drops"]["new_connections"].as_u64().unwrap_or_else(|| panic!("meter_drops.new_connections in status: {}", status["meter_drops"]));
        assert!(metered > 0, "the hog's {during} connection attempts were never metered");
    });
}
