//! The probe script: network configuration lines (`ipv4`, `ipv6`, `dns`,
//! written by the monitor from the sandbox) and commands, one per line;
//! each command prints one JSON line with `"op"` and its outcome. Every
//! wait is bounded by the current `timeout`.
//!
//! ```text
//! ipv4 10.0.0.2/30 10.0.0.1        address/prefix gateway
//! ipv6 fd00::2/64 fd00::1
//! dns 10.0.0.1
//! timeout 2000                     ms, for the commands that follow
//! resolve api.example.com          A records (resolve6: AAAA)
//! tcp 192.0.2.1:7 hello\n          connect, send, read until the peer is done
//! udp 192.0.2.1:9 ping             send, wait for one reply
//! ping 192.0.2.1                   ICMP(v6) echo
//! http 192.0.2.1:80 /path [HOST]   GET (a name as the target is resolved first)
//! spoof 10.9.9.9 192.0.2.1:9 text  UDP from a forged source address
//! disk 0 read 0 [COUNT] | disk 0 write 0 text | disk 0 info
//! udpflood 192.0.2.1:9 COUNT SIZE  as fast as the device takes them
//! tcpsend 192.0.2.1:5001 BYTES     bulk, timed until every byte is acked
//! sleep 100
//! serve                            answer ping and echo UDP port 7, until stopped
//! ```

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::ptr::NonNull;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{dns, icmp, raw, tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    DnsQueryType, EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpCidr, IpProtocol, IpVersion,
};
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};

use crate::hal::GuestHal;
use crate::io;
use crate::json::Json;
use crate::netdev::NetPhy;

type Disk = VirtIOBlk<GuestHal, MmioTransport<'static>>;

/// How much of a reply a result line carries.
const SHOWN: usize = 2048;

struct Net {
    iface: Interface,
    phy: NetPhy,
    sockets: SocketSet<'static>,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    dns: Vec<IpAddress>,
    next_port: u16,
}

struct Probe {
    net: Option<Net>,
    disks: Vec<Disk>,
    timeout_us: u64,
}

fn now() -> Instant {
    Instant::from_micros(io::now_micros() as i64)
}

impl Net {
    fn poll(&mut self) {
        self.iface.poll(now(), &mut self.phy, &mut self.sockets);
    }

    fn port(&mut self) -> u16 {
        self.next_port = if self.next_port >= 65000 { 49152 } else { self.next_port + 1 };
        self.next_port
    }

    /// Polls until `done` gives a value or `deadline` (µs) passes, idling
    /// in the monitor while nothing is due.
    fn wait<T>(&mut self, deadline: u64, mut done: impl FnMut(&mut Net) -> Option<T>) -> Option<T> {
        loop {
            self.poll();
            if let Some(v) = done(self) {
                return Some(v);
            }
            let t = io::now_micros();
            if t >= deadline {
                return None;
            }
            if self.phy.can_recv() {
                continue;
            }
            let due = self.iface.poll_delay(now(), &self.sockets).map(|d| d.total_micros()).unwrap_or(u64::MAX);
            let pause = due.min(deadline - t).min(20_000);
            if pause > 0 {
                io::idle(pause);
            }
        }
    }
}

/// `\n`, `\r`, `\t` and `\\` in a payload.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push(b'\n'),
                Some('r') => out.push(b'\r'),
                Some('t') => out.push(b'\t'),
                Some(other) => {
                    let mut b = [0; 4];
                    out.extend_from_slice(other.encode_utf8(&mut b).as_bytes())
                }
                None => out.push(b'\\'),
            }
        } else {
            let mut b = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
        }
    }
    out
}

fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN)]).into_owned()
}

/// `A/P` as an address and prefix length.
fn cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = text.split_once('/')?;
    Some((addr.parse().ok()?, len.parse().ok()?))
}

/// `HOST:PORT` or `[V6]:PORT`, HOST an address or a name.
fn host_port(text: &str) -> Option<(&str, u16)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host, port.parse().ok()?));
    }
    let (host, port) = text.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

fn mac_text(mac: [u8; 6]) -> String {
    let mut s = String::new();
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let hex = b"0123456789abcdef";
        s.push(hex[(b >> 4) as usize] as char);
        s.push(hex[(b & 0xf) as usize] as char);
    }
    s
}

/// Finds the devices, configures the network and runs the commands.
pub fn run(windows: &[u64], script: &str) {
    let mut phy = None;
    let mut disks = Vec::new();
    let mut found = Vec::new();
    for &addr in windows {
        let Some(header) = NonNull::new(addr as *mut VirtIOHeader) else { continue };
        // SAFETY: the monitor listed this 4 KiB window as a virtio-mmio device.
        let transport = match unsafe { MmioTransport::new(header, 0x1000) } {
            Ok(t) => t,
            Err(e) => {
                io::line(&Json::event("device").hex("addr", addr).str("error", &alloc::format!("{e:?}")).finish());
                continue;
            }
        };
        match transport.device_type() {
            DeviceType::Network if phy.is_none() => match NetPhy::new(transport) {
                Ok(p) => {
                    found.push("net");
                    phy = Some(p)
                }
                Err(e) => io::line(&Json::event("device").str("type", "net").str("error", &alloc::format!("{e:?}")).finish()),
            },
            DeviceType::Block => match Disk::new(transport) {
                Ok(d) => {
                    found.push("block");
                    disks.push(d)
                }
                Err(e) => io::line(&Json::event("device").str("type", "block").str("error", &alloc::format!("{e:?}")).finish()),
            },
            _ => found.push("other"),
        }
    }
    let mut probe = Probe { net: None, disks, timeout_us: 2_000_000 };
    let mut boot = Json::event("boot");
    boot.strs("devices", found.iter().copied());
    if let Some(phy) = phy {
        let mac = phy.mac();
        boot.str("mac", &mac_text(mac));
        probe.net = Some(configure(phy, script));
    }
    if let Some(net) = &probe.net {
        if let Some(a) = net.ipv4 {
            boot.str("ipv4", &a.to_string());
        }
        if let Some(a) = net.ipv6 {
            boot.str("ipv6", &a.to_string());
        }
    }
    io::line(&boot.finish());
    for line in script.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (command, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim_start();
        match command {
            "ipv4" | "ipv6" | "dns" => {}
            _ => {
                let out = probe.command(command, rest);
                if let Some(out) = out {
                    io::line(&out);
                }
            }
        }
    }
    io::line(&Json::event("done").finish());
    // The run ends here: the devices are not handed back one queue at a
    // time (the monitor tears the VM down).
    core::mem::forget(probe);
}

/// The interface from the script's `ipv4`, `ipv6` and `dns` lines.
fn configure(mut phy: NetPhy, script: &str) -> Net {
    let mac = phy.mac();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = io::entropy();
    let mut iface = Interface::new(config, &mut phy, now());
    let (mut ipv4, mut ipv6, mut dns) = (None, None, Vec::new());
    for line in script.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("ipv4"), Some(addr), Some(gw)) => {
                if let (Some((IpAddr::V4(a), len)), Ok(gw)) = (cidr(addr), gw.parse::<Ipv4Addr>()) {
                    iface.update_ip_addrs(|addrs| {
                        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(a), len));
                    });
                    let _ = iface.routes_mut().add_default_ipv4_route(gw);
                    ipv4 = Some(a);
                }
            }
            (Some("ipv6"), Some(addr), Some(gw)) => {
                if let (Some((IpAddr::V6(a), len)), Ok(gw)) = (cidr(addr), gw.parse::<Ipv6Addr>()) {
                    iface.update_ip_addrs(|addrs| {
                        let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(a), len));
                    });
                    let _ = iface.routes_mut().add_default_ipv6_route(gw);
                    ipv6 = Some(a);
                }
            }
            (Some("dns"), Some(first), second) => {
                for s in [Some(first), second].into_iter().flatten() {
                    if let Ok(a) = s.parse::<IpAddr>() {
                        dns.push(IpAddress::from(a));
                    }
                }
            }
            _ => {}
        }
    }
    let next_port = 49152 + (io::entropy() % 10_000) as u16;
    Net { iface, phy, sockets: SocketSet::new(vec![]), ipv4, ipv6, dns, next_port }
}

/// A failed command's line.
fn failed(op: &str, why: &str) -> String {
    Json::op(op).bool("ok", false).str("error", why).finish()
}

struct TcpOutcome {
    connected: bool,
    sent: usize,
    received: Vec<u8>,
    error: Option<&'static str>,
    micros: u64,
}

impl Probe {
    fn deadline(&self) -> u64 {
        io::now_micros() + self.timeout_us
    }

    fn command(&mut self, command: &str, rest: &str) -> Option<String> {
        let mut words = rest.split_whitespace();
        Some(match command {
            "timeout" => {
                self.timeout_us = rest.trim().parse::<u64>().unwrap_or(2000).saturating_mul(1000);
                return None;
            }
            "sleep" => {
                let until = io::now_micros() + rest.trim().parse::<u64>().unwrap_or(0).min(60_000) * 1000;
                match self.net.as_mut() {
                    Some(net) => {
                        net.wait(until, |_| None::<()>);
                    }
                    None => {
                        while io::now_micros() < until {
                            io::idle(until - io::now_micros());
                        }
                    }
                }
                return None;
            }
            "disk" => self.disk(&mut words, rest),
            "serve" => {
                let Some(net) = self.net.as_mut() else { return Some(failed("serve", "no network device")) };
                let buffer = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 1024]);
                let mut echo = udp::Socket::new(buffer(), buffer());
                let _ = echo.bind(7);
                let handle = net.sockets.add(echo);
                io::line(&Json::op("serve").bool("ok", true).num("udp_echo_port", 7).finish());
                loop {
                    // smoltcp answers ARP, neighbour solicitations and echo
                    // requests itself; datagrams to port 7 go back.
                    net.wait(u64::MAX, |n| {
                        let s = n.sockets.get_mut::<udp::Socket>(handle);
                        while let Ok((data, meta)) = s.recv() {
                            let (data, to) = (data.to_vec(), meta.endpoint);
                            let _ = s.send_slice(&data, to);
                        }
                        None::<()>
                    });
                }
            }
            _ if self.net.is_none() => failed(command, "no network device"),
            "resolve" | "resolve6" => {
                let name = words.next().unwrap_or("");
                let kind = if command == "resolve" { DnsQueryType::A } else { DnsQueryType::Aaaa };
                match self.resolve(name, kind) {
                    Ok(addrs) => {
                        let texts: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                        Json::op(command).str("name", name).bool("ok", true).strs("addrs", texts.iter().map(|s| s.as_str())).finish()
                    }
                    Err(why) => Json::op(command).str("name", name).bool("ok", false).str("error", why).finish(),
                }
            }
            "tcp" => {
                let target = words.next().unwrap_or("");
                let payload = unescape(rest.trim_start().strip_prefix(target).unwrap_or("").trim_start());
                match self.target(target) {
                    Err(why) => failed("tcp", why),
                    Ok((addr, port)) => {
                        let o = self.tcp_exchange(addr, port, &payload, usize::MAX);
                        let mut j = Json::op("tcp");
                        j.str("to", target).bool("ok", o.connected && o.error.is_none()).bool("connected", o.connected).num("sent", o.sent as u64);
                        j.num("received_bytes", o.received.len() as u64).str("received", &shown(&o.received));
                        if let Some(e) = o.error {
                            j.str("error", e);
                        }
                        j.finish()
                    }
                }
            }
            "http" => {
                let target = words.next().unwrap_or("");
                let path = words.next().unwrap_or("/");
                let host_header = words.next().map(String::from).unwrap_or_else(|| host_port(target).map(|(h, _)| String::from(h)).unwrap_or_default());
                match self.target(target) {
                    Err(why) => failed("http", why),
                    Ok((addr, port)) => {
                        let request = alloc::format!("GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: sbx-net-guest\r\nConnection: close\r\n\r\n");
                        let o = self.tcp_exchange(addr, port, request.as_bytes(), 1 << 20);
                        let text = shown(&o.received);
                        let status = text.split_whitespace().nth(1).and_then(|s| s.parse::<u64>().ok());
                        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
                        let mut j = Json::op("http");
                        j.str("to", target).str("path", path).bool("ok", status.is_some()).bool("connected", o.connected);
                        j.num("status", status.unwrap_or(0)).str("head", text.split("\r\n\r\n").next().unwrap_or("")).str("body", body);
                        if let Some(e) = o.error {
                            j.str("error", e);
                        }
                        j.finish()
                    }
                }
            }
            "udp" => {
                let target = words.next().unwrap_or("");
                let payload = unescape(rest.trim_start().strip_prefix(target).unwrap_or("").trim_start());
                match self.target(target) {
                    Err(why) => failed("udp", why),
                    Ok((addr, port)) => match self.udp_exchange(addr, port, &payload) {
                        Ok(reply) => Json::op("udp").str("to", target).bool("ok", true).str("reply", &shown(&reply)).finish(),
                        Err(why) => Json::op("udp").str("to", target).bool("ok", false).str("error", why).finish(),
                    },
                }
            }
            "ping" => {
                let target = words.next().unwrap_or("");
                match target.parse::<IpAddr>() {
                    Err(_) => failed("ping", "not an address"),
                    Ok(addr) => match self.ping(addr) {
                        Ok(micros) => Json::op("ping").str("to", target).bool("ok", true).num("rtt_us", micros).finish(),
                        Err(why) => Json::op("ping").str("to", target).bool("ok", false).str("error", why).finish(),
                    },
                }
            }
            "spoof" => {
                let source = words.next().unwrap_or("");
                let target = words.next().unwrap_or("");
                let payload = rest.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
                match (source.parse::<Ipv4Addr>(), host_port(target).and_then(|(h, p)| Some((h.parse::<Ipv4Addr>().ok()?, p)))) {
                    (Ok(src), Some((dst, port))) => match self.spoof(src, dst, port, payload.as_bytes()) {
                        Ok(()) => Json::op("spoof").str("from", source).str("to", target).bool("ok", true).finish(),
                        Err(why) => Json::op("spoof").str("from", source).str("to", target).bool("ok", false).str("error", why).finish(),
                    },
                    _ => failed("spoof", "usage: spoof SRC-IPV4 DST-IPV4:PORT TEXT"),
                }
            }
            "udpflood" => {
                let target = words.next().unwrap_or("");
                let count = words.next().and_then(|w| w.parse::<u64>().ok()).unwrap_or(1000);
                let size = words.next().and_then(|w| w.parse::<usize>().ok()).unwrap_or(64).min(1400);
                match self.target(target) {
                    Err(why) => failed("udpflood", why),
                    Ok((addr, port)) => {
                        let (sent, micros) = self.udp_flood(addr, port, count, size);
                        Json::op("udpflood").str("to", target).bool("ok", sent == count).num("sent", sent).num("size", size as u64).num("micros", micros).finish()
                    }
                }
            }
            "tcpsend" => {
                let target = words.next().unwrap_or("");
                let bytes = words.next().and_then(|w| w.parse::<usize>().ok()).unwrap_or(1 << 20);
                match self.target(target) {
                    Err(why) => failed("tcpsend", why),
                    Ok((addr, port)) => {
                        // One 64 KiB chunk, sent over and over.
                        let chunk = vec![b'x'; 64 * 1024];
                        let o = self.tcp_exchange_sized(addr, port, &chunk, bytes, 0);
                        let mut j = Json::op("tcpsend");
                        j.str("to", target).bool("ok", o.sent == bytes && o.error.is_none()).num("sent", o.sent as u64).num("micros", o.micros);
                        if let Some(e) = o.error {
                            j.str("error", e);
                        }
                        j.finish()
                    }
                }
            }
            other => failed(other, "unknown command"),
        })
    }

    /// An address, or a name resolved to its first A (AAAA) record.
    fn target(&mut self, text: &str) -> Result<(IpAddress, u16), &'static str> {
        let (host, port) = host_port(text).ok_or("expected HOST:PORT")?;
        if let Ok(addr) = host.parse::<IpAddr>() {
            return Ok((IpAddress::from(addr), port));
        }
        let addrs = self.resolve(host, DnsQueryType::A)?;
        addrs.first().map(|a| (*a, port)).ok_or("no address")
    }

    fn resolve(&mut self, name: &str, kind: DnsQueryType) -> Result<Vec<IpAddress>, &'static str> {
        let deadline = self.deadline();
        let net = self.net.as_mut().ok_or("no network device")?;
        if net.dns.is_empty() {
            return Err("no dns server");
        }
        let socket = dns::Socket::new(&net.dns, vec![]);
        let handle = net.sockets.add(socket);
        let query = net.sockets.get_mut::<dns::Socket>(handle).start_query(net.iface.context(), name, kind).map_err(|_| "invalid name")?;
        let result = net.wait(deadline, |n| match n.sockets.get_mut::<dns::Socket>(handle).get_query_result(query) {
            Ok(addrs) => Some(Ok(addrs.iter().copied().collect::<Vec<_>>())),
            Err(dns::GetQueryResultError::Pending) => None,
            Err(dns::GetQueryResultError::Failed) => Some(Err("failed (NXDOMAIN or no answer)")),
        });
        if result.is_none() {
            net.sockets.get_mut::<dns::Socket>(handle).cancel_query(query);
        }
        net.sockets.remove(handle);
        result.unwrap_or(Err("timeout"))
    }

    /// Connects, sends `payload`, reads until the peer is done (closes, or
    /// is quiet for 200 ms after answering) or `max_recv` bytes; with
    /// `max_recv` 0, only sends, and times until every byte is acked.
    fn tcp_exchange(&mut self, addr: IpAddress, port: u16, payload: &[u8], max_recv: usize) -> TcpOutcome {
        self.tcp_exchange_sized(addr, port, payload, payload.len(), max_recv)
    }

    /// As [`Probe::tcp_exchange`], sending `total` bytes taken from
    /// `payload` over and over.
    fn tcp_exchange_sized(&mut self, addr: IpAddress, port: u16, payload: &[u8], total: usize, max_recv: usize) -> TcpOutcome {
        let deadline = self.deadline();
        let mut out = TcpOutcome { connected: false, sent: 0, received: Vec::new(), error: None, micros: 0 };
        let Some(net) = self.net.as_mut() else {
            out.error = Some("no network device");
            return out;
        };
        let socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 256 * 1024]), tcp::SocketBuffer::new(vec![0; 256 * 1024]));
        let handle = net.sockets.add(socket);
        let local = net.port();
        if net.sockets.get_mut::<tcp::Socket>(handle).connect(net.iface.context(), (addr, port), local).is_err() {
            net.sockets.remove(handle);
            out.error = Some("cannot connect (no route or no source address)");
            return out;
        }
        let established = net.wait(deadline, |n| {
            let s = n.sockets.get_mut::<tcp::Socket>(handle);
            match s.state() {
                tcp::State::Established => Some(true),
                tcp::State::Closed => Some(false),
                _ => None,
            }
        });
        if established != Some(true) {
            out.error = Some(if established.is_none() { "connect timeout" } else { "connection refused" });
            abort(net, handle);
            return out;
        }
        out.connected = true;
        let start = io::now_micros();
        let mut last_data = 0u64;
        let done = net.wait(deadline, |n| {
            let s = n.sockets.get_mut::<tcp::Socket>(handle);
            while out.sent < total && s.can_send() && !payload.is_empty() {
                let at = out.sent % payload.len();
                let end = payload.len().min(at + (total - out.sent));
                match s.send_slice(&payload[at..end]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.sent += n,
                }
            }
            if max_recv == 0 {
                // Bulk: done when everything is sent and acknowledged.
                return (out.sent == total && s.send_queue() == 0).then_some(true);
            }
            while s.can_recv() && out.received.len() < max_recv {
                let _ = s.recv(|data| {
                    out.received.extend_from_slice(data);
                    (data.len(), ())
                });
                last_data = io::now_micros();
            }
            if !s.may_recv() || out.received.len() >= max_recv {
                return Some(true);
            }
            (out.sent == total && last_data > 0 && io::now_micros() - last_data > 200_000).then_some(true)
        });
        out.micros = io::now_micros() - start;
        if done.is_none() {
            out.error = Some(if out.received.is_empty() { "no reply before the timeout" } else { "the peer did not finish before the timeout" });
        }
        let state_after = net.sockets.get_mut::<tcp::Socket>(handle).state();
        if state_after == tcp::State::Closed && out.received.is_empty() && out.error.is_none() && max_recv != 0 {
            out.error = Some("connection reset");
        }
        net.sockets.get_mut::<tcp::Socket>(handle).close();
        let close_by = io::now_micros() + 200_000;
        net.wait(close_by, |n| matches!(n.sockets.get_mut::<tcp::Socket>(handle).state(), tcp::State::Closed | tcp::State::TimeWait).then_some(()));
        abort(net, handle);
        out
    }

    fn udp_socket(net: &mut Net) -> SocketHandle {
        let buffer = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 128 * 1024]);
        let mut socket = udp::Socket::new(buffer(), buffer());
        let port = net.port();
        let _ = socket.bind(port);
        net.sockets.add(socket)
    }

    fn udp_exchange(&mut self, addr: IpAddress, port: u16, payload: &[u8]) -> Result<Vec<u8>, &'static str> {
        let deadline = self.deadline();
        let net = self.net.as_mut().ok_or("no network device")?;
        let handle = Self::udp_socket(net);
        let sent = net.sockets.get_mut::<udp::Socket>(handle).send_slice(payload, (addr, port));
        let reply = match sent {
            Err(_) => Err("cannot send"),
            Ok(()) => net
                .wait(deadline, |n| {
                    let s = n.sockets.get_mut::<udp::Socket>(handle);
                    s.recv().ok().map(|(data, _)| data.to_vec())
                })
                .ok_or("no reply before the timeout"),
        };
        net.sockets.remove(handle);
        reply
    }

    fn udp_flood(&mut self, addr: IpAddress, port: u16, count: u64, size: usize) -> (u64, u64) {
        let deadline = self.deadline();
        let Some(net) = self.net.as_mut() else { return (0, 0) };
        let handle = Self::udp_socket(net);
        let payload = vec![b'u'; size];
        let mut sent = 0u64;
        let start = io::now_micros();
        net.wait(deadline, |n| {
            let s = n.sockets.get_mut::<udp::Socket>(handle);
            while sent < count && s.can_send() && s.send_slice(&payload, (addr, port)).is_ok() {
                sent += 1;
            }
            (sent == count && s.send_queue() == 0).then_some(())
        });
        let micros = io::now_micros() - start;
        net.sockets.remove(handle);
        (sent, micros)
    }

    fn ping(&mut self, addr: IpAddr) -> Result<u64, &'static str> {
        let deadline = self.deadline();
        let net = self.net.as_mut().ok_or("no network device")?;
        let buffer = || icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 4096]);
        let mut socket = icmp::Socket::new(buffer(), buffer());
        let ident = (io::entropy() & 0xffff) as u16;
        let _ = socket.bind(icmp::Endpoint::Ident(ident));
        let handle = net.sockets.add(socket);
        let caps = ChecksumCapabilities::default();
        let data = b"sbx-net-guest ping";
        let sent = {
            let s = net.sockets.get_mut::<icmp::Socket>(handle);
            match addr {
                IpAddr::V4(dst) => {
                    let repr = Icmpv4Repr::EchoRequest { ident, seq_no: 1, data };
                    s.send(repr.buffer_len(), IpAddress::Ipv4(dst)).map(|buf| repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps)).is_ok()
                }
                IpAddr::V6(dst) => match net.ipv6 {
                    None => false,
                    Some(src) => {
                        let repr = Icmpv6Repr::EchoRequest { ident, seq_no: 1, data };
                        s.send(repr.buffer_len(), IpAddress::Ipv6(dst)).map(|buf| repr.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(buf), &caps)).is_ok()
                    }
                },
            }
        };
        if !sent {
            net.sockets.remove(handle);
            return Err("cannot send");
        }
        let start = io::now_micros();
        let answered = net.wait(deadline, |n| {
            let s = n.sockets.get_mut::<icmp::Socket>(handle);
            while let Ok((payload, _from)) = s.recv() {
                let reply = match addr {
                    IpAddr::V4(_) => Icmpv4Packet::new_checked(payload)
                        .ok()
                        .and_then(|p| Icmpv4Repr::parse(&p, &caps).ok().map(|r| matches!(r, Icmpv4Repr::EchoReply { ident: i, .. } if i == ident))),
                    // The echo reply's type and identifier (its checksum
                    // needs addresses the socket does not hand out).
                    IpAddr::V6(_) => Some(payload.len() >= 8 && payload[0] == 129 && u16::from_be_bytes([payload[4], payload[5]]) == ident),
                };
                if reply == Some(true) {
                    return Some(io::now_micros() - start);
                }
            }
            None
        });
        net.sockets.remove(handle);
        answered.ok_or("no reply before the timeout")
    }

    /// One UDP datagram whose IPv4 source is `src`, not ours: built by
    /// hand and sent through a raw socket (smoltcp keeps the header).
    fn spoof(&mut self, src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Result<(), &'static str> {
        let deadline = self.deadline();
        let net = self.net.as_mut().ok_or("no network device")?;
        let buffer = || raw::PacketBuffer::new(vec![raw::PacketMetadata::EMPTY; 4], vec![0; 4096]);
        let handle = net.sockets.add(raw::Socket::new(IpVersion::Ipv4, IpProtocol::Udp, buffer(), buffer()));
        let total = 20 + 8 + payload.len();
        let mut packet = vec![0u8; total];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        packet[6] = 0x40;
        packet[8] = 64;
        packet[9] = 17;
        packet[12..16].copy_from_slice(&src.octets());
        packet[16..20].copy_from_slice(&dst.octets());
        packet[20..22].copy_from_slice(&40_000u16.to_be_bytes());
        packet[22..24].copy_from_slice(&port.to_be_bytes());
        packet[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        packet[28..].copy_from_slice(payload);
        let queued = net.sockets.get_mut::<raw::Socket>(handle).send_slice(&packet).is_ok();
        let sent = queued && net.wait(deadline, |n| (n.sockets.get_mut::<raw::Socket>(handle).send_queue() == 0).then_some(())).is_some();
        net.sockets.remove(handle);
        if sent {
            Ok(())
        } else {
            Err("not sent")
        }
    }

    fn disk<'a>(&mut self, words: &mut impl Iterator<Item = &'a str>, rest: &str) -> String {
        let index = words.next().and_then(|w| w.parse::<usize>().ok()).unwrap_or(usize::MAX);
        let action = words.next().unwrap_or("");
        let Some(disk) = self.disks.get_mut(index) else { return failed("disk", "no such disk") };
        let sector = words.next().and_then(|w| w.parse::<usize>().ok()).unwrap_or(0);
        let mut j = Json::op("disk");
        j.num("disk", index as u64).str("action", action);
        match action {
            "info" => j.bool("ok", true).num("sectors", disk.capacity()).bool("read_only", disk.readonly()).finish(),
            "read" => {
                // One sector, or COUNT of them in one request (at most 1 MiB).
                let count = words.next().and_then(|w| w.parse::<usize>().ok()).unwrap_or(1).clamp(1, 2048);
                let mut buf = vec![0u8; SECTOR_SIZE * count];
                match disk.read_blocks(sector, &mut buf) {
                    Ok(()) => {
                        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len()).min(SECTOR_SIZE);
                        j.bool("ok", true).num("sector", sector as u64).num("bytes", buf.len() as u64).str("data", &shown(&buf[..end])).finish()
                    }
                    Err(e) => j.bool("ok", false).str("error", &alloc::format!("{e:?}")).finish(),
                }
            }
            "write" => {
                // The text: everything after "N write SECTOR".
                let text = rest.split_whitespace().skip(3).collect::<Vec<_>>().join(" ");
                let mut buf = vec![0u8; SECTOR_SIZE];
                let bytes = unescape(&text);
                let n = bytes.len().min(SECTOR_SIZE);
                buf[..n].copy_from_slice(&bytes[..n]);
                match disk.write_blocks(sector, &buf) {
                    Ok(()) => j.bool("ok", true).num("sector", sector as u64).finish(),
                    Err(e) => j.bool("ok", false).bool("read_only", disk.readonly()).str("error", &alloc::format!("{e:?}")).finish(),
                }
            }
            _ => failed("disk", "usage: disk N info|read SECTOR|write SECTOR TEXT"),
        }
    }
}

fn abort(net: &mut Net, handle: SocketHandle) {
    net.sockets.get_mut::<tcp::Socket>(handle).abort();
    net.poll();
    net.sockets.remove(handle);
}
