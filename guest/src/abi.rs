//! The contract between the sbx-net monitor and its test guest: where the
//! monitor leaves the boot information and the probe script, and the two
//! paravirtual registers the guest uses (an exit port for ring 0, the
//! control window for ring 3). Plain constants and one `repr(C)`
//! struct: the monitor includes this very file (`sbx_vmm::probe::abi`), so
//! the two sides cannot drift apart.

/// Where the guest image is linked and loaded (identity-mapped).
pub const IMAGE_BASE: u64 = 0x10_0000;
/// The [`BootInfo`] page.
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// "SBXGUEST", little-endian.
pub const BOOT_INFO_MAGIC: u64 = 0x5453_4555_4758_4253;
/// The probe script (UTF-8 text, one command per line) and its largest size.
pub const SCRIPT_ADDR: u64 = 0x1_0000;
pub const SCRIPT_MAX: u64 = 0x7_0000;
/// The stack the vCPU starts on (the guest moves to its own at once).
pub const BOOT_STACK_TOP: u64 = 0x9_f000;
/// Ring 0's exit (its fault handler): a 32-bit write ends the run with that status ([`EXIT_OK`], a fault's
/// [`EXIT_FAULT`] + vector, [`EXIT_PANIC`]).
pub const EXIT_PORT: u16 = 0x510;
pub const EXIT_OK: u32 = 0;
pub const EXIT_FAULT: u32 = 0x100;
pub const EXIT_PANIC: u32 = 0xff;
/// Device windows the boot information can list.
pub const MAX_DEVICES: usize = 16;

/// The control window, after the device windows (0x3000_0000 + 16 × 4
/// KiB): ring 3's way to the monitor (it cannot use ports here). 64-bit
/// writes: a console line's address then its length (the length write
/// prints it), an exit status, an idle time in µs (wait at most that long
/// for a device to signal news, a used buffer: the guest's halt, without
/// interrupts).
pub const CONTROL_ADDR: u64 = 0x3001_0000;
pub const CONTROL_CONSOLE_ADDR: u64 = 0x00;
pub const CONTROL_CONSOLE_LEN: u64 = 0x08;
pub const CONTROL_EXIT: u64 = 0x10;
pub const CONTROL_IDLE: u64 = 0x18;
/// The longest console line the monitor takes in one write.
pub const CONSOLE_LINE_MAX: u64 = 64 * 1024;

/// What the monitor tells the guest, at [`BOOT_INFO_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    /// The vCPU's TSC frequency: the guest's clock is `rdtsc`.
    pub tsc_khz: u64,
    /// Guest memory from address 0.
    pub memory_size: u64,
    pub script_addr: u64,
    pub script_len: u64,
    /// How many of `devices` are virtio-mmio windows (4 KiB each).
    pub device_count: u64,
    pub devices: [u64; MAX_DEVICES],
}

impl BootInfo {
    /// Its bytes as they sit in guest memory (little-endian words).
    pub fn to_bytes(self) -> [u8; 8 * (6 + MAX_DEVICES)] {
        let mut out = [0u8; 8 * (6 + MAX_DEVICES)];
        let head = [self.magic, self.tsc_khz, self.memory_size, self.script_addr, self.script_len, self.device_count];
        for (i, word) in head.iter().chain(self.devices.iter()).enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        out
    }
}
