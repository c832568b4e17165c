//! The PostgreSQL store against a real server (`pg_support`). Each test
//! starts its own server; without PostgreSQL installed they pass after
//! printing "skipped: no PostgreSQL" (unless `RUNHOOK_REQUIRE_PG=1`).

use crate::pg_support::PgServer;

#[tokio::test]
async fn the_test_server_listens_on_its_socket_only_with_fsync_on() {
    let Some(pg) = PgServer::start() else { return };
    let client = pg.client().await;
    for (setting, expected) in [("fsync", "on"), ("listen_addresses", "")] {
        let value: String = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect(setting)
            .get(0);
        assert_eq!(value, expected, "{setting}");
    }
}
