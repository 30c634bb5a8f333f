//! The Open Inference Protocol's tensor rules, whatever transport carried
//! the tensor.
//!
//! Owns: the model's tensor names and type ([`INPUT`], [`FP32`],
//! [`OutputName`]), the checks an input tensor passes before its values
//! are read: its name and datatype ([`check_input`]), the batch size,
//! element count and byte size its shape declares, each product checked for
//! overflow and the batch held to the row limit before any byte is compared
//! ([`declared_shape`]), the value count of its contents ([`check_count`]),
//! the decoding of raw little-endian contents ([`raw_values`]), the
//! requested outputs ([`requested_outputs`], [`add_output`]: known, each at
//! most once) and the answer's tensors ([`output_tensors`], [`le_bytes`]).
//! Errors are [`RequestError`]s whose text is the client's message; each
//! protocol maps them to its status in its own one place. The values
//! themselves (row length, finiteness) are judged by `InferInput::new`.
//! Must not touch: wire formats (JSON, protobuf), status codes, compute.

use crate::engine::InferOutput;
use crate::input::{InputLimits, RequestError, clip};
use crate::model::Dims;

/// The only tensor type the engine computes in; others are rejected by name.
pub const FP32: &str = "FP32";
/// The model's one input.
pub const INPUT: &str = "features";
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

fn invalid(msg: String) -> RequestError {
    RequestError::Protocol(msg)
}

/// The input is the model's: named `features`, of type FP32.
pub fn check_input(name: &str, datatype: &str) -> Result<(), RequestError> {
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
pub fn declared_shape(shape: &[i64], limits: &InputLimits) -> Result<Declared, RequestError> {
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
    // The validator's row limit, for a count declared before the values: a
    // shape over it is refused before its contents are compared to it.
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
pub fn raw_values(bytes: &[u8], declared: &Declared, shape: &[i64], what: &str) -> Result<Vec<f32>, RequestError> {
    if bytes.len() != declared.bytes {
        return Err(invalid(format!(
            "input '{INPUT}': {what} is {} bytes, but shape {shape:?} of {FP32} needs {} bytes",
            bytes.len(),
            declared.bytes
        )));
    }
    // Finiteness is the validator's rule (`InferInput::new`).
    Ok(bytes
        .chunks_exact(FP32_BYTES)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// `values` values came for a tensor whose shape needs `declared.values`;
/// `what` names them in the message (e.g. `fp32_contents values`).
pub fn check_count(values: usize, declared: &Declared, shape: &[i64], what: &str) -> Result<(), RequestError> {
    if values != declared.values {
        return Err(invalid(format!(
            "input '{INPUT}' has {values} {what}, but shape {shape:?} needs {}",
            declared.values
        )));
    }
    Ok(())
}

/// Adds the output named `name` to `outputs` (its name and whatever the
/// transport keeps with it): refused when unknown or already there.
pub fn add_output<T>(outputs: &mut Vec<(OutputName, T)>, name: &str, with: T) -> Result<(), RequestError> {
    let Some(output) = OutputName::parse(name) else {
        let names = OutputName::ALL.map(OutputName::as_str);
        let shown: String = name.chars().take(64).collect();
        return Err(invalid(format!(
            "unexpected inference output '{shown}': outputs are {names:?}"
        )));
    };
    if outputs.iter().any(|(o, _)| *o == output) {
        return Err(invalid(format!(
            "output '{}' is requested more than once",
            output.as_str()
        )));
    }
    outputs.push((output, with));
    Ok(())
}

/// The outputs asked for, by name, in the order asked; all of them, in the
/// model's order, when none is named. Unknown and repeated names are refused.
pub fn requested_outputs<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Vec<OutputName>, RequestError> {
    let mut outputs = Vec::with_capacity(OutputName::ALL.len());
    for name in names {
        add_output(&mut outputs, name, ())?;
    }
    if outputs.is_empty() {
        return Ok(OutputName::ALL.to_vec());
    }
    Ok(outputs.into_iter().map(|(o, ())| o).collect())
}

/// One output tensor of an answer: its name, its `[rows, width]` shape and
/// its values, row-major.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputTensor<'o> {
    pub name: OutputName,
    pub shape: [usize; 2],
    pub values: &'o [f32],
}

impl OutputTensor<'_> {
    /// The shape as the protocol's `int64` dimensions.
    pub fn shape_i64(&self) -> Vec<i64> {
        self.shape.iter().map(|&d| d as i64).collect()
    }
}

/// The answer's tensors for `requested`, in the order asked.
pub fn output_tensors<'o>(
    output: &'o InferOutput,
    dims: &Dims,
    requested: impl IntoIterator<Item = OutputName>,
) -> Vec<OutputTensor<'o>> {
    let n_rows = output.logits.len() / dims.output.max(1);
    requested
        .into_iter()
        .map(|name| {
            let (values, width) = match name {
                OutputName::Logits => (&output.logits[..], dims.output),
                OutputName::RouterWeights => (&output.router_weights[..], dims.experts),
            };
            OutputTensor {
                name,
                shape: [n_rows, width],
                values,
            }
        })
        .collect()
}

/// Each output's row width, in the model's order.
pub fn output_widths(dims: &Dims) -> [(OutputName, usize); 2] {
    [
        (OutputName::Logits, dims.output),
        (OutputName::RouterWeights, dims.experts),
    ]
}

/// `values` as raw little-endian FP32 bytes (binary tensor data, gRPC's
/// `raw_output_contents`), appended to `out`.
pub fn le_bytes(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * FP32_BYTES);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                matches!(declared_shape(bad, &LIMITS), Err(RequestError::Protocol(m)) if m.contains("shape")),
                "{bad:?}"
            );
        }
        // Over the row limit, but sizes that fit: the row limit answers.
        assert_eq!(
            declared_shape(&[1 << 40, 4], &LIMITS),
            Err(RequestError::TooManyRows {
                rows: 1 << 40,
                limit: 8
            })
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
