//! Linux guests: the kernel command line the monitor gives them, loading a
//! bzImage (or an ELF vmlinux) and an initrd into guest memory with the zero
//! page of the 64-bit boot protocol, and whether this host's KVM can boot a
//! stock kernel at all.
//!
//! The decisions are pure functions ([`kernel_cmdline`], `boot_params`,
//! `initrd_address`, `linux_boot_support`, …) unit-tested without KVM;
//! [`load_linux`] and [`host_boots_linux`] only add the file and memory I/O.
//!
//! Guest physical layout (the one Firecracker uses for the low structures):
//!
//! | where                 | what                                                     |
//! |-----------------------|----------------------------------------------------------|
//! | 0x500, 0x520          | GDT, IDT ([`crate::vm::boot`], written by `start_long_mode`) |
//! | 0x7000                | zero page (`boot_params`, 4 KiB); rsi points here         |
//! | 0x8ff0                | initial stack, growing down towards the zero page's end   |
//! | 0x9000..0xc000        | identity page tables ([`crate::vm::boot`])                |
//! | 0x20000               | kernel command line, NUL-terminated                       |
//! | 0x9fc00..0x100000     | where a PC has its EBDA, VGA and BIOS: left out of e820    |
//! | 0x100000 (1 MiB)      | a bzImage's protected-mode kernel (its `code32_start`)    |
//! | top of memory         | the initrd, page-aligned, as high as it fits              |

use std::fs::File;
use std::io::{Read, Seek};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, XLF_KERNEL_64};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Where the zero page goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// The vCPU's rsp at the kernel's entry: below the page tables, above the
/// zero page. The kernel switches to its own stack within a few
/// instructions; this one only has to be valid memory nothing else uses.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Where the kernel command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The end of the low RAM a PC reports: the EBDA starts here.
const EBDA_START: u64 = 0x9_fc00;
/// Where high memory (and the protected-mode kernel) starts.
const HIMEM_START: u64 = 0x10_0000;
/// x86's COMMAND_LINE_SIZE, including the terminating NUL: the longest
/// command line a kernel takes unless its setup header says otherwise.
pub const CMDLINE_CAPACITY: usize = 2048;
/// The 64-bit entry point (`startup_64`) sits this far into the
/// protected-mode kernel of a bzImage (boot protocol 2.12+, "64-bit boot
/// protocol" in Documentation/arch/x86/boot.rst).
const STARTUP_64_OFFSET: u64 = 0x200;
/// The boot protocol's `initrd_addr_max` for kernels whose header predates
/// the field (and the one used for an ELF vmlinux, which has no header).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 0x1000;
/// `type_of_loader`: "undefined" (no registered boot loader id).
const LOADER_UNDEFINED: u8 = 0xff;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// "HdrS": the setup header magic at 0x202 of a bzImage.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;

// The low structures must not overlap one another nor the tables
// `MicroVm::start_long_mode` writes.
const _: () = assert!(ZERO_PAGE_ADDR >= crate::vm::boot::IDT_ADDR + 8);
const _: () = assert!(ZERO_PAGE_ADDR + std::mem::size_of::<boot_params>() as u64 <= BOOT_STACK);
const _: () = assert!(BOOT_STACK < crate::vm::boot::PML4_ADDR);
const _: () = assert!(crate::vm::boot::PD_ADDR + PAGE_SIZE <= CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_CAPACITY as u64 <= EBDA_START);

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("guest network: prefix length /{0} is not in 1..=32")]
    PrefixLength(u8),
    #[error("guest network: the {what} is 0.0.0.0, which the kernel's ip= reads as \"not given\"")]
    Unspecified { what: &'static str },
    #[error(
        "guest network: gateway {gateway} is not on {ipv4}/{prefix_len}: the kernel's ip= would not install the default route"
    )]
    GatewayOffLink { ipv4: Ipv4Addr, prefix_len: u8, gateway: Ipv4Addr },
    #[error("extra kernel command line: {reason}")]
    ExtraCmdline { reason: String },
    #[error("kernel command line: {0} (at most {max} bytes of printable ASCII)", max = CMDLINE_CAPACITY - 1)]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot read {file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("kernel {file}: neither a bzImage (no \"HdrS\" at 0x202) nor an ELF vmlinux (no \\x7fELF at 0)")]
    NotAKernel { file: PathBuf },
    #[error("kernel {file}: {source}")]
    Load { file: PathBuf, source: linux_loader::loader::Error },
    #[error(
        "kernel {file}: boot protocol {version:#06x} without XLF_KERNEL_64 in xloadflags ({xloadflags:#x}) has no 64-bit entry point, and this monitor starts vCPUs in long mode"
    )]
    No64BitEntry { file: PathBuf, version: u16, xloadflags: u16 },
    #[error("kernel {file} needs guest memory up to {needs:#x} to decompress and run; the VM has {memory:#x} bytes")]
    KernelDoesNotFit { file: PathBuf, needs: u64, memory: u64 },
    #[error("the kernel command line is {len} bytes; kernel {file} takes at most {max}")]
    CmdlineTooLong { file: PathBuf, len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte: the kernel would ignore everything after it")]
    CmdlineNul,
    #[error("initrd {file} is empty")]
    InitrdEmpty { file: PathBuf },
    #[error(
        "the initrd ({len} bytes) does not fit between the kernel's end at {floor:#x} and {ceiling:#x} (the end of guest memory, or the kernel's initrd_addr_max)"
    )]
    InitrdDoesNotFit { len: u64, floor: u64, ceiling: u64 },
    #[error("guest memory must be one range from address 0 (the e820 map says so), not {0}")]
    MemoryLayout(String),
    #[error("writing {what} into guest memory: {source}")]
    Memory { what: &'static str, source: vm_memory::GuestMemoryError },
    #[error("writing the zero page at {ZERO_PAGE_ADDR:#x}: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    #[error(
        "this host's KVM is kvm_pvm (/sys/module/kvm_pvm exists): it runs only PVM guest kernels, and a stock Linux kernel stops at its first privileged instruction; run --kernel on a host with VMX or SVM KVM, or use --probe"
    )]
    PvmOnly,
    #[error(
        "this host has no hardware virtualization (neither vmx nor svm in /proc/cpuinfo's flags) and no kvm_pvm: KVM cannot run a Linux guest here; run --kernel on a host with VMX or SVM KVM"
    )]
    NoHardwareVirtualization,
}

/// The guest's one NIC, configured by the kernel itself (`ip=`) so no
/// guest userspace is needed for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxNet {
    pub ipv4: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Option<Ipv4Addr>,
}

/// A virtio-mmio device's window (one `vm::MMIO_WINDOW`) and interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceSlot {
    pub addr: u64,
    pub irq: u32,
}

/// What the caller puts in the vCPU's registers: rip = `entry`, rsi =
/// `boot_params` (the 64-bit boot protocol's only argument), rsp = `stack`,
/// after `MicroVm::start_long_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    pub entry: u64,
    pub boot_params: u64,
    pub stack: u64,
}

/// The kernel command line: serial console, reboot and panic behaviour that
/// end the VM instead of hanging it, no PCI probing (there is no PCI bus),
/// the NIC configured by `ip=`, one `virtio_mmio.device=` per device, then
/// the user's `extra`. Built with linux-loader's [`Cmdline`], so its length
/// and character checks apply.
pub fn kernel_cmdline(extra: Option<&str>, net: &LinuxNet, devices: &[MmioDeviceSlot]) -> Result<String, LinuxError> {
    let mut cmdline = Cmdline::new(CMDLINE_CAPACITY).map_err(LinuxError::Cmdline)?;
    // reboot=k: a guest reboot is a keyboard-controller reset, which KVM
    // reports as a shutdown exit; panic=1: a panicking guest reboots (and so
    // ends the run) after a second instead of hanging.
    for fixed in ["console=ttyS0", "reboot=k", "panic=1", "pci=off"] {
        cmdline.insert_str(fixed).map_err(LinuxError::Cmdline)?;
    }
    cmdline.insert_str(ip_argument(net)?).map_err(LinuxError::Cmdline)?;
    for device in devices {
        cmdline
            .add_virtio_mmio_device(crate::vm::MMIO_WINDOW, GuestAddress(device.addr), device.irq, None)
            .map_err(LinuxError::Cmdline)?;
    }
    if let Some(extra) = extra.filter(|e| !e.trim().is_empty()) {
        check_extra(extra)?;
        cmdline.insert_str(extra).map_err(LinuxError::Cmdline)?;
    }
    let cmdline = cmdline.as_cstring().map_err(LinuxError::Cmdline)?;
    Ok(cmdline.into_string().expect("Cmdline admits printable ASCII only"))
}

/// `ip=<client>::<gateway>:<netmask>::eth0:off[:<dns0>]`
/// (Documentation/admin-guide/nfs/nfsroot.rst: no boot server, no host
/// name, autoconfiguration off).
fn ip_argument(net: &LinuxNet) -> Result<String, LinuxError> {
    if net.prefix_len == 0 || net.prefix_len > 32 {
        // /0 would be written as netmask 0.0.0.0, which the kernel takes as
        // "not given" and replaces with the address's class mask.
        return Err(LinuxError::PrefixLength(net.prefix_len));
    }
    let netmask = u32::MAX << (32 - u32::from(net.prefix_len));
    for (what, addr) in [("guest address", Some(net.ipv4)), ("gateway", Some(net.gateway)), ("DNS server", net.dns)] {
        if addr == Some(Ipv4Addr::UNSPECIFIED) {
            return Err(LinuxError::Unspecified { what });
        }
    }
    // The kernel's ipconfig refuses a gateway off the local subnet ("Gateway
    // not on directly connected network") and the guest would have no route.
    if (u32::from(net.ipv4) ^ u32::from(net.gateway)) & netmask != 0 || net.ipv4 == net.gateway {
        return Err(LinuxError::GatewayOffLink { ipv4: net.ipv4, prefix_len: net.prefix_len, gateway: net.gateway });
    }
    let mut argument = format!("ip={}::{}:{}::eth0:off", net.ipv4, net.gateway, Ipv4Addr::from(netmask));
    if let Some(dns) = net.dns {
        argument.push_str(&format!(":{dns}"));
    }
    Ok(argument)
}

/// Refuses user extras that would undo what the monitor set. The kernel
/// reads parameters up to a bare `--` (the rest goes to init), strips a
/// leading quote, treats `-` and `_` in names alike, and obeys the last of
/// repeated `ip=`; so does this check.
fn check_extra(extra: &str) -> Result<(), LinuxError> {
    if extra.contains('\0') {
        return Err(LinuxError::ExtraCmdline {
            reason: "contains a NUL byte, which ends the command line: the kernel would silently ignore everything after it".into(),
        });
    }
    for token in extra.split_ascii_whitespace() {
        if token == "--" {
            break;
        }
        let Some((name, _)) = token.trim_start_matches('"').split_once('=') else { continue };
        match name.replace('-', "_").as_str() {
            "ip" | "nfsaddrs" => {
                return Err(LinuxError::ExtraCmdline {
                    reason: format!(
                        "{token:?} sets the guest's IP configuration, which comes from the sandbox's network (the kernel obeys the last ip=, so this one would replace it)"
                    ),
                })
            }
            "virtio_mmio.device" => {
                return Err(LinuxError::ExtraCmdline {
                    reason: format!(
                        "{token:?} declares a virtio-mmio device; the monitor places every device's window and interrupt, and another one would point the guest's driver at a window with no device behind it, or at another device's"
                    ),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// What a kernel file is, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageKind {
    BzImage,
    Elf,
}

/// Enough of the file to see both magics.
const IMAGE_HEAD_LEN: u64 = 0x206;

fn image_kind(head: &[u8]) -> Option<ImageKind> {
    // An ELF magic at 0 is unambiguous (a bzImage starts with a boot sector
    // or a PE "MZ"); an ELF's bytes at 0x202 are arbitrary.
    if head.starts_with(b"\x7fELF") {
        Some(ImageKind::Elf)
    } else if head.get(0x202..0x206) == Some(&SETUP_HEADER_MAGIC.to_le_bytes()[..]) {
        Some(ImageKind::BzImage)
    } else {
        None
    }
}

/// The 64-bit entry point exists from boot protocol 2.12 on, and only in
/// kernels that set XLF_KERNEL_64.
fn check_64bit_entry(file: &Path, header: &setup_header) -> Result<(), LinuxError> {
    let (version, xloadflags) = (header.version, header.xloadflags);
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::No64BitEntry { file: file.to_path_buf(), version, xloadflags });
    }
    Ok(())
}

/// The longest command line (without its NUL) the kernel takes: the setup
/// header's `cmdline_size` from protocol 2.06, 255 before, and
/// COMMAND_LINE_SIZE for an ELF vmlinux; never more than fits below the
/// EBDA from [`CMDLINE_ADDR`].
fn cmdline_max_len(header: Option<&setup_header>) -> usize {
    let kernel_max = match header {
        None => CMDLINE_CAPACITY - 1,
        Some(h) if h.version >= 0x0206 => h.cmdline_size as usize,
        Some(_) => 255,
    };
    kernel_max.min((EBDA_START - CMDLINE_ADDR - 1) as usize)
}

/// Where the kernel's memory ends once it runs. A bzImage decompresses
/// itself into `init_size` bytes from its run address: `pref_address`, or
/// the load address rounded up to `kernel_alignment` when that is higher
/// and the kernel is relocatable (what arch/x86/boot/compressed/head_64.S
/// computes without KASLR; with KASLR the kernel avoids the initrd by
/// itself). An ELF vmlinux ends where its last segment (bss included) ends.
fn kernel_footprint_end(header: Option<&setup_header>, kernel_load: u64, kernel_end: u64) -> u64 {
    let Some(h) = header.filter(|h| h.version >= 0x020a) else { return kernel_end };
    let (pref_address, init_size, alignment) = (h.pref_address, u64::from(h.init_size), u64::from(h.kernel_alignment));
    let run_address = if h.relocatable_kernel != 0 && alignment.is_power_of_two() {
        kernel_load.checked_next_multiple_of(alignment).unwrap_or(u64::MAX).max(pref_address)
    } else {
        pref_address
    };
    kernel_end.max(run_address.saturating_add(init_size))
}

/// The highest address the initrd may reach (inclusive), per the header.
fn initrd_addr_max(header: Option<&setup_header>) -> u64 {
    match header {
        Some(h) if h.version >= 0x0203 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    }
}

/// The initrd's address: page-aligned, as high as it fits below the end of
/// memory and the kernel's `initrd_addr_max` (inclusive), and not below
/// `floor`, where the kernel's memory ends. High, because the kernel
/// decompresses itself upwards from low memory, and a loader that puts the
/// initrd right after the kernel sees it overwritten.
fn initrd_address(mem_size: u64, initrd_len: u64, initrd_addr_max: u64, floor: u64) -> Result<u64, LinuxError> {
    let ceiling = mem_size.min(initrd_addr_max.saturating_add(1));
    ceiling
        .checked_sub(initrd_len)
        .map(|highest| highest & !(PAGE_SIZE - 1))
        .filter(|&addr| addr >= floor)
        .ok_or(LinuxError::InitrdDoesNotFit { len: initrd_len, floor, ceiling })
}

/// The e820 map: low RAM up to the EBDA, then everything from 1 MiB. The
/// hole between is where a PC has its EBDA, VGA memory and BIOS; the kernel
/// expects it not to be RAM.
fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let ram = |addr: u64, end: u64| boot_e820_entry { addr, size: end - addr, r#type: E820_RAM };
    let mut map = vec![ram(0, mem_size.min(EBDA_START))];
    if mem_size > HIMEM_START {
        map.push(ram(HIMEM_START, mem_size));
    }
    map
}

/// The zero page: the kernel's own setup header (or, for an ELF vmlinux,
/// a fresh one with the fields the kernel checks), with what the loader
/// fills in: its type, the command line, the initrd, and the memory map.
/// Addresses are below 4 GiB (guest memory ends below 1 GiB), so the
/// `ext_*` high halves stay zero.
fn boot_params(header: Option<setup_header>, cmdline_addr: u64, cmdline_len: usize, initrd: Option<(u64, u32)>, mem_size: u64) -> boot_params {
    let mut params = boot_params::default();
    match header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = SETUP_HEADER_MAGIC;
            params.hdr.kernel_alignment = 0x100_0000;
            // A bzImage's cmdline_size is the kernel's limit, for the loader
            // to read; a fresh header has none, so it says what is there.
            params.hdr.cmdline_size = cmdline_len as u32;
        }
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = cmdline_addr as u32;
    if let Some((addr, len)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len;
    }
    let map = e820_map(mem_size);
    params.e820_entries = map.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = entry;
    }
    params
}

/// The path a file was opened from, for error messages (the caller passes
/// an open file; /proc still knows its name).
fn path_of(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_else(|_| PathBuf::from(format!("<fd {fd}>")))
}

/// Loads `kernel` (a bzImage, or else an ELF vmlinux), `initrd` and
/// `cmdline` into `memory` and writes the zero page; returns what the vCPU
/// starts with. Checks that the kernel offers a 64-bit entry point, that
/// the command line and the decompressed kernel fit, and that the initrd
/// fits above the kernel.
pub fn load_linux(memory: &GuestMemoryMmap<()>, kernel: &mut File, initrd: Option<&mut File>, cmdline: &str) -> Result<LinuxBoot, LinuxError> {
    let kernel_path = path_of(kernel);
    let read_error = |file: &Path| {
        let file = file.to_path_buf();
        move |source| LinuxError::Read { file, source }
    };

    let mem_size = memory.last_addr().raw_value() + 1;
    if !memory.check_range(GuestAddress(0), mem_size as usize) {
        return Err(LinuxError::MemoryLayout(format!("{} regions with holes up to {mem_size:#x}", memory.num_regions())));
    }
    if cmdline.contains('\0') {
        return Err(LinuxError::CmdlineNul);
    }

    let mut head = Vec::new();
    kernel.rewind().map_err(read_error(&kernel_path))?;
    kernel.by_ref().take(IMAGE_HEAD_LEN).read_to_end(&mut head).map_err(read_error(&kernel_path))?;
    let kind = image_kind(&head).ok_or_else(|| LinuxError::NotAKernel { file: kernel_path.clone() })?;
    // High memory starts at 1 MiB: a kernel asking to be loaded lower would
    // overwrite the zero page, the command line or the page tables.
    let highmem = Some(GuestAddress(HIMEM_START));
    let loaded = match kind {
        ImageKind::BzImage => BzImage::load(memory, None, kernel, highmem),
        ImageKind::Elf => Elf::load(memory, None, kernel, highmem),
    }
    .map_err(|source| LinuxError::Load { file: kernel_path.clone(), source })?;
    let header = loaded.setup_header;
    let kernel_load = loaded.kernel_load.raw_value();
    let entry = match (kind, &header) {
        (ImageKind::BzImage, Some(h)) => {
            check_64bit_entry(&kernel_path, h)?;
            kernel_load + STARTUP_64_OFFSET
        }
        // An ELF vmlinux's entry is startup_64 itself.
        _ => kernel_load,
    };

    let cmdline_max = cmdline_max_len(header.as_ref());
    if cmdline.len() > cmdline_max {
        return Err(LinuxError::CmdlineTooLong { file: kernel_path, len: cmdline.len(), max: cmdline_max });
    }
    let footprint_end = kernel_footprint_end(header.as_ref(), kernel_load, loaded.kernel_end);
    if footprint_end > mem_size {
        return Err(LinuxError::KernelDoesNotFit { file: kernel_path, needs: footprint_end, memory: mem_size });
    }

    let initrd = match initrd {
        None => None,
        Some(file) => {
            let path = path_of(file);
            let len = file.metadata().map_err(read_error(&path))?.len();
            if len == 0 {
                return Err(LinuxError::InitrdEmpty { file: path });
            }
            let addr = initrd_address(mem_size, len, initrd_addr_max(header.as_ref()), footprint_end)?;
            // initrd_address kept it below initrd_addr_max + 1 <= 4 GiB.
            let size = u32::try_from(len).map_err(|_| LinuxError::InitrdDoesNotFit { len, floor: footprint_end, ceiling: mem_size })?;
            file.rewind().map_err(read_error(&path))?;
            memory
                .read_exact_volatile_from(GuestAddress(addr), file, len as usize)
                .map_err(|source| LinuxError::Memory { what: "the initrd", source })?;
            Some((addr, size))
        }
    };

    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    memory
        .write_slice(&cmdline_bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| LinuxError::Memory { what: "the kernel command line", source })?;
    let params = boot_params(header, CMDLINE_ADDR, cmdline.len(), initrd, mem_size);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)), memory)
        .map_err(LinuxError::ZeroPage)?;
    Ok(LinuxBoot { entry, boot_params: ZERO_PAGE_ADDR, stack: BOOT_STACK })
}

/// Whether a flag is in /proc/cpuinfo's `flags` lines.
fn cpu_has_flag(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_ascii_whitespace().any(|f| f == flag))
}

/// Whether a stock Linux kernel can boot under this host's KVM, from
/// whether the kvm_pvm module is there and /proc/cpuinfo's text. kvm_pvm
/// runs guests in a paravirtual mode without hardware virtualization, and
/// only kernels built as PVM guests cooperate with it.
fn linux_boot_support(pvm_module_present: bool, cpuinfo: &str) -> Result<(), LinuxError> {
    if pvm_module_present {
        return Err(LinuxError::PvmOnly);
    }
    if !cpu_has_flag(cpuinfo, "vmx") && !cpu_has_flag(cpuinfo, "svm") {
        return Err(LinuxError::NoHardwareVirtualization);
    }
    Ok(())
}

/// [`linux_boot_support`] for this host. kvm_pvm may be built in, so
/// /sys/module (which lists built-in modules too) is asked, not
/// /proc/modules.
pub fn host_boots_linux() -> Result<(), LinuxError> {
    let pvm_module_present = Path::new("/sys/module/kvm_pvm").exists();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").map_err(|source| LinuxError::Read { file: "/proc/cpuinfo".into(), source })?;
    linux_boot_support(pvm_module_present, &cpuinfo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::bootparam::LOADED_HIGH;
    use std::io::Write;
    use vm_memory::ByteValued;

    const MIB: u64 = 1 << 20;
    /// Where the setup header starts in a bzImage (and in the zero page).
    const SETUP_HEADER_OFFSET: usize = 0x1f1;

    fn net() -> LinuxNet {
        LinuxNet { ipv4: Ipv4Addr::new(10, 200, 0, 2), prefix_len: 30, gateway: Ipv4Addr::new(10, 200, 0, 1), dns: None }
    }

    fn devices() -> Vec<MmioDeviceSlot> {
        vec![MmioDeviceSlot { addr: crate::vm::MMIO_BASE, irq: 5 }, MmioDeviceSlot { addr: crate::vm::MMIO_BASE + 0x1000, irq: 6 }]
    }

    #[test]
    fn the_cmdline_has_the_console_the_nic_the_devices_then_the_extras() {
        let cmdline = kernel_cmdline(Some("  quiet init=/sbin/agent  "), &net(), &devices()).unwrap();
        assert_eq!(
            cmdline,
            "console=ttyS0 reboot=k panic=1 pci=off ip=10.200.0.2::10.200.0.1:255.255.255.252::eth0:off \
             virtio_mmio.device=4K@0x30000000:5 virtio_mmio.device=4K@0x30001000:6 quiet init=/sbin/agent"
        );
        let with_dns = kernel_cmdline(None, &LinuxNet { dns: Some(Ipv4Addr::new(10, 200, 0, 1)), ..net() }, &[]).unwrap();
        assert!(with_dns.ends_with(" ip=10.200.0.2::10.200.0.1:255.255.255.252::eth0:off:10.200.0.1"), "{with_dns}");
        assert_eq!(kernel_cmdline(Some("   "), &net(), &[]).unwrap(), kernel_cmdline(None, &net(), &[]).unwrap());
    }

    #[test]
    fn netmasks_follow_the_prefix_and_bad_networks_are_refused() {
        let mask = |prefix_len, gateway| ip_argument(&LinuxNet { prefix_len, gateway, ..net() });
        assert!(mask(24, Ipv4Addr::new(10, 200, 0, 1)).unwrap().contains(":255.255.255.0::"));
        assert!(mask(1, Ipv4Addr::new(10, 200, 0, 1)).unwrap().contains(":128.0.0.0::"));
        assert!(matches!(mask(0, Ipv4Addr::new(10, 200, 0, 1)), Err(LinuxError::PrefixLength(0))));
        assert!(matches!(mask(33, Ipv4Addr::new(10, 200, 0, 1)), Err(LinuxError::PrefixLength(33))));
        let off_link = mask(30, Ipv4Addr::new(10, 200, 0, 5)).unwrap_err();
        assert!(off_link.to_string().contains("not on 10.200.0.2/30"), "{off_link}");
        assert!(matches!(mask(32, Ipv4Addr::new(10, 200, 0, 1)), Err(LinuxError::GatewayOffLink { .. })));
        assert!(matches!(mask(30, Ipv4Addr::new(10, 200, 0, 2)), Err(LinuxError::GatewayOffLink { .. })), "the gateway is not the guest");
        let no_dns = ip_argument(&LinuxNet { dns: Some(Ipv4Addr::UNSPECIFIED), ..net() }).unwrap_err();
        assert!(no_dns.to_string().contains("DNS server is 0.0.0.0"), "{no_dns}");
    }

    #[test]
    fn extras_may_not_override_the_network_or_the_devices() {
        for extra in [
            "ip=dhcp",
            "quiet ip=10.0.0.9::10.0.0.1:255.0.0.0::eth0:off",
            "\"ip=10.0.0.9\"",
            "nfsaddrs=10.0.0.9",
            "virtio_mmio.device=4K@0x40000000:9",
            "virtio-mmio.device=4K@0x40000000:9",
        ] {
            let e = kernel_cmdline(Some(extra), &net(), &[]).expect_err(extra);
            assert!(matches!(e, LinuxError::ExtraCmdline { .. }), "{extra}: {e}");
        }
        let nul = kernel_cmdline(Some("quiet\0ip=dhcp"), &net(), &[]).unwrap_err();
        assert!(nul.to_string().contains("NUL byte"), "{nul}");
        // Arguments for init, and names that only start alike, are fine.
        assert!(kernel_cmdline(Some("quiet -- ip=1.2.3.4"), &net(), &[]).is_ok());
        assert!(kernel_cmdline(Some("ipv6.disable=1 iprule=x"), &net(), &[]).is_ok());
    }

    #[test]
    fn cmdline_checks_from_linux_loader_apply() {
        let long = "x".repeat(CMDLINE_CAPACITY);
        let e = kernel_cmdline(Some(&long), &net(), &[]).unwrap_err();
        assert!(matches!(e, LinuxError::Cmdline(linux_loader::cmdline::Error::TooLarge)), "{e}");
        assert!(e.to_string().contains("at most 2047 bytes"), "{e}");
        let e = kernel_cmdline(Some("quiet\tsplash"), &net(), &[]).unwrap_err();
        assert!(matches!(e, LinuxError::Cmdline(linux_loader::cmdline::Error::InvalidAscii)), "{e}");
    }

    /// A bzImage setup header as a 64-bit kernel has it (what
    /// arch/x86/boot/header.S puts there), for the pure tests.
    fn kernel_header() -> setup_header {
        setup_header {
            setup_sects: 1,
            boot_flag: 0xaa55,
            header: SETUP_HEADER_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            code32_start: HIMEM_START as u32,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size: 0x100_0000,
            ..Default::default()
        }
    }

    #[test]
    fn the_zero_page_has_the_fields_a_64_bit_boot_needs() {
        let header = kernel_header();
        let params = boot_params(Some(header), CMDLINE_ADDR, 42, Some((0x7f0_0000, 0x1234)), 128 * MIB);
        let hdr = params.hdr;
        let (magic, version, loader, cmdline_ptr, ramdisk, ramdisk_size, init_size, cmdline_size) =
            (hdr.header, hdr.version, hdr.type_of_loader, hdr.cmd_line_ptr, hdr.ramdisk_image, hdr.ramdisk_size, hdr.init_size, hdr.cmdline_size);
        assert_eq!(magic, SETUP_HEADER_MAGIC);
        assert_eq!(version, 0x020f, "the kernel's own header");
        assert_eq!(init_size, 0x100_0000, "the kernel's own header");
        assert_eq!(cmdline_size, 2047, "the kernel's limit, not overwritten");
        assert_eq!(loader, 0xff);
        assert_eq!(cmdline_ptr, 0x2_0000);
        assert_eq!((ramdisk, ramdisk_size), (0x7f0_0000, 0x1234));
        let (ext_ramdisk, ext_cmdline) = (params.ext_ramdisk_image, params.ext_cmd_line_ptr);
        assert_eq!((ext_ramdisk, ext_cmdline), (0, 0));

        let fresh = boot_params(None, CMDLINE_ADDR, 42, None, 128 * MIB).hdr;
        let (flag, magic, loader, alignment, cmdline_size, ramdisk, ramdisk_size) =
            (fresh.boot_flag, fresh.header, fresh.type_of_loader, fresh.kernel_alignment, fresh.cmdline_size, fresh.ramdisk_image, fresh.ramdisk_size);
        assert_eq!((flag, magic, loader, alignment), (0xaa55, SETUP_HEADER_MAGIC, 0xff, 0x100_0000));
        assert_eq!(cmdline_size, 42);
        assert_eq!((ramdisk, ramdisk_size), (0, 0), "no initrd");
    }

    #[test]
    fn e820_has_low_ram_up_to_the_ebda_and_the_rest_from_1_mib() {
        let params = boot_params(None, CMDLINE_ADDR, 0, None, 128 * MIB);
        let entries: Vec<(u64, u64, u32)> =
            params.e820_table[..usize::from(params.e820_entries)].iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(entries, [(0, 0x9_fc00, 1), (0x10_0000, 127 * MIB, 1)]);
        let tiny: Vec<(u64, u64)> = e820_map(0x8_0000).iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(tiny, [(0, 0x8_0000)], "memory that ends below the EBDA");
    }

    #[test]
    fn the_initrd_goes_page_aligned_to_the_top_below_initrd_addr_max() {
        // Top of memory, rounded down to a page.
        assert_eq!(initrd_address(128 * MIB, 0x1800, 0x7fff_ffff, 32 * MIB).unwrap(), 128 * MIB - 0x2000);
        assert_eq!(initrd_address(128 * MIB, 0x2000, 0x7fff_ffff, 32 * MIB).unwrap(), 128 * MIB - 0x2000);
        // initrd_addr_max is the highest byte it may use.
        assert_eq!(initrd_address(512 * MIB, 0x1000, 64 * MIB - 1, 32 * MIB).unwrap(), 64 * MIB - 0x1000);
        for len in [1, 0x1234, 0x10_0000] {
            let addr = initrd_address(100 * MIB + 0x123, len, 0x7fff_ffff, 32 * MIB).unwrap();
            assert_eq!(addr % PAGE_SIZE, 0);
            assert!(addr + len <= 100 * MIB + 0x123);
        }
    }

    #[test]
    fn an_initrd_that_does_not_fit_above_the_kernel_is_refused() {
        let e = initrd_address(64 * MIB, 40 * MIB, 0x7fff_ffff, 32 * MIB).unwrap_err();
        assert!(matches!(e, LinuxError::InitrdDoesNotFit { len, floor, ceiling } if len == 40 * MIB && floor == 32 * MIB && ceiling == 64 * MIB), "{e}");
        assert!(initrd_address(64 * MIB, 128 * MIB, 0x7fff_ffff, 0).is_err(), "larger than memory");
        assert!(initrd_address(64 * MIB, 32 * MIB, 0x7fff_ffff, 32 * MIB).is_ok(), "exactly fits");
    }

    #[test]
    fn the_kernel_footprint_covers_decompression_at_its_run_address() {
        let header = kernel_header();
        // Relocatable: the load address rounded up to 2 MiB is below
        // pref_address, so it runs at 16 MiB and needs init_size from there.
        assert_eq!(kernel_footprint_end(Some(&header), HIMEM_START, 5 * MIB), 32 * MIB);
        let high = kernel_footprint_end(Some(&header), 17 * MIB, 30 * MIB);
        assert_eq!(high, 34 * MIB, "18 MiB (aligned up) + 16 MiB");
        let fixed = setup_header { relocatable_kernel: 0, ..header };
        assert_eq!(kernel_footprint_end(Some(&fixed), 17 * MIB, 30 * MIB), 32 * MIB);
        let old = setup_header { version: 0x0209, ..header };
        assert_eq!(kernel_footprint_end(Some(&old), HIMEM_START, 5 * MIB), 5 * MIB, "no init_size before 2.10");
        assert_eq!(kernel_footprint_end(None, 16 * MIB, 40 * MIB), 40 * MIB, "an ELF's own end");
    }

    #[test]
    fn cmdline_limits_come_from_the_kernel() {
        let header = kernel_header();
        assert_eq!(cmdline_max_len(Some(&header)), 2047);
        assert_eq!(cmdline_max_len(Some(&setup_header { cmdline_size: 65535, ..header })), 65535);
        assert_eq!(cmdline_max_len(Some(&setup_header { version: 0x0205, ..header })), 255);
        assert_eq!(cmdline_max_len(None), 2047);
        assert_eq!(cmdline_max_len(Some(&setup_header { cmdline_size: u32::MAX, ..header })), (EBDA_START - CMDLINE_ADDR - 1) as usize);
        assert_eq!(initrd_addr_max(Some(&header)), 0x7fff_ffff);
        assert_eq!(initrd_addr_max(Some(&setup_header { version: 0x0202, ..header })), DEFAULT_INITRD_ADDR_MAX);
    }

    #[test]
    fn only_64_bit_capable_kernels_are_accepted() {
        let file = Path::new("/k");
        assert!(check_64bit_entry(file, &kernel_header()).is_ok());
        let no_flag = setup_header { xloadflags: 0, ..kernel_header() };
        let e = check_64bit_entry(file, &no_flag).unwrap_err();
        assert!(e.to_string().contains("kernel /k: boot protocol 0x020f without XLF_KERNEL_64"), "{e}");
        assert!(check_64bit_entry(file, &setup_header { version: 0x020b, ..kernel_header() }).is_err());
    }

    #[test]
    fn pvm_hosts_and_hosts_without_vmx_or_svm_cannot_boot_stock_kernels() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\nbugs\t\t: spectre_v1\n";
        let amd = "processor\t: 0\nflags\t\t: fpu svm lm\n";
        let guest = "processor\t: 0\nflags\t\t: fpu hypervisor lm\nvmx flags\t: vnmi\n";
        assert!(linux_boot_support(false, intel).is_ok());
        assert!(linux_boot_support(false, amd).is_ok());
        let pvm = linux_boot_support(true, intel).unwrap_err();
        assert!(matches!(pvm, LinuxError::PvmOnly));
        let message = pvm.to_string();
        assert!(message.starts_with("this host's KVM is kvm_pvm ("), "{message}");
        assert!(
            message.ends_with(
                "): it runs only PVM guest kernels, and a stock Linux kernel stops at its first privileged instruction; run --kernel on a host with VMX or SVM KVM, or use --probe"
            ),
            "{message}"
        );
        assert!(matches!(linux_boot_support(true, guest), Err(LinuxError::PvmOnly)));
        assert!(matches!(linux_boot_support(false, guest), Err(LinuxError::NoHardwareVirtualization)), "a `vmx flags` line is not the flags");
        assert!(matches!(linux_boot_support(false, ""), Err(LinuxError::NoHardwareVirtualization)));
    }

    #[test]
    fn image_kinds_are_told_by_their_magic() {
        let mut bz = vec![0u8; 0x206];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(image_kind(&bz), Some(ImageKind::BzImage));
        assert_eq!(image_kind(b"\x7fELF\x02\x01\x01"), Some(ImageKind::Elf));
        assert_eq!(image_kind(b"MZ garbage"), None);
        assert_eq!(image_kind(&[]), None);
    }

    /// A file in the temp dir, removed on drop.
    struct TempFile {
        path: PathBuf,
        file: File,
    }

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path = std::env::temp_dir().join(format!("sbx-vmm-linux-{}-{name}", std::process::id()));
            let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
            file.write_all(contents).unwrap();
            file.rewind().unwrap();
            TempFile { path, file }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn memory(size: u64) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    /// A minimal bzImage: one setup sector after the boot sector, the
    /// header at 0x1f1, then `payload` as the protected-mode kernel.
    fn bzimage(header: setup_header, payload: &[u8]) -> Vec<u8> {
        let setup_len = (usize::from(header.setup_sects) + 1) * 512;
        let mut image = vec![0u8; setup_len];
        let bytes = header.as_slice();
        image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + bytes.len()].copy_from_slice(bytes);
        image.extend_from_slice(payload);
        image
    }

    #[test]
    fn a_bzimage_and_its_initrd_load_with_the_zero_page() {
        let payload: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let mut kernel = TempFile::new("bzimage", &bzimage(kernel_header(), &payload));
        let initrd_bytes = vec![0x5a; 3000];
        let mut initrd = TempFile::new("initrd", &initrd_bytes);
        let memory = memory(64 * MIB);
        let cmdline = "console=ttyS0 panic=1";

        let boot = load_linux(&memory, &mut kernel.file, Some(&mut initrd.file), cmdline).unwrap();
        assert_eq!(boot, LinuxBoot { entry: 0x10_0200, boot_params: 0x7000, stack: 0x8ff0 });

        let mut loaded = vec![0u8; payload.len()];
        memory.read_slice(&mut loaded, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(loaded, payload, "the protected-mode kernel at code32_start");

        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let (magic, loader, cmdline_ptr, ramdisk, ramdisk_size, entries) =
            (params.hdr.header, params.hdr.type_of_loader, params.hdr.cmd_line_ptr, params.hdr.ramdisk_image, params.hdr.ramdisk_size, params.e820_entries);
        assert_eq!((magic, loader, cmdline_ptr, entries), (SETUP_HEADER_MAGIC, 0xff, 0x2_0000, 2));
        assert_eq!(u64::from(ramdisk), 64 * MIB - PAGE_SIZE, "page-aligned at the top");
        assert_eq!(ramdisk_size, 3000);
        let mut initrd_loaded = vec![0u8; 3000];
        memory.read_slice(&mut initrd_loaded, GuestAddress(u64::from(ramdisk))).unwrap();
        assert_eq!(initrd_loaded, initrd_bytes);

        let mut cmdline_loaded = vec![0u8; cmdline.len() + 1];
        memory.read_slice(&mut cmdline_loaded, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(cmdline_loaded, b"console=ttyS0 panic=1\0");
    }

    #[test]
    fn a_bzimage_that_cannot_boot_here_is_refused_with_the_reason() {
        let payload = [0x90u8; 512];
        let memory = memory(64 * MIB);

        let mut no_64bit = TempFile::new("no64", &bzimage(setup_header { xloadflags: 0, ..kernel_header() }, &payload));
        let e = load_linux(&memory, &mut no_64bit.file, None, "").unwrap_err();
        assert!(matches!(e, LinuxError::No64BitEntry { ref file, .. } if *file == no_64bit.path), "{e}");

        let mut short_cmdline = TempFile::new("short", &bzimage(setup_header { cmdline_size: 16, ..kernel_header() }, &payload));
        let e = load_linux(&memory, &mut short_cmdline.file, None, "console=ttyS0 panic=1").unwrap_err();
        assert!(matches!(e, LinuxError::CmdlineTooLong { len: 21, max: 16, .. }), "{e}");

        let mut big = TempFile::new("big", &bzimage(setup_header { init_size: 60 * MIB as u32, ..kernel_header() }, &payload));
        let e = load_linux(&memory, &mut big.file, None, "").unwrap_err();
        assert!(matches!(e, LinuxError::KernelDoesNotFit { needs, memory, .. } if needs == 76 * MIB && memory == 64 * MIB), "{e}");

        let mut kernel = TempFile::new("fits", &bzimage(kernel_header(), &payload));
        let mut initrd = TempFile::new("big-initrd", &vec![1u8; 33 * MIB as usize]);
        let e = load_linux(&memory, &mut kernel.file, Some(&mut initrd.file), "").unwrap_err();
        assert!(matches!(e, LinuxError::InitrdDoesNotFit { floor, .. } if floor == 32 * MIB), "{e}");

        let mut empty = TempFile::new("empty-initrd", &[]);
        let e = load_linux(&memory, &mut kernel.file, Some(&mut empty.file), "").unwrap_err();
        assert!(matches!(e, LinuxError::InitrdEmpty { .. }), "{e}");

        assert!(matches!(load_linux(&memory, &mut kernel.file, None, "a\0b"), Err(LinuxError::CmdlineNul)));
    }

    #[test]
    fn a_garbage_file_is_neither_kernel_and_says_which_file() {
        let mut garbage = TempFile::new("garbage", &[0xabu8; 8192]);
        let e = load_linux(&memory(16 * MIB), &mut garbage.file, None, "").unwrap_err();
        assert!(matches!(e, LinuxError::NotAKernel { ref file } if *file == garbage.path), "{e}");
        let message = e.to_string();
        assert!(message.contains(&garbage.path.display().to_string()) && message.contains("neither a bzImage"), "{message}");

        let mut empty = TempFile::new("empty", &[]);
        assert!(matches!(load_linux(&memory(16 * MIB), &mut empty.file, None, ""), Err(LinuxError::NotAKernel { .. })));

        // "HdrS" without LOADED_HIGH: a zImage, which linux-loader refuses.
        let mut zimage = TempFile::new("zimage", &bzimage(setup_header { loadflags: 0, ..kernel_header() }, &[0u8; 512]));
        let e = load_linux(&memory(16 * MIB), &mut zimage.file, None, "").unwrap_err();
        assert!(matches!(e, LinuxError::Load { .. }), "{e}");
    }

    /// A minimal ELF64 vmlinux: one PT_LOAD segment of `payload` at
    /// `paddr`, with `memsz` bytes in memory (bss after the file's bytes).
    fn vmlinux(paddr: u64, payload: &[u8], memsz: u64) -> Vec<u8> {
        const EHDR: usize = 64;
        const PHDR: usize = 56;
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, little-endian, version 1
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&paddr.to_le_bytes()); // e_entry
        elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for half in [EHDR as u16, PHDR as u16, 1, 64, 0, 0] {
            // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
            elf.extend_from_slice(&half.to_le_bytes());
        }
        assert_eq!(elf.len(), EHDR);
        elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        elf.extend_from_slice(&((EHDR + PHDR) as u64).to_le_bytes()); // p_offset
        elf.extend_from_slice(&paddr.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&paddr.to_le_bytes()); // p_paddr
        elf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        elf.extend_from_slice(&memsz.to_le_bytes());
        elf.extend_from_slice(&0x1000u64.to_le_bytes());
        elf.extend_from_slice(payload);
        elf
    }

    #[test]
    fn an_elf_vmlinux_is_the_fallback_with_a_fresh_header() {
        let mut kernel = TempFile::new("vmlinux", &vmlinux(16 * MIB, &[0xf4; 64], 2 * MIB));
        let mut initrd = TempFile::new("elf-initrd", &[7u8; 100]);
        let memory = memory(32 * MIB);
        let boot = load_linux(&memory, &mut kernel.file, Some(&mut initrd.file), "quiet").unwrap();
        assert_eq!(boot.entry, 16 * MIB, "e_entry is startup_64");
        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let (flag, magic, loader, alignment, cmdline_size, ramdisk) =
            (params.hdr.boot_flag, params.hdr.header, params.hdr.type_of_loader, params.hdr.kernel_alignment, params.hdr.cmdline_size, params.hdr.ramdisk_image);
        assert_eq!((flag, magic, loader, alignment, cmdline_size), (0xaa55, SETUP_HEADER_MAGIC, 0xff, 0x100_0000, 5));
        assert_eq!(u64::from(ramdisk), 32 * MIB - PAGE_SIZE);

        // Its bss reaching past memory's end does not fit.
        let mut big = TempFile::new("vmlinux-big", &vmlinux(16 * MIB, &[0xf4; 64], 20 * MIB));
        let e = load_linux(&memory, &mut big.file, None, "").unwrap_err();
        assert!(matches!(e, LinuxError::KernelDoesNotFit { needs, .. } if needs == 36 * MIB), "{e}");
    }
}
