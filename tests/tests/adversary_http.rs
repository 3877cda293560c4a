//! A hostile guest against the credential and HTTP paths (issue 12): one
//! table of attacks, each a row — its name, what the guest sends, and what
//! must come of it (the statuses the guest gets, what it must and must not
//! see, the record the daemon writes, what the upstream must never see) —
//! run in a loop from inside the guest's namespace. Whatever a row expects,
//! the secret must never be in anything the guest receives: not raw, not
//! base64 (either alphabet, any alignment), percent-, JSON-, HTML- or
//! hex-encoded, not 16 bytes of it. The world's servers reflect requests
//! on purpose (`/reflect/<mode>` of tests/src/https.rs): they are the
//! debug endpoints and error pages that would hand the secret back.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::Full;
use hyper::body::Bytes;
use sbx_net::observe::record::FlowRecord;
use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::https::{self, HttpsEcho, RawH2, Received, TestCa};
use sbx_net_tests::{require_root, unique_name, wait_for, PacketCapture, WorldDns};

/// Not a real secret: characters that make every encoding of it differ
/// from the raw bytes (`/ +` for base64 and percent, `" \` for JSON,
/// `< & >` for HTML and Go's JSON).
const SECRET: &str = "sk-adv/T3st+Secr3t\"q\\Z~<&>0123456789abcdefXYZ";
/// Fragments of the secret this long must not get through.
const FRAGMENT: usize = 16;

const API: &str = "198.51.100.40";
const OTHER: &str = "198.51.100.41";
const PLAINAPI: &str = "198.51.100.42";
const API1: &str = "198.51.100.43";

fn addr_of(host: &str, port: u16) -> SocketAddr {
    let ip = match host {
        "api.test" => API,
        "other.test" => OTHER,
        "plainapi.test" => PLAINAPI,
        "api1.test" => API1,
        other => panic!("no address for {other}"),
    };
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// What the guest sends.
#[derive(Clone, Copy)]
enum Sent {
    /// Raw HTTP/1 bytes over TLS to the host (SNI = host).
    Tls(&'static str, &'static str),
    /// Raw HTTP/1 bytes over plain TCP to the host's port 80.
    Plain(&'static str, &'static str),
    /// Raw HTTP/1 over TLS, then a GET of the response's Location (the
    /// guest follows the redirect itself).
    Follow(&'static str, &'static str),
    /// One HTTP/2 request through hyper over TLS with SNI `sni`.
    H2 { sni: &'static str, method: &'static str, uri: &'static str, headers: &'static [(&'static str, &'static str)] },
    /// Raw HTTP/2: an extended CONNECT (`:protocol`), not advertised.
    H2ExtendedConnect,
    /// Raw HTTP/2: this many HEADERS each followed at once by RST_STREAM,
    /// in one burst; then a new client's request.
    H2RapidReset(u32),
}

/// What must come of it.
#[derive(Clone, Copy)]
struct Want {
    /// Statuses of the responses the guest got, in order.
    statuses: &'static [u16],
    /// In the last response's X-Sbx-Net-Denied.
    denied: Option<&'static str>,
    /// In what the guest received (heads, bodies, trailers together).
    has: &'static [&'static str],
    lacks: &'static [&'static str],
    /// The echo reported the secret arriving exactly once, in Authorization.
    injected_once: bool,
    /// A record of this (event, reason) follows.
    record: Option<(&'static str, &'static str)>,
    /// A `secret_redacted` record follows.
    redacted: bool,
    /// No world server ever received a request for a target starting so.
    upstream_never: &'static [&'static str],
}

const W: Want = Want { statuses: &[], denied: None, has: &[], lacks: &[], injected_once: false, record: None, redacted: false, upstream_never: &[] };
const ALLOWED: Option<(&str, &str)> = Some(("http_request", "allowed"));
const BAD: Option<(&str, &str)> = Some(("http_request", "bad_request"));
const CLEAN: &[&str] = &["sbx-cred", "guest-made"];
const RULE: Option<(&str, &str)> = Some(("http_request", "http_rule"));
/// What no upstream may receive from the path rows, in any spelling.
const ADMIN: &[&str] = &["GET /admin", "GET //admin", "GET /repos/", "GET http", "GET https", "GET /%61dmin"];

struct Row {
    name: &'static str,
    group: &'static str,
    sent: Sent,
    want: Want,
}

fn rows() -> Vec<Row> {
    let row = |group, name, sent, want| Row { name, group, sent, want };
    vec![
        // --- Where the secret goes: only into the credential's header.
        row("sentinels", "sentinel in Origin", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nOrigin: https://sbx-cred:gh.evil\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, lacks: &["origin:", "sbx-cred"], record: ALLOWED, ..W }),
        row("sentinels", "sentinel in Cookie", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nCookie: a=1; tok=sbx-cred:gh\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, lacks: &["cookie:", "sbx-cred"], record: ALLOWED, ..W }),
        row("sentinels", "sentinel in a custom header", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nX-Api-Key: sbx-cred:gh\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, lacks: &["x-api-key:", "sbx-cred"], record: ALLOWED, ..W }),
        row("sentinels", "another credential's sentinel", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nX-Legacy: SBX-CRED:legacy\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, lacks: &["x-legacy:", "sbx-cred", "SBX-CRED"], record: ALLOWED, ..W }),
        row("sentinels", "sentinel in the path", Sent::Tls("api.test", "GET /inspect/sbx-cred:gh/x HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, has: &["path: /inspect//x"], lacks: CLEAN, record: ALLOWED, ..W }),
        row("sentinels", "sentinel in the query", Sent::Tls("api.test", "GET /inspect?token=sbx-cred:gh&a=1 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, has: &["query: token=&a=1"], lacks: CLEAN, record: ALLOWED, ..W }),
        row("sentinels", "percent-encoded sentinel in the query", Sent::Tls("api.test", "GET /inspect?token=sbx-cred%3Agh HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, has: &["query: token="], lacks: &["sbx-cred", "%3A"], record: ALLOWED, ..W }),
        row("sentinels", "sentinel in request trailers", Sent::Tls("api.test", "POST /inspect HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\nTrailer: x-tok, x-ok\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-tok: sbx-cred:gh\r\nx-ok: 1\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, has: &["trailer x-ok: 1"], lacks: &["trailer x-tok", "sbx-cred"], record: ALLOWED, ..W }),
        row("sentinels", "the guest's own Authorization", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer guest-made\r\nProxy-Authorization: Basic x\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, lacks: &["guest-made", "proxy-authorization"], record: ALLOWED, ..W }),
        row("sentinels", "sentinel in the credential's own header", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nAuthorization: sbx-cred:gh\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, lacks: CLEAN, record: ALLOWED, ..W }),
        row("sentinels", "plaintext to the credential host (no allow_plaintext)", Sent::Plain("api.test", "GET /plain HTTP/1.1\r\nHost: api.test\r\nAuthorization: sbx-cred:gh\r\nX-Api-Key: sbx-cred:gh\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["path: /plain"], lacks: &["<injected>", "sbx-cred", "authorization"], record: ALLOWED, ..W }),
        row("sentinels", "non-credential host over TLS (spliced)", Sent::Tls("other.test", "GET /inspect HTTP/1.1\r\nHost: other.test\r\nAuthorization: sbx-cred:gh\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["authorization: sbx-cred:gh"], lacks: &["<injected>"], record: Some(("connection", "allowed")), ..W }),
        row("sentinels", "non-credential host over plain HTTP", Sent::Plain("other.test", "GET /inspect HTTP/1.1\r\nHost: other.test\r\nAuthorization: sbx-cred:gh\r\nCookie: t=sbx-cred:gh\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], lacks: &["<injected>", "sbx-cred"], record: ALLOWED, ..W }),
        row("sentinels", "redirect to another host, followed", Sent::Follow("api.test", "GET /reflect/redirect HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[302, 200], has: &["location: https://other.test/reflect/body", "host: other.test"], lacks: &["authorization"], record: ALLOWED, ..W }),
        // --- Headers the guest's Connection names are hop-by-hop (RFC 9110
        // §7.6.1): they stop at the proxy, and naming the credential's own
        // header strips only the guest's, never the injected one.
        row("hop-by-hop", "Connection names the credential's header", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer guest-made\r\nConnection: close, Authorization\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, lacks: &["guest-made"], record: ALLOWED, ..W }),
        row("hop-by-hop", "Connection names other headers (HTTP/2 upstream)", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nX-Hop: a\r\nX-Hop2: b\r\nX-Kept: c\r\nConnection: close, x-hop\r\nConnection: X-Hop2\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, has: &["x-kept: c"], lacks: &["x-hop:", "x-hop2:"], record: ALLOWED, ..W }),
        row("hop-by-hop", "Connection names other headers (HTTP/1.1 upstream)", Sent::Tls("api1.test", "GET /inspect HTTP/1.1\r\nHost: api1.test\r\nX-Hop: a\r\nX-Hop2: b\r\nX-Kept: c\r\nConnection: close, x-hop\r\nConnection: X-Hop2\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, has: &["x-kept: c"], lacks: &["x-hop:", "x-hop2:"], record: ALLOWED, ..W }),
        // --- What comes back: reflections of the injected request.
        row("reflections", "in response headers (HTTP/2 upstream)", Sent::Tls("api.test", "GET /reflect/header HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["x-echo-authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "in response headers (HTTP/1.1 upstream)", Sent::Tls("api1.test", "GET /reflect/header HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["x-echo-authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "in the body", Sent::Tls("api.test", "GET /reflect/body HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "in 7-byte chunks (HTTP/1.1 chunked upstream)", Sent::Tls("api1.test", "GET /reflect/chunked HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "in 7-byte DATA frames (HTTP/2 upstream)", Sent::Tls("api.test", "GET /reflect/chunked HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "base64, alignment 0", Sent::Tls("api.test", "GET /reflect/base64/0 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["[REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "base64, alignment 1", Sent::Tls("api.test", "GET /reflect/base64/1 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["[REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "base64, alignment 2", Sent::Tls("api.test", "GET /reflect/base64/2 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["[REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "base64url unpadded", Sent::Tls("api.test", "GET /reflect/base64url/1 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["[REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "percent-encoded", Sent::Tls("api.test", "GET /reflect/percent HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["[REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "JSON-escaped", Sent::Tls("api.test", "GET /reflect/json HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["\"authorization\":\"Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "HTML error page", Sent::Tls("api.test", "GET /reflect/html HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], has: &["authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "truncated to 24 bytes", Sent::Tls("api.test", "GET /reflect/truncated HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "gzip although identity was asked", Sent::Tls("api.test", "GET /reflect/gzip HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[502], denied: Some("compressed"), lacks: &["\u{1f}\u{8b}"], record: Some(("http_request", "compressed_response")), ..W }),
        row("reflections", "gzip asked for by the guest", Sent::Tls("api.test", "GET /reflect/negotiate HTTP/1.1\r\nHost: api.test\r\nAccept-Encoding: gzip, br\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["accept-encoding: identity", "[REDACTED]"], lacks: &["content-encoding"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "a byte range cutting the reflection", Sent::Tls("api.test", "GET /reflect/range HTTP/1.1\r\nHost: api.test\r\nRange: bytes=40-60\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["x-saw-range: no", "[REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "in response trailers", Sent::Tls("api.test", "GET /reflect/trailer HTTP/1.1\r\nHost: api.test\r\nTE: trailers\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["x-echo-authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "in the HTTP/1 reason phrase", Sent::Tls("api1.test", "GET /reflect/reason HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["HTTP/1.1 200 OK"], record: ALLOWED, ..W }),
        row("reflections", "guest over HTTP/2, headers", Sent::H2 { sni: "api.test", method: "GET", uri: "https://api.test/reflect/header", headers: &[] },
            Want { statuses: &[200], has: &["x-echo-authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "guest over HTTP/2, body", Sent::H2 { sni: "api.test", method: "GET", uri: "https://api.test/reflect/chunked", headers: &[] },
            Want { statuses: &[200], has: &["authorization: Bearer [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        row("reflections", "into an upgraded stream", Sent::Tls("api.test", "GET /reflect/upgrade HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"),
            Want { statuses: &[101], has: &["you sent: Bearer [REDACTED]"], record: Some(("http_request", "allowed")), redacted: true, ..W }),
        row("reflections", "plaintext credential (allow_plaintext)", Sent::Plain("plainapi.test", "GET /reflect/body HTTP/1.1\r\nHost: plainapi.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], has: &["x-api-key: [REDACTED]"], record: ALLOWED, redacted: true, ..W }),
        // --- Ambiguous heads and other ways around the checks.
        row("heads", "Host differs from SNI", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[421], denied: Some("Host must equal the TLS server name"), lacks: &["<injected>"], record: Some(("http_request", "misdirected")), ..W }),
        row("heads", "h2 :authority differs from SNI", Sent::H2 { sni: "api.test", method: "GET", uri: "https://other.test/inspect", headers: &[] },
            Want { statuses: &[421], denied: Some("TLS server name"), lacks: &["<injected>"], record: Some(("http_request", "misdirected")), ..W }),
        row("heads", "h2 Host differs from :authority", Sent::H2 { sni: "api.test", method: "GET", uri: "https://api.test/inspect", headers: &[("host", "other.test")] },
            Want { statuses: &[400], denied: Some("another host than Host"), lacks: &["<injected>"], record: BAD, ..W }),
        row("heads", "two Host headers, the same", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], denied: Some("more than one Host"), lacks: &["<injected>"], record: BAD, ..W }),
        row("heads", "two Host headers, another host second", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nHost: other.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], denied: Some("more than one Host"), lacks: &["<injected>"], record: BAD, ..W }),
        row("heads", "obs-folded header", Sent::Tls("api.test", "GET /folded HTTP/1.1\r\nHost: api.test\r\nX-Folded: a\r\n sbx-cred:gh\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], lacks: &["<injected>"], record: Some(("http_request", "malformed_request")), upstream_never: &["GET /folded"], ..W }),
        row("heads", "Content-Length with Transfer-Encoding (TLS)", Sent::Tls("api.test", "POST /cl-te HTTP/1.1\r\nHost: api.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            Want { statuses: &[400], denied: Some("both Content-Length and Transfer-Encoding"), record: BAD, upstream_never: &["POST /cl-te", "GET /smuggled"], ..W }),
        row("heads", "Transfer-Encoding with Content-Length (plain)", Sent::Plain("api.test", "POST /te-cl HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            Want { statuses: &[400], denied: Some("both Content-Length and Transfer-Encoding"), record: BAD, upstream_never: &["POST /te-cl", "GET /smuggled"], ..W }),
        row("heads", "pipelined request for another host (TLS)", Sent::Tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\n\r\nGET /second HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200, 421], has: &["authorization: <injected>"], record: Some(("http_request", "misdirected")), upstream_never: &["GET /second"], ..W }),
        row("heads", "pipelined request for another host (plain)", Sent::Plain("api.test", "GET /first HTTP/1.1\r\nHost: api.test\r\n\r\nGET /second HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200, 421], denied: Some("Host changed"), record: Some(("http_request", "misdirected")), upstream_never: &["GET /second"], ..W }),
        row("heads", "absolute-form naming another authority", Sent::Tls("api.test", "GET https://other.test/absolute HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], denied: Some("another host than Host"), lacks: &["<injected>"], record: BAD, upstream_never: &["GET /absolute", "GET https://other.test/absolute"], ..W }),
        row("heads", "CONNECT (HTTP/1.1 over TLS)", Sent::Tls("api.test", "CONNECT other.test:443 HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            Want { statuses: &[405], denied: Some("CONNECT"), record: Some(("http_request", "connect_refused")), upstream_never: &["CONNECT"], ..W }),
        // Over plain HTTP the proxy's first look already sees a tunnel to
        // another host than Host: ambiguous, 400, before any forwarding.
        row("heads", "CONNECT to another host (plain HTTP)", Sent::Plain("api.test", "CONNECT other.test:80 HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            Want { statuses: &[400], denied: Some("ambiguous request"), record: Some(("connection", "ambiguous_request")), upstream_never: &["CONNECT"], ..W }),
        row("heads", "CONNECT to the Host itself (plain HTTP)", Sent::Plain("api.test", "CONNECT api.test:80 HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            Want { statuses: &[405], denied: Some("CONNECT"), record: Some(("http_request", "connect_refused")), upstream_never: &["CONNECT"], ..W }),
        row("heads", "CONNECT (HTTP/2)", Sent::H2 { sni: "api.test", method: "CONNECT", uri: "other.test:443", headers: &[] },
            Want { statuses: &[405], denied: Some("CONNECT"), record: Some(("http_request", "connect_refused")), upstream_never: &["CONNECT"], ..W }),
        row("heads", "extended CONNECT (HTTP/2 :protocol)", Sent::H2ExtendedConnect, Want { upstream_never: &["CONNECT", "GET /reflect/ext"], ..W }),
        row("heads", "HTTP/2 rapid reset, then a new client", Sent::H2RapidReset(300),
            Want { statuses: &[200], has: &["authorization: <injected>"], record: ALLOWED, ..W }),
        // --- Around the `[[http]]` rules (api1.test denies /admin and
        // DELETE): every request is matched, and forwarded, in one
        // normal form; the upstream never sees another.
        row("paths", "dot segments", Sent::Tls("api1.test", "GET /repos/../admin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin"), lacks: &["<injected>"], record: RULE, upstream_never: ADMIN, ..W }),
        row("paths", "percent-encoded dot segments", Sent::Tls("api1.test", "GET /repos/%2e%2E/admin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin"), lacks: &["<injected>"], record: RULE, upstream_never: ADMIN, ..W }),
        row("paths", "double slash", Sent::Tls("api1.test", "GET //admin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin"), lacks: &["<injected>"], record: RULE, upstream_never: ADMIN, ..W }),
        row("paths", "percent-encoded unreserved characters", Sent::Tls("api1.test", "GET /%61dmin/x HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin/**"), lacks: &["<injected>"], record: RULE, upstream_never: ADMIN, ..W }),
        row("paths", "encoded slashes", Sent::Tls("api1.test", "GET /repos/x%2f..%2f..%2fadmin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], denied: Some("encoded '/'"), lacks: &["<injected>"], record: BAD, upstream_never: ADMIN, ..W }),
        row("paths", "encoded backslashes", Sent::Tls("api1.test", "GET /repos/x%5c..%5cadmin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], denied: Some("encoded '/'"), lacks: &["<injected>"], record: BAD, upstream_never: ADMIN, ..W }),
        row("paths", "dot segment with parameters", Sent::Tls("api1.test", "GET /repos/..;/admin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], denied: Some("dot segment"), lacks: &["<injected>"], record: BAD, upstream_never: ADMIN, ..W }),
        row("paths", "a sentinel hiding a dot segment", Sent::Tls("api1.test", "GET /repos/..sbx-cred:gh/admin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin"), lacks: CLEAN, record: RULE, upstream_never: ADMIN, ..W }),
        row("paths", "mixed-case method", Sent::Tls("api1.test", "dElEtE /repos/x HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny DELETE /**"), lacks: &["<injected>"], record: RULE, upstream_never: &["DELETE", "dElEtE"], ..W }),
        row("paths", "refused, then the same connection carries on", Sent::Tls("api1.test", "DELETE /repos/x HTTP/1.1\r\nHost: api1.test\r\n\r\nGET /inspect HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403, 200], has: &["authorization: <injected>", "path: /inspect"], record: RULE, upstream_never: &["DELETE"], ..W }),
        row("paths", "absolute-form request line (plain HTTP)", Sent::Plain("api1.test", "GET http://api1.test/repos/../admin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin"), record: RULE, upstream_never: ADMIN, ..W }),
        row("paths", "absolute-form request line (TLS)", Sent::Tls("api1.test", "GET https://api1.test//admin HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin"), lacks: &["<injected>"], record: RULE, upstream_never: ADMIN, ..W }),
        row("paths", "HTTP/2 :path with dot segments", Sent::H2 { sni: "api1.test", method: "GET", uri: "https://api1.test/repos/%2e%2e/admin", headers: &[] },
            Want { statuses: &[403], denied: Some("http deny * /admin"), lacks: &["<injected>"], record: RULE, upstream_never: ADMIN, ..W }),
        row("paths", "HTTP/2 mixed-case method", Sent::H2 { sni: "api1.test", method: "delete", uri: "https://api1.test/repos/x", headers: &[] },
            Want { statuses: &[403], denied: Some("http deny DELETE /**"), lacks: &["<injected>"], record: RULE, upstream_never: &["DELETE", "delete"], ..W }),
        row("paths", "h2c upgrade (HTTP/2 past every later check)", Sent::Tls("api1.test", "GET /inspect HTTP/1.1\r\nHost: api1.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
            Want { statuses: &[400], denied: Some("upgrade to anything but websocket"), lacks: &["<injected>"], record: BAD, upstream_never: &["h2c"], ..W }),
        row("paths", "method-override header", Sent::Tls("api1.test", "POST /repos/x HTTP/1.1\r\nHost: api1.test\r\nX-HTTP-Method-Override: DELETE\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[400], denied: Some("method-override header"), lacks: &["<injected>"], record: BAD, upstream_never: &["x-http-method-override", "X-HTTP-Method-Override"], ..W }),
        row("paths", "case-folded path (IIS reads /ADMIN as /admin)", Sent::Tls("api1.test", "GET /ADMIN HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin"), lacks: &["<injected>"], record: RULE, upstream_never: &["/ADMIN"], ..W }),
        row("paths", "segment parameters (Tomcat drops ;x)", Sent::Tls("api1.test", "GET /admin;x=1/k HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[403], denied: Some("http deny * /admin/**"), lacks: &["<injected>"], record: RULE, upstream_never: &["/admin;x=1"], ..W }),
        row("paths", "normalised, then forwarded in that form", Sent::Tls("api1.test", "GET /inspect/./a//b/../c?q=1 HTTP/1.1\r\nHost: api1.test\r\nConnection: close\r\n\r\n"),
            Want { statuses: &[200], injected_once: true, has: &["path: /inspect/a/c", "query: q=1"], record: ALLOWED, upstream_never: &["GET /inspect/./", "GET /inspect/a//"], ..W }),
    ]
}

/// Everything the guest got from one row.
struct Got {
    responses: Vec<Received>,
    /// Every byte received (TLS decrypted), for the leak check.
    raw: Vec<u8>,
    note: String,
}

fn h2_received((parts, body, trailers): (hyper::http::response::Parts, Bytes, Option<hyper::HeaderMap>)) -> Received {
    let lines = |h: &hyper::HeaderMap| h.iter().map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()))).collect::<String>();
    Received { status: parts.status.as_u16(), head: format!("HTTP/2 {}\n{}", parts.status.as_u16(), lines(&parts.headers)), body: body.to_vec(), trailers: trailers.as_ref().map(lines).unwrap_or_default() }
}

fn send(sent: Sent, h1: &Arc<rustls::ClientConfig>, h2: &Arc<rustls::ClientConfig>) -> Got {
    let quiet = Duration::from_secs(3);
    let tls = |host: &str, raw: &str| https::exchange(addr_of(host, 443), Some(host), h1.clone(), raw.as_bytes(), quiet);
    let got = |raw: Vec<u8>| Got { responses: https::parse_responses(&raw), raw, note: String::new() };
    match sent {
        Sent::Tls(host, raw) => got(tls(host, raw)),
        Sent::Plain(host, raw) => got(https::exchange(addr_of(host, 80), None, h1.clone(), raw.as_bytes(), quiet)),
        Sent::Follow(host, raw) => {
            let mut all = tls(host, raw);
            let location = https::parse_responses(&all).first().and_then(|r| r.header("location").map(str::to_string)).expect("a Location to follow");
            let rest = location.strip_prefix("https://").expect("an https Location");
            let (next, path) = rest.split_once('/').map(|(h, p)| (h.to_string(), format!("/{p}"))).unwrap();
            all.extend(tls(&next, &format!("GET {path} HTTP/1.1\r\nHost: {next}\r\nConnection: close\r\n\r\n")));
            got(all)
        }
        Sent::H2 { sni, method, uri, headers } => {
            let mut b = hyper::Request::builder().method(method).uri(uri);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            match https::h2_request(addr_of(sni, 443), sni, h2.clone(), b.body(Full::new(Bytes::new())).unwrap()) {
                Ok(r) => {
                    let r = h2_received(r);
                    let raw = [r.head.as_bytes(), &r.body, r.trailers.as_bytes()].concat();
                    Got { responses: vec![r], raw, note: String::new() }
                }
                Err(e) => Got { responses: Vec::new(), raw: Vec::new(), note: format!("no response: {e}") },
            }
        }
        Sent::H2ExtendedConnect => {
            let mut c = RawH2::connect(addr_of("api.test", 443), "api.test", h2.clone());
            let fields = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"), (":path", "/reflect/ext"), (":authority", "api.test")];
            c.send(&RawH2::headers(1, &fields, false));
            let frames = c.read_until(|f| f.2 == 1 && (f.0 == https::H2_RST_STREAM || f.0 == https::H2_HEADERS) || f.0 == https::H2_GOAWAY);
            let kinds: Vec<(u8, u32)> = frames.iter().map(|f| (f.0, f.2)).collect();
            // A response would be HEADERS on stream 1; `:status 200` is
            // HPACK static index 8 (0x88).
            let answered_ok = frames.iter().any(|f| f.0 == https::H2_HEADERS && f.2 == 1 && f.3.first() == Some(&0x88));
            let refused = frames.iter().any(|f| (f.0 == https::H2_RST_STREAM && f.2 == 1) || f.0 == https::H2_GOAWAY);
            assert!(refused && !answered_ok, "extended CONNECT: the stream must be refused, frames (type, stream): {kinds:?}");
            let raw = frames.iter().flat_map(|f| f.3.clone()).collect();
            Got { responses: Vec::new(), raw, note: format!("refused by the HTTP/2 layer: frames (type, stream) {kinds:?}") }
        }
        Sent::H2RapidReset(n) => {
            let mut c = RawH2::connect(addr_of("api.test", 443), "api.test", h2.clone());
            let mut burst = Vec::new();
            for i in 0..n {
                let stream = 2 * i + 1;
                let fields = [(":method", "GET"), (":scheme", "https"), (":path", "/reflect/count"), (":authority", "api.test")];
                burst.extend(RawH2::headers(stream, &fields, true));
                burst.extend(RawH2::rst_stream(stream, 8));
            }
            let sent_all = c.send(&burst);
            let frames = c.read_until(|f| f.0 == https::H2_GOAWAY);
            let goaway = frames.iter().find(|f| f.0 == https::H2_GOAWAY).map(|f| u32::from_be_bytes([f.3[4], f.3[5], f.3[6], f.3[7]]));
            drop(c);
            // The next client is served as usual.
            let next = tls("api.test", "GET /inspect HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");
            let mut g = got(next);
            g.note = format!("burst written: {sent_all}; GOAWAY error code: {goaway:?}; {} frames back", frames.len());
            g
        }
    }
}

/// The first decoding of `data` in which a FRAGMENT-byte piece of the
/// secret shows, if any.
fn leak(data: &[u8]) -> Option<String> {
    let windows: Vec<&[u8]> = SECRET.as_bytes().windows(FRAGMENT).collect();
    let has = |d: &[u8]| windows.iter().any(|w| d.windows(w.len()).any(|x| x == *w));
    let mut decodings: Vec<(&str, Vec<u8>)> = vec![("raw", data.to_vec())];
    // Percent and JSON/HTML escapes, undone leniently.
    let mut pct = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'%' && i + 2 < data.len() {
            if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&data[i + 1..i + 3]), 16) {
                pct.push(b);
                i += 3;
                continue;
            }
        }
        pct.push(data[i]);
        i += 1;
    }
    decodings.push(("percent", pct));
    let text = String::from_utf8_lossy(data).into_owned();
    let json = text.replace("\\\"", "\"").replace("\\/", "/").replace("\\u003c", "<").replace("\\u003e", ">").replace("\\u0026", "&").replace("\\\\", "\\");
    decodings.push(("json", json.into_bytes()));
    let html = text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'").replace("&#x27;", "'").replace("&amp;", "&");
    decodings.push(("html", html.into_bytes()));
    // base64 runs (either alphabet), at each of the four character offsets.
    let is_b64 = |b: &u8| b.is_ascii_alphanumeric() || b"+/-_".contains(b);
    for run in data.split(|b| !is_b64(b)).filter(|r| r.len() >= 8) {
        let std: Vec<u8> = run.iter().map(|b| match b {
            b'-' => b'+',
            b'_' => b'/',
            b => *b,
        }).collect();
        for offset in 0..4 {
            let piece = &std[offset.min(std.len())..];
            let piece = &piece[..piece.len() / 4 * 4];
            if let Ok(d) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(piece) {
                decodings.push(("base64", d));
            }
        }
    }
    // hex runs.
    for run in data.split(|b| !b.is_ascii_hexdigit()).filter(|r| r.len() >= 2 * FRAGMENT) {
        for offset in 0..2 {
            let d: Vec<u8> = run[offset..].chunks_exact(2).filter_map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok()).collect();
            decodings.push(("hex", d));
        }
    }
    decodings.into_iter().find(|(_, d)| has(d)).map(|(how, _)| how.to_string())
}

/// `inspect -o json` of the sandbox: its records.
fn records(h: &DaemonHarness, sandbox: &str) -> Vec<FlowRecord> {
    h.cli_ok(&["inspect", "-o", "json", "--sandbox", sandbox]).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("inspect printed a non-record ({e}): {l}"))).collect()
}

fn check(row: &Row, got: &Got, seen: &[String]) {
    let name = row.name;
    let want = &row.want;
    let statuses: Vec<u16> = got.responses.iter().map(|r| r.status).collect();
    let all: String = got.responses.iter().map(|r| format!("{}\n\n{}\n{}", r.head, String::from_utf8_lossy(&r.body), r.trailers)).collect();
    let context = format!("[{}] {name}: statuses {statuses:?} {}\n{all}", row.group, got.note);
    if let Some(how) = leak(&got.raw).or_else(|| got.responses.iter().find_map(|r| leak(&r.body).or_else(|| leak(r.head.as_bytes())).or_else(|| leak(r.trailers.as_bytes())))) {
        panic!("{context}\nTHE SECRET REACHED THE GUEST ({how})");
    }
    assert_eq!(statuses, want.statuses, "{context}");
    if let Some(denied) = want.denied {
        let header = got.responses.last().and_then(|r| r.header("x-sbx-net-denied")).unwrap_or_default();
        assert!(header.contains(denied), "{context}\nX-Sbx-Net-Denied {header:?} should name {denied:?}");
    }
    for s in want.has {
        assert!(all.contains(s), "{context}\nmissing {s:?}");
    }
    for s in want.lacks {
        assert!(!all.contains(s), "{context}\nmust not contain {s:?}");
    }
    if want.injected_once {
        assert_eq!(all.matches("<injected>").count(), 1, "{context}\nthe secret must arrive once");
        assert!(all.contains("authorization: <injected>"), "{context}\nthe secret must arrive in Authorization");
    }
    for never in want.upstream_never {
        assert!(!seen.iter().any(|s| s.starts_with(never)), "{context}\nan upstream received {never:?}: {seen:?}");
    }
}

#[test]
fn a_hostile_guest_gets_neither_the_secret_nor_around_the_checks() {
    require_root();
    let dir = std::env::temp_dir().join(unique_name("advhttp"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new(&dir);
    let secret_file = dir.join("token");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let policy = format!(
        "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\", \"api1.test\", \"other.test\", \"plainapi.test\"]\n\
         [[credentials]]\nname = \"gh\"\nhosts = [\"api.test\", \"api1.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{0}\" }}\n\
         [[credentials]]\nname = \"legacy\"\nhosts = [\"plainapi.test\"]\nheader = \"X-Api-Key\"\nformat = \"{{secret}}\"\nsource = {{ file = \"{0}\" }}\nallow_plaintext = true\n\
         [[http]]\nhosts = [\"api1.test\"]\ndeny = [\"* /admin\", \"* /admin/**\", \"DELETE /**\"]\n",
        secret_file.display()
    );
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
    let config = format!("proxy_first_bytes_timeout_ms = {}\n", FIRST_BYTES.as_millis());
    let h = DaemonHarness::with_args("advhttp", &[("agent.toml", policy.as_str())], Some(&config), &[upstream.as_str(), upstream_ca.as_str()]);
    for a in [API, OTHER, PLAINAPI, API1] {
        h.topology.add_world_address(a.parse::<IpAddr>().unwrap());
    }
    let _dns = WorldDns::start(
        &h.topology.world,
        &[format!("api.test,{API},60"), format!("other.test,{OTHER},60"), format!("plainapi.test,{PLAINAPI},60"), format!("api1.test,{API1},60")],
        &[],
    );
    let world = &h.topology.world;
    let servers = [
        HttpsEcho::start(world, addr_of("api.test", 443), &["api.test"], &ca, SECRET),
        HttpsEcho::start_plain(world, addr_of("api.test", 80), &ca, SECRET),
        HttpsEcho::start_h1_only(world, addr_of("api1.test", 443), &["api1.test"], &ca, SECRET),
        HttpsEcho::start(world, addr_of("other.test", 443), &["other.test"], &ca, SECRET),
        HttpsEcho::start_plain(world, addr_of("other.test", 80), &ca, SECRET),
        HttpsEcho::start_plain(world, addr_of("plainapi.test", 80), &ca, SECRET),
        HttpsEcho::start_plain(world, addr_of("api1.test", 80), &ca, SECRET),
    ];
    let sandbox = unique_name("g");
    let g = h.create_guest(&sandbox, "agent");
    let guest = sbx_vmm::NetNs::open(g["netns"].as_str().unwrap()).unwrap();
    let sandbox_ca = std::path::PathBuf::from(g["ca_cert"].as_str().unwrap());
    let trusted: [&Path; 2] = [&sandbox_ca, &ca.pem_path];
    let h1 = https::client_config_with(&trusted, &[b"http/1.1"]);
    let h2 = https::client_config_with(&trusted, &[b"h2"]);
    let capture = PacketCapture::start(h.topology.host.name(), g["tap"].as_str().unwrap(), &dir.join("tap.pcap"));

    let table = rows();
    assert!(table.len() >= 30, "at least 30 attacks");
    let mut summary = Vec::new();
    let mut failures = Vec::new();
    let mut redactions = 0;
    for row in &table {
        let before = records(&h, &sandbox).last().map_or(0, |r| r.seq);
        let seen_before: Vec<usize> = servers.iter().map(|s| s.seen().len()).collect();
        let (h1, h2) = (h1.clone(), h2.clone());
        let sent = row.sent;
        // Every row runs, and every failing row is named at the end.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let got = guest.run(move || send(sent, &h1, &h2)).unwrap_or_else(|e| panic!("[{}] {}: the guest's client failed: {e:?}", row.group, row.name));
            // What the world's servers received during this row.
            let seen: Vec<String> = servers.iter().zip(&seen_before).flat_map(|(s, n)| s.seen().split_off(*n)).collect();
            check(row, &got, &seen);
            // What the daemon records.
            let mut noted = Vec::new();
            let mut redacted = 0;
            if let Some((event, reason)) = row.want.record {
                let r = wait_for(Duration::from_secs(5), &format!("[{}] {}: a {event} record with reason {reason}", row.group, row.name), || {
                    records(&h, &sandbox).into_iter().find(|r| r.seq > before && r.event == event && r.reason == reason)
                });
                let refused = !matches!(reason, "allowed" | "upstream_failed");
                assert_eq!(r.verdict == sbx_net::observe::record::Verdict::Denied, refused, "[{}] {}: {r:?}", row.group, row.name);
                noted.push(format!("{event}/{reason} ({:?})", r.verdict));
            }
            if row.want.redacted {
                let r = wait_for(Duration::from_secs(5), &format!("[{}] {}: a secret_redacted record", row.group, row.name), || {
                    records(&h, &sandbox).into_iter().find(|r| r.seq > before && r.event == "secret_redacted")
                });
                redacted = r.credential.as_ref().map_or(0, |c| c.redactions);
                assert!(redacted >= 1 && r.verdict == sbx_net::observe::record::Verdict::Denied, "[{}] {}: {r:?}", row.group, row.name);
                noted.push(format!("secret_redacted x{redacted}"));
            }
            (format!("{:<12} {:<55} {:<12} {} {}", row.group, row.name, format!("{:?}", row.want.statuses), noted.join(", "), got.note), redacted)
        }));
        match outcome {
            Ok((line, n)) => {
                summary.push(line);
                redactions += n;
            }
            Err(_) => failures.push(format!("[{}] {}", row.group, row.name)),
        }
    }
    // A hostile or merely slow upstream streams its answer (server-sent
    // events 100 ms apart): the proxy reads ahead only what is at hand, so
    // each event reaches the guest as it comes, never held for the rest.
    let h1_stream = h1.clone();
    let arrivals = guest.run(move || sse_arrivals(addr_of("api.test", 443), "api.test", h1_stream, 5)).unwrap();
    let spread = arrivals.last().unwrap().duration_since(arrivals[0]);
    assert!(spread >= Duration::from_millis(300), "5 events paced 100 ms apart reached the guest within {spread:?} of each other: held back");
    eprintln!("streamed answer: 5 events over {spread:?} at the guest");
    // A guest that sends its ClientHello to a credential host and then
    // nothing: the proxy ends the handshake at the first-bytes deadline
    // instead of holding the connection (and one of the sandbox's
    // connection slots) for good.
    let h1_stall = h1.clone();
    let closed_after = guest.run(move || stalled_handshake(h1_stall)).unwrap();
    match closed_after {
        Ok(after) => assert!(after >= FIRST_BYTES / 2, "closed after {after:?}, before the deadline ({FIRST_BYTES:?}): refused, not timed out"),
        Err(e) => panic!("a stalled TLS handshake: {e}"),
    }
    eprintln!("stalled TLS handshake: closed by the proxy after {closed_after:?}");
    eprintln!("{}", summary.join("\n"));
    assert!(failures.is_empty(), "{} of {} attacks got through or went otherwise than expected (see above):\n{}", failures.len(), table.len(), failures.join("\n"));
    // The rapid reset did not reach the upstream once per stream.
    let counted = servers[0].seen().iter().filter(|s| s.starts_with("GET /reflect/count")).count();
    assert!(counted < 300, "rapid reset: {counted} of 300 reset streams reached the upstream");
    eprintln!("rapid reset: {counted} of 300 reset streams reached the upstream");
    let mut groups = std::collections::BTreeMap::new();
    for row in &table {
        *groups.entry(row.group).or_insert(0) += 1;
    }
    eprintln!("{} attacks: {groups:?}", table.len());

    // The metric counts what the records say (and maybe more: a redaction
    // in a row that did not ask for the record).
    let metrics = h.metrics();
    let exported: u64 = metrics.lines().find_map(|l| l.strip_prefix("sbx_net_secret_redactions_total ")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no sbx_net_secret_redactions_total in:\n{metrics}"));
    assert!(exported >= redactions && redactions > 0, "metric {exported}, records {redactions}");
    // Nothing on the tap, in the daemon's log or its audit log holds it.
    let captured = capture.finish();
    assert!(!captured.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "the secret crossed the tap");
    assert!(!h.log().contains(SECRET), "secret in the daemon log");
    let audit = std::fs::read_to_string(h.state_dir.join("audit.log")).unwrap_or_default();
    assert!(audit.contains("secret_redacted") && !audit.contains(SECRET), "the audit log keeps redactions, never the secret");
    drop(servers);
    drop(h);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The first-bytes deadline this test's daemon runs with.
const FIRST_BYTES: Duration = Duration::from_secs(4);

/// Sends a ClientHello for api.test, reads what the proxy answers and never
/// answers it: how long until the proxy closed the connection (an error if
/// it was still open well past the deadline).
fn stalled_handshake(config: Arc<rustls::ClientConfig>) -> Result<Duration, String> {
    use std::io::Read;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr_of("api.test", 443), Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("api.test").expect("a server name");
    let mut client = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    // Only the ClientHello: nothing the proxy sends back is ever answered.
    client.write_tls(&mut tcp).map_err(|e| format!("sending the ClientHello: {e}"))?;
    let sent = std::time::Instant::now();
    let give_up = sent + FIRST_BYTES * 3;
    let mut buf = [0u8; 16384];
    loop {
        let left = give_up.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("still open {:?} after the ClientHello (deadline {FIRST_BYTES:?})", sent.elapsed()));
        }
        tcp.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match tcp.read(&mut buf) {
            Ok(0) => return Ok(sent.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(sent.elapsed()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
}

/// When each of `events` server-sent events (`/reflect/sse/N`) reached a
/// guest reading the answer as it comes, over HTTP/1.1.
fn sse_arrivals(addr: SocketAddr, sni: &str, config: Arc<rustls::ClientConfig>, events: usize) -> Vec<std::time::Instant> {
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let server = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = rustls::StreamOwned::new(rustls::ClientConnection::new(config, server).unwrap(), tcp);
    tls.write_all(format!("GET /reflect/sse/{events} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let (mut seen, mut arrivals, mut buf) = (Vec::new(), Vec::new(), [0u8; 4096]);
    while arrivals.len() < events {
        let n = tls.read(&mut buf).unwrap_or(0);
        assert!(n > 0, "the stream ended after {} of {events} events: {}", arrivals.len(), String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        while arrivals.len() < events && text.contains(&format!("data: event {}", arrivals.len())) {
            arrivals.push(std::time::Instant::now());
        }
    }
    arrivals
}
