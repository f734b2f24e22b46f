//! Scenario files: the shipped ones load, bad ones say what is wrong, and
//! events happen on the wire (against a real mosquitto).

use std::path::Path;
use std::time::Duration;

use device_sim::{FleetConfig, Rate, Scenario, ScenarioError};
use test_support::{Collector, Mosquitto, Received};

fn shipped() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn shipped_scenarios_load_and_fit_their_fleet() {
    let files = shipped();
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        let s = Scenario::load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(!s.name.is_empty() && !s.description.is_empty(), "{file:?}");
        // Scripted events, or a model that commands drive (a closed loop).
        let driven = s.fields.values().any(|m| m.switch().is_some());
        assert!(!s.events.is_empty() || driven, "{file:?} scripts something");
        let mut cfg = FleetConfig::new("127.0.0.1:1883");
        cfg.devices = s.fleet.devices.expect("fleet.devices");
        cfg.duration = s.fleet.duration;
        cfg.scenario = s;
        assert_eq!(cfg.problems(), Vec::<String>::new(), "{file:?}");
    }
}

#[test]
fn a_shipped_scenario_sets_up_its_fleet() {
    let cfg = FleetConfig::from_scenario("127.0.0.1:1883", Scenario::shipped("overheat").unwrap());
    assert_eq!(cfg.devices, 3);
    assert_eq!(cfg.rate, Rate::PerDevice(1.0));
    assert_eq!(cfg.duration, Some(Duration::from_secs(100)));
    assert_eq!(cfg.scenario.name, "overheat");
    let e = Scenario::shipped("no-such").unwrap_err().to_string();
    assert!(e.contains("no-such.toml"), "{e}");
}

fn error_of(text: &str) -> String {
    match Scenario::from_toml(text, "bad.toml") {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_scenarios_name_the_problem() {
    // Syntax: file, line and column.
    let e = error_of("name = \"x\"\n[fields.temperature\nmodel = 1\n");
    assert!(e.contains("bad.toml") && e.contains("line 2"), "{e}");

    // Unknown key in a model.
    let e = error_of("[fields.t]\nmodel = \"constant\"\nvalue = 1.0\nvalu = 2.0\n");
    assert!(
        e.contains("unknown field `valu`") && e.contains("line"),
        "{e}"
    );

    // Unknown model.
    let e = error_of("[fields.t]\nmodel = \"saw\"\nvalue = 1.0\n");
    assert!(e.contains("saw"), "{e}");

    // Bad duration: tagged tables point at the table, and the value is named.
    let e = error_of(
        "name = \"x\"\n[[event]]\nkind = \"silence\"\nat = \"ten seconds\"\nfor = \"1m\"\n",
    );
    assert!(
        e.contains("line 2") && e.contains("\"ten seconds\", expected a duration"),
        "{e}"
    );

    // Several semantic problems, all reported at once.
    let text = r#"
        [fields.temperature]
        model = "random-walk"
        start = 20.0
        step = 1.0
        min = 30.0
        max = 10.0

        [[event]]
        kind = "spike"
        at = "1s"
        field = "temp"
        value = 80.0
        hold = "1s"

        [[event]]
        kind = "malformed"
        at = "1s"
        for = "1s"
        fraction = 2.0
    "#;
    let err = Scenario::from_toml(text, "bad.toml").unwrap_err();
    let ScenarioError::Invalid { problems, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(problems.len(), 3, "{problems:?}");
    let e = err.to_string();
    assert!(
        e.contains("field `temperature`: `min` (30) is above `max` (10)"),
        "{e}"
    );
    assert!(
        e.contains("event[0] (spike): field `temp` is not defined"),
        "{e}"
    );
    assert!(
        e.contains("event[1] (malformed): `fraction` must be between 0 and 1"),
        "{e}"
    );

    // Missing file.
    let e = Scenario::load(Path::new("/nonexistent/x.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/x.toml"), "{e}");
}

#[test]
fn targets_must_exist_in_the_fleet() {
    let s = Scenario::from_toml(
        "[[event]]\nkind = \"silence\"\nat = \"1s\"\nfor = \"1s\"\ndevices = [\"t-0009\"]\n",
        "x.toml",
    )
    .unwrap();
    let mut cfg = FleetConfig::new("127.0.0.1:1883");
    cfg.devices = 3;
    cfg.scenario = s;
    let problems = cfg.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("device `t-0009` is not in the fleet (t-0001 .. t-0003)"));
}

/// A compressed scenario: spike, silence, malformed and a reconnect storm in 3 s.
const QUICK: &str = r#"
name = "quick"
[fields.temperature]
model = "constant"
value = 20.0
unit = "Cel"

[[event]]
kind = "spike"
at = "1s"
devices = ["t-0001"]
field = "temperature"
value = 99.0
hold = "1s"

[[event]]
kind = "silence"
at = "1s"
devices = ["t-0002"]
for = "1s"

[[event]]
kind = "malformed"
at = "2200ms"
devices = ["t-0001"]
for = "500ms"
fraction = 1.0

[[event]]
kind = "reconnect"
at = "500ms"
devices = ["t-0003"]
down = "100ms"
times = 2
every = "1s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_happen_on_the_wire() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let sub = Collector::start(mosquitto.port, "devices/#").await;
    let mut cfg = FleetConfig::new(mosquitto.addr());
    cfg.devices = 3;
    cfg.rate = Rate::PerDevice(20.0);
    cfg.duration = Some(Duration::from_secs(3));
    cfg.scenario = Scenario::from_toml(QUICK, "quick").unwrap();
    let start = std::time::Instant::now();
    let summary = device_sim::run(cfg).await.unwrap();
    let got = sub
        // A publish caught unacked by a planned drop is counted as dropped
        // (whether or not the broker got it): wait for the rest.
        .wait_settled(
            (summary.totals.published - summary.totals.dropped) as usize,
            Duration::from_secs(10),
        )
        .await;
    let secs = |g: &Received| g.at.duration_since(start).as_secs_f64();
    let of = |d: &str| -> Vec<&Received> {
        got.iter()
            .filter(|g| g.topic == format!("devices/{d}/telemetry"))
            .collect()
    };

    // Spike: t-0001 reads 99 only between 1 s and 2 s, 20 otherwise.
    let mut hot = 0;
    let mut malformed = 0;
    for g in of("t-0001") {
        match serde_json::from_slice::<serde_json::Value>(&g.payload) {
            Ok(v) => {
                let t = v["temperature"].as_f64().unwrap();
                if t == 99.0 {
                    hot += 1;
                    assert!((0.9..2.2).contains(&secs(g)), "99 at {}", secs(g));
                } else {
                    assert_eq!(t, 20.0);
                }
            }
            Err(_) => {
                malformed += 1;
                assert!((2.1..2.9).contains(&secs(g)), "garbage at {}", secs(g));
            }
        }
    }
    assert!((15..=25).contains(&hot), "about 20 hot readings, got {hot}");
    assert_eq!(malformed, summary.totals.malformed);
    assert!(
        (8..=12).contains(&malformed),
        "about 10 malformed, got {malformed}"
    );

    // Silence: t-0002 publishes nothing for about a second.
    let times: Vec<f64> = of("t-0002").iter().map(|g| secs(g)).collect();
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!((0.9..1.4).contains(&gap), "silence gap {gap}");
    assert!(times.iter().all(|t| !(1.05..1.95).contains(t)), "{times:?}");

    // Reconnect storm: t-0003 connected three times; everyone else once.
    assert_eq!(summary.totals.connects, 3 + 1 + 2);

    // Seq stays gapless across malformed payloads and silences.
    for d in ["t-0001", "t-0002", "t-0003"] {
        let mut seqs: Vec<u64> = of(d)
            .iter()
            .filter_map(|g| serde_json::from_slice::<serde_json::Value>(&g.payload).ok())
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        seqs.sort();
        let n = summary.readings.iter().find(|(id, _)| id == d).unwrap().1;
        let lost = summary.totals.dropped;
        assert!(seqs.len() as u64 + lost >= n, "{d}: {} of {n}", seqs.len());
        seqs.dedup();
        assert!(seqs.iter().all(|s| *s < n), "{d}");
    }
}
