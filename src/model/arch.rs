//! `arch.json`: the architecture record the training runner writes.
//!
//! Owns: parsing and validating arch.json ([`Arch`]), the size table
//! ([`ModelSize`]), and [`Dims`], the run-time shapes every other module takes
//! its sizes from. Must not touch: the checkpoint bytes or any kernel.
//!
//! Validation follows the upstream loader: the explicit dims must agree with
//! the size's `(hidden_dim, expert_depth)`, `input_dim`/`output_dim`/
//! `n_experts`/`top_k` must be the released 96/20/4/2, and `model_kind` must be
//! `MoE`. Unknown extra fields are accepted; `fingerprint` and `param_count`
//! are reported, never trusted. Every rejection names the field and both values.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ModelError;
use super::files::read_regular_file;

/// The released size variants; each fixes `(hidden_dim, expert_depth)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelSize {
    Nano,
    Tiny,
    Medium,
    Full,
}

impl ModelSize {
    /// `(hidden_dim, expert_depth)` for this size, as the upstream table fixes them.
    pub fn hidden_and_depth(self) -> (usize, usize) {
        match self {
            ModelSize::Nano => (128, 2),
            ModelSize::Tiny => (2048, 5),
            ModelSize::Medium => (4096, 5),
            ModelSize::Full => (4096, 12),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelSize::Nano => "Nano",
            ModelSize::Tiny => "Tiny",
            ModelSize::Medium => "Medium",
            ModelSize::Full => "Full",
        }
    }
}

/// Run-time shapes of a model. Kernels and validation read sizes from here,
/// never from constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dims {
    /// Features per input row (96 for every released size).
    pub input: usize,
    /// Expert width H.
    pub hidden: usize,
    /// Logits per row (20).
    pub output: usize,
    /// Number of experts E (4).
    pub experts: usize,
    /// Experts used per row (2).
    pub top_k: usize,
    /// Hidden blocks per expert D.
    pub depth: usize,
}

impl Dims {
    /// The released shapes for `size`: 96 in, 20 out, 4 experts, top-2.
    pub fn for_size(size: ModelSize) -> Dims {
        let (hidden, depth) = size.hidden_and_depth();
        Dims {
            input: 96,
            hidden,
            output: 20,
            experts: 4,
            top_k: 2,
            depth,
        }
    }
}

impl ModelSize {
    /// Every size, smallest first.
    pub const ALL: [ModelSize; 4] = [ModelSize::Nano, ModelSize::Tiny, ModelSize::Medium, ModelSize::Full];

    /// The exact spelling arch.json uses (`"Nano"`, ...), case-sensitive as upstream.
    pub fn from_arch_name(name: &str) -> Option<ModelSize> {
        ModelSize::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for ModelSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Case-insensitive, for command lines (`--size tiny`). arch.json itself is
/// parsed case-sensitively by [`Arch::from_json_str`], as upstream does.
impl std::str::FromStr for ModelSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelSize::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown size {s:?}: expected one of nano, tiny, medium, full"))
    }
}

/// The model family. Only the Mixture-of-Experts family is served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelKind {
    #[default]
    MoE,
    Dense,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::MoE => "MoE",
            ModelKind::Dense => "Dense",
        }
    }
}

/// The router the model was trained with. Recorded only: every kind runs the
/// same forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RouterKind {
    #[default]
    SheafPadic,
    SheafOnly,
    SoftmaxOnly,
}

impl RouterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterKind::SheafPadic => "SheafPadic",
            RouterKind::SheafOnly => "SheafOnly",
            RouterKind::SoftmaxOnly => "SoftmaxOnly",
        }
    }
}

/// A validated `arch.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arch {
    pub size: ModelSize,
    pub input_dim: usize,
    pub hidden_dim: usize,
    pub output_dim: usize,
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_depth: usize,
    /// Init seed; not needed for inference.
    pub seed: u64,
    pub model_kind: ModelKind,
    pub router_kind: RouterKind,
    /// As found in the file (the runner's fingerprint); reported, not trusted.
    pub fingerprint: Option<String>,
    /// As found in the file; reported, not trusted (see [`Dims::param_count`]).
    pub param_count: Option<u64>,
}

/// The released values of the dims every size shares (the upstream loader's checks).
const RELEASED_INPUT: usize = 96;
const RELEASED_OUTPUT: usize = 20;
const RELEASED_EXPERTS: usize = 4;
const RELEASED_TOP_K: usize = 2;

/// Upper bound on an arch.json file (real ones are under 300 bytes).
const MAX_ARCH_JSON: u64 = 1 << 20;

/// The label arch errors use when the JSON did not come from a file.
const ARCH_LABEL: &str = "arch.json";

impl Arch {
    /// The released arch for `size`, with `fingerprint` and `param_count` filled in.
    pub fn for_size(size: ModelSize, seed: u64) -> Arch {
        let d = Dims::for_size(size);
        let mut arch = Arch {
            size,
            input_dim: d.input,
            hidden_dim: d.hidden,
            output_dim: d.output,
            n_experts: d.experts,
            top_k: d.top_k,
            expert_depth: d.depth,
            seed,
            model_kind: ModelKind::MoE,
            router_kind: RouterKind::SheafPadic,
            fingerprint: None,
            param_count: None,
        };
        arch.fingerprint = Some(arch.shape_fingerprint());
        arch.param_count = Some(d.param_count());
        arch
    }

    /// The run-time shapes of this arch.
    pub fn dims(&self) -> Dims {
        Dims {
            input: self.input_dim,
            hidden: self.hidden_dim,
            output: self.output_dim,
            experts: self.n_experts,
            top_k: self.top_k,
            depth: self.expert_depth,
        }
    }

    /// A deterministic 16-hex-digit fingerprint of the parameter shapes
    /// (FNV-1a 64 over every record's name and length, in file order). It is
    /// this engine's own: it is not upstream's algorithm, so it is never
    /// compared with a fingerprint read from a file.
    pub fn shape_fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        feed(b"tokitai-moe/");
        feed(self.model_kind.as_str().as_bytes());
        for spec in self.dims().param_specs() {
            feed(spec.name.as_bytes());
            feed(&(spec.len as u64).to_le_bytes());
        }
        format!("{h:016x}")
    }

    /// Parses and validates the text of an arch.json.
    pub fn from_json_str(text: &str) -> Result<Arch, ModelError> {
        Arch::parse(text, ARCH_LABEL)
    }

    /// Reads, parses and validates the arch.json at `path`; errors name the path.
    pub fn load(path: &Path) -> Result<Arch, ModelError> {
        let label = path.display().to_string();
        let text = read_arch_text(path, &label)?;
        Arch::parse(&text, &label)
    }

    /// The arch as the training runner writes it: a pretty-printed JSON object
    /// with keys in sorted order, `fingerprint` and `param_count` computed
    /// from the shapes (not copied from a file), no trailing newline.
    pub fn to_json_pretty(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            expert_depth: usize,
            fingerprint: &'a str,
            hidden_dim: usize,
            input_dim: usize,
            model_kind: &'a str,
            n_experts: usize,
            output_dim: usize,
            param_count: u64,
            router_kind: &'a str,
            seed: u64,
            size: &'a str,
            top_k: usize,
        }
        let fingerprint = self.shape_fingerprint();
        let out = Out {
            expert_depth: self.expert_depth,
            fingerprint: &fingerprint,
            hidden_dim: self.hidden_dim,
            input_dim: self.input_dim,
            model_kind: self.model_kind.as_str(),
            n_experts: self.n_experts,
            output_dim: self.output_dim,
            param_count: self.dims().param_count(),
            router_kind: self.router_kind.as_str(),
            seed: self.seed,
            size: self.size.as_str(),
            top_k: self.top_k,
        };
        serde_json::to_string_pretty(&out).expect("serialising plain fields cannot fail")
    }

    /// Parses `text` (errors name it `file`): the JSON object, each field,
    /// then the checks of the dims against the size and the released values.
    fn parse(text: &str, file: &str) -> Result<Arch, ModelError> {
        let map = parse_object(text, file)?;
        let fields = Fields { map: &map, file };
        // Fields are read (and fail) in this order.
        let arch = Arch {
            size: fields.size()?,
            input_dim: fields.usize("input_dim")?,
            hidden_dim: fields.usize("hidden_dim")?,
            output_dim: fields.usize("output_dim")?,
            n_experts: fields.usize("n_experts")?,
            top_k: fields.usize("top_k")?,
            expert_depth: fields.usize("expert_depth")?,
            seed: fields.u64("seed")?,
            model_kind: fields.model_kind()?,
            router_kind: fields.router_kind()?,
            // Reported only: upstream ignores them, so a wrong type is not an error.
            fingerprint: map.get("fingerprint").and_then(Value::as_str).map(str::to_owned),
            param_count: map.get("param_count").and_then(Value::as_u64),
        };
        fields.check_dims(&arch)?;
        Ok(arch)
    }
}

/// The text of the arch.json at `path` (errors name it `label`): a regular
/// file (checked before it is opened), at most [`MAX_ARCH_JSON`] bytes (read
/// no further), and valid UTF-8.
fn read_arch_text(path: &Path, label: &str) -> Result<String, ModelError> {
    let text = read_regular_file(path, MAX_ARCH_JSON).map_err(|e| ModelError::file(path, "arch.json", e))?;
    String::from_utf8(text).map_err(|e| ModelError::ArchSyntax {
        file: label.to_owned(),
        message: format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()),
    })
}

/// `text` as a JSON object (errors name it `file`).
fn parse_object(text: &str, file: &str) -> Result<Map<String, Value>, ModelError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ModelError::ArchSyntax {
        file: file.to_owned(),
        message: format!("not valid JSON: {e}"),
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ModelError::ArchSyntax {
            file: file.to_owned(),
            message: format!("expected a JSON object, found {}", describe(&other)),
        }),
    }
}

/// Typed access to the fields of the arch object, with errors naming the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &'static str, message: String) -> ModelError {
        ModelError::ArchField {
            file: self.file.to_owned(),
            field,
            message,
        }
    }

    fn required(&self, field: &'static str, want: &str) -> Result<&'a Value, ModelError> {
        self.map
            .get(field)
            .ok_or_else(|| self.err(field, format!("is missing (expected {want})")))
    }

    fn string(&self, field: &'static str) -> Result<&'a str, ModelError> {
        let v = self.required(field, "a string")?;
        v.as_str()
            .ok_or_else(|| self.err(field, format!("is {} but must be a string", describe(v))))
    }

    fn optional_string(&self, field: &'static str) -> Result<Option<&'a str>, ModelError> {
        match self.map.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("is {} but must be a string", describe(v)))),
        }
    }

    fn u64(&self, field: &'static str) -> Result<u64, ModelError> {
        let v = self.required(field, "a non-negative integer")?;
        v.as_u64()
            .ok_or_else(|| self.err(field, format!("is {} but must be a non-negative integer", describe(v))))
    }

    fn usize(&self, field: &'static str) -> Result<usize, ModelError> {
        let n = self.u64(field)?;
        usize::try_from(n).map_err(|_| self.err(field, format!("is {n}, too large for this platform")))
    }

    /// `size`: required, spelled exactly as upstream does.
    fn size(&self) -> Result<ModelSize, ModelError> {
        let size_name = self.string("size")?;
        ModelSize::from_arch_name(size_name).ok_or_else(|| {
            self.err(
                "size",
                format!("is {size_name:?} but must be one of \"Nano\", \"Tiny\", \"Medium\", \"Full\""),
            )
        })
    }

    /// `model_kind`: optional (default MoE); Dense is known but not served.
    fn model_kind(&self) -> Result<ModelKind, ModelError> {
        match self.optional_string("model_kind")? {
            None | Some("MoE") => Ok(ModelKind::MoE),
            Some("Dense") => Err(self.err(
                "model_kind",
                "is \"Dense\" but only \"MoE\" is supported: Dense models are not supported by this engine".to_owned(),
            )),
            Some(other) => Err(self.err("model_kind", format!("is {other:?} but must be \"MoE\" or \"Dense\""))),
        }
    }

    /// `router_kind`: optional (default SheafPadic).
    fn router_kind(&self) -> Result<RouterKind, ModelError> {
        match self.optional_string("router_kind")? {
            None | Some("SheafPadic") => Ok(RouterKind::SheafPadic),
            Some("SheafOnly") => Ok(RouterKind::SheafOnly),
            Some("SoftmaxOnly") => Ok(RouterKind::SoftmaxOnly),
            Some(other) => Err(self.err(
                "router_kind",
                format!("is {other:?} but must be one of \"SheafPadic\", \"SheafOnly\", \"SoftmaxOnly\""),
            )),
        }
    }

    /// The dims `arch` read must be the ones its size fixes, then the values
    /// every released size shares; the first mismatch is the error.
    fn check_dims(&self, arch: &Arch) -> Result<(), ModelError> {
        let (want_hidden, want_depth) = arch.size.hidden_and_depth();
        let size_checks = [
            ("hidden_dim", arch.hidden_dim, want_hidden),
            ("expert_depth", arch.expert_depth, want_depth),
        ];
        for (field, found, want) in size_checks {
            if found != want {
                return Err(self.err(field, format!("is {found} but size {} requires {want}", arch.size)));
            }
        }
        let released = [
            ("input_dim", arch.input_dim, RELEASED_INPUT),
            ("output_dim", arch.output_dim, RELEASED_OUTPUT),
            ("n_experts", arch.n_experts, RELEASED_EXPERTS),
            ("top_k", arch.top_k, RELEASED_TOP_K),
        ];
        for (field, found, want) in released {
            if found != want {
                return Err(self.err(field, format!("is {found} but every released size requires {want}")));
            }
        }
        Ok(())
    }
}

/// A short description of a JSON value for error messages: its type and, for
/// scalars, the value itself.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.len() <= 64 => format!("the string {s:?}"),
        Value::String(_) => "a string".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}
