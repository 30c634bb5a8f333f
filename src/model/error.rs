//! Errors of the model files: `arch.json`, the TKP1 checkpoint, and writing them.
//!
//! Owns: [`ModelError`] and the wording of every model-file failure. Every
//! variant carries its context (the file, the field or record, expected vs
//! found) so the message alone tells an operator what is wrong. Must not
//! touch: serving errors (HTTP status mapping lives with the server).

use std::fmt;
use std::path::PathBuf;

use super::files::{FileError, FileRefusal};

/// Where in a TKP1 file a failure happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointPart {
    /// The 16-byte header (magic, version, step, count).
    Header,
    /// The config block (`config_len` and its bytes).
    Config,
    /// A parameter record: its index in the file and the name the arch expects there.
    Record { index: usize, expected_name: String },
    /// After the last record.
    Trailer,
}

impl fmt::Display for CheckpointPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointPart::Header => f.write_str("header"),
            CheckpointPart::Config => f.write_str("config"),
            CheckpointPart::Record { index, expected_name } => {
                write!(f, "record {index} (`{expected_name}`)")
            }
            CheckpointPart::Trailer => f.write_str("end of file"),
        }
    }
}

/// Everything that can go wrong reading or writing model files.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An operating-system I/O failure on `path` (open, read, seek, write).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `arch.json` is not valid JSON, or not a JSON object.
    #[error("{file}: {message}")]
    ArchSyntax {
        /// `arch.json`, or the path it was loaded from.
        file: String,
        message: String,
    },

    /// A field of `arch.json` is missing, of the wrong type, or has a value
    /// the engine rejects. `message` holds the found and the expected value.
    #[error("{file}: field `{field}` {message}")]
    ArchField {
        /// `arch.json`, or the path it was loaded from.
        file: String,
        field: &'static str,
        message: String,
    },

    /// The checkpoint is malformed or belongs to another architecture.
    #[error("{}: {part}: {message} (at byte offset {offset})", path.display())]
    Checkpoint {
        path: PathBuf,
        /// The header, config, record or end of file.
        part: CheckpointPart,
        /// Byte offset in the file of the field that failed.
        offset: u64,
        /// What was found and what was expected.
        message: String,
    },

    /// A model file refused for what it is, before it is read: not a regular
    /// file (a FIFO, a device, a directory), or over its size cap.
    #[error("{what} {}: {refusal}", path.display())]
    Refused {
        path: PathBuf,
        /// `arch.json` or `checkpoint`.
        what: &'static str,
        refusal: FileRefusal,
    },

    /// A weight in the checkpoint is NaN or infinite. `index` is the first
    /// such value of the first such tensor in file order.
    #[error(
        "checkpoint {}: tensor '{tensor}' value {index} is {} (at byte offset {offset})",
        path.display(),
        non_finite_name(*value)
    )]
    NonFiniteWeight {
        path: PathBuf,
        /// The parameter name (`expert_0.param_4`).
        tensor: String,
        /// Index of the value inside the tensor.
        index: usize,
        /// The value: NaN, +inf or -inf.
        value: f32,
        /// Byte offset of the value in the file.
        offset: u64,
    },

    /// The in-memory weights cannot be written: a tensor's length disagrees
    /// with the dims, or a length does not fit the format's u32.
    #[error("{}: cannot write checkpoint: {message}", path.display())]
    InvalidWeights { path: PathBuf, message: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    /// A [`FileError`] on `path`: I/O failures are [`ModelError::Io`],
    /// refusals [`ModelError::Refused`] naming `what` the file is.
    pub(crate) fn file(path: impl Into<PathBuf>, what: &'static str, e: FileError) -> Self {
        match e {
            FileError::Io(source) => ModelError::io(path, source),
            FileError::Refused(refusal) => ModelError::Refused {
                path: path.into(),
                what,
                refusal,
            },
        }
    }
}

/// "NaN", "+inf" or "-inf" (a finite value is never reported).
fn non_finite_name(v: f32) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "+inf"
    } else {
        "-inf"
    }
}
