//! The daemon under systemd, without libsystemd: the control socket a
//! `.socket` unit hands over (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`,
//! from descriptor 3 up), readiness and liveness over `NOTIFY_SOCKET`
//! (`READY=1`, `WATCHDOG=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=…`) and
//! the watchdog interval (`WATCHDOG_USEC`, `WATCHDOG_PID`).
//!
//! Parsing is pure and unit-tested; the I/O is two small owning types. The
//! variables are taken out of the environment as they are read, so no
//! process the daemon starts (the data plane, pumps, VMMs) believes the
//! descriptors or the notification socket are its own.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The first descriptor systemd passes (sd_listen_fds(3)).
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// The name `sbx-net.socket` gives the control socket (`FileDescriptorName=`).
pub const CONTROL_FD_NAME: &str = "control";

/// The most descriptors we accept a claim of (a typo'd `LISTEN_FDS=3000`
/// must not make us take descriptors that are not ours).
const MAX_LISTEN_FDS: usize = 64;

const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
const NOTIFY_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{var}={value:?}: {reason}")]
    BadVar { var: &'static str, value: String, reason: String },
    #[error(
        "systemd passed {count} descriptor(s) named {names:?}; sbx-net takes exactly one, its control socket, named {CONTROL_FD_NAME:?} \
         (FileDescriptorName={CONTROL_FD_NAME} in the .socket unit)"
    )]
    UnexpectedFds { count: usize, names: Vec<String> },
    #[error("the inherited control socket (fd {fd}) {reason}; refusing to serve on it")]
    NotOurListener { fd: RawFd, reason: String },
    #[error("the inherited control socket {path} has mode {mode:o}, wider than socket_mode {wanted:o} (set SocketMode= in the .socket unit)")]
    TooOpen { path: String, mode: u32, wanted: u32 },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl SystemdError {
    /// Whether the unit or the configuration is at fault (a restart will
    /// not help), not the moment.
    pub fn is_configuration(&self) -> bool {
        !matches!(self, SystemdError::Io { .. })
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SystemdError {
    let what = what.into();
    move |source| SystemdError::Io { what, source }
}

/// The raw values of the socket-activation variables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenVars {
    pub pid: Option<String>,
    pub fds: Option<String>,
    pub names: Option<String>,
}

/// One descriptor systemd passed, and its name when it gave names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenFd {
    pub fd: RawFd,
    pub name: Option<String>,
}

fn bad(var: &'static str, value: &str, reason: impl Into<String>) -> SystemdError {
    SystemdError::BadVar { var, value: value.to_string(), reason: reason.into() }
}

/// The descriptors meant for process `my_pid` (sd_listen_fds semantics:
/// none when `LISTEN_PID` is unset or names another process — the variables
/// were inherited, not given to us). Malformed values are errors, never
/// guesses: the descriptors would not be ours to use.
pub fn parse_listen(vars: &ListenVars, my_pid: u32) -> Result<Vec<ListenFd>, SystemdError> {
    let Some(pid_text) = vars.pid.as_deref() else { return Ok(Vec::new()) };
    let pid: u32 = pid_text.parse().map_err(|_| bad("LISTEN_PID", pid_text, "not a process id"))?;
    if pid == 0 {
        return Err(bad("LISTEN_PID", pid_text, "not a process id"));
    }
    if pid != my_pid {
        return Ok(Vec::new());
    }
    let Some(count_text) = vars.fds.as_deref() else {
        return Err(bad("LISTEN_PID", pid_text, "names this process but LISTEN_FDS is unset"));
    };
    let count: usize = count_text.parse().map_err(|_| bad("LISTEN_FDS", count_text, "not a count"))?;
    if count > MAX_LISTEN_FDS {
        return Err(bad("LISTEN_FDS", count_text, format!("more than {MAX_LISTEN_FDS} descriptors")));
    }
    let names: Vec<Option<String>> = match vars.names.as_deref() {
        None => vec![None; count],
        Some(text) => {
            // An empty variable is one empty name (or none when count is 0).
            let names: Vec<&str> = if text.is_empty() && count == 0 { Vec::new() } else { text.split(':').collect() };
            if names.len() != count {
                return Err(bad("LISTEN_FDNAMES", text, format!("{} name(s) for LISTEN_FDS={count}", names.len())));
            }
            names.into_iter().map(|n| Some(n.to_string())).collect()
        }
    };
    Ok(names.into_iter().enumerate().map(|(i, name)| ListenFd { fd: SD_LISTEN_FDS_START + i as RawFd, name }).collect())
}

/// Which of the passed descriptors is the control socket: none passed is
/// `None` (bind it ourselves); exactly one, named [`CONTROL_FD_NAME`] or
/// unnamed, is it; anything else is refused.
pub fn select_control(fds: &[ListenFd]) -> Result<Option<RawFd>, SystemdError> {
    match fds {
        [] => Ok(None),
        [ListenFd { fd, name: None }] => Ok(Some(*fd)),
        [ListenFd { fd, name: Some(name) }] if name == CONTROL_FD_NAME => Ok(Some(*fd)),
        _ => Err(SystemdError::UnexpectedFds { count: fds.len(), names: fds.iter().map(|f| f.name.clone().unwrap_or_default()).collect() }),
    }
}

/// What the process inherited from systemd, read once at start.
#[derive(Debug)]
pub struct Inherited {
    /// The control socket's listening descriptor, when socket-activated.
    pub control: Option<OwnedFd>,
    /// Where to send notifications, when started with Type=notify.
    pub notifier: Option<Notifier>,
    /// How often the watchdog wants to hear from us (already halved).
    pub watchdog_every: Option<Duration>,
}

fn take_var(name: &str) -> Option<OsString> {
    let value = std::env::var_os(name);
    // Removed at once: children must not see another process's descriptors
    // or notification socket as theirs.
    std::env::remove_var(name);
    value
}

fn utf8(name: &'static str, value: Option<OsString>) -> Result<Option<String>, SystemdError> {
    value.map(|v| v.into_string().map_err(|v| bad(name, &v.to_string_lossy(), "not UTF-8"))).transpose()
}

/// Reads and removes the systemd variables, takes the descriptors meant for
/// us (made close-on-exec) and opens the notification socket.
///
/// # Safety
/// Call once, at start, while the process is single-threaded (the
/// environment is changed) and before anything else takes descriptors
/// 3 and up: systemd's contract makes those the caller's alone.
pub unsafe fn inherit() -> Result<Inherited, SystemdError> {
    let vars = ListenVars { pid: utf8("LISTEN_PID", take_var("LISTEN_PID"))?, fds: utf8("LISTEN_FDS", take_var("LISTEN_FDS"))?, names: utf8("LISTEN_FDNAMES", take_var("LISTEN_FDNAMES"))? };
    let notify = take_var("NOTIFY_SOCKET");
    let watchdog_usec = utf8("WATCHDOG_USEC", take_var("WATCHDOG_USEC"))?;
    let watchdog_pid = utf8("WATCHDOG_PID", take_var("WATCHDOG_PID"))?;
    debug_assert!(LISTEN_VARS.iter().chain(NOTIFY_VARS.iter()).all(|v| std::env::var_os(v).is_none()));
    let my_pid = std::process::id();
    let fds = parse_listen(&vars, my_pid)?;
    let mut owned = Vec::new();
    for f in &fds {
        // SAFETY: F_SETFD on a number the caller's contract makes ours.
        if unsafe { libc::fcntl(f.fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io(format!("inherited descriptor {} (LISTEN_FDS)", f.fd))(std::io::Error::last_os_error()));
        }
        // SAFETY: systemd passed it to this pid; nothing else owns it.
        owned.push((f.fd, unsafe { OwnedFd::from_raw_fd(f.fd) }));
    }
    let control = select_control(&fds)?.map(|fd| owned.into_iter().find(|(n, _)| *n == fd).expect("selected from the list").1);
    let notifier = match notify {
        Some(addr) => Some(Notifier::open(&addr)?),
        None => None,
    };
    let watchdog_every = watchdog_interval(watchdog_usec.as_deref(), watchdog_pid.as_deref(), my_pid)?;
    Ok(Inherited { control, notifier, watchdog_every })
}

/// How often to ping the watchdog: half its timeout (sd_watchdog_enabled:
/// none when `WATCHDOG_USEC` is unset or `WATCHDOG_PID` names another
/// process).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Result<Option<Duration>, SystemdError> {
    let Some(text) = usec else { return Ok(None) };
    let usec: u64 = text.parse().map_err(|_| bad("WATCHDOG_USEC", text, "not a number of microseconds"))?;
    if usec == 0 {
        return Err(bad("WATCHDOG_USEC", text, "a watchdog of 0 µs cannot be kept"));
    }
    if let Some(pid_text) = pid {
        let pid: u32 = pid_text.parse().map_err(|_| bad("WATCHDOG_PID", pid_text, "not a process id"))?;
        if pid != my_pid {
            return Ok(None);
        }
    }
    // At least a millisecond apart: an absurdly short watchdog must not
    // turn the control thread into a busy loop of pings.
    Ok(Some(Duration::from_micros(usec / 2).max(MIN_WATCHDOG_PING)))
}

const MIN_WATCHDOG_PING: Duration = Duration::from_millis(1);

/// A listening control socket systemd handed over, checked to be what the
/// configuration names: a listening `AF_UNIX` `SOCK_STREAM` socket bound at
/// `socket` with a mode no wider than `socket_mode`. Anything else is
/// refused (fail closed: serving the root API on a socket we did not mean
/// would hand it to whoever made that socket).
pub fn checked_listener(fd: OwnedFd, socket: &Path, socket_mode: u32) -> Result<UnixListener, SystemdError> {
    let raw = fd.as_raw_fd();
    let not_ours = |reason: String| SystemdError::NotOurListener { fd: raw, reason };
    let domain = sockopt(raw, libc::SO_DOMAIN).map_err(|e| not_ours(format!("is not a socket ({e})")))?;
    if domain != libc::AF_UNIX {
        return Err(not_ours(format!("is not an AF_UNIX socket (domain {domain})")));
    }
    let kind = sockopt(raw, libc::SO_TYPE).map_err(|e| not_ours(format!("SO_TYPE: {e}")))?;
    if kind != libc::SOCK_STREAM {
        return Err(not_ours(format!("is not SOCK_STREAM (type {kind}; ListenStream= in the .socket unit)")));
    }
    if sockopt(raw, libc::SO_ACCEPTCONN).map_err(|e| not_ours(format!("SO_ACCEPTCONN: {e}")))? == 0 {
        return Err(not_ours("is not listening".into()));
    }
    let bound = bound_path(raw).map_err(|e| not_ours(format!("getsockname: {e}")))?;
    if !paths_match(bound.as_deref(), socket) {
        return Err(not_ours(format!(
            "is bound at {}, not at the configured socket {}",
            bound.map_or_else(|| "no path (unnamed or abstract)".to_string(), |p| p.display().to_string()),
            socket.display()
        )));
    }
    let meta = std::fs::metadata(socket).map_err(io(format!("stat {}", socket.display())))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
    if !mode_within(mode, socket_mode) {
        return Err(SystemdError::TooOpen { path: socket.display().to_string(), mode, wanted: socket_mode });
    }
    Ok(UnixListener::from(fd))
}

/// Whether a socket file of `mode` lets no one connect whom `allowed`
/// would not: connecting to a Unix socket takes write permission, so the
/// write bits are what count.
pub fn mode_within(mode: u32, allowed: u32) -> bool {
    mode & 0o222 & !allowed == 0
}

/// The bound path matches the configured one (both absolute; systemd binds
/// the path exactly as written in `ListenStream=`).
pub fn paths_match(bound: Option<&Path>, configured: &Path) -> bool {
    bound.is_some_and(|b| b == configured || std::fs::canonicalize(b).ok().zip(std::fs::canonicalize(configured).ok()).is_some_and(|(a, c)| a == c))
}

fn sockopt(fd: RawFd, option: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which lives for the call.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, option, (&mut value as *mut libc::c_int).cast(), &mut len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// The filesystem path a Unix socket is bound at (None: unnamed or abstract).
fn bound_path(fd: RawFd) -> std::io::Result<Option<PathBuf>> {
    // SAFETY: sockaddr_un is plain data; getsockname fills at most `len` bytes.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: as above; addr and len live for the call.
    if unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let path_len = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())].iter().map(|c| *c as u8).collect();
    Ok(sun_path(&bytes))
}

/// A `sun_path` as the kernel returns it: empty (unnamed) or starting with
/// NUL (abstract) is no path; otherwise up to the first NUL.
pub fn sun_path(bytes: &[u8]) -> Option<PathBuf> {
    if bytes.first().is_none_or(|b| *b == 0) {
        return None;
    }
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    Some(PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&bytes[..end])))
}

/// Where `NOTIFY_SOCKET` points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyAddr {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// `/path` or `@abstract`; anything else (vsock, relative paths) is refused.
pub fn parse_notify_socket(value: &[u8]) -> Result<NotifyAddr, SystemdError> {
    let shown = String::from_utf8_lossy(value);
    match value {
        [b'@', rest @ ..] if !rest.is_empty() => Ok(NotifyAddr::Abstract(rest.to_vec())),
        [b'/', ..] if !value.contains(&0) => Ok(NotifyAddr::Path(PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(value)))),
        _ => Err(bad("NOTIFY_SOCKET", &shown, "neither an absolute path nor @abstract (vsock is not supported)")),
    }
}

/// One notification datagram: `KEY=value` lines. Values with a newline
/// would forge another field, so they are refused.
pub fn notify_message(fields: &[(&str, &str)]) -> Option<String> {
    let mut out = String::new();
    for (key, value) in fields {
        if key.is_empty() || key.contains(['=', '\n']) || value.contains('\n') {
            return None;
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
        out.push('\n');
    }
    Some(out)
}

/// Sends notifications to the service manager (sd_notify(3)).
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    shown: String,
}

impl Notifier {
    pub fn open(value: &std::ffi::OsStr) -> Result<Notifier, SystemdError> {
        use std::os::linux::net::SocketAddrExt;
        let shown = value.to_string_lossy().into_owned();
        let addr = match parse_notify_socket(value.as_encoded_bytes())? {
            NotifyAddr::Path(p) => std::os::unix::net::SocketAddr::from_pathname(p),
            NotifyAddr::Abstract(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        }
        .map_err(io(format!("NOTIFY_SOCKET={shown}")))?;
        // std makes it close-on-exec: children do not inherit it.
        let socket = UnixDatagram::unbound().map_err(io("the notification socket"))?;
        Ok(Notifier { socket, addr, shown })
    }

    /// Sends `fields` in one datagram.
    pub fn send(&self, fields: &[(&str, &str)]) -> Result<(), SystemdError> {
        let message = notify_message(fields).ok_or_else(|| bad("NOTIFY_SOCKET", &self.shown, "a notification field with a newline"))?;
        self.socket.send_to_addr(message.as_bytes(), &self.addr).map_err(io(format!("notifying {}", self.shown)))?;
        Ok(())
    }

    pub fn ready(&self, status: &str) -> Result<(), SystemdError> {
        self.send(&[("READY", "1"), ("STATUS", status)])
    }

    pub fn status(&self, status: &str) -> Result<(), SystemdError> {
        self.send(&[("STATUS", status)])
    }

    pub fn watchdog(&self) -> Result<(), SystemdError> {
        self.send(&[("WATCHDOG", "1")])
    }

    /// A reload starts (`READY=1` ends it); MONOTONIC_USEC lets
    /// Type=notify-reload tell this reload from an earlier one.
    pub fn reloading(&self) -> Result<(), SystemdError> {
        let usec = monotonic_usec().to_string();
        self.send(&[("RELOADING", "1"), ("MONOTONIC_USEC", &usec), ("STATUS", "reloading policies")])
    }

    pub fn stopping(&self) -> Result<(), SystemdError> {
        self.send(&[("STOPPING", "1"), ("STATUS", "stopping; sandboxes stay enforced")])
    }
}

/// CLOCK_MONOTONIC in microseconds (what systemd compares MONOTONIC_USEC to).
fn monotonic_usec() -> u64 {
    // SAFETY: timespec is plain data filled by clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> ListenVars {
        ListenVars { pid: pid.map(str::to_string), fds: fds.map(str::to_string), names: names.map(str::to_string) }
    }

    #[test]
    fn listen_fds_are_taken_only_when_meant_for_this_process() {
        assert_eq!(parse_listen(&vars(None, Some("1"), None), 42).unwrap(), vec![], "no LISTEN_PID: inherited, not ours");
        assert_eq!(parse_listen(&vars(Some("41"), Some("1"), None), 42).unwrap(), vec![], "another pid's descriptors");
        assert_eq!(parse_listen(&vars(Some("42"), Some("0"), None), 42).unwrap(), vec![]);
        assert_eq!(parse_listen(&vars(Some("42"), Some("1"), None), 42).unwrap(), vec![ListenFd { fd: 3, name: None }]);
        assert_eq!(
            parse_listen(&vars(Some("42"), Some("2"), Some("control:other")), 42).unwrap(),
            vec![ListenFd { fd: 3, name: Some("control".into()) }, ListenFd { fd: 4, name: Some("other".into()) }]
        );
    }

    #[test]
    fn malformed_listen_variables_are_errors() {
        for (pid, fds, names) in [
            (Some("x"), Some("1"), None),
            (Some("0"), Some("1"), None),
            (Some("-1"), Some("1"), None),
            (Some("42"), None, None),
            (Some("42"), Some("one"), None),
            (Some("42"), Some("-1"), None),
            (Some("42"), Some("100000"), None),
            (Some("42"), Some("1"), Some("a:b")),
            (Some("42"), Some("2"), Some("control")),
            (Some("42"), Some(" 1"), None),
        ] {
            assert!(parse_listen(&vars(pid, fds, names), 42).is_err(), "{pid:?} {fds:?} {names:?}");
        }
    }

    #[test]
    fn the_control_socket_is_the_one_named_control() {
        let fd = |fd, name: Option<&str>| ListenFd { fd, name: name.map(str::to_string) };
        assert_eq!(select_control(&[]).unwrap(), None);
        assert_eq!(select_control(&[fd(3, None)]).unwrap(), Some(3));
        assert_eq!(select_control(&[fd(3, Some("control"))]).unwrap(), Some(3));
        let wrong = select_control(&[fd(3, Some("sbx-net.socket"))]).unwrap_err().to_string();
        assert!(wrong.contains("FileDescriptorName=control"), "{wrong}");
        assert!(select_control(&[fd(3, Some("control")), fd(4, Some("control"))]).is_err(), "two candidates: refuse, never guess");
        assert!(select_control(&[fd(3, None), fd(4, None)]).is_err());
    }

    #[test]
    fn watchdog_pings_at_half_the_timeout_when_meant_for_us() {
        assert_eq!(watchdog_interval(None, None, 7).unwrap(), None);
        assert_eq!(watchdog_interval(Some("30000000"), None, 7).unwrap(), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval(Some("30000000"), Some("7"), 7).unwrap(), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7).unwrap(), None, "another process's watchdog");
        assert_eq!(watchdog_interval(Some("1"), None, 7).unwrap(), Some(MIN_WATCHDOG_PING), "no busy loop");
        assert!(watchdog_interval(Some("0"), None, 7).is_err());
        assert!(watchdog_interval(Some("30s"), None, 7).is_err());
        assert!(watchdog_interval(Some("1000"), Some("x"), 7).is_err());
    }

    #[test]
    fn notify_socket_addresses() {
        assert_eq!(parse_notify_socket(b"/run/systemd/notify").unwrap(), NotifyAddr::Path("/run/systemd/notify".into()));
        assert_eq!(parse_notify_socket(b"@sd-notify/1").unwrap(), NotifyAddr::Abstract(b"sd-notify/1".to_vec()));
        for bad in [&b""[..], b"@", b"relative/sock", b"vsock:2:1234", b"/a\0b"] {
            assert!(parse_notify_socket(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn notify_messages_cannot_smuggle_fields() {
        assert_eq!(notify_message(&[("READY", "1"), ("STATUS", "serving 3 sandboxes")]).unwrap(), "READY=1\nSTATUS=serving 3 sandboxes\n");
        assert_eq!(notify_message(&[("STATUS", "x\nREADY=1")]), None);
        assert_eq!(notify_message(&[("A=B", "1")]), None);
        assert_eq!(notify_message(&[("", "1")]), None);
    }

    #[test]
    fn socket_paths_and_modes() {
        assert_eq!(sun_path(b"/run/sbx-net/sbx-net.sock\0\0"), Some(PathBuf::from("/run/sbx-net/sbx-net.sock")));
        assert_eq!(sun_path(b""), None, "unnamed");
        assert_eq!(sun_path(b"\0abstract"), None);
        assert!(paths_match(Some(Path::new("/run/sbx-net/sbx-net.sock")), Path::new("/run/sbx-net/sbx-net.sock")));
        assert!(!paths_match(Some(Path::new("/run/other.sock")), Path::new("/run/sbx-net/sbx-net.sock")));
        assert!(!paths_match(None, Path::new("/run/sbx-net/sbx-net.sock")));
        assert!(mode_within(0o600, 0o600));
        assert!(mode_within(0o700, 0o600) && mode_within(0o644, 0o600), "only write lets anyone connect");
        assert!(!mode_within(0o620, 0o600) && !mode_within(0o602, 0o600) && !mode_within(0o666, 0o600));
        assert!(mode_within(0o660, 0o660));
    }

    #[test]
    fn an_inherited_listener_is_checked_before_use() {
        let dir = std::env::temp_dir().join(format!("sbx-systemd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let fd = || OwnedFd::from(listener.try_clone().unwrap());
        checked_listener(fd(), &path, 0o600).expect("the configured listening socket");
        let other = checked_listener(fd(), &dir.join("other.sock"), 0o600).unwrap_err().to_string();
        assert!(other.contains("not at the configured socket"), "{other}");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        assert!(matches!(checked_listener(fd(), &path, 0o600), Err(SystemdError::TooOpen { .. })));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let not_listening = checked_listener(OwnedFd::from(a), &path, 0o600).unwrap_err().to_string();
        assert!(not_listening.contains("not listening"), "{not_listening}");
        let datagram = UnixDatagram::unbound().unwrap();
        assert!(checked_listener(OwnedFd::from(datagram), &path, 0o600).unwrap_err().to_string().contains("SOCK_STREAM"));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(checked_listener(OwnedFd::from(tcp), &path, 0o600).unwrap_err().to_string().contains("AF_UNIX"));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(checked_listener(OwnedFd::from(file), &path, 0o600).unwrap_err().to_string().contains("not a socket"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        use std::os::linux::net::SocketAddrExt;
        let dir = std::env::temp_dir().join(format!("sbx-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::open(path.as_os_str()).unwrap();
        notifier.ready("serving").unwrap();
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving\n");
        let name = format!("sbx-notify-test-{}", std::process::id());
        let abstract_receiver = UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let notifier = Notifier::open(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
        notifier.reloading().unwrap();
        let n = abstract_receiver.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC=") && text.ends_with("STATUS=reloading policies\n"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
