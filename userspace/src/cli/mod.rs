//! The command line's clients of the daemon.

pub mod cni;
pub mod fleet;
pub mod handoff;
pub mod inspect;
pub mod learn;
pub mod vm;
