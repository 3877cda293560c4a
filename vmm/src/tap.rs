//! Tap devices: the host end of a sandbox's network (what a VMM's virtio-net
//! backend reads and writes).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::sys::{ioctl_with_mut_ptr, ioctl_with_ptr, ioctl_with_val, IfReq};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// Offload bits for TUNSETOFFLOAD (linux/if_tun.h).
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
    pub const UFO: u32 = 0x10;
    pub const USO4: u32 = 0x20;
    pub const USO6: u32 = 0x40;
}

/// Size of `struct virtio_net_hdr` (no mergeable rx buffers) that prefixes
/// every frame read from or written to the tap.
pub const VNET_HDR_LEN: usize = 10;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("interface name {0:?} is empty, longer than {MAX_IFNAME_LEN} bytes or contains '/', ':' or whitespace")]
    InvalidName(String),
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("TUNSETIFF {name}: {source}")]
    SetIff { name: String, source: io::Error },
    #[error("{op} on tap {name}: {source}")]
    Ioctl { op: &'static str, name: String, source: io::Error },
}

/// The virtio-net features a guest negotiated that matter for offloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestOffloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub tso_ecn: bool,
    pub ufo: bool,
}

impl GuestOffloads {
    /// What a netns guest (a kernel on the other side of a second tap) can
    /// take: checksum offload and TCP segmentation both ways.
    pub const KERNEL_PEER: GuestOffloads =
        GuestOffloads { csum: true, tso4: true, tso6: true, tso_ecn: true, ufo: false };
}

/// TUNSETOFFLOAD flags for the features the guest accepts. Segmentation
/// offloads are meaningless without checksum offload, so they are dropped
/// when `csum` is off (the kernel would reject them anyway).
pub fn offload_flags(features: GuestOffloads) -> u32 {
    if !features.csum {
        return 0;
    }
    let mut flags = offload::CSUM;
    if features.tso4 {
        flags |= offload::TSO4;
    }
    if features.tso6 {
        flags |= offload::TSO6;
    }
    if features.tso_ecn && (features.tso4 || features.tso6) {
        flags |= offload::TSO_ECN;
    }
    if features.ufo {
        flags |= offload::UFO;
    }
    flags
}

pub fn validate_ifname(name: &str) -> Result<(), TapError> {
    if name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(TapError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// An open tap queue. Closing it detaches the process; a persistent tap
/// stays, a non-persistent one disappears.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) the tap `name` in the calling thread's
    /// network namespace, with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, a 10-byte
    /// vnet header, non-blocking.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        validate_ifname(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name);
        req.set_flags(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: file is an open /dev/net/tun fd and req is a properly sized
        // struct ifreq that outlives the call; the kernel writes the final
        // name back into it.
        unsafe { ioctl_with_mut_ptr(file.as_raw_fd(), TUNSETIFF, &mut req) }
            .map_err(|source| TapError::SetIff { name: name.to_string(), source })?;
        let tap = Tap { file, name: req.name() };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at a live local.
        unsafe { ioctl_with_ptr(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) }
            .map_err(|source| tap.ioctl_error("TUNSETVNETHDRSZ", source))?;
        Ok(tap)
    }

    /// The vnet header length every frame carries (10: `virtio_net_hdr`;
    /// 12: virtio 1.x's `virtio_net_hdr_v1`, what a virtio-net device uses).
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let hdr_len = len as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at a live local.
        unsafe { ioctl_with_ptr(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) }.map_err(|source| self.ioctl_error("TUNSETVNETHDRSZ", source))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps the device after the last fd closes (what a VMM-independent
    /// daemon needs so a restart does not tear the sandbox's link down).
    pub fn set_persist(&self, persist: bool) -> Result<(), TapError> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        unsafe { ioctl_with_val(self.file.as_raw_fd(), TUNSETPERSIST, persist as libc::c_ulong) }
            .map_err(|source| self.ioctl_error("TUNSETPERSIST", source))
    }

    /// Which offloads the kernel may hand us in frames we read.
    pub fn set_offloads(&self, features: GuestOffloads) -> Result<(), TapError> {
        let flags = offload_flags(features);
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        unsafe { ioctl_with_val(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) }
            .map_err(|source| self.ioctl_error("TUNSETOFFLOAD", source))
    }

    /// Reads one frame (vnet header included); `WouldBlock` when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable region of buf.len() bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (vnet header included): it is received by the tap
    /// as if it came off the wire.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: frame is a valid readable region of frame.len() bytes.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn ioctl_error(&self, op: &'static str, source: io::Error) -> TapError {
        TapError::Ioctl { op, name: self.name.clone(), source }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_need_checksum() {
        let no_csum = GuestOffloads { csum: false, tso4: true, tso6: true, tso_ecn: true, ufo: true };
        assert_eq!(offload_flags(no_csum), 0);
    }

    #[test]
    fn kernel_peer_offloads() {
        let flags = offload_flags(GuestOffloads::KERNEL_PEER);
        assert_eq!(flags, offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN);
    }

    #[test]
    fn ecn_only_with_tso() {
        let f = GuestOffloads { csum: true, tso_ecn: true, ..Default::default() };
        assert_eq!(offload_flags(f), offload::CSUM);
    }

    #[test]
    fn interface_names() {
        assert!(validate_ifname("sbx-0123456789a").is_ok());
        assert!(validate_ifname("sbx-0123456789ab").is_err());
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("a b").is_err());
    }
}
