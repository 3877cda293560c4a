//! The test guest of sbx-net microVMs. The monitor loads it at 1 MiB and
//! starts it in long mode; it builds its own tables and drops to ring 3
//! (`boot`), finds its virtio devices, brings up smoltcp on the sandbox's
//! addresses and runs the probe script the monitor left in memory, one
//! JSON line per result on COM1 (`probe`), then leaves through the exit
//! port.

#![no_std]
#![no_main]

extern crate alloc;

// Shared with the monitor, which uses the rest of it.
#[allow(dead_code)]
mod abi;
mod boot;
mod hal;
mod io;
mod json;
mod netdev;
mod probe;

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __image_end: u8;
}

/// Entered in ring 0 by the monitor, on its boot stack.
#[no_mangle]
#[link_section = ".text.entry"]
pub extern "C" fn _start() -> ! {
    // SAFETY: the first and only code of the boot CPU.
    unsafe { boot::enter_ring3(user_main) }
}

extern "C" fn user_main() -> ! {
    // SAFETY: the monitor wrote the boot information before starting us.
    let info = unsafe { core::ptr::read_volatile(abi::BOOT_INFO_ADDR as *const abi::BootInfo) };
    if info.magic != abi::BOOT_INFO_MAGIC {
        io::line(r#"{"event":"fault","why":"no boot information"}"#);
        io::exit(abi::EXIT_PANIC);
    }
    io::clock_init(info.tsc_khz);
    // The heap: everything from the end of the image (rounded up to 2 MiB)
    // to the end of memory.
    let start = ((core::ptr::addr_of!(__image_end) as u64) + 0x1f_ffff) & !0x1f_ffff;
    if info.memory_size <= start {
        io::line(r#"{"event":"fault","why":"no memory for a heap"}"#);
        io::exit(abi::EXIT_PANIC);
    }
    // SAFETY: [start, memory_size) is guest RAM no one else uses: above
    // the image, below the device windows.
    unsafe { HEAP.lock().init(start as *mut u8, (info.memory_size - start) as usize) };
    let script_len = info.script_len.min(abi::SCRIPT_MAX) as usize;
    // SAFETY: the monitor wrote `script_len` bytes at `script_addr`.
    let script = unsafe { core::slice::from_raw_parts(info.script_addr as *const u8, script_len) };
    let script = core::str::from_utf8(script).unwrap_or("");
    let devices = &info.devices[..(info.device_count as usize).min(abi::MAX_DEVICES)];
    probe::run(devices, script);
    io::exit(abi::EXIT_OK)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let message = alloc::format!("{info}");
    io::line(&json::Json::event("panic").str("message", &message).finish());
    io::exit(abi::EXIT_PANIC)
}
