//! Whether this process can use the state where the config puts it, asked
//! before anything is opened: `runhook check --online`, and the daemon at
//! start, so that a wrong password, a stopped server or a role without
//! rights is one clear sentence instead of a failed migration or a
//! half-started daemon.

use std::path::{Path, PathBuf};

use super::Location;
use super::pg::PgStoreError;

/// What the check found usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The directory the database lives in (or will be created in) takes
    /// new files; `exists` whether the database is there yet.
    Sqlite { dir: PathBuf, exists: bool },
    /// Connected as `role`; `schema` is runhook's schema version there
    /// (`None`: none yet; the daemon creates it, which the role may).
    Postgres {
        at: String,
        role: String,
        schema: Option<i64>,
    },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    #[error("state url: {0}")]
    Url(String),
    /// No server answered (down, wrong host or port, a firewall, a socket
    /// directory without a server).
    #[error("cannot reach the PostgreSQL server at {at}: {reason}")]
    Unreachable { at: String, reason: String },
    /// The server answered and refused the login.
    #[error(
        "PostgreSQL at {at} refused to log in role {role}: {reason} (check the user and password of [state] url or url_file)"
    )]
    Authentication {
        at: String,
        role: String,
        reason: String,
    },
    /// Logged in, but the role may not do what runhook does.
    #[error(
        "role {role} lacks rights runhook needs on {at}: {}; grant them (README: \"Running more than one replica\")",
        .missing.join("; ")
    )]
    Rights {
        at: String,
        role: String,
        missing: Vec<String>,
    },
    /// Any other answer of the server (a database that does not exist, a
    /// schema from a newer runhook).
    #[error("PostgreSQL at {at}: {reason}")]
    Postgres { at: String, reason: String },
    #[error("state directory {dir}: {reason}", dir = .dir.display())]
    Sqlite {
        dir: PathBuf,
        reason: String,
        /// Refused for permissions (rather than a path that cannot be).
        denied: bool,
    },
}

impl AccessError {
    /// Whether the fix is a credential or a grant (rather than a server to
    /// start or a URL to correct): `check` exits EX_NOPERM for these.
    pub fn is_permission(&self) -> bool {
        matches!(
            self,
            Self::Authentication { .. } | Self::Rights { .. } | Self::Sqlite { denied: true, .. }
        )
    }
}

impl From<(String, PgStoreError)> for AccessError {
    fn from((at, error): (String, PgStoreError)) -> Self {
        Self::Postgres {
            at,
            reason: error.to_string(),
        }
    }
}

/// Checks that the state at `location` is usable by this process, changing
/// nothing (a probe file on SQLite is removed again). The daemon calls it
/// before opening the state; `runhook check --online` prints its answer.
pub async fn check_access(location: &Location) -> Result<Access, AccessError> {
    match location {
        Location::Sqlite(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || check_sqlite(&path))
                .await
                .map_err(|error| AccessError::Sqlite {
                    dir: PathBuf::new(),
                    reason: error.to_string(),
                    denied: false,
                })?
        }
        Location::Postgres(url) => super::pg::check_access(url).await,
    }
}

/// The database file, if it exists, must open for writing; its directory
/// (or, when the daemon will create it, the nearest existing parent) must
/// take a new file: SQLite writes its WAL and the daemon its lock there.
fn check_sqlite(path: &Path) -> Result<Access, AccessError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let exists = path.exists();
    if exists {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|error| AccessError::Sqlite {
                dir: dir.clone(),
                reason: format!("{} cannot be written: {error}", path.display()),
                denied: error.kind() == std::io::ErrorKind::PermissionDenied,
            })?;
    }
    let existing = dir
        .ancestors()
        .find(|d| d.is_dir())
        .unwrap_or(Path::new("."));
    let probe = existing.join(format!(".runhook-check-{}", std::process::id()));
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe);
    match created {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(Access::Sqlite { dir, exists })
        }
        Err(error) => Err(AccessError::Sqlite {
            denied: error.kind() == std::io::ErrorKind::PermissionDenied,
            reason: if existing == dir {
                format!("cannot create files in it: {error}")
            } else {
                format!(
                    "does not exist, and {} does not let runhook create it: {error}",
                    existing.display()
                )
            },
            dir,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_directory_passes_and_a_missing_one_is_created_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("runhook.db");
        assert_eq!(
            check_sqlite(&path).unwrap(),
            Access::Sqlite {
                dir: dir.path().join("state"),
                exists: false
            }
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the probe is removed"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_read_only_directory_is_refused_naming_it() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("skipped: root writes anywhere");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let error = check_sqlite(&dir.path().join("runhook.db")).unwrap_err();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(error.is_permission(), "{error}");
        assert!(error.to_string().contains("cannot create files"), "{error}");
    }
}
