//! The systemd units and the daemon under the environment systemd gives it,
//! without systemd as PID 1: (a) `systemd-analyze verify` on both units;
//! (b) socket activation and notifications — the test binds the control
//! socket itself and passes it as descriptor 3 (`LISTEN_FDS=1`,
//! `LISTEN_FDNAMES=control`, `LISTEN_PID` set in the child to its own pid
//! before it execs the daemon, as systemd does), reads `NOTIFY_SOCKET`
//! itself: `READY=1` only once sandboxes are re-adopted and the socket is
//! served, `WATCHDOG=1` pings, `STOPPING=1` at SIGTERM, nothing of it
//! inherited by the data plane; (c) a CLI call made while the daemon is
//! down but the socket held waits and is answered by the next daemon;
//! (d) the daemon enforces with exactly the capability set the unit names.
//!
//! The set is held to its measurement both ways on every run: the session
//! passes with exactly it, and fails without any one of it
//! (`each_of_the_units_capabilities_is_needed`; how the set was found is in
//! packaging/systemd/CAPABILITIES.md).

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sbx_net_tests::daemon::{sbx_net_bin, DaemonHarness};
use sbx_net_tests::https::{HttpsEcho, TestCa};
use sbx_net_tests::{curl_head, require_root, require_tool, run_in, tcp_connects, try_wait_for, unique_name, wait_for, wait_until, WorldDns, WorldServers};

const SECRET: &str = "sbx-systemd-secret-81c2";
const API: &str = "198.51.100.90";
const DENIED: &str = "198.51.100.91";
const PORT: u16 = 8080;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(repo_file(&format!("packaging/systemd/{name}"))).unwrap_or_else(|e| panic!("packaging/systemd/{name}: {e}"))
}

/// The capabilities `CapabilityBoundingSet=` of sbx-net.service names, as
/// setpriv spells them (`net_admin`).
fn unit_capabilities() -> Vec<String> {
    let text = unit_text("sbx-net.service");
    let line = text.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("CapabilityBoundingSet= in sbx-net.service");
    let caps: Vec<String> = line.split_whitespace().map(|c| c.strip_prefix("CAP_").expect("CAP_ names").to_ascii_lowercase()).collect();
    assert!(!caps.is_empty());
    caps
}

// ---------------------------------------------------------------- (a)

/// `systemd-analyze verify` on copies of both units whose ExecStart and
/// ExecReload run the built binary (verify checks the executables exist);
/// any line it prints about our units fails the test.
#[test]
fn units_pass_systemd_analyze_verify() {
    require_tool("systemd-analyze");
    let dir = std::env::temp_dir().join(unique_name("units"));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = sbx_net_bin();
    for name in ["sbx-net.service", "sbx-net.socket"] {
        let text = unit_text(name).replace("/usr/bin/sbx-net", &bin.display().to_string());
        std::fs::write(dir.join(name), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(dir.join("sbx-net.socket"))
        .arg(dir.join("sbx-net.service"))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze");
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ours: Vec<&str> = printed.lines().filter(|l| l.contains("sbx-net")).collect();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify ({}):\n{printed}", out.status);

    // The exit statuses RestartPreventExitStatus= names: a bad config file
    // is EX_CONFIG (78), before anything is touched.
    let bad = std::env::temp_dir().join(format!("{}.toml", unique_name("badcfg")));
    std::fs::write(&bad, "no_such_setting = 1\n").unwrap();
    let out = Command::new(&bin).args(["daemon", "--config"]).arg(&bad).output().unwrap();
    std::fs::remove_file(&bad).unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    let prevented = unit_text("sbx-net.service").lines().find_map(|l| l.strip_prefix("RestartPreventExitStatus=").map(str::to_string)).expect("RestartPreventExitStatus=");
    for code in ["64", "75", "78"] {
        assert!(prevented.split_whitespace().any(|c| c == code), "{prevented}");
    }

    // The unit says what the daemon relies on.
    let service = unit_text("sbx-net.service");
    for wanted in ["Type=notify", "KillMode=process", "ExecReload=/usr/bin/sbx-net policy reload", "RuntimeDirectoryPreserve=yes", "WatchdogSec="] {
        assert!(service.lines().any(|l| l.starts_with(wanted)), "sbx-net.service lacks {wanted}");
    }
    let socket = unit_text("sbx-net.socket");
    for wanted in ["ListenStream=/run/sbx-net/sbx-net.sock", "SocketMode=0600", &format!("FileDescriptorName={}", sbx_net::control::systemd::CONTROL_FD_NAME)] {
        assert!(socket.lines().any(|l| l == wanted), "sbx-net.socket lacks {wanted}");
    }
}

// ------------------------------------------------- the systemd launcher

/// How a daemon is started: what systemd would give it.
#[derive(Default)]
struct Launch<'a> {
    /// The control socket, passed as descriptor 3.
    listener: Option<&'a UnixListener>,
    notify: Option<&'a Path>,
    watchdog_usec: Option<u64>,
    /// Capabilities (setpriv names) of the bounding, inheritable and
    /// ambient sets; None: all of root's.
    caps: Option<&'a [String]>,
}

/// A daemon started the way systemd starts it, in the harness's host
/// namespace (`nsenter --net`: the daemon stays in the test's mount
/// namespace, where the bpffs is, as under systemd; `ip netns exec` would
/// need capabilities of its own to rejoin it). Killed on drop, before the
/// harness cleans up.
struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    fn spawn(h: &DaemonHarness, launch: &Launch) -> Daemon {
        require_tool("nsenter");
        require_tool("sh");
        // `ip netns exec HOST BIN daemon FLAGS…`: the daemon's command line.
        let args = h.daemon_args();
        let (netns, daemon) = (&args[2], &args[3..]);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(h.dir.join("daemon.log")).expect("daemon log");
        // systemd sets LISTEN_PID in the forked child to the child's own
        // pid; `exec` keeps the pid through sh, nsenter and setpriv.
        let mut command = Command::new("sh");
        command.arg("-c");
        command.arg(if launch.listener.is_some() { "LISTEN_PID=$$ exec \"$@\"" } else { "exec \"$@\"" });
        command.arg("sh").arg("nsenter").arg(format!("--net=/run/netns/{netns}")).arg("--");
        if let Some(caps) = launch.caps {
            require_tool("setpriv");
            let set = std::iter::once("-all".to_string()).chain(caps.iter().map(|c| format!("+{c}"))).collect::<Vec<_>>().join(",");
            command.arg("setpriv").arg(format!("--bounding-set={set}")).arg(format!("--inh-caps={set}")).arg(format!("--ambient-caps={set}")).arg("--");
        }
        command.args(daemon);
        command
            .env("RUST_LOG", std::env::var("SBX_NET_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut _kept = Vec::new();
        if let Some(listener) = launch.listener {
            command.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", sbx_net::control::systemd::CONTROL_FD_NAME);
            _kept = sbx_net::util::fd_pass::pass_to_child(&mut command, &[listener.as_fd()]).expect("pass the listener");
        }
        if let Some(path) = launch.notify {
            command.env("NOTIFY_SOCKET", path);
        }
        if let Some(usec) = launch.watchdog_usec {
            command.env("WATCHDOG_USEC", usec.to_string());
        }
        Daemon { child: Some(command.spawn().expect("spawn the daemon")) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` and waits (at most 30 s) for the exit status.
    fn stop(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        wait_for(Duration::from_secs(30), "the daemon to exit", || child.try_wait().ok().flatten())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The test's end of `NOTIFY_SOCKET`: every datagram, with when it came.
struct NotifyReader {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifyReader {
    fn bind(path: PathBuf) -> NotifyReader {
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::downgrade(&got);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Ends when the reader is dropped.
            while let Some(got) = sink.upgrade() {
                if let Ok(n) = socket.recv(&mut buf) {
                    got.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
        });
        NotifyReader { path, got }
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.got.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.got.lock().unwrap().clear();
    }

    /// The first message with `field` (`READY=1`), waited for.
    fn wait_for(&self, field: &str, deadline: Duration) -> (Instant, String) {
        wait_for(deadline, field, || self.messages().into_iter().find(|(_, m)| m.lines().any(|l| l == field)))
    }

    fn count(&self, field: &str) -> usize {
        self.messages().iter().filter(|(_, m)| m.lines().any(|l| l == field)).count()
    }
}

/// The control socket as a .socket unit makes it.
fn bind_control_socket(h: &DaemonHarness) -> UnixListener {
    let listener = UnixListener::bind(&h.socket).expect("bind the control socket");
    std::fs::set_permissions(&h.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    listener
}

fn environ(pid: u64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).filter(|v| !v.is_empty()).collect()
}

/// The process whose command line has every one of `parts`.
fn pid_running(parts: &[&str]) -> Option<u64> {
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: u64 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?).into_owned();
        parts.iter().all(|p| cmdline.contains(p)).then_some(pid)
    })
}

/// The inodes of the sockets process `pid` holds.
fn socket_inodes(pid: u64) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn policy(secret_file: &Path) -> String {
    format!(
        "name = \"agent\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\"]\n\
         [[credentials]]\nname = \"api\"\nhosts = [\"api.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{}\" }}\n",
        secret_file.display()
    )
}

/// A prepared (not started) harness with the `agent` policy and a world:
/// api.test (HTTPS with a credential, and a TCP port), denied.test.
struct World {
    h: DaemonHarness,
    _servers: (WorldDns, [HttpsEcho; 2], WorldServers),
}

impl World {
    fn prepare(tag: &str) -> World {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new(&dir);
        let secret_file = dir.join("token");
        std::fs::write(&secret_file, SECRET).unwrap();
        let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
        let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
        let text = policy(&secret_file);
        let h = DaemonHarness::prepared(tag, &[("agent.toml", text.as_str())], None, &[upstream.as_str(), upstream_ca.as_str()]);
        for a in [API, DENIED] {
            h.topology.add_world_address(ip(a));
        }
        let dns = WorldDns::start(&h.topology.world, &[format!("api.test,{API},300"), format!("denied.test,{DENIED},300")], &[]);
        let https = [
            HttpsEcho::start(&h.topology.world, SocketAddr::new(ip(API), 443), &["api.test"], &ca, SECRET),
            HttpsEcho::start(&h.topology.world, SocketAddr::new(ip(DENIED), 443), &["denied.test"], &ca, ""),
        ];
        let tcp = WorldServers::start(&h.topology.world, &[ip(API), ip(DENIED)], PORT);
        World { h, _servers: (dns, https, tcp) }
    }
}

fn wait_serving(h: &DaemonHarness, daemon: &mut Daemon, deadline: Duration) -> Result<(), String> {
    let started = Instant::now();
    loop {
        if h.cli(&["status"]).status.success() {
            return Ok(());
        }
        if let Some(status) = daemon.exited() {
            return Err(format!("daemon exited with {status}"));
        }
        if started.elapsed() > deadline {
            return Err(format!("daemon did not answer within {deadline:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- (b)

#[test]
fn notifies_ready_after_readoption_pings_the_watchdog_and_says_stopping() {
    require_root();
    let w = World::prepare("sdn");
    let h = &w.h;
    let listener = bind_control_socket(h);
    let notify = NotifyReader::bind(h.dir.join("notify.sock"));
    let launch = Launch { listener: Some(&listener), notify: Some(&notify.path), watchdog_usec: Some(1_000_000), caps: None };

    // First start: nothing to adopt.
    let mut daemon = Daemon::spawn(h, &launch);
    let (_, ready) = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(ready.contains("STATUS=serving 0 sandbox(es)"), "{ready}");
    // The launcher did what systemd does: LISTEN_PID is the daemon's pid.
    assert!(environ(u64::from(daemon.pid())).contains(&format!("LISTEN_PID={}", daemon.pid())), "{:?}", environ(u64::from(daemon.pid())));
    let out = h.cli(&["status"]);
    assert!(out.status.success(), "READY=1 came before the daemon served: {}", String::from_utf8_lossy(&out.stderr));
    let guest_name = unique_name("g");
    let guest = h.create_guest(&guest_name, "agent");
    let ns = guest["netns"].as_str().unwrap().to_string();

    // Nothing systemd gave the daemon reaches what it starts.
    let plane = h.json(&["status", "--json"])["dataplane"]["pid"].as_u64().expect("data plane pid");
    let pump = pid_running(&["__guest-pump", &guest_name]).expect("the guest's pump");
    let listener_inode = std::fs::metadata(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&listener))).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    for pid in [plane, pump] {
        let env = environ(pid);
        assert!(!env.iter().any(|v| ["LISTEN_PID=", "LISTEN_FDS=", "LISTEN_FDNAMES=", "NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="].iter().any(|p| v.starts_with(p))), "pid {pid} inherited {env:?}");
        assert!(!socket_inodes(pid).contains(&listener_inode), "pid {pid} holds the control socket");
    }

    // WATCHDOG=1 every WATCHDOG_USEC/2, from the control thread.
    let before = notify.count("WATCHDOG=1");
    wait_until(Duration::from_secs(10), "three watchdog pings", || notify.count("WATCHDOG=1") >= before + 3);

    // `policy reload` (ExecReload): RELOADING=1, then READY=1 again.
    notify.clear();
    h.cli_ok(&["policy", "reload"]);
    let (reloading_at, reloading) = notify.wait_for("RELOADING=1", Duration::from_secs(5));
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading}");
    let (ready_at, _) = notify.wait_for("READY=1", Duration::from_secs(5));
    assert!(ready_at >= reloading_at);

    // SIGKILL (a crash): the sandbox stays; the next daemon on the same
    // socket says READY=1 only after re-adopting it.
    assert!(daemon.stop(libc::SIGKILL).signal() == Some(libc::SIGKILL));
    notify.clear();
    let mut daemon = Daemon::spawn(h, &launch);
    let (_, ready) = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(ready.contains("STATUS=serving 1 sandbox(es)"), "READY=1 before the sandbox was re-adopted: {ready}");
    assert!(h.log().contains("adopted the running data plane"), "{}", h.log());
    let (code, body) = curl_head(&ns, &["https://api.test/after-restart"]);
    assert!(code == Some(0) && body.contains("authorization: <injected>"), "{body}");

    // SIGTERM: STOPPING=1, exit 0, and systemd's socket stays where it is.
    notify.clear();
    assert!(daemon.stop(libc::SIGTERM).success(), "{}", h.log());
    notify.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(h.socket.exists(), "the daemon unlinked systemd's socket");
    drop(listener);
}

/// A second daemon is still refused while one serves on systemd's socket,
/// and a descriptor that is not the configured socket is refused.
#[test]
fn a_second_instance_and_a_wrong_socket_are_refused() {
    require_root();
    let w = World::prepare("sd2");
    let h = &w.h;
    let listener = bind_control_socket(h);
    let mut daemon = Daemon::spawn(h, &Launch { listener: Some(&listener), ..Default::default() });
    wait_serving(h, &mut daemon, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}:\n{}", h.log()));
    let out = h.run_other_daemon(h.topology.host.name(), &[], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(75), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another sbx-net daemon"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(daemon.stop(libc::SIGTERM).success());

    // A socket bound elsewhere than --socket: refused before anything starts.
    let stray_path = h.dir.join("stray.sock");
    let stray = UnixListener::bind(&stray_path).unwrap();
    let mut wrong = Daemon::spawn(h, &Launch { listener: Some(&stray), ..Default::default() });
    let status = wait_for(Duration::from_secs(30), "the daemon to refuse", || wrong.exited());
    assert_eq!(status.code(), Some(78), "EX_CONFIG: the unit does not restart it");
    assert!(h.log().contains("not at the configured socket"), "{}", h.log());
}

// ---------------------------------------------------------------- (c)

#[test]
fn a_cli_call_during_a_restart_waits_and_is_answered() {
    require_root();
    let w = World::prepare("sdc");
    let h = &w.h;
    let listener = bind_control_socket(h);
    let launch = Launch { listener: Some(&listener), ..Default::default() };
    let mut daemon = Daemon::spawn(h, &launch);
    wait_serving(h, &mut daemon, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}:\n{}", h.log()));
    assert!(daemon.stop(libc::SIGTERM).success(), "{}", h.log());

    // The daemon is gone; systemd (the test) still holds the socket.
    let mut call = Command::new(sbx_net_bin()).arg("--socket").arg(&h.socket).arg("status").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let waited = try_wait_for(Duration::from_secs(2), || call.try_wait().ok().flatten());
    assert!(waited.is_none(), "the call did not wait for the next daemon: {waited:?}");
    let _daemon = Daemon::spawn(h, &launch);
    let status = wait_for(Duration::from_secs(60), "the waiting call to be answered", || call.try_wait().ok().flatten());
    let mut out = String::new();
    call.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success() && out.contains("sbx-net daemon"), "{status}: {out}\n{}", h.log());
}

// ---------------------------------------------------------------- (d)

/// What an operator does, each step checked; the first that fails is the
/// error (with the daemon's log tail). Used by (d) with the unit's set and
/// by the measurement with sets one capability short.
fn operator_session(tag: &str, caps: &[String]) -> Result<(), String> {
    let w = World::prepare(tag);
    let h = &w.h;
    let launch = Launch { caps: Some(caps), ..Default::default() };
    let tail = |h: &DaemonHarness| {
        let log = h.log();
        let lines: Vec<&str> = log.lines().rev().take(6).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    let fail = |step: &str, why: String| Err(format!("{step}: {why}\n{}", tail(h)));
    let cli = |args: &[&str]| {
        let out = h.cli(args);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()).ok_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string())
    };
    let mut daemon = Daemon::spawn(h, &launch);
    if let Err(e) = wait_serving(h, &mut daemon, Duration::from_secs(30)) {
        return fail("start", e);
    }
    let guest_name = unique_name("g");
    let guest: serde_json::Value = match cli(&["sandbox", "create", &guest_name, "--policy", "agent", "--netns-guest"]) {
        Ok(out) => serde_json::from_str(&out).map_err(|e| e.to_string())?,
        Err(e) => return fail("sandbox create --netns-guest", e),
    };
    let ns = guest["netns"].as_str().unwrap_or_default().to_string();
    let traffic = |when: &str| -> Result<(), String> {
        let (code, body) = curl_head(&ns, &["https://api.test/x"]);
        if code != Some(0) || !body.contains("authorization: <injected>") {
            return fail(&format!("{when}: HTTPS through the credential proxy (DNS proxy, TLS termination, secret)"), format!("curl {code:?}: {body}"));
        }
        if !tcp_connects(&ns, ip(API), PORT) {
            return fail(&format!("{when}: TCP to api.test's learned address"), "refused".into());
        }
        let (code, _) = curl_head(&ns, &["https://denied.test/"]);
        if code == Some(0) {
            return fail(&format!("{when}: denied.test"), "reached".into());
        }
        if tcp_connects(&ns, ip(DENIED), PORT) {
            return fail(&format!("{when}: TCP to an unlisted address"), "connected".into());
        }
        Ok(())
    };
    traffic("netns guest")?;
    let vm_name = unique_name("v");
    let kvm = Path::new("/dev/kvm").exists();
    let mut vm_pid = None;
    let mut vm_guard = VmGuard(None);
    if kvm {
        // The guest resolves through the DNS proxy, then stays up: a
        // running VMM (uid nobody) is re-adopted and stopped by delete.
        let probe = h.dir.join("probe.txt");
        std::fs::write(&probe, "timeout 3000\nresolve api.test\nsleep 600000\n").unwrap();
        let info: serde_json::Value = match cli(&["sandbox", "create", &vm_name, "--policy", "agent", "--vm", "--probe", probe.to_str().unwrap()]) {
            Ok(out) => serde_json::from_str(&out).map_err(|e| e.to_string())?,
            Err(e) => return fail("sandbox create --vm", e),
        };
        vm_pid = info["vm"]["pid"].as_u64();
        vm_guard.0 = vm_pid.map(|pid| (pid, vm_name.clone()));
        let console = PathBuf::from(info["vm"]["console"].as_str().unwrap_or_default());
        let resolved = try_wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(&console).ok().filter(|c| c.lines().any(|l| l.contains(r#""op":"resolve""#)))
        });
        match resolved {
            Some(c) if c.lines().any(|l| l.contains(r#""op":"resolve""#) && l.contains(r#""ok":true"#)) => {}
            other => return fail("the VM's guest resolving api.test", format!("console: {other:?}")),
        }
    }
    if let Err(e) = cli(&["policy", "reload"]) {
        return fail("policy reload", e);
    }
    let status = daemon.stop(libc::SIGTERM);
    if !status.success() {
        return fail("stop (SIGTERM)", status.to_string());
    }
    traffic("daemon stopped")?;
    let mut daemon = Daemon::spawn(h, &launch);
    if let Err(e) = wait_serving(h, &mut daemon, Duration::from_secs(30)) {
        return fail("restart", e);
    }
    match cli(&["sandbox", "list", "--json"]) {
        Ok(list) if list.contains(&guest_name) && (!kvm || list.contains(&vm_name)) => {}
        other => return fail("restart: sandboxes re-adopted", format!("{other:?}")),
    }
    if h.log().contains("re-adopting:") {
        return fail("restart: re-adoption", "an error was logged".into());
    }
    if kvm {
        match cli(&["sandbox", "show", &vm_name]) {
            Ok(shown) if shown.contains(r#""state": "running""#) => {}
            other => return fail("restart: the running VM re-adopted", format!("{other:?}")),
        }
    }
    traffic("after restart")?;
    for name in [guest_name.as_str()].into_iter().chain(kvm.then_some(vm_name.as_str())) {
        if let Err(e) = cli(&["sandbox", "delete", name]) {
            return fail("sandbox delete", e);
        }
    }
    if run_in(h.topology.host.name(), "ip", &["link", "show", guest["tap"].as_str().unwrap_or("-")]).status.success() {
        let gone = try_wait_for(Duration::from_secs(10), || (!run_in(h.topology.host.name(), "ip", &["link", "show", guest["tap"].as_str().unwrap()]).status.success()).then_some(()));
        if gone.is_none() {
            return fail("sandbox delete: the tap is removed", "still there".into());
        }
    }
    if let Some(pid) = vm_pid {
        let gone = || std::fs::read_to_string(format!("/proc/{pid}/status")).map_or(true, |s| s.lines().any(|l| l.starts_with("State:") && l.contains('Z')));
        if try_wait_for(Duration::from_secs(10), || gone().then_some(())).is_none() {
            return fail("sandbox delete: the VMM stops", format!("pid {pid} still runs"));
        }
    }
    let status = daemon.stop(libc::SIGTERM);
    if !status.success() {
        return fail("stop", status.to_string());
    }
    Ok(())
}

/// Kills a sandbox's VMM the session leaves behind (a delete that could not
/// stop it, without CAP_KILL: the sandbox is gone from the state, so
/// `daemon --cleanup` no longer knows it), if that pid is still it.
struct VmGuard(Option<(u64, String)>);

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Some((pid, name)) = self.0.take() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&name) {
                // SAFETY: kill on a pid just checked to be the session's VMM.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn enforces_with_exactly_the_units_capabilities() {
    require_root();
    let caps = unit_capabilities();
    operator_session("sdd", &caps).unwrap_or_else(|e| panic!("with CapabilityBoundingSet {caps:?}: {e}"));
}

/// The other half of the measurement behind CapabilityBoundingSet= (how
/// the set was found: packaging/systemd/CAPABILITIES.md): the unit keeps
/// nothing it does not need. Without any one of its capabilities, the
/// operator session fails.
#[test]
fn each_of_the_units_capabilities_is_needed() {
    require_root();
    let caps = unit_capabilities();
    for cap in &caps {
        let without: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        match operator_session("sdn", &without) {
            Ok(()) => panic!("the operator session passes without {cap}: CapabilityBoundingSet {caps:?} keeps more than it needs"),
            Err(e) => eprintln!("without {cap}: {}", e.lines().next().unwrap_or("")),
        }
    }
}
