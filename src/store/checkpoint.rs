//! WAL checkpoints off the writer's critical path.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses its
//! threshold, so every few thousand pages one group of callers waited for
//! the whole WAL to be copied into the database file and fsync'd. Here the
//! writer's connection never checkpoints on its own: a commit that leaves
//! the WAL past [`WalBounds::signal_pages`] wakes a checkpointer thread (its
//! own connection) that copies what it can without blocking anyone
//! (PASSIVE). Under sustained writes that is not enough to make the WAL
//! start over: SQLite rewinds it only when a write transaction begins with
//! every frame already copied, and the writer begins its next group at
//! once. So past [`WalBounds::hard_pages`] the writer itself runs a blocking
//! checkpoint (RESTART: the frames the checkpointer has not copied yet, then
//! it waits for readers to leave the WAL), and the next commit rewinds it.
//! That bounds the -wal file even while readers are slow, at the price of
//! one pause per `hard_pages` written.

use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::StoreError;
use super::writer::{BUSY_TIMEOUT, open_connection};

/// Longest the writer waits for readers in a blocking checkpoint.
const READER_WAIT: Duration = Duration::from_secs(1);

/// When the WAL is checkpointed, in pages (4 KiB by default).
#[derive(Debug, Clone, Copy)]
pub(super) struct WalBounds {
    /// Past this many pages a commit wakes the background checkpointer.
    pub signal_pages: i32,
    /// Past this many the writer checkpoints itself, blocking, and the -wal
    /// file is trimmed back to this size once the WAL starts over.
    pub hard_pages: i32,
}

impl Default for WalBounds {
    fn default() -> Self {
        // 16 MiB between background checkpoints: each one fsyncs the
        // database file, so a smaller step buys more syncs than it saves.
        // 64 MiB of WAL at most (plus one group): bounded disk, and one
        // writer pause per 64 MiB written under sustained load.
        Self {
            signal_pages: 4 * 1024,
            hard_pages: 16 * 1024,
        }
    }
}

/// The writer's side: what the last commit left in the WAL, the
/// checkpointer to wake, and when to checkpoint itself.
pub(super) struct WalKeeper {
    pages: Arc<AtomicI32>,
    bounds: WalBounds,
    /// Where the WAL stood when the checkpointer was last woken; a WAL that
    /// started over stands lower.
    woken_at: i32,
    /// Pages past which the next blocking checkpoint is tried: `hard_pages`,
    /// doubled after one could not finish (a reader held the WAL past
    /// [`READER_WAIT`]), so a reader that stays costs the writer one wait
    /// each time the WAL doubles rather than one per commit.
    blocking_at: i32,
    /// The WAL's size at the last commit: lower now means it started over.
    last_pages: i32,
    wake: Option<SyncSender<()>>,
    checkpointer: Option<JoinHandle<()>>,
    /// Held while either side checkpoints.
    turn: Arc<Mutex<()>>,
}

impl WalKeeper {
    /// Turns off the automatic checkpoint on the writer's connection, starts
    /// the checkpointer thread and hooks the writer's commits.
    pub(super) fn attach(
        conn: &mut Connection,
        path: &Path,
        bounds: WalBounds,
    ) -> Result<Self, StoreError> {
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        conn.pragma_update(
            None,
            "journal_size_limit",
            i64::from(bounds.hard_pages) * page_size,
        )?;
        let checkpoints = open_connection(path, false)?;
        let (wake, woken) = sync_channel::<()>(1);
        let turn = Arc::new(Mutex::new(()));
        let their_turn = turn.clone();
        let checkpointer = std::thread::Builder::new()
            .name("runhook-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoints, woken, their_turn))
            .map_err(|error| StoreError::Open {
                path: path.to_owned(),
                error: Arc::new(error),
            })?;
        let pages = Arc::new(AtomicI32::new(0));
        let seen = pages.clone();
        // Replaces SQLite's own hook (the automatic checkpoint). It runs in
        // the COMMIT, so it only notes the size; it holds no sender, so
        // dropping the writer's ends the checkpointer.
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, in_wal: i32| {
            seen.store(in_wal, Ordering::Relaxed);
            Ok(())
        }))?;
        Ok(Self {
            pages,
            bounds,
            woken_at: 0,
            blocking_at: bounds.hard_pages,
            last_pages: 0,
            wake: Some(wake),
            checkpointer: Some(checkpointer),
            turn,
        })
    }

    /// After a group's replies went out: wakes the checkpointer once per
    /// `signal_pages` written; past the hard bound, checkpoints now.
    pub(super) fn after_commit(&mut self, conn: &Connection) {
        let pages = self.pages.load(Ordering::Relaxed);
        if pages < self.last_pages {
            // The WAL started over: whatever held it earlier has let go, so
            // the bound is the configured one again (a slow reader once
            // must not loosen it for good).
            self.woken_at = 0;
            self.blocking_at = self.bounds.hard_pages;
        }
        self.last_pages = pages;
        if pages - self.woken_at >= self.bounds.signal_pages {
            self.woken_at = pages;
            if let Some(wake) = &self.wake {
                // Full: a wake is already pending. Disconnected: the thread
                // died, and the hard bound still holds.
                let _ = wake.try_send(());
            }
        }
        if pages < self.blocking_at {
            return;
        }
        // SQLite does not wait for a checkpoint already running (it answers
        // busy at once): take turns with the checkpointer.
        let turn = self
            .turn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let outcome = restart_within(conn, READER_WAIT);
        drop(turn);
        match outcome {
            Ok(true) => {
                self.blocking_at = self.bounds.hard_pages;
                // Every frame is copied: the WAL starts over with the next
                // write. Until that write's hook reports, the last size is
                // stale; without this, each group that writes nothing (a
                // watchdog ping) would checkpoint again.
                self.pages.store(0, Ordering::Relaxed);
                self.woken_at = 0;
                self.last_pages = 0;
            }
            Ok(false) => {
                tracing::warn!(
                    wal_pages = pages,
                    wait = ?READER_WAIT,
                    "WAL checkpoint could not finish: a reader or another connection held the WAL; trying again once it has doubled"
                );
                self.blocking_at = pages.saturating_mul(2);
            }
            Err(error) => {
                tracing::warn!(%error, wal_pages = pages, "WAL checkpoint failed; trying again later");
                self.blocking_at = pages.saturating_mul(2);
            }
        }
    }

    /// Stops the checkpointer, so the writer's final checkpoint does not
    /// wait for it.
    pub(super) fn stop(&mut self) {
        self.wake = None;
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
    }
}

/// A RESTART checkpoint that waits at most `wait` for readers to leave the
/// WAL: the writer is stalled meanwhile, so a slow reader (a long `status`,
/// a backup) costs it this much per try rather than the full busy timeout.
fn restart_within(conn: &Connection, wait: Duration) -> Result<bool, rusqlite::Error> {
    conn.busy_timeout(wait)?;
    let outcome = checkpoint(conn, "RESTART");
    conn.busy_timeout(BUSY_TIMEOUT)?;
    outcome
}

/// Runs a checkpoint in `mode`; false when it could not finish because a
/// reader or writer held the WAL (SQLite's "busy" column).
pub(super) fn checkpoint(conn: &Connection, mode: &str) -> Result<bool, rusqlite::Error> {
    let busy: i64 = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(0))?;
    Ok(busy == 0)
}

/// Copies WAL frames into the database file whenever a commit asks, never
/// waiting for a reader or the writer. Ends when the writer drops its side.
fn checkpoint_loop(conn: Connection, woken: Receiver<()>, turn: Arc<Mutex<()>>) {
    while woken.recv().is_ok() {
        let _turn = turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = checkpoint(&conn, "PASSIVE") {
            tracing::warn!(%error, "background WAL checkpoint failed; the writer's bound still holds");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::store::Store;

    /// A store in a temp dir with these WAL bounds and a `filler` table to
    /// write pages with.
    async fn filler_store(
        signal_pages: i32,
        hard_pages: i32,
    ) -> (tempfile::TempDir, PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let bounds = WalBounds {
            signal_pages,
            hard_pages,
        };
        let store = Store::open_with(&path, bounds).unwrap();
        store
            .write(|conn| {
                conn.execute_batch("CREATE TABLE filler (id INTEGER PRIMARY KEY, body BLOB)")
            })
            .await
            .unwrap();
        (dir, path, store)
    }

    fn wal_bytes(db: &Path) -> u64 {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::metadata(wal).map_or(0, |m| m.len())
    }

    /// Sustained writes, with no idle moment for the WAL to start over on
    /// its own: the -wal file must stay near the hard bound rather than grow
    /// with everything written, and every row must be there after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_sustained_writes() {
        let (_dir, path, store) = filler_store(64, 256).await;
        let (writers, rows_each, body) = (16, 200, 2048);
        let mut tasks = Vec::new();
        for writer in 0..writers {
            let (store, path) = (store.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let mut largest = 0;
                for row in 0..rows_each {
                    let id = writer * rows_each + row;
                    store
                        .write(move |conn| {
                            conn.execute(
                                "INSERT INTO filler (id, body) VALUES (?1, zeroblob(?2))",
                                [id, body],
                            )
                        })
                        .await
                        .unwrap();
                    largest = largest.max(wal_bytes(&path));
                }
                largest
            }));
        }
        let mut largest = 0;
        for task in tasks {
            largest = largest.max(task.await.unwrap());
        }
        let written = (writers * rows_each * body) as u64;
        let bound = 2 * 256 * 4096;
        assert!(
            largest <= bound,
            "the -wal file reached {largest} bytes (bound {bound}) for {written} bytes written"
        );
        drop(store);
        let conn = Connection::open(&path).unwrap();
        let (rows, bytes): (i64, i64) = conn
            .query_row("SELECT COUNT(*), SUM(length(body)) FROM filler", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(
            (rows, bytes),
            ((writers * rows_each) as i64, written as i64)
        );
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    /// A reader that holds an old snapshot keeps the WAL from starting over:
    /// the writer tries, waits for it a bounded time, goes on writing, and
    /// bounds the WAL again once the reader is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reader_stalls_the_writer_only_briefly() {
        let (_dir, path, store) = filler_store(16, 64).await;
        // The longest single write, and all of them.
        let fill = |store: Store, rows: std::ops::Range<i64>| async move {
            let (started, mut longest) = (std::time::Instant::now(), Duration::ZERO);
            for id in rows {
                let write = std::time::Instant::now();
                store
                    .write(move |conn| {
                        conn.execute(
                            "INSERT INTO filler (id, body) VALUES (?1, zeroblob(3000))",
                            [id],
                        )
                    })
                    .await
                    .unwrap();
                longest = longest.max(write.elapsed());
            }
            (longest, started.elapsed())
        };
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM filler", [], |r| r.get(0))
            .unwrap();
        // Some 250 WAL pages: the writer tries at 64, 128 and 256 pages,
        // waiting 1 s each time (a try per 32 pages would be 6 or more).
        let (longest, all) = fill(store.clone(), 0..100).await;
        assert!(
            longest < Duration::from_secs(3),
            "one write waited {longest:?} for a reader holding the WAL"
        );
        assert!(
            all < Duration::from_millis(6500),
            "100 writes past the bound took {all:?} with a reader holding the WAL"
        );
        reader.execute_batch("COMMIT").unwrap();
        fill(store.clone(), 100..400).await;
        let wal = wal_bytes(&path);
        assert!(wal <= 2 * 64 * 4096, "the -wal file stayed at {wal} bytes");
    }

    /// A reader that held the WAL once must not loosen the bound for good
    /// (found by review). While it stayed, each failed blocking checkpoint
    /// doubled `blocking_at`; once it has gone and the WAL has started over
    /// on its own (the background checkpointer copied everything in a quiet
    /// moment), sustained writes must be bounded by `hard_pages` again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_gone_leaves_the_bound_where_it_was() {
        let hard = 64;
        let (_dir, path, store) = filler_store(16, hard).await;
        let insert = |store: Store, id: i64, body: i64| async move {
            store
                .write(move |conn| {
                    conn.execute(
                        "INSERT INTO filler (id, body) VALUES (?1, zeroblob(?2))",
                        [id, body],
                    )
                })
                .await
                .unwrap();
        };
        // 1. A slow reader (a long `status`, a backup) holds a snapshot while
        //    some 300 pages are written: the writer's tries at ~64, ~128 and
        //    ~256 pages fail, so the next try is due past ~512.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM filler", [], |r| r.get(0))
            .unwrap();
        for id in 0..120 {
            insert(store.clone(), id, 3000).await;
        }
        reader.execute_batch("COMMIT").unwrap();
        drop(reader);
        // 2. The reader is gone. Light writes: the checkpointer, woken every
        //    `signal` pages, copies everything and the WAL starts over by
        //    itself (journal_size_limit trims the file back to `hard`).
        //    Step 1 grew the file well past `hard` pages, so a file at or
        //    under it proves the WAL started over (polled: on a loaded
        //    machine the checkpointer takes longer to catch up).
        let trimmed = hard as u64 * 4096;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut id = 120;
        while wal_bytes(&path) > trimmed {
            assert!(
                std::time::Instant::now() < deadline,
                "precondition: the WAL started over and was trimmed ({} bytes)",
                wal_bytes(&path)
            );
            insert(store.clone(), id, 100).await;
            id += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // One more commit, so the writer sees the WAL lower than before.
        insert(store.clone(), id, 100).await;
        // `hard` pages, plus the group that crossed it (here at most 16
        // rows of 2 KiB and their index pages), with room to spare: counted
        // in WAL frames (a 24-byte header each) after the 32-byte file
        // header. The loosened bound this guards against reached 2.3 MB.
        let bound = 32 + 3 * hard as u64 * (4096 + 24);
        // 3. Sustained writes, no reader anywhere: the bound must be back.
        let mut tasks = Vec::new();
        for writer in 0..16i64 {
            let (store, path) = (store.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let mut largest = 0;
                for row in 0..100i64 {
                    insert(store.clone(), 1000 + writer * 100 + row, 2048).await;
                    largest = largest.max(wal_bytes(&path));
                }
                largest
            }));
        }
        let mut largest = 0;
        for task in tasks {
            largest = largest.max(task.await.unwrap());
        }
        assert!(
            largest <= bound,
            "with no reader left the -wal file reached {largest} bytes (bound {bound}): \
             blocking_at kept the doubling from a reader long gone"
        );
    }

    /// At shutdown the writer stops the checkpointer and folds the WAL back
    /// into the database file (TRUNCATE), so a backup sees one file.
    #[tokio::test]
    async fn shutdown_folds_the_wal_back() {
        let (_dir, path, store) = filler_store(4, 1024).await;
        for id in 0..20 {
            store
                .write(move |conn| {
                    conn.execute(
                        "INSERT INTO filler (id, body) VALUES (?1, zeroblob(3000))",
                        [id],
                    )
                })
                .await
                .unwrap();
        }
        assert!(wal_bytes(&path) > 0, "the writes went to the WAL");
        drop(store);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while wal_bytes(&path) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the -wal file still holds {} bytes after shutdown",
                wal_bytes(&path)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The writer's connection must not checkpoint inside its commits.
    #[tokio::test]
    async fn the_writer_never_checkpoints_in_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let automatic: i64 = store
            .write(|conn| conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(automatic, 0, "automatic checkpoint on the writer");
    }
}
