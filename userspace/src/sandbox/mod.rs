//! Sandboxes: their addressing (pure, derived from the sandbox id and the
//! address pools) and their host side (tap, addresses, eBPF config, TCX
//! link, nftables membership, optional netns guest), put on the host by
//! [`install::SandboxHost`].

pub mod denies;
pub mod guest_pump;
pub mod host;
pub mod install;
pub mod route;
pub mod tap_pool;
pub mod vm_process;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use sbx_net_common::{SandboxConfig, MAX_PROXIED_PORTS};
use sbx_vmm::netlink::NetlinkError;
use sbx_vmm::tap::TapError;
use sbx_vmm::{GuestNetwork, Netlink, Tap};

use crate::policy::compile::CompiledPolicy;

/// Address pools sandboxes are carved from, as plain data. Each sandbox gets
/// a /30 (gateway .1, guest .2) and a /64 (gateway ::1, guest ::2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPools {
    pub ipv4: Ipv4Addr,
    pub ipv4_prefix_len: u8,
    pub ipv6: Ipv6Addr,
    pub ipv6_prefix_len: u8,
}

impl Default for AddressPools {
    fn default() -> Self {
        AddressPools {
            ipv4: Ipv4Addr::new(10, 200, 0, 0),
            ipv4_prefix_len: 16,
            ipv6: "fd73:6278::".parse().expect("valid"),
            ipv6_prefix_len: 48,
        }
    }
}

impl AddressPools {
    /// How many sandboxes the smaller of the two pools holds.
    pub fn capacity(&self) -> u64 {
        let v4 = 1u64 << (30 - self.ipv4_prefix_len.min(30));
        let v6 = 1u64 << (64 - self.ipv6_prefix_len.min(64)).min(32);
        v4.min(v6)
    }

    pub fn ipv4_network(&self) -> Ipv4Network {
        Ipv4Network::new(self.ipv4, self.ipv4_prefix_len.min(32)).expect("a prefix of at most 32 is valid")
    }

    pub fn ipv6_network(&self) -> Ipv6Network {
        Ipv6Network::new(self.ipv6, self.ipv6_prefix_len.min(128)).expect("a prefix of at most 128 is valid")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox id {id} is outside the address pools (capacity {capacity})")]
    PoolExhausted { id: u32, capacity: u64 },
    #[error("sandbox name {0:?} must be 1-32 letters, digits, '-' or '_'")]
    InvalidName(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("writing {path}: {source}")]
    Sysctl { path: String, source: std::io::Error },
    #[error(transparent)]
    Host(#[from] crate::sandbox::host::HostError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Everything about a sandbox's addressing, derived deterministically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    pub id: u32,
    pub name: String,
    pub tap: String,
    pub netns: String,
    pub guest_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    pub guest_ipv4: Ipv4Addr,
    pub gateway_ipv4: Ipv4Addr,
    pub guest_ipv6: Ipv6Addr,
    pub gateway_ipv6: Ipv6Addr,
}

pub const SANDBOX_IPV4_PREFIX_LEN: u8 = 30;
pub const SANDBOX_IPV6_PREFIX_LEN: u8 = 64;

impl SandboxSpec {
    /// `id` ≥ 1 numbers the sandbox's slot in the pools.
    pub fn new(id: u32, name: &str, pools: &AddressPools) -> Result<SandboxSpec, SandboxError> {
        if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(SandboxError::InvalidName(name.to_string()));
        }
        if id == 0 || u64::from(id) >= pools.capacity() {
            return Err(SandboxError::PoolExhausted { id, capacity: pools.capacity() });
        }
        let v4_base = u32::from(pools.ipv4) + (id << 2);
        let v6_base = u128::from(pools.ipv6) + (u128::from(id) << 64);
        let id_bytes = id.to_be_bytes();
        Ok(SandboxSpec {
            id,
            name: name.to_string(),
            tap: tap_name(id),
            netns: format!("sbx-{name}"),
            // Locally administered unicast MACs carrying the id.
            guest_mac: [0x02, 0x5b, id_bytes[0], id_bytes[1], id_bytes[2], id_bytes[3]],
            gateway_mac: [0x02, 0x5a, id_bytes[0], id_bytes[1], id_bytes[2], id_bytes[3]],
            gateway_ipv4: Ipv4Addr::from(v4_base + 1),
            guest_ipv4: Ipv4Addr::from(v4_base + 2),
            gateway_ipv6: Ipv6Addr::from(v6_base + 1),
            guest_ipv6: Ipv6Addr::from(v6_base + 2),
        })
    }

    /// The host's own addresses on this sandbox's link: denied to the guest
    /// like the built-in list.
    pub fn host_addresses(&self) -> Vec<IpAddr> {
        vec![
            self.gateway_ipv4.into(),
            self.gateway_ipv6.into(),
            eui64_link_local(self.gateway_mac).into(),
        ]
    }

    /// The tap's datapath config. `policy_id` keys the trie entries of the
    /// policy generation in force; `proxied_tcp_ports` (with the REDIRECTS
    /// flag) are passed to nftables' redirect to the credential proxy.
    pub fn datapath_config(&self, policy: &CompiledPolicy, policy_id: u32, flags: u32, proxied_tcp_ports: &[u16]) -> SandboxConfig {
        let mut ports = [0u16; MAX_PROXIED_PORTS];
        for (slot, port) in ports.iter_mut().zip(proxied_tcp_ports) {
            *slot = *port;
        }
        SandboxConfig {
            sandbox_id: self.id,
            default_verdict: policy.default_verdict,
            flags,
            policy_id,
            proxied_tcp_ports: ports,
            guest_mac: self.guest_mac,
            gateway_mac: self.gateway_mac,
            guest_ipv4: self.guest_ipv4.octets(),
            gateway_ipv4: self.gateway_ipv4.octets(),
            guest_ipv6: self.guest_ipv6.octets(),
            guest_ipv6_link_local: eui64_link_local(self.guest_mac).octets(),
            gateway_ipv6: self.gateway_ipv6.octets(),
            gateway_ipv6_link_local: eui64_link_local(self.gateway_mac).octets(),
        }
    }

    pub fn guest_network(&self) -> GuestNetwork {
        GuestNetwork {
            mac: self.guest_mac,
            ipv4: self.guest_ipv4,
            ipv4_prefix_len: SANDBOX_IPV4_PREFIX_LEN,
            gateway_ipv4: self.gateway_ipv4,
            ipv6: self.guest_ipv6,
            ipv6_prefix_len: SANDBOX_IPV6_PREFIX_LEN,
            gateway_ipv6: self.gateway_ipv6,
            mtu: 1500,
            nameservers: vec![self.gateway_ipv4.into()],
        }
    }
}

/// Tap names: `sbx-<id>` (at most 14 characters, within IFNAMSIZ).
pub fn tap_name(id: u32) -> String {
    format!("sbx-{id}")
}

/// The link-local address a kernel derives from a MAC (modified EUI-64).
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe, 0x80, 0, 0, 0, 0, 0, 0,
        mac[0] ^ 0x02, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5],
    ])
}

/// Creates the sandbox's tap in the calling thread's namespace and gives it
/// the gateway's MAC and addresses; returns the open tap and its ifindex.
/// Nothing is attached yet.
pub fn open_host_tap(netlink: &Netlink, spec: &SandboxSpec) -> Result<(Tap, u32), SandboxError> {
    let tap = Tap::open(&spec.tap)?;
    let ifindex = netlink.link_index(&spec.tap)?;
    configure_host_side(netlink, spec, ifindex)?;
    Ok((tap, ifindex))
}

/// Makes an existing tap the sandbox's gateway side: the gateway MAC and
/// addresses, no DAD, up.
pub fn configure_host_side(netlink: &Netlink, spec: &SandboxSpec, ifindex: u32) -> Result<(), SandboxError> {
    netlink.set_mac(ifindex, spec.gateway_mac)?;
    // No duplicate address detection on a point-to-point link whose
    // addresses we allocate: it only delays the first packets.
    for key in ["accept_dad", "dad_transmits"] {
        let path = format!("/proc/sys/net/ipv6/conf/{}/{key}", spec.tap);
        std::fs::write(&path, "0").map_err(|source| SandboxError::Sysctl { path, source })?;
    }
    // Forwarding for what arrives on this tap only (the host's other
    // interfaces keep their settings); see crate::sandbox::host.
    let per_interface = crate::sandbox::host::ipv6_per_interface_forwarding(&crate::sandbox::host::read_sysctl);
    crate::sandbox::host::apply(&crate::sandbox::host::tap_settings(&spec.tap, per_interface), false)?;
    netlink.add_address(ifindex, spec.gateway_ipv4.into(), SANDBOX_IPV4_PREFIX_LEN)?;
    netlink.add_address(ifindex, spec.gateway_ipv6.into(), SANDBOX_IPV6_PREFIX_LEN)?;
    netlink.set_up(ifindex)?;
    Ok(())
}

/// The interface index of `name` in the calling thread's namespace (no
/// rtnl lock, unlike a netlink request, so it never waits behind a TCX
/// attach).
pub fn ifindex_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_is_deterministic_and_disjoint() {
        let pools = AddressPools::default();
        let a = SandboxSpec::new(1, "a", &pools).unwrap();
        let b = SandboxSpec::new(2, "b", &pools).unwrap();
        assert_eq!(a.gateway_ipv4, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(a.guest_ipv4, Ipv4Addr::new(10, 200, 0, 6));
        assert_eq!(b.guest_ipv4, Ipv4Addr::new(10, 200, 0, 10));
        assert_eq!(a.guest_ipv6, "fd73:6278:0:1::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(a.guest_mac, [0x02, 0x5b, 0, 0, 0, 1]);
        assert_ne!(a.guest_mac, b.guest_mac);
        assert_eq!(SandboxSpec::new(1, "a", &pools).unwrap(), a);
        assert_eq!(a.tap, "sbx-1");
        assert!(tap_name(u32::MAX).len() <= 15);
    }

    #[test]
    fn pool_limits_and_names() {
        let pools = AddressPools::default();
        assert_eq!(pools.capacity(), 16384);
        assert!(SandboxSpec::new(0, "a", &pools).is_err());
        assert!(SandboxSpec::new(16384, "a", &pools).is_err());
        assert!(SandboxSpec::new(16383, "a", &pools).is_ok());
        assert!(SandboxSpec::new(1, "bad name", &pools).is_err());
    }

    #[test]
    fn eui64() {
        assert_eq!(
            eui64_link_local([0x02, 0x5b, 0, 0, 0, 1]),
            "fe80::5b:ff:fe00:1".parse::<Ipv6Addr>().unwrap()
        );
    }
}
