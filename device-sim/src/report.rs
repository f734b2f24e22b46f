//! Human-readable output: the end-of-run summary, the bench report, and the
//! side-by-side comparison of two bench reports (A/B ratio).
//!
//! Input: [`Summary`] and [`BenchReport`] values. Output: plain text for a
//! terminal or a Markdown file (the comparison is a Markdown table).
//!
//! Invariants: pure functions; no I/O.

use std::fmt::Write;

use crate::bench::{BenchReport, WaitEnd};
use crate::fleet::Summary;

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The end-of-run summary of a fleet run.
pub fn summary(s: &Summary) -> String {
    let t = &s.totals;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "device-sim: {} devices, QoS {}, {}, {:.1} s (publishing {:.1} s)",
        s.devices, s.qos, s.format, s.elapsed_s, s.publish_s
    );
    let _ = writeln!(
        out,
        "  published {} ({} malformed) at {:.0}/s; sent {}, acked {}, dropped {}, late ticks {}",
        t.published, t.malformed, s.publish_rate, t.sent, t.acked, t.dropped, t.late
    );
    let _ = writeln!(
        out,
        "  connections: peak {}, connects {}, errors {}",
        s.connected_peak, t.connects, t.errors
    );
    if t.commands + t.commands_ignored > 0 {
        let _ = writeln!(
            out,
            "  commands: {} applied, {} ignored",
            t.commands, t.commands_ignored
        );
    }
    let _ = writeln!(
        out,
        "  own CPU: {:.1}% of one core ({:.1} s), max RSS {:.1} MB",
        s.cpu.percent,
        s.cpu.cpu_s,
        mb(s.cpu.max_rss_kb)
    );
    out
}

/// The summary plus what the upstream subscriber saw.
pub fn bench(r: &BenchReport) -> String {
    let mut out = summary(&r.fleet);
    let l = &r.latency_ms;
    let _ = writeln!(
        out,
        "  upstream [{}]: messages {}, readings received {}, delivered {}, lost {}, duplicated {}, unexpected {}, undecodable {}",
        r.label, r.upstream_messages, r.received, r.delivered, r.lost, r.duplicated, r.unexpected, r.undecodable
    );
    if let Some(w) = &r.wait {
        let how = match w.end {
            WaitEnd::AllDelivered => "every reading had arrived",
            WaitEnd::Quiet => "nothing new arrived for --settle",
            WaitEnd::MaxWait => {
                "--max-wait ran out with readings still arriving: the missing ones may be a backlog, not a loss"
            }
            WaitEnd::Stopped => "stopped",
        };
        let _ = writeln!(out, "  waited {:.1} s after publishing: {how}", w.secs);
    }
    let _ = writeln!(
        out,
        "  delivered {:.0}/s; latency ms: p50 {} p90 {} p99 {} max {} (mean {:.1})",
        r.delivered_rate, l.p50, l.p90, l.p99, l.max, l.mean
    );
    for p in &r.processes {
        let _ = writeln!(
            out,
            "  {} (pid {}): CPU {:.1}% of one core ({:.1} s), RSS {:.1} MB, peak {:.1} MB",
            p.name,
            p.pid,
            p.cpu_percent,
            p.cpu_s,
            mb(p.rss_kb),
            mb(p.peak_rss_kb)
        );
    }
    out
}

/// A Markdown table of `a` and `b` side by side with the ratio A/B; a
/// missing `a` (side A failed) shows as `-`.
pub fn compare(a: Option<&BenchReport>, b: &BenchReport) -> String {
    let mut rows: Vec<(String, f64, f64, usize)> = vec![
        row("devices", |r| r.fleet.devices as f64, a, b, 0),
        row("published", |r| r.fleet.totals.published as f64, a, b, 0),
        row("published / s", |r| r.fleet.publish_rate, a, b, 0),
        row("acked by edge", |r| r.fleet.totals.acked as f64, a, b, 0),
        row("delivered upstream", |r| r.delivered as f64, a, b, 0),
        row("delivered / s", |r| r.delivered_rate, a, b, 0),
        row("lost", |r| r.lost as f64, a, b, 0),
        row("duplicated", |r| r.duplicated as f64, a, b, 0),
        row("upstream messages", |r| r.upstream_messages as f64, a, b, 0),
        row("latency p50 ms", |r| r.latency_ms.p50 as f64, a, b, 0),
        row("latency p90 ms", |r| r.latency_ms.p90 as f64, a, b, 0),
        row("latency p99 ms", |r| r.latency_ms.p99 as f64, a, b, 0),
        row("latency max ms", |r| r.latency_ms.max as f64, a, b, 0),
        row("device-sim CPU %", |r| r.fleet.cpu.percent, a, b, 1),
    ];
    let mut names: Vec<&str> = a
        .iter()
        .flat_map(|a| a.processes.iter().map(|p| p.name.as_str()))
        .collect();
    for p in &b.processes {
        if !names.contains(&p.name.as_str()) {
            names.push(&p.name);
        }
    }
    for name in names {
        let find = |r: Option<&BenchReport>| {
            r.and_then(|r| r.processes.iter().find(|p| p.name == name).cloned())
        };
        let (pa, pb) = (find(a), find(Some(b)));
        let get = |p: &Option<crate::stats::ProcessUsage>,
                   f: fn(&crate::stats::ProcessUsage) -> f64| {
            p.as_ref().map_or(f64::NAN, f)
        };
        rows.push((
            format!("{name} CPU % (one core = 100)"),
            get(&pa, |p| p.cpu_percent),
            get(&pb, |p| p.cpu_percent),
            1,
        ));
        // CPU time per 1000 readings delivered: comparable across rates and runs.
        let per_1000 =
            |r: Option<&BenchReport>, p: &Option<crate::stats::ProcessUsage>| match (r, p) {
                (Some(r), Some(p)) if r.delivered > 0 => p.cpu_s * 1e6 / r.delivered as f64,
                _ => f64::NAN,
            };
        rows.push((
            format!("{name} CPU ms per 1000 readings"),
            per_1000(a, &pa),
            per_1000(Some(b), &pb),
            2,
        ));
        rows.push((
            format!("{name} RSS MB (end)"),
            get(&pa, |p| mb(p.rss_kb)),
            get(&pb, |p| mb(p.rss_kb)),
            1,
        ));
        rows.push((
            format!("{name} RSS MB (peak)"),
            get(&pa, |p| mb(p.peak_rss_kb)),
            get(&pb, |p| mb(p.peak_rss_kb)),
            1,
        ));
    }
    let mut out = String::new();
    let a_label = a.map_or("(not measured)", |a| a.label.as_str());
    let _ = writeln!(out, "| metric | A: {a_label} | B: {} | A/B |", b.label);
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (name, va, vb, decimals) in rows {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} |",
            cell(va, decimals),
            cell(vb, decimals),
            ratio_cell(va / vb)
        );
    }
    out
}

fn row(
    name: &str,
    f: impl Fn(&BenchReport) -> f64,
    a: Option<&BenchReport>,
    b: &BenchReport,
    decimals: usize,
) -> (String, f64, f64, usize) {
    (name.to_owned(), a.map_or(f64::NAN, &f), f(b), decimals)
}

/// The runs of a bench that alternated its sides in rounds (A then B, B then A, ...), one
/// row per round: `process`'s CPU on each side and the ratio A/B, with each side's
/// device-sim CPU, latency and losses beside it; then the mean of each column and the
/// ratio of the means, and the median of the rounds' ratios. Rounds run minutes apart
/// see a machine whose speed moves; A and B in one round saw the same stretch of it.
pub fn rounds(pairs: &[(BenchReport, BenchReport)], process: &str) -> String {
    let cpu = |r: &BenchReport| {
        r.processes
            .iter()
            .find(|p| p.name == process)
            .map_or(f64::NAN, |p| p.cpu_percent)
    };
    let latency = |r: &BenchReport| format!("{}/{}", r.latency_ms.p50, r.latency_ms.p99);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| round | A: {} {process} CPU % | B: {} {process} CPU % | A/B | device-sim CPU % A / B | p50/p99 ms A / B | lost A / B |",
        pairs.first().map_or("", |(a, _)| a.label.as_str()),
        pairs.first().map_or("", |(_, b)| b.label.as_str()),
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---|---|---|");
    let mut ratios = Vec::with_capacity(pairs.len());
    let (mut sum_a, mut sum_b) = (0.0, 0.0);
    for (i, (a, b)) in pairs.iter().enumerate() {
        let (ca, cb) = (cpu(a), cpu(b));
        let ratio = ca / cb;
        if ratio.is_finite() {
            ratios.push(ratio);
        }
        sum_a += ca;
        sum_b += cb;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} / {:.1} | {} / {} | {} / {} |",
            i + 1,
            cell(ca, 1),
            cell(cb, 1),
            ratio_cell(ratio),
            a.fleet.cpu.percent,
            b.fleet.cpu.percent,
            latency(a),
            latency(b),
            a.lost,
            b.lost,
        );
    }
    let n = pairs.len() as f64;
    let (mean_a, mean_b) = (sum_a / n, sum_b / n);
    let _ = writeln!(
        out,
        "| mean | {} | {} | {} | | | |",
        cell(mean_a, 1),
        cell(mean_b, 1),
        ratio_cell(mean_a / mean_b)
    );
    ratios.sort_by(f64::total_cmp);
    let median = match ratios.len() {
        0 => f64::NAN,
        k if !k.is_multiple_of(2) => ratios[k / 2],
        k => (ratios[k / 2 - 1] + ratios[k / 2]) / 2.0,
    };
    let _ = writeln!(
        out,
        "| median of the rounds' A/B | | | {} | | | |",
        ratio_cell(median)
    );
    out
}

/// A table cell: `v` with `decimals` decimals, `-` when it was not measured (NaN).
fn cell(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else {
        format!("{v:.decimals$}")
    }
}

/// A ratio's cell: two decimals, `-` when a side is missing or the divisor is zero.
fn ratio_cell(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "-".to_owned()
    }
}
