//! The microVM core: a KVM virtual machine with its guest memory (vm-memory),
//! one vCPU (kvm-ioctls), a 16550 serial console (vm-superio) on COM1,
//! virtio-mmio device windows served by the device thread (`devices`:
//! ioeventfd in, irqfd and the `news` eventfd out), and the test guest's
//! two paravirtual ports (exit, idle), run until the guest halts or exits.
//!
//! Exits are decided by pure functions ([`port_device`], [`exit_action`])
//! that are unit-tested without KVM.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{DeviceLoop, DeviceSlot, SharedDevice};
use crate::probe::abi;

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
    #[error("the device thread: {0}")]
    Devices(#[source] std::io::Error),
    #[error("more than {} devices", abi::MAX_DEVICES)]
    TooManyDevices,
}

/// The device a port I/O exit is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortDevice {
    /// COM1, at this register offset.
    Serial(u8),
    /// The test guest's exit port (its ring 0): a write ends the run.
    Exit,
    /// Nothing: reads see all ones, writes are dropped (as on real hardware).
    None,
}

/// Which device answers `port` (pure).
pub fn port_device(port: u16) -> PortDevice {
    match port {
        p if COM1.contains(&p) => PortDevice::Serial((p - COM1.start()) as u8),
        abi::EXIT_PORT => PortDevice::Exit,
        _ => PortDevice::None,
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

/// A port write's value (little-endian, as wide as the access).
pub fn port_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

/// A write to the test guest's control window (pure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    ConsoleAddress(u64),
    /// Print that many bytes from the last address (at most a line's worth).
    ConsoleLength(u64),
    Exit(u32),
    Idle(u32),
    None,
}

/// What a write at `offset` in the control window asks.
pub fn control_write(offset: u64, data: &[u8]) -> Control {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    let value = u64::from_le_bytes(bytes);
    match offset {
        abi::CONTROL_CONSOLE_ADDR => Control::ConsoleAddress(value),
        abi::CONTROL_CONSOLE_LEN => Control::ConsoleLength(value.min(abi::CONSOLE_LINE_MAX)),
        abi::CONTROL_EXIT => Control::Exit(value as u32),
        abi::CONTROL_IDLE => Control::Idle(value.min(u64::from(u32::MAX)) as u32),
        _ => Control::None,
    }
}

/// Waits up to `micros` for the device thread's news (the idle register), or
/// a kick (the signal interrupts the wait).
fn idle(news: &EventFd, micros: u32) {
    let mut fds = [libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(news), events: libc::POLLIN, revents: 0 }];
    let timeout = libc::timespec { tv_sec: i64::from(micros / 1_000_000), tv_nsec: i64::from(micros % 1_000_000) * 1000 };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
    let ready = unsafe { libc::ppoll(fds.as_mut_ptr(), 1, &timeout, std::ptr::null()) };
    if ready > 0 {
        // Consumed: the next idle waits for new news.
        let _ = news.read();
    }
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
    /// The guest wrote this status to the exit port.
    Exited(u32),
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

/// What the guest wrote on its console, shared with whoever reads it, and
/// echoed to a sink if one is set: both bounded, the guest's output being
/// the guest's to make as large as it likes.
#[derive(Clone, Default)]
pub struct Console {
    contents: Arc<Mutex<Vec<u8>>>,
    echo: Arc<Mutex<Option<Echo>>>,
}

struct Echo {
    sink: Box<dyn std::io::Write + Send>,
    written: u64,
}

/// How much console output a VM keeps in memory.
const CONSOLE_KEPT: usize = 1 << 20;
/// How much of it goes to the echo (a log file, stdout): past this, one
/// last line says the rest was cut.
pub const CONSOLE_ECHO_MAX: u64 = 64 << 20;

impl Console {
    pub fn contents(&self) -> Vec<u8> {
        self.contents.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_echo(&self, sink: Box<dyn std::io::Write + Send>) {
        *self.echo.lock().unwrap_or_else(|p| p.into_inner()) = Some(Echo { sink, written: 0 });
    }
}

impl std::io::Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut contents = self.contents.lock().unwrap_or_else(|p| p.into_inner());
        if contents.len() + buf.len() <= CONSOLE_KEPT {
            contents.extend_from_slice(buf);
        }
        drop(contents);
        let mut echo = self.echo.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = echo.as_mut() {
            // A reader that went away does not stop the guest.
            if e.written + buf.len() as u64 <= CONSOLE_ECHO_MAX {
                let _ = e.sink.write_all(buf);
                e.written += buf.len() as u64;
                if buf.contains(&b'\n') {
                    let _ = e.sink.flush();
                }
            } else if e.written <= CONSOLE_ECHO_MAX {
                let _ = writeln!(e.sink, "\n{{\"event\":\"console_cut\",\"after_bytes\":{}}}", e.written);
                let _ = e.sink.flush();
                e.written = CONSOLE_ECHO_MAX + 1;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A VM, its vCPU and its memory. Field order is drop order: the device
/// thread stops first, then the vCPU and the VM go before the memory their
/// region points into.
pub struct MicroVm {
    device_loop: Option<DeviceLoop>,
    /// Set by a [`Kicker`]; the run loop's answer in `stopped`.
    stop: Arc<std::sync::atomic::AtomicBool>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    /// virtio-mmio devices, in the order added (window i at
    /// `MMIO_BASE + i * MMIO_WINDOW`), shared with the device thread.
    devices: Vec<SharedDevice>,
    /// Each device's notification eventfd (registered as an ioeventfd) and
    /// interrupt line, until the device thread takes them.
    slots: Vec<(EventFd, EventFd)>,
    /// Written by the device thread whenever a device used buffers.
    news: Arc<EventFd>,
    irqchip: bool,
    /// The test guest's console line address (control window).
    console_line: u64,
    vcpu: VcpuFd,
    vm: VmFd,
    _kvm: Kvm,
    memory: GuestMemoryMmap<()>,
    memory_size: usize,
    serial: vm_superio::Serial<NoInterrupt, vm_superio::serial::NoEvents, Console>,
    console: Console,
}

/// The first GSI of the virtio devices' interrupt lines (after the legacy
/// ISA ones a Linux guest expects: COM1 is 4).
pub const FIRST_DEVICE_GSI: u32 = 5;

/// The QueueNotify register's offset in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

impl MicroVm {
    /// A VM with `memory_size` bytes of guest memory from address 0 (the
    /// test guest's kind: no interrupt controller, it polls).
    pub fn new(memory_size: usize) -> Result<MicroVm, VmError> {
        Self::build(memory_size, false)
    }

    /// A VM for a Linux guest: an in-kernel interrupt controller and PIT
    /// (made before the vCPU, as KVM requires) through which the devices
    /// interrupt (irqfd), and the vCPU's CPUID set from what KVM supports
    /// (a kernel checks it for long mode before anything else).
    pub fn for_linux(memory_size: usize) -> Result<MicroVm, VmError> {
        Self::build(memory_size, true)
    }

    fn build(memory_size: usize, irqchip: bool) -> Result<MicroVm, VmError> {
        if memory_size as u64 > MMIO_BASE {
            return Err(VmError::Memory(format!("{memory_size:#x} bytes would overlap the device windows at {MMIO_BASE:#x}")));
        }
        let kvm = Kvm::new()?;
        let vm = kvm.create_vm()?;
        let memory: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), memory_size)]).map_err(|e| VmError::Memory(e.to_string()))?;
        let host = memory.get_host_address(GuestAddress(0)).map_err(|e| VmError::Memory(e.to_string()))?;
        let region = kvm_bindings::kvm_userspace_memory_region { slot: 0, flags: 0, guest_phys_addr: 0, memory_size: memory_size as u64, userspace_addr: host as u64 };
        // SAFETY: the region is the whole of `memory`, a mapping this VM
        // owns and unmaps only after the VM and its vCPU are closed (field
        // order); nothing else is mapped at that guest range.
        unsafe { vm.set_user_memory_region(region)? };
        if irqchip {
            vm.create_irq_chip()?;
            vm.create_pit2(kvm_bindings::kvm_pit_config::default())?;
        }
        let vcpu = vm.create_vcpu(0)?;
        if irqchip {
            vcpu.set_cpuid2(&kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?)?;
        }
        let console = Console::default();
        let serial = vm_superio::Serial::new(NoInterrupt, console.clone());
        let news = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Devices)?);
        Ok(MicroVm {
            device_loop: None,
            stop: Arc::default(),
            stopped: Arc::default(),
            devices: Vec::new(),
            slots: Vec::new(),
            news,
            irqchip,
            console_line: 0,
            vcpu,
            vm,
            _kvm: kvm,
            memory,
            memory_size,
            serial,
            console,
        })
    }


    /// The vCPU's TSC frequency (the test guest's clock), if KVM says.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.vcpu.get_tsc_khz().ok().filter(|k| *k > 0)
    }

    /// Sends the guest's console output to `sink` as well (the VMM
    /// process streams it to its stdout).
    pub fn echo_console(&mut self, sink: Box<dyn std::io::Write + Send>) {
        self.console.set_echo(sink);
    }

    /// A handle that stops this VM's run; call it on the thread that will
    /// run the VM.
    pub fn kicker(&self) -> Kicker {
        install_kick_handler();
        // SAFETY: pthread_self has no preconditions.
        Kicker { thread: unsafe { libc::pthread_self() }, stop: self.stop.clone(), stopped: self.stopped.clone() }
    }

    /// Adds a virtio-mmio device; returns its window's address. A queue
    /// notification (a write to its QueueNotify register) signals an
    /// ioeventfd in the kernel, for the device thread.
    pub fn add_device(&mut self, device: Box<dyn crate::virtio::MmioDevice>) -> Result<u64, VmError> {
        if self.devices.len() >= abi::MAX_DEVICES {
            return Err(VmError::TooManyDevices);
        }
        let base = MMIO_BASE + self.devices.len() as u64 * MMIO_WINDOW;
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Devices)?;
        self.vm.register_ioevent(&notify, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), NoDatamatch)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Devices)?;
        if self.irqchip {
            self.vm.register_irqfd(&irq, FIRST_DEVICE_GSI + self.devices.len() as u32)?;
        }
        self.devices.push(Arc::new(Mutex::new(device)));
        self.slots.push((notify, irq));
        Ok(base)
    }

    /// The device windows' addresses, in order.
    pub fn device_windows(&self) -> Vec<u64> {
        (0..self.devices.len() as u64).map(|i| MMIO_BASE + i * MMIO_WINDOW).collect()
    }

    /// Device `index`'s transport status register.
    pub fn device_status(&self, index: usize) -> Option<u32> {
        self.devices.get(index).map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).transport().status)
    }

    /// Starts the device thread (before a seccomp filter that forbids
    /// making threads); [`MicroVm::run`] starts it if it is not running.
    pub fn start_devices(&mut self) -> Result<(), VmError> {
        if self.device_loop.is_some() || self.devices.is_empty() {
            return Ok(());
        }
        let mut slots = Vec::with_capacity(self.devices.len());
        for (device, (notify, irq)) in self.devices.iter().zip(&self.slots) {
            slots.push(DeviceSlot {
                device: device.clone(),
                notify: notify.try_clone().map_err(VmError::Devices)?,
                irq: irq.try_clone().map_err(VmError::Devices)?,
            });
        }
        self.device_loop = Some(DeviceLoop::start(slots, self.memory.clone(), self.news.clone()).map_err(VmError::Devices)?);
        Ok(())
    }

    /// The device and the offset in its window of an MMIO address.
    fn device_at(devices: &[SharedDevice], addr: u64) -> Option<(usize, u64)> {
        let index = (addr.checked_sub(MMIO_BASE)? / MMIO_WINDOW) as usize;
        devices.get(index)?;
        Some((index, (addr - MMIO_BASE) % MMIO_WINDOW))
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

    /// Starts the vCPU at a Linux kernel's 64-bit entry: long mode on the
    /// boot tables, `rsi` at the zero page (the 64-bit boot protocol).
    pub fn start_linux(&mut self, entry: u64, stack: u64, boot_params: u64) -> Result<(), VmError> {
        self.start_long_mode(entry, stack)?;
        let mut regs = self.vcpu.get_regs()?;
        regs.rsi = boot_params;
        self.vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Runs the vCPU until the guest halts, shuts down or exits, serving
    /// port I/O and device registers, for at most `max_exits` exits.
    pub fn run(&mut self, max_exits: u64) -> Result<RunEnd, VmError> {
        use std::sync::atomic::Ordering;
        self.start_devices()?;
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
                VcpuExit::IoOut(port, data) => match port_device(port) {
                    PortDevice::Serial(offset) => {
                        if let Some(&value) = data.first() {
                            // The output is our own buffer: it cannot fail.
                            let _ = self.serial.write(offset, value);
                        }
                    }
                    PortDevice::Exit => return Ok(RunEnd::Exited(port_value(data))),
                    PortDevice::None => {}
                },
                VcpuExit::MmioRead(addr, data) => match Self::device_at(&self.devices, addr) {
                    Some((index, offset)) => self.devices[index].lock().unwrap_or_else(|p| p.into_inner()).read(offset, data),
                    // Nothing there: all ones, as on a bus with no device.
                    None => data.fill(0xff),
                },
                VcpuExit::MmioWrite(addr, data) if (abi::CONTROL_ADDR..abi::CONTROL_ADDR + MMIO_WINDOW).contains(&addr) => {
                    match control_write(addr - abi::CONTROL_ADDR, data) {
                        Control::ConsoleAddress(at) => self.console_line = at,
                        Control::ConsoleLength(len) => {
                            let mut line = vec![0u8; len as usize];
                            // A line outside guest memory is not printed.
                            if self.memory.read_slice(&mut line, GuestAddress(self.console_line)).is_ok() {
                                let _ = std::io::Write::write_all(&mut self.console, &line);
                            }
                        }
                        Control::Exit(status) => return Ok(RunEnd::Exited(status)),
                        Control::Idle(micros) => idle(&self.news, micros),
                        Control::None => {}
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if let Some((index, offset)) = Self::device_at(&self.devices, addr) {
                        let notified = self.devices[index].lock().unwrap_or_else(|p| p.into_inner()).write(offset, data, &self.memory);
                        if notified {
                            // A notification KVM's ioeventfd did not catch
                            // (a write of another width): pass it on.
                            let _ = self.slots[index].0.write(1);
                        }
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    let value = match port_device(port) {
                        PortDevice::Serial(offset) => self.serial.read(offset),
                        _ => 0xff,
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

    /// The vCPU's registers, for a report on a guest that shut down.
    pub fn vcpu_state(&self) -> String {
        match (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rsi={:#x} rflags={:#x} rax={:#x} cs={:#x}(dpl {}) ss={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} gdt={:#x}/{} idt={:#x}/{} tr={:#x}",
                r.rip, r.rsp, r.rsi, r.rflags, r.rax, s.cs.selector, s.cs.dpl, s.ss.selector, s.cr0, s.cr3, s.cr4, s.efer, s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit, s.tr.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        }
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
        const { assert!(boot::PD_ADDR + 4096 <= 0x10000, "the tables stay below the images") };
    }

    #[test]
    fn ports_are_served_by_com1_or_by_nothing() {
        assert_eq!(port_device(0x3f8), PortDevice::Serial(0));
        assert_eq!(port_device(0x3fd), PortDevice::Serial(5));
        assert_eq!(port_device(0x3ff), PortDevice::Serial(7));
        assert_eq!(port_device(0x3f7), PortDevice::None);
        assert_eq!(port_device(0x400), PortDevice::None);
        assert_eq!(port_device(0x2f8), PortDevice::None, "COM2 is not there");
        assert_eq!(port_device(abi::EXIT_PORT), PortDevice::Exit);
        assert_eq!(port_value(&[0x34, 0x12, 0, 0]), 0x1234);
        assert_eq!(port_value(&[7]), 7);
    }

    #[test]
    fn the_control_window_decodes_console_exit_and_idle_and_bounds_them() {
        assert_eq!(control_write(abi::CONTROL_CONSOLE_ADDR, &0x20_0000u64.to_le_bytes()), Control::ConsoleAddress(0x20_0000));
        assert_eq!(control_write(abi::CONTROL_CONSOLE_LEN, &12u64.to_le_bytes()), Control::ConsoleLength(12));
        assert_eq!(control_write(abi::CONTROL_CONSOLE_LEN, &u64::MAX.to_le_bytes()), Control::ConsoleLength(abi::CONSOLE_LINE_MAX), "a hostile length is cut");
        assert_eq!(control_write(abi::CONTROL_EXIT, &[3, 0, 0, 0]), Control::Exit(3));
        assert_eq!(control_write(abi::CONTROL_IDLE, &u64::MAX.to_le_bytes()), Control::Idle(u32::MAX));
        assert_eq!(control_write(0x20, &[1]), Control::None);
        const { assert!(abi::CONTROL_ADDR >= MMIO_BASE + abi::MAX_DEVICES as u64 * MMIO_WINDOW, "after every device window") };
    }

    #[test]
    fn the_console_keeps_and_echoes_a_bounded_amount() {
        use std::io::Write;
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<u64>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                *self.0.lock().unwrap() += buf.len() as u64;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let mut console = Console::default();
        console.set_echo(Box::new(sink.clone()));
        let line = vec![b'x'; 1 << 16];
        for _ in 0..(CONSOLE_ECHO_MAX >> 16) + 100 {
            console.write_all(&line).unwrap();
        }
        assert_eq!(console.contents().len(), CONSOLE_KEPT);
        let echoed = *sink.0.lock().unwrap();
        assert!(echoed > CONSOLE_ECHO_MAX && echoed < CONSOLE_ECHO_MAX + 100, "{echoed}");
    }

    #[test]
    fn halts_and_resets_end_a_run_and_unserved_exits_fail_it() {
        assert_eq!(exit_action(&VcpuExit::Hlt), ExitAction::Halted);
        assert_eq!(exit_action(&VcpuExit::Shutdown), ExitAction::Shutdown);
        assert_eq!(exit_action(&VcpuExit::IoOut(0x3f8, b"a")), ExitAction::Continue);
        let mut data = [0u8; 1];
        assert_eq!(exit_action(&VcpuExit::IoIn(0x3fd, &mut data)), ExitAction::Continue);
        assert!(matches!(exit_action(&VcpuExit::InternalError), ExitAction::Fail(why) if why.contains("cannot emulate")));
        assert_eq!(exit_action(&VcpuExit::MmioRead(0x3000_0000, &mut data)), ExitAction::Continue);
        assert!(matches!(exit_action(&VcpuExit::Debug(Default::default())), ExitAction::Fail(why) if why.contains("Debug")));
    }
}
