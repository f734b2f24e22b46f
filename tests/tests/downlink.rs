//! Commands from upstream to devices through the real binary, Mosquitto upstream and
//! real MQTT 5 device clients: a command for an offline device is queued in the database,
//! survives `kill -9`, is delivered once the device connects and subscribes, and is gone
//! after its PUBACK; expired commands are not delivered; the queue bound drops the oldest.
//! Each command's states arrive upstream as status messages. The tests need Mosquitto;
//! without it they are skipped, or fail with `GATEWAY_REQUIRE_MOSQUITTO=1`.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use test_support::{
    free_port, wait_until_async, workspace_bin, Collector, Gateway, Mosquitto, V5Client,
};

const PREFIX: &str = "up";
const WAIT: Duration = Duration::from_secs(15);

/// A gateway forwarding to Mosquitto, with an MQTT 5 listener for devices, a collector
/// of the command status messages, and an upstream client that sends commands.
struct Setup {
    _mosquitto: Mosquitto,
    gw: Gateway,
    v5_port: u16,
    statuses: Collector,
    operator: V5Client,
}

async fn setup(extra: &[(&str, &str)]) -> Option<Setup> {
    let mosquitto = Mosquitto::start()?;
    let statuses = Collector::start(mosquitto.port, &format!("{PREFIX}/commands/+/+/status")).await;
    let v5_port = free_port();
    let url = format!("mqtt://127.0.0.1:{}", mosquitto.port);
    let v5 = format!("127.0.0.1:{v5_port}");
    let mut env = vec![
        ("GATEWAY__GATEWAY__ID", "gw-downlink"),
        ("GATEWAY__UPSTREAM__URL", url.as_str()),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", PREFIX),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN", "50ms"),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX", "200ms"),
        ("GATEWAY__BROKER__LISTEN_V5", v5.as_str()),
    ];
    env.extend_from_slice(extra);
    let gw = Gateway::start(&env);
    let operator = V5Client::connect(mosquitto.port, "operator", |_| {}).await;
    let mut s = Setup {
        _mosquitto: mosquitto,
        gw,
        v5_port,
        statuses,
        operator,
    };
    s.wait_subscribed().await;
    Some(s)
}

impl Setup {
    /// Sends a command upstream (QoS 1) with `id` as its correlation data.
    async fn command(&mut self, device: &str, command: &str, id: &str, payload: &str) {
        self.command_with(device, command, id, payload, PublishProperties::default())
            .await;
    }

    async fn command_with(
        &mut self,
        device: &str,
        command: &str,
        id: &str,
        payload: &str,
        properties: PublishProperties,
    ) {
        let properties = PublishProperties {
            correlation_data: Some(id.as_bytes().to_vec().into()),
            ..properties
        };
        let topic = format!("{PREFIX}/commands/{device}/{command}");
        self.operator
            .publish(&topic, false, payload.as_bytes(), properties)
            .await;
    }

    /// Waits until the gateway has subscribed upstream: probe commands (for a device that
    /// never connects) until one is reported queued.
    async fn wait_subscribed(&mut self) {
        for attempt in 0..100 {
            let id = format!("probe-{attempt}");
            self.command("probe", "ping", &id, "{}").await;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
            while tokio::time::Instant::now() < deadline {
                if self.state_of(&id).contains(&"queued".to_string()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("the gateway never subscribed to commands upstream");
    }

    /// The status messages received so far, as JSON, each once (a status message is an
    /// outbox row: after `kill -9` it may be forwarded again, with the same message id).
    fn status_bodies(&self) -> Vec<Value> {
        let mut seen = std::collections::HashSet::new();
        self.statuses
            .snapshot()
            .iter()
            .filter(|m| seen.insert(m.id.clone().expect("status rows carry an id")))
            .map(|m| serde_json::from_slice(&m.payload).expect("status is JSON"))
            .collect()
    }

    /// Status messages reporting `state`, of any command.
    fn reported(&self, state: &str) -> f64 {
        self.status_bodies()
            .iter()
            .filter(|b| b["state"] == state)
            .count() as f64
    }

    /// The states reported for command `id`, in arrival order.
    fn state_of(&self, id: &str) -> Vec<String> {
        self.status_bodies()
            .iter()
            .filter(|b| b["id"] == id)
            .map(|b| b["state"].as_str().unwrap().to_string())
            .collect()
    }

    async fn wait_state(&self, id: &str, state: &str) -> Value {
        wait_until_async(&format!("status '{state}' of {id}"), WAIT, || {
            self.state_of(id).iter().any(|s| s == state)
        })
        .await;
        self.status_bodies()
            .into_iter()
            .find(|b| b["id"] == id && b["state"] == state)
            .unwrap()
    }

    /// A device connected to the MQTT 5 listener and subscribed to its commands.
    async fn device(&self, id: &str) -> V5Client {
        let mut d = V5Client::connect(self.v5_port, id, |_| {}).await;
        d.subscribe(Filter::new(
            format!("devices/{id}/commands/+"),
            QoS::AtLeastOnce,
        ))
        .await;
        d
    }

    fn metric(&self, name: &str) -> f64 {
        let (code, text) = self.gw.http_get("/metrics");
        assert_eq!(code, 200);
        test_support::metric(&text, name)
    }
}

/// Runs `gateway commands ARGS` on the database of `gw`: (success, stdout).
fn commands_cli(gw: &Gateway, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(workspace_bin("gateway"))
        .arg("commands")
        .args(args)
        .current_dir(gw.dir.path())
        .env("GATEWAY__STORAGE__PATH", gw.db_path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn payload(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_an_offline_device_survives_kill_9_and_is_delivered_once() {
    let Some(mut s) = setup(&[]).await else {
        return;
    };
    let properties = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("origin".into(), "dispatch".into())],
        ..Default::default()
    };
    s.command_with("d-1", "fan", "cmd-1", r#"{"on":true}"#, properties)
        .await;
    let queued = s.wait_state("cmd-1", "queued").await;
    assert_eq!(queued["device"], "d-1", "{queued}");
    assert_eq!(queued["command"], "fan", "{queued}");
    assert!(queued["time"].as_i64().is_some(), "{queued}");

    s.gw.kill();
    s.gw.spawn();

    // Queued across the kill: in the API and the CLI (read-only, the gateway runs).
    let (_, body) = s.gw.http_get("/api/devices");
    let devices: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(devices["pending_commands"]["d-1"], 1, "{devices}");
    let (ok, listed) = commands_cli(&s.gw, &["list", "--device", "d-1"]);
    assert!(ok, "{listed}");
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 1, "{listed}");
    assert!(lines[0].starts_with("d-1\tfan\tcmd-1\t"), "{listed}");

    let mut device = s.device("d-1").await;
    let got = device.next().await;
    assert_eq!(got.topic, "devices/d-1/commands/fan");
    assert_eq!(payload(&got), r#"{"on":true}"#);
    assert_eq!(got.qos, QoS::AtLeastOnce);
    let props = got.properties.clone().expect("MQTT 5 properties");
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        props.user_properties,
        [("origin".to_string(), "dispatch".to_string())]
    );
    s.wait_state("cmd-1", "delivered").await;

    // The PUBACK removed it: a new connection gets the next command, not this one again.
    device.drop_connection().await;
    let mut device = s.device("d-1").await;
    s.command("d-1", "fan", "cmd-2", r#"{"on":false}"#).await;
    let next = device.next().await;
    assert_eq!(
        payload(&next),
        r#"{"on":false}"#,
        "cmd-1 was delivered again"
    );
    s.wait_state("cmd-2", "delivered").await;
    assert_eq!(s.state_of("cmd-1"), ["queued", "delivered"]);
    assert_eq!(
        s.metric(r#"gateway_commands_total{state="delivered"}"#),
        2.0
    );
    // Only the probe commands of the never-connected device are left.
    let probes = s.metric(r#"gateway_commands_total{state="queued"}"#) - 2.0;
    assert_eq!(s.metric("gateway_commands_pending"), probes);

    // An operator drops the probe device's queue (the gateway stopped); its commands are
    // reported dropped upstream on the next run.
    let (_, listed) = commands_cli(&s.gw, &["list"]);
    assert_eq!(listed.lines().count() as f64, probes, "{listed}");
    let (ok, out) = commands_cli(&s.gw, &["drop", "probe"]);
    assert!(!ok, "dropping needs the gateway stopped: {out}");
    s.gw.stop();
    let (ok, out) = commands_cli(&s.gw, &["drop", "probe"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("dropped {probes} command(s) of probe"));
    assert_eq!(commands_cli(&s.gw, &["list"]).1, "");
    s.gw.spawn();
    wait_until_async("the probe commands reported dropped", WAIT, || {
        s.reported("dropped") == probes
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_commands_are_not_delivered_and_report_expired() {
    let Some(mut s) = setup(&[("GATEWAY__DOWNLINK__TTL", "2s")]).await else {
        return;
    };
    // An MQTT 5 message expiry overrides downlink.ttl.
    let one_second = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    s.command_with("d-2", "valve", "short", "open", one_second)
        .await;
    s.command("d-2", "valve", "ttl", "close").await;
    s.wait_state("short", "expired").await;
    assert!(
        !s.state_of("ttl").contains(&"expired".to_string()),
        "the ttl command expired with the 1 s one"
    );
    s.wait_state("ttl", "expired").await;

    let mut device = s.device("d-2").await;
    s.command("d-2", "valve", "live", "half").await;
    let got = device.next().await;
    assert_eq!(payload(&got), "half", "an expired command was delivered");
    s.wait_state("live", "delivered").await;
    assert_eq!(s.state_of("short"), ["queued", "expired"]);
    // The probe commands expire too: the metric counts what was reported.
    wait_until_async(
        "the expired metric equals the expired statuses",
        WAIT,
        || s.metric(r#"gateway_commands_total{state="expired"}"#) == s.reported("expired"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bound_drops_the_oldest_command() {
    let Some(mut s) = setup(&[("GATEWAY__DOWNLINK__MAX_PER_DEVICE", "2")]).await else {
        return;
    };
    for n in 1..=3 {
        s.command("d-3", "step", &format!("c{n}"), &format!("step {n}"))
            .await;
    }
    s.wait_state("c1", "dropped").await;
    s.wait_state("c3", "queued").await;

    let mut device = s.device("d-3").await;
    let first = device.next().await;
    let second = device.next().await;
    assert_eq!(
        [payload(&first), payload(&second)],
        ["step 2", "step 3"],
        "the newest two, in order"
    );
    s.wait_state("c3", "delivered").await;
    assert_eq!(s.state_of("c1"), ["queued", "dropped"]);
    assert_eq!(s.state_of("c2"), ["queued", "delivered"]);
    // Probe commands may have been dropped too: the metric counts what was reported.
    wait_until_async(
        "the dropped metric equals the dropped statuses",
        WAIT,
        || s.metric(r#"gateway_commands_total{state="dropped"}"#) == s.reported("dropped"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_3_1_1_device_gets_the_payload_without_properties() {
    let Some(mut s) = setup(&[]).await else {
        return;
    };
    let mut opts = rumqttc::MqttOptions::new("d-4", "127.0.0.1", s.gw.port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    client
        .subscribe("devices/d-4/commands/+", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                let _ = tx.send(p);
            }
        }
    });
    let with_properties = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    s.command_with("d-4", "light", "v311", "on", with_properties)
        .await;
    let got = tokio::time::timeout(WAIT, received.recv())
        .await
        .expect("the command within 15 s")
        .unwrap();
    assert_eq!(got.topic, "devices/d-4/commands/light");
    assert_eq!(&got.payload[..], b"on");
    assert_eq!(got.qos, rumqttc::QoS::AtLeastOnce);
    s.wait_state("v311", "delivered").await;
    task.abort();
}

/// A rule whose firing action is a command to the device's fan.
const HOT_FAN: &str = r#"
[[rule]]
name = "hot"
event = "Hot"
stream = "telemetry"
condition = "temperature > 75.0"
clear = "temperature < 70.0"

[[rule.action]]
on = "firing"
topic = "devices/{device}/commands/fan"
payload = '{"on": true}'
"#;

/// A rule action at QoS 1 on a device's command topic joins the durable queue: the device
/// is offline when the rule fires, and gets the command once it connects and subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_action_for_an_offline_device_is_queued_until_it_connects() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("hot.toml"), HOT_FAN).unwrap();
    let rules_dir = rules.path().display().to_string();
    let Some(s) = setup(&[("GATEWAY__RULES__DIR", rules_dir.as_str())]).await else {
        return;
    };
    // Another client reports for device d-7, which is not connected.
    let hot = vec![(
        "devices/d-7/telemetry".to_string(),
        br#"{"temperature":80}"#.to_vec(),
    )];
    test_support::publish_all(&s.gw.addr(), "sensor", &hot).await;
    s.gw.wait_log("Action queued for its device.", WAIT);
    let queued_for_d7 = || {
        s.status_bodies()
            .into_iter()
            .find(|b| b["device"] == "d-7" && b["command"] == "fan" && b["state"] == "queued")
    };
    wait_until_async("the action's command queued", WAIT, || {
        queued_for_d7().is_some()
    })
    .await;
    let id = queued_for_d7().unwrap()["id"].as_str().unwrap().to_string();
    // The command's id is the action's id, as in the event log's ActionPublished record.
    // The record is sent to the store right after the command and may join the next
    // group; readers see it at the latest one checkpoint interval (1 s) after that.
    let action_logged = || {
        let (_, events) = s.gw.http_get("/api/events?type=ActionPublished");
        events.contains(&id)
    };
    wait_until_async(
        "the ActionPublished record with the command's id",
        WAIT,
        action_logged,
    )
    .await;

    let mut device = s.device("d-7").await;
    let got = device.next().await;
    assert_eq!(got.topic, "devices/d-7/commands/fan");
    assert_eq!(payload(&got), r#"{"on": true}"#);
    s.wait_state(&id, "delivered").await;
}
