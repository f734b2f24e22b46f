//! The simulated fleet: N devices, each its own MQTT connection, publishing
//! readings on a schedule and following the scenario's events.
//!
//! Input: a [`FleetConfig`] (`config.rs`). Output: a [`Summary`] when every device is
//! done (its quota or the duration reached, or shutdown asked), plus progress log
//! lines while it runs.
//!
//! Each device is two tasks: the publisher (`device.rs`: schedule, values, scenario
//! events; owns the `AsyncClient`) and the driver (`driver.rs`: owns the rumqttc
//! `EventLoop`, counts sent/acked, reconnects with backoff, drops the connection when
//! told, and takes the commands a device subscribes to when a model of its scenario has a
//! switch: `commands.rs`). Two tasks because `EventLoop::poll` must not be cancelled
//! mid-write, so it is never raced against the publish timer.
//!
//! Invariants:
//! - with `count`, exactly `count` payloads are published (spread over the
//!   devices, the first `count % devices` get one more), unless the run is shut
//!   down or its duration ends first.
//! - `seq` counts well-formed readings per device from 0 without gaps; a
//!   malformed payload does not use a number.
//! - every publish is accounted for at the end: acked (QoS 1) or sent (QoS 0),
//!   or dropped from the device queue on a disconnect, or still outstanding
//!   when the drain grace ran out.
//! - memory is bounded: each client's request channel holds
//!   [`REQUEST_CAPACITY`] publishes; devices wait when it is full.

mod commands;
mod config;
mod device;
mod driver;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use commands::{command_topic, parse_on};
pub use config::{parse_credentials, FleetConfig, Rate};
pub use device::REQUEST_CAPACITY;

use crate::payload::Format;
use crate::stats::{Counters, CpuSample, CpuUse, Snapshot};
use device::Device;

/// Errors from a fleet run.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid fleet config:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
    #[error("device task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a fleet run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub devices: u32,
    pub qos: u8,
    pub format: Format,
    /// Final counters.
    pub totals: Snapshot,
    /// Peak number of devices connected at once.
    pub connected_peak: i64,
    /// Well-formed readings published per device (= next `seq`), by device id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readings: Vec<(String, u64)>,
    /// From the start until the last device stopped publishing.
    pub publish_s: f64,
    /// Publish rate over `publish_s`, payloads per second.
    pub publish_rate: f64,
    /// Whole run including connect and drain.
    pub elapsed_s: f64,
    /// This process over the whole run.
    pub cpu: CpuUse,
}

impl Summary {
    pub fn readings_total(&self) -> u64 {
        self.readings.iter().map(|(_, n)| n).sum()
    }
}

/// Runs the fleet until its count or duration is reached.
pub async fn run(cfg: FleetConfig) -> Result<Summary, FleetError> {
    run_until(cfg, CancellationToken::new()).await
}

/// Runs the fleet until its count or duration is reached or `shutdown` is cancelled.
pub async fn run_until(
    cfg: FleetConfig,
    shutdown: CancellationToken,
) -> Result<Summary, FleetError> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(FleetError::Invalid(problems));
    }
    crate::stats::raise_fd_limit();
    let cpu_start = CpuSample::now();
    let counters = Arc::new(Counters::default());
    let cfg = Arc::new(cfg);
    let t0 = Instant::now();
    let deadline = cfg.duration.map(|d| t0 + d);
    let progress = cfg.progress.map(|every| {
        tokio::spawn(report_progress(
            every,
            counters.clone(),
            shutdown.child_token(),
        ))
    });
    info!(
        devices = cfg.devices,
        broker = %cfg.broker,
        scenario = %cfg.scenario.name,
        "Fleet starting."
    );
    let mut tasks = Vec::with_capacity(cfg.devices as usize);
    for index in 0..cfg.devices {
        let start = t0 + Duration::from_secs_f64(index as f64 / cfg.connect_rate);
        let device = Device {
            index,
            id: cfg.device_id(index),
            cfg: cfg.clone(),
            counters: counters.clone(),
            t0,
            start,
            deadline,
            shutdown: shutdown.clone(),
        };
        tasks.push(tokio::spawn(device.run()));
    }
    let mut readings = Vec::with_capacity(tasks.len());
    let mut last_publish = t0;
    for task in tasks {
        let done = task.await?;
        last_publish = last_publish.max(done.stopped);
        readings.push((done.id, done.readings));
    }
    let elapsed = t0.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    let totals = counters.snapshot();
    let publish_s = last_publish.duration_since(t0).as_secs_f64();
    let summary = Summary {
        devices: cfg.devices,
        qos: cfg.qos as u8,
        format: cfg.format,
        totals,
        connected_peak: counters
            .connected_peak
            .load(std::sync::atomic::Ordering::Relaxed),
        readings,
        publish_s,
        publish_rate: if publish_s > 0.0 {
            totals.published as f64 / publish_s
        } else {
            0.0
        },
        elapsed_s: elapsed.as_secs_f64(),
        cpu: CpuSample::now().since(&cpu_start),
    };
    info!(
        published = totals.published,
        acked = totals.acked,
        dropped = totals.dropped,
        errors = totals.errors,
        rate = format!("{:.0}/s", summary.publish_rate),
        cpu = format!("{:.0}%", summary.cpu.percent),
        "Fleet done."
    );
    Ok(summary)
}

async fn report_progress(every: Duration, counters: Arc<Counters>, stop: CancellationToken) {
    let started = Instant::now();
    let mut last = counters.snapshot();
    let mut last_cpu = CpuSample::now();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = counters.snapshot();
        let cpu = CpuSample::now();
        let rate = (now.published - last.published) as f64 / every.as_secs_f64();
        info!(
            t = format!("{:.0}s", started.elapsed().as_secs_f64()),
            connected = now.connected,
            rate = format!("{rate:.0}/s"),
            sent = now.sent,
            acked = now.acked,
            dropped = now.dropped,
            errors = now.errors,
            cpu = format!("{:.0}%", cpu.since(&last_cpu).percent),
            "Progress."
        );
        last = now;
        last_cpu = cpu;
    }
}
