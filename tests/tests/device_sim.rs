//! End-to-end: device-sim's shipped overheat scenario against the real gateway with the
//! shipped example rules gives one `SensorTemperatureExceeded` firing and one resolved
//! event for the overheating device, and none for the others; and `device-sim bench`
//! through the gateway (as `bench/run.sh` runs it) counts the readings only: the
//! devices' connects and disconnects forwarded beside them are not `unexpected`.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use test_support::{counter, Collector, Gateway, Mosquitto};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overheat_scenario_fires_and_resolves_the_temperature_rule() {
    let rules_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../rules");
    let mut gw = Gateway::start(&[("GATEWAY__RULES__DIR", rules_dir)]);

    let mut opts = MqttOptions::new("overheat-watcher", "127.0.0.1", gw.port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .subscribe("events/SensorTemperatureExceeded/+", QoS::AtMostOnce)
        .await
        .unwrap();
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let _client = client;
        while let Ok(ev) = el.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = ready_tx.send(()).await;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(serde_json::from_slice(&p.payload).unwrap());
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready.recv())
        .await
        .expect("SUBACK");

    let scenario = device_sim::Scenario::shipped("overheat").unwrap();
    let mut fleet = device_sim::FleetConfig::from_scenario(gw.addr(), scenario);
    fleet.progress = None;
    let stop = CancellationToken::new();
    let sim = tokio::spawn(device_sim::run_until(fleet, stop.clone()));

    // The spike starts at 20 s and passes 75 °C at about 29 s; `for = "10s"` fires ~39 s.
    let firing = tokio::time::timeout(Duration::from_secs(70), events.recv())
        .await
        .expect("firing event")
        .unwrap();
    assert_eq!(firing["subject"], "t-0001");
    assert_eq!(firing["data"]["state"], "firing");
    assert!(firing["data"]["values"]["temperature"].as_f64().unwrap() > 75.0);
    // Below 70 °C from about 71 s.
    let resolved = tokio::time::timeout(Duration::from_secs(50), events.recv())
        .await
        .expect("resolved event")
        .unwrap();
    assert_eq!(resolved["subject"], "t-0001");
    assert_eq!(resolved["data"]["state"], "resolved");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), events.recv())
            .await
            .is_err(),
        "nothing for the other devices"
    );

    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(30), sim)
        .await
        .expect("device-sim stops")
        .unwrap()
        .unwrap();
    assert_eq!(summary.totals.errors, 0);
    let gw_summary = gw.stop();
    assert_eq!(counter(&gw_summary, "dead_lettered"), 0, "{gw_summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_through_the_gateway_counts_readings_not_device_events() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let events = Collector::start(mosquitto.port, "bench/events/+/+").await;
    let url = format!("mqtt://127.0.0.1:{}", mosquitto.port);
    // As bench/run.sh starts it: upstream prefix `bench`, device events on (the default).
    let mut gw = Gateway::start(&[
        ("GATEWAY__UPSTREAM__URL", url.as_str()),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "bench"),
    ]);
    let mut fleet = device_sim::FleetConfig::new(gw.addr());
    fleet.devices = 4;
    fleet.count = Some(50); // in all
    fleet.duration = Some(Duration::from_secs(30));
    fleet.rate = device_sim::Rate::PerDevice(100.0);
    fleet.progress = None;
    let mut up = device_sim::UpstreamConfig::new(mosquitto.addr(), "bench/devices/#");
    up.settle = Duration::from_secs(1);
    up.max_wait = Duration::from_secs(20);
    let r = device_sim::bench::run(fleet, up).await.unwrap();

    assert_eq!((r.delivered, r.lost), (50, 0), "{r:?}");
    assert_eq!((r.unexpected, r.undecodable), (0, 0), "{r:?}");
    // The events did travel upstream, on their own topics.
    test_support::wait_until_async(
        "4 DeviceConnected upstream",
        Duration::from_secs(10),
        || {
            events
                .device_events()
                .iter()
                .filter(|m| m.topic.starts_with("bench/events/DeviceConnected/"))
                .count()
                >= 4
        },
    )
    .await;
    gw.stop();
}
