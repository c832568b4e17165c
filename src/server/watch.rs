//! `PUT` and `DELETE /v1/watch/{runId}`: follow and stop following a run
//! over HTTP, for the system that starts runs on another machine. They do
//! what `runhook watch` / `unwatch` do (a row in the state database, which
//! the daemon follows), and exist only when `[server] token` is set.
//!
//! Answers: `200` with `{"runId", "watching", "labels"?}`; `400` for a body
//! that is not `{"labels": {"k": "v"}}`; `401` without the bearer token;
//! `404` on `DELETE` of a run the database does not know; `500` when the
//! state database fails.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::store::{self, Subscribed};

/// A watch request is a few labels; nothing bigger is read.
const MAX_BODY: usize = 64 * 1024;

struct Watch {
    state: store::State,
    token: Secret,
}

/// The optional body of `PUT`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchBody {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The watch routes, behind the bearer token.
pub(super) fn routes(state: store::State, token: Secret) -> Router {
    let watch = Arc::new(Watch { state, token });
    Router::new()
        .route("/v1/watch/{run_id}", put(follow).delete(stop_following))
        .route_layer(middleware::from_fn_with_state(watch.clone(), authorize))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(watch)
}

async fn authorize(State(watch): State<Arc<Watch>>, request: Request, next: Next) -> Response {
    if bearer_matches(request.headers(), &watch.token) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({"error": "a valid bearer token is required"})),
    )
        .into_response()
}

/// Compares digests in constant time, so neither the token's bytes nor
/// its length can be learned from how long a refusal takes.
fn bearer_matches(headers: &HeaderMap, token: &Secret) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, given)| given.trim())
    else {
        return false;
    };
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(token.expose().as_bytes());
    given.as_slice().ct_eq(expected.as_slice()).into()
}

async fn follow(
    State(watch): State<Arc<Watch>>,
    Path(run_id): Path<String>,
    body: Bytes,
) -> Response {
    let labels = match parse_body(&body) {
        Ok(body) => body.labels,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let subscribed = watch
        .state
        .subscribe(run_id.clone(), labels.clone(), "watch", None)
        .await;
    match subscribed {
        Ok(Subscribed::Watching) => {
            tracing::info!(run_id = %run_id, "watching (over HTTP)");
            axum::Json(json!({"runId": run_id, "watching": true, "labels": labels})).into_response()
        }
        // Done and delivered: following it again would deliver it twice.
        Ok(Subscribed::Pruned(pruned)) => axum::Json(json!({
            "runId": run_id, "watching": false, "state": "finished (pruned)",
            "status": pruned.status, "cursor": pruned.cursor,
        }))
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn stop_following(State(watch): State<Arc<Watch>>, Path(run_id): Path<String>) -> Response {
    match watch.state.unsubscribe(run_id.clone()).await {
        Ok(true) => {
            tracing::info!(run_id = %run_id, "no longer watching (over HTTP)");
            axum::Json(json!({"runId": run_id, "watching": false})).into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("run {run_id} is not known to this state database"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// An empty body means no labels, as `runhook watch` without `--label`.
fn parse_body(body: &[u8]) -> Result<WatchBody, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(WatchBody::default());
    }
    let parsed: WatchBody = serde_json::from_slice(body)
        .map_err(|e| format!("the body must be {{\"labels\": {{\"key\": \"value\"}}}}: {e}"))?;
    if parsed.labels.keys().any(String::is_empty) {
        return Err("a label key must not be empty".into());
    }
    Ok(parsed)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let token = Secret::new("0123456789abcdef");
        assert!(bearer_matches(
            &with_authorization("Bearer 0123456789abcdef"),
            &token
        ));
        assert!(bearer_matches(
            &with_authorization("bearer 0123456789abcdef"),
            &token
        ));
        for refused in [
            "Bearer 0123456789abcdeF",
            "Bearer 0123456789abcde",
            "Bearer 0123456789abcdef0",
            "Basic 0123456789abcdef",
            "0123456789abcdef",
            "Bearer ",
        ] {
            assert!(
                !bearer_matches(&with_authorization(refused), &token),
                "{refused}"
            );
        }
        assert!(!bearer_matches(&HeaderMap::new(), &token));
    }

    #[test]
    fn the_body_is_optional_labels_only() {
        assert!(parse_body(b"").unwrap().labels.is_empty());
        let body = parse_body(br#"{"labels": {"team": "rome"}}"#).unwrap();
        assert_eq!(body.labels["team"], "rome");
        assert!(parse_body(br#"{"labels": {"team": 1}}"#).is_err());
        assert!(parse_body(br#"{"lables": {}}"#).is_err());
        assert!(parse_body(br#"{"labels": {"": "x"}}"#).is_err());
        assert!(parse_body(b"team=rome").is_err());
    }
}
