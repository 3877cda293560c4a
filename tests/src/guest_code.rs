//! Hand-assembled 64-bit guest code for the microVM tests: a guest that
//! does exactly what a test (or an attack) needs, a few instructions each.

/// `mov rbx, imm64`.
pub fn mov_rbx(value: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xBB];
    code.extend_from_slice(&value.to_le_bytes());
    code
}

/// `mov rax, imm64`.
pub fn mov_rax(value: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xB8];
    code.extend_from_slice(&value.to_le_bytes());
    code
}

/// `mov [rbx + offset], rax`: a 64-bit register write.
pub fn store_rax(offset: u32) -> Vec<u8> {
    let mut code = vec![0x48, 0x89, 0x83];
    code.extend_from_slice(&offset.to_le_bytes());
    code
}

/// `mov dword [rbx + offset], value`: one 32-bit register write of a driver.
pub fn mmio_write(offset: u32, value: u32) -> Vec<u8> {
    let mut code = vec![0xC7, 0x83];
    code.extend_from_slice(&offset.to_le_bytes());
    code.extend_from_slice(&value.to_le_bytes());
    code
}

/// `body` `times` times (`mov ecx, times; body; dec ecx; jnz body`); the
/// body must not touch ecx and be shorter than 124 bytes.
pub fn repeat(times: u32, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 124);
    let mut code = vec![0xB9];
    code.extend_from_slice(&times.to_le_bytes());
    code.extend_from_slice(body);
    code.extend_from_slice(&[0xFF, 0xC9, 0x75, (-(body.len() as i8) - 4) as u8]);
    code
}

pub const HLT: u8 = 0xF4;

/// A virtio-mmio driver bringing up the device at `base` the way the spec
/// orders it: ACKNOWLEDGE, DRIVER, VERSION_1 accepted, FEATURES_OK, each
/// queue of `rings` (descriptor table, available ring, used ring; 16
/// entries; ready), DRIVER_OK. No notification.
pub fn virtio_start(base: u64, rings: &[(u64, u64, u64)]) -> Vec<u8> {
    use virtio_bindings::virtio_mmio::*;
    let mut code = mov_rbx(base);
    for (offset, value) in [(VIRTIO_MMIO_STATUS, 1), (VIRTIO_MMIO_STATUS, 3), (VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1), (VIRTIO_MMIO_DRIVER_FEATURES, 1), (VIRTIO_MMIO_STATUS, 0xb)] {
        code.extend(mmio_write(offset, value));
    }
    for (queue, (desc_table, avail, used)) in rings.iter().enumerate() {
        for (offset, value) in [
            (VIRTIO_MMIO_QUEUE_SEL, queue as u32),
            (VIRTIO_MMIO_QUEUE_NUM, 16),
            (VIRTIO_MMIO_QUEUE_DESC_LOW, *desc_table as u32),
            (VIRTIO_MMIO_QUEUE_DESC_HIGH, (*desc_table >> 32) as u32),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, *avail as u32),
            (VIRTIO_MMIO_QUEUE_USED_LOW, *used as u32),
            (VIRTIO_MMIO_QUEUE_READY, 1),
        ] {
            code.extend(mmio_write(offset, value));
        }
    }
    code.extend(mmio_write(VIRTIO_MMIO_STATUS, 0xf));
    code
}
