//! The edge gateway as a library: every stage of the pipeline, and `run` that wires them.

pub mod forwarder;
pub mod reading;
pub mod store;
