//! Drop events as readable records.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sbx_net_common::{FlowEvent, Reason};

use crate::compile::CompiledPolicy;

/// A decoded drop event with its deciding rule spelled out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropRecord {
    pub sandbox_id: u32,
    pub protocol: &'static str,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    pub reason: &'static str,
    pub rule: String,
}

pub fn protocol_name(ethertype: u16, protocol: u8) -> &'static str {
    match (ethertype, protocol) {
        (0x0806, _) => "arp",
        (_, 6) => "tcp",
        (_, 17) => "udp",
        (_, 1) => "icmp",
        (_, 58) => "icmpv6",
        (0x0800, _) | (0x86dd, _) => "ip",
        _ => "other",
    }
}

impl DropRecord {
    pub fn from_event(event: &FlowEvent, policy: Option<&CompiledPolicy>) -> DropRecord {
        let addr = |bytes: &[u8; 16]| -> Option<IpAddr> {
            match event.ip_version {
                4 => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()),
                6 => Some(Ipv6Addr::from(*bytes).into()),
                _ => None,
            }
        };
        let reason = Reason::from_u8(event.reason);
        let rule = match (reason, policy) {
            (Some(Reason::PolicyDeny | Reason::DefaultDeny), Some(p)) => p.describe_rule(event.rule_id),
            (Some(Reason::PolicyDeny | Reason::DefaultDeny), None) => format!("rule #{}", event.rule_id),
            _ => "-".to_string(),
        };
        DropRecord {
            sandbox_id: event.sandbox_id,
            protocol: protocol_name(event.ethertype, event.protocol),
            src: addr(&event.src_addr),
            dst: addr(&event.dst_addr),
            src_port: event.src_port,
            dst_port: event.dst_port,
            reason: reason.map(Reason::name).unwrap_or("unknown"),
            rule,
        }
    }
}

fn endpoint(addr: Option<IpAddr>, port: u16) -> String {
    match (addr, port) {
        (None, _) => "-".into(),
        (Some(IpAddr::V6(a)), p) if p != 0 => format!("[{a}]:{p}"),
        (Some(a), p) if p != 0 => format!("{a}:{p}"),
        (Some(a), _) => a.to_string(),
    }
}

impl fmt::Display for DropRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sandbox {} DROP {} {} -> {} reason={} rule=\"{}\"",
            self.sandbox_id,
            self.protocol,
            endpoint(self.src, self.src_port),
            endpoint(self.dst, self.dst_port),
            self.reason,
            self.rule
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::policy::Policy;

    #[test]
    fn a_default_deny_reads_well() {
        let policy = Policy::parse("t", "name = \"t\"\n[network]\nallow = [\"198.51.100.0/24\"]\n").unwrap();
        let compiled = compile(&policy, &[]).unwrap();
        let mut ev = FlowEvent { sandbox_id: 3, ethertype: 0x0800, protocol: 17, ip_version: 4, ..Default::default() };
        ev.src_addr[..4].copy_from_slice(&[10, 200, 0, 14]);
        ev.dst_addr[..4].copy_from_slice(&[203, 0, 113, 7]);
        ev.src_port = 40000;
        ev.dst_port = 9;
        ev.reason = Reason::DefaultDeny as u8;
        ev.rule_id = 0;
        let line = DropRecord::from_event(&ev, Some(&compiled)).to_string();
        assert_eq!(line, "sandbox 3 DROP udp 10.200.0.14:40000 -> 203.0.113.7:9 reason=default_deny rule=\"default deny\"");
    }
}
