//! The learned entries of the pinned policy tries: the /32 and /128
//! entries the DNS proxy writes for the addresses an allowed name resolved
//! to, keyed by the sandbox's policy generation.

use std::net::IpAddr;
use std::path::Path;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Map, MapData};
use sbx_net_common::{map_names, KeyV4, KeyV6, PolicyValue, SANDBOX_ID_BITS};

use super::write_failures::{FailedWrite, MapWriteFailures};
use super::{key_v4, key_v6};

#[derive(Debug, thiserror::Error)]
pub enum LearnedMapsError {
    #[error("pinned map {name}: {reason}")]
    Map { name: &'static str, reason: String },
    #[error("writing {map}: {source}")]
    Write { map: &'static str, source: aya::maps::MapError },
}

impl FailedWrite for LearnedMapsError {
    fn map(&self) -> Option<&'static str> {
        match self {
            LearnedMapsError::Map { name, .. } => Some(name),
            LearnedMapsError::Write { map, .. } => Some(map),
        }
    }

    fn entry_was_absent(&self) -> bool {
        matches!(self, LearnedMapsError::Write { source, .. } if source.entry_was_absent())
    }
}

/// The pinned policy tries, opened by this component.
pub struct LearnedMaps {
    v4: LpmTrie<MapData, KeyV4, PolicyValue>,
    v6: LpmTrie<MapData, KeyV6, PolicyValue>,
    /// Where writes nobody acts on failing are counted (the datapath's).
    write_failures: MapWriteFailures,
}

impl LearnedMaps {
    pub fn open(pin_dir: &Path, write_failures: MapWriteFailures) -> Result<LearnedMaps, LearnedMapsError> {
        let open = |name: &'static str| -> Result<MapData, LearnedMapsError> {
            MapData::from_pin(pin_dir.join(name)).map_err(|e| LearnedMapsError::Map { name, reason: e.to_string() })
        };
        let v4 = LpmTrie::try_from(Map::LpmTrie(open(map_names::POLICY_V4)?))
            .map_err(|e| LearnedMapsError::Map { name: map_names::POLICY_V4, reason: e.to_string() })?;
        let v6 = LpmTrie::try_from(Map::LpmTrie(open(map_names::POLICY_V6)?))
            .map_err(|e| LearnedMapsError::Map { name: map_names::POLICY_V6, reason: e.to_string() })?;
        Ok(LearnedMaps { v4, v6, write_failures })
    }

    pub fn insert(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue) -> Result<(), LearnedMapsError> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(&key_v4(policy_id, a.octets(), 32), value, 0),
            IpAddr::V6(a) => self.v6.insert(&key_v6(policy_id, a.octets(), 128), value, 0),
        }
        .map_err(|source| LearnedMapsError::Write { map: trie_of(ip), source })
    }

    /// The entry the trie holds for exactly this address (the longest match
    /// of a full-length key is the exact entry when there is one).
    pub fn get(&self, policy_id: u32, ip: IpAddr) -> Option<PolicyValue> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&key_v4(policy_id, a.octets(), 32), 0).ok(),
            IpAddr::V6(a) => self.v6.get(&key_v6(policy_id, a.octets(), 128), 0).ok(),
        }
    }

    /// [`LearnedMaps::insert`] for callers that carry on past a failure
    /// (putting a policy's own entry back): the failure is counted.
    pub fn insert_or_count_failure(&mut self, policy_id: u32, ip: IpAddr, value: &PolicyValue) {
        let result = self.insert(policy_id, ip, value);
        self.write_failures.count(trie_of(ip), result);
    }

    /// Every full-length entry (/32, /128) that carries a learned overlay,
    /// with its policy id: one walk of each trie.
    pub fn learned_entries(&self) -> Vec<(u32, IpAddr, PolicyValue)> {
        let mut out = Vec::new();
        for item in self.v4.iter().flatten() {
            let (key, value) = item;
            let data = key.data();
            if key.prefix_len() == SANDBOX_ID_BITS + 32 && value.learned_until_ns != 0 {
                let policy_id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                out.push((policy_id, IpAddr::from([data[4], data[5], data[6], data[7]]), value));
            }
        }
        for item in self.v6.iter().flatten() {
            let (key, value) = item;
            let data = key.data();
            if key.prefix_len() == SANDBOX_ID_BITS + 128 && value.learned_until_ns != 0 {
                let policy_id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let mut addr = [0u8; 16];
                addr.copy_from_slice(&data[4..20]);
                out.push((policy_id, IpAddr::from(addr), value));
            }
        }
        out
    }

    /// Removes the exact entry; an absent one is fine, a failure is counted.
    pub fn remove(&mut self, policy_id: u32, ip: IpAddr) {
        let result = match ip {
            IpAddr::V4(a) => self.v4.remove(&key_v4(policy_id, a.octets(), 32)),
            IpAddr::V6(a) => self.v6.remove(&key_v6(policy_id, a.octets(), 128)),
        };
        self.write_failures.count(trie_of(ip), result);
    }
}

/// The policy trie holding `ip`'s family.
fn trie_of(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => map_names::POLICY_V4,
        IpAddr::V6(_) => map_names::POLICY_V6,
    }
}

