//! Waiting between retries: exponential backoff, the one shape every retry loop in the
//! gateway uses (the upstream reconnect, the store's reopen while degraded).
//!
//! Owns [`Backoff`]: bounds in, a delay per attempt out. No clock and no sleeping: the
//! caller decides how to wait (a tokio sleep, a deadline checked by a thread).
//!
//! Invariants:
//! - retry 1 waits about `min`, each later one twice as long, never more than `max`;
//! - a delay is never zero, so a retry loop cannot spin;
//! - [`Backoff::delay`] spreads retries with "equal jitter" (a random point in the upper
//!   half), so many clients that failed together do not come back together;
//!   [`Backoff::ceiling`] is the same schedule without jitter.

use std::time::Duration;

use rand::Rng;

/// Shortest delay ever returned, whatever `min` says.
const FLOOR: Duration = Duration::from_millis(1);
/// Doublings after which the delay stops growing even if `max` is not reached yet.
const MAX_DOUBLINGS: u32 = 20;

/// Bounds of an exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the first retry.
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max }
    }

    /// The wait before retry `attempt` (1 is the first retry, 0 counts as 1), without
    /// jitter: `min * 2^(attempt-1)`, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(MAX_DOUBLINGS);
        self.min
            .saturating_mul(1 << doublings)
            .min(self.max)
            .max(FLOOR)
    }

    /// The wait before retry `attempt` with equal jitter: a random delay in
    /// `[ceiling/2, ceiling]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_and_are_capped() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 1..12 {
            let cap = (b.min * (1 << (attempt - 1))).min(b.max);
            assert_eq!(b.ceiling(attempt), cap);
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?}");
            }
        }
        assert_eq!(b.ceiling(0), b.min);
        assert_eq!(b.ceiling(u32::MAX), b.max);
    }

    #[test]
    fn a_zero_minimum_still_waits() {
        let b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.delay(1) > Duration::ZERO);
    }
}
