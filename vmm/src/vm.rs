//! The microVM core: a KVM virtual machine with its guest memory (vm-memory),
//! one vCPU (kvm-ioctls), a 16550 serial console (vm-superio) on COM1 and
//! virtio-mmio device windows, run until the guest halts. The first brick of the monitor; virtio
//! devices and the event loop come next.
//!
//! Exits are decided by pure functions ([`port_device`], [`exit_action`])
//! that are unit-tested without KVM.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// COM1's eight registers.
pub const COM1: std::ops::RangeInclusive<u16> = 0x3f8..=0x3ff;

/// Where virtio-mmio devices sit: one 4 KiB window each from here, above
/// any guest memory this monitor gives (at most 768 MiB) and inside the
/// boot page tables' first GiB.
pub const MMIO_BASE: u64 = 0x3000_0000;
pub const MMIO_WINDOW: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("the guest image ({len} bytes at {addr:#x}) does not fit in {size:#x} bytes of memory")]
    ImageTooLarge { addr: u64, len: usize, size: usize },
    #[error("the guest stopped the vCPU: {0}")]
    Failed(String),
    #[error("the guest did not halt within {0} exits")]
    TooManyExits(u64),
}

/// The device a port I/O exit is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortDevice {
    /// COM1, at this register offset.
    Serial(u8),
    /// Nothing: reads see all ones, writes are dropped (as on real hardware).
    None,
}

/// Which device answers `port` (pure).
pub fn port_device(port: u16) -> PortDevice {
    if COM1.contains(&port) {
        PortDevice::Serial((port - COM1.start()) as u8)
    } else {
        PortDevice::None
    }
}

/// What the run loop does after one exit (pure: the exit's kind only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Handled (port I/O): run on.
    Continue,
    /// The guest halted: the run ends.
    Halted,
    /// Triple fault or reset: the run ends.
    Shutdown,
    /// Anything this monitor does not serve: the run fails with why.
    Fail(String),
}

/// How an exit of this kind ends or continues the run.
pub fn exit_action(exit: &VcpuExit<'_>) -> ExitAction {
    match exit {
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => ExitAction::Continue,
        VcpuExit::Hlt => ExitAction::Halted,
        VcpuExit::Shutdown => ExitAction::Shutdown,
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Fail(format!("entry failed (hardware reason {reason:#x}, cpu {cpu})")),
        VcpuExit::InternalError => ExitAction::Fail("KVM internal error (an instruction it cannot emulate)".into()),
        other => ExitAction::Fail(format!("unserved exit {other:?}")),
    }
}

/// What a 64-bit boot needs in guest memory and in the vCPU's registers
/// (the layout Firecracker uses), as pure data.
pub mod boot {
    pub const GDT_ADDR: u64 = 0x500;
    pub const IDT_ADDR: u64 = 0x520;
    pub const PML4_ADDR: u64 = 0x9000;
    pub const PDPT_ADDR: u64 = 0xa000;
    pub const PD_ADDR: u64 = 0xb000;

    pub const CR0_PE: u64 = 1;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;

    /// A GDT descriptor from its flags (access byte and G/D/L bits as one
    /// 16-bit word, as Firecracker writes them), base and limit.
    pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
        ((base as u64 & 0xff00_0000) << (56 - 24))
            | ((flags as u64 & 0x0000_f0ff) << 40)
            | ((limit as u64 & 0x000f_0000) << (48 - 16))
            | ((base as u64 & 0x00ff_ffff) << 16)
            | (limit as u64 & 0x0000_ffff)
    }

    /// Null, 64-bit code, data, TSS.
    pub const GDT: [u64; 4] = [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

    /// The vCPU's view of GDT entry `index`.
    pub fn segment(entry: u64, index: u16) -> kvm_bindings::kvm_segment {
        let bits = |shift: u64, width: u64| ((entry >> shift) & ((1 << width) - 1)) as u8;
        kvm_bindings::kvm_segment {
            base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
            limit: {
                let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
                // Granularity: 4 KiB units.
                if bits(55, 1) == 1 { (raw << 12) | 0xfff } else { raw }
            },
            selector: index * 8,
            type_: bits(40, 4),
            present: bits(47, 1),
            dpl: bits(45, 2),
            db: bits(54, 1),
            s: bits(44, 1),
            l: bits(53, 1),
            g: bits(55, 1),
            avl: bits(52, 1),
            unusable: u8::from(bits(47, 1) == 0),
            padding: 0,
        }
    }

    /// PML4 → one PDPT → one PD of 512 2 MiB pages: the first GiB, identity.
    pub fn identity_page_tables() -> [(u64, [u64; 512]); 3] {
        const PRESENT_WRITABLE: u64 = 0b11;
        const HUGE: u64 = 1 << 7;
        let mut pml4 = [0u64; 512];
        pml4[0] = PDPT_ADDR | PRESENT_WRITABLE;
        let mut pdpt = [0u64; 512];
        pdpt[0] = PD_ADDR | PRESENT_WRITABLE;
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            *e = ((i as u64) << 21) | PRESENT_WRITABLE | HUGE;
        }
        [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PD_ADDR, pd)]
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    Halted,
    Shutdown,
    /// A [`Kicker`] stopped it (`sandbox delete`, SIGTERM).
    Stopped,
}

/// The signal that interrupts a vCPU in KVM_RUN (its handler does nothing:
/// the interruption is the point).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a handler that does nothing
        // (async-signal-safe), no SA_RESTART (KVM_RUN must return EINTR).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
        }
    });
}

/// Stops a VM's run from another thread: sets the stop flag and signals
/// the vCPU thread (again every 10 ms, until the run loop has seen it: a
/// signal that lands just before KVM_RUN is not lost).
#[derive(Clone, Debug)]
pub struct Kicker {
    thread: libc::pthread_t,
    stop: Arc<std::sync::atomic::AtomicBool>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl Kicker {
    /// Asks the run to stop; whether it did within `wait`.
    pub fn stop(&self, wait: std::time::Duration) -> bool {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + wait;
        while !self.stopped.load(Ordering::SeqCst) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            // SAFETY: signalling a thread of this process that `kicker`
            // recorded; the run loop's thread outlives its VM's run.
            unsafe { libc::pthread_kill(self.thread, kick_signal()) };
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }
}

/// The serial console's interrupt line: not wired yet (no irqchip until
/// the virtio devices need one), so raising it does nothing.
struct NoInterrupt;

impl vm_superio::Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// What the guest wrote on its console, shared with whoever reads it.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::io::Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A VM, its vCPU and its memory. Field order is drop order: the vCPU and
/// the VM go before the memory their region points into.
pub struct MicroVm {
    /// Set by a [`Kicker`]; the run loop's answer in `stopped`.
    stop: Arc<std::sync::atomic::AtomicBool>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    /// virtio-mmio devices, in the order added (window i at
    /// `MMIO_BASE + i * MMIO_WINDOW`), with what their drivers asked.
    devices: Vec<Box<dyn crate::virtio::MmioDevice>>,
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    memory: GuestMemoryMmap<()>,
    memory_size: usize,
    serial: vm_superio::Serial<NoInterrupt, vm_superio::serial::NoEvents, Console>,
    console: Console,
}

impl MicroVm {
    /// A VM with `memory_size` bytes of guest memory from address 0.
    pub fn new(memory_size: usize) -> Result<MicroVm, VmError> {
        let kvm = Kvm::new()?;
        let vm = kvm.create_vm()?;
        let memory: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), memory_size)]).map_err(|e| VmError::Memory(e.to_string()))?;
        let host = memory.get_host_address(GuestAddress(0)).map_err(|e| VmError::Memory(e.to_string()))?;
        let region = kvm_bindings::kvm_userspace_memory_region { slot: 0, flags: 0, guest_phys_addr: 0, memory_size: memory_size as u64, userspace_addr: host as u64 };
        // SAFETY: the region is the whole of `memory`, a mapping this VM
        // owns and unmaps only after the VM and its vCPU are closed (field
        // order); nothing else is mapped at that guest range.
        unsafe { vm.set_user_memory_region(region)? };
        let vcpu = vm.create_vcpu(0)?;
        let console = Console::default();
        let serial = vm_superio::Serial::new(NoInterrupt, console.clone());
        if memory_size as u64 > MMIO_BASE {
            return Err(VmError::Memory(format!("{memory_size:#x} bytes would overlap the device windows at {MMIO_BASE:#x}")));
        }
        Ok(MicroVm { stop: Arc::default(), stopped: Arc::default(), devices: Vec::new(), vcpu, _vm: vm, _kvm: kvm, memory, memory_size, serial, console })
    }

    /// A handle that stops this VM's run; call it on the thread that will
    /// run the VM.
    pub fn kicker(&self) -> Kicker {
        install_kick_handler();
        // SAFETY: pthread_self has no preconditions.
        Kicker { thread: unsafe { libc::pthread_self() }, stop: self.stop.clone(), stopped: self.stopped.clone() }
    }

    /// Adds a virtio-mmio device; returns its window's address.
    pub fn add_device(&mut self, device: Box<dyn crate::virtio::MmioDevice>) -> u64 {
        self.devices.push(device);
        MMIO_BASE + (self.devices.len() as u64 - 1) * MMIO_WINDOW
    }

    /// Device `index`'s transport.
    pub fn device(&self, index: usize) -> Option<&crate::virtio::mmio::MmioTransport> {
        self.devices.get(index).map(|d| d.transport())
    }

    /// The device and the offset in its window of an MMIO address.
    fn device_at(devices: &mut [Box<dyn crate::virtio::MmioDevice>], addr: u64) -> Option<(&mut Box<dyn crate::virtio::MmioDevice>, u64)> {
        let index = addr.checked_sub(MMIO_BASE)? / MMIO_WINDOW;
        let device = devices.get_mut(index as usize)?;
        Some((device, (addr - MMIO_BASE) % MMIO_WINDOW))
    }

    /// Copies `image` into guest memory at `addr`.
    pub fn load(&self, addr: u64, image: &[u8]) -> Result<(), VmError> {
        if addr as usize + image.len() > self.memory_size {
            return Err(VmError::ImageTooLarge { addr, len: image.len(), size: self.memory_size });
        }
        self.memory.write_slice(image, GuestAddress(addr)).map_err(|e| VmError::Memory(e.to_string()))
    }

    /// Starts the vCPU in real mode at `entry` (flat: every segment base 0).
    pub fn start_real_mode(&mut self, entry: u16) -> Result<(), VmError> {
        let mut sregs = self.vcpu.get_sregs()?;
        for segment in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
            segment.base = 0;
            segment.selector = 0;
        }
        self.vcpu.set_sregs(&sregs)?;
        let mut regs = self.vcpu.get_regs()?;
        regs.rip = u64::from(entry);
        // Bit 1 of RFLAGS is reserved and always set.
        regs.rflags = 2;
        regs.rsp = 0x8000;
        self.vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Starts the vCPU in 64-bit long mode at `entry` with the stack at
    /// `stack`: a flat GDT, an empty IDT and identity page tables for the
    /// first GiB (2 MiB pages) written into guest memory below 0x10000,
    /// as a boot loader leaves them. The guest's images go above that.
    pub fn start_long_mode(&mut self, entry: u64, stack: u64) -> Result<(), VmError> {
        let write = |addr: u64, bytes: &[u8]| self.memory.write_slice(bytes, GuestAddress(addr)).map_err(|e| VmError::Memory(e.to_string()));
        let gdt: Vec<u8> = boot::GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
        write(boot::GDT_ADDR, &gdt)?;
        write(boot::IDT_ADDR, &0u64.to_le_bytes())?;
        for (addr, table) in boot::identity_page_tables() {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
            write(addr, &bytes)?;
        }
        let mut sregs = self.vcpu.get_sregs()?;
        sregs.gdt.base = boot::GDT_ADDR;
        sregs.gdt.limit = (std::mem::size_of_val(&boot::GDT) - 1) as u16;
        sregs.idt.base = boot::IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cs = boot::segment(boot::GDT[1], 1);
        let data = boot::segment(boot::GDT[2], 2);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.cr3 = boot::PML4_ADDR;
        sregs.cr4 |= boot::CR4_PAE;
        sregs.cr0 |= boot::CR0_PE | boot::CR0_PG;
        sregs.efer |= boot::EFER_LME | boot::EFER_LMA;
        self.vcpu.set_sregs(&sregs)?;
        let mut regs = self.vcpu.get_regs()?;
        regs.rip = entry;
        regs.rsp = stack;
        regs.rflags = 2;
        self.vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Runs the vCPU until the guest halts or shuts down, serving port I/O,
    /// for at most `max_exits` exits.
    pub fn run(&mut self, max_exits: u64) -> Result<RunEnd, VmError> {
        use std::sync::atomic::Ordering;
        for _ in 0..max_exits {
            if self.stop.load(Ordering::SeqCst) {
                self.stopped.store(true, Ordering::SeqCst);
                return Ok(RunEnd::Stopped);
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                // Kicked: look at the stop flag.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(e.into()),
            };
            match exit_action(&exit) {
                ExitAction::Continue => {}
                ExitAction::Halted => return Ok(RunEnd::Halted),
                ExitAction::Shutdown => return Ok(RunEnd::Shutdown),
                ExitAction::Fail(why) => return Err(VmError::Failed(why)),
            }
            match exit {
                VcpuExit::IoOut(port, data) => {
                    if let (PortDevice::Serial(offset), Some(&value)) = (port_device(port), data.first()) {
                        // The output is our own buffer: it cannot fail.
                        let _ = self.serial.write(offset, value);
                    }
                }
                VcpuExit::MmioRead(addr, data) => match Self::device_at(&mut self.devices, addr) {
                    Some((device, offset)) => device.read(offset, data),
                    // Nothing there: all ones, as on a bus with no device.
                    None => data.fill(0xff),
                },
                VcpuExit::MmioWrite(addr, data) => {
                    if let Some((device, offset)) = Self::device_at(&mut self.devices, addr) {
                        device.write(offset, data, &self.memory);
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    let value = match port_device(port) {
                        PortDevice::Serial(offset) => self.serial.read(offset),
                        PortDevice::None => 0xff,
                    };
                    data.fill(value);
                }
                _ => {}
            }
        }
        Err(VmError::TooManyExits(max_exits))
    }

    /// The guest's memory (a loader writes into it; tests lay out queues).
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.memory
    }

    /// What the guest wrote on COM1 so far.
    pub fn console(&self) -> Vec<u8> {
        self.console.contents()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_gdt_is_the_well_known_flat_one_and_decodes_back() {
        // The values every x86 boot loader writes.
        assert_eq!(boot::GDT[1], 0x00af_9b00_0000_ffff, "64-bit code");
        assert_eq!(boot::GDT[2], 0x00cf_9300_0000_ffff, "data");
        let code = boot::segment(boot::GDT[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present, code.s, code.type_, code.g, code.limit), (8, 1, 0, 1, 1, 0xb, 1, 0xffff_ffff));
        let data = boot::segment(boot::GDT[2], 2);
        assert_eq!((data.selector, data.l, data.db, data.type_, data.unusable), (16, 0, 1, 0x3, 0));
        assert_eq!(boot::segment(boot::GDT[0], 0).unusable, 1, "the null descriptor");
    }

    #[test]
    fn the_page_tables_map_the_first_gib_onto_itself() {
        let [(pml4_at, pml4), (pdpt_at, pdpt), (pd_at, pd)] = boot::identity_page_tables();
        assert_eq!(pml4[0] & !0xfff, pdpt_at);
        assert_eq!(pdpt[0] & !0xfff, pd_at);
        assert_eq!(pml4_at, boot::PML4_ADDR);
        // A virtual address's PD slot and offset give the same physical one.
        for va in [0u64, 0x1000, 0x20_0000 + 0x1234, 0x3fff_ffff] {
            let entry = pd[(va >> 21) as usize];
            assert!(entry & 0x81 == 0x81, "present and huge");
            assert_eq!((entry & !0x1f_ffff) | (va & 0x1f_ffff), va);
        }
        assert!(boot::PD_ADDR + 4096 <= 0x10000, "the tables stay below the images");
    }

    #[test]
    fn ports_are_served_by_com1_or_by_nothing() {
        assert_eq!(port_device(0x3f8), PortDevice::Serial(0));
        assert_eq!(port_device(0x3fd), PortDevice::Serial(5));
        assert_eq!(port_device(0x3ff), PortDevice::Serial(7));
        assert_eq!(port_device(0x3f7), PortDevice::None);
        assert_eq!(port_device(0x400), PortDevice::None);
        assert_eq!(port_device(0x2f8), PortDevice::None, "COM2 is not there");
    }

    #[test]
    fn halts_and_resets_end_a_run_and_unserved_exits_fail_it() {
        assert_eq!(exit_action(&VcpuExit::Hlt), ExitAction::Halted);
        assert_eq!(exit_action(&VcpuExit::Shutdown), ExitAction::Shutdown);
        assert_eq!(exit_action(&VcpuExit::IoOut(0x3f8, &[b'a'])), ExitAction::Continue);
        let mut data = [0u8; 1];
        assert_eq!(exit_action(&VcpuExit::IoIn(0x3fd, &mut data)), ExitAction::Continue);
        assert!(matches!(exit_action(&VcpuExit::InternalError), ExitAction::Fail(why) if why.contains("cannot emulate")));
        assert_eq!(exit_action(&VcpuExit::MmioRead(0x3000_0000, &mut data)), ExitAction::Continue);
        assert!(matches!(exit_action(&VcpuExit::Debug(Default::default())), ExitAction::Fail(why) if why.contains("Debug")));
    }
}
