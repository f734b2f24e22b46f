//! The edge gateway as a library: every stage of the pipeline, and [`run`] that wires
//! them (see `pipeline.rs` for the data flow).

pub mod backoff;
pub mod broker;
pub mod config;
pub mod counters;
pub mod decode;
pub mod device_events;
pub mod devices;
pub mod downlink;
pub mod events;
pub mod forwarder;
pub mod hashing;
pub mod http;
pub mod ingest;
pub mod memory;
pub mod pipeline;
pub mod reading;
pub mod rules;
mod stage_threads;
pub mod store;
pub mod tls;
pub mod webhook;

pub use pipeline::run;
