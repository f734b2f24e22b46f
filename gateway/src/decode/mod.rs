//! Decode: a raw MQTT message (topic, payload, optional MQTT 5 content type) becomes
//! one or more [`Reading`]s.
//!
//! Formats: a JSON object, a CBOR map, SenML JSON and SenML CBOR (RFC 8428). The format
//! comes from the MQTT 5 content type when the publisher set a known one, else it is
//! sniffed from the first byte.
//!
//! Invariants:
//! - never panics, whatever the bytes; every failure is a [`DecodeError`] with a reason
//!   an operator can act on (the caller dead-letters it);
//! - a reading always has at least one field;
//! - the device id and stream always come from the topic, never from the payload.

mod cbor;
mod node;
mod object;
mod senml;
mod stage;
pub mod topic;

use std::fmt;

pub use node::Node;
pub use stage::DecodeStage;
pub use topic::{TopicPattern, TopicPatterns};

use crate::reading::{Format, Millis, Reading};

/// Deepest nesting accepted in a payload, JSON or CBOR.
pub const MAX_DEPTH: usize = 32;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("topic '{0}' does not match the ingest topic pattern")]
    Topic(String),
    #[error("empty payload")]
    Empty,
    #[error("{format}: {reason}")]
    Invalid { format: FormatName, reason: String },
    #[error("payload is neither JSON, CBOR nor SenML")]
    Unknown,
}

/// The format named in an error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatName(pub Format);

impl fmt::Display for FormatName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl DecodeError {
    fn invalid(format: Format, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            format: FormatName(format),
            reason: reason.into(),
        }
    }

    /// The format the payload was taken for, if any; for counters.
    pub fn format(&self) -> Option<Format> {
        match self {
            DecodeError::Invalid { format, .. } => Some(format.0),
            _ => None,
        }
    }
}

/// Maps an MQTT 5 content type to a format; unknown types leave the choice to sniffing.
pub fn format_from_content_type(content_type: &str) -> Option<Format> {
    let essence = content_type.split(';').next()?.trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" | "text/json" => Some(Format::Json),
        "application/cbor" => Some(Format::Cbor),
        "application/senml+json" => Some(Format::SenmlJson),
        "application/senml+cbor" => Some(Format::SenmlCbor),
        _ => None,
    }
}

/// Guesses the format from the first significant byte.
pub fn sniff(payload: &[u8]) -> Option<Format> {
    let first = *payload.iter().find(|b| !b.is_ascii_whitespace())?;
    match first {
        b'{' => Some(Format::Json),
        b'[' => Some(Format::SenmlJson),
        // CBOR major type 5 (map) and 4 (array), definite or indefinite length.
        0xa0..=0xbf => Some(Format::Cbor),
        0x80..=0x9f => Some(Format::SenmlCbor),
        _ => None,
    }
}

/// Decodes one message received on `topic` at `received_at`.
pub fn decode(
    pattern: &TopicPattern,
    topic: &str,
    payload: &[u8],
    content_type: Option<&str>,
    received_at: Millis,
) -> Result<Vec<Reading>, DecodeError> {
    let mut readings = Vec::new();
    decode_into(
        pattern,
        topic,
        payload,
        content_type,
        received_at,
        &mut readings,
        &mut Spare::default(),
    )?;
    Ok(readings)
}

/// [`decode`], appending the readings to `out` (nothing on an error): the decode stage
/// keeps one such vector for all its messages rather than one per message, and gives
/// the readings it is done with to `spare` for the next messages' readings.
pub fn decode_into(
    pattern: &TopicPattern,
    topic: &str,
    payload: &[u8],
    content_type: Option<&str>,
    received_at: Millis,
    out: &mut Vec<Reading>,
    spare: &mut Spare,
) -> Result<(), DecodeError> {
    let parts = pattern
        .matches(topic)
        .ok_or_else(|| DecodeError::Topic(topic.to_string()))?;
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = content_type
        .and_then(format_from_content_type)
        .or_else(|| sniff(payload))
        .ok_or(DecodeError::Unknown)?;
    let mut base = spare.reading(parts.device, parts.stream, topic, received_at, format);
    if format != Format::Json {
        base.fields.clear();
    } else if object::decode_json(payload, MAX_DEPTH, &mut base).is_some() {
        out.push(base);
        return Ok(());
    }
    // The tree path: CBOR, SenML, and a JSON payload the direct path did not take (it
    // says why).
    let tree = parse(format, payload).map_err(|reason| DecodeError::invalid(format, reason))?;
    let decoded = match format {
        Format::Json | Format::Cbor => object::decode(tree, base).map(|r| out.push(r)),
        Format::SenmlJson | Format::SenmlCbor => senml::decode(tree, base).map(|r| out.extend(r)),
    };
    decoded.map_err(|reason| DecodeError::invalid(format, reason))
}

/// Readings the decode stage is done with, kept so that the next messages' readings
/// reuse the room of their device, stream and topic, and the entries of their fields
/// (a JSON object with the same keys as the reading's last message sets their values,
/// `object::decode_json`): at 1000 devices x 10/s, 7 of the 34 allocations (and frees)
/// per reading, on the store's thread, whose allocations take glibc's slow path (no
/// per-thread caches, `memory.rs`).
///
/// Holds at most [`Spare::KEEP`] readings, only those whose strings are short
/// ([`Spare::LONGEST`]), and their fields only when there are at most [`Spare::FIELDS`];
/// the stage lets go of all of them once its input has been idle a second
/// (`Spare::clear`), so they do not outlast traffic.
#[derive(Default)]
pub struct Spare {
    readings: Vec<Reading>,
}

impl Spare {
    /// Most readings kept: a run's worth of single-reading messages.
    pub const KEEP: usize = 1024;
    /// Longest string room kept, in bytes: a reading with a longer device, stream or
    /// topic is let go.
    pub const LONGEST: usize = 256;
    /// Most fields kept with a reading.
    pub const FIELDS: usize = 16;

    /// Keeps `readings` for reuse, as many as there is room for.
    pub fn keep(&mut self, readings: impl Iterator<Item = Reading>) {
        for mut reading in readings {
            if self.readings.len() >= Self::KEEP {
                break;
            }
            let short = [&reading.device, &reading.stream, &reading.topic]
                .iter()
                .all(|s| s.capacity() <= Self::LONGEST);
            if short {
                if reading.fields.len() > Self::FIELDS {
                    reading.fields.clear();
                }
                reading.units.clear();
                self.readings.push(reading);
            }
        }
    }

    /// Lets go of every reading kept.
    pub fn clear(&mut self) {
        self.readings = Vec::new();
    }

    /// A reading of `device`, `stream` and `topic` at `time` in `format`: a kept one when
    /// there is one, with the fields it had (the caller's to set or clear).
    fn reading(
        &mut self,
        device: &str,
        stream: &str,
        topic: &str,
        time: Millis,
        format: Format,
    ) -> Reading {
        let Some(mut reading) = self.readings.pop() else {
            return Reading {
                device: device.to_string(),
                stream: stream.to_string(),
                topic: topic.to_string(),
                time,
                fields: Default::default(),
                units: Default::default(),
                format,
            };
        };
        reading.time = time;
        reading.format = format;
        for (room, text) in [
            (&mut reading.device, device),
            (&mut reading.stream, stream),
            (&mut reading.topic, topic),
        ] {
            room.clear();
            room.push_str(text);
        }
        reading
    }
}

fn parse(format: Format, payload: &[u8]) -> Result<Node, String> {
    match format {
        Format::Json | Format::SenmlJson => {
            Node::parse_json(payload, MAX_DEPTH).map_err(|e| format!("invalid JSON: {e}"))
        }
        Format::Cbor | Format::SenmlCbor => cbor::decode(payload),
    }
}

#[cfg(test)]
mod tests;
