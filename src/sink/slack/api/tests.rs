//! Unit tests of how Slack's answers (incoming webhook and Web API) become
//! delivery outcomes.

use super::*;

#[test]
fn webhook_answers() {
    assert_eq!(
        classify_webhook(StatusCode::OK, None, "ok"),
        Outcome::Delivered
    );
    assert!(matches!(
        classify_webhook(StatusCode::NOT_FOUND, None, "channel_not_found"),
        Outcome::Permanent { .. }
    ));
    assert!(matches!(
        classify_webhook(StatusCode::GONE, None, "channel_is_archived"),
        Outcome::Permanent { .. }
    ));
    let Outcome::Retry { after, .. } = classify_webhook(StatusCode::TOO_MANY_REQUESTS, None, "")
    else {
        panic!("429 retries")
    };
    assert_eq!(after, Some(DEFAULT_429_WAIT));
    assert!(matches!(
        classify_webhook(StatusCode::INTERNAL_SERVER_ERROR, None, "rollup_error"),
        Outcome::Retry { .. }
    ));
}

#[test]
fn api_answers() {
    let ok = classify_api(
        "chat.postMessage",
        StatusCode::OK,
        None,
        br#"{"ok":true,"ts":"1.2"}"#,
    )
    .unwrap();
    assert_eq!(ok["ts"], "1.2");
    let Err(Outcome::Permanent { error, .. }) = classify_api(
        "chat.postMessage",
        StatusCode::OK,
        None,
        br#"{"ok":false,"error":"not_in_channel"}"#,
    ) else {
        panic!("permanent")
    };
    assert_eq!(error, "slack chat.postMessage: not_in_channel");
    assert!(matches!(
        classify_api(
            "chat.update",
            StatusCode::OK,
            None,
            br#"{"ok":false,"error":"internal_error"}"#
        ),
        Err(Outcome::Retry { .. })
    ));
}
