//! What the daemon persists in its state dir so a restarted daemon can
//! re-adopt everything: the sandboxes and the policy text each one is
//! enforcing (the kernel holds the compiled entries; to replace them without
//! a gap the daemon must know exactly which entries they are).

use std::collections::BTreeMap;
use std::path::Path;

use crate::util::fs::write_atomic;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
}

/// The daemon's state, persisted under the state dir as one small file per
/// sandbox (`sandboxes/NAME.json`), one per policy text in force
/// (`policy-texts/HASH.json`) and `meta.json`: a create or delete writes
/// one small file, whatever the number of sandboxes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Next trie key prefix to hand out (never reused while the maps live).
    pub next_policy_id: u32,
    /// Increments on every successful policy change.
    pub policy_generation: u64,
    pub sandboxes: BTreeMap<String, SandboxRecord>,
    /// Policy texts in force, by content hash (shared by sandboxes).
    pub policy_texts: BTreeMap<String, PolicyText>,
    /// Policy ids below this are persisted as possibly used: a restart
    /// continues from here, so an id whose entries may still be in the maps
    /// (a crash mid-switch) is never handed out again. Raised in blocks.
    policy_id_high_water: u32,
    saved: Saved,
}

/// What the files on disk say (to write only what changed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Saved {
    records: BTreeMap<String, SandboxRecord>,
    texts: std::collections::BTreeSet<String>,
    meta: Option<Meta>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    policy_id_high_water: u32,
    policy_generation: u64,
}

/// Policy ids reserved per meta write.
const POLICY_ID_BLOCK: u32 = 1024;

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
    /// The VMM process of the sandbox's microVM (`--vm`).
    #[serde(default)]
    pub vm_pid: Option<u32>,
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
        if self.next_policy_id >= self.policy_id_high_water || self.next_policy_id < id {
            self.policy_id_high_water = self.next_policy_id.saturating_add(POLICY_ID_BLOCK);
        }
        id
    }

    pub fn load(dir: &Path) -> Result<State, StateError> {
        let mut state = State::default();
        if let Some(meta) = read_json::<Meta>(&dir.join("meta.json"))? {
            state.policy_id_high_water = meta.policy_id_high_water;
            state.next_policy_id = meta.policy_id_high_water.max(1);
            state.policy_generation = meta.policy_generation;
            state.saved.meta = Some(meta);
        }
        for path in json_files(&dir.join("sandboxes"))? {
            if let Some(record) = read_json::<SandboxRecord>(&path)? {
                state.saved.records.insert(record.name.clone(), record.clone());
                state.sandboxes.insert(record.name.clone(), record);
            }
        }
        for path in json_files(&dir.join("policy-texts"))? {
            let hash = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            if let Some(text) = read_json::<PolicyText>(&path)? {
                state.saved.texts.insert(hash.clone());
                state.policy_texts.insert(hash, text);
            }
        }
        Ok(state)
    }

    /// Writes what changed since the last load or save (each file atomically:
    /// temporary file, rename) and removes what went away.
    ///
    /// No fsync: the state must survive the daemon (a crash, kill -9, an
    /// upgrade), which the page cache guarantees; it need not survive the
    /// host, because taps, pins and maps do not either.
    pub fn save(&mut self, dir: &Path) -> Result<(), StateError> {
        self.save_meta(dir)?;
        let sandboxes_dir = dir.join("sandboxes");
        for (name, record) in &self.sandboxes {
            if self.saved.records.get(name) != Some(record) {
                write_json(&sandboxes_dir.join(format!("{name}.json")), record)?;
                self.saved.records.insert(name.clone(), record.clone());
            }
        }
        let gone: Vec<String> = self.saved.records.keys().filter(|n| !self.sandboxes.contains_key(*n)).cloned().collect();
        for name in gone {
            remove(&sandboxes_dir.join(format!("{name}.json")))?;
            self.saved.records.remove(&name);
        }
        self.save_texts(dir)
    }

    /// What [`State::save`] writes after a change to one sandbox (created,
    /// deleted, its VM started): its record or its removal, the policy
    /// texts and the meta file — without comparing every other sandbox's
    /// record (two walks of all sandboxes, ~0.5 ms at 1000, on every
    /// create). Every other change is saved by `save` where it is made.
    pub fn save_sandbox(&mut self, dir: &Path, name: &str) -> Result<(), StateError> {
        self.save_meta(dir)?;
        let path = dir.join("sandboxes").join(format!("{name}.json"));
        match self.sandboxes.get(name) {
            Some(record) => {
                if self.saved.records.get(name) != Some(record) {
                    // A new sandbox's record goes through the file its pool
                    // worker made ahead, when there is one.
                    let new = !self.saved.records.contains_key(name);
                    if !(new && write_json_through(&crate::sandbox::tap_pool::prepared_record_file(dir, record.id), &path, record)?) {
                        write_json(&path, record)?;
                    }
                    self.saved.records.insert(name.to_string(), record.clone());
                }
            }
            None => {
                if self.saved.records.contains_key(name) {
                    remove(&path)?;
                    self.saved.records.remove(name);
                }
            }
        }
        self.save_texts(dir)
    }

    fn save_meta(&mut self, dir: &Path) -> Result<(), StateError> {
        let meta = Meta { policy_id_high_water: self.policy_id_high_water, policy_generation: self.policy_generation };
        if self.saved.meta != Some(meta) {
            write_json(&dir.join("meta.json"), &meta)?;
            self.saved.meta = Some(meta);
        }
        Ok(())
    }

    /// Policy texts: a few, shared by many sandboxes.
    fn save_texts(&mut self, dir: &Path) -> Result<(), StateError> {
        let texts_dir = dir.join("policy-texts");
        for (hash, text) in &self.policy_texts {
            if !self.saved.texts.contains(hash) {
                write_json(&texts_dir.join(format!("{hash}.json")), text)?;
                self.saved.texts.insert(hash.clone());
            }
        }
        let gone: Vec<String> = self.saved.texts.iter().filter(|h| !self.policy_texts.contains_key(*h)).cloned().collect();
        for hash in gone {
            remove(&texts_dir.join(format!("{hash}.json")))?;
            self.saved.texts.remove(&hash);
        }
        Ok(())
    }

    /// Removes every file `save` writes (`daemon --cleanup`).
    pub fn remove_files(dir: &Path) -> Result<(), StateError> {
        for sub in ["sandboxes", "policy-texts"] {
            let path = dir.join(sub);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StateError::Io { path: path.display().to_string(), source }),
            }
        }
        remove(&dir.join("meta.json"))
    }
}

fn json_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, StateError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(StateError::Io { path: dir.display().to_string(), source }),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let p = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| StateError::Corrupt { path: p, reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io { path: p, source }),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let json = serde_json::to_vec(value).expect("state serializes");
    write_atomic(path, &json).map_err(|source| StateError::Io { path: path.display().to_string(), source })
}

fn write_json_through<T: Serialize>(spare: &Path, path: &Path, value: &T) -> Result<bool, StateError> {
    let json = serde_json::to_vec(value).expect("state serializes");
    crate::util::fs::write_atomic_through(spare, path, &json).map_err(|source| StateError::Io { path: path.display().to_string(), source })
}

fn remove(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io { path: path.display().to_string(), source }),
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
            vm_pid: None,
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
    fn a_new_record_goes_through_the_file_made_ahead_for_its_tap() {
        use crate::sandbox::tap_pool::prepared_record_file;
        let dir = std::env::temp_dir().join(format!("sbx-state-spare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sandboxes")).unwrap();
        let spare = prepared_record_file(&dir, 5);
        std::fs::write(&spare, "").unwrap();
        std::fs::write(prepared_record_file(&dir, 9), "").unwrap();
        let mut s = State::default();
        s.policy_texts.insert("h".into(), PolicyText { source: "x".into(), text: "t".into() });
        s.sandboxes.insert("a".into(), record("a", 5, "h"));
        s.save_sandbox(&dir, "a").unwrap();
        assert!(!spare.exists(), "the spare became the record");
        // Without a spare (an adopted tap, a pool that could not make one).
        s.sandboxes.insert("b".into(), record("b", 6, "h"));
        s.save_sandbox(&dir, "b").unwrap();
        // A spare is never read as a record.
        assert_eq!(State::load(&dir).unwrap().sandboxes, s.sandboxes);
        // A changed record is written the usual way, spare or not.
        std::fs::write(&spare, "").unwrap();
        s.sandboxes.get_mut("a").unwrap().vm_pid = Some(7);
        s.save_sandbox(&dir, "a").unwrap();
        assert!(spare.exists());
        assert_eq!(State::load(&dir).unwrap().sandboxes, s.sandboxes);
        assert_eq!(crate::sandbox::tap_pool::remove_prepared(&dir, &dir.join("ca")), 2);
        assert_eq!(State::load(&dir).unwrap().sandboxes, s.sandboxes);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trips_through_disk_and_never_reuses_policy_ids() {
        let dir = std::env::temp_dir().join(format!("sbx-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = State::default();
        s.sandboxes.insert("a".into(), record("a", 1, "h"));
        s.sandboxes.insert("b".into(), record("b", 2, "h"));
        s.policy_texts.insert("h".into(), PolicyText { source: "x".into(), text: "t".into() });
        let used = s.take_policy_id();
        s.save(&dir).unwrap();
        let loaded = State::load(&dir).unwrap();
        assert_eq!(loaded.sandboxes, s.sandboxes);
        assert_eq!(loaded.policy_texts, s.policy_texts);
        // A restart continues above every id that may have been handed out.
        let mut loaded = loaded;
        assert!(loaded.take_policy_id() > used);
        s.sandboxes.remove("a");
        s.prune_texts();
        s.save(&dir).unwrap();
        assert!(!dir.join("sandboxes/a.json").exists() && dir.join("sandboxes/b.json").exists());
        std::fs::write(dir.join("sandboxes/b.json"), "{not json").unwrap();
        assert!(matches!(State::load(&dir), Err(StateError::Corrupt { .. })));
        State::remove_files(&dir).unwrap();
        assert_eq!(State::load(&dir).unwrap(), State::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn saving_one_sandbox_writes_what_a_full_save_would() {
        let dir = std::env::temp_dir().join(format!("sbx-state-one-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = State::default();
        s.sandboxes.insert("a".into(), record("a", 1, "h"));
        s.policy_texts.insert("h".into(), PolicyText { source: "x".into(), text: "t".into() });
        s.save(&dir).unwrap();
        // Created: its record, a new text, a new meta (policy ids).
        s.take_policy_id();
        s.sandboxes.insert("b".into(), record("b", 2, "h2"));
        s.policy_texts.insert("h2".into(), PolicyText { source: "y".into(), text: "u".into() });
        s.save_sandbox(&dir, "b").unwrap();
        assert_eq!(State::load(&dir).unwrap().sandboxes, s.sandboxes);
        assert_eq!(State::load(&dir).unwrap().policy_texts, s.policy_texts);
        let mut full = s.clone();
        full.save(&dir).unwrap();
        assert_eq!(full.saved, s.saved, "nothing was left for a full save");
        // Deleted: its record and its now unused text go.
        s.sandboxes.remove("a");
        s.prune_texts();
        s.save_sandbox(&dir, "a").unwrap();
        let loaded = State::load(&dir).unwrap();
        assert_eq!((loaded.sandboxes, loaded.policy_texts), (s.sandboxes.clone(), s.policy_texts.clone()));
        assert!(!dir.join("sandboxes/a.json").exists() && !dir.join("policy-texts/h.json").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
