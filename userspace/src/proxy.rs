//! The transparent TCP proxy that nftables redirects the guests' proxied
//! ports (80, 443 by default) to. It finds the sandbox by source address
//! (anti-spoof in eBPF makes that safe), the original destination with
//! SO_ORIGINAL_DST, applies the sandbox's compiled policy to it, and splices.
//! The credential proxy (SNI/Host checks, TLS termination, injection) grows
//! from here.

use crate::flow::Verdict;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sbx_net_common::action;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::compile::{CompiledPolicy, PortInfo};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding the proxy on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// What the proxy knows about one guest address.
#[derive(Debug)]
pub struct Route {
    pub sandbox: String,
    /// The sandbox id (datapath events carry it).
    pub id: u32,
    pub policy: Arc<CompiledPolicy>,
    /// The trie key prefix of the policy generation in force.
    pub policy_id: u32,
    /// Credentials of the sandbox's policy whose secrets are loaded.
    pub credentials: Vec<Arc<crate::credential_proxy::CredentialBinding>>,
    /// The sandbox's CA (for terminating TLS to credential hosts).
    pub ca: Option<Arc<std::sync::Mutex<crate::ca::SandboxCa>>>,
}

/// Guest address → its sandbox, kept current by the daemon.
pub type Routes = Arc<RwLock<HashMap<IpAddr, Arc<Route>>>>;

/// An IPv4-mapped IPv6 address as the IPv4 address it is (dual-stack
/// sockets report v4 peers that way).
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The wildcard addresses of both families for `port`. The daemon's
/// redirect targets bind one socket per family: SO_ORIGINAL_DST and the
/// sandbox lookup work per family, and a v6 socket must not take v4.
pub(crate) fn wildcard_addrs(port: u16) -> [SocketAddr; 2] {
    [SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))]
}

/// A non-blocking socket bound to `addr` (IPv6 only for a v6 address),
/// listening when it is a stream socket.
pub(crate) fn bound_socket(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if ty == socket2::Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())?;
    if ty == socket2::Type::STREAM {
        socket.listen(1024)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds the IPv4 and IPv6 listeners.
pub fn bind(port: u16) -> Result<Vec<std::net::TcpListener>, ProxyError> {
    wildcard_addrs(port)
        .into_iter()
        .map(|addr| bound_socket(addr, socket2::Type::STREAM).map(Into::into).map_err(|source| ProxyError::Bind { addr, source }))
        .collect()
}

/// What bounds one sandbox's use of the proxy.
#[derive(Clone, Debug)]
pub struct ProxyLimits {
    pub connections: Arc<crate::conn_limit::ConnLimits>,
    /// The whole first-bytes read (not each byte) must finish in this time.
    pub first_bytes_timeout: Duration,
}

impl ProxyLimits {
    pub fn from_config(config: &crate::config::DaemonConfig) -> ProxyLimits {
        ProxyLimits {
            connections: crate::conn_limit::ConnLimits::new(config.proxy_connections_per_sandbox),
            first_bytes_timeout: Duration::from_millis(config.proxy_first_bytes_timeout_ms),
        }
    }
}

/// Accepts forever on `listener`.
pub async fn serve(listener: std::net::TcpListener, ctx: Arc<crate::dns_proxy::DnsContext>, limits: ProxyLimits) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("proxy listener: {e}");
            return;
        }
    };
    crate::conn_limit::accept_loop(listener, "proxy", move |stream, peer| handle(stream, peer, ctx.clone(), limits.clone())).await
}

/// What the proxy does with one connection (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Connect here: the guest's destination, checked for the name it asked
    /// for (an address the DNS proxy gave it for that name) or allowed by
    /// the IP rules when it named none.
    Connect { addr: SocketAddr, rule: String },
    /// Resolve the name ourselves and connect to an address we checked: the
    /// guest's destination was not one we answered for that name.
    Resolve { name: String, port: u16, rule: String },
    Deny { rule: String },
}

/// Decides by the name the guest sent (SNI or Host), deny winning, else by
/// the original destination's IP rules. `learned_for` lists the addresses
/// the DNS proxy answered this sandbox for a name.
///
/// A connection that names nothing (no SNI, an IP-literal SNI, ECH, HTTP
/// without Host, another protocol) is decided by the policy's own address
/// rules only, never by an address learned from DNS: that address was
/// opened for one name, and on a shared server (a CDN) it carries any other.
pub fn plan(policy: &CompiledPolicy, name: Option<&str>, original: SocketAddr, learned_for: impl Fn(&str) -> Vec<IpAddr>) -> Plan {
    let original = canonical_addr(original);
    let name = name.filter(|n| n.parse::<IpAddr>().is_err());
    let Some(name) = name else {
        let v = policy.lookup(original.ip(), PortInfo::Port(original.port()));
        let rule = policy.describe_rule(v.rule_id);
        return if v.action == action::ALLOW {
            Plan::Connect { addr: original, rule }
        } else {
            Plan::Deny { rule }
        };
    };
    if name.is_empty() || !crate::dns::is_plain_name(name) {
        // Escapes, spaces, `*`, raw UTF-8: a resolver or a server could
        // read such a name as another one; no rule names it.
        return Plan::Deny { rule: "malformed name".into() };
    }
    match crate::dns::name_verdict(policy, name) {
        crate::dns::NameVerdict::Denied { rule_id } => Plan::Deny { rule: policy.describe_rule(rule_id) },
        crate::dns::NameVerdict::Allowed { rule_id, port } => {
            let rule = policy.describe_rule(rule_id);
            if let Some(p) = port.filter(|p| *p != original.port()) {
                return Plan::Deny { rule: format!("{rule} (port {p} only)") };
            }
            if learned_for(name).contains(&original.ip()) {
                Plan::Connect { addr: original, rule }
            } else {
                Plan::Resolve { name: name.to_string(), port: original.port(), rule }
            }
        }
    }
}

async fn handle(mut guest: TcpStream, peer: SocketAddr, ctx: Arc<crate::dns_proxy::DnsContext>, limits: ProxyLimits) {
    let original = match original_dst(&guest) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(%peer, "no original destination (not redirected?): {e}");
            return;
        }
    };
    let route = ctx.routes.read().unwrap_or_else(|p| p.into_inner()).get(&canonical(peer.ip())).cloned();
    let Some(route) = route else {
        tracing::info!(%peer, dst = %original, "proxy: not a sandbox address; refused");
        reset(&guest);
        return;
    };
    let mut flow = crate::flow_log::FlowContext {
        hub: ctx.flows.clone(),
        sandbox: route.sandbox.clone(),
        src: peer,
        dst: original,
        rule: String::new(),
    };
    // Held until the connection ends, whichever path it takes.
    let Some(permit) = limits.connections.try_acquire(&route.sandbox) else {
        tracing::debug!(sandbox = %route.sandbox, dst = %original, "proxy: connection cap reached");
        flow.connection(Verdict::Denied, "connection_limit", Some(format!("at most {} proxied connections per sandbox", limits.connections.cap())), None);
        reset(&guest);
        return;
    };
    // Read the first bytes: the TLS ClientHello's SNI or the HTTP Host, all
    // of them within one deadline (a byte at a time does not extend it).
    let mut peeker = crate::peek::Peeker::default();
    let deadline = tokio::time::Instant::now() + limits.first_bytes_timeout;
    let kind = loop {
        let mut buf = [0u8; 4096];
        let room = crate::peek::PEEK_LIMIT.saturating_sub(peeker.bytes().len()).clamp(1, buf.len());
        let k = match tokio::time::timeout_at(deadline, guest.read(&mut buf[..room])).await {
            Ok(Ok(n)) if n > 0 => peeker.push(&buf[..n]),
            // Silent, slow or closed: decide without a name.
            _ => break crate::peek::FirstBytes::Other,
        };
        if k != crate::peek::FirstBytes::NeedMore {
            break k;
        }
    };
    let first = peeker.into_bytes();
    if let crate::peek::FirstBytes::AmbiguousHttp { reason } = kind {
        tracing::info!(sandbox = %route.sandbox, dst = %original, reason, "proxy: ambiguous request head");
        flow.connection(Verdict::Denied, "ambiguous_request", Some(reason.to_string()), None);
        let _ = guest.write_all(http_error(400, "Bad Request", &format!("ambiguous request ({reason})")).as_bytes()).await;
        let _ = guest.shutdown().await;
        return;
    }
    let name = match &kind {
        crate::peek::FirstBytes::Tls { sni } => sni.clone(),
        crate::peek::FirstBytes::Http { host } => host.clone(),
        _ => None,
    };
    let for_name: Vec<IpAddr> = match &name {
        Some(n) => {
            let guard = ctx.state.lock().await;
            let now = crate::dns_proxy::boot_time_ns();
            match guard.1.by_sandbox.get(&route.sandbox) {
                Some(t) => t.iter().filter(|(_, l)| l.names.contains(n) && l.value.learned_until_ns > now).map(|(ip, _)| *ip).collect(),
                None => Vec::new(),
            }
        }
        None => Vec::new(),
    };
    let decided = plan(&route.policy, name.as_deref(), original, |_| for_name.clone());
    let (targets, rule) = match decided {
        Plan::Deny { rule } => {
            tracing::info!(sandbox = %route.sandbox, name = name.as_deref().unwrap_or("-"), dst = %original, %rule, "proxy: denied");
            flow.connection(Verdict::Denied, "policy", Some(rule.clone()), name.as_deref());
            refuse(&mut guest, &kind, &rule).await;
            return;
        }
        Plan::Connect { addr, rule } => (vec![addr], rule),
        Plan::Resolve { name, port, rule } => match resolve(&ctx, &route.policy, &name).await {
            Some(addrs) if !addrs.is_empty() => (addrs.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(), rule),
            _ => {
                tracing::info!(sandbox = %route.sandbox, %name, "proxy: name does not resolve to an allowed address");
                let why = format!("{name} has no allowed address");
                flow.connection(Verdict::Denied, "no_allowed_address", Some(why.clone()), Some(&name));
                refuse(&mut guest, &kind, &why).await;
                return;
            }
        },
    };
    flow.rule = rule.clone();
    let mut upstream = None;
    for addr in &targets {
        if let Ok(s) = connect_remote(*addr).await {
            upstream = Some((s, *addr));
            break;
        }
    }
    let Some((mut upstream, addr)) = upstream else {
        tracing::info!(sandbox = %route.sandbox, dst = %original, "proxy: upstream connect failed");
        flow.connection(Verdict::Allowed, "upstream_failed", Some(rule.clone()), name.as_deref());
        reset(&guest);
        return;
    };
    flow.dst = addr;
    // A credential host over TLS: terminate and inject instead of splicing.
    if let (crate::peek::FirstBytes::Tls { sni: Some(host) }, Some(ca)) = (&kind, &route.ca) {
        if let Some(binding) = route.credentials.iter().find(|b| b.covers(host)) {
            drop(upstream);
            let guest = crate::credential_proxy::Prefixed::new(first, guest);
            if let Err(e) = crate::credential_proxy::serve(
                guest,
                host.clone(),
                targets.clone(),
                binding.clone(),
                ca.clone(),
                ctx.upstream_tls.clone(),
                flow,
                Arc::new(permit),
            )
            .await
            {
                tracing::info!(sandbox = %route.sandbox, %host, "credential proxy: {e}");
            }
            return;
        }
    }
    // Plain HTTP by name goes through the HTTP forwarder: injected only for
    // a credential that allows plaintext; elsewhere sentinels are stripped.
    if let crate::peek::FirstBytes::Http { host: Some(host) } = &kind {
        if host.parse::<IpAddr>().is_err() {
            let binding = route.credentials.iter().find(|b| b.covers(host) && b.allow_plaintext).cloned();
            drop(upstream);
            let guest = crate::credential_proxy::Prefixed::new(first, guest);
            if let Err(e) = crate::credential_proxy::serve_plain(guest, host.clone(), targets.clone(), binding, flow).await {
                tracing::info!(sandbox = %route.sandbox, %host, "HTTP proxy: {e}");
            }
            return;
        }
    }
    tracing::debug!(sandbox = %route.sandbox, name = name.as_deref().unwrap_or("-"), %addr, %rule, "proxy: spliced");
    flow.connection(Verdict::Allowed, "allowed", Some(rule.clone()), name.as_deref());
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
}

/// A's then AAAA's of `name` from the upstream resolver, keeping only
/// addresses the sandbox's policy does not deny (the rebinding rule).
async fn resolve(ctx: &crate::dns_proxy::DnsContext, policy: &CompiledPolicy, name: &str) -> Option<Vec<IpAddr>> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let upstream = ctx.settings.upstream?;
    let mut out = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        let mut q = Message::new();
        q.set_id(0).set_recursion_desired(true);
        q.add_query(Query::query(Name::from_ascii(name).ok()?, rtype));
        let bytes = q.to_vec().ok()?;
        let Ok(answer) = ctx.upstream.forward(upstream, &bytes, ctx.settings.upstream_timeout).await else { continue };
        let Ok(message) = Message::from_vec(&answer) else { continue };
        let records: Vec<crate::dns::AnswerRecord> = message.answers().iter().map(crate::dns_proxy::answer_record).collect();
        out.extend(crate::dns::plan_answer(policy, name, &records).learn.into_iter().map(|(ip, _)| ip));
    }
    Some(out)
}

/// Refuses in the protocol the guest spoke: HTTP 403 with the reason, a TLS
/// `access_denied` alert, or a reset.
async fn refuse(guest: &mut TcpStream, kind: &crate::peek::FirstBytes, reason: &str) {
    match kind {
        crate::peek::FirstBytes::Http { .. } => {
            let _ = guest.write_all(http_error(403, "Forbidden", &guest_facing_rule(reason)).as_bytes()).await;
            let _ = guest.shutdown().await;
        }
        crate::peek::FirstBytes::Tls { .. } => {
            // TLS alert record: fatal (2), access_denied (49).
            let _ = guest.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49]).await;
            let _ = guest.shutdown().await;
        }
        _ => reset(guest),
    }
}

/// A complete HTTP/1.1 error response that closes the connection, the
/// rule or reason in `X-Sbx-Net-Denied` (printable ASCII only) and in the body.
fn http_error(status: u16, text: &str, reason: &str) -> String {
    let header_reason: String = reason.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').collect();
    let body = format!("sbx-net: denied by {reason}\n");
    format!(
        "HTTP/1.1 {status} {text}\r\nX-Sbx-Net-Denied: {header_reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The rule as the guest may see it: the host's own addresses are the
/// operator's business (they stay in logs and `inspect`), not the guest's.
pub fn guest_facing_rule(rule: &str) -> String {
    match rule.strip_suffix(" (host address)") {
        Some(with_addr) => match with_addr.rsplit_once(' ') {
            Some((head, _addr)) => format!("{head} (host address)"),
            None => rule.to_string(),
        },
        None => rule.to_string(),
    }
}

/// Connects to `addr` for a guest (10 s at most), refusing a connection
/// that ends on this host: an address may have become the host's since the
/// sandbox's policy was compiled, and a guest is never handed a host service.
pub async fn connect_remote(addr: SocketAddr) -> std::io::Result<TcpStream> {
    if is_local_address(addr.ip()) {
        tracing::warn!(%addr, "proxy: destination is this host; refused");
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("{addr} is this host")));
    }
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    if is_local_connection(&stream) {
        tracing::warn!(%addr, "proxy: destination is this host; refused");
        reset(&stream);
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("{addr} is this host")));
    }
    Ok(stream)
}

/// Whether `ip` is one of this host's addresses, asked of the routing table
/// without sending a packet: a UDP socket "connected" to a local address
/// gets that address as its source.
pub fn is_local_address(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let probe = || -> std::io::Result<bool> {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(if ip.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() }, 0))?;
        socket.connect(SocketAddr::new(ip, 9))?;
        Ok(socket.local_addr()?.ip() == ip)
    };
    // No route, or a broadcast address: not ours (and the connect fails).
    probe().unwrap_or(false)
}

/// Whether a connection ended on this host: the kernel picks a local
/// destination itself as the source address.
pub fn is_local_connection(stream: &TcpStream) -> bool {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => canonical(local.ip()) == canonical(peer.ip()) || peer.ip().is_loopback(),
        _ => true,
    }
}

/// Closes with a RST when dropped: the guest sees a refused connection.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(addr.ip()), addr.port())
}

const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the guest dialled, before nftables' redirect.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    if stream.local_addr()?.is_ipv4() {
        // SAFETY: sockaddr_in is plain data; getsockopt writes at most `len`
        // bytes into it and we pass its exact size.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: fd is a live socket owned by `stream`; addr/len as above.
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
    } else {
        // SAFETY: as above, for sockaddr_in6.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: fd is a live socket owned by `stream`; addr/len as above.
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST, (&mut addr as *mut libc::sockaddr_in6).cast(), &mut len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::policy::Policy;

    #[test]
    fn plans_by_name_then_by_address() {
        let policy = Policy::parse(
            "t.toml",
            "name = \"t\"\n[network]\nallow = [\"198.51.100.0/24\", \"api.test\", \"git.test:22\"]\ndeny = [\"198.51.100.16/28\", \"bad.test\"]\n",
        )
        .unwrap();
        let p = compile(&policy, &[]).unwrap();
        let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
        let none = |_: &str| Vec::new();
        // No name: the IP rules (and learned entries) decide.
        assert_eq!(plan(&p, None, dst("198.51.100.5:80"), none), Plan::Connect { addr: dst("198.51.100.5:80"), rule: "allow 198.51.100.0/24".into() });
        assert_eq!(plan(&p, None, dst("198.51.100.20:80"), none), Plan::Deny { rule: "deny 198.51.100.16/28".into() });
        // No name, and an address learned from DNS for some name: refused
        // (the learned address is not consulted at all).
        let learned_any = |_: &str| vec!["203.0.113.9".parse().unwrap()];
        assert_eq!(plan(&p, None, dst("203.0.113.9:443"), learned_any), Plan::Deny { rule: "default deny".into() });
        assert!(matches!(plan(&p, Some("203.0.113.9"), dst("203.0.113.9:443"), none), Plan::Deny { .. }));
        // A name: deny wins; an allowed name goes where the DNS proxy sent
        // the guest, or is resolved by the proxy itself.
        assert_eq!(plan(&p, Some("bad.test"), dst("198.51.100.5:80"), none), Plan::Deny { rule: "deny bad.test".into() });
        assert_eq!(plan(&p, Some("unlisted.test"), dst("198.51.100.5:80"), none), Plan::Deny { rule: "default deny".into() });
        let learned = |n: &str| if n == "api.test" { vec!["203.0.113.9".parse().unwrap()] } else { Vec::new() };
        assert_eq!(plan(&p, Some("api.test"), dst("203.0.113.9:443"), learned), Plan::Connect { addr: dst("203.0.113.9:443"), rule: "allow api.test".into() });
        assert_eq!(
            plan(&p, Some("api.test"), dst("198.51.100.20:443"), learned),
            Plan::Resolve { name: "api.test".into(), port: 443, rule: "allow api.test".into() }
        );
        assert!(matches!(plan(&p, Some("git.test"), dst("203.0.113.9:443"), none), Plan::Deny { .. }));
        // A name no rule can stand for is refused even under default allow.
        let open = compile(&Policy::parse("o.toml", "name = \"o\"\n[network]\ndefault = \"allow\"\n").unwrap(), &[]).unwrap();
        for odd in ["x\\.api.test", "a b.test", "*.test", "caf\u{e9}.test"] {
            assert_eq!(plan(&open, Some(odd), dst("203.0.113.9:443"), learned), Plan::Deny { rule: "malformed name".into() }, "{odd}");
        }
        // v4-mapped destinations are the same address.
        assert!(matches!(plan(&p, None, dst("[::ffff:198.51.100.5]:80"), none), Plan::Connect { .. }));
        assert_eq!(guest_facing_rule("builtin deny 10.250.0.1/32 (host address)"), "builtin deny (host address)");
        assert_eq!(guest_facing_rule("builtin deny fd00::1/128 (host address)"), "builtin deny (host address)");
        assert_eq!(guest_facing_rule("deny 10.0.0.0/8"), "deny 10.0.0.0/8");
    }
}
