//! The few raw syscalls the crate needs, each wrapped once.

use std::io;
use std::os::fd::RawFd;

/// `struct ifreq` with the name and the flags member of its union.
#[repr(C)]
pub struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _union_rest: [u8; 22],
}

impl IfReq {
    /// `name` must already be validated (≤ 15 bytes, no NUL).
    pub fn new(name: &str) -> IfReq {
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _union_rest: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    pub fn set_flags(&mut self, flags: i16) {
        self.flags = flags;
    }

    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// # Safety
/// `fd` must be an fd `request` applies to and `arg` must point at the type
/// the kernel expects for `request`, valid for the whole call.
pub unsafe fn ioctl_with_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: *const T) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { libc::ioctl(fd, request, arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// # Safety
/// `fd` must be an fd `request` applies to and `arg` must point at the type
/// the kernel expects for `request`, valid and writable for the whole call
/// (the kernel may write through it).
pub unsafe fn ioctl_with_mut_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { libc::ioctl(fd, request, arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// # Safety
/// `fd` must be an fd `request` applies to, and `request` must take its
/// argument by value.
pub unsafe fn ioctl_with_val(fd: RawFd, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { libc::ioctl(fd, request, arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_is_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn ifreq_name_round_trip() {
        assert_eq!(IfReq::new("sbx-abc").name(), "sbx-abc");
    }
}
