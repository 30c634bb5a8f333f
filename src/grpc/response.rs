//! The `ModelInferResponse` for a computed answer.
//!
//! Owns: the answer's tensors, always as `raw_output_contents`
//! (little-endian bytes, in the order the outputs were asked for: what
//! tritonclient reads FP32 outputs from), with their names, datatype and
//! shapes. Must not touch: which outputs were asked for (`request.rs`).

use bytes::{BufMut, Bytes, BytesMut};

use super::pb::ModelInferResponse;
use super::pb::model_infer_response::InferOutputTensor;
use crate::engine::InferOutput;
use crate::model::Dims;
use crate::oip::{FP32, OutputName};

/// Who answers: the model's name and version, and the request's `id`.
pub struct Answerer<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub id: String,
}

/// One output's values and row width.
fn tensor<'o>(output: &'o InferOutput, name: OutputName, dims: &Dims) -> (&'o [f32], usize) {
    match name {
        OutputName::Logits => (&output.logits, dims.output),
        OutputName::RouterWeights => (&output.router_weights, dims.experts),
    }
}

fn le_bytes(values: &[f32]) -> Bytes {
    let mut buf = BytesMut::with_capacity(values.len() * 4);
    for v in values {
        buf.put_f32_le(*v);
    }
    buf.freeze()
}

/// The answer to a `ModelInfer` (or one streamed request).
pub fn infer_response(who: Answerer, outputs: &[OutputName], out: &InferOutput, dims: &Dims) -> ModelInferResponse {
    let n_rows = out.logits.len() / dims.output.max(1);
    let (tensors, raw) = outputs
        .iter()
        .map(|&name| {
            let (values, width) = tensor(out, name, dims);
            let meta = InferOutputTensor {
                name: name.as_str().to_string(),
                datatype: FP32.to_string(),
                shape: vec![n_rows as i64, width as i64],
                ..Default::default()
            };
            (meta, le_bytes(values))
        })
        .unzip();
    ModelInferResponse {
        model_name: who.model.to_string(),
        model_version: who.version.to_string(),
        id: who.id,
        outputs: tensors,
        raw_output_contents: raw,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::ModelSize;

    #[test]
    fn outputs_are_raw_bytes_in_the_order_asked() {
        let dims = Dims::for_size(ModelSize::Nano);
        let out = InferOutput {
            logits: (0..dims.output * 2).map(|i| i as f32).collect(),
            router_weights: (0..dims.experts * 2).map(|i| -(i as f32)).collect(),
            queue_wait: Duration::ZERO,
            compute: Duration::ZERO,
        };
        let who = Answerer {
            model: "m",
            version: "7",
            id: "x".into(),
        };
        let r = infer_response(who, &[OutputName::RouterWeights, OutputName::Logits], &out, &dims);
        assert_eq!(
            (r.model_name.as_str(), r.model_version.as_str(), r.id.as_str()),
            ("m", "7", "x")
        );
        assert_eq!(r.outputs[0].name, "router_weights");
        assert_eq!(r.outputs[0].shape, vec![2, dims.experts as i64]);
        assert_eq!(r.outputs[1].shape, vec![2, dims.output as i64]);
        assert_eq!(r.raw_output_contents[0].len(), dims.experts * 2 * 4);
        assert_eq!(&r.raw_output_contents[1][4..8], &1.0f32.to_le_bytes());
        assert!(r.outputs.iter().all(|o| o.contents.is_none()));
    }
}
