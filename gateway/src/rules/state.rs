//! The engine's state: per-instance state machines, and their persisted form.
//!
//! Owns [`Instance`], [`InstanceState`], [`Values`], [`EngineState`] (what the caller
//! persists, e.g. in redb, and hands back to `Engine::restore`), and the status and
//! counter types. Input/output: plain data, serde-serializable; no behaviour beyond
//! construction and keeping [`Values`] sorted.
//!
//! Invariants:
//! - `EngineState` names rules by name, event type and kind, never by index, so it survives
//!   edits of the rule files; `version` changes when the layout does.
//! - An `Instance` has one window per aggregate of its rule, in declaration order.
//! - `Values` are sorted by key, without repeats, and saved as a JSON object.

use std::collections::BTreeMap;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use super::rule::Rule;
use super::window::Window;
use crate::reading::{Millis, Value};

/// The version of [`EngineState`]'s layout.
pub const STATE_VERSION: u32 = 1;
/// `data.reason` of a resolution caused by a reload that removed or changed the rule.
pub const REASON_RULE_REMOVED: &str = "rule-removed";

/// Where one (rule, device) instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum InstanceState {
    Inactive,
    /// The condition has held since `since`; fires at `since + for` (and not in cooldown).
    Pending {
        since: Millis,
    },
    /// Firing since `since`; `clearing_since` is when the clear condition began to hold.
    Firing {
        since: Millis,
        clearing_since: Option<Millis>,
    },
}

impl InstanceState {
    pub fn name(&self) -> &'static str {
        match self {
            InstanceState::Inactive => "inactive",
            InstanceState::Pending { .. } => "pending",
            InstanceState::Firing { .. } => "firing",
        }
    }
}

/// The state of one (rule, device) instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub state: InstanceState,
    /// The time of the last reading the rule applied to.
    pub last_seen: Millis,
    /// When it last resolved (for `cooldown`).
    pub resolved_at: Option<Millis>,
    /// The values (and aggregates as `agg.NAME`) of the reading that started the current
    /// state (made the condition hold, or the clear condition hold); for absence rules, of
    /// the last reading. Copied into events.
    pub values: Values,
    /// One window per aggregate of the rule, in declaration order.
    pub windows: Vec<Window>,
}

impl Instance {
    pub(super) fn new(rule: &Rule, now: Millis) -> Instance {
        Instance {
            state: InstanceState::Inactive,
            last_seen: now,
            resolved_at: None,
            values: Values::default(),
            windows: vec![Window::default(); rule.aggregates.len()],
        }
    }
}

/// What an instance shows in its events: field (or `agg.NAME`) -> value, sorted by key in
/// one array of exactly its size. An instance keeps a handful of them, where a `BTreeMap`
/// takes a node of 11 slots (about 0.6 KB) however few it holds; an absence rule keeps
/// one per device. Saved as a JSON object, as the map was. Keys of up to 24 bytes are
/// kept inline in the array (`CompactString`): every reading compares them with its
/// fields, and keys in heap blocks of their own were cache misses with many devices.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values(Vec<(CompactString, Value)>);

impl Values {
    /// The values as an event carries them.
    pub fn to_map(&self) -> BTreeMap<String, Value> {
        (self.0.iter())
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    pub fn into_map(self) -> BTreeMap<String, Value> {
        (self.0.into_iter())
            .map(|(k, v)| (k.into_string(), v))
            .collect()
    }

    /// Overwrites the values with `fields` when their keys are the same: no allocation
    /// for numbers and booleans. False, and nothing changed, when the keys differ.
    pub(super) fn overwrite(&mut self, fields: &BTreeMap<String, Value>) -> bool {
        if fields.len() != self.0.len() || !fields.keys().eq(self.0.iter().map(|(k, _)| k)) {
            return false;
        }
        for (value, (_, slot)) in fields.values().zip(&mut self.0) {
            slot.clone_from(value);
        }
        true
    }

    /// Replaces the values with `entries` (sorted by key, no repeats), keeping the key
    /// strings it has for the keys that stay.
    pub(super) fn replace<'a>(&mut self, entries: impl Iterator<Item = (&'a str, Value)>) {
        // Both sorted by key: one walk of the old values alongside the new ones.
        let mut old = std::mem::take(&mut self.0).into_iter().peekable();
        let mut new = Vec::with_capacity(entries.size_hint().0);
        for (key, value) in entries {
            while old.next_if(|(k, _)| k.as_str() < key).is_some() {}
            let key = match old.next_if(|(k, _)| k == key) {
                Some((kept, _)) => kept,
                None => CompactString::from(key),
            };
            new.push((key, value));
        }
        self.0 = new;
    }
}

impl From<BTreeMap<String, Value>> for Values {
    fn from(map: BTreeMap<String, Value>) -> Values {
        Values(
            (map.into_iter())
                .map(|(k, v)| (CompactString::from(k), v))
                .collect(),
        )
    }
}

impl Serialize for Values {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k.as_str(), v)))
    }
}

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Values, D::Error> {
        BTreeMap::<String, Value>::deserialize(deserializer).map(Values::from)
    }
}

/// One instance in the persisted state. [`InstanceRecordRef`] writes the same fields, in
/// the same order, when one device is saved: a field added here goes there too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub rule: String,
    /// The rule's event type and kind when saved: a rule that changed either starts afresh.
    pub event: String,
    pub kind: String,
    pub severity: String,
    pub device: String,
    pub instance: Instance,
}

/// An [`InstanceRecord`] borrowed from the engine: what saving one device's state
/// writes, the same JSON without copying its instances (a save allocated about a
/// hundred times for five rules' copies).
#[derive(Debug, Serialize)]
pub struct InstanceRecordRef<'a> {
    pub rule: &'a str,
    pub event: &'a str,
    pub kind: &'a str,
    pub severity: &'a str,
    pub device: &'a str,
    pub instance: &'a Instance,
}

/// Everything the engine must remember across a restart (serde: store it as JSON or CBOR).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    pub version: u32,
    pub instances: Vec<InstanceRecord>,
}

/// One line of the status listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceStatus {
    pub rule: String,
    pub device: String,
    pub state: InstanceState,
    pub last_seen: Millis,
}

/// Counters (never reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub readings: u64,
    pub evaluations: u64,
    pub eval_errors: u64,
    pub events: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_save_as_the_map_did_and_keep_their_keys_sorted() {
        let map: BTreeMap<String, Value> = [
            ("temperature".to_string(), Value::Number(21.5)),
            ("agg.avg".to_string(), Value::Number(20.0)),
            ("state".to_string(), Value::Text("ok".into())),
        ]
        .into();
        let values = Values::from(map.clone());
        let json = serde_json::to_string(&values).unwrap();
        assert_eq!(json, serde_json::to_string(&map).unwrap());
        let back: Values = serde_json::from_str(&json).unwrap();
        assert_eq!(back, values);
        let keys: Vec<&str> = back.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["agg.avg", "state", "temperature"]);
        assert_eq!(back.into_map(), map);
    }
}
