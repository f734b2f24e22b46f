//! The one place the gateway touches a CBOR library.
//!
//! CBOR is decoded with `serde_cbor`, which is archived upstream (RUSTSEC-2021-0127,
//! unmaintained). Everything else in the gateway sees only [`Node`], so the codec can be
//! swapped here without touching the decoders.
//!
//! Invariants:
//! - decoding never panics on any input; nesting deeper than [`MAX_DEPTH`] is an error.

use super::{Node, MAX_DEPTH};

/// Decodes one CBOR data item into a [`Node`] tree.
pub fn decode(bytes: &[u8]) -> Result<Node, String> {
    let value: serde_cbor::Value =
        serde_cbor::from_slice(bytes).map_err(|e| format!("invalid CBOR: {e}"))?;
    to_node(value, 0)
}

fn to_node(value: serde_cbor::Value, depth: usize) -> Result<Node, String> {
    use serde_cbor::Value as V;
    if depth > MAX_DEPTH {
        return Err(format!("CBOR nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(match value {
        V::Null => Node::Null,
        V::Bool(b) => Node::Bool(b),
        V::Integer(i) => Node::Int(i),
        V::Float(f) => Node::Float(f),
        V::Text(s) => Node::Text(s),
        V::Bytes(b) => Node::Bytes(b),
        V::Array(items) => Node::Array(
            items
                .into_iter()
                .map(|v| to_node(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        V::Map(map) => Node::Map(
            map.into_iter()
                .map(|(k, v)| Ok((to_node(k, depth + 1)?, to_node(v, depth + 1)?)))
                .collect::<Result<_, String>>()?,
        ),
        V::Tag(_, inner) => to_node(*inner, depth + 1)?,
        _ => return Err("unsupported CBOR item".to_string()),
    })
}
