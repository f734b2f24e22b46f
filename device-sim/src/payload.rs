//! Payload encoding for simulated readings, and the reverse: finding the
//! `(device, seq, ts)` stamps in whatever a subscriber receives.
//!
//! Inputs: a [`Sample`] (send time, per-device sequence number, named numeric
//! fields with optional units). Outputs: the bytes of one MQTT payload in one of
//! the four [`Format`]s the gateway decodes; and, for the bench subscriber,
//! [`stamps`] which turns a received payload back into stamps.
//!
//! Invariants:
//! - every well-formed payload carries `ts` (Unix milliseconds at send time) and
//!   `seq` (per-device counter from 0); SenML carries them as `bt` (seconds,
//!   fractional) and a record named `seq`.
//! - [`stamps`] accepts a single reading, an array of readings (gateway
//!   batching), or a SenML pack (possibly several readings concatenated), each in
//!   JSON or CBOR; it never panics on arbitrary bytes.
//! - [`MALFORMED`] payloads decode as none of the four formats.
//! - all CBOR goes through this module (serde_cbor is archived upstream).

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};

/// The wire format of a simulated device's payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Json,
    Cbor,
    SenmlJson,
    SenmlCbor,
}

impl Format {
    pub const ALL: [Format; 4] = [
        Format::Json,
        Format::Cbor,
        Format::SenmlJson,
        Format::SenmlCbor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
            Format::SenmlJson => "senml-json",
            Format::SenmlCbor => "senml-cbor",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown format `{s}` (json, cbor, senml-json, senml-cbor)"))
    }
}

/// Payloads that are none of the supported formats, used for malformed injection.
pub const MALFORMED: [&[u8]; 3] = [b"not json {", b"{\"ts\":", b"\xff\x00garbage"];

/// One field of a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Field<'a> {
    pub name: &'a str,
    pub unit: Option<&'a str>,
    pub value: f64,
}

/// One reading as a device sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub device: &'a str,
    /// Send time, Unix milliseconds.
    pub ts: i64,
    /// Per-device sequence number, from 0.
    pub seq: u64,
    pub fields: &'a [Field<'a>],
}

/// Errors from encoding a sample.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("JSON encoding failed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("CBOR encoding failed: {0}")]
    Cbor(#[from] serde_cbor::Error),
}

/// Encodes `sample` in `format`.
pub fn encode(sample: &Sample<'_>, format: Format) -> Result<Vec<u8>, PayloadError> {
    Ok(match format {
        Format::Json => serde_json::to_vec(&Flat(sample))?,
        Format::Cbor => serde_cbor::to_vec(&Flat(sample))?,
        Format::SenmlJson => serde_json::to_vec(&Pack {
            sample,
            labels: Labels::Text,
        })?,
        Format::SenmlCbor => serde_cbor::to_vec(&Pack {
            sample,
            labels: Labels::Int,
        })?,
    })
}

/// `{"ts":..,"seq":..,"temperature":..}`
struct Flat<'s, 'a>(&'s Sample<'a>);

impl Serialize for Flat<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2 + self.0.fields.len()))?;
        map.serialize_entry("ts", &self.0.ts)?;
        map.serialize_entry("seq", &self.0.seq)?;
        for f in self.0.fields {
            map.serialize_entry(f.name, &f.value)?;
        }
        map.end()
    }
}

#[derive(Clone, Copy)]
enum Labels {
    Text,
    Int,
}

/// A SenML pack: first field record carries `bn` and `bt`, then `seq`, then the rest.
struct Pack<'s, 'a> {
    sample: &'s Sample<'a>,
    labels: Labels,
}

impl Serialize for Pack<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let sample = self.sample;
        let base_name = format!("{}/", sample.device);
        let base_time = sample.ts as f64 / 1000.0;
        let mut seq = s.serialize_seq(Some(1 + sample.fields.len().max(1)))?;
        let seq_record = Record {
            labels: self.labels,
            bn: None,
            bt: None,
            n: "seq",
            u: None,
            v: Num::Int(sample.seq),
        };
        match sample.fields.split_first() {
            Some((first, rest)) => {
                seq.serialize_element(&Record {
                    labels: self.labels,
                    bn: Some(&base_name),
                    bt: Some(base_time),
                    n: first.name,
                    u: first.unit,
                    v: Num::Float(first.value),
                })?;
                seq.serialize_element(&seq_record)?;
                for f in rest {
                    seq.serialize_element(&Record {
                        labels: self.labels,
                        bn: None,
                        bt: None,
                        n: f.name,
                        u: f.unit,
                        v: Num::Float(f.value),
                    })?;
                }
            }
            None => seq.serialize_element(&Record {
                bn: Some(&base_name),
                bt: Some(base_time),
                ..seq_record
            })?,
        }
        seq.end()
    }
}

struct Record<'a> {
    labels: Labels,
    bn: Option<&'a str>,
    bt: Option<f64>,
    n: &'a str,
    u: Option<&'a str>,
    v: Num,
}

/// A SenML value: `seq` stays an integer on the wire.
#[derive(Serialize)]
#[serde(untagged)]
enum Num {
    Int(u64),
    Float(f64),
}

impl Serialize for Record<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let len = 2 + usize::from(self.bn.is_some()) * 2 + usize::from(self.u.is_some());
        let mut map = s.serialize_map(Some(len))?;
        macro_rules! entry {
            ($text:literal, $int:literal, $value:expr) => {
                match self.labels {
                    Labels::Text => map.serialize_entry($text, $value)?,
                    Labels::Int => map.serialize_entry(&($int as i64), $value)?,
                }
            };
        }
        if let Some(bn) = self.bn {
            entry!("bn", -2, bn);
        }
        if let Some(bt) = self.bt {
            entry!("bt", -3, &bt);
        }
        entry!("n", 0, self.n);
        if let Some(u) = self.u {
            entry!("u", 1, u);
        }
        entry!("v", 2, &self.v);
        map.end()
    }
}

/// What a subscriber can say about one received reading.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub device: String,
    pub seq: u64,
    /// Send time, Unix milliseconds.
    pub ts: i64,
}

/// Finds the readings in a received payload. `topic` supplies the device id
/// (the segment after `devices/`) when the payload does not (non-SenML).
/// Returns `None` when the payload is not a reading, an array of readings, or a
/// SenML pack in JSON or CBOR.
pub fn stamps(topic: &str, payload: &[u8]) -> Option<Vec<Stamp>> {
    let topic_device = device_from_topic(topic);
    let value: serde_cbor::Value = match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(json) => json_to_cbor(json),
        Err(_) => serde_cbor::from_slice(payload).ok()?,
    };
    stamps_in(&value, topic_device)
}

/// The device id in `.../devices/{id}/...`.
pub fn device_from_topic(topic: &str) -> Option<&str> {
    let mut parts = topic.split('/');
    parts.find(|p| *p == "devices")?;
    parts.next().filter(|d| !d.is_empty())
}

fn json_to_cbor(v: serde_json::Value) -> serde_cbor::Value {
    use serde_cbor::Value as C;
    use serde_json::Value as J;
    match v {
        J::Null => C::Null,
        J::Bool(b) => C::Bool(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => C::Integer(i.into()),
            None => C::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => C::Text(s),
        J::Array(a) => C::Array(a.into_iter().map(json_to_cbor).collect()),
        J::Object(o) => C::Map(
            o.into_iter()
                .map(|(k, v)| (C::Text(k), json_to_cbor(v)))
                .collect(),
        ),
    }
}

fn stamps_in(value: &serde_cbor::Value, topic_device: Option<&str>) -> Option<Vec<Stamp>> {
    use serde_cbor::Value as C;
    match value {
        C::Map(_) => Some(vec![flat_stamp(value, topic_device)?]),
        C::Array(items) if items.iter().any(is_senml_record) => senml_stamps(items, topic_device),
        // The gateway's upstream batch: each element carries the reading's topic and its
        // original payload.
        C::Array(items) if !items.is_empty() && items.iter().all(is_batch_element) => {
            let mut out = Vec::new();
            for item in items {
                let device = match get(item, "topic", None)? {
                    C::Text(topic) => device_from_topic(topic),
                    _ => None,
                };
                out.extend(stamps_in(get(item, "payload", None)?, device)?);
            }
            Some(out)
        }
        C::Array(items) => items
            .iter()
            .map(|item| flat_stamp(item, topic_device))
            .collect(),
        _ => None,
    }
}

fn get<'v>(
    map: &'v serde_cbor::Value,
    text: &str,
    int: Option<i128>,
) -> Option<&'v serde_cbor::Value> {
    let serde_cbor::Value::Map(m) = map else {
        return None;
    };
    m.iter().find_map(|(k, v)| match k {
        serde_cbor::Value::Text(t) if t == text => Some(v),
        serde_cbor::Value::Integer(i) if Some(*i) == int => Some(v),
        _ => None,
    })
}

fn number(v: &serde_cbor::Value) -> Option<f64> {
    match v {
        serde_cbor::Value::Integer(i) => Some(*i as f64),
        serde_cbor::Value::Float(f) => Some(*f),
        _ => None,
    }
}

fn flat_stamp(item: &serde_cbor::Value, topic_device: Option<&str>) -> Option<Stamp> {
    let ts = number(get(item, "ts", None)?)?;
    let seq = number(get(item, "seq", None)?)?;
    if seq < 0.0 || seq.fract() != 0.0 {
        return None;
    }
    Some(Stamp {
        device: topic_device?.to_owned(),
        seq: seq as u64,
        ts: ts as i64,
    })
}

/// An element of the gateway's upstream batch (`{"id", "topic", ..., "payload"}`).
fn is_batch_element(item: &serde_cbor::Value) -> bool {
    get(item, "topic", None).is_some() && get(item, "payload", None).is_some()
}

fn is_senml_record(item: &serde_cbor::Value) -> bool {
    get(item, "bn", Some(-2)).is_some()
        || get(item, "bt", Some(-3)).is_some()
        || get(item, "n", Some(0)).is_some()
}

/// Walks a SenML pack; every record named `seq` yields a stamp whose device is
/// the base name in force (trailing `/` dropped) and whose time is `bt + t`.
fn senml_stamps(records: &[serde_cbor::Value], topic_device: Option<&str>) -> Option<Vec<Stamp>> {
    let mut base_name: Option<String> = None;
    let mut base_time = 0.0;
    let mut out = Vec::new();
    for record in records {
        if let Some(serde_cbor::Value::Text(bn)) = get(record, "bn", Some(-2)) {
            base_name = Some(bn.trim_end_matches('/').to_owned());
        }
        if let Some(bt) = get(record, "bt", Some(-3)).and_then(number) {
            base_time = bt;
        }
        let name = match get(record, "n", Some(0)) {
            Some(serde_cbor::Value::Text(n)) => n.as_str(),
            _ => continue,
        };
        if name != "seq" {
            continue;
        }
        let seq = get(record, "v", Some(2)).and_then(number)?;
        let t = get(record, "t", Some(6)).and_then(number).unwrap_or(0.0);
        let device = base_name.clone().or(topic_device.map(str::to_owned))?;
        out.push(Stamp {
            device,
            seq: seq as u64,
            ts: ((base_time + t) * 1000.0).round() as i64,
        });
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<Field<'static>>, i64) {
        (
            vec![
                Field {
                    name: "temperature",
                    unit: Some("Cel"),
                    value: 21.5,
                },
                Field {
                    name: "humidity",
                    unit: Some("%RH"),
                    value: 40.1,
                },
            ],
            1_764_235_200_123,
        )
    }

    #[test]
    fn json_matches_the_contract() {
        let (fields, ts) = sample();
        let s = Sample {
            device: "t-0001",
            ts,
            seq: 42,
            fields: &fields,
        };
        let json = String::from_utf8(encode(&s, Format::Json).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"ts":1764235200123,"seq":42,"temperature":21.5,"humidity":40.1}"#
        );
        let senml = String::from_utf8(encode(&s, Format::SenmlJson).unwrap()).unwrap();
        assert_eq!(
            senml,
            r#"[{"bn":"t-0001/","bt":1764235200.123,"n":"temperature","u":"Cel","v":21.5},{"n":"seq","v":42},{"n":"humidity","u":"%RH","v":40.1}]"#
        );
    }

    #[test]
    fn every_format_round_trips_through_stamps() {
        let (fields, ts) = sample();
        let s = Sample {
            device: "t-0001",
            ts,
            seq: 7,
            fields: &fields,
        };
        for format in Format::ALL {
            let bytes = encode(&s, format).unwrap();
            let got = stamps("devices/t-0001/telemetry", &bytes).unwrap();
            assert_eq!(
                got,
                vec![Stamp {
                    device: "t-0001".into(),
                    seq: 7,
                    ts
                }],
                "{format}"
            );
        }
    }

    #[test]
    fn batches_yield_every_reading() {
        let (fields, ts) = sample();
        let a = Sample {
            device: "t-0002",
            ts,
            seq: 1,
            fields: &fields,
        };
        let b = Sample {
            seq: 2,
            ..a.clone()
        };
        // JSON array of objects, as the gateway batches them.
        let batch = format!(
            "[{},{}]",
            String::from_utf8(encode(&a, Format::Json).unwrap()).unwrap(),
            String::from_utf8(encode(&b, Format::Json).unwrap()).unwrap()
        );
        let got = stamps("bench/devices/t-0002/telemetry", batch.as_bytes()).unwrap();
        assert_eq!(got.iter().map(|s| s.seq).collect::<Vec<_>>(), [1, 2]);
        // Concatenated SenML packs: the device comes from bn, not the topic.
        let mut pack: Vec<serde_json::Value> =
            serde_json::from_slice(&encode(&a, Format::SenmlJson).unwrap()).unwrap();
        let more: Vec<serde_json::Value> =
            serde_json::from_slice(&encode(&b, Format::SenmlJson).unwrap()).unwrap();
        pack.extend(more);
        let bytes = serde_json::to_vec(&pack).unwrap();
        let got = stamps("bench/devices/other/telemetry", &bytes).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|s| s.device == "t-0002" && s.ts == ts));
    }

    #[test]
    fn the_gateways_upstream_batches_yield_every_reading_with_its_device() {
        let (fields, ts) = sample();
        let element = |device: &str, seq| {
            let reading = Sample {
                device,
                ts,
                seq,
                fields: &fields,
            };
            let payload = String::from_utf8(encode(&reading, Format::Json).unwrap()).unwrap();
            format!(
                r#"{{"id":"gw:0011223344556677:{seq}","topic":"devices/{device}/telemetry","received_at":1,"replayed":false,"payload":{payload}}}"#
            )
        };
        let batch = format!("[{},{}]", element("t-0001", 7), element("t-0002", 9));
        let got = stamps("bench/batch", batch.as_bytes()).unwrap();
        let got: Vec<(&str, u64)> = got.iter().map(|s| (s.device.as_str(), s.seq)).collect();
        assert_eq!(got, [("t-0001", 7), ("t-0002", 9)]);
    }

    #[test]
    fn malformed_payloads_are_not_readings() {
        for bad in MALFORMED {
            assert_eq!(stamps("devices/t-0001/telemetry", bad), None);
        }
    }
}
