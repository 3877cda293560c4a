//! Datapath events into flow records: the ring-buffer reader, naming each
//! event's sandbox, rule and destination names.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::datapath::events::{event_addrs, flow_key};
use crate::sandbox::route::{Route, Routes};
use crate::util::clock::{boot_time_ns, unix_now_ns};

use super::hub::FlowHub;
use super::record::from_event;

/// The names DNS taught a sandbox for a destination. Implemented by the
/// DNS proxy's learned store (a layer above this one).
pub trait DestinationNames {
    /// For each (sandbox, destination), its names; empty when unknown.
    fn names(&self, queries: &[(Option<&str>, Option<IpAddr>)]) -> impl Future<Output = Vec<Vec<String>>> + Send;
}

/// Reads the pinned ring buffer for as long as the daemon runs and
/// publishes each event with its sandbox, rule text and known names.
pub async fn read_datapath_events(
    bpf_dir: PathBuf,
    hub: Arc<FlowHub>,
    routes: Routes,
    names: impl DestinationNames,
) {
    let reader = match crate::datapath::EventReader::open_pinned(&bpf_dir) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("flow events unavailable: {e}");
            return;
        }
    };
    let counters = crate::datapath::PinnedCounters::open(&bpf_dir).map_err(|e| tracing::warn!("lost-event counter unavailable: {e}")).ok();
    // SAFETY: the ring buffer's fd is owned by `reader`, which the AsyncFd
    // owns: it stays open and the same for the AsyncFd's whole life.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(reader) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("flow events: polling the ring buffer: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::error!("flow events: polling the ring buffer failed, datapath records stop: {e}");
                        return;
                    }
                };
                let events = guard.get_inner_mut().drain();
                guard.clear_ready();
                if !events.is_empty() {
                    publish_events(&events, &hub, &routes, &names).await;
                }
            }
            _ = tick.tick() => {}
        }
        if let Some(c) = &counters {
            hub.ring_lost.store(c.events_lost(), Ordering::Relaxed);
        }
    }
}

async fn publish_events(
    events: &[sbx_net_common::FlowEvent],
    hub: &FlowHub,
    routes: &Routes,
    names: &impl DestinationNames,
) {
    // The classifier stamps boot time; one offset per batch maps it to the wall clock.
    let offset = unix_now_ns().saturating_sub(boot_time_ns());
    let by_id: std::collections::HashMap<u32, Arc<Route>> = {
        let table = routes.read().unwrap_or_else(|p| p.into_inner());
        table.values().map(|r| (r.id, r.clone())).collect()
    };
    let queries: Vec<(Option<&str>, Option<IpAddr>)> =
        events.iter().map(|ev| (by_id.get(&ev.sandbox_id).map(|r| r.sandbox.as_str()), event_addrs(ev).1)).collect();
    let names = names.names(&queries).await;
    for (ev, domains) in events.iter().zip(names) {
        let route = by_id.get(&ev.sandbox_id);
        let record = from_event(
            ev,
            route.map_or("", |r| r.sandbox.as_str()),
            route.map(|r| r.policy.as_ref()),
            domains,
            ev.timestamp_ns.saturating_add(offset),
        );
        let tracked = ev.kind != sbx_net_common::event_kind::DROP;
        hub.publish_flow(record, tracked.then(|| flow_key(ev)));
    }
}

