//! The two clocks sbx-net compares: boot time (what the classifier stamps
//! and expires learned entries by) and the wall clock (what records show).

/// Boot-time nanoseconds, the clock the classifier compares expiries with
/// (`bpf_ktime_get_boot_ns`).
pub fn boot_time_ns() -> u64 {
    // SAFETY: clock_gettime writes one timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall-clock nanoseconds since the Unix epoch (0 before it).
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

