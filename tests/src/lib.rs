//! Test support for sbx-net: the host/world/guest namespace topology, world
//! servers, real-tool helpers and a crafted-frame builder.
//!
//! Network rule: nothing here touches the root namespace's routes, nftables
//! or forwarding. Every namespace is created with a unique name and removed
//! on drop, also when a test panics.

pub mod daemon;
pub mod dns_attack;
pub mod etcd;
pub mod frames;
pub mod guest_code;
pub mod https;
pub mod live_load;
pub mod prometheus;
pub mod tools;

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sbx_vmm::netlink::write_sysctl;
use sbx_vmm::{NetNs, Netlink};

/// Host side of the host↔world link ("uplink").
pub const UPLINK_HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const UPLINK_WORLD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const UPLINK_HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
pub const UPLINK_WORLD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 2);

/// A unique prefix for this process's namespaces and sandbox names.
pub fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!("sbxt{}-{}-{tag}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// `host` (daemon side, kernel defaults: forwarding is the daemon's to turn
/// on) and `world` (the internet), joined
/// by a veth pair; the world routes the sandbox pools back to the host.
pub struct Topology {
    pub host: NetNs,
    pub world: NetNs,
    pub host_netlink: Netlink,
    pub world_netlink: Netlink,
    world_lo: u32,
}

impl Topology {
    pub fn new(tag: &str) -> Topology {
        let base = unique_name(tag);
        let host = NetNs::create(&format!("{base}-h")).expect("create host netns");
        let world = NetNs::create(&format!("{base}-w")).expect("create world netns");
        let host_nl = Netlink::in_namespace(&host).expect("netlink in host");
        let world_nl = Netlink::in_namespace(&world).expect("netlink in world");

        host_nl.set_up(host_nl.link_index("lo").unwrap()).unwrap();
        let world_lo = world_nl.link_index("lo").unwrap();
        world_nl.set_up(world_lo).unwrap();
        // Every address here is ours: no duplicate address detection, which
        // would hold IPv6 on the uplink for a second or two. In the host
        // namespace only on the test's own link: the rest keeps the
        // kernel's defaults.
        for key in ["net.ipv6.conf.default.accept_dad", "net.ipv6.conf.all.accept_dad"] {
            write_sysctl(&world, key, "0").expect("accept_dad");
        }

        host_nl.add_veth("uplink", "world0").expect("veth");
        write_sysctl(&host, "net.ipv6.conf.uplink.accept_dad", "0").expect("accept_dad on the uplink");
        let peer = host_nl.link_index("world0").unwrap();
        host_nl.move_to_namespace(peer, std::os::fd::AsFd::as_fd(&world)).unwrap();
        let uplink = host_nl.link_index("uplink").unwrap();
        let world0 = world_nl.link_index("world0").unwrap();
        host_nl.add_address(uplink, UPLINK_HOST_V4.into(), 24).unwrap();
        host_nl.add_address(uplink, UPLINK_HOST_V6.into(), 64).unwrap();
        world_nl.add_address(world0, UPLINK_WORLD_V4.into(), 24).unwrap();
        world_nl.add_address(world0, UPLINK_WORLD_V6.into(), 64).unwrap();
        host_nl.set_up(uplink).unwrap();
        world_nl.set_up(world0).unwrap();
        host_nl.add_route_v4(Ipv4Addr::UNSPECIFIED, 0, Some(UPLINK_WORLD_V4), uplink).unwrap();
        host_nl.add_route_v6(Ipv6Addr::UNSPECIFIED, 0, Some(UPLINK_WORLD_V6), uplink).unwrap();
        world_nl.add_route_v4(Ipv4Addr::new(10, 200, 0, 0), 16, Some(UPLINK_HOST_V4), world0).unwrap();
        world_nl
            .add_route_v6("fd73:6278::".parse().unwrap(), 32, Some(UPLINK_HOST_V6), world0)
            .unwrap();
        Topology { host, world, host_netlink: host_nl, world_netlink: world_nl, world_lo }
    }

    /// Gives the world an "internet" address (on its loopback).
    pub fn add_world_address(&self, ip: IpAddr) {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        self.world_netlink.add_address(self.world_lo, ip, len).expect("world address");
    }

    /// Moves the calling thread into the host namespace (the datapath,
    /// taps and TCX attachments are made from there).
    pub fn enter_host(&self) {
        self.host.enter_current_thread().expect("enter host netns");
    }
}

/// Polls `probe` until it returns a value or `deadline` has passed since
/// the call (it is asked once more at the deadline); None on timeout. The
/// pause between probes grows from 5 ms to 200 ms: quick when the answer
/// comes at once, light on a loaded machine when it does not.
pub fn try_wait_for<T>(deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        let elapsed = started.elapsed();
        if elapsed >= deadline {
            return None;
        }
        std::thread::sleep(pause.min(deadline - elapsed));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Like [`try_wait_for`], panicking with `what` and the time waited when
/// the deadline passes.
pub fn wait_for<T>(deadline: Duration, what: &str, probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    try_wait_for(deadline, probe).unwrap_or_else(|| panic!("timed out after {:.1?} waiting for {what}", started.elapsed()))
}

/// Waits until `condition` holds; panics with `what` and the time waited
/// when `deadline` passes. Tests wait on the condition a fixed sleep would
/// only guess at, so a loaded machine makes them slower, not wrong.
pub fn wait_until(deadline: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    wait_for(deadline, what, || condition().then_some(()))
}

/// Panics with "PROGRAM not found (package P)" unless `program` (a name on
/// PATH, or a path) can be run: a missing tool must not read as empty
/// output and a product bug.
pub fn require_tool(program: &str) -> PathBuf {
    tools::locate(program).unwrap_or_else(|message| panic!("{message}"))
}

/// `program` in the current namespace, checked with [`require_tool`].
pub fn host_command(program: &str) -> Command {
    require_tool(program);
    Command::new(program)
}

/// `ip netns exec ns program`, both programs checked with [`require_tool`];
/// the caller adds arguments and stdio.
pub fn netns_command(ns: &str, program: &str) -> Command {
    require_tool("ip");
    require_tool(program);
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns, program]);
    command
}

/// Runs `program args…` inside namespace `ns` with `ip netns exec`.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Output {
    netns_command(ns, program).args(args).output().unwrap_or_else(|e| panic!("running {program} in {ns}: {e}"))
}

/// Runs a `sh -c` script inside namespace `ns`. `programs` are the ones the
/// script runs: each is checked before, and `cargo xtask test`'s tool
/// check reads them from the call (it cannot see into the script).
pub fn shell_in(ns: &str, programs: &[&str], script: &str) -> Output {
    for program in programs {
        require_tool(program);
    }
    run_in(ns, "sh", &["-c", script])
}

/// A TCP socket as /proc/net/tcp shows it.
#[derive(Debug, PartialEq, Eq)]
struct TcpSocket {
    local: SocketAddr,
    remote: SocketAddr,
    /// As the kernel numbers TCP states.
    state: u8,
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0a;

/// TCP sockets of namespace `ns` (/proc/net/tcp and tcp6).
fn tcp_sockets(ns: &str) -> Vec<TcpSocket> {
    let netns = NetNs::open(ns).unwrap_or_else(|e| panic!("opening namespace {ns}: {e}"));
    let tables = netns
        .run(|| ["tcp", "tcp6"].map(|t| std::fs::read_to_string(format!("/proc/thread-self/net/{t}")).unwrap_or_default()))
        .unwrap_or_else(|e| panic!("entering namespace {ns}: {e}"));
    tables.iter().flat_map(|t| t.lines().skip(1).filter_map(parse_proc_net_tcp_line)).collect()
}

/// `  0: 0100007F:1F90 00000000:0000 0A …`: addresses are the kernel's
/// 32-bit words printed in host byte order, ports in hex.
fn parse_proc_net_tcp_line(line: &str) -> Option<TcpSocket> {
    let endpoint = |text: &str| -> Option<SocketAddr> {
        let (addr, port) = text.split_once(':')?;
        let mut bytes = Vec::with_capacity(16);
        for word in addr.as_bytes().chunks(8) {
            let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        let ip = match bytes.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
            16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
            _ => return None,
        };
        Some(SocketAddr::new(ip, u16::from_str_radix(port, 16).ok()?))
    };
    let mut fields = line.split_whitespace().skip(1);
    let local = endpoint(fields.next()?)?;
    let remote = endpoint(fields.next()?)?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    Some(TcpSocket { local, remote, state })
}

/// Whether a socket in namespace `ns` listens on TCP `port` (any address).
pub fn tcp_listening(ns: &str, port: u16) -> bool {
    tcp_sockets(ns).iter().any(|s| s.state == TCP_LISTEN && s.local.port() == port)
}

/// Whether a socket in namespace `ns` listens on `addr` itself.
pub fn tcp_listening_on(ns: &str, addr: SocketAddr) -> bool {
    tcp_sockets(ns).iter().any(|s| s.state == TCP_LISTEN && s.local == addr)
}

/// Whether namespace `ns` has an established TCP connection to `remote`.
pub fn tcp_established_to(ns: &str, remote: SocketAddr) -> bool {
    tcp_sockets(ns).iter().any(|s| s.state == TCP_ESTABLISHED && s.remote == remote)
}

/// Packets received + sent by `iface` in namespace `ns` (/proc/net/dev).
pub fn interface_packets(ns: &str, iface: &str) -> u64 {
    let netns = NetNs::open(ns).unwrap_or_else(|e| panic!("opening namespace {ns}: {e}"));
    let dev = netns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .unwrap_or_else(|e| panic!("entering namespace {ns}: {e}"))
        .unwrap_or_else(|e| panic!("reading /proc/net/dev in {ns}: {e}"));
    let line = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(iface).and_then(|rest| rest.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {iface} in /proc/net/dev of {ns}"));
    let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // rx: bytes packets errs drop fifo frame compressed multicast; then tx.
    fields[1] + fields[9]
}

/// A real `ping` (ICMP or ICMPv6) from the guest: up to two echoes within
/// two seconds (the first may wait for neighbour resolution); true if any
/// was answered.
pub fn ping(ns: &str, dst: IpAddr) -> bool {
    run_in(ns, "ping", &["-n", "-c", "2", "-i", "0.2", "-w", "2", &dst.to_string()]).status.success()
}

/// A real TCP connection with `nc -z` (connect only); true if it opened.
pub fn tcp_connects(ns: &str, dst: IpAddr, port: u16) -> bool {
    run_in(ns, "nc", &["-z", "-n", "-w", "2", &dst.to_string(), &port.to_string()]).status.success()
}

/// Sends one UDP datagram with real `nc -u` and returns what came back
/// within the timeout (the world's UDP echo answers with the same bytes).
pub fn udp_exchange(ns: &str, dst: IpAddr, port: u16, payload: &str) -> String {
    let mut nc = netns_command(ns, "nc");
    nc.args(["-u", "-n", "-w", "2", &dst.to_string(), &port.to_string()]).stderr(Stdio::null());
    let out = output_with_stdin(&mut nc, payload.as_bytes());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `command` with `input` on its stdin; its stdout (and stderr, unless
/// the caller redirected it) captured.
pub fn output_with_stdin(command: &mut Command, input: &[u8]) -> Output {
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    child.stdin.take().expect("stdin is piped").write_all(input).unwrap_or_else(|e| panic!("writing to {command:?}: {e}"));
    child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {command:?}: {e}"))
}

/// An HTTP GET with real curl; the body on success.
pub fn curl(ns: &str, url: &str) -> Option<String> {
    // -f: an HTTP error (a proxy's 403) is a failure, not a body.
    let out = run_in(ns, "curl", &["-s", "-f", "-g", "--max-time", "3", url]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Real curl with the response head (`-i`) and curl's exit code, for tests
/// that look at statuses and headers: (exit code, head + body).
pub fn curl_head(ns: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["-s", "-g", "-i", "--max-time", "5"];
    all.extend_from_slice(args);
    let out = run_in(ns, "curl", &all);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// TCP and UDP servers living in a namespace, on a thread each; stopped and
/// joined on drop. TCP answers like an HTTP/1.0 server (so curl works) and
/// `nc -z` sees the port open; UDP echoes.
pub struct WorldServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl WorldServers {
    pub fn start(ns: &NetNs, addrs: &[IpAddr], port: u16) -> WorldServers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &ip in addrs {
            let addr = SocketAddr::new(ip, port);
            // Bind inside the namespace; the sockets stay there.
            let (tcp, udp) = ns
                .run(move || (TcpListener::bind(addr), UdpSocket::bind(addr)))
                .expect("enter world netns");
            let tcp = tcp.unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
            let udp = udp.unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
            tcp.set_nonblocking(true).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut conn, _)) => {
                            conn.set_nonblocking(false).ok();
                            conn.set_read_timeout(Some(Duration::from_millis(300))).ok();
                            let mut buf = [0u8; 1024];
                            let _ = conn.read(&mut buf);
                            let body = format!("hello from {ip}\n");
                            let _ = write!(conn, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                        }
                        // Nothing to accept: the listener is non-blocking so
                        // this loop sees `stop`; poll again shortly.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        WorldServers { stop, threads }
    }
}

impl Drop for WorldServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Every test here needs CAP_NET_ADMIN and CAP_BPF; fail loudly otherwise
/// (a skipped enforcement test proves nothing).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests must run as root (CAP_NET_ADMIN, CAP_BPF)");
}

/// A background `ping` from a namespace (bounded: `count` echoes at
/// `interval_ms`, and a deadline); `finish` returns (sent, received).
pub struct Pinger {
    child: std::process::Child,
}

impl Pinger {
    pub fn start(ns: &str, dst: IpAddr, count: u32, interval_ms: u32) -> Pinger {
        let interval = format!("{:.3}", f64::from(interval_ms) / 1000.0);
        let deadline = (count * interval_ms / 1000 + 5).to_string();
        let child = netns_command(ns, "ping")
            .args(["-n", "-q", "-c", &count.to_string(), "-i", &interval, "-w", &deadline, "-W", "1", &dst.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ping");
        Pinger { child }
    }

    pub fn finish(self) -> (u32, u32) {
        let out = self.child.wait_with_output().expect("ping");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("ping printed no summary: {text}"));
        let num = |word: &str| -> u32 {
            let before = line.split(word).next().unwrap_or("");
            before.split_whitespace().last().and_then(|n| n.parse().ok()).unwrap_or(0)
        };
        (num("packets transmitted"), num("received"))
    }
}

/// A process that lives as long as this value: killed and reaped on drop
/// (also when a test panics).
pub struct Background(pub std::process::Child);

impl Background {
    /// Panics if the process has already exited (a server that could not
    /// start), instead of waiting out a deadline for it.
    pub fn assert_running(&mut self, what: &str) {
        if let Ok(Some(status)) = self.0.try_wait() {
            panic!("{what} exited with {status}");
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP listener started with real `nc -l` in a namespace; killed on drop.
pub struct NcListener {
    _child: Background,
}

impl NcListener {
    /// Returns once the port is listening.
    pub fn start(ns: &str, port: u16) -> NcListener {
        let child = netns_command(ns, "nc")
            .args(["-l", "-k", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nc -l");
        let mut child = Background(child);
        wait_until(Duration::from_secs(20), &format!("nc -l listening on port {port} in {ns}"), || {
            child.assert_running("nc -l");
            tcp_listening(ns, port)
        });
        NcListener { _child: child }
    }
}

/// A real DNS server (dnsmasq) in the world namespace on the world's uplink
/// address, authoritative for the `test` zone with the given records
/// (`--host-record` / `--cname` values); stopped on drop.
pub struct WorldDns {
    _child: Background,
}

impl WorldDns {
    pub const ADDR: Ipv4Addr = UPLINK_WORLD_V4;

    /// `host_records`: `name,addr[,addr…][,ttl]`; `cnames`: `alias,target`.
    pub fn start(world: &NetNs, host_records: &[String], cnames: &[&str]) -> WorldDns {
        let mut args: Vec<String> = vec!["--local=/test/".into()];
        args.extend(host_records.iter().map(|r| format!("--host-record={r}")));
        args.extend(cnames.iter().map(|c| format!("--cname={c}")));
        Self::start_with(world, IpAddr::V4(Self::ADDR), 53, &args)
    }

    /// dnsmasq on `addr:port` in `ns` with extra arguments (a forwarder:
    /// `--server=…`).
    pub fn start_with(ns: &NetNs, addr: IpAddr, port: u16, extra: &[String]) -> WorldDns {
        let child = netns_command(ns.name(), "dnsmasq")
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces", "--pid-file="])
            .arg(format!("--listen-address={addr}"))
            .arg(format!("--port={port}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        let mut child = Background(child);
        wait_until(Duration::from_secs(30), &format!("dnsmasq answering on {addr} port {port}"), || {
            child.assert_running("dnsmasq");
            let out = run_in(ns.name(), "dig", &["+short", "+time=1", "+tries=1", "-p", &port.to_string(), &format!("@{addr}"), "ready.invalid"]);
            out.status.success()
        });
        WorldDns { _child: child }
    }

    /// The dnsmasq process (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self._child.0.id()
    }
}

/// Real `dig` from a namespace: (status, answer lines) — status as dig
/// prints it (`NOERROR`, `NXDOMAIN`, …), answers as `name ttl class type data`.
pub fn dig(ns: &str, args: &[&str]) -> (String, Vec<String>) {
    let mut all = vec!["+time=3", "+tries=1", "+noall", "+comments", "+answer"];
    all.extend_from_slice(args);
    let out = run_in(ns, "dig", &all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_else(|| format!("no answer ({})", text.trim()));
    let answers = text.lines().filter(|l| !l.starts_with(';') && !l.trim().is_empty()).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    (status, answers)
}

/// A real `tcpdump` writing every frame of `iface` in namespace `ns` to a
/// pcap file; killed on drop.
pub struct PacketCapture {
    child: Background,
    ns: String,
    iface: String,
    file: PathBuf,
    packets_before: u64,
}

impl PacketCapture {
    /// Returns once tcpdump is capturing (it says "listening on" then).
    pub fn start(ns: &str, iface: &str, file: &Path) -> PacketCapture {
        let mut child = netns_command(ns, "tcpdump")
            .args(["-i", iface, "-U", "-s", "0", "-w"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcpdump");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut child = Background(child);
        // Read stderr to its end, so tcpdump never blocks on it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        wait_until(Duration::from_secs(20), &format!("tcpdump listening on {iface}"), || {
            child.assert_running("tcpdump");
            rx.try_iter().any(|line| line.contains("listening on"))
        });
        let packets_before = interface_packets(ns, iface);
        PacketCapture { child, ns: ns.to_string(), iface: iface.to_string(), file: file.to_path_buf(), packets_before }
    }

    /// Stops the capture once the file holds at least as many frames as
    /// the interface carried since the start, and returns the file.
    pub fn finish(mut self) -> Vec<u8> {
        let carried = interface_packets(&self.ns, &self.iface) - self.packets_before;
        wait_until(Duration::from_secs(20), &format!("tcpdump to write the {carried} frames {} carried", self.iface), || {
            pcap_frames(&std::fs::read(&self.file).unwrap_or_default()) >= carried
        });
        // SAFETY: signalling our own child; SIGINT makes tcpdump flush and exit.
        unsafe { libc::kill(self.child.0.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.0.wait();
        std::fs::read(&self.file).unwrap_or_else(|e| panic!("reading {}: {e}", self.file.display()))
    }
}

/// Complete frames in a pcap file's bytes (a record cut short is not counted).
pub fn pcap_frames(pcap: &[u8]) -> u64 {
    const GLOBAL_HEADER: usize = 24;
    const RECORD_HEADER: usize = 16;
    let Some(magic) = pcap.get(..4) else { return 0 };
    // Written in the writer's byte order: the magic says which.
    let little = matches!(magic, [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]);
    let mut at = GLOBAL_HEADER;
    let mut frames = 0;
    while let Some(header) = pcap.get(at..at + RECORD_HEADER) {
        let len = [header[8], header[9], header[10], header[11]];
        let captured = if little { u32::from_le_bytes(len) } else { u32::from_be_bytes(len) } as usize;
        if pcap.len() < at + RECORD_HEADER + captured {
            break;
        }
        at += RECORD_HEADER + captured;
        frames += 1;
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0";
        let socket = parse_proc_net_tcp_line(v4).unwrap();
        assert_eq!(socket.state, TCP_LISTEN);
        if cfg!(target_endian = "little") {
            assert_eq!(socket.local, "127.0.0.1:8080".parse().unwrap());
            let v6 = "   1: 0000000000000000FFFF00000100007F:A2C4 B80D0120000000000000000005000000:2328 01 00000000:00000000";
            let socket = parse_proc_net_tcp_line(v6).unwrap();
            assert_eq!(socket.local, "[::ffff:127.0.0.1]:41668".parse().unwrap());
            assert_eq!((socket.remote, socket.state), ("[2001:db8::5]:9000".parse().unwrap(), TCP_ESTABLISHED));
        }
        assert_eq!(parse_proc_net_tcp_line("  sl  local_address rem_address   st"), None);
    }

    #[test]
    fn pcap_frames_counts_complete_records() {
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1];
        pcap.resize(24, 0);
        assert_eq!(pcap_frames(&pcap), 0);
        for len in [60u32, 1514] {
            pcap.extend_from_slice(&[0; 8]);
            pcap.extend_from_slice(&len.to_le_bytes());
            pcap.extend_from_slice(&len.to_le_bytes());
            pcap.extend(std::iter::repeat_n(0u8, len as usize));
        }
        assert_eq!(pcap_frames(&pcap), 2);
        pcap.truncate(pcap.len() - 1);
        assert_eq!(pcap_frames(&pcap), 1, "a record cut short is not a frame yet");
        assert_eq!(pcap_frames(&[]), 0);
    }

    #[test]
    fn wait_until_polls_until_the_condition_holds() {
        let mut calls = 0;
        wait_until(Duration::from_secs(5), "the third call", || {
            calls += 1;
            calls == 3
        });
        assert_eq!(calls, 3);
        assert_eq!(try_wait_for(Duration::from_millis(30), || None::<()>), None);
    }

    #[test]
    #[should_panic(expected = "waiting for something that never happens")]
    fn wait_until_names_what_it_waited_for() {
        wait_until(Duration::from_millis(20), "something that never happens", || false);
    }

    #[test]
    fn missing_programs_name_their_package() {
        let err = tools::locate("/nonexistent/nft").unwrap_err();
        assert!(err.starts_with("/nonexistent/nft not found (package nftables)"), "{err}");
        assert_eq!(tools::package_of("dig"), Some("bind9-dnsutils"));
        assert!(tools::locate("sh").is_ok());
    }
}
