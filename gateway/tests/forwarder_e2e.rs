//! The forwarder against real upstream brokers: rumqttd in process (behind a TCP proxy
//! that simulates outages, or two: the nodes of a failover list) and mosquitto as a child
//! process.

use std::time::Duration;

use gateway::config::{Config, UpstreamUrl, UpstreamUrls};
use gateway::forwarder::{Forwarder, ForwarderConfig, ForwarderStats};
use gateway::reading::{now_millis, Format};
use gateway::store::{OutboxEntry, Store, StoreConfig, StoreHandle};
use test_support::{
    check_delivery, check_delivery_with, free_port, Collector, Mosquitto, Proxy, Received, Rumqttd,
};
use tokio_util::sync::CancellationToken;

const DEVICES: u64 = 10;

fn reading(i: u64) -> OutboxEntry {
    let device = format!("d{}", i % DEVICES);
    OutboxEntry::reading(
        &format!("devices/{device}/telemetry"),
        &device,
        format!("{{\"n\":{i},\"t\":21.5}}").as_bytes(),
        Format::Json,
        now_millis(),
    )
}

fn device_of(m: &Received) -> String {
    m.topic.split('/').nth(2).unwrap_or_default().to_owned()
}

/// The gateway's defaults, forwarding to `127.0.0.1:port` under `up/gw1`, with a short
/// reconnect backoff.
fn config(port: u16) -> ForwarderConfig {
    let mut config = Config::defaults();
    config.gateway.id = "gw1".into();
    config.upstream.url = Some(UpstreamUrl::mqtt("127.0.0.1", port).into());
    config.upstream.client_id = format!("gw-{}", free_port());
    config.upstream.topic_prefix = "up/{gateway_id}".into();
    config.upstream.backoff_min = Duration::from_millis(50);
    config.upstream.backoff_max = Duration::from_millis(400);
    ForwarderConfig::from_config(&config).expect("upstream.url is set")
}

fn long_tests() -> bool {
    std::env::var("GATEWAY_LONG_TESTS").as_deref() == Ok("1")
}

/// Appends `per_ms` readings every millisecond until stopped; returns how many.
fn produce(store: StoreHandle, per_ms: u64) -> (tokio::task::JoinHandle<u64>, CancellationToken) {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut i = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        while !stopped.is_cancelled() {
            tick.tick().await;
            for _ in 0..per_ms {
                assert!(store.append(reading(i)), "store queue full");
                i += 1;
            }
        }
        i
    });
    (task, stop)
}

struct Running {
    store: StoreHandle,
    stats: std::sync::Arc<ForwarderStats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start(cfg: ForwarderConfig) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("gateway=info")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("gw.redb"),
        StoreConfig::from_config(&Config::defaults()),
    )
    .unwrap();
    let fwd = Forwarder::new(cfg, store.clone()).unwrap();
    let stats = fwd.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(fwd.run(shutdown.clone()));
    Running {
        store,
        stats,
        shutdown,
        task,
        _dir: dir,
    }
}

impl Running {
    /// Waits for `n` distinct messages upstream; on timeout shows both sides' counters.
    async fn wait_delivered(&self, collector: &Collector, n: usize, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while collector.unique() < n {
            if std::time::Instant::now() > deadline {
                panic!(
                    "only {} of {n} arrived; forwarder {:?}; store {:?}",
                    collector.unique(),
                    self.stats,
                    self.store.stats()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_drained(&self, timeout: Duration) {
        self.store.flush().await.unwrap();
        let deadline = std::time::Instant::now() + timeout;
        while self.store.stats().depth() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "outbox not drained: {:?}",
                self.store.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("forwarder did not stop")
            .unwrap();
        self.store.shutdown().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_while_readings_arrive_then_up_all_arrive_in_order() {
    let broker = Rumqttd::start().port;
    let proxy = Proxy::start(broker, false).await;
    let collector = Collector::start(broker, "up/gw1/#").await;
    let cfg = config(proxy.port);
    let max_inflight = cfg.max_window();
    let run = start(cfg);

    let n = 50_000u64;
    for i in 0..n {
        while !run.store.append(reading(i)) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    run.store.flush().await.unwrap();
    assert_eq!(
        run.store.stats().lanes[gateway::store::Lane::Reading].messages,
        n
    );
    assert!(ForwarderStats::get(&run.stats.connection_failures) > 0);
    assert_eq!(collector.len(), 0);

    proxy.set_up(true);
    run.wait_delivered(&collector, n as usize, Duration::from_secs(90))
        .await;
    run.wait_drained(Duration::from_secs(10)).await;
    let received = collector.snapshot();
    let duplicates = check_delivery(&received, n as usize, device_of);
    assert!(duplicates <= max_inflight, "{duplicates} duplicates");
    // Everything was in the outbox before the connection came up: all of it is replayed.
    assert!(received.iter().all(|m| m.replayed == Some(true)));
    let first = &received[0];
    assert_eq!(first.topic, "up/gw1/devices/d0/telemetry");
    assert_eq!(first.payload, b"{\"n\":0,\"t\":21.5}".to_vec());
    assert_eq!(
        ForwarderStats::get(&run.stats.rows_acked),
        n + duplicates as u64
    );
    eprintln!("delivered {n} readings, {duplicates} duplicates");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outages_under_load_lose_nothing() {
    let broker = Rumqttd::start().port;
    let proxy = Proxy::start(broker, true).await;
    let collector = Collector::start(broker, "up/gw1/#").await;
    let cfg = config(proxy.port);
    let max_inflight = cfg.max_window();
    let run = start(cfg);

    let (producer, stop) = produce(run.store.clone(), 3);
    // `GATEWAY_LONG_TESTS=1`: an outage every second for 30 s.
    let (outages, up_ms) = if long_tests() { (30, 800) } else { (8, 300) };
    for _ in 0..outages {
        tokio::time::sleep(Duration::from_millis(up_ms)).await;
        proxy.set_up(false);
        tokio::time::sleep(Duration::from_millis(150)).await;
        proxy.set_up(true);
    }
    stop.cancel();
    let n = producer.await.unwrap();
    run.wait_delivered(&collector, n as usize, Duration::from_secs(60))
        .await;
    run.wait_drained(Duration::from_secs(10)).await;
    let received = collector.snapshot();
    let duplicates = check_delivery_with(&received, n as usize, device_of, false);
    let reconnects = ForwarderStats::get(&run.stats.connects) as usize;
    assert!(reconnects > outages / 2, "only {reconnects} connections");
    assert!(
        duplicates <= reconnects * max_inflight,
        "{duplicates} duplicates over {reconnects} connections"
    );
    // Live rows are not marked; rows replayed after a cut are.
    assert!(received.iter().any(|m| m.replayed == Some(false)));
    assert!(received.iter().any(|m| m.replayed == Some(true)));
    eprintln!("{n} readings, {outages} outages, {reconnects} connections, {duplicates} duplicates");
    run.stop().await;
}

/// Waits until the forwarder is connected to `url`.
async fn wait_connected_to(stats: &ForwarderStats, url: &str) {
    test_support::wait_until_async(
        &format!("connected to {url}"),
        Duration::from_secs(10),
        || stats.connected() && stats.current_url() == Some(url),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_list_moves_to_the_next_url_round_robin_and_loses_nothing() {
    let broker = Rumqttd::start().port;
    let nodes = [
        Proxy::start(broker, true).await,
        Proxy::start(broker, true).await,
    ];
    let urls: Vec<UpstreamUrl> = nodes
        .iter()
        .map(|p| UpstreamUrl::mqtt("127.0.0.1", p.port))
        .collect();
    let names: Vec<String> = urls.iter().map(ToString::to_string).collect();
    let collector = Collector::start(broker, "up/gw1/#").await;
    let cfg = ForwarderConfig {
        urls: UpstreamUrls::new(urls).unwrap(),
        ..config(nodes[0].port)
    };
    let max_inflight = cfg.max_window();
    let run = start(cfg);
    let (producer, stop) = produce(run.store.clone(), 2);

    wait_connected_to(&run.stats, &names[0]).await;
    nodes[0].set_up(false);
    wait_connected_to(&run.stats, &names[1]).await;
    // The first node is back and the second fails: round robin wraps to the first.
    nodes[0].set_up(true);
    nodes[1].set_up(false);
    wait_connected_to(&run.stats, &names[0]).await;

    stop.cancel();
    let n = producer.await.unwrap();
    run.wait_delivered(&collector, n as usize, Duration::from_secs(60))
        .await;
    let duplicates = check_delivery_with(&collector.snapshot(), n as usize, device_of, false);
    assert_eq!(ForwarderStats::get(&run.stats.connects), 3);
    assert!(
        duplicates <= 2 * max_inflight,
        "{duplicates} duplicates after two failovers"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_drain_before_the_readings_backlog() {
    let broker = Rumqttd::start().port;
    let proxy = Proxy::start(broker, false).await;
    let collector = Collector::start(broker, "up/gw1/#").await;
    let run = start(config(proxy.port));
    let readings = 3_000u64;
    for i in 0..readings {
        assert!(run.store.append(reading(i)));
    }
    let events = 20u64;
    for i in 0..events {
        let json = format!("{{\"id\":\"e{i}\",\"type\":\"Hot\",\"subject\":\"d1\"}}");
        assert!(run.store.append(OutboxEntry::event(
            "Hot",
            "d1",
            json.as_bytes(),
            now_millis()
        )));
    }
    run.store.flush().await.unwrap();
    proxy.set_up(true);
    run.wait_delivered(
        &collector,
        (readings + events) as usize,
        Duration::from_secs(30),
    )
    .await;
    let received = collector.snapshot();
    let first_events: Vec<_> = received.iter().take(events as usize).collect();
    assert!(
        first_events
            .iter()
            .all(|m| m.topic == "up/gw1/events/Hot/d1"),
        "events must come first"
    );
    let v: serde_json::Value = serde_json::from_slice(&first_events[0].payload).unwrap();
    assert_eq!(
        v["replayed"], true,
        "replayed events carry the mark in the envelope"
    );
    assert_eq!(v["id"], "e0");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_carry_arrays_with_ids_and_are_deleted_together() {
    let broker = Rumqttd::start().port;
    let collector = Collector::start(broker, "up/gw1/#").await;
    let cfg = ForwarderConfig {
        batch_max_messages: 50,
        batch_linger_ms: 20,
        ..config(broker)
    };
    let run = start(cfg);
    let n = 2_000u64;
    for i in 0..n {
        assert!(run.store.append(reading(i)));
    }
    let cbor_n = 120u64;
    let item = serde_cbor::to_vec(&serde_json::json!({"t": 1.5})).unwrap();
    for _ in 0..cbor_n {
        assert!(run.store.append(OutboxEntry::reading(
            "devices/c1/telemetry",
            "c1",
            &item,
            Format::Cbor,
            now_millis()
        )));
    }
    let mut ids = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut json_elems, mut cbor_elems) = (0u64, 0u64);
    while json_elems + cbor_elems < n + cbor_n {
        assert!(std::time::Instant::now() < deadline, "batches missing");
        tokio::time::sleep(Duration::from_millis(20)).await;
        (json_elems, cbor_elems) = (0, 0);
        ids.clear();
        for m in collector.snapshot() {
            assert_eq!(m.topic, "up/gw1/batch");
            let v: serde_json::Value = match serde_json::from_slice::<serde_json::Value>(&m.payload)
            {
                Ok(v) => {
                    json_elems += v.as_array().unwrap().len() as u64;
                    v
                }
                Err(_) => {
                    let v: serde_json::Value = serde_cbor::from_slice(&m.payload).unwrap();
                    cbor_elems += v.as_array().unwrap().len() as u64;
                    v
                }
            };
            for e in v.as_array().unwrap() {
                assert!(ids.insert(e["id"].as_str().unwrap().to_owned()));
            }
        }
    }
    assert_eq!((json_elems, cbor_elems), (n, cbor_n));
    run.wait_drained(Duration::from_secs(10)).await;
    let published = ForwarderStats::get(&run.stats.published);
    assert!(
        published <= (n + cbor_n) / 10,
        "{published} publishes for {} rows",
        n + cbor_n
    );
    assert_eq!(ForwarderStats::get(&run.stats.rows_acked), n + cbor_n);
    assert_eq!(run.store.stats().depth(), 0);
    assert_eq!(
        run.store.counter(gateway::store::Counter::Acked),
        n + cbor_n
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_restarted_repeatedly_under_load_loses_nothing() {
    let Some(mut mosquitto) = Mosquitto::start() else {
        return;
    };
    let collector = Collector::start(mosquitto.port, "up/gw1/#").await;
    let cfg = config(mosquitto.port);
    let max_inflight = cfg.max_window();
    let run = start(cfg);
    let (producer, stop) = produce(run.store.clone(), 2);
    // `GATEWAY_LONG_TESTS=1`: a restart every second for 30 s.
    let (restarts, every_ms) = if long_tests() { (30, 1000) } else { (5, 500) };
    for _ in 0..restarts {
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
        tokio::task::block_in_place(|| mosquitto.restart());
    }
    stop.cancel();
    let n = producer.await.unwrap();
    run.wait_delivered(&collector, n as usize, Duration::from_secs(60))
        .await;
    run.wait_drained(Duration::from_secs(10)).await;
    let received = collector.snapshot();
    // Every publish reached a subscriber: the collector's session survived each restart.
    assert_eq!(ForwarderStats::get(&run.stats.rows_no_subscribers), 0);
    let duplicates = check_delivery(&received, n as usize, device_of);
    let connects = ForwarderStats::get(&run.stats.connects) as usize;
    assert!(connects > restarts, "{connects} connections");
    assert!(duplicates <= connects * max_inflight);
    eprintln!("{n} readings, {restarts} mosquitto restarts, {duplicates} duplicates");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rate_limit_paces_the_backlog_and_qos0_deletes_on_send() {
    let broker = Rumqttd::start().port;
    let collector = Collector::start(broker, "up/gw1/#").await;
    let proxy = Proxy::start(broker, false).await;
    let rate = 2_000u32;
    let cfg = ForwarderConfig {
        rate_limit_per_sec: Some(rate),
        qos: 0,
        ..config(proxy.port)
    };
    let run = start(cfg);
    let n = 3_000u64;
    for i in 0..n {
        assert!(run.store.append(reading(i)));
    }
    run.store.flush().await.unwrap();
    proxy.set_up(true);
    let started = std::time::Instant::now();
    run.wait_delivered(&collector, n as usize, Duration::from_secs(30))
        .await;
    let took = started.elapsed();
    // A burst of rate/20 is allowed, the rest is paced.
    let floor = Duration::from_secs_f64((n as f64 - rate as f64 / 20.0) / rate as f64);
    assert!(
        took >= floor,
        "backlog of {n} drained in {took:?}, limit {rate}/s"
    );
    run.wait_drained(Duration::from_secs(10)).await;
    let received = collector.snapshot();
    check_delivery(&received, n as usize, device_of);
    assert_eq!(ForwarderStats::get(&run.stats.rows_acked), n);
    run.stop().await;
}

/// The window follows the upstream broker: `upstream.max_inflight = "auto"` over MQTT 5
/// takes the Receive Maximum a Mosquitto announces (its `max_inflight_messages`), and the
/// ceiling when it announces none; a number is a ceiling under the broker's; over 3.1.1,
/// where brokers announce nothing, "auto" is the fixed default. Every reading arrives
/// through each window, with no connection lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_is_what_the_upstream_broker_takes() {
    use gateway::config::{UpstreamInflight, UpstreamProtocol};
    use gateway::forwarder::{AUTO_INFLIGHT_V311, AUTO_INFLIGHT_V5};
    let Some(limited) = Mosquitto::start_with("max_inflight_messages 7\n") else {
        return;
    };
    let Some(open) = Mosquitto::start() else {
        return;
    };
    let auto = UpstreamInflight::Auto;
    let cases = [
        (&limited, auto, UpstreamProtocol::V5, 7),
        (&open, auto, UpstreamProtocol::V5, AUTO_INFLIGHT_V5),
        (
            &limited,
            UpstreamInflight::Fixed(5),
            UpstreamProtocol::V5,
            5,
        ),
        (
            &limited,
            UpstreamInflight::Fixed(50),
            UpstreamProtocol::V5,
            7,
        ),
        (
            &open,
            UpstreamInflight::Fixed(300),
            UpstreamProtocol::V5,
            300,
        ),
        (&limited, auto, UpstreamProtocol::V311, AUTO_INFLIGHT_V311),
    ];
    for (broker, inflight, protocol, window) in cases {
        let case = format!("{inflight} over {protocol} to a broker on {}", broker.port);
        let collector = Collector::start(broker.port, "up/gw1/#").await;
        let mut cfg = config(broker.port);
        cfg.max_inflight = inflight;
        cfg.protocol = protocol;
        let run = start(cfg);
        let n = 500;
        for i in 0..n {
            assert!(run.store.append(reading(i)), "store queue full");
        }
        run.wait_drained(Duration::from_secs(30)).await;
        assert_eq!(ForwarderStats::get(&run.stats.rows_acked), n, "{case}");
        assert_eq!(run.stats.window(), window, "{case}");
        assert_eq!(
            ForwarderStats::get(&run.stats.connection_failures),
            0,
            "{case}"
        );
        // Over 3.1.1 the id is in an envelope, not a property the collector reads.
        if protocol == UpstreamProtocol::V5 {
            run.wait_delivered(&collector, n as usize, Duration::from_secs(10))
                .await;
            check_delivery(&collector.snapshot(), n as usize, device_of);
        }
        run.stop().await;
    }
}
