//! Evaluation cost per reading with 0, 10, 100 and 1000 rules loaded.
//!
//! - `applicable_5/N`: N rules loaded, 5 of which apply to the reading; the others are on
//!   other streams (half) or other topic filters (half), so this measures what the index
//!   saves: the cost should stay flat as N grows.
//! - `all_apply/N`: N rules that all apply to the reading (the worst case): the cost of
//!   evaluating N conditions.
//! - `all_apply_cel/N`: the same with conditions outside the native fast path
//!   (`temperature + 0.0 > 75.0`), i.e. through the CEL interpreter.
//! - `decode_json`: serde_json decoding a typical payload into fields, as a yardstick for
//!   the per-message work the rest of the pipeline does anyway.
//!
//! - `churn/N`: N rules that all apply, with readings that cross the thresholds every few
//!   readings of a device: the cost of transitions (pending, firing, events) on top.
//!
//! Except in `churn`, readings stay under every threshold: the figures are the cost of
//! evaluation alone. Readings rotate over 100 devices; time advances 10 ms per reading.
//!
//! Run: `cargo bench -p gateway --bench rules`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway::reading::{Format, Reading, Value};
use gateway::rules::{Engine, RuleSet};

const DEVICES: usize = 100;
const SIZES: [usize; 4] = [0, 10, 100, 1000];
const T0: i64 = 1_767_225_600_000;

/// Rule `i`: a threshold with hysteresis and `for`; every 10th uses a 10-sample average.
fn rule(i: usize, scope: &str, cel: bool) -> String {
    let (fire, clear) = (70 + i % 10, 65 + i % 10);
    let (field, avg) = if cel {
        ("temperature + 0.0", "agg.avg + 0.0")
    } else {
        ("temperature", "agg.avg")
    };
    if i.is_multiple_of(10) {
        format!(
            "[[rule]]\nname = \"r{i}\"\nevent = \"E{i}\"\n{scope}\ncondition = \"{avg} > {fire}.0\"\nfor = \"10s\"\n\
             [[rule.aggregate]]\nname = \"avg\"\nfield = \"temperature\"\nfn = \"avg\"\nsamples = 10\n"
        )
    } else {
        format!(
            "[[rule]]\nname = \"r{i}\"\nevent = \"E{i}\"\n{scope}\ncondition = \"{field} > {fire}.0\"\n\
             clear = \"{field} < {clear}.0\"\nfor = \"10s\"\n"
        )
    }
}

/// N rules; `applicable` of them apply to stream `telemetry`, topic `devices/D/telemetry`.
fn ruleset(n: usize, applicable: usize, cel: bool) -> RuleSet {
    let mut text = String::new();
    for i in 0..n {
        let scope = if i < applicable {
            "stream = \"telemetry\"".to_string()
        } else if i.is_multiple_of(2) {
            format!("stream = \"stream-{i}\"")
        } else {
            format!("topic = \"site/{i}/+/data\"")
        };
        text.push_str(&rule(i, &scope, cel));
    }
    RuleSet::parse("bench.toml", &text).unwrap_or_else(|d| panic!("{d}"))
}

/// Steady readings stay below every threshold (no transitions: pure evaluation cost);
/// churning ones cross the thresholds every few readings of a device.
fn readings(steady: bool) -> Vec<Reading> {
    (0..1000)
        .map(|k| {
            let device = format!("t-{}", k % DEVICES);
            let temperature = if steady {
                50.0 + (k % 5) as f64
            } else {
                60.0 + ((k * 7) % 30) as f64
            };
            Reading {
                topic: format!("devices/{device}/telemetry"),
                device,
                stream: "telemetry".into(),
                time: 0,
                fields: BTreeMap::from([
                    ("temperature".to_string(), Value::Number(temperature)),
                    ("humidity".to_string(), Value::Number(40.0)),
                    ("battery".to_string(), Value::Number(80.0)),
                ]),
                units: BTreeMap::new(),
                format: Format::Json,
            }
        })
        .collect()
}

fn bench_engine(
    c: &mut Criterion,
    group_name: &str,
    sizes: &[usize],
    cel: bool,
    steady: bool,
    applicable: impl Fn(usize) -> usize,
) {
    let readings = readings(steady);
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(1));
    for &n in sizes {
        let mut engine = Engine::new(ruleset(n, applicable(n), cel), "bench");
        let mut k = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let r = &readings[k % readings.len()];
                k += 1;
                black_box(engine.on_reading(black_box(r), T0 + (k as i64) * 10))
            })
        });
    }
    group.finish();
}

fn applicable_5(c: &mut Criterion) {
    bench_engine(c, "applicable_5", &SIZES, false, true, |n| n.min(5));
}

fn all_apply(c: &mut Criterion) {
    bench_engine(c, "all_apply", &SIZES, false, true, |n| n);
}

fn all_apply_cel(c: &mut Criterion) {
    bench_engine(c, "all_apply_cel", &[10, 100], true, true, |n| n);
}

fn churn(c: &mut Criterion) {
    bench_engine(c, "churn", &[10, 100], false, false, |n| n);
}

fn decode_json(c: &mut Criterion) {
    let payload =
        br#"{"temperature": 71.5, "humidity": 40.0, "battery": 80.0, "ts": 1767225600000}"#;
    c.bench_function("decode_json", |b| {
        b.iter(|| {
            let v: BTreeMap<String, serde_json::Value> =
                serde_json::from_slice(black_box(payload)).unwrap();
            black_box(v)
        })
    });
}

criterion_group!(
    benches,
    applicable_5,
    all_apply,
    all_apply_cel,
    churn,
    decode_json
);
criterion_main!(benches);
