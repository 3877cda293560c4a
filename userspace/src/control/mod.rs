//! The daemon: the control API and its socket server, the configuration,
//! the state kept across restarts, and the daemon's own operations.

pub mod api;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod instance_lock;
pub mod metrics;
pub mod server;
pub mod state;
pub mod systemd;
