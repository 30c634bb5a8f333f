//! One inference request as it travels through the engine, and the batch
//! message that carries it to a worker.
//!
//! Owns: the typed request the engine hands over (validated input, deadline,
//! reply channel), the assembly of its answer from one or more batch slices,
//! the rule for rows that must not be computed ([`Job::drop_if_dead`], used
//! by the batcher and the workers alike), and [`RunBatch`]. A
//! job's state sits behind its own small lock, taken only by the workers that
//! compute its rows (more than one only when a large request was split); there
//! is no lock shared between requests. Must not touch: batching policy or
//! compute.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::error::EngineError;
use crate::input::InferInput;
use crate::labels::DropReason;
use crate::metrics::DropCounters;
use crate::model::Dims;

/// A batch for a worker to compute (batcher -> worker).
pub struct RunBatch(pub Batch);

/// A computed answer for a whole request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferOutput {
    /// `[n_rows, dims.output]`
    pub logits: Vec<f32>,
    /// `[n_rows, dims.experts]`
    pub router_weights: Vec<f32>,
    /// Time from submission until the request's first rows started computing.
    pub queue_wait: Duration,
    /// Forward time of the batches that computed its rows.
    pub compute: Duration,
    /// Rows of the largest batch that computed some of its rows (its own
    /// and other requests'), for traces.
    pub batch_rows: usize,
}

pub type JobReply = Result<InferOutput, EngineError>;

/// A request accepted by the engine.
pub struct Job {
    /// The validated rows.
    pub input: InferInput,
    /// `input.n_rows()`, the unit every queue and batch counts in.
    pub n_rows: usize,
    /// Rows not computed by this instant are dropped and the request gets 504.
    pub deadline: Instant,
    /// The timeout the deadline came from (for the error message).
    pub timeout: Duration,
    pub submitted_at: Instant,
    /// Its priority level (1 = highest), resolved from what it asked for.
    pub priority: u32,
    state: Mutex<JobState>,
}

struct JobState {
    reply: Option<oneshot::Sender<JobReply>>,
    output: Option<InferOutput>,
    rows_left: usize,
    first_start: Option<Instant>,
}

impl Job {
    /// A job and the receiver its answer arrives on. Dropping the receiver
    /// (the client went away) marks the job cancelled.
    pub fn new(input: InferInput, timeout: Duration, priority: u32) -> (Arc<Job>, oneshot::Receiver<JobReply>) {
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let n_rows = input.n_rows();
        let job = Job {
            input,
            n_rows,
            deadline: now + timeout,
            timeout,
            submitted_at: now,
            priority,
            state: Mutex::new(JobState {
                reply: Some(tx),
                output: None,
                rows_left: n_rows,
                first_start: None,
            }),
        };
        (Arc::new(job), rx)
    }

    /// Why this job's rows must not be computed, if they must not.
    pub fn drop_reason(&self, now: Instant) -> Option<DropReason> {
        let state = self.state.lock();
        match &state.reply {
            None => Some(DropReason::Failed),
            Some(tx) if tx.is_closed() => Some(DropReason::Cancelled),
            Some(_) if now >= self.deadline => Some(DropReason::Timeout),
            Some(_) => None,
        }
    }

    /// The one rule for rows that must not be computed: when this job's
    /// client left, its deadline passed or another part of it failed, its
    /// `n_rows` rows are counted as dropped, an expired job is answered 504,
    /// and `true` says "skip them".
    pub fn drop_if_dead(&self, now: Instant, n_rows: usize, dropped: &DropCounters) -> bool {
        let Some(reason) = self.drop_reason(now) else {
            return false;
        };
        dropped.add(reason, n_rows);
        if reason == DropReason::Timeout {
            self.fail(self.deadline_error());
        }
        true
    }

    /// Answers with an error (once; later answers are ignored).
    pub fn fail(&self, error: EngineError) {
        if let Some(tx) = self.state.lock().reply.take() {
            // The receiver may be gone (client disconnected): nothing to do then.
            let _ = tx.send(Err(error));
        }
    }

    pub fn deadline_error(&self) -> EngineError {
        EngineError::DeadlineExceeded {
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }

    /// Records that rows of this job started computing at `start`.
    pub fn mark_started(&self, start: Instant) {
        let mut state = self.state.lock();
        state.first_start.get_or_insert(start);
    }

    /// Stores computed rows `[first_row, first_row + n)`; answers when the
    /// last rows arrive. `logits`/`router_weights` hold exactly those rows.
    pub fn complete_rows(
        &self,
        dims: &Dims,
        first_row: usize,
        logits: &[f32],
        router_weights: &[f32],
        compute: Duration,
        batch_rows: usize,
    ) {
        let n = logits.len() / dims.output;
        let mut state = self.state.lock();
        if state.reply.is_none() {
            return; // already failed or answered
        }
        let n_rows = self.n_rows;
        let out = state.output.get_or_insert_with(|| InferOutput {
            logits: vec![0.0; n_rows * dims.output],
            router_weights: vec![0.0; n_rows * dims.experts],
            queue_wait: Duration::ZERO,
            compute: Duration::ZERO,
            batch_rows: 0,
        });
        out.logits[first_row * dims.output..(first_row + n) * dims.output].copy_from_slice(logits);
        out.router_weights[first_row * dims.experts..(first_row + n) * dims.experts].copy_from_slice(router_weights);
        out.compute += compute;
        out.batch_rows = out.batch_rows.max(batch_rows);
        state.rows_left -= n;
        if state.rows_left == 0 {
            let mut output = state.output.take().expect("inserted above");
            output.queue_wait = state
                .first_start
                .map_or(Duration::ZERO, |s| s.saturating_duration_since(self.submitted_at));
            if let Some(tx) = state.reply.take() {
                let _ = tx.send(Ok(output));
            }
        }
    }
}

/// A contiguous run of one job's rows inside a batch.
pub struct Slice {
    pub job: Arc<Job>,
    pub first_row: usize,
    pub n_rows: usize,
}

/// Rows from one or more jobs, computed together by one worker.
pub struct Batch {
    pub slices: Vec<Slice>,
    pub n_rows: usize,
}
