//! `runhook route`: which sinks an event with these facts would reach, and
//! through which routes (as `amtool config routes test` does for
//! Alertmanager). Reads only the routing table: no secret, no state.

use std::collections::BTreeMap;
use std::path::Path;

use crate::cli::RouteArgs;
use runhook::route::{EventFacts, Router};
use runhook::upstream::types::RunStatus;

/// `question`: what the user said about the event.
pub(super) fn route(config: &Path, question: RouteArgs) -> anyhow::Result<()> {
    let labels = runhook::ingest::parse_labels(&question.labels).map_err(anyhow::Error::msg)?;
    if let Some(status) = question.status.as_deref()
        && RunStatus::parse(status).is_none()
    {
        // A typo would match no `statuses` filter and look like an answer.
        anyhow::bail!(
            "unknown status `{status}`: expected one of {}",
            RunStatus::ALL.map(RunStatus::as_str).join(", ")
        );
    }
    let router = runhook::config::load_router(config)?;
    let facts = EventFacts {
        event_type: &question.event_type,
        // No run named: a route with a `runs` filter cannot match.
        run_id: question.run.as_deref().unwrap_or(""),
        labels: &labels,
        status: question.status.as_deref(),
        phase: question.phase.as_deref(),
    };
    print_answer(&router, &facts, &labels)
}

fn print_answer(
    router: &Router,
    facts: &EventFacts<'_>,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out!(
        "event: type={} run={} status={} phase={} labels={}",
        facts.event_type,
        if facts.run_id.is_empty() {
            "-"
        } else {
            facts.run_id
        },
        facts.status.unwrap_or("-"),
        facts.phase.unwrap_or("-"),
        if labels.is_empty() {
            "-".to_owned()
        } else {
            labels.join(",")
        },
    )?;
    let matched: Vec<(usize, &runhook::route::Route)> = router
        .routes()
        .iter()
        .enumerate()
        .filter(|(_, route)| route.matches(facts))
        .collect();
    if matched.is_empty() {
        out!("no route matches: this event would reach no sink")?;
        return Ok(());
    }
    out!("\nroutes matched:")?;
    for (i, route) in &matched {
        super::tools::route_line(*i, route)?;
    }
    let sinks: Vec<String> = router
        .sinks_for(facts)
        .iter()
        .map(|s| s.to_string())
        .collect();
    out!("\nsinks: {}", sinks.join(", "))?;
    Ok(())
}
