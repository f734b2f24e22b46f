//! A device-like MQTT 3.1.1 client for a broker under test (the gateway's embedded
//! broker): publish a batch and wait for every PUBACK, or subscribe and receive; and a
//! bare connection that only says CONNECT ([`raw_connect`]).
//!
//! Invariants: every wait has a timeout; a client is disconnected (and the broker has
//! closed its connection) before [`publish_all`] returns.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::ports::free_port;

/// Publishes each (topic, payload) with QoS 1 through a real MQTT 3.1.1 client and waits
/// for every PUBACK.
pub async fn publish_all(addr: &str, client_id: &str, messages: &[(String, Vec<u8>)]) {
    let mut published = publish_qos1(addr, client_id, messages).await;
    if let Some(e) = &published.error {
        panic!("MQTT client error: {e}");
    }
    published.client.disconnect().await.ok();
    // Wait until the broker has closed this connection: a next publish_all with the same
    // client id must not overtake it (rumqttd then drops the previous connection, and a
    // late close of the old one can take the new one down with it).
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while published.eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Publishes each (topic, payload) with QoS 1 in order, as [`publish_all`], but a
/// connection closed by the broker is not an error: returns how many publishes were
/// acknowledged (acknowledgements come in publish order, so the first N). A device does
/// exactly this when the gateway cannot store what it sends: it keeps the rest.
pub async fn publish_acked(addr: &str, client_id: &str, messages: &[(String, Vec<u8>)]) -> usize {
    let published = publish_qos1(addr, client_id, messages).await;
    published.client.disconnect().await.ok();
    published.acked
}

/// What [`publish_qos1`] saw: PUBACKs counted until all came or the connection failed.
struct Published {
    acked: usize,
    /// Why the connection failed before every PUBACK came.
    error: Option<String>,
    client: AsyncClient,
    eventloop: rumqttc::EventLoop,
}

/// Publishes `messages` at QoS 1 in order and counts PUBACKs until all came or the
/// connection failed (then the publishes not yet queued are left out).
async fn publish_qos1(addr: &str, client_id: &str, messages: &[(String, Vec<u8>)]) -> Published {
    let (host, port) = addr.split_once(':').unwrap();
    let mut opts = MqttOptions::new(client_id, host, port.parse().unwrap());
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let expected = messages.len();
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        let mut error = None;
        while acked < expected {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        (acked, error, eventloop)
    });
    let publish = async {
        for (topic, payload) in messages {
            let queued = client.publish(topic, QoS::AtLeastOnce, false, payload.clone());
            if queued.await.is_err() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), publish)
        .await
        .expect("publishes queued within 20s");
    let (acked, error, eventloop) = tokio::time::timeout(Duration::from_secs(20), acks)
        .await
        .expect("PUBACKs or a closed connection within 20s")
        .unwrap();
    Published {
        acked,
        error,
        client,
        eventloop,
    }
}

/// Subscribes to `filter` on the gateway's embedded broker and waits for the SUBACK;
/// every publish's (topic, payload) then arrives on the channel.
pub async fn subscribe(
    addr: &str,
    filter: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)> {
    let (host, port) = addr.split_once(':').unwrap();
    let mut opts = MqttOptions::new(format!("sub-{}", free_port()), host, port.parse().unwrap());
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 10);
    client.subscribe(filter, QoS::AtMostOnce).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let _client = client;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(()).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
        .await
        .expect("SUBACK");
    rx
}

/// Opens a bare TCP connection to 127.0.0.1:`port`, sends an MQTT 3.1.1 CONNECT (clean
/// session, `keep_alive` seconds, `client_id`) written by hand and waits for a successful
/// CONNACK. The socket then does whatever the test does with it: stay silent (the
/// broker's keep alive expires) or be dropped without a DISCONNECT.
pub async fn raw_connect(port: u16, client_id: &str, keep_alive: u16) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let id = client_id.as_bytes();
    let mut connect = vec![0x10, (12 + id.len()) as u8, 0, 4];
    connect.extend_from_slice(b"MQTT");
    connect.extend_from_slice(&[4, 0x02]);
    connect.extend_from_slice(&keep_alive.to_be_bytes());
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id);
    socket.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut connack))
        .await
        .expect("CONNACK within 10 s")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepting {client_id}");
    socket
}
