//! The VMM side of a sandbox: tap devices, the frame pump that stands in for
//! a virtio-net backend, netns guests, and the namespace/netlink plumbing
//! they need.

pub mod guest;
pub mod netlink;
pub mod netns;
pub mod pump;
mod sys;
pub mod tap;

pub use guest::{GuestNetwork, NetnsGuest};
pub use netlink::Netlink;
pub use netns::NetNs;
pub use pump::FramePump;
pub use tap::Tap;
