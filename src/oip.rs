//! The Open Inference Protocol's model facts and tensor rules, shared by its
//! two transports: HTTP (`http/v2/`) and gRPC (`grpc/`).
//!
//! Owns: the served model's tensor names and type ([`INPUT`], [`FP32`],
//! [`OutputName`]), the extensions the server lists, the model's version
//! string, and the checks an input tensor passes whatever carried it: its
//! name and datatype ([`check_input`]), the batch size its shape declares
//! within the row limit ([`declared_rows`]), the byte length of raw contents
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

/// The batch size `shape` declares (`[batch, row_len]`, batch >= 1), within
/// the row limit. A shape whose element count would overflow is refused by
/// the row limit before anything is multiplied.
pub fn declared_rows(shape: &[i64], limits: &InputLimits) -> Result<usize, ServeError> {
    let n_rows = match shape {
        [n, d] if *n >= 1 && *d == limits.row_len as i64 => usize::try_from(*n).unwrap_or(usize::MAX),
        _ => {
            let shown: Vec<i64> = shape.iter().copied().take(8).collect();
            return Err(invalid(format!(
                "input '{INPUT}' has shape {shown:?}, expected [batch, {}] with batch >= 1",
                limits.row_len
            )));
        }
    };
    limits.check_rows(n_rows)?;
    Ok(n_rows)
}

/// `expected` little-endian f32 values from `bytes`, which must hold exactly
/// that many. `what` names the bytes in the message (e.g. `raw_input_contents[0]`).
pub fn raw_values(bytes: &[u8], expected: usize, shape: &[i64], what: &str) -> Result<Vec<f32>, ServeError> {
    if bytes.len() as u64 != expected as u64 * 4 {
        return Err(invalid(format!(
            "input '{INPUT}': {what} is {} bytes, but shape {shape:?} of {FP32} needs {} bytes",
            bytes.len(),
            expected * 4
        )));
    }
    // Finiteness is checked once, by `InferInput::new`.
    Ok(bytes
        .chunks_exact(4)
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
        assert_eq!(declared_rows(&[3, 4], &LIMITS).unwrap(), 3);
        for bad in [&[0, 4][..], &[-1, 4], &[2, 5], &[8], &[1, 2, 4], &[]] {
            assert!(
                matches!(declared_rows(bad, &LIMITS), Err(ServeError::BadRequest(m)) if m.contains("shape")),
                "{bad:?}"
            );
        }
        // Huge batches are refused by the row limit, never multiplied.
        assert_eq!(
            declared_rows(&[i64::MAX, 4], &LIMITS),
            Err(ServeError::Request(RequestError::TooManyRows {
                rows: i64::MAX as usize,
                limit: 8
            }))
        );
    }

    #[test]
    fn raw_contents_must_match_the_shape_exactly() {
        let bytes: Vec<u8> = [1.0f32, -2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(raw_values(&bytes, 2, &[1, 2], "raw").unwrap(), vec![1.0, -2.5]);
        assert!(raw_values(&bytes, 3, &[1, 3], "raw").is_err());
        assert!(raw_values(&bytes[..7], 2, &[1, 2], "raw").is_err());
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
