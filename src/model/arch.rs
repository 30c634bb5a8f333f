//! `arch.json`: the architecture record the training runner writes.
//!
//! Owns: parsing and validating arch.json, the size table, and [`Dims`], the
//! run-time shapes every other module takes its sizes from. Must not touch:
//! the checkpoint bytes or any kernel.
//!
//! (Parsing and validation are completed by the model-files work; the types
//! below are the contract the rest of the crate builds on.)

use serde::{Deserialize, Serialize};

/// The released size variants; each fixes `(hidden_dim, expert_depth)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelSize {
    Nano,
    Tiny,
    Medium,
    Full,
}

impl ModelSize {
    /// `(hidden_dim, expert_depth)` for this size, as the upstream table fixes them.
    pub fn hidden_and_depth(self) -> (usize, usize) {
        match self {
            ModelSize::Nano => (128, 2),
            ModelSize::Tiny => (2048, 5),
            ModelSize::Medium => (4096, 5),
            ModelSize::Full => (4096, 12),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelSize::Nano => "Nano",
            ModelSize::Tiny => "Tiny",
            ModelSize::Medium => "Medium",
            ModelSize::Full => "Full",
        }
    }
}

/// Run-time shapes of a model. Kernels and validation read sizes from here,
/// never from constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dims {
    /// Features per input row (96 for every released size).
    pub input: usize,
    /// Expert width H.
    pub hidden: usize,
    /// Logits per row (20).
    pub output: usize,
    /// Number of experts E (4).
    pub experts: usize,
    /// Experts used per row (2).
    pub top_k: usize,
    /// Hidden blocks per expert D.
    pub depth: usize,
}

impl Dims {
    /// The released shapes for `size`: 96 in, 20 out, 4 experts, top-2.
    pub fn for_size(size: ModelSize) -> Dims {
        let (hidden, depth) = size.hidden_and_depth();
        Dims { input: 96, hidden, output: 20, experts: 4, top_k: 2, depth }
    }
}
