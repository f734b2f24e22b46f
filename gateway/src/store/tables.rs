//! The redb tables of the store and the byte layout of their rows.
//!
//! Owns: every `TableDefinition` const and the encode/decode of row values.
//! Invariants:
//! - Outbox keys are the global, persisted sequence (`u64`); rows of both lanes share it,
//!   so a sequence number is never reused, even across lanes and restarts.
//! - Row values are a small fixed header followed by raw bytes: no serde on the hot path.
//! - `META` holds every counter that `gateway outbox stats` prints; it is written in the
//!   same transaction as the rows it counts, so counters and rows never disagree.
//! - `META.epoch` names this database file: written once, in the first write transaction
//!   that finds it missing (the file's creation, or the first open of a file from before
//!   epochs), and never changed. Sequences restart with a new file; (epoch, seq) does not
//!   repeat.

use bytes::BufMut;
use redb::TableDefinition;

use super::{DeadLetter, Lane};
use crate::reading::{Format, Millis};

/// Readings lane of the outbox: seq -> encoded row.
pub const OUTBOX_READINGS: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_readings");
/// Events lane of the outbox: seq -> encoded row.
pub const OUTBOX_EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_events");
/// Payloads that did not decode: id -> encoded dead letter. Bounded, oldest removed.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Rule-engine state: key -> opaque bytes.
pub const RULE_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("rule_state");
/// Event log: (time, seq) -> encoded (type, device, json). Bounded, oldest removed.
pub const EVENT_LOG: TableDefinition<(i64, u64), &[u8]> = TableDefinition::new("event_log");
/// Downlink commands waiting for their device: (device, seq) -> encoded command
/// (`commands.rs`).
pub const COMMANDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("commands");
/// Counters and cursors: name -> value.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// `META` key of the database epoch ([`new_epoch`]).
pub const EPOCH: &str = "epoch";

/// A new database epoch: the creation time in seconds since the Unix epoch in the high
/// 32 bits (so a later database usually has a larger epoch) and 32 random bits in the low
/// half (so two databases created in the same second, or under a clock that is wrong
/// after a boot without network time, still differ). Never 0.
pub fn new_epoch() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let random = rand::random::<u32>();
    ((secs as u32 as u64) << 32 | random as u64).max(1)
}

/// An epoch as written in message ids and reports: 16 lowercase hex digits.
pub fn epoch_hex(epoch: u64) -> String {
    format!("{epoch:016x}")
}

/// The table that holds one lane of the outbox.
pub fn lane_table(lane: Lane) -> TableDefinition<'static, u64, &'static [u8]> {
    match lane {
        Lane::Reading => OUTBOX_READINGS,
        Lane::Event => OUTBOX_EVENTS,
    }
}

pub fn format_to_u8(format: Format) -> u8 {
    match format {
        Format::Json => 0,
        Format::Cbor => 1,
        Format::SenmlJson => 2,
        Format::SenmlCbor => 3,
    }
}

pub fn format_from_u8(b: u8) -> Option<Format> {
    Some(match b {
        0 => Format::Json,
        1 => Format::Cbor,
        2 => Format::SenmlJson,
        3 => Format::SenmlCbor,
        _ => return None,
    })
}

/// Appends `s` with a u16 length prefix; longer strings are cut at a char boundary. The
/// length written.
pub(super) fn put_str(out: &mut impl BufMut, s: &str) -> u16 {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16_le(end as u16);
    out.put_slice(&s.as_bytes()[..end]);
    end as u16
}

/// A cursor over an encoded row; every read checks bounds.
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    pub(super) fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub(super) fn str(&mut self) -> Option<&'a str> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }
}

/// Where an outbox row's topic starts: after `received_at`, the format and the topic's
/// length.
pub(super) const OUTBOX_TOPIC_AT: usize = 8 + 1 + 2;

/// Outbox row layout: `received_at: i64 LE | format: u8 | topic: str16 | device: str16 | payload`.
/// Appends the row to `out` (which has room for [`outbox_len`] bytes, or grows) and
/// returns the lengths of the topic and the device id as written (cut at 64 KiB).
pub fn encode_outbox(
    out: &mut impl BufMut,
    received_at: Millis,
    format: Format,
    topic: &str,
    device: &str,
    payload: &[u8],
) -> (u16, u16) {
    out.put_i64_le(received_at);
    out.put_u8(format_to_u8(format));
    let topic_len = put_str(out, topic);
    let device_len = put_str(out, device);
    out.put_slice(payload);
    (topic_len, device_len)
}

/// The size of an outbox row ([`encode_outbox`]); more than it when the topic or device
/// id is cut.
pub fn outbox_len(topic: &str, device: &str, payload: &[u8]) -> usize {
    OUTBOX_TOPIC_AT + 2 + topic.len() + device.len() + payload.len()
}

/// The fields of an encoded outbox row before its payload, borrowed from the row bytes
/// (the payload is the rest; [`super::Row`] keeps where it starts).
pub struct OutboxFields<'a> {
    pub received_at: Millis,
    pub format: Format,
    pub topic: &'a str,
    pub device: &'a str,
}

pub fn decode_outbox(buf: &[u8]) -> Option<OutboxFields<'_>> {
    let mut c = Cursor { buf };
    let received_at = c.i64()?;
    let format = format_from_u8(c.u8()?)?;
    let topic = c.str()?;
    let device = c.str()?;
    Some(OutboxFields {
        received_at,
        format,
        topic,
        device,
    })
}

/// The time an encoded outbox row was received, without decoding the rest.
pub fn outbox_received_at(buf: &[u8]) -> Option<Millis> {
    Cursor { buf }.i64()
}

/// Dead-letter layout: `received_at: i64 | topic: str16 | reason: str16 | payload`.
pub fn encode_dead_letter(out: &mut Vec<u8>, dl: &DeadLetter) {
    out.clear();
    out.extend_from_slice(&dl.received_at.to_le_bytes());
    put_str(out, &dl.topic);
    put_str(out, &dl.reason);
    out.extend_from_slice(&dl.payload);
}

pub fn decode_dead_letter(buf: &[u8]) -> Option<DeadLetter> {
    let mut c = Cursor { buf };
    let received_at = c.i64()?;
    let topic = c.str()?.to_owned();
    let reason = c.str()?.to_owned();
    Some(DeadLetter {
        topic,
        payload: c.buf.to_vec(),
        reason,
        received_at,
    })
}

/// Event-log layout: `event_type: str16 | device: str16 | json`.
pub fn encode_logged_event(out: &mut Vec<u8>, event_type: &str, device: &str, json: &[u8]) {
    out.clear();
    put_str(out, event_type);
    put_str(out, device);
    out.extend_from_slice(json);
}

pub fn decode_logged_event(buf: &[u8]) -> Option<(&str, &str, &[u8])> {
    let mut c = Cursor { buf };
    let event_type = c.str()?;
    let device = c.str()?;
    Some((event_type, device, c.buf))
}

/// Every row of an outbox lane of `db`, in order (for tests).
#[cfg(test)]
pub(super) fn lane_rows(db: &redb::Database, lane: Lane) -> Vec<(u64, Vec<u8>)> {
    use redb::{ReadableDatabase, ReadableTable};
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(lane_table(lane)).unwrap();
    t.iter()
        .unwrap()
        .map(|r| {
            let (k, v) = r.unwrap();
            (k.value(), v.value().to_vec())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_differ_and_print_as_16_hex_digits() {
        let (a, b) = (new_epoch(), new_epoch());
        assert_ne!(
            a, b,
            "two epochs of the same second differ in their random half"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            (a >> 32).abs_diff(now) <= 5,
            "the high half is the creation second"
        );
        assert_eq!(epoch_hex(0x1a), "000000000000001a");
        assert_eq!(epoch_hex(a).len(), 16);
    }
}
