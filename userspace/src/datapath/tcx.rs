//! TCX attachment by program fd, usable from any thread.
//!
//! Every TCX attach waits for an RCU grace period in the kernel
//! (`tcx_link_attach` → `tcx_entry_sync` → `synchronize_rcu`), ~12 ms on
//! small VMs, and waits for it holding rtnl: attaches on different taps
//! never share a grace period, so at most ~60-80 taps a second get their
//! classifier, however many threads attach (measured with ftrace, issue
//! 19). aya's attach needs `&mut` access to the loaded program; with the
//! fd alone, the tap pool's workers attach off the create path (see
//! [`crate::sandbox::tap_pool`]) while the control thread never waits.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TCX_INGRESS: u32 = 46;

#[derive(Debug, thiserror::Error)]
pub enum TcxError {
    #[error("TCX attach to ifindex {ifindex}: {source}")]
    Attach { ifindex: u32, source: std::io::Error },
    #[error("pinning link at {path}: {source}")]
    Pin { path: String, source: std::io::Error },
}

/// `union bpf_attr` for BPF_LINK_CREATE with a TCX target (the fields we
/// use; the rest of the 128-byte union stays zero).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    /// `tcx.relative_fd`, `tcx.expected_revision`: zero = append, any revision.
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
    _rest: [u64; 12],
}

/// `union bpf_attr` for BPF_OBJ_PIN.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
    _rest: [u64; 13],
}

/// Attaches `program` to TC ingress of `ifindex` with a TCX link and pins
/// the link at `pin`; the link lives as long as the pin (our fd closes here).
pub fn attach_ingress_pinned(program: BorrowedFd<'_>, ifindex: u32, pin: &Path) -> Result<(), TcxError> {
    let attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        ..Default::default()
    };
    // SAFETY: BPF_LINK_CREATE reads `size_of::<LinkCreateAttr>()` bytes of a
    // fully initialised attr; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, &attr as *const LinkCreateAttr, std::mem::size_of::<LinkCreateAttr>())
    };
    if fd < 0 {
        return Err(TcxError::Attach { ifindex, source: std::io::Error::last_os_error() });
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).map_err(|e| TcxError::Pin {
        path: pin.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    let attr = ObjPinAttr { pathname: path.as_ptr() as u64, bpf_fd: link.as_raw_fd() as u32, ..Default::default() };
    // SAFETY: BPF_OBJ_PIN reads the attr and the NUL-terminated path, both
    // alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &attr as *const ObjPinAttr, std::mem::size_of::<ObjPinAttr>()) };
    if rc < 0 {
        // Dropping `link` detaches: nothing is left half-made.
        return Err(TcxError::Pin { path: pin.display().to_string(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel_union() {
        // union bpf_attr is 120+ bytes; both views must cover the fields the
        // kernel reads at their offsets.
        assert_eq!(std::mem::size_of::<LinkCreateAttr>(), 128);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, attach_type), 8);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, relative_fd), 16);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, expected_revision), 24);
        assert_eq!(std::mem::size_of::<ObjPinAttr>(), 128);
        assert_eq!(std::mem::offset_of!(ObjPinAttr, bpf_fd), 8);
    }
}
