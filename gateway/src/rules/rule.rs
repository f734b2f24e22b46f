//! One compiled rule: what it applies to, when it fires, what it says.
//!
//! Owns [`Rule`] and its parts: [`RuleKind`] (a CEL condition, or absence of readings),
//! [`Aggregate`]s over rolling windows, [`TopicFilter`] and [`DeviceMatch`]; its actions
//! are `action::Action`s.
//! Input: values checked by `load` (this module never sees TOML). Output: matching and
//! condition evaluation for the engine.
//!
//! Invariants:
//! - A `Rule` is immutable once built; CEL programs are compiled once, at load.
//! - Durations are milliseconds, never negative.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::action::Action;
use crate::reading::Millis;

/// A CEL expression compiled once at load (and, when it has the common simple shape, also
/// to native code: see `fast`).
pub struct Expr {
    pub source: String,
    pub program: cel::Program,
    pub(crate) fast: Option<super::fast::Fast>,
}

impl Expr {
    /// Whether evaluation takes the native fast path (else the CEL interpreter).
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

/// What makes a rule's instance hold.
#[derive(Debug)]
pub enum RuleKind {
    /// `condition` holds for a reading; resolves when `clear` holds (default: `condition`
    /// no longer holds).
    Condition {
        condition: Box<Expr>,
        clear: Option<Box<Expr>>,
    },
    /// No matching reading from a device for `after` ms; the next reading resolves it.
    Absence { after: Millis },
}

impl RuleKind {
    pub fn name(&self) -> &'static str {
        match self {
            RuleKind::Condition { .. } => "condition",
            RuleKind::Absence { .. } => "absence",
        }
    }
}

/// A rolling aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggFn {
    Avg,
    Min,
    Max,
    Count,
    /// Change per second between the oldest and newest sample in the window.
    Rate,
}

impl AggFn {
    pub const NAMES: &'static str = "avg, min, max, count, rate";

    pub fn parse(s: &str) -> Option<AggFn> {
        Some(match s {
            "avg" => AggFn::Avg,
            "min" => AggFn::Min,
            "max" => AggFn::Max,
            "count" => AggFn::Count,
            "rate" => AggFn::Rate,
            _ => return None,
        })
    }
}

/// How far back a window reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSpec {
    /// Samples no older than this many ms.
    Time(Millis),
    /// The last N samples.
    Count(usize),
}

/// A named aggregate of one field, readable in conditions as `agg.NAME`.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub name: String,
    pub field: String,
    pub func: AggFn,
    pub window: WindowSpec,
    /// The aggregate has no value until the samples in its window span at least this
    /// many ms (oldest to newest); 0: from the samples its function needs.
    pub min_span: Millis,
}

impl Aggregate {
    /// Whether a window kept for `other` holds the samples this aggregate needs: the same
    /// name, field, function and window (`min_span` only reads the window).
    pub fn same_window(&self, other: &Aggregate) -> bool {
        self.name == other.name
            && self.field == other.field
            && self.func == other.func
            && self.window == other.window
    }
}

/// An MQTT topic filter (`+` one level, `#` the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(pub String);

impl TopicFilter {
    /// Checks the filter syntax; returns the problem in words.
    pub fn parse(s: &str) -> Result<TopicFilter, String> {
        if s.is_empty() {
            return Err("topic filter is empty".into());
        }
        let levels: Vec<&str> = s.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
                return Err(format!(
                    "`#` must be a whole level and the last one in {s:?}"
                ));
            }
            if level.contains('+') && *level != "+" {
                return Err(format!("`+` must be a whole level in {s:?}"));
            }
        }
        Ok(TopicFilter(s.to_string()))
    }

    pub fn matches(&self, topic: &str) -> bool {
        let mut filter = self.0.split('/');
        let mut levels = topic.split('/');
        loop {
            match (filter.next(), levels.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(l)) if f == l => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

/// A device id pattern: `*` any run of characters, `?` one character, else literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMatch(pub String);

impl DeviceMatch {
    pub fn matches(&self, device: &str) -> bool {
        glob(self.0.as_bytes(), device.as_bytes())
    }
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One rule, compiled.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    /// The file it was loaded from (as given to the loader).
    pub file: String,
    /// The CloudEvents `type` of its events.
    pub event: String,
    pub description: Option<String>,
    pub stream: Option<String>,
    pub topic: Option<TopicFilter>,
    pub device: Option<DeviceMatch>,
    pub kind: RuleKind,
    /// How long the condition must hold before firing (ms).
    pub for_ms: Millis,
    /// How long to keep firing after the clear condition holds (ms).
    pub keep_firing_for_ms: Millis,
    /// After resolving, how long before the instance may fire again (ms).
    pub cooldown_ms: Millis,
    pub severity: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub aggregates: Vec<Aggregate>,
    /// What it publishes when an instance fires or resolves (shared, so the rules stage can
    /// keep a removed rule's actions for its last resolution).
    pub actions: Arc<[Action]>,
}

impl Rule {
    /// Whether the rule applies to a reading with this stream, topic and device.
    pub fn applies_to(&self, stream: &str, topic: &str, device: &str) -> bool {
        self.stream.as_deref().is_none_or(|s| s == stream)
            && self.topic.as_ref().is_none_or(|f| f.matches(topic))
            && self.device.as_ref().is_none_or(|d| d.matches(device))
    }

    /// Two versions of a rule share instance state across a reload only when they announce
    /// the same event type and hold for the same kind of reason.
    pub(crate) fn same_identity(&self, other: &Rule) -> bool {
        self.name == other.name
            && self.event == other.event
            && self.kind.name() == other.kind.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_follow_mqtt_wildcards() {
        let f = TopicFilter::parse("devices/+/telemetry").unwrap();
        assert!(f.matches("devices/t-1/telemetry"));
        assert!(!f.matches("devices/t-1/status"));
        assert!(!f.matches("devices/t-1/telemetry/x"));
        let all = TopicFilter::parse("devices/#").unwrap();
        assert!(all.matches("devices"));
        assert!(all.matches("devices/a/b/c"));
        assert!(!all.matches("other/a"));
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b+").is_err());
        assert!(TopicFilter::parse("").is_err());
    }

    #[test]
    fn device_globs() {
        let m = DeviceMatch("t-*".into());
        assert!(m.matches("t-17"));
        assert!(m.matches("t-"));
        assert!(!m.matches("h-17"));
        assert!(DeviceMatch("*-1?".into()).matches("abc-17"));
        assert!(!DeviceMatch("*-1?".into()).matches("abc-1"));
        assert!(DeviceMatch("exact".into()).matches("exact"));
        assert!(!DeviceMatch("exact".into()).matches("exactly"));
    }
}
