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
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut r = Reader {
        inner: BufReader::with_capacity(READ_BUF, file),
        path,
        pos: 0,
        len,
        part: CheckpointPart::Header,
    };

    // Header.
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
    let specs = dims.param_specs();
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

    // Config.
    r.part = CheckpointPart::Config;
    let at = r.pos;
    let config_len = r.u32("config_len")?;
    if config_len > MAX_CONFIG_LEN {
        return Err(r.err_at(
            at,
            format!("config_len is {config_len}, over the {MAX_CONFIG_LEN}-byte limit"),
        ));
    }
    r.check_left(at, "config_len", u64::from(config_len))?;
    let mut config = vec![0u8; config_len as usize];
    r.read_bytes(&mut config, "config")?;
    let config = String::from_utf8(config).map_err(|e| {
        r.err_at(
            at + 4,
            format!(
                "config is not valid UTF-8 (at byte {} of it)",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;

    // Records: validate the whole structure, remembering where each weight is.
    let mut payloads = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        r.part = CheckpointPart::Record {
            index,
            expected_name: spec.name.clone(),
        };

        let at = r.pos;
        let name_len = r.u32("name_len")?;
        if name_len > MAX_NAME_LEN {
            return Err(r.err_at(
                at,
                format!(
                    "name_len is {name_len}, over the {MAX_NAME_LEN}-byte limit (expected {})",
                    spec.name.len()
                ),
            ));
        }
        r.check_left(at, "name_len", u64::from(name_len))?;
        let mut name = vec![0u8; name_len as usize];
        r.read_bytes(&mut name, "name")?;
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

        let at = r.pos;
        let weight_len = r.u32("weight_len")?;
        if weight_len as usize != spec.len {
            return Err(r.err_at(at, format!("weight_len is {weight_len} but expected {}", spec.len)));
        }
        r.check_left(at, "weight", 4 * u64::from(weight_len))?;
        payloads.push(r.pos);
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
    }

    r.part = CheckpointPart::Trailer;
    if r.pos != len {
        return Err(r.err_at(
            r.pos,
            format!(
                "{} trailing bytes after the last record (file is {len} bytes, records end at {})",
                len - r.pos,
                r.pos
            ),
        ));
    }

    let file = r.inner.into_inner();
    let tensors = read_payloads(&file, path, len, &specs, &payloads)?;
    Ok(Checkpoint {
        step,
        config,
        weights: MoeWeights::from_tensors(*dims, tensors),
    })
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

impl Reader<'_> {
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
