//! Model files against the upstream fixtures: both fixture sets load, and every
//! malformed checkpoint / arch.json the spec lists is rejected with a message
//! naming the record or field and the values, never a panic.
//!
//! Owns: tests of `model::{arch, checkpoint, load_model}` on real and broken
//! files. Must not touch: forward/kernel checks (see the backend tests). The
//! broken files are made from the fixture bytes in a tempdir; the shared
//! fixtures are never written. Also: a NaN or infinite weight fails the load
//! naming the tensor and index, and a path that is not a regular file (a
//! FIFO, `/dev/zero`, a directory) or an over-cap arch.json is refused at
//! once; those loads run on a thread with a deadline, so a regression that
//! blocks or reads forever fails instead of hanging.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::{FIXTURE_NAMES, fixture_dir, nano_dims};
use crate::support::mkfifo;
use proptest::prelude::*;
use tokitai_serve::model::{
    Arch, Checkpoint, Dims, FileRefusal, ModelError, ModelKind, ModelSize, ModelSource, RouterKind, load_model,
    read_checkpoint, synth_weights, write_checkpoint,
};

const NANO_PARAMS: u64 = 195_540;

fn fixture(set: &str, file: &str) -> PathBuf {
    fixture_dir(set).join(file)
}

fn fixture_bytes(set: &str) -> Vec<u8> {
    std::fs::read(fixture(set, "checkpoint.tkp1")).expect("fixture checkpoint")
}

fn param_count(c: &Checkpoint) -> u64 {
    c.weights.tensors().iter().map(|t| t.len() as u64).sum()
}

/// Byte offsets of one record's fields, found by an independent parser.
#[derive(Debug, Clone)]
struct Rec {
    name: String,
    start: u64,
    name_at: u64,
    weight_len_at: u64,
    weight_at: u64,
    weight_len: u32,
    m_len_at: u64,
    v_len_at: u64,
    param_step_at: u64,
    has_grad_at: u64,
    grad_len_at: Option<u64>,
    end: u64,
}

struct Layout {
    config_len_at: u64,
    records: Vec<Rec>,
}

fn u32_at(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn layout(b: &[u8]) -> Layout {
    let count = u32_at(b, 12);
    let config_len = u32_at(b, 16) as u64;
    let mut p = 20 + config_len;
    let mut records = Vec::new();
    for _ in 0..count {
        let start = p;
        let name_len = u32_at(b, p) as u64;
        let name = String::from_utf8(b[(p + 4) as usize..(p + 4 + name_len) as usize].to_vec()).unwrap();
        let weight_len_at = p + 4 + name_len;
        let weight_len = u32_at(b, weight_len_at);
        let m_len_at = weight_len_at + 4 + 4 * weight_len as u64;
        let v_len_at = m_len_at + 4 + 4 * u32_at(b, m_len_at) as u64;
        let param_step_at = v_len_at + 4 + 4 * u32_at(b, v_len_at) as u64;
        let has_grad_at = param_step_at + 4;
        let (grad_len_at, end) = if b[has_grad_at as usize] == 1 {
            let g = has_grad_at + 1;
            (Some(g), g + 4 + 4 * u32_at(b, g) as u64)
        } else {
            (None, has_grad_at + 1)
        };
        records.push(Rec {
            name,
            start,
            name_at: start + 4,
            weight_len_at,
            weight_at: weight_len_at + 4,
            weight_len,
            m_len_at,
            v_len_at,
            param_step_at,
            has_grad_at,
            grad_len_at,
            end,
        });
        p = end;
    }
    assert_eq!(p, b.len() as u64, "independent parser must consume the fixture exactly");
    Layout {
        config_len_at: 16,
        records,
    }
}

fn put_u32(b: &mut [u8], at: u64, v: u32) {
    let at = at as usize;
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `bytes` to a fresh temp file and reads it as a Nano checkpoint.
fn read_bytes(bytes: &[u8]) -> Result<Checkpoint, ModelError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.tkp1");
    std::fs::write(&path, bytes).unwrap();
    read_checkpoint(&path, &nano_dims())
}

/// The error message of reading `bytes`, which must fail.
fn err_of(bytes: &[u8]) -> String {
    match read_bytes(bytes) {
        Ok(_) => panic!("a malformed checkpoint was accepted"),
        Err(e) => {
            assert!(
                matches!(e, ModelError::Checkpoint { .. }),
                "expected a Checkpoint error, got {e:?}"
            );
            e.to_string()
        }
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message {msg:?} should contain {p:?}");
    }
}

fn record_label(l: &Layout, i: usize) -> String {
    format!("record {i} (`{}`)", l.records[i].name)
}

// ---------------------------------------------------------------- fixtures

#[test]
fn both_fixtures_load_with_step_and_param_count() {
    for set in FIXTURE_NAMES {
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture(set, "expected.json")).unwrap()).unwrap();
        let step = expected["checkpoint_step"].as_u64().unwrap() as u32;

        let model = load_model(&fixture(set, "arch.json"), &fixture(set, "checkpoint.tkp1")).unwrap();
        assert_eq!(model.step, step, "{set}");
        assert_eq!(model.arch.size, ModelSize::Nano);
        assert_eq!(model.arch.dims(), nano_dims());
        assert_eq!(model.arch.param_count, Some(NANO_PARAMS));
        assert_eq!(model.arch.fingerprint.as_deref(), expected["arch_fingerprint"].as_str());
        assert_eq!(
            model.source,
            ModelSource::Files {
                arch: fixture(set, "arch.json"),
                checkpoint: fixture(set, "checkpoint.tkp1")
            }
        );
        let n: u64 = model.weights.tensors().iter().map(|t| t.len() as u64).sum();
        assert_eq!(n, NANO_PARAMS);
        assert_eq!(nano_dims().param_count(), NANO_PARAMS);

        let ckpt = read_checkpoint(&fixture(set, "checkpoint.tkp1"), &nano_dims()).unwrap();
        assert_eq!(ckpt.step, step);
        assert!(ckpt.config.contains(r#""steps":4242"#), "{}", ckpt.config);
        assert_eq!(ckpt.weights, model.weights);

        // Every tensor holds exactly the file's bytes.
        let bytes = fixture_bytes(set);
        let l = layout(&bytes);
        for (rec, t) in l.records.iter().zip(ckpt.weights.tensors()) {
            assert_eq!(rec.weight_len as usize, t.len());
            let at = rec.weight_at as usize;
            let want: Vec<f32> = bytes[at..at + 4 * t.len()]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert!(
                want.iter().zip(t).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}",
                rec.name
            );
        }
    }
}

#[test]
fn nano_s12_carries_grads_that_are_skipped() {
    let l = layout(&fixture_bytes("nano-s12"));
    let with_grad = l.records.iter().filter(|r| r.grad_len_at.is_some()).count();
    assert_eq!(with_grad, 29);
    let a = read_checkpoint(&fixture("nano-s12", "checkpoint.tkp1"), &nano_dims()).unwrap();
    assert_eq!(param_count(&a), NANO_PARAMS);
}

#[test]
fn fixture_checkpoint_against_another_arch_is_rejected() {
    let msg = read_checkpoint(
        &fixture("nano-s11", "checkpoint.tkp1"),
        &Dims::for_size(ModelSize::Tiny),
    )
    .unwrap_err()
    .to_string();
    assert_contains(
        &msg,
        &["header", "count is 58", "hidden 2048", "has 106 parameter records"],
    );
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let e = read_checkpoint(Path::new("/nonexistent/dir/checkpoint.tkp1"), &nano_dims()).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }));
    assert_contains(&e.to_string(), &["/nonexistent/dir/checkpoint.tkp1"]);
    let e = load_model(
        Path::new("/nonexistent/arch.json"),
        &fixture("nano-s11", "checkpoint.tkp1"),
    )
    .unwrap_err();
    assert_contains(&e.to_string(), &["/nonexistent/arch.json"]);
}

// ---------------------------------------------------------------- truncation

#[test]
fn truncation_at_every_record_boundary_and_inside_every_field() {
    for set in FIXTURE_NAMES {
        let bytes = fixture_bytes(set);
        let l = layout(&bytes);

        // (offset, label the error must name)
        let mut cuts: Vec<(u64, String)> = vec![
            (0, "header".into()),
            (3, "header".into()),
            (15, "header".into()),
            (16, "config".into()),
            (18, "config".into()),
            (20, "config".into()),
            (30, "config".into()),
        ];
        // Every record boundary and a cut inside every weight vector; every
        // field of a few records (first, last, a middle one, and those with a
        // gradient in nano-s12). Reading is debug-build CPU bound, so not
        // every field of every record.
        let detailed = [0usize, 1, 2, 3, 29, 56, 57];
        for (i, r) in l.records.iter().enumerate() {
            let label = record_label(&l, i);
            let mut offsets = vec![r.start, r.weight_at + 4 * r.weight_len as u64 / 2];
            if detailed.contains(&i) {
                offsets.extend([
                    r.start + 2,
                    r.name_at,
                    r.name_at + 3,
                    r.weight_len_at,
                    r.weight_at,
                    r.weight_at + 1,
                    r.weight_at + 4 * r.weight_len as u64 - 1,
                    r.m_len_at,
                    r.m_len_at + 4,
                    r.m_len_at + 4 + 4 * (r.weight_len as u64 / 3),
                    r.v_len_at,
                    r.v_len_at + 4 + 4 * (r.weight_len as u64 / 2),
                    r.param_step_at,
                    r.param_step_at + 1,
                    r.has_grad_at,
                ]);
                if let Some(g) = r.grad_len_at {
                    offsets.extend([g, g + 2, g + 4, g + 4 + 2 * r.weight_len as u64]);
                }
            }
            cuts.extend(offsets.into_iter().map(|o| (o, label.clone())));
        }
        // The end of the last record is the whole file: not a truncation.
        assert_eq!(l.records.last().unwrap().end, bytes.len() as u64);

        // Truncate one file progressively, longest first, instead of writing
        // hundreds of copies.
        cuts.sort_by_key(|c| std::cmp::Reverse(c.0));
        cuts.dedup_by_key(|c| c.0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.tkp1");
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut checked = 0;
        for (cut, label) in &cuts {
            file.set_len(*cut).unwrap();
            let e = read_checkpoint(&path, &nano_dims()).expect_err("a truncated checkpoint was accepted");
            let msg = e.to_string();
            assert!(matches!(e, ModelError::Checkpoint { .. }), "{msg}");
            assert_contains(&msg, &[label.as_str(), &format!("file is {cut} bytes")]);
            assert!(
                msg.contains("remain") || msg.contains("shorter than"),
                "truncation message should say how much is left: {msg}"
            );
            checked += 1;
        }
        assert!(checked > 58 * 2 + 7 * 15, "{set}: only {checked} cuts");
    }
}

// ---------------------------------------------------------------- header and config

#[test]
fn bad_magic_is_rejected() {
    let mut b = fixture_bytes("nano-s11");
    b[..4].copy_from_slice(b"TKP2");
    assert_contains(&err_of(&b), &["header", "bad magic", "TKP1", "54 4b 50 32"]);
    b[..4].copy_from_slice(b"\0\0\0\0");
    assert_contains(&err_of(&b), &["bad magic", "00 00 00 00"]);
}

#[test]
fn wrong_version_is_rejected() {
    let mut b = fixture_bytes("nano-s11");
    for v in [0, 2, u32::MAX] {
        put_u32(&mut b, 4, v);
        assert_contains(
            &err_of(&b),
            &["header", &format!("unsupported version {v}"), "expected 1"],
        );
    }
}

#[test]
fn empty_and_tiny_files_are_rejected() {
    assert_contains(&err_of(&[]), &["header", "file is 0 bytes"]);
    assert_contains(&err_of(b"TKP"), &["header", "file is 3 bytes"]);
    assert_contains(
        &err_of(b"TKP1\x01\0\0\0\0\0\0\0:\0\0\0"),
        &["config", "config_len", "file is 16 bytes"],
    );
}

#[test]
fn count_higher_or_lower_than_the_records_is_rejected() {
    let mut b = fixture_bytes("nano-s11");
    for c in [59, 57, 0, u32::MAX] {
        put_u32(&mut b, 12, c);
        assert_contains(
            &err_of(&b),
            &["header", &format!("count is {c}"), "has 58 parameter records"],
        );
    }
    // A file whose count matches the arch but holds fewer records: the
    // missing record is reported as truncation.
    let b = fixture_bytes("nano-s11");
    let l = layout(&b);
    let cut = l.records[57].start as usize;
    assert_contains(&err_of(&b[..cut]), &[&record_label(&l, 57), "name_len", "0 remain"]);
}

#[test]
fn config_problems_are_rejected() {
    let b = fixture_bytes("nano-s11");
    let l = layout(&b);
    let mut huge = b.clone();
    put_u32(&mut huge, l.config_len_at, 0x4000_0000);
    assert_contains(&err_of(&huge), &["config", "config_len is 1073741824", "limit"]);
    let mut over = b.clone();
    put_u32(&mut over, l.config_len_at, 10_000_000);
    assert_contains(&err_of(&over), &["config", "claims 10000000 bytes", "remain"]);
    let mut bad = b.clone();
    bad[20] = 0xff;
    assert_contains(&err_of(&bad), &["config", "not valid UTF-8"]);
}

// ---------------------------------------------------------------- records

#[test]
fn lengths_claiming_gigabytes_are_rejected_without_allocating() {
    let b = fixture_bytes("nano-s12");
    let l = layout(&b);
    let r0 = &l.records[0];
    let label = record_label(&l, 0);
    let huge = 0xffff_fff0u32;

    let mut x = b.clone();
    put_u32(&mut x, r0.weight_len_at, huge);
    assert_contains(&err_of(&x), &[&label, &format!("weight_len is {huge}"), "expected 384"]);

    let mut x = b.clone();
    put_u32(&mut x, r0.m_len_at, huge);
    assert_contains(&err_of(&x), &[&label, &format!("m_len is {huge}"), "expected 0 or 384"]);

    let mut x = b.clone();
    put_u32(&mut x, r0.v_len_at, huge);
    assert_contains(&err_of(&x), &[&label, &format!("v_len is {huge}"), "expected 0 or 384"]);

    let mut x = b.clone();
    put_u32(&mut x, r0.grad_len_at.unwrap(), huge);
    assert_contains(
        &err_of(&x),
        &[&label, &format!("grad_len is {huge}"), "expected 0 or 384"],
    );

    let mut x = b.clone();
    put_u32(&mut x, r0.start, huge);
    assert_contains(
        &err_of(&x),
        &[&label, &format!("name_len is {huge}"), "limit", "expected 14"],
    );

    // In a tiny file: header, config, and one record that claims more than is there.
    let tiny = |tail: &[u8]| {
        let mut t = b[..r0.start as usize].to_vec();
        t.extend_from_slice(tail);
        t
    };
    let mut rec = 14u32.to_le_bytes().to_vec();
    rec.extend_from_slice(b"router.param_0");
    rec.extend_from_slice(&384u32.to_le_bytes());
    rec.extend_from_slice(&[0u8; 8]);
    assert_contains(&err_of(&tiny(&rec)), &[&label, "`weight` claims 1536 bytes", "remain"]);
    assert_contains(
        &err_of(&tiny(&4000u32.to_le_bytes())),
        &[&label, "`name_len` claims 4000 bytes", "0 remain"],
    );
    let mut rec = 14u32.to_le_bytes().to_vec();
    rec.extend_from_slice(b"router.param_0");
    rec.extend_from_slice(&huge.to_le_bytes());
    assert_contains(&err_of(&tiny(&rec)), &[&label, &format!("weight_len is {huge}")]);
}

#[test]
fn a_full_length_buffer_past_the_end_is_rejected() {
    // m_len agrees with the weight but the file ends inside m.
    let b = fixture_bytes("nano-s11");
    let l = layout(&b);
    let r = &l.records[10];
    let cut = (r.m_len_at + 4 + 8) as usize;
    assert_contains(&err_of(&b[..cut]), &[&record_label(&l, 10), "`m` claims", "remain"]);
}

#[test]
fn swapped_names_are_rejected() {
    let b = fixture_bytes("nano-s11");
    let l = layout(&b);
    for (i, j) in [(0usize, 1usize), (2, 3), (2, 16)] {
        let (ri, rj) = (&l.records[i], &l.records[j]);
        assert_eq!(ri.name.len(), rj.name.len());
        let mut x = b.clone();
        let n = ri.name.len();
        x[ri.name_at as usize..ri.name_at as usize + n].copy_from_slice(rj.name.as_bytes());
        x[rj.name_at as usize..rj.name_at as usize + n].copy_from_slice(ri.name.as_bytes());
        assert_contains(
            &err_of(&x),
            &[
                &record_label(&l, i),
                &format!("name is `{}` but expected `{}`", rj.name, ri.name),
            ],
        );
    }
}

#[test]
fn a_wrong_length_vector_is_rejected() {
    let b = fixture_bytes("nano-s11");
    let l = layout(&b);
    let r = &l.records[1];
    // The router bias (one value per expert) with one value more, and its 4
    // extra bytes really there.
    let experts = nano_dims().experts;
    let mut x = b[..r.weight_at as usize].to_vec();
    put_u32(&mut x, r.weight_len_at, experts as u32 + 1);
    x.extend_from_slice(&b[r.weight_at as usize..r.weight_at as usize + 4 * experts]);
    x.extend_from_slice(&1.0f32.to_le_bytes());
    x.extend_from_slice(&b[r.m_len_at as usize..]);
    assert_contains(
        &err_of(&x),
        &[
            &record_label(&l, 1),
            &format!("weight_len is {} but expected {experts}", experts + 1),
        ],
    );

    // An expert matrix one value short.
    let r = &l.records[6];
    let mut x = b.clone();
    put_u32(&mut x, r.weight_len_at, r.weight_len - 1);
    assert_contains(
        &err_of(&x),
        &[
            &record_label(&l, 6),
            &format!("weight_len is {} but expected {}", r.weight_len - 1, r.weight_len),
        ],
    );

    // m of another length.
    let mut x = b.clone();
    put_u32(&mut x, r.m_len_at, 7);
    assert_contains(
        &err_of(&x),
        &[&record_label(&l, 6), "m_len is 7 but expected 0 or 16384"],
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    for set in FIXTURE_NAMES {
        let b = fixture_bytes(set);
        for extra in [1usize, 4, 100] {
            let mut x = b.clone();
            x.extend(std::iter::repeat_n(0u8, extra));
            assert_contains(
                &err_of(&x),
                &[
                    "end of file",
                    &format!("{extra} trailing bytes"),
                    &format!("records end at {}", b.len()),
                ],
            );
        }
    }
}

#[test]
fn has_grad_other_than_0_or_1_is_rejected() {
    let b = fixture_bytes("nano-s11");
    let l = layout(&b);
    for (i, v) in [(0usize, 2u8), (30, 0xff)] {
        let mut x = b.clone();
        x[l.records[i].has_grad_at as usize] = v;
        assert_contains(
            &err_of(&x),
            &[&record_label(&l, i), &format!("has_grad is {v} but must be 0 or 1")],
        );
    }
}

#[test]
fn non_utf8_name_is_rejected() {
    let b = fixture_bytes("nano-s11");
    let l = layout(&b);
    let mut x = b.clone();
    x[l.records[4].name_at as usize + 1] = 0xc3; // a lone UTF-8 lead byte
    x[l.records[4].name_at as usize + 2] = 0x28;
    assert_contains(
        &err_of(&x),
        &[
            &record_label(&l, 4),
            "not valid UTF-8",
            "c3 28",
            "expected `expert_0.param_2`",
        ],
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random byte mutations and truncations of a fixture: the reader
    /// returns (Ok or Err), never panics.
    #[test]
    fn random_mutations_never_panic(
        set in prop_oneof![Just("nano-s11"), Just("nano-s12")],
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        // Hit length fields often: overwrite a whole u32 near a record start.
        len_edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u32>()), 0..3),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = fixture_bytes(set);
        let records = layout(&b).records;
        for (at, v) in edits {
            let i = at.index(b.len());
            b[i] = v;
        }
        for (at, v) in len_edits {
            let r = &records[at.index(records.len())];
            let field = [r.start, r.weight_len_at, r.m_len_at, r.v_len_at][at.index(4)];
            put_u32(&mut b, field, v);
        }
        if let Some(c) = cut {
            let n = c.index(b.len() + 1);
            b.truncate(n);
        }
        match read_bytes(&b) {
            Ok(c) => prop_assert_eq!(param_count(&c), NANO_PARAMS),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

// ------------------------------------------------------ non-finite weights

/// The fixture with the f32 at value `index` of record `record` set to `bits`.
fn with_weight_bits(bytes: &[u8], l: &Layout, record: usize, index: usize, bits: u32) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let rec = &l.records[record];
    assert!(index < rec.weight_len as usize);
    put_u32(&mut b, rec.weight_at + 4 * index as u64, bits);
    b
}

const NAN: u32 = 0x7fc0_0000;
const POS_INF: u32 = 0x7f80_0000;
const NEG_INF: u32 = 0xff80_0000;

/// `(tensor, index, byte offset, value)` of a `NonFiniteWeight` error.
fn non_finite(e: &ModelError) -> (String, usize, u64, f32) {
    match e {
        ModelError::NonFiniteWeight {
            tensor,
            index,
            offset,
            value,
            ..
        } => (tensor.clone(), *index, *offset, *value),
        other => panic!("expected a NonFiniteWeight error, got {other:?}"),
    }
}

#[test]
fn nan_and_infinite_weights_are_rejected_naming_the_tensor_and_index() {
    let bytes = fixture_bytes("nano-s11");
    let l = layout(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.tkp1");
    // (record, value index, bits, word). Record 0 is the router weight,
    // 6 is expert_0's first hidden Linear weight (16384 values), the last
    // record is expert_3's output bias.
    let last = l.records.len() - 1;
    let cases = [
        (0, 17, NAN, "NaN"),
        (6, 1234, POS_INF, "+inf"),
        (last, 19, NEG_INF, "-inf"),
        // Every NaN is a NaN: quiet, signalling, negative, any payload.
        (6, 0, 0x7f80_0001, "NaN"),
        (6, 16383, 0xffc0_0000, "NaN"),
        (1, 3, 0x7fff_ffff, "NaN"),
    ];
    for (record, index, bits, word) in cases {
        let b = with_weight_bits(&bytes, &l, record, index, bits);
        std::fs::write(&path, &b).unwrap();
        let e = read_checkpoint(&path, &nano_dims()).unwrap_err();
        let (tensor, at, offset, value) = non_finite(&e);
        let name = &l.records[record].name;
        assert_eq!((&tensor, at), (name, index), "{e}");
        assert_eq!(offset, l.records[record].weight_at + 4 * index as u64);
        assert_eq!(value.to_bits(), bits, "the value is reported as found");
        let msg = e.to_string();
        assert_contains(
            &msg,
            &[
                &format!("checkpoint {}", path.display()),
                &format!("tensor '{name}' value {index} is {word}"),
            ],
        );
        // Through the model loader too: it is a load failure.
        let e = load_model(&fixture("nano-s11", "arch.json"), &path).unwrap_err();
        assert_eq!(non_finite(&e).0, *name);
    }

    // Several bad values: the first in the file is the one reported.
    let mut b = with_weight_bits(&bytes, &l, last, 0, NAN);
    for (record, index, bits) in [(9, 40, POS_INF), (6, 900, NEG_INF), (6, 901, NAN)] {
        put_u32(&mut b, l.records[record].weight_at + 4 * index as u64, bits);
    }
    std::fs::write(&path, &b).unwrap();
    let e = read_checkpoint(&path, &nano_dims()).unwrap_err();
    assert_eq!(non_finite(&e).0, l.records[6].name);
    assert_eq!(non_finite(&e).1, 900);
    assert_contains(&e.to_string(), &["value 900 is -inf"]);
}

#[test]
fn extreme_finite_weights_and_non_finite_optimizer_state_load() {
    // The largest finite values, the smallest subnormal and -0 are weights.
    let bytes = fixture_bytes("nano-s12");
    let l = layout(&bytes);
    let mut b = bytes.clone();
    for (i, bits) in [f32::MAX.to_bits(), f32::MIN.to_bits(), 1, 0x8000_0000]
        .into_iter()
        .enumerate()
    {
        put_u32(&mut b, l.records[6].weight_at + 4 * i as u64, bits);
    }
    // NaN and inf in m, v and a gradient are not weights: they are skipped, never read.
    let rec = &l.records[6];
    assert!(u32_at(&b, rec.m_len_at) > 0 && u32_at(&b, rec.v_len_at) > 0);
    put_u32(&mut b, rec.m_len_at + 4, NAN);
    put_u32(&mut b, rec.v_len_at + 4 + 8, POS_INF);
    let with_grad = l.records.iter().find(|r| r.grad_len_at.is_some()).unwrap();
    put_u32(&mut b, with_grad.grad_len_at.unwrap() + 4, NEG_INF);
    let c = read_bytes(&b).unwrap();
    let t = c.weights.tensors()[6];
    assert_eq!(&t[..4], &[f32::MAX, f32::MIN, f32::from_bits(1), -0.0]);
}

#[test]
fn weights_written_with_a_nan_fail_the_model_load() {
    // A checkpoint the writer produced (with AdamW state), the arch beside it.
    let dims = nano_dims();
    let mut w = synth_weights(dims, 9);
    w.experts[2].blocks[0].norm.gamma[77] = f32::NAN;
    let dir = tempfile::tempdir().unwrap();
    let arch = dir.path().join("arch.json");
    let ckpt = dir.path().join("checkpoint.tkp1");
    std::fs::write(&arch, Arch::for_size(ModelSize::Nano, 9).to_json_pretty()).unwrap();
    write_checkpoint(&ckpt, &w, 3, "{}", true).unwrap();
    let e = load_model(&arch, &ckpt).unwrap_err();
    // expert_2.param_2 is the gamma of its input block's LayerNorm: the
    // check covers every loaded tensor, whichever LayerNorm mode serves.
    assert_contains(&e.to_string(), &["tensor 'expert_2.param_2' value 77 is NaN"]);
    w.experts[2].blocks[0].norm.gamma[77] = 1.0;
    write_checkpoint(&ckpt, &w, 3, "{}", true).unwrap();
    assert_eq!(load_model(&arch, &ckpt).unwrap().weights, w);
}

// --------------------------------------------------------- file types, caps

/// How long a refusal may take. It is immediate; the deadline only turns a
/// regression (an open that blocks on a FIFO, a read of `/dev/zero`) into a
/// failure, not a hang, and is kept short so such a read cannot grow far.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);

/// Runs `f` on its own thread and returns its result, failing the test if it
/// takes past [`REFUSAL_DEADLINE`]. (A stuck thread is left behind; the test
/// process ends with the test run.)
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(REFUSAL_DEADLINE).unwrap_or_else(|_| {
        panic!("{what}: no answer within {REFUSAL_DEADLINE:?}: blocked on a FIFO or reading a device?")
    })
}

/// `load_model(arch, checkpoint)` under the deadline; it must fail, refusing
/// `bad` (`what`: "arch.json" or "checkpoint") as `kind`.
#[cfg(unix)]
fn assert_refused(arch: &Path, checkpoint: &Path, what: &str, bad: &Path, kind: &str) {
    let (a, c) = (arch.to_path_buf(), checkpoint.to_path_buf());
    let label = format!("{what} {}", bad.display());
    let e = within_deadline(&label, move || load_model(&a, &c)).expect_err(&label);
    match &e {
        ModelError::Refused {
            path,
            what: w,
            refusal: FileRefusal::NotRegular { .. },
        } => assert_eq!((path.as_path(), *w), (bad, what), "{e}"),
        other => panic!("{label}: expected a Refused error, got {other:?}"),
    }
    assert_contains(
        &e.to_string(),
        &[&format!("{what} {}: is {kind}, not a regular file", bad.display())],
    );
}

#[cfg(unix)]
#[test]
fn a_fifo_a_device_or_a_directory_is_refused_at_once_as_arch_or_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.fifo");
    mkfifo(&fifo);
    let fifo_link = dir.path().join("fifo-link.json");
    std::os::unix::fs::symlink(&fifo, &fifo_link).unwrap();
    let sub = dir.path().join("a-directory");
    std::fs::create_dir(&sub).unwrap();
    let zero = Path::new("/dev/zero");
    let (arch, ckpt) = (fixture("nano-s11", "arch.json"), fixture("nano-s11", "checkpoint.tkp1"));

    for (bad, kind) in [
        (fifo.as_path(), "a FIFO"),
        (fifo_link.as_path(), "a FIFO"),
        (zero, "a character device"),
        (sub.as_path(), "a directory"),
    ] {
        assert_refused(bad, &ckpt, "arch.json", bad, kind);
        assert_refused(&arch, bad, "checkpoint", bad, kind);
        // The checkpoint reader on its own, too.
        let b = bad.to_path_buf();
        let e = within_deadline("read_checkpoint", move || read_checkpoint(&b, &nano_dims())).unwrap_err();
        assert!(matches!(e, ModelError::Refused { what: "checkpoint", .. }), "{e:?}");
        let b = bad.to_path_buf();
        let e = within_deadline("Arch::load", move || Arch::load(&b)).unwrap_err();
        assert!(matches!(e, ModelError::Refused { what: "arch.json", .. }), "{e:?}");
    }

    // A symlink to a regular file is followed and loads.
    let arch_link = dir.path().join("arch-link.json");
    let ckpt_link = dir.path().join("checkpoint-link.tkp1");
    std::os::unix::fs::symlink(&arch, &arch_link).unwrap();
    std::os::unix::fs::symlink(&ckpt, &ckpt_link).unwrap();
    let linked = load_model(&arch_link, &ckpt_link).unwrap();
    assert_eq!(linked.weights, load_model(&arch, &ckpt).unwrap().weights);
}

#[test]
fn arch_json_over_the_cap_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("arch.json");
    // The fixture's text padded with whitespace to exactly 1 MiB loads ...
    let mut text = std::fs::read(fixture("nano-s11", "arch.json")).unwrap();
    text.resize(1 << 20, b' ');
    std::fs::write(&p, &text).unwrap();
    assert_eq!(Arch::load(&p).unwrap().dims(), nano_dims());
    // ... one byte more is refused, naming the path, its size and the cap.
    text.push(b' ');
    std::fs::write(&p, &text).unwrap();
    let e = Arch::load(&p).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::Refused {
                what: "arch.json",
                refusal: FileRefusal::TooLarge {
                    cap: 1048576,
                    len: Some(1048577)
                },
                ..
            }
        ),
        "{e:?}"
    );
    assert_contains(
        &e.to_string(),
        &[&format!(
            "arch.json {}: is 1048577 bytes, larger than the 1 MiB limit",
            p.display()
        )],
    );
}

// ---------------------------------------------------------------- arch.json

fn fixture_arch_json() -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixture("nano-s11", "arch.json")).unwrap();
    match serde_json::from_str(&text).unwrap() {
        serde_json::Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn arch_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Result<Arch, ModelError> {
    let mut m = fixture_arch_json();
    edit(&mut m);
    Arch::from_json_str(&serde_json::Value::Object(m).to_string())
}

fn arch_err(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    match arch_with(edit) {
        Ok(a) => panic!("bad arch accepted: {a:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn fixture_arch_parses() {
    let a = Arch::load(&fixture("nano-s11", "arch.json")).unwrap();
    assert_eq!(a.size, ModelSize::Nano);
    // The released Nano shape, pinned here against the spec's numbers (and,
    // below, against the library's `Dims`); every other test takes it from
    // the library or the fixture.
    assert_eq!((a.input_dim, a.hidden_dim, a.output_dim), (96, 128, 20));
    assert_eq!((a.n_experts, a.top_k, a.expert_depth), (4, 2, 2));
    assert_eq!(a.seed, 0);
    assert_eq!(a.model_kind, ModelKind::MoE);
    assert_eq!(a.router_kind, RouterKind::SheafPadic);
    assert_eq!(a.fingerprint.as_deref(), Some("4b26ca179bbf1070"));
    assert_eq!(a.param_count, Some(NANO_PARAMS));
    assert_eq!(a.dims(), nano_dims());
}

#[test]
fn arch_dims_disagreeing_with_size_are_rejected() {
    let msg = arch_err(|m| {
        m.insert("hidden_dim".into(), 64.into());
    });
    assert_contains(
        &msg,
        &["arch.json: field `hidden_dim` is 64 but size Nano requires 128"],
    );
    let msg = arch_err(|m| {
        m.insert("expert_depth".into(), 5.into());
    });
    assert_contains(&msg, &["field `expert_depth` is 5 but size Nano requires 2"]);
    // Tiny's dims under a Nano size.
    let msg = arch_err(|m| {
        m.insert("size".into(), "Tiny".into());
    });
    assert_contains(&msg, &["field `hidden_dim` is 128 but size Tiny requires 2048"]);
}

#[test]
fn arch_fixed_dims_other_than_released_are_rejected() {
    let d = nano_dims();
    for (field, bad, want) in [
        ("input_dim", d.input - 1, d.input),
        ("output_dim", d.output + 1, d.output),
        ("n_experts", 2 * d.experts, d.experts),
        ("top_k", d.top_k - 1, d.top_k),
    ] {
        let msg = arch_err(|m| {
            m.insert(field.into(), bad.into());
        });
        assert_contains(
            &msg,
            &[&format!(
                "field `{field}` is {bad} but every released size requires {want}"
            )],
        );
    }
}

#[test]
fn arch_dense_is_not_supported() {
    let msg = arch_err(|m| {
        m.insert("model_kind".into(), "Dense".into());
    });
    assert_contains(&msg, &["field `model_kind`", "\"Dense\"", "not supported"]);
    let msg = arch_err(|m| {
        m.insert("model_kind".into(), "Sparse".into());
    });
    assert_contains(&msg, &["field `model_kind`", "\"Sparse\"", "\"MoE\""]);
}

#[test]
fn arch_unknown_size_is_rejected() {
    for bad in ["Huge", "nano", ""] {
        let msg = arch_err(|m| {
            m.insert("size".into(), bad.into());
        });
        assert_contains(
            &msg,
            &[
                "field `size`",
                &format!("{bad:?}"),
                "\"Nano\", \"Tiny\", \"Medium\", \"Full\"",
            ],
        );
    }
}

#[test]
fn arch_missing_fields_are_rejected() {
    for field in [
        "size",
        "input_dim",
        "hidden_dim",
        "output_dim",
        "n_experts",
        "top_k",
        "expert_depth",
        "seed",
    ] {
        let msg = arch_err(|m| {
            m.remove(field);
        });
        assert_contains(&msg, &[&format!("field `{field}` is missing")]);
    }
}

#[test]
fn arch_wrong_types_and_negative_numbers_are_rejected() {
    let cases: [(&str, serde_json::Value, &str); 6] = [
        (
            "hidden_dim",
            serde_json::json!(-128),
            "is -128 but must be a non-negative integer",
        ),
        (
            "hidden_dim",
            serde_json::json!("128"),
            "is the string \"128\" but must be a non-negative integer",
        ),
        (
            "hidden_dim",
            serde_json::json!(128.5),
            "is 128.5 but must be a non-negative integer",
        ),
        (
            "seed",
            serde_json::json!(-1),
            "is -1 but must be a non-negative integer",
        ),
        ("size", serde_json::json!(3), "is 3 but must be a string"),
        ("router_kind", serde_json::json!(null), "is null but must be a string"),
    ];
    for (field, v, want) in cases {
        let msg = arch_err(|m| {
            m.insert(field.into(), v);
        });
        assert_contains(&msg, &[&format!("field `{field}` {want}")]);
    }
    let msg = arch_err(|m| {
        m.insert("router_kind".into(), "Random".into());
    });
    assert_contains(&msg, &["field `router_kind` is \"Random\""]);
}

#[test]
fn arch_bad_json_is_rejected() {
    for (text, want) in [
        ("{", "not valid JSON"),
        ("", "not valid JSON"),
        ("{\"size\": \"Nano\",}", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, found an array"),
        ("null", "expected a JSON object, found null"),
    ] {
        let e = Arch::from_json_str(text).unwrap_err();
        assert!(matches!(e, ModelError::ArchSyntax { .. }));
        assert_contains(&e.to_string(), &["arch.json", want]);
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken-arch.json");
    std::fs::write(&p, "{\"size\": ").unwrap();
    assert_contains(
        &Arch::load(&p).unwrap_err().to_string(),
        &["broken-arch.json", "not valid JSON", "line 1"],
    );
    std::fs::write(&p, b"{\"size\": \"\xff\"}").unwrap();
    assert_contains(&Arch::load(&p).unwrap_err().to_string(), &["broken-arch.json", "UTF-8"]);
    std::fs::write(&p, vec![b' '; 2 << 20]).unwrap();
    assert_contains(
        &Arch::load(&p).unwrap_err().to_string(),
        &["broken-arch.json", "2097152 bytes", "limit"],
    );
}

#[test]
fn arch_legacy_without_kinds_is_accepted() {
    let a = arch_with(|m| {
        m.remove("model_kind");
        m.remove("router_kind");
        m.remove("fingerprint");
        m.remove("param_count");
    })
    .unwrap();
    assert_eq!(a.model_kind, ModelKind::MoE);
    assert_eq!(a.router_kind, RouterKind::SheafPadic);
    assert_eq!(a.dims(), nano_dims());
    assert_eq!((a.fingerprint, a.param_count), (None, None));
}

#[test]
fn arch_extra_fields_are_accepted_and_reported_fields_not_trusted() {
    let a = arch_with(|m| {
        m.insert("trained_by".into(), "someone".into());
        m.insert("notes".into(), serde_json::json!({"lr": 0.001, "tags": [1, 2]}));
        m.insert("router_kind".into(), "SoftmaxOnly".into());
        m.insert("param_count".into(), 12.into());
        m.insert("fingerprint".into(), 7.into());
    })
    .unwrap();
    assert_eq!(a.router_kind, RouterKind::SoftmaxOnly);
    assert_eq!(a.param_count, Some(12));
    assert_eq!(a.fingerprint, None);
    assert_eq!(a.dims().param_count(), NANO_PARAMS);
}

#[test]
fn arch_for_size_round_trips_through_json() {
    for size in ModelSize::ALL {
        let a = Arch::for_size(size, 42);
        let text = a.to_json_pretty();
        let back = Arch::from_json_str(&text).unwrap();
        assert_eq!(back, a, "{text}");
        assert_eq!(back.dims(), Dims::for_size(size));
        assert_eq!(back.param_count, Some(Dims::for_size(size).param_count()));
        assert_eq!(back.fingerprint.as_deref().map(str::len), Some(16));
    }
    // The runner's key set.
    let v: serde_json::Value = serde_json::from_str(&Arch::for_size(ModelSize::Nano, 0).to_json_pretty()).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    let fixture = fixture_arch_json();
    let want: Vec<&String> = fixture.keys().collect();
    assert_eq!(keys, want);
}
