//! What ships beside the binary: the systemd unit (checked by systemd's own
//! tools in a temporary root, the way the package lays it out), the
//! tmpfiles entry, the reload and restart policy, and the man pages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNIT: &str = include_str!("../../systemd/runhook.service");
const TMPFILE: &str = include_str!("../../systemd/runhook.tmpfile");
/// Where the package puts the binary, and so where the unit runs it from.
const INSTALLED_BINARY: &str = "/usr/bin/runhook";
/// `systemd-analyze security` prints exposure on a 0.0-10.0 scale; its
/// `--threshold` takes the same figure times ten.
const MAX_EXPOSURE: f64 = 2.0;

/// Runs a systemd tool, or returns `None` where it is not installed (it
/// must be in CI: .ci/run installs it).
fn systemd_tool(program: &str, args: &[&str]) -> Option<Output> {
    match Command::new(program).args(args).output() {
        Ok(output) => Some(output),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{program} must be available in CI"
            );
            eprintln!("SKIPPED: {program} is not installed here");
            None
        }
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The values of `key=` in the unit's [Service] section, in order (a key
/// may repeat, as ExecReload= does).
fn service_values(key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut values = Vec::new();
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some(value) = line.strip_prefix(key).and_then(|v| v.strip_prefix('='))
        {
            values.push(value.to_owned());
        }
    }
    values
}

/// A temporary root laid out as an installed system: the host's own units
/// (so `After=`/`WantedBy=` targets resolve), runhook's unit and tmpfiles
/// entry, the binary at the path the unit names, and `kill` for ExecReload.
/// Lives under target/ so the 200 MB debug binary is hard-linked, not copied.
fn installed_root() -> tempfile::TempDir {
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|dir| dir.join("multi-user.target").exists())
        .expect("the host's systemd units");
    for entry in std::fs::read_dir(host_units).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), units.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(units.join("runhook.service"), UNIT).unwrap();
    let tmpfiles = root.path().join("usr/lib/tmpfiles.d");
    std::fs::create_dir_all(&tmpfiles).unwrap();
    std::fs::write(tmpfiles.join("runhook.conf"), TMPFILE).unwrap();
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).unwrap();
    place(
        Path::new(env!("CARGO_BIN_EXE_runhook")),
        &bin.join("runhook"),
    );
    let kill = std::fs::canonicalize("/bin/kill").expect("kill(1) on the host");
    place(&kill, &bin.join("kill"));
    root
}

fn place(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn the_systemd_unit_verifies_in_an_installed_root() {
    let Some(version) = systemd_tool("systemd-analyze", &["--version"]) else {
        return;
    };
    assert!(version.status.success());
    let root = installed_root();
    let root_arg = format!("--root={}", root.path().display());
    let output =
        systemd_tool("systemd-analyze", &["verify", &root_arg, "runhook.service"]).unwrap();
    let report = text(&output);
    assert!(output.status.success(), "systemd-analyze verify: {report}");
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("runhook.service"))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn the_systemd_unit_exposure_stays_at_most_2() {
    let Some(_) = systemd_tool("systemd-analyze", &["--version"]) else {
        return;
    };
    let root = installed_root();
    let root_arg = format!("--root={}", root.path().display());
    let threshold = format!("--threshold={}", (MAX_EXPOSURE * 10.0) as u32);
    let output = systemd_tool(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            &threshold,
            &root_arg,
            "runhook.service",
        ],
    )
    .unwrap();
    let report = text(&output);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for runhook.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|figure| figure.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {report}"));
    assert!(
        output.status.success() && exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}: {report}"
    );
}

#[test]
fn the_tmpfiles_entry_keeps_credentials_root_only() {
    let Some(_) = systemd_tool("systemd-tmpfiles", &["--version"]) else {
        return;
    };
    let root = installed_root();
    let root_arg = format!("--root={}", root.path().display());
    let output =
        systemd_tool("systemd-tmpfiles", &[&root_arg, "--create", "runhook.conf"]).unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let mode = |dir: &str| {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(root.path().join(dir)).unwrap();
        meta.permissions().mode() & 0o7777
    };
    assert_eq!(mode("etc/runhook/credentials"), 0o700);
    // The service's DynamicUser reads the config through the "other" bits.
    assert_eq!(mode("etc/runhook"), 0o755);
}

/// ExecStart= and ExecReload= name the installed binary; the test runs
/// this build in its place, with the unit's own Environment=.
fn unit_command(line: &str, config: &Path) -> Command {
    let mut words = line.split_whitespace();
    let program = words.next().unwrap_or_default();
    assert_eq!(program, INSTALLED_BINARY, "{line}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_runhook"));
    command.args(words);
    for assignment in service_values("Environment") {
        if let Some((key, value)) = assignment.split_once('=') {
            command.env(key, value);
        }
    }
    command.env("RUNHOOK_CONFIG", config);
    command
}

fn assert_unit_names_config(config: &str) {
    assert!(
        service_values("Environment").contains(&format!("RUNHOOK_CONFIG={config}")),
        "the unit sets RUNHOOK_CONFIG for ExecStart and ExecReload alike"
    );
}

/// A config as the README installs it: secrets only through a credential
/// file, as LoadCredential= provides them.
fn valid_config(dir: &Path) -> PathBuf {
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("token"), "tok-1\n").unwrap();
    let config = dir.join("runhook.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nbase_url = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\n\n\
             [state]\npath = \"{}\"\n\n\
             [sinks.archive]\ntype = \"file\"\npath = \"{}\"\n\n\
             [[routes]]\nsinks = [\"archive\"]\n",
            credentials.join("token").display(),
            dir.join("runhook.db").display(),
            dir.join("events.jsonl").display(),
        ),
    )
    .unwrap();
    config
}

#[test]
fn reload_validates_the_config_before_signalling_the_daemon() {
    assert_unit_names_config("/etc/runhook/runhook.toml");
    let reload = service_values("ExecReload");
    assert!(
        reload
            .last()
            .is_some_and(|l| l.ends_with("kill -HUP $MAINPID")),
        "the signal is the last reload step: {reload:?}"
    );
    let checks = &reload[..reload.len() - 1];
    assert!(!checks.is_empty(), "no step before the signal: {reload:?}");
    // systemd runs ExecReload= lines in order and stops at the first that
    // fails: the signal is sent only if every check before it passed.
    let dir = tempfile::tempdir().unwrap();
    let good = valid_config(dir.path());
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[api]\ntoken = \"t\"\npoll_intervl = \"2s\"\n").unwrap();
    let passes = |config: &Path| {
        checks.iter().all(|line| {
            let output = unit_command(line, config).output().unwrap();
            eprintln!("{line} with {}: {}", config.display(), text(&output));
            output.status.success()
        })
    };
    assert!(passes(&good), "a valid config must reload");
    assert!(!passes(&bad), "an invalid config must fail the reload");
}

#[test]
fn a_bad_config_stops_the_service_instead_of_restarting_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[api]\ntoken = \"t\"\npoll_intervl = \"2s\"\n").unwrap();
    let start = service_values("ExecStart");
    let [start] = start.as_slice() else {
        panic!("one ExecStart=: {start:?}");
    };
    let output = unit_command(start, &bad).output().unwrap();
    let code = output.status.code().expect("an exit code, not a signal");
    assert_ne!(code, 0, "{}", text(&output));
    let prevented: Vec<String> = service_values("RestartPreventExitStatus")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(
        prevented.contains(&code.to_string()),
        "runhook run exits {code} on a bad config; RestartPreventExitStatus={prevented:?}"
    );
}

/// The commands `runhook --help` lists (clap's own `help` aside).
fn listed_commands() -> Vec<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_man_pages_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("generate-man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let commands = listed_commands();
    assert!(commands.len() >= 10, "{commands:?}");
    let main_page = std::fs::read_to_string(dir.path().join("runhook.1")).unwrap();
    for command in &commands {
        // roff escapes every hyphen: runhook\-send\-test(1)
        let roff = command.replace('-', "\\-");
        assert!(
            main_page.contains(&format!("runhook\\-{roff}(1)")),
            "runhook.1 does not mention {command}"
        );
        let page = dir.path().join(format!("runhook-{command}.1"));
        let page =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(page.contains(".TH runhook-"), "{command}: not a man page");
    }
    assert!(
        !dir.path().join("runhook-generate-man.1").exists(),
        "the packaging command stays out of the pages"
    );
}
