//! The netns guest: a network namespace standing in for a microVM. Its
//! `eth0` is a second tap whose frames the [`FramePump`] carries to and from
//! the sandbox's host tap, exactly as a VMM's virtio-net backend would; so
//! real `ping`, `nc` and `curl` run "inside the VM" with
//! `ip netns exec NAME …`, and their frames cross the host tap's TC program.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::netlink::{write_sysctl, Netlink, NetlinkError};
use crate::netns::{NetNs, NetNsError};
use crate::pump::FramePump;
use crate::tap::{GuestOffloads, Tap, TapError};

/// The guest's side of a sandbox's addressing, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetwork {
    pub mac: [u8; 6],
    pub ipv4: Ipv4Addr,
    pub ipv4_prefix_len: u8,
    pub gateway_ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub ipv6_prefix_len: u8,
    pub gateway_ipv6: Ipv6Addr,
    pub mtu: u32,
    /// Written to the namespace's resolv.conf (`ip netns exec` uses it).
    pub nameservers: Vec<std::net::IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Namespace(#[from] NetNsError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("starting the frame pump: {0}")]
    Pump(#[source] std::io::Error),
    #[error("writing resolv.conf for {name}: {source}")]
    ResolvConf { name: String, source: std::io::Error },
}

/// Name of the guest's interface inside its namespace.
pub const GUEST_IFNAME: &str = "eth0";

/// A running netns guest. Dropping it stops the pump and deletes the
/// namespace (and the guest tap with it).
pub struct NetnsGuest {
    pump: Option<FramePump>,
    netns: NetNs,
}

impl NetnsGuest {
    /// Creates namespace `netns_name`, its `eth0`, configures `network` in
    /// it and joins `eth0` to `host_tap` (an open queue of the sandbox's tap).
    pub fn start(netns_name: &str, host_tap: Tap, network: &GuestNetwork) -> Result<NetnsGuest, GuestError> {
        let netns = NetNs::create(netns_name)?;
        let guest_tap = netns.run(|| Tap::open(GUEST_IFNAME))??;
        guest_tap.set_offloads(GuestOffloads::KERNEL_PEER)?;
        host_tap.set_offloads(GuestOffloads::KERNEL_PEER)?;

        // Router advertisements are not ours to accept: addresses and routes
        // are static, and the filter drops any RA the guest would send.
        write_sysctl(&netns, "net.ipv6.conf.default.accept_ra", "0")?;
        write_sysctl(&netns, "net.ipv6.conf.all.accept_ra", "0")?;

        let nl = Netlink::in_namespace(&netns)?;
        let lo = nl.link_index("lo")?;
        nl.set_up(lo)?;
        let eth0 = nl.link_index(GUEST_IFNAME)?;
        // Addresses are allocated, never contested: skip duplicate address
        // detection so the link-local address is usable at once.
        for (key, value) in [("accept_ra", "0"), ("accept_dad", "0"), ("dad_transmits", "0"), ("router_solicitations", "0")] {
            write_sysctl(&netns, &format!("net.ipv6.conf.{GUEST_IFNAME}.{key}"), value)?;
        }
        nl.set_mac(eth0, network.mac)?;
        nl.set_mtu(eth0, network.mtu)?;
        nl.add_address(eth0, network.ipv4.into(), network.ipv4_prefix_len)?;
        nl.add_address(eth0, network.ipv6.into(), network.ipv6_prefix_len)?;
        nl.set_up(eth0)?;
        nl.add_route_v4(Ipv4Addr::UNSPECIFIED, 0, Some(network.gateway_ipv4), eth0)?;
        nl.add_route_v6(Ipv6Addr::UNSPECIFIED, 0, Some(network.gateway_ipv6), eth0)?;

        if !network.nameservers.is_empty() {
            let dir = std::path::Path::new("/etc/netns").join(netns_name);
            let body: String =
                network.nameservers.iter().map(|ns| format!("nameserver {ns}\n")).collect();
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(dir.join("resolv.conf"), body))
                .map_err(|source| GuestError::ResolvConf { name: netns_name.to_string(), source })?;
        }

        let pump = FramePump::start(host_tap, guest_tap).map_err(GuestError::Pump)?;
        Ok(NetnsGuest { pump: Some(pump), netns })
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn pump(&self) -> &FramePump {
        self.pump.as_ref().expect("pump runs until drop")
    }

    /// Stops the pump and deletes the namespace, reporting a namespace that
    /// could not be removed (dropping does the same but can only log).
    pub fn stop(mut self) -> Result<(), GuestError> {
        self.pump.take();
        NetNs::delete(self.netns.name())?;
        Ok(())
    }
}

impl Drop for NetnsGuest {
    fn drop(&mut self) {
        // Stop the pump (closing both tap fds) before the namespace goes.
        self.pump.take();
    }
}
