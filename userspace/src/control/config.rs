//! The daemon's configuration: plain data, read from `--config FILE` (TOML)
//! and overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

use crate::datapath::nft::{NftConfig, PacketRate};
use crate::sandbox::AddressPools;

/// Where the daemon and the CLI look for the configuration when no
/// `--config` names one (absent: the built-in defaults).
pub const DEFAULT_CONFIG: &str = "/etc/sbx-net/config.toml";
/// The policy directory when neither a flag nor the configuration names
/// one (used when it exists).
pub const DEFAULT_POLICY_DIR: &str = "/etc/sbx-net/policies";
pub const DEFAULT_SOCKET: &str = "/run/sbx-net/sbx-net.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sbx-net";
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/sbx-net";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

/// The daemon's configuration file (`/etc/sbx-net/config.toml`, TOML);
/// every key is optional and flags override it. Also the source of the
/// JSON Schema `sbx-net config schema` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
#[schemars(title = "sbx-net daemon configuration")]
pub struct DaemonConfig {
    /// Policy files (`*.toml`), in addition to the embedded default.
    pub policy_dir: Option<PathBuf>,
    /// Sandbox state, applied policies, guest logs.
    pub state_dir: PathBuf,
    /// The control socket (root-only, mode `socket_mode`).
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// Where maps and TCX links are pinned (bpffs).
    pub bpf_dir: PathBuf,
    /// Prometheus endpoint.
    #[schemars(with = "Option<String>")]
    pub metrics_addr: Option<SocketAddr>,
    /// The resolver the DNS proxy forwards to.
    #[schemars(with = "Option<String>")]
    pub upstream_dns: Option<SocketAddr>,
    /// Extra trusted roots (PEM) for upstream TLS.
    pub upstream_ca: Option<PathBuf>,
    /// The interface sandbox traffic leaves by (masqueraded).
    pub uplink: Option<String>,
    /// Host ports the redirects lead to.
    pub dns_port: u16,
    pub proxy_port: u16,
    /// Guest TCP destination ports redirected to the credential proxy.
    pub proxied_ports: Vec<u16>,
    #[schemars(with = "String")]
    pub ipv4_pool: Ipv4Network,
    #[schemars(with = "String")]
    pub ipv6_pool: Ipv6Network,
    /// Taps kept ready (created, classifier attached) for the next sandboxes;
    /// 0 turns the pool off.
    pub tap_pool_size: usize,
    /// Threads filling the pool (attaches run concurrently).
    pub tap_pool_workers: usize,
    /// Learned addresses stay open for their TTL clamped to
    /// [dns_min_ttl, dns_max_ttl] seconds, plus dns_grace seconds.
    pub dns_min_ttl: u32,
    pub dns_max_ttl: u32,
    pub dns_grace: u32,
    /// Answer denied names REFUSED instead of NXDOMAIN.
    pub dns_refuse_denied: bool,
    /// Learned addresses kept per name (0: unlimited).
    pub dns_max_addresses_per_name: usize,
    /// DNS-over-TCP connections one sandbox may hold open at once.
    pub dns_tcp_connections_per_sandbox: usize,
    /// A DNS-over-TCP connection is closed when no query starts within
    /// this many ms...
    pub dns_tcp_idle_timeout_ms: u64,
    /// ...or when one takes longer than this many ms from its first byte to
    /// its last (however the bytes trickle in).
    pub dns_tcp_query_timeout_ms: u64,
    /// Answers the DNS proxy keeps from the upstream, each for its TTL
    /// (negative ones at most 5 minutes), to answer the same question again
    /// without asking; 0 turns the cache off. Each query is still decided
    /// by its sandbox's policy and its addresses written to the sandbox's
    /// map before it is answered, cached or not. An entry takes at most
    /// ~8 KiB (a 4 KiB answer, its query and the places of its TTLs), so the
    /// default bounds the cache near 32 MiB; at most 262144 entries.
    pub dns_cache_entries: usize,
    /// A guest query identical to one already upstream (sent under 400 ms
    /// ago) waits for that one's answer instead of asking again, as
    /// unbound and dnsmasq do; each is still decided by its own sandbox's
    /// policy. false: every query asks on its own (no sandbox can tell
    /// from an answer's speed that another asked the same just before; the
    /// answer cache gives the same signal unless it is off too).
    pub dns_share_upstream_queries: bool,
    /// UDP queries one sandbox may send the DNS proxy per second on average
    /// (0: no limit), and in a burst. Past them nftables drops the
    /// sandbox's queries before they reach the proxy's socket, which every
    /// sandbox shares: one guest's flood cannot fill it and have the
    /// kernel drop the other sandboxes' queries. DNS over TCP is bounded by
    /// `dns_tcp_connections_per_sandbox` instead.
    pub dns_queries_per_second_per_sandbox: u32,
    pub dns_query_burst_per_sandbox: u32,
    /// New TCP connections one sandbox may open to the proxies (the HTTP(S)
    /// proxy and DNS over TCP) per second on average (0: no limit), and in
    /// a burst. Past them nftables drops the sandbox's SYNs before they
    /// reach the proxies' shared listening sockets, whose accept queues a
    /// guest opening connections as fast as it can would otherwise fill
    /// for every sandbox.
    pub new_connections_per_second_per_sandbox: u32,
    pub new_connection_burst_per_sandbox: u32,
    /// Flow records kept in memory for `inspect --last` (older ones are
    /// counted as evicted).
    pub flow_history: usize,
    /// Bytes of the datapath's event ring buffer (a power of two, ≥ 4096;
    /// takes effect when the maps are first created).
    pub events_ring_bytes: u32,
    /// Capacity of the datapath's LRU flow table.
    pub flow_table_size: u32,
    /// Capacity of each policy trie (IPv4, IPv6), shared by all sandboxes;
    /// a reload needs room for the old and the new generation of the
    /// sandboxes it switches, one at a time (takes effect when the maps are
    /// first created).
    pub policy_map_entries: u32,
    /// The audit log (JSONL in the state dir) is rotated past this size...
    pub audit_max_bytes: u64,
    /// ...keeping this many rotated files (audit.log.1 is the newest).
    pub audit_keep: usize,
    /// Audit lines per second one sandbox may write on average (0: no
    /// limit), and in a burst; lines past them are counted
    /// (`sbx_net_audit_suppressed_total`) and summarised in the log.
    pub audit_lines_per_second: u32,
    pub audit_burst: u32,
    /// Concurrent connections one sandbox may hold through the HTTP(S)
    /// proxy (0: no cap): one guest cannot take the proxy from the others.
    pub proxy_connections_per_sandbox: usize,
    /// A guest's first bytes (ClientHello, request head) must arrive, and a
    /// TLS handshake the proxy terminates must finish, within this many
    /// milliseconds of connecting, however slowly they trickle.
    pub proxy_first_bytes_timeout_ms: u64,
    /// A benchmark's baseline, not a setting: send a guest connection's
    /// requests to a credential host one at a time even over HTTP/2, as the
    /// proxy did before its streams shared the upstream connection
    /// (`cargo xtask bench proxy` measures both).
    pub bench_serial_upstream_requests: bool,
    /// At an upgrade, the old data plane finishes its proxied connections
    /// for at most this many seconds, then closes what is left (counted in
    /// the log and `sbx_net_dataplane_drain_closed_total`).
    pub dataplane_drain_seconds: u64,
    /// `[fleet]`: policies from etcd (none: the policy dir only).
    pub fleet: Option<crate::fleet::FleetConfig>,
}

/// The largest `dns_cache_entries` (~2 GiB at the worst case per entry).
pub const MAX_DNS_CACHE_ENTRIES: usize = 262_144;

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            policy_dir: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o600,
            bpf_dir: PathBuf::from(DEFAULT_BPF_DIR),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            upstream_dns: None,
            upstream_ca: None,
            uplink: None,
            dns_port: 1053,
            proxy_port: 15001,
            proxied_ports: vec![80, 443],
            ipv4_pool: "10.200.0.0/16".parse().expect("valid"),
            ipv6_pool: "fd73:6278::/48".parse().expect("valid"),
            tap_pool_size: 8,
            tap_pool_workers: 4,
            dns_min_ttl: 5,
            dns_max_ttl: 3600,
            dns_grace: 30,
            dns_refuse_denied: false,
            dns_max_addresses_per_name: 32,
            dns_tcp_connections_per_sandbox: 32,
            dns_tcp_idle_timeout_ms: 10_000,
            dns_tcp_query_timeout_ms: 5_000,
            dns_cache_entries: 4096,
            dns_share_upstream_queries: true,
            dns_queries_per_second_per_sandbox: 1000,
            dns_query_burst_per_sandbox: 1000,
            new_connections_per_second_per_sandbox: 1000,
            new_connection_burst_per_sandbox: 500,
            flow_history: 10_000,
            events_ring_bytes: sbx_net_common::EVENTS_RING_BYTES,
            flow_table_size: sbx_net_common::MAX_FLOWS,
            policy_map_entries: sbx_net_common::MAX_POLICY_ENTRIES,
            audit_max_bytes: 16 * 1024 * 1024,
            audit_keep: 4,
            audit_lines_per_second: 50,
            audit_burst: 1000,
            proxy_connections_per_sandbox: 256,
            proxy_first_bytes_timeout_ms: 10_000,
            bench_serial_upstream_requests: false,
            dataplane_drain_seconds: 30,
            fleet: None,
        }
    }
}

impl DaemonConfig {
    /// The configuration `--config` names (it must exist), else
    /// [`DEFAULT_CONFIG`] when it exists, else the built-in defaults; then
    /// [`DEFAULT_POLICY_DIR`] when nothing names a policy dir and it exists.
    pub fn load_or_default(explicit: Option<&Path>) -> Result<DaemonConfig, ConfigError> {
        let mut config = match explicit {
            Some(path) => Self::load(path)?,
            None if fhs_present(Path::new(DEFAULT_CONFIG))? => Self::load(Path::new(DEFAULT_CONFIG))?,
            None => DaemonConfig::default(),
        };
        if config.policy_dir.is_none() {
            config.use_default_policy_dir(fhs_present(Path::new(DEFAULT_POLICY_DIR))?);
        }
        Ok(config)
    }

    /// Whether a client should read [`DEFAULT_CONFIG`] for the socket:
    /// it is there, or cannot be told absent (then reading it says why).
    pub fn default_config_present() -> Result<bool, ConfigError> {
        fhs_present(Path::new(DEFAULT_CONFIG))
    }

    /// The FHS policy dir when the configuration names none and it exists
    /// (a host without it runs on the embedded default and applied policies).
    pub fn use_default_policy_dir(&mut self, default_exists: bool) {
        if self.policy_dir.is_none() && default_exists {
            self.policy_dir = Some(PathBuf::from(DEFAULT_POLICY_DIR));
        }
    }

    /// The JSON Schema of the configuration file (draft 2020-12).
    pub fn json_schema() -> serde_json::Value {
        let mut schema = serde_json::to_value(schemars::schema_for!(DaemonConfig)).expect("a schema serialises");
        schema["$id"] = serde_json::json!("https://sbx-net.dev/schema/config.json");
        schema
    }

    /// The built-in defaults as a configuration file whose every setting is
    /// commented out (what the package installs as /etc/sbx-net/config.toml):
    /// uncommenting a line changes that setting only.
    pub fn commented_defaults() -> String {
        let text = toml::to_string(&DaemonConfig::default()).expect("the defaults serialise");
        let mut out = String::from(
            "# sbx-net daemon configuration. Every setting is optional; the values shown\n\
             # are the built-in defaults. Flags given to `sbx-net daemon` override this\n\
             # file. Check a change with `sbx-net config check FILE`; the JSON Schema is\n\
             # `sbx-net config schema`.\n\
             #\n\
             # policy_dir = \"/etc/sbx-net/policies\"  (used when it exists)\n\
             # upstream_dns = \"192.0.2.53:53\"        (default: the first nameserver of /etc/resolv.conf)\n\
             # uplink = \"eth0\"                       (default: none, so no masquerade and any egress interface)\n",
        );
        for line in text.lines() {
            // TOML has octal integers; a file mode reads better as one.
            let socket_mode = format!("socket_mode = {}", DaemonConfig::default().socket_mode);
            let line = if line == socket_mode { "socket_mode = 0o600" } else { line };
            if line.is_empty() {
                out.push('\n');
            } else {
                out.push_str("# ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Invalid { file: file.clone(), reason: format!("cannot read: {e}") })?;
        Self::parse(&file, &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<DaemonConfig, ConfigError> {
        let config: DaemonConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1).unwrap_or(0);
            ConfigError::Invalid { file: format!("{file}:{line}"), reason: e.message().to_string() }
        })?;
        config.validate().map_err(|reason| ConfigError::Invalid { file: file.to_string(), reason })?;
        Ok(config)
    }

    /// Checks what serde cannot: port sets, pool sizes.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(fleet) = &self.fleet {
            fleet.source().map_err(|e| format!("fleet: {e}"))?;
            fleet.identity().map_err(|e| format!("fleet: {e}"))?;
        }
        if self.proxied_ports.len() > sbx_net_common::MAX_PROXIED_PORTS {
            return Err(format!(
                "proxied_ports: at most {} ports (got {})",
                sbx_net_common::MAX_PROXIED_PORTS,
                self.proxied_ports.len()
            ));
        }
        if self.proxied_ports.iter().any(|&p| p == 0 || p == 53) {
            return Err("proxied_ports: ports must be 1-65535 and not 53 (DNS is always redirected)".into());
        }
        if self.dns_port == 0 || self.proxy_port == 0 || self.dns_port == self.proxy_port {
            return Err("dns_port and proxy_port must be distinct non-zero ports".into());
        }
        if self.dns_min_ttl > self.dns_max_ttl {
            return Err(format!("dns_min_ttl ({}) exceeds dns_max_ttl ({})", self.dns_min_ttl, self.dns_max_ttl));
        }
        if self.dns_tcp_connections_per_sandbox == 0 || self.dns_tcp_idle_timeout_ms == 0 || self.dns_tcp_query_timeout_ms == 0 {
            return Err("dns_tcp_connections_per_sandbox, dns_tcp_idle_timeout_ms and dns_tcp_query_timeout_ms must be at least 1".into());
        }
        if !self.events_ring_bytes.is_power_of_two() || self.events_ring_bytes < 4096 {
            return Err(format!("events_ring_bytes ({}) must be a power of two of at least 4096", self.events_ring_bytes));
        }
        if self.flow_table_size == 0 || self.flow_history == 0 || self.policy_map_entries == 0 {
            return Err("flow_table_size, flow_history and policy_map_entries must be at least 1".into());
        }
        if self.dns_queries_per_second_per_sandbox > 0 && self.dns_query_burst_per_sandbox == 0 {
            return Err("dns_query_burst_per_sandbox must be at least 1 while dns_queries_per_second_per_sandbox limits queries".into());
        }
        if self.new_connections_per_second_per_sandbox > 0 && self.new_connection_burst_per_sandbox == 0 {
            return Err("new_connection_burst_per_sandbox must be at least 1 while new_connections_per_second_per_sandbox limits connections".into());
        }
        if self.dns_cache_entries > MAX_DNS_CACHE_ENTRIES {
            return Err(format!("dns_cache_entries ({}) is more than {MAX_DNS_CACHE_ENTRIES} (an entry can take ~8 KiB)", self.dns_cache_entries));
        }
        if self.proxy_first_bytes_timeout_ms == 0 {
            return Err("proxy_first_bytes_timeout_ms must be at least 1".into());
        }
        if self.ipv4_pool.prefix() > 29 {
            return Err(format!("ipv4_pool {} is too small (a sandbox takes a /30)", self.ipv4_pool));
        }
        if self.ipv6_pool.prefix() > 63 {
            return Err(format!("ipv6_pool {} is too small (a sandbox takes a /64)", self.ipv6_pool));
        }
        Ok(())
    }

    pub fn pools(&self) -> AddressPools {
        AddressPools {
            ipv4: self.ipv4_pool.network(),
            ipv4_prefix_len: self.ipv4_pool.prefix(),
            ipv6: self.ipv6_pool.network(),
            ipv6_prefix_len: self.ipv6_pool.prefix(),
        }
    }

    pub fn nft(&self) -> NftConfig {
        NftConfig {
            dns_port: self.dns_port,
            proxy_port: self.proxy_port,
            proxied_ports: self.proxied_ports.clone(),
            uplink: self.uplink.clone(),
            pool_v4: self.ipv4_pool,
            pool_v6: self.ipv6_pool,
            dns_queries_per_sandbox: (self.dns_queries_per_second_per_sandbox > 0)
                .then_some(PacketRate { per_second: self.dns_queries_per_second_per_sandbox, burst: self.dns_query_burst_per_sandbox }),
            new_connections_per_sandbox: (self.new_connections_per_second_per_sandbox > 0)
                .then_some(PacketRate { per_second: self.new_connections_per_second_per_sandbox, burst: self.new_connection_burst_per_sandbox }),
        }
    }

    /// Policies applied with `policy apply` (kept across restarts).
    pub fn applied_policy_dir(&self) -> PathBuf {
        self.state_dir.join("applied-policies")
    }

    /// The resolver allowed queries go to: `upstream_dns`, else the first
    /// nameserver of the host's /etc/resolv.conf.
    pub fn upstream_resolver(&self) -> Option<SocketAddr> {
        self.upstream_dns.or_else(|| {
            let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("nameserver"))
                .find_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
    }

    /// Names behind the DNS-learned addresses (the addresses themselves
    /// live in the pinned tries).
    /// The data plane's local socket (root-only), where the daemon pushes
    /// its snapshots and a new data plane asks for the listeners.
    pub fn dataplane_socket(&self) -> PathBuf {
        self.state_dir.join("dataplane.sock")
    }

    pub fn learned_snapshot(&self) -> PathBuf {
        self.state_dir.join("learned.json")
    }

    /// Where the sandboxes' CA directories are.
    pub fn sandbox_cas_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }

    /// A sandbox's CA certificate (`ca.pem`) and key (`ca.key`, 0600).
    pub fn sandbox_ca_dir(&self, sandbox: &str) -> PathBuf {
        self.sandbox_cas_dir().join(sandbox)
    }

    /// The HTTP(S) proxy's per-sandbox connection cap and first-bytes deadline.
    pub fn proxy_limits(&self) -> crate::proxy::ProxyLimits {
        crate::proxy::ProxyLimits {
            connections: crate::util::conn_limit::ConnLimits::new(self.proxy_connections_per_sandbox),
            first_bytes_timeout: std::time::Duration::from_millis(self.proxy_first_bytes_timeout_ms),
        }
    }

    /// How a guest connection's requests to a credential host share the
    /// upstream connection.
    pub fn upstream_requests(&self) -> crate::proxy::inject::UpstreamRequests {
        if self.bench_serial_upstream_requests {
            crate::proxy::inject::UpstreamRequests::Serial
        } else {
            crate::proxy::inject::UpstreamRequests::Concurrent
        }
    }

    /// The DNS proxy's limits for DNS over TCP.
    pub fn dns_tcp_limits(&self) -> crate::dns::server::DnsTcpLimits {
        crate::dns::server::DnsTcpLimits {
            max_connections_per_sandbox: self.dns_tcp_connections_per_sandbox,
            idle_timeout: std::time::Duration::from_millis(self.dns_tcp_idle_timeout_ms),
            query_timeout: std::time::Duration::from_millis(self.dns_tcp_query_timeout_ms),
        }
    }

    pub fn flow_log(&self) -> crate::observe::hub::FlowLogSettings {
        crate::observe::hub::FlowLogSettings {
            history: self.flow_history,
            audit_path: self.state_dir.join("audit.log"),
            audit_max_bytes: self.audit_max_bytes,
            audit_keep: self.audit_keep,
            audit_lines_per_second: self.audit_lines_per_second,
            audit_burst: self.audit_burst,
        }
    }

    pub fn link_pin(&self, sandbox: &str) -> PathBuf {
        self.bpf_dir.join("links").join(sandbox)
    }
}

/// Whether an FHS default path is there to be used. Only "no such file"
/// means absent: a file that cannot be read (permissions, a symlink to a
/// mount not there yet, an I/O error) is an error, never a silent fall back
/// to the built-in defaults, which would run the daemon on another socket,
/// pools and state dir.
fn fhs_present(path: &Path) -> Result<bool, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { file: path.display().to_string(), reason };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(invalid(format!("cannot tell whether it exists: {e}"))),
        // A symlink (or anything) must lead somewhere that can be read.
        Ok(_) => match std::fs::metadata(path) {
            Ok(_) => Ok(true),
            Err(e) => Err(invalid(format!("is there but cannot be used: {e}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_default_is_absent() {
        let dir = std::env::temp_dir().join(format!("sbx-config-fhs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!fhs_present(&dir.join("none.toml")).unwrap());
        std::fs::write(dir.join("c.toml"), "").unwrap();
        assert!(fhs_present(&dir.join("c.toml")).unwrap());
        std::os::unix::fs::symlink(dir.join("not-mounted-yet/c.toml"), dir.join("dangling.toml")).unwrap();
        let e = fhs_present(&dir.join("dangling.toml")).unwrap_err().to_string();
        assert!(e.contains("dangling.toml") && e.contains("cannot be used"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commented_defaults_parse_to_the_defaults() {
        let text = DaemonConfig::commented_defaults();
        assert!(text.lines().all(|l| l.is_empty() || l.starts_with('#')), "{text}");
        assert_eq!(DaemonConfig::parse("c.toml", &text).unwrap(), DaemonConfig::default());
        // Uncommenting every setting gives the defaults too: the file shows
        // the real values, not a guess.
        let uncommented: String = text.lines().filter(|l| l.starts_with("# ") && l.contains(" = ") && !l.contains("  (")).map(|l| format!("{}\n", &l[2..])).collect();
        assert_eq!(DaemonConfig::parse("c.toml", &uncommented).unwrap(), DaemonConfig::default(), "{uncommented}");
    }

    #[test]
    fn fhs_policy_dir_only_when_nothing_names_one_and_it_exists() {
        let mut c = DaemonConfig::default();
        c.use_default_policy_dir(false);
        assert_eq!(c.policy_dir, None);
        c.use_default_policy_dir(true);
        assert_eq!(c.policy_dir.as_deref(), Some(Path::new(DEFAULT_POLICY_DIR)));
        let mut c = DaemonConfig { policy_dir: Some("/srv/p".into()), ..DaemonConfig::default() };
        c.use_default_policy_dir(true);
        assert_eq!(c.policy_dir.as_deref(), Some(Path::new("/srv/p")));
    }

    #[test]
    fn schema_names_every_setting() {
        let schema = DaemonConfig::json_schema();
        let properties = schema["properties"].as_object().expect("properties");
        let defaults = toml::Value::try_from(DaemonConfig::default()).unwrap();
        for key in defaults.as_table().unwrap().keys() {
            assert!(properties.contains_key(key), "{key} missing from the schema");
        }
        assert_eq!(schema["additionalProperties"], serde_json::json!(false));
    }

    #[test]
    fn parses_and_rejects_with_location() {
        let c = DaemonConfig::parse("c.toml", "uplink = \"eth0\"\nproxied_ports = [80, 443, 8443]\n").unwrap();
        assert_eq!(c.uplink.as_deref(), Some("eth0"));
        assert_eq!(c.proxied_ports, vec![80, 443, 8443]);
        assert_eq!(c.dns_port, 1053);
        let e = DaemonConfig::parse("c.toml", "uplink = \"eth0\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(e.starts_with("c.toml:2:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
        let e = DaemonConfig::parse("c.toml", "proxied_ports = [53]\n").unwrap_err().to_string();
        assert!(e.contains("not 53"), "{e}");
        let e = DaemonConfig::parse("c.toml", "ipv4_pool = \"10.0.0.0/30\"\n").unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
        let e = DaemonConfig::parse("c.toml", "events_ring_bytes = 5000\n").unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
        let e = DaemonConfig::parse("c.toml", "dns_query_burst_per_sandbox = 0\n").unwrap_err().to_string();
        assert!(e.contains("dns_query_burst_per_sandbox must be at least 1"), "{e}");
        let e = DaemonConfig::parse("c.toml", "new_connection_burst_per_sandbox = 0\n").unwrap_err().to_string();
        assert!(e.contains("new_connection_burst_per_sandbox must be at least 1"), "{e}");
    }

    #[test]
    fn the_per_sandbox_meters_are_on_by_default_and_off_at_zero() {
        let nft = DaemonConfig::default().nft();
        assert_eq!(nft.dns_queries_per_sandbox, Some(PacketRate { per_second: 1000, burst: 1000 }));
        assert_eq!(nft.new_connections_per_sandbox, Some(PacketRate { per_second: 1000, burst: 500 }));
        let off = DaemonConfig::parse("c.toml", "dns_queries_per_second_per_sandbox = 0\nnew_connections_per_second_per_sandbox = 0\ndns_query_burst_per_sandbox = 0\n").unwrap().nft();
        assert_eq!((off.dns_queries_per_sandbox, off.new_connections_per_sandbox), (None, None));
    }
}
