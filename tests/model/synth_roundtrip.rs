//! Synthetic weights through the writer and back through the reader.
//!
//! Owns: tests of `model::{synth, writer}` and their agreement with
//! `model::checkpoint`. Must not touch: the shared fixtures (see
//! `model_files.rs`) or forward checks.

use std::path::Path;

use crate::common::nano_dims;

use tokitai_serve::model::{
    Arch, Dims, ModelError, ModelSize, ModelSource, MoeWeights, demo_model, load_model, read_checkpoint,
    synth::{DEMO_SEED, SYNTH_STEP},
    synth_weights, write_checkpoint, write_model_dir,
};

/// Exact TKP1 size of `dims` with `config_len` config bytes.
fn expected_file_len(dims: &Dims, config_len: usize, optimizer_state: bool) -> u64 {
    let mut n = 16 + 4 + config_len as u64;
    for s in dims.param_specs() {
        let payload = if optimizer_state { 12 } else { 4 } * s.len as u64;
        n += 4 + s.name.len() as u64 + 4 + 4 + 4 + 4 + 1 + payload;
    }
    n
}

/// A 64-bit digest of every weight's bits, for comparing big models without
/// holding two copies.
fn digest(w: &MoeWeights) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for t in w.tensors() {
        h = (h ^ t.len() as u64).wrapping_mul(0x0000_0100_0000_01b3);
        for x in t {
            h = (h ^ u64::from(x.to_bits())).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[test]
fn nano_round_trips_with_and_without_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let w = synth_weights(nano_dims(), 7);
    let config = r#"{"size":"Nano","seed":7}"#;
    let mut lens = Vec::new();
    for opt in [false, true] {
        let p = dir.path().join(format!("ckpt-{opt}.tkp1"));
        write_checkpoint(&p, &w, 321, config, opt).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(len, expected_file_len(&nano_dims(), config.len(), opt));
        lens.push(len);
        let c = read_checkpoint(&p, &nano_dims()).unwrap();
        assert_eq!(c.step, 321);
        assert_eq!(c.config, config);
        assert_eq!(c.weights, w);
    }
    let ratio = lens[1] as f64 / lens[0] as f64;
    assert!(
        (2.9..3.0).contains(&ratio),
        "optimizer state should triple the file: {ratio}"
    );
}

#[test]
fn optimizer_state_is_deterministic_nonzero_and_in_range() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, ckpt) = write_model_dir(dir.path(), ModelSize::Nano, 3, true).unwrap();
    let b = std::fs::read(&ckpt).unwrap();
    // Walk to record 0's m and v.
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let config_len = u32_at(16) as usize;
    let mut p = 20 + config_len;
    let name_len = u32_at(p) as usize;
    p += 4 + name_len;
    let n = u32_at(p) as usize;
    p += 4 + 4 * n;
    let f32s = |at: usize, n: usize| -> Vec<f32> {
        b[at..at + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(u32_at(p) as usize, n);
    let m = f32s(p + 4, n);
    p += 4 + 4 * n;
    assert_eq!(u32_at(p) as usize, n);
    let v = f32s(p + 4, n);
    p += 4 + 4 * n;
    assert_eq!(u32_at(p), SYNTH_STEP, "param_step");
    assert_eq!(b[p + 4], 0, "has_grad");
    assert!(m.iter().all(|x| x.abs() <= 1e-2) && m.iter().any(|&x| x != 0.0));
    assert!(v.iter().all(|&x| (1e-8..=1e-4).contains(&x)));
    assert_ne!(m, v);
}

#[test]
fn model_dir_loads_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    for (sub, opt) in [("plain", false), ("adam", true)] {
        let d = dir.path().join(sub).join("nested");
        let (arch, arch_path, ckpt_path) = write_model_dir(&d, ModelSize::Nano, 99, opt).unwrap();
        assert_eq!(arch, Arch::for_size(ModelSize::Nano, 99));
        assert_eq!(arch_path, d.join("arch.json"));
        assert_eq!(ckpt_path, d.join("checkpoint.tkp1"));
        let m = load_model(&arch_path, &ckpt_path).unwrap();
        assert_eq!(m.arch, arch);
        assert_eq!(m.step, SYNTH_STEP);
        assert_eq!(m.weights, synth_weights(nano_dims(), 99));
        assert_eq!(
            m.source,
            ModelSource::Files {
                arch: arch_path,
                checkpoint: ckpt_path
            }
        );
    }
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = |name: &str, seed: u64| {
        let (_, a, c) = write_model_dir(&dir.path().join(name), ModelSize::Nano, seed, true).unwrap();
        (std::fs::read(a).unwrap(), std::fs::read(c).unwrap())
    };
    let one = bytes("a", 5);
    let two = bytes("b", 5);
    let other = bytes("c", 6);
    assert!(one == two, "same seed must give identical files");
    assert_ne!(one.1, other.1);
    assert_eq!(one.1.len(), other.1.len());
    assert_ne!(synth_weights(nano_dims(), 5), synth_weights(nano_dims(), 6));
}

#[test]
fn synth_weights_are_non_trivial_and_scaled() {
    let d = nano_dims();
    let w = synth_weights(d, 11);
    let nonzero = |v: &[f32]| v.iter().all(|&x| x != 0.0 && x.is_finite());
    assert!(nonzero(&w.router.bias));
    assert!(w.router.bias.iter().all(|x| x.abs() <= 0.2));
    assert_eq!(w.experts.len(), d.experts);
    for e in &w.experts {
        assert_eq!(e.blocks.len(), d.depth + 1);
        for b in &e.blocks {
            let a = 1.0 / (b.linear.in_dim as f32).sqrt();
            assert!(b.linear.weight.iter().all(|x| x.abs() <= a));
            let mean_abs = b.linear.weight.iter().map(|x| x.abs()).sum::<f32>() / b.linear.weight.len() as f32;
            assert!(
                (0.4 * a..0.6 * a).contains(&mean_abs),
                "uniform in ±a has mean |x| a/2: {mean_abs} vs {a}"
            );
            assert!(nonzero(&b.linear.bias));
            assert!(b.norm.gamma.iter().all(|g| (0.8..=1.2).contains(g) && *g != 1.0));
            assert!(b.norm.beta.iter().all(|x| x.abs() <= 0.1 && *x != 0.0));
        }
        assert!(nonzero(&e.output.weight) && nonzero(&e.output.bias));
    }
    // Different tensors get different streams.
    assert_ne!(w.experts[0].blocks[1].norm.gamma, w.experts[0].blocks[2].norm.gamma);
    assert_ne!(w.experts[0].output.bias, w.experts[1].output.bias);
}

#[test]
fn demo_model_is_deterministic_nano_without_files() {
    let a = demo_model();
    let b = demo_model();
    assert_eq!(a, b);
    assert_eq!(a.source, ModelSource::Demo);
    assert_eq!(a.arch.size, ModelSize::Nano);
    assert_eq!(a.arch.dims(), nano_dims());
    assert_eq!(a.weights, synth_weights(nano_dims(), DEMO_SEED));
}

#[test]
fn writer_rejects_weights_that_disagree_with_their_dims() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.tkp1");
    let mut w = synth_weights(nano_dims(), 1);
    w.experts[2].blocks[1].norm.beta.pop();
    let e = write_checkpoint(&p, &w, 0, "{}", false).unwrap_err();
    assert!(matches!(e, ModelError::InvalidWeights { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("`expert_2.param_7`") && msg.contains("127 values") && msg.contains("128"),
        "{msg}"
    );
    assert!(!p.exists(), "nothing is written for invalid weights");

    let mut w = synth_weights(nano_dims(), 1);
    w.experts.pop();
    let msg = write_checkpoint(&p, &w, 0, "{}", false).unwrap_err().to_string();
    assert!(msg.contains("44 tensors") && msg.contains("58"), "{msg}");

    let e = write_checkpoint(
        Path::new("/nonexistent/dir/x.tkp1"),
        &synth_weights(nano_dims(), 1),
        0,
        "",
        false,
    );
    assert!(matches!(e, Err(ModelError::Io { .. })));
}

/// `synth --size tiny` (85 M params, ~340 MB of weights without optimizer
/// state) writes and loads back bit-identical. Compared by digest so only
/// one copy of the weights is alive at a time.
#[test]
fn tiny_synth_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (arch, arch_path, ckpt_path) = write_model_dir(dir.path(), ModelSize::Tiny, 2024, false).unwrap();
    let dims = Dims::for_size(ModelSize::Tiny);
    assert_eq!(
        std::fs::metadata(&ckpt_path).unwrap().len(),
        expected_file_len(&dims, config_len(&ckpt_path), false)
    );
    let loaded = load_model(&arch_path, &ckpt_path).unwrap();
    assert_eq!(loaded.arch, arch);
    assert_eq!(loaded.weights.dims, dims);
    let n: u64 = loaded.weights.tensors().iter().map(|t| t.len() as u64).sum();
    assert_eq!(n, dims.param_count());
    assert!(n > 80_000_000);
    let got = digest(&loaded.weights);
    drop(loaded);
    assert_eq!(got, digest(&synth_weights(dims, 2024)));
}

fn config_len(ckpt: &Path) -> usize {
    use std::io::Read;
    let mut head = [0u8; 20];
    std::fs::File::open(ckpt).unwrap().read_exact(&mut head).unwrap();
    u32::from_le_bytes(head[16..20].try_into().unwrap()) as usize
}
