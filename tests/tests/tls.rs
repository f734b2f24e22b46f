//! End-to-end TLS: the real gateway binary with its TLS listener for devices (with and
//! without client certificates) and forwarding over mqtts:// to a real Mosquitto with a
//! TLS listener (mutual TLS, and a wrong CA). Certificates come from throwaway CAs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gateway::store::Lane;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use test_support::{
    counter, free_port, publish_all, workspace_bin, Collector, Gateway, Issued, Mosquitto, TestCa,
};

/// How a test device connects.
enum Device<'a> {
    Plain,
    Tls {
        ca: &'a TestCa,
        client: Option<&'a Issued>,
    },
}

/// Connects to `127.0.0.1:port`, publishes one QoS 1 reading and waits for its PUBACK;
/// `Err` with the client's error when the connection fails.
async fn publish_one(port: u16, device: Device<'_>, topic: &str) -> Result<(), String> {
    let mut opts = MqttOptions::new(format!("dev-{}", free_port()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    if let Device::Tls { ca, client } = device {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: ca.pem().into_bytes(),
            alpn: None,
            client_auth: client.map(|c| {
                (
                    c.cert_pem.clone().into_bytes(),
                    c.key_pem.clone().into_bytes(),
                )
            }),
        }));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            br#"{"temperature":21.5}"#.to_vec(),
        )
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no PUBACK within 10s".into()));
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    outcome
}

fn tls_env(server: &Issued, client_ca: Option<&Path>) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "GATEWAY__BROKER__LISTEN_TLS".to_string(),
            format!("127.0.0.1:{}", free_port()),
        ),
        (
            "GATEWAY__BROKER__TLS_CERT".into(),
            server.cert.display().to_string(),
        ),
        (
            "GATEWAY__BROKER__TLS_KEY".into(),
            server.key.display().to_string(),
        ),
    ];
    if let Some(ca) = client_ca {
        env.push((
            "GATEWAY__BROKER__TLS_CLIENT_CA".into(),
            ca.display().to_string(),
        ));
    }
    env
}

fn start(env: &[(String, String)]) -> Gateway {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Gateway::start(&env)
}

fn tls_port(env: &[(String, String)]) -> u16 {
    let listen = &env
        .iter()
        .find(|(k, _)| k == "GATEWAY__BROKER__LISTEN_TLS")
        .unwrap()
        .1;
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_over_tls_and_plaintext_fails() {
    let pki = tempfile::tempdir().unwrap();
    let ca = TestCa::new("gateway test CA");
    let server = ca.issue(pki.path(), "gateway", &["127.0.0.1", "localhost"]);
    let stranger = TestCa::new("some other CA");
    let env = tls_env(&server, None);
    let port = tls_port(&env);
    let mut gw = start(&env);

    // A connection that never starts its handshake must not hold up anyone else.
    let silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let started = Instant::now();
    publish_one(
        port,
        Device::Tls {
            ca: &ca,
            client: None,
        },
        "devices/tls-1/telemetry",
    )
    .await
    .expect("a TLS client trusting the gateway's CA connects");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the TLS client waited {:?} behind a silent connection",
        started.elapsed()
    );

    let plain = publish_one(port, Device::Plain, "devices/plain-1/telemetry").await;
    assert!(plain.is_err(), "plaintext MQTT on the TLS port must fail");
    let wrong_ca = publish_one(
        port,
        Device::Tls {
            ca: &stranger,
            client: None,
        },
        "devices/tls-2/telemetry",
    )
    .await
    .expect_err("a client that does not trust the gateway's CA must fail");
    assert!(
        wrong_ca.contains("UnknownIssuer") || wrong_ca.contains("certificate"),
        "{wrong_ca}"
    );
    // The plaintext listener still works beside the TLS one.
    publish_all(
        &gw.addr(),
        "plain-dev",
        &[(
            "devices/plain-2/telemetry".to_string(),
            br#"{"temperature":20}"#.to_vec(),
        )],
    )
    .await;
    drop(silent);

    let summary = gw.stop();
    assert_eq!(counter(&summary, "decoded"), 2, "{summary}");
    assert!(
        gw.log().contains("TLS handshake with a device failed."),
        "{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_and_verified_when_configured() {
    let pki = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new("gateway server CA");
    let device_ca = TestCa::new("device CA");
    let other_ca = TestCa::new("another CA");
    let server = server_ca.issue(pki.path(), "gateway", &["127.0.0.1"]);
    let device = device_ca.issue(pki.path(), "sensor-7", &[]);
    let impostor = other_ca.issue(pki.path(), "impostor", &[]);
    let device_ca_file = device_ca.write(pki.path(), "device-ca");
    let env = tls_env(&server, Some(&device_ca_file));
    let port = tls_port(&env);
    let mut gw = start(&env);

    let tls = |client| Device::Tls {
        ca: &server_ca,
        client,
    };
    publish_one(port, tls(Some(&device)), "devices/sensor-7/telemetry")
        .await
        .expect("a device with a certificate from the device CA connects");
    publish_one(port, tls(Some(&impostor)), "devices/impostor/telemetry")
        .await
        .expect_err("a certificate from another CA must be refused");
    publish_one(port, tls(None), "devices/anonymous/telemetry")
        .await
        .expect_err("a device without a certificate must be refused");

    let summary = gw.stop();
    assert_eq!(counter(&summary, "decoded"), 1, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_beyond_max_connections_are_closed_not_queued() {
    let pki = tempfile::tempdir().unwrap();
    let ca = TestCa::new("gateway test CA");
    let server = ca.issue(pki.path(), "gateway", &["127.0.0.1"]);
    let mut env = tls_env(&server, None);
    env.push(("GATEWAY__BROKER__MAX_CONNECTIONS".into(), "2".into()));
    let port = tls_port(&env);
    let mut gw = start(&env);
    let device = || Device::Tls {
        ca: &ca,
        client: None,
    };

    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Give the listener time to take both before the device comes.
    std::thread::sleep(Duration::from_millis(300));
    publish_one(port, device(), "devices/full-1/telemetry")
        .await
        .expect_err("the third TLS connection is closed while two are open");
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match publish_one(port, device(), "devices/full-2/telemetry").await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "slots were not freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = gw.stop();
    assert_eq!(counter(&summary, "decoded"), 1, "{summary}");
    assert!(
        gw.log().contains("TLS listener is at max_connections"),
        "{}",
        gw.log()
    );
}

#[test]
fn unusable_tls_files_exit_64_naming_the_key() {
    let pki = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca");
    let server = ca.issue(pki.path(), "gateway", &["127.0.0.1"]);
    let out = Command::new(workspace_bin("gateway"))
        .arg("check-config")
        .env("GATEWAY__BROKER__LISTEN_TLS", "127.0.0.1:8883")
        .env("GATEWAY__BROKER__TLS_CERT", &server.key)
        .env("GATEWAY__BROKER__TLS_KEY", pki.path().join("missing.key"))
        .env("GATEWAY__UPSTREAM__URL", "mqtts://127.0.0.1")
        .env("GATEWAY__UPSTREAM__CLIENT_CERT", &server.cert)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("broker.tls_cert: "), "{err}");
    assert!(err.contains("holds no PEM certificate"), "{err}");
    assert!(err.contains("broker.tls_key: cannot read "), "{err}");
    assert!(
        err.contains("upstream.client_key: is required with upstream.client_cert"),
        "{err}"
    );
}

fn upstream_env(tls_port: u16, ca: &Path, client: Option<&Issued>) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "GATEWAY__UPSTREAM__URL".to_string(),
            format!("mqtts://127.0.0.1:{tls_port}"),
        ),
        (
            "GATEWAY__UPSTREAM__CA_FILE".into(),
            ca.display().to_string(),
        ),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN".into(), "100ms".into()),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX".into(), "500ms".into()),
    ];
    if let Some(c) = client {
        env.push((
            "GATEWAY__UPSTREAM__CLIENT_CERT".into(),
            c.cert.display().to_string(),
        ));
        env.push((
            "GATEWAY__UPSTREAM__CLIENT_KEY".into(),
            c.key.display().to_string(),
        ));
    }
    env
}

fn readings(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("devices/up-{}/telemetry", i % 3),
                format!(r#"{{"temperature":{i}}}"#).into_bytes(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_over_mutual_tls_to_mosquitto() {
    const N: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let Some((upstream, tls_port)) = Mosquitto::start_tls(&ca, true) else {
        return;
    };
    let collector = Collector::start(upstream.port, "gateways/#").await;
    let gateway_cert = ca.issue(dir.path(), "edge-gateway", &[]);
    let ca_file = ca.write(dir.path(), "upstream-ca");
    let mut gw = start(&upstream_env(tls_port, &ca_file, Some(&gateway_cert)));
    gw.wait_log("connected upstream", Duration::from_secs(10));
    publish_all(&gw.addr(), "mtls-dev", &readings(N)).await;
    collector.wait_unique(N, Duration::from_secs(20)).await;
    let got = collector.snapshot();
    assert!(
        got.iter()
            .all(|m| m.topic.starts_with("gateways/edge-gateway/devices/up-")),
        "{:?}",
        got.first().map(|m| &m.topic)
    );
    gw.stop();
    let stats = gateway::store::read_stats_file(&gw.db_path()).unwrap();
    // Readings only: the device's DeviceDisconnected event is appended as the stop
    // begins and may be left for the next start to send.
    assert_eq!(
        stats.lanes[gateway::store::Lane::Reading].messages,
        0,
        "every reading was acked over TLS and deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_needs_a_client_certificate_refuses_a_gateway_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let Some((_upstream, tls_port)) = Mosquitto::start_tls(&ca, true) else {
        return;
    };
    let ca_file = ca.write(dir.path(), "upstream-ca");
    let mut gw = start(&upstream_env(tls_port, &ca_file, None));
    publish_all(&gw.addr(), "no-cert-dev", &readings(3)).await;
    gw.wait_log("retrying with backoff", Duration::from_secs(10));
    let summary = gw.stop();
    assert!(!gw.log().contains("connected upstream"), "{}", gw.log());
    assert_eq!(counter(&summary, "decoded"), 3, "{summary}");
    let stats = gateway::store::read_stats_file(&gw.db_path()).unwrap();
    // The readings lane: the event lane holds the device's connect and disconnect besides.
    assert_eq!(
        stats.lanes[Lane::Reading].messages,
        3,
        "nothing left the outbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_ca_is_a_clear_error_and_data_stays_in_the_outbox() {
    const N: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let Some((_upstream, tls_port)) = Mosquitto::start_tls(&ca, false) else {
        return;
    };
    let wrong = TestCa::new("not the upstream's CA");
    let wrong_file = wrong.write(dir.path(), "wrong-ca");
    let mut gw = start(&upstream_env(tls_port, &wrong_file, None));
    publish_all(&gw.addr(), "wrong-ca-dev", &readings(N)).await;
    let line = gw.wait_log("Upstream TLS handshake failed", Duration::from_secs(10));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("upstream.ca_file"), "{line}");
    assert!(
        line.contains("UnknownIssuer") || line.contains("invalid peer certificate"),
        "{line}"
    );
    gw.stop();
    assert!(!gw.log().contains("connected upstream"), "{}", gw.log());
    let stats = gateway::store::read_stats_file(&gw.db_path()).unwrap();
    // The readings lane: the event lane holds the device's connect and disconnect besides.
    assert_eq!(
        stats.lanes[Lane::Reading].messages,
        N as u64,
        "nothing left the outbox"
    );
}
