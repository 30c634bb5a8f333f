//! `ModelInferRequest` -> a validated [`InferInput`] and the outputs asked for.
//!
//! Owns: reading the one input tensor from `raw_input_contents` (little-endian
//! bytes, what tritonclient and perf_analyzer send) or from typed
//! `contents.fp32_contents`, never both; the request's `priority`
//! parameter (an unsigned or non-negative integer); its other parameters
//! (`binary_data`, ...) are accepted and ignored, as they change nothing
//! here. The tensor rules themselves (name, datatype, shape, value
//! count, raw little-endian decoding, outputs) are the protocol core's
//! (`oip/tensor.rs`), the same as HTTP v2's; the input's rules (row length,
//! row limit, finiteness) are `InferInput::new`'s. Must not touch: status
//! codes (`status.rs`), which model is asked for (`model.rs` resolves it
//! first).

use super::pb::infer_parameter::ParameterChoice;
use super::pb::{InferParameter, InferTensorContents, ModelInferRequest};
use super::status::GrpcError;
use crate::input::{InferInput, InputLimits, RequestError};
use crate::oip::{self, Declared, INPUT, OutputName};

/// A parsed, validated `ModelInfer` request.
#[derive(Debug)]
pub struct InferCall {
    /// Echoed in the answer.
    pub id: String,
    pub input: InferInput,
    /// In the order asked (all, in the model's order, when none was named).
    pub outputs: Vec<OutputName>,
    /// The `priority` parameter (1 is the highest level; 0: none named).
    pub priority: u64,
}

/// The `priority` parameter: `uint64_param`, or a non-negative
/// `int64_param` (what tritonclient sends); 0 when absent.
fn priority(parameters: &std::collections::HashMap<String, InferParameter>) -> Result<u64, GrpcError> {
    let Some(param) = parameters.get("priority") else {
        return Ok(0);
    };
    match param.parameter_choice {
        Some(ParameterChoice::Uint64Param(level)) => Ok(level),
        Some(ParameterChoice::Int64Param(level)) if level >= 0 => Ok(level as u64),
        _ => Err(invalid(
            "parameter 'priority' must be a non-negative integer (1 is the highest level; 0: the default)".into(),
        )),
    }
}

fn invalid(msg: String) -> GrpcError {
    GrpcError::from(RequestError::Protocol(msg))
}

/// Validates `req` against the model's input and `limits`.
pub fn parse_infer(req: ModelInferRequest, limits: &InputLimits) -> Result<InferCall, GrpcError> {
    let ModelInferRequest {
        id,
        mut inputs,
        outputs,
        raw_input_contents: raw,
        parameters,
        ..
    } = req;
    let priority = priority(&parameters)?;
    if inputs.len() != 1 {
        return Err(invalid(format!(
            "expected 1 input ('{INPUT}') but got {}",
            inputs.len()
        )));
    }
    let tensor = inputs.swap_remove(0);
    oip::check_input(&tensor.name, &tensor.datatype)?;
    let declared = oip::declared_shape(&tensor.shape, limits)?;
    let values = match (raw.as_slice(), tensor.contents) {
        ([], None) => {
            return Err(invalid(format!(
                "input '{INPUT}' has neither contents nor raw_input_contents"
            )));
        }
        ([], Some(contents)) => typed_values(contents, &declared, &tensor.shape)?,
        ([bytes], None) => oip::raw_values(bytes, &declared, &tensor.shape, "raw_input_contents[0]")?,
        ([_], Some(_)) => {
            return Err(invalid(format!(
                "input '{INPUT}' has both contents and raw_input_contents"
            )));
        }
        (many, _) => {
            return Err(invalid(format!(
                "raw_input_contents has {} entries for 1 input",
                many.len()
            )));
        }
    };
    let input = InferInput::new(values, limits)?;
    let outputs = oip::requested_outputs(outputs.iter().map(|o| o.name.as_str()))?;
    Ok(InferCall {
        id,
        input,
        outputs,
        priority,
    })
}

/// The values of typed contents: `fp32_contents` only, exactly the shape's count.
fn typed_values(c: InferTensorContents, declared: &Declared, shape: &[i64]) -> Result<Vec<f32>, GrpcError> {
    let other_types = !c.bool_contents.is_empty()
        || !c.int_contents.is_empty()
        || !c.int64_contents.is_empty()
        || !c.uint_contents.is_empty()
        || !c.uint64_contents.is_empty()
        || !c.fp64_contents.is_empty()
        || !c.bytes_contents.is_empty();
    if other_types {
        return Err(invalid(format!(
            "input '{INPUT}' is {}: its typed contents must be fp32_contents",
            oip::FP32
        )));
    }
    oip::check_count(c.fp32_contents.len(), declared, shape, "fp32_contents values")?;
    Ok(c.fp32_contents)
}

#[cfg(test)]
mod tests {
    use super::super::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
    use super::*;

    const LIMITS: InputLimits = InputLimits {
        row_len: 2,
        max_rows: 4,
    };

    fn request(shape: Vec<i64>, raw: Option<Vec<f32>>, typed: Option<Vec<f32>>) -> ModelInferRequest {
        ModelInferRequest {
            id: "r1".into(),
            inputs: vec![InferInputTensor {
                name: INPUT.into(),
                datatype: "FP32".into(),
                shape,
                contents: typed.map(|v| InferTensorContents {
                    fp32_contents: v,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            raw_input_contents: raw
                .map(|v| vec![v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into()])
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    fn message(r: Result<InferCall, GrpcError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn raw_or_typed_contents_become_the_same_input() {
        let raw = parse_infer(request(vec![2, 2], Some(vec![1.0, 2.0, 3.0, 4.0]), None), &LIMITS).unwrap();
        let typed = parse_infer(request(vec![2, 2], None, Some(vec![1.0, 2.0, 3.0, 4.0])), &LIMITS).unwrap();
        assert_eq!(raw.input, typed.input);
        assert_eq!((raw.id.as_str(), raw.outputs.as_slice()), ("r1", &OutputName::ALL[..]));
    }

    #[test]
    fn contents_that_disagree_with_the_shape_are_refused() {
        let m = message(parse_infer(request(vec![2, 2], Some(vec![1.0; 3]), None), &LIMITS));
        assert!(m.contains("12 bytes") && m.contains("16 bytes"), "{m}");
        let m = message(parse_infer(request(vec![1, 2], None, Some(vec![1.0; 3])), &LIMITS));
        assert!(m.contains("3 fp32_contents"), "{m}");
        let m = message(parse_infer(
            request(vec![1, 2], Some(vec![1.0; 2]), Some(vec![1.0; 2])),
            &LIMITS,
        ));
        assert!(m.contains("both"), "{m}");
        let m = message(parse_infer(request(vec![1, 2], None, None), &LIMITS));
        assert!(m.contains("neither"), "{m}");
        let m = message(parse_infer(
            request(vec![1 << 40, 2], Some(vec![1.0; 2]), None),
            &LIMITS,
        ));
        assert!(m.contains("limit of 4"), "{m}");
        // A size that overflows is refused naming the shape (issue 21).
        let m = message(parse_infer(
            request(vec![(1 << 62) + 1, 2], Some(vec![1.0; 2]), None),
            &LIMITS,
        ));
        assert!(m.contains("[4611686018427387905, 2]") && m.contains("overflows"), "{m}");
        let mut r = request(vec![1, 2], None, None);
        r.inputs[0].contents = Some(InferTensorContents {
            int_contents: vec![1, 2],
            ..Default::default()
        });
        assert!(message(parse_infer(r, &LIMITS)).contains("fp32_contents"));
        let mut r = request(vec![1, 2], Some(vec![1.0; 2]), None);
        r.inputs[0].datatype = "INT32".into();
        assert!(message(parse_infer(r, &LIMITS)).contains("only FP32"));
        let mut r = request(vec![1, 2], Some(vec![1.0, f32::NAN]), None);
        r.inputs.push(r.inputs[0].clone());
        assert!(message(parse_infer(r, &LIMITS)).contains("got 2"));
        let r = request(vec![1, 2], Some(vec![1.0, f32::NAN]), None);
        assert!(message(parse_infer(r, &LIMITS)).contains("not finite"));
    }

    #[test]
    fn outputs_in_the_order_asked_each_once() {
        let mut r = request(vec![1, 2], Some(vec![1.0; 2]), None);
        let out = |name: &str| InferRequestedOutputTensor {
            name: name.into(),
            ..Default::default()
        };
        r.outputs = vec![out("router_weights"), out("logits")];
        let call = parse_infer(r.clone(), &LIMITS).unwrap();
        assert_eq!(call.outputs, vec![OutputName::RouterWeights, OutputName::Logits]);
        r.outputs = vec![out("logits"), out("logits")];
        assert!(message(parse_infer(r, &LIMITS)).contains("more than once"));
    }
}
