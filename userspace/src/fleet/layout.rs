//! Where a fleet's policies and statuses live in etcd, and which of them
//! apply to a host. Pure.
//!
//! ```text
//! PREFIX/policies/all/NAME            policy NAME for every host
//! PREFIX/policies/group/GROUP/NAME    for hosts of --host-group GROUP
//! PREFIX/policies/host/HOST/NAME      for the host --host-name HOST
//! PREFIX/status/HOST                  what HOST enforces (JSON, on a lease)
//! ```

use std::fmt;

/// Who a policy key is for, widest first (the derived order is the
/// precedence: a later scope overrides an earlier one by name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    All,
    Group(String),
    Host(String),
}

/// This host's place in the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdentity {
    pub name: String,
    pub group: Option<String>,
}

impl HostIdentity {
    pub fn new(name: &str, group: Option<&str>) -> Result<HostIdentity, String> {
        check_segment("host name", name)?;
        if let Some(g) = group {
            check_segment("host group", g)?;
        }
        Ok(HostIdentity { name: name.to_string(), group: group.map(str::to_string) })
    }

    /// Whether a policy of `scope` is for this host.
    pub fn covered_by(&self, scope: &Scope) -> bool {
        match scope {
            Scope::All => true,
            Scope::Group(g) => self.group.as_deref() == Some(g.as_str()),
            Scope::Host(h) => *h == self.name,
        }
    }
}

/// A key segment (a name, group or host) that cannot change the key's shape.
pub fn check_segment(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{what} must be 1 to 253 characters"));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))) {
        return Err(format!("{what} {s:?} has {c:?}: only letters, digits, '.', '-' and '_'"));
    }
    if s == "." || s == ".." {
        return Err(format!("{what} {s:?} is not a name"));
    }
    Ok(())
}

impl Scope {
    /// `all`, `group:NAME` or `host:NAME` (the CLI's `--scope`).
    pub fn parse(s: &str) -> Result<Scope, String> {
        let scope = match s.split_once(':') {
            None if s == "all" => Scope::All,
            Some(("group", g)) => Scope::Group(g.to_string()),
            Some(("host", h)) => Scope::Host(h.to_string()),
            _ => return Err(format!("scope {s:?}: expected all, group:NAME or host:NAME")),
        };
        match &scope {
            Scope::All => {}
            Scope::Group(n) => check_segment("group", n)?,
            Scope::Host(n) => check_segment("host", n)?,
        }
        Ok(scope)
    }

    fn path(&self) -> String {
        match self {
            Scope::All => "all".into(),
            Scope::Group(g) => format!("group/{g}"),
            Scope::Host(h) => format!("host/{h}"),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("all"),
            Scope::Group(g) => write!(f, "group:{g}"),
            Scope::Host(h) => write!(f, "host:{h}"),
        }
    }
}

/// Keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// No trailing slash, e.g. `/sbx`.
    pub prefix: String,
}

impl Layout {
    pub fn policies(&self) -> String {
        format!("{}/policies/", self.prefix)
    }

    pub fn statuses(&self) -> String {
        format!("{}/status/", self.prefix)
    }

    pub fn status_key(&self, host: &str) -> String {
        format!("{}{host}", self.statuses())
    }

    pub fn policy_key(&self, scope: &Scope, name: &str) -> String {
        format!("{}{}/{name}", self.policies(), scope.path())
    }

    /// The scope and policy name of a key under [`Layout::policies`]; None
    /// for a key of any other shape (ignored, so an operator's notes under
    /// the prefix cannot break hosts).
    pub fn parse_policy_key(&self, key: &str) -> Option<(Scope, String)> {
        let rest = key.strip_prefix(&self.policies())?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (scope, name) = match parts.as_slice() {
            ["all", name] => (Scope::All, *name),
            ["group", g, name] => (Scope::Group(g.to_string()), *name),
            ["host", h, name] => (Scope::Host(h.to_string()), *name),
            _ => return None,
        };
        let segments_ok = match &scope {
            Scope::All => true,
            Scope::Group(s) | Scope::Host(s) => check_segment("", s).is_ok(),
        };
        (segments_ok && check_segment("", name).is_ok()).then(|| (scope, name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_odd_keys_are_ignored() {
        let l = Layout { prefix: "/sbx".into() };
        for scope in [Scope::All, Scope::Group("gpu".into()), Scope::Host("h-1.example".into())] {
            let key = l.policy_key(&scope, "default");
            assert_eq!(l.parse_policy_key(&key), Some((scope, "default".into())), "{key}");
        }
        assert_eq!(l.policy_key(&Scope::Group("gpu".into()), "p"), "/sbx/policies/group/gpu/p");
        assert_eq!(l.status_key("h1"), "/sbx/status/h1");
        for odd in ["/sbx/policies/all", "/sbx/policies/all/", "/sbx/policies/all/a/b", "/sbx/policies/zone/z/p", "/sbx/policies/host/../p", "/sbxx/policies/all/p", "/sbx/status/h1", "/sbx/policies/all/a b"] {
            assert_eq!(l.parse_policy_key(odd), None, "{odd}");
        }
    }

    #[test]
    fn scopes_parse_order_and_cover() {
        assert_eq!(Scope::parse("all"), Ok(Scope::All));
        assert_eq!(Scope::parse("group:gpu"), Ok(Scope::Group("gpu".into())));
        assert_eq!(Scope::parse("host:h1"), Ok(Scope::Host("h1".into())));
        for bad in ["", "al", "group:", "host:a/b", "zone:x", "group:.."] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert!(Scope::All < Scope::Group("z".into()) && Scope::Group("z".into()) < Scope::Host("a".into()));
        let me = HostIdentity::new("h1", Some("gpu")).unwrap();
        assert!(me.covered_by(&Scope::All) && me.covered_by(&Scope::Group("gpu".into())) && me.covered_by(&Scope::Host("h1".into())));
        assert!(!me.covered_by(&Scope::Group("cpu".into())) && !me.covered_by(&Scope::Host("h2".into())));
        assert!(HostIdentity::new("a/b", None).is_err() && HostIdentity::new("h", Some("")).is_err());
    }
}
