//! The model half of the engine: what a trained model is, and how it is read.
//!
//! Owns: `arch.json` parsing ([`arch`]), the TKP1 checkpoint reader and writer
//! ([`checkpoint`], [`writer`]), deterministic synthetic and demo weights
//! ([`synth`]), and the in-memory weight structs ([`weights`]). Must not touch:
//! kernels (see `backend/`) or anything about serving.

pub mod arch;
pub mod weights;

use serde::{Deserialize, Serialize};

pub use arch::{Dims, ModelSize};
pub use weights::{Block, Expert, LayerNorm, Linear, MoeWeights, ParamSpec};

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
