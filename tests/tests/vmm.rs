//! The microVM core on real KVM: hand-assembled guests (real mode, and 64-bit
//! long mode on the monitor's boot page tables) run on a vCPU, talk to the 16550 console the way a driver does (polling the line
//! status register), meet an absent device, and are stopped when they never
//! halt. (Ring-0 guest code is emulated on this kind of machine; these
//! guests are a few dozen instructions.)

use sbx_net_tests::guest_code::mmio_write;
use sbx_vmm::vm::{MicroVm, RunEnd, VmError};

const LOAD: u16 = 0x1000;

/// `msg` on COM1, one byte at a time after the transmitter is empty
/// (LSR bit 5), then `hlt`.
fn console_writer(msg: &[u8]) -> Vec<u8> {
    let msg_addr = LOAD + 27;
    let mut code = vec![
        0xBE, msg_addr as u8, (msg_addr >> 8) as u8, // mov si, msg
        0xAC, //                 next: lodsb
        0x84, 0xC0, //           test al, al
        0x74, 0x12, //           jz done
        0x88, 0xC3, //           mov bl, al
        0xBA, 0xFD, 0x03, //     mov dx, 0x3fd (LSR)
        0xEC, //                 wait: in al, dx
        0xA8, 0x20, //           test al, 0x20 (THR empty)
        0x74, 0xFB, //           jz wait
        0xBA, 0xF8, 0x03, //     mov dx, 0x3f8 (THR)
        0x88, 0xD8, //           mov al, bl
        0xEE, //                 out dx, al
        0xEB, 0xE9, //           jmp next
        0xF4, //                 done: hlt
    ];
    assert_eq!(code.len(), 27);
    code.extend_from_slice(msg);
    code.push(0);
    code
}

/// None of these needs privileges beyond /dev/kvm; without it (a kernel
/// without KVM) they say so and pass.
fn vm(memory: usize) -> Option<MicroVm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent (no KVM in this kernel)");
        return None;
    }
    Some(MicroVm::new(memory).expect("a VM"))
}

#[test]
fn a_guest_writes_its_console_through_the_16550_and_halts() {
    let Some(mut vm) = vm(1 << 20) else { return };
    vm.load(u64::from(LOAD), &console_writer(b"sbx-net guest up\n")).unwrap();
    vm.start_real_mode(LOAD).unwrap();
    assert_eq!(vm.run(10_000).unwrap(), RunEnd::Halted);
    assert_eq!(vm.console(), b"sbx-net guest up\n");
}

#[test]
fn an_absent_device_reads_all_ones_and_takes_writes_silently() {
    let Some(mut vm) = vm(1 << 20) else { return };
    let code = [
        0xBA, 0x80, 0x00, // mov dx, 0x80 (nothing there)
        0xEE, //             out dx, al
        0xEC, //             in al, dx
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xEE, //             out dx, al
        0xF4, //             hlt
    ];
    vm.load(u64::from(LOAD), &code).unwrap();
    vm.start_real_mode(LOAD).unwrap();
    assert_eq!(vm.run(100).unwrap(), RunEnd::Halted);
    assert_eq!(vm.console(), [0xff]);
}

#[test]
fn a_guest_that_never_halts_is_stopped_at_the_exit_budget() {
    let Some(mut vm) = vm(1 << 20) else { return };
    // loop: out dx, al; jmp loop
    vm.load(u64::from(LOAD), &[0xBA, 0x80, 0x00, 0xEE, 0xEB, 0xFD]).unwrap();
    vm.start_real_mode(LOAD).unwrap();
    assert!(matches!(vm.run(500), Err(VmError::TooManyExits(500))));
    assert!(matches!(vm.load((1 << 20) - 2, &[0; 4]), Err(VmError::ImageTooLarge { .. })), "an image past the end of memory is refused");
}

#[test]
fn a_64_bit_guest_runs_on_the_boot_page_tables() {
    let Some(mut vm) = vm(4 << 20) else { return };
    // At 0x100000 (above the boot tables): print with RIP-relative data.
    let mut code = vec![
        0xBA, 0xF8, 0x03, 0x00, 0x00, //           mov edx, 0x3f8
        0x48, 0x8D, 0x35, 0x09, 0x00, 0x00, 0x00, // lea rsi, [rip + 9] (msg)
        0xAC, //                                     next: lodsb
        0x84, 0xC0, //                               test al, al
        0x74, 0x03, //                               jz done
        0xEE, //                                     out dx, al
        0xEB, 0xF8, //                               jmp next
        0xF4, //                                     done: hlt
    ];
    assert_eq!(code.len(), 21);
    code.extend_from_slice(b"long mode\n\0");
    vm.load(0x10_0000, &code).unwrap();
    vm.start_long_mode(0x10_0000, 0x20_0000).unwrap();
    assert_eq!(vm.run(10_000).unwrap(), RunEnd::Halted);
    assert_eq!(vm.console(), b"long mode\n");
}

#[test]
fn a_64_bit_guest_finds_the_virtio_net_device_over_mmio() {
    let Some(mut vm) = vm(4 << 20) else { return };
    let transport = sbx_vmm::virtio::mmio::MmioTransport::new(&sbx_vmm::virtio::net::NetDevice::new([2, 0x5b, 0, 0, 0, 1]));
    let base = vm.add_device(Box::new(transport)).unwrap();
    assert_eq!(base, sbx_vmm::vm::MMIO_BASE);
    let mut code = vec![0x48, 0xBB];
    code.extend_from_slice(&base.to_le_bytes()); //  mov rbx, base
    code.extend_from_slice(&[
        0x66, 0xBA, 0xF8, 0x03, //                     mov dx, 0x3f8
        0x8B, 0x03, //                                 mov eax, [rbx]        (magic)
        0xEE, 0xC1, 0xE8, 0x08, //                     out dx, al; shr eax, 8
        0xEE, 0xC1, 0xE8, 0x08, //
        0xEE, 0xC1, 0xE8, 0x08, //
        0xEE, //                                       "virt"
        0x8B, 0x43, 0x04, 0x04, 0x30, 0xEE, //         version + '0'
        0x8B, 0x43, 0x08, 0x04, 0x30, 0xEE, //         device id + '0'
        0xC7, 0x43, 0x70, 0x01, 0x00, 0x00, 0x00, //   status = ACKNOWLEDGE
        0x8B, 0x43, 0x70, 0x04, 0x30, 0xEE, //         status + '0'
        0x8B, 0x83, 0x00, 0x01, 0x00, 0x00, //         mov eax, [rbx + 0x100] (MAC bytes 0..4)
        0xC1, 0xE8, 0x08, 0x04, 0x00, 0xEE, //         second MAC byte (0x5b = '[')
        0x48, 0x8B, 0x9B, 0x00, 0x00, 0x01, 0x00, //   mov rbx, [rbx + 0x10000] (nothing there)
        0x88, 0xD8, 0xEE, //                           mov al, bl; out dx, al (0xff)
        0xF4, //                                       hlt
    ]);
    vm.load(0x10_0000, &code).unwrap();
    vm.start_long_mode(0x10_0000, 0x20_0000).unwrap();
    assert_eq!(vm.run(10_000).unwrap(), RunEnd::Halted);
    assert_eq!(vm.console(), b"virt211[\xff", "magic, version 2, device type 1 (net), ACKNOWLEDGE read back, the MAC, an empty window");
    assert_eq!(vm.device_status(0).unwrap(), 1);
}

/// virtio-net's transmit and receive paths against a real tap: an ARP
/// request the "guest" queued in its memory reaches the host's stack, and
/// the host's reply lands in the guest's receive buffers, vnet header and
/// all (12 bytes, as virtio 1.x has it).
#[test]
fn virtio_net_carries_frames_between_guest_memory_and_a_real_tap() {
    use sbx_net_tests::frames::{arp_request, ethernet, ETH_P_ARP};
    use sbx_vmm::virtio::net::{process_rx, process_tx, MAX_FRAME, NET_HDR_LEN};
    use std::net::Ipv4Addr;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    sbx_net_tests::require_root();
    let topology = sbx_net_tests::Topology::new("vnet");
    let mut tap = topology.host.run(|| sbx_vmm::Tap::open("vnet0")).unwrap().unwrap();
    tap.set_vnet_hdr_len(NET_HDR_LEN).unwrap();
    let index = topology.host_netlink.link_index("vnet0").unwrap();
    let (host_ip, guest_ip) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2));
    topology.host_netlink.add_address(index, host_ip.into(), 24).unwrap();
    topology.host_netlink.set_up(index).unwrap();
    let guest_mac = [2, 0x5b, 0, 0, 0, 2];

    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let desc = |addr: u64, len: u32, flags: u32| RawDescriptor::from(Descriptor::new(addr, len, flags as u16, 0));
    // Transmit: the request, header first.
    let mut request = vec![0u8; NET_HDR_LEN];
    request.extend(ethernet([0xff; 6], guest_mac, ETH_P_ARP, &arp_request(guest_mac, guest_ip, host_ip)));
    mem.write_slice(&request, GuestAddress(0x10_0000)).unwrap();
    let tx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    tx.add_desc_chains(&[desc(0x10_0000, request.len() as u32, 0)], 0).unwrap();
    let mut tx_queue: Queue = tx.create_queue().unwrap();
    // Receive: eight buffers (the host also sends IPv6 router and listener
    // messages when the link comes up).
    let rx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let buffers: Vec<RawDescriptor> = (0..8).map(|i| desc(0x20_0000 + i * 0x1000, 2048, VRING_DESC_F_WRITE)).collect();
    rx.add_desc_chains(&buffers, 0).unwrap();
    let mut rx_queue: Queue = rx.create_queue().unwrap();

    let sent = process_tx(&mut tx_queue, &mem, &mut tap).unwrap();
    assert_eq!((sent.frames, sent.dropped), (1, 0));
    let mut buf = vec![0u8; MAX_FRAME];
    let reply = sbx_net_tests::wait_for(std::time::Duration::from_secs(10), "the host's ARP reply in a guest buffer", || {
        process_rx(&mut rx_queue, &mem, &mut tap, &mut buf).unwrap();
        (0..rx.used().idx().load()).find_map(|i| {
            let used = rx.used().ring().ref_at(i as usize).unwrap().load();
            let mut frame = vec![0u8; used.len() as usize];
            mem.read_slice(&mut frame, GuestAddress(0x20_0000 + u64::from(used.id()) * 0x1000)).unwrap();
            let arp = frame.get(NET_HDR_LEN + 14..)?;
            (frame[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == ETH_P_ARP.to_be_bytes() && arp[6..8] == [0, 2]).then_some(frame)
        })
    });
    assert_eq!(&reply[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&reply[NET_HDR_LEN..NET_HDR_LEN + 6], &guest_mac, "to the guest");
    let arp = &reply[NET_HDR_LEN + 14..];
    assert_eq!(&arp[14..18], &host_ip.octets(), "the host answers for its address");
    assert_eq!(&arp[24..28], &guest_ip.octets());
}

/// The child half of the next test (runs only when its parent asks).
#[test]
fn seccomp_child_runs_a_guest_then_tries_a_socket() {
    if std::env::var_os("SBX_VMM_SECCOMP_CHILD").is_none() {
        return;
    }
    let mut vm = MicroVm::new(1 << 20).unwrap();
    vm.load(u64::from(LOAD), &console_writer(b"filtered guest\n")).unwrap();
    vm.start_real_mode(LOAD).unwrap();
    sbx_vmm::seccomp::install_on_this_thread().unwrap();
    // Running the VM and writing out are allowed...
    assert_eq!(vm.run(10_000).unwrap(), RunEnd::Halted);
    let console = vm.console();
    // SAFETY: write(2) of a live buffer to stdout.
    unsafe { libc::write(1, console.as_ptr().cast(), console.len()) };
    // ...a socket is not: the process dies here.
    // SAFETY: a plain socket(2) call; the filter kills the process first.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    // SAFETY: write(2) of a static buffer.
    unsafe { libc::write(1, b"SURVIVED\n".as_ptr().cast(), 9) };
}

#[test]
fn the_vmm_filter_lets_a_guest_run_and_kills_the_process_at_a_forbidden_call() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "seccomp_child_runs_a_guest_then_tries_a_socket", "--nocapture", "--test-threads=1"])
        .env("SBX_VMM_SECCOMP_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "killed by the filter: {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("filtered guest"), "the guest ran under the filter: {stdout}");
    assert!(!stdout.contains("SURVIVED"), "{stdout}");
}

#[test]
fn a_spinning_guest_is_stopped_from_another_thread() {
    let Some(mut vm) = vm(1 << 20) else { return };
    // jmp $: no exit ever (ring-0 code, emulated here, stays in the kernel).
    vm.load(u64::from(LOAD), &[0xEB, 0xFE]).unwrap();
    vm.start_real_mode(LOAD).unwrap();
    let kicker = vm.kicker();
    let stopper = std::thread::spawn(move || {
        // Pacing, not waiting: lets the vCPU enter KVM_RUN and spin, so the
        // stop has to interrupt it (a stop before the run is seen at once).
        std::thread::sleep(std::time::Duration::from_millis(100));
        kicker.stop(std::time::Duration::from_secs(10))
    });
    let started = std::time::Instant::now();
    assert_eq!(vm.run(1_000_000).unwrap(), RunEnd::Stopped);
    assert!(stopper.join().unwrap(), "the kicker saw the run stop");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// The whole path on real KVM: a 64-bit guest drives the virtio-net device
/// the way a driver does (status, features, both queues, DRIVER_OK, a
/// notification) with an ARP request already in its transmit queue; the
/// monitor moves it through the tap to the host's stack, which learns the
/// guest's address from it.
#[test]
fn a_guest_driver_sends_a_frame_through_virtio_net_and_the_tap() {
    use sbx_net_tests::frames::{arp_request, ethernet, ETH_P_ARP};
    use std::net::Ipv4Addr;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    sbx_net_tests::require_root();
    let Some(mut vm) = vm(4 << 20) else { return };
    let topology = sbx_net_tests::Topology::new("vdrv");
    let tap = topology.host.run(|| sbx_vmm::Tap::open("vdrv0")).unwrap().unwrap();
    let index = topology.host_netlink.link_index("vdrv0").unwrap();
    let (host_ip, guest_ip) = (Ipv4Addr::new(10, 77, 1, 1), Ipv4Addr::new(10, 77, 1, 2));
    topology.host_netlink.add_address(index, host_ip.into(), 24).unwrap();
    topology.host_netlink.set_up(index).unwrap();
    let guest_mac = [2, 0x5b, 0, 0, 0, 0x2a];
    let base = vm.add_device(Box::new(sbx_vmm::virtio::net::NetMmio::new(guest_mac, tap).unwrap())).unwrap();

    // What the driver has in memory before it starts: the request in a
    // transmit buffer, eight receive buffers.
    let mut request = vec![0u8; sbx_vmm::virtio::net::NET_HDR_LEN];
    request.extend(ethernet([0xff; 6], guest_mac, ETH_P_ARP, &arp_request(guest_mac, guest_ip, host_ip)));
    let mem = vm.memory();
    mem.write_slice(&request, GuestAddress(0x31_0000)).unwrap();
    let desc = |addr: u64, len: u32, flags: u32| RawDescriptor::from(Descriptor::new(addr, len, flags as u16, 0));
    let rx = MockSplitQueue::create(mem, GuestAddress(0x30_0000), 16);
    let rx_buffers: Vec<RawDescriptor> = (0..8).map(|i| desc(0x32_0000 + i * 0x1000, 2048, VRING_DESC_F_WRITE)).collect();
    rx.add_desc_chains(&rx_buffers, 0).unwrap();
    let tx = MockSplitQueue::create(mem, GuestAddress(0x30_8000), 16);
    tx.add_desc_chains(&[desc(0x31_0000, request.len() as u32, 0)], 0).unwrap();
    let rings = [(rx.desc_table_addr().0, rx.avail_addr().0, rx.used_addr().0), (tx.desc_table_addr().0, tx.avail_addr().0, tx.used_addr().0)];
    let tx_used = tx.used_addr();

    let mut code = sbx_net_tests::guest_code::virtio_start(base, &rings);
    code.extend(mmio_write(VIRTIO_MMIO_QUEUE_NOTIFY, 1));
    code.push(0xF4); // hlt
    vm.load(0x10_0000, &code).unwrap();
    vm.start_long_mode(0x10_0000, 0x20_0000).unwrap();
    assert_eq!(vm.run(10_000).unwrap(), RunEnd::Halted);
    assert_eq!(vm.device_status(0).unwrap(), 0xf, "activated, not failed");
    // The device thread serves the notification (its ioeventfd) while or
    // after the guest halts.
    sbx_net_tests::wait_until(std::time::Duration::from_secs(10), "the transmit buffer goes back to the guest", || {
        vm.memory().read_obj::<u16>(GuestAddress(tx_used.0 + 2)).unwrap() == 1
    });
    sbx_net_tests::wait_until(std::time::Duration::from_secs(10), "the host learns the guest's address from its ARP request", || {
        let out = sbx_net_tests::run_in(topology.host.name(), "ip", &["-4", "neigh", "show", "dev", "vdrv0"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.contains(&guest_ip.to_string()) && text.contains("02:5b:00:00:00:2a")
    });
}

/// The project's own guest (no_std, ring 3, virtio-drivers and smoltcp)
/// boots, finds virtio-net on a real tap, and pings the host's address on
/// the tap: ARP and ICMP through the device thread, the ioeventfd and the
/// idle port.
#[test]
fn the_probe_guest_pings_the_host_through_virtio_net_on_a_tap() {
    use sbx_vmm::probe::{boot, script, ProbeNetwork};
    use std::net::Ipv4Addr;
    sbx_net_tests::require_root();
    let topology = sbx_net_tests::Topology::new("vpro");
    let tap = topology.host.run(|| sbx_vmm::Tap::open("vpro0")).unwrap().unwrap();
    let index = topology.host_netlink.link_index("vpro0").unwrap();
    let (host_ip, guest_ip) = (Ipv4Addr::new(10, 78, 0, 1), Ipv4Addr::new(10, 78, 0, 2));
    topology.host_netlink.add_address(index, host_ip.into(), 24).unwrap();
    topology.host_netlink.set_up(index).unwrap();
    let Some(mut vm) = vm(64 << 20) else { return };
    vm.add_device(Box::new(sbx_vmm::virtio::net::NetMmio::new([2, 0x5b, 0, 0, 0, 9], tap).unwrap())).unwrap();
    let net = ProbeNetwork { ipv4: Some((guest_ip, 24, host_ip)), ipv6: None, dns: vec![] };
    let text = script(&net, "timeout 5000\nping 10.78.0.1\nping 10.78.0.1\n").unwrap();
    boot(&mut vm, 64 << 20, &text).unwrap();
    let end = run_bounded(&mut vm, std::time::Duration::from_secs(15));
    let console = String::from_utf8_lossy(&vm.console()).into_owned();
    eprintln!("{console}\n{} device status {:?}", vm.vcpu_state(), vm.device_status(0));
    assert_eq!(end.unwrap(), RunEnd::Exited(0), "{console}");
    let pings: Vec<serde_json::Value> = console.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|v| v["op"] == "ping").collect();
    assert_eq!(pings.len(), 2, "{console}");
    assert!(pings.iter().all(|p| p["ok"] == true), "{console}");
}

/// Runs `vm` until it ends or `limit` passes (then it is stopped).
fn run_bounded(vm: &mut MicroVm, limit: std::time::Duration) -> Result<RunEnd, VmError> {
    let kicker = vm.kicker();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            kicker.stop(std::time::Duration::from_secs(5));
        }
    });
    let end = vm.run(u64::MAX);
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    end
}

/// A VM for a Linux guest gets its interrupt controller and PIT before
/// its vCPU (KVM refuses them after), its devices an irqfd each, and the
/// kernel's registers at entry: rsi at the zero page. (The boot itself
/// needs VMX or SVM KVM; this host's kvm_pvm runs only PVM kernels.)
#[test]
fn a_linux_vm_has_an_irqchip_irqfds_and_the_boot_registers() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent (no KVM in this kernel)");
        return;
    }
    let mut vm = MicroVm::for_linux(64 << 20).expect("irqchip, PIT and CPUID before the vCPU");
    let device = sbx_vmm::virtio::mmio::MmioTransport::new(&sbx_vmm::virtio::net::NetDevice::new([2, 0, 0, 0, 0, 1]));
    vm.add_device(Box::new(device)).expect("a device with its irqfd");
    vm.start_linux(0x100_0200, 0x8ff0, 0x7000).unwrap();
    let state = vm.vcpu_state();
    assert!(state.contains("rip=0x1000200") && state.contains("rsi=0x7000"), "{state}");
}
