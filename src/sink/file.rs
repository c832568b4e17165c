//! The file sink: JSON Lines, fsync before a delivery counts as done, and
//! exactly-once across crashes through the recorded offset: whatever lies in
//! the file past the offset was written but not yet marked done.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: Mutex<File>,
    /// A failed append could not be cut back: the file may end in bytes
    /// that are not marked done (whole lines, a torn one). They must be
    /// reconciled (`recover`) before the next append, or the retry would
    /// write those lines again after a torn one.
    needs_recovery: AtomicBool,
}

/// What start-up found past the recorded offset.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Ids of the complete lines past the offset.
    pub ids: Vec<String>,
    /// The file length after repairs: the new offset.
    pub offset: u64,
    /// Bytes of a torn last line that were cut off.
    pub torn_bytes: u64,
}

impl FileSink {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(open_append(path)?),
            needs_recovery: AtomicBool::new(false),
        })
    }

    /// Reads what lies past `offset` (all of the file if it is shorter, as
    /// after rotation), cuts a torn last line, and returns the ids found.
    /// The tail is read in `RECOVER_CHUNK`s, keeping at most `LINE_PREFIX`
    /// bytes of a line: memory stays bounded however large the tail.
    pub fn recover(&self, offset: Option<u64>) -> io::Result<Recovery> {
        let recovery = self.scan_tail(offset);
        // Until a reconciliation succeeds, no batch may be appended: the
        // lines past the offset would be written again.
        self.needs_recovery
            .store(recovery.is_err(), Ordering::Relaxed);
        recovery
    }

    fn scan_tail(&self, offset: Option<u64>) -> io::Result<Recovery> {
        let mut file = self.lock();
        let len = file.metadata()?.len();
        let start = match offset {
            Some(o) if o <= len => o,
            _ => 0,
        };
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Read::by_ref(&mut *file).take(len - start);
        let mut scan = TailScan::default();
        let mut chunk = vec![0; RECOVER_CHUNK];
        loop {
            match tail.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => scan.feed(&chunk[..n]),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        let torn_bytes = scan.read - scan.complete;
        if torn_bytes > 0 {
            file.set_len(start + scan.complete)?;
            file.sync_data()?;
        }
        Ok(Recovery {
            ids: scan.ids,
            offset: start + scan.complete,
            torn_bytes,
        })
    }

    /// Appends `lines` and fsyncs; returns the file length after.
    ///
    /// A failed write (a full disk may take part of the batch first) or
    /// fsync is cut back to the length before it, so the retry appends the
    /// batch to a clean end; if even that fails, [`Self::needs_recovery`]
    /// says so and the error is returned.
    pub fn append(&self, lines: &[u8]) -> io::Result<u64> {
        let mut file = self.lock();
        let before = file.metadata()?;
        let known_good = before.len();
        if crate::crashpoint::armed("file.mid_append") {
            // A torn line on disk, as a crash in the middle of write(2)
            // leaves: half the bytes, and never a whole number of lines.
            let mut half = lines.len() / 2;
            if half > 0 && lines[half - 1] == b'\n' {
                half += 1;
            }
            let _ = file.write_all(&lines[..half.min(lines.len())]);
            let _ = file.sync_data();
            crate::crashpoint::die();
        }
        let written = file
            .write_all(lines)
            .and_then(|()| file.sync_data())
            .and_then(|()| file.seek(SeekFrom::End(0)));
        // Only a regular file can be cut back (a device or a pipe keeps
        // nothing to cut, and refuses to be truncated).
        if written.is_err() && before.is_file() {
            let cut = file.set_len(known_good).and_then(|()| file.sync_data());
            if let Err(error) = cut {
                self.needs_recovery.store(true, Ordering::Relaxed);
                tracing::error!(path = %self.path.display(), %error, "file sink: cannot cut a failed write back; reconciling before the next write");
            }
        }
        written
    }

    /// Whether a failed append left bytes that must be reconciled first.
    pub fn needs_recovery(&self) -> bool {
        self.needs_recovery.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, File> {
        self.file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true).read(true);
    crate::files::open_private(path, &mut options)
}

/// Bytes read at a time when reconciling the tail.
const RECOVER_CHUNK: usize = 64 * 1024;
/// Bytes of a line kept to find its id. Every line runhook writes starts
/// with `{"id":"..."`, so a longer line (a large payload) is read past.
const LINE_PREFIX: usize = 64 * 1024;

/// The ids of the complete lines of a tail fed in chunks.
#[derive(Debug, Default)]
struct TailScan {
    ids: Vec<String>,
    /// The start of the line under way, up to `LINE_PREFIX`.
    line: Vec<u8>,
    /// Whether the line under way is longer than what `line` keeps.
    cut: bool,
    /// Bytes fed so far, and up to the end of the last complete line.
    read: u64,
    complete: u64,
}

impl TailScan {
    fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|b| *b == b'\n') {
            self.keep(&bytes[..end]);
            self.end_line();
            self.read += end as u64 + 1;
            self.complete = self.read;
            bytes = &bytes[end + 1..];
        }
        self.keep(bytes);
        self.read += bytes.len() as u64;
    }

    fn keep(&mut self, part: &[u8]) {
        let room = LINE_PREFIX - self.line.len();
        self.cut |= part.len() > room;
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn end_line(&mut self) {
        if !self.line.is_empty() {
            let id = if self.cut {
                prefix_id(&self.line)
            } else {
                line_id(&self.line)
            };
            self.ids.extend(id);
        }
        self.line.clear();
        self.cut = false;
    }
}

/// The id of a line known only by its start, as runhook writes it.
fn prefix_id(prefix: &[u8]) -> Option<String> {
    let id = prefix.strip_prefix(b"{\"id\":").and_then(|rest| {
        serde_json::Deserializer::from_slice(rest)
            .into_iter::<String>()
            .next()?
            .ok()
    });
    if id.is_none() {
        tracing::warn!(
            "file sink: a long line past the recorded offset does not start with an id; left as is"
        );
    }
    id
}

fn line_id(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Line {
        id: String,
    }
    match serde_json::from_slice::<Line>(line) {
        Ok(parsed) => Some(parsed.id),
        Err(error) => {
            tracing::warn!(%error, "file sink: a line past the recorded offset has no id; left as is");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_finds_unmarked_lines_and_cuts_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = FileSink::open(&path).unwrap();
        let first = sink.append(b"{\"id\":\"r:1\"}\n").unwrap();
        sink.append(b"{\"id\":\"r:2\"}\n{\"id\":\"r:3\"}\n{\"id\":\"r:4\"")
            .unwrap();
        let recovery = sink.recover(Some(first)).unwrap();
        assert_eq!(recovery.ids, ["r:2", "r:3"]);
        assert_eq!(recovery.torn_bytes, 11);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"id\":\"r:1\"}\n{\"id\":\"r:2\"}\n{\"id\":\"r:3\"}\n"
        );
        assert_eq!(recovery.offset, text.len() as u64);
    }

    #[test]
    fn a_file_shorter_than_the_offset_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(&dir.path().join("out.jsonl")).unwrap();
        sink.append(b"{\"id\":\"r:9\"}\n").unwrap();
        assert_eq!(sink.recover(Some(10_000)).unwrap().ids, ["r:9"]);
    }

    #[test]
    fn a_line_longer_than_the_kept_prefix_is_found_by_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(&dir.path().join("out.jsonl")).unwrap();
        let long = format!(
            "{{\"id\":\"r:1\",\"payload\":\"{}\"}}\n",
            "x".repeat(300_000)
        );
        sink.append(long.as_bytes()).unwrap();
        sink.append(b"{\"id\":\"r:2\"}\n{\"id\":").unwrap();
        let recovery = sink.recover(None).unwrap();
        assert_eq!(recovery.ids, ["r:1", "r:2"]);
        assert_eq!(recovery.torn_bytes, 6);
    }

    /// Peak resident memory of this process, from /proc.
    #[cfg(target_os = "linux")]
    fn peak_rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn recovery_reads_a_huge_tail_in_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = FileSink::open(&path).unwrap();
        let offset = sink.append(b"{\"id\":\"r:1\"}\n").unwrap();
        sink.append(b"{\"id\":\"r:2\"}\n").unwrap();
        // A 512 MiB hole (a sparse run of zero bytes, no disk used), then a line.
        let hole = 512 * 1024 * 1024;
        {
            let mut raw = OpenOptions::new().write(true).open(&path).unwrap();
            raw.seek(SeekFrom::End(hole)).unwrap();
            raw.write_all(b"\n{\"id\":\"r:3\"}\n").unwrap();
        }
        let before = peak_rss_bytes();
        let recovery = sink.recover(Some(offset)).unwrap();
        let grown = peak_rss_bytes().saturating_sub(before);
        assert_eq!(recovery.ids, ["r:2", "r:3"]);
        assert_eq!(recovery.torn_bytes, 0);
        assert!(
            grown < 64 * 1024 * 1024,
            "reading a 512 MiB tail raised the peak RSS by {} MiB",
            grown / (1024 * 1024)
        );
    }

    #[cfg(unix)]
    #[test]
    fn created_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        FileSink::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
