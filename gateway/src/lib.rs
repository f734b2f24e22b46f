//! The edge gateway as a library: every stage of the pipeline, and `run` that wires them.

pub mod cbor;
pub mod config;
pub mod decode;
pub mod reading;
