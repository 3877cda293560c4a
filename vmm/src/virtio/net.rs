//! virtio-net: the features the device offers, what the negotiated ones
//! turn on at the sandbox tap (TUNSETOFFLOAD), so that the guest's checksum
//! and segmentation offloads and the tap's agree, and the transmit and
//! receive paths between the virtqueues in guest memory and the tap.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC,
};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory};

use super::VirtioDevice;

/// The virtio 1.x net header (`virtio_net_hdr_v1`: flags, GSO type and
/// sizes, checksum start and offset, number of buffers): the tap is set to
/// the same size (TUNSETVNETHDRSZ), so headers pass through untouched.
pub const NET_HDR_LEN: usize = 12;
/// The largest frame with its header: a 64 KiB GSO packet, its Ethernet
/// header and the virtio header.
pub const MAX_FRAME: usize = NET_HDR_LEN + 14 + 65535;

/// The tap side of the device: frames with their virtio-net header.
pub trait FramePort {
    /// Sends one frame (guest → host).
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Receives one frame into `buf` (host → guest); None: nothing waits.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("tap: {0}")]
    Port(#[from] std::io::Error),
}

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub frames: u64,
    /// Chains the guest got back unused: malformed (a device-writable
    /// buffer on tx, a device-readable one on rx, an address outside its
    /// memory), too large, or too small for the frame.
    pub dropped: u64,
    /// (rx) The pass ended for want of receive buffers, not of frames.
    pub starved: bool,
}

/// Sends every frame the guest queued on its transmit queue to the tap;
/// each chain goes back to the guest on the used ring.
pub fn process_tx<M: GuestMemory>(queue: &mut Queue, mem: &M, port: &mut impl FramePort) -> Result<Moved, NetError> {
    let mut moved = Moved::default();
    let mut frame = Vec::with_capacity(MAX_FRAME);
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        frame.clear();
        let mut ok = true;
        for desc in chain {
            let len = desc.len() as usize;
            if desc.is_write_only() || frame.len() + len > MAX_FRAME {
                ok = false;
                break;
            }
            let start = frame.len();
            frame.resize(start + len, 0);
            if mem.read_slice(&mut frame[start..], desc.addr()).is_err() {
                ok = false;
                break;
            }
        }
        // A frame the tap refuses (down, a GSO header it rejects, no
        // buffer) is lost as on a wire; its buffer still goes back, or the
        // guest's driver would wait for it forever.
        if ok && frame.len() > NET_HDR_LEN && port.send(&frame).is_ok() {
            moved.frames += 1;
        } else {
            moved.dropped += 1;
        }
        queue.add_used(mem, head, 0)?;
    }
    Ok(moved)
}

/// Delivers frames waiting at the tap into the guest's receive buffers,
/// one frame per chain (mergeable buffers are not offered), until either
/// runs out. A frame larger than its chain is dropped (the chain is used
/// for the next one).
pub fn process_rx<M: GuestMemory>(queue: &mut Queue, mem: &M, port: &mut impl FramePort, buf: &mut [u8]) -> Result<Moved, NetError> {
    let mut moved = Moved::default();
    loop {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            moved.starved = true;
            break;
        };
        let head = chain.head_index();
        let buffers: Vec<_> = chain.collect();
        if buffers.iter().any(|d| !d.is_write_only()) {
            moved.dropped += 1;
            queue.add_used(mem, head, 0)?;
            continue;
        }
        let room: usize = buffers.iter().map(|d| d.len() as usize).sum();
        let len = match port.recv(buf) {
            Ok(Some(len)) => len,
            // Nothing to deliver: the chain stays the guest's, for later.
            Ok(None) => {
                queue.go_to_previous_position();
                break;
            }
            Err(e) => {
                queue.go_to_previous_position();
                return Err(e.into());
            }
        };
        if len < NET_HDR_LEN || len > room {
            moved.dropped += 1;
            queue.go_to_previous_position();
            continue;
        }
        // One buffer holds the frame (no mergeable buffers).
        buf[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut written = 0;
        for d in &buffers {
            let n = (d.len() as usize).min(len - written);
            if n == 0 {
                break;
            }
            if mem.write_slice(&buf[written..written + n], d.addr()).is_err() {
                break;
            }
            written += n;
        }
        if written == len {
            moved.frames += 1;
        } else {
            moved.dropped += 1;
        }
        queue.add_used(mem, head, written as u32)?;
    }
    Ok(moved)
}

/// The receive and transmit queues.
pub const QUEUE_SIZES: [u16; 2] = [256, 256];

/// A virtio-net device for a sandbox: its MAC and the offloads it offers.
pub struct NetDevice {
    config: [u8; 6],
    features: u64,
}

impl NetDevice {
    /// `mac`: the guest MAC the sandbox was given (the driver uses it; the
    /// datapath drops frames from any other).
    pub fn new(mac: [u8; 6]) -> NetDevice {
        let bit = |b: u32| 1u64 << b;
        let features = bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_UFO)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_UFO);
        NetDevice { config: mac, features }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn config(&self) -> &[u8] {
        &self.config
    }
}

/// virtio-net on the sandbox's tap, in an MMIO window: the transport, and
/// once the driver activates it, its queues and the data paths, which the
/// device thread runs: a notification sends the transmit queue's frames to
/// the tap and fills receive buffers; a readable tap fills receive buffers.
pub struct NetMmio {
    transport: super::mmio::MmioTransport,
    tap: crate::tap::Tap,
    queues: Option<Vec<Queue>>,
    rx_buf: Vec<u8>,
    pub transmitted: Moved,
    pub received: Moved,
}

/// The receive queue's index, and the transmit queue's.
pub const RX: usize = 0;
pub const TX: usize = 1;

impl NetMmio {
    pub fn new(mac: [u8; 6], tap: crate::tap::Tap) -> Result<NetMmio, crate::tap::TapError> {
        tap.set_vnet_hdr_len(NET_HDR_LEN)?;
        Ok(NetMmio {
            transport: super::mmio::MmioTransport::new(&NetDevice::new(mac)),
            tap,
            queues: None,
            rx_buf: vec![0; MAX_FRAME],
            transmitted: Moved::default(),
            received: Moved::default(),
        })
    }
}

fn add(total: &mut Moved, m: Moved) {
    total.frames += m.frames;
    total.dropped += m.dropped;
}

impl super::MmioDevice for NetMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8], memory: &vm_memory::GuestMemoryMmap<()>) -> bool {
        use super::mmio::MmioEvent;
        match self.transport.write(offset, data) {
            MmioEvent::Activate => {
                let queues = super::activate_queues(&self.transport, memory);
                match (queues, self.tap.set_offloads(guest_offloads(self.transport.driver_features))) {
                    (Some(q), Ok(())) if q.len() == 2 => self.queues = Some(q),
                    // Queues outside guest memory, or offloads the tap refuses.
                    _ => self.transport.fail(),
                }
                false
            }
            MmioEvent::Notify(_) => true,
            MmioEvent::Reset | MmioEvent::QueueStopped => {
                self.queues = None;
                false
            }
            MmioEvent::None => false,
        }
    }

    fn transport(&self) -> &super::mmio::MmioTransport {
        &self.transport
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::{AsFd, AsRawFd};
        Some(self.tap.as_fd().as_raw_fd())
    }

    fn serve(&mut self, wake: super::Wake, memory: &vm_memory::GuestMemoryMmap<()>) -> super::Outcome {
        let Some(queues) = self.queues.as_mut() else { return super::Outcome::default() };
        let mut used = false;
        if wake == super::Wake::Notify {
            match process_tx(&mut queues[TX], memory, &mut self.tap) {
                Ok(m) => {
                    used |= m.frames + m.dropped > 0;
                    add(&mut self.transmitted, m)
                }
                Err(_) => self.transport.fail(),
            }
        }
        let mut starved = false;
        let mut tap_failed = false;
        match process_rx(&mut queues[RX], memory, &mut self.tap, &mut self.rx_buf) {
            Ok(m) => {
                used |= m.frames + m.dropped > 0;
                starved = m.starved;
                add(&mut self.received, m)
            }
            // The tap itself fails (gone, or in error): it is not watched
            // again, the device stops.
            Err(NetError::Port(_)) => tap_failed = true,
            Err(_) => self.transport.fail(),
        }
        if used {
            self.transport.signal_used();
        }
        if tap_failed || self.transport.status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED != 0 {
            // A failed device touches guest memory no more.
            self.transport.fail();
            self.queues = None;
            return super::Outcome { used, backend_wanted: false };
        }
        super::Outcome { used, backend_wanted: !starved }
    }
}

/// What the driver accepted, as the tap's offloads see it: what the
/// *guest* can receive (GUEST_*) is what the tap may hand it unfinished
/// ([`crate::tap::offload_flags`] turns it into TUNSETOFFLOAD flags).
pub fn guest_offloads(negotiated: u64) -> crate::tap::GuestOffloads {
    let has = |b: u32| negotiated & (1u64 << b) != 0;
    crate::tap::GuestOffloads {
        csum: has(VIRTIO_NET_F_GUEST_CSUM),
        tso4: has(VIRTIO_NET_F_GUEST_TSO4),
        tso6: has(VIRTIO_NET_F_GUEST_TSO6),
        tso_ecn: false,
        ufo: has(VIRTIO_NET_F_GUEST_UFO),
    }
}

/// The sandbox tap as the device's frame port, with the virtio 1.x header
/// (call [`crate::tap::Tap::set_vnet_hdr_len`] with [`NET_HDR_LEN`] first).
impl FramePort for crate::tap::Tap {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.write_frame(frame).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.read_frame(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Frames in and out, as the tap would take and give them.
    #[derive(Default)]
    struct Port {
        sent: Vec<Vec<u8>>,
        waiting: std::collections::VecDeque<Vec<u8>>,
    }

    impl FramePort for Port {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.sent.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
            Ok(self.waiting.pop_front().map(|f| {
                buf[..f.len()].copy_from_slice(&f);
                f.len()
            }))
        }
    }

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; NET_HDR_LEN];
        f.extend(std::iter::repeat_n(fill, n));
        f
    }

    #[test]
    fn transmitted_chains_reach_the_tap_whole_and_malformed_ones_do_not() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let f = frame(60, 0xab);
        // A frame split over two buffers, then one with a device-writable
        // buffer, then one pointing outside guest memory.
        mem.write_slice(&f[..20], GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&f[20..], GuestAddress(0x20_0000)).unwrap();
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 20, VRING_DESC_F_NEXT, 1),
                desc(0x20_0000, (f.len() - 20) as u32, 0, 0),
                desc(0x10_0000, 20, VRING_DESC_F_WRITE, 0),
                desc(0x4000_0000, 100, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut port = Port::default();
        let moved = process_tx(&mut q, &mem, &mut port).unwrap();
        assert_eq!(moved, Moved { frames: 1, dropped: 2, ..Moved::default() });
        assert_eq!(port.sent, vec![f]);
        assert_eq!(vq.used().idx().load(), 3, "every chain goes back to the guest");
    }

    #[test]
    fn received_frames_fill_the_guests_buffers_or_wait_for_them() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 1514 + 12, VRING_DESC_F_WRITE, 0), desc(0x20_0000, 30, VRING_DESC_F_WRITE, 0)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut port = Port::default();
        let first = frame(100, 0x11);
        port.waiting.push_back(first.clone());
        port.waiting.push_back(frame(100, 0x22)); // too large for the 30-byte chain
        let mut buf = vec![0u8; MAX_FRAME];
        let moved = process_rx(&mut q, &mem, &mut port, &mut buf).unwrap();
        assert_eq!(moved, Moved { frames: 1, dropped: 1, ..Moved::default() });
        let mut got = vec![0u8; first.len()];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&got[NET_HDR_LEN..], &first[NET_HDR_LEN..]);
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers is 1");
        assert_eq!(vq.used().idx().load(), 1, "the small chain waits for a frame that fits");
        // No frame waiting: the chain stays available.
        let moved = process_rx(&mut q, &mem, &mut port, &mut buf).unwrap();
        assert_eq!(moved, Moved::default());
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn offloads_follow_what_the_guest_accepted() {
        use crate::tap::{offload, offload_flags};
        let bit = |b: u32| 1u64 << b;
        let flags = |n| offload_flags(guest_offloads(n));
        assert_eq!(flags(0), 0, "a driver with no offloads gets finished packets");
        assert_eq!(flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0, "TSO without checksum offload is not possible");
        assert_eq!(flags(bit(VIRTIO_NET_F_GUEST_CSUM)), offload::CSUM);
        let all = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(flags(all), offload::CSUM | offload::TSO4 | offload::TSO6 | offload::UFO);
        assert_eq!(flags(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_CSUM)), 0, "what the host may receive is not the tap's to offload");
    }

    #[test]
    fn the_device_offers_its_mac_and_two_queues() {
        let dev = NetDevice::new([2, 0x5b, 0, 0, 0, 9]);
        assert_eq!(dev.device_type(), 1);
        assert!(dev.features() & (1 << VIRTIO_NET_F_MAC) != 0);
        assert_eq!(dev.config(), &[2, 0x5b, 0, 0, 0, 9]);
        assert_eq!(dev.queue_max_sizes().len(), 2);
    }
}
