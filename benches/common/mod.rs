//! Helpers the forward benches share (`forward.rs`, `peers.rs`): synthetic
//! inputs, the FLOP and weight-byte counts of a forward, and where a size's
//! weights come from.
//!
//! Owns: the counting rules, written once. GFLOP/s count only the experts
//! actually computed (2 flops per MAC of each selected expert's layers,
//! router excluded); weight bytes are the packed bytes of the experts a batch
//! uses, each read once per forward. Must not touch: the engine, timing.

use std::path::Path;
use std::time::Instant;

use tokitai_serve::backend::ForwardOutput;
use tokitai_serve::backend::cpu::CpuBackend;
use tokitai_serve::model::synth::synth_weights;
use tokitai_serve::model::{Dims, ModelSize, MoeWeights};

/// `rows x width` roughly normal values (a sum of 4 uniforms, like the
/// peers' standard normal inputs), deterministic in `seed`.
pub fn inputs(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..rows * width)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (0..4)
                .map(|i| ((s >> (16 * i)) & 0xFFFF) as f32 / 65536.0 - 0.5)
                .sum::<f32>()
                * 1.7
        })
        .collect()
}

/// Layer shapes `(k, n)` of one expert.
pub fn expert_layers(d: &Dims) -> Vec<(usize, usize)> {
    let mut v = vec![(d.input, d.hidden)];
    v.extend(std::iter::repeat_n((d.hidden, d.hidden), d.depth));
    v.push((d.hidden, d.output));
    v
}

/// Rows per expert for this batch (from the forward's own routing).
pub fn rows_per_expert(d: &Dims, out: &ForwardOutput) -> Vec<usize> {
    let mut m = vec![0; d.experts];
    for &e in &out.top_k {
        m[e as usize] += 1;
    }
    m
}

/// Expert FLOPs of a forward with `rows[e]` rows on expert `e`.
pub fn expert_flops(d: &Dims, rows: &[usize]) -> f64 {
    let per_row: usize = expert_layers(d).iter().map(|(k, n)| 2 * k * n).sum();
    rows.iter().map(|&m| (m * per_row) as f64).sum()
}

/// Expert weight bytes one forward streams: every expert with rows, once.
pub fn weight_bytes_read(backend: &CpuBackend, rows: &[usize]) -> f64 {
    let per_expert = backend.weight_bytes() as f64 / rows.len() as f64;
    rows.iter().filter(|&&m| m > 0).count() as f64 * per_expert
}

/// `VmRSS` of this process, bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The weights for `size`: in memory from [`synth_weights`] (seed 42), or
/// for Full read from `full_dir/full/` (its synthetic files, ~3.2 GB,
/// written there first if missing); `None` for Full without a folder.
pub fn weights_for(size: ModelSize, full_dir: Option<&Path>) -> Option<MoeWeights> {
    if size != ModelSize::Full {
        return Some(synth_weights(Dims::for_size(size), 42));
    }
    let Some(dir) = full_dir else {
        println!("full: skipped (set TOKITAI_BENCH_DIR to a folder with ~3.3 GB free)");
        return None;
    };
    let dir = dir.join("full");
    let (arch, ckpt) = (dir.join("arch.json"), dir.join("checkpoint.tkp1"));
    if !ckpt.exists() {
        let t = Instant::now();
        tokitai_serve::model::write_model_dir(&dir, size, 42, false).expect("write the Full model files");
        println!("full: wrote {} in {:.1} s", dir.display(), t.elapsed().as_secs_f64());
    }
    let model = tokitai_serve::model::load_model(&arch, &ckpt).expect("load the Full model files");
    Some(model.weights)
}
