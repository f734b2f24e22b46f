//! The pipeline's stage threads (device events: an OS thread, since its work blocks; decode
//! and the rules run on the store's thread), and waiting for them from async code with a
//! deadline.
//!
//! Invariants:
//! - every thread holds a sender of one completion channel until it returns or unwinds,
//!   so the wait needs no polling and blocks no runtime worker;
//! - a wait never outlasts its deadline: a thread still running then is reported by name
//!   and left behind (it ends with the process), never joined.

use std::thread::JoinHandle;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// The stage threads, and a way to wait for them with a deadline.
pub struct StageThreads {
    handles: Vec<JoinHandle<()>>,
    /// Every thread holds a clone until it returns (or unwinds), so `done_rx` reports
    /// `None` once all of them have ended.
    done_tx: mpsc::Sender<()>,
    done_rx: mpsc::Receiver<()>,
}

impl StageThreads {
    pub fn new() -> Self {
        let (done_tx, done_rx) = mpsc::channel(1);
        StageThreads {
            handles: Vec::new(),
            done_tx,
            done_rx,
        }
    }

    /// Starts `stage` on a thread named `name`.
    pub fn spawn(
        &mut self,
        name: &str,
        stage: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let done = self.done_tx.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _done = done;
                stage();
            })?;
        self.handles.push(handle);
        Ok(())
    }

    /// Waits until every thread has ended or `deadline` passes; returns the names of those
    /// still running.
    pub async fn wait(self, deadline: Instant) -> Vec<String> {
        let StageThreads {
            handles,
            done_tx,
            mut done_rx,
        } = self;
        drop(done_tx);
        let all_done = matches!(
            tokio::time::timeout_at(deadline, done_rx.recv()).await,
            Ok(None)
        );
        let mut still_running = Vec::new();
        for handle in handles {
            if all_done || handle.is_finished() {
                // Ended (or returning now): the join is immediate.
                let _ = handle.join();
            } else {
                still_running.push(handle.thread().name().unwrap_or("stage").to_owned());
            }
        }
        still_running
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_wait_ends_when_every_thread_has() {
        let mut threads = StageThreads::new();
        for name in ["a", "b"] {
            threads
                .spawn(name, || std::thread::sleep(Duration::from_millis(20)))
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(threads.wait(deadline).await.is_empty());
        assert!(Instant::now() < deadline);
    }

    #[tokio::test]
    async fn a_stuck_thread_is_named_and_left_behind_at_the_deadline() {
        let mut threads = StageThreads::new();
        threads.spawn("quick", || {}).unwrap();
        threads
            .spawn("stuck", || loop {
                std::thread::park();
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        assert_eq!(threads.wait(deadline).await, ["stuck"]);
        assert!(Instant::now() < deadline + Duration::from_secs(1));
    }
}
