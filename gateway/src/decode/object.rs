//! A JSON object or CBOR map with one reading's fields.
//!
//! - `ts` or `time` (either name) sets the reading's time: a number of Unix seconds
//!   (fractions allowed), or of Unix milliseconds when it is at least 10^11, or an
//!   RFC 3339 string. Absent: the receive time.
//! - Every other key is a field: numbers, booleans and strings as they are; nested
//!   objects are flattened with `.` (`{"env":{"t":1}}` gives `env.t`); `null` fields are
//!   skipped; arrays and byte strings are refused.
//!
//! Two paths give the same readings: [`decode`] on the format-neutral tree (CBOR, and
//! what the direct path declines) and [`decode_json`], straight from a JSON object's
//! bytes without building the tree (at full speed decode's share of the store's thread
//! went from 33% to 26%; BENCHMARKS.md, "Fewer allocations on the store's thread").

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

use super::node::Seed;
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

/// A JSON object decoded straight into `reading`'s fields, without the [`Node`] tree
/// that [`decode`] takes: no tree to allocate and free, and no key allocated for `ts` or
/// `time`. The same fields as [`decode`] on [`Node::parse_json`]'s tree; `None` for
/// anything that is not plainly such an object (not an object, an array or a bad time
/// in it, invalid JSON, nesting deeper than `max_depth`, no fields), with `reading` then
/// as it came but without fields: the caller takes the tree path, which says why.
///
/// `reading` may come with the fields of an earlier message (a reading kept for reuse,
/// [`super::Spare`]): a key it has again keeps its entry, only the value changes, so a
/// device that sends the same keys each time costs no allocation for them; the keys it
/// does not have again are removed.
pub fn decode_json(bytes: &[u8], max_depth: usize, reading: &mut Reading) -> Option<()> {
    let time = reading.time;
    // The earlier message's values are marked stale: no decoded value is NaN (JSON has
    // no such number, and non-finite ones are refused).
    for value in reading.fields.values_mut() {
        *value = STALE;
    }
    let mut parser = serde_json::Deserializer::from_slice(bytes);
    let parsed = (&mut parser)
        .deserialize_map(Fields {
            reading: &mut *reading,
            prefix: "",
            depth: 0,
            max_depth,
        })
        .and_then(|()| parser.end());
    reading.fields.retain(|_, value| !is_stale(value));
    if parsed.is_err() || reading.fields.is_empty() {
        reading.fields.clear();
        reading.time = time;
        return None;
    }
    Some(())
}

/// The value of a field left from an earlier message until this one sets it.
const STALE: Value = Value::Number(f64::NAN);

fn is_stale(value: &Value) -> bool {
    matches!(value, Value::Number(n) if n.is_nan())
}

/// The members of one JSON object at `depth`, into `reading`'s fields, as [`flatten`]
/// has them: `prefix` is the flattened name of a nested object (empty at the top, where
/// `ts` and `time` set the time). The depth limit is checked for each member's value
/// ([`Field`]), as the tree's parser checks it for each item.
struct Fields<'r, 'p> {
    reading: &'r mut Reading,
    prefix: &'p str,
    depth: usize,
    max_depth: usize,
}

impl<'de> Visitor<'de> for Fields<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(Key)? {
            if self.prefix.is_empty() && (key == "ts" || key == "time") {
                let node = map.next_value_seed(Seed {
                    depth: self.depth + 1,
                    max_depth: self.max_depth,
                })?;
                self.reading.time = time_of(&node).map_err(A::Error::custom)?;
                continue;
            }
            let name = if self.prefix.is_empty() {
                key
            } else {
                Cow::Owned(format!("{}.{key}", self.prefix))
            };
            map.next_value_seed(Field {
                reading: &mut *self.reading,
                name,
                depth: self.depth + 1,
                max_depth: self.max_depth,
            })?;
        }
        Ok(())
    }
}

/// An object's key, borrowed from the payload unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s))
    }
}

/// One member's value at `depth`: a field named `name`, skipped when null, flattened
/// when an object.
struct Field<'r, 'k> {
    reading: &'r mut Reading,
    name: Cow<'k, str>,
    depth: usize,
    max_depth: usize,
}

impl<'de> DeserializeSeed<'de> for Field<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.depth > self.max_depth {
            return Err(D::Error::custom("too deep"));
        }
        deserializer.deserialize_any(self)
    }
}

impl Field<'_, '_> {
    /// Sets the field, in the entry of the same key when the reading has one.
    fn set(self, value: Value) {
        match self.reading.fields.get_mut(&*self.name) {
            Some(slot) => *slot = value,
            None => {
                self.reading.fields.insert(self.name.into_owned(), value);
            }
        }
    }
}

impl<'de> Visitor<'de> for Field<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.set(Value::Bool(b));
        Ok(())
    }

    fn visit_i64<E>(self, i: i64) -> Result<(), E> {
        self.set(Value::Number(i as f64));
        Ok(())
    }

    fn visit_u64<E>(self, u: u64) -> Result<(), E> {
        self.set(Value::Number(u as f64));
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<(), E> {
        if !f.is_finite() {
            return Err(E::custom("not a finite number"));
        }
        self.set(Value::Number(f));
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        self.set(Value::Text(s.to_owned()));
        Ok(())
    }

    fn visit_string<E>(self, s: String) -> Result<(), E> {
        self.set(Value::Text(s));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(A::Error::custom("arrays are not supported"))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        Fields {
            reading: self.reading,
            prefix: &self.name,
            depth: self.depth,
            max_depth: self.max_depth,
        }
        .visit_map(map)
    }
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
