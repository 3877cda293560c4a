//! `sbx-net vm run SANDBOX`: asks the daemon for the sandbox (its tap,
//! addresses and the policy's `[filesystem]` mounts), then becomes the
//! sandbox's VMM in the foreground (`sandbox::vm_process`), the guest's
//! console on stdout. The exit status is the guest's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::api::{call, ClientError, Request, SandboxInfo};
use crate::policy::MountMode;
use crate::sandbox::vm_process::{describe_end, exit_status, run_vm, VmBoot, VmDisk, VmProcessError, VmSpec};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("boot").required(true).args(["probe", "kernel"])))]
pub struct VmRunArgs {
    pub sandbox: String,
    /// The test guest, running this probe script (one command per line).
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// A Linux kernel (bzImage or vmlinux); needs a host whose KVM runs
    /// stock kernels (VMX or SVM), not kvm_pvm.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Added to the kernel command line (after console, ip= and the devices).
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 64)]
    pub mem: u32,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// A disk image, `IMG`, `IMG:ro` or `IMG:rw`, after the policy's mounts.
    #[arg(long)]
    pub disk: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmCliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the daemon's answer for {0} is not a sandbox: {1}")]
    Answer(String, serde_json::Error),
    #[error("sandbox {sandbox}: {field} {value:?} is not an address")]
    Address { sandbox: String, field: &'static str, value: String },
    #[error("sandbox {0} has a netns guest on its tap: a VM needs a sandbox without one")]
    HasNetnsGuest(String),
    #[error("sandbox {0} already runs a VM (pid {1})")]
    HasVm(String, u32),
    #[error("reading the probe script {path}: {source}")]
    Probe { path: String, source: std::io::Error },
    #[error(transparent)]
    Vm(#[from] VmProcessError),
}

/// The VM spec for `args` on the sandbox the daemon described (pure).
pub fn vm_spec(info: &SandboxInfo, args: &VmRunArgs, script: Option<String>) -> Result<VmSpec, VmCliError> {
    if info.netns.is_some() {
        return Err(VmCliError::HasNetnsGuest(info.name.clone()));
    }
    if let Some(vm) = info.vm.as_ref().filter(|v| v.state == "running") {
        return Err(VmCliError::HasVm(info.name.clone(), vm.pid));
    }
    let mac = parse_mac(&info.guest_mac).ok_or_else(|| VmCliError::Address { sandbox: info.name.clone(), field: "guest_mac", value: info.guest_mac.clone() })?;
    let mut disks: Vec<VmDisk> = info.mounts.iter().map(|m| VmDisk { path: m.host.clone(), read_only: m.mode == MountMode::ReadOnly }).collect();
    disks.extend(args.disk.iter().map(|d| VmDisk::parse(d)));
    let boot = match (&args.kernel, script) {
        (Some(kernel), _) => VmBoot::Linux { kernel: kernel.clone(), initrd: args.initrd.clone(), cmdline: args.cmdline.clone() },
        (None, script) => VmBoot::Probe { script: script.unwrap_or_default() },
    };
    let spec = VmSpec {
        sandbox: info.name.clone(),
        tap: info.tap.clone(),
        mac,
        ipv4: address(info, "guest_ipv4", &info.guest_ipv4)?,
        ipv4_prefix_len: info.ipv4_prefix_len,
        gateway_ipv4: address(info, "gateway_ipv4", &info.gateway_ipv4)?,
        ipv6: address(info, "guest_ipv6", &info.guest_ipv6)?,
        ipv6_prefix_len: info.ipv6_prefix_len,
        gateway_ipv6: address(info, "gateway_ipv6", &info.gateway_ipv6)?,
        dns: address(info, "dns", &info.dns)?,
        memory_mib: args.mem,
        vcpus: args.vcpus,
        disks,
        boot,
        console: None,
    };
    spec.check()?;
    Ok(spec)
}

fn address<T: std::str::FromStr>(info: &SandboxInfo, field: &'static str, value: &str) -> Result<T, VmCliError> {
    value.parse().map_err(|_| VmCliError::Address { sandbox: info.name.clone(), field, value: value.to_string() })
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>().ok()?;
    bytes.try_into().ok()
}

/// `sbx-net vm run`: the exit status to leave with.
pub fn run(socket: &Path, args: &VmRunArgs) -> Result<i32, VmCliError> {
    let script = match &args.probe {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|source| VmCliError::Probe { path: path.display().to_string(), source })?),
        None => None,
    };
    let answer = call(socket, &Request::SandboxShow { name: args.sandbox.clone() }, Duration::from_secs(30))?;
    let info: SandboxInfo = serde_json::from_value(answer).map_err(|e| VmCliError::Answer(args.sandbox.clone(), e))?;
    let spec = vm_spec(&info, args, script)?;
    let end = run_vm(&spec, || {})?;
    eprintln!("sbx-net vm: {}", describe_end(end));
    Ok(exit_status(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SandboxInfo {
        serde_json::from_value(serde_json::json!({
            "name": "a", "id": 1, "policy": "p", "policy_generation": 1, "tap": "sbx-1", "adopted_tap": false, "netns": null,
            "guest_ipv4": "10.0.0.2", "guest_ipv6": "fd00::2", "guest_mac": "02:00:00:00:00:01", "gateway_ipv4": "10.0.0.1",
            "gateway_ipv6": "fd00::1", "gateway_mac": "02:00:00:00:00:02", "ipv4_prefix_len": 30, "ipv6_prefix_len": 64,
            "dns": "10.0.0.1", "ca_cert": "", "created_unix": 0,
            "mounts": [{ "host": "/img/repo.img", "guest": "/work", "mode": "rw" }]
        }))
        .unwrap()
    }

    fn args() -> VmRunArgs {
        VmRunArgs { sandbox: "a".into(), probe: None, kernel: None, initrd: None, cmdline: None, mem: 64, vcpus: 1, disk: vec!["/img/extra.img:ro".into()] }
    }

    #[test]
    fn the_spec_takes_the_sandbox_network_and_the_policy_mounts_before_extra_disks() {
        let spec = vm_spec(&info(), &args(), Some("ping 10.0.0.1\n".into())).unwrap();
        assert_eq!(spec.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(spec.ipv4.to_string(), "10.0.0.2");
        assert_eq!(spec.tap, "sbx-1");
        assert_eq!(spec.disks, vec![VmDisk { path: "/img/repo.img".into(), read_only: false }, VmDisk { path: "/img/extra.img".into(), read_only: true }]);
        assert_eq!(spec.boot, VmBoot::Probe { script: "ping 10.0.0.1\n".into() });
    }

    #[test]
    fn a_sandbox_with_another_guest_gets_no_vm() {
        let mut with_netns = info();
        with_netns.netns = Some("sbx-a".into());
        assert!(matches!(vm_spec(&with_netns, &args(), None), Err(VmCliError::HasNetnsGuest(_))));
        let mut with_vm = info();
        with_vm.vm = Some(crate::control::api::VmInfo { pid: 7, state: "running".into(), console: String::new() });
        assert!(matches!(vm_spec(&with_vm, &args(), None), Err(VmCliError::HasVm(_, 7))));
        assert!(matches!(vm_spec(&info(), &VmRunArgs { vcpus: 4, ..args() }, None), Err(VmCliError::Vm(VmProcessError::Vcpus(4)))));
    }
}
