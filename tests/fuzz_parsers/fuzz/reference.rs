//! Independent reference parsers for the two request formats, written from
//! the wire formats' rules over a fully parsed [`J`] tree (no streaming, no
//! shared code with the engine's parsers). The differential properties
//! compare the engine's answer with these.
//!
//! Rules modelled, beyond the formats' documented shape:
//! - a known field given twice is an error (both parsers say "duplicate
//!   field"), `parameters` included; unknown fields are ignored whatever
//!   they hold;
//! - numbers are the f64 serde_json denotes, converted with `as f32`, and
//!   must be finite as f32;
//! - the v2 header's small parameter objects (`parameters`,
//!   `inputs[0].parameters`, `outputs[i]` and `outputs[i].parameters`) are
//!   read by serde's derived `Deserialize`, which also takes a struct as a
//!   positional array (`[true]`, `["logits"]`); that leniency is modelled
//!   here rather than flagged.

use tokitai_serve::input::InputLimits;

use super::json::J;

/// The reference's answer for one document.
#[derive(Debug)]
pub enum Verdict<T> {
    Accept(T),
    Reject(String),
}

fn reject<T>(why: impl Into<String>) -> Verdict<T> {
    Verdict::Reject(why.into())
}

/// Early return of a `Verdict` from a `Result<_, Verdict<_>>`.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(verdict) => return verdict,
        }
    };
}

/// A number as an f32 the engine accepts: finite after `as f32`.
fn finite_f32<T>(v: &J, what: &str) -> Result<f32, Verdict<T>> {
    match v.number() {
        Some(f) if (f as f32).is_finite() => Ok(f as f32),
        Some(f) => Err(reject(format!("{what}: {f} is not a finite f32"))),
        None => Err(reject(format!("{what}: not a number"))),
    }
}

// ---- /infer ---------------------------------------------------------------------

/// What a valid `/infer` body holds.
#[derive(Debug, PartialEq)]
pub struct SidecarExpect {
    pub values: Vec<f32>,
    pub n_rows: usize,
    pub single_row: bool,
}

/// `{"features": [row_len numbers]}` or `{"features": [[row_len numbers], ...]}`
/// with 1..=max_rows rows; other keys ignored; `features` exactly once.
pub fn sidecar(doc: &J, limits: &InputLimits) -> Verdict<SidecarExpect> {
    let J::Obj(top) = doc else {
        return reject("not an object");
    };
    let features = match J::all(top, "features")[..] {
        [f] => f,
        [] => return reject("no features"),
        _ => return reject("features twice"),
    };
    let J::Arr(items) = features else {
        return reject("features is not an array");
    };
    let row = |r: &J| -> Result<Vec<f32>, Verdict<SidecarExpect>> {
        let J::Arr(xs) = r else {
            return Err(reject("a row is not an array"));
        };
        if xs.len() != limits.row_len {
            return Err(reject("a row has the wrong length"));
        }
        xs.iter().map(|x| finite_f32(x, "feature")).collect()
    };
    let (values, n_rows, single_row) = match items.first() {
        None => return reject("features is empty"),
        Some(first) if first.number().is_some() => (tri!(row(features)), 1, true),
        Some(J::Arr(_)) => {
            let mut values = Vec::new();
            for r in items {
                values.extend(tri!(row(r)));
            }
            (values, items.len(), false)
        }
        Some(_) => return reject("the first element is neither a number nor a row"),
    };
    if n_rows > limits.max_rows {
        return reject("too many rows");
    }
    Verdict::Accept(SidecarExpect {
        values,
        n_rows,
        single_row,
    })
}

// ---- /v2 infer ------------------------------------------------------------------

/// What a valid v2 infer request holds.
#[derive(Debug, PartialEq)]
pub struct V2Expect {
    pub id: Option<String>,
    pub values: Vec<f32>,
    pub n_rows: usize,
    /// `(name, binary)` in the order asked.
    pub outputs: Vec<(&'static str, bool)>,
}

pub const OUTPUTS: [&str; 2] = ["logits", "router_weights"];

/// serde's derived `Deserialize` for a struct with `fields`: an object
/// (unknown keys ignored, a field twice is an error) or an array of at most
/// `fields.len()` elements, taken by position. Gives each field's value,
/// `None` when absent, and whether the array form was used (where a missing
/// field is an error unless the field has `#[serde(default)]`).
fn derived_struct<'a, T>(v: &'a J, fields: &[&str]) -> Result<(Vec<Option<&'a J>>, bool), Verdict<T>> {
    match v {
        J::Obj(entries) => {
            let mut out = Vec::with_capacity(fields.len());
            for f in fields {
                match J::all(entries, f)[..] {
                    [] => out.push(None),
                    [x] => out.push(Some(x)),
                    _ => return Err(reject(format!("duplicate field {f}"))),
                }
            }
            Ok((out, false))
        }
        J::Arr(items) if items.len() <= fields.len() => {
            let mut out: Vec<Option<&J>> = items.iter().map(Some).collect();
            out.resize(fields.len(), None);
            Ok((out, true))
        }
        _ => Err(reject("not a struct (object or short array)")),
    }
}

/// `Option<u64>` / `Option<bool>` fields of a derived struct: absent is
/// `None` in an object but an error in the array form (no `#[serde(default)]`).
fn optional_field<'a, T>(v: Option<&'a J>, seq: bool, what: &str) -> Result<Option<&'a J>, Verdict<T>> {
    match v {
        None if seq => Err(reject(format!("{what} missing from the array form"))),
        None | Some(J::Null) => Ok(None),
        Some(x) => Ok(Some(x)),
    }
}

fn unique<T>(entries: &[(String, J)], keys: &[&str]) -> Result<(), Verdict<T>> {
    for k in keys {
        if J::all(entries, k).len() > 1 {
            return Err(reject(format!("duplicate field {k}")));
        }
    }
    Ok(())
}

fn one<'a>(entries: &'a [(String, J)], key: &str) -> Option<&'a J> {
    J::all(entries, key).into_iter().next()
}

/// `data`: numbers in (possibly nested, possibly ragged) arrays, flattened.
fn flatten<T>(v: &J, out: &mut Vec<f32>) -> Result<(), Verdict<T>> {
    match v {
        J::Arr(items) => items.iter().try_for_each(|x| flatten(x, out)),
        x => {
            out.push(finite_f32(x, "data element")?);
            Ok(())
        }
    }
}

/// The v2 infer header `doc` with the bytes after it.
pub fn v2(doc: &J, binary: &[u8], limits: &InputLimits) -> Verdict<V2Expect> {
    let J::Obj(top) = doc else {
        return reject("header is not an object");
    };
    tri!(unique(top, &["id", "inputs", "outputs", "parameters"]));
    let id = match one(top, "id") {
        None => None,
        Some(J::Str(s)) => Some(s.clone()),
        Some(_) => return reject("id is not a string"),
    };
    let default_binary = match one(top, "parameters") {
        None => false,
        Some(p) => match tri!(derived_struct(p, &["binary_data_output"])).0[0] {
            None => false,
            Some(J::Bool(b)) => *b,
            Some(_) => return reject("binary_data_output is not a bool"),
        },
    };

    // outputs
    let outputs = match one(top, "outputs") {
        None => OUTPUTS.iter().map(|&n| (n, default_binary)).collect(),
        Some(J::Arr(list)) => {
            let mut outputs: Vec<(&'static str, bool)> = Vec::new();
            for o in list {
                // `parameters` has #[serde(default)]: it may be missing in either form.
                let (f, _) = tri!(derived_struct(o, &["name", "parameters"]));
                let name = match f[0] {
                    Some(J::Str(s)) => s,
                    _ => return reject("output name missing or not a string"),
                };
                let binary = match f[1] {
                    None => None,
                    Some(p) => {
                        let (pf, pseq) = tri!(derived_struct(p, &["binary_data"]));
                        match tri!(optional_field(pf[0], pseq, "binary_data")) {
                            None => None,
                            Some(J::Bool(b)) => Some(*b),
                            Some(_) => return reject("binary_data is not a bool"),
                        }
                    }
                };
                let Some(&name) = OUTPUTS.iter().find(|&&n| n == name) else {
                    return reject("unknown output");
                };
                if outputs.iter().any(|(n, _)| *n == name) {
                    return reject("output requested twice");
                }
                outputs.push((name, binary.unwrap_or(default_binary)));
            }
            outputs
        }
        Some(_) => return reject("outputs is not an array"),
    };

    // inputs: exactly one, an object
    let tensor = match one(top, "inputs") {
        Some(J::Arr(items)) => match &items[..] {
            [J::Obj(t)] => t,
            [] => return reject("no inputs"),
            [_] => return reject("input is not an object"),
            _ => return reject("more than one input"),
        },
        None => return reject("no inputs"),
        Some(_) => return reject("inputs is not an array"),
    };
    tri!(unique(tensor, &["name", "datatype", "shape", "data"]));
    if J::all(tensor, "parameters").len() > 1 {
        return reject("duplicate field parameters");
    }
    match one(tensor, "name") {
        Some(J::Str(s)) if s == "features" => {}
        _ => return reject("input name is not 'features'"),
    }
    match one(tensor, "datatype") {
        Some(J::Str(s)) if s == "FP32" => {}
        _ => return reject("datatype is not 'FP32'"),
    }
    let shape: Vec<i64> = match one(tensor, "shape") {
        Some(J::Arr(dims)) => {
            let mut shape = Vec::new();
            for d in dims {
                match *d {
                    J::U(u) if u <= i64::MAX as u64 => shape.push(u as i64),
                    J::I(i) => shape.push(i),
                    _ => return reject("a shape dimension is not an i64"),
                }
            }
            if shape.len() > 8 {
                return reject("shape rank over 8");
            }
            shape
        }
        _ => return reject("shape missing or not an array"),
    };
    let n_rows = match shape[..] {
        [n, d] if n >= 1 && d == limits.row_len as i64 && n as u64 <= limits.max_rows as u64 => n as usize,
        _ => return reject("shape is not [1..=max_rows, row_len]"),
    };
    let expected = n_rows * limits.row_len;
    let binary_data_size = match one(tensor, "parameters") {
        None => None,
        Some(p) => {
            let (f, seq) = tri!(derived_struct(p, &["binary_data_size"]));
            match tri!(optional_field(f[0], seq, "binary_data_size")) {
                None => None,
                Some(J::U(u)) => Some(*u),
                Some(_) => return reject("binary_data_size is not a u64"),
            }
        }
    };
    let data = match one(tensor, "data") {
        None => None,
        Some(v) => {
            let mut values = Vec::new();
            tri!(flatten(v, &mut values));
            Some(values)
        }
    };
    let values = match (binary_data_size, data) {
        (Some(_), Some(_)) => return reject("both binary_data_size and data"),
        (None, None) => return reject("neither binary_data_size nor data"),
        (Some(size), None) => {
            if size != binary.len() as u64 || size != 4 * expected as u64 {
                return reject("binary_data_size disagrees with the binary part or the shape");
            }
            let values: Vec<f32> = binary
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if values.iter().any(|v| !v.is_finite()) {
                return reject("a binary value is not finite");
            }
            values
        }
        (None, Some(values)) => {
            if !binary.is_empty() {
                return reject("binary bytes after a JSON-data header");
            }
            if values.len() != expected {
                return reject("data length disagrees with the shape");
            }
            values
        }
    };
    Verdict::Accept(V2Expect {
        id,
        values,
        n_rows,
        outputs,
    })
}
