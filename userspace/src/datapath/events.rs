//! The datapath's flow events as userspace reads them: the flow-table key
//! an event's flow has, and its addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sbx_net_common::{FlowEvent, FlowKey, FlowKeyV4};

/// A datapath flow's key in whichever table holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnyFlowKey {
    V4(FlowKeyV4),
    Other(FlowKey),
}

/// The flow-table key of an event's flow, built as the classifier builds it.
pub fn flow_key(event: &FlowEvent) -> AnyFlowKey {
    if event.ip_version == 4 {
        let mut src = [0; 4];
        let mut dst = [0; 4];
        src.copy_from_slice(&event.src_addr[..4]);
        dst.copy_from_slice(&event.dst_addr[..4]);
        return AnyFlowKey::V4(FlowKeyV4 {
            sandbox_id: event.sandbox_id,
            src_addr: src,
            dst_addr: dst,
            src_port: event.src_port,
            dst_port: event.dst_port,
            ethertype: event.ethertype,
            protocol: event.protocol,
            _pad: 0,
        });
    }
    AnyFlowKey::Other(FlowKey {
        sandbox_id: event.sandbox_id,
        src_addr: event.src_addr,
        dst_addr: event.dst_addr,
        src_port: event.src_port,
        dst_port: event.dst_port,
        ethertype: event.ethertype,
        protocol: event.protocol,
        ip_version: event.ip_version,
    })
}

/// The addresses of a datapath event.
pub fn event_addrs(event: &FlowEvent) -> (Option<IpAddr>, Option<IpAddr>) {
    let addr = |bytes: &[u8; 16]| -> Option<IpAddr> {
        match event.ip_version {
            4 => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()),
            6 => Some(Ipv6Addr::from(*bytes).into()),
            _ => None,
        }
    };
    (addr(&event.src_addr), addr(&event.dst_addr))
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_keys_are_built_like_the_classifier_builds_them() {
        let mut ev = FlowEvent { sandbox_id: 3, ethertype: 0x0800, protocol: 6, ip_version: 4, src_port: 1, dst_port: 2, ..Default::default() };
        ev.src_addr[..4].copy_from_slice(&[10, 200, 0, 14]);
        ev.dst_addr[..4].copy_from_slice(&[203, 0, 113, 7]);
        let AnyFlowKey::V4(k) = flow_key(&ev) else { panic!("IPv4 flows are in the IPv4 table") };
        assert_eq!((k.sandbox_id, k.src_addr, k.dst_addr, k.src_port, k.dst_port, k.protocol), (3, [10, 200, 0, 14], [203, 0, 113, 7], 1, 2, 6));
        ev.ip_version = 6;
        ev.ethertype = 0x86dd;
        assert!(matches!(flow_key(&ev), AnyFlowKey::Other(k) if k.ip_version == 6 && k.dst_addr == ev.dst_addr));
    }
}
