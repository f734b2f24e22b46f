//! The `device-sim` binary: exit codes, summary output, the comparison table.

use std::process::Command;
use std::time::Duration;

use device_sim::Scenario;
use test_support::Mosquitto;

fn sim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_device-sim"));
    c.env("DEVICE_SIM_LOG", "warn");
    c
}

#[test]
fn a_bad_scenario_exits_64_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[event]]\nkind = \"burst\"\nat = \"1s\"\nfor = \"1s\"\nfactor = -2.0\n",
    )
    .unwrap();
    let out = sim().arg("--scenario").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("`factor` must be above 0"),
        "{err}"
    );
}

#[test]
fn a_run_prints_its_summary_and_bench_mode_enforces_min_delivered() {
    let Some(m) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = sim()
        .args([
            "--broker",
            &m.addr(),
            "--devices",
            "3",
            "--count",
            "30",
            "--rate",
            "50",
        ])
        .args([
            "--upstream",
            &m.addr(),
            "--upstream-topic",
            "devices/#",
            "--settle",
            "1s",
        ])
        .args([
            "--label",
            "direct",
            "--min-delivered",
            "30",
            "--progress",
            "0s",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("published 30 (0 malformed)"), "{stdout}");
    assert!(
        stdout.contains("delivered 30, lost 0, duplicated 0"),
        "{stdout}"
    );
    assert!(stdout.contains("own CPU:"), "{stdout}");

    // The same report on both sides: ratios of 1.
    let table = sim().arg("compare").arg(&json).arg(&json).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("| delivered upstream | 30 | 30 | 1.00 |"),
        "{table}"
    );
    let half = sim().arg("compare").arg("-").arg(&json).output().unwrap();
    assert!(String::from_utf8_lossy(&half.stdout).contains("| delivered upstream | - | 30 | - |"));

    // Rounds of an alternating run: the edge's CPU per round, the ratio of the means and
    // the median of the rounds' ratios.
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let with_edge = |name: &str, cpu_percent: f64| {
        let mut r = report.clone();
        r["processes"] = serde_json::json!([{
            "name": "edge", "pid": 1, "cpu_s": cpu_percent * 0.3, "cpu_percent": cpu_percent,
            "rss_kb": 1024, "peak_rss_kb": 2048,
        }]);
        let path = dir.path().join(name);
        std::fs::write(&path, r.to_string()).unwrap();
        path
    };
    let reports = [
        with_edge("a1.json", 30.0),
        with_edge("b1.json", 20.0),
        with_edge("a2.json", 36.0),
        with_edge("b2.json", 20.0),
        with_edge("a3.json", 33.0),
        with_edge("b3.json", 22.0),
    ];
    let out = sim().arg("rounds").args(&reports).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    for row in [
        "| 1 | 30.0 | 20.0 | 1.50 |",
        "| 2 | 36.0 | 20.0 | 1.80 |",
        "| 3 | 33.0 | 22.0 | 1.50 |",
        "| mean | 33.0 | 20.7 | 1.60 |",
        "| median of the rounds' A/B | | | 1.50 |",
    ] {
        assert!(table.contains(row), "{row} not in\n{table}");
    }
    let odd = sim().arg("rounds").args(&reports[..3]).output().unwrap();
    assert_eq!(odd.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&odd.stderr).contains("reports come in pairs"));

    // Nothing forwarded to a topic nobody publishes: exit code 2.
    let out = sim()
        .args([
            "--broker",
            &m.addr(),
            "--devices",
            "1",
            "--count",
            "5",
            "--rate",
            "50",
        ])
        .args([
            "--upstream",
            &m.addr(),
            "--upstream-topic",
            "nowhere/#",
            "--settle",
            "500ms",
        ])
        .args(["--min-delivered", "5", "--progress", "0s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn overheat_crosses_the_thresholds_as_documented() {
    // Walk the shipped plan second by second with the model at its start value.
    let s = Scenario::shipped("overheat").unwrap();
    let hot = s.plan_for(0, "t-0001");
    let cool = s.plan_for(1, "t-0002");
    let end = s.fleet.duration.unwrap().as_secs();
    let temps: Vec<f64> = (0..end)
        .map(|t| hot.value("temperature", Duration::from_secs(t), 22.0))
        .collect();
    let above: Vec<u64> = (0..end).filter(|t| temps[*t as usize] > 75.0).collect();
    let (first, last) = (above[0], *above.last().unwrap());
    assert_eq!(
        above.len() as u64,
        last - first + 1,
        "one contiguous hot spell"
    );
    assert!(
        last - first >= 30,
        "above 75 for at least 30 s: {first}..{last}"
    );
    assert!(
        temps[last as usize + 2..].iter().all(|t| *t < 70.0),
        "back below 70"
    );
    assert!((0..end).all(|t| cool.value("temperature", Duration::from_secs(t), 22.0) == 22.0));
}
