//! An outbox message as its stored row, encoded once and then shared.
//!
//! A reading is encoded into its row (`tables::encode_outbox`) when it is accepted, in one
//! allocation of the row's size. The same bytes are then what the group's journal record
//! copies, what the store holds in memory until the next checkpoint (`fresh.rs`), what
//! the forwarder reads from the store's tail (`tail.rs`) and, sliced, the payload it hands
//! to the upstream client: clones of one [`Bytes`], not copies. Before, a reading's
//! device id and payload were copied into the entry, the encoded row copied into the held
//! map, and the entry's fields moved on to the forwarder: three allocations and two copies
//! of the payload more per reading.
//!
//! Invariants:
//! - `bytes` is a well-formed row: a `Row` is made only by [`Row::encode`] or by
//!   [`Row::decode`], which checks the layout and that the topic and device are UTF-8.
//! - The topic and device are read from the row on every access, without checking their
//!   UTF-8 again (it was checked when the row was made), not kept a second time beside it.

use std::fmt;

use bytes::Bytes;

use super::tables::{self, OUTBOX_TOPIC_AT as TOPIC_AT};
use crate::reading::{Format, Millis};

/// One encoded outbox row (layout in `tables::encode_outbox`).
#[derive(Clone, PartialEq, Eq)]
pub struct Row {
    bytes: Bytes,
    received_at: Millis,
    format: Format,
    /// Lengths of the topic and the device id as stored (cut at 64 KiB).
    topic_len: u16,
    device_len: u16,
}

impl Row {
    /// Encodes a row, in one allocation of its size.
    pub fn encode(
        received_at: Millis,
        format: Format,
        topic: &str,
        device: &str,
        payload: &[u8],
    ) -> Row {
        // `encode_outbox` reserves the row's size: on an empty vector, exactly that.
        let mut out = Vec::new();
        let (topic_len, device_len) =
            tables::encode_outbox(&mut out, received_at, format, topic, device, payload);
        Row {
            bytes: Bytes::from(out),
            received_at,
            format,
            topic_len,
            device_len,
        }
    }

    /// A row read back as bytes; `None` when they are not a well-formed row.
    pub fn decode(bytes: Bytes) -> Option<Row> {
        let f = tables::decode_outbox(&bytes)?;
        let (received_at, format) = (f.received_at, f.format);
        let (topic_len, device_len) = (f.topic.len() as u16, f.device.len() as u16);
        Some(Row {
            bytes,
            received_at,
            format,
            topic_len,
            device_len,
        })
    }

    pub fn received_at(&self) -> Millis {
        self.received_at
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The topic relative to the upstream prefix.
    pub fn topic(&self) -> &str {
        self.str_at(TOPIC_AT, self.topic_len)
    }

    pub fn device(&self) -> &str {
        self.str_at(self.device_at(), self.device_len)
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.payload_at()..]
    }

    /// The payload, sharing the row's bytes.
    pub fn payload_bytes(&self) -> Bytes {
        self.bytes.slice(self.payload_at()..)
    }

    /// The whole row, as stored.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Length of the stored row (without its key).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn device_at(&self) -> usize {
        TOPIC_AT + usize::from(self.topic_len) + 2
    }

    fn payload_at(&self) -> usize {
        self.device_at() + usize::from(self.device_len)
    }

    fn str_at(&self, at: usize, len: u16) -> &str {
        let bytes = &self.bytes[at..at + usize::from(len)];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: the fields are private and set only by `Row::encode`, which writes the
        // topic and the device from `&str`s cut at a char boundary, and `Row::decode`,
        // which checks both are UTF-8; `Bytes` never changes its bytes. The check is not
        // repeated on every read: the forwarder reads every row's topic.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Row")
            .field("received_at", &self.received_at)
            .field("format", &self.format)
            .field("topic", &self.topic())
            .field("device", &self.device())
            .field("payload", &String::from_utf8_lossy(self.payload()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_row_reads_back_its_fields_and_decodes_to_itself() {
        let row = Row::encode(42, Format::SenmlCbor, "d/t-1/x", "t-1", b"\x01\x02");
        assert_eq!(
            (row.received_at(), row.format(), row.topic(), row.device()),
            (42, Format::SenmlCbor, "d/t-1/x", "t-1")
        );
        assert_eq!(row.payload(), b"\x01\x02");
        assert_eq!(row.len(), 13 + 7 + 3 + 2);
        assert_eq!(tables::outbox_received_at(row.bytes()), Some(42));
        let again = Row::decode(row.bytes().clone()).unwrap();
        assert_eq!(again, row);
        assert!(Row::decode(row.bytes().slice(..12)).is_none());
    }

    #[test]
    fn the_payload_shares_the_row_s_bytes() {
        let row = Row::encode(1, Format::Json, "devices/d/t", "d", b"{\"t\":1}");
        let payload = row.payload_bytes();
        assert_eq!(&payload[..], b"{\"t\":1}");
        let at = row.bytes().as_ptr() as usize + row.len() - payload.len();
        assert_eq!(
            payload.as_ptr() as usize,
            at,
            "a slice of the row, not a copy"
        );
    }

    #[test]
    fn a_long_topic_is_cut_at_a_char_boundary_and_the_rest_still_reads() {
        let topic = "é".repeat(40_000);
        let row = Row::encode(1, Format::Json, &topic, "d", b"{}");
        assert!(row.topic().len() <= u16::MAX as usize && topic.starts_with(row.topic()));
        assert_eq!((row.device(), row.payload()), ("d", &b"{}"[..]));
        assert_eq!(Row::decode(row.bytes().clone()).unwrap(), row);
    }
}
