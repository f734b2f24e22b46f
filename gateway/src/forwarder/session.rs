//! The `Online` state: one upstream connection from ConnAck to its first error.
//!
//! Owns the in-flight window of that connection: what was sent and awaits a packet id
//! (`awaiting_pkid`, FIFO), what awaits a PUBACK (`by_pkid`), the read cursors per lane and
//! the rows read but not yet sent. All of it is dropped with the connection: the next
//! session replays from the outbox.
//!
//! After the ConnAck the session subscribes to the downlink's command filter (when there
//! is a downlink) and hands every incoming publish to it ([`Wire::Command`]); those are not
//! entries of the packet-id FIFO (their PUBACKs are the gateway's, sent after the commit).
//!
//! The session also announces the gateway's presence (`presence.rs`): the retained `online`
//! status first thing after the ConnAck, before any row, and the retained `offline` status
//! at a clean stop, once the rows in flight are acked or the grace is over. Both are
//! [`InFlight::Status`] entries of the packet-id FIFO, so the rows' correlation is unchanged.
//!
//! The session is the same for both MQTT versions: it sees the connection's events as
//! [`Wire`] events and publishes through [`Client`]. The one difference is the message:
//! MQTT 5 carries the row's id, replay flag and content type as properties, MQTT 3.1.1 in
//! an envelope around the payload (`encode::envelope`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use smallvec::SmallVec;
use tokio_util::sync::CancellationToken;

use super::client::{AckOutcome, Client, Events, PumpEvent, Wire};
use super::encode::{self, Family};
use super::presence::Status;
use super::{Forwarder, State};
use crate::config::UpstreamProtocol;
use crate::hashing::FastHashMap;
use crate::reading::now_millis;
use crate::store::{ByLane, Lane, OutboxRow};

/// Rows read from the outbox per read transaction.
pub(super) const READ_CHUNK: usize = 1024;
/// Room the row buffers keep once the outbox is drained: a few commits' rows at 1000
/// devices x 10/s. A backlog's reads fill them with up to [`READ_CHUNK`] rows each; that
/// room is not held after the burst that needed it.
const ROWS_KEEP: usize = 64;
/// How often to look again while too many acks wait for their commit.
const ACK_COMMIT_POLL: Duration = Duration::from_millis(2);
/// Events handled per wake-up before acks are handed to the store.
const EVENTS_PER_TURN: usize = 2048;
/// Longest wait at a clean stop for the PUBACK of the `offline` status; the forwarder's
/// `shutdown_grace` when that is shorter.
pub(super) const OFFLINE_ACK_WAIT: Duration = Duration::from_secs(1);

/// The seqs of one publish: one row, or a batch's (no allocation for one).
type Seqs = SmallVec<[u64; 1]>;

/// One upstream publish in flight: the rows it carries.
struct Sent {
    lane: Lane,
    seqs: Seqs,
    received_at: i64,
}

/// One publish of this connection awaiting its packet id or its PUBACK.
enum InFlight {
    Rows(Sent),
    /// A presence message: acked by the upstream, it concerns no outbox row.
    Status(Status),
}

/// Why filling the window cannot go on.
#[derive(Debug)]
enum Halt {
    Store,
    Connection,
}

/// Why filling the window stopped.
enum Idle {
    WindowFull,
    NoRows,
    Wait(Duration),
}

/// Token bucket for the replay rate limit.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 20.0).max(1.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens, or says how long until they are there.
    fn take(&mut self, n: usize) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        let n = (n as f64).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / self.rate))
        }
    }
}

/// Events first: they drain before readings.
const DRAIN_ORDER: [Lane; 2] = [Lane::Event, Lane::Reading];

pub(super) struct Session<'a> {
    fwd: &'a Forwarder,
    client: &'a Client,
    /// Publishes allowed in flight on this connection.
    window: usize,
    /// `{gateway_id}:{epoch}`: every message id starts with it.
    id_prefix: String,
    qos: QoS,
    /// Rows with `seq <= replay_until` were in the outbox when this connection came up.
    replay_until: u64,
    /// Next seq to read per lane.
    next_seq: ByLane<u64>,
    buffered: ByLane<VecDeque<OutboxRow>>,
    /// The last read of the lane came back short: wait for new rows before reading again.
    exhausted: ByLane<bool>,
    awaiting_pkid: VecDeque<InFlight>,
    by_pkid: FastHashMap<u16, InFlight>,
    acks: ByLane<Vec<u64>>,
    /// The presence status the upstream acked last on this connection.
    acked_status: Option<Status>,
    bucket: Option<Bucket>,
    linger_since: Option<Instant>,
    scratch: Vec<OutboxRow>,
    /// Where the topics and MQTT 5 properties of the publishes are encoded
    /// ([`encode::upstream_topic_in`], [`encode::properties`]).
    encoded: BytesMut,
}

impl<'a> Session<'a> {
    pub(super) fn new(fwd: &'a Forwarder, client: &'a Client, window: usize) -> Self {
        Session {
            fwd,
            client,
            window,
            id_prefix: encode::id_prefix(&fwd.cfg.gateway_id, fwd.store.epoch()),
            qos: fwd.cfg.mqtt_qos(),
            replay_until: 0,
            next_seq: ByLane::default(),
            buffered: ByLane::default(),
            exhausted: ByLane::default(),
            awaiting_pkid: VecDeque::new(),
            by_pkid: FastHashMap::default(),
            acks: ByLane::default(),
            acked_status: None,
            bucket: fwd.cfg.rate_limit_per_sec.map(Bucket::new),
            linger_since: None,
            scratch: Vec::new(),
            encoded: BytesMut::new(),
        }
    }

    fn in_flight(&self) -> usize {
        self.awaiting_pkid.len() + self.by_pkid.len()
    }

    pub(super) async fn run(mut self, events: &mut Events, shutdown: &CancellationToken) -> State {
        // What was committed when the connection came up is the backlog; rows committed
        // from now on (also during the flush below) are live.
        self.replay_until = self.fwd.store.last_committed_seq();
        // First in the FIFO, before any row: consumers learn at once that the gateway is up.
        if self.announce(Status::Online).is_err() {
            return self.lost();
        }
        if let Some((filter, _)) = &self.fwd.downlink {
            if self.client.try_subscribe(filter.clone()).is_err() {
                return self.lost();
            }
        }
        // Acks of the previous connection must be committed before replaying, or rows acked
        // upstream would be sent again. While the storage is unavailable the flush fails and
        // the acks wait in the store's memory: replay anyway (repeats, never a loss).
        match self.fwd.store.flush().await {
            Ok(()) | Err(crate::store::StoreError::CommitFailed) => {}
            Err(_) => return self.stop(events).await,
        }
        let mut grace_until: Option<tokio::time::Instant> = None;
        loop {
            let idle = if grace_until.is_some() {
                Idle::NoRows
            } else {
                match self.fill() {
                    Ok(idle) => idle,
                    // The event loop of this connection ended (its error is on the way).
                    Err(Halt::Connection) => return self.lost(),
                    // The store is closed: nothing more can be done.
                    Err(Halt::Store) => return self.stop(events).await,
                }
            };
            if let Some(until) = grace_until {
                if self.in_flight() == 0 || tokio::time::Instant::now() >= until {
                    return self.stop(events).await;
                }
            }
            let wait = match idle {
                Idle::Wait(d) => d,
                _ => Duration::from_secs(3600),
            };
            let want_rows = !matches!(idle, Idle::WindowFull) && grace_until.is_none();
            let grace_sleep = grace_until.unwrap_or_else(|| tokio::time::Instant::now() + wait);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if grace_until.is_none() => {
                    grace_until = Some(tokio::time::Instant::now() + self.fwd.cfg.shutdown_grace);
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { return self.lost() };
                    if !self.handle(ev) {
                        return self.lost();
                    }
                    for _ in 0..EVENTS_PER_TURN {
                        let Some(ev) = events.try_recv() else { break };
                        if !self.handle(ev) {
                            return self.lost();
                        }
                    }
                    self.hand_acks();
                }
                _ = self.fwd.store.rows_added(), if want_rows => {
                    self.exhausted = ByLane::default();
                }
                _ = tokio::time::sleep_until(grace_sleep), if matches!(idle, Idle::Wait(_)) || grace_until.is_some() => {}
            }
        }
    }

    /// A clean stop: hands over the acks, publishes the retained `offline` status and waits
    /// for its PUBACK (at most [`OFFLINE_ACK_WAIT`]), still taking late PUBACKs of rows.
    async fn stop(&mut self, events: &mut Events) -> State {
        self.hand_acks();
        if self.announce(Status::Shutdown).is_err() {
            return State::Stopped;
        }
        let wait = OFFLINE_ACK_WAIT.min(self.fwd.cfg.shutdown_grace);
        let _ = tokio::time::timeout(wait, async {
            while self.acked_status != Some(Status::Shutdown) {
                let Some(ev) = events.recv().await else {
                    return;
                };
                if !self.handle(ev) {
                    return;
                }
            }
        })
        .await;
        self.hand_acks();
        if self.acked_status != Some(Status::Shutdown) {
            tracing::debug!(?wait, "the offline status was not acked in time");
        }
        State::Stopped
    }

    /// Queues the retained presence `status`: an entry of the packet-id FIFO like a row.
    fn announce(&mut self, status: Status) -> Result<(), Halt> {
        let presence = &self.fwd.presence;
        let payload = presence.payload(status, now_millis());
        let queued = self.client.try_publish(
            Bytes::copy_from_slice(presence.topic().as_bytes()),
            QoS::AtLeastOnce,
            true,
            payload.into(),
            presence.properties(),
        );
        if let Err(e) = queued {
            tracing::debug!(error = %e, ?status, "could not queue the presence status");
            return Err(Halt::Connection);
        }
        self.awaiting_pkid.push_back(InFlight::Status(status));
        Ok(())
    }

    /// The connection is gone: hand over the acks already received and back off.
    fn lost(&mut self) -> State {
        self.hand_acks();
        let stats = &self.fwd.stats;
        stats.connection_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            in_flight = self.in_flight(),
            "upstream connection lost; will replay unacked rows"
        );
        State::BackingOff { attempt: 1 }
    }

    fn hand_acks(&mut self) {
        for lane in DRAIN_ORDER {
            let seqs = &mut self.acks[lane];
            if !seqs.is_empty() {
                self.fwd
                    .stats
                    .acks_handed
                    .fetch_add(seqs.len() as u64, Ordering::Relaxed);
                self.fwd.store.ack(lane, std::mem::take(seqs));
            }
        }
    }

    /// Handles one event of the pump; false when the connection failed.
    fn handle(&mut self, ev: PumpEvent) -> bool {
        match ev {
            Err(_) => false,
            Ok(Wire::Sent(pkid)) => {
                match self.awaiting_pkid.pop_front() {
                    Some(InFlight::Rows(sent)) if self.qos == QoS::AtMostOnce => self.acked(sent),
                    Some(entry) => {
                        self.by_pkid.insert(pkid, entry);
                    }
                    None => {}
                }
                true
            }
            Ok(Wire::PubAck { pkid, outcome }) => {
                match self.by_pkid.remove(&pkid) {
                    Some(InFlight::Rows(sent)) => self.rows_acked(sent, outcome),
                    Some(InFlight::Status(status)) => {
                        if let AckOutcome::Refused(reason) = outcome {
                            tracing::warn!(
                                ?reason,
                                ?status,
                                "upstream refused the presence status"
                            );
                        } else {
                            tracing::debug!(?status, "upstream acked the presence status");
                        }
                        self.acked_status = Some(status);
                    }
                    None => {}
                }
                true
            }
            Ok(Wire::Command(command)) => {
                match &self.fwd.downlink {
                    // Fails only when the downlink has stopped (shutdown): then the
                    // command is neither stored nor acked.
                    Some((_, commands)) => {
                        let _ = commands.send(command);
                    }
                    // Not subscribed to anything: acknowledge and drop.
                    None => (command.ack)(),
                }
                true
            }
            Ok(_) => true,
        }
    }

    /// The PUBACK of a publish of rows: counted by its reason, the rows are acked.
    fn rows_acked(&mut self, sent: Sent, outcome: AckOutcome) {
        let stats = &self.fwd.stats;
        let rows = sent.seqs.len() as u64;
        match outcome {
            AckOutcome::Accepted => {}
            AckOutcome::NoSubscribers => {
                stats.rows_no_subscribers.fetch_add(rows, Ordering::Relaxed);
            }
            AckOutcome::Refused(reason) => {
                stats
                    .rows_rejected_upstream
                    .fetch_add(rows, Ordering::Relaxed);
                tracing::warn!(?reason, rows, "upstream refused a publish; rows deleted");
            }
        }
        self.acked(sent);
    }

    fn acked(&mut self, sent: Sent) {
        let stats = &self.fwd.stats;
        stats
            .rows_acked
            .fetch_add(sent.seqs.len() as u64, Ordering::Relaxed);
        let latency = (now_millis() - sent.received_at).max(0) as u64;
        stats.last_latency_ms.store(latency, Ordering::Relaxed);
        stats.max_latency_ms.fetch_max(latency, Ordering::Relaxed);
        stats.acked_by_lane[sent.lane].fetch_add(sent.seqs.len() as u64, Ordering::Relaxed);
        stats
            .latency
            .observe_micros_n(latency * 1000, sent.seqs.len() as u64);
        self.acks[sent.lane].extend_from_slice(&sent.seqs);
    }

    /// Reads the next chunk of `lane` into the buffer.
    fn refill(&mut self, lane: Lane) -> Result<(), Halt> {
        let mut rows = std::mem::take(&mut self.scratch);
        let res = self
            .fwd
            .store
            .read_outbox_live(lane, self.next_seq[lane], READ_CHUNK, &mut rows);
        if let Err(e) = res {
            tracing::error!(error = %e, "reading the outbox failed");
            self.scratch = rows;
            return Err(Halt::Store);
        }
        self.exhausted[lane] = rows.len() < READ_CHUNK;
        if let Some(last) = rows.last() {
            self.next_seq[lane] = last.seq + 1;
        }
        self.buffered[lane].extend(rows.drain(..));
        self.scratch = rows;
        Ok(())
    }

    /// Lets go of the row buffers' room beyond [`ROWS_KEEP`] (they are empty: the outbox
    /// is drained).
    fn let_go(&mut self) {
        for lane in Lane::ALL {
            self.buffered[lane].shrink_to(ROWS_KEEP);
        }
        self.scratch.shrink_to(ROWS_KEEP);
    }

    /// Sends rows until the window is full, the outbox is drained, or a limit says wait.
    fn fill(&mut self) -> Result<Idle, Halt> {
        let cfg = &self.fwd.cfg;
        while self.in_flight() < self.window {
            let handed = self.fwd.stats.acks_handed.load(Ordering::Relaxed);
            let uncommitted = handed.saturating_sub(self.fwd.store.acks_committed());
            if uncommitted >= cfg.max_uncommitted_acks.max(1) as u64 {
                return Ok(Idle::Wait(ACK_COMMIT_POLL));
            }
            let ev = Lane::Event;
            let rd = Lane::Reading;
            if self.buffered[ev].is_empty() && !self.exhausted[ev] {
                self.refill(Lane::Event)?;
            }
            let lane = if !self.buffered[ev].is_empty() {
                Lane::Event
            } else {
                if self.buffered[rd].is_empty() && !self.exhausted[rd] {
                    self.refill(Lane::Reading)?;
                    // Give events that arrived meanwhile their priority at each chunk.
                    self.exhausted[ev] = false;
                }
                if self.buffered[rd].is_empty() {
                    self.let_go();
                    return Ok(Idle::NoRows);
                }
                Lane::Reading
            };
            let replayed = self.buffered[lane].front().map(|r| r.seq) <= Some(self.replay_until);
            let batching = lane == Lane::Reading && cfg.batch_max_messages > 1;
            let n = if batching {
                if self.buffered[lane].len() < cfg.batch_max_messages && !self.exhausted[lane] {
                    self.refill(lane)?;
                }
                match self.batch_len(replayed) {
                    Ok(n) => n,
                    Err(wait) => return Ok(Idle::Wait(wait)),
                }
            } else {
                1
            };
            if replayed {
                if let Some(bucket) = &mut self.bucket {
                    if let Err(wait) = bucket.take(n) {
                        return Ok(Idle::Wait(wait));
                    }
                }
            }
            self.publish(lane, n)?;
        }
        Ok(Idle::WindowFull)
    }

    /// How many buffered readings go into the next batch, or how long to linger for more.
    fn batch_len(&mut self, replayed: bool) -> Result<usize, Duration> {
        let cfg = &self.fwd.cfg;
        let rows = &self.buffered[Lane::Reading];
        let family = Family::of(rows[0].format());
        let mut size = 16;
        let mut n = 0;
        for row in rows.iter().take(cfg.batch_max_messages) {
            let add = row.payload().len() + encode::batch_overhead(&self.id_prefix, row);
            if Family::of(row.format()) != family || (n > 0 && size + add > cfg.max_packet_size) {
                self.linger_since = None;
                return Ok(n);
            }
            size += add;
            n += 1;
        }
        let linger = Duration::from_millis(cfg.batch_linger_ms);
        if n < cfg.batch_max_messages && !replayed && !linger.is_zero() {
            let since = *self.linger_since.get_or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited < linger {
                return Err(linger - waited);
            }
        }
        self.linger_since = None;
        Ok(n)
    }

    /// Publishes the next `n` buffered rows of `lane` (a batch when `n > 1`).
    fn publish(&mut self, lane: Lane, n: usize) -> Result<(), Halt> {
        // The rows pass through the read buffer, empty between reads: no allocation per
        // publish for them.
        let mut rows = std::mem::take(&mut self.scratch);
        rows.extend(self.buffered[lane].drain(..n));
        let res = self.publish_rows(lane, &mut rows);
        rows.clear();
        self.scratch = rows;
        res
    }

    fn publish_rows(&mut self, lane: Lane, rows: &mut [OutboxRow]) -> Result<(), Halt> {
        let cfg = &self.fwd.cfg;
        let stats = &self.fwd.stats;
        let n = rows.len();
        let replay_until = self.replay_until;
        let seqs: Seqs = rows.iter().map(|r| r.seq).collect();
        let replayed = |i: usize| seqs[i] <= replay_until;
        let batch = lane == Lane::Reading && cfg.batch_max_messages > 1;
        let (topic, payload, content_type) = if !batch {
            let payload = match lane {
                Lane::Event => encode::event_payload(rows[0].payload(), replayed(0)).into(),
                // The row's bytes, shared: no copy.
                Lane::Reading => rows[0].row.payload_bytes(),
            };
            let first = &rows[0];
            (
                encode::upstream_topic_in(&mut self.encoded, &cfg.topic_prefix, first.topic()),
                payload,
                encode::content_type(lane, first.format()),
            )
        } else {
            let (payload, ct) = match Family::of(rows[0].format()) {
                Family::Json => (
                    encode::json_batch(&self.id_prefix, rows, replay_until).into(),
                    "application/json",
                ),
                Family::Cbor => (
                    encode::cbor_batch(&self.id_prefix, rows, replay_until).into(),
                    "application/cbor",
                ),
            };
            (
                encode::upstream_topic_in(&mut self.encoded, &cfg.topic_prefix, "batch"),
                payload,
                ct,
            )
        };
        // The id, the replay flag and the content type: MQTT 5 properties, or over MQTT
        // 3.1.1 the envelope (the client sends no properties there).
        let (payload, props) = match cfg.protocol {
            UpstreamProtocol::V5 => {
                let props = encode::properties(
                    &mut self.encoded,
                    &self.id_prefix,
                    rows[0].seq,
                    replayed(0),
                    content_type,
                );
                (payload, props)
            }
            UpstreamProtocol::V311 => {
                let id = encode::message_id(&self.id_prefix, rows[0].seq);
                let payload = encode::envelope(&id, replayed(0), content_type, &payload);
                (payload.into(), PublishProperties::default())
            }
        };
        let sendable = !topic.is_empty()
            && !topic.iter().any(|b| matches!(b, b'+' | b'#' | 0))
            && payload.len() + topic.len() + 128 <= cfg.max_packet_size;
        if !sendable {
            stats
                .rows_dropped_unsendable
                .fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!(topic = %String::from_utf8_lossy(&topic), bytes = payload.len(), "row cannot be sent upstream; deleted");
            self.acks[lane].extend_from_slice(&seqs);
            return Ok(());
        }
        let received_at = rows.iter().map(|r| r.received_at()).min().unwrap_or(0);
        if let Err(e) = self
            .client
            .try_publish(topic, self.qos, false, payload, props)
        {
            tracing::debug!(error = %e, "could not queue a publish");
            return Err(Halt::Connection);
        }
        let replayed_rows = (0..n).filter(|&i| replayed(i)).count() as u64;
        stats.published.fetch_add(1, Ordering::Relaxed);
        stats.rows_sent.fetch_add(n as u64, Ordering::Relaxed);
        stats
            .rows_replayed
            .fetch_add(replayed_rows, Ordering::Relaxed);
        self.awaiting_pkid.push_back(InFlight::Rows(Sent {
            lane,
            seqs,
            received_at,
        }));
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests;
