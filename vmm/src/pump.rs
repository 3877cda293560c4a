//! The frame pump: moves frames between two taps, as a VMM's virtio-net
//! backend moves them between the guest's queues and the host tap. Frames
//! keep their virtio-net header, so GSO and checksum offload pass through.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::sys::cvt;
use crate::tap::Tap;

/// Largest frame we accept: vnet header + 64 KiB GSO frame + Ethernet.
const FRAME_BUF_LEN: usize = 65_536 + 256;

/// Frames and bytes moved in one direction, and frames the peer refused.
#[derive(Debug, Default)]
pub struct PumpStats {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
}

/// Two threads, one per direction. Dropping the pump stops them.
pub struct FramePump {
    stop: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
    /// Frames from the guest into the host tap.
    pub to_host: Arc<PumpStats>,
    /// Frames from the host tap to the guest.
    pub to_guest: Arc<PumpStats>,
}

impl FramePump {
    pub fn start(host: Tap, guest: Tap) -> io::Result<FramePump> {
        // SAFETY: eventfd with valid flags; ownership of the new fd is taken
        // immediately below.
        let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: raw is a freshly created fd nobody else owns.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let host = Arc::new(host);
        let guest = Arc::new(guest);
        let to_host = Arc::new(PumpStats::default());
        let to_guest = Arc::new(PumpStats::default());
        let mut threads = Vec::new();
        for (src, dst, stats, name) in [
            (guest.clone(), host.clone(), to_host.clone(), "pump-to-host"),
            (host.clone(), guest.clone(), to_guest.clone(), "pump-to-guest"),
        ] {
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || pump_loop(&src, &dst, &stop, &stats))?,
            );
        }
        Ok(FramePump { stop, threads, to_host, to_guest })
    }
}

impl Drop for FramePump {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn pump_loop(src: &Tap, dst: &Tap, stop: &OwnedFd, stats: &PumpStats) {
    let mut buf = vec![0u8; FRAME_BUF_LEN];
    let mut fds = [
        libc::pollfd { fd: src.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return;
        }
        // Drain everything that is ready before polling again.
        loop {
            match src.read_frame(&mut buf) {
                Ok(len) => match dst.write_frame(&buf[..len]) {
                    Ok(_) => {
                        stats.frames.fetch_add(1, Ordering::Relaxed);
                        stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    // The peer is down or full: the frame is lost, as on a wire.
                    Err(_) => {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EIO while the link is down; wait for the next readiness.
                Err(_) => break,
            }
        }
    }
}
