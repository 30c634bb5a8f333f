//! One model version in service: its batcher, its workers' backend, its
//! readiness and what it is.
//!
//! Owns: [`ServedVersion`] and the rule that ends it: a version lives as long
//! as someone holds it (the repository while it is the served version, and
//! every request it accepted until that request is answered); when the last
//! holder lets go, [`Drop`] tells its batcher to retire, the batcher stops,
//! its workers finish the batch in hand and end, and the weights are freed.
//! So requests always finish on the version that accepted them and no
//! version outlives its last batch. Must not touch: which version serves
//! (the repository's registry), how a version is built (`startup.rs`).

use std::sync::Arc;

use prometheus::IntCounter;

use super::ModelDescription;
use crate::backend::Backend;
use crate::batcher::{BatcherHandle, Message as BatcherMessage};
use crate::input::InputLimits;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::stats::InferStats;

/// A running pool serving one version of one model.
pub struct ServedVersion {
    /// Name, version, shapes, files: what `/healthz` and `/v2` describe.
    pub description: Arc<ModelDescription>,
    pub batcher: BatcherHandle,
    /// For device metrics and the free-after-drain check; compute goes
    /// through the workers.
    pub backend: Arc<dyn Backend>,
    pub readiness: Arc<Readiness>,
    /// What a valid input looks like for this version.
    pub limits: InputLimits,
    /// The statistics extension's counters for this version (recorded in
    /// `Engine::infer`).
    pub stats: InferStats,
    /// `tokitai_model_answers_total{model, version}`, resolved once.
    answers: IntCounter,
    recording: bool,
}

impl ServedVersion {
    pub fn new(
        batcher: BatcherHandle,
        backend: Arc<dyn Backend>,
        readiness: Arc<Readiness>,
        description: Arc<ModelDescription>,
        limits: InputLimits,
        metrics: &Metrics,
    ) -> ServedVersion {
        ServedVersion {
            answers: metrics.model_answers(&description.name, description.version),
            recording: metrics.is_recording(),
            stats: InferStats::default(),
            description,
            batcher,
            backend,
            readiness,
            limits,
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

    /// One request answered by this version.
    pub fn count_answer(&self) {
        if self.recording {
            self.answers.inc();
        }
    }
}

impl Drop for ServedVersion {
    fn drop(&mut self) {
        // The last holder let go: no request of this version is waiting for
        // an answer any more (a client that left may still have rows queued;
        // the batcher drops them).
        self.batcher.send(BatcherMessage::Retire);
    }
}
