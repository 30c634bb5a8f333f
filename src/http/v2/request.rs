//! The Open Inference Protocol's infer request: the JSON header, the
//! optional binary tensor bytes after it, and which outputs are asked for.
//!
//! Owns: turning a request body into an [`InferInput`] (from JSON `data`, flat
//! or nested, or from Triton's binary tensor extension) checked against the
//! declared `shape` and the engine's limits, and the list of requested
//! outputs ([`OutputRequest`]). Must not touch: status codes (errors are
//! [`V2Error`]s mapped in `http/error.rs`), compute, the answer's format
//! (`response.rs`).

use serde::Deserialize;
use serde_json::Value;

use super::{FP32, INPUT, invalid};
use crate::http::error::V2Error;
use crate::input::{InferInput, InputLimits};

/// The JSON part of an infer request.
#[derive(Deserialize)]
pub struct InferHeader {
    pub id: Option<Value>,
    #[serde(default)]
    parameters: RequestParameters,
    #[serde(default)]
    inputs: Vec<InputTensor>,
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize, Default)]
struct RequestParameters {
    #[serde(default)]
    binary_data_output: bool,
}

#[derive(Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: TensorParameters,
    data: Option<Value>,
}

#[derive(Deserialize, Default)]
struct TensorParameters {
    binary_data_size: Option<u64>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: OutputParameters,
}

#[derive(Deserialize, Default)]
struct OutputParameters {
    binary_data: Option<bool>,
}

/// The model's outputs.
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

    fn parse(name: &str) -> Option<OutputName> {
        OutputName::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

/// One output the client asked for, and whether it is answered as raw
/// bytes after the JSON header (the binary tensor extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRequest {
    pub output: OutputName,
    pub binary: bool,
}

/// A parsed infer request: its header and its validated input.
pub struct V2Request {
    pub header: InferHeader,
    pub input: InferInput,
    pub outputs: Vec<OutputRequest>,
}

/// Parses `json` (the header) and `binary` (the bytes after it).
pub fn parse_request(json: &[u8], binary: &[u8], limits: &InputLimits) -> Result<V2Request, V2Error> {
    let header: InferHeader =
        serde_json::from_slice(json).map_err(|e| invalid(format!("failed to parse the request JSON: {e}")))?;
    let input = read_input(&header, binary, limits)?;
    let outputs = requested_outputs(&header)?;
    Ok(V2Request { header, input, outputs })
}

/// The `features` input, checked against the model and the limits.
fn read_input(header: &InferHeader, binary: &[u8], limits: &InputLimits) -> Result<InferInput, V2Error> {
    let input = the_input(header)?;
    let n_rows = declared_rows(input, limits)?;
    let expected = n_rows * limits.row_len;
    let values = match (input.parameters.binary_data_size, &input.data) {
        (Some(_), Some(_)) => return Err(invalid(format!("input '{INPUT}' has both binary_data_size and data"))),
        (Some(size), None) => binary_values(input, size, binary, expected)?,
        (None, Some(data)) => json_values(input, data, binary, expected)?,
        (None, None) => {
            return Err(invalid(format!(
                "input '{INPUT}' has neither data nor binary_data_size"
            )));
        }
    };
    Ok(InferInput::new(values, limits)?)
}

/// The request's one input, named and typed as the model's.
fn the_input(header: &InferHeader) -> Result<&InputTensor, V2Error> {
    let [input] = header.inputs.as_slice() else {
        return Err(invalid(format!(
            "expected 1 input ('{INPUT}') but got {}",
            header.inputs.len()
        )));
    };
    if input.name != INPUT {
        return Err(invalid(format!(
            "unexpected inference input '{}': the model's input is '{INPUT}'",
            input.name
        )));
    }
    if input.datatype != FP32 {
        return Err(invalid(format!(
            "input '{INPUT}' has datatype {}, but only {FP32} is accepted",
            input.datatype
        )));
    }
    Ok(input)
}

/// The batch size the input's `shape` declares, within the row limit.
fn declared_rows(input: &InputTensor, limits: &InputLimits) -> Result<usize, V2Error> {
    let n_rows = match input.shape.as_slice() {
        [n, d] if *n >= 1 && *d == limits.row_len as i64 => usize::try_from(*n).unwrap_or(usize::MAX),
        _ => {
            return Err(invalid(format!(
                "input '{INPUT}' has shape {:?}, expected [batch, {}] with batch >= 1",
                input.shape, limits.row_len
            )));
        }
    };
    limits.check_rows(n_rows)?;
    Ok(n_rows)
}

/// Values from the binary part: exactly the shape's bytes, little-endian.
fn binary_values(input: &InputTensor, size: u64, binary: &[u8], expected: usize) -> Result<Vec<f32>, V2Error> {
    if size != binary.len() as u64 || size != (expected * 4) as u64 {
        return Err(invalid(format!(
            "input '{INPUT}' binary_data_size is {size}, the binary part is {} bytes, and shape {:?} needs {} bytes",
            binary.len(),
            input.shape,
            expected * 4
        )));
    }
    let values: Vec<f32> = binary
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!("input '{INPUT}' element {i} is not finite")));
    }
    Ok(values)
}

/// Values from JSON `data` (flat or nested): exactly the shape's count.
fn json_values(input: &InputTensor, data: &Value, binary: &[u8], expected: usize) -> Result<Vec<f32>, V2Error> {
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} unexpected binary bytes after the JSON header",
            binary.len()
        )));
    }
    let mut values = Vec::with_capacity(expected);
    flatten(data, &mut values, expected)?;
    if values.len() != expected {
        return Err(invalid(format!(
            "input '{INPUT}' has {} values, but shape {:?} needs {expected}",
            values.len(),
            input.shape
        )));
    }
    Ok(values)
}

/// Flattens (possibly nested) JSON `data` into `out`, stopping past `limit`.
fn flatten(value: &Value, out: &mut Vec<f32>, limit: usize) -> Result<(), V2Error> {
    match value {
        Value::Array(items) => {
            for item in items {
                if out.len() > limit {
                    break;
                }
                flatten(item, out, limit)?;
            }
            Ok(())
        }
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or(f64::NAN) as f32;
            if !v.is_finite() {
                return Err(invalid(format!(
                    "input '{INPUT}' element {} ({n}) is not a finite FP32 value",
                    out.len()
                )));
            }
            out.push(v);
            Ok(())
        }
        other => Err(invalid(format!(
            "input '{INPUT}' element {} is not a number: {}",
            out.len(),
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::String(_) => "a string",
                _ => "an object",
            }
        ))),
    }
}

/// Which outputs to return, and whether each goes in binary form.
fn requested_outputs(header: &InferHeader) -> Result<Vec<OutputRequest>, V2Error> {
    let default_binary = header.parameters.binary_data_output;
    match &header.outputs {
        None => Ok(OutputName::ALL
            .into_iter()
            .map(|output| OutputRequest {
                output,
                binary: default_binary,
            })
            .collect()),
        Some(list) => list
            .iter()
            .map(|o| {
                let output = OutputName::parse(&o.name).ok_or_else(|| {
                    let names = OutputName::ALL.map(OutputName::as_str);
                    invalid(format!(
                        "unexpected inference output '{}': outputs are {names:?}",
                        o.name
                    ))
                })?;
                Ok(OutputRequest {
                    output,
                    binary: o.parameters.binary_data.unwrap_or(default_binary),
                })
            })
            .collect(),
    }
}
