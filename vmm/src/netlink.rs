//! Links, addresses and routes through rtnetlink, as a small blocking API.
//!
//! A netlink socket belongs to the namespace it was opened in, so a
//! [`Netlink`] made with [`Netlink::in_namespace`] configures that namespace
//! from whatever thread uses it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::netns::{NetNs, NetNsError};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("starting the netlink runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Namespace(#[from] NetNsError),
    #[error("no interface named {0}")]
    NoSuchLink(String),
    #[error("writing sysctl {path}: {source}")]
    Sysctl { path: String, source: std::io::Error },
    #[error("{op}: {source}")]
    Request { op: String, source: rtnetlink::Error },
}

/// One address of an interface, as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The interface's index.
    pub index: u32,
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl InterfaceAddress {
    /// The address an RTM_NEWADDR message gives its interface: IFA_LOCAL
    /// when present (on a point-to-point link IFA_ADDRESS is the peer's),
    /// else IFA_ADDRESS, as getifaddrs(3) reads it.
    fn from_message(message: &AddressMessage) -> Option<InterfaceAddress> {
        let local = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = local.or_else(|| {
            message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })?;
        Some(InterfaceAddress { index: message.header.index, address, prefix_len: message.header.prefix_len })
    }
}

/// A route-netlink connection with its own single-threaded runtime.
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// A connection to the calling thread's namespace.
    pub fn new() -> Result<Netlink, NetlinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetlinkError::Runtime)?;
        let (connection, handle, _) = {
            let _guard = runtime.enter();
            rtnetlink::new_connection().map_err(NetlinkError::Connect)?
        };
        runtime.spawn(connection);
        Ok(Netlink { runtime, handle })
    }

    /// A connection whose socket lives in `ns`.
    pub fn in_namespace(ns: &NetNs) -> Result<Netlink, NetlinkError> {
        ns.run(Netlink::new)?
    }

    fn request<T>(
        &self,
        op: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, NetlinkError> {
        self.runtime.block_on(fut).map_err(|source| NetlinkError::Request { op: op(), source })
    }

    pub fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        let handle = self.handle.clone();
        let found = self.runtime.block_on(async move {
            let mut links = handle.link().get().match_name(name.to_string()).execute();
            links.try_next().await
        });
        match found {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetlinkError::NoSuchLink(name.to_string())),
            // The kernel answers ENODEV for an unknown name.
            Err(_) => Err(NetlinkError::NoSuchLink(name.to_string())),
        }
    }

    pub fn link_exists(&self, name: &str) -> bool {
        self.link_index(name).is_ok()
    }

    /// The link's MAC address.
    pub fn link_mac(&self, index: u32) -> Result<[u8; 6], NetlinkError> {
        let handle = self.handle.clone();
        let link: Option<LinkMessage> = self.request(
            || format!("reading link {index}"),
            async move { handle.link().get().match_index(index).execute().try_next().await },
        )?;
        link.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::Address(mac) if mac.len() == 6 => {
                    let mut out = [0u8; 6];
                    out.copy_from_slice(&mac);
                    Some(out)
                }
                _ => None,
            })
        })
        .ok_or_else(|| NetlinkError::NoSuchLink(format!("#{index} (no MAC)")))
    }

    pub fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.request(|| format!("setting link {index} up"), self.handle.link().set(msg).execute())
    }

    pub fn set_down(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).down().build();
        self.request(|| format!("setting link {index} down"), self.handle.link().set(msg).execute())
    }

    pub fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).address(mac.to_vec()).build();
        self.request(|| format!("setting MAC of link {index}"), self.handle.link().set(msg).execute())
    }

    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.request(|| format!("setting MTU of link {index}"), self.handle.link().set(msg).execute())
    }

    pub fn rename(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).name(name.to_string()).build();
        self.request(|| format!("renaming link {index} to {name}"), self.handle.link().set(msg).execute())
    }

    /// Moves a link into another namespace (it keeps its name unless renamed).
    pub fn move_to_namespace(&self, index: u32, ns: BorrowedFd<'_>) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).setns_by_fd(ns.as_raw_fd()).build();
        self.request(|| format!("moving link {index} to a namespace"), self.handle.link().set(msg).execute())
    }

    pub fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetlinkError> {
        let msg = LinkVeth::new(name, peer).build();
        self.request(|| format!("creating veth {name}/{peer}"), self.handle.link().add(msg).execute())
    }

    pub fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.request(|| format!("deleting link {index}"), self.handle.link().del(index).execute())
    }

    /// Adds an address; IPv6 addresses skip duplicate address detection so
    /// they are usable at once (we allocate them, nobody else has them).
    pub fn add_address(&self, index: u32, address: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        let mut req = self.handle.address().add(index, address, prefix_len);
        if address.is_ipv6() {
            req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(|| format!("adding {address}/{prefix_len} to link {index}"), req.execute())
    }

    /// Every address of every interface in the socket's namespace (one
    /// RTM_GETADDR dump).
    pub fn addresses(&self) -> Result<Vec<InterfaceAddress>, NetlinkError> {
        let handle = self.handle.clone();
        let messages: Vec<AddressMessage> =
            self.request(|| "listing addresses".to_string(), async move { handle.address().get().execute().try_collect().await })?;
        Ok(messages.iter().filter_map(InterfaceAddress::from_message).collect())
    }

    /// Adds an IPv4 route to `dst/prefix_len`, via `gateway` if given, out of
    /// `oif`. Gateways are always on-link (the sandbox links are point to point).
    pub fn add_route_v4(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        gateway: Option<Ipv4Addr>,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .output_interface(oif);
        if let Some(gw) = gateway {
            builder = builder.gateway(gw).onlink();
        }
        let msg = builder.build();
        self.request(
            || format!("adding route {dst}/{prefix_len} via {gateway:?} dev {oif}"),
            self.handle.route().add(msg).execute(),
        )
    }

    pub fn add_route_v6(
        &self,
        dst: Ipv6Addr,
        prefix_len: u8,
        gateway: Option<Ipv6Addr>,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        let mut builder = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, prefix_len)
            .output_interface(oif);
        if let Some(gw) = gateway {
            builder = builder.gateway(gw).onlink();
        }
        let msg = builder.build();
        self.request(
            || format!("adding route {dst}/{prefix_len} via {gateway:?} dev {oif}"),
            self.handle.route().add(msg).execute(),
        )
    }
}

/// Writes a sysctl of the calling thread's network namespace (paths under
/// /proc/sys/net are per namespace for the thread that opens them).
pub fn write_sysctl(ns: &NetNs, key: &str, value: &str) -> Result<(), NetlinkError> {
    let path = sysctl_path(key);
    ns.run(|| std::fs::write(&path, value))?
        .map_err(|source| NetlinkError::Sysctl { path: path.display().to_string(), source })
}

/// The /proc/sys file of a sysctl key. Interface names may hold dots (VLANs:
/// `eth0.100`); they are the one part of a `net.<family>.conf.<ifname>.<leaf>`
/// key that can, so only the dots around them separate.
pub fn sysctl_path(key: &str) -> std::path::PathBuf {
    let root = std::path::Path::new("/proc/sys");
    match key.splitn(4, '.').collect::<Vec<_>>().as_slice() {
        [net, family, "conf", rest] => {
            let (ifname, leaf) = rest.rsplit_once('.').unwrap_or((rest, ""));
            root.join(net).join(family).join("conf").join(ifname).join(leaf)
        }
        _ => root.join(key.replace('.', "/")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn message(index: u32, prefix_len: u8, attributes: Vec<AddressAttribute>) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix_len;
        m.attributes = attributes;
        m
    }

    #[test]
    fn an_interface_address_is_the_local_one_else_the_address() {
        let own: IpAddr = "192.0.2.1".parse().unwrap();
        let peer: IpAddr = "192.0.2.2".parse().unwrap();
        let p2p = message(3, 32, vec![AddressAttribute::Address(peer), AddressAttribute::Local(own)]);
        assert_eq!(InterfaceAddress::from_message(&p2p), Some(InterfaceAddress { index: 3, address: own, prefix_len: 32 }));
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let plain = message(4, 64, vec![AddressAttribute::Address(v6)]);
        assert_eq!(InterfaceAddress::from_message(&plain), Some(InterfaceAddress { index: 4, address: v6, prefix_len: 64 }));
        assert_eq!(InterfaceAddress::from_message(&message(5, 8, vec![AddressAttribute::Label("lo".into())])), None);
    }

    #[test]
    fn sysctl_paths_keep_dotted_interface_names() {
        assert_eq!(sysctl_path("net.ipv4.conf.eth0.100.forwarding"), Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding"));
        assert_eq!(sysctl_path("net.ipv6.conf.all.forwarding"), Path::new("/proc/sys/net/ipv6/conf/all/forwarding"));
        assert_eq!(sysctl_path("net.ipv4.ip_forward"), Path::new("/proc/sys/net/ipv4/ip_forward"));
    }
}
