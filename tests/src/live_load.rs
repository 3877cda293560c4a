//! A guest that keeps connections open and traffic flowing while the host
//! changes under it (daemon restart, data-plane upgrade, policy reload):
//! a direct TCP flow, kept-alive HTTP/1.1 and HTTP/2 connections to a
//! spliced host and to a credential host, a long server-sent-events stream
//! through the credential proxy, and DNS queries over UDP and over TCP —
//! each at a steady pace, every failure recorded with when and why.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use sbx_vmm::NetNs;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Where the guest's traffic goes.
#[derive(Clone, Debug)]
pub struct LoadTargets {
    /// A TCP line echo, allowed by an IP rule (not a proxied port).
    pub direct: SocketAddr,
    /// An allowed name without credentials (TLS spliced), its address.
    pub spliced: (String, SocketAddr),
    /// A name with a credential (TLS terminated with the sandbox CA).
    pub credential: (String, SocketAddr),
    /// The CA the spliced host's certificate is from.
    pub world_ca: PathBuf,
    /// The sandbox's CA (what the guest trusts for the credential host).
    pub sandbox_ca: PathBuf,
    /// The guest's resolver and a name it resolves.
    pub dns: SocketAddr,
    pub dns_name: String,
    /// Events of the server-sent-events stream (100 ms apart).
    pub sse_events: u32,
    /// The pace of every other stream.
    pub every: Duration,
}

/// What each stream did.
#[derive(Clone, Debug, Default)]
pub struct StreamReport {
    pub ok: u64,
    /// `(ms since the start, what went wrong)`.
    pub errors: Vec<(u64, String)>,
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: Mutex<Vec<(u64, String)>>,
}

pub struct LiveLoad {
    started: Instant,
    stop: Arc<AtomicBool>,
    tallies: Arc<BTreeMap<&'static str, Tally>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub const STREAMS: [&str; 8] = ["direct-tcp", "h1-spliced", "h2-spliced", "h1-credential", "h2-credential", "sse-credential", "dns-udp", "dns-tcp"];

impl LiveLoad {
    /// Starts every stream from inside the guest namespace `guest`.
    pub fn start(guest: &str, targets: LoadTargets) -> LiveLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let tallies: Arc<BTreeMap<&'static str, Tally>> = Arc::new(STREAMS.iter().map(|s| (*s, Tally::default())).collect());
        let ns = NetNs::open(guest).expect("open the guest namespace");
        let (stop2, tallies2) = (stop.clone(), tallies.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            ns.enter_current_thread().expect("enter the guest namespace");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(run_streams(targets, started, stop2, tallies2));
        });
        LiveLoad { started, stop, tallies, thread: Some(thread) }
    }

    /// Milliseconds since the start (the clock errors are stamped with).
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Successes of `stream` so far.
    pub fn ok(&self, stream: &str) -> u64 {
        self.tallies[stream].ok.load(Ordering::Relaxed)
    }

    /// Successes of every stream so far.
    pub fn oks(&self) -> BTreeMap<&'static str, u64> {
        self.tallies.iter().map(|(k, t)| (*k, t.ok.load(Ordering::Relaxed))).collect()
    }

    /// Waits until every paced stream has `more` successes beyond `since`
    /// (the SSE stream counts events); panics with the report at `deadline`.
    pub fn wait_for_progress(&self, since: &BTreeMap<&'static str, u64>, more: u64, deadline: Duration) {
        let end = Instant::now() + deadline;
        loop {
            let now = self.oks();
            if now.iter().all(|(k, v)| *v >= since.get(k).copied().unwrap_or(0) + more) {
                return;
            }
            assert!(Instant::now() < end, "streams did not progress by {more} within {deadline:?}: now {now:?}, before {since:?}; errors: {:?}", self.errors());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn errors(&self) -> BTreeMap<&'static str, Vec<(u64, String)>> {
        self.tallies.iter().map(|(k, t)| (*k, t.errors.lock().unwrap().clone())).filter(|(_, e)| !e.is_empty()).collect()
    }

    /// Stops the paced streams, lets the SSE stream end (at most 40 s) and
    /// reports.
    pub fn finish(mut self) -> BTreeMap<&'static str, StreamReport> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        self.tallies.iter().map(|(k, t)| (*k, StreamReport { ok: t.ok.load(Ordering::Relaxed), errors: t.errors.lock().unwrap().clone() })).collect()
    }
}

impl Drop for LiveLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn run_streams(t: LoadTargets, started: Instant, stop: Arc<AtomicBool>, tallies: Arc<BTreeMap<&'static str, Tally>>) {
    let record = {
        let tallies = tallies.clone();
        move |stream: &'static str, result: Result<(), String>| match result {
            Ok(()) => {
                tallies[stream].ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tallies[stream].errors.lock().unwrap().push((started.elapsed().as_millis() as u64, e)),
        }
    };
    let world = crate::https::client_config_with(&[t.world_ca.as_path()], &[b"http/1.1"]);
    let world_h2 = crate::https::client_config_with(&[t.world_ca.as_path()], &[b"h2"]);
    let sandbox = crate::https::client_config_with(&[t.sandbox_ca.as_path()], &[b"http/1.1"]);
    let sandbox_h2 = crate::https::client_config_with(&[t.sandbox_ca.as_path()], &[b"h2"]);
    let mut tasks = Vec::new();
    let paced = |name: &'static str, every: Duration, stop: Arc<AtomicBool>, record: Box<dyn Fn(&'static str, Result<(), String>) + Send>, mut step: Box<dyn FnMut() -> StepFuture + Send>| {
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let r = tokio::time::timeout(Duration::from_secs(5), step()).await.unwrap_or_else(|_| Err("no answer within 5 s".into()));
                record(name, r);
            }
        })
    };
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            // A direct TCP flow: one connection, a line echoed each tick.
            {
                let addr = t.direct;
                let conn: Arc<tokio::sync::Mutex<Option<tokio::io::BufStream<tokio::net::TcpStream>>>> = Arc::default();
                tasks.push(paced("direct-tcp", t.every, stop.clone(), Box::new(record.clone()), Box::new(move || {
                    let conn = conn.clone();
                    Box::pin(async move {
                        let mut guard = conn.lock().await;
                        if guard.is_none() {
                            let s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
                            *guard = Some(tokio::io::BufStream::new(s));
                        }
                        let s = guard.as_mut().unwrap();
                        s.write_all(b"ping\n").await.map_err(|e| format!("write: {e}"))?;
                        s.flush().await.map_err(|e| format!("flush: {e}"))?;
                        let mut line = String::new();
                        let n = s.read_line(&mut line).await.map_err(|e| format!("read: {e}"))?;
                        if n == 0 || line != "ping\n" {
                            *guard = None;
                            return Err(format!("echo broke: {line:?}"));
                        }
                        Ok(())
                    })
                })));
            }
            // Kept-alive HTTPS: HTTP/1.1 and HTTP/2, spliced and credential.
            for (name, (host, addr), config, h2) in [
                ("h1-spliced", t.spliced.clone(), world.clone(), false),
                ("h2-spliced", t.spliced.clone(), world_h2.clone(), true),
                ("h1-credential", t.credential.clone(), sandbox.clone(), false),
                ("h2-credential", t.credential.clone(), sandbox_h2.clone(), true),
            ] {
                let client: Arc<tokio::sync::Mutex<Option<Client>>> = Arc::default();
                tasks.push(paced(name, t.every, stop.clone(), Box::new(record.clone()), Box::new(move || {
                    let (client, host, config) = (client.clone(), host.clone(), config.clone());
                    Box::pin(async move {
                        let mut guard = client.lock().await;
                        if guard.is_none() {
                            *guard = Some(Client::connect(addr, &host, config, h2).await?);
                        }
                        let result = guard.as_mut().unwrap().get("/kept-alive").await;
                        if result.is_err() {
                            *guard = None;
                        }
                        result
                    })
                })));
            }
            // Server-sent events through the credential proxy: one stream.
            {
                let (host, addr) = t.credential.clone();
                let (config, events, record) = (sandbox.clone(), t.sse_events, record.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let r = sse(addr, &host, config, events, |_| record("sse-credential", Ok(()))).await;
                    if let Err(e) = r {
                        record("sse-credential", Err(e));
                    }
                }));
            }
            // DNS every tick, over UDP and over TCP (a connection per query,
            // as stub resolvers do).
            for (name, tcp) in [("dns-udp", false), ("dns-tcp", true)] {
                let (server, qname) = (t.dns, t.dns_name.clone());
                let id = Arc::new(AtomicU64::new(1));
                tasks.push(paced(name, t.every, stop.clone(), Box::new(record.clone()), Box::new(move || {
                    let (qname, id) = (qname.clone(), id.clone());
                    Box::pin(async move {
                        let id = (id.fetch_add(1, Ordering::Relaxed) & 0xffff) as u16;
                        let mut query = crate::dns_attack::query(&crate::dns_attack::labels(&qname), 1);
                        query[..2].copy_from_slice(&id.to_be_bytes());
                        let reply = if tcp { dns_tcp(server, &query).await? } else { dns_udp(server, &query).await? };
                        let parsed = crate::dns_attack::parse_reply(&reply).ok_or("unparsable reply")?;
                        if parsed.id != id || parsed.rcode != "NOERROR" || parsed.addresses.is_empty() {
                            return Err(format!("answer: id {} rcode {} addresses {:?}", parsed.id, parsed.rcode, parsed.addresses));
                        }
                        Ok(())
                    })
                })));
            }
            for task in tasks.drain(..) {
                let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
            }
        })
        .await;
}

async fn dns_udp(server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, String> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let socket = tokio::net::UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    socket.send_to(query, server).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buf)).await.map_err(|_| "no UDP answer within 3 s".to_string())?.map_err(|e| format!("recv: {e}"))?;
    buf.truncate(n);
    Ok(buf)
}

async fn dns_tcp(server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, String> {
    let mut s = tokio::net::TcpStream::connect(server).await.map_err(|e| format!("connect: {e}"))?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    s.write_all(&framed).await.map_err(|e| format!("write: {e}"))?;
    let len = s.read_u16().await.map_err(|e| format!("read length: {e}"))?;
    let mut reply = vec![0u8; usize::from(len)];
    s.read_exact(&mut reply).await.map_err(|e| format!("read: {e}"))?;
    Ok(reply)
}

/// A kept-alive HTTPS client, HTTP/1.1 or HTTP/2.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>, String),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>, String),
}

async fn tls(addr: SocketAddr, host: &str, config: Arc<rustls::ClientConfig>) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))
}

impl Client {
    async fn connect(addr: SocketAddr, host: &str, config: Arc<rustls::ClientConfig>, h2: bool) -> Result<Client, String> {
        let io = TokioIo::new(tls(addr, host, config).await?);
        if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            Ok(Client::H2(sender, host.to_string()))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("h1 handshake: {e}"))?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            Ok(Client::H1(sender, host.to_string()))
        }
    }

    async fn get(&mut self, path: &str) -> Result<(), String> {
        let response = match self {
            Client::H1(sender, host) => {
                sender.ready().await.map_err(|e| format!("connection: {e}"))?;
                let req = hyper::Request::builder().uri(path).header("host", host.as_str()).body(http_body_util::Empty::new()).unwrap();
                sender.send_request(req).await
            }
            Client::H2(sender, host) => {
                sender.ready().await.map_err(|e| format!("connection: {e}"))?;
                let req = hyper::Request::builder().uri(format!("https://{host}{path}")).body(http_body_util::Empty::new()).unwrap();
                sender.send_request(req).await
            }
        }
        .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        response.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
        if status != 200 {
            return Err(format!("status {status}"));
        }
        Ok(())
    }
}

/// One server-sent-events response of `events` events; `each` per event.
async fn sse(addr: SocketAddr, host: &str, config: Arc<rustls::ClientConfig>, events: u32, each: impl Fn(u32)) -> Result<(), String> {
    let mut client = Client::connect(addr, host, config, false).await?;
    let Client::H1(sender, _) = &mut client else { unreachable!() };
    sender.ready().await.map_err(|e| format!("connection: {e}"))?;
    let req = hyper::Request::builder().uri(format!("/reflect/sse/{events}")).header("host", host).body(http_body_util::Empty::new()).unwrap();
    let response = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let mut seen = 0u32;
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("stream cut after {seen} events: {e}"))?;
        if let Some(data) = frame.data_ref() {
            pending.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = pending.find("\n\n") {
                let event = pending[..end].to_string();
                pending.drain(..end + 2);
                if event != format!("data: event {seen}") {
                    return Err(format!("event {seen} was {event:?}"));
                }
                seen += 1;
                each(seen);
            }
        }
    }
    if seen != events {
        return Err(format!("stream ended after {seen} of {events} events"));
    }
    Ok(())
}

/// A TCP line echo in `world` at `addr` (every line back as it came).
pub struct LineEcho {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LineEcho {
    pub fn start(world: &NetNs, addr: SocketAddr) -> LineEcho {
        let ns = NetNs::open(world.name()).expect("open world");
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            ns.enter_current_thread().expect("enter world");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.expect("bind line echo");
                ready_tx.send(()).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { continue };
                            tokio::spawn(async move {
                                let (r, mut w) = tcp.into_split();
                                let mut lines = tokio::io::BufReader::new(r).lines();
                                while let Ok(Some(line)) = lines.next_line().await {
                                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                    }
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("line echo ready");
        LineEcho { stop: Some(stop_tx), thread: Some(thread) }
    }
}

impl Drop for LineEcho {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One step of a paced load task.
type StepFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;
