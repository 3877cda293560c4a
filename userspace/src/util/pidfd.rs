//! A process handle that cannot name another process: a pidfd (Linux 5.3+).
//! Signals go to exactly the process it was opened for, and it becomes
//! readable when that process exits, so a supervisor can wait on it
//! together with other descriptors.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    pub fn open(pid: u32) -> io::Result<Pidfd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor (close-on-exec) or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us.
        Ok(Pidfd { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) }, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL to this process (a process already gone is fine).
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// `signal` to this process (a process already gone is fine).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0) };
    }

    /// Whether the process exited, waiting at most `wait`.
    pub fn exited_within(&self, wait: Duration) -> bool {
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd for a descriptor we own.
        let n = unsafe { libc::poll(&mut p, 1, wait.as_millis().min(i32::MAX as u128) as i32) };
        n > 0 && p.revents != 0
    }

    /// SIGKILL, then wait (at most `wait`) for it to be gone.
    pub fn kill_and_wait(&self, wait: Duration) -> bool {
        self.kill();
        self.exited_within(wait)
    }

    pub fn try_clone(&self) -> io::Result<Pidfd> {
        Ok(Pidfd { fd: self.fd.try_clone()?, pid: self.pid })
    }
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_sees_its_process_exit_and_kills_only_it() {
        // SAFETY: the child only calls pause(2) (async-signal-safe) until
        // it is killed; the parent reaps it below.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            loop {
                // SAFETY: as above.
                unsafe { libc::pause() };
            }
        }
        let pidfd = Pidfd::open(pid as u32).unwrap();
        assert!(!pidfd.exited_within(Duration::from_millis(10)));
        assert!(pidfd.kill_and_wait(Duration::from_secs(5)), "SIGKILL ends it");
        let mut status = 0;
        // SAFETY: reaping our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    }
}
