//! The test guest (`guest/`): its image, built by this crate's build
//! script, and how the monitor boots it: the ELF loaded by linux-loader at
//! 1 MiB, the boot information and the probe script written where the
//! guest looks for them ([`abi`]), the vCPU started in long mode.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::vm::{MicroVm, VmError};

/// The contract with the guest: the guest's own file, included as is.
#[path = "../../guest/src/abi.rs"]
pub mod abi;

/// The guest image (a static ELF for x86_64-unknown-none).
pub const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sbx-net-guest"));

/// The least memory the guest runs in: its image and stacks below 4 MiB,
/// then its heap (socket and DMA buffers).
pub const MIN_MEMORY: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the probe script is {len} bytes; at most {max} fit")]
    ScriptTooLarge { len: usize, max: u64 },
    #[error("the guest needs at least {} MiB of memory", MIN_MEMORY >> 20)]
    TooLittleMemory,
    #[error("loading the guest image: {0}")]
    Load(String),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The network the sandbox gave the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeNetwork {
    pub ipv4: Option<(Ipv4Addr, u8, Ipv4Addr)>,
    pub ipv6: Option<(Ipv6Addr, u8, Ipv6Addr)>,
    pub dns: Vec<IpAddr>,
}

/// The script the guest runs: the network lines, then the probe (pure).
pub fn script(net: &ProbeNetwork, probe: &str) -> Result<String, ProbeError> {
    let mut out = String::from("# network (from the sandbox)\n");
    if let Some((addr, len, gw)) = net.ipv4 {
        out.push_str(&format!("ipv4 {addr}/{len} {gw}\n"));
    }
    if let Some((addr, len, gw)) = net.ipv6 {
        out.push_str(&format!("ipv6 {addr}/{len} {gw}\n"));
    }
    if !net.dns.is_empty() {
        let servers: Vec<String> = net.dns.iter().take(2).map(|a| a.to_string()).collect();
        out.push_str(&format!("dns {}\n", servers.join(" ")));
    }
    out.push_str("# probe\n");
    out.push_str(probe);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    if out.len() as u64 > abi::SCRIPT_MAX {
        return Err(ProbeError::ScriptTooLarge { len: out.len(), max: abi::SCRIPT_MAX });
    }
    Ok(out)
}

/// The boot information for a VM with `memory_size` bytes and these
/// device windows (pure).
pub fn boot_info(tsc_khz: u64, memory_size: u64, script_len: usize, windows: &[u64]) -> abi::BootInfo {
    let mut devices = [0u64; abi::MAX_DEVICES];
    let n = windows.len().min(abi::MAX_DEVICES);
    devices[..n].copy_from_slice(&windows[..n]);
    abi::BootInfo {
        magic: abi::BOOT_INFO_MAGIC,
        tsc_khz,
        memory_size,
        script_addr: abi::SCRIPT_ADDR,
        script_len: script_len as u64,
        device_count: n as u64,
        devices,
    }
}

/// The host's TSC frequency when KVM does not say (the guest's clock runs
/// on the host's TSC).
fn host_tsc_khz() -> u64 {
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok());
    read("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        .or_else(|| {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
            let mhz = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse::<f64>().ok()?;
            Some((mhz * 1000.0) as u64)
        })
        .unwrap_or(1_000_000)
}

/// Loads the guest into `vm` (devices already added), writes its boot
/// information and `script`, and points the vCPU at its entry.
pub fn boot(vm: &mut MicroVm, memory_size: usize, script: &str) -> Result<(), ProbeError> {
    if memory_size < MIN_MEMORY {
        return Err(ProbeError::TooLittleMemory);
    }
    if script.len() as u64 > abi::SCRIPT_MAX {
        return Err(ProbeError::ScriptTooLarge { len: script.len(), max: abi::SCRIPT_MAX });
    }
    let mut image = std::io::Cursor::new(IMAGE);
    let loaded = linux_loader::loader::elf::Elf::load(vm.memory(), None, &mut image, Some(GuestAddress(abi::IMAGE_BASE))).map_err(|e| ProbeError::Load(e.to_string()))?;
    let tsc_khz = vm.tsc_khz().map(u64::from).unwrap_or_else(host_tsc_khz);
    let info = boot_info(tsc_khz, memory_size as u64, script.len(), &vm.device_windows());
    let write = |addr: u64, bytes: &[u8]| vm.memory().write_slice(bytes, GuestAddress(addr)).map_err(|e| ProbeError::Load(e.to_string()));
    write(abi::BOOT_INFO_ADDR, &info.to_bytes())?;
    write(abi::SCRIPT_ADDR, script.as_bytes())?;
    vm.start_long_mode(loaded.kernel_load.0, abi::BOOT_STACK_TOP)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_starts_with_the_sandbox_network() {
        let net = ProbeNetwork {
            ipv4: Some(("10.0.0.2".parse().unwrap(), 30, "10.0.0.1".parse().unwrap())),
            ipv6: Some(("fd00::2".parse().unwrap(), 64, "fd00::1".parse().unwrap())),
            dns: vec!["10.0.0.1".parse().unwrap()],
        };
        let s = script(&net, "ping 10.0.0.1").unwrap();
        assert_eq!(s, "# network (from the sandbox)\nipv4 10.0.0.2/30 10.0.0.1\nipv6 fd00::2/64 fd00::1\ndns 10.0.0.1\n# probe\nping 10.0.0.1\n");
        let huge = "x".repeat(abi::SCRIPT_MAX as usize);
        assert!(matches!(script(&net, &huge), Err(ProbeError::ScriptTooLarge { .. })));
    }

    #[test]
    fn the_boot_information_lists_the_windows_in_little_endian_words() {
        let info = boot_info(2_000_000, 64 << 20, 10, &[0x3000_0000, 0x3000_1000]);
        let bytes = info.to_bytes();
        assert_eq!(&bytes[..8], b"SBXGUEST");
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 2_000_000);
        assert_eq!(u64::from_le_bytes(bytes[40..48].try_into().unwrap()), 2, "device_count");
        assert_eq!(u64::from_le_bytes(bytes[48..56].try_into().unwrap()), 0x3000_0000);
        assert_eq!(u64::from_le_bytes(bytes[56..64].try_into().unwrap()), 0x3000_1000);
        assert_eq!(bytes.len(), core::mem::size_of::<abi::BootInfo>(), "the guest reads the struct in place");
    }

    #[test]
    fn the_image_is_a_static_elf_for_x86_64_at_one_mib() {
        assert_eq!(&IMAGE[..4], b"\x7fELF");
        assert_eq!(IMAGE[4], 2, "64-bit");
        assert_eq!(u16::from_le_bytes([IMAGE[16], IMAGE[17]]), 2, "ET_EXEC: nothing to relocate");
        assert_eq!(u16::from_le_bytes([IMAGE[18], IMAGE[19]]), 62, "x86-64");
        let entry = u64::from_le_bytes(IMAGE[24..32].try_into().unwrap());
        assert_eq!(entry, abi::IMAGE_BASE);
    }
}
