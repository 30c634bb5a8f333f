//! In-memory MoE weights in the checkpoint's own layout (`[out, in]` row-major).
//!
//! Owns: the tensor structs and the one place that knows the checkpoint's
//! parameter order (`ParamSpec` list ↔ struct fields). Must not touch: file I/O
//! (see `checkpoint.rs`) or any kernel-specific packing (backends do that).

use super::arch::Dims;

/// A fully connected layer: `y = W x + b`, `W` is `[out_dim, in_dim]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// LayerNorm affine parameters (`gamma`, `beta`), each of the layer's width.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// `GELU(LayerNorm(W h + b))`: the input block and each hidden block of an expert.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub linear: Linear,
    pub norm: LayerNorm,
}

/// One expert: `1 + depth` blocks, then the output projection.
#[derive(Debug, Clone, PartialEq)]
pub struct Expert {
    pub blocks: Vec<Block>,
    pub output: Linear,
}

/// All parameters a forward needs. The AdamW state is never held here.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeWeights {
    pub dims: Dims,
    pub router: Linear,
    pub experts: Vec<Expert>,
}

/// Name and f32 length of one checkpoint record, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub len: usize,
}

impl Dims {
    /// The checkpoint's parameter records, in the order the runner writes them.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let (i, h, o) = (self.input, self.hidden, self.output);
        let mut specs = vec![
            ParamSpec {
                name: "router.param_0".into(),
                len: self.experts * i,
            },
            ParamSpec {
                name: "router.param_1".into(),
                len: self.experts,
            },
        ];
        for e in 0..self.experts {
            let mut lens = vec![h * i, h, h, h];
            for _ in 0..self.depth {
                lens.extend([h * h, h, h, h]);
            }
            lens.extend([o * h, o]);
            specs.extend(lens.into_iter().enumerate().map(|(p, len)| ParamSpec {
                name: format!("expert_{e}.param_{p}"),
                len,
            }));
        }
        specs
    }

    /// Total number of f32 parameters.
    pub fn param_count(&self) -> u64 {
        self.param_specs().iter().map(|s| s.len as u64).sum()
    }
}

impl MoeWeights {
    /// Builds the structs from tensors given in checkpoint order. The caller
    /// has already checked the count and every length against `dims.param_specs()`.
    pub fn from_tensors(dims: Dims, tensors: Vec<Vec<f32>>) -> Self {
        debug_assert_eq!(tensors.len(), dims.param_specs().len());
        let mut it = tensors.into_iter();
        let mut next = || it.next().expect("tensor count checked by caller");
        let router = Linear {
            out_dim: dims.experts,
            in_dim: dims.input,
            weight: next(),
            bias: next(),
        };
        let mut experts = Vec::with_capacity(dims.experts);
        for _ in 0..dims.experts {
            let mut blocks = Vec::with_capacity(dims.depth + 1);
            for b in 0..=dims.depth {
                let in_dim = if b == 0 { dims.input } else { dims.hidden };
                let linear = Linear {
                    out_dim: dims.hidden,
                    in_dim,
                    weight: next(),
                    bias: next(),
                };
                let norm = LayerNorm {
                    gamma: next(),
                    beta: next(),
                };
                blocks.push(Block { linear, norm });
            }
            let output = Linear {
                out_dim: dims.output,
                in_dim: dims.hidden,
                weight: next(),
                bias: next(),
            };
            experts.push(Expert { blocks, output });
        }
        MoeWeights { dims, router, experts }
    }

    /// The tensors in checkpoint order (the inverse of [`MoeWeights::from_tensors`]).
    pub fn tensors(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = vec![&self.router.weight, &self.router.bias];
        for expert in &self.experts {
            for block in &expert.blocks {
                out.extend([
                    &block.linear.weight[..],
                    &block.linear.bias[..],
                    &block.norm.gamma[..],
                    &block.norm.beta[..],
                ]);
            }
            out.extend([&expert.output.weight[..], &expert.output.bias[..]]);
        }
        out
    }
}
