//! What the daemon needs from a host with kernel defaults, prepared by the
//! daemon itself and reported in `status`: forwarding for the sandboxes'
//! traffic (per interface where the kernel allows it), an uplink that keeps
//! accepting router advertisements, an open-file limit for the proxies, and
//! an iproute2-compatible /run/netns.
//!
//! The plan is pure (current values in, settings out) and unit-tested; the
//! sysctl reads and writes are the thin part around it. A setting the daemon
//! cannot make is a start error naming it: a daemon that ran without
//! forwarding would answer DNS while every allowed connection timed out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sbx_vmm::netlink::sysctl_path;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot set {key} = {value} ({why}): {source}")]
    Sysctl { key: String, value: String, why: &'static str, source: std::io::Error },
    #[error("cannot read {key}: {source}")]
    Read { key: String, source: std::io::Error },
    #[error("uplink {0} does not exist in this network namespace")]
    NoUplink(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// One host setting the daemon relies on, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCheck {
    /// A sysctl key (`net.ipv4.conf.eth0.forwarding`) or a named check.
    pub name: String,
    /// What it was when the daemon started (or `None` if it did not exist).
    pub found: Option<String>,
    /// What it is now.
    pub value: String,
    /// Whether this daemon changed it.
    pub changed: bool,
    pub why: String,
}

/// A sysctl to make hold, with the reason it matters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    pub value: &'static str,
    pub why: &'static str,
}

impl Setting {
    fn new(key: String, value: &'static str, why: &'static str) -> Setting {
        Setting { key, value, why }
    }
}

const WHY_V4: &str = "IPv4 forwarding of sandbox traffic";
const WHY_V6: &str = "IPv6 forwarding of sandbox traffic";
const WHY_RA: &str = "the uplink keeps accepting router advertisements with forwarding on";

/// Whether this kernel forwards IPv6 per interface (`force_forwarding`,
/// Linux 6.17+); older kernels only have the global switch.
pub fn ipv6_per_interface_forwarding(sysctl: &dyn Fn(&str) -> Option<String>) -> bool {
    sysctl("net.ipv6.conf.default.force_forwarding").is_some()
}

/// The settings the uplinks need at start. IPv4 forwarding is decided by
/// the interface a packet arrives on, so the uplink (replies coming back)
/// and every sandbox tap (see [`tap_settings`]) get it, and nothing else on
/// the host starts routing. IPv6 needs the global switch unless the kernel
/// has per-interface `force_forwarding`. An interface that forwards IPv6
/// ignores router advertisements unless `accept_ra` is 2: an uplink
/// configured by RAs (`accept_ra` = 1) is moved to 2 so it keeps its default
/// route, as libvirt and Docker do.
pub fn uplink_settings(uplinks: &[String], sysctl: &dyn Fn(&str) -> Option<String>) -> Vec<Setting> {
    let per_interface = ipv6_per_interface_forwarding(sysctl);
    let mut out = Vec::new();
    if !per_interface {
        out.push(Setting::new("net.ipv6.conf.all.forwarding".into(), "1", WHY_V6));
    }
    for uplink in uplinks {
        out.push(Setting::new(format!("net.ipv4.conf.{uplink}.forwarding"), "1", WHY_V4));
        if per_interface {
            out.push(Setting::new(format!("net.ipv6.conf.{uplink}.force_forwarding"), "1", WHY_V6));
        }
        let ra = format!("net.ipv6.conf.{uplink}.accept_ra");
        if sysctl(&ra).as_deref() == Some("1") {
            out.push(Setting::new(ra, "2", WHY_RA));
        }
    }
    out
}

/// The settings each sandbox tap needs (its packets arrive on it).
pub fn tap_settings(tap: &str, ipv6_per_interface: bool) -> Vec<Setting> {
    let mut out = vec![Setting::new(format!("net.ipv4.conf.{tap}.forwarding"), "1", WHY_V4)];
    if ipv6_per_interface {
        out.push(Setting::new(format!("net.ipv6.conf.{tap}.force_forwarding"), "1", WHY_V6));
    }
    out
}

/// Reads a sysctl of the calling thread's network namespace.
pub fn read_sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(sysctl_path(key)).ok().map(|s| s.trim().to_string())
}

/// Makes every setting hold; returns what was found and done. `log`: say
/// each change (host-wide settings), or not (per-tap ones, every create).
pub fn apply(settings: &[Setting], log: bool) -> Result<Vec<HostCheck>, HostError> {
    let mut out = Vec::new();
    for s in settings {
        let found = read_sysctl(&s.key);
        let changed = found.as_deref() != Some(s.value);
        if changed {
            std::fs::write(sysctl_path(&s.key), s.value).map_err(|source| HostError::Sysctl {
                key: s.key.clone(),
                value: s.value.to_string(),
                why: s.why,
                source,
            })?;
            if log {
                tracing::info!(key = %s.key, from = found.as_deref().unwrap_or("?"), to = s.value, "host prepared: {}", s.why);
            }
        }
        out.push(HostCheck { name: s.key.clone(), found, value: s.value.to_string(), changed, why: s.why.to_string() });
    }
    Ok(out)
}

/// Interfaces of the default routes (IPv4 and IPv6) of this namespace, for
/// a daemon started without `--uplink`.
pub fn default_route_interfaces() -> Vec<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let mut out = default_ifaces_v4(&v4);
    for i in default_ifaces_v6(&v6) {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

const RTF_UP: u32 = 0x0001;
const RTF_REJECT: u32 = 0x0200;

/// `/proc/net/route`: Iface Destination Gateway Flags … Mask (hex).
fn default_ifaces_v4(table: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(iface), Some(dst), Some(flags), Some(mask)) = (f.first(), f.get(1), f.get(3), f.get(7)) else { continue };
        let flags = u32::from_str_radix(flags, 16).unwrap_or(0);
        if *dst == "00000000" && *mask == "00000000" && flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && !out.iter().any(|o| o == iface) {
            out.push(iface.to_string());
        }
    }
    out
}

/// `/proc/net/ipv6_route`: dst dst_len src src_len gw metric ref use flags iface.
fn default_ifaces_v6(table: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let flags = u32::from_str_radix(f[8], 16).unwrap_or(0);
        let default = f[0].bytes().all(|b| b == b'0') && f[1] == "00";
        if default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && f[9] != "lo" && !out.iter().any(|o| o == f[9]) {
            out.push(f[9].to_string());
        }
    }
    out
}

/// Raises the soft open-file limit to the hard one: every proxied connection
/// holds two sockets, and the default soft limit (1024) would cap a host at
/// a few hundred concurrent connections across all its sandboxes.
pub fn raise_nofile_limit() -> Result<HostCheck, HostError> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(HostError::Read { key: "RLIMIT_NOFILE".into(), source: std::io::Error::last_os_error() });
    }
    let found = lim.rlim_cur;
    let changed = lim.rlim_cur < lim.rlim_max;
    if changed {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(HostError::Sysctl {
                key: "RLIMIT_NOFILE".into(),
                value: lim.rlim_max.to_string(),
                why: WHY_NOFILE,
                source: std::io::Error::last_os_error(),
            });
        }
        tracing::info!(from = found, to = lim.rlim_max, "host prepared: {WHY_NOFILE}");
    }
    Ok(HostCheck {
        name: "RLIMIT_NOFILE (soft)".into(),
        found: Some(found.to_string()),
        value: lim.rlim_max.to_string(),
        changed,
        why: WHY_NOFILE.into(),
    })
}

const WHY_NOFILE: &str = "open files for proxied connections (two sockets each)";

/// A host setting the daemon changed: what it found, what it set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub original: String,
    pub set: String,
}

/// The settings a daemon changed, kept in the state dir before it changes
/// them, so `--cleanup` can put the host back as it found it. An entry is
/// written once: a restarted daemon finds its own values and must not take
/// them for the host's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostOriginals {
    pub sysctls: BTreeMap<String, Change>,
}

impl HostOriginals {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("host-originals.json")
    }

    pub fn load(state_dir: &Path) -> HostOriginals {
        std::fs::read(Self::path(state_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Records the settings about to change (`sysctl` reads the current
    /// value); returns whether anything new was recorded.
    pub fn record(&mut self, settings: &[Setting], sysctl: &dyn Fn(&str) -> Option<String>) -> bool {
        let mut added = false;
        for s in settings {
            let Some(found) = sysctl(&s.key) else { continue };
            if found != s.value && !self.sysctls.contains_key(&s.key) {
                self.sysctls.insert(s.key.clone(), Change { original: found, set: s.value.to_string() });
                added = true;
            }
        }
        added
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), HostError> {
        let path = Self::path(state_dir);
        let body = serde_json::to_vec_pretty(self).expect("serializes");
        crate::util::fs::write_atomic(&path, &body).map_err(|source| HostError::Io { path: path.display().to_string(), source })
    }

    /// The settings to put back: those still at the value the daemon set
    /// (one changed since belongs to whoever changed it — Docker, say).
    pub fn to_restore(&self, sysctl: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
        self.sysctls
            .iter()
            .filter(|(key, c)| sysctl(key).as_deref() == Some(c.set.as_str()))
            .map(|(key, c)| (key.clone(), c.original.clone()))
            .collect()
    }

    /// Puts back what [`HostOriginals::to_restore`] selects (best effort:
    /// an uplink may be gone); returns what was restored.
    pub fn restore(&self) -> Vec<String> {
        let mut done = Vec::new();
        for (key, value) in self.to_restore(&read_sysctl) {
            match std::fs::write(sysctl_path(&key), &value) {
                Ok(()) => done.push(format!("{key} = {value}")),
                Err(e) => tracing::warn!(%key, "not restored: {e}"),
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(values: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = values.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn per_interface_when_the_kernel_has_force_forwarding() {
        let sysctl = kernel(&[("net.ipv6.conf.default.force_forwarding", "0"), ("net.ipv6.conf.eth0.accept_ra", "1")]);
        let keys: Vec<(String, &str)> = uplink_settings(&["eth0".into()], &sysctl).into_iter().map(|s| (s.key, s.value)).collect();
        assert_eq!(
            keys,
            vec![
                ("net.ipv4.conf.eth0.forwarding".to_string(), "1"),
                ("net.ipv6.conf.eth0.force_forwarding".to_string(), "1"),
                ("net.ipv6.conf.eth0.accept_ra".to_string(), "2"),
            ]
        );
        assert_eq!(tap_settings("sbx-1", true).len(), 2);
    }

    #[test]
    fn global_ipv6_switch_on_older_kernels_and_ra_kept_only_where_used() {
        let sysctl = kernel(&[("net.ipv6.conf.eth0.accept_ra", "0")]);
        let keys: Vec<String> = uplink_settings(&["eth0".into()], &sysctl).into_iter().map(|s| s.key).collect();
        assert_eq!(keys, vec!["net.ipv6.conf.all.forwarding", "net.ipv4.conf.eth0.forwarding"]);
        assert_eq!(tap_settings("sbx-1", false).len(), 1);
    }

    #[test]
    fn default_routes_from_proc() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_ifaces_v4(v4), vec!["eth0"]);
        let z = "00000000000000000000000000000000";
        let v6 = format!(
            "{z} 00 {z} 00 {z} ffffffff 00000001 00000000 00200200       lo\n\
             {z} 00 {z} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     wan0\n\
             20010db8000000000000000000000000 40 {z} 00 {z} 00000100 00000001 00000000 00000001     eth0\n"
        );
        assert_eq!(default_ifaces_v6(&v6), vec!["wan0"]);
    }

    #[test]
    fn originals_are_recorded_once_and_restored_only_if_still_ours() {
        let setting = Setting::new("net.ipv4.conf.eth0.forwarding".into(), "1", WHY_V4);
        let mut o = HostOriginals::default();
        assert!(o.record(std::slice::from_ref(&setting), &kernel(&[("net.ipv4.conf.eth0.forwarding", "0")])));
        // A restarted daemon finds its own value: not the host's original.
        assert!(!o.record(std::slice::from_ref(&setting), &kernel(&[("net.ipv4.conf.eth0.forwarding", "1")])));
        assert_eq!(o.sysctls["net.ipv4.conf.eth0.forwarding"], Change { original: "0".into(), set: "1".into() });
        assert_eq!(o.to_restore(&kernel(&[("net.ipv4.conf.eth0.forwarding", "1")])), vec![("net.ipv4.conf.eth0.forwarding".to_string(), "0".to_string())]);
        // Someone changed it since: theirs now.
        assert!(o.to_restore(&kernel(&[("net.ipv4.conf.eth0.forwarding", "0")])).is_empty());
    }
}
