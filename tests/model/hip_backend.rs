//! HIP backend tests. Without a device (CI, developer machines) the device
//! tests print why and skip; the backend selection (`auto` falls back to the
//! CPU, `hip` is a clear start-up error) and the stub of a build without the
//! `hip` feature are tested for real, with and without `--features hip`.
//!
//! Owns: nothing but tests. Must not touch: fixtures (read-only).

use crate::common::{FIXTURE_NAMES, Fixture};
use tokitai_serve::backend::cpu::CpuBackend;
use tokitai_serve::backend::hip::{self, HipOptions};
use tokitai_serve::backend::{Backend, BackendError, ForwardOutput, SessionConfig};
use tokitai_serve::config::{BackendChoice, Config};
use tokitai_serve::model::synth::{demo_model, synth_weights};
use tokitai_serve::model::{Dims, LayerNormMode, ModelSize, MoeWeights};
use tokitai_serve::served;

fn config(backend: BackendChoice) -> Config {
    let mut c = Config::default();
    c.workers.backend = backend;
    c.validate().expect("valid config");
    c
}

/// `Some(reason)` when no HIP device can be used (tests that need one skip).
fn no_device() -> Option<String> {
    match hip::device_count() {
        Ok(0) => Some("no HIP device present (hipGetDeviceCount: 0)".into()),
        Ok(_) => None,
        Err(e) => Some(format!("no HIP device present ({e})")),
    }
}

macro_rules! require_device {
    () => {
        if let Some(reason) = no_device() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

fn nano() -> MoeWeights {
    synth_weights(Dims::for_size(ModelSize::Nano), 7)
}

#[test]
fn auto_falls_back_to_the_cpu_without_a_device() {
    if no_device().is_none() {
        eprintln!("skipped: a HIP device is present, so auto does not fall back");
        return;
    }
    let backend = served::choose_backend(nano(), LayerNormMode::Identity, &config(BackendChoice::Auto))
        .expect("auto never fails");
    assert_eq!(backend.name(), "cpu");
    assert!(backend.describe().starts_with("cpu ("), "{}", backend.describe());
    assert!(
        backend.device_memory_used().is_empty(),
        "the CPU reports no device memory"
    );
    // And it serves.
    let mut s = backend.create_session(SessionConfig::default()).unwrap();
    let mut out = ForwardOutput::default();
    s.forward(&vec![0.5; backend.dims().input * 3], &mut out).unwrap();
    assert_eq!(out.n_rows, 3);
}

#[test]
fn hip_without_a_device_is_a_clear_error() {
    let Some(reason) = no_device() else {
        eprintln!("skipped: a HIP device is present");
        return;
    };
    let err = match served::choose_backend(nano(), LayerNormMode::Identity, &config(BackendChoice::Hip)) {
        Ok(b) => panic!("backend = hip with {reason} built {}", b.describe()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("workers.backend = \"hip\""), "{err}");
    if hip::COMPILED {
        assert!(err.contains("no HIP device found"), "{err}");
    } else {
        assert!(err.contains(hip::NOT_COMPILED), "{err}");
    }
}

#[test]
fn hip_without_a_device_fails_start_up_with_the_reason() {
    if no_device().is_none() {
        eprintln!("skipped: a HIP device is present");
        return;
    }
    // Start-up stops with this error, naming the setting.
    match served::build_backend(demo_model(), &config(BackendChoice::Hip)) {
        Err(BackendError::Unavailable(msg)) => assert!(msg.contains("workers.backend = \"hip\""), "{msg}"),
        Err(e) => panic!("unexpected error kind: {e}"),
        Ok(_) => panic!("a hip backend was built without a device"),
    }
    let (backend, description) =
        served::build_backend(demo_model(), &config(BackendChoice::Auto)).expect("auto falls back to the CPU");
    assert_eq!((backend.name(), description.backend), ("cpu", "cpu"));
}

#[test]
fn a_build_without_the_feature_says_so() {
    if hip::COMPILED {
        eprintln!("skipped: built with --features hip");
        return;
    }
    let e = hip::device_count().unwrap_err().to_string();
    assert_eq!(e, "built without HIP support (rebuild with --features hip)");
    let e = hip::new_backend(&nano(), LayerNormMode::Identity, &HipOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.to_string(), hip::NOT_COMPILED);
    let e = served::choose_backend(nano(), LayerNormMode::Stored, &config(BackendChoice::Hip))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("built without HIP support (rebuild with --features hip)"),
        "{e}"
    );
}

// ---------------------------------------------------------------- device tests

/// A fixture's weights and every one of its input rows, flat.
fn fixture(name: &str) -> (MoeWeights, Vec<f32>) {
    let f = Fixture::load(name);
    (f.weights(), f.flat_inputs())
}

fn run(backend: &dyn Backend, input: &[f32]) -> ForwardOutput {
    let mut s = backend.create_session(SessionConfig::default()).unwrap();
    let mut out = ForwardOutput::default();
    s.forward(input, &mut out).unwrap();
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn device_forward_matches_the_cpu_on_the_fixtures() {
    require_device!();
    for name in FIXTURE_NAMES {
        let (weights, input) = fixture(name);
        for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
            let gpu = hip::new_backend(&weights, mode, &HipOptions::default()).unwrap();
            assert_eq!(gpu.name(), "hip");
            assert!(gpu.describe().starts_with("hip ["), "{}", gpu.describe());
            let cpu = CpuBackend::new(weights.clone(), mode);
            let (g, c) = (run(&gpu, &input), run(&cpu, &input));
            let d = max_abs_diff(&g.logits, &c.logits);
            assert!(d <= 2e-5, "{name} {mode}: max |logit diff| {d:e}");
            let d = max_abs_diff(&g.router_weights, &c.router_weights);
            assert!(d <= 1e-6, "{name} {mode}: max |router weight diff| {d:e}");
        }
    }
}

#[test]
fn device_rows_are_batch_invariant() {
    require_device!();
    let (weights, input) = fixture("nano-s11");
    let gpu = hip::new_backend(&weights, LayerNormMode::Stored, &HipOptions::default()).unwrap();
    // The device memory metric's source: every GPU in use, holding at least its weights.
    let used = gpu.device_memory_used();
    assert!(!used.is_empty() && used.iter().all(|(_, bytes)| *bytes > 0), "{used:?}");
    let Dims {
        input: width,
        output,
        experts,
        top_k,
        ..
    } = gpu.dims();
    let rows = input.len() / width;
    let mut batch = Vec::new();
    let order: Vec<usize> = (0..300).map(|i| (i * 37 + 5) % rows).collect();
    for &r in &order {
        batch.extend_from_slice(&input[r * width..(r + 1) * width]);
    }
    let all = run(&gpu, &batch);
    let mut session = gpu.create_session(SessionConfig::default()).unwrap();
    for (i, &r) in order.iter().enumerate().take(64) {
        let mut one = ForwardOutput::default();
        session.forward(&input[r * width..(r + 1) * width], &mut one).unwrap();
        assert_eq!(
            one.logits,
            all.logits[i * output..(i + 1) * output],
            "row {r} at position {i}"
        );
        assert_eq!(one.router_weights, all.router_weights[i * experts..(i + 1) * experts]);
        assert_eq!(one.top_k, all.top_k[i * top_k..(i + 1) * top_k]);
    }
}

#[test]
fn device_sessions_handle_empty_large_and_malformed_batches() {
    require_device!();
    let weights = nano();
    let gpu = hip::new_backend(
        &weights,
        LayerNormMode::Identity,
        &HipOptions {
            gpus: vec![0],
            streams_per_gpu: 1,
        },
    )
    .unwrap();
    let cpu = CpuBackend::new(weights, LayerNormMode::Identity);
    let width = gpu.dims().input;
    let mut s = gpu.create_session(SessionConfig::default()).unwrap();
    let mut out = ForwardOutput::default();
    s.forward(&[], &mut out).unwrap();
    assert_eq!(out.n_rows, 0);
    assert!(s.forward(&vec![1.0; width - 1], &mut out).is_err());
    // More rows than one chunk.
    let input: Vec<f32> = (0..5000 * width)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    s.forward(&input, &mut out).unwrap();
    let want = run(&cpu, &input);
    assert!(max_abs_diff(&out.logits, &want.logits) <= 2e-5);
    assert_eq!(out.top_k.len(), want.top_k.len());
    // A device id that does not exist names the setting.
    let e = hip::new_backend(
        &nano(),
        LayerNormMode::Identity,
        &HipOptions {
            gpus: vec![999],
            streams_per_gpu: 1,
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("workers.gpus"), "{e}");
}
