//! The newest committed outbox rows, kept in memory for the one reader that reads the
//! outbox in order (the forwarder, [`super::StoreHandle::read_outbox_live`]), so that
//! under live traffic it takes the rows the owner thread has just committed instead of
//! opening a read transaction and decoding them again from the file.
//!
//! Invariants:
//! - rows enter only after the commit that holds them, in seq order per lane; the owner
//!   moves them out of the commands it applied (no copy);
//! - the tail of a lane *covers* from a seq `c` when it holds every committed row of
//!   that lane with seq >= `c` that the reader has not taken yet. A read from a seq below
//!   `c`, or while the tail covers nothing, goes to the file, so the tail never hides a
//!   row: it only answers reads it can answer whole;
//! - each row is handed over once; taking rows moves the coverage past them, so a later
//!   read from an earlier seq (a replay after a reconnect) goes to the file;
//! - bounded: when [`TAIL_ROWS`] would be exceeded (the reader is not keeping up, e.g.
//!   upstream is down), the tail empties and covers nothing until the reader reads
//!   again; from then on it covers from the next row committed, and the reader gets
//!   what lies before from the file;
//! - nothing is kept until the reader's first read (a gateway without upstream keeps no
//!   rows here);
//! - rows committed since the last checkpoint are in the journal but not yet in the file
//!   (`journal.rs`): a reader that reads the file to its end while such rows exist asks
//!   the owner for a checkpoint (once until it happens), so it does not wait up to the
//!   checkpoint interval for rows the tail no longer covers.
//!
//! A row that retention drops in the same commit that appended it (an outbox smaller than
//! one group) may still be handed over from here: it is then forwarded once, and its ack
//! deletes nothing.

use std::collections::VecDeque;

use super::{ByLane, Lane, OutboxRow};

/// Most rows kept per lane: about 65 ms of rows at 250k readings/s. With 1024, the tail
/// overflowed under full load whenever the forwarder fell a few milliseconds behind; the
/// forwarder then read the file, which asked for a checkpoint each time, and every row
/// went through the B-tree (BENCHMARKS.md, "Rows that come and go between two
/// checkpoints").
pub const TAIL_ROWS: usize = 16384;
/// Capacity a lane keeps once the reader has emptied it: a few commits' rows at 1000
/// devices x 10/s. A full tail is about 1.5 MB of row headers, and even 1024 rows of room
/// per lane is memory nothing uses once a burst is over.
const TAIL_KEEP: usize = 64;

#[derive(Default)]
pub(super) struct Tails {
    lanes: ByLane<Tail>,
    /// Set by the reader's first read; until then the owner keeps nothing.
    pub(super) wanted: bool,
    /// Rows were committed to the journal since the last checkpoint, so the file does not
    /// have them yet (`journal.rs`).
    pub(super) journaled: bool,
    /// The reader asked for a checkpoint that has not happened yet.
    checkpoint_asked: bool,
}

#[derive(Default)]
struct Tail {
    rows: VecDeque<OutboxRow>,
    /// The seq from which every committed row of the lane is here (see the module
    /// header); `None`: covers nothing.
    covers_from: Option<u64>,
    /// The reader read while the tail covered nothing: cover again from the next row.
    resume: bool,
}

impl Tails {
    /// For a reader at the end of the file: whether to ask the owner for a checkpoint
    /// (rows are only journaled, and no checkpoint is asked for already).
    pub(super) fn ask_checkpoint(&mut self) -> bool {
        let ask = self.journaled && !self.checkpoint_asked;
        self.checkpoint_asked |= ask;
        ask
    }

    /// Everything committed is in the file now.
    pub(super) fn checkpointed(&mut self) {
        self.journaled = false;
        self.checkpoint_asked = false;
    }

    /// Rows of `lane` just committed, in seq order.
    pub(super) fn push(&mut self, lane: Lane, rows: &mut Vec<OutboxRow>) {
        let tail = &mut self.lanes[lane];
        let Some(first) = rows.first().map(|r| r.seq) else {
            return;
        };
        if tail.covers_from.is_none() {
            if !tail.resume {
                rows.clear();
                return;
            }
            tail.resume = false;
            tail.covers_from = Some(first);
        }
        if tail.rows.len() + rows.len() > TAIL_ROWS {
            tail.rows = VecDeque::new();
            tail.covers_from = None;
            rows.clear();
            return;
        }
        tail.rows.extend(rows.drain(..));
    }

    /// Moves up to `limit` rows of `lane` with seq >= `from_seq` into `out`, in seq order;
    /// `false` (and nothing moved) when the tail cannot answer: read the file instead.
    pub(super) fn take(
        &mut self,
        lane: Lane,
        from_seq: u64,
        limit: usize,
        out: &mut Vec<OutboxRow>,
    ) -> bool {
        self.wanted = true;
        let tail = &mut self.lanes[lane];
        match tail.covers_from {
            Some(c) if from_seq >= c => {}
            Some(_) => return false,
            None => {
                tail.resume = true;
                return false;
            }
        }
        while tail.rows.front().is_some_and(|r| r.seq < from_seq) {
            tail.rows.pop_front();
        }
        let n = tail.rows.len().min(limit);
        out.extend(tail.rows.drain(..n));
        if tail.rows.is_empty() && tail.rows.capacity() > TAIL_KEEP {
            tail.rows.shrink_to(TAIL_KEEP);
        }
        let next = out.last().map_or(from_seq, |r| r.seq + 1).max(from_seq);
        tail.covers_from = Some(next);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Format;
    use crate::store::Row;

    fn row(seq: u64) -> OutboxRow {
        OutboxRow {
            seq,
            lane: Lane::Reading,
            row: Row::encode(0, Format::Json, &format!("devices/d/{seq}"), "d", b""),
        }
    }

    fn seqs(rows: &[OutboxRow]) -> Vec<u64> {
        rows.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn an_emptied_tail_lets_go_of_the_capacity_a_burst_gave_it() {
        let mut t = reading();
        t.push(
            Lane::Reading,
            &mut (1..=TAIL_ROWS as u64).map(row).collect(),
        );
        let capacity = |t: &Tails| t.lanes[Lane::Reading].rows.capacity();
        assert!(capacity(&t) >= TAIL_ROWS);
        let mut out = Vec::new();
        assert!(t.take(Lane::Reading, 1, TAIL_ROWS - 1, &mut out));
        assert!(capacity(&t) >= TAIL_ROWS, "kept while rows are left");
        assert!(t.take(Lane::Reading, TAIL_ROWS as u64, 10, &mut out));
        assert_eq!(out.len(), TAIL_ROWS);
        assert!(capacity(&t) <= TAIL_KEEP, "{}", capacity(&t));
    }

    #[test]
    fn keeps_nothing_before_the_first_read_then_covers_from_the_next_commit() {
        let mut t = Tails::default();
        t.push(Lane::Reading, &mut vec![row(1), row(2)]);
        let mut out = Vec::new();
        assert!(!t.take(Lane::Reading, 1, 10, &mut out), "nothing kept yet");
        t.push(Lane::Reading, &mut vec![row(3), row(5)]);
        // Rows 1 and 2 are in the file only: a read from 1 cannot be answered here.
        assert!(!t.take(Lane::Reading, 1, 10, &mut out));
        assert!(t.take(Lane::Reading, 3, 10, &mut out));
        assert_eq!(seqs(&out), [3, 5]);
    }

    /// A tail that covers from the next push, as after the reader's first read.
    fn reading() -> Tails {
        let mut t = Tails::default();
        assert!(!t.take(Lane::Reading, 0, 0, &mut Vec::new()));
        assert!(!t.take(Lane::Event, 0, 0, &mut Vec::new()));
        t
    }

    #[test]
    fn hands_each_row_over_once_and_sends_earlier_reads_to_the_file() {
        let mut t = reading();
        t.push(Lane::Reading, &mut vec![row(10), row(12), row(13)]);
        let mut out = Vec::new();
        assert!(t.take(Lane::Reading, 10, 2, &mut out));
        assert_eq!(seqs(&out), [10, 12]);
        out.clear();
        // A replay from 10 (a reconnect) must read the file: 10 and 12 are gone from here.
        assert!(!t.take(Lane::Reading, 10, 10, &mut out));
        // Rows the reader already got from the file are skipped.
        assert!(t.take(Lane::Reading, 14, 10, &mut out));
        assert!(out.is_empty());
        t.push(Lane::Reading, &mut vec![row(14)]);
        assert!(t.take(Lane::Reading, 14, 10, &mut out));
        assert_eq!(seqs(&out), [14]);
    }

    #[test]
    fn a_reader_that_falls_behind_empties_it_and_it_covers_again_after_its_next_read() {
        let mut t = reading();
        let mut out = Vec::new();
        let batch = |from: u64| {
            (from..from + TAIL_ROWS as u64 / 2)
                .map(row)
                .collect::<Vec<_>>()
        };
        let half = TAIL_ROWS as u64 / 2;
        t.push(Lane::Reading, &mut batch(1));
        t.push(Lane::Reading, &mut batch(1 + half));
        // Over the bound: emptied.
        t.push(Lane::Reading, &mut batch(1 + 2 * half));
        // Covering nothing until the reader reads again: this push is not kept.
        t.push(Lane::Reading, &mut vec![row(5000)]);
        assert!(!t.take(Lane::Reading, 1, 10, &mut out));
        t.push(Lane::Reading, &mut vec![row(5001)]);
        assert!(
            !t.take(Lane::Reading, 1, 10, &mut out),
            "1..5001 are in the file"
        );
        assert!(t.take(Lane::Reading, 5001, 10, &mut out));
        assert_eq!(seqs(&out), [5001]);
    }

    #[test]
    fn lanes_are_separate() {
        let mut t = reading();
        t.push(Lane::Event, &mut vec![row(2)]);
        t.push(Lane::Reading, &mut vec![row(1), row(3)]);
        let mut out = Vec::new();
        // Seqs are shared by the lanes: the events lane covers from its own first row.
        assert!(!t.take(Lane::Event, 1, 10, &mut out));
        assert!(t.take(Lane::Event, 2, 10, &mut out));
        assert_eq!(seqs(&out), [2]);
        out.clear();
        assert!(t.take(Lane::Reading, 1, 10, &mut out));
        assert_eq!(seqs(&out), [1, 3]);
    }
}
