//! A slack sink's keys, and its templates, compiled and checked here so that
//! the sink never meets a template it cannot use.

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::Environment;
use toml::Spanned;

use super::Secret;
use super::check::{Cx, Result};
use super::raw::{RawSink, Str};
use crate::sink::slack::message::{TEMPLATE_VARIABLES, template_environment};

/// A slack sink's `api_base`.
pub const DEFAULT_SLACK_API_BASE: &str = "https://slack.com/api/";

/// A slack sink. `Debug` is redacted (see `secret.rs`).
#[derive(Clone, PartialEq)]
pub struct SlackConfig {
    /// `webhook_url` (one message per event) or `bot_token` + `channel`
    /// (a thread per run), each with its `*_file` twin.
    pub mode: SlackMode,
    /// `templates`: per event type message templates (minijinja), keyed by
    /// event type. Variables are escaped for mrkdwn unless marked `|safe`.
    pub templates: Templates,
    /// `api_base`: Slack's Web API root; tests point it at a local fake.
    /// Default [`DEFAULT_SLACK_API_BASE`].
    pub api_base: reqwest::Url,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SlackMode {
    IncomingWebhook { url: Secret },
    Bot { token: Secret, channel: String },
}

/// A slack sink's templates, compiled once at load: a template that does not
/// compile, or that names a variable no event has, is a config error rather
/// than a message silently falling back at send time.
#[derive(Clone)]
pub struct Templates {
    sources: BTreeMap<String, String>,
    environment: Arc<Environment<'static>>,
}

impl Templates {
    /// The compiled templates, each named by its event type.
    pub fn environment(&self) -> &Environment<'static> {
        &self.environment
    }

    /// The event types that have a template.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(String::as_str)
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            sources: BTreeMap::new(),
            environment: Arc::new(template_environment()),
        }
    }
}

/// Two configs are equal when their templates read the same.
impl PartialEq for Templates {
    fn eq(&self, other: &Self) -> bool {
        self.sources == other.sources
    }
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.sources.fmt(f)
    }
}

impl Cx<'_> {
    pub(super) fn slack(
        &self,
        raw: &RawSink,
        key: &str,
        at: &Spanned<RawSink>,
    ) -> Result<SlackConfig> {
        let api_base = match &raw.api_base {
            Some(u) => self.url(u, &format!("{key}.api_base"))?,
            None => reqwest::Url::parse(DEFAULT_SLACK_API_BASE).expect("the default URL is valid"),
        };
        Ok(SlackConfig {
            mode: self.slack_mode(raw, key, at)?,
            templates: self.templates(raw.templates.as_ref(), key)?,
            api_base,
        })
    }

    fn slack_mode(&self, raw: &RawSink, key: &str, at: &Spanned<RawSink>) -> Result<SlackMode> {
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
        match (webhook_url, bot_token) {
            (Some(url), None) => match &raw.channel {
                Some(channel) => Err(self.error(
                    channel,
                    &format!("{key}.channel"),
                    "`channel` goes with `bot_token`; an incoming webhook has its own channel",
                )),
                None => {
                    self.check_webhook_url(raw, &url, key)?;
                    Ok(SlackMode::IncomingWebhook { url })
                }
            },
            (None, Some(token)) => {
                let channel = match &raw.channel {
                    Some(c) => self.non_empty(c, &format!("{key}.channel"))?,
                    None => return Err(self.error(at, key, "`bot_token` needs `channel`")),
                };
                Ok(SlackMode::Bot { token, channel })
            }
            (Some(_), Some(_)) => {
                Err(self.error(at, key, "set `webhook_url` or `bot_token`, not both"))
            }
            (None, None) => Err(self.error(
                at,
                key,
                "a slack sink needs `webhook_url` or `bot_token` + `channel`",
            )),
        }
    }

    /// The incoming webhook must be an http(s) URL; it stays a [`Secret`]
    /// as its path is the credential.
    fn check_webhook_url(&self, raw: &RawSink, url: &Secret, key: &str) -> Result<()> {
        let Some(spot) = raw.webhook_url.as_ref().or(raw.webhook_url_file.as_ref()) else {
            return Ok(());
        };
        let shown = Spanned::new(spot.span(), url.expose().to_owned());
        self.url(&shown, &format!("{key}.webhook_url")).map(drop)
    }

    fn templates(&self, raw: Option<&BTreeMap<String, Str>>, key: &str) -> Result<Templates> {
        let mut environment = template_environment();
        let mut sources = BTreeMap::new();
        for (event_type, value) in raw.into_iter().flatten() {
            let template_key = format!("{key}.templates.{event_type}");
            let source = self.string(value, &template_key)?;
            environment
                .add_template_owned(event_type.clone(), source.clone())
                .map_err(|error| {
                    self.error(
                        value,
                        &template_key,
                        format!("not a valid template: {error}"),
                    )
                })?;
            if let Some(unknown) = undefined_variable(&environment, event_type) {
                return Err(self.error(
                    value,
                    &template_key,
                    format!(
                        "undefined variable `{unknown}`: a template may use {}",
                        TEMPLATE_VARIABLES.join(", ")
                    ),
                ));
            }
            sources.insert(event_type.clone(), source);
        }
        Ok(Templates {
            sources,
            environment: Arc::new(environment),
        })
    }
}

/// The first variable (in name order) a template reads that is neither an
/// event's field nor a global of the environment (`range`, `dict`, ...).
/// Fields inside `payload` and `labels` vary by event and are not checked.
fn undefined_variable(environment: &Environment<'static>, name: &str) -> Option<String> {
    let template = environment.get_template(name).ok()?;
    let globals: Vec<&str> = environment.globals().map(|(name, _)| name).collect();
    let mut unknown: Vec<String> = template
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| !TEMPLATE_VARIABLES.contains(&v.as_str()) && !globals.contains(&v.as_str()))
        .collect();
    unknown.sort();
    unknown.into_iter().next()
}
