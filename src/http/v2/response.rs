//! The Open Inference Protocol's infer answer: a JSON header written straight
//! from typed fields (no `serde_json::Value` tree on the hot path), followed
//! by the raw bytes of the outputs asked for in binary form.
//!
//! Owns: the answer's bytes and content headers, rendering the protocol
//! core's output tensors (`oip::output_tensors`). Must not touch: which
//! outputs were asked for (`request.rs`), status codes.

use actix_web::{HttpResponse, HttpResponseBuilder};
use serde::Serialize;

use super::HEADER_LENGTH;
use super::request::OutputRequest;
use crate::engine::InferOutput;
use crate::model::Dims;
use crate::oip::{self, FP32};

#[derive(Serialize)]
struct OutputTensor<'a> {
    name: &'static str,
    datatype: &'static str,
    shape: [usize; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a [f32]>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

#[derive(Serialize)]
struct ResponseHead<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputTensor<'a>>,
}

/// Who answers, for the header's `model_name` / `model_version` / `id`.
pub struct Answerer<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub id: Option<&'a str>,
}

/// Writes the answer into `response`; binary outputs follow the JSON header.
pub fn write_response(
    mut response: HttpResponseBuilder,
    who: &Answerer,
    requested: &[OutputRequest],
    output: &InferOutput,
    dims: &Dims,
) -> HttpResponse {
    let tensors = oip::output_tensors(output, dims, requested.iter().map(|r| r.output));
    let outputs = requested
        .iter()
        .zip(&tensors)
        .map(|(r, t)| OutputTensor {
            name: t.name.as_str(),
            datatype: FP32,
            shape: t.shape,
            parameters: r.binary.then_some(BinarySize {
                binary_data_size: t.values.len() * oip::FP32_BYTES,
            }),
            data: (!r.binary).then_some(t.values),
        })
        .collect();
    let head = ResponseHead {
        model_name: who.model,
        model_version: who.version,
        id: who.id,
        outputs,
    };
    let head = serde_json::to_vec(&head).expect("serialising to a Vec cannot fail");
    let binary: Vec<&[f32]> = requested
        .iter()
        .zip(&tensors)
        .filter(|(r, _)| r.binary)
        .map(|(_, t)| t.values)
        .collect();
    let binary_len: usize = binary.iter().map(|v| v.len() * oip::FP32_BYTES).sum();
    if binary_len == 0 {
        return response.content_type("application/json").body(head);
    }
    let mut body = Vec::with_capacity(head.len() + binary_len);
    body.extend_from_slice(&head);
    for values in binary {
        oip::le_bytes(values, &mut body);
    }
    response
        .content_type("application/octet-stream")
        .insert_header((HEADER_LENGTH, head.len().to_string()))
        .body(body)
}
