//! The `inet sbx_net` nftables table, written through netlink with nftnl
//! (one atomic batch per change, never by shelling out to `nft`).
//!
//! The rules are static; which interfaces are sandbox taps is the content of
//! the `sandbox_taps` set. Creating a sandbox adds its tap to the set and
//! deleting it removes exactly that element, so no rule handle ever has to
//! be tracked. The rule list itself is plain data ([`ruleset`]) so what the
//! table says is unit-tested without privileges; [`Nftables`] only
//! translates and commits it.

use std::ffi::{CStr, CString};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ptr::NonNull;

use ipnetwork::{Ipv4Network, Ipv6Network};
use nftnl::expr::{Expression, Immediate, InterfaceName, Register};
use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::set::{Set, SetKey};
use nftnl::{nft_expr, Batch, Chain, FinalizedBatch, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

pub const TABLE_NAME: &str = "sbx_net";
const TAPS_SET: &CStr = c"sandbox_taps";
/// Set id within a batch (the kernel resolves lookups by name afterwards).
const TAPS_SET_ID: u32 = 1;
/// How long a tap's rate state outlives its last packet: a deleted tap's
/// entry goes, and a new tap given the same ifindex later starts full.
const METER_ENTRY_TIMEOUT_MS: u64 = 60_000;
/// Entries a meter holds (one per tap that sent in the last minute); a
/// full meter lets the packet through unmetered (nftables' behaviour), so
/// it is far above any host's tap count.
const METER_SIZE: u32 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables {what}: {source}")]
    Netlink { what: String, source: std::io::Error },
    #[error("interface name {0:?} is not a valid Linux interface name")]
    InterfaceName(String),
}

/// What the table enforces, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftConfig {
    /// Where guests' DNS (UDP and TCP port 53, to any address) is redirected.
    pub dns_port: u16,
    /// Where guests' TCP to `proxied_ports` is redirected.
    pub proxy_port: u16,
    pub proxied_ports: Vec<u16>,
    /// The interface sandbox traffic leaves by (masqueraded). Without one,
    /// sandbox traffic may leave by any non-sandbox interface, unNATed.
    pub uplink: Option<String>,
    pub pool_v4: Ipv4Network,
    pub pool_v6: Ipv6Network,
    /// Each sandbox's UDP queries to the DNS proxy, metered per tap before
    /// they reach the proxy's one shared socket; `None`: unmetered.
    pub dns_queries_per_sandbox: Option<PacketRate>,
    /// Each sandbox's new TCP connections to the proxies (the credential
    /// proxy and DNS over TCP), metered per tap before they reach the
    /// proxies' shared listening sockets; `None`: unmetered.
    pub new_connections_per_sandbox: Option<PacketRate>,
}

/// A packet rate as nftables' `limit` counts it: `per_second` on average,
/// `burst` more at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketRate {
    pub per_second: u32,
    pub burst: u32,
}

/// A per-tap meter: a dynamic set keyed by the input interface's index,
/// each element carrying its own token bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Meter {
    DnsQueries,
    NewConnections,
}

impl Meter {
    const ALL: [Meter; 2] = [Meter::DnsQueries, Meter::NewConnections];

    fn set_name(self) -> &'static CStr {
        match self {
            Meter::DnsQueries => c"dns_queries_per_tap",
            Meter::NewConnections => c"new_connections_per_tap",
        }
    }

    /// The meter's name in `status` and on `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Meter::DnsQueries => "dns_queries",
            Meter::NewConnections => "new_connections",
        }
    }

    /// Set id within a batch (distinct from [`TAPS_SET_ID`]).
    fn set_id(self) -> u32 {
        match self {
            Meter::DnsQueries => 2,
            Meter::NewConnections => 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Prerouting,
    Input,
    Forward,
    Postrouting,
}

impl Base {
    fn chain_name(self) -> &'static CStr {
        match self {
            Base::Prerouting => c"prerouting",
            Base::Input => c"input",
            Base::Forward => c"forward",
            Base::Postrouting => c"postrouting",
        }
    }
}

/// One match of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    InputIsTap,
    OutputIsTap,
    OutputIs(String),
    Udp,
    Tcp,
    Icmpv6,
    UdpDport(u16),
    TcpDport(u16),
    Icmpv6Type(u8),
    CtEstablishedOrRelated,
    CtInvalid,
    CtNew,
    SourceV4(Ipv4Network),
    SourceV6(Ipv6Network),
    /// The input tap has sent more than `rate` through this rule (its
    /// bucket in `meter` is empty); packets under the rate do not match.
    TapOverRate(Meter, PacketRate),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Drop,
    RedirectTo(u16),
    Masquerade,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub chain: Base,
    pub matches: Vec<Match>,
    pub action: Action,
    pub comment: String,
}

fn rule(chain: Base, matches: Vec<Match>, action: Action, comment: impl Into<String>) -> RuleSpec {
    RuleSpec { chain, matches, action, comment: comment.into() }
}

const ND_ROUTER_SOLICIT: u8 = 133;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;

/// Every rule of the table, in order.
pub fn ruleset(config: &NftConfig) -> Vec<RuleSpec> {
    use Action::*;
    use Base::*;
    use Match::*;
    let dns = config.dns_port;
    let proxy = config.proxy_port;
    let mut rules = vec![
        rule(Prerouting, vec![InputIsTap, Udp, UdpDport(53)], RedirectTo(dns), "sandbox DNS (any resolver) to the DNS proxy"),
        rule(Prerouting, vec![InputIsTap, Tcp, TcpDport(53)], RedirectTo(dns), "sandbox DNS over TCP to the DNS proxy"),
    ];
    for &port in &config.proxied_ports {
        rules.push(rule(
            Prerouting,
            vec![InputIsTap, Tcp, TcpDport(port)],
            RedirectTo(proxy),
            format!("sandbox TCP {port} to the credential proxy"),
        ));
    }
    // The proxy reads every sandbox's UDP queries from one socket: a guest
    // sending faster than the proxy answers would fill its receive queue,
    // and the kernel would drop every sandbox's queries alike. Past its
    // rate, a sandbox's queries are dropped here, before the socket.
    if let Some(rate) = config.dns_queries_per_sandbox {
        rules.push(rule(
            Input,
            vec![InputIsTap, Udp, UdpDport(dns), TapOverRate(Meter::DnsQueries, rate)],
            Drop,
            format!("a sandbox's DNS queries past {}/s (burst {})", rate.per_second, rate.burst),
        ));
    }
    // Likewise the proxies' listening sockets: a guest opening connections
    // faster than they are accepted would fill the shared accept queue,
    // and every sandbox's new connections would wait for SYN retries.
    if let Some(rate) = config.new_connections_per_sandbox {
        for port in [dns, proxy] {
            rules.push(rule(
                Input,
                vec![InputIsTap, Tcp, TcpDport(port), CtNew, TapOverRate(Meter::NewConnections, rate)],
                Drop,
                format!("a sandbox's new connections to the proxies past {}/s (burst {})", rate.per_second, rate.burst),
            ));
        }
    }
    rules.extend([
        rule(Input, vec![InputIsTap, Udp, UdpDport(dns)], Accept, "sandbox to the DNS proxy"),
        rule(Input, vec![InputIsTap, Tcp, TcpDport(dns)], Accept, "sandbox to the DNS proxy over TCP"),
        rule(Input, vec![InputIsTap, Tcp, TcpDport(proxy)], Accept, "sandbox to the credential proxy"),
    ]);
    for (icmp_type, what) in [
        (ND_NEIGHBOR_SOLICIT, "neighbour solicitation"),
        (ND_NEIGHBOR_ADVERT, "neighbour advertisement"),
        (ND_ROUTER_SOLICIT, "router solicitation"),
    ] {
        rules.push(rule(Input, vec![InputIsTap, Icmpv6, Icmpv6Type(icmp_type)], Accept, format!("sandbox {what} to its gateway")));
    }
    rules.push(rule(Input, vec![InputIsTap], Drop, "sandboxes reach no other host port"));
    // The proxies trust a connection's source address to name its sandbox;
    // only the taps (where eBPF enforces anti-spoofing) may reach them.
    rules.push(rule(Input, vec![Udp, UdpDport(dns)], Drop, "the DNS proxy serves sandboxes only"));
    rules.push(rule(Input, vec![Tcp, TcpDport(dns)], Drop, "the DNS proxy serves sandboxes only"));
    rules.push(rule(Input, vec![Tcp, TcpDport(proxy)], Drop, "the credential proxy serves sandboxes only"));
    rules.push(rule(Forward, vec![InputIsTap, OutputIsTap], Drop, "sandboxes never reach each other"));
    // The classifier lets the redirected ports through for nftables to
    // redirect, but conntrack redirects only what it tracks: a TCP segment it
    // calls invalid (FIN or RST first, SYN+FIN, no flags) or a UDP datagram
    // with a bad checksum is not redirected and would be forwarded as it is,
    // to any address. Nothing on those ports may be forwarded from a tap,
    // and nothing conntrack could not make sense of.
    rules.push(rule(Forward, vec![InputIsTap, CtInvalid], Drop, "sandbox packets conntrack calls invalid"));
    rules.push(rule(Forward, vec![InputIsTap, Udp, UdpDport(53)], Drop, "sandbox DNS that escaped the redirect"));
    rules.push(rule(Forward, vec![InputIsTap, Tcp, TcpDport(53)], Drop, "sandbox DNS over TCP that escaped the redirect"));
    for &port in &config.proxied_ports {
        rules.push(rule(Forward, vec![InputIsTap, Tcp, TcpDport(port)], Drop, format!("sandbox TCP {port} that escaped the redirect")));
    }
    match &config.uplink {
        Some(uplink) => {
            rules.push(rule(Forward, vec![InputIsTap, OutputIs(uplink.clone())], Accept, "sandbox to the uplink (judged by eBPF)"));
            rules.push(rule(Forward, vec![InputIsTap], Drop, "sandbox traffic leaves only by the uplink"));
        }
        None => rules.push(rule(Forward, vec![InputIsTap], Accept, "sandbox out (judged by eBPF; no uplink configured)")),
    }
    rules.push(rule(Forward, vec![OutputIsTap, CtEstablishedOrRelated], Accept, "replies to sandbox connections"));
    rules.push(rule(Forward, vec![OutputIsTap], Drop, "no inbound connections to a sandbox"));
    if let Some(uplink) = &config.uplink {
        rules.push(rule(Postrouting, vec![OutputIs(uplink.clone()), SourceV4(config.pool_v4)], Masquerade, "sandbox IPv4 leaving by the uplink"));
        rules.push(rule(Postrouting, vec![OutputIs(uplink.clone()), SourceV6(config.pool_v6)], Masquerade, "sandbox IPv6 leaving by the uplink"));
    }
    rules
}

/// A Linux interface name as an nftables `ifname` set key (IFNAMSIZ bytes,
/// zero-padded).
struct IfName([u8; libc::IFNAMSIZ]);

impl IfName {
    fn new(name: &str) -> Result<IfName, NftError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.iter().any(|&b| b == 0 || b == b'/' || b.is_ascii_whitespace()) {
            return Err(NftError::InterfaceName(name.to_string()));
        }
        let mut key = [0u8; libc::IFNAMSIZ];
        key[..bytes.len()].copy_from_slice(bytes);
        Ok(IfName(key))
    }
}

impl SetKey for IfName {
    /// nftables' `ifname` datatype (TYPE_IFNAME), so `nft list` prints names.
    const TYPE: u32 = 41;
    const LEN: u32 = libc::IFNAMSIZ as u32;

    fn data(&self) -> Box<[u8]> {
        Box::new(self.0)
    }
}

/// nftnl has no `redir` expression: redirect to the port held in a register.
struct Redirect {
    port_register: Register,
}

impl Expression for Redirect {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: nftnl_expr_alloc takes a NUL-terminated expression name and
        // returns an owned expression (or NULL on allocation failure, which
        // nftnl itself treats as fatal).
        let expr = unsafe { sys::nftnl_expr_alloc(c"redir".as_ptr()) };
        let Some(expr) = NonNull::new(expr) else { std::process::abort() };
        // SAFETY: expr is a valid redir expression; REG_PROTO_MIN is a u32 attribute.
        unsafe {
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN as u16, self.port_register.to_raw());
        }
        expr
    }
}

/// nftnl has no `dynset` expression: `update @meter { iif limit rate over
/// ... }` — finds (or adds) the key register's element in the meter set,
/// refreshes its timeout and runs its `limit`, inverted, so the rule goes
/// on only while that element's bucket is empty.
struct MeterUpdate {
    meter: Meter,
    rate: PacketRate,
    key_register: Register,
}

impl Expression for MeterUpdate {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: nftnl_expr_alloc takes a NUL-terminated expression name and
        // returns an owned expression or NULL (fatal, as nftnl treats it).
        let (dynset, limit) = unsafe { (sys::nftnl_expr_alloc(c"dynset".as_ptr()), sys::nftnl_expr_alloc(c"limit".as_ptr())) };
        let (Some(dynset), Some(limit)) = (NonNull::new(dynset), NonNull::new(limit)) else { std::process::abort() };
        // SAFETY: both are valid expressions of their kind and every
        // attribute is set with its own type; nftnl copies the set name.
        // NFTNL_EXPR_DYNSET_EXPR takes ownership of the limit expression
        // (freed with the dynset), so it is not freed here.
        unsafe {
            let limit = limit.as_ptr();
            sys::nftnl_expr_set_u64(limit, sys::NFTNL_EXPR_LIMIT_RATE as u16, u64::from(self.rate.per_second));
            sys::nftnl_expr_set_u64(limit, sys::NFTNL_EXPR_LIMIT_UNIT as u16, 1);
            sys::nftnl_expr_set_u32(limit, sys::NFTNL_EXPR_LIMIT_BURST as u16, self.rate.burst);
            sys::nftnl_expr_set_u32(limit, sys::NFTNL_EXPR_LIMIT_TYPE as u16, libc::NFT_LIMIT_PKTS as u32);
            sys::nftnl_expr_set_u32(limit, sys::NFTNL_EXPR_LIMIT_FLAGS as u16, libc::NFT_LIMIT_F_INV as u32);
            let d = dynset.as_ptr();
            sys::nftnl_expr_set_u32(d, sys::NFTNL_EXPR_DYNSET_SREG_KEY as u16, self.key_register.to_raw());
            sys::nftnl_expr_set_u32(d, sys::NFTNL_EXPR_DYNSET_OP as u16, libc::NFT_DYNSET_OP_UPDATE as u32);
            sys::nftnl_expr_set_u64(d, sys::NFTNL_EXPR_DYNSET_TIMEOUT as u16, METER_ENTRY_TIMEOUT_MS);
            sys::nftnl_expr_set_str(d, sys::NFTNL_EXPR_DYNSET_SET_NAME as u16, self.meter.set_name().as_ptr());
            sys::nftnl_expr_set_u32(d, sys::NFTNL_EXPR_DYNSET_SET_ID as u16, self.meter.set_id());
            sys::nftnl_expr_set(d, sys::NFTNL_EXPR_DYNSET_EXPR as u16, limit.cast(), 0);
        }
        dynset
    }
}

/// An interface index as a set key (nftables' `iface_index`): only the
/// key's type; a meter's elements are added by the packet path, never here.
struct IfIndex;

impl SetKey for IfIndex {
    /// TYPE_IFINDEX, so `nft list` prints interface names.
    const TYPE: u32 = 20;
    const LEN: u32 = 4;

    fn data(&self) -> Box<[u8]> {
        Box::new([0; 4])
    }
}

/// The dynamic set behind `meter`: updated from the packet path, its
/// elements expiring [`METER_ENTRY_TIMEOUT_MS`] after their tap's last packet.
fn meter_set(table: &Table, meter: Meter) -> Set<'_, IfIndex> {
    let set = Set::new_named(meter.set_name(), meter.set_id(), table, ProtoFamily::Inet);
    // SAFETY: the set pointer is valid for the set's lifetime; both
    // attributes are u32s.
    unsafe {
        let ptr = set.as_ptr().as_ptr();
        sys::nftnl_set_set_u32(ptr, sys::NFTNL_SET_FLAGS as u16, (libc::NFT_SET_EVAL | libc::NFT_SET_TIMEOUT) as u32);
        sys::nftnl_set_set_u32(ptr, sys::NFTNL_SET_DESC_SIZE as u16, METER_SIZE);
    }
    set
}

fn interface_name(name: &str) -> Result<InterfaceName, NftError> {
    IfName::new(name)?;
    let c = CString::new(name).map_err(|_| NftError::InterfaceName(name.to_string()))?;
    Ok(InterfaceName::Exact(c))
}

fn taps_set(table: &Table) -> Set<'_, IfName> {
    let set = Set::new_named(TAPS_SET, TAPS_SET_ID, table, ProtoFamily::Inet);
    // Tell `nft` the key is a host-order string (the userdata TLV nft
    // writes itself: NFTNL_UDATA_SET_KEYBYTEORDER = BYTEORDER_HOST_ENDIAN);
    // without it `nft list` prints the names byte-reversed as "".
    let mut userdata = [0u8; 6];
    userdata[0] = 0; // NFTNL_UDATA_SET_KEYBYTEORDER
    userdata[1] = 4;
    userdata[2..].copy_from_slice(&1u32.to_ne_bytes()); // BYTEORDER_HOST_ENDIAN
    // SAFETY: the set pointer is valid for the set's lifetime and nftnl
    // copies the userdata buffer.
    unsafe {
        sys::nftnl_set_set_data(
            set.as_ptr().as_ptr(),
            sys::NFTNL_SET_USERDATA as u16,
            userdata.as_ptr().cast(),
            userdata.len() as u32,
        );
    }
    set
}

fn add_rule_exprs(r: &mut Rule<'_>, spec: &RuleSpec, taps: &Set<'_, IfName>) -> Result<(), NftError> {
    for m in &spec.matches {
        match m {
            Match::InputIsTap => {
                r.add_expr(&nft_expr!(meta iifname));
                r.add_expr(&nft_expr!(lookup taps));
            }
            Match::OutputIsTap => {
                r.add_expr(&nft_expr!(meta oifname));
                r.add_expr(&nft_expr!(lookup taps));
            }
            Match::OutputIs(name) => {
                r.add_expr(&nft_expr!(meta oifname));
                r.add_expr(&nft_expr!(cmp == interface_name(name)?));
            }
            Match::Udp => {
                r.add_expr(&nft_expr!(meta l4proto));
                r.add_expr(&nft_expr!(cmp == libc::IPPROTO_UDP as u8));
            }
            Match::Tcp => {
                r.add_expr(&nft_expr!(meta l4proto));
                r.add_expr(&nft_expr!(cmp == libc::IPPROTO_TCP as u8));
            }
            Match::Icmpv6 => {
                r.add_expr(&nft_expr!(meta l4proto));
                r.add_expr(&nft_expr!(cmp == libc::IPPROTO_ICMPV6 as u8));
            }
            Match::UdpDport(port) => {
                r.add_expr(&nft_expr!(payload udp dport));
                r.add_expr(&nft_expr!(cmp == port.to_be()));
            }
            Match::TcpDport(port) => {
                r.add_expr(&nft_expr!(payload tcp dport));
                r.add_expr(&nft_expr!(cmp == port.to_be()));
            }
            Match::Icmpv6Type(t) => {
                r.add_expr(&nftnl::expr::Payload::Transport(nftnl::expr::TransportHeaderField::Icmpv6(
                    nftnl::expr::Icmpv6HeaderField::Type,
                )));
                r.add_expr(&nft_expr!(cmp == *t));
            }
            Match::CtEstablishedOrRelated => {
                let bits = (nftnl::expr::ct::States::ESTABLISHED | nftnl::expr::ct::States::RELATED).bits();
                r.add_expr(&nft_expr!(ct state));
                r.add_expr(&nft_expr!(bitwise mask bits, xor 0u32));
                r.add_expr(&nft_expr!(cmp != 0u32));
            }
            Match::CtNew => {
                r.add_expr(&nft_expr!(ct state));
                r.add_expr(&nft_expr!(bitwise mask nftnl::expr::ct::States::NEW.bits(), xor 0u32));
                r.add_expr(&nft_expr!(cmp != 0u32));
            }
            Match::CtInvalid => {
                r.add_expr(&nft_expr!(ct state));
                r.add_expr(&nft_expr!(bitwise mask nftnl::expr::ct::States::INVALID.bits(), xor 0u32));
                r.add_expr(&nft_expr!(cmp != 0u32));
            }
            Match::SourceV4(net) => {
                r.add_expr(&nft_expr!(meta nfproto));
                r.add_expr(&nft_expr!(cmp == libc::NFPROTO_IPV4 as u8));
                r.add_expr(&nft_expr!(payload ipv4 saddr));
                r.add_expr(&nft_expr!(bitwise mask net.mask(), xor Ipv4Addr::UNSPECIFIED));
                r.add_expr(&nft_expr!(cmp == net.network()));
            }
            Match::SourceV6(net) => {
                r.add_expr(&nft_expr!(meta nfproto));
                r.add_expr(&nft_expr!(cmp == libc::NFPROTO_IPV6 as u8));
                r.add_expr(&nft_expr!(payload ipv6 saddr));
                r.add_expr(&nft_expr!(bitwise mask net.mask(), xor Ipv6Addr::UNSPECIFIED));
                r.add_expr(&nft_expr!(cmp == net.network()));
            }
            Match::TapOverRate(meter, rate) => {
                r.add_expr(&nft_expr!(meta iif));
                r.add_expr(&MeterUpdate { meter: *meter, rate: *rate, key_register: Register::Reg1 });
            }
        }
    }
    r.add_expr(&nft_expr!(counter));
    match spec.action {
        Action::Accept => r.add_expr(&nft_expr!(verdict accept)),
        Action::Drop => r.add_expr(&nft_expr!(verdict drop)),
        Action::Masquerade => r.add_expr(&nft_expr!(masquerade)),
        Action::RedirectTo(port) => {
            r.add_expr(&Immediate::new(port.to_be_bytes(), Register::Reg1));
            r.add_expr(&Redirect { port_register: Register::Reg1 });
        }
    }
    Ok(())
}

/// Commits batches to the kernel's nftables in the calling thread's network
/// namespace.
pub struct Nftables {
    table: Table,
}

impl Default for Nftables {
    fn default() -> Self {
        Self::new()
    }
}

impl Nftables {
    pub fn new() -> Nftables {
        let name = CString::new(TABLE_NAME).expect("constant has no NUL");
        Nftables { table: Table::new(name, ProtoFamily::Inet) }
    }

    /// Replaces the whole table (or creates it) in one transaction: the
    /// rules of `config` and `taps` as the sandbox taps. Replacing is atomic,
    /// so a restarted daemon re-adopts the table without a moment in which
    /// a sandbox's packets meet no rules.
    pub fn install(&self, config: &NftConfig, taps: &[String]) -> Result<(), NftError> {
        let mut batch = Batch::new();
        // "add" is a no-op on an existing table, so the delete that follows
        // never fails; the new table is complete before the batch commits.
        batch.add(&self.table, MsgType::Add);
        batch.add(&self.table, MsgType::Del);
        batch.add(&self.table, MsgType::Add);

        let mut taps_set = taps_set(&self.table);
        for tap in taps {
            taps_set.add(&IfName::new(tap)?);
        }
        batch.add(&taps_set, MsgType::Add);
        batch.add_iter(taps_set.elems_iter(), MsgType::Add);

        let chains: Vec<Chain<'_>> = [Base::Prerouting, Base::Input, Base::Forward, Base::Postrouting]
            .into_iter()
            .map(|base| {
                let mut chain = Chain::new(base.chain_name(), &self.table);
                let (hook, priority, nat) = match base {
                    Base::Prerouting => (Hook::PreRouting, -100, true),
                    Base::Input => (Hook::In, 0, false),
                    Base::Forward => (Hook::Forward, 0, false),
                    Base::Postrouting => (Hook::PostRouting, 100, true),
                };
                chain.set_hook(hook, priority);
                chain.set_type(if nat { nftnl::ChainType::Nat } else { nftnl::ChainType::Filter });
                // Accept by default: the table speaks only about sandbox taps
                // and leaves the host's other traffic to the host's rules.
                chain.set_policy(Policy::Accept);
                chain
            })
            .collect();
        for chain in &chains {
            batch.add(chain, MsgType::Add);
        }
        let rules = ruleset(config);
        let mut meters: Vec<Meter> = rules
            .iter()
            .flat_map(|r| &r.matches)
            .filter_map(|m| match m {
                Match::TapOverRate(meter, _) => Some(*meter),
                _ => None,
            })
            .collect();
        meters.sort();
        meters.dedup();
        let meter_sets: Vec<Set<'_, IfIndex>> = meters.into_iter().map(|m| meter_set(&self.table, m)).collect();
        for set in &meter_sets {
            batch.add(set, MsgType::Add);
        }
        for spec in rules {
            let chain = chains
                .iter()
                .find(|c| c.get_name() == spec.chain.chain_name())
                .expect("every base chain was created");
            let mut r = Rule::new(chain);
            r.set_comment(CString::new(spec.comment.clone()).map_err(|_| NftError::InterfaceName(spec.comment.clone()))?)
                .map_err(|e| NftError::Netlink { what: format!("comment {:?}", spec.comment), source: std::io::Error::other(e) })?;
            add_rule_exprs(&mut r, &spec, &taps_set)?;
            batch.add(&r, MsgType::Add);
        }
        commit(batch.finalize(), "installing table inet sbx_net")
    }

    /// Adds `tap` to the sandbox taps (one transaction).
    pub fn add_tap(&self, tap: &str) -> Result<(), NftError> {
        self.change_tap(tap, MsgType::Add)
    }

    /// Removes `tap` from the sandbox taps (one transaction).
    pub fn remove_tap(&self, tap: &str) -> Result<(), NftError> {
        self.change_tap(tap, MsgType::Del)
    }

    fn change_tap(&self, tap: &str, change: MsgType) -> Result<(), NftError> {
        let mut set = taps_set(&self.table);
        set.add(&IfName::new(tap)?);
        let mut batch = Batch::new();
        batch.add_iter(set.elems_iter(), change);
        let what = match change {
            MsgType::Add => format!("adding {tap} to @{}", TAPS_SET.to_string_lossy()),
            MsgType::Del => format!("removing {tap} from @{}", TAPS_SET.to_string_lossy()),
        };
        commit(batch.finalize(), &what)
    }

    /// Packets each meter has dropped since the table was installed: the
    /// counters of the input chain's rules that update its set. A meter
    /// the table does not use is absent.
    pub fn meter_drops(&self) -> Result<std::collections::BTreeMap<Meter, u64>, NftError> {
        let err = |source: std::io::Error| NftError::Netlink { what: "reading the meters' rule counters".into(), source };
        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(err)?;
        let (portid, seq) = (socket.portid(), 1);
        let mut buffer = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
        // SAFETY: the buffer is nft_nlmsg_maxsize bytes, enough for the
        // header and a rule selector; the rule is freed after nftnl copied
        // its attributes into the message; nlmsg_len is within the buffer.
        let request_len = unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buffer.as_mut_ptr().cast(),
                libc::NFT_MSG_GETRULE as u16,
                ProtoFamily::Inet as u16,
                (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
                seq,
            );
            let selector = sys::nftnl_rule_alloc();
            if selector.is_null() {
                std::process::abort();
            }
            sys::nftnl_rule_set_str(selector, sys::NFTNL_RULE_TABLE as u16, self.table.get_name().as_ptr());
            sys::nftnl_rule_set_str(selector, sys::NFTNL_RULE_CHAIN as u16, Base::Input.chain_name().as_ptr());
            sys::nftnl_rule_nlmsg_build_payload(header, selector);
            sys::nftnl_rule_free(selector);
            (*header).nlmsg_len as usize
        };
        socket.send(&buffer[..request_len]).map_err(err)?;
        let mut drops = std::collections::BTreeMap::new();
        loop {
            let n = socket.recv_raw(&mut buffer).map_err(err)?;
            if let mnl::CbResult::Stop = mnl::cb_run2(&buffer[..n], seq, portid, count_meter_drops, &mut drops).map_err(err)? {
                return Ok(drops);
            }
        }
    }

    /// Deletes the table (everything sbx-net put into nftables). Missing is fine.
    pub fn remove(&self) -> Result<(), NftError> {
        let mut batch = Batch::new();
        batch.add(&self.table, MsgType::Add);
        batch.add(&self.table, MsgType::Del);
        commit(batch.finalize(), "deleting table inet sbx_net")
    }
}

/// One rule of the dump: if it updates a meter's set, its counter's
/// packets are that meter's drops (the rule drops whatever it counts).
fn count_meter_drops(header: &libc::nlmsghdr, drops: &mut std::collections::BTreeMap<Meter, u64>) -> libc::c_int {
    // SAFETY: the rule is allocated and freed here; nftnl parses the
    // message mnl validated; the iterator and the strings it yields live
    // while the rule does, and are read before it is freed.
    unsafe {
        let rule = sys::nftnl_rule_alloc();
        if rule.is_null() || sys::nftnl_rule_nlmsg_parse(header, rule) < 0 {
            sys::nftnl_rule_free(rule);
            return MNL_CB_ERROR;
        }
        let (mut meter, mut packets) = (None, 0);
        let iter = sys::nftnl_expr_iter_create(rule);
        let mut expr = sys::nftnl_expr_iter_next(iter);
        while !expr.is_null() {
            let name = CStr::from_ptr(sys::nftnl_expr_get_str(expr, sys::NFTNL_EXPR_NAME as u16));
            if name == c"dynset" {
                let set = CStr::from_ptr(sys::nftnl_expr_get_str(expr, sys::NFTNL_EXPR_DYNSET_SET_NAME as u16));
                meter = Meter::ALL.into_iter().find(|m| m.set_name() == set);
            } else if name == c"counter" {
                packets = sys::nftnl_expr_get_u64(expr, sys::NFTNL_EXPR_CTR_PACKETS as u16);
            }
            expr = sys::nftnl_expr_iter_next(iter);
        }
        sys::nftnl_expr_iter_destroy(iter);
        sys::nftnl_rule_free(rule);
        if let Some(meter) = meter {
            *drops.entry(meter).or_insert(0) += packets;
        }
    }
    MNL_CB_OK
}

/// libmnl's callback results: go on with the dump, or stop it (cb_run2
/// then returns the error).
const MNL_CB_OK: libc::c_int = 1;
const MNL_CB_ERROR: libc::c_int = -1;

fn commit(batch: FinalizedBatch, what: &str) -> Result<(), NftError> {
    let err = |source: std::io::Error| NftError::Netlink { what: what.to_string(), source };
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(err)?;
    let portid = socket.portid();
    socket.send_all(&batch).map_err(err)?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..]).map_err(err)? {
            let message = message.map_err(err)?;
            let Some(seq) = expected.next() else { break };
            mnl::cb_run(message, seq, portid).map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(uplink: Option<&str>) -> NftConfig {
        NftConfig {
            dns_port: 5353,
            proxy_port: 15001,
            proxied_ports: vec![80, 443],
            uplink: uplink.map(str::to_string),
            pool_v4: "10.200.0.0/16".parse().unwrap(),
            pool_v6: "fd73:6278::/48".parse().unwrap(),
            dns_queries_per_sandbox: Some(PacketRate { per_second: 1000, burst: 500 }),
            new_connections_per_sandbox: Some(PacketRate { per_second: 200, burst: 100 }),
        }
    }

    #[test]
    fn redirects_dns_and_proxied_ports() {
        let rules = ruleset(&config(Some("eth0")));
        let redirects: Vec<_> = rules.iter().filter(|r| r.chain == Base::Prerouting).collect();
        assert_eq!(redirects.len(), 4);
        assert!(redirects.iter().all(|r| r.matches[0] == Match::InputIsTap));
        assert_eq!(redirects[0].matches[2], Match::UdpDport(53));
        assert_eq!(redirects[0].action, Action::RedirectTo(5353));
        assert_eq!(redirects[1].matches[2], Match::TcpDport(53));
        assert_eq!(redirects[3].matches[2], Match::TcpDport(443));
        assert_eq!(redirects[3].action, Action::RedirectTo(15001));
    }

    #[test]
    fn input_admits_only_proxies_and_neighbour_discovery() {
        let rules = ruleset(&config(Some("eth0")));
        let input: Vec<_> = rules.iter().filter(|r| r.chain == Base::Input).collect();
        let tap_drop = input.iter().position(|r| r.matches == [Match::InputIsTap]).unwrap();
        assert_eq!(input[tap_drop].action, Action::Drop);
        // After the taps' accepts, the proxy ports are closed to everyone else.
        let others = &input[tap_drop + 1..];
        assert_eq!(others.len(), 3);
        assert!(others.iter().all(|r| r.action == Action::Drop && !r.matches.contains(&Match::InputIsTap)));
        for r in input[..tap_drop].iter().filter(|r| !r.matches.iter().any(|m| matches!(m, Match::TapOverRate(..)))) {
            assert_eq!(r.action, Action::Accept);
            assert!(r.matches.iter().any(|m| matches!(
                m,
                Match::UdpDport(5353) | Match::TcpDport(5353) | Match::TcpDport(15001) | Match::Icmpv6Type(133 | 135 | 136)
            )));
        }
    }

    #[test]
    fn a_sandbox_past_its_rates_is_dropped_before_the_proxies_accept_it() {
        let rules = ruleset(&config(None));
        let input: Vec<_> = rules.iter().filter(|r| r.chain == Base::Input).collect();
        let rate = PacketRate { per_second: 1000, burst: 500 };
        let metered = input.iter().position(|r| r.matches.contains(&Match::TapOverRate(Meter::DnsQueries, rate))).expect("the DNS meter");
        assert_eq!(input[metered].action, Action::Drop);
        assert_eq!(input[metered].matches[..3], [Match::InputIsTap, Match::Udp, Match::UdpDport(5353)]);
        let accept = input.iter().position(|r| r.matches == [Match::InputIsTap, Match::Udp, Match::UdpDport(5353)]).unwrap();
        assert!(metered < accept, "metered after the accept: it would never see a query");
        let connections = PacketRate { per_second: 200, burst: 100 };
        for port in [5353, 15001] {
            let metered = input
                .iter()
                .position(|r| r.matches == [Match::InputIsTap, Match::Tcp, Match::TcpDport(port), Match::CtNew, Match::TapOverRate(Meter::NewConnections, connections)])
                .expect("the new-connection meter");
            assert_eq!(input[metered].action, Action::Drop);
            let accept = input.iter().position(|r| r.matches == [Match::InputIsTap, Match::Tcp, Match::TcpDport(port)]).unwrap();
            assert!(metered < accept);
        }
        let unmetered = ruleset(&NftConfig { dns_queries_per_sandbox: None, new_connections_per_sandbox: None, ..config(None) });
        assert!(unmetered.iter().all(|r| !r.matches.iter().any(|m| matches!(m, Match::TapOverRate(..)))));
        assert_eq!(unmetered.len() + 3, rules.len());
    }

    #[test]
    fn forward_order_and_masquerade() {
        let rules = ruleset(&config(Some("eth0")));
        let forward: Vec<_> = rules.iter().filter(|r| r.chain == Base::Forward).map(|r| (r.matches.clone(), r.action.clone())).collect();
        assert_eq!(
            forward,
            vec![
                (vec![Match::InputIsTap, Match::OutputIsTap], Action::Drop),
                (vec![Match::InputIsTap, Match::CtInvalid], Action::Drop),
                (vec![Match::InputIsTap, Match::Udp, Match::UdpDport(53)], Action::Drop),
                (vec![Match::InputIsTap, Match::Tcp, Match::TcpDport(53)], Action::Drop),
                (vec![Match::InputIsTap, Match::Tcp, Match::TcpDport(80)], Action::Drop),
                (vec![Match::InputIsTap, Match::Tcp, Match::TcpDport(443)], Action::Drop),
                (vec![Match::InputIsTap, Match::OutputIs("eth0".into())], Action::Accept),
                (vec![Match::InputIsTap], Action::Drop),
                (vec![Match::OutputIsTap, Match::CtEstablishedOrRelated], Action::Accept),
                (vec![Match::OutputIsTap], Action::Drop),
            ]
        );
        assert_eq!(rules.iter().filter(|r| r.action == Action::Masquerade).count(), 2);
        let no_uplink = ruleset(&config(None));
        assert!(no_uplink.iter().all(|r| r.action != Action::Masquerade));
        assert!(no_uplink.iter().any(|r| r.chain == Base::Forward && r.matches == vec![Match::InputIsTap] && r.action == Action::Accept));
    }

    #[test]
    fn interface_names() {
        assert!(IfName::new("sbx-16383").is_ok());
        assert!(IfName::new("fifteen-chars-x").is_ok());
        assert!(IfName::new("sixteen-chars-xx").is_err());
        assert!(IfName::new("").is_err());
        assert!(IfName::new("a b").is_err());
        assert_eq!(&IfName::new("tap0").unwrap().data()[..5], b"tap0\0");
    }
}
