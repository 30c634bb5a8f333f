//! Worker actors: one per CPU worker (or, with a GPU backend, per stream),
//! each on its own OS thread and owning one backend session.
//!
//! Role: receives a ready batch ([`RunBatch`]) from the batcher, drops the
//! rows that must not be computed (deadline passed, client gone), gathers the
//! rest into its session's input buffer, runs the forward, records the
//! batch's metrics, hands each request its rows, and reports
//! [`crate::batcher::BatchDone`]. A panic anywhere in handling a batch is
//! caught here: that batch's requests get 500, the session is rebuilt, and
//! the worker goes on serving. Should the actor end anyway, it fails the
//! requests it held and reports [`WorkerExited`] to its pool as it unwinds,
//! and the pool starts a replacement. Each computed batch counts once in its
//! version's statistics (`execution_count`) and metrics. Must not touch:
//! queueing policy (the batcher's), starting or replacing workers (the
//! pool's, `served/pool.rs`) or request parsing (the protocol layers').
//!
//! Workers run on a dedicated thread each ([`crate::mailbox::spawn_thread`]),
//! so CPU-bound work never runs on the async HTTP runtime. A worker reports a
//! batch done to the batcher on its own thread, and when more rows are
//! queued the batcher hands it the next batch right there: a busy worker is
//! never put to sleep and woken for its next batch. The weights are shared through the
//! backend's `Arc`; a session holds only scratch buffers and its thread budget.
//! The session arrives warmed up (the version's build ran its first forward,
//! so a backend that cannot compute stops the load with its reason). When
//! the last worker of a pool ends, its context drops the backend and then
//! the pool-end signal, which tells the repository the weights are freed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, ForwardOutput, Session, SessionConfig};
use crate::batcher::job::{Batch, Job, RunBatch, Slice};
use crate::batcher::{BatchDone, WorkerExited};
use crate::error::EngineError;
use crate::mailbox::{self, Sender};
use crate::metrics::WorkerMetrics;
use crate::model::Dims;
use crate::readiness::Readiness;
use crate::stats::InferStats;

/// A row whose first feature is exactly this value makes the forward panic,
/// in builds with the `fault-injection` feature only (tests of the recovery
/// path). Release builds have no such hook.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_PANIC_VALUE: f32 = -424_242.0;
/// Like [`FAULT_INJECTION_PANIC_VALUE`], but the panic comes while the
/// answers are handed out, after the forward.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_ANSWER_PANIC_VALUE: f32 = -434_343.0;
/// A batch whose first row starts with this ends the worker's actor (a
/// panic past its own guard), so the replacement path runs.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_EXIT_VALUE: f32 = -444_444.0;

// ---- messages -------------------------------------------------------------
//
// [`RunBatch`] (batcher -> worker) is declared beside the job types it
// carries, in `batcher/job.rs`; [`BatchDone`] (worker -> batcher) and [`WorkerExited`] (worker -> pool ->
// batcher) in the batcher.

// ---- actor ----------------------------------------------------------------

/// What a worker needs besides its session; one per pool, cloned per worker.
#[derive(Clone)]
pub struct WorkerContext {
    pub backend: Arc<dyn Backend>,
    pub session_config: SessionConfig,
    pub batcher: Sender<BatchDone>,
    /// Where the worker reports that its actor ended (its pool).
    pub exits: Sender<WorkerExited>,
    pub readiness: Arc<Readiness>,
    /// The version's statistics: one execution per computed batch.
    pub stats: Arc<InferStats>,
    /// The pool-end signal, dropped with the last context. Declared after
    /// `backend`, so it goes after the weights.
    pub _end: Arc<tokio::sync::oneshot::Sender<()>>,
}

pub struct Worker {
    id: usize,
    /// Dropped before `context`: a session may hold the backend's weights,
    /// and the context's pool-end signal must go after them.
    session: Box<dyn Session>,
    dims: Dims,
    /// The gathered rows of the batch being computed (reused).
    input: Vec<f32>,
    output: ForwardOutput,
    /// The slices of the batch being computed whose rows are in `input`.
    live: Vec<Slice>,
    /// Every request of the batch being handled, so a panic can answer them.
    in_hand: Vec<Arc<Job>>,
    metrics: WorkerMetrics,
    /// Last: dropped after the session (see `session`).
    context: WorkerContext,
}

impl Worker {
    /// Worker `id` computing with `session` (already warmed up).
    pub fn new(id: usize, session: Box<dyn Session>, context: WorkerContext, metrics: WorkerMetrics) -> Worker {
        Worker {
            id,
            dims: context.backend.dims(),
            context,
            session,
            input: Vec::new(),
            output: ForwardOutput::default(),
            live: Vec::new(),
            in_hand: Vec::new(),
            metrics,
        }
    }

    /// Gathers, computes and answers one batch; the rows it computed and the
    /// time it took.
    fn run_batch(&mut self, batch: Batch, start: Instant) -> (usize, Duration) {
        self.gather(batch, start);
        let n_rows = self.input.len() / self.dims.input;
        if n_rows == 0 {
            return (0, Duration::ZERO);
        }
        let result = self.forward();
        let compute = start.elapsed();
        // Metrics first: a client that reads /metrics right after its
        // answer must see the batch that computed it.
        self.metrics.observe_batch(n_rows, self.live.len(), compute);
        self.context.stats.record_execution();
        match result {
            Ok(()) => {
                let e = self.dims.experts;
                self.metrics
                    .observe_routing(&self.output.top_k, &self.output.router_weights, e);
                self.answer(compute);
            }
            Err(error) => {
                tracing::error!(worker = self.id, error = %error, "forward failed");
                let error = EngineError::Backend(error);
                for slice in &self.live {
                    slice.job.fail(error.clone());
                }
            }
        }
        (n_rows, compute)
    }

    /// Copies the rows of `batch` that must still be computed into `input`
    /// (their slices into `live`); the others are dropped and counted.
    fn gather(&mut self, batch: Batch, start: Instant) {
        self.input.clear();
        self.live.clear();
        for slice in batch.slices {
            if slice.job.drop_if_dead(start, slice.n_rows, &self.metrics.dropped) {
                continue;
            }
            self.input
                .extend_from_slice(slice.job.input.rows(slice.first_row, slice.n_rows));
            slice.job.mark_started(start);
            self.live.push(slice);
        }
    }

    /// Hands each live slice its rows of the output.
    fn answer(&self, compute: Duration) {
        #[cfg(feature = "fault-injection")]
        if self.input.first() == Some(&FAULT_INJECTION_ANSWER_PANIC_VALUE) {
            panic!("fault injection: handing out the answers panicked");
        }
        let (o, e) = (self.dims.output, self.dims.experts);
        let batch_rows = self.input.len() / self.dims.input;
        let mut offset = 0;
        for slice in &self.live {
            let rows = offset..offset + slice.n_rows;
            slice.job.complete_rows(
                &self.dims,
                slice.first_row,
                &self.output.logits[rows.start * o..rows.end * o],
                &self.output.router_weights[rows.start * e..rows.end * e],
                compute,
                batch_rows,
            );
            offset = rows.end;
        }
    }

    fn forward(&mut self) -> Result<(), crate::backend::BackendError> {
        #[cfg(feature = "fault-injection")]
        if self.input.first() == Some(&FAULT_INJECTION_PANIC_VALUE) {
            panic!("fault injection: forward panicked on request");
        }
        self.session.forward(&self.input, &mut self.output)
    }

    /// After a panic while handling a batch: answer its requests with 500,
    /// count it, and rebuild the session (its scratch state can no longer be
    /// trusted).
    fn recover(&mut self, panic: Box<dyn std::any::Any + Send>) {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(worker = self.id, panic = %msg, "worker panicked on a batch; rebuilding the session");
        // Counted before the answers go out, like every batch metric.
        self.metrics.restart();
        let error = EngineError::Internal("the worker failed on this batch and recovered".into());
        for job in &self.in_hand {
            job.fail(error.clone());
        }
        match self.context.backend.create_session(self.context.session_config) {
            Ok(session) => self.session = session,
            Err(e) => tracing::error!(worker = self.id, error = %e, "session rebuild failed; keeping the old one"),
        }
    }
}

/// Reports an abnormal end: the actor is dropped while a panic unwinds past
/// its own guard (never on a normal stop).
impl Drop for Worker {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let error = EngineError::Internal("the worker computing this request ended; it is being replaced".into());
        for job in self.in_hand.drain(..) {
            job.fail(error.clone());
        }
        self.context.readiness.worker_lost();
        // Reported from another thread: the pool handles the report where
        // it is sent, and starting a replacement must not run on a thread
        // that is unwinding (a second panic there would abort the process).
        let (exits, worker) = (self.context.exits.clone(), self.id);
        let report = std::thread::Builder::new()
            .name(format!("worker-{worker}-exit"))
            .spawn(move || exits.send(WorkerExited { worker }));
        if let Err(e) = report {
            tracing::error!(worker, error = %e, "could not report the worker's end");
        }
    }
}

// ---- handlers -------------------------------------------------------------

impl mailbox::Actor for Worker {
    type Message = RunBatch;

    fn handle(&mut self, RunBatch(batch): RunBatch) {
        let start = Instant::now();
        self.in_hand.clear();
        self.in_hand.extend(batch.slices.iter().map(|s| Arc::clone(&s.job)));
        #[cfg(feature = "fault-injection")]
        if batch.slices.first().map(|s| s.job.input.values()[0]) == Some(FAULT_INJECTION_EXIT_VALUE) {
            // A panic past the guard below, with the batch in hand: `Drop`
            // must answer it and report the exit.
            std::panic::resume_unwind(Box::new("fault injection: the worker's actor ends"));
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| self.run_batch(batch, start)));
        let (n_rows, compute) = outcome.unwrap_or_else(|panic| {
            self.recover(panic);
            (0, start.elapsed())
        });
        self.in_hand.clear();
        self.live.clear();
        self.context.batcher.send(BatchDone {
            worker: self.id,
            n_rows,
            compute,
        });
    }
}
