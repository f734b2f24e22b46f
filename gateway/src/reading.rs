//! The decoded form of one device message: what every stage after `decode` sees.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
pub type Millis = i64;

/// The current wall-clock time in Unix milliseconds.
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// One field value of a reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Number(f64),
    Bool(bool),
    Text(String),
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }
}

/// The wire format a payload was decoded from.
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

/// A decoded reading: one device, one stream, one point in time, named fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Device id, taken from the topic.
    pub device: String,
    /// Stream name, taken from the topic (e.g. `telemetry`).
    pub stream: String,
    /// The MQTT topic the reading arrived on.
    pub topic: String,
    /// When the reading was taken: from the payload when it says, else when it was received.
    pub time: Millis,
    /// Field name -> value (numbers, booleans, strings).
    pub fields: BTreeMap<String, Value>,
    /// Field name -> unit, where the payload gave one (SenML `u`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, String>,
    /// The format the payload was decoded from.
    pub format: Format,
}
