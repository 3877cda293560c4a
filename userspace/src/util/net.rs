//! Socket and address helpers shared by the DNS proxy and the HTTP(S)
//! proxy: the listeners they bind, the addresses they compare, the
//! connections they make on a guest's behalf.

use std::os::fd::AsRawFd;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

/// An IPv4-mapped IPv6 address as the IPv4 address it is (dual-stack
/// sockets report v4 peers that way).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The wildcard addresses of both families for `port`. The daemon's
/// redirect targets bind one socket per family: SO_ORIGINAL_DST and the
/// sandbox lookup work per family, and a v6 socket must not take v4.
pub fn wildcard_addrs(port: u16) -> [SocketAddr; 2] {
    [SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))]
}

/// A non-blocking socket bound to `addr` (IPv6 only for a v6 address),
/// listening when it is a stream socket.
pub fn bound_socket(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
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

/// Asks for a receive queue of `bytes` on `socket`, past the host's
/// `net.core.rmem_max` when the process may (SO_RCVBUFFORCE needs
/// CAP_NET_ADMIN; the daemon has it), else as much as rmem_max allows. The
/// host's sysctl is left as it is: only this socket's queue grows.
pub fn enlarge_receive_queue(socket: &impl std::os::fd::AsFd, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a socket this borrow keeps open, with a c_int
    // option value and its exact length.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced == 0 {
        return Ok(());
    }
    socket2::SockRef::from(socket).set_recv_buffer_size(bytes)
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
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

pub fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(addr.ip()), addr.port())
}

/// The destination the guest dialled, before nftables' redirect
/// (SO_ORIGINAL_DST, per the listening socket's family).
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv4() { socket.original_dst_v4()? } else { socket.original_dst_v6()? };
    addr.as_socket().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "SO_ORIGINAL_DST is not an IP address"))
}

/// Whether the peer of a connected socket hung up (poll(2) without waiting).
pub fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one pollfd we own, for an fd the caller keeps open; no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
