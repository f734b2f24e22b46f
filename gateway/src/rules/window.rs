//! Rolling windows: the samples behind one aggregate of one (rule, device) instance.
//!
//! Owns [`Window`]. Input: (time, value) samples of one field, pushed in time order.
//! Output: avg / min / max / count / rate over the samples still in the window.
//!
//! Invariants:
//! - A time window keeps samples with `time > newest - window`; a count window keeps the
//!   last N. Memory per window is bounded by the count or by the reading rate x window.
//! - `rate` is (newest - oldest) / seconds between them; it has no value with fewer than two
//!   samples or when they share one timestamp.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::rule::{AggFn, WindowSpec};
use crate::reading::Millis;

/// The samples of one aggregate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    samples: VecDeque<(Millis, f64)>,
}

impl Window {
    /// Adds a sample and drops those that left the window.
    pub fn push(&mut self, at: Millis, value: f64, spec: WindowSpec) {
        self.samples.push_back((at, value));
        match spec {
            WindowSpec::Time(ms) => {
                while self.samples.front().is_some_and(|(t, _)| *t <= at - ms) {
                    self.samples.pop_front();
                }
            }
            WindowSpec::Count(n) => {
                while self.samples.len() > n {
                    self.samples.pop_front();
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The aggregate's value, if the window holds enough samples for it.
    pub fn value(&self, func: AggFn) -> Option<f64> {
        let values = self.samples.iter().map(|(_, v)| *v);
        match func {
            AggFn::Count => Some(self.samples.len() as f64),
            _ if self.samples.is_empty() => None,
            AggFn::Avg => Some(values.sum::<f64>() / self.samples.len() as f64),
            AggFn::Min => values.reduce(f64::min),
            AggFn::Max => values.reduce(f64::max),
            AggFn::Rate => {
                let (t0, v0) = self.samples.front()?;
                let (t1, v1) = self.samples.back()?;
                (t1 > t0).then(|| (v1 - v0) / ((t1 - t0) as f64 / 1000.0))
            }
        }
    }
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
    fn count_window_keeps_the_last_n() {
        let mut w = Window::default();
        for (i, v) in [1.0, 2.0, 3.0, 4.0].into_iter().enumerate() {
            w.push(i as Millis * 1000, v, WindowSpec::Count(3));
        }
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
