//! One daemon per state database (README.md, guarantee 7). Two daemons on one
//! state would deliver the same rows in interleaved order, so `runhook run`
//! holds an exclusive advisory lock on `<state>.lock` for its lifetime. The
//! commands that only read or change state (`status`, `watch`, `replay`...)
//! never take it: SQLite's own locking is enough for them.

use std::ffi::OsString;
use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::StoreError;

/// Held for the daemon's lifetime; dropping it (or the process dying, even
/// by SIGKILL) releases the lock.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    /// Takes the lock for the state database at `state`, or fails at once
    /// with [`StoreError::Locked`] naming the holder's pid. The lock file
    /// (mode 0600, beside the database) then holds this process's pid.
    pub fn acquire(state: &Path) -> Result<Self, StoreError> {
        let path = lock_path(state);
        let io = |error: std::io::Error| StoreError::Open {
            path: path.clone(),
            error: Arc::new(error),
        };
        let mut options = std::fs::OpenOptions::new();
        // Not truncated on open: until we hold the lock, the pid in it is
        // the holder's.
        options.read(true).write(true).create(true).truncate(false);
        let mut file = crate::files::open_private(&path, &mut options).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: state.to_owned(),
                    holder: holder_pid(&mut file),
                });
            }
            Err(TryLockError::Error(error)) => return Err(io(error)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// `<state>.lock`: beside the database, so it names the same state wherever
/// that lives.
fn lock_path(state: &Path) -> PathBuf {
    let mut name = OsString::from(state.as_os_str());
    name.push(".lock");
    PathBuf::from(name)
}

/// The pid the holder wrote, or "unknown" if it has not written it yet.
fn holder_pid(file: &mut File) -> String {
    let mut text = String::new();
    match file.read_to_string(&mut text) {
        Ok(_) if !text.trim().is_empty() => text.trim().to_owned(),
        _ => "unknown".to_owned(),
    }
}
