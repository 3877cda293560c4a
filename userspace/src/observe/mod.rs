//! What happened, for people and machines: flow records from every path
//! (datapath events, DNS answers, proxy decisions), the hub that keeps their
//! history and streams them to `inspect`, and the audit log.

pub mod audit;
pub mod hub;
pub mod ingest;
pub mod record;
