//! device-sim: a fleet of simulated MQTT devices, a load generator and the
//! benchmark harness for the gateway.
//!
//! What it owns: N devices, each its own MQTT connection and client id,
//! connecting staggered to any broker and publishing readings (JSON, CBOR,
//! SenML JSON, SenML CBOR) on `devices/{id}/{stream}`, with values from per-field
//! models and events scripted by a scenario file. In bench mode a subscriber on
//! an upstream broker measures delivery and latency.
//!
//! Layout:
//! - [`payload`]: encode readings; find `(device, seq, ts)` in what arrives.
//! - [`model`]: value models (constant, random walk, sine, step).
//! - [`scenario`]: TOML scenario files and the per-device plan.
//! - [`fleet`]: its config and the device tasks; [`fleet::run`] returns a [`Summary`].
//! - [`bench`]: the upstream subscriber; [`bench::run`] returns a [`BenchReport`].
//! - [`stats`]: counters, own CPU and RSS, watched processes.
//! - [`report`]: text summaries and the A/B comparison table.
//!
//! Invariants: every run ends (count, duration or shutdown); every reading
//! carries `ts` (Unix ms at send) and `seq` (per device, from 0, no gaps).

pub mod bench;
pub mod fleet;
pub mod model;
pub mod payload;
pub mod report;
pub mod scenario;
pub mod stats;

pub use bench::{BenchError, BenchReport, Latency, UpstreamConfig};
pub use fleet::{run, run_until, FleetConfig, FleetError, Rate, Summary};
pub use model::Model;
pub use payload::Format;
pub use rumqttc::QoS;
pub use scenario::{Event, Scenario, ScenarioError, Target};

/// The current wall-clock time in Unix milliseconds.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
