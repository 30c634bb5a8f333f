//! Instruction-set selection for the CPU kernels: the `workers.cpu_isa`
//! setting ([`CpuIsa`]), run-time detection, and the proof tokens the safe
//! kernel wrappers in `simd` demand ([`Isa`]).
//!
//! Owns: which features each path needs and the refusal that names a missing
//! one. Must not touch: arithmetic (see `simd`), packing or dispatch.
//!
//! Paths, fastest first: `avx512` (AVX-512 F/BW/VL matrix kernels, plus the
//! AVX2 LayerNorm/GELU passes, so both paths give the same bits), with
//! `vdpbf16ps` for the bf16 mode where AVX512_BF16 exists; `avx2` (AVX2, FMA,
//! F16C); `scalar` (portable). Every x86 CPU with AVX-512 also has AVX2, FMA
//! and F16C; the detection checks them all rather than assume it.

use serde::{Deserialize, Serialize};

/// The `workers.cpu_isa` setting: `auto` picks the best path this CPU has;
/// the others force a lower path (and refuse a CPU that lacks it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuIsa {
    #[default]
    Auto,
    Avx512,
    Avx2,
    Scalar,
}

impl CpuIsa {
    pub const ALL: [CpuIsa; 4] = [CpuIsa::Auto, CpuIsa::Avx512, CpuIsa::Avx2, CpuIsa::Scalar];

    pub fn as_str(self) -> &'static str {
        match self {
            CpuIsa::Auto => "auto",
            CpuIsa::Avx512 => "avx512",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Scalar => "scalar",
        }
    }

    /// The CPU features this path needs (none for `auto` and `scalar`).
    fn required(self) -> &'static [&'static str] {
        match self {
            CpuIsa::Auto | CpuIsa::Scalar => &[],
            CpuIsa::Avx2 => &AVX2_FEATURES,
            CpuIsa::Avx512 => &AVX512_FEATURES,
        }
    }

    /// The first feature this path needs that the CPU lacks, if any.
    pub fn missing_feature(self) -> Option<&'static str> {
        self.required().iter().copied().find(|f| !has_feature(f))
    }

    /// The paths this CPU can run, best first (`scalar` always).
    pub fn available() -> Vec<CpuIsa> {
        [CpuIsa::Avx512, CpuIsa::Avx2, CpuIsa::Scalar]
            .into_iter()
            .filter(|i| i.missing_feature().is_none())
            .collect()
    }
}

impl std::fmt::Display for CpuIsa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CpuIsa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuIsa::ALL
            .into_iter()
            .find(|i| i.as_str() == s)
            .ok_or_else(|| format!("expected \"auto\", \"avx512\", \"avx2\" or \"scalar\", got {s:?}"))
    }
}

const AVX2_FEATURES: [&str; 3] = ["avx2", "fma", "f16c"];
const AVX512_FEATURES: [&str; 6] = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"];

/// Run-time detection of one feature name (the names `/proc/cpuinfo` and
/// `is_x86_feature_detected!` share, except `avx512bf16`).
fn has_feature(name: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        match name {
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "f16c" => has!("f16c"),
            "avx512f" => has!("avx512f"),
            "avx512bw" => has!("avx512bw"),
            "avx512vl" => has!("avx512vl"),
            "avx512bf16" => has!("avx512bf16"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        false
    }
}

/// Proof that AVX2, FMA and F16C were detected at run time. The private
/// field means only [`Isa::select`] can make one, which is what makes the
/// safe wrappers in `simd` sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2Fma(());

/// Proof that AVX-512 F/BW/VL (and AVX2, FMA, F16C) were detected;
/// `bf16` says whether AVX512_BF16 (`vdpbf16ps`) was too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512 {
    bf16: bool,
    avx2: Avx2Fma,
}

impl Avx512 {
    pub(crate) fn has_bf16(self) -> bool {
        self.bf16
    }

    /// Every AVX-512 CPU path also proves the AVX2 one (LayerNorm and GELU
    /// run the AVX2 code on both, so their bits cannot differ).
    pub(crate) fn avx2(self) -> Avx2Fma {
        self.avx2
    }
}

/// The kernels' instruction set, chosen once per backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Portable code (plain mul + add, no fusing, software f16 expansion).
    Scalar,
    /// AVX2 + FMA intrinsics, F16C for f16 weights.
    Avx2(Avx2Fma),
    /// AVX-512 matrix kernels; AVX2 for the element-wise passes.
    Avx512(Avx512),
}

/// A forced path this CPU cannot run: the setting and the missing feature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "workers.cpu_isa = \"{choice}\" needs the CPU feature `{missing}`, which this CPU lacks (available: {available})"
)]
pub struct IsaUnavailable {
    pub choice: CpuIsa,
    pub missing: &'static str,
    pub available: String,
}

impl Isa {
    /// The path `choice` names (`auto`: the best available).
    pub(crate) fn select(choice: CpuIsa) -> Result<Isa, IsaUnavailable> {
        if let Some(missing) = choice.missing_feature() {
            let available = CpuIsa::available()
                .iter()
                .map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(IsaUnavailable {
                choice,
                missing,
                available,
            });
        }
        let best = match choice {
            CpuIsa::Auto => CpuIsa::available()[0],
            c => c,
        };
        Ok(match best {
            CpuIsa::Avx512 => Isa::Avx512(Avx512 {
                bf16: has_feature("avx512bf16"),
                avx2: Avx2Fma(()),
            }),
            CpuIsa::Avx2 => Isa::Avx2(Avx2Fma(())),
            CpuIsa::Scalar | CpuIsa::Auto => Isa::Scalar,
        })
    }

    /// The label reported in `/healthz`, metadata and `tokitai_model_info`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2(_) => "avx2",
            Isa::Avx512(a) if a.bf16 => "avx512_bf16",
            Isa::Avx512(_) => "avx512",
        }
    }

    /// The AVX2 proof for the element-wise passes, where the path has one.
    pub(crate) fn avx2(self) -> Option<Avx2Fma> {
        match self {
            Isa::Scalar => None,
            Isa::Avx2(t) => Some(t),
            Isa::Avx512(a) => Some(a.avx2()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_values_are_named() {
        for i in CpuIsa::ALL {
            assert_eq!(i.as_str().parse::<CpuIsa>().unwrap(), i);
        }
        assert!("avx1024".parse::<CpuIsa>().unwrap_err().contains("avx1024"));
    }

    #[test]
    fn scalar_and_auto_always_select_and_forced_paths_need_their_features() {
        assert_eq!(Isa::select(CpuIsa::Scalar).unwrap(), Isa::Scalar);
        let auto = Isa::select(CpuIsa::Auto).unwrap();
        assert_eq!(auto.name(), Isa::select(CpuIsa::available()[0]).unwrap().name());
        for forced in [CpuIsa::Avx2, CpuIsa::Avx512] {
            match forced.missing_feature() {
                None => assert!(Isa::select(forced).is_ok()),
                Some(f) => {
                    let e = Isa::select(forced).unwrap_err().to_string();
                    assert!(e.contains(f) && e.contains("workers.cpu_isa"), "{e}");
                }
            }
        }
    }
}
