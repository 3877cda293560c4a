//! sbx-net: host-side network enforcement for AI-agent sandboxes.
//!
//! One folder per path of the data, in layers: a module may use the
//! modules of its own layer and of the layers before it, never one after
//! (`cargo xtask lint` checks it; the order is in `LAYERS` below and in the
//! README). Pure decisions (policy parsing and compilation, verdicts, DNS
//! answer plans, request checks) sit beside the I/O that applies them and
//! are unit-tested without privileges.

/// Clocks, files, sockets, connection limits: no knowledge of policies.
pub mod util;
/// Policies: the model, the compiler, explanations, the policy directory. Pure.
pub mod policy;
/// Secrets, credential bindings, response scrubbing, the per-sandbox CA.
pub mod credentials;
/// The packet path: the eBPF maps and their keys, TCX attachment, flow
/// events, nftables.
pub mod datapath;
/// A sandbox on the host: addressing, host set-up, taps, guest pumps, the
/// route table.
pub mod sandbox;
/// Flow records, their hub and filters, the audit log, datapath-event ingest.
pub mod observe;
/// The DNS path: decisions on queries and answers, the learned store, the
/// upstream client, the server.
pub mod dns;
/// The HTTP(S) path: first-bytes peek, plan, splice, TLS termination and
/// credential injection.
pub mod proxy;
/// Fleets: policies from etcd, validated, merged across scopes, watched.
pub mod fleet;
/// The daemon: control API, server, configuration, state, metrics.
pub mod control;
/// The command line's clients.
pub mod cli;
/// Fuzz entry points: the body of every cargo-fuzz target in `fuzz/`, with
/// the invariants each checks (replayed by `cargo test` from `fuzz/corpus`),
/// and a userspace model of the classifier for the frame fuzzer.
pub mod fuzzing;

/// The layers, lowest first: `cargo xtask lint` fails when a module uses
/// one later in this list than its own.
pub const LAYERS: &[&str] = &["util", "policy", "credentials", "datapath", "sandbox", "observe", "dns", "proxy", "fleet", "control", "cli", "fuzzing"];

pub use datapath::{Datapath, DatapathOptions};
pub use policy::compile::{compile, CompiledPolicy};
pub use policy::Policy;
