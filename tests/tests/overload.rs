//! Overload, through the real gateway binary and device-sim: 100 devices publish QoS 1 as
//! fast as the gateway acknowledges, with 100 rules that all apply to every reading. The
//! rules stage is the bottleneck, and the gateway must slow the devices down rather than
//! drop or skip anything: every reading is acknowledged only once stored, every stored
//! reading is evaluated by every rule, and every acknowledged reading arrives upstream.
//!
//! 60 s of load with `GATEWAY_LONG_TESTS=1` (CI), 10 s otherwise.

use std::process::Command;
use std::time::Duration;

use test_support::{counter, metric, workspace_bin, Gateway, UpstreamBroker};

const DEVICES: u32 = 100;
const RULES: usize = 100;

/// `RULES` rules on the temperature that hold for every reading device-sim sends, each
/// with a condition the rules stage must evaluate (no instance ever fires twice).
fn rules() -> String {
    (0..RULES)
        .map(|i| {
            format!(
                "[[rule]]\nname = \"always-{i}\"\nevent = \"Always{i}\"\nstream = \"telemetry\"\ncondition = \"temperature > -1000.0 + {i}.0\"\n\n"
            )
        })
        .collect()
}

#[test]
fn overload_slows_devices_down_and_loses_or_skips_nothing() {
    let load = if std::env::var("GATEWAY_LONG_TESTS").as_deref() == Ok("1") {
        "60s"
    } else {
        "10s"
    };
    let up = UpstreamBroker::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/always.toml"), rules()).unwrap();
    let url = format!("mqtt://127.0.0.1:{}", up.port);
    let mut gw = Gateway::start_in(
        dir,
        &[
            ("GATEWAY__UPSTREAM__URL", &url),
            ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
        ],
    );
    gw.wait_log("Rules loaded", Duration::from_secs(10));

    let report = gw.dir.path().join("report.json");
    let out = Command::new(workspace_bin("device-sim"))
        .args(["--broker", &gw.addr()])
        .args([
            "--devices",
            &DEVICES.to_string(),
            "--rate",
            "max",
            "--qos",
            "1",
        ])
        .args(["--duration", load, "--drain", "120s", "--progress", "0s"])
        .args(["--upstream", &format!("127.0.0.1:{}", up.port)])
        .args(["--upstream-topic", "up/devices/#", "--max-wait", "120s"])
        .arg("--json")
        .arg(&report)
        .output()
        .expect("run device-sim");
    assert!(
        out.status.success(),
        "device-sim failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let totals = &report["fleet"]["totals"];
    let published = totals["published"].as_u64().unwrap();
    let acked = totals["acked"].as_u64().unwrap();
    // The rules stage may still be working through its queue: wait until it has
    // evaluated every rule on every reading (or time out with the counts).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (metrics, ingested, evaluations) = loop {
        let (_, metrics) = gw.http_get("/metrics");
        let ingested = metric(&metrics, "gateway_messages_ingested_total") as u64;
        let evaluations = metric(&metrics, "gateway_rule_evaluations_total") as u64;
        if evaluations >= RULES as u64 * ingested || std::time::Instant::now() > deadline {
            break (metrics, ingested, evaluations);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let blocked = metric(&metrics, "gateway_backpressure_seconds_total");
    eprintln!(
        "{DEVICES} devices for {load}, {RULES} rules: published {published}, acked {acked}, \
         ingested {ingested}, rule evaluations {evaluations}, delivered upstream {}, lost {}, \
         duplicated {}, decode waited {blocked:.1} s",
        report["delivered"], report["lost"], report["duplicated"]
    );
    assert!(acked > 1000, "the load ran: {acked} acknowledged");
    assert_eq!(acked, published, "every published reading was acknowledged");
    assert_eq!(report["lost"], 0, "acknowledged readings missing upstream");
    assert_eq!(report["delivered"].as_u64().unwrap(), published);
    let summary = gw.stop();
    let decoded = counter(&summary, "decoded");
    assert_eq!(decoded, ingested, "{summary}");
    assert_eq!(
        counter(&summary, "dead_lettered") + counter(&summary, "unrouted"),
        0,
        "{summary}"
    );
    // Every reading was evaluated by every rule: nothing skipped.
    assert_eq!(
        evaluations,
        RULES as u64 * decoded,
        "rule evaluations against readings x rules"
    );
}
