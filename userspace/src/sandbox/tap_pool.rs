//! Pre-warmed taps: the slow part of creating a sandbox is the TCX attach
//! (one RCU grace period each), so worker threads keep a few taps ready —
//! created, persistent, given their gateway side, classifier attached and
//! pinned — for the next sandbox ids. Such a tap is fail-closed while it
//! waits: its datapath slot is empty, so the classifier drops every frame
//! as an unknown sandbox, and it is in no nftables set.
//!
//! A worker also makes each ready tap's sandbox CA (an ECDSA key and its
//! self-signed certificate, ~0.1 ms of CPU, and their files, off the create
//! path): it is handed out with the tap, to that one sandbox, its files in
//! a 0700 directory of their own (the key 0600) until the create renames
//! that to the sandbox's. ~1 KB per ready tap.
//!
//! Ids are allocated here, for pooled and directly created sandboxes alike,
//! so a pooled tap's `sbx-<id>` never collides with a new sandbox's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use aya::programs::ProgramFd;
use sbx_vmm::Netlink;

use crate::credentials::ca::PreparedCa;
use crate::datapath::tcx::{attach_ingress_pinned, TcxError};
use crate::sandbox::{open_host_tap, AddressPools, SandboxError, SandboxSpec};

/// Why a tap could not be pre-warmed (the worker logs it and tries again).
#[derive(Debug, thiserror::Error)]
pub enum PrewarmError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("making the tap persistent: {0}")]
    Persist(#[from] sbx_vmm::tap::TapError),
    #[error(transparent)]
    Attach(#[from] TcxError),
}

/// Pin name of a pooled tap's link (renamed to the sandbox's on use).
pub fn pool_pin_name(id: u32) -> String {
    format!("pool-{id}")
}

/// Pin name of a deleted sandbox's link until its tap is gone.
pub fn reap_pin_name(id: u32) -> String {
    format!("reap-{id}")
}

#[derive(Default)]
struct Inner {
    /// Ids of sandboxes (and of taps being torn down).
    used: BTreeSet<u32>,
    /// Ready taps by id.
    ready: BTreeMap<u32, ReadyTap>,
    in_progress: BTreeSet<u32>,
    target: usize,
    capacity: u64,
    stop: bool,
}

impl Inner {
    fn lowest_free(&self) -> Option<u32> {
        (1..self.capacity.min(u64::from(u32::MAX)) as u32)
            .find(|id| !self.used.contains(id) && !self.ready.contains_key(id) && !self.in_progress.contains(id))
    }
}

/// A pre-warmed tap and what was made ahead for its sandbox.
#[derive(Debug)]
struct ReadyTap {
    ifindex: u32,
    /// None when making it failed: the create makes one then.
    ca: Option<PreparedCa>,
}

/// A ready tap given to a sandbox by [`TapPool::take`].
#[derive(Debug)]
pub struct TakenTap {
    pub id: u32,
    pub ifindex: u32,
    /// The sandbox's CA, made ahead for it alone.
    pub ca: Option<PreparedCa>,
}

/// Shared between the control thread and the workers.
#[derive(Clone)]
pub struct TapPool {
    shared: Arc<(Mutex<Inner>, Condvar)>,
}

/// What the workers need, as plain data.
#[derive(Clone)]
pub struct PoolSettings {
    pub size: usize,
    pub workers: usize,
    pub pools: AddressPools,
    pub links_dir: PathBuf,
    /// Where sandboxes' CA directories are: each ready tap's CA is
    /// written ahead into `.pool-<id>` there (see [`PreparedCa::generate_in`]).
    pub ca_dir: PathBuf,
    /// The daemon's state dir: each ready tap gets an empty file there for
    /// its sandbox's record (see `State::save_sandbox`).
    pub state_dir: PathBuf,
}

/// The directory a ready tap's CA is written ahead into (not a
/// sandbox's: sandbox names never start with a dot).
pub fn prepared_ca_dir(ca_dir: &Path, id: u32) -> PathBuf {
    ca_dir.join(format!(".pool-{id}"))
}

/// The empty file a worker makes ahead, in the daemon's state dir `dir`,
/// for the record of the sandbox that gets tap `id` (not a `.json`: never
/// read as a record).
pub fn prepared_record_file(dir: &Path, id: u32) -> PathBuf {
    dir.join("sandboxes").join(format!(".pool-{id}.spare"))
}

/// Removes what an earlier process's workers made ahead (its ready taps
/// are dismantled at start too): the CAs under `ca_dir` and the record
/// files under the state dir `state_dir`; returns how many.
pub fn remove_prepared(state_dir: &Path, ca_dir: &Path) -> usize {
    use crate::util::fs::remove_entries_prefixed;
    remove_entries_prefixed(ca_dir, ".pool-") + remove_entries_prefixed(&state_dir.join("sandboxes"), ".pool-")
}

impl TapPool {
    /// A pool knowing the ids in use; no taps until [`TapPool::start`].
    pub fn new(used: impl IntoIterator<Item = u32>, capacity: u64) -> TapPool {
        let inner = Inner { used: used.into_iter().collect(), capacity, ..Default::default() };
        TapPool { shared: Arc::new((Mutex::new(inner), Condvar::new())) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the workers (each with its own netlink socket), which keep
    /// `settings.size` taps ready, attaching `program`.
    pub fn start(&self, settings: PoolSettings, program: ProgramFd) {
        if settings.size == 0 {
            return;
        }
        self.lock().target = settings.size;
        let program = Arc::new(program);
        for n in 0..settings.workers.max(1) {
            let pool = self.clone();
            let settings = settings.clone();
            let program = program.clone();
            let spawned = std::thread::Builder::new().name(format!("tap-pool-{n}")).spawn(move || pool.work(&settings, &program));
            if let Err(e) = spawned {
                tracing::warn!("tap pool worker: {e}");
            }
        }
    }

    fn work(&self, settings: &PoolSettings, program: &ProgramFd) {
        let netlink = match Netlink::new() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("tap pool worker without netlink: {e}");
                return;
            }
        };
        loop {
            let id = {
                let (_, cvar) = &*self.shared;
                let mut inner = self.lock();
                loop {
                    if inner.stop {
                        return;
                    }
                    if inner.ready.len() + inner.in_progress.len() < inner.target {
                        if let Some(id) = inner.lowest_free() {
                            // Claimed in the same critical section it was found.
                            inner.in_progress.insert(id);
                            break id;
                        }
                    }
                    inner = cvar.wait(inner).unwrap_or_else(|p| p.into_inner());
                }
            };
            let made = prepare(&netlink, settings, program, id);
            // Made outside the lock; when it cannot be made here, the
            // create makes the sandbox's key itself.
            if made.is_ok() {
                // Made ahead, as the key is; a create without it makes one.
                let spare = prepared_record_file(&settings.state_dir, id);
                if let Err(e) = std::fs::File::create(&spare) {
                    tracing::debug!(id, "making {} ahead: {e}", spare.display());
                }
            }
            let ca = made
                .is_ok()
                .then(|| PreparedCa::generate_in(&prepared_ca_dir(&settings.ca_dir, id)))
                .and_then(|k| k.inspect_err(|e| tracing::warn!(id, "pre-making a CA: {e}")).ok());
            let mut inner = self.lock();
            inner.in_progress.remove(&id);
            match made {
                Ok(ifindex) => {
                    inner.ready.insert(id, ReadyTap { ifindex, ca });
                }
                Err(e) => {
                    tracing::warn!(id, "pre-warming a tap: {e}");
                    drop(inner);
                    // Do not spin on a persistent failure (e.g. a name taken).
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Takes a ready tap (its id becomes used) with its CA, which
    /// leaves the pool with it: no other sandbox can get it. The workers
    /// are not woken here: the caller calls [`TapPool::refill`] once its
    /// create has been answered, so the refill (a tap, a TCX attach under
    /// rtnl, CPU on a small host) runs beside neither that create nor its
    /// reply.
    pub fn take(&self) -> Option<TakenTap> {
        let mut inner = self.lock();
        let (id, ReadyTap { ifindex, ca }) = inner.ready.pop_first()?;
        inner.used.insert(id);
        Some(TakenTap { id, ifindex, ca })
    }

    /// Wakes a worker to replace one taken tap.
    pub fn refill(&self) {
        // One tap was taken: one worker makes its replacement (a worker
        // that finishes one looks for more work before it sleeps).
        self.shared.1.notify_one();
    }

    /// Allocates an id for a sandbox made without the pool.
    pub fn allocate(&self) -> Option<u32> {
        let mut inner = self.lock();
        let id = inner.lowest_free()?;
        inner.used.insert(id);
        Some(id)
    }

    /// Returns an id (its sandbox and tap are gone).
    pub fn release(&self, id: u32) {
        self.lock().used.remove(&id);
        self.shared.1.notify_all();
    }

    /// Stops the workers and returns the ready taps' ids (to dismantle).
    pub fn stop(&self) -> Vec<u32> {
        let mut inner = self.lock();
        inner.stop = true;
        self.shared.1.notify_all();
        std::mem::take(&mut inner.ready).into_keys().collect()
    }

    pub fn ready_count(&self) -> usize {
        self.lock().ready.len()
    }
}

fn prepare(netlink: &Netlink, settings: &PoolSettings, program: &ProgramFd, id: u32) -> Result<u32, PrewarmError> {
    use std::os::fd::AsFd;
    let spec = SandboxSpec::new(id, "pool", &settings.pools)?;
    let (tap, ifindex) = open_host_tap(netlink, &spec)?;
    let made = (|| -> Result<(), PrewarmError> {
        tap.set_persist(true)?;
        Ok(attach_ingress_pinned(program.as_fd(), ifindex, &settings.links_dir.join(pool_pin_name(id)))?)
    })();
    drop(tap);
    if let Err(e) = made {
        let _ = netlink.delete_link(ifindex);
        return Err(e);
    }
    Ok(ifindex)
}

/// Removes pooled and to-be-reaped taps left by an earlier process (or by
/// [`TapPool::stop`]): their pins under `links_dir` and, unless a sandbox
/// owns it, the tap.
pub fn dismantle_pooled(netlink: &Netlink, links_dir: &Path, owned_taps: &BTreeSet<String>) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(links_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("pool-").or_else(|| name.strip_prefix("reap-")).and_then(|i| i.parse::<u32>().ok()) else {
            continue;
        };
        let _ = std::fs::remove_file(entry.path());
        let tap = crate::sandbox::tap_name(id);
        if !owned_taps.contains(&tap) {
            if let Ok(ifindex) = netlink.link_index(&tap) {
                let _ = netlink.delete_link(ifindex);
            }
        }
        removed += 1;
    }
    removed + remove_orphan_taps(netlink, owned_taps)
}

/// Taps named `sbx-<id>` carrying our gateway MAC for that id (so ours,
/// made by a worker that died between creating and pinning), owned by no
/// sandbox.
fn remove_orphan_taps(netlink: &Netlink, owned_taps: &BTreeSet<String>) -> usize {
    let mut removed = 0;
    for (index, name) in interfaces() {
        let Some(id) = name.strip_prefix("sbx-").and_then(|i| i.parse::<u32>().ok()) else { continue };
        if owned_taps.contains(&name) {
            continue;
        }
        let b = id.to_be_bytes();
        let ours = [0x02, 0x5a, b[0], b[1], b[2], b[3]];
        if netlink.link_mac(index).is_ok_and(|mac| mac == ours) && netlink.delete_link(index).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// (ifindex, name) of every interface in our network namespace.
fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zeroed entry,
    // valid until if_freenameindex, which we call once after copying.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(((*p).if_index, std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned()));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_collide() {
        let pool = TapPool::new([1, 3], 10);
        {
            let mut inner = pool.lock();
            inner.ready.insert(2, ReadyTap { ifindex: 102, ca: None });
            inner.in_progress.insert(4);
        }
        assert_eq!(pool.allocate(), Some(5));
        let taken = pool.take().unwrap();
        assert_eq!((taken.id, taken.ifindex), (2, 102));
        assert!(pool.take().is_none());
        assert_eq!(pool.allocate(), Some(6));
        pool.release(1);
        assert_eq!(pool.allocate(), Some(1));
        let full = TapPool::new(1..10, 10);
        assert_eq!(full.allocate(), None);
    }

    #[test]
    fn a_pre_made_ca_goes_to_one_sandbox_only() {
        let pool = TapPool::new([], 10);
        for id in [1, 2] {
            pool.lock().ready.insert(id, ReadyTap { ifindex: 100 + id, ca: Some(PreparedCa::generate().unwrap()) });
        }
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert!(pool.take().is_none());
        let ca = |t: TakenTap| crate::credentials::ca::SandboxCa::from_prepared(t.ca.unwrap()).unwrap().cert_pem;
        // Two taps, two keys: two different CAs (the key moved out of the
        // pool with its tap; nothing kept a copy to hand out again).
        assert_ne!(ca(a), ca(b));
        assert!(pool.lock().ready.is_empty());
    }
}
