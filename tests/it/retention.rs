//! Retention: delivered events are pruned after `state.retain`; dead
//! letters stay until replayed or purged.

use runhook::store::{Batch, DeadFilter, Failure, NewEvent, Reader, Store, now_ms};
use serde_json::value::RawValue;

fn events(run: &str, range: std::ops::RangeInclusive<i64>) -> Batch {
    Batch {
        run_id: run.into(),
        events: range
            .map(|sequence| NewEvent {
                sequence,
                event_type: "X".into(),
                payload: RawValue::from_string("{}".into()).unwrap(),
                created_at: None,
                sinks: vec!["ops".into()],
            })
            .collect(),
        run_status: Some("running".into()),
        phase: None,
        finish: None,
    }
}

#[tokio::test]
async fn delivered_events_are_pruned_and_dead_letters_kept_until_purged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = Store::open(&path).unwrap();
    store
        .subscribe("r".into(), Default::default(), "watch", None)
        .await
        .unwrap();
    store.record_batch(events("r", 1..=4)).await.unwrap();
    let reader = Reader::open(&path).unwrap();
    let pending = reader.pending_for_run("ops", "r", 10).await.unwrap();
    let rows: Vec<i64> = pending.iter().map(|p| p.event).collect();
    // 1 and 2 delivered, 3 dead, 4 still pending.
    store
        .mark_delivered("ops".into(), rows[..2].to_vec(), None)
        .await
        .unwrap();
    let dead = Failure {
        events: vec![rows[2]],
        status: Some(500),
        error: "boom".into(),
        next_attempt_at: 0,
        dead: true,
    };
    store.record_failure("ops".into(), dead).await.unwrap();

    // Nothing is old enough yet.
    assert_eq!(store.prune(now_ms() - 60_000).await.unwrap(), (0, 0));
    // Everything is, now: only the delivered ones go.
    assert_eq!(store.prune(now_ms() + 60_000).await.unwrap(), (2, 2));
    let sinks = reader.sinks().await.unwrap();
    assert_eq!((sinks[0].done, sinks[0].dead, sinks[0].pending), (0, 1, 1));
    assert_eq!(reader.dead_letters(None, None).await.unwrap()[0].id, "r:3");
    assert_eq!(
        reader.pending_for_run("ops", "r", 10).await.unwrap()[0].id,
        "r:4"
    );

    // The cursor is untouched: pruned events are not ingested again.
    let again = store.record_batch(events("r", 1..=4)).await.unwrap();
    assert_eq!((again.recorded, again.dropped, again.cursor), (0, 4, 4));

    let purged = store
        .purge_dead(DeadFilter {
            sink: Some("ops".into()),
            ..DeadFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert!(reader.dead_letters(None, None).await.unwrap().is_empty());
}
