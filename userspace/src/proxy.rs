//! The transparent TCP proxy that nftables redirects the guests' proxied
//! ports (80, 443 by default) to. It finds the sandbox by source address
//! (anti-spoof in eBPF makes that safe), the original destination with
//! SO_ORIGINAL_DST, applies the sandbox's compiled policy to it, and splices.
//! The credential proxy (SNI/Host checks, TLS termination, injection) grows
//! from here.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sbx_net_common::action;
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
    pub policy: Arc<CompiledPolicy>,
    /// The trie key prefix of the policy generation in force.
    pub policy_id: u32,
}

/// Guest address → its sandbox, kept current by the daemon.
pub type Routes = Arc<RwLock<HashMap<IpAddr, Arc<Route>>>>;

/// The proxy's decision for one connection (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Connect { sandbox: String, rule: String },
    Refuse { sandbox: Option<String>, rule: String },
}

pub fn decide(routes: &HashMap<IpAddr, Arc<Route>>, peer: IpAddr, original_dst: SocketAddr) -> Decision {
    let peer = canonical(peer);
    let Some(route) = routes.get(&peer) else {
        return Decision::Refuse { sandbox: None, rule: format!("{peer} is no sandbox's address") };
    };
    let v = route.policy.lookup(canonical(original_dst.ip()), PortInfo::Port(original_dst.port()));
    let rule = route.policy.describe_rule(v.rule_id);
    if v.action == action::ALLOW {
        Decision::Connect { sandbox: route.sandbox.clone(), rule }
    } else {
        Decision::Refuse { sandbox: Some(route.sandbox.clone()), rule }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
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

/// Accepts forever on `listener`.
pub async fn serve(listener: std::net::TcpListener, routes: Routes) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("proxy listener: {e}");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let routes = routes.clone();
        tokio::spawn(async move { handle(stream, peer, routes).await });
    }
}

async fn handle(guest: TcpStream, peer: SocketAddr, routes: Routes) {
    let original = match original_dst(&guest) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(%peer, "no original destination (not redirected?): {e}");
            return;
        }
    };
    let decision = {
        let routes = routes.read().unwrap_or_else(|p| p.into_inner());
        decide(&routes, peer.ip(), original)
    };
    match decision {
        Decision::Refuse { sandbox, rule } => {
            tracing::info!(sandbox = sandbox.as_deref().unwrap_or("-"), %peer, dst = %original, %rule, "proxy: denied");
            reset(&guest);
        }
        Decision::Connect { sandbox, rule } => {
            let upstream = match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(canonical_addr(original))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%sandbox, dst = %original, "proxy: upstream connect failed: {e}");
                    reset(&guest);
                    return;
                }
                Err(_) => {
                    tracing::info!(%sandbox, dst = %original, "proxy: upstream connect timed out");
                    reset(&guest);
                    return;
                }
            };
            tracing::debug!(%sandbox, dst = %original, %rule, "proxy: spliced");
            let (mut g, mut u) = (guest, upstream);
            let _ = tokio::io::copy_bidirectional(&mut g, &mut u).await;
        }
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
    fn decides_by_source_sandbox_and_destination() {
        let policy = Policy::parse("t.toml", "name = \"t\"\n[network]\nallow = [\"198.51.100.0/24\"]\ndeny = [\"198.51.100.16/28\"]\n").unwrap();
        let route = Arc::new(Route { sandbox: "a".into(), policy: Arc::new(compile(&policy, &[]).unwrap()), policy_id: 1 });
        let mut routes = HashMap::new();
        routes.insert(IpAddr::from([10, 200, 0, 6]), route);
        let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            decide(&routes, IpAddr::from([10, 200, 0, 6]), dst("198.51.100.5:443")),
            Decision::Connect { sandbox: "a".into(), rule: "allow 198.51.100.0/24".into() }
        );
        // v4-mapped peers (a dual-stack socket) are the same guest.
        assert!(matches!(decide(&routes, "::ffff:10.200.0.6".parse().unwrap(), dst("198.51.100.5:80")), Decision::Connect { .. }));
        assert_eq!(
            decide(&routes, IpAddr::from([10, 200, 0, 6]), dst("198.51.100.20:443")),
            Decision::Refuse { sandbox: Some("a".into()), rule: "deny 198.51.100.16/28".into() }
        );
        assert!(matches!(decide(&routes, IpAddr::from([10, 200, 0, 10]), dst("198.51.100.5:443")), Decision::Refuse { sandbox: None, .. }));
    }
}
