//! The plain reference forward: the spec's math written as directly as
//! possible, all experts on every row, scalar f32. Slow on purpose; it is the
//! oracle the fast kernels are tested against, and must not be optimised.

use super::ForwardOutput;
use crate::model::{LayerNormMode, Linear, MoeWeights};

const LN_EPS: f32 = 1e-5;

fn linear(l: &Linear, x: &[f32]) -> Vec<f32> {
    (0..l.out_dim)
        .map(|o| {
            let w = &l.weight[o * l.in_dim..(o + 1) * l.in_dim];
            let mut acc = 0.0f32;
            for (a, b) in w.iter().zip(x) {
                acc += a * b;
            }
            acc + l.bias[o]
        })
        .collect()
}

/// GELU, tanh form, as the spec writes it.
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6_f32 * (x + 0.044715 * x * x * x)).tanh())
}

/// Softmax then top-k: returns (probabilities, masked weights, selected experts).
pub fn route(router: &Linear, top_k: usize, x: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let r = linear(router, x);
    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = r.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let p: Vec<f32> = exps.iter().map(|e| e / sum).collect();
    let mut order: Vec<usize> = (0..p.len()).collect();
    // Stable sort: equal probabilities keep the lower expert index first.
    order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap_or(std::cmp::Ordering::Equal));
    let selected: Vec<u32> = order[..top_k].iter().map(|&e| e as u32).collect();
    let mut w = vec![0.0f32; p.len()];
    for &e in &selected {
        w[e as usize] = p[e as usize];
    }
    (p, w, selected)
}

/// Runs the reference forward over `input` (`n_rows * dims.input` values).
pub fn forward(weights: &MoeWeights, mode: LayerNormMode, input: &[f32]) -> ForwardOutput {
    let dims = weights.dims;
    let n_rows = input.len() / dims.input;
    let mut out = ForwardOutput::default();
    out.reset(&dims, n_rows);
    for row in 0..n_rows {
        let x = &input[row * dims.input..(row + 1) * dims.input];
        let (_, w, selected) = route(&weights.router, dims.top_k, x);
        let mut logits = vec![0.0f32; dims.output];
        for (e, expert) in weights.experts.iter().enumerate() {
            let mut h = x.to_vec();
            for block in &expert.blocks {
                let z = linear(&block.linear, &h);
                let n = z.len() as f32;
                let mean = z.iter().sum::<f32>() / n;
                let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                let inv = 1.0 / (var + LN_EPS).sqrt();
                h = z
                    .iter()
                    .enumerate()
                    .map(|(j, v)| {
                        let normed = (v - mean) * inv;
                        let affine = match mode {
                            LayerNormMode::Identity => normed,
                            LayerNormMode::Stored => normed * block.norm.gamma[j] + block.norm.beta[j],
                        };
                        gelu(affine)
                    })
                    .collect();
            }
            let y = linear(&expert.output, &h);
            for (l, v) in logits.iter_mut().zip(&y) {
                *l += w[e] * v;
            }
        }
        out.logits[row * dims.output..(row + 1) * dims.output].copy_from_slice(&logits);
        out.router_weights[row * dims.experts..(row + 1) * dims.experts].copy_from_slice(&w);
        out.top_k[row * dims.top_k..(row + 1) * dims.top_k].copy_from_slice(&selected);
    }
    out
}
