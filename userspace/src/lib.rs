//! sbx-net: host-side network enforcement for AI-agent sandboxes.
//!
//! Pure decisions (policy parsing and compilation, verdicts, addressing) are
//! in [`policy`], [`compile`] and [`sandbox::SandboxSpec`]; everything that
//! touches the kernel is in [`datapath`] and [`sandbox::HostSandbox`].

pub mod api;
pub mod ca;
pub mod compile;
pub mod config;
pub mod conn_limit;
pub mod credential_proxy;
pub mod daemon;
pub mod decide;
pub mod dns;
pub mod dns_proxy;
pub mod datapath;
pub mod flow;
pub mod flow_log;
/// Fuzz entry points: the body of every cargo-fuzz target in `fuzz/`, with
/// the invariants each checks (replayed by `cargo test` from `fuzz/corpus`).
pub mod fuzzing;
pub mod guest_pump;
pub mod host;
pub mod inspect;
pub mod instance_lock;
pub mod metrics;
/// A userspace model of the eBPF classifier, for the frame fuzzer.
pub mod model;
pub mod nft;
pub mod policy;
pub mod peek;
pub mod policy_store;
pub mod proxy;
pub mod sandbox;
pub mod scrub;
pub mod secrets;
pub mod server;
pub mod state;
pub mod tap_pool;
pub mod tcx;

pub use compile::{compile, CompiledPolicy};
pub use datapath::{Datapath, DatapathOptions};
pub use policy::Policy;
