//! `[api]` (the upstream Agent Runs API and how to follow it) and `[[runs]]`
//! (the static subscriptions). The doc comments on the fields are the
//! reference for their keys; `config.example.toml` says the same.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::check::{Cx, Result};
use super::raw::{RawApi, RawRun, Str};
use super::{MIN_FINISHED_RECHECK, MIN_POLL_INTERVAL, MIN_STREAM_IDLE_TIMEOUT, Secret};

/// `api.base_url`.
pub const DEFAULT_BASE_URL: &str = "https://api.travelmode.ai";
/// `api.transport`.
pub const DEFAULT_TRANSPORT: Transport = Transport::Auto;
/// `api.poll_interval`.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// `api.max_concurrency`.
pub const DEFAULT_MAX_CONCURRENCY: usize = 64;
/// `api.stream_idle_timeout`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// `api.finished_recheck`.
pub const DEFAULT_FINISHED_RECHECK: Duration = Duration::from_secs(5 * 60);
/// `api.finished_linger`.
pub const DEFAULT_FINISHED_LINGER: Duration = Duration::from_secs(24 * 3600);
/// `api.not_found_confirm`.
pub const DEFAULT_NOT_FOUND_CONFIRM: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// SSE when a session cookie is configured, polling otherwise.
    Auto,
    Sse,
    Poll,
}

impl Transport {
    /// As written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Sse => "sse",
            Self::Poll => "poll",
        }
    }

    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value {
            "auto" => Some(Self::Auto),
            "sse" => Some(Self::Sse),
            "poll" => Some(Self::Poll),
            _ => None,
        }
    }
}

/// `[api]`. `Debug` is redacted (see `secret.rs`).
#[derive(Clone, PartialEq)]
pub struct ApiConfig {
    /// `base_url`: the Agent Runs API; self-hosted deployments use their own
    /// host. Default [`DEFAULT_BASE_URL`].
    pub base_url: reqwest::Url,
    /// `token` / `token_file`: the bearer token for polling and run lookups
    /// (the SSE stream does not take it).
    pub token: Option<Secret>,
    /// `session_cookie` / `session_cookie_file`: enables the live SSE stream.
    pub session_cookie: Option<Secret>,
    /// `transport`: `auto | sse | poll`; auto is SSE when a session cookie is
    /// set. Default [`DEFAULT_TRANSPORT`].
    pub transport: Transport,
    /// `poll_interval`: the idle poll interval; runhook re-polls at once while
    /// events flow. At least [`MIN_POLL_INTERVAL`]. Default
    /// [`DEFAULT_POLL_INTERVAL`].
    pub poll_interval: Duration,
    /// `max_concurrency`: upstream requests in flight at once, over all runs.
    /// Default [`DEFAULT_MAX_CONCURRENCY`].
    pub max_concurrency: usize,
    /// `stream_idle_timeout`: a stream silent this long (heartbeats count) is
    /// reopened. At least [`MIN_STREAM_IDLE_TIMEOUT`]. Default
    /// [`DEFAULT_STREAM_IDLE_TIMEOUT`].
    pub stream_idle_timeout: Duration,
    /// `finished_recheck`: a failed run may be retried upstream, so it is
    /// looked at again this often. At least [`MIN_FINISHED_RECHECK`].
    /// Default [`DEFAULT_FINISHED_RECHECK`].
    pub finished_recheck: Duration,
    /// `finished_linger`: ... for this long after it finished; not longer
    /// than `state.retain`. Default [`DEFAULT_FINISHED_LINGER`].
    pub finished_linger: Duration,
    /// `not_found_confirm`: a 404 must last this long (a few tries spread
    /// over it) before a run is stopped: a load balancer answers 404 for a
    /// moment during a deploy. Default [`DEFAULT_NOT_FOUND_CONFIRM`].
    pub not_found_confirm: Duration,
}

/// A static subscription from `[[runs]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// `id`: the run to follow; each run once.
    pub id: String,
    /// `labels`: for routing.
    pub labels: BTreeMap<String, String>,
    /// `transport`: overrides `api.transport` for this run.
    pub transport: Option<Transport>,
}

impl Cx<'_> {
    pub(super) fn api(&self, raw: &RawApi) -> Result<ApiConfig> {
        let base_url = match &raw.base_url {
            Some(u) => self.url(u, "api.base_url")?,
            None => reqwest::Url::parse(DEFAULT_BASE_URL).expect("the default URL is valid"),
        };
        let token = self.secret(raw.token.as_ref(), raw.token_file.as_ref(), "api.token")?;
        let session_cookie = self.secret(
            raw.session_cookie.as_ref(),
            raw.session_cookie_file.as_ref(),
            "api.session_cookie",
        )?;
        let transport = match &raw.transport {
            Some(t) => self.transport(t, "api.transport")?,
            None => DEFAULT_TRANSPORT,
        };
        self.check_credentials(raw, transport, token.is_some(), session_cookie.is_some())?;
        Ok(ApiConfig {
            base_url,
            token,
            session_cookie,
            transport,
            poll_interval: self.duration_at_least(
                raw.poll_interval.as_ref(),
                "api.poll_interval",
                DEFAULT_POLL_INTERVAL,
                MIN_POLL_INTERVAL,
            )?,
            max_concurrency: self.concurrency(
                raw.max_concurrency.as_ref(),
                "api.max_concurrency",
                DEFAULT_MAX_CONCURRENCY,
            )?,
            stream_idle_timeout: self.duration_at_least(
                raw.stream_idle_timeout.as_ref(),
                "api.stream_idle_timeout",
                DEFAULT_STREAM_IDLE_TIMEOUT,
                MIN_STREAM_IDLE_TIMEOUT,
            )?,
            finished_recheck: self.duration_at_least(
                raw.finished_recheck.as_ref(),
                "api.finished_recheck",
                DEFAULT_FINISHED_RECHECK,
                MIN_FINISHED_RECHECK,
            )?,
            finished_linger: self.duration(
                raw.finished_linger.as_ref(),
                "api.finished_linger",
                DEFAULT_FINISHED_LINGER,
            )?,
            not_found_confirm: self.duration(
                raw.not_found_confirm.as_ref(),
                "api.not_found_confirm",
                DEFAULT_NOT_FOUND_CONFIRM,
            )?,
        })
    }

    /// Some credential is needed, and a forced transport needs its own.
    fn check_credentials(
        &self,
        raw: &RawApi,
        transport: Transport,
        token: bool,
        session_cookie: bool,
    ) -> Result<()> {
        if !token && !session_cookie {
            return Err(self.error_at(
                0,
                "api",
                "no credential: set `token` (bearer, polling) and/or `session_cookie_file` (SSE)",
            ));
        }
        if let Some(t) = &raw.transport {
            if transport == Transport::Sse && !session_cookie {
                return Err(self.error(t, "api.transport", "\"sse\" needs `session_cookie`"));
            }
            if transport == Transport::Poll && !token {
                return Err(self.error(t, "api.transport", "\"poll\" needs `token`"));
            }
        }
        Ok(())
    }

    fn transport(&self, value: &Str, key: &str) -> Result<Transport> {
        let text = self.string(value, key)?;
        Transport::parse(&text).ok_or_else(|| {
            self.error(
                value,
                key,
                format!("`{text}`: expected \"auto\", \"sse\" or \"poll\""),
            )
        })
    }

    pub(super) fn runs(&self, raw: &[RawRun]) -> Result<Vec<RunSpec>> {
        let mut seen = BTreeSet::new();
        raw.iter()
            .map(|run| {
                let id = self.non_empty(&run.id, "runs.id")?;
                if !seen.insert(id.clone()) {
                    return Err(self.error(
                        &run.id,
                        "runs.id",
                        format!("run {id} is listed twice"),
                    ));
                }
                Ok(RunSpec {
                    labels: self.labels(&run.labels, "runs.labels")?,
                    transport: run
                        .transport
                        .as_ref()
                        .map(|t| self.transport(t, "runs.transport"))
                        .transpose()?,
                    id,
                })
            })
            .collect()
    }
}
