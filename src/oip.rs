//! The Open Inference Protocol's model facts and tensor rules, shared by its
//! two transports: HTTP (`http/v2/`) and gRPC (`grpc/`).
//!
//! Owns: the served model's tensor names and type ([`INPUT`], [`FP32`],
//! [`OutputName`]), the extensions the server lists, the model's version
//! string, and the checks an input tensor passes whatever carried it: its
//! name and datatype ([`check_input`]), the batch size, element count and
//! byte size its shape declares, each product checked for overflow, within
//! the row limit ([`declared_shape`]), the byte length of raw contents
//! ([`raw_values`]) and the requested outputs ([`requested_outputs`]: known,
//! each at most once). Errors are [`ServeError`]s whose text is the client's
//! message; each protocol maps them to its status in its own one place. Must
//! not touch: wire formats (JSON, protobuf), status codes, compute.

use crate::engine::ModelDescription;
use crate::error::ServeError;
use crate::input::{InputLimits, clip};

/// The only tensor type the engine computes in; others are rejected by name.
pub const FP32: &str = "FP32";
/// The model's one input.
pub const INPUT: &str = "features";
/// The `platform` of the served model in metadata and config.
pub const PLATFORM: &str = "tokitai_moe";
/// The protocol extensions the server supports (`GET /v2`, `ServerMetadata`).
pub const EXTENSIONS: [&str; 4] = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
];

/// The model's outputs, in the model's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputName {
    Logits,
    RouterWeights,
}

impl OutputName {
    pub const ALL: [OutputName; 2] = [OutputName::Logits, OutputName::RouterWeights];

    pub fn as_str(self) -> &'static str {
        match self {
            OutputName::Logits => "logits",
            OutputName::RouterWeights => "router_weights",
        }
    }

    pub fn parse(name: &str) -> Option<OutputName> {
        OutputName::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

/// The model's version on the protocol: its repository folder (the
/// checkpoint's training step with `--arch/--checkpoint`).
pub fn version_of(description: &ModelDescription) -> String {
    description.version.to_string()
}

fn invalid(msg: String) -> ServeError {
    ServeError::BadRequest(msg)
}

/// The input is the model's: named `features`, of type FP32.
pub fn check_input(name: &str, datatype: &str) -> Result<(), ServeError> {
    let name = clip(name);
    if name != INPUT {
        return Err(invalid(format!(
            "unexpected inference input '{name}': the model's input is '{INPUT}'"
        )));
    }
    let datatype = clip(datatype);
    if datatype != FP32 {
        return Err(invalid(format!(
            "input '{INPUT}' has datatype {datatype}, but only {FP32} is accepted"
        )));
    }
    Ok(())
}

/// Bytes of one FP32 element.
pub const FP32_BYTES: usize = 4;

/// What a valid input shape declares: its rows, and the element count and
/// byte size those rows take, each computed without overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    pub rows: usize,
    /// `rows × row_len` elements.
    pub values: usize,
    /// `values × 4` bytes of FP32.
    pub bytes: usize,
}

/// The rows, elements and bytes `shape` declares (`[batch, row_len]`,
/// batch >= 1), within the row limit. Every product is checked: a shape
/// whose byte size does not fit in a `usize` is refused naming the shape,
/// whatever the row limit, so no size is ever computed wrapped.
pub fn declared_shape(shape: &[i64], limits: &InputLimits) -> Result<Declared, ServeError> {
    let shown = || -> Vec<i64> { shape.iter().copied().take(8).collect() };
    let n_rows = match shape {
        [n, d] if *n >= 1 && *d == limits.row_len as i64 => usize::try_from(*n).unwrap_or(usize::MAX),
        _ => {
            return Err(invalid(format!(
                "input '{INPUT}' has shape {:?}, expected [batch, {}] with batch >= 1",
                shown(),
                limits.row_len
            )));
        }
    };
    let sizes = n_rows
        .checked_mul(limits.row_len)
        .and_then(|values| Some((values, values.checked_mul(FP32_BYTES)?)));
    let Some((values, bytes)) = sizes else {
        return Err(invalid(format!(
            "input '{INPUT}' has shape {:?}, whose size in {FP32} bytes overflows: it cannot be a real tensor",
            shown()
        )));
    };
    limits.check_rows(n_rows)?;
    Ok(Declared {
        rows: n_rows,
        values,
        bytes,
    })
}

/// The little-endian f32 values of `bytes`, which must be exactly the
/// `declared` size. `what` names the bytes in the message (e.g.
/// `raw_input_contents[0]`).
pub fn raw_values(bytes: &[u8], declared: &Declared, shape: &[i64], what: &str) -> Result<Vec<f32>, ServeError> {
    if bytes.len() != declared.bytes {
        return Err(invalid(format!(
            "input '{INPUT}': {what} is {} bytes, but shape {shape:?} of {FP32} needs {} bytes",
            bytes.len(),
            declared.bytes
        )));
    }
    // Finiteness is checked once, by `InferInput::new`.
    Ok(bytes
        .chunks_exact(FP32_BYTES)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The outputs asked for, by name, in the order asked; all of them, in the
/// model's order, when none is named. Unknown and repeated names are refused.
pub fn requested_outputs<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Vec<OutputName>, ServeError> {
    let mut outputs = Vec::with_capacity(OutputName::ALL.len());
    for name in names {
        let Some(output) = OutputName::parse(name) else {
            let names = OutputName::ALL.map(OutputName::as_str);
            let shown: String = name.chars().take(64).collect();
            return Err(invalid(format!(
                "unexpected inference output '{shown}': outputs are {names:?}"
            )));
        };
        if outputs.contains(&output) {
            return Err(invalid(format!(
                "output '{}' is requested more than once",
                output.as_str()
            )));
        }
        outputs.push(output);
    }
    if outputs.is_empty() {
        outputs.extend(OutputName::ALL);
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::RequestError;

    const LIMITS: InputLimits = InputLimits {
        row_len: 4,
        max_rows: 8,
    };

    #[test]
    fn shapes_are_the_models_and_within_the_row_limit() {
        let d = declared_shape(&[3, 4], &LIMITS).unwrap();
        assert_eq!(
            d,
            Declared {
                rows: 3,
                values: 12,
                bytes: 48
            }
        );
        for bad in [&[0, 4][..], &[-1, 4], &[2, 5], &[8], &[1, 2, 4], &[]] {
            assert!(
                matches!(declared_shape(bad, &LIMITS), Err(ServeError::BadRequest(m)) if m.contains("shape")),
                "{bad:?}"
            );
        }
        // Over the row limit, but sizes that fit: the row limit answers.
        assert_eq!(
            declared_shape(&[1 << 40, 4], &LIMITS),
            Err(ServeError::Request(RequestError::TooManyRows {
                rows: 1 << 40,
                limit: 8
            }))
        );
    }

    #[test]
    fn shapes_whose_size_overflows_are_refused_naming_the_shape_whatever_the_row_limit() {
        // Issue 21: 2^57 + 1 rows of 96 FP32 is 3 * 2^64 + 384 bytes, which
        // wrapped to one row's 384 bytes.
        let unlimited = InputLimits {
            row_len: 96,
            max_rows: usize::MAX,
        };
        let rows = (1i64 << 57) + 1;
        for (shape, limits) in [
            (vec![rows, 96], unlimited),
            (vec![i64::MAX, 96], unlimited),
            (vec![i64::MAX, 4], LIMITS),
        ] {
            let err = declared_shape(&shape, &limits).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{shape:?}")) && err.contains("overflows"),
                "{err}"
            );
        }
        let one_row: Vec<u8> = vec![0; 96 * 4];
        let fits = declared_shape(&[1, 96], &unlimited).unwrap();
        assert_eq!(raw_values(&one_row, &fits, &[1, 96], "raw").unwrap().len(), 96);
    }

    #[test]
    fn raw_contents_must_match_the_shape_exactly() {
        let bytes: Vec<u8> = [1.0f32, -2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let limits = InputLimits {
            row_len: 2,
            max_rows: 8,
        };
        let one = declared_shape(&[1, 2], &limits).unwrap();
        assert_eq!(raw_values(&bytes, &one, &[1, 2], "raw").unwrap(), vec![1.0, -2.5]);
        let two = declared_shape(&[2, 2], &limits).unwrap();
        let err = raw_values(&bytes, &two, &[2, 2], "raw").unwrap_err().to_string();
        assert!(err.contains("8 bytes") && err.contains("16 bytes"), "{err}");
        assert!(raw_values(&bytes[..7], &one, &[1, 2], "raw").is_err());
    }

    #[test]
    fn outputs_are_known_once_each_and_default_to_all() {
        assert_eq!(requested_outputs([]).unwrap(), OutputName::ALL.to_vec());
        assert_eq!(
            requested_outputs(["router_weights", "logits"]).unwrap(),
            vec![OutputName::RouterWeights, OutputName::Logits]
        );
        assert!(requested_outputs(["logits", "logits"]).is_err());
        assert!(requested_outputs(["nope"]).is_err());
        assert!(check_input("features", "FP32").is_ok());
        assert!(check_input("features", "FP16").is_err());
        assert!(check_input("x", "FP32").is_err());
    }
}
