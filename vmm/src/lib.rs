//! The VMM side of a sandbox: tap devices, the frame pump that stands in for
//! a virtio-net backend, netns guests, the namespace/netlink plumbing they
//! need, and the microVM core (`vm`).

pub mod devices;
pub mod guest;
pub mod linux;
pub mod netlink;
pub mod netns;
pub mod probe;
pub mod pump;
pub mod seccomp;
mod sys;
pub mod tap;
pub mod virtio;
pub mod vm;

pub use guest::{GuestNetwork, NetnsGuest};
pub use netlink::Netlink;
pub use netns::NetNs;
pub use pump::FramePump;
pub use tap::Tap;
