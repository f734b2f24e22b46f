//! One webhook call over HTTP/1.1: a POST of the rendered payload to the rendered URL,
//! retried with exponential backoff ([`crate::backoff`]), each attempt bounded by the
//! action's `timeout`.
//!
//! Input: a [`WebhookCall`] and a token that cuts the call short when the gateway stops.
//! Output: its final [`WebhookOutcome`].
//!
//! Invariants:
//! - an attempt is connect, send and the response head, all within `timeout`; the
//!   response body is not read and the connection is closed after each attempt;
//! - a 2xx answer ends the call; a 5xx, 408 or 429 answer, a timeout or a connection
//!   error is retried up to `retries` times; any other status ends it as `http_error`;
//! - a cut-short call is `dropped` when no attempt ended yet, else it keeps the outcome of
//!   its last finished attempt.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::rules::{WebhookCall, WebhookOutcome, WebhookResult};

/// Waits between attempts: about 250 ms before the first retry, doubling, at most 10 s.
pub const RETRY_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
/// The `User-Agent` of webhook requests.
const AGENT: &str = concat!("iot-gateway/", env!("CARGO_PKG_VERSION"));

/// Why one attempt did not get an answer.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("bad URL: {0}")]
    Url(String),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
}

/// Makes `call` until it succeeds, fails for good, runs out of retries or `abandon` is
/// cancelled.
pub async fn call(call: &WebhookCall, abandon: &CancellationToken) -> WebhookOutcome {
    let attempts = call.settings.retries.saturating_add(1);
    let mut last: Option<WebhookOutcome> = None;
    for attempt in 1..=attempts {
        if attempt > 1 {
            tokio::select! {
                () = tokio::time::sleep(RETRY_BACKOFF.delay(attempt - 1)) => {}
                () = abandon.cancelled() => break,
            }
        }
        let result = tokio::select! {
            r = tokio::time::timeout(call.settings.timeout, post(call)) => {
                r.unwrap_or(Err(AttemptError::Timeout(call.settings.timeout)))
            }
            () = abandon.cancelled() => {
                if last.is_some() {
                    break;
                }
                return dropped(attempt, "the gateway stopped before an answer came");
            }
        };
        let (outcome, retry) = classify(result, attempt);
        if !retry {
            return outcome;
        }
        last = Some(outcome);
    }
    last.unwrap_or_else(|| dropped(0, "the gateway stopped before the call was made"))
}

fn dropped(attempts: u32, why: &str) -> WebhookOutcome {
    WebhookOutcome {
        result: WebhookResult::Dropped,
        status: None,
        error: Some(why.to_string()),
        attempts,
    }
}

/// The outcome of attempt number `attempt`, and whether another attempt is worth making.
fn classify(result: Result<StatusCode, AttemptError>, attempt: u32) -> (WebhookOutcome, bool) {
    let outcome = |result, status: Option<StatusCode>, error: Option<String>| WebhookOutcome {
        result,
        status: status.map(|s| s.as_u16()),
        error,
        attempts: attempt,
    };
    match result {
        Ok(s) if s.is_success() => (outcome(WebhookResult::Ok, Some(s), None), false),
        Ok(s) => {
            let retry = s.is_server_error()
                || s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::TOO_MANY_REQUESTS;
            (outcome(WebhookResult::HttpError, Some(s), None), retry)
        }
        Err(e @ AttemptError::Timeout(_)) => (
            outcome(WebhookResult::Timeout, None, Some(e.to_string())),
            true,
        ),
        Err(e @ (AttemptError::Url(_) | AttemptError::Request(_))) => (
            outcome(WebhookResult::Error, None, Some(e.to_string())),
            false,
        ),
        Err(e) => (
            outcome(WebhookResult::Error, None, Some(e.to_string())),
            true,
        ),
    }
}

/// One attempt: the status of the answer.
async fn post(call: &WebhookCall) -> Result<StatusCode, AttemptError> {
    let uri: Uri = call
        .url
        .parse()
        .map_err(|e: http::uri::InvalidUri| AttemptError::Url(e.to_string()))?;
    let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
        return Err(AttemptError::Url(format!("{} names no host", call.url)));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((host, uri.port_u16().unwrap_or(80)))
        .await
        .map_err(AttemptError::Connect)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::post(path)
        .header(HOST, authority.as_str())
        .header(USER_AGENT, AGENT);
    let own_type = call
        .settings
        .headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case(CONTENT_TYPE.as_str()));
    if !own_type {
        request = request.header(CONTENT_TYPE, call.content_type());
    }
    for (name, value) in &call.settings.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request.body(Full::new(Bytes::from(call.payload.clone())))?;
    // The connection is driven here, not spawned: it ends with this attempt. When it ends
    // first (the server answered and closed), the answer is already with `send`.
    let send = sender.send_request(request);
    tokio::pin!(connection, send);
    let response = tokio::select! {
        biased;
        response = &mut send => response?,
        ended = &mut connection => {
            ended?;
            send.await?
        }
    };
    Ok(response.status())
}
