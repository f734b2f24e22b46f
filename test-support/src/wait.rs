//! Waiting for a condition: poll it every 20 ms until it holds or a deadline passes.
//!
//! Invariants: every wait has a timeout; on timeout it panics naming what it waited for.
//! [`wait_until`] blocks the thread (plain `#[test]`s); [`wait_until_async`] sleeps on
//! tokio's clock and so suits async tests, paused time included.

use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(20);

/// Blocks until `cond` holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(POLL);
    }
}

/// Waits until `cond` holds without blocking the runtime; panics with `what` after
/// `timeout`.
pub async fn wait_until_async(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}
