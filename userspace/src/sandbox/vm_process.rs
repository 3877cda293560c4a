//! The VMM process: one microVM on a sandbox's tap, in the Firecracker
//! manner. It opens what the VM needs (the tap, /dev/kvm, its disk
//! images, its console sink), builds the VM, starts the device thread,
//! then drops every capability, sets no_new_privs and installs the seccomp
//! filter on all its threads before the guest runs a single instruction.
//! A guest that breaks the monitor's device code finds a process with no
//! capability that cannot open a file or a socket.
//!
//! Run by `sbx-net vm run` (in the foreground, console on stdout) and, for
//! `sandbox create --vm`, by the daemon (`sbx-net __vmm`, detached in its
//! own session, console to a log): killing or restarting the daemon leaves
//! the VM running, its enforcement in the kernel.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sbx_vmm::probe::{self, ProbeNetwork};
use sbx_vmm::virtio::blk::{BlockDevice, BlockMmio};
use sbx_vmm::virtio::net::NetMmio;
use sbx_vmm::vm::{MicroVm, RunEnd, MMIO_BASE, MMIO_WINDOW};
use sbx_vmm::Tap;

use crate::util::detached::{block_stop_signals, spawn_ready};

/// How long the daemon waits for a new VMM to say its VM runs.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const READY: &str = "ready";
const VMM_ARG: &str = "__vmm";

#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    #[error("sandbox {sandbox}: its tap {tap}: {source} (is another VM or a netns guest on it?)")]
    Tap { sandbox: String, tap: String, source: sbx_vmm::tap::TapError },
    #[error("disk {path}: {source}")]
    Disk { path: String, source: std::io::Error },
    #[error("{what} {path}: {source}")]
    Open { what: &'static str, path: String, source: std::io::Error },
    #[error("{0} MiB of guest memory: between {min} and {max} MiB", min = probe::MIN_MEMORY >> 20, max = MMIO_BASE >> 20)]
    Memory(u32),
    #[error("one vCPU only: the test guest is single-CPU and the monitor runs one vCPU thread ({0} asked)")]
    Vcpus(u32),
    #[error("more than {0} disks")]
    TooManyDisks(usize),
    #[error(transparent)]
    Vm(#[from] sbx_vmm::vm::VmError),
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error(transparent)]
    Linux(#[from] sbx_vmm::linux::LinuxError),
    #[error("dropping capabilities: {0}")]
    Capabilities(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] sbx_vmm::seccomp::SeccompError),
    #[error("bad VM spec {path}: {reason}")]
    BadSpec { path: String, reason: String },
    // The daemon's side.
    #[error("starting the VM of {name}: spawning {exe}: {source}")]
    Spawn { name: String, exe: String, source: std::io::Error },
    #[error("starting the VM of {name}: it exited before the guest ran; see {log}")]
    ExitedEarly { name: String, log: String },
    #[error("starting the VM of {name}: not running after {} s; see {log}", READY_TIMEOUT.as_secs())]
    NotReady { name: String, log: String },
    #[error("stopping the VM of {name}: process {pid} is left")]
    Left { name: String, pid: u32 },
}

/// A disk image and how the guest may use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

impl VmDisk {
    /// `IMG` or `IMG:ro` / `IMG:rw` (the command line's form).
    pub fn parse(text: &str) -> VmDisk {
        match text.rsplit_once(':') {
            Some((path, "ro")) => VmDisk { path: path.into(), read_only: true },
            Some((path, "rw")) => VmDisk { path: path.into(), read_only: false },
            _ => VmDisk { path: text.into(), read_only: false },
        }
    }
}

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmBoot {
    /// The project's test guest, running this probe script.
    Probe { script: String },
    /// A Linux kernel (on a host whose KVM runs stock kernels).
    Linux { kernel: PathBuf, initrd: Option<PathBuf>, cmdline: Option<String> },
}

/// Everything the VMM needs; plain data (the daemon writes it to a file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub sandbox: String,
    pub tap: String,
    pub mac: [u8; 6],
    pub ipv4: Ipv4Addr,
    pub ipv4_prefix_len: u8,
    pub gateway_ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub ipv6_prefix_len: u8,
    pub gateway_ipv6: Ipv6Addr,
    pub dns: IpAddr,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub disks: Vec<VmDisk>,
    pub boot: VmBoot,
    /// Where the guest's console goes (None: this process's stdout).
    pub console: Option<PathBuf>,
}

impl VmSpec {
    /// The checks that need no host (pure).
    pub fn check(&self) -> Result<(), VmProcessError> {
        let bytes = u64::from(self.memory_mib) << 20;
        if bytes < probe::MIN_MEMORY as u64 || bytes > MMIO_BASE {
            return Err(VmProcessError::Memory(self.memory_mib));
        }
        if self.vcpus != 1 {
            return Err(VmProcessError::Vcpus(self.vcpus));
        }
        // One window is the NIC's.
        if self.disks.len() + 1 > probe::abi::MAX_DEVICES {
            return Err(VmProcessError::TooManyDisks(probe::abi::MAX_DEVICES - 1));
        }
        Ok(())
    }

    fn probe_network(&self) -> ProbeNetwork {
        ProbeNetwork {
            ipv4: Some((self.ipv4, self.ipv4_prefix_len, self.gateway_ipv4)),
            ipv6: Some((self.ipv6, self.ipv6_prefix_len, self.gateway_ipv6)),
            dns: vec![self.dns],
        }
    }
}

/// The default probe of `sandbox create --vm`: the guest comes up and
/// serves (answers ARP and ping) until it is stopped.
pub const SERVE_SCRIPT: &str = "serve\n";

/// Becomes nobody, drops every capability of the calling thread and sets
/// no_new_privs. Capabilities are per thread on Linux: call it before the
/// device and signal threads are made, so they start without any.
fn drop_privileges() -> Result<(), VmProcessError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    // No supplementary groups, and nobody's uid and gid: a monitor broken
    // into can signal or read nothing of root's (the descriptors it needs
    // are open already).
    const NOBODY: u32 = 65534;
    // SAFETY: setgroups with an empty list; setresgid/setresuid with
    // constants. glibc applies them to every thread (there is one).
    let ids = unsafe { (libc::setgroups(0, std::ptr::null()), libc::setresgid(NOBODY, NOBODY, NOBODY), libc::setresuid(NOBODY, NOBODY, NOBODY)) };
    if ids != (0, 0, 0) {
        return Err(VmProcessError::Capabilities(std::io::Error::last_os_error()));
    }
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data::default(); 2];
    // SAFETY: capset with a v3 header and two zeroed data words (the ABI's
    // layout); pid 0 is this thread.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) } != 0 {
        return Err(VmProcessError::Capabilities(std::io::Error::last_os_error()));
    }
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(VmProcessError::Capabilities(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The capabilities this thread holds (effective set, from /proc).
pub fn effective_capabilities(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
}

/// Builds and runs the VM of `spec` until it ends; `on_running` is told
/// once the guest is about to run (the daemon's readiness line). Blocks
/// SIGTERM/SIGINT on the calling thread: they stop the VM cleanly.
pub fn run_vm(spec: &VmSpec, on_running: impl FnOnce()) -> Result<RunEnd, VmProcessError> {
    spec.check()?;
    // One malloc arena for every thread: a per-thread arena grows and
    // shrinks with calls the seccomp filter does not allow (its first
    // shrink opens /proc/sys/vm/overcommit_memory).
    // SAFETY: mallopt with a constant, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let stop_signals = block_stop_signals();
    if matches!(spec.boot, VmBoot::Linux { .. }) {
        // Before anything is opened: say at once why it cannot run here.
        sbx_vmm::linux::host_boots_linux()?;
    }
    let tap = Tap::open(&spec.tap).map_err(|source| VmProcessError::Tap { sandbox: spec.sandbox.clone(), tap: spec.tap.clone(), source })?;
    let mut disks = Vec::with_capacity(spec.disks.len());
    for disk in &spec.disks {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(|source| VmProcessError::Disk { path: disk.path.display().to_string(), source })?;
        let id = disk.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        disks.push(BlockDevice::new(file, disk.read_only, &id).map_err(|source| VmProcessError::Disk { path: disk.path.display().to_string(), source })?);
    }
    let console: Box<dyn Write + Send> = match &spec.console {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmProcessError::Open { what: "console log", path: path.display().to_string(), source })?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let memory = (spec.memory_mib as usize) << 20;
    let mut vm = match spec.boot {
        VmBoot::Linux { .. } => MicroVm::for_linux(memory)?,
        VmBoot::Probe { .. } => MicroVm::new(memory)?,
    };
    vm.add_device(Box::new(NetMmio::new(spec.mac, tap).map_err(|source| VmProcessError::Tap { sandbox: spec.sandbox.clone(), tap: spec.tap.clone(), source })?))?;
    for disk in disks {
        vm.add_device(Box::new(BlockMmio::new(disk)))?;
    }
    match &spec.boot {
        VmBoot::Probe { script } => {
            let text = probe::script(&spec.probe_network(), script)?;
            probe::boot(&mut vm, memory, &text)?;
        }
        VmBoot::Linux { kernel, initrd, cmdline } => boot_linux(&mut vm, spec, kernel, initrd.as_deref(), cmdline.as_deref())?,
    }
    vm.echo_console(console);
    drop_privileges()?;
    vm.start_devices()?;
    let kicker = vm.kicker();
    let (started_tx, started) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("sbx-vmm-signals".into())
        .spawn(move || {
            let _ = started_tx.send(());
            let mut signal: libc::c_int = 0;
            // SAFETY: the set blocked above; sigwait only writes `signal`.
            unsafe { libc::sigwait(&stop_signals, &mut signal) };
            if !kicker.stop(Duration::from_secs(5)) {
                // The vCPU thread does not come back (blocked writing the
                // console, or on a device): end the process, not the guest only.
                // SAFETY: _exit ends the process at once; nothing to unwind.
                unsafe { libc::_exit(70) };
            }
        })
        .map_err(|source| VmProcessError::Open { what: "signal thread", path: String::new(), source })?;
    // Its start-up system calls are done before the filter comes.
    let _ = started.recv();
    sbx_vmm::seccomp::install_on_all_threads()?;
    on_running();
    Ok(vm.run(u64::MAX)?)
}

fn boot_linux(vm: &mut MicroVm, spec: &VmSpec, kernel: &Path, initrd: Option<&Path>, extra: Option<&str>) -> Result<(), VmProcessError> {
    use sbx_vmm::linux::{kernel_cmdline, load_linux, LinuxNet, MmioDeviceSlot};
    let open = |what: &'static str, path: &Path| File::open(path).map_err(|source| VmProcessError::Open { what, path: path.display().to_string(), source });
    let mut kernel_file = open("kernel", kernel)?;
    let mut initrd_file = initrd.map(|p| open("initrd", p)).transpose()?;
    let net = LinuxNet { ipv4: spec.ipv4, prefix_len: spec.ipv4_prefix_len, gateway: spec.gateway_ipv4, dns: match spec.dns { IpAddr::V4(a) => Some(a), IpAddr::V6(_) => None } };
    let devices: Vec<MmioDeviceSlot> = (0..spec.disks.len() as u32 + 1)
        .map(|i| MmioDeviceSlot { addr: MMIO_BASE + u64::from(i) * MMIO_WINDOW, irq: sbx_vmm::vm::FIRST_DEVICE_GSI + i })
        .collect();
    let cmdline = kernel_cmdline(extra, &net, &devices)?;
    let boot = load_linux(vm.memory(), &mut kernel_file, initrd_file.as_mut(), &cmdline)?;
    vm.start_linux(boot.entry, boot.stack, boot.boot_params)?;
    Ok(())
}

/// The `__vmm` process: reads its spec, prints `ready` on stdout when the
/// guest is about to run, runs it. The exit status is the guest's.
pub fn vmm_main(spec_path: &Path) -> Result<i32, VmProcessError> {
    let bad = |reason: String| VmProcessError::BadSpec { path: spec_path.display().to_string(), reason };
    let text = std::fs::read_to_string(spec_path).map_err(|e| bad(e.to_string()))?;
    let spec: VmSpec = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let end = run_vm(&spec, || {
        println!("{READY}");
        let _ = std::io::stdout().flush();
    })?;
    eprintln!("vmm {}: {}", spec.sandbox, describe_end(end));
    Ok(exit_status(end))
}

/// How a run ended, in words.
pub fn describe_end(end: RunEnd) -> String {
    match end {
        RunEnd::Exited(0) => "the guest exited (0)".into(),
        RunEnd::Exited(code) if code >= probe::abi::EXIT_FAULT => format!("the guest faulted (vector {})", code - probe::abi::EXIT_FAULT),
        RunEnd::Exited(code) => format!("the guest exited ({code})"),
        RunEnd::Halted => "the guest halted".into(),
        RunEnd::Shutdown => "the guest shut down (triple fault or reset)".into(),
        RunEnd::Stopped => "stopped (SIGTERM)".into(),
    }
}

/// The process's exit status for a run's end (pure).
pub fn exit_status(end: RunEnd) -> i32 {
    match end {
        RunEnd::Exited(0) | RunEnd::Halted | RunEnd::Stopped => 0,
        RunEnd::Exited(code) => (code & 0x7f) as i32 | 0x40,
        RunEnd::Shutdown => 70,
    }
}

/// The daemon's side: the VMM of `spec` (written next to `log`), detached
/// in its own session; waits until the guest runs.
pub fn spawn_vm(exe: &Path, spec: &VmSpec, spec_file: &Path, log: &Path) -> Result<u32, VmProcessError> {
    let name = spec.sandbox.clone();
    let open = |what: &'static str, path: &Path| VmProcessError::Open { what, path: path.display().to_string(), source: std::io::Error::other("") };
    std::fs::write(spec_file, serde_json::to_vec(spec).expect("spec serializes")).map_err(|source| VmProcessError::Open { what: "VM spec", path: spec_file.display().to_string(), source })?;
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(|_| open("VMM log", log))?;
    let mut command = Command::new(exe);
    command.arg(VMM_ARG).arg("--sandbox").arg(&name).arg("--spec").arg(spec_file).stderr(log_file);
    let (pid, answer) = spawn_ready(&mut command, READY_TIMEOUT).map_err(|source| VmProcessError::Spawn { name: name.clone(), exe: exe.display().to_string(), source })?;
    if answer.as_deref().map(str::trim) == Some(READY) {
        return Ok(pid);
    }
    if let Err(e) = stop_vm(pid, &name) {
        tracing::error!("{e}");
    }
    let log = log.display().to_string();
    Err(match answer {
        Some(_) => VmProcessError::ExitedEarly { name, log },
        None => VmProcessError::NotReady { name, log },
    })
}

/// Whether `pid` is the VMM of `sandbox` (a pid alone may have been reused).
pub fn vm_alive(pid: u32, sandbox: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    is_vmm_of(&cmdline, sandbox)
}

/// Whether a NUL-separated command line is `… __vmm --sandbox NAME …` (pure).
pub fn is_vmm_of(cmdline: &[u8], sandbox: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.get(1).is_some_and(|a| *a == VMM_ARG.as_bytes()) && args.windows(2).any(|w| w[0] == b"--sandbox" && w[1] == sandbox.as_bytes())
}

/// Stops the VMM (SIGTERM: the guest is stopped and the process exits;
/// SIGKILL after 5 s); what is left is an error naming it. Signals go
/// through a pidfd opened while the pid was checked to be this sandbox's
/// VMM, so a reused pid is never signalled.
pub fn stop_vm(pid: u32, sandbox: &str) -> Result<(), VmProcessError> {
    let Ok(process) = crate::util::pidfd::Pidfd::open(pid) else { return Ok(()) };
    if !vm_alive(pid, sandbox) {
        return Ok(());
    }
    process.signal(libc::SIGTERM);
    if process.exited_within(Duration::from_secs(5)) || process.kill_and_wait(Duration::from_secs(5)) {
        return Ok(());
    }
    Err(VmProcessError::Left { name: sandbox.to_string(), pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            sandbox: "a".into(),
            tap: "sbx-1".into(),
            mac: [2, 0, 0, 0, 0, 1],
            ipv4: "10.0.0.2".parse().unwrap(),
            ipv4_prefix_len: 30,
            gateway_ipv4: "10.0.0.1".parse().unwrap(),
            ipv6: "fd00::2".parse().unwrap(),
            ipv6_prefix_len: 64,
            gateway_ipv6: "fd00::1".parse().unwrap(),
            dns: "10.0.0.1".parse().unwrap(),
            memory_mib: 64,
            vcpus: 1,
            disks: vec![],
            boot: VmBoot::Probe { script: SERVE_SCRIPT.into() },
            console: None,
        }
    }

    #[test]
    fn disks_parse_with_their_mode_and_default_to_read_write() {
        assert_eq!(VmDisk::parse("/i/a.img:ro"), VmDisk { path: "/i/a.img".into(), read_only: true });
        assert_eq!(VmDisk::parse("/i/a.img:rw"), VmDisk { path: "/i/a.img".into(), read_only: false });
        assert_eq!(VmDisk::parse("/i/a:b.img"), VmDisk { path: "/i/a:b.img".into(), read_only: false });
    }

    #[test]
    fn specs_outside_what_the_monitor_runs_are_refused() {
        assert!(spec().check().is_ok());
        assert!(matches!(VmSpec { memory_mib: 8, ..spec() }.check(), Err(VmProcessError::Memory(8))));
        assert!(matches!(VmSpec { memory_mib: 1024, ..spec() }.check(), Err(VmProcessError::Memory(1024))));
        assert!(matches!(VmSpec { vcpus: 2, ..spec() }.check(), Err(VmProcessError::Vcpus(2))));
        let disks = vec![VmDisk { path: "/x".into(), read_only: true }; 16];
        assert!(matches!(VmSpec { disks, ..spec() }.check(), Err(VmProcessError::TooManyDisks(15))));
    }

    #[test]
    fn a_spec_round_trips_as_json() {
        let s = VmSpec { boot: VmBoot::Linux { kernel: "/k".into(), initrd: None, cmdline: Some("quiet".into()) }, ..spec() };
        assert_eq!(serde_json::from_str::<VmSpec>(&serde_json::to_string(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn a_vmm_is_known_by_its_argv_and_sandbox() {
        assert!(is_vmm_of(b"/usr/bin/sbx-net\0__vmm\0--sandbox\0a\0--spec\0/s/vm-a.json\0", "a"));
        assert!(!is_vmm_of(b"/usr/bin/sbx-net\0__vmm\0--sandbox\0ab\0--spec\0/s\0", "a"));
        assert!(!is_vmm_of(b"/usr/bin/sbx-net\0daemon\0--sandbox\0a\0", "a"));
    }

    #[test]
    fn run_ends_map_to_exit_statuses() {
        assert_eq!(exit_status(RunEnd::Exited(0)), 0);
        assert_eq!(exit_status(RunEnd::Stopped), 0);
        assert_ne!(exit_status(RunEnd::Exited(probe::abi::EXIT_FAULT + 14)), 0);
        assert_ne!(exit_status(RunEnd::Shutdown), 0);
        assert!(describe_end(RunEnd::Exited(probe::abi::EXIT_FAULT + 14)).contains("vector 14"));
    }
}
