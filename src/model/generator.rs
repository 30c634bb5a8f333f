//! The deterministic generator behind synthetic weights and optimizer state.
//!
//! Owns: the counter-mode SplitMix64 ([`mix`]), stream keys ([`stream_key`])
//! and the domains they are drawn from, and the uniform fills
//! ([`fill_uniform_at`], [`fill_uniform`]). Must not touch: what the values are
//! used for (see `synth.rs` for weights, `writer.rs` for AdamW `m`/`v`), the
//! checkpoint format, or any kernel. It depends on no other model module, so
//! both of its users can depend on it without depending on each other.
//!
//! The generator is a hand-written SplitMix64 used in counter mode: element
//! `j` of a stream with key `k` is `mix(k + (j + 1) * GAMMA)`. No crate
//! dependency is needed for reproducible values (a `rand` upgrade can never
//! change them), and counter mode lets the fill run in parallel chunks while
//! staying bit-identical whatever the thread count.

use rayon::prelude::*;

/// Stream domain of synthetic weights (keyed by seed and record index).
pub(crate) const DOMAIN_WEIGHTS: u64 = 1;
/// Stream domain of the AdamW first moment `m` (keyed by step and record index).
pub(crate) const DOMAIN_ADAM_M: u64 = 2;
/// Stream domain of the AdamW second moment `v` (keyed by step and record index).
pub(crate) const DOMAIN_ADAM_V: u64 = 3;

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// Elements per parallel work item of a fill.
const CHUNK: usize = 1 << 16;

/// SplitMix64's output function (Steele, Lea, Flood 2014).
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of stream `index` in domain `domain` under `seed`.
pub(crate) fn stream_key(seed: u64, domain: u64, index: u64) -> u64 {
    mix(seed ^ mix(domain.wrapping_mul(GAMMA) ^ mix(index.wrapping_add(GAMMA))))
}

/// Fills `out` with elements `start..start + out.len()` of stream `key`,
/// uniform in `[lo, hi)` (24 random bits each).
#[inline]
pub(crate) fn fill_uniform_at(out: &mut [f32], key: u64, start: u64, lo: f32, hi: f32) {
    let scale = (hi - lo) * (1.0 / 16_777_216.0);
    let mut state = key.wrapping_add(start.wrapping_add(1).wrapping_mul(GAMMA));
    for x in out {
        *x = lo + scale * ((mix(state) >> 40) as f32);
        state = state.wrapping_add(GAMMA);
    }
}

/// [`fill_uniform_at`] over the whole stream, in parallel chunks for large tensors.
pub(crate) fn fill_uniform(out: &mut [f32], key: u64, lo: f32, hi: f32) {
    if out.len() <= CHUNK {
        fill_uniform_at(out, key, 0, lo, hi);
    } else {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| fill_uniform_at(c, key, (i * CHUNK) as u64, lo, hi));
    }
}
