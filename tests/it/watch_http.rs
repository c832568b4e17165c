//! Following runs over HTTP: `PUT` / `DELETE /v1/watch/{runId}` on a
//! running daemon's server, with and without the bearer token, and their
//! absence when no token is configured.

use std::time::Duration;

use reqwest::StatusCode;

use crate::support::*;

const TOKEN: &str = "watch-token-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A daemon with no config runs and a server on a free port; `server_keys`
/// are added to `[server]`. Returns the env, the daemon and the base URL
/// once `/healthz` answers.
async fn daemon_with_server(
    backend: Backend,
    sim: &runhook::simulate::Simulator,
    server_keys: &str,
) -> (Env, Daemon, String) {
    let mut env = Env::on(backend, sim, &[]);
    let port = free_port();
    env.extra = format!("\n[server]\nlisten = \"127.0.0.1:{port}\"\n{server_keys}\n");
    let daemon = env.start();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_for("the daemon's server", || async {
        match client.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    (env, daemon, base)
}

on_both! {
    async fn watch_over_http_needs_the_token_and_follows_then_stops(backend: Backend) {
        let mut slow = scripted("run-http", numbered(60));
        slow.interval = Duration::from_millis(100);
        let sim = sim_with(vec![slow]).await;
        let token_file = tempfile::NamedTempFile::new().expect("token file");
        std::fs::write(token_file.path(), format!("{TOKEN}\n")).expect("write token");
        let (env, daemon, base) = daemon_with_server(
            backend,
            &sim,
            &format!("token_file = \"{}\"", token_file.path().display()),
        )
        .await;
        let client = reqwest::Client::new();
        let url = format!("{base}/v1/watch/run-http");
        let body = serde_json::json!({"labels": {"team": "lisbon"}});

        for refused in [
            client.put(&url).json(&body),
            client
                .put(&url)
                .bearer_auth("watch-token-0123456789-not")
                .json(&body),
            client
                .put(&url)
                .basic_auth("runhook", Some(TOKEN))
                .json(&body),
            client.delete(&url),
        ] {
            let response = refused.send().await.expect("answer");
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
        }
        assert!(
            env.run_row("run-http").await.is_none(),
            "a refused PUT watched nothing"
        );

        let bad = client
            .put(&url)
            .bearer_auth(TOKEN)
            .body("{\"labels\": [1]}");
        let bad = bad.send().await.expect("answer");
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

        let response = client
            .put(&url)
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        let answer: serde_json::Value = response.json().await.expect("json");
        assert_eq!(answer["runId"], "run-http");
        assert_eq!(answer["watching"], true);
        let lines = wait_for("run-http's events in the file", || async {
            let lines = env.lines();
            if lines.iter().filter(|l| l["runId"] == "run-http").count() >= 3 {
                Ok(lines)
            } else {
                Err(format!("{} lines", lines.len()))
            }
        })
        .await;
        assert_eq!(lines[0]["labels"]["team"], "lisbon", "labels from the body");

        let response = client
            .delete(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        wait_for("run-http unwatched", || async {
            match env.run_row("run-http").await {
                Some(row) if !row.watched => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let unknown = client
            .delete(format!("{base}/v1/watch/never-watched"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        daemon.stop().await;
        let cursor = env.run_row("run-http").await.map_or(0, |r| r.cursor);
        assert!(cursor < 60, "DELETE stopped ingest: cursor {cursor}");
    }
}

on_both! {
    async fn watch_endpoints_do_not_exist_without_a_token(backend: Backend) {
        let sim = sim_with(vec![scripted("run-x", numbered(1))]).await;
        let (env, daemon, base) = daemon_with_server(backend, &sim, "").await;
        let client = reqwest::Client::new();
        let url = format!("{base}/v1/watch/run-x");
        let put = client
            .put(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(put.status(), StatusCode::NOT_FOUND);
        let delete = client
            .delete(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(delete.status(), StatusCode::NOT_FOUND);
        daemon.stop().await;
        assert!(env.run_row("run-x").await.is_none(), "nothing was watched");
    }
}
