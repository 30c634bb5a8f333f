//! Writes the CUDA harness's inputs (tools/hip-harness/README.md): for each
//! public fixture, its weights, 64 input rows, the CPU backend's outputs in
//! both LayerNorm modes, and per-kernel references, as raw little-endian
//! arrays plus a `meta.txt`.
//!
//! Owns: that file format (the harness's `load` reads it). Must not touch:
//! the fixtures (read-only) or anything the engine serves.
//!
//! ```text
//! cargo run --example dump_hip_harness_data [-- OUT_DIR]   # default .harness-data
//! ```
//!
//! The device machine has no Rust and no fixtures, so everything the harness
//! compares against is computed here, once, on the CPU.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokitai_serve::backend::cpu::CpuBackend;
use tokitai_serve::backend::{Backend, ForwardOutput, SessionConfig};
use tokitai_serve::model::arch::Arch;
use tokitai_serve::model::checkpoint::read_checkpoint;
use tokitai_serve::model::{LayerNormMode, Linear, MoeWeights};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");
const LN_EPS: f32 = 1e-5;

fn write_f32(dir: &Path, name: &str, v: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    v.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    std::fs::write(dir.join(name), bytes)
}

fn write_u32(dir: &Path, name: &str, v: &[u32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    v.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    std::fs::write(dir.join(name), bytes)
}

/// `rows x out` of `x W^T + b`, each element one ascending fma chain from its
/// bias (the order the kernels use).
fn linear_rows(l: &Linear, x: &[f32]) -> Vec<f32> {
    let rows = x.len() / l.in_dim;
    let mut out = Vec::with_capacity(rows * l.out_dim);
    for r in 0..rows {
        let xr = &x[r * l.in_dim..(r + 1) * l.in_dim];
        for o in 0..l.out_dim {
            let w = &l.weight[o * l.in_dim..(o + 1) * l.in_dim];
            out.push(w.iter().zip(xr).fold(l.bias[o], |acc, (a, b)| b.mul_add(*a, acc)));
        }
    }
    out
}

/// LayerNorm (+ optional affine) then GELU over rows of width `n`, in f64
/// (an independent reference, not the kernels' order).
fn ln_gelu_rows(z: &[f32], n: usize, affine: Option<(&[f32], &[f32])>) -> Vec<f32> {
    let mut out = Vec::with_capacity(z.len());
    for row in z.chunks_exact(n) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (var + LN_EPS as f64).sqrt();
        for (j, &v) in row.iter().enumerate() {
            let mut h = (v as f64 - mean) * inv;
            if let Some((g, b)) = affine {
                h = h * g[j] as f64 + b[j] as f64;
            }
            let g = 0.5 * h * (1.0 + (0.797_884_560_8 * (h + 0.044715 * h * h * h)).tanh());
            out.push(g as f32);
        }
    }
    out
}

fn cpu_forward(weights: &MoeWeights, mode: LayerNormMode, input: &[f32]) -> ForwardOutput {
    let backend = CpuBackend::new(weights.clone(), mode);
    let mut session = backend.create_session(SessionConfig::default()).expect("cpu session");
    let mut out = ForwardOutput::default();
    session.forward(input, &mut out).expect("cpu forward");
    out
}

fn dump(name: &str, root: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let src = PathBuf::from(FIXTURES).join(name);
    let dims = Arch::load(&src.join("arch.json"))?.dims();
    let weights = read_checkpoint(&src.join("checkpoint.tkp1"), &dims)?.weights;
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("expected.json"))?)?;
    let rows = expected["inputs"].as_array().ok_or("inputs")?;
    let input: Vec<f32> = rows
        .iter()
        .flat_map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().expect("number") as f32)
        })
        .collect();
    let n = rows.len();
    let strict: Vec<u32> = expected["top_k_strict"]
        .as_array()
        .ok_or("top_k_strict")?
        .iter()
        .map(|b| b.as_bool() == Some(true))
        .map(u32::from)
        .collect();

    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut meta = std::fs::File::create(dir.join("meta.txt"))?;
    writeln!(
        meta,
        "input {}\nhidden {}\noutput {}\nexperts {}\ntop_k {}\nblocks {}\nrows {}",
        dims.input,
        dims.hidden,
        dims.output,
        dims.experts,
        dims.top_k,
        dims.depth + 1,
        n
    )?;

    write_f32(&dir, "router_w.f32", &weights.router.weight)?;
    write_f32(&dir, "router_b.f32", &weights.router.bias)?;
    for (e, expert) in weights.experts.iter().enumerate() {
        for (l, block) in expert.blocks.iter().enumerate() {
            write_f32(&dir, &format!("e{e}_b{l}_w.f32"), &block.linear.weight)?;
            write_f32(&dir, &format!("e{e}_b{l}_bias.f32"), &block.linear.bias)?;
            write_f32(&dir, &format!("e{e}_b{l}_gamma.f32"), &block.norm.gamma)?;
            write_f32(&dir, &format!("e{e}_b{l}_beta.f32"), &block.norm.beta)?;
        }
        write_f32(&dir, &format!("e{e}_out_w.f32"), &expert.output.weight)?;
        write_f32(&dir, &format!("e{e}_out_bias.f32"), &expert.output.bias)?;
    }
    write_f32(&dir, "input.f32", &input)?;
    write_u32(&dir, "top_k_strict.u32", &strict)?;

    for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
        let out = cpu_forward(&weights, mode, &input);
        write_f32(&dir, &format!("cpu_{mode}_logits.f32"), &out.logits)?;
        write_f32(&dir, &format!("cpu_{mode}_router_weights.f32"), &out.router_weights)?;
        write_u32(&dir, &format!("cpu_{mode}_top_k.u32"), &out.top_k)?;
    }

    // Per-kernel references: router probabilities (f64 softmax of the f32
    // router logits), and expert 0's first block on all rows.
    let r = linear_rows(&weights.router, &input);
    let mut probs = Vec::with_capacity(r.len());
    for row in r.chunks_exact(dims.experts) {
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let ex: Vec<f64> = row.iter().map(|&v| (v as f64 - mx).exp()).collect();
        let s: f64 = ex.iter().sum();
        probs.extend(ex.iter().map(|v| (v / s) as f32));
    }
    write_f32(&dir, "ref_router_probs.f32", &probs)?;
    let b0 = &weights.experts[0].blocks[0];
    let z = linear_rows(&b0.linear, &input);
    write_f32(&dir, "ref_e0_gemm0.f32", &z)?;
    write_f32(
        &dir,
        "ref_e0_lngelu0_identity.f32",
        &ln_gelu_rows(&z, dims.hidden, None),
    )?;
    write_f32(
        &dir,
        "ref_e0_lngelu0_stored.f32",
        &ln_gelu_rows(&z, dims.hidden, Some((&b0.norm.gamma, &b0.norm.beta))),
    )?;
    println!(
        "wrote {} ({} rows, H={}, blocks={})",
        dir.display(),
        n,
        dims.hidden,
        dims.depth + 1
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from(".harness-data"), PathBuf::from);
    for name in ["nano-s11", "nano-s12"] {
        dump(name, &root)?;
    }
    Ok(())
}
