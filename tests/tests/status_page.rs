//! End-to-end status page: the real gateway, fed by device-sim (three devices, one of which
//! overheats) and forwarding to a live upstream, serves `/`; headless Chromium loads it,
//! runs its script and the rendered DOM shows the devices, the upstream state, the backlog
//! and the firing alert. A screenshot is saved to `target/status-page.png`.
//!
//! Chromium (Debian's `chromium`) is optional locally: without it the test is skipped with
//! a message, unless `GATEWAY_REQUIRE_BROWSER=1` (CI) makes it mandatory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_support::{Gateway, Rumqttd};
use tokio_util::sync::CancellationToken;

const RULE: &str = r#"
[[rule]]
name = "temperature-high"
event = "SensorTemperatureExceeded"
stream = "telemetry"
condition = "temperature > 75.0"
clear = "temperature < 70.0"
for = "1s"
severity = "warning"
"#;

/// Three devices at about 22 °C; t-0001 jumps to 82 °C after one second and stays there.
const SCENARIO: &str = r#"
name = "status-page"
[fleet]
devices = 3
rate = 5.0
duration = "60s"
format = "json"
qos = 1

[fields.temperature]
model = "random-walk"
start = 22.0
step = 0.2
min = 18.0
max = 26.0
unit = "Cel"

[[event]]
kind = "spike"
at = "1s"
devices = ["t-0001"]
field = "temperature"
value = 82.0
ramp = "500ms"
hold = "120s"
"#;

fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if found.is_none() {
        assert!(
            std::env::var("GATEWAY_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "chromium is required (GATEWAY_REQUIRE_BROWSER=1) but not installed"
        );
        eprintln!("chromium not installed (apt-get install chromium): status page test skipped");
    }
    found
}

/// Runs headless Chromium with `extra` arguments on `url`, killed after 60 s.
fn run_chromium(bin: &str, profile: &Path, extra: &[&str], url: &str) -> Output {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `target/` of this build (the test binary is in `target/<profile>/deps/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// The text of the element with `id` in a dumped DOM.
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let marker = format!("id=\"{id}\">");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"))
        + marker.len();
    let end = dom[start..].find('<').unwrap() + start;
    &dom[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_shows_devices_upstream_backlog_and_firing_alert() {
    let Some(browser) = chromium() else { return };
    let up_port = Rumqttd::start().port;
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("temperature.toml"), RULE).unwrap();
    let url = format!("mqtt://127.0.0.1:{up_port}");
    let gw = Gateway::start(&[
        ("GATEWAY__RULES__DIR", rules.path().to_str().unwrap()),
        ("GATEWAY__UPSTREAM__URL", &url),
    ]);

    let scenario = device_sim::Scenario::from_toml(SCENARIO, "status-page").unwrap();
    let mut fleet = device_sim::FleetConfig::from_scenario(gw.addr(), scenario);
    fleet.progress = None;
    let stop = CancellationToken::new();
    let sim = tokio::spawn(device_sim::run_until(fleet, stop.clone()));

    // Wait (through the API) until the page has something to show: three devices, t-0001
    // firing, upstream connected, an ingest rate measured, and the firing event in the
    // event log (which the API reads as of the store's last checkpoint, up to about a
    // second after the rules saw it fire).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = gw.http_get("/api/status");
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        let (_, events) = gw.http_get("/api/events?type=SensorTemperatureExceeded");
        if s["devices"] == 3
            && s["firing"] == 1
            && s["upstream"]["state"] == "connected"
            && s["ingest"]["rate_per_second"].as_f64() > Some(1.0)
            && events.contains("\"state\":\"firing\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateway state not reached: {s}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let page = format!("http://{}/", gw.http_addr());
    let profile = tempfile::tempdir().unwrap();
    let out = run_chromium(browser, profile.path(), &["--dump-dom"], &page);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text_of(&dom, "upstream-state"), "connected", "{dom}");
    assert_eq!(text_of(&dom, "device-count"), "3");
    assert_eq!(text_of(&dom, "firing-count"), "1");
    assert_eq!(text_of(&dom, "firing-noun"), "alert");
    assert_eq!(text_of(&dom, "gateway-id"), "edge-gateway");
    let backlog: u64 = text_of(&dom, "backlog-messages")
        .parse()
        .unwrap_or_else(|_| panic!("backlog is a number: {dom}"));
    assert!(
        backlog < 1000,
        "a connected upstream keeps the backlog small: {backlog}"
    );
    let ingested: u64 = text_of(&dom, "ingested").parse().unwrap();
    assert!(ingested > 0, "{dom}");
    // Three devices at 5 readings/s each.
    let rate: f64 = text_of(&dom, "ingest-rate")
        .trim_end_matches(" msg/s")
        .parse()
        .unwrap_or_else(|_| panic!("ingest rate: {dom}"));
    assert!(rate > 1.0 && rate < 100.0, "ingest rate {rate}");
    for id in ["t-0001", "t-0002", "t-0003"] {
        assert!(
            dom.contains(&format!("<tr data-device=\"{id}\"><td>{id}</td>")),
            "device {id} missing from the devices table:\n{dom}"
        );
    }
    assert!(
        dom.contains("<tr data-alert=\"SensorTemperatureExceeded\" data-device=\"t-0001\">"),
        "firing alert of t-0001 missing:\n{dom}"
    );
    assert!(
        !dom.contains("data-alert=\"SensorTemperatureExceeded\" data-device=\"t-0002\""),
        "t-0002 is not overheating:\n{dom}"
    );
    assert!(
        dom.contains("<tr data-event=\"SensorTemperatureExceeded\">"),
        "the firing event is listed among recent events:\n{dom}"
    );
    assert!(
        dom.contains("<div id=\"error\" style=\"display: none;\"></div>"),
        "the page reports an error:\n{dom}"
    );

    let shot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let out = run_chromium(
        browser,
        profile.path(),
        &[&arg, "--window-size=1280,900"],
        &page,
    );
    assert!(
        shot.metadata().is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {} ({}):\n{}",
        shot.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("status page screenshot: {}", shot.display());

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), sim).await;
}
