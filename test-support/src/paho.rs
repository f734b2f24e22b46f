//! paho-mqtt, the Eclipse Python client (pinned to 2.1.0 in `.ci/run`), as a second MQTT
//! 5 client independent of rumqttc: a test runs one scenario of a script under
//! `tests/python/` with `python3` against a broker under test and gets back the one
//! JSON line the script prints (what its clients received).
//!
//! Invariants:
//! - Without paho-mqtt, [`paho_available`] says so and the test skips; with
//!   `GATEWAY_REQUIRE_PAHO` set (CI), it panics instead.
//! - A scenario is bounded by coreutils' `timeout` and fails with the script's stderr.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Seconds a scenario may run before it is killed.
const SCENARIO_TIMEOUT_SECS: &str = "60";

/// True when `python3` can import paho-mqtt. Otherwise prints why the test is skipped,
/// or panics when `GATEWAY_REQUIRE_PAHO` is set.
pub fn paho_available() -> bool {
    let found = Command::new("python3")
        .args(["-c", "import paho.mqtt"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("GATEWAY_REQUIRE_PAHO").is_none(),
            "paho-mqtt is required (GATEWAY_REQUIRE_PAHO): pip install paho-mqtt==2.1.0"
        );
        eprintln!(
            "paho-mqtt not importable by python3 (pip install paho-mqtt==2.1.0): test skipped"
        );
    }
    found
}

/// Path of `tests/python/<name>` in the workspace.
pub fn python_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python")
        .join(name)
}

/// Runs `python3 tests/python/<script> <args..>` and returns the last line it printed
/// on stdout; panics with its output when it fails or times out.
pub fn run_paho(script: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg(SCENARIO_TIMEOUT_SECS)
        .arg("python3")
        .arg(python_script(script))
        .args(args)
        .output()
        .expect("timeout python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?} (status {}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{script} {args:?} printed nothing"))
        .to_string()
}
