//! Slack's HTTP answers and Web API calls: one call (JSON or form body),
//! and how an incoming webhook's or the Web API's answer becomes an
//! [`Outcome`] (Slack's permanent errors dead-lettered at once,
//! `Retry-After` honoured).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::super::{DEFAULT_429_WAIT, Outcome};
use super::{SlackSink, TIMEOUT};
use crate::config::Secret;
use crate::http::{read_capped, request_error, retry_after, snippet};

/// Errors after which retrying cannot help.
const PERMANENT: [&str; 10] = [
    "invalid_payload",
    "action_prohibited",
    "channel_not_found",
    "channel_is_archived",
    "invalid_auth",
    "not_in_channel",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "no_text",
];
/// A Web API answer is parsed (a `conversations.history` page carries
/// messages), so more of it is read than of an answer only kept as text.
const API_ANSWER_CAP: usize = 16 * 1024;

impl SlackSink {
    /// One Web API call with a JSON body for `run_id`'s event; the answer
    /// when Slack says `ok`.
    pub(super) async fn call(
        &self,
        token: &Secret,
        run_id: &str,
        method: &str,
        body: &Value,
    ) -> Result<Value, Outcome> {
        self.api_call(token, run_id, method, |request| request.json(body))
            .await
    }

    /// One Web API call with a form body, as Slack's read methods
    /// (`conversations.history`) take their arguments.
    pub(super) async fn call_form(
        &self,
        token: &Secret,
        run_id: &str,
        method: &str,
        form: &[(&str, String)],
    ) -> Result<Value, Outcome> {
        self.api_call(token, run_id, method, |request| request.form(form))
            .await
    }

    async fn api_call(
        &self,
        token: &Secret,
        run_id: &str,
        method: &str,
        body: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Value, Outcome> {
        self.until_ready_for(run_id).await?;
        let url = self.api_base.join(method).map_err(|e| Outcome::Permanent {
            status: None,
            error: format!("slack: bad api_base: {e}"),
        })?;
        let request = self.client.post(url).bearer_auth(token.expose());
        let response = body(request).send().await.map_err(|error| {
            retry(
                None,
                format!("slack {method}: {}", request_error(error, TIMEOUT, TIMEOUT)),
            )
        })?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let bytes = read_capped(response, API_ANSWER_CAP)
            .await
            .map(|(b, _)| b)
            .unwrap_or_default();
        classify_api(method, status, wait, &bytes)
    }
}

pub(super) fn retry(status: Option<u16>, error: String) -> Outcome {
    Outcome::Retry {
        status,
        error,
        after: None,
    }
}

/// An incoming webhook's answer (plain text, e.g. `invalid_payload`).
pub(super) fn classify_webhook(status: StatusCode, wait: Option<Duration>, body: &str) -> Outcome {
    let code = Some(status.as_u16());
    if status.is_success() {
        return Outcome::Delivered;
    }
    let error = format!("slack: HTTP {}: {body}", status.as_u16());
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Outcome::Retry {
            status: code,
            error,
            after: Some(wait.unwrap_or(DEFAULT_429_WAIT)),
        };
    }
    let permanent_status = matches!(status.as_u16(), 400 | 403 | 404 | 410);
    if permanent_status || PERMANENT.iter().any(|p| body.contains(p)) {
        return Outcome::Permanent {
            status: code,
            error,
        };
    }
    Outcome::Retry {
        status: code,
        error,
        after: wait,
    }
}

/// A Web API answer: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
fn classify_api(
    method: &str,
    status: StatusCode,
    wait: Option<Duration>,
    body: &[u8],
) -> Result<Value, Outcome> {
    let code = Some(status.as_u16());
    if status == StatusCode::TOO_MANY_REQUESTS {
        let error = format!("slack {method}: rate limited");
        return Err(Outcome::Retry {
            status: code,
            error,
            after: Some(wait.unwrap_or(DEFAULT_429_WAIT)),
        });
    }
    let answer: Value = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(_) => {
            return Err(retry(
                code,
                format!(
                    "slack {method}: HTTP {}: {}",
                    status.as_u16(),
                    snippet(body, 200)
                ),
            ));
        }
    };
    if answer["ok"] == json!(true) {
        return Ok(answer);
    }
    let slack_error = answer["error"].as_str().unwrap_or("unknown_error");
    let error = format!("slack {method}: {slack_error}");
    if PERMANENT.contains(&slack_error) {
        Err(Outcome::Permanent {
            status: code,
            error,
        })
    } else {
        Err(Outcome::Retry {
            status: code,
            error,
            after: wait,
        })
    }
}

#[cfg(test)]
mod tests;
