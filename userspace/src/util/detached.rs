//! Helper processes the daemon starts and does not wait for (a netns
//! guest's pump, a microVM's VMM): each in its own session, so that killing
//! or restarting the daemon leaves it running, and each saying on its
//! first stdout line when it is ready.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Blocks SIGTERM and SIGINT on the calling thread (threads it starts
/// inherit the mask) and returns the set, for a helper that waits for its
/// stop signal with `sigwait` instead of dying of it.
pub fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; the calls
    // only read and write it and the thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Starts `command` (stdin null, stdout piped) in a session of its own and
/// waits at most `timeout` for its first line on stdout: its pid, and the
/// line (None: nothing in time; an empty line: it closed stdout, most
/// likely by exiting).
pub fn spawn_ready(command: &mut Command, timeout: Duration) -> std::io::Result<(u32, Option<String>)> {
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = spawn_even_unwaited(command)?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    Ok((pid, rx.recv_timeout(timeout).ok()))
}

/// `command.spawn()` in a process that ignores SIGCHLD (the daemon: its
/// children are reaped by the kernel). When the exec fails (the executable
/// moved away, say mid-upgrade), std's spawn finds no child left to wait
/// for and panics instead of returning the error; this returns it, so the
/// thread that starts helpers lives on to report or retry.
pub fn spawn_even_unwaited(command: &mut Command) -> std::io::Result<std::process::Child> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| command.spawn()))
        .unwrap_or_else(|_| Err(std::io::Error::other("the executable could not be run (exec failed)")))
}
