//! The daemon's side of the data plane: finds the running one (or starts
//! one), keeps copies of the listening sockets, pushes the routing state,
//! restarts a data plane that dies, and hands the listeners to a new build
//! at an upgrade while the old one drains.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;

use super::{build_id, config_hash, Listeners, PlaneConnection, PlaneError, PlaneRequest, PolicyValueForm, SandboxEntry, SwitchRequest, INHERITED_FDS_ENV};
use crate::util::pidfd::Pidfd;
use crate::control::config::DaemonConfig;
use crate::dns::decide::LearnedAddr;

/// How long a starting data plane may take to answer.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one request may take (a switch writes map entries).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon's numbers about its data plane (`/metrics`).
#[derive(Clone, Debug, Default)]
pub struct PlaneMetrics {
    /// Data planes started again after one died.
    pub restarts: Counter,
    /// Upgrades (listeners handed to a data plane of another build).
    pub upgrades: Counter,
    /// Connections a draining data plane still had at its drain deadline.
    pub drain_closed: Counter,
    /// 1 while a data plane serves with the daemon's build.
    pub current: Gauge,
    /// 1 while a started data plane serves, 0 while none does (it died and
    /// its restart is under way or keeps failing, or mid-upgrade): the
    /// data plane's own families are missing from `/metrics` then, and
    /// `restarts` counts only restarts that worked.
    pub up: Gauge,
}

impl PlaneMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("dataplane_restarts", "Data planes the daemon started again after one died", self.restarts.clone());
        registry.register("dataplane_upgrades", "Listening sockets handed to a data plane of another build", self.upgrades.clone());
        registry.register("dataplane_drain_closed", "Connections a draining data plane still held at its drain deadline (closed)", self.drain_closed.clone());
        registry.register("dataplane_build_current", "1 while the data plane serving runs the daemon's build", self.current.clone());
        registry.register("dataplane_up", "1 while a data plane (DNS and connection proxies) serves, 0 while it is down or being restarted", self.up.clone());
    }
}

/// The data plane serving now.
struct Current {
    conn: PlaneConnection,
    /// Its process: signalled and waited on by this handle only.
    process: Pidfd,
    build: String,
    /// The hash of the configuration it was started with.
    config: String,
    /// Whether it mints leaves for a CA named by its key (older builds
    /// make the issuer from the sandbox's name).
    key_named_cas: bool,
}

impl Current {
    /// A data plane, as its `hello` describes it.
    fn said(conn: PlaneConnection, process: Pidfd, hello: &serde_json::Value) -> Current {
        let text = |key: &str| hello[key].as_str().unwrap_or("unknown").to_string();
        Current { conn, process, build: text("build"), config: text("config"), key_named_cas: hello["key_named_cas"] == true }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }
}

struct LinkState {
    /// Copies of the listening sockets (kept while data planes come and go).
    listeners: Listeners,
    current: Option<Current>,
    /// Old data planes finishing their connections: they get the route
    /// changes too (never a switch: the serving one writes the maps).
    draining: Vec<PlaneConnection>,
    /// What the data plane must know: pushed again to a new one.
    entries: BTreeMap<String, SandboxEntry>,
    /// Every sandbox the daemon has (the data plane forgets the rest).
    recorded: Option<Vec<String>>,
    version: u64,
    last_error: Option<String>,
    /// Written to whenever `current` is replaced, so the supervisor stops
    /// waiting on the old process.
    wake: UnixStream,
}

#[derive(Clone)]
pub struct DataplaneLink {
    config: Arc<DaemonConfig>,
    exe: Arc<PathBuf>,
    state: Arc<Mutex<LinkState>>,
    pub metrics: PlaneMetrics,
}

impl DataplaneLink {
    /// Adopts the data plane serving for this state dir (any build: an
    /// upgrade to ours is [`DataplaneLink::upgrade_if_other_build`]), or binds the
    /// listeners and starts one. Either way a data plane serves on return.
    pub fn open(config: &DaemonConfig, exe: PathBuf) -> Result<DataplaneLink, PlaneError> {
        let (wake, woken) = UnixStream::pair()?;
        let link_of = |listeners, current| DataplaneLink {
            config: Arc::new(config.clone()),
            exe: Arc::new(exe.clone()),
            state: Arc::new(Mutex::new(LinkState {
                listeners,
                current,
                draining: Vec::new(),
                entries: BTreeMap::new(),
                recorded: None,
                version: 0,
                last_error: None,
                wake,
            })),
            metrics: PlaneMetrics::default(),
        };
        let link = match adopt(config) {
            Ok((current, listeners)) => {
                tracing::info!(pid = current.pid(), build = %current.build, "adopted the running data plane (its listeners stay open throughout)");
                link_of(listeners, Some(current))
            }
            Err(why) => {
                tracing::info!("starting a data plane ({why})");
                let listeners = Listeners::bind(config)?;
                let link = link_of(listeners, None);
                {
                    let mut state = link.lock();
                    let current = link.spawn_started(&state)?;
                    state.current = Some(current);
                }
                link
            }
        };
        link.publish_build();
        link.supervise(woken);
        Ok(link)
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_build(&self) {
        let state = self.lock();
        let current = state.current.as_ref().is_some_and(|c| c.build == build_id());
        self.metrics.current.set(i64::from(current));
        self.metrics.up.set(i64::from(state.current.is_some()));
    }

    /// Starts a data plane of our executable on our listeners and gives it
    /// the state (it does not serve until told to start). A data plane that
    /// does not come up is killed, never left holding the listeners.
    fn spawn(&self, state: &LinkState) -> Result<Current, PlaneError> {
        let (kinds, fds) = state.listeners.described();
        let mut command = Command::new(self.exe.as_path());
        command
            .arg("dataplane")
            .arg("--state-dir")
            .arg(&self.config.state_dir)
            .env(INHERITED_FDS_ENV, kinds.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let _kept_until_spawned = crate::util::fd_pass::pass_to_child(&mut command, &fds)?;
        // SAFETY: setsid is async-signal-safe; a session of its own keeps the
        // data plane out of the daemon's process group (and its signals).
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        // A failed exec is an error, not a panic, so the supervisor thread
        // lives on to retry rather than leave no data plane for good.
        let spawned = crate::util::detached::spawn_even_unwaited(&mut command);
        let mut child = spawned.map_err(|e| PlaneError::Spawn(format!("{}: {e}", self.exe.display())))?;
        let process = match Pidfd::open(child.id()) {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                return Err(PlaneError::Spawn(format!("pidfd of {}: {e}", child.id())));
            }
        };
        let result = (|| {
            let config = serde_json::to_vec(self.config.as_ref()).map_err(|e| PlaneError::Spawn(e.to_string()))?;
            let mut stdin = child.stdin.take().expect("piped");
            stdin.write_all(&config)?;
            drop(stdin);
            let stdout = child.stdout.take().expect("piped");
            let pid = child.id();
            // The first line says where it listens; nothing else comes on stdout.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx.recv_timeout(SPAWN_TIMEOUT).map_err(|_| PlaneError::Spawn(format!("data plane {pid} did not come up within {SPAWN_TIMEOUT:?}")))?;
            let path = line.trim().strip_prefix("ready ").ok_or_else(|| PlaneError::Spawn(format!("data plane {pid} exited before it was ready (see its log above)")))?;
            let mut conn = PlaneConnection::connect(Path::new(path), CALL_TIMEOUT)?;
            // What it is, from itself: the executable may have been
            // replaced (by a package of another build) since we started.
            let hello = conn.call(&PlaneRequest::Hello)?;
            conn.set_form(PolicyValueForm::from_hello(&hello));
            conn.call(&PlaneRequest::Apply { version: state.version, sandboxes: state.entries.values().cloned().collect(), recorded: state.recorded.clone() })?;
            tracing::info!(pid, "data plane started");
            Ok((conn, hello))
        })();
        match result {
            Ok((conn, hello)) => Ok(Current::said(conn, process, &hello)),
            Err(e) => {
                process.kill_and_wait(Duration::from_secs(5));
                Err(e)
            }
        }
    }

    /// [`DataplaneLink::spawn`], then serving.
    fn spawn_started(&self, state: &LinkState) -> Result<Current, PlaneError> {
        let mut current = self.spawn(state)?;
        if let Err(e) = current.conn.call(&PlaneRequest::Start) {
            current.process.kill_and_wait(Duration::from_secs(5));
            return Err(e);
        }
        Ok(current)
    }

    /// Replaces the current data plane (the supervisor then waits on the
    /// new one).
    fn replace(&self, state: &mut LinkState, current: Option<Current>) -> Option<Current> {
        let old = std::mem::replace(&mut state.current, current);
        // Set here, before a restart's spawn (seconds), not after it.
        self.metrics.up.set(i64::from(state.current.is_some()));
        let _ = (&state.wake).write_all(&[1]);
        old
    }

    /// Restarts the data plane whenever its process exits unplanned, on
    /// the same listeners and with the same state (so new connections and
    /// queries, held in the kernel meanwhile, are served by the new one).
    fn supervise(&self, woken: UnixStream) {
        let link = self.clone();
        let _ = std::thread::Builder::new().name("plane-watch".into()).spawn(move || loop {
            let watched = {
                let state = link.lock();
                state.current.as_ref().and_then(|c| c.process.try_clone().ok())
            };
            let Some(process) = watched else {
                // None serves (a restart failed): try again shortly.
                std::thread::sleep(Duration::from_millis(200));
                link.restart(None);
                continue;
            };
            let mut fds = [
                libc::pollfd { fd: process.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: woken.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two pollfds for descriptors we hold open across the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n <= 0 {
                continue;
            }
            if fds[1].revents != 0 {
                let mut buf = [0u8; 64];
                let _ = (&woken).read(&mut buf);
            }
            if fds[0].revents != 0 {
                link.restart(Some(process.pid()));
            }
        });
    }

    /// Starts a new data plane if `died` is still the current one.
    fn restart(&self, died: Option<u32>) {
        let mut state = self.lock();
        match (died, state.current.as_ref().map(Current::pid)) {
            (Some(pid), Some(current)) if pid != current => return, // replaced on purpose
            (None, Some(_)) => return,
            _ => {}
        }
        let started = Instant::now();
        if let Some(pid) = died {
            tracing::error!(pid, "the data plane died; starting another on the same listeners");
        }
        self.replace(&mut state, None);
        match self.spawn_started(&state) {
            Ok(current) => {
                tracing::info!(pid = current.pid(), elapsed_ms = started.elapsed().as_millis() as u64, "data plane restarted");
                self.replace(&mut state, Some(current));
                state.last_error = None;
                self.metrics.restarts.inc();
            }
            Err(e) => {
                tracing::error!("restarting the data plane failed: {e}; retrying");
                state.last_error = Some(e.to_string());
            }
        }
        drop(state);
        self.publish_build();
    }

    /// Hands the listeners to a new data plane of our build while the old
    /// one drains (see [`DataplaneLink::upgrade`]) when the one serving is
    /// of another build or was started with another configuration.
    pub fn upgrade_if_other_build(&self) -> Result<Option<serde_json::Value>, PlaneError> {
        let stale = self.lock().current.as_ref().map(|c| (c.build != build_id(), c.config != config_hash(&self.config)));
        match stale {
            Some((true, _)) => self.upgrade().map(Some),
            Some((false, true)) => {
                tracing::info!("the data plane runs with another configuration; handing over to one with ours");
                self.upgrade().map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The switch: a new data plane gets the listeners and the state; the
    /// old one stops reading the listeners, answers the DNS queries it took
    /// and saves the learned addresses; then the new one restores them and
    /// serves. Nothing queued on a listener is lost (the sockets stay open
    /// throughout); the old one finishes its connections in the background,
    /// getting route changes meanwhile. An old one that cannot drain is
    /// killed: two never read the listeners at once.
    pub fn upgrade(&self) -> Result<serde_json::Value, PlaneError> {
        let mut state = self.lock();
        let started = Instant::now();
        let mut new = self.spawn(&state)?;
        let Some(mut old) = self.replace(&mut state, None) else {
            if let Err(e) = new.conn.call(&PlaneRequest::Start) {
                new.process.kill_and_wait(Duration::from_secs(5));
                return Err(e);
            }
            self.replace(&mut state, Some(new));
            return Ok(json!({ "upgraded": false, "started": true }));
        };
        let (old_pid, old_build) = (old.pid(), old.build.clone());
        // A second connection, for the route changes while it drains.
        let updates = old.conn.another(&self.config.dataplane_socket(), CALL_TIMEOUT).ok();
        let drained = old.conn.call(&PlaneRequest::Drain { seconds: self.config.dataplane_drain_seconds });
        if let Err(e) = &drained {
            tracing::error!(pid = old_pid, "the old data plane did not drain ({e}); killing it so that only the new one reads the listeners");
            old.process.kill_and_wait(Duration::from_secs(5));
        }
        let gap = started.elapsed();
        if let Err(e) = new.conn.call(&PlaneRequest::Start) {
            // The supervisor starts another on the same listeners.
            new.process.kill_and_wait(Duration::from_secs(5));
            if drained.is_ok() {
                old.process.kill_and_wait(Duration::from_secs(5));
            }
            return Err(e);
        }
        let switched_ms = started.elapsed().as_millis() as u64;
        let new_pid = new.pid();
        self.replace(&mut state, Some(new));
        if drained.is_ok() {
            state.draining.extend(updates);
        }
        drop(state);
        self.metrics.upgrades.inc();
        self.publish_build();
        // The old one's last line: how many connections its drain cut.
        if drained.is_ok() {
            let metrics = self.metrics.clone();
            let wait = Duration::from_secs(self.config.dataplane_drain_seconds + 30);
            std::thread::spawn(move || {
                let _ = old.conn.set_timeout(Some(wait));
                match old.conn.receive() {
                    Ok(v) => {
                        let closed = v["exited"]["closed"].as_u64().unwrap_or(0);
                        metrics.drain_closed.inc_by(closed);
                        tracing::info!(pid = old_pid, closed, "the old data plane drained and exited");
                    }
                    Err(e) => tracing::warn!(pid = old_pid, "the old data plane ended without its drain report: {e}"),
                }
                // Whatever happened, it is gone after its drain time.
                if !old.process.exited_within(Duration::from_secs(5)) {
                    old.process.kill_and_wait(Duration::from_secs(5));
                }
            });
        }
        tracing::info!(old_pid, %old_build, new_pid, listeners_unread_ms = gap.as_millis() as u64, switched_ms, "data plane upgraded");
        Ok(json!({
            "old": { "pid": old_pid, "build": old_build, "drain": drained.unwrap_or_else(|e| json!({ "error": e.to_string() })) },
            "new": { "pid": new_pid, "build": build_id() },
            "switched_ms": switched_ms,
        }))
    }

    /// Calls the current data plane; a failure is remembered for `status`.
    fn call(&self, state: &mut LinkState, request: &PlaneRequest) -> Result<serde_json::Value, PlaneError> {
        let Some(current) = state.current.as_mut() else { return Err(no_plane(state)) };
        let sent = current.conn.send(request);
        self.answer(state, sent)
    }

    /// The current data plane's answer to a request `sent` to it; a failure
    /// is remembered for `status`. A reply that never came (or came
    /// garbled) leaves the connection out of step, so it is replaced by a
    /// fresh one.
    fn answer(&self, state: &mut LinkState, sent: Result<(), PlaneError>) -> Result<serde_json::Value, PlaneError> {
        let Some(current) = state.current.as_mut() else { return Err(no_plane(state)) };
        let result = sent.and_then(|()| current.conn.receive());
        if let Err(e) = &result {
            if matches!(e, PlaneError::Io(_) | PlaneError::BadReply(_)) {
                tracing::warn!(pid = current.pid(), "the data plane's answer went wrong ({e}); reconnecting");
                if let Ok(fresh) = current.conn.another(&self.config.dataplane_socket(), CALL_TIMEOUT) {
                    current.conn = fresh;
                }
            }
            state.last_error = Some(e.to_string());
        }
        result
    }

    /// Route changes to the data planes still draining (best effort: one
    /// that has gone is dropped).
    fn tell_draining(state: &mut LinkState, request: &PlaneRequest) {
        state.draining.retain_mut(|conn| conn.call(request).is_ok());
    }

    /// The whole state (after re-adopting sandboxes at start).
    /// `recorded`: every sandbox the daemon has, including any whose entry
    /// could not be made (the data plane forgets only the others).
    pub fn apply(&self, entries: Vec<SandboxEntry>, recorded: Vec<String>) {
        let mut state = self.lock();
        state.entries = entries.into_iter().map(|e| (e.name.clone(), e)).collect();
        state.recorded = Some(recorded);
        state.version += 1;
        let request = PlaneRequest::Apply { version: state.version, sandboxes: state.entries.values().cloned().collect(), recorded: state.recorded.clone() };
        Self::tell_draining(&mut state, &request);
        if let Err(e) = self.call(&mut state, &request) {
            tracing::error!("pushing the state to the data plane: {e} (pushed again when it restarts)");
        }
    }

    /// One sandbox added or changed. A data plane that is down gets it
    /// when it restarts; until then the sandbox's DNS and proxied
    /// connections are refused (no route), never let through.
    pub fn upsert(&self, entry: SandboxEntry) {
        self.upsert_begin(entry).finish();
    }

    /// [`DataplaneLink::upsert`] in two halves: the request is written to
    /// the data plane here, and its answer read by
    /// [`PendingUpsert::finish`] (or when the pending upsert is dropped),
    /// so the caller's own work runs while the data plane reads the entry
    /// (~0.15 ms: an 8 KB line). The link stays locked until then: the
    /// same thread calling the link again before finishing would wait on
    /// itself.
    pub fn upsert_begin(&self, entry: SandboxEntry) -> PendingUpsert<'_> {
        let mut state = self.lock();
        state.version += 1;
        state.entries.insert(entry.name.clone(), entry.clone());
        if let Some(recorded) = state.recorded.as_mut().filter(|r| !r.contains(&entry.name)) {
            recorded.push(entry.name.clone());
        }
        let request = PlaneRequest::Upsert { version: state.version, sandbox: Box::new(entry) };
        let started = Instant::now();
        let sent = match state.current.as_mut() {
            Some(current) => current.conn.send(&request),
            None => Err(no_plane(&state)),
        };
        PendingUpsert { link: self, state, request, sent: Some(sent), started }
    }

    pub fn remove(&self, sandbox: &str) {
        let mut state = self.lock();
        state.version += 1;
        state.entries.remove(sandbox);
        if let Some(recorded) = state.recorded.as_mut() {
            recorded.retain(|r| r != sandbox);
        }
        let request = PlaneRequest::Remove { version: state.version, sandbox: sandbox.to_string() };
        Self::tell_draining(&mut state, &request);
        if let Err(e) = self.call(&mut state, &request) {
            tracing::error!("removing a sandbox from the data plane: {e}");
        }
    }

    /// A generation switch, done by the data plane under its learned-store
    /// lock; an error leaves the tap on its old generation.
    pub fn switch(&self, switch: SwitchRequest) -> Result<(), PlaneError> {
        let mut state = self.lock();
        let version = state.version + 1;
        let entry = switch.sandbox.clone();
        self.call(&mut state, &PlaneRequest::Switch { version, switch: Box::new(switch) })?;
        state.version = version;
        state.entries.insert(entry.name.clone(), entry.clone());
        // A draining one only needs the route (the maps are switched).
        Self::tell_draining(&mut state, &PlaneRequest::Upsert { version, sandbox: Box::new(entry) });
        Ok(())
    }

    /// Whether the data plane serving mints leaves for a CA named by its
    /// key (this build's; with none serving, the next one started is).
    pub fn serves_key_named_cas(&self) -> bool {
        self.lock().current.as_ref().is_none_or(|c| c.key_named_cas)
    }

    /// A sandbox's learned addresses (empty when the data plane is down).
    pub fn learned_table(&self, sandbox: &str) -> Vec<(std::net::IpAddr, LearnedAddr)> {
        let mut state = self.lock();
        self.call(&mut state, &PlaneRequest::LearnedTable { sandbox: sandbox.to_string() })
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }

    /// What `status` shows of the data plane.
    pub fn status(&self) -> serde_json::Value {
        let mut state = self.lock();
        let (pid, build) = state.current.as_ref().map(|c| (Some(c.pid()), Some(c.build.clone()))).unwrap_or_default();
        let stats = self.call(&mut state, &PlaneRequest::Stats);
        let matches = build.as_deref() == Some(build_id());
        json!({
            "pid": pid,
            "build": build,
            "daemon_build": build_id(),
            "build_matches_daemon": matches,
            "running": stats.is_ok(),
            "stats": stats.as_ref().ok(),
            "error": stats.as_ref().err().map(|e| e.to_string()).or(state.last_error.clone()),
            "snapshot_version": state.version,
            "restarts": self.metrics.restarts.get(),
            "upgrades": self.metrics.upgrades.get(),
            "draining": state.draining.len(),
        })
    }

    /// The data plane's `/metrics` families (empty when it is down).
    pub fn metrics_text(&self) -> String {
        let mut state = self.lock();
        self.call(&mut state, &PlaneRequest::Metrics).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }

    /// A connection for an `inspect` stream.
    pub fn inspect(config: &DaemonConfig, follow: bool) -> Result<PlaneConnection, PlaneError> {
        let mut conn = PlaneConnection::connect(&config.dataplane_socket(), CALL_TIMEOUT)?;
        conn.set_timeout(None)?;
        conn.send(&PlaneRequest::Inspect { follow })?;
        Ok(conn)
    }
}

/// What a call gets when no data plane runs: the last error, if any.
fn no_plane(state: &LinkState) -> PlaneError {
    PlaneError::Refused(state.last_error.clone().unwrap_or_else(|| "no data plane is running".into()))
}

/// An upsert written to the data plane whose answer is still to be read
/// (see [`DataplaneLink::upsert_begin`]); holds the link locked.
pub struct PendingUpsert<'a> {
    link: &'a DataplaneLink,
    state: MutexGuard<'a, LinkState>,
    request: PlaneRequest,
    /// Taken when the answer is read.
    sent: Option<Result<(), PlaneError>>,
    started: Instant,
}

impl PendingUpsert<'_> {
    /// Reads the data plane's answer, then tells the draining ones.
    pub fn finish(mut self) {
        self.read_answer();
    }

    fn read_answer(&mut self) {
        let Some(sent) = self.sent.take() else { return };
        if let Err(e) = self.link.answer(&mut self.state, sent) {
            tracing::error!("pushing a sandbox to the data plane: {e} (pushed again when it restarts)");
        }
        DataplaneLink::tell_draining(&mut self.state, &self.request);
        tracing::debug!(call_us = self.started.elapsed().as_micros() as u64, "data plane: sandbox pushed");
    }
}

impl Drop for PendingUpsert<'_> {
    fn drop(&mut self) {
        // Every way out reads the answer: the link's next request must
        // not meet this one's reply.
        self.read_answer();
    }
}

/// The running data plane of this state dir and copies of its listeners.
/// One that answers but whose listeners are not ours (other ports) is
/// stopped: a new one takes its place.
fn adopt(config: &DaemonConfig) -> Result<(Current, Listeners), String> {
    let path = config.dataplane_socket();
    let mut conn = PlaneConnection::connect(&path, CALL_TIMEOUT).map_err(|e| format!("none answers: {e}"))?;
    let hello = conn.call(&PlaneRequest::Hello).map_err(|e| format!("{}: {e}", path.display()))?;
    conn.set_form(PolicyValueForm::from_hello(&hello));
    let pid = hello["pid"].as_u64().unwrap_or(0) as u32;
    let process = Pidfd::open(pid).map_err(|e| format!("data plane {pid}: {e}"))?;
    let listeners = match PlaneConnection::listeners(&path, config, CALL_TIMEOUT) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(pid, "the running data plane's listeners are not this configuration's ({e}); stopping it");
            process.kill_and_wait(Duration::from_secs(5));
            let _ = std::fs::remove_file(&path);
            return Err(format!("its listeners: {e}"));
        }
    };
    Ok((Current::said(conn, process, &hello), listeners))
}

/// Stops the data planes of this state dir (`daemon --cleanup`): each one
/// answering on a socket there is told to stop, and any other still running
/// for it (one draining after an upgrade has given up its socket name) is
/// killed; each is waited for.
pub fn stop_all(config: &DaemonConfig) -> Vec<String> {
    let mut stopped = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&config.state_dir) {
        for entry in dir.flatten() {
            let path = entry.path();
            if !super::process::is_plane_socket(&path) {
                continue;
            }
            if let Ok(mut conn) = PlaneConnection::connect(&path, Duration::from_secs(5)) {
                if let Ok(v) = conn.call(&PlaneRequest::Stop) {
                    let pid = v["stopping"].as_u64().unwrap_or(0) as u32;
                    if let Ok(process) = Pidfd::open(pid) {
                        process.exited_within(Duration::from_secs(5));
                    }
                    stopped.push(format!("data plane {pid}"));
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    for pid in planes_of(&config.state_dir) {
        if let Ok(process) = Pidfd::open(pid) {
            process.kill_and_wait(Duration::from_secs(5));
            stopped.push(format!("data plane {pid} (killed)"));
        }
    }
    stopped
}

/// The processes running `sbx-net dataplane --state-dir STATE_DIR`.
fn planes_of(state_dir: &Path) -> Vec<u32> {
    let Ok(proc) = std::fs::read_dir("/proc") else { return Vec::new() };
    let wanted: Vec<u8> = [b"dataplane\0--state-dir\0".as_slice(), state_dir.as_os_str().as_encoded_bytes(), b"\0"].concat();
    proc.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(wanted.len()).any(|w| w == wanted.as_slice())))
        .collect()
}
