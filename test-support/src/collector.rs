//! An upstream subscriber that records every message it receives, and the checks of
//! what a run delivered (every message present, order per device, duplicates counted).
//!
//! Invariants:
//! - The collector speaks MQTT 5 with a persistent session (clean start off, one hour
//!   expiry) and QoS 1, so messages published while it reconnects (a broker restart)
//!   are still delivered to it.
//! - It is subscribed when [`Collector::start`] returns; it reconnects after errors and
//!   stops when the last clone is dropped.
//! - The gateway's `id` and `replayed` user properties are kept with each message.
//! - The gateway's presence status (a message on a topic whose last level is `status`,
//!   without an `id`: not an outbox row) is kept apart, in [`Collector::status`], so the
//!   counts and the delivery checks see only forwarded rows and device messages.
//! - Likewise the devices' connects and disconnects (`{prefix}/events/DeviceConnected/..`
//!   and `DeviceDisconnected`, on by default with `rules.device_events`) are kept apart,
//!   in [`Collector::device_events`]: every test client's connection makes them, so counts
//!   of readings and rule events would otherwise depend on how the test connects.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::ports::free_port;

/// One message as the collector saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    /// The `id` user property (`{gateway}:{epoch}:{seq}` from the gateway's forwarder).
    pub id: Option<String>,
    /// The `replayed` user property.
    pub replayed: Option<bool>,
    pub payload: Vec<u8>,
    /// The RETAIN flag: set when the broker delivered a retained message on subscribe.
    pub retain: bool,
    pub at: Instant,
}

impl Received {
    /// True for the gateway's presence status: `.../status` without an `id`.
    pub fn is_status(&self) -> bool {
        self.id.is_none() && self.topic.rsplit('/').next() == Some("status")
    }

    /// True for a device event: `.../events/DeviceConnected/{device}` or
    /// `.../events/DeviceDisconnected/{device}`.
    pub fn is_device_event(&self) -> bool {
        let mut levels = self.topic.rsplit('/').skip(1);
        matches!(
            levels.next(),
            Some("DeviceConnected" | "DeviceDisconnected")
        ) && levels.next() == Some("events")
    }

    /// The outbox seq at the end of the `id` property; panics without one.
    pub fn seq(&self) -> u64 {
        self.id
            .as_deref()
            .and_then(|id| id.rsplit_once(':'))
            .and_then(|(_, s)| s.parse().ok())
            .expect("message without an id")
    }
}

/// A QoS 1 subscriber on `127.0.0.1:port` with a persistent session, recording every
/// publish (presence status and device events apart from the rest).
#[derive(Clone)]
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    /// Presence status messages ([`Received::is_status`]), in arrival order.
    status: Arc<Mutex<Vec<Received>>>,
    /// Device events ([`Received::is_device_event`]), in arrival order.
    device_events: Arc<Mutex<Vec<Received>>>,
    _stop: Arc<DropGuard>,
}

impl Collector {
    /// Connects, subscribes to `filter` and waits (up to 10 s) for the SUBACK.
    pub async fn start(port: u16, filter: &str) -> Collector {
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(Vec::new()));
        let device_events = Arc::new(Mutex::new(Vec::new()));
        let mut opts = MqttOptions::new(format!("collector-{}", free_port()), "127.0.0.1", port);
        opts.set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_max_packet_size(Some(4 * 1024 * 1024))
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(opts, 100);
        let (subscribed_tx, mut subscribed_rx) = tokio::sync::mpsc::channel(1);
        let sink = received.clone();
        let status_sink = status.clone();
        let device_events_sink = device_events.clone();
        let filter = filter.to_owned();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let mut subscribed = false;
            loop {
                let event = tokio::select! {
                    _ = stopped.cancelled() => return,
                    event = el.poll() => event,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                        subscribed = true;
                        let _ = subscribed_tx.send(()).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let prop = |k: &str| {
                            props
                                .user_properties
                                .iter()
                                .find(|(name, _)| name == k)
                                .map(|(_, v)| v.clone())
                        };
                        let m = Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            id: prop("id"),
                            replayed: prop("replayed").map(|v| v == "true"),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            at: Instant::now(),
                        };
                        if m.is_status() {
                            status_sink.lock().unwrap().push(m);
                        } else if m.is_device_event() {
                            device_events_sink.lock().unwrap().push(m);
                        } else {
                            sink.lock().unwrap().push(m);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx.recv())
            .await
            .expect("collector did not subscribe");
        Collector {
            received,
            status,
            device_events,
            _stop: Arc::new(stop.drop_guard()),
        }
    }

    /// Rows received so far, repeats included.
    pub fn len(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Presence status messages received so far ([`Received::is_status`]).
    pub fn status(&self) -> Vec<Received> {
        self.status.lock().unwrap().clone()
    }

    /// Device events received so far ([`Received::is_device_event`]), repeats included.
    pub fn device_events(&self) -> Vec<Received> {
        self.device_events.lock().unwrap().clone()
    }

    /// Distinct message ids received so far.
    pub fn unique(&self) -> usize {
        let r = self.received.lock().unwrap();
        r.iter().map(|m| m.seq()).collect::<HashSet<_>>().len()
    }

    /// Waits until `n` distinct ids arrived; panics with the count after `timeout`.
    pub async fn wait_unique(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.unique();
            if got >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {got} of {n} distinct messages arrived within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` messages arrived (or `timeout` passed, without panicking: the
    /// caller checks the count), then 200 ms more so that extra (duplicate) messages
    /// would show; returns all received so far.
    pub async fn wait_settled(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        while self.len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.snapshot()
    }
}

/// Checks delivery: every expected seq arrived, per device the first arrivals are in seq
/// order; returns the number of duplicates.
pub fn check_delivery(
    received: &[Received],
    expected: usize,
    device_of: impl Fn(&Received) -> String,
) -> usize {
    check_delivery_with(received, expected, device_of, true)
}

/// As [`check_delivery`]; with `strict = false`, order is checked only among messages
/// that arrived exactly once. That is the guarantee when the upstream broker may still
/// route the tail of a dropped connection while the new one replays it (rumqttd's
/// session takeover is concurrent): those repeats may arrive out of place.
pub fn check_delivery_with(
    received: &[Received],
    expected: usize,
    device_of: impl Fn(&Received) -> String,
    strict: bool,
) -> usize {
    let mut count: HashMap<u64, usize> = HashMap::new();
    for m in received {
        *count.entry(m.seq()).or_default() += 1;
    }
    let mut seen = HashSet::new();
    let mut last_per_device: HashMap<String, u64> = HashMap::new();
    for m in received {
        let seq = m.seq();
        if !seen.insert(seq) || (!strict && count[&seq] > 1) {
            continue;
        }
        let device = device_of(m);
        if let Some(prev) = last_per_device.insert(device.clone(), seq) {
            assert!(
                prev < seq,
                "device {device}: seq {seq} arrived after {prev}"
            );
        }
    }
    assert_eq!(seen.len(), expected, "distinct messages");
    received.len() - seen.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(topic: &str) -> Received {
        Received {
            topic: topic.into(),
            id: Some("gw:0:1".into()),
            replayed: Some(false),
            payload: Vec::new(),
            retain: false,
            at: Instant::now(),
        }
    }

    #[test]
    fn device_events_are_told_from_readings_and_rule_events() {
        for topic in [
            "up/events/DeviceConnected/t-1",
            "site/gw/events/DeviceDisconnected/t-1",
        ] {
            assert!(received(topic).is_device_event(), "{topic}");
        }
        for topic in [
            "up/events/SensorTemperatureExceeded/t-1",
            "up/devices/DeviceConnected/telemetry",
            "up/events/DeviceConnected",
            "up/status",
        ] {
            assert!(!received(topic).is_device_event(), "{topic}");
        }
    }
}
