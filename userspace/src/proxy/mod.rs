//! The transparent TCP proxy that nftables redirects the guests' proxied
//! ports (80, 443 by default) to. It finds the sandbox by source address
//! (anti-spoof in eBPF makes that safe), the original destination with
//! SO_ORIGINAL_DST, applies the sandbox's compiled policy to it, and splices
//! — or, for a host with a credential, `[[http]]` rules or an `[[mcp]]`
//! server, terminates it and checks every request ([`inject`]). A deny in
//! audit mode connects anyway, recorded with verdict audit and the rule.

pub mod guest_tls;
pub mod inject;
pub mod mcp;
pub mod peek;

use crate::observe::hub::ConnectOutcome;
use crate::observe::record::Verdict;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sbx_net_common::action;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::policy::compile::{CompiledPolicy, PortInfo};
use crate::util::net::{bound_socket, canonical, canonical_addr, connect_remote, original_dst, reset, wildcard_addrs};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding the proxy on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Binds the IPv4 and IPv6 listeners.
pub fn bind(port: u16) -> Result<Vec<std::net::TcpListener>, ProxyError> {
    wildcard_addrs(port)
        .into_iter()
        .map(|addr| bound_socket(addr, socket2::Type::STREAM).map(Into::into).map_err(|source| ProxyError::Bind { addr, source }))
        .collect()
}

/// What bounds one sandbox's use of the proxy.
#[derive(Clone, Debug)]
pub struct ProxyLimits {
    pub connections: Arc<crate::util::conn_limit::ConnLimits>,
    /// The whole first-bytes read (not each byte) must finish in this time.
    pub first_bytes_timeout: Duration,
}

/// How the proxy resolves a name itself (when the guest's destination is
/// not one DNS answered it for that name): through the DNS proxy's
/// upstream client, to its upstream.
pub struct ProxyResolver {
    pub client: Arc<crate::dns::upstream::UpstreamClient>,
    /// `None`: nothing resolves.
    pub upstream: Option<SocketAddr>,
    pub timeout: Duration,
}

/// Everything the proxy's connections share.
pub struct ProxyContext {
    pub routes: crate::sandbox::route::Routes,
    /// The flow stream the proxy reports its decisions to.
    pub flows: Arc<crate::observe::hub::FlowHub>,
    /// What DNS answered each sandbox (read only).
    pub learned: Arc<crate::dns::learned::LearnedStore>,
    pub resolver: ProxyResolver,
    /// TLS to upstreams: the system's roots plus `--upstream-ca`.
    pub upstream_tls: crate::proxy::inject::UpstreamTls,
    /// The TLS configurations guests' connections to credential hosts are
    /// terminated with.
    pub guest_tls: guest_tls::GuestTlsConfigs,
    pub limits: ProxyLimits,
    /// How a guest connection's requests share the upstream connection.
    pub upstream_requests: inject::UpstreamRequests,
    /// Guest connections being served (a draining data plane waits for them).
    pub in_flight: crate::util::conn_limit::InFlight,
    /// Bumped whenever the route table changes: spliced connections look
    /// again at whether the policy in force still allows them.
    pub policy_changes: tokio::sync::watch::Receiver<u64>,
    /// Where guest connections are served, each to its end on one thread.
    pub threads: Arc<crate::util::conn_threads::ConnThreads>,
}

/// Accepts forever on `listener`.
pub async fn serve(listener: std::net::TcpListener, ctx: Arc<ProxyContext>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("proxy listener: {e}");
            return;
        }
    };
    let accepting = ctx.clone();
    crate::util::conn_limit::accept_each(listener, "proxy", move |stream, peer| {
        let (guard, ctx) = (accepting.in_flight.enter(), accepting.clone());
        let served = accepting.threads.serve(stream, move |stream| async move {
            let _in_flight = guard;
            handle(stream, peer, ctx).await
        });
        if let Err(e) = served {
            tracing::warn!(%peer, "proxy: handing a connection over: {e}");
        }
    })
    .await
}

/// `[[mcp]]` servers' requests and answers go through [`mcp`].
static MCP_HOOKS: inject::McpHooks = inject::McpHooks {
    check: |req, server, flow| Box::pin(async move { mcp::check_request(req, &server, &flow).await }),
    filter: mcp::filter_response,
};

/// What the proxy does with one connection (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Connect here: the guest's destination, checked for the name it asked
    /// for (an address the DNS proxy gave it for that name) or allowed by
    /// the IP rules when it named none.
    Connect { addr: SocketAddr, rule: String, audit: bool },
    /// Resolve the name ourselves and connect to an address we checked: the
    /// guest's destination was not one we answered for that name.
    Resolve { name: String, port: u16, rule: String, audit: bool },
    Deny { rule: String },
}

// In `Connect` and `Resolve`, `audit` means the connection is let through
// only because the deny that decided it is in audit mode: `rule` is that
// deny's, and the connection is recorded with verdict audit.

/// Whether a verdict of the address rules is a deny in audit mode: the
/// classifier's `AUDIT`, or (from a policy compiled before audit had its
/// own action) a `DENY` whose rule is in audit mode. Built-in denies never
/// are ([`CompiledPolicy::is_audit`]).
fn audited(policy: &CompiledPolicy, v: &sbx_net_common::Verdict) -> bool {
    v.action == action::AUDIT || (v.action == action::DENY && policy.is_audit(v.rule_id))
}

/// The built-in deny (the host's own addresses, the metadata and other
/// reserved ranges) that covers `ip`, if any.
fn builtin_deny_for(policy: &CompiledPolicy, ip: IpAddr) -> Option<String> {
    use crate::policy::{Action, Origin, Target};
    policy
        .rules
        .iter()
        .find(|r| r.origin == Origin::Builtin && r.action == Action::Deny && matches!(&r.target, Target::Cidr(n) if n.contains(ip)))
        .map(|r| r.describe())
}

/// Decides by the name the guest sent (SNI or Host), deny winning, else by
/// the original destination's IP rules. `learned_for` lists the addresses
/// the DNS proxy answered this sandbox for a name. A deny in audit mode
/// lets the connection through as the allow would, flagged `audit`.
///
/// A connection that names nothing (no SNI, an IP-literal SNI, ECH, HTTP
/// without Host, another protocol) is decided by the policy's own address
/// rules only, never by an address learned from DNS: that address was
/// opened for one name, and on a shared server (a CDN) it carries any other.
pub fn plan(policy: &CompiledPolicy, name: Option<&str>, original: SocketAddr, learned_for: impl Fn(&str) -> Vec<IpAddr>) -> Plan {
    let original = canonical_addr(original);
    let name = name.filter(|n| n.parse::<IpAddr>().is_err());
    let Some(name) = name else {
        let v = policy.lookup(original.ip(), PortInfo::Port(original.port()));
        let rule = policy.describe_rule(v.rule_id);
        return if v.action == action::ALLOW {
            Plan::Connect { addr: original, rule, audit: false }
        } else if audited(policy, &v) {
            // Where denies overlap the trie may keep one entry, the audited
            // range's: a built-in deny inside it is still enforced.
            match builtin_deny_for(policy, original.ip()) {
                Some(rule) => Plan::Deny { rule },
                None => Plan::Connect { addr: original, rule, audit: true },
            }
        } else {
            Plan::Deny { rule }
        };
    };
    if name.is_empty() || !crate::dns::decide::is_plain_name(name) {
        // Escapes, spaces, `*`, raw UTF-8: a resolver or a server could
        // read such a name as another one; no rule names it. Never
        // audited: a hostile name is not a policy choice.
        return Plan::Deny { rule: "malformed name".into() };
    }
    // Where an allowed (or audited) name goes: where the DNS proxy sent
    // the guest, or an address the proxy resolves and checks itself (so a
    // name cannot carry the guest to an address of its choosing).
    let go = |rule: String, audit: bool| {
        if audit {
            if let Some(builtin) = builtin_deny_for(policy, original.ip()) {
                return Plan::Deny { rule: builtin };
            }
        }
        if learned_for(name).contains(&original.ip()) {
            Plan::Connect { addr: original, rule, audit }
        } else {
            Plan::Resolve { name: name.to_string(), port: original.port(), rule, audit }
        }
    };
    // `name_verdict` already sets audit-mode denies aside: `Audit` is a
    // name only they (or the audit-mode default) would deny; `Denied` is
    // an enforced rule or default.
    match crate::dns::decide::name_verdict(policy, name) {
        crate::dns::decide::NameVerdict::Denied { rule_id } => Plan::Deny { rule: policy.describe_rule(rule_id) },
        verdict => {
            let audit = matches!(verdict, crate::dns::decide::NameVerdict::Audit { .. });
            let rule = policy.describe_rule(verdict.rule_id());
            let port = verdict.learn().and_then(|(_, port)| port);
            if let Some(p) = port.filter(|p| *p != original.port()) {
                let rule = format!("{rule} (port {p} only)");
                // The port is the policy's default deny at work.
                if policy.is_audit(sbx_net_common::rule_id::DEFAULT) {
                    return go(rule, true);
                }
                return Plan::Deny { rule };
            }
            go(rule, audit)
        }
    }
}

async fn handle(mut guest: TcpStream, peer: SocketAddr, ctx: Arc<ProxyContext>) {
    let limits = &ctx.limits;
    let original = match original_dst(&guest) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(%peer, "no original destination (not redirected?): {e}");
            return;
        }
    };
    let route = ctx.routes.read().unwrap_or_else(|p| p.into_inner()).get(&canonical(peer.ip())).cloned();
    let Some(route) = route else {
        if ctx.flows.log_lines.admits("(no sandbox)") {
            tracing::info!(%peer, dst = %original, "proxy: not a sandbox address; refused");
        }
        reset(&guest);
        return;
    };
    let mut flow = crate::observe::hub::FlowContext {
        hub: ctx.flows.clone(),
        sandbox: route.sandbox.as_str().into(),
        src: peer,
        dst: original,
        rule: "".into(),
    };
    // Held until the connection ends, whichever path it takes.
    let Ok(permit) = limits.connections.try_acquire(&route.sandbox) else {
        tracing::debug!(sandbox = %route.sandbox, dst = %original, "proxy: connection cap reached");
        flow.connection(Verdict::Denied, "connection_limit", Some(format!("at most {} proxied connections per sandbox", limits.connections.cap())), None);
        reset(&guest);
        return;
    };
    // Read the first bytes: the TLS ClientHello's SNI or the HTTP Host, all
    // of them within one deadline (a byte at a time does not extend it).
    let mut peeker = crate::proxy::peek::Peeker::default();
    let deadline = tokio::time::Instant::now() + limits.first_bytes_timeout;
    let kind = loop {
        let mut buf = [0u8; 4096];
        let room = crate::proxy::peek::PEEK_LIMIT.saturating_sub(peeker.bytes().len()).clamp(1, buf.len());
        let k = match tokio::time::timeout_at(deadline, guest.read(&mut buf[..room])).await {
            Ok(Ok(n)) if n > 0 => peeker.push(&buf[..n]),
            // Silent, slow or closed: decide without a name.
            _ => break crate::proxy::peek::FirstBytes::Other,
        };
        if k != crate::proxy::peek::FirstBytes::NeedMore {
            break k;
        }
    };
    let first = peeker.into_bytes();
    // What the proxy adds before bytes flow, from here to the upstream connection.
    let first_bytes_at = std::time::Instant::now();
    if let crate::proxy::peek::FirstBytes::AmbiguousHttp { reason } = kind {
        if ctx.flows.log_lines.admits(&route.sandbox) {
            tracing::info!(sandbox = %route.sandbox, dst = %original, reason, "proxy: ambiguous request head");
        }
        flow.connection(Verdict::Denied, "ambiguous_request", Some(reason.to_string()), None);
        let _ = guest.write_all(http_error(400, "Bad Request", &format!("ambiguous request ({reason})")).as_bytes()).await;
        let _ = guest.shutdown().await;
        return;
    }
    let name = match &kind {
        crate::proxy::peek::FirstBytes::Tls { sni } => sni.clone(),
        crate::proxy::peek::FirstBytes::Http { host } => host.clone(),
        _ => None,
    };
    let now = crate::util::clock::boot_time_ns();
    let decided = plan(&route.policy, name.as_deref(), original, |n| ctx.learned.addresses_for(&route.sandbox, n, now));
    let (targets, rule, audit) = match decided {
        Plan::Deny { rule } => {
            if ctx.flows.log_lines.admits(&route.sandbox) {
                tracing::info!(sandbox = %route.sandbox, name = name.as_deref().unwrap_or("-"), dst = %original, %rule, "proxy: denied");
            }
            flow.connection(Verdict::Denied, "policy", Some(rule.clone()), name.as_deref());
            refuse(&mut guest, &kind, &rule).await;
            return;
        }
        Plan::Connect { addr, rule, audit } => (vec![addr], rule, audit),
        Plan::Resolve { name, port, rule, audit } => match resolve(&ctx.resolver, &route.policy, &name, audit).await {
            Some(addrs) if !addrs.is_empty() => (addrs.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(), rule, audit),
            _ => {
                if ctx.flows.log_lines.admits(&route.sandbox) {
                    tracing::info!(sandbox = %route.sandbox, %name, "proxy: name does not resolve to an allowed address");
                }
                let why = format!("{name} has no allowed address");
                flow.connection(Verdict::Denied, "no_allowed_address", Some(why.clone()), Some(&name));
                refuse(&mut guest, &kind, &why).await;
                return;
            }
        },
    };
    flow.rule = rule.as_str().into();
    let mut upstream = None;
    for addr in &targets {
        if let Ok(s) = connect_remote(*addr).await {
            upstream = Some((s, *addr));
            break;
        }
    }
    let outcome = if upstream.is_some() { ConnectOutcome::Ok } else { ConnectOutcome::Failed };
    ctx.flows.metrics.observe_proxy_connect(outcome, first_bytes_at.elapsed().as_secs_f64());
    let Some((mut upstream, addr)) = upstream else {
        if ctx.flows.log_lines.admits(&route.sandbox) {
            tracing::info!(sandbox = %route.sandbox, dst = %original, "proxy: upstream connect failed");
        }
        flow.connection(Verdict::Allowed, "upstream_failed", Some(rule.clone()), name.as_deref());
        reset(&guest);
        return;
    };
    flow.dst = addr;
    if audit {
        // Let through only because the deny that decided is in audit mode.
        if ctx.flows.log_lines.admits(&route.sandbox) {
            tracing::info!(sandbox = %route.sandbox, name = name.as_deref().unwrap_or("-"), %addr, %rule, "proxy: audit (would have been denied)");
        }
        flow.connection(Verdict::Audit, "audit", Some(rule.clone()), name.as_deref());
    }
    let recheck = recheck_for(&ctx, peer, original, addr);
    // A host with a credential, `[[http]]` rules or an `[[mcp]]` server,
    // over TLS: terminated (the sandbox CA) so that every request is
    // checked (and injected), instead of spliced.
    if let crate::proxy::peek::FirstBytes::Tls { sni: Some(host) } = &kind {
        let binding = route.credentials.iter().find(|b| b.covers(host)).cloned();
        if binding.is_some() || crate::proxy::inject::governed(&route.policy, host, original.port()) {
            // Without the sandbox CA the requests cannot be checked:
            // refused, never spliced unchecked.
            let tls = match route.ca.as_ref().map(|ca| ctx.guest_tls.get(&route.sandbox, host, ca)) {
                Some(Ok(tls)) => tls,
                failed => {
                    let why = match failed {
                        Some(Err(e)) => format!("no TLS configuration for {host}: {e}"),
                        _ => format!("{host} is checked at the proxy, and the sandbox has no CA"),
                    };
                    if ctx.flows.log_lines.admits(&route.sandbox) {
                        tracing::info!(sandbox = %route.sandbox, %host, "proxy: {why}");
                    }
                    flow.connection(Verdict::Denied, "no_sandbox_ca", Some(why.clone()), Some(host));
                    refuse(&mut guest, &kind, &why).await;
                    return;
                }
            };
            // The proxy speaks HTTP to the guest from here: small writes go
            // out at once (with several HTTP/2 streams in flight, Nagle's
            // algorithm would hold a response behind the guest's delayed ACK).
            let _ = guest.set_nodelay(true);
            let guest = crate::proxy::inject::Prefixed::new(first, guest);
            // The connection just made goes on to carry the first request.
            let reached = crate::proxy::inject::Reached { stream: upstream, at: std::time::Instant::now() };
            let upstream = crate::proxy::inject::CredentialUpstream { addrs: targets.clone(), tls: ctx.upstream_tls.clone(), requests: ctx.upstream_requests, reached: std::sync::Mutex::new(Some(reached)) };
            if let Err(e) = crate::proxy::inject::serve(guest, host.clone(), original.port(), tls, upstream, binding, flow, Arc::new(permit), recheck, &MCP_HOOKS, deadline).await {
                if ctx.flows.log_lines.admits(&route.sandbox) {
                    tracing::info!(sandbox = %route.sandbox, %host, "credential proxy: {e}");
                }
            }
            return;
        }
    }
    // Plain HTTP by name goes through the HTTP forwarder: injected only for
    // a credential that allows plaintext; elsewhere sentinels are stripped.
    if let crate::proxy::peek::FirstBytes::Http { host: Some(host) } = &kind {
        if host.parse::<IpAddr>().is_err() {
            let binding = route.credentials.iter().find(|b| b.covers(host) && b.allow_plaintext).cloned();
            drop(upstream);
            let _ = guest.set_nodelay(true);
            let guest = crate::proxy::inject::Prefixed::new(first, guest);
            if let Err(e) = crate::proxy::inject::serve_plain(guest, host.clone(), original.port(), targets.clone(), binding, flow, recheck, &MCP_HOOKS).await {
                if ctx.flows.log_lines.admits(&route.sandbox) {
                    tracing::info!(sandbox = %route.sandbox, %host, "HTTP proxy: {e}");
                }
            }
            return;
        }
    }
    tracing::debug!(sandbox = %route.sandbox, name = name.as_deref().unwrap_or("-"), %addr, %rule, "proxy: spliced");
    if !audit {
        flow.connection(Verdict::Allowed, "allowed", Some(rule.clone()), name.as_deref());
    }
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    // Spliced until either side closes, or until a policy change denies it.
    let mut changes = ctx.policy_changes.clone();
    let denied_now = async {
        loop {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            let host = name.clone().unwrap_or_default();
            if let Err(rule) = recheck_allowed(&ctx, peer, original, addr, &host) {
                return rule;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream) => {}
        rule = denied_now => {
            if ctx.flows.log_lines.admits(&route.sandbox) {
                tracing::info!(sandbox = %route.sandbox, name = name.as_deref().unwrap_or("-"), %addr, %rule, "proxy: closed a connection the policy in force no longer allows");
            }
            flow.rule = rule.as_str().into();
            flow.connection(Verdict::Denied, "policy_changed", Some(rule), name.as_deref());
            reset(&guest);
        }
    }
}

/// Whether the policy in force now still allows what a connection from
/// `peer` to `original` (for `host`, empty when it named none), made to
/// `connected`, was allowed for; the denying rule when it does not. The
/// same decision a new connection would get: by the name and the guest's
/// destination, and — when the proxy resolved the name itself — the
/// address it connected to must still pass the answer filter. With the
/// route, the deny the connection passes in audit mode only, if any.
fn recheck_allowed(ctx: &ProxyContext, peer: SocketAddr, original: SocketAddr, connected: SocketAddr, host: &str) -> Result<(Arc<crate::sandbox::route::Route>, Option<String>), String> {
    let route = ctx.routes.read().unwrap_or_else(|p| p.into_inner()).get(&canonical(peer.ip())).cloned().ok_or("the sandbox is gone")?;
    let now = crate::util::clock::boot_time_ns();
    let name = (!host.is_empty()).then_some(host);
    match plan(&route.policy, name, original, |n| ctx.learned.addresses_for(&route.sandbox, n, now)) {
        Plan::Deny { rule } => Err(rule),
        Plan::Connect { rule, audit, .. } => Ok((route, audit.then_some(rule))),
        Plan::Resolve { name, rule, audit, .. } => {
            let record = crate::dns::decide::AnswerRecord::Address { owner: Ok(name.clone()), ip: connected.ip(), ttl: 60 };
            if !answer_addresses(&route.policy, &name, &[record], audit).contains(&connected.ip()) {
                return Err(format!("{} is not an allowed address of {name}", connected.ip()));
            }
            Ok((route, audit.then_some(rule)))
        }
    }
}

/// [`recheck_allowed`] with what the policy in force says of the host now.
fn recheck_for(ctx: &Arc<ProxyContext>, peer: SocketAddr, original: SocketAddr, connected: SocketAddr) -> crate::proxy::inject::Recheck {
    let ctx = ctx.clone();
    Arc::new(move |host: &str| {
        let (route, audit) = recheck_allowed(&ctx, peer, original, connected, host)?;
        let binding = route.credentials.iter().find(|b| b.covers(host)).cloned();
        Ok(crate::proxy::inject::InForce { policy: route.policy.clone(), binding, audit })
    })
}

/// The addresses of an answer for `name` the proxy may connect to (pure):
/// those the DNS answer filter would let the guest learn; and, for a name
/// let through only by an audit-mode deny (`audit`), when that deny keeps
/// the filter from passing any, its addresses outside enforced denied
/// ranges (the built-in ones among them).
fn answer_addresses(policy: &CompiledPolicy, name: &str, records: &[crate::dns::decide::AnswerRecord], audit: bool) -> Vec<IpAddr> {
    let planned = crate::dns::decide::plan_answer(policy, name, records);
    match planned.verdict {
        // Audited: every address the answer keeps (built-ins and enforced
        // denies are stripped), learned or not.
        crate::dns::decide::ChainVerdict::Audit { .. } if audit => records
            .iter()
            .zip(&planned.fates)
            .filter_map(|(r, fate)| match r {
                crate::dns::decide::AnswerRecord::Address { ip, .. } if *fate == crate::dns::decide::RecordFate::Keep && builtin_deny_for(policy, *ip).is_none() => Some(*ip),
                _ => None,
            })
            .collect(),
        crate::dns::decide::ChainVerdict::Allowed { .. } => planned.learn.into_iter().map(|(ip, _)| ip).collect(),
        _ => Vec::new(),
    }
}

/// A's then AAAA's of `name` from the upstream resolver, keeping only
/// addresses the sandbox's policy does not deny (the rebinding rule).
async fn resolve(resolver: &ProxyResolver, policy: &CompiledPolicy, name: &str, audit: bool) -> Option<Vec<IpAddr>> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let upstream = resolver.upstream?;
    let mut out = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        let mut q = Message::new();
        q.set_id(0).set_recursion_desired(true);
        q.add_query(Query::query(Name::from_ascii(name).ok()?, rtype));
        let bytes = q.to_vec().ok()?;
        let Ok(answer) = resolver.client.forward(upstream, &bytes, resolver.timeout).await else { continue };
        let Ok(message) = Message::from_vec(&answer) else { continue };
        let records: Vec<crate::dns::decide::AnswerRecord> = message.answers().iter().map(crate::dns::server::answer_record).collect();
        out.extend(answer_addresses(policy, name, &records, audit));
    }
    Some(out)
}

/// Refuses in the protocol the guest spoke: HTTP 403 with the reason, a TLS
/// `access_denied` alert, or a reset.
async fn refuse(guest: &mut TcpStream, kind: &crate::proxy::peek::FirstBytes, reason: &str) {
    match kind {
        crate::proxy::peek::FirstBytes::Http { .. } => {
            let _ = guest.write_all(http_error(403, "Forbidden", &guest_facing_rule(reason)).as_bytes()).await;
            let _ = guest.shutdown().await;
        }
        crate::proxy::peek::FirstBytes::Tls { .. } => {
            // TLS alert record: fatal (2), access_denied (49).
            let _ = guest.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49]).await;
            let _ = guest.shutdown().await;
        }
        _ => reset(guest),
    }
}

/// A complete HTTP/1.1 error response that closes the connection, the
/// rule or reason in `X-Sbx-Net-Denied` (printable ASCII only) and in the body.
fn http_error(status: u16, text: &str, reason: &str) -> String {
    let header_reason: String = reason.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').collect();
    let body = format!("sbx-net: denied by {reason}\n");
    format!(
        "HTTP/1.1 {status} {text}\r\nX-Sbx-Net-Denied: {header_reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The rule as the guest may see it: the host's own addresses are the
/// operator's business (they stay in logs and `inspect`), not the guest's.
pub fn guest_facing_rule(rule: &str) -> String {
    match rule.strip_suffix(" (host address)") {
        Some(with_addr) => match with_addr.rsplit_once(' ') {
            Some((head, _addr)) => format!("{head} (host address)"),
            None => rule.to_string(),
        },
        None => rule.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;
    use crate::policy::Policy;

    #[test]
    fn plans_by_name_then_by_address() {
        let policy = Policy::parse(
            "t.toml",
            "name = \"t\"\n[network]\nallow = [\"198.51.100.0/24\", \"api.test\", \"git.test:22\"]\ndeny = [\"198.51.100.16/28\", \"bad.test\"]\n",
        )
        .unwrap();
        let p = compile(&policy, &[]).unwrap();
        let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
        let none = |_: &str| Vec::new();
        // No name: the IP rules (and learned entries) decide.
        assert_eq!(plan(&p, None, dst("198.51.100.5:80"), none), Plan::Connect { addr: dst("198.51.100.5:80"), rule: "allow 198.51.100.0/24".into(), audit: false });
        assert_eq!(plan(&p, None, dst("198.51.100.20:80"), none), Plan::Deny { rule: "deny 198.51.100.16/28".into() });
        // No name, and an address learned from DNS for some name: refused
        // (the learned address is not consulted at all).
        let learned_any = |_: &str| vec!["203.0.113.9".parse().unwrap()];
        assert_eq!(plan(&p, None, dst("203.0.113.9:443"), learned_any), Plan::Deny { rule: "default deny".into() });
        assert!(matches!(plan(&p, Some("203.0.113.9"), dst("203.0.113.9:443"), none), Plan::Deny { .. }));
        // A name: deny wins; an allowed name goes where the DNS proxy sent
        // the guest, or is resolved by the proxy itself.
        assert_eq!(plan(&p, Some("bad.test"), dst("198.51.100.5:80"), none), Plan::Deny { rule: "deny bad.test".into() });
        assert_eq!(plan(&p, Some("unlisted.test"), dst("198.51.100.5:80"), none), Plan::Deny { rule: "default deny".into() });
        let learned = |n: &str| if n == "api.test" { vec!["203.0.113.9".parse().unwrap()] } else { Vec::new() };
        assert_eq!(plan(&p, Some("api.test"), dst("203.0.113.9:443"), learned), Plan::Connect { addr: dst("203.0.113.9:443"), rule: "allow api.test".into(), audit: false });
        assert_eq!(
            plan(&p, Some("api.test"), dst("198.51.100.20:443"), learned),
            Plan::Resolve { name: "api.test".into(), port: 443, rule: "allow api.test".into(), audit: false }
        );
        assert!(matches!(plan(&p, Some("git.test"), dst("203.0.113.9:443"), none), Plan::Deny { .. }));
        // A name no rule can stand for is refused even under default allow.
        let open = compile(&Policy::parse("o.toml", "name = \"o\"\n[network]\ndefault = \"allow\"\n").unwrap(), &[]).unwrap();
        for odd in ["x\\.api.test", "a b.test", "*.test", "caf\u{e9}.test"] {
            assert_eq!(plan(&open, Some(odd), dst("203.0.113.9:443"), learned), Plan::Deny { rule: "malformed name".into() }, "{odd}");
        }
        // v4-mapped destinations are the same address.
        assert!(matches!(plan(&p, None, dst("[::ffff:198.51.100.5]:80"), none), Plan::Connect { .. }));
        assert_eq!(guest_facing_rule("builtin deny 10.250.0.1/32 (host address)"), "builtin deny (host address)");
        assert_eq!(guest_facing_rule("builtin deny fd00::1/128 (host address)"), "builtin deny (host address)");
        assert_eq!(guest_facing_rule("deny 10.0.0.0/8"), "deny 10.0.0.0/8");
    }

    #[test]
    fn audit_mode_denies_connect_flagged() {
        let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
        let none = |_: &str| Vec::new();
        let learned = |n: &str| if n == "bad.test" { vec!["203.0.113.9".parse().unwrap()] } else { Vec::new() };
        let rule_audit = Policy::parse(
            "r.toml",
            "name = \"r\"\n[network]\nallow = [\"api.test\", \"bad.test\", \"198.51.100.0/24\"]\n\
             deny = [{ pattern = \"bad.test\", mode = \"audit\" }, \"worse.test\", { pattern = \"198.51.100.16/28\", mode = \"audit\" }, { pattern = \"audited-only.test\", mode = \"audit\" }]\n",
        )
        .unwrap();
        let p = compile(&rule_audit, &["198.51.100.17".parse().unwrap()]).unwrap();
        // A name denied by an audit-mode rule goes where an allowed one
        // would: the address DNS gave the guest, else one the proxy resolves.
        match plan(&p, Some("bad.test"), dst("203.0.113.9:443"), learned) {
            Plan::Connect { addr, rule, audit: true } => assert!(addr == dst("203.0.113.9:443") && rule.contains("bad.test"), "{rule}"),
            other => panic!("{other:?}"),
        }
        match plan(&p, Some("bad.test"), dst("198.51.100.5:443"), learned) {
            Plan::Resolve { name, port: 443, rule, audit: true } => assert!(name == "bad.test" && rule.contains("bad.test"), "{rule}"),
            other => panic!("{other:?}"),
        }
        let at_host = |_: &str| vec!["198.51.100.17".parse().unwrap()];
        assert!(matches!(plan(&p, Some("bad.test"), dst("198.51.100.17:443"), at_host), Plan::Deny { rule } if rule.starts_with("builtin deny")));
        // Enforced denies, the default and hostile names stay denied; an
        // audit-mode deny with nothing allowing the name under it leaves it
        // to the enforced default (a deny in audit never opens more).
        assert_eq!(plan(&p, Some("audited-only.test"), dst("203.0.113.9:443"), none), Plan::Deny { rule: "default deny".into() });
        assert!(matches!(plan(&p, Some("worse.test"), dst("203.0.113.9:443"), none), Plan::Deny { .. }));
        assert_eq!(plan(&p, Some("unlisted.test"), dst("203.0.113.9:443"), none), Plan::Deny { rule: "default deny".into() });
        assert_eq!(plan(&p, Some("a b.test"), dst("203.0.113.9:443"), none), Plan::Deny { rule: "malformed name".into() });
        // By address: an audit-mode range connects flagged; a built-in deny
        // inside it (the host's own address) is never audited.
        match plan(&p, None, dst("198.51.100.20:80"), none) {
            Plan::Connect { rule, audit: true, .. } => assert!(rule.contains("198.51.100.16/28"), "{rule}"),
            other => panic!("{other:?}"),
        }
        match plan(&p, None, dst("198.51.100.17:80"), none) {
            Plan::Deny { rule } => assert!(rule.starts_with("builtin deny"), "{rule}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(plan(&p, Some("api.test"), dst("203.0.113.9:443"), none), Plan::Resolve { audit: false, .. }));
        // A whole policy in audit mode: its default deny lets through too.
        let whole = compile(&Policy::parse("w.toml", "name = \"w\"\nmode = \"audit\"\n[network]\nallow = [\"git.test:22\"]\n").unwrap(), &[]).unwrap();
        assert_eq!(plan(&whole, None, dst("203.0.113.9:443"), none), Plan::Connect { addr: dst("203.0.113.9:443"), rule: "default deny".into(), audit: true });
        assert_eq!(plan(&whole, Some("unlisted.test"), dst("203.0.113.9:443"), none), Plan::Resolve { name: "unlisted.test".into(), port: 443, rule: "default deny".into(), audit: true });
        assert!(matches!(plan(&whole, Some("git.test"), dst("203.0.113.9:443"), none), Plan::Resolve { audit: true, .. }));
        assert_eq!(plan(&whole, Some("x\\.test"), dst("203.0.113.9:443"), none), Plan::Deny { rule: "malformed name".into() });
    }

    #[test]
    fn audited_names_resolve_to_addresses_outside_enforced_denies() {
        use crate::dns::decide::AnswerRecord;
        let p = compile(
            &Policy::parse("r.toml", "name = \"r\"\n[network]\nallow = [\"api.test\", \"bad.test\"]\ndeny = [{ pattern = \"bad.test\", mode = \"audit\" }, \"10.0.0.0/8\"]\n").unwrap(),
            &[],
        )
        .unwrap();
        let a = |ip: &str| AnswerRecord::Address { owner: Ok("bad.test".into()), ip: ip.parse().unwrap(), ttl: 60 };
        let records = [a("203.0.113.9"), a("10.1.2.3")];
        let ips = |v: Vec<IpAddr>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(ips(answer_addresses(&p, "bad.test", &records, true)), ["203.0.113.9"]);
        let enforced = compile(&Policy::parse("e.toml", "name = \"e\"\n[network]\nallow = [\"api.test\", \"bad.test\"]\ndeny = [\"bad.test\"]\n").unwrap(), &[]).unwrap();
        assert!(answer_addresses(&enforced, "bad.test", &records, false).is_empty(), "enforced, the deny keeps every address");
        let ok = [AnswerRecord::Address { owner: Ok("api.test".into()), ip: "203.0.113.9".parse().unwrap(), ttl: 60 }];
        assert_eq!(ips(answer_addresses(&p, "api.test", &ok, false)), ["203.0.113.9"]);
    }
}
