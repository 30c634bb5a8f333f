//! A fuzz campaign over the engine's two request parsers, run by every
//! `cargo test`: `/infer`'s `sidecar_json::parse_infer_request` and the
//! Open Inference Protocol's `http::v2::parse_request` (issue 11, item 7).
//!
//! Proves, for well over 100,000 generated bodies per run (each property
//! prints how many it ran), that:
//! 1. neither parser panics, whatever the bytes (each call is also wrapped
//!    in `catch_unwind`, so the failure names the input);
//! 2. every rejection is a typed error whose HTTP status is a 4xx
//!    (`RequestError` through `HttpError`, `V2Error` directly), and
//!    `/infer` never calls well-formed JSON a JSON syntax error;
//! 3. every acceptance is a genuinely valid input: all values finite,
//!    `values().len() == n_rows * row_len`, `1 <= n_rows <= max_rows`, and
//!    (v2) no output listed twice;
//! 4. on every body that is well-formed JSON, the parser agrees with an
//!    independent reference parser written over a fully parsed tree
//!    (`fuzz/reference.rs`): same accept/reject, and on accept bit-identical
//!    f32 values (`v as f32` of the f64 the JSON denotes), the same row
//!    count and form, id and outputs.
//!
//! The bodies are valid requests (random limits, flat and batch forms,
//! JSON data flat or nested and binary tensor data, shuffled keys, unknown
//! fields) put through byte mutations (truncation, bit flips, inserted and
//! deleted bytes, duplicated spans, random bytes, JSON fragments and
//! non-UTF-8 sequences, deep bracket runs) or tree mutations (type swaps,
//! hostile numbers, removed and repeated nodes and true duplicate keys,
//! 100 KB strings, 200+ levels of nesting, renamed keys, and format-aware
//! ones: wrong row lengths, too many rows, overflowing and wrong-rank shapes,
//! `binary_data_size` disagreeing with the binary part, both data forms,
//! outputs repeated or unknown, a non-string id, a moved JSON/binary split),
//! plus token soup. Deterministic tests add every truncation of valid bodies
//! and a table of hand-written hostile bodies.
//!
//! Knobs: `FUZZ_PARSERS_SEED` (a u64; default fixed, or `PROPTEST_RNG_SEED`)
//! and `FUZZ_PARSERS_SCALE` (multiplies every case count; default 1).

mod fuzz;

use std::cell::Cell;
use std::fmt::Debug;
use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

use actix_web::ResponseError;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use tokitai_serve::http::error::HttpError;
use tokitai_serve::http::v2::{V2Request, parse_request};
use tokitai_serve::input::{InferInput, InputLimits, RequestError};
use tokitai_serve::sidecar_json::{SidecarRequest, parse_infer_request};

use fuzz::json::J;
use fuzz::mutate::{
    SidecarOp, TOKEN_COUNT, TreeOp, V2Op, apply_bytes, apply_sidecar, apply_tree, apply_v2, byte_op, limits,
    sidecar_body, sidecar_op, split, token, tree_op, v2_body, v2_op,
};
use fuzz::reference::{self, Verdict};

// ---- the campaign's runner -----------------------------------------------------

const DEFAULT_SEED: u64 = 0x0011_2026_1201;

/// The seed every property runs from: `FUZZ_PARSERS_SEED`, else
/// `PROPTEST_RNG_SEED`, else a fixed one (so a CI run is reproducible).
fn seed() -> u64 {
    if let Ok(s) = std::env::var("FUZZ_PARSERS_SEED") {
        return s.trim().parse().expect("FUZZ_PARSERS_SEED must be a u64");
    }
    match Config::default().rng_seed {
        RngSeed::Fixed(s) => s,
        RngSeed::Random => DEFAULT_SEED,
    }
}

fn scaled(cases: u32) -> u32 {
    let scale: f64 = std::env::var("FUZZ_PARSERS_SCALE")
        .ok()
        .map(|s| s.trim().parse().expect("FUZZ_PARSERS_SCALE must be a number"))
        .unwrap_or(1.0);
    ((cases as f64 * scale).round() as u32).max(1)
}

/// Writes a line to stderr past libtest's output capture (which takes
/// `eprintln!` from passing tests), so a plain `cargo test` log in CI shows
/// each property's case count.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// What one property saw, printed at its end so the CI log shows the count
/// and that the cases were not all of one kind.
#[derive(Default)]
struct Stats {
    cases: Cell<u64>,
    parses: Cell<u64>,
    accepted: Cell<u64>,
    rejected: Cell<u64>,
    compared: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

/// Runs `test` on `cases` values of `strategy`, prints the counts, and fails
/// (with the shrunk input) on the first case that fails.
fn campaign<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value, &Stats) -> Result<(), String>)
where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed();
    let config = Config {
        cases: scaled(cases),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let stats = Stats::default();
    let start = Instant::now();
    let mut runner = TestRunner::new(config.clone());
    let result = runner.run(&strategy, |value| {
        bump(&stats.cases);
        test(value, &stats).map_err(TestCaseError::fail)
    });
    report!(
        "fuzz_parsers: {name}: {} cases ({} parses: {} accepted, {} rejected; {} compared with the reference) in {:.1?}, seed {seed}",
        stats.cases.get(),
        stats.parses.get(),
        stats.accepted.get(),
        stats.rejected.get(),
        stats.compared.get(),
        start.elapsed()
    );
    if let Err(e) = result {
        panic!("{name} failed (seed {seed}; rerun with FUZZ_PARSERS_SEED={seed}): {e}");
    }
    assert!(stats.cases.get() >= config.cases as u64, "{name} ran too few cases");
    assert!(
        stats.accepted.get() > 0 && stats.rejected.get() > 0 && stats.compared.get() > 0,
        "{name}: the generator lost its variety (nothing accepted, rejected or compared)"
    );
}

// ---- the properties every parse must keep -----------------------------------------

/// `bytes` for a failure message: escaped, long ones cut in the middle.
fn show(bytes: &[u8]) -> String {
    const HEAD: usize = 1500;
    const TAIL: usize = 300;
    if bytes.len() <= HEAD + TAIL {
        format!("b\"{}\" ({} bytes)", bytes.escape_ascii(), bytes.len())
    } else {
        format!(
            "b\"{}\"...<{} bytes>...b\"{}\" ({} bytes)",
            bytes[..HEAD].escape_ascii(),
            bytes.len() - HEAD - TAIL,
            bytes[bytes.len() - TAIL..].escape_ascii(),
            bytes.len()
        )
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into())
}

/// Property 3: an accepted input is valid under `limits`.
fn check_input(input: &InferInput, limits: &InputLimits) -> Result<(), String> {
    let n = input.n_rows();
    if input.row_len() != limits.row_len {
        return Err(format!("row_len {} != {}", input.row_len(), limits.row_len));
    }
    if input.values().len() != n * limits.row_len {
        return Err(format!(
            "{} values for {n} rows of {}",
            input.values().len(),
            limits.row_len
        ));
    }
    if n < 1 || n > limits.max_rows {
        return Err(format!("{n} rows, limit {}", limits.max_rows));
    }
    if let Some(i) = input.values().iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is {}", input.values()[i]));
    }
    Ok(())
}

fn same_bits(got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} values, the reference has {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        Some(i) => Err(format!("value {i} is {:e}, the reference has {:e}", got[i], want[i])),
        None => Ok(()),
    }
}

/// Runs `/infer`'s parser on `body` and checks properties 1-4. Returns
/// whether the body was accepted.
fn check_sidecar(body: &[u8], limits: &InputLimits, stats: &Stats) -> Result<bool, String> {
    bump(&stats.parses);
    let got = panic::catch_unwind(AssertUnwindSafe(|| parse_infer_request(body, limits))).map_err(|p| {
        format!(
            "parse_infer_request panicked ({}) on {} with {limits:?}",
            panic_message(&*p),
            show(body)
        )
    })?;
    let fail = |what: String| format!("/infer, {limits:?}: {what}\n  body: {}", show(body));
    match &got {
        Ok(req) => {
            bump(&stats.accepted);
            check_input(&req.input, limits).map_err(|e| fail(format!("accepted an invalid input: {e}")))?;
            if req.single_row && req.input.n_rows() != 1 {
                return Err(fail(format!("single_row with {} rows", req.input.n_rows())));
            }
        }
        Err(e) => {
            bump(&stats.rejected);
            let status = HttpError::from(e.clone()).status_code();
            if !status.is_client_error() {
                return Err(fail(format!("rejection {e:?} maps to {status}, not a 4xx")));
            }
        }
    }
    let Some(doc) = J::parse(body) else {
        return Ok(got.is_ok());
    };
    bump(&stats.compared);
    if let Err(RequestError::Json(m)) = &got {
        return Err(fail(format!("well-formed JSON rejected as a JSON syntax error: {m}")));
    }
    match (reference::sidecar(&doc, limits), &got) {
        (Verdict::Accept(want), Ok(SidecarRequest { input, single_row })) => {
            same_bits(input.values(), &want.values).map_err(fail)?;
            if (input.n_rows(), *single_row) != (want.n_rows, want.single_row) {
                return Err(fail(format!(
                    "(n_rows, single_row) = {:?}, the reference has {:?}",
                    (input.n_rows(), single_row),
                    (want.n_rows, want.single_row)
                )));
            }
        }
        (Verdict::Accept(_), Err(e)) => return Err(fail(format!("rejected ({e:?}) a body the reference accepts"))),
        (Verdict::Reject(why), Ok(_)) => return Err(fail(format!("accepted a body the reference rejects ({why})"))),
        (Verdict::Reject(_), Err(_)) => {}
    }
    Ok(got.is_ok())
}

/// Runs the v2 parser on `json` + `binary` and checks properties 1-4.
/// Returns whether the request was accepted.
fn check_v2(json: &[u8], binary: &[u8], limits: &InputLimits, stats: &Stats) -> Result<bool, String> {
    bump(&stats.parses);
    let got = panic::catch_unwind(AssertUnwindSafe(|| parse_request(json, binary, limits))).map_err(|p| {
        format!(
            "v2 parse_request panicked ({}) on header {} and binary {} with {limits:?}",
            panic_message(&*p),
            show(json),
            show(binary)
        )
    })?;
    let fail = |what: String| {
        format!(
            "/v2, {limits:?}: {what}\n  header: {}\n  binary: {}",
            show(json),
            show(binary)
        )
    };
    match &got {
        Ok(req) => {
            bump(&stats.accepted);
            check_input(&req.input, limits).map_err(|e| fail(format!("accepted an invalid input: {e}")))?;
            for (i, o) in req.outputs.iter().enumerate() {
                if req.outputs[..i].iter().any(|p| p.output == o.output) {
                    return Err(fail(format!(
                        "output {} listed twice: {:?}",
                        o.output.as_str(),
                        req.outputs
                    )));
                }
            }
        }
        Err(e) => {
            bump(&stats.rejected);
            let status = e.status_code();
            if !status.is_client_error() {
                return Err(fail(format!("rejection {e:?} maps to {status}, not a 4xx")));
            }
        }
    }
    let Some(doc) = J::parse(json) else {
        return Ok(got.is_ok());
    };
    bump(&stats.compared);
    match (reference::v2(&doc, binary, limits), &got) {
        (Verdict::Accept(want), Ok(V2Request { id, input, outputs, .. })) => {
            same_bits(input.values(), &want.values).map_err(fail)?;
            let outputs: Vec<(&str, bool)> = outputs.iter().map(|o| (o.output.as_str(), o.binary)).collect();
            if (id, input.n_rows(), &outputs) != (&want.id, want.n_rows, &want.outputs) {
                return Err(fail(format!(
                    "(id, n_rows, outputs) = {:?}, the reference has {:?}",
                    (id, input.n_rows(), &outputs),
                    (&want.id, want.n_rows, &want.outputs)
                )));
            }
        }
        (Verdict::Accept(_), Err(e)) => {
            return Err(fail(format!("rejected ({e}) a request the reference accepts")));
        }
        (Verdict::Reject(why), Ok(_)) => {
            return Err(fail(format!("accepted a request the reference rejects ({why})")));
        }
        (Verdict::Reject(_), Err(_)) => {}
    }
    Ok(got.is_ok())
}

// ---- the properties -----------------------------------------------------------------

/// A valid body must parse: the generators and the reference are checked too.
fn must_accept(accepted: bool) -> Result<(), String> {
    if accepted {
        Ok(())
    } else {
        Err("an unmutated valid body was rejected".into())
    }
}

#[test]
fn sidecar_byte_mutations() {
    let strategy = (
        limits(),
        any::<u64>(),
        any::<bool>(),
        prop::collection::vec(byte_op(), 0..5),
    );
    campaign(
        "sidecar_byte_mutations",
        24_000,
        strategy,
        |(limits, seed, spaced, ops), stats| {
            let mut body = sidecar_body(&limits, seed).render(spaced);
            for op in &ops {
                apply_bytes(&mut body, op);
            }
            let accepted = check_sidecar(&body, &limits, stats)?;
            if ops.is_empty() { must_accept(accepted) } else { Ok(()) }
        },
    );
}

#[derive(Clone, Debug)]
enum SidecarMutation {
    Tree(TreeOp),
    Format(SidecarOp),
}

#[test]
fn sidecar_tree_mutations() {
    let op = prop_oneof![
        3 => tree_op().prop_map(SidecarMutation::Tree),
        2 => sidecar_op().prop_map(SidecarMutation::Format),
    ];
    let strategy = (limits(), any::<u64>(), any::<bool>(), prop::collection::vec(op, 0..4));
    campaign(
        "sidecar_tree_mutations",
        24_000,
        strategy,
        |(limits, seed, spaced, ops), stats| {
            let mut tree = sidecar_body(&limits, seed);
            for op in &ops {
                match op {
                    SidecarMutation::Tree(op) => apply_tree(&mut tree, op),
                    SidecarMutation::Format(op) => apply_sidecar(&mut tree, op, &limits),
                }
            }
            let accepted = check_sidecar(&tree.render(spaced), &limits, stats)?;
            if ops.is_empty() { must_accept(accepted) } else { Ok(()) }
        },
    );
}

#[test]
fn v2_byte_mutations() {
    let strategy = (
        limits(),
        any::<u64>(),
        any::<bool>(),
        prop::collection::vec(byte_op(), 0..5),
        prop::collection::vec(byte_op(), 0..2),
    );
    campaign(
        "v2_byte_mutations",
        24_000,
        strategy,
        |(limits, seed, spaced, ops, binary_ops), stats| {
            let (tree, mut binary) = v2_body(&limits, seed);
            let mut json = tree.render(spaced);
            for op in &ops {
                apply_bytes(&mut json, op);
            }
            for op in &binary_ops {
                apply_bytes(&mut binary, op);
            }
            let accepted = check_v2(&json, &binary, &limits, stats)?;
            if ops.is_empty() && binary_ops.is_empty() {
                must_accept(accepted)
            } else {
                Ok(())
            }
        },
    );
}

#[derive(Clone, Debug)]
enum V2Mutation {
    Tree(TreeOp),
    Format(V2Op),
}

#[test]
fn v2_tree_mutations() {
    let op = prop_oneof![
        2 => tree_op().prop_map(V2Mutation::Tree),
        3 => v2_op().prop_map(V2Mutation::Format),
    ];
    let strategy = (limits(), any::<u64>(), any::<bool>(), prop::collection::vec(op, 0..4));
    campaign(
        "v2_tree_mutations",
        24_000,
        strategy,
        |(limits, seed, spaced, ops), stats| {
            let (mut tree, mut binary) = v2_body(&limits, seed);
            let mut shift = 0i16;
            for op in &ops {
                match op {
                    V2Mutation::Tree(op) => apply_tree(&mut tree, op),
                    V2Mutation::Format(V2Op::Split { shift: s }) => shift = *s,
                    V2Mutation::Format(op) => apply_v2(&mut tree, &mut binary, op, &limits),
                }
            }
            let (json, binary) = split(tree.render(spaced), binary, shift);
            let accepted = check_v2(&json, &binary, &limits, stats)?;
            if ops.is_empty() { must_accept(accepted) } else { Ok(()) }
        },
    );
}

/// Starts that put the soup where each parser reads most closely.
const SOUP_PREFIXES: &[&[u8]] = &[
    b"",
    b"{",
    b"{\"features\":",
    b"{\"features\":[",
    b"{\"features\":[[1,2,3,4],",
    b"{\"inputs\":[{",
    b"{\"inputs\":[{\"name\":\"features\",\"datatype\":\"FP32\",\"shape\":[1,4],\"data\":",
    b"{\"inputs\":[{\"name\":\"features\",\"datatype\":\"FP32\",\"shape\":[1,4],\"parameters\":",
    b"{\"outputs\":[",
    b"{\"id\":",
];

/// A valid header for one row of binary data: the soup is its binary part.
const BINARY_HEADER: &[u8] =
    br#"{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"parameters":{"binary_data_size":16}}]}"#;

#[test]
fn token_soup_through_both_parsers() {
    let strategy = (
        0..SOUP_PREFIXES.len(),
        prop::collection::vec(0..TOKEN_COUNT, 0..40),
        any::<bool>(),
    );
    let limits = InputLimits {
        row_len: 4,
        max_rows: 8,
    };
    campaign("token_soup", 12_000, strategy, |(prefix, tokens, close), stats| {
        let mut body = SOUP_PREFIXES[prefix].to_vec();
        for t in tokens {
            body.extend_from_slice(token(t));
        }
        if close {
            // Close what the prefix opened, so some soups are whole documents.
            let opens = body.iter().filter(|&&b| b == b'[' || b == b'{').count();
            let closes = body.iter().filter(|&&b| b == b']' || b == b'}').count();
            let stack: Vec<u8> = body
                .iter()
                .filter(|&&b| b == b'[' || b == b'{')
                .map(|&b| if b == b'[' { b']' } else { b'}' })
                .collect();
            body.extend(stack.iter().rev().take(opens.saturating_sub(closes)));
        }
        check_sidecar(&body, &limits, stats)?;
        check_v2(&body, &[], &limits, stats)?;
        check_v2(BINARY_HEADER, &body, &limits, stats)?;
        Ok(())
    });
}

// ---- deterministic sweeps -----------------------------------------------------------

const SMALL: InputLimits = InputLimits {
    row_len: 4,
    max_rows: 8,
};
const REAL: InputLimits = InputLimits {
    row_len: 96,
    max_rows: 8,
};

fn trimmed(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &b[..end]
}

/// Every truncation of valid bodies, at every byte: rejected, as a JSON error
/// on `/infer` (the visitor saw only valid content before the end).
#[test]
fn every_truncation_of_valid_bodies_is_rejected() {
    let stats = Stats::default();
    let start = Instant::now();
    for seed in 0..24u64 {
        for limits in [SMALL, REAL] {
            if limits == REAL && seed % 6 != 0 {
                continue;
            }
            let body = sidecar_body(&limits, seed).render(seed % 2 == 0);
            assert!(check_sidecar(&body, &limits, &stats).unwrap(), "valid body rejected");
            for cut in 0..body.len() {
                let prefix = &body[..cut];
                if trimmed(prefix) == trimmed(&body) {
                    continue;
                }
                assert!(!check_sidecar(prefix, &limits, &stats).unwrap(), "prefix accepted");
                let err = parse_infer_request(prefix, &limits).unwrap_err();
                assert!(
                    matches!(err, RequestError::Json(_)),
                    "prefix {} gave {err:?}, not a JSON error",
                    show(prefix)
                );
            }

            let (tree, binary) = v2_body(&limits, seed);
            let json = tree.render(seed % 2 == 1);
            assert!(
                check_v2(&json, &binary, &limits, &stats).unwrap(),
                "valid v2 request rejected"
            );
            for cut in 0..json.len() {
                if trimmed(&json[..cut]) != trimmed(&json) {
                    assert!(!check_v2(&json[..cut], &binary, &limits, &stats).unwrap());
                }
            }
            for cut in 0..binary.len() {
                assert!(!check_v2(&json, &binary[..cut], &limits, &stats).unwrap());
            }
        }
    }
    report!(
        "fuzz_parsers: every_truncation: {} parses ({} accepted, {} rejected) in {:.1?}",
        stats.parses.get(),
        stats.accepted.get(),
        stats.rejected.get(),
        start.elapsed()
    );
}

/// What a hand-written body must get.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    Accept,
    Reject,
    /// Either, as long as properties 1-4 hold.
    Any,
}

fn nums(n: usize) -> String {
    (1..=n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// A v2 header with `tensor` fields spliced into a valid tensor, and `top`
/// fields into the header.
fn v2_header(tensor: &str, top: &str) -> String {
    format!(r#"{{"inputs":[{{"name":"features","datatype":"FP32"{tensor}}}]{top}}}"#)
}

/// The brief's hostile inputs, each named, for both parsers.
#[test]
fn hostile_bodies_table() {
    let row = nums(4);
    let deep = |d: usize, inner: &str| format!("{}{inner}{}", "[".repeat(d), "]".repeat(d));
    let long = "a".repeat(100_000);
    let sidecar: Vec<(&str, String, Want)> = vec![
        ("flat row", format!(r#"{{"features":[{row}]}}"#), Want::Accept),
        (
            "batch of 8",
            format!(r#"{{"features":[{}]}}"#, vec![format!("[{row}]"); 8].join(",")),
            Want::Accept,
        ),
        (
            "batch of 9",
            format!(r#"{{"features":[{}]}}"#, vec![format!("[{row}]"); 9].join(",")),
            Want::Reject,
        ),
        ("row of 3", r#"{"features":[[1,2,3]]}"#.into(), Want::Reject),
        ("row of 5", r#"{"features":[[1,2,3,4,5]]}"#.into(), Want::Reject),
        ("flat of 5", r#"{"features":[1,2,3,4,5]}"#.into(), Want::Reject),
        ("empty", r#"{"features":[]}"#.into(), Want::Reject),
        ("empty row", r#"{"features":[[]]}"#.into(), Want::Reject),
        (
            "duplicate features",
            format!(r#"{{"features":[{row}],"features":[{row}]}}"#),
            Want::Reject,
        ),
        (
            "duplicate unknown key",
            format!(r#"{{"x":1,"x":2,"features":[{row}]}}"#),
            Want::Accept,
        ),
        ("escaped key", format!(r#"{{"feat\u0075res":[{row}]}}"#), Want::Accept),
        ("1e39", r#"{"features":[1,2,3,1e39]}"#.into(), Want::Reject),
        ("-1e39", r#"{"features":[1,2,3,-1e39]}"#.into(), Want::Reject),
        ("1e308", r#"{"features":[1,2,3,1e308]}"#.into(), Want::Reject),
        ("1e309", r#"{"features":[1,2,3,1e309]}"#.into(), Want::Reject),
        (
            "-0, 1e-45, past u64",
            r#"{"features":[-0,1e-45,18446744073709551616,-9223372036854775809]}"#.into(),
            Want::Accept,
        ),
        ("NaN", r#"{"features":[1,2,3,NaN]}"#.into(), Want::Reject),
        ("string number", r#"{"features":[1,2,3,"4"]}"#.into(), Want::Reject),
        (
            "features 200 deep",
            format!(r#"{{"features":{}}}"#, deep(200, "1")),
            Want::Reject,
        ),
        (
            "features 100000 deep",
            format!(r#"{{"features":{}}}"#, deep(100_000, "1")),
            Want::Reject,
        ),
        (
            "unterminated 100000 deep",
            format!(r#"{{"features":{}"#, "[".repeat(100_000)),
            Want::Reject,
        ),
        (
            "unknown field 200 deep",
            format!(r#"{{"x":{},"features":[{row}]}}"#, deep(200, "")),
            Want::Any,
        ),
        (
            "unknown field 100000 deep",
            format!(r#"{{"x":{},"features":[{row}]}}"#, deep(100_000, "")),
            Want::Any,
        ),
        (
            "100 KB unknown string",
            format!(r#"{{"x":"{long}","features":[{row}]}}"#),
            Want::Accept,
        ),
        (
            "100 KB key",
            format!(r#"{{"{long}":1,"features":[{row}]}}"#),
            Want::Accept,
        ),
        (
            "100 KB string as a feature",
            format!(r#"{{"features":[1,2,3,"{long}"]}}"#),
            Want::Reject,
        ),
        ("not an object", format!("[{row}]"), Want::Reject),
        ("trailing garbage", format!(r#"{{"features":[{row}]}} x"#), Want::Reject),
        ("raw NUL in a key", "{\"\u{0}\":1}".into(), Want::Reject),
    ];
    let stats = Stats::default();
    let mut failures = Vec::new();
    let mut record = |name: &str, result: Result<bool, String>, want: Want| match result {
        Err(e) => failures.push(format!("{name}: {e}")),
        Ok(accepted) if want == Want::Accept && !accepted => failures.push(format!("{name}: rejected")),
        Ok(accepted) if want == Want::Reject && accepted => failures.push(format!("{name}: accepted")),
        Ok(_) => {}
    };
    for (name, body, want) in &sidecar {
        record(name, check_sidecar(body.as_bytes(), &SMALL, &stats), *want);
    }
    // Bytes that are not UTF-8 inside strings and between tokens.
    for (name, body) in [
        (
            "0xff in an unknown string",
            b"{\"x\":\"\xff\",\"features\":[1,2,3,4]}".to_vec(),
        ),
        ("0xff as a key", b"{\"\xff\":1,\"features\":[1,2,3,4]}".to_vec()),
        ("0xff between tokens", b"{\"features\":[1,2,\xff3,4]}".to_vec()),
        (
            "surrogate half",
            b"{\"\xed\xa0\x80\":1,\"features\":[1,2,3,4]}".to_vec(),
        ),
    ] {
        record(name, check_sidecar(&body, &SMALL, &stats), Want::Any);
    }

    let bin = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect() };
    let data1 = format!(r#","shape":[1,4],"data":[{row}]"#);
    let v2: Vec<(&str, String, Vec<u8>, Want)> = vec![
        ("valid data", v2_header(&data1, ""), vec![], Want::Accept),
        (
            "valid binary",
            v2_header(r#","shape":[2,4],"parameters":{"binary_data_size":32}"#, ""),
            bin(8),
            Want::Accept,
        ),
        (
            "nested ragged data",
            v2_header(r#","shape":[2,4],"data":[[1,2,3],[[4,5],6,7,8]]"#, ""),
            vec![],
            Want::Accept,
        ),
        (
            "shape [i64::MAX, 4]",
            v2_header(r#","shape":[9223372036854775807,4],"data":[1,2,3,4]"#, ""),
            vec![],
            Want::Reject,
        ),
        (
            "shape [-1, 4]",
            v2_header(r#","shape":[-1,4],"data":[1,2,3,4]"#, ""),
            vec![],
            Want::Reject,
        ),
        (
            "shape [0, 4]",
            v2_header(r#","shape":[0,4],"data":[]"#, ""),
            vec![],
            Want::Reject,
        ),
        (
            "shape [2^63, 4]",
            v2_header(r#","shape":[9223372036854775808,4],"data":[1,2,3,4]"#, ""),
            vec![],
            Want::Reject,
        ),
        (
            "shape rank 9",
            v2_header(r#","shape":[1,4,1,1,1,1,1,1,1],"data":[1,2,3,4]"#, ""),
            vec![],
            Want::Reject,
        ),
        (
            "shape rank 1000",
            v2_header(
                &format!(r#","shape":[{}],"data":[1,2,3,4]"#, vec!["1"; 1000].join(",")),
                "",
            ),
            vec![],
            Want::Reject,
        ),
        (
            "shape [9, 4]",
            v2_header(r#","shape":[9,4],"parameters":{"binary_data_size":144}"#, ""),
            bin(36),
            Want::Reject,
        ),
        (
            "shape [1, 5]",
            v2_header(r#","shape":[1,5],"data":[1,2,3,4,5]"#, ""),
            vec![],
            Want::Reject,
        ),
        (
            "shape [2^62, 4] binary",
            v2_header(
                r#","shape":[4611686018427387904,4],"parameters":{"binary_data_size":0}"#,
                "",
            ),
            vec![],
            Want::Reject,
        ),
        (
            "binary size > part",
            v2_header(r#","shape":[1,4],"parameters":{"binary_data_size":20}"#, ""),
            bin(4),
            Want::Reject,
        ),
        (
            "binary size < part",
            v2_header(r#","shape":[1,4],"parameters":{"binary_data_size":16}"#, ""),
            bin(5),
            Want::Reject,
        ),
        (
            "binary size != shape",
            v2_header(r#","shape":[1,4],"parameters":{"binary_data_size":32}"#, ""),
            bin(8),
            Want::Reject,
        ),
        (
            "binary size u64::MAX",
            v2_header(
                r#","shape":[1,4],"parameters":{"binary_data_size":18446744073709551615}"#,
                "",
            ),
            bin(4),
            Want::Reject,
        ),
        (
            "binary size -1",
            v2_header(r#","shape":[1,4],"parameters":{"binary_data_size":-1}"#, ""),
            bin(4),
            Want::Reject,
        ),
        (
            "binary NaN",
            v2_header(r#","shape":[1,4],"parameters":{"binary_data_size":16}"#, ""),
            [bin(3), f32::NAN.to_le_bytes().to_vec()].concat(),
            Want::Reject,
        ),
        (
            "both data and binary_data_size",
            v2_header(
                r#","shape":[1,4],"data":[1,2,3,4],"parameters":{"binary_data_size":16}"#,
                "",
            ),
            bin(4),
            Want::Reject,
        ),
        (
            "both, no binary part",
            v2_header(
                r#","shape":[1,4],"data":[1,2,3,4],"parameters":{"binary_data_size":0}"#,
                "",
            ),
            vec![],
            Want::Reject,
        ),
        ("data and a binary part", v2_header(&data1, ""), bin(4), Want::Reject),
        (
            "data 1e39",
            v2_header(r#","shape":[1,4],"data":[1,2,3,1e39]"#, ""),
            vec![],
            Want::Reject,
        ),
        (
            "data -0, 1e-45, past u64",
            v2_header(r#","shape":[1,4],"data":[-0,1e-45,18446744073709551616,-1e-400]"#, ""),
            vec![],
            Want::Accept,
        ),
        (
            "data 200 deep",
            v2_header(&format!(r#","shape":[1,4],"data":{}"#, deep(200, &row)), ""),
            vec![],
            Want::Reject,
        ),
        (
            "data 100000 deep",
            v2_header(&format!(r#","shape":[1,4],"data":{}"#, deep(100_000, &row)), ""),
            vec![],
            Want::Reject,
        ),
        (
            "data 100 deep",
            v2_header(&format!(r#","shape":[1,4],"data":{}"#, deep(100, &row)), ""),
            vec![],
            Want::Accept,
        ),
        (
            "outputs twice",
            v2_header(&data1, r#","outputs":[{"name":"logits"},{"name":"logits"}]"#),
            vec![],
            Want::Reject,
        ),
        (
            "outputs 1000 times",
            v2_header(
                &data1,
                &format!(
                    r#","outputs":[{}]"#,
                    vec![r#"{"name":"router_weights"}"#; 1000].join(",")
                ),
            ),
            vec![],
            Want::Reject,
        ),
        (
            "unknown output",
            v2_header(&data1, r#","outputs":[{"name":"probs"}]"#),
            vec![],
            Want::Reject,
        ),
        (
            "both outputs once",
            v2_header(
                &data1,
                r#","outputs":[{"name":"router_weights"},{"name":"logits","parameters":{"binary_data":true}}]"#,
            ),
            vec![],
            Want::Accept,
        ),
        ("id a number", v2_header(&data1, r#","id":5"#), vec![], Want::Reject),
        ("id null", v2_header(&data1, r#","id":null"#), vec![], Want::Reject),
        ("id an object", v2_header(&data1, r#","id":{}"#), vec![], Want::Reject),
        (
            "id 100 KB",
            v2_header(&data1, &format!(r#","id":"{long}""#)),
            vec![],
            Want::Accept,
        ),
        (
            "duplicate id",
            v2_header(&data1, r#","id":"a","id":"b""#),
            vec![],
            Want::Reject,
        ),
        (
            "duplicate inputs",
            format!(r#"{{"inputs":[],{}"#, &v2_header(&data1, "")[1..]),
            vec![],
            Want::Reject,
        ),
        (
            "duplicate outputs",
            v2_header(&data1, r#","outputs":[],"outputs":[]"#),
            vec![],
            Want::Reject,
        ),
        (
            "duplicate shape",
            v2_header(&format!(r#","shape":[1,4]{data1}"#), ""),
            vec![],
            Want::Reject,
        ),
        (
            "duplicate data",
            v2_header(&format!(r#"{data1},"data":[{row}]"#), ""),
            vec![],
            Want::Reject,
        ),
        (
            "duplicate name",
            v2_header(&format!(r#","name":"features"{data1}"#), ""),
            vec![],
            Want::Reject,
        ),
        (
            "duplicate parameters",
            v2_header(&data1, r#","parameters":{},"parameters":{}"#),
            vec![],
            Want::Any,
        ),
        (
            "duplicate binary_data_output",
            v2_header(
                &data1,
                r#","parameters":{"binary_data_output":true,"binary_data_output":true}"#,
            ),
            vec![],
            Want::Reject,
        ),
        (
            "two inputs",
            format!(r#"{{"inputs":[{{"name":"features","datatype":"FP32"{data1}}},{{}}]}}"#),
            vec![],
            Want::Reject,
        ),
        ("no inputs", r#"{"inputs":[]}"#.into(), vec![], Want::Reject),
        (
            "FP16",
            format!(r#"{{"inputs":[{{"name":"features","datatype":"FP16"{data1}}}]}}"#),
            vec![],
            Want::Reject,
        ),
        (
            "100 KB name",
            format!(r#"{{"inputs":[{{"name":"{long}","datatype":"FP32"{data1}}}]}}"#),
            vec![],
            Want::Reject,
        ),
        (
            "unknown fields",
            v2_header(&format!(r#"{data1},"x":[{{}}]"#), r#","y":{"z":[1,"2",null]}"#),
            vec![],
            Want::Accept,
        ),
        ("not an object", "[]".into(), vec![], Want::Reject),
        ("empty", String::new(), vec![], Want::Reject),
    ];
    for (name, json, binary, want) in &v2 {
        record(name, check_v2(json.as_bytes(), binary, &SMALL, &stats), *want);
    }
    record(
        "real width, 8 rows binary",
        check_v2(
            v2_header(r#","shape":[8,96],"parameters":{"binary_data_size":3072}"#, "").as_bytes(),
            &bin(8 * 96),
            &REAL,
            &stats,
        ),
        Want::Accept,
    );
    report!(
        "fuzz_parsers: hostile_bodies_table: {} parses ({} accepted, {} rejected)",
        stats.parses.get(),
        stats.accepted.get(),
        stats.rejected.get()
    );
    assert!(failures.is_empty(), "hostile bodies failed:\n{}", failures.join("\n"));
}

/// The generators' valid bodies are what the reference calls valid too:
/// without this, a differential that always agreed on "reject" would prove
/// little.
#[test]
fn generated_bodies_are_valid_and_varied() {
    let stats = Stats::default();
    for seed in 0..300u64 {
        for limits in [
            SMALL,
            REAL,
            InputLimits {
                row_len: 4,
                max_rows: 1,
            },
        ] {
            let body = sidecar_body(&limits, seed).render(seed % 3 == 0);
            assert!(check_sidecar(&body, &limits, &stats).unwrap(), "{}", show(&body));
            let (tree, binary) = v2_body(&limits, seed);
            assert!(check_v2(&tree.render(seed % 3 == 1), &binary, &limits, &stats).unwrap());
        }
    }
    assert_eq!(
        stats.compared.get(),
        stats.parses.get(),
        "every valid body is well-formed JSON"
    );
}
