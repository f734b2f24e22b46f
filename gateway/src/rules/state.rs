//! The engine's state: per-instance state machines, and their persisted form.
//!
//! Owns [`Instance`], [`InstanceState`], [`EngineState`] (what the caller persists, e.g. in
//! redb, and hands back to `Engine::restore`), and the status and counter types.
//! Input/output: plain data, serde-serializable; no behaviour beyond construction.
//!
//! Invariants:
//! - `EngineState` names rules by name, event type and kind, never by index, so it survives
//!   edits of the rule files; `version` changes when the layout does.
//! - An `Instance` has one window per aggregate of its rule, in declaration order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::rule::Rule;
use super::window::Window;
use crate::reading::{Millis, Value};

/// The version of [`EngineState`]'s layout.
pub const STATE_VERSION: u32 = 1;
/// `data.reason` of a resolution caused by a reload that removed or changed the rule.
pub const REASON_RULE_REMOVED: &str = "rule-removed";

/// Where one (rule, device) instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum InstanceState {
    Inactive,
    /// The condition has held since `since`; fires at `since + for` (and not in cooldown).
    Pending {
        since: Millis,
    },
    /// Firing since `since`; `clearing_since` is when the clear condition began to hold.
    Firing {
        since: Millis,
        clearing_since: Option<Millis>,
    },
}

impl InstanceState {
    pub fn name(&self) -> &'static str {
        match self {
            InstanceState::Inactive => "inactive",
            InstanceState::Pending { .. } => "pending",
            InstanceState::Firing { .. } => "firing",
        }
    }
}

/// The state of one (rule, device) instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub state: InstanceState,
    /// The time of the last reading the rule applied to.
    pub last_seen: Millis,
    /// When it last resolved (for `cooldown`).
    pub resolved_at: Option<Millis>,
    /// The values (and aggregates as `agg.NAME`) of the reading that started the current
    /// state (made the condition hold, or the clear condition hold); for absence rules, of
    /// the last reading. Copied into events.
    pub values: BTreeMap<String, Value>,
    /// One window per aggregate of the rule, in declaration order.
    pub windows: Vec<Window>,
}

impl Instance {
    pub(super) fn new(rule: &Rule, now: Millis) -> Instance {
        Instance {
            state: InstanceState::Inactive,
            last_seen: now,
            resolved_at: None,
            values: BTreeMap::new(),
            windows: vec![Window::default(); rule.aggregates.len()],
        }
    }
}

/// One instance in the persisted state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub rule: String,
    /// The rule's event type and kind when saved: a rule that changed either starts afresh.
    pub event: String,
    pub kind: String,
    pub severity: String,
    pub device: String,
    pub instance: Instance,
}

/// Everything the engine must remember across a restart (serde: store it as JSON or CBOR).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    pub version: u32,
    pub instances: Vec<InstanceRecord>,
}

/// One line of the status listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceStatus {
    pub rule: String,
    pub device: String,
    pub state: InstanceState,
    pub last_seen: Millis,
}

/// Counters (never reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub readings: u64,
    pub evaluations: u64,
    pub eval_errors: u64,
    pub events: u64,
}
