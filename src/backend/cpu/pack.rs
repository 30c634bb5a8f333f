//! Load-time packing of the checkpoint's `[out, in]` tensors into the
//! micro-kernel's layout.
//!
//! Owns: [`PackedLinear`] / [`PackedModel`] and the conversion from
//! [`MoeWeights`], which consumes the raw tensors one at a time (each raw
//! tensor is dropped as soon as its packed copy exists, so loading never holds
//! two full copies of the weights). Must not touch: arithmetic (see `simd`).

use super::simd::NR;
use crate::model::{Dims, LayerNormMode, Linear, MoeWeights};

/// `W^T` split into column panels of [`NR`] columns: panel `p` holds
/// `data[p * k * NR + kk * NR + j] = W[p * NR + j][kk]`, zero past `n`.
#[derive(Debug)]
pub(crate) struct PackedLinear {
    pub n: usize,
    pub k: usize,
    pub panels: usize,
    pub data: Vec<f32>,
    /// `[panels * NR]`, zero-padded.
    pub bias: Vec<f32>,
}

impl PackedLinear {
    pub(crate) fn pack(l: Linear) -> PackedLinear {
        let (n, k) = (l.out_dim, l.in_dim);
        let panels = n.div_ceil(NR);
        let mut data = vec![0.0f32; panels * k * NR];
        for (o, w_row) in l.weight.chunks_exact(k).enumerate().take(n) {
            let (p, j) = (o / NR, o % NR);
            let panel = &mut data[p * k * NR..(p + 1) * k * NR];
            for (kk, w) in w_row.iter().enumerate() {
                panel[kk * NR + j] = *w;
            }
        }
        drop(l.weight);
        PackedLinear {
            n,
            k,
            panels,
            data,
            bias: pad(l.bias, panels * NR, 0.0),
        }
    }

    /// The panels' slice for panels `p0..p1`.
    pub(crate) fn panel_data(&self, p: usize) -> &[f32] {
        &self.data[p * self.k * NR..(p + 1) * self.k * NR]
    }

    pub(crate) fn bytes(&self) -> usize {
        (self.data.len() + self.bias.len()) * 4
    }
}

fn pad(mut v: Vec<f32>, len: usize, fill: f32) -> Vec<f32> {
    v.resize(len, fill);
    v.shrink_to_fit();
    v
}

/// A block's linear layer and, in `Stored` mode, its padded gamma/beta.
#[derive(Debug)]
pub(crate) struct PackedBlock {
    pub linear: PackedLinear,
    pub affine: Option<(Vec<f32>, Vec<f32>)>,
}

#[derive(Debug)]
pub(crate) struct PackedExpert {
    pub blocks: Vec<PackedBlock>,
    pub output: PackedLinear,
}

/// Everything a forward reads, shared by sessions through an `Arc`.
#[derive(Debug)]
pub(crate) struct PackedModel {
    pub dims: Dims,
    pub mode: LayerNormMode,
    /// Kept as stored: routing is a tiny scalar step (see `router`).
    pub router: Linear,
    pub experts: Vec<PackedExpert>,
}

impl PackedModel {
    /// Consumes `weights`, packing tensor by tensor. In `Identity` mode the
    /// LayerNorm parameters are dropped unread.
    pub(crate) fn pack(weights: MoeWeights, mode: LayerNormMode) -> PackedModel {
        let MoeWeights { dims, router, experts } = weights;
        let experts = experts
            .into_iter()
            .map(|expert| {
                let blocks = expert
                    .blocks
                    .into_iter()
                    .map(|block| {
                        let linear = PackedLinear::pack(block.linear);
                        let width = linear.panels * NR;
                        let affine = match mode {
                            LayerNormMode::Identity => None,
                            LayerNormMode::Stored => {
                                Some((pad(block.norm.gamma, width, 0.0), pad(block.norm.beta, width, 0.0)))
                            }
                        };
                        PackedBlock { linear, affine }
                    })
                    .collect();
                PackedExpert {
                    blocks,
                    output: PackedLinear::pack(expert.output),
                }
            })
            .collect();
        PackedModel {
            dims,
            mode,
            router,
            experts,
        }
    }

    /// Packed bytes of one expert (decides the threading policy).
    pub(crate) fn expert_bytes(&self) -> usize {
        self.experts.first().map_or(0, |e| {
            e.blocks.iter().map(|b| b.linear.bytes()).sum::<usize>() + e.output.bytes()
        })
    }
}
