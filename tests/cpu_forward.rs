//! CPU backend tests: the upstream fixtures (both LayerNorm modes), the
//! in-crate reference forward on synthetic weights, and batch invariance
//! (bit-identical rows whatever the batch, position, companions, threads).
//!
//! Owns: nothing but tests. Must not touch: fixtures (read-only).

mod common;

use std::sync::OnceLock;

use common::{Fixture, LOGIT_TOL, ROUTER_TOL};
use proptest::prelude::*;
use tokitai_serve::backend::cpu::{CpuBackend, CpuOptions, SplitPolicy};
use tokitai_serve::backend::{Backend, ForwardOutput, SessionConfig, reference};
use tokitai_serve::model::synth::synth_weights;
use tokitai_serve::model::{Dims, LayerNormMode, ModelSize};

fn options() -> Vec<CpuOptions> {
    let mut v = vec![];
    for force_scalar in [false, true] {
        for split in [SplitPolicy::Auto, SplitPolicy::Rows, SplitPolicy::Panels] {
            v.push(CpuOptions { force_scalar, split });
        }
    }
    v
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
    let fixture = Fixture::load(name);
    let weights = fixture.weights();
    let input = fixture.flat_inputs();
    let n = fixture.inputs.len();
    let rw = flat(&fixture.router_weights);
    for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
        let want = flat(fixture.expected_logits(mode));
        for opts in options() {
            let backend = CpuBackend::with_options(weights.clone(), mode, opts);
            for threads in [1, 2] {
                let out = run(&backend, threads, &input);
                let what = format!("{name} {mode} {opts:?} threads={threads}");
                assert_eq!(out.n_rows, n);
                let d = max_abs_diff(&out.logits, want.iter().copied());
                assert!(d <= LOGIT_TOL, "{what}: max |logit diff| {d:e}");
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
}

#[test]
fn fixture_nano_s11_matches_upstream() {
    check_fixture("nano-s11");
}

#[test]
fn fixture_nano_s12_matches_upstream() {
    check_fixture("nano-s12");
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
        for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
            let want = reference::forward(&weights, mode, &input);
            for opts in options() {
                let backend = CpuBackend::with_options(weights.clone(), mode, opts);
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
    nano: Vec<CpuBackend>,
    odd: Vec<CpuBackend>,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let make = |dims: Dims| {
            options()
                .into_iter()
                .map(|o| CpuBackend::with_options(synth_weights(dims, 5), LayerNormMode::Stored, o))
                .collect()
        };
        Models {
            nano: make(Dims::for_size(ModelSize::Nano)),
            odd: make(odd_dims()),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A row's outputs are bit-identical alone and inside any batch.
    #[test]
    fn batch_invariance(
        odd in any::<bool>(),
        which in 0usize..6,
        batch in 1usize..=512,
        pos_frac in 0.0f64..1.0,
        seed in any::<u64>(),
        threads in 1usize..=4,
    ) {
        let m = models();
        let backend = if odd { &m.odd[which] } else { &m.nano[which] };
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
