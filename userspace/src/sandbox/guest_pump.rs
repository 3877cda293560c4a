//! The frame pump of a netns guest runs in its own process (`sbx-net
//! __guest-pump`), in its own session: killing or restarting the daemon
//! must not cut a guest off — enforcement stays in the kernel, and frames
//! keep flowing through the pump.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sbx_vmm::guest::GuestError;
use sbx_vmm::netns::NetNsError;
use sbx_vmm::tap::TapError;
use sbx_vmm::{GuestNetwork, NetNs, NetnsGuest, Tap};

use crate::sandbox::SandboxSpec;
use crate::util::detached::{block_stop_signals, spawn_ready};

/// How long the daemon waits for a new pump's guest to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    // The daemon's side: starting and stopping a pump.
    #[error("starting the guest pump for {name}: opening {log}: {source}")]
    Log { name: String, log: String, source: std::io::Error },
    #[error("starting the guest pump for {name}: spawning {exe}: {source}")]
    Spawn { name: String, exe: String, source: std::io::Error },
    #[error("starting the guest pump for {name}: it exited before the guest was up; see {log}")]
    ExitedEarly { name: String, log: String },
    #[error("starting the guest pump for {name}: no guest after {} s; see {log}", READY_TIMEOUT.as_secs())]
    NotReady { name: String, log: String },
    #[error("stopping the guest of {name}: {left} is left")]
    Left { name: String, left: String },
    // The pump process's side.
    #[error("bad pump spec: {0}")]
    BadSpec(#[source] serde_json::Error),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("telling the daemon the guest is up: {0}")]
    Ready(#[source] std::io::Error),
}

/// Everything the pump process needs, passed as one JSON argument.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PumpSpec {
    pub sandbox: String,
    pub tap: String,
    pub netns: String,
    pub mac: [u8; 6],
    pub ipv4: std::net::Ipv4Addr,
    pub ipv4_prefix_len: u8,
    pub gateway_ipv4: std::net::Ipv4Addr,
    pub ipv6: std::net::Ipv6Addr,
    pub ipv6_prefix_len: u8,
    pub gateway_ipv6: std::net::Ipv6Addr,
}

impl PumpSpec {
    pub fn new(spec: &SandboxSpec) -> PumpSpec {
        let n = spec.guest_network();
        PumpSpec {
            sandbox: spec.name.clone(),
            tap: spec.tap.clone(),
            netns: spec.netns.clone(),
            mac: n.mac,
            ipv4: n.ipv4,
            ipv4_prefix_len: n.ipv4_prefix_len,
            gateway_ipv4: n.gateway_ipv4,
            ipv6: n.ipv6,
            ipv6_prefix_len: n.ipv6_prefix_len,
            gateway_ipv6: n.gateway_ipv6,
        }
    }

    fn network(&self) -> GuestNetwork {
        GuestNetwork {
            mac: self.mac,
            ipv4: self.ipv4,
            ipv4_prefix_len: self.ipv4_prefix_len,
            gateway_ipv4: self.gateway_ipv4,
            ipv6: self.ipv6,
            ipv6_prefix_len: self.ipv6_prefix_len,
            gateway_ipv6: self.gateway_ipv6,
            mtu: 1500,
            nameservers: vec![self.gateway_ipv4.into()],
        }
    }
}

const READY: &str = "ready";
const PUMP_ARG: &str = "__guest-pump";

/// The pump process: opens the (persistent) host tap, creates the guest
/// namespace, prints `ready`, then pumps until SIGTERM/SIGINT, when it
/// removes the namespace.
pub fn run_pump(spec_json: &str) -> Result<(), PumpError> {
    let spec: PumpSpec = serde_json::from_str(spec_json).map_err(PumpError::BadSpec)?;
    // Block the stop signals in every thread (the pump threads inherit the
    // mask) and wait for them synchronously below.
    let set = block_stop_signals();
    let tap = Tap::open(&spec.tap)?;
    // A namespace left by a pump that was SIGKILLed: replace it.
    NetNs::delete(&spec.netns)?;
    let guest = NetnsGuest::start(&spec.netns, tap, &spec.network())?;
    println!("{READY}");
    std::io::stdout().flush().map_err(PumpError::Ready)?;
    let mut signal: libc::c_int = 0;
    // SAFETY: set is the initialised signal set from above.
    unsafe { libc::sigwait(&set, &mut signal) };
    eprintln!("guest pump {}: signal {signal}, removing {}", spec.sandbox, spec.netns);
    Ok(guest.stop()?)
}

/// Starts the pump for `spec` (detached, in its own session) and waits until
/// the guest is up. Its stderr goes to `log`.
pub fn spawn_pump(exe: &Path, spec: &PumpSpec, log: &Path) -> Result<u32, PumpError> {
    let name = spec.sandbox.clone();
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| PumpError::Log { name: name.clone(), log: log.display().to_string(), source })?;
    let mut command = Command::new(exe);
    command.arg(PUMP_ARG).arg(serde_json::to_string(spec).expect("spec serializes")).stderr(log_file);
    let (pid, answer) = spawn_ready(&mut command, READY_TIMEOUT).map_err(|source| PumpError::Spawn { name: name.clone(), exe: exe.display().to_string(), source })?;
    if answer.as_deref().map(str::trim) == Some(READY) {
        return Ok(pid);
    }
    if let Err(e) = stop_pump(pid, &spec.sandbox, &spec.netns) {
        tracing::error!("{e}");
    }
    let log = log.display().to_string();
    Err(match answer {
        Some(_) => PumpError::ExitedEarly { name, log },
        None => PumpError::NotReady { name, log },
    })
}

/// Whether `pid` is the pump of `sandbox` (a pid alone may have been reused).
pub fn pump_alive(pid: u32, sandbox: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.get(1).is_some_and(|a| *a == PUMP_ARG.as_bytes())
        && args.get(2).is_some_and(|a| {
            serde_json::from_slice::<PumpSpec>(a).is_ok_and(|s| s.sandbox == sandbox)
        })
}

/// Stops the pump (SIGTERM, then SIGKILL after 5 s), makes sure the guest
/// namespace is gone, and checks both: what is left is an error naming it.
pub fn stop_pump(pid: u32, sandbox: &str, netns: &str) -> Result<(), PumpError> {
    let left = |left: String| PumpError::Left { name: sandbox.to_string(), left };
    if pump_alive(pid, sandbox) {
        // SAFETY: kill with a pid we verified is our pump.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        if !wait_gone(pid, sandbox, Duration::from_secs(5)) {
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            if !wait_gone(pid, sandbox, Duration::from_secs(5)) {
                return Err(left(format!("pump process {pid}")));
            }
        }
    }
    // The pump removes its namespace on SIGTERM; after a SIGKILL (or a
    // pump that died earlier) it is ours to remove.
    NetNs::delete(netns).map_err(|e| left(format!("network namespace {netns} ({e})")))?;
    if NetNs::exists(netns) {
        return Err(left(format!("network namespace {netns}")));
    }
    Ok(())
}

/// Waits until `pid` is no longer `sandbox`'s pump (the daemon ignores
/// SIGCHLD, so an exited pump is reaped by the kernel at once).
fn wait_gone(pid: u32, sandbox: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pump_alive(pid, sandbox) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}
