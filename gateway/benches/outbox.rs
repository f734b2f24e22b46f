//! Outbox + forwarder throughput, drain, memory and latency against Mosquitto as the
//! upstream, with Mosquitto's own figures measured in the same run.
//!
//! `cargo bench -p gateway --bench outbox` (needs /usr/sbin/mosquitto).
//! `OUTBOX_BENCH_N` (default 100000) messages per throughput run, `OUTBOX_BENCH_BACKLOG`
//! (default 1000000) rows for the drain run, `OUTBOX_BENCH_FLUSH_MS` the store's
//! flush interval (default: `storage.flush_interval`); `OUTBOX_BENCH_UNCOMMITTED` the
//! forwarder's `max_uncommitted_acks`. Every other setting is the gateway's default.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gateway::config::{Config, UpstreamUrl};
use gateway::forwarder::{Forwarder, ForwarderConfig, ForwarderStats, MAX_UNCOMMITTED_ACKS};
use gateway::reading::{now_millis, Format};
use gateway::store::{OutboxEntry, Store, StoreConfig, StoreHandle};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use test_support::mosquitto::MOSQUITTO;
use test_support::{free_port, wait_port, Collector, Mosquitto};
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn payload(i: u64) -> Vec<u8> {
    format!("{{\"n\":{i},\"temperature\":21.5,\"humidity\":40.25}}").into_bytes()
}

fn reading(i: u64) -> OutboxEntry {
    let device = format!("d{}", i % 100);
    OutboxEntry::reading(
        &format!("devices/{device}/telemetry"),
        &device,
        &payload(i),
        Format::Json,
        now_millis(),
    )
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// One QoS 1 client publishing `n` messages with 100 in flight: the upstream's own rate.
async fn direct_ingest(port: u16, n: u64) -> f64 {
    let mut opts = MqttOptions::new(format!("direct-{}", free_port()), "127.0.0.1", port);
    opts.set_outgoing_inflight_upper_limit(100)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 100);
    let started = Instant::now();
    tokio::spawn(async move {
        for i in 0..n {
            let device = i % 100;
            client
                .publish(
                    format!("bench/direct/devices/d{device}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    payload(i),
                )
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    while acked < n {
        if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
            acked += 1;
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

struct Gateway {
    store: StoreHandle,
    stats: Arc<ForwarderStats>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    cfg: ForwarderConfig,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn new(port: u16, batch: usize) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::defaults();
        if let Some(ms) = std::env::var("OUTBOX_BENCH_FLUSH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.storage.flush_interval = Duration::from_millis(ms);
        }
        config.gateway.id = "gw".into();
        config.upstream.url = Some(UpstreamUrl::mqtt("127.0.0.1", port).into());
        config.upstream.client_id = format!("bench-gw-{}", free_port());
        config.upstream.topic_prefix = "bench/{gateway_id}".into();
        config.upstream.batch_max_messages = batch;
        let store = Store::open(
            &dir.path().join("gw.redb"),
            StoreConfig::from_config(&config),
        )
        .unwrap();
        let cfg = ForwarderConfig {
            max_uncommitted_acks: env_or("OUTBOX_BENCH_UNCOMMITTED", MAX_UNCOMMITTED_ACKS as u64)
                as usize,
            ..ForwarderConfig::from_config(&config).expect("upstream.url is set")
        };
        let fwd = Forwarder::new(cfg.clone(), store.clone()).unwrap();
        Gateway {
            stats: fwd.stats(),
            store,
            shutdown: CancellationToken::new(),
            task: None,
            cfg,
            _dir: dir,
        }
    }

    fn start(&mut self) {
        let fwd = Forwarder::new(self.cfg.clone(), self.store.clone()).unwrap();
        self.stats = fwd.stats();
        self.task = Some(tokio::spawn(fwd.run(self.shutdown.clone())));
    }

    async fn append_all(&self, from: u64, n: u64) {
        for i in from..from + n {
            let entry = reading(i);
            while !self.store.append(entry.clone()) {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    }

    async fn wait_acked(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while ForwarderStats::get(&self.stats.rows_acked) < n {
            assert!(Instant::now() < deadline, "not acked in time");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.store.shutdown().unwrap();
    }
}

/// Appends `n` readings as fast as the store takes them while forwarding; readings/s
/// from the first append to the last PUBACK.
async fn e2e(port: u16, n: u64, batch: usize) -> (f64, u64) {
    let mut gw = Gateway::new(port, batch);
    gw.start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    gw.append_all(0, n).await;
    gw.wait_acked(n, Duration::from_secs(300)).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let published = ForwarderStats::get(&gw.stats.published);
    gw.stop().await;
    (rate, published)
}

/// Mosquitto A bridged to Mosquitto B (QoS 1): one QoS 1 client publishes to A, a
/// subscriber on B counts; messages/s until the last one arrives at B.
async fn bridge(upstream: u16, n: u64, dir: &std::path::Path) -> f64 {
    let port = free_port();
    let conf = dir.join("bridge.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n\
             log_dest none\nconnection up\naddress 127.0.0.1:{upstream}\n\
             topic bench/bridge/# out 1\ncleansession true\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(500)).await; // bridge connects
    let collector = Collector::start(upstream, "bench/bridge/#").await;
    let counted = collector.clone();
    let started = Instant::now();
    let mut opts = MqttOptions::new(format!("bridge-pub-{}", free_port()), "127.0.0.1", port);
    opts.set_outgoing_inflight_upper_limit(100);
    let (client, mut el) = AsyncClient::new(opts, 100);
    tokio::spawn(async move {
        for i in 0..n {
            client
                .publish(
                    format!("bench/bridge/devices/d{}/telemetry", i % 100),
                    QoS::AtLeastOnce,
                    false,
                    payload(i),
                )
                .await
                .unwrap();
        }
    });
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let deadline = Instant::now() + Duration::from_secs(300);
    while (counted.len() as u64) < n {
        assert!(Instant::now() < deadline, "bridge did not deliver");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    rate
}

/// Fills the outbox with `n` rows while upstream is not forwarded to, then drains it.
async fn drain(port: u16, n: u64) -> (f64, f64, f64, f64) {
    let mut gw = Gateway::new(port, 1);
    let fill_started = Instant::now();
    gw.append_all(0, n).await;
    gw.store.flush().await.unwrap();
    let fill_rate = n as f64 / fill_started.elapsed().as_secs_f64();
    let rss_buffered = rss_mb();
    let max_rss = Arc::new(AtomicU64::new(rss_buffered as u64));
    let sampler_stop = CancellationToken::new();
    let (m, s) = (max_rss.clone(), sampler_stop.clone());
    tokio::spawn(async move {
        while !s.is_cancelled() {
            m.fetch_max(rss_mb() as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let started = Instant::now();
    gw.start();
    gw.wait_acked(n, Duration::from_secs(600)).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    sampler_stop.cancel();
    gw.stop().await;
    (
        fill_rate,
        rate,
        rss_buffered,
        max_rss.load(Ordering::Relaxed) as f64,
    )
}

/// Appends 10 readings per ms for `secs` with the send time in the payload; a subscriber
/// upstream measures append -> arrival. Returns (p50, p99, max) in ms.
async fn latency(port: u16, secs: u64) -> (f64, f64, f64, u64) {
    let collector = Collector::start(port, "bench/gw/latency/#").await;
    let mut gw = Gateway::new(port, 1);
    gw.start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = secs * 10_000;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut i = 0;
    while i < n {
        tick.tick().await;
        for _ in 0..10 {
            let sent = micros_now();
            let entry = OutboxEntry::reading(
                &format!("latency/d{}", i % 100),
                &format!("d{}", i % 100),
                format!("{{\"sent_us\":{sent}}}").as_bytes(),
                Format::Json,
                now_millis(),
            );
            assert!(gw.store.append(entry));
            i += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (collector.unique() as u64) < n {
        assert!(Instant::now() < deadline, "latency run incomplete");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Arrival time: `Received::at` is an Instant; convert through a common origin.
    let origin_instant = Instant::now();
    let origin_us = micros_now();
    let mut lat: Vec<f64> = collector
        .snapshot()
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let sent = v["sent_us"].as_u64().unwrap();
            let arrived = origin_us - origin_instant.duration_since(m.at).as_micros() as u64;
            arrived.saturating_sub(sent) as f64 / 1000.0
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    let out = (pct(0.5), pct(0.99), *lat.last().unwrap(), n);
    gw.stop().await;
    out
}

fn main() {
    let Some(mosquitto) = Mosquitto::start() else {
        eprintln!("nothing to compare against");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let n = env_or("OUTBOX_BENCH_N", 100_000);
        let backlog = env_or("OUTBOX_BENCH_BACKLOG", 1_000_000);
        let port = mosquitto.port;

        // Memory first, while this process holds nothing else.
        let rss_start = rss_mb();
        let (fill, drained, rss_buffered, rss_max) = drain(port, backlog).await;
        let direct = direct_ingest(port, n).await;
        println!("direct ingest, 1 QoS1 client, 100 in flight: {direct:.0} msg/s");
        println!(
            "backlog of {backlog}: filled at {fill:.0} rows/s, drained at {drained:.0} rows/s \
             ({:.2}x direct); RSS {rss_start:.1} MB at start, {rss_buffered:.1} MB buffered, \
             max {rss_max:.1} MB while draining",
            drained / direct
        );
        let (unbatched, _) = e2e(port, n, 1).await;
        println!(
            "gateway e2e unbatched: {unbatched:.0} readings/s ({:.2}x direct)",
            unbatched / direct
        );
        let (batched, publishes) = e2e(port, n, 100).await;
        let bridge_dir = tempfile::tempdir().unwrap();
        let bridged = bridge(port, n, bridge_dir.path()).await;
        println!("mosquitto bridge (QoS1): {bridged:.0} msg/s");
        println!(
            "gateway e2e batched (100/publish, {publishes} publishes): {batched:.0} readings/s \
             ({:.2}x bridge)",
            batched / bridged
        );
        let (p50, p99, max, count) = latency(port, 5).await;
        println!(
            "latency at 10k readings/s ({count} readings): p50 {p50:.2} ms, p99 {p99:.2} ms, \
             max {max:.2} ms"
        );
    });
}
