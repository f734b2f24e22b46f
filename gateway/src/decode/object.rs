//! A JSON object or CBOR map with one reading's fields.
//!
//! - `ts` or `time` (either name) sets the reading's time: a number of Unix seconds
//!   (fractions allowed), or of Unix milliseconds when it is at least 10^11, or an
//!   RFC 3339 string. Absent: the receive time.
//! - Every other key is a field: numbers, booleans and strings as they are; nested
//!   objects are flattened with `.` (`{"env":{"t":1}}` gives `env.t`); `null` fields are
//!   skipped; arrays and byte strings are refused.

use super::Node;
use crate::reading::{Millis, Reading, Value};

/// Numbers at least this large are taken as milliseconds, smaller ones as seconds.
const MILLIS_THRESHOLD: f64 = 1e11;

pub fn decode(tree: Node, mut reading: Reading) -> Result<Reading, String> {
    let Node::Map(entries) = tree else {
        return Err(format!("expected an object, found {}", tree.kind()));
    };
    flatten(entries, "", &mut reading)?;
    if reading.fields.is_empty() {
        return Err("no fields".into());
    }
    Ok(reading)
}

fn flatten(entries: Vec<(Node, Node)>, prefix: &str, reading: &mut Reading) -> Result<(), String> {
    for (key, value) in entries {
        let Node::Text(key) = key else {
            return Err(format!("keys must be strings, found a {}", key.kind()));
        };
        if prefix.is_empty() && (key == "ts" || key == "time") {
            reading.time = time_of(&value).map_err(|e| format!("'{key}': {e}"))?;
            continue;
        }
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        let value = match value {
            Node::Null => continue,
            Node::Bool(b) => Value::Bool(b),
            Node::Int(_) | Node::Float(_) => Value::Number(number(&value, &name)?),
            Node::Text(s) => Value::Text(s),
            Node::Map(inner) => {
                flatten(inner, &name, reading)?;
                continue;
            }
            other => {
                return Err(format!(
                    "field '{name}': {} values are not supported",
                    other.kind()
                ))
            }
        };
        reading.fields.insert(name, value);
    }
    Ok(())
}

fn number(node: &Node, name: &str) -> Result<f64, String> {
    match node.as_f64() {
        Some(n) if n.is_finite() => Ok(n),
        _ => Err(format!("field '{name}': not a finite number")),
    }
}

/// A timestamp as Unix seconds, Unix milliseconds (>= 10^11) or an RFC 3339 string.
pub fn time_of(node: &Node) -> Result<Millis, String> {
    match node {
        Node::Text(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|e| format!("not an RFC 3339 time ({e})")),
        _ => match node.as_f64() {
            Some(n) if (0.0..1e16).contains(&n) => Ok(if n >= MILLIS_THRESHOLD {
                n as Millis
            } else {
                (n * 1000.0).round() as Millis
            }),
            _ => Err("not a Unix time in seconds or milliseconds".into()),
        },
    }
}
