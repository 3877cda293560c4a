//! The reaper: deleted sandboxes' taps are unregistered (and their flows
//! purged, their ids freed) on a thread of their own, after the delete is
//! answered; until then each tap stays fail-closed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use sbx_vmm::Netlink;

use crate::datapath::Datapath;
use crate::sandbox::ifindex_of;
use crate::sandbox::tap_pool::TapPool;

use super::DaemonError;

/// A deleted sandbox's tap, to unregister after the delete is answered.
pub(super) struct ReapJob {
    pub id: u32,
    pub tap: String,
    pub ifindex: u32,
    /// The classifier link's pin, renamed out of the sandbox's name.
    pub pin: PathBuf,
}

pub(super) struct Reaper {
    jobs: Sender<ReapJob>,
    pool: TapPool,
    /// Taps handed over and not yet gone.
    in_flight: Arc<AtomicUsize>,
    /// What the reaper could not remove (for `status`).
    failures: Arc<Mutex<Vec<String>>>,
}

impl Reaper {
    /// Starts the thread: it unregisters the taps of each batch of jobs,
    /// purges their flows (one walk of the flow tables per batch) and frees
    /// their ids in `pool`.
    pub fn start(pool: TapPool, bpf_dir: PathBuf) -> Result<Reaper, DaemonError> {
        let (jobs, rx) = std::sync::mpsc::channel::<ReapJob>();
        let netlink = Netlink::new()?;
        let reaper = Reaper { jobs, pool: pool.clone(), in_flight: Arc::default(), failures: Arc::default() };
        let (in_flight, failures) = (reaper.in_flight.clone(), reaper.failures.clone());
        std::thread::Builder::new()
            .name("tap-reaper".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    jobs.extend(rx.try_iter());
                    let ids: BTreeSet<u32> = jobs.iter().map(|j| j.id).collect();
                    let count = jobs.len();
                    for job in jobs {
                        let left = unregister(&netlink, job);
                        if !left.is_empty() {
                            failures.lock().unwrap_or_else(|p| p.into_inner()).extend(left);
                        }
                    }
                    purge_flows(&bpf_dir, &ids);
                    for id in ids {
                        pool.release(id);
                    }
                    in_flight.fetch_sub(count, Ordering::SeqCst);
                }
            })
            .map_err(|e| DaemonError::Io { path: "tap reaper thread".into(), source: e })?;
        Ok(reaper)
    }

    /// Hands `job` to the thread; if it is gone, does the job here with
    /// `netlink` and returns what is left.
    pub fn reap(&self, job: ReapJob, netlink: &Netlink, bpf_dir: &Path) -> Vec<String> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let Err(unsent) = self.jobs.send(job) else { return Vec::new() };
        let job = unsent.0;
        let id = job.id;
        let left = unregister(netlink, job);
        purge_flows(bpf_dir, &BTreeSet::from([id]));
        self.pool.release(id);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        left
    }

    /// Taps handed over and not yet gone.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Deleted sandboxes' taps and pins that could not be removed.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Deletes the tap (which detaches its classifier), then drops the link's
/// pin; returns what is left.
fn unregister(netlink: &Netlink, job: ReapJob) -> Vec<String> {
    let mut left = Vec::new();
    if ifindex_of(&job.tap) == Some(job.ifindex) {
        if let Err(e) = netlink.delete_link(job.ifindex) {
            left.push(format!("tap {} ({e})", job.tap));
        }
    }
    if let Err(e) = Datapath::unpin_link(&job.pin) {
        left.push(e.to_string());
    }
    if ifindex_of(&job.tap) == Some(job.ifindex) && left.is_empty() {
        left.push(format!("tap {}", job.tap));
    }
    for l in &left {
        tracing::error!(tap = %job.tap, "deleted sandbox's {l} is left");
    }
    left
}

/// Forgets the flows of sandbox ids about to be reused.
pub(super) fn purge_flows(bpf_dir: &Path, ids: &BTreeSet<u32>) {
    match crate::datapath::PinnedFlows::open(bpf_dir) {
        Ok(mut flows) => {
            let removed = flows.purge(ids);
            tracing::debug!(?ids, removed, "flows of deleted sandboxes purged");
        }
        Err(e) => tracing::warn!("purging flows: {e}"),
    }
}
