//! The fleet against real brokers: exact counts, payloads that decode back.

use std::collections::BTreeMap;
use std::time::Duration;

use device_sim::{FleetConfig, Format, QoS, Rate};
use test_support::{free_port, Collector, Mosquitto, Received, Rumqttd};

fn config(broker: &str, devices: u32, count: u64) -> FleetConfig {
    let mut cfg = FleetConfig::new(broker);
    cfg.devices = devices;
    cfg.count = Some(count);
    cfg.duration = Some(Duration::from_secs(30));
    cfg.rate = Rate::PerDevice(50.0);
    cfg
}

/// Sequence numbers per device, from JSON payloads.
fn seqs_by_device(got: &[Received]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for g in got {
        let device = g.topic.split('/').nth(1).unwrap().to_owned();
        let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        out.entry(device)
            .or_default()
            .push(v["seq"].as_u64().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_is_exact_against_rumqttd() {
    let rumqttd = Rumqttd::start();
    let broker = rumqttd.v311_addr();
    let sub = Collector::start(rumqttd.port, "devices/#").await;
    // 7 devices, 100 payloads: 2 devices publish 15, 5 publish 14.
    let summary = device_sim::run(config(&broker, 7, 100)).await.unwrap();
    assert_eq!(summary.totals.published, 100);
    assert_eq!(summary.totals.acked, 100);
    assert_eq!(summary.totals.dropped, 0);
    assert_eq!(summary.connected_peak, 7);
    let got = sub.wait_settled(100, Duration::from_secs(10)).await;
    assert_eq!(
        got.len(),
        100,
        "the subscriber gets exactly --count messages"
    );
    let seqs = seqs_by_device(&got);
    assert_eq!(seqs.len(), 7);
    for (i, (device, mut s)) in seqs.into_iter().enumerate() {
        s.sort();
        let n = if i < 2 { 15 } else { 14 };
        assert_eq!(
            s,
            (0..n).collect::<Vec<u64>>(),
            "{device}: seq 0.. without gaps"
        );
        assert_eq!(device, format!("t-{:04}", i + 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_count_is_exact_against_mosquitto() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let sub = Collector::start(mosquitto.port, "devices/#").await;
    let mut cfg = config(&mosquitto.addr(), 5, 50);
    cfg.qos = QoS::AtMostOnce;
    let summary = device_sim::run(cfg).await.unwrap();
    assert_eq!(summary.totals.published, 50);
    assert_eq!(summary.totals.sent, 50);
    assert_eq!(summary.totals.acked, 0, "QoS 0 has no acks");
    let got = sub.wait_settled(50, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bounds_a_run_and_rate_is_kept() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let mut cfg = FleetConfig::new(mosquitto.addr());
    cfg.devices = 4;
    cfg.rate = Rate::Total(40.0);
    cfg.duration = Some(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let summary = device_sim::run(cfg).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(6));
    // 40/s for 2 s; the first reading is at t=0, so 80 or a few more.
    let p = summary.totals.published;
    assert!((76..=88).contains(&p), "published {p}");
    assert_eq!(summary.totals.acked, p);
    assert!(summary.cpu.cpu_s > 0.0 && summary.cpu.max_rss_kb > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_decodes_back() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    for format in Format::ALL {
        let stream = format.as_str();
        let sub = Collector::start(mosquitto.port, &format!("devices/+/{stream}")).await;
        let mut cfg = config(&mosquitto.addr(), 2, 10);
        cfg.format = format;
        cfg.stream = stream.to_owned();
        let before = device_sim::now_millis();
        device_sim::run(cfg).await.unwrap();
        let after = device_sim::now_millis();
        let got = sub.wait_settled(10, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 10, "{format}");
        for g in &got {
            let device = g.topic.split('/').nth(1).unwrap();
            let (ts, seq, temperature, humidity) = decode(format, device, &g.payload);
            assert!(
                (before..=after).contains(&ts),
                "{format}: ts {ts} is send time"
            );
            assert!(seq < 5, "{format}: seq {seq}");
            assert!(
                (15.0..=30.0).contains(&temperature),
                "{format}: {temperature}"
            );
            assert!((39.0..=51.0).contains(&humidity), "{format}: {humidity}");
        }
    }
}

/// Decodes one payload the way a consumer would, without the crate's own decoder.
fn decode(format: Format, device: &str, payload: &[u8]) -> (i64, u64, f64, f64) {
    use serde_cbor::Value as C;
    let flat = |m: &BTreeMap<String, serde_json::Value>| {
        (
            m["ts"].as_i64().unwrap(),
            m["seq"].as_u64().unwrap(),
            m["temperature"].as_f64().unwrap(),
            m["humidity"].as_f64().unwrap(),
        )
    };
    match format {
        Format::Json => flat(&serde_json::from_slice(payload).unwrap()),
        Format::Cbor => {
            let v: BTreeMap<String, serde_cbor::Value> = serde_cbor::from_slice(payload).unwrap();
            let num = |k: &str| match &v[k] {
                C::Integer(i) => *i as f64,
                C::Float(f) => *f,
                other => panic!("{k}: {other:?}"),
            };
            (
                num("ts") as i64,
                num("seq") as u64,
                num("temperature"),
                num("humidity"),
            )
        }
        Format::SenmlJson => {
            let pack: Vec<BTreeMap<String, serde_json::Value>> =
                serde_json::from_slice(payload).unwrap();
            assert_eq!(pack[0]["bn"], format!("{device}/"));
            let bt = pack[0]["bt"].as_f64().unwrap();
            let by_name = |n: &str| {
                pack.iter()
                    .find(|r| r["n"] == n)
                    .and_then(|r| r["v"].as_f64())
                    .unwrap()
            };
            let unit = pack.iter().find(|r| r["n"] == "temperature").unwrap()["u"].clone();
            assert_eq!(unit, "Cel");
            (
                (bt * 1000.0).round() as i64,
                by_name("seq") as u64,
                by_name("temperature"),
                by_name("humidity"),
            )
        }
        Format::SenmlCbor => {
            let pack: Vec<BTreeMap<i64, serde_cbor::Value>> =
                serde_cbor::from_slice(payload).unwrap();
            assert_eq!(pack[0][&-2], C::Text(format!("{device}/")));
            let C::Float(bt) = pack[0][&-3] else {
                panic!("bt is a float")
            };
            let by_name = |n: &str| {
                let r = pack.iter().find(|r| r[&0] == C::Text(n.into())).unwrap();
                match &r[&2] {
                    C::Integer(i) => *i as f64,
                    C::Float(f) => *f,
                    other => panic!("{n}: {other:?}"),
                }
            };
            (
                (bt * 1000.0).round() as i64,
                by_name("seq") as u64,
                by_name("temperature"),
                by_name("humidity"),
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_only_run_ends_when_the_broker_is_away() {
    // Nothing listens on this port.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cfg = FleetConfig::new(&addr);
    cfg.devices = 3;
    cfg.count = Some(30);
    cfg.duration = None;
    cfg.connect_timeout = Duration::from_millis(800);
    cfg.drain = Duration::from_millis(500);
    let summary = tokio::time::timeout(Duration::from_secs(10), device_sim::run(cfg))
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(summary.totals.published, 0);
    assert_eq!(summary.totals.connects, 0);
    assert!(summary.totals.errors >= 3, "{:?}", summary.totals);
}
