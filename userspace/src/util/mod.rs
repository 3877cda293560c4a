//! Helpers every layer may use: clocks, files, sockets, connection limits
//! and threads, descriptor passing.
//! Nothing here knows about policies or sandboxes.

pub mod clock;
pub mod conn_limit;
pub mod conn_threads;
pub mod detached;
pub mod fd_pass;
pub mod fs;
pub mod net;
pub mod pidfd;
pub mod task;
pub mod udp_batch;
