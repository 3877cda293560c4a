//! The microVM's seccomp filter, in the Firecracker manner: once the VM is
//! built (memory mapped, vCPU registers set, devices made), the thread that
//! runs it may make only the system calls running needs; any other kills
//! the process (SIGSYS). A guest that finds a bug in the monitor's device
//! code finds a process that cannot open a socket or a file.

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// `_IO(KVMIO, 0x80)`: the ioctl a running vCPU makes.
pub const KVM_RUN: u64 = 0xae80;
/// `_IOW('T', 208, unsigned int)`: virtio-net sets the tap's offloads to
/// what the driver negotiated when the driver starts it.
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// The system calls a running VM makes (the vCPU loop and its idle wait,
/// the device thread's epoll, eventfds, tap and disk I/O, the console, the
/// signal thread's wait and kick, the allocator, thread exit); `ioctl`
/// only for KVM_RUN and TUNSETOFFLOAD.
pub const ALLOWED: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_close, "close"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_gettid, "gettid"),
];

/// The filter as a BPF program (pure: built, not installed). `pid`: this
/// process, the only one it may signal (the kick of its own vCPU thread).
pub fn vmm_filter(pid: u32) -> Result<BpfProgram, SeccompError> {
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|(nr, _)| (*nr, Vec::new())).collect();
    let ioctl = |request: u64| -> Result<SeccompRule, SeccompError> { Ok(SeccompRule::new(vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?])?) };
    rules.insert(libc::SYS_ioctl, vec![ioctl(KVM_RUN)?, ioctl(TUNSETOFFLOAD)?]);
    // std checks that a descriptor it closes is open (F_GETFD, a read of
    // the descriptor's flags); nothing else of fcntl.
    let getfd = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::F_GETFD as u64)?;
    rules.insert(libc::SYS_fcntl, vec![SeccompRule::new(vec![getfd])?]);
    // malloc grows a thread's arena by making pages writable; never
    // executable.
    let no_exec = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)?;
    rules.insert(libc::SYS_mprotect, vec![SeccompRule::new(vec![no_exec])?]);
    let own = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(pid))?;
    rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![own])?]);
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// Installs the filter on the calling thread (the one that runs the VM);
/// it cannot be lifted.
pub fn install_on_this_thread() -> Result<(), SeccompError> {
    let program = vmm_filter(std::process::id())?;
    seccompiler::apply_filter(&program)?;
    Ok(())
}

/// Installs the filter on every thread of this process (the VMM process:
/// the vCPU, device and signal threads all exist by then).
pub fn install_on_all_threads() -> Result<(), SeccompError> {
    let program = vmm_filter(std::process::id())?;
    seccompiler::apply_filter_all_threads(&program)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_and_names_no_syscall_twice() {
        let program = vmm_filter(1).unwrap();
        assert!(program.len() > ALLOWED.len(), "one check per allowed call at least");
        let mut numbers: Vec<i64> = ALLOWED.iter().map(|(nr, _)| *nr).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), ALLOWED.len());
        for forbidden in [libc::SYS_socket, libc::SYS_openat, libc::SYS_execve, libc::SYS_connect, libc::SYS_ptrace] {
            assert!(!numbers.contains(&forbidden), "{forbidden} must not be allowed");
        }
    }
}
