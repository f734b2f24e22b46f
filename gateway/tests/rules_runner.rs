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
            "    events (- expected but missing, + produced but not expected):",
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
