//! What the daemon persists in its state dir so a restarted daemon can
//! re-adopt everything: the sandboxes and the policy text each one is
//! enforcing (the kernel holds the compiled entries; to replace them without
//! a gap the daemon must know exactly which entries they are).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Next trie key prefix to hand out (never reused while the maps live).
    pub next_policy_id: u32,
    /// Increments on every successful policy change.
    pub policy_generation: u64,
    pub sandboxes: BTreeMap<String, SandboxRecord>,
    /// Policy texts in force, by content hash (shared by sandboxes).
    pub policy_texts: BTreeMap<String, PolicyText>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyText {
    pub source: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: u32,
    pub name: String,
    pub policy: String,
    pub tap: String,
    /// The tap belongs to an external VMM: never created or deleted by us.
    pub adopted_tap: bool,
    pub netns_guest: bool,
    /// The frame pump process of a netns guest.
    pub pump_pid: Option<u32>,
    /// Trie key prefix of the entries in force.
    pub policy_id: u32,
    /// Key into `State::policy_texts` of the policy text in force.
    pub policy_hash: String,
    pub policy_generation: u64,
    pub created_unix: u64,
}

/// A stable content hash (FNV-1a 64): only used to share identical texts.
pub fn text_hash(source: &str, text: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in source.bytes().chain([0u8]).chain(text.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

impl State {
    /// Drops policy texts no sandbox refers to.
    pub fn prune_texts(&mut self) {
        let used: std::collections::BTreeSet<&String> = self.sandboxes.values().map(|s| &s.policy_hash).collect();
        self.policy_texts.retain(|k, _| used.contains(k));
    }

    /// A fresh trie key prefix.
    pub fn take_policy_id(&mut self) -> u32 {
        if self.next_policy_id == 0 {
            self.next_policy_id = 1;
        }
        let id = self.next_policy_id;
        self.next_policy_id = self.next_policy_id.wrapping_add(1).max(1);
        id
    }

    pub fn load(path: &Path) -> Result<State, StateError> {
        let p = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| StateError::Corrupt { path: p, reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StateError::Io { path: p, source }),
        }
    }

    /// Writes atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let p = path.display().to_string();
        let io = |source| StateError::Io { path: p.clone(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec(self).expect("state serializes");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, id: u32, hash: &str) -> SandboxRecord {
        SandboxRecord {
            id,
            name: name.into(),
            policy: "p".into(),
            tap: format!("sbx-{id}"),
            adopted_tap: false,
            netns_guest: false,
            pump_pid: None,
            policy_id: id,
            policy_hash: hash.into(),
            policy_generation: 1,
            created_unix: 0,
        }
    }

    #[test]
    fn ids_and_texts() {
        let mut s = State::default();
        s.sandboxes.insert("a".into(), record("a", 1, "h1"));
        s.sandboxes.insert("c".into(), record("c", 3, "h1"));
        assert_eq!(s.take_policy_id(), 1);
        assert_eq!(s.take_policy_id(), 2);
        s.policy_texts.insert("h1".into(), PolicyText { source: "x".into(), text: "t".into() });
        s.policy_texts.insert("h2".into(), PolicyText { source: "y".into(), text: "u".into() });
        s.prune_texts();
        assert_eq!(s.policy_texts.keys().collect::<Vec<_>>(), vec!["h1"]);
        assert_ne!(text_hash("a", "b"), text_hash("ab", ""));
    }

    #[test]
    fn round_trips_through_disk() {
        let dir = std::env::temp_dir().join(format!("sbx-state-test-{}", std::process::id()));
        let path = dir.join("state.json");
        let mut s = State::default();
        s.sandboxes.insert("a".into(), record("a", 1, "h"));
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), s);
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(State::load(&path), Err(StateError::Corrupt { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(State::load(&path).unwrap(), State::default());
    }
}
