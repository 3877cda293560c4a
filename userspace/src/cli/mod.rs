//! The command line's clients of the daemon.

pub mod cni;
pub mod fleet;
pub mod handoff;
pub mod inspect;
pub mod learn;
pub mod vm;

/// How a command that prints data prints it (`-o`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// For programs: one JSON document.
    Json,
}
