//! An MQTT 5 client (rumqttc's `v5`) for conformance tests of a broker under test: it
//! subscribes with explicit subscription options, publishes with properties, hands over
//! the PUBLISH packets it received, in order, with their properties and flags, keeps
//! the broker's CONNACK, and can disconnect cleanly or lose its connection without a
//! DISCONNECT.
//!
//! Invariants:
//! - Every wait has a timeout and panics with what it waited for.
//! - One operation at a time: `subscribe` returns after its SUBACK, `publish` after its
//!   PUBACK (QoS 1); PUBLISH packets arriving meanwhile are kept for [`V5Client::until`].
//! - An error of the client's event loop is a panic of the next wait, not a silent stop.

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnAck, Filter, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
use tokio::sync::mpsc;

/// How long any single wait of a [`V5Client`] may take.
const WAIT: Duration = Duration::from_secs(10);

/// A connected MQTT 5 client whose event loop runs on its own task.
pub struct V5Client {
    pub client: AsyncClient,
    /// The broker's CONNACK (its properties: receive maximum, topic alias maximum, ..).
    pub connack: ConnAck,
    id: String,
    incoming: mpsc::UnboundedReceiver<Result<Incoming, String>>,
    received: VecDeque<Publish>,
    /// The task polling the event loop; aborting it closes the socket.
    task: tokio::task::JoinHandle<()>,
}

impl V5Client {
    /// Connects (clean start, keep alive 30 s) to 127.0.0.1:`port` after `configure` has
    /// adjusted the options, and waits for a successful CONNACK.
    pub async fn connect(port: u16, id: &str, configure: impl FnOnce(&mut MqttOptions)) -> Self {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        configure(&mut opts);
        let (client, mut eventloop) = AsyncClient::new(opts, 200);
        let (tx, incoming) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => Ok(packet),
                    Ok(Event::Outgoing(_)) => continue,
                    Err(e) => Err(e.to_string()),
                };
                let stop = event.is_err();
                if tx.send(event).is_err() || stop {
                    return;
                }
            }
        });
        let mut c = V5Client {
            client,
            connack: ConnAck {
                session_present: false,
                code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success,
                properties: None,
            },
            id: id.to_string(),
            incoming,
            received: VecDeque::new(),
            task,
        };
        match c
            .wait_for("CONNACK", |p| matches!(p, Incoming::ConnAck(_)))
            .await
        {
            Incoming::ConnAck(connack) => c.connack = connack,
            _ => unreachable!(),
        }
        c
    }

    /// Closes the socket without a DISCONNECT, as a device that lost power or its
    /// network: the broker sees the connection end abnormally (its will applies).
    pub async fn drop_connection(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Sends DISCONNECT and waits (up to 10 s) until the broker has closed the connection.
    pub async fn disconnect(self) {
        self.client.disconnect().await.unwrap();
        self.wait_closed().await;
    }

    /// Waits (up to 10 s) until the broker has closed the connection (a takeover, say).
    pub async fn wait_closed(self) {
        let id = self.id;
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap_or_else(|_| panic!("{id}: the broker kept the connection open"))
            .unwrap();
    }

    /// PUBLISH packets received and not yet taken with [`V5Client::next`].
    pub fn buffered(&self) -> usize {
        self.received.len()
    }

    /// The next packet for which `is_it` holds; PUBLISH packets before it are kept.
    async fn wait_for(&mut self, what: &str, is_it: impl Fn(&Incoming) -> bool) -> Incoming {
        let id = self.id.clone();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.incoming.recv())
                .await
                .unwrap_or_else(|_| panic!("{id}: no {what} within {WAIT:?}"));
            match next {
                Some(Ok(packet)) if is_it(&packet) => return packet,
                Some(Ok(Incoming::Publish(p))) => self.received.push_back(p),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{id}: connection failed waiting for {what}: {e}"),
                None => panic!("{id}: event loop ended waiting for {what}"),
            }
        }
    }

    /// Subscribes with `filter` (its QoS and options as given) and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: Filter) {
        self.client.subscribe_many([filter]).await.unwrap();
        self.wait_for("SUBACK", |p| matches!(p, Incoming::SubAck(_)))
            .await;
    }

    /// Unsubscribes from `filter` and waits for the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) {
        self.client.unsubscribe(filter).await.unwrap();
        self.wait_for("UNSUBACK", |p| matches!(p, Incoming::UnsubAck(_)))
            .await;
    }

    /// Publishes at QoS 1 with `properties` and waits for the PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        retain: bool,
        payload: &[u8],
        properties: PublishProperties,
    ) {
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                retain,
                payload.to_vec(),
                properties,
            )
            .await
            .unwrap();
        self.wait_for("PUBACK", |p| matches!(p, Incoming::PubAck(_)))
            .await;
    }

    /// The next PUBLISH received.
    pub async fn next(&mut self) -> Publish {
        if let Some(p) = self.received.pop_front() {
            return p;
        }
        match self
            .wait_for("PUBLISH", |p| matches!(p, Incoming::Publish(_)))
            .await
        {
            Incoming::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    /// Every PUBLISH received up to and including the first one with `payload`.
    pub async fn until(&mut self, payload: &[u8]) -> Vec<Publish> {
        let mut out = Vec::new();
        loop {
            let p = self.next().await;
            let last = p.payload.as_ref() == payload;
            out.push(p);
            if last {
                return out;
            }
        }
    }
}

/// The payloads of `publishes` as strings, for assertions.
pub fn payloads(publishes: &[Publish]) -> Vec<String> {
    publishes
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}
