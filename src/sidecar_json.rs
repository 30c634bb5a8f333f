//! The old sidecar's `/infer` JSON wire format: request parsing and response
//! writing.
//!
//! Owns: turning a request body into the rows it holds ([`RowsRead`]) and
//! handing them to [`InferInput::from_rows`], the one validator (row
//! length, row limit, finiteness are checked there, not here); writing
//! outputs back as the sidecar did (`null` for NaN, `1e99` / `-1e99` for
//! infinities). Shared by `POST /infer` and `tokitai-serve infer`, so both
//! accept and answer exactly the same bytes. Must not touch: queueing,
//! compute, the input rules (`input.rs`), HTTP status codes (errors here
//! are [`RequestError`] values; the HTTP layer maps them in one place).
//!
//! The request is parsed with a streaming serde visitor rather than through a
//! `serde_json::Value`: it writes numbers straight into the flat buffer and
//! caps its memory: it stores at most `row_len` values per row and
//! `max_rows` rows, counting the rest without storing them, and after a row
//! of the wrong length it stores nothing more. What is not JSON or not a
//! number builds no value: the visitors record that typed error (naming the
//! row and feature) in an `ErrorSlot` and hand serde only a placeholder to
//! unwind with, so no error is ever parsed back out of a message.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Deserializer, Serialize, Serializer};

pub use crate::input::RequestError;
use crate::input::{ErrorSlot, InferInput, InputLimits, RaggedRow, RowsRead, clip};

/// A parsed `/infer` request.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarRequest {
    pub input: InferInput,
    /// `true` when the body used the flat one-row form `{"features": [..]}`.
    /// The answer is the same shape either way (one inner array per row), as
    /// the old sidecar answered.
    pub single_row: bool,
}

/// Parses an `/infer` body: `{"features": [row]}` or `{"features": [[row], ...]}`.
///
/// `limits.row_len` comes from the model's arch; `limits.max_rows` bounds
/// the rows stored (a request over it is rejected without buffering it).
pub fn parse_infer_request(body: &[u8], limits: &InputLimits) -> Result<SidecarRequest, RequestError> {
    let slot = ErrorSlot::<RequestError>::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = RequestSeed {
        limits: *limits,
        slot: &slot,
    };
    let parsed = seed.deserialize(&mut de).and_then(|f| de.end().map(|()| f));
    let (rows, single_row) = parsed.map_err(|e| slot.take().unwrap_or_else(|| json_error(e)))?;
    Ok(SidecarRequest {
        input: InferInput::from_rows(rows, limits)?,
        single_row,
    })
}

/// A serde error that no visitor recorded: JSON syntax, or a data error
/// serde found itself (a value of the wrong type for a map key, say).
fn json_error(e: serde_json::Error) -> RequestError {
    match e.classify() {
        serde_json::error::Category::Data => RequestError::Invalid(clip(&e.to_string())),
        _ => RequestError::Json(clip(&e.to_string())),
    }
}

/// Rows as parsed, and whether the body used the one-row form.
type Parsed = (RowsRead, bool);

struct RequestSeed<'s> {
    limits: InputLimits,
    slot: &'s ErrorSlot<RequestError>,
}

impl<'de> DeserializeSeed<'de> for RequestSeed<'_> {
    type Value = Parsed;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = Parsed;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object with a `features` array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let mut features = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "features" {
                if features.is_some() {
                    return Err(self.slot.invalid("duplicate field `features`"));
                }
                features = Some(map.next_value_seed(FeaturesSeed {
                    limits: self.limits,
                    slot: self.slot,
                })?);
            } else {
                // Unknown fields are ignored, as the old sidecar did.
                map.next_value::<IgnoredAny>()?;
            }
        }
        features.ok_or_else(|| self.slot.invalid("missing field `features`"))
    }
}

struct FeaturesSeed<'s> {
    limits: InputLimits,
    slot: &'s ErrorSlot<RequestError>,
}

impl<'de> DeserializeSeed<'de> for FeaturesSeed<'_> {
    type Value = Parsed;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_any(self)
    }
}

impl FeaturesSeed<'_> {
    /// The rest of a flat single row whose first number is already stored;
    /// its length.
    fn flat_row<'de, A: SeqAccess<'de>>(&self, mut seq: A, values: &mut Vec<f32>) -> Result<usize, A::Error> {
        let row_len = self.limits.row_len;
        let mut index = 1;
        while seq
            .next_element_seed(Number {
                values: &mut *values,
                row: 0,
                index,
                single: true,
                slot: self.slot,
            })?
            .is_some()
        {
            index += 1;
            if index > row_len {
                // Keep counting without storing so the message gives the real length.
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    index += 1;
                }
                break;
            }
        }
        Ok(index)
    }

    /// The rest of a batch whose first row is already in `read`. Past
    /// `max_rows` rows, or after a row of the wrong length, the rest are
    /// only counted (the memory cap); the verdict is the validator's.
    fn batch_rows<'de, A: SeqAccess<'de>>(&self, mut seq: A, read: &mut RowsRead) -> Result<(), A::Error> {
        loop {
            if read.rows >= self.limits.max_rows || read.ragged.is_some() {
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    read.rows += 1;
                }
                return Ok(());
            }
            let seed = RowSeed {
                values: &mut read.values,
                row: read.rows,
                row_len: self.limits.row_len,
                slot: self.slot,
            };
            let Some(len) = seq.next_element_seed(seed)? else {
                return Ok(());
            };
            read.note_row(len, self.limits.row_len);
        }
    }

    fn not_an_array<E: de::Error>(&self, what: &str) -> E {
        self.slot
            .invalid(format_args!("`features` must be an array, not {what}"))
    }
}

impl<'de> Visitor<'de> for FeaturesSeed<'_> {
    type Value = Parsed;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "`features` as an array of {} numbers or an array of such rows",
            self.limits.row_len
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Parsed, A::Error> {
        let row_len = self.limits.row_len;
        let mut read = RowsRead {
            values: Vec::with_capacity(row_len),
            ..RowsRead::default()
        };
        // The first element decides the form: a number means one flat row,
        // an array means a batch of rows.
        let first = seq.next_element_seed(FirstElement {
            values: &mut read.values,
            row_len,
            slot: self.slot,
        })?;
        match first {
            None => Err(self.slot.invalid("`features` is empty: expected at least one row")),
            Some(First::Number) => {
                let len = self.flat_row(seq, &mut read.values)?;
                read.note_row(len, row_len);
                Ok((read, true))
            }
            Some(First::Row(len)) => {
                read.note_row(len, row_len);
                self.batch_rows(seq, &mut read)?;
                Ok((read, false))
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<Parsed, A::Error> {
        Err(self.not_an_array("an object"))
    }
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<Parsed, E> {
        Err(self.not_an_array("a string"))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<Parsed, E> {
        Err(self.not_an_array("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Parsed, E> {
        Err(self.not_an_array("null"))
    }
    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Parsed, E> {
        Err(self.not_an_array("a number"))
    }
    fn visit_i64<E: de::Error>(self, _v: i64) -> Result<Parsed, E> {
        Err(self.not_an_array("a number"))
    }
    fn visit_u64<E: de::Error>(self, _v: u64) -> Result<Parsed, E> {
        Err(self.not_an_array("a number"))
    }
}

/// Counting rows as they are read.
trait NoteRow {
    /// Counts one more row of `len` values; the first of a length other
    /// than `row_len` is remembered.
    fn note_row(&mut self, len: usize, row_len: usize);
}

impl NoteRow for RowsRead {
    fn note_row(&mut self, len: usize, row_len: usize) {
        if len != row_len && self.ragged.is_none() {
            self.ragged = Some(RaggedRow { row: self.rows, len });
        }
        self.rows += 1;
    }
}

enum First {
    Number,
    /// A row, and its length.
    Row(usize),
}

/// The first element of `features`: a number (flat row) or an array (batch).
struct FirstElement<'a> {
    values: &'a mut Vec<f32>,
    row_len: usize,
    slot: &'a ErrorSlot<RequestError>,
}

impl<'de> DeserializeSeed<'de> for FirstElement<'_> {
    type Value = First;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<First, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FirstElement<'_> {
    type Value = First;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number or an array of numbers")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<First, E> {
        // Finiteness as f32 is the validator's rule (`InferInput::new`).
        self.values.push(v as f32);
        Ok(First::Number)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<First, E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<First, E> {
        self.visit_f64(v as f64)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<First, A::Error> {
        let len = RowSeed {
            values: self.values,
            row: 0,
            row_len: self.row_len,
            slot: self.slot,
        }
        .visit_seq(seq)?;
        Ok(First::Row(len))
    }
    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<First, A::Error> {
        Err(self.slot.invalid("row 0 must be an array of numbers, not an object"))
    }
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<First, E> {
        Err(self.slot.invalid("row 0, feature 0 is not a number (a string)"))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<First, E> {
        Err(self.slot.invalid("row 0, feature 0 is not a number (a boolean)"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<First, E> {
        Err(self.slot.invalid("row 0, feature 0 is not a number (null)"))
    }
}

/// One row of a batch: its numbers (at most `row_len` stored) and its length.
struct RowSeed<'a> {
    values: &'a mut Vec<f32>,
    row: usize,
    row_len: usize,
    slot: &'a ErrorSlot<RequestError>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "row {} as an array of {} numbers", self.row, self.row_len)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut index = 0;
        while index < self.row_len {
            let seed = Number {
                values: &mut *self.values,
                row: self.row,
                index,
                single: false,
                slot: self.slot,
            };
            if seq.next_element_seed(seed)?.is_none() {
                break;
            }
            index += 1;
        }
        if index == self.row_len {
            while seq.next_element::<IgnoredAny>()?.is_some() {
                index += 1;
            }
        }
        Ok(index)
    }
    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<usize, E> {
        Err(self.not_a_row("a number"))
    }
    fn visit_i64<E: de::Error>(self, _v: i64) -> Result<usize, E> {
        Err(self.not_a_row("a number"))
    }
    fn visit_u64<E: de::Error>(self, _v: u64) -> Result<usize, E> {
        Err(self.not_a_row("a number"))
    }
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<usize, E> {
        Err(self.not_a_row("a string"))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<usize, E> {
        Err(self.not_a_row("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<usize, E> {
        Err(self.not_a_row("null"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<usize, A::Error> {
        Err(self.not_a_row("an object"))
    }
}

impl RowSeed<'_> {
    fn not_a_row<E: de::Error>(&self, what: &str) -> E {
        self.slot.invalid(format_args!(
            "row {} must be an array of {} numbers, not {what} (rows cannot mix with flat features)",
            self.row, self.row_len
        ))
    }
}

/// One feature value.
struct Number<'a> {
    values: &'a mut Vec<f32>,
    row: usize,
    index: usize,
    /// Flat single-row form: an array here is a mix of forms, not a nested row.
    single: bool,
    slot: &'a ErrorSlot<RequestError>,
}

impl<'de> DeserializeSeed<'de> for Number<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Number<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a number at row {}, feature {}", self.row, self.index)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // Finiteness as f32 is the validator's rule (`InferInput::new`).
        self.values.push(v as f32);
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<(), E> {
        Err(self.not_a_number("a string"))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<(), E> {
        Err(self.not_a_number("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.not_a_number("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<(), A::Error> {
        Err(self.not_a_number(if self.single {
            "an array (rows cannot mix with flat features)"
        } else {
            "an array"
        }))
    }
    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(self.not_a_number("an object"))
    }
}

impl Number<'_> {
    fn not_a_number<E: de::Error>(&self, what: &str) -> E {
        self.slot.invalid(format_args!(
            "row {}, feature {} is not a number ({what})",
            self.row, self.index
        ))
    }
}

/// The `/infer` answer: one inner array per input row, in input order.
pub struct InferResponse<'a> {
    pub logits: Rows<'a>,
    pub router_weights: Rows<'a>,
}

/// A row-major `[n_rows, row_len]` view written as nested JSON arrays.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub values: &'a [f32],
    pub row_len: usize,
}

impl Serialize for InferResponse<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("InferResponse", 2)?;
        st.serialize_field("logits", &self.logits)?;
        st.serialize_field("router_weights", &self.router_weights)?;
        st.end()
    }
}

impl Serialize for Rows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let row_len = self.row_len.max(1);
        let mut seq = s.serialize_seq(Some(self.values.len() / row_len))?;
        for row in self.values.chunks(row_len) {
            seq.serialize_element(&Row(row))?;
        }
        seq.end()
    }
}

struct Row<'a>(&'a [f32]);

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for &v in self.0 {
            seq.serialize_element(&WireF32(v))?;
        }
        seq.end()
    }
}

/// An output value as the old sidecar wrote it: NaN as `null`, +/-infinity as
/// `1e99` / `-1e99` (JSON has no non-finite numbers).
struct WireF32(f32);

impl Serialize for WireF32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_nan() {
            s.serialize_none()
        } else if v == f32::INFINITY {
            s.serialize_f64(1e99)
        } else if v == f32::NEG_INFINITY {
            s.serialize_f64(-1e99)
        } else {
            s.serialize_f32(v)
        }
    }
}

/// Writes the `/infer` answer for row-major outputs.
pub fn write_infer_response(logits: &[f32], output_dim: usize, router_weights: &[f32], n_experts: usize) -> Vec<u8> {
    let response = InferResponse {
        logits: Rows {
            values: logits,
            row_len: output_dim,
        },
        router_weights: Rows {
            values: router_weights,
            row_len: n_experts,
        },
    };
    // 12 bytes per value is a close upper estimate of ryu's f32 output.
    let mut out = Vec::with_capacity(32 + 12 * (logits.len() + router_weights.len()));
    serde_json::to_writer(&mut out, &response).expect("writing to a Vec cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: InputLimits = InputLimits {
        row_len: 4,
        max_rows: 10,
    };

    fn row(n: usize, v: f32) -> String {
        let items: Vec<String> = (0..n).map(|_| v.to_string()).collect();
        format!("[{}]", items.join(","))
    }

    #[test]
    fn flat_and_batch_forms_parse_to_the_same_rows() {
        let flat = format!(r#"{{"features": {}}}"#, row(4, 0.5));
        let batch = format!(r#"{{"features": [{}]}}"#, row(4, 0.5));
        let a = parse_infer_request(flat.as_bytes(), &LIMITS).unwrap();
        let b = parse_infer_request(batch.as_bytes(), &LIMITS).unwrap();
        assert_eq!(a.input.values(), b.input.values());
        assert_eq!((a.input.n_rows(), a.single_row), (1, true));
        assert_eq!((b.input.n_rows(), b.single_row), (1, false));
    }

    #[test]
    fn wrong_row_length_names_row_length_and_expected() {
        let body = format!(r#"{{"features": [{}, {}]}}"#, row(4, 1.0), row(3, 1.0));
        let err = parse_infer_request(body.as_bytes(), &LIMITS).unwrap_err();
        assert_eq!(err, RequestError::Invalid("row 1 has 3 features, expected 4".into()));
        let body = format!(r#"{{"features": {}}}"#, row(5, 1.0));
        let err = parse_infer_request(body.as_bytes(), &LIMITS).unwrap_err();
        assert_eq!(err, RequestError::Invalid("row 0 has 5 features, expected 4".into()));
    }

    #[test]
    fn rejects_non_numbers_non_finite_and_empty() {
        let cases = [
            (r#"{"features": [1, 2, "3", 4]}"#, "row 0, feature 2 is not a number"),
            (
                r#"{"features": [[1, 2, 3, null]]}"#,
                "row 0, feature 3 is not a number (null)",
            ),
            (
                r#"{"features": [1, 2, 3, 1e39]}"#,
                "row 0, feature 3: inf is not finite",
            ),
            (r#"{"features": []}"#, "empty"),
            (r#"{"features": {}}"#, "must be an array"),
            (r#"{"features": [[1,2,3,4], 5]}"#, "row 1 must be an array"),
            (r#"{"features": [1, [2], 3, 4]}"#, "rows cannot mix"),
            (r#"{"rows": []}"#, "missing field `features`"),
        ];
        for (body, want) in cases {
            match parse_infer_request(body.as_bytes(), &LIMITS) {
                Err(RequestError::Invalid(msg)) => assert!(msg.contains(want), "{body}: {msg}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn syntax_errors_are_json_errors_and_row_limit_is_enforced() {
        assert!(matches!(
            parse_infer_request(b"{\"features\": [1,", &LIMITS),
            Err(RequestError::Json(_))
        ));
        assert!(matches!(
            parse_infer_request(b"{\"features\": [1,2,3,4]} trailing", &LIMITS),
            Err(RequestError::Json(_))
        ));
        let body = format!(r#"{{"features": [{}]}}"#, vec![row(4, 1.0); 11].join(","));
        assert_eq!(
            parse_infer_request(body.as_bytes(), &LIMITS).unwrap_err(),
            RequestError::TooManyRows { rows: 11, limit: 10 }
        );
        let body = format!(r#"{{"features": [{}]}}"#, vec![row(4, 1.0); 10].join(","));
        assert_eq!(
            parse_infer_request(body.as_bytes(), &LIMITS).unwrap().input.n_rows(),
            10
        );
    }

    #[test]
    fn non_finite_outputs_are_written_as_the_sidecar_did() {
        let body = write_infer_response(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.5], 2, &[1.0, 0.0], 1);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let want: serde_json::Value =
            serde_json::from_str(r#"{"logits":[[null,1e99],[-1e99,0.5]],"router_weights":[[1.0],[0.0]]}"#).unwrap();
        assert_eq!(parsed, want);
    }
}
