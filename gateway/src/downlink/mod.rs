//! The downlink: commands from upstream to devices, durable until the device has them.
//!
//! Reads commands the forwarder received upstream on `{prefix}/{downlink.upstream_topic}`
//! ([`UpstreamCommand`]), and QoS 1 rule actions on a device's command topic
//! ([`ActionQueue`], with no upstream ack to send), and the embedded broker's reports of device subscriptions and
//! PUBACKs (`rumqttd::DownlinkEvent`, `vendor/rumqttd/src/link/downlink.rs`). Writes the
//! per-device queue through the store (`store/commands.rs`, which also appends each
//! command's status message to the outbox) and delivers commands on the device's own
//! connection at `downlink.device_topic`.
//!
//! Invariants:
//! - a command is acknowledged upstream only after its commit (the forwarder's session
//!   uses manual acks; the ack runs as the commit's `on_commit`);
//! - a device is the client whose client id is the device id; it gets its commands once
//!   it has subscribed, on its current connection, to a filter matching their topic;
//! - per device, one command in flight at a time, in queue order (among the commands its
//!   filters match): the next one goes out after the PUBACK of the one before;
//! - a command leaves the queue on its device's PUBACK (`delivered`, from whichever
//!   connection of the device sent it), at its expiry (`expired`: the upstream message's
//!   MQTT 5 message expiry, else `downlink.ttl`; checked before each delivery and every
//!   [`SWEEP_INTERVAL`]), or by the bound (`dropped`, in the store). A command delivered
//!   but not acked when the connection ends is delivered again (at least once);
//! - removals this process asked for but that may not be committed yet are remembered
//!   (`done`), so a read of the queue does not deliver them again.

pub mod topic;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::PublishProperties;
use rumqttd::{DownlinkEvent, DownlinkMessage, DownlinkSender};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
pub use crate::forwarder::UpstreamCommand;
use crate::reading::{now_millis, Millis};
use crate::store::{CommandState, OnCommit, QueuedCommand, StoreHandle};

pub use topic::CommandTopic;

/// How often queued commands are checked for expiry (and idle deliveries retried).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Queued commands read at once, per device or for a sweep.
const READ_LIMIT: usize = 100_000;

/// The downlink's settings: the `[downlink]` section with the upstream prefix.
#[derive(Debug, Clone)]
pub struct DownlinkConfig {
    pub gateway_id: String,
    /// `upstream.topic_prefix`, filled in.
    pub prefix: String,
    pub upstream_topic: CommandTopic,
    pub device_topic: CommandTopic,
    pub ttl: Duration,
}

impl DownlinkConfig {
    pub fn from_config(config: &Config) -> DownlinkConfig {
        DownlinkConfig {
            gateway_id: config.gateway.id.clone(),
            prefix: config.upstream_prefix(),
            upstream_topic: config.downlink.upstream_topic.clone(),
            device_topic: config.downlink.device_topic.clone(),
            ttl: config.downlink.ttl,
        }
    }

    /// The upstream subscription filter of commands.
    pub fn upstream_filter(&self) -> String {
        crate::forwarder::upstream_topic(&self.prefix, &self.upstream_topic.filter())
    }
}

/// How rule actions join the command queue: an action at QoS 1 on a device's command
/// topic (`downlink.device_topic`) is queued like a command from upstream, so a device
/// that is offline gets it when it connects and subscribes.
#[derive(Clone)]
pub struct ActionQueue {
    cfg: DownlinkConfig,
    commands: mpsc::UnboundedSender<UpstreamCommand>,
}

impl ActionQueue {
    pub fn new(cfg: DownlinkConfig, commands: mpsc::UnboundedSender<UpstreamCommand>) -> Self {
        ActionQueue { cfg, commands }
    }

    /// Queues `payload` for the device when `topic` is one of its command topics, with
    /// `id` as the command's id; false when it is not (or the downlink has stopped).
    pub fn queue(&self, topic: &str, payload: &str, id: String) -> bool {
        let Some((device, command)) = self.cfg.device_topic.parse_topic(topic) else {
            return false;
        };
        let upstream = self.cfg.upstream_topic.fill(device, command);
        self.commands
            .send(UpstreamCommand {
                topic: crate::forwarder::upstream_topic(&self.cfg.prefix, &upstream),
                payload: payload.as_bytes().to_vec(),
                correlation_data: Some(id.into_bytes()),
                message_expiry: None,
                content_type: None,
                user_properties: Vec::new(),
                // Nothing upstream waits for it.
                ack: Box::new(|| {}),
            })
            .is_ok()
    }
}

/// Live counters of the downlink (the queue's own are the store's `commands.*`).
#[derive(Debug, Default)]
pub struct DownlinkStats {
    /// Commands received upstream on a topic that names no device and command (acked
    /// and dropped).
    pub unroutable: AtomicU64,
    /// Commands written to a device connection (repeats included).
    pub sent: AtomicU64,
}

/// A device's current connection, once it has subscribed.
struct Attached {
    generation: u64,
    filters: Vec<String>,
    connection: DownlinkSender,
    /// The seq of the command written and not yet acked.
    in_flight: Option<u64>,
}

/// The downlink stage; build it with [`Downlink::new`], drive it with [`Downlink::run`].
pub struct Downlink {
    cfg: DownlinkConfig,
    store: StoreHandle,
    commands: mpsc::UnboundedReceiver<UpstreamCommand>,
    broker: flume::Receiver<DownlinkEvent>,
    stats: Arc<DownlinkStats>,
    attached: HashMap<String, Attached>,
    /// Per device, the seqs whose removal was asked for and may not be committed yet.
    done: HashMap<String, HashSet<u64>>,
    committed_tx: mpsc::UnboundedSender<String>,
    committed_rx: mpsc::UnboundedReceiver<String>,
}

impl Downlink {
    pub fn new(
        cfg: DownlinkConfig,
        store: StoreHandle,
        commands: mpsc::UnboundedReceiver<UpstreamCommand>,
        broker: flume::Receiver<DownlinkEvent>,
    ) -> Downlink {
        let (committed_tx, committed_rx) = mpsc::unbounded_channel();
        Downlink {
            cfg,
            store,
            commands,
            broker,
            stats: Arc::default(),
            attached: HashMap::new(),
            done: HashMap::new(),
            committed_tx,
            committed_rx,
        }
    }

    pub fn stats(&self) -> Arc<DownlinkStats> {
        self.stats.clone()
    }

    /// Runs until `stop` is cancelled or both inputs have closed.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.queue(cmd),
                    None => return,
                },
                ev = self.broker.recv_async() => match ev {
                    Ok(ev) => self.broker_event(ev),
                    Err(_) => return,
                },
                Some(device) = self.committed_rx.recv() => self.deliver(&device),
                _ = sweep.tick() => self.sweep(),
            }
        }
    }

    /// Queues a command received upstream; its upstream ack runs after the commit.
    fn queue(&mut self, cmd: UpstreamCommand) {
        let relative = cmd
            .topic
            .strip_prefix(&self.cfg.prefix)
            .map(|t| t.trim_start_matches('/'))
            .unwrap_or(&cmd.topic);
        let Some((device, command)) = self.cfg.upstream_topic.parse_topic(relative) else {
            self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %cmd.topic, "Command on a topic without device and command; acknowledged and dropped.");
            (cmd.ack)();
            return;
        };
        let now = now_millis();
        let lifetime = cmd
            .message_expiry
            .map_or(self.cfg.ttl, |s| Duration::from_secs(s.into()));
        let id = match &cmd.correlation_data {
            Some(c) => String::from_utf8(c.clone()).unwrap_or_else(|_| hex::encode(c)),
            None => format!("{}:cmd:{:016x}", self.cfg.gateway_id, rand::random::<u64>()),
        };
        let queued = QueuedCommand {
            seq: 0,
            device: device.to_owned(),
            command: command.to_owned(),
            id,
            status_topic: format!("{relative}/status"),
            payload: cmd.payload,
            content_type: cmd.content_type,
            user_properties: cmd.user_properties,
            queued_at: now,
            expires_at: now.saturating_add(lifetime.as_millis().min(i64::MAX as u128) as Millis),
        };
        let committed = self.committed_tx.clone();
        let device = device.to_owned();
        let ack = cmd.ack;
        let on_commit: OnCommit = Box::new(move || {
            ack();
            let _ = committed.send(device);
        });
        self.store.queue_command(queued, Some(on_commit));
    }

    fn broker_event(&mut self, ev: DownlinkEvent) {
        match ev {
            DownlinkEvent::Subscribed {
                client_id,
                generation,
                filters,
                connection,
            } => {
                let device = client_id.to_string();
                match self.attached.get_mut(&device) {
                    Some(a) if a.generation == generation => a.filters.extend(filters),
                    _ => {
                        self.attached.insert(
                            device.clone(),
                            Attached {
                                generation,
                                filters,
                                connection,
                                in_flight: None,
                            },
                        );
                    }
                }
                self.deliver(&device);
            }
            DownlinkEvent::Acked { client_id, id, .. } => {
                let device = client_id.to_string();
                self.finish(&device, id, CommandState::Delivered);
                if let Some(a) = self.attached.get_mut(&device) {
                    if a.in_flight == Some(id) {
                        a.in_flight = None;
                    }
                }
                self.deliver(&device);
            }
        }
    }

    /// Asks the store to remove a command as `state`, and skips it from now on.
    fn finish(&mut self, device: &str, seq: u64, state: CommandState) {
        if self.done.entry(device.to_owned()).or_default().insert(seq) {
            self.store.command_done(device, seq, state);
        }
    }

    /// Sends `device` its next command, unless it has one in flight or none is due.
    fn deliver(&mut self, device: &str) {
        let Some(a) = self.attached.get(device) else {
            return;
        };
        if !a.connection.is_connected() {
            self.attached.remove(device);
            return;
        }
        if a.in_flight.is_some() {
            return;
        }
        let queue = match self.store.pending_commands(Some(device), READ_LIMIT) {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(device, error = %e, "Reading the command queue failed; retrying.");
                return;
            }
        };
        let now = now_millis();
        let done = self.done.entry(device.to_owned()).or_default();
        done.retain(|seq| queue.iter().any(|c| c.seq == *seq));
        let mut expired = Vec::new();
        let mut next = None;
        for cmd in queue.into_iter().filter(|c| !done.contains(&c.seq)) {
            if cmd.expires_at <= now {
                expired.push(cmd.seq);
                continue;
            }
            let topic = self.cfg.device_topic.fill(device, &cmd.command);
            if a.filters
                .iter()
                .any(|f| rumqttd::protocol::matches(&topic, f))
            {
                next = Some((cmd, topic));
                break;
            }
        }
        for seq in expired {
            self.finish(device, seq, CommandState::Expired);
        }
        let Some((cmd, topic)) = next else { return };
        let seq = cmd.seq;
        let message = DownlinkMessage {
            id: seq,
            topic,
            payload: cmd.payload.into(),
            properties: properties(cmd.content_type, cmd.user_properties),
        };
        let Some(a) = self.attached.get_mut(device) else {
            return;
        };
        if a.connection.send(message) {
            a.in_flight = Some(seq);
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.attached.remove(device);
        }
    }

    /// Expires what is due in every queue (but a command in flight), and retries idle
    /// deliveries.
    fn sweep(&mut self) {
        self.attached.retain(|_, a| a.connection.is_connected());
        let now = now_millis();
        match self.store.pending_commands(None, READ_LIMIT) {
            Ok(queue) => {
                self.done.retain(|device, seqs| {
                    seqs.retain(|s| queue.iter().any(|c| c.seq == *s && &c.device == device));
                    !seqs.is_empty()
                });
                let due: Vec<(String, u64)> = queue
                    .into_iter()
                    .filter(|c| c.expires_at <= now)
                    .filter(|c| {
                        self.attached.get(&c.device).and_then(|a| a.in_flight) != Some(c.seq)
                    })
                    .map(|c| (c.device, c.seq))
                    .collect();
                for (device, seq) in due {
                    self.finish(&device, seq, CommandState::Expired);
                }
            }
            Err(e) => tracing::debug!(error = %e, "Reading the command queues failed."),
        }
        let devices: Vec<String> = self.attached.keys().cloned().collect();
        for device in devices {
            self.deliver(&device);
        }
    }
}

/// The MQTT 5 properties a device gets with a command: the upstream message's content
/// type and user properties.
fn properties(
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
) -> Option<PublishProperties> {
    (content_type.is_some() || !user_properties.is_empty()).then(|| PublishProperties {
        content_type,
        user_properties,
        ..Default::default()
    })
}
