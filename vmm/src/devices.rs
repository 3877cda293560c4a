//! The device thread: one epoll loop, as Firecracker's, that serves every
//! virtio device of a VM. A queue notification arrives on the device's
//! ioeventfd (KVM signals it on the driver's write to QueueNotify, without
//! a trip through the vCPU thread); input at a backend (the tap) arrives
//! on the backend's fd. After a pass that gave the driver used buffers,
//! the device's interrupt is raised: its irqfd when the VM has an irqchip
//! (a Linux guest), and always the VM's `news` eventfd, which the test
//! guest's idle port waits on.
//!
//! A tap is watched only while its device has receive buffers: a frame
//! that cannot be delivered stays in the tap until the driver gives
//! buffers back (a notification), rather than spinning this thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::{MmioDevice, Wake};

/// A device as both threads hold it.
pub type SharedDevice = Arc<Mutex<Box<dyn MmioDevice>>>;

/// What the loop needs of one device.
pub struct DeviceSlot {
    pub device: SharedDevice,
    /// Signalled by KVM on a queue notification.
    pub notify: EventFd,
    /// Its interrupt line (registered as an irqfd when the VM has an irqchip).
    pub irq: EventFd,
}

/// The epoll token of a device's notification, of its backend, of stop.
fn notify_token(i: usize) -> u64 {
    (i as u64) << 1
}
fn backend_token(i: usize) -> u64 {
    ((i as u64) << 1) | 1
}
const STOP_TOKEN: u64 = u64::MAX;

/// Which device and event a token names (pure).
pub fn decode_token(token: u64) -> Option<(usize, Wake)> {
    if token == STOP_TOKEN {
        return None;
    }
    Some(((token >> 1) as usize, if token & 1 == 0 { Wake::Notify } else { Wake::Backend }))
}

/// The running loop; stopped and joined on drop.
pub struct DeviceLoop {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DeviceLoop {
    /// Starts the thread over `slots`.
    pub fn start(slots: Vec<DeviceSlot>, memory: GuestMemoryMmap<()>, news: Arc<EventFd>) -> std::io::Result<DeviceLoop> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))?;
        let mut backends: Vec<Option<RawFd>> = Vec::with_capacity(slots.len());
        for (i, slot) in slots.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, slot.notify.as_raw_fd(), EpollEvent::new(EventSet::IN, notify_token(i)))?;
            let backend = slot.device.lock().unwrap_or_else(|p| p.into_inner()).backend_fd();
            if let Some(fd) = backend {
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, backend_token(i)))?;
            }
            backends.push(backend);
        }
        let thread_stop = stop.try_clone()?;
        let (started_tx, started) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("sbx-vmm-devices".into()).spawn(move || {
            let _ = started_tx.send(());
            serve(epoll, slots, backends, memory, news, thread_stop)
        })?;
        // The thread has run its start-up system calls (rseq, its name, its
        // signal stack) before a seccomp filter for every thread comes.
        let _ = started.recv();
        Ok(DeviceLoop { stop, thread: Some(thread) })
    }
}

impl Drop for DeviceLoop {
    fn drop(&mut self) {
        // The loop reads it and returns; a failed write leaves a thread
        // that ends with the process.
        if self.stop.write(1).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn serve(epoll: Epoll, slots: Vec<DeviceSlot>, backends: Vec<Option<RawFd>>, memory: GuestMemoryMmap<()>, news: Arc<EventFd>, _stop: EventFd) {
    let mut events = vec![EpollEvent::default(); 32];
    // Whether each backend is in the interest set (it leaves while its
    // device has no receive buffers).
    let mut watching: Vec<bool> = backends.iter().map(Option::is_some).collect();
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for event in &events[..n] {
            let Some((i, wake)) = decode_token(event.data()) else { return };
            let Some(slot) = slots.get(i) else { continue };
            if wake == Wake::Notify {
                // Consume the count: one pass serves every notification so far.
                let _ = slot.notify.read();
            }
            let outcome = slot.device.lock().unwrap_or_else(|p| p.into_inner()).serve(wake, &memory);
            if outcome.used {
                let _ = slot.irq.write(1);
                let _ = news.write(1);
            }
            if let Some(fd) = backends[i] {
                if outcome.backend_wanted != watching[i] {
                    let op = if outcome.backend_wanted { ControlOperation::Add } else { ControlOperation::Delete };
                    if epoll.ctl(op, fd, EpollEvent::new(EventSet::IN, backend_token(i))).is_ok() {
                        watching[i] = outcome.backend_wanted;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_each_device_and_event_and_stop_is_apart() {
        for i in [0usize, 1, 7, 15] {
            assert_eq!(decode_token(notify_token(i)), Some((i, Wake::Notify)));
            assert_eq!(decode_token(backend_token(i)), Some((i, Wake::Backend)));
        }
        assert_eq!(decode_token(STOP_TOKEN), None);
    }
}
