//! What the rules stage publishes for readers (the HTTP API) so they never touch the
//! engine: the loaded rules, the instances that are not idle, the last reload's result and
//! the events emitted by type and state, the actions published by rule and transition, the
//! webhook calls by rule and outcome.
//!
//! Written by the rules stage at start, on every transition and on every reload attempt,
//! and by the webhook task when a call ends (`crate::webhook`); read by cloning under a
//! short lock ([`SharedRules::get`]).
//!
//! Invariants: the snapshot is replaced whole, so a reader sees one consistent moment;
//! event and action counts only grow while the process runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::{Engine, InstanceState, WebhookResult};
use crate::events::{Event, EventState};
use crate::reading::Millis;

/// One loaded rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleView {
    pub name: String,
    pub file: String,
    pub event: String,
    pub kind: &'static str,
    pub severity: String,
    pub description: Option<String>,
}

/// One (rule, device) instance that is pending or firing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceView {
    pub rule: String,
    pub event: String,
    pub severity: String,
    pub device: String,
    /// `pending` or `firing`.
    pub state: &'static str,
    /// When it entered that state (Unix ms).
    pub since: Millis,
    pub last_seen: Millis,
}

/// The outcome of the last load of the rules directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReloadView {
    pub at: Millis,
    pub ok: bool,
    pub rules: usize,
    /// Every problem as `file:line:col: message` (empty when `ok`).
    pub errors: Vec<String>,
}

/// The published state of the rules stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RulesSnapshot {
    pub rules: Vec<RuleView>,
    pub instances: Vec<InstanceView>,
    pub last_reload: Option<ReloadView>,
    /// Events emitted since start, by `(type, state)`.
    #[serde(skip)]
    pub events: BTreeMap<(String, &'static str), u64>,
    /// Actions published since start, by `(rule, on)`.
    #[serde(skip)]
    pub actions: BTreeMap<(String, &'static str), u64>,
    /// Actions the local broker did not take, by `(rule, on)`.
    #[serde(skip)]
    pub action_failures: BTreeMap<(String, &'static str), u64>,
    /// Webhook calls ended since start, by `(rule, outcome)`.
    #[serde(skip)]
    pub webhooks: BTreeMap<(String, WebhookResult), u64>,
}

impl RulesSnapshot {
    /// Replaces rules and instances with the engine's current ones.
    pub fn refresh(&mut self, engine: &Engine) {
        let rules = engine.rules();
        self.rules = rules
            .rules()
            .iter()
            .map(|r| RuleView {
                name: r.name.clone(),
                file: r.file.clone(),
                event: r.event.clone(),
                kind: r.kind.name(),
                severity: r.severity.clone(),
                description: r.description.clone(),
            })
            .collect();
        self.instances = engine
            .active_instances()
            .into_iter()
            .filter_map(|i| {
                let (state, since) = match i.state {
                    InstanceState::Inactive => return None,
                    InstanceState::Pending { since } => ("pending", since),
                    InstanceState::Firing { since, .. } => ("firing", since),
                };
                let rule = rules.get(&i.rule)?;
                Some(InstanceView {
                    event: rule.event.clone(),
                    severity: rule.severity.clone(),
                    rule: i.rule,
                    device: i.device,
                    state,
                    since,
                    last_seen: i.last_seen,
                })
            })
            .collect();
    }

    /// Counts one action of `rule` on transition `on`, published or not.
    pub fn count_action(&mut self, rule: &str, on: EventState, published: bool) {
        let counts = if published {
            &mut self.actions
        } else {
            &mut self.action_failures
        };
        *counts.entry((rule.to_string(), on.as_str())).or_default() += 1;
    }

    /// Counts one webhook call of `rule` that ended with `result`.
    pub fn count_webhook(&mut self, rule: &str, result: WebhookResult) {
        *self.webhooks.entry((rule.to_string(), result)).or_default() += 1;
    }

    pub fn count_events<'a>(&mut self, events: impl IntoIterator<Item = &'a Event>) {
        for e in events {
            *self
                .events
                .entry((e.event_type.clone(), e.data.state.as_str()))
                .or_default() += 1;
        }
    }

    /// Firing instances of `device`.
    pub fn firing<'a>(&'a self, device: &'a str) -> impl Iterator<Item = &'a InstanceView> {
        self.instances
            .iter()
            .filter(move |i| i.device == device && i.state == "firing")
    }
}

/// The snapshot shared between the rules stage (writer) and readers.
#[derive(Debug, Clone, Default)]
pub struct SharedRules(Arc<Mutex<RulesSnapshot>>);

impl SharedRules {
    /// A copy of the current snapshot.
    pub fn get(&self) -> RulesSnapshot {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Applies `f` to the snapshot under the lock.
    pub fn update(&self, f: impl FnOnce(&mut RulesSnapshot)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }
}
