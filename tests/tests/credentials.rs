//! Credential injection end to end: real curl in a netns guest, HTTPS
//! servers with their own test CA in the world (trusted by the daemon via
//! --upstream-ca), names resolved through the DNS proxy.

use std::net::{IpAddr, SocketAddr};

use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::https::{HttpsEcho, TestCa};
use sbx_net_tests::{require_root, unique_name, PacketCapture, WorldDns};

const SECRET: &str = "ghp_sbxTestSecret0123456789";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn secrets_reach_only_their_hosts() {
    require_root();
    let dir = std::env::temp_dir().join(unique_name("cred"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new(&dir);
    let secret_file = dir.join("token");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let policy = format!(
        "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\", \"plain.test\", \"plainapi.test\"]\n\
         [[credentials]]\nname = \"gh\"\nhosts = [\"api.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{0}\" }}\n\
         [[credentials]]\nname = \"legacy\"\nhosts = [\"plainapi.test\"]\nheader = \"X-Api-Key\"\nformat = \"{{secret}}\"\nsource = {{ file = \"{0}\" }}\nallow_plaintext = true\n",
        secret_file.display()
    );
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
    let h = DaemonHarness::with_args("cred", &[("agent.toml", policy.as_str())], None, &[upstream.as_str(), upstream_ca.as_str()]);
    for a in ["198.51.100.40", "198.51.100.41", "198.51.100.42"] {
        h.topology.add_world_address(ip(a));
    }
    let _dns = WorldDns::start(
        &h.topology.world,
        &["api.test,198.51.100.40,60".into(), "plain.test,198.51.100.41,60".into(), "plainapi.test,198.51.100.42,60".into()],
        &[],
    );
    let _api_http = HttpsEcho::start_plain(&h.topology.world, SocketAddr::new(ip("198.51.100.40"), 80), &ca, SECRET);
    let _legacy_http = HttpsEcho::start_plain(&h.topology.world, SocketAddr::new(ip("198.51.100.42"), 80), &ca, SECRET);
    let _api = HttpsEcho::start(&h.topology.world, SocketAddr::new(ip("198.51.100.40"), 443), &["api.test"], &ca, SECRET);
    let _plain = HttpsEcho::start(&h.topology.world, SocketAddr::new(ip("198.51.100.41"), 443), &["plain.test"], &ca, SECRET);
    let g = h.create_guest(&unique_name("g"), "agent");
    let ns = g["netns"].as_str().unwrap().to_string();
    let sandbox_ca = g["ca_cert"].as_str().unwrap().to_string();
    let curl = |args: &[&str]| sbx_net_tests::curl_head(&ns, args);

    // Everything the guest sends and receives, captured on its tap.
    let capture = PacketCapture::start(h.topology.host.name(), g["tap"].as_str().unwrap(), &dir.join("tap.pcap"));

    // The bound host: TLS terminated with the sandbox CA, secret injected.
    let (code, body) = curl(&["--cacert", &sandbox_ca, "https://api.test/v1/user"]);
    assert_eq!(code, Some(0), "{body}");
    assert!(body.contains("path: /v1/user") && body.contains("authorization: <injected>"), "{body}");
    // The netns guest's own trust store has its sandbox CA: no --cacert.
    let (code, body) = curl(&["https://api.test/trusted"]);
    assert_eq!(code, Some(0), "{body}");
    assert!(body.contains("authorization: <injected>"), "{body}");
    // HTTP/2 on both sides (curl and the server negotiate h2 by ALPN).
    let (code, body) = curl(&["--http2", "--cacert", &sandbox_ca, "https://api.test/h2"]);
    assert_eq!(code, Some(0), "{body}");
    assert!(body.starts_with("HTTP/2 200"), "{body}");
    assert!(body.contains("version: HTTP/2.0") && body.contains("authorization: <injected>"), "{body}");
    let (_, body) = curl(&["--http1.1", "--cacert", &sandbox_ca, "https://api.test/h1"]);
    assert!(body.starts_with("HTTP/1.1 200") && body.contains("authorization: <injected>"), "{body}");
    // A WebSocket-style upgrade: injected before the switch, then bytes flow.
    let guest = sbx_vmm::NetNs::open(&ns).unwrap();
    let ca_path = std::path::PathBuf::from(&sandbox_ca);
    let (head, echoed) = guest
        .run(|| sbx_net_tests::https::upgrade_round_trip(SocketAddr::new(ip("198.51.100.40"), 443), "api.test", &ca_path, b"ping-over-upgrade"))
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("x-saw-authorization: <injected>"), "{head}");
    assert_eq!(echoed, b"ping-over-upgrade");
    // A guest-sent Authorization is replaced, not duplicated.
    let (_, body) = curl(&["--cacert", &sandbox_ca, "-H", "Authorization: Bearer guest-made", "https://api.test/"]);
    assert_eq!(body.matches("authorization:").count(), 1, "{body}");
    assert!(body.contains("authorization: <injected>") && !body.contains("guest-made"), "{body}");
    // A sentinel in another header is removed, never replaced: the secret
    // goes only into the credential's own header (an upstream that echoes
    // X-Api-Key, Origin or Cookie back must have nothing to echo).
    let (_, body) = curl(&["--cacert", &sandbox_ca, "-H", "X-Api-Key: sbx-cred:gh", "-H", "Cookie: t=sbx-cred:gh", "https://api.test/?q=sbx-cred:gh"]);
    assert!(body.contains("authorization: <injected>") && body.matches("<injected>").count() == 1, "{body}");
    assert!(!body.contains("x-api-key") && !body.contains("cookie") && !body.contains("sbx-cred"), "{body}");
    // The proxy asks credential hosts for an identity body (the only kind
    // it can scrub), whatever the guest asked for.
    let (_, body) = curl(&["--cacert", &sandbox_ca, "--compressed", "https://api.test/"]);
    assert!(body.contains("accept-encoding: identity"), "{body}");
    // Host differing from SNI: refused, nothing injected.
    let (_, body) = curl(&["--http1.1", "--cacert", &sandbox_ca, "-H", "Host: plain.test", "https://api.test/"]);
    assert!(body.starts_with("HTTP/1.1 421"), "{body}");
    assert!(!body.contains("<injected>"), "{body}");
    // A redirect is passed back, not followed, and carries no secret.
    let (_, body) = curl(&["--cacert", &sandbox_ca, "https://api.test/redirect"]);
    assert!(body.contains(" 302") && body.contains("location: https://elsewhere.test/"), "{body}");
    // --resolve to another address: the proxy goes to the checked one.
    let (_, body) = curl(&["--cacert", &sandbox_ca, "--resolve", "api.test:443:198.51.100.41", "https://api.test/"]);
    assert!(body.contains("authorization: <injected>"), "{body}");
    // A host without a credential is spliced: the guest sees the real
    // certificate (trusted only via the test CA) and nothing is injected.
    let (code, body) = curl(&["--cacert", ca.pem_path.to_str().unwrap(), "https://plain.test/"]);
    assert_eq!(code, Some(0), "{body}");
    assert!(!body.contains("authorization"), "{body}");
    let (code, _) = curl(&["--cacert", &sandbox_ca, "https://plain.test/"]);
    assert_eq!(code, Some(60), "plain.test must not be terminated with the sandbox CA");
    // Plain HTTP to the bound host gets no secret (no plaintext injection)…
    let (code, body) = curl(&["-H", "X-Api-Key: sbx-cred:gh", "http://api.test/plain"]);
    assert_eq!(code, Some(0), "{body}");
    assert!(body.contains("path: /plain") && !body.contains("<injected>"), "{body}");
    // …and a sentinel sent where it is not replaced is stripped.
    assert!(!body.contains("sbx-cred") && !body.contains("x-api-key"), "{body}");
    // …unless the credential says allow_plaintext.
    let (_, body) = curl(&["-H", "X-Api-Key: guest-made", "http://plainapi.test/legacy"]);
    assert!(body.contains("x-api-key: <injected>") && !body.contains("guest-made"), "{body}");
    // The secret never appears in any byte on the guest's tap, nor in the
    // daemon's log.
    let captured = capture.finish();
    assert!(captured.len() > 5000, "the capture saw the traffic ({} bytes)", captured.len());
    assert!(!captured.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "the secret crossed the tap");
    assert!(!h.log().contains(SECRET), "secret in the daemon log");
    drop(h);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An HTTP/2 guest whose streams overlap has them spread over a few
/// upstream HTTP/2 connections (never more than the proxy's 4), each
/// injected; one whose streams come one at a time keeps one.
#[test]
fn overlapping_http2_streams_spread_over_a_few_upstream_connections() {
    require_root();
    let CredentialHost { dir, h, _dns, api, ns, sandbox_ca } = CredentialHost::start("cred-h2");

    // 24 streams on one guest connection, 12 at a time, each answered
    // after 500 ms: the first ones overlap, so more connections are made
    // (in the background) and the later ones go on them.
    let urls: Vec<String> = (0..24).map(|i| format!("https://api.test/slow/500?n={i}")).collect();
    let mut args = vec!["-s", "--http2", "--parallel", "--parallel-max", "12", "--max-time", "30", "-w", "connects: %{num_connects}\n", "--cacert", sandbox_ca.as_str()];
    args.extend(urls.iter().map(String::as_str));
    let out = sbx_net_tests::run_in(&ns, "curl", &args);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl: {:?}\n{body}", out.status);
    assert_eq!(body.matches("connects: 1").count(), 1, "curl made more than one guest connection:\n{body}");
    assert_eq!(body.matches("authorization: <injected>").count(), 24, "{body}");
    assert_eq!(body.matches("version: HTTP/2.0").count(), 24, "{body}");
    let spread = api.connections();
    assert!((2..=4).contains(&spread), "24 overlapping streams went upstream on {spread} connections (want 2 to 4)\n{body}");

    // Five streams one after another on another guest connection: they
    // never overlap, so one more upstream connection carries them.
    let urls: Vec<String> = (0..5).map(|i| format!("https://api.test/one/{i}")).collect();
    let mut args = vec!["-s", "--http2", "--max-time", "20", "--cacert", sandbox_ca.as_str()];
    args.extend(urls.iter().map(String::as_str));
    let out = sbx_net_tests::run_in(&ns, "curl", &args);
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(body.matches("authorization: <injected>").count(), 5, "{body}");
    assert_eq!(api.connections(), spread + 1, "streams one at a time went upstream on more than one connection");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon whose guest's policy binds a credential to api.test, served by
/// an HTTPS echo in the world.
struct CredentialHost {
    dir: std::path::PathBuf,
    h: DaemonHarness,
    _dns: WorldDns,
    api: HttpsEcho,
    /// The guest's namespace, and the sandbox CA it trusts.
    ns: String,
    sandbox_ca: String,
}

impl CredentialHost {
    fn start(name: &str) -> CredentialHost {
        let dir = std::env::temp_dir().join(unique_name(name));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new(&dir);
        let secret_file = dir.join("token");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        let policy = format!(
            "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\", \"stall.test\"]\n\
             [[credentials]]\nname = \"gh\"\nhosts = [\"api.test\", \"stall.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{}\" }}\n",
            secret_file.display()
        );
        let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
        let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
        let h = DaemonHarness::with_args(name, &[("agent.toml", policy.as_str())], None, &[upstream.as_str(), upstream_ca.as_str()]);
        h.topology.add_world_address(ip("198.51.100.40"));
        // stall.test: a server that accepts and never answers.
        h.topology.add_world_address(ip("198.51.100.41"));
        let _dns = WorldDns::start(&h.topology.world, &["api.test,198.51.100.40,60".into(), "stall.test,198.51.100.41,60".into()], &[]);
        let api = HttpsEcho::start(&h.topology.world, SocketAddr::new(ip("198.51.100.40"), 443), &["api.test"], &ca, SECRET);
        let g = h.create_guest(&unique_name("g"), "agent");
        let (ns, sandbox_ca) = (g["netns"].as_str().unwrap().to_string(), g["ca_cert"].as_str().unwrap().to_string());
        CredentialHost { dir, h, _dns, api, ns, sandbox_ca }
    }
}

#[test]
fn a_guest_connection_costs_the_upstream_one_tcp_connection() {
    require_root();
    let CredentialHost { dir, h, _dns, api, ns, sandbox_ca } = CredentialHost::start("cred-reuse");
    // The connection the proxy makes when the guest connects (to fail as
    // the server would) carries the guest's requests: over HTTP/1.1 ...
    let urls: Vec<String> = (0..3).map(|i| format!("https://api.test/one/{i}")).collect();
    let mut args = vec!["-s", "--http1.1", "--max-time", "20", "-w", "connects: %{num_connects}\n", "--cacert", sandbox_ca.as_str()];
    args.extend(urls.iter().map(String::as_str));
    let out = sbx_net_tests::run_in(&ns, "curl", &args);
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(body.matches("authorization: <injected>").count(), 3, "{body}");
    assert_eq!(body.matches("connects: 1").count(), 1, "curl made more than one guest connection:\n{body}");
    assert_eq!((api.accepted(), api.connections()), (1, 1), "one guest connection: upstream TCP connections accepted, and those that carried requests");
    // ... and over HTTP/2.
    let out = sbx_net_tests::run_in(&ns, "curl", &["-s", "--http2", "--max-time", "20", "--cacert", sandbox_ca.as_str(), "https://api.test/two"]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(body.matches("authorization: <injected>").count(), 1, "{body}");
    assert!(body.contains("version: HTTP/2.0"), "{body}");
    assert_eq!((api.accepted(), api.connections()), (2, 2), "a second guest connection");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that connects to a credential host and asks nothing (or never
/// finishes its TLS handshake) does not keep the upstream connections the
/// proxy made when it connected (they go after a few seconds), and what it
/// asks later still goes upstream, on a new one.
#[test]
fn a_guest_that_asks_nothing_holds_no_upstream_connection() {
    require_root();
    let CredentialHost { dir, h, _dns, api, ns, sandbox_ca } = CredentialHost::start("cred-idle");
    const GUEST_CONNECTIONS: usize = 6;
    const STALLED_HANDSHAKES: usize = 3;
    let guest = sbx_vmm::NetNs::open(&ns).unwrap();
    let config = sbx_net_tests::https::client_config(std::path::Path::new(&sandbox_ca));
    let statuses = guest
        .run(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut held = Vec::new();
                for _ in 0..GUEST_CONNECTIONS {
                    held.push(sbx_net_tests::https::KeepAlive::connect(SocketAddr::new(ip("198.51.100.40"), 443), "api.test", config.clone()).await.unwrap());
                }
                // And some that send their ClientHello and never finish
                // the handshake.
                let mut stalled = Vec::new();
                for _ in 0..STALLED_HANDSHAKES {
                    use tokio::io::AsyncWriteExt;
                    let mut hello = Vec::new();
                    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
                    rustls::ClientConnection::new(config.clone(), name).unwrap().write_tls(&mut hello).unwrap();
                    let mut tcp = tokio::net::TcpStream::connect(SocketAddr::new(ip("198.51.100.40"), 443)).await.unwrap();
                    tcp.write_all(&hello).await.unwrap();
                    stalled.push(tcp);
                }
                // (The server may accept a moment after the proxy connected.)
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while api.accepted() < GUEST_CONNECTIONS + STALLED_HANDSHAKES && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                let made = api.accepted();
                // The guest's connections stay open, silent, meanwhile.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while api.open() > 0 && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                let left_open = api.open();
                let mut statuses = Vec::new();
                for c in &mut held {
                    statuses.push(c.get("/later").await.unwrap());
                }
                (made, left_open, statuses)
            })
        })
        .unwrap();
    let (made, left_open, statuses) = statuses;
    assert_eq!(made, GUEST_CONNECTIONS + STALLED_HANDSHAKES, "the proxy connects upstream for each guest connection (to fail as the server would)");
    assert_eq!(left_open, 0, "upstream connections still open for guest connections that asked nothing");
    assert_eq!(statuses, vec![200; GUEST_CONNECTIONS]);
    assert_eq!(api.seen().iter().filter(|r| r.as_str() == "GET /later").count(), GUEST_CONNECTIONS);
    assert_eq!(api.accepted(), 2 * GUEST_CONNECTIONS + STALLED_HANDSHAKES, "each later request on a new upstream connection");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upstream that accepts the connection and never answers the TLS
/// handshake costs the guest's request a bounded wait (the proxy's 10 s
/// handshake limit, once: not again on a new connection), then a 502.
#[test]
fn an_upstream_that_never_answers_the_handshake_is_a_bounded_502() {
    require_root();
    let CredentialHost { dir, h, _dns, api: _api, ns, sandbox_ca } = CredentialHost::start("cred-stall");
    // The world's stall.test: connections are accepted (by the kernel: the
    // listener is never read) and left silent.
    let world = sbx_vmm::NetNs::open(h.topology.world.name()).unwrap();
    let _listener = world.run(|| std::net::TcpListener::bind(SocketAddr::new(ip("198.51.100.41"), 443)).unwrap()).unwrap();
    let started = std::time::Instant::now();
    let out = sbx_net_tests::run_in(&ns, "curl", &["-s", "--max-time", "60", "-w", "\nstatus: %{http_code}\n", "--cacert", sandbox_ca.as_str(), "https://stall.test/x"]);
    let waited = started.elapsed();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("status: 502") && body.contains("upstream unreachable"), "{body}");
    assert!(waited >= std::time::Duration::from_secs(9), "502 after {waited:?}: before the handshake limit");
    assert!(waited < std::time::Duration::from_secs(18), "502 after {waited:?}: the handshake was waited for more than once");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}
