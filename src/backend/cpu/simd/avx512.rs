//! The AVX-512 matrix micro-kernel for f32 and f16 weights: `M` rows by `P`
//! column panels, one zmm accumulator per (row, panel), so up to 24 of the
//! 32 vector registers hold accumulators and one broadcast of A feeds `P`
//! FMAs while one load of B feeds `M`.
//!
//! Owns: [`tile`], its shape table ([`panels_for`]) and its `unsafe`. Must
//! not touch: loop nests and cache blocking (the `gemm` driver) or the
//! element-wise passes (those run the AVX2 code on this path too).
//!
//! Bits: a panel row of `NR` = 16 columns is exactly one zmm, and every
//! element is the same ascending FMA chain from its bias (or from `C`, when
//! the driver blocks `k`) that the AVX2 kernel computes with two ymm halves:
//! same operands, same order, one rounding per FMA. So the AVX2 and AVX-512
//! paths give the same bits, whatever `M` and `P`.

use super::super::isa::Avx512;
use super::{NR, WeightsRef};

/// Most rows per tile: 8 rows x 3 panels = 24 accumulators, 3 B vectors and
/// one broadcast, 28 of the 32 zmm registers.
pub(crate) const MR: usize = 8;

/// Panels per tile for an `mr`-row tile: enough independent chains
/// (`mr * panels`) to cover the FMA latency on two pipes, within the
/// registers. One row streams 8 panels (batch 1: every FMA has its own B
/// load anyway, so more streams in flight is what helps). From 4 rows on
/// it is 3, so the balanced tiles of a taller block (never under 4 rows)
/// all take the same panel group.
pub(crate) fn panels_for(mr: usize) -> usize {
    match mr {
        1 => 8,
        2 => 6,
        3 => 4,
        _ => 3,
    }
}

/// `mr` rows by `panels` panels of `C = (bias | C) + A B`, accumulated in
/// ascending `k` (see the module doc): A is panel-major (`a_pstride` floats
/// between its `k` panels, rows `NR` apart), panel `q`'s weights start at
/// `b[q * b_pstride]` (`kc` rows of `NR`), its output at `c[q * c_pstride]`
/// (`mr` rows of `NR`) and its bias at `bias[q * NR]`. `panels` is
/// [`panels_for`]`(mr)` or 1.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile(
    isa: Avx512,
    mr: usize,
    panels: usize,
    kc: usize,
    a: &[f32],
    a_pstride: usize,
    b: WeightsRef<'_>,
    b_pstride: usize,
    c: &mut [f32],
    c_pstride: usize,
    bias: Option<&[f32]>,
) {
    assert!((1..=MR).contains(&mr) && (panels == 1 || panels == panels_for(mr)) && kc > 0);
    assert!(a_pstride >= mr * NR && c_pstride >= mr * NR && b_pstride >= kc * NR);
    assert!(a.len() >= ((kc - 1) / NR) * a_pstride + mr * NR, "A slice too short");
    assert!(b.len() >= (panels - 1) * b_pstride + kc * NR, "B slice too short");
    assert!(c.len() >= (panels - 1) * c_pstride + mr * NR, "C slice too short");
    if let Some(bias) = bias {
        assert!(bias.len() >= panels * NR);
    }
    let _ = isa;
    #[cfg(target_arch = "x86_64")]
    {
        let bias_ptr = bias.map_or(std::ptr::null(), |s| s.as_ptr());
        let (ap, cp) = (a.as_ptr(), c.as_mut_ptr());
        macro_rules! dispatch {
            ($kernel:ident, $bp:expr) => {
                // SAFETY: the `Avx512` token proves AVX-512 F/BW/VL, AVX2,
                // FMA and F16C; the asserts above bound every A read
                // ((kc-1)/NR panels down, mr rows of NR), every B read
                // (`panels` panels b_pstride apart, kc rows of NR each),
                // every C read/write (`panels` panels c_pstride apart, mr
                // rows of NR) and the bias read (panels * NR floats).
                unsafe {
                    match (mr, panels) {
                        (1, 1) => $kernel::<1, 1>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (1, _) => $kernel::<1, 8>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (2, 1) => $kernel::<2, 1>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (2, _) => $kernel::<2, 6>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (3, 1) => $kernel::<3, 1>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (3, _) => $kernel::<3, 4>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (4, 1) => $kernel::<4, 1>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (4, _) => $kernel::<4, 3>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (5, 1) => $kernel::<5, 1>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (5, _) => $kernel::<5, 3>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (6, 1) => $kernel::<6, 1>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (6, _) => $kernel::<6, 3>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (7, 1) => $kernel::<7, 1>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (7, _) => $kernel::<7, 3>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        (_, 1) => $kernel::<8, 1>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                        _ => $kernel::<8, 3>(kc, ap, a_pstride, $bp, b_pstride, cp, c_pstride, bias_ptr),
                    }
                }
            };
        }
        match b {
            WeightsRef::F32(b) => dispatch!(tile_f32, b.as_ptr()),
            WeightsRef::F16(b) => dispatch!(tile_f16, b.as_ptr()),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("an Avx512 token exists only on x86_64")
}

/// Weight rows (k) ahead that a tile of [`PREFETCH_MIN_ROWS`] or more
/// prefetches in each of its panel streams: with several rows per weight
/// load the FMAs leave the load ports room, and a few KB ahead per stream
/// covers DRAM latency better than the hardware prefetcher's short runs.
pub(crate) const PREFETCH_ROWS: usize = 64;
/// Shorter tiles (batch 1: a load per FMA) leave streaming to the hardware.
pub(crate) const PREFETCH_MIN_ROWS: usize = 4;

/// The kernel, once per weight type: `$load(ptr)` turns the `NR` packed
/// elements at `ptr` into one f32 zmm (f16 expands exactly).
macro_rules! avx512_kernel {
    ($name:ident, $ty:ty, |$p:ident| $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const M: usize, const P: usize>(
            kc: usize,
            a: *const f32,
            ps: usize,
            b: *const $ty,
            b_ps: usize,
            c: *mut f32,
            c_ps: usize,
            bias: *const f32,
        ) {
            use std::arch::x86_64::*;
            // SAFETY: the caller (`tile`) checked that every offset used
            // below is in bounds of the slices these pointers came from; the
            // target features are enabled.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); P]; M];
                for (r, row) in acc.iter_mut().enumerate() {
                    for (q, v) in row.iter_mut().enumerate() {
                        let src = if bias.is_null() {
                            c.add(q * c_ps + r * NR) as *const f32
                        } else {
                            bias.add(q * NR)
                        };
                        *v = _mm512_loadu_ps(src);
                    }
                }
                let mut k = 0;
                while k < kc {
                    let ap = a.add((k / NR) * ps);
                    let bk = b.add(k * NR);
                    macro_rules! step {
                        ($j:expr) => {{
                            let mut bv = [_mm512_setzero_ps(); P];
                            for (q, v) in bv.iter_mut().enumerate() {
                                let $p = bk.add(q * b_ps + $j * NR);
                                *v = $load;
                                if M >= PREFETCH_MIN_ROWS {
                                    // Past the end is harmless: a prefetch
                                    // never faults, and wrapping_add makes
                                    // no out-of-bounds pointer claim.
                                    let ahead = bk.wrapping_add(q * b_ps + ($j + PREFETCH_ROWS) * NR);
                                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                                }
                            }
                            for (r, row) in acc.iter_mut().enumerate() {
                                let av = _mm512_set1_ps(*ap.add(r * NR + $j));
                                for (q, v) in row.iter_mut().enumerate() {
                                    *v = _mm512_fmadd_ps(av, bv[q], *v);
                                }
                            }
                        }};
                    }
                    // A constant trip count for whole panels lets the
                    // compiler unroll them; the tail is the same steps.
                    let len = (kc - k).min(NR);
                    if len == NR {
                        for j in 0..NR {
                            step!(j);
                        }
                    } else {
                        for j in 0..len {
                            step!(j);
                        }
                    }
                    k += NR;
                }
                for (r, row) in acc.iter().enumerate() {
                    for (q, v) in row.iter().enumerate() {
                        _mm512_storeu_ps(c.add(q * c_ps + r * NR), *v);
                    }
                }
            }
        }
    };
}

avx512_kernel!(tile_f32, f32, |p| _mm512_loadu_ps(p));
// `vcvtph2ps` is exact: every f16 is an f32.
avx512_kernel!(tile_f16, u16, |p| _mm512_cvtph_ps(_mm256_loadu_si256(
    p as *const __m256i
)));
