//! A format-neutral tree that JSON and CBOR payloads are both decoded into, so the
//! object and SenML decoders are written once.

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

    /// Converts a JSON value, refusing nesting deeper than `max_depth`.
    pub fn from_json(value: serde_json::Value, max_depth: usize) -> Result<Node, String> {
        Self::json_at(value, 0, max_depth)
    }

    fn json_at(value: serde_json::Value, depth: usize, max_depth: usize) -> Result<Node, String> {
        use serde_json::Value as V;
        if depth > max_depth {
            return Err(format!("JSON nested deeper than {max_depth} levels"));
        }
        Ok(match value {
            V::Null => Node::Null,
            V::Bool(b) => Node::Bool(b),
            V::Number(n) => match n.as_i64() {
                Some(i) => Node::Int(i as i128),
                None => Node::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            V::String(s) => Node::Text(s),
            V::Array(items) => Node::Array(
                items
                    .into_iter()
                    .map(|v| Self::json_at(v, depth + 1, max_depth))
                    .collect::<Result<_, _>>()?,
            ),
            V::Object(map) => Node::Map(
                map.into_iter()
                    .map(|(k, v)| Ok((Node::Text(k), Self::json_at(v, depth + 1, max_depth)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}
