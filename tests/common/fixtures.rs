//! The upstream fixtures and what the tests build from them.
//!
//! Owns: the one place the tests say where the fixtures are ([`FIXTURES`]),
//! a fixture's `expected.json` ([`Fixture`]) and its model's shape (read from
//! its `arch.json`), the accepted tolerances and the output check, the config
//! that serves a fixture, request bodies, and deterministic test inputs
//! ([`Rng`]). Must not touch: the fixture files (read-only).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokitai_serve::config::Config;
use tokitai_serve::model::{Arch, Dims, LayerNormMode, ModelSize, MoeWeights, read_checkpoint};

use super::server::base_config;

/// The shared fixtures, next to the checkout. The only spelling of this path
/// in the tests.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");
/// Every fixture set.
pub const FIXTURE_NAMES: [&str; 2] = ["nano-s11", "nano-s12"];

/// Largest accepted |logit - expected|.
pub const LOGIT_TOL: f64 = 2e-5;
/// Largest accepted |router weight - expected|.
pub const ROUTER_TOL: f64 = 1e-6;

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// The shape of fixture `name`'s model, from its `arch.json`.
pub fn fixture_dims(name: &str) -> Dims {
    Arch::load(&fixture_dir(name).join("arch.json"))
        .expect("the fixture's arch.json")
        .dims()
}

/// The shape of the Nano size, which both fixtures and the built-in demo
/// model have, as the library defines it.
pub fn nano_dims() -> Dims {
    Dims::for_size(ModelSize::Nano)
}

/// [`base_config`] serving the fixture `name` in LayerNorm `mode`.
pub fn fixture_config(name: &str, mode: LayerNormMode) -> Config {
    let mut config = base_config();
    let dir = fixture_dir(name);
    config.model.arch = Some(dir.join("arch.json"));
    config.model.checkpoint = Some(dir.join("checkpoint.tkp1"));
    config.model.layernorm = mode;
    config
}

/// One fixture: its files, its model's shape, and its `expected.json`.
pub struct Fixture {
    pub name: String,
    pub arch: PathBuf,
    pub checkpoint: PathBuf,
    /// The model's shape, from the fixture's `arch.json`.
    pub dims: Dims,
    /// 64 rows of `dims.input` values, exactly as stored (f32 values written as JSON).
    pub inputs: Vec<Vec<f64>>,
    pub logits: Vec<Vec<f64>>,
    pub logits_ln_identity: Vec<Vec<f64>>,
    pub router_weights: Vec<Vec<f64>>,
    pub top_k_indices: Vec<Vec<usize>>,
    pub top_k_strict: Vec<bool>,
}

fn matrix(v: &Value, field: &str) -> Vec<Vec<f64>> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("expected.json: `{field}` is not an array"))
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let dir = fixture_dir(name);
        let dims = fixture_dims(name);
        let text = std::fs::read_to_string(dir.join("expected.json")).expect("read expected.json");
        let v: Value = serde_json::from_str(&text).expect("parse expected.json");
        let f = Fixture {
            name: name.to_string(),
            arch: dir.join("arch.json"),
            checkpoint: dir.join("checkpoint.tkp1"),
            dims,
            inputs: matrix(&v, "inputs"),
            logits: matrix(&v, "logits"),
            logits_ln_identity: matrix(&v, "logits_ln_identity"),
            router_weights: matrix(&v, "router_weights"),
            top_k_indices: matrix(&v, "top_k_indices")
                .into_iter()
                .map(|r| r.into_iter().map(|x| x as usize).collect())
                .collect(),
            top_k_strict: v["top_k_strict"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_bool().unwrap())
                .collect(),
        };
        assert_eq!(f.inputs.len(), 64);
        assert!(f.inputs.iter().all(|r| r.len() == dims.input));
        assert_eq!(f.logits.len(), 64);
        f
    }

    /// The checkpoint's weights, read against the fixture's arch.
    pub fn weights(&self) -> MoeWeights {
        read_checkpoint(&self.checkpoint, &self.dims)
            .expect("the fixture's checkpoint")
            .weights
    }

    /// Every input row, one after the other, as f32 (a backend's input).
    pub fn flat_inputs(&self) -> Vec<f32> {
        self.inputs.iter().flatten().map(|&x| x as f32).collect()
    }

    /// The index of every input row: `0..64`.
    pub fn all_rows(&self) -> Vec<usize> {
        (0..self.inputs.len()).collect()
    }

    pub fn expected_logits(&self, mode: LayerNormMode) -> &[Vec<f64>] {
        match mode {
            LayerNormMode::Identity => &self.logits_ln_identity,
            LayerNormMode::Stored => &self.logits,
        }
    }

    /// Checks output rows (`logits`, `router_weights` as parsed JSON arrays of
    /// rows) against fixture rows `rows`, within the tolerances.
    pub fn check(&self, mode: LayerNormMode, answer: &Value, rows: &[usize], context: &str) {
        let logits = answer["logits"]
            .as_array()
            .unwrap_or_else(|| panic!("{context}: no logits in {answer}"));
        let weights = answer["router_weights"]
            .as_array()
            .unwrap_or_else(|| panic!("{context}: no router_weights"));
        assert_eq!(logits.len(), rows.len(), "{context}: one logits row per input row");
        assert_eq!(
            weights.len(),
            rows.len(),
            "{context}: one router_weights row per input row"
        );
        let expected = self.expected_logits(mode);
        for (i, &r) in rows.iter().enumerate() {
            let got = f32_row(&logits[i], self.dims.output, context);
            let diff = max_abs_diff(&got, &expected[r]);
            assert!(
                diff <= LOGIT_TOL,
                "{context}: fixture {} row {r} ({mode}): max |logit diff| {diff:e}",
                self.name
            );
            let w = f32_row(&weights[i], self.dims.experts, context);
            let diff = max_abs_diff(&w, &self.router_weights[r]);
            assert!(
                diff <= ROUTER_TOL,
                "{context}: fixture {} row {r}: max |router weight diff| {diff:e}",
                self.name
            );
            if self.top_k_strict[r] {
                let mut nonzero: Vec<usize> = (0..self.dims.experts).filter(|&e| w[e] != 0.0).collect();
                let mut want = self.top_k_indices[r].clone();
                nonzero.sort_unstable();
                want.sort_unstable();
                assert_eq!(
                    nonzero, want,
                    "{context}: fixture {} row {r}: experts with nonzero weight",
                    self.name
                );
            }
        }
    }
}

/// A JSON array of `len` numbers as the f32 values they were written from.
pub fn f32_row(v: &Value, len: usize, context: &str) -> Vec<f64> {
    let row = v
        .as_array()
        .unwrap_or_else(|| panic!("{context}: row is not an array: {v}"));
    assert_eq!(row.len(), len, "{context}: row length");
    row.iter()
        .map(|x| f64::from(x.as_f64().unwrap_or_else(|| panic!("{context}: not a number: {x}")) as f32))
        .collect()
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// `{"features": [row]}`.
pub fn single_body(row: &[f64]) -> String {
    serde_json::json!({ "features": row }).to_string()
}

/// `{"features": [[row], ...]}`.
pub fn batch_body<R: AsRef<[f64]>>(rows: &[R]) -> String {
    let rows: Vec<&[f64]> = rows.iter().map(|r| r.as_ref()).collect();
    serde_json::json!({ "features": rows }).to_string()
}

/// A deterministic pseudo-random generator (SplitMix64) for test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A row of `width` f32-representable values in [-3, 3).
    pub fn row(&mut self, width: usize) -> Vec<f64> {
        (0..width)
            .map(|_| f64::from(((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0))
            .collect()
    }
}
