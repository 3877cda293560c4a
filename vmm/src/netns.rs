//! Named network namespaces, compatible with `ip netns` (bind mounts under
//! /run/netns), so `ip netns exec NAME tool …` runs tools inside them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use crate::sys::cvt;

pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("network namespace name {0:?} is not a plain file name")]
    InvalidName(String),
    #[error("network namespace {name} already exists")]
    Exists { name: String },
    #[error("{op} for network namespace {name}: {source}")]
    Io { op: &'static str, name: String, source: io::Error },
    #[error("thread running inside network namespace {name} panicked")]
    ThreadPanicked { name: String },
    #[error("making {NETNS_RUN_DIR} a shared mount point (as `ip netns` does): {0}")]
    RunDir(#[source] io::Error),
}

/// Serialises our own preparation of /run/netns (two threads both finding
/// it unmounted would stack two bind mounts); flock does not serialise
/// threads sharing one open file, but each call opens its own, so this is
/// belt and braces for callers in one process.
static RUN_DIR_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Makes /run/netns a shared mount point exactly as iproute2's `ip netns
/// add` does (ip/ipnetns.c, netns_add): try `--make-rshared`; if it is not a
/// mount point yet (EINVAL), bind-mount it onto itself once and try again.
///
/// Why it matters: when we bind namespace files into a plain /run/netns and
/// another tool (Docker, CNI, an admin) then runs `ip netns add`, iproute2
/// finds no mount point and stacks a new mount over the directory; every
/// namespace made before is hidden underneath and can no longer be deleted
/// (EBUSY) until reboot. Once the directory is a shared mount point, iproute2
/// uses it as it is. Returns whether it had to make the mount point.
pub fn prepare_run_dir() -> Result<bool, NetNsError> {
    let _serial = RUN_DIR_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(NETNS_RUN_DIR).map_err(NetNsError::RunDir)?;
    // Across processes: newer iproute2 holds an flock on the directory for
    // the same steps; holding it too keeps the two from stacking mounts.
    let dir_file = File::open(NETNS_RUN_DIR).map_err(NetNsError::RunDir)?;
    // SAFETY: flock on an fd we own; released when dir_file is dropped.
    cvt(unsafe { libc::flock(dir_file.as_raw_fd(), libc::LOCK_EX) }).map_err(NetNsError::RunDir)?;
    let dir = c"/run/netns";
    let mut made_mount_point = false;
    loop {
        // SAFETY: valid NUL-terminated strings; no data for a propagation change.
        let shared = cvt(unsafe {
            libc::mount(c"".as_ptr(), dir.as_ptr(), c"none".as_ptr(), libc::MS_SHARED | libc::MS_REC, std::ptr::null())
        });
        match shared {
            Ok(_) => return Ok(made_mount_point),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !made_mount_point => {
                // SAFETY: as above; a recursive bind of the directory onto itself.
                cvt(unsafe {
                    libc::mount(dir.as_ptr(), dir.as_ptr(), c"none".as_ptr(), libc::MS_BIND | libc::MS_REC, std::ptr::null())
                })
                .map_err(NetNsError::RunDir)?;
                made_mount_point = true;
            }
            Err(e) => return Err(NetNsError::RunDir(e)),
        }
    }
}

/// Removes a namespace's mount point: unmount (not mounted is fine), then
/// unlink (missing is fine). A file that stays (EBUSY: something is mounted
/// over /run/netns or over the file) is an error naming it.
fn remove_mount_point(name: &str, path: &Path) -> Result<(), NetNsError> {
    let io_err = |op: &'static str| {
        let name = name.to_string();
        move |source| NetNsError::Io { op, name, source }
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| NetNsError::InvalidName(name.to_string()))?;
    // SAFETY: c_path is a valid NUL-terminated path.
    match cvt(unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) }) {
        Ok(_) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {}
        Err(e) => return Err(io_err("unmounting")(e)),
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing the mount point")(e)),
    }
    // `ip netns exec` reads per-namespace files from here.
    match fs::remove_dir_all(Path::new("/etc/netns").join(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing /etc/netns files")(e)),
    }
}

/// A named network namespace. If this value created it, dropping it
/// deletes it (unmount + unlink), which destroys every link inside once the
/// last process leaves.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    file: File,
    owned: bool,
}

impl NetNs {
    /// Creates a new, empty namespace `name` (only loopback, down).
    pub fn create(name: &str) -> Result<NetNs, NetNsError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(NetNsError::InvalidName(name.to_string()));
        }
        let io_err = |op: &'static str| {
            let name = name.to_string();
            move |source| NetNsError::Io { op, name, source }
        };
        prepare_run_dir()?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(NetNsError::Exists { name: name.to_string() })
            }
            Err(e) => return Err(io_err("creating mount point")(e)),
        }
        // unshare() changes the calling thread only; do it on a throwaway
        // thread so the caller stays where it was.
        let target = path.clone();
        let made = std::thread::spawn(move || -> io::Result<()> {
            // SAFETY: plain syscall on this thread; it affects only this thread.
            cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
            bind_mount("/proc/thread-self/ns/net", &target)
        })
        .join()
        .map_err(|_| NetNsError::ThreadPanicked { name: name.to_string() })?;
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(io_err("unshare + bind mount")(e));
        }
        let file = File::open(&path).map_err(io_err("opening"))?;
        Ok(NetNs { name: name.to_string(), path, file, owned: true })
    }

    /// Opens an existing named namespace without taking ownership.
    pub fn open(name: &str) -> Result<NetNs, NetNsError> {
        let path = Path::new(NETNS_RUN_DIR).join(name);
        let file = File::open(&path)
            .map_err(|source| NetNsError::Io { op: "opening", name: name.to_string(), source })?;
        Ok(NetNs { name: name.to_string(), path, file, owned: false })
    }

    /// Removes the named namespace's mount point (the namespace itself goes
    /// when its last user does). Missing is fine; a mount point that cannot
    /// be removed is an error.
    pub fn delete(name: &str) -> Result<(), NetNsError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(NetNsError::InvalidName(name.to_string()));
        }
        remove_mount_point(name, &Path::new(NETNS_RUN_DIR).join(name))
    }

    /// Whether a namespace of this name is still listed in /run/netns.
    pub fn exists(name: &str) -> bool {
        Path::new(NETNS_RUN_DIR).join(name).symlink_metadata().is_ok()
    }

    /// Deletes a namespace this value owns, reporting what could not be
    /// removed (dropping it does the same but can only log).
    pub fn remove(mut self) -> Result<(), NetNsError> {
        self.owned = false;
        remove_mount_point(&self.name, &self.path)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a new thread that has joined this namespace; sockets and
    /// taps it creates belong to the namespace and stay there afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
        let fd = self.file.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> io::Result<T> {
                    // SAFETY: fd is an open namespace fd borrowed for the
                    // scope; setns affects only this (scoped) thread.
                    cvt(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })?;
                    Ok(f())
                })
                .join()
        })
        .map_err(|_| NetNsError::ThreadPanicked { name: self.name.clone() })?
        .map_err(|source| NetNsError::Io { op: "setns", name: self.name.clone(), source })
    }

    /// Moves the calling thread into the namespace for good. Used by
    /// threads that live inside a namespace (e.g. a runtime worker).
    pub fn enter_current_thread(&self) -> Result<(), NetNsError> {
        // SAFETY: the fd is valid for self's lifetime; setns affects only
        // the calling thread.
        cvt(unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) })
            .map(|_| ())
            .map_err(|source| NetNsError::Io { op: "setns", name: self.name.clone(), source })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = remove_mount_point(&self.name, &self.path) {
            eprintln!("sbx-vmm: {e}");
        }
    }
}

fn bind_mount(source: &str, target: &Path) -> io::Result<()> {
    let src = std::ffi::CString::new(source)?;
    let dst = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; fstype/data may be null
    // for a bind mount.
    cvt(unsafe {
        libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
    })?;
    Ok(())
}
