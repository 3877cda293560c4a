//! Handing open sockets to another process without closing them: over a
//! Unix socket as SCM_RIGHTS ancillary data (to a process that asks, as
//! HAProxy's `expose-fd listeners` does), and across exec (to a child, at
//! fixed numbers from 3 up, as systemd's LISTEN_FDS does). Either way the
//! kernel object stays open throughout, so nothing queued on it is lost.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;

/// The most descriptors one message carries (the listeners are six).
pub const MAX_FDS: usize = 16;

/// The first descriptor number a child gets its inherited sockets at.
pub const FIRST_INHERITED_FD: RawFd = 3;

/// Sends `data` with `fds` attached, in one message.
pub fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors per message");
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload_len = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE(payload_len) } as usize;
    // u64s: the control buffer holds cmsghdrs, which need their alignment.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut sent = 0;
    while sent < data.len() {
        let mut iov = libc::iovec { iov_base: data[sent..].as_ptr() as *mut libc::c_void, iov_len: data.len() - sent };
        // SAFETY: msghdr is plain data; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // The descriptors go with the first bytes; the rest goes plain.
        if sent == 0 && !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer is CMSG_SPACE(payload) bytes, so the
            // first header and its data fit; we write exactly payload_len bytes.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload_len) as _;
                std::ptr::copy_nonoverlapping(raw.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), payload_len as usize);
            }
        }
        // SAFETY: msg points at live buffers (iov, control) for the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Receives one message into `buf`, with the descriptors attached to it
/// (close-on-exec). Returns the bytes read (0 at end of stream).
pub fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    // u64s: the control buffer holds cmsghdrs, which need their alignment.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: plain data; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at live buffers for the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the CMSG
    // macros, within msg_controllen; each SCM_RIGHTS payload is an array of
    // descriptors now owned by this process (we take each exactly once).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more descriptors were sent than this end takes; they were closed"));
    }
    Ok((n, fds))
}

/// Arranges for the child `command` spawns to find `fds` at 3, 4, …, in
/// order (and no other of ours: everything else we hold is close-on-exec).
/// The returned copies must be kept until `spawn` has returned.
pub fn pass_to_child(command: &mut std::process::Command, fds: &[BorrowedFd<'_>]) -> io::Result<Vec<OwnedFd>> {
    // Copies above any number the child's targets use, so one dup2 cannot
    // overwrite a source another needs.
    let high: Vec<OwnedFd> = fds.iter().map(|f| f.try_clone_to_owned().and_then(|c| dup_above(c, 64))).collect::<io::Result<_>>()?;
    let sources: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only dup2 (async-signal-safe) on descriptors the parent keeps open
    // until spawn returns; dup2 clears close-on-exec on the target.
    unsafe {
        command.pre_exec(move || {
            for (i, source) in sources.iter().enumerate() {
                if libc::dup2(*source, FIRST_INHERITED_FD + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(high)
}

fn dup_above(fd: OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Takes the `count` descriptors a parent passed with [`pass_to_child`]
/// and marks them close-on-exec (our own children must not get them).
///
/// # Safety
/// Call once, early, and only when the parent's contract says descriptors
/// 3..3+count are ours (nothing else in this process may own them).
pub unsafe fn take_inherited(count: usize) -> io::Result<Vec<OwnedFd>> {
    (0..count)
        .map(|i| {
            let fd = FIRST_INHERITED_FD + i as RawFd;
            // SAFETY: F_SETFD on a number the caller guarantees is ours.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the caller's contract: this descriptor is ours alone.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_a_unix_socket_and_stay_the_same_object() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut inner_w, inner_r) = UnixStream::pair().unwrap();
        send_with_fds(&a, b"{\"kinds\":[\"pipe\"]}\n", &[inner_r.as_fd()]).unwrap();
        let mut buf = [0u8; 256];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"{\"kinds\":[\"pipe\"]}\n");
        assert_eq!(fds.len(), 1);
        // SAFETY-free: the received fd is a Unix socket; what is written to
        // the original's peer is read from the copy.
        let mut received = UnixStream::from(fds.into_iter().next().unwrap());
        drop(inner_r);
        inner_w.write_all(b"still open").unwrap();
        let mut got = [0u8; 10];
        received.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still open");
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(received.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0, "received descriptors are close-on-exec");
    }

    #[test]
    fn a_message_without_descriptors_is_plain_data() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(&a, b"hello\n", &[]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hello\n"[..], 0));
        drop(a);
        assert_eq!(recv_with_fds(&b, &mut buf).unwrap().0, 0, "end of stream");
    }
}
