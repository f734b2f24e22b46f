//! The connection half of a device: drives the rumqttc event loop.
//!
//! Input: the device's event loop, [`Control`] messages from its publisher, and the
//! commands published to the device. Output: the fleet's counters (connects, sent, acked,
//! dropped, errors, commands), the device's connected flag and its [`Switches`].
//!
//! Invariants:
//! - `EventLoop::poll` is never raced against the publish timer (a cancelled poll can
//!   lose a half-written packet): the publisher is another task;
//! - after a connection error the driver backs off (exponential, with jitter) before
//!   the next poll reconnects;
//! - every publish is accounted for at the end: acked (QoS 1) or sent (QoS 0), or
//!   dropped from the queue on a disconnect, or still outstanding when the drain grace
//!   ran out;
//! - a device with switches subscribes to its command topics (QoS 1) after every ConnAck,
//!   since its session is clean; a command sets the switch it names.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, Outgoing, QoS, Request};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::commands::{parse_on, switch_of};
use crate::model::Switches;
use crate::stats::Counters;

/// Wait before the first reconnect after a connection error.
const BACKOFF_MIN: Duration = Duration::from_millis(400);
/// Longest wait between two reconnects.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Messages from a device's publisher to its driver.
pub(super) enum Control {
    /// Drop the connection now; connect again at the instant given.
    Disconnect { until: Instant },
    /// No more publishes: `published` in total; drain and disconnect.
    Finish { published: u64 },
}

/// The connection half of a device: drives the event loop.
pub(super) struct Driver {
    pub device: String,
    /// Topics to subscribe to after each ConnAck (empty: none).
    pub commands: Vec<String>,
    pub switches: Arc<Switches>,
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub ctrl: mpsc::Receiver<Control>,
    pub connected: watch::Sender<bool>,
    pub counters: Arc<Counters>,
    pub qos: QoS,
    pub drain: Duration,
    pub shutdown: CancellationToken,
    pub rng: SmallRng,
}

/// The wait before reconnect `attempt` (1 is the first): `BACKOFF_MIN * 2^(attempt-1)`,
/// at most [`BACKOFF_MAX`], with equal jitter (a random point in the upper half). The
/// same shape as the gateway's `Backoff::delay`, drawn from the device's seeded `rng` so
/// a run repeats.
fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = BACKOFF_MIN
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(BACKOFF_MAX);
    let half = ceiling / 2;
    half + rng.random_range(Duration::ZERO..=half)
}

impl Driver {
    pub async fn run(mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.counters.clone();
        let (mut sent, mut acked, mut dropped) = (0u64, 0u64, 0u64);
        let mut finish: Option<(u64, Instant)> = None;
        let mut failures = 0u32;
        let mut disconnecting = false;
        // Subscriptions still to ask for on this connection.
        let mut subscribe = false;
        loop {
            if subscribe {
                subscribe = !self.subscribe_commands();
            }
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
                    Some(Control::Disconnect { until }) => {
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
                        subscribe = !self.commands.is_empty();
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => self.command(&p.topic, &p.payload),
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
                        let backoff = backoff(failures, &mut self.rng);
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

    /// Asks for the command subscriptions; false when the client's queue is full (the
    /// caller tries again after the next event).
    fn subscribe_commands(&self) -> bool {
        let filters = self
            .commands
            .iter()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        self.client.try_subscribe_many(filters).is_ok()
    }

    /// Applies a command published to this device.
    fn command(&self, topic: &str, payload: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        let applied = switch_of(&self.device, topic)
            .zip(parse_on(payload))
            .is_some_and(|(switch, on)| self.switches.set(switch, on));
        let counter = if applied {
            &self.counters.commands
        } else {
            &self.counters.commands_ignored
        };
        counter.fetch_add(1, Relaxed);
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

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn reconnects_back_off_with_jitter_up_to_the_maximum() {
        let mut rng = SmallRng::seed_from_u64(1);
        for attempt in 1..10 {
            let cap = (BACKOFF_MIN * (1 << (attempt - 1))).min(BACKOFF_MAX);
            for _ in 0..20 {
                let d = backoff(attempt, &mut rng);
                assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?}");
            }
        }
    }
}
