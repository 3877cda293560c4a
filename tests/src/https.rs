//! An HTTPS server in the world namespace with its own test CA: it answers
//! every request with the path and the request's headers — except that a
//! header carrying `secret` is reported as `<injected>`, so the test can
//! see the credential arrived without the secret ever travelling back to
//! the guest.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
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

    fn leaf(&self, names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for n in names {
            params.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(n.to_string().try_into().unwrap()),
            });
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub struct HttpsEcho {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpsEcho {
    pub fn start(ns: &NetNs, addr: SocketAddr, names: &[&str], ca: &TestCa, secret: &str) -> HttpsEcho {
        Self::start_with(ns, addr, names, ca, secret, true)
    }

    /// The same server over plain HTTP.
    pub fn start_plain(ns: &NetNs, addr: SocketAddr, ca: &TestCa, secret: &str) -> HttpsEcho {
        Self::start_with(ns, addr, &["plain"], ca, secret, false)
    }

    fn start_with(ns: &NetNs, addr: SocketAddr, names: &[&str], ca: &TestCa, secret: &str, tls: bool) -> HttpsEcho {
        let (cert, key) = ca.leaf(names);
        let ns = NetNs::open(ns.name()).expect("open namespace");
        let secret = secret.to_string();
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
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                let listener = tokio::net::TcpListener::bind(addr).await.expect("bind https echo");
                ready_tx.send(()).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { continue };
                            let (acceptor, secret) = (acceptor.clone(), secret.clone());
                            tokio::spawn(async move {
                                let io: Box<dyn Io> = if tls {
                                    let Ok(t) = acceptor.accept(tcp).await else { return };
                                    Box::new(t)
                                } else {
                                    Box::new(tcp)
                                };
                                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                    let secret = secret.clone();
                                    async move {
                                        let mut body = format!("path: {}\nversion: {:?}\n", req.uri().path(), req.version());
                                        for (k, v) in req.headers() {
                                            let v = v.to_str().unwrap_or("<binary>");
                                            let shown = if !secret.is_empty() && v.contains(&secret) { "<injected>" } else { v };
                                            body.push_str(&format!("{k}: {shown}\n"));
                                        }
                                        if req.headers().contains_key("upgrade") {
                                            // Echo whatever comes after the upgrade.
                                            let saw = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(|v| if !secret.is_empty() && v.contains(&secret) { "<injected>".to_string() } else { v.to_string() }).unwrap_or_default();
                                            let mut req = req;
                                            let on = hyper::upgrade::on(&mut req);
                                            tokio::spawn(async move {
                                                if let Ok(up) = on.await {
                                                    let mut io = TokioIo::new(up);
                                                    let mut buf = [0u8; 1024];
                                                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                                                    while let Ok(n) = io.read(&mut buf).await {
                                                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                                            break;
                                                        }
                                                    }
                                                }
                                            });
                                            let r = hyper::Response::builder()
                                                .status(101)
                                                .header("connection", "upgrade")
                                                .header("upgrade", "echo")
                                                .header("x-saw-authorization", saw)
                                                .body(Full::new(Bytes::new()))
                                                .unwrap();
                                            return Ok::<_, std::convert::Infallible>(r);
                                        }
                                        if req.uri().path() == "/redirect" {
                                            let r = hyper::Response::builder()
                                                .status(302)
                                                .header("location", "https://elsewhere.test/")
                                                .body(Full::new(Bytes::from(body)))
                                                .unwrap();
                                            return Ok::<_, std::convert::Infallible>(r);
                                        }
                                        Ok(hyper::Response::new(Full::new(Bytes::from(body))))
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
        HttpsEcho { stop: Some(stop_tx), thread: Some(thread) }
    }
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

/// A TLS client configuration trusting only the certificates in `ca_pem`.
pub fn client_config(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
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
