//! PostgreSQL for the tests, from Debian's binaries: a server is a data
//! directory in a temp dir, owned by an unprivileged user (initdb refuses
//! root), reachable only through a unix socket in that temp dir (no port to
//! race other tests for), fsync on (the tests are about durability).
//!
//! Starting a server costs ~0.7 s (initdb, then start), creating a database
//! a few tens of milliseconds; so each test gets its own database
//! ([`PgDatabase::create`]) on one server the test binary shares, started
//! the first time a test asks. A test that must do something to the server
//! itself (stop it, change its configuration) starts its own
//! ([`PgServer::start`]). Either way the server is stopped when the test
//! binary exits, however it exits: a watchdog process, started with each
//! server, waits for the binary's end (see [`spawn_watchdog`]).
//!
//! Where no PostgreSQL is installed, both print "skipped: no PostgreSQL" and
//! return `None`, so the tests pass on a machine without it; with
//! `RUNHOOK_REQUIRE_PG=1` (as `.ci/run` sets) its absence fails them, so CI
//! cannot pass without running them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The system user the servers run as when the tests run as root.
const SERVER_USER: &str = "runhook-test";
/// The database role the tests connect as (initdb's superuser).
const ROLE: &str = "runhook";

/// A database of its own for one test, on the server the test binary shares:
/// nothing another test writes is visible in it (advisory locks, LISTEN
/// channels and schemas are per database too). Dropped with the handle.
pub struct PgDatabase {
    server: &'static Server,
    name: String,
}

impl PgDatabase {
    /// A fresh, empty database, or `None` (after saying so) when PostgreSQL
    /// is not installed and not required.
    pub async fn create() -> Option<Self> {
        static SHARED: OnceLock<Option<Server>> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // A first caller blocks the others for the server's start: there is
        // nothing they could do meanwhile.
        let server = SHARED.get_or_init(Server::start).as_ref()?;
        let name = format!("test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        // template0: template1 may be changed by a test; template0 cannot.
        server
            .client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        Some(Self { server, name })
    }

    /// The URL a store connects with: the socket directory as `host`.
    pub fn url(&self) -> String {
        self.server.url(&self.name)
    }

    /// A plain client, for a test to look at what the store wrote without
    /// going through the code it tests.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.server.client(&self.name).await
    }

    /// The same database as a `postgres://` URL (the socket directory
    /// percent-encoded as the host): the form `--state` takes.
    pub fn postgres_url(&self) -> String {
        let host: String = self
            .server
            .dir
            .display()
            .to_string()
            .replace('%', "%25")
            .replace('/', "%2F");
        format!("postgres://{ROLE}@{host}/{}", self.name)
    }
}

impl Drop for PgDatabase {
    /// Dropped so the shared server's disk does not grow with every test;
    /// `FORCE` ends the sessions a test's pools may still hold.
    fn drop(&mut self) {
        let dropped = Command::new(self.server.bin.join("dropdb"))
            .args(["--force", "--if-exists", "-h"])
            .arg(&self.server.dir)
            .args(["-U", ROLE, &self.name])
            .output();
        match dropped {
            Ok(output) if output.status.success() => {}
            // Not a panic: in drop during a failing test it would abort the
            // binary and hide the test's own message.
            Ok(output) => eprintln!(
                "dropping test database {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!("dropping test database {}: {error}", self.name),
        }
    }
}

/// A server of the test's own, for a test that stops it or changes its
/// configuration; stopped (`pg_ctl stop -m immediate`) and its directory
/// removed when dropped.
pub struct PgServer {
    server: Server,
}

impl PgServer {
    /// A fresh server, or `None` (after saying so) when PostgreSQL is not
    /// installed and not required.
    pub fn start() -> Option<Self> {
        Server::start().map(|server| Self { server })
    }

    /// The URL of the server's `postgres` database.
    pub fn url(&self) -> String {
        self.server.url("postgres")
    }

    /// A plain client on the `postgres` database.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.server.client("postgres").await
    }

    /// The server's `pg_ctl` with these arguments (after `-D data`): to stop,
    /// restart or reload it.
    pub fn pg_ctl(&self, args: &[&str]) {
        self.server.pg_ctl(args);
    }

    /// Where its configuration lives (`postgresql.conf`, `pg_hba.conf`).
    pub fn data_dir(&self) -> PathBuf {
        self.server.data()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.server.stop();
    }
}

/// A running server: its binaries, its directory (data, socket, log) and
/// who runs its programs.
struct Server {
    bin: PathBuf,
    dir: PathBuf,
    /// Who runs `pg_ctl`: `None` when the tests are not root.
    user: Option<&'static str>,
    /// Its stdin is never written: it sees end of file when this process
    /// ends, whatever the way, or when [`Server::stop`] closes it, and then
    /// stops the server and removes its directory.
    watchdog: Child,
}

impl Server {
    fn start() -> Option<Self> {
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
        // Kept past the handle: the watchdog removes it once the server stopped.
        let dir = tempfile::Builder::new()
            .prefix("runhook-pg")
            .tempdir()
            .expect("temp dir for PostgreSQL")
            .keep();
        if let Some(user) = user {
            chown(&dir, user);
        }
        // Before the server starts, so no moment exists where it could outlive us.
        let watchdog = spawn_watchdog(&bin, &dir, user);
        let server = Self {
            bin,
            dir,
            user,
            watchdog,
        };
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

    fn url(&self, database: &str) -> String {
        format!("host={} user={ROLE} dbname={database}", self.dir.display())
    }

    async fn client(&self, database: &str) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls)
                .await
                .expect("connect to the test server");
        tokio::spawn(connection);
        client
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
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
        // max_connections: the tests of one binary share the server, each
        // with a pool of up to 8 and a listening connection per store.
        // max_wal_size bounds the disk the databases' creation fills.
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfsync = on\n\
             synchronous_commit = on\nshared_buffers = 16MB\nmax_connections = 300\n\
             max_wal_size = 256MB\n",
            self.dir.display()
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
        let output = as_user(self.user, &path)
            .args(args)
            .current_dir(&self.dir)
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

    /// Stops the server now (`pg_ctl stop -m immediate`) and removes its
    /// directory, for a server of a test's own: its watchdog does it once
    /// told, by its stdin closing, and is waited for.
    fn stop(&mut self) {
        drop(self.watchdog.stdin.take());
        // Not a panic: in drop during a failing test it would abort the
        // binary and hide the test's own message.
        if let Err(error) = self.watchdog.wait() {
            eprintln!("stopping the test PostgreSQL: {error}");
        }
    }
}

/// A server must not outlive the test binary, but the shared one lives in a
/// static, which is never dropped, and libtest has no exit hook. So a small
/// shell waits on a pipe from this process: the kernel closes it when the
/// process ends (exit, panic, SIGKILL), the `read` returns, and the shell
/// stops the server and removes its directory. The pipe's end here is
/// close-on-exec, so no other child (a daemon, the server) holds it open;
/// the shell ignores the signals a Ctrl-C or a timeout sends the group.
fn spawn_watchdog(bin: &Path, dir: &Path, user: Option<&str>) -> Child {
    let pg_ctl = bin.join("pg_ctl");
    let run_as = user.map_or(String::new(), |u| format!("runuser -u {u} -- "));
    let script = format!(
        "trap '' INT TERM HUP; read -r _; \
         {run_as}'{pg_ctl}' -D '{data}' stop -m immediate -w; rm -rf '{dir}'",
        pg_ctl = pg_ctl.display(),
        data = dir.join("data").display(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        // Not the binary's output: whoever reads it (cargo) would wait for
        // the watchdog too.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the PostgreSQL watchdog")
}

fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
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
