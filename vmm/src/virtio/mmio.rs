//! The virtio-mmio transport (virtio 1.2 §4.2.2): the register file a
//! driver reads and writes, feature negotiation, queue set-up and the
//! device status machine. A driver that breaks the protocol (features the
//! device did not offer, queue set-up after DRIVER_OK, a queue too large)
//! gets the device marked FAILED (and NEEDS_RESET set); nothing it writes
//! reaches the device's data paths. Pure: no KVM, no guest memory.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;

use super::VirtioDevice;

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The register set of virtio 1.x.
pub const VERSION: u32 = 2;
/// A vendor id of our own ("SBXN").
pub const VENDOR: u32 = 0x5342_584e;

/// One queue as the driver configured it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// What a register write asks of the monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioEvent {
    /// Nothing beyond the register.
    None,
    /// The driver notified queue N (it has buffers for the device).
    Notify(u16),
    /// The driver set DRIVER_OK: the device may start its data paths with
    /// the negotiated features and the queues.
    Activate,
    /// The driver wrote 0 to status: the device stops and forgets everything.
    Reset,
    /// The driver took a queue of the running device back (QueueReady 0):
    /// the device stops using its queues.
    QueueStopped,
}

/// The transport's state for one device.
#[derive(Debug)]
pub struct MmioTransport {
    device_type: u32,
    device_features: u64,
    config: Vec<u8>,
    features_select: u32,
    driver_features_select: u32,
    /// What the driver acknowledged (only offered bits are kept).
    pub driver_features: u64,
    queue_select: u32,
    pub queues: Vec<QueueConfig>,
    pub status: u32,
    pub interrupt_status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: &impl VirtioDevice) -> MmioTransport {
        MmioTransport {
            device_type: device.device_type(),
            device_features: device.features() | (1 << VIRTIO_F_VERSION_1),
            config: device.config().to_vec(),
            features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues: device.queue_max_sizes().iter().map(|&max_size| QueueConfig { max_size, ..Default::default() }).collect(),
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// Whether the driver finished set-up and the device runs.
    pub fn activated(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    /// Marks the device failed (the driver must reset it).
    pub fn fail(&mut self) {
        self.status |= VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET;
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue set-up is allowed between FEATURES_OK and DRIVER_OK only.
    fn configuring(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    /// A read of `data.len()` bytes at `offset` of the device's window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let start = (offset - u64::from(VIRTIO_MMIO_CONFIG)) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        // Registers are 32-bit and read whole.
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let queue = self.queues.get(self.queue_select as usize);
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.features_select {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write of `data` at `offset`; what it asks of the monitor.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // The config space is the device's (a MAC is not the driver's to set).
            return MmioEvent::None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return MmioEvent::None };
        let value = u32::from_le_bytes(bytes);
        let set_half = |full: &mut u64, high: bool| {
            if high {
                *full = (*full & 0xffff_ffff) | (u64::from(value) << 32);
            } else {
                *full = (*full & !0xffff_ffff) | u64::from(value);
            }
        };
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 || self.status & VIRTIO_CONFIG_S_DRIVER == 0 {
                    self.fail();
                    return MmioEvent::None;
                }
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return MmioEvent::None,
                };
                let offered = (self.device_features >> shift) as u32;
                if value & !offered != 0 {
                    // A feature the device never offered: the driver is broken.
                    self.fail();
                    return MmioEvent::None;
                }
                self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                let ok = self.configuring();
                match self.selected() {
                    Some(q) if ok && value != 0 && value <= u32::from(q.max_size) && value.is_power_of_two() => q.size = value as u16,
                    _ => self.fail(),
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                let ok = self.configuring();
                let running = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
                match self.selected() {
                    Some(q) if ok && q.size != 0 => q.ready = value == 1,
                    // A driver taking a queue back from a running device
                    // (virtio-drivers does on drop, and reads it back until
                    // it is 0): the device stops using its queues.
                    Some(q) if running && value == 0 => {
                        q.ready = false;
                        return MmioEvent::QueueStopped;
                    }
                    _ => self.fail(),
                }
            }
            reg @ (VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH) => {
                let ok = self.configuring();
                match self.selected() {
                    Some(q) if ok && !q.ready => {
                        let (field, high) = match reg {
                            VIRTIO_MMIO_QUEUE_DESC_LOW => (&mut q.desc_table, false),
                            VIRTIO_MMIO_QUEUE_DESC_HIGH => (&mut q.desc_table, true),
                            VIRTIO_MMIO_QUEUE_AVAIL_LOW => (&mut q.avail_ring, false),
                            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (&mut q.avail_ring, true),
                            VIRTIO_MMIO_QUEUE_USED_LOW => (&mut q.used_ring, false),
                            _ => (&mut q.used_ring, true),
                        };
                        set_half(field, high);
                    }
                    _ => self.fail(),
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY if self.activated() && (value as usize) < self.queues.len() => return MmioEvent::Notify(value as u16),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => return self.set_status(value),
            _ => {}
        }
        MmioEvent::None
    }

    /// The status machine: 0 resets; bits are only ever added, in order
    /// (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK); FEATURES_OK needs
    /// VERSION_1 (no legacy devices here); DRIVER_OK needs every queue
    /// either unused or ready.
    fn set_status(&mut self, value: u32) -> MmioEvent {
        if value == 0 {
            let queues = self.queues.iter().map(|q| QueueConfig { max_size: q.max_size, ..Default::default() }).collect();
            *self = MmioTransport { queues, config: std::mem::take(&mut self.config), ..*self };
            self.status = 0;
            self.driver_features = 0;
            self.interrupt_status = 0;
            self.features_select = 0;
            self.driver_features_select = 0;
            self.queue_select = 0;
            return MmioEvent::Reset;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            // Clearing a bit without a reset.
            self.fail();
            return MmioEvent::None;
        }
        // Several bits may arrive in one write (virtio-drivers writes
        // ACKNOWLEDGE | DRIVER at once): each is taken in order, as if
        // written alone.
        const STEPS: [u32; 5] = [VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED];
        if added & !STEPS.iter().fold(0, |a, b| a | b) != 0 {
            self.fail();
            return MmioEvent::None;
        }
        let mut event = MmioEvent::None;
        for step in STEPS.into_iter().filter(|s| added & s != 0) {
            let in_order = match step {
                VIRTIO_CONFIG_S_ACKNOWLEDGE => self.status == 0,
                VIRTIO_CONFIG_S_DRIVER => self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE,
                VIRTIO_CONFIG_S_FEATURES_OK => self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0,
                VIRTIO_CONFIG_S_DRIVER_OK => {
                    self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
                        && self.queues.iter().all(|q| q.ready || q.size == 0)
                        && self.queues.iter().any(|q| q.ready)
                }
                _ => true,
            };
            if !in_order {
                // FEATURES_OK refused stays unset (the driver reads it back
                // and gives up, as the spec says); anything else fails the
                // device.
                if step != VIRTIO_CONFIG_S_FEATURES_OK {
                    self.fail();
                }
                return MmioEvent::None;
            }
            self.status |= step;
            if step == VIRTIO_CONFIG_S_DRIVER_OK {
                event = MmioEvent::Activate;
            }
        }
        event
    }

    /// Marks a used-buffer notification pending (the monitor then raises
    /// the device's interrupt line).
    pub fn signal_used(&mut self) {
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev;
    impl VirtioDevice for Dev {
        fn device_type(&self) -> u32 {
            1
        }
        fn features(&self) -> u64 {
            (1 << 5) | (1 << 1)
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn config(&self) -> &[u8] {
            &[2, 0x5b, 0, 0, 0, 7]
        }
    }

    fn read(t: &MmioTransport, offset: u32) -> u32 {
        let mut d = [0u8; 4];
        t.read(u64::from(offset), &mut d);
        u32::from_le_bytes(d)
    }

    fn write(t: &mut MmioTransport, offset: u32, value: u32) -> MmioEvent {
        t.write(u64::from(offset), &value.to_le_bytes())
    }

    /// A well-behaved driver up to FEATURES_OK with `features`.
    fn negotiated(features: u64) -> MmioTransport {
        let mut t = MmioTransport::new(&Dev);
        write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        for (sel, half) in [(0, features as u32), (1, (features >> 32) as u32)] {
            write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, half);
        }
        write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
        t
    }

    fn set_up_queue(t: &mut MmioTransport, index: u32, size: u32) {
        write(t, VIRTIO_MMIO_QUEUE_SEL, index);
        write(t, VIRTIO_MMIO_QUEUE_NUM, size);
        for (reg, value) in [(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10_0000), (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x10_1000), (VIRTIO_MMIO_QUEUE_USED_LOW, 0x10_2000)] {
            write(t, reg, value + index * 0x10_000);
        }
        write(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 1);
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn a_driver_identifies_the_device_and_reads_its_features_and_config() {
        let t = MmioTransport::new(&Dev);
        assert_eq!((read(&t, VIRTIO_MMIO_MAGIC_VALUE), read(&t, VIRTIO_MMIO_VERSION), read(&t, VIRTIO_MMIO_DEVICE_ID)), (MAGIC, 2, 1));
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_FEATURES), (1 << 5) | (1 << 1));
        let mut t = t;
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1 (bit 32) is always offered");
        let mut mac = [0u8; 6];
        t.read(u64::from(VIRTIO_MMIO_CONFIG), &mut mac);
        assert_eq!(mac, [2, 0x5b, 0, 0, 0, 7]);
        let mut past = [0xaau8; 4];
        t.read(u64::from(VIRTIO_MMIO_CONFIG) + 4, &mut past);
        assert_eq!(past, [0, 7, 0, 0], "past the config space reads zeros");
        assert_eq!(t.write(u64::from(VIRTIO_MMIO_CONFIG), &[9; 6]), MmioEvent::None);
        t.read(u64::from(VIRTIO_MMIO_CONFIG), &mut mac);
        assert_eq!(mac[0], 2, "the driver cannot rewrite the MAC");
    }

    #[test]
    fn the_full_handshake_activates_and_notifies_and_a_reset_forgets_everything() {
        let mut t = negotiated((1 << 32) | (1 << 5));
        assert_eq!(t.driver_features, (1 << 32) | (1 << 5));
        set_up_queue(&mut t, 0, 256);
        set_up_queue(&mut t, 1, 128);
        assert_eq!(t.queues[1], QueueConfig { max_size: 256, size: 128, ready: true, desc_table: 0x11_0000, avail_ring: 0x11_1000, used_ring: (1 << 32) | 0x11_2000 });
        assert_eq!(write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0), MmioEvent::None, "no notification before DRIVER_OK");
        assert_eq!(write(&mut t, VIRTIO_MMIO_STATUS, 0xf), MmioEvent::Activate);
        assert!(t.activated());
        assert_eq!(write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1), MmioEvent::Notify(1));
        assert_eq!(write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7), MmioEvent::None, "no such queue");
        t.signal_used();
        assert_eq!(read(&t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        write(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(write(&mut t, VIRTIO_MMIO_STATUS, 0), MmioEvent::Reset);
        assert_eq!((t.status, t.driver_features), (0, 0));
        assert_eq!(t.queues[1], QueueConfig { max_size: 256, ..Default::default() });
    }

    #[test]
    fn a_driver_that_breaks_the_protocol_fails_the_device() {
        // A feature the device never offered.
        let mut t = MmioTransport::new(&Dev);
        write(&mut t, VIRTIO_MMIO_STATUS, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, 3);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 7);
        assert!(t.status & VIRTIO_CONFIG_S_FAILED != 0);
        // Without VERSION_1, FEATURES_OK does not stick (legacy is not served).
        let t = negotiated(1 << 5);
        assert_eq!(t.status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // Queue set-up after DRIVER_OK, a queue larger than offered or not a
        // power of two, DRIVER_OK with no queue, skipping a status step.
        for bad in [0u8, 1, 2, 3, 4] {
            let mut t = negotiated(1 << 32);
            match bad {
                0 => {
                    set_up_queue(&mut t, 0, 256);
                    write(&mut t, VIRTIO_MMIO_STATUS, 0xf);
                    write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x2000);
                }
                1 => {
                    write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 512);
                }
                2 => {
                    write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 100);
                }
                3 => {
                    assert_eq!(write(&mut t, VIRTIO_MMIO_STATUS, 0xf), MmioEvent::None);
                }
                _ => {
                    let mut fresh = MmioTransport::new(&Dev);
                    write(&mut fresh, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER_OK);
                    t = fresh;
                }
            }
            assert!(t.status & VIRTIO_CONFIG_S_FAILED != 0 && !t.activated(), "case {bad}: {:#x}", t.status);
            assert!(t.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0, "case {bad}");
        }
    }
}
