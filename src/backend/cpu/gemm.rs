//! The blocked GEMM driver: `C = A W^T + b` over a range of column panels,
//! with panel-major activations (see `simd` for the layouts).
//!
//! Owns: the loop nests and cache blocking of each path (AVX2 and scalar,
//! AVX-512, bf16). Must not touch: per-element arithmetic (the micro-kernels
//! in `simd`), threading (callers split panels).
//!
//! Blocking never changes a result bit: splitting `k` into `KC` blocks only
//! stores an accumulator to C and reloads it, and tile shapes only choose
//! which chains run side by side, so every element is still one ascending
//! chain starting at its bias.

use super::pack::{PackedLinear, PanelStore};
use super::simd::{self, Isa, MR, NR, WeightsRef, avx512, bf16};

/// Depth of a `k` block (a multiple of [`NR`]): a 6 x 256 A sliver (6 KB) and
/// a 256 x 16 B block (16 KB) fit L1, the M x 256 A block stays in L2.
const KC: usize = 256;
/// Up to this many rows, B is streamed once with no `k` blocking (DRAM-bound
/// small batches: one long sequential read per panel).
const STREAM_ROWS: usize = 2 * MR;

/// Computes panels `p0 .. p0 + c.len() / (m * NR)` of `w` for `m` rows.
/// `a` is the panel-major input (`ceil(w.k / NR)` panels of `m` rows), `c`
/// receives those output panels, panel-major.
pub(crate) fn gemm_panels(isa: Isa, w: &PackedLinear, a: &[f32], m: usize, p0: usize, c: &mut [f32]) {
    if m == 0 || c.is_empty() {
        return;
    }
    assert!(
        !matches!(w.data, PanelStore::Bf16(_)),
        "bf16 weights go through gemm_panels_bf16"
    );
    if let Isa::Avx512(t) = isa {
        return gemm_panels_avx512(t, w, a, m, p0, c);
    }
    let pstride = m * NR;
    let np = c.len() / pstride;
    debug_assert!(p0 + np <= w.panels && a.len() >= w.k.div_ceil(NR) * pstride);
    let kc = if m <= STREAM_ROWS { w.k.div_ceil(NR) * NR } else { KC };
    let mut kb = 0;
    while kb < w.k {
        let kl = kc.min(w.k - kb);
        let a_blk = &a[(kb / NR) * pstride..];
        // A short batch (one tile of at most WIDE_MAX_ROWS rows): several
        // panels per kernel call, so enough independent FMA chains are in
        // flight. Same chains, same bits as one panel at a time.
        let mut done = 0;
        if m <= simd::WIDE_MAX_ROWS {
            let group = simd::wide_panels(m);
            let b_pstride = w.k * NR;
            while done + group <= np {
                let p = p0 + done;
                let b = w
                    .panels_data(p, group)
                    .slice(kb * NR..(group - 1) * b_pstride + (kb + kl) * NR);
                let bias = (kb == 0).then(|| &w.bias[p * NR..(p + group) * NR]);
                let a_blk = &a[(kb / NR) * pstride..];
                simd::tile_wide(
                    isa,
                    m,
                    group,
                    kl,
                    a_blk,
                    pstride,
                    b,
                    b_pstride,
                    &mut c[done * pstride..(done + group) * pstride],
                    pstride,
                    bias,
                );
                done += group;
            }
        }
        for (pi, cp) in c.chunks_exact_mut(pstride).enumerate().skip(done) {
            let p = p0 + pi;
            let b = w.panel_data(p).slice(kb * NR..(kb + kl) * NR);
            let bias = (kb == 0).then(|| &w.bias[p * NR..(p + 1) * NR]);
            // Balanced tile heights (e.g. 8 rows = 4 + 4, not 6 + 2): a short
            // tile has too few independent FMA chains to hide latency. Tile
            // boundaries never change a result bit.
            let tiles = m.div_ceil(MR);
            let mut r = 0;
            for t in 0..tiles {
                let mr = (m - r).div_ceil(tiles - t);
                simd::tile(
                    isa,
                    mr,
                    kl,
                    &a_blk[r * NR..],
                    pstride,
                    b,
                    &mut cp[r * NR..(r + mr) * NR],
                    bias,
                );
                r += mr;
            }
        }
        kb += kl;
    }
}

/// Depth of a `k` block on the AVX-512 path, for batches past
/// [`STREAM_ROWS_AVX512`] rows: a group's B sliver (3 panels x 512 x 64 B =
/// 96 KB) and the A block (rows x 2 KB) stay in L2 while every row tile
/// reuses them, and each panel is still read in 32 KB sequential runs.
const KC_AVX512: usize = 512;
/// Up to this many rows B is streamed once with no `k` blocking: one long
/// sequential read per panel group (the DRAM-bound batches), reused from L2
/// by the few row tiles, as long as the group's whole B sliver and the A
/// block fit [`STREAM_L2_BYTES`]. Short `k` blocks here cut each panel into
/// runs too short for the hardware prefetcher (measured on Tiny: 16 and 64
/// rows ran 1.3-1.6x faster unblocked than with 160-deep blocks).
const STREAM_ROWS_AVX512: usize = 64;
/// The L2 share an unblocked panel group may take (B sliver + A block):
/// past it the second row tile would re-read B from L3 or DRAM (Full:
/// 3 x 4096 x 64 B = 768 KB of f32 B alone).
const STREAM_L2_BYTES: usize = 768 << 10;
/// One tile of at most this many rows never reuses B: it is always streamed
/// unblocked.
const SINGLE_TILE_ROWS: usize = 8;

/// Whether an AVX-512 or bf16 layer of `m` rows streams B unblocked (see
/// [`STREAM_ROWS_AVX512`]); `b_bytes` and `a_bytes` are one full-`k` panel
/// group's weights and the rows' inputs.
fn stream_unblocked(m: usize, b_bytes: usize, a_bytes: usize) -> bool {
    m <= SINGLE_TILE_ROWS || (m <= STREAM_ROWS_AVX512 && b_bytes + a_bytes <= STREAM_L2_BYTES)
}

thread_local! {
    /// [`gemm_panels_avx512`]'s expanded f16 sliver, grown once per thread.
    static EXPANDED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Balanced row tiles of at most `max` rows (e.g. 10 rows = 5 + 5, not
/// 8 + 2: a short tile has too few chains in flight): `(first row, rows)`.
fn row_tiles(m: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let tiles = m.div_ceil(max);
    (0..tiles).scan(0, move |r, t| {
        let mr = (m - *r).div_ceil(tiles - t);
        let tile = (*r, mr);
        *r += mr;
        Some(tile)
    })
}

/// The AVX-512 loop nest: for each `k` block, groups of panels (as many as
/// the tallest tile's shape takes, the remainder one at a time), and inside
/// a group every row tile, so the group's B sliver stays in L1 while A
/// streams from L2.
fn gemm_panels_avx512(t: simd::Avx512, w: &PackedLinear, a: &[f32], m: usize, p0: usize, c: &mut [f32]) {
    let pstride = m * NR;
    let np = c.len() / pstride;
    debug_assert!(p0 + np <= w.panels && a.len() >= w.k.div_ceil(NR) * pstride);
    let elem = match w.data {
        PanelStore::F16(_) => 2,
        _ => 4,
    };
    let unblocked = stream_unblocked(m, 3 * w.k * NR * elem, m * w.k * 4);
    // Blocks of the same bytes per panel run whatever the element size:
    // f16 takes twice the rows (and expands them into a 192 KB sliver).
    let kc = if unblocked {
        w.k.div_ceil(NR) * NR
    } else {
        KC_AVX512 * 4 / elem
    };
    let b_pstride = w.k * NR;
    let tallest = m.div_ceil(m.div_ceil(avx512::MR));
    // One panel group's f32 sliver (f16 weights, blocked batches only),
    // kept per thread: zeroing 96 KB per call would cost more than a small
    // batch's whole layer.
    let mut expanded = EXPANDED.take();
    if matches!(w.data, PanelStore::F16(_)) && !unblocked {
        expanded.resize(kc * 3 * NR, 0.0);
    }
    let mut kb = 0;
    while kb < w.k {
        let kl = kc.min(w.k - kb);
        let a_blk = &a[(kb / NR) * pstride..];
        let mut q = 0;
        while q < np {
            let group = if np - q >= avx512::panels_for(tallest) {
                avx512::panels_for(tallest)
            } else {
                1
            };
            let b = w
                .panels_data(p0 + q, group)
                .slice(kb * NR..(group - 1) * b_pstride + (kb + kl) * NR);
            // Several row tiles share this sliver: expand f16 weights to f32
            // once (exactly, so the same bits) instead of once per tile.
            let (b, b_ps) = match b {
                WeightsRef::F16(h) if !unblocked => {
                    for (pq, dst) in expanded.chunks_exact_mut(kl * NR).take(group).enumerate() {
                        simd::expand_f16(Isa::Avx512(t), &h[pq * b_pstride..pq * b_pstride + kl * NR], dst);
                    }
                    (WeightsRef::F32(&expanded[..group * kl * NR]), kl * NR)
                }
                b => (b, b_pstride),
            };
            let bias = (kb == 0).then(|| &w.bias[(p0 + q) * NR..(p0 + q + group) * NR]);
            // Every tile of the block takes the tallest one's group: one
            // tile when m <= MR, else balanced tiles of 4..=8 rows, which
            // share one panel count (`panels_for`).
            for (r, mr) in row_tiles(m, avx512::MR) {
                avx512::tile(
                    t,
                    mr,
                    group,
                    kl,
                    &a_blk[r * NR..],
                    pstride,
                    b,
                    b_ps,
                    &mut c[q * pstride + r * NR..],
                    pstride,
                    bias,
                );
            }
            q += group;
        }
        kb += kl;
    }
    EXPANDED.set(expanded);
}

/// Depth of a `k` block of the bf16 path, in pairs (512 values of `k`, as
/// [`KC_AVX512`]).
const KC_PAIRS: usize = 256;

/// [`gemm_panels`] for bf16 weights: `a` is the layer's input already
/// rounded to pairs (`bf16::round_pairs` of the panel-major f32 input, so
/// `m * NR / 2` u32 per panel).
pub(crate) fn gemm_panels_bf16(isa: Isa, w: &PackedLinear, a: &[u32], m: usize, p0: usize, c: &mut [f32]) {
    if m == 0 || c.is_empty() {
        return;
    }
    let pstride = m * NR;
    let a_pstride = m * bf16::PAIRS;
    let np = c.len() / pstride;
    let kp_total = w.k.div_ceil(2);
    let b_pstride = w.bf16_panel_len();
    debug_assert!(p0 + np <= w.panels && a.len() >= kp_total.div_ceil(bf16::PAIRS) * a_pstride);
    let max_rows = bf16::max_rows(isa);
    let kpc = if stream_unblocked(m, 3 * b_pstride * 2, m * w.k * 2) {
        kp_total
    } else {
        KC_PAIRS
    };
    let tallest = m.div_ceil(m.div_ceil(max_rows));
    let mut kb = 0;
    while kb < kp_total {
        let kl = kpc.min(kp_total - kb);
        let a_blk = &a[(kb / bf16::PAIRS) * a_pstride..];
        let mut q = 0;
        while q < np {
            let wide = bf16::tile_shape(isa, tallest);
            let group = if np - q >= wide { wide } else { 1 };
            let b = w.bf16_panels(p0 + q, group);
            let bias = (kb == 0).then(|| &w.bias[(p0 + q) * NR..(p0 + q + group) * NR]);
            // As on the f32 path, every tile takes the tallest one's group.
            for (r, mr) in row_tiles(m, max_rows) {
                bf16::tile(
                    isa,
                    mr,
                    group,
                    kl,
                    &a_blk[r * bf16::PAIRS..],
                    a_pstride,
                    &b[kb * 2 * NR..],
                    b_pstride,
                    &mut c[q * pstride + r * NR..],
                    pstride,
                    bias,
                );
            }
            q += group;
        }
        kb += kl;
    }
}
