//! What one upstream publish looks like: topic, MQTT 5 properties, the batch payloads, and
//! the MQTT 3.1.1 envelope.
//!
//! Invariants:
//! - Every message carries its id `{gateway_id}:{epoch}:{seq}` (user property `id`): the
//!   database epoch as 16 lowercase hex digits and the row's outbox seq in decimal, e.g.
//!   `edge-1:65f1a2b3c4d5e6f7:42`. It is the same on every replay of the row and never
//!   repeats for another row, not even after the database is created anew. A batch
//!   carries the id of its first row and every element of the batch carries its own id.
//! - `replayed` is `true` for rows that were already in the outbox when the current
//!   connection came up (backlog and the previous connection's in-flight window).
//! - Batches never mix encodings: JSON and SenML-JSON rows go into a JSON array, CBOR and
//!   SenML-CBOR rows into a CBOR array. Payloads are embedded as they are (they decoded, so
//!   they are valid JSON or CBOR items); the CBOR framing is written here by hand (a few
//!   header bytes), so no CBOR library is involved.
//! - Over MQTT 3.1.1 (no properties) every forwarded message is one JSON object,
//!   [`envelope`]: `{"id":..,"replayed":..,"content_type":..,"payload":..}`, the same id,
//!   flag and content type MQTT 5 sends as properties. A JSON payload (content type ending
//!   in `json`: readings, SenML-JSON, events, JSON batches) is embedded as the JSON value
//!   it is; any other (CBOR) is a base64 string (standard alphabet, padded) and the
//!   envelope then says `"payload_encoding":"base64"`.

use std::fmt::Write as _;

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

use crate::reading::Format;
use crate::store::{self, Lane, OutboxRow};

/// Encoding family of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Json,
    Cbor,
}

impl Family {
    pub fn of(format: Format) -> Family {
        match format {
            Format::Json | Format::SenmlJson => Family::Json,
            Format::Cbor | Format::SenmlCbor => Family::Cbor,
        }
    }
}

pub fn content_type(lane: Lane, format: Format) -> &'static str {
    match (lane, format) {
        (Lane::Event, _) => "application/cloudevents+json",
        (_, Format::Json) => "application/json",
        (_, Format::Cbor) => "application/cbor",
        (_, Format::SenmlJson) => "application/senml+json",
        (_, Format::SenmlCbor) => "application/senml+cbor",
    }
}

/// `{prefix}/{topic}`, without a doubled or leading slash when the prefix is empty.
pub fn upstream_topic(prefix: &str, topic: &str) -> String {
    let (prefix, slash) = joined(prefix);
    [prefix, slash, topic].concat()
}

/// [`upstream_topic`], written into `buf` and split off it as [`properties`] are (the
/// caller keeps `buf` between messages): the topics of many messages share one allocation
/// instead of taking one each (1.01 allocations per forwarded reading in
/// `bench/allocs.sh`). rumqttc's `AsyncClient::try_publish_built` takes it as it is
/// (`vendor/rumqttc/PATCHES.md` 6).
pub fn upstream_topic_in(buf: &mut BytesMut, prefix: &str, topic: &str) -> Bytes {
    let (prefix, slash) = joined(prefix);
    let len = prefix.len() + slash.len() + topic.len();
    if buf.capacity() < len {
        buf.reserve(len.max(PROPERTIES_CHUNK));
    }
    for part in [prefix, slash, topic] {
        buf.put_slice(part.as_bytes());
    }
    buf.split().freeze()
}

/// A topic prefix without its trailing slashes, and the slash that joins it to a topic
/// (none after an empty prefix).
fn joined(prefix: &str) -> (&str, &str) {
    let prefix = prefix.trim_end_matches('/');
    (prefix, if prefix.is_empty() { "" } else { "/" })
}

/// The part of every message id before the seq: `{gateway_id}:{epoch}`.
pub fn id_prefix(gateway_id: &str, epoch: u64) -> String {
    format!("{gateway_id}:{}", store::epoch_hex(epoch))
}

/// `{id_prefix}:{seq}` (see [`id_prefix`]).
pub fn message_id(id_prefix: &str, seq: u64) -> String {
    let mut id = String::with_capacity(id_prefix.len() + 21);
    id.push_str(id_prefix);
    id.push(':');
    let _ = write!(id, "{seq}");
    id
}

/// MQTT 5 property identifiers (MQTT 5.0, section 2.2.2.2).
const CONTENT_TYPE: u8 = 0x03;
const USER_PROPERTY: u8 = 0x26;
/// Room the buffer of properties and topics takes at a time: the properties and topics of
/// some 35 messages (70-90 bytes of properties each with an id such as
/// `edge-1:65f1a2b3c4d5e6f7:42`, and a topic), one allocation for all.
const PROPERTIES_CHUNK: usize = 4096;

/// The MQTT 5 properties of an upstream message: the user properties `id` (`{id_prefix}:
/// {seq}`, see [`message_id`]) and `replayed`, and the content type.
///
/// They are encoded into `buf`, which the caller keeps between messages, and split off
/// it (rumqttc's `PublishProperties::encoded`, `vendor/rumqttc/PATCHES.md` 4): one
/// allocation per [`PROPERTIES_CHUNK`] instead of six per message (the id, the
/// property list, its keys and values and the content type, each a `String`). A message
/// holds its part of the chunk until it is written to the network; the chunk is freed
/// with the last of them.
pub fn properties(
    buf: &mut BytesMut,
    id_prefix: &str,
    seq: u64,
    replayed: bool,
    content_type: &str,
) -> PublishProperties {
    let id_len = id_prefix.len() + 1 + decimal_digits(seq);
    let Ok(id_len16) = u16::try_from(id_len) else {
        // A gateway id longer than an MQTT string can be; the packet is refused upstream
        // either way, as it was before the properties were encoded here.
        return PublishProperties {
            user_properties: vec![
                ("id".into(), message_id(id_prefix, seq)),
                ("replayed".into(), replayed.to_string()),
            ],
            content_type: Some(content_type.into()),
            ..PublishProperties::default()
        };
    };
    let value: &str = if replayed { "true" } else { "false" };
    // Three identifiers, five string lengths, the strings.
    let len = 3 + 5 * 2 + "id".len() + id_len + "replayed".len() + value.len() + content_type.len();
    if buf.capacity() < len {
        buf.reserve(len.max(PROPERTIES_CHUNK));
    }
    buf.put_u8(USER_PROPERTY);
    put_mqtt_str(buf, "id");
    buf.put_u16(id_len16);
    buf.put_slice(id_prefix.as_bytes());
    let _ = write!(buf, ":{seq}");
    buf.put_u8(USER_PROPERTY);
    put_mqtt_str(buf, "replayed");
    put_mqtt_str(buf, value);
    buf.put_u8(CONTENT_TYPE);
    put_mqtt_str(buf, content_type);
    debug_assert_eq!(buf.len(), len);
    PublishProperties {
        encoded: buf.split().freeze(),
        ..PublishProperties::default()
    }
}

/// An MQTT UTF-8 string: its length in two bytes, then its bytes (`s` is one of the
/// short strings above).
fn put_mqtt_str(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn decimal_digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// The MQTT 3.1.1 form of a message (see the module's invariants): `payload` with its
/// `id`, `replayed` flag and `content_type` in one JSON object.
pub fn envelope(id: &str, replayed: bool, content_type: &str, payload: &[u8]) -> Vec<u8> {
    let json = content_type.ends_with("json");
    let mut out = Vec::with_capacity(payload.len() * if json { 1 } else { 2 } + 96 + id.len());
    out.extend_from_slice(b"{\"id\":");
    let _ = serde_json::to_writer(&mut out, id);
    let _ = write!(
        VecWriter(&mut out),
        ",\"replayed\":{replayed},\"content_type\":"
    );
    let _ = serde_json::to_writer(&mut out, content_type);
    if json {
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(payload);
    } else {
        out.extend_from_slice(b",\"payload_encoding\":\"base64\",\"payload\":\"");
        let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
        out.extend_from_slice(encoded.as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
    out
}

/// The payload of an event, with the CloudEvents extension attribute `replayed` set to
/// `true` when it is replayed. The gateway's events already carry `"replayed":false`, so the
/// attribute is replaced, not added (a second key would leave the object with two values,
/// and most JSON readers keep the last). Payloads that are not a JSON object are sent
/// unchanged.
pub fn event_payload(payload: &[u8], replayed: bool) -> Vec<u8> {
    if !replayed {
        return payload.to_vec();
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload) {
        Ok(mut event) => {
            event.insert("replayed".into(), true.into());
            serde_json::to_vec(&event).unwrap_or_else(|_| payload.to_vec())
        }
        Err(_) => payload.to_vec(),
    }
}

/// Bytes a row adds to a batch besides its payload (an upper bound).
pub fn batch_overhead(id_prefix: &str, row: &OutboxRow) -> usize {
    64 + id_prefix.len() + 2 * row.topic().len()
}

/// One JSON array: `[{"id":..,"topic":..,"received_at":..,"replayed":..,"payload":<raw>},..]`;
/// rows up to seq `replay_until` are marked replayed.
pub fn json_batch(id_prefix: &str, rows: &[OutboxRow], replay_until: u64) -> Vec<u8> {
    let size: usize = rows
        .iter()
        .map(|r| r.payload().len() + batch_overhead(id_prefix, r))
        .sum();
    let mut out = Vec::with_capacity(size + 2);
    out.push(b'[');
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        let id = message_id(id_prefix, row.seq);
        let _ = serde_json::to_writer(&mut out, &id);
        out.extend_from_slice(b",\"topic\":");
        let _ = serde_json::to_writer(&mut out, row.topic());
        let _ = write!(
            VecWriter(&mut out),
            ",\"received_at\":{},\"replayed\":{},\"payload\":",
            row.received_at(),
            row.seq <= replay_until
        );
        out.extend_from_slice(row.payload());
        out.push(b'}');
    }
    out.push(b']');
    out
}

/// One CBOR array of maps with the same keys as [`json_batch`]; `payload` is the row's
/// CBOR item embedded as it is.
pub fn cbor_batch(id_prefix: &str, rows: &[OutboxRow], replay_until: u64) -> Vec<u8> {
    let size: usize = rows
        .iter()
        .map(|r| r.payload().len() + batch_overhead(id_prefix, r))
        .sum();
    let mut out = Vec::with_capacity(size + 9);
    cbor_head(&mut out, 4, rows.len() as u64);
    for row in rows {
        cbor_head(&mut out, 5, 5);
        cbor_text(&mut out, "id");
        cbor_text(&mut out, &message_id(id_prefix, row.seq));
        cbor_text(&mut out, "topic");
        cbor_text(&mut out, row.topic());
        cbor_text(&mut out, "received_at");
        if row.received_at() >= 0 {
            cbor_head(&mut out, 0, row.received_at() as u64);
        } else {
            cbor_head(&mut out, 1, (-1 - row.received_at()) as u64);
        }
        cbor_text(&mut out, "replayed");
        out.push(if row.seq <= replay_until { 0xf5 } else { 0xf4 });
        cbor_text(&mut out, "payload");
        out.extend_from_slice(row.payload());
    }
    out
}

fn cbor_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

fn cbor_text(out: &mut Vec<u8>, s: &str) {
    cbor_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// `fmt::Write` into a byte vector.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64, format: Format, payload: &[u8]) -> OutboxRow {
        OutboxRow {
            seq,
            lane: Lane::Reading,
            row: store::Row::encode(1_700_000_000_000, format, "devices/d\"1/t", "d\"1", payload),
        }
    }

    /// `properties` as an MQTT 5 receiver reads them: through rumqttc's decoder.
    fn read_back(properties: PublishProperties) -> PublishProperties {
        use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
        use rumqttc::v5::mqttbytes::QoS;

        let mut publish = Publish::new("t", QoS::AtLeastOnce, vec![1], Some(properties));
        publish.pkid = 1;
        let mut buf = BytesMut::new();
        publish.write(&mut buf).unwrap();
        match Packet::read(&mut buf, None).unwrap() {
            Packet::Publish(p) => p.properties.unwrap(),
            other => panic!("not a publish: {other:?}"),
        }
    }

    #[test]
    fn properties_carry_the_id_the_replay_flag_and_the_content_type() {
        let prefix = id_prefix("gw", 0x1a);
        let mut buf = BytesMut::new();
        for (seq, replayed) in [(0, false), (42, true), (u64::MAX, false)] {
            let p = read_back(properties(
                &mut buf,
                &prefix,
                seq,
                replayed,
                "application/json",
            ));
            assert_eq!(
                p.user_properties,
                vec![
                    ("id".to_string(), message_id(&prefix, seq)),
                    ("replayed".to_string(), replayed.to_string()),
                ]
            );
            assert_eq!(p.content_type.as_deref(), Some("application/json"));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn consecutive_messages_share_one_allocation_for_their_properties() {
        let prefix = id_prefix("gw", 0x1a);
        let mut buf = BytesMut::new();
        let a = properties(&mut buf, &prefix, 7, false, "application/json").encoded;
        let b = properties(&mut buf, &prefix, 8, true, "application/cbor").encoded;
        // The second follows the first in the same chunk: no allocation of its own.
        assert_eq!(b.as_ptr(), a[a.len()..].as_ptr());
        assert!(buf.capacity() >= PROPERTIES_CHUNK - a.len() - b.len());
    }

    #[test]
    fn an_id_too_long_for_an_mqtt_string_keeps_the_properties_as_strings() {
        let prefix = "g".repeat(usize::from(u16::MAX));
        let mut buf = BytesMut::new();
        let p = properties(&mut buf, &prefix, 1, true, "application/json");
        assert!(p.encoded.is_empty() && buf.is_empty());
        assert_eq!(p.user_properties[0].1, format!("{prefix}:1"));
        assert_eq!(p.user_properties[1].1, "true");
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn json_batch_is_an_array_with_ids() {
        let rows = [
            row(7, Format::Json, b"{\"t\":1}"),
            row(9, Format::SenmlJson, b"[{\"n\":\"t\",\"v\":2}]"),
        ];
        let out = json_batch(&id_prefix("gw", 0x1a), &rows, 8);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["id"], "gw:000000000000001a:7");
        assert_eq!(v[0]["topic"], "devices/d\"1/t");
        assert_eq!(v[0]["payload"]["t"], 1);
        assert_eq!(v[1]["id"], "gw:000000000000001a:9");
        assert_eq!(v[0]["replayed"], true);
        assert_eq!(v[1]["replayed"], false);
        assert_eq!(v[1]["payload"][0]["v"], 2);
    }

    #[test]
    fn cbor_batch_decodes_with_a_cbor_library() {
        let item = serde_cbor::to_vec(&serde_json::json!({"t": 21.5})).unwrap();
        let rows: Vec<OutboxRow> = (0..30).map(|i| row(300 + i, Format::Cbor, &item)).collect();
        let out = cbor_batch(&id_prefix("gw", u64::MAX), &rows, 329);
        let v: serde_json::Value = serde_cbor::from_slice(&out).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 30);
        assert_eq!(v[29]["id"], "gw:ffffffffffffffff:329");
        assert_eq!(v[0]["payload"]["t"], 21.5);
        assert_eq!(v[0]["received_at"], 1_700_000_000_000i64);
        assert_eq!(v[0]["replayed"], true);
    }

    #[test]
    fn replayed_events_get_the_extension_attribute() {
        let out = event_payload(b" {\"id\":\"e1\"}", true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["replayed"], true);
        assert_eq!(v["id"], "e1");
        assert_eq!(event_payload(b"{}", true), b"{\"replayed\":true}");
        assert_eq!(event_payload(b"{\"a\":1}", false), b"{\"a\":1}");
        assert_eq!(
            event_payload(b"[1]", true),
            b"[1]",
            "not an object: unchanged"
        );
        // The gateway's own events say `"replayed":false`: the mark replaces it.
        let out = event_payload(b"{\"id\":\"e1\",\"replayed\":false,\"data\":{}}", true);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("replayed").count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["replayed"], true);
    }

    #[test]
    fn the_311_envelope_embeds_json_and_base64_encodes_the_rest() {
        let out = envelope(
            "gw:00000000000000ff:7",
            true,
            "application/json",
            b"{\"t\":21.5}",
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "gw:00000000000000ff:7", "replayed": true,
                               "content_type": "application/json", "payload": {"t": 21.5}})
        );

        let event = event_payload(b"{\"id\":\"e1\",\"type\":\"T\"}", false);
        let out = envelope("gw:1:8", false, "application/cloudevents+json", &event);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["payload"]["type"], "T");
        assert_eq!(v["replayed"], false);
        assert!(v.get("payload_encoding").is_none());

        let cbor = serde_cbor::to_vec(&serde_json::json!({"t": 21.5})).unwrap();
        let out = envelope("gw:1:9", false, "application/cbor", &cbor);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["content_type"], "application/cbor");
        assert_eq!(v["payload_encoding"], "base64");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(bytes, cbor, "the original bytes, unchanged");
    }

    #[test]
    fn topics_join_the_prefix() {
        assert_eq!(
            upstream_topic("site/gw1/", "devices/a"),
            "site/gw1/devices/a"
        );
        assert_eq!(upstream_topic("", "devices/a"), "devices/a");
    }

    #[test]
    fn topics_written_into_the_buffer_are_the_same_and_share_its_chunk() {
        let mut buf = BytesMut::new();
        let a = upstream_topic_in(&mut buf, "site/gw1/", "devices/a");
        let props = properties(&mut buf, "gw:1a", 7, false, "application/json").encoded;
        let b = upstream_topic_in(&mut buf, "", "devices/b");
        assert_eq!(&a[..], upstream_topic("site/gw1/", "devices/a").as_bytes());
        assert_eq!(&b[..], b"devices/b");
        // Each follows the one before in the same chunk: no allocation of its own.
        assert_eq!(props.as_ptr(), a[a.len()..].as_ptr());
        assert_eq!(b.as_ptr(), props[props.len()..].as_ptr());
        assert!(buf.is_empty());
    }
}
