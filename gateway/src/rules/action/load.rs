//! Loading `[[rule.action]]` tables: keys, `on`, `qos`, and the topic and payload
//! templates, with every problem positioned in the rule file like the rest of `load`.
//!
//! Input: one rule's TOML table and what its templates may refer to ([`Known`]).
//! Output: the valid actions; a diagnostic for every problem (a rule with one is left out
//! by the caller, as for any other problem).
//!
//! Invariant: a placeholder problem points at the placeholder's `{` inside the TOML
//! string (exact for strings without escape sequences, like CEL positions).

use std::ops::Range;

use toml_edit::TableLike;

use super::{Action, Known, Place, Template, DEFAULT_ACTION_QOS};
use crate::events::EventState;
use crate::rules::diagnostics::{char_position, content_start, map_position};
use crate::rules::load::Cx;

const ACTION_KEYS: &[&str] = &["on", "topic", "payload", "qos"];
const PLACE: &str = "[[rule.action]]";

impl Cx<'_> {
    /// The rule's actions; every problem is pushed as a diagnostic.
    pub(in crate::rules) fn actions(
        &mut self,
        table: &dyn TableLike,
        known: &Known<'_>,
    ) -> Vec<Action> {
        let Some(item) = table.get("action") else {
            return Vec::new();
        };
        let Some(entries) = self.sub_tables(item, "action") else {
            return Vec::new();
        };
        entries
            .into_iter()
            .filter_map(|(t, at)| self.action(t, at, known))
            .collect()
    }

    fn action(
        &mut self,
        t: &dyn TableLike,
        at: Option<Range<usize>>,
        known: &Known<'_>,
    ) -> Option<Action> {
        self.check_keys(t, ACTION_KEYS, "in [[rule.action]]");
        let on = self
            .required(t, "on", &at, PLACE)
            .and_then(|(on, span)| match on.as_str() {
                "firing" => Some(EventState::Firing),
                "resolved" => Some(EventState::Resolved),
                _ => {
                    self.error(
                        Some(span),
                        format!("bad `on` {on:?}: it is \"firing\" or \"resolved\""),
                    );
                    None
                }
            });
        let topic = self
            .required(t, "topic", &at, PLACE)
            .and_then(|(s, span)| self.template(&s, span, "topic", Place::Topic, known));
        let payload = match t.get("payload") {
            None => Some(Template {
                source: String::new(),
                parts: Vec::new(),
            }),
            Some(_) => self
                .string(t, "payload")
                .and_then(|(s, span)| self.template(&s, span, "payload", Place::Payload, known)),
        };
        let qos = match t.get("qos") {
            None => Some(DEFAULT_ACTION_QOS),
            Some(item) => match item.as_integer() {
                Some(q @ 0..=1) => Some(q as u8),
                _ => {
                    self.error(
                        item.span(),
                        "`qos` must be 0 or 1 (an action is published at most or at least once)",
                    );
                    None
                }
            },
        };
        Some(Action {
            on: on?,
            topic: topic?,
            payload: payload?,
            qos: qos?,
        })
    }

    fn template(
        &mut self,
        source: &str,
        span: Range<usize>,
        key: &str,
        place: Place,
        known: &Known<'_>,
    ) -> Option<Template> {
        match Template::parse(source, place, known) {
            Ok(t) => Some(t),
            Err(problems) => {
                let start = content_start(self.src.text, &span);
                for (offset, message) in problems {
                    let (line, col) = char_position(source, offset);
                    let at = map_position(self.src.text, start, span.end, line, col);
                    self.error(Some(at..at), format!("in action `{key}`: {message}"));
                }
                None
            }
        }
    }
}
