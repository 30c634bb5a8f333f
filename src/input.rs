//! The one validated input the engine accepts, whatever protocol it came in.
//!
//! Owns: [`InferInput`] (row-major f32 rows, fields private, built only by
//! [`InferInput::new`], which checks the row length, the row limit and that
//! every value is finite), its limits ([`InputLimits`]), and
//! [`RequestError`], the ways a client's input can be wrong. Protocol
//! parsers (`sidecar_json.rs`, `http/v2/`) may reject earlier and with more
//! precise messages, but nothing reaches the engine without passing through
//! here, so the batcher and the workers never have to trust a length. Must
//! not touch: wire formats, HTTP status codes (see `http/error.rs`).

use std::cell::RefCell;
use std::fmt;

/// Why a request's input was rejected. Every variant is the client's fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("request has {rows} rows, more than the limit of {limit}")]
    TooManyRows { rows: usize, limit: usize },
}

/// What a valid input looks like: rows of `row_len` values, at most
/// `max_rows` of them (`batching.max_request_rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    pub row_len: usize,
    pub max_rows: usize,
}

impl InputLimits {
    /// `Err` when `n_rows` is over the limit; for parsers that learn the row
    /// count before the rows (a declared shape, a row counter).
    pub fn check_rows(&self, n_rows: usize) -> Result<(), RequestError> {
        if n_rows > self.max_rows {
            Err(RequestError::TooManyRows {
                rows: n_rows,
                limit: self.max_rows,
            })
        } else {
            Ok(())
        }
    }
}

/// `n_rows` rows of `row_len` finite f32 values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct InferInput {
    values: Vec<f32>,
    n_rows: usize,
    row_len: usize,
}

impl InferInput {
    /// Validates `values` as whole rows under `limits`: at least one row, at
    /// most `limits.max_rows`, every value finite.
    pub fn new(values: Vec<f32>, limits: &InputLimits) -> Result<InferInput, RequestError> {
        let row_len = limits.row_len.max(1);
        if values.is_empty() {
            return Err(RequestError::Invalid("the input has no rows".into()));
        }
        if !values.len().is_multiple_of(row_len) {
            return Err(RequestError::Invalid(format!(
                "the input has {} values, not a whole number of rows of {row_len}",
                values.len()
            )));
        }
        let n_rows = values.len() / row_len;
        limits.check_rows(n_rows)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(RequestError::Invalid(format!(
                "row {}, feature {}: the value is not finite (NaN or infinity)",
                i / row_len,
                i % row_len
            )));
        }
        Ok(InferInput {
            values,
            n_rows,
            row_len,
        })
    }

    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Every value, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Rows `[first, first + n)`, row-major. Panics when out of range: a
    /// caller's bug, since slices of a job are cut from its own row count.
    pub fn rows(&self, first: usize, n: usize) -> &[f32] {
        &self.values[first * self.row_len..(first + n) * self.row_len]
    }
}

/// Most characters of client text (a serde message quoting the body, a
/// name) repeated back in an error message.
pub const MAX_QUOTED_CHARS: usize = 200;

/// `text` cut to [`MAX_QUOTED_CHARS`] characters (marked when cut), so an
/// error never echoes a megabyte the client sent.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        None => text.to_string(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}

/// Where a streaming serde visitor records the typed error it rejected a
/// body for: serde only carries text, so the visitor stores the real error
/// here and hands serde a placeholder to unwind with; the parser then
/// answers the stored one. Shared by the `/infer` and the v2 parsers.
pub(crate) struct ErrorSlot<E>(RefCell<Option<E>>);

impl<E> Default for ErrorSlot<E> {
    fn default() -> Self {
        ErrorSlot(RefCell::new(None))
    }
}

impl<E> ErrorSlot<E> {
    /// Records `error` (the first one wins) and returns serde's placeholder.
    pub(crate) fn reject<D: serde::de::Error>(&self, error: E) -> D {
        self.0.borrow_mut().get_or_insert(error);
        D::custom("rejected by the request visitor")
    }

    /// The recorded error, if a visitor rejected the body.
    pub(crate) fn take(&self) -> Option<E> {
        self.0.borrow_mut().take()
    }
}

impl ErrorSlot<RequestError> {
    pub(crate) fn invalid<D: serde::de::Error>(&self, msg: impl fmt::Display) -> D {
        self.reject(RequestError::Invalid(msg.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: InputLimits = InputLimits {
        row_len: 3,
        max_rows: 2,
    };

    #[test]
    fn clipped_text_is_bounded_and_marked() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(MAX_QUOTED_CHARS + 50);
        let cut = clip(&long);
        assert_eq!(cut.chars().count(), MAX_QUOTED_CHARS + 3);
        assert!(cut.ends_with("..."));
    }

    #[test]
    fn accepts_whole_finite_rows_within_the_limit() {
        let input = InferInput::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &LIMITS).unwrap();
        assert_eq!((input.n_rows(), input.row_len()), (2, 3));
        assert_eq!(input.rows(1, 1), &[4.0, 5.0, 6.0]);
    }

    #[test]
    fn rejects_empty_ragged_too_many_and_non_finite() {
        let err = |v: Vec<f32>| InferInput::new(v, &LIMITS).unwrap_err();
        assert!(matches!(err(vec![]), RequestError::Invalid(m) if m.contains("no rows")));
        assert!(matches!(err(vec![1.0; 4]), RequestError::Invalid(m) if m.contains("4 values")));
        assert_eq!(err(vec![1.0; 9]), RequestError::TooManyRows { rows: 3, limit: 2 });
        let mut v = vec![1.0; 6];
        v[4] = f32::NAN;
        assert!(matches!(err(v), RequestError::Invalid(m) if m.contains("row 1, feature 1")));
        assert!(matches!(err(vec![1.0, f32::INFINITY, 0.0]), RequestError::Invalid(_)));
    }
}
