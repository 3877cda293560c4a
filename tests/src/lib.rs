//! Test support for sbx-net: the host/world/guest namespace topology, world
//! servers, real-tool helpers and a crafted-frame builder.
//!
//! Network rule: nothing here touches the root namespace's routes, nftables
//! or forwarding. Every namespace is created with a unique name and removed
//! on drop, also when a test panics.

pub mod daemon;
pub mod frames;
pub mod https;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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

/// `host` (daemon side, forwarding on) and `world` (the internet), joined
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
        for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
            write_sysctl(&host, key, "1").expect("forwarding in the host namespace");
        }
        // Every address here is ours: no duplicate address detection, which
        // would hold IPv6 on the uplink for a second or two.
        for ns in [&host, &world] {
            for key in ["net.ipv6.conf.default.accept_dad", "net.ipv6.conf.all.accept_dad"] {
                write_sysctl(ns, key, "0").expect("accept_dad");
            }
        }

        host_nl.add_veth("uplink", "world0").expect("veth");
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

/// Runs `program args…` inside namespace `ns` with `ip netns exec`.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} in {ns}: {e}"))
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
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nc", "-u", "-n", "-w", "2", &dst.to_string(), &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn nc -u");
    child.stdin.take().unwrap().write_all(payload.as_bytes()).unwrap();
    let out = child.wait_with_output().expect("nc -u");
    String::from_utf8_lossy(&out.stdout).into_owned()
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
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-n", "-q", "-c", &count.to_string(), "-i", &interval, "-w", &deadline, "-W", "1", &dst.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
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

/// A TCP listener started with real `nc -l` in a namespace; killed on drop.
/// A process that lives as long as this value: killed and reaped on drop
/// (also when a test panics).
pub struct Background(pub std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct NcListener {
    _child: Background,
}

impl NcListener {
    pub fn start(ns: &str, port: u16) -> NcListener {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "nc", "-l", "-k", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn nc -l");
        std::thread::sleep(Duration::from_millis(200));
        NcListener { _child: Background(child) }
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
        let mut args: Vec<String> = [
            "netns", "exec", ns.name(), "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", "--bind-interfaces", "--pid-file=",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--listen-address={addr}"));
        args.push(format!("--port={port}"));
        args.extend(extra.iter().cloned());
        let child = Command::new("ip")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn dnsmasq (apt package dnsmasq-base)");
        // Ready when it answers.
        for _ in 0..50 {
            let out = run_in(ns.name(), "dig", &["+short", "+time=1", "+tries=1", "-p", &port.to_string(), &format!("@{addr}"), "ready.invalid"]);
            if out.status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        WorldDns { _child: Background(child) }
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
