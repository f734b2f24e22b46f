//! End-to-end: device authentication, topic restrictions and connection limits of the
//! real gateway binary, with real MQTT clients and raw TCP floods on loopback.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use test_support::{counter, workspace_bin, Gateway};

/// Runs `gateway devices ARGS` in `dir` with its credentials file; returns (ok, stdout).
fn devices(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(workspace_bin("gateway"))
        .arg("devices")
        .args(args)
        .current_dir(dir)
        .env("GATEWAY__AUTH__CREDENTIALS_FILE", creds_path(dir))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

fn creds_path(dir: &Path) -> PathBuf {
    dir.join("devices.passwd")
}

fn add_device(dir: &Path, id: &str) -> String {
    let (ok, out) = devices(dir, &["add", id]);
    assert!(ok, "devices add {id} failed");
    out.trim().to_string()
}

/// A gateway requiring credentials, with `ids` provisioned; returns their passwords.
fn start_with_auth(ids: &[&str], extra: &[(&str, &str)]) -> (Gateway, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let passwords = ids.iter().map(|id| add_device(dir.path(), id)).collect();
    let creds = creds_path(dir.path()).display().to_string();
    let mut env = vec![
        ("GATEWAY__AUTH__ANONYMOUS", "false"),
        ("GATEWAY__AUTH__CREDENTIALS_FILE", creds.as_str()),
    ];
    env.extend_from_slice(extra);
    (Gateway::start_in(dir, &env), passwords)
}

/// Connects and waits for a successful CONNACK; `Err` says why not (the broker closes
/// refused connections without a CONNACK).
async fn connect(
    addr: &str,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> Result<(AsyncClient, EventLoop), String> {
    let (host, port) = addr.split_once(':').unwrap();
    let mut opts = MqttOptions::new(client_id, host, port.parse().unwrap());
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((user, pass)) = login {
        opts.set_credentials(user, pass);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let ack = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK within 5s".to_string())??;
    if ack.code != rumqttc::ConnectReturnCode::Success {
        return Err(format!("CONNACK {:?}", ack.code));
    }
    Ok((client, eventloop))
}

/// Publishes one QoS 1 message and waits for its PUBACK; `Err` when the connection
/// fails instead.
async fn publish(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), String> {
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no PUBACK within 5s".to_string())?
}

/// Polls until the SUBACK; `Err` when the connection fails first. Panics after 5 s.
async fn suback(eventloop: &mut EventLoop) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .expect("SUBACK within 5s")
}

/// Polls until the connection fails; `true` when it did within 5 s.
async fn closed_by_broker(eventloop: &mut EventLoop) -> bool {
    tokio::time::timeout(Duration::from_secs(5), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await
    .is_ok()
}

const READING: &[u8] = br#"{"temperature":21.5}"#;

#[test]
fn devices_add_prints_a_password_once_and_the_file_holds_only_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let password = add_device(dir.path(), "t-1");
    assert!(password.len() >= 32 && !password.contains(char::is_whitespace));
    let file = std::fs::read_to_string(creds_path(dir.path())).unwrap();
    assert!(!file.contains(&password), "the password is stored: {file}");
    assert!(file.contains("t-1:$argon2id$"), "{file}");

    let (ok, _) = devices(dir.path(), &["add", "t-1"]);
    assert!(!ok, "adding an existing device must fail");
    let (ok, _) = devices(dir.path(), &["add", "bad/id"]);
    assert!(!ok, "a device id with '/' must be refused");
    add_device(dir.path(), "t-2");
    assert_eq!(devices(dir.path(), &["list"]), (true, "t-1\nt-2\n".into()));
    assert!(devices(dir.path(), &["remove", "t-1"]).0);
    assert!(!devices(dir.path(), &["remove", "t-1"]).0);
    assert_eq!(devices(dir.path(), &["list"]), (true, "t-2\n".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_device_with_its_own_password_gets_in_and_its_reading_is_decoded() {
    let (mut gw, pw) = start_with_auth(&["t-1", "t-2"], &[]);
    let addr = gw.addr();

    assert!(
        connect(&addr, "t-1", None).await.is_err(),
        "anonymous admitted"
    );
    assert!(connect(&addr, "t-1", Some(("t-1", "wrong"))).await.is_err());
    assert!(
        connect(&addr, "t-1", Some(("t-1", &pw[1]))).await.is_err(),
        "another device's password admitted"
    );
    assert!(
        connect(&addr, "t-2", Some(("t-1", &pw[0]))).await.is_err(),
        "client id differing from the username admitted"
    );
    gw.wait_log("Devices failed to authenticate", Duration::from_secs(5));
    let (_, metrics) = gw.http_get("/metrics");
    for reason in ["password", "client_id"] {
        let sample = format!("gateway_auth_failures_total{{reason=\"{reason}\"}} ");
        let n: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(sample.as_str())?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {sample} in {metrics}"));
        assert!(n >= 1, "{reason}: {n}");
    }

    let (client, mut el) = connect(&addr, "t-1", Some(("t-1", &pw[0]))).await.unwrap();
    publish(&client, &mut el, "devices/t-1/telemetry", READING.to_vec())
        .await
        .unwrap();
    drop((client, el));

    // A device added while the gateway runs can connect without a restart.
    let pw3 = add_device(gw.dir.path(), "t-3");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (client, mut el) = loop {
        match connect(&addr, "t-3", Some(("t-3", &pw3))).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("t-3 never admitted: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    publish(&client, &mut el, "devices/t-3/telemetry", READING.to_vec())
        .await
        .unwrap();
    drop((client, el));

    let summary = gw.stop();
    assert_eq!(counter(&summary, "ingested"), 2, "{summary}");
    assert_eq!(counter(&summary, "decoded"), 2, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_may_publish_only_as_itself_and_subscribe_only_to_its_events() {
    let (mut gw, pw) = start_with_auth(&["t-1", "t-2"], &[]);
    let addr = gw.addr();
    let login = Some(("t-1", pw[0].as_str()));

    // Another device's topic: disconnected, and the reading never reaches the gateway.
    let (client, mut el) = connect(&addr, "t-1", login).await.unwrap();
    client
        .publish(
            "devices/t-2/telemetry",
            QoS::AtLeastOnce,
            false,
            READING.to_vec(),
        )
        .await
        .unwrap();
    assert!(
        closed_by_broker(&mut el).await,
        "t-1 published as t-2 and stayed connected"
    );

    // Subscribing to everyone's readings: disconnected.
    let (client, mut el) = connect(&addr, "t-1", login).await.unwrap();
    client
        .subscribe("devices/#", QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(
        closed_by_broker(&mut el).await,
        "t-1 subscribed to devices/# and stayed connected"
    );

    // Its own events and its own topic: fine.
    let (client, mut el) = connect(&addr, "t-1", login).await.unwrap();
    client
        .subscribe("events/+/t-1", QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(suback(&mut el).await, Ok(()));
    publish(&client, &mut el, "devices/t-1/telemetry", READING.to_vec())
        .await
        .unwrap();
    drop((client, el));

    let summary = gw.stop();
    assert_eq!(counter(&summary, "ingested"), 1, "{summary}");
    assert_eq!(counter(&summary, "decoded"), 1, "{summary}");
}

/// Distinct topics outside the device pattern, and the payload published on each.
const JUNK_TOPICS: usize = 2000;
const JUNK_PAYLOAD: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_may_subscribe_to_its_own_commands_only() {
    let (gw, pw) = start_with_auth(&["t-1", "t-2"], &[]);
    let addr = gw.addr();
    let login = Some(("t-1", pw[0].as_str()));

    // Another device's commands: disconnected.
    let (client, mut el) = connect(&addr, "t-1", login).await.unwrap();
    client
        .subscribe("devices/t-2/commands/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(
        closed_by_broker(&mut el).await,
        "t-1 subscribed to t-2's commands and stayed connected"
    );

    // Its own commands, all or one: SUBACK.
    for filter in ["devices/t-1/commands/+", "devices/t-1/commands/fan"] {
        let (client, mut el) = connect(&addr, "t-1", login).await.unwrap();
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        assert_eq!(suback(&mut el).await, Ok(()), "{filter}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_outside_the_device_topics_are_dead_lettered_and_hold_no_broker_log() {
    let mut gw = Gateway::start(&[]);
    let addr = gw.addr();
    gw.wait_log("Anonymous access is on", Duration::from_secs(1));
    let pid = gw.child.as_ref().unwrap().id();
    let (client, mut el) = connect(&addr, "d-1", None).await.unwrap();
    publish(&client, &mut el, "devices/d-1/telemetry", READING.to_vec())
        .await
        .unwrap();
    let baseline = rss_kib(pid);
    // If the broker kept a log per unknown topic, it would hold all of this.
    for i in 0..JUNK_TOPICS {
        publish(
            &client,
            &mut el,
            &format!("junk/{i}"),
            vec![b'x'; JUNK_PAYLOAD],
        )
        .await
        .unwrap_or_else(|e| panic!("junk/{i}: {e}"));
    }
    let growth = rss_kib(pid).saturating_sub(baseline);
    let junk_kib = (JUNK_TOPICS * JUNK_PAYLOAD / 1024) as u64;
    eprintln!("{JUNK_TOPICS} junk topics x {JUNK_PAYLOAD} B: gateway RSS grew {growth} KiB");
    // They are kept as dead letters on disk (through the database's 16 MiB page cache),
    // not in a broker log per topic, which would hold all of it.
    assert!(
        growth < junk_kib * 2 / 3,
        "RSS grew {growth} KiB after {junk_kib} KiB on unknown topics"
    );
    drop((client, el));
    let summary = gw.stop();
    assert_eq!(
        counter(&summary, "ingested"),
        1 + JUNK_TOPICS as u64,
        "{summary}"
    );
    assert_eq!(
        counter(&summary, "unrouted"),
        JUNK_TOPICS as u64,
        "{summary}"
    );
    assert_eq!(counter(&summary, "readings"), 1, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_size_and_connection_count_limits_hold() {
    const MAX_PAYLOAD: usize = 1024;
    const MAX_CONNECTIONS: usize = 3;
    let max_payload = MAX_PAYLOAD.to_string();
    let max_connections = MAX_CONNECTIONS.to_string();
    let mut gw = Gateway::start(&[
        ("GATEWAY__LOG__LEVEL", "info,rumqttd=info"),
        ("GATEWAY__BROKER__MAX_PAYLOAD_BYTES", &max_payload),
        ("GATEWAY__BROKER__MAX_CONNECTIONS", &max_connections),
    ]);
    let addr = gw.addr();

    let (client, mut el) = connect(&addr, "p-1", None).await.unwrap();
    let mut fits = br#"{"temperature":1,"pad":""#.to_vec();
    fits.resize(MAX_PAYLOAD / 2, b'x');
    fits.extend_from_slice(br#""}"#);
    publish(&client, &mut el, "devices/p-1/telemetry", fits)
        .await
        .unwrap();
    client
        .publish(
            "devices/p-1/telemetry",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; MAX_PAYLOAD + 1],
        )
        .await
        .unwrap();
    assert!(
        closed_by_broker(&mut el).await,
        "an oversized payload must close the connection"
    );

    let mut held = Vec::new();
    for i in 0..MAX_CONNECTIONS {
        held.push(connect(&addr, &format!("c-{i}"), None).await.unwrap());
    }
    assert!(
        connect(&addr, "c-extra", None).await.is_err(),
        "a connection beyond broker.max_connections was admitted"
    );
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(&addr, "c-extra", None).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "a freed slot was never reused; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    let summary = gw.stop();
    assert_eq!(counter(&summary, "ingested"), 1, "{summary}");
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// An MQTT 3.1.1 CONNECT with username and password.
fn connect_packet(client_id: &str, user: &str, pass: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0010, 0, 30];
    for s in [client_id, user, pass] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

fn raise_nofile_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Connection attempts in the flood, and how many run at once.
const FLOOD_ATTEMPTS: usize = 10_000;
const FLOOD_CONCURRENCY: usize = 500;
/// The gateway's RSS may grow by at most this much during the flood: two argon2
/// verifications at once (19 MiB each) plus the buffers of the pending sockets.
const FLOOD_RSS_GROWTH_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connection_attempts_keeps_memory_bounded_and_devices_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raise_nofile_limit(8 * FLOOD_CONCURRENCY as u64);
    let (mut gw, pw) = start_with_auth(&["t-ok"], &[("GATEWAY__BROKER__CONNECTION_TIMEOUT", "1s")]);
    let addr = gw.addr();
    let pid = gw.child.as_ref().unwrap().id();
    // Warm up: one good device, so the baseline includes a served connection.
    let (client, mut el) = connect(&addr, "t-ok", Some(("t-ok", &pw[0])))
        .await
        .unwrap();
    publish(&client, &mut el, "devices/t-ok/telemetry", READING.to_vec())
        .await
        .unwrap();
    drop((client, el));
    let baseline = rss_kib(pid);

    let started = Instant::now();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(FLOOD_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FLOOD_ATTEMPTS {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let addr = addr.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let Ok(Ok(mut stream)) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(&addr),
            )
            .await
            else {
                return;
            };
            match i % 3 {
                // Connect and close at once.
                0 => {}
                // Connect and hold without a CONNECT until the broker gives up.
                1 => {
                    let mut buf = [0u8; 16];
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
                }
                // CONNECT with a wrong password for a real device.
                _ => {
                    let packet = connect_packet("t-ok", "t-ok", &format!("guess-{i}"));
                    if stream.write_all(&packet).await.is_ok() {
                        let mut buf = [0u8; 16];
                        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                            .await;
                    }
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let flood_time = started.elapsed();
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "flood: {FLOOD_ATTEMPTS} attempts in {flood_time:?}; gateway RSS baseline {} MiB, peak {} MiB",
        baseline / 1024,
        peak / 1024
    );
    assert!(
        peak <= baseline + FLOOD_RSS_GROWTH_KIB,
        "RSS grew from {baseline} KiB to {peak} KiB during the flood"
    );

    // The legitimate device still gets in and is heard.
    let (client, mut el) = connect(&addr, "t-ok", Some(("t-ok", &pw[0])))
        .await
        .unwrap();
    publish(&client, &mut el, "devices/t-ok/telemetry", READING.to_vec())
        .await
        .unwrap();
    drop((client, el));
    let summary = gw.stop();
    assert_eq!(counter(&summary, "decoded"), 2, "{summary}");
}

/// device-sim can drive a gateway that authenticates devices: each simulated device
/// connects as itself with the password `gateway devices add` printed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_sim_fleet_connects_with_per_device_credentials() {
    let ids = ["t-0001", "t-0002", "t-0003"];
    let (gw, pw) = start_with_auth(&ids, &[]);
    let lines: String = ids
        .iter()
        .zip(&pw)
        .map(|(id, pw)| format!("{id}:{pw}\n"))
        .collect();
    let creds = device_sim::fleet::parse_credentials(&lines).unwrap();

    let mut fleet = device_sim::FleetConfig::new(gw.addr());
    fleet.devices = 3;
    fleet.count = Some(15);
    fleet.duration = None;
    fleet.progress = None;
    fleet.credentials = Some(std::sync::Arc::new(creds));
    let summary = tokio::time::timeout(Duration::from_secs(30), device_sim::fleet::run(fleet))
        .await
        .expect("device-sim finishes")
        .unwrap();
    assert_eq!(summary.connected_peak, 3, "every device got in");
    assert_eq!(summary.totals.errors, 0);
    assert_eq!(summary.totals.acked, 15);

    // Without credentials the same fleet is refused.
    let mut anonymous = device_sim::FleetConfig::new(gw.addr());
    anonymous.devices = 1;
    anonymous.count = Some(1);
    anonymous.duration = None;
    anonymous.progress = None;
    anonymous.connect_timeout = Duration::from_secs(2);
    let refused = tokio::time::timeout(Duration::from_secs(30), device_sim::fleet::run(anonymous))
        .await
        .expect("device-sim gives up");
    assert!(
        refused.map(|s| s.totals.acked).unwrap_or(0) == 0,
        "an anonymous device published"
    );
    let mut gw = gw;
    let summary = gw.stop();
    assert_eq!(counter(&summary, "decoded"), 15, "{summary}");
}

/// MQTT 5 topic aliases with authentication on: the broker resolves the alias before the
/// topic check and before the gateway reads the device id from the topic, so a device
/// that sends its topic once and then only the alias is admitted and its readings are
/// its own; an alias for another device's topic is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_are_resolved_before_the_topic_check() {
    use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

    let v5_port = test_support::free_port();
    let listen_v5 = format!("127.0.0.1:{v5_port}");
    let (gw, pw) = start_with_auth(
        &["t-1", "t-2"],
        &[("GATEWAY__BROKER__LISTEN_V5", listen_v5.as_str())],
    );
    let connect5 = |id: &'static str, pass: String| {
        let mut opts = Options5::new(id, "127.0.0.1", v5_port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_credentials(id, pass);
        opts.set_topic_alias_max(Some(10));
        Client5::new(opts, 10)
    };
    let aliased = |alias: u16| PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    };

    let (client, mut el) = connect5("t-1", pw[0].clone());
    let topic = "devices/t-1/telemetry";
    client
        .publish_with_properties(
            topic,
            QoS5::AtLeastOnce,
            false,
            READING.to_vec(),
            aliased(1),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        client
            .publish_with_properties("", QoS5::AtLeastOnce, false, READING.to_vec(), aliased(1))
            .await
            .unwrap();
    }
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        let mut acked = 0;
        while acked < 4 {
            match el.poll().await {
                Ok(Event5::Incoming(Packet5::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(acked)
    })
    .await
    .expect("PUBACKs within 10 s");
    assert_eq!(acked, Ok(4), "the aliased publishes were refused");
    let (_, devices) = gw.http_get("/api/devices");
    let devices: serde_json::Value = serde_json::from_str(&devices).unwrap();
    let t1 = devices["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["device"] == "t-1"))
        .unwrap_or_else(|| panic!("t-1 not in {devices}"));
    assert_eq!(t1["messages"], 4, "{t1}");
    drop((client, el));

    // t-2 sets an alias for t-1's topic: refused and disconnected, as without the alias.
    let (client, mut el) = connect5("t-2", pw[1].clone());
    client
        .publish_with_properties(
            topic,
            QoS5::AtLeastOnce,
            false,
            READING.to_vec(),
            aliased(1),
        )
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event5::Incoming(Packet5::PubAck(_))) => return false,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
    })
    .await
    .expect("the broker answers within 5 s");
    assert!(closed, "t-2 published on t-1's topic through an alias");
}
