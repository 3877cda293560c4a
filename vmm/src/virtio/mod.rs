//! Virtio devices for the microVM, over the virtio-mmio transport (version
//! 2, "modern"): the transport's register file and status machine
//! (`mmio`), virtio-net (`net`: features, tap offloads, the transmit and
//! receive paths) and virtio-blk on an image file (`blk`). Pure: the event loop and the data paths
//! over guest memory build on these.

pub mod blk;
pub mod mmio;
pub mod net;

/// Why the device thread calls a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The driver notified a queue (its ioeventfd).
    Notify,
    /// Input waits at the backend (the tap is readable).
    Backend,
}

/// What a pass over a device's queues did, for the device thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The driver has used buffers to look at: raise the interrupt.
    pub used: bool,
    /// The device can take backend input now (it has receive buffers).
    pub backend_wanted: bool,
}

/// A device in an MMIO window, as the vCPU's exits and the device thread
/// reach it.
pub trait MmioDevice: Send {
    /// A read at `offset` in the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write at `offset` (activation and reset are handled here);
    /// whether it notified a queue, for the device thread to serve.
    fn write(&mut self, offset: u64, data: &[u8], memory: &vm_memory::GuestMemoryMmap<()>) -> bool;
    /// The transport's state (for `status` and tests).
    fn transport(&self) -> &mmio::MmioTransport;
    /// The backend's fd the device thread watches for input, if any.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Serves the queues (device thread).
    fn serve(&mut self, _wake: Wake, _memory: &vm_memory::GuestMemoryMmap<()>) -> Outcome {
        Outcome::default()
    }
}

/// A transport with no data path: a driver can find and set it up, nothing
/// moves (a device under test, or one whose backend is not there).
impl MmioDevice for mmio::MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        mmio::MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8], _memory: &vm_memory::GuestMemoryMmap<()>) -> bool {
        matches!(mmio::MmioTransport::write(self, offset, data), mmio::MmioEvent::Notify(_))
    }
    fn transport(&self) -> &mmio::MmioTransport {
        self
    }
}

/// The queues of an activated device, as virtio-queue serves them: each
/// configured one checked against guest memory.
pub fn activate_queues(transport: &mmio::MmioTransport, memory: &vm_memory::GuestMemoryMmap<()>) -> Option<Vec<virtio_queue::Queue>> {
    use virtio_queue::QueueT;
    transport
        .queues
        .iter()
        .map(|q| {
            let mut queue = virtio_queue::Queue::new(q.max_size).ok()?;
            queue.set_size(q.size);
            queue.set_desc_table_address(Some(q.desc_table as u32), Some((q.desc_table >> 32) as u32));
            queue.set_avail_ring_address(Some(q.avail_ring as u32), Some((q.avail_ring >> 32) as u32));
            queue.set_used_ring_address(Some(q.used_ring as u32), Some((q.used_ring >> 32) as u32));
            queue.set_ready(q.ready);
            (!q.ready || queue.is_valid(memory)).then_some(queue)
        })
        .collect()
}

/// What a device offers its driver through the transport.
pub trait VirtioDevice {
    /// The virtio device type (1 = network, 2 = block).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// The largest size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Its configuration space (read by the driver at offset 0x100 on).
    fn config(&self) -> &[u8];
}
