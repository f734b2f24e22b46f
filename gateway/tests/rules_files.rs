//! Runs every rule test file under the repository's `rules/` directory, so `cargo test`
//! covers the shipped example rules (behaviour as data, like `promtool test rules`).

use std::path::PathBuf;

use gateway::rules::{check_command, rule_files, run_test_file, test_command, test_files};

fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules")
}

#[test]
fn every_shipped_rule_test_passes() {
    let files = test_files(&rules_dir()).expect("rules/ is readable");
    assert!(!files.is_empty(), "no *.test.toml under rules/");
    let mut failures = Vec::new();
    let mut cases = 0;
    for path in &files {
        match run_test_file(path) {
            Ok(outcomes) => {
                assert!(!outcomes.is_empty(), "{} has no [[test]]", path.display());
                for o in outcomes {
                    cases += 1;
                    if !o.passed {
                        failures.push(format!("{}: {}\n{}", o.file, o.name, o.diff));
                    }
                }
            }
            Err(diags) => failures.push(diags.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_shipped_rule_file_has_a_test_file() {
    let dir = rules_dir();
    for rule_file in rule_files(&dir).unwrap() {
        let stem = rule_file.file_stem().unwrap().to_str().unwrap();
        let test = dir.join(format!("{stem}.test.toml"));
        assert!(
            test.is_file(),
            "{} has no {}",
            rule_file.display(),
            test.display()
        );
    }
}

#[test]
fn the_commands_report_success_on_the_shipped_rules() {
    let mut out = Vec::new();
    assert!(
        check_command(&rules_dir(), &mut out),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("all valid"), "{text}");

    let mut out = Vec::new();
    let ok = test_command(&rules_dir(), &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(ok, "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}
