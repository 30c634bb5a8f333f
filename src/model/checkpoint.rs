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
//!
//! Two passes. The first walks the file's structure sequentially (small
//! reads through an 8 KiB buffer, a seek past every payload) and validates
//! all of it before a single weight is allocated. The second reads the weight
//! payloads with positional reads, in 4 MiB chunks spread over the rayon
//! pool, converting each chunk from little-endian straight into its final
//! `Vec<f32>`. On a cold-memory load the cost is dominated by first-touch
//! page faults on the new weight memory, not by the read itself; spreading
//! the chunks over cores spreads those faults too.
//!
//! Memory beyond the weights: the 8 KiB buffer and one 4 MiB scratch buffer
//! per rayon thread that takes part.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::Path;

use rayon::prelude::*;

use super::arch::Dims;
use super::error::{CheckpointPart, ModelError};
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
    let tensors = read_payloads(&file, path, len, &specs, &payloads)?;
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
/// validated) into its final Vec, in parallel chunks.
fn read_payloads(
    file: &File,
    path: &Path,
    len: u64,
    specs: &[ParamSpec],
    offsets: &[u64],
) -> Result<Vec<Vec<f32>>, ModelError> {
    // Lazily zeroed (calloc): pages are first touched by the thread that
    // fills them.
    let mut tensors: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0f32; s.len]).collect();
    let jobs: Vec<(usize, u64, &mut [f32])> = tensors
        .iter_mut()
        .zip(offsets)
        .enumerate()
        .flat_map(|(index, (t, &at))| {
            t.chunks_mut(CHUNK_F32)
                .enumerate()
                .map(move |(c, dst)| (index, at + (c * CHUNK_F32 * 4) as u64, dst))
        })
        .collect();
    jobs.into_par_iter().try_for_each_init(
        || vec![0u8; CHUNK_F32 * 4],
        |scratch, (index, at, dst)| {
            let bytes = &mut scratch[..dst.len() * 4];
            read_exact_at(file, bytes, at).map_err(|e| match e.kind() {
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
            })?;
            for (d, s) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
            Ok(())
        },
    )?;
    Ok(tensors)
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
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
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
