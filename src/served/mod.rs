//! One served model version: what it is, how it is built, and its life.
//!
//! Owns: a version's description ([`ModelDescription`]) and the target a
//! request names ([`ModelTarget`]); its build in [`build`] (model ->
//! backend -> warmed-up sessions, the pool shape and batching policy); the
//! running version in [`version`] ([`ServedVersion`]: batcher, pool,
//! statistics, metrics, state, and the signals its retirement gives); and
//! its [`pool`] of workers, which the pool starts and supervises (a worker
//! that ends is replaced there). Layer: below the repository (which decides
//! which versions serve and calls down into this), above the batcher, the
//! workers, the mailbox, the backends and the model. Must not touch: which
//! version serves (the repository), requests (the engine facade and the
//! protocols), batching rules (the batcher), kernels (the backends).

pub(crate) mod build;
pub(crate) mod pool;
pub(crate) mod version;

use serde::Serialize;

// What tests and benches load and build models with.
pub use self::build::{build_backend, choose_backend, pool_shape};
pub(crate) use self::version::{Retirement, ServedVersion};
use crate::metrics::ModelInfo;
use crate::model::{Dims, LayerNormMode, WeightPrecision};

/// What one served model version is, as `/healthz`, `/v2` metadata, the
/// log and the `tokitai_model_info` metric describe it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDescription {
    /// Its name: the repository folder, or `model.name`.
    pub name: String,
    /// Its version: the repository folder's number, or the checkpoint's step.
    pub version: u64,
    pub size: &'static str,
    pub layernorm: LayerNormMode,
    /// How the expert weights are held (`model.weight_precision`).
    pub weight_precision: WeightPrecision,
    pub param_count: u64,
    /// `arch.json` path, or `"builtin:demo"` for the demo model.
    pub arch: String,
    /// `checkpoint.tkp1` path, or `"builtin:demo"` for the demo model.
    pub checkpoint: String,
    pub checkpoint_step: u32,
    pub fingerprint: Option<String>,
    pub demo: bool,
    pub backend: &'static str,
    pub devices: String,
    /// The instruction set the kernels run on (`Backend::isa`).
    pub isa: &'static str,
    #[serde(skip)]
    pub dims: Dims,
}

impl ModelDescription {
    /// The `tokitai_model_info` labels of this version.
    pub fn metric_info(&self) -> ModelInfo {
        ModelInfo {
            model: self.name.clone(),
            version: self.version,
            size: self.size.to_string(),
            layernorm: self.layernorm.as_str().to_string(),
            weight_precision: self.weight_precision.as_str().to_string(),
            param_count: self.param_count,
            checkpoint: self.checkpoint.clone(),
            backend: self.backend.to_string(),
            devices: self.devices.clone(),
            isa: self.isa.to_string(),
        }
    }
}

/// Which model (and version) a request is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelTarget<'a> {
    /// `None`: the default model (`model.name`, or the only model).
    pub name: Option<&'a str>,
    /// `None`: whichever version serves.
    pub version: Option<u64>,
}

impl<'a> ModelTarget<'a> {
    /// The default model, its served version.
    pub const DEFAULT: ModelTarget<'static> = ModelTarget {
        name: None,
        version: None,
    };

    /// Model `name`, whichever version serves (or exactly `version`).
    pub fn named(name: &'a str, version: Option<u64>) -> ModelTarget<'a> {
        ModelTarget {
            name: Some(name),
            version,
        }
    }
}
