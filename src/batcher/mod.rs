//! The dynamic batcher actor: one queue, one batching policy, for the whole
//! engine.
//!
//! Role: receives typed requests from the engine ([`Submit`]), admits or
//! rejects them at once (bounded queue), forms batches across requests and
//! hands them to the worker pool, one message per batch; a worker reports back
//! with [`BatchDone`]. Deadlines of queued requests are enforced here by one
//! timer armed at the earliest deadline. The rules themselves are plain
//! functions in [`policy`]; this file only wires them to messages and timers.
//! Workers are held as `Recipient<RunBatch>`, so the batcher knows nothing
//! of what computes (its tests attach fake workers).
//! Must not touch: request parsing (HTTP layer) or compute (workers).

pub mod job;
pub mod policy;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use self::job::{Job, RunBatch};
use self::policy::{BatchPolicy, Decision, Queued};
use crate::backend::BackendError;
use crate::error::ServeError;
use crate::metrics::{DropCounters, Metrics};
use crate::readiness::Readiness;

// ---- messages -------------------------------------------------------------

/// A new request from the engine. Admitted and queued, or rejected at once
/// through the job's own reply channel (nothing queued then).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Submit(pub Arc<Job>);

/// A worker finished a batch of `n_rows` rows in `compute` (worker -> batcher).
#[derive(Message)]
#[rtype(result = "()")]
pub struct BatchDone {
    pub worker: usize,
    pub n_rows: usize,
    pub compute: Duration,
}

/// A worker's actor ended although it catches every panic of its own
/// (worker -> batcher): the batcher stops sending to it and starts a
/// replacement in its place.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkerExited {
    pub worker: usize,
}

/// Starts a replacement for worker `i` and returns where to send its batches.
pub type Respawn = Arc<dyn Fn(usize) -> Result<Recipient<RunBatch>, BackendError> + Send + Sync>;

/// The worker pool, registered once at start-up (the workers need the
/// batcher's address first, so they are attached after it starts). Worker
/// `i` is the `i`-th recipient and reports `BatchDone { worker: i, .. }`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachWorkers {
    pub workers: Vec<Recipient<RunBatch>>,
    pub respawn: Respawn,
}

/// The model version this batcher serves was taken out of service and its
/// last request answered (engine -> batcher): fail whatever is still queued
/// (only requests whose client already left can be), then stop. Dropping the
/// batcher drops the workers' addresses, so each worker finishes the batch
/// it holds and ends, and the version's weights are freed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

// ---- actor ----------------------------------------------------------------

pub struct Batcher {
    policy: BatchPolicy,
    queue: VecDeque<Queued>,
    /// Rows in `queue` not yet handed to a worker.
    queued_rows: usize,
    workers: Vec<Recipient<RunBatch>>,
    /// Batches sent to each worker and not yet reported done.
    in_flight: Vec<usize>,
    /// Whether each worker can take batches (false once it exited, until a
    /// replacement is attached).
    alive: Vec<bool>,
    respawn: Option<Respawn>,
    /// Wakes the batcher when a held partial batch may go (queue delay or
    /// regroup hold).
    delay_timer: Option<(Instant, SpawnHandle)>,
    /// Set when a worker frees up: how long, and for how many rows, the next
    /// partial batch may wait for the clients just answered to come back.
    regroup: Option<policy::Regroup>,
    /// Wakes the batcher at the earliest deadline of a queued request.
    expiry_timer: Option<(Instant, SpawnHandle)>,
    /// Recent throughput in rows/s, for `Retry-After`.
    rows_per_sec: f64,
    last_done: Option<Instant>,
    metrics: Arc<Metrics>,
    dropped: DropCounters,
    readiness: Arc<Readiness>,
}

/// The batcher's two timers.
#[derive(Debug, Clone, Copy)]
enum TimerKind {
    /// Fires [`Batcher::pump`].
    Delay,
    /// Fires [`Batcher::expire`].
    Expiry,
}

impl Batcher {
    pub fn new(policy: BatchPolicy, metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Batcher {
        Batcher {
            policy,
            queue: VecDeque::new(),
            queued_rows: 0,
            workers: Vec::new(),
            in_flight: Vec::new(),
            alive: Vec::new(),
            respawn: None,
            delay_timer: None,
            regroup: None,
            expiry_timer: None,
            rows_per_sec: 0.0,
            last_done: None,
            dropped: metrics.drop_counters(),
            metrics,
            readiness,
        }
    }

    /// Hands out batches while a worker can take one and the policy says go.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        loop {
            self.drop_dead_front();
            let Some(worker) = self.free_worker() else {
                break;
            };
            let oldest = self.queue.front().map(|q| q.job.submitted_at);
            match policy::decide(self.queued_rows, oldest, self.regroup, Instant::now(), &self.policy) {
                Decision::Idle => break,
                Decision::WaitUntil(at) => {
                    self.arm(ctx, TimerKind::Delay, at);
                    break;
                }
                Decision::Dispatch => {
                    self.regroup = None;
                    let batch = policy::take_batch(&mut self.queue, self.policy.max_batch_rows);
                    self.queued_rows -= batch.n_rows;
                    self.in_flight[worker] += 1;
                    self.workers[worker].do_send(RunBatch(batch));
                }
            }
        }
        self.metrics.set_queue_depth(self.queued_rows);
    }

    /// The worker the policy picks for the next batch, among the live ones.
    fn free_worker(&self) -> Option<usize> {
        let loads: Vec<usize> = self
            .in_flight
            .iter()
            .zip(&self.alive)
            .map(|(&n, &alive)| if alive { n } else { usize::MAX })
            .collect();
        policy::pick_worker(&loads, self.queued_rows, self.policy.max_batch_rows)
            .filter(|&w| self.alive.get(w).copied().unwrap_or(false))
    }

    /// Drops requests at the front whose client left or whose deadline passed,
    /// so they neither take batch slots nor delay the ones behind them.
    fn drop_dead_front(&mut self) {
        let now = Instant::now();
        while let Some(front) = self.queue.front() {
            let rows = front.rows_left();
            if !front.job.drop_if_dead(now, rows, &self.dropped) {
                break;
            }
            self.queue.pop_front();
            self.queued_rows -= rows;
        }
    }

    fn timer(&mut self, kind: TimerKind) -> &mut Option<(Instant, SpawnHandle)> {
        match kind {
            TimerKind::Delay => &mut self.delay_timer,
            TimerKind::Expiry => &mut self.expiry_timer,
        }
    }

    /// Arms timer `kind` for `at`, unless it is already armed no later.
    fn arm(&mut self, ctx: &mut Context<Self>, kind: TimerKind, at: Instant) {
        if matches!(*self.timer(kind), Some((armed, _)) if armed <= at) {
            return;
        }
        if let Some((_, handle)) = self.timer(kind).take() {
            ctx.cancel_future(handle);
        }
        let handle = ctx.run_later(at.saturating_duration_since(Instant::now()), move |act, ctx| {
            *act.timer(kind) = None;
            match kind {
                TimerKind::Delay => act.pump(ctx),
                TimerKind::Expiry => act.expire(ctx),
            }
        });
        *self.timer(kind) = Some((at, handle));
    }

    /// Fails queued requests whose deadline passed (504, rows not computed),
    /// drops those whose client left, and re-arms for the next deadline.
    fn expire(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let queue = std::mem::take(&mut self.queue);
        for queued in queue {
            let rows = queued.rows_left();
            if queued.job.drop_if_dead(now, rows, &self.dropped) {
                self.queued_rows -= rows;
            } else {
                self.queue.push_back(queued);
            }
        }
        if let Some(next) = self.queue.iter().map(|q| q.job.deadline).min() {
            self.arm(ctx, TimerKind::Expiry, next);
        }
        self.pump(ctx);
    }
}

impl Actor for Batcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Requests arrive in bursts; never let the mailbox apply back-pressure
        // to HTTP threads: admission control is the queue bound, not this.
        // In actix a capacity of 0 means unbounded. (`usize::MAX` is not: the
        // channel computes `MAX_CAPACITY - capacity` whenever an address is
        // cloned, which overflows; debug builds panicked there, in a worker
        // thread's factory cloning this address, whenever this ran first:
        // that worker never started and the server never became ready.)
        ctx.set_mailbox_capacity(0);
    }
}

// ---- handlers -------------------------------------------------------------

impl Handler<Submit> for Batcher {
    type Result = ();

    fn handle(&mut self, Submit(job): Submit, ctx: &mut Context<Self>) {
        if self.readiness.is_draining() {
            job.fail(ServeError::NotReady("draining"));
            return;
        }
        if let Err(queued_rows) = policy::admit(self.queued_rows, job.n_rows, &self.policy) {
            job.fail(ServeError::Overloaded {
                queued_rows,
                limit: self.policy.max_queue_rows,
                retry_after_secs: policy::retry_after_secs(queued_rows, self.rows_per_sec),
            });
            return;
        }
        self.queued_rows += job.n_rows;
        let deadline = job.deadline;
        self.queue.push_back(Queued { job, next_row: 0 });
        self.arm(ctx, TimerKind::Expiry, deadline);
        self.pump(ctx);
    }
}

impl Handler<BatchDone> for Batcher {
    type Result = ();

    fn handle(&mut self, done: BatchDone, ctx: &mut Context<Self>) {
        if let Some(n) = self.in_flight.get_mut(done.worker) {
            *n = n.saturating_sub(1);
        }
        let now = Instant::now();
        if let Some(last) = self.last_done.replace(now) {
            let dt = now.duration_since(last).as_secs_f64().max(1e-6);
            // Exponentially weighted rate, only used to size Retry-After.
            self.rows_per_sec = 0.9 * self.rows_per_sec + 0.1 * (done.n_rows as f64 / dt);
        }
        self.regroup = policy::regroup(self.queued_rows, done.n_rows, done.compute, now, &self.policy);
        self.pump(ctx);
    }
}

impl Handler<AttachWorkers> for Batcher {
    type Result = ();

    fn handle(&mut self, attach: AttachWorkers, ctx: &mut Context<Self>) {
        self.in_flight = vec![0; attach.workers.len()];
        self.alive = vec![true; attach.workers.len()];
        self.workers = attach.workers;
        self.respawn = Some(attach.respawn);
        self.pump(ctx);
    }
}

impl Handler<Retire> for Batcher {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        for queued in self.queue.drain(..) {
            queued.job.fail(ServeError::NotReady("unloaded"));
        }
        self.queued_rows = 0;
        ctx.stop();
    }
}

impl Handler<WorkerExited> for Batcher {
    type Result = ();

    fn handle(&mut self, WorkerExited { worker }: WorkerExited, ctx: &mut Context<Self>) {
        let (Some(alive), Some(in_flight)) = (self.alive.get_mut(worker), self.in_flight.get_mut(worker)) else {
            return;
        };
        // Whatever it held was failed by the worker as it ended.
        *alive = false;
        *in_flight = 0;
        if self.readiness.is_draining() {
            return;
        }
        let Some(respawn) = self.respawn.clone() else {
            return;
        };
        match respawn(worker) {
            Ok(replacement) => {
                tracing::warn!(worker, "worker ended; started a replacement");
                self.metrics.worker_restarted(worker);
                self.workers[worker] = replacement;
                self.alive[worker] = true;
            }
            Err(e) => tracing::error!(worker, error = %e, "worker ended and its replacement failed to start"),
        }
        self.pump(ctx);
    }
}

#[cfg(test)]
mod tests;
