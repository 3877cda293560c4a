//! Datagrams in batches: up to [`BATCH`] received with one `recvmmsg(2)`
//! and sent with one `sendmmsg(2)`. The DNS proxy's one UDP socket per
//! family serves every sandbox; under load its queue holds many queries,
//! and a system call per query and per answer was a visible share of the
//! serving thread's time (`bench dns`).

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Datagrams per system call: about the queries a busy queue holds between
/// two reads, and the answers of one read.
pub const BATCH: usize = 32;

/// The largest datagram read whole: a query over EDNS0's common 4096-byte
/// payload is cut there, as it was read one at a time (and fails to parse).
pub const DATAGRAM_BYTES: usize = 4096;

/// The buffers of one `recvmmsg(2)`: [`BATCH`] datagrams' bytes and their
/// senders. Reused for every read; nothing is allocated per datagram.
pub struct ReceivedBatch {
    bytes: Box<[u8]>,
    lengths: [usize; BATCH],
    senders: [Option<SocketAddr>; BATCH],
    count: usize,
}

impl Default for ReceivedBatch {
    fn default() -> Self {
        ReceivedBatch { bytes: vec![0u8; BATCH * DATAGRAM_BYTES].into_boxed_slice(), lengths: [0; BATCH], senders: [None; BATCH], count: 0 }
    }
}

impl ReceivedBatch {
    /// Reads what the socket has queued, up to [`BATCH`] datagrams, without
    /// waiting: `WouldBlock` when nothing is queued (the caller waits for
    /// readiness, e.g. through tokio's `async_io`). Returns the count read.
    pub fn receive(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        // SAFETY: sockaddr_storage is plain data for which all zeroes is a
        // valid (AF_UNSPEC) value.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        let bytes = self.bytes.as_mut_ptr();
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            // SAFETY: i < BATCH, so the offset stays inside the
            // BATCH * DATAGRAM_BYTES allocation.
            iov_base: unsafe { bytes.add(i * DATAGRAM_BYTES) }.cast(),
            iov_len: DATAGRAM_BYTES,
        });
        // SAFETY: mmsghdr is plain data (pointers, lengths, flags) for which
        // all zeroes is valid; the fields that matter are set below.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for ((header, name), iovec) in headers.iter_mut().zip(names.iter_mut()).zip(iovecs.iter_mut()) {
            header.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a name buffer and one iovec of
        // this frame, and each iovec at its own DATAGRAM_BYTES of
        // `self.bytes`; all outlive the call, which writes only within the
        // lengths given. MSG_DONTWAIT: the socket is never waited on here.
        let read = unsafe { libc::recvmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
        if read < 0 {
            self.count = 0;
            return Err(io::Error::last_os_error());
        }
        self.count = read as usize;
        for i in 0..self.count {
            self.lengths[i] = (headers[i].msg_len as usize).min(DATAGRAM_BYTES);
            self.senders[i] = socket_addr(&names[i], headers[i].msg_hdr.msg_namelen);
        }
        Ok(self.count)
    }

    /// The datagrams of the last read, with their senders. A datagram
    /// whose sender's address family is not IP (none on an IP socket) is
    /// left out.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> + '_ {
        (0..self.count).filter_map(|i| {
            let sender = self.senders[i]?;
            Some((&self.bytes[i * DATAGRAM_BYTES..i * DATAGRAM_BYTES + self.lengths[i]], sender))
        })
    }
}

/// Sends `datagrams` (at most [`BATCH`] are tried) with one `sendmmsg(2)`
/// without waiting; returns how many the kernel took, from the front. A
/// datagram the kernel refuses outright (e.g. no route to its peer) counts
/// as taken, as a failed `send_to` of a reply is dropped: only `WouldBlock`
/// before the first one is an error, and the caller sends the rest later.
pub fn send_batch(socket: BorrowedFd<'_>, datagrams: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    send_batch_with(datagrams, |chunk| send_some(socket, chunk))
}

/// [`send_batch`]'s bookkeeping over `send_some` (one `sendmmsg`: how many
/// of a chunk went, or the first one's error).
fn send_batch_with(datagrams: &[(Vec<u8>, SocketAddr)], mut send_some: impl FnMut(&[(Vec<u8>, SocketAddr)]) -> io::Result<usize>) -> io::Result<usize> {
    let mut sent = 0;
    while sent < datagrams.len() {
        match send_some(&datagrams[sent..datagrams.len().min(sent + BATCH)]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                return if sent == 0 { Err(e) } else { Ok(sent) };
            }
            // The first datagram left failed on its own (its peer's
            // address): it is dropped and the rest go on.
            Err(_) => sent += 1,
        }
    }
    Ok(sent)
}

fn send_some(socket: BorrowedFd<'_>, datagrams: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    debug_assert!(datagrams.len() <= BATCH);
    let names: Vec<socket2::SockAddr> = datagrams.iter().map(|(_, to)| socket2::SockAddr::from(*to)).collect();
    let mut iovecs: Vec<libc::iovec> = datagrams.iter().map(|(bytes, _)| libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() }).collect();
    // SAFETY: mmsghdr is plain data for which all zeroes is valid; the
    // fields that matter are set below.
    let mut headers: Vec<libc::mmsghdr> = (0..datagrams.len()).map(|_| unsafe { MaybeUninit::<libc::mmsghdr>::zeroed().assume_init() }).collect();
    for ((header, name), iovec) in headers.iter_mut().zip(&names).zip(iovecs.iter_mut()) {
        header.msg_hdr.msg_name = name.as_ptr() as *mut libc::c_void;
        header.msg_hdr.msg_namelen = name.len();
        header.msg_hdr.msg_iov = iovec;
        header.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: each header points at its peer's address and one iovec over
    // its datagram's bytes, all borrowed for the call; sendmmsg only reads
    // them (the iovec's mutable pointer is the C type's, never written
    // through) and writes each header's msg_len.
    let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), headers.len() as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// The IP address in a `recvmmsg` name buffer; None for another family or
/// a length too short for its family.
fn socket_addr(name: &libc::sockaddr_storage, length: libc::socklen_t) -> Option<SocketAddr> {
    let length = length as usize;
    match libc::c_int::from(name.ss_family) {
        libc::AF_INET if length >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which
            // it is large and aligned enough for.
            let v4 = unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)), u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 if length >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let v6 = unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(v6.sin6_addr.s6_addr), u16::from_be(v6.sin6_port), v6.sin6_flowinfo, v6.sin6_scope_id)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    fn bound(addr: &str) -> UdpSocket {
        let socket = UdpSocket::bind(addr).unwrap();
        socket.set_nonblocking(true).unwrap();
        socket
    }

    #[test]
    fn a_batch_reads_every_queued_datagram_with_its_sender_and_sends_the_answers_back() {
        for (server_addr, client_addr) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let server = bound(server_addr);
            let clients: Vec<UdpSocket> = (0..3).map(|_| bound(client_addr)).collect();
            let mut batch = ReceivedBatch::default();
            assert_eq!(batch.receive(server.as_fd()).unwrap_err().kind(), io::ErrorKind::WouldBlock, "nothing queued: no wait");
            for (i, c) in clients.iter().enumerate() {
                c.send_to(&vec![i as u8; 10 + i], server.local_addr().unwrap()).unwrap();
            }
            // Loopback delivers synchronously: all three are queued.
            assert_eq!(batch.receive(server.as_fd()).unwrap(), 3);
            let got: Vec<(Vec<u8>, SocketAddr)> = batch.datagrams().map(|(b, from)| (b.to_vec(), from)).collect();
            for (i, c) in clients.iter().enumerate() {
                assert_eq!(got[i], (vec![i as u8; 10 + i], c.local_addr().unwrap()));
            }
            let answers: Vec<(Vec<u8>, SocketAddr)> = got.iter().map(|(b, from)| ([b"re:".as_slice(), b].concat(), *from)).collect();
            assert_eq!(send_batch(server.as_fd(), &answers).unwrap(), 3);
            for (i, c) in clients.iter().enumerate() {
                let mut buf = [0u8; 64];
                let (n, from) = c.recv_from(&mut buf).unwrap();
                assert_eq!((&buf[..n], from), (answers[i].0.as_slice(), server.local_addr().unwrap()));
            }
        }
    }

    #[test]
    fn more_than_a_batch_is_read_in_batches_and_a_long_datagram_is_cut_at_the_buffer() {
        let server = bound("127.0.0.1:0");
        let client = bound("127.0.0.1:0");
        for i in 0..BATCH + 5 {
            client.send_to(&[i as u8; 3], server.local_addr().unwrap()).unwrap();
        }
        client.send_to(&vec![7u8; DATAGRAM_BYTES + 100], server.local_addr().unwrap()).unwrap();
        let mut batch = ReceivedBatch::default();
        assert_eq!(batch.receive(server.as_fd()).unwrap(), BATCH);
        assert_eq!(batch.datagrams().last().unwrap().0, &[(BATCH - 1) as u8; 3]);
        assert_eq!(batch.receive(server.as_fd()).unwrap(), 6);
        assert_eq!(batch.datagrams().last().unwrap().0.len(), DATAGRAM_BYTES);
    }

    #[test]
    fn an_answer_the_kernel_refuses_is_dropped_and_the_others_still_go() {
        let server = bound("127.0.0.1:0");
        let client = bound("127.0.0.1:0");
        // A v6 destination on a v4 socket fails on its own (EAFNOSUPPORT/EINVAL).
        let answers = vec![
            (b"one".to_vec(), client.local_addr().unwrap()),
            (b"nowhere".to_vec(), "[::1]:9".parse().unwrap()),
            (b"two".to_vec(), client.local_addr().unwrap()),
        ];
        assert_eq!(send_batch(server.as_fd(), &answers).unwrap(), 3);
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        while let Ok((n, _)) = client.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn a_partial_send_resumes_where_it_stopped_and_a_full_queue_reports_what_went() {
        let to: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let datagrams: Vec<(Vec<u8>, SocketAddr)> = (0..BATCH as u8 + 10).map(|i| (vec![i], to)).collect();
        // The kernel takes 5, then refuses the next on its own (its peer),
        // then takes the rest of that chunk, then its queue is full.
        let mut calls = Vec::new();
        let mut step = 0;
        let sent = send_batch_with(&datagrams, |chunk| {
            calls.push(chunk[0].0[0]);
            step += 1;
            match step {
                1 => Ok(5),
                2 => Err(io::Error::from_raw_os_error(libc::EINVAL)),
                3 => Ok(chunk.len()),
                _ => Err(io::Error::from(io::ErrorKind::WouldBlock)),
            }
        })
        .unwrap();
        assert_eq!(calls, [0, 5, 6, 6 + BATCH as u8]);
        assert_eq!(sent, 6 + BATCH, "what went (and the one dropped) counts; the caller sends the rest");
        let blocked = send_batch_with(&datagrams, |_| Err(io::Error::from(io::ErrorKind::WouldBlock)));
        assert_eq!(blocked.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_name_of_another_family_or_too_short_is_not_an_address() {
        // SAFETY: all zeroes is a valid sockaddr_storage.
        let mut name: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
        name.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(socket_addr(&name, 110), None);
        name.ss_family = libc::AF_INET6 as libc::sa_family_t;
        assert_eq!(socket_addr(&name, 8), None);
        assert!(socket_addr(&name, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t).is_some());
    }
}
