//! The sink against a local Slack Web API on 127.0.0.1: what it sends when
//! the run stops being this process's while it waits for the rate limit.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path;
use axum::routing::post;
use futures::future::BoxFuture;

use super::*;

/// Thread roots in memory; the run is this process's until `owned_until`
/// (what `Ownership` answers for a lease whose trust lapses then).
struct Book {
    owned_until: Instant,
    kept: Mutex<HashMap<String, ThreadRoot>>,
}

impl ThreadBook for Book {
    fn thread<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ThreadRoot>, ThreadBookError>> {
        Box::pin(async move { Ok(self.kept.lock().unwrap().get(run_id).cloned()) })
    }

    fn may_send(&self, _run_id: &str) -> bool {
        Instant::now() < self.owned_until
    }

    fn keep<'a>(
        &'a self,
        run_id: &'a str,
        root: ThreadRoot,
    ) -> BoxFuture<'a, Result<(), ThreadBookError>> {
        Box::pin(async move {
            self.kept.lock().unwrap().insert(run_id.to_owned(), root);
            Ok(())
        })
    }
}

/// A Slack Web API that answers `ok` and logs the methods called.
async fn fake_slack() -> (reqwest::Url, Arc<Mutex<Vec<String>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    let app = Router::new().route(
        "/api/{method}",
        post(move |Path(method): Path<String>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(method);
                axum::Json(json!({"ok": true, "channel": "C1", "ts": "1700000000.000001"}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let base = reqwest::Url::parse(&format!("http://{addr}/api/")).unwrap();
    (base, calls)
}

fn event(run_id: &str) -> Event<'_> {
    Event {
        id: "evt_1",
        run_id,
        sequence: Some(1),
        event_type: "PHASE_STARTED",
        payload: "{}",
        labels: "{}",
        created_at: None,
        seen_at: 0,
        run_status: Some("running"),
        phase: Some("build"),
    }
}

/// The delivery engine checks the run's lease before a send, but the
/// sink's token bucket (a second per message) can outlast it: a replica
/// paused holding the run then posted a second root beside its new
/// owner's. The sink asks again after the wait, and posts nothing.
#[tokio::test]
async fn a_run_lost_during_the_rate_limit_wait_gets_no_root_and_no_reply() {
    let (api_base, calls) = fake_slack().await;
    let config = SlackConfig {
        mode: SlackMode::Bot {
            token: Secret::new("xoxb-test"),
            channel: "C1".into(),
        },
        templates: Templates::default(),
        api_base,
    };
    let book = Arc::new(Book {
        owned_until: Instant::now() + Duration::from_millis(300),
        kept: Mutex::new(HashMap::new()),
    });
    let sink = SlackSink::new("chat".into(), &config, book.clone()).unwrap();
    // The bucket's one token goes to another call; the run's root waits ~1 s.
    assert!(sink.bucket.check().is_ok());

    let outcome = sink.send(&event("r1")).await;

    assert!(
        matches!(outcome, Outcome::Retry { .. }),
        "sent for a run no longer owned: {outcome:?}"
    );
    assert_eq!(
        *calls.lock().unwrap(),
        Vec::<String>::new(),
        "Slack called after the run was lost"
    );
}
