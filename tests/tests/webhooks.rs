//! End-to-end webhook actions: the real gateway binary, a real MQTT client publishing
//! readings and real HTTP servers on 127.0.0.1. A rule transition POSTs its rendered
//! payload; an endpoint that never answers times out without holding up the rules; a
//! refused connection is an error after its retries; every outcome is in `/metrics` and
//! the event log; a stopping gateway does not wait for a hung call.

use std::time::{Duration, Instant};

use test_support::{free_port, metric, publish_all, subscribe, Gateway, HttpServer, Reply};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

fn reading(device: &str, temperature: f64) -> Vec<(String, Vec<u8>)> {
    vec![(
        format!("devices/{device}/telemetry"),
        format!("{{\"temperature\":{temperature}}}").into_bytes(),
    )]
}

/// A gateway whose rules directory holds `rule` as `hot.toml`.
fn gateway_with(rule: &str, extra: &[(&str, &str)]) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/hot.toml"), rule).unwrap();
    Gateway::start_in(dir, extra)
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>) -> serde_json::Value {
    let (_, payload) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event in time")
        .expect("subscriber alive");
    serde_json::from_slice(&payload).unwrap()
}

/// `gateway_rule_webhooks_total{rule="hot",outcome=...}` in a scrape, 0 when absent.
fn webhooks(scrape: &str, outcome: &str) -> f64 {
    let sample = format!("gateway_rule_webhooks_total{{rule=\"hot\",outcome=\"{outcome}\"}}");
    if scrape.contains(&sample) {
        metric(scrape, &sample)
    } else {
        0.0
    }
}

/// The `data` of every `WebhookCalled` record in the stopped gateway's event log.
fn logged_calls(gw: &Gateway) -> Vec<serde_json::Value> {
    gateway::store::query_events(&gw.db_path(), 0, Some("WebhookCalled"), None, 100)
        .unwrap()
        .iter()
        .map(|e| serde_json::from_slice::<serde_json::Value>(&e.json).unwrap()["data"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_post_on_transitions_and_a_silent_endpoint_does_not_hold_up_the_rules() {
    let ok = HttpServer::start(&[]);
    let silent = HttpServer::start(&[Reply::Hang; 4]);
    let refused = free_port();
    let rule = format!(
        r#"[[rule]]
name = "hot"
event = "Hot"
stream = "telemetry"
condition = "temperature > 75.0"
clear = "temperature < 70.0"

[[rule.action]]
on = "firing"
url = "{ok}"
payload = '{{"device": "{{device}}", "t": {{value.temperature}}}}'
headers = {{ Authorization = "Bearer s3cret" }}

[[rule.action]]
on = "firing"
url = "{silent}"
timeout = "3s"
retries = 0

[[rule.action]]
on = "resolved"
url = "http://127.0.0.1:{refused}/gone/{{device}}"
retries = 1
"#,
        ok = ok.url("/hooks/{device}?rule={rule}"),
        silent = silent.url("/slow"),
    );
    let mut gw = gateway_with(&rule, &[]);
    let mut events = subscribe(&gw.addr(), "events/Hot/+").await;

    // t-1 fires: the POST arrives with the rendered URL, payload and headers.
    publish_all(&gw.addr(), "t-1", &reading("t-1", 80.0)).await;
    assert_eq!(next_event(&mut events).await["subject"], "t-1");
    test_support::wait_until_async("the POST of t-1", WAIT, || ok.len() == 1).await;
    let post = &ok.requests()[0];
    assert_eq!(post.method, "POST");
    assert_eq!(post.path, "/hooks/t-1?rule=hot");
    assert_eq!(post.body_text(), r#"{"device": "t-1", "t": 80.0}"#);
    assert_eq!(post.header("content-type"), Some("application/json"));
    assert_eq!(post.header("authorization"), Some("Bearer s3cret"));

    // The silent endpoint holds t-1's second call for 3 s; meanwhile t-2's reading is
    // evaluated and its event and call come at once.
    test_support::wait_until_async("the silent call of t-1", WAIT, || silent.len() == 1).await;
    let hung_at = Instant::now();
    publish_all(&gw.addr(), "t-2", &reading("t-2", 81.0)).await;
    assert_eq!(next_event(&mut events).await["subject"], "t-2");
    test_support::wait_until_async("the POST of t-2", WAIT, || ok.len() == 2).await;
    assert!(
        hung_at.elapsed() < Duration::from_secs(3),
        "t-2 waited for t-1's hung call: {:?}",
        hung_at.elapsed()
    );
    let (_, scrape) = gw.http_get("/metrics");
    assert_eq!(
        webhooks(&scrape, "timeout"),
        0.0,
        "t-1's call is still hanging"
    );

    // t-1 resolves: its call to a closed port fails twice (one retry).
    publish_all(&gw.addr(), "t-1", &reading("t-1", 65.0)).await;
    assert_eq!(next_event(&mut events).await["data"]["state"], "resolved");

    let mut scrape = String::new();
    test_support::wait_until_async("every call's outcome in /metrics", WAIT, || {
        scrape = gw.http_get("/metrics").1;
        webhooks(&scrape, "timeout") == 2.0 && webhooks(&scrape, "error") == 1.0
    })
    .await;
    assert_eq!(webhooks(&scrape, "ok"), 2.0);
    assert_eq!(webhooks(&scrape, "http_error"), 0.0);
    assert_eq!(webhooks(&scrape, "dropped"), 0.0);

    gw.stop();
    let calls = logged_calls(&gw);
    assert_eq!(calls.len(), 5, "{calls:?}");
    let error = calls.iter().find(|c| c["outcome"] == "error").unwrap();
    assert_eq!(error["url"], format!("http://127.0.0.1:{refused}/gone/t-1"));
    assert_eq!(error["attempts"], 2);
    assert_eq!(error["on"], "resolved");
    let timeouts: Vec<_> = calls.iter().filter(|c| c["outcome"] == "timeout").collect();
    assert!(timeouts
        .iter()
        .all(|c| c["attempts"] == 1 && c["status"].is_null()));
    let oks: Vec<_> = calls.iter().filter(|c| c["outcome"] == "ok").collect();
    assert!(oks.iter().all(|c| c["status"] == 200), "{oks:?}");
    // Headers are never recorded.
    let log = gateway::store::query_events(&gw.db_path(), 0, None, None, 100).unwrap();
    assert!(log
        .iter()
        .all(|e| !String::from_utf8_lossy(&e.json).contains("s3cret")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_does_not_wait_for_a_hung_webhook() {
    let silent = HttpServer::start(&[Reply::Hang]);
    let rule = format!(
        r#"[[rule]]
name = "hot"
event = "Hot"
condition = "temperature > 75.0"

[[rule.action]]
on = "firing"
url = "{}"
timeout = "60s"
"#,
        silent.url("/slow")
    );
    let mut gw = gateway_with(&rule, &[("GATEWAY__GATEWAY__SHUTDOWN_GRACE", "10s")]);
    publish_all(&gw.addr(), "t-1", &reading("t-1", 80.0)).await;
    test_support::wait_until_async("the hung call", WAIT, || silent.len() == 1).await;
    let stopping = Instant::now();
    gw.stop();
    // The call gets pipeline::WEBHOOK_DRAIN (1 s), not its 60 s timeout nor the grace.
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopping.elapsed()
    );
    let calls = logged_calls(&gw);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["outcome"], "dropped");
    assert_eq!(calls[0]["attempts"], 1);
    assert_eq!(
        calls[0]["error"],
        "the gateway stopped before an answer came"
    );
}
