//! PATCH(gateway): remote clients' publishes handed straight to the application, with
//! their acknowledgements held until the application has stored them.
//!
//! With an [`IngestHook`] set on the broker ([`crate::Broker::set_ingest`]), every
//! connection task sends each PUBLISH it reads to the hook's bounded channel as an
//! [`Ingested`], besides handing it to the router for local subscribers as before. A QoS 1
//! or 2 publish carries a [`PendingAck`]: the client gets its PUBACK (QoS 1) or PUBREC
//! (QoS 2) only once the application calls [`PendingAck::release`].
//!
//! Invariants:
//! - acknowledgements leave in the order of the connection's publishes: releasing a
//!   publish's ack releases every earlier one of the same connection too, so the
//!   application must release them in the order it received them (it does, when one
//!   FIFO path carries them to its store);
//! - an ack dropped without [`PendingAck::release`] (the application could not store the
//!   publish) closes the connection without acknowledging it or anything after it, so
//!   the client keeps the message and sends it again when it reconnects;
//! - a full channel stops the connection from reading its socket until there is room:
//!   a client that publishes faster than the application stores is slowed down by TCP,
//!   never answered for a message that is then dropped;
//! - the router no longer acknowledges these publishes: the copy it gets is QoS 0 or
//!   QoS 1 with packet id 0 (patch 7), so local subscribers receive a QoS 2 publish at
//!   QoS 1 at most;
//! - QoS 2 is completed on the connection: a repeated PUBLISH with a packet id still
//!   waiting for its PUBREL is not handed over again, and the PUBREL is answered with a
//!   PUBCOMP in order behind the acks before it;
//! - MQTT 5 topic aliases are resolved here, before authorization and before the router,
//!   so the application and the authorizer always see the topic;
//! - the router gets only the publishes a subscription may want ([`Subscribed`]): a
//!   retained publish, or one whose topic matches a filter some client subscribed to. The
//!   others (device data nobody subscribes to locally, the common case) cost the router
//!   nothing, not even a wake-up;
//! - releases made on another thread wake their connections through the listener's
//!   [`AckRelay`]: one wake-up of the listener's runtime per batch of releases, not one
//!   per connection (waking a task from outside its runtime writes the runtime's eventfd
//!   each time).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::protocol::{
    matches, Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PublishProperties,
    QoS,
};

/// A PUBLISH from a remote client, as the application receives it.
#[derive(Debug)]
pub struct Ingested {
    /// The client id of the connection (after tenant prefixing and assignment).
    pub client_id: Arc<str>,
    /// The topic, with an MQTT 5 topic alias already resolved.
    pub topic: Bytes,
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
    /// PATCH(gateway): boxed, so that a slot of the ingest channel is small (most
    /// publishes have none, and the channel keeps the capacity its queue once reached).
    pub properties: Option<Box<PublishProperties>>,
    /// For QoS 1 and 2: the acknowledgement the client waits for.
    pub ack: Option<PendingAck>,
}

/// Where connections send their publishes; set with [`crate::Broker::set_ingest`].
#[derive(Clone)]
pub struct IngestHook {
    tx: flume::Sender<Ingested>,
    /// PATCH(gateway): called when a send leaves this many publishes waiting
    /// ([`IngestHook::wake_at`]).
    backlog: Option<(usize, Arc<dyn Fn() + Send + Sync>)>,
}

impl IngestHook {
    /// A hook whose channel holds at most `capacity` publishes, and its receiving end.
    pub fn bounded(capacity: usize) -> (IngestHook, flume::Receiver<Ingested>) {
        let (tx, rx) = flume::bounded(capacity);
        let hook = IngestHook { tx, backlog: None };
        (hook, rx)
    }

    /// PATCH(gateway): calls `wake` whenever a send leaves exactly `waiting` publishes in
    /// the channel, so that an application which lets a few publishes gather before it
    /// takes them (the gateway's store sleeps out its commit spacing) is woken early when
    /// a group's worth waits.
    pub fn wake_at(mut self, waiting: usize, wake: impl Fn() + Send + Sync + 'static) -> Self {
        self.backlog = Some((waiting, Arc::new(wake)));
        self
    }

    /// Waits for room in the channel; `false` when the application has gone.
    pub(crate) async fn send(&self, ingested: Ingested) -> bool {
        let sent = self.tx.send_async(ingested).await.is_ok();
        if let Some((waiting, wake)) = &self.backlog {
            if sent && self.tx.len() == *waiting {
                wake();
            }
        }
        sent
    }
}

/// The filters the router keeps a log for (every filter ever subscribed to, and the
/// initialized ones), shared with the connections so they hand the router only what a
/// subscription may want. The router adds a filter before it serves the subscription,
/// and filters are never removed, so a publish the check skips matches no subscription.
#[derive(Clone, Default)]
pub struct Subscribed(Arc<RwLock<Filters>>);

#[derive(Default)]
struct Filters {
    /// By first topic level, for filters that start with a literal level. PATCH(gateway):
    /// hashed with aHash under a per-process random key, not SipHash: looked up for every
    /// publish (PATCHES.md, 37).
    by_first: HashMap<String, Vec<String>, ahash::RandomState>,
    /// Filters that start with a wildcard.
    wild: Vec<String>,
}

impl Subscribed {
    /// Called by the router when it creates the log of a filter (public for tests).
    pub fn insert(&self, filter: &str) {
        let mut filters = self.0.write().unwrap_or_else(|e| e.into_inner());
        match filter.split('/').next().unwrap_or("") {
            "+" | "#" => filters.wild.push(filter.to_owned()),
            first => filters
                .by_first
                .entry(first.to_owned())
                .or_default()
                .push(filter.to_owned()),
        }
    }

    /// Whether any subscribed filter matches `topic`.
    pub fn may_match(&self, topic: &str) -> bool {
        let filters = self.0.read().unwrap_or_else(|e| e.into_inner());
        let first = topic.split('/').next().unwrap_or("");
        filters.wild.iter().any(|f| matches(topic, f))
            || filters
                .by_first
                .get(first)
                .is_some_and(|fs| fs.iter().any(|f| matches(topic, f)))
    }
}

/// The acknowledgement of one publish, held until [`PendingAck::release`].
#[derive(Debug)]
pub struct PendingAck {
    acks: Arc<AckState>,
    seq: u64,
    released: bool,
}

impl PendingAck {
    /// The publish is stored: the client may have its acknowledgement (and those of
    /// every earlier publish of its connection).
    pub fn release(mut self) {
        self.released = true;
        self.acks.released.fetch_max(self.seq, Ordering::AcqRel);
        match &self.acks.relay {
            // Already queued for a wake-up that has not happened yet: it will see this
            // release too (the relay clears `queued` before it wakes the connection).
            Some(relay) => {
                if !self.acks.queued.swap(true, Ordering::AcqRel) {
                    relay.push(self.acks.clone());
                }
            }
            None => self.acks.notify.notify_one(),
        }
    }
}

impl Drop for PendingAck {
    fn drop(&mut self) {
        if !self.released {
            self.acks.refused.store(true, Ordering::Release);
            self.acks.notify.notify_one();
        }
    }
}

/// What a connection and the application share about its held acks.
#[derive(Debug, Default)]
struct AckState {
    /// The highest released sequence number.
    released: AtomicU64,
    /// Set when an ack was dropped unreleased.
    refused: AtomicBool,
    notify: Arc<Notify>,
    /// PATCH(gateway): wakes the connection from its own runtime; `None`: releases
    /// notify it directly.
    relay: Option<AckRelay>,
    /// Set while the connection waits in the relay's queue.
    queued: AtomicBool,
}

/// PATCH(gateway): wakes the connections of one listener for releases made on other
/// threads (the application's store), from a task on the listener's own runtime.
///
/// A task woken from outside its current-thread runtime costs a write to the runtime's
/// eventfd, for every wake-up: releasing the acks of one group commit, which holds
/// readings of many devices, made as many writes (10,800 a second at 1000 devices x 10
/// readings/s). Through the relay a batch of releases costs one, and the relay's task
/// wakes each connection locally.
///
/// Invariant: a connection pushed is woken after the push, however the push and the
/// relay's turns interleave: every push notifies the relay after it is queued, and a
/// notification while the relay is busy leaves a permit for its next turn. Only a
/// notification that finds the relay waiting wakes the runtime, so a batch of releases
/// costs one wake-up.
#[derive(Clone, Debug, Default)]
#[doc(hidden)] // public for the gateway's tests (`gateway/tests/held_acks.rs`)
pub struct AckRelay(Arc<RelayShared>);

#[derive(Debug, Default)]
struct RelayShared {
    queue: Mutex<Vec<Arc<AckState>>>,
    wake: Notify,
}

impl AckRelay {
    fn push(&self, acks: Arc<AckState>) {
        self.0
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(acks);
        self.0.wake.notify_one();
    }

    /// The relay's task; spawn it on the runtime of the connections it serves.
    pub async fn run(self) {
        let mut batch = Vec::new();
        loop {
            self.0.wake.notified().await;
            std::mem::swap(
                &mut *self.0.queue.lock().unwrap_or_else(|e| e.into_inner()),
                &mut batch,
            );
            for acks in batch.drain(..) {
                acks.queued.swap(false, Ordering::AcqRel);
                acks.notify.notify_one();
            }
        }
    }
}

/// An acknowledgement waiting to be sent.
#[derive(Debug)]
enum Held {
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
}

impl Held {
    fn packet(self) -> Packet {
        match self {
            Held::PubAck(pkid) => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ),
            Held::PubRec(pkid) => Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            ),
            Held::PubComp(pkid) => Packet::PubComp(
                PubComp {
                    pkid,
                    reason: PubCompReason::Success,
                },
                None,
            ),
        }
    }
}

/// An ack was dropped without being released: the connection must close.
#[derive(Debug)]
pub struct NotStored;

/// A connection's side: which acks wait for which release, QoS 2 packet ids awaiting
/// their PUBREL, and the client's topic aliases.
#[doc(hidden)] // public for the gateway's tests (`gateway/tests/held_acks.rs`)
pub struct HeldAcks {
    hook: IngestHook,
    /// `None`: every publish goes to the router.
    subscribed: Option<Subscribed>,
    client_id: Arc<str>,
    state: Arc<AckState>,
    /// The sequence number given to the last held ack; 0 before the first.
    last_seq: u64,
    /// In the order they must be sent, each with the sequence number that releases it.
    waiting: VecDeque<(u64, Held)>,
    /// QoS 2 packet ids handed over and not yet released by a PUBREL.
    qos2: HashSet<u16>,
    aliases: HashMap<u16, Bytes>,
    /// PATCH(gateway): the client's own SUBSCRIBEs the router has not acknowledged yet.
    /// Until it has, the filter may not be in [`Subscribed`], so every publish goes to
    /// the router: a client that subscribes and then publishes on that topic (in one
    /// network read, or before the SUBACK) gets its own message.
    subscribing: usize,
}

impl HeldAcks {
    pub fn new(hook: IngestHook, subscribed: Option<Subscribed>, client_id: &str) -> HeldAcks {
        HeldAcks::relayed(hook, subscribed, client_id, None)
    }

    /// PATCH(gateway): releases wake the connection through `relay` (see [`AckRelay`]).
    pub fn relayed(
        hook: IngestHook,
        subscribed: Option<Subscribed>,
        client_id: &str,
        relay: Option<AckRelay>,
    ) -> HeldAcks {
        HeldAcks {
            hook,
            subscribed,
            client_id: client_id.into(),
            state: Arc::new(AckState {
                relay,
                ..AckState::default()
            }),
            last_seq: 0,
            waiting: VecDeque::new(),
            qos2: HashSet::new(),
            aliases: HashMap::new(),
            subscribing: 0,
        }
    }

    /// Resolves an MQTT 5 topic alias in place (recording a new one); a publish with an
    /// unknown alias keeps its empty topic (the authorizer refuses it).
    pub fn resolve_alias(&mut self, packet: &mut Packet) {
        let Packet::Publish(publish, Some(props)) = packet else {
            return;
        };
        let Some(alias) = props.topic_alias else {
            return;
        };
        if publish.topic.is_empty() {
            if let Some(topic) = self.aliases.get(&alias) {
                publish.topic = topic.clone();
            }
        } else {
            self.aliases.insert(alias, publish.topic.clone());
        }
        if !publish.topic.is_empty() {
            props.topic_alias = None;
        }
    }

    /// Takes the packets of one network read that the application handles: returns
    /// what to send to the hook, and leaves in `packets` what the router still gets (a
    /// publish with its acknowledgement taken away).
    pub fn take(&mut self, packets: &mut Vec<Packet>) -> Vec<Ingested> {
        let mut ingested = Vec::new();
        self.take_into(packets, &mut ingested);
        ingested
    }

    /// PATCH(gateway): [`HeldAcks::take`] into `ingested` (appended to), so that a
    /// connection hands every read's publishes over through one buffer it keeps, not a
    /// new one per read (PATCHES.md, 36).
    pub fn take_into(&mut self, packets: &mut Vec<Packet>, ingested: &mut Vec<Ingested>) {
        packets.retain_mut(|packet| match packet {
            // An unknown topic alias: the router refuses it and disconnects the client.
            Packet::Publish(publish, _) if publish.topic.is_empty() => true,
            Packet::Publish(publish, props) => {
                let ack = match publish.qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(self.hold(Held::PubAck(publish.pkid))),
                    QoS::ExactlyOnce => {
                        if !self.qos2.insert(publish.pkid) {
                            // A repeat of a publish already handed over: only its
                            // PUBREC again, behind everything before it.
                            self.waiting
                                .push_back((self.last_seq, Held::PubRec(publish.pkid)));
                            return false;
                        }
                        Some(self.hold(Held::PubRec(publish.pkid)))
                    }
                };
                ingested.push(Ingested {
                    client_id: self.client_id.clone(),
                    topic: publish.topic.clone(),
                    payload: publish.payload.clone(),
                    qos: publish.qos as u8,
                    retain: publish.retain,
                    properties: props.clone().map(Box::new),
                    ack,
                });
                if publish.qos != QoS::AtMostOnce {
                    // Stored by the router as QoS 1 and not acknowledged (patch 7).
                    publish.qos = QoS::AtLeastOnce;
                    publish.pkid = 0;
                }
                publish.retain
                    || self.subscribing > 0
                    || self.subscribed.as_ref().is_none_or(|s| {
                        std::str::from_utf8(&publish.topic).is_ok_and(|t| s.may_match(t))
                    })
            }
            Packet::Subscribe(..) => {
                self.subscribing += 1;
                true
            }
            Packet::PubRel(pubrel, _) if self.qos2.remove(&pubrel.pkid) => {
                self.waiting
                    .push_back((self.last_seq, Held::PubComp(pubrel.pkid)));
                false
            }
            _ => true,
        });
    }

    fn hold(&mut self, ack: Held) -> PendingAck {
        self.last_seq += 1;
        self.waiting.push_back((self.last_seq, ack));
        PendingAck {
            acks: self.state.clone(),
            seq: self.last_seq,
            released: false,
        }
    }

    /// PATCH(gateway): the router acknowledged `count` of the client's SUBSCRIBEs (the
    /// SUBACKs about to be written to it): their filters are in [`Subscribed`] now.
    pub fn subscriptions_acknowledged(&mut self, count: usize) {
        self.subscribing = self.subscribing.saturating_sub(count);
    }

    /// Sends one read's publishes to the application, waiting for room; `false` when
    /// the application has gone. `ingested` is left empty either way (with its room:
    /// PATCH(gateway), PATCHES.md 36); the publishes not sent are dropped, which refuses
    /// their acks.
    pub async fn hand_over(&self, ingested: &mut Vec<Ingested>) -> bool {
        for i in ingested.drain(..) {
            if !self.hook.send(i).await {
                return false;
            }
        }
        true
    }

    /// Notified when a release or a refusal may have happened (then see
    /// [`HeldAcks::ready`]). The connection keeps one `notified()` future across the turns
    /// of its loop, rather than registering a new one for every packet it reads.
    pub fn signal(&self) -> Arc<Notify> {
        self.state.notify.clone()
    }

    /// The acknowledgements that may be sent now, in order; the ones waiting for a
    /// release stay. `Err` once any ack was dropped unreleased.
    pub fn ready(&mut self) -> Result<VecDeque<Packet>, NotStored> {
        Ok(self.take_ready()?.collect())
    }

    /// PATCH(gateway): [`HeldAcks::ready`] as an iterator that takes each ack out as it
    /// is read, so the connection encodes them straight into its write buffer
    /// (`Network::buffer`): no queue of packets allocated and freed per release (about
    /// 2% of the gateway's CPU at 1000 devices x 10 readings/s; PATCHES.md, 35). The acks
    /// the iterator was not advanced over stay, in order.
    pub fn take_ready(&mut self) -> Result<impl Iterator<Item = Packet> + '_, NotStored> {
        if self.state.refused.load(Ordering::Acquire) {
            return Err(NotStored);
        }
        let released = self.state.released.load(Ordering::Acquire);
        Ok(std::iter::from_fn(move || {
            let (seq, _) = self.waiting.front()?;
            if *seq > released {
                return None;
            }
            self.waiting.pop_front().map(|(_, ack)| ack.packet())
        }))
    }

    /// PATCH(gateway): the client's QoS 1 and 2 publishes not yet completed from the
    /// broker's side: no PUBACK, or no PUBCOMP, sent yet (what MQTT 5 Receive Maximum
    /// bounds, section 4.9; the client counts each until it has *received* the ack, so
    /// never fewer).
    pub fn unacknowledged(&self) -> usize {
        let held = self
            .waiting
            .iter()
            .filter(|(_, ack)| matches!(ack, Held::PubAck(_) | Held::PubComp(_)))
            .count();
        held + self.qos2.len()
    }
}

// PATCH(gateway): PATCHES.md, 37.
#[cfg(test)]
mod subscribed_tests {
    use super::Subscribed;

    #[test]
    fn a_publish_may_match_the_filters_of_its_first_level_and_the_wildcard_ones() {
        let subscribed = Subscribed::default();
        assert!(!subscribed.may_match("devices/d-1/telemetry"));
        subscribed.insert("devices/+/telemetry");
        subscribed.insert("commands/d-1/#");
        assert!(subscribed.may_match("devices/d-1/telemetry"));
        assert!(!subscribed.may_match("devices/d-1/status"));
        assert!(subscribed.may_match("commands/d-1/reboot"));
        assert!(!subscribed.may_match("other/d-1/telemetry"));
        subscribed.insert("+/d-2/#");
        assert!(subscribed.may_match("other/d-2/x"));
        assert!(!subscribed.may_match("other/d-3/x"));
    }
}
