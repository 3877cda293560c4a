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

/// `_IO(KVMIO, 0x80)`: the one ioctl a running vCPU makes.
pub const KVM_RUN: u64 = 0xae80;

/// The system calls a running VM makes (the run loop, its console and
/// tap I/O, the allocator, the thread machinery); `ioctl` only for KVM_RUN.
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
];

/// The filter as a BPF program (pure: built, not installed).
pub fn vmm_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|(nr, _)| (*nr, Vec::new())).collect();
    let kvm_run = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, KVM_RUN)?;
    rules.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![kvm_run])?]);
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// Installs the filter on the calling thread (the one that runs the VM);
/// it cannot be lifted.
pub fn install_on_this_thread() -> Result<(), SeccompError> {
    let program = vmm_filter()?;
    seccompiler::apply_filter(&program)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_and_names_no_syscall_twice() {
        let program = vmm_filter().unwrap();
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
