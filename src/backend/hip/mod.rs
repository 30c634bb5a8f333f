//! The HIP (AMD GPU) backend, behind the `hip` Cargo feature.
//!
//! Owns: everything HIP — the result layer ([`ffi`]: every `hipError_t`
//! becomes a typed [`HipError`] naming the call), the safe layer (`runtime`:
//! RAII device and pinned buffers, streams, events, modules loaded from the
//! embedded code objects), the typed kernel launches (`launch`), and
//! [`HipBackend`] (`device`). Must not touch: batching, HTTP, the CPU
//! backend, or the model files.
//!
//! `cfg(feature = "hip")` lives only in this module: without the feature the
//! same API is a stub whose constructor returns "built without HIP support
//! (rebuild with --features hip)", so callers (the engine's backend
//! selection, tests) never need a `cfg`. All `unsafe` of the crate's GPU code
//! is in `ffi`, `runtime` and `launch`, each block with a `// SAFETY:` note.
//!
//! The forward (see `device`): upload rows, router + top-k kernel, device-side
//! dispatch (each expert's rows, ascending), then per expert gather ->
//! (GEMM+bias -> LayerNorm+GELU) x blocks -> output GEMM, then the combine in
//! expert index order, download. One host wait per forward; the row lists
//! never come back to the host. Batch invariance holds by the kernels'
//! construction (kernels/README.md).

use crate::model::{LayerNormMode, MoeWeights};

use super::BackendError;

#[cfg(feature = "hip")]
mod device;
#[cfg(feature = "hip")]
pub mod ffi;
#[cfg(feature = "hip")]
mod kernels;
#[cfg(feature = "hip")]
mod launch;
#[cfg(feature = "hip")]
mod runtime;
#[cfg(not(feature = "hip"))]
mod stub;

#[cfg(feature = "hip")]
pub use device::HipBackend;
#[cfg(feature = "hip")]
pub use ffi::HipError;
#[cfg(not(feature = "hip"))]
pub use stub::HipBackend;

/// Whether this build has HIP support (the `hip` feature).
pub const COMPILED: bool = cfg!(feature = "hip");

/// The message of every HIP call in a build without the feature.
pub const NOT_COMPILED: &str = "built without HIP support (rebuild with --features hip)";

/// Which GPUs to use and how many streams each serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HipOptions {
    /// Device ids; empty means every visible device.
    pub gpus: Vec<u32>,
    /// Streams per GPU; sessions are spread over GPUs, then streams, round-robin.
    pub streams_per_gpu: usize,
}

impl Default for HipOptions {
    fn default() -> Self {
        HipOptions {
            gpus: Vec::new(),
            streams_per_gpu: 2,
        }
    }
}

/// Number of HIP devices visible to this process (an error says why none
/// can be counted: no driver, no device, or a build without HIP).
pub fn device_count() -> Result<usize, BackendError> {
    #[cfg(feature = "hip")]
    {
        runtime::device_count().map_err(BackendError::from)
    }
    #[cfg(not(feature = "hip"))]
    {
        Err(BackendError::Unavailable(NOT_COMPILED.to_string()))
    }
}

/// Builds the HIP backend: one copy of the weights per GPU. Fails when the
/// build has no HIP support, no device is present, or a device call fails;
/// the error says which.
pub fn new_backend(
    weights: &MoeWeights,
    mode: LayerNormMode,
    options: &HipOptions,
) -> Result<HipBackend, BackendError> {
    HipBackend::new(weights, mode, options)
}
