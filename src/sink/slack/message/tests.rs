//! Unit tests of Slack message building: default texts, templates,
//! escaping and the size limits.

use super::*;

/// Leaked so each test can build and change events freely.
fn pending(event_type: &str, payload: &str) -> Event<'static> {
    let leak = |text: &str| -> &'static str { Box::leak(text.to_owned().into_boxed_str()) };
    Event {
        id: "run-1:3",
        run_id: "run-1",
        sequence: Some(3),
        event_type: leak(event_type),
        payload: leak(payload),
        created_at: None,
        seen_at: 0,
        run_status: Some("running"),
        phase: Some("plan"),
        labels: r#"{"team":"rome"}"#,
    }
}

/// `check` refuses template variables outside this list, so a field
/// added to the context without it would be refused wrongly.
#[test]
fn template_variables_are_the_context_fields() {
    let context = serde_json::to_value(Context::of(&pending("X", "{}"))).unwrap();
    let mut fields: Vec<&str> = context
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut listed = TEMPLATE_VARIABLES.to_vec();
    fields.sort_unstable();
    listed.sort_unstable();
    assert_eq!(fields, listed);
}

#[test]
fn defaults_read_at_a_glance() {
    let env = template_environment();
    let failed = render(
        &pending(
            "run_finished",
            r#"{"status":"failed","errorMessage":"Flight search timed out","lastSequence":5}"#,
        ),
        &env,
    );
    assert_eq!(
        failed.text,
        ":x: Run `run-1` *failed*: Flight search timed out"
    );
    let phase = render(&pending("PHASE_STARTED", r#"{"phase":"compose"}"#), &env);
    assert!(phase.text.contains("phase *compose* started"));
    let artifact = render(
        &pending("ARTIFACT_CREATED", r#"{"artifactType":"proposals"}"#),
        &env,
    );
    assert!(artifact.text.contains("artifact *proposals*"));
    let other = render(&pending("TOOL_CALLED", "{}"), &env);
    assert!(other.text.contains("TOOL_CALLED"));
    assert!(
        other.blocks[1]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .contains("team=rome")
    );
}

#[test]
fn templates_replace_the_default() {
    let mut env = template_environment();
    env.add_template_owned(
        "run_finished".to_owned(),
        "{{ run_id }} ended {{ status }} at #{{ payload.lastSequence }}".to_owned(),
    )
    .unwrap();
    let message = render(
        &pending("run_finished", r#"{"status":"completed","lastSequence":9}"#),
        &env,
    );
    assert_eq!(message.text, "run-1 ended completed at #9");
}

#[test]
fn limits_hold_for_huge_text() {
    let mut env = template_environment();
    env.add_template_owned("X".to_owned(), "{{ payload.big }}".to_owned())
        .unwrap();
    let big = "é".repeat(10_000);
    let message = render(&pending("X", &format!(r#"{{"big":"{big}"}}"#)), &env);
    let section = message.blocks[0]["text"]["text"].as_str().unwrap();
    assert_eq!(section.chars().count(), SECTION_LIMIT);
    assert!(message.text.chars().count() <= SECTION_LIMIT);
    assert!(message.blocks.len() <= BLOCK_LIMIT);
}

const EVIL: &str = "<!channel> <https://evil.example|click here> & co";
const EVIL_ESCAPED: &str = "&lt;!channel&gt; &lt;https://evil.example|click here&gt; &amp; co";

/// Every string of a message: its fallback and each block's texts.
fn all_texts(message: &Message) -> Vec<String> {
    let mut out = vec![message.text.clone()];
    let mut stack: Vec<&Value> = message.blocks.iter().collect();
    while let Some(value) = stack.pop() {
        match value {
            Value::String(s) => out.push(s.clone()),
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    out
}

#[test]
fn upstream_and_label_text_is_escaped_in_default_messages() {
    let env = template_environment();
    let mut finished = pending(
        "run_finished",
        &format!(r#"{{"status":"failed","errorMessage":"{EVIL}","lastSequence":5}}"#),
    );
    finished.labels = r#"{"<!here>":"<https://x.example|y>"}"#;
    finished.phase = Some("<!subteam^S1>");
    let message = render(&finished, &env);
    assert_eq!(
        message.text,
        format!(":x: Run `run-1` *failed*: {EVIL_ESCAPED}")
    );
    let cancelled = pending(
        "run_finished",
        &format!(r#"{{"status":"cancelled","cancelReason":"{EVIL}"}}"#),
    );
    let mut phase = pending("PHASE_STARTED", r#"{"phase":"<!here>"}"#);
    phase.run_status = Some("<b>");
    let artifact = pending("ARTIFACT_CREATED", r#"{"artifactType":"<@U1>"}"#);
    let other = pending("<!everyone>", "{}");
    for event in [&finished, &cancelled, &phase, &artifact, &other] {
        for message in [render(event, &env), thread_root(event)] {
            for text in all_texts(&message) {
                assert!(!text.contains(['<', '>']), "unescaped: {text}");
            }
        }
    }
    assert!(
        thread_root(&cancelled).text.ends_with(EVIL_ESCAPED),
        "{}",
        thread_root(&cancelled).text
    );
}

#[test]
fn template_variables_are_escaped_unless_marked_safe() {
    let mut env = template_environment();
    env.add_template_owned(
            "run_finished".to_owned(),
            "<!here> {{ error_message }} | {{ labels.team }} | {{ payload.link|safe }} | {{ payload.lastSequence }}{{ payload.missing }}"
                .to_owned(),
        )
        .unwrap();
    let mut event = pending(
        "run_finished",
        &format!(
            r#"{{"status":"failed","errorMessage":"{EVIL}","link":"<https://ok.example|ok>","lastSequence":4}}"#
        ),
    );
    event.labels = r#"{"team":"a&b"}"#;
    let message = render(&event, &env);
    assert_eq!(
        message.text,
        format!("<!here> {EVIL_ESCAPED} | a&amp;b | <https://ok.example|ok> | 4")
    );
}

#[test]
fn truncate_never_splits_an_escape() {
    let text = format!("{}&amp;tail", "a".repeat(10));
    assert_eq!(truncate(&text, 13), format!("{}…", "a".repeat(10)));
    assert_eq!(truncate(&text, 16), format!("{}&amp;…", "a".repeat(10)));
}

#[test]
fn truncate_counts_characters() {
    assert_eq!(truncate("abc", 3), "abc");
    assert_eq!(truncate("abcd", 3), "ab…");
    assert_eq!(truncate("ééééé", 4).chars().count(), 4);
}
