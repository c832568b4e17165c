//! The webhook sink: one signed POST per event, Standard Webhooks headers
//! and body. Redirects are never followed and answers are read up to a cap.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use serde::Serialize;

use super::{
    ANSWER_CAP, DEFAULT_429_WAIT, Event, EventFields, Outcome, connect_timeout, http_client, sign,
};
use crate::config::{SigningKey, WebhookConfig};
use crate::http::{read_capped, request_error, retry_after, snippet};

const ERROR_BODY_CHARS: usize = 500;
/// The tracing target of the two debug events every attempt emits (sending,
/// answered): `runhook forward` prints its delivery lines from them, and
/// `RUNHOOK_LOG=runhook::attempt=debug` shows them in any daemon's log.
pub const ATTEMPT_TARGET: &str = "runhook::attempt";

pub struct WebhookSink {
    client: reqwest::Client,
    url: reqwest::Url,
    keys: Vec<SigningKey>,
    headers: HeaderMap,
    /// For error messages: which limit ran out.
    timeout: Duration,
}

/// The Standard Webhooks body.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    timestamp: String,
    data: EventFields<'a>,
    /// Only `runhook send-test` sets it: receivers can tell a test from a
    /// real event. Absent from every real event's body.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    test: bool,
}

/// What a receiver answered to one attempt, for `runhook send-test` to show.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub outcome: Outcome,
    /// `None` when no answer came (refused, timed out).
    pub status: Option<u16>,
    /// The start of the answer's body (or why none could be read).
    pub excerpt: String,
}

impl WebhookSink {
    pub fn new(config: &WebhookConfig) -> Result<Self, reqwest::Error> {
        Ok(Self {
            client: http_client(config.timeout)?,
            url: config.url.clone(),
            keys: config.secrets.clone(),
            headers: config.headers.clone(),
            timeout: config.timeout,
        })
    }

    /// The request body: the same bytes on every attempt.
    pub fn body(event: &Event<'_>) -> Result<Vec<u8>, serde_json::Error> {
        Self::encode(event, false)
    }

    /// The body of a test event: a real body plus `"test": true`.
    pub fn test_body(event: &Event<'_>) -> Result<Vec<u8>, serde_json::Error> {
        Self::encode(event, true)
    }

    fn encode(event: &Event<'_>, test: bool) -> Result<Vec<u8>, serde_json::Error> {
        let timestamp = event.created_at.map_or_else(
            || {
                let seen = UNIX_EPOCH + Duration::from_millis(event.seen_at.max(0) as u64);
                humantime::format_rfc3339_millis(seen).to_string()
            },
            str::to_owned,
        );
        serde_json::to_vec(&Body {
            event_type: event.event_type,
            timestamp,
            data: EventFields::of(event)?,
            test,
        })
    }

    /// One attempt: fresh timestamp and signature, same id and body.
    pub async fn send(&self, event: &Event<'_>) -> Outcome {
        match Self::body(event) {
            Ok(body) => self.post(event.id, event.event_type, body).await.outcome,
            Err(error) => Outcome::Permanent {
                status: None,
                error: format!("cannot encode event: {error}"),
            },
        }
    }

    /// POSTs `body` as event `id`, signed with a fresh timestamp.
    pub async fn post(&self, id: &str, event_type: &str, body: Vec<u8>) -> Answer {
        tracing::debug!(target: ATTEMPT_TARGET, id, event_type, "webhook: sending");
        let started = std::time::Instant::now();
        let answer = self.post_signed(id, body).await;
        tracing::debug!(
            target: ATTEMPT_TARGET,
            id,
            status = answer.status.unwrap_or(0),
            latency_ms = started.elapsed().as_millis() as u64,
            delivered = answer.outcome == Outcome::Delivered,
            excerpt = %answer.excerpt,
            "webhook: answered"
        );
        answer
    }

    async fn post_signed(&self, id: &str, body: Vec<u8>) -> Answer {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let signature = sign::signature_header(&self.keys, id, timestamp, &body);
        let request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        match request.send().await {
            Err(error) => {
                let error = request_error(error, self.timeout, connect_timeout(self.timeout));
                Answer {
                    outcome: Outcome::Retry {
                        status: None,
                        error: error.clone(),
                        after: None,
                    },
                    status: None,
                    excerpt: error,
                }
            }
            Ok(response) => {
                let status = response.status();
                let wait = retry_after(response.headers());
                let excerpt = match read_capped(response, ANSWER_CAP).await {
                    Ok((bytes, _)) => snippet(&bytes, ERROR_BODY_CHARS),
                    Err(error) => format!("(answer unreadable: {})", error.without_url()),
                };
                Answer {
                    outcome: classify(status, wait, &excerpt),
                    status: Some(status.as_u16()),
                    excerpt,
                }
            }
        }
    }
}

/// A receiver's answer as an outcome: any 2xx is delivered; a 3xx is a
/// failure (redirects are not followed); 429 waits `Retry-After` or 60 s;
/// every other failure is retried with backoff until `max_attempts` or
/// `max_age`, as the Standard Webhooks guidance asks.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, answer: &str) -> Outcome {
    if status.is_success() {
        return Outcome::Delivered;
    }
    let error = if answer.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        format!("HTTP {}: {answer}", status.as_u16())
    };
    let after = match status {
        StatusCode::TOO_MANY_REQUESTS => Some(retry_after.unwrap_or(DEFAULT_429_WAIT)),
        _ => retry_after,
    };
    Outcome::Retry {
        status: Some(status.as_u16()),
        error: if status.is_redirection() {
            format!("{error} (redirects are not followed; point the sink at the final URL)")
        } else {
            error
        },
        after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(
            classify(StatusCode::NO_CONTENT, None, ""),
            Outcome::Delivered
        );
        let Outcome::Retry { after, status, .. } =
            classify(StatusCode::TOO_MANY_REQUESTS, None, "")
        else {
            panic!("429 retries");
        };
        assert_eq!((after, status), (Some(Duration::from_secs(60)), Some(429)));
        let Outcome::Retry { after, .. } = classify(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(2)),
            "",
        ) else {
            panic!("429 retries");
        };
        assert_eq!(after, Some(Duration::from_secs(2)));
        let Outcome::Retry { error, .. } = classify(StatusCode::FOUND, None, "") else {
            panic!("3xx fails")
        };
        assert!(error.contains("redirects are not followed"));
        let Outcome::Retry { error, .. } =
            classify(StatusCode::INTERNAL_SERVER_ERROR, None, "boom")
        else {
            panic!("5xx retries")
        };
        assert_eq!(error, "HTTP 500: boom");
    }
}
