//! Webhook actions: an action with `url` instead of `topic` POSTs its payload to an HTTP
//! endpoint. This module owns what is known before the call is made: the settings of a
//! webhook action ([`WebhookSettings`]), the checks of its URL text, the rendered call
//! ([`WebhookCall`]) and the event-log record of its final outcome ([`WebhookOutcome`],
//! a CloudEvent of type [`WEBHOOK_EVENT_TYPE`]). Making the call is `crate::webhook`'s.
//!
//! Invariants:
//! - only `http://` URLs load: the gateway has no HTTPS client for webhooks, and a rule
//!   with `https://` is a load error that says so;
//! - scheme, host and port are literal text (no placeholders) and the URL has no user
//!   information, so the URL recorded in the event log carries no credentials;
//! - the content type of a call is `application/json` when the rendered payload is JSON,
//!   `text/plain; charset=utf-8` otherwise (an empty payload included), unless the
//!   action's `headers` set `Content-Type` themselves.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{action_id, record_json};
use crate::events::{Event, EventState};
use crate::reading::Millis;

/// The CloudEvents `type` of a webhook call's record in the event log.
pub const WEBHOOK_EVENT_TYPE: &str = "WebhookCalled";
/// How long one attempt may take (connect, send, response head) when the action does not say.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts after the first one when the action does not say.
pub const DEFAULT_WEBHOOK_RETRIES: u32 = 3;
/// Headers the HTTP client writes itself; an action may not set them.
const RESERVED_HEADERS: &[&str] = &["host", "content-length", "transfer-encoding", "connection"];

/// How a webhook action calls its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Limit of one attempt.
    pub timeout: Duration,
    /// Attempts after the first one, with exponential backoff in between.
    pub retries: u32,
    /// Extra request headers (names and values checked at load).
    pub headers: Vec<(String, String)>,
}

/// One webhook call, rendered for one event: everything the HTTP client and the record need.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookCall {
    /// The action's id (from the event's id and the action's position).
    pub id: String,
    /// Position of the action in its rule (0-based).
    pub index: usize,
    pub on: EventState,
    pub rule: String,
    pub event_id: String,
    pub event_type: String,
    pub device: String,
    pub url: String,
    pub payload: String,
    pub settings: Arc<WebhookSettings>,
}

impl WebhookCall {
    pub(super) fn new(
        event: &Event,
        index: usize,
        on: EventState,
        url: String,
        payload: String,
        settings: Arc<WebhookSettings>,
    ) -> WebhookCall {
        WebhookCall {
            id: action_id(&event.id, index),
            index,
            on,
            rule: event.data.rule.clone(),
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            device: event.subject.clone(),
            url,
            payload,
            settings,
        }
    }

    /// The `Content-Type` of the request body (see the module header).
    pub fn content_type(&self) -> &'static str {
        if serde_json::from_str::<serde::de::IgnoredAny>(&self.payload).is_ok() {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        }
    }

    /// The event-log record of this call's final `outcome`, known at `at` (Unix ms).
    pub fn record(&self, gateway_id: &str, outcome: &WebhookOutcome, at: Millis) -> Vec<u8> {
        let data = WebhookData {
            event_id: &self.event_id,
            event_type: &self.event_type,
            rule: &self.rule,
            on: self.on,
            action: self.index,
            url: &self.url,
            payload: &self.payload,
            outcome,
        };
        let what = (self.id.as_str(), WEBHOOK_EVENT_TYPE);
        record_json(gateway_id, &self.rule, what, &self.device, at, data)
    }
}

/// How a webhook call ended, as counted in `/metrics` (`outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookResult {
    /// A 2xx answer.
    Ok,
    /// Another status on the last attempt (or one not worth retrying).
    HttpError,
    /// The last attempt got no answer within the timeout.
    Timeout,
    /// The last attempt failed otherwise (connection refused, bad response, ...).
    Error,
    /// Never made: the queue was full or the gateway stopped first.
    Dropped,
}

impl WebhookResult {
    pub const ALL: [WebhookResult; 5] = [
        WebhookResult::Ok,
        WebhookResult::HttpError,
        WebhookResult::Timeout,
        WebhookResult::Error,
        WebhookResult::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookResult::Ok => "ok",
            WebhookResult::HttpError => "http_error",
            WebhookResult::Timeout => "timeout",
            WebhookResult::Error => "error",
            WebhookResult::Dropped => "dropped",
        }
    }
}

/// The final outcome of a webhook call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebhookOutcome {
    #[serde(rename = "outcome")]
    pub result: WebhookResult,
    /// The HTTP status of the last answer, if one came.
    pub status: Option<u16>,
    /// What went wrong on the last attempt, if anything.
    pub error: Option<String>,
    /// Attempts made (0 when dropped before the first).
    pub attempts: u32,
}

#[derive(Serialize)]
struct WebhookData<'a> {
    event_id: &'a str,
    event_type: &'a str,
    rule: &'a str,
    on: EventState,
    action: usize,
    url: &'a str,
    payload: &'a str,
    #[serde(flatten)]
    outcome: &'a WebhookOutcome,
}

/// Problems of a webhook URL as written, as (character offset, message).
pub(super) fn url_problems(source: &str) -> Vec<(usize, String)> {
    let Some(rest) = source.strip_prefix("http://") else {
        let message = if source.starts_with("https://") {
            "https webhooks are not supported: the gateway calls webhooks over plain http (use an http:// URL, e.g. a relay on the local network)"
        } else {
            "a webhook `url` starts with http://"
        };
        return vec![(0, message.to_string())];
    };
    let start = "http://".len();
    let authority: String = rest
        .chars()
        .take_while(|c| !matches!(c, '/' | '?' | '#'))
        .collect();
    let mut problems = Vec::new();
    if authority.contains('@') {
        problems.push((start, "a webhook `url` may not hold credentials (they would be recorded in the event log): send them in `headers`".to_string()));
    } else if let Some(i) = authority.find('{') {
        problems.push((
            start + authority[..i].chars().count(),
            "placeholders go in a webhook url's path or query, not its host or port".to_string(),
        ));
    } else if authority.is_empty() || authority.starts_with(':') {
        problems.push((start, "a webhook `url` names no host".to_string()));
    } else if let Some((_, port)) = authority
        .rsplit_once(':')
        .filter(|_| !authority.ends_with(']'))
    {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            problems.push((
                start + authority.chars().count() - port.chars().count(),
                format!("bad port {port:?} in a webhook `url`"),
            ));
        }
    }
    problems
}

/// Problems of a rendered URL (one rendered with stand-in values at load): `None` when
/// `http::Uri` takes it.
pub(super) fn rendered_url_problem(rendered: &str) -> Option<String> {
    http::Uri::try_from(rendered)
        .err()
        .map(|e| format!("not a valid URL once filled in ({rendered:?}): {e}"))
}

/// Why a header may not be sent, if it may not.
pub(super) fn header_problem(name: &str, value: &str) -> Option<String> {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Some(format!("{name:?} is not a valid HTTP header name"));
    }
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Some(format!(
            "header {name:?} is set by the gateway's HTTP client"
        ));
    }
    if http::HeaderValue::from_str(value).is_err() {
        return Some(format!(
            "the value of header {name:?} is not a valid header value"
        ));
    }
    None
}
