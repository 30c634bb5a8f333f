//! Deterministic synthetic weights, synthetic model directories, and the demo model.
//!
//! Owns: the distribution of every synthetic parameter ([`synth_weights`]),
//! writing a complete model directory ([`write_model_dir`]) and the in-process
//! [`demo_model`]. Must not touch: the random stream itself (see
//! `generator.rs`), the checkpoint format (see `writer.rs` / `checkpoint.rs`)
//! or any kernel.

use std::path::{Path, PathBuf};

use super::arch::{Arch, Dims, ModelSize};
use super::error::ModelError;
use super::generator::{DOMAIN_WEIGHTS, fill_uniform, stream_key};
use super::weights::MoeWeights;
use super::writer::write_checkpoint;
use super::{LoadedModel, ModelSource};

/// Seed of [`demo_model`].
pub const DEMO_SEED: u64 = 0x746f_6b69_7461_6921;
/// Step written into the header of synthetic checkpoints.
pub const SYNTH_STEP: u32 = 1000;

/// What a parameter record is, for choosing its distribution.
#[derive(Clone, Copy)]
enum Kind {
    Weight { fan_in: usize },
    Bias,
    RouterBias,
    Gamma,
    Beta,
}

/// The kind of every record, in checkpoint order (mirrors `Dims::param_specs`).
fn param_kinds(dims: &Dims) -> Vec<Kind> {
    let mut kinds = vec![Kind::Weight { fan_in: dims.input }, Kind::RouterBias];
    for _ in 0..dims.experts {
        for b in 0..=dims.depth {
            let fan_in = if b == 0 { dims.input } else { dims.hidden };
            kinds.extend([Kind::Weight { fan_in }, Kind::Bias, Kind::Gamma, Kind::Beta]);
        }
        kinds.extend([Kind::Weight { fan_in: dims.hidden }, Kind::Bias]);
    }
    kinds
}

/// Deterministic, non-trivial weights for `dims`: Linear weights uniform in
/// `±1/sqrt(fan_in)` (PyTorch's default scale, so activations stay O(1)
/// through depth 12 with the LayerNorms), biases in `±0.1`, router bias in
/// `±0.2`, gamma in `[0.8, 1.2)`, beta in `±0.1`. Same `(dims, seed)`, same bits.
pub fn synth_weights(dims: Dims, seed: u64) -> MoeWeights {
    let specs = dims.param_specs();
    let kinds = param_kinds(&dims);
    debug_assert_eq!(specs.len(), kinds.len());
    let tensors = specs
        .iter()
        .zip(kinds)
        .enumerate()
        .map(|(i, (spec, kind))| {
            let (lo, hi) = match kind {
                Kind::Weight { fan_in } => {
                    let a = 1.0 / (fan_in.max(1) as f32).sqrt();
                    (-a, a)
                }
                Kind::Bias => (-0.1, 0.1),
                Kind::RouterBias => (-0.2, 0.2),
                Kind::Gamma => (0.8, 1.2),
                Kind::Beta => (-0.1, 0.1),
            };
            let mut t = vec![0.0f32; spec.len];
            fill_uniform(&mut t, stream_key(seed, DOMAIN_WEIGHTS, i as u64), lo, hi);
            t
        })
        .collect();
    MoeWeights::from_tensors(dims, tensors)
}

/// Writes `dir/arch.json` and `dir/checkpoint.tkp1` for `size` with
/// [`synth_weights`] under `seed` (creating `dir`), step [`SYNTH_STEP`].
/// With `optimizer_state`, every record carries deterministic non-zero AdamW
/// `m`/`v` of the weight's length, as a real training checkpoint does (about
/// 3x the bytes). Returns the arch and the two paths.
pub fn write_model_dir(
    dir: &Path,
    size: ModelSize,
    seed: u64,
    optimizer_state: bool,
) -> Result<(Arch, PathBuf, PathBuf), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let arch = Arch::for_size(size, seed);
    let arch_path = dir.join("arch.json");
    let ckpt_path = dir.join("checkpoint.tkp1");
    std::fs::write(&arch_path, arch.to_json_pretty()).map_err(|e| ModelError::io(&arch_path, e))?;
    let weights = synth_weights(arch.dims(), seed);
    let config = format!(r#"{{"size":"{size}","seed":{seed},"steps":{SYNTH_STEP},"synthetic":true}}"#);
    write_checkpoint(&ckpt_path, &weights, SYNTH_STEP, &config, optimizer_state)?;
    Ok((arch, arch_path, ckpt_path))
}

/// Nano weights from [`DEMO_SEED`], built in process with no files.
pub fn demo_model() -> LoadedModel {
    let arch = Arch::for_size(ModelSize::Nano, DEMO_SEED);
    let weights = synth_weights(arch.dims(), DEMO_SEED);
    LoadedModel {
        arch,
        weights,
        source: ModelSource::Demo,
        step: 0,
    }
}
