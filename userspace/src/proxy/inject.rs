//! The terminating HTTP proxy: for hosts a credential is bound to, hosts
//! with `[[http]]` rules and `[[mcp]]` servers, the proxy terminates the
//! guest's TLS with a leaf from the sandbox's CA (plain HTTP is served the
//! same way, [`serve_plain`]) and checks every request. On a host with
//! rules (or an MCP server) each request is put in one canonical form —
//! method upper-cased, path normalised, sentinels out — that is both
//! matched ([`decide_request`], by the policy in force at that request)
//! and forwarded, so the upstream serves the path that was checked; a
//! refusal is a 403 naming the rule and the connection carries on. Without
//! a credential nothing is injected or scrubbed, sentinels still go.
//!
//! Credential injection for hosts a credential is bound to: the proxy
//! terminates the guest's TLS with a leaf from the sandbox's CA, checks that
//! every request names the host the handshake named (SNI = Host =
//! :authority) and nothing else, removes every credential-bearing header
//! the guest sent, sets the configured one, and forwards over TLS verified
//! against the system roots plus `--upstream-ca`, to the address the proxy
//! checked. Redirects are passed back, never followed. Bodies stream.
//!
//! The secret goes only into its own header: a `sbx-cred:<name>` sentinel
//! anywhere else (another header, the path, the query, a trailer) is
//! removed, never replaced, so an upstream that reflects the request cannot
//! be made to reflect the secret from an unexpected place. And whatever it
//! reflects comes back through [`crate::credentials::scrub`]: every response header,
//! body and trailer from a credential host is scrubbed of the secret and
//! its encodings, as it streams. The proxy asks credential hosts for
//! `Accept-Encoding: identity` (and drops `Range`, which could cut a
//! reflection into pieces too short to recognise); a response that still
//! comes compressed is refused with 502, since it cannot be checked.
//!
//! Ambiguous request heads are refused before anything is forwarded, here
//! and on the plain-HTTP path ([`serve_plain`]), with a status, an
//! `X-Sbx-Net-Denied` header naming the reason and a flow record: two Host
//! headers, a request target (absolute-form URI or h2 `:authority`) naming
//! another host than Host, Content-Length together with Transfer-Encoding
//! (seen on the wire: [`FramingWatch`]), CONNECT. Two kinds never reach
//! this code: heads hyper cannot parse (obs-folded lines among them), which
//! hyper answers 400 itself — they get a `malformed_request` record when
//! the connection ends, but no `X-Sbx-Net-Denied`; and an HTTP/2 extended
//! CONNECT (`:protocol`), which the h2 layer resets (PROTOCOL_ERROR) as the
//! proxy does not advertise it.

use crate::observe::record::CredentialDetail;
use crate::observe::hub::FlowContext;
use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, HOST, IF_RANGE, PROXY_AUTHORIZATION, RANGE,
    TRANSFER_ENCODING, UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::credentials::scrub::{Patterns, Scrubber};
use crate::credentials::CredentialBinding;
use crate::policy::compile::CompiledPolicy;
use crate::policy::http::{HttpVerdict, PathRefusal};
use crate::policy::McpServer;

#[derive(Debug, thiserror::Error)]
pub enum CredentialProxyError {
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("--upstream-ca {path}: {source}")]
    UpstreamCaRead { path: String, source: std::io::Error },
    #[error("--upstream-ca {path}: {source}")]
    UpstreamCaCert { path: String, source: rustls::Error },
    #[error("guest TLS: {0}")]
    GuestTls(std::io::Error),
    #[error("guest TLS: the handshake did not finish by the first-bytes deadline")]
    GuestTlsTimeout,
    #[error("guest HTTP: {0}")]
    GuestHttp(Box<dyn std::error::Error + Send + Sync>),
    #[error("no upstream address")]
    NoUpstreamAddress,
    #[error("connecting upstream: {0}")]
    UpstreamConnect(std::io::Error),
    #[error("{0:?} is not a server name: {1}")]
    UpstreamName(String, rustls::pki_types::InvalidDnsNameError),
    #[error("upstream TLS: {0}")]
    UpstreamTls(std::io::Error),
    #[error("upstream TLS: no handshake within {0:?}")]
    UpstreamTlsTimeout(std::time::Duration),
    #[error("upstream HTTP handshake: {0}")]
    UpstreamHandshake(hyper::Error),
}

/// The sentinel a guest may send where the secret is expected (in the
/// credential's own header, which the proxy sets anyway).
pub fn sentinel(name: &str) -> String {
    format!("sbx-cred:{name}")
}

/// Where the next sentinel starts at or after `from`, and the length of its
/// prefix: `sbx-cred:` in any case, or with the colon percent-encoded.
fn find_sentinel(bytes: &[u8], from: usize) -> Option<(usize, usize)> {
    const PREFIXES: [&[u8]; 2] = [b"sbx-cred:", b"sbx-cred%3a"];
    (from..bytes.len()).find_map(|i| PREFIXES.iter().find(|p| bytes[i..].get(..p.len()).is_some_and(|b| b.eq_ignore_ascii_case(p))).map(|p| (i, p.len())))
}

/// `text` without its sentinels (prefix and credential name), or None when
/// it has none.
pub fn strip_sentinel_tokens(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    let mut found = false;
    while let Some((start, prefix)) = find_sentinel(text, at) {
        found = true;
        out.extend_from_slice(&text[at..start]);
        at = start + prefix;
        while text.get(at).is_some_and(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b)) {
            at += 1;
        }
    }
    found.then(|| {
        out.extend_from_slice(&text[at..]);
        out
    })
}

/// The URI with the sentinels of its path and query removed, or None when
/// it has none.
fn strip_uri_sentinels(uri: &Uri) -> Option<Uri> {
    let stripped = strip_sentinel_tokens(uri.path_and_query()?.as_str().as_bytes())?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(hyper::http::uri::PathAndQuery::try_from(stripped.as_slice()).ok()?);
    Uri::from_parts(parts).ok()
}

/// Removes every header value carrying a sentinel (any credential's): the
/// secret is set only in its own header, by [`rewrite_headers`].
pub fn strip_sentinels(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers.iter().filter(|(_, v)| find_sentinel(v.as_bytes(), 0).is_some()).map(|(k, _)| k.clone()).collect();
    for name in names {
        let kept: Vec<HeaderValue> = headers.get_all(&name).iter().filter(|v| find_sentinel(v.as_bytes(), 0).is_none()).cloned().collect();
        headers.remove(&name);
        for v in kept {
            headers.append(name.clone(), v);
        }
    }
}

/// Removes every credential-bearing header the guest sent (the configured
/// one, Authorization, Proxy-Authorization) and every sentinel, asks for
/// an identity body of the whole representation (the only kind the
/// response scrubbing can check), and sets the credential.
pub fn rewrite_headers(headers: &mut HeaderMap, binding: &CredentialBinding) {
    headers.remove(&binding.header);
    headers.remove(AUTHORIZATION);
    headers.remove(PROXY_AUTHORIZATION);
    strip_sentinels(headers);
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    headers.remove(RANGE);
    headers.remove(IF_RANGE);
    headers.insert(binding.header.clone(), binding.value.clone());
}

/// A host as compared: without a port or trailing dot, lower-case.
fn normalize_host(raw: &str) -> String {
    let host = match raw.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The host a request names (Host header, else the URI authority), without
/// a port, lower-case.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.headers().get(HOST).and_then(|h| h.to_str().ok()).map(str::to_string).or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))?;
    Some(normalize_host(&raw))
}

/// Why a request is refused before it is forwarded.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    /// For the guest (`X-Sbx-Net-Denied` and the body).
    pub reason: &'static str,
    /// The flow record's reason.
    pub record: &'static str,
    /// The host the request named, if any.
    pub named: Option<String>,
}

/// Whether a request may go to the upstream checked for `expected` (pure).
/// `framing_ambiguous`: the connection's bytes showed a head with both
/// Content-Length and Transfer-Encoding (hyper keeps only the latter, so
/// the request alone no longer shows it; see [`FramingWatch`]).
/// `misdirected`: what to tell the guest when the request names another host.
pub fn check_head<B>(req: &Request<B>, expected: &str, framing_ambiguous: bool, misdirected: &'static str) -> Result<(), Refusal> {
    let named = request_host(req);
    let refuse = |status, reason, record| Err(Refusal { status, reason, record, named: named.clone() });
    if req.method() == Method::CONNECT {
        // h1 CONNECT and h2 (extended) CONNECT alike: a tunnel from here
        // would reach whatever the guest names, with no request to check.
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not allowed here", "connect_refused");
    }
    if framing_ambiguous || (req.headers().contains_key(CONTENT_LENGTH) && req.headers().contains_key(TRANSFER_ENCODING)) {
        return refuse(StatusCode::BAD_REQUEST, "both Content-Length and Transfer-Encoding", "bad_request");
    }
    if req.headers().get_all(HOST).iter().nth(1).is_some() {
        return refuse(StatusCode::BAD_REQUEST, "more than one Host header", "bad_request");
    }
    if let (Some(authority), Some(host)) = (req.uri().authority(), req.headers().get(HOST)) {
        if host.to_str().map(normalize_host).ok().as_deref() != Some(normalize_host(authority.as_str()).as_str()) {
            return refuse(StatusCode::BAD_REQUEST, "the request target names another host than Host", "bad_request");
        }
    }
    if named.as_deref() != Some(expected) {
        return refuse(StatusCode::MISDIRECTED_REQUEST, misdirected, "misdirected");
    }
    Ok(())
}

/// A governed request's method and target in the one form that is both
/// matched against the `[[http]]` rules and forwarded (pure): the method
/// upper-cased, the path normalised ([`crate::policy::http::normalise_path`])
/// with the sentinels out of it (again normalised: removing one can leave
/// a dot segment or another sentinel behind), the query kept without its
/// sentinels, the scheme and authority (absolute form, HTTP/2) kept.
#[derive(Debug, PartialEq, Eq)]
pub struct Canonical {
    pub method: Method,
    pub uri: Uri,
    /// The normalised path (no query), as matched and recorded.
    pub path: String,
}

pub fn canonical_request(method: &Method, uri: &Uri) -> Result<Canonical, PathRefusal> {
    let upper = crate::policy::http::normalise_method(method.as_str());
    // An upper-cased token is still a token.
    let method = Method::from_bytes(upper.as_bytes()).map_err(|_| PathRefusal::MalformedEscape)?;
    let mut path = crate::policy::http::normalise_path(uri.path())?;
    // Each round removes at least a sentinel's prefix: bounded anyway.
    let mut rounds = 0;
    while let Some(stripped) = strip_sentinel_tokens(path.as_bytes()) {
        rounds += 1;
        if rounds > 16 {
            return Err(PathRefusal::MalformedEscape);
        }
        let stripped = String::from_utf8(stripped).map_err(|_| PathRefusal::MalformedEscape)?;
        path = crate::policy::http::normalise_path(&stripped)?;
    }
    let query = uri.query().map(|q| strip_sentinel_tokens(q.as_bytes()).map_or_else(|| q.to_string(), |s| String::from_utf8_lossy(&s).into_owned()));
    let target = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(hyper::http::uri::PathAndQuery::try_from(target).map_err(|_| PathRefusal::MalformedEscape)?);
    let uri = Uri::from_parts(parts).map_err(|_| PathRefusal::MalformedEscape)?;
    Ok(Canonical { method, uri, path })
}

/// Headers that would let a request on a governed host be read as another
/// than the one checked: a method override (`X-HTTP-Method-Override` and
/// kin, honoured by many frameworks: `POST` checked, `DELETE` served), or an
/// upgrade to anything but a WebSocket (`h2c` would turn the connection
/// into HTTP/2 straight to the server, past every later check) — and on an
/// `[[mcp]]` server any upgrade (a WebSocket transport would carry
/// `tools/call` unparsed).
pub fn ungovernable_headers(headers: &HeaderMap, mcp: bool) -> Option<&'static str> {
    const OVERRIDES: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];
    if OVERRIDES.iter().any(|h| headers.contains_key(*h)) {
        return Some("method-override header on a host with HTTP rules");
    }
    if headers.contains_key(UPGRADE) {
        if mcp {
            return Some("upgrade on an MCP server's connection");
        }
        if !is_websocket_upgrade(headers) {
            return Some("upgrade to anything but websocket");
        }
    }
    None
}

/// Whether the request's `Upgrade` is exactly one `websocket` token.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let values: Vec<&HeaderValue> = headers.get_all(UPGRADE).iter().collect();
    matches!(values.as_slice(), [v] if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// What becomes of one request on a terminated connection (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forwarded. `canonical`: the method and target to forward instead
    /// of the guest's (None: the host is not governed by `[[http]]` or
    /// `[[mcp]]`, the request goes as it came); `path` as recorded;
    /// `reason` of the record (`allowed` or `audit`); `rule` for the
    /// record instead of the connection's (None: the connection's).
    Forward { canonical: Option<(Method, Uri)>, path: String, reason: &'static str, rule: Option<String> },
    /// Answered by the proxy with `status`, `denied` in `X-Sbx-Net-Denied`;
    /// recorded with `record` as the reason and `rule`.
    Refuse { status: StatusCode, denied: String, record: &'static str, rule: String, method: String, path: String },
}

/// Decides a request to `host` (port `port`, the guest's destination) by
/// the policy in force: governed hosts (any `[[http]]` block or an
/// `[[mcp]]` server) get the canonical form and the `[[http]]` rules;
/// `audit`: the connection passes a network deny in audit mode only (its
/// rule), so what it carries is recorded as audit.
pub fn decide_request(policy: &CompiledPolicy, host: &str, port: u16, audit: Option<&str>, method: &Method, uri: &Uri, headers: &HeaderMap) -> Decision {
    let (reason, rule) = match audit {
        Some(r) => ("audit", Some(r.to_string())),
        None => ("allowed", None),
    };
    let mcp = crate::policy::mcp::server_for(&policy.mcp, host, port).is_some();
    let governed = crate::policy::http::has_rules_for(&policy.http, host) || mcp;
    if !governed {
        return Decision::Forward { canonical: None, path: uri.path().to_string(), reason, rule };
    }
    if let Some(why) = ungovernable_headers(headers, mcp) {
        return Decision::Refuse {
            status: StatusCode::BAD_REQUEST,
            denied: why.to_string(),
            record: "bad_request",
            rule: why.to_string(),
            method: crate::policy::http::normalise_method(method.as_str()),
            path: uri.path().to_string(),
        };
    }
    let canonical = match canonical_request(method, uri) {
        Ok(c) => c,
        Err(why) => {
            return Decision::Refuse {
                status: StatusCode::BAD_REQUEST,
                denied: why.reason().to_string(),
                record: "bad_request",
                rule: why.reason().to_string(),
                method: crate::policy::http::normalise_method(method.as_str()),
                path: uri.path().to_string(),
            }
        }
    };
    let Canonical { method, uri, path } = canonical;
    let forward = |reason, rule| Decision::Forward { canonical: Some((method.clone(), uri.clone())), path: path.clone(), reason, rule };
    match crate::policy::http::decide(&policy.http, host, method.as_str(), &path) {
        None | Some(HttpVerdict::Allow { rule: None }) => forward(reason, rule),
        // The network deny the connection passes in audit mode is what
        // would have stopped the request: it names the record.
        Some(HttpVerdict::Allow { rule: Some(allowed) }) => forward(reason, Some(rule.unwrap_or(allowed))),
        Some(HttpVerdict::Deny { rule, audit: true }) => forward("audit", Some(rule)),
        Some(HttpVerdict::Deny { rule, audit: false }) => {
            Decision::Refuse { status: StatusCode::FORBIDDEN, denied: rule.clone(), record: "http_rule", rule, method: method.to_string(), path }
        }
    }
}

/// Why a response from a credential host cannot be passed on (pure): a
/// content or transfer coding other than identity (and chunked) would hide
/// a reflected secret from the scrubbing. A response without a body is fine.
pub fn unscrubbable(method: &Method, status: StatusCode, headers: &HeaderMap) -> Option<&'static str> {
    if method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return None;
    }
    let codings = |name: HeaderName, allowed: &'static [&'static str]| {
        headers.get_all(name).iter().any(|v| v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii).any(|c| !c.is_empty() && !allowed.iter().any(|a| c.eq_ignore_ascii_case(a.as_bytes()))))
    };
    if codings(CONTENT_ENCODING, &["identity"]) || codings(TRANSFER_ENCODING, &["chunked", "identity"]) {
        return Some("the credential host sent a compressed response, which cannot be checked for the secret");
    }
    None
}

/// Scrubs the names and values of `headers`; a header whose name matched
/// is removed. The number of redactions.
pub fn scrub_headers(headers: &mut HeaderMap, patterns: &Patterns) -> u64 {
    let mut total = 0;
    let names: Vec<HeaderName> = headers.keys().filter(|k| patterns.is_match(k.as_str().as_bytes())).cloned().collect();
    for name in names {
        total += 1;
        headers.remove(name);
    }
    for value in headers.values_mut() {
        if patterns.is_match(value.as_bytes()) {
            let (out, n) = patterns.scrub(value.as_bytes());
            total += n;
            *value = HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("[REDACTED]"));
        }
    }
    total
}

/// Watches the bytes of an HTTP/1 connection for a head with both
/// Content-Length and Transfer-Encoding lines (pure). hyper reads such a
/// request safely (Transfer-Encoding wins, Content-Length is dropped and
/// the connection closes after the response), but the request it hands
/// over no longer shows the ambiguity, so the proxy could not refuse it.
/// The watch is by lines between blank lines, without following message
/// framing: a body that contains such a block too trips it, and the
/// connection's next request is refused (fail closed).
#[derive(Debug, Default)]
pub struct FramingWatch {
    line: [u8; 18],
    /// Bytes of the current line so far (only the first 18 are kept).
    line_len: usize,
    content_length: bool,
    transfer_encoding: bool,
    tripped: bool,
}

impl FramingWatch {
    /// Takes the next bytes; whether a head has shown both (sticky).
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if b != b'\n' {
                if self.line_len < self.line.len() {
                    self.line[self.line_len] = b;
                }
                self.line_len += 1;
                continue;
            }
            let kept = &self.line[..self.line_len.min(self.line.len())];
            if self.line_len == 0 || (self.line_len == 1 && kept == b"\r") {
                self.content_length = false;
                self.transfer_encoding = false;
            } else if kept.len() >= 15 && kept[..15].eq_ignore_ascii_case(b"content-length:") {
                self.content_length = true;
            } else if kept.len() >= 18 && kept[..18].eq_ignore_ascii_case(b"transfer-encoding:") {
                self.transfer_encoding = true;
            }
            self.tripped |= self.content_length && self.transfer_encoding;
            self.line_len = 0;
        }
        self.tripped
    }
}

/// A guest stream whose incoming bytes go through a [`FramingWatch`]
/// (HTTP/1 only: `enabled` false passes bytes unwatched).
struct Watched<S> {
    inner: S,
    watch: FramingWatch,
    enabled: bool,
    tripped: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.enabled && buf.filled().len() > before {
            let this = &mut *self;
            if this.watch.feed(&buf.filled()[before..]) {
                this.tripped.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    // Passed through: without them every TLS record (or HTTP buffer) of a
    // flush is a write(2) of its own.
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
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
    // Passed through: without them every TLS record (or HTTP buffer) of a
    // flush is a write(2) of its own.
    fn poll_write_vectored(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// TLS to upstreams: the system's web roots plus the PEM certificates of
/// `extra_ca` (for private or test CAs).
pub fn upstream_tls(extra_ca: Option<&std::path::Path>) -> Result<UpstreamTls, CredentialProxyError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let shown = || path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| CredentialProxyError::UpstreamCaRead { path: shown(), source })?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|source| CredentialProxyError::UpstreamCaRead { path: shown(), source })?;
            roots.add(cert).map_err(|source| CredentialProxyError::UpstreamCaCert { path: shown(), source })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?.with_root_certificates(roots).with_no_client_auth();
    let mut h1_only = config.clone();
    h1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(UpstreamTls { any: Arc::new(config), h1_only: Arc::new(h1_only) })
}

/// Request and response bodies as the proxy passes them on.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The upstream connection, HTTP/2 or HTTP/1.1 as its ALPN chose.
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<ProxyBody>),
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>),
}

/// Hop-by-hop headers belong to the guest's connection, not ours. Of
/// `TE`, only "trailers" goes on (as the proxy's own, when the guest's
/// named it): the one value HTTP/2 allows, which says the client takes
/// trailers (gRPC needs it) and asks the upstream for no transfer coding.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let trailers = asks_for_trailers(headers);
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if trailers {
        headers.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The headers that always belong to one hop.
pub const HOP_BY_HOP: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"];

/// The headers a guest's `Connection` names are hop-by-hop too (RFC 9110
/// §7.6.1) and do not go upstream. Taken out as the request arrives,
/// before the credential goes in: a name there never strips the proxy's
/// own header. The fixed ones are left to [`remove_hop_by_hop`] (which
/// reads TE's "trailers" first), and Host, checked already, is set for the
/// upstream by the proxy.
pub fn remove_connection_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| !HOP_BY_HOP.contains(&name.as_str()) && *name != HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// For an HTTP/1.1 upstream: TE is hop-by-hop there, so Connection names
/// it (RFC 9110 §10.1.4). Not for HTTP/2, which has no Connection.
fn te_in_connection(headers: &mut HeaderMap) {
    if headers.contains_key(hyper::header::TE) {
        headers.insert(hyper::header::CONNECTION, HeaderValue::from_static("te"));
    }
}

/// Whether a `TE` header names "trailers" (any case, parameters ignored).
fn asks_for_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(hyper::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")))
}

/// `uri` in origin-form (`/path?query`), for an HTTP/1.1 upstream.
fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").parse().unwrap_or_default()
}

impl Upstream {
    fn is_closed(&self) -> bool {
        match self {
            Upstream::H1(s) => s.is_closed(),
            Upstream::H2(s) => s.is_closed(),
        }
    }

    async fn send(&mut self, req: Request<ProxyBody>, host: &str) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Upstream::H1(s) => {
                s.ready().await?;
                s.send_request(for_h1(req, host)).await
            }
            Upstream::H2(s) => send_h2(s, req, host).await,
        }
    }
}

/// `req` as it goes to an HTTP/1.1 upstream: origin-form, Host set.
fn for_h1(mut req: Request<ProxyBody>, host: &str) -> Request<ProxyBody> {
    remove_hop_by_hop(req.headers_mut());
    te_in_connection(req.headers_mut());
    *req.version_mut() = Version::HTTP_11;
    *req.uri_mut() = origin_form(req.uri());
    if let Ok(v) = HeaderValue::from_str(host) {
        req.headers_mut().insert(HOST, v);
    }
    req
}

/// Sends `req` on an HTTP/2 connection (a stream of its own; any number of
/// these run at once on one connection).
async fn send_h2(s: &mut hyper::client::conn::http2::SendRequest<ProxyBody>, mut req: Request<ProxyBody>, host: &str) -> Result<Response<Incoming>, hyper::Error> {
    remove_hop_by_hop(req.headers_mut());
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut().remove(HOST);
    *req.uri_mut() = format!("https://{host}{path}").parse().unwrap_or_default();
    s.ready().await?;
    s.send_request(req).await
}

/// How the requests of one guest connection share its upstream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamRequests {
    /// HTTP/2 upstream: each request is a stream of its own, sent as soon
    /// as it comes (an HTTP/1.1 upstream is always one at a time).
    Concurrent,
    /// One request at a time whatever the protocol, as the proxy did before
    /// it shared HTTP/2 connections: kept only as the baseline of `cargo
    /// xtask bench proxy`.
    Serial,
}

/// Where a credential host's requests go: the addresses the proxy checked
/// for its name, over TLS verified with `tls`.
pub struct CredentialUpstream {
    pub addrs: Vec<std::net::SocketAddr>,
    pub tls: UpstreamTls,
    pub requests: UpstreamRequests,
    /// The TCP connection that showed the destination reachable when the
    /// guest connected (to the first of `addrs` that accepted): the first
    /// upstream connection is made on it, one TCP handshake (one round
    /// trip to the server) less per guest connection.
    pub reached: std::sync::Mutex<Option<Reached>>,
}

/// A connection made to an upstream address, and when.
pub struct Reached {
    pub stream: TcpStream,
    pub at: std::time::Instant,
}

/// How long a connection made when the guest connected is used for its
/// first request: servers close connections that stay silent before the
/// TLS handshake (after 10 s and more; nginx 60 s), and the guest usually
/// asks within milliseconds of its own handshake. Older: a new one.
const REACHED_REUSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

impl CredentialUpstream {
    /// The connection made when the guest connected, once, while it is
    /// fresh enough to shake hands on.
    fn take_reached(&self) -> Option<TcpStream> {
        let reached = self.reached.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        (reached.at.elapsed() < REACHED_REUSE_WITHIN).then_some(reached.stream)
    }
}

/// The upstream TLS configurations: one offering HTTP/2 and HTTP/1.1 (for
/// an HTTP/2 guest), one HTTP/1.1 only (for an HTTP/1.1 guest and
/// upgrades: request for request, with no HTTP/2 framing in between).
#[derive(Clone)]
pub struct UpstreamTls {
    pub any: Arc<rustls::ClientConfig>,
    pub h1_only: Arc<rustls::ClientConfig>,
}

/// A guest connection's upstream connections, made on its first request
/// (again after a failure), shared by the rest.
#[derive(Default)]
struct UpstreamSlot {
    /// The connection its requests take one at a time: HTTP/1.1 (or an
    /// HTTP/2 one when the guest's requests go one at a time).
    upstream: Option<Upstream>,
    /// An HTTP/2 guest's HTTP/2 upstream connections, its streams on them
    /// at once ([`needs_another_h2_upstream`]).
    h2: Vec<H2Upstream>,
    /// Connections put in `h2` so far (their ids).
    made: u64,
    /// Another of `h2` is being made (in the background: the streams go on
    /// those there are meanwhile).
    connecting: bool,
    /// Making another failed, answered HTTP/1.1 or hit the sandbox's
    /// connection cap: this guest connection keeps the ones it has.
    no_more: bool,
}

impl UpstreamSlot {
    /// Puts `sender` in `h2`, holding `permit` (an extra connection's
    /// place under the sandbox's cap) as long as it is there.
    fn add_h2(&mut self, sender: hyper::client::conn::http2::SendRequest<ProxyBody>, permit: Option<crate::util::conn_limit::ConnPermit>) {
        self.made += 1;
        self.h2.push(H2Upstream { id: self.made, sender, in_flight: Default::default(), _permit: permit });
    }
}

/// One of an HTTP/2 guest connection's HTTP/2 upstream connections.
struct H2Upstream {
    id: u64,
    sender: hyper::client::conn::http2::SendRequest<ProxyBody>,
    /// Streams sent on it whose response head is not in yet.
    in_flight: crate::util::conn_limit::InFlight,
    /// For all but the first: its place under the sandbox's cap.
    _permit: Option<crate::util::conn_limit::ConnPermit>,
}

/// The most HTTP/2 upstream connections one guest connection's streams
/// are spread over.
const H2_UPSTREAMS: usize = 4;
/// Streams waiting on every one of them before another is made.
const H2_STREAMS_EACH: usize = 2;

/// Whether an HTTP/2 guest's next stream gets a new upstream connection,
/// given the streams in flight on those it has: when it has none, or when
/// every one has [`H2_STREAMS_EACH`] waiting and there are fewer than
/// [`H2_UPSTREAMS`]. Else it goes on the least busy. Why more than one:
/// a server (or proxy) serves a connection's streams on one thread, and
/// all of a guest's streams in one TLS record upstream arrive, are
/// answered and come back as one batch; spread over a few connections
/// they overlap instead (`bench proxy`: the machine was half idle with
/// one). A guest whose streams don't overlap keeps one connection. Each
/// one after the first counts against the sandbox's connection cap.
fn needs_another_h2_upstream(in_flight: &[usize]) -> bool {
    in_flight.len() < H2_UPSTREAMS && in_flight.iter().all(|n| *n >= H2_STREAMS_EACH)
}

/// Makes another HTTP/2 upstream connection for `slot`'s guest connection
/// (its streams go on the others meanwhile), holding `permit` with it.
async fn add_h2_upstream(slot: Arc<tokio::sync::Mutex<UpstreamSlot>>, upstream: Arc<CredentialUpstream>, host: Arc<str>, permit: crate::util::conn_limit::ConnPermit) {
    // Bounded: a handshake that stalls must not keep the slot "connecting"
    // (and so from trying again) for ever.
    let connected = tokio::time::timeout(H2_CONNECT_TIMEOUT, connect_upstream(&upstream.addrs, &host, upstream.tls.any.clone(), None)).await;
    let mut held = slot.lock().await;
    held.connecting = false;
    match connected {
        Ok(Ok(Upstream::H2(sender))) => held.add_h2(sender, Some(permit)),
        // An HTTP/1.1 answer, an error or no answer in time: the streams
        // stay on the connections there are, and no more are tried.
        other => {
            held.no_more = true;
            if let Ok(Err(e)) = other {
                tracing::debug!(%host, "credential proxy: another upstream connection: {e}");
            }
        }
    }
}

/// How long the TLS handshake with an upstream may take (the TCP connect
/// has its own 10 s).
const UPSTREAM_TLS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long an extra HTTP/2 upstream connection may take to be made.
const H2_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn text(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let mut r = Response::new(Full::new(Bytes::from(format!("sbx-net: {reason}\n"))).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    // Printable ASCII only: a rule may name a non-ASCII path.
    let shown: String = reason.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').collect();
    if let Ok(v) = HeaderValue::from_str(&shown) {
        r.headers_mut().insert("x-sbx-net-denied", v);
    }
    r
}

/// Records a refused request and answers it. An HTTP/1 connection is
/// closed after anything but 421 (whose client may carry on with the
/// host the connection is for): after an ambiguous head, nothing that
/// follows on it can be trusted to be framed as the guest meant.
fn refuse<B>(flow: &FlowContext, req: &Request<B>, host: &str, refusal: Refusal, credential: Option<&str>) -> Response<ProxyBody> {
    let sandbox = &flow.sandbox;
    let named = refusal.named.as_deref();
    if flow.hub.log_lines.admits(sandbox) {
        tracing::info!(%sandbox, %host, named = named.unwrap_or("-"), method = %req.method(), reason = refusal.reason, "proxy: request refused");
    }
    let recorded_host = if refusal.record == "misdirected" { named.unwrap_or("") } else { named.unwrap_or(host) };
    let credential = credential.map(|name| not_injected(name, refusal.reason));
    flow.http(req.method().as_str(), recorded_host, req.uri().path(), Some(refusal.status.as_u16()), refusal.record, credential);
    let mut response = text(refusal.status, refusal.reason);
    if req.version() <= Version::HTTP_11 && refusal.status != StatusCode::MISDIRECTED_REQUEST {
        response.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn injected(name: &str) -> CredentialDetail {
    CredentialDetail { name: name.to_string(), injected: true, failure: None, redactions: 0 }
}

fn not_injected(name: &str, why: &str) -> CredentialDetail {
    CredentialDetail { name: name.to_string(), injected: false, failure: Some(why.to_string()), redactions: 0 }
}

/// The guest's request as it goes upstream: sentinels out of the path and
/// query, headers rewritten for `binding` (or only stripped of sentinels
/// without one), and trailers cleaned the same way as the body streams.
fn guest_request(req: Request<Incoming>, binding: Option<&CredentialBinding>) -> Request<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    if let Some(uri) = strip_uri_sentinels(&parts.uri) {
        parts.uri = uri;
    }
    remove_connection_named(&mut parts.headers);
    match binding {
        Some(b) => rewrite_headers(&mut parts.headers, b),
        None => strip_sentinels(&mut parts.headers),
    }
    let header = binding.map(|b| b.header.clone());
    Request::from_parts(parts, GuestBody { inner: body, credential_header: header }.boxed())
}

/// A request body whose trailers lose sentinels and credential headers.
struct GuestBody<B> {
    inner: B,
    credential_header: Option<HeaderName>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for GuestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let Poll::Ready(Some(Ok(mut frame))) = polled else { return polled };
        if let Some(trailers) = frame.trailers_mut() {
            strip_sentinels(trailers);
            trailers.remove(AUTHORIZATION);
            trailers.remove(PROXY_AUTHORIZATION);
            if let Some(h) = &self.credential_header {
                trailers.remove(h);
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Publishes a `secret_redacted` record, when there were redactions, once
/// the response it belongs to is done (dropped).
struct RedactionReport {
    /// The request (shared with its other records, not copied).
    request: Arc<Forwarded>,
    status: u16,
    credential: String,
    /// In the head (and for upgrades, the stream), counted as found.
    counted: u64,
    /// In the body and trailers so far.
    body: u64,
}

impl Drop for RedactionReport {
    fn drop(&mut self) {
        let count = self.counted + self.body;
        if count > 0 {
            let r = &*self.request;
            tracing::warn!(sandbox = %r.flow.sandbox, host = %r.host, path = %r.path, credential = %self.credential, count, "credential proxy: the secret was cut out of a response");
            r.flow.secret_redacted(r.method.as_str(), &r.host, &r.path, Some(self.status), &self.credential, count);
        }
    }
}

/// A response body from a credential host, scrubbed as it streams (data
/// and trailers).
struct ScrubBody<B> {
    inner: B,
    scrubber: Scrubber,
    patterns: Patterns,
    /// Trailers that wait for the held-back bytes to go first.
    trailers: Option<HeaderMap>,
    ended: bool,
    /// While bytes are held back and the upstream is silent: when they go
    /// out anyway ([`Scrubber::release_after`]).
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    report: RedactionReport,
}

impl<B> ScrubBody<B> {
    fn new(inner: B, patterns: &Patterns, report: RedactionReport) -> ScrubBody<B> {
        ScrubBody { inner, scrubber: patterns.scrubber(), patterns: patterns.clone(), trailers: None, ended: false, idle: None, report }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ScrubBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(t) = this.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    let Some(after) = this.scrubber.release_after() else { return Poll::Pending };
                    let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
                    if std::future::Future::poll(idle.as_mut(), cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.idle = None;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(this.scrubber.release())))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => Some(frame),
                Poll::Ready(None) => None,
            };
            this.idle = None;
            let out = match frame.map(Frame::into_data) {
                Some(Ok(data)) => match this.scrubber.push(&data) {
                    Cow::Borrowed(_) => data,
                    Cow::Owned(v) => Bytes::from(v),
                },
                Some(Err(frame)) => {
                    let Ok(mut trailers) = frame.into_trailers() else { continue };
                    this.report.counted += scrub_headers(&mut trailers, &this.patterns);
                    this.trailers = Some(trailers);
                    this.ended = true;
                    Bytes::from(this.scrubber.finish())
                }
                None => {
                    this.ended = true;
                    Bytes::from(this.scrubber.finish())
                }
            };
            this.report.body = this.scrubber.redactions();
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Redaction keeps lengths; held-back bytes are still to come.
        if self.ended {
            return SizeHint::with_exact(0);
        }
        let inner = self.inner.size_hint();
        let held = self.scrubber.held() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// Turns of the serving thread [`read_ahead`] gives the upstream
/// connection's task to hand over what it has already read.
const READ_AHEAD_TURNS: u32 = 2;
/// At most this many frames, and about this many bytes (the limit is
/// checked before each frame: at most one frame more, itself bounded by
/// the upstream connection's read buffer), are read ahead: a small
/// answer whole, a large or streaming one only its start.
const READ_AHEAD_FRAMES: usize = 16;
const READ_AHEAD_BYTES: usize = 64 * 1024;

/// An upstream body whose first frames were read ahead ([`read_ahead`]).
struct ReadAhead<B: Body> {
    held: std::collections::VecDeque<Result<Frame<B::Data>, B::Error>>,
    rest: B,
    /// The body ended while read ahead, or an error was handed on (the
    /// body ends there).
    ended: bool,
}

/// Reads `body`'s frames as far as they are there without waiting on the
/// network: the upstream connection's task runs on the same thread and
/// hands over what it already read within a turn or two. A small answer's
/// head, body and end (a chunked body's last chunk) then leave for the
/// guest in one write, one TLS record and one wake-up of the guest instead
/// of two or three (hyper flushes what it has whenever the body is not
/// ready). What is not there yet (a slow or streaming upstream) is not
/// waited for; an error stops the reading and is handed on in its turn.
async fn read_ahead<B: Body + Unpin>(mut body: B) -> ReadAhead<B> {
    let (mut held, mut ended, mut turns, mut bytes) = (std::collections::VecDeque::new(), false, 0, 0);
    std::future::poll_fn(|cx| loop {
        if held.len() >= READ_AHEAD_FRAMES || bytes >= READ_AHEAD_BYTES {
            return Poll::Ready(());
        }
        match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                bytes += frame.data_ref().map_or(0, hyper::body::Buf::remaining);
                held.push_back(Ok(frame));
            }
            Poll::Ready(Some(Err(e))) => {
                held.push_back(Err(e));
                return Poll::Ready(());
            }
            Poll::Ready(None) => {
                ended = true;
                return Poll::Ready(());
            }
            Poll::Pending if turns < READ_AHEAD_TURNS => {
                // To the back of the thread's queue, behind the upstream
                // connection's task our poll just woke.
                turns += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Pending => return Poll::Ready(()),
        }
    })
    .await;
    ReadAhead { held, rest: body, ended }
}

// Never pinned structurally: held frames are moved out, the rest is
// polled through `Pin::new` (B: Unpin).
impl<B: Body + Unpin> Unpin for ReadAhead<B> {}

impl<B: Body + Unpin> Body for ReadAhead<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        if let Some(frame) = self.held.pop_front() {
            if frame.is_err() {
                self.ended = true;
                self.held.clear();
            }
            return Poll::Ready(Some(frame));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.rest).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && (self.ended || self.rest.is_end_stream())
    }

    /// The upstream's own hint plus what is held: exact only where the
    /// upstream's was, so the guest gets the framing it would have got —
    /// but for an empty body, which ends before its head is written (sent
    /// with `content-length: 0` where a chunked upstream sent no chunk).
    fn size_hint(&self) -> SizeHint {
        let held: u64 = self.held.iter().filter_map(|f| f.as_ref().ok()?.data_ref()).map(|d| hyper::body::Buf::remaining(d) as u64).sum();
        let inner = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// What the MCP check of a request comes to: the request to forward, or
/// the answer the guest gets instead.
pub type McpChecked = Pin<Box<dyn std::future::Future<Output = Result<Request<ProxyBody>, Response<ProxyBody>>> + Send>>;

/// The MCP check of `[[mcp]]` servers' traffic (`proxy::mcp`), handed in
/// by the proxy's front (`proxy/mod.rs`): that module builds on this one's
/// bodies, so this one does not name it.
pub struct McpHooks {
    /// The request to forward, or the answer the guest gets instead.
    pub check: fn(Request<ProxyBody>, McpServer, FlowContext) -> McpChecked,
    /// The upstream's answer as the guest gets it.
    pub filter: fn(Response<ProxyBody>, &McpServer, &FlowContext) -> Response<ProxyBody>,
}

/// How a forwarded request is recorded: under `flow`'s rule (the rule that
/// decided it), with `reason` (`allowed`, or `audit` when only an
/// audit-mode rule would have refused it).
struct Forwarded {
    flow: FlowContext,
    method: Method,
    host: String,
    /// As matched (normalised on governed hosts).
    path: String,
    reason: &'static str,
}

impl Forwarded {
    fn record(&self, status: u16, reason: &'static str, credential: Option<CredentialDetail>) {
        self.flow.http(self.method.as_str(), &self.host, &self.path, Some(status), reason, credential);
    }
}

/// What the guest gets for `resp`: with a credential bound, refused when
/// it cannot be checked, else with its head scrubbed and its body
/// scrubbing as it streams; from an `[[mcp]]` server, filtered first;
/// recorded either way.
fn respond<B>(resp: Response<B>, fwd: &Arc<Forwarded>, binding: Option<&CredentialBinding>, mcp: Option<(&McpServer, &McpHooks)>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
{
    let status = resp.status().as_u16();
    let (flow, host, path) = (&fwd.flow, fwd.host.as_str(), fwd.path.as_str());
    if let Some(why) = binding.and_then(|_| unscrubbable(&fwd.method, resp.status(), resp.headers())) {
        tracing::info!(sandbox = %flow.sandbox, %host, %path, status, "credential proxy: compressed response refused");
        fwd.record(502, "compressed_response", binding.map(|b| injected(&b.name)));
        return text(StatusCode::BAD_GATEWAY, why);
    }
    // Debug, not info: every injected request already has its audit line
    // (below, `fwd.record`: the sandbox, host, method, path, status and
    // credential, never dropped), and an info line per request formatted
    // and written to the log synchronously cost ~9 % of the data plane's
    // CPU and a write(2) on the request's path (`bench proxy`, perf).
    match binding {
        Some(b) => tracing::debug!(sandbox = %flow.sandbox, %host, method = %fwd.method, %path, status, credential = %b.name, "credential proxy: injected"),
        None => tracing::debug!(sandbox = %flow.sandbox, %host, method = %fwd.method, %path, status, "proxy: forwarded"),
    }
    fwd.record(status, fwd.reason, binding.map(|b| injected(&b.name)));
    let (mut parts, body) = resp.into_parts();
    if binding.is_some() {
        // An HTTP/1 upstream's own reason phrase would be written back as
        // it came: the canonical one carries nothing.
        parts.extensions.remove::<hyper::ext::ReasonPhrase>();
    }
    let mut resp = Response::from_parts(parts, body.boxed());
    if let Some((server, hooks)) = mcp {
        resp = (hooks.filter)(resp, server, flow);
    }
    let Some(binding) = binding else { return resp };
    let (mut parts, body) = resp.into_parts();
    let in_head = scrub_headers(&mut parts.headers, &binding.scrub);
    let report = RedactionReport {
        request: fwd.clone(),
        status,
        credential: binding.name.clone(),
        counted: in_head,
        body: 0,
    };
    let body = ScrubBody::new(body, &binding.scrub, report);
    Response::from_parts(parts, body.boxed())
}

/// Whether a connection error is hyper refusing a head it could not parse
/// (it has answered 400 or 431 itself).
fn is_parse_error(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_parse)
}

/// What the policy in force says about a connection's host now (asked per
/// request, so a reload reaches kept-alive connections).
#[derive(Clone)]
pub struct InForce {
    /// The sandbox's policy now: its `[[http]]` rules and `[[mcp]]` servers.
    pub policy: Arc<CompiledPolicy>,
    /// The credential bound to the host now, if any.
    pub binding: Option<Arc<CredentialBinding>>,
    /// Set when the connection passes a network deny only because that
    /// deny is in audit mode: the deny's rule.
    pub audit: Option<String>,
}

/// The policy in force for a host (see [`InForce`]), or the rule that no
/// longer allows the connection.
pub type Recheck = Arc<dyn Fn(&str) -> Result<InForce, String> + Send + Sync>;

/// A request on a connection the policy in force no longer allows (or
/// whose host no longer has a credential): refused with the rule, recorded
/// under that rule; HTTP/1 connections close after it.
fn refuse_changed<B>(flow: &FlowContext, req: &Request<B>, host: &str, rule: String, credential: Option<&str>) -> Response<ProxyBody> {
    let flow = FlowContext { rule: rule.into(), ..flow.clone() };
    let refusal = Refusal { status: StatusCode::FORBIDDEN, reason: "the policy in force no longer allows this", record: "policy_changed", named: None };
    refuse(&flow, req, host, refusal, credential)
}

/// Whether the proxy checks `host`'s requests itself (`[[http]]` rules or
/// an `[[mcp]]` server on `port`), credential or not.
pub fn governed(policy: &CompiledPolicy, host: &str, port: u16) -> bool {
    crate::policy::http::has_rules_for(&policy.http, host) || crate::policy::mcp::server_for(&policy.mcp, host, port).is_some()
}

/// A request past the proxy's checks, on its way upstream.
struct Admitted {
    req: Request<ProxyBody>,
    fwd: Arc<Forwarded>,
    /// The `[[mcp]]` server the request is for.
    mcp: Option<McpServer>,
}

/// The steps every request on a terminated connection takes once its head
/// passed [`check_head`]: the canonical form and the `[[http]]` rules of
/// the policy in force ([`decide_request`]), the credential's rewriting
/// (or only the sentinels' removal), then, for an `[[mcp]]` server, the
/// MCP check. Err: what the guest gets instead.
async fn admit(req: Request<Incoming>, now: &InForce, binding: Option<&CredentialBinding>, (host, port): (&str, u16), flow: &FlowContext, hooks: &McpHooks) -> Result<Admitted, Response<ProxyBody>> {
    match decide_request(&now.policy, host, port, now.audit.as_deref(), req.method(), req.uri(), req.headers()) {
        Decision::Refuse { status, denied, record, rule, method, path } => {
            if flow.hub.log_lines.admits(&flow.sandbox) {
                tracing::info!(sandbox = %flow.sandbox, %host, %method, %path, %rule, "proxy: request refused");
            }
            let flow = FlowContext { rule: rule.into(), ..flow.clone() };
            flow.http(&method, host, &path, Some(status.as_u16()), record, binding.map(|b| not_injected(&b.name, &denied)));
            // Unlike an ambiguous head, this one was framed as the guest
            // meant: the connection stays usable (no Connection: close).
            Err(text(status, &denied))
        }
        Decision::Forward { canonical, path, reason, rule } => {
            let mut req = req;
            if let Some((method, uri)) = canonical {
                *req.method_mut() = method;
                *req.uri_mut() = uri;
            }
            let flow = match rule {
                Some(rule) => FlowContext { rule: rule.into(), ..flow.clone() },
                None => flow.clone(),
            };
            let fwd = Forwarded { flow, method: req.method().clone(), host: host.to_string(), path, reason };
            let mut req = guest_request(req, binding);
            let mcp = crate::policy::mcp::server_for(&now.policy.mcp, host, port).cloned();
            if let Some(server) = &mcp {
                // The answer is read as JSON (tools/list is filtered): no
                // compression.
                req.headers_mut().insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
                req = (hooks.check)(req, server.clone(), fwd.flow.clone()).await?;
            }
            Ok(Admitted { req, fwd: Arc::new(fwd), mcp })
        }
    }
}

/// Serves one guest connection terminated at the proxy: TLS with `tls`
/// (the sandbox CA's leaf for `host`), HTTP/1.1 or HTTP/2 requests
/// checked (head, `[[http]]` rules, MCP), injected when a credential is
/// bound (`binding`: the one bound when the connection came; per request
/// the policy in force decides) and forwarded to the upstream (checked for
/// `host`) on upstream connections it keeps: one for an HTTP/1.1 guest,
/// its requests in turn; for an HTTP/2 guest its streams at once, over up
/// to [`H2_UPSTREAMS`] HTTP/2 connections while they overlap — responses
/// filtered and scrubbed. `port`: the
/// guest's destination port (which `[[mcp]]` server).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    guest: Prefixed<TcpStream>,
    host: String,
    port: u16,
    tls: Arc<rustls::ServerConfig>,
    upstream: CredentialUpstream,
    binding: Option<Arc<CredentialBinding>>,
    flow: FlowContext,
    permit: Arc<crate::util::conn_limit::ConnPermit>,
    recheck: Recheck,
    mcp_hooks: &'static McpHooks,
    handshake_deadline: tokio::time::Instant,
) -> Result<(), CredentialProxyError> {
    let upstream = Arc::new(upstream);
    // A guest that asks nothing for a while (or takes its time over its
    // own handshake) does not keep the connection made when it connected:
    // dropped when too old to use, or with this connection.
    let _drop_unused = upstream.reached.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|r| {
        let (unused, too_old) = (Arc::downgrade(&upstream), tokio::time::Instant::from_std(r.at + REACHED_REUSE_WITHIN));
        crate::util::task::AbortOnDrop(tokio::spawn(async move {
            tokio::time::sleep_until(too_old).await;
            if let Some(upstream) = unused.upgrade() {
                drop(upstream.reached.lock().unwrap_or_else(|p| p.into_inner()).take());
            }
        }))
    });
    // A guest that sends its ClientHello and then nothing would otherwise
    // hold the connection (and one of its sandbox's slots) for good.
    let tls = tokio::time::timeout_at(handshake_deadline, tokio_rustls::TlsAcceptor::from(tls).accept(guest))
        .await
        .map_err(|_| CredentialProxyError::GuestTlsTimeout)?
        .map_err(CredentialProxyError::GuestTls)?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let tripped = Arc::new(AtomicBool::new(false));
    let io = Watched { inner: tls, watch: FramingWatch::default(), enabled: !h2, tripped: tripped.clone() };
    let slot: Arc<tokio::sync::Mutex<UpstreamSlot>> = Arc::default();
    // Shared by the requests (a clone per request is a reference count).
    let (service_host, service_binding, service_flow): (Arc<str>, _, _) = (host.as_str().into(), binding.clone(), flow.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (host, upstream, first_binding, slot, flow, tripped, permit, recheck) =
            (service_host.clone(), upstream.clone(), service_binding.clone(), slot.clone(), service_flow.clone(), tripped.clone(), permit.clone(), recheck.clone());
        let fut = async move {
            let sandbox = &flow.sandbox;
            let first_credential = first_binding.as_ref().map(|b| b.name.as_str());
            // The policy in force now (a reload may have rotated, rebound
            // or removed the credential, changed the rules, or denied the
            // host).
            let now = match recheck(&host) {
                Ok(now) => now,
                Err(rule) => return Ok::<_, hyper::Error>(refuse_changed(&flow, &req, &host, rule, first_credential)),
            };
            if first_binding.is_some() && now.binding.is_none() && !governed(&now.policy, &host, port) {
                // Terminated only for the credential, which is gone.
                return Ok(refuse_changed(&flow, &req, &host, format!("no credential is bound to {host} any more"), first_credential));
            }
            let binding = now.binding.clone();
            let credential = binding.as_ref().map(|b| b.name.as_str());
            let framing = req.version() <= Version::HTTP_11 && tripped.load(Ordering::Relaxed);
            if let Err(refusal) = check_head(&req, &host, framing, "Host must equal the TLS server name") {
                return Ok::<_, hyper::Error>(refuse(&flow, &req, &host, refusal, credential));
            }
            let Admitted { req, fwd, mcp } = match admit(req, &now, binding.as_deref(), (&host, port), &flow, mcp_hooks).await {
                Ok(admitted) => admitted,
                Err(answer) => return Ok(answer),
            };
            let not_sent = |why: &str| credential.map(|c| not_injected(c, why));
            if req.headers().contains_key(UPGRADE) {
                // WebSocket (or another upgrade): its own HTTP/1.1 upstream
                // connection, the credential already injected, then bytes
                // (scrubbed). On a host with `[[http]]` rules or an `[[mcp]]`
                // server, [`decide_request`] let only a WebSocket get here.
                return Ok(upgrade(req, &upstream.addrs, upstream.tls.h1_only.clone(), upstream.take_reached(), &fwd, binding.as_deref(), permit).await);
            }
            let mut held = slot.lock().await;
            let mut spread = None;
            // An HTTP/2 guest's streams go upstream at once, over HTTP/2,
            // unless the upstream answered its first connection over
            // HTTP/1.1 (then one at a time on that one while it lasts).
            if h2 && upstream.requests == UpstreamRequests::Concurrent {
                if held.upstream.as_ref().is_some_and(|s| s.is_closed()) {
                    held.upstream = None;
                }
                held.h2.retain(|c| !c.sender.is_closed());
                if held.upstream.is_none() && held.h2.is_empty() {
                    // The first: the stream waits for it.
                    match connect_upstream(&upstream.addrs, &host, upstream.tls.any.clone(), upstream.take_reached()).await {
                        Ok(Upstream::H2(sender)) => held.add_h2(sender, None),
                        Ok(h1) => held.upstream = Some(h1),
                        Err(e) => {
                            tracing::info!(%sandbox, %host, "credential proxy: upstream: {e}");
                            fwd.record(502, "upstream_failed", not_sent("upstream unreachable"));
                            return Ok(text(StatusCode::BAD_GATEWAY, "upstream unreachable"));
                        }
                    }
                }
                if held.upstream.is_none() {
                    let in_flight: Vec<usize> = held.h2.iter().map(|c| c.in_flight.count()).collect();
                    if needs_another_h2_upstream(&in_flight) && !held.connecting && !held.no_more {
                        match permit.another() {
                            Ok(extra) => {
                                held.connecting = true;
                                tokio::spawn(add_h2_upstream(slot.clone(), upstream.clone(), host.clone(), extra));
                            }
                            // At the sandbox's cap: the streams share the
                            // connections there are.
                            Err(_) => held.no_more = true,
                        }
                    }
                    let c = &held.h2[crate::util::conn_threads::least_busy(&in_flight)];
                    spread = Some((c.sender.clone(), c.id, c.in_flight.enter()));
                }
            }
            if spread.is_none() && held.upstream.as_ref().is_none_or(|s| s.is_closed()) {
                // Like for like: an HTTP/1.1 guest's requests go one at a
                // time anyway, so HTTP/1.1 upstream (no HTTP/2 framing, no
                // stream bookkeeping); an HTTP/2 guest's share HTTP/2.
                let connected = if h2 {
                    connect_upstream(&upstream.addrs, &host, upstream.tls.any.clone(), upstream.take_reached()).await
                } else {
                    match connect_upstream(&upstream.addrs, &host, upstream.tls.h1_only.clone(), upstream.take_reached()).await {
                        // An upstream that speaks only HTTP/2 (and refuses
                        // the handshake without it): translated, as before.
                        Err(CredentialProxyError::UpstreamTls(_)) => connect_upstream(&upstream.addrs, &host, upstream.tls.any.clone(), None).await,
                        other => other,
                    }
                };
                match connected {
                    Ok(s) => {
                        held.upstream = Some(s);
                        held.made += 1;
                    }
                    Err(e) => {
                        tracing::info!(%sandbox, %host, "credential proxy: upstream: {e}");
                        fwd.record(502, "upstream_failed", not_sent("upstream unreachable"));
                        return Ok(text(StatusCode::BAD_GATEWAY, "upstream unreachable"));
                    }
                }
            }
            let sent = match spread {
                // HTTP/2: the request goes on its own handle to the
                // connection, without the lock, so the guest's streams are
                // upstream at the same time.
                Some((mut s, id, in_flight)) => {
                    drop(held);
                    let sent = send_h2(&mut s, req, &host).await;
                    drop(in_flight);
                    if sent.is_err() {
                        // Whether the connection or only the stream failed,
                        // the next stream gets a connection known to work.
                        slot.lock().await.h2.retain(|c| c.id != id);
                    }
                    sent
                }
                // An HTTP/1.1 connection carries one request at a time: the
                // lock is held until the response's head is in.
                None => {
                    let sent = held.upstream.as_mut().expect("connected above").send(req, &host).await;
                    if sent.is_err() {
                        held.upstream = None;
                    }
                    sent
                }
            };
            match sent {
                Ok(resp) => {
                    let (head, body) = resp.into_parts();
                    let resp = Response::from_parts(head, read_ahead(body).await);
                    Ok(respond(resp, &fwd, binding.as_deref(), mcp.as_ref().map(|s| (s, mcp_hooks))))
                }
                Err(e) => {
                    tracing::info!(%sandbox, %host, "credential proxy: upstream request: {e}");
                    fwd.record(502, "upstream_failed", not_sent("upstream request failed"));
                    Ok(text(StatusCode::BAD_GATEWAY, "upstream request failed"))
                }
            }
        };
        // Boxed: hyper moves the request's future into a task of its own
        // (HTTP/2) or its dispatcher, and this one is kilobytes; moving a
        // pointer instead was a measurable share of the serving thread's
        // time in `bench proxy` (memmove from tokio's spawn, perf).
        Box::pin(fut)
    });
    // HTTP/1.1 or HTTP/2, whichever the guest speaks (ALPN offered both).
    // Extended CONNECT stays off: not advertising it keeps WebSocket
    // clients on HTTP/1.1 upgrades, and h2 refuses `:protocol` itself.
    let served = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()).serve_connection_with_upgrades(TokioIo::new(io), service).await;
    served.map_err(|e| {
        if is_parse_error(&*e) {
            flow.http("", &host, "", Some(400), "malformed_request", binding.as_ref().map(|b| not_injected(&b.name, "malformed request head")));
        }
        CredentialProxyError::GuestHttp(e)
    })
}

/// Serves plain HTTP/1.1 for the guest, forwarded over plain TCP to the
/// checked address: the same checks as over TLS (head, `[[http]]` rules,
/// MCP); with a credential that allows plaintext bound, the same
/// rewriting and scrubbing; without, sentinels are stripped and nothing
/// is injected. `port`: the guest's destination port.
#[allow(clippy::too_many_arguments)]
pub async fn serve_plain(
    guest: Prefixed<TcpStream>,
    host: String,
    port: u16,
    upstream: Vec<std::net::SocketAddr>,
    binding: Option<Arc<CredentialBinding>>,
    flow: FlowContext,
    recheck: Recheck,
    mcp_hooks: &'static McpHooks,
) -> Result<(), CredentialProxyError> {
    let tripped = Arc::new(AtomicBool::new(false));
    let io = Watched { inner: guest, watch: FramingWatch::default(), enabled: true, tripped: tripped.clone() };
    let sender: Arc<tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<ProxyBody>>>> = Arc::default();
    // Shared by the requests (a clone per request is a reference count).
    let (service_host, service_binding, service_flow): (Arc<str>, _, _) = (host.as_str().into(), binding.clone(), flow.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (host, upstream, first_binding, sender, flow, tripped, recheck) =
            (service_host.clone(), upstream.clone(), service_binding.clone(), sender.clone(), service_flow.clone(), tripped.clone(), recheck.clone());
        let fut = async move {
            // Per request: the policy in force decides (a reload reaches
            // kept-alive connections), and so does the plaintext binding.
            let now = match recheck(&host) {
                Ok(now) => now,
                Err(rule) => return Ok::<_, hyper::Error>(refuse_changed(&flow, &req, &host, rule, first_binding.as_ref().map(|b| b.name.as_str()))),
            };
            let binding = now.binding.clone().filter(|b| b.allow_plaintext);
            let credential = binding.as_ref().map(|b| b.name.as_str());
            if let Err(refusal) = check_head(&req, &host, tripped.load(Ordering::Relaxed), "Host changed on the connection") {
                return Ok::<_, hyper::Error>(refuse(&flow, &req, &host, refusal, credential));
            }
            let Admitted { mut req, fwd, mcp } = match admit(req, &now, binding.as_deref(), (&host, port), &flow, mcp_hooks).await {
                Ok(admitted) => admitted,
                Err(answer) => return Ok(answer),
            };
            let failed = |why: &str| fwd.record(502, "upstream_failed", credential.map(|c| not_injected(c, why)));
            remove_hop_by_hop(req.headers_mut());
            te_in_connection(req.headers_mut());
            *req.uri_mut() = origin_form(req.uri());
            let mut guard = sender.lock().await;
            if guard.as_ref().is_none_or(|s| s.is_closed()) {
                let mut connected = None;
                for addr in &upstream {
                    if let Ok(tcp) = crate::util::net::connect_remote(*addr).await {
                        let _ = tcp.set_nodelay(true);
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
                    let (head, body) = resp.into_parts();
                    let resp = Response::from_parts(head, read_ahead(body).await);
                    Ok(respond(resp, &fwd, binding.as_deref(), mcp.as_ref().map(|s| (s, mcp_hooks))))
                }
                Err(_) => {
                    *guard = None;
                    failed("upstream request failed");
                    Ok(text(StatusCode::BAD_GATEWAY, "upstream request failed"))
                }
            }
        };
        // Boxed, as in [`serve`].
        Box::pin(fut)
    });
    let served = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service).await;
    served.map_err(|e| {
        if e.is_parse() {
            let credential = binding.as_ref().map(|b| not_injected(&b.name, "malformed request head"));
            flow.http("", &host, "", Some(400), "malformed_request", credential);
        }
        CredentialProxyError::GuestHttp(Box::new(e))
    })
}

/// Forwards an upgrade request (after injection, if any) on a fresh
/// HTTP/1.1 upstream connection; on `101` joins the two upgraded streams,
/// the upstream's side scrubbed on its way to the guest when a credential
/// is bound. Other answers are passed back like any response.
async fn upgrade(
    mut req: Request<ProxyBody>,
    upstream: &[std::net::SocketAddr],
    h1_only: Arc<rustls::ClientConfig>,
    reached: Option<TcpStream>,
    fwd: &Arc<Forwarded>,
    binding: Option<&CredentialBinding>,
    permit: Arc<crate::util::conn_limit::ConnPermit>,
) -> Response<ProxyBody> {
    let (flow, host) = (&fwd.flow, fwd.host.as_str());
    let sandbox = &flow.sandbox;
    let credential = binding.map(|b| b.name.as_str());
    let not_sent = |why: &str| credential.map(|c| not_injected(c, why));
    let mut sender = match connect_upstream(upstream, host, h1_only, reached).await {
        Ok(Upstream::H1(s)) => s,
        Ok(Upstream::H2(_)) => return text(StatusCode::BAD_GATEWAY, "upstream chose HTTP/2 for an upgrade"),
        Err(e) => {
            tracing::info!(%sandbox, %host, "credential proxy: upstream: {e}");
            fwd.record(502, "upstream_failed", not_sent("upstream unreachable"));
            return text(StatusCode::BAD_GATEWAY, "upstream unreachable");
        }
    };
    let guest_side = hyper::upgrade::on(&mut req);
    *req.uri_mut() = origin_form(req.uri());
    *req.version_mut() = Version::HTTP_11;
    if let Ok(v) = HeaderValue::from_str(host) {
        req.headers_mut().insert(HOST, v);
    }
    // A compressed WebSocket (permessage-deflate) could not be scrubbed.
    if binding.is_some() {
        req.headers_mut().remove("sec-websocket-extensions");
    }
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(%sandbox, %host, "credential proxy: upgrade request: {e}");
            fwd.record(502, "upstream_failed", not_sent("upstream request failed"));
            return text(StatusCode::BAD_GATEWAY, "upstream request failed");
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return respond(resp, fwd, binding, None);
    }
    tracing::info!(%sandbox, %host, credential = credential.unwrap_or("-"), "proxy: upgraded");
    fwd.record(101, fwd.reason, binding.map(|b| injected(&b.name)));
    resp.extensions_mut().remove::<hyper::ext::ReasonPhrase>();
    let report = binding.map(|b| RedactionReport {
        request: fwd.clone(),
        status: 101,
        credential: b.name.clone(),
        counted: scrub_headers(resp.headers_mut(), &b.scrub),
        body: 0,
    });
    let upstream_side = hyper::upgrade::on(&mut resp);
    let scrubber = binding.map(|b| b.scrub.scrubber());
    tokio::spawn(async move {
        // The tunnel outlives the HTTP connection that made it: it holds
        // the guest's connection permit until it ends.
        let _permit = permit;
        // The whole report moves here (not just the field written below):
        // it is published when the tunnel ends.
        let mut report = report;
        if let (Ok(g), Ok(u)) = (guest_side.await, upstream_side.await) {
            let (mut guest_read, mut guest_write) = tokio::io::split(TokioIo::new(g));
            let (mut upstream_read, mut upstream_write) = tokio::io::split(TokioIo::new(u));
            let up = async move {
                let _ = tokio::io::copy(&mut guest_read, &mut upstream_write).await;
                let _ = upstream_write.shutdown().await;
            };
            let down = async move {
                match scrubber {
                    Some(scrubber) => pump_scrubbed(upstream_read, guest_write, scrubber).await,
                    None => {
                        let _ = tokio::io::copy(&mut upstream_read, &mut guest_write).await;
                        let _ = guest_write.shutdown().await;
                        0
                    }
                }
            };
            let ((), redacted) = tokio::join!(up, down);
            if let Some(report) = report.as_mut() {
                report.body = redacted;
            }
        }
    });
    resp.map(|b| b.boxed())
}

/// Copies `from` to `to` through `scrubber` until either ends; the
/// number of redactions.
async fn pump_scrubbed(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, mut scrubber: Scrubber) -> u64 {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let idle = scrubber.release_after();
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            () = tokio::time::sleep(idle.unwrap_or_default()), if idle.is_some() => {
                // The upstream went quiet with bytes held back.
                let out = scrubber.release();
                if to.write_all(&out).await.and(to.flush().await).is_err() {
                    return scrubber.redactions();
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let out = scrubber.push(&buf[..n]);
        if to.write_all(&out).await.and(to.flush().await).is_err() {
            return scrubber.redactions();
        }
    }
    let rest = scrubber.finish();
    let _ = to.write_all(&rest).await;
    let _ = to.shutdown().await;
    scrubber.redactions()
}

/// A TLS connection to the first of `addrs` that accepts, HTTP/2 or
/// HTTP/1.1 as its ALPN chose.
/// `reached`: a connection already made to one of `addrs`, tried first;
/// if the server gave up on it meanwhile, a new one is made.
async fn connect_upstream(addrs: &[std::net::SocketAddr], host: &str, tls: Arc<rustls::ClientConfig>, reached: Option<TcpStream>) -> Result<Upstream, CredentialProxyError> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| CredentialProxyError::UpstreamName(host.to_string(), e))?;
    if let Some(tcp) = reached {
        match upstream_over(tcp, name.clone(), tls.clone()).await {
            Ok(upstream) => return Ok(upstream),
            // The server gave up on it (it waited too long for a
            // handshake): a new one. Anything else (no answer, an alert,
            // a certificate refused) would be the same on a new one.
            Err(CredentialProxyError::UpstreamTls(e)) if server_hung_up(&e) => {
                tracing::debug!(%host, "credential proxy: the connection made when the guest connected was closed ({e}); connecting again");
            }
            Err(e) => return Err(e),
        }
    }
    let mut last = CredentialProxyError::NoUpstreamAddress;
    for addr in addrs {
        match crate::util::net::connect_remote(*addr).await {
            Ok(tcp) => return upstream_over(tcp, name, tls).await,
            Err(e) => last = CredentialProxyError::UpstreamConnect(e),
        }
    }
    Err(last)
}

/// Whether a TLS handshake failed because the server closed or reset the
/// connection (not because of anything it said).
fn server_hung_up(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// TLS to the upstream as `name` on `tcp`, then HTTP/2 or HTTP/1.1 as its
/// ALPN chose.
async fn upstream_over(tcp: TcpStream, name: ServerName<'static>, tls: Arc<rustls::ClientConfig>) -> Result<Upstream, CredentialProxyError> {
    // Requests of several streams at once must not wait for ACKs (Nagle).
    let _ = tcp.set_nodelay(true);
    // Bounded: a server that accepts and never answers must not hold the
    // guest's request (and the connection's lock) for ever.
    let stream = tokio::time::timeout(UPSTREAM_TLS_TIMEOUT, tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| CredentialProxyError::UpstreamTlsTimeout(UPSTREAM_TLS_TIMEOUT))?
        .map_err(CredentialProxyError::UpstreamTls)?;
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(CredentialProxyError::UpstreamHandshake)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(Upstream::H2(sender));
    }
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(CredentialProxyError::UpstreamHandshake)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(Upstream::H1(sender))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::CredentialSource;
    use crate::credentials::secrets::load_secret;

    #[test]
    fn another_http2_upstream_only_while_every_one_is_busy_and_at_most_four() {
        assert!(needs_another_h2_upstream(&[]));
        assert!(!needs_another_h2_upstream(&[0]));
        assert!(!needs_another_h2_upstream(&[1]));
        assert!(needs_another_h2_upstream(&[2]));
        assert!(!needs_another_h2_upstream(&[2, 1]));
        assert!(needs_another_h2_upstream(&[3, 2, 5]));
        assert!(!needs_another_h2_upstream(&[9, 9, 9, 9]));
    }

    /// A GET of `path` on api.test, forwarded on `flow`.
    fn forwarded(flow: FlowContext, path: &str) -> Arc<Forwarded> {
        Arc::new(Forwarded { flow, method: Method::GET, host: "api.test".into(), path: path.into(), reason: "allowed" })
    }

    fn binding() -> CredentialBinding {
        let dir = std::env::temp_dir().join(format!("sbx-cred-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, "tok123-not-a-real-secret-0042").unwrap();
        let secret = Arc::new(load_secret(&CredentialSource::File(f.display().to_string())).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        CredentialBinding::new("gh", &["API.test".into()], "Authorization", "Bearer {secret}", secret, false).unwrap()
    }

    const SECRET: &str = "tok123-not-a-real-secret-0042";

    #[test]
    fn the_secret_goes_only_into_its_own_header() {
        let b = binding();
        assert!(b.covers("api.test") && !b.covers("other.test"));
        assert!(format!("{b:?}").contains("gh") && !format!("{b:?}").contains("tok123"));
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer guest-made"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Basic second"));
        h.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        h.insert("x-api-key", HeaderValue::from_static("sbx-cred:gh"));
        h.insert("x-other", HeaderValue::from_static("sbx-cred:someone-else"));
        h.insert("origin", HeaderValue::from_static("https://SBX-CRED:gh.example"));
        h.insert("cookie", HeaderValue::from_static("a=1; t=sbx-cred%3Agh"));
        h.append("x-list", HeaderValue::from_static("keep"));
        h.append("x-list", HeaderValue::from_static("drop sbx-cred:gh"));
        h.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        h.insert("range", HeaderValue::from_static("bytes=10-20"));
        rewrite_headers(&mut h, &b);
        let auth: Vec<_> = h.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, vec![format!("Bearer {SECRET}").as_str()], "replaced, not duplicated");
        assert!(h.get(AUTHORIZATION).unwrap().is_sensitive());
        assert!(h.get(PROXY_AUTHORIZATION).is_none());
        for gone in ["x-api-key", "x-other", "origin", "cookie", "range"] {
            assert!(h.get(gone).is_none(), "{gone} carried a sentinel (or a range): removed, not replaced");
        }
        assert_eq!(h.get_all("x-list").iter().collect::<Vec<_>>(), vec!["keep"]);
        assert_eq!(h.get("accept-encoding").unwrap(), "identity");
        assert!(!h.values().any(|v| v.as_bytes().windows(6).any(|w| w == b"tok123") && v != h.get(AUTHORIZATION).unwrap()));
        let mut elsewhere = HeaderMap::new();
        elsewhere.insert("x-api-key", HeaderValue::from_static("sbx-cred:gh"));
        elsewhere.insert("accept", HeaderValue::from_static("*/*"));
        strip_sentinels(&mut elsewhere);
        assert!(elsewhere.get("x-api-key").is_none() && elsewhere.get("accept").is_some());
    }

    #[test]
    fn headers_the_guests_connection_names_go_before_the_fixed_hop_by_hop_ones() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close, X-Hop"));
        h.append("connection", HeaderValue::from_static(" te ,x-other, bad name, keep-alive, Host"));
        for name in ["x-hop", "x-other", "x-kept", "te", "keep-alive", "host"] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        remove_connection_named(&mut h);
        assert!(h.get("x-hop").is_none() && h.get("x-other").is_none(), "named (any case, any spacing, either line)");
        assert!(h.get("x-kept").is_some(), "not named");
        assert!(h.get("host").is_some(), "the proxy's to set");
        assert!(h.get("te").is_some() && h.get("keep-alive").is_some() && h.get("connection").is_some(), "left to remove_hop_by_hop");
        remove_hop_by_hop(&mut h);
        assert!(h.get("te").is_none() && h.get("keep-alive").is_none() && h.get("connection").is_none());
    }

    #[test]
    fn of_te_only_trailers_goes_upstream_and_only_when_the_guest_named_it() {
        let upstream_te = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(hyper::header::TE, HeaderValue::from_static(v));
            }
            h.insert("connection", HeaderValue::from_static("te, keep-alive"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            remove_hop_by_hop(&mut h);
            assert!(h.get("connection").is_none() && h.get("keep-alive").is_none());
            h.get_all(hyper::header::TE).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(upstream_te(&["trailers"]), ["trailers"]);
        assert_eq!(upstream_te(&["gzip;q=0.5, Trailers"]), ["trailers"], "the proxy's own value, not the guest's");
        assert_eq!(upstream_te(&["deflate", "trailers;q=1"]), ["trailers"]);
        assert!(upstream_te(&["gzip, chunked"]).is_empty());
        assert!(upstream_te(&["trailersx", "x-trailers"]).is_empty());
        assert!(upstream_te(&[]).is_empty());
    }

    #[test]
    fn sentinels_leave_paths_and_queries() {
        let stripped = |u: &str| strip_uri_sentinels(&u.parse().unwrap()).map(|u| u.to_string());
        assert_eq!(stripped("/v1/sbx-cred:gh/x?token=sbx-cred:gh&a=1").as_deref(), Some("/v1//x?token=&a=1"));
        assert_eq!(stripped("/x?t=SBX-CRED%3agh.v2").as_deref(), Some("/x?t="));
        assert_eq!(stripped("https://api.test/sbx-cred:gh").as_deref(), Some("https://api.test/"));
        assert_eq!(stripped("/plain?q=1"), None);
        assert_eq!(strip_sentinel_tokens(b"a sbx-cred:gh b"), Some(b"a  b".to_vec()));
    }

    fn req(method: &str, uri: &str, version: Version, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        let check = |r: &Request<()>, framing: bool| check_head(r, "api.test", framing, "misdirected").map_err(|e| (e.status.as_u16(), e.record));
        let h1 = Version::HTTP_11;
        assert_eq!(check(&req("GET", "/x", h1, &["api.test"]), false), Ok(()));
        assert_eq!(check(&req("GET", "/x", h1, &["API.test.:443"]), false), Ok(()));
        assert_eq!(check(&req("GET", "https://api.test/x", h1, &["api.test"]), false), Ok(()));
        assert_eq!(check(&req("GET", "/x", h1, &["api.test", "api.test"]), false), Err((400, "bad_request")));
        assert_eq!(check(&req("GET", "/x", h1, &["api.test", "other.test"]), false), Err((400, "bad_request")));
        assert_eq!(check(&req("GET", "http://other.test/x", h1, &["api.test"]), false), Err((400, "bad_request")));
        assert_eq!(check(&req("GET", "http://user@api.test/x", h1, &["api.test"]), false), Err((400, "bad_request")));
        assert_eq!(check(&req("GET", "/x", h1, &["other.test"]), false), Err((421, "misdirected")));
        assert_eq!(check(&req("GET", "/x", h1, &[]), false), Err((421, "misdirected")));
        assert_eq!(check(&req("POST", "/x", h1, &["api.test"]), true), Err((400, "bad_request")));
        let mut both = req("POST", "/x", h1, &["api.test"]);
        both.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from_static("5"));
        both.headers_mut().insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(check(&both, false), Err((400, "bad_request")));
        assert_eq!(check(&req("CONNECT", "other.test:443", h1, &["api.test"]), false), Err((405, "connect_refused")));
        // HTTP/2: :authority is the URI's; a Host beside it must agree.
        let h2 = Version::HTTP_2;
        assert_eq!(check(&req("GET", "https://api.test/x", h2, &[]), false), Ok(()));
        assert_eq!(check(&req("GET", "https://other.test/x", h2, &[]), false), Err((421, "misdirected")));
        assert_eq!(check(&req("GET", "https://api.test/x", h2, &["other.test"]), false), Err((400, "bad_request")));
        assert_eq!(check(&req("GET", "https://other.test/x", h2, &["api.test"]), false), Err((400, "bad_request")));
        assert_eq!(check(&req("CONNECT", "api.test:443", h2, &[]), false), Err((405, "connect_refused")));
    }

    #[test]
    fn framing_watch_sees_content_length_with_transfer_encoding() {
        let trips = |chunks: &[&[u8]]| {
            let mut w = FramingWatch::default();
            chunks.iter().fold(false, |_, c| w.feed(c))
        };
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".as_slice();
        assert!(trips(&[head]));
        for cut in 0..head.len() {
            assert!(trips(&[&head[..cut], &head[cut..]]), "split at {cut}");
        }
        assert!(trips(&[b"POST / HTTP/1.1\ntransfer-encoding: chunked\nCONTENT-LENGTH: 5\n\n"]));
        // One per head, on separate requests: fine.
        assert!(!trips(&[b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]));
        assert!(!trips(&[b"GET / HTTP/1.1\r\nX-Content-Length: 5\r\nContent-Transfer-Encoding: chunked\r\n\r\n"]));
    }

    #[test]
    fn compressed_responses_cannot_be_checked() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        let ok = StatusCode::OK;
        assert!(unscrubbable(&Method::GET, ok, &headers(&[])).is_none());
        assert!(unscrubbable(&Method::GET, ok, &headers(&[("content-encoding", "identity"), ("transfer-encoding", "chunked")])).is_none());
        assert!(unscrubbable(&Method::GET, ok, &headers(&[("content-encoding", "gzip")])).is_some());
        assert!(unscrubbable(&Method::GET, ok, &headers(&[("content-encoding", "identity, br")])).is_some());
        assert!(unscrubbable(&Method::GET, ok, &headers(&[("transfer-encoding", "gzip, chunked")])).is_some());
        assert!(unscrubbable(&Method::HEAD, ok, &headers(&[("content-encoding", "gzip")])).is_none());
        assert!(unscrubbable(&Method::GET, StatusCode::NOT_MODIFIED, &headers(&[("content-encoding", "gzip")])).is_none());
    }

    /// A body of the given frames.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    #[test]
    fn responses_are_scrubbed_as_they_stream_and_recorded() {
        let b = binding();
        let dir = std::env::temp_dir().join(format!("sbx-cred-scrub-{}", std::process::id()));
        let hub = Arc::new(crate::observe::hub::FlowHub::new(&crate::observe::hub::FlowLogSettings { history: 1024, audit_path: dir.join("audit.jsonl"), audit_max_bytes: 1 << 20, audit_keep: 1, audit_lines_per_second: 0, audit_burst: 0 }));
        let flow = FlowContext { hub: hub.clone(), sandbox: "s".into(), src: "10.0.0.2:1000".parse().unwrap(), dst: "198.51.100.1:443".parse().unwrap(), rule: "allow api.test".into() };
        let echo = format!("authorization: Bearer {SECRET}\nx: 1\n");
        let mut head = HeaderMap::new();
        head.insert("x-echo-authorization", HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap());
        head.insert("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(scrub_headers(&mut head, &b.scrub), 1);
        assert!(head.get("x-echo-authorization").unwrap().to_str().unwrap().starts_with("Bearer [REDACTED]"));
        // The secret straddles every frame boundary in turn.
        for cut in 1..echo.len() {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-t", HeaderValue::from_str(SECRET).unwrap());
            let frames = [Frame::data(Bytes::copy_from_slice(&echo.as_bytes()[..cut])), Frame::data(Bytes::copy_from_slice(&echo.as_bytes()[cut..])), Frame::trailers(trailers)];
            let report = RedactionReport { request: forwarded(flow.clone(), "/echo"), status: 200, credential: "gh".into(), counted: 0, body: 0 };
            let body = ScrubBody::new(Frames(frames.into()), &b.scrub, report);
            let collected = futures_lite_block_on(body.collect()).unwrap();
            let trailers = collected.trailers().cloned().unwrap();
            let bytes = collected.to_bytes();
            assert_eq!(bytes.len(), echo.len(), "split at {cut}");
            assert!(!String::from_utf8_lossy(&bytes).contains("tok") && bytes.starts_with(b"authorization: Bearer [REDACTED]"), "split at {cut}");
            assert!(trailers.get("x-t").unwrap().to_str().unwrap().starts_with("[REDACTED]"));
        }
        let (records, _) = hub.history();
        assert_eq!(records.len(), echo.len() - 1, "one record per response");
        let r = &records[0];
        assert_eq!((r.event.as_ref(), r.verdict, r.credential.as_ref().unwrap().redactions), ("secret_redacted", crate::observe::record::Verdict::Denied, 2));
        assert_eq!(hub.metrics.secret_redactions.get(), 2 * (echo.len() as u64 - 1));
        assert_eq!(hub.metrics.credentials_injected.get(), 0, "counted by the request's own record");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A body fed by the test as it goes.
    struct Channel(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

    impl Body for Channel {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    #[test]
    fn held_bytes_go_out_when_the_upstream_goes_quiet() {
        let b = binding();
        let dir = std::env::temp_dir().join(format!("sbx-cred-idle-{}", std::process::id()));
        let hub = Arc::new(crate::observe::hub::FlowHub::new(&crate::observe::hub::FlowLogSettings { history: 16, audit_path: dir.join("audit.jsonl"), audit_max_bytes: 1 << 20, audit_keep: 1, audit_lines_per_second: 0, audit_burst: 0 }));
        let flow = FlowContext { hub, sandbox: "s".into(), src: "10.0.0.2:1000".parse().unwrap(), dst: "198.51.100.1:443".parse().unwrap(), rule: "".into() };
        let report = RedactionReport { request: forwarded(flow, "/"), status: 200, credential: "gh".into(), counted: 0, body: 0 };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut body = ScrubBody::new(Channel(rx), &b.scrub, report);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            // A message ending in a byte the secret starts with: it is held,
            // then released once the upstream has been quiet a moment.
            tx.send(Frame::data(Bytes::from_static(b"typing: ab t"))).await.unwrap();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(&first[..], b"typing: ab ");
            let started = std::time::Instant::now();
            let released = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(&released[..], b"t");
            assert!(started.elapsed() >= crate::credentials::scrub::SHORT_WAIT / 2, "released after a pause, not at once");
            // A secret split across two frames sent back to back is caught.
            tx.send(Frame::data(Bytes::from(format!("\nBearer {}", &SECRET[..12])))).await.unwrap();
            tx.send(Frame::data(Bytes::from(SECRET[12..].to_string()))).await.unwrap();
            drop(tx);
            let rest = body.collect().await.unwrap().to_bytes();
            assert!(rest.starts_with(b"\nBearer [REDACTED]") && !String::from_utf8_lossy(&rest).contains("tok"), "{}", String::from_utf8_lossy(&rest));
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A body not ready for its first `pending` polls (each wakes at once),
    /// then of `frames`.
    struct Late {
        pending: u32,
        frames: Frames,
    }

    impl Body for Late {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.pending > 0 {
                self.pending -= 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Pin::new(&mut self.frames).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.pending == 0 && self.frames.0.is_empty()
        }
        fn size_hint(&self) -> SizeHint {
            let n = self.frames.0.iter().filter_map(|f| f.data_ref()).map(|d| d.len() as u64).sum();
            SizeHint::with_exact(n)
        }
    }

    #[test]
    fn frames_at_hand_are_read_ahead_and_nothing_is_lost_or_waited_for() {
        let frames = || Frames([Frame::data(Bytes::from_static(b"hello ")), Frame::data(Bytes::from_static(b"world"))].into());
        // There within the turns: held to the end, counted in the size as
        // the upstream's hint was (exact), given in order.
        let ahead = futures_lite_block_on(read_ahead(Late { pending: READ_AHEAD_TURNS, frames: frames() }));
        assert!(ahead.held.len() == 2 && ahead.ended && !ahead.is_end_stream());
        assert_eq!((ahead.size_hint().lower(), ahead.size_hint().upper()), (11, Some(11)));
        assert_eq!(&futures_lite_block_on(ahead.collect()).unwrap().to_bytes()[..], b"hello world");
        // Not there yet: not waited for, and the body reads on as before.
        let ahead = futures_lite_block_on(read_ahead(Late { pending: READ_AHEAD_TURNS + 1, frames: frames() }));
        assert!(ahead.held.is_empty() && !ahead.ended && !ahead.is_end_stream());
        assert_eq!(&futures_lite_block_on(ahead.collect()).unwrap().to_bytes()[..], b"hello world");
        // A body of unknown length stays of unknown length (the guest's
        // framing, chunked, and its trailers, are as the upstream's).
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", HeaderValue::from_static("1"));
        let chunked = futures_lite_block_on(read_ahead(Frames([Frame::data(Bytes::from_static(b"x")), Frame::trailers(trailers)].into())));
        assert_eq!((chunked.size_hint().lower(), chunked.size_hint().upper(), chunked.is_end_stream()), (1, None, false));
        let collected = futures_lite_block_on(chunked.collect()).unwrap();
        assert_eq!(collected.trailers().and_then(|t| t.get("x-t")).map(|v| v.to_str().unwrap().to_string()).as_deref(), Some("1"));
        // A long body: only its start is held.
        let long = Frames((0..READ_AHEAD_FRAMES + 5).map(|_| Frame::data(Bytes::from_static(b"y"))).collect());
        let long = futures_lite_block_on(read_ahead(long));
        assert_eq!((long.held.len(), long.ended), (READ_AHEAD_FRAMES, false));
        assert_eq!(futures_lite_block_on(long.collect()).unwrap().to_bytes().len(), READ_AHEAD_FRAMES + 5);
        // An empty body: ended.
        let empty = futures_lite_block_on(read_ahead(Frames(Default::default())));
        assert!(empty.is_end_stream() && empty.held.is_empty());
        // An error mid-body: what came before it, then the error, then the
        // end (the upstream body is not polled again).
        let failing = Failing(vec![Ok(Frame::data(Bytes::from_static(b"a"))), Err("reset"), Ok(Frame::data(Bytes::from_static(b"never")))].into());
        let mut ahead = futures_lite_block_on(read_ahead(failing));
        assert_eq!((ahead.held.len(), ahead.ended), (2, false), "read up to the error");
        futures_lite_block_on(async {
            assert_eq!(&ahead.frame().await.unwrap().unwrap().into_data().unwrap()[..], b"a");
            assert_eq!(ahead.frame().await.unwrap().unwrap_err(), "reset");
            assert!(ahead.frame().await.is_none() && ahead.is_end_stream());
        });
    }

    /// A body of the given frames and errors.
    struct Failing(std::collections::VecDeque<Result<Frame<Bytes>, &'static str>>);

    impl Body for Failing {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    /// Runs a future that never waits on I/O (in-memory bodies).
    fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn compiled(text: &str) -> CompiledPolicy {
        crate::policy::compile::compile(&crate::policy::Policy::parse("t.toml", text).unwrap(), &[]).unwrap()
    }

    #[test]
    fn targets_are_put_in_one_form() {
        let c = |m: &str, u: &str| canonical_request(&Method::from_bytes(m.as_bytes()).unwrap(), &u.parse().unwrap()).map(|c| (c.method.to_string(), c.uri.to_string(), c.path));
        let ok = |m: &str, u: &str, p: &str| Ok((m.to_string(), u.to_string(), p.to_string()));
        assert_eq!(c("dElEtE", "/repos/../admin?x=1"), ok("DELETE", "/admin?x=1", "/admin"));
        assert_eq!(c("GET", "/repos/%2e%2e/admin"), ok("GET", "/admin", "/admin"));
        assert_eq!(c("GET", "//admin"), ok("GET", "/admin", "/admin"));
        assert_eq!(c("GET", "http://api.test/a/./b"), ok("GET", "http://api.test/a/b", "/a/b"));
        assert_eq!(c("GET", "https://api.test//x?q"), ok("GET", "https://api.test/x?q", "/x"));
        assert_eq!(c("GET", "/repos/x%2f..%2f..%2fadmin").map_err(|e| e.reason()), Err(PathRefusal::EncodedSeparator.reason()));
        assert_eq!(c("GET", "/a%5cb"), Err(PathRefusal::EncodedSeparator));
        // A sentinel cannot hide a dot segment from the match: removing it
        // from `..sbx-cred:x` would leave `..` behind, resolved again.
        assert_eq!(c("GET", "/repos/..sbx-cred:x/admin"), ok("GET", "/admin", "/admin"));
        assert_eq!(c("GET", "/repos/sbx-sbx-cred:xcred:y/admin"), ok("GET", "/repos/sbx-:y/admin", "/repos/sbx-:y/admin"));
        assert_eq!(c("GET", "/x?t=sbx-cred:gh&a=1"), ok("GET", "/x?t=&a=1", "/x"));
        // Decoded unreserved characters spelling a sentinel are removed too.
        assert_eq!(c("GET", "/x/sbx%2dcred%3Agh/y"), ok("GET", "/x/y", "/x/y"));
    }

    #[test]
    fn requests_are_decided_by_the_rules_in_force() {
        let p = compiled(
            "name = \"t\"\n[network]\nallow = [\"api.test\", \"mcp.test\"]\n\
             [[http]]\nhosts = [\"api.test\"]\nallow = [\"GET /repos/**\", \"POST /repos/*/issues\"]\ndeny = [\"DELETE /**\"]\n\
             [[http]]\nhosts = [\"audit.test\"]\ndeny = [\"DELETE /**\"]\nmode = \"audit\"\n\
             [[mcp]]\nurl = \"https://mcp.test/mcp\"\ntools = [\"search\"]\n",
        );
        let d = |host: &str, port: u16, audit: Option<&str>, m: &str, u: &str| decide_request(&p, host, port, audit, &Method::from_bytes(m.as_bytes()).unwrap(), &u.parse().unwrap(), &HeaderMap::new());
        let fwd = |m: &str, u: &str, path: &str, reason: &'static str, rule: Option<&str>| Decision::Forward {
            canonical: Some((Method::from_bytes(m.as_bytes()).unwrap(), u.parse().unwrap())),
            path: path.into(),
            reason,
            rule: rule.map(str::to_string),
        };
        let refused = |status: u16, rule: &str, record: &'static str, m: &str, path: &str| Decision::Refuse {
            status: StatusCode::from_u16(status).unwrap(),
            denied: rule.into(),
            record,
            rule: rule.into(),
            method: m.into(),
            path: path.into(),
        };
        assert_eq!(d("api.test", 443, None, "GET", "/repos/a?x=1"), fwd("GET", "/repos/a?x=1", "/repos/a", "allowed", Some("http allow GET /repos/**")));
        assert_eq!(d("api.test", 443, None, "get", "/repos//a"), fwd("GET", "/repos/a", "/repos/a", "allowed", Some("http allow GET /repos/**")));
        assert_eq!(d("api.test", 443, None, "DELETE", "/repos/a"), refused(403, "http deny DELETE /**", "http_rule", "DELETE", "/repos/a"));
        assert_eq!(d("api.test", 443, None, "dElEtE", "/repos/a"), refused(403, "http deny DELETE /**", "http_rule", "DELETE", "/repos/a"));
        // Path tricks reach the rule in their resolved form.
        for trick in ["/repos/../admin", "/repos/%2e%2e/admin", "//admin", "/repos/./../admin", "http://api.test/admin"] {
            assert_eq!(d("api.test", 80, None, "GET", trick), refused(403, "http default deny (api.test)", "http_rule", "GET", "/admin"), "{trick}");
        }
        let bad = PathRefusal::EncodedSeparator.reason();
        assert_eq!(d("api.test", 443, None, "GET", "/repos/x%2f..%2f..%2fadmin"), refused(400, bad, "bad_request", "GET", "/repos/x%2f..%2f..%2fadmin"));
        // An audit-mode deny is forwarded and recorded as audit, by its rule.
        assert_eq!(d("audit.test", 443, None, "DELETE", "/x"), fwd("DELETE", "/x", "/x", "audit", Some("http deny DELETE /**")));
        assert_eq!(d("audit.test", 443, None, "GET", "/x"), fwd("GET", "/x", "/x", "allowed", None));
        // On a connection let through by an audit-mode network deny, what
        // is forwarded is audit, under that deny; an enforced rule still
        // refuses.
        assert_eq!(d("api.test", 443, Some("deny api.test"), "GET", "/repos/a"), fwd("GET", "/repos/a", "/repos/a", "audit", Some("deny api.test")));
        assert_eq!(d("api.test", 443, Some("deny api.test"), "DELETE", "/a"), refused(403, "http deny DELETE /**", "http_rule", "DELETE", "/a"));
        // An MCP server's host is governed (canonical form) on every port
        // the proxy sees, its rules are the MCP check's; another host is not.
        assert_eq!(d("mcp.test", 443, None, "post", "/mcp/../mcp"), fwd("POST", "/mcp", "/mcp", "allowed", None));
        let as_is = |path: &str, reason: &'static str, rule: Option<&str>| Decision::Forward { canonical: None, path: path.into(), reason, rule: rule.map(str::to_string) };
        assert_eq!(d("mcp.test", 80, None, "GET", "/a/../b"), fwd("GET", "/b", "/b", "allowed", None));
        assert_eq!(d("other.test", 443, None, "GET", "/a%2fb"), as_is("/a%2fb", "allowed", None));
        assert_eq!(d("other.test", 443, Some("default deny"), "GET", "/"), as_is("/", "audit", Some("default deny")));
        assert!(governed(&p, "api.test", 1) && governed(&p, "mcp.test", 443) && governed(&p, "mcp.test", 80) && !governed(&p, "other.test", 443));
        // Headers that would make the served request another than the checked one.
        let with = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let refused = |host: &str, headers: HeaderMap| matches!(decide_request(&p, host, 443, None, &Method::POST, &"/repos/x".parse().unwrap(), &headers), Decision::Refuse { status: StatusCode::BAD_REQUEST, .. });
        assert!(refused("api.test", with(&[("x-http-method-override", "DELETE")])));
        assert!(refused("api.test", with(&[("X-Method-Override", "DELETE")])));
        assert!(refused("api.test", with(&[("upgrade", "h2c")])));
        assert!(refused("api.test", with(&[("upgrade", "websocket"), ("upgrade", "h2c")])));
        assert!(!refused("api.test", with(&[("upgrade", "WebSocket")])));
        assert!(refused("mcp.test", with(&[("upgrade", "websocket")])));
        assert!(!refused("other.test", with(&[("x-http-method-override", "DELETE")])), "an ungoverned host is not read");
    }

    #[test]
    fn request_hosts() {
        let r = Request::builder().uri("/x").header(HOST, "API.test:443").body(()).unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("api.test"));
        let r = Request::builder().uri("https://api.test/x").body(()).unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("api.test"));
    }
}
