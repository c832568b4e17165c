//! The validated configuration the rest of runhook runs on.
//!
//! Loading happens in two steps, as ripgrep does with its flags: `raw` mirrors
//! the TOML as written (with spans), then [`Config::from_raw`] checks every
//! value, applies defaults, expands `${VAR}`, reads `*_file` secrets and
//! produces typed values. Nothing downstream re-validates.

mod raw;
mod secret;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use toml::Spanned;

use crate::route::{Route, Router};
use raw::{RawApi, RawConfig, RawDelivery, RawRoute, RawRun, RawSink, Str};
pub use secret::{Secret, url_origin};

/// Where the daemon looks when neither `--config` nor `RUNHOOK_CONFIG` is set.
pub const DEFAULT_PATH: &str = "/etc/runhook/runhook.toml";
pub const DEFAULT_BASE_URL: &str = "https://api.travelmode.ai";

/// Floors for durations that pace a loop: at zero the loop would spin.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
pub const MIN_FINISHED_RECHECK: Duration = Duration::from_millis(100);
pub const MIN_STREAM_IDLE_TIMEOUT: Duration = Duration::from_millis(100);
pub const MIN_INITIAL_BACKOFF: Duration = Duration::from_millis(10);
pub const MIN_SINK_TIMEOUT: Duration = Duration::from_millis(100);

/// Longest duration any key takes ("keep forever" fits): beyond it, clock
/// arithmetic (`now + duration`) overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Cap for `api.max_concurrency` and a sink's `concurrency`: far above what
/// one machine needs, far below where a semaphore panics.
pub const MAX_CONCURRENCY: usize = 10_000;

/// Statuses the upstream documents; `statuses` route filters must use them.
pub const RUN_STATUSES: [&str; 5] = ["pending", "running", "completed", "failed", "cancelled"];

/// A configuration error, always pointing at the place in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `sinks.ops.secret`.
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from, for messages.
    pub source: PathBuf,
    pub api: ApiConfig,
    pub state: StateConfig,
    pub server: Option<ServerConfig>,
    pub runs: Vec<RunSpec>,
    pub sinks: BTreeMap<String, SinkConfig>,
    pub router: Router,
}

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

    fn parse(value: &str) -> Option<Self> {
        match value {
            "auto" => Some(Self::Auto),
            "sse" => Some(Self::Sse),
            "poll" => Some(Self::Poll),
            _ => None,
        }
    }
}

/// `Debug` is redacted (see `secret.rs`).
#[derive(Clone, PartialEq)]
pub struct ApiConfig {
    pub base_url: reqwest::Url,
    pub token: Option<Secret>,
    pub session_cookie: Option<Secret>,
    pub transport: Transport,
    pub poll_interval: Duration,
    pub max_concurrency: usize,
    pub stream_idle_timeout: Duration,
    pub finished_recheck: Duration,
    pub finished_linger: Duration,
    /// A 404 must last this long (a few tries spread over it) before a run
    /// is stopped: a load balancer answers 404 for a moment during a deploy.
    pub not_found_confirm: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    pub path: PathBuf,
    pub retain: Duration,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
}

/// A static subscription from `[[runs]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub transport: Option<Transport>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    pub max_attempts: u32,
    pub max_age: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 20,
            max_age: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub name: Arc<str>,
    pub kind: SinkKind,
    /// Runs delivered in parallel.
    pub concurrency: usize,
    /// Per-run order (event N+1 waits for N).
    pub ordered: bool,
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

/// `Debug` is redacted (see `secret.rs`).
#[derive(Clone, PartialEq)]
pub struct WebhookConfig {
    pub url: reqwest::Url,
    /// Signing keys (base64-decoded), newest first. Several while rotating.
    pub secrets: Vec<SigningKey>,
    pub headers: BTreeMap<String, String>,
    pub timeout: Duration,
}

/// The decoded key of a `whsec_...` secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(pub Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// `Debug` is redacted (see `secret.rs`).
#[derive(Clone, PartialEq)]
pub struct SlackConfig {
    pub mode: SlackMode,
    /// Per event type message templates.
    pub templates: BTreeMap<String, String>,
    /// Slack's Web API root; tests point it at a local fake.
    pub api_base: reqwest::Url,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SlackMode {
    IncomingWebhook { url: Secret },
    Bot { token: Secret, channel: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileConfig {
    pub path: PathBuf,
}

impl Config {
    /// Reads and validates a config file, expanding `${VAR}` from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            key: "(file)".into(),
            message: format!("cannot read the config file: {error}"),
        })?;
        Self::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Validates config text; `env` resolves `${VAR}`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let cx = Cx {
            file: path,
            text,
            env,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
        cx.validate(raw)
    }
}

/// The validation context: the file and its text, to turn spans into
/// line and column.
struct Cx<'a> {
    file: &'a Path,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Cx<'_> {
    fn error_at(&self, offset: usize, key: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_column(self.text, offset);
        ConfigError {
            file: self.file.display().to_string(),
            line,
            column,
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn error<T>(&self, at: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.error_at(at.span().start, key, message)
    }

    fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let offset = error.span().map_or(0, |s| s.start);
        let key = key_at(self.text, offset);
        self.error_at(offset, &key, error.message().trim())
    }

    /// `${VAR}` expansion; an unset variable is an error.
    fn string(&self, value: &Str, key: &str) -> Result<String> {
        let raw = value.get_ref();
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| self.error(value, key, "unterminated `${` (write `${NAME}`)"))?;
            let name = &after[..end];
            let resolved = (self.env)(name).ok_or_else(|| {
                self.error(
                    value,
                    key,
                    format!("environment variable `{name}` is not set"),
                )
            })?;
            out.push_str(&resolved);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn non_empty(&self, value: &Str, key: &str) -> Result<String> {
        let s = self.string(value, key)?;
        if s.trim().is_empty() {
            return Err(self.error(value, key, "must not be empty"));
        }
        Ok(s)
    }

    /// A secret given inline or through its `*_file` twin (one, not both).
    fn secret(
        &self,
        inline: Option<&Str>,
        file: Option<&Str>,
        key: &str,
    ) -> Result<Option<Secret>> {
        match (inline, file) {
            (Some(_), Some(f)) => Err(self.error(
                f,
                &format!("{key}_file"),
                format!("set `{key}` or `{key}_file`, not both"),
            )),
            (Some(v), None) => Ok(Some(Secret::new(self.non_empty(v, key)?))),
            (None, Some(f)) => {
                let file_key = format!("{key}_file");
                let path = self.non_empty(f, &file_key)?;
                let content = std::fs::read_to_string(&path).map_err(|e| {
                    self.error(f, &file_key, format!("cannot read secret file {path}: {e}"))
                })?;
                let content = content.trim_end_matches(['\n', '\r']);
                if content.is_empty() {
                    return Err(self.error(f, &file_key, format!("secret file {path} is empty")));
                }
                Ok(Some(Secret::new(content)))
            }
            (None, None) => Ok(None),
        }
    }

    fn duration(&self, value: Option<&Str>, key: &str, default: Duration) -> Result<Duration> {
        let Some(value) = value else {
            return Ok(default);
        };
        let text = self.string(value, key)?;
        let duration = humantime::parse_duration(text.trim()).map_err(|e| {
            self.error(
                value,
                key,
                format!("`{text}` is not a duration ({e}); write e.g. \"500ms\", \"2s\", \"5m\""),
            )
        })?;
        if duration > MAX_DURATION {
            return Err(self.error(value, key, "must be at most 100 years"));
        }
        Ok(duration)
    }

    /// A duration that paces a loop: refused below `floor`, where the loop
    /// would spin.
    fn duration_at_least(
        &self,
        value: Option<&Str>,
        key: &str,
        default: Duration,
        floor: Duration,
    ) -> Result<Duration> {
        let duration = self.duration(value, key, default)?;
        match value {
            Some(at) if duration < floor => Err(self.error(
                at,
                key,
                format!(
                    "must be at least {} (shorter would make runhook spin)",
                    humantime::format_duration(floor)
                ),
            )),
            _ => Ok(duration),
        }
    }

    /// A concurrency: 1 to [`MAX_CONCURRENCY`].
    fn concurrency(
        &self,
        value: Option<&Spanned<i64>>,
        key: &str,
        default: usize,
    ) -> Result<usize> {
        match value {
            None => Ok(default),
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| (1..=MAX_CONCURRENCY).contains(n))
                .ok_or_else(|| {
                    self.error(v, key, format!("must be between 1 and {MAX_CONCURRENCY}"))
                }),
        }
    }

    fn url(&self, value: &Str, key: &str) -> Result<reqwest::Url> {
        let text = self.non_empty(value, key)?;
        let url = reqwest::Url::parse(&text)
            .map_err(|e| self.error(value, key, format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.error(value, key, "must be an http:// or https:// URL"));
        }
        Ok(url)
    }

    fn strings(&self, values: Option<&Vec<Str>>, key: &str) -> Result<Vec<String>> {
        values
            .into_iter()
            .flatten()
            .map(|v| self.non_empty(v, key))
            .collect()
    }

    fn labels(&self, raw: &BTreeMap<String, Str>, key: &str) -> Result<BTreeMap<String, String>> {
        raw.iter()
            .map(|(k, v)| Ok((k.clone(), self.string(v, &format!("{key}.{k}"))?)))
            .collect()
    }

    fn validate(&self, raw: RawConfig) -> Result<Config> {
        let api = self.api(&raw.api)?;
        let state = StateConfig {
            path: match &raw.state.path {
                Some(p) => PathBuf::from(self.non_empty(p, "state.path")?),
                None => PathBuf::from("/var/lib/runhook/runhook.db"),
            },
            retain: self.duration(
                raw.state.retain.as_ref(),
                "state.retain",
                Duration::from_secs(7 * 24 * 3600),
            )?,
            shutdown_grace: self.duration(
                raw.state.shutdown_grace.as_ref(),
                "state.shutdown_grace",
                Duration::from_secs(10),
            )?,
        };
        self.check_retain_covers_linger(&raw, &state, &api)?;
        let server = match &raw.server {
            None => None,
            Some(server) => {
                let listen = match &server.listen {
                    Some(l) => {
                        let text = self.non_empty(l, "server.listen")?;
                        text.parse().map_err(|e| {
                            self.error(l, "server.listen", format!("not an address:port: {e}"))
                        })?
                    }
                    None => SocketAddr::from(([127, 0, 0, 1], 9464)),
                };
                Some(ServerConfig { listen })
            }
        };
        let runs = self.runs(&raw.runs)?;
        let defaults = self.delivery(&raw.delivery, "delivery", &DeliveryPolicy::default())?;
        let mut sinks = BTreeMap::new();
        for (name, sink) in &raw.sinks {
            sinks.insert(name.clone(), self.sink(name, sink, &defaults)?);
        }
        let routes = raw
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| self.route(i, r, &sinks))
            .collect::<Result<Vec<_>>>()?;
        for (name, sink) in &raw.sinks {
            if !routes.iter().any(|r| r.sinks.iter().any(|s| **s == **name)) {
                return Err(self.error(
                    sink,
                    &format!("sinks.{name}"),
                    "no route sends anything to this sink; add it to a [[routes]] entry's `sinks`",
                ));
            }
        }
        Ok(Config {
            source: self.file.to_owned(),
            api,
            state,
            server,
            runs,
            sinks,
            router: Router::new(routes),
        })
    }

    /// A failed run is looked at again for `finished_linger` (it may be
    /// retried upstream). Were its `run_finished` pruned meanwhile, seeing
    /// the same finish again would record it anew and deliver that id a
    /// second time. So `retain` must cover the linger.
    fn check_retain_covers_linger(
        &self,
        raw: &RawConfig,
        state: &StateConfig,
        api: &ApiConfig,
    ) -> Result<()> {
        if state.retain >= api.finished_linger {
            return Ok(());
        }
        let (at, key, message) = match (&raw.state.retain, &raw.api.finished_linger) {
            (Some(retain), _) => (
                retain,
                "state.retain",
                format!(
                    "must be at least api.finished_linger ({})",
                    humantime::format_duration(api.finished_linger)
                ),
            ),
            (None, Some(linger)) => (
                linger,
                "api.finished_linger",
                format!(
                    "must not be longer than state.retain ({})",
                    humantime::format_duration(state.retain)
                ),
            ),
            (None, None) => return Ok(()),
        };
        Err(self.error(at, key, message))
    }

    fn api(&self, raw: &RawApi) -> Result<ApiConfig> {
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
            None => Transport::Auto,
        };
        if token.is_none() && session_cookie.is_none() {
            return Err(self.error_at(
                0,
                "api",
                "no credential: set `token` (bearer, polling) and/or `session_cookie_file` (SSE)",
            ));
        }
        if let Some(t) = &raw.transport {
            if transport == Transport::Sse && session_cookie.is_none() {
                return Err(self.error(t, "api.transport", "\"sse\" needs `session_cookie`"));
            }
            if transport == Transport::Poll && token.is_none() {
                return Err(self.error(t, "api.transport", "\"poll\" needs `token`"));
            }
        }
        Ok(ApiConfig {
            base_url,
            token,
            session_cookie,
            transport,
            poll_interval: self.duration_at_least(
                raw.poll_interval.as_ref(),
                "api.poll_interval",
                Duration::from_secs(2),
                MIN_POLL_INTERVAL,
            )?,
            max_concurrency: self.concurrency(
                raw.max_concurrency.as_ref(),
                "api.max_concurrency",
                64,
            )?,
            stream_idle_timeout: self.duration_at_least(
                raw.stream_idle_timeout.as_ref(),
                "api.stream_idle_timeout",
                Duration::from_secs(90),
                MIN_STREAM_IDLE_TIMEOUT,
            )?,
            finished_recheck: self.duration_at_least(
                raw.finished_recheck.as_ref(),
                "api.finished_recheck",
                Duration::from_secs(300),
                MIN_FINISHED_RECHECK,
            )?,
            finished_linger: self.duration(
                raw.finished_linger.as_ref(),
                "api.finished_linger",
                Duration::from_secs(24 * 3600),
            )?,
            not_found_confirm: self.duration(
                raw.not_found_confirm.as_ref(),
                "api.not_found_confirm",
                Duration::from_secs(60),
            )?,
        })
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

    fn runs(&self, raw: &[RawRun]) -> Result<Vec<RunSpec>> {
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

    fn delivery(
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

    fn sink(
        &self,
        name: &str,
        spanned: &Spanned<RawSink>,
        defaults: &DeliveryPolicy,
    ) -> Result<SinkConfig> {
        let raw = spanned.get_ref();
        let key = format!("sinks.{name}");
        let kind_name = self.string(&raw.kind, &format!("{key}.type"))?;
        let allowed: &[&str] = match kind_name.as_str() {
            "webhook" => &[
                "url",
                "url_file",
                "secret",
                "secret_file",
                "secrets",
                "headers",
                "timeout",
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
            "file" => &["path"],
            other => {
                return Err(self.error(
                    &raw.kind,
                    &format!("{key}.type"),
                    format!(
                        "unknown sink type `{other}`: expected \"webhook\", \"slack\" or \"file\""
                    ),
                ));
            }
        };
        for (field, offset) in present_type_fields(raw) {
            if !allowed.contains(&field) {
                return Err(self.error_at(
                    offset,
                    &format!("{key}.{field}"),
                    format!("`{field}` does not apply to a {kind_name} sink"),
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
                16,
            )?,
            ordered: raw.ordered.as_ref().is_none_or(|o| *o.get_ref()),
            delivery: self.delivery(&delivery, &key, defaults)?,
        })
    }

    fn webhook(&self, raw: &RawSink, key: &str, at: &Spanned<RawSink>) -> Result<WebhookConfig> {
        let url_key = format!("{key}.url");
        let url = match self.secret(raw.url.as_ref(), raw.url_file.as_ref(), &url_key)? {
            Some(url) => {
                let spot = raw
                    .url
                    .as_ref()
                    .or(raw.url_file.as_ref())
                    .expect("one is set");
                let shown = Spanned::new(spot.span(), url.expose().to_owned());
                self.url(&shown, &url_key)?
            }
            None => return Err(self.error(at, key, "a webhook sink needs `url`")),
        };
        let mut secrets = Vec::new();
        let secret_key = format!("{key}.secret");
        if let Some(single) =
            self.secret(raw.secret.as_ref(), raw.secret_file.as_ref(), &secret_key)?
        {
            let spot = raw
                .secret
                .as_ref()
                .or(raw.secret_file.as_ref())
                .expect("one is set");
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
        let mut headers = BTreeMap::new();
        for (name, value) in raw.headers.iter().flatten() {
            let header_key = format!("{key}.headers.{name}");
            let value_text = self.string(value, &header_key)?;
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(&value_text).is_err()
            {
                return Err(self.error(value, &header_key, "not a valid HTTP header"));
            }
            if name.to_ascii_lowercase().starts_with("webhook-") {
                return Err(self.error(value, &header_key, "webhook-* headers are set by runhook"));
            }
            headers.insert(name.clone(), value_text);
        }
        Ok(WebhookConfig {
            url,
            secrets,
            headers,
            timeout: self.duration_at_least(
                raw.timeout.as_ref(),
                &format!("{key}.timeout"),
                Duration::from_secs(10),
                MIN_SINK_TIMEOUT,
            )?,
        })
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

    fn slack(&self, raw: &RawSink, key: &str, at: &Spanned<RawSink>) -> Result<SlackConfig> {
        let webhook_url = self.secret(
            raw.webhook_url.as_ref(),
            raw.webhook_url_file.as_ref(),
            &format!("{key}.webhook_url"),
        )?;
        let bot_token = self.secret(
            raw.bot_token.as_ref(),
            raw.bot_token_file.as_ref(),
            &format!("{key}.bot_token"),
        )?;
        let mode = match (webhook_url, bot_token) {
            (Some(url), None) => {
                if let Some(channel) = &raw.channel {
                    return Err(self.error(
                        channel,
                        &format!("{key}.channel"),
                        "`channel` goes with `bot_token`; an incoming webhook has its own channel",
                    ));
                }
                SlackMode::IncomingWebhook { url }
            }
            (None, Some(token)) => {
                let channel = match &raw.channel {
                    Some(c) => self.non_empty(c, &format!("{key}.channel"))?,
                    None => return Err(self.error(at, key, "`bot_token` needs `channel`")),
                };
                SlackMode::Bot { token, channel }
            }
            (Some(_), Some(_)) => {
                return Err(self.error(at, key, "set `webhook_url` or `bot_token`, not both"));
            }
            (None, None) => {
                return Err(self.error(
                    at,
                    key,
                    "a slack sink needs `webhook_url` or `bot_token` + `channel`",
                ));
            }
        };
        let mut templates = BTreeMap::new();
        for (event_type, value) in raw.templates.iter().flatten() {
            let template_key = format!("{key}.templates.{event_type}");
            let source = self.string(value, &template_key)?;
            if let Err(error) = minijinja::Environment::new().template_from_str(&source) {
                return Err(self.error(
                    value,
                    &template_key,
                    format!("not a valid template: {error}"),
                ));
            }
            templates.insert(event_type.clone(), source);
        }
        let api_base = match &raw.api_base {
            Some(u) => self.url(u, &format!("{key}.api_base"))?,
            None => reqwest::Url::parse("https://slack.com/api/").expect("valid URL"),
        };
        Ok(SlackConfig {
            mode,
            templates,
            api_base,
        })
    }

    fn route(
        &self,
        index: usize,
        spanned: &Spanned<RawRoute>,
        sinks: &BTreeMap<String, SinkConfig>,
    ) -> Result<Route> {
        let raw = spanned.get_ref();
        let key = format!("routes[{index}]");
        if raw.sinks.is_empty() {
            return Err(self.error(
                spanned,
                &format!("{key}.sinks"),
                "a route needs at least one sink",
            ));
        }
        let mut route_sinks = Vec::new();
        for sink in &raw.sinks {
            let name = self.string(sink, &format!("{key}.sinks"))?;
            let Some(config) = sinks.get(&name) else {
                return Err(self.error(
                    sink,
                    &format!("{key}.sinks"),
                    format!("no sink named `{name}`"),
                ));
            };
            route_sinks.push(config.name.clone());
        }
        let statuses = self.strings(raw.statuses.as_ref(), &format!("{key}.statuses"))?;
        for (status, at) in statuses.iter().zip(raw.statuses.iter().flatten()) {
            if !RUN_STATUSES.contains(&status.as_str()) {
                return Err(self.error(
                    at,
                    &format!("{key}.statuses"),
                    format!(
                        "unknown status `{status}`: expected one of {}",
                        RUN_STATUSES.join(", ")
                    ),
                ));
            }
        }
        Ok(Route {
            event_types: self.strings(raw.event_types.as_ref(), &format!("{key}.event_types"))?,
            runs: self.strings(raw.runs.as_ref(), &format!("{key}.runs"))?,
            labels: self.labels(
                raw.labels.as_ref().unwrap_or(&BTreeMap::new()),
                &format!("{key}.labels"),
            )?,
            statuses,
            phases: self.strings(raw.phases.as_ref(), &format!("{key}.phases"))?,
            sinks: route_sinks,
        })
    }
}

/// The type-specific keys a sink table sets, with where they are.
fn present_type_fields(raw: &RawSink) -> Vec<(&'static str, usize)> {
    let mut fields = Vec::new();
    let mut add = |name: &'static str, span: Option<std::ops::Range<usize>>| {
        if let Some(span) = span {
            fields.push((name, span.start));
        }
    };
    add("url", raw.url.as_ref().map(Spanned::span));
    add("url_file", raw.url_file.as_ref().map(Spanned::span));
    add("secret", raw.secret.as_ref().map(Spanned::span));
    add("secret_file", raw.secret_file.as_ref().map(Spanned::span));
    add(
        "secrets",
        raw.secrets
            .as_ref()
            .and_then(|s| s.first())
            .map(Spanned::span),
    );
    add(
        "headers",
        raw.headers
            .as_ref()
            .and_then(|h| h.values().next())
            .map(Spanned::span),
    );
    add("timeout", raw.timeout.as_ref().map(Spanned::span));
    add("webhook_url", raw.webhook_url.as_ref().map(Spanned::span));
    add(
        "webhook_url_file",
        raw.webhook_url_file.as_ref().map(Spanned::span),
    );
    add("bot_token", raw.bot_token.as_ref().map(Spanned::span));
    add(
        "bot_token_file",
        raw.bot_token_file.as_ref().map(Spanned::span),
    );
    add("channel", raw.channel.as_ref().map(Spanned::span));
    add(
        "templates",
        raw.templates
            .as_ref()
            .and_then(|t| t.values().next())
            .map(Spanned::span),
    );
    add("api_base", raw.api_base.as_ref().map(Spanned::span));
    add("path", raw.path.as_ref().map(Spanned::span));
    fields
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Best-effort dotted key for an error the TOML parser reports: the table
/// header above the offset plus the key on its line.
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    let line = text[line_start..line_end].trim();
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = if line.starts_with('[') {
        None
    } else {
        line.split('=')
            .next()
            .map(|k| k.trim().trim_matches('"').to_owned())
    };
    let key = match (table, key) {
        (Some(t), Some(k)) if !k.is_empty() => format!("{t}.{k}"),
        (None, Some(k)) if !k.is_empty() => k,
        (Some(t), _) => t,
        _ if line.starts_with('[') => line.trim_matches(|c| c == '[' || c == ']').to_owned(),
        _ => String::new(),
    };
    if key.trim().is_empty() {
        "(top level)".to_owned()
    } else {
        key
    }
}

#[cfg(test)]
mod tests;
