//! The dynamic batcher actor: one queue per priority level and one batching
//! policy per served model version.
//!
//! Role: receives typed requests from the engine ([`Message::Submit`]),
//! admits or rejects them at once (bounded queue), forms batches across
//! requests and hands them to the worker pool, one message per batch; a
//! worker reports back with [`BatchDone`]. With several priority levels
//! ([`levels::LevelQueues`]) each level is admitted against its own limit
//! and batches are filled from the highest level first; with one, it is the
//! single queue of before. Deadlines of requests still
//! queued are enforced here by one timer armed at the earliest deadline. The
//! rules themselves are plain functions in [`policy`]; this file only wires
//! them to messages and timers. Workers are held as `Sender<RunBatch>`, so
//! the batcher knows nothing of what computes (its tests attach fake workers);
//! the version's pool starts them and replaces one that ends
//! ([`Message::WorkerExited`], then [`Message::WorkerReplaced`]). Whether
//! it takes work is the version's [`VersionState`]. It records into its
//! version's [`VersionMetrics`].
//!
//! It runs in a [`Mailbox`]: no thread of its own. A request submitted to an
//! idle batcher is dispatched by the HTTP thread that submitted it, and a
//! worker reporting a batch done takes the next one itself, so a hand-off
//! wakes a thread only where work has to move to another one (the batch to
//! an idle worker's thread, the answer to the client's HTTP thread). Its two
//! timers are alarms on the process-wide timer thread ([`clock::Clock`] over
//! [`crate::mailbox::Timer`]), armed only when a timer can matter (a request
//! is left queued; a batch is held back), since arming one may wake that
//! thread; when one fires, the batcher's handler runs on the timer thread.
//! Must not touch: request parsing (protocol layers), compute (workers),
//! starting or replacing workers (the pool, `served/pool.rs`).

pub mod clock;
pub mod job;
pub mod levels;
pub mod policy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use self::clock::{Clock, TimerKind};
use self::job::{Job, RunBatch};
use self::levels::LevelQueues;
use self::policy::{BatchPolicy, Decision, Queued};
use crate::error::EngineError;
use crate::mailbox::{self, Mailbox, Sender};
use crate::metrics::{DropCounters, VersionMetrics};
use crate::readiness::{Readiness, VersionState};

// ---- messages -------------------------------------------------------------

/// Everything the batcher is sent.
pub enum Message {
    /// A new request from the engine. Admitted and queued, or rejected at
    /// once through the job's own reply channel (nothing queued then).
    Submit(Arc<Job>),
    BatchDone(BatchDone),
    /// A worker ended (pool -> batcher): send it nothing more.
    WorkerExited(WorkerExited),
    /// A replacement for a worker that ended (pool -> batcher).
    WorkerReplaced(WorkerReplaced),
    AttachWorkers(AttachWorkers),
    /// One of the batcher's timers fired (clock -> batcher).
    Timer(TimerKind),
    /// The model version this batcher serves was taken out of service and
    /// its last request answered (served version -> batcher, as it drops):
    /// fail whatever is still queued (only requests whose client already
    /// left can be), then let go of the workers, so each finishes the batch
    /// it holds and ends, and the version's weights are freed.
    Retire,
}

/// A worker finished a batch of `n_rows` rows in `compute` (worker -> batcher).
pub struct BatchDone {
    pub worker: usize,
    pub n_rows: usize,
    pub compute: Duration,
}

/// A worker's actor ended although it catches every panic of its own
/// (worker -> pool -> batcher): the batcher stops sending to it; the pool
/// starts a replacement in its place.
pub struct WorkerExited {
    pub worker: usize,
}

/// Worker `worker`'s replacement: where to send its batches from now on.
pub struct WorkerReplaced {
    pub worker: usize,
    pub sender: Sender<RunBatch>,
}

/// The worker pool, registered once at start-up (the workers need the
/// batcher's address first, so they are attached after it starts). Worker
/// `i` is the `i`-th sender and reports `BatchDone { worker: i, .. }`.
pub struct AttachWorkers {
    pub workers: Vec<Sender<RunBatch>>,
}

/// The running batcher, as the engine and the workers hold it.
#[derive(Clone)]
pub struct BatcherHandle {
    mailbox: Mailbox<Batcher>,
}

impl BatcherHandle {
    pub fn submit(&self, job: Arc<Job>) {
        self.mailbox.send(Message::Submit(job));
    }

    pub fn send(&self, message: Message) {
        self.mailbox.send(message);
    }

    /// Where workers report finished batches.
    pub fn batch_done(&self) -> Sender<BatchDone> {
        self.mailbox.sender().map(Message::BatchDone)
    }

    /// When the delay and expiry timers are armed for (tests).
    #[cfg(test)]
    pub fn armed_timers(&self) -> (Option<Instant>, Option<Instant>) {
        self.mailbox.with(|b| (b.delay_at, b.expiry_at))
    }

    /// Where a worker's end is reported (tests; the pool sends the message).
    #[cfg(test)]
    pub fn worker_exited(&self) -> Sender<WorkerExited> {
        self.mailbox.sender().map(Message::WorkerExited)
    }
}

// ---- actor ----------------------------------------------------------------

pub struct Batcher {
    policy: BatchPolicy,
    /// One queue per priority level, with the rows not yet handed out.
    queue: LevelQueues,
    workers: Vec<Sender<RunBatch>>,
    /// Batches sent to each worker and not yet reported done.
    in_flight: Vec<usize>,
    /// Whether each worker can take batches (false once it exited, until a
    /// replacement is attached).
    alive: Vec<bool>,
    /// Scratch for [`Batcher::free_worker`].
    loads: Vec<usize>,
    clock: Clock,
    /// When each timer is armed for (`None`: not armed, or it fired).
    delay_at: Option<Instant>,
    expiry_at: Option<Instant>,
    /// Set when a worker frees up: how long, and for how many rows, the next
    /// partial batch may wait for the clients just answered to come back.
    regroup: Option<policy::Regroup>,
    /// Recent throughput in rows/s, for `Retry-After`.
    rows_per_sec: f64,
    last_done: Option<Instant>,
    metrics: Arc<VersionMetrics>,
    dropped: DropCounters,
    /// The version's state: whether it takes work.
    readiness: Arc<Readiness>,
}

impl Batcher {
    /// Starts a batcher (its clock on the shared timer thread; any thread
    /// may call this). Workers are attached with [`Message::AttachWorkers`].
    /// `Err` only when the timer thread is not running and the OS refuses
    /// to start it.
    pub fn start(
        policy: BatchPolicy,
        metrics: Arc<VersionMetrics>,
        readiness: Arc<Readiness>,
    ) -> std::io::Result<BatcherHandle> {
        // The clock needs the batcher's sender and the batcher the clock's
        // address: the clock starts first, pointed at a mailbox filled in
        // right after.
        let slot: Arc<parking_lot::Mutex<Option<Sender<Message>>>> = Arc::default();
        let clock_target = {
            let slot = Arc::clone(&slot);
            Sender::from_fn(move |m| {
                let target = slot.lock().clone();
                if let Some(batcher) = target {
                    batcher.send(m);
                }
            })
        };
        let clock = Clock::new(clock_target)?;
        let batcher = Batcher {
            queue: LevelQueues::new(policy.levels.len()),
            policy,
            workers: Vec::new(),
            in_flight: Vec::new(),
            alive: Vec::new(),
            loads: Vec::new(),
            clock,
            delay_at: None,
            expiry_at: None,
            regroup: None,
            rows_per_sec: 0.0,
            last_done: None,
            dropped: metrics.drop_counters(),
            metrics,
            readiness,
        };
        let mailbox = Mailbox::new(batcher);
        // Weak: a pending timer must not keep a retired batcher alive.
        *slot.lock() = Some(mailbox.weak_sender());
        Ok(BatcherHandle { mailbox })
    }

    /// Hands out batches while a worker can take one and the policy says go.
    fn pump(&mut self) {
        loop {
            self.drop_dead_front();
            let Some(worker) = self.free_worker() else {
                break;
            };
            let (oldest, now) = (self.queue.oldest(), Instant::now());
            match policy::decide(self.queue.total_rows(), oldest, self.regroup, now, &self.policy) {
                Decision::Idle => break,
                Decision::WaitUntil(at) => {
                    self.arm(TimerKind::Delay, at);
                    break;
                }
                Decision::Dispatch => {
                    self.regroup = None;
                    let batch = self.queue.take_batch(&self.policy, now);
                    self.in_flight[worker] += 1;
                    // Before the hand-off: its answer may reach the client
                    // (and the client /metrics) before this thread goes on.
                    self.metrics.set_level_depths(self.queue.rows_by_level());
                    self.workers[worker].send(RunBatch(batch));
                }
            }
        }
        self.metrics.set_level_depths(self.queue.rows_by_level());
    }

    /// The worker the policy picks for the next batch, among the live ones.
    fn free_worker(&mut self) -> Option<usize> {
        // Reused: this runs on every submission.
        self.loads.clear();
        let loads = self.in_flight.iter().zip(&self.alive);
        self.loads
            .extend(loads.map(|(&n, &alive)| if alive { n } else { usize::MAX }));
        let (queued, prepare) = (self.queue.total_rows(), self.policy.prepares_ahead());
        policy::pick_worker(&self.loads, queued, self.policy.max_batch_rows, prepare)
            .filter(|&w| self.alive.get(w).copied().unwrap_or(false))
    }

    /// Drops requests at each level's front whose client left or whose
    /// deadline passed, so they neither take batch slots nor delay the ones
    /// behind them.
    fn drop_dead_front(&mut self) {
        self.queue.drop_dead_fronts(Instant::now(), &self.dropped);
    }

    fn armed_at(&mut self, kind: TimerKind) -> &mut Option<Instant> {
        match kind {
            TimerKind::Delay => &mut self.delay_at,
            TimerKind::Expiry => &mut self.expiry_at,
        }
    }

    /// Arms timer `kind` for `at`, unless it is already armed no later (a
    /// timer that fires early finds nothing to do and is re-armed if needed).
    fn arm(&mut self, kind: TimerKind, at: Instant) {
        if matches!(*self.armed_at(kind), Some(armed) if armed <= at) {
            return;
        }
        *self.armed_at(kind) = Some(at);
        self.clock.arm(kind, at);
    }

    /// Arms the expiry timer for the earliest deadline still queued. Only
    /// requests left in the queue need it: rows handed to a worker are
    /// checked against their deadline there, before compute.
    fn arm_expiry_for_queue(&mut self) {
        if let Some(next) = self.queue.earliest_deadline() {
            self.arm(TimerKind::Expiry, next);
        }
    }

    /// Fails queued requests whose deadline passed (504, rows not computed),
    /// drops those whose client left, and re-arms for the next deadline.
    fn expire(&mut self) {
        self.queue.drop_dead(Instant::now(), &self.dropped);
        self.pump();
        self.arm_expiry_for_queue();
    }
}

impl mailbox::Actor for Batcher {
    type Message = Message;

    fn handle(&mut self, message: Message) {
        match message {
            Message::Submit(job) => self.submit(job),
            Message::BatchDone(done) => self.batch_done(done),
            Message::WorkerExited(exited) => self.worker_exited(exited),
            Message::WorkerReplaced(replaced) => self.worker_replaced(replaced),
            Message::AttachWorkers(attach) => self.attach_workers(attach),
            Message::Timer(kind) => self.timer_fired(kind),
            Message::Retire => self.retire(),
        }
    }
}

// ---- handlers -------------------------------------------------------------

impl Batcher {
    fn submit(&mut self, job: Arc<Job>) {
        match self.readiness.version_state() {
            VersionState::Retired => return job.fail(EngineError::NotReady("unloaded")),
            VersionState::Draining => return job.fail(EngineError::NotReady("draining")),
            VersionState::Loading | VersionState::Ready => {}
        }
        let limits = self.policy.level(job.priority);
        if let Err(queued_rows) = policy::admit(self.queue.level_rows(job.priority), job.n_rows, limits) {
            self.metrics.count_rejection(job.priority);
            job.fail(EngineError::Overloaded {
                queued_rows,
                limit: limits.max_queue_rows,
                retry_after_secs: policy::retry_after_secs(queued_rows, self.rows_per_sec),
            });
            return;
        }
        self.queue.push(Queued {
            job: Arc::clone(&job),
            next_row: 0,
        });
        self.pump();
        // Every request left queued after its own submission has the expiry
        // timer armed no later than its deadline (the pump takes from each
        // level's front, so a request still queued is still at its level's
        // back); one dispatched at once, the common case below saturation,
        // arms nothing.
        if self.queue.is_last(&job) {
            self.arm(TimerKind::Expiry, job.deadline);
        }
    }

    fn batch_done(&mut self, done: BatchDone) {
        if let Some(n) = self.in_flight.get_mut(done.worker) {
            *n = n.saturating_sub(1);
        }
        let now = Instant::now();
        if let Some(last) = self.last_done.replace(now) {
            let dt = now.duration_since(last).as_secs_f64().max(1e-6);
            // Exponentially weighted rate, only used to size Retry-After.
            self.rows_per_sec = 0.9 * self.rows_per_sec + 0.1 * (done.n_rows as f64 / dt);
        }
        self.regroup = policy::regroup(self.queue.total_rows(), done.n_rows, done.compute, now, &self.policy);
        self.pump();
    }

    fn is_retired(&self) -> bool {
        self.readiness.version_state() == VersionState::Retired
    }

    fn attach_workers(&mut self, attach: AttachWorkers) {
        if self.is_retired() {
            return;
        }
        self.in_flight = vec![0; attach.workers.len()];
        self.alive = vec![true; attach.workers.len()];
        self.workers = attach.workers;
        self.pump();
    }

    fn worker_exited(&mut self, WorkerExited { worker }: WorkerExited) {
        let (Some(alive), Some(in_flight)) = (self.alive.get_mut(worker), self.in_flight.get_mut(worker)) else {
            return;
        };
        // Whatever it held was failed by the worker as it ended.
        *alive = false;
        *in_flight = 0;
    }

    fn worker_replaced(&mut self, WorkerReplaced { worker, sender }: WorkerReplaced) {
        if self.is_retired() || worker >= self.workers.len() {
            return;
        }
        self.workers[worker] = sender;
        self.alive[worker] = true;
        self.in_flight[worker] = 0;
        self.pump();
    }

    fn retire(&mut self) {
        for queued in self.queue.drain() {
            queued.job.fail(EngineError::NotReady("unloaded"));
        }
        // The workers' inboxes close when their last sender goes (here):
        // each finishes the batch in hand and ends. The version's series
        // are already gone (removed as it retired), so nothing is zeroed.
        self.workers.clear();
        self.alive.clear();
        self.in_flight.clear();
    }

    fn timer_fired(&mut self, kind: TimerKind) {
        *self.armed_at(kind) = None;
        match kind {
            TimerKind::Delay => self.pump(),
            TimerKind::Expiry => self.expire(),
        }
    }
}

#[cfg(test)]
mod tests;
