//! The HTTP client for the Agent Runs API: one shared connection pool, a cap
//! on requests in flight, and errors sorted into the classes ingest acts on.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, COOKIE, HeaderValue};
use tokio::sync::Semaphore;

use super::stream::EventSource;
use super::types::{EventsPage, RunEnvelope, RunInfo, decode_page, error_message};
use crate::config::{ApiConfig, Secret};
use crate::http::{USER_AGENT, read_capped, retry_after, snippet};

/// A response page larger than this is refused rather than buffered.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// How often an answer over `MAX_BODY` is asked for again: it costs a
/// download of the cap each time, and only a change upstream can help.
const TOO_LARGE_RETRY: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach upstream: {0}")]
    Network(#[source] reqwest::Error),
    #[error("unparseable upstream response: {0}")]
    Decode(String),
    #[error(
        "upstream answer larger than the {} MiB cap; refused, asking again every {} minutes",
        MAX_BODY / (1024 * 1024),
        TOO_LARGE_RETRY.as_secs() / 60
    )]
    TooLarge,
}

/// What ingest does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 401: the credential is wrong or expired; keep trying slowly.
    AuthFailed,
    /// 403: the credential's user does not own the run; stop the run.
    Forbidden,
    /// 404: no such run; stop the run.
    NotFound,
    /// Network, 5xx, 429, garbage: back off and try again.
    Transient,
    /// An answer over `MAX_BODY`: refused, asked again every
    /// `TOO_LARGE_RETRY` (ingest never gives up on a run).
    TooLarge,
}

impl UpstreamError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Status { status: 401, .. } => ErrorClass::AuthFailed,
            Self::Status { status: 403, .. } => ErrorClass::Forbidden,
            Self::Status { status: 404, .. } => ErrorClass::NotFound,
            Self::TooLarge => ErrorClass::TooLarge,
            _ => ErrorClass::Transient,
        }
    }

    /// How long the server asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            Self::TooLarge => Some(TOO_LARGE_RETRY),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// For streams: no whole-request timeout, a read timeout past the idle timer.
    stream_http: reqwest::Client,
    base: reqwest::Url,
    token: Option<Secret>,
    cookie: Option<Secret>,
    permits: Arc<Semaphore>,
}

impl Client {
    pub fn new(api: &ApiConfig) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(UpstreamError::Network)?;
        let stream_http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(api.stream_idle_timeout + Duration::from_secs(30))
            .build()
            .map_err(UpstreamError::Network)?;
        Ok(Self {
            http,
            stream_http,
            base: api.base_url.clone(),
            token: api.token.clone(),
            cookie: api.session_cookie.clone(),
            permits: Arc::new(Semaphore::new(api.max_concurrency)),
        })
    }

    /// `{base}/v1/agent-runs/{run_id}/{tail...}` with the run id as one
    /// encoded path segment.
    pub fn run_url(&self, run_id: &str, tail: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments
                .pop_if_empty()
                .extend(["v1", "agent-runs", run_id])
                .extend(tail);
        }
        url
    }

    /// Events after `since`, with the run's status; a bad event cuts the
    /// page short rather than failing it (`EventsPage::undecodable`).
    pub async fn events(&self, run_id: &str, since: i64) -> Result<EventsPage, UpstreamError> {
        let mut url = self.run_url(run_id, &["events"]);
        url.query_pairs_mut()
            .append_pair("since", &since.to_string());
        let body = self.get(url).await?;
        decode_page(&body, since).map_err(|e| {
            UpstreamError::Decode(format!("{e}; body starts {:?}", snippet(&body, 120)))
        })
    }

    /// The run itself: status, error message, `lastEventSequence`.
    pub async fn run(&self, run_id: &str) -> Result<RunInfo, UpstreamError> {
        let body = self.get(self.run_url(run_id, &[])).await?;
        serde_json::from_slice::<RunEnvelope>(&body)
            .map(|envelope| envelope.run)
            .map_err(|e| {
                UpstreamError::Decode(format!("{e}; body starts {:?}", snippet(&body, 120)))
            })
    }

    async fn get(&self, url: reqwest::Url) -> Result<Vec<u8>, UpstreamError> {
        let _permit = self.permits.acquire().await.ok();
        let mut request = self.http.get(url);
        if let Some(token) = &self.token {
            request = request.header(
                AUTHORIZATION,
                sensitive(&format!("Bearer {}", token.expose())),
            );
        } else if let Some(cookie) = &self.cookie {
            request = request.header(COOKIE, self.cookie_header(cookie));
        }
        let started = std::time::Instant::now();
        let response = request.send().await;
        crate::metrics::metrics().upstream_took(started.elapsed());
        let response = response.map_err(|error| {
            crate::metrics::metrics().upstream_answer(None);
            UpstreamError::Network(error)
        })?;
        let status = response.status();
        crate::metrics::metrics().upstream_answer(Some(status.as_u16()));
        let wait = retry_after(response.headers());
        // Refused before reading when the length is announced.
        if status.is_success()
            && response
                .content_length()
                .is_some_and(|length| length > MAX_BODY as u64)
        {
            return Err(UpstreamError::TooLarge);
        }
        let (body, cut) = read_capped(response, MAX_BODY)
            .await
            .map_err(UpstreamError::Network)?;
        if cut && status.is_success() {
            return Err(UpstreamError::TooLarge);
        }
        if !status.is_success() {
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                message: error_message(&body).unwrap_or_else(|| snippet(&body, 200)),
                retry_after: wait,
            });
        }
        Ok(body)
    }

    /// Opens the live stream of a run from `since`, with the session cookie.
    /// There is no built-in reconnect (it would re-send the first request
    /// with a stale `since`); the caller reconnects from its cursor.
    pub fn open_stream(&self, run_id: &str, since: i64) -> Option<EventSource> {
        let cookie = self.cookie.as_ref()?;
        let mut url = self.run_url(run_id, &["stream"]);
        url.query_pairs_mut()
            .append_pair("since", &since.to_string());
        let request = self
            .stream_http
            .get(url)
            .header(COOKIE, self.cookie_header(cookie));
        Some(EventSource::new(request))
    }

    /// A permit of `max_concurrency`, held while a stream connects.
    pub async fn permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.permits.acquire().await.ok()
    }

    /// The session cookie header, marked sensitive so it never shows in
    /// reqwest's debug output.
    pub fn cookie_header(&self, cookie: &Secret) -> HeaderValue {
        sensitive(&format!("session_token={}", cookie.expose()))
    }

    pub fn has_cookie(&self) -> bool {
        self.cookie.is_some()
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }
}

fn sensitive(value: &str) -> HeaderValue {
    let mut header = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    header.set_sensitive(true);
    header
}
