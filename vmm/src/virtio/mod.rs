//! Virtio devices for the microVM, over the virtio-mmio transport (version
//! 2, "modern"): the transport's register file and status machine
//! (`mmio`), virtio-net (`net`: features, tap offloads, the transmit and
//! receive paths) and virtio-blk on an image file (`blk`). Pure: the event loop and the data paths
//! over guest memory build on these.

pub mod blk;
pub mod mmio;
pub mod net;

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
