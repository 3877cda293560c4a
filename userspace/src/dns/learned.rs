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

use crate::datapath::learned::{LearnedMaps, LearnedMapsError};
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

/// The learned entries of the policy tries as the store changes them: the
/// pinned maps ([`LearnedMaps`]), or a test's table.
pub trait LearnedTries: Send + 'static {
    fn insert(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue) -> Result<(), LearnedMapsError>;
    fn get(&self, policy_id: u32, ip: IpAddr) -> Option<PolicyValue>;
    /// Puts an entry back where nothing can act on a failure (expiry,
    /// undo): a failure is counted, not returned.
    fn insert_or_count_failure(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue);
    fn remove(&mut self, policy_id: u32, ip: IpAddr);
    /// Every full-length entry with a learned overlay: (policy id, address, value).
    fn learned_entries(&self) -> Vec<(u32, IpAddr, PolicyValue)>;
}

impl LearnedTries for LearnedMaps {
    fn insert(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue) -> Result<(), LearnedMapsError> {
        LearnedMaps::insert(self, policy_id, ip, value)
    }
    fn get(&self, policy_id: u32, ip: IpAddr) -> Option<PolicyValue> {
        LearnedMaps::get(self, policy_id, ip)
    }
    fn insert_or_count_failure(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue) {
        LearnedMaps::insert_or_count_failure(self, policy_id, ip, value)
    }
    fn remove(&mut self, policy_id: u32, ip: IpAddr) {
        LearnedMaps::remove(self, policy_id, ip)
    }
    fn learned_entries(&self) -> Vec<(u32, IpAddr, PolicyValue)> {
        LearnedMaps::learned_entries(self)
    }
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
    pub fn restore(path: &Path, maps: &impl LearnedTries) -> Learned {
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
pub struct LearnedStore<T = LearnedMaps> {
    /// The writer lock: held across every change, by one writer at a time
    /// (async-aware, as answers wait for it within their hold timeout; the
    /// daemon's control thread takes it with [`LearnedStore::blocking_change`]).
    maps: tokio::sync::Mutex<T>,
    /// Written only by the holder of `maps`, briefly and never across an
    /// await; read by anyone.
    table: RwLock<Learned>,
    /// Held across every snapshot write; true once a draining data plane
    /// wrote the last one (its successor restores that one: a periodic
    /// write still in flight must not replace it).
    snapshot_sealed: std::sync::Mutex<bool>,
}

/// A change in progress: the writer lock, and the table to read or write.
pub struct LearnedChange<'a, T = LearnedMaps> {
    maps: tokio::sync::MutexGuard<'a, T>,
    table: &'a RwLock<Learned>,
}

impl<T: LearnedTries> LearnedStore<T> {
    pub fn new(maps: T, learned: Learned) -> LearnedStore<T> {
        LearnedStore { maps: tokio::sync::Mutex::new(maps), table: RwLock::new(learned), snapshot_sealed: std::sync::Mutex::new(false) }
    }

    /// Starts a change (waits for the one in progress).
    pub async fn change(&self) -> LearnedChange<'_, T> {
        LearnedChange { maps: self.maps.lock().await, table: &self.table }
    }

    /// [`LearnedStore::change`] for a thread outside the async runtime
    /// (the daemon's control thread switching a policy generation).
    pub fn blocking_change(&self) -> LearnedChange<'_, T> {
        LearnedChange { maps: self.maps.blocking_lock(), table: &self.table }
    }

    fn read(&self) -> RwLockReadGuard<'_, Learned> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    /// `f` on the table, under the read lock (held only while `f` runs).
    pub fn read_with<R>(&self, f: impl FnOnce(&Learned) -> R) -> R {
        f(&self.read())
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
                        change.maps().insert_or_count_failure(*policy_id, *ip, &v);
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

    /// Takes into the table the live learned entries of the tries that it
    /// does not know (a data plane that crashed learned them after its last
    /// snapshot), for each `(sandbox, policy id)` in force, so that they
    /// expire and are carried like any other. Their names are unknown.
    /// Blocking; one walk of the tries. Returns how many were taken.
    pub fn adopt_untracked(&self, sandboxes: &[(String, u32)], now_ns: u64) -> usize {
        let mut change = self.blocking_change();
        let entries = change.maps().learned_entries();
        let (_, mut learned) = change.parts();
        let mut taken = 0;
        for (policy_id, ip, value) in entries {
            if value.learned_until_ns <= now_ns {
                continue;
            }
            let Some((sandbox, _)) = sandboxes.iter().find(|(_, id)| *id == policy_id) else { continue };
            if learned.by_sandbox.get(sandbox).is_some_and(|t| t.contains_key(&ip)) {
                continue;
            }
            learned.by_sandbox.entry(sandbox.clone()).or_default().insert(ip, LearnedAddr { policy_id, value, names: BTreeSet::new(), answered_ns: now_ns });
            taken += 1;
        }
        if taken > 0 {
            learned.version += 1;
        }
        taken
    }

    /// Writes the snapshot now (a draining data plane, before the next one
    /// restores it). Blocking.
    pub fn save_snapshot(&self, path: &Path) -> Result<(), LearnedError> {
        let mut sealed = self.snapshot_sealed.lock().unwrap_or_else(|p| p.into_inner());
        *sealed = true;
        let entries = self.read().snapshot();
        write_snapshot(path, &entries)
    }

    /// A periodic snapshot write, unless the snapshot is sealed.
    fn write_periodic(&self, path: &Path, entries: &[SnapshotEntry]) -> Result<(), LearnedError> {
        let sealed = self.snapshot_sealed.lock().unwrap_or_else(|p| p.into_inner());
        if *sealed {
            return Ok(());
        }
        write_snapshot(path, entries)
    }

    /// The snapshot's entries and the version they are of, when the table
    /// changed since `written`.
    fn snapshot_since(&self, written: Option<u64>) -> Option<(u64, Vec<SnapshotEntry>)> {
        let learned = self.read();
        (written != Some(learned.version)).then(|| (learned.version, learned.snapshot()))
    }
}

impl<T: LearnedTries> LearnedChange<'_, T> {
    pub fn maps(&mut self) -> &mut T {
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
    pub fn parts(&mut self) -> (&mut T, RwLockWriteGuard<'_, Learned>) {
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

impl<T: LearnedTries> crate::observe::ingest::DestinationNames for LearnedStore<T> {
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

impl<T: LearnedTries> crate::observe::ingest::DestinationNames for Arc<LearnedStore<T>> {
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
        let (path, writer) = (snapshot.clone(), store.clone());
        let wrote = tokio::task::spawn_blocking(move || writer.write_periodic(&path, &entries)).await;
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


#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::decide::learned_value;
    use crate::observe::ingest::DestinationNames;
    use crate::policy::compile::compile;
    use crate::policy::Policy;

    /// The tries as a map (the pinned ones need privileges).
    #[derive(Default)]
    struct Tries(HashMap<(u32, IpAddr), PolicyValue>);

    impl LearnedTries for Tries {
        fn insert(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue) -> Result<(), LearnedMapsError> {
            self.0.insert((policy_id, ip), *value);
            Ok(())
        }
        fn get(&self, policy_id: u32, ip: IpAddr) -> Option<PolicyValue> {
            self.0.get(&(policy_id, ip)).copied()
        }
        fn insert_or_count_failure(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue) {
            self.0.insert((policy_id, ip), *value);
        }
        fn remove(&mut self, policy_id: u32, ip: IpAddr) {
            self.0.remove(&(policy_id, ip));
        }
        fn learned_entries(&self) -> Vec<(u32, IpAddr, PolicyValue)> {
            self.0.iter().filter(|(_, v)| v.learned_until_ns != 0).map(|((id, ip), v)| (*id, *ip, *v)).collect()
        }
    }

    #[test]
    fn live_learned_entries_the_table_does_not_know_are_taken_in_and_expire() {
        // A data plane died after learning 203.0.113.9 and before its
        // snapshot: the entry is in the trie, not in the restored table.
        let later = boot_time_ns() + 3_600_000_000_000;
        let store = store(&[("203.0.113.5", later)]);
        let p = policy();
        let untracked = learned_value(&p, ip("203.0.113.9"), None, 1, None, later);
        let expired = learned_value(&p, ip("203.0.113.10"), None, 1, None, 10);
        let other_generation = learned_value(&p, ip("203.0.113.11"), None, 1, None, later);
        {
            let rt = runtime();
            let mut change = rt.block_on(store.change());
            change.maps().insert(7, ip("203.0.113.9"), &untracked).unwrap();
            change.maps().insert(7, ip("203.0.113.10"), &expired).unwrap();
            change.maps().insert(99, ip("203.0.113.11"), &other_generation).unwrap();
        }
        let taken = store.adopt_untracked(&[("s".to_string(), 7)], 100);
        assert_eq!(taken, 1, "the live untracked entry of the sandbox's generation, not the expired one nor another generation's");
        let table = store.sandbox_table("s");
        assert_eq!(table.len(), 2);
        assert!(table[&ip("203.0.113.9")].names.is_empty(), "its names are unknown");
        assert_eq!(table[&ip("203.0.113.9")].value.learned_until_ns, later, "it expires when the kernel's entry does");
        assert_eq!(store.adopt_untracked(&[("s".to_string(), 7)], 100), 0, "taken once");
    }

    fn policy() -> Arc<CompiledPolicy> {
        Arc::new(compile(&Policy::parse("t.toml", "name = \"t\"\n[network]\nallow = [\"api.test\", \"198.51.100.7/32\"]\n").unwrap(), &[]).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The store with `entries` (address, expiry) learned by sandbox "s"
    /// for api.test, in the table and in the tries.
    fn store(entries: &[(&str, u64)]) -> LearnedStore<Tries> {
        let p = policy();
        let mut tries = Tries::default();
        let mut learned = Learned::default();
        for (addr, until) in entries {
            let value = learned_value(&p, ip(addr), None, 1, None, *until);
            tries.insert(7, ip(addr), &value).unwrap();
            let names = ["api.test".to_string()].into();
            learned.by_sandbox.entry("s".into()).or_default().insert(ip(addr), LearnedAddr { policy_id: 7, value, names, answered_ns: 0 });
        }
        LearnedStore::new(tries, learned)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    #[test]
    fn reads_never_wait_for_a_change_in_progress_and_changes_wait_for_each_other() {
        let later = boot_time_ns() + 3_600_000_000_000;
        let store = Arc::new(store(&[("203.0.113.5", later)]));
        let rt = runtime();
        let change = rt.block_on(store.change());
        let reader = store.clone();
        let (done, read) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let names = runtime().block_on(reader.names(&[(Some("s"), Some(ip("203.0.113.5"))), (Some("t"), Some(ip("203.0.113.5")))]));
            let _ = done.send((reader.addresses_for("s", "api.test", 0), reader.addresses_for("s", "api.test", u64::MAX), reader.count(), reader.sandbox_table("s").len(), names));
        });
        let got = read.recv_timeout(Duration::from_secs(5)).expect("lookups go on while a change holds the writer lock");
        assert_eq!(got, (vec![ip("203.0.113.5")], vec![], 1, 1, vec![vec!["api.test".to_string()], vec![]]), "expired addresses are not offered");
        let change_within = |wait| rt.block_on(async { tokio::time::timeout(wait, store.change()).await.is_ok() });
        assert!(!change_within(Duration::from_millis(50)), "a second writer waits");
        drop(change);
        assert!(change_within(Duration::from_secs(5)));
    }

    #[test]
    fn the_sweep_clears_expired_entries_from_tries_then_table_and_the_snapshot_follows() {
        let later = boot_time_ns() + 3_600_000_000_000;
        let store = store(&[("198.51.100.7", 10), ("203.0.113.5", 10), ("203.0.113.6", later)]);
        let (version, entries) = store.snapshot_since(None).expect("never written");
        assert_eq!(entries.len(), 3);
        assert!(store.snapshot_since(Some(version)).is_none(), "unchanged: not rewritten");
        let p = policy();
        runtime().block_on(store.sweep(100, &|sandbox: &str| (sandbox == "s").then(|| p.clone())));
        let tries = &runtime().block_on(store.change()).maps().0.clone();
        // The policy's own entry at an expired address is put back; another
        // expired address leaves the trie; a live one stays as it was.
        assert_eq!(tries.get(&(7, ip("198.51.100.7"))), static_exact(&p, ip("198.51.100.7")).as_ref());
        assert!(tries.get(&(7, ip("198.51.100.7"))).is_some_and(|v| v.learned_until_ns == 0));
        assert!(!tries.contains_key(&(7, ip("203.0.113.5"))));
        assert_eq!(tries.get(&(7, ip("203.0.113.6"))).map(|v| v.learned_until_ns), Some(later));
        assert_eq!(store.sandbox_table("s").into_keys().collect::<Vec<_>>(), [ip("203.0.113.6")]);
        let (swept, entries) = store.snapshot_since(Some(version)).expect("changed: rewritten");
        assert!(swept > version);
        // Written and read back: what the tries still hold live comes back.
        let path = std::env::temp_dir().join(format!("sbx-net-learned-{}.json", std::process::id()));
        write_snapshot(&path, &entries).unwrap();
        let restored = Learned::restore(&path, &Tries(tries.clone()));
        let _ = std::fs::remove_file(&path);
        let back: Vec<(&String, Vec<&IpAddr>)> = restored.by_sandbox.iter().map(|(s, t)| (s, t.keys().collect())).collect();
        assert_eq!(back, [(&"s".to_string(), vec![&ip("203.0.113.6")])]);
        // Later the last one expires too.
        runtime().block_on(store.sweep(later + 1, &|_: &str| None));
        assert!(store.snapshot_since(Some(swept)).is_some_and(|(v, e)| v > swept && e.is_empty()), "the last one expired and its sandbox went");
    }
}
