//! The bf16 mode's matrix kernels: `vdpbf16ps` (AVX512_BF16) and an
//! emulation that gives the same bits on every other CPU (AVX2+FMA, or
//! portable code).
//!
//! Owns: [`tile`] (dispatch by instruction set), [`round_pairs`] (a Linear's
//! f32 input rounded to bf16 pairs), the emulation and its `unsafe`. Must not
//! touch: packing (weights arrive in the pair layout below, already rounded
//! with subnormals flushed), loop nests or blocking (the `gemm` driver).
//!
//! Layouts (`NR` = 16 columns per panel, `k` taken in pairs):
//! - weights: panel `p`, pair `kp`: 32 bf16, `b[kp * 32 + 2 j + t] =
//!   W[p NR + j][2 kp + t]`, so one 64-byte row is one zmm of 16 pairs;
//! - activations: the f32 panel-major layout with each two neighbouring
//!   columns packed into one `u32` (`lo` = even column, `hi` = odd), so pair
//!   `kp` of row `r` sits at `(kp / 8) * a_pstride + r * 8 + kp % 8`.
//!
//! Arithmetic, per output element and pair, in `vdpbf16ps`'s documented
//! order: `acc += a[odd] * w[odd]`, then `acc += a[even] * w[even]`, each a
//! single rounding to nearest even (a bf16 product is exact in f32, so each
//! step is one fused multiply-add), with denormal results flushed to zero
//! (sign kept). Denormal inputs never occur: weights and activations are
//! flushed when rounded to bf16, biases when packed. Pairs run in ascending
//! `k` from the bias, whatever the tile, so rows are batch-invariant and
//! every path gives the same bits (tested against the instruction).

use super::super::isa::Isa;
use super::NR;
use crate::model::precision::f32_to_bf16_bits;

/// Pairs per panel row of activations (`NR / 2`).
pub(crate) const PAIRS: usize = NR / 2;

/// Most rows per emulated tile (one panel: two ymm per row, two vectors of
/// odd and two of even weights, two broadcasts).
pub(crate) const EMUL_MR: usize = 4;

/// `dst[i] = bf16(src[2 i]) | bf16(src[2 i + 1]) << 16`: a panel-major f32
/// block rounded to the pair layout (round to nearest even, denormals to
/// signed zero: [`f32_to_bf16_bits`], which the AVX2 version computes with
/// the same integer steps, so every path rounds alike).
pub(crate) fn round_pairs(isa: Isa, src: &[f32], dst: &mut [u32]) {
    assert!(src.len() >= 2 * dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        done = dst.len() / 8 * 8;
        // SAFETY: the token proves AVX2; `done` u32 are written and
        // `2 * done` floats read, both within the slices (assert above).
        unsafe { round_pairs_avx2(src.as_ptr(), dst.as_mut_ptr(), done) };
    }
    let _ = isa;
    for (d, s) in dst[done..].iter_mut().zip(src[2 * done..].chunks_exact(2)) {
        *d = u32::from(f32_to_bf16_bits(s[0])) | (u32::from(f32_to_bf16_bits(s[1])) << 16);
    }
}

/// [`round_pairs`] over `n` (a multiple of 8) pairs: `f32_to_bf16_bits` on
/// 16 floats at a time, lane for lane (denormal: sign only; NaN: quiet;
/// else `(b + 0x7fff + ((b >> 16) & 1)) >> 16`), then the even and odd
/// columns packed into one u32 each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_pairs_avx2(src: *const f32, dst: *mut u32, n: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller bounds `2 * n` floats read and `n` u32 written.
    unsafe {
        let exp_mask = _mm256_set1_epi32(0x7f80_0000);
        let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
        let sign = _mm256_set1_epi32(0x8000_0000u32 as i32);
        let round = |v: __m256i| {
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(v), _mm256_set1_epi32(1));
            let rounded = _mm256_add_epi32(_mm256_add_epi32(v, _mm256_set1_epi32(0x7fff)), lsb);
            let denormal = _mm256_cmpeq_epi32(_mm256_and_si256(v, exp_mask), _mm256_setzero_si256());
            // NaN: |b| > 0x7f800000; kept quiet (bit 22 set), not rounded.
            let nan = _mm256_cmpgt_epi32(_mm256_and_si256(v, abs_mask), exp_mask);
            let quiet = _mm256_or_si256(v, _mm256_set1_epi32(0x0040_0000));
            let r = _mm256_blendv_epi8(rounded, _mm256_and_si256(v, sign), denormal);
            _mm256_srli_epi32::<16>(_mm256_blendv_epi8(r, quiet, nan))
        };
        let mut i = 0;
        while i < n {
            // 8 pairs = 16 floats: lanes hold (even, odd) alternately.
            let lo = round(_mm256_loadu_si256(src.add(2 * i) as *const __m256i));
            let hi = round(_mm256_loadu_si256(src.add(2 * i + 8) as *const __m256i));
            // Each 32-bit lane now holds one bf16 in its low half: pack
            // lane pairs (2 j, 2 j + 1) into one u32 as even | odd << 16.
            let pack = |v: __m256i| {
                let even = _mm256_and_si256(v, _mm256_set1_epi64x(0xffff));
                let odd = _mm256_srli_epi64::<16>(_mm256_and_si256(v, _mm256_set1_epi64x(0xffff_0000_0000)));
                _mm256_or_si256(even, odd)
            };
            // Two u32 results per 64-bit lane: gather the low 32 bits of
            // each 64-bit lane of both halves, in order.
            let (pl, ph) = (pack(lo), pack(hi));
            let idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
            let pl = _mm256_permutevar8x32_epi32(pl, idx);
            let ph = _mm256_permutevar8x32_epi32(ph, idx);
            let out = _mm256_permute2x128_si256::<0x20>(pl, ph);
            _mm256_storeu_si256(dst.add(i) as *mut __m256i, out);
            i += 8;
        }
    }
}

/// Rows and panels per tile on `isa`: `(max rows, panels for an mr-row tile)`.
pub(crate) fn tile_shape(isa: Isa, mr: usize) -> usize {
    match isa {
        Isa::Avx512(t) if t.has_bf16() => super::avx512::panels_for(mr),
        _ => 1,
    }
}

/// Most rows per tile on `isa`.
pub(crate) fn max_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512(t) if t.has_bf16() => super::avx512::MR,
        _ => EMUL_MR,
    }
}

/// `mr` rows by `panels` panels of `C = (bias | C) + A B` over `kpc` pairs
/// (see the module doc for layouts and arithmetic). Panel `q`'s weights
/// start at `b[q * b_pstride]` (`kpc` rows of 32), its output at
/// `c[q * c_pstride]` and its bias at `bias[q * NR]`. `panels` is
/// [`tile_shape`]`(isa, mr)` or 1.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile(
    isa: Isa,
    mr: usize,
    panels: usize,
    kpc: usize,
    a: &[u32],
    a_pstride: usize,
    b: &[u16],
    b_pstride: usize,
    c: &mut [f32],
    c_pstride: usize,
    bias: Option<&[f32]>,
) {
    assert!((1..=max_rows(isa)).contains(&mr) && (panels == 1 || panels == tile_shape(isa, mr)) && kpc > 0);
    assert!(a_pstride >= mr * PAIRS && c_pstride >= mr * NR && b_pstride >= kpc * 2 * NR);
    assert!(
        a.len() >= ((kpc - 1) / PAIRS) * a_pstride + mr * PAIRS,
        "A slice too short"
    );
    assert!(b.len() >= (panels - 1) * b_pstride + kpc * 2 * NR, "B slice too short");
    assert!(c.len() >= (panels - 1) * c_pstride + mr * NR, "C slice too short");
    if let Some(bias) = bias {
        assert!(bias.len() >= panels * NR);
    }
    let bias_ptr = bias.map_or(std::ptr::null(), |s| s.as_ptr());
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(t) if t.has_bf16() => {
            // SAFETY: the token proves AVX-512 F/BW/VL and AVX512_BF16; the
            // asserts above bound every A read ((kpc-1)/PAIRS panels down,
            // mr rows of PAIRS), every B read (`panels` panels b_pstride
            // apart, kpc rows of 32), every C read/write and the bias read.
            unsafe {
                match (mr, panels) {
                    (1, 1) => native::<1, 1>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (1, _) => native::<1, 8>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (2, 1) => native::<2, 1>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (2, _) => native::<2, 6>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (3, 1) => native::<3, 1>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (3, _) => native::<3, 4>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (4, 1) => native::<4, 1>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (4, _) => native::<4, 3>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (5, 1) => native::<5, 1>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (5, _) => native::<5, 3>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (6, 1) => native::<6, 1>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (6, _) => native::<6, 3>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (7, 1) => native::<7, 1>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (7, _) => native::<7, 3>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    (_, 1) => native::<8, 1>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                    _ => native::<8, 3>(kpc, ap, a_pstride, bp, b_pstride, cp, c_pstride, bias_ptr),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(_) | Isa::Avx512(_) => {
            // SAFETY: both tokens prove AVX2+FMA; the asserts above bound
            // every read and write (panels == 1 here: tile_shape is 1).
            unsafe {
                match mr {
                    1 => emulated_avx2::<1>(kpc, ap, a_pstride, bp, cp, bias_ptr),
                    2 => emulated_avx2::<2>(kpc, ap, a_pstride, bp, cp, bias_ptr),
                    3 => emulated_avx2::<3>(kpc, ap, a_pstride, bp, cp, bias_ptr),
                    _ => emulated_avx2::<4>(kpc, ap, a_pstride, bp, cp, bias_ptr),
                }
            }
        }
        _ => emulated_scalar(mr, kpc, a, a_pstride, b, c, bias),
    }
}

/// `x` with a denormal magnitude flushed to a zero of the same sign.
fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// The emulation in portable code: `f32::mul_add` is the single rounding
/// (a software fma where the CPU has none: slow, but exact).
fn emulated_scalar(mr: usize, kpc: usize, a: &[u32], ps: usize, b: &[u16], c: &mut [f32], bias: Option<&[f32]>) {
    let hi = |x: u32| f32::from_bits(x & 0xffff_0000);
    let lo = |x: u32| f32::from_bits(x << 16);
    for r in 0..mr {
        for j in 0..NR {
            let mut acc = bias.map_or(c[r * NR + j], |s| s[j]);
            for kp in 0..kpc {
                let pair = a[(kp / PAIRS) * ps + r * PAIRS + kp % PAIRS];
                let w_even = f32::from_bits(u32::from(b[kp * 2 * NR + 2 * j]) << 16);
                let w_odd = f32::from_bits(u32::from(b[kp * 2 * NR + 2 * j + 1]) << 16);
                acc = flush(hi(pair).mul_add(w_odd, acc));
                acc = flush(lo(pair).mul_add(w_even, acc));
            }
            c[r * NR + j] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn native<const M: usize, const P: usize>(
    kpc: usize,
    a: *const u32,
    ps: usize,
    b: *const u16,
    b_ps: usize,
    c: *mut f32,
    c_ps: usize,
    bias: *const f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: `tile` checked that every offset used below is in bounds of the
    // slices these pointers came from; the target features are enabled.
    // The transmutes reinterpret 512 bits of integers as 32 bf16 lanes.
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
        let mut kp = 0;
        while kp < kpc {
            let ap = a.add((kp / PAIRS) * ps);
            let bk = b.add(kp * 2 * NR);
            macro_rules! step {
                ($j:expr) => {{
                    let mut bv: [__m512bh; P] = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); P];
                    for (q, v) in bv.iter_mut().enumerate() {
                        *v = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                            bk.add(q * b_ps + $j * 2 * NR) as *const _,
                        ));
                        if M >= super::avx512::PREFETCH_MIN_ROWS {
                            // As the f32 kernel (`avx512::PREFETCH_ROWS`):
                            // a prefetch never faults, and wrapping_add
                            // makes no out-of-bounds pointer claim.
                            let ahead = bk.wrapping_add(q * b_ps + ($j + super::avx512::PREFETCH_ROWS) * 2 * NR);
                            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                        }
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        let av =
                            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*ap.add(r * PAIRS + $j) as i32));
                        for (q, v) in row.iter_mut().enumerate() {
                            *v = _mm512_dpbf16_ps(*v, av, bv[q]);
                        }
                    }
                }};
            }
            let len = (kpc - kp).min(PAIRS);
            if len == PAIRS {
                for j in 0..PAIRS {
                    step!(j);
                }
            } else {
                for j in 0..len {
                    step!(j);
                }
            }
            kp += PAIRS;
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, v) in row.iter().enumerate() {
                _mm512_storeu_ps(c.add(q * c_ps + r * NR), *v);
            }
        }
    }
}

/// The emulation on AVX2+FMA, one panel: a bf16 weight is the top half of
/// an f32, so the odd pair member is `w & 0xffff0000` and the even one
/// `w << 16`, both exact.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn emulated_avx2<const M: usize>(
    kpc: usize,
    a: *const u32,
    ps: usize,
    b: *const u16,
    c: *mut f32,
    bias: *const f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: `tile` checked every offset used below; features enabled.
    unsafe {
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x8000_0000u32 as i32));
        let min_normal = _mm256_set1_ps(f32::MIN_POSITIVE);
        // Keeps the sign always and the magnitude unless it is denormal
        // (NaN compares "not less" and is kept whole).
        let flush = |x: __m256| {
            let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(_mm256_and_ps(x, abs), min_normal);
            _mm256_and_ps(x, _mm256_or_ps(keep, sign))
        };
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
        for kp in 0..kpc {
            let ap = a.add((kp / PAIRS) * ps + kp % PAIRS);
            let w = [
                _mm256_loadu_si256(b.add(kp * 2 * NR) as *const __m256i),
                _mm256_loadu_si256(b.add(kp * 2 * NR + NR) as *const __m256i),
            ];
            let odd = w.map(|v| _mm256_castsi256_ps(_mm256_and_si256(v, high)));
            let even = w.map(|v| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)));
            for (r, row) in acc.iter_mut().enumerate() {
                let pair = *ap.add(r * PAIRS);
                let a_odd = _mm256_set1_ps(f32::from_bits(pair & 0xffff_0000));
                let a_even = _mm256_set1_ps(f32::from_bits(pair << 16));
                for h in 0..2 {
                    row[h] = flush(_mm256_fmadd_ps(a_odd, odd[h], row[h]));
                    row[h] = flush(_mm256_fmadd_ps(a_even, even[h], row[h]));
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * NR), row[0]);
            _mm256_storeu_ps(c.add(r * NR + 8), row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::isa::CpuIsa;
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Operands drawn to exercise every corner the instruction defines:
    /// ordinary magnitudes, products and sums that underflow into the
    /// denormal range (flushed), cancellation, and large magnitudes.
    fn bf16_operand(r: u64, class: u64) -> u16 {
        let sign = (r as u16) & 0x8000;
        let man = ((r >> 16) as u16) & 0x7f;
        let exp = match class % 4 {
            0 => 120 + (r >> 24) % 16,
            1 => 1 + (r >> 24) % 70,
            2 => 60 + (r >> 24) % 125,
            // Large, but no product or sum of 74 products overflows.
            _ => 147 + (r >> 24) % 40,
        } as u16;
        sign | (exp << 7) | man
    }

    /// Every path this CPU has computes the same bits as every other, on
    /// random operands over the whole range, for every tile shape; with
    /// AVX512_BF16 present this is the emulation against `vdpbf16ps`.
    #[test]
    fn every_path_gives_the_bits_of_the_instruction() {
        let isas: Vec<Isa> = CpuIsa::available()
            .into_iter()
            .map(|i| Isa::select(i).unwrap())
            .collect();
        if !isas.iter().any(|i| matches!(i, Isa::Avx512(t) if t.has_bf16())) {
            println!(
                "SKIP part: this CPU lacks AVX512_BF16, so the emulation is compared across the paths it has \
                 ({}), not against vdpbf16ps",
                isas.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
            );
        }
        let mut next = rng(0x5eed_bf16);
        let kpc: usize = 37;
        let m = 8;
        let ps = m * PAIRS + 3;
        for class in 0..4u64 {
            let a: Vec<u32> = (0..kpc.div_ceil(PAIRS) * ps)
                .map(|_| {
                    let r = next();
                    u32::from(bf16_operand(r, class)) | (u32::from(bf16_operand(r >> 32, class)) << 16)
                })
                .collect();
            let b_ps = kpc * 2 * NR + 32;
            let b: Vec<u16> = (0..8 * b_ps).map(|_| bf16_operand(next(), class)).collect();
            let bias: Vec<f32> = (0..8 * NR)
                .map(|_| flush(f32::from_bits((next() as u32) & 0x8fff_ffff)))
                .collect();
            let mut results = Vec::new();
            for &isa in &isas {
                let c_ps = m * NR;
                let mut c = vec![0.0f32; 8 * c_ps];
                // Columns one panel at a time, rows in tiles of the path's
                // widest shape, to compare every kernel instance.
                for q in 0..8 {
                    let mut r = 0;
                    while r < m {
                        let mr = (m - r).min(max_rows(isa));
                        tile(
                            isa,
                            mr,
                            1,
                            kpc,
                            &a[r * PAIRS..],
                            ps,
                            &b[q * b_ps..],
                            b_ps,
                            &mut c[q * c_ps + r * NR..],
                            c_ps,
                            Some(&bias[q * NR..]),
                        );
                        r += mr;
                    }
                }
                results.push((isa.name(), c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
            }
            for (name, bits) in &results[1..] {
                assert!(
                    bits == &results[0].1,
                    "class {class}: {name} differs from {}",
                    results[0].0
                );
            }
        }
    }

    /// Every path rounds a Linear's input to the same pairs as the scalar
    /// definition, specials included.
    #[test]
    fn round_pairs_is_the_same_on_every_path() {
        let mut next = rng(99);
        let mut src: Vec<f32> = (0..2 * 1003).map(|_| f32::from_bits(next() as u32)).collect();
        src.extend([
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NAN,
            1.0 + 2f32.powi(-8),
            1.5,
        ]);
        let want: Vec<u32> = src
            .chunks_exact(2)
            .map(|p| u32::from(f32_to_bf16_bits(p[0])) | (u32::from(f32_to_bf16_bits(p[1])) << 16))
            .collect();
        for isa in CpuIsa::available().into_iter().map(|i| Isa::select(i).unwrap()) {
            let mut got = vec![0u32; want.len()];
            round_pairs(isa, &src, &mut got);
            assert_eq!(got, want, "{}", isa.name());
        }
    }

    /// The multi-panel native tiles give the bits of one panel at a time.
    #[test]
    fn native_wide_tiles_match_single_panels() {
        let Ok(isa @ Isa::Avx512(t)) = Isa::select(CpuIsa::Avx512) else {
            println!("SKIP: this CPU lacks AVX-512");
            return;
        };
        if !t.has_bf16() {
            println!("SKIP: this CPU lacks AVX512_BF16");
            return;
        }
        let mut next = rng(77);
        let kpc: usize = 29;
        for mr in 1..=max_rows(isa) {
            let panels = tile_shape(isa, mr);
            let ps = mr * PAIRS;
            let a: Vec<u32> = (0..kpc.div_ceil(PAIRS) * ps)
                .map(|_| u32::from(bf16_operand(next(), 0)) | (u32::from(bf16_operand(next(), 0)) << 16))
                .collect();
            let b_ps = kpc * 2 * NR;
            let b: Vec<u16> = (0..panels * b_ps).map(|_| bf16_operand(next(), 0)).collect();
            let c_ps = mr * NR + 5;
            let init: Vec<f32> = (0..panels * c_ps).map(|i| i as f32 * 0.25).collect();
            let mut wide = init.clone();
            tile(isa, mr, panels, kpc, &a, ps, &b, b_ps, &mut wide, c_ps, None);
            let mut one = init.clone();
            for q in 0..panels {
                tile(
                    isa,
                    mr,
                    1,
                    kpc,
                    &a,
                    ps,
                    &b[q * b_ps..],
                    b_ps,
                    &mut one[q * c_ps..],
                    c_ps,
                    None,
                );
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&wide), bits(&one), "mr={mr}");
        }
    }
}
