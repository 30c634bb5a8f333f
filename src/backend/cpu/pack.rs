//! Load-time packing of the checkpoint's `[out, in]` tensors into the
//! micro-kernel's layout.
//!
//! Owns: [`PackedLinear`] / [`PackedModel`] and the conversion from
//! [`MoeWeights`], which consumes the raw tensors one at a time (each raw
//! tensor is dropped as soon as its packed copy exists, so loading never holds
//! two full copies of the weights). In f16 and bf16 modes each weight is
//! rounded to nearest-even binary16 / bfloat16 here, once, and a weight that
//! is not finite after rounding is refused with the tensor's checkpoint name.
//! Must not touch: arithmetic (see `simd`).

use super::simd::{NR, WeightsRef};
use crate::model::precision::{F16_MAX, bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use crate::model::{Dims, LayerNormMode, Linear, MoeWeights, WeightPrecision};

/// Packed weight storage, in the precision the backend was built with.
#[derive(Debug)]
pub(crate) enum PanelStore {
    F32(Vec<f32>),
    /// IEEE binary16 bits.
    F16(Vec<u16>),
    /// bfloat16 bits in `k` pairs (the bf16 kernels' layout): panel `p`
    /// holds `ceil(k / 2)` rows of 32, `data[p * kp_len + kp * 32 + 2 j + t]
    /// = W[p * NR + j][2 kp + t]`, zero past `n` and `k`, subnormals flushed.
    Bf16(Vec<u16>),
}

/// `W^T` split into column panels of [`NR`] columns: panel `p` holds
/// `data[p * k * NR + kk * NR + j] = W[p * NR + j][kk]`, zero past `n`.
#[derive(Debug)]
pub(crate) struct PackedLinear {
    pub n: usize,
    pub k: usize,
    pub panels: usize,
    pub data: PanelStore,
    /// `[panels * NR]`, zero-padded. Always f32.
    pub bias: Vec<f32>,
}

/// A weight that the reduced precision cannot hold: the precision, the
/// tensor's checkpoint name, the index inside it and the value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NotFiniteWhenRounded {
    pub precision: WeightPrecision,
    pub tensor: String,
    pub index: usize,
    pub value: f32,
}

impl std::fmt::Display for NotFiniteWhenRounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let max = match self.precision {
            WeightPrecision::Bf16 => bf16_bits_to_f32(0x7f7f),
            _ => F16_MAX,
        };
        write!(
            f,
            "model.weight_precision = \"{p}\": weight tensor {} holds {:e} at index {}, which is not finite in {p} \
             (|w| rounds past {max:e}); serve this model with weight_precision = \"f32\"",
            self.tensor,
            self.value,
            self.index,
            p = self.precision
        )
    }
}

/// A 16-bit format's rounding from f32 and its (exact) expansion back.
type RoundTrip = (fn(f32) -> u16, fn(u16) -> f32);

/// Where `W[o][kk]` of a `k`-column tensor goes in the packed layout.
fn packed_index(o: usize, kk: usize, k: usize) -> usize {
    let (p, j) = (o / NR, o % NR);
    p * k * NR + kk * NR + j
}

/// Where `W[o][kk]` goes in the bf16 pair layout ([`PanelStore::Bf16`]).
fn packed_index_bf16(o: usize, kk: usize, k: usize) -> usize {
    let (p, j) = (o / NR, o % NR);
    p * k.div_ceil(2) * 2 * NR + (kk / 2) * 2 * NR + 2 * j + kk % 2
}

impl PackedLinear {
    /// Packs `l` (named `name` in the checkpoint, for errors) in `precision`.
    pub(crate) fn pack(
        l: Linear,
        precision: WeightPrecision,
        name: &str,
    ) -> Result<PackedLinear, NotFiniteWhenRounded> {
        let (n, k) = (l.out_dim, l.in_dim);
        let panels = n.div_ceil(NR);
        let rows = l.weight.chunks_exact(k).enumerate().take(n);
        let data = match precision {
            WeightPrecision::F32 => {
                let mut data = vec![0.0f32; panels * k * NR];
                for (o, w_row) in rows {
                    for (kk, w) in w_row.iter().enumerate() {
                        data[packed_index(o, kk, k)] = *w;
                    }
                }
                PanelStore::F32(data)
            }
            WeightPrecision::F16 | WeightPrecision::Bf16 => {
                let bf16 = precision == WeightPrecision::Bf16;
                let (round, expand): RoundTrip = if bf16 {
                    (f32_to_bf16_bits, bf16_bits_to_f32)
                } else {
                    (f32_to_f16_bits, f16_bits_to_f32)
                };
                let index = if bf16 { packed_index_bf16 } else { packed_index };
                let len = if bf16 {
                    panels * k.div_ceil(2) * 2 * NR
                } else {
                    panels * k * NR
                };
                let mut data = vec![0u16; len];
                for (o, w_row) in rows {
                    for (kk, w) in w_row.iter().enumerate() {
                        let h = round(*w);
                        if !expand(h).is_finite() {
                            return Err(NotFiniteWhenRounded {
                                precision,
                                tensor: name.to_string(),
                                index: o * k + kk,
                                value: *w,
                            });
                        }
                        data[index(o, kk, k)] = h;
                    }
                }
                if bf16 {
                    PanelStore::Bf16(data)
                } else {
                    PanelStore::F16(data)
                }
            }
        };
        drop(l.weight);
        let mut bias = pad(l.bias, panels * NR, 0.0);
        if precision == WeightPrecision::Bf16 {
            // `vdpbf16ps` treats a denormal accumulator as zero; flushing
            // here makes every path start each chain from the same value.
            bias.iter_mut()
                .filter(|b| b.abs() < f32::MIN_POSITIVE)
                .for_each(|b| *b = f32::from_bits(b.to_bits() & 0x8000_0000));
        }
        Ok(PackedLinear {
            n,
            k,
            panels,
            data,
            bias,
        })
    }

    /// u16 elements per panel of bf16 pairs.
    pub(crate) fn bf16_panel_len(&self) -> usize {
        self.k.div_ceil(2) * 2 * NR
    }

    /// Panels `p .. p + count` of a bf16 store, contiguous.
    pub(crate) fn bf16_panels(&self, p: usize, count: usize) -> &[u16] {
        let len = self.bf16_panel_len();
        match &self.data {
            PanelStore::Bf16(d) => &d[p * len..(p + count) * len],
            _ => panic!("bf16_panels on a {} store", self.precision_name()),
        }
    }

    fn precision_name(&self) -> &'static str {
        match &self.data {
            PanelStore::F32(_) => "f32",
            PanelStore::F16(_) => "f16",
            PanelStore::Bf16(_) => "bf16",
        }
    }

    /// Panel `p`'s weights (`k * NR` values) of an f32 or f16 store.
    pub(crate) fn panel_data(&self, p: usize) -> WeightsRef<'_> {
        self.panels_data(p, 1)
    }

    /// Panels `p .. p + count` of an f32 or f16 store, contiguous
    /// (`count * k * NR` values).
    pub(crate) fn panels_data(&self, p: usize, count: usize) -> WeightsRef<'_> {
        let r = p * self.k * NR..(p + count) * self.k * NR;
        match &self.data {
            PanelStore::F32(d) => WeightsRef::F32(&d[r]),
            PanelStore::F16(d) => WeightsRef::F16(&d[r]),
            PanelStore::Bf16(_) => panic!("panels_data on a bf16 store (the bf16 kernels read bf16_panels)"),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        let data = match &self.data {
            PanelStore::F32(d) => d.len() * 4,
            PanelStore::F16(d) | PanelStore::Bf16(d) => d.len() * 2,
        };
        data + self.bias.len() * 4
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
    pub precision: WeightPrecision,
    /// Kept as stored: routing is a tiny scalar step (see `router`).
    pub router: Linear,
    pub experts: Vec<PackedExpert>,
}

impl PackedModel {
    /// Consumes `weights`, packing tensor by tensor. In `Identity` mode the
    /// LayerNorm parameters are dropped unread. Expert weights are stored in
    /// `precision` (the router stays f32); in f16 a weight that is not finite
    /// after rounding is an error naming its checkpoint tensor
    /// (`expert_{e}.param_{p}`).
    pub(crate) fn pack(
        weights: MoeWeights,
        mode: LayerNormMode,
        precision: WeightPrecision,
    ) -> Result<PackedModel, NotFiniteWhenRounded> {
        let MoeWeights { dims, router, experts } = weights;
        let mut packed = Vec::with_capacity(experts.len());
        for (e, expert) in experts.into_iter().enumerate() {
            // Checkpoint record order: 4 records per block, then the output's.
            let n_blocks = expert.blocks.len();
            let mut blocks = Vec::with_capacity(n_blocks);
            for (b, block) in expert.blocks.into_iter().enumerate() {
                let linear = PackedLinear::pack(block.linear, precision, &format!("expert_{e}.param_{}", 4 * b))?;
                let width = linear.panels * NR;
                let affine = match mode {
                    LayerNormMode::Identity => None,
                    LayerNormMode::Stored => {
                        Some((pad(block.norm.gamma, width, 0.0), pad(block.norm.beta, width, 0.0)))
                    }
                };
                blocks.push(PackedBlock { linear, affine });
            }
            let output = PackedLinear::pack(expert.output, precision, &format!("expert_{e}.param_{}", 4 * n_blocks))?;
            packed.push(PackedExpert { blocks, output });
        }
        Ok(PackedModel {
            dims,
            mode,
            precision,
            router,
            experts: packed,
        })
    }

    /// Packed bytes of every expert (the resident weight memory, router aside).
    pub(crate) fn weight_bytes(&self) -> usize {
        self.experts
            .iter()
            .map(|e| e.blocks.iter().map(|b| b.linear.bytes()).sum::<usize>() + e.output.bytes())
            .sum()
    }

    /// Packed bytes of one expert (decides the threading policy).
    pub(crate) fn expert_bytes(&self) -> usize {
        self.experts.first().map_or(0, |e| {
            e.blocks.iter().map(|b| b.linear.bytes()).sum::<usize>() + e.output.bytes()
        })
    }
}
