//! Rolling windows: the samples behind one aggregate of one (rule, device) instance.
//!
//! Owns [`Window`]. Input: (time, value) samples of one field, pushed in time order, with
//! the aggregate function they feed. Output: avg / min / max / count / rate over the
//! samples still in the window.
//!
//! Invariants:
//! - A count window keeps the last N samples.
//! - A time window keeps one `Span` per bucket of `window / TIME_BUCKETS`, at most
//!   [`TIME_BUCKETS`] + 1 of them, so its memory does not grow with the reading rate. A
//!   span leaves the window when its newest sample is at least one window old: the
//!   window's oldest edge is exact to one bucket width (1/64 of the window).
//! - A span holds only what its window's function needs (24 bytes): the time of its first
//!   sample, its last sample's offset from it, its sample count, and one number (the sum
//!   for `avg`, the least or greatest value for `min` / `max`, the first value for
//!   `rate`). A window serves one aggregate, so it never needs more; a window is reset
//!   when its function changes (rule reload, or a saved window restored for a rule that
//!   changed).
//! - `rate` is (newest - oldest) / seconds between them; it has no value with fewer than two
//!   samples or when they share one timestamp.
//! - A window's buffer grows by doubling up to what it can hold at most (N + 1 samples,
//!   [`TIME_BUCKETS`] + 2 spans) and no further: a full one-minute window is 66 spans,
//!   not the 128 that doubling would reserve (a window per aggregate, per rule, per
//!   device is the bulk of the rules' memory: 1000 devices with a one-minute `rate`, 30 s
//!   into their readings, hold 1 MB of spans, against 3.0 MB with 72-byte buckets of
//!   every statistic; BENCHMARKS.md, "Smaller rule windows").
//! - A window nobody pushes to still ages: the engine's tick calls [`Window::expire`],
//!   which drops what a push would drop, and an emptied window frees its buffer.
//! - Saved state from before spans (`buckets`, every statistic per bucket) is still read:
//!   [`Window::adopt`] turns it into spans for the aggregate's function at restore.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::rule::{AggFn, WindowSpec};
use crate::reading::Millis;

/// Buckets a time window is divided into.
pub const TIME_BUCKETS: Millis = 64;

/// The samples of one aggregate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// The function the samples were summarised for (time windows; `None` until the
    /// first sample).
    #[serde(default, rename = "fn", skip_serializing_if = "Option::is_none")]
    func: Option<AggFn>,
    /// Count windows: the samples themselves.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    samples: VecDeque<(Millis, f64)>,
    /// Time windows: one span per bucket, oldest first.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    spans: VecDeque<Span>,
    /// Time windows: the newest sample (where a `rate` ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    newest: Option<(Millis, f64)>,
    /// Buckets saved before spans existed, until [`Window::adopt`] converts them.
    #[serde(default, skip_serializing)]
    buckets: Option<Box<[SavedBucket]>>,
}

/// The samples of one bucket of a time window, summarised for one function; saved as
/// `[first_at, last_dt, count, x]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "(Millis, u32, u32, f64)", into = "(Millis, u32, u32, f64)")]
struct Span {
    /// Time of the bucket's first sample.
    first_at: Millis,
    /// Its last sample's time minus the first's (ms; less than a bucket width).
    last_dt: u32,
    /// Samples in the bucket (saturates at `u32::MAX`).
    count: u32,
    /// The sum (`avg`), least (`min`) or greatest (`max`) value, or the first value
    /// (`rate`); unused by `count`.
    x: f64,
}

impl Span {
    fn new(at: Millis, value: f64) -> Span {
        Span {
            first_at: at,
            last_dt: 0,
            count: 1,
            x: value,
        }
    }

    fn last_at(&self) -> Millis {
        self.first_at + Millis::from(self.last_dt)
    }

    fn add(&mut self, at: Millis, value: f64, func: AggFn) {
        self.last_dt = offset(self.first_at, at);
        self.count = self.count.saturating_add(1);
        self.x = match func {
            AggFn::Avg => self.x + value,
            AggFn::Min => self.x.min(value),
            AggFn::Max => self.x.max(value),
            AggFn::Count | AggFn::Rate => self.x,
        };
    }
}

impl From<(Millis, u32, u32, f64)> for Span {
    fn from((first_at, last_dt, count, x): (Millis, u32, u32, f64)) -> Span {
        Span {
            first_at,
            last_dt,
            count,
            x,
        }
    }
}

impl From<Span> for (Millis, u32, u32, f64) {
    fn from(s: Span) -> Self {
        (s.first_at, s.last_dt, s.count, s.x)
    }
}

/// `at - from` in ms, clamped to what a span holds.
fn offset(from: Millis, at: Millis) -> u32 {
    u32::try_from((at - from).max(0)).unwrap_or(u32::MAX)
}

/// A bucket as saved before spans: every statistic.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
struct SavedBucket {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: (Millis, f64),
    last: (Millis, f64),
}

impl Window {
    /// Adds a sample for `func` and drops those that left the window.
    pub fn push(&mut self, at: Millis, value: f64, spec: WindowSpec, func: AggFn) {
        match spec {
            WindowSpec::Time(ms) => {
                if self.func != Some(func) {
                    // Summaries made for another function mean nothing to this one.
                    self.spans.clear();
                    self.func = Some(func);
                }
                let width = (ms / TIME_BUCKETS).max(1);
                let bucket = |t: Millis| t - t.rem_euclid(width);
                match self.spans.back_mut() {
                    Some(s) if bucket(s.first_at) == bucket(at) => s.add(at, value, func),
                    _ => push_bounded(
                        &mut self.spans,
                        TIME_BUCKETS as usize + 2,
                        Span::new(at, value),
                    ),
                }
                self.newest = Some((at, value));
                self.drop_older(at - ms);
            }
            WindowSpec::Count(n) => {
                push_bounded(&mut self.samples, n + 1, (at, value));
                while self.samples.len() > n {
                    self.samples.pop_front();
                }
            }
        }
    }

    /// Makes a restored window fit `func`: buckets saved before spans become spans, and a
    /// window summarised for another function starts empty.
    pub fn adopt(&mut self, func: AggFn) {
        if let Some(saved) = self.buckets.take() {
            self.spans = (saved.iter())
                .map(|b| Span {
                    first_at: b.first.0,
                    last_dt: offset(b.first.0, b.last.0),
                    count: u32::try_from(b.count).unwrap_or(u32::MAX),
                    x: match func {
                        AggFn::Avg => b.sum,
                        AggFn::Min => b.min,
                        AggFn::Max => b.max,
                        AggFn::Count | AggFn::Rate => b.first.1,
                    },
                })
                .collect();
            self.newest = saved.last().map(|b| b.last);
            self.func = (!self.spans.is_empty()).then_some(func);
        }
        if self.func.is_some_and(|f| f != func) {
            self.spans.clear();
            self.newest = None;
            self.func = None;
        }
    }

    /// Drops the spans that have left a time window by `now` (as the next push would);
    /// an emptied window gives its buffer back, so a device that stopped reporting holds
    /// no window memory once the window's length has passed.
    pub fn expire(&mut self, now: Millis, spec: WindowSpec) {
        let WindowSpec::Time(ms) = spec else {
            return;
        };
        self.drop_older(now - ms);
        if self.spans.is_empty() && self.spans.capacity() > 0 {
            self.spans = VecDeque::new();
            self.newest = None;
        }
    }

    /// Drops the spans whose newest sample is at or before `edge`.
    fn drop_older(&mut self, edge: Millis) {
        while self.spans.front().is_some_and(|s| s.last_at() <= edge) {
            self.spans.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len() + self.spans.iter().map(|s| s.count as usize).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty() && self.spans.is_empty()
    }

    /// Time from the oldest sample in the window to the newest (ms; 0 when it holds fewer
    /// than two). A time window's oldest edge is its first span's first sample.
    pub fn span(&self) -> Millis {
        let ends = match (self.spans.front(), self.newest) {
            (Some(first), Some((newest, _))) => Some((first.first_at, newest)),
            _ => (self.samples.front())
                .zip(self.samples.back())
                .map(|(a, b)| (a.0, b.0)),
        };
        ends.map_or(0, |(oldest, newest)| (newest - oldest).max(0))
    }

    /// The aggregate's value, if the window holds enough samples for it.
    pub fn value(&self, func: AggFn) -> Option<f64> {
        if !self.spans.is_empty() {
            return self.span_value(func);
        }
        let values = self.samples.iter().map(|(_, v)| *v);
        match func {
            AggFn::Count => Some(self.samples.len() as f64),
            _ if self.samples.is_empty() => None,
            AggFn::Avg => Some(values.sum::<f64>() / self.samples.len() as f64),
            AggFn::Min => values.reduce(f64::min),
            AggFn::Max => values.reduce(f64::max),
            AggFn::Rate => rate(*self.samples.front()?, *self.samples.back()?),
        }
    }

    fn span_value(&self, func: AggFn) -> Option<f64> {
        if self.func != Some(func) && func != AggFn::Count {
            // The spans summarise another function's number.
            return None;
        }
        let count: u64 = self.spans.iter().map(|s| u64::from(s.count)).sum();
        let xs = self.spans.iter().map(|s| s.x);
        match func {
            AggFn::Count => Some(count as f64),
            AggFn::Avg => Some(xs.sum::<f64>() / count as f64),
            AggFn::Min => xs.reduce(f64::min),
            AggFn::Max => xs.reduce(f64::max),
            AggFn::Rate => {
                let oldest = self.spans.front()?;
                rate((oldest.first_at, oldest.x), self.newest?)
            }
        }
    }
}

/// Pushes `item`, growing a full buffer by doubling but never beyond `most` slots.
fn push_bounded<T>(deque: &mut VecDeque<T>, most: usize, item: T) {
    let len = deque.len();
    if len == deque.capacity() && len < most {
        deque.reserve_exact((len * 2).max(4).min(most) - len);
    }
    deque.push_back(item);
}

fn rate((t0, v0): (Millis, f64), (t1, v1): (Millis, f64)) -> Option<f64> {
    (t1 > t0).then(|| (v1 - v0) / ((t1 - t0) as f64 / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [AggFn; 5] = [
        AggFn::Avg,
        AggFn::Min,
        AggFn::Max,
        AggFn::Count,
        AggFn::Rate,
    ];

    /// One window per function, fed the same samples; the values in the order of [`ALL`].
    fn values(spec: WindowSpec, samples: &[(Millis, f64)]) -> Vec<Option<f64>> {
        ALL.iter()
            .map(|&func| {
                let mut w = Window::default();
                for &(at, v) in samples {
                    w.push(at, v, spec, func);
                }
                w.value(func)
            })
            .collect()
    }

    #[test]
    fn time_window_drops_old_samples() {
        let spec = WindowSpec::Time(10_000);
        assert_eq!(
            values(spec, &[(0, 10.0), (5_000, 20.0)]),
            [Some(15.0), Some(10.0), Some(20.0), Some(2.0), Some(2.0)]
        );
        // The sample at 0 is exactly one window old: out.
        assert_eq!(
            values(spec, &[(0, 10.0), (5_000, 20.0), (10_000, 30.0)]),
            [Some(25.0), Some(20.0), Some(30.0), Some(2.0), Some(2.0)]
        );
    }

    #[test]
    fn a_span_summarises_its_bucket_for_its_function() {
        // Width 1000 ms (64 s / 64): three samples share the first bucket, one is in the
        // next; the rate runs from the first bucket's first sample to the newest.
        let spec = WindowSpec::Time(64_000);
        let samples = [(0, 4.0), (300, 1.0), (900, 7.0), (1_500, 3.0)];
        assert_eq!(
            values(spec, &samples),
            [
                Some(3.75),
                Some(1.0),
                Some(7.0),
                Some(4.0),
                Some(-1.0 / 1.5)
            ]
        );
        let mut w = Window::default();
        for (at, v) in samples {
            w.push(at, v, spec, AggFn::Max);
        }
        assert_eq!(w.spans.len(), 2);
        assert_eq!((w.spans[0].last_at(), w.spans[0].count), (900, 3));
    }

    #[test]
    fn time_window_memory_does_not_grow_with_the_rate() {
        let spec = WindowSpec::Time(60_000);
        for func in ALL {
            let mut w = Window::default();
            // 2000 samples a second for two minutes.
            for i in 0..240_000i64 {
                w.push(i / 2, (i % 100) as f64, spec, func);
            }
            assert!(
                w.spans.len() <= TIME_BUCKETS as usize + 1,
                "{} spans",
                w.spans.len()
            );
            assert_eq!(w.spans.capacity(), TIME_BUCKETS as usize + 2);
            let count = w.len() as f64;
            assert!((120_000.0..=122_000.0).contains(&count), "{count}");
            match func {
                AggFn::Min => assert_eq!(w.value(func), Some(0.0)),
                AggFn::Max => assert_eq!(w.value(func), Some(99.0)),
                AggFn::Count => assert_eq!(w.value(func), Some(count)),
                _ => assert!(w.value(func).is_some()),
            }
        }
        assert_eq!(std::mem::size_of::<Span>(), 24);
    }

    #[test]
    fn a_window_answers_only_for_its_function() {
        let spec = WindowSpec::Time(10_000);
        let mut w = Window::default();
        w.push(0, 10.0, spec, AggFn::Avg);
        w.push(1_000, 20.0, spec, AggFn::Avg);
        assert_eq!(w.value(AggFn::Avg), Some(15.0));
        assert_eq!(w.value(AggFn::Max), None);
        assert_eq!(w.value(AggFn::Count), Some(2.0));
        // Fed for another function, it starts over.
        w.push(2_000, 5.0, spec, AggFn::Max);
        assert_eq!((w.value(AggFn::Max), w.len()), (Some(5.0), 1));
    }

    #[test]
    fn saved_buckets_become_spans_for_the_function_restored() {
        // A one-minute window as saved before spans: two buckets, every statistic.
        let json = r#"{"buckets":[
            {"start":0,"count":2,"sum":30.0,"min":10.0,"max":20.0,"first":[100,10.0],"last":[800,20.0]},
            {"start":1875,"count":1,"sum":40.0,"min":40.0,"max":40.0,"first":[2000,40.0],"last":[2000,40.0]}
        ]}"#;
        let want = [
            Some(70.0 / 3.0),
            Some(10.0),
            Some(40.0),
            Some(3.0),
            Some(30.0 / 1.9),
        ];
        for (func, want) in ALL.into_iter().zip(want) {
            let mut w: Window = serde_json::from_str(json).unwrap();
            w.adopt(func);
            assert_eq!(w.value(func), want, "{func:?}");
            // It goes on from there, and saves in the new form.
            w.push(2_500, 40.0, WindowSpec::Time(60_000), func);
            assert_eq!(w.len(), 4);
            let saved = serde_json::to_string(&w).unwrap();
            assert!(!saved.contains("buckets"), "{saved}");
            let mut again: Window = serde_json::from_str(&saved).unwrap();
            again.adopt(func);
            assert_eq!(again, w);
        }
        // Restored for a rule whose function changed since: empty.
        let mut w = Window::default();
        w.push(0, 1.0, WindowSpec::Time(60_000), AggFn::Rate);
        let mut again: Window = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        again.adopt(AggFn::Avg);
        assert!(again.is_empty());
        assert_eq!(again.value(AggFn::Avg), None);
    }

    #[test]
    fn a_window_left_alone_expires_and_gives_its_buffer_back() {
        let spec = WindowSpec::Time(10_000);
        let mut w = Window::default();
        for at in [0, 4_000, 8_000] {
            w.push(at, 1.0, spec, AggFn::Rate);
        }
        w.expire(13_000, spec);
        assert_eq!(w.len(), 2, "the sample at 0 is older than the window");
        assert_eq!(w.value(AggFn::Rate), Some(0.0));
        w.expire(18_000, spec);
        assert!(w.is_empty());
        assert_eq!(w.spans.capacity(), 0);
        assert_eq!(w.value(AggFn::Rate), None);
        // A count window does not age.
        let mut c = Window::default();
        c.push(0, 1.0, WindowSpec::Count(3), AggFn::Avg);
        c.expire(1_000_000, WindowSpec::Count(3));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn count_window_keeps_the_last_n() {
        let mut w = Window::default();
        for (i, v) in [1.0, 2.0, 3.0, 4.0].into_iter().enumerate() {
            w.push(i as Millis * 1000, v, WindowSpec::Count(3), AggFn::Avg);
        }
        assert_eq!(
            w.samples.capacity(),
            4,
            "3 samples and the one pushed before the oldest goes"
        );
        // A window smaller than the first growth step.
        let mut one = Window::default();
        for i in 0..3 {
            one.push(i * 1000, 1.0, WindowSpec::Count(1), AggFn::Avg);
        }
        assert_eq!(one.samples.capacity(), 2);
        assert_eq!(w.value(AggFn::Avg), Some(3.0));
        assert_eq!(w.value(AggFn::Rate), Some(1.0));
    }

    #[test]
    fn rate_needs_two_distinct_times() {
        for spec in [WindowSpec::Count(5), WindowSpec::Time(60_000)] {
            let mut w = Window::default();
            assert_eq!(w.value(AggFn::Rate), None);
            assert_eq!(w.value(AggFn::Avg), None);
            assert_eq!(w.value(AggFn::Count), Some(0.0));
            w.push(1000, 1.0, spec, AggFn::Rate);
            assert_eq!(w.value(AggFn::Rate), None);
            w.push(1000, 2.0, spec, AggFn::Rate);
            assert_eq!(w.value(AggFn::Rate), None);
        }
    }

    #[test]
    fn span_runs_from_the_oldest_sample_in_the_window_to_the_newest() {
        for spec in [WindowSpec::Count(3), WindowSpec::Time(64_000)] {
            let mut w = Window::default();
            assert_eq!(w.span(), 0, "{spec:?}");
            w.push(1_000, 1.0, spec, AggFn::Rate);
            assert_eq!(w.span(), 0, "{spec:?}");
            w.push(1_400, 1.0, spec, AggFn::Rate);
            w.push(3_500, 1.0, spec, AggFn::Rate);
            assert_eq!(w.span(), 2_500, "{spec:?}");
        }
        // The oldest samples leave: a count window keeps the last 3, a time window drops
        // the spans whose newest sample is a window old.
        let mut count = Window::default();
        let mut time = Window::default();
        for at in [0, 10_000, 20_000, 30_000, 70_000] {
            count.push(at, 1.0, WindowSpec::Count(3), AggFn::Avg);
            time.push(at, 1.0, WindowSpec::Time(64_000), AggFn::Avg);
        }
        assert_eq!(count.span(), 50_000);
        assert_eq!(time.span(), 60_000);
        // An expired window spans nothing.
        time.expire(200_000, WindowSpec::Time(64_000));
        assert_eq!(time.span(), 0);
    }
}
