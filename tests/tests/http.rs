//! End-to-end HTTP: `/metrics` of the real gateway binary passes `promtool check metrics`
//! and its outbox depth and oldest-age figures rise while upstream is down and fall back
//! to zero once it returns; the JSON API serves the device read model, the event log, the
//! outbox and the rules (with a broken reload); `/readyz` and `http.listen` behave.
//!
//! promtool (Debian's `prometheus` package) is optional locally: without it the check is
//! skipped with a message, unless `GATEWAY_REQUIRE_BROWSER=1` (CI) makes it mandatory.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{
    free_port, publish_all, workspace_bin, Collector, Gateway, Mosquitto, Proxy, Rumqttd,
};

const HOT_RULE: &str = r#"
[[rule]]
name = "hot"
event = "SensorTemperatureExceeded"
stream = "telemetry"
condition = "temperature > 50.0"
clear = "temperature < 40.0"
severity = "critical"
"#;

/// The samples of one scrape: `name{labels}` -> value.
fn scrape(gw: &Gateway) -> (String, HashMap<String, f64>) {
    let (status, text) = gw.http_get("/metrics");
    assert_eq!(status, 200, "{text}");
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line");
            (k.to_string(), v.parse::<f64>().expect("sample value"))
        })
        .collect();
    (text, samples)
}

fn sample(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {samples:?}"))
}

/// Scrapes until `ok` holds for the samples; panics with the last scrape on timeout.
fn wait_metrics(
    gw: &Gateway,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let (text, samples) = scrape(gw);
        if ok(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; last scrape:\n{text}\nlog:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `GET path` until `ok` holds for its JSON (10 s at most).
async fn wait_json(gw: &Gateway, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = get_json(gw, path);
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path}: not as expected: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn get_json(gw: &Gateway, path: &str) -> Value {
    let (status, body) = gw.http_get(path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Runs `promtool check metrics` on `text`; false (and a message) when promtool is missing
/// and not required.
fn promtool_check(text: &str) -> bool {
    let promtool = ["/usr/bin/promtool", "promtool"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok());
    let Some(promtool) = promtool else {
        assert!(
            std::env::var("GATEWAY_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "promtool is required (GATEWAY_REQUIRE_BROWSER=1) but not installed"
        );
        eprintln!("promtool not installed (apt-get install prometheus): metrics lint skipped");
        return false;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics failed:\n{}{}\n--- scrape:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn readings(device: &str, n: usize, temperature: f64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("devices/{device}/telemetry"),
                format!("{{\"seq\":{i},\"temperature\":{temperature}}}").into_bytes(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_pass_promtool_and_the_backlog_rises_while_upstream_is_down_then_drains() {
    const N: usize = 300;
    let mosquitto = Mosquitto::start();
    let up_port = match &mosquitto {
        Some(m) => m.port,
        None => Rumqttd::start().port,
    };
    let proxy = Proxy::start(up_port, false).await;
    let collector = Collector::start(up_port, "up/#").await;
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("hot.toml"), HOT_RULE).unwrap();
    let url = format!("mqtt://127.0.0.1:{}", proxy.port);
    let gw = Gateway::start(&[
        ("GATEWAY__UPSTREAM__URL", &url),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN", "50ms"),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX", "300ms"),
        ("GATEWAY__RULES__DIR", rules.path().to_str().unwrap()),
    ]);
    let ready = get_json(&gw, "/readyz");
    assert_eq!(ready["upstream"], "offline", "{ready}");
    assert_eq!(ready["broker"], "listening");
    assert_eq!(ready["store"], "open");

    // Upstream is down: the readings and the events pile up in the outbox: one rule
    // event, and dev-a's and dev-b's connect and disconnect (device events).
    publish_all(&gw.addr(), "dev-a", &readings("d-a", N, 20.0)).await;
    publish_all(&gw.addr(), "dev-b", &readings("d-b", 1, 60.0)).await;
    let first = wait_metrics(
        &gw,
        "backlog of every reading",
        Duration::from_secs(10),
        |s| {
            s.get("gateway_outbox_messages{lane=\"readings\"}") == Some(&(N as f64 + 1.0))
                && s.get("gateway_outbox_messages{lane=\"events\"}") == Some(&5.0)
        },
    );
    assert_eq!(sample(&first, "gateway_upstream_connected"), 0.0);
    assert_eq!(
        sample(&first, "gateway_upstream_window"),
        0.0,
        "not connected yet"
    );
    assert!(sample(&first, "gateway_outbox_bytes{lane=\"readings\"}") > 0.0);
    let age = |s: &HashMap<String, f64>| {
        sample(s, "gateway_outbox_oldest_age_seconds{lane=\"readings\"}")
    };
    let age_before = age(&first);
    std::thread::sleep(Duration::from_millis(1500));
    let (text, later) = scrape(&gw);
    assert!(
        age(&later) >= age_before + 1.0,
        "oldest age must grow while upstream is down: {age_before} then {}",
        age(&later)
    );
    assert_eq!(
        sample(&later, "gateway_messages_ingested_total"),
        N as f64 + 1.0
    );
    assert_eq!(
        sample(&later, "gateway_messages_decoded_total{format=\"json\"}"),
        N as f64 + 1.0
    );
    assert_eq!(
        sample(
            &later,
            "gateway_events_total{type=\"SensorTemperatureExceeded\",state=\"firing\"}"
        ),
        1.0
    );
    assert!(sample(&later, "gateway_rule_evaluations_total") >= N as f64 + 1.0);
    assert!(sample(&later, "gateway_store_commit_seconds_count") > 0.0);
    // The groups are journaled at once and checkpointed into the file about a second
    // later; on a busy machine a little later than that.
    wait_metrics(&gw, "a checkpoint", Duration::from_secs(10), |s| {
        s.get("gateway_store_checkpoint_seconds_count")
            .is_some_and(|c| *c > 0.0)
    });
    promtool_check(&text);

    // Upstream returns: the backlog drains to zero and the figures fall back.
    proxy.set_up(true);
    let drained = wait_metrics(&gw, "backlog drained", Duration::from_secs(30), |s| {
        s.get("gateway_outbox_messages{lane=\"readings\"}") == Some(&0.0)
            && s.get("gateway_outbox_messages{lane=\"events\"}") == Some(&0.0)
    });
    for lane in ["readings", "events"] {
        assert_eq!(
            sample(
                &drained,
                &format!("gateway_outbox_oldest_age_seconds{{lane=\"{lane}\"}}")
            ),
            0.0
        );
        assert_eq!(
            sample(
                &drained,
                &format!("gateway_outbox_bytes{{lane=\"{lane}\"}}")
            ),
            0.0
        );
    }
    assert_eq!(sample(&drained, "gateway_upstream_connected"), 1.0);
    if mosquitto.is_some() {
        // "auto" against a broker that announces no Receive Maximum: the MQTT 5 ceiling.
        assert_eq!(sample(&drained, "gateway_upstream_window"), 2000.0);
    }
    // At least once: a row acked twice after a reconnect would count twice.
    assert!(
        sample(
            &drained,
            "gateway_upstream_forwarded_total{lane=\"readings\"}"
        ) >= N as f64 + 1.0
    );
    assert!(
        sample(
            &drained,
            "gateway_upstream_forwarded_total{lane=\"events\"}"
        ) >= 1.0
    );
    // Every row waited out the outage (more than 1.5 s): none in the buckets up to 1 s.
    assert!(sample(&drained, "gateway_forward_latency_seconds_count") >= N as f64 + 2.0);
    assert_eq!(
        sample(&drained, "gateway_forward_latency_seconds_bucket{le=\"1\"}"),
        0.0
    );
    assert!(sample(&drained, "gateway_forward_latency_seconds_sum") >= 1.5 * (N as f64 + 2.0));
    let ready = get_json(&gw, "/readyz");
    assert_eq!(ready["upstream"], "connected", "{ready}");
    let outbox = get_json(&gw, "/api/outbox");
    assert_eq!(outbox["messages"], 0, "{outbox}");
    assert_eq!(outbox["lanes"]["readings"]["oldest_age_seconds"], 0.0);
    collector.wait_unique(N + 2, Duration::from_secs(10)).await;
    let (text, _) = scrape(&gw);
    promtool_check(&text);
    assert_ops_contract(&text);
}

/// Every metric the ops/ dashboard and alert rules are written against
/// (`ops/metrics.txt`) is in the scrape; the authentication ones only exist when
/// devices authenticate, so this gateway (anonymous access) has none.
fn assert_ops_contract(scrape: &str) {
    let contract = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/metrics.txt");
    let contract = std::fs::read_to_string(contract).unwrap();
    let families: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let missing: Vec<&str> = contract
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|name| !name.starts_with("gateway_auth_"))
        .filter(|name| !families.contains(name))
        .collect();
    assert!(missing.is_empty(), "not in /metrics: {missing:?}");
}

/// Holds one MQTT connection to the gateway until dropped.
async fn hold_connection(port: u16) -> tokio::task::JoinHandle<()> {
    let mut opts = rumqttc::MqttOptions::new("held-device", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    let (tx, mut connected) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(async move {
        let _client = client;
        while let Ok(ev) = el.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = ev {
                let _ = tx.try_send(());
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected.recv())
        .await
        .expect("CONNACK");
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_serves_devices_events_outbox_rules_and_probes() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("hot.toml"), HOT_RULE).unwrap();
    let gw = Gateway::start(&[("GATEWAY__RULES__DIR", rules.path().to_str().unwrap())]);

    let (status, body) = gw.http_get("/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let ready = get_json(&gw, "/readyz");
    assert_eq!(
        ready,
        serde_json::json!({"broker": "listening", "store": "open", "upstream": "off"})
    );
    let (status, page) = gw.http_get("/");
    assert_eq!(status, 200);
    assert!(page.contains("id=\"upstream-state\""), "{page}");

    let held = hold_connection(gw.port).await;
    publish_all(&gw.addr(), "dev-hot", &readings("d-hot", 3, 80.0)).await;
    publish_all(&gw.addr(), "dev-cold", &readings("d-cold", 2, 20.0)).await;
    publish_all(
        &gw.addr(),
        "dev-bad",
        &[("devices/d-bad/telemetry".to_string(), b"{not json".to_vec())],
    )
    .await;

    // The read model: last values, message counts, firing alerts per device.
    let devices = wait_json(&gw, "/api/devices", |d| {
        d["count"] == 2
            && d["devices"].as_array().unwrap().iter().any(|x| {
                x["device"] == "d-hot" && x["firing"].as_array().is_some_and(|f| !f.is_empty())
            })
    })
    .await;
    let by_id = |id: &str| {
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == id)
            .unwrap_or_else(|| panic!("no {id} in {devices}"))
            .clone()
    };
    let hot = by_id("d-hot");
    assert_eq!(hot["messages"], 3);
    assert_eq!(hot["values"]["temperature"], 80.0);
    assert_eq!(hot["values"]["seq"], 2.0);
    assert_eq!(hot["stream"], "telemetry");
    assert_eq!(hot["firing"][0]["rule"], "hot");
    assert_eq!(hot["firing"][0]["event"], "SensorTemperatureExceeded");
    assert_eq!(hot["firing"][0]["severity"], "critical");
    let cold = by_id("d-cold");
    assert_eq!(cold["messages"], 2);
    assert_eq!(cold["firing"], serde_json::json!([]));
    assert!(hot["last_seen"].as_i64().unwrap() >= cold["last_seen"].as_i64().unwrap() - 60_000);

    // The event log, filtered (committed a few milliseconds after the transition).
    let events = wait_json(
        &gw,
        "/api/events?type=SensorTemperatureExceeded&device=d-hot",
        |e| e["count"] == 1,
    )
    .await;
    let event = &events["events"][0];
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["subject"], "d-hot");
    assert_eq!(event["data"]["state"], "firing");
    let time = event["time"].as_str().unwrap();
    assert_eq!(get_json(&gw, "/api/events?device=d-cold")["count"], 0);
    assert_eq!(get_json(&gw, "/api/events?type=Other")["count"], 0);
    assert_eq!(
        get_json(
            &gw,
            &format!("/api/events?since={time}&type=SensorTemperatureExceeded")
        )["count"],
        1
    );
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    assert_eq!(
        get_json(&gw, &format!("/api/events?since={later}"))["count"],
        0
    );
    let (status, body) = gw.http_get("/api/events?since=yesterday");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("since"), "{body}");

    // The outbox: no upstream, so nothing is appended.
    let outbox = get_json(&gw, "/api/outbox");
    assert_eq!(outbox["messages"], 0, "{outbox}");
    assert_eq!(outbox["dropped"]["store_overflow"], 0);

    // Rules: loaded, one firing instance, the last reload fine.
    let r = get_json(&gw, "/api/rules");
    assert_eq!(r["rules"][0]["name"], "hot", "{r}");
    assert_eq!(r["rules"][0]["kind"], "condition");
    assert_eq!(r["last_reload"]["ok"], true);
    assert_eq!(r["instances"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["instances"][0]["device"], "d-hot");
    assert_eq!(r["instances"][0]["state"], "firing");
    assert_eq!(
        r["events"],
        serde_json::json!([{"type": "SensorTemperatureExceeded", "state": "firing", "count": 1}])
    );

    // Metrics agree; the held MQTT connection counts as a connected device.
    let (text, m) = scrape(&gw);
    let dead: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("gateway_dead_letters_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(dead, 1.0, "{text}");
    assert_eq!(
        sample(&m, "gateway_messages_decoded_total{format=\"json\"}"),
        5.0
    );
    assert_eq!(sample(&m, "gateway_upstream_connected"), 0.0);
    assert!(sample(&m, "gateway_connected_devices") >= 1.0, "{text}");
    held.abort();
    wait_metrics(&gw, "held connection gone", Duration::from_secs(10), |s| {
        s.get("gateway_connected_devices") == Some(&0.0)
    });
    promtool_check(&text);

    // A broken edit: the old rule stays, the reload result says why.
    std::fs::write(
        rules.path().join("hot.toml"),
        HOT_RULE.replace(
            "condition = \"temperature > 50.0\"",
            "condition = \"temperature >\"",
        ),
    )
    .unwrap();
    let r = wait_json(&gw, "/api/rules", |r| r["last_reload"]["ok"] == false).await;
    let errors = r["last_reload"]["errors"].as_array().unwrap();
    assert!(!errors.is_empty(), "{r}");
    assert!(errors[0].as_str().unwrap().contains("hot.toml:"), "{r}");
    assert_eq!(r["rules"][0]["name"], "hot", "old rules stay: {r}");
}

#[test]
fn http_listen_off_serves_nothing_and_a_taken_port_is_a_config_error() {
    let mut gw = Gateway::start(&[("GATEWAY__HTTP__LISTEN", "off")]);
    assert!(
        std::net::TcpStream::connect(gw.http_addr()).is_err(),
        "http.listen = off must not listen"
    );
    gw.stop();

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(workspace_bin("gateway"))
        .arg("run")
        .current_dir(dir.path())
        .env(
            "GATEWAY__BROKER__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("GATEWAY__HTTP__LISTEN", &addr)
        .env("GATEWAY__STORAGE__PATH", dir.path().join("g.redb"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("http.listen: cannot listen on {addr}")),
        "{stderr}"
    );

    let out = Command::new(workspace_bin("gateway"))
        .arg("check-config")
        .current_dir(dir.path())
        .env("GATEWAY__BROKER__LISTEN", "0.0.0.0:1883")
        .env("GATEWAY__HTTP__LISTEN", "127.0.0.1:1883")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("http.listen: must differ from the broker's listeners"),
        "{stderr}"
    );
}
