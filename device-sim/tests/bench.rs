//! Bench mode against a real mosquitto: exact delivery through a clean path,
//! and exact loss and duplicate counts through a forwarder that misbehaves on purpose.

use std::time::Duration;

use device_sim::bench::WaitEnd;
use device_sim::stats::Watch;
use device_sim::{FleetConfig, Rate, UpstreamConfig};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use test_support::Mosquitto;

fn fleet(broker: &str, devices: u32, count: u64) -> FleetConfig {
    let mut cfg = FleetConfig::new(broker);
    cfg.devices = devices;
    cfg.count = Some(count);
    cfg.duration = Some(Duration::from_secs(30));
    cfg.rate = Rate::PerDevice(100.0);
    cfg
}

fn upstream(broker: &str, topic: &str) -> UpstreamConfig {
    let mut up = UpstreamConfig::new(broker, topic);
    up.settle = Duration::from_secs(1);
    up.max_wait = Duration::from_secs(10);
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_path_delivers_everything_once() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let mut up = upstream(&mosquitto.addr(), "devices/#");
    up.watch = vec![Watch {
        name: "mosquitto".into(),
        pid: mosquitto.pid(),
    }];
    up.label = "direct".into();
    let r = device_sim::bench::run(fleet(&mosquitto.addr(), 10, 300), up)
        .await
        .unwrap();
    assert_eq!(r.fleet.totals.published, 300);
    assert_eq!(
        (r.received, r.delivered, r.lost, r.duplicated),
        (300, 300, 0, 0)
    );
    assert_eq!(
        (r.unexpected, r.undecodable, r.upstream_messages),
        (0, 0, 300)
    );
    let l = r.latency_ms;
    assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max, "{l:?}");
    assert!(r.delivered_rate > 0.0);
    let wait = r.wait.expect("the wait is recorded");
    assert_eq!(wait.end, WaitEnd::AllDelivered);
    assert!(wait.secs < 10.0, "{wait:?}");
    let text = device_sim::report::bench(&r);
    assert!(
        text.contains("after publishing: every reading had arrived"),
        "{text}"
    );
    let p = &r.processes[0];
    assert_eq!((p.name.as_str(), p.pid), ("mosquitto", mosquitto.pid()));
    assert!(p.rss_kb > 0 && p.peak_rss_kb >= p.rss_kb);
    // Mosquitto's CPU for 600 small messages is often less than one clock tick (10 ms),
    // so it may read 0 here; the CPU figures themselves are checked against a busy loop
    // in `stats::tests::own_cpu_is_measured`.
    assert!(p.cpu_s.is_finite() && p.cpu_s >= 0.0, "{p:?}");
}

/// Republishes `devices/#` to `bench/devices/#`, dropping every 10th message
/// and sending every 7th twice, each `delay` after the one before; returns
/// (forwarded, dropped, doubled) counts. The republished messages leave from a task of
/// their own, so the event loop keeps reading and writing in between: paced inside the
/// loop, they would wait behind every incoming publish of a read, and leave in bursts.
async fn lossy_forwarder(
    broker: String,
    delay: Duration,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> (u64, u64, u64) {
    let (host, port) = broker.rsplit_once(':').unwrap();
    let o = MqttOptions::new("lossy-forwarder", host, port.parse().unwrap());
    let (client, mut eventloop) = AsyncClient::new(o, 10_000);
    client
        .subscribe("devices/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (to_pacer, mut paced) = tokio::sync::mpsc::unbounded_channel();
    let pacer = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some((topic, payload)) = paced.recv().await {
                tokio::time::sleep(delay).await;
                if client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let mut ready = Some(ready);
    let (mut n, mut dropped, mut doubled) = (0u64, 0u64, 0u64);
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = eventloop.poll() => ev.expect("forwarder connection"),
        };
        match ev {
            Event::Incoming(Incoming::SubAck(_)) => {
                let _ = ready.take().map(|r| r.send(()));
            }
            Event::Incoming(Incoming::Publish(p)) => {
                n += 1;
                if n % 10 == 0 {
                    dropped += 1;
                    continue;
                }
                let copies = if n % 7 == 0 { 2 } else { 1 };
                doubled += copies - 1;
                for _ in 0..copies {
                    let topic = format!("bench/{}", p.topic);
                    to_pacer.send((topic, p.payload.clone())).unwrap();
                }
            }
            _ => {}
        }
    }
    pacer.abort();
    (n, dropped, doubled)
}

/// [`lossy_forwarder`] on `broker`, subscribed; cancel the token to stop it.
async fn start_lossy_forwarder(
    broker: String,
    delay: Duration,
) -> (
    tokio::task::JoinHandle<(u64, u64, u64)>,
    tokio_util::sync::CancellationToken,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let forwarder = tokio::spawn(lossy_forwarder(broker, delay, ready_tx, stop.clone()));
    tokio::time::timeout(Duration::from_secs(5), ready_rx)
        .await
        .unwrap()
        .unwrap();
    (forwarder, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_and_duplicates_are_counted_exactly() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let (forwarder, stop) = start_lossy_forwarder(mosquitto.addr(), Duration::ZERO).await;
    let r = device_sim::bench::run(
        fleet(&mosquitto.addr(), 5, 200),
        upstream(&mosquitto.addr(), "bench/devices/#"),
    )
    .await
    .unwrap();
    stop.cancel();
    let (n, dropped, doubled) = forwarder.await.unwrap();
    assert_eq!(n, 200);
    assert_eq!(
        (dropped, doubled),
        (20, 26),
        "every 10th dropped, every 7th (not 70th) doubled"
    );
    assert_eq!(r.lost, dropped);
    assert_eq!(r.duplicated, doubled);
    assert_eq!(r.delivered, 200 - dropped);
    assert_eq!(r.received, 200 - dropped + doubled);
    assert_eq!(r.unexpected, 0);
    // The dropped ones never come: the wait ends when nothing new arrived for `settle`.
    let wait = r.wait.expect("the wait is recorded");
    assert_eq!(wait.end, WaitEnd::Quiet);
    assert!(wait.secs >= 1.0 && wait.secs < 10.0, "{wait:?}");
}

/// An edge still draining when the wait runs out: the report says the missing readings
/// were still arriving (a backlog), which a quiet end does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_runs_out_while_readings_arrive_says_so() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    // 200 readings at one per 20 ms take 4 s to come through; the wait gives up after
    // 1.5 s while they still arrive every 20 ms (well inside `settle`, 1 s).
    let (forwarder, stop) =
        start_lossy_forwarder(mosquitto.addr(), Duration::from_millis(20)).await;
    let mut up = upstream(&mosquitto.addr(), "bench/devices/#");
    up.max_wait = Duration::from_millis(1500);
    let r = device_sim::bench::run(fleet(&mosquitto.addr(), 5, 200), up)
        .await
        .unwrap();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), forwarder).await;
    let wait = r.wait.expect("the wait is recorded");
    assert_eq!(wait.end, WaitEnd::MaxWait, "{r:?}");
    assert!(wait.secs >= 1.5 && wait.secs < 4.0, "{wait:?}");
    assert!(r.lost > 0 && r.delivered > 0, "{r:?}");
    let text = device_sim::report::bench(&r);
    assert!(
        text.contains("--max-wait ran out with readings still arriving"),
        "{text}"
    );
}
