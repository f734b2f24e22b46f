//! End-to-end: the real gateway binary, real MQTT clients, every payload format,
//! malformed input, bad configuration and shutdown.

use std::process::Command;
use std::time::Duration;

use test_support::{counter, free_port, publish_all, workspace_bin, Gateway};

fn senml_cbor() -> Vec<u8> {
    use serde_cbor::Value as V;
    let rec = |pairs: Vec<(i128, V)>| {
        V::Map(pairs.into_iter().map(|(k, v)| (V::Integer(k), v)).collect())
    };
    serde_cbor::to_vec(&V::Array(vec![
        rec(vec![
            (-2, V::Text("t-4/".into())),
            (0, V::Text("temperature".into())),
            (1, V::Text("Cel".into())),
            (2, V::Float(23.5)),
        ]),
        rec(vec![(0, V::Text("humidity".into())), (2, V::Integer(40))]),
    ]))
    .unwrap()
}

fn cbor_map() -> Vec<u8> {
    let mut map = std::collections::BTreeMap::new();
    map.insert("temperature".to_string(), serde_cbor::Value::Float(22.0));
    serde_cbor::to_vec(&map).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_decodes_and_garbage_is_dead_lettered() {
    let mut gw = Gateway::start(&[]);
    let messages: Vec<(String, Vec<u8>)> = vec![
        (
            "devices/t-1/telemetry".into(),
            br#"{"temperature":21.5}"#.to_vec(),
        ),
        ("devices/t-2/telemetry".into(), cbor_map()),
        (
            "devices/t-3/telemetry".into(),
            br#"[{"bn":"t-3/","n":"temperature","u":"Cel","v":22.5},{"n":"humidity","v":41}]"#
                .to_vec(),
        ),
        ("devices/t-4/telemetry".into(), senml_cbor()),
        (
            "devices/t-5/telemetry".into(),
            b"\x00garbage, not a reading".to_vec(),
        ),
        // The gateway keeps going after a bad payload.
        (
            "devices/t-1/telemetry".into(),
            br#"{"temperature":21.7,"ts":1764235200000}"#.to_vec(),
        ),
    ];
    publish_all(&gw.addr(), "e2e-formats", &messages).await;
    let summary = gw.stop();
    assert_eq!(counter(&summary, "ingested"), 6, "{summary}");
    assert_eq!(counter(&summary, "decoded"), 5, "{summary}");
    assert_eq!(counter(&summary, "dead_lettered"), 1, "{summary}");
    // A SenML pack with one time gives one reading, so readings == decoded here.
    assert_eq!(counter(&summary, "readings"), 5, "{summary}");

    let letters = gateway::store::read_dead_letters(&gw.db_path(), 10).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].topic, "devices/t-5/telemetry");
    assert_eq!(letters[0].payload, b"\x00garbage, not a reading");
    assert!(
        letters[0].reason.contains("neither JSON, CBOR nor SenML"),
        "{}",
        letters[0].reason
    );
    assert!(
        gw.log()
            .contains("Payloads did not decode; kept as dead letters."),
        "{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_content_type_selects_the_format() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};

    let v5_port = free_port();
    let v5 = format!("127.0.0.1:{v5_port}");
    let mut gw = Gateway::start(&[("GATEWAY__BROKER__LISTEN_V5", &v5)]);
    let mut opts = MqttOptions::new("e2e-v5", "127.0.0.1", v5_port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let with_type = |t: &str| PublishProperties {
        content_type: Some(t.to_string()),
        ..Default::default()
    };
    let pack = br#"[{"n":"temperature","v":20.5}]"#.to_vec();
    // Declared SenML: decodes. Declared plain JSON: a JSON array is not a reading object.
    client
        .publish_with_properties(
            "devices/m-1/telemetry",
            QoS::AtLeastOnce,
            false,
            pack.clone(),
            with_type("application/senml+json"),
        )
        .await
        .unwrap();
    client
        .publish_with_properties(
            "devices/m-2/telemetry",
            QoS::AtLeastOnce,
            false,
            pack,
            with_type("application/json"),
        )
        .await
        .unwrap();
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        while acked < 2 {
            if let Event::Incoming(Incoming::PubAck(_)) = eventloop.poll().await.expect("v5 client")
            {
                acked += 1;
            }
        }
    })
    .await
    .expect("PUBACKs within 20s");
    let summary = gw.stop();
    assert_eq!(counter(&summary, "decoded"), 1, "{summary}");
    assert_eq!(counter(&summary, "dead_lettered"), 1, "{summary}");
    let letters = gateway::store::read_dead_letters(&gw.db_path(), 10).unwrap();
    assert_eq!(letters[0].topic, "devices/m-2/telemetry");
    assert!(
        letters[0].reason.starts_with("json: expected an object"),
        "{}",
        letters[0].reason
    );
}

#[test]
fn bad_config_names_every_key_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(
        &file,
        "[broker]\nlisten = \"127.0.0.1:1\"\nmax_connections = \"lots\"\nmax_conections = 5\n",
    )
    .unwrap();
    for sub in ["run", "check-config"] {
        let out = Command::new(workspace_bin("gateway"))
            .args([sub, "--config"])
            .arg(&file)
            .env("GATEWAY__LOG__LEVEL", "loud")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{sub}: {err}");
        assert!(
            err.contains("broker.max_connections: expected an integer, found 'lots'"),
            "{err}"
        );
        assert!(
            err.contains(
                "broker.max_conections: unknown key; did you mean 'broker.max_connections'?"
            ),
            "{err}"
        );
        assert!(err.contains("log.level: 'loud' is not a level"), "{err}");
        assert!(
            err.contains("(from environment variable GATEWAY__LOG__LEVEL)"),
            "{err}"
        );
    }
    let ok = Command::new(workspace_bin("gateway"))
        .arg("check-config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--config")
        .arg("../config/gateway.toml")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn port_in_use_exits_64_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(workspace_bin("gateway"))
        .arg("run")
        .current_dir(dir.path())
        .env("GATEWAY__BROKER__LISTEN", &addr)
        .env("GATEWAY__STORAGE__PATH", dir.path().join("gw.redb"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!("broker.listen: cannot listen on {addr}")),
        "{err}"
    );
    assert!(
        !dir.path().join("gw.redb").exists(),
        "nothing is created before the config is valid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_closes_the_database() {
    let mut gw = Gateway::start(&[]);
    let messages: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| {
            (
                format!("devices/s-{}/telemetry", i % 4),
                format!("{{\"n\":{i}}}").into_bytes(),
            )
        })
        .chain(std::iter::once((
            "devices/s-0/telemetry".to_string(),
            b"{bad".to_vec(),
        )))
        .collect();
    publish_all(&gw.addr(), "e2e-shutdown", &messages).await;
    let status = gw.signal_and_wait(libc::SIGINT, Duration::from_secs(15));
    assert!(status.success(), "exit {status}; log:\n{}", gw.log());
    let summary = gw.wait_log("Gateway stopped.", Duration::from_secs(1));
    assert_eq!(counter(&summary, "decoded"), 200, "{summary}");
    assert!(gw.log().contains("SIGINT received."));
    // The database was closed cleanly: it opens again and holds the dead letter.
    let letters = gateway::store::read_dead_letters(&gw.db_path(), 10).unwrap();
    assert_eq!(letters.len(), 1);
    // And the gateway starts again on the same file.
    gw.spawn();
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_stage_does_not_hold_the_exit_beyond_the_grace() {
    // The hidden fault makes the device events thread hang once its input closes, as a
    // stage stuck in a blocking call would.
    let grace = Duration::from_secs(1);
    let mut gw = Gateway::start(&[
        ("GATEWAY__GATEWAY__SHUTDOWN_GRACE", "1s"),
        ("GATEWAY_TEST_FAULT", "stuck-device-events"),
    ]);
    let messages = vec![
        ("devices/s-0/telemetry".to_string(), b"{\"n\":1}".to_vec()),
        ("devices/s-0/telemetry".to_string(), b"{bad".to_vec()),
    ];
    publish_all(&gw.addr(), "e2e-stuck", &messages).await;
    let sent = std::time::Instant::now();
    let status = gw.signal_and_wait(libc::SIGTERM, Duration::from_secs(15));
    let took = sent.elapsed();
    let log = gw.log();
    assert_eq!(status.code(), Some(1), "exit {status}; log:\n{log}");
    // The grace is waited out for the stuck stage, and not much more: closing the store
    // and the runtime get at most a second after it.
    assert!(
        took >= grace - Duration::from_millis(100),
        "{took:?}; log:\n{log}"
    );
    assert!(
        took < grace + Duration::from_millis(1500),
        "{took:?}; log:\n{log}"
    );
    assert!(
        log.contains("Injected fault: the device events stage hangs."),
        "{log}"
    );
    let over = gw.wait_log("Shutdown grace period over", Duration::from_secs(1));
    assert!(over.contains("still_running=device-events"), "{over}");
    assert!(
        log.contains("shutdown grace period (1s) ran out with device-events still running"),
        "{log}"
    );
    // What decode handed to the store is committed, the stuck stage notwithstanding.
    let letters = gateway::store::read_dead_letters(&gw.db_path(), 10).unwrap();
    assert_eq!(letters.len(), 1);
}
