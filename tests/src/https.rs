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
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

pub struct HttpsEcho {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpsEcho {
    pub fn start(ns: &NetNs, addr: SocketAddr, names: &[&str], ca: &TestCa, secret: &str) -> HttpsEcho {
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
                                let Ok(tls) = acceptor.accept(tcp).await else { return };
                                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                    let secret = secret.clone();
                                    async move {
                                        let mut body = format!("path: {}\nversion: {:?}\n", req.uri().path(), req.version());
                                        for (k, v) in req.headers() {
                                            let v = v.to_str().unwrap_or("<binary>");
                                            let shown = if !secret.is_empty() && v.contains(&secret) { "<injected>" } else { v };
                                            body.push_str(&format!("{k}: {shown}\n"));
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
                                    .serve_connection(TokioIo::new(tls), service)
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
