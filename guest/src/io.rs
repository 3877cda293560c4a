//! The console, exit, idle and the clock. Ring 3 cannot reach ports on this
//! kind of host (kvm_pvm ignores IOPL 3, makes `int N` from ring 3 an
//! invalid opcode, and its SYSCALL is its own), so ring 3 talks to the
//! monitor through the control window's registers (an MMIO exit each,
//! like a device's); ring 0's fault handler uses COM1 and the exit port.
//! The clock is `rdtsc`, which ring 3 may read.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi;

const COM1: u16 = 0x3f8;

/// # Safety
/// `port` must be one whose write has no effect beyond the device's.
pub unsafe fn out8(port: u16, value: u8) {
    // SAFETY: the caller's contract; `out` touches no memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// # Safety
/// As [`out8`].
pub unsafe fn out32(port: u16, value: u32) {
    // SAFETY: the caller's contract; `out` touches no memory.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

/// Ring 0's side: `bytes` on COM1 (the monitor's 16550 is always ready
/// to take a byte, so the line status is not polled: each byte is one exit).
pub fn kernel_serial_write(bytes: &[u8]) {
    for &b in bytes {
        // SAFETY: COM1's transmit register.
        unsafe { out8(COM1, b) };
    }
}

fn control(register: u64, value: u64) {
    // SAFETY: a register of the monitor's control window (identity-mapped,
    // user-accessible); the write is the whole effect.
    unsafe { core::ptr::write_volatile((abi::CONTROL_ADDR + register) as *mut u64, value) };
}

/// One line on the console: the monitor reads it from guest memory (one
/// exit per line, not per byte).
pub fn line(text: &str) {
    let mut bytes = alloc::vec::Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    control(abi::CONTROL_CONSOLE_ADDR, bytes.as_ptr() as u64);
    control(abi::CONTROL_CONSOLE_LEN, bytes.len() as u64);
}

/// Ends the run with `status`.
pub fn exit(status: u32) -> ! {
    loop {
        control(abi::CONTROL_EXIT, u64::from(status));
    }
}

/// Waits at most `micros` for a device to signal news.
pub fn idle(micros: u64) {
    control(abi::CONTROL_IDLE, micros.min(u64::from(u32::MAX)));
}

/// Ring 0's side of exit and idle: the monitor's ports.
pub fn kernel_port32(port: u16, value: u32) {
    // SAFETY: the monitor's exit or idle port.
    unsafe { out32(port, value) };
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the time-stamp counter (allowed in ring 3: CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);
static TSC_START: AtomicU64 = AtomicU64::new(0);

/// Starts the clock at zero, at `tsc_khz` ticks per millisecond.
pub fn clock_init(tsc_khz: u64) {
    if tsc_khz > 0 {
        TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    }
    TSC_START.store(rdtsc(), Ordering::Relaxed);
}

/// Microseconds since [`clock_init`].
pub fn now_micros() -> u64 {
    let ticks = rdtsc().wrapping_sub(TSC_START.load(Ordering::Relaxed));
    (u128::from(ticks) * 1000 / u128::from(TSC_KHZ.load(Ordering::Relaxed))) as u64
}

/// A seed for port numbers and smoltcp.
pub fn entropy() -> u64 {
    rdtsc()
}
