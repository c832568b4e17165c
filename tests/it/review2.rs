//! Second adversarial review (changes after a53de8e): defects reproduced,
//! each `#[ignore]`d until fixed.

use std::sync::Arc;

use runhook::store::{Batch, Failure, NewEvent, Reader, Store, TimeRange, now_ms};
use serde_json::value::RawValue;

fn batch(run: &str, sequences: std::ops::RangeInclusive<i64>, sinks: &[&str]) -> Batch {
    Batch {
        run_id: run.into(),
        events: sequences
            .map(|sequence| NewEvent {
                sequence,
                event_type: "LOG".into(),
                payload: RawValue::from_string("{}".into()).unwrap(),
                created_at: None,
                sinks: sinks.iter().map(|s| Arc::from(*s)).collect(),
            })
            .collect(),
        run_status: Some("running".into()),
        phase: None,
        finish: None,
        stalled: None,
    }
}

/// D1. `backfill` decides "the sink already has it" (and, since the fix in
/// `newest_with_a_row`, "the sink has a later event of this run") from the
/// sink's delivery rows. Retention deletes a sink's *delivered* rows after
/// `state.retain`, but keeps the event itself while another sink's dead
/// letter (kept until purged) or pending row refers to it. A backfill of the
/// first sink then finds no row at all for the run and queues again an
/// event the sink received long ago: delivered twice (a new attempt, not a
/// crash between 2xx and record), and after later events of its run that
/// the sink already got (per-run order). README: "queues a delivery ... where
/// the sink has none for that event yet, so running it twice queues nothing
/// the second time".
#[tokio::test]
#[ignore = "reproduces defect D1: backfill re-queues events a sink received once retention pruned its delivered rows"]
async fn backfill_does_not_resend_what_the_sink_received_before_retention_pruned_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = Store::open(&path).unwrap();
    store
        .subscribe("r".into(), Default::default(), "watch", None)
        .await
        .unwrap();
    // Events 1 and 2 of run r go to `archive` and `ops`.
    store
        .record_batch(batch("r", 1..=2, &["archive", "ops"]))
        .await
        .unwrap();
    let reader = Reader::open(&path).unwrap();
    let rows: Vec<i64> = reader
        .pending_for_run("archive", "r", 10)
        .await
        .unwrap()
        .iter()
        .map(|p| p.event)
        .collect();
    assert_eq!(rows.len(), 2);
    // `archive` received both; `ops` received 2 and dead-lettered 1.
    store
        .mark_delivered("archive".into(), rows.clone(), None)
        .await
        .unwrap();
    store
        .mark_delivered("ops".into(), vec![rows[1]], None)
        .await
        .unwrap();
    let dead = Failure {
        events: vec![rows[0]],
        status: Some(404),
        error: "HTTP 404".into(),
        next_attempt_at: 0,
        dead: true,
    };
    store.record_failure("ops".into(), dead).await.unwrap();
    // `state.retain` later: the delivered rows go; event 1 stays, for the
    // dead letter of `ops`.
    let (deliveries, events) = store.prune(now_ms() + 60_000).await.unwrap();
    assert_eq!((deliveries, events), (3, 1), "r:2 pruned, r:1 kept");

    // The operator backfills `archive` (say, a route now gives it more
    // event types) over a range that reaches r:1.
    let everything = TimeRange {
        since: 0,
        until: i64::MAX,
    };
    let done = store
        .backfill(Arc::from("archive"), everything, None, |_| true)
        .await
        .unwrap();
    let queued: Vec<String> = reader
        .pending_in_order("archive", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert!(
        queued.is_empty() && done.queued == 0,
        "`archive` received r:1 (and r:2 after it) before retention; backfill queued it again ({done:?}): {queued:?}"
    );
}
