//! What no sandbox may reach beyond the built-in deny list: the host's own
//! addresses and the sandbox pools, compiled into every sandbox's policy as
//! built-in denies (so DNS answers pointing there are stripped too).
//!
//! The decisions are pure; [`host_interface_addresses`] is the one read of
//! the host (an address dump through netlink).

use std::net::IpAddr;

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

#[cfg(test)]
mod tests {
    use super::*;

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
