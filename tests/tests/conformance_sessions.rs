//! End-to-end session behaviour of the embedded broker against the real gateway binary:
//! fast takeovers of the same client ids (MQTT 3.1.1 section 3.1.4, 5.0 section 3.1.4:
//! the server disconnects the existing client), with their wills, while a fleet publishes.
//!
//! Invariants checked:
//! - A connection is only ever closed by the broker once a newer connection with its
//!   client id exists: the old connection's late disconnect never takes down the new one.
//! - Every superseded connection's will is published once, with its own payload; the will
//!   of a connection that is still the current one never is.
//! - Devices publishing meanwhile lose nothing and are never disconnected.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use test_support::{wait_until_async, Gateway};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Client ids taken over again and again, each by its own sequence of connections.
const TAKEOVER_IDS: usize = 10;
/// Takeovers per client id (10 x 100 = 1000).
const TAKEOVERS_PER_ID: usize = 100;
const FLEET_DEVICES: u32 = 100;
const FLEET_DURATION: Duration = Duration::from_secs(8);

/// What went wrong with the takeover connections, as readable lines.
type Failures = Arc<Mutex<Vec<String>>>;

/// One MQTT 3.1.1 connection of a takeover sequence; its event loop runs on `task`.
struct Takeover {
    task: JoinHandle<()>,
    /// Set before its successor connects: from then on a close by the broker is expected.
    superseded: Arc<AtomicBool>,
    client: AsyncClient,
    /// One item per SUBACK.
    subacks: mpsc::UnboundedReceiver<()>,
}

impl Takeover {
    /// Subscribes to `filter` and waits for the SUBACK: a round trip through the broker.
    async fn round_trip(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.subacks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for {filter} within 10 s"))
            .unwrap_or_else(|| panic!("connection closed waiting for the SUBACK for {filter}"));
    }
}

/// Connects `id` (clean session, a will with payload `id/n`) and waits for its CONNACK.
/// An error of its event loop before it is superseded is recorded in `failures`.
async fn connect(port: u16, id: &str, n: usize, failures: &Failures) -> Takeover {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_last_will(LastWill::new(
        format!("takeover/{id}/will"),
        format!("{id}/{n}"),
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let superseded = Arc::new(AtomicBool::new(false));
    let (connected_tx, connected) = oneshot::channel();
    let (suback_tx, subacks) = mpsc::unbounded_channel();
    let task = {
        let superseded = superseded.clone();
        let failures = failures.clone();
        let name = format!("{id}/{n}");
        tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = suback_tx.send(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !superseded.load(Ordering::SeqCst) {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{name} closed while current: {e}"));
                        }
                        return;
                    }
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .unwrap_or_else(|_| panic!("{id}/{n}: no CONNACK within 10 s"))
        .unwrap_or_else(|_| panic!("{id}/{n}: closed before its CONNACK"));
    Takeover {
        task,
        superseded,
        client,
        subacks,
    }
}

/// `TAKEOVERS_PER_ID` takeovers of `id`: each new connection is opened while the
/// previous one is dropped (socket closed without DISCONNECT) 0-3 ms into the new
/// connect, so the old connection's disconnect and the new CONNECT race at the broker.
/// Returns the last connection, still current.
async fn take_over_repeatedly(port: u16, id: String, failures: Failures) -> Takeover {
    let mut current = connect(port, &id, 0, &failures).await;
    for n in 1..=TAKEOVERS_PER_ID {
        current.superseded.store(true, Ordering::SeqCst);
        let old = current.task;
        let drop_old = async move {
            let jitter = Duration::from_micros((n % 20) as u64 * 250);
            tokio::time::sleep(jitter).await;
            old.abort();
        };
        let (next, ()) = tokio::join!(connect(port, &id, n, &failures), drop_old);
        current = next;
    }
    current
}

/// Subscribes to every takeover will and collects their payloads.
async fn will_watcher(port: u16) -> (Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    will_watcher_on(port, "takeover/+/will").await
}

/// Subscribes to `filter` (QoS 1) and collects the payloads of what arrives.
async fn will_watcher_on(port: u16, filter: &str) -> (Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let mut opts = MqttOptions::new("will-watcher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let wills = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready) = oneshot::channel();
    let task = {
        let wills = wills.clone();
        tokio::spawn(async move {
            let _client = client;
            let mut ready_tx = Some(ready_tx);
            while let Ok(event) = eventloop.poll().await {
                match event {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => wills
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&p.payload).into_owned()),
                    _ => {}
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("will watcher SUBACK")
        .unwrap();
    (wills, task)
}

/// `ingest.readings` of the gateway's `/api/status`.
fn readings(gw: &Gateway) -> u64 {
    let (code, body) = gw.http_get("/api/status");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["ingest"]["readings"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_takeovers_never_take_down_the_new_connection() {
    let gw = Gateway::start(&[]);
    let started = Instant::now();
    let (wills, watcher) = will_watcher(gw.port).await;

    let mut fleet = device_sim::FleetConfig::new(gw.addr());
    fleet.devices = FLEET_DEVICES;
    fleet.id_prefix = "fleet-".into();
    fleet.rate = device_sim::Rate::PerDevice(5.0);
    // Longer than the takeovers take (about 2.5 s on 2 cores, debug build).
    fleet.duration = Some(FLEET_DURATION);
    let sim = tokio::spawn(device_sim::run(fleet));

    let failures: Failures = Default::default();
    let sequences: Vec<_> = (0..TAKEOVER_IDS)
        .map(|i| {
            tokio::spawn(take_over_repeatedly(
                gw.port,
                format!("takeover-{i}"),
                failures.clone(),
            ))
        })
        .collect();
    let mut last = Vec::new();
    for sequence in sequences {
        last.push(sequence.await.unwrap());
    }
    let takeover_time = started.elapsed();
    assert!(
        takeover_time < FLEET_DURATION,
        "the takeovers took {takeover_time:?}, longer than the fleet published"
    );
    // The last connections are up: a round trip through the broker on each.
    for connection in &mut last {
        connection.round_trip("takeover/check").await;
    }

    let summary = tokio::time::timeout(FLEET_DURATION + Duration::from_secs(30), sim)
        .await
        .expect("device-sim stops")
        .unwrap()
        .unwrap();

    // Every superseded connection's will, each once; none of a current connection.
    let expected: BTreeSet<String> = (0..TAKEOVER_IDS)
        .flat_map(|i| (0..TAKEOVERS_PER_ID).map(move |n| format!("takeover-{i}/{n}")))
        .collect();
    wait_until_async(
        "every superseded connection's will",
        Duration::from_secs(20),
        || wills.lock().unwrap().len() >= expected.len(),
    )
    .await;

    // The last connections are still up: nothing the broker did closed them.
    for connection in &last {
        assert!(!connection.task.is_finished(), "a current connection ended");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );

    let wills = wills.lock().unwrap().clone();
    let unique: BTreeSet<String> = wills.iter().cloned().collect();
    assert_eq!(unique.len(), wills.len(), "a will published twice");
    assert_eq!(
        unique, expected,
        "wills of exactly the superseded connections"
    );

    // The fleet was never disconnected and every reading it published was stored.
    assert_eq!(summary.totals.errors, 0, "{:?}", summary.totals);
    assert_eq!(
        summary.totals.connects, FLEET_DEVICES as u64,
        "{:?}",
        summary.totals
    );
    let published: u64 = summary.readings.iter().map(|(_, n)| n).sum();
    assert!(published > 0);
    assert_eq!(
        summary.totals.acked, summary.totals.sent,
        "{:?}",
        summary.totals
    );
    wait_until_async(
        "every fleet reading stored",
        Duration::from_secs(20),
        || readings(&gw) == published,
    )
    .await;
    watcher.abort();
    println!(
        "{} takeovers in {takeover_time:?}",
        TAKEOVER_IDS * TAKEOVERS_PER_ID
    );
}

/// MQTT 3.1.1 CONNECT (clean session, keep alive 0) of `client_id` with a QoS 0 will.
fn connect_with_will(client_id: &str, will_topic: &str, will: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x06, 0, 0];
    for field in [client_id, will_topic, will] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    packet(0x10, body)
}

/// MQTT 3.1.1 SUBSCRIBE (packet id 1) of `filter` at QoS 0.
fn subscribe_packet(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0);
    packet(0x82, body)
}

/// A packet of type `header` with `body` (remaining length < 128).
fn packet(header: u8, body: Vec<u8>) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut p = vec![header, body.len() as u8];
    p.extend(body);
    p
}

/// Bytes the gateway's side of the connection to local port `client_port` has sent and
/// not had acknowledged (`tx_queue` of /proc/net/tcp).
fn server_send_queue(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        (port(fields[1])? == server_port && port(fields[2])? == client_port)
            .then(|| u64::from_str_radix(fields[4].split(':').next()?, 16).ok())?
    })
}

/// The race made certain: the old connection's task is stuck writing to a client that
/// stopped reading while a new connection with its client id takes over (and, in
/// rumqttd, gets the same connection id); when the old socket finally fails, that task
/// reports its disconnect. The new connection must stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_disconnect_of_a_replaced_connection_leaves_the_new_one_up() {
    use std::io::{Read, Write};

    let gw = Gateway::start(&[]);
    let (wills, watcher) = will_watcher(gw.port).await;

    // The old connection: subscribes to the flood, then never reads again.
    let mut old = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    old.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    old.write_all(&connect_with_will("stalled", "takeover/old/will", "old"))
        .unwrap();
    old.write_all(&subscribe_packet("stall/flood")).unwrap();
    let mut acks = [0u8; 9]; // CONNACK (4 bytes) and SUBACK (5 bytes)
    old.read_exact(&mut acks).unwrap();
    assert_eq!((acks[0], acks[3], acks[4]), (0x20, 0, 0x90), "{acks:?}");
    let old_port = old.local_addr().unwrap().port();

    // Flood it until the gateway's send queue to it stops growing: its connection task
    // is then blocked writing.
    let mut opts = MqttOptions::new("stall-flooder", "127.0.0.1", gw.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (flooder, mut flood_loop) = AsyncClient::new(opts, 100);
    let flood_task = tokio::spawn(async move { while flood_loop.poll().await.is_ok() {} });
    let payload = vec![b'x'; 32 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_queue = 0;
    loop {
        for _ in 0..32 {
            flooder
                .publish("stall/flood", QoS::AtMostOnce, false, payload.clone())
                .await
                .unwrap();
        }
        let queue = wait_for_queue(gw.port, old_port).await;
        if queue > 0 && queue == last_queue {
            break;
        }
        last_queue = queue;
        assert!(Instant::now() < deadline, "the send queue never filled");
    }

    // The takeover, then the old socket fails under the stuck task (unread data: RST).
    let failures: Failures = Default::default();
    let mut new = connect(gw.port, "stalled", 1, &failures).await;
    drop(old);
    // The old connection's task sends its will after its disconnect: once a will is
    // out, the router has seen that disconnect.
    wait_until_async("a will", Duration::from_secs(10), || {
        !wills.lock().unwrap().is_empty()
    })
    .await;
    new.round_trip("stall/check").await;
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(!new.task.is_finished(), "the new connection ended");
    // The will was the old connection's own, not the new one's.
    assert_eq!(*wills.lock().unwrap(), ["old"]);
    flood_task.abort();
    watcher.abort();
}

/// The send queue after the flooder's last publishes have had a moment to be written.
async fn wait_for_queue(server_port: u16, client_port: u16) -> u64 {
    // Let the broker write what it can; the queue is read again on the next round.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server_send_queue(server_port, client_port).expect("the old connection is open")
}
