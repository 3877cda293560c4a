//! What happened, for people and machines: flow records from every path
//! (datapath events, DNS answers, proxy decisions), the hub that keeps their
//! history and streams them to `inspect`, the filters `inspect` applies,
//! the audit log, and the `/metrics` registry and endpoint.

pub mod audit;
pub mod datapath_metrics;
pub mod filter;
pub mod hub;
pub mod ingest;
pub mod metrics;
pub mod record;
