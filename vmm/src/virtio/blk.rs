//! virtio-blk backed by an image file, read-only or read-write: what the
//! policy's `[filesystem]` mounts become (nothing but the listed images is
//! visible to the guest, and a read-only one refuses writes at the device).
//! Requests are parsed and bounded here; a malformed chain never reaches
//! the file.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::VirtioDevice;

pub const SECTOR: u64 = 512;
/// The request header: type, reserved, sector.
const HEADER_LEN: u32 = 16;
/// The largest transfer one request may ask for (as Firecracker bounds it).
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
pub const QUEUE_SIZES: [u16; 1] = [256];

/// An image file as a disk.
pub struct BlockDevice {
    file: File,
    read_only: bool,
    /// Whole sectors (a tail shorter than a sector is not addressable).
    sectors: u64,
    /// The device id the guest reads with GET_ID (the image's name).
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; 8],
}

impl BlockDevice {
    pub fn new(file: File, read_only: bool, id: &str) -> std::io::Result<BlockDevice> {
        let sectors = file.metadata()?.len() / SECTOR;
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(BlockDevice { file, read_only, sectors, id: id_bytes, config: sectors.to_le_bytes() })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }
    fn features(&self) -> u64 {
        let ro = if self.read_only { 1u64 << VIRTIO_BLK_F_RO } else { 0 };
        ro | (1u64 << VIRTIO_BLK_F_FLUSH)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn config(&self) -> &[u8] {
        &self.config
    }
}

/// What one pass over the queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub ok: u64,
    /// Answered with an error status (I/O error, refused write, out of
    /// range, unsupported type).
    pub failed: u64,
    /// Chains without a status byte to answer in: returned unused.
    pub dropped: u64,
}

/// One request's buffers, as the chain gave them.
struct Request {
    kind: u32,
    sector: u64,
    /// (address, length, device-writable)
    data: Vec<(GuestAddress, u32, bool)>,
    status: GuestAddress,
}

/// Serves every request the guest queued.
pub fn process_requests<M: GuestMemory>(queue: &mut Queue, mem: &M, disk: &BlockDevice) -> Result<Served, virtio_queue::Error> {
    let mut served = Served::default();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let descs: Vec<_> = chain.collect();
        let Some(request) = parse(mem, &descs) else {
            // Nowhere to put a status: the chain goes back as it was.
            served.dropped += 1;
            queue.add_used(mem, head, 0)?;
            continue;
        };
        let (status, written) = execute(mem, disk, &request);
        let _ = mem.write_obj(status as u8, request.status);
        if status == VIRTIO_BLK_S_OK {
            served.ok += 1;
        } else {
            served.failed += 1;
        }
        queue.add_used(mem, head, written + 1)?;
    }
    Ok(served)
}

/// The request in `descs`: a readable 16-byte header first, a writable
/// status byte last, data in between. None when there is no status byte.
fn parse<M: GuestMemory>(mem: &M, descs: &[virtio_queue::desc::split::Descriptor]) -> Option<Request> {
    let (last, rest) = descs.split_last()?;
    if !last.is_write_only() || last.len() < 1 {
        return None;
    }
    let status = last.addr().checked_add(u64::from(last.len()) - 1)?;
    let bad = |kind| Some(Request { kind, sector: 0, data: Vec::new(), status });
    let Some((header, data)) = rest.split_first() else { return bad(u32::MAX) };
    if header.is_write_only() || header.len() < HEADER_LEN {
        return bad(u32::MAX);
    }
    let kind: u32 = mem.read_obj(header.addr()).ok()?;
    let sector: u64 = mem.read_obj(header.addr().checked_add(8)?).ok()?;
    Some(Request { kind: u32::from_le(kind), sector: u64::from_le(sector), data: data.iter().map(|d| (d.addr(), d.len(), d.is_write_only())).collect(), status })
}

/// Runs a request; its status and the bytes written into the guest.
fn execute<M: GuestMemory>(mem: &M, disk: &BlockDevice, r: &Request) -> (u32, u32) {
    let total: u64 = r.data.iter().map(|(_, len, _)| u64::from(*len)).sum();
    match r.kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let reading = r.kind == VIRTIO_BLK_T_IN;
            // Every data buffer must point the way the request goes.
            if r.data.iter().any(|(_, _, writable)| *writable != reading) || total > MAX_REQUEST_BYTES || !total.is_multiple_of(SECTOR) {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let in_range = r.sector.checked_mul(SECTOR).and_then(|start| start.checked_add(total)).is_some_and(|end| end <= disk.sectors * SECTOR);
            if !in_range || (!reading && disk.read_only) {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let mut offset = r.sector * SECTOR;
            let mut written = 0u32;
            for (addr, len, _) in &r.data {
                let mut buf = vec![0u8; *len as usize];
                let ok = if reading {
                    disk.file.read_exact_at(&mut buf, offset).is_ok() && mem.write_slice(&buf, *addr).is_ok()
                } else {
                    mem.read_slice(&mut buf, *addr).is_ok() && disk.file.write_all_at(&buf, offset).is_ok()
                };
                if !ok {
                    return (VIRTIO_BLK_S_IOERR, written);
                }
                offset += u64::from(*len);
                if reading {
                    written += len;
                }
            }
            (VIRTIO_BLK_S_OK, written)
        }
        VIRTIO_BLK_T_FLUSH => {
            if disk.read_only || disk.file.sync_data().is_ok() {
                (VIRTIO_BLK_S_OK, 0)
            } else {
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
        VIRTIO_BLK_T_GET_ID => match r.data.first() {
            Some((addr, len, true)) if *len >= VIRTIO_BLK_ID_BYTES => match mem.write_slice(&disk.id, *addr) {
                Ok(()) => (VIRTIO_BLK_S_OK, VIRTIO_BLK_ID_BYTES),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            _ => (VIRTIO_BLK_S_IOERR, 0),
        },
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// virtio-blk on an image, in an MMIO window: the transport and, once the
/// driver activates it, its request queue, served by the device thread.
pub struct BlockMmio {
    transport: super::mmio::MmioTransport,
    disk: BlockDevice,
    queue: Option<Queue>,
    pub served: Served,
}

impl BlockMmio {
    pub fn new(disk: BlockDevice) -> BlockMmio {
        BlockMmio { transport: super::mmio::MmioTransport::new(&disk), disk, queue: None, served: Served::default() }
    }
}

impl super::MmioDevice for BlockMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8], memory: &vm_memory::GuestMemoryMmap<()>) -> bool {
        use super::mmio::MmioEvent;
        match self.transport.write(offset, data) {
            MmioEvent::Activate => {
                match super::activate_queues(&self.transport, memory) {
                    Some(mut q) if q.len() == 1 => self.queue = q.pop(),
                    _ => self.transport.fail(),
                }
                false
            }
            MmioEvent::Notify(_) => true,
            MmioEvent::Reset | MmioEvent::QueueStopped => {
                self.queue = None;
                false
            }
            MmioEvent::None => false,
        }
    }

    fn transport(&self) -> &super::mmio::MmioTransport {
        &self.transport
    }

    fn serve(&mut self, _wake: super::Wake, memory: &vm_memory::GuestMemoryMmap<()>) -> super::Outcome {
        let Some(queue) = self.queue.as_mut() else { return super::Outcome::default() };
        match process_requests(queue, memory, &self.disk) {
            Ok(s) => {
                self.served.ok += s.ok;
                self.served.failed += s.failed;
                self.served.dropped += s.dropped;
                let used = s.ok + s.failed + s.dropped > 0;
                if used {
                    self.transport.signal_used();
                }
                super::Outcome { used, backend_wanted: false }
            }
            Err(_) => {
                // A failed device touches guest memory no more.
                self.transport.fail();
                self.queue = None;
                super::Outcome::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x12_0000;

    fn image(sectors: u64, fill: u8) -> File {
        let path = std::env::temp_dir().join(format!("sbx-blk-{}-{fill}-{sectors}", std::process::id()));
        std::fs::write(&path, vec![fill; (sectors * SECTOR) as usize]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        if next.is_some() {
            flags |= virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        }
        RawDescriptor::from(Descriptor::new(addr, len, flags, next.unwrap_or(0)))
    }

    /// One request: header, one data buffer of `len` (writable for reads),
    /// status; served; its status and the used length.
    fn request(mem: &GuestMemoryMmap<()>, disk: &BlockDevice, kind: u32, sector: u64, len: u32, data_writable: bool) -> (u8, u32) {
        mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(&[desc(HDR, 16, false, Some(1)), desc(DATA, len, data_writable, Some(2)), desc(STATUS, 1, true, None)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        process_requests(&mut q, mem, disk).unwrap();
        let used = vq.used().ring().ref_at(0).unwrap().load();
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
    }

    #[test]
    fn reads_and_writes_reach_the_image_within_its_bounds() {
        let mem = memory();
        let disk = BlockDevice::new(image(8, 0x5a), false, "data.img").unwrap();
        assert_eq!(disk.config(), &8u64.to_le_bytes(), "capacity in sectors");
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_IN, 1, 1024, true), (0, 1025));
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().all(|b| *b == 0x5a));
        mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_OUT, 7, 512, false).0, 0, "the last sector");
        let mut back = [0u8; 512];
        disk.file.read_exact_at(&mut back, 7 * SECTOR).unwrap();
        assert_eq!(back, [0x77; 512]);
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_IN, 7, 1024, true).0, VIRTIO_BLK_S_IOERR as u8, "past the end");
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_IN, u64::MAX / 256, 512, true).0, VIRTIO_BLK_S_IOERR as u8, "a sector whose offset overflows");
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_IN, 0, 100, true).0, VIRTIO_BLK_S_IOERR as u8, "not whole sectors");
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_IN, 0, 512, false).0, VIRTIO_BLK_S_IOERR as u8, "a read into a device-readable buffer");
        assert_eq!(request(&mem, &disk, 99, 0, 512, true).0, VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_GET_ID, 0, 20, true), (0, 21));
        let mut id = [0u8; 8];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"data.img");
    }

    #[test]
    fn a_read_only_image_refuses_writes_at_the_device() {
        let mem = memory();
        let disk = BlockDevice::new(image(4, 0x11), true, "ro.img").unwrap();
        assert!(disk.features() & (1 << VIRTIO_BLK_F_RO) != 0, "the guest is told");
        mem.write_slice(&[0x99; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_OUT, 0, 512, false).0, VIRTIO_BLK_S_IOERR as u8);
        let mut back = [0u8; 512];
        disk.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [0x11; 512], "the image is unchanged");
        assert_eq!(request(&mem, &disk, VIRTIO_BLK_T_IN, 0, 512, true).0, 0, "reads still work");
    }

    #[test]
    fn a_chain_without_a_status_byte_is_returned_unused() {
        let mem = memory();
        let disk = BlockDevice::new(image(4, 0), false, "x").unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(HDR, 16, false, None)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(process_requests(&mut q, &mem, &disk).unwrap(), Served { ok: 0, failed: 0, dropped: 1 });
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }
}
