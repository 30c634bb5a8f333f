//! The one validated input the engine accepts, whatever protocol it came in,
//! and the one place its rules are checked.
//!
//! Owns: [`InferInput`] (row-major f32 rows, fields private, built only by
//! [`InferInput::new`] or, for a parser that reads rows one by one,
//! [`InferInput::from_rows`]), which check the rules every input obeys: at
//! least one row, every row `row_len` values long, at most
//! `batching.max_request_rows` rows ([`InputLimits::check_rows`], also what
//! a row count declared before the values, an Open Inference Protocol
//! shape, is held to), every value finite. Also its limits
//! ([`InputLimits`]) and [`RequestError`], the ways a client's input can be
//! wrong. Protocol parsers (`sidecar_json.rs`, `http/v2/request.rs`,
//! `grpc/request.rs`, `oip/`) only cap their memory (never storing more
//! values than the limits allow, never allocating by a number the client
//! sent) and build values; the verdict is given here, so the batcher and
//! the workers never have to trust a length. Must not touch: wire formats,
//! status codes (see `http/error.rs`, `grpc/status.rs`).

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
    /// The request breaks its protocol's rules (an Open Inference Protocol
    /// tensor that is not the model's, a header that does not parse); the
    /// text is the whole message.
    #[error("{0}")]
    Protocol(String),
}

impl RequestError {
    /// Why the request failed, as the failure metric's label.
    pub fn reason(&self) -> crate::labels::FailureReason {
        match self {
            RequestError::TooManyRows { .. } => crate::labels::FailureReason::TooLarge,
            _ => crate::labels::FailureReason::Invalid,
        }
    }
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

/// What a parser that reads rows one by one saw, before any rule is
/// applied: the values it stored (at most `row_len` per row and
/// `max_rows` rows: its memory cap), how many rows the client sent (counted
/// past the cap without storing them), and the first row whose length was
/// not `row_len`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowsRead {
    pub values: Vec<f32>,
    pub rows: usize,
    pub ragged: Option<RaggedRow>,
}

/// A row of the wrong length: its index and how many values it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaggedRow {
    pub row: usize,
    pub len: usize,
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
                "row {}, feature {}: {} is not finite as f32 (NaN or infinity)",
                i / row_len,
                i % row_len,
                values[i]
            )));
        }
        Ok(InferInput {
            values,
            n_rows,
            row_len,
        })
    }

    /// Validates rows a parser read one by one: a row of the wrong length
    /// is refused naming it, then the row count (all the rows sent, stored
    /// or not) against the limit, then the values as [`InferInput::new`].
    pub fn from_rows(read: RowsRead, limits: &InputLimits) -> Result<InferInput, RequestError> {
        if let Some(RaggedRow { row, len }) = read.ragged {
            return Err(RequestError::Invalid(format!(
                "row {row} has {len} features, expected {}",
                limits.row_len
            )));
        }
        limits.check_rows(read.rows)?;
        InferInput::new(read.values, limits)
    }

    /// `Err` unless this input, validated for one version's limits, fits
    /// `limits` too (the version that computes it: a model unloaded and
    /// loaded again may have changed shape in between).
    pub fn fits(&self, limits: &InputLimits) -> Result<(), RequestError> {
        if self.row_len != limits.row_len {
            return Err(RequestError::Invalid(format!(
                "rows have {} values, the model's input has {}",
                self.row_len, limits.row_len
            )));
        }
        limits.check_rows(self.n_rows)
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
        assert!(matches!(err(vec![1.0, f32::INFINITY, 0.0]), RequestError::Invalid(m) if m.contains("not finite")));
    }

    #[test]
    fn rows_read_are_held_to_the_same_rules_ragged_first() {
        let read = |values: Vec<f32>, rows, ragged| RowsRead { values, rows, ragged };
        let ragged = Some(RaggedRow { row: 1, len: 2 });
        assert_eq!(
            InferInput::from_rows(read(vec![1.0; 5], 9, ragged), &LIMITS).unwrap_err(),
            RequestError::Invalid("row 1 has 2 features, expected 3".into())
        );
        // Rows counted past the stored ones still count.
        assert_eq!(
            InferInput::from_rows(read(vec![1.0; 6], 9, None), &LIMITS).unwrap_err(),
            RequestError::TooManyRows { rows: 9, limit: 2 }
        );
        let ok = InferInput::from_rows(read(vec![1.0; 6], 2, None), &LIMITS).unwrap();
        assert_eq!(ok.n_rows(), 2);
        assert_eq!(ok.fits(&LIMITS), Ok(()));
        let narrower = InputLimits {
            row_len: 2,
            max_rows: 3,
        };
        assert!(matches!(ok.fits(&narrower), Err(RequestError::Invalid(m)) if m.contains("has 2")));
        let fewer = InputLimits {
            row_len: 3,
            max_rows: 1,
        };
        assert_eq!(ok.fits(&fewer), Err(RequestError::TooManyRows { rows: 2, limit: 1 }));
    }
}
