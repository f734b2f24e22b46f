//! The packet-id FIFO of a session with presence messages in it: rumqttc's events are fed
//! to [`Session::handle`] by hand, in the order a connection would produce them.

use rumqttc::v5::MqttOptions;

use super::*;
use crate::config::{Config, UpstreamInflight, UpstreamUrl};
use crate::forwarder::{ForwarderConfig, ForwarderStats};
use crate::store::{Store, StoreConfig};

fn forwarder(dir: &std::path::Path, qos: u8) -> Forwarder {
    forwarder_with(dir, |config| config.upstream.qos = qos)
}

pub(in crate::forwarder) fn forwarder_with(
    dir: &std::path::Path,
    set: impl FnOnce(&mut Config),
) -> Forwarder {
    let mut config = Config::defaults();
    config.upstream.url = Some(UpstreamUrl::mqtt("127.0.0.1", 1883).into());
    set(&mut config);
    let store = Store::open(&dir.join("gw.redb"), StoreConfig::from_config(&config)).unwrap();
    Forwarder::new(ForwarderConfig::from_config(&config).unwrap(), store).unwrap()
}

/// A client whose requests are queued but never sent (its event loop is not polled).
fn client() -> (Client, rumqttc::v5::EventLoop) {
    client_queueing(16)
}

/// [`client`] with room for `requests` queued requests.
fn client_queueing(requests: usize) -> (Client, rumqttc::v5::EventLoop) {
    let (client, eventloop) = rumqttc::v5::AsyncClient::new(
        MqttOptions::new("session-test", "127.0.0.1", 1883),
        requests,
    );
    (Client::V5(client), eventloop)
}

fn row(seq: u64) -> InFlight {
    InFlight::Rows(Sent {
        lane: Lane::Reading,
        seqs: smallvec::smallvec![seq],
        received_at: now_millis(),
    })
}

fn sent(pkid: u16) -> PumpEvent {
    Ok(Wire::Sent(pkid))
}

fn puback(pkid: u16) -> PumpEvent {
    Ok(Wire::PubAck {
        pkid,
        outcome: AckOutcome::Accepted,
    })
}

#[test]
fn presence_publishes_take_their_own_place_in_the_packet_id_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let fwd = forwarder(dir.path(), 1);
    let (client, _eventloop) = client();
    let mut s = Session::new(&fwd, &client, fwd.cfg.max_window());
    s.announce(Status::Online).unwrap();
    s.awaiting_pkid.push_back(row(1));
    s.awaiting_pkid.push_back(row(2));
    for pkid in 1..=3 {
        assert!(s.handle(sent(pkid)));
    }
    assert_eq!(s.in_flight(), 3);

    // Packet id 1 is the status's: its PUBACK acks no row.
    assert!(s.handle(puback(1)));
    assert_eq!(s.acked_status, Some(Status::Online));
    assert!(s.acks[Lane::Reading].is_empty());
    // Each row is acked by its own PUBACK, in whatever order they come.
    assert!(s.handle(puback(3)));
    assert_eq!(s.acks[Lane::Reading], [2]);
    assert!(s.handle(puback(2)));
    assert_eq!(s.acks[Lane::Reading], [2, 1]);
    assert_eq!(ForwarderStats::get(&fwd.stats.rows_acked), 2);

    s.announce(Status::Shutdown).unwrap();
    assert!(s.handle(sent(4)));
    assert_eq!(s.in_flight(), 1, "the offline status awaits its PUBACK");
    assert!(s.handle(puback(4)));
    assert_eq!(s.acked_status, Some(Status::Shutdown));
    assert_eq!(s.in_flight(), 0);
    assert_eq!(ForwarderStats::get(&fwd.stats.rows_acked), 2);
    fwd.store.shutdown().unwrap();
}

#[test]
fn with_qos_0_rows_are_done_on_send_and_the_status_still_awaits_its_puback() {
    let dir = tempfile::tempdir().unwrap();
    let fwd = forwarder(dir.path(), 0);
    let (client, _eventloop) = client();
    let mut s = Session::new(&fwd, &client, fwd.cfg.max_window());
    s.announce(Status::Online).unwrap();
    s.awaiting_pkid.push_back(row(1));
    assert!(s.handle(sent(1)));
    assert!(s.handle(sent(0)));
    assert_eq!(s.acks[Lane::Reading], [1], "a QoS 0 row is done once sent");
    assert_eq!(s.in_flight(), 1);
    assert!(s.handle(puback(1)));
    assert_eq!(s.acked_status, Some(Status::Online));
    assert_eq!(s.in_flight(), 0);
    fwd.store.shutdown().unwrap();
}

#[test]
fn a_drained_outbox_leaves_the_row_buffers_no_more_room_than_they_keep() {
    const ROWS: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let fwd = forwarder_with(dir.path(), |config| {
        config.upstream.max_inflight = UpstreamInflight::Fixed(2 * ROWS as u16)
    });
    for i in 0..ROWS {
        let device = format!("d{}", i % 10);
        let entry = crate::store::OutboxEntry::reading(
            &format!("devices/{device}/telemetry"),
            &device,
            format!("{{\"n\":{i}}}").as_bytes(),
            crate::reading::Format::Json,
            now_millis(),
        );
        assert!(fwd.store.append(entry), "store queue full");
    }
    fwd.store.flush_blocking().unwrap();
    let (client, _eventloop) = client_queueing(2 * ROWS);
    let mut s = Session::new(&fwd, &client, fwd.cfg.max_window());

    // One read takes the whole backlog into the buffer; every row is sent.
    assert!(matches!(s.fill(), Ok(Idle::NoRows)));
    assert_eq!(s.in_flight(), ROWS);
    for lane in Lane::ALL {
        assert!(s.buffered[lane].is_empty());
        let room = s.buffered[lane].capacity();
        assert!(room <= ROWS_KEEP, "{lane:?} keeps room for {room} rows");
    }
    assert!(
        s.scratch.capacity() <= ROWS_KEEP,
        "{}",
        s.scratch.capacity()
    );
    fwd.store.shutdown().unwrap();
}

#[test]
fn a_row_whose_topic_has_a_wildcard_is_deleted_and_counted_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let fwd = forwarder(dir.path(), 1);
    for topic in [
        "devices/d1/telemetry",
        "devices/+/telemetry",
        "devices/d2/#",
    ] {
        let entry = crate::store::OutboxEntry::reading(
            topic,
            "d1",
            b"{\"n\":1}",
            crate::reading::Format::Json,
            now_millis(),
        );
        assert!(fwd.store.append(entry), "store queue full");
    }
    fwd.store.flush_blocking().unwrap();
    let (client, _eventloop) = client();
    let mut s = Session::new(&fwd, &client, fwd.cfg.max_window());

    assert!(matches!(s.fill(), Ok(Idle::NoRows)));
    assert_eq!(s.in_flight(), 1, "only the first row is sent");
    let dropped = &fwd.stats.rows_dropped_unsendable;
    assert_eq!(ForwarderStats::get(dropped), 2);
    assert_eq!(s.acks[Lane::Reading].len(), 2, "the other two are deleted");
    fwd.store.shutdown().unwrap();
}
