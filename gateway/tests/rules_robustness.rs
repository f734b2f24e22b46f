//! Robustness of the rule loader (`RuleSet::parse`: TOML, schema checks, CEL
//! compilation): truncated, malformed, deeply nested and huge rule files give
//! diagnostics, never a panic, a stack overflow or a hang.
//!
//! Everything runs on threads with a 2 MiB stack, the stack of the thread that evaluates
//! the rules and reloads edited rule files, so an overflow here is one in production. Coverage-guided
//! fuzzing of the same entry point: `fuzz/` (target `rules_parse`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use gateway::reading::{Format, Reading, Value};
use gateway::rules::{Diagnostics, Engine, RuleSet, MAX_EXPR_BYTES, MAX_EXPR_DEPTH};

/// Stack size of the threads the tests parse on.
const STACK: usize = 2 << 20;

/// Runs `f` on a thread with a 2 MiB stack.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(f)
        .unwrap()
        .join()
        .expect("the loader panicked")
}

/// Parses `text` and checks that every diagnostic points inside the file.
fn parse(text: &str) -> Result<usize, Diagnostics> {
    let result = RuleSet::parse("t.toml", text).map(|set| set.len());
    if let Err(diags) = &result {
        assert!(!diags.is_empty());
        let lines = text.split('\n').count();
        for d in diags.iter() {
            assert!(
                (1..=lines).contains(&d.line),
                "{d} (file has {lines} lines)"
            );
            assert!(d.col >= 1, "{d}");
        }
    }
    result
}

fn parse_on_small_stack(text: String) -> (Result<usize, Diagnostics>, Duration) {
    on_small_stack(move || {
        let started = Instant::now();
        (parse(&text), started.elapsed())
    })
}

/// Parses `text` on a 2 MiB stack and, when it loads, feeds one reading (`x` = 1) to an
/// engine with it and drops both there: evaluation and drop recurse over the CEL tree.
/// Returns the number of events, or the diagnostics, and how long it all took.
fn load_and_evaluate(text: String) -> (Result<usize, Diagnostics>, Duration) {
    on_small_stack(move || {
        let started = Instant::now();
        let result = parse(&text).map(|_| {
            let set = RuleSet::parse("t.toml", &text).unwrap();
            let mut engine = Engine::new(set, "gw");
            engine.on_reading(&reading_x(1.0), 1_000).len()
        });
        (result, started.elapsed())
    })
}

fn reading_x(x: f64) -> Reading {
    Reading {
        device: "d-1".into(),
        stream: "telemetry".into(),
        topic: "devices/d-1/telemetry".into(),
        time: 1_000,
        fields: BTreeMap::from([("x".to_string(), Value::Number(x))]),
        units: BTreeMap::new(),
        format: Format::Json,
    }
}

fn rule_with_condition(condition: &str) -> String {
    format!("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = '''{condition}'''\n")
}

fn err(result: &Result<usize, Diagnostics>) -> String {
    match result {
        Ok(n) => panic!("expected diagnostics, got a set of {n} rules"),
        Err(d) => d.to_string(),
    }
}

fn shipped_rule_files() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let files = gateway::rules::rule_files(&dir).expect("rules/ is readable");
    assert!(!files.is_empty());
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

#[test]
fn every_truncation_of_the_shipped_rule_files_parses_or_is_diagnosed() {
    let texts = shipped_rule_files();
    let (complete, truncations) = on_small_stack(move || {
        let mut complete = 0;
        let mut truncations = 0;
        for text in &texts {
            assert!(parse(text).is_ok(), "a shipped file does not load");
            complete += 1;
            for (cut, _) in text.char_indices() {
                // Ok (a cut between rules) or diagnostics: both are fine, a panic is not.
                let _ = parse(&text[..cut]);
                truncations += 1;
            }
        }
        (complete, truncations)
    });
    assert!(
        complete >= 1 && truncations > 100,
        "{complete} files, {truncations} cuts"
    );
}

#[test]
fn malformed_rule_files_are_diagnosed() {
    let cases: &[(&str, &str)] = &[
        ("[[rule]\n", "TOML syntax"),
        ("[[rule]]\nname = \"r\nevent = \"E\"\n", "TOML syntax"),
        ("rule = 1\n", "array of tables"),
        ("[[rule]]\n", "missing required key `name`"),
        ("[[rule]]\nname = 1\nevent = \"E\"\ncondition = \"x > 1\"\n", "must be a string"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"x >\"\n", "CEL syntax error"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"\"\n", "CEL syntax error"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \")\"\n", "CEL syntax error"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"'\\\\x'\"\n", "CEL syntax error"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"agg.nope > 1\"\n", "unknown aggregate"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\nabsent_for = \"forever\"\n", "bad duration"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\nabsent_for = \"99999999999999999999y\"\n", "bad duration"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"x\"\naggregate = 3\n", "`aggregate` must be"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"x\"\n[[rule.aggregate]]\nname = \"a\"\nfield = \"x\"\nfn = \"avg\"\nsamples = -1\n", "`samples`"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"x\"\ntopic = \"a/#/b\"\n", "bad `topic`"),
        ("[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"x\"\n[[rule]]\nname = \"r\"\nevent = \"E\"\ncondition = \"x\"\n", "duplicate rule name"),
        ("\u{feff}[[rule]]\nname = \"r\"\n", "missing"),
        ("[[rule]]\r\nname = \"r\"\r\nevent = \"E\"\r\ncondition = \"\"\"\r\n\r\n)\"\"\"\r\n", "CEL syntax error"),
    ];
    for (text, expected) in cases {
        let (result, _) = parse_on_small_stack(text.to_string());
        let message = err(&result);
        assert!(
            message.contains(expected),
            "{text:?}: {message:?} does not say {expected:?}"
        );
    }
}

/// Expressions nested `n` deep in every way the CEL grammar allows.
fn deep_expressions(n: usize) -> Vec<(&'static str, String)> {
    vec![
        (
            "parentheses",
            format!("{}x{} > 1", "(".repeat(n), ")".repeat(n)),
        ),
        ("negations", format!("{}x", "!".repeat(n))),
        ("minus signs", format!("{}1 > x", "-".repeat(n))),
        ("sums", format!("1{} > x", " + 1".repeat(n))),
        ("conjunctions", format!("x{}", " && x".repeat(n))),
        ("comparisons", format!("1{}", " == 1".repeat(n))),
        ("conditionals", format!("{}1 > 0", "x ? 1 : ".repeat(n))),
        ("selections", format!("x{} > 1", ".a".repeat(n))),
        ("indexes", format!("x{} > 1", "[0]".repeat(n))),
        (
            "lists",
            format!("size({}1{}) > 0", "[".repeat(n), "]".repeat(n)),
        ),
        (
            "maps",
            format!("size({}1{}) > 0", "{1:".repeat(n), "}".repeat(n)),
        ),
        (
            "calls",
            format!("{}x{} > 1", "int(".repeat(n), ")".repeat(n)),
        ),
        ("methods", format!("x{} > 1", ".size()".repeat(n))),
        (
            "macros",
            format!("{}x{}", "[1].all(y, ".repeat(n), ")".repeat(n)),
        ),
    ]
}

#[test]
fn deeply_nested_cel_is_refused_without_overflowing_the_stack() {
    for depth in [100_000, 300] {
        for (what, condition) in deep_expressions(depth) {
            let too_long = condition.len() > MAX_EXPR_BYTES;
            // Refused, or (e.g. `!!!!x`, which CEL folds) loaded and evaluated.
            let (result, took) = load_and_evaluate(rule_with_condition(&condition));
            if too_long {
                assert!(
                    err(&result).contains("longer than"),
                    "{what} x{depth}: {result:?}"
                );
            }
            assert!(
                took < Duration::from_secs(20),
                "{what} x{depth} took {took:?}"
            );
        }
    }
}

#[test]
fn the_deepest_cel_of_every_kind_that_loads_also_evaluates() {
    for (what, _) in deep_expressions(1) {
        let condition = |n: usize| {
            let all = deep_expressions(n);
            all.into_iter().find(|(w, _)| *w == what).unwrap().1
        };
        // Binary search for the largest n that loads (n = 1 always does).
        let (mut lo, mut hi) = (1usize, 128);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            match load_and_evaluate(rule_with_condition(&condition(mid))).0 {
                Ok(_) => lo = mid,
                Err(d) => {
                    let message = d.to_string();
                    let refused = ["nested deeper", "Recursion limit"];
                    assert!(
                        refused.iter().any(|r| message.contains(r)),
                        "{what} x{mid}: {message}"
                    );
                    hi = mid - 1;
                }
            }
        }
        // load_and_evaluate ran the deepest one on a 2 MiB stack; once more, for sure.
        let (result, _) = load_and_evaluate(rule_with_condition(&condition(lo)));
        assert!(result.is_ok(), "{what} x{lo}");
    }
}

#[test]
fn the_longest_expressions_accepted_parse_on_the_compile_thread() {
    // The densest nesting per byte, filling MAX_EXPR_BYTES: the parser's recursion is
    // bounded by the length, and must fit the compile thread's stack.
    let fill = |unit: &str, tail: &str| {
        let n = (MAX_EXPR_BYTES - tail.len()) / unit.len();
        format!("{}{tail}", unit.repeat(n))
    };
    for condition in [
        fill("1+", "1>x"),
        fill("-", "1>x"),
        fill("!", "x"),
        fill("x.", "x"),
        fill("(", "x"),
        fill("[", "1"),
        format!("x{}", "[0]".repeat((MAX_EXPR_BYTES - 1) / 3)),
        format!("x{}", "?x:x".repeat((MAX_EXPR_BYTES - 1) / 4)),
    ] {
        assert!(condition.len() <= MAX_EXPR_BYTES);
        let head: String = condition.chars().take(12).collect();
        let (result, took) = load_and_evaluate(rule_with_condition(&condition));
        if let Err(d) = &result {
            assert!(!d.to_string().contains("longer than"), "{head}...");
        }
        assert!(took < Duration::from_secs(20), "{head}... took {took:?}");
    }
}

fn sum_condition(terms: usize) -> String {
    format!("x{} > 0", " + x".repeat(terms - 1))
}

#[test]
fn cel_at_the_depth_limit_loads_and_evaluates_and_one_more_is_refused() {
    // `x + x + ... > 0` with k additions is k + 2 deep (the additions nest to the left).
    let at_limit = rule_with_condition(&sum_condition(MAX_EXPR_DEPTH - 1));
    let (fired, _) = load_and_evaluate(at_limit);
    assert_eq!(
        fired.expect("a condition at the limit loads"),
        1,
        "it is true and fires once"
    );

    let (deeper, _) = parse_on_small_stack(rule_with_condition(&sum_condition(MAX_EXPR_DEPTH)));
    let message = err(&deeper);
    assert!(
        message.contains(&format!("nested deeper than {MAX_EXPR_DEPTH} levels")),
        "{message}"
    );
    // The diagnostic points at the expression: line 4, just after the opening quotes.
    assert!(message.starts_with("t.toml:4:16: "), "{message}");
}

#[test]
fn deeply_nested_toml_is_diagnosed() {
    const DEEP: usize = 100_000;
    for text in [
        format!("x = {}", "[".repeat(DEEP)),
        format!("x = {}1{}", "[".repeat(DEEP), "]".repeat(DEEP)),
        format!("x = {}1{}", "{a = ".repeat(DEEP), "}".repeat(DEEP)),
        format!(
            "[[rule]]\nlabels = {}1{}",
            "{a = ".repeat(DEEP),
            "}".repeat(DEEP)
        ),
        format!("{} = 1", vec!["a"; DEEP].join(".")),
        format!("[{}]\n", vec!["a"; DEEP].join(".")),
        format!("[[rule]]\n[rule.{}]\n", vec!["a"; DEEP].join(".")),
    ] {
        let head: String = text.chars().take(24).collect();
        let (result, took) = parse_on_small_stack(text);
        err(&result);
        assert!(took < Duration::from_secs(20), "{head:?}... took {took:?}");
    }
}

#[test]
fn huge_rule_files_load_or_are_diagnosed_in_bounded_time() {
    const RULES: usize = 200;
    let mut many = String::new();
    for i in 0..RULES {
        many.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nevent = \"E\"\nstream = \"s{}\"\ncondition = \"x > {i}.0 && y < 3.0\"\n",
            i % 7
        ));
    }
    let (result, took) = parse_on_small_stack(many);
    assert_eq!(result.expect("200 valid rules load"), RULES);
    assert!(took < Duration::from_secs(30), "200 rules took {took:?}");

    let one_mb = 1 << 20;
    let big_description = format!(
        "[[rule]]\nname = \"r\"\nevent = \"E\"\ndescription = \"{}\"\ncondition = \"x > 1\"\n",
        "d".repeat(one_mb)
    );
    let (result, took) = parse_on_small_stack(big_description);
    assert_eq!(result.expect("a long description is fine"), 1);
    assert!(
        took < Duration::from_secs(30),
        "1 MB description took {took:?}"
    );

    let big_condition = rule_with_condition(&format!("x > 1{}", " || x > 1".repeat(one_mb / 9)));
    let (result, took) = parse_on_small_stack(big_condition);
    assert!(err(&result).contains(&format!("longer than {MAX_EXPR_BYTES} bytes")));
    assert!(
        took < Duration::from_secs(30),
        "1 MB condition took {took:?}"
    );
}
