//! The CPU backend: sparse top-k MoE forward with packed weights and
//! AVX-512, AVX2+FMA or portable micro-kernels (chosen once, `isa`), in f32,
//! f16-weight or bf16 precision.
//!
//! Owns: [`CpuBackend`] (weights packed once, shared by sessions via `Arc`),
//! its sessions (scratch buffers, thread budget), sparse dispatch (route,
//! group rows per expert, run each expert on its rows only, combine in expert
//! order) and the threading policy. Must not touch: queueing/batching policy,
//! HTTP, or the model files. All `unsafe` is in [`simd`].
//!
//! The AVX2 and AVX-512 paths give the same bits for every precision (same
//! chains, same LayerNorm/GELU code), so a fleet of mixed machines answers
//! identically. The scalar path is close, not bit-equal: it does not fuse
//! f32 multiply-adds and its LayerNorm and GELU are its own code (its bf16
//! dot products do match the instruction bit for bit, `simd::bf16` tests).
//!
//! Batch invariance (a row's outputs are bit-identical whatever batch, position,
//! companions or thread count) holds by construction: routing is per row; an
//! expert's GEMM computes each element as one ascending FMA chain whatever the
//! tile it falls in; LayerNorm statistics are per row in a fixed order;
//! threads split rows or column panels, never a reduction; the combine adds
//! experts in index order per row.

mod gemm;
mod isa;
mod pack;
mod router;
mod simd;

pub use isa::{CpuIsa, IsaUnavailable};

use std::sync::Arc;

use rayon::prelude::*;

use super::{Backend, BackendError, ForwardOutput, PoolShape, Session, SessionConfig};
use crate::model::{Dims, LayerNormMode, MoeWeights, WeightPrecision};
use pack::{PackedLinear, PackedModel};
use simd::{Isa, NR};

/// How a multi-threaded session splits one forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SplitPolicy {
    /// Rows when the experts are small enough to sit in cache (no per-layer
    /// synchronisation), column panels otherwise (threads share each weight
    /// read from DRAM instead of each streaming all of it).
    #[default]
    Auto,
    /// Each thread runs the whole forward on a contiguous share of the rows.
    Rows,
    /// Every layer's column panels are split across threads.
    Panels,
}

/// Construction options (defaults: best instruction set, automatic split,
/// f32 weights).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Which kernels (`workers.cpu_isa`): `Auto` is the best this CPU has; a
    /// forced path the CPU lacks makes construction fail, naming the feature.
    pub isa: CpuIsa,
    pub split: SplitPolicy,
    /// How the expert weights are stored (`model.weight_precision`).
    pub precision: WeightPrecision,
}

/// Expert size (packed bytes) up to which [`SplitPolicy::Auto`] splits rows:
/// a Nano expert is ~0.2 MB (cache-resident), a Tiny one ~84 MB.
const ROW_SPLIT_MAX_EXPERT_BYTES: usize = 4 << 20;

/// Below this many rows per share, a row split is not worth a pool wake-up.
const MIN_ROWS_PER_THREAD: usize = 16;

/// The CPU backend. Built once; sessions share its packed weights.
pub struct CpuBackend {
    model: Arc<PackedModel>,
    isa: Isa,
    split: SplitPolicy,
}

impl CpuBackend {
    /// Packs `weights` (consumed tensor by tensor, f32) for the fastest
    /// kernels this CPU supports.
    pub fn new(weights: MoeWeights, mode: LayerNormMode) -> CpuBackend {
        CpuBackend::with_options(weights, mode, CpuOptions::default()).expect("f32 packing cannot fail")
    }

    /// Packs `weights` with `options`. Fails when the forced instruction set
    /// is missing (naming the feature), or in f16/bf16 when a weight is not
    /// finite after rounding (naming the tensor).
    pub fn with_options(
        weights: MoeWeights,
        mode: LayerNormMode,
        options: CpuOptions,
    ) -> Result<CpuBackend, BackendError> {
        let isa = Isa::select(options.isa).map_err(|e| BackendError::Unavailable(e.to_string()))?;
        let model = PackedModel::pack(weights, mode, options.precision)
            .map_err(|e| BackendError::Unavailable(e.to_string()))?;
        Ok(CpuBackend {
            model: Arc::new(model),
            isa,
            split: options.split,
        })
    }

    /// The kernels in use: `"avx512_bf16"`, `"avx512"`, `"avx2"` or `"scalar"`
    /// (`avx512_bf16`: AVX-512 with `vdpbf16ps` for the bf16 mode).
    pub fn isa_name(&self) -> &'static str {
        self.isa.name()
    }

    pub fn weight_precision(&self) -> WeightPrecision {
        self.model.precision
    }

    /// Resident bytes of the packed expert weights (biases and LayerNorm
    /// parameters included, router excluded).
    pub fn weight_bytes(&self) -> usize {
        self.model.weight_bytes()
    }

    pub fn layer_norm_mode(&self) -> LayerNormMode {
        self.model.mode
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn describe(&self) -> String {
        format!("cpu ({}, {} weights)", self.isa.name(), self.model.precision)
    }

    fn isa(&self) -> &'static str {
        self.isa.name()
    }

    fn dims(&self) -> Dims {
        self.model.dims
    }

    /// Cache-resident experts (Nano): one single-threaded worker per core, so
    /// batches run side by side with no intra-op synchronisation. DRAM-bound
    /// experts (Tiny and up): one worker using every core, so each weight is
    /// streamed from memory once per batch rather than once per worker, and a
    /// lone request gets all the bandwidth. Measured in BENCHMARKS.md (issue 5).
    fn pool_shape(&self, cores: usize) -> PoolShape {
        let cores = cores.max(1);
        if self.model.expert_bytes() <= ROW_SPLIT_MAX_EXPERT_BYTES {
            PoolShape {
                workers: cores,
                threads_per_worker: 1,
            }
        } else {
            PoolShape {
                workers: 1,
                threads_per_worker: cores,
            }
        }
    }

    fn create_session(&self, config: SessionConfig) -> Result<Box<dyn Session>, BackendError> {
        let threads = config.threads.max(1);
        let pool = if threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("tokitai-cpu-{i}"))
                .build()
                .map_err(|e| BackendError::Unavailable(format!("cpu thread pool: {e}")))?;
            Some(pool)
        } else {
            None
        };
        let split = match self.split {
            SplitPolicy::Auto if self.model.expert_bytes() <= ROW_SPLIT_MAX_EXPERT_BYTES => SplitPolicy::Rows,
            SplitPolicy::Auto => SplitPolicy::Panels,
            s => s,
        };
        Ok(Box::new(CpuSession {
            model: Arc::clone(&self.model),
            isa: self.isa,
            threads,
            pool,
            split,
            scratch: (0..threads).map(|_| Scratch::default()).collect(),
        }))
    }
}

/// Per-thread buffers, grown to the largest batch seen and then reused.
#[derive(Default)]
struct Scratch {
    /// Rows (chunk-local indices, ascending) routed to each expert.
    rows: Vec<Vec<u32>>,
    /// Router probabilities of one row.
    probs: Vec<f32>,
    /// Gathered expert input, panel-major.
    input: Vec<f32>,
    /// Ping-pong hidden activations, panel-major.
    act: [Vec<f32>; 2],
    /// Expert output, panel-major.
    y: Vec<f32>,
    /// Per-row LayerNorm `(mean, 1/std)`.
    stats: Vec<(f32, f32)>,
    /// A bf16 Linear's input rounded to pairs (bf16 mode only).
    pairs: Vec<u32>,
}

fn ensure(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// How one forward spends its threads.
#[derive(Clone, Copy)]
enum Par {
    /// Everything on the calling thread.
    Seq,
    /// Inside the session's pool: split every layer's panels this many ways.
    Panels(usize),
}

struct CpuSession {
    model: Arc<PackedModel>,
    isa: Isa,
    threads: usize,
    pool: Option<rayon::ThreadPool>,
    split: SplitPolicy,
    scratch: Vec<Scratch>,
}

impl Session for CpuSession {
    fn forward(&mut self, input: &[f32], out: &mut ForwardOutput) -> Result<(), BackendError> {
        let dims = self.model.dims;
        let n = out.prepare(&dims, input)?;
        if n == 0 {
            return Ok(());
        }
        let (model, isa) = (&*self.model, self.isa);
        match &self.pool {
            None if self.split == SplitPolicy::Rows => {
                forward_passes(model, isa, input, out_parts(out), &mut self.scratch[0])
            }
            None => forward_chunk(model, isa, Par::Seq, input, out_parts(out), &mut self.scratch[0]),
            Some(_) if self.split == SplitPolicy::Rows && n < 2 * MIN_ROWS_PER_THREAD => {
                // Too few rows to pay for waking the pool: stay on the caller.
                forward_passes(model, isa, input, out_parts(out), &mut self.scratch[0])
            }
            Some(pool) if self.split == SplitPolicy::Rows => {
                // Contiguous row shares, each with its own scratch.
                let shares = (n / MIN_ROWS_PER_THREAD).min(self.threads);
                let per = n.div_ceil(shares);
                let scratch = &mut self.scratch;
                pool.install(|| {
                    out.logits
                        .par_chunks_mut(per * dims.output)
                        .zip(out.router_weights.par_chunks_mut(per * dims.experts))
                        .zip(out.top_k.par_chunks_mut(per * dims.top_k))
                        .zip(input.par_chunks(per * dims.input))
                        .zip(scratch.par_iter_mut())
                        .for_each(|((((logits, rw), tk), x), s)| forward_passes(model, isa, x, (logits, rw, tk), s))
                });
            }
            Some(pool) => {
                let threads = self.threads;
                let s = &mut self.scratch[0];
                pool.install(|| forward_chunk(model, isa, Par::Panels(threads), input, out_parts(out), s));
            }
        }
        Ok(())
    }
}

type OutParts<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [u32]);

/// Rows per pass of a cache-resident (row-split) model: each pass runs the
/// whole forward on at most this many rows, so an expert's gathered
/// activations (rows x hidden floats) stay in L1/L2 instead of being swept
/// from further out once per column panel. Measured on Nano (hidden 128):
/// batch 256 in one pass ran slower per row than batch 64. A row's arithmetic
/// does not depend on which pass it is in, so batch invariance holds.
const ROWS_PER_PASS: usize = 64;

/// [`forward_chunk`] over `input` in passes of at most [`ROWS_PER_PASS`] rows.
fn forward_passes(model: &PackedModel, isa: Isa, input: &[f32], out: OutParts<'_>, s: &mut Scratch) {
    let d = model.dims;
    let (logits, rw, topk) = out;
    let passes = input
        .chunks(ROWS_PER_PASS * d.input)
        .zip(logits.chunks_mut(ROWS_PER_PASS * d.output))
        .zip(rw.chunks_mut(ROWS_PER_PASS * d.experts))
        .zip(topk.chunks_mut(ROWS_PER_PASS * d.top_k));
    for (((x, l), w), t) in passes {
        forward_chunk(model, isa, Par::Seq, x, (l, w, t), s);
    }
}

fn out_parts(out: &mut ForwardOutput) -> OutParts<'_> {
    (&mut out.logits, &mut out.router_weights, &mut out.top_k)
}

/// The whole forward over the rows of `input` (row-major), outputs zeroed.
fn forward_chunk(model: &PackedModel, isa: Isa, par: Par, input: &[f32], out: OutParts<'_>, s: &mut Scratch) {
    let dims = model.dims;
    let (logits, rw, topk) = out;
    let n = input.len() / dims.input;
    s.rows.resize_with(dims.experts, Vec::new);
    s.rows.iter_mut().for_each(Vec::clear);
    s.probs.resize(dims.experts, 0.0);
    for (i, x) in input.chunks_exact(dims.input).enumerate() {
        let w = &mut rw[i * dims.experts..(i + 1) * dims.experts];
        let sel = &mut topk[i * dims.top_k..(i + 1) * dims.top_k];
        router::route_row(&model.router, x, &mut s.probs, w, sel);
        for &e in sel.iter() {
            s.rows[e as usize].push(i as u32);
        }
    }
    debug_assert_eq!(logits.len(), n * dims.output);
    logits.fill(0.0);
    for (e, expert) in model.experts.iter().enumerate() {
        let m = s.rows[e].len();
        if m == 0 {
            continue;
        }
        // Gather the expert's rows into a contiguous panel-major block.
        let pstride = m * NR;
        let in_panels = dims.input.div_ceil(NR);
        ensure(&mut s.input, in_panels * pstride);
        for (i, &row) in s.rows[e].iter().enumerate() {
            let x = &input[row as usize * dims.input..(row as usize + 1) * dims.input];
            for p in 0..in_panels {
                let dst = &mut s.input[p * pstride + i * NR..p * pstride + (i + 1) * NR];
                let src = &x[p * NR..((p + 1) * NR).min(dims.input)];
                dst[..src.len()].copy_from_slice(src);
                dst[src.len()..].fill(0.0);
            }
        }
        let hid_len = dims.hidden.div_ceil(NR) * pstride;
        ensure(&mut s.act[0], hid_len);
        ensure(&mut s.act[1], hid_len);
        if s.stats.len() < m {
            s.stats.resize(m, (0.0, 0.0));
        }
        for (l, block) in expert.blocks.iter().enumerate() {
            let [a0, a1] = &mut s.act;
            let (src, dst): (&[f32], &mut [f32]) = match l {
                0 => (&s.input, a0),
                _ if l % 2 == 1 => (a0, a1),
                _ => (a1, a0),
            };
            let dst = &mut dst[..block.linear.panels * pstride];
            layer(isa, par, &block.linear, src, m, dst, &mut s.pairs);
            let affine = block.affine.as_ref().map(|(g, b)| (&g[..], &b[..]));
            layer_norm_gelu(isa, par, dst, m, block.linear.n, &mut s.stats[..m], affine);
        }
        let last = &s.act[(expert.blocks.len() + 1) % 2];
        let y_len = expert.output.panels * pstride;
        ensure(&mut s.y, y_len);
        layer(isa, par, &expert.output, last, m, &mut s.y[..y_len], &mut s.pairs);
        // Combine: each row adds its experts in ascending index order.
        for (i, &row) in s.rows[e].iter().enumerate() {
            let row = row as usize;
            let w = rw[row * dims.experts + e];
            let dst = &mut logits[row * dims.output..(row + 1) * dims.output];
            for (j, d) in dst.iter_mut().enumerate() {
                *d += w * s.y[(j / NR) * pstride + i * NR + j % NR];
            }
        }
    }
}

/// One linear layer over `m` rows into `dst` (all of the layer's panels).
/// With bf16 weights the input is first rounded to bf16 pairs in `pairs`.
fn layer(isa: Isa, par: Par, w: &PackedLinear, src: &[f32], m: usize, dst: &mut [f32], pairs: &mut Vec<u32>) {
    let pstride = m * NR;
    let bf16 = matches!(w.data, pack::PanelStore::Bf16(_));
    if bf16 {
        let len = w.k.div_ceil(NR) * pstride / 2;
        if pairs.len() < len {
            pairs.resize(len, 0);
        }
        simd::bf16::round_pairs(isa, &src[..2 * len], &mut pairs[..len]);
    }
    let pairs: &[u32] = pairs;
    let run = |p0: usize, c: &mut [f32]| {
        if bf16 {
            gemm::gemm_panels_bf16(isa, w, pairs, m, p0, c)
        } else {
            gemm::gemm_panels(isa, w, src, m, p0, c)
        }
    };
    match par {
        Par::Panels(t) if w.panels > 1 => {
            let per = w.panels.div_ceil(t);
            dst.par_chunks_mut(per * pstride)
                .enumerate()
                .for_each(|(i, c)| run(i * per, c));
        }
        _ => run(0, dst),
    }
}

/// LayerNorm (+ optional affine) then GELU, in place on `act` (`m` rows, `n`
/// valid columns, panel-major). Statistics first (rows split across threads),
/// then the apply pass (panels split across threads).
fn layer_norm_gelu(
    isa: Isa,
    par: Par,
    act: &mut [f32],
    m: usize,
    n: usize,
    stats: &mut [(f32, f32)],
    affine: Option<(&[f32], &[f32])>,
) {
    let pstride = m * NR;
    let panels = n.div_ceil(NR);
    let apply = |p: usize, panel: &mut [f32], stats: &[(f32, f32)]| {
        let valid = (n - p * NR).min(NR);
        let aff = affine.map(|(g, b)| (&g[p * NR..(p + 1) * NR], &b[p * NR..(p + 1) * NR]));
        simd::ln_gelu_panel(isa, panel, m, valid, stats, aff);
    };
    match par {
        Par::Panels(t) if m * panels >= 64 => {
            let act_ro: &[f32] = act;
            let per_r = m.div_ceil(t);
            stats.par_chunks_mut(per_r).enumerate().for_each(|(i, st)| {
                for (j, s) in st.iter_mut().enumerate() {
                    *s = simd::row_stats(isa, act_ro, m, n, i * per_r + j);
                }
            });
            let stats: &[(f32, f32)] = stats;
            let per_p = panels.div_ceil(t);
            act[..panels * pstride]
                .par_chunks_mut(per_p * pstride)
                .enumerate()
                .for_each(|(i, chunk)| {
                    for (j, panel) in chunk.chunks_exact_mut(pstride).enumerate() {
                        apply(i * per_p + j, panel, stats);
                    }
                });
        }
        _ => {
            for (r, s) in stats.iter_mut().enumerate() {
                *s = simd::row_stats(isa, act, m, n, r);
            }
            for (p, panel) in act[..panels * pstride].chunks_exact_mut(pstride).enumerate() {
                apply(p, panel, stats);
            }
        }
    }
}
