//! Rolling windows: the samples behind one aggregate of one (rule, device) instance.
//!
//! Owns [`Window`]. Input: (time, value) samples of one field, pushed in time order.
//! Output: avg / min / max / count / rate over the samples still in the window.
//!
//! Invariants:
//! - A count window keeps the last N samples.
//! - A time window keeps per-bucket summaries (count, sum, min, max, first and last
//!   sample) in at most [`TIME_BUCKETS`] + 1 buckets of `window / TIME_BUCKETS` each, so
//!   its memory does not grow with the reading rate. A bucket leaves the window when its
//!   newest sample is at least one window old: the window's oldest edge is exact to one
//!   bucket width (1/64 of the window).
//! - `rate` is (newest - oldest) / seconds between them; it has no value with fewer than two
//!   samples or when they share one timestamp.
//! - A window's buffer grows by doubling up to what it can hold at most (N + 1 samples,
//!   [`TIME_BUCKETS`] + 2 buckets) and no further: a full one-minute window is 66
//!   buckets, not the 128 that doubling would reserve (a window per aggregate, per rule,
//!   per device is the bulk of the rules' memory).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::rule::{AggFn, WindowSpec};
use crate::reading::Millis;

/// Buckets a time window is divided into.
pub const TIME_BUCKETS: Millis = 64;

/// The samples of one aggregate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Count windows: the samples themselves.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    samples: VecDeque<(Millis, f64)>,
    /// Time windows: one summary per bucket, oldest first.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    buckets: VecDeque<Bucket>,
}

/// The samples of one bucket of a time window, summarised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Bucket {
    start: Millis,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: (Millis, f64),
    last: (Millis, f64),
}

impl Window {
    /// Adds a sample and drops those that left the window.
    pub fn push(&mut self, at: Millis, value: f64, spec: WindowSpec) {
        match spec {
            WindowSpec::Time(ms) => {
                let width = (ms / TIME_BUCKETS).max(1);
                let start = at - at.rem_euclid(width);
                match self.buckets.back_mut() {
                    Some(b) if b.start == start => {
                        b.count += 1;
                        b.sum += value;
                        b.min = b.min.min(value);
                        b.max = b.max.max(value);
                        b.last = (at, value);
                    }
                    _ => push_bounded(
                        &mut self.buckets,
                        TIME_BUCKETS as usize + 2,
                        Bucket {
                            start,
                            count: 1,
                            sum: value,
                            min: value,
                            max: value,
                            first: (at, value),
                            last: (at, value),
                        },
                    ),
                }
                while self.buckets.front().is_some_and(|b| b.last.0 <= at - ms) {
                    self.buckets.pop_front();
                }
            }
            WindowSpec::Count(n) => {
                push_bounded(&mut self.samples, n + 1, (at, value));
                while self.samples.len() > n {
                    self.samples.pop_front();
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len() + self.buckets.iter().map(|b| b.count as usize).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty() && self.buckets.is_empty()
    }

    /// The aggregate's value, if the window holds enough samples for it.
    pub fn value(&self, func: AggFn) -> Option<f64> {
        if !self.buckets.is_empty() {
            return self.bucket_value(func);
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

    fn bucket_value(&self, func: AggFn) -> Option<f64> {
        let count: u64 = self.buckets.iter().map(|b| b.count).sum();
        match func {
            AggFn::Count => Some(count as f64),
            AggFn::Avg => Some(self.buckets.iter().map(|b| b.sum).sum::<f64>() / count as f64),
            AggFn::Min => self.buckets.iter().map(|b| b.min).reduce(f64::min),
            AggFn::Max => self.buckets.iter().map(|b| b.max).reduce(f64::max),
            AggFn::Rate => rate(self.buckets.front()?.first, self.buckets.back()?.last),
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

    #[test]
    fn time_window_drops_old_samples() {
        let mut w = Window::default();
        let spec = WindowSpec::Time(10_000);
        w.push(0, 10.0, spec);
        w.push(5_000, 20.0, spec);
        assert_eq!(w.value(AggFn::Avg), Some(15.0));
        w.push(10_000, 30.0, spec);
        // The sample at 0 is exactly one window old: out.
        assert_eq!(w.len(), 2);
        assert_eq!(w.value(AggFn::Min), Some(20.0));
        assert_eq!(w.value(AggFn::Max), Some(30.0));
        assert_eq!(w.value(AggFn::Count), Some(2.0));
        assert_eq!(w.value(AggFn::Rate), Some(2.0));
    }

    #[test]
    fn time_window_memory_does_not_grow_with_the_rate() {
        let mut w = Window::default();
        let spec = WindowSpec::Time(60_000);
        // 2000 samples a second for two minutes.
        for i in 0..240_000i64 {
            w.push(i / 2, (i % 100) as f64, spec);
        }
        assert!(
            w.buckets.len() <= TIME_BUCKETS as usize + 1,
            "{} buckets",
            w.buckets.len()
        );
        assert_eq!(w.buckets.capacity(), TIME_BUCKETS as usize + 2);
        let count = w.value(AggFn::Count).unwrap();
        assert!((120_000.0..=122_000.0).contains(&count), "{count}");
        assert_eq!(w.value(AggFn::Min), Some(0.0));
        assert_eq!(w.value(AggFn::Max), Some(99.0));
    }

    #[test]
    fn count_window_keeps_the_last_n() {
        let mut w = Window::default();
        for (i, v) in [1.0, 2.0, 3.0, 4.0].into_iter().enumerate() {
            w.push(i as Millis * 1000, v, WindowSpec::Count(3));
        }
        assert_eq!(
            w.samples.capacity(),
            4,
            "3 samples and the one pushed before the oldest goes"
        );
        // A window smaller than the first growth step.
        let mut one = Window::default();
        for i in 0..3 {
            one.push(i * 1000, 1.0, WindowSpec::Count(1));
        }
        assert_eq!(one.samples.capacity(), 2);
        assert_eq!(w.value(AggFn::Avg), Some(3.0));
        assert_eq!(w.value(AggFn::Rate), Some(1.0));
    }

    #[test]
    fn rate_needs_two_distinct_times() {
        let mut w = Window::default();
        assert_eq!(w.value(AggFn::Rate), None);
        assert_eq!(w.value(AggFn::Avg), None);
        assert_eq!(w.value(AggFn::Count), Some(0.0));
        w.push(1000, 1.0, WindowSpec::Count(5));
        assert_eq!(w.value(AggFn::Rate), None);
        w.push(1000, 2.0, WindowSpec::Count(5));
        assert_eq!(w.value(AggFn::Rate), None);
    }
}
