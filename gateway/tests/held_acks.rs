//! The embedded broker's held acknowledgements (`vendor/rumqttd/src/link/ingest.rs`,
//! PATCHES.md): the order acks leave a connection in, a refused ack, QoS 2 completed on
//! the connection, and MQTT 5 topic aliases resolved before the application sees them.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::ingest::{HeldAcks, Subscribed};
use rumqttd::protocol::{
    Filter, Packet, PubRel, PubRelReason, Publish, PublishProperties, QoS, RetainForwardRule,
    Subscribe,
};
use rumqttd::{IngestHook, Ingested};

/// A PUBLISH as the network parser yields it (`Publish::deserialize` is the one public
/// constructor that sets QoS and packet id).
fn publish(qos: u8, pkid: u16, topic: &str) -> Packet {
    let mut b = BytesMut::new();
    b.put_u8(0b0011_0000 | (qos << 1));
    b.put_u16(pkid);
    b.put_u16(topic.len() as u16);
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(b"1");
    Packet::Publish(Publish::deserialize(b.freeze()), None)
}

fn acks(packets: &VecDeque<Packet>) -> Vec<(char, u16)> {
    packets
        .iter()
        .map(|p| match p {
            Packet::PubAck(a, _) => ('a', a.pkid),
            Packet::PubRec(r, _) => ('r', r.pkid),
            Packet::PubComp(c, _) => ('c', c.pkid),
            _ => panic!("not an ack: {p:?}"),
        })
        .collect()
}

/// Packet id and QoS of a publish the router gets (read back through `serialize`).
fn router_view(packet: &Packet) -> (u8, u16) {
    let Packet::Publish(p, _) = packet else {
        panic!("not a publish: {packet:?}")
    };
    let bytes = p.serialize();
    (
        (bytes[0] >> 1) & 0b11,
        u16::from_be_bytes([bytes[1], bytes[2]]),
    )
}

#[test]
fn acks_leave_in_publish_order_once_released() {
    let (hook, _rx) = IngestHook::bounded(8);
    let mut held = HeldAcks::new(hook, None, "d");
    let mut packets = vec![
        publish(1, 1, "devices/d/t"),
        publish(0, 0, "devices/d/t"),
        publish(1, 2, "devices/d/t"),
    ];
    let mut taken = held.take(&mut packets);
    assert_eq!(taken.len(), 3);
    assert_eq!(&*taken[0].client_id, "d");
    // The router keeps every publish, with no packet id it would acknowledge.
    let seen: Vec<_> = packets.iter().map(router_view).collect();
    assert_eq!(seen, vec![(1, 0), (0, 0), (1, 0)]);
    assert!(taken[1].ack.is_none());
    assert!(acks(&held.ready().unwrap()).is_empty());
    let second = taken[2].ack.take().unwrap();
    let first = taken[0].ack.take().unwrap();
    second.release();
    // Releasing the later one releases the earlier one too, in publish order.
    assert_eq!(acks(&held.ready().unwrap()), vec![('a', 1), ('a', 2)]);
    first.release();
    assert!(acks(&held.ready().unwrap()).is_empty());
}

#[test]
fn released_acks_are_taken_one_at_a_time_and_the_rest_stay_in_order() {
    let (hook, _rx) = IngestHook::bounded(8);
    let mut held = HeldAcks::new(hook, None, "d");
    let mut packets = vec![
        publish(1, 1, "devices/d/t"),
        publish(1, 2, "devices/d/t"),
        publish(1, 3, "devices/d/t"),
    ];
    let mut taken = held.take(&mut packets);
    taken[1].ack.take().unwrap().release();
    let mut ready = held.take_ready().unwrap();
    let first = ready.next().unwrap();
    drop(ready);
    assert_eq!(acks(&VecDeque::from([first])), vec![('a', 1)]);
    // The released ack not taken yet stays first; the unreleased one stays behind it.
    assert_eq!(acks(&held.ready().unwrap()), vec![('a', 2)]);
    taken[2].ack.take().unwrap().release();
    assert_eq!(acks(&held.take_ready().unwrap().collect()), vec![('a', 3)]);
    assert_eq!(held.take_ready().unwrap().count(), 0);
}

#[test]
fn an_ack_dropped_unreleased_refuses_the_connection() {
    let (hook, _rx) = IngestHook::bounded(8);
    let mut held = HeldAcks::new(hook, None, "d");
    let mut packets = vec![publish(1, 1, "devices/d/t")];
    let taken = held.take(&mut packets);
    assert!(held.ready().is_ok());
    drop(taken);
    assert!(held.ready().is_err());
}

#[test]
fn qos2_is_handed_over_once_and_completed_on_the_connection() {
    let (hook, _rx) = IngestHook::bounded(8);
    let mut held = HeldAcks::new(hook, None, "d");
    let mut packets = vec![publish(2, 7, "devices/d/t"), publish(2, 7, "devices/d/t")];
    let mut taken = held.take(&mut packets);
    assert_eq!(taken.len(), 1, "the repeat is not handed over again");
    assert_eq!(taken[0].qos, 2);
    assert_eq!(
        packets.iter().map(router_view).collect::<Vec<_>>(),
        vec![(1, 0)]
    );
    taken[0].ack.take().unwrap().release();
    assert_eq!(acks(&held.ready().unwrap()), vec![('r', 7), ('r', 7)]);
    let pubrel = PubRel {
        pkid: 7,
        reason: PubRelReason::Success,
    };
    let mut packets = vec![Packet::PubRel(pubrel, None)];
    assert!(held.take(&mut packets).is_empty());
    assert!(packets.is_empty(), "the router does not see the PUBREL");
    assert_eq!(acks(&held.ready().unwrap()), vec![('c', 7)]);
}

#[test]
fn topic_aliases_are_resolved_before_the_hand_off() {
    let (hook, _rx) = IngestHook::bounded(8);
    let mut held = HeldAcks::new(hook, None, "d");
    let with_alias = |packet: Packet| match packet {
        Packet::Publish(p, _) => Packet::Publish(
            p,
            Some(PublishProperties {
                topic_alias: Some(3),
                ..Default::default()
            }),
        ),
        p => p,
    };
    let mut first = with_alias(publish(0, 0, "devices/d/t"));
    let mut second = with_alias(publish(0, 0, ""));
    let mut unknown = with_alias(publish(0, 0, ""));
    if let Packet::Publish(_, Some(p)) = &mut unknown {
        p.topic_alias = Some(4);
    }
    held.resolve_alias(&mut first);
    held.resolve_alias(&mut second);
    held.resolve_alias(&mut unknown);
    let mut packets = vec![first, second, unknown];
    let taken = held.take(&mut packets);
    let topics: Vec<Bytes> = taken.iter().map(|i| i.topic.clone()).collect();
    // An unknown alias is left to the router, which refuses it and disconnects.
    assert_eq!(topics, vec!["devices/d/t", "devices/d/t"]);
    assert_eq!(packets.len(), 3);
    // The resolved ones reach the router without the alias.
    assert!(taken[1]
        .properties
        .as_ref()
        .is_some_and(|p| p.topic_alias.is_none()));
}

/// The ingest channel keeps the capacity its queue once reached (a burst of 8,000 waiting
/// publishes left 2.1 MB behind with 256-byte slots): a slot stays small.
#[test]
fn an_ingest_channel_slot_is_small() {
    let size = std::mem::size_of::<Ingested>();
    assert!(size <= 128, "{size} bytes");
}

#[test]
fn the_router_gets_only_what_a_subscription_may_want() {
    let (hook, _rx) = IngestHook::bounded(8);
    let subscribed = Subscribed::default();
    subscribed.insert("events/+/d");
    subscribed.insert("+/status");
    let mut held = HeldAcks::new(hook, Some(subscribed.clone()), "d");
    let mut retained = publish(0, 0, "devices/d/t");
    if let Packet::Publish(p, _) = &mut retained {
        p.retain = true;
    }
    let mut packets = vec![
        publish(1, 1, "devices/d/t"),
        publish(0, 0, "events/Hot/d"),
        publish(0, 0, "x/status"),
        retained,
    ];
    let taken = held.take(&mut packets);
    assert_eq!(taken.len(), 4, "the application gets every publish");
    let topics: Vec<Bytes> = packets
        .iter()
        .map(|p| match p {
            Packet::Publish(p, _) => p.topic.clone(),
            p => panic!("{p:?}"),
        })
        .collect();
    // Device data nobody subscribed to stays away from the router; a retained publish
    // goes there to be kept.
    assert_eq!(topics, vec!["events/Hot/d", "x/status", "devices/d/t"]);
    // A subscription made later is seen by the next read.
    subscribed.insert("devices/#");
    let mut packets = vec![publish(0, 0, "devices/d/t")];
    held.take(&mut packets);
    assert_eq!(packets.len(), 1);
}

/// Acks released on another thread reach their connections through the listener's relay
/// (patch 27): every connection is woken and sends its acks, in order, whether its
/// releases come in one batch or one at a time racing the relay's turns.
#[test]
fn releases_from_another_thread_wake_every_connection_through_the_relay() {
    use std::time::Duration;

    use rumqttd::ingest::AckRelay;

    const CONNECTIONS: usize = 50;
    const ROUNDS: u16 = 200;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let relay = AckRelay::default();
        tokio::spawn(relay.clone().run());
        let (hook, _rx) = IngestHook::bounded(CONNECTIONS * usize::from(ROUNDS));
        let mut held: Vec<HeldAcks> = (0..CONNECTIONS)
            .map(|i| HeldAcks::relayed(hook.clone(), None, &format!("d{i}"), Some(relay.clone())))
            .collect();
        for round in 1..=ROUNDS {
            let mut pending = Vec::new();
            for h in &mut held {
                let mut packets = vec![publish(1, round, "devices/d/t")];
                pending.push(h.take(&mut packets).remove(0).ack.unwrap());
            }
            let signals: Vec<_> = held.iter().map(HeldAcks::signal).collect();
            // Odd rounds: one batch after another thread has taken them all; even rounds:
            // one at a time, so releases and the relay's turns interleave.
            let one_by_one = round % 2 == 0;
            let releaser = std::thread::spawn(move || {
                for ack in pending {
                    ack.release();
                    if one_by_one {
                        std::thread::yield_now();
                    }
                }
            });
            for (h, signal) in held.iter_mut().zip(&signals) {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let ready = h.ready().unwrap();
                    if !ready.is_empty() {
                        assert_eq!(acks(&ready), vec![('a', round)]);
                        break;
                    }
                    tokio::time::timeout_at(deadline, signal.notified())
                        .await
                        .expect("a released ack woke its connection within 10 s");
                }
            }
            releaser.join().unwrap();
        }
    });
}

/// A client that subscribes and publishes before its SUBACK (in one network read, as a
/// client that writes its queued requests at once does) gets its own message: until the
/// router acknowledges the SUBSCRIBE its filter may not be registered yet, so every
/// publish of the connection goes to the router (patch 28).
#[test]
fn publishes_go_to_the_router_while_the_clients_own_subscribe_is_unacknowledged() {
    let (hook, _rx) = IngestHook::bounded(8);
    let subscribed = Subscribed::default();
    let mut held = HeldAcks::new(hook, Some(subscribed.clone()), "d");
    let subscribe = Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![Filter {
                path: "devices/d/t".into(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            }],
        },
        None,
    );
    let mut packets = vec![subscribe, publish(1, 2, "devices/d/t")];
    assert_eq!(held.take(&mut packets).len(), 1);
    assert_eq!(
        packets.len(),
        2,
        "the subscribe and the publish both reach the router"
    );
    // A later read, still before the SUBACK.
    let mut packets = vec![publish(1, 3, "devices/d/t")];
    held.take(&mut packets);
    assert_eq!(packets.len(), 1);
    // The router registered the filter and acknowledged: back to what a subscription
    // may want.
    subscribed.insert("devices/d/t");
    held.subscriptions_acknowledged(1);
    let mut packets = vec![
        publish(1, 4, "devices/d/t"),
        publish(1, 5, "devices/d/other"),
    ];
    held.take(&mut packets);
    assert_eq!(packets.len(), 1);
    assert_eq!(router_view(&packets[0]), (1, 0));
}

#[test]
fn the_hook_wakes_the_application_each_time_a_group_s_worth_waits() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let woken = Arc::new(AtomicUsize::new(0));
    let (hook, rx) = IngestHook::bounded(16);
    let counted = woken.clone();
    let hook = hook.wake_at(3, move || {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let mut held = HeldAcks::new(hook, None, "d");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut hand_over = |n: u16| {
        let mut packets: Vec<Packet> = (1..=n).map(|i| publish(0, i, "devices/d/t")).collect();
        let mut taken = held.take(&mut packets);
        assert!(runtime.block_on(held.hand_over(&mut taken)));
    };
    // Two waiting: not yet; the third: once, and not again for the fourth and fifth.
    hand_over(2);
    assert_eq!(woken.load(Ordering::SeqCst), 0);
    hand_over(3);
    assert_eq!(woken.load(Ordering::SeqCst), 1);
    assert_eq!(rx.len(), 5);
    // Taken by the application: the next time three wait wakes it again.
    rx.drain().for_each(drop);
    hand_over(3);
    assert_eq!(woken.load(Ordering::SeqCst), 2);
}

#[test]
fn every_read_s_publishes_pass_through_one_buffer_the_connection_keeps() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (hook, rx) = IngestHook::bounded(8);
    let mut held = HeldAcks::new(hook, None, "d");
    // Two reads taken into the same buffer: appended, in order.
    let mut ingested = Vec::new();
    let mut first = vec![publish(1, 1, "devices/d/a"), publish(1, 2, "devices/d/b")];
    held.take_into(&mut first, &mut ingested);
    let mut second = vec![publish(1, 3, "devices/d/c")];
    held.take_into(&mut second, &mut ingested);
    let topics: Vec<_> = ingested.iter().map(|i| i.topic.clone()).collect();
    assert_eq!(topics, ["devices/d/a", "devices/d/b", "devices/d/c"]);
    // Handed over: the buffer is left empty with its room, the application has all three.
    let room = ingested.capacity();
    assert!(runtime.block_on(held.hand_over(&mut ingested)));
    assert!(ingested.is_empty());
    assert_eq!(ingested.capacity(), room);
    let mut received: Vec<Ingested> = rx.drain().collect();
    assert_eq!(received.len(), 3);
    for i in &mut received {
        i.ack.take().unwrap().release();
    }
    assert_eq!(
        acks(&held.ready().unwrap()),
        vec![('a', 1), ('a', 2), ('a', 3)]
    );
    // The application gone: `false`, the buffer emptied all the same, the ack refused.
    drop(rx);
    let mut third = vec![publish(1, 4, "devices/d/d")];
    held.take_into(&mut third, &mut ingested);
    assert!(!runtime.block_on(held.hand_over(&mut ingested)));
    assert!(ingested.is_empty());
    assert!(held.ready().is_err());
}
