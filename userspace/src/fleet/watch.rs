//! The policy source's loop: read every policy under the prefix, then
//! watch it, handing each change (validated and merged by [`FleetView`])
//! to a [`PolicySink`], and publish what the host enforces under its status
//! key on a lease.
//!
//! Revisions ([`on_watch_response`], pure): the watch starts at the revision
//! after the last one the host has seen; after a disconnect it resumes from
//! there (no change missed, none replayed: events at or below that revision
//! are skipped). The whole prefix is read again only when the store cannot
//! give that history: it was compacted away, the store is behind the host
//! (restored from an old backup) or is another cluster (its id changed).
//! Event responses advance the revision to their last event's (a catching-up
//! watcher gets history in several responses, each stamped with the store's
//! current revision, so the header would skip what has not arrived yet);
//! progress notifications advance it to their header's.
//!
//! The status is published by a task of its own, best effort: a host that
//! may not write its status (a role without it, etcd's space alarm) still
//! watches and enforces.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};

use crate::policy::store::PolicyEntry;

use super::cache::FleetCache;
use super::layout::HostIdentity;
use super::reconcile::{FleetView, Refusal, Stored};
use super::source::{EtcdOptions, EtcdSource};
use super::status::HostStatus;
use super::FleetError;

/// The status key's lease: a host gone for this long drops out of `fleet
/// status`.
pub const STATUS_TTL_SECONDS: i64 = 10;
/// How often changes the sink refused are offered again (their cause may
/// have gone: a sandbox deleted, a local policy fixed).
const RETRY_REFUSED: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A change for the sink: the fleet's effective policies for this host (all
/// of them) and the set of keys they come from, to persist with them.
#[derive(Clone, Debug)]
pub struct FleetChange {
    pub entries: Vec<PolicyEntry>,
    pub cache: FleetCache,
}

/// Where a host puts the fleet's policies in force.
pub trait PolicySink: Send {
    /// Puts the change in force, all or nothing; the generation now in
    /// force, or why not (naming the policy concerned when it can).
    fn apply(&mut self, change: FleetChange) -> Result<u64, Refusal>;
}

/// How a host watches.
#[derive(Clone, Debug)]
pub struct WatcherSettings {
    pub source: EtcdSource,
    pub options: EtcdOptions,
    pub host: HostIdentity,
    pub light: bool,
}

/// A host's status as the watcher last published it (the daemon's
/// `status` and `/metrics` show it).
pub type SharedStatus = Arc<Mutex<HostStatus>>;

/// What a watch response asks of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchStep {
    /// Read the whole prefix again (why).
    Resync(String),
    /// Apply the events at these indexes (the rest were seen already), then
    /// the host has seen everything up to `revision`.
    Apply { events: Vec<usize>, revision: i64 },
}

/// What the host needs of a watch response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseFacts {
    pub created: bool,
    pub canceled: bool,
    pub cancel_reason: String,
    pub compact_revision: i64,
    pub header_revision: Option<i64>,
    pub cluster_id: Option<u64>,
    /// Each event's modification revision, in order.
    pub event_revisions: Vec<i64>,
}

/// Pure: what to do with a watch response, given the revision seen so far
/// and the store's cluster id when the host last read it.
pub fn on_watch_response(seen: i64, known_cluster: Option<u64>, r: &ResponseFacts) -> WatchStep {
    if r.compact_revision > 0 {
        return WatchStep::Resync(format!("the store compacted its history past revision {} (this host had seen {seen})", r.compact_revision));
    }
    if r.canceled {
        return WatchStep::Resync(format!("the store cancelled the watch: {}", r.cancel_reason));
    }
    if let (Some(known), Some(now)) = (known_cluster, r.cluster_id) {
        if known != now {
            return WatchStep::Resync(format!("the store is another cluster (id {now:x}, was {known:x})"));
        }
    }
    if let Some(h) = r.header_revision.filter(|h| r.created && *h < seen) {
        return WatchStep::Resync(format!("the store is at revision {h}, behind the {seen} this host saw (restored from a backup?)"));
    }
    let events: Vec<usize> = r.event_revisions.iter().enumerate().filter(|(_, rev)| **rev > seen).map(|(i, _)| i).collect();
    let revision = match events.last() {
        Some(i) => r.event_revisions[*i],
        // A progress notification: everything up to its header was sent.
        None if !r.created && r.event_revisions.is_empty() => r.header_revision.unwrap_or(seen).max(seen),
        None => seen,
    };
    WatchStep::Apply { events, revision }
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

pub struct Watcher<S: PolicySink> {
    settings: WatcherSettings,
    view: FleetView,
    sink: S,
    status: SharedStatus,
    /// Everything up to this store revision has been seen.
    revision: i64,
    /// The store's cluster id when the host last read it.
    cluster: Option<u64>,
    /// The next session reads the whole prefix (first start, compaction).
    resync: bool,
    /// A change is waiting: the sink refused it, or could not say why.
    retry: bool,
    /// Told once, after the first read of the store (or its failure).
    first_sync: Option<std::sync::mpsc::Sender<()>>,
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, FleetError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(FleetError::Timeout(what.to_string())),
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

/// The text of a value that is not UTF-8: kept (and rejected by the
/// parser) rather than dropped, which would read as a delete.
fn text_of(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) => text.to_string(),
        Err(e) => format!("# not UTF-8 (byte {}): rejected\n\u{0}", e.valid_up_to()),
    }
}

impl<S: PolicySink> Watcher<S> {
    /// A watcher starting from `cache` (the set the sink already enforces).
    pub fn new(settings: WatcherSettings, sink: S, cache: Option<FleetCache>, first_sync: Option<std::sync::mpsc::Sender<()>>) -> Watcher<S> {
        let status = Arc::new(Mutex::new(initial_status(&settings, cache.as_ref())));
        let (good, revision) = cache.map(|c| (c.good, c.revision)).unwrap_or_default();
        let view = FleetView::new(settings.source.layout.clone(), settings.host.clone(), good);
        Watcher { settings, view, sink, status, revision, cluster: None, resync: true, retry: false, first_sync }
    }

    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// Runs forever: a session at a time, reconnecting with a backoff. Needs
    /// a multi-thread runtime (the sink is called in `block_in_place`, so
    /// the status lease is kept while it works).
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

    async fn read_all(&mut self, client: &mut etcd_client::Client) -> Result<(), FleetError> {
        let layout = &self.settings.source.layout;
        let response = bounded("reading the policies", client.get(layout.policies(), Some(GetOptions::new().with_prefix()))).await?;
        let mut keys = Vec::new();
        for kv in response.kvs() {
            let Ok(key) = kv.key_str() else {
                tracing::warn!("fleet: a key under {} is not UTF-8: ignored", layout.policies());
                continue;
            };
            keys.push((key.to_string(), Stored { text: text_of(kv.value()), mod_revision: kv.mod_revision() }));
        }
        self.view.reset(keys);
        self.revision = response.header().map_or(0, |h| h.revision());
        self.cluster = response.header().map(|h| h.cluster_id());
        self.resync = false;
        self.update();
        tracing::info!(revision = self.revision, "fleet: policies read from the store");
        Ok(())
    }

    async fn session(&mut self) -> Result<(), FleetError> {
        let mut client = self.settings.options.connect(&self.settings.source, Duration::from_secs(3)).await?;
        let layout = self.settings.source.layout.clone();
        if self.resync {
            self.read_all(&mut client).await?;
        }
        let options = WatchOptions::new().with_prefix().with_start_revision(self.revision + 1).with_progress_notify();
        let mut stream = bounded("starting the watch", client.watch(layout.policies(), Some(options))).await?;
        {
            let mut status = self.status.lock().expect("status lock");
            status.connected = true;
            status.from_cache = false;
            status.last_error = None;
        }
        let publish = Arc::new(tokio::sync::Notify::new());
        let publisher = StatusPublisher { client: client.clone(), key: layout.status_key(&self.settings.host.name), status: self.status.clone(), wake: publish.clone() };
        // Aborted when the session ends.
        let publisher = crate::util::task::AbortOnDrop(tokio::spawn(publisher.run()));
        publish.notify_one();
        self.tell_first_sync();
        let mut retry = tokio::time::interval(RETRY_REFUSED);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.message() => {
                    let Some(response) = message? else { return Err(FleetError::Session("etcd ended the watch".into())) };
                    let facts = ResponseFacts {
                        created: response.created(),
                        canceled: response.canceled(),
                        cancel_reason: response.cancel_reason().to_string(),
                        compact_revision: response.compact_revision(),
                        header_revision: response.header().map(|h| h.revision()),
                        cluster_id: response.header().map(|h| h.cluster_id()),
                        event_revisions: response.events().iter().map(|e| e.kv().map_or(0, |kv| kv.mod_revision())).collect(),
                    };
                    match on_watch_response(self.revision, self.cluster, &facts) {
                        WatchStep::Resync(why) => {
                            tracing::warn!("fleet: {why}: reading every policy again");
                            self.read_all(&mut client).await?;
                            publish.notify_one();
                            // The old watch's history is not ours: watch anew.
                            return Err(FleetError::Session(format!("{why}; read again, watching anew")));
                        }
                        WatchStep::Apply { events, revision } => {
                            let mut touched = false;
                            for i in events {
                                let event = &response.events()[i];
                                let Some(kv) = event.kv() else { continue };
                                let Ok(key) = kv.key_str() else { continue };
                                touched |= match event.event_type() {
                                    EventType::Put => self.view.put(key, text_of(kv.value()), kv.mod_revision()),
                                    EventType::Delete => self.view.delete(key),
                                };
                            }
                            self.revision = revision;
                            if touched {
                                self.update();
                            }
                            self.status.lock().expect("status lock").revision = self.revision;
                            // Every host acknowledges every revision: the
                            // fleet's view shows who is behind.
                            publish.notify_one();
                        }
                    }
                }
                _ = retry.tick(), if self.retry => {
                    self.view.forget_refusals();
                    self.update();
                    publish.notify_one();
                }
                _ = publisher_done(&publisher) => {
                    return Err(FleetError::Session("the status publisher stopped".into()));
                }
            }
        }
    }

    /// Plans, hands the plan to the sink (leaving out what it refuses, a
    /// policy at a time), keeps what was accepted.
    fn update(&mut self) {
        self.retry = false;
        // Each refusal blames at least one more key, so this ends; the
        // bound is a guard against a sink that refuses without reason.
        for _ in 0..64 {
            let plan = self.view.plan();
            if plan.changed.is_empty() {
                self.view.accept(plan);
                break;
            }
            let change = FleetChange {
                entries: plan.entries.clone(),
                cache: FleetCache {
                    prefix: self.settings.source.layout.prefix.clone(),
                    host: self.settings.host.name.clone(),
                    group: self.settings.host.group.clone(),
                    revision: self.revision,
                    good: plan.candidate.clone(),
                },
            };
            let sink = &mut self.sink;
            match tokio::task::block_in_place(|| sink.apply(change)) {
                Ok(generation) => {
                    tracing::info!(revision = self.revision, generation, changed = ?plan.changed, "fleet: policies in force");
                    self.view.accept(plan);
                    let mut status = self.status.lock().expect("status lock");
                    status.policy_generation = generation;
                    status.applied_revision = self.revision;
                    break;
                }
                Err(refusal) => {
                    tracing::error!(policy = ?refusal.policy, "fleet: change refused, the policies in force stay: {}", refusal.reason);
                    self.retry = true;
                    if !self.view.refuse(&plan, &refusal) {
                        // Not the change's fault: offered again later.
                        self.status.lock().expect("status lock").last_error = Some(format!("change not applied (retried): {}", refusal.reason));
                        break;
                    }
                }
            }
        }
        let before = self.status.lock().expect("status lock").rejected.clone();
        for r in self.view.rejected.values().filter(|r| !before.contains(r)) {
            tracing::warn!(key = %r.key, mod_revision = r.mod_revision, "fleet: rejected: {}", r.reason);
        }
        let mut status = self.status.lock().expect("status lock");
        status.revision = self.revision;
        status.in_force = self.view.good.iter().map(|(k, s)| (k.clone(), s.mod_revision)).collect();
        status.rejected = self.view.rejected.values().cloned().collect();
    }
}

/// Resolves if the publisher task has ended (it only ends by panicking).
async fn publisher_done(task: &crate::util::task::AbortOnDrop) {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the status key on a lease and writes the status when woken; a
/// failure is logged (rarely) and retried, never fatal to the watch.
struct StatusPublisher {
    client: etcd_client::Client,
    key: String,
    status: SharedStatus,
    wake: Arc<tokio::sync::Notify>,
}

impl StatusPublisher {
    async fn run(mut self) {
        let mut logged: Option<String> = None;
        loop {
            if let Err(e) = self.leased().await {
                let text = e.to_string();
                if logged.as_deref() != Some(&text) {
                    tracing::warn!(key = %self.key, "fleet: the host's status is not published ({text}); policies are still watched and enforced");
                    logged = Some(text);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }

    /// One lease: granted, kept alive every TTL/3, the status written on it
    /// whenever woken (and at once).
    async fn leased(&mut self) -> Result<(), FleetError> {
        let lease = bounded("granting the status lease", self.client.lease_grant(STATUS_TTL_SECONDS, None)).await?.id();
        let (mut keeper, mut answers) = bounded("keeping the status lease", self.client.lease_keep_alive(lease)).await?;
        let mut renew = tokio::time::interval(Duration::from_secs((STATUS_TTL_SECONDS / 3).max(1) as u64));
        self.write(lease).await?;
        loop {
            tokio::select! {
                _ = self.wake.notified() => self.write(lease).await?,
                _ = renew.tick() => keeper.keep_alive().await?,
                answer = answers.message() => match answer? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Err(FleetError::Session("the status lease expired".into())),
                },
            }
        }
    }

    async fn write(&mut self, lease: i64) -> Result<(), FleetError> {
        let json = {
            let mut status = self.status.lock().expect("status lock");
            status.updated_unix_ms = crate::util::clock::unix_now_ns() / 1_000_000;
            serde_json::to_string(&*status).expect("status serializes")
        };
        bounded("publishing the status", self.client.put(self.key.clone(), json, Some(PutOptions::new().with_lease(lease)))).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(events: &[i64]) -> ResponseFacts {
        ResponseFacts { header_revision: Some(100), cluster_id: Some(7), event_revisions: events.to_vec(), ..Default::default() }
    }

    #[test]
    fn revisions_advance_by_events_and_progress_only() {
        // Events past what was seen are applied; the revision is the last event's.
        assert_eq!(on_watch_response(10, Some(7), &facts(&[9, 10, 11, 12])), WatchStep::Apply { events: vec![2, 3], revision: 12 });
        // All seen already (a replay after a reconnect): nothing, and no move back.
        assert_eq!(on_watch_response(12, Some(7), &facts(&[11, 12])), WatchStep::Apply { events: vec![], revision: 12 });
        // A progress notification: all up to its header.
        assert_eq!(on_watch_response(12, Some(7), &facts(&[])), WatchStep::Apply { events: vec![], revision: 100 });
        // The created response says nothing about progress.
        let created = ResponseFacts { created: true, ..facts(&[]) };
        assert_eq!(on_watch_response(12, Some(7), &created), WatchStep::Apply { events: vec![], revision: 12 });
    }

    #[test]
    fn history_the_store_cannot_give_is_read_again() {
        let compacted = ResponseFacts { compact_revision: 50, canceled: true, ..facts(&[]) };
        assert!(matches!(on_watch_response(12, Some(7), &compacted), WatchStep::Resync(w) if w.contains("compacted")));
        let cancelled = ResponseFacts { canceled: true, cancel_reason: "permission denied".into(), ..facts(&[]) };
        assert!(matches!(on_watch_response(12, Some(7), &cancelled), WatchStep::Resync(w) if w.contains("permission denied")));
        let behind = ResponseFacts { created: true, header_revision: Some(5), ..facts(&[]) };
        assert!(matches!(on_watch_response(12, Some(7), &behind), WatchStep::Resync(w) if w.contains("behind")));
        let other = ResponseFacts { cluster_id: Some(8), ..facts(&[13]) };
        assert!(matches!(on_watch_response(12, Some(7), &other), WatchStep::Resync(w) if w.contains("another cluster")));
        // Unknown cluster (first read failed to say): no verdict on it.
        assert!(matches!(on_watch_response(12, None, &other), WatchStep::Apply { .. }));
    }

    #[test]
    fn values_that_are_not_utf8_are_kept_to_be_rejected() {
        let text = text_of(b"name = \"web\xff\"");
        assert!(crate::policy::Policy::parse("k", &text).is_err());
        assert_eq!(text_of(b"name = \"web\""), "name = \"web\"");
    }
}
