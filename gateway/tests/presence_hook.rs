//! The embedded broker's connection reports (`vendor/rumqttd/src/link/presence.rs`,
//! PATCHES.md): a connection is reported after its CONNACK and again when it ends, with
//! why (a DISCONNECT, a lost socket, an expired keep alive, a takeover by a newer
//! connection with the same client id), and a full channel drops reports instead of
//! holding up connections.

use std::time::{Duration, Instant};

use rumqttd::{DisconnectReason, PresenceEvent, PresenceHook};
use test_support::{raw_connect, Rumqttd, V5Client};

const WAIT: Duration = Duration::from_secs(10);

fn broker(capacity: usize) -> (Rumqttd, PresenceHook, flume::Receiver<PresenceEvent>) {
    let (hook, rx) = PresenceHook::bounded(capacity);
    let set = hook.clone();
    let broker = Rumqttd::start_with(move |b| b.set_presence(set));
    (broker, hook, rx)
}

async fn next(rx: &flume::Receiver<PresenceEvent>) -> PresenceEvent {
    tokio::time::timeout(WAIT, rx.recv_async())
        .await
        .expect("no presence report within 10 s")
        .expect("the broker dropped its hook")
}

/// The generation of a `Connected` report of `client`; panics on anything else.
fn connected(event: PresenceEvent, client: &str) -> u64 {
    match event {
        PresenceEvent::Connected {
            client_id,
            generation,
            ..
        } if &*client_id == client => generation,
        other => panic!("expected {client} connected, got {other:?}"),
    }
}

fn disconnected(event: PresenceEvent) -> (String, u64, DisconnectReason) {
    match event {
        PresenceEvent::Disconnected {
            client_id,
            generation,
            reason,
        } => (client_id.to_string(), generation, reason),
        other => panic!("expected a disconnect, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connection_is_reported_with_its_settings_and_its_clean_end() {
    let (broker, _hook, rx) = broker(16);
    let client = V5Client::connect(broker.port, "d-clean", |o| {
        o.set_keep_alive(Duration::from_secs(20));
    })
    .await;
    match next(&rx).await {
        PresenceEvent::Connected {
            client_id,
            mqtt5,
            keep_alive,
            clean_session,
            ..
        } => {
            assert_eq!(&*client_id, "d-clean");
            assert!(mqtt5);
            assert_eq!(keep_alive, 20);
            assert!(clean_session);
        }
        other => panic!("expected connected, got {other:?}"),
    }
    client.disconnect().await;
    let (client_id, _, reason) = disconnected(next(&rx).await);
    assert_eq!(client_id, "d-clean");
    assert_eq!(reason, DisconnectReason::Clean);
}

#[tokio::test]
async fn a_socket_closed_without_disconnect_is_lost() {
    let (broker, _hook, rx) = broker(16);
    let client = V5Client::connect(broker.port, "d-lost", |_| {}).await;
    let generation = connected(next(&rx).await, "d-lost");
    client.drop_connection().await;
    assert_eq!(
        disconnected(next(&rx).await),
        ("d-lost".into(), generation, DisconnectReason::Lost)
    );
}

#[tokio::test]
async fn a_silent_client_expires_its_keep_alive() {
    let (broker, _hook, rx) = broker(16);
    let _socket = raw_connect(broker.v311_port, "d-idle", 1).await;
    let generation = connected(next(&rx).await, "d-idle");
    // Nothing more is sent: the broker closes it after 1.5 x the keep alive.
    assert_eq!(
        disconnected(next(&rx).await),
        (
            "d-idle".into(),
            generation,
            DisconnectReason::KeepAliveExpired
        )
    );
}

#[tokio::test]
async fn a_takeover_ends_the_old_connection_only() {
    let (broker, _hook, rx) = broker(16);
    let _old = V5Client::connect(broker.port, "d-twice", |_| {}).await;
    let first = connected(next(&rx).await, "d-twice");
    let mut new = V5Client::connect(broker.port, "d-twice", |_| {}).await;
    // The old connection's end and the new one's start, in either order.
    let (a, b) = (next(&rx).await, next(&rx).await);
    let (ended, second) = match (&a, &b) {
        (PresenceEvent::Disconnected { .. }, _) => (disconnected(a), connected(b, "d-twice")),
        _ => (disconnected(b), connected(a, "d-twice")),
    };
    assert_eq!(
        ended,
        ("d-twice".into(), first, DisconnectReason::TakenOver)
    );
    assert!(second > first);
    // The new connection lives on: it still works, and nothing more is reported.
    new.subscribe(rumqttc::v5::mqttbytes::v5::Filter::new(
        "x/y",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    ))
    .await;
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn a_full_channel_drops_reports_and_counts_them_without_holding_up_connections() {
    let (broker, hook, rx) = broker(1);
    let mut clients = Vec::new();
    for i in 0..3 {
        // Each CONNACK arrives although nobody reads the reports.
        clients.push(V5Client::connect(broker.port, &format!("d-full-{i}"), |_| {}).await);
    }
    // A connection reports itself just after writing its CONNACK.
    let deadline = Instant::now() + Duration::from_secs(5);
    while hook.dropped() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hook.dropped(), 2);
    connected(next(&rx).await, "d-full-0");
    assert!(rx.try_recv().is_err());
}
