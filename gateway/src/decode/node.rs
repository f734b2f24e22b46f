//! A format-neutral tree that JSON and CBOR payloads are both decoded into, so the
//! object and SenML decoders are written once. A JSON object, the common case, skips it
//! (`object::decode_json`) unless that path declines the payload.

/// One decoded data item.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
    Array(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The numeric value of an integer or float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Node::Int(i) => Some(*i as f64),
            Node::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Text(s) => Some(s),
            _ => None,
        }
    }

    /// A short name of the item's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "boolean",
            Node::Int(_) | Node::Float(_) => "number",
            Node::Text(_) => "string",
            Node::Bytes(_) => "byte string",
            Node::Array(_) => "array",
            Node::Map(_) => "map",
        }
    }

    /// Parses a JSON document straight into a tree, refusing nesting deeper than
    /// `max_depth`. No `serde_json::Value` is built on the way: each key and value is
    /// allocated once, in the tree. Object members stay in document order (a repeated
    /// key appears twice; the decoders keep the last one).
    pub fn parse_json(bytes: &[u8], max_depth: usize) -> Result<Node, serde_json::Error> {
        use serde::de::DeserializeSeed;
        let mut parser = serde_json::Deserializer::from_slice(bytes);
        let node = Seed {
            depth: 0,
            max_depth,
        }
        .deserialize(&mut parser)?;
        parser.end()?;
        Ok(node)
    }
}

/// Deserializes one item at `depth` of the document.
#[derive(Clone, Copy)]
pub(super) struct Seed {
    pub(super) depth: usize,
    pub(super) max_depth: usize,
}

impl Seed {
    fn inner(self) -> Seed {
        Seed {
            depth: self.depth + 1,
            ..self
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Seed {
    type Value = Node;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        if self.depth > self.max_depth {
            return Err(serde::de::Error::custom(format!(
                "JSON nested deeper than {} levels",
                self.max_depth
            )));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Seed {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Node, E> {
        Ok(Node::Int(i.into()))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Node, E> {
        // As `serde_json::Value` did: integers beyond i64 are taken as floats.
        Ok(match i64::try_from(u) {
            Ok(i) => Node::Int(i.into()),
            Err(_) => Node::Float(u as f64),
        })
    }

    fn visit_f64<E>(self, f: f64) -> Result<Node, E> {
        Ok(Node::Float(f))
    }

    fn visit_str<E>(self, s: &str) -> Result<Node, E> {
        Ok(Node::Text(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Node, E> {
        Ok(Node::Text(s))
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(self.inner())? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self.inner())?;
            entries.push((Node::Text(key), value));
        }
        Ok(Node::Map(entries))
    }
}
