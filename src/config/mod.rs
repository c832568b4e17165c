//! The validated configuration the rest of runhook runs on.
//!
//! Loading happens in two steps, as ripgrep does with its flags: `raw` mirrors
//! the TOML as written (with spans), then [`Config::parse`] checks every
//! value, applies defaults, expands `${VAR}`, reads `*_file` secrets and
//! produces typed values: parsed headers, compiled templates, compiled route
//! globs. Nothing downstream re-validates or re-parses.
//!
//! One file per section (`api`, `state`, `sinks`, `slack`, `routes`); the
//! doc comments on their fields and `DEFAULT_*` constants are the config
//! reference, and `config.example.toml` states the same (a test holds them
//! together). `check` is the context every section validates with.

mod api;
mod check;
mod raw;
mod routes;
mod secret;
mod sinks;
mod slack;
mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::route::Router;
#[cfg(test)]
use base64::Engine as _;
use check::{Cx, Result};
use raw::RawConfig;

pub use api::*;
pub use routes::{load_router, parse_router};
pub use secret::{Secret, url_origin};
pub use sinks::*;
pub use slack::*;
pub use state::*;

/// Where the daemon looks when neither `--config` nor `RUNHOOK_CONFIG` is set.
pub const DEFAULT_PATH: &str = "/etc/runhook/runhook.toml";

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

/// Something in a valid config that is most likely a mistake (a template
/// nothing will use); `check` prints it, loading goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning(pub ConfigError);

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from, for messages.
    pub source: PathBuf,
    pub api: ApiConfig,
    pub state: StateConfig,
    pub cluster: ClusterConfig,
    pub server: Option<ServerConfig>,
    /// `[[runs]]`: static subscriptions; `runhook watch` adds more.
    pub runs: Vec<RunSpec>,
    pub sinks: BTreeMap<String, SinkConfig>,
    /// `[[routes]]`, with their globs compiled.
    pub router: Router,
    /// What `check` should tell the user about although the config is valid.
    pub warnings: Vec<ConfigWarning>,
}

impl Config {
    /// Reads and validates a config file, expanding `${VAR}` from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_config_file(path)?;
        Self::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Validates config text; `env` resolves `${VAR}`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        check::parse_with(text, path, env, |cx, raw: RawConfig| cx.validate(raw))
    }
}

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        key: "(file)".into(),
        message: format!("cannot read the config file: {error}"),
    })
}

impl Cx<'_> {
    fn validate(&self, raw: RawConfig) -> Result<Config> {
        let api = self.api(&raw.api)?;
        let state = self.state(&raw.state)?;
        self.check_retain_covers_linger(&raw, &state, &api)?;
        let cluster = self.cluster(&raw.cluster)?;
        let server = self.server(raw.server.as_ref())?;
        let runs = self.runs(&raw.runs)?;
        let defaults = self.delivery(&raw.delivery, "delivery", &DeliveryPolicy::default())?;
        let mut sinks = BTreeMap::new();
        for (name, sink) in &raw.sinks {
            sinks.insert(name.clone(), self.sink(name, sink, &defaults)?);
        }
        let names = sinks
            .iter()
            .map(|(name, sink)| (name.clone(), sink.name.clone()))
            .collect();
        let routes = self.routes(&raw, &names)?;
        self.check_every_sink_routed(&raw.sinks, &routes)?;
        self.check_file_sinks_have_nodes(&raw.sinks, &sinks, &state, &cluster)?;
        self.warn_unreachable_templates(&raw.sinks, &sinks, &routes);
        Ok(Config {
            source: self.file.to_owned(),
            api,
            state,
            cluster,
            server,
            runs,
            sinks,
            router: Router::new(routes),
            warnings: self.warnings.take(),
        })
    }
}

#[cfg(test)]
mod reference_tests;
#[cfg(test)]
mod tests;
