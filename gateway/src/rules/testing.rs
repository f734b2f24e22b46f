//! Rule tests and the `rules check` / `rules test` commands.
//!
//! Owns the rule test file format (`*.test.toml`, documented in `rules/README.md`) and its
//! runner, in the spirit of `promtool test rules`: timed input readings, expected events
//! and, when a test lists them, the expected actions.
//! Input: a rules directory. Output: a report written to the caller's `Write`, and success.
//!
//! Invariants:
//! - Time is simulated: inputs are fed at `BASE_TIME + at`, and `tick` runs every `tick`
//!   (default 1s) up to `until`; no test sleeps.
//! - Each test starts from a fresh engine with only the test file's `rule_files`
//!   (default: the rule file with the same stem), so tests of one file never see another's rules.
//! - A failure prints the whole timeline of events (and actions, when the test checks
//!   them) as a diff: `-` expected but missing, `+` produced but not expected.
//! - A test without `actions` does not check actions; `actions = []` checks there are none.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::action::{messages, Rendered};
use super::diagnostics::{Diagnostic, Diagnostics, Source};
use super::engine::Engine;
use super::ruleset::{test_files, RuleSet, TEST_SUFFIX};
use crate::events::{Event, EventState};
use crate::reading::{Format, Millis, Reading, Value};

/// The simulated time of offset `0s`: 2026-01-01T00:00:00Z.
pub const BASE_TIME: Millis = 1_767_225_600_000;
const DEFAULT_TICK: &str = "1s";
const DEFAULT_STREAM: &str = "telemetry";
const GATEWAY_ID: &str = "rule-test";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    rule_files: Option<Vec<String>>,
    tick: Option<Spanned<String>>,
    #[serde(default, rename = "test")]
    tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestCase {
    name: String,
    until: Option<Spanned<String>>,
    #[serde(default, rename = "input")]
    inputs: Vec<Input>,
    #[serde(default, rename = "expect")]
    expects: Vec<Expect>,
    /// The actions expected; `None` leaves actions unchecked.
    actions: Option<Vec<ExpectAction>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    at: Spanned<String>,
    device: String,
    stream: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, Value>,
    /// Send the reading this many times (default 1) ...
    repeat: Option<u32>,
    /// ... this far apart.
    every: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    at: Spanned<String>,
    #[serde(rename = "type")]
    event_type: String,
    device: String,
    state: EventState,
    rule: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectAction {
    at: Spanned<String>,
    /// A publish action's topic (rendered) ...
    topic: Option<String>,
    /// ... or a webhook action's URL (rendered).
    url: Option<String>,
    /// Checked when given.
    payload: Option<String>,
    /// Checked when given (publish actions only).
    qos: Option<u8>,
}

impl ExpectAction {
    /// Why this expectation is malformed, if it is.
    fn problem(&self) -> Option<&'static str> {
        match (&self.topic, &self.url) {
            (Some(_), Some(_)) | (None, None) => {
                Some("an expected action has `topic` (a publish) or `url` (a webhook)")
            }
            (None, Some(_)) if self.qos.is_some() => {
                Some("`qos` is for expected publish actions (with `topic`), not webhooks")
            }
            _ => None,
        }
    }
}

/// The result of one test case.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub file: String,
    pub name: String,
    pub passed: bool,
    /// The timeline diff of events and checked actions (empty when passed).
    pub diff: String,
}

/// `gateway rules check [DIR]`: reports every problem as `file:line:col: message`.
pub fn check_command(dir: &Path, out: &mut dyn Write) -> bool {
    let result = match RuleSet::load_dir(dir) {
        Ok(set) => writeln!(
            out,
            "{}: {} rules in {} files, all valid",
            dir.display(),
            set.len(),
            set.files()
        )
        .map(|_| true),
        Err(diags) => {
            let mut r = Ok(());
            for d in diags.iter() {
                r = r.and_then(|_| writeln!(out, "{d}"));
            }
            r.and_then(|_| writeln!(out, "{} errors", diags.len()))
                .map(|_| false)
        }
    };
    result.unwrap_or(false)
}

/// `gateway rules test [DIR]`: runs every `*.test.toml` in `dir`; true when all pass.
pub fn test_command(dir: &Path, out: &mut dyn Write) -> bool {
    let files = match test_files(dir) {
        Ok(files) => files,
        Err(d) => {
            let _ = writeln!(out, "{d}");
            return false;
        }
    };
    let (mut total, mut failed, mut broken) = (0, 0, 0);
    for path in &files {
        let _ = writeln!(out, "{}", path.display());
        match run_test_file(path) {
            Ok(outcomes) => {
                for o in outcomes {
                    total += 1;
                    if o.passed {
                        let _ = writeln!(out, "  ok      {}", o.name);
                    } else {
                        failed += 1;
                        let _ = writeln!(out, "  FAILED  {}", o.name);
                        let _ = write!(out, "{}", o.diff);
                    }
                }
            }
            Err(diags) => {
                broken += 1;
                for d in diags.iter() {
                    let _ = writeln!(out, "  {d}");
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "{} test files, {total} tests, {failed} failed, {broken} files with errors",
        files.len()
    );
    failed == 0 && broken == 0
}

/// Runs every test case of one test file.
pub fn run_test_file(path: &Path) -> Result<Vec<TestOutcome>, Diagnostics> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| one(&file, format!("cannot read test file: {e}")))?;
    let src = Source::new(&file, &text);
    let parsed: TestFile = toml::from_str(&text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        Diagnostics(vec![src.at(at, e.message().trim_end().to_string())])
    })?;
    let mut diags = Diagnostics::default();
    let mut dur = |s: &Spanned<String>| -> Millis {
        match humantime::parse_duration(s.get_ref().trim()) {
            Ok(d) => d.as_millis() as Millis,
            Err(e) => {
                diags.push(src.at(
                    s.span().start,
                    format!("bad duration {:?}: {e}", s.get_ref()),
                ));
                0
            }
        }
    };
    let tick = parsed.tick.as_ref().map_or_else(
        || humantime::parse_duration(DEFAULT_TICK).map_or(1000, |d| d.as_millis() as Millis),
        &mut dur,
    );
    let mut cases = Vec::new();
    let mut problems = Vec::new();
    for case in &parsed.tests {
        let mut inputs = Vec::new();
        for input in &case.inputs {
            let at = dur(&input.at);
            let every = input.every.as_ref().map_or(0, &mut dur);
            for n in 0..input.repeat.unwrap_or(1).max(1) {
                inputs.push((at + every * Millis::from(n), input));
            }
        }
        inputs.sort_by_key(|(at, _)| *at);
        let expects: Vec<(Millis, &Expect)> =
            case.expects.iter().map(|e| (dur(&e.at), e)).collect();
        let actions: Option<Vec<(Millis, &ExpectAction)>> = case
            .actions
            .as_ref()
            .map(|list| list.iter().map(|a| (dur(&a.at), a)).collect());
        for a in case.actions.iter().flatten() {
            if let Some(problem) = a.problem() {
                problems.push(src.at(a.at.span().start, problem));
            }
        }
        let until = case.until.as_ref().map_or(0, &mut dur);
        cases.push((case, inputs, expects, actions, until));
    }
    for problem in problems {
        diags.push(problem);
    }
    if tick <= 0 {
        diags.push(src.at(0, "`tick` must be longer than 0s"));
    }
    let rule_paths = rule_paths(path, parsed.rule_files.as_deref());
    let texts: Vec<(String, String)> = rule_paths
        .iter()
        .map(|p| {
            let name = p.display().to_string();
            std::fs::read_to_string(p)
                .map(|t| (name.clone(), t))
                .map_err(|e| Diagnostic {
                    file: file.clone(),
                    line: 1,
                    col: 1,
                    message: format!("cannot read rule file {name}: {e}"),
                })
        })
        .collect::<Result<_, _>>()
        .map_err(|d| Diagnostics(vec![d]))?;
    if let Err(more) = RuleSet::parse_many(&texts) {
        diags.extend(more);
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let mut outcomes = Vec::new();
    for (case, inputs, expects, actions, until) in cases {
        let rules = RuleSet::parse_many(&texts)?;
        let action_times = actions.iter().flatten().map(|(t, _)| *t);
        let last = inputs
            .iter()
            .map(|(t, _)| *t)
            .chain(expects.iter().map(|(t, _)| *t))
            .chain(action_times)
            .fold(until, Millis::max);
        let (produced, published) = simulate(rules, &inputs, last, tick);
        let mut rows = compare(&expects, &produced);
        if let Some(actions) = &actions {
            rows.extend(compare_actions(actions, &published));
        }
        let (passed, diff) = timeline(rows);
        outcomes.push(TestOutcome {
            file: file.clone(),
            name: case.name.clone(),
            passed,
            diff,
        });
    }
    Ok(outcomes)
}

fn one(file: &str, message: String) -> Diagnostics {
    Diagnostics(vec![Diagnostic {
        file: file.to_string(),
        line: 1,
        col: 1,
        message,
    }])
}

/// The rule files a test file tests: `rule_files` relative to it, or `NAME.toml` for `NAME.test.toml`.
fn rule_paths(test_file: &Path, given: Option<&[String]>) -> Vec<PathBuf> {
    let dir = test_file.parent().unwrap_or(Path::new("."));
    match given {
        Some(names) => names.iter().map(|n| dir.join(n)).collect(),
        None => {
            let name = test_file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let stem = name.strip_suffix(TEST_SUFFIX).unwrap_or(name);
            vec![dir.join(format!("{stem}.toml"))]
        }
    }
}

/// Items with their offsets from the start of a test.
type Timed<T> = Vec<(Millis, T)>;

/// Feeds the inputs at their times and ticks every `tick` up to `last`; returns the events
/// and the actions their rules publish, each with its offset from the start.
fn simulate(
    rules: RuleSet,
    inputs: &[(Millis, &Input)],
    last: Millis,
    tick: Millis,
) -> (Timed<Event>, Timed<Rendered>) {
    let mut engine = Engine::new(rules, GATEWAY_ID);
    let mut produced = Vec::new();
    let mut next = inputs.iter().peekable();
    let mut t = 0;
    loop {
        while let Some((at, input)) = next.next_if(|(at, _)| *at <= t) {
            let reading = reading_of(input, BASE_TIME + at);
            produced.extend(engine.on_reading(&reading, BASE_TIME + at));
        }
        produced.extend(engine.tick(BASE_TIME + t));
        if t >= last {
            break;
        }
        t = (t + tick).min(last);
    }
    let mut timed: Vec<(Millis, Event)> = produced
        .into_iter()
        .map(|e| (e.time_millis().unwrap_or(BASE_TIME) - BASE_TIME, e))
        .collect();
    timed.sort_by(|a, b| (a.0, &a.1.subject).cmp(&(b.0, &b.1.subject)));
    let published = timed
        .iter()
        .flat_map(|(at, e)| {
            let rule = engine.rules().get(&e.data.rule);
            let actions = rule.map(|r| messages(&r.actions, e)).unwrap_or_default();
            actions.into_iter().map(move |m| (*at, m))
        })
        .collect();
    (timed, published)
}

fn reading_of(input: &Input, time: Millis) -> Reading {
    let stream = input
        .stream
        .clone()
        .unwrap_or_else(|| DEFAULT_STREAM.to_string());
    Reading {
        topic: input
            .topic
            .clone()
            .unwrap_or_else(|| format!("devices/{}/{stream}", input.device)),
        device: input.device.clone(),
        stream,
        time,
        fields: input.fields.clone(),
        units: BTreeMap::new(),
        format: Format::Json,
    }
}

fn line(at: Millis, state: EventState, event_type: &str, device: &str, rule: &str) -> String {
    let offset = humantime::format_duration(Duration::from_millis(at.max(0) as u64)).to_string();
    format!("{offset:>8}  {state:<8}  {event_type}  {device}  (rule {rule})")
}

/// An action as the test compares it: where to (`topic` or `url`), payload and QoS (none for
/// a webhook).
struct Seen<'a> {
    webhook: bool,
    to: &'a str,
    payload: Option<&'a str>,
    qos: Option<u8>,
}

impl<'a> Seen<'a> {
    fn of(r: &'a Rendered) -> Seen<'a> {
        match r {
            Rendered::Publish(m) => Seen {
                webhook: false,
                to: &m.topic,
                payload: Some(&m.payload),
                qos: Some(m.qos),
            },
            Rendered::Webhook(c) => Seen {
                webhook: true,
                to: &c.url,
                payload: Some(&c.payload),
                qos: None,
            },
        }
    }

    fn expected(e: &'a ExpectAction) -> Seen<'a> {
        Seen {
            webhook: e.url.is_some(),
            to: e.url.as_deref().or(e.topic.as_deref()).unwrap_or_default(),
            payload: e.payload.as_deref(),
            qos: e.qos,
        }
    }

    /// Whether `self` (produced) matches the expectation `e`.
    fn matches(&self, e: &Seen<'_>) -> bool {
        self.webhook == e.webhook
            && self.to == e.to
            && e.payload.is_none_or(|p| Some(p) == self.payload)
            && e.qos.is_none_or(|q| Some(q) == self.qos)
    }

    fn line(&self, at: Millis) -> String {
        let offset =
            humantime::format_duration(Duration::from_millis(at.max(0) as u64)).to_string();
        let payload = self
            .payload
            .map_or_else(|| "(any payload)".to_string(), |p| format!("{p:?}"));
        if self.webhook {
            return format!("{offset:>8}  webhook   POST {}  {payload}", self.to);
        }
        let qos = self
            .qos
            .map_or_else(|| "any qos".to_string(), |q| format!("qos {q}"));
        format!("{offset:>8}  action    {}  {payload}  ({qos})", self.to)
    }
}

/// One row of a timeline: offset, mark (` `, `-` or `+`) and text.
type Row = (Millis, char, String);

/// Matches expected to produced events: a row for each.
fn compare(expects: &[(Millis, &Expect)], produced: &[(Millis, Event)]) -> Vec<Row> {
    let mut used = vec![false; produced.len()];
    let mut rows: Vec<Row> = Vec::new();
    for (at, e) in expects {
        let found = produced.iter().enumerate().position(|(i, (t, ev))| {
            !used[i]
                && t == at
                && ev.event_type == e.event_type
                && ev.subject == e.device
                && ev.data.state == e.state
                && e.rule.as_ref().is_none_or(|r| *r == ev.data.rule)
        });
        let (mark, state, event_type, device, rule) = match found {
            Some(i) => {
                used[i] = true;
                let ev = &produced[i].1;
                (
                    ' ',
                    ev.data.state,
                    &ev.event_type,
                    &ev.subject,
                    ev.data.rule.as_str(),
                )
            }
            None => {
                let rule = e.rule.as_deref().unwrap_or("any");
                ('-', e.state, &e.event_type, &e.device, rule)
            }
        };
        rows.push((*at, mark, line(*at, state, event_type, device, rule)));
    }
    for (i, (t, ev)) in produced.iter().enumerate() {
        if !used[i] {
            let text = line(
                *t,
                ev.data.state,
                &ev.event_type,
                &ev.subject,
                &ev.data.rule,
            );
            rows.push((*t, '+', text));
        }
    }
    rows
}

/// Matches expected to published actions and webhook calls: a row for each.
fn compare_actions(
    expects: &[(Millis, &ExpectAction)],
    published: &[(Millis, Rendered)],
) -> Vec<Row> {
    let seen: Vec<(Millis, Seen<'_>)> = published.iter().map(|(t, r)| (*t, Seen::of(r))).collect();
    let mut used = vec![false; seen.len()];
    let mut rows: Vec<Row> = Vec::new();
    for (at, e) in expects {
        let expected = Seen::expected(e);
        let found = seen
            .iter()
            .enumerate()
            .position(|(i, (t, m))| !used[i] && t == at && m.matches(&expected));
        let row = match found {
            Some(i) => {
                used[i] = true;
                (' ', seen[i].1.line(*at))
            }
            None => ('-', expected.line(*at)),
        };
        rows.push((*at, row.0, row.1));
    }
    for (i, (t, m)) in seen.iter().enumerate() {
        if !used[i] {
            rows.push((*t, '+', m.line(*t)));
        }
    }
    rows
}

/// Whether every row matched, and the diff of the whole timeline when one did not.
fn timeline(mut rows: Vec<Row>) -> (bool, String) {
    let passed = rows.iter().all(|(_, mark, _)| *mark == ' ');
    if passed {
        return (true, String::new());
    }
    rows.sort_by_key(|r| r.0);
    let mut diff =
        String::from("    timeline (- expected but missing, + produced but not expected):\n");
    for (_, mark, text) in rows {
        diff.push_str(&format!("    {mark} {text}\n"));
    }
    (false, diff)
}
