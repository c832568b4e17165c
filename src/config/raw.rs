//! The configuration exactly as the TOML is written: every value keeps its
//! span so that validation errors can name file, line and column. Nothing here
//! is checked beyond TOML syntax and key names; `config::load` does the rest.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A string as written, with its position in the file.
pub type Str = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub api: RawApi,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub cluster: RawCluster,
    pub server: Option<RawServer>,
    #[serde(default)]
    pub runs: Vec<RawRun>,
    #[serde(default)]
    pub sinks: BTreeMap<String, Spanned<RawSink>>,
    #[serde(default)]
    pub delivery: RawDelivery,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
}

/// Only `[state]`, for the commands that need nothing else: the other tables
/// are skipped unread (not `deny_unknown_fields`), so their secrets and
/// `${VAR}`s are never touched; `[state]` keeps its own strictness.
#[derive(Debug, Default, Deserialize)]
pub struct RawStateOnly {
    #[serde(default)]
    pub state: RawState,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub base_url: Option<Str>,
    pub token: Option<Str>,
    pub token_file: Option<Str>,
    pub session_cookie: Option<Str>,
    pub session_cookie_file: Option<Str>,
    pub transport: Option<Str>,
    pub poll_interval: Option<Str>,
    pub max_concurrency: Option<Spanned<i64>>,
    pub stream_idle_timeout: Option<Str>,
    pub finished_recheck: Option<Str>,
    pub finished_linger: Option<Str>,
    pub not_found_confirm: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub path: Option<Str>,
    pub url: Option<Str>,
    pub url_file: Option<Str>,
    pub retain: Option<Str>,
    pub shutdown_grace: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub node: Option<Str>,
    pub lease_ttl: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Str>,
    pub token: Option<Str>,
    pub token_file: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRun {
    pub id: Str,
    #[serde(default)]
    pub labels: BTreeMap<String, Str>,
    pub transport: Option<Str>,
}

/// One `[sinks.NAME]` table. Flat rather than a tagged enum so that every
/// value keeps its span; keys that do not belong to the `type` are rejected
/// during validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    #[serde(rename = "type")]
    pub kind: Str,
    // webhook
    pub url: Option<Str>,
    pub url_file: Option<Str>,
    pub secret: Option<Str>,
    pub secret_file: Option<Str>,
    pub secrets: Option<Vec<Str>>,
    pub headers: Option<BTreeMap<String, Str>>,
    pub timeout: Option<Str>,
    pub pipeline: Option<Spanned<bool>>,
    // slack
    pub webhook_url: Option<Str>,
    pub webhook_url_file: Option<Str>,
    pub bot_token: Option<Str>,
    pub bot_token_file: Option<Str>,
    pub channel: Option<Str>,
    pub templates: Option<BTreeMap<String, Str>>,
    pub api_base: Option<Str>,
    // file
    pub path: Option<Str>,
    pub node: Option<Str>,
    // every type
    pub concurrency: Option<Spanned<i64>>,
    pub ordered: Option<Spanned<bool>>,
    // delivery overrides (see `RawDelivery`)
    pub max_attempts: Option<Spanned<i64>>,
    pub max_age: Option<Str>,
    pub initial_backoff: Option<Str>,
    pub max_backoff: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    pub max_attempts: Option<Spanned<i64>>,
    pub max_age: Option<Str>,
    pub initial_backoff: Option<Str>,
    pub max_backoff: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub event_types: Option<Vec<Str>>,
    pub runs: Option<Vec<Str>>,
    pub labels: Option<BTreeMap<String, Str>>,
    pub statuses: Option<Vec<Str>>,
    pub phases: Option<Vec<Str>>,
    pub sinks: Vec<Str>,
}
