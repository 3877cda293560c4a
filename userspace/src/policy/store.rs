//! The set of named policies the daemon knows: the embedded default, the
//! files of the policy dir, and policies applied with `policy apply` (kept in
//! the state dir), later ones overriding earlier ones by name.

use std::collections::BTreeMap;
use std::path::Path;

use crate::policy::{Policy, PolicyError, DEFAULT_POLICY_SOURCE, DEFAULT_POLICY_TOML};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    pub policy: Policy,
    /// The exact text (kept so a restarted daemon can tell what changed).
    pub text: String,
    pub source: String,
}

impl PolicyEntry {
    pub fn parse(source: &str, text: &str) -> Result<PolicyEntry, PolicyError> {
        Ok(PolicyEntry { policy: Policy::parse(source, text)?, text: text.to_string(), source: source.to_string() })
    }
}

pub type PolicySet = BTreeMap<String, PolicyEntry>;

fn embedded() -> PolicyEntry {
    PolicyEntry::parse(DEFAULT_POLICY_SOURCE, DEFAULT_POLICY_TOML).expect("the embedded default policy is valid (unit-tested)")
}

/// Reads `*.toml` in `dir` (sorted), rejecting two files that name the same
/// policy. A missing directory is an error only if `required`.
fn read_dir(dir: &Path, required: bool) -> Result<Vec<PolicyEntry>, PolicyError> {
    let file = dir.display().to_string();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Vec::new()),
        Err(e) => return Err(PolicyError { file, line: 0, reason: format!("cannot read policy directory: {e}") }),
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    paths.sort();
    let mut out: Vec<PolicyEntry> = Vec::new();
    for path in paths {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| PolicyError { file: source.clone(), line: 0, reason: format!("cannot read: {e}") })?;
        let entry = PolicyEntry::parse(&source, &text)?;
        if let Some(other) = out.iter().find(|o| o.policy.name == entry.policy.name) {
            return Err(PolicyError {
                file: source,
                line: 1,
                reason: format!("policy {:?} is also defined in {}", entry.policy.name, other.source),
            });
        }
        out.push(entry);
    }
    Ok(out)
}

/// Embedded default < policy dir < applied, by name. Any invalid file makes
/// the whole load fail (the caller keeps what it had).
pub fn load_policies(policy_dir: Option<&Path>, applied_dir: &Path) -> Result<PolicySet, PolicyError> {
    let mut set = PolicySet::new();
    let default = embedded();
    set.insert(default.policy.name.clone(), default);
    if let Some(dir) = policy_dir {
        for entry in read_dir(dir, true)? {
            set.insert(entry.policy.name.clone(), entry);
        }
    }
    for entry in read_dir(applied_dir, false)? {
        set.insert(entry.policy.name.clone(), entry);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sbx-policy-store-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const A: &str = "name = \"a\"\n[network]\nallow = [\"192.0.2.0/24\"]\n";

    #[test]
    fn layering_and_errors() {
        let dir = tmpdir("dir");
        let applied = tmpdir("applied");
        std::fs::write(dir.join("a.toml"), A).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let set = load_policies(Some(&dir), &applied).unwrap();
        assert_eq!(set.keys().collect::<Vec<_>>(), vec!["a", "default"]);
        // An applied policy overrides the directory's.
        std::fs::write(applied.join("a.toml"), A.replace("192.0.2.0/24", "198.51.100.0/24")).unwrap();
        let set = load_policies(Some(&dir), &applied).unwrap();
        assert!(set["a"].text.contains("198.51.100.0/24"));
        // Two files naming one policy.
        std::fs::write(dir.join("b.toml"), A).unwrap();
        let e = load_policies(Some(&dir), &applied).unwrap_err().to_string();
        assert!(e.contains("also defined in") && e.contains("a.toml"), "{e}");
        std::fs::remove_file(dir.join("b.toml")).unwrap();
        // A malformed file fails the load with its file and line.
        std::fs::write(dir.join("c.toml"), "name = \"c\"\n[network]\nallow = [\"10.0.0.0/33\"]\n").unwrap();
        let e = load_policies(Some(&dir), &applied).unwrap_err();
        assert!(e.file.ends_with("c.toml") && e.line == 3, "{e}");
        assert!(load_policies(Some(&dir.join("missing")), &applied).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&applied).unwrap();
    }
}
