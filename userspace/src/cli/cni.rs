//! `sbx-net-cni`: a CNI plugin (spec 1.0.0) that gives a container's VM a
//! sandbox. The runtime runs it with the CNI_* environment and the network
//! configuration on stdin; it asks the daemon, over the control socket, for
//! a sandbox with a tap, and answers with the CNI result (or a CNI error).
//!
//! Design: the tap stays in the daemon's (host) network namespace, where the
//! eBPF classifier and the nftables redirects apply; the runtime's VMM
//! opens it by name there, as firecracker-containerd and Kata do with host
//! taps. Nothing is created in the container's namespace (`CNI_NETNS`): the
//! result names the tap (host side, `sandbox` empty) and the VM's NIC
//! (`CNI_IFNAME` with the guest MAC, `sandbox` = `CNI_NETNS`), the guest's
//! addresses, default routes and resolver. The sandbox's name is derived
//! from the attachment (network name, container id, interface name), so
//! CHECK and DEL find it again without state of the plugin's own.
//!
//! The daemon's socket: the network configuration's `socket`; without one,
//! the `socket` of /etc/sbx-net/config.toml when that file exists (a file
//! that does not load is error 7, not a guess), else
//! /run/sbx-net/sbx-net.sock. The plugin reads nothing else of
//! config.toml.
//!
//! ADD and CHECK validate the whole configuration (the spec's codes); CHECK
//! also fails when the sandbox enforces another policy than the
//! configuration names (an operator who changed the policy must DEL and
//! ADD to apply it). DEL reads only what it uses (the network name, the
//! socket, a `cniVersion` to echo in an error) and ignores the rest, so
//! editing or upgrading the configuration while pods run never wedges
//! their teardown; a sandbox that is already gone is a success, as the
//! spec asks of DEL.
//!
//! Everything but the daemon, config.toml and the interface look-up is pure
//! and unit-tested here; the binary (`src/bin/sbx-net-cni.rs`) is a shim.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::control::api::{call, ClientError, ErrorKind, Request, SandboxInfo};

/// The spec version this plugin speaks (results and errors are 1.0.0's).
pub const SPEC_VERSION: &str = "1.0.0";
/// What `VERSION` reports. 1.0.0 only: its results are what we build, and
/// 1.1.0 would oblige GC and STATUS.
pub const SUPPORTED_VERSIONS: [&str; 1] = [SPEC_VERSION];
/// How long one request to the daemon may take (a create builds a tap and
/// its datapath; runtimes give a plugin minutes).
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// The spec's well-known error codes, and ours (≥ 100).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The daemon refused or failed the request (its message in `details`).
    pub const DAEMON_FAILED: u32 = 100;
    /// ADD for an attachment whose sandbox exists already (no DEL between).
    pub const ALREADY_ADDED: u32 = 101;
    /// CHECK: the sandbox is missing, or differs from `prevResult`.
    pub const CHECK_FAILED: u32 = 102;
    /// The sandbox's tap is not in the plugin's network namespace, so the
    /// runtime (which runs plugins in its own) could not open it.
    pub const TAP_NOT_HERE: u32 = 103;
}

/// A CNI error: what the plugin prints on stdout before exiting non-zero.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    /// The spec's error object, with the configuration's version (or ours
    /// when it gave none we could read).
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The invocation's environment, validated for its command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// `CNI_NETNS`: required for ADD and CHECK, optional for DEL.
    pub netns: Option<String>,
    pub ifname: String,
}

/// Reads and checks the CNI_* variables (`get` is the environment).
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
    let var = |name: &str| get(name).filter(|v| !v.is_empty());
    let command = match var("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => return Ok(Invocation { command: Command::Version, container_id: String::new(), netns: None, ifname: String::new() }),
        // 1.0 knows four commands; 1.1's GC and STATUS are unknown to a
        // 1.0 plugin (and a runtime asks them only of 1.1 plugins).
        Some(other) => return Err(CniError::new(code::INVALID_ENVIRONMENT, format!("unknown CNI_COMMAND: {other}"), "CNI_COMMAND must be ADD, DEL, CHECK or VERSION")),
        None => return Err(CniError::new(code::INVALID_ENVIRONMENT, "required env variables [CNI_COMMAND] missing", "")),
    };
    let container_id = var("CNI_CONTAINERID");
    let netns = var("CNI_NETNS");
    let ifname = var("CNI_IFNAME");
    let mut missing = Vec::new();
    if container_id.is_none() {
        missing.push("CNI_CONTAINERID");
    }
    if netns.is_none() && command != Command::Del {
        missing.push("CNI_NETNS");
    }
    if ifname.is_none() {
        missing.push("CNI_IFNAME");
    }
    if !missing.is_empty() {
        return Err(CniError::new(code::INVALID_ENVIRONMENT, format!("required env variables [{}] missing", missing.join(",")), ""));
    }
    let (container_id, ifname) = (container_id.unwrap_or_default(), ifname.unwrap_or_default());
    if !is_cni_name(&container_id) {
        return Err(CniError::new(code::INVALID_ENVIRONMENT, "invalid characters in CNI_CONTAINERID", container_id));
    }
    if let Err(problem) = check_ifname(&ifname) {
        return Err(CniError::new(code::INVALID_ENVIRONMENT, format!("invalid CNI_IFNAME: {problem}"), ifname));
    }
    Ok(Invocation { command, container_id, netns, ifname })
}

/// The spec's rule for container ids and network names: an alphanumeric,
/// then alphanumerics, '_', '.' or '-'.
pub fn is_cni_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric()) && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The kernel's interface-name rules, as libcni checks them.
fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.len() > 15 {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("\".\" or \"..\"");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0') {
        return Err("contains '/', ':' or white space");
    }
    Ok(())
}

/// The network configuration on stdin, as this plugin reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The sbx-net policy the sandbox enforces (required: there is no
    /// default policy to fall back to, fail closed).
    pub policy: String,
    /// `socket`, if the configuration names one (see [`resolve_socket`]).
    pub socket: Option<PathBuf>,
    /// The previous plugin's result (ADD in a chain), or the attachment's
    /// final result (CHECK, DEL), kept as given to pass it through.
    pub prev_result: Option<Map<String, Value>>,
}

/// The `cniVersion` of whatever is on stdin, for the error object: the
/// spec wants errors in the configuration's version.
pub fn stdin_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

/// Parses and checks the configuration for ADD and CHECK: not JSON → 6, a
/// version other than 1.0.0 → 1, `ipam` (we assign the addresses) → 2, no
/// usable name, policy or socket → 7.
pub fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let mut conf = parse_object(stdin)?;
    let cni_version = match conf.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        // libcni reads a missing version as 0.1.0, which we do not speak.
        None => return Err(incompatible("(none: 0.1.0)")),
        Some(other) => return Err(not_a_version(other)),
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(incompatible(&cni_version));
    }
    let name = network_name(&conf)?;
    if let Some(ipam) = conf.get("ipam") {
        // The daemon assigns the sandbox's addresses; an IPAM plugin's
        // would be silently ignored, so it is refused.
        return Err(CniError::new(code::UNSUPPORTED_FIELD, format!("unsupported field ipam: {ipam}"), "sbx-net assigns the sandbox's addresses itself; remove ipam"));
    }
    let policy = match conf.get("policy") {
        Some(Value::String(p)) if !p.is_empty() => p.clone(),
        None => return Err(CniError::new(code::INVALID_CONFIG, "missing policy", "the configuration must name the sbx-net policy the sandbox enforces (\"policy\": \"NAME\")")),
        Some(other) => return Err(CniError::new(code::INVALID_CONFIG, "policy must be a policy name", other.to_string())),
    };
    let socket = configured_socket(&conf)?;
    let prev_result = match conf.remove("prevResult") {
        None | Some(Value::Null) => None,
        Some(Value::Object(prev)) => Some(prev),
        Some(other) => return Err(CniError::new(code::DECODING_FAILURE, "prevResult is not a result object", other.to_string())),
    };
    Ok(NetConf { cni_version, name, policy, socket, prev_result })
}

/// What DEL needs of the configuration: the attachment's network and the
/// daemon's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelConf {
    pub name: String,
    pub socket: Option<PathBuf>,
}

/// Parses the configuration for DEL, leniently: the configuration may have
/// changed since ADD (another version, another policy, a key ADD refuses),
/// and a DEL that failed on that would leave the pod's teardown stuck
/// forever. So only what DEL uses is checked: a JSON object (6), a
/// `cniVersion` that is a string when present, any version (6: DEL
/// returns no result, so no version's format matters, and the error
/// object echoes it), a valid network name and socket (7). `policy`,
/// `ipam`, `prevResult` and everything else are ignored.
pub fn parse_del_config(stdin: &[u8]) -> Result<DelConf, CniError> {
    let conf = parse_object(stdin)?;
    if let Some(version) = conf.get("cniVersion").filter(|v| !v.is_string()) {
        return Err(not_a_version(version));
    }
    Ok(DelConf { name: network_name(&conf)?, socket: configured_socket(&conf)? })
}

fn parse_object(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| CniError::new(code::DECODING_FAILURE, "error decoding the network configuration", e.to_string()))?;
    match value {
        Value::Object(conf) => Ok(conf),
        _ => Err(CniError::new(code::DECODING_FAILURE, "error decoding the network configuration", "it is not a JSON object")),
    }
}

fn not_a_version(value: &Value) -> CniError {
    CniError::new(code::DECODING_FAILURE, "cniVersion is not a string", value.to_string())
}

fn network_name(conf: &Map<String, Value>) -> Result<String, CniError> {
    match conf.get("name") {
        Some(Value::String(n)) if is_cni_name(n) => Ok(n.clone()),
        Some(Value::String(n)) if n.is_empty() => Err(CniError::new(code::INVALID_CONFIG, "missing network name", "")),
        Some(Value::String(n)) => Err(CniError::new(code::INVALID_CONFIG, "invalid characters found in network name", n.clone())),
        None => Err(CniError::new(code::INVALID_CONFIG, "missing network name", "")),
        Some(other) => Err(CniError::new(code::INVALID_CONFIG, "network name is not a string", other.to_string())),
    }
}

/// The configuration's `socket`, which must be absolute: the plugin runs in
/// the runtime's working directory, not the daemon's.
fn configured_socket(conf: &Map<String, Value>) -> Result<Option<PathBuf>, CniError> {
    match conf.get("socket") {
        None => Ok(None),
        Some(Value::String(s)) if Path::new(s).is_absolute() => Ok(Some(PathBuf::from(s))),
        Some(other) => Err(CniError::new(code::INVALID_CONFIG, "socket must be the daemon's control socket as an absolute path", other.to_string())),
    }
}

/// The daemon's socket: the network configuration's, else what
/// `daemon_socket` says (the daemon's own configuration file, see
/// [`daemon_config_socket`]), which must be absolute too.
pub fn resolve_socket(configured: Option<&Path>, daemon_socket: impl FnOnce() -> Result<PathBuf, String>) -> Result<PathBuf, CniError> {
    if let Some(socket) = configured {
        return Ok(socket.to_path_buf());
    }
    let file = crate::control::config::DEFAULT_CONFIG;
    let socket = daemon_socket().map_err(|reason| CniError::new(code::INVALID_CONFIG, format!("the network configuration names no socket, and {file} does not load"), reason))?;
    match socket.is_absolute() {
        true => Ok(socket),
        false => Err(CniError::new(code::INVALID_CONFIG, format!("the network configuration names no socket, and {file}'s is not an absolute path"), socket.display().to_string())),
    }
}

/// The socket the daemon listens on by its configuration: the `socket` of
/// /etc/sbx-net/config.toml when that file exists (Err: it does not load),
/// else the default.
pub fn daemon_config_socket() -> Result<PathBuf, String> {
    crate::control::config::DaemonConfig::load_or_default(None).map(|c| c.socket).map_err(|e| e.to_string())
}

fn incompatible(version: &str) -> CniError {
    CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions", format!("config is {version}, plugin supports {SUPPORTED_VERSIONS:?}"))
}

/// The sandbox of an attachment: `cni-` + the container id's first 12
/// characters (for people reading `sandbox list`) + 15 hex digits of the
/// SHA-256 of network name, container id and interface name (so distinct
/// attachments never share one). 32 characters at most, within the
/// daemon's name rule (letters, digits, '-', '_').
pub fn sandbox_name(network: &str, container_id: &str, ifname: &str) -> String {
    let short: String = container_id.chars().take(12).map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let mut input = Vec::with_capacity(network.len() + container_id.len() + ifname.len() + 2);
    for (i, part) in [network, container_id, ifname].iter().enumerate() {
        if i > 0 {
            input.push(0);
        }
        input.extend_from_slice(part.as_bytes());
    }
    let digest = sha256(&input);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("cni-{short}-{}", &hex[..15])
}

/// SHA-256 from the ring provider rustls already links (the proxy's TLS).
fn sha256(data: &[u8]) -> Vec<u8> {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().expect("a TLS 1.3 suite");
    debug_assert_eq!(suite.common.hash_provider.algorithm(), rustls::crypto::hash::HashAlgorithm::SHA256);
    suite.common.hash_provider.hash(data).as_ref().to_vec()
}

/// The 1.0.0 ADD result for the sandbox, after `prev` (a previous
/// plugin's result, passed through with ours appended).
pub fn build_result(conf: &NetConf, inv: &Invocation, info: &SandboxInfo) -> Value {
    let prev = conf.prev_result.clone().unwrap_or_default();
    let list = |key: &str| match prev.get(key) {
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    let mut interfaces = list("interfaces");
    let tap_index = interfaces.len();
    interfaces.push(json!({ "name": info.tap, "mac": info.gateway_mac, "sandbox": "" }));
    interfaces.push(json!({ "name": inv.ifname, "mac": info.guest_mac, "sandbox": inv.netns.clone().unwrap_or_default() }));
    let vm_nic = tap_index + 1;
    let mut ips = list("ips");
    ips.push(json!({ "address": format!("{}/{}", info.guest_ipv4, info.ipv4_prefix_len), "gateway": info.gateway_ipv4, "interface": vm_nic }));
    ips.push(json!({ "address": format!("{}/{}", info.guest_ipv6, info.ipv6_prefix_len), "gateway": info.gateway_ipv6, "interface": vm_nic }));
    let mut routes = list("routes");
    routes.push(json!({ "dst": "0.0.0.0/0", "gw": info.gateway_ipv4 }));
    routes.push(json!({ "dst": "::/0", "gw": info.gateway_ipv6 }));
    // The sandbox's resolver first: it is the only one its policy lets
    // through. A previous plugin's other DNS settings stay.
    let mut dns = match prev.get("dns") {
        Some(Value::Object(d)) => d.clone(),
        _ => Map::new(),
    };
    let mut nameservers = vec![Value::String(info.dns.clone())];
    if let Some(Value::Array(before)) = dns.get("nameservers") {
        nameservers.extend(before.iter().filter(|n| n.as_str() != Some(info.dns.as_str())).cloned());
    }
    dns.insert("nameservers".into(), Value::Array(nameservers));
    let mut result = prev;
    result.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    result.insert("interfaces".into(), Value::Array(interfaces));
    result.insert("ips".into(), Value::Array(ips));
    result.insert("routes".into(), Value::Array(routes));
    result.insert("dns".into(), Value::Object(dns));
    Value::Object(result)
}

/// CHECK: what ADD returned (`prev`) must still describe the sandbox the
/// daemon has: the tap and its MAC, the VM's NIC and its MAC, the guest's
/// addresses with their gateways, the resolver.
pub fn check_result(prev: &Map<String, Value>, inv: &Invocation, info: &SandboxInfo) -> Result<(), CniError> {
    let differs = |what: String| CniError::new(code::CHECK_FAILED, format!("sandbox {} differs from prevResult", info.name), what);
    let interfaces = match prev.get("interfaces") {
        Some(Value::Array(items)) => items.as_slice(),
        _ => return Err(differs("prevResult has no interfaces".into())),
    };
    let find = |name: &str| interfaces.iter().position(|i| i.get("name").and_then(Value::as_str) == Some(name));
    let mac_of = |index: usize| interfaces[index].get("mac").and_then(Value::as_str).map(str::to_ascii_lowercase);
    let tap = find(&info.tap).ok_or_else(|| differs(format!("no interface {} (the sandbox's tap) in prevResult", info.tap)))?;
    if mac_of(tap).as_deref() != Some(info.gateway_mac.as_str()) {
        return Err(differs(format!("tap {}: MAC {:?}, the daemon has {}", info.tap, mac_of(tap), info.gateway_mac)));
    }
    let nic = find(&inv.ifname).ok_or_else(|| differs(format!("no interface {} (the VM's NIC) in prevResult", inv.ifname)))?;
    if mac_of(nic).as_deref() != Some(info.guest_mac.as_str()) {
        return Err(differs(format!("{}: MAC {:?}, the daemon has {}", inv.ifname, mac_of(nic), info.guest_mac)));
    }
    let sandbox = interfaces[nic].get("sandbox").and_then(Value::as_str).unwrap_or_default();
    if Some(sandbox) != inv.netns.as_deref() {
        return Err(differs(format!("{}: sandbox {sandbox:?}, CNI_NETNS is {:?}", inv.ifname, inv.netns)));
    }
    let ips: &[Value] = match prev.get("ips") {
        Some(Value::Array(items)) => items,
        _ => &[],
    };
    for (address, gateway) in [
        (format!("{}/{}", info.guest_ipv4, info.ipv4_prefix_len), &info.gateway_ipv4),
        (format!("{}/{}", info.guest_ipv6, info.ipv6_prefix_len), &info.gateway_ipv6),
    ] {
        let listed = ips.iter().any(|ip| {
            ip.get("address").and_then(Value::as_str) == Some(address.as_str())
                && ip.get("gateway").and_then(Value::as_str) == Some(gateway.as_str())
                && ip.get("interface").and_then(Value::as_u64) == Some(nic as u64)
        });
        if !listed {
            return Err(differs(format!("{address} via {gateway} on interface {nic} is not in prevResult's ips")));
        }
    }
    let resolvers = prev.get("dns").and_then(|d| d.get("nameservers")).and_then(Value::as_array);
    if !resolvers.is_some_and(|r| r.iter().any(|n| n.as_str() == Some(info.dns.as_str()))) {
        return Err(differs(format!("the sandbox's resolver {} is not in prevResult's dns", info.dns)));
    }
    Ok(())
}

/// CHECK: the sandbox must enforce the policy the configuration names. The
/// sandbox keeps the policy it was made with; a configuration changed to
/// another (say a stricter one) is not in force until DEL and ADD, and
/// CHECK must say so rather than report a healthy attachment.
pub fn check_policy(conf: &NetConf, info: &SandboxInfo) -> Result<(), CniError> {
    if info.policy == conf.policy {
        return Ok(());
    }
    Err(CniError::new(
        code::CHECK_FAILED,
        format!("sandbox {} enforces policy {:?}, the network configuration names {:?}", info.name, info.policy, conf.policy),
        "the policy changed since ADD: DEL and ADD the attachment to apply it",
    ))
}

/// A client error in CNI terms, for `command`.
pub fn daemon_error(command: Command, socket: &Path, e: ClientError) -> CniError {
    match e {
        // The connect error names the socket already.
        ClientError::Connect { .. } => CniError::new(code::TRY_AGAIN_LATER, "the sbx-net daemon is not reachable", e.to_string()),
        ClientError::Io(_) => CniError::new(code::TRY_AGAIN_LATER, "the sbx-net daemon did not answer", format!("{e} (socket {})", socket.display())),
        ClientError::Protocol(_) => CniError::new(code::DAEMON_FAILED, "the sbx-net daemon's answer could not be read", e.to_string()),
        ClientError::Daemon { kind, message } => {
            let code = match (command, kind) {
                (_, ErrorKind::Unavailable | ErrorKind::Conflict) => code::TRY_AGAIN_LATER,
                (Command::Add, ErrorKind::NotFound | ErrorKind::InvalidPolicy) => code::INVALID_CONFIG,
                (Command::Add, ErrorKind::AlreadyExists) => code::ALREADY_ADDED,
                (Command::Check, ErrorKind::NotFound) => code::CHECK_FAILED,
                _ => code::DAEMON_FAILED,
            };
            CniError::new(code, format!("the sbx-net daemon refused: {}", kind.as_str()), message)
        }
    }
}

/// What the plugin needs of the world: the daemon and the host's links.
pub trait Backend {
    fn create(&self, name: &str, policy: &str) -> Result<SandboxInfo, ClientError>;
    fn show(&self, name: &str) -> Result<SandboxInfo, ClientError>;
    fn delete(&self, name: &str) -> Result<(), ClientError>;
    /// Whether interface `name` exists in the plugin's network namespace.
    fn link_exists(&self, name: &str) -> bool;
}

/// The real backend: the daemon's control socket and the plugin's network
/// namespace.
pub struct DaemonBackend {
    pub socket: PathBuf,
}

impl DaemonBackend {
    fn sandbox(&self, request: Request, name: &str) -> Result<SandboxInfo, ClientError> {
        let answer = call(&self.socket, &request, DAEMON_TIMEOUT)?;
        serde_json::from_value(answer).map_err(|e| ClientError::Protocol(format!("the answer for sandbox {name} is not a sandbox: {e}")))
    }
}

impl Backend for DaemonBackend {
    fn create(&self, name: &str, policy: &str) -> Result<SandboxInfo, ClientError> {
        let request = Request::SandboxCreate { name: name.into(), policy: policy.into(), tap: None, netns_guest: false, vm: None };
        self.sandbox(request, name)
    }

    fn show(&self, name: &str) -> Result<SandboxInfo, ClientError> {
        self.sandbox(Request::SandboxShow { name: name.into() }, name)
    }

    fn delete(&self, name: &str) -> Result<(), ClientError> {
        call(&self.socket, &Request::SandboxDelete { name: name.into() }, DAEMON_TIMEOUT).map(|_| ())
    }

    fn link_exists(&self, name: &str) -> bool {
        // The kernel's look-up in the calling thread's network namespace;
        // /sys/class/net would show the namespace sysfs was mounted in,
        // which is not the runtime's when it entered a namespace with
        // setns (as containerd in a pod netns does) rather than `ip netns exec`.
        crate::sandbox::ifindex_of(name).is_some()
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
    /// One line for stderr (the runtime's log), if any.
    pub log: Option<String>,
}

/// Where the plugin finds the world: the daemon's socket when the network
/// configuration names none ([`daemon_config_socket`]), and the backend
/// for a socket.
pub struct World<S, F> {
    pub daemon_socket: S,
    pub backend: F,
}

/// One invocation: environment and stdin in, output out.
pub fn run<B: Backend>(
    get_env: impl Fn(&str) -> Option<String>,
    stdin: Result<Vec<u8>, std::io::Error>,
    world: World<impl FnOnce() -> Result<PathBuf, String>, impl FnOnce(&Path) -> B>,
) -> Outcome {
    let stdin_bytes = stdin.as_deref().ok().unwrap_or_default();
    let version = stdin_version(stdin_bytes).unwrap_or_else(|| SPEC_VERSION.to_string());
    match execute(get_env, stdin, world) {
        Ok((stdout, log)) => Outcome { stdout, exit_code: 0, log },
        Err(e) => Outcome { stdout: e.to_json(&version).to_string(), exit_code: 1, log: Some(e.to_string()) },
    }
}

fn execute<B: Backend>(
    get_env: impl Fn(&str) -> Option<String>,
    stdin: Result<Vec<u8>, std::io::Error>,
    world: World<impl FnOnce() -> Result<PathBuf, String>, impl FnOnce(&Path) -> B>,
) -> Result<(String, Option<String>), CniError> {
    let inv = parse_env(get_env)?;
    let stdin = stdin.map_err(|e| CniError::new(code::IO_FAILURE, "error reading the network configuration from stdin", e.to_string()))?;
    match inv.command {
        Command::Version => {
            // The input's version echoed, as the spec asks; none readable: ours.
            let version = stdin_version(&stdin).unwrap_or_else(|| SPEC_VERSION.to_string());
            Ok((json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS }).to_string(), None))
        }
        Command::Del => {
            let conf = parse_del_config(&stdin)?;
            let socket = resolve_socket(conf.socket.as_deref(), world.daemon_socket)?;
            let name = sandbox_name(&conf.name, &inv.container_id, &inv.ifname);
            match (world.backend)(&socket).delete(&name) {
                Ok(()) => Ok((String::new(), Some(format!("sbx-net-cni: DEL {}/{}: sandbox {name} deleted", inv.container_id, inv.ifname)))),
                // DEL again, or after a failed ADD: nothing to undo.
                Err(ClientError::Daemon { kind: ErrorKind::NotFound, .. }) => Ok((String::new(), None)),
                Err(e) => Err(daemon_error(Command::Del, &socket, e)),
            }
        }
        Command::Add | Command::Check => {
            let conf = parse_config(&stdin)?;
            let socket = resolve_socket(conf.socket.as_deref(), world.daemon_socket)?;
            let name = sandbox_name(&conf.name, &inv.container_id, &inv.ifname);
            let backend = (world.backend)(&socket);
            match inv.command {
                Command::Add => add(&conf, &inv, &name, &socket, &backend),
                _ => check(&conf, &inv, &name, &socket, &backend).map(|()| (String::new(), None)),
            }
        }
    }
}

fn add(conf: &NetConf, inv: &Invocation, name: &str, socket: &Path, backend: &impl Backend) -> Result<(String, Option<String>), CniError> {
    let info = backend.create(name, &conf.policy).map_err(|e| daemon_error(Command::Add, socket, e))?;
    if !backend.link_exists(&info.tap) {
        // The runtime could not open it: undo, and say why.
        let undo = backend.delete(name).err().map(|e| format!("; deleting the sandbox again failed: {e}")).unwrap_or_default();
        return Err(CniError::new(
            code::TAP_NOT_HERE,
            format!("the sandbox's tap {} is not in this network namespace", info.tap),
            format!("run the runtime (and this plugin) in the sbx-net daemon's network namespace{undo}"),
        ));
    }
    let result = build_result(conf, inv, &info);
    Ok((result.to_string(), Some(format!("sbx-net-cni: ADD {}/{}: sandbox {name}, tap {}", inv.container_id, inv.ifname, info.tap))))
}

fn check(conf: &NetConf, inv: &Invocation, name: &str, socket: &Path, backend: &impl Backend) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult", "the runtime must pass the ADD result as prevResult"))?;
    let info = backend.show(name).map_err(|e| daemon_error(Command::Check, socket, e))?;
    check_policy(conf, &info)?;
    check_result(prev, inv, &info)?;
    if !backend.link_exists(&info.tap) {
        return Err(CniError::new(code::CHECK_FAILED, format!("the sandbox's tap {} is missing", info.tap), format!("sandbox {name}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::*;

    const NETNS: &str = "/var/run/netns/cni-1234";
    const CONTAINER: &str = "0123456789abcdef0123456789abcdef";

    fn env(command: &str) -> impl Fn(&str) -> Option<String> {
        let vars: BTreeMap<&str, String> = [
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", CONTAINER.to_string()),
            ("CNI_NETNS", NETNS.to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", "/opt/cni/bin".to_string()),
        ]
        .into_iter()
        .collect();
        move |k| vars.get(k).cloned()
    }

    fn config() -> Vec<u8> {
        br#"{"cniVersion":"1.0.0","name":"sbx","type":"sbx-net-cni","policy":"agents","socket":"/run/test.sock"}"#.to_vec()
    }

    fn info(name: &str) -> SandboxInfo {
        serde_json::from_value(json!({
            "name": name, "id": 3, "policy": "agents", "policy_generation": 1, "tap": "sbx-3", "adopted_tap": false, "netns": null,
            "guest_ipv4": "10.200.0.14", "guest_ipv6": "fd73:6278:0:3::2", "guest_mac": "02:5b:00:00:00:03",
            "gateway_ipv4": "10.200.0.13", "gateway_ipv6": "fd73:6278:0:3::1", "gateway_mac": "02:5a:00:00:00:03",
            "ipv4_prefix_len": 30, "ipv6_prefix_len": 64, "dns": "10.200.0.13", "ca_cert": "", "created_unix": 0
        }))
        .unwrap()
    }

    /// A daemon in memory: its sandboxes, whether it answers, what it was asked.
    #[derive(Default)]
    struct FakeDaemon {
        sandboxes: RefCell<BTreeMap<String, SandboxInfo>>,
        down: bool,
        tap_elsewhere: bool,
        asked: RefCell<Vec<String>>,
        /// The sockets the plugin made a backend for.
        sockets: RefCell<Vec<PathBuf>>,
    }

    impl Backend for &FakeDaemon {
        fn create(&self, name: &str, policy: &str) -> Result<SandboxInfo, ClientError> {
            self.asked.borrow_mut().push(format!("create {name} {policy}"));
            self.reachable()?;
            if policy != "agents" {
                return Err(ClientError::Daemon { kind: ErrorKind::NotFound, message: format!("no policy named {policy:?}") });
            }
            if self.sandboxes.borrow().contains_key(name) {
                return Err(ClientError::Daemon { kind: ErrorKind::AlreadyExists, message: format!("sandbox {name:?} exists") });
            }
            self.sandboxes.borrow_mut().insert(name.into(), info(name));
            Ok(info(name))
        }
        fn show(&self, name: &str) -> Result<SandboxInfo, ClientError> {
            self.reachable()?;
            self.sandboxes.borrow().get(name).cloned().ok_or_else(|| ClientError::Daemon { kind: ErrorKind::NotFound, message: format!("no sandbox named {name:?}") })
        }
        fn delete(&self, name: &str) -> Result<(), ClientError> {
            self.asked.borrow_mut().push(format!("delete {name}"));
            self.reachable()?;
            self.sandboxes.borrow_mut().remove(name).map(|_| ()).ok_or_else(|| ClientError::Daemon { kind: ErrorKind::NotFound, message: format!("no sandbox named {name:?}") })
        }
        fn link_exists(&self, name: &str) -> bool {
            !self.tap_elsewhere && self.sandboxes.borrow().values().any(|s| s.tap == name)
        }
    }

    impl FakeDaemon {
        fn reachable(&self) -> Result<(), ClientError> {
            match self.down {
                true => Err(ClientError::Connect { path: "/run/test.sock".into(), source: std::io::ErrorKind::ConnectionRefused.into() }),
                false => Ok(()),
            }
        }

        /// The plugin with /etc/sbx-net/config.toml naming [`CONFIG_TOML_SOCKET`].
        fn invoke(&self, env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> (Value, i32) {
            self.invoke_with(env, stdin, || Ok(PathBuf::from(CONFIG_TOML_SOCKET)))
        }

        fn invoke_with(&self, env: impl Fn(&str) -> Option<String>, stdin: &[u8], daemon_socket: impl FnOnce() -> Result<PathBuf, String>) -> (Value, i32) {
            let backend = |socket: &Path| {
                self.sockets.borrow_mut().push(socket.to_path_buf());
                self
            };
            let out = run(env, Ok(stdin.to_vec()), World { daemon_socket, backend });
            let v = if out.stdout.is_empty() { Value::Null } else { serde_json::from_str(&out.stdout).unwrap() };
            (v, out.exit_code)
        }
    }

    const CONFIG_TOML_SOCKET: &str = "/run/config-toml.sock";

    fn no_daemon_socket() -> Result<PathBuf, String> {
        panic!("the network configuration names its socket: config.toml is not read")
    }

    fn with_prev(prev: &Value) -> Vec<u8> {
        let mut conf: Value = serde_json::from_slice(&config()).unwrap();
        conf["prevResult"] = prev.clone();
        serde_json::to_vec(&conf).unwrap()
    }

    #[test]
    fn add_check_del_del_round_trip() {
        let daemon = FakeDaemon::default();
        let (result, exit) = daemon.invoke(env("ADD"), &config());
        assert_eq!(exit, 0, "{result}");
        let name = sandbox_name("sbx", CONTAINER, "eth0");
        assert_eq!(daemon.asked.borrow()[0], format!("create {name} agents"));
        assert_eq!(
            result,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    { "name": "sbx-3", "mac": "02:5a:00:00:00:03", "sandbox": "" },
                    { "name": "eth0", "mac": "02:5b:00:00:00:03", "sandbox": NETNS },
                ],
                "ips": [
                    { "address": "10.200.0.14/30", "gateway": "10.200.0.13", "interface": 1 },
                    { "address": "fd73:6278:0:3::2/64", "gateway": "fd73:6278:0:3::1", "interface": 1 },
                ],
                "routes": [{ "dst": "0.0.0.0/0", "gw": "10.200.0.13" }, { "dst": "::/0", "gw": "fd73:6278:0:3::1" }],
                "dns": { "nameservers": ["10.200.0.13"] },
            })
        );
        assert_eq!(daemon.invoke(env("CHECK"), &with_prev(&result)), (Value::Null, 0));
        // ADD again without DEL: the attachment exists.
        let (e, exit) = daemon.invoke(env("ADD"), &config());
        assert_eq!((e["code"].as_u64(), exit), (Some(101), 1), "{e}");
        assert_eq!(daemon.invoke(env("DEL"), &with_prev(&result)), (Value::Null, 0));
        assert!(daemon.sandboxes.borrow().is_empty());
        assert_eq!(daemon.invoke(env("DEL"), &with_prev(&result)), (Value::Null, 0), "DEL again is a success");
        assert!(daemon.sockets.borrow().iter().all(|s| s == Path::new("/run/test.sock")), "the configuration's socket: {:?}", daemon.sockets.borrow());
        // CHECK after DEL: the sandbox is gone.
        let (e, _) = daemon.invoke(env("CHECK"), &with_prev(&result));
        assert_eq!(e["code"], 102, "{e}");
    }

    #[test]
    fn del_without_netns_and_of_an_unknown_container_succeeds() {
        let daemon = FakeDaemon::default();
        let no_netns = |k: &str| if k == "CNI_NETNS" { None } else { env("DEL")(k) };
        assert_eq!(daemon.invoke(no_netns, &config()), (Value::Null, 0));
    }

    #[test]
    fn a_daemon_that_is_down_means_try_again_later() {
        let daemon = FakeDaemon { down: true, ..Default::default() };
        for command in ["ADD", "DEL", "CHECK"] {
            let stdin = if command == "CHECK" { with_prev(&json!({ "interfaces": [] })) } else { config() };
            let (e, exit) = daemon.invoke(env(command), &stdin);
            assert_eq!((e["code"].as_u64(), exit), (Some(11), 1), "{command}: {e}");
            assert_eq!(e["cniVersion"], "1.0.0");
            assert!(e["details"].as_str().unwrap().contains("/run/test.sock"), "{e}");
        }
    }

    #[test]
    fn a_tap_the_runtime_cannot_see_undoes_the_add() {
        let daemon = FakeDaemon { tap_elsewhere: true, ..Default::default() };
        let (e, exit) = daemon.invoke(env("ADD"), &config());
        assert_eq!((e["code"].as_u64(), exit), (Some(103), 1), "{e}");
        assert!(daemon.sandboxes.borrow().is_empty(), "the sandbox was deleted again");
    }

    #[test]
    fn check_finds_every_difference() {
        let daemon = FakeDaemon::default();
        let (result, _) = daemon.invoke(env("ADD"), &config());
        type Spoiler = (&'static str, fn(&mut Value));
        let spoilers: [Spoiler; 7] = [
            ("tap MAC", |r| r["interfaces"][0]["mac"] = json!("02:00:00:00:00:00")),
            ("tap name", |r| r["interfaces"][0]["name"] = json!("sbx-4")),
            ("guest MAC", |r| r["interfaces"][1]["mac"] = json!("02:00:00:00:00:00")),
            ("netns", |r| r["interfaces"][1]["sandbox"] = json!("/var/run/netns/other")),
            ("v4 address", |r| r["ips"][0]["address"] = json!("10.200.0.18/30")),
            ("v6 interface", |r| r["ips"][1]["interface"] = json!(0)),
            ("resolver", |r| r["dns"]["nameservers"] = json!(["8.8.8.8"])),
        ];
        for (what, spoil) in spoilers {
            let mut prev = result.clone();
            spoil(&mut prev);
            let (e, exit) = daemon.invoke(env("CHECK"), &with_prev(&prev));
            assert_eq!((e["code"].as_u64(), exit), (Some(102), 1), "{what}: {e}");
        }
        let (e, _) = daemon.invoke(env("CHECK"), &config());
        assert_eq!(e["code"], 7, "CHECK without prevResult: {e}");
        // Upper-case MACs are the same MACs.
        let mut upper = result.clone();
        upper["interfaces"][1]["mac"] = json!("02:5B:00:00:00:03");
        assert_eq!(daemon.invoke(env("CHECK"), &with_prev(&upper)), (Value::Null, 0));
    }

    #[test]
    fn add_after_another_plugin_appends_to_its_result() {
        let daemon = FakeDaemon::default();
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{ "name": "lo0", "mac": "00:00:00:00:00:00" }],
            "ips": [{ "address": "192.168.1.2/24", "interface": 0 }],
            "routes": [{ "dst": "192.168.0.0/16" }],
            "dns": { "nameservers": ["192.168.1.1", "10.200.0.13"], "search": ["corp"] },
            "custom": true,
        });
        let (r, exit) = daemon.invoke(env("ADD"), &with_prev(&prev));
        assert_eq!(exit, 0, "{r}");
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(r["interfaces"][2]["name"], "eth0");
        assert_eq!(r["ips"][0]["address"], "192.168.1.2/24");
        assert_eq!(r["ips"][1]["interface"], 2, "our addresses point at our NIC after the previous interfaces");
        assert_eq!(r["routes"].as_array().unwrap().len(), 3);
        assert_eq!(r["dns"], json!({ "nameservers": ["10.200.0.13", "192.168.1.1"], "search": ["corp"] }));
        assert_eq!(r["custom"], true, "what we do not know passes through");
        assert_eq!(daemon.invoke(env("CHECK"), &with_prev(&r)), (Value::Null, 0));
    }

    #[test]
    fn version_echoes_the_input_version() {
        let daemon = FakeDaemon::default();
        let only_command = |k: &str| (k == "CNI_COMMAND").then(|| "VERSION".to_string());
        assert_eq!(daemon.invoke(only_command, br#"{"cniVersion":"1.0.0"}"#), (json!({ "cniVersion": "1.0.0", "supportedVersions": ["1.0.0"] }), 0));
        assert_eq!(daemon.invoke(only_command, br#"{"cniVersion":"0.4.0"}"#).0["cniVersion"], "0.4.0");
        assert_eq!(daemon.invoke(only_command, b"").0["cniVersion"], "1.0.0", "no input: ours");
        assert!(daemon.asked.borrow().is_empty());
    }

    #[test]
    fn configuration_errors_have_the_specs_codes() {
        let daemon = FakeDaemon::default();
        let cases: [(&[u8], u32, &str); 12] = [
            (b"not json", 6, "1.0.0"),
            (b"[1,2]", 6, "1.0.0"),
            (br#"{"cniVersion":"0.4.0","name":"sbx","policy":"agents"}"#, 1, "0.4.0"),
            (br#"{"cniVersion":"1.1.0","name":"sbx","policy":"agents"}"#, 1, "1.1.0"),
            (br#"{"name":"sbx","policy":"agents"}"#, 1, "1.0.0"),
            (br#"{"cniVersion":1,"name":"sbx","policy":"agents"}"#, 6, "1.0.0"),
            (br#"{"cniVersion":"1.0.0","name":"sbx"}"#, 7, "1.0.0"),
            (br#"{"cniVersion":"1.0.0","name":"sbx","policy":""}"#, 7, "1.0.0"),
            (br#"{"cniVersion":"1.0.0","name":"a/b","policy":"agents"}"#, 7, "1.0.0"),
            (br#"{"cniVersion":"1.0.0","name":"sbx","policy":"agents","socket":"relative.sock"}"#, 7, "1.0.0"),
            (br#"{"cniVersion":"1.0.0","name":"sbx","policy":"agents","ipam":{"type":"host-local"}}"#, 2, "1.0.0"),
            (br#"{"cniVersion":"1.0.0","name":"sbx","policy":"nope","socket":"/run/test.sock"}"#, 7, "1.0.0"),
        ];
        for (stdin, want, version) in cases {
            let (e, exit) = daemon.invoke(env("ADD"), stdin);
            assert_eq!((e["code"].as_u64(), exit), (Some(u64::from(want)), 1), "{}: {e}", String::from_utf8_lossy(stdin));
            assert_eq!(e["cniVersion"], version, "{e}");
            assert!(!e["msg"].as_str().unwrap().is_empty());
        }
        let (e, _) = daemon.invoke(env("ADD"), br#"{"cniVersion":"1.0.0","name":"sbx","policy":"agents","ipam":{"type":"host-local"}}"#);
        assert!(e["msg"].as_str().unwrap().contains("ipam") && e["msg"].as_str().unwrap().contains("host-local"), "code 2 names the key and value: {e}");
        assert_eq!(daemon.asked.borrow().len(), 1, "only the valid config with an unknown policy reached the daemon");
    }

    #[test]
    fn environment_errors_are_code_4_and_name_the_variable() {
        let daemon = FakeDaemon::default();
        let without = |missing: &'static str, command: &'static str| move |k: &str| if k == missing { None } else { env(command)(k) };
        for (missing, command) in [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "ADD"), ("CNI_NETNS", "ADD"), ("CNI_NETNS", "CHECK"), ("CNI_IFNAME", "DEL")] {
            let (e, exit) = daemon.invoke(without(missing, command), &config());
            assert_eq!((e["code"].as_u64(), exit), (Some(4), 1), "{missing}: {e}");
            assert!(e["msg"].as_str().unwrap().contains(missing), "{e}");
        }
        for (key, value) in [("CNI_COMMAND", "GC"), ("CNI_COMMAND", "add"), ("CNI_CONTAINERID", "-leading"), ("CNI_CONTAINERID", "a b"), ("CNI_IFNAME", "eth0:1"), ("CNI_IFNAME", "a-very-long-ifname")] {
            let bad = move |k: &str| if k == key { Some(value.to_string()) } else { env("ADD")(k) };
            let (e, _) = daemon.invoke(bad, &config());
            assert_eq!(e["code"], 4, "{key}={value}: {e}");
        }
        assert!(daemon.asked.borrow().is_empty());
        // Unreadable stdin is an I/O failure.
        let out = run(env("ADD"), Err(std::io::ErrorKind::BrokenPipe.into()), World { daemon_socket: no_daemon_socket, backend: |_: &Path| &daemon });
        assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap()["code"], 5);
    }

    #[test]
    fn sandbox_names_are_stable_distinct_and_valid() {
        let a = sandbox_name("sbx", CONTAINER, "eth0");
        assert_eq!(a, sandbox_name("sbx", CONTAINER, "eth0"));
        assert!(a.starts_with("cni-0123456789ab-"), "{a}");
        assert_eq!(a.len(), 32);
        for other in [sandbox_name("sbx", CONTAINER, "eth1"), sandbox_name("sbx2", CONTAINER, "eth0"), sandbox_name("sbx", "0123456789abcdef0", "eth0")] {
            assert_ne!(a, other);
        }
        // The parts are separated: moving a byte across a boundary changes the name.
        assert_ne!(sandbox_name("ab", "c", "eth0"), sandbox_name("a", "bc", "eth0"));
        for id in ["a", "x.y_z-1", &"f".repeat(255)] {
            let name = sandbox_name("net.work", id, "eth0");
            crate::sandbox::SandboxSpec::new(1, &name, &crate::sandbox::AddressPools::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // SHA-256 of "sbx\0a\0eth0", checked against coreutils' sha256sum.
        assert_eq!(sandbox_name("sbx", "a", "eth0"), format!("cni-a-{}", &SHA256_SBX_A_ETH0[..15]));
    }

    /// `printf 'sbx\0a\0eth0' | sha256sum`.
    const SHA256_SBX_A_ETH0: &str = "d063190ac64b290b179e3e1e6597def89fc363cfcd266a7d151b6971593f9d8c";

    /// `config()` with `edit` applied to its JSON.
    fn config_with(edit: impl FnOnce(&mut Map<String, Value>)) -> Vec<u8> {
        let mut conf: Value = serde_json::from_slice(&config()).unwrap();
        edit(conf.as_object_mut().unwrap());
        serde_json::to_vec(&conf).unwrap()
    }

    #[test]
    fn check_fails_when_the_configuration_names_another_policy() {
        let daemon = FakeDaemon::default();
        let (result, _) = daemon.invoke(env("ADD"), &config());
        let stricter = config_with(|c| {
            c.insert("policy".into(), json!("strict"));
            c.insert("prevResult".into(), result.clone());
        });
        let (e, exit) = daemon.invoke(env("CHECK"), &stricter);
        assert_eq!((e["code"].as_u64(), exit), (Some(102), 1), "{e}");
        let msg = e["msg"].as_str().unwrap();
        assert!(msg.contains("\"agents\"") && msg.contains("\"strict\""), "the message names both policies: {e}");
        // The same configuration with the sandbox's policy passes.
        assert_eq!(daemon.invoke(env("CHECK"), &with_prev(&result)), (Value::Null, 0));
    }

    #[test]
    fn del_reads_only_what_it_uses_so_a_changed_configuration_still_tears_down() {
        let daemon = FakeDaemon::default();
        type Edit = (&'static str, fn(&mut Map<String, Value>));
        let changes: [Edit; 7] = [
            ("no policy", |c| drop(c.remove("policy"))),
            ("another policy", |c| drop(c.insert("policy".into(), json!("strict")))),
            ("a policy that is not a name", |c| drop(c.insert("policy".into(), json!(7)))),
            ("ipam", |c| drop(c.insert("ipam".into(), json!({ "type": "host-local" })))),
            ("an older cniVersion", |c| drop(c.insert("cniVersion".into(), json!("0.4.0")))),
            ("no cniVersion", |c| drop(c.remove("cniVersion"))),
            ("a prevResult that is not a result", |c| drop(c.insert("prevResult".into(), json!("garbage")))),
        ];
        for (what, edit) in changes {
            assert_eq!(daemon.invoke(env("ADD"), &config()).1, 0);
            assert_eq!(daemon.invoke(env("DEL"), &config_with(edit)), (Value::Null, 0), "DEL with {what}");
            assert!(daemon.sandboxes.borrow().is_empty(), "DEL with {what} deleted the sandbox");
        }
        // What DEL uses is still checked, and its errors echo the version.
        type Bad = (&'static str, fn(&mut Map<String, Value>), u64);
        let refusals: [Bad; 5] = [
            ("no name", |c| drop(c.remove("name")), 7),
            ("a bad name", |c| drop(c.insert("name".into(), json!("a/b"))), 7),
            ("a relative socket", |c| drop(c.insert("socket".into(), json!("x.sock"))), 7),
            ("a socket that is not a string", |c| drop(c.insert("socket".into(), json!(1))), 7),
            ("a cniVersion that is not a string", |c| drop(c.insert("cniVersion".into(), json!(1))), 6),
        ];
        let asked = daemon.asked.borrow().len();
        for (what, edit, want) in refusals {
            let (e, exit) = daemon.invoke(env("DEL"), &config_with(|c| {
                c.insert("cniVersion".into(), json!("0.4.0"));
                edit(c);
            }));
            assert_eq!((e["code"].as_u64(), exit), (Some(want), 1), "DEL with {what}: {e}");
            if want == 7 {
                assert_eq!(e["cniVersion"], "0.4.0", "{e}");
            }
        }
        assert_eq!(daemon.invoke(env("DEL"), b"{").0["code"], 6);
        assert_eq!(daemon.asked.borrow().len(), asked, "a refused DEL reached the daemon");
        // ADD and CHECK stay strict.
        let (result, _) = daemon.invoke(env("ADD"), &config());
        let old = config_with(|c| {
            c.insert("cniVersion".into(), json!("0.4.0"));
            c.insert("prevResult".into(), result.clone());
        });
        assert_eq!(daemon.invoke(env("CHECK"), &old).0["code"], 1);
        let with_ipam = config_with(|c| {
            c.insert("ipam".into(), json!({}));
            c.insert("prevResult".into(), result.clone());
        });
        assert_eq!(daemon.invoke(env("CHECK"), &with_ipam).0["code"], 2);
    }

    #[test]
    fn without_a_socket_in_the_network_configuration_config_toml_names_it() {
        let daemon = FakeDaemon::default();
        let no_socket = config_with(|c| drop(c.remove("socket")));
        for command in ["ADD", "CHECK", "DEL"] {
            let stdin = match command {
                "CHECK" => config_with(|c| {
                    c.remove("socket");
                    c.insert("prevResult".into(), json!({ "interfaces": [] }));
                }),
                _ => no_socket.clone(),
            };
            daemon.sockets.borrow_mut().clear();
            daemon.invoke(env(command), &stdin);
            assert_eq!(*daemon.sockets.borrow(), [PathBuf::from(CONFIG_TOML_SOCKET)], "{command}");
        }
        // The network configuration's socket wins; config.toml is not read.
        let (_, exit) = daemon.invoke_with(env("ADD"), &config(), no_daemon_socket);
        assert_eq!(exit, 0);
        // A config.toml that does not load (or names a relative socket) is
        // an invalid configuration with the reason, not a guess.
        for (answer, reason) in [
            (Err("/etc/sbx-net/config.toml:3: unknown field `sokcet`".to_string()), "unknown field `sokcet`"),
            (Ok(PathBuf::from("run/sbx.sock")), "run/sbx.sock"),
        ] {
            for command in ["ADD", "DEL"] {
                let asked = daemon.asked.borrow().len();
                let (e, exit) = daemon.invoke_with(env(command), &no_socket, || answer.clone());
                assert_eq!((e["code"].as_u64(), exit), (Some(7), 1), "{command}: {e}");
                assert!(e["msg"].as_str().unwrap().contains("/etc/sbx-net/config.toml"), "{e}");
                assert!(e["details"].as_str().unwrap().contains(reason), "{e}");
                assert_eq!(daemon.asked.borrow().len(), asked, "{command} reached a daemon");
            }
        }
    }

    #[test]
    fn link_exists_looks_in_the_callers_network_namespace_not_sysfs() {
        // A thread in a new network namespace has only lo; sysfs, mounted
        // for the test's namespace, still lists the test's links there.
        let here = |name: &str| DaemonBackend { socket: PathBuf::new() }.link_exists(name);
        assert!(here("lo"));
        assert!(!here("sbx-no-such-0"));
        assert!(!here("a\0b"), "a name with a NUL is no link");
        let Some(elsewhere) = std::fs::read_dir("/sys/class/net").into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).find(|n| n != "lo") else {
            eprintln!("skipped the namespace part: no link but lo in /sys/class/net");
            return;
        };
        assert!(here(&elsewhere), "{elsewhere} is in the test's namespace");
        let in_new_netns = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) takes no pointers; it moves only
            // this thread, which ends (and so drops the namespace) below.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok((here("lo"), here(&elsewhere), Path::new("/sys/class/net").join(&elsewhere).exists(), elsewhere))
        })
        .join()
        .unwrap();
        match in_new_netns {
            Ok((lo, elsewhere_seen, in_sysfs, elsewhere)) => {
                assert!(lo, "the new namespace's lo");
                assert!(in_sysfs, "sysfs still lists {elsewhere}: the case the look-up must not be fooled by");
                assert!(!elsewhere_seen, "{elsewhere} is not in the new namespace");
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eprintln!("skipped the namespace part: unshare: {e} (not root)"),
            Err(e) => panic!("unshare(CLONE_NEWNET): {e}"),
        }
    }

    #[test]
    fn errors_serialise_as_the_spec_shows() {
        let e = CniError::new(7, "Invalid Configuration", "Network 192.168.0.0/31 too small to allocate from.");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({ "cniVersion": "1.0.0", "code": 7, "msg": "Invalid Configuration", "details": "Network 192.168.0.0/31 too small to allocate from." })
        );
    }
}
