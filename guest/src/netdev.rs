//! smoltcp's view of the virtio-net device: receive and transmit tokens
//! over virtio-drivers' buffers.

use core::cell::RefCell;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_drivers::device::net::{RxBuffer, VirtIONet};
use virtio_drivers::transport::mmio::MmioTransport;

use crate::hal::GuestHal;

pub const QUEUE_SIZE: usize = 64;
/// Each receive buffer: a full Ethernet frame and its virtio header.
const RX_BUFFER_LEN: usize = 2048;

pub type Net = VirtIONet<GuestHal, MmioTransport<'static>, QUEUE_SIZE>;

pub struct NetPhy {
    net: RefCell<Net>,
    pub sent: u64,
    pub received: u64,
}

impl NetPhy {
    pub fn new(transport: MmioTransport<'static>) -> Result<NetPhy, virtio_drivers::Error> {
        Ok(NetPhy { net: RefCell::new(VirtIONet::new(transport, RX_BUFFER_LEN)?), sent: 0, received: 0 })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.net.borrow().mac_address()
    }

    /// A received frame waits in the used ring.
    pub fn can_recv(&self) -> bool {
        self.net.borrow().can_recv()
    }

}

pub struct NetRx<'a> {
    buffer: RxBuffer,
    net: &'a RefCell<Net>,
}

pub struct NetTx<'a> {
    net: &'a RefCell<Net>,
}

impl RxToken for NetRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(self.buffer.packet());
        // A buffer the device cannot take back is lost to the queue only.
        let _ = self.net.borrow_mut().recycle_rx_buffer(self.buffer);
        result
    }
}

impl TxToken for NetTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut net = self.net.borrow_mut();
        let mut tx = net.new_tx_buffer(len);
        let result = f(tx.packet_mut());
        // A frame the device refuses is a lost frame, as on a wire.
        let _ = net.send(tx);
        result
    }
}

impl Device for NetPhy {
    type RxToken<'a> = NetRx<'a>;
    type TxToken<'a> = NetTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(NetRx<'_>, NetTx<'_>)> {
        let buffer = self.net.borrow_mut().receive().ok()?;
        self.received += 1;
        Some((NetRx { buffer, net: &self.net }, NetTx { net: &self.net }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<NetTx<'_>> {
        self.sent += 1;
        Some(NetTx { net: &self.net })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        caps
    }
}
