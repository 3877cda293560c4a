//! What a VMM or runtime needs to put a VM on a sandbox's tap, in its own
//! terms: `sandbox create … -o json|firecracker|cloud-hypervisor|env`.
//! Pure: a [`SandboxInfo`] in, text out.
//!
//! The tap is the daemon's: persistent, in the daemon's network namespace,
//! single-queue, `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`, its host side already
//! the guest's gateway (address and MAC). A VMM opens it by name there
//! (Firecracker and Cloud Hypervisor both attach to an existing tap) and
//! must leave its addresses and MAC alone: the datapath checks them.
//!
//! Every value that goes into another program's syntax is checked first
//! (fail closed): a tap name that would end Cloud Hypervisor's option list
//! (or, in its words meant for an unquoted `$(…)`, be split or globbed), a
//! MAC or address that does not parse, a prefix too long; what is parsed
//! is printed re-formatted, not as given.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::json;

use crate::control::api::SandboxInfo;

/// The output formats of `sandbox create` / `sandbox show`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The daemon's full answer (one line of JSON).
    Json,
    /// Firecracker's network-interfaces object, the kernel's `ip=`
    /// argument and the CA certificate's path (JSON).
    Firecracker,
    /// Cloud Hypervisor's `--net` and `--cmdline` arguments.
    CloudHypervisor,
    /// Shell variables (`SBX_NET_TAP='…'`), quoted for `eval`.
    Env,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("serialising the sandbox: {0}")]
    Json(#[from] serde_json::Error),
    #[error("sandbox {sandbox}: {field} {value:?} {problem}")]
    Field { sandbox: String, field: &'static str, value: String, problem: &'static str },
    #[error("sandbox {sandbox}'s tap already has a guest ({guest}): a VMM needs a sandbox made without --netns-guest or --vm")]
    TapInUse { sandbox: String, guest: String },
}

/// The guest's interface as the guest kernel names it: its first (and only)
/// virtio-net device, before any udev renaming (the `ip=` argument runs first).
pub const GUEST_IFNAME: &str = "eth0";

/// Cloud Hypervisor counts queues, not pairs: 2 is one RX/TX pair, all a
/// single-queue tap (no `IFF_MULTI_QUEUE`) can serve.
const CLOUD_HYPERVISOR_NUM_QUEUES: u32 = 2;

/// The sandbox as `format` wants it.
pub fn render(format: Format, info: &SandboxInfo) -> Result<String, HandoffError> {
    match format {
        Format::Json => Ok(serde_json::to_string(info)?),
        Format::Firecracker => firecracker(&Checked::from(free_tap(info)?)?),
        Format::CloudHypervisor => cloud_hypervisor(&Checked::from(free_tap(info)?)?),
        Format::Env => env(info),
    }
}

/// The sandbox, if nothing is on its tap yet: a netns guest's pump or the
/// daemon's own VM holds it, and a second VMM would fight it for the
/// frames (or fail to open it). The shell variables are still printed for
/// such a sandbox: they describe it, they do not hand its tap over.
fn free_tap(info: &SandboxInfo) -> Result<&SandboxInfo, HandoffError> {
    let guest = match (&info.netns, &info.vm) {
        (Some(netns), _) => format!("the netns guest {netns}"),
        (None, Some(vm)) if vm.state == "running" => format!("the daemon's VM, pid {}", vm.pid),
        _ => return Ok(info),
    };
    Err(HandoffError::TapInUse { sandbox: info.name.clone(), guest })
}

/// The fields the VMM formats use, parsed.
struct Checked<'a> {
    info: &'a SandboxInfo,
    /// The guest's MAC re-formatted from its bytes (lower-case, two digits
    /// each), whatever spelling the daemon's answer had.
    guest_mac: String,
    guest_ipv4: Ipv4Addr,
    gateway_ipv4: Ipv4Addr,
    netmask: Ipv4Addr,
    dns: Ipv4Addr,
    guest_ipv6: Ipv6Addr,
    gateway_ipv6: Ipv6Addr,
}

impl<'a> Checked<'a> {
    fn from(info: &'a SandboxInfo) -> Result<Checked<'a>, HandoffError> {
        let bad = |field: &'static str, value: &str, problem: &'static str| HandoffError::Field {
            sandbox: info.name.clone(),
            field,
            value: value.to_string(),
            problem,
        };
        // Cloud Hypervisor splits its option list on ',' and '=', the
        // kernel's ip= on ':'; a tap name is neither in the kernel's rules
        // (no ':') nor may it be here.
        let tap_ok = sbx_vmm::tap::validate_ifname(&info.tap).is_ok() && !info.tap.contains([',', '=', '"', '\'']);
        if !tap_ok {
            return Err(bad("tap", &info.tap, "is not a usable interface name"));
        }
        let Some(guest_mac) = parse_mac(&info.guest_mac) else {
            return Err(bad("guest_mac", &info.guest_mac, "is not a MAC address (xx:xx:xx:xx:xx:xx)"));
        };
        let v4 = |field: &'static str, value: &str| value.parse::<Ipv4Addr>().map_err(|_| bad(field, value, "is not an IPv4 address"));
        let v6 = |field: &'static str, value: &str| value.parse::<Ipv6Addr>().map_err(|_| bad(field, value, "is not an IPv6 address"));
        if info.ipv4_prefix_len > 32 {
            return Err(bad("ipv4_prefix_len", &info.ipv4_prefix_len.to_string(), "is longer than 32"));
        }
        if info.ipv6_prefix_len > 128 {
            return Err(bad("ipv6_prefix_len", &info.ipv6_prefix_len.to_string(), "is longer than 128"));
        }
        Ok(Checked {
            info,
            guest_mac: format_mac(guest_mac),
            guest_ipv4: v4("guest_ipv4", &info.guest_ipv4)?,
            gateway_ipv4: v4("gateway_ipv4", &info.gateway_ipv4)?,
            netmask: ipv4_netmask(info.ipv4_prefix_len),
            // The kernel's ip= takes IPv4 resolvers only.
            dns: v4("dns", &info.dns)?,
            guest_ipv6: v6("guest_ipv6", &info.guest_ipv6)?,
            gateway_ipv6: v6("gateway_ipv6", &info.gateway_ipv6)?,
        })
    }

    /// The kernel's boot-time IPv4 configuration (Documentation/admin-guide/
    /// nfs/nfsroot.rst): `ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:
    /// <hostname>:<device>:<autoconf>:<dns0-ip>`, no NFS server, no
    /// hostname, autoconf off. It is IPv4 only: the guest adds its IPv6
    /// address and route itself (no router advertisements on the tap).
    fn kernel_ip_arg(&self) -> String {
        format!("ip={}::{}:{}::{GUEST_IFNAME}:off:{}", self.guest_ipv4, self.gateway_ipv4, self.netmask, self.dns)
    }

    /// The CA certificate's path, if the sandbox has one.
    fn ca_cert(&self) -> Option<&str> {
        Some(self.info.ca_cert.as_str()).filter(|p| !p.is_empty())
    }
}

/// Firecracker: its config file's `network-interfaces` array (each element
/// is also the body of `PUT /network-interfaces/{iface_id}`), the `ip=`
/// argument for `boot-source.boot_args`, the IPv6 configuration the guest
/// must apply itself, and the CA certificate to copy into the guest.
fn firecracker(c: &Checked<'_>) -> Result<String, HandoffError> {
    let info = c.info;
    let value = json!({
        "network-interfaces": [{
            "iface_id": GUEST_IFNAME,
            "host_dev_name": info.tap,
            "guest_mac": c.guest_mac,
        }],
        "boot_args": c.kernel_ip_arg(),
        "ipv6": {
            "address": format!("{}/{}", c.guest_ipv6, info.ipv6_prefix_len),
            "gateway": c.gateway_ipv6.to_string(),
        },
        "ca_cert": c.ca_cert(),
    });
    Ok(serde_json::to_string_pretty(&value)?)
}

/// Cloud Hypervisor: the words to add to its command line, one flag and
/// its value a line, meant for an unquoted `$(…)`: so no value may hold
/// white space (word splitting) or a glob character (`*`, `?`, `[`, and
/// `\`, which some shells treat as a pattern too), or the shell would
/// change the words. Only the tap name is not ours (an adopted tap is named
/// by whoever made it); the MAC is re-formatted hex, the rest addresses.
/// Not `ip=`/`mask=` (the tap has its addresses), not `host_mac=` (the
/// tap's MAC is the gateway's, which the datapath checks); the offloads
/// stay Cloud Hypervisor's defaults, which sbx-net's own VMM offers too.
fn cloud_hypervisor(c: &Checked<'_>) -> Result<String, HandoffError> {
    if c.info.tap.contains(|ch: char| ch.is_whitespace() || matches!(ch, '*' | '?' | '[' | '\\')) {
        return Err(HandoffError::Field {
            sandbox: c.info.name.clone(),
            field: "tap",
            value: c.info.tap.clone(),
            problem: "holds white space or a glob character ('*', '?', '[', '\\'), which an unquoted $(…) would split or expand",
        });
    }
    Ok(format!("--net tap={},mac={},num_queues={CLOUD_HYPERVISOR_NUM_QUEUES}\n--cmdline {}", c.info.tap, c.guest_mac, c.kernel_ip_arg()))
}

/// Shell assignments, one a line, every value single-quoted so `eval`
/// (or `.`) in any POSIX shell gives back exactly the value.
fn env(info: &SandboxInfo) -> Result<String, HandoffError> {
    // What the VMM formats need is checked as for them; a sandbox whose
    // addresses do not parse gets no kernel argument rather than a wrong one.
    let checked = Checked::from(info)?;
    let kernel_ip = checked.kernel_ip_arg();
    let vars: [(&str, String); 18] = [
        ("NAME", info.name.clone()),
        ("ID", info.id.to_string()),
        ("POLICY", info.policy.clone()),
        ("TAP", info.tap.clone()),
        ("NETNS", info.netns.clone().unwrap_or_default()),
        ("GUEST_MAC", checked.guest_mac.clone()),
        ("GATEWAY_MAC", info.gateway_mac.clone()),
        ("GUEST_IPV4", info.guest_ipv4.clone()),
        ("IPV4_PREFIX_LEN", info.ipv4_prefix_len.to_string()),
        ("GATEWAY_IPV4", info.gateway_ipv4.clone()),
        ("GUEST_IPV6", info.guest_ipv6.clone()),
        ("IPV6_PREFIX_LEN", info.ipv6_prefix_len.to_string()),
        ("GATEWAY_IPV6", info.gateway_ipv6.clone()),
        ("DNS", info.dns.clone()),
        ("CA_CERT", info.ca_cert.clone()),
        ("KERNEL_IP_ARG", kernel_ip),
        ("GUEST_IFNAME", GUEST_IFNAME.to_string()),
        ("VM_CONSOLE", info.vm.as_ref().map(|v| v.console.clone()).unwrap_or_default()),
    ];
    let mut out = Vec::with_capacity(vars.len());
    for (name, value) in vars {
        let quoted = shell_quote(&value).ok_or_else(|| HandoffError::Field {
            sandbox: info.name.clone(),
            field: "value",
            value: value.clone(),
            problem: "holds a NUL byte, which no shell variable can",
        })?;
        out.push(format!("SBX_NET_{name}={quoted}"));
    }
    Ok(out.join("\n"))
}

/// `value` as one single-quoted shell word: inside single quotes nothing
/// is special but the quote itself, which is closed, escaped and reopened
/// (`'\''`). None for a NUL byte, which a shell variable cannot hold.
pub fn shell_quote(value: &str) -> Option<String> {
    if value.contains('\0') {
        return None;
    }
    Some(format!("'{}'", value.replace('\'', r"'\''")))
}

/// The dotted netmask of an IPv4 prefix length (≤ 32).
fn ipv4_netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::MAX.checked_shl(32 - u32::from(prefix_len.min(32))).unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// `xx:xx:xx:xx:xx:xx`, each `x` a hex digit (either case), and nothing
/// else: not `+a` (which `u8::from_str_radix` takes), not one digit.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut bytes = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut bytes {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(bytes)
}

/// A MAC as the kernel prints it: lower-case, two digits a byte.
fn format_mac(bytes: [u8; 6]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SandboxInfo {
        serde_json::from_value(json!({
            "name": "agent-1", "id": 3, "policy": "it's \"$(rm -rf /)\" `x` \\ \n; $HOME", "policy_generation": 1, "tap": "sbx-3",
            "adopted_tap": false, "netns": null,
            "guest_ipv4": "10.200.0.14", "guest_ipv6": "fd73:6278:0:3::2", "guest_mac": "02:5b:00:00:00:03",
            "gateway_ipv4": "10.200.0.13", "gateway_ipv6": "fd73:6278:0:3::1", "gateway_mac": "02:5a:00:00:00:03",
            "ipv4_prefix_len": 30, "ipv6_prefix_len": 64, "dns": "10.200.0.13",
            "ca_cert": "/var/lib/sbx-net/ca/agent-1/ca.pem", "created_unix": 1700000000
        }))
        .unwrap()
    }

    #[test]
    fn json_is_the_daemons_answer_on_one_line() {
        let text = render(Format::Json, &info()).unwrap();
        assert!(!text.contains('\n'));
        let back: SandboxInfo = serde_json::from_str(&text).unwrap();
        assert_eq!(back, info());
    }

    #[test]
    fn firecracker_gets_its_network_interface_the_ip_argument_and_the_ca() {
        let v: serde_json::Value = serde_json::from_str(&render(Format::Firecracker, &info()).unwrap()).unwrap();
        assert_eq!(
            v["network-interfaces"],
            json!([{ "iface_id": "eth0", "host_dev_name": "sbx-3", "guest_mac": "02:5b:00:00:00:03" }])
        );
        assert_eq!(v["boot_args"], "ip=10.200.0.14::10.200.0.13:255.255.255.252::eth0:off:10.200.0.13");
        assert_eq!(v["ipv6"], json!({ "address": "fd73:6278:0:3::2/64", "gateway": "fd73:6278:0:3::1" }));
        assert_eq!(v["ca_cert"], "/var/lib/sbx-net/ca/agent-1/ca.pem");
        let mut no_ca = info();
        no_ca.ca_cert.clear();
        let v: serde_json::Value = serde_json::from_str(&render(Format::Firecracker, &no_ca).unwrap()).unwrap();
        assert_eq!(v["ca_cert"], serde_json::Value::Null, "no CA: null, not an empty path");
    }

    #[test]
    fn cloud_hypervisor_gets_net_and_cmdline_words() {
        let text = render(Format::CloudHypervisor, &info()).unwrap();
        assert_eq!(
            text,
            "--net tap=sbx-3,mac=02:5b:00:00:00:03,num_queues=2\n--cmdline ip=10.200.0.14::10.200.0.13:255.255.255.252::eth0:off:10.200.0.13"
        );
        assert_eq!(text.split_whitespace().count(), 4, "word splitting gives flag, value, flag, value");
    }

    #[test]
    fn env_quotes_every_value_for_eval() {
        let text = render(Format::Env, &info()).unwrap();
        let lines: Vec<&str> = text.split("\nSBX_NET_").collect();
        assert_eq!(lines.len(), 18);
        assert!(text.starts_with("SBX_NET_NAME='agent-1'\n"));
        assert!(text.contains("\nSBX_NET_TAP='sbx-3'\n"));
        assert!(text.contains("\nSBX_NET_NETNS=''\n"));
        assert!(text.contains("\nSBX_NET_KERNEL_IP_ARG='ip=10.200.0.14::10.200.0.13:255.255.255.252::eth0:off:10.200.0.13'\n"));
        assert!(text.contains("\nSBX_NET_CA_CERT='/var/lib/sbx-net/ca/agent-1/ca.pem'\n"));
        // The quote is closed, escaped and reopened; nothing else is touched.
        assert!(text.contains("\nSBX_NET_POLICY='it'\\''s \"$(rm -rf /)\" `x` \\ \n; $HOME'\n"), "{text}");
    }

    #[test]
    fn env_survives_a_real_shell_eval() {
        // The shell is the judge of quoting: eval each line, print back.
        let text = render(Format::Env, &info()).unwrap();
        let script = format!("{text}\nprintf '%s' \"$SBX_NET_POLICY\"");
        let Ok(out) = std::process::Command::new("sh").arg("-c").arg(&script).output() else {
            eprintln!("skipped: no sh");
            return;
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), info().policy);
    }

    #[test]
    fn shell_quote_handles_quotes_and_refuses_nul() {
        assert_eq!(shell_quote("").unwrap(), "''");
        assert_eq!(shell_quote("'").unwrap(), r"''\'''");
        assert_eq!(shell_quote("a b").unwrap(), "'a b'");
        assert_eq!(shell_quote("a\0b"), None);
        let mut nul = info();
        nul.policy = "p\0".into();
        assert!(matches!(render(Format::Env, &nul), Err(HandoffError::Field { field: "value", .. })));
    }

    #[test]
    fn values_that_would_break_a_vmm_syntax_are_refused() {
        type Spoiler = (&'static str, fn(&mut SandboxInfo));
        let cases: [Spoiler; 7] = [
            ("tap", |i| i.tap = "sbx-3,mac=00:00:00:00:00:01".into()),
            ("tap", |i| i.tap = "a:b".into()),
            ("tap", |i| i.tap = "x".repeat(16)),
            ("guest_mac", |i| i.guest_mac = "02:5b:00:00:00:03,num_queues=8".into()),
            ("guest_ipv4", |i| i.guest_ipv4 = "10.0.0.1::evil".into()),
            ("ipv4_prefix_len", |i| i.ipv4_prefix_len = 33),
            ("dns", |i| i.dns = "fd00::1".into()),
        ];
        for (field, spoil) in cases {
            let mut bad = info();
            spoil(&mut bad);
            for format in [Format::Firecracker, Format::CloudHypervisor, Format::Env] {
                match render(format, &bad) {
                    Err(HandoffError::Field { field: f, .. }) => assert_eq!(f, field),
                    other => panic!("{format:?} with a bad {field}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn macs_are_parsed_strictly_and_printed_from_their_bytes() {
        assert_eq!(parse_mac("02:5b:00:00:00:03"), Some([2, 0x5b, 0, 0, 0, 3]));
        assert_eq!(parse_mac("02:5B:0a:Ff:00:03"), Some([2, 0x5b, 0x0a, 0xff, 0, 3]));
        for bad in ["+2:5b:00:00:00:03", "02:+b:00:00:00:03", "02:5b:00:00:00:-3", "02:5b:00:00:00", "02:5b:00:00:00:03:04", "2:5b:00:00:00:003", "02:5b:00:00:00:0g", "02:5b:00:00:00:\u{e9}"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let mut plus = info();
        plus.guest_mac = "+2:5b:00:00:00:03".into();
        for format in [Format::Firecracker, Format::CloudHypervisor, Format::Env] {
            assert!(matches!(render(format, &plus), Err(HandoffError::Field { field: "guest_mac", .. })), "{format:?}");
        }
        let mut upper = info();
        upper.guest_mac = "02:5B:00:0A:00:03".into();
        let fc: serde_json::Value = serde_json::from_str(&render(Format::Firecracker, &upper).unwrap()).unwrap();
        assert_eq!(fc["network-interfaces"][0]["guest_mac"], "02:5b:00:0a:00:03");
        assert!(render(Format::CloudHypervisor, &upper).unwrap().contains(",mac=02:5b:00:0a:00:03,"));
        assert!(render(Format::Env, &upper).unwrap().contains("\nSBX_NET_GUEST_MAC='02:5b:00:0a:00:03'\n"));
    }

    #[test]
    fn cloud_hypervisor_refuses_a_tap_the_shell_would_split_or_glob() {
        for tap in ["tap*", "t?p", "tap[0]", "tap\\1", "tap\u{a0}1", "tap\u{2003}"] {
            let mut adopted = info();
            adopted.tap = tap.into();
            match render(Format::CloudHypervisor, &adopted) {
                Err(HandoffError::Field { field: "tap", problem, .. }) => assert!(problem.contains("glob"), "{problem}"),
                other => panic!("{tap:?}: {other:?}"),
            }
            // Quoted JSON and single-quoted shell words carry it unchanged.
            render(Format::Firecracker, &adopted).unwrap_or_else(|e| panic!("{tap:?}: {e}"));
            render(Format::Env, &adopted).unwrap_or_else(|e| panic!("{tap:?}: {e}"));
        }
    }

    #[test]
    fn a_tap_with_a_guest_is_not_handed_to_a_vmm() {
        let mut netns = info();
        netns.netns = Some("sbx-agent-1".into());
        let mut vm = info();
        vm.vm = Some(crate::control::api::VmInfo { pid: 42, state: "running".into(), console: "/run/vm.log".into() });
        for busy in [&netns, &vm] {
            for format in [Format::Firecracker, Format::CloudHypervisor] {
                assert!(matches!(render(format, busy), Err(HandoffError::TapInUse { .. })), "{format:?}");
            }
            render(Format::Env, busy).unwrap();
            render(Format::Json, busy).unwrap();
        }
        assert!(render(Format::Env, &vm).unwrap().contains("\nSBX_NET_VM_CONSOLE='/run/vm.log'"));
        // A VM that exited left the tap free.
        vm.vm.as_mut().unwrap().state = "exited".into();
        render(Format::Firecracker, &vm).unwrap();
    }

    #[test]
    fn netmasks_of_every_prefix() {
        assert_eq!(ipv4_netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(ipv4_netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(ipv4_netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(ipv4_netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
