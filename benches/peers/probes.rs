//! The machine's measured limits: peak multiply-add rate (independent FMA
//! chains; AVX-512, AVX2, and `vdpbf16ps` where AVX512_BF16 exists) and
//! DRAM read bandwidth (a streaming read, with software prefetch, of a
//! buffer far larger than the caches), each on 1 and 2 threads.
//!
//! Owns: the probes and their unsafe intrinsics (each behind a run-time
//! feature check). Must not touch: the engine.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// One probe's result: what, on how many threads, and the rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    /// `fma_avx512`, `fma_avx2`, `dpbf16_avx512` (GFLOP/s) or `dram_read` (GB/s).
    pub name: &'static str,
    pub threads: usize,
    pub value: f64,
    pub unit: &'static str,
}

/// Independent accumulators per thread: enough to cover FMA latency x ports
/// (4-5 cycles x 2 pipes on current x86 cores).
const CHAINS: usize = 12;
/// Rounds per probe, the best kept: other processes on a shared machine
/// steal whole rounds, and many short ones find its quiet moments.
pub const ROUNDS: usize = 10;
/// Loop trips between clock reads.
const TRIPS: u64 = 1 << 16;

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::{CHAINS, TRIPS};

    /// `TRIPS x CHAINS` 512-bit FMAs; returns a value the caller keeps.
    #[target_feature(enable = "avx512f")]
    pub fn fma512(seed: f32) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        // Distinct starting values, so no two chains can be merged.
        let mut acc: [__m512; CHAINS] = std::array::from_fn(|i| _mm512_set1_ps(seed + i as f32));
        for _ in 0..TRIPS {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// `TRIPS x CHAINS` 256-bit FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub fn fma256(seed: f32) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc: [__m256; CHAINS] = std::array::from_fn(|i| _mm256_set1_ps(seed + i as f32));
        for _ in 0..TRIPS {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        let mut out = [0.0f32; 8];
        // SAFETY: `out` is 8 f32s, the store is unaligned.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    /// `TRIPS x CHAINS` `vdpbf16ps` (16 lanes x 2 products each).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub fn dpbf16(seed: f32) -> f32 {
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(-1e-3));
        let mut acc: [__m512; CHAINS] = std::array::from_fn(|i| _mm512_set1_ps(seed + i as f32));
        for _ in 0..TRIPS {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// How far ahead (f32s) the read probes prefetch: worth about 10 % over
    /// the hardware prefetcher alone on the machine this was written on.
    const PREFETCH: usize = 2048;

    /// Prefetches the two cache-line pairs `PREFETCH` values past `at`.
    #[inline(always)]
    fn prefetch(buf: &[f32], at: usize) {
        let last = buf.len() - 1;
        for off in [0, 64] {
            let p = buf[(at + PREFETCH + off).min(last)..].as_ptr();
            // SAFETY: SSE is part of x86_64; the address is in `buf` (and a
            // prefetch never faults anyway).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
        }
    }

    /// Sum of `buf` read with 512-bit loads into 8 accumulators.
    #[target_feature(enable = "avx512f")]
    pub fn read512(buf: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 8];
        for (i, c) in buf.chunks_exact(128).enumerate() {
            prefetch(buf, i * 128);
            for (j, v) in acc.iter_mut().enumerate() {
                // SAFETY: `c` has 128 f32s, so 16 at 16*j are in bounds.
                *v = _mm512_add_ps(*v, unsafe { _mm512_loadu_ps(c.as_ptr().add(16 * j)) });
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// Sum of `buf` read with 256-bit loads into 8 accumulators.
    #[target_feature(enable = "avx2")]
    pub fn read256(buf: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (i, c) in buf.chunks_exact(64).enumerate() {
            if i % 2 == 0 {
                prefetch(buf, i * 64);
            }
            for (j, v) in acc.iter_mut().enumerate() {
                // SAFETY: `c` has 64 f32s, so 8 at 8*j are in bounds.
                *v = _mm256_add_ps(*v, unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * j)) });
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        let mut out = [0.0f32; 8];
        // SAFETY: `out` is 8 f32s, the store is unaligned.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
}

fn has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bf16" => {
                std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            "avx2" => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

/// Whether this CPU has AVX512_BF16 (`vdpbf16ps`).
pub fn has_avx512_bf16() -> bool {
    has("avx512bf16")
}

/// Runs `body` on `threads` threads at once for about `dur`, `rounds` times;
/// the best round's total rate (`work` units per call, summed over threads).
fn rate_on_threads(
    threads: usize,
    dur: Duration,
    rounds: usize,
    work: f64,
    body: &(dyn Fn(usize) -> f32 + Sync),
) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..rounds {
        let start = std::sync::Barrier::new(threads);
        let calls: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|i| {
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        let t = Instant::now();
                        let mut n = 0u64;
                        while t.elapsed() < dur {
                            black_box(body(i));
                            n += 1;
                        }
                        (n, t.elapsed())
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    let (n, el) = h.join().expect("probe thread");
                    // Normalise to `dur` so threads that overran count fairly.
                    (n as f64 * dur.as_secs_f64() / el.as_secs_f64()) as u64
                })
                .collect()
        });
        let total: f64 = calls.iter().map(|&n| n as f64).sum::<f64>() * work / dur.as_secs_f64();
        best = best.max(total);
    }
    best
}

/// Peak GFLOP/s of each multiply-add kind this CPU has, on 1 and 2 threads.
pub fn fma_peaks(dur: Duration) -> Vec<Probe> {
    #[cfg(target_arch = "x86_64")]
    type Kernel = (&'static str, &'static str, f64, fn(f32) -> f32);
    #[cfg(target_arch = "x86_64")]
    let kinds: [Kernel; 3] = [
        // SAFETY (all three): each runs only after its feature check below.
        ("fma_avx512", "avx512f", 32.0, |s| unsafe { kernels::fma512(s) }),
        ("fma_avx2", "avx2", 16.0, |s| unsafe { kernels::fma256(s) }),
        ("dpbf16_avx512", "avx512bf16", 64.0, |s| unsafe { kernels::dpbf16(s) }),
    ];
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    for (name, feature, flops_per_op, f) in kinds {
        if !has(feature) {
            println!("probe {name}: skipped (this CPU lacks {feature})");
            continue;
        }
        let work = TRIPS as f64 * CHAINS as f64 * flops_per_op / 1e9;
        for threads in [1, 2] {
            let v = rate_on_threads(threads, dur, ROUNDS, work, &|_| f(black_box(1.0)));
            out.push(Probe {
                name,
                threads,
                value: v,
                unit: "GFLOP/s",
            });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = dur;
    out
}

/// DRAM read GB/s on 1 and 2 threads: each thread streams its own half of
/// a `mib` MiB buffer over and over (best of [`ROUNDS`] rounds of `dur`).
pub fn dram_read(mib: usize, dur: Duration) -> Vec<Probe> {
    // Written once so every page is really mapped (not the shared zero page).
    let buf: Vec<f32> = (0..mib << 18).map(|i| (i & 0xFF) as f32).collect();
    let read = |b: &[f32]| -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if has("avx512f") {
                // SAFETY: AVX-512F was detected.
                return unsafe { kernels::read512(b) };
            }
            if has("avx2") {
                // SAFETY: AVX2 was detected.
                return unsafe { kernels::read256(b) };
            }
        }
        b.iter().sum()
    };
    let mut out = Vec::new();
    for threads in [1usize, 2] {
        // Thread t streams half t, which is many times the caches.
        let share = buf.len() / 2;
        let body = |t: usize| read(&buf[t * share..(t + 1) * share]);
        let bytes = (share * 4) as f64 / 1e9;
        let v = rate_on_threads(threads, dur, ROUNDS, bytes, &body);
        out.push(Probe {
            name: "dram_read",
            threads,
            value: v,
            unit: "GB/s",
        });
    }
    out
}
