//! The policy source's loop: read every policy under the prefix, then
//! watch it, handing each change (validated and merged by
//! [`FleetView`]) to a [`PolicySink`], and publish what the host enforces
//! under its status key on a lease.
//!
//! Revisions: the watch starts at the revision after the last one the host
//! has seen; after a disconnect it resumes from there (no change missed,
//! none replayed: events at or below that revision are skipped). Only when
//! the store has compacted that history away is the whole prefix read
//! again. Event responses advance the revision to their last event's
//! (a catching-up watcher gets history in several responses, each stamped
//! with the store's current revision, so the header would skip what has
//! not arrived yet); progress notifications advance it to their header's.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};

use crate::policy::store::PolicyEntry;

use super::cache::FleetCache;
use super::layout::HostIdentity;
use super::reconcile::{FleetView, Refusal};
use super::source::{EtcdOptions, EtcdSource};
use super::status::HostStatus;
use super::FleetError;

/// Where a host puts the fleet's policies in force.
pub trait PolicySink: Send {
    /// Puts `entries` (the fleet's effective policies for this host, all of
    /// them) in force, all or nothing; the generation now in force.
    fn apply(&mut self, entries: Vec<PolicyEntry>) -> Result<u64, Refusal>;
}

/// A watcher whose sink is attached later (the daemon's sink needs the
/// control thread, which needs the daemon, whose `status` shows the
/// watcher's status).
pub struct PendingWatcher {
    settings: WatcherSettings,
    cache: Option<FleetCache>,
    first_sync: std::sync::mpsc::Sender<()>,
    status: SharedStatus,
}

impl PendingWatcher {
    pub fn new(settings: WatcherSettings, cache: Option<FleetCache>, first_sync: std::sync::mpsc::Sender<()>) -> PendingWatcher {
        let status = Arc::new(Mutex::new(initial_status(&settings, cache.as_ref())));
        PendingWatcher { settings, cache, first_sync, status }
    }

    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    pub fn with_sink<S: PolicySink>(self, sink: S) -> Watcher<S> {
        let mut watcher = Watcher::new(self.settings, sink, self.cache, Some(self.first_sync));
        // The status the daemon already shows is the one the watcher updates.
        watcher.status = self.status;
        watcher
    }
}

fn initial_status(settings: &WatcherSettings, cache: Option<&FleetCache>) -> HostStatus {
    let revision = cache.map_or(0, |c| c.revision);
    HostStatus {
        host: settings.host.name.clone(),
        group: settings.host.group.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        from_cache: revision > 0,
        revision,
        applied_revision: revision,
        in_force: cache.map(|c| c.good.iter().map(|(k, s)| (k.clone(), s.mod_revision)).collect()).unwrap_or_default(),
        light: settings.light,
        ..Default::default()
    }
}

/// How a host watches.
#[derive(Clone, Debug)]
pub struct WatcherSettings {
    pub source: EtcdSource,
    pub options: EtcdOptions,
    pub host: HostIdentity,
    /// Where the last good set is kept (None: nowhere, light hosts).
    pub cache: Option<PathBuf>,
    /// The status key's lease, seconds.
    pub status_ttl: i64,
    pub light: bool,
}

/// A host's status as the watcher last published it (the daemon's
/// `status` shows it).
pub type SharedStatus = Arc<Mutex<HostStatus>>;

pub struct Watcher<S: PolicySink> {
    settings: WatcherSettings,
    view: FleetView,
    sink: S,
    status: SharedStatus,
    /// Everything up to this store revision has been seen.
    revision: i64,
    /// The next session reads the whole prefix (first start, compaction).
    resync: bool,
    /// Told once, after the first read of the store (or its failure).
    first_sync: Option<std::sync::mpsc::Sender<()>>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, FleetError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(FleetError::Timeout(what.to_string())),
    }
}

impl<S: PolicySink> Watcher<S> {
    /// A watcher starting from `cache` (the set the sink already enforces).
    pub fn new(settings: WatcherSettings, sink: S, cache: Option<FleetCache>, first_sync: Option<std::sync::mpsc::Sender<()>>) -> Watcher<S> {
        let status = initial_status(&settings, cache.as_ref());
        let (good, revision) = cache.map(|c| (c.good, c.revision)).unwrap_or_default();
        let view = FleetView::new(settings.source.layout.clone(), settings.host.clone(), good);
        Watcher { settings, view, sink, status: Arc::new(Mutex::new(status)), revision, resync: true, first_sync }
    }

    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// Runs forever: a session at a time, reconnecting with a backoff.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        // A store that stays away is logged when the failure changes and
        // at most every half minute, not at every retry.
        let mut last_logged: Option<(String, std::time::Instant)> = None;
        loop {
            let started = std::time::Instant::now();
            let result = self.session().await;
            {
                let mut status = self.status.lock().expect("status lock");
                status.connected = false;
                if let Err(e) = &result {
                    status.last_error = Some(e.to_string());
                }
            }
            if let Err(e) = result {
                let text = e.to_string();
                let quiet = last_logged.as_ref().is_some_and(|(t, at)| *t == text && at.elapsed() < Duration::from_secs(30));
                if !quiet {
                    tracing::warn!(source = %self.settings.source.url, "fleet: {text}; reconnecting (the policies in force stay)");
                    last_logged = Some((text, std::time::Instant::now()));
                }
            }
            self.tell_first_sync();
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn tell_first_sync(&mut self) {
        if let Some(tx) = self.first_sync.take() {
            let _ = tx.send(());
        }
    }

    async fn session(&mut self) -> Result<(), FleetError> {
        let mut client = self.settings.options.connect(&self.settings.source, Duration::from_secs(3)).await?;
        let layout = self.settings.source.layout.clone();
        if self.resync {
            let response = bounded("reading the policies", client.get(layout.policies(), Some(GetOptions::new().with_prefix()))).await?;
            let revision = response.header().map_or(0, |h| h.revision());
            let mut keys = Vec::new();
            for kv in response.kvs() {
                let (Ok(key), Ok(text)) = (kv.key_str(), kv.value_str()) else {
                    tracing::warn!("fleet: a key under {} is not UTF-8: ignored", layout.policies());
                    continue;
                };
                keys.push((key.to_string(), super::reconcile::Stored { text: text.to_string(), mod_revision: kv.mod_revision() }));
            }
            self.view.reset(keys);
            self.revision = revision;
            self.resync = false;
            self.update();
            tracing::info!(revision, "fleet: policies read from the store");
        }
        let lease = bounded("granting the status lease", client.lease_grant(self.settings.status_ttl, None)).await?.id();
        let (mut keeper, mut keep_alive) = bounded("keeping the status lease", client.lease_keep_alive(lease)).await?;
        {
            let mut status = self.status.lock().expect("status lock");
            status.connected = true;
            status.from_cache = false;
            status.last_error = None;
        }
        self.publish(&mut client, lease).await?;
        self.tell_first_sync();
        let options = WatchOptions::new().with_prefix().with_start_revision(self.revision + 1).with_progress_notify();
        let mut stream = bounded("starting the watch", client.watch(layout.policies(), Some(options))).await?;
        let mut renew = tokio::time::interval(Duration::from_secs((self.settings.status_ttl / 3).max(1) as u64));
        loop {
            tokio::select! {
                message = stream.message() => {
                    let Some(response) = message? else { return Err(FleetError::Closed("the watch".into())) };
                    if response.canceled() || response.compact_revision() > 0 {
                        // History we need is gone: read everything again.
                        self.resync = true;
                        return Err(FleetError::Closed(format!("the watch (compacted at {}: {})", response.compact_revision(), response.cancel_reason())));
                    }
                    if response.created() && response.header().is_some_and(|h| h.revision() < self.revision) {
                        // A store whose history is behind ours (restored
                        // from an old backup, or a new cluster at the same
                        // address): what we saw is not its past. Read it.
                        self.resync = true;
                        return Err(FleetError::Closed(format!("the watch: the store is at revision {} but this host saw {}", response.header().map_or(0, |h| h.revision()), self.revision)));
                    }
                    let mut touched = false;
                    let mut last = None;
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        if kv.mod_revision() <= self.revision {
                            continue;
                        }
                        last = Some(kv.mod_revision());
                        let Ok(key) = kv.key_str() else { continue };
                        touched |= match event.event_type() {
                            EventType::Put => match kv.value_str() {
                                Ok(text) => self.view.put(key, text.to_string(), kv.mod_revision()),
                                Err(_) => self.view.put(key, String::from("\u{fffd} (not UTF-8)"), kv.mod_revision()),
                            },
                            EventType::Delete => self.view.delete(key),
                        };
                    }
                    match last {
                        Some(revision) => self.revision = revision,
                        None if !response.created() => {
                            if let Some(h) = response.header() {
                                self.revision = self.revision.max(h.revision());
                            }
                        }
                        None => {}
                    }
                    if touched {
                        self.update();
                    }
                    self.status.lock().expect("status lock").revision = self.revision;
                    // Every host acknowledges every revision: the fleet's
                    // view shows who is behind.
                    self.publish(&mut client, lease).await?;
                }
                answer = keep_alive.message() => {
                    match answer? {
                        Some(a) if a.ttl() > 0 => {}
                        _ => return Err(FleetError::Closed("the status lease expired".into())),
                    }
                }
                _ = renew.tick() => {
                    keeper.keep_alive().await?;
                }
            }
        }
    }

    /// Plans, hands the plan to the sink (leaving out what it refuses, a
    /// policy at a time), keeps what was accepted.
    fn update(&mut self) {
        // Each refusal blames at least one more key, so this ends; the
        // bound is a guard against a sink that refuses without reason.
        for _ in 0..64 {
            let plan = self.view.plan();
            if plan.changed.is_empty() {
                self.view.accept(plan);
                break;
            }
            match self.sink.apply(plan.entries.clone()) {
                Ok(generation) => {
                    tracing::info!(revision = self.revision, generation, changed = ?plan.changed, "fleet: policies in force");
                    self.view.accept(plan);
                    let mut status = self.status.lock().expect("status lock");
                    status.policy_generation = generation;
                    status.applied_revision = self.revision;
                    drop(status);
                    self.save_cache();
                    break;
                }
                Err(refusal) => {
                    tracing::error!(policy = ?refusal.policy, "fleet: change refused, the policies in force stay: {}", refusal.reason);
                    if !self.view.refuse(&plan, &refusal) && !self.view.refuse(&plan, &Refusal { policy: None, reason: refusal.reason.clone() }) {
                        break;
                    }
                }
            }
        }
        let before = self.status.lock().expect("status lock").rejected.clone();
        for r in self.view.rejected.values().filter(|r| !before.contains(r)) {
            tracing::warn!(key = %r.key, mod_revision = r.mod_revision, "fleet: rejected: {}", r.reason);
        }
        self.refresh_status();
    }

    /// The status's view of what is in force and rejected.
    fn refresh_status(&self) {
        let mut status = self.status.lock().expect("status lock");
        status.revision = self.revision;
        status.in_force = self.view.good.iter().map(|(k, s)| (k.clone(), s.mod_revision)).collect();
        status.rejected = self.view.rejected.values().cloned().collect();
    }

    fn save_cache(&self) {
        let Some(path) = &self.settings.cache else { return };
        let cache = FleetCache {
            prefix: self.settings.source.layout.prefix.clone(),
            host: self.settings.host.name.clone(),
            group: self.settings.host.group.clone(),
            revision: self.revision,
            good: self.view.good.clone(),
        };
        if let Err(e) = cache.save(path) {
            tracing::error!("fleet: the last good set was not cached (a restart without the store would use an older one): {e}");
        }
    }

    async fn publish(&self, client: &mut etcd_client::Client, lease: i64) -> Result<(), FleetError> {
        let json = {
            let mut status = self.status.lock().expect("status lock");
            status.updated_unix_ms = crate::util::clock::unix_now_ns() / 1_000_000;
            serde_json::to_string(&*status).expect("status serializes")
        };
        let key = self.settings.source.layout.status_key(&self.settings.host.name);
        bounded("publishing the status", client.put(key, json, Some(PutOptions::new().with_lease(lease)))).await?;
        Ok(())
    }
}
