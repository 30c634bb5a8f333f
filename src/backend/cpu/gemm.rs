//! The blocked GEMM driver: `C = A W^T + b` over a range of column panels,
//! with panel-major activations (see `simd` for the layouts).
//!
//! Owns: the loop nest and cache blocking. Must not touch: per-element
//! arithmetic (the micro-kernel in `simd`), threading (callers split panels).
//!
//! Blocking never changes a result bit: splitting `k` into `KC` blocks only
//! stores an accumulator to C and reloads it, so every element is still one
//! ascending FMA chain starting at its bias.

use super::pack::PackedLinear;
use super::simd::{self, Isa, MR, NR};

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
