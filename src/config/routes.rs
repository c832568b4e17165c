//! `[[routes]]`: which sinks an event goes to. Every matching route adds its
//! sinks; each sink gets an event once. Filters AND together, the values of
//! one filter OR; a filter left out matches everything.

use std::collections::BTreeMap;

use toml::Spanned;

use super::check::{Cx, Result};
use super::raw::{RawRoute, RawSink};
use super::{SinkConfig, SinkKind};
use crate::route::{EventTypes, Route};
use crate::upstream::types::RunStatus;

impl Cx<'_> {
    /// One route. `event_types` are globs, compiled here once for all the
    /// events routing will see; `statuses` must be statuses the upstream has.
    pub(super) fn route(
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
