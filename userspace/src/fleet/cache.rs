//! The last good policy set of a fleet host, in its state dir: a host that
//! starts while the store is unreachable enforces it (fail closed: never
//! fewer rules than it last accepted), and resumes watching from its
//! revision.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::reconcile::Stored;
use super::FleetError;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetCache {
    /// The prefix the keys are under (a cache of another prefix is not used).
    pub prefix: String,
    pub host: String,
    pub group: Option<String>,
    /// The store revision the set was accepted at.
    pub revision: i64,
    pub good: BTreeMap<String, Stored>,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("fleet-cache.json")
}

impl FleetCache {
    /// The cache, if there is one for this prefix and host.
    pub fn load(path: &Path, prefix: &str, host: &str, group: Option<&str>) -> Result<Option<FleetCache>, FleetError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(FleetError::Read { path: path.display().to_string(), source }),
        };
        let cache: FleetCache = match serde_json::from_slice(&bytes) {
            Ok(cache) => cache,
            // Not fatal: the store has the truth, and the sandboxes keep the
            // policy texts they enforce (the state) meanwhile.
            Err(e) => {
                tracing::error!(path = %path.display(), "the fleet cache is unreadable ({e}): not used; remove it or let the next change from the store replace it");
                return Ok(None);
            }
        };
        if cache.prefix != prefix || cache.host != host || cache.group.as_deref() != group {
            tracing::warn!(path = %path.display(), "the fleet cache is for prefix {} host {} group {:?}, not this configuration: not used", cache.prefix, cache.host, cache.group);
            return Ok(None);
        }
        Ok(Some(cache))
    }

    pub fn save(&self, path: &Path) -> Result<(), FleetError> {
        let bytes = serde_json::to_vec_pretty(self).expect("the cache serializes");
        crate::util::fs::write_atomic(path, &bytes).map_err(|source| FleetError::Write { what: format!("writing {}", path.display()), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_owner_check() {
        let dir = std::env::temp_dir().join(format!("sbx-fleet-cache-{}", std::process::id()));
        let p = path(&dir);
        assert_eq!(FleetCache::load(&p, "/f", "h1", None).unwrap(), None);
        let mut cache = FleetCache { prefix: "/f".into(), host: "h1".into(), group: None, revision: 7, good: BTreeMap::new() };
        cache.good.insert("/f/policies/all/a".into(), Stored { text: "name = \"a\"\n".into(), mod_revision: 7 });
        cache.save(&p).unwrap();
        assert_eq!(FleetCache::load(&p, "/f", "h1", None).unwrap(), Some(cache));
        assert_eq!(FleetCache::load(&p, "/g", "h1", None).unwrap(), None, "another prefix's cache");
        assert_eq!(FleetCache::load(&p, "/f", "h1", Some("gpu")).unwrap(), None, "another group's cache");
        std::fs::write(&p, "{").unwrap();
        assert_eq!(FleetCache::load(&p, "/f", "h1", None).unwrap(), None, "a corrupt cache is not used, and does not stop the start");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
