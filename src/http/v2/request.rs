//! The Open Inference Protocol's infer request: the JSON header, the
//! optional binary tensor bytes after it, and which outputs are asked for.
//!
//! Owns: reading a request body's one input tensor (from JSON `data`, flat
//! or nested, or from Triton's binary tensor extension) and its requested
//! outputs ([`OutputRequest`]), capping the memory it takes; the tensor
//! rules (name, datatype, shape, value count, outputs each at most once)
//! are the protocol core's (`oip/tensor.rs`) and the input's rules (row
//! length, row limit, finiteness) `InferInput::new`'s. Must not touch:
//! status codes (errors are [`V2Error`]s mapped in `http/error.rs`),
//! compute, the answer's format (`response.rs`).
//!
//! The header is parsed as a stream, like `/infer`'s body: JSON `data`
//! numbers go straight into the f32 buffer, which never holds more values
//! than the declared shape (when it came first) or the row limit allows, and
//! nothing is built as a `serde_json::Value` tree. So memory for a body stays
//! a small multiple of the body, whatever it holds. A visitor that rejects
//! the body records a typed error in an `ErrorSlot`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::invalid;
use crate::http::error::V2Error;
use crate::input::{ErrorSlot, InferInput, InputLimits, RequestError, clip};
use crate::oip::{self, Declared, INPUT};

/// Most dimensions a `shape` may list (the model's input has 2).
const MAX_SHAPE_RANK: usize = 8;

pub use crate::oip::OutputName;

/// One output the client asked for, and whether it is answered as raw
/// bytes after the JSON header (the binary tensor extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRequest {
    pub output: OutputName,
    pub binary: bool,
}

/// A parsed infer request.
#[derive(Debug)]
pub struct V2Request {
    /// The request's `id`, echoed in the answer.
    pub id: Option<String>,
    pub input: InferInput,
    /// In the order asked; every output once.
    pub outputs: Vec<OutputRequest>,
    /// The `priority` parameter (1 is the highest level; 0: none named).
    pub priority: u64,
}

/// Parses `json` (the header) and `binary` (the bytes after it).
pub fn parse_request(json: &[u8], binary: &[u8], limits: &InputLimits) -> Result<V2Request, V2Error> {
    let slot = ErrorSlot::<V2Error>::default();
    let mut de = serde_json::Deserializer::from_slice(json);
    let seed = HeaderSeed { limits, slot: &slot };
    let parsed = seed.deserialize(&mut de).and_then(|h| de.end().map(|()| h));
    let mut header = parsed.map_err(|e| {
        slot.take()
            .unwrap_or_else(|| invalid(format!("failed to parse the request JSON: {}", clip(&e.to_string()))))
    })?;
    let outputs = header.outputs();
    let id = header.id.take();
    let priority = header.priority;
    let input = header.into_input(binary, limits)?;
    Ok(V2Request {
        id,
        input,
        outputs,
        priority,
    })
}

// ---- the parsed header ---------------------------------------------------------

/// The JSON header as parsed, before it is checked as a whole.
#[derive(Default)]
struct Header {
    id: Option<String>,
    binary_data_output: bool,
    /// `parameters.priority` (0: none).
    priority: u64,
    /// Inputs listed (only the first is kept: the model has one).
    inputs_seen: usize,
    input: Option<InputTensor>,
    outputs: Option<Vec<(OutputName, Option<bool>)>>,
}

/// The one input tensor, as parsed.
#[derive(Default)]
struct InputTensor {
    name: Option<String>,
    shape: Option<Vec<i64>>,
    datatype: Option<String>,
    binary_data_size: Option<u64>,
    data: Option<Vec<f32>>,
}

impl Header {
    /// Which outputs to return, and whether each goes in binary form.
    fn outputs(&self) -> Vec<OutputRequest> {
        let default_binary = self.binary_data_output;
        match &self.outputs {
            None => OutputName::ALL
                .into_iter()
                .map(|output| OutputRequest {
                    output,
                    binary: default_binary,
                })
                .collect(),
            Some(list) => list
                .iter()
                .map(|&(output, binary)| OutputRequest {
                    output,
                    binary: binary.unwrap_or(default_binary),
                })
                .collect(),
        }
    }

    /// The `features` input, checked against the model and the limits.
    fn into_input(self, binary: &[u8], limits: &InputLimits) -> Result<InferInput, V2Error> {
        let input = match (self.inputs_seen, self.input) {
            (1, Some(input)) => input,
            (n, _) => return Err(invalid(format!("expected 1 input ('{INPUT}') but got {n}"))),
        };
        input.check_identity()?;
        let shape = input.shape.clone().unwrap_or_default();
        let declared = declared_shape(&shape, limits)?;
        let values = match (input.binary_data_size, input.data) {
            (Some(_), Some(_)) => return Err(invalid(format!("input '{INPUT}' has both binary_data_size and data"))),
            (Some(size), None) => binary_values(&shape, size, binary, &declared)?,
            (None, Some(values)) => json_values(&shape, values, binary, &declared)?,
            (None, None) => {
                return Err(invalid(format!(
                    "input '{INPUT}' has neither data nor binary_data_size"
                )));
            }
        };
        Ok(InferInput::new(values, limits)?)
    }
}

impl InputTensor {
    /// The input is the model's: named `features`, of type FP32.
    fn check_identity(&self) -> Result<(), V2Error> {
        let name = self.name.as_deref().unwrap_or("");
        Ok(oip::check_input(name, self.datatype.as_deref().unwrap_or(""))?)
    }
}

/// The rows, elements and bytes `shape` declares (sizes checked for
/// overflow), within the row limit.
fn declared_shape(shape: &[i64], limits: &InputLimits) -> Result<Declared, V2Error> {
    Ok(oip::declared_shape(shape, limits)?)
}

/// Values from the binary part: exactly the shape's bytes, little-endian.
fn binary_values(shape: &[i64], size: u64, binary: &[u8], declared: &Declared) -> Result<Vec<f32>, V2Error> {
    if size != binary.len() as u64 || size != declared.bytes as u64 {
        return Err(invalid(format!(
            "input '{INPUT}' binary_data_size is {size}, the binary part is {} bytes, and shape {shape:?} needs {} bytes",
            binary.len(),
            declared.bytes
        )));
    }
    Ok(oip::raw_values(binary, declared, shape, "the binary part")?)
}

/// Values from JSON `data`: exactly the shape's count, no binary part.
fn json_values(shape: &[i64], values: Vec<f32>, binary: &[u8], declared: &Declared) -> Result<Vec<f32>, V2Error> {
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} unexpected binary bytes after the JSON header",
            binary.len()
        )));
    }
    oip::check_count(values.len(), declared, shape, "values")?;
    Ok(values)
}

// ---- the streaming visitors -----------------------------------------------------

type Slot = ErrorSlot<V2Error>;

fn reject<E: de::Error>(slot: &Slot, msg: impl fmt::Display) -> E {
    slot.reject(invalid(msg.to_string()))
}

/// Skips a value the engine does not read, without building it.
fn skip<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>().map(|_| ())
}

/// Errors on a key seen twice (serde's derive would too).
fn once<T, E: de::Error>(slot: &Slot, field: &Option<T>, key: &str) -> Result<(), E> {
    match field {
        Some(_) => Err(reject(slot, format_args!("duplicate field `{key}`"))),
        None => Ok(()),
    }
}

struct HeaderSeed<'a> {
    limits: &'a InputLimits,
    slot: &'a Slot,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = Header;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Header, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an inference request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
        let mut header = Header::default();
        let (mut seen_inputs, mut seen_parameters) = (false, false);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "id" => {
                    once(self.slot, &header.id, "id")?;
                    header.id = Some(map.next_value::<String>()?);
                }
                "parameters" => {
                    if seen_parameters {
                        return Err(reject(self.slot, "duplicate field `parameters`"));
                    }
                    seen_parameters = true;
                    let params = map.next_value::<RequestParameters>()?;
                    header.binary_data_output = params.binary_data_output;
                    header.priority = params.priority;
                }
                "inputs" => {
                    if seen_inputs {
                        return Err(reject(self.slot, "duplicate field `inputs`"));
                    }
                    seen_inputs = true;
                    let seed = InputsSeed {
                        limits: self.limits,
                        slot: self.slot,
                    };
                    (header.inputs_seen, header.input) = map.next_value_seed(seed)?;
                }
                "outputs" => {
                    once(self.slot, &header.outputs, "outputs")?;
                    header.outputs = Some(map.next_value_seed(OutputsSeed { slot: self.slot })?);
                }
                _ => skip(&mut map)?,
            }
        }
        Ok(header)
    }
}

#[derive(serde::Deserialize, Default)]
struct RequestParameters {
    #[serde(default)]
    binary_data_output: bool,
    /// Triton's request priority: an unsigned integer, 1 the highest.
    #[serde(default)]
    priority: u64,
}

#[derive(serde::Deserialize, Default)]
struct TensorParameters {
    binary_data_size: Option<u64>,
}

#[derive(serde::Deserialize, Default)]
struct OutputParameters {
    binary_data: Option<bool>,
}

/// `inputs`: the first tensor is parsed, the rest only counted.
struct InputsSeed<'a> {
    limits: &'a InputLimits,
    slot: &'a Slot,
}

impl<'de> DeserializeSeed<'de> for InputsSeed<'_> {
    type Value = (usize, Option<InputTensor>);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed<'_> {
    type Value = (usize, Option<InputTensor>);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of input tensors")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let seed = TensorSeed {
            limits: self.limits,
            slot: self.slot,
        };
        let Some(first) = seq.next_element_seed(seed)? else {
            return Ok((0, None));
        };
        let mut count = 1;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok((count, Some(first)))
    }
}

/// One input tensor object.
struct TensorSeed<'a> {
    limits: &'a InputLimits,
    slot: &'a Slot,
}

impl<'de> DeserializeSeed<'de> for TensorSeed<'_> {
    type Value = InputTensor;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<InputTensor, D::Error> {
        d.deserialize_map(self)
    }
}

impl TensorSeed<'_> {
    /// Most values `data` may hold: the declared shape's count when the
    /// shape came first and is the model's, else the row limit's.
    fn data_cap(&self, shape: &Option<Vec<i64>>) -> (usize, DataCap) {
        let row_len = self.limits.row_len;
        let declared = shape
            .as_deref()
            .and_then(|s| declared_shape(s, self.limits).ok())
            .map(|d| d.values);
        match declared {
            Some(n) => (n, DataCap::Shape),
            None => (self.limits.max_rows.saturating_mul(row_len), DataCap::RowLimit),
        }
    }
}

impl<'de> Visitor<'de> for TensorSeed<'_> {
    type Value = InputTensor;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an input tensor object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InputTensor, A::Error> {
        let mut t = InputTensor::default();
        let mut seen_parameters = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "name" => {
                    once(self.slot, &t.name, "name")?;
                    t.name = Some(map.next_value()?);
                }
                "datatype" => {
                    once(self.slot, &t.datatype, "datatype")?;
                    t.datatype = Some(map.next_value()?);
                }
                "shape" => {
                    once(self.slot, &t.shape, "shape")?;
                    t.shape = Some(map.next_value_seed(ShapeSeed { slot: self.slot })?);
                }
                "parameters" => {
                    if seen_parameters {
                        return Err(reject(self.slot, "duplicate field `parameters`"));
                    }
                    seen_parameters = true;
                    t.binary_data_size = map.next_value::<TensorParameters>()?.binary_data_size;
                }
                "data" => {
                    once(self.slot, &t.data, "data")?;
                    let (cap, why) = self.data_cap(&t.shape);
                    let mut values = Vec::new();
                    map.next_value_seed(DataSeed {
                        out: &mut values,
                        cap,
                        why,
                        limits: self.limits,
                        slot: self.slot,
                    })?;
                    t.data = Some(values);
                }
                _ => skip(&mut map)?,
            }
        }
        Ok(t)
    }
}

/// `shape`: at most [`MAX_SHAPE_RANK`] integers.
struct ShapeSeed<'a> {
    slot: &'a Slot,
}

impl<'de> DeserializeSeed<'de> for ShapeSeed<'_> {
    type Value = Vec<i64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<i64>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ShapeSeed<'_> {
    type Value = Vec<i64>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a shape as an array of integers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<i64>, A::Error> {
        let mut shape = Vec::new();
        while let Some(d) = seq.next_element::<i64>()? {
            if shape.len() == MAX_SHAPE_RANK {
                return Err(reject(
                    self.slot,
                    format_args!("input shape has more than {MAX_SHAPE_RANK} dimensions"),
                ));
            }
            shape.push(d);
        }
        Ok(shape)
    }
}

/// What bounded the data buffer, for the message when it overflows.
#[derive(Clone, Copy)]
enum DataCap {
    Shape,
    RowLimit,
}

/// `data` (flat or nested arrays of numbers), appended to `out`.
struct DataSeed<'a> {
    out: &'a mut Vec<f32>,
    cap: usize,
    why: DataCap,
    limits: &'a InputLimits,
    slot: &'a Slot,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl DataSeed<'_> {
    fn push<E: de::Error>(self, v: f64) -> Result<(), E> {
        if self.out.len() == self.cap {
            return Err(self.overflow());
        }
        // Finiteness as f32 is the validator's rule (`InferInput::new`).
        self.out.push(v as f32);
        Ok(())
    }

    fn overflow<E: de::Error>(&self) -> E {
        let l = self.limits;
        match self.why {
            DataCap::Shape => reject(
                self.slot,
                format_args!("input '{INPUT}' has more values than its shape needs ({})", self.cap),
            ),
            DataCap::RowLimit => self.slot.reject(V2Error::from(RequestError::Invalid(format!(
                "input '{INPUT}' has more values than the limit of {} rows of {} allows",
                l.max_rows, l.row_len
            )))),
        }
    }

    fn not_a_number<E: de::Error>(&self, what: &str) -> E {
        reject(
            self.slot,
            format_args!("input '{INPUT}' element {} is not a number: {what}", self.out.len()),
        )
    }
}

impl<'de> Visitor<'de> for DataSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("tensor data as (nested) arrays of numbers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let DataSeed {
            out,
            cap,
            why,
            limits,
            slot,
        } = self;
        while seq
            .next_element_seed(DataSeed {
                out: &mut *out,
                cap,
                why,
                limits,
                slot,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(v as f64)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.not_a_number("null"))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<(), E> {
        Err(self.not_a_number("a boolean"))
    }
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<(), E> {
        Err(self.not_a_number("a string"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(self.not_a_number("an object"))
    }
}

/// `outputs`: each a known output, at most once.
struct OutputsSeed<'a> {
    slot: &'a Slot,
}

#[derive(serde::Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: OutputParameters,
}

impl<'de> DeserializeSeed<'de> for OutputsSeed<'_> {
    type Value = Vec<(OutputName, Option<bool>)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for OutputsSeed<'_> {
    type Value = Vec<(OutputName, Option<bool>)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of requested outputs")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut outputs: Vec<(OutputName, Option<bool>)> = Vec::with_capacity(OutputName::ALL.len());
        while let Some(o) = seq.next_element::<RequestedOutput>()? {
            oip::add_output(&mut outputs, &o.name, o.parameters.binary_data)
                .map_err(|e| self.slot.reject(V2Error::from(e)))?;
        }
        Ok(outputs)
    }
}
