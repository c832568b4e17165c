//! Delivery to HTTP sinks, run by run.
//!
//! One dispatcher per sink keeps, in memory, only which runs have work (fed
//! by the store's new-work notices, or a scan at start and after a replay)
//! and which are waiting out a backoff; the deliveries themselves stay in
//! SQLite. For each run with work it starts a chain that delivers the run's
//! pending deliveries in order, up to `concurrency` runs at once. A chain
//! stops at the first failure (event N+1 waits for N), recording the retry
//! time in the store.
//!
//! By default a chain is strict: event N+1 is sent only once N's outcome is
//! committed, so a crash repeats at most the one delivery in flight, right
//! after itself. A webhook sink with `pipeline = true` keeps per-run order
//! as "N+1 is not *sent* before N was *answered*" (2xx, or recorded as
//! dead) and takes the commit off the chain's critical path: answered
//! deliveries are handed to the writer in batches behind the chain
//! ([`Marks`]), folded into its group commits with every other chain's. A
//! crash between an answer and its commit sends the answered-but-unmarked
//! deliveries again, same ids, at most [`PIPELINE_WINDOW`] per run. A failure
//! is recorded before anything after it is sent. A chain's reads skip what it
//! holds answered but not yet marked, and it waits for its marks before it
//! ends (a stop included: its mark jobs retry store errors until they
//! commit, and only the drain's grace running out aborts them), so within
//! one daemon's life nothing answered is sent twice.
//!
//! A sink that fails `DOWN_AFTER` times in a row is marked down: no chains
//! start, and one probe delivery goes out at the backoff pace until the sink
//! answers; then every waiting delivery is due at once and the backlog
//! drains.
//!
//! Chains start only for runs this process owns ([`Ownership`]: every run on
//! SQLite; on PostgreSQL the runs whose leases this replica holds), each
//! under its run's fence, taken once per chain. A gained lease makes the
//! dispatcher look for pending work at once (the run's backlog does not
//! wait for a new event); a chain checks before each send that its lease is
//! still held, and one whose write is refused with `LeaseLost` ends its
//! run's work only (the new owner sends again under the same ids). A write
//! refused as `Unfenced` or `LeaseOnSqlite` is a wiring bug: the loop stops
//! with it, for its supervisor to log, mark the sink down and restart
//! with backoff.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::retry::{failure_rows, retry_delay};
use crate::config::DeliveryPolicy;
use crate::ownership::{Ownership, Working};
use crate::sink::{Event, Outcome, Sender};
use crate::store::{Fence, Pending, State, StateError, now_ms};

/// Consecutive failed attempts that mark a sink down.
const DOWN_AFTER: u32 = 5;
/// Deliveries a chain reads at a time.
const CHAIN_BATCH: usize = 64;
/// Pipelined chains: the most deliveries a chain holds answered but not yet
/// committed done (the batch being committed plus those gathered since). It
/// bounds what a crash makes a receiver see again per run, and what a slow
/// disk makes a chain hold in memory; 64 round trips on loopback take about
/// as long as one `synchronous=FULL` commit, so a chain rarely waits for one.
pub const PIPELINE_WINDOW: usize = 64;
/// How often the dispatcher looks for replays from the command line.
const CONTROL_POLL: Duration = Duration::from_secs(1);
/// At least this long before a run whose chain met a store error is tried again.
const STORE_RETRY: Duration = Duration::from_millis(500);

/// Everything a chain needs.
pub struct SinkRuntime {
    pub name: Arc<str>,
    pub sender: Sender,
    pub policy: DeliveryPolicy,
    pub ordered: bool,
    /// Webhook `pipeline = true`: see the module doc. Only ordered chains
    /// use it; unordered ones never wait for a mark.
    pub pipeline: bool,
    pub concurrency: usize,
    /// With a read connection of its own: chains read often.
    pub state: State,
    /// Which runs this process may deliver, and under which fence.
    pub ownership: Ownership,
    pub shutdown: CancellationToken,
}

impl SinkRuntime {
    /// The fence a run's chain writes its outcomes under, taken once when
    /// the chain starts; `None` when another replica owns the run.
    fn fence_for(&self, run_id: &str) -> Option<Fence> {
        self.ownership.fence(run_id)
    }
}

/// How a chain ended.
#[derive(Debug)]
enum ChainEnd {
    /// Nothing pending for the run.
    Drained,
    /// The head waits until this time (unix ms).
    Blocked(i64),
    /// A probe sent its one delivery; more may be pending.
    Paused,
    /// Shutdown.
    Stopped,
    /// A write was refused with `LeaseLost`: the run's new owner
    /// delivers it.
    Lost,
    /// The lease was no longer trusted before a send (lost, overdue, or a
    /// renewal late): set aside until a renewal or a loss says which.
    Lapsed,
    /// A write was refused for a fence this process should never have
    /// used (`Unfenced`, `LeaseOnSqlite`): a bug that stops the sink.
    Misfenced(StateError),
}

#[derive(Debug)]
struct ChainReport {
    run_id: Arc<str>,
    /// What the chain wrote under.
    fence: Fence,
    end: ChainEnd,
    delivered: u32,
    failed: u32,
}

/// What recording an outcome did.
enum Recorded {
    Done,
    Dead,
    RetryAt(i64),
    /// A failure not recorded: the lease was no longer held when it came
    /// (a Slack sink refuses to send for a run lost during its rate-limit
    /// wait), so the run's new owner sends, with no attempt counted here.
    Lapsed,
}

/// The dispatcher's view of one sink.
#[derive(Default)]
struct Board {
    /// Runs that may have due work, not in flight.
    work: BTreeSet<Arc<str>>,
    in_flight: HashSet<Arc<str>>,
    /// In flight and told of new work meanwhile.
    dirty: HashSet<Arc<str>>,
    /// Runs whose head waits until (unix ms).
    blocked: BTreeMap<Arc<str>, i64>,
    /// Runs with work whose lease is listed but not trusted right now.
    parked: BTreeSet<Arc<str>>,
    consecutive_failures: u32,
    down: bool,
    probe_failures: u32,
    next_probe: Option<Instant>,
}

impl Board {
    fn add_work(&mut self, run_id: Arc<str>) {
        if self.in_flight.contains(&run_id) {
            self.dirty.insert(run_id);
        } else if !self.blocked.contains_key(&run_id) {
            self.work.insert(run_id);
        }
    }

    /// Work for a run, as this process may do it now: booked when the run
    /// is owned; set aside when its lease is listed but not trusted right
    /// now (a late renewal), so the renewal brings it back rather than the
    /// run's next event (a finished run has none); dropped when another
    /// replica owns it.
    fn book(&mut self, ownership: &Ownership, run_id: Arc<str>) {
        if ownership.fence(&run_id).is_some() {
            self.add_work(run_id);
        } else if ownership.listed(&run_id) {
            self.parked.insert(run_id);
        }
    }

    /// Blocked runs whose time has come go back to work.
    fn unblock_due(&mut self, now: i64) {
        let due: Vec<Arc<str>> = self
            .blocked
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(run, _)| run.clone())
            .collect();
        for run in due {
            self.blocked.remove(&run);
            self.work.insert(run);
        }
    }

    /// Runs whose leases were lost: not worked here any more (a chain in
    /// flight sees it before its next send).
    fn forget(&mut self, lost: &[crate::store::pg::Lease]) {
        for lease in lost {
            self.work.remove(&lease.run_id);
            self.blocked.remove(&lease.run_id);
            self.dirty.remove(&lease.run_id);
            self.parked.remove(&lease.run_id);
        }
    }

    /// After a publication: parked runs trusted again go back to work;
    /// those no longer listed are another replica's.
    fn unpark(&mut self, ownership: &Ownership) {
        let parked = std::mem::take(&mut self.parked);
        for run in parked {
            if ownership.fence(&run).is_some() {
                // Its chain may be in flight (booked by a notice handled
                // before this change): never a second one beside it.
                self.add_work(run);
            } else if ownership.listed(&run) {
                self.parked.insert(run);
            }
        }
    }

    /// When the dispatcher must look again by itself.
    fn next_wake(&self) -> Instant {
        let now_ms = now_ms();
        let blocked = self
            .blocked
            .values()
            .min()
            .map(|at| Instant::now() + Duration::from_millis((at - now_ms).max(0) as u64));
        let probe = if self.down { self.next_probe } else { None };
        [blocked, probe, Some(Instant::now() + CONTROL_POLL)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + CONTROL_POLL)
    }
}

/// Runs a sink's deliveries until shutdown. A store error does not end it:
/// the dispatcher backs off and looks again, a chain leaves its run blocked
/// for a moment, and outcomes are written until the store takes them. A
/// chain that panics takes the loop with it, for the daemon to restart.
pub async fn run_http_sink(sink: Arc<SinkRuntime>) -> Result<(), StateError> {
    let mut new_work = sink.state.new_work();
    let mut board = Board::default();
    let mut chains: JoinSet<ChainReport> = JoinSet::new();
    let mut control = None;
    let mut store_errors = 0;
    let mut owned_changes = sink.ownership.changes();
    loop {
        if let Err(error) = rescan(&sink, &mut board, &mut control).await {
            store_errors += 1;
            let wait = super::store_backoff(store_errors);
            tracing::warn!(sink = %sink.name, %error, ?wait, "delivery: cannot read the state database; retrying");
            control = None;
            if crate::ingest::sleep_or_cancel(wait, &sink.shutdown).await {
                break;
            }
            continue;
        }
        store_errors = 0;
        board.unblock_due(now_ms());
        start_chains(&sink, &mut board, &mut chains);
        let wake = board.next_wake();
        tokio::select! {
            notice = new_work.recv() => match notice {
                Ok(notice) if notice.sinks.contains(&sink.name) => {
                    board.book(&sink.ownership, notice.run_id)
                }
                Ok(_) => {}
                // Missed notices: rescan on the next turn.
                Err(RecvError::Lagged(_)) => control = None,
                Err(RecvError::Closed) => return Ok(()),
            },
            change = owned_changes.next() => {
                board.forget(&change.lost);
                board.unpark(&sink.ownership);
                // Gained runs may have a backlog: rescan on the next turn.
                if !change.gained.is_empty() {
                    control = None;
                }
            }
            Some(joined) = chains.join_next() => match joined {
                Ok(ChainReport { end: ChainEnd::Misfenced(error), run_id, .. }) => {
                    tracing::error!(sink = %sink.name, run_id = %run_id, %error, "delivery wrote under the wrong fence (a bug); stopping the sink");
                    return Err(error);
                }
                Ok(report) => finish_chain(&sink, &mut board, report).await,
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Err(_) => {}
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = sink.shutdown.cancelled() => break,
        }
    }
    // In-flight chains stop after the delivery they are sending.
    while chains.join_next().await.is_some() {}
    Ok(())
}

/// After a control change (a replay from the command line) or missed
/// notices, every run with pending deliveries is work again.
async fn rescan(
    sink: &SinkRuntime,
    board: &mut Board,
    control: &mut Option<i64>,
) -> Result<(), StateError> {
    let generation = sink.state.control_generation().await?;
    if *control != Some(generation) {
        for run in sink.state.runs_with_pending(&sink.name).await? {
            board.book(&sink.ownership, Arc::from(run));
        }
        *control = Some(generation);
    }
    Ok(())
}

fn start_chains(sink: &Arc<SinkRuntime>, board: &mut Board, chains: &mut JoinSet<ChainReport>) {
    if board.down {
        let probe_due = board.next_probe.is_none_or(|at| at <= Instant::now());
        if chains.is_empty() && probe_due {
            // The run waiting longest (or any with work) carries the probe.
            let run = board
                .blocked
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(run, _)| run.clone())
                .or_else(|| board.work.first().cloned());
            if let Some(run) = run {
                board.blocked.remove(&run);
                board.work.remove(&run);
                let working = sink.ownership.working(&run);
                // Lost since it was booked (its new owner probes), or its
                // lease not trusted right now.
                let Some(fence) = sink.fence_for(&run) else {
                    if sink.ownership.listed(&run) {
                        board.parked.insert(run);
                    }
                    return;
                };
                board.in_flight.insert(run.clone());
                chains.spawn(chain(sink.clone(), run, fence, true, working));
            }
        }
        return;
    }
    while chains.len() < sink.concurrency {
        let Some(run) = board.work.pop_first() else {
            break;
        };
        let working = sink.ownership.working(&run);
        // Lost since it was booked (its new owner delivers it), or its
        // lease not trusted right now.
        let Some(fence) = sink.fence_for(&run) else {
            if sink.ownership.listed(&run) {
                board.parked.insert(run);
            }
            continue;
        };
        board.in_flight.insert(run.clone());
        chains.spawn(chain(sink.clone(), run, fence, false, working));
    }
}

/// Books a chain's end. The store writes here only inform (`status`, the
/// backlog's early release): failing them is logged, not fatal.
async fn finish_chain(sink: &SinkRuntime, board: &mut Board, report: ChainReport) {
    board.in_flight.remove(&report.run_id);
    let had_news = board.dirty.remove(&report.run_id);
    match report.end {
        ChainEnd::Paused => {
            board.work.insert(report.run_id.clone());
        }
        ChainEnd::Drained if had_news => {
            board.work.insert(report.run_id.clone());
        }
        // Held again under a newer epoch meanwhile: work it under that one.
        // Under the same one (refused before the lease task noticed), not
        // until the lease task says otherwise.
        ChainEnd::Lost
            if sink
                .fence_for(&report.run_id)
                .is_some_and(|f| f != report.fence) =>
        {
            board.work.insert(report.run_id.clone());
        }
        // Parked while its lease is listed but not trusted; back to work
        // at once when it is (renewed meanwhile, or held again under a
        // newer epoch while this chain ran under the older one).
        ChainEnd::Lapsed => board.book(&sink.ownership, report.run_id.clone()),
        ChainEnd::Drained | ChainEnd::Stopped | ChainEnd::Lost | ChainEnd::Misfenced(_) => {}
        ChainEnd::Blocked(at) => {
            board.blocked.insert(report.run_id.clone(), at);
        }
    }
    if report.delivered > 0 {
        board.consecutive_failures = 0;
        if board.down {
            board.down = false;
            board.probe_failures = 0;
            board.next_probe = None;
            match sink.state.release_backoff(sink.name.clone()).await {
                Ok(released) => {
                    tracing::info!(sink = %sink.name, released, "sink answers again; draining its backlog")
                }
                Err(error) => {
                    tracing::warn!(sink = %sink.name, %error, "sink answers again; its backlog keeps its own backoff")
                }
            }
            set_sink_down(sink, false).await;
            let waiting: Vec<Arc<str>> = std::mem::take(&mut board.blocked).into_keys().collect();
            board.work.extend(waiting);
        }
    }
    if report.failed > 0 && report.delivered == 0 {
        board.consecutive_failures += report.failed;
        if board.down {
            board.probe_failures += 1;
            let wait = retry_delay(&sink.policy, board.probe_failures, None);
            board.next_probe = Some(Instant::now() + wait);
        } else if board.consecutive_failures >= DOWN_AFTER {
            board.down = true;
            board.probe_failures = 1;
            board.next_probe = Some(Instant::now() + retry_delay(&sink.policy, 1, None));
            tracing::warn!(sink = %sink.name, failures = board.consecutive_failures, "sink marked down; probing with one delivery at a time");
            set_sink_down(sink, true).await;
        }
    }
}

async fn set_sink_down(sink: &SinkRuntime, down: bool) {
    if let Err(error) = sink.state.set_sink_down(sink.name.clone(), down).await {
        tracing::warn!(sink = %sink.name, %error, down, "cannot record the sink's state for status");
    }
}

/// Delivers one run's pending deliveries in order until the run is drained,
/// a delivery must wait, or shutdown. A probe sends one delivery, due or not.
/// A store error blocks the run for a moment (`STORE_RETRY`). `_working`
/// lives as long as the chain: a lease shed meanwhile is released only
/// after it, so its last send's mark still commits.
async fn chain(
    sink: Arc<SinkRuntime>,
    run_id: Arc<str>,
    fence: Fence,
    probe: bool,
    _working: Working,
) -> ChainReport {
    let mut report = ChainReport {
        run_id: run_id.clone(),
        fence: fence.clone(),
        end: ChainEnd::Drained,
        delivered: 0,
        failed: 0,
    };
    match deliver_run(&sink, &run_id, &fence, probe, &mut report).await {
        Ok(()) => {}
        Err(error @ StateError::LeaseLost { .. }) => {
            tracing::info!(sink = %sink.name, run_id = %run_id, %error, "lease lost; the run's new owner delivers it");
            report.end = ChainEnd::Lost;
        }
        Err(error) if error.fence_refused() => report.end = ChainEnd::Misfenced(error),
        Err(error) => store_error(&sink, &run_id, error, &mut report),
    }
    report
}

/// A store error blocks the run for a moment (`STORE_RETRY`).
fn store_error(sink: &SinkRuntime, run_id: &str, error: StateError, report: &mut ChainReport) {
    let wait = super::store_backoff(1).max(STORE_RETRY);
    tracing::warn!(sink = %sink.name, run_id = %run_id, %error, ?wait, "delivery: state database error; the run waits");
    report.end = ChainEnd::Blocked(now_ms() + wait.as_millis() as i64);
}

async fn deliver_run(
    sink: &Arc<SinkRuntime>,
    run_id: &Arc<str>,
    fence: &Fence,
    probe: bool,
    report: &mut ChainReport,
) -> Result<(), StateError> {
    let mut marks = Marks::default();
    let delivered = deliver_batches(sink, run_id, fence, probe, report, &mut marks).await;
    // Before the chain reports, shutdown included: what it leaves unmarked
    // the next chain (or the next daemon) would send again.
    let marked = marks.flush(sink, fence).await;
    delivered.and(marked)
}

async fn deliver_batches(
    sink: &Arc<SinkRuntime>,
    run_id: &Arc<str>,
    fence: &Fence,
    probe: bool,
    report: &mut ChainReport,
    marks: &mut Marks,
) -> Result<(), StateError> {
    loop {
        // Read past what is answered but maybe not committed yet, and leave
        // it out: the chain goes on without waiting for its marks.
        let mut batch = sink
            .state
            .pending_for_run(&sink.name, run_id, CHAIN_BATCH + marks.unrecorded())
            .await?;
        batch.retain(|pending| !marks.holds(pending.event));
        if batch.is_empty() {
            report.end = ChainEnd::Drained;
            return Ok(());
        }
        let end = if sink.ordered {
            deliver_in_order(sink, fence, batch, probe, report, marks).await?
        } else {
            deliver_unordered(sink, fence, batch, probe, report).await?
        };
        if let Some(end) = end {
            report.end = end;
            return Ok(());
        }
        if probe {
            report.end = ChainEnd::Paused;
            return Ok(());
        }
    }
}

/// Returns `Some(end)` when the chain must stop. Strict, every outcome is
/// committed before the next send; pipelined, a 2xx goes to `marks` and the
/// next delivery goes out at once, while a failure is still recorded first
/// (dead: the chain goes on; retry: it stops).
async fn deliver_in_order(
    sink: &Arc<SinkRuntime>,
    fence: &Fence,
    batch: Vec<Pending>,
    probe: bool,
    report: &mut ChainReport,
    marks: &mut Marks,
) -> Result<Option<ChainEnd>, StateError> {
    for pending in batch {
        if sink.shutdown.is_cancelled() {
            return Ok(Some(ChainEnd::Stopped));
        }
        if !sink.ownership.still_holds(fence) {
            return Ok(Some(ChainEnd::Lapsed));
        }
        if !probe && pending.next_attempt_at > now_ms() {
            return Ok(Some(ChainEnd::Blocked(pending.next_attempt_at)));
        }
        let outcome = send(sink, fence, &pending, marks).await?;
        let recorded = if sink.pipeline && outcome == Outcome::Delivered {
            crate::crashpoint::hit("http.before_mark");
            marks.answered(sink, fence, pending).await?;
            Recorded::Done
        } else {
            record(sink, fence, &pending, outcome).await?
        };
        match recorded {
            Recorded::Done => report.delivered += 1,
            Recorded::Dead => report.failed += 1,
            Recorded::RetryAt(at) => {
                report.failed += 1;
                return Ok(Some(ChainEnd::Blocked(at)));
            }
            Recorded::Lapsed => return Ok(Some(ChainEnd::Lapsed)),
        }
        if probe {
            return Ok(Some(ChainEnd::Paused));
        }
    }
    Ok(None)
}

/// Sends one delivery. A shutdown that comes while it is in flight commits
/// the marks gathered so far alongside it: the drain may end
/// (`shutdown_grace`) before a slow receiver answers, and what was
/// answered before must not be sent again after the restart.
async fn send(
    sink: &Arc<SinkRuntime>,
    fence: &Fence,
    pending: &Pending,
    marks: &mut Marks,
) -> Result<Outcome, StateError> {
    let event = Event::from(pending);
    let send = sink.sender.send(&event);
    if marks.unrecorded() == 0 {
        return Ok(send.await);
    }
    tokio::pin!(send);
    tokio::select! {
        outcome = &mut send => Ok(outcome),
        () = sink.shutdown.cancelled() => {
            let (marked, outcome) = tokio::join!(marks.flush(sink, fence), send);
            marked.map(|()| outcome)
        }
    }
}

/// Aborted if dropped: a chain dropped mid-way (the drain's grace ran out,
/// a sibling chain's panic) takes its mark job with it, so nothing a
/// chain started runs on after it (`daemon/owned.rs`); what it held
/// answered is sent again later, same ids.
type MarkJob = AbortOnDropHandle<Result<(), StateError>>;

/// A pipelined chain's done-marks on their way to the writer: at most one
/// job in flight, the deliveries answered meanwhile gathered for the next,
/// so a chain costs the writer one job per commit rather than one per
/// event. The job is a task of its own so that it commits while the chain
/// goes on sending.
#[derive(Default)]
struct Marks {
    /// The job committing, and the deliveries (event rows) it marks.
    in_flight: Option<(MarkJob, Vec<i64>)>,
    gathered: Vec<Pending>,
}

impl Marks {
    /// Deliveries answered and not yet known to be committed done.
    fn unrecorded(&self) -> usize {
        self.gathered.len() + self.in_flight.as_ref().map_or(0, |(_, n)| n.len())
    }

    /// Whether the delivery of this event row is answered and unrecorded:
    /// a read of the store may still see it pending.
    fn holds(&self, event: i64) -> bool {
        self.gathered.iter().any(|p| p.event == event)
            || self
                .in_flight
                .as_ref()
                .is_some_and(|(_, events)| events.contains(&event))
    }

    /// Books a delivery answered 2xx. Hands what is gathered to the writer
    /// when no job is committing; waits for everything to be committed once
    /// [`PIPELINE_WINDOW`] deliveries are unrecorded, so that the next send
    /// never starts with a full window.
    async fn answered(
        &mut self,
        sink: &Arc<SinkRuntime>,
        fence: &Fence,
        pending: Pending,
    ) -> Result<(), StateError> {
        self.gathered.push(pending);
        if self.unrecorded() >= PIPELINE_WINDOW {
            return self.flush(sink, fence).await;
        }
        let idle = self
            .in_flight
            .as_ref()
            .is_none_or(|(job, _)| job.is_finished());
        if idle {
            self.wait().await?;
            self.submit(sink, fence);
        }
        Ok(())
    }

    /// Returns once every answered delivery is committed done.
    async fn flush(&mut self, sink: &Arc<SinkRuntime>, fence: &Fence) -> Result<(), StateError> {
        self.wait().await?;
        self.submit(sink, fence);
        self.wait().await
    }

    /// The job is a task of its own, so it takes its own copy of the fence
    /// (one per commit, not per delivery).
    fn submit(&mut self, sink: &Arc<SinkRuntime>, fence: &Fence) {
        if self.gathered.is_empty() {
            return;
        }
        let delivered = std::mem::take(&mut self.gathered);
        let events = delivered.iter().map(|p| p.event).collect();
        let job = AbortOnDropHandle::new(tokio::spawn(mark_delivered(
            sink.clone(),
            fence.clone(),
            delivered,
        )));
        self.in_flight = Some((job, events));
    }

    /// The job in flight, if any, to its end.
    async fn wait(&mut self) -> Result<(), StateError> {
        let Some((job, _)) = self.in_flight.take() else {
            return Ok(());
        };
        match job.await {
            Ok(marked) => marked,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Cancelled: the runtime is going away.
            Err(_) => Err(StateError::Sqlite(crate::store::StoreError::Closed)),
        }
    }
}

/// Marks answered deliveries done, retrying store errors until they commit,
/// a stop included: the receiver has these, and a mark given up would be up
/// to a window of deliveries sent again by this same daemon once the sink
/// restarts (a reload). Only dropping the job (the drain's grace) ends it
/// sooner. The `delivered` metric counts them once committed.
async fn mark_delivered(
    sink: Arc<SinkRuntime>,
    fence: Fence,
    delivered: Vec<Pending>,
) -> Result<(), StateError> {
    let events: Vec<i64> = delivered.iter().map(|p| p.event).collect();
    let never = CancellationToken::new();
    super::retry_store(&sink.name, &never, || {
        sink.state
            .mark_delivered(&fence, sink.name.clone(), events.clone(), None)
    })
    .await?;
    super::count_delivered(&sink.name, &delivered);
    Ok(())
}

/// `ordered = false`: the due deliveries of the batch go out in parallel.
async fn deliver_unordered(
    sink: &SinkRuntime,
    fence: &Fence,
    batch: Vec<Pending>,
    probe: bool,
    report: &mut ChainReport,
) -> Result<Option<ChainEnd>, StateError> {
    if sink.shutdown.is_cancelled() {
        return Ok(Some(ChainEnd::Stopped));
    }
    if !sink.ownership.still_holds(fence) {
        return Ok(Some(ChainEnd::Lapsed));
    }
    let now = now_ms();
    let (due, waiting): (Vec<Pending>, Vec<Pending>) = batch
        .into_iter()
        .partition(|p| probe || p.next_attempt_at <= now);
    let due: Vec<Pending> = if probe {
        due.into_iter().take(1).collect()
    } else {
        due
    };
    let mut earliest = waiting.iter().map(|p| p.next_attempt_at).min();
    // The lease is checked before each send, not once for the batch: a
    // batch sent `concurrency` at a time to a slow receiver outlasts the
    // lease's trust, and what it sent after would reach the receiver after
    // another replica took the run over. `None`: not sent, for that reason.
    let results: Vec<Result<Option<Recorded>, StateError>> = futures::stream::iter(due)
        .map(|pending| async move {
            if !sink.ownership.still_holds(fence) {
                return Ok(None);
            }
            let outcome = sink.sender.send(&Event::from(&pending)).await;
            record(sink, fence, &pending, outcome).await.map(Some)
        })
        .buffer_unordered(sink.concurrency)
        .collect()
        .await;
    let mut lapsed = false;
    for result in results {
        match result? {
            None => lapsed = true,
            Some(Recorded::Done) => report.delivered += 1,
            Some(Recorded::Dead) => report.failed += 1,
            Some(Recorded::RetryAt(at)) => {
                report.failed += 1;
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
            Some(Recorded::Lapsed) => lapsed = true,
        }
    }
    if lapsed {
        return Ok(Some(ChainEnd::Lapsed));
    }
    Ok(earliest.map(ChainEnd::Blocked))
}

/// Writes an attempt's outcome: done, a scheduled retry, or a dead letter.
async fn record(
    sink: &SinkRuntime,
    fence: &Fence,
    pending: &Pending,
    outcome: Outcome,
) -> Result<Recorded, StateError> {
    if outcome == Outcome::Delivered {
        crate::crashpoint::hit("http.before_mark");
        super::retry_store(&sink.name, &sink.shutdown, || {
            sink.state
                .mark_delivered(fence, sink.name.clone(), vec![pending.event], None)
        })
        .await?;
        super::count_delivered(&sink.name, std::slice::from_ref(pending));
        return Ok(Recorded::Done);
    }
    if !sink.ownership.still_holds(fence) {
        return Ok(Recorded::Lapsed);
    }
    let attempts = pending.attempts + 1;
    let mut recorded = Recorded::Done;
    // One delivery failed: one row, dead or retried.
    for failure in failure_rows(&sink.policy, outcome, attempts, &[pending], now_ms()) {
        let error = &failure.error;
        if failure.dead {
            tracing::warn!(sink = %sink.name, id = %pending.id, attempts, %error, "delivery dead-lettered");
        } else {
            tracing::debug!(sink = %sink.name, id = %pending.id, attempts, %error, "delivery failed; will retry");
        }
        super::retry_store(&sink.name, &sink.shutdown, || {
            sink.state
                .record_failure(fence, sink.name.clone(), failure.clone())
        })
        .await?;
        let state = if failure.dead { "dead" } else { "retry" };
        crate::metrics::metrics().delivery(&sink.name, state);
        recorded = if failure.dead {
            Recorded::Dead
        } else {
            Recorded::RetryAt(failure.next_attempt_at)
        };
    }
    Ok(recorded)
}

/// What a pipelined chain does with its window of
/// answered-but-unmarked deliveries when its sink is stopped (a reload, or
/// SIGTERM) while the store refuses writes for a while.
#[cfg(test)]
mod stop_tests {
    use std::path::Path;
    use std::sync::Mutex;

    use super::*;
    use crate::config::{Config, SinkKind};
    use crate::sink::webhook::WebhookSink;
    use crate::store::{Batch, NewEvent, Sqlite};

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    /// A receiver that answers 204 after `delay` and logs every webhook-id.
    async fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
        use axum::http::{HeaderMap, StatusCode};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let app = axum::Router::new().route(
            "/h",
            axum::routing::post(move |headers: HeaderMap| {
                let log = log.clone();
                async move {
                    let id = headers["webhook-id"].to_str().unwrap().to_owned();
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    log.lock().unwrap().push(id);
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/h"), seen)
    }

    fn runtime(store: &State, url: &str, stop: CancellationToken) -> Arc<SinkRuntime> {
        runtime_owning(store, url, stop, Ownership::exclusive())
    }

    fn runtime_owning(
        store: &State,
        url: &str,
        stop: CancellationToken,
        ownership: Ownership,
    ) -> Arc<SinkRuntime> {
        let text = format!(
            "[api]\ntoken = \"t\"\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\npipeline = true\n[[routes]]\nsinks = [\"ops\"]\n"
        );
        let config = Config::parse(&text, Path::new("t.toml"), &|_| None).unwrap();
        let sink = &config.sinks["ops"];
        let SinkKind::Webhook(webhook) = &sink.kind else {
            panic!("a webhook")
        };
        Arc::new(SinkRuntime {
            name: sink.name.clone(),
            sender: Sender::Webhook(WebhookSink::new(webhook).unwrap()),
            policy: sink.delivery.clone(),
            ordered: true,
            pipeline: true,
            concurrency: 4,
            state: store.with_own_reader().unwrap(),
            ownership,
            shutdown: stop,
        })
    }

    fn seen(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
        log.lock().unwrap().clone()
    }

    /// A sink restarted within one daemon's life (SIGHUP with a changed
    /// sink, e.g. `pipeline` flipped or a header added) while the state
    /// database refuses writes (another process holds the write lock past
    /// busy_timeout, a full disk): the old chain's mark jobs keep trying
    /// after the stop, so its answered deliveries are marked before the new
    /// loop reads the store, and the daemon sends none of them twice. (They
    /// used to give up at the stop, and the new loop sent the whole window
    /// again: found by review.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_restarted_while_the_store_is_locked_sends_nothing_answered_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = State::Sqlite(Sqlite::open_path(&path).unwrap());
        let run = "r1";
        store
            .subscribe(run.into(), Default::default(), "config", None)
            .await
            .unwrap();
        let events = 400;
        store
            .record_batch(
                &Fence::Exclusive,
                Batch {
                    run_id: run.into(),
                    events: (1..=events)
                        .map(|sequence| NewEvent {
                            sequence,
                            event_type: "STEP".into(),
                            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                            created_at: None,
                            sinks: vec!["ops".into()],
                        })
                        .collect(),
                    run_status: Some("running".into()),
                    phase: None,
                    finish: None,
                    stalled: None,
                },
            )
            .await
            .unwrap();
        let (url, log) = receiver().await;

        // Life of the first sink loop.
        let stop_a = CancellationToken::new();
        let a = tokio::spawn(run_http_sink(runtime(&store, &url, stop_a.clone())));
        while seen(&log).len() < 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Another process takes the write lock (a sqlite3 shell, a VACUUM;
        // or read it as the disk filling up). The chain goes on sending:
        // what it gets answered from now on cannot be marked.
        let blocker = rusqlite::Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let blocked_at = seen(&log).len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen(&log).len() < blocked_at + 5 {
            assert!(
                Instant::now() < deadline,
                "the chain goes on while marks wait"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A reload restarts the sink: its stop token is cancelled and the
        // registry joins the old loop before it starts the new one. Its
        // mark jobs meet the lock after the stop; they must not give up.
        // The writer reports the lock after its busy_timeout twice (the
        // group, then the job on its own: about 20 s); a job that gives up
        // at the stop has ended the loop by then, one that keeps trying has
        // not. So the lock is held until the loop ends or 30 s passed.
        stop_a.cancel();
        let mut a = a;
        let stopped = tokio::time::timeout(Duration::from_secs(30), &mut a).await;
        println!(
            "the first loop ended while the store was locked: {}",
            stopped.is_ok()
        );
        blocker.execute_batch("ROLLBACK").unwrap();
        drop(blocker);
        if stopped.is_err() {
            a.await.unwrap().ok();
        }

        // Same daemon, the sink's new loop.
        let stop_b = CancellationToken::new();
        let b = tokio::spawn(run_http_sink(runtime(&store, &url, stop_b.clone())));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ids: std::collections::HashSet<String> = seen(&log).into_iter().collect();
            if ids.len() == events as usize || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_b.cancel();
        b.await.unwrap().ok();

        let all = seen(&log);
        let mut once = std::collections::HashSet::new();
        let twice: Vec<&String> = all.iter().filter(|id| !once.insert(*id)).collect();
        assert_eq!(once.len(), events as usize, "every event delivered");
        assert!(
            twice.is_empty(),
            "{} deliveries the first loop had answered were sent again by the same daemon \
             after the sink restarted: {:?}..",
            twice.len(),
            twice.iter().take(5).collect::<Vec<_>>()
        );
    }

    /// A run lost and held again under a newer epoch while its chain of
    /// the older one was running: that chain ends `Lapsed` at its next
    /// send, and the run goes back to work under the newer lease at once
    /// (it used to be parked until the next lease tick, a third of a ttl,
    /// with the notices that came meanwhile).
    #[tokio::test]
    async fn a_lapsed_chain_of_an_older_epoch_hands_its_run_to_the_newer_one_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = State::Sqlite(Sqlite::open_path(&dir.path().join("state.db")).unwrap());
        let (publisher, ownership) = Ownership::leased();
        let lease = |epoch| crate::store::pg::Lease {
            run_id: "r1".into(),
            epoch,
        };
        publisher.publish([(
            lease(7),
            std::time::Instant::now() + Duration::from_secs(60),
        )]);
        let sink = runtime_owning(
            &store,
            "http://127.0.0.1:9/h",
            CancellationToken::new(),
            ownership,
        );
        let run: Arc<str> = "r1".into();
        let mut board = Board::default();
        board.in_flight.insert(run.clone());
        let report = ChainReport {
            run_id: run.clone(),
            fence: Fence::Lease(lease(5)),
            end: ChainEnd::Lapsed,
            delivered: 0,
            failed: 0,
        };
        finish_chain(&sink, &mut board, report).await;
        assert!(
            board.work.contains(&run),
            "parked until the next tick: {:?}",
            board.parked
        );
    }

    /// A SQLite state in `dir` with `run` watched and one event of it
    /// pending for the sink `ops`.
    async fn one_event_for_ops(dir: &std::path::Path, run: &str) -> State {
        let store = State::Sqlite(Sqlite::open_path(&dir.join("state.db")).unwrap());
        store
            .subscribe(run.into(), Default::default(), "config", None)
            .await
            .unwrap();
        let event = NewEvent {
            sequence: 1,
            event_type: "STEP".into(),
            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            created_at: None,
            sinks: vec!["ops".into()],
        };
        let batch = Batch {
            run_id: run.into(),
            events: vec![event],
            run_status: None,
            phase: None,
            finish: None,
            stalled: None,
        };
        store.record_batch(&Fence::Exclusive, batch).await.unwrap();
        store
    }

    /// A chain whose write is refused for a fence this process should never
    /// hold (here a lease on the SQLite state: `LeaseOnSqlite`) stops the
    /// sink's loop with the error, for its supervisor to log, mark the sink
    /// down and restart with backoff; it does not send the delivery again
    /// every half second.
    #[tokio::test]
    async fn a_write_under_the_wrong_fence_stops_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let run = "r1";
        let store = one_event_for_ops(dir.path(), run).await;
        let (url, log) = receiver().await;
        let (publisher, ownership) = Ownership::leased();
        let lease = crate::store::pg::Lease {
            run_id: run.into(),
            epoch: 1,
        };
        publisher.publish([(lease, std::time::Instant::now() + Duration::from_secs(60))]);
        let stop = CancellationToken::new();
        let sink = runtime_owning(&store, &url, stop.clone(), ownership);
        let ended = tokio::time::timeout(Duration::from_secs(10), run_http_sink(sink)).await;
        stop.cancel();
        assert!(
            matches!(ended, Ok(Err(StateError::LeaseOnSqlite { .. }))),
            "the loop went on, or ended otherwise: {ended:?}; sent {} times",
            seen(&log).len()
        );
        assert_eq!(seen(&log).len(), 1, "sent once before the refusal");
    }

    /// A failure answered after the run's lease stopped being trusted (a
    /// Slack sink refusing to send for a run lost during its rate-limit
    /// wait; here a slow 500) is not recorded: the run's new owner sends
    /// it, with no attempt or backoff counted by a replica that lost it.
    /// Witness: any write under this lease on the SQLite state is refused
    /// (`LeaseOnSqlite`) and ends the loop, as the test above shows.
    #[tokio::test]
    async fn a_failure_answered_after_the_lease_lapsed_is_not_recorded() {
        use axum::http::StatusCode;
        let dir = tempfile::tempdir().unwrap();
        let run = "r1";
        let store = one_event_for_ops(dir.path(), run).await;
        let app = axum::Router::new().route(
            "/h",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                StatusCode::INTERNAL_SERVER_ERROR
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let (publisher, ownership) = Ownership::leased();
        let lease = crate::store::pg::Lease {
            run_id: run.into(),
            epoch: 1,
        };
        let trusted_until = std::time::Instant::now() + Duration::from_millis(200);
        publisher.publish([(lease, trusted_until)]);
        let stop = CancellationToken::new();
        let sink = runtime_owning(&store, &format!("http://{addr}/h"), stop.clone(), ownership);
        let ended = tokio::time::timeout(Duration::from_secs(2), run_http_sink(sink)).await;
        stop.cancel();
        assert!(
            ended.is_err(),
            "a write was tried after the lease lapsed: {ended:?}"
        );
        let pending = store.pending_for_run("ops", run, 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].attempts, 0, "an attempt counted");
    }
}

/// The dispatcher's board under leases whose trust comes and goes.
#[cfg(test)]
mod board_tests {
    use super::*;
    use crate::store::pg::Lease;

    /// A run parked while its lease's renewal was late, then booked again
    /// by a new-work notice handled after the renewal but before the
    /// renewal's change (select! takes ready branches in random order): a
    /// chain started for it from that notice. The change must not put it
    /// back to work while that chain runs, or `start_chains` starts a
    /// second chain for the run beside it (both send from the same head:
    /// every delivery twice, and two chains racing their marks).
    #[test]
    fn a_run_in_flight_is_not_put_back_to_work_by_a_renewal() {
        let (publisher, ownership) = Ownership::leased();
        let lease = Lease {
            run_id: "r1".into(),
            epoch: 1,
        };
        let run: Arc<str> = "r1".into();
        publisher.publish([(
            lease.clone(),
            std::time::Instant::now() - Duration::from_millis(1),
        )]);
        let mut board = Board::default();
        board.book(&ownership, run.clone());
        assert!(board.parked.contains(&run), "lapsed: parked");

        // The renewal is published; the notice is handled first.
        publisher.publish([(lease, std::time::Instant::now() + Duration::from_secs(60))]);
        board.book(&ownership, run.clone());
        let started = board.work.pop_first().expect("booked by the notice");
        board.in_flight.insert(started);

        // Then the renewal's (empty) change.
        board.unpark(&ownership);
        assert!(
            !board.work.contains(&run),
            "a run with a chain in flight is back on the board: a second chain would start"
        );
        assert!(
            board.dirty.contains(&run),
            "its chain looks again when it ends"
        );
    }
}
