//! Map writes whose failure the caller cannot act on — undoing a partial
//! write, removing entries that may already be gone, putting a policy's own
//! entry back when a learned one expires — are counted by map instead of
//! being dropped: an entry left behind keeps deciding traffic, so it must
//! show (`sbx_net_map_write_failures_total{map}`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// The one label: the map's name, as pinned in the bpf dir.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: &'static str,
}

/// A failed write or remove, as far as counting it goes.
pub trait FailedWrite: std::fmt::Display {
    /// The map the error names, when it names one.
    fn map(&self) -> Option<&'static str> {
        None
    }

    /// Whether the entry was not there: what a remove wanted, not a failure.
    fn entry_was_absent(&self) -> bool {
        false
    }
}

impl FailedWrite for aya::maps::MapError {
    fn entry_was_absent(&self) -> bool {
        match self {
            aya::maps::MapError::KeyNotFound => true,
            // aya reports a delete of a missing key as the syscall's ENOENT.
            aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
            _ => false,
        }
    }
}


/// Counts failed map writes by map. Clones share the counts: the datapath,
/// the learned-address maps and `/metrics` hold the same family.
#[derive(Clone, Debug, Default)]
pub struct MapWriteFailures(Family<MapLabel, Counter>);

impl MapWriteFailures {
    /// Counts `result` against the map its error names, else `map`, when
    /// it failed (a remove of an absent entry did not). Returns whether it
    /// counted.
    pub fn count<E: FailedWrite>(&self, map: &'static str, result: Result<(), E>) -> bool {
        match result {
            Ok(()) => false,
            Err(e) if e.entry_was_absent() => false,
            Err(e) => {
                let map = e.map().unwrap_or(map);
                log::debug!("writing map {map} failed: {e}");
                self.0.get_or_create(&MapLabel { map }).inc();
                true
            }
        }
    }

    /// Failures counted against `map` so far.
    pub fn get(&self, map: &'static str) -> u64 {
        self.0.get(&MapLabel { map }).map_or(0, |c| c.get())
    }

    /// The family, to register with a metrics registry.
    pub fn family(&self) -> Family<MapLabel, Counter> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya::maps::MapError;

    fn syscall(errno: i32) -> MapError {
        MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_delete_elem", io_error: std::io::Error::from_raw_os_error(errno) })
    }

    #[test]
    fn failures_are_counted_by_map_and_absent_entries_are_not_failures() {
        let failures = MapWriteFailures::default();
        let shared = failures.clone();
        assert!(!failures.count("SBX_POLICY_V4", Ok::<(), MapError>(())));
        assert!(!failures.count("SBX_POLICY_V4", Err(syscall(libc::ENOENT))), "removing an entry already gone is what was asked");
        assert!(!failures.count("SBX_POLICY_V4", Err(MapError::KeyNotFound)));
        assert!(failures.count("SBX_POLICY_V4", Err(syscall(libc::EPERM))));
        assert!(failures.count("SBX_POLICY_V6", Err(syscall(libc::ENOMEM))));
        assert!(failures.count("SBX_POLICY_V6", Err(syscall(libc::E2BIG))));
        assert_eq!((shared.get("SBX_POLICY_V4"), shared.get("SBX_POLICY_V6"), shared.get("SBX_SANDBOXES")), (1, 2, 0), "clones share the counts");
    }

    #[test]
    fn the_map_an_error_names_wins() {
        struct Named;
        impl std::fmt::Display for Named {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("map SBX_SANDBOX_SLOTS: EPERM")
            }
        }
        impl FailedWrite for Named {
            fn map(&self) -> Option<&'static str> {
                Some("SBX_SANDBOX_SLOTS")
            }
        }
        let failures = MapWriteFailures::default();
        assert!(failures.count("SBX_SANDBOXES", Err(Named)));
        assert_eq!((failures.get("SBX_SANDBOX_SLOTS"), failures.get("SBX_SANDBOXES")), (1, 0));
    }
}
