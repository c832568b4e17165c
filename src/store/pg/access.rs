//! `check_access` on PostgreSQL: connect as the config says, and tell apart
//! what a user fixes differently: no server answering, a refused login, a
//! role without the rights runhook uses (CREATE on the schema while it has
//! to be created or migrated; SELECT, INSERT, UPDATE and DELETE on its
//! tables). Changes nothing in the database.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::NoTls;

use super::super::access::{Access, AccessError};
use super::{PgStoreError, describe, schema};

/// How long a check waits for a server that does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the data path does to every table of runhook's schema.
const TABLE_RIGHTS: [&str; 4] = ["SELECT", "INSERT", "UPDATE", "DELETE"];

pub(in crate::store) async fn check_access(url: &str) -> Result<Access, AccessError> {
    let mut config =
        tokio_postgres::Config::from_str(url).map_err(|e| AccessError::Url(describe(&e)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let at = shown(&config);
    let role = config.get_user().unwrap_or("(the system user)").to_owned();
    let (client, connection) = match config.connect(NoTls).await {
        Ok(connected) => connected,
        Err(error) => return Err(refused(at, role, &error)),
    };
    // Ends when `client` is dropped at the end of this function.
    tokio::spawn(connection);
    rights(&client, at, role).await
}

/// Where the check connected, as `postgres://user@host:port/db`: the
/// server a user has to look at, never the password (nor any other
/// setting). Either form of connection string gives the same.
fn shown(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(dir) => format!("{}:{port}", dir.display()),
            }
        })
        .collect();
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or_default();
    format!("postgres://{user}{}/{dbname}", hosts.join(","))
}

/// Why a connection failed, as the fix it needs.
fn refused(at: String, role: String, error: &tokio_postgres::Error) -> AccessError {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        let reason = describe(error);
        return if code.starts_with("28") {
            AccessError::Authentication { at, role, reason }
        } else if code == "42501" {
            AccessError::Rights {
                at,
                role,
                missing: vec![format!("CONNECT on the database ({reason})")],
            }
        } else {
            AccessError::Postgres { at, reason }
        };
    }
    let reason = describe(error);
    if reason.contains("password missing") {
        return AccessError::Authentication {
            at,
            role,
            reason: "the server asks for a password and the URL gives none".into(),
        };
    }
    AccessError::Unreachable { at, reason }
}

/// Logged in: the schema version and the rights the role lacks.
async fn rights(
    client: &tokio_postgres::Client,
    at: String,
    role: String,
) -> Result<Access, AccessError> {
    let failed = |error: tokio_postgres::Error| AccessError::Postgres {
        at: at.clone(),
        reason: describe(&error),
    };
    let row = client
        .query_one(
            "SELECT current_user::text, current_schema()::text,
                    COALESCE(has_schema_privilege(current_schema(), 'CREATE'), false),
                    to_regclass('schema_migrations') IS NOT NULL,
                    has_table_privilege(to_regclass('schema_migrations')::oid, 'SELECT')",
            &[],
        )
        .await
        .map_err(failed)?;
    let role: String = row.try_get(0).unwrap_or(role);
    let schema_name: Option<String> = row.try_get(1).map_err(failed)?;
    let may_create: bool = row.try_get(2).map_err(failed)?;
    // Unreadable, it is among the tables the role lacks rights on (below),
    // and whether a migration is due cannot be told.
    let readable = row.try_get::<_, bool>(3).map_err(failed)?
        && row.try_get::<_, Option<bool>>(4).map_err(failed)? == Some(true);
    let version = if readable {
        let row = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::bigint FROM schema_migrations",
                &[],
            )
            .await
            .map_err(failed)?;
        Some(row.try_get::<_, i64>(0).map_err(failed)?).filter(|&v| v > 0)
    } else {
        None
    };
    if let Some(found) = version.filter(|&v| v > schema::VERSION) {
        return Err(AccessError::from((
            at,
            PgStoreError::TooNew {
                found,
                known: schema::VERSION,
            },
        )));
    }
    let mut missing = Vec::new();
    let exists: bool = row.try_get(3).map_err(failed)?;
    let migrates = !exists || version.is_some_and(|v| v < schema::VERSION);
    match &schema_name {
        None => missing.push(
            "a schema to create runhook's tables in (no schema of the search_path exists)".into(),
        ),
        Some(name) if migrates && !may_create => missing.push(format!(
            "CREATE on schema {name} (runhook creates or migrates its tables there at start)"
        )),
        Some(_) => {}
    }
    missing.extend(table_rights_missing(client).await.map_err(failed)?);
    if missing.is_empty() {
        Ok(Access::Postgres {
            at,
            role,
            schema: version,
        })
    } else {
        Err(AccessError::Rights { at, role, missing })
    }
}

/// "SELECT, UPDATE on events" for each of runhook's existing tables the
/// role may not use as the data path does.
async fn table_rights_missing(
    client: &tokio_postgres::Client,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let tables: Vec<&str> = schema::tables();
    let rights: Vec<&str> = TABLE_RIGHTS.to_vec();
    let rows = client
        .query(
            "SELECT c.relname::text, p.privilege
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
             CROSS JOIN unnest($2::text[]) WITH ORDINALITY AS p(privilege, i)
             WHERE c.relkind IN ('r', 'p') AND c.relname = ANY($1)
               AND NOT has_table_privilege(c.oid, p.privilege)
             ORDER BY 1, p.i",
            &[&tables, &rights],
        )
        .await?;
    let mut lacking: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in &rows {
        lacking
            .entry(row.try_get(0)?)
            .or_default()
            .push(row.try_get(1)?);
    }
    Ok(lacking
        .into_iter()
        .map(|(table, rights)| format!("{} on {table}", rights.join(", ")))
        .collect())
}
