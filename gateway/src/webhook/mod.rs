//! Webhook calls of rule actions, made off the rules stage: the stage hands each
//! [`WebhookCall`] to a bounded queue ([`WebhookQueue::submit`], never blocking) and the
//! [`Webhooks`] task on the tokio runtime makes the calls ([`client`]).
//!
//! Input: rendered calls from the rules stage. Output: HTTP POSTs; for each call, its final
//! outcome as a `WebhookCalled` record in the event log and a count by (rule, outcome) in
//! the rules snapshot (`gateway_rule_webhooks_total` in `/metrics`).
//!
//! Invariants:
//! - the rules stage never waits for a webhook: with the queue full ([`WEBHOOK_QUEUE`]
//!   calls waiting) a call is dropped, recorded and counted as `dropped`, and logged at
//!   most once per [`DROP_LOG_INTERVAL`] with the number dropped since;
//! - at most [`MAX_IN_FLIGHT`] calls run at once, so one slow endpoint delays the others
//!   only once that many calls are stuck on it;
//! - every call handed over gets exactly one record and one count, whatever happens;
//! - stopping: the task ends once its queue is closed (the rules stage ended) and its
//!   calls are done, or at once when `abandon` is cancelled (the pipeline does that
//!   within the shutdown grace): calls in progress end with the outcome they have,
//!   queued ones are recorded as `dropped`;
//! - records are handed to the store with its ordinary (bounded) send, as every stage
//!   does; a call's outcome is rare next to readings, so that send does not wait in practice.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::reading::now_millis;
use crate::rules::{SharedRules, WebhookCall, WebhookOutcome, WebhookResult, WEBHOOK_EVENT_TYPE};
use crate::store::StoreHandle;

pub mod client;

/// Calls waiting for the webhook task.
pub const WEBHOOK_QUEUE: usize = 256;
/// Calls made at the same time.
pub const MAX_IN_FLIGHT: usize = 8;
/// Least time between two log lines about dropped calls.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Records and counts the final outcome of calls.
#[derive(Clone)]
struct Recorder {
    gateway_id: String,
    store: StoreHandle,
    rules: SharedRules,
}

impl Recorder {
    fn record(&self, call: &WebhookCall, outcome: &WebhookOutcome) {
        let at = now_millis();
        let record = call.record(&self.gateway_id, outcome, at);
        self.store
            .log_event(at, WEBHOOK_EVENT_TYPE, &call.device, record);
        self.rules
            .update(|s| s.count_webhook(&call.rule, outcome.result));
        let status = outcome.status.map(|s| s.to_string()).unwrap_or_default();
        let error = outcome.error.as_deref().unwrap_or_default();
        match outcome.result {
            WebhookResult::Ok => {
                tracing::info!(rule = %call.rule, device = %call.device, url = %call.url, status, attempts = outcome.attempts, "Webhook called.")
            }
            // Counted and logged in batches by the queue.
            WebhookResult::Dropped if outcome.attempts == 0 => {}
            _ => {
                tracing::warn!(rule = %call.rule, device = %call.device, url = %call.url, outcome = outcome.result.as_str(), status, error, attempts = outcome.attempts, "Webhook call failed.")
            }
        }
    }

    fn dropped(&self, call: &WebhookCall, why: &str) {
        let outcome = WebhookOutcome {
            result: WebhookResult::Dropped,
            status: None,
            error: Some(why.to_string()),
            attempts: 0,
        };
        self.record(call, &outcome);
    }
}

/// The rules stage's end of the queue.
pub struct WebhookQueue {
    tx: mpsc::Sender<WebhookCall>,
    recorder: Recorder,
    /// Calls dropped since the last log line about them, and when that was.
    unlogged_drops: u64,
    last_drop_log: Option<Instant>,
}

/// The task that makes the calls.
pub struct Webhooks {
    input: mpsc::Receiver<WebhookCall>,
    recorder: Recorder,
    abandon: CancellationToken,
}

/// A queue of `capacity` calls and the task that serves it; `abandon` cuts the task short
/// (see the module header).
pub fn channel(
    capacity: usize,
    gateway_id: &str,
    store: StoreHandle,
    rules: SharedRules,
    abandon: CancellationToken,
) -> (WebhookQueue, Webhooks) {
    let (tx, input) = mpsc::channel(capacity);
    let recorder = Recorder {
        gateway_id: gateway_id.to_string(),
        store,
        rules,
    };
    let queue = WebhookQueue {
        tx,
        recorder: recorder.clone(),
        unlogged_drops: 0,
        last_drop_log: None,
    };
    let task = Webhooks {
        input,
        recorder,
        abandon,
    };
    (queue, task)
}

impl WebhookQueue {
    /// Hands `call` to the webhook task; when the queue is full (or the task is gone) the
    /// call is dropped, recorded and counted. Never waits.
    pub fn submit(&mut self, call: WebhookCall) {
        let (call, why) = match self.tx.try_send(call) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(call)) => (call, "the webhook queue was full"),
            Err(mpsc::error::TrySendError::Closed(call)) => (call, "the webhook task has stopped"),
        };
        self.recorder.dropped(&call, why);
        self.unlogged_drops += 1;
        if self
            .last_drop_log
            .is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL)
        {
            tracing::warn!(dropped = self.unlogged_drops, rule = %call.rule, reason = why, "Webhook calls dropped.");
            self.unlogged_drops = 0;
            self.last_drop_log = Some(Instant::now());
        }
    }
}

impl Webhooks {
    pub async fn run(mut self) {
        let mut in_flight = JoinSet::new();
        let mut open = true;
        loop {
            if !open && in_flight.is_empty() {
                tracing::debug!("Webhook calls done.");
                return;
            }
            tokio::select! {
                () = self.abandon.cancelled() => break,
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                call = self.input.recv(), if open && in_flight.len() < MAX_IN_FLIGHT => match call {
                    Some(call) => {
                        let recorder = self.recorder.clone();
                        let abandon = self.abandon.clone();
                        in_flight.spawn(async move {
                            let outcome = client::call(&call, &abandon).await;
                            recorder.record(&call, &outcome);
                        });
                    }
                    None => open = false,
                },
            }
        }
        // Abandoned: calls in progress record what they have; queued ones were never made.
        self.input.close();
        let mut left = 0;
        while let Ok(call) = self.input.try_recv() {
            self.recorder
                .dropped(&call, "the gateway stopped before the call was made");
            left += 1;
        }
        while in_flight.join_next().await.is_some() {}
        if left > 0 {
            tracing::warn!(
                dropped = left,
                "Webhook calls still queued at shutdown were not made."
            );
        }
    }
}

#[cfg(test)]
mod tests;
