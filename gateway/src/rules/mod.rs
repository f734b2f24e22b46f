//! Rules: operator-edited rule files, compiled once, evaluated per (rule, device) instance.
//!
//! Owns loading and validating rule files ([`RuleSet`], [`Diagnostics`]), the state machine
//! that turns readings and time into events ([`Engine`]), change detection for hot reload
//! ([`Watcher`]), the actions a rule takes on a transition ([`Action`]: a publish on the
//! embedded broker or a webhook call), and the
//! `rules check` / `rules test` commands ([`check_command`], [`test_command`]).
//! Input: rule files (TOML + CEL), decoded readings, the current time passed in by the caller.
//! Output: `events::Event`s on transitions, the [`Rendered`] actions of those transitions, a
//! serializable [`EngineState`] to persist.
//!
//! Invariants:
//! - Pure and deterministic: no clock, no I/O in the engine; the caller owns time,
//!   persistence and publishing.
//! - A rule set is swapped whole: an invalid edit never replaces a valid set.
//! - File format: `rules/README.md`.

mod action;
mod cel_guard;
mod diagnostics;
mod engine;
mod eval;
mod fast;
mod load;
mod rule;
mod ruleset;
mod snapshot;
mod stage;
mod state;
mod testing;
mod watcher;
mod window;

pub use action::{
    messages as action_messages, Action, ActionMessage, Rendered, Target, Template, WebhookCall,
    WebhookOutcome, WebhookResult, WebhookSettings, ACTION_EVENT_TYPE, DEFAULT_ACTION_QOS,
    DEFAULT_WEBHOOK_RETRIES, DEFAULT_WEBHOOK_TIMEOUT, WEBHOOK_EVENT_TYPE,
};
pub use cel_guard::{MAX_EXPR_BYTES, MAX_EXPR_DEPTH};
pub use diagnostics::{Diagnostic, Diagnostics};
pub use engine::Engine;
pub use fast::AGG_VAR;
pub use load::DEFAULT_SEVERITY;
pub use rule::{AggFn, Aggregate, DeviceMatch, Rule, RuleKind, TopicFilter, WindowSpec};
pub use ruleset::{rule_files, test_files, RuleSet, TEST_SUFFIX};
pub use snapshot::{InstanceView, ReloadView, RuleView, RulesSnapshot, SharedRules};
pub use stage::{load_for_start, RulesLoop, RulesStage};
pub use state::{
    EngineState, EngineStats, Instance, InstanceRecord, InstanceState, InstanceStatus,
    REASON_RULE_REMOVED, STATE_VERSION,
};
pub use testing::{check_command, run_test_file, test_command, TestOutcome};
pub use watcher::Watcher;
pub use window::Window;

#[cfg(test)]
mod tests;
