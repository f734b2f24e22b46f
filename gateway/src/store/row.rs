//! An outbox message as its stored row, encoded once and then shared.
//!
//! A reading is encoded into its row (`tables::encode_outbox`) when it is accepted, into
//! a chunk it shares with the rows decoded before and after it ([`Row::encode_in`]; other
//! rows get an allocation of their own size, [`Row::encode`]). The same bytes are then
//! what the group's journal record copies, what the store holds in memory until the next
//! checkpoint (`fresh.rs`), what the forwarder reads from the store's tail (`tail.rs`)
//! and, sliced, the payload it hands to the upstream client: clones of one [`Bytes`], not
//! copies. Before, a reading's device id and payload were copied into the entry, the
//! encoded row copied into the held map, and the entry's fields moved on to the
//! forwarder: three allocations and two copies of the payload more per reading.
//!
//! Invariants:
//! - `bytes` is a well-formed row: a `Row` is made only by [`Row::encode`] or
//!   [`Row::encode_in`], or by [`Row::decode`], which checks the layout and that the
//!   topic and device are UTF-8.
//! - The topic and device are read from the row on every access, without checking their
//!   UTF-8 again (it was checked when the row was made), not kept a second time beside it.

use std::fmt;

use bytes::{Bytes, BytesMut};

use super::tables::{self, OUTBOX_TOPIC_AT as TOPIC_AT};
use crate::reading::{Format, Millis};

/// Room [`Row::encode_in`] takes at a time: some 100 rows of 1000 devices' readings.
pub const ROW_CHUNK: usize = 16 * 1024;

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
        let mut out = Vec::with_capacity(tables::outbox_len(topic, device, payload));
        let lens = tables::encode_outbox(&mut out, received_at, format, topic, device, payload);
        Row::written(Bytes::from(out), received_at, format, lens)
    }

    /// [`Row::encode`], written into `buf` (which the caller keeps between rows) and
    /// split off it: the rows of a chunk of [`ROW_CHUNK`] bytes share one allocation and
    /// one reference count, where a row of its own took two allocations (its bytes, and
    /// the shared header its first clone adds: 1.01 and 1.19 allocations per reading in
    /// `bench/allocs.sh`). Rows live from their decoding to their PUBACK upstream or the
    /// next checkpoint, in order, so a chunk is given back soon after its last row was
    /// written; once every row of it is gone, `buf` writes over it again.
    pub fn encode_in(
        buf: &mut BytesMut,
        received_at: Millis,
        format: Format,
        topic: &str,
        device: &str,
        payload: &[u8],
    ) -> Row {
        let len = tables::outbox_len(topic, device, payload);
        if buf.capacity() < len {
            buf.reserve(len.max(ROW_CHUNK));
        }
        let lens = tables::encode_outbox(buf, received_at, format, topic, device, payload);
        Row::written(buf.split().freeze(), received_at, format, lens)
    }

    /// A row read back as bytes; `None` when they are not a well-formed row.
    pub fn decode(bytes: Bytes) -> Option<Row> {
        let f = tables::decode_outbox(&bytes)?;
        let (received_at, format) = (f.received_at, f.format);
        let lens = (f.topic.len() as u16, f.device.len() as u16);
        Some(Row::written(bytes, received_at, format, lens))
    }

    /// A row whose `bytes` hold a well-formed row with a topic and device id of `lens`
    /// bytes, both UTF-8 (the three constructors above make sure of it).
    fn written(bytes: Bytes, received_at: Millis, format: Format, lens: (u16, u16)) -> Row {
        let (topic_len, device_len) = lens;
        Row {
            bytes,
            received_at,
            format,
            topic_len,
            device_len,
        }
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
        // SAFETY: the fields are private and set only by `Row::encode` and
        // `Row::encode_in`, which write the topic and the device from `&str`s cut at a
        // char boundary, and `Row::decode`, which checks both are UTF-8; `Bytes` never
        // changes its bytes (rows split off one chunk do not overlap). The check is not
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

    #[test]
    fn rows_written_into_a_chunk_are_the_same_rows_and_share_it() {
        let mut buf = BytesMut::new();
        let a = Row::encode_in(&mut buf, 7, Format::Json, "devices/a/t", "a", b"{\"t\":1}");
        let b = Row::encode_in(&mut buf, 8, Format::Cbor, "devices/b/t", "b", b"\xa0");
        assert_eq!(
            a,
            Row::encode(7, Format::Json, "devices/a/t", "a", b"{\"t\":1}")
        );
        assert_eq!(b, Row::encode(8, Format::Cbor, "devices/b/t", "b", b"\xa0"));
        assert_eq!(
            b.bytes().as_ptr(),
            a.bytes()[a.len()..].as_ptr(),
            "one chunk"
        );
        assert!(buf.is_empty());

        // A row longer than a chunk is written whole, in room of its own.
        let payload = vec![b'x'; ROW_CHUNK + 1];
        let long = Row::encode_in(&mut buf, 9, Format::Json, "devices/c/t", "c", &payload);
        assert_eq!(long.payload(), &payload[..]);
        assert_eq!(Row::decode(long.bytes().clone()).unwrap(), long);

        // Once every row of a full chunk is gone, the next rows are written over it.
        let mut buf = BytesMut::new();
        let row = |buf: &mut BytesMut| Row::encode_in(buf, 1, Format::Json, "d/a/t", "a", b"{}");
        let mut rows = vec![row(&mut buf)];
        let start = rows[0].bytes().as_ptr();
        while buf.capacity() >= rows[0].len() {
            rows.push(row(&mut buf));
        }
        assert!(rows.len() > 100, "{} rows in a chunk", rows.len());
        drop(rows);
        assert_eq!(row(&mut buf).bytes().as_ptr(), start, "a new chunk");
    }
}
