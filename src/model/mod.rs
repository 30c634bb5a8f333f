//! The model half of the engine: what a trained model is, and how it is read.
//!
//! Owns: `arch.json` parsing ([`arch`]), the TKP1 checkpoint reader and writer
//! ([`checkpoint`], [`writer`]), opening given paths as capped regular files
//! ([`files`], which the `--config` file uses too), the weight precision
//! setting and f16 conversions ([`precision`]), deterministic synthetic and demo weights
//! ([`synth`], drawn from the private `generator` streams that the writer's
//! optimizer state also uses), the in-memory weight structs ([`weights`]),
//! and the model source rule, written once ([`load_files_or_demo`]: the
//! given files, else the demo model). Must not touch: kernels (see
//! `backend/`) or anything about serving.

pub mod arch;
pub mod checkpoint;
pub mod error;
pub mod files;
mod generator;
pub mod precision;
pub mod synth;
pub mod weights;
pub mod writer;

use serde::{Deserialize, Serialize};

pub use arch::{Arch, Dims, ModelKind, ModelSize, RouterKind};
pub use checkpoint::{Checkpoint, read_checkpoint};
pub use error::{CheckpointPart, ModelError};
pub use files::{FileError, FileRefusal};
pub use precision::WeightPrecision;
pub use synth::{demo_model, synth_weights, write_model_dir};
pub use weights::{Block, Expert, LayerNorm, Linear, MoeWeights, ParamSpec};
pub use writer::write_checkpoint;

/// Which LayerNorm affine parameters the forward applies.
///
/// Upstream disagrees with itself (see the spec's LayerNorm note): its fp32
/// reference applies the checkpoint's gamma/beta, while its production HIP
/// forward — the one the old sidecar served and training ran — always used
/// gamma = 1, beta = 0. The engine serves `Identity` by default, so answers
/// match the old sidecar and what the model was trained with; `Stored` is the
/// mathematical definition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerNormMode {
    /// gamma = 1, beta = 0 whatever the checkpoint holds (old sidecar, training).
    #[default]
    Identity,
    /// The checkpoint's stored gamma and beta (upstream's fp32 reference).
    Stored,
}

impl LayerNormMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerNormMode::Identity => "identity",
            LayerNormMode::Stored => "stored",
        }
    }
}

impl std::fmt::Display for LayerNormMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LayerNormMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "identity" => Ok(LayerNormMode::Identity),
            "stored" => Ok(LayerNormMode::Stored),
            other => Err(format!("expected \"identity\" or \"stored\", got {other:?}")),
        }
    }
}

/// Where a served model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// Loaded from an arch.json and a TKP1 checkpoint.
    Files {
        arch: std::path::PathBuf,
        checkpoint: std::path::PathBuf,
    },
    /// Built in process by [`synth::demo_model`], no files.
    Demo,
}

/// A model ready to serve: its arch, weights, and provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModel {
    pub arch: Arch,
    pub weights: MoeWeights,
    pub source: ModelSource,
    /// Training step from the checkpoint header (0 for the demo model).
    pub step: u32,
}

/// Loads and validates `arch_path`, then reads `checkpoint_path` against its dims.
///
/// A `param_count` in arch.json that disagrees with the dims is reported
/// (a warning), not trusted: the dims decide.
pub fn load_model(arch_path: &std::path::Path, checkpoint_path: &std::path::Path) -> Result<LoadedModel, ModelError> {
    let arch = Arch::load(arch_path)?;
    let dims = arch.dims();
    if let Some(claimed) = arch.param_count
        && claimed != dims.param_count()
    {
        tracing::warn!(
            arch = %arch_path.display(),
            claimed,
            actual = dims.param_count(),
            "arch.json param_count disagrees with its dims; using the dims"
        );
    }
    let ckpt = read_checkpoint(checkpoint_path, &dims)?;
    Ok(LoadedModel {
        arch,
        weights: ckpt.weights,
        source: ModelSource::Files {
            arch: arch_path.to_path_buf(),
            checkpoint: checkpoint_path.to_path_buf(),
        },
        step: ckpt.step,
    })
}

/// The model source rule, written once: the `(arch.json, checkpoint)`
/// files when given (loaded by [`load_model`]), else the built-in demo model.
pub fn load_files_or_demo(files: Option<(&std::path::Path, &std::path::Path)>) -> Result<LoadedModel, ModelError> {
    match files {
        Some((arch, checkpoint)) => load_model(arch, checkpoint),
        None => Ok(synth::demo_model()),
    }
}
