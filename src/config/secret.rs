//! A string that must never reach a log line, `Debug` output or `check`,
//! and the redacted views of config types that hold secrets in plain
//! types: URLs (Slack and Discord webhooks carry the secret in the path,
//! others in the query or userinfo) and header values.

use std::fmt;

use super::{ApiConfig, SlackConfig, WebhookConfig};

/// A credential or signing secret. `Debug` and `Display` print `***`; the
/// value is only reachable through [`Secret::expose`], so every use is
/// visible in the code.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a URL points, and nothing that may be a secret: `scheme://host[:port]`
/// (no userinfo, path, query or fragment).
pub fn url_origin(url: &reqwest::Url) -> String {
    match url.host_str() {
        Some(host) => match url.port() {
            Some(port) => format!("{}://{host}:{port}", url.scheme()),
            None => format!("{}://{host}", url.scheme()),
        },
        None => format!("{}://", url.scheme()),
    }
}

/// A URL in `Debug` output: its origin only.
struct RedactedUrl<'a>(&'a reqwest::Url);

impl fmt::Debug for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/***", url_origin(self.0))
    }
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("base_url", &RedactedUrl(&self.base_url))
            .field("token", &self.token)
            .field("session_cookie", &self.session_cookie)
            .field("transport", &self.transport)
            .field("poll_interval", &self.poll_interval)
            .field("max_concurrency", &self.max_concurrency)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("finished_recheck", &self.finished_recheck)
            .field("finished_linger", &self.finished_linger)
            .finish()
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header names are fine to show; their values are often API keys.
        let headers: Vec<&str> = self.headers.keys().map(|name| name.as_str()).collect();
        f.debug_struct("WebhookConfig")
            .field("url", &RedactedUrl(&self.url))
            .field("secrets", &self.secrets)
            .field("headers", &headers)
            .field("timeout", &self.timeout)
            .field("pipeline", &self.pipeline)
            .finish()
    }
}

impl fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackConfig")
            .field("mode", &self.mode)
            .field("templates", &self.templates)
            .field("api_base", &RedactedUrl(&self.api_base))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_origin_drops_userinfo_path_and_query() {
        let url =
            reqwest::Url::parse("https://u:p@hooks.example.com:8443/x/SECRET?t=SECRET#f").unwrap();
        assert_eq!(url_origin(&url), "https://hooks.example.com:8443");
        let url = reqwest::Url::parse("http://[::1]/services/SECRET").unwrap();
        assert_eq!(url_origin(&url), "http://[::1]");
    }

    #[test]
    fn debug_and_display_hide_the_value() {
        let secret = Secret::new("whsec_hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(secret.expose(), "whsec_hunter2");
    }

    #[test]
    fn config_debug_and_targets_show_no_url_or_header_secret() {
        let text = r#"
[api]
base_url = "https://user:PASS1@api.example.com/v1"
token = "t"
[sinks.ops]
type = "webhook"
url = "https://discord.com/api/webhooks/1/PATH2?token=QUERY3"
secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
headers = { "x-api-key" = "HEADER4" }
[sinks.chat]
type = "slack"
webhook_url = "https://hooks.slack.com/services/T/B/PATH5"
[sinks.bot]
type = "slack"
bot_token = "xoxb-TOKEN6"
channel = "C1"
api_base = "https://u:PASS7@slack.example.com/api/"
[[routes]]
sinks = ["ops", "chat", "bot"]
"#;
        let config =
            super::super::Config::parse(text, std::path::Path::new("t.toml"), &|_| None).unwrap();
        let debug = format!("{config:?}");
        let targets: Vec<String> = config
            .sinks
            .values()
            .map(|s| s.kind.describe_target())
            .collect();
        for secret in [
            "PASS1", "PATH2", "QUERY3", "HEADER4", "PATH5", "TOKEN6", "PASS7",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
            assert!(!targets.iter().any(|t| t.contains(secret)), "{targets:?}");
        }
        assert!(debug.contains("https://discord.com/***") && debug.contains("x-api-key"));
        assert!(
            targets.contains(&"https://discord.com".to_owned()),
            "{targets:?}"
        );
        assert!(targets.contains(&"incoming webhook https://hooks.slack.com".to_owned()));
    }
}
