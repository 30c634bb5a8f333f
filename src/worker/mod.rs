//! Worker actors: one per CPU worker (or, with a GPU backend, per stream),
//! each on its own OS thread and owning one backend session.
//!
//! Role: receives a ready batch ([`RunBatch`]) from the batcher, drops the
//! rows that must not be computed (deadline passed, client gone), gathers the
//! rest into its session's input buffer, runs the forward, records the
//! batch's metrics, hands each request its rows, and reports
//! [`crate::batcher::BatchDone`]. A panic inside a
//! forward is caught here: that batch's requests get 500, the session is
//! rebuilt, and the worker goes on serving. Must not touch: queueing policy
//! (the batcher's) or request parsing (the HTTP layer's).
//!
//! Workers run in `SyncContext` (a dedicated thread each), so CPU-bound work
//! never runs on the async HTTP runtime. The weights are shared through the
//! backend's `Arc`; a session holds only scratch buffers and its thread budget.
//! The session arrives warmed up (the engine ran its first forward at start-up,
//! so a backend that cannot compute stops start-up with its reason).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::backend::{Backend, ForwardOutput, Session, SessionConfig};
use crate::batcher::BatchDone;
use crate::batcher::job::{Batch, RunBatch, Slice};
use crate::error::ServeError;
use crate::metrics::WorkerMetrics;
use crate::model::Dims;
use crate::readiness::Readiness;

/// A row whose first feature is exactly this value makes the forward panic,
/// in builds with the `fault-injection` feature only (tests of the recovery
/// path). Release builds have no such hook.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_PANIC_VALUE: f32 = -424_242.0;

// ---- messages -------------------------------------------------------------
//
// [`RunBatch`] (batcher -> worker) is declared beside the job types it
// carries, in `batcher/job.rs`; [`BatchDone`] (worker -> batcher) in the
// batcher.

// ---- actor ----------------------------------------------------------------

/// What a worker needs besides its session; one per pool, cloned per worker.
#[derive(Clone)]
pub struct WorkerContext {
    pub backend: Arc<dyn Backend>,
    pub session_config: SessionConfig,
    pub batcher: Recipient<BatchDone>,
    pub readiness: Arc<Readiness>,
}

pub struct Worker {
    id: usize,
    context: WorkerContext,
    session: Box<dyn Session>,
    dims: Dims,
    /// The gathered rows of the batch being computed (reused).
    input: Vec<f32>,
    output: ForwardOutput,
    /// The slices of the batch being computed whose rows are in `input`.
    live: Vec<Slice>,
    metrics: WorkerMetrics,
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
            metrics,
        }
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
        let (o, e) = (self.dims.output, self.dims.experts);
        let mut offset = 0;
        for slice in &self.live {
            let rows = offset..offset + slice.n_rows;
            slice.job.complete_rows(
                &self.dims,
                slice.first_row,
                &self.output.logits[rows.start * o..rows.end * o],
                &self.output.router_weights[rows.start * e..rows.end * e],
                compute,
            );
            offset = rows.end;
        }
    }

    /// Runs the forward, turning a panic into an error and rebuilding the
    /// session after one (its scratch state can no longer be trusted).
    fn guarded_forward(&mut self) -> Result<(), ServeError> {
        let (session, input, output) = (&mut self.session, &self.input, &mut self.output);
        let result = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(feature = "fault-injection")]
            if input.first() == Some(&FAULT_INJECTION_PANIC_VALUE) {
                panic!("fault injection: forward panicked on request");
            }
            session.forward(input, output)
        }));
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(worker = self.id, error = %e, "forward failed");
                Err(ServeError::Backend(e))
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(worker = self.id, panic = %msg, "forward panicked; rebuilding the session");
                self.metrics.restart();
                match self.context.backend.create_session(self.context.session_config) {
                    Ok(session) => self.session = session,
                    Err(e) => {
                        tracing::error!(worker = self.id, error = %e, "session rebuild failed; keeping the old one")
                    }
                }
                Err(ServeError::Internal(
                    "the forward failed on this batch; the worker recovered".into(),
                ))
            }
        }
    }
}

impl Actor for Worker {
    type Context = SyncContext<Self>;

    fn started(&mut self, _ctx: &mut SyncContext<Self>) {
        self.context.readiness.worker_ready();
        tracing::debug!(worker = self.id, "worker serving");
    }
}

// ---- handlers -------------------------------------------------------------

impl Handler<RunBatch> for Worker {
    type Result = ();

    fn handle(&mut self, RunBatch(batch): RunBatch, _ctx: &mut SyncContext<Self>) {
        let start = Instant::now();
        self.gather(batch, start);
        let n_rows = self.input.len() / self.dims.input;
        let mut compute = Duration::ZERO;
        if n_rows > 0 {
            let result = self.guarded_forward();
            compute = start.elapsed();
            // Metrics first: a client that reads /metrics right after its
            // answer must see the batch that computed it.
            self.metrics.observe_batch(n_rows, self.live.len(), compute);
            match result {
                Ok(()) => {
                    let e = self.dims.experts;
                    self.metrics
                        .observe_routing(&self.output.top_k, &self.output.router_weights, e);
                    self.answer(compute);
                }
                Err(error) => {
                    for slice in &self.live {
                        slice.job.fail(error.clone());
                    }
                }
            }
        }
        self.live.clear();
        self.context.batcher.do_send(BatchDone {
            worker: self.id,
            n_rows,
            compute,
        });
    }
}
