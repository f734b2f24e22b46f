//! The rule test runner itself: a wrong expectation fails with a readable diff, and a
//! broken test file is reported at its position.

use gateway::rules::{run_test_file, test_command};

const RULE: &str = r#"[[rule]]
name = "hot"
event = "Hot"
condition = "temperature > 75.0"
for = "10s"
"#;

fn dir_with(test: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hot.toml"), RULE).unwrap();
    std::fs::write(dir.path().join("hot.test.toml"), test).unwrap();
    dir
}

#[test]
fn a_wrong_expectation_fails_with_a_timeline_diff() {
    let dir = dir_with(
        r#"
[[test]]
name = "wrong time"
input = [
  { at = "0s", device = "t-1", fields = { temperature = 80.0 } },
  { at = "20s", device = "t-1", fields = { temperature = 70.0 } },
]
expect = [
  { at = "5s", type = "Hot", device = "t-1", state = "firing" },
  { at = "20s", type = "Hot", device = "t-1", state = "resolved" },
]
"#,
    );
    let outcomes = run_test_file(&dir.path().join("hot.test.toml")).unwrap();
    assert_eq!(outcomes.len(), 1);
    assert!(!outcomes[0].passed);
    let lines: Vec<&str> = outcomes[0].diff.lines().map(str::trim_end).collect();
    assert_eq!(
        lines,
        vec![
            "    timeline (- expected but missing, + produced but not expected):",
            "    -       5s  firing    Hot  t-1  (rule any)",
            "    +      10s  firing    Hot  t-1  (rule hot)",
            "           20s  resolved  Hot  t-1  (rule hot)",
        ]
    );

    let mut out = Vec::new();
    assert!(!test_command(dir.path(), &mut out));
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("  FAILED  wrong time\n"), "{text}");
    assert!(text.contains("1 tests, 1 failed"), "{text}");
}

const FAN_RULE: &str = r#"[[rule]]
name = "hot"
event = "Hot"
condition = "temperature > 75.0"
for = "10s"

[[rule.action]]
on = "firing"
topic = "devices/{device}/commands/fan"
payload = '{"on": true, "t": {value.temperature}}'

[[rule.action]]
on = "resolved"
topic = "devices/{device}/commands/fan"
payload = '{"on": false}'
qos = 0
"#;

#[test]
fn actions_are_asserted_with_the_events_when_a_test_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hot.toml"), FAN_RULE).unwrap();
    let test = |actions: &str| {
        format!(
            r#"
[[test]]
name = "fan"
input = [
  {{ at = "0s", device = "t-1", fields = {{ temperature = 80.0 }} }},
  {{ at = "20s", device = "t-1", fields = {{ temperature = 70.0 }} }},
]
expect = [
  {{ at = "10s", type = "Hot", device = "t-1", state = "firing" }},
  {{ at = "20s", type = "Hot", device = "t-1", state = "resolved" }},
]
{actions}
"#
        )
    };
    let path = dir.path().join("hot.test.toml");
    let run = |actions: &str| {
        std::fs::write(&path, test(actions)).unwrap();
        run_test_file(&path).unwrap().remove(0)
    };

    // Not listed: not checked.
    assert!(run("").passed);
    // Listed and right, the payload and QoS checked only where given.
    let right = run(r#"actions = [
  { at = "10s", topic = "devices/t-1/commands/fan", payload = '{"on": true, "t": 80.0}', qos = 1 },
  { at = "20s", topic = "devices/t-1/commands/fan" },
]"#);
    assert!(right.passed, "{}", right.diff);
    // Wrong payload and a missing action: a diff on the same timeline as the events.
    let wrong = run(r#"actions = [
  { at = "10s", topic = "devices/t-1/commands/fan", payload = '{"on": true}' },
]"#);
    assert!(!wrong.passed);
    let lines: Vec<&str> = wrong.diff.lines().map(str::trim_end).collect();
    assert_eq!(
        lines,
        vec![
            "    timeline (- expected but missing, + produced but not expected):",
            "           10s  firing    Hot  t-1  (rule hot)",
            r#"    -      10s  action    devices/t-1/commands/fan  "{\"on\": true}"  (any qos)"#,
            r#"    +      10s  action    devices/t-1/commands/fan  "{\"on\": true, \"t\": 80.0}"  (qos 1)"#,
            "           20s  resolved  Hot  t-1  (rule hot)",
            r#"    +      20s  action    devices/t-1/commands/fan  "{\"on\": false}"  (qos 0)"#,
        ]
    );
    // `actions = []` means none.
    assert!(!run("actions = []").passed);
}

#[test]
fn an_unexpected_event_fails_a_test_that_expects_none() {
    let dir = dir_with(
        r#"
[[test]]
name = "expects silence"
until = "30s"
input = [{ at = "0s", device = "t-1", fields = { temperature = 80.0 } }]
expect = []
"#,
    );
    let outcomes = run_test_file(&dir.path().join("hot.test.toml")).unwrap();
    assert!(!outcomes[0].passed);
    assert!(
        outcomes[0].diff.contains("+      10s  firing"),
        "{}",
        outcomes[0].diff
    );
}

#[test]
fn a_bad_duration_in_a_test_file_is_positioned() {
    let dir = dir_with(
        "[[test]]\nname = \"x\"\ninput = [{ at = \"5 parsecs\", device = \"t-1\" }]\nexpect = []\n",
    );
    let err = run_test_file(&dir.path().join("hot.test.toml")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("hot.test.toml:3:17: bad duration \"5 parsecs\""),
        "{text}"
    );
}

#[test]
fn an_unknown_key_in_a_test_file_is_positioned() {
    let dir = dir_with("[[test]]\nname = \"x\"\nexpected = []\n");
    let err = run_test_file(&dir.path().join("hot.test.toml")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("hot.test.toml:3:1: unknown field `expected`"),
        "{text}"
    );
}

const WEBHOOK_RULE: &str = r#"[[rule]]
name = "hot"
event = "Hot"
condition = "temperature > 75.0"
for = "10s"

[[rule.action]]
on = "firing"
url = "http://127.0.0.1:8080/hooks/{device}?t={value.temperature}"
payload = '{"device": "{device}"}'
"#;

#[test]
fn webhook_actions_are_asserted_by_url_and_payload() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hot.toml"), WEBHOOK_RULE).unwrap();
    let path = dir.path().join("hot.test.toml");
    let run = |actions: &str| {
        let test = format!(
            r#"
[[test]]
name = "hook"
input = [{{ at = "0s", device = "t 1", fields = {{ temperature = 80.0 }} }}]
expect = [{{ at = "10s", type = "Hot", device = "t 1", state = "firing" }}]
{actions}
"#
        );
        std::fs::write(&path, test).unwrap();
        run_test_file(&path)
    };
    let right = run(r#"actions = [
  { at = "10s", url = "http://127.0.0.1:8080/hooks/t%201?t=80.0", payload = '{"device": "t 1"}' },
]"#)
    .unwrap()
    .remove(0);
    assert!(right.passed, "{}", right.diff);
    // A topic is not a URL: the webhook call is not a publish on that text.
    let wrong = run(r#"actions = [
  { at = "10s", topic = "http://127.0.0.1:8080/hooks/t%201?t=80.0" },
]"#)
    .unwrap()
    .remove(0);
    assert!(!wrong.passed);
    let lines: Vec<&str> = wrong.diff.lines().map(str::trim_end).collect();
    assert_eq!(
        lines[2..],
        [
            "    -      10s  action    http://127.0.0.1:8080/hooks/t%201?t=80.0  (any payload)  (any qos)",
            r#"    +      10s  webhook   POST http://127.0.0.1:8080/hooks/t%201?t=80.0  "{\"device\": \"t 1\"}""#,
        ]
    );
    // An expected action names a topic or a URL, and a webhook takes no `qos`.
    let err = run(r#"actions = [
  { at = "10s", url = "http://127.0.0.1:8080/", qos = 1 },
  { at = "10s" },
]"#)
    .unwrap_err()
    .to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].contains("hot.test.toml:7:10: `qos` is for expected publish actions"),
        "{err}"
    );
    assert!(
        lines[1]
            .contains("hot.test.toml:8:10: an expected action has `topic` (a publish) or `url`"),
        "{err}"
    );
}
