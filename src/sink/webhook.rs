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
        })
    }

    /// One attempt: fresh timestamp and signature, same id and body.
    pub async fn send(&self, event: &Event<'_>) -> Outcome {
        let body = match Self::body(event) {
            Ok(body) => body,
            Err(error) => {
                return Outcome::Permanent {
                    status: None,
                    error: format!("cannot encode event: {error}"),
                };
            }
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let signature = sign::signature_header(&self.keys, event.id, timestamp, &body);
        let request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header("webhook-id", event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        match request.send().await {
            Err(error) => Outcome::Retry {
                status: None,
                error: request_error(error, self.timeout, connect_timeout(self.timeout)),
                after: None,
            },
            Ok(response) => {
                let status = response.status();
                let wait = retry_after(response.headers());
                let answer = match read_capped(response, ANSWER_CAP).await {
                    Ok((bytes, _)) => snippet(&bytes, ERROR_BODY_CHARS),
                    Err(error) => format!("(answer unreadable: {})", error.without_url()),
                };
                classify(status, wait, &answer)
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
