//! Property tests (proptest) for the parsers and pure functions that meet
//! outside input: stream frames and events, the config loader, the route
//! matcher, and the signature round trip. CI runs the default 256 cases;
//! `PROPTEST_CASES=100000 cargo test --test it props` runs longer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use proptest::prelude::*;
use runhook::config::{Config, SigningKey};
use runhook::route::{EventFacts, EventTypes, Route, Router};
use runhook::upstream::frame::{Frame, parse};

/// JSON text with the quirks a re-serialiser would lose: trailing zeros,
/// exponents, escapes, odd spacing, duplicate-looking keys.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (any::<i32>(), 0u8..4)
            .prop_map(|(n, zeros)| format!("{n}.1{}", "0".repeat(zeros as usize))),
        Just("1e5".to_owned()),
        Just("-0.0".to_owned()),
        "[a-zA-Z0-9 é🚀]{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just(r#""line\nbreak \"q\" \u00e9""#.to_owned()),
        Just("true".to_owned()),
        Just("null".to_owned()),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec(("[a-z]{1,5}", inner, prop::bool::ANY), 0..4).prop_map(
                |fields| {
                    let body: Vec<String> = fields
                        .iter()
                        .map(|(k, v, spaced)| {
                            if *spaced {
                                format!(" \"{k}\" : {v} ")
                            } else {
                                format!("\"{k}\":{v}")
                            }
                        })
                        .collect();
                    format!("{{{}}}", body.join(","))
                }
            ),
        ]
    })
}

proptest! {
    #[test]
    fn frame_parsing_never_panics(data in ".{0,200}") {
        let _ = parse(&data);
    }

    #[test]
    fn events_survive_nested_and_flat_frames_byte_for_byte(
        sequence in any::<i64>(),
        event_type in "[A-Za-z_]{1,20}",
        payload in json_text(),
        created in prop::option::of("[0-9T:.Z-]{1,24}"),
        flat in prop::bool::ANY,
    ) {
        let created_json = created.as_ref().map(|c| format!(r#","createdAt":"{c}""#)).unwrap_or_default();
        let event = format!(r#"{{"sequence":{sequence},"eventType":"{event_type}","payload":{payload}{created_json}}}"#);
        let frame = if flat {
            format!(r#"{{"type":"run_event",{}"#, &event[1..])
        } else {
            format!(r#"{{"type":"run_event","event":{event}}}"#)
        };
        let Ok(Frame::RunEvent(parsed)) = parse(&frame) else { panic!("not a run_event: {frame}") };
        prop_assert_eq!(parsed.sequence, sequence);
        prop_assert_eq!(&parsed.event_type, &event_type);
        prop_assert_eq!(parsed.payload.get(), payload.trim());
        prop_assert_eq!(parsed.created_at, created);
    }

    #[test]
    fn the_config_loader_never_panics_and_points_inside_the_file(text in "(\\[api\\]\n|token = \"t\"\n|[a-z_\\[\\]=\" .${}0-9\n]){0,40}") {
        if let Err(error) = Config::parse(&text, Path::new("p.toml"), &|_| None) {
            let lines = text.lines().count().max(1);
            prop_assert!(error.line <= lines + 1, "{error} in {text:?}");
            prop_assert!(error.column >= 1 || error.line == 0);
            prop_assert!(!error.key.is_empty());
        }
    }

    #[test]
    fn a_valid_config_with_one_byte_changed_never_panics(position in 0usize..400, byte in any::<u8>()) {
        let mut text = VALID.as_bytes().to_vec();
        let at = position % text.len();
        text[at] = byte;
        if let Ok(text) = String::from_utf8(text) {
            let _ = Config::parse(&text, Path::new("p.toml"), &|_| Some("x".into()));
        }
    }

    #[test]
    fn routing_sends_exactly_the_sinks_of_every_matching_route_once(
        routes in prop::collection::vec(route(), 0..6),
        event_type in "(PHASE_STARTED|ARTIFACT_CREATED|run_finished|X|XY)",
        run_id in "(r1|r2|r3)",
        status in prop::option::of("(running|failed|completed)"),
        phase in prop::option::of("(plan|act)"),
        team in prop::option::of("(rome|oslo)"),
    ) {
        let labels: BTreeMap<String, String> = team.into_iter().map(|t| ("team".to_owned(), t)).collect();
        let facts = EventFacts { event_type: &event_type, run_id: &run_id, labels: &labels, status: status.as_deref(), phase: phase.as_deref() };
        let sinks: Vec<String> = Router::new(routes.clone())
            .sinks_for(&facts)
            .iter()
            .map(|s| s.to_string())
            .collect();
        let event = Event { event_type: &event_type, run_id: &run_id, team: labels.get("team").map(String::as_str), status: status.as_deref(), phase: phase.as_deref() };
        let mut expected: Vec<String> = routes
            .iter()
            .filter(|r| route_matches(r, &event))
            .flat_map(|r| r.sinks.iter().map(|s| s.to_string()))
            .collect();
        expected.sort();
        expected.dedup();
        prop_assert_eq!(sinks, expected, "{:?} for {:?}", routes, event);
    }

    #[test]
    fn signatures_verify_with_the_reference_library(
        key in prop::collection::vec(any::<u8>(), 24..=64),
        id in "[a-zA-Z0-9:_-]{1,60}",
        body in ".{0,300}",
    ) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let header = runhook::sink::sign::signature_header(&[SigningKey(key.clone())], &id, now, body.as_bytes());
        let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&key));
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("webhook-id", id.parse().unwrap());
        headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
        headers.insert("webhook-signature", header.parse().unwrap());
        let verifier = standardwebhooks::Webhook::new(&secret).unwrap();
        prop_assert!(verifier.verify(body.as_bytes(), &headers).is_ok());
        let mut tampered = body.clone().into_bytes();
        tampered.push(b'!');
        prop_assert!(verifier.verify(&tampered, &headers).is_err());
    }
}

fn route() -> impl Strategy<Value = Route> {
    (
        prop::collection::vec(
            "(PHASE_\\*|ARTIFACT_\\*|\\*_CREATED|\\*_\\*|run_finished|\\*|X|X\\*)",
            0..3,
        ),
        prop::collection::vec("(r1|r2|r3)", 0..3),
        prop::collection::vec("(running|failed|completed)", 0..2),
        prop::collection::vec("(plan|act)", 0..2),
        prop::option::of(("(team|env)", "(rome|oslo)")),
        prop::collection::vec("(a|b|c|d)", 1..3),
    )
        .prop_map(
            |(event_types, runs, statuses, phases, label, sinks)| Route {
                event_types: EventTypes::new(event_types).expect("the generated globs compile"),
                runs,
                labels: label.into_iter().collect(),
                statuses,
                phases,
                sinks: sinks.into_iter().map(|s| Arc::from(s.as_str())).collect(),
            },
        )
}

/// What the routing test knows of an event (it labels only `team`).
#[derive(Debug)]
struct Event<'a> {
    event_type: &'a str,
    run_id: &'a str,
    team: Option<&'a str>,
    status: Option<&'a str>,
    phase: Option<&'a str>,
}

/// The route filters as the README states them, written independently of
/// `Route::matches`: every filter given must hold; a list matches when it
/// is empty or holds the value; labels must all be present and equal;
/// event types are globs where `*` is any text.
fn route_matches(route: &Route, event: &Event<'_>) -> bool {
    fn listed(values: &[String], value: Option<&str>) -> bool {
        values.is_empty() || values.iter().any(|v| Some(v.as_str()) == value)
    }
    let type_ok = route.event_types.patterns().is_empty()
        || route
            .event_types
            .patterns()
            .iter()
            .any(|g| glob(g.as_bytes(), event.event_type.as_bytes()));
    let labels_ok = route.labels.iter().all(|(key, value)| match key.as_str() {
        "team" => event.team == Some(value.as_str()),
        _ => false,
    });
    type_ok
        && listed(&route.runs, Some(event.run_id))
        && listed(&route.statuses, event.status)
        && listed(&route.phases, event.phase)
        && labels_ok
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob(rest, &text[skip..])),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

const VALID: &str = r#"[api]
token = "${T}"
poll_interval = "2s"
[state]
path = "/tmp/x.db"
[[runs]]
id = "r1"
labels = { team = "rome" }
[sinks.archive]
type = "file"
path = "/tmp/x.jsonl"
[sinks.ops]
type = "webhook"
url = "https://example.com/h"
secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
[[routes]]
event_types = ["ARTIFACT_*"]
sinks = ["archive", "ops"]
"#;
