//! CPU backend tests: the upstream fixtures (both LayerNorm modes, f32 and
//! f16 weights), the in-crate reference forward on synthetic weights (Nano,
//! an odd shape, and a few rows of Medium), and batch invariance
//! (bit-identical rows whatever the batch, position, companions, threads), in
//! both weight precisions.
//!
//! Owns: nothing but tests. Must not touch: fixtures (read-only).

use std::sync::OnceLock;

use crate::common::{Fixture, LOGIT_TOL, ROUTER_TOL};
use proptest::prelude::*;
use tokitai_serve::backend::cpu::{CpuBackend, CpuIsa, CpuOptions, SplitPolicy};
use tokitai_serve::backend::{Backend, ForwardOutput, SessionConfig, reference};
use tokitai_serve::model::precision::round_expert_weights_to_f16;
use tokitai_serve::model::synth::synth_weights;
use tokitai_serve::model::{Dims, LayerNormMode, ModelSize, MoeWeights, WeightPrecision};

/// Largest accepted |logit - fp32 oracle| with f16 weights (issue 12).
const F16_LOGIT_TOL: f64 = 5e-3;

/// Every instruction set this CPU has (avx512, avx2, scalar: the ones it
/// lacks are said once on stderr), each with every split policy.
fn options_in(precision: WeightPrecision) -> Vec<CpuOptions> {
    let mut v = vec![];
    for isa in isas() {
        for split in [SplitPolicy::Auto, SplitPolicy::Rows, SplitPolicy::Panels] {
            v.push(CpuOptions { isa, split, precision });
        }
    }
    v
}

/// The forced paths this CPU can run, best first.
fn isas() -> Vec<CpuIsa> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let available = CpuIsa::available();
    SAID.call_once(|| {
        for lacking in [CpuIsa::Avx512, CpuIsa::Avx2].iter().filter(|i| !available.contains(i)) {
            eprintln!(
                "SKIP {lacking} paths: this CPU lacks `{}`; a machine with it runs them",
                lacking.missing_feature().unwrap_or("?")
            );
        }
    });
    available
}

fn backend(weights: MoeWeights, mode: LayerNormMode, opts: CpuOptions) -> CpuBackend {
    CpuBackend::with_options(weights, mode, opts).unwrap()
}

/// The weights an f16 backend computes with, as f32.
fn rounded(weights: &MoeWeights) -> MoeWeights {
    let mut w = weights.clone();
    round_expert_weights_to_f16(&mut w);
    w
}

fn run(backend: &CpuBackend, threads: usize, input: &[f32]) -> ForwardOutput {
    let mut session = backend.create_session(SessionConfig { threads }).unwrap();
    let mut out = ForwardOutput::default();
    session.forward(input, &mut out).unwrap();
    out
}

fn max_abs_diff(a: &[f32], b: impl IntoIterator<Item = f64>) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}

/// Rows of a matrix, one after the other.
fn flat(rows: &[Vec<f64>]) -> Vec<f64> {
    rows.iter().flatten().copied().collect()
}

fn check_fixture(name: &str) {
    check_fixture_in(name, WeightPrecision::F32, LOGIT_TOL);
}

/// The fixture in `precision`; returns the largest |logit diff| seen.
fn check_fixture_in(name: &str, precision: WeightPrecision, logit_tol: f64) -> f64 {
    let mut worst = 0.0f64;
    let fixture = Fixture::load(name);
    let weights = fixture.weights();
    let input = fixture.flat_inputs();
    let n = fixture.inputs.len();
    let rw = flat(&fixture.router_weights);
    for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
        let want = flat(fixture.expected_logits(mode));
        for opts in options_in(precision) {
            let backend = backend(weights.clone(), mode, opts);
            assert_eq!(backend.weight_precision(), precision);
            for threads in [1, 2] {
                let out = run(&backend, threads, &input);
                let what = format!("{name} {mode} {opts:?} threads={threads}");
                assert_eq!(out.n_rows, n);
                let d = max_abs_diff(&out.logits, want.iter().copied());
                worst = worst.max(d);
                assert!(d <= logit_tol, "{what}: max |logit diff| {d:e}");
                let d = max_abs_diff(&out.router_weights, rw.iter().copied());
                assert!(d <= ROUTER_TOL, "{what}: max |router weight diff| {d:e}");
                let k = backend.dims().top_k;
                for (row, &s) in fixture.top_k_strict.iter().enumerate() {
                    if s {
                        let got: Vec<usize> = out.top_k[row * k..(row + 1) * k].iter().map(|&e| e as usize).collect();
                        assert_eq!(got, fixture.top_k_indices[row], "{what}: top_k of row {row}");
                    }
                }
            }
        }
    }
    worst
}

#[test]
fn fixture_nano_s11_matches_upstream() {
    check_fixture("nano-s11");
}

#[test]
fn fixture_nano_s12_matches_upstream() {
    check_fixture("nano-s12");
}

/// f16 weights against the fp32 oracle: logits within 5e-3, router weights
/// within 1e-6 (the router is f32), top-k exact on strict rows; both
/// LayerNorm modes, both instruction sets, every split, 1 and 2 threads.
#[test]
fn fixtures_in_f16_stay_close_to_the_fp32_oracle() {
    for name in ["nano-s11", "nano-s12"] {
        let worst = check_fixture_in(name, WeightPrecision::F16, F16_LOGIT_TOL);
        // The measured figure BENCHMARKS.md quotes (`--nocapture` shows it).
        eprintln!("{name}: f16 max |logit - fp32 oracle| = {worst:.3e}");
    }
}

/// Largest accepted |logit - fp32 oracle| in bf16 on the fixtures (weights
/// and each layer's input rounded to bfloat16: about 8 significant bits).
const BF16_LOGIT_TOL: f64 = 3e-2;

/// bf16 against the fp32 oracle: logits within `BF16_LOGIT_TOL`, router
/// weights within 1e-6 (the router stays f32), top-k exact on strict rows;
/// both LayerNorm modes, every instruction set (vdpbf16ps and the
/// emulation), every split, 1 and 2 threads.
#[test]
fn fixtures_in_bf16_stay_close_to_the_fp32_oracle() {
    for name in ["nano-s11", "nano-s12"] {
        let worst = check_fixture_in(name, WeightPrecision::Bf16, BF16_LOGIT_TOL);
        eprintln!("{name}: bf16 max |logit - fp32 oracle| = {worst:.3e}");
    }
}

/// Shapes that exercise what Nano does not: `k` longer than a cache block
/// (several k blocks per chain), a hidden width that is no multiple of the
/// panel or of any tile's panel group, and two hidden layers.
fn wide_dims() -> Dims {
    Dims {
        input: 96,
        hidden: 600,
        output: 20,
        experts: 4,
        top_k: 2,
        depth: 2,
    }
}

/// The AVX2 and AVX-512 paths give the same bits in every precision (in
/// bf16: `vdpbf16ps` where the CPU has it against the AVX2 emulation):
/// every batch size from one row per expert to many, every split, 1 and 2
/// threads, both LayerNorm modes. A fleet of mixed machines answers alike.
/// (The scalar path's LayerNorm and GELU are its own code, so it is close,
/// not identical; its bf16 kernel is checked bit for bit in `simd::bf16`.)
#[test]
fn every_instruction_set_gives_the_same_bits() {
    let available = isas();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for dims in [Dims::for_size(ModelSize::Nano), odd_dims(), wide_dims()] {
        let weights = synth_weights(dims, 9);
        for precision in [WeightPrecision::F32, WeightPrecision::F16, WeightPrecision::Bf16] {
            let paths: Vec<CpuIsa> = available.iter().copied().filter(|i| *i != CpuIsa::Scalar).collect();
            if paths.len() < 2 {
                eprintln!("SKIP {precision} cross-path identity: this CPU has only {paths:?}");
                continue;
            }
            for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
                for rows in [1, 3, 9, 40, 150] {
                    let input = inputs(rows, dims.input, rows as u64);
                    let mut first: Option<(CpuIsa, ForwardOutput)> = None;
                    for &isa in &paths {
                        for split in [SplitPolicy::Rows, SplitPolicy::Panels] {
                            let opts = CpuOptions { isa, split, precision };
                            let b = backend(weights.clone(), mode, opts);
                            for threads in [1, 2] {
                                let out = run(&b, threads, &input);
                                let Some((isa0, want)) = &first else {
                                    first = Some((isa, out));
                                    continue;
                                };
                                let what = format!(
                                    "{dims:?} {precision} {mode} rows={rows} {isa} vs {isa0} {split:?} t={threads}"
                                );
                                let first_diff = |a: &[u32], b: &[u32]| a.iter().zip(b).position(|(x, y)| x != y);
                                let d = first_diff(&bits(&out.logits), &bits(&want.logits));
                                assert!(d.is_none(), "{what}: logits differ first at {d:?}");
                                assert_eq!(out.router_weights, want.router_weights, "{what}");
                                assert_eq!(out.top_k, want.top_k, "{what}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// bf16 stays close to f32 on synthetic weights of several shapes (the
/// fixtures above check it against the oracle), and its top-k experts are
/// the f32 forward's (the router is f32 in every mode).
#[test]
fn bf16_is_close_to_f32_on_synthetic_weights() {
    for dims in [Dims::for_size(ModelSize::Nano), odd_dims(), wide_dims()] {
        let weights = synth_weights(dims, 13);
        let input = inputs(64, dims.input, 5);
        let f32 = run(
            &backend(weights.clone(), LayerNormMode::Stored, CpuOptions::default()),
            1,
            &input,
        );
        let opts = CpuOptions {
            precision: WeightPrecision::Bf16,
            ..CpuOptions::default()
        };
        let bf = run(&backend(weights, LayerNormMode::Stored, opts), 1, &input);
        let scale = f32.logits.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        let d = max_abs_diff(&bf.logits, f32.logits.iter().map(|x| *x as f64));
        assert!(
            d <= 2e-2 * scale.max(1.0),
            "{dims:?}: bf16 vs f32 max |logit diff| {d:e} (scale {scale:e})"
        );
        assert_eq!(bf.top_k, f32.top_k, "{dims:?}");
        assert_eq!(bf.router_weights, f32.router_weights, "{dims:?}");
    }
}

/// A weight that bf16 cannot hold stops construction, naming the tensor;
/// bf16 halves the resident weights like f16.
#[test]
fn bf16_refuses_weights_past_its_range_and_halves_memory() {
    let dims = Dims::for_size(ModelSize::Nano);
    let bf16 = CpuOptions {
        precision: WeightPrecision::Bf16,
        ..CpuOptions::default()
    };
    let mut ok = synth_weights(dims, 3);
    ok.experts[0].blocks[0].linear.weight[5] = 1e38;
    assert!(CpuBackend::with_options(ok, LayerNormMode::Identity, bf16).is_ok());
    for (value, tensor) in [(f32::MAX, "expert_1.param_4"), (f32::NAN, "expert_1.param_4")] {
        let mut w = synth_weights(dims, 3);
        w.experts[1].blocks[1].linear.weight[17] = value;
        let err = CpuBackend::with_options(w, LayerNormMode::Identity, bf16)
            .err()
            .unwrap_or_else(|| panic!("{value} was accepted"))
            .to_string();
        assert!(err.contains(tensor) && err.contains("not finite in bf16"), "{err}");
    }
    let size = |precision| {
        let opts = CpuOptions {
            precision,
            ..CpuOptions::default()
        };
        backend(synth_weights(dims, 3), LayerNormMode::Identity, opts).weight_bytes()
    };
    let (full, half) = (size(WeightPrecision::F32), size(WeightPrecision::Bf16));
    assert!(
        half * 2 > full && (half as f64) < 0.51 * full as f64,
        "{half} vs {full}"
    );
}

/// Deterministic inputs in about ±2, a few exact zeros and one all-zero row.
fn inputs(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<f32> = (0..rows * width)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            if u < 0.05 { 0.0 } else { 4.0 * u - 2.0 }
        })
        .collect();
    if rows > 3 {
        v[3 * width..4 * width].fill(0.0);
    }
    v
}

fn odd_dims() -> Dims {
    // Nothing a multiple of the 16-column panel, more experts than usual.
    Dims {
        input: 37,
        hidden: 50,
        output: 7,
        experts: 5,
        top_k: 3,
        depth: 1,
    }
}

#[test]
fn matches_reference_on_synthetic_weights() {
    for dims in [Dims::for_size(ModelSize::Nano), odd_dims()] {
        let weights = synth_weights(dims, 7);
        let input = inputs(67, dims.input, 11);
        let weights16 = rounded(&weights);
        for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
            for precision in [WeightPrecision::F32, WeightPrecision::F16] {
                // f16: against the reference on the same f16-rounded weights.
                let ref_weights = match precision {
                    WeightPrecision::F16 => &weights16,
                    _ => &weights,
                };
                let want = reference::forward(ref_weights, mode, &input);
                for opts in options_in(precision) {
                    let backend = backend(weights.clone(), mode, opts);
                    for threads in [1, 3] {
                        let out = run(&backend, threads, &input);
                        let what = format!("{dims:?} {mode} {opts:?} threads={threads}");
                        let d = max_abs_diff(&out.logits, want.logits.iter().map(|x| *x as f64));
                        assert!(d <= 2e-5, "{what}: logits {d:e}");
                        // Routing is computed in the reference's own order: exact.
                        assert_eq!(out.router_weights, want.router_weights, "{what}");
                        assert_eq!(out.top_k, want.top_k, "{what}");
                    }
                }
            }
        }
    }
}

/// An f16 backend is exactly the f32 backend run on the f16-rounded weights:
/// the kernels expand each half to f32 exactly and run the same FMA chains.
#[test]
fn f16_is_bit_identical_to_f32_on_rounded_weights() {
    for dims in [Dims::for_size(ModelSize::Nano), odd_dims()] {
        let weights = synth_weights(dims, 21);
        let weights16 = rounded(&weights);
        let input = inputs(70, dims.input, 4);
        for isa in isas() {
            let f16 = CpuOptions {
                isa,
                precision: WeightPrecision::F16,
                ..CpuOptions::default()
            };
            let f32 = CpuOptions {
                precision: WeightPrecision::F32,
                ..f16
            };
            let a = run(&backend(weights.clone(), LayerNormMode::Stored, f16), 2, &input);
            let b = run(&backend(weights16.clone(), LayerNormMode::Stored, f32), 2, &input);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.logits), bits(&b.logits), "{dims:?} {isa}");
            assert_eq!(a.router_weights, b.router_weights);
            assert_eq!(a.top_k, b.top_k);
        }
    }
}

/// A weight that f16 cannot hold stops construction, naming the tensor; the
/// largest finite values are accepted (65519 rounds down to 65504).
#[test]
fn f16_refuses_weights_past_its_range() {
    let dims = Dims::for_size(ModelSize::Nano);
    let f16 = CpuOptions {
        precision: WeightPrecision::F16,
        ..CpuOptions::default()
    };
    let mut ok = synth_weights(dims, 3);
    ok.experts[0].blocks[0].linear.weight[5] = 65504.0;
    ok.experts[0].output.weight[0] = -65519.0;
    assert!(CpuBackend::with_options(ok, LayerNormMode::Identity, f16).is_ok());
    for (expert, block, value, tensor) in [
        (1, Some(1), 70000.0f32, "expert_1.param_4"),
        (3, None, -65520.0, "expert_3.param_12"),
        (0, Some(0), f32::NAN, "expert_0.param_0"),
        (2, Some(2), f32::INFINITY, "expert_2.param_8"),
    ] {
        let mut w = synth_weights(dims, 3);
        let e = &mut w.experts[expert];
        match block {
            Some(b) => e.blocks[b].linear.weight[17] = value,
            None => e.output.weight[17] = value,
        }
        let err = CpuBackend::with_options(w.clone(), LayerNormMode::Identity, f16)
            .err()
            .unwrap_or_else(|| panic!("{value} in {tensor} was accepted"))
            .to_string();
        assert!(err.contains(tensor) && err.contains("not finite in f16"), "{err}");
        // f32 serves the same weights (a NaN is the checkpoint reader's business).
        assert!(CpuBackend::with_options(w, LayerNormMode::Identity, CpuOptions::default()).is_ok());
    }
    // The router is never converted: a large router weight is fine in f16.
    let mut w = synth_weights(dims, 3);
    w.router.weight[0] = 1e6;
    assert!(CpuBackend::with_options(w, LayerNormMode::Identity, f16).is_ok());
}

#[test]
fn f16_halves_the_resident_weights() {
    let dims = Dims::for_size(ModelSize::Nano);
    let size = |precision| {
        let opts = CpuOptions {
            precision,
            ..CpuOptions::default()
        };
        backend(synth_weights(dims, 3), LayerNormMode::Identity, opts).weight_bytes()
    };
    let (full, half) = (size(WeightPrecision::F32), size(WeightPrecision::F16));
    // Biases stay f32, so a little over half.
    assert!(
        half * 2 > full && (half as f64) < 0.51 * full as f64,
        "{half} vs {full}"
    );
}

#[test]
fn describe_and_errors() {
    let dims = Dims::for_size(ModelSize::Nano);
    let backend = CpuBackend::new(synth_weights(dims, 1), LayerNormMode::Identity);
    assert_eq!(backend.name(), "cpu");
    assert!(backend.describe().starts_with("cpu ("), "{}", backend.describe());
    let mut s = backend.create_session(SessionConfig { threads: 2 }).unwrap();
    let mut out = ForwardOutput::default();
    assert!(s.forward(&vec![0.0; dims.input - 1], &mut out).is_err());
    s.forward(&[], &mut out).unwrap();
    assert_eq!(out.n_rows, 0);
    assert!(out.logits.is_empty());
    // Reuse after a larger batch: outputs sized to the new batch.
    s.forward(&inputs(40, dims.input, 3), &mut out).unwrap();
    s.forward(&inputs(2, dims.input, 3), &mut out).unwrap();
    assert_eq!(
        (out.logits.len(), out.router_weights.len(), out.top_k.len()),
        (2 * dims.output, 2 * dims.experts, 2 * dims.top_k)
    );
}

struct Models {
    /// `options_in` in f32, then f16, then bf16.
    nano: Vec<CpuBackend>,
    odd: Vec<CpuBackend>,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let make = |dims: Dims| {
            [WeightPrecision::F32, WeightPrecision::F16, WeightPrecision::Bf16]
                .into_iter()
                .flat_map(options_in)
                .map(|o| backend(synth_weights(dims, 5), LayerNormMode::Stored, o))
                .collect()
        };
        Models {
            nano: make(Dims::for_size(ModelSize::Nano)),
            odd: make(odd_dims()),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A row's outputs are bit-identical alone and inside any batch, in
    /// every precision, on every instruction set and split.
    #[test]
    fn batch_invariance(
        odd in any::<bool>(),
        which in any::<prop::sample::Index>(),
        batch in 1usize..=512,
        pos_frac in 0.0f64..1.0,
        seed in any::<u64>(),
        threads in 1usize..=4,
    ) {
        let m = models();
        let backends = if odd { &m.odd } else { &m.nano };
        let backend = &backends[which.index(backends.len())];
        let width = backend.dims().input;
        let probe = inputs(1, width, seed ^ 0xABCD);
        let mut batch_in = inputs(batch, width, seed);
        let pos = ((batch as f64 * pos_frac) as usize).min(batch - 1);
        batch_in[pos * width..(pos + 1) * width].copy_from_slice(&probe);
        let alone = run(backend, 1, &probe);
        let all = run(backend, threads, &batch_in);
        let (o, e, k) = (backend.dims().output, backend.dims().experts, backend.dims().top_k);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&all.logits[pos * o..(pos + 1) * o]), bits(&alone.logits));
        prop_assert_eq!(bits(&all.router_weights[pos * e..(pos + 1) * e]), bits(&alone.router_weights));
        prop_assert_eq!(&all.top_k[pos * k..(pos + 1) * k], &alone.top_k[..]);
    }
}
