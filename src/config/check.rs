//! The checking context shared by the section validators: it turns spans
//! into `file:line:column`, expands `${VAR}` and reads `*_file` secrets, so
//! that every error names the place the user has to edit.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::raw::Str;
use super::{ConfigError, ConfigWarning, MAX_CONCURRENCY, MAX_DURATION, Secret};

pub(super) type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The validation context: the file and its text, to turn spans into
/// line and column.
pub(super) struct Cx<'a> {
    pub file: &'a Path,
    pub text: &'a str,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Findings that do not stop the config from loading; `check` prints them.
    pub warnings: std::cell::RefCell<Vec<ConfigWarning>>,
}

/// Parses config `text` as `R` (TOML errors located like every other) and
/// hands it to `validate` with a checking context: one way in for the full
/// load and for the narrow ones (`[state]` only, the routes only).
pub(super) fn parse_with<R, T>(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    validate: impl FnOnce(&Cx<'_>, R) -> Result<T, ConfigError>,
) -> Result<T, ConfigError>
where
    R: serde::de::DeserializeOwned,
{
    let cx = Cx {
        file,
        text,
        env,
        warnings: Default::default(),
    };
    let raw: R = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
    validate(&cx, raw)
}

impl Cx<'_> {
    pub fn error_at(&self, offset: usize, key: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_column(self.text, offset);
        ConfigError {
            file: self.file.display().to_string(),
            line,
            column,
            key: key.to_owned(),
            message: message.into(),
        }
    }

    pub fn error<T>(&self, at: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.error_at(at.span().start, key, message)
    }

    pub fn warn<T>(&self, at: &Spanned<T>, key: &str, message: impl Into<String>) {
        let error = self.error(at, key, message);
        self.warnings.borrow_mut().push(ConfigWarning(error));
    }

    pub fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let offset = error.span().map_or(0, |s| s.start);
        let key = key_at(self.text, offset);
        self.error_at(offset, &key, error.message().trim())
    }

    /// `${VAR}` and `${VAR:-default}` expansion, `$$` for a literal `$`; an
    /// unset variable without a default is an error.
    pub fn string(&self, value: &Str, key: &str) -> Result<String> {
        expand(value.get_ref(), self.env).map_err(|message| self.error(value, key, message))
    }

    pub fn non_empty(&self, value: &Str, key: &str) -> Result<String> {
        let s = self.string(value, key)?;
        if s.trim().is_empty() {
            return Err(self.error(value, key, "must not be empty"));
        }
        Ok(s)
    }

    /// A secret given inline or through its `*_file` twin (one, not both).
    pub fn secret(
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

    pub fn duration(&self, value: Option<&Str>, key: &str, default: Duration) -> Result<Duration> {
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
    pub fn duration_at_least(
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
    pub fn concurrency(
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

    pub fn url(&self, value: &Str, key: &str) -> Result<reqwest::Url> {
        let text = self.non_empty(value, key)?;
        let url = reqwest::Url::parse(&text)
            .map_err(|e| self.error(value, key, format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.error(value, key, "must be an http:// or https:// URL"));
        }
        Ok(url)
    }

    pub fn strings(&self, values: Option<&Vec<Str>>, key: &str) -> Result<Vec<String>> {
        values
            .into_iter()
            .flatten()
            .map(|v| self.non_empty(v, key))
            .collect()
    }

    pub fn labels(
        &self,
        raw: &BTreeMap<String, Str>,
        key: &str,
    ) -> Result<BTreeMap<String, String>> {
        raw.iter()
            .map(|(k, v)| Ok((k.clone(), self.string(v, &format!("{key}.{k}"))?)))
            .collect()
    }
}

/// Expands `${NAME}`, `${NAME:-default}` (the default when `NAME` is unset
/// or empty, as in a shell) and `$$` (one literal `$`). Any other `$` stays
/// as written, so values written before `$$` existed keep their meaning.
pub(super) fn expand(
    raw: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or("unterminated `${` (write `${NAME}`, or `$$` for a literal `$`)")?;
            out.push_str(&variable(&inner[..end], env)?);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of one `${...}`: `NAME` or `NAME:-default`.
fn variable(
    reference: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let (name, default) = match reference.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (reference, None),
    };
    match (env(name), default) {
        (Some(value), Some(default)) if value.is_empty() => Ok(default.to_owned()),
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_owned()),
        (None, None) => Err(format!(
            "environment variable `{name}` is not set (write `${{{name}:-default}}` for a fallback)"
        )),
    }
}

/// 1-based line and column of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Best-effort dotted key for an error the TOML parser reports: a table
/// header names itself (an unknown or malformed `[table]` is that table, not
/// the one above it); any other line is the table header above it plus the
/// key on the line.
pub(super) fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    let line = text[line_start..line_end].trim();
    if line.starts_with('[') {
        return non_empty_key(header_name(line));
    }
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(header_name);
    let key = line
        .split('=')
        .next()
        .map(|k| k.trim().trim_matches('"').to_owned())
        .filter(|k| !k.is_empty());
    non_empty_key(match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k,
        (Some(t), None) => t,
        (None, None) => String::new(),
    })
}

/// `[sinks.ops]`, `[[routes]]` or a header cut short (`[sinks.ops`) as the
/// dotted name it opens; a comment after it is not part of the name.
fn header_name(line: &str) -> String {
    let line = line.split('#').next().unwrap_or(line);
    line.trim()
        .trim_matches(|c| c == '[' || c == ']')
        .trim()
        .to_owned()
}

fn non_empty_key(key: String) -> String {
    if key.trim().is_empty() {
        "(top level)".to_owned()
    } else {
        key
    }
}
