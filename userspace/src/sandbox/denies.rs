//! What no sandbox may reach beyond the built-in deny list: the host's own
//! addresses and the sandbox pools, compiled into every sandbox's policy as
//! built-in denies (so DNS answers pointing there are stripped too).
//!
//! The decisions are pure; [`host_interface_addresses`] is the one read of
//! the host (an address dump through netlink), and [`HostAddresses`] does
//! it again only when the kernel has announced an address change that
//! matters since the last one.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ipnetwork::IpNetwork;
use sbx_vmm::netlink::NetlinkError;
use sbx_vmm::Netlink;

use crate::policy::compile::{compile_with_denies, CompileError, CompiledPolicy};
use crate::policy::Policy;
use crate::sandbox::{AddressPools, SandboxSpec};

/// Unicast addresses of the interfaces in `netlink`'s namespace, except
/// loopback, link-local and the sandbox pools, sorted and without repeats.
pub fn host_interface_addresses(netlink: &Netlink, pools: &AddressPools) -> Result<Vec<IpAddr>, NetlinkError> {
    let mut out: Vec<IpAddr> = netlink.addresses()?.into_iter().map(|a| a.address).filter(|ip| is_host_address_to_deny(*ip, pools)).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The host's addresses to deny, kept between compiles. An address dump
/// takes the rtnl lock, which a tap-pool worker holds for a whole RCU grace
/// period per TCX attach (~10–15 ms): a create that dumped waited for the
/// refill its own pooled tap had just started. So the dump is kept, and a
/// netlink socket subscribed to the IPv4 and IPv6 address groups (opened
/// before the first dump, so no change after it is missed) says when it is
/// stale: any message about an address that [`is_host_address_to_deny`]
/// (or one that cannot be read), a lost message (ENOBUFS), or any error on
/// the socket makes the next compile dump again. Fail closed: without the
/// socket every compile dumps, as before.
#[derive(Debug)]
pub struct HostAddresses {
    watch: Option<OwnedFd>,
    cached: Option<Vec<IpAddr>>,
}

const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

impl Default for HostAddresses {
    fn default() -> Self {
        Self::new()
    }
}

impl HostAddresses {
    /// Subscribes in the calling thread's network namespace (the one the
    /// dumps read).
    pub fn new() -> HostAddresses {
        let watch = open_address_watch().inspect_err(|e| tracing::warn!("no address-change socket, every compile reads the host's addresses: {e}")).ok();
        HostAddresses { watch, cached: None }
    }

    /// The host's addresses to deny ([`host_interface_addresses`]), read
    /// again when they may have changed since the last read.
    pub fn get(&mut self, netlink: &Netlink, pools: &AddressPools) -> Result<Vec<IpAddr>, NetlinkError> {
        if self.changed(pools) {
            self.cached = None;
        }
        if let Some(cached) = &self.cached {
            return Ok(cached.clone());
        }
        let fresh = host_interface_addresses(netlink, pools)?;
        if self.watch.is_some() {
            self.cached = Some(fresh.clone());
        }
        Ok(fresh)
    }

    /// Drains the watch socket: whether anything in it may change the list.
    fn changed(&mut self, pools: &AddressPools) -> bool {
        let Some(fd) = &self.watch else { return true };
        let mut buf = vec![0u8; 64 * 1024];
        let mut changed = false;
        // Bounded: a queue longer than this is treated as a change anyway.
        for _ in 0..64 {
            // SAFETY: recv writes at most buf.len() bytes into buf, which
            // lives for the call; the fd is ours and open.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return changed,
                    // Messages were lost: assume they mattered.
                    Some(libc::ENOBUFS) | Some(libc::EINTR) => changed = true,
                    _ => {
                        tracing::warn!("address-change socket failed, every compile reads the host's addresses from now on: {e}");
                        self.watch = None;
                        return true;
                    }
                }
                continue;
            }
            changed |= messages_change_host_addresses(&buf[..n as usize], pools);
        }
        true
    }
}

fn open_address_watch() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; returns a new fd or -1.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_nl is plain data; all-zero is valid (pid 0: the
    // kernel assigns one).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
    // SAFETY: bind reads size_of::<sockaddr_nl>() bytes of `addr`, alive
    // for the call.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_nl).cast(), std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Whether a datagram of rtnetlink address notifications may change what
/// [`host_interface_addresses`] returns: true for a new or removed address
/// that is the host's to deny, and for anything that cannot be read as an
/// address message (an error, an overrun, a truncated message). Addresses
/// in the sandbox pools (the tap pool's gateways) and link-local ones (every
/// new tap's) do not count.
pub fn messages_change_host_addresses(buf: &[u8], pools: &AddressPools) -> bool {
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]));
    let mut at = 0;
    while at < buf.len() {
        let (Some(len), Some(kind)) = (u32_at(buf, at), u16_at(buf, at + 4)) else { return true };
        let len = len as usize;
        if len < 16 + 8 || at + len > buf.len() || (kind != RTM_NEWADDR && kind != RTM_DELADDR) {
            return true;
        }
        let msg = &buf[at..at + len];
        let family = i32::from(msg[16]);
        let mut addresses = Vec::new();
        let mut a = 24;
        while a + 4 <= msg.len() {
            let (Some(alen), Some(atype)) = (u16_at(msg, a), u16_at(msg, a + 2)) else { return true };
            let alen = alen as usize;
            if alen < 4 || a + alen > msg.len() {
                return true;
            }
            let data = &msg[a + 4..a + alen];
            if atype == IFA_ADDRESS || atype == IFA_LOCAL {
                let ip = match (family, data.len()) {
                    (libc::AF_INET, 4) => IpAddr::from(<[u8; 4]>::try_from(data).expect("4 bytes")),
                    (libc::AF_INET6, 16) => IpAddr::from(<[u8; 16]>::try_from(data).expect("16 bytes")),
                    _ => return true,
                };
                addresses.push(ip);
            }
            a += (alen + 3) & !3;
        }
        if addresses.is_empty() || addresses.iter().any(|ip| is_host_address_to_deny(*ip, pools)) {
            return true;
        }
        at += (len + 3) & !3;
    }
    false
}

/// Whether an interface address is one a sandbox must be denied by its own
/// entry: not loopback or link-local (the built-in list denies those
/// ranges), not in the pools (denied as a whole, see [`sandbox_denies`]).
pub fn is_host_address_to_deny(ip: IpAddr, pools: &AddressPools) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !pools.ipv4_network().contains(a),
        IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80 && !pools.ipv6_network().contains(a),
    }
}

/// The denies every sandbox's policy gets beyond the built-in list: its
/// gateway addresses, the host's interface addresses (read at every
/// compile: an address added since the daemon started is the host's too),
/// and the sandbox pools (another sandbox is never a destination: the
/// forward chain drops tap to tap, and this keeps the proxies from
/// connecting there when a wide CIDR like 10.0.0.0/8 is allowed).
pub fn sandbox_denies(spec: &SandboxSpec, interface_addresses: &[IpAddr], pools: &AddressPools) -> Vec<(IpNetwork, &'static str)> {
    let mut hosts = spec.host_addresses();
    for ip in interface_addresses {
        if !hosts.contains(ip) {
            hosts.push(*ip);
        }
    }
    let mut denies: Vec<(IpNetwork, &'static str)> = hosts.into_iter().map(|a| (a.into(), "host address")).collect();
    denies.push((pools.ipv4_network().into(), "sandbox pool"));
    denies.push((pools.ipv6_network().into(), "sandbox pool"));
    denies
}

/// `policy` compiled for the sandbox `spec` on a host with these interface
/// addresses: what its trie entries hold and what the proxies decide by.
pub fn compile_for_sandbox(policy: &Policy, spec: &SandboxSpec, interface_addresses: &[IpAddr], pools: &AddressPools) -> Result<CompiledPolicy, CompileError> {
    compile_with_denies(policy, &sandbox_denies(spec, interface_addresses, pools))
}

/// An address notification as the kernel sends it: a new (`removed`:
/// deleted) `ip` with its IFA_ADDRESS and IFA_LOCAL attributes (the
/// fuzz target and the tests build what [`messages_change_host_addresses`]
/// reads with it).
pub fn address_notification(removed: bool, ip: IpAddr) -> Vec<u8> {
    let (family, octets) = match ip {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    address_message(if removed { RTM_DELADDR } else { RTM_NEWADDR }, family, &[(IFA_ADDRESS, &octets), (IFA_LOCAL, &octets)])
}

/// An rtnetlink message of `kind` with an ifaddrmsg of `family` and these
/// attributes, each padded to 4 bytes.
fn address_message(kind: u16, family: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![family, 24, 0, 0, 7, 0, 0, 0];
    for (t, data) in attrs {
        body.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&t.to_ne_bytes());
        body.extend_from_slice(data);
        while body.len() % 4 != 0 {
            body.push(0);
        }
    }
    let mut msg = Vec::new();
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&[0; 10]);
    msg.extend_from_slice(&body);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr_msg(kind: u16, family: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        address_message(kind, family, attrs)
    }

    #[test]
    fn only_changes_to_the_hosts_own_addresses_invalidate_the_kept_list() {
        let pools = AddressPools::default();
        let v4 = |kind, ip: [u8; 4]| addr_msg(kind, libc::AF_INET as u8, &[(IFA_ADDRESS, &ip), (IFA_LOCAL, &ip)]);
        // A pooled tap's gateway address and a new tap's link-local one.
        let gateway = v4(RTM_NEWADDR, [10, 200, 0, 1]);
        let fe80: [u8; 16] = "fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let link_local = addr_msg(RTM_NEWADDR, libc::AF_INET6 as u8, &[(IFA_ADDRESS, &fe80)]);
        assert!(!messages_change_host_addresses(&gateway, &pools));
        assert!(!messages_change_host_addresses(&[gateway.clone(), link_local.clone()].concat(), &pools));
        // The host gains or loses an address of its own.
        assert!(messages_change_host_addresses(&v4(RTM_NEWADDR, [192, 0, 2, 1]), &pools));
        assert!(messages_change_host_addresses(&[gateway.clone(), v4(RTM_DELADDR, [192, 0, 2, 1])].concat(), &pools));
        let host6: [u8; 16] = "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert!(messages_change_host_addresses(&addr_msg(RTM_DELADDR, libc::AF_INET6 as u8, &[(IFA_ADDRESS, &host6)]), &pools));
        // Whatever cannot be read counts as a change.
        assert!(messages_change_host_addresses(&gateway[..gateway.len() - 2], &pools), "truncated");
        assert!(messages_change_host_addresses(&addr_msg(RTM_NEWADDR, libc::AF_INET as u8, &[]), &pools), "no address");
        assert!(messages_change_host_addresses(&addr_msg(2, libc::AF_INET as u8, &[]), &pools), "an error message");
        assert!(messages_change_host_addresses(&addr_msg(RTM_NEWADDR, libc::AF_INET as u8, &[(IFA_ADDRESS, &[1, 2, 3])]), &pools), "bad length");
        assert!(!messages_change_host_addresses(&[], &pools));
    }

    #[test]
    fn only_the_hosts_own_unicast_addresses_outside_the_pools_are_denied_one_by_one() {
        let pools = AddressPools::default();
        let deny = |s: &str| is_host_address_to_deny(s.parse().unwrap(), &pools);
        assert!(deny("192.0.2.1"));
        assert!(deny("2001:db8:ffff::1"));
        assert!(!deny("127.0.0.1") && !deny("::1"), "loopback is a built-in deny");
        assert!(!deny("169.254.1.1") && !deny("fe80::1"), "link-local is a built-in deny");
        assert!(!deny("10.200.0.5") && !deny("fd73:6278:0:1::1"), "the pools are denied as a whole");
    }

    #[test]
    fn a_sandbox_is_denied_its_gateway_the_host_and_the_pools() {
        let pools = AddressPools::default();
        let spec = SandboxSpec::new(1, "a", &pools).unwrap();
        let uplink: IpAddr = "192.0.2.1".parse().unwrap();
        let gateway: IpAddr = spec.gateway_ipv4.into();
        let denies = sandbox_denies(&spec, &[uplink, gateway], &pools);
        let networks: Vec<String> = denies.iter().map(|(n, why)| format!("{n} {why}")).collect();
        assert_eq!(
            networks,
            [
                "10.200.0.5/32 host address".to_string(),
                "fd73:6278:0:1::1/128 host address".into(),
                "fe80::5a:ff:fe00:1/128 host address".into(),
                "192.0.2.1/32 host address".into(),
                "10.200.0.0/16 sandbox pool".into(),
                "fd73:6278::/48 sandbox pool".into(),
            ],
            "the gateway is listed once"
        );
    }

    #[test]
    fn a_policy_compiled_for_a_sandbox_names_why_the_host_is_denied() {
        let pools = AddressPools::default();
        let spec = SandboxSpec::new(1, "a", &pools).unwrap();
        let policy = Policy::parse("p.toml", "name = \"p\"\n[network]\nallow = [\"192.0.2.0/24\", \"10.0.0.0/8\"]\n").unwrap();
        let compiled = compile_for_sandbox(&policy, &spec, &["192.0.2.1".parse().unwrap()], &pools).unwrap();
        let rule = |ip: &str| compiled.describe_rule(compiled.lookup(ip.parse().unwrap(), crate::policy::compile::PortInfo::Port(80)).rule_id);
        assert_eq!(rule("192.0.2.1"), "builtin deny 192.0.2.1/32 (host address)");
        assert_eq!(rule("192.0.2.9"), "allow 192.0.2.0/24");
        assert_eq!(rule("10.200.3.3"), "builtin deny 10.200.0.0/16 (sandbox pool)");
        assert_eq!(rule("10.1.2.3"), "allow 10.0.0.0/8");
    }
}
