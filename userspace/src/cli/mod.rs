//! The command line's clients of the daemon.

pub mod inspect;
pub mod vm;
