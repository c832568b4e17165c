use std::path::Path;

use super::*;
use crate::store::Location;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

fn env(name: &str) -> Option<String> {
    match name {
        "TRAVELMODE_TOKEN" => Some("tok-123".into()),
        "RUNHOOK_WEBHOOK_SECRET" => Some(SECRET.into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"), &env)
}

const MINIMAL: &str = r#"
[api]
token = "t"
[sinks.archive]
type = "file"
path = "/tmp/x.jsonl"
[[routes]]
sinks = ["archive"]
"#;

#[test]
fn the_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("session"), "cookie-value\n").unwrap();
    std::fs::write(
        dir.path().join("slack"),
        "https://hooks.slack.com/services/T/B/X\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap()
        .replace(
            "/run/credentials/runhook.service",
            &dir.path().display().to_string(),
        );
    let config = parse(&text).unwrap();
    assert_eq!(config.api.token.as_ref().unwrap().expose(), "tok-123");
    assert_eq!(
        config.api.session_cookie.as_ref().unwrap().expose(),
        "cookie-value"
    );
    assert_eq!(config.api.poll_interval, Duration::from_secs(2));
    assert_eq!(config.state.retain, Duration::from_secs(7 * 86400));
    assert_eq!(config.sinks.len(), 3);
    assert_eq!(config.router.routes().len(), 3);
    assert_eq!(config.runs[0].labels["team"], "rome");
    let SinkKind::Webhook(ops) = &config.sinks["ops"].kind else {
        panic!("ops is a webhook")
    };
    assert_eq!(ops.secrets.len(), 1);
    assert_eq!(ops.headers["x-team"], "ops");
}

#[test]
fn defaults_apply() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.api.base_url.as_str(), "https://api.travelmode.ai/");
    assert_eq!(config.api.transport, Transport::Auto);
    assert_eq!(config.api.max_concurrency, 64);
    assert_eq!(config.state.shutdown_grace, Duration::from_secs(10));
    assert_eq!(config.sinks["archive"].delivery, DeliveryPolicy::default());
    assert!(config.sinks["archive"].ordered);
    assert!(config.server.is_none());
}

fn error_of(text: &str) -> ConfigError {
    parse(text).expect_err("config should be rejected")
}

#[test]
fn unknown_keys_name_line_column_and_key() {
    let error = error_of("[api]\ntoken = \"t\"\npoll_intervl = \"2s\"\n");
    assert_eq!((error.line, error.column), (3, 1));
    assert_eq!(error.key, "api.poll_intervl");
    assert!(error.message.contains("unknown field"), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("test.toml:3:1: api.poll_intervl:"),
        "{error}"
    );
}

#[test]
fn bad_values_name_their_place() {
    let text = MINIMAL.replace("token = \"t\"", "token = \"t\"\npoll_interval = \"soon\"");
    let error = error_of(&text);
    assert_eq!(
        (error.line, error.column, error.key.as_str()),
        (4, 17, "api.poll_interval")
    );
    let text = MINIMAL.replace("type = \"file\"", "type = \"fax\"");
    let error = error_of(&text);
    assert_eq!((error.line, error.key.as_str()), (5, "sinks.archive.type"));
    let error = error_of(&MINIMAL.replace("[api]", "[api]\nmax_concurrency = \"many\""));
    assert_eq!((error.line, error.key.as_str()), (3, "api.max_concurrency"));
}

/// Values that would make a loop spin (a zero interval), panic (a semaphore
/// past its maximum) or emit a second `run_finished` for one finish (rows
/// pruned while the run still lingers) are refused where they are written.
#[test]
fn values_that_spin_or_panic_are_rejected_where_written() {
    let in_api = |line: &str, key: &str| {
        let error = error_of(&MINIMAL.replace("token = \"t\"", &format!("token = \"t\"\n{line}")));
        let column = line.find('=').unwrap() + 3;
        assert_eq!(
            (error.line, error.column, error.key.as_str()),
            (4, column, key),
            "{line}: {error}"
        );
    };
    in_api("poll_interval = \"0s\"", "api.poll_interval");
    in_api("poll_interval = \"5ms\"", "api.poll_interval");
    in_api("finished_recheck = \"0s\"", "api.finished_recheck");
    in_api("stream_idle_timeout = \"0s\"", "api.stream_idle_timeout");
    in_api("max_concurrency = 0", "api.max_concurrency");
    in_api(
        "max_concurrency = 2305843009213693952",
        "api.max_concurrency",
    );
    in_api("max_concurrency = 10001", "api.max_concurrency");
    // Past any sane value, durations overflow the clock arithmetic.
    in_api("poll_interval = \"500000000y\"", "api.poll_interval");
    // The default retain (7d) is shorter than this linger.
    in_api("finished_linger = \"30d\"", "api.finished_linger");

    let error = error_of(&format!("{MINIMAL}[state]\nretain = \"1h\"\n"));
    assert_eq!(
        (error.line, error.key.as_str()),
        (10, "state.retain"),
        "{error}"
    );
    assert!(error.message.contains("finished_linger"), "{error}");

    let in_sink = |line: &str, key: &str| {
        let text = MINIMAL.replace(
            "path = \"/tmp/x.jsonl\"",
            &format!("path = \"/tmp/x.jsonl\"\n{line}"),
        );
        let error = error_of(&text);
        assert_eq!(
            (error.line, error.key.as_str()),
            (7, key),
            "{line}: {error}"
        );
    };
    in_sink("concurrency = 1000000", "sinks.archive.concurrency");
    in_sink("initial_backoff = \"0s\"", "sinks.archive.initial_backoff");
    let error = error_of(&format!(
        "{MINIMAL}[delivery]\nmax_backoff = \"300000000y\"\n"
    ));
    assert_eq!(
        (error.line, error.key.as_str()),
        (10, "delivery.max_backoff"),
        "{error}"
    );
    let error = error_of(&format!("{MINIMAL}[delivery]\ninitial_backoff = \"0ms\"\n"));
    assert_eq!(
        (error.line, error.key.as_str()),
        (10, "delivery.initial_backoff"),
        "{error}"
    );
    let error = error_of(&webhook(
        "secret = \"${RUNHOOK_WEBHOOK_SECRET}\"\ntimeout = \"0s\"",
    ));
    assert_eq!(error.key, "sinks.ops.timeout", "{error}");

    // The floors and caps themselves are fine (tests and benchmarks use them).
    let ok = MINIMAL.replace(
        "token = \"t\"",
        "token = \"t\"\npoll_interval = \"10ms\"\nfinished_recheck = \"100ms\"\n\
         stream_idle_timeout = \"100ms\"\nmax_concurrency = 10000\nfinished_linger = \"7d\"",
    );
    let config = parse(&format!("{ok}[delivery]\ninitial_backoff = \"10ms\"\n")).unwrap();
    assert_eq!(config.api.max_concurrency, 10_000);
    assert_eq!(config.api.poll_interval, Duration::from_millis(10));
}

#[test]
fn env_vars_expand_and_unset_ones_are_errors() {
    let text = MINIMAL.replace("token = \"t\"", "token = \"${TRAVELMODE_TOKEN}\"");
    assert_eq!(parse(&text).unwrap().api.token.unwrap().expose(), "tok-123");
    let error = error_of(&MINIMAL.replace("token = \"t\"", "token = \"${NOPE}\""));
    assert!(error.message.contains("`NOPE` is not set"), "{error}");
    assert_eq!((error.line, error.key.as_str()), (3, "api.token"));
}

#[test]
fn secrets_from_files_and_not_both() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "from-file\n").unwrap();
    let text = MINIMAL.replace(
        "token = \"t\"",
        &format!("token_file = \"{}\"", file.display()),
    );
    assert_eq!(
        parse(&text).unwrap().api.token.unwrap().expose(),
        "from-file"
    );
    let both = MINIMAL.replace(
        "token = \"t\"",
        &format!("token = \"t\"\ntoken_file = \"{}\"", file.display()),
    );
    assert!(error_of(&both).message.contains("not both"));
    let missing = MINIMAL.replace("token = \"t\"", "token_file = \"/nonexistent/token\"");
    assert_eq!(error_of(&missing).key, "api.token_file");
}

#[test]
fn routes_and_sinks_must_agree() {
    let error =
        error_of(&MINIMAL.replace("sinks = [\"archive\"]", "sinks = [\"archive\", \"nope\"]"));
    assert!(error.message.contains("no sink named `nope`"), "{error}");
    assert_eq!(error.key, "routes[0].sinks");
    let unrouted = format!("{MINIMAL}\n[sinks.extra]\ntype = \"file\"\npath = \"/tmp/y\"\n");
    let error = error_of(&unrouted);
    assert_eq!(error.key, "sinks.extra");
    assert!(error.message.contains("no route"), "{error}");
    let error = error_of(&MINIMAL.replace("[[routes]]", "[[routes]]\nstatuses = [\"done\"]"));
    assert!(error.message.contains("unknown status"), "{error}");
}

fn webhook(secret_line: &str) -> String {
    format!(
        "[api]\ntoken = \"t\"\n[sinks.ops]\ntype = \"webhook\"\nurl = \"https://example.com/h\"\n{secret_line}\n[[routes]]\nsinks = [\"ops\"]\n"
    )
}

#[test]
fn webhook_secrets_are_checked() {
    assert!(parse(&webhook(&format!("secret = \"{SECRET}\""))).is_ok());
    let error = error_of(&webhook("secret = \"hunter2\""));
    assert!(error.message.contains("whsec_"), "{error}");
    assert_eq!((error.line, error.key.as_str()), (6, "sinks.ops.secret"));
    let short = format!(
        "secret = \"whsec_{}\"",
        base64::engine::general_purpose::STANDARD.encode([7u8; 16])
    );
    assert!(error_of(&webhook(&short)).message.contains("16 bytes"));
    assert!(
        error_of(&webhook("secret = \"\""))
            .message
            .contains("empty")
    );
    assert!(error_of(&webhook("")).message.contains("needs `secret`"));
    let rotating = webhook(&format!(
        "secrets = [\"{SECRET}\", \"whsec_{}\"]",
        base64::engine::general_purpose::STANDARD.encode([9u8; 32])
    ));
    let SinkKind::Webhook(w) = &parse(&rotating).unwrap().sinks["ops"].kind else {
        panic!()
    };
    assert_eq!(w.secrets.len(), 2);
}

#[test]
fn keys_of_another_sink_type_are_rejected() {
    let text = MINIMAL.replace(
        "path = \"/tmp/x.jsonl\"",
        "path = \"/tmp/x.jsonl\"\nchannel = \"C1\"",
    );
    let error = error_of(&text);
    assert_eq!(error.key, "sinks.archive.channel");
    assert!(
        error.message.contains("does not apply to a file sink"),
        "{error}"
    );
}

#[test]
fn pipeline_is_a_key_of_ordered_webhook_sinks_only() {
    let secret = format!("secret = \"{SECRET}\"");
    let pipelined = |line: &str| parse(&webhook(&format!("{secret}\n{line}")));
    let is_pipelined = |config: Config| match &config.sinks["ops"].kind {
        SinkKind::Webhook(w) => w.pipeline,
        _ => panic!("ops is a webhook"),
    };
    assert!(!is_pipelined(pipelined("").unwrap()), "off by default");
    assert!(is_pipelined(pipelined("pipeline = true").unwrap()));
    assert!(!is_pipelined(
        pipelined("pipeline = false\nordered = false").unwrap()
    ));

    let error = pipelined("ordered = false\npipeline = true").expect_err("unordered");
    assert_eq!(
        (error.line, error.column, error.key.as_str()),
        (8, 12, "sinks.ops.pipeline"),
        "{error}"
    );
    assert!(error.message.contains("ordered = true"), "{error}");

    let on_file = MINIMAL.replace(
        "path = \"/tmp/x.jsonl\"",
        "path = \"/tmp/x.jsonl\"\npipeline = true",
    );
    let error = error_of(&on_file);
    assert_eq!(
        (error.line, error.column, error.key.as_str()),
        (7, 12, "sinks.archive.pipeline"),
        "{error}"
    );
    assert!(
        error
            .message
            .contains("file sink: a file sink is exactly-once"),
        "{error}"
    );

    let on_slack = "[api]\ntoken = \"t\"\n[sinks.chat]\ntype = \"slack\"\n\
                    webhook_url = \"https://hooks.slack.com/x\"\npipeline = false\n\
                    [[routes]]\nsinks = [\"chat\"]\n";
    let error = error_of(on_slack);
    assert_eq!(
        (error.line, error.key.as_str()),
        (6, "sinks.chat.pipeline"),
        "{error}"
    );
    assert!(error.message.contains("Slack thread"), "{error}");
}

#[test]
fn slack_needs_one_mode() {
    let slack = |keys: &str| {
        format!(
            "[api]\ntoken = \"t\"\n[sinks.chat]\ntype = \"slack\"\n{keys}\n[[routes]]\nsinks = [\"chat\"]\n"
        )
    };
    assert!(parse(&slack("webhook_url = \"https://hooks.slack.com/x\"")).is_ok());
    assert!(parse(&slack("bot_token = \"xoxb-1\"\nchannel = \"C1\"")).is_ok());
    assert!(
        error_of(&slack("bot_token = \"xoxb-1\""))
            .message
            .contains("channel")
    );
    assert!(error_of(&slack("")).message.contains("needs"));
    let error = error_of(&slack("webhook_url = \"hooks.slack.com/x\""));
    assert_eq!(
        (error.line, error.key.as_str()),
        (5, "sinks.chat.webhook_url"),
        "{error}"
    );
    let bad_template = slack(
        "webhook_url = \"https://hooks.slack.com/x\"\ntemplates = { run_finished = \"{{ run_id \" }",
    );
    let error = error_of(&bad_template);
    assert_eq!(error.key, "sinks.chat.templates.run_finished");
    assert!(error.message.contains("not a valid template"), "{error}");
}

#[test]
fn transport_needs_its_credential() {
    let error = error_of(&MINIMAL.replace("token = \"t\"", "token = \"t\"\ntransport = \"sse\""));
    assert!(error.message.contains("session_cookie"), "{error}");
    let error = error_of(&MINIMAL.replace("token = \"t\"", ""));
    assert!(error.message.contains("no credential"), "{error}");
}

#[test]
fn debug_output_holds_no_secret() {
    let text = webhook(&format!("secret = \"{SECRET}\""))
        .replace("token = \"t\"", "token = \"tok-very-secret\"");
    let config = parse(&text).unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("tok-very-secret"), "{debug}");
    assert!(!debug.contains("C2FVsBQIhrscChlQIMV"), "{debug}");
}

fn slack_with_templates(templates: &str, routed_types: &str) -> String {
    format!(
        "[api]\ntoken = \"t\"\n[sinks.chat]\ntype = \"slack\"\nwebhook_url = \"https://hooks.slack.com/x\"\n\
         templates = {{ {templates} }}\n[[routes]]\nevent_types = [{routed_types}]\nsinks = [\"chat\"]\n"
    )
}

#[test]
fn undefined_template_variables_are_errors() {
    let error = error_of(&slack_with_templates(
        "run_finished = \"Run {{ run_id }} {{ stauts }}\"",
        "\"run_finished\"",
    ));
    assert_eq!(
        (error.line, error.key.as_str()),
        (6, "sinks.chat.templates.run_finished"),
        "{error}"
    );
    assert!(
        error.message.contains("undefined variable `stauts`"),
        "{error}"
    );
    // Event fields, payload and label paths, loop variables and the
    // environment's functions are all defined.
    let fine = slack_with_templates(
        "run_finished = \"{{ status }} {{ payload.anything.deep }} {{ labels.team }} \
         {% for x in range(2) %}{{ loop.index }}{{ x }}{% endfor %}{% set y = 1 %}{{ y }}\"",
        "\"run_finished\"",
    );
    parse(&fine).unwrap();
}

#[test]
fn templates_no_route_can_send_are_warnings() {
    let text = slack_with_templates(
        "run_finished = \"done\", ARTIFACT_CREATED = \"new\", PHASE_STARTED = \"go\"",
        "\"run_finished\", \"PHASE_*\"",
    );
    let config = parse(&text).unwrap();
    let warnings: Vec<(usize, &str)> = config
        .warnings
        .iter()
        .map(|w| (w.0.line, w.0.key.as_str()))
        .collect();
    assert_eq!(
        warnings,
        [(6, "sinks.chat.templates.ARTIFACT_CREATED")],
        "{:?}",
        config.warnings
    );
    assert!(config.warnings[0].0.message.contains("never used"));
    // A route to another sink does not count; a route without a type
    // filter sends every type.
    let everything =
        slack_with_templates("ARTIFACT_CREATED = \"new\"", "").replace("event_types = []\n", "");
    assert!(parse(&everything).unwrap().warnings.is_empty());
}

#[test]
fn bad_globs_are_errors_where_written() {
    let error = error_of(&MINIMAL.replace(
        "[[routes]]",
        "[[routes]]\nevent_types = [\"PHASE_*\", \"ARTIFACT_[\"]",
    ));
    assert_eq!(
        (error.line, error.column, error.key.as_str()),
        (8, 27, "routes[0].event_types"),
        "{error}"
    );
    assert!(error.message.contains("ARTIFACT_["), "{error}");
}

#[test]
fn env_defaults_and_literal_dollars() {
    let env = |name: &str| match name {
        "SET" => Some("from-env".to_owned()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    let token = |value: &str| {
        let text = MINIMAL.replace("token = \"t\"", &format!("token = \"{value}\""));
        Config::parse(&text, Path::new("test.toml"), &env)
            .map(|c| c.api.token.unwrap().expose().to_owned())
    };
    assert_eq!(token("${UNSET:-fallback}").unwrap(), "fallback");
    assert_eq!(token("${SET:-fallback}").unwrap(), "from-env");
    assert_eq!(token("${EMPTY:-fallback}").unwrap(), "fallback");
    assert_eq!(token("a${UNSET:-}b").unwrap(), "ab");
    assert_eq!(token("pa$$word").unwrap(), "pa$word");
    assert_eq!(token("$${SET}").unwrap(), "${SET}");
    assert_eq!(token("$$$${SET}").unwrap(), "$${SET}");
    assert_eq!(token("cost $5").unwrap(), "cost $5");
    let error = token("${UNSET}").unwrap_err();
    assert!(error.message.contains("`UNSET` is not set"), "{error}");
}

#[test]
fn unknown_tables_and_broken_headers_name_themselves() {
    let base = "[api]\ntoken = \"t\"\n[state]\npath = \"/x\"\n";
    let error = error_of(&format!("{base}[stat]\npath = \"y\"\n"));
    assert_eq!((error.line, error.key.as_str()), (5, "stat"), "{error}");
    let error = error_of(&format!("{base}[sinks.ops # no closing bracket\n"));
    assert_eq!(
        (error.line, error.key.as_str()),
        (5, "sinks.ops"),
        "{error}"
    );
    // A key on a line still names its table.
    let error = error_of(&format!("{base}retain = \"1d\n"));
    assert_eq!(error.key, "state.retain", "{error}");
}

#[test]
fn server_watch_token_from_a_file_redacted_and_not_short() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("watch-token");
    std::fs::write(&file, "0123456789abcdef-secret\n").unwrap();
    let with = |line: &str| format!("{MINIMAL}\n[server]\nlisten = \"127.0.0.1:0\"\n{line}\n");
    let config = parse(&with(&format!("token_file = \"{}\"", file.display()))).unwrap();
    let server = config.server.as_ref().unwrap();
    let token = server.watch_token.as_ref().unwrap();
    assert_eq!(token.expose(), "0123456789abcdef-secret");
    assert!(!format!("{config:?}").contains("0123456789abcdef"));
    assert!(
        parse(&with(""))
            .unwrap()
            .server
            .unwrap()
            .watch_token
            .is_none()
    );
    let error = error_of(&with("token = \"short\""));
    assert_eq!(error.key, "server.token", "{error}");
    assert!(error.message.contains("at least 16"), "{error}");
}

/// MINIMAL's file sink on a PostgreSQL state, with `extra` in its table.
fn on_postgres(state: &str, cluster: &str, file_extra: &str) -> String {
    format!(
        "[api]\ntoken = \"t\"\n[state]\n{state}\n{cluster}\n[sinks.archive]\ntype = \"file\"\npath = \"/tmp/x.jsonl\"\n{file_extra}\n[[routes]]\nsinks = [\"archive\"]\n"
    )
}

#[test]
fn a_state_url_names_postgres_and_never_shows_its_password() {
    let url = "postgres://runhook:hunter2@db.internal:5432/runhook";
    let config = parse(&on_postgres(
        &format!("url = \"{url}\""),
        "",
        "node = \"a\"",
    ))
    .unwrap();
    assert_eq!(config.state.location, Location::Postgres(url.into()));
    assert_eq!(config.state.location.sqlite_path(), None);
    let shown = format!("{} {:?} {config:?}", config.state.location, config.state);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("db.internal:5432/runhook"), "{shown}");
    // A password in the config file itself is worth a word.
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(config.warnings[0].to_string().contains("state.url"));
}

#[test]
fn a_state_url_file_keeps_the_url_and_its_password_out_of_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("url");
    let url = "postgres://runhook:hunter2@db/runhook";
    std::fs::write(&file, format!("{url}\n")).unwrap();
    let text = on_postgres(
        &format!("url_file = \"{}\"", file.display()),
        "",
        "node = \"a\"",
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.state.location, Location::Postgres(url.into()));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    // The ops commands' view of `[state]` reaches the same database.
    let state = StateConfig::parse(&text, Path::new("test.toml"), &env).unwrap();
    assert_eq!(state.location, config.state.location);
}

#[test]
fn a_state_has_one_place_and_a_url_must_be_postgres() {
    let both = error_of(&on_postgres(
        "path = \"/var/lib/x.db\"\nurl = \"postgres://db/x\"",
        "",
        "node = \"a\"",
    ));
    assert_eq!(both.key, "state.path", "{both}");
    assert_eq!((both.line, both.column), (4, 8), "{both}");
    assert!(both.message.contains("not both"), "{both}");

    let bad = error_of(&on_postgres(
        "url = \"postgres://runhook:hunter2@db:notaport/x\"",
        "",
        "node = \"a\"",
    ));
    assert_eq!((bad.key.as_str(), bad.line), ("state.url", 4), "{bad}");
    assert!(!bad.to_string().contains("hunter2"), "{bad}");
    let empty = error_of(&on_postgres("url = \"\"", "", "node = \"a\""));
    assert_eq!(empty.key, "state.url", "{empty}");
}

#[test]
fn cluster_defaults_to_the_host_name_and_refuses_a_ttl_that_would_spin() {
    let config = parse(MINIMAL).unwrap();
    assert!(!config.cluster.node.is_empty());
    assert_eq!(config.cluster.lease_ttl, DEFAULT_LEASE_TTL);
    assert_eq!(config.cluster.replica().node, config.cluster.node);

    let set = parse(&on_postgres(
        "url = \"postgres://db/x\"",
        "[cluster]\nnode = \"runhook-b\"\nlease_ttl = \"5s\"",
        "node = \"runhook-b\"",
    ))
    .unwrap();
    assert_eq!(set.cluster.node, "runhook-b");
    assert_eq!(set.cluster.replica().lease_ttl, Duration::from_secs(5));

    let short = error_of(&on_postgres(
        "url = \"postgres://db/x\"",
        "[cluster]\nlease_ttl = \"1s\"",
        "node = \"a\"",
    ));
    assert_eq!((short.key.as_str(), short.line), ("cluster.lease_ttl", 6));
    let spaced = error_of(&on_postgres(
        "url = \"postgres://db/x\"",
        "[cluster]\nnode = \"runhook b\"",
        "node = \"a\"",
    ));
    assert_eq!(spaced.key, "cluster.node", "{spaced}");
    let unknown = error_of(&on_postgres(
        "url = \"postgres://db/x\"",
        "[cluster]\nlease = \"5s\"",
        "node = \"a\"",
    ));
    assert_eq!(unknown.key, "cluster.lease", "{unknown}");
}

#[test]
fn a_file_sink_names_its_node_when_the_state_is_shared() {
    let missing = error_of(&on_postgres(
        "url = \"postgres://db/x\"",
        "[cluster]\nnode = \"runhook-a\"",
        "",
    ));
    assert_eq!(missing.key, "sinks.archive.node", "{missing}");
    assert_eq!(missing.line, 7, "{missing}");
    assert!(
        missing.message.contains("node = \"runhook-a\""),
        "{missing}"
    );

    let named = parse(&on_postgres(
        "url = \"postgres://db/x\"",
        "",
        "node = \"runhook-a\"",
    ))
    .unwrap();
    let SinkKind::File(file) = &named.sinks["archive"].kind else {
        panic!("archive is a file sink")
    };
    assert_eq!(file.node.as_deref(), Some("runhook-a"));

    // One machine: a `node` is harmless and none is needed.
    parse(MINIMAL).unwrap();
    parse(&MINIMAL.replace(
        "path = \"/tmp/x.jsonl\"",
        "path = \"/tmp/x.jsonl\"\nnode = \"a\"",
    ))
    .unwrap();

    let on_webhook = error_of(&webhook(
        "secret = \"${RUNHOOK_WEBHOOK_SECRET}\"\nnode = \"a\"",
    ));
    assert_eq!(on_webhook.key, "sinks.ops.node", "{on_webhook}");
    assert!(on_webhook.message.contains("lease"), "{on_webhook}");
}
