//! The edge gateway as a library: every stage of the pipeline, and `run` that wires them.

pub mod events;
pub mod reading;
pub mod rules;
