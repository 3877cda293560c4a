//! Wiring of the daemon process: mount namespace and bpffs, the control
//! socket, the control thread, the proxies, signals. The decisions live in
//! [`crate::control::daemon`]; this is the I/O around them.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};

use crate::control::api::{ErrorKind, Request, Response};
use crate::control::config::DaemonConfig;
use crate::control::daemon::{Daemon, DaemonError};
use crate::dns::server as dns_proxy;
use crate::proxy;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error(transparent)]
    Dns(#[from] dns_proxy::DnsError),
    #[error(transparent)]
    CredentialProxy(#[from] proxy::inject::CredentialProxyError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("a daemon already answers on {0}; stop it first")]
    AlreadyRunning(String),
    #[error(transparent)]
    Locked(#[from] crate::control::instance_lock::LockError),
}

/// Takes the one-daemon-per-data-path lock on this network namespace, the
/// pin directory and the state directory (created if missing); held until
/// the process ends.
pub fn lock_instance(config: &DaemonConfig) -> Result<crate::control::instance_lock::InstanceLock, ServerError> {
    for dir in [&config.bpf_dir, &config.state_dir] {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    Ok(crate::control::instance_lock::InstanceLock::acquire(&[&config.bpf_dir, &config.state_dir])?)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// Under `ip netns exec` the process gets a private mount namespace with a
/// fresh /sys (no bpffs) whose mounts die with it: pins made there would
/// vanish — and detach every sandbox's program — when the daemon exits, and
/// guest namespaces would be invisible to the host. The network namespace
/// is what `ip netns exec` is for, so when our bpf dir is not on a bpffs,
/// rejoin the mount namespace `ip netns exec` left: our parent's (`ip`
/// execs us in place, so the parent is whoever ran it), else PID 1's,
/// provided /sys/fs/bpf is a bpffs there. Must run before any thread starts
/// (setns(CLONE_NEWNS) needs that).
fn join_host_mount_namespace(bpf_dir: &Path) -> Result<Option<u32>, ServerError> {
    if on_bpffs(bpf_dir) {
        return Ok(None);
    }
    let mine = std::fs::read_link("/proc/self/ns/mnt").map_err(io("reading /proc/self/ns/mnt"))?;
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() } as u32;
    for pid in [parent, 1] {
        let Ok(theirs) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else { continue };
        if theirs == mine || !is_bpffs(&Path::new(&format!("/proc/{pid}/root")).join("sys/fs/bpf")) {
            continue;
        }
        let Ok(file) = std::fs::File::open(format!("/proc/{pid}/ns/mnt")) else { continue };
        // SAFETY: setns on a namespace fd we own; the process is
        // single-threaded here (the kernel fails with EINVAL otherwise).
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
            return Err(io("joining the host mount namespace")(std::io::Error::last_os_error()));
        }
        return Ok(Some(pid));
    }
    Ok(None)
}

fn on_bpffs(dir: &Path) -> bool {
    dir.ancestors().any(|a| a.exists() && is_bpffs(a))
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs is plain data filled by the kernel; c is NUL-terminated.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(c.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure the pin directory is on a bpffs, mounting one at /sys/fs/bpf
/// when nothing is mounted there.
fn ensure_bpffs(bpf_dir: &Path) -> Result<(), ServerError> {
    let mount_point = Path::new("/sys/fs/bpf");
    if on_bpffs(bpf_dir) {
        return Ok(());
    }
    if bpf_dir.starts_with(mount_point) && !is_bpffs(mount_point) {
        // SAFETY: mount(2) with NUL-terminated constant strings and no data.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        if rc == 0 {
            return Ok(());
        }
        return Err(io("mounting bpffs at /sys/fs/bpf")(std::io::Error::last_os_error()));
    }
    Err(io(format!("{} is not on a bpffs", bpf_dir.display()))(std::io::Error::from(std::io::ErrorKind::Unsupported)))
}

fn absolute(config: &mut DaemonConfig) -> Result<(), ServerError> {
    let abs = |p: &Path| std::path::absolute(p).map_err(io(format!("resolving {}", p.display())));
    config.state_dir = abs(&config.state_dir)?;
    config.socket = abs(&config.socket)?;
    config.bpf_dir = abs(&config.bpf_dir)?;
    if let Some(d) = &config.policy_dir {
        config.policy_dir = Some(abs(d)?);
    }
    if let Some(d) = &config.upstream_ca {
        config.upstream_ca = Some(abs(d)?);
    }
    Ok(())
}

/// Prepares the process (paths, mount namespace, bpffs); call first, while
/// single-threaded.
pub fn prepare(config: &mut DaemonConfig) -> Result<(), ServerError> {
    absolute(config)?;
    if let Some(pid) = join_host_mount_namespace(&config.bpf_dir)? {
        tracing::info!(pid, "joined the mount namespace of this process: pins and guest namespaces must outlive ours");
    }
    ensure_bpffs(&config.bpf_dir)
}

/// Runs the daemon until SIGTERM/SIGINT. Exiting leaves every sandbox
/// enforced (pinned links and maps, nftables, pumps).
pub fn run(mut config: DaemonConfig) -> Result<(), ServerError> {
    prepare(&mut config)?;
    let _lock = lock_instance(&config)?;
    // Pumps we spawn are reaped by the kernel (we never wait for them).
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    if UnixStream::connect(&config.socket).is_ok() {
        return Err(ServerError::AlreadyRunning(config.socket.display().to_string()));
    }
    let routes: crate::sandbox::route::Routes = Arc::new(RwLock::new(Default::default()));
    let flows = Arc::new(crate::observe::hub::FlowHub::new(&config.flow_log()));
    let daemon = Daemon::start(config.clone(), routes.clone(), flows.clone())?;
    let proxy_listeners = proxy::bind(config.proxy_port)?;
    let (dns_udp, dns_tcp) = dns_proxy::bind(config.dns_port)?;
    let learned = daemon.dns_state();
    let upstream_dns = Arc::new(crate::dns::upstream::UpstreamClient::default());
    let dns_settings = dns_proxy::DnsSettings {
            upstream: config.upstream_resolver(),
            timing: crate::dns::decide::LearnTiming { min_ttl: config.dns_min_ttl, max_ttl: config.dns_max_ttl, grace: config.dns_grace },
            refuse_denied: config.dns_refuse_denied,
            upstream_timeout: std::time::Duration::from_secs(3),
            max_addresses_per_name: config.dns_max_addresses_per_name,
            hold_timeout: std::time::Duration::from_millis(500),
            max_upstream_per_sandbox: dns_proxy::DEFAULT_MAX_UPSTREAM_PER_SANDBOX,
            tcp: config.dns_tcp_limits(),
    };
    let dns = Arc::new(dns_proxy::DnsContext {
        slots: dns_proxy::DnsSlots::new(&dns_settings),
        conntrack: Default::default(),
        settings: dns_settings,
        routes: routes.clone(),
        learned: learned.clone(),
        stats: daemon.dns_stats(),
        upstream: upstream_dns.clone(),
        flows: flows.clone(),
    });
    let proxy = Arc::new(proxy::ProxyContext {
        routes: routes.clone(),
        flows: flows.clone(),
        learned: learned.clone(),
        resolver: proxy::ProxyResolver { client: upstream_dns, upstream: dns.settings.upstream, timeout: dns.settings.upstream_timeout },
        upstream_tls: proxy::inject::upstream_tls(config.upstream_ca.as_deref())?,
        guest_tls: Default::default(),
        limits: config.proxy_limits(),
        upstream_requests: config.upstream_requests(),
    });
    let metrics = Arc::new(register_metrics(&config, &daemon, &flows, &dns, &routes));
    let listener = bind_socket(&config)?;
    let inspect_flows = flows.clone();
    let bpf_dir = config.bpf_dir.clone();

    let (tx, rx) = mpsc::channel::<(Request, mpsc::Sender<Response>)>();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let mut daemon = daemon;
            for (request, reply) in rx {
                let _ = reply.send(daemon.handle(request));
            }
        })
        .map_err(io("spawning the control thread"))?;
    std::thread::Builder::new()
        .name("socket".into())
        .spawn(move || {
            let mut backoff = crate::util::conn_limit::AcceptBackoff::default();
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => {
                        backoff.succeeded();
                        stream
                    }
                    Err(e) => {
                        // Out of descriptors: wait for some to close
                        // rather than spin on accept.
                        let (wait, first) = backoff.failed(&e);
                        if first {
                            tracing::warn!("control socket: accept failed ({e}); backing off");
                        }
                        std::thread::sleep(wait);
                        continue;
                    }
                };
                let (tx, flows, bpf_dir) = (tx.clone(), inspect_flows.clone(), bpf_dir.clone());
                std::thread::spawn(move || serve_client(stream, tx, &flows, &bpf_dir));
            }
        })
        .map_err(io("spawning the socket thread"))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the runtime"))?;
    let socket_path = config.socket.clone();
    let audited = flows.clone();
    runtime.block_on(async move {
        for l in proxy_listeners {
            tokio::spawn(proxy::serve(l, proxy.clone()));
        }
        for u in dns_udp {
            tokio::spawn(dns_proxy::serve_udp(u, dns.clone()));
        }
        for t in dns_tcp {
            tokio::spawn(dns_proxy::serve_tcp(t, dns.clone()));
        }
        tokio::spawn(crate::observe::ingest::read_datapath_events(config.bpf_dir.clone(), flows.clone(), routes.clone(), learned.clone()));
        let gc_routes = routes.clone();
        tokio::spawn(crate::dns::learned::collect_expired(learned, config.learned_snapshot(), move |sandbox| {
            let table = gc_routes.read().unwrap_or_else(|p| p.into_inner());
            table.values().find(|r| r.sandbox == sandbox).map(|r| r.policy.clone())
        }));
        tracing::info!(dns_port = config.dns_port, upstream = ?dns.settings.upstream, "DNS proxy ready");
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let mut metrics_server = None;
        if let Some(addr) = config.metrics_addr {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, "metrics at /metrics");
                    metrics_server = Some(tokio::spawn(crate::observe::metrics::serve(listener, metrics, async move {
                        let _ = metrics_stopped.await;
                    })));
                }
                Err(e) => tracing::error!(%addr, "metrics endpoint not started: {e}"),
            }
        }
        tracing::info!(socket = %socket_path.display(), proxy_port = config.proxy_port, "sbx-net daemon ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping; sandboxes stay enforced by the kernel (pinned programs, maps and nftables)");
        let _ = std::fs::remove_file(&socket_path);
        // Scrapes in flight get their answer (the server bounds the wait).
        let _ = stop_metrics.send(());
        if let Some(server) = metrics_server {
            let _ = server.await;
        }
        Ok::<(), ServerError>(())
    })?;
    // Audit lines queued before the signal reach the disk; nothing else is
    // waited for (client threads, the runtime's tasks).
    audited.sync_audit();
    std::process::exit(0);
}

fn bind_socket(config: &DaemonConfig) -> Result<UnixListener, ServerError> {
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // A socket file nobody answers on is stale (checked in `run`).
    let _ = std::fs::remove_file(&config.socket);
    let listener = UnixListener::bind(&config.socket).map_err(io(format!("binding {}", config.socket.display())))?;
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(config.socket_mode))
        .map_err(io(format!("chmod {}", config.socket.display())))?;
    Ok(listener)
}

fn serve_client(stream: UnixStream, control: mpsc::Sender<(Request, mpsc::Sender<Response>)>, flows: &crate::observe::hub::FlowHub, bpf_dir: &Path) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        let response = match parse_request(&line) {
            Ok(Request::Inspect { follow }) => {
                // The stream ends the connection (a follower's when it goes away).
                let table = crate::datapath::PinnedFlows::open(bpf_dir).ok();
                let fd = writer.as_raw_fd();
                let _ = flows.serve_inspect(&mut std::io::BufWriter::new(writer), follow, table.as_ref(), || peer_closed(fd));
                return;
            }
            Ok(request) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                if control.send((request, reply_tx)).is_err() {
                    return;
                }
                reply_rx.recv().unwrap_or(Response::error(ErrorKind::Unavailable, "the daemon's control thread stopped"))
            }
            Err(bad) => bad,
        };
        let mut out = serde_json::to_string(&response).expect("responses serialize");
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

/// One request line of the control socket, or the error response that
/// answers it. Pure, so the `api` fuzz target runs exactly this.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    serde_json::from_str::<Request>(line).map_err(|e| Response::error(ErrorKind::Invalid, format!("bad request: {e}")))
}

/// Whether the peer of a connected socket hung up (poll(2) without waiting).
fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one pollfd we own, for an fd the caller keeps open; no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The `/metrics` registry, each component registering its own families:
/// the daemon's numbers, the flow stream's (and the proxies' and audit
/// log's) counters, the DNS proxy's, and the datapath's pinned maps.
fn register_metrics(
    config: &DaemonConfig,
    daemon: &Daemon,
    flows: &crate::observe::hub::FlowHub,
    dns: &dns_proxy::DnsContext,
    routes: &crate::sandbox::route::Routes,
) -> crate::observe::metrics::Metrics {
    let mut metrics = crate::observe::metrics::Metrics::default();
    daemon.metrics().register(metrics.registry());
    flows.metrics.register(metrics.registry());
    dns.stats.register(dns.learned.clone(), metrics.registry());
    match crate::datapath::PinnedStats::open(&config.bpf_dir) {
        Ok(maps) => metrics.registry().register_collector(Box::new(crate::observe::datapath_metrics::DatapathCollector::new(maps, routes.clone()))),
        Err(e) => tracing::error!("/metrics: the datapath's maps are unreadable; their families are left out: {e}"),
    }
    metrics
}
