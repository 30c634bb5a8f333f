//! The command line: `serve` (the default), `infer` and `synth`.
//!
//! Owns: flags, exit codes and the offline subcommands. Flags and exit codes
//! follow the old sidecar: `--arch` / `--checkpoint`, usage errors exit 2 with
//! the usage, a model that fails to load exits 1 with the reason on stderr.
//! `infer` loads its model by the one model source rule
//! (`model::load_files_or_demo`). Must not touch: serving internals (it
//! calls [`crate::run`]).

use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::backend::cpu::{CpuBackend, CpuIsa, CpuOptions};
use crate::backend::{Backend, ForwardOutput, SessionConfig};
use crate::config::{Config, ControlMode, Override};
use crate::input::InputLimits;
use crate::model::{LayerNormMode, ModelSize, WeightPrecision};
use crate::sidecar_json;

/// Exit status for usage and configuration errors (the sidecar's).
pub const EXIT_USAGE: i32 = 2;
/// Exit status for a model that fails to load, or any other failure.
pub const EXIT_FAILURE: i32 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "tokitai-serve",
    version,
    about = "Serve tokitai-operator MoE models over HTTP",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over HTTP (the default).
    Serve(Box<ServeArgs>),
    /// Run the model on one /infer request body (stdin or --input) and print the answer.
    Infer(InferArgs),
    /// Write a synthetic model (arch.json + checkpoint.tkp1) in the training runner's format.
    Synth(SynthArgs),
}

#[derive(Debug, Clone, Args, Default)]
pub struct ModelArgs {
    /// arch.json written by the training runner.
    #[arg(long, requires = "checkpoint")]
    pub arch: Option<PathBuf>,
    /// checkpoint.tkp1 written by the training runner.
    #[arg(long, requires = "arch")]
    pub checkpoint: Option<PathBuf>,
    /// LayerNorm parameters: identity (gamma=1, beta=0, as the old sidecar; default) or stored.
    #[arg(long, value_name = "identity|stored")]
    pub layernorm: Option<LayerNormMode>,
    /// Expert weight storage: f32 (default), f16 or bf16 (half the memory, CPU backend only).
    #[arg(long, value_name = "f32|f16|bf16")]
    pub weight_precision: Option<WeightPrecision>,
    /// CPU kernels: auto (the best this CPU has; default) or a lower path forced
    /// (`workers.cpu_isa`); one the CPU lacks is refused naming the feature (exit 2).
    #[arg(long, value_name = "auto|avx512|avx2|scalar")]
    pub cpu_isa: Option<CpuIsa>,
}

#[derive(Debug, Clone, Args, Default)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// TOML configuration file (see config/default.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen address (else TOKITAI_MODEL_BIND_ADDR, else 127.0.0.1:9100).
    #[arg(long, value_name = "IP:PORT")]
    pub bind: Option<String>,
    /// gRPC listen address (else 127.0.0.1:9101; `grpc.enabled = false` turns gRPC off).
    #[arg(long, value_name = "IP:PORT")]
    pub grpc_bind: Option<String>,
    /// Worker actors (sessions).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Intra-op threads per worker.
    #[arg(long)]
    pub threads_per_worker: Option<usize>,
    /// HTTP threads.
    #[arg(long)]
    pub http_workers: Option<usize>,
    /// Most rows per batch.
    #[arg(long)]
    pub max_batch_rows: Option<usize>,
    /// How long a partial batch may wait for more rows, in microseconds.
    #[arg(long)]
    pub max_queue_delay_us: Option<u64>,
    /// Most queued rows before requests get 429.
    #[arg(long)]
    pub max_queue_rows: Option<usize>,
    /// Most rows per request before it gets 413.
    #[arg(long)]
    pub max_request_rows: Option<usize>,
    /// Log format: text or json.
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<String>,
    /// Model repository: DIR/<model>/<version>/{arch.json,checkpoint.tkp1} (excludes --arch/--checkpoint).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["arch", "checkpoint"])]
    pub model_repository: Option<PathBuf>,
    /// When served models change: none (start-up and SIGHUP), explicit (+ load/unload API), poll.
    #[arg(long, value_name = "none|explicit|poll")]
    pub model_control_mode: Option<ControlMode>,
    /// Seconds between repository reads in poll mode (fractions allowed).
    #[arg(long, value_name = "N")]
    pub repository_poll_secs: Option<f64>,
}

#[derive(Debug, Clone, Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Request body file (default: stdin).
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Intra-op threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

#[derive(Debug, Clone, Args)]
pub struct SynthArgs {
    /// Model size.
    #[arg(long, value_parser = parse_size, value_name = "nano|tiny|medium|full")]
    pub size: ModelSize,
    /// Seed of the deterministic weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Leave out the AdamW m/v buffers (a third of the file size).
    #[arg(long)]
    pub no_optimizer_state: bool,
}

fn parse_size(s: &str) -> Result<ModelSize, String> {
    match s.to_ascii_lowercase().as_str() {
        "nano" => Ok(ModelSize::Nano),
        "tiny" => Ok(ModelSize::Tiny),
        "medium" => Ok(ModelSize::Medium),
        "full" => Ok(ModelSize::Full),
        _ => Err(format!("unknown size {s:?}: expected nano, tiny, medium or full")),
    }
}

impl ServeArgs {
    /// The command line's settings, the top layer of the configuration.
    pub fn overrides(&self) -> Vec<Override> {
        use toml::Value::{Integer, String as Str};
        let path = |p: &PathBuf| Str(p.display().to_string());
        let int = |n: u64| Integer(i64::try_from(n).unwrap_or(i64::MAX));
        let mut o: Vec<Override> = Vec::new();
        let mut push = |key: &'static str, value: Option<toml::Value>| {
            if let Some(v) = value {
                o.push((key, v));
            }
        };
        push("model.arch", self.model.arch.as_ref().map(path));
        push("model.checkpoint", self.model.checkpoint.as_ref().map(path));
        push("model.layernorm", self.model.layernorm.map(|m| Str(m.as_str().into())));
        push(
            "model.weight_precision",
            self.model.weight_precision.map(|p| Str(p.as_str().into())),
        );
        push("workers.cpu_isa", self.model.cpu_isa.map(|i| Str(i.as_str().into())));
        push("server.bind", self.bind.clone().map(Str));
        push("grpc.bind", self.grpc_bind.clone().map(Str));
        push("workers.count", self.workers.map(|n| int(n as u64)));
        push(
            "workers.threads_per_worker",
            self.threads_per_worker.map(|n| int(n as u64)),
        );
        push("server.http_workers", self.http_workers.map(|n| int(n as u64)));
        push("batching.max_batch_rows", self.max_batch_rows.map(|n| int(n as u64)));
        push("batching.max_queue_delay_us", self.max_queue_delay_us.map(int));
        push("batching.max_queue_rows", self.max_queue_rows.map(|n| int(n as u64)));
        push(
            "batching.max_request_rows",
            self.max_request_rows.map(|n| int(n as u64)),
        );
        push("logging.format", self.log_format.clone().map(Str));
        push("model.repository", self.model_repository.as_ref().map(path));
        push(
            "model.control_mode",
            self.model_control_mode.map(|m| Str(m.as_str().into())),
        );
        push(
            "model.repository_poll_secs",
            self.repository_poll_secs.map(toml::Value::Float),
        );
        o
    }

    /// The layered configuration: defaults < file < environment < these flags.
    pub fn load_config(&self) -> Result<Config, crate::config::ConfigError> {
        Config::load(self.config.as_deref(), std::env::vars(), &self.overrides())
    }
}

/// Largest `tokitai-serve infer --input` file.
const CLI_MAX_INPUT_BYTES: u64 = 1 << 30;

/// `tokitai-serve infer`: one request body in, one answer out. Returns the
/// process exit status; every failure is a message on stderr, never a panic.
pub fn infer(args: &InferArgs) -> i32 {
    let isa = args.model.cpu_isa.unwrap_or_default();
    if let Some(feature) = isa.missing_feature() {
        eprintln!("error: --cpu-isa {isa} needs the CPU feature `{feature}`, which this CPU lacks");
        return EXIT_USAGE;
    }
    let files = args.model.arch.as_deref().zip(args.model.checkpoint.as_deref());
    let model = match crate::model::load_files_or_demo(files) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: failed to load the model: {e}");
            return EXIT_FAILURE;
        }
    };
    let mut body = Vec::new();
    let read = match &args.input {
        // A regular file only (a FIFO or a device is refused, not read), of
        // at most CLI_MAX_INPUT_BYTES.
        Some(path) => crate::model::files::read_regular_file(path, CLI_MAX_INPUT_BYTES)
            .map(|b| body = b)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
        None => std::io::stdin().read_to_end(&mut body).map(|_| ()),
    };
    if let Err(e) = read {
        eprintln!("error: could not read the request body: {e}");
        return EXIT_FAILURE;
    }
    let dims = model.arch.dims();
    // The command line has no request limit: a file of any row count is one batch.
    let limits = InputLimits {
        row_len: dims.input,
        max_rows: usize::MAX,
    };
    let request = match sidecar_json::parse_infer_request(&body, &limits) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILURE;
        }
    };
    let options = CpuOptions {
        precision: args.model.weight_precision.unwrap_or_default(),
        isa,
        ..CpuOptions::default()
    };
    let backend = match CpuBackend::with_options(model.weights, args.model.layernorm.unwrap_or_default(), options) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: failed to prepare the model: {e}");
            return EXIT_FAILURE;
        }
    };
    let mut out = ForwardOutput::default();
    let result = backend
        .create_session(SessionConfig {
            threads: args.threads.max(1),
        })
        .and_then(|mut session| session.forward(request.input.values(), &mut out));
    if let Err(e) = result {
        eprintln!("error: forward failed: {e}");
        return EXIT_FAILURE;
    }
    let answer = sidecar_json::write_infer_response(&out.logits, dims.output, &out.router_weights, dims.experts);
    println!("{}", String::from_utf8_lossy(&answer));
    0
}

/// `tokitai-serve synth`: writes arch.json + checkpoint.tkp1.
pub fn synth(args: &SynthArgs) -> i32 {
    match crate::model::synth::write_model_dir(&args.out, args.size, args.seed, !args.no_optimizer_state) {
        Ok((_, arch, checkpoint)) => {
            println!("wrote {} and {}", arch.display(), checkpoint.display());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}
