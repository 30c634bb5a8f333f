//! Compute backends behind one trait.
//!
//! Owns: the [`Backend`] / [`Session`] contract, the output buffers, and the
//! plain reference forward used as a test oracle. Must not touch: HTTP,
//! queueing or batching policy (a session only ever sees a ready batch).
//!
//! A [`Backend`] is built once per process from the model's weights (it packs
//! them into whatever layout its kernels want and shares them); each worker
//! then asks it for its own [`Session`] (scratch buffers, thread budget, and on
//! a GPU its stream). Sessions share the backend's weights through an `Arc`,
//! never a copy.

pub mod cpu;
pub mod hip;
pub mod reference;

use crate::model::Dims;

/// Per-session settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Intra-op threads for one forward. Splitting work across threads never
    /// changes any row's arithmetic.
    pub threads: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { threads: 1 }
    }
}

/// Outputs of one forward over `n_rows` rows, row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardOutput {
    pub n_rows: usize,
    /// `[n_rows, dims.output]`
    pub logits: Vec<f32>,
    /// `[n_rows, dims.experts]`: softmax probabilities with all but the top-k zeroed.
    pub router_weights: Vec<f32>,
    /// `[n_rows, dims.top_k]`: selected experts, by descending probability,
    /// ties to the lower index.
    pub top_k: Vec<u32>,
}

impl ForwardOutput {
    /// The row count of `input` (a whole number of rows of `dims.input`,
    /// else an error), with every buffer sized for it. Every backend's
    /// forward starts here, so the shape rule is written once.
    pub fn prepare(&mut self, dims: &Dims, input: &[f32]) -> Result<usize, BackendError> {
        if !input.len().is_multiple_of(dims.input) {
            return Err(BackendError::InputShape {
                got: input.len(),
                row_len: dims.input,
            });
        }
        let n_rows = input.len() / dims.input;
        self.reset(dims, n_rows);
        Ok(n_rows)
    }

    /// Sizes every buffer for `n_rows` rows, reusing capacity.
    pub fn reset(&mut self, dims: &Dims, n_rows: usize) {
        self.n_rows = n_rows;
        self.logits.clear();
        self.logits.resize(n_rows * dims.output, 0.0);
        self.router_weights.clear();
        self.router_weights.resize(n_rows * dims.experts, 0.0);
        self.top_k.clear();
        self.top_k.resize(n_rows * dims.top_k, 0);
    }
}

/// A failure inside a backend. `Clone`, so one failed batch can answer each
/// of its requests with the same typed error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    #[error("input has {got} values, not a whole number of rows of {row_len}")]
    InputShape { got: usize, row_len: usize },
    #[error("{0}")]
    Unavailable(String),
    #[error("device error: {0}")]
    Device(String),
}

/// How many workers, and intra-op threads each, a backend serves fastest
/// with (used when `workers.count` / `workers.threads_per_worker` are 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    pub workers: usize,
    pub threads_per_worker: usize,
}

/// A model prepared for one kind of device. Built once, shared by all workers.
pub trait Backend: Send + Sync {
    /// Short name for logs, `/healthz` and metrics (`"cpu"`, `"hip"`).
    fn name(&self) -> &'static str;
    /// Human description of the devices in use (e.g. `"cpu (avx2+fma)"`).
    fn describe(&self) -> String;
    /// The instruction set the kernels run on (CPU: `avx512_bf16`, `avx512`,
    /// `avx2` or `scalar`; a GPU backend: `gpu`), for `/healthz`, metadata
    /// and the `isa` label of `tokitai_model_info`.
    fn isa(&self) -> &'static str {
        "gpu"
    }
    /// The model's shapes.
    fn dims(&self) -> Dims;
    /// The pool shape that serves this model fastest on `cores` CPU cores.
    /// Default: one single-threaded worker per core.
    fn pool_shape(&self, cores: usize) -> PoolShape {
        PoolShape {
            workers: cores.max(1),
            threads_per_worker: 1,
        }
    }
    /// Memory in use on each compute device, as `(device id, bytes)`, read
    /// when `/metrics` is scraped. None for the CPU.
    fn device_memory_used(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// A new session for one worker. Sessions share this backend's weights.
    fn create_session(&self, config: SessionConfig) -> Result<Box<dyn Session>, BackendError>;
}

/// One worker's execution context: scratch buffers, thread budget, stream.
pub trait Session: Send {
    /// Runs the forward over `input` (`n_rows * dims.input` values, row-major)
    /// and writes every output into `out` (resized here).
    fn forward(&mut self, input: &[f32], out: &mut ForwardOutput) -> Result<(), BackendError>;
}
