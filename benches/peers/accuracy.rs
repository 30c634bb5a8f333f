//! Accuracy against the float64 reference on the peers' own weights: the
//! engine in each precision (and each instruction set, with a check that
//! they give the same bits) beside ONNX Runtime f32 and OpenVINO f32/bf16.
//!
//! Owns: the engine half of the comparison (`accuracy.py` exports the
//! weights, inputs and reference, and measures the peers). The metrics are
//! the same on both sides: max and mean |logit - reference|, the max over
//! the rows whose top-2 experts match the reference's (a flipped route moves
//! a row's logits by far more than rounding does), argmax agreement, and
//! top-2 expert agreement (as sets).

use std::path::Path;

use tokitai_serve::backend::cpu::{CpuBackend, CpuIsa, CpuOptions, SplitPolicy};
use tokitai_serve::backend::{Backend, ForwardOutput, SessionConfig};
use tokitai_serve::model::{LayerNormMode, ModelSize, WeightPrecision, load_model};

use super::runner::PeerEnv;

/// One line of the accuracy table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccRow {
    pub size: String,
    pub runtime: String,
    pub precision: String,
    pub isa: String,
    pub rows: usize,
    pub max_abs_err: f64,
    pub mean_abs_err: f64,
    pub max_abs_err_same_top2: f64,
    pub argmax_agree: f64,
    pub top2_agree: f64,
    /// Engine only: whether this ISA's logits are bit-identical to the first ISA's.
    pub same_bits_as_first_isa: Option<bool>,
    pub max_abs_ref: f64,
}

fn read_le<const N: usize, T>(path: &Path, conv: fn([u8; N]) -> T) -> Result<Vec<T>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| conv(c.try_into().expect("N bytes")))
        .collect())
}

/// Metrics of `logits` / `top2` (`[rows, out]` / `[rows, 2]`) against the reference.
fn metrics(logits: &[f32], top2: &[u32], reference: &[f64], ref_top2: &[i32], out: usize) -> [f64; 5] {
    let rows = reference.len() / out;
    let (mut max, mut sum, mut max_same, mut argmax_ok, mut top2_ok) = (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    let argmax = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
    for r in 0..rows {
        let got: Vec<f64> = logits[r * out..(r + 1) * out].iter().map(|&v| f64::from(v)).collect();
        let want = &reference[r * out..(r + 1) * out];
        let row_max = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
        sum += got.iter().zip(want).map(|(g, w)| (g - w).abs()).sum::<f64>();
        max = max.max(row_max);
        let mut a = [top2[2 * r] as i64, top2[2 * r + 1] as i64];
        let mut b = [i64::from(ref_top2[2 * r]), i64::from(ref_top2[2 * r + 1])];
        a.sort_unstable();
        b.sort_unstable();
        if a == b {
            top2_ok += 1;
            max_same = max_same.max(row_max);
        }
        if argmax(&got) == argmax(want) {
            argmax_ok += 1;
        }
    }
    [
        max,
        sum / (rows * out) as f64,
        max_same,
        argmax_ok as f64 / rows as f64,
        top2_ok as f64 / rows as f64,
    ]
}

/// The accuracy rows of `size`: exports the peers' weights into `root/<size>`
/// (once), runs the engine on them for each precision x ISA, then the peers.
pub fn run(env: &PeerEnv, size: ModelSize, root: &Path, rows: usize, isas: &[CpuIsa]) -> Result<Vec<AccRow>, String> {
    let name = size.as_str().to_lowercase();
    let dir = root.join(&name);
    if !dir.join("meta.json").exists() {
        env.export_accuracy(&name, &dir, rows)?;
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).map_err(|e| format!("{}: {e}", dir.display()))?)
            .map_err(|e| e.to_string())?;
    let max_abs_ref = meta["max_abs_ref"].as_f64().unwrap_or(f64::NAN);
    let model = load_model(&dir.join("arch.json"), &dir.join("checkpoint.tkp1")).map_err(|e| e.to_string())?;
    let dims = model.weights.dims;
    let x = read_le(&dir.join("inputs.f32"), f32::from_le_bytes)?;
    let reference = read_le(&dir.join("ref_logits.f64"), f64::from_le_bytes)?;
    let ref_top2 = read_le(&dir.join("ref_top2.i32"), i32::from_le_bytes)?;
    let n = x.len() / dims.input;
    if reference.len() != n * dims.output || ref_top2.len() != n * dims.top_k {
        return Err(format!(
            "{}: inputs and reference disagree on the row count",
            dir.display()
        ));
    }
    let mut out_rows = Vec::new();
    for precision in [WeightPrecision::F32, WeightPrecision::F16, WeightPrecision::Bf16] {
        let mut first: Option<Vec<u32>> = None;
        for &isa in isas {
            let options = CpuOptions {
                isa,
                precision,
                split: SplitPolicy::Auto,
            };
            let backend = CpuBackend::with_options(model.weights.clone(), LayerNormMode::Stored, options)
                .map_err(|e| e.to_string())?;
            let mut session = backend
                .create_session(SessionConfig { threads: 2 })
                .map_err(|e| e.to_string())?;
            let mut out = ForwardOutput::default();
            session.forward(&x, &mut out).map_err(|e| e.to_string())?;
            let bits: Vec<u32> = out.logits.iter().map(|v| v.to_bits()).collect();
            let same = first.as_ref().map(|f| *f == bits);
            first.get_or_insert(bits);
            let [max, mean, max_same, am, t2] = metrics(&out.logits, &out.top_k, &reference, &ref_top2, dims.output);
            out_rows.push(AccRow {
                size: name.clone(),
                runtime: "engine".into(),
                precision: precision.to_string(),
                isa: backend.isa_name().into(),
                rows: n,
                max_abs_err: max,
                mean_abs_err: mean,
                max_abs_err_same_top2: max_same,
                argmax_agree: am,
                top2_agree: t2,
                same_bits_as_first_isa: same,
                max_abs_ref,
            });
        }
    }
    drop(model);
    for v in env.peer_accuracy(&name, &dir, super::runner::ov_bf16_meaningful())? {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        out_rows.push(AccRow {
            size: name.clone(),
            runtime: v["runtime"].as_str().unwrap_or("?").to_owned(),
            precision: v["precision"].as_str().unwrap_or("?").to_owned(),
            isa: "-".into(),
            rows: f("rows") as usize,
            max_abs_err: f("max_abs_err"),
            mean_abs_err: f("mean_abs_err"),
            max_abs_err_same_top2: f("max_abs_err_same_top2"),
            argmax_agree: f("argmax_agree"),
            top2_agree: f("top2_agree"),
            same_bits_as_first_isa: None,
            max_abs_ref,
        });
    }
    Ok(out_rows)
}

/// The accuracy table, one line per runtime/mode.
pub fn print_table(rows: &[AccRow]) {
    println!("\n### Accuracy against the float64 reference (peers' weights, LayerNorm stored)\n");
    println!(
        "| size | runtime | precision | isa | rows | max abs err | mean abs err | max abs err (same top-2) | argmax agree | top-2 agree | same bits as first ISA |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.2e} | {:.2e} | {:.2e} | {:.2}% | {:.2}% | {} |",
            r.size,
            r.runtime,
            r.precision,
            r.isa,
            r.rows,
            r.max_abs_err,
            r.mean_abs_err,
            r.max_abs_err_same_top2,
            100.0 * r.argmax_agree,
            100.0 * r.top2_agree,
            match r.same_bits_as_first_isa {
                None if r.runtime == "engine" => "(first)",
                None => "-",
                Some(true) => "yes",
                Some(false) => "NO",
            }
        );
    }
    let mut seen = Vec::new();
    for r in rows.iter().filter(|r| r.runtime == "engine") {
        if !seen.contains(&&r.size) {
            seen.push(&r.size);
            println!("\n(max |reference logit| on {}: {:.2})", r.size, r.max_abs_ref);
        }
    }
}
