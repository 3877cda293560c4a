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

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("a daemon already answers on {0}; stop it first")]
    AlreadyRunning(String),
    #[error(transparent)]
    Locked(#[from] crate::control::instance_lock::LockError),
    #[error(transparent)]
    Systemd(#[from] crate::control::systemd::SystemdError),
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
/// enforced (pinned links and maps, nftables, pumps) and the data plane
/// serving (a restarted daemon adopts it).
pub fn run(mut config: DaemonConfig) -> Result<(), ServerError> {
    // SAFETY: first thing, single-threaded, before anything opens a
    // descriptor that could land on 3 and up: what systemd passed is ours.
    let systemd = unsafe { crate::control::systemd::inherit() }?;
    prepare(&mut config)?;
    let _lock = lock_instance(&config)?;
    // Pumps and data planes we spawn are reaped by the kernel (we never
    // wait for them).
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    // systemd's socket (a .socket unit) is checked before anything starts;
    // connecting to it would only queue in our own backlog, so the
    // instance lock alone refuses a second daemon then.
    let inherited_listener = match systemd.control {
        Some(fd) => Some(crate::control::systemd::checked_listener(fd, &config.socket, config.socket_mode)?),
        None => {
            if UnixStream::connect(&config.socket).is_ok() {
                return Err(ServerError::AlreadyRunning(config.socket.display().to_string()));
            }
            None
        }
    };
    let socket_owned_by_systemd = inherited_listener.is_some();
    let notifier = systemd.notifier.map(Arc::new);
    let watchdog_every = systemd.watchdog_every;
    if let Some(every) = watchdog_every {
        tracing::info!(ping_every_ms = every.as_millis() as u64, "systemd watchdog: pinged from the control thread");
    }
    let routes: crate::sandbox::route::Routes = Arc::new(RwLock::new(Default::default()));
    let mut daemon = Daemon::start(config.clone(), routes.clone())?;
    let fleet_watcher = match &config.fleet {
        Some(fleet) => Some(fleet_watcher(fleet, &mut daemon)?),
        None => None,
    };
    let mut metrics = register_metrics(&config, &daemon, &routes);
    if let Some((watcher, _)) = &fleet_watcher {
        crate::fleet::status::register_metrics(watcher.status(), metrics.registry());
    }
    let metrics = Arc::new(metrics);

    // Re-adoption is done (Daemon::start): what READY=1 reports.
    let adopted = sandbox_count(&mut daemon);
    let (tx, rx) = mpsc::channel::<Control>();
    let control_notifier = notifier.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control_loop(daemon, rx, control_notifier.as_deref(), watchdog_every))
        .map_err(io("spawning the control thread"))?;
    if let (Some((watcher, first_sync)), Some(fleet)) = (fleet_watcher, &config.fleet) {
        let sink = DaemonSink(tx.clone());
        std::thread::Builder::new()
            .name("fleet".into())
            .spawn(move || {
                // Multi-thread: the watcher waits for the control thread in
                // block_in_place while the status lease is kept alive.
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("fleet")
                    .enable_all()
                    .build()
                    .expect("the fleet thread's runtime");
                runtime.block_on(watcher.with_sink(sink).run());
            })
            .map_err(io("spawning the fleet thread"))?;
        // Serve once the store has been read (or could not be, within the
        // wait): a sandbox created at once gets the fleet's policies.
        let wait = std::time::Duration::from_millis(fleet.initial_sync_ms);
        if first_sync.recv_timeout(wait).is_err() {
            tracing::warn!(wait_ms = fleet.initial_sync_ms, "fleet: the store did not answer in time; serving on the cached policies while the watcher retries");
        }
    }
    // The stop signals are taken over before the control socket answers: a
    // SIGTERM as soon as the daemon serves (systemd, a test) is a clean
    // stop, never the default death by signal.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(io("starting the runtime"))?;
    let (mut term, mut interrupt) = {
        let _entered = runtime.enter();
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?, signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?)
    };
    let listener = match inherited_listener {
        Some(listener) => {
            tracing::info!(socket = %config.socket.display(), "serving on the control socket systemd passed (socket activation)");
            listener
        }
        None => bind_socket(&config)?,
    };
    let clients = Arc::new(ClientThreads { listener, control: tx, config: Arc::new(config.clone()), idle: Acceptors::default() });
    for _ in 0..MIN_IDLE_ACCEPTORS {
        ClientThreads::start(&clients).map_err(io("starting the control socket's threads"))?;
    }

    let socket_path = config.socket.clone();
    runtime.block_on(async move {
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
        tracing::info!(socket = %socket_path.display(), proxy_port = config.proxy_port, dns_port = config.dns_port, "sbx-net daemon ready");
        // Sandboxes re-adopted, the control socket's threads accepting, the handlers
        // in place: only now is the service up for systemd.
        if let Some(n) = &notifier {
            notify(n.ready(&format!("serving {adopted} sandbox(es) on {}", socket_path.display())));
        }
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        if let Some(n) = &notifier {
            notify(n.stopping());
        }
        tracing::info!("stopping; sandboxes stay enforced by the kernel (pinned programs, maps and nftables) and the data plane serves on");
        // systemd's socket stays: it queues the CLI's calls until the next
        // daemon takes it over.
        if !socket_owned_by_systemd {
            let _ = std::fs::remove_file(&socket_path);
        }
        // Scrapes in flight get their answer (the server bounds the wait).
        let _ = stop_metrics.send(());
        if let Some(server) = metrics_server {
            let _ = server.await;
        }
        Ok::<(), ServerError>(())
    })?;
    // Nothing else is waited for (client threads, the runtime's tasks).
    std::process::exit(0);
}

/// The control thread: every mutation, one at a time. Under a systemd
/// watchdog it pings from here, between requests, so a control thread stuck
/// in one gets the daemon restarted (the sandboxes stay enforced and the
/// next daemon re-adopts them).
fn control_loop(mut daemon: Daemon, rx: mpsc::Receiver<Control>, notifier: Option<&crate::control::systemd::Notifier>, watchdog_every: Option<std::time::Duration>) {
    let watchdog = notifier.zip(watchdog_every);
    let mut last_ping = std::time::Instant::now();
    if let Some((n, _)) = watchdog {
        notify(n.watchdog());
    }
    loop {
        let message = match watchdog {
            Some((_, every)) => match rx.recv_timeout(every.saturating_sub(last_ping.elapsed())) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(message) => Some(message),
                Err(_) => return,
            },
        };
        match message {
            Some(Control::Client(request, reply)) => {
                let reload = matches!(request, Request::PolicyReload);
                if let (true, Some(n)) = (reload, notifier) {
                    notify(n.reloading());
                }
                let response = daemon.handle(request);
                if let (true, Some(n)) = (reload, notifier) {
                    let outcome = match &response {
                        Response::Ok(_) => "policies reloaded".to_string(),
                        _ => "policy reload failed; the policies in force stay".to_string(),
                    };
                    notify(n.ready(&outcome));
                }
                let _ = reply.send(response);
                daemon.after_reply();
            }
            Some(Control::Fleet(change, reply)) => {
                let _ = reply.send(daemon.fleet_apply(*change));
            }
            None => {}
        }
        if let Some((n, every)) = watchdog {
            if last_ping.elapsed() >= every {
                notify(n.watchdog());
                last_ping = std::time::Instant::now();
            }
        }
    }
}

/// A notification that could not be sent is logged, not fatal: the service
/// manager's timeouts deal with a daemon it does not hear from.
fn notify(result: Result<(), crate::control::systemd::SystemdError>) {
    if let Err(e) = result {
        tracing::warn!("systemd notification: {e}");
    }
}

fn sandbox_count(daemon: &mut Daemon) -> usize {
    match daemon.handle(Request::SandboxList) {
        Response::Ok(list) => list.as_array().map_or(0, Vec::len),
        _ => 0,
    }
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

/// What the control thread is asked to do: a client's request, or a change
/// from the fleet's store.
enum Control {
    Client(Request, mpsc::Sender<Response>),
    Fleet(Box<crate::fleet::watch::FleetChange>, mpsc::Sender<Result<u64, crate::fleet::reconcile::Refusal>>),
}

/// The fleet watcher's way into the daemon: through the control thread,
/// like any request, so a fleet change and `sandbox create` never interleave.
struct DaemonSink(mpsc::Sender<Control>);

impl crate::fleet::watch::PolicySink for DaemonSink {
    fn apply(&mut self, change: crate::fleet::watch::FleetChange) -> Result<u64, crate::fleet::reconcile::Refusal> {
        let stopped = || crate::fleet::reconcile::Refusal { policy: None, reason: "the daemon's control thread stopped".into() };
        let (reply_tx, reply_rx) = mpsc::channel();
        self.0.send(Control::Fleet(Box::new(change), reply_tx)).map_err(|_| stopped())?;
        reply_rx.recv().unwrap_or_else(|_| Err(stopped()))
    }
}

/// The fleet watcher (sink not yet attached) starting from the daemon's
/// cached set, and the channel it tells its first read of the store on.
fn fleet_watcher(
    fleet: &crate::fleet::FleetConfig,
    daemon: &mut Daemon,
) -> Result<(crate::fleet::watch::PendingWatcher, mpsc::Receiver<()>), ServerError> {
    let settings = crate::fleet::watch::WatcherSettings {
        source: fleet.source().map_err(DaemonError::from)?,
        options: fleet.etcd.clone(),
        host: fleet.identity().map_err(DaemonError::from)?,
        light: false,
    };
    // Files (CA, keys, password) are read now: a typo fails the start.
    settings.options.connect_options(&settings.source).map_err(DaemonError::from)?;
    let (first_tx, first_rx) = mpsc::channel();
    let pending = crate::fleet::watch::PendingWatcher::new(settings, daemon.take_fleet_cache(), first_tx);
    daemon.set_fleet_status(pending.status());
    Ok((pending, first_rx))
}

/// Threads kept waiting in accept on the control socket, at least.
const MIN_IDLE_ACCEPTORS: usize = 2;
/// Past this many waiting, a thread that finished its client ends.
const MAX_IDLE_ACCEPTORS: usize = 4;

/// How many control-socket threads wait in accept (pure bookkeeping). A
/// thread serves the client it takes to the end, then accepts again: a
/// client after client costs no thread start or hand-off (a create's
/// reply came ~0.2 ms sooner than with a thread started per connection),
/// and a thread is started whenever the last waiting one takes a client,
/// so a slow or hung client never leaves the socket without an acceptor.
#[derive(Default)]
struct Acceptors {
    idle: std::sync::atomic::AtomicUsize,
}

impl Acceptors {
    /// A thread goes (back) to accept.
    fn waiting(&self) {
        self.idle.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// A thread took a client: true when no thread is left waiting and
    /// another must start.
    fn took_client(&self) -> bool {
        self.idle.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1
    }

    /// A thread finished its client: false when enough others wait and it
    /// should end.
    fn stays(&self) -> bool {
        self.idle.load(std::sync::atomic::Ordering::SeqCst) < MAX_IDLE_ACCEPTORS
    }
}

/// The control socket and what its threads need.
struct ClientThreads {
    listener: UnixListener,
    control: mpsc::Sender<Control>,
    config: Arc<DaemonConfig>,
    idle: Acceptors,
}

impl ClientThreads {
    fn start(this: &Arc<ClientThreads>) -> std::io::Result<()> {
        let this = this.clone();
        // Counted before it runs: a burst does not start a thread per client.
        this.idle.waiting();
        let started = std::thread::Builder::new().name("control-client".into()).spawn({
            let this = this.clone();
            move || this.accept_and_serve()
        });
        if started.is_err() {
            this.idle.took_client();
        }
        started.map(|_| ())
    }

    fn accept_and_serve(self: Arc<Self>) {
        let mut backoff = crate::util::conn_limit::AcceptBackoff::default();
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => {
                    backoff.succeeded();
                    stream
                }
                Err(e) => {
                    // Out of descriptors: wait for some to close rather
                    // than spin on accept.
                    std::thread::sleep(backoff.wait_after(&e, "control socket"));
                    continue;
                }
            };
            if self.idle.took_client() {
                if let Err(e) = ClientThreads::start(&self) {
                    tracing::warn!("control socket: no thread started for the next client ({e}); it waits for this one");
                }
            }
            serve_client(stream, self.control.clone(), &self.config);
            if !self.idle.stays() {
                return;
            }
            self.idle.waiting();
        }
    }
}

fn serve_client(stream: UnixStream, control: mpsc::Sender<Control>, config: &DaemonConfig) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        let response = match parse_request(&line) {
            Ok(Request::Inspect { follow }) => {
                // The flow stream is the data plane's: relayed until either
                // side goes away.
                match crate::control::dataplane::link::DataplaneLink::inspect(config, follow) {
                    Ok(plane) => relay(plane.into_reader().into_inner(), writer),
                    Err(e) => {
                        let response = Response::error(ErrorKind::Unavailable, format!("the flow stream is unavailable: {e}"));
                        let _ = writeln!(writer, "{}", serde_json::to_string(&response).expect("responses serialize"));
                    }
                }
                return;
            }
            Ok(request) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                if control.send(Control::Client(request, reply_tx)).is_err() {
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

/// Copies `from` to `to` until `from` ends or `to`'s reader hangs up
/// (watched while nothing comes, so a follower that left is noticed).
fn relay(mut from: UnixStream, mut to: UnixStream) {
    use std::io::Read;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: to.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 },
        ];
        // SAFETY: two pollfds we own, for descriptors open for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
        if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
        if fds[0].revents != 0 {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// One request line of the control socket, or the error response that
/// answers it. Pure, so the `api` fuzz target runs exactly this.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    serde_json::from_str::<Request>(line).map_err(|e| Response::error(ErrorKind::Invalid, format!("bad request: {e}")))
}

/// The `/metrics` registry, each component registering its own families:
/// the daemon's numbers and its data plane's, the datapath's pinned maps;
/// the data plane's own families (flows, proxies, DNS, audit) are fetched
/// from it at scrape time and appended.
fn register_metrics(config: &DaemonConfig, daemon: &Daemon, routes: &crate::sandbox::route::Routes) -> crate::observe::metrics::Metrics {
    let mut metrics = crate::observe::metrics::Metrics::default();
    daemon.metrics().register(metrics.registry());
    daemon.link().metrics.register(metrics.registry());
    match crate::datapath::PinnedStats::open(&config.bpf_dir) {
        Ok(maps) => metrics.registry().register_collector(Box::new(crate::observe::datapath_metrics::DatapathCollector::new(maps, routes.clone()))),
        Err(e) => tracing::error!("/metrics: the datapath's maps are unreadable; their families are left out: {e}"),
    }
    let link = daemon.link().clone();
    metrics.append_from(move || link.metrics_text());
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_starts_only_when_the_last_waiting_one_takes_a_client_and_extra_ones_end() {
        let a = Acceptors::default();
        for _ in 0..MIN_IDLE_ACCEPTORS {
            a.waiting();
        }
        // Clients one after another: the same threads, none started.
        for _ in 0..10 {
            assert!(!a.took_client(), "another still waits");
            assert!(a.stays());
            a.waiting();
        }
        // Clients at once: the last waiting thread to take one starts the next.
        assert!(!a.took_client());
        assert!(a.took_client(), "none left waiting");
        a.waiting(); // the thread it started
        assert!(a.took_client(), "and again while both are busy");
        // A burst over: threads past MAX_IDLE_ACCEPTORS waiting end.
        for _ in 0..MAX_IDLE_ACCEPTORS {
            a.waiting();
        }
        assert!(!a.stays(), "enough wait: this one ends");
    }
}
