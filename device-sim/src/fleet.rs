//! The simulated fleet: N devices, each its own MQTT connection, publishing
//! readings on a schedule and following the scenario's events.
//!
//! Input: a [`FleetConfig`]. Output: a [`Summary`] when every device is done
//! (its quota or the duration reached, or shutdown asked), plus progress log
//! lines while it runs.
//!
//! Each device is two tasks: the publisher (schedule, values, scenario events;
//! owns the `AsyncClient`) and the driver (owns the rumqttc `EventLoop`, counts
//! sent/acked, reconnects with backoff, drops the connection when told). Two
//! tasks because `EventLoop::poll` must not be cancelled mid-write, so it is
//! never raced against the publish timer.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, Request};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::Generator;
use crate::payload::{self, Field, Format, Sample};
use crate::scenario::{Plan, Scenario};
use crate::stats::{Counters, CpuSample, CpuUse, Snapshot};

/// Publishes a device may queue in its client before it waits.
pub const REQUEST_CAPACITY: usize = 16;
/// A device that falls this far behind its schedule skips ahead.
const MAX_LAG: Duration = Duration::from_secs(1);
/// How long a device waits before retrying when its client queue is full.
const FULL_QUEUE_PAUSE: Duration = Duration::from_millis(1);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How fast devices publish.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Rate {
    /// Readings per second, each device.
    PerDevice(f64),
    /// Readings per second for the whole fleet, shared evenly.
    Total(f64),
    /// As fast as the connection takes them.
    Max,
}

impl Rate {
    /// The interval between two readings of one device (`None`: no pause).
    fn period(self, devices: u32) -> Option<Duration> {
        let per_device = match self {
            Rate::PerDevice(r) => r,
            Rate::Total(r) => r / devices.max(1) as f64,
            Rate::Max => return None,
        };
        (per_device > 0.0).then(|| Duration::from_secs_f64(1.0 / per_device))
    }
}

/// Everything a fleet run needs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `host:port` of the MQTT broker.
    pub broker: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per-device passwords (device id -> password), for a gateway that authenticates
    /// devices: a device listed here connects with user name = client id = its id and
    /// its own password, instead of `username`/`password`.
    pub credentials: Option<Arc<HashMap<String, String>>>,
    pub devices: u32,
    /// Device ids are `{id_prefix}{n:04}`, n from 1.
    pub id_prefix: String,
    /// Topics are `devices/{id}/{stream}`.
    pub stream: String,
    pub rate: Rate,
    pub qos: QoS,
    pub format: Format,
    /// Total payloads to publish (all devices together).
    pub count: Option<u64>,
    /// Stop publishing after this long.
    pub duration: Option<Duration>,
    /// New connections per second while the fleet comes up (staggered connect).
    pub connect_rate: f64,
    pub scenario: Scenario,
    /// Seed for values and malformed picks; fixed seed, repeatable run.
    pub seed: u64,
    /// Log a progress line this often.
    pub progress: Option<Duration>,
    /// After publishing, wait this long at most for outstanding acks.
    pub drain: Duration,
    pub keep_alive: Duration,
    /// A device that has not connected this long after its start gives up
    /// (so a run with only a count still ends when the broker is away).
    pub connect_timeout: Duration,
    /// Unacked QoS 1 publishes per connection.
    pub inflight: u16,
}

impl FleetConfig {
    /// A config with the defaults: 10 devices, 1 reading/s each, QoS 1, JSON,
    /// default scenario, 10 s.
    pub fn new(broker: impl Into<String>) -> FleetConfig {
        FleetConfig {
            broker: broker.into(),
            username: None,
            password: None,
            credentials: None,
            devices: 10,
            id_prefix: "t-".into(),
            stream: "telemetry".into(),
            rate: Rate::PerDevice(1.0),
            qos: QoS::AtLeastOnce,
            format: Format::Json,
            count: None,
            duration: Some(Duration::from_secs(10)),
            connect_rate: 500.0,
            scenario: Scenario::default(),
            seed: 1,
            progress: None,
            drain: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            inflight: 100,
        }
    }

    /// A config for `scenario`, taking its `[fleet]` defaults (devices, rate
    /// (0 = max), duration, count, format, qos) over the built-in ones.
    pub fn from_scenario(broker: impl Into<String>, scenario: Scenario) -> FleetConfig {
        let mut cfg = FleetConfig::new(broker);
        let d = &scenario.fleet;
        if let Some(n) = d.devices {
            cfg.devices = n;
        }
        match d.rate {
            Some(0.0) => cfg.rate = Rate::Max,
            Some(r) => cfg.rate = Rate::PerDevice(r),
            None => {}
        }
        if d.duration.is_some() || d.count.is_some() {
            cfg.duration = d.duration;
            cfg.count = d.count;
        }
        if let Some(f) = d.format {
            cfg.format = f;
        }
        match d.qos {
            Some(0) => cfg.qos = QoS::AtMostOnce,
            Some(1) => cfg.qos = QoS::AtLeastOnce,
            _ => {}
        }
        cfg.scenario = scenario;
        cfg
    }

    pub fn device_id(&self, index: u32) -> String {
        format!("{}{:04}", self.id_prefix, index + 1)
    }

    pub fn device_ids(&self) -> Vec<String> {
        (0..self.devices).map(|i| self.device_id(i)).collect()
    }

    fn quota(&self, index: u32) -> Option<u64> {
        let n = self.devices.max(1) as u64;
        self.count
            .map(|c| c / n + u64::from((index as u64) < c % n))
    }

    /// Every problem with this config, including scenario targets.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.scenario.problems();
        out.extend(self.scenario.target_problems(&self.device_ids()));
        if self.devices == 0 {
            out.push("devices must be at least 1".into());
        }
        if self.count.is_none() && self.duration.is_none() {
            out.push("set a count or a duration so the run ends".into());
        }
        if !(self.connect_rate.is_finite() && self.connect_rate > 0.0) {
            out.push(format!(
                "connect rate must be above 0, not {}",
                self.connect_rate
            ));
        }
        match self.rate {
            Rate::PerDevice(r) | Rate::Total(r) if !(r.is_finite() && r > 0.0) => {
                out.push(format!("rate must be above 0, not {r} (use max)"))
            }
            _ => {}
        }
        if matches!(self.qos, QoS::ExactlyOnce) {
            out.push("QoS 2 is not supported (0 or 1)".into());
        }
        if self.broker.rsplit_once(':').is_none() {
            out.push(format!("broker `{}` is not host:port", self.broker));
        }
        out
    }
}

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

/// What one device reports when it is done.
struct DeviceDone {
    id: String,
    readings: u64,
    stopped: Instant,
}

/// Messages from a device's publisher to its driver.
enum Control {
    /// Drop the connection now; connect again at the instant given.
    Drop { until: Instant },
    /// No more publishes: `published` in total; drain and disconnect.
    Finish { published: u64 },
}

struct Device {
    index: u32,
    id: String,
    cfg: Arc<FleetConfig>,
    counters: Arc<Counters>,
    t0: Instant,
    start: Instant,
    deadline: Option<Instant>,
    shutdown: CancellationToken,
}

impl Device {
    async fn run(self) -> DeviceDone {
        let cfg = &self.cfg;
        let mut done = DeviceDone {
            id: self.id.clone(),
            readings: 0,
            stopped: Instant::now(),
        };
        tokio::select! {
            _ = sleep_until(self.start) => {}
            _ = self.shutdown.cancelled() => return done,
        }
        let (client, eventloop) = AsyncClient::new(self.mqtt_options(), REQUEST_CAPACITY);
        let (ctrl_tx, ctrl_rx) = mpsc::channel(4);
        let (connected_tx, mut connected_rx) = watch::channel(false);
        let driver = Driver {
            eventloop,
            client: client.clone(),
            ctrl: ctrl_rx,
            connected: connected_tx,
            counters: self.counters.clone(),
            qos: cfg.qos,
            drain: cfg.drain,
            shutdown: self.shutdown.clone(),
            rng: SmallRng::seed_from_u64(cfg.seed ^ 0x5eed ^ u64::from(self.index)),
        };
        let driver = tokio::spawn(driver.run());

        // Publish only once the first connection is up.
        let until_end = async {
            match self.deadline {
                Some(d) => sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let connected = tokio::select! {
            r = connected_rx.wait_for(|c| *c) => r.is_ok(),
            _ = until_end => false,
            _ = tokio::time::sleep(cfg.connect_timeout) => {
                warn!(device = %self.id, broker = %cfg.broker, "Never connected: giving up.");
                false
            }
            _ = self.shutdown.cancelled() => false,
        };
        let published = if connected {
            let mut publisher = Publisher::new(&self, client, &ctrl_tx);
            let published = publisher.run().await;
            done.readings = publisher.seq;
            published
        } else {
            0
        };
        done.stopped = Instant::now();
        let _ = ctrl_tx.send(Control::Finish { published }).await;
        let _ = driver.await;
        done
    }

    fn mqtt_options(&self) -> MqttOptions {
        let (host, port) = self
            .cfg
            .broker
            .rsplit_once(':')
            .map(|(h, p)| (h.to_owned(), p.parse().unwrap_or(1883)))
            .unwrap_or((self.cfg.broker.clone(), 1883));
        let mut o = MqttOptions::new(self.id.clone(), host, port);
        o.set_keep_alive(self.cfg.keep_alive)
            .set_clean_session(true)
            .set_inflight(self.cfg.inflight.max(1))
            .set_max_packet_size(64 * 1024, 64 * 1024);
        let own = self.cfg.credentials.as_ref().and_then(|c| c.get(&self.id));
        if let Some(password) = own {
            o.set_credentials(self.id.clone(), password.clone());
        } else if let Some(user) = &self.cfg.username {
            o.set_credentials(user.clone(), self.cfg.password.clone().unwrap_or_default());
        }
        o
    }
}

/// The publishing half of a device.
struct Publisher<'d> {
    device: &'d Device,
    client: AsyncClient,
    ctrl: &'d mpsc::Sender<Control>,
    topic: String,
    plan: Plan,
    fields: Vec<(String, Option<String>, Generator)>,
    rng: SmallRng,
    seq: u64,
    published: u64,
    quota: Option<u64>,
    period: Option<Duration>,
}

impl<'d> Publisher<'d> {
    fn new(device: &'d Device, client: AsyncClient, ctrl: &'d mpsc::Sender<Control>) -> Self {
        let cfg = &device.cfg;
        let mut rng =
            SmallRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003) + device.index as u64);
        let fields = cfg
            .scenario
            .fields
            .iter()
            .map(|(name, model)| {
                (
                    name.clone(),
                    model.unit().map(str::to_owned),
                    Generator::new(model.clone(), &mut rng),
                )
            })
            .collect();
        Publisher {
            device,
            client,
            ctrl,
            topic: format!("devices/{}/{}", device.id, cfg.stream),
            plan: cfg.scenario.plan_for(device.index, &device.id),
            fields,
            rng,
            seq: 0,
            published: 0,
            quota: cfg.quota(device.index),
            period: cfg.rate.period(cfg.devices),
        }
    }

    /// Publishes until quota, deadline or shutdown; returns payloads published.
    async fn run(&mut self) -> u64 {
        let d = self.device;
        let mut drops = self.plan.drops().into_iter().peekable();
        let mut next = Instant::now();
        loop {
            if self.quota.is_some_and(|q| self.published >= q) || d.shutdown.is_cancelled() {
                break;
            }
            let now = Instant::now();
            if d.deadline.is_some_and(|dl| now >= dl) {
                break;
            }
            let t = now.duration_since(d.t0);
            // Planned connection drops that are due.
            if let Some(drop) = drops.next_if(|drop| drop.at <= t) {
                let until = d.t0 + drop.until;
                let _ = self.ctrl.send(Control::Drop { until }).await;
                if drop.silent && !self.pause_until(until).await {
                    break;
                }
                next = next.max(Instant::now());
                continue;
            }
            if let Some(end) = self.plan.silence_end(t) {
                if !self.pause_until(d.t0 + end).await {
                    break;
                }
                next = next.max(Instant::now());
                continue;
            }
            // Wait for the next reading (or the next planned drop).
            let wake = drops
                .peek()
                .map(|drop| next.min(d.t0 + drop.at))
                .unwrap_or(next);
            if wake > now {
                if !self.pause_until(wake).await {
                    break;
                }
                continue;
            }
            if !self.publish_one(t).await {
                break;
            }
            if let Some(period) = self.period {
                let factor = self.plan.rate_factor(t);
                next += period.div_f64(factor);
                if Instant::now().saturating_duration_since(next) > MAX_LAG {
                    d.counters
                        .late
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    next = Instant::now();
                }
            } else {
                next = Instant::now();
            }
        }
        self.published
    }

    /// Sleeps until `until`; false if the run ended meanwhile.
    async fn pause_until(&self, until: Instant) -> bool {
        let d = self.device;
        let end = d.deadline.map_or(until, |dl| dl.min(until));
        tokio::select! {
            _ = sleep_until(end) => d.deadline.is_none_or(|dl| until < dl),
            _ = d.shutdown.cancelled() => false,
        }
    }

    /// Builds and publishes one payload; false if the run ended while waiting.
    async fn publish_one(&mut self, t: Duration) -> bool {
        let d = self.device;
        let malformed = {
            let f = self.plan.malformed_fraction(t);
            f > 0.0 && self.rng.random_bool(f)
        };
        let payload = if malformed {
            payload::MALFORMED[self.published as usize % payload::MALFORMED.len()].to_vec()
        } else {
            let values: Vec<Field<'_>> = self
                .fields
                .iter_mut()
                .map(|(name, unit, gen)| {
                    let v = gen.next(t, &mut self.rng);
                    Field {
                        name,
                        unit: unit.as_deref(),
                        value: self.plan.value(name, t, v),
                    }
                })
                .collect();
            let sample = Sample {
                device: &d.id,
                ts: crate::now_millis(),
                seq: self.seq,
                fields: &values,
            };
            match payload::encode(&sample, d.cfg.format) {
                Ok(bytes) => bytes,
                Err(e) => {
                    warn!(device = %d.id, error = %e, "Encoding failed.");
                    return false;
                }
            }
        };
        // try_publish, never a cancelled `publish().await`: a cancelled send can
        // still hand its message over, and then the counts would lie.
        let mut payload = payload;
        loop {
            match self
                .client
                .try_publish(self.topic.as_str(), d.cfg.qos, false, payload)
            {
                Ok(()) => break,
                Err(rumqttc::ClientError::TryRequest(Request::Publish(p))) => {
                    payload = p.payload.to_vec();
                }
                Err(_) => return false,
            }
            // The device's queue is full: wait a little, unless the run is over.
            if d.shutdown.is_cancelled() || d.deadline.is_some_and(|dl| Instant::now() >= dl) {
                return false;
            }
            tokio::time::sleep(FULL_QUEUE_PAUSE).await;
        }
        self.published += 1;
        let c = &d.counters;
        c.published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if malformed {
            c.malformed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.seq += 1;
        }
        true
    }
}

/// The connection half of a device: drives the event loop.
struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    ctrl: mpsc::Receiver<Control>,
    connected: watch::Sender<bool>,
    counters: Arc<Counters>,
    qos: QoS,
    drain: Duration,
    shutdown: CancellationToken,
    rng: SmallRng,
}

impl Driver {
    async fn run(mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.counters.clone();
        let (mut sent, mut acked, mut dropped) = (0u64, 0u64, 0u64);
        let mut finish: Option<(u64, Instant)> = None;
        let mut failures = 0u32;
        let mut disconnecting = false;
        loop {
            if let Some((published, grace)) = finish {
                let settled = match self.qos {
                    QoS::AtMostOnce => sent + dropped >= published,
                    _ => acked + dropped >= published,
                };
                let give_up = Instant::now() >= grace || self.shutdown.is_cancelled();
                if !*self.connected.borrow() && (settled || give_up) {
                    break;
                }
                if (settled || give_up) && !disconnecting {
                    disconnecting = true;
                    if self.client.try_disconnect().is_err() {
                        break;
                    }
                    finish = Some((published, Instant::now() + Duration::from_secs(1)));
                } else if disconnecting && give_up {
                    break;
                }
            }
            let grace = finish.map(|(_, g)| g);
            tokio::select! {
                biased;
                ctrl = self.ctrl.recv(), if finish.is_none() => match ctrl {
                    Some(Control::Drop { until }) => {
                        self.set_connected(false);
                        self.eventloop.network = None;
                        self.eventloop.clean();
                        dropped += self.discard_pending();
                        tokio::select! {
                            _ = sleep_until(until) => {}
                            _ = self.shutdown.cancelled() => {}
                        }
                    }
                    Some(Control::Finish { published }) => {
                        finish = Some((published, Instant::now() + self.drain));
                    }
                    None => break,
                },
                _ = sleep_until(grace.unwrap_or_else(Instant::now)), if grace.is_some() => {}
                event = self.eventloop.poll() => match event {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        failures = 0;
                        c.connects.fetch_add(1, Relaxed);
                        self.set_connected(true);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                        sent += 1;
                        c.sent.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        acked += 1;
                        c.acked.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        self.set_connected(false);
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        c.errors.fetch_add(1, Relaxed);
                        self.set_connected(false);
                        dropped += self.discard_pending();
                        failures += 1;
                        let backoff = BACKOFF_MIN
                            .saturating_mul(1 << failures.min(5))
                            .min(BACKOFF_MAX)
                            .mul_f64(self.rng.random_range(0.5..1.0));
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = self.shutdown.cancelled() => {}
                        }
                    }
                },
            }
        }
        self.set_connected(false);
    }

    /// Forgets the publishes queued for the dead session (clean session: the
    /// broker would not take them back anyway); returns how many.
    fn discard_pending(&mut self) -> u64 {
        let n = self
            .eventloop
            .pending
            .iter()
            .filter(|r| matches!(r, Request::Publish(_)))
            .count() as u64;
        self.eventloop.pending.clear();
        self.counters
            .dropped
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        n
    }

    fn set_connected(&self, up: bool) {
        let was = self.connected.send_replace(up);
        if was != up {
            self.counters.connection(if up { 1 } else { -1 });
        }
    }
}

/// Parses a credentials file: one `device-id:password` line per device; blank lines
/// and lines starting with `#` are ignored. Errors name the line.
pub fn parse_credentials(text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((id, pw)) if !id.is_empty() && !pw.is_empty() => {
                out.insert(id.to_owned(), pw.to_owned());
            }
            _ => return Err(format!("line {}: expected DEVICE-ID:PASSWORD", n + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse_credentials;

    #[test]
    fn credentials_file_lines_parse_and_errors_name_the_line() {
        let c = parse_credentials("# fleet\nt-0001:abc\n\nt-0002:x:y\n").unwrap();
        assert_eq!(c["t-0001"], "abc");
        assert_eq!(c["t-0002"], "x:y", "only the first colon separates");
        assert_eq!(
            parse_credentials("t-1:ok\nnocolon\n").unwrap_err(),
            "line 2: expected DEVICE-ID:PASSWORD"
        );
        assert!(parse_credentials("t-1:\n").is_err());
    }
}
