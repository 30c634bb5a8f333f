//! The TKP1 checkpoint writer, byte-compatible with the training runner's.
//!
//! Owns: serialising [`MoeWeights`] to `checkpoint.tkp1` (tests, benches and
//! synthetic models use it). Must not touch: the reader's checks (see
//! `checkpoint.rs`), the arch.json rules, or the random stream behind `m`/`v`
//! (see `generator.rs`; this module only picks its domains and ranges).
//!
//! The file is streamed through a `BufWriter` in 4 MiB blocks; nothing holds
//! the whole file. Each block's little-endian encoding (and the generation of
//! `m`/`v`) is spread over the rayon pool, which matters for Full (9.7 GB with
//! optimizer state) and for debug-build tests.
//! Every record gets `param_step = step` and `has_grad = 0`, as upstream
//! writes; with `optimizer_state` it also gets AdamW `m` (uniform in ±1e-2)
//! and `v` (uniform in [1e-8, 1e-4)) of the weight's length, deterministic in
//! `(step, record index)`, otherwise `m_len = v_len = 0`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;

use super::checkpoint::{MAGIC, MAX_CONFIG_LEN, VERSION};
use super::error::ModelError;
use super::generator::{DOMAIN_ADAM_M, DOMAIN_ADAM_V, fill_uniform_at, stream_key};
use super::weights::{MoeWeights, ParamSpec};

/// f32s encoded per write (4 MiB).
const BLOCK_F32: usize = 1 << 20;
/// f32s per parallel work item inside a block.
const SUB_F32: usize = 64 << 10;

/// Writes `weights` to `path` in TKP1 version 1.
///
/// Fails (before creating the file) when a tensor's length disagrees with
/// `weights.dims`, or the config is over the reader's 16 MiB limit.
pub fn write_checkpoint(
    path: &Path,
    weights: &MoeWeights,
    step: u32,
    config: &str,
    optimizer_state: bool,
) -> Result<(), ModelError> {
    let specs = weights.dims.param_specs();
    let tensors = weights.tensors();
    check_writable(path, &specs, &tensors, config)?;

    let io = |e| ModelError::io(path, e);
    let file = File::create(path).map_err(io)?;
    // Small fields go through the buffer; the 4 MiB blocks bypass it.
    let mut w = BufWriter::with_capacity(64 << 10, file);
    let mut block = vec![0u8; BLOCK_F32 * 4];

    w.write_all(MAGIC).map_err(io)?;
    for n in [VERSION, step, specs.len() as u32, config.len() as u32] {
        w.write_all(&n.to_le_bytes()).map_err(io)?;
    }
    w.write_all(config.as_bytes()).map_err(io)?;

    for (i, (spec, t)) in specs.iter().zip(&tensors).enumerate() {
        w.write_all(&(spec.name.len() as u32).to_le_bytes()).map_err(io)?;
        w.write_all(spec.name.as_bytes()).map_err(io)?;
        let len = t.len() as u32;
        w.write_all(&len.to_le_bytes()).map_err(io)?;
        write_f32s(&mut w, t, &mut block).map_err(io)?;
        if optimizer_state {
            // m, then v: same length as the weight.
            let streams = [(DOMAIN_ADAM_M, -1e-2f32, 1e-2f32), (DOMAIN_ADAM_V, 1e-8, 1e-4)];
            for (domain, lo, hi) in streams {
                w.write_all(&len.to_le_bytes()).map_err(io)?;
                let key = stream_key(u64::from(step), domain, i as u64);
                write_generated(&mut w, t.len(), key, lo, hi, &mut block).map_err(io)?;
            }
        } else {
            w.write_all(&0u32.to_le_bytes()).map_err(io)?;
            w.write_all(&0u32.to_le_bytes()).map_err(io)?;
        }
        w.write_all(&step.to_le_bytes()).map_err(io)?; // param_step
        w.write_all(&[0u8]).map_err(io)?; // has_grad
    }
    w.flush().map_err(io)?;
    Ok(())
}

/// Fails unless `tensors` match `specs` one for one (count and every length,
/// each fitting the format's u32) and `config` is within the reader's limit.
fn check_writable(path: &Path, specs: &[ParamSpec], tensors: &[&[f32]], config: &str) -> Result<(), ModelError> {
    let invalid = |message: String| ModelError::InvalidWeights {
        path: path.to_path_buf(),
        message,
    };
    if tensors.len() != specs.len() {
        return Err(invalid(format!(
            "the weights hold {} tensors but their dims call for {}",
            tensors.len(),
            specs.len()
        )));
    }
    for (i, (spec, t)) in specs.iter().zip(tensors).enumerate() {
        if t.len() != spec.len {
            return Err(invalid(format!(
                "tensor {i} (`{}`) has {} values but the dims call for {}",
                spec.name,
                t.len(),
                spec.len
            )));
        }
        if u32::try_from(t.len()).is_err() {
            return Err(invalid(format!(
                "tensor {i} (`{}`) is too long for a u32 length",
                spec.name
            )));
        }
    }
    if config.len() > MAX_CONFIG_LEN as usize {
        return Err(invalid(format!(
            "config is {} bytes, over the {MAX_CONFIG_LEN}-byte limit",
            config.len()
        )));
    }
    Ok(())
}

/// Little-endian encoding of `src` into `dst` (`4 * src.len()` bytes).
fn encode(src: &[f32], dst: &mut [u8]) {
    for (d, x) in dst.chunks_exact_mut(4).zip(src) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

/// Writes `values` little-endian, a block at a time, encoding in parallel.
fn write_f32s(w: &mut impl Write, values: &[f32], block: &mut [u8]) -> std::io::Result<()> {
    for chunk in values.chunks(BLOCK_F32) {
        let bytes = &mut block[..chunk.len() * 4];
        bytes
            .par_chunks_mut(SUB_F32 * 4)
            .zip(chunk.par_chunks(SUB_F32))
            .for_each(|(d, s)| encode(s, d));
        w.write_all(bytes)?;
    }
    Ok(())
}

/// Writes elements `0..n` of stream `key` (uniform in `[lo, hi)`), generated
/// and encoded in parallel a block at a time.
fn write_generated(w: &mut impl Write, n: usize, key: u64, lo: f32, hi: f32, block: &mut [u8]) -> std::io::Result<()> {
    let mut start = 0;
    while start < n {
        let len = (n - start).min(BLOCK_F32);
        let bytes = &mut block[..len * 4];
        bytes.par_chunks_mut(SUB_F32 * 4).enumerate().for_each_init(
            || vec![0.0f32; SUB_F32],
            |tmp, (i, d)| {
                let vals = &mut tmp[..d.len() / 4];
                fill_uniform_at(vals, key, (start + i * SUB_F32) as u64, lo, hi);
                encode(vals, d);
            },
        );
        w.write_all(bytes)?;
        start += len;
    }
    Ok(())
}
