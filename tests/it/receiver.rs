//! A real webhook receiver on 127.0.0.1: records every request (any
//! method), verifies signatures with the reference `standardwebhooks`
//! crate and, as a real receiver does, answers 401 to a request that
//! verifies with neither known secret; otherwise it answers as the test
//! scripts it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

pub const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
pub const OLD_SECRET: &str = "whsec_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub user_agent: String,
    pub content_type: String,
    pub extra_header: Option<String>,
    pub body: Bytes,
    /// Which of the known secrets verified the request.
    pub verified_new: bool,
    pub verified_old: bool,
    /// When the request arrived, and when it was answered (after any delay).
    pub arrived: Instant,
    pub at: Instant,
    /// The status answered; 0 while unanswered, or when the sender hung up
    /// before the answer.
    pub answered: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }
}

/// How the receiver answers.
#[derive(Debug, Clone)]
pub enum Answer {
    Status(u16),
    /// 429 with this `Retry-After`.
    TooMany(u64),
    /// 500 with `Retry-After`.
    ErrorRetryAfter(u64),
    /// 302 to /elsewhere.
    Redirect,
    /// This status with a body that never ends (1 KiB every 10 ms).
    Endless(u16),
    /// 401: the request failed Standard Webhooks verification (never
    /// scripted; the receiver answers it by itself).
    Unverified,
}

#[derive(Default)]
struct Inner {
    requests: Vec<Received>,
    /// Answers for the next requests, then `default`.
    script: VecDeque<Answer>,
    default: Option<Answer>,
    /// Every answer waits this long.
    delay: std::time::Duration,
    /// Percent of requests answered 500, spread evenly (deterministic).
    fail_percent: u64,
    counter: u64,
    /// Requests being answered now, and the most at once (overall, per run).
    in_flight: usize,
    peak: usize,
    in_flight_per_run: HashMap<String, usize>,
    peak_per_run: HashMap<String, usize>,
    /// Secrets accepted besides `SECRET` and `OLD_SECRET` (`trust`).
    trusted: Vec<String>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _server: Arc<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .fallback(any(receive))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            inner,
            _server: Arc::new(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Answers for the next requests, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.inner.lock().unwrap().script.extend(answers);
    }

    /// The answer after the script runs out (`None`: 204).
    pub fn set_default(&self, answer: Option<Answer>) {
        self.inner.lock().unwrap().default = answer;
    }

    /// Also accepts requests signed with `secret` (one runhook generated).
    pub fn trust(&self, secret: &str) {
        self.inner.lock().unwrap().trusted.push(secret.to_owned());
    }

    /// Fails this percent of requests with a 500.
    pub fn set_fail_percent(&self, percent: u64) {
        self.inner.lock().unwrap().fail_percent = percent;
    }

    /// Every answer waits `delay` (a slow receiver).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.inner.lock().unwrap().delay = delay;
    }

    /// The most requests answered at once: overall, and per run (the part
    /// of `webhook-id` before the first `:`).
    pub fn peaks(&self) -> (usize, HashMap<String, usize>) {
        let inner = self.inner.lock().unwrap();
        (inner.peak, inner.peak_per_run.clone())
    }

    /// Requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .collect()
    }
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn receive(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let verify = |secret: &str| {
        standardwebhooks::Webhook::new(secret)
            .expect("secret")
            .verify(&body, &headers)
            .is_ok()
    };
    let (verified_new, verified_old) = (verify(SECRET), verify(OLD_SECRET));
    let trusted = inner.lock().unwrap().trusted.clone();
    let verified_trusted = trusted.iter().any(|secret| verify(secret));
    let run = header(&headers, "webhook-id")
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let arrived = Instant::now();
    // Recorded on arrival: a request whose sender hangs up before the
    // answer stays in the list, `answered` 0.
    let (index, delay) = {
        let mut inner = inner.lock().unwrap();
        inner.in_flight += 1;
        inner.peak = inner.peak.max(inner.in_flight);
        let now = *inner
            .in_flight_per_run
            .entry(run.clone())
            .and_modify(|n| *n += 1)
            .or_insert(1);
        let peak = inner.peak_per_run.entry(run.clone()).or_default();
        *peak = (*peak).max(now);
        inner.requests.push(Received {
            method: method.to_string(),
            path: uri.path().to_owned(),
            id: header(&headers, "webhook-id"),
            timestamp: header(&headers, "webhook-timestamp"),
            signature: header(&headers, "webhook-signature"),
            user_agent: header(&headers, "user-agent"),
            content_type: header(&headers, "content-type"),
            extra_header: headers
                .get("x-team")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body,
            verified_new,
            verified_old,
            arrived,
            at: arrived,
            answered: 0,
        });
        (inner.requests.len() - 1, inner.delay)
    };
    tokio::time::sleep(delay).await;
    let mut inner = inner.lock().unwrap();
    inner.in_flight -= 1;
    if let Some(n) = inner.in_flight_per_run.get_mut(&run) {
        *n -= 1;
    }
    inner.counter += 1;
    let flaky = (inner.counter * 37) % 100 < inner.fail_percent;
    let answer = if verified_new || verified_old || verified_trusted {
        inner
            .script
            .pop_front()
            .or_else(|| inner.default.clone())
            .or_else(|| flaky.then_some(Answer::Status(500)))
    } else {
        Some(Answer::Unverified)
    };
    let response = match &answer {
        None => StatusCode::NO_CONTENT.into_response(),
        Some(Answer::Unverified) => (
            StatusCode::UNAUTHORIZED,
            "signature does not verify (Standard Webhooks)",
        )
            .into_response(),
        Some(Answer::Status(code)) => (
            StatusCode::from_u16(*code).unwrap(),
            format!("receiver says {code}"),
        )
            .into_response(),
        Some(Answer::TooMany(secs)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            "slow down",
        )
            .into_response(),
        Some(Answer::ErrorRetryAfter(secs)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::RETRY_AFTER, secs.to_string())],
            "busy",
        )
            .into_response(),
        Some(Answer::Redirect) => {
            (StatusCode::FOUND, [(header::LOCATION, "/elsewhere")]).into_response()
        }
        Some(Answer::Endless(code)) => {
            let chunks = futures::stream::unfold((), |()| async {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(vec![b'x'; 1024])),
                    (),
                ))
            });
            (
                StatusCode::from_u16(*code).unwrap(),
                axum::body::Body::from_stream(chunks),
            )
                .into_response()
        }
    };
    let request = &mut inner.requests[index];
    request.at = Instant::now();
    request.answered = response.status().as_u16();
    response
}
