//! What `Store::record_batch` promises its callers, checked through the
//! store's public API on a real database: these tests kill the mutants of
//! the recording code that the rest of the suite let live (README,
//! Development: mutation testing).

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::broadcast::error::TryRecvError;

use crate::store::{Batch, Finish, NewEvent, Reader, Recorded, Store};

const RUN: &str = "run-1";

/// A fresh store with `RUN` subscribed, and a reader on it; the directory
/// lives as long as the test holds it.
async fn store_with_run() -> (tempfile::TempDir, Store, Reader) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).unwrap();
    store
        .subscribe(RUN.into(), Default::default(), "watch", None)
        .await
        .unwrap();
    let reader = store.reader().unwrap();
    (dir, store, reader)
}

fn event(sequence: i64, sinks: &[&str]) -> NewEvent {
    NewEvent {
        sequence,
        event_type: "STEP".into(),
        payload: RawValue::from_string(format!(r#"{{"n":{sequence}}}"#)).unwrap(),
        created_at: None,
        sinks: sinks.iter().map(|s| Arc::from(*s)).collect(),
    }
}

fn batch(events: Vec<NewEvent>, finish: Option<Finish>) -> Batch {
    Batch {
        run_id: RUN.into(),
        events,
        run_status: Some("running".into()),
        phase: None,
        finish,
        stalled: None,
    }
}

fn failed(sinks: &[&str]) -> Finish {
    Finish {
        status: "failed".into(),
        error_message: Some("boom".into()),
        cancel_reason: None,
        sinks: sinks.iter().map(|s| Arc::from(*s)).collect(),
    }
}

/// Every event recorded for `RUN`, as (id, sequence, payload).
async fn recorded_events(reader: &Reader) -> Vec<(String, Option<i64>, String)> {
    reader
        .events_after(0, Some(RUN.into()), None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.sequence, e.payload))
        .collect()
}

fn sinks(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|s| Arc::from(*s)).collect()
}

/// Delivery loops wake on this announcement rather than scanning the
/// table: a batch that queued deliveries must name its run and each sink
/// it queued for, once.
#[tokio::test]
async fn a_batch_that_queues_deliveries_announces_its_run_and_each_sink_once() {
    let (_dir, store, _reader) = store_with_run().await;
    let mut new_work = store.new_work();
    let recorded = store
        .record_batch(batch(
            vec![event(1, &["ops", "chat"]), event(2, &["chat"])],
            None,
        ))
        .await
        .unwrap();
    assert_eq!(recorded.routed, sinks(&["ops", "chat"]));
    let work = new_work.try_recv().expect("the batch announced new work");
    assert_eq!(&*work.run_id, RUN);
    assert_eq!(work.sinks, sinks(&["ops", "chat"]));
    assert!(
        matches!(new_work.try_recv(), Err(TryRecvError::Empty)),
        "one announcement per batch"
    );
}

/// Nothing queued, nothing announced: an empty announcement would wake
/// every delivery loop of the run for nothing.
#[tokio::test]
async fn a_batch_that_routes_nowhere_announces_nothing() {
    let (_dir, store, reader) = store_with_run().await;
    let mut new_work = store.new_work();
    let recorded = store
        .record_batch(batch(vec![event(1, &[])], None))
        .await
        .unwrap();
    assert_eq!(recorded.recorded, 1, "the event is recorded all the same");
    assert!(recorded.routed.is_empty());
    assert!(matches!(new_work.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(recorded_events(&reader).await.len(), 1);
}

/// DESIGN.md guarantee 1: an event whose sequence is not above the cursor
/// is dropped whatever the server sent, and counted as dropped (ingest
/// reports the count), while the new ones are recorded and counted.
#[tokio::test]
async fn events_at_or_below_the_cursor_are_dropped_and_counted() {
    let (_dir, store, reader) = store_with_run().await;
    let first = store
        .record_batch(batch(
            vec![event(1, &["ops"]), event(2, &["ops"]), event(3, &["ops"])],
            None,
        ))
        .await
        .unwrap();
    assert_eq!(
        first,
        Recorded {
            cursor: 3,
            recorded: 3,
            dropped: 0,
            routed: sinks(&["ops"]),
        }
    );
    // The server sends 2 and 3 again, then 4 and 5.
    let again = store
        .record_batch(batch(
            vec![
                event(2, &["ops"]),
                event(3, &["ops"]),
                event(4, &["ops"]),
                event(5, &["ops"]),
            ],
            None,
        ))
        .await
        .unwrap();
    assert_eq!(
        again,
        Recorded {
            cursor: 5,
            recorded: 2,
            dropped: 2,
            routed: sinks(&["ops"]),
        }
    );
    let ids: Vec<String> = recorded_events(&reader)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    let expected: Vec<String> = (1..=5).map(|n| format!("{RUN}:{n}")).collect();
    assert_eq!(ids, expected, "each event once, in order");
    let pending = reader.pending_for_run("ops", RUN, 100).await.unwrap();
    assert_eq!(pending.len(), 5, "one delivery per event");
}

/// A whole batch already recorded (a page fetched twice) changes nothing
/// and says so: nothing recorded, every event dropped, cursor kept.
#[tokio::test]
async fn a_batch_entirely_at_or_below_the_cursor_records_nothing() {
    let (_dir, store, reader) = store_with_run().await;
    store
        .record_batch(batch(vec![event(1, &["ops"]), event(2, &["ops"])], None))
        .await
        .unwrap();
    let mut new_work = store.new_work();
    let again = store
        .record_batch(batch(vec![event(1, &["ops"]), event(2, &["ops"])], None))
        .await
        .unwrap();
    assert_eq!(
        again,
        Recorded {
            cursor: 2,
            recorded: 0,
            dropped: 2,
            routed: vec![],
        }
    );
    assert!(matches!(new_work.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(recorded_events(&reader).await.len(), 2);
}

/// DESIGN.md, event ids and payloads: a finish records one `run_finished`
/// whose id and `lastSequence` are the cursor after the batch's events, with
/// no sequence, and the payload fields in the documented order.
#[tokio::test]
async fn a_finish_records_one_run_finished_at_the_cursor() {
    let (_dir, store, reader) = store_with_run().await;
    let recorded = store
        .record_batch(batch(
            vec![event(1, &["ops"]), event(2, &["ops"])],
            Some(failed(&["chat"])),
        ))
        .await
        .unwrap();
    assert_eq!(
        recorded,
        Recorded {
            cursor: 2,
            recorded: 3,
            dropped: 0,
            routed: sinks(&["ops", "chat"]),
        }
    );
    let events = recorded_events(&reader).await;
    assert_eq!(
        events.last(),
        Some(&(
            format!("{RUN}:finished:2"),
            None,
            r#"{"status":"failed","errorMessage":"boom","lastSequence":2}"#.to_owned()
        ))
    );
    let chat = reader.pending_for_run("chat", RUN, 10).await.unwrap();
    assert_eq!(chat.len(), 1, "the finish goes to its own sinks only");
    assert_eq!(chat[0].event_type, "run_finished");
    let run = &reader.watched_runs().await.unwrap()[0];
    assert_eq!((run.state.as_str(), run.cursor), ("finished", 2));
}

/// A finish seen again at the same cursor (the `finished_recheck` poll)
/// must not record a second `run_finished`: its id is taken.
#[tokio::test]
async fn a_finish_seen_again_at_the_same_cursor_records_nothing() {
    let (_dir, store, reader) = store_with_run().await;
    store
        .record_batch(batch(vec![event(1, &["ops"])], Some(failed(&["chat"]))))
        .await
        .unwrap();
    let mut new_work = store.new_work();
    let again = store
        .record_batch(batch(vec![], Some(failed(&["chat"]))))
        .await
        .unwrap();
    assert_eq!(
        again,
        Recorded {
            cursor: 1,
            recorded: 0,
            dropped: 0,
            routed: vec![],
        }
    );
    assert!(matches!(new_work.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(recorded_events(&reader).await.len(), 2);
    assert_eq!(reader.pending_count("chat").await.unwrap(), 1);
}
