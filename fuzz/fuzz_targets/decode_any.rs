//! The decode stage's path: the first byte picks the MQTT 5 content type (none, each
//! known one in odd spellings, an unknown one), the rest is the payload, so format
//! sniffing and content-type parsing are both exercised.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    None,
    Some("application/json"),
    Some("Text/JSON; charset=utf-8"),
    Some("application/cbor"),
    Some("application/senml+json"),
    Some(" APPLICATION/SENML+CBOR ;x=1"),
    Some("application/octet-stream"),
    Some(""),
    Some(";"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[selector as usize % CONTENT_TYPES.len()];
    common::check(payload, content_type);
});
