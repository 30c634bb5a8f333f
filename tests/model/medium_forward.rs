//! A synthetic Medium model (hidden 4096, depth 5, 336 M parameters) through
//! the CPU backend, a few rows checked against the plain reference forward:
//! in f32, and in f16 against the reference run on the same f16-rounded
//! weights. Catches what the Nano-sized tests cannot: k blocking over long
//! rows, many column panels, and panel splits across threads on a model
//! whose experts do not fit in cache.
//!
//! Owns: nothing but this test. It holds about 2.7 GB at its peak (the f32
//! weights and their f16-rounded copy) and runs a few rows only, so a debug
//! build finishes in well under a minute.

use std::time::Instant;

use tokitai_serve::backend::cpu::{CpuBackend, CpuOptions};
use tokitai_serve::backend::{Backend, ForwardOutput, SessionConfig, reference};
use tokitai_serve::model::precision::round_expert_weights_to_f16;
use tokitai_serve::model::synth::synth_weights;
use tokitai_serve::model::{Dims, LayerNormMode, ModelSize, WeightPrecision};

const ROWS: usize = 2;

fn inputs(rows: usize, width: usize) -> Vec<f32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..rows * width)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

fn check(what: &str, got: &ForwardOutput, want: &ForwardOutput, tol: f64) -> f64 {
    let d = max_abs_diff(&got.logits, &want.logits);
    assert!(d <= tol, "{what}: max |logit diff| {d:e}");
    assert_eq!(got.router_weights, want.router_weights, "{what}: router weights");
    assert_eq!(got.top_k, want.top_k, "{what}: top_k");
    d
}

#[test]
fn medium_matches_the_reference_in_f32_and_f16() {
    let t0 = Instant::now();
    let dims = Dims::for_size(ModelSize::Medium);
    assert_eq!(dims.hidden, 4096);
    let weights = synth_weights(dims, 77);
    let mut weights16 = weights.clone();
    round_expert_weights_to_f16(&mut weights16);
    eprintln!("medium: weights in {:?}", t0.elapsed());
    let x = inputs(ROWS, dims.input);
    let mode = LayerNormMode::Stored;
    let want32 = reference::forward(&weights, mode, &x);
    let want16 = reference::forward(&weights16, mode, &x);
    eprintln!("medium: reference in {:?}", t0.elapsed());
    for (precision, w, want) in [
        (WeightPrecision::F32, weights, &want32),
        (WeightPrecision::F16, weights16, &want16),
    ] {
        let options = CpuOptions {
            precision,
            ..CpuOptions::default()
        };
        let backend = CpuBackend::with_options(w, mode, options).unwrap();
        for threads in [1, 2] {
            let mut session = backend.create_session(SessionConfig { threads }).unwrap();
            let mut out = ForwardOutput::default();
            session.forward(&x, &mut out).unwrap();
            // Against the reference: the same math, FMA chains vs mul + add.
            let d = check(&format!("{precision} threads={threads}"), &out, want, 2e-5);
            eprintln!(
                "medium {precision} threads={threads}: max |logit diff| {d:.2e} ({:?})",
                t0.elapsed()
            );
            // One row alone is bit-identical to the same row in the batch.
            let mut alone = ForwardOutput::default();
            session.forward(&x[dims.input..2 * dims.input], &mut alone).unwrap();
            let row = &out.logits[dims.output..2 * dims.output];
            assert_eq!(
                alone.logits.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                row.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
    // f16 stays near f32 on the full-size model too.
    let d = max_abs_diff(&want16.logits, &want32.logits);
    eprintln!("medium: f16-rounded vs f32 reference: max |logit diff| {d:.2e}");
    assert!(d <= 5e-3, "{d:e}");
}
