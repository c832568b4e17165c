//! `[sinks.NAME]` (webhook and file sinks, and what every sink shares) and
//! `[delivery]`. Slack's keys are in `slack.rs`. The doc comments on the
//! fields are the reference for their keys; `config.example.toml` says the
//! same.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use toml::Spanned;

use super::check::{Cx, Result};
use super::raw::{RawDelivery, RawSink, Str};
use super::slack::SlackConfig;
use super::{
    ClusterConfig, MIN_INITIAL_BACKOFF, MIN_SINK_TIMEOUT, Secret, SlackMode, StateConfig,
    url_origin,
};

/// A sink's `concurrency`.
pub const DEFAULT_SINK_CONCURRENCY: usize = 16;
/// A sink's `ordered`.
pub const DEFAULT_ORDERED: bool = true;
/// A webhook sink's `pipeline`: strict by default, because pipelining lets
/// a crash repeat more than the one delivery in flight (see the field).
pub const DEFAULT_PIPELINE: bool = false;
/// A webhook sink's `timeout`.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// `delivery.max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 20;
/// `delivery.max_age`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// `delivery.initial_backoff`.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// `delivery.max_backoff`.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10 * 60);

/// `[delivery]`, and the same keys in a sink table, which override it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    /// `max_attempts`: then dead-letter. Default [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// `max_age`: an event still undelivered this long after it was recorded
    /// is dead-lettered. Default [`DEFAULT_MAX_AGE`].
    pub max_age: Duration,
    /// `initial_backoff`: the first retry delay, doubled per attempt with
    /// full jitter. At least [`MIN_INITIAL_BACKOFF`]. Default
    /// [`DEFAULT_INITIAL_BACKOFF`].
    pub initial_backoff: Duration,
    /// `max_backoff`: the longest retry delay; not shorter than
    /// `initial_backoff`. Default [`DEFAULT_MAX_BACKOFF`].
    pub max_backoff: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_age: DEFAULT_MAX_AGE,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// One `[sinks.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub name: Arc<str>,
    /// `type` (`webhook | slack | file`) and that type's keys.
    pub kind: SinkKind,
    /// `concurrency`: runs delivered in parallel. Default
    /// [`DEFAULT_SINK_CONCURRENCY`].
    pub concurrency: usize,
    /// `ordered`: per-run order (event N+1 waits for N); `false` lets a run's
    /// events go out in parallel. Default [`DEFAULT_ORDERED`].
    pub ordered: bool,
    /// The `[delivery]` keys, overridable per sink.
    pub delivery: DeliveryPolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    Webhook(WebhookConfig),
    Slack(SlackConfig),
    File(FileConfig),
}

impl SinkKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Webhook(_) => "webhook",
            Self::Slack(_) => "slack",
            Self::File(_) => "file",
        }
    }

    /// Where it delivers, without anything secret, for `check` and `status`.
    pub fn describe_target(&self) -> String {
        match self {
            // Scheme and host only: a path or query may hold the secret
            // (Discord), as may userinfo.
            Self::Webhook(w) => url_origin(&w.url),
            Self::Slack(SlackConfig {
                mode: SlackMode::IncomingWebhook { url },
                ..
            }) => match reqwest::Url::parse(url.expose()) {
                Ok(url) => format!("incoming webhook {}", url_origin(&url)),
                Err(_) => "incoming webhook".to_owned(),
            },
            Self::Slack(SlackConfig {
                mode: SlackMode::Bot { channel, .. },
                ..
            }) => format!("bot, channel {channel} (threads per run)"),
            Self::File(f) => f.path.display().to_string(),
        }
    }
}

/// A webhook sink. `Debug` is redacted (see `secret.rs`).
#[derive(Clone, PartialEq)]
pub struct WebhookConfig {
    /// `url` / `url_file`: where events are POSTed.
    pub url: reqwest::Url,
    /// `secret` / `secret_file`, or `secrets = [new, old]` while rotating:
    /// `whsec_` + base64 of 24 to 64 bytes. Decoded, newest first.
    pub secrets: Vec<SigningKey>,
    /// `headers`: extra request headers, parsed here so that the sink never
    /// meets an invalid one. `webhook-*` are runhook's own.
    pub headers: HeaderMap,
    /// `timeout`: per request. At least [`MIN_SINK_TIMEOUT`]. Default
    /// [`DEFAULT_WEBHOOK_TIMEOUT`].
    pub timeout: Duration,
    /// `pipeline`: send a run's event N+1 as soon as N is answered and
    /// record the outcomes in batches behind the chain, instead of waiting
    /// for N's done-mark to commit. Per-run order of first arrivals holds;
    /// the cost is that after a crash the receiver may see again, same ids,
    /// up to `deliver::runs::PIPELINE_WINDOW` already-accepted events of a
    /// run before it goes on. Only with `ordered = true` (unordered sinks
    /// do not chain). Default [`DEFAULT_PIPELINE`].
    pub pipeline: bool,
}

/// The decoded key of a `whsec_...` secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(pub Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// A file sink.
#[derive(Debug, Clone, PartialEq)]
pub struct FileConfig {
    /// `path`: JSON Lines, one envelope per line, fsync'd; reopened on SIGHUP.
    pub path: PathBuf,
    /// `node`: with the state in PostgreSQL, the one replica (its
    /// `cluster.node`) that writes this file: the file is on that machine's
    /// disk, and two writers would each hold half the events. Required
    /// there; ignored on SQLite, where one daemon does everything.
    pub node: Option<String>,
}

/// The keys each sink type takes besides the ones every sink takes.
fn type_keys(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "webhook" => &[
            "url",
            "url_file",
            "secret",
            "secret_file",
            "secrets",
            "headers",
            "timeout",
            "pipeline",
        ],
        "slack" => &[
            "webhook_url",
            "webhook_url_file",
            "bot_token",
            "bot_token_file",
            "channel",
            "templates",
            "api_base",
        ],
        "file" => &["path", "node"],
        _ => return None,
    })
}

impl Cx<'_> {
    pub(super) fn sink(
        &self,
        name: &str,
        spanned: &Spanned<RawSink>,
        defaults: &DeliveryPolicy,
    ) -> Result<SinkConfig> {
        let raw = spanned.get_ref();
        let key = format!("sinks.{name}");
        let kind_name = self.string(&raw.kind, &format!("{key}.type"))?;
        let Some(allowed) = type_keys(&kind_name) else {
            return Err(self.error(
                &raw.kind,
                &format!("{key}.type"),
                format!(
                    "unknown sink type `{kind_name}`: expected \"webhook\", \"slack\" or \"file\""
                ),
            ));
        };
        for (field, offset) in present_type_fields(raw) {
            if !allowed.contains(&field) {
                return Err(self.error_at(
                    offset,
                    &format!("{key}.{field}"),
                    format!(
                        "`{field}` does not apply to a {kind_name} sink{}",
                        why_not(field, &kind_name)
                    ),
                ));
            }
        }
        let kind = match kind_name.as_str() {
            "webhook" => SinkKind::Webhook(self.webhook(raw, &key, spanned)?),
            "slack" => SinkKind::Slack(self.slack(raw, &key, spanned)?),
            _ => SinkKind::File(FileConfig {
                path: PathBuf::from(match &raw.path {
                    Some(p) => self.non_empty(p, &format!("{key}.path"))?,
                    None => return Err(self.error(spanned, &key, "a file sink needs `path`")),
                }),
                node: (raw.node.as_ref())
                    .map(|node| self.non_empty(node, &format!("{key}.node")))
                    .transpose()?,
            }),
        };
        let delivery = RawDelivery {
            max_attempts: raw.max_attempts.clone(),
            max_age: raw.max_age.clone(),
            initial_backoff: raw.initial_backoff.clone(),
            max_backoff: raw.max_backoff.clone(),
        };
        Ok(SinkConfig {
            name: Arc::from(name),
            kind,
            concurrency: self.concurrency(
                raw.concurrency.as_ref(),
                &format!("{key}.concurrency"),
                DEFAULT_SINK_CONCURRENCY,
            )?,
            ordered: raw
                .ordered
                .as_ref()
                .map_or(DEFAULT_ORDERED, |o| *o.get_ref()),
            delivery: self.delivery(&delivery, &key, defaults)?,
        })
    }

    pub(super) fn delivery(
        &self,
        raw: &RawDelivery,
        key: &str,
        base: &DeliveryPolicy,
    ) -> Result<DeliveryPolicy> {
        let policy = DeliveryPolicy {
            max_attempts: match &raw.max_attempts {
                None => base.max_attempts,
                Some(v) => u32::try_from(*v.get_ref())
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        self.error(
                            v,
                            &format!("{key}.max_attempts"),
                            "must be between 1 and 2^32",
                        )
                    })?,
            },
            max_age: self.duration(
                raw.max_age.as_ref(),
                &format!("{key}.max_age"),
                base.max_age,
            )?,
            initial_backoff: self.duration_at_least(
                raw.initial_backoff.as_ref(),
                &format!("{key}.initial_backoff"),
                base.initial_backoff,
                MIN_INITIAL_BACKOFF,
            )?,
            max_backoff: self.duration(
                raw.max_backoff.as_ref(),
                &format!("{key}.max_backoff"),
                base.max_backoff,
            )?,
        };
        if policy.max_backoff < policy.initial_backoff {
            let at = raw.max_backoff.as_ref().or(raw.initial_backoff.as_ref());
            let offset = at.map_or(0, |s| s.span().start);
            return Err(self.error_at(
                offset,
                &format!("{key}.max_backoff"),
                "must not be shorter than initial_backoff",
            ));
        }
        Ok(policy)
    }

    fn webhook(&self, raw: &RawSink, key: &str, at: &Spanned<RawSink>) -> Result<WebhookConfig> {
        let url_key = format!("{key}.url");
        let url = match self.secret(raw.url.as_ref(), raw.url_file.as_ref(), &url_key)? {
            Some(url) => match raw.url.as_ref().or(raw.url_file.as_ref()) {
                Some(spot) => {
                    let shown = Spanned::new(spot.span(), url.expose().to_owned());
                    self.url(&shown, &url_key)?
                }
                None => return Err(self.error(at, key, "a webhook sink needs `url`")),
            },
            None => return Err(self.error(at, key, "a webhook sink needs `url`")),
        };
        Ok(WebhookConfig {
            url,
            secrets: self.signing_keys(raw, key, at)?,
            headers: self.headers(raw, key)?,
            timeout: self.duration_at_least(
                raw.timeout.as_ref(),
                &format!("{key}.timeout"),
                DEFAULT_WEBHOOK_TIMEOUT,
                MIN_SINK_TIMEOUT,
            )?,
            pipeline: self.pipeline(raw, key)?,
        })
    }

    /// `pipeline`, which only an ordered chain can use: an unordered sink
    /// already sends without waiting, so the key would promise nothing.
    fn pipeline(&self, raw: &RawSink, key: &str) -> Result<bool> {
        let Some(pipeline) = &raw.pipeline else {
            return Ok(DEFAULT_PIPELINE);
        };
        let ordered = raw
            .ordered
            .as_ref()
            .map_or(DEFAULT_ORDERED, |o| *o.get_ref());
        if *pipeline.get_ref() && !ordered {
            return Err(self.error(
                pipeline,
                &format!("{key}.pipeline"),
                "`pipeline = true` needs `ordered = true`: an unordered sink sends a run's events without waiting already",
            ));
        }
        Ok(*pipeline.get_ref())
    }

    /// `secret` (or `secret_file`) or `secrets`, decoded, newest first.
    fn signing_keys(
        &self,
        raw: &RawSink,
        key: &str,
        at: &Spanned<RawSink>,
    ) -> Result<Vec<SigningKey>> {
        let mut secrets = Vec::new();
        let secret_key = format!("{key}.secret");
        let single = self.secret(raw.secret.as_ref(), raw.secret_file.as_ref(), &secret_key)?;
        if let (Some(single), Some(spot)) =
            (single, raw.secret.as_ref().or(raw.secret_file.as_ref()))
        {
            secrets.push(self.signing_key(&single, spot, &secret_key)?);
        }
        for value in raw.secrets.iter().flatten() {
            if !secrets.is_empty() && raw.secret.is_some() {
                return Err(self.error(
                    value,
                    &format!("{key}.secrets"),
                    "set `secret` or `secrets`, not both",
                ));
            }
            let secret = Secret::new(self.string(value, &format!("{key}.secrets"))?);
            secrets.push(self.signing_key(&secret, value, &format!("{key}.secrets"))?);
        }
        if secrets.is_empty() {
            return Err(self.error(
                at,
                key,
                "a webhook sink needs `secret` (whsec_...) or `secrets`",
            ));
        }
        Ok(secrets)
    }

    /// `headers`, parsed into the map the sink sends as is.
    fn headers(&self, raw: &RawSink, key: &str) -> Result<HeaderMap> {
        let mut headers = HeaderMap::new();
        for (name, value) in raw.headers.iter().flatten() {
            let header_key = format!("{key}.headers.{name}");
            let value_text = self.string(value, &header_key)?;
            let (Ok(header_name), Ok(header_value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value_text),
            ) else {
                return Err(self.error(value, &header_key, "not a valid HTTP header"));
            };
            if name.to_ascii_lowercase().starts_with("webhook-") {
                return Err(self.error(value, &header_key, "webhook-* headers are set by runhook"));
            }
            headers.insert(header_name, header_value);
        }
        Ok(headers)
    }

    /// `whsec_` + base64 of 24 to 64 bytes, as the Standard Webhooks spec asks.
    fn signing_key(&self, secret: &Secret, at: &Str, key: &str) -> Result<SigningKey> {
        let encoded = secret.expose().strip_prefix("whsec_").ok_or_else(|| {
            self.error(
                at,
                key,
                "a webhook secret starts with `whsec_` followed by base64",
            )
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| self.error(at, key, "the part after `whsec_` is not valid base64"))?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(self.error(
                at,
                key,
                format!(
                    "the secret decodes to {} bytes; use 24 to 64 random bytes",
                    bytes.len()
                ),
            ));
        }
        Ok(SigningKey(bytes))
    }
}

impl Cx<'_> {
    /// With the state shared by replicas, a file without a `node` would be
    /// written by none of them (or, were every replica to write its own
    /// copy, each would hold part of the events): the user must say where.
    pub(super) fn check_file_sinks_have_nodes(
        &self,
        raw: &BTreeMap<String, Spanned<RawSink>>,
        sinks: &BTreeMap<String, SinkConfig>,
        state: &StateConfig,
        cluster: &ClusterConfig,
    ) -> Result<()> {
        if state.location.sqlite_path().is_some() {
            return Ok(());
        }
        for (name, sink) in sinks {
            if let SinkKind::File(FileConfig { node: None, .. }) = &sink.kind
                && let Some(at) = raw.get(name)
            {
                return Err(self.error(
                    at,
                    &format!("sinks.{name}.node"),
                    format!(
                        "with the state in PostgreSQL a file sink names the one replica that writes it, e.g. `node = \"{}\"`",
                        cluster.node
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Why a key another type takes is refused here, where the reason is not
/// plain from the key's name.
fn why_not(field: &str, kind: &str) -> &'static str {
    match (field, kind) {
        ("pipeline", "file") => {
            ": a file sink is exactly-once through its offset, recorded with each written batch"
        }
        ("pipeline", "slack") => {
            ": a Slack thread needs its root message recorded before the replies are sent"
        }
        ("node", _) => {
            ": HTTP sinks are sent by whichever replica holds each run's lease; only a file is on one machine"
        }
        _ => "",
    }
}

/// The type-specific keys a sink table sets, with where they are.
fn present_type_fields(raw: &RawSink) -> Vec<(&'static str, usize)> {
    fn first<V>(map: Option<&std::collections::BTreeMap<String, Spanned<V>>>) -> Option<usize> {
        map.and_then(|m| m.values().next()).map(|v| v.span().start)
    }
    let at = |value: Option<&Str>| value.map(|v| v.span().start);
    let fields = [
        ("url", at(raw.url.as_ref())),
        ("url_file", at(raw.url_file.as_ref())),
        ("secret", at(raw.secret.as_ref())),
        ("secret_file", at(raw.secret_file.as_ref())),
        ("secrets", at(raw.secrets.as_ref().and_then(|s| s.first()))),
        ("headers", first(raw.headers.as_ref())),
        ("timeout", at(raw.timeout.as_ref())),
        ("pipeline", raw.pipeline.as_ref().map(|p| p.span().start)),
        ("webhook_url", at(raw.webhook_url.as_ref())),
        ("webhook_url_file", at(raw.webhook_url_file.as_ref())),
        ("bot_token", at(raw.bot_token.as_ref())),
        ("bot_token_file", at(raw.bot_token_file.as_ref())),
        ("channel", at(raw.channel.as_ref())),
        ("templates", first(raw.templates.as_ref())),
        ("api_base", at(raw.api_base.as_ref())),
        ("path", at(raw.path.as_ref())),
        ("node", at(raw.node.as_ref())),
    ];
    fields
        .into_iter()
        .filter_map(|(name, offset)| Some((name, offset?)))
        .collect()
}
