//! The offline `tokitai-serve infer` and `synth` subcommands.
//!
//! Proves that `infer` on both upstream fixtures, in both LayerNorm modes,
//! with the body on stdin or in `--input`, prints the `/infer` answer within
//! the fixture tolerances (logits 2e-5, router weights 1e-6, exact top-k where
//! strict); that usage errors exit 2 with the usage, a missing or corrupt
//! checkpoint and a malformed body exit 1 with the reason on stderr, and
//! nothing ever panics; and that a model written by `synth` can be run by
//! `infer`. Also that `serve` and `infer` refuse at once, exit 1, an
//! `--arch`/`--checkpoint` that is a FIFO or a device and a checkpoint with a
//! NaN weight, and `serve --config` on one exits 2 (those runs are bounded:
//! a server that starts anyway, or blocks, is killed and fails the test).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::{BIN, FIXTURE_NAMES, Fixture, batch_body, f32_row, nano_dims, single_body};
use crate::support::mkfifo;
use serde_json::Value;
use tokitai_serve::model::{Arch, LayerNormMode, ModelSize, synth_weights, write_checkpoint};

/// Runs the binary with `args`, feeding `stdin`.
fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("TOKITAI_GRPC_BIND", "127.0.0.1:0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokitai-serve");
    let mut input = child.stdin.take().unwrap();
    // The process may exit before reading (usage errors): ignore a broken pipe.
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output().expect("wait for tokitai-serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "tokitai-serve {args:?} panicked: {stderr}"
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `infer --arch ARCH --checkpoint CHECKPOINT`, then `extra`.
fn infer_args<'a>(arch: &'a Path, checkpoint: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["infer", "--arch", path(arch), "--checkpoint", path(checkpoint)];
    args.extend_from_slice(extra);
    args
}

/// `synth --size nano --seed SEED --out OUT`.
fn synth_nano(seed: u64, out: &Path) -> Output {
    run(
        &[
            "synth",
            "--size",
            "nano",
            "--seed",
            &seed.to_string(),
            "--out",
            path(out),
        ],
        b"",
    )
}

/// `infer` on the model `synth` wrote to `dir`, with `stdin`.
fn infer_model_dir(dir: &Path, stdin: &[u8]) -> Output {
    run(
        &infer_args(&dir.join("arch.json"), &dir.join("checkpoint.tkp1"), &[]),
        stdin,
    )
}

#[test]
fn infer_matches_the_fixtures_in_both_modes_from_stdin_and_file() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURE_NAMES {
        let fixture = Fixture::load(name);
        let body = batch_body(&fixture.inputs);
        let input = dir.path().join(format!("{name}.json"));
        std::fs::write(&input, &body).unwrap();
        let all = fixture.all_rows();
        for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
            let mut from_stdin = infer_args(&fixture.arch, &fixture.checkpoint, &[]);
            let mut from_file = infer_args(&fixture.arch, &fixture.checkpoint, &["--input", path(&input)]);
            if mode == LayerNormMode::Stored {
                from_stdin.extend(["--layernorm", "stored"]);
                from_file.extend(["--layernorm", "stored"]);
            } else {
                // Identity is the default: say it explicitly only on one path.
                from_file.extend(["--layernorm", "identity"]);
            }
            let mut answers = Vec::new();
            for (how, args, stdin) in [
                ("stdin", &from_stdin, body.as_bytes()),
                ("--input", &from_file, &b""[..]),
            ] {
                let out = run(args, stdin);
                assert!(
                    out.status.success(),
                    "{name} {mode} {how}: {:?}: {}",
                    out.status,
                    stderr(&out)
                );
                let answer: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON answer");
                fixture.check(mode, &answer, &all, &format!("infer {name} {mode} ({how})"));
                answers.push(answer);
            }
            assert_eq!(
                answers[0], answers[1],
                "{name} {mode}: stdin and --input give the same answer"
            );
        }
        // A single flat row gives that row's answer, bit for bit.
        let single = single_body(&fixture.inputs[7]);
        let out = run(&infer_args(&fixture.arch, &fixture.checkpoint, &[]), single.as_bytes());
        assert!(out.status.success(), "{}", stderr(&out));
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
        fixture.check(LayerNormMode::Identity, &answer, &[7], "single flat row");
    }
}

#[test]
fn usage_errors_exit_2() {
    let f = Fixture::load("nano-s11");
    // (what, args, text stderr must contain). clap prints the usage for
    // unknown and missing flags, and names the flag and the accepted values
    // for a bad value.
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("unknown flag", vec!["infer", "--bogus"], "Usage:"),
        (
            "--arch without --checkpoint",
            vec!["infer", "--arch", path(&f.arch)],
            "Usage:",
        ),
        (
            "--checkpoint without --arch",
            vec!["infer", "--checkpoint", path(&f.checkpoint)],
            "Usage:",
        ),
        (
            "bad --layernorm",
            infer_args(&f.arch, &f.checkpoint, &["--layernorm", "both"]),
            "--layernorm",
        ),
        ("synth without --out", vec!["synth", "--size", "nano"], "Usage:"),
        (
            "synth bad size",
            vec!["synth", "--size", "huge", "--out", "/tmp/never-written"],
            "--size",
        ),
    ];
    for (what, args, want) in cases {
        let out = run(&args, b"{}");
        assert_eq!(out.status.code(), Some(2), "{what}: {:?}: {}", out.status, stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("error:"), "{what}: {err}");
        assert!(err.contains(want), "{what}: stderr does not contain {want:?}: {err}");
        assert!(out.stdout.is_empty(), "{what}: nothing on stdout");
    }
    assert!(!Path::new("/tmp/never-written").exists());
}

#[test]
fn load_and_body_failures_exit_1_with_the_reason() {
    let f = Fixture::load("nano-s11");
    let dir = tempfile::tempdir().unwrap();
    let body = single_body(&f.inputs[0]);

    // Missing checkpoint.
    let missing = dir.path().join("nope.tkp1");
    let out = run(&infer_args(&f.arch, &missing, &[]), body.as_bytes());
    assert_eq!(out.status.code(), Some(1), "missing checkpoint: {}", stderr(&out));
    assert!(
        stderr(&out).contains("nope.tkp1") || stderr(&out).to_lowercase().contains("no such file"),
        "{}",
        stderr(&out)
    );

    // Corrupt checkpoints: bad magic, and the real file truncated.
    let original = std::fs::read(&f.checkpoint).unwrap();
    let bad_magic = dir.path().join("magic.tkp1");
    let mut bytes = original.clone();
    bytes[..4].copy_from_slice(b"XXXX");
    std::fs::write(&bad_magic, &bytes).unwrap();
    let truncated = dir.path().join("truncated.tkp1");
    std::fs::write(&truncated, &original[..original.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.tkp1");
    std::fs::write(&garbage, b"TKP1\x01\0\0\0\0\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    for ckpt in [&bad_magic, &truncated, &garbage] {
        let out = run(&infer_args(&f.arch, ckpt, &[]), body.as_bytes());
        assert_eq!(out.status.code(), Some(1), "{}: {}", ckpt.display(), stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("failed to load the model"), "{}: {err}", ckpt.display());
        assert!(out.stdout.is_empty());
    }

    // Malformed bodies.
    let one_short = vec!["0.5"; f.dims.input - 1].join(",");
    for (what, body) in [
        ("broken JSON", "{\"features\": [1,".to_string()),
        ("one feature short", format!("{{\"features\": [{one_short}]}}")),
        ("empty", String::new()),
        ("not a number", format!("{{\"features\": [\"x\", {one_short}]}}")),
    ] {
        let out = run(&infer_args(&f.arch, &f.checkpoint, &[]), body.as_bytes());
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.starts_with("error: ") && err.trim().len() > "error: ".len(),
            "{what}: {err}"
        );
        assert!(out.stdout.is_empty(), "{what}: no answer printed");
    }
    let out = run(&infer_args(&f.arch, &f.checkpoint, &[]), b"{\"features\": [1,2]}");
    let want = format!("row 0 has 2 features, expected {}", f.dims.input);
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));

    // Missing --input file.
    let no_input = dir.path().join("no.json");
    let out = run(&infer_args(&f.arch, &f.checkpoint, &["--input", path(&no_input)]), b"");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn synth_then_infer() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("model");
    let out = synth_nano(3, &out_dir);
    assert!(out.status.success(), "synth: {}", stderr(&out));
    let (arch, checkpoint) = (out_dir.join("arch.json"), out_dir.join("checkpoint.tkp1"));
    assert!(arch.is_file() && checkpoint.is_file());

    let fixture = Fixture::load("nano-s11");
    let body = batch_body(&fixture.inputs[..8]);
    let first = infer_model_dir(&out_dir, body.as_bytes());
    assert!(first.status.success(), "infer on the synth model: {}", stderr(&first));
    let answer: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(answer["logits"].as_array().unwrap().len(), 8);
    let dims = nano_dims();
    for r in 0..8 {
        let logits = f32_row(&answer["logits"][r], dims.output, "synth logits");
        assert!(logits.iter().all(|x| x.is_finite()), "row {r}: {logits:?}");
        let w = f32_row(&answer["router_weights"][r], dims.experts, "synth router weights");
        let nonzero = w.iter().filter(|&&x| x != 0.0).count();
        assert!(
            (1..=dims.top_k).contains(&nonzero),
            "row {r}: top-{} routing, got {w:?}",
            dims.top_k
        );
        let sum: f64 = w.iter().sum();
        assert!(
            sum > 0.0 && sum <= 1.0 + 1e-6,
            "row {r}: weights are softmax probabilities, not renormalised: {w:?}"
        );
    }
    // Same seed, same model: a second synth gives the same answer.
    let again_dir = dir.path().join("again");
    assert!(synth_nano(3, &again_dir).status.success());
    let again = infer_model_dir(&again_dir, body.as_bytes());
    assert_eq!(first.stdout, again.stdout, "synth is deterministic in its seed");
    // A different seed is a different model.
    let other_dir = dir.path().join("other");
    assert!(synth_nano(4, &other_dir).status.success());
    let other = infer_model_dir(&other_dir, body.as_bytes());
    assert_ne!(first.stdout, other.stdout);
}

/// How long a refused start-up may take. It is immediate (a load of the
/// Nano model is milliseconds); past this the process is killed and the test
/// fails, so a server that starts serving or blocks cannot hang the run.
const START_UP_DEADLINE: Duration = Duration::from_secs(60);

/// Runs the binary with `args` (stdin empty) and waits for it to exit, at
/// most [`START_UP_DEADLINE`]; past that it is killed and the test fails.
fn run_bounded(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("TOKITAI_GRPC_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokitai-serve");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(START_UP_DEADLINE) {
        Ok(out) => out.expect("wait for tokitai-serve"),
        Err(_) => {
            // SAFETY: kill(2) on the child this test spawned and has not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("tokitai-serve {args:?} did not exit within {START_UP_DEADLINE:?}");
        }
    };
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "tokitai-serve {args:?} panicked: {err}");
    out
}

/// A Nano model in `dir` written by the library's writer, with a NaN at
/// value 1234 of `expert_1.param_4` (its first hidden Linear weight).
fn nan_model(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut w = synth_weights(nano_dims(), 21);
    w.experts[1].blocks[1].linear.weight[1234] = f32::NAN;
    let (arch, ckpt) = (dir.join("arch.json"), dir.join("checkpoint.tkp1"));
    std::fs::write(&arch, Arch::for_size(ModelSize::Nano, 21).to_json_pretty()).unwrap();
    write_checkpoint(&ckpt, &w, 1, "{}", true).unwrap();
    (arch, ckpt)
}

#[test]
fn serve_and_infer_refuse_fifos_devices_and_nan_weights_with_exit_1() {
    let f = Fixture::load("nano-s11");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("arch.fifo");
    mkfifo(&fifo);
    let (nan_arch, nan_ckpt) = nan_model(dir.path());
    let nan_reason = format!(
        "checkpoint {}: tensor 'expert_1.param_4' value 1234 is NaN",
        nan_ckpt.display()
    );
    let zero = Path::new("/dev/zero");
    let cases = [
        (
            fifo.as_path(),
            f.checkpoint.as_path(),
            format!("arch.json {}: is a FIFO, not a regular file", fifo.display()),
        ),
        (
            zero,
            f.checkpoint.as_path(),
            "arch.json /dev/zero: is a character device, not a regular file".into(),
        ),
        (
            f.arch.as_path(),
            fifo.as_path(),
            format!("checkpoint {}: is a FIFO, not a regular file", fifo.display()),
        ),
        (
            f.arch.as_path(),
            zero,
            "checkpoint /dev/zero: is a character device, not a regular file".into(),
        ),
        (nan_arch.as_path(), nan_ckpt.as_path(), nan_reason),
    ];
    for (arch, ckpt, reason) in &cases {
        let serve = [
            "serve",
            "--arch",
            path(arch),
            "--checkpoint",
            path(ckpt),
            "--bind",
            "127.0.0.1:0",
        ];
        let infer = infer_args(arch, ckpt, &[]);
        for args in [&serve[..], &infer[..]] {
            let out = run_bounded(args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {:?}: {err}", out.status);
            assert!(
                err.contains(reason.as_str()),
                "{args:?}: stderr does not contain {reason:?}: {err}"
            );
            assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
        }
    }
}

#[test]
fn serve_config_that_is_not_a_regular_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.fifo");
    mkfifo(&fifo);
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; (1 << 20) + 1]).unwrap();
    let cases = [
        (Path::new("/dev/zero"), "is a character device, not a regular file"),
        (fifo.as_path(), "is a FIFO, not a regular file"),
        (dir.path(), "is a directory, not a regular file"),
        (big.as_path(), "is 1048577 bytes, larger than the 1 MiB limit"),
    ];
    for (config, why) in cases {
        let out = run_bounded(&["serve", "--config", path(config), "--bind", "127.0.0.1:0"]);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--config {}: {:?}: {err}",
            config.display(),
            out.status
        );
        let want = format!("config file {}: {why}", config.display());
        assert!(err.contains(&want), "stderr does not contain {want:?}: {err}");
    }
}
