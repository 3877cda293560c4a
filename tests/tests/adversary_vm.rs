//! Attacks from a hostile guest on the microVM monitor itself, each with
//! the outcome it must have. The guests are a few hand-assembled
//! instructions (`sbx_net_tests::guest_code`) doing what no honest driver
//! does: console lengths and addresses of their choosing, a flood of
//! console lines, transmit descriptors that point outside guest memory or
//! the wrong way, queues placed outside memory. The monitor bounds, drops
//! or fails the device; it never crashes, never reads outside the guest,
//! and the run ends as the guest asked.

use sbx_net_tests::guest_code::{mmio_write, mov_rax, mov_rbx, repeat, store_rax, virtio_start, HLT};
use sbx_vmm::probe::abi;
use sbx_vmm::vm::{MicroVm, RunEnd};

fn vm(memory: usize) -> Option<MicroVm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent (no KVM in this kernel)");
        return None;
    }
    Some(MicroVm::new(memory).expect("a VM"))
}

fn run(vm: &mut MicroVm, code: &[u8]) -> RunEnd {
    vm.load(0x10_0000, code).unwrap();
    vm.start_long_mode(0x10_0000, 0x20_0000).unwrap();
    vm.run(1_000_000).expect("the run ends as the guest asks")
}

/// The control window takes the guest's numbers as hostile: a console
/// line outside memory prints nothing, a length of 2^64-1 is cut to one
/// line's maximum, and a flood of maximal lines is kept to the console's
/// bound; then the guest's exit status ends the run.
#[test]
fn console_addresses_lengths_and_floods_from_the_guest_are_bounded() {
    let Some(mut vm) = vm(4 << 20) else { return };
    let control = |offset: u64, value: u64| [mov_rax(value), store_rax(offset as u32)].concat();
    let mut code = mov_rbx(abi::CONTROL_ADDR);
    code.extend(control(abi::CONTROL_CONSOLE_ADDR, 0xffff_ffff_0000));
    code.extend(control(abi::CONTROL_CONSOLE_LEN, 100));
    // A line that runs off the end of memory.
    code.extend(control(abi::CONTROL_CONSOLE_ADDR, (4 << 20) - 10));
    code.extend(control(abi::CONTROL_CONSOLE_LEN, 100));
    code.extend(control(abi::CONTROL_CONSOLE_ADDR, 0));
    code.extend(mov_rax(u64::MAX));
    code.extend(repeat(40, &store_rax(abi::CONTROL_CONSOLE_LEN as u32)));
    code.extend(control(abi::CONTROL_EXIT, 7));
    code.push(HLT);
    assert_eq!(run(&mut vm, &code), RunEnd::Exited(7));
    let console = vm.console();
    // 40 lines of 64 KiB were asked; the console keeps 1 MiB of them.
    assert_eq!(console.len() as u64 % abi::CONSOLE_LINE_MAX, 0, "whole lines only, none from outside memory");
    assert!(console.len() <= 1 << 20, "{} bytes kept", console.len());
    assert!(console.len() as u64 >= abi::CONSOLE_LINE_MAX, "the in-memory line was printed");
}

/// A virtio-net driver that lies: a transmit chain whose buffer is outside
/// guest memory, one marked device-writable, one of 1 GiB; then a disk's
/// queue configured outside memory. The chains come back unused (nothing reaches
/// the tap), the bad activation fails the device, and the VM runs on.
#[test]
fn lying_virtio_descriptors_and_queues_fail_safely() {
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    sbx_net_tests::require_root();
    let Some(mut vm) = vm(4 << 20) else { return };
    let topology = sbx_net_tests::Topology::new("vadv");
    let tap = topology.host.run(|| sbx_vmm::Tap::open("vadv0")).unwrap().unwrap();
    let index = topology.host_netlink.link_index("vadv0").unwrap();
    topology.host_netlink.set_up(index).unwrap();
    let base = vm.add_device(Box::new(sbx_vmm::virtio::net::NetMmio::new([2, 0x5b, 0, 0, 0, 0x66], tap).unwrap())).unwrap();
    let image = std::env::temp_dir().join(sbx_net_tests::unique_name("vadv.img"));
    std::fs::write(&image, vec![0u8; 1 << 16]).unwrap();
    let disk = sbx_vmm::virtio::blk::BlockDevice::new(std::fs::File::open(&image).unwrap(), true, "lying").unwrap();
    let _ = std::fs::remove_file(&image);
    let lying = vm.add_device(Box::new(sbx_vmm::virtio::blk::BlockMmio::new(disk))).unwrap();

    let mem = vm.memory();
    let desc = |addr: u64, len: u32, flags: u32| RawDescriptor::from(Descriptor::new(addr, len, flags as u16, 0));
    let rx = MockSplitQueue::create(mem, GuestAddress(0x30_0000), 16);
    let tx = MockSplitQueue::create(mem, GuestAddress(0x30_8000), 16);
    tx.add_desc_chains(&[desc(0xdead_0000_0000, 1500, 0)], 0).unwrap();
    tx.add_desc_chains(&[desc(0x31_0000, 1500, VRING_DESC_F_WRITE)], 1).unwrap();
    tx.add_desc_chains(&[desc(0x31_0000, 1 << 30, 0)], 2).unwrap();
    let rings = [(rx.desc_table_addr().0, rx.avail_addr().0, rx.used_addr().0), (tx.desc_table_addr().0, tx.avail_addr().0, tx.used_addr().0)];
    let tx_used = tx.used_addr();
    mem.write_slice(&[0xAAu8; 64], GuestAddress(0x31_0000)).unwrap();

    let mut code = virtio_start(base, &rings);
    code.extend(mmio_write(VIRTIO_MMIO_QUEUE_NOTIFY, 1));
    // A disk whose queue is far outside the guest's 4 MiB.
    code.extend(virtio_start(lying, &[(0x7_0000_0000, 0x7_0000_1000, 0x7_0000_2000)]));
    code.push(HLT);
    assert_eq!(run(&mut vm, &code), RunEnd::Halted, "the VM runs on to its halt");
    sbx_net_tests::wait_until(std::time::Duration::from_secs(10), "the three lying chains come back unused", || {
        vm.memory().read_obj::<u16>(GuestAddress(tx_used.0 + 2)).unwrap() == 3
    });
    for i in 0..3u64 {
        let len: u32 = vm.memory().read_obj(GuestAddress(tx_used.0 + 4 + i * 8 + 4)).unwrap();
        assert_eq!(len, 0, "chain {i} used with nothing written");
    }
    assert_eq!(vm.device_status(0), Some(0xf), "a lying chain does not fail the device");
    let status = vm.device_status(1).unwrap();
    assert_ne!(status & VIRTIO_CONFIG_S_FAILED, 0, "queues outside memory fail the activation ({status:#x})");
    let rx_packets = topology.host.run(|| std::fs::read_to_string("/proc/thread-self/net/dev")).unwrap().unwrap();
    let line = rx_packets.lines().find(|l| l.trim_start().starts_with("vadv0:")).expect("the tap's counters");
    let fields: Vec<u64> = line.split(':').nth(1).unwrap().split_whitespace().filter_map(|f| f.parse().ok()).collect();
    assert_eq!(fields[1], 0, "no frame of the guest's reached the tap: {line}");
}
