//! `sbx-net daemon --cleanup`: removes everything a daemon with this
//! configuration made, without a running daemon (and without loading the
//! datapath: unpinning the maps drops them once no program uses them).

use std::collections::BTreeSet;

use sbx_vmm::Netlink;

use crate::control::config::DaemonConfig;
use crate::control::state::State;
use crate::datapath::nft::Nftables;
use crate::sandbox::host::HostOriginals;
use crate::sandbox::install::remove_from_host;
use crate::sandbox::tap_pool::dismantle_pooled;
use crate::sandbox::SandboxSpec;

use super::{io_err, DaemonError};

/// Stops the data plane, removes taps, pumps and guest namespaces, links, the nftables table,
/// pinned maps, the host settings the daemon changed and the state; returns
/// what it removed.
pub fn cleanup(config: &DaemonConfig) -> Result<Vec<String>, DaemonError> {
    // The data plane first: it holds the listeners and writes the maps.
    let mut done = crate::control::dataplane::link::stop_all(config);
    let state = State::load(&config.state_dir)?;
    let netlink = Netlink::new()?;
    let nft = Nftables::new();
    let mut left = Vec::new();
    for record in state.sandboxes.values() {
        if let Some(pid) = record.vm_pid {
            match crate::sandbox::vm_process::stop_vm(pid, &record.name) {
                Ok(()) => done.push(format!("sandbox {}: VMM", record.name)),
                Err(e) => left.push(e.to_string()),
            }
        }
        let mut spec = SandboxSpec::new(record.id, &record.name, &config.pools())?;
        spec.tap = record.tap.clone();
        let sandbox_left = remove_from_host(&netlink, &nft, &config.link_pin(&record.name), &spec, record.pump_pid, record.adopted_tap);
        if sandbox_left.is_empty() {
            done.push(format!("sandbox {} (tap {})", record.name, record.tap));
        }
        left.extend(sandbox_left.into_iter().map(|l| format!("sandbox {}: {l}", record.name)));
    }
    let owned: BTreeSet<String> = state.sandboxes.values().filter(|r| r.adopted_tap).map(|r| r.tap.clone()).collect();
    let pooled = dismantle_pooled(&netlink, &config.bpf_dir.join("links"), &owned);
    done.push(format!("{pooled} pre-warmed taps"));
    nft.remove()?;
    done.push("nftables table inet sbx_net".into());
    // Pinned maps: unpinning drops them once no program uses them.
    if config.bpf_dir.exists() {
        let _ = std::fs::remove_dir_all(config.bpf_dir.join("links"));
        match std::fs::remove_dir_all(&config.bpf_dir) {
            Ok(()) => done.push(format!("pins under {}", config.bpf_dir.display())),
            Err(e) => left.push(format!("pins under {} ({e})", config.bpf_dir.display())),
        }
    }
    let host = HostOriginals::load(&config.state_dir);
    for restored in host.restore() {
        done.push(format!("host setting restored: {restored}"));
    }
    let _ = std::fs::remove_file(HostOriginals::path(&config.state_dir));
    State::remove_files(&config.state_dir)?;
    let _ = std::fs::remove_dir_all(config.state_dir.join("ca"));
    let _ = std::fs::remove_file(config.learned_snapshot());
    let applied = config.applied_policy_dir();
    if applied.is_dir() {
        std::fs::remove_dir_all(&applied).map_err(io_err(&applied))?;
    } else if applied.exists() {
        std::fs::remove_file(&applied).map_err(io_err(&applied))?;
    }
    if let Ok(entries) = std::fs::read_dir(&config.state_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("guest-") && name.ends_with(".log") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(&config.state_dir);
    done.push(format!("state in {}", config.state_dir.display()));
    if !left.is_empty() {
        return Err(DaemonError::CleanupLeft(left));
    }
    Ok(done)
}
