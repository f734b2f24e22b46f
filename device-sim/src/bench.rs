//! Bench mode: run the fleet against a broker while a subscriber on the
//! upstream broker counts what arrives, to measure end-to-end delivery and latency.
//!
//! Inputs: a [`FleetConfig`] (the edge under test) and an [`UpstreamConfig`]
//! (where forwarded readings appear, e.g. `bench/devices/#`). Output: a
//! [`BenchReport`]: sent / acked / received / lost / duplicated, latency
//! percentiles, throughput, and CPU and RSS of watched processes.
//!
//! Invariants:
//! - the subscriber is subscribed (SUBACK seen) before the first device connects.
//! - loss and duplicates are judged per device against the readings the fleet
//!   published: seq `0..n` for a device that published `n` readings. A reading
//!   outside that range is `unexpected`, never counted as delivered.
//! - latency is receive time minus the `ts` in the payload (same clock: the
//!   subscriber and the devices are one process), at millisecond resolution.
//! - memory is bounded: one bit per published reading, a fixed histogram.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::fleet::{self, FleetConfig, FleetError, Summary};
use crate::payload::{self, Stamp};
use crate::stats::{ProcessUsage, Watch};

/// Latencies above this land in the last histogram bucket (max stays exact).
const HISTOGRAM_MS: usize = 60_000;
/// Sequence numbers above this are not tracked (they are `unexpected`).
const MAX_TRACKED_SEQ: u64 = 100_000_000;

/// Where forwarded readings show up.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `host:port` of the upstream broker.
    pub broker: String,
    /// Topic filter to subscribe, e.g. `bench/devices/#`.
    pub topic: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// After publishing ends, stop waiting once nothing new arrived for this long.
    pub settle: Duration,
    /// After publishing ends, wait at most this long for stragglers.
    pub max_wait: Duration,
    /// Processes whose CPU and RSS are reported (the brokers under test).
    pub watch: Vec<Watch>,
    /// Name of this run in reports (e.g. `gateway`, `mosquitto`).
    pub label: String,
}

impl UpstreamConfig {
    pub fn new(broker: impl Into<String>, topic: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            broker: broker.into(),
            topic: topic.into(),
            username: None,
            password: None,
            settle: Duration::from_secs(3),
            max_wait: Duration::from_secs(30),
            watch: Vec::new(),
            label: "run".into(),
        }
    }
}

/// Errors from a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("upstream broker {broker}: no SUBACK for `{topic}` within {secs} s ({last_error})")]
    Subscribe {
        broker: String,
        topic: String,
        secs: u64,
        last_error: String,
    },
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

/// What a bench run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub label: String,
    pub fleet: Summary,
    /// MQTT messages the upstream subscriber got (a batch is one message).
    pub upstream_messages: u64,
    /// Readings found in them, repeats included.
    pub received: u64,
    /// Distinct published readings delivered.
    pub delivered: u64,
    /// Published readings not delivered when the wait ended (see `wait`: a wait that
    /// ran out while readings still arrived leaves a backlog, not necessarily a loss).
    pub lost: u64,
    /// Repeats of readings already delivered.
    pub duplicated: u64,
    /// Readings for unknown devices or sequence numbers never published.
    pub unexpected: u64,
    /// Upstream messages that were not readings (e.g. forwarded malformed payloads).
    pub undecodable: u64,
    /// Delivered readings per second, first to last receipt.
    pub delivered_rate: f64,
    pub latency_ms: Latency,
    pub processes: Vec<ProcessUsage>,
    /// How the wait for stragglers after publishing ended (`None` in reports written
    /// before it was recorded).
    #[serde(default)]
    pub wait: Option<Wait>,
}

/// The wait for stragglers after the fleet stopped publishing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Wait {
    /// Seconds from the end of publishing to the end of the wait.
    pub secs: f64,
    pub end: WaitEnd,
}

/// Why the wait for stragglers ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitEnd {
    /// Every published reading had arrived.
    AllDelivered,
    /// Nothing new arrived for [`UpstreamConfig::settle`].
    Quiet,
    /// [`UpstreamConfig::max_wait`] ran out while readings were still arriving: what
    /// is missing may still be on its way (an edge draining a backlog).
    MaxWait,
    /// The run was cancelled.
    Stopped,
}

/// Counts what a subscriber receives.
#[derive(Debug, Clone)]
pub struct Tally {
    devices: HashMap<String, Seen>,
    messages: u64,
    received: u64,
    duplicated: u64,
    undecodable: u64,
    histogram: Vec<u64>,
    max_ms: u64,
    sum_ms: u128,
    first_rx: Option<Instant>,
    last_rx: Option<Instant>,
}

#[derive(Debug, Clone, Default)]
struct Seen {
    bits: Vec<u64>,
    unique: u64,
    untracked: u64,
}

impl Seen {
    /// Marks `seq`; true if it was new.
    fn mark(&mut self, seq: u64) -> bool {
        if seq > MAX_TRACKED_SEQ {
            self.untracked += 1;
            return true;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let new = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        self.unique += u64::from(new);
        new
    }

    /// Distinct sequence numbers below `n`.
    fn below(&self, n: u64) -> u64 {
        let full = (n / 64) as usize;
        let mut count: u64 = self
            .bits
            .iter()
            .take(full)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if let Some(w) = self.bits.get(full) {
            let mask = (1u64 << (n % 64)) - 1;
            count += u64::from((w & mask).count_ones());
        }
        count
    }
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            devices: HashMap::new(),
            messages: 0,
            received: 0,
            duplicated: 0,
            undecodable: 0,
            histogram: vec![0; HISTOGRAM_MS + 1],
            max_ms: 0,
            sum_ms: 0,
            first_rx: None,
            last_rx: None,
        }
    }
}

/// Delivery figures from a [`Tally`] against what was published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    pub received: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub unexpected: u64,
    pub undecodable: u64,
}

impl Tally {
    /// Records one received MQTT message at `now_ms` (Unix milliseconds).
    pub fn record_message(&mut self, topic: &str, payload: &[u8], now_ms: i64) {
        self.messages += 1;
        let now = Instant::now();
        self.first_rx.get_or_insert(now);
        self.last_rx = Some(now);
        match payload::stamps(topic, payload) {
            Some(stamps) => stamps.iter().for_each(|s| self.record(s, now_ms)),
            None => self.undecodable += 1,
        }
    }

    /// Records one reading received at `now_ms`.
    pub fn record(&mut self, stamp: &Stamp, now_ms: i64) {
        self.received += 1;
        let seen = match self.devices.get_mut(stamp.device.as_str()) {
            Some(seen) => seen,
            None => self.devices.entry(stamp.device.clone()).or_default(),
        };
        if !seen.mark(stamp.seq) {
            self.duplicated += 1;
            return;
        }
        let ms = (now_ms - stamp.ts).max(0) as u64;
        self.histogram[(ms as usize).min(HISTOGRAM_MS)] += 1;
        self.max_ms = self.max_ms.max(ms);
        self.sum_ms += ms as u128;
    }

    /// Distinct readings seen so far (any device, any seq).
    pub fn unique(&self) -> u64 {
        self.devices.values().map(|s| s.unique + s.untracked).sum()
    }

    /// Judges what arrived against `published`: (device id, readings published).
    pub fn delivery(&self, published: &[(String, u64)]) -> Delivery {
        let delivered: u64 = published
            .iter()
            .map(|(id, n)| self.devices.get(id).map_or(0, |s| s.below(*n)))
            .sum();
        let expected: u64 = published.iter().map(|(_, n)| n).sum();
        Delivery {
            received: self.received,
            delivered,
            lost: expected - delivered,
            duplicated: self.duplicated,
            unexpected: self.unique() - delivered,
            undecodable: self.undecodable,
        }
    }

    /// Latency percentiles of first deliveries.
    pub fn latency(&self) -> Latency {
        let total: u64 = self.histogram.iter().sum();
        if total == 0 {
            return Latency::default();
        }
        let pct = |p: f64| {
            let rank = ((p * total as f64).ceil() as u64).max(1);
            let mut acc = 0;
            for (ms, n) in self.histogram.iter().enumerate() {
                acc += n;
                if acc >= rank {
                    return (ms as u64).min(self.max_ms);
                }
            }
            self.max_ms
        };
        Latency {
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: self.max_ms,
            mean: self.sum_ms as f64 / total as f64,
        }
    }
}

/// Runs the fleet against its broker while counting what reaches `upstream`.
pub async fn run(fleet: FleetConfig, upstream: UpstreamConfig) -> Result<BenchReport, BenchError> {
    run_until(fleet, upstream, CancellationToken::new()).await
}

/// [`run`], ending early when `shutdown` is cancelled.
pub async fn run_until(
    fleet_cfg: FleetConfig,
    upstream: UpstreamConfig,
    shutdown: CancellationToken,
) -> Result<BenchReport, BenchError> {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = watch::channel(None::<Result<(), String>>);
    // The subscriber gets its own thread and runtime so the 2 x N device tasks
    // do not delay its receive timestamps.
    let subscriber = {
        let (up, tally, stop) = (upstream.clone(), tally.clone(), stop.clone());
        std::thread::Builder::new()
            .name("bench-subscriber".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(subscribe(up, tally, ready_tx, stop)),
                    Err(e) => {
                        ready_tx.send_replace(Some(Err(format!("subscriber runtime: {e}"))));
                    }
                }
            })
            .expect("spawn the bench subscriber thread")
    };
    let wait = Duration::from_secs(10);
    let ready = tokio::time::timeout(wait, ready_rx.wait_for(|r| matches!(r, Some(Ok(())))));
    if !matches!(ready.await, Ok(Ok(_))) {
        stop.cancel();
        let last_error = match &*ready_rx.borrow() {
            Some(Err(e)) => e.clone(),
            _ => "no answer".into(),
        };
        return Err(BenchError::Subscribe {
            broker: upstream.broker,
            topic: upstream.topic,
            secs: wait.as_secs(),
            last_error,
        });
    }
    let samples: Vec<_> = upstream
        .watch
        .iter()
        .filter_map(|w| Some((w, w.sample()?)))
        .collect();
    let summary = fleet::run_until(fleet_cfg, shutdown.clone()).await?;

    // Wait for stragglers: all readings in, or quiet for `settle`, or `max_wait`.
    let expected = summary.readings_total();
    let waiting_since = Instant::now();
    let give_up = waiting_since + upstream.max_wait;
    let end = loop {
        let (unique, last_rx) = {
            let t = tally.lock().expect("tally lock");
            (t.unique(), t.last_rx)
        };
        let quiet = last_rx
            .unwrap_or(waiting_since)
            .max(waiting_since)
            .elapsed()
            >= upstream.settle;
        if unique >= expected {
            break WaitEnd::AllDelivered;
        }
        if quiet {
            break WaitEnd::Quiet;
        }
        if Instant::now() >= give_up {
            break WaitEnd::MaxWait;
        }
        if shutdown.is_cancelled() {
            break WaitEnd::Stopped;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let wait = Wait {
        secs: waiting_since.elapsed().as_secs_f64(),
        end,
    };
    let processes = samples
        .iter()
        .filter_map(|(w, s)| w.usage_since(s))
        .collect();
    stop.cancel();
    let _ = tokio::task::spawn_blocking(move || subscriber.join()).await;
    let tally = tally.lock().expect("tally lock");
    let d = tally.delivery(&summary.readings);
    let span = match (tally.first_rx, tally.last_rx) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let report = BenchReport {
        label: upstream.label,
        upstream_messages: tally.messages,
        received: d.received,
        delivered: d.delivered,
        lost: d.lost,
        duplicated: d.duplicated,
        unexpected: d.unexpected,
        undecodable: d.undecodable,
        delivered_rate: if span > 0.0 {
            d.delivered as f64 / span
        } else {
            0.0
        },
        latency_ms: tally.latency(),
        processes,
        fleet: summary,
        wait: Some(wait),
    };
    info!(
        delivered = report.delivered,
        lost = report.lost,
        duplicated = report.duplicated,
        p99_ms = report.latency_ms.p99,
        "Bench done."
    );
    Ok(report)
}

/// The upstream subscriber: (re)subscribes on every CONNACK, tallies publishes.
async fn subscribe(
    cfg: UpstreamConfig,
    tally: Arc<Mutex<Tally>>,
    ready: watch::Sender<Option<Result<(), String>>>,
    stop: CancellationToken,
) {
    let (host, port) = cfg
        .broker
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.parse().unwrap_or(1883)))
        .unwrap_or((cfg.broker.clone(), 1883));
    let id = format!(
        "device-sim-bench-{}-{}",
        std::process::id(),
        crate::now_millis()
    );
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(16 * 1024 * 1024, 64 * 1024);
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                let _ = client.try_subscribe(cfg.topic.clone(), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Incoming::SubAck(_))) => {
                ready.send_replace(Some(Ok(())));
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let now = crate::now_millis();
                tally
                    .lock()
                    .expect("tally lock")
                    .record_message(&p.topic, &p.payload, now);
            }
            Ok(_) => {}
            Err(e) => {
                ready.send_if_modified(|r| {
                    if r.is_none() || matches!(r, Some(Err(_))) {
                        *r = Some(Err(e.to_string()));
                        true
                    } else {
                        false
                    }
                });
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(device: &str, seq: u64, ts: i64) -> Stamp {
        Stamp {
            device: device.into(),
            seq,
            ts,
        }
    }

    #[test]
    fn loss_duplicates_and_strays_are_counted() {
        let mut t = Tally::default();
        // a: published 5, got 0 1 1 3 4 4 4 -> lost 1 (seq 2), 3 duplicates.
        for seq in [0, 1, 1, 3, 4, 4, 4] {
            t.record(&stamp("a", seq, 1000), 1010);
        }
        // b: published 2, got 0 1 and a stray 7; c was never published.
        for seq in [0, 1, 7] {
            t.record(&stamp("b", seq, 1000), 1020);
        }
        t.record(&stamp("c", 0, 1000), 1030);
        let d = t.delivery(&[("a".into(), 5), ("b".into(), 2), ("z".into(), 3)]);
        assert_eq!(
            d,
            Delivery {
                received: 11,
                delivered: 6,
                lost: 1 + 3,
                duplicated: 3,
                unexpected: 2,
                undecodable: 0,
            }
        );
    }

    #[test]
    fn percentiles_follow_the_distribution() {
        let mut t = Tally::default();
        for i in 0..100u64 {
            t.record(&stamp("a", i, 0), i as i64 + 1);
        }
        let l = t.latency();
        assert_eq!((l.p50, l.p90, l.p99, l.max), (50, 90, 99, 100));
        assert!((l.mean - 50.5).abs() < 1e-9);
    }

    #[test]
    fn seen_counts_below_any_bound() {
        let mut s = Seen::default();
        for seq in [0, 63, 64, 65, 200] {
            assert!(s.mark(seq));
        }
        assert!(!s.mark(64));
        assert_eq!(s.below(64), 2);
        assert_eq!(s.below(65), 3);
        assert_eq!(s.below(1000), 5);
        assert_eq!(s.below(0), 0);
    }

    #[test]
    fn undecodable_messages_are_counted() {
        let mut t = Tally::default();
        t.record_message("bench/devices/a/telemetry", b"not json {", 0);
        t.record_message(
            "bench/devices/a/telemetry",
            br#"[{"ts":1,"seq":0},{"ts":1,"seq":1}]"#,
            5,
        );
        let d = t.delivery(&[("a".into(), 2)]);
        assert_eq!((d.undecodable, d.delivered, d.lost), (1, 2, 0));
        assert_eq!(t.messages, 2);
    }
}
