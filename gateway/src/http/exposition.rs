//! The Prometheus text exposition format (0.0.4), written by a small encoder rather than
//! a metrics crate: the figures already live in atomics and store snapshots, only the text
//! is new, and `prometheus-client` writes OpenMetrics instead (`# EOF`, counters typed
//! without their `_total`), which would change what `ops/` and scrapers read.
//!
//! A family is declared once, with [`Encoder::family`] (name, help, kind) or
//! [`Encoder::histogram`]; its samples then give only their labels and value. The label
//! set of a family is a type ([`Labels`]): one [`Label`] (its name is the type's, its
//! value the instance's), a pair of them, or `()` for none.
//!
//! Invariants:
//! - every family has exactly one `# HELP` and one `# TYPE` line, before its samples, and
//!   every sample of a family has the same label names;
//! - label values are escaped (`\\`, `"`, newline), HELP text too (`\\`, newline);
//! - counters end in `_total`; histograms have cumulative `le` buckets ending in `+Inf`,
//!   with `_sum` and `_count`.

use std::borrow::Cow;
use std::fmt::Write;
use std::marker::PhantomData;

use crate::counters::{HistogramSnapshot, HISTOGRAM_BOUNDS};

/// The Prometheus type of a family of plain samples (histograms: [`Encoder::histogram`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One label: the type fixes its name, the instance its value.
pub trait Label {
    const NAME: &'static str;
    fn value(&self) -> Cow<'_, str>;
}

/// The label set of a family's samples: `()`, one [`Label`] or a pair of them.
pub trait Labels {
    /// Writes `{name="value",..}`, or nothing for an empty set.
    fn write(&self, out: &mut String);
}

impl Labels for () {
    fn write(&self, _: &mut String) {}
}

impl<L: Label> Labels for L {
    fn write(&self, out: &mut String) {
        out.push('{');
        write_label(out, self);
        out.push('}');
    }
}

impl<A: Label, B: Label> Labels for (A, B) {
    fn write(&self, out: &mut String) {
        out.push('{');
        write_label(out, &self.0);
        out.push(',');
        write_label(out, &self.1);
        out.push('}');
    }
}

fn write_label<L: Label>(out: &mut String, label: &L) {
    let _ = write!(out, "{}=\"", L::NAME);
    escape_label(out, &label.value());
    out.push('"');
}

/// The upper bound of a histogram bucket.
struct Le(f64);

impl Label for Le {
    const NAME: &'static str = "le";
    fn value(&self) -> Cow<'_, str> {
        if self.0.is_infinite() {
            "+Inf".into()
        } else {
            self.0.to_string().into()
        }
    }
}

/// Writes families of samples in the text format.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
}

/// The samples of one family, all with the label set `L`.
pub struct Family<'e, L> {
    out: &'e mut String,
    name: &'static str,
    labels: PhantomData<L>,
}

impl Encoder {
    /// Declares a family (its HELP and TYPE lines); write its samples on what it returns.
    pub fn family<L: Labels>(
        &mut self,
        name: &'static str,
        help: &str,
        kind: Kind,
    ) -> Family<'_, L> {
        debug_assert_eq!(kind == Kind::Counter, name.ends_with("_total"), "{name}");
        self.header(name, help, kind.as_str());
        Family {
            out: &mut self.out,
            name,
            labels: PhantomData,
        }
    }

    /// A histogram family of durations in seconds, with the buckets [`HISTOGRAM_BOUNDS`].
    pub fn histogram(&mut self, name: &'static str, help: &str, h: &HistogramSnapshot) {
        self.header(name, help, "histogram");
        let mut cumulative = 0;
        for (i, bound) in HISTOGRAM_BOUNDS.iter().enumerate() {
            cumulative += h.buckets.get(i).copied().unwrap_or(0);
            write_sample(
                &mut self.out,
                name,
                "_bucket",
                &Le(*bound),
                cumulative as f64,
            );
        }
        let count = h.count() as f64;
        write_sample(&mut self.out, name, "_bucket", &Le(f64::INFINITY), count);
        write_sample(&mut self.out, name, "_sum", &(), h.sum_micros as f64 / 1e6);
        write_sample(&mut self.out, name, "_count", &(), count);
    }

    pub fn finish(self) -> String {
        self.out
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
}

impl<L: Labels> Family<'_, L> {
    /// One sample of the family.
    pub fn sample(&mut self, labels: L, value: f64) -> &mut Self {
        write_sample(self.out, self.name, "", &labels, value);
        self
    }
}

impl Family<'_, ()> {
    /// The one sample of an unlabelled family.
    pub fn value(&mut self, value: f64) {
        self.sample((), value);
    }
}

fn write_sample(out: &mut String, name: &str, suffix: &str, labels: &impl Labels, v: f64) {
    out.push_str(name);
    out.push_str(suffix);
    labels.write(out);
    out.push(' ');
    write_value(out, v);
    out.push('\n');
}

fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Histogram;

    struct L(&'static str);

    impl Label for L {
        const NAME: &'static str = "l";
        fn value(&self) -> Cow<'_, str> {
            self.0.into()
        }
    }

    struct K(&'static str);

    impl Label for K {
        const NAME: &'static str = "k";
        fn value(&self) -> Cow<'_, str> {
            self.0.into()
        }
    }

    #[test]
    fn escapes_label_values_and_help() {
        let mut e = Encoder::default();
        e.family("m", "a \\ b\nc", Kind::Gauge)
            .sample(L("x\"y\\z\nw"), 1.5);
        assert_eq!(
            e.finish(),
            "# HELP m a \\\\ b\\nc\n# TYPE m gauge\nm{l=\"x\\\"y\\\\z\\nw\"} 1.5\n"
        );
    }

    #[test]
    fn a_family_names_itself_once_for_all_its_samples() {
        let mut e = Encoder::default();
        e.family("c_total", "help", Kind::Counter)
            .sample((L("a"), K("b")), 1.0)
            .sample((L("c"), K("d")), 2.0);
        e.family("g", "help", Kind::Gauge).value(3.0);
        assert_eq!(
            e.finish(),
            "# HELP c_total help\n# TYPE c_total counter\n\
             c_total{l=\"a\",k=\"b\"} 1\nc_total{l=\"c\",k=\"d\"} 2\n\
             # HELP g help\n# TYPE g gauge\ng 3\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_micros(300); // 0.0003 s: first bucket
        h.observe_micros(2_000_000); // 2 s: bucket 2.5
        h.observe_micros(7_200_000_000); // 2 h: +Inf only
        let mut e = Encoder::default();
        e.histogram("lat_seconds", "help", &h.snapshot());
        let text = e.finish();
        assert!(text.starts_with("# HELP lat_seconds help\n# TYPE lat_seconds histogram\n"));
        for line in [
            "lat_seconds_bucket{le=\"0.0005\"} 1\n",
            "lat_seconds_bucket{le=\"1\"} 1\n",
            "lat_seconds_bucket{le=\"2.5\"} 2\n",
            "lat_seconds_bucket{le=\"3600\"} 2\n",
            "lat_seconds_bucket{le=\"+Inf\"} 3\n",
            "lat_seconds_count 3\n",
            "lat_seconds_sum 7202.0003\n",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
    }
}
