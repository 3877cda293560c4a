//! Credential injection for hosts a credential is bound to: the proxy
//! terminates the guest's TLS with a leaf from the sandbox's CA, checks that
//! every request names the host the handshake named (SNI = Host), removes
//! every credential-bearing header the guest sent, sets the configured one,
//! and forwards over TLS verified against the system roots plus
//! `--upstream-ca`, to the address the proxy checked. Redirects are passed
//! back, never followed. Bodies stream.

use crate::flow::CredentialDetail;
use crate::flow_log::FlowContext;
use std::sync::{Arc, Mutex};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, HOST, PROXY_AUTHORIZATION};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::ca::SandboxCa;
use crate::secrets::Secret;

/// A credential as the proxy uses it.
pub struct CredentialBinding {
    pub name: String,
    pub hosts: Vec<String>,
    pub header: HeaderName,
    /// `format` with `{secret}` replaced: the header value to send.
    pub value: HeaderValue,
    /// The secret alone, for `sbx-cred:<name>` sentinels.
    pub secret: Arc<Secret>,
    /// Inject into plain HTTP too.
    pub allow_plaintext: bool,
}

impl std::fmt::Debug for CredentialBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialBinding").field("name", &self.name).field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

impl CredentialBinding {
    pub fn new(name: &str, hosts: &[String], header: &str, format: &str, secret: Arc<Secret>, allow_plaintext: bool) -> Result<CredentialBinding, String> {
        let header = HeaderName::from_bytes(header.as_bytes()).map_err(|_| format!("credential {name}: {header:?} is not a header name"))?;
        let mut value = HeaderValue::from_str(&format.replace("{secret}", secret.expose()))
            .map_err(|_| format!("credential {name}: the formatted value is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(CredentialBinding {
            name: name.to_string(),
            hosts: hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            header,
            value,
            secret,
            allow_plaintext,
        })
    }

    pub fn covers(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
    }
}

/// The sentinel a guest may send where the secret is expected.
pub fn sentinel(name: &str) -> String {
    format!("sbx-cred:{name}")
}

/// Removes every credential-bearing header the guest sent (the configured
/// one, Authorization, Proxy-Authorization), replaces `sbx-cred:<name>`
/// sentinels in other headers with the secret, and sets the credential.
pub fn rewrite_headers(headers: &mut HeaderMap, binding: &CredentialBinding) {
    headers.remove(&binding.header);
    headers.remove(AUTHORIZATION);
    headers.remove(PROXY_AUTHORIZATION);
    let marker = sentinel(&binding.name);
    let names: Vec<HeaderName> = headers.keys().cloned().collect();
    for name in names {
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        // Bytes, not text: a value may carry obs-text (bytes ≥ 0x80), which
        // HTTP/1.1 parsers accept and `to_str` refuses (the header fuzz
        // target found sentinels left in such values).
        if !values.iter().any(|v| contains(v.as_bytes(), marker.as_bytes())) {
            continue;
        }
        headers.remove(&name);
        for v in values {
            let replaced = replace_all(v.as_bytes(), marker.as_bytes(), binding.secret.expose().as_bytes());
            if let Ok(mut nv) = HeaderValue::from_bytes(&replaced) {
                nv.set_sensitive(true);
                headers.append(name.clone(), nv);
            }
        }
    }
    headers.insert(binding.header.clone(), binding.value.clone());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `haystack` with every `needle` replaced by `with`.
fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The host a request names (Host header, else the URI authority), without
/// a port, lower-case.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.headers().get(HOST).and_then(|h| h.to_str().ok()).map(str::to_string).or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))?;
    let host = match raw.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
        _ => raw,
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// The guest's first bytes (already read for the SNI) replayed ahead of
/// the rest of the stream.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { prefix, offset: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        if self.offset < self.prefix.len() {
            let n = (self.prefix.len() - self.offset).min(buf.remaining());
            let start = self.offset;
            buf.put_slice(&self.prefix[start..start + n]);
            self.offset += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// TLS to upstreams: the system's web roots plus the PEM certificates of
/// `extra_ca` (for private or test CAs).
pub fn upstream_tls(extra_ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The upstream connection, HTTP/2 or HTTP/1.1 as its ALPN chose.
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

impl Upstream {
    fn is_closed(&self) -> bool {
        match self {
            Upstream::H1(s) => s.is_closed(),
            Upstream::H2(s) => s.is_closed(),
        }
    }

    async fn send(&mut self, mut req: Request<Incoming>, host: &str) -> Result<Response<Incoming>, hyper::Error> {
        // Hop-by-hop headers belong to the guest's connection, not ours.
        for h in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"] {
            req.headers_mut().remove(h);
        }
        let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        match self {
            Upstream::H1(s) => {
                s.ready().await?;
                *req.version_mut() = hyper::Version::HTTP_11;
                *req.uri_mut() = path.parse().unwrap_or_default();
                if let Ok(v) = HeaderValue::from_str(host) {
                    req.headers_mut().insert(HOST, v);
                }
                s.send_request(req).await
            }
            Upstream::H2(s) => {
                s.ready().await?;
                *req.version_mut() = hyper::Version::HTTP_2;
                req.headers_mut().remove(HOST);
                *req.uri_mut() = format!("https://{host}{path}").parse().unwrap_or_default();
                s.send_request(req).await
            }
        }
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let mut r = Response::new(Full::new(Bytes::from(format!("sbx-net: {reason}\n"))).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(reason) {
        r.headers_mut().insert("x-sbx-net-denied", v);
    }
    r
}

/// Serves one guest connection to a credential host: TLS with the
/// sandbox CA's leaf for `host`, HTTP/1.1 requests injected and forwarded
/// to `upstream` (checked for `host`), one upstream connection reused.
pub async fn serve(
    guest: Prefixed<TcpStream>,
    host: String,
    upstream: Vec<std::net::SocketAddr>,
    binding: Arc<CredentialBinding>,
    ca: Arc<Mutex<SandboxCa>>,
    upstream_tls: Arc<rustls::ClientConfig>,
    flow: FlowContext,
) -> Result<(), String> {
    let leaf = ca.lock().unwrap_or_else(|p| p.into_inner()).leaf(&host).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(leaf.cert_der)], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der)))
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config)).accept(guest).await.map_err(|e| format!("guest TLS: {e}"))?;
    let sender: Arc<tokio::sync::Mutex<Option<Upstream>>> = Arc::default();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (host, upstream, binding, upstream_tls, sender, flow) =
            (host.clone(), upstream.clone(), binding.clone(), upstream_tls.clone(), sender.clone(), flow.clone());
        async move {
            let sandbox = &flow.sandbox;
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            if let Some(named) = misdirected(&req, &host) {
                tracing::info!(%sandbox, sni = %host, host = named.as_deref().unwrap_or("-"), "credential proxy: Host differs from SNI; refused");
                let credential = Some(not_injected(&binding.name, "Host differs from the TLS server name"));
                return Ok::<_, hyper::Error>(refuse_misdirected(&flow, &method, named.as_deref(), &path, credential, "Host must equal the TLS server name"));
            }
            rewrite_headers(req.headers_mut(), &binding);
            if req.headers().contains_key(hyper::header::UPGRADE) {
                // WebSocket (or another upgrade): its own HTTP/1.1 upstream
                // connection, the credential already injected, then bytes.
                return Ok(upgrade(req, &upstream, &host, upstream_tls.clone(), &flow, &binding.name).await);
            }
            let mut guard = sender.lock().await;
            if guard.as_ref().is_none_or(|s| s.is_closed()) {
                match connect_upstream(&upstream, &host, upstream_tls).await {
                    Ok(s) => *guard = Some(s),
                    Err(e) => {
                        tracing::info!(%sandbox, %host, "credential proxy: upstream: {e}");
                        flow.http(&method, &host, &path, Some(502), "upstream_failed", Some(not_injected(&binding.name, "upstream unreachable")));
                        return Ok(text(StatusCode::BAD_GATEWAY, "upstream unreachable"));
                    }
                }
            }
            let s = guard.as_mut().expect("connected above");
            match s.send(req, &host).await {
                Ok(resp) => {
                    tracing::info!(%sandbox, %host, %method, %path, status = resp.status().as_u16(), credential = %binding.name, "credential proxy: injected");
                    flow.http(&method, &host, &path, Some(resp.status().as_u16()), "allowed", Some(injected(&binding.name)));
                    Ok(resp.map(|b| b.boxed()))
                }
                Err(e) => {
                    *guard = None;
                    tracing::info!(%sandbox, %host, "credential proxy: upstream request: {e}");
                    flow.http(&method, &host, &path, Some(502), "upstream_failed", Some(not_injected(&binding.name, "upstream request failed")));
                    Ok(text(StatusCode::BAD_GATEWAY, "upstream request failed"))
                }
            }
        }
    });
    // HTTP/1.1 or HTTP/2, whichever the guest speaks (ALPN offered both).
    hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(tls), service)
        .await
        .map_err(|e| format!("guest HTTP: {e}"))
}

/// `Some(the Host it names)` when a request is not for `host` (the name the
/// connection was checked for): it must not reach `host`'s upstream.
fn misdirected<B>(req: &Request<B>, host: &str) -> Option<Option<String>> {
    let named = request_host(req);
    (named.as_deref() != Some(host)).then_some(named)
}

/// Records a misdirected request and answers it 421 with `why`.
fn refuse_misdirected(flow: &FlowContext, method: &str, named: Option<&str>, path: &str, credential: Option<CredentialDetail>, why: &'static str) -> Response<ProxyBody> {
    flow.http(method, named.unwrap_or(""), path, Some(421), "misdirected", credential);
    text(StatusCode::MISDIRECTED_REQUEST, why)
}

fn injected(name: &str) -> CredentialDetail {
    CredentialDetail { name: name.to_string(), injected: true, failure: None }
}

fn not_injected(name: &str, why: &str) -> CredentialDetail {
    CredentialDetail { name: name.to_string(), injected: false, failure: Some(why.to_string()) }
}

/// Removes every header value carrying a credential sentinel: outside its
/// credential's hosts a sentinel is replaced by nothing.
pub fn strip_sentinels(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers.iter().filter(|(_, v)| contains(v.as_bytes(), b"sbx-cred:")).map(|(k, _)| k.clone()).collect();
    for name in names {
        headers.remove(name);
    }
}

/// Serves plain HTTP/1.1 for the guest, forwarded over plain TCP to the
/// checked address: with `binding` (a credential that allows plaintext)
/// the same checks and rewriting as over TLS; without, sentinels are
/// stripped and nothing is injected.
pub async fn serve_plain(
    guest: Prefixed<TcpStream>,
    host: String,
    upstream: Vec<std::net::SocketAddr>,
    binding: Option<Arc<CredentialBinding>>,
    flow: FlowContext,
) -> Result<(), String> {
    let sender: Arc<tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>> = Arc::default();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (host, upstream, binding, sender, flow) = (host.clone(), upstream.clone(), binding.clone(), sender.clone(), flow.clone());
        async move {
            let sandbox = &flow.sandbox;
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            if let Some(named) = misdirected(&req, &host) {
                let credential = binding.as_ref().map(|b| not_injected(&b.name, "Host changed on the connection"));
                return Ok::<_, hyper::Error>(refuse_misdirected(&flow, &method, named.as_deref(), &path, credential, "Host changed on the connection"));
            }
            let failed = |why: &str| {
                let credential = binding.as_ref().map(|b| not_injected(&b.name, why));
                flow.http(&method, &host, &path, Some(502), "upstream_failed", credential);
            };
            match &binding {
                Some(b) => rewrite_headers(req.headers_mut(), b),
                None => strip_sentinels(req.headers_mut()),
            }
            let mut guard = sender.lock().await;
            if guard.as_ref().is_none_or(|s| s.is_closed()) {
                let mut connected = None;
                for addr in &upstream {
                    if let Ok(Ok(tcp)) = tokio::time::timeout(std::time::Duration::from_secs(10), TcpStream::connect(addr)).await {
                        if let Ok((s, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            connected = Some(s);
                            break;
                        }
                    }
                }
                match connected {
                    Some(s) => *guard = Some(s),
                    None => {
                        failed("upstream unreachable");
                        return Ok(text(StatusCode::BAD_GATEWAY, "upstream unreachable"));
                    }
                }
            }
            let s = guard.as_mut().expect("connected above");
            if s.ready().await.is_err() {
                *guard = None;
                failed("upstream connection closed");
                return Ok(text(StatusCode::BAD_GATEWAY, "upstream connection closed"));
            }
            match s.send_request(req).await {
                Ok(resp) => {
                    if let Some(b) = &binding {
                        tracing::info!(%sandbox, %host, status = resp.status().as_u16(), credential = %b.name, "credential proxy: injected (plaintext)");
                    }
                    let credential = binding.as_ref().map(|b| injected(&b.name));
                    flow.http(&method, &host, &path, Some(resp.status().as_u16()), "allowed", credential);
                    Ok(resp.map(|b| b.boxed()))
                }
                Err(_) => {
                    *guard = None;
                    failed("upstream request failed");
                    Ok(text(StatusCode::BAD_GATEWAY, "upstream request failed"))
                }
            }
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(guest), service)
        .await
        .map_err(|e| format!("guest HTTP: {e}"))
}

/// Forwards an upgrade request (after injection) on a fresh HTTP/1.1
/// upstream connection; on `101` joins the two upgraded streams.
async fn upgrade(
    mut req: Request<Incoming>,
    upstream: &[std::net::SocketAddr],
    host: &str,
    tls: Arc<rustls::ClientConfig>,
    flow: &FlowContext,
    credential: &str,
) -> Response<ProxyBody> {
    let sandbox = &flow.sandbox;
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let mut h1_only = (*tls).clone();
    h1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut sender = match connect_upstream(upstream, host, Arc::new(h1_only)).await {
        Ok(Upstream::H1(s)) => s,
        Ok(Upstream::H2(_)) => return text(StatusCode::BAD_GATEWAY, "upstream chose HTTP/2 for an upgrade"),
        Err(e) => {
            tracing::info!(%sandbox, %host, "credential proxy: upstream: {e}");
            flow.http(&method, host, &path, Some(502), "upstream_failed", Some(not_injected(credential, "upstream unreachable")));
            return text(StatusCode::BAD_GATEWAY, "upstream unreachable");
        }
    };
    let guest_side = hyper::upgrade::on(&mut req);
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    *req.uri_mut() = path.parse().unwrap_or_default();
    *req.version_mut() = hyper::Version::HTTP_11;
    if let Ok(v) = HeaderValue::from_str(host) {
        req.headers_mut().insert(HOST, v);
    }
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(%sandbox, %host, "credential proxy: upgrade request: {e}");
            flow.http(&method, host, &path, Some(502), "upstream_failed", Some(not_injected(credential, "upstream request failed")));
            return text(StatusCode::BAD_GATEWAY, "upstream request failed");
        }
    };
    tracing::info!(%sandbox, %host, status = resp.status().as_u16(), %credential, "credential proxy: injected (upgrade)");
    flow.http(&method, host, &path, Some(resp.status().as_u16()), "allowed", Some(injected(credential)));
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(g), Ok(u)) = (guest_side.await, upstream_side.await) {
                let (mut g, mut u) = (TokioIo::new(g), TokioIo::new(u));
                let _ = tokio::io::copy_bidirectional(&mut g, &mut u).await;
            }
        });
    }
    resp.map(|b| b.boxed())
}

async fn connect_upstream(addrs: &[std::net::SocketAddr], host: &str, tls: Arc<rustls::ClientConfig>) -> Result<Upstream, String> {
    let mut last = String::from("no address");
    for addr in addrs {
        let tcp = match tokio::time::timeout(std::time::Duration::from_secs(10), TcpStream::connect(addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                last = e.to_string();
                continue;
            }
            Err(_) => {
                last = "connect timed out".into();
                continue;
            }
        };
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|e| format!("upstream TLS: {e}"))?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(Upstream::H2(sender));
        }
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        return Ok(Upstream::H1(sender));
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::load_secret;
    use crate::policy::CredentialSource;

    fn binding() -> CredentialBinding {
        let dir = std::env::temp_dir().join(format!("sbx-cred-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, "tok123").unwrap();
        let secret = Arc::new(load_secret(&CredentialSource::File(f.display().to_string())).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        CredentialBinding::new("gh", &["API.test".into()], "Authorization", "Bearer {secret}", secret, false).unwrap()
    }

    #[test]
    fn rewrites_credential_headers() {
        let b = binding();
        assert!(b.covers("api.test") && !b.covers("other.test"));
        assert!(format!("{b:?}").contains("gh") && !format!("{b:?}").contains("tok123"));
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer guest-made"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Basic second"));
        h.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        h.insert("x-api-key", HeaderValue::from_static("sbx-cred:gh"));
        h.insert("x-other", HeaderValue::from_static("sbx-cred:someone-else"));
        rewrite_headers(&mut h, &b);
        let auth: Vec<_> = h.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, vec!["Bearer tok123"], "replaced, not duplicated");
        assert!(h.get(PROXY_AUTHORIZATION).is_none());
        assert_eq!(h.get("x-api-key").unwrap(), "tok123");
        assert_eq!(h.get("x-other").unwrap(), "sbx-cred:someone-else");
        assert!(h.get(AUTHORIZATION).unwrap().is_sensitive());
        let mut elsewhere = HeaderMap::new();
        elsewhere.insert("x-api-key", HeaderValue::from_static("sbx-cred:gh"));
        elsewhere.insert("accept", HeaderValue::from_static("*/*"));
        strip_sentinels(&mut elsewhere);
        assert!(elsewhere.get("x-api-key").is_none() && elsewhere.get("accept").is_some());
        // Values with obs-text bytes (not valid `to_str`) are rewritten and
        // stripped too.
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_bytes(b"\xa1 sbx-cred:gh").unwrap());
        rewrite_headers(&mut h, &b);
        assert_eq!(h.get("x-api-key").unwrap().as_bytes(), b"\xa1 tok123");
        let mut elsewhere = HeaderMap::new();
        elsewhere.insert("x-api-key", HeaderValue::from_bytes(b"\xa1 sbx-cred:gh").unwrap());
        strip_sentinels(&mut elsewhere);
        assert!(elsewhere.get("x-api-key").is_none());
    }

    #[test]
    fn request_hosts() {
        let r = Request::builder().uri("/x").header(HOST, "API.test:443").body(()).unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("api.test"));
        let r = Request::builder().uri("https://api.test/x").body(()).unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("api.test"));
    }
}
