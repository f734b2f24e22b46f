//! Work the owner thread does as it gathers each group: the pipeline's decode stage and
//! the rules (`decode::stage`) run here, just before the commit they hand their work to,
//! instead of on a thread of their own.
//!
//! A thread of their own woke about 1,100 times a second at 1000 devices x 10/s, paced to
//! the commits, to do about 2.6 us of work per reading: most of its CPU was the wake-up
//! and the hand-off (BENCHMARKS.md, "Decode on the store's thread"). Here the owner, which
//! wakes for each commit anyway, takes what the broker handed over, has it decoded and
//! evaluated, and commits the result in the same round.
//!
//! Invariants:
//! - the owner wakes for the feed's input as it wakes for its own channels (one wait on
//!   all of them) and for the feed's timers ([`Feed::next_wake`]); under load it sleeps
//!   out the commit spacing without looking at the input, which waits in its channel
//!   (bounded: a full one slows the devices down, see `ingest.rs`);
//! - what the feed hands to the store while it runs on the owner thread ([`keep`]) joins
//!   the group being gathered, in the order it was handed over, after the commands taken
//!   from the queue: it never waits on the bounded queue, which only this thread empties;
//! - the feed ends when told to ([`super::StoreHandle::end_feed`]) or when the store shuts
//!   down: what its input holds at that moment is handled, then [`Feed::finish`] runs,
//!   and the group after it holds what that handed over.

use std::cell::RefCell;
use std::time::Instant;

use rumqttd::Ingested;

use super::DataCmd;

/// The work the owner thread runs before each group (see the module header).
pub trait Feed: Send {
    /// The channel the owner also waits on; `None` once the feed stops taking input, and
    /// while it holds a message.
    fn input(&self) -> Option<&flume::Receiver<Ingested>>;
    /// Keeps a message the owner took from [`input`](Self::input) while it waited: the
    /// next [`run`](Self::run) handles it first.
    fn hold(&mut self, message: Ingested);
    /// Messages waiting to be handled (a held one included).
    fn queued(&self) -> usize;
    /// When the feed must run even without input (its timers).
    fn next_wake(&self) -> Option<Instant>;
    /// Handles up to `max` of the waiting messages and whatever timers are due. Returns
    /// false once the input is over (stopped and drained, or its sender gone).
    fn run(&mut self, max: usize) -> bool;
    /// Takes no more input than what waits now.
    fn stop(&mut self);
    /// Ends the feed once its input is over.
    fn finish(self: Box<Self>);
}

/// Builds the feed on the owner thread, which runs it from then on.
pub type StartFeed = Box<dyn FnOnce() -> Box<dyn Feed> + Send>;

thread_local! {
    /// Set on the owner thread while a feed runs: where its hand-offs go.
    static INBOX: RefCell<Option<Vec<DataCmd>>> = const { RefCell::new(None) };
}

/// Runs `work` (the feed, on the owner thread) with every data command handed to the
/// store meanwhile appended to `into` instead of the queue.
pub(super) fn collecting<T>(into: &mut Vec<DataCmd>, work: impl FnOnce() -> T) -> T {
    INBOX.with(|inbox| *inbox.borrow_mut() = Some(std::mem::take(into)));
    let result = work();
    *into = INBOX
        .with(|inbox| inbox.borrow_mut().take())
        .unwrap_or_default();
    result
}

/// Keeps `cmd` for the group being gathered when this is the owner thread running its
/// feed; gives it back otherwise (it goes through the queue).
pub(super) fn keep(cmd: DataCmd) -> Option<DataCmd> {
    INBOX.with(|inbox| match inbox.borrow_mut().as_mut() {
        Some(kept) => {
            kept.push(cmd);
            None
        }
        None => Some(cmd),
    })
}
