//! `[[routes]]`: which sinks an event goes to. Every matching route adds its
//! sinks; each sink gets an event once. Filters AND together, the values of
//! one filter OR; a filter left out matches everything.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use toml::Spanned;

use super::check::{Cx, Result};
use super::raw::{RawConfig, RawRoute, RawSink};
use super::{ConfigError, SinkConfig, SinkKind};
use crate::route::{EventTypes, Route, Router};
use crate::upstream::types::RunStatus;

/// The routing table alone, for `runhook route` and `runhook backfill`:
/// which sinks an event reaches is asked from a shell, where the service's
/// secret files and environment are not. The whole file is parsed (an
/// unknown key is still an error) but only `[[routes]]` is validated, against
/// the sink names, as [`super::Config::load`] validates it; no sink is
/// resolved, so no secret is read.
pub fn load_router(path: &Path) -> Result<Router, ConfigError> {
    let text = super::read_config_file(path)?;
    parse_router(&text, path, &|name| std::env::var(name).ok())
}

/// [`load_router`] on config text; `env` resolves `${VAR}` in the routes.
pub fn parse_router(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Router, ConfigError> {
    let cx = Cx {
        file: path,
        text,
        env,
        warnings: Default::default(),
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
    let names: BTreeMap<String, Arc<str>> = raw
        .sinks
        .keys()
        .map(|name| (name.clone(), Arc::from(name.as_str())))
        .collect();
    let routes = cx.routes(&raw, &names)?;
    cx.check_every_sink_routed(&raw.sinks, &routes)?;
    Ok(Router::new(routes))
}

impl Cx<'_> {
    /// Every `[[routes]]` entry; `sinks` maps each configured sink's name to
    /// the shared name its deliveries carry.
    pub(super) fn routes(
        &self,
        raw: &RawConfig,
        sinks: &BTreeMap<String, Arc<str>>,
    ) -> Result<Vec<Route>> {
        raw.routes
            .iter()
            .enumerate()
            .map(|(i, r)| self.route(i, r, sinks))
            .collect()
    }

    /// One route. `event_types` are globs, compiled here once for all the
    /// events routing will see; `statuses` must be statuses the upstream has.
    fn route(
        &self,
        index: usize,
        spanned: &Spanned<RawRoute>,
        sinks: &BTreeMap<String, Arc<str>>,
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
            let Some(sink_name) = sinks.get(&name) else {
                return Err(self.error(
                    sink,
                    &format!("{key}.sinks"),
                    format!("no sink named `{name}`"),
                ));
            };
            route_sinks.push(sink_name.clone());
        }
        Ok(Route {
            event_types: self.event_types(raw, &key)?,
            runs: self.strings(raw.runs.as_ref(), &format!("{key}.runs"))?,
            labels: self.labels(
                raw.labels.as_ref().unwrap_or(&BTreeMap::new()),
                &format!("{key}.labels"),
            )?,
            statuses: self.statuses(raw, &key)?,
            phases: self.strings(raw.phases.as_ref(), &format!("{key}.phases"))?,
            sinks: route_sinks,
        })
    }

    fn event_types(&self, raw: &RawRoute, key: &str) -> Result<EventTypes> {
        let key = format!("{key}.event_types");
        let patterns = self.strings(raw.event_types.as_ref(), &key)?;
        EventTypes::new(patterns).map_err(|error| {
            let written = raw.event_types.iter().flatten().nth(error.index);
            let offset = written.map_or(0, |at| at.span().start);
            self.error_at(offset, &key, error.to_string())
        })
    }

    fn statuses(&self, raw: &RawRoute, key: &str) -> Result<Vec<String>> {
        let key = format!("{key}.statuses");
        let statuses = self.strings(raw.statuses.as_ref(), &key)?;
        for (status, at) in statuses.iter().zip(raw.statuses.iter().flatten()) {
            // Only statuses the upstream documents: a typo would make a
            // route that never matches.
            if RunStatus::parse(status).is_none() {
                return Err(self.error(
                    at,
                    &key,
                    format!(
                        "unknown status `{status}`: expected one of {}",
                        RunStatus::ALL.map(RunStatus::as_str).join(", ")
                    ),
                ));
            }
        }
        Ok(statuses)
    }

    /// A sink no route names is an error: it would never receive anything.
    pub(super) fn check_every_sink_routed(
        &self,
        raw: &BTreeMap<String, Spanned<RawSink>>,
        routes: &[Route],
    ) -> Result<()> {
        for (name, sink) in raw {
            if !routes.iter().any(|r| r.sinks.iter().any(|s| **s == **name)) {
                return Err(self.error(
                    sink,
                    &format!("sinks.{name}"),
                    "no route sends anything to this sink; add it to a [[routes]] entry's `sinks`",
                ));
            }
        }
        Ok(())
    }

    /// A slack template for an event type that no route sending to that sink
    /// lets through would never be used: most likely a typo in the type or a
    /// route. A warning, not an error: the config still works.
    pub(super) fn warn_unreachable_templates(
        &self,
        raw: &BTreeMap<String, Spanned<RawSink>>,
        sinks: &BTreeMap<String, SinkConfig>,
        routes: &[Route],
    ) {
        for (name, sink) in sinks {
            let SinkKind::Slack(slack) = &sink.kind else {
                continue;
            };
            let routed_here: Vec<&Route> = routes
                .iter()
                .filter(|r| r.sinks.contains(&sink.name))
                .collect();
            for event_type in slack.templates.event_types() {
                if routed_here
                    .iter()
                    .any(|r| r.event_types.matches(event_type))
                {
                    continue;
                }
                let written = raw
                    .get(name)
                    .and_then(|s| s.get_ref().templates.as_ref())
                    .and_then(|t| t.get(event_type));
                if let Some(at) = written {
                    self.warn(
                        at,
                        &format!("sinks.{name}.templates.{event_type}"),
                        format!(
                            "no route sends `{event_type}` events to `{name}`; this template is never used"
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[api]
token = "${TRAVELMODE_TOKEN}"
[sinks.chat]
type = "slack"
webhook_url_file = "/run/credentials/runhook.service/absent-slack"
[sinks.archive]
type = "file"
path = "/tmp/x.jsonl"
[[routes]]
sinks = ["archive"]
[[routes]]
event_types = ["run_finished"]
statuses = ["failed"]
labels = { team = "${TEAM:-rome}" }
sinks = ["chat"]
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_router_alone_reads_no_secret_and_no_variable_outside_routes() {
        let router = parse_router(CONFIG, Path::new("c.toml"), &no_env).expect("routes alone");
        let routes = router.routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(&*routes[1].sinks[0], "chat");
        assert_eq!(routes[1].labels["team"], "rome");
    }

    #[test]
    fn the_router_alone_is_the_routing_table_the_daemon_gets() {
        let text = CONFIG.replace(
            "webhook_url_file = \"/run/credentials/runhook.service/absent-slack\"",
            "webhook_url = \"https://hooks.slack.com/services/T/B/X\"",
        );
        let env = |name: &str| (name == "TRAVELMODE_TOKEN").then(|| "t".to_owned());
        let full = crate::config::Config::parse(&text, Path::new("c.toml"), &env).unwrap();
        let alone = parse_router(&text, Path::new("c.toml"), &env).unwrap();
        assert_eq!(alone.routes(), full.router.routes());
    }

    #[test]
    fn the_router_alone_refuses_what_the_full_load_refuses() {
        let path = Path::new("c.toml");
        for text in [
            CONFIG.replace("sinks = [\"chat\"]", "sinks = [\"chta\"]"),
            CONFIG.replace("statuses = [\"failed\"]", "statuses = [\"broken\"]"),
            CONFIG.replace("sinks = [\"archive\"]", "sinks = [\"chat\"]"),
        ] {
            let alone = parse_router(&text, path, &no_env).unwrap_err();
            let env = |name: &str| (name == "TRAVELMODE_TOKEN").then(|| "t".to_owned());
            let full = crate::config::Config::parse(
                &text.replace(
                    "webhook_url_file = \"/run/credentials/runhook.service/absent-slack\"",
                    "webhook_url = \"https://hooks.slack.com/services/T/B/X\"",
                ),
                path,
                &env,
            )
            .unwrap_err();
            assert_eq!(alone.key, full.key, "{alone} / {full}");
            assert_eq!(alone.message, full.message);
        }
    }
}
