//! `inspect`'s filters: which flow records to show. A filter kind given
//! twice matches either value, kinds combine with *and*, a negated
//! criterion must not match, and `--since` keeps records from a time on.
//! Pure; the command line that builds them is [`crate::cli::inspect`].

use ipnetwork::IpNetwork;

use super::record::{days_from_civil, FlowRecord, Verdict};

/// A `--since` value: a duration back from when the filter is applied, or
/// a point in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    SecondsAgo(u64),
    UnixNs(u64),
}

impl Since {
    /// A duration ("90s", "5m", "2h", "1d") or an RFC 3339 UTC time
    /// ("2026-11-28T12:00:00Z", fractions allowed).
    pub fn parse(text: &str) -> Result<Since, String> {
        let bad = || format!("--since {text:?}: expected a duration (30s, 5m, 2h, 1d) or an RFC 3339 UTC time (2026-11-28T12:00:00Z)");
        if let Some(unit) = text.chars().last().filter(|c| c.is_ascii_alphabetic()) {
            if let Ok(n) = text[..text.len() - 1].parse::<u64>() {
                let unit_seconds = match unit {
                    's' => 1,
                    'm' => 60,
                    'h' => 3600,
                    'd' => 86_400,
                    _ => return Err(bad()),
                };
                return Ok(Since::SecondsAgo(n.saturating_mul(unit_seconds)));
            }
        }
        let t = text.strip_suffix('Z').ok_or_else(bad)?;
        let (date, time) = t.split_once('T').ok_or_else(bad)?;
        let num = |s: &str| s.parse::<u32>().map_err(|_| bad());
        let mut date = date.split('-');
        let (y, mo, d) = (
            date.next().ok_or_else(bad)?.parse::<i64>().map_err(|_| bad())?,
            num(date.next().ok_or_else(bad)?)?,
            num(date.next().ok_or_else(bad)?)?,
        );
        let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
        let mut hms = hms.split(':');
        let (h, mi, s) = (num(hms.next().ok_or_else(bad)?)?, num(hms.next().ok_or_else(bad)?)?, num(hms.next().ok_or_else(bad)?)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 || date.next().is_some() {
            return Err(bad());
        }
        let frac_ns = if frac.is_empty() {
            0
        } else {
            let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
            digits.parse::<u64>().map_err(|_| bad())?
        };
        let days = days_from_civil(y, mo, d);
        let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + s);
        u64::try_from(secs).map(|s| Since::UnixNs(s * 1_000_000_000 + frac_ns)).map_err(|_| bad())
    }

    /// The time it stands for, a duration counted back from `now_unix_ns`.
    pub fn unix_ns(self, now_unix_ns: u64) -> u64 {
        match self {
            Since::SecondsAgo(secs) => now_unix_ns.saturating_sub(secs.saturating_mul(1_000_000_000)),
            Since::UnixNs(t) => t,
        }
    }
}

/// `--since`: a duration back from `now_unix_ns` or an RFC 3339 UTC time
/// ([`Since::parse`]), as Unix nanoseconds.
pub fn parse_since(text: &str, now_unix_ns: u64) -> Result<u64, String> {
    Since::parse(text).map(|s| s.unix_ns(now_unix_ns))
}

/// One condition of an `inspect` filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Criterion {
    Sandbox(String),
    Verdict(Verdict),
    /// Shell-style glob (`*`, `?`), case-insensitive, on any of the names.
    Domain(String),
    /// Source or destination inside the network.
    Ip(IpNetwork),
    /// Source or destination port.
    Port(u16),
    Protocol(String),
}

impl Criterion {
    fn kind(&self) -> u8 {
        match self {
            Criterion::Sandbox(_) => 0,
            Criterion::Verdict(_) => 1,
            Criterion::Domain(_) => 2,
            Criterion::Ip(_) => 3,
            Criterion::Port(_) => 4,
            Criterion::Protocol(_) => 5,
        }
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        match self {
            Criterion::Sandbox(s) => &r.sandbox == s,
            Criterion::Verdict(v) => r.verdict == *v,
            Criterion::Domain(g) => r.names().any(|n| glob_match(g, n)),
            Criterion::Ip(net) => [r.src_ip, r.dst_ip].into_iter().flatten().any(|ip| net.contains(ip)),
            Criterion::Port(p) => r.src_port == *p || r.dst_port == *p,
            Criterion::Protocol(p) => {
                r.protocol.eq_ignore_ascii_case(p)
                    || (p.eq_ignore_ascii_case("dns") && r.dns.is_some())
                    || (p.eq_ignore_ascii_case("http") && r.http.is_some())
            }
        }
    }
}

/// Filters of `inspect`: criteria of one kind are alternatives (any may
/// match), kinds must all match, and a negated criterion must not match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub criteria: Vec<(bool, Criterion)>,
    /// Only records at or after this time.
    pub since_unix_ns: Option<u64>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        if self.since_unix_ns.is_some_and(|t| r.time_unix_ns < t) {
            return false;
        }
        let mut kinds: Vec<u8> = self.criteria.iter().filter(|(neg, _)| !neg).map(|(_, c)| c.kind()).collect();
        kinds.dedup();
        let positive_ok = kinds
            .iter()
            .all(|k| self.criteria.iter().any(|(neg, c)| !neg && c.kind() == *k && c.matches(r)));
        positive_ok && self.criteria.iter().filter(|(neg, _)| *neg).all(|(_, c)| !c.matches(r))
    }
}

/// Case-insensitive glob with `*` (any run, dots included) and `?`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let t: Vec<char> = text.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::record::rfc3339;

    #[test]
    fn times_round_trip() {
        for t in [0u64, 951_782_400_000_000_000, 1_764_331_200_123_456_000, 4_102_444_800_000_000_000] {
            assert_eq!(parse_since(&rfc3339(t), 0).unwrap(), t, "{}", rfc3339(t));
        }
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
        let now = 10_000 * 1_000_000_000;
        assert_eq!(parse_since("90s", now).unwrap(), now - 90_000_000_000);
        assert_eq!(parse_since("2h", now).unwrap(), 10_000_000_000_000 - 7_200_000_000_000);
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("2026-13-01T00:00:00Z", now).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.github.com", "api.github.com"));
        assert!(glob_match("*.github.com", "a.b.github.com"));
        assert!(!glob_match("*.github.com", "github.com"));
        assert!(glob_match("API.test", "api.test"));
        assert!(glob_match("a?i.*", "api.test"));
        assert!(!glob_match("api", "api.test"));
        assert!(glob_match("*", ""));
    }
}
