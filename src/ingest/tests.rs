//! Unit tests of the ingest helpers: which events are new, the 404 window,
//! run labels.

use super::*;

fn event(sequence: i64) -> Event {
    serde_json::from_str(&format!(
        r#"{{"sequence":{sequence},"eventType":"X","payload":{{}}}}"#
    ))
    .unwrap()
}

#[test]
fn only_new_events_ascending_once() {
    let events = vec![event(5), event(3), event(9), event(5), event(2)];
    let kept: Vec<i64> = new_events(events, 3).iter().map(|e| e.sequence).collect();
    assert_eq!(kept, [5, 9]);
}

#[test]
fn a_404_is_confirmed_over_the_whole_window() {
    let mut confirm = NotFoundConfirm::new(Duration::from_secs(60));
    let waits: Vec<Duration> = std::iter::from_fn(|| confirm.next()).collect();
    assert_eq!(
        waits.iter().map(Duration::as_secs).collect::<Vec<_>>(),
        [4, 8, 16, 32]
    );
    assert_eq!(waits.iter().sum::<Duration>(), Duration::from_secs(60));
    confirm.reset();
    assert_eq!(confirm.next(), Some(Duration::from_secs(4)));
}

#[test]
fn labels_parse() {
    assert_eq!(parse_labels(&["team=rome".into()]).unwrap()["team"], "rome");
    assert!(parse_labels(&["oops".into()]).is_err());
}
