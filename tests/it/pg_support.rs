//! A throwaway PostgreSQL server per test, from Debian's binaries: a data
//! directory in a temp dir, owned by an unprivileged user (initdb refuses
//! root), reachable only through a unix socket in that temp dir (no port to
//! race other tests for), fsync on (the tests are about durability), stopped
//! with `pg_ctl stop -m immediate` when dropped.
//!
//! Where no PostgreSQL is installed, [`PgServer::start`] prints "skipped: no
//! PostgreSQL" and returns `None`, so the tests pass on a machine without it;
//! with `RUNHOOK_REQUIRE_PG=1` (as `.ci/run` sets) its absence fails them, so
//! CI cannot pass without running them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The system user the servers run as when the tests run as root.
const SERVER_USER: &str = "runhook-test";
/// The database role the tests connect as (initdb's superuser).
const ROLE: &str = "runhook";

pub struct PgServer {
    bin: PathBuf,
    /// Holds the data directory and the socket; removed after the stop.
    dir: tempfile::TempDir,
    /// Who runs `pg_ctl`: `None` when the tests are not root.
    user: Option<&'static str>,
}

impl PgServer {
    /// A fresh server, or `None` (after saying so) when PostgreSQL is not
    /// installed and not required.
    pub fn start() -> Option<Self> {
        let Some(bin) = newest_bin_dir(Path::new("/usr/lib/postgresql")) else {
            let required = std::env::var("RUNHOOK_REQUIRE_PG").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "RUNHOOK_REQUIRE_PG=1 but no PostgreSQL under /usr/lib/postgresql/*/bin \
                 (install Debian's `postgresql` package)"
            );
            eprintln!("skipped: no PostgreSQL");
            return None;
        };
        let user = running_as_root().then(|| {
            ensure_user(SERVER_USER);
            SERVER_USER
        });
        let dir = tempfile::Builder::new()
            .prefix("runhook-pg")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        if let Some(user) = user {
            chown(dir.path(), user);
        }
        let server = Self { bin, dir, user };
        server.init();
        server.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-l",
            &server.log().to_string_lossy(),
        ]);
        Some(server)
    }

    /// The URL a store connects with: the socket directory as `host`.
    pub fn url(&self) -> String {
        format!(
            "host={} user={ROLE} dbname=postgres",
            self.dir.path().display()
        )
    }

    /// A plain client, for a test to look at what the store wrote without
    /// going through the code it tests.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test server");
        tokio::spawn(connection);
        client
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn init(&self) {
        // --no-sync only spares initdb's own fsyncs; the server keeps fsync on.
        let data = self.data();
        self.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                ROLE,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfsync = on\n\
             synchronous_commit = on\nshared_buffers = 16MB\nmax_connections = 100\n",
            self.dir.path().display()
        );
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("read postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&path, text).expect("write postgresql.conf");
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        let mut all = vec!["-D", data.to_str().expect("utf-8 temp path")];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    /// Runs one of the server's programs as the server's user; its output
    /// (and the server log) is shown when it fails.
    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = match self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            output.status.success(),
            "{program} {args:?}: {}\n{}\n{}\nserver log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        let data = data.to_string_lossy();
        // Not `run`: a panic in drop during a failing test would abort the
        // binary and hide the test's own message.
        let path = self.bin.join("pg_ctl");
        let args = ["-D", &data, "stop", "-m", "immediate", "-w"];
        let status = match self.user {
            Some(user) => Command::new("runuser")
                .args(["-u", user, "--"])
                .arg(&path)
                .args(args)
                .output(),
            None => Command::new(&path).args(args).output(),
        };
        if let Err(error) = status {
            eprintln!("stopping the test PostgreSQL: {error}");
        }
    }
}

/// `/usr/lib/postgresql/<newest version>/bin`, when it holds initdb.
fn newest_bin_dir(root: &Path) -> Option<PathBuf> {
    let versions = std::fs::read_dir(root).ok()?;
    versions
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: f64 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Creates the system user once; tests starting servers in parallel must
/// not race `useradd`.
fn ensure_user(user: &str) {
    static CREATED: Mutex<bool> = Mutex::new(false);
    let mut created = CREATED.lock().unwrap_or_else(|p| p.into_inner());
    if *created {
        return;
    }
    let exists = Command::new("id")
        .arg(user)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let output = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(user)
            .output()
            .expect("run useradd");
        // 9: created meanwhile by another test binary.
        assert!(
            output.status.success() || output.status.code() == Some(9),
            "useradd {user}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    *created = true;
}

fn chown(path: &Path, user: &str) {
    let status = Command::new("chown")
        .arg(user)
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown {user} {}", path.display());
}
