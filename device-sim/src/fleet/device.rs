//! One simulated device: its publisher task (schedule, values, scenario events; owns the
//! `AsyncClient`), started beside its [`Driver`] task (the connection), sharing the
//! device's [`Switches`] with it (the driver sets them from commands, the models read them).
//!
//! Input: the fleet's config, the device's index and the run's start, deadline and
//! shutdown. Output: a [`DeviceDone`] with the readings it published, and the fleet's
//! shared counters.
//!
//! Invariants:
//! - `seq` counts well-formed readings from 0 without gaps; a malformed payload does not
//!   use a number;
//! - publishing uses `try_publish`, never a cancellable `publish().await`, so every
//!   payload counted as published was handed to the client;
//! - at most [`REQUEST_CAPACITY`] publishes, or the inflight window when that is larger,
//!   wait in the client; the device waits when it is full. (A queue smaller than the
//!   window capped one device near 16 publishes per timer tick, about 7.5k/s, whatever
//!   the broker.)

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, MqttOptions, Request};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::commands::command_topics;
use super::driver::{Control, Driver};
use super::FleetConfig;
use crate::model::{Generator, Switches};
use crate::payload::{self, Field, Sample};
use crate::scenario::Plan;
use crate::stats::Counters;

/// Publishes a device may queue in its client before it waits (at least; see the
/// module header).
pub const REQUEST_CAPACITY: usize = 16;
/// A device that falls this far behind its schedule skips ahead.
const MAX_LAG: Duration = Duration::from_secs(1);
/// How long a device waits before retrying when its client queue is full.
const FULL_QUEUE_PAUSE: Duration = Duration::from_millis(1);

/// What one device reports when it is done.
pub(super) struct DeviceDone {
    pub id: String,
    pub readings: u64,
    pub stopped: Instant,
}

/// One device of the fleet, until it is started.
pub(super) struct Device {
    pub index: u32,
    pub id: String,
    pub cfg: Arc<FleetConfig>,
    pub counters: Arc<Counters>,
    /// When the run started; scenario times count from here.
    pub t0: Instant,
    /// When this device connects (staggered).
    pub start: Instant,
    pub deadline: Option<Instant>,
    pub shutdown: CancellationToken,
}

impl Device {
    /// Connects, publishes until the run ends for this device, then drains.
    pub async fn run(self) -> DeviceDone {
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
        let capacity = REQUEST_CAPACITY.max(usize::from(self.cfg.inflight));
        let (client, eventloop) = AsyncClient::new(self.mqtt_options(), capacity);
        let (ctrl_tx, ctrl_rx) = mpsc::channel(4);
        let (connected_tx, mut connected_rx) = watch::channel(false);
        let switches = Arc::new(Switches::new(
            cfg.scenario
                .fields
                .values()
                .filter_map(|m| m.switch().map(str::to_owned)),
        ));
        let driver = Driver {
            device: self.id.clone(),
            commands: command_topics(&self.id, &switches),
            switches: switches.clone(),
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
            let mut publisher = Publisher::new(&self, client, &ctrl_tx, switches);
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
    /// Set by the commands the driver receives; read by the models.
    switches: Arc<Switches>,
    rng: SmallRng,
    seq: u64,
    published: u64,
    quota: Option<u64>,
    period: Option<Duration>,
}

impl<'d> Publisher<'d> {
    fn new(
        device: &'d Device,
        client: AsyncClient,
        ctrl: &'d mpsc::Sender<Control>,
        switches: Arc<Switches>,
    ) -> Self {
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
            switches,
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
        let mut disconnects = self.plan.disconnects().into_iter().peekable();
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
            if let Some(planned) = disconnects.next_if(|p| p.at <= t) {
                let until = d.t0 + planned.until;
                let _ = self.ctrl.send(Control::Disconnect { until }).await;
                if planned.silent && !self.pause_until(until).await {
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
            let wake = disconnects
                .peek()
                .map(|p| next.min(d.t0 + p.at))
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
                    let v = gen.next(t, &mut self.rng, &self.switches);
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
