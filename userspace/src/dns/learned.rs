//! The learned store: which addresses DNS answers opened for each
//! sandbox, under which names, until when. It mirrors the learned entries of
//! the pinned tries ([`crate::datapath::learned`]), is kept in a snapshot
//! across restarts, and is swept of expired entries once a second.
//!
//! Changes (an answer's addresses, the sweep, the daemon switching a
//! sandbox's policy generation) take the store's writer lock, which also
//! owns the tries' handles, so the tries and the table change together and
//! one at a time. Reads (the names behind a flow record's destination, the
//! addresses the HTTP(S) proxy checks a connection against) take only a
//! read lock on the table, held for a lookup: they never queue behind an
//! answer's map writes, and the files (conntrack, the snapshot) are read
//! and written outside both locks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use sbx_net_common::PolicyValue;

use crate::datapath::learned::LearnedMaps;
use crate::dns::decide::{exceeds_cap, LearnedAddr};
use crate::policy::compile::CompiledPolicy;
use crate::sandbox::route::Routes;
use crate::util::clock::boot_time_ns;

#[derive(Debug, thiserror::Error)]
pub enum LearnedError {
    #[error("learned-address snapshot {path}: {source}")]
    Snapshot { path: String, source: std::io::Error },
    #[error("learned-address snapshot {path}: the writing task failed: {source}")]
    SnapshotTask { path: String, source: tokio::task::JoinError },
}

/// Learned addresses per sandbox (what the tries hold beyond the compiled
/// policy), for expiry and for carrying them across policy generations.
#[derive(Default)]
pub struct Learned {
    pub by_sandbox: HashMap<String, HashMap<IpAddr, LearnedAddr>>,
    /// Bumped on every change, so the snapshot is rewritten only then.
    pub version: u64,
}

/// One line of the snapshot: what a restarted daemon needs besides the
/// trie entry itself (which survives in the pinned map).
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotEntry {
    sandbox: String,
    ip: IpAddr,
    policy_id: u32,
    names: BTreeSet<String>,
}

impl Learned {
    /// The name↔address knowledge as the snapshot keeps it (a copy: the
    /// file is written after the lock is released).
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.by_sandbox
            .iter()
            .flat_map(|(sandbox, t)| t.iter().map(|(ip, l)| SnapshotEntry { sandbox: sandbox.clone(), ip: *ip, policy_id: l.policy_id, names: l.names.clone() }))
            .collect()
    }

    /// Restores the table from the snapshot and the tries: an entry is back
    /// only if the trie still holds a live learned value for it.
    pub fn restore(path: &Path, maps: &LearnedMaps) -> Learned {
        let mut learned = Learned::default();
        let Ok(bytes) = std::fs::read(path) else { return learned };
        let Ok(entries) = serde_json::from_slice::<Vec<SnapshotEntry>>(&bytes) else {
            tracing::warn!(path = %path.display(), "unreadable learned-address snapshot; starting empty");
            return learned;
        };
        let now = boot_time_ns();
        for e in entries {
            let Some(value) = maps.get(e.policy_id, e.ip) else { continue };
            if value.learned_until_ns > now {
                learned.by_sandbox.entry(e.sandbox).or_default().insert(e.ip, LearnedAddr { policy_id: e.policy_id, value, names: e.names, answered_ns: now });
            }
        }
        learned
    }
}

/// Writes the snapshot to `path` atomically (blocking: call it off the
/// runtime's threads).
fn write_snapshot(path: &Path, entries: &[SnapshotEntry]) -> Result<(), LearnedError> {
    let err = |source| LearnedError::Snapshot { path: path.display().to_string(), source };
    let bytes = serde_json::to_vec(entries).map_err(|e| err(std::io::Error::other(e)))?;
    crate::util::fs::write_atomic(path, &bytes).map_err(err)
}

/// The tries' handles and the learned table (see the module's comment for
/// who takes which lock).
pub struct LearnedStore {
    /// The writer lock: held across every change, by one writer at a time
    /// (async-aware, as answers wait for it within their hold timeout; the
    /// daemon's control thread takes it with [`LearnedStore::blocking_change`]).
    maps: tokio::sync::Mutex<LearnedMaps>,
    /// Written only by the holder of `maps`, briefly and never across an
    /// await; read by anyone.
    table: RwLock<Learned>,
}

/// A change in progress: the writer lock, and the table to read or write.
pub struct LearnedChange<'a> {
    maps: tokio::sync::MutexGuard<'a, LearnedMaps>,
    table: &'a RwLock<Learned>,
}

impl LearnedStore {
    pub fn new(maps: LearnedMaps, learned: Learned) -> LearnedStore {
        LearnedStore { maps: tokio::sync::Mutex::new(maps), table: RwLock::new(learned) }
    }

    /// Starts a change (waits for the one in progress).
    pub async fn change(&self) -> LearnedChange<'_> {
        LearnedChange { maps: self.maps.lock().await, table: &self.table }
    }

    /// [`LearnedStore::change`] for a thread outside the async runtime
    /// (the daemon's control thread switching a policy generation).
    pub fn blocking_change(&self) -> LearnedChange<'_> {
        LearnedChange { maps: self.maps.blocking_lock(), table: &self.table }
    }

    fn read(&self) -> RwLockReadGuard<'_, Learned> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The addresses DNS answered `sandbox` for `name` that are still open
    /// at `now_ns` (boot time).
    pub fn addresses_for(&self, sandbox: &str, name: &str, now_ns: u64) -> Vec<IpAddr> {
        let learned = self.read();
        let Some(table) = learned.by_sandbox.get(sandbox) else { return Vec::new() };
        table.iter().filter(|(_, l)| l.names.contains(name) && l.value.learned_until_ns > now_ns).map(|(ip, _)| *ip).collect()
    }

    /// A copy of one sandbox's learned addresses.
    pub fn sandbox_table(&self, sandbox: &str) -> HashMap<IpAddr, LearnedAddr> {
        self.read().by_sandbox.get(sandbox).cloned().unwrap_or_default()
    }

    /// Learned addresses in force, all sandboxes together.
    pub fn count(&self) -> usize {
        self.read().by_sandbox.values().map(HashMap::len).sum()
    }

    /// Whether an answer of `current` for `name` puts the name over `cap`
    /// (so that its older addresses' flows must be looked at).
    pub fn exceeds_cap(&self, sandbox: &str, name: &str, current: &[IpAddr], cap: usize) -> bool {
        self.read().by_sandbox.get(sandbox).is_some_and(|table| exceeds_cap(table, name, current, cap))
    }

    /// Removes the expired entries from the tries (putting back what the
    /// policy itself says at that exact address, when it has an entry there)
    /// and then from the table.
    async fn sweep(&self, now_ns: u64, policies: &(dyn Fn(&str) -> Option<Arc<CompiledPolicy>> + Sync)) {
        let mut change = self.change().await;
        let expired: BTreeMap<String, Vec<(IpAddr, u32)>> = {
            let learned = change.table();
            learned
                .by_sandbox
                .iter()
                .map(|(sandbox, t)| (sandbox.clone(), t.iter().filter(|(_, l)| l.value.learned_until_ns <= now_ns).map(|(ip, l)| (*ip, l.policy_id)).collect::<Vec<_>>()))
                .filter(|(_, ips)| !ips.is_empty())
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        // The tries first, under the writer lock only (readers go on)...
        for (sandbox, ips) in &expired {
            let policy = policies(sandbox);
            for (ip, policy_id) in ips {
                match policy.as_ref().and_then(|p| static_exact(p, *ip)) {
                    Some(v) => {
                        let _ = change.maps().insert(*policy_id, *ip, &v);
                    }
                    None => change.maps().remove(*policy_id, *ip),
                }
            }
        }
        // ...then the table, briefly.
        let mut learned = change.table_mut();
        for (sandbox, ips) in expired {
            if let Some(table) = learned.by_sandbox.get_mut(&sandbox) {
                for (ip, _) in ips {
                    table.remove(&ip);
                }
            }
        }
        learned.by_sandbox.retain(|_, t| !t.is_empty());
        learned.version += 1;
    }

    /// The snapshot's entries and the version they are of, when the table
    /// changed since `written`.
    fn snapshot_since(&self, written: Option<u64>) -> Option<(u64, Vec<SnapshotEntry>)> {
        let learned = self.read();
        (written != Some(learned.version)).then(|| (learned.version, learned.snapshot()))
    }
}

impl LearnedChange<'_> {
    pub fn maps(&mut self) -> &mut LearnedMaps {
        &mut self.maps
    }

    /// The table as it is (no other change can run meanwhile).
    pub fn table(&self) -> RwLockReadGuard<'_, Learned> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The table for writing: readers wait while the guard lives, so keep
    /// it short and never across an await.
    pub fn table_mut(&mut self) -> RwLockWriteGuard<'_, Learned> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The tries and the table for writing together.
    pub fn parts(&mut self) -> (&mut LearnedMaps, RwLockWriteGuard<'_, Learned>) {
        (&mut self.maps, self.table.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// A copy of one sandbox's learned addresses.
    pub fn sandbox(&self, sandbox: &str) -> HashMap<IpAddr, LearnedAddr> {
        self.table().by_sandbox.get(sandbox).cloned().unwrap_or_default()
    }

    /// Sets one sandbox's learned addresses (after a generation switch).
    pub fn replace_sandbox(&mut self, sandbox: &str, table: HashMap<IpAddr, LearnedAddr>) {
        let mut learned = self.table_mut();
        if table.is_empty() {
            learned.by_sandbox.remove(sandbox);
        } else {
            learned.by_sandbox.insert(sandbox.to_string(), table);
        }
        learned.version += 1;
    }

    /// Takes a deleted sandbox's learned addresses out of the table.
    pub fn remove_sandbox(&mut self, sandbox: &str) -> Option<HashMap<IpAddr, LearnedAddr>> {
        let mut learned = self.table_mut();
        let removed = learned.by_sandbox.remove(sandbox);
        if removed.is_some() {
            learned.version += 1;
        }
        removed
    }
}

impl crate::observe::ingest::DestinationNames for LearnedStore {
    async fn names(&self, queries: &[(Option<&str>, Option<IpAddr>)]) -> Vec<Vec<String>> {
        let learned = self.read();
        queries
            .iter()
            .map(|(sandbox, ip)| match (sandbox, ip) {
                (Some(sandbox), Some(ip)) => learned.by_sandbox.get(*sandbox).and_then(|t| t.get(ip)).map(|l| l.names.iter().cloned().collect()).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect()
    }
}

impl crate::observe::ingest::DestinationNames for Arc<LearnedStore> {
    async fn names(&self, queries: &[(Option<&str>, Option<IpAddr>)]) -> Vec<Vec<String>> {
        self.as_ref().names(queries).await
    }
}

/// Removes expired learned addresses from the tries (the classifier already
/// ignores them; this frees the entries), once a second, and rewrites the
/// snapshot when the table changed (on a blocking thread).
pub async fn collect_expired(store: Arc<LearnedStore>, snapshot: PathBuf, policies: impl Fn(&str) -> Option<Arc<CompiledPolicy>> + Send + Sync + 'static) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut written = None;
    loop {
        tick.tick().await;
        store.sweep(boot_time_ns(), &policies).await;
        let Some((version, entries)) = store.snapshot_since(written) else { continue };
        let path = snapshot.clone();
        let wrote = tokio::task::spawn_blocking(move || write_snapshot(&path, &entries)).await;
        match wrote.unwrap_or_else(|source| Err(LearnedError::SnapshotTask { path: snapshot.display().to_string(), source })) {
            Ok(()) => written = Some(version),
            Err(e) => tracing::warn!("writing the learned-address snapshot: {e}"),
        }
    }
}

/// The sandbox's guest addresses (both families) from the routing table.
pub(super) fn guest_addresses(routes: &Routes, sandbox: &str) -> Vec<IpAddr> {
    routes.read().unwrap_or_else(|p| p.into_inner()).iter().filter(|(_, r)| r.sandbox == sandbox).map(|(ip, _)| *ip).collect()
}

pub(super) fn static_exact(policy: &CompiledPolicy, ip: IpAddr) -> Option<PolicyValue> {
    match ip {
        IpAddr::V4(a) => policy.v4.iter().find(|(n, len, _)| *len == 32 && *n == a).map(|(_, _, v)| *v),
        IpAddr::V6(a) => policy.v6.iter().find(|(n, len, _)| *len == 128 && *n == a).map(|(_, _, v)| *v),
    }
}

