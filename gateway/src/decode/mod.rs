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
    )?;
    Ok(readings)
}

/// [`decode`], appending the readings to `out` (nothing on an error): the decode stage
/// keeps one such vector for all its messages rather than one per message.
pub fn decode_into(
    pattern: &TopicPattern,
    topic: &str,
    payload: &[u8],
    content_type: Option<&str>,
    received_at: Millis,
    out: &mut Vec<Reading>,
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
    let mut base = Reading {
        device: parts.device.to_string(),
        stream: parts.stream.to_string(),
        topic: topic.to_string(),
        time: received_at,
        fields: Default::default(),
        units: Default::default(),
        format,
    };
    if format == Format::Json && object::decode_json(payload, MAX_DEPTH, &mut base).is_some() {
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
