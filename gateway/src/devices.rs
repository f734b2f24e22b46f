//! The device read model: for each device, its last values, when it was last seen and how
//! many messages it sent. Derived from the decoded stream (CQRS: the write path is the
//! outbox and the event log; this is a query side kept in memory), served by the HTTP API.
//!
//! Input: [`Devices::observe`], called by the decode stage once per decoded message.
//! Output: [`Devices::list`], a sorted copy for readers.
//!
//! Invariants:
//! - bounded: at most `max` devices; beyond it the least recently seen tenth is evicted in
//!   one pass, so a flood of new ids costs amortised O(1) per message, not a scan each;
//! - cheap on the hot path: one short mutex hold per message; a known device's known fields
//!   are updated in place (numbers and booleans without allocating);
//! - volatile: a restart starts empty and fills again as devices publish.

use std::collections::BTreeMap;
use std::sync::Mutex;

use compact_str::CompactString;
use serde::Serialize;

use crate::hashing::FastHashMap;
use crate::reading::{Millis, Reading, Value};

/// Devices kept by default.
pub const DEFAULT_MAX_DEVICES: usize = 10_000;

/// What the read model knows about one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceView {
    pub device: String,
    /// When the gateway last received a message from it (Unix ms).
    pub last_seen: Millis,
    /// Messages decoded since the gateway started (or since it was evicted).
    pub messages: u64,
    /// The stream and time of the last reading.
    pub stream: String,
    pub time: Millis,
    /// The last value of every field seen, across streams.
    pub values: BTreeMap<String, Value>,
}

/// Names (device ids, streams, field names) are `CompactString`s: up to 24 bytes are kept
/// inline, in the map's slot or the vector of values, not in a heap block of their own.
/// Every message compares its device's id, stream and field names with these, and with
/// thousands of devices the blocks were not in the cache: each comparison waited for
/// memory (the registry was about 2% of the gateway's CPU samples at 1000 devices x 10/s,
/// most of it in `memcmp`; BENCHMARKS.md, "Fewer allocations and cache misses per reading").
#[derive(Debug)]
struct Entry {
    last_seen: Millis,
    messages: u64,
    stream: CompactString,
    time: Millis,
    /// The last value of each field, sorted by name. A device has a few fields: a vector
    /// of them (room for four, 192 bytes) takes about a third of the memory of a map's
    /// first node (544 bytes), which every device held.
    values: Vec<(CompactString, Value)>,
}

/// The shared read model; put it in an `Arc`.
#[derive(Debug)]
pub struct Devices {
    max: usize,
    map: Mutex<FastHashMap<CompactString, Entry>>,
}

impl Default for Devices {
    fn default() -> Self {
        Devices::new(DEFAULT_MAX_DEVICES)
    }
}

impl Devices {
    pub fn new(max: usize) -> Devices {
        Devices {
            max: max.max(1),
            map: Mutex::new(FastHashMap::default()),
        }
    }

    /// Records one decoded message (all its readings are from one device).
    pub fn observe(&self, readings: &[Reading], received_at: Millis) {
        let Some(first) = readings.first() else {
            return;
        };
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        // One lookup for a known device (the hot path); a new one is filled, then inserted.
        match map.get_mut(first.device.as_str()) {
            Some(entry) => update(entry, readings, received_at),
            None => {
                if map.len() >= self.max {
                    evict_oldest(&mut map, self.max / 10 + 1);
                }
                let mut entry = Entry {
                    last_seen: received_at,
                    messages: 0,
                    stream: CompactString::default(),
                    time: 0,
                    values: Vec::new(),
                };
                update(&mut entry, readings, received_at);
                map.insert(CompactString::from(first.device.as_str()), entry);
            }
        }
    }

    /// Every device, most recently seen first.
    pub fn list(&self) -> Vec<DeviceView> {
        let Ok(map) = self.map.lock() else {
            return Vec::new();
        };
        let mut out: Vec<DeviceView> = map
            .iter()
            .map(|(id, e)| DeviceView {
                device: id.to_string(),
                last_seen: e.last_seen,
                messages: e.messages,
                stream: e.stream.to_string(),
                time: e.time,
                values: e
                    .values
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.clone()))
                    .collect(),
            })
            .collect();
        drop(map);
        out.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.device.cmp(&b.device)));
        out
    }

    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Records one message's readings in its device's entry.
fn update(entry: &mut Entry, readings: &[Reading], received_at: Millis) {
    entry.last_seen = received_at;
    entry.messages += 1;
    for reading in readings {
        if entry.stream != reading.stream {
            entry.stream = CompactString::from(reading.stream.as_str());
        }
        entry.time = reading.time;
        for (name, value) in &reading.fields {
            match entry.values.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
                Ok(at) => set_value(&mut entry.values[at].1, value),
                Err(at) => entry
                    .values
                    .insert(at, (CompactString::from(name.as_str()), value.clone())),
            }
        }
    }
}

/// Overwrites a value without allocating when the kinds match.
fn set_value(slot: &mut Value, value: &Value) {
    match (slot, value) {
        (Value::Text(old), Value::Text(new)) => old.clone_from(new),
        (slot, value) => *slot = value.clone(),
    }
}

/// Removes the `n` least recently seen devices.
fn evict_oldest(map: &mut FastHashMap<CompactString, Entry>, n: usize) {
    let mut seen: Vec<Millis> = map.values().map(|e| e.last_seen).collect();
    let n = n.min(seen.len());
    if n == 0 {
        return;
    }
    let (_, cutoff, _) = seen.select_nth_unstable(n - 1);
    let cutoff = *cutoff;
    let mut removed = 0;
    map.retain(|_, e| {
        if removed < n && e.last_seen <= cutoff {
            removed += 1;
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Format;

    fn reading(device: &str, temp: f64, time: Millis) -> Reading {
        Reading {
            device: device.into(),
            stream: "telemetry".into(),
            topic: format!("devices/{device}/telemetry"),
            time,
            fields: BTreeMap::from([("temp".to_string(), Value::Number(temp))]),
            units: BTreeMap::new(),
            format: Format::Json,
        }
    }

    #[test]
    fn keeps_the_last_values_and_counts_messages() {
        let devices = Devices::new(10);
        devices.observe(&[reading("a", 1.0, 10)], 100);
        devices.observe(&[reading("a", 2.0, 20)], 200);
        devices.observe(&[reading("b", 5.0, 30)], 150);
        let list = devices.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].device, "a");
        assert_eq!(list[0].messages, 2);
        assert_eq!(list[0].last_seen, 200);
        assert_eq!(list[0].time, 20);
        assert_eq!(list[0].values["temp"], Value::Number(2.0));
        assert_eq!(list[1].device, "b");
    }

    #[test]
    fn fields_from_different_messages_keep_their_last_values() {
        let devices = Devices::new(10);
        let with = |fields: &[(&str, Value)]| Reading {
            fields: fields
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect(),
            ..reading("a", 0.0, 1)
        };
        let text = |t: &str| Value::Text(t.into());
        devices.observe(&[with(&[("m", Value::Number(1.0)), ("x", text("on"))])], 1);
        devices.observe(
            &[with(&[("b", Value::Bool(true)), ("m", Value::Number(2.0))])],
            2,
        );
        devices.observe(&[with(&[("x", text("off")), ("z", Value::Number(3.0))])], 3);
        devices.observe(
            &[with(&[
                ("a", Value::Number(4.0)),
                ("x", Value::Number(5.0)),
            ])],
            4,
        );
        let list = devices.list();
        let expected = BTreeMap::from([
            ("a".to_string(), Value::Number(4.0)),
            ("b".to_string(), Value::Bool(true)),
            ("m".to_string(), Value::Number(2.0)),
            ("x".to_string(), Value::Number(5.0)),
            ("z".to_string(), Value::Number(3.0)),
        ]);
        assert_eq!(list[0].values, expected);
        assert_eq!(list[0].messages, 4);
    }

    #[test]
    fn evicts_the_least_recently_seen_beyond_the_bound() {
        let devices = Devices::new(20);
        for i in 0..20 {
            devices.observe(&[reading(&format!("d{i}"), 1.0, i)], 1000 + i);
        }
        // d0 is seen again, so it is no longer the oldest.
        devices.observe(&[reading("d0", 1.0, 99)], 2000);
        devices.observe(&[reading("new", 1.0, 100)], 3000);
        let ids: Vec<String> = devices.list().into_iter().map(|d| d.device).collect();
        assert!(ids.len() <= 20, "{ids:?}");
        assert!(ids.contains(&"new".to_string()));
        assert!(ids.contains(&"d0".to_string()));
        assert!(!ids.contains(&"d1".to_string()), "{ids:?}");
        assert!(ids.contains(&"d19".to_string()));
    }
}
