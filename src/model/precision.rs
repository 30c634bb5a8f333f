//! Weight precision: the `model.weight_precision` setting, IEEE 754 binary16
//! and bfloat16 conversions (round to nearest, ties to even), written out in
//! software so they are the same on every CPU and need no dependency.
//!
//! Owns: [`WeightPrecision`], [`f32_to_f16_bits`], [`f16_bits_to_f32`],
//! [`f32_to_bf16_bits`], [`bf16_bits_to_f32`] and the `round_*` helpers (what
//! a reduced-precision backend computes with, as f32 weights, for reference
//! forwards in tests). Must not touch: packing or kernels (the CPU backend's
//! `pack`/`simd` use these conversions).

use serde::{Deserialize, Serialize};

use super::MoeWeights;

/// How the experts' Linear weights are held in memory. The router, biases and
/// LayerNorm parameters stay f32 either way; activations and accumulation are
/// always f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightPrecision {
    /// The checkpoint's f32 weights as they are.
    #[default]
    F32,
    /// Expert weights rounded once, at load time, to IEEE half precision (round
    /// to nearest even): half the memory and bandwidth, about 1e-3 relative
    /// error per weight.
    F16,
    /// Expert weights rounded once, at load time, to bfloat16 (round to
    /// nearest even, subnormals flushed to zero), and each expert Linear's
    /// input rounded to bfloat16 too; products summed in f32 (`vdpbf16ps`
    /// where the CPU has AVX512_BF16, a bit-identical emulation elsewhere).
    /// Half the memory and bandwidth, twice the multiply rate; about 4e-3
    /// relative error per operand.
    Bf16,
}

impl WeightPrecision {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightPrecision::F32 => "f32",
            WeightPrecision::F16 => "f16",
            WeightPrecision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for WeightPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WeightPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(WeightPrecision::F32),
            "f16" => Ok(WeightPrecision::F16),
            "bf16" => Ok(WeightPrecision::Bf16),
            other => Err(format!("expected \"f32\", \"f16\" or \"bf16\", got {other:?}")),
        }
    }
}

/// Largest finite f16 magnitude.
pub const F16_MAX: f32 = 65504.0;

/// `x` rounded to the nearest binary16 (ties to even), as its bits. Values
/// past the f16 range become infinities, NaN stays NaN (quiet), values below
/// half the smallest subnormal become signed zeros. Bit-identical to the
/// F16C instruction `vcvtps2ph` with round-to-nearest.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x007f_ffff;
    if exp == 0xff {
        // Infinity, or NaN (kept quiet, top payload bits kept).
        return sign | 0x7c00 | if man != 0 { 0x0200 | (man >> 13) as u16 } else { 0 };
    }
    // Rounds `full >> shift` to nearest, ties to even.
    let round = |full: u32, shift: u32| -> u32 {
        let q = full >> shift;
        let rem = full & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        }
    };
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal in f16 (or zero): value / 2^-24, rounded.
        if e < -10 {
            return sign;
        }
        let full = man | 0x0080_0000;
        return sign | round(full, (14 - e) as u32) as u16;
    }
    // Normal: a carry out of the mantissa bumps the exponent (up to infinity),
    // which is the correctly rounded result.
    sign | round(((e as u32) << 23) | man, 13) as u16
}

/// The f32 value of binary16 bits `h` (exact: every f16 is an f32).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x03ff) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: man * 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            sign | v.to_bits()
        }
        // Infinity, or NaN made quiet (as `vcvtph2ps` does).
        0x1f if man == 0 => sign | 0x7f80_0000,
        0x1f => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// `x` rounded through f16 and back.
pub fn round_to_f16(x: f32) -> f32 {
    f16_bits_to_f32(f32_to_f16_bits(x))
}

/// `x` rounded to the nearest bfloat16 (ties to even), as its bits, with the
/// conventions of the AVX512_BF16 instructions: an f32 subnormal input
/// becomes a signed zero (they treat denormals as zero), a result that
/// rounds past the largest finite bfloat16 becomes an infinity, NaN stays
/// NaN (quiet).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        return (b >> 16) as u16 & 0x8000;
    }
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    // Round the low 16 bits away, ties to even; a carry into the exponent
    // is the correctly rounded result (up to infinity).
    let rounded = b + 0x7fff + ((b >> 16) & 1);
    (rounded >> 16) as u16
}

/// The f32 value of bfloat16 bits `h` (exact: bfloat16 is f32's top half).
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `x` rounded through bfloat16 and back.
pub fn round_to_bf16(x: f32) -> f32 {
    bf16_bits_to_f32(f32_to_bf16_bits(x))
}

/// The weights an f16-weight backend computes with, as f32: every expert
/// Linear weight rounded through f16; router, biases and LayerNorm untouched.
/// (For reference forwards in tests and benchmarks.)
pub fn round_expert_weights_to_f16(weights: &mut MoeWeights) {
    for expert in &mut weights.experts {
        let linears = expert
            .blocks
            .iter_mut()
            .map(|b| &mut b.linear)
            .chain([&mut expert.output]);
        for l in linears {
            l.weight.iter_mut().for_each(|w| *w = round_to_f16(*w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference RNE through f64 arithmetic, independent of the bit code.
    fn slow(x: f32) -> f32 {
        if !x.is_finite() {
            return x;
        }
        let ax = x.abs() as f64;
        // Quantum of the binade (subnormal quantum 2^-24 below 2^-14).
        let q = if ax < 2f64.powi(-14) {
            2f64.powi(-24)
        } else {
            2f64.powi(ax.log2().floor() as i32 - 10)
        };
        let n = ax / q;
        let r = n.round();
        let r = if (n - n.floor() - 0.5).abs() == 0.0 && r % 2.0 != 0.0 {
            r - 1.0
        } else {
            r
        };
        let v = r * q;
        let v = if v > F16_MAX as f64 { f64::INFINITY } else { v };
        (v as f32).copysign(x)
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_flushes_subnormals() {
        // Every bfloat16 that is not a subnormal or NaN converts back to itself.
        for h in 0..=u16::MAX {
            let x = bf16_bits_to_f32(h);
            if x.is_nan() {
                assert!(bf16_bits_to_f32(f32_to_bf16_bits(x)).is_nan());
            } else if h & 0x7f80 == 0 {
                assert_eq!(f32_to_bf16_bits(x), h & 0x8000, "{h:#06x}");
            } else {
                assert_eq!(f32_to_bf16_bits(x), h, "{h:#06x}");
            }
        }
        // Against f64 arithmetic: the nearest of the two neighbours, ties even.
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = f32::from_bits((s as u32 & 0x807f_ffff) | (((s >> 32) as u32 % 250 + 2) << 23));
            let lo = f32::from_bits(x.to_bits() & 0xffff_0000);
            let hi = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000);
            let (dl, dh) = ((x as f64 - lo as f64).abs(), (hi as f64 - x as f64).abs());
            let want = if dl < dh || (dl == dh && (lo.to_bits() >> 16) & 1 == 0) {
                lo
            } else {
                hi
            };
            assert_eq!(round_to_bf16(x).to_bits(), want.to_bits(), "{x:e}");
        }
        assert_eq!(f32_to_bf16_bits(-1e-39), 0x8000);
        assert!(round_to_bf16(f32::MAX).is_infinite());
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    }

    #[test]
    fn round_trip_every_f16() {
        for h in 0..=u16::MAX {
            let x = f16_bits_to_f32(h);
            if x.is_nan() {
                assert!(f16_bits_to_f32(f32_to_f16_bits(x)).is_nan());
            } else {
                assert_eq!(f32_to_f16_bits(x), h, "{h:#06x} -> {x}");
            }
        }
    }

    #[test]
    fn rounds_to_nearest_even() {
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut xs: Vec<f32> = (0..200_000)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Exponents around the whole f16 range.
                f32::from_bits((s as u32 & 0x807f_ffff) | (((s >> 32) as u32 % 50 + 98) << 23))
            })
            .collect();
        // Ties and range edges.
        xs.extend([
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            65504.0,
            65519.99,
            65520.0,
            2f32.powi(-25),
        ]);
        xs.extend([
            2f32.powi(-25) * 1.000_001,
            2f32.powi(-24) * 1.5,
            2f32.powi(-14) * (1.0 - 2f32.powi(-12)),
        ]);
        for x in xs {
            let got = round_to_f16(x);
            assert_eq!(
                got.to_bits(),
                slow(x).to_bits(),
                "{x:e}: got {got:e}, want {:e}",
                slow(x)
            );
        }
        assert_eq!(round_to_f16(65519.99), 65504.0);
        assert!(round_to_f16(65520.0).is_infinite());
    }
}
