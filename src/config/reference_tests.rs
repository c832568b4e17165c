//! `config.example.toml` is the config reference users read: it must state
//! every key the code takes, and a key with a default must be stated with
//! the code's default.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::*;

const EXAMPLE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"));

/// The keys with a default, by the table the example states them in.
const DEFAULTED: &[(&str, &str)] = &[
    ("api", "base_url"),
    ("api", "transport"),
    ("api", "poll_interval"),
    ("api", "max_concurrency"),
    ("api", "stream_idle_timeout"),
    ("api", "finished_recheck"),
    ("api", "finished_linger"),
    ("api", "not_found_confirm"),
    ("state", "path"),
    ("state", "retain"),
    ("state", "shutdown_grace"),
    ("cluster", "lease_ttl"),
    ("server", "listen"),
    ("delivery", "max_attempts"),
    ("delivery", "max_age"),
    ("delivery", "initial_backoff"),
    ("delivery", "max_backoff"),
    ("sinks.ops", "timeout"),
    ("sinks.ops", "concurrency"),
    ("sinks.ops", "ordered"),
    ("sinks.ops", "pipeline"),
    ("sinks.chat", "api_base"),
];

/// Every `key = value` the example states, set or commented out, by table.
fn stated() -> BTreeMap<String, BTreeMap<String, String>> {
    let mut tables: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut table = String::new();
    for line in EXAMPLE.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            let header = line.split('#').next().unwrap_or(line);
            table = header.trim().trim_matches(['[', ']']).to_owned();
            continue;
        }
        let statement = line.trim_start_matches('#').trim();
        let Some((key, rest)) = statement.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        if let Some(value) = toml_value(rest) {
            tables
                .entry(table.clone())
                .or_default()
                .insert(key.to_owned(), value);
        }
    }
    tables
}

/// The TOML value at the start of `rest`, without a trailing comment.
fn toml_value(rest: &str) -> Option<String> {
    let cuts = std::iter::once(rest.len()).chain(rest.rmatch_indices('#').map(|(i, _)| i));
    for cut in cuts {
        let value = rest[..cut].trim();
        if !value.is_empty() && toml::from_str::<toml::Table>(&format!("k = {value}")).is_ok() {
            return Some(value.to_owned());
        }
    }
    None
}

/// The keys a table takes, as the parser lists them when it meets an
/// unknown one: the raw structs are the single source.
fn keys_taken(header: &str) -> BTreeSet<String> {
    let error = toml::from_str::<raw::RawConfig>(&format!("{header}\n__probe = 1\n"))
        .expect_err("an unknown key is refused");
    let message = error.message();
    let listed = message.split("expected").nth(1).unwrap_or(message);
    listed
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_example_states_every_key() {
    let stated = stated();
    let in_table = |table: &str| stated.get(table).cloned().unwrap_or_default();
    let sink_keys: BTreeSet<String> = ["sinks.ops", "sinks.chat", "sinks.archive", "delivery"]
        .iter()
        .flat_map(|t| in_table(t).into_keys())
        .chain(["type".to_owned()])
        .collect();
    let mut missing = Vec::new();
    for (header, table, stated_keys) in [
        ("[api]", "api", in_table("api").into_keys().collect()),
        ("[state]", "state", in_table("state").into_keys().collect()),
        (
            "[cluster]",
            "cluster",
            in_table("cluster").into_keys().collect(),
        ),
        (
            "[server]",
            "server",
            in_table("server").into_keys().collect(),
        ),
        ("[[runs]]", "runs", in_table("runs").into_keys().collect()),
        (
            "[delivery]",
            "delivery",
            in_table("delivery").into_keys().collect(),
        ),
        (
            "[[routes]]",
            "routes",
            in_table("routes").into_keys().collect(),
        ),
        ("[sinks.x]", "sinks.*", sink_keys),
    ] {
        let stated_keys: BTreeSet<String> = stated_keys;
        for key in keys_taken(header).difference(&stated_keys) {
            missing.push(format!("{table}.{key}"));
        }
    }
    assert!(
        missing.is_empty(),
        "config.example.toml does not state {missing:?}"
    );
}

/// A config with `line` added to `table`, and nothing else that has a
/// default.
fn config_with(table: &str, line: &str) -> Config {
    let add = |here: &str| if here == table { line } else { "" };
    let text = format!(
        "[api]\ntoken = \"t\"\n{}\n[state]\n{}\n[cluster]\n{}\n[server]\n{}\n[delivery]\n{}\n\
         [sinks.ops]\ntype = \"webhook\"\nurl = \"https://example.com/h\"\nsecret = \"{SECRET}\"\n{}\n\
         [sinks.chat]\ntype = \"slack\"\nwebhook_url = \"https://hooks.slack.com/x\"\n{}\n\
         [[routes]]\nsinks = [\"ops\", \"chat\"]\n",
        add("api"),
        add("state"),
        add("cluster"),
        add("server"),
        add("delivery"),
        add("sinks.ops"),
        add("sinks.chat"),
    );
    Config::parse(&text, Path::new("test.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("{table}: {line}: {e}"))
}

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

#[test]
fn the_example_states_the_code_defaults() {
    let stated = stated();
    let defaults = config_with("", "");
    let mut wrong = Vec::new();
    for (table, key) in DEFAULTED {
        let Some(value) = stated.get(*table).and_then(|t| t.get(*key)) else {
            wrong.push(format!("{table}.{key} is not stated"));
            continue;
        };
        let with = config_with(table, &format!("{key} = {value}"));
        if with.api != defaults.api
            || with.state != defaults.state
            || with.cluster != defaults.cluster
            || with.server != defaults.server
            || with.sinks != defaults.sinks
        {
            wrong.push(format!("{table}.{key} = {value} is not the default"));
        }
    }
    assert!(wrong.is_empty(), "config.example.toml: {wrong:#?}");
}
