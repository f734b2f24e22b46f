//! The pump's batches: what one poll produces crosses the channel at once, and the
//! session still takes the events one at a time, in order.

use std::time::Duration;

use test_support::Rumqttd;

use super::*;
use crate::config::UpstreamUrl;
use crate::forwarder::session::tests::forwarder_with;

const WAIT: Duration = Duration::from_secs(5);

fn sent(batch: &PumpBatch) -> Vec<u16> {
    batch
        .iter()
        .map(|ev| match ev {
            Ok(Wire::Sent(pkid)) => *pkid,
            other => panic!("expected only Outgoing::Publish events, got {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn events_come_out_one_at_a_time_in_order_across_batches() {
    let (tx, rx) = mpsc::channel(4);
    let mut events = Events::new(rx);
    assert!(events.try_recv().is_none(), "nothing sent yet");
    tx.send(smallvec::smallvec![Ok(Wire::Sent(1)), Ok(Wire::Sent(2))])
        .await
        .unwrap();
    tx.send(smallvec::smallvec![Ok(Wire::Sent(3))])
        .await
        .unwrap();
    let pkid = |ev: Option<PumpEvent>| match ev {
        Some(Ok(Wire::Sent(pkid))) => pkid,
        other => panic!("expected a Sent event, got {other:?}"),
    };
    assert_eq!(pkid(events.recv().await), 1);
    assert_eq!(pkid(events.try_recv()), 2);
    assert_eq!(pkid(events.try_recv()), 3);
    assert!(events.try_recv().is_none(), "every event was taken");
    tx.send(smallvec::smallvec![Err(WireError {
        message: "gone".into(),
        tls: false,
    })])
    .await
    .unwrap();
    drop(tx);
    assert!(matches!(events.recv().await, Some(Err(_))));
    assert!(events.recv().await.is_none(), "the pump has ended");
}

/// Ten publishes queued while the pump waits leave in one write (rumqttc's request batch,
/// `vendor/rumqttc/PATCHES.md`); their ten `Outgoing::Publish` events come from one poll
/// and reach the session as one batch, in request order. Over either MQTT version.
#[tokio::test]
async fn the_events_of_one_poll_cross_the_channel_as_one_batch() {
    let broker = Rumqttd::start();
    for (protocol, port) in [
        (UpstreamProtocol::V5, broker.port),
        (UpstreamProtocol::V311, broker.v311_port),
    ] {
        let url = UpstreamUrl::mqtt("127.0.0.1", port);
        let dir = tempfile::tempdir().unwrap();
        let fwd = forwarder_with(dir.path(), |config| {
            config.upstream.url = Some(url.clone().into());
            config.upstream.protocol = protocol;
        });
        let mut conn = Connection::open(&fwd, &url);
        let connack = tokio::time::timeout(WAIT, conn.events.recv()).await;
        assert!(
            matches!(connack, Ok(Some(Ok(Wire::ConnAck { .. })))),
            "{protocol:?}: no ConnAck: {connack:?}"
        );
        for i in 0..10 {
            conn.client
                .try_publish(
                    Bytes::from(format!("batch/{i}")),
                    QoS::AtLeastOnce,
                    false,
                    Bytes::from_static(b"{}"),
                    PublishProperties::default(),
                )
                .unwrap();
        }
        let batch = tokio::time::timeout(WAIT, conn.events.rx.recv())
            .await
            .expect("the pump hands the publishes over")
            .expect("the pump is running");
        assert_eq!(sent(&batch), (1..=10).collect::<Vec<u16>>(), "{protocol:?}");
    }
}
