//! An HTTPS server in the world namespace with its own test CA: it answers
//! every request with the path and the request's headers — except that a
//! header carrying `secret` is reported as `<injected>`, so the test can
//! see the credential arrived without the secret ever travelling back to
//! the guest.
//!
//! Under `/reflect/<mode>` it is the upstream the proxy must not trust
//! with the secret: it reflects the request's headers as they came
//! (Authorization and all) in a response header, a body (whole, in small
//! chunks, base64, percent-encoded, JSON, HTML, truncated, gzip), a
//! trailer, an HTTP/1 reason phrase or an upgraded stream; see
//! [`reflect`]. Every request it receives is logged ([`HttpsEcho::seen`]).
//!
//! Guest-side clients for adversarial tests are here too: raw HTTP/1
//! bytes over TLS or TCP ([`exchange`]) with a response parser
//! ([`parse_responses`]), HTTP/2 through hyper ([`h2_request`]) and raw
//! HTTP/2 frames ([`RawH2`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::collections::VecDeque;
use std::sync::Mutex;

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame};
use hyper_util::rt::TokioIo;
use sbx_vmm::NetNs;

/// A test CA: its certificate is what `--upstream-ca` gets.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub pem_path: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> TestCa {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, "sbx-net test upstream CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let pem_path = dir.join("upstream-ca.pem");
        std::fs::write(&pem_path, cert.pem()).unwrap();
        TestCa { cert, key, pem_path }
    }

    /// A leaf for `names` signed by this CA, as PEM files in `dir`:
    /// `(certificate, key)` (for peers such as nginx and haproxy that read
    /// their certificates from files).
    pub fn leaf_pem_files(&self, dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.signed_leaf(names);
        std::fs::create_dir_all(dir).unwrap();
        let (cert_path, key_path) = (dir.join("leaf.pem"), dir.join("leaf.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn leaf(&self, names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let (cert, key) = self.signed_leaf(names);
        (cert.der().to_vec(), key.serialize_der())
    }

    /// A fresh key and a certificate for `names` (DNS names or IP
    /// addresses) signed by this CA.
    fn signed_leaf(&self, names: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for n in names {
            params.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(n.to_string().try_into().unwrap()),
            });
        }
        (params.signed_by(&key, &self.cert, &self.key).unwrap(), key)
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub struct HttpsEcho {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    seen: Arc<Mutex<Vec<String>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a connection open until dropped.
struct OpenConnection(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl HttpsEcho {
    pub fn start(ns: &NetNs, addr: SocketAddr, names: &[&str], ca: &TestCa, secret: &str) -> HttpsEcho {
        Self::start_with(ns, addr, names, ca, secret, Some(&[b"h2", b"http/1.1"]))
    }

    /// The same server over TLS offering HTTP/1.1 only (an HTTP/1
    /// upstream: chunked bodies, reason phrases).
    pub fn start_h1_only(ns: &NetNs, addr: SocketAddr, names: &[&str], ca: &TestCa, secret: &str) -> HttpsEcho {
        Self::start_with(ns, addr, names, ca, secret, Some(&[b"http/1.1"]))
    }

    /// The same server over plain HTTP.
    pub fn start_plain(ns: &NetNs, addr: SocketAddr, ca: &TestCa, secret: &str) -> HttpsEcho {
        Self::start_with(ns, addr, &["plain"], ca, secret, None)
    }

    /// `METHOD path?query` of every request received so far.
    /// Connections that carried at least one request so far (not one a
    /// client only opened, or only shook hands on).
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// TCP connections accepted so far (whatever came over them).
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// TCP connections open now (accepted and not yet closed by either end).
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every request received so far: `METHOD target`.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// `alpn`: the protocols offered over TLS; None: plain HTTP.
    fn start_with(ns: &NetNs, addr: SocketAddr, names: &[&str], ca: &TestCa, secret: &str, alpn: Option<&[&[u8]]>) -> HttpsEcho {
        let (cert, key) = ca.leaf(names);
        let ns = NetNs::open(ns.name()).expect("open namespace");
        let secret = secret.to_string();
        let tls = alpn.is_some();
        let alpn: Vec<Vec<u8>> = alpn.unwrap_or_default().iter().map(|p| p.to_vec()).collect();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let used_count = connections.clone();
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let accepted_count = accepted.clone();
        let open: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let open_count = open.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            ns.enter_current_thread().expect("enter world");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(
                        vec![rustls::pki_types::CertificateDer::from(cert)],
                        rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(key)),
                    )
                    .unwrap();
                config.alpn_protocols = alpn;
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                let listener = tokio::net::TcpListener::bind(addr).await.expect("bind https echo");
                ready_tx.send(()).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { continue };
                            accepted_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            open_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let still_open = OpenConnection(open_count.clone());
                            // As real HTTP servers do: responses to concurrent
                            // HTTP/2 streams must not wait for ACKs.
                            let _ = tcp.set_nodelay(true);
                            let (acceptor, secret, log, used_count) = (acceptor.clone(), secret.clone(), log.clone(), used_count.clone());
                            let used = Arc::new(std::sync::atomic::AtomicBool::new(false));
                            tokio::spawn(async move {
                                let _still_open = still_open;
                                let io: Box<dyn Io> = if tls {
                                    let Ok(t) = acceptor.accept(tcp).await else { return };
                                    Box::new(t)
                                } else {
                                    Box::new(tcp)
                                };
                                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                    let (secret, log) = (secret.clone(), log.clone());
                                    if !used.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                        used_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    }
                                    async move {
                                        let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
                                        log.lock().unwrap().push(format!("{} {target}", req.method()));
                                        Ok::<_, std::convert::Infallible>(answer(req, &secret).await)
                                    }
                                });
                                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        ready_rx.recv_timeout(std::time::Duration::from_secs(5)).expect("https echo ready");
        HttpsEcho { stop: Some(stop_tx), thread: Some(thread), seen, connections, accepted, open }
    }
}

/// A response body of the given frames (data and trailers), sent as they
/// are: over HTTP/1 each data frame is a chunk, over HTTP/2 a DATA frame.
pub struct Frames {
    pub frames: VecDeque<Frame<Bytes>>,
    /// With a pace, each frame after the first waits this long (a stream
    /// such as server-sent events).
    pace: Option<(std::time::Duration, Option<std::pin::Pin<Box<tokio::time::Sleep>>>)>,
}

impl Frames {
    pub fn of(frames: VecDeque<Frame<Bytes>>) -> Frames {
        Frames { frames, pace: None }
    }

    pub fn full(data: impl Into<Bytes>) -> Frames {
        Frames::of(VecDeque::from([Frame::data(data.into())]))
    }

    /// `frames`, one every `every`.
    pub fn paced(frames: VecDeque<Frame<Bytes>>, every: std::time::Duration) -> Frames {
        Frames { frames, pace: Some((every, None)) }
    }
}

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        let this = &mut *self;
        if let Some((every, sleep)) = this.pace.as_mut() {
            if let Some(s) = sleep.as_mut() {
                if s.as_mut().poll(cx).is_pending() {
                    return std::task::Poll::Pending;
                }
            }
            *sleep = Some(Box::pin(tokio::time::sleep(*every)));
        }
        std::task::Poll::Ready(this.frames.pop_front().map(Ok))
    }
    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

/// The echo's answer to one request.
async fn answer(req: hyper::Request<hyper::body::Incoming>, secret: &str) -> hyper::Response<Frames> {
    let mask = |v: &str| if !secret.is_empty() && v.contains(secret) { "<injected>".to_string() } else { v.to_string() };
    // `/slow/N`: the same answer after N ms (requests that overlap).
    if let Some(ms) = req.uri().path().strip_prefix("/slow/").and_then(|n| n.parse().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut body = format!("path: {}\nversion: {:?}\n", mask(req.uri().path()), req.version());
    if let Some(q) = req.uri().query() {
        body.push_str(&format!("query: {}\n", mask(q)));
    }
    for (k, v) in req.headers() {
        let v = v.to_str().unwrap_or("<binary>");
        body.push_str(&format!("{k}: {}\n", mask(v)));
    }
    if req.headers().contains_key("upgrade") {
        // Echo whatever comes after the upgrade (after the request's own
        // Authorization when reflecting).
        let reflecting = req.uri().path() == "/reflect/upgrade";
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let saw = mask(&auth);
        let mut req = req;
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut io = TokioIo::new(up);
                if reflecting {
                    let _ = io.write_all(format!("you sent: {auth}\n").as_bytes()).await;
                    let _ = io.shutdown().await;
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return hyper::Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .header("x-saw-authorization", saw)
            .body(Frames::of(VecDeque::new()))
            .unwrap();
    }
    if let Some(mode) = req.uri().path().strip_prefix("/reflect/") {
        return reflect(mode.to_string(), req).await;
    }
    // The request's body is read (its trailers shown).
    let (parts, incoming) = req.into_parts();
    if let Ok(collected) = incoming.collect().await {
        if let Some(trailers) = collected.trailers() {
            for (k, v) in trailers {
                body.push_str(&format!("trailer {k}: {}\n", mask(v.to_str().unwrap_or("<binary>"))));
            }
        }
    }
    if parts.uri.path() == "/redirect" {
        return hyper::Response::builder().status(302).header("location", "https://elsewhere.test/").body(Frames::full(body)).unwrap();
    }
    hyper::Response::new(Frames::full(body))
}

/// The request's headers as they came, one `name: value` line each.
fn header_dump(headers: &hyper::HeaderMap) -> String {
    headers.iter().map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()))).collect()
}

/// A hostile (or merely careless) upstream, by `mode` (`name[/arg]`):
/// `header`, `body`, `chunked` (7-byte chunks), `base64/N` and
/// `base64url/N` (N bytes of padding first: the three alignments),
/// `percent`, `json`, `html`, `truncated` (the first 24 bytes of the
/// Authorization value), `gzip` (whatever was asked), `negotiate` (gzip
/// only when asked for), `range` (honours `Range`), `trailer`, `reason`,
/// `redirect` (to other.test), `count`, `sse/N` (N events 100 ms apart), `delay/N` (a plain answer after N
/// ms: an upstream that takes its time, for benchmarks).
pub async fn reflect(mode: String, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Frames> {
    let headers = req.headers().clone();
    let dump = header_dump(&headers);
    let auth = headers.get("authorization").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
    let _ = req.into_body().collect().await;
    let (name, arg) = mode.split_once('/').unwrap_or((mode.as_str(), ""));
    let pad = "x".repeat(arg.parse().unwrap_or(0));
    let ok = hyper::Response::builder().header("content-type", "text/plain");
    match name {
        "header" => {
            let mut r = ok;
            for (k, v) in &headers {
                r = r.header(format!("x-echo-{k}"), v.clone());
            }
            r.body(Frames::full("reflected in the headers\n")).unwrap()
        }
        "body" => ok.body(Frames::full(dump)).unwrap(),
        "chunked" => ok.body(Frames::of(dump.as_bytes().chunks(7).map(|c| Frame::data(Bytes::copy_from_slice(c))).collect())).unwrap(),
        "base64" => ok.body(Frames::full(base64::engine::general_purpose::STANDARD.encode(format!("{pad}{dump}")))).unwrap(),
        "base64url" => ok.body(Frames::full(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{pad}{dump}")))).unwrap(),
        "percent" => ok.body(Frames::full(percent_encode(dump.as_bytes()))).unwrap(),
        "json" => {
            let map: serde_json::Map<String, serde_json::Value> =
                headers.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned().into())).collect();
            ok.header("content-type", "application/json").body(Frames::full(serde_json::to_vec(&map).unwrap())).unwrap()
        }
        "html" => {
            let escaped = dump.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;");
            hyper::Response::builder().status(400).header("content-type", "text/html").body(Frames::full(format!("<html><pre>Bad request:\n{escaped}</pre></html>"))).unwrap()
        }
        "truncated" => ok.body(Frames::full([b"authorization: ".as_slice(), &auth[..auth.len().min(24)], b"...\n"].concat())).unwrap(),
        "gzip" => ok.header("content-encoding", "gzip").body(Frames::full(gzip(dump.as_bytes()))).unwrap(),
        "negotiate" => {
            let wants = headers.get("accept-encoding").and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("gzip"));
            if wants {
                ok.header("content-encoding", "gzip").body(Frames::full(gzip(dump.as_bytes()))).unwrap()
            } else {
                ok.body(Frames::full(dump)).unwrap()
            }
        }
        "range" => {
            let range = headers.get("range").and_then(|v| v.to_str().ok()).and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-'));
            match range.and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))) {
                Some((a, b)) if a <= b && b < dump.len() => {
                    hyper::Response::builder().status(206).header("x-saw-range", "yes").body(Frames::full(dump.as_bytes()[a..=b].to_vec())).unwrap()
                }
                _ => ok.header("x-saw-range", "no").body(Frames::full(dump)).unwrap(),
            }
        }
        "trailer" => {
            let mut trailers = hyper::HeaderMap::new();
            if let Ok(v) = hyper::header::HeaderValue::from_bytes(&auth) {
                trailers.insert("x-echo-authorization", v);
            }
            ok.header("trailer", "x-echo-authorization").body(Frames::of(VecDeque::from([Frame::data(Bytes::from("see the trailers\n")), Frame::trailers(trailers)]))).unwrap()
        }
        "reason" => {
            let mut r = ok.body(Frames::full("see the reason phrase\n")).unwrap();
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(auth) {
                r.extensions_mut().insert(reason);
            }
            r
        }
        "redirect" => hyper::Response::builder().status(302).header("location", "https://other.test/reflect/body").body(Frames::full("moved\n")).unwrap(),
        // Server-sent events: N events, one every 100 ms (a long streamed
        // response, as an LLM API gives).
        "sse" => {
            let events: VecDeque<Frame<Bytes>> = (0..arg.parse::<u32>().unwrap_or(10)).map(|i| Frame::data(Bytes::from(format!("data: event {i}\n\n")))).collect();
            ok.header("content-type", "text/event-stream").body(Frames::paced(events, std::time::Duration::from_millis(100))).unwrap()
        }
        "delay" => {
            tokio::time::sleep(std::time::Duration::from_millis(arg.parse().unwrap_or(0))).await;
            ok.body(Frames::full("ok\n")).unwrap()
        }
        _ => ok.body(Frames::full("ok\n")).unwrap(),
    }
}

/// Every byte but unreserved ones as `%XX`.
pub fn percent_encode(data: &[u8]) -> String {
    data.iter()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(b) { (*b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// A real gzip member (fixed-Huffman DEFLATE, literals only): the data is
/// not readable in it as it is.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, value: u32, bits: u32) {
            self.acc |= value << self.n;
            self.n += bits;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code, most significant bit first.
        fn code(&mut self, code: u32, bits: u32) {
            self.put(code.reverse_bits() >> (32 - bits), bits);
        }
    }
    let mut w = Bits { out: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff], acc: 0, n: 0 };
    w.put(1, 1); // last block
    w.put(1, 2); // fixed Huffman codes
    for &b in data {
        match b {
            0..=143 => w.code(0x30 + u32::from(b), 8),
            _ => w.code(0x190 + u32::from(b) - 144, 9),
        }
    }
    w.code(0, 7); // end of block
    if w.n > 0 {
        w.out.push(w.acc as u8);
    }
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    w.out.extend_from_slice(&(!crc).to_le_bytes());
    w.out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    w.out
}

impl Drop for HttpsEcho {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A raw HTTP/1.1 upgrade from the calling thread's namespace: TLS to
/// `addr` with SNI `name`, trusting only `ca_pem`; returns the response head
/// and what came back after sending `payload` on the upgraded stream.
pub fn upgrade_round_trip(addr: SocketAddr, name: &str, ca_pem: &Path, payload: &[u8]) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(client_config(ca_pem), server).unwrap();
    let tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(tls, "GET /ws HTTP/1.1\r\nHost: {name}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tls.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    tls.write_all(payload).unwrap();
    let mut echoed = vec![0u8; payload.len()];
    let _ = tls.read_exact(&mut echoed);
    (String::from_utf8_lossy(&head).into_owned(), echoed)
}

/// A TLS client configuration trusting only the certificates in `ca_pem`,
/// offering HTTP/1.1.
pub fn client_config(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    client_config_with(&[ca_pem], &[b"http/1.1"])
}

/// A kept-alive HTTPS/1.1 connection for load generation.
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
    host: String,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr, sni: &str, config: Arc<rustls::ClientConfig>) -> std::io::Result<KeepAlive> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(KeepAlive { sender, host: sni.to_string() })
    }

    /// One GET, body read to the end; its status.
    pub async fn get(&mut self, path: &str) -> std::io::Result<u16> {
        use http_body_util::BodyExt;
        self.sender.ready().await.map_err(std::io::Error::other)?;
        let req = hyper::Request::builder()
            .uri(path)
            .header("host", &self.host)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(std::io::Error::other)?;
        let resp = self.sender.send_request(req).await.map_err(std::io::Error::other)?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.map_err(std::io::Error::other)?;
        Ok(status)
    }
}

/// A TLS client configuration trusting the certificates of every file in
/// `ca_pems`, offering `alpn`.
pub fn client_config_with(ca_pems: &[&Path], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for path in ca_pems {
        let pem = std::fs::read(path).unwrap();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// From the calling thread's namespace: `raw` sent to `addr` (over TLS
/// with SNI `sni` when given, else plain TCP), then everything read until
/// the peer closes or `quiet` passes without a byte.
pub fn exchange(addr: SocketAddr, sni: Option<&str>, config: Arc<rustls::ClientConfig>, raw: &[u8], quiet: std::time::Duration) -> Vec<u8> {
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    tcp.set_read_timeout(Some(quiet)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let mut read_all = |s: &mut dyn Read| loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    };
    match sni {
        Some(name) => {
            let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
            let conn = rustls::ClientConnection::new(config, server).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            if tls.write_all(raw).and_then(|()| tls.flush()).is_ok() {
                read_all(&mut tls);
            }
        }
        None => {
            let mut tcp = tcp;
            if tcp.write_all(raw).is_ok() {
                read_all(&mut tcp);
            }
        }
    }
    out
}

/// One HTTP/1 response as the guest received it.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub status: u16,
    /// Status line and header lines.
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Trailer lines of a chunked body.
    pub trailers: String,
}

impl Received {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
    }
}

/// The HTTP/1 responses in `raw`, in order (a last one cut short is kept
/// as far as it came).
pub fn parse_responses(raw: &[u8]) -> Vec<Received> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut r = Received { status, head, ..Default::default() };
        rest = &rest[end + 4..];
        let chunked = r.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if (100..200).contains(&status) || status == 204 || status == 304 {
            if status == 101 {
                r.body = rest.to_vec();
                rest = &[];
            }
        } else if chunked {
            loop {
                let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    rest = &[];
                    break;
                };
                let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
                rest = &rest[line_end + 2..];
                if size == 0 {
                    let t_end = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(rest.len());
                    let t_end = if t_end == 0 { 0 } else { rest.windows(4).position(|w| w == b"\r\n\r\n").map_or(rest.len(), |p| p + 2) };
                    r.trailers = String::from_utf8_lossy(&rest[..t_end]).into_owned();
                    rest = rest.get(t_end + 2..).unwrap_or(&[]);
                    break;
                }
                let take = size.min(rest.len());
                r.body.extend_from_slice(&rest[..take]);
                rest = rest.get(take + 2..).unwrap_or(&[]);
            }
        } else if let Some(len) = r.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let take = len.min(rest.len());
            r.body = rest[..take].to_vec();
            rest = &rest[take..];
        } else {
            r.body = rest.to_vec();
            rest = &[];
        }
        out.push(r);
    }
    out
}

/// One HTTP/2 exchange through hyper from the calling thread's namespace:
/// TLS with SNI `sni` (ALPN h2) to `addr`, then `req`; the response with
/// its body and trailers, or why there was none.
pub fn h2_request(addr: SocketAddr, sni: &str, config: Arc<rustls::ClientConfig>, req: hyper::Request<Full<Bytes>>) -> Result<(hyper::http::response::Parts, Bytes, Option<hyper::HeaderMap>), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let exchange = async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        Ok((parts, collected.to_bytes(), trailers))
    };
    rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), exchange).await }).unwrap_or_else(|_| Err("timed out".into()))
}

/// A raw HTTP/2 connection over TLS (ALPN h2), for frames hyper's client
/// will not send: requests are HPACK literals without indexing.
pub struct RawH2 {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

/// A frame read back: (type, flags, stream id, payload).
pub type H2Frame = (u8, u8, u32, Vec<u8>);

pub const H2_HEADERS: u8 = 1;
pub const H2_RST_STREAM: u8 = 3;
pub const H2_SETTINGS: u8 = 4;
pub const H2_GOAWAY: u8 = 7;

impl RawH2 {
    /// Connects, sends the preface and an empty SETTINGS.
    pub fn connect(addr: SocketAddr, sni: &str, config: Arc<rustls::ClientConfig>) -> RawH2 {
        let tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
        let server = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(config, server).unwrap();
        let mut h2 = RawH2 { tls: rustls::StreamOwned::new(conn, tcp) };
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(Self::frame(H2_SETTINGS, 0, 0, &[]));
        h2.send(&hello);
        h2
    }

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A HEADERS frame (END_HEADERS, and END_STREAM when `end`) of
    /// `fields` as HPACK literals.
    pub fn headers(stream: u32, fields: &[(&str, &str)], end: bool) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in fields {
            assert!(name.len() < 127 && value.len() < 127, "short strings only (one-byte HPACK lengths)");
            block.push(0x00);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        Self::frame(H2_HEADERS, 0x4 | if end { 0x1 } else { 0 }, stream, &block)
    }

    pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
        Self::frame(H2_RST_STREAM, 0, stream, &code.to_be_bytes())
    }

    pub fn send(&mut self, bytes: &[u8]) -> bool {
        use std::io::Write;
        self.tls.write_all(bytes).and_then(|()| self.tls.flush()).is_ok()
    }

    /// Frames until `done` says so, the peer closes, or reading stalls.
    pub fn read_until(&mut self, mut done: impl FnMut(&H2Frame) -> bool) -> Vec<H2Frame> {
        use std::io::Read;
        let mut frames = Vec::new();
        loop {
            let mut head = [0u8; 9];
            if self.tls.read_exact(&mut head).is_err() {
                return frames;
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if self.tls.read_exact(&mut payload).is_err() {
                return frames;
            }
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let frame = (head[3], head[4], stream, payload);
            if frame.0 == H2_SETTINGS && frame.1 & 1 == 0 {
                // Acknowledge the server's settings, as a client must.
                self.send(&Self::frame(H2_SETTINGS, 1, 0, &[]));
            }
            let stop = done(&frame);
            frames.push(frame);
            if stop {
                return frames;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gzip_is_real_gzip() {
        // zlib (fixed Huffman, nothing to match) produced the same DEFLATE.
        let z = super::gzip(b"hello, world\xff");
        assert_eq!(&z[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
        let hex: String = z[10..].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "cb48cdc9c9d75128cf2fca49f90f00c072f3390d000000");
    }

    #[test]
    fn responses_parse() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\nHTTP/1.1 421 Misdirected Request\r\ncontent-length: 2\r\n\r\nnoHTTP/1.1 400 Bad Request\r\n\r\n";
        let r = super::parse_responses(raw);
        assert_eq!(r.iter().map(|r| r.status).collect::<Vec<_>>(), vec![200, 421, 400]);
        assert_eq!(r[0].body, b"abcde");
        assert_eq!(r[0].trailers.trim(), "x-t: 1");
        assert_eq!(r[1].body, b"no");
        assert_eq!(r[1].header("Content-Length"), Some("2"));
    }
}
