//! Small HTTP helpers shared by the upstream client and the sinks.

use std::time::{Duration, SystemTime};

/// Every request runhook makes, upstream or to a sink, says who sent it
/// (`user-agent: runhook/<version>`, README.md, Webhook).
pub const USER_AGENT: &str = concat!("runhook/", env!("CARGO_PKG_VERSION"));

/// Reads at most `cap` bytes of a response body; the rest is discarded. The
/// flag says whether the body was cut.
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The shortest wait after an upstream error that came with `Retry-After`:
/// `0` or a date in the past must not turn into a tight request loop (with a
/// SQLite write per turn).
pub const UPSTREAM_RETRY_AFTER_FLOOR: Duration = Duration::from_secs(1);
/// The longest `Retry-After` from upstream that is honoured: a huge value
/// must not park a run for days.
pub const UPSTREAM_RETRY_AFTER_CAP: Duration = Duration::from_secs(300);

/// How long to wait before asking upstream again after an error: the
/// server's `Retry-After` (bounded to 1 s ..= 5 min) or the computed
/// `backoff`, whichever is longer, so that a server repeating a small
/// `Retry-After` still meets a growing backoff.
pub fn upstream_wait(retry_after: Option<Duration>, backoff: Option<Duration>) -> Duration {
    let asked = retry_after.map_or(Duration::ZERO, |wait| {
        wait.clamp(UPSTREAM_RETRY_AFTER_FLOOR, UPSTREAM_RETRY_AFTER_CAP)
    });
    asked.max(backoff.unwrap_or(Duration::from_secs(60)))
}

/// Text of a body for an error message: lossy UTF-8, cut to `max` chars.
pub fn snippet(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    crate::text::ellipsize(text.trim(), max).into_owned()
}

/// What went wrong with a request that got no answer, its causes included:
/// reqwest's own message is only "error sending request", while the cause
/// chain says what an operator can act on ("Connection refused", "invalid
/// peer certificate: UnknownIssuer"). The URL is left out: it may carry a
/// token, or be the secret itself (a Slack webhook). A timeout names the
/// limit that ran out.
pub fn request_error(
    error: reqwest::Error,
    timeout: Duration,
    connect_timeout: Duration,
) -> String {
    if error.is_timeout() {
        return if error.is_connect() {
            format!(
                "connect timed out after {}",
                humantime::format_duration(connect_timeout)
            )
        } else {
            format!("timed out after {}", humantime::format_duration(timeout))
        };
    }
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        // Some layers repeat their source's text in their own.
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn retry_after_seconds_and_date() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let parsed = retry_after(&headers).unwrap();
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn upstream_wait_is_floored_and_capped() {
        let ms = Duration::from_millis;
        assert_eq!(
            upstream_wait(Some(Duration::ZERO), Some(ms(200))),
            UPSTREAM_RETRY_AFTER_FLOOR
        );
        assert_eq!(
            upstream_wait(None, Some(ms(10))),
            ms(10),
            "no Retry-After: the backoff"
        );
        let week = Duration::from_secs(604_800);
        assert_eq!(
            upstream_wait(Some(week), Some(ms(200))),
            UPSTREAM_RETRY_AFTER_CAP
        );
        assert_eq!(
            upstream_wait(Some(Duration::from_secs(7)), Some(ms(200))),
            Duration::from_secs(7)
        );
        assert_eq!(
            upstream_wait(Some(ms(1500)), Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(upstream_wait(None, None), Duration::from_secs(60));
        // A date in the past parses as zero and meets the floor.
        let mut headers = HeaderMap::new();
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&past).unwrap());
        assert_eq!(
            upstream_wait(retry_after(&headers), Some(ms(1))),
            UPSTREAM_RETRY_AFTER_FLOOR
        );
    }

    #[test]
    fn snippet_cuts_on_a_char_boundary() {
        assert_eq!(snippet("ééé".as_bytes(), 2), "éé…");
        assert_eq!(snippet(b" ok ", 10), "ok");
    }

    #[tokio::test]
    async fn a_refused_connection_says_so() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let error = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/hook?token=secret"))
            .send()
            .await
            .unwrap_err();
        let text = request_error(error, Duration::from_secs(10), Duration::from_secs(10));
        assert!(text.to_lowercase().contains("connection refused"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[tokio::test]
    async fn a_timeout_names_the_limit() {
        // Accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let limit = Duration::from_millis(300);
        let error = reqwest::Client::builder()
            .timeout(limit)
            .build()
            .unwrap()
            .get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap_err();
        let text = request_error(error, limit, limit);
        assert_eq!(text, "timed out after 300ms");
    }
}
