//! Running the Python peers (`ort_moe.py`, `ov_moe.py`, `accuracy.py`) as
//! child processes and reading their result lines.
//!
//! Owns: finding the Python environment and the peer scripts, the reason
//! printed when they are missing, and the parsing of `rows/s=` lines. Must
//! not touch: the peer scripts themselves (shared, read-only).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the peers run: the interpreter, the scripts, scratch space.
#[derive(Debug, Clone)]
pub struct PeerEnv {
    pub python: PathBuf,
    pub peers_dir: PathBuf,
    /// This bench's own helper scripts (`benches/peers/`).
    pub helpers: PathBuf,
    /// Scratch for the peers' ONNX files (removed after each run).
    pub tmp: PathBuf,
    pub has_ov: bool,
}

/// One peer configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    OrtF32,
    OvF32,
    OvBf16,
}

impl Peer {
    pub fn label(self) -> &'static str {
        match self {
            Peer::OrtF32 => "ORT f32 (topk)",
            Peer::OvF32 => "OpenVINO f32",
            Peer::OvBf16 => "OpenVINO bf16",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Peer::OrtF32 => "ort_f32",
            Peer::OvF32 => "ov_f32",
            Peer::OvBf16 => "ov_bf16",
        }
    }
}

/// One `rows/s=` line of a peer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerResult {
    pub peer: &'static str,
    pub size: String,
    pub threads: usize,
    pub batch: usize,
    pub rows_s: f64,
    pub rows_s_min: f64,
    pub rows_s_max: f64,
}

impl PeerEnv {
    /// The peers' environment, or why there is none (with how to make it).
    /// `python`: `TOKITAI_PEERS_PYTHON`, else `target/peers-venv/bin/python`;
    /// scripts: `TOKITAI_PEERS_DIR`, else `../shared/peers` beside the crate.
    pub fn find(manifest: &Path, target: &Path) -> Result<PeerEnv, String> {
        let python = std::env::var_os("TOKITAI_PEERS_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| target.join("peers-venv/bin/python"));
        let peers_dir = std::env::var_os("TOKITAI_PEERS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join("../shared/peers"));
        let how = "make it with `bash benches/peers/setup.sh` (a venv in target/peers-venv with onnxruntime, \
                   openvino, onnx and numpy from PyPI), or point TOKITAI_PEERS_PYTHON at a python that has them";
        if !python.exists() {
            return Err(format!("no Python environment at {}: {how}", python.display()));
        }
        if !peers_dir.join("ort_moe.py").exists() || !peers_dir.join("ov_moe.py").exists() {
            return Err(format!(
                "ort_moe.py / ov_moe.py not found in {} (set TOKITAI_PEERS_DIR)",
                peers_dir.display()
            ));
        }
        let probe = |module: &str| {
            Command::new(&python)
                .args(["-c", &format!("import numpy, onnx, {module}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let has_ov = probe("openvino");
        if !probe("onnxruntime") {
            return Err(format!(
                "{} cannot import numpy, onnx and onnxruntime: {how}",
                python.display()
            ));
        }
        Ok(PeerEnv {
            python,
            peers_dir,
            helpers: manifest.join("benches/peers"),
            tmp: target.join("peers/tmp"),
            has_ov,
        })
    }

    /// Runs `script args`, echoing its lines with `prefix`; returns its stdout lines.
    fn run_lines(&self, script: &Path, args: &[String], prefix: &str) -> Result<Vec<String>, String> {
        let tmp = self.tmp.join(format!("{}", std::process::id()));
        let mut child = Command::new(&self.python)
            .arg(self.helpers.join("run_peer.py"))
            .arg(&tmp)
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.python.display()))?;
        let mut lines = Vec::new();
        for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
            let line = line.map_err(|e| e.to_string())?;
            println!("  {prefix} {line}");
            lines.push(line);
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("{} {} exited with {status}", script.display(), args.join(" ")));
        }
        Ok(lines)
    }

    /// Times `peer` on `size` at `batches`, threads 1 and 2.
    pub fn bench(
        &self,
        peer: Peer,
        size: &str,
        batches: &[usize],
        reps: usize,
        min_rep_s: f64,
    ) -> Result<Vec<PeerResult>, String> {
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let mut args: Vec<String> = vec![
            "--size".into(),
            size.into(),
            "--threads".into(),
            "1,2".into(),
            "--batch".into(),
            list(batches),
            "--reps".into(),
            reps.to_string(),
            "--min-rep-s".into(),
            min_rep_s.to_string(),
        ];
        let script = match peer {
            Peer::OrtF32 => {
                args.extend(["--variant".into(), "topk".into()]);
                "ort_moe.py"
            }
            Peer::OvF32 | Peer::OvBf16 => {
                let p = if peer == Peer::OvBf16 { "bf16" } else { "f32" };
                args.extend(["--precision".into(), p.into()]);
                "ov_moe.py"
            }
        };
        let lines = self.run_lines(&self.peers_dir.join(script), &args, peer.key())?;
        let results: Vec<PeerResult> = lines.iter().filter_map(|l| parse_rows_line(peer, size, l)).collect();
        if results.is_empty() {
            return Err(format!("{script} printed no rows/s lines"));
        }
        Ok(results)
    }

    /// `accuracy.py export`: the peers' weights in the engine's format, with
    /// inputs and the float64 reference, into `out`.
    pub fn export_accuracy(&self, size: &str, out: &Path, rows: usize) -> Result<(), String> {
        let args = [
            "export".into(),
            "--peers".into(),
            self.peers_dir.display().to_string(),
            "--size".into(),
            size.into(),
            "--out".into(),
            out.display().to_string(),
            "--rows".into(),
            rows.to_string(),
        ];
        self.run_lines(&self.helpers.join("accuracy.py"), &args, "export")
            .map(|_| ())
    }

    /// `accuracy.py peers`: the peers' errors on `dir`'s inputs, as JSON values.
    pub fn peer_accuracy(&self, size: &str, dir: &Path, bf16: bool) -> Result<Vec<serde_json::Value>, String> {
        let mut args = vec![
            "peers".into(),
            "--peers".into(),
            self.peers_dir.display().to_string(),
            "--size".into(),
            size.into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        if bf16 {
            args.push("--bf16".into());
        }
        let lines = self.run_lines(&self.helpers.join("accuracy.py"), &args, "accuracy")?;
        Ok(lines
            .iter()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// `size=tiny variant=topk threads=1 batch=16 rows/s=812.3 [790.1..830.0] ...`
/// (ORT) or `size=tiny ov threads=2 batch=16 weights=f32 prec=f32 rows/s=... [a..b]` (OpenVINO).
fn parse_rows_line(peer: Peer, size: &str, line: &str) -> Option<PeerResult> {
    if !line.starts_with("size=") {
        return None;
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let range = line
        .split_whitespace()
        .find(|t| t.starts_with('[') && t.contains(".."))
        .and_then(|t| {
            let (a, b) = t.trim_matches(|c| c == '[' || c == ']').split_once("..")?;
            Some((a.parse().ok()?, b.parse().ok()?))
        });
    let rows_s: f64 = field("rows/s")?.parse().ok()?;
    let (lo, hi) = range.unwrap_or((rows_s, rows_s));
    Some(PeerResult {
        peer: peer.key(),
        size: size.to_owned(),
        threads: field("threads")?.parse().ok()?,
        batch: field("batch")?.parse().ok()?,
        rows_s,
        rows_s_min: lo,
        rows_s_max: hi,
    })
}

/// Whether a CPU has the bf16 instructions OpenVINO's bf16 mode needs (it
/// silently stays f32 elsewhere).
pub fn ov_bf16_meaningful() -> bool {
    super::probes::has_avx512_bf16()
}
