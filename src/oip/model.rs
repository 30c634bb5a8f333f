//! The Open Inference Protocol's model facts: which version a request
//! names, and a version's metadata, configuration and statistics as neutral
//! types that HTTP (JSON) and gRPC (protobuf) only render.
//!
//! Owns: model resolution from the protocol's (name, version string) to a
//! [`ModelTarget`] ([`target`]: an empty version is whichever serves, a
//! version that is not a number names nothing), the version string
//! ([`version_of`]), [`ModelMetadata`], [`ModelConfig`] and
//! [`ModelStatistics`] (the one place a version's statistics are read).
//! Must not touch: wire formats, status codes, which version serves (the
//! engine's registry decides).

use crate::engine::ServedVersion;
use crate::engine::{ModelDescription, ModelTarget};
use crate::stats::StatsSnapshot;

use super::error::UnknownVersion;
use super::tensor::{FP32, INPUT, output_widths};

/// The `platform` of the served model in metadata and config.
pub const PLATFORM: &str = "tokitai_moe";

/// The model version `model` and `version` name: an empty version is the
/// version the model serves now; one that is not a number names nothing.
pub fn target<'a>(model: &'a str, version: Option<&str>) -> Result<ModelTarget<'a>, UnknownVersion> {
    let version = match version {
        None | Some("") => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| UnknownVersion::new(model, v))?),
    };
    Ok(ModelTarget::named(model, version))
}

/// The model's version on the protocol: its repository folder (the
/// checkpoint's training step with `--arch/--checkpoint`).
pub fn version_of(description: &ModelDescription) -> String {
    description.version.to_string()
}

/// A tensor in metadata and config: its name, datatype and row width (its
/// shape is `[-1, width]`: any batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: &'static str,
    pub datatype: &'static str,
    pub width: usize,
}

impl TensorInfo {
    /// The metadata's shape: any batch of rows `width` long.
    pub fn shape(&self) -> [i64; 2] {
        [-1, self.width as i64]
    }
}

fn tensors(description: &ModelDescription) -> (TensorInfo, [TensorInfo; 2]) {
    let d = description.dims;
    let tensor = |name, width| TensorInfo {
        name,
        datatype: FP32,
        width,
    };
    let outputs = output_widths(&d).map(|(o, w)| tensor(o.as_str(), w));
    (tensor(INPUT, d.input), outputs)
}

/// A model version's metadata (`GET /v2/models/{model}`, `ModelMetadata`).
#[derive(Debug, Clone)]
pub struct ModelMetadata<'a> {
    pub name: &'a str,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Everything else known about the version (HTTP lists some of it as
    /// `parameters`).
    pub description: &'a ModelDescription,
}

/// The metadata of the version `description` describes.
pub fn metadata(description: &ModelDescription) -> ModelMetadata<'_> {
    let (input, outputs) = tensors(description);
    ModelMetadata {
        name: &description.name,
        versions: vec![version_of(description)],
        platform: PLATFORM,
        inputs: vec![input],
        outputs: outputs.to_vec(),
        description,
    }
}

/// A model version's configuration (Triton's model-configuration
/// extension): batching on, up to the row limit, one version served.
#[derive(Debug, Clone)]
pub struct ModelConfig<'a> {
    pub name: &'a str,
    pub platform: &'static str,
    pub backend: &'static str,
    /// The row limit (`batching.max_request_rows`).
    pub max_batch_size: usize,
    /// Rows of `width` values each: `dims` is `[width]`.
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// The version policy's `latest.num_versions`.
    pub latest_versions: u32,
}

/// The configuration of `version`.
pub fn config(version: &ServedVersion) -> ModelConfig<'_> {
    let description = version.description();
    let (input, outputs) = tensors(description);
    ModelConfig {
        name: &description.name,
        platform: PLATFORM,
        backend: description.backend,
        max_batch_size: version.limits().max_rows,
        inputs: vec![input],
        outputs: outputs.to_vec(),
        latest_versions: 1,
    }
}

/// A model version's statistics (Triton's statistics extension): the same
/// counters over HTTP's `/stats` and gRPC's `ModelStatistics`.
#[derive(Debug, Clone)]
pub struct ModelStatistics {
    pub name: String,
    pub version: String,
    pub counts: StatsSnapshot,
}

impl ModelStatistics {
    /// Each duration of the `inference_stats`, by its name in the protocol,
    /// as (count, ns). Cache hits and misses are always zero (no cache).
    pub fn durations(&self) -> [(&'static str, (u64, u64)); 8] {
        let s = &self.counts;
        [
            ("success", s.success),
            ("fail", s.fail),
            ("queue", s.queue),
            ("compute_input", s.compute_input()),
            ("compute_infer", s.compute_infer),
            ("compute_output", s.compute_output()),
            ("cache_hit", (0, 0)),
            ("cache_miss", (0, 0)),
        ]
    }
}

/// The statistics of `version`: the one place they are read.
pub fn statistics(version: &ServedVersion) -> ModelStatistics {
    let counts = version.stats().snapshot();
    ModelStatistics {
        name: version.description().name.clone(),
        version: version_of(version.description()),
        counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_empty_a_number_or_names_nothing() {
        assert_eq!(target("m", None).unwrap(), ModelTarget::named("m", None));
        assert_eq!(target("m", Some("")).unwrap(), ModelTarget::named("m", None));
        assert_eq!(target("m", Some("7")).unwrap(), ModelTarget::named("m", Some(7)));
        let err = target("m", Some("latest")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Request for unknown model: 'm' version latest is not found"
        );
        // A long name or version is clipped in the message.
        let long = "v".repeat(1000);
        assert!(target("m", Some(&long)).unwrap_err().to_string().len() < 300);
    }
}
