//! Every `unsafe` of the CPU backend lives here: the AVX2+FMA micro-kernels
//! (f32 weights, or f16 weights expanded with F16C), the AVX-512 ones
//! ([`avx512`]), the bf16 kernels (`vdpbf16ps` and its bit-identical
//! emulation, [`bf16`]), the LayerNorm statistics and the
//! LayerNorm-apply+GELU pass (with a vectorised `exp`/`tanh`), plus their
//! portable scalar twins.
//!
//! Owns: the per-element arithmetic of the hot loops (the instruction set is
//! chosen in `isa`; its tokens are what make the safe wrappers here sound). Must not touch: routing, dispatch,
//! threading or the packed-weight structures (callers hand in plain slices;
//! every safe wrapper checks the slice bounds before entering a kernel).
//!
//! Layouts shared with the callers (`NR` = 16 columns per panel):
//! - packed weights: panel `p`, row `k` of `W^T`: `b[k * NR + j]` within the
//!   panel (`j` = column inside the panel), zero-padded past `n`;
//! - activations are panel-major: element (row `r`, column `c`) of an `m`-row
//!   matrix sits at `(c / NR) * m * NR + r * NR + c % NR`.
//!
//! Batch invariance: each output element is one FMA chain over `k` in
//! ascending order starting at the bias, whatever the tile height `mr` (the
//! kernels are the same code for every `mr`), and the LayerNorm sums of a row
//! depend only on that row. So a row's bits never depend on its companions.

/// Columns per packed panel: two AVX2 vectors.
pub(crate) const NR: usize = 16;
/// Rows per micro-kernel tile: 6 x 2 accumulators + 2 B vectors + 1 broadcast
/// = 15 of the 16 ymm registers.
pub(crate) const MR: usize = 6;

const LN_EPS: f32 = 1e-5;

pub(crate) mod avx512;
pub(crate) mod bf16;

pub(crate) use super::isa::{Avx512, Isa};

use crate::model::precision::f16_bits_to_f32;
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044715;

/// Packed weights as the micro-kernel reads them: f32, or IEEE binary16 bits
/// expanded to f32 (exactly) on load.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WeightsRef<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl<'a> WeightsRef<'a> {
    pub(crate) fn len(self) -> usize {
        match self {
            WeightsRef::F32(s) => s.len(),
            WeightsRef::F16(s) => s.len(),
        }
    }

    /// Elements `r`.
    pub(crate) fn slice(self, r: std::ops::Range<usize>) -> WeightsRef<'a> {
        match self {
            WeightsRef::F32(s) => WeightsRef::F32(&s[r]),
            WeightsRef::F16(s) => WeightsRef::F16(&s[r]),
        }
    }
}

// ------------------------------------------------------------------ micro-kernel

/// One `mr x NR` output tile:
/// `C[r][j] = (bias[j] if bias given, else C[r][j]) + sum_{k < kc} A(r, k) * B[k][j]`
/// accumulated in ascending `k`, where `A(r, k) = a[(k / NR) * a_pstride + r * NR + k % NR]`
/// (panel-major activations starting at the tile's first row and `k`) and
/// `B[k][j] = b[k * NR + j]` (f16 weights are expanded to f32 exactly, so
/// the arithmetic is the f32 kernel's on the rounded weights). `c` holds the
/// tile's rows, `NR` floats each.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile(
    isa: Isa,
    mr: usize,
    kc: usize,
    a: &[f32],
    a_pstride: usize,
    b: WeightsRef<'_>,
    c: &mut [f32],
    bias: Option<&[f32]>,
) {
    assert!((1..=MR).contains(&mr) && kc > 0);
    assert!(a_pstride >= mr * NR);
    assert!(a.len() >= ((kc - 1) / NR) * a_pstride + mr * NR, "A slice too short");
    assert!(b.len() >= kc * NR, "B slice too short");
    assert!(c.len() >= mr * NR, "C slice too short");
    if let Some(bias) = bias {
        assert!(bias.len() >= NR);
    }
    match (isa.avx2(), b) {
        (None, WeightsRef::F32(b)) => tile_scalar(mr, kc, a, a_pstride, b, |w| w, c, bias),
        (None, WeightsRef::F16(b)) => tile_scalar(mr, kc, a, a_pstride, b, f16_bits_to_f32, c, bias),
        #[cfg(target_arch = "x86_64")]
        (Some(_), WeightsRef::F32(b)) => {
            let bias_ptr = bias.map_or(std::ptr::null(), |s| s.as_ptr());
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            // SAFETY: the `Avx2Fma` token proves AVX2+FMA are available; the
            // asserts above bound every A read ((kc-1)/NR panels down, at most
            // mr rows of NR floats), every B read (kc rows of NR) and every C
            // read/write (mr rows of NR), and the bias read (NR floats).
            unsafe {
                match mr {
                    1 => tile_avx2::<1>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    2 => tile_avx2::<2>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    3 => tile_avx2::<3>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    4 => tile_avx2::<4>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    5 => tile_avx2::<5>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    _ => tile_avx2::<6>(kc, ap, a_pstride, bp, cp, bias_ptr),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Some(_), WeightsRef::F16(b)) => {
            let bias_ptr = bias.map_or(std::ptr::null(), |s| s.as_ptr());
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            // SAFETY: the `Avx2Fma` token proves AVX2+FMA+F16C are available;
            // the asserts above bound every A read, every B read (kc rows of
            // NR halves), every C read/write and the bias read, as for f32.
            unsafe {
                match mr {
                    1 => tile_avx2_f16::<1>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    2 => tile_avx2_f16::<2>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    3 => tile_avx2_f16::<3>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    4 => tile_avx2_f16::<4>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    5 => tile_avx2_f16::<5>(kc, ap, a_pstride, bp, cp, bias_ptr),
                    _ => tile_avx2_f16::<6>(kc, ap, a_pstride, bp, cp, bias_ptr),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        (Some(_), _) => unreachable!(),
    }
}

/// Rows per tile up to which [`tile_wide`] pays: below 4 rows one panel
/// has too few independent FMA chains (2 per row) to hide the FMA latency.
pub(crate) const WIDE_MAX_ROWS: usize = 3;

/// Panels [`tile_wide`] computes together for an `mr`-row tile: enough
/// chains (`2 * mr * panels`) in flight to cover the FMA latency, within the
/// 16 ymm registers.
pub(crate) fn wide_panels(mr: usize) -> usize {
    match mr {
        1 => 6,
        2 => 3,
        _ => 2,
    }
}

/// [`tile`] for `panels` consecutive column panels at once (small `mr`):
/// panel `q` reads weights `b[q * b_pstride..]` and writes
/// `c[q * c_pstride..]`, bias `bias[q * NR..]`. Every element is the same
/// ascending FMA chain [`tile`] computes, so results are bit-identical to
/// calling [`tile`] once per panel; only the interleaving of independent
/// chains differs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_wide(
    isa: Isa,
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
    assert!((1..=WIDE_MAX_ROWS).contains(&mr) && panels == wide_panels(mr) && kc > 0);
    assert!(a_pstride >= mr * NR && c_pstride >= mr * NR && b_pstride >= kc * NR);
    assert!(a.len() >= ((kc - 1) / NR) * a_pstride + mr * NR, "A slice too short");
    assert!(b.len() >= (panels - 1) * b_pstride + kc * NR, "B slice too short");
    assert!(c.len() >= (panels - 1) * c_pstride + mr * NR, "C slice too short");
    if let Some(bias) = bias {
        assert!(bias.len() >= panels * NR);
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        let bias_ptr = bias.map_or(std::ptr::null(), |s| s.as_ptr());
        let (ap, cp) = (a.as_ptr(), c.as_mut_ptr());
        // SAFETY: the `Avx2Fma` token proves AVX2+FMA+F16C are available; the
        // asserts above bound every A read (as in `tile`), every B read
        // (`panels` panels `b_pstride` apart, kc rows of NR each), every C
        // read/write (`panels` panels `c_pstride` apart, mr rows of NR) and
        // the bias read (panels * NR floats).
        unsafe {
            match (b, mr) {
                (WeightsRef::F32(b), 1) => {
                    wide_avx2::<1, 6>(kc, ap, a_pstride, b.as_ptr(), b_pstride, cp, c_pstride, bias_ptr)
                }
                (WeightsRef::F32(b), 2) => {
                    wide_avx2::<2, 3>(kc, ap, a_pstride, b.as_ptr(), b_pstride, cp, c_pstride, bias_ptr)
                }
                (WeightsRef::F32(b), _) => {
                    wide_avx2::<3, 2>(kc, ap, a_pstride, b.as_ptr(), b_pstride, cp, c_pstride, bias_ptr)
                }
                (WeightsRef::F16(b), 1) => {
                    wide_avx2_f16::<1, 6>(kc, ap, a_pstride, b.as_ptr(), b_pstride, cp, c_pstride, bias_ptr)
                }
                (WeightsRef::F16(b), 2) => {
                    wide_avx2_f16::<2, 3>(kc, ap, a_pstride, b.as_ptr(), b_pstride, cp, c_pstride, bias_ptr)
                }
                (WeightsRef::F16(b), _) => {
                    wide_avx2_f16::<3, 2>(kc, ap, a_pstride, b.as_ptr(), b_pstride, cp, c_pstride, bias_ptr)
                }
            }
        }
        return;
    }
    // Portable: one panel at a time, the same chains.
    for q in 0..panels {
        let bq = b.slice(q * b_pstride..q * b_pstride + kc * NR);
        let cq = &mut c[q * c_pstride..q * c_pstride + mr * NR];
        tile(
            isa,
            mr,
            kc,
            a,
            a_pstride,
            bq,
            cq,
            bias.map(|s| &s[q * NR..(q + 1) * NR]),
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn tile_scalar<T: Copy>(
    mr: usize,
    kc: usize,
    a: &[f32],
    ps: usize,
    b: &[T],
    expand: impl Fn(T) -> f32,
    c: &mut [f32],
    bias: Option<&[f32]>,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for (r, row) in acc.iter_mut().enumerate().take(mr) {
        row.copy_from_slice(&bias.unwrap_or(&c[r * NR..(r + 1) * NR])[..NR]);
    }
    let mut brow = [0.0f32; NR];
    for k in 0..kc {
        for (dst, w) in brow.iter_mut().zip(&b[k * NR..(k + 1) * NR]) {
            *dst = expand(*w);
        }
        let base = (k / NR) * ps + k % NR;
        for (r, row) in acc.iter_mut().enumerate().take(mr) {
            let av = a[base + r * NR];
            for (acc_j, b_j) in row.iter_mut().zip(&brow) {
                // Deliberately unfused: the portable path must not depend on
                // a slow software fma.
                *acc_j += av * *b_j;
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(mr) {
        c[r * NR..(r + 1) * NR].copy_from_slice(row);
    }
}

/// The AVX2 micro-kernel, once per weight type: `$ty` is the packed element
/// and `$load(ptr)` turns the `NR / 2` elements at `ptr` into one f32 vector.
/// Both kernels run the same FMA chains in the same order.
macro_rules! avx2_tile_kernel {
    ($name:ident, $ty:ty, $features:literal, |$p:ident| $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const M: usize>(
            kc: usize,
            a: *const f32,
            ps: usize,
            b: *const $ty,
            c: *mut f32,
            bias: *const f32,
        ) {
            use std::arch::x86_64::*;
            // SAFETY: the caller (`tile`) checked that every offset used below
            // is in bounds of the slices these pointers came from; the target
            // features are enabled.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                for (r, row) in acc.iter_mut().enumerate() {
                    let src = if bias.is_null() {
                        c.add(r * NR) as *const f32
                    } else {
                        bias
                    };
                    row[0] = _mm256_loadu_ps(src);
                    row[1] = _mm256_loadu_ps(src.add(8));
                }
                macro_rules! step {
                    ($ap:expr, $bp:expr, $j:expr) => {{
                        let b0 = {
                            let $p = $bp.add($j * NR);
                            $load
                        };
                        let b1 = {
                            let $p = $bp.add($j * NR + 8);
                            $load
                        };
                        for (r, row) in acc.iter_mut().enumerate() {
                            let av = _mm256_set1_ps(*$ap.add(r * NR + $j));
                            row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                            row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                        }
                    }};
                }
                let mut k = 0;
                while k < kc {
                    let ap = a.add((k / NR) * ps);
                    let bp = b.add(k * NR);
                    let len = (kc - k).min(NR);
                    if len == NR {
                        for j in 0..NR {
                            step!(ap, bp, j);
                        }
                    } else {
                        for j in 0..len {
                            step!(ap, bp, j);
                        }
                    }
                    k += NR;
                }
                for (r, row) in acc.iter().enumerate() {
                    _mm256_storeu_ps(c.add(r * NR), row[0]);
                    _mm256_storeu_ps(c.add(r * NR + 8), row[1]);
                }
            }
        }
    };
}

avx2_tile_kernel!(tile_avx2, f32, "avx2,fma", |p| _mm256_loadu_ps(p));
// `vcvtph2ps` is exact: every f16 is an f32.
avx2_tile_kernel!(tile_avx2_f16, u16, "avx2,fma,f16c", |p| _mm256_cvtph_ps(
    _mm_loadu_si128(p as *const __m128i)
));

/// The multi-panel AVX2 micro-kernel ([`tile_wide`]), once per weight type
/// like [`avx2_tile_kernel`]: `M` rows by `P` panels, `2 * M * P`
/// accumulators, each the same ascending chain as the one-panel kernel's.
macro_rules! avx2_wide_kernel {
    ($name:ident, $ty:ty, $features:literal, |$p:ident| $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
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
            // SAFETY: the caller (`tile_wide`) checked that every offset used
            // below is in bounds of the slices these pointers came from; the
            // target features are enabled.
            unsafe {
                let mut acc = [[[_mm256_setzero_ps(); 2]; M]; P];
                for (q, panel) in acc.iter_mut().enumerate() {
                    for (r, row) in panel.iter_mut().enumerate() {
                        let src = if bias.is_null() {
                            c.add(q * c_ps + r * NR) as *const f32
                        } else {
                            bias.add(q * NR)
                        };
                        row[0] = _mm256_loadu_ps(src);
                        row[1] = _mm256_loadu_ps(src.add(8));
                    }
                }
                for k in 0..kc {
                    let ak = a.add((k / NR) * ps + k % NR);
                    let mut av = [_mm256_setzero_ps(); M];
                    for (r, v) in av.iter_mut().enumerate() {
                        *v = _mm256_set1_ps(*ak.add(r * NR));
                    }
                    for (q, panel) in acc.iter_mut().enumerate() {
                        let bq = b.add(q * b_ps + k * NR);
                        let b0 = {
                            let $p = bq;
                            $load
                        };
                        let b1 = {
                            let $p = bq.add(8);
                            $load
                        };
                        for (r, row) in panel.iter_mut().enumerate() {
                            row[0] = _mm256_fmadd_ps(av[r], b0, row[0]);
                            row[1] = _mm256_fmadd_ps(av[r], b1, row[1]);
                        }
                    }
                }
                for (q, panel) in acc.iter().enumerate() {
                    for (r, row) in panel.iter().enumerate() {
                        _mm256_storeu_ps(c.add(q * c_ps + r * NR), row[0]);
                        _mm256_storeu_ps(c.add(q * c_ps + r * NR + 8), row[1]);
                    }
                }
            }
        }
    };
}

avx2_wide_kernel!(wide_avx2, f32, "avx2,fma", |p| _mm256_loadu_ps(p));
avx2_wide_kernel!(wide_avx2_f16, u16, "avx2,fma,f16c", |p| _mm256_cvtph_ps(
    _mm_loadu_si128(p as *const __m128i)
));

// ------------------------------------------------------------------ f16 expansion

/// `dst[i] = f16(src[i])` as f32, exactly (F16C where the path has it): a
/// weight sliver expanded once and reused by every row tile of a batch.
pub(crate) fn expand_f16(isa: Isa, src: &[u16], dst: &mut [f32]) {
    assert!(src.len() >= dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        done = dst.len() / 8 * 8;
        // SAFETY: the token proves F16C; `done` halves are read and `done`
        // floats written, within both slices (assert above).
        unsafe { expand_f16_f16c(src.as_ptr(), dst.as_mut_ptr(), done) };
    }
    let _ = isa;
    for (d, h) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f16_bits_to_f32(*h);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn expand_f16_f16c(src: *const u16, dst: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller bounds `n` (a multiple of 8) reads and writes.
    unsafe {
        for i in (0..n).step_by(8) {
            let h = _mm_loadu_si128(src.add(i) as *const __m128i);
            _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
        }
    }
}

// ------------------------------------------------------------------ LayerNorm statistics

/// `(mean, 1 / sqrt(var + eps))` of row `r` over its first `n` columns, in a
/// panel-major matrix of `m` rows. The summation order depends only on `n`.
pub(crate) fn row_stats(isa: Isa, act: &[f32], m: usize, n: usize, r: usize) -> (f32, f32) {
    assert!(n > 0 && r < m);
    let panels = n.div_ceil(NR);
    assert!(
        act.len() >= (panels - 1) * m * NR + (r + 1) * NR,
        "activation slice too short"
    );
    match isa.avx2() {
        None => row_stats_scalar(act, m, n, r),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: token proves AVX2+FMA; the assert bounds every read (each
        // panel's NR floats of row r, up to the last panel).
        Some(_) => unsafe { row_stats_avx2(act.as_ptr(), m, n, r) },
        #[cfg(not(target_arch = "x86_64"))]
        Some(_) => unreachable!(),
    }
}

fn row_stats_scalar(act: &[f32], m: usize, n: usize, r: usize) -> (f32, f32) {
    let at = |c: usize| act[(c / NR) * m * NR + r * NR + c % NR];
    let mut sum = 0.0f32;
    for c in 0..n {
        sum += at(c);
    }
    let mean = sum / n as f32;
    let mut sq = 0.0f32;
    for c in 0..n {
        let d = at(c) - mean;
        sq += d * d;
    }
    let var = sq / n as f32;
    (mean, 1.0 / (var + LN_EPS).sqrt())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 floats, exactly one ymm store.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    // Fixed pairwise order: the result depends only on the lane values.
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_stats_avx2(act: *const f32, m: usize, n: usize, r: usize) -> (f32, f32) {
    use std::arch::x86_64::*;
    // SAFETY: `row_stats` checked that every panel's NR floats of row r are in
    // bounds; the masked tail still loads whole (in-bounds) panels.
    unsafe {
        let full = n / NR;
        let rem = n % NR;
        let idx = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
        let remf = _mm256_set1_ps(rem as f32);
        let mask_lo = _mm256_cmp_ps::<_CMP_LT_OQ>(idx, remf);
        let mask_hi = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_add_ps(idx, _mm256_set1_ps(8.0)), remf);
        let row = |p: usize| act.add(p * m * NR + r * NR);
        let mut s0 = _mm256_setzero_ps();
        let mut s1 = _mm256_setzero_ps();
        for p in 0..full {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(row(p)));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(row(p).add(8)));
        }
        if rem > 0 {
            s0 = _mm256_add_ps(s0, _mm256_and_ps(mask_lo, _mm256_loadu_ps(row(full))));
            s1 = _mm256_add_ps(s1, _mm256_and_ps(mask_hi, _mm256_loadu_ps(row(full).add(8))));
        }
        let mean = hsum(_mm256_add_ps(s0, s1)) / n as f32;
        let mv = _mm256_set1_ps(mean);
        let mut q0 = _mm256_setzero_ps();
        let mut q1 = _mm256_setzero_ps();
        for p in 0..full {
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(row(p)), mv);
            let d1 = _mm256_sub_ps(_mm256_loadu_ps(row(p).add(8)), mv);
            q0 = _mm256_fmadd_ps(d0, d0, q0);
            q1 = _mm256_fmadd_ps(d1, d1, q1);
        }
        if rem > 0 {
            let d0 = _mm256_and_ps(mask_lo, _mm256_sub_ps(_mm256_loadu_ps(row(full)), mv));
            let d1 = _mm256_and_ps(mask_hi, _mm256_sub_ps(_mm256_loadu_ps(row(full).add(8)), mv));
            q0 = _mm256_fmadd_ps(d0, d0, q0);
            q1 = _mm256_fmadd_ps(d1, d1, q1);
        }
        let var = hsum(_mm256_add_ps(q0, q1)) / n as f32;
        (mean, 1.0 / (var + LN_EPS).sqrt())
    }
}

// ------------------------------------------------------------------ LayerNorm apply + GELU

/// In place on one panel of `m` rows (`panel.len() >= m * NR`):
/// `x = GELU((x - mean_r) * inv_r [* gamma + beta])` for the first `valid`
/// columns; columns past `valid` (padding) are set to 0.
pub(crate) fn ln_gelu_panel(
    isa: Isa,
    panel: &mut [f32],
    m: usize,
    valid: usize,
    stats: &[(f32, f32)],
    affine: Option<(&[f32], &[f32])>,
) {
    assert!(panel.len() >= m * NR && stats.len() >= m && valid <= NR);
    if let Some((g, b)) = affine {
        assert!(g.len() >= NR && b.len() >= NR);
    }
    match isa.avx2() {
        None => {
            for r in 0..m {
                let (mean, inv) = stats[r];
                for j in 0..NR {
                    let x = &mut panel[r * NR + j];
                    *x = if j < valid {
                        let mut v = (*x - mean) * inv;
                        if let Some((g, b)) = affine {
                            v = v * g[j] + b[j];
                        }
                        gelu_scalar(v)
                    } else {
                        0.0
                    };
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Some(_) => {
            let (gp, bp) = affine.map_or((std::ptr::null(), std::ptr::null()), |(g, b)| (g.as_ptr(), b.as_ptr()));
            // SAFETY: token proves AVX2+FMA; the asserts bound the m rows of
            // NR floats written, the m stats read, and the NR gamma/beta read.
            unsafe { ln_gelu_panel_avx2(panel.as_mut_ptr(), m, valid, stats.as_ptr(), gp, bp) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Some(_) => unreachable!(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn ln_gelu_panel_avx2(
    panel: *mut f32,
    m: usize,
    valid: usize,
    stats: *const (f32, f32),
    gamma: *const f32,
    beta: *const f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: `ln_gelu_panel` checked the bounds of every pointer offset used
    // here (m rows of NR floats, m stats, NR gamma/beta when non-null).
    unsafe {
        let idx = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
        let vf = _mm256_set1_ps(valid as f32);
        let mask = [
            _mm256_cmp_ps::<_CMP_LT_OQ>(idx, vf),
            _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_add_ps(idx, _mm256_set1_ps(8.0)), vf),
        ];
        let affine = !gamma.is_null();
        let (g, b) = if affine {
            (
                [_mm256_loadu_ps(gamma), _mm256_loadu_ps(gamma.add(8))],
                [_mm256_loadu_ps(beta), _mm256_loadu_ps(beta.add(8))],
            )
        } else {
            ([_mm256_set1_ps(1.0); 2], [_mm256_setzero_ps(); 2])
        };
        for r in 0..m {
            let (mean, inv) = *stats.add(r);
            let (mv, iv) = (_mm256_set1_ps(mean), _mm256_set1_ps(inv));
            for h in 0..2 {
                let p = panel.add(r * NR + h * 8);
                let mut v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p), mv), iv);
                if affine {
                    v = _mm256_fmadd_ps(v, g[h], b[h]);
                }
                _mm256_storeu_ps(p, _mm256_and_ps(mask[h], gelu_avx2(v)));
            }
        }
    }
}

// ------------------------------------------------------------------ GELU / tanh / exp

// Cephes-style single precision coefficients.
const EXP_HI: f32 = 88.376_26;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
#[cfg(test)]
const TANH_P: [f32; 5] = [
    -5.704_988_7e-3,
    2.063_909e-2,
    -5.373_971_5e-2,
    1.333_144_2e-1,
    -3.333_328e-1,
];
/// Below this |x| tanh uses its odd polynomial (no cancellation); above, `1 - 2/(e^{2x}+1)`.
#[cfg(test)]
const TANH_SMALL: f32 = 0.625;
/// tanh(9) rounds to 1 in f32; clamping keeps `exp` far from overflow.
#[cfg(test)]
const TANH_CLAMP: f32 = 9.0;

/// `exp(x)` for `x` in about [-87, 88]: range reduction by ln 2 plus a degree-6
/// polynomial, ~1 ulp.
fn exp_scalar(x: f32) -> f32 {
    let x = x.clamp(-EXP_HI, EXP_HI);
    let fx = (x * LOG2E).round();
    let r = x - fx * LN2_HI - fx * LN2_LO;
    let mut y = EXP_P[0];
    for c in &EXP_P[1..] {
        y = y * r + c;
    }
    let y = y * r * r + r + 1.0;
    y * f32::from_bits((((fx as i32) + 127) as u32) << 23)
}

/// tanh via [`exp_scalar`]; the portable twin of `tanh_avx2`. GELU uses the
/// equivalent sigmoid form instead; these two stay as tested building blocks.
#[cfg(test)]
pub(crate) fn tanh_scalar(x: f32) -> f32 {
    let ax = x.abs();
    if ax < TANH_SMALL {
        let z = x * x;
        let mut y = TANH_P[0];
        for c in &TANH_P[1..] {
            y = y * z + c;
        }
        y * z * x + x
    } else {
        let e = exp_scalar(2.0 * ax.min(TANH_CLAMP));
        (1.0 - 2.0 / (e + 1.0)).copysign(x)
    }
}

/// GELU through the identity `0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u))`: one
/// `exp` and one division, and no cancellation for negative inputs (the
/// `1 + tanh` form loses relative accuracy there).
fn gelu_scalar(x: f32) -> f32 {
    let u2 = -2.0 * GELU_C * (x + GELU_A * x * x * x);
    // Past exp's range the true value is below 1e-37 in magnitude: 0.
    if u2 > EXP_HI { 0.0 } else { x / (1.0 + exp_scalar(u2)) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-EXP_HI)), _mm256_set1_ps(EXP_HI));
    let fx =
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)));
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_LO), r);
    let mut y = _mm256_set1_ps(EXP_P[0]);
    for c in &EXP_P[1..] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

#[cfg(all(target_arch = "x86_64", test))]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let sign_mask = _mm256_set1_ps(-0.0);
    let ax = _mm256_andnot_ps(sign_mask, x);
    // Small branch: odd polynomial.
    let z = _mm256_mul_ps(x, x);
    let mut p = _mm256_set1_ps(TANH_P[0]);
    for c in &TANH_P[1..] {
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(*c));
    }
    let small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    // Large branch: 1 - 2 / (exp(2|x|) + 1), sign restored.
    // SAFETY: same target features as this function.
    let e = unsafe {
        exp_avx2(_mm256_add_ps(
            _mm256_min_ps(ax, _mm256_set1_ps(TANH_CLAMP)),
            _mm256_min_ps(ax, _mm256_set1_ps(TANH_CLAMP)),
        ))
    };
    let one = _mm256_set1_ps(1.0);
    let large = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, one)));
    let large = _mm256_or_ps(large, _mm256_and_ps(sign_mask, x));
    _mm256_blendv_ps(
        large,
        small,
        _mm256_cmp_ps::<_CMP_LT_OQ>(ax, _mm256_set1_ps(TANH_SMALL)),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Same identity as `gelu_scalar`: x / (1 + exp(-2u)).
    let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    let u2 = _mm256_mul_ps(
        _mm256_set1_ps(-2.0 * GELU_C),
        _mm256_fmadd_ps(_mm256_set1_ps(GELU_A), x3, x),
    );
    // SAFETY: same target features as this function.
    let e = unsafe { exp_avx2(u2) };
    let g = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
    // Past exp's range the true value is below 1e-37 in magnitude: 0 (NaN kept).
    _mm256_and_ps(g, _mm256_cmp_ps::<_CMP_NGT_UQ>(u2, _mm256_set1_ps(EXP_HI)))
}

/// tanh over a slice with the selected ISA (tests).
#[cfg(test)]
pub(crate) fn tanh_slice(isa: Isa, xs: &mut [f32]) {
    match isa.avx2() {
        None => xs.iter_mut().for_each(|x| *x = tanh_scalar(*x)),
        #[cfg(target_arch = "x86_64")]
        Some(_) => {
            use std::arch::x86_64::*;
            for chunk in xs.chunks_mut(8) {
                let mut buf = [0.0f32; 8];
                buf[..chunk.len()].copy_from_slice(chunk);
                // SAFETY: token proves AVX2+FMA; `buf` is exactly 8 floats.
                unsafe {
                    let v = tanh_avx2(_mm256_loadu_ps(buf.as_ptr()));
                    _mm256_storeu_ps(buf.as_mut_ptr(), v);
                }
                let n = chunk.len();
                chunk.copy_from_slice(&buf[..n]);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Some(_) => unreachable!(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isas() -> Vec<Isa> {
        super::super::isa::CpuIsa::available()
            .into_iter()
            .map(|i| Isa::select(i).unwrap())
            .collect()
    }

    #[test]
    fn tanh_is_accurate() {
        let xs: Vec<f32> = (-200_000..=200_000)
            .map(|i| i as f32 * 6e-5)
            .chain([0.0, -0.0, 1e-30, 30.0, -1e4, 1e30])
            .collect();
        for isa in isas() {
            let mut ys = xs.clone();
            tanh_slice(isa, &mut ys);
            let mut worst = 0.0f64;
            for (x, y) in xs.iter().zip(&ys) {
                let want = (*x as f64).tanh();
                let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE);
                let ulp = f32::from_bits(ulp.to_bits() + 1) - ulp;
                let err = ((*y as f64) - want).abs() / ulp as f64;
                worst = worst.max(err);
            }
            assert!(worst <= 4.0, "{isa:?}: worst tanh error {worst} ulp");
        }
    }

    #[test]
    fn gelu_is_accurate() {
        let xs: Vec<f32> = (-100_000..=100_000)
            .map(|i| i as f32 * 2e-4)
            .chain([1e4, -1e4, 1e30, -1e30])
            .collect();
        for isa in isas() {
            let stats = vec![(0.0f32, 1.0f32); xs.len().div_ceil(NR)];
            let mut panel = xs.clone();
            panel.resize(stats.len() * NR, 0.0);
            // One "row" per 16 values: a panel of stats.len() rows, identity LN.
            ln_gelu_panel(isa, &mut panel, stats.len(), NR, &stats, None);
            for (x, y) in xs.iter().zip(&panel) {
                let x64 = *x as f64;
                // f64 sigmoid form: exact enough everywhere (the `1 + tanh`
                // form cancels in f64 too for x below about -4).
                let u2 = -2.0 * 0.797_884_560_8 * (x64 + 0.044715 * x64.powi(3));
                let want = x64 / (1.0 + u2.exp());
                // A few ulp, scaled by exp's condition number |u2| (the f32
                // rounding of the argument is amplified by it).
                let tol = 4.0 * f32::EPSILON as f64 * want.abs() * (1.0 + u2.abs().min(100.0)) + 1e-30;
                assert!((*y as f64 - want).abs() <= tol, "{isa:?}: gelu({x}) = {y}, want {want}");
            }
        }
    }

    /// The software conversions agree with F16C bit for bit: every half
    /// expands as `vcvtph2ps` does, and `f32_to_f16_bits` rounds as
    /// `vcvtps2ph` with round-to-nearest-even.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn software_f16_matches_f16c() {
        use crate::model::precision::f32_to_f16_bits;
        if Isa::select(super::super::isa::CpuIsa::Auto).unwrap() == Isa::Scalar {
            return;
        }
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn hw(xs: &[f32; 8], hs: &[u16; 8]) -> ([u16; 8], [f32; 8]) {
            use std::arch::x86_64::*;
            let (mut h, mut f) = ([0u16; 8], [0.0f32; 8]);
            // SAFETY: each pointer covers exactly one 8-lane vector.
            unsafe {
                let v = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(xs.as_ptr()));
                _mm_storeu_si128(h.as_mut_ptr() as *mut __m128i, v);
                let w = _mm256_cvtph_ps(_mm_loadu_si128(hs.as_ptr() as *const __m128i));
                _mm256_storeu_ps(f.as_mut_ptr(), w);
            }
            (h, f)
        }
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for chunk in 0..8192u32 {
            let hs: [u16; 8] = std::array::from_fn(|i| (chunk * 8 + i as u32) as u16);
            let xs: [f32; 8] = std::array::from_fn(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Exponents over the f16 range and a little past it.
                f32::from_bits((s as u32 & 0x807f_ffff) | (((s >> 32) as u32 % 48 + 96) << 23))
            });
            // SAFETY: the detected ISA includes AVX2 and F16C.
            let (h, f) = unsafe { hw(&xs, &hs) };
            for i in 0..8 {
                assert_eq!(f16_bits_to_f32(hs[i]).to_bits(), f[i].to_bits(), "half {:#06x}", hs[i]);
                if !xs[i].is_nan() {
                    assert_eq!(f32_to_f16_bits(xs[i]), h[i], "{:e}", xs[i]);
                }
            }
        }
    }

    #[test]
    fn tile_wide_is_bit_identical_to_tile() {
        let kc: usize = 41;
        let m: usize = 3;
        let ps = m * NR;
        let a: Vec<f32> = (0..kc.div_ceil(NR) * ps)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let b_ps = kc * NR + 5;
        let b32: Vec<f32> = (0..6 * b_ps)
            .map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5)
            .collect();
        let b16: Vec<u16> = b32
            .iter()
            .map(|w| crate::model::precision::f32_to_f16_bits(*w))
            .collect();
        let bias: Vec<f32> = (0..6 * NR).map(|j| j as f32 * 0.01).collect();
        for isa in isas() {
            for mr in 1..=WIDE_MAX_ROWS {
                let panels = wide_panels(mr);
                let c_ps = mr * NR + 3;
                for b in [WeightsRef::F32(&b32), WeightsRef::F16(&b16)] {
                    for with_bias in [true, false] {
                        let init: Vec<f32> = (0..panels * c_ps).map(|i| i as f32 * 0.001).collect();
                        let mut wide = init.clone();
                        let bias = with_bias.then_some(&bias[..]);
                        tile_wide(isa, mr, panels, kc, &a, ps, b, b_ps, &mut wide, c_ps, bias);
                        let mut one = init.clone();
                        for q in 0..panels {
                            let bq = b.slice(q * b_ps..q * b_ps + kc * NR);
                            let bias_q = bias.map(|s| &s[q * NR..(q + 1) * NR]);
                            tile(isa, mr, kc, &a, ps, bq, &mut one[q * c_ps..q * c_ps + mr * NR], bias_q);
                        }
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&wide), bits(&one), "{isa:?} mr={mr}");
                    }
                }
            }
        }
    }

    #[test]
    fn tile_matches_naive_for_every_height() {
        let kc: usize = 37;
        let m: usize = 7;
        let ps = m * NR;
        let a: Vec<f32> = (0..kc.div_ceil(NR) * ps)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..kc * NR).map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5).collect();
        let bias: Vec<f32> = (0..NR).map(|j| j as f32 * 0.01).collect();
        for isa in isas() {
            for mr in 1..=MR {
                let mut c = vec![0.0f32; mr * NR];
                tile(isa, mr, kc, &a, ps, WeightsRef::F32(&b), &mut c, Some(&bias));
                for r in 0..mr {
                    for j in 0..NR {
                        let mut want = bias[j] as f64;
                        for k in 0..kc {
                            want += a[(k / NR) * ps + r * NR + k % NR] as f64 * b[k * NR + j] as f64;
                        }
                        assert!((c[r * NR + j] as f64 - want).abs() < 1e-4);
                    }
                }
            }
        }
    }
}
