//! Rule actions: what a rule does when one of its instances fires or resolves
//! (`[[rule.action]]`, documented in `rules/README.md`): publish a message on the embedded
//! broker (`topic`), or POST it to an HTTP endpoint (`url`, a webhook).
//!
//! Owns [`Action`] (when, where to and payload template), the placeholder syntax of
//! those templates ([`Template`], in `template.rs`), their rendering for one [`Event`] ([`Action::render`],
//! giving a [`Rendered`] action: an [`ActionMessage`] to publish or a [`WebhookCall`] to
//! make) and the event-log record of a published action ([`ActionMessage::record`], a
//! CloudEvent of type [`ACTION_EVENT_TYPE`]).
//! Input: template text from a rule file, checked by `load`; events from the engine.
//! Output: topic, payload and QoS to publish, or URL, payload and settings to POST; the
//! JSON to append to the event log.
//!
//! Invariants:
//! - A placeholder is `{NAME}` with NAME made of letters, digits, `_`, `.` and `-`; any
//!   other brace is literal text, so JSON payloads need no escaping.
//! - Everything but `{device}` and `{value.FIELD}` is known when the rule loads and is
//!   filled in then; an unknown placeholder is a load error, never an empty string at
//!   run time. A topic holds no `+`, `#` or `{value.FIELD}`, so a rendered topic is
//!   always a valid topic name (device ids come from topic levels).
//! - In a webhook URL, what a placeholder brings is percent-encoded and placeholders stand
//!   only in the path and query: scheme, host and port are fixed when the rule loads, and
//!   a URL carries no credentials (those go in `headers`, which are never recorded).
//! - Rendering is pure: the same event gives the same message, and the record's id is
//!   derived from the event's id and the action's position, so it is stable too.

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use webhook::{
    WebhookCall, WebhookOutcome, WebhookResult, WebhookSettings, DEFAULT_WEBHOOK_RETRIES,
    DEFAULT_WEBHOOK_TIMEOUT, WEBHOOK_EVENT_TYPE,
};

pub use template::Template;
pub(super) use template::{Known, Place};

use crate::events::{rfc3339, Event, EventState, DATA_CONTENT_TYPE, SPEC_VERSION};
use crate::reading::Millis;

mod load;
mod template;
#[cfg(test)]
mod tests;
mod webhook;

/// The CloudEvents `type` of an action's record in the event log.
pub const ACTION_EVENT_TYPE: &str = "ActionPublished";
/// QoS of an action that does not say.
pub const DEFAULT_ACTION_QOS: u8 = 1;

/// One `[[rule.action]]`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// The transition that triggers it.
    pub on: EventState,
    pub target: Target,
    pub payload: Template,
}

/// Where an action sends its payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Published on the embedded broker.
    Publish {
        topic: Template,
        /// 0 or 1.
        qos: u8,
    },
    /// POSTed to an HTTP endpoint.
    Webhook {
        url: Template,
        settings: std::sync::Arc<WebhookSettings>,
    },
}

impl Action {
    /// What this action does for `event` (the `index`-th action of its rule), or `None`
    /// when the event is the other transition.
    pub fn render(&self, index: usize, event: &Event) -> Option<Rendered> {
        if event.data.state != self.on {
            return None;
        }
        let payload = self.payload.render(&event.subject, &event.data.values);
        Some(match &self.target {
            Target::Publish { topic, qos } => Rendered::Publish(ActionMessage {
                index,
                on: self.on,
                topic: topic.render(&event.subject, &event.data.values),
                payload,
                qos: *qos,
            }),
            Target::Webhook { url, settings } => Rendered::Webhook(WebhookCall::new(
                event,
                index,
                self.on,
                url.render(&event.subject, &event.data.values),
                payload,
                settings.clone(),
            )),
        })
    }
}

/// Everything the `actions` do for `event`, in the order they are declared.
pub fn messages(actions: &[Action], event: &Event) -> Vec<Rendered> {
    actions
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.render(i, event))
        .collect()
}

/// One rendered action.
#[derive(Debug, Clone, PartialEq)]
pub enum Rendered {
    Publish(ActionMessage),
    Webhook(WebhookCall),
}

/// One rendered publish action, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionMessage {
    /// Position of the action in its rule (0-based).
    pub index: usize,
    pub on: EventState,
    pub topic: String,
    pub payload: String,
    pub qos: u8,
}

/// The id of the `index`-th action of a rule for the event `event_id`: derived from both,
/// so it is stable.
pub fn action_id(event_id: &str, index: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(event_id.as_bytes());
    hasher.update([0u8]);
    hasher.update((index as u64).to_be_bytes());
    hasher.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `data` of an action's event-log record.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct ActionData<'a> {
    /// The id of the event whose transition triggered the action.
    event_id: &'a str,
    event_type: &'a str,
    rule: &'a str,
    on: EventState,
    /// Position of the action in its rule (0-based).
    action: usize,
    topic: &'a str,
    payload: &'a str,
    qos: u8,
}

/// The event-log record of an action: a CloudEvent of type `record_type` from the rule's
/// actions, about the device `subject`, whose `data` says what was done.
#[derive(Serialize)]
struct Record<'a, D> {
    specversion: &'static str,
    id: &'a str,
    source: String,
    #[serde(rename = "type")]
    event_type: &'static str,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: D,
}

/// [`Record`] as JSON: what `id` (of `rule`'s action) did at `at` (Unix ms).
pub(super) fn record_json<D: Serialize>(
    gateway_id: &str,
    rule: &str,
    (id, record_type): (&str, &'static str),
    subject: &str,
    at: Millis,
    data: D,
) -> Vec<u8> {
    let record = Record {
        specversion: SPEC_VERSION,
        id,
        source: format!("gateway/{gateway_id}/rules/{rule}/actions"),
        event_type: record_type,
        subject,
        time: rfc3339(at),
        datacontenttype: DATA_CONTENT_TYPE,
        data,
    };
    serde_json::to_vec(&record).expect("an action record serializes to JSON")
}

impl ActionMessage {
    /// The action's id: derived from its event's id and its position, so it is stable.
    pub fn id(&self, event: &Event) -> String {
        action_id(&event.id, self.index)
    }

    /// The event-log record of this message, published for `event` at `at` (Unix ms): a
    /// CloudEvent of type [`ACTION_EVENT_TYPE`] whose `data.event_id` is the event's id.
    pub fn record(&self, gateway_id: &str, event: &Event, at: Millis) -> Vec<u8> {
        let data = ActionData {
            event_id: &event.id,
            event_type: &event.event_type,
            rule: &event.data.rule,
            on: self.on,
            action: self.index,
            topic: &self.topic,
            payload: &self.payload,
            qos: self.qos,
        };
        let id = self.id(event);
        let what = (id.as_str(), ACTION_EVENT_TYPE);
        record_json(gateway_id, &event.data.rule, what, &event.subject, at, data)
    }
}
