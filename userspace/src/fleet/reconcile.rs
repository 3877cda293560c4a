//! From the keys in etcd to the policies a host enforces. Pure: the watcher
//! feeds it what the store says, asks for a [`Plan`], hands the plan's
//! policies to its sink (the daemon, or a light host's compiler) and tells
//! it whether they were accepted.
//!
//! Every key is validated on its own (parse and compile, as `policy
//! check`); an invalid key is rejected with its reason and the host keeps
//! that key's last good text, while the other keys' changes go ahead. A
//! change the sink refuses (a sandbox's policy would fail to compile, or a
//! policy in use would vanish) is rejected the same way for the keys of the
//! policy concerned.
//!
//! Precedence, per policy name: the narrowest scope present is the policy
//! (host > group > all); every wider scope's `[network] deny` entries are
//! added to it and a wider `default = "deny"` is kept, so a deny from a
//! wider scope cannot be lifted by a narrower allow.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::policy::store::PolicyEntry;
use crate::policy::PolicyError;

use super::layout::{HostIdentity, Layout, Scope};

/// A key's value as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub text: String,
    pub mod_revision: i64,
}

/// A key the host refused, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub key: String,
    pub mod_revision: i64,
    pub reason: String,
}

/// Why the sink refused a plan: the policy concerned when it is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub policy: Option<String>,
    pub reason: String,
}

/// What the host should enforce now.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Per key, the text to be in force (valid keys at their store value,
    /// rejected ones at their last good one).
    pub candidate: BTreeMap<String, Stored>,
    /// The effective policy of every name, merged across scopes.
    pub entries: Vec<PolicyEntry>,
    /// Keys whose text in force changes (added, changed or removed).
    pub changed: Vec<String>,
    pub rejections: Vec<Rejection>,
}

/// A host's view of the fleet's policies.
#[derive(Clone, Debug)]
pub struct FleetView {
    pub layout: Layout,
    pub host: HostIdentity,
    /// The store's keys that are for this host.
    pub store: BTreeMap<String, Stored>,
    /// The last accepted text of each key (what is in force).
    pub good: BTreeMap<String, Stored>,
    /// Keys the sink refused, at the revision it refused them.
    refused: BTreeMap<String, Rejection>,
    /// The current rejections (validation and refusals), by key.
    pub rejected: BTreeMap<String, Rejection>,
    /// The effective entries last accepted, by name (a name whose last good
    /// keys no longer merge keeps its entry rather than vanish).
    accepted: BTreeMap<String, PolicyEntry>,
}

impl FleetView {
    pub fn new(layout: Layout, host: HostIdentity, good: BTreeMap<String, Stored>) -> FleetView {
        let mut view = FleetView { layout, host, store: good.clone(), good, refused: BTreeMap::new(), rejected: BTreeMap::new(), accepted: BTreeMap::new() };
        view.accepted = view.plan().entries.into_iter().map(|e| (e.policy.name.clone(), e)).collect();
        view
    }

    /// Forgets what the sink refused, so the next plan offers it again (its
    /// cause may be gone: a sandbox deleted, a local policy fixed).
    pub fn forget_refusals(&mut self) -> bool {
        let had = !self.refused.is_empty();
        self.refused.clear();
        had
    }

    /// Whether `key` is a policy key for this host.
    pub fn concerns(&self, key: &str) -> bool {
        self.layout.parse_policy_key(key).is_some_and(|(scope, _)| self.host.covered_by(&scope))
    }

    /// A put seen in the store; false when the key is not for this host.
    pub fn put(&mut self, key: &str, text: String, mod_revision: i64) -> bool {
        if !self.concerns(key) {
            return false;
        }
        self.store.insert(key.to_string(), Stored { text, mod_revision });
        true
    }

    /// A delete seen in the store; false when the key is not for this host.
    pub fn delete(&mut self, key: &str) -> bool {
        self.concerns(key) && self.store.remove(key).is_some()
    }

    /// The whole store as read at one revision (a fresh start or a resync).
    pub fn reset(&mut self, keys: impl IntoIterator<Item = (String, Stored)>) {
        self.store = keys.into_iter().filter(|(k, _)| self.concerns(k)).collect();
    }

    /// What should be in force, given the store and the last good set.
    pub fn plan(&self) -> Plan {
        let mut rejections = Vec::new();
        let mut candidate = BTreeMap::new();
        for (key, stored) in &self.store {
            if self.good.get(key) == Some(stored) {
                candidate.insert(key.clone(), stored.clone());
                continue;
            }
            let verdict = match self.refused.get(key) {
                Some(r) if r.mod_revision == stored.mod_revision => Err(r.reason.clone()),
                _ => self.validate(key, &stored.text),
            };
            match verdict {
                Ok(()) => {
                    candidate.insert(key.clone(), stored.clone());
                }
                Err(reason) => {
                    rejections.push(Rejection { key: key.clone(), mod_revision: stored.mod_revision, reason });
                    if let Some(g) = self.good.get(key) {
                        candidate.insert(key.clone(), g.clone());
                    }
                }
            }
        }
        // A removal the sink refused: the key stays at its last good text.
        for (key, good) in self.good.iter().filter(|(k, _)| !self.store.contains_key(*k)) {
            if let Some(r) = self.refused.get(key).filter(|r| r.mod_revision == good.mod_revision) {
                candidate.insert(key.clone(), good.clone());
                rejections.push(r.clone());
            }
        }
        let mut entries = Vec::new();
        for (name, keys) in self.by_name(&candidate) {
            match merge(&name, &keys, &candidate) {
                Ok(entry) => entries.push(entry),
                Err(reason) => {
                    // The combination is invalid though each key is valid:
                    // this name's keys go back to their last good texts.
                    for key in &keys {
                        if let Some(stored) = self.store.get(key).filter(|s| self.good.get(key) != Some(*s)) {
                            rejections.push(Rejection { key: key.clone(), mod_revision: stored.mod_revision, reason: reason.clone() });
                        }
                        match self.good.get(key) {
                            Some(g) => candidate.insert(key.clone(), g.clone()),
                            None => candidate.remove(key),
                        };
                    }
                    let good_keys: Vec<String> = keys.into_iter().filter(|k| candidate.contains_key(k)).collect();
                    if good_keys.is_empty() {
                        continue;
                    }
                    match merge(&name, &good_keys, &candidate) {
                        Ok(entry) => entries.push(entry),
                        // Not even the last good keys merge (a stricter
                        // build): the entry last accepted stays in force.
                        Err(reason) => match self.accepted.get(&name) {
                            Some(entry) => {
                                for key in &good_keys {
                                    let mod_revision = candidate[key].mod_revision;
                                    rejections.push(Rejection { key: key.clone(), mod_revision, reason: format!("{reason} (the policy last accepted stays)") });
                                }
                                entries.push(entry.clone());
                            }
                            None => {
                                for key in &good_keys {
                                    rejections.push(Rejection { key: key.clone(), mod_revision: candidate[key].mod_revision, reason: reason.clone() });
                                }
                            }
                        },
                    }
                }
            }
        }
        let changed = candidate
            .iter()
            .filter(|(k, v)| self.good.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .chain(self.good.keys().filter(|k| !candidate.contains_key(*k)).cloned())
            .collect();
        Plan { candidate, entries, changed, rejections }
    }

    /// The sink put `plan` in force.
    pub fn accept(&mut self, plan: Plan) {
        self.accepted = plan.entries.iter().map(|e| (e.policy.name.clone(), e.clone())).collect();
        self.good = plan.candidate;
        // A refusal lasts while the store still says what was refused: the
        // same revision of the key, or (a refused removal) still no key.
        let (store, good) = (&self.store, &self.good);
        self.refused.retain(|k, r| match store.get(k) {
            Some(s) => s.mod_revision == r.mod_revision,
            None => good.get(k).is_some_and(|g| g.mod_revision == r.mod_revision),
        });
        self.rejected = plan.rejections.into_iter().map(|r| (r.key.clone(), r)).collect();
    }

    /// The sink refused `plan`: its changed keys of the policy concerned
    /// (all of them when the sink could not say) are refused at their
    /// current revision, so the next plan leaves them out. False when no
    /// key could be blamed (the next plan would be the same).
    ///
    /// A refusal naming a policy none of the changed keys is for (a local
    /// policy that no longer compiles, say) blames nothing: the change is
    /// not the cause, and is offered again later.
    pub fn refuse(&mut self, plan: &Plan, refusal: &Refusal) -> bool {
        let mut blamed = false;
        for key in &plan.changed {
            let name = self.layout.parse_policy_key(key).map(|(_, n)| n);
            if refusal.policy.is_some() && name != refusal.policy {
                continue;
            }
            // A removed key is refused at its last good revision: the store
            // no longer has it, so the removal is what was refused.
            let mod_revision = match self.store.get(key) {
                Some(s) => s.mod_revision,
                None => self.good.get(key).map_or(0, |g| g.mod_revision),
            };
            if self.refused.get(key).is_some_and(|r| r.mod_revision == mod_revision) {
                continue;
            }
            self.refused.insert(key.clone(), Rejection { key: key.clone(), mod_revision, reason: refusal.reason.clone() });
            blamed = true;
        }
        blamed
    }

    fn validate(&self, key: &str, text: &str) -> Result<(), String> {
        let (_, name) = self.layout.parse_policy_key(key).ok_or_else(|| "not a policy key".to_string())?;
        let policy = crate::policy::Policy::parse(&source_of(key), text).map_err(|e| e.to_string())?;
        if policy.name != name {
            return Err(format!("{}:1: policy name {:?} is not its key's name {name:?}", source_of(key), policy.name));
        }
        crate::policy::compile::compile(&policy, &[]).map_err(|e| format!("{}: {e}", source_of(key)))?;
        Ok(())
    }

    /// The keys of each policy name, widest scope first.
    fn by_name(&self, keys: &BTreeMap<String, Stored>) -> BTreeMap<String, Vec<String>> {
        let mut names: BTreeMap<String, Vec<(Scope, String)>> = BTreeMap::new();
        for key in keys.keys() {
            if let Some((scope, name)) = self.layout.parse_policy_key(key) {
                names.entry(name).or_default().push((scope, key.clone()));
            }
        }
        names
            .into_iter()
            .map(|(name, mut scoped)| {
                scoped.sort();
                (name, scoped.into_iter().map(|(_, k)| k).collect())
            })
            .collect()
    }
}

/// The source a key's policy is named by in errors, `policy list` and
/// `status`.
pub fn source_of(key: &str) -> String {
    format!("etcd:{key}")
}

/// One policy name's effective entry from its keys (widest first).
/// A deny entry with an explicit mode (kept if it names one).
fn with_mode(deny: &toml::Value, mode: &str) -> toml::Value {
    match deny {
        toml::Value::String(pattern) => {
            let mut t = toml::Table::new();
            t.insert("pattern".into(), toml::Value::String(pattern.clone()));
            t.insert("mode".into(), toml::Value::String(mode.into()));
            toml::Value::Table(t)
        }
        toml::Value::Table(t) => {
            let mut t = t.clone();
            t.entry("mode").or_insert_with(|| toml::Value::String(mode.into()));
            toml::Value::Table(t)
        }
        other => other.clone(),
    }
}

/// Writes `mode` into every deny, `[[http]]` and `[[mcp]]` entry of
/// `policy` that names none (before its policy-wide mode changes).
fn pin_mode(policy: &mut toml::Table, mode: &str) {
    if let Some(toml::Value::Table(network)) = policy.get_mut("network") {
        if let Some(toml::Value::Array(denies)) = network.get_mut("deny") {
            for d in denies.iter_mut() {
                *d = with_mode(d, mode);
            }
        }
    }
    for section in ["http", "mcp"] {
        if let Some(toml::Value::Array(blocks)) = policy.get_mut(section) {
            for block in blocks.iter_mut() {
                if let toml::Value::Table(t) = block {
                    t.entry("mode").or_insert_with(|| toml::Value::String(mode.into()));
                }
            }
        }
    }
}

fn merge(name: &str, keys: &[String], texts: &BTreeMap<String, Stored>) -> Result<PolicyEntry, String> {
    let (narrowest, wider) = keys.split_last().expect("a name has a key");
    let text = &texts[narrowest].text;
    if wider.is_empty() {
        return PolicyEntry::parse(&source_of(narrowest), text).map_err(|e| e.to_string());
    }
    let parse = |key: &str| -> Result<toml::Table, String> {
        texts[key].text.parse::<toml::Table>().map_err(|e| format!("{}: {e}", source_of(key)))
    };
    let mut base = parse(narrowest)?;
    // Audit mode never lifts a wider scope's deny or default deny: when a
    // wider policy enforces, the narrow policy's own denies keep its audit
    // mode rule by rule and the merged policy (its default) enforces.
    let narrow_mode = crate::policy::Policy::parse(&source_of(narrowest), text).map_err(|e| e.to_string())?.mode;
    let mut wider_modes = Vec::new();
    for key in wider {
        wider_modes.push(crate::policy::Policy::parse(&source_of(key), &texts[key].text).map_err(|e| e.to_string())?.mode);
    }
    if narrow_mode.is_audit() && wider_modes.iter().any(|m| !m.is_audit()) {
        pin_mode(&mut base, "audit");
        base.insert("mode".into(), toml::Value::String("enforce".into()));
    }
    let network = base.entry("network").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(network) = network else {
        return Err(format!("{}: [network] is not a table", source_of(narrowest)));
    };
    for key in wider {
        // A wider policy's default is what the parser makes of it: no
        // `default` (or no `[network]`) is deny too, and is kept as such.
        let wide_policy = crate::policy::Policy::parse(&source_of(key), &texts[key].text).map_err(|e| e.to_string())?;
        if wide_policy.default == crate::policy::Action::Deny {
            network.insert("default".into(), toml::Value::String("deny".into()));
        }
        let wide = parse(key)?;
        let Some(toml::Value::Table(wide_net)) = wide.get("network") else { continue };
        if let Some(toml::Value::Array(denies)) = wide_net.get("deny") {
            let deny = network.entry("deny").or_insert_with(|| toml::Value::Array(Vec::new()));
            let toml::Value::Array(deny) = deny else {
                return Err(format!("{}: deny is not a list", source_of(narrowest)));
            };
            let wide_mode = if wide_policy.mode.is_audit() { "audit" } else { "enforce" };
            for d in denies {
                let d = with_mode(d, wide_mode);
                if !deny.contains(&d) {
                    deny.push(d);
                }
            }
        }
    }
    let merged = toml::to_string(&base).map_err(|e| format!("merging {name}: {e}"))?;
    let source = format!("{} (with the deny rules of {})", source_of(narrowest), wider.iter().map(|k| source_of(k)).collect::<Vec<_>>().join(", "));
    PolicyEntry::parse(&source, &merged).map_err(|e: PolicyError| format!("{} merged with wider scopes: {}", source_of(narrowest), e.reason))
}

/// The names of `entries`.
pub fn names_of(entries: &[PolicyEntry]) -> BTreeSet<String> {
    entries.iter().map(|e| e.policy.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Target};

    const ORG: &str = "name = \"web\"\n[network]\ndefault = \"deny\"\nallow = [\"192.0.2.0/24\"]\ndeny = [\"198.51.100.7\"]\n";
    const HOST: &str = "name = \"web\"\n[network]\ndefault = \"allow\"\nallow = [\"198.51.100.0/24\"]\n";

    fn view(host: &str, group: Option<&str>) -> FleetView {
        FleetView::new(Layout { prefix: "/f".into() }, HostIdentity::new(host, group).unwrap(), BTreeMap::new())
    }

    fn denies(entry: &PolicyEntry) -> Vec<String> {
        entry.policy.rules.iter().filter(|r| r.action == Action::Deny).map(|r| format!("{:?}", r.target)).collect()
    }

    #[test]
    fn narrowest_wins_and_wider_denies_stay() {
        let mut v = view("h1", Some("gpu"));
        assert!(v.put("/f/policies/all/web", ORG.into(), 5));
        assert!(v.put("/f/policies/host/h1/web", HOST.into(), 6));
        assert!(!v.put("/f/policies/host/h2/web", HOST.into(), 7), "another host's key is not ours");
        assert!(!v.put("/f/policies/group/cpu/web", HOST.into(), 8));
        assert!(!v.put("/f/status/h1", "{}".into(), 9));
        let plan = v.plan();
        assert!(plan.rejections.is_empty(), "{:?}", plan.rejections);
        assert_eq!(plan.changed, vec!["/f/policies/all/web", "/f/policies/host/h1/web"]);
        let [web] = plan.entries.as_slice() else { panic!("{:?}", plan.entries) };
        // The host's allow list, the org's deny and default.
        assert_eq!(web.policy.default, Action::Deny, "a wider default deny is kept");
        assert!(web.policy.rules.iter().any(|r| r.action == Action::Allow && matches!(&r.target, Target::Cidr(c) if c.to_string() == "198.51.100.0/24")));
        assert!(!web.policy.rules.iter().any(|r| matches!(&r.target, Target::Cidr(c) if c.to_string() == "192.0.2.0/24")), "the org's allows are not inherited");
        assert_eq!(denies(web).len(), 1, "{:?}", denies(web));
        assert!(web.source.contains("host/h1/web") && web.source.contains("all/web"), "{}", web.source);
        let compiled = crate::policy::compile::compile(&web.policy, &[]).unwrap();
        assert_eq!(compiled.policy_name, "web");
        v.accept(plan);
        assert!(v.plan().changed.is_empty());
    }

    #[test]
    fn audit_mode_never_lifts_a_wider_deny() {
        let org = "name = \"web\"\n[network]\ndefault = \"deny\"\ndeny = [\"198.51.100.7\", { pattern = \"**.bad.test\", except = [\"ok.bad.test\"] }]\n";
        let host = "name = \"web\"\nmode = \"audit\"\n[network]\nallow = [\"192.0.2.0/24\"]\ndeny = [\"192.0.2.9\"]\n[[http]]\nhosts = [\"api.test\"]\ndeny = [\"DELETE /**\"]\n";
        let mut v = view("h1", None);
        v.put("/f/policies/all/web", org.into(), 2);
        v.put("/f/policies/host/h1/web", host.into(), 3);
        let plan = v.plan();
        assert!(plan.rejections.is_empty(), "{:?}", plan.rejections);
        let policy = plan.entries[0].policy.clone();
        assert_eq!(policy.mode, crate::policy::Mode::Enforce, "the org's default deny stays enforced: {}", plan.entries[0].source);
        let mode_of = |text: &str| policy.rules.iter().find(|r| r.text == text && r.action == Action::Deny).map(|r| r.mode);
        assert_eq!(mode_of("198.51.100.7"), Some(crate::policy::Mode::Enforce));
        assert_eq!(mode_of("**.bad.test"), Some(crate::policy::Mode::Enforce));
        assert_eq!(mode_of("192.0.2.9"), Some(crate::policy::Mode::Audit), "the host's own denies keep its audit mode");
        assert_eq!(policy.http[0].mode, crate::policy::Mode::Audit);
        let c = crate::policy::compile::compile(&policy, &[]).unwrap();
        assert!(!c.is_audit(0));
        // Both in audit: the merged policy audits.
        let mut v = view("h1", None);
        v.put("/f/policies/all/web", format!("mode = \"audit\"\n{org}"), 2);
        v.put("/f/policies/host/h1/web", host.into(), 3);
        let policy = v.plan().entries[0].policy.clone();
        assert_eq!(policy.mode, crate::policy::Mode::Audit);
    }

    #[test]
    fn a_wider_implicit_default_deny_is_kept() {
        let mut v = view("h1", None);
        v.put("/f/policies/all/web", "name = \"web\"\n[network]\nallow = [\"192.0.2.0/24\"]\n".into(), 2);
        v.put("/f/policies/host/h1/web", HOST.into(), 3);
        let plan = v.plan();
        assert_eq!(plan.entries[0].policy.default, Action::Deny, "no `default` is deny, and stays deny");
        let mut v = view("h1", None);
        v.put("/f/policies/all/web", "name = \"web\"\n".into(), 2);
        v.put("/f/policies/host/h1/web", HOST.into(), 3);
        assert_eq!(v.plan().entries[0].policy.default, Action::Deny, "no [network] is deny too");
    }

    #[test]
    fn an_invalid_key_keeps_its_last_good_text_and_others_go_ahead() {
        let mut v = view("h1", None);
        v.put("/f/policies/all/web", ORG.into(), 5);
        let plan = v.plan();
        v.accept(plan);
        v.put("/f/policies/all/web", "name = \"web\"\n[network]\nallow = [\"10.0.0.1/8\"]\n".into(), 9);
        v.put("/f/policies/all/other", "name = \"other\"\n".into(), 10);
        v.put("/f/policies/all/misnamed", "name = \"x\"\n".into(), 11);
        let plan = v.plan();
        let reasons: BTreeMap<_, _> = plan.rejections.iter().map(|r| (r.key.as_str(), (r.mod_revision, r.reason.as_str()))).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        let (rev, reason) = reasons["/f/policies/all/web"];
        assert_eq!(rev, 9);
        assert!(reason.starts_with("etcd:/f/policies/all/web:3:") && reason.contains("host bits"), "{reason}");
        assert!(reasons["/f/policies/all/misnamed"].1.contains("not its key's name"));
        assert_eq!(plan.candidate["/f/policies/all/web"].mod_revision, 5, "the last good text stays");
        assert_eq!(plan.changed, vec!["/f/policies/all/other"]);
        assert_eq!(names_of(&plan.entries), ["other", "web"].map(String::from).into());
        v.accept(plan);
        assert_eq!(v.rejected.len(), 2);
        // A valid text clears the rejection.
        v.put("/f/policies/all/web", HOST.into(), 12);
        let plan = v.plan();
        assert_eq!(plan.rejections.len(), 1);
        v.accept(plan);
        assert!(!v.rejected.contains_key("/f/policies/all/web"));
    }

    #[test]
    fn a_refused_change_is_left_out_until_its_key_changes() {
        let mut v = view("h1", None);
        v.put("/f/policies/all/web", ORG.into(), 5);
        v.put("/f/policies/all/other", "name = \"other\"\n".into(), 6);
        let plan = v.plan();
        v.accept(plan);
        // Removing `web` (in use) is refused; `other`'s change goes ahead.
        v.delete("/f/policies/all/web");
        v.put("/f/policies/all/other", "name = \"other\"\n[network]\nallow = [\"192.0.2.1\"]\n".into(), 8);
        let plan = v.plan();
        assert_eq!(plan.changed.len(), 2);
        assert!(v.refuse(&plan, &Refusal { policy: Some("web".into()), reason: "policy \"web\" is in use".into() }));
        assert!(!v.refuse(&plan, &Refusal { policy: Some("web".into()), reason: "again".into() }), "nothing new to blame");
        let plan = v.plan();
        assert_eq!(plan.changed, vec!["/f/policies/all/other"]);
        assert_eq!(names_of(&plan.entries), ["other", "web"].map(String::from).into(), "web stays in force");
        v.accept(plan);
        assert!(v.rejected["/f/policies/all/web"].reason.contains("in use"));
        // Put back: the refusal is over.
        v.put("/f/policies/all/web", ORG.into(), 9);
        let plan = v.plan();
        v.accept(plan);
        assert!(v.rejected.is_empty(), "{:?}", v.rejected);
    }

    #[test]
    fn reset_drops_what_the_store_no_longer_has() {
        let mut v = view("h1", Some("gpu"));
        v.put("/f/policies/group/gpu/web", HOST.into(), 3);
        let plan = v.plan();
        v.accept(plan);
        v.reset([("/f/policies/all/other".to_string(), Stored { text: "name = \"other\"\n".into(), mod_revision: 4 })]);
        let plan = v.plan();
        assert_eq!(plan.changed, vec!["/f/policies/all/other", "/f/policies/group/gpu/web"]);
        assert_eq!(names_of(&plan.entries), ["other"].map(String::from).into());
    }
}
