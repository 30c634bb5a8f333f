//! The TKP1 checkpoint reader.
//!
//! Owns: turning a `checkpoint.tkp1` file into [`MoeWeights`], checking every
//! header field and record against [`Dims::param_specs`]. Must not touch: the
//! arch.json rules (see `arch.rs`), the writer (see `writer.rs`) or any kernel.
//!
//! Every length in the file is untrusted. The reader knows the file length up
//! front and checks each length against the bytes left (and against the
//! length the arch expects) *before* allocating or seeking, so no input can
//! make it panic, abort or allocate more than the arch's own weights. The
//! AdamW `m`/`v` buffers and gradients are skipped with a seek, never read.
//! The path must be a regular file, checked before it is opened (see
//! `files.rs`): a FIFO or a device is refused, never waited on or read.
//!
//! Two passes. The first walks the file's structure sequentially (small
//! reads through an 8 KiB buffer, a seek past every payload) and validates
//! all of it before a single weight is allocated. The second reads the weight
//! payloads with positional reads, in 4 MiB chunks spread over the rayon
//! pool, each read straight into its place in the final `Vec<f32>` (the file
//! is little-endian, as is every target served; a big-endian one swaps in
//! place), then checked while still in cache that every weight is finite: a
//! NaN or an infinity fails the load, naming the tensor and the index of its
//! first bad value (the lowest in the file when several are). On a
//! cold-memory load the cost is dominated by first-touch page faults on the
//! new weight memory, not by the read itself; spreading the chunks over cores
//! spreads those faults too.
//!
//! Memory beyond the weights: the 8 KiB buffer (no scratch: payloads are
//! read into the weights themselves).

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::arch::Dims;
use super::error::{CheckpointPart, ModelError};
use super::files::open_regular_file;
use super::weights::{MoeWeights, ParamSpec};

/// The four magic bytes every TKP1 file starts with.
pub const MAGIC: &[u8; 4] = b"TKP1";
/// The only TKP1 version there is.
pub const VERSION: u32 = 1;
/// Upper bound on the config block. Real configs are a few hundred bytes.
pub const MAX_CONFIG_LEN: u32 = 16 << 20;
/// Upper bound on a record name (real names are under 32 bytes).
pub const MAX_NAME_LEN: u32 = 4096;

/// Buffer for the small fields of the structure pass.
const READ_BUF: usize = 8 << 10;
/// f32s per payload chunk of the second pass (4 MiB of file).
const CHUNK_F32: usize = 1 << 20;

/// What a checkpoint holds that the engine keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Training step from the header.
    pub step: u32,
    /// The free-form config block (JSON in practice).
    pub config: String,
    pub weights: MoeWeights,
}

/// Reads the TKP1 file at `path`, expecting exactly the records of `dims`.
///
/// Every failure is an error naming the file, the part (header, config or
/// record index + expected name), the byte offset, and what was found vs
/// expected.
pub fn read_checkpoint(path: &Path, dims: &Dims) -> Result<Checkpoint, ModelError> {
    read_checkpoint_in_chunks(path, dims, CHUNK_F32)
}

/// [`read_checkpoint`] with payload chunks of `chunk_f32` values.
fn read_checkpoint_in_chunks(path: &Path, dims: &Dims, chunk_f32: usize) -> Result<Checkpoint, ModelError> {
    let mut r = Reader::open(path)?;
    let specs = dims.param_specs();

    // First pass: validate the whole structure, remembering where each weight is.
    let step = read_header(&mut r, dims, &specs)?;
    let config = read_config(&mut r)?;
    let mut payloads = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        r.part = CheckpointPart::Record {
            index,
            expected_name: spec.name.clone(),
        };
        payloads.push(read_record(&mut r, spec)?);
    }
    check_trailer(&mut r)?;

    let len = r.len;
    let file = r.inner.into_inner();
    let tensors = read_payloads(&file, path, len, &specs, &payloads, chunk_f32)?;
    Ok(Checkpoint {
        step,
        config,
        weights: MoeWeights::from_tensors(*dims, tensors),
    })
}

/// The 16-byte header: magic, version, step, and a record count that must
/// match `specs`. Returns the step.
fn read_header(r: &mut Reader, dims: &Dims, specs: &[ParamSpec]) -> Result<u32, ModelError> {
    r.part = CheckpointPart::Header;
    let len = r.len;
    if len < 16 {
        return Err(r.err_at(0, format!("file is {len} bytes, shorter than the 16-byte header")));
    }
    let mut magic = [0u8; 4];
    r.read_bytes(&mut magic, "magic")?;
    if &magic != MAGIC {
        return Err(r.err_at(
            0,
            format!("bad magic: expected \"TKP1\" (54 4b 50 31), found {}", hex(&magic)),
        ));
    }
    let version = r.u32("version")?;
    if version != VERSION {
        return Err(r.err_at(4, format!("unsupported version {version}, expected {VERSION}")));
    }
    let step = r.u32("step")?;
    let count = r.u32("count")?;
    if count as usize != specs.len() {
        return Err(r.err_at(
            12,
            format!(
                "count is {count} but the arch (hidden {}, depth {}, {} experts) has {} parameter records",
                dims.hidden,
                dims.depth,
                dims.experts,
                specs.len()
            ),
        ));
    }
    Ok(step)
}

/// The `config_len u32 | UTF-8 bytes` block.
fn read_config(r: &mut Reader) -> Result<String, ModelError> {
    r.part = CheckpointPart::Config;
    let at = r.pos;
    let config = r.len_prefixed("config_len", "config", MAX_CONFIG_LEN, None)?;
    String::from_utf8(config).map_err(|e| {
        r.err_at(
            at + 4,
            format!(
                "config is not valid UTF-8 (at byte {} of it)",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// One parameter record: its name and `weight_len` must be `spec`'s; its
/// weight is not read but seeked past, as are `m`, `v` and any gradient.
/// Returns the file offset of the weight payload.
fn read_record(r: &mut Reader, spec: &ParamSpec) -> Result<u64, ModelError> {
    read_record_name(r, spec)?;

    let at = r.pos;
    let weight_len = r.u32("weight_len")?;
    if weight_len as usize != spec.len {
        return Err(r.err_at(at, format!("weight_len is {weight_len} but expected {}", spec.len)));
    }
    r.check_left(at, "weight", 4 * u64::from(weight_len))?;
    let payload = r.pos;
    r.skip(4 * u64::from(weight_len))?;

    r.skip_buffer("m_len", "m", weight_len)?;
    r.skip_buffer("v_len", "v", weight_len)?;
    let _param_step = r.u32("param_step")?;
    let at = r.pos;
    let mut has_grad = [0u8];
    r.read_bytes(&mut has_grad, "has_grad")?;
    match has_grad[0] {
        0 => {}
        1 => r.skip_buffer("grad_len", "grad", weight_len)?,
        other => return Err(r.err_at(at, format!("has_grad is {other} but must be 0 or 1"))),
    }
    Ok(payload)
}

/// A record's `name_len u32 | UTF-8 bytes`, which must be exactly `spec.name`.
fn read_record_name(r: &mut Reader, spec: &ParamSpec) -> Result<(), ModelError> {
    let at = r.pos;
    let name = r.len_prefixed("name_len", "name", MAX_NAME_LEN, Some(spec.name.len()))?;
    let name = String::from_utf8(name).map_err(|e| {
        r.err_at(
            at + 4,
            format!(
                "name is not valid UTF-8 ({}), expected `{}`",
                hex(e.as_bytes()),
                spec.name
            ),
        )
    })?;
    if name != spec.name {
        return Err(r.err_at(
            at + 4,
            format!(
                "name is `{}` but expected `{}` (the checkpoint belongs to another arch, or its records are out of order)",
                name.escape_debug(),
                spec.name
            ),
        ));
    }
    Ok(())
}

/// The file must end where the last record does.
fn check_trailer(r: &mut Reader) -> Result<(), ModelError> {
    r.part = CheckpointPart::Trailer;
    if r.pos != r.len {
        return Err(r.err_at(
            r.pos,
            format!(
                "{} trailing bytes after the last record (file is {} bytes, records end at {})",
                r.len - r.pos,
                r.len,
                r.pos
            ),
        ));
    }
    Ok(())
}

/// Second pass: reads every weight payload (at the offsets the structure pass
/// validated) into its final Vec, in parallel chunks of `chunk_f32` values,
/// checking every value of a chunk is finite once it is read.
///
/// On failure the error is the one at the lowest file offset, whichever
/// thread found what first: every chunk before it is always read, chunks
/// after the lowest failure found so far are skipped.
fn read_payloads(
    file: &File,
    path: &Path,
    len: u64,
    specs: &[ParamSpec],
    offsets: &[u64],
    chunk_f32: usize,
) -> Result<Vec<Vec<f32>>, ModelError> {
    // Lazily zeroed (calloc): pages are first touched by the thread that
    // fills them.
    let mut tensors: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0f32; s.len]).collect();
    // (record index, index in the tensor of the chunk's first value, file offset, destination)
    let jobs: Vec<(usize, usize, u64, &mut [f32])> = tensors
        .iter_mut()
        .zip(offsets)
        .enumerate()
        .flat_map(|(index, (t, &at))| {
            t.chunks_mut(chunk_f32).enumerate().map(move |(c, dst)| {
                let first = c * chunk_f32;
                (index, first, at + 4 * first as u64, dst)
            })
        })
        .collect();
    // The lowest file offset of a failure found so far.
    let first_failure = AtomicU64::new(u64::MAX);
    let result = jobs
        .into_par_iter()
        .map(|(index, first, at, dst)| {
            if at > first_failure.load(Ordering::Relaxed) {
                return Ok(());
            }
            read_chunk(file, path, len, specs, (index, first, at, dst)).inspect_err(|(offset, _)| {
                first_failure.fetch_min(*offset, Ordering::Relaxed);
            })
        })
        .reduce(
            || Ok(()),
            |a, b| match (a, b) {
                (Err(a), Err(b)) => Err(if a.0 <= b.0 { a } else { b }),
                (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
                (Ok(()), Ok(())) => Ok(()),
            },
        );
    result.map_err(|(_, e)| e)?;
    Ok(tensors)
}

/// Reads one chunk of record `index` (its values from `first` on, at file
/// offset `at`) straight into `dst`, then fails on its first non-finite
/// value. An error comes with the file offset it is about.
fn read_chunk(
    file: &File,
    path: &Path,
    len: u64,
    specs: &[ParamSpec],
    (index, first, at, dst): (usize, usize, u64, &mut [f32]),
) -> Result<(), (u64, ModelError)> {
    read_exact_at(file, f32s_as_bytes_mut(dst), at).map_err(|e| {
        let err = match e.kind() {
            // The file shrank after the structure pass.
            ErrorKind::UnexpectedEof => ModelError::Checkpoint {
                path: path.to_path_buf(),
                part: CheckpointPart::Record {
                    index,
                    expected_name: specs[index].name.clone(),
                },
                offset: at,
                message: format!("file ends inside `weight` (it was {len} bytes when opened)"),
            },
            _ => ModelError::io(path, e),
        };
        (at, err)
    })?;
    // The file is little-endian, as are the targets this serves (there the
    // bytes read are already the values).
    #[cfg(target_endian = "big")]
    for v in dst.iter_mut() {
        *v = f32::from_bits(u32::from_le(v.to_bits()));
    }
    // NaN and +/-inf are the values whose exponent bits are all ones. A
    // branch-free OR over the chunk (which the compiler vectorises) while it
    // is still in cache; the search for the index runs only on a bad chunk.
    const EXPONENT: u32 = 0x7f80_0000;
    let bad = dst
        .iter()
        .fold(0u32, |bad, v| bad | u32::from(v.to_bits() & EXPONENT == EXPONENT));
    if bad == 0 {
        return Ok(());
    }
    let i = dst
        .iter()
        .position(|v| !v.is_finite())
        .expect("a non-finite value was seen");
    let offset = at + 4 * i as u64;
    Err((
        offset,
        ModelError::NonFiniteWeight {
            path: path.to_path_buf(),
            tensor: specs[index].name.clone(),
            index: first + i,
            value: dst[i],
            offset,
        },
    ))
}

/// The bytes of `values`, to read a payload straight into its final memory.
fn f32s_as_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: the byte slice covers exactly the memory of `values` (same
    // pointer, `size_of_val` bytes), which it borrows mutably for its whole
    // life; u8 has alignment 1, and every bit pattern is a valid f32, so any
    // bytes written through it leave valid f32s.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// A position-tracking reader over the file, with the part being read for errors.
struct Reader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
    pos: u64,
    len: u64,
    part: CheckpointPart,
}

impl<'a> Reader<'a> {
    /// Opens `path` for the structure pass, at offset 0 in the header.
    fn open(path: &'a Path) -> Result<Self, ModelError> {
        // A FIFO or a device is refused before it is read (or even opened).
        let (file, len) = open_regular_file(path).map_err(|e| ModelError::file(path, "checkpoint", e))?;
        Ok(Reader {
            inner: BufReader::with_capacity(READ_BUF, file),
            path,
            pos: 0,
            len,
            part: CheckpointPart::Header,
        })
    }

    fn err_at(&self, offset: u64, message: String) -> ModelError {
        ModelError::Checkpoint {
            path: self.path.to_path_buf(),
            part: self.part.clone(),
            offset,
            message,
        }
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `bytes` more bytes remain; `field` names the length that claimed them.
    fn check_left(&self, field_at: u64, field: &str, bytes: u64) -> Result<(), ModelError> {
        if bytes > self.left() {
            return Err(self.err_at(
                field_at,
                format!(
                    "`{field}` claims {bytes} bytes but only {} remain (file is {} bytes): the file is truncated or corrupt",
                    self.left(),
                    self.len
                ),
            ));
        }
        Ok(())
    }

    fn read_bytes(&mut self, buf: &mut [u8], field: &str) -> Result<(), ModelError> {
        let at = self.pos;
        if buf.len() as u64 > self.left() {
            return Err(self.truncated(at, field, buf.len() as u64));
        }
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            // The file shrank while being read.
            ErrorKind::UnexpectedEof => self.truncated(at, field, buf.len() as u64),
            _ => ModelError::io(self.path, e),
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn truncated(&self, at: u64, field: &str, need: u64) -> ModelError {
        self.err_at(
            at,
            format!(
                "file ends inside `{field}`: it needs {need} bytes but only {} remain (file is {} bytes)",
                self.left(),
                self.len
            ),
        )
    }

    fn u32(&mut self, field: &str) -> Result<u32, ModelError> {
        let mut b = [0u8; 4];
        self.read_bytes(&mut b, field)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a `<len_field> u32 | bytes` field. The length is checked against
    /// `max` and then against the bytes left *before* the buffer is allocated.
    /// `expected_len`, when the caller knows it, is quoted in the over-`max` error.
    fn len_prefixed(
        &mut self,
        len_field: &str,
        field: &str,
        max: u32,
        expected_len: Option<usize>,
    ) -> Result<Vec<u8>, ModelError> {
        let at = self.pos;
        let n = self.u32(len_field)?;
        if n > max {
            let expected = expected_len.map(|e| format!(" (expected {e})")).unwrap_or_default();
            return Err(self.err_at(at, format!("{len_field} is {n}, over the {max}-byte limit{expected}")));
        }
        self.check_left(at, len_field, u64::from(n))?;
        let mut bytes = vec![0u8; n as usize];
        self.read_bytes(&mut bytes, field)?;
        Ok(bytes)
    }

    /// Seeks `bytes` forward (already checked against the bytes left).
    fn skip(&mut self, bytes: u64) -> Result<(), ModelError> {
        // `bytes` <= 4 * u32::MAX, well inside i64.
        self.inner
            .seek_relative(bytes as i64)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += bytes;
        Ok(())
    }

    /// Reads a `<len_field> u32 | f32 x len` buffer the engine does not need
    /// and seeks past its payload. Its length must be 0 or the weight's length.
    fn skip_buffer(&mut self, len_field: &str, field: &str, weight_len: u32) -> Result<(), ModelError> {
        let at = self.pos;
        let n = self.u32(len_field)?;
        if n != 0 && n != weight_len {
            return Err(self.err_at(
                at,
                format!("{len_field} is {n} but expected 0 or {weight_len} (the weight's length)"),
            ));
        }
        let bytes = 4 * u64::from(n);
        self.check_left(at, field, bytes)?;
        self.skip(bytes)
    }
}

/// Fills `buf` from `offset` without moving any shared cursor, so chunks can
/// be read from several threads at once.
#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let more = if bytes.len() > 16 { " ..." } else { "" };
    format!("{}{more}", shown.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelSize, synth_weights, write_checkpoint};

    /// Non-finite values in several chunks of several tensors: whatever the
    /// chunking and the thread timing, the error is the first in the file.
    #[test]
    fn the_first_non_finite_value_in_the_file_is_reported() {
        let dims = Dims::for_size(ModelSize::Nano);
        let mut w = synth_weights(dims, 5);
        // expert_0.param_4 is the first hidden Linear weight, [128, 128].
        w.experts[0].blocks[1].linear.weight[9000] = f32::NEG_INFINITY;
        w.experts[0].blocks[1].linear.weight[5000] = f32::NAN;
        w.experts[0].blocks[1].linear.weight[12000] = f32::INFINITY;
        w.experts[2].output.bias[3] = f32::NAN;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.tkp1");
        write_checkpoint(&path, &w, 1, "{}", true).unwrap();
        for chunk in [1000, 4096, 5000, 5001, CHUNK_F32] {
            for _ in 0..4 {
                let e = read_checkpoint_in_chunks(&path, &dims, chunk).unwrap_err();
                match &e {
                    ModelError::NonFiniteWeight {
                        tensor, index, value, ..
                    } => {
                        assert_eq!(
                            (tensor.as_str(), *index),
                            ("expert_0.param_4", 5000),
                            "chunk {chunk}: {e}"
                        );
                        assert!(value.is_nan());
                    }
                    other => panic!("chunk {chunk}: {other}"),
                }
            }
        }
        // With those fixed, the next one along is reported.
        w.experts[0].blocks[1].linear.weight[5000] = 0.5;
        w.experts[0].blocks[1].linear.weight[9000] = 0.5;
        write_checkpoint(&path, &w, 1, "{}", false).unwrap();
        let msg = read_checkpoint_in_chunks(&path, &dims, 1000).unwrap_err().to_string();
        assert!(msg.contains("tensor 'expert_0.param_4' value 12000 is +inf"), "{msg}");
    }
}
