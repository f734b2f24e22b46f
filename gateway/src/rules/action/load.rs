//! Loading `[[rule.action]]` tables: keys, `on`, the target (`topic` and `qos`, or a
//! webhook's `url`, `timeout`, `retries` and `headers`) and the templates, with every
//! problem positioned in the rule file like the rest of `load`.
//!
//! Input: one rule's TOML table and what its templates may refer to ([`Known`]).
//! Output: the valid actions; a diagnostic for every problem (a rule with one is left out
//! by the caller, as for any other problem).
//!
//! Invariant: a placeholder problem points at the placeholder's `{` inside the TOML
//! string (exact for strings without escape sequences, like CEL positions).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use toml_edit::TableLike;

use super::webhook::{header_problem, rendered_url_problem, url_problems};
use super::{
    Action, Known, Place, Target, Template, WebhookSettings, DEFAULT_ACTION_QOS,
    DEFAULT_WEBHOOK_RETRIES, DEFAULT_WEBHOOK_TIMEOUT,
};
use crate::events::EventState;
use crate::rules::diagnostics::{char_position, content_start, map_position};
use crate::rules::load::Cx;

const ACTION_KEYS: &[&str] = &[
    "on", "topic", "url", "payload", "qos", "timeout", "retries", "headers",
];
/// Keys that only a webhook action (`url`) takes.
const WEBHOOK_KEYS: &[&str] = &["timeout", "retries", "headers"];
/// Most retries a webhook action may ask for.
const MAX_WEBHOOK_RETRIES: i64 = 10;
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
        let target = self.target(t, &at, known);
        let payload = match t.get("payload") {
            None => Some(Template::text("")),
            Some(_) => self
                .string(t, "payload")
                .and_then(|(s, span)| self.template(&s, span, "payload", Place::Payload, known)),
        };
        Some(Action {
            on: on?,
            target: target?,
            payload: payload?,
        })
    }

    /// The action's `topic` (a publish) or `url` (a webhook), exactly one of them, with
    /// the keys that go with it.
    fn target(
        &mut self,
        t: &dyn TableLike,
        at: &Option<Range<usize>>,
        known: &Known<'_>,
    ) -> Option<Target> {
        let misplaced = |cx: &mut Self, keys: &[&str], why: &str| {
            for key in keys {
                if let Some((k, _)) = t.get_key_value(key) {
                    cx.error(k.span(), format!("`{key}` {why}"));
                }
            }
        };
        match (t.get("topic"), t.get("url")) {
            (Some(_), Some(url)) => {
                self.error(
                    url.span(),
                    "an action has `topic` (publish on the broker) or `url` (a webhook), not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    at.clone(),
                    format!("missing required key `topic` (or `url`, for a webhook) in {PLACE}"),
                );
                None
            }
            (Some(_), None) => {
                misplaced(self, WEBHOOK_KEYS, "is for webhook actions (with `url`)");
                let topic = self
                    .string(t, "topic")
                    .and_then(|(s, span)| self.template(&s, span, "topic", Place::Topic, known));
                let qos = self.qos(t);
                Some(Target::Publish {
                    topic: topic?,
                    qos: qos?,
                })
            }
            (None, Some(_)) => {
                misplaced(
                    self,
                    &["qos"],
                    "is for actions with a `topic`: a webhook is an HTTP POST, retried by `retries`",
                );
                let url = self.url(t, known);
                let settings = self.webhook_settings(t);
                Some(Target::Webhook {
                    url: url?,
                    settings: Arc::new(settings?),
                })
            }
        }
    }

    fn qos(&mut self, t: &dyn TableLike) -> Option<u8> {
        match t.get("qos") {
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
        }
    }

    /// A webhook's URL: its text checked, then its placeholders, then the whole once
    /// filled in with stand-in values.
    fn url(&mut self, t: &dyn TableLike, known: &Known<'_>) -> Option<Template> {
        let (source, span) = self.string(t, "url")?;
        let problems = url_problems(&source);
        if !problems.is_empty() {
            self.positioned(&source, &span, "url", problems);
            return None;
        }
        let template = self.template(&source, span.clone(), "url", Place::Url, known)?;
        let probe = template.render("device", &Default::default());
        if let Some(message) = rendered_url_problem(&probe) {
            self.positioned(&source, &span, "url", vec![(0, message)]);
            return None;
        }
        Some(template)
    }

    fn webhook_settings(&mut self, t: &dyn TableLike) -> Option<WebhookSettings> {
        let timeout = match t.get("timeout") {
            None => Some(DEFAULT_WEBHOOK_TIMEOUT),
            Some(item) => match self.duration(t, "timeout") {
                Some(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
                Some(_) => {
                    self.error(item.span(), "`timeout` must be longer than 0s");
                    None
                }
                None => None,
            },
        };
        let retries = match t.get("retries") {
            None => Some(DEFAULT_WEBHOOK_RETRIES),
            Some(item) => match item.as_integer() {
                Some(n @ 0..=MAX_WEBHOOK_RETRIES) => Some(n as u32),
                _ => {
                    self.error(
                        item.span(),
                        format!("`retries` must be an integer from 0 to {MAX_WEBHOOK_RETRIES}"),
                    );
                    None
                }
            },
        };
        let headers = self.string_map(t, "headers");
        let span = t.get("headers").and_then(|h| h.span());
        let mut bad = false;
        for (name, value) in &headers {
            if let Some(problem) = header_problem(name, value) {
                self.error(span.clone(), format!("in action `headers`: {problem}"));
                bad = true;
            }
        }
        Some(WebhookSettings {
            timeout: timeout?,
            retries: retries?,
            headers: (!bad).then(|| headers.into_iter().collect())?,
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
                self.positioned(source, &span, key, problems);
                None
            }
        }
    }

    /// Reports `problems` of the string `source` of `key`, each at its character offset.
    fn positioned(
        &mut self,
        source: &str,
        span: &Range<usize>,
        key: &str,
        problems: Vec<(usize, String)>,
    ) {
        let start = content_start(self.src.text, span);
        for (offset, message) in problems {
            let (line, col) = char_position(source, offset);
            let at = map_position(self.src.text, start, span.end, line, col);
            self.error(Some(at..at), format!("in action `{key}`: {message}"));
        }
    }
}
