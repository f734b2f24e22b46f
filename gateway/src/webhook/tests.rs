//! The webhook task against a real HTTP server on 127.0.0.1 and a real store: retries,
//! timeouts, refused connections, a full queue and an abandoned call, each with its
//! event-log record and its count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use test_support::{free_port, wait_until_async, HttpServer, Reply};

use super::*;
use crate::config::Config;
use crate::events::EventState;
use crate::rules::WebhookSettings;
use crate::store::{Store, StoreConfig};

const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    store: StoreHandle,
    rules: SharedRules,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("gw.redb"),
        StoreConfig::from_config(&Config::defaults()),
    )
    .unwrap();
    Setup {
        store,
        rules: SharedRules::default(),
        _dir: dir,
    }
}

fn call(url: &str, timeout: Duration, retries: u32) -> WebhookCall {
    WebhookCall {
        id: "a1".into(),
        index: 0,
        on: EventState::Firing,
        rule: "hot".into(),
        event_id: "e1".into(),
        event_type: "Hot".into(),
        device: "t-7".into(),
        url: url.into(),
        payload: r#"{"on": true}"#.into(),
        settings: Arc::new(WebhookSettings {
            timeout,
            retries,
            headers: vec![("Authorization".into(), "Bearer s3cret".into())],
        }),
    }
}

impl Setup {
    fn channel(&self, capacity: usize, abandon: &CancellationToken) -> (WebhookQueue, Webhooks) {
        channel(
            capacity,
            "gw",
            self.store.clone(),
            self.rules.clone(),
            abandon.clone(),
        )
    }

    /// The `data` of the event log's webhook records, once there are `n`.
    async fn records(&self, n: usize) -> Vec<serde_json::Value> {
        let read = || {
            self.store
                .query_events(0, Some(WEBHOOK_EVENT_TYPE), None, 100)
                .unwrap()
        };
        wait_until_async("webhook records in the event log", WAIT, || {
            read().len() >= n
        })
        .await;
        read()
            .iter()
            .map(|e| serde_json::from_slice::<serde_json::Value>(&e.json).unwrap()["data"].clone())
            .collect()
    }

    fn count(&self, result: WebhookResult) -> u64 {
        let snapshot = self.rules.get();
        snapshot
            .webhooks
            .get(&("hot".to_string(), result))
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn an_answer_of_500_is_retried_and_the_second_attempt_succeeds() {
    let s = setup();
    let server = HttpServer::start(&[Reply::Status(500), Reply::Status(200)]);
    let abandon = CancellationToken::new();
    let (mut queue, task) = s.channel(4, &abandon);
    let task = tokio::spawn(task.run());
    queue.submit(call(
        &server.url("/hooks/t-7?x=1"),
        Duration::from_secs(5),
        3,
    ));
    let data = &s.records(1).await[0];
    assert_eq!(data["outcome"], "ok", "{data}");
    assert_eq!(data["status"], 200);
    assert_eq!(data["attempts"], 2);
    assert_eq!(data["event_id"], "e1");
    assert_eq!(data["rule"], "hot");
    assert_eq!(data["url"], server.url("/hooks/t-7?x=1"));
    assert!(data["error"].is_null(), "{data}");
    assert_eq!(
        (
            s.count(WebhookResult::Ok),
            s.count(WebhookResult::HttpError)
        ),
        (1, 0)
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/hooks/t-7?x=1")
        );
        assert_eq!(r.body_text(), r#"{"on": true}"#);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("authorization"), Some("Bearer s3cret"));
    }
    // The retry waited for the backoff, at least half its first step.
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= client::RETRY_BACKOFF.min / 2, "{gap:?}");
    // The record holds no header: the secret stays out of the event log.
    let logged = s.store.query_events(0, None, None, 10).unwrap();
    assert!(logged
        .iter()
        .all(|e| !String::from_utf8_lossy(&e.json).contains("s3cret")));
    drop(queue);
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_error_is_final_and_a_server_that_never_answers_times_out() {
    let s = setup();
    let refusing = HttpServer::start(&[Reply::Status(404)]);
    let silent = HttpServer::start(&[Reply::Hang, Reply::Hang]);
    let abandon = CancellationToken::new();
    let (mut queue, task) = s.channel(4, &abandon);
    tokio::spawn(task.run());
    let started = Instant::now();
    queue.submit(call(&refusing.url("/"), Duration::from_secs(5), 3));
    queue.submit(call(&silent.url("/"), Duration::from_millis(300), 1));
    let records = s.records(2).await;
    let by_outcome = |o: &str| records.iter().find(|d| d["outcome"] == o).cloned();
    let http_error = by_outcome("http_error").expect("a 404 is recorded as http_error");
    assert_eq!(
        (http_error["status"].clone(), http_error["attempts"].clone()),
        (404.into(), 1.into())
    );
    assert_eq!(refusing.len(), 1, "a 404 is not retried");
    let timeout = by_outcome("timeout").expect("the silent server timed out");
    assert_eq!(timeout["attempts"], 2);
    assert!(timeout["status"].is_null());
    assert!(
        timeout["error"]
            .as_str()
            .unwrap()
            .contains("no answer within 300ms"),
        "{timeout}"
    );
    assert_eq!(silent.len(), 2);
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(
        (
            s.count(WebhookResult::HttpError),
            s.count(WebhookResult::Timeout)
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn a_refused_connection_is_an_error_after_every_retry() {
    let s = setup();
    let abandon = CancellationToken::new();
    let (mut queue, task) = s.channel(4, &abandon);
    tokio::spawn(task.run());
    let port = free_port();
    queue.submit(call(
        &format!("http://127.0.0.1:{port}/x"),
        Duration::from_secs(2),
        2,
    ));
    let data = &s.records(1).await[0];
    assert_eq!(data["outcome"], "error");
    assert_eq!(data["attempts"], 3);
    assert!(
        data["error"].as_str().unwrap().contains("cannot connect"),
        "{data}"
    );
    assert_eq!(s.count(WebhookResult::Error), 1);
}

#[tokio::test]
async fn a_full_queue_drops_calls_without_waiting() {
    let s = setup();
    let abandon = CancellationToken::new();
    // Nobody serves the queue: one call fits, the others are dropped.
    let (mut queue, _task) = s.channel(1, &abandon);
    let started = Instant::now();
    for _ in 0..3 {
        queue.submit(call("http://127.0.0.1:9/", Duration::from_secs(5), 0));
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    let records = s.records(2).await;
    assert_eq!(records.len(), 2);
    for data in &records {
        assert_eq!(data["outcome"], "dropped");
        assert_eq!(data["attempts"], 0);
        assert_eq!(data["error"], "the webhook queue was full");
    }
    assert_eq!(s.count(WebhookResult::Dropped), 2);
}

#[tokio::test]
async fn abandoning_ends_calls_in_progress_and_drops_queued_ones() {
    let s = setup();
    let server = HttpServer::start(&[Reply::Hang; 8]);
    let abandon = CancellationToken::new();
    let (mut queue, task) = s.channel(2 * MAX_IN_FLIGHT, &abandon);
    let task = tokio::spawn(task.run());
    let n = MAX_IN_FLIGHT + 2;
    for _ in 0..n {
        queue.submit(call(&server.url("/"), Duration::from_secs(60), 3));
    }
    wait_until_async("every call in flight reached the server", WAIT, || {
        server.len() == MAX_IN_FLIGHT
    })
    .await;
    abandon.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("abandoned calls end at once")
        .unwrap();
    let records = s.records(n).await;
    let attempts: Vec<i64> = records
        .iter()
        .map(|d| {
            assert_eq!(d["outcome"], "dropped");
            d["attempts"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(attempts.iter().filter(|a| **a == 1).count(), MAX_IN_FLIGHT);
    assert_eq!(attempts.iter().filter(|a| **a == 0).count(), 2);
    assert_eq!(s.count(WebhookResult::Dropped), n as u64);
}
