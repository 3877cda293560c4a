//! virtio-net: the features the device offers and what the negotiated ones
//! turn on at the sandbox tap (TUNSETOFFLOAD), so that the guest's
//! checksum and segmentation offloads and the tap's agree. Pure.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC,
};

use super::VirtioDevice;

/// TUNSETOFFLOAD flags (linux/if_tun.h).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;

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

/// The tap offloads for what the driver accepted: what the *guest* can
/// receive (GUEST_*) is what the tap may hand it unfinished. Segmentation
/// offloads need checksum offload (the kernel refuses TSO without CSUM).
pub fn tap_offloads(negotiated: u64) -> u32 {
    let has = |b: u32| negotiated & (1u64 << b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= TUN_F_UFO;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_what_the_guest_accepted() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(tap_offloads(0), 0, "a driver with no offloads gets finished packets");
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0, "TSO without checksum offload is not possible");
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
        let all = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(tap_offloads(all), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO);
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_CSUM)), 0, "what the host may receive is not the tap's to offload");
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
