//! Failover: three `runhook run` processes (the built binary) share one
//! PostgreSQL (`pg_support`) with a short `lease_ttl`, following 50 runs
//! whose events keep arriving from the simulator, delivered to a webhook
//! receiver and a Slack fake in thread mode. While events flow, one replica
//! is SIGKILLed (and restarted), then another, and the third is paused with
//! SIGSTOP past its lease, then resumed with SIGCONT.
//!
//! What it holds the cluster to (issue 14, "Proof"):
//! - every event reaches each sink; per run, first arrivals come in order;
//!   a repeat is an id already seen, and repeats per run and in all are
//!   bounded by the disruptions (a kill or a pause catches at most one
//!   unrecorded delivery of each run its victim owned);
//! - one Slack root per run, every reply in that run's thread;
//! - no write accepted from a replica that was not the run's lease owner:
//!   triggers installed by the test (not by runhook) record, inside each
//!   data-path write's own transaction, the writing connection's
//!   `application_name` (one per replica) beside the lease's owner and
//!   epoch at that moment. A write refused by its fence rolls back with its
//!   record, so the table holds exactly the writes PostgreSQL accepted;
//! - a killed (or paused) replica's runs are delivered by another replica
//!   within `lease_ttl` + 5 s, measured per run from the receiver's arrival
//!   times and printed.
//!
//! Replicas say who they are to the receivers: the webhook sink sends an
//! `x-team` header naming its node (the header `receiver.rs` records), and
//! each node has its own Slack bot token.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use runhook::simulate::Simulator;
use runhook::simulate::scenario::ScriptedEvent;
use runhook::store::pg::{PgStore, Replica};

use crate::pg_support::PgServer;
use crate::receiver::{Receiver, SECRET};
use crate::slack::FakeSlack;
use crate::support::*;

const NODES: [&str; 3] = ["a", "b", "c"];
const RUNS: usize = 50;
const LEASE_TTL: Duration = Duration::from_secs(3);
/// What the issue allows a takeover beyond `lease_ttl`.
const TAKEOVER_SLACK: Duration = Duration::from_secs(5);
/// Time between a run's events at the simulator.
const INTERVAL: Duration = Duration::from_millis(500);
/// The event type routed to Slack besides `run_finished` (one per run, so
/// Slack's one message a second per replica keeps up).
const MILESTONE: &str = "MILESTONE";

/// One replica: the built binary on its own config, its log in a file.
type Node = LoggedDaemon;

/// The connection string of one replica: the server's, with the node as
/// `application_name`, which the fence audit reads.
fn node_url(pg: &PgServer, node: &str) -> String {
    let url = pg.url();
    let name = format!("runhook-{node}");
    if url.starts_with("postgres") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}application_name={name}")
    } else {
        format!("{url} application_name={name}")
    }
}

struct Cluster {
    sim: Simulator,
    webhook: Receiver,
    slack: FakeSlack,
    dir: KeptOnFailure,
    runs: Vec<String>,
}

/// The configs and replica logs: removed after a pass, kept (and named)
/// after a failure, so the replicas' side of it can be read.
struct KeptOnFailure(Option<tempfile::TempDir>);

impl KeptOnFailure {
    fn path(&self) -> &std::path::Path {
        self.0.as_ref().expect("the dir").path()
    }
}

impl Drop for KeptOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("failover: replica logs kept in {}", dir.keep().display());
        }
    }
}

impl Cluster {
    fn config_text(&self, pg: &PgServer, node: &str) -> String {
        let runs: String = self
            .runs
            .iter()
            .map(|id| format!("[[runs]]\nid = \"{id}\"\n"))
            .collect();
        format!(
            r#"[api]
base_url = "{base}"
token = "{token}"
transport = "poll"
poll_interval = "50ms"

[state]
url = "{url}"
shutdown_grace = "5s"

[cluster]
node = "{node}"
lease_ttl = "{ttl}s"

[delivery]
max_attempts = 100000
max_age = "1h"
initial_backoff = "50ms"
max_backoff = "500ms"

{runs}
[sinks.ops]
type = "webhook"
url = "{hook}"
secret = "{SECRET}"
headers = {{ "x-team" = "{node}" }}
concurrency = 16

[sinks.chat]
type = "slack"
bot_token = "xoxb-{node}"
channel = "C0123"
api_base = "http://{slack}/api/"
templates = {{ {MILESTONE} = "{{{{ id }}}}", run_finished = "{{{{ id }}}}" }}

[[routes]]
sinks = ["ops"]

[[routes]]
event_types = ["{MILESTONE}", "run_finished"]
sinks = ["chat"]
"#,
            base = self.sim.url(),
            token = self.sim.token(),
            url = node_url(pg, node),
            ttl = LEASE_TTL.as_secs(),
            hook = self.webhook.url(),
            slack = self.slack.addr,
        )
    }

    fn node(&self, pg: &PgServer, name: &'static str) -> Node {
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, self.config_text(pg, name)).expect("write config");
        Node::new(
            format!("replica {name}"),
            config,
            self.dir.path().join(format!("{name}.log")),
            "warn,runhook::daemon::leases=info",
        )
    }
}

/// Run `i`: events every `INTERVAL` for 50 to 74 s (longer than the
/// disruptions take on a quiet machine, so each finds runs still flowing),
/// one `MILESTONE` among them at a time that differs per run.
fn run_events(i: usize) -> Vec<ScriptedEvent> {
    let count = 100 + (i % 25) * 2;
    let milestone = 5 + (i * 7) % 80;
    (0..count)
        .map(|n| {
            let kind = if n == milestone {
                MILESTONE
            } else {
                "TOOL_CALLED"
            };
            event(kind, &format!(r#"{{"run":{i},"n":{n}}}"#))
        })
        .collect()
}

/// The audit the test installs: every accepted data-path write, who wrote
/// it and who owned the run's lease in that same transaction. The writes
/// audited are the owner's alone: events recorded, a delivery's outcome
/// (state or attempts; `release_backoff` moves only `next_attempt_at`), the
/// cursor and finish, Slack thread roots. A run's `state`, which a
/// replica's `subscribe` at start may reset unfenced, is left out.
const AUDIT: &str = r#"
CREATE TABLE fence_audit (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    tbl      text NOT NULL,
    run_id   text NOT NULL,
    writer   text NOT NULL,
    owner    text,
    epoch    bigint
);
CREATE FUNCTION fence_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fence_audit (tbl, run_id, writer, owner, epoch)
    SELECT TG_TABLE_NAME, NEW.run_id, current_setting('application_name'), l.owner, l.epoch
    FROM (SELECT 1) AS one LEFT JOIN leases l ON l.run_id = NEW.run_id;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_events AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION fence_audit_row();
CREATE TRIGGER audit_outcomes AFTER UPDATE ON deliveries
    FOR EACH ROW WHEN (NEW.state IS DISTINCT FROM OLD.state OR NEW.attempts IS DISTINCT FROM OLD.attempts)
    EXECUTE FUNCTION fence_audit_row();
CREATE TRIGGER audit_cursor AFTER UPDATE ON runs
    FOR EACH ROW WHEN (NEW.cursor IS DISTINCT FROM OLD.cursor OR NEW.finished_seq IS DISTINCT FROM OLD.finished_seq)
    EXECUTE FUNCTION fence_audit_row();
CREATE TRIGGER audit_threads AFTER INSERT OR UPDATE ON slack_threads
    FOR EACH ROW EXECUTE FUNCTION fence_audit_row();
"#;

/// The runs `node` holds an unexpired lease on, by the server's clock.
async fn owned_by(client: &tokio_postgres::Client, node: &str) -> HashSet<String> {
    client
        .query(
            "SELECT run_id FROM leases WHERE owner = $1 AND expires_at > now()",
            &[&node],
        )
        .await
        .expect("read leases")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A disruption: whom it hit, when, and the runs that replica owned then.
struct Disruption {
    what: &'static str,
    node: &'static str,
    at: Instant,
    runs: HashSet<String>,
}

/// Waits until every run `victim` owned at `at` was delivered by another
/// replica after `at` (or has no event left to deliver).
async fn wait_taken_over(
    db: &tokio_postgres::Client,
    webhook: &Receiver,
    hit: &Disruption,
    last_emitted: &HashMap<String, Instant>,
) {
    // Well past the lease_ttl + 5 s the gaps are held to: a run missing
    // here is stuck, not late.
    wait_for_within(
        Duration::from_secs(40),
        &format!("the runs of {} delivered elsewhere", hit.node),
        || async {
            let moved: HashSet<String> = webhook
                .requests()
                .iter()
                .filter(|r| r.arrived > hit.at && r.extra_header.as_deref() != Some(hit.node))
                .map(|r| run_of(&r.id).to_owned())
                .collect();
            let waiting: Vec<&String> = hit
                .runs
                .iter()
                .filter(|run| !moved.contains(*run) && last_emitted[*run] > hit.at)
                .collect();
            if waiting.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} runs not yet moved: {:?}",
                    waiting.len(),
                    describe_runs(db, &waiting).await
                ))
            }
        },
    )
    .await;
}

/// The lease and backlog of each run, for a failure message.
async fn describe_runs(db: &tokio_postgres::Client, runs: &[&String]) -> Vec<String> {
    let ids: Vec<&str> = runs.iter().map(|r| r.as_str()).collect();
    let rows = db
        .query(
            "SELECT l.run_id, l.owner, l.epoch, (extract(epoch FROM l.expires_at - now()) * 1000)::bigint,
                    r.state, r.cursor,
                    (SELECT count(*) FROM deliveries d WHERE d.run_id = l.run_id AND d.state = 0)
             FROM leases l JOIN runs r USING (run_id) WHERE l.run_id = ANY($1) ORDER BY 1",
            &[&ids],
        )
        .await;
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|row| {
                format!(
                    "{} owner {:?} epoch {} expires in {:?} ms, state {}, cursor {}, pending {}",
                    row.get::<_, String>(0),
                    row.get::<_, Option<String>>(1),
                    row.get::<_, i64>(2),
                    row.get::<_, Option<i64>>(3),
                    row.get::<_, String>(4),
                    row.get::<_, i64>(5),
                    row.get::<_, i64>(6),
                )
            })
            .collect(),
        Err(e) => vec![e.to_string()],
    }
}

fn run_of(id: &str) -> &str {
    id.split(':').next().unwrap_or_default()
}

/// Per run the disruption hit (and that still had events coming well past
/// the takeover deadline), the time from the disruption to its first
/// arrival from another replica.
fn takeover_gaps(
    webhook: &Receiver,
    hit: &Disruption,
    last_emitted: &HashMap<String, Instant>,
) -> Vec<(String, Duration)> {
    let requests = webhook.requests();
    let mut gaps = Vec::new();
    for run in &hit.runs {
        if last_emitted[run] < hit.at + LEASE_TTL + TAKEOVER_SLACK + Duration::from_secs(2) {
            continue;
        }
        let first = requests
            .iter()
            .filter(|r| r.arrived > hit.at && r.extra_header.as_deref() != Some(hit.node))
            .find(|r| run_of(&r.id) == run);
        if let Some(r) = first {
            gaps.push((run.clone(), r.arrived - hit.at));
        }
    }
    gaps.sort_by_key(|(_, gap)| *gap);
    gaps
}

fn sorted(runs: &HashSet<String>) -> Vec<&String> {
    let mut runs: Vec<&String> = runs.iter().collect();
    runs.sort();
    runs
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_kills_and_a_pause_losing_and_repeating_nothing_unbounded() {
    let Some(pg) = PgServer::start() else { return };
    let started = Instant::now();
    let runs: Vec<String> = (0..RUNS).map(|i| format!("fo-{i:02}")).collect();
    let scripts = runs
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut run = scripted(id, run_events(i));
            run.interval = INTERVAL;
            run
        })
        .collect();
    let sim = sim_with(scripts).await;
    let sim_start = Instant::now();
    let last_emitted: HashMap<String, Instant> = runs
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let count = run_events(i).len() as u32;
            (id.clone(), sim_start + INTERVAL * count)
        })
        .collect();
    let cluster = Cluster {
        sim,
        webhook: Receiver::start().await,
        slack: FakeSlack::start().await,
        dir: KeptOnFailure(Some(tempfile::tempdir().expect("temp dir"))),
        runs: runs.clone(),
    };

    // The schema first (as any replica would migrate it), then the audit
    // on its tables, then the replicas.
    let bystander = Replica {
        node: "test".into(),
        lease_ttl: LEASE_TTL,
        share_slack: 0,
    };
    drop(PgStore::open(&pg.url(), bystander).await.expect("migrate"));
    let db = pg.client().await;
    db.batch_execute(AUDIT)
        .await
        .expect("install the fence audit");

    let mut nodes: Vec<Node> = NODES.iter().map(|n| cluster.node(&pg, n)).collect();
    for node in &mut nodes {
        node.spawn();
    }
    let webhook = &cluster.webhook;
    wait_for("every replica delivering", || {
        for node in nodes.iter_mut() {
            node.assert_alive();
        }
        async move {
            let senders: HashSet<String> = webhook
                .requests()
                .iter()
                .filter_map(|r| r.extra_header.clone())
                .collect();
            if senders.len() == NODES.len() {
                Ok(())
            } else {
                Err(format!("delivering so far: {senders:?}"))
            }
        }
    })
    .await;
    println!(
        "failover: 3 replicas delivering after {:?}",
        started.elapsed()
    );

    let mut disruptions = Vec::new();
    for (index, what) in [(0, "SIGKILL"), (1, "SIGKILL")] {
        let node = NODES[index];
        let held = owned_by(&db, node).await;
        nodes[index].kill();
        let hit = Disruption {
            what,
            node,
            at: Instant::now(),
            runs: held,
        };
        println!(
            "failover: {what} {node} at {} ms holding {} runs: {:?}",
            millis(hit.at - started),
            hit.runs.len(),
            sorted(&hit.runs)
        );
        wait_taken_over(&db, &cluster.webhook, &hit, &last_emitted).await;
        disruptions.push(hit);
        nodes[index].spawn();
        let db = &db;
        wait_for(&format!("{node} back with a share of the runs"), || {
            nodes[index].assert_alive();
            async move {
                let held = owned_by(db, node).await.len();
                if held > 0 {
                    Ok(())
                } else {
                    Err(format!("{node} holds {held}"))
                }
            }
        })
        .await;
    }

    let paused = 2;
    let node = NODES[paused];
    let held = owned_by(&db, node).await;
    nodes[paused].signal("STOP");
    let hit = Disruption {
        what: "SIGSTOP",
        node,
        at: Instant::now(),
        runs: held,
    };
    println!(
        "failover: SIGSTOP {node} at {} ms holding {} runs: {:?}",
        millis(hit.at - started),
        hit.runs.len(),
        sorted(&hit.runs)
    );
    wait_taken_over(&db, &cluster.webhook, &hit, &last_emitted).await;
    wait_for("the paused replica's leases taken over", || {
        leases_moved_check(&db, node)
    })
    .await;
    nodes[paused].signal("CONT");
    println!(
        "failover: SIGCONT {node} at {} ms",
        millis(started.elapsed())
    );
    let resumed: String = db
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .expect("server time")
        .get(0);
    disruptions.push(hit);

    // Everything delivered.
    let expected = expected_ids(&cluster.sim, &runs_ids(&runs));
    let want: HashSet<&String> = expected.values().flatten().collect();
    let want_slack: HashSet<String> = expected
        .iter()
        .flat_map(|(run, ids)| slack_ids(&cluster.sim, run, ids))
        .collect();
    let (want, want_slack, slack) = (&want, &want_slack, &cluster.slack);
    wait_within_long("every event at each sink", || {
        for node in nodes.iter_mut() {
            node.assert_alive();
        }
        async move {
            let hooks: HashSet<String> = webhook.accepted().into_iter().map(|r| r.id).collect();
            let chats: HashSet<String> = slack_replies(slack)
                .into_iter()
                .map(|(text, _, _)| text)
                .collect();
            let got_hooks = want.iter().filter(|id| hooks.contains(**id)).count();
            let got_chats = want_slack.iter().filter(|id| chats.contains(*id)).count();
            if got_hooks == want.len() && got_chats == want_slack.len() {
                Ok(())
            } else {
                Err(format!(
                    "webhook {got_hooks}/{}, slack {got_chats}/{}",
                    want.len(),
                    want_slack.len()
                ))
            }
        }
    })
    .await;
    println!(
        "failover: every event delivered after {:?}",
        started.elapsed()
    );
    for node in &mut nodes {
        let status = node.stop().await;
        assert!(
            status.success(),
            "{} exits 0 on SIGTERM: {status}\n{}",
            node.name,
            node.log_tail()
        );
    }

    // The figures first, so a failing check still shows them.
    report_gaps(&cluster.webhook, &disruptions, &last_emitted);
    check_fence_audit(&db, node, &resumed).await;
    check_webhook(&cluster.webhook, &expected, &disruptions);
    check_slack(&cluster.slack, &expected, want_slack, started);
}

async fn leases_moved_check(db: &tokio_postgres::Client, node: &str) -> Result<(), String> {
    let still = owned_by(db, node).await;
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!("{node} still owns {} runs", still.len()))
    }
}

fn runs_ids(runs: &[String]) -> Vec<&str> {
    runs.iter().map(String::as_str).collect()
}

async fn wait_within_long<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    wait_for_within(Duration::from_secs(300), what, check).await
}

/// Per run, the ids every webhook must get, in order: the script's events,
/// then `run_finished`.
fn expected_ids(sim: &Simulator, runs: &[&str]) -> BTreeMap<String, Vec<String>> {
    runs.iter()
        .map(|run| {
            let script = sim.script(run);
            let mut ids: Vec<String> = script.iter().map(|e| format!("{run}:{}", e.0)).collect();
            let last = script.last().map_or(0, |e| e.0);
            ids.push(format!("{run}:finished:{last}"));
            (run.to_string(), ids)
        })
        .collect()
}

/// The ids routed to Slack for a run, in order: its milestone and its finish.
fn slack_ids(sim: &Simulator, run: &str, ids: &[String]) -> Vec<String> {
    let script = sim.script(run);
    let mut out: Vec<String> = script
        .iter()
        .filter(|e| e.1 == MILESTONE)
        .map(|e| format!("{run}:{}", e.0))
        .collect();
    out.extend(ids.last().cloned());
    out
}

/// Slack replies (`chat.postMessage` with a `thread_ts`): text (the event
/// id, by the template), thread, and the bot token that sent it.
fn slack_replies(slack: &FakeSlack) -> Vec<(String, String, String)> {
    slack
        .calls("chat.postMessage")
        .into_iter()
        .filter(|c| c.body.get("thread_ts").is_some())
        .map(|c| {
            (
                c.body["text"].as_str().unwrap_or_default().to_owned(),
                c.body["thread_ts"].as_str().unwrap_or_default().to_owned(),
                c.auth.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Every disruption can catch at most one accepted but unrecorded
/// delivery of each run its victim owned.
fn check_webhook(
    webhook: &Receiver,
    expected: &BTreeMap<String, Vec<String>>,
    disruptions: &[Disruption],
) {
    let accepted = webhook.accepted();
    for r in &accepted {
        assert!(r.verified_new, "{} is signed", r.id);
        assert_eq!(
            r.json()["data"]["id"],
            r.id.as_str(),
            "body id = webhook-id"
        );
    }
    let mut per_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &accepted {
        per_run
            .entry(run_of(&r.id).to_owned())
            .or_default()
            .push(r.id.clone());
    }
    let total_allowed: usize = disruptions.iter().map(|d| d.runs.len()).sum();
    let mut total_repeats = 0;
    for (run, want) in expected {
        let got = per_run.get(run).cloned().unwrap_or_default();
        let mut seen = HashSet::new();
        let firsts: Vec<String> = got
            .iter()
            .filter(|id| seen.insert((*id).clone()))
            .cloned()
            .collect();
        assert_eq!(
            &firsts, want,
            "webhook, run {run}: every event, first arrivals in order"
        );
        let repeats = got.len() - firsts.len();
        let allowed = disruptions.iter().filter(|d| d.runs.contains(run)).count();
        assert!(
            repeats <= allowed,
            "webhook, run {run}: {repeats} repeats, but its owners were disrupted {allowed} times: {got:?}"
        );
        total_repeats += repeats;
    }
    assert!(total_repeats <= total_allowed);
    println!(
        "failover: webhook {} requests accepted, {total_repeats} repeats (at most {total_allowed} allowed)",
        accepted.len()
    );
}

/// A run's Slack calls, one line each, for a failure message.
fn calls_of_run(slack: &FakeSlack, run: &str, began: Instant) -> Vec<String> {
    slack
        .all_calls()
        .iter()
        .enumerate()
        .filter(|(_, c)| c.body.to_string().contains(run))
        .map(|(i, c)| {
            format!(
                "{} ms {} {} ts {} thread_ts {} text {}",
                c.at.saturating_duration_since(began).as_millis(),
                c.auth.as_deref().unwrap_or("-"),
                c.path,
                i + 1,
                c.body["thread_ts"],
                c.body["text"]
            )
        })
        .collect()
}

/// One root per run; replies in its thread, first arrivals in order.
fn check_slack(
    slack: &FakeSlack,
    expected: &BTreeMap<String, Vec<String>>,
    want: &HashSet<String>,
    began: Instant,
) {
    let posts = slack.calls("chat.postMessage");
    // The fake answers its k-th call with ts 1700000000.{k}: a root's `ts`
    // is read back from its place among all calls.
    let mut roots: HashMap<String, Vec<String>> = HashMap::new();
    for (index, call) in slack.all_calls().iter().enumerate() {
        if call.path == "chat.postMessage" && call.body.get("thread_ts").is_none() {
            let run = call.body["metadata"]["event_payload"]["run_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            roots
                .entry(run)
                .or_default()
                .push(format!("1700000000.{:06}", index + 1));
        }
    }
    for run in expected.keys() {
        let of_run = roots.get(run).map_or(0, Vec::len);
        assert_eq!(
            of_run,
            1,
            "slack: one root for run {run}, found {of_run}; its calls (ms after the test began):\n{}",
            calls_of_run(slack, run, began).join("\n")
        );
    }
    let replies = slack_replies(slack);
    let mut per_run: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (text, thread, _) in &replies {
        assert!(
            want.contains(text),
            "slack reply with an unexpected text {text:?}"
        );
        per_run
            .entry(run_of(text).to_owned())
            .or_default()
            .push((text.clone(), thread.clone()));
    }
    for (run, got) in &per_run {
        let root = &roots[run][0];
        assert!(
            got.iter().all(|(_, thread)| thread == root),
            "slack, run {run}: every reply in the run's one thread {root}: {got:?}"
        );
        let mut seen = HashSet::new();
        let firsts: Vec<&String> = got
            .iter()
            .map(|(t, _)| t)
            .filter(|t| seen.insert(*t))
            .collect();
        let mut wanted: Vec<&String> = want.iter().filter(|id| run_of(id) == run).collect();
        wanted.sort_by_key(|id| !id.contains(":finished:"));
        wanted.reverse();
        assert_eq!(firsts, wanted, "slack, run {run}: first arrivals in order");
    }
    println!(
        "failover: slack {} posts ({} roots, {} replies)",
        posts.len(),
        roots.values().map(Vec::len).sum::<usize>(),
        replies.len()
    );
}

/// No write was accepted from a connection that was not its run's lease
/// owner; prints who wrote what, and what the paused replica wrote after
/// it was resumed.
async fn check_fence_audit(db: &tokio_postgres::Client, paused: &str, resumed: &str) {
    let stale = db
        .query(
            "SELECT tbl, run_id, writer, owner, epoch, at::text FROM fence_audit \
             WHERE owner IS DISTINCT FROM substr(writer, 9) ORDER BY id LIMIT 20",
            &[],
        )
        .await
        .expect("read the audit");
    let described: Vec<String> = stale
        .iter()
        .map(|row| {
            format!(
                "{} {} by {} while {:?} (epoch {:?}) owned it, at {}",
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, Option<String>>(3),
                row.get::<_, Option<i64>>(4),
                row.get::<_, String>(5),
            )
        })
        .collect();
    assert!(
        described.is_empty(),
        "writes accepted from a replica that did not own the run's lease:\n{}",
        described.join("\n")
    );
    let counts = db
        .query(
            "SELECT writer, tbl, count(*) FROM fence_audit GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("count the audit");
    let counts: Vec<String> = counts
        .iter()
        .map(|row| {
            format!(
                "{}/{}: {}",
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, i64>(2)
            )
        })
        .collect();
    println!(
        "failover: accepted writes by replica and table, all by the lease's owner: {counts:?}"
    );
    let after: i64 = db
        .query_one(
            "SELECT count(*) FROM fence_audit WHERE writer = $1 AND at > $2::text::timestamptz",
            &[&format!("runhook-{paused}"), &resumed],
        )
        .await
        .expect("count the paused replica's writes")
        .get(0);
    println!(
        "failover: {paused} wrote {after} rows after SIGCONT, each under a lease it held at the time"
    );
}

/// Prints, per disruption, how long its victim's runs took to resume on
/// another replica; then holds each run to `lease_ttl` + 5 s.
fn report_gaps(
    webhook: &Receiver,
    disruptions: &[Disruption],
    last_emitted: &HashMap<String, Instant>,
) {
    let mut late = Vec::new();
    for hit in disruptions {
        let gaps = takeover_gaps(webhook, hit, last_emitted);
        assert!(
            !gaps.is_empty(),
            "{} {}: no run still flowing to measure the takeover on (the schedule overran the runs)",
            hit.what,
            hit.node
        );
        let values: Vec<u128> = gaps.iter().map(|(_, g)| millis(*g)).collect();
        println!(
            "failover: {} {}: {} runs resumed elsewhere after min {} ms, median {} ms, max {} ms (lease_ttl {} s)",
            hit.what,
            hit.node,
            gaps.len(),
            values[0],
            values[values.len() / 2],
            values[values.len() - 1],
            LEASE_TTL.as_secs()
        );
        late.extend(
            gaps.into_iter()
                .filter(|(_, gap)| *gap > LEASE_TTL + TAKEOVER_SLACK)
                .map(|(run, gap)| format!("{} {}: {run} after {gap:?}", hit.what, hit.node)),
        );
    }
    assert!(
        late.is_empty(),
        "runs resumed later than lease_ttl + 5 s: {late:?}"
    );
}
