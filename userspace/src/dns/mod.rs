//! The DNS path. Every guest query lands here; [`decide`] holds the pure
//! decisions (which names, which answers, what to learn) and [`server`] the
//! I/O around them (sockets, upstream, learned entries, flow records).

pub mod cache;
pub mod decide;
pub mod learned;
pub mod server;
pub mod stats;
pub mod upstream;
