//! The `ModelInferResponse` for a computed answer.
//!
//! Owns: rendering the protocol core's output tensors
//! (`oip::output_tensors`), always as `raw_output_contents` (little-endian
//! bytes, in the order the outputs were asked for: what tritonclient reads
//! FP32 outputs from), with their names, datatype and shapes. Must not
//! touch: which outputs were asked for (`request.rs`).

use bytes::Bytes;

use super::pb::ModelInferResponse;
use super::pb::model_infer_response::InferOutputTensor;
use crate::engine::InferOutput;
use crate::model::Dims;
use crate::oip::{self, FP32, OutputName};

/// Who answers: the model's name and version, and the request's `id`.
pub struct Answerer<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub id: String,
}

/// The answer to a `ModelInfer` (or one streamed request).
pub fn infer_response(who: Answerer, outputs: &[OutputName], out: &InferOutput, dims: &Dims) -> ModelInferResponse {
    let (tensors, raw) = oip::output_tensors(out, dims, outputs.iter().copied())
        .into_iter()
        .map(|t| {
            let meta = InferOutputTensor {
                name: t.name.as_str().to_string(),
                datatype: FP32.to_string(),
                shape: t.shape_i64(),
                ..Default::default()
            };
            let mut bytes = Vec::new();
            oip::le_bytes(t.values, &mut bytes);
            (meta, Bytes::from(bytes))
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
            batch_rows: 2,
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
