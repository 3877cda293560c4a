//! Ring 0, briefly. The monitor starts the vCPU in long mode on its own
//! tables; here the guest builds its own: page tables for the first GiB
//! (2 MiB pages, user-accessible: memory and the device windows), a GDT
//! with ring-3 segments and a TSS, an IDT whose exception handlers report
//! on COM1 and end the run, and then it drops to ring 3 for good. Ring-0 code is instruction-emulated on this kind of host
//! (~1.8 M instructions/s), ring-3 code runs natively: everything after
//! this file runs in ring 3.

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

#[repr(C, align(4096))]
struct PageTable([u64; 512]);

static mut PML4: PageTable = PageTable([0; 512]);
static mut PDPT: PageTable = PageTable([0; 512]);
static mut PD: PageTable = PageTable([0; 512]);

#[repr(C, align(16))]
struct Stack([u8; 64 * 1024]);

/// The stack of exception handlers (TSS.RSP0).
static mut KERNEL_STACK: Stack = Stack([0; 64 * 1024]);
/// Ring 3's stack: smoltcp and the probe run here.
#[repr(C, align(16))]
struct UserStack([u8; 1024 * 1024]);
static mut USER_STACK: UserStack = UserStack([0; 1024 * 1024]);

/// The 64-bit TSS: only RSP0 matters (no I/O bitmap: IOPL 3 allows ports).
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

static mut TSS: Tss = Tss { reserved0: 0, rsp: [0; 3], reserved1: 0, ist: [0; 7], reserved2: 0, reserved3: 0, iomap_base: 104 };

/// Null, kernel code, kernel data, user data, user code, TSS (two slots).
static mut GDT: [u64; 7] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
    0,
    0,
];
const KERNEL_CS: u16 = 0x08;
const USER_DS: u64 = 0x18 | 3;
const USER_CS: u64 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;

static mut IDT: [u64; 64] = [0; 64];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

// One 16-byte stub per exception vector (0..32): vectors without an error
// code push a zero in its place, then the vector, then all go to one
// handler with the frame.
global_asm!(
    r#"
    .section .text
    .align 16
    .global sbx_fault_stubs
sbx_fault_stubs:
    .set vector, 0
    .rept 32
    .align 16
    .if vector == 8 || vector == 10 || vector == 11 || vector == 12 || vector == 13 || vector == 14 || vector == 17 || vector == 21 || vector == 29 || vector == 30
    .else
    push 0
    .endif
    push vector
    jmp sbx_fault_common
    .set vector, vector + 1
    .endr
sbx_fault_common:
    mov rdi, rsp
    and rsp, -16
    call {handler}
    ud2

"#,
    handler = sym fault,
);

extern "C" {
    static sbx_fault_stubs: u8;
}

/// An exception: vector, error code, then the CPU's frame (RIP, CS,
/// RFLAGS, RSP, SS). Reported as one JSON line, then the run ends.
extern "C" fn fault(frame: *const u64) -> ! {
    // SAFETY: the stub left seven words at `frame` on this stack.
    let f = unsafe { core::slice::from_raw_parts(frame, 7) };
    let cr2: u64;
    // SAFETY: reading CR2 (ring 0) has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let mut line = crate::json::Json::event("fault");
    line.num("vector", f[0]).hex("error", f[1]).hex("rip", f[2]).hex("rsp", f[5]).hex("cr2", cr2);
    crate::io::kernel_serial_write(line.finish().as_bytes());
    crate::io::kernel_serial_write(b"\n");
    loop {
        crate::io::kernel_port32(crate::abi::EXIT_PORT, crate::abi::EXIT_FAULT + f[0] as u32);
    }
}

/// Builds the guest's tables and enters `user_main` in ring 3.
///
/// # Safety
/// Once, on the boot CPU, in ring 0, before anything else runs.
pub unsafe fn enter_ring3(user_main: extern "C" fn() -> !) -> ! {
    // SAFETY (the whole body): single-threaded boot code; the statics are
    // only touched here and by the CPU afterwards.
    unsafe {
        let pd = &mut *addr_of_mut!(PD);
        for (i, entry) in pd.0.iter_mut().enumerate() {
            *entry = ((i as u64) << 21) | PRESENT | WRITABLE | USER | HUGE;
        }
        (*addr_of_mut!(PDPT)).0[0] = addr_of_mut!(PD) as u64 | PRESENT | WRITABLE | USER;
        (*addr_of_mut!(PML4)).0[0] = addr_of_mut!(PDPT) as u64 | PRESENT | WRITABLE | USER;
        asm!("mov cr3, {}", in(reg) addr_of_mut!(PML4) as u64, options(nostack));

        let kernel_stack_top = addr_of_mut!(KERNEL_STACK) as u64 + core::mem::size_of::<Stack>() as u64;
        (*addr_of_mut!(TSS)).rsp[0] = kernel_stack_top;
        let tss = addr_of_mut!(TSS) as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let gdt = &mut *addr_of_mut!(GDT);
        gdt[5] = (limit & 0xffff) | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((limit >> 16) & 0xf) << 48) | (((tss >> 24) & 0xff) << 56);
        gdt[6] = tss >> 32;
        let gdtr = DescriptorPointer { limit: (core::mem::size_of::<[u64; 7]>() - 1) as u16, base: gdt.as_ptr() as u64 };
        asm!("lgdt [{}]", in(reg) &gdtr, options(nostack));
        // The monitor's segments already are these selectors (0x08 code,
        // 0x10 data, the boot GDT's layout), so CS and the data segments
        // stay as loaded; only the task register is new.
        asm!("ltr {tss:x}", tss = in(reg) TSS_SELECTOR, options(nostack));

        let stubs = core::ptr::addr_of!(sbx_fault_stubs) as u64;
        let idt = &mut *addr_of_mut!(IDT);
        for vector in 0..32u64 {
            let handler = stubs + vector * 16;
            // A 64-bit interrupt gate, DPL 0, on the kernel code segment.
            idt[vector as usize * 2] = (handler & 0xffff) | (u64::from(KERNEL_CS) << 16) | (0x8e << 40) | (((handler >> 16) & 0xffff) << 48);
            idt[vector as usize * 2 + 1] = handler >> 32;
        }
        let idtr = DescriptorPointer { limit: (32 * 16 - 1) as u16, base: idt.as_ptr() as u64 };
        asm!("lidt [{}]", in(reg) &idtr, options(nostack));


        let user_stack_top = addr_of_mut!(USER_STACK) as u64 + core::mem::size_of::<UserStack>() as u64;
        // Interrupts off (the guest polls), bit 1 reserved.
        let rflags: u64 = 2;
        asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) USER_DS,
            rsp = in(reg) user_stack_top,
            rflags = in(reg) rflags,
            cs = in(reg) USER_CS,
            rip = in(reg) user_main as usize as u64,
            options(noreturn),
        );
    }
}
