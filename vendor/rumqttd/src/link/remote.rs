use crate::link::downlink::Downlink;
use crate::link::gate::Gates;
use crate::link::ingest::{HeldAcks, Ingested};
use crate::link::local::{LinkError, LinkRx, LinkTx};
use crate::link::network;
use crate::link::network::Network;
use crate::local::LinkBuilder;
use crate::protocol::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode, Login, Packet,
    Protocol,
};
use crate::router::{Event, Notification};
use crate::{ConnectionId, ConnectionSettings};

use flume::{RecvError, SendError, Sender, TrySendError};
use std::cmp::min;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::error::Elapsed;
use tokio::{select, time};
use tracing::{trace, Span};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O")]
    Io(#[from] io::Error),
    #[error("Zero keep alive")]
    ZeroKeepAlive,
    #[error("Not connect packet")]
    NotConnectPacket(Packet),
    #[error("Network {0}")]
    Network(#[from] network::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Got new session, disconnecting old one")]
    SessionEnd,
    #[error("Persistent session requires valid client id")]
    InvalidClientId,
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    #[error("Authentication error")]
    InvalidAuth,
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Link error = {0}")]
    Link(#[from] LinkError),
    // PATCH(gateway)
    #[error("Not authorized to {0:?} {1}")]
    NotAuthorized(crate::Access, String),
    // PATCH(gateway)
    #[error("A publish could not be stored; it and later ones are not acknowledged")]
    NotStored,
    // PATCH(gateway)
    #[error("More unacknowledged QoS 1/2 publishes than the Receive Maximum {0}")]
    ReceiveMaximumExceeded(u16),
}

/// Orchestrates between Router and Network.
pub struct RemoteLink<P> {
    connect: Connect,
    pub(crate) connection_id: ConnectionId,
    /// PATCH(gateway): the router's `Connection::generation` of this link.
    pub(crate) generation: u64,
    network: Network<P>,
    link_tx: LinkTx,
    link_rx: LinkRx,
    notifications: VecDeque<Notification>,
    pub(crate) will_delay_interval: u32,
    /// PATCH(gateway): the MQTT 5 Session Expiry Interval (`None` on MQTT 3.1.1).
    pub(crate) session_expiry: Option<u32>,
    // PATCH(gateway)
    authorizer: Option<crate::Authorizer>,
    /// PATCH(gateway): the hand-off to the application and its held acks.
    held: Option<HeldAcks>,
    /// PATCH(gateway): the application's messages for this client (`link/downlink.rs`).
    downlink: Option<Downlink>,
    /// PATCH(gateway): whether reads are watched for a DISCONNECT (`link/presence.rs`).
    watch_disconnect: bool,
    /// PATCH(gateway): the client sent DISCONNECT (seen when `watch_disconnect`).
    pub(crate) clean_disconnect: bool,
    /// PATCH(gateway): the publishes of one network read handed to the application:
    /// room kept between reads, not allocated per read (PATCHES.md, 36). As large as the
    /// most publishes one read has had, at most [`READ_KEEP`] between reads.
    ingested: Vec<Ingested>,
}

/// PATCH(gateway): most packets' room kept between reads (a burst may take more; it is
/// given back after).
const READ_KEEP: usize = 8;

thread_local! {
    /// PATCH(gateway): one network read's packets while the downlink and the held acks
    /// look at them; one per thread of connections rather than per connection (it is not
    /// held across an `.await`), so an idle connection keeps no room for it.
    static READ: std::cell::RefCell<Vec<Packet>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<P: Protocol> RemoteLink<P> {
    pub async fn new(
        router_tx: Sender<(ConnectionId, Event)>,
        tenant_id: Option<String>,
        mut network: Network<P>,
        connect_packet: Packet,
        dynamic_filters: bool,
        assigned_client_id: Option<String>,
        hooks: crate::Hooks,
    ) -> Result<RemoteLink<P>, Error> {
        let Packet::Connect(connect, props, lastwill, lastwill_props, _) = connect_packet else {
            return Err(Error::NotConnectPacket(connect_packet));
        };

        // Register this connection with the router. Router replys with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex max connection limit)
        let client_id = assigned_client_id.as_ref().unwrap_or(&connect.client_id);
        let clean_session = connect.clean_session;

        let topic_alias_max = props.as_ref().and_then(|p| p.topic_alias_max);
        let session_expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);

        let delay_interval = lastwill_props
            .as_ref()
            .and_then(|f| f.delay_interval)
            .unwrap_or(0);

        // The Server delays publishing the Client’s Will Message until
        // the Will Delay Interval has passed or the Session ends, whichever happens first
        let will_delay_interval = min(session_expiry, delay_interval);

        let (link_tx, link_rx, notification) = LinkBuilder::new(client_id, router_tx)
            .tenant_id(tenant_id)
            .clean_session(clean_session)
            .last_will(lastwill)
            .last_will_properties(lastwill_props)
            .dynamic_filters(dynamic_filters)
            .topic_alias_max(topic_alias_max.unwrap_or(0))
            // PATCH(gateway): the router drops forwards bigger than this.
            .max_packet_size(props.as_ref().and_then(|p| p.max_packet_size))
            // PATCH(gateway): and has no more QoS 1/2 forwards unacknowledged than this.
            .receive_maximum(props.as_ref().and_then(|p| p.receive_maximum))
            // PATCH(gateway): the session outlives the connection by this (MQTT 5).
            .session_expiry(P::MQTT_5.then_some(session_expiry))
            .build()?;

        let id = link_rx.id();
        Span::current().record("connection_id", id);
        // PATCH(gateway)
        let held = hooks
            .ingest
            .map(|hook| HeldAcks::relayed(hook, hooks.subscribed, client_id, hooks.ack_relay));
        // PATCH(gateway)
        let downlink = hooks
            .downlink
            .map(|hook| Downlink::new(hook, client_id, link_tx.generation));

        if let Some(mut packet) = notification.into() {
            if let Packet::ConnAck(_ack, props) = &mut packet {
                let mut new_props = props.clone().unwrap_or_default();
                new_props.assigned_client_identifier = assigned_client_id;
                // PATCH(gateway): the broker's Receive Maximum (MQTT 5.0 3.2.2.3.3).
                new_props.receive_max = Some(network.receive_maximum());
                *props = Some(new_props);
                network.write(packet).await?;
            }
        }

        Ok(RemoteLink {
            connect,
            connection_id: id,
            generation: link_tx.generation,
            network,
            link_tx,
            link_rx,
            // PATCH(gateway): grows on demand (was with_capacity(100) per connection).
            notifications: VecDeque::new(),
            will_delay_interval,
            session_expiry: P::MQTT_5.then_some(session_expiry),
            authorizer: hooks.authorizer,
            held,
            downlink,
            watch_disconnect: hooks.presence.is_some(),
            clean_disconnect: false,
            ingested: Vec::new(),
        })
    }

    /// PATCH(gateway): writes the held acks that may leave now; `NotStored` once the
    /// application dropped one unreleased.
    async fn write_released_acks(&mut self) -> Result<(), Error> {
        let Some(held) = &mut self.held else {
            return Ok(());
        };
        // PATCH(gateway): encoded straight from the held acks, without a queue of packets
        // per release (PATCHES.md, 35).
        let acks = held.take_ready().map_err(|_| Error::NotStored)?;
        if self.network.buffer(acks)? > 0 {
            self.network.flush().await?;
        }
        Ok(())
    }

    pub async fn start(&mut self) -> Result<(), Error> {
        // PATCH(gateway): the keep alive is one timer per connection (patch 22,
        // `network::keepalive_limit`). Silence is counted from the end of the last turn,
        // as when each turn's read carried its own timeout: a turn spent handing over,
        // waiting for room or writing does not count against the client. The timer, when
        // it fires, checks the silence since then and is set again from it.
        let keepalive = network::keepalive_limit(self.connect.keep_alive);
        let silence_limit = keepalive.unwrap_or(Duration::MAX);
        let mut turn_ended = time::Instant::now();
        // PATCH(gateway): what the loop waits on sits behind gates, polled only on the
        // turn after it woke (or was set, or completed): the socket's read, the keep
        // alive's timer and the receives below (PATCHES.md, 38).
        let gates = Gates::new();
        let read_gate = gates.entry();
        let keepalive_timer = pin!(time::sleep(silence_limit));
        let mut keepalive_due = gates.gate(keepalive_timer);

        // PATCH(gateway): the receive futures of the router's signal, the application's
        // acks and its downlink messages live across the turns of the loop and are
        // replaced only when they complete. Built anew for each packet read, each turn
        // registered in (and dropped from) three channels' wait lists, two of them with
        // an allocation: about 3% of the gateway's CPU at 1000 devices (PATCHES.md, 21).
        let router_signal = self.link_rx.ready_signal();
        let router_receive = pin!(router_signal.recv_async());
        let mut router_ready = gates.gate(router_receive);
        let acks_signal = self.held.as_ref().map(HeldAcks::signal);
        let mut acks_changed = acks_signal
            .as_deref()
            .map(|n| gates.gate(Box::pin(n.notified())));
        let downlink_messages = self.downlink.as_ref().map(Downlink::messages);
        let mut downlink_next = downlink_messages
            .as_ref()
            .map(|rx| gates.gate(Box::pin(rx.recv_async())));

        // Note:
        // Shouldn't result in bounded queue deadlocks because of blocking n/w send
        loop {
            select! {
                o = read_gate.wrap(self.network.read()) => {
                    let packet = o?;
                    let (start_len, len) = {
                        let mut buffer = self.link_tx.buffer();
                        let start = buffer.len();
                        buffer.push_back(packet);
                        self.network.readv(&mut buffer)?;
                        // PATCH(gateway): topic aliases resolved before authorization.
                        if let Some(held) = &mut self.held {
                            buffer.iter_mut().skip(start).for_each(|p| held.resolve_alias(p));
                        }
                        // PATCH(gateway): refuse the whole read if any packet is not
                        // authorized; the client is disconnected.
                        if let Some(authorize) = &self.authorizer {
                            let client_id = &self.connect.client_id;
                            let refused = buffer
                                .iter()
                                .skip(start)
                                .find_map(|p| refused(authorize, client_id, p));
                            if let Some((access, topic)) = refused {
                                buffer.truncate(start);
                                return Err(Error::NotAuthorized(access, topic));
                            }
                        }
                        if self.held.is_some() || self.downlink.is_some() {
                            READ.with_borrow_mut(|read| {
                                // Empty unless a panic cut its last use short: what that
                                // read left must not reach this connection's router buffer.
                                read.clear();
                                read.extend(buffer.drain(start..));
                                // PATCH(gateway): subscriptions reported, PUBACKs of
                                // downlink messages taken out (`link/downlink.rs`).
                                if let Some(downlink) = &mut self.downlink {
                                    downlink.observe(read);
                                }
                                // PATCH(gateway): publishes go to the application too,
                                // their acks held (`link/ingest.rs`).
                                if let Some(held) = &mut self.held {
                                    self.ingested.reserve_exact(read.len());
                                    held.take_into(read, &mut self.ingested);
                                }
                                buffer.extend(read.drain(..));
                                read.shrink_to(READ_KEEP);
                            });
                        }
                        // PATCH(gateway): a client sends nothing after its DISCONNECT, so
                        // one ends the read; only the last packet is looked at.
                        if self.watch_disconnect
                            && buffer.len() > start
                            && matches!(buffer.back(), Some(Packet::Disconnect(..)))
                        {
                            self.clean_disconnect = true;
                        }
                        (start, buffer.len())
                    };

                    trace!("Packets read from network, count = {}", len);
                    // PATCH(gateway): MQTT 5, more publishes in flight than the CONNACK's
                    // Receive Maximum (4.9): DISCONNECT 0x93; none of this read is passed on.
                    let max = self.network.receive_maximum();
                    let in_flight = self.held.as_ref().map_or(0, |h| h.unacknowledged());
                    if P::MQTT_5 && in_flight > max.into() {
                        let reason_code = DisconnectReasonCode::ReceiveMaximumExceeded;
                        let disconnect = Packet::Disconnect(Disconnect { reason_code }, None);
                        self.network.write(disconnect).await?;
                        return Err(Error::ReceiveMaximumExceeded(max));
                    }
                    // PATCH(gateway): no wake-up when nothing of this read is for the
                    // router (publishes no subscription wants, see `link/ingest.rs`).
                    if len > start_len {
                        self.link_tx.notify().await?;
                    }
                    // PATCH(gateway): waits while the application's queue is full, so
                    // this socket is not read meanwhile (backpressure).
                    if let Some(held) = &self.held {
                        let handed = held.hand_over(&mut self.ingested).await;
                        self.ingested.shrink_to(READ_KEEP);
                        if !handed {
                            return Err(Error::NotStored);
                        }
                        // A repeated QoS 2 publish or a PUBREL may be answerable at once.
                        self.write_released_acks().await?;
                    }
                }
                // PATCH(gateway): the keep alive (see the top of this function).
                () = &mut keepalive_due, if keepalive.is_some() => {
                    let due = turn_ended + silence_limit;
                    if time::Instant::now() >= due {
                        return Err(Error::Network(network::Error::KeepAlive));
                    }
                    keepalive_due.change().as_mut().reset(due);
                    continue;
                }
                // PATCH(gateway): acks released by the application.
                () = or_pending(&mut acks_changed) => {
                    if let (Some(changed), Some(signal)) = (&mut acks_changed, &acks_signal) {
                        changed.change().set(signal.notified());
                    }
                    self.write_released_acks().await?
                }
                // PATCH(gateway): a message of the application for this client.
                message = or_pending(&mut downlink_next) => {
                    if let (Some(next), Some(rx)) = (&mut downlink_next, &downlink_messages) {
                        next.change().set(rx.recv_async());
                    }
                    // Never closed: the downlink keeps a sender.
                    if let (Some(downlink), Ok(message)) = (&mut self.downlink, message) {
                        let packet = downlink.publish(message, P::MQTT_5);
                        self.network.write(packet).await?;
                    }
                }
                // Receive from router when previous when state isn't in collision
                // due to previously received data request
                o = &mut router_ready => {
                    router_ready.change().set(router_signal.recv_async());
                    o.map_err(LinkError::from)?;
                    self.link_rx.take_notifications(&mut self.notifications);
                    let mut packets = VecDeque::new();
                    let mut unscheduled = false;

                    for notif in self.notifications.drain(..) {
                        if let Some(packet) = notif.into() {
                            packets.push_back(packet);
                        } else {
                            unscheduled = true;
                        }

                    }
                    // PATCH(gateway): the client's subscriptions are in place once
                    // acknowledged (`link/ingest.rs`, `HeldAcks::take`).
                    if let Some(held) = &mut self.held {
                        let subacks = packets
                            .iter()
                            .filter(|p| matches!(p, Packet::SubAck(..)))
                            .count();
                        if subacks > 0 {
                            held.subscriptions_acknowledged(subacks);
                        }
                    }
                    self.network.writev(packets).await?;
                    if unscheduled {
                        self.link_rx.wake().await?;
                    }
                }
            }
            // PATCH(gateway): the keep alive's silence starts again (see above).
            turn_ended = time::Instant::now();
        }
    }
}

/// PATCH(gateway): awaits `future` when there is one, else never completes (a
/// connection without a hand-off or without a downlink).
async fn or_pending<F: Future + Unpin>(future: &mut Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// PATCH(gateway): the first publish topic or subscribe filter of `packet` that
/// `authorize` refuses. A publish whose topic is not UTF-8 or empty (an MQTT 5 topic
/// alias) is refused too.
fn refused(
    authorize: &crate::Authorizer,
    client_id: &str,
    packet: &Packet,
) -> Option<(crate::Access, String)> {
    match packet {
        Packet::Publish(publish, _) => {
            let topic = std::str::from_utf8(&publish.topic).unwrap_or("");
            (topic.is_empty() || !authorize(client_id, crate::Access::Publish, topic))
                .then(|| (crate::Access::Publish, topic.to_string()))
        }
        Packet::Subscribe(subscribe, _) => subscribe
            .filters
            .iter()
            .find(|f| !authorize(client_id, crate::Access::Subscribe, &f.path))
            .map(|f| (crate::Access::Subscribe, f.path.clone())),
        _ => None,
    }
}

/// Read MQTT connect packet from network and verify it.
/// authentication and checks are done here.
pub async fn mqtt_connect<P>(
    config: Arc<ConnectionSettings>,
    network: &mut Network<P>,
) -> Result<Packet, Error>
where
    P: Protocol,
{
    // Wait for MQTT connect packet and error out if it's not received in time to prevent
    // DOS attacks by filling total connections that the server can handle with idle open
    // connections which results in server rejecting new connections
    let connection_timeout_ms = config.connection_timeout_ms.into();
    let packet = time::timeout(Duration::from_millis(connection_timeout_ms), async {
        let packet = network.read().await?;
        Ok::<_, network::Error>(packet)
    })
    .await??;

    let (connect, _props, login) = match packet {
        Packet::Connect(ref connect, ref props, _, _, ref login) => (connect, props, login),
        packet => return Err(Error::NotConnectPacket(packet)),
    };

    Span::current().record("client_id", &connect.client_id);

    handle_auth(config.clone(), login.as_ref(), &connect.client_id).await?;

    // PATCH(gateway): keep alive 0 is valid ("no keep alive", MQTT 3.1.1 and 5.0
    // section 3.1.2.10) and accepted: such a connection has no read timeout (see
    // `network::keepalive_limit`); TCP keepalive on the accepted socket detects a dead peer.

    let empty_client_id = connect.client_id.is_empty();
    let clean_session = connect.clean_session;

    if empty_client_id && !clean_session {
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::ClientIdentifierNotValid,
        };

        let packet = Packet::ConnAck(ack, None);
        network.write(packet).await?;

        return Err(Error::InvalidClientId);
    }

    // Ok((connect, props, lastwill, lastwill_props))
    Ok(packet)
}

async fn handle_auth(
    config: Arc<ConnectionSettings>,
    login: Option<&Login>,
    client_id: &str,
) -> Result<(), Error> {
    if config.auth.is_none() && config.external_auth.is_none() {
        return Ok(());
    }

    // if authentication is configured and connect packet doesn't have login details
    // return an error
    let Some(login) = login else {
        return Err(Error::InvalidAuth);
    };

    let username = &login.username;
    let password = &login.password;

    if let Some(auth) = &config.external_auth {
        if !auth(
            client_id.to_owned(),
            username.to_owned(),
            password.to_owned(),
        )
        .await
        {
            return Err(Error::InvalidAuth);
        }

        return Ok(());
    }

    if let Some(pairs) = &config.auth {
        if let Some(stored_password) = pairs.get(username) {
            if stored_password.as_bytes().ct_eq(password.as_bytes()).into() {
                return Ok(());
            }
        }

        return Err(Error::InvalidAuth);
    }

    Err(Error::InvalidAuth)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use crate::{protocol::Login, ConnectionSettings};

    use super::handle_auth;

    fn config() -> ConnectionSettings {
        ConnectionSettings {
            connection_timeout_ms: 0,
            max_payload_size: 0,
            max_inflight_count: 0,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        }
    }

    fn login() -> Login {
        Login {
            username: "u".to_owned(),
            password: "p".to_owned(),
        }
    }

    #[tokio::test]
    async fn no_login_no_auth() {
        let cfg = Arc::new(config());
        let r = handle_auth(cfg, None, "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn some_login_no_auth() {
        let cfg = Arc::new(config());
        let login = login();
        let r = handle_auth(cfg, Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_matches_static_auth() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert(login.username.clone(), login.password.clone());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_no_external() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn login_fails_static_matches_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { true };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_fails_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { false };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn external_auth_clousre_or_fnptr_type_check_or_fail_compile() {
        let closure = |_: String, _: String, _: String| async { false };
        async fn fnptr(_: String, _: String, _: String) -> bool {
            true
        }

        let mut cfg = config();
        cfg.set_auth_handler(closure);
        cfg.set_auth_handler(fnptr);
    }
}
