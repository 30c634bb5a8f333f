//! Worker actors: one per CPU worker (or, with a GPU backend, per stream),
//! each on its own OS thread and owning one backend session.
//!
//! Role: receives a ready batch ([`RunBatch`]) from the batcher, drops the
//! rows that must not be computed (deadline passed, client gone), gathers the
//! rest into its session's input buffer, runs the forward, hands each request
//! its rows, and reports [`crate::batcher::BatchDone`]. A panic inside a
//! forward is caught here: that batch's requests get 500, the session is
//! rebuilt, and the worker goes on serving. Must not touch: queueing policy
//! (the batcher's) or request parsing (the HTTP layer's).
//!
//! Workers run in `SyncContext` (a dedicated thread each), so CPU-bound work
//! never runs on the async HTTP runtime. The weights are shared through the
//! backend's `Arc`; a session holds only scratch buffers and its thread budget.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use crate::backend::{Backend, ForwardOutput, Session, SessionConfig};
use crate::batcher::BatchDone;
use crate::batcher::job::{Batch, SkipReason, Slice};
use crate::engine::EngineState;
use crate::error::ServeError;
use crate::metrics::{Metrics, WorkerMetrics};
use crate::model::Dims;

/// A row whose first feature is exactly this value makes the forward panic,
/// in builds with the `fault-injection` feature only (tests of the recovery
/// path). Release builds have no such hook.
#[cfg(feature = "fault-injection")]
pub const FAULT_INJECTION_PANIC_VALUE: f32 = -424_242.0;

// ---- messages -------------------------------------------------------------

/// A batch to compute.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunBatch(pub Batch);

// ---- actor ----------------------------------------------------------------

pub struct Worker {
    id: usize,
    backend: Arc<dyn Backend>,
    session_config: SessionConfig,
    session: Box<dyn Session>,
    dims: Dims,
    input: Vec<f32>,
    output: ForwardOutput,
    live: Vec<Slice>,
    batcher: Recipient<BatchDone>,
    metrics: Arc<Metrics>,
    recorder: WorkerMetrics,
    state: Arc<EngineState>,
}

impl Worker {
    pub fn new(
        id: usize,
        backend: Arc<dyn Backend>,
        session: Box<dyn Session>,
        session_config: SessionConfig,
        batcher: Recipient<BatchDone>,
        metrics: Arc<Metrics>,
        state: Arc<EngineState>,
    ) -> Worker {
        let dims = backend.dims();
        Worker {
            id,
            recorder: metrics.worker(id, dims.experts),
            backend,
            session_config,
            session,
            dims,
            input: Vec::new(),
            output: ForwardOutput::default(),
            live: Vec::new(),
            batcher,
            metrics,
            state,
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
                Err(ServeError::Internal(format!("forward failed: {e}")))
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(worker = self.id, panic = %msg, "forward panicked; rebuilding the session");
                self.recorder.restart();
                match self.backend.create_session(self.session_config) {
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

    /// Warm-up: one forward of a single zero row sizes the scratch buffers and
    /// touches the weights before the worker counts as ready.
    fn started(&mut self, _ctx: &mut SyncContext<Self>) {
        self.input.clear();
        self.input.resize(self.dims.input, 0.0);
        match self.guarded_forward() {
            Ok(()) => {
                self.state.worker_ready();
                tracing::debug!(worker = self.id, "worker warmed up");
            }
            Err(e) => tracing::error!(worker = self.id, error = %e, "warm-up failed; worker not ready"),
        }
    }
}

// ---- handlers -------------------------------------------------------------

impl Handler<RunBatch> for Worker {
    type Result = ();

    fn handle(&mut self, RunBatch(batch): RunBatch, _ctx: &mut SyncContext<Self>) {
        let start = Instant::now();
        let row_len = self.dims.input;
        self.input.clear();
        self.live.clear();
        for slice in batch.slices {
            if let Some(reason) = slice.job.skip_reason(start) {
                self.metrics.observe_dropped(reason.label(), slice.n_rows);
                if reason == SkipReason::Expired {
                    slice.job.fail(slice.job.deadline_error());
                }
                continue;
            }
            let rows = &slice.job.rows[slice.first_row * row_len..(slice.first_row + slice.n_rows) * row_len];
            self.input.extend_from_slice(rows);
            slice.job.mark_started(start);
            self.live.push(slice);
        }
        let n_rows = self.input.len() / row_len;
        let mut compute = std::time::Duration::ZERO;
        if n_rows > 0 {
            let result = self.guarded_forward();
            compute = start.elapsed();
            match result {
                Ok(()) => {
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
                    self.recorder
                        .observe_routing(&self.output.top_k, &self.output.router_weights, e);
                }
                Err(error) => {
                    for slice in &self.live {
                        slice.job.fail(error.clone());
                    }
                }
            }
            self.recorder.observe_batch(n_rows, self.live.len(), compute);
        }
        self.live.clear();
        self.batcher.do_send(BatchDone {
            worker: self.id,
            rows: n_rows,
            compute,
        });
    }
}
