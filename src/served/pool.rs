//! The worker pool of one served version: starts its workers and keeps them
//! serving.
//!
//! Owns: starting one worker actor per warmed-up session, each on a thread
//! of its own ([`Pool::start`]), and their supervision: a worker whose actor
//! ends (a panic past its own guard) reports to the pool's supervisor, which
//! tells the batcher to stop sending to it, builds a replacement session and
//! worker in its place (unless the version no longer takes work), counts the
//! restart and hands the replacement to the batcher. Also the pool's end:
//! every worker's context holds the backend and, after it, the pool-end
//! signal, so the signal fires once the last worker ended and the weights
//! were freed. Must not touch: which batch goes where (the batcher), what a
//! worker does with a batch (the worker), which version serves (the
//! repository).

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::backend::{Backend, BackendError, Session, SessionConfig};
use crate::batcher::job::RunBatch;
use crate::batcher::{AttachWorkers, BatcherHandle, Message as BatcherMessage, WorkerExited, WorkerReplaced};
use crate::mailbox::{self, Mailbox, Sender};
use crate::metrics::VersionMetrics;
use crate::readiness::Readiness;
use crate::stats::InferStats;
use crate::worker::{Worker, WorkerContext};

/// What a pool is started from (everything but the batcher it serves).
pub struct PoolParts {
    pub backend: Arc<dyn Backend>,
    /// One warmed-up session per worker.
    pub sessions: Vec<Box<dyn Session>>,
    pub session_config: SessionConfig,
    pub readiness: Arc<Readiness>,
    pub stats: Arc<InferStats>,
    pub metrics: Arc<VersionMetrics>,
}

/// A running pool. Dropping it (with its version) lets the supervisor go:
/// no replacement is started any more, and the workers end once the batcher
/// lets go of them.
pub struct Pool {
    /// Held, not read: the supervisor lives as long as the pool.
    _supervisor: Mailbox<Supervisor>,
}

/// Fires (its receiver completes) when the pool has ended: every worker's
/// thread finished and the backend, with its weights, was dropped.
pub type PoolEnded = oneshot::Receiver<()>;

impl Pool {
    /// Starts one worker per session and attaches them to `batcher`: the
    /// version is serving when this returns. Cheap (no compute).
    pub fn start(parts: PoolParts, batcher: &BatcherHandle) -> std::io::Result<(Pool, PoolEnded)> {
        let (ended_tx, ended) = oneshot::channel();
        let supervisor = Mailbox::new(Supervisor {
            context: None,
            batcher: batcher.clone(),
            metrics: Arc::clone(&parts.metrics),
        });
        let context = WorkerContext {
            backend: parts.backend,
            session_config: parts.session_config,
            batcher: batcher.batch_done(),
            // Weak: the pool (its version) keeps the supervisor, the
            // workers do not.
            exits: supervisor.weak_sender(),
            readiness: parts.readiness,
            stats: parts.stats,
            _end: Arc::new(ended_tx),
        };
        let workers = parts
            .sessions
            .into_iter()
            .enumerate()
            .map(|(id, session)| start_worker(id, session, &context, &parts.metrics))
            .collect::<Result<Vec<_>, _>>()?;
        supervisor.with(|s| s.context = Some(context));
        batcher.send(BatcherMessage::AttachWorkers(AttachWorkers { workers }));
        Ok((
            Pool {
                _supervisor: supervisor,
            },
            ended,
        ))
    }

    /// Worker `worker` ended (tests: what a worker reports as it unwinds).
    #[cfg(test)]
    pub fn report_exit(&self, worker: usize) {
        self._supervisor.send(WorkerExited { worker });
    }
}

/// Replaces the pool's workers that end.
struct Supervisor {
    /// What each replacement is started with (set once the first workers run).
    context: Option<WorkerContext>,
    batcher: BatcherHandle,
    metrics: Arc<VersionMetrics>,
}

impl mailbox::Actor for Supervisor {
    type Message = WorkerExited;

    fn handle(&mut self, WorkerExited { worker }: WorkerExited) {
        // Whatever it held was failed by the worker as it ended.
        self.batcher.send(BatcherMessage::WorkerExited(WorkerExited { worker }));
        let Some(context) = &self.context else {
            return;
        };
        if !context.readiness.version_state().takes_work() {
            return;
        }
        match self.replace(worker, context) {
            Ok(sender) => {
                tracing::warn!(worker, "worker ended; started a replacement");
                self.metrics.worker_restarted(worker);
                self.batcher
                    .send(BatcherMessage::WorkerReplaced(WorkerReplaced { worker, sender }));
            }
            Err(e) => tracing::error!(worker, error = %e, "worker ended and its replacement failed to start"),
        }
    }
}

impl Supervisor {
    /// A new session and worker `id` in place of the one that ended.
    fn replace(&self, id: usize, context: &WorkerContext) -> Result<Sender<RunBatch>, BackendError> {
        let session = context.backend.create_session(context.session_config)?;
        start_worker(id, session, context, &self.metrics)
            .map_err(|e| BackendError::Unavailable(format!("could not start a worker thread: {e}")))
    }
}

/// Worker `id` on a thread of its own, computing with `session`.
fn start_worker(
    id: usize,
    session: Box<dyn Session>,
    context: &WorkerContext,
    metrics: &VersionMetrics,
) -> std::io::Result<Sender<RunBatch>> {
    let worker = Worker::new(id, session, context.clone(), metrics.worker(id));
    let sender = mailbox::spawn_thread(format!("worker-{id}"), worker)?;
    // Ready now, not when the thread first runs: a server that says it is
    // listening is ready, whatever the scheduler does next.
    context.readiness.worker_ready();
    Ok(sender)
}
