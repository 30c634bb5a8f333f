//! One model version in service: its batcher, its pool of workers, its
//! state, statistics and metrics, and what it is.
//!
//! Owns: [`ServedVersion`] and the rule that ends it: a version lives as long
//! as someone holds it (the repository while it is the served version, and
//! every request it accepted until that request is answered); when the last
//! holder lets go, [`Drop`] marks it `Retired`, removes its metric series,
//! tells its batcher to retire and lets its pool go: the batcher fails what
//! is still queued and lets go of the workers, each finishes the batch in
//! hand and ends, and the weights are freed. Two one-shot signals say so
//! ([`Retirement`]): `drained` when the last holder let go, `freed` when
//! the pool ended. So requests always finish on the version that accepted
//! them, no version outlives its last batch, and whoever retires a version
//! awaits events instead of polling. Must not touch: which version serves
//! (the repository's registry), how a version is built (`build.rs`).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::ModelDescription;
use super::pool::{Pool, PoolEnded};
use crate::backend::Backend;
use crate::batcher::job::Job;
use crate::batcher::policy::BatchPolicy;
use crate::batcher::{BatcherHandle, Message as BatcherMessage};
use crate::input::InputLimits;
use crate::metrics::VersionMetrics;
use crate::readiness::{Readiness, VersionState};
use crate::stats::InferStats;

/// A running pool serving one version of one model.
pub struct ServedVersion {
    /// Name, version, shapes, files: what `/healthz` and `/v2` describe.
    pub(super) description: Arc<ModelDescription>,
    pub(super) batcher: BatcherHandle,
    /// For device metrics; compute goes through the workers. Dropped before
    /// the pool, so the pool's end means the weights were freed.
    pub(super) backend: Arc<dyn Backend>,
    /// The version's [`VersionState`] and serving workers.
    pub(super) readiness: Arc<Readiness>,
    /// What a valid input looks like for this version.
    pub(super) limits: InputLimits,
    /// The statistics extension's counters for this version (requests
    /// recorded in `Engine::infer`, executions by its workers).
    pub(super) stats: Arc<InferStats>,
    /// This version's `{model, version}` series.
    pub(super) metrics: Arc<VersionMetrics>,
    /// Its batching policy (a copy of the batcher's): resolves a request's
    /// priority level and that level's default timeout.
    policy: BatchPolicy,
    /// Held, not read: dropped with the version (after `backend`), which
    /// lets its supervisor go.
    _pool: Pool,
    /// Taken by whoever retires the version (see [`ServedVersion::retirement`]).
    retirement: Mutex<Option<Retirement>>,
    /// Dropped at the end of [`Drop`]: completes `Retirement::drained`.
    drained: Option<oneshot::Sender<()>>,
}

/// The two events of a version's retirement, awaited by the repository.
pub struct Retirement {
    drained: oneshot::Receiver<()>,
    freed: PoolEnded,
}

impl Retirement {
    /// Completes when the version's last holder let go: every request it
    /// accepted was answered.
    pub async fn drained(&mut self) {
        let _ = (&mut self.drained).await;
    }

    /// Completes when the version's pool ended: its workers finished and
    /// its weights were freed.
    pub async fn freed(self) {
        let _ = self.freed.await;
    }
}

/// The parts a [`ServedVersion`] is assembled from (see `build::start_pool`).
pub struct VersionParts {
    pub description: Arc<ModelDescription>,
    pub batcher: BatcherHandle,
    pub backend: Arc<dyn Backend>,
    pub readiness: Arc<Readiness>,
    pub limits: InputLimits,
    pub stats: Arc<InferStats>,
    pub metrics: Arc<VersionMetrics>,
    pub policy: BatchPolicy,
    pub pool: Pool,
    pub freed: PoolEnded,
}

impl ServedVersion {
    pub fn new(parts: VersionParts) -> ServedVersion {
        let (drained_tx, drained) = oneshot::channel();
        ServedVersion {
            retirement: Mutex::new(Some(Retirement {
                drained,
                freed: parts.freed,
            })),
            drained: Some(drained_tx),
            description: parts.description,
            batcher: parts.batcher,
            backend: parts.backend,
            readiness: parts.readiness,
            limits: parts.limits,
            stats: parts.stats,
            metrics: parts.metrics,
            policy: parts.policy,
            _pool: parts.pool,
        }
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.description.name
    }

    /// The version number (repository folder, or the checkpoint's step).
    pub fn version(&self) -> u64 {
        self.description.version
    }

    /// Its life stage now.
    pub fn state(&self) -> VersionState {
        self.readiness.version_state()
    }

    /// What it is: name, version, shapes, files.
    pub fn description(&self) -> &Arc<ModelDescription> {
        &self.description
    }

    /// What a valid input looks like for it.
    pub fn limits(&self) -> &InputLimits {
        &self.limits
    }

    /// Its statistics extension counters (`stats().snapshot()`).
    pub fn stats(&self) -> &InferStats {
        &self.stats
    }

    /// Its `{model, version}` series.
    pub fn metrics(&self) -> &VersionMetrics {
        &self.metrics
    }

    /// Its state and serving workers.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The backend's device memory in use, by device (empty on the CPU).
    pub fn device_memory_used(&self) -> Vec<(String, u64)> {
        self.backend.device_memory_used()
    }

    /// The priority level of a request that asked for `requested` (0: none
    /// named; Triton's rule: 0 or a level past `batching.priority_levels`
    /// is the default level).
    pub fn priority_level(&self, requested: u64) -> u32 {
        self.policy.resolve(requested)
    }

    /// Level `level`'s own default timeout (`[batching.levels.N]
    /// timeout_ms`), if it has one.
    pub fn level_timeout(&self, level: u32) -> Option<Duration> {
        self.policy.level(level).timeout
    }

    /// Hands `job` to this version's batcher, which admits or rejects it
    /// through the job's own reply channel.
    pub fn submit(&self, job: Arc<Job>) {
        self.batcher.submit(job);
    }

    /// Whether it takes a request now (every worker started, one serves,
    /// not draining).
    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    /// The signals of this version's retirement, for the one who takes it
    /// out of service (`None` once taken).
    pub fn retirement(&self) -> Option<Retirement> {
        self.retirement.lock().take()
    }

    /// The pool of workers (tests).
    #[cfg(test)]
    pub fn pool(&self) -> &Pool {
        &self._pool
    }

    /// One request answered by this version.
    pub fn count_answer(&self) {
        self.metrics.count_answer();
    }
}

impl Drop for ServedVersion {
    fn drop(&mut self) {
        // The last holder let go: no request of this version is waiting for
        // an answer any more (a client that left may still have rows queued;
        // the batcher drops them).
        self.readiness.advance(VersionState::Retired);
        self.metrics.remove();
        self.batcher.send(BatcherMessage::Retire);
        drop(self.drained.take());
    }
}
