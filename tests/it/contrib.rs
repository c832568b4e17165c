//! What operators find in `contrib/`: the Prometheus alerts pass their
//! `promtool test rules` unit tests, and every metric the alerts and the
//! Grafana dashboard query is one a running daemon really exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::observability::{Metrics, free_port};
use crate::support::*;

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path)
}

/// `promtool` when installed; CI must have it (`.ci/run` installs Debian's
/// `prometheus`), elsewhere the test says it skipped.
fn promtool() -> Option<Command> {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return Some(Command::new("promtool"));
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "promtool must be installed in CI (Debian package prometheus)"
    );
    eprintln!("SKIPPED: promtool is not installed here (apt-get install prometheus)");
    None
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    let Some(mut promtool) = promtool() else {
        return;
    };
    let output = promtool
        .args(["test", "rules"])
        .arg(contrib("prometheus/alerts.test.yml"))
        .output()
        .expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The metric names in a PromQL text: runhook's own and the process ones.
/// (`up` is Prometheus's, about the scrape.)
fn metric_names(promql: &str) -> BTreeSet<String> {
    promql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("runhook_") || token.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// Every `expr:` of the alert rules.
fn alert_queries() -> Vec<String> {
    let text = std::fs::read_to_string(contrib("prometheus/alerts.yml")).expect("alerts.yml");
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("expr:"))
        .map(str::to_owned)
        .collect()
}

/// Every query of the dashboard: panel targets and template variables.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(contrib("grafana/runhook.json")).expect("runhook.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("runhook.json is JSON");
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    queries
}

fn collect_queries(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("expr" | "query" | "definition", serde_json::Value::String(q)) => {
                        into.push(q.clone())
                    }
                    _ => collect_queries(inner, into),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_queries(i, into)),
        _ => {}
    }
}

on_both! {
    async fn every_metric_the_alerts_and_dashboard_query_is_exported(backend: Backend) {
        let alerts: BTreeSet<String> = alert_queries()
            .iter()
            .flat_map(|q| metric_names(q))
            .collect();
        let dashboard: BTreeSet<String> = dashboard_queries()
            .iter()
            .flat_map(|q| metric_names(q))
            .collect();
        // What the files must cover, so that an emptied file cannot pass.
        for name in [
            "runhook_sink_up",
            "runhook_deliveries_total",
            "runhook_oldest_pending_delivery_age_seconds",
            "runhook_longest_run_silence_seconds",
            "runhook_runs",
        ] {
            assert!(alerts.contains(name), "alerts.yml uses {name}: {alerts:?}");
        }
        for name in [
            "runhook_events_ingested_total",
            "runhook_deliveries_total",
            "runhook_delivery_latency_seconds_bucket",
            "runhook_pending_deliveries",
            "runhook_dead_letters",
            "runhook_runs",
        ] {
            assert!(
                dashboard.contains(name),
                "runhook.json uses {name}: {dashboard:?}"
            );
        }
        // A daemon with one sink and one run: every series with a sink label
        // exists once the sink has a delivery.
        let sim = sim_with(vec![scripted("run-c", numbered(2))]).await;
        let port = free_port();
        let mut env = Env::on(backend, &sim, &["run-c"]);
        env.extra = format!("\n[server]\nlisten = \"127.0.0.1:{port}\"\n");
        let _daemon = env.start_process();
        let wanted: BTreeSet<String> = alerts.union(&dashboard).cloned().collect();
        let scraped = Metrics::at(port);
        wait_for("every queried metric in /metrics", || async {
            let text = scraped.scrape().await?;
            let missing: Vec<&String> = wanted.iter().filter(|name| !exports(&text, name)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing {missing:?} in\n{text}"))
            }
        })
        .await;
    }
}

/// Whether the exposition has a sample of this metric (name then `{` or ` `).
fn exports(text: &str, name: &str) -> bool {
    text.lines().any(|line| {
        line.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}
