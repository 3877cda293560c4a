//! One daemon per host data path, held for the daemon's life: its network
//! namespace (the `inet sbx_net` table, the proxy ports and the forwarding
//! settings are per namespace) is claimed by binding an abstract Unix
//! socket, which exists per namespace and leaves no file; the pin directory
//! and the state directory each get an exclusive `flock`. A second daemon (a typo, a
//! second unit, a test left running) would otherwise replace the first one's
//! nftables table, adopt and delete its pre-warmed taps and write into its
//! maps.
//!
//! Both are the kernel's (they go with the process, never stale). The holder
//! is named from /proc/locks or from the socket's owner (its pid) and that
//! pid's listening Unix sockets, so the refusal says which daemon to stop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// sysexits' EX_TEMPFAIL: the exit status of a daemon refused this way.
pub const EXIT_LOCKED: u8 = 75;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another sbx-net daemon ({}) holds {path}: one daemon per network namespace, pin directory and state directory; stop it first",
        describe(pid, sockets)
    )]
    Held { path: String, pid: Option<u32>, sockets: Vec<PathBuf> },
    #[error("locking {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn describe(pid: &Option<u32>, sockets: &[PathBuf]) -> String {
    let pid = pid.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"));
    match sockets {
        [] => pid,
        s => format!("{pid}, socket {}", s.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// The abstract socket that claims a network namespace for one daemon.
pub const NETNS_CLAIM: &str = "sbx-net/daemon";

/// Held locks; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct InstanceLock {
    _netns: Option<std::os::unix::net::UnixListener>,
    _dirs: Vec<File>,
}

impl InstanceLock {
    /// Claims the calling thread's network namespace, then locks each
    /// directory (they must exist), without waiting.
    pub fn acquire(dirs: &[&Path]) -> Result<InstanceLock, LockError> {
        Ok(InstanceLock { _netns: Some(claim_netns()?), _dirs: lock_dirs(dirs)? })
    }

    /// Only the directories (tests of the flock part).
    pub fn acquire_dirs(dirs: &[&Path]) -> Result<InstanceLock, LockError> {
        Ok(InstanceLock { _netns: None, _dirs: lock_dirs(dirs)? })
    }
}

/// Binds the namespace's claim socket; EADDRINUSE means another daemon
/// holds it. std binds with SOCK_CLOEXEC, so spawned pumps do not keep it.
fn claim_netns() -> Result<std::os::unix::net::UnixListener, LockError> {
    use std::os::linux::net::SocketAddrExt;
    let what = format!("this network namespace (abstract socket @{NETNS_CLAIM})");
    let io = |source| LockError::Io { path: what.clone(), source };
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NETNS_CLAIM).map_err(io)?;
    match std::os::unix::net::UnixListener::bind_addr(&addr) {
        Ok(l) => Ok(l),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            let table = std::fs::read_to_string("/proc/self/net/unix").unwrap_or_default();
            let pid = abstract_socket_inode(&table, NETNS_CLAIM).and_then(socket_owner);
            let sockets = pid.map(listening_unix_sockets).unwrap_or_default();
            Err(LockError::Held { path: what, pid, sockets })
        }
        Err(e) => Err(io(e)),
    }
}

/// The inode of the abstract socket `@name` in a `/proc/net/unix` table.
fn abstract_socket_inode(table: &str, name: &str) -> Option<u64> {
    let wanted = format!("@{name}");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(7) == Some(&wanted.as_str())).then(|| f.get(6)?.parse().ok()).flatten()
    })
}

/// The process holding socket `inode` (a walk of /proc/*/fd: only on refusal).
fn socket_owner(inode: u64) -> Option<u32> {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.filter_map(|f| f.ok()).any(|f| std::fs::read_link(f.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str())).then_some(pid)
    })
}

fn lock_dirs(dirs: &[&Path]) -> Result<Vec<File>, LockError> {
    let mut held = Vec::new();
    for dir in dirs {
        let io = |source| LockError::Io { path: dir.display().to_string(), source };
        // std opens with O_CLOEXEC: pumps the daemon spawns do not
        // inherit (and so do not keep) the lock.
        let file = File::open(dir).map_err(io)?;
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(e));
            }
            let meta = file.metadata().map_err(io)?;
            let pid = std::fs::read_to_string("/proc/locks").ok().and_then(|l| flock_holder(&l, meta.dev(), meta.ino()));
            let sockets = pid.map(listening_unix_sockets).unwrap_or_default();
            return Err(LockError::Held { path: dir.display().to_string(), pid, sockets });
        }
        held.push(file);
    }
    Ok(held)
}

/// The pid holding an exclusive FLOCK on (dev, inode), from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF`; major:minor in hex).
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let wanted = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed as `1: -> FLOCK …`; skip them.
        let i = f.iter().position(|w| *w == "FLOCK")?;
        if f.get(1) == Some(&"->") || f.get(i + 2) != Some(&"WRITE") || f.get(i + 4) != Some(&wanted.as_str()) {
            return None;
        }
        f.get(i + 3)?.parse().ok()
    })
}

/// Paths of the listening Unix sockets `pid` holds (its control socket).
fn listening_unix_sockets(pid: u32) -> Vec<PathBuf> {
    let inodes: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    listening_paths(&table, &inodes)
}

/// `/proc/net/unix`: Num RefCount Protocol Flags Type St Inode Path; a
/// listening socket has __SO_ACCEPTCON (0x10000) in Flags.
fn listening_paths(table: &str, inodes: &[u64]) -> Vec<PathBuf> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let inode: u64 = f.get(6)?.parse().ok()?;
            let path = f.get(7)?;
            (flags & 0x10000 != 0 && inodes.contains(&inode) && path.starts_with('/')).then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_in_proc_locks() {
        let dev = libc::makedev(0, 0x1f);
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:1f:5678 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4321 00:1f:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 777 00:20:5678 0 EOF\n";
        assert_eq!(flock_holder(locks, dev, 5678), Some(1234));
        assert_eq!(flock_holder(locks, dev, 1), None);
    }

    #[test]
    fn abstract_socket_by_name() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                     0000000000000000: 00000002 00000000 00010000 0001 01 777 @sbx-net/daemon\n\
                     0000000000000000: 00000002 00000000 00010000 0001 01 778 @sbx-net/daemonx\n";
        assert_eq!(abstract_socket_inode(table, NETNS_CLAIM), Some(777));
        assert_eq!(abstract_socket_inode(table, "other"), None);
    }

    #[test]
    fn listening_sockets_by_inode() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                     0000000000000000: 00000002 00000000 00010000 0001 01 4242 /tmp/a/sbx-net.sock\n\
                     0000000000000000: 00000003 00000000 00000000 0001 03 4243 /tmp/a/sbx-net.sock\n\
                     0000000000000000: 00000002 00000000 00010000 0001 01 9999 /run/other.sock\n";
        assert_eq!(listening_paths(table, &[4242, 4243]), vec![PathBuf::from("/tmp/a/sbx-net.sock")]);
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("sbx-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = InstanceLock::acquire_dirs(&[&dir]).unwrap();
        // flock locks belong to the open file: a second open conflicts even
        // in the same process.
        match InstanceLock::acquire_dirs(&[&dir]) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        InstanceLock::acquire_dirs(&[&dir]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
