//! Broken rule files give every problem of every file, each at its exact `file:line:col`.

use std::path::Path;

use gateway::rules::{check_command, RuleSet};

const A: &str = r#"[[rule]]
name = "hot"
event = "Hot"
condition = "temperature > 75.0 &&"
for = "5 parsecs"
colour = "red"
severity = 3

[[rule]]
name = "rising"
event = "Rising"
condition = "agg.rise > 1.0 || agg.fall < 0.0"
[[rule.aggregate]]
name = "rise"
field = "temperature"
fn = "median"
window = "1m"

[[rule]]
name = "offline"
event = "Offline"
absent_for = "1m"
clear = "x"
keep_firing_for = "forever"

[[rule]]
name = "ok-rule"
event = "Fine"
condition = "x > 1.0"
"#;

const B: &str = r#"[[rule]]
name = "ok-rule"
event = "Hot2"
condition = """
temperature > 75.0 &&
  humidity <"""
"#;

const C: &str = "[[rule]]\nname = \"x\nevent = \"y\"\n";

fn write_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), A).unwrap();
    std::fs::write(dir.path().join("b.toml"), B).unwrap();
    std::fs::write(dir.path().join("c.toml"), C).unwrap();
    // Test files are not rule files: this one is not even TOML, and is not reported.
    std::fs::write(dir.path().join("a.test.toml"), "[[[").unwrap();
    dir
}

fn strip(dir: &Path, lines: Vec<String>) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    lines.into_iter().map(|l| l.replace(&prefix, "")).collect()
}

#[test]
fn every_error_of_every_file_with_its_position() {
    let dir = write_dir();
    let diags = RuleSet::load_dir(dir.path()).unwrap_err();
    let got = strip(dir.path(), diags.iter().map(|d| d.to_string()).collect());
    let positions: Vec<&str> = got.iter().map(|l| l.split(": ").next().unwrap()).collect();
    assert_eq!(
        positions,
        vec![
            "a.toml:4:35",
            "a.toml:5:7",
            "a.toml:6:1",
            "a.toml:7:12",
            "a.toml:12:32",
            "a.toml:16:6",
            "a.toml:23:1",
            "a.toml:24:19",
            "b.toml:2:8",
            "b.toml:6:13",
            "c.toml:2:10",
        ],
        "{got:#?}"
    );
    let expect_in = |i: usize, text: &str| assert!(got[i].contains(text), "{}", got[i]);
    expect_in(
        0,
        "CEL syntax error in `condition`: mismatched input '<EOF>'",
    );
    expect_in(
        1,
        "bad duration \"5 parsecs\" for `for`: unknown time unit \"parsecs\"",
    );
    expect_in(2, "unknown key `colour` in [[rule]]");
    expect_in(3, "`severity` must be a string, found integer");
    expect_in(
        4,
        "unknown aggregate `agg.fall` in `condition` (declared: rise)",
    );
    expect_in(
        5,
        "unknown aggregate function \"median\" (expected one of: avg, min, max, count, rate)",
    );
    expect_in(6, "`clear` does not apply to an absence rule");
    expect_in(7, "bad duration \"forever\" for `keep_firing_for`");
    expect_in(8, "duplicate rule name `ok-rule` (first defined in");
    expect_in(9, "CEL syntax error in `condition`");
    expect_in(10, "TOML syntax");
}

#[test]
fn check_command_prints_file_line_col_and_fails() {
    let dir = write_dir();
    let mut out = Vec::new();
    assert!(!check_command(dir.path(), &mut out));
    let text = String::from_utf8(out).unwrap();
    let prefix = format!("{}/", dir.path().display());
    assert!(
        text.contains(&format!("{prefix}a.toml:5:7: bad duration")),
        "{text}"
    );
    assert!(text.ends_with("11 errors\n"), "{text}");
}

#[test]
fn a_missing_required_key_points_at_the_rule_header() {
    let text = "# a comment\n[[rule]]\nevent = \"E\"\ncondition = \"x > 1.0\"\n";
    let diags = RuleSet::parse("m.toml", text).unwrap_err();
    assert_eq!(
        diags.to_string(),
        "m.toml:2:1: missing required key `name` in [[rule]]"
    );
}

#[test]
fn a_missing_directory_is_one_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let diags = RuleSet::load_dir(&missing).unwrap_err();
    assert_eq!(diags.len(), 1);
    assert!(
        diags.to_string().contains("cannot read rules directory"),
        "{diags}"
    );
}

#[test]
fn min_span_is_longer_than_0s_and_shorter_than_a_time_window() {
    let text = r#"[[rule]]
name = "r"
event = "R"
condition = "has(agg.a) && has(agg.b) && has(agg.c) && has(agg.d)"
[[rule.aggregate]]
name = "a"
field = "x"
fn = "rate"
window = "1m"
min_span = "0s"
[[rule.aggregate]]
name = "b"
field = "x"
fn = "rate"
window = "1m"
min_span = "1m"
[[rule.aggregate]]
name = "c"
field = "x"
fn = "rate"
window = "1m"
min_span = "soon"
[[rule.aggregate]]
name = "d"
field = "x"
fn = "rate"
samples = 10
min_span = "5m"
"#;
    let diags = RuleSet::parse("m.toml", text).unwrap_err();
    let got: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        got,
        vec![
            "m.toml:10:12: `min_span` must be a duration longer than 0s",
            "m.toml:16:12: `min_span` must be shorter than the window (1m): the samples in a window never span all of it",
            "m.toml:22:12: bad duration \"soon\" for `min_span`: expected number at 0 (e.g. \"30s\", \"5m\", \"1h 30m\")",
        ],
        "{got:#?}"
    );
    // A count window may ask for any span: its last N samples can be far apart.
    let ok = text
        .replace("min_span = \"0s\"", "min_span = \"10s\"")
        .replace("min_span = \"1m\"", "min_span = \"59s\"")
        .replace("min_span = \"soon\"", "min_span = \"30s\"");
    let rules = RuleSet::parse("m.toml", &ok).unwrap_or_else(|d| panic!("{d}"));
    let spans: Vec<i64> = rules.rules()[0]
        .aggregates
        .iter()
        .map(|a| a.min_span)
        .collect();
    assert_eq!(spans, vec![10_000, 59_000, 30_000, 300_000]);
}
