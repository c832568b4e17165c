//! The run supervisor: exactly one ingest task (follower) per watched run,
//! following `watch`/`unwatch` through the store. Each follower is known by
//! its task id, so the end of an old follower (unwatched, slow to stop) can
//! never retire a newer one; and a run watched again while its old follower
//! is still stopping gets its new one only once the old one has ended. A
//! follower that panics or stops on a state database error is logged and
//! started again after a backoff.
//!
//! Only runs this process owns are followed, each under the fence
//! [`Ownership`] gives it: on SQLite every watched run (the daemon lock);
//! on PostgreSQL the runs whose leases this replica holds. A follower whose
//! lease is lost (or replaced by a newer epoch) is stopped like an
//! unwatched run's, and one whose write was refused for its fence is not
//! started again under that same fence: it would only be refused again.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::sinks::restart_backoff;
use super::{CONTROL_POLL, DaemonError, STARTUP_SPREAD_MAX, STARTUP_SPREAD_PER_RUN};
use crate::ingest::RunEnd;
use crate::ownership::Ownership;
use crate::store::{Fence, State, StateError, WatchedRun, now_ms};

/// What follows one run, writing under the fence it is given, until the
/// run ends or its token is cancelled.
pub(super) type Follow = Box<
    dyn Fn(
            WatchedRun,
            Fence,
            CancellationToken,
        ) -> Pin<Box<dyn Future<Output = FollowResult> + Send>>
        + Send
        + Sync,
>;
pub(super) type FollowResult = Result<RunEnd, StateError>;

/// The followers and their bookkeeping.
#[derive(Default)]
struct Followers {
    /// The one follower of each run: its task, stop switch and fence.
    running: HashMap<String, (Id, CancellationToken, Fence)>,
    /// Which run each task follows, under which fence (also tasks already
    /// told to stop).
    runs_by_task: HashMap<Id, (String, Fence)>,
    /// Runs with followers told to stop that have not ended yet: a new
    /// follower waits for them, so a run never has two at once.
    stopping: HashMap<String, usize>,
    /// A stopped follower ended: a run may wait for that to start again.
    rescan: bool,
    tasks: JoinSet<FollowResult>,
    /// Runs whose follower failed: consecutive failures, and not restarted
    /// before this instant.
    failed: HashMap<String, (u32, Instant)>,
    /// Runs whose follower's write was refused for its fence (the lease
    /// was lost before the lease task noticed): not started again until
    /// the run is owned under another fence.
    refused: HashMap<String, Fence>,
}

impl Followers {
    fn start(
        &mut self,
        follow: &Follow,
        run: WatchedRun,
        fence: Fence,
        cancel: CancellationToken,
        delay: Duration,
    ) {
        let run_id = run.run_id.clone();
        let future = follow(run, fence.clone(), cancel.clone());
        let stop = cancel.clone();
        let task = self.tasks.spawn(async move {
            if crate::ingest::sleep_or_cancel(delay, &stop).await {
                return Ok(RunEnd::Stopped);
            }
            future.await
        });
        self.runs_by_task
            .insert(task.id(), (run_id.clone(), fence.clone()));
        self.running.insert(run_id, (task.id(), cancel, fence));
    }

    /// Stops the followers of runs no longer watched, and of runs no longer
    /// owned under the fence their follower writes with.
    fn stop_unwanted(&mut self, watched: &HashSet<&str>, ownership: &Ownership) {
        self.running.retain(|run_id, (_, cancel, fence)| {
            let why = if !watched.contains(run_id.as_str()) {
                "unwatched; stopping ingest"
            } else if !ownership.still_holds(fence) {
                "lease no longer held; stopping ingest"
            } else {
                return true;
            };
            tracing::info!(run_id = %run_id, "{why}");
            cancel.cancel();
            *self.stopping.entry(run_id.clone()).or_default() += 1;
            false
        });
        self.failed
            .retain(|run_id, _| watched.contains(run_id.as_str()));
        self.refused.retain(|run_id, fence| {
            ownership.still_holds(fence) && watched.contains(run_id.as_str())
        });
    }

    /// Whether a run may get a follower now, under `fence`.
    fn may_start(&self, run: &WatchedRun, fence: &Fence, now: Instant) -> bool {
        !self.running.contains_key(&run.run_id)
            && !self.stopping.contains_key(&run.run_id)
            && !run.state.is_ended()
            && self.refused.get(&run.run_id) != Some(fence)
            && self
                .failed
                .get(&run.run_id)
                .is_none_or(|(_, not_before)| *not_before <= now)
    }

    /// Whether the watched runs must be looked at again although no
    /// `watch`/`unwatch` happened: a stopped follower ended (its run may
    /// have been watched again meanwhile), or a failed run is due.
    fn must_rescan(&mut self, now: Instant) -> bool {
        std::mem::take(&mut self.rescan)
            || self
                .failed
                .iter()
                .any(|(run_id, (_, at))| *at <= now && !self.running.contains_key(run_id))
    }

    /// Books a follower's end: only that task's own entry is retired. A
    /// follower that failed (panic, store error) is logged and its run
    /// scheduled for a restart after a backoff.
    fn ended(&mut self, joined: Result<(Id, FollowResult), JoinError>) {
        let (id, failure) = match joined {
            Ok((id, Ok(_))) => (id, None),
            Ok((id, Err(error))) if error.fence_refused() => {
                self.refused_by_fence(id, &error);
                (id, None)
            }
            Ok((id, Err(error))) => (id, Some(format!("state database error: {error}"))),
            Err(error) => {
                let id = error.id();
                let why = if error.is_panic() {
                    format!(
                        "panicked: {}",
                        super::sinks::panic_message(error.into_panic())
                    )
                } else {
                    "aborted".to_owned()
                };
                (id, Some(why))
            }
        };
        let Some((run_id, _)) = self.runs_by_task.remove(&id) else {
            return;
        };
        let current = self
            .running
            .get(&run_id)
            .is_some_and(|(task, _, _)| *task == id);
        if current {
            self.running.remove(&run_id);
        } else if let Some(count) = self.stopping.get_mut(&run_id) {
            *count -= 1;
            if *count == 0 {
                self.stopping.remove(&run_id);
            }
            self.rescan = true;
        }
        match failure {
            None => {
                self.failed.remove(&run_id);
            }
            // An unwatched run's follower: nothing to restart.
            Some(why) if !current => {
                tracing::warn!(run_id = %run_id, error = %why, "a stopped follower ended with an error");
            }
            Some(why) => {
                let failures = self.failed.get(&run_id).map_or(0, |(n, _)| *n) + 1;
                let wait = restart_backoff(failures);
                tracing::error!(run_id = %run_id, error = %why, failures, ?wait, "ingest stopped; restarting the run");
                self.failed
                    .insert(run_id, (failures, Instant::now() + wait));
            }
        }
    }

    /// A follower's write was refused for its fence: the run is another
    /// replica's now (or this one's under a newer epoch). Not a failure to
    /// restart from; the lease task stops or restarts the run.
    fn refused_by_fence(&mut self, id: Id, error: &StateError) {
        let Some((run_id, fence)) = self.runs_by_task.get(&id).cloned() else {
            return;
        };
        if matches!(error, StateError::LeaseLost { .. }) {
            tracing::info!(run_id = %run_id, %error, "lease lost; ingest stopped");
        } else {
            tracing::error!(run_id = %run_id, %error, "ingest wrote without its run's fence (a bug); not restarted under it");
        }
        self.refused.insert(run_id, fence);
    }

    /// Stops every follower and waits for them.
    async fn stop_all(&mut self) {
        for (_, cancel, _) in self.running.values() {
            cancel.cancel();
        }
        while let Some(joined) = self.tasks.join_next_with_id().await {
            match joined {
                Ok((_, Ok(_))) => {}
                Ok((id, Err(error))) => {
                    let run_id = self
                        .runs_by_task
                        .get(&id)
                        .map(|(run_id, _)| run_id.clone())
                        .unwrap_or_default();
                    tracing::warn!(run_id = %run_id, %error, "ingest ended with an error during shutdown");
                }
                Err(error) if error.is_panic() => {
                    let run_id = self
                        .runs_by_task
                        .get(&error.id())
                        .map(|(run_id, _)| run_id.clone())
                        .unwrap_or_default();
                    tracing::error!(run_id = %run_id, error = %super::sinks::panic_message(error.into_panic()), "ingest panicked during shutdown");
                }
                Err(_) => {}
            }
        }
    }
}

/// Keeps one follower per watched run, following `watch`/`unwatch`
/// through the store, until `shutdown`. A store read that fails is tried
/// again at the next look rather than stopping the daemon. `ownership`
/// says which runs this process owns, and gives each follower its fence.
pub(super) async fn supervise_runs(
    follow: Follow,
    reader: State,
    ownership: Ownership,
    shutdown: CancellationToken,
    heartbeat: Arc<AtomicI64>,
) -> Result<(), DaemonError> {
    let mut followers = Followers::default();
    let mut seen_generation = None;
    let mut owned_changes = ownership.changes();
    loop {
        heartbeat.store(now_ms(), Ordering::Relaxed);
        if let Err(error) = look(
            &follow,
            &reader,
            &ownership,
            &shutdown,
            &mut followers,
            &mut seen_generation,
        )
        .await
        {
            tracing::warn!(%error, "cannot read the watched runs; looking again shortly");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(joined) = followers.tasks.join_next_with_id() => followers.ended(joined),
            // Gained or lost leases, or a renewal that restored a lapsed
            // lease's trust: the next look starts and stops followers.
            _ = owned_changes.next() => followers.rescan = true,
            _ = tokio::time::sleep(CONTROL_POLL) => {}
        }
    }
    followers.stop_all().await;
    Ok(())
}

/// Starts and stops followers when the watched runs changed (or a failed
/// run is due for a restart).
async fn look(
    follow: &Follow,
    reader: &State,
    ownership: &Ownership,
    shutdown: &CancellationToken,
    followers: &mut Followers,
    seen_generation: &mut Option<i64>,
) -> Result<(), StateError> {
    let generation = reader.control_generation().await?;
    let now = Instant::now();
    if *seen_generation == Some(generation) && !followers.must_rescan(now) {
        return Ok(());
    }
    let watched = reader.watched_runs().await?;
    *seen_generation = Some(generation);
    let still_watched: HashSet<&str> = watched.iter().map(|w| w.run_id.as_str()).collect();
    followers.stop_unwanted(&still_watched, ownership);
    let starting: Vec<(WatchedRun, Fence)> = watched
        .iter()
        .filter_map(|run| Some((run, ownership.fence(&run.run_id)?)))
        .filter(|(run, fence)| followers.may_start(run, fence, now))
        .map(|(run, fence)| (run.clone(), fence))
        .collect();
    // Many runs at once (a start, a big `watch`) connect over a few
    // seconds rather than in one stampede.
    let spread = (STARTUP_SPREAD_PER_RUN * starting.len() as u32).min(STARTUP_SPREAD_MAX);
    for (run, fence) in starting {
        let delay = spread.mul_f64(crate::jitter::random_range(0.0..1.0));
        followers.start(follow, run, fence, shutdown.child_token(), delay);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::store::Sqlite;

    /// A follower that panics is logged, retired and started again (after
    /// the first restart backoff), and only one follower runs at a time.
    #[tokio::test]
    async fn a_panicked_follower_is_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let store = State::Sqlite(Sqlite::open_path(&dir.path().join("state.db")).unwrap());
        store
            .subscribe("r1".into(), Default::default(), "watch", None)
            .await
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let most_active = Arc::new(AtomicUsize::new(0));
        let follow: Follow = {
            let (calls, active, most_active) = (calls.clone(), active.clone(), most_active.clone());
            Box::new(move |_run, _fence, cancel| {
                let (calls, active, most_active) =
                    (calls.clone(), active.clone(), most_active.clone());
                Box::pin(async move {
                    let now_active = active.fetch_add(1, Ordering::SeqCst) + 1;
                    most_active.fetch_max(now_active, Ordering::SeqCst);
                    let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                    if first {
                        active.fetch_sub(1, Ordering::SeqCst);
                        panic!("follower bug");
                    }
                    cancel.cancelled().await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    Ok(RunEnd::Stopped)
                })
            })
        };
        let shutdown = CancellationToken::new();
        let supervisor = tokio::spawn(supervise_runs(
            follow,
            store.with_own_reader().unwrap(),
            Ownership::exclusive(),
            shutdown.clone(),
            Arc::new(AtomicI64::new(0)),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while calls.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "the panicked run was not restarted; calls: {}",
                calls.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        supervisor.await.unwrap().unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "restarted once, not spinning"
        );
        assert_eq!(
            most_active.load(Ordering::SeqCst),
            1,
            "one follower at a time"
        );
    }

    /// `unwatch` then `watch` while the old follower is slow to stop: the
    /// new one starts only once the old one has ended, and a later
    /// `unwatch` stops it (it was not orphaned by the old one's end).
    #[tokio::test]
    async fn a_run_watched_again_gets_one_follower_after_the_old_one_ended() {
        let dir = tempfile::tempdir().unwrap();
        let store = State::Sqlite(Sqlite::open_path(&dir.path().join("state.db")).unwrap());
        let watch = || store.subscribe("r1".into(), Default::default(), "watch", None);
        watch().await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let told_to_stop = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let most_active = Arc::new(AtomicUsize::new(0));
        let follow: Follow = {
            let counters = (
                calls.clone(),
                told_to_stop.clone(),
                active.clone(),
                most_active.clone(),
            );
            Box::new(move |_run, _fence, cancel| {
                let (calls, told_to_stop, active, most_active) = counters.clone();
                Box::pin(async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let now_active = active.fetch_add(1, Ordering::SeqCst) + 1;
                    most_active.fetch_max(now_active, Ordering::SeqCst);
                    cancel.cancelled().await;
                    told_to_stop.fetch_add(1, Ordering::SeqCst);
                    // Slow to stop, as inside a long request.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    Ok(RunEnd::Stopped)
                })
            })
        };
        let shutdown = CancellationToken::new();
        let supervisor = tokio::spawn(supervise_runs(
            follow,
            store.with_own_reader().unwrap(),
            Ownership::exclusive(),
            shutdown.clone(),
            Arc::new(AtomicI64::new(0)),
        ));
        let reach = |what: &'static str, counter: &Arc<AtomicUsize>, value: usize| {
            let counter = counter.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                while counter.load(Ordering::SeqCst) != value {
                    assert!(
                        Instant::now() < deadline,
                        "timed out waiting for {what}: {}",
                        counter.load(Ordering::SeqCst)
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        reach("the first follower", &calls, 1).await;
        store.unsubscribe("r1".into()).await.unwrap();
        reach("the first follower told to stop", &told_to_stop, 1).await;
        watch().await.unwrap();
        reach("the second follower", &calls, 2).await;
        store.unsubscribe("r1".into()).await.unwrap();
        reach("the second follower told to stop", &told_to_stop, 2).await;
        shutdown.cancel();
        supervisor.await.unwrap().unwrap();
        assert_eq!(
            most_active.load(Ordering::SeqCst),
            1,
            "one follower at a time"
        );
    }
}
