//! Engine configuration: serde structs with defaults, layered sources, and
//! start-up validation.
//!
//! Owns: every setting, its default, and where it may come from. Precedence is
//! built-in defaults < `--config FILE` (TOML) < environment (`TOKITAI_*`) <
//! command line. Unknown keys are rejected and every invalid value is an error
//! that names the setting. Must not touch: anything that runs; other modules
//! receive a validated [`Config`].
//!
//! Environment variables map to settings as `TOKITAI_<SECTION>_<KEY>`, e.g.
//! `TOKITAI_BATCHING_MAX_BATCH_ROWS=64`. `TOKITAI_MODEL_BIND_ADDR` is kept as
//! the old sidecar's name for `server.bind`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::cpu::CpuIsa;
use crate::labels::Scope;
use crate::model::{LayerNormMode, WeightPrecision};

/// The old sidecar's bind variable, kept for drop-in compatibility.
pub const LEGACY_BIND_ENV: &str = "TOKITAI_MODEL_BIND_ADDR";
/// Default bind address: loopback only, the old sidecar's port.
pub const DEFAULT_BIND: &str = "127.0.0.1:9100";

/// Default gRPC bind address: loopback only, the port after HTTP's.
pub const DEFAULT_GRPC_BIND: &str = "127.0.0.1:9101";

/// Default permission bits of a Unix socket (`server.unix_socket`,
/// `grpc.unix_socket`): owner and group may connect.
pub const DEFAULT_UNIX_SOCKET_MODE: &str = "660";

/// Default model name on the `/v2` routes.
pub const DEFAULT_MODEL_NAME: &str = "tokitai-moe";

const SECTIONS: [&str; 8] = [
    "server", "grpc", "model", "batching", "workers", "logging", "metrics", "tracing",
];

/// A configuration that failed to load or validate. The message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Parse(String),
    #[error("setting `{setting}`: {message}")]
    Invalid { setting: &'static str, message: String },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub grpc: GrpcConfig,
    pub model: ModelConfig,
    pub batching: BatchingConfig,
    pub workers: WorkersConfig,
    pub logging: LoggingConfig,
    pub metrics: MetricsConfig,
    pub tracing: TracingConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (`TOKITAI_MODEL_BIND_ADDR` too). Port 0 picks a free port.
    pub bind: String,
    /// HTTP worker threads (parse JSON, write answers; never compute).
    pub http_workers: usize,
    /// Largest accepted request body; larger ones get 413 before being read.
    pub max_body_bytes: usize,
    /// Default deadline of a request when `X-Request-Timeout-Ms` is absent.
    pub request_timeout_ms: u64,
    /// On SIGTERM/SIGINT, how long queued and running work may take to finish.
    pub shutdown_timeout_secs: u64,
    /// Time a connection has to send its request head.
    pub header_timeout_ms: u64,
    /// Time the whole body has to arrive once the head is in (else 408).
    pub body_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this.
    pub keep_alive_secs: u64,
    /// Most open client connections, all HTTP threads together.
    pub max_connections: usize,
    /// Largest request head (header names and values); larger gets 431.
    pub max_header_bytes: usize,
    /// Origins (`scheme://host[:port]`, as browsers send them) whose
    /// requests are served; any other `Origin`, or `Sec-Fetch-Site:
    /// cross-site` without a listed origin, gets 403 on every route.
    pub allowed_origins: Vec<String>,
    /// Host names (no port) accepted in `Host` besides the loopback ones
    /// when the server is bound to a loopback address (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Time an answer has to drain to a client that stopped taking it (or
    /// its request's deadline, if later): past it the HTTP connection is
    /// closed / the gRPC stream reset.
    pub send_timeout_ms: u64,
    /// Answer bytes waiting for clients to take them, all connections of
    /// both protocols together; past it new inference requests get 503 /
    /// UNAVAILABLE.
    pub max_pending_answer_bytes: usize,
    /// API keys, one per line: `KEY SCOPE[,SCOPE...]` (scopes `infer`,
    /// `repository`, `metadata`, `metrics`; `#` starts a comment), re-read
    /// on SIGHUP. Unset: no key is asked for (the loopback sidecar).
    pub api_keys_file: Option<PathBuf>,
    /// The scope `/metrics` needs when keys are on (`none`: open, for a
    /// Prometheus that sends no key).
    pub metrics_scope: ScopeSetting,
    /// The scope the metadata routes need when keys are on (server and
    /// model metadata, config, statistics; `none`: open).
    pub metadata_scope: ScopeSetting,
    /// Also serve the HTTP routes on this Unix domain socket (same-host
    /// callers). Removed on shutdown; a stale file is replaced only when
    /// nothing listens on it.
    pub unix_socket: Option<PathBuf>,
    /// The socket file's permission bits, in octal (`"660"`: owner and
    /// group may connect; an unquoted `660`, as an environment variable
    /// gives it, reads the same).
    #[serde(deserialize_with = "octal_digits")]
    pub unix_socket_mode: String,
}

/// `server.metrics_scope` / `server.metadata_scope`: the API-key scope a
/// route group needs, or `none` for open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeSetting {
    None,
    Infer,
    Repository,
    Metadata,
    Metrics,
}

impl ScopeSetting {
    /// The scope needed, `None` for open.
    pub fn scope(self) -> Option<Scope> {
        match self {
            ScopeSetting::None => None,
            ScopeSetting::Infer => Some(Scope::Infer),
            ScopeSetting::Repository => Some(Scope::Repository),
            ScopeSetting::Metadata => Some(Scope::Metadata),
            ScopeSetting::Metrics => Some(Scope::Metrics),
        }
    }
}

/// `[grpc]`: Triton's `GRPCInferenceService` on a port of its own. Message
/// size, header size, body time and request deadlines are `[server]`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Serve gRPC at all.
    pub enabled: bool,
    /// Address to listen on. Port 0 picks a free port (the log prints it).
    pub bind: String,
    /// Threads of the gRPC runtime (decode, validate, encode; never compute).
    pub threads: usize,
    /// Most concurrent streams (calls) on one HTTP/2 connection; more are refused.
    pub max_concurrent_streams: u32,
    /// Most open gRPC connections; past it new ones wait in the backlog.
    pub max_connections: usize,
    /// HTTP/2 keep-alive ping interval on an idle connection (0: none).
    pub keepalive_interval_secs: u64,
    /// A connection whose ping is not answered within this is closed.
    pub keepalive_timeout_secs: u64,
    /// Time a new connection has to send the HTTP/2 preface and its first
    /// SETTINGS frame; then it is closed.
    pub handshake_timeout_ms: u64,
    /// Most connections in their handshake at once, besides
    /// `max_connections`; past it the oldest one is closed for the new one.
    pub max_handshaking_connections: usize,
    /// Also serve gRPC on this Unix domain socket (same rules as
    /// `server.unix_socket`).
    pub unix_socket: Option<PathBuf>,
    /// The socket file's permission bits, in octal.
    #[serde(deserialize_with = "octal_digits")]
    pub unix_socket_mode: String,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            enabled: true,
            bind: DEFAULT_GRPC_BIND.to_string(),
            threads: 2,
            max_concurrent_streams: 128,
            max_connections: 1024,
            keepalive_interval_secs: 60,
            keepalive_timeout_secs: 20,
            handshake_timeout_ms: 5_000,
            max_handshaking_connections: 128,
            unix_socket: None,
            unix_socket_mode: DEFAULT_UNIX_SOCKET_MODE.to_string(),
        }
    }
}

impl GrpcConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.bind.parse::<SocketAddr>().is_err() {
            return bad("grpc.bind", format!("{:?} is not an IP:port address", self.bind));
        }
        in_range("grpc.threads", self.threads, 1..=64, "")?;
        in_range(
            "grpc.max_concurrent_streams",
            self.max_concurrent_streams as usize,
            1..=65_536,
            "",
        )?;
        in_range("grpc.max_connections", self.max_connections, 1..=1_000_000, "")?;
        in_range(
            "grpc.keepalive_interval_secs",
            self.keepalive_interval_secs as usize,
            0..=86_400,
            " (0: no pings)",
        )?;
        in_range(
            "grpc.keepalive_timeout_secs",
            self.keepalive_timeout_secs as usize,
            1..=3600,
            "",
        )?;
        in_range(
            "grpc.handshake_timeout_ms",
            self.handshake_timeout_ms as usize,
            1..=60_000,
            "",
        )?;
        in_range(
            "grpc.max_handshaking_connections",
            self.max_handshaking_connections,
            1..=65_536,
            "",
        )?;
        validate_unix_socket(
            ("grpc.unix_socket", self.unix_socket.as_deref()),
            ("grpc.unix_socket_mode", &self.unix_socket_mode),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `arch.json` written by the training runner. With neither this nor
    /// `checkpoint`, the built-in demo model is served.
    pub arch: Option<PathBuf>,
    /// `checkpoint.tkp1` written by the training runner.
    pub checkpoint: Option<PathBuf>,
    /// `identity` (gamma=1, beta=0: what the old sidecar served and the model
    /// was trained with) or `stored` (the checkpoint's gamma/beta).
    pub layernorm: LayerNormMode,
    /// `f32` (the checkpoint's weights) or `f16` (expert weights rounded to
    /// IEEE half precision at load: half the memory; CPU backend only).
    pub weight_precision: WeightPrecision,
    /// The model's name on the Open Inference Protocol routes (`/v2/models/{name}`),
    /// and, with a repository, the model `/infer` goes to (else the only model).
    pub name: String,
    /// A model repository, Triton's layout: `DIR/<model>/<version>/{arch.json,
    /// checkpoint.tkp1}` and an optional `DIR/<model>/config.toml`. Excludes
    /// `arch` / `checkpoint`.
    pub repository: Option<PathBuf>,
    /// When the served models change: `none` (at start-up and on SIGHUP),
    /// `explicit` (also through the repository API), `poll` (also every
    /// `repository_poll_secs`).
    pub control_mode: ControlMode,
    /// How often `poll` mode re-reads the repository, in seconds (fractions allowed).
    pub repository_poll_secs: f64,
}

/// `model.control_mode`: Triton's model control modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlMode {
    /// Models are read at start-up and re-read on SIGHUP only.
    #[default]
    None,
    /// As `none`, plus `POST /v2/repository/models/{name}/load|unload`.
    Explicit,
    /// As `none`, plus a re-read every `model.repository_poll_secs`.
    Poll,
}

impl ControlMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlMode::None => "none",
            ControlMode::Explicit => "explicit",
            ControlMode::Poll => "poll",
        }
    }
}

impl std::str::FromStr for ControlMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(ControlMode::None),
            "explicit" => Ok(ControlMode::Explicit),
            "poll" => Ok(ControlMode::Poll),
            other => Err(format!("expected \"none\", \"explicit\" or \"poll\", got {other:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Most rows in one batch handed to a worker.
    pub max_batch_rows: usize,
    /// How long a batch that is not full may wait for more rows (0: never wait).
    pub max_queue_delay_us: u64,
    /// Most rows waiting in the queue; past it requests get 429 at once.
    pub max_queue_rows: usize,
    /// Most rows in one request; more gets 413.
    pub max_request_rows: usize,
    /// When a worker frees up with fewer rows queued than it just answered,
    /// how long (in percent of that batch's compute time) the next partial
    /// batch may wait for those clients to send again. 0 disables.
    pub regroup_delay_pct: u32,
    /// Priority levels (Triton's): a request names its level with the v2 /
    /// gRPC parameter `priority` or `/infer`'s `X-Request-Priority` header
    /// (1 is the highest; 0 means the default). Batches are filled from the
    /// highest level first. 1: one queue.
    pub priority_levels: u32,
    /// The level of a request that names none (or names 0).
    pub default_priority_level: u32,
    /// A request queued this long is taken as if it were at the highest
    /// level, so no level waits forever (0: never promoted).
    pub max_priority_wait_ms: u64,
    /// Per-level limits, keyed by level (`[batching.levels.2]`); a field
    /// left out takes the global setting.
    pub levels: BTreeMap<String, PriorityLevelConfig>,
}

/// `[batching.levels.N]`: one priority level's own limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityLevelConfig {
    /// Most rows queued at this level; past it its requests get 429 /
    /// UNAVAILABLE while other levels are still admitted.
    pub max_queue_rows: Option<usize>,
    /// This level's default request timeout (a request's own timeout wins).
    pub timeout_ms: Option<u64>,
    /// Most rows of this level in one batch: a batch in hand is never
    /// preempted, so this bounds what a higher level may wait behind.
    pub max_batch_rows: Option<usize>,
}

/// `[tracing]`: OpenTelemetry traces exported over OTLP/HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/HTTP traces endpoint, e.g.
    /// `http://otel-collector:4318/v1/traces` (plain http: the exporter
    /// carries no TLS stack). Empty: no tracing.
    pub otlp_endpoint: String,
    /// Share of requests without a sampled parent that are traced (a
    /// request whose `traceparent` says sampled, or not, follows it).
    pub sample_ratio: f64,
    /// Most finished spans waiting for export; past it new spans are
    /// dropped and counted, never waited for.
    pub max_queue_spans: usize,
    /// Most spans in one export request.
    pub max_export_batch_spans: usize,
    /// How long one export may take before it is abandoned.
    pub export_timeout_ms: u64,
    /// The `service.name` the spans carry.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
            max_queue_spans: 4096,
            max_export_batch_spans: 512,
            export_timeout_ms: 10_000,
            service_name: "tokitai-serve".to_string(),
        }
    }
}

impl TracingConfig {
    /// Whether spans are exported at all.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let endpoint = &self.otlp_endpoint;
        let http = endpoint.starts_with("http://");
        if !(endpoint.is_empty() || http) {
            let shown: String = endpoint.chars().take(100).collect();
            return bad(
                "tracing.otlp_endpoint",
                format!(
                    "{shown:?} is not an http:// URL (OTLP/HTTP; the exporter has no TLS: an https \
                     collector needs a plain-http sidecar or in-cluster endpoint)"
                ),
            );
        }
        if endpoint.len() > 2048 {
            return bad("tracing.otlp_endpoint", "is longer than 2048 bytes");
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return bad(
                "tracing.sample_ratio",
                format!("{} is not between 0 and 1", self.sample_ratio),
            );
        }
        in_range("tracing.max_queue_spans", self.max_queue_spans, 1..=1_000_000, "")?;
        in_range(
            "tracing.max_export_batch_spans",
            self.max_export_batch_spans,
            1..=self.max_queue_spans,
            " (at most tracing.max_queue_spans)",
        )?;
        in_range(
            "tracing.export_timeout_ms",
            usize::try_from(self.export_timeout_ms).unwrap_or(usize::MAX),
            1..=60_000,
            "",
        )?;
        if self.service_name.is_empty() || self.service_name.len() > 256 {
            return bad("tracing.service_name", "must be 1 to 256 bytes");
        }
        Ok(())
    }
}

/// `workers.backend`: which compute backend serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// HIP when a usable device is found, else the CPU (the log says which).
    #[default]
    Auto,
    Cpu,
    /// HIP, or start-up fails with the reason.
    Hip,
}

/// `logging.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Compute backend: `auto` (HIP when a device is found, else CPU), `cpu`
    /// or `hip` (fail start-up without a device).
    pub backend: BackendChoice,
    /// HIP device ids to use; empty means every visible device.
    pub gpus: Vec<u32>,
    /// HIP streams per GPU; worker sessions are spread over GPUs, then streams.
    pub streams_per_gpu: usize,
    /// Worker actors, each owning one session. 0: the backend's fastest
    /// shape (CPU: one per core for cache-resident models, else one).
    pub count: usize,
    /// Intra-op threads per worker session. 0: the backend's choice (CPU:
    /// 1 for cache-resident models, else every core).
    pub threads_per_worker: usize,
    /// CPU kernels: `auto` (the best this CPU has: avx512, else avx2, else
    /// scalar) or a forced lower path; one the CPU lacks fails start-up.
    pub cpu_isa: CpuIsa,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Record request, batch and routing metrics. `false` exists only to
    /// measure what recording costs; `/metrics` then shows zeros.
    pub record: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { record: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `tracing` filter, e.g. `info` or `tokitai_serve=debug` (`RUST_LOG` wins).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: DEFAULT_BIND.to_string(),
            http_workers: 2,
            max_body_bytes: 16 * 1024 * 1024,
            request_timeout_ms: 30_000,
            shutdown_timeout_secs: 30,
            header_timeout_ms: 5_000,
            body_timeout_ms: 10_000,
            keep_alive_secs: 30,
            max_connections: 8192,
            max_header_bytes: 16 * 1024,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            send_timeout_ms: 10_000,
            max_pending_answer_bytes: 256 * 1024 * 1024,
            api_keys_file: None,
            metrics_scope: ScopeSetting::Metrics,
            metadata_scope: ScopeSetting::Metadata,
            unix_socket: None,
            unix_socket_mode: DEFAULT_UNIX_SOCKET_MODE.to_string(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: None,
            checkpoint: None,
            layernorm: LayerNormMode::Identity,
            weight_precision: WeightPrecision::F32,
            name: DEFAULT_MODEL_NAME.to_string(),
            repository: None,
            control_mode: ControlMode::None,
            repository_poll_secs: 5.0,
        }
    }
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch_rows: 256,
            max_queue_delay_us: 0,
            max_queue_rows: 8192,
            max_request_rows: 4096,
            regroup_delay_pct: 10,
            priority_levels: 1,
            default_priority_level: 1,
            max_priority_wait_ms: 0,
            levels: BTreeMap::new(),
        }
    }
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            backend: BackendChoice::Auto,
            gpus: Vec::new(),
            streams_per_gpu: 2,
            count: 0,
            threads_per_worker: 0,
            cpu_isa: CpuIsa::Auto,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

/// A setting given on the command line, as `section.key` and a TOML value.
pub type Override = (&'static str, toml::Value);

impl Config {
    /// `model.arch` and `model.checkpoint` when both are given; `None`
    /// means the demo model (`model::load_files_or_demo`).
    pub fn model_files(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        self.model.arch.as_deref().zip(self.model.checkpoint.as_deref())
    }

    /// Loads the layered configuration: defaults < file < environment < `overrides`.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[Override],
    ) -> Result<Config, ConfigError> {
        let mut doc = toml::Table::new();
        if let Some(path) = file {
            // A regular file of at most 1 MiB, checked before it is opened
            // (a FIFO would block, a device never end): real configs are a few KiB.
            const MAX_CONFIG_FILE: u64 = 1 << 20;
            let file_error = |message: String| ConfigError::File {
                path: path.to_path_buf(),
                message,
            };
            let bytes =
                crate::model::files::read_regular_file(path, MAX_CONFIG_FILE).map_err(|e| file_error(e.to_string()))?;
            let text = String::from_utf8(bytes)
                .map_err(|e| file_error(format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to())))?;
            doc = toml::from_str(&text).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        for (name, raw) in env {
            if let Some((section, key)) = env_setting(&name) {
                set(&mut doc, section, &key, env_value(&raw));
            }
        }
        for (path, value) in overrides {
            let (section, key) = path.split_once('.').expect("override paths are section.key");
            set(&mut doc, section, key, value.clone());
        }
        // Round-trip through text so toml's errors quote the offending line,
        // which names the setting (`max_batch_rows = "x"`).
        let text = toml::to_string(&doc).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let config: Config = toml::from_str(&text).map_err(|e| parse_error(&text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, section by section; the error names the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.grpc.validate()?;
        self.model.validate()?;
        self.batching.validate()?;
        self.workers.validate()?;
        self.tracing.validate()?;
        if self.server.unix_socket.is_some() && self.server.unix_socket == self.grpc.unix_socket {
            return bad(
                "grpc.unix_socket",
                "is the same path as server.unix_socket: give each its own",
            );
        }
        Ok(())
    }

    pub fn bind_addr(&self) -> SocketAddr {
        self.server.bind.parse().expect("validated at load")
    }

    /// `grpc.bind`, parsed.
    pub fn grpc_bind_addr(&self) -> SocketAddr {
        self.grpc.bind.parse().expect("validated at load")
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.server.header_timeout_ms)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.server.body_timeout_ms)
    }

    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }

    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.server.send_timeout_ms)
    }

    pub fn max_queue_delay(&self) -> Duration {
        Duration::from_micros(self.batching.max_queue_delay_us)
    }

    pub fn repository_poll(&self) -> Duration {
        Duration::from_secs_f64(self.model.repository_poll_secs)
    }

    /// This configuration with a model's own `config.toml` (already parsed)
    /// layered on top, validated as a whole; errors name the setting.
    pub fn layered(&self, overlay: &toml::Table) -> Result<Config, ConfigError> {
        let mut doc = toml::Table::try_from(self).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for (section, table) in overlay {
            if let toml::Value::Table(table) = table {
                for (key, value) in table {
                    set(&mut doc, section, key, value.clone());
                }
            }
        }
        let text = toml::to_string(&doc).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let config: Config = toml::from_str(&text).map_err(|e| parse_error(&text, &e))?;
        config.validate()?;
        Ok(config)
    }
}

/// `server.send_timeout_ms` at most: one hour, like the other timeouts.
const MAX_SEND_TIMEOUT_MS: usize = 3_600_000;
/// `server.max_pending_answer_bytes` at least: 1 MiB. (A request is refused
/// only while the answers already held reach the budget, so one answer
/// larger than it is still served.)
const MIN_PENDING_ANSWER_BYTES: usize = 1024 * 1024;
/// `server.max_pending_answer_bytes` at most: 64 GiB.
const MAX_PENDING_ANSWER_BYTES: usize = 64 << 30;

/// An invalid setting.
fn bad(setting: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        setting,
        message: message.into(),
    })
}

/// `Err` naming `setting` when `value` is outside `range`.
fn in_range(
    setting: &'static str,
    value: usize,
    range: std::ops::RangeInclusive<usize>,
    hint: &str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        bad(
            setting,
            format!("{value} is not in {}..={}{hint}", range.start(), range.end()),
        )
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.bind.parse::<SocketAddr>().is_err() {
            return bad("server.bind", format!("{:?} is not an IP:port address", self.bind));
        }
        in_range("server.http_workers", self.http_workers, 1..=64, "")?;
        in_range(
            "server.max_body_bytes",
            self.max_body_bytes,
            1024..=MAX_BODY_BYTES,
            " (1 KiB to 1 GiB)",
        )?;
        let hour_ms = 3_600_000;
        in_range(
            "server.request_timeout_ms",
            self.request_timeout_ms as usize,
            1..=hour_ms,
            "",
        )?;
        in_range(
            "server.shutdown_timeout_secs",
            self.shutdown_timeout_secs as usize,
            0..=3600,
            "",
        )?;
        in_range(
            "server.header_timeout_ms",
            self.header_timeout_ms as usize,
            1..=hour_ms,
            "",
        )?;
        in_range("server.body_timeout_ms", self.body_timeout_ms as usize, 1..=hour_ms, "")?;
        in_range(
            "server.keep_alive_secs",
            self.keep_alive_secs as usize,
            0..=3600,
            " (0: no keep-alive)",
        )?;
        in_range("server.max_header_bytes", self.max_header_bytes, 1024..=65_536, "")?;
        let workers = self.http_workers;
        in_range(
            "server.max_connections",
            self.max_connections,
            workers.max(1)..=1_000_000,
            " (at least one per HTTP thread)",
        )?;
        self.validate_browser_lists()?;
        self.validate_send_limits()?;
        validate_unix_socket(
            ("server.unix_socket", self.unix_socket.as_deref()),
            ("server.unix_socket_mode", &self.unix_socket_mode),
        )
    }

    /// `server.send_timeout_ms` and `server.max_pending_answer_bytes`.
    fn validate_send_limits(&self) -> Result<(), ConfigError> {
        in_range(
            "server.send_timeout_ms",
            usize::try_from(self.send_timeout_ms).unwrap_or(usize::MAX),
            1..=MAX_SEND_TIMEOUT_MS,
            "",
        )?;
        in_range(
            "server.max_pending_answer_bytes",
            self.max_pending_answer_bytes,
            MIN_PENDING_ANSWER_BYTES..=MAX_PENDING_ANSWER_BYTES,
            "",
        )
    }

    /// `allowed_origins`: each an origin as a browser writes it
    /// (`scheme://host[:port]`, no path, no wildcard); `allowed_hosts`:
    /// each a host name or address without a port. At most 256 of each.
    fn validate_browser_lists(&self) -> Result<(), ConfigError> {
        const MAX_ENTRIES: usize = 256;
        let lists = [
            (
                "server.allowed_origins",
                &self.allowed_origins,
                origin_ok as fn(&str) -> bool,
            ),
            ("server.allowed_hosts", &self.allowed_hosts, host_ok),
        ];
        for (setting, list, ok) in lists {
            if list.len() > MAX_ENTRIES {
                return bad(
                    setting,
                    format!("{} entries is over the maximum of {MAX_ENTRIES}", list.len()),
                );
            }
            if let Some(entry) = list.iter().find(|e| !ok(e)) {
                let shown: String = entry.chars().take(100).collect();
                let want = if setting == "server.allowed_origins" {
                    "an origin such as \"https://app.example:8443\" (scheme://host[:port], no path, no wildcard)"
                } else {
                    "a host name or IP address without a port, such as \"engine.internal\""
                };
                return bad(setting, format!("{shown:?} is not {want}"));
            }
        }
        Ok(())
    }
}

/// Largest `server.max_body_bytes`: 1 GiB.
const MAX_BODY_BYTES: usize = 1 << 30;

/// An origin as browsers serialize it: `scheme://host[:port]`.
fn origin_ok(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        && !rest.is_empty()
        && origin.len() <= 256
        && rest.bytes().all(|b| b.is_ascii_graphic() && !b"/*?#@".contains(&b))
}

/// A host name or address as `Host` carries it, without the port.
fn host_ok(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        && (host.starts_with('[') || !host.contains(':'))
}

impl ModelConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.arch.is_some() != self.checkpoint.is_some() {
            let (setting, other) = if self.arch.is_some() {
                ("model.checkpoint", "model.arch")
            } else {
                ("model.arch", "model.checkpoint")
            };
            return bad(
                setting,
                format!("is required when {other} is given (give both, or neither for the demo model)"),
            );
        }
        if self.repository.is_some() && self.arch.is_some() {
            return bad(
                "model.repository",
                "cannot be combined with model.arch / model.checkpoint (a repository holds its models' files)",
            );
        }
        let poll = self.repository_poll_secs;
        if !(poll.is_finite() && (0.01..=86_400.0).contains(&poll)) {
            return bad(
                "model.repository_poll_secs",
                format!("{poll} is not in 0.01..=86400 seconds"),
            );
        }
        if !model_name_ok(&self.name) {
            return bad(
                "model.name",
                format!("{:?} must be 1-64 characters of [A-Za-z0-9._-]", self.name),
            );
        }
        Ok(())
    }
}

/// A model name: 1-64 characters of `[A-Za-z0-9._-]`, not starting with a
/// dot (so `.` and `..` are never names). Repository folder names obey it too.
pub fn model_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl BatchingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        in_range("batching.max_batch_rows", self.max_batch_rows, 1..=65_536, "")?;
        in_range(
            "batching.max_request_rows",
            self.max_request_rows,
            1..=MAX_REQUEST_ROWS,
            "",
        )?;
        in_range("batching.max_queue_rows", self.max_queue_rows, 1..=MAX_QUEUE_ROWS, "")?;
        if self.max_queue_rows < self.max_request_rows {
            return bad(
                "batching.max_queue_rows",
                format!(
                    "{} is below batching.max_request_rows ({}): such a request could never be queued",
                    self.max_queue_rows, self.max_request_rows
                ),
            );
        }
        if self.max_queue_delay_us > 1_000_000 {
            return bad(
                "batching.max_queue_delay_us",
                format!("{} is over the maximum of 1000000 (1 s)", self.max_queue_delay_us),
            );
        }
        if self.regroup_delay_pct > 100 {
            return bad(
                "batching.regroup_delay_pct",
                format!("{} is over 100", self.regroup_delay_pct),
            );
        }
        self.validate_priorities()
    }

    /// `priority_levels`, `default_priority_level`, `max_priority_wait_ms`
    /// and each `[batching.levels.N]`.
    fn validate_priorities(&self) -> Result<(), ConfigError> {
        let levels = self.priority_levels as usize;
        in_range("batching.priority_levels", levels, 1..=MAX_PRIORITY_LEVELS, "")?;
        in_range(
            "batching.default_priority_level",
            self.default_priority_level as usize,
            1..=levels,
            " (a level from 1 to batching.priority_levels)",
        )?;
        in_range(
            "batching.max_priority_wait_ms",
            usize::try_from(self.max_priority_wait_ms).unwrap_or(usize::MAX),
            0..=3_600_000,
            " (0: never promoted)",
        )?;
        for (key, level) in &self.levels {
            let n = key.parse::<usize>().ok().filter(|n| (1..=levels).contains(n));
            if n.is_none() {
                let shown: String = key.chars().take(40).collect();
                return bad(
                    "batching.levels",
                    format!("{shown:?} is not a level from 1 to batching.priority_levels ({levels})"),
                );
            }
            level.validate(key, self)?;
        }
        Ok(())
    }

    /// Level `level`'s own limits (1-based; the globals where unset).
    pub fn level(&self, level: u32) -> EffectiveLevel {
        let own = self.levels.get(&level.to_string());
        let own = |f: fn(&PriorityLevelConfig) -> Option<usize>| own.and_then(f);
        EffectiveLevel {
            max_queue_rows: own(|l| l.max_queue_rows).unwrap_or(self.max_queue_rows),
            max_batch_rows: own(|l| l.max_batch_rows).unwrap_or(self.max_batch_rows),
            timeout: self
                .levels
                .get(&level.to_string())
                .and_then(|l| l.timeout_ms)
                .map(Duration::from_millis),
        }
    }
}

/// One priority level's limits, globals filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveLevel {
    pub max_queue_rows: usize,
    pub max_batch_rows: usize,
    /// The level's default timeout; `None`: `server.request_timeout_ms`.
    pub timeout: Option<Duration>,
}

impl PriorityLevelConfig {
    fn validate(&self, key: &str, batching: &BatchingConfig) -> Result<(), ConfigError> {
        let field =
            |name: &str, message: String| bad("batching.levels", format!("[batching.levels.{key}] {name}: {message}"));
        if let Some(rows) = self.max_queue_rows
            && !(batching.max_request_rows..=batching.max_queue_rows).contains(&rows)
        {
            return field(
                "max_queue_rows",
                format!(
                    "{rows} is not from batching.max_request_rows ({}) to batching.max_queue_rows ({}): \
                     a request it cannot hold would get 429 for ever",
                    batching.max_request_rows, batching.max_queue_rows
                ),
            );
        }
        if let Some(rows) = self.max_batch_rows
            && !(1..=batching.max_batch_rows).contains(&rows)
        {
            return field(
                "max_batch_rows",
                format!(
                    "{rows} is not from 1 to batching.max_batch_rows ({})",
                    batching.max_batch_rows
                ),
            );
        }
        if let Some(ms) = self.timeout_ms
            && !(1..=3_600_000).contains(&ms)
        {
            return field("timeout_ms", format!("{ms} is not from 1 to 3600000"));
        }
        Ok(())
    }
}

/// A socket path fits `sockaddr_un` (107 bytes and a NUL) and the mode
/// is octal permission bits.
fn validate_unix_socket(
    (path_setting, path): (&'static str, Option<&std::path::Path>),
    (mode_setting, mode): (&'static str, &str),
) -> Result<(), ConfigError> {
    const MAX_SOCKET_PATH: usize = 107;
    if let Some(path) = path {
        let len = path.as_os_str().len();
        if len == 0 || len > MAX_SOCKET_PATH {
            return bad(
                path_setting,
                format!("{len} bytes: a Unix socket path is 1 to {MAX_SOCKET_PATH} bytes"),
            );
        }
    }
    if unix_socket_mode(mode).is_none() {
        let shown: String = mode.chars().take(20).collect();
        return bad(
            mode_setting,
            format!("{shown:?} is not octal permission bits such as \"660\" (at most 777)"),
        );
    }
    Ok(())
}

/// A file mode as its octal digits, given as a string (`"660"`) or as an
/// integer whose decimal digits are the octal ones (`660`: what
/// `TOKITAI_SERVER_UNIX_SOCKET_MODE=660` parses to).
fn octal_digits<'de, D: serde::Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Digits {
        Text(String),
        Number(u32),
    }
    Ok(match Digits::deserialize(de)? {
        Digits::Text(text) => text,
        Digits::Number(n) => n.to_string(),
    })
}

/// `server.unix_socket_mode` / `grpc.unix_socket_mode` as permission bits
/// (`"660"`, `"0660"`); `None` when not octal or past `0o777`.
pub fn unix_socket_mode(mode: &str) -> Option<u32> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|&m| m <= 0o777)
}

/// Most `batching.priority_levels`.
pub const MAX_PRIORITY_LEVELS: usize = 16;

/// Largest `batching.max_request_rows` (2^20): far past any body
/// `server.max_body_bytes` allows, and small enough that rows times any
/// row width times 4 bytes cannot overflow.
pub const MAX_REQUEST_ROWS: usize = 1 << 20;
/// Largest `batching.max_queue_rows` (2^22: 1.5 GiB of 96-wide f32 rows).
pub const MAX_QUEUE_ROWS: usize = 1 << 22;

impl WorkersConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let gpus = &self.gpus;
        if let Some(dup) = gpus
            .iter()
            .enumerate()
            .find_map(|(i, g)| gpus[..i].contains(g).then_some(g))
        {
            return bad("workers.gpus", format!("device {dup} is listed twice"));
        }
        in_range("workers.gpus", gpus.len(), 0..=256, " devices")?;
        in_range("workers.streams_per_gpu", self.streams_per_gpu, 1..=64, "")?;
        let backend_choice = " (0: chosen by the backend)";
        in_range("workers.count", self.count, 0..=256, backend_choice)?;
        in_range(
            "workers.threads_per_worker",
            self.threads_per_worker,
            0..=256,
            backend_choice,
        )?;
        match self.cpu_isa.missing_feature() {
            Some(feature) => bad(
                "workers.cpu_isa",
                format!(
                    "\"{}\" needs the CPU feature `{feature}`, which this CPU lacks (available: {})",
                    self.cpu_isa,
                    CpuIsa::available()
                        .iter()
                        .map(|i| i.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            None => Ok(()),
        }
    }
}

/// A type or value error in the merged document, named as `section.key`
/// when the error's position shows which setting it is (serde's message
/// alone says "unknown variant `xml`" without saying where).
fn parse_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let setting = e.span().and_then(|span| {
        let before = text.get(..span.start)?;
        let line = before.rsplit('\n').next().unwrap_or("");
        let key = line.split('=').next()?.trim();
        let section = before
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')))?;
        (!key.is_empty() && !key.starts_with('[')).then(|| format!("{section}.{key}"))
    });
    match setting {
        Some(setting) => ConfigError::Parse(format!("setting `{setting}`: {message}")),
        None => ConfigError::Parse(e.to_string()),
    }
}

/// `TOKITAI_<SECTION>_<KEY>` -> (`section`, `key`); the legacy bind variable
/// maps to `server.bind`. Other variables are not settings.
fn env_setting(name: &str) -> Option<(&'static str, String)> {
    if name == LEGACY_BIND_ENV {
        return Some(("server", "bind".to_string()));
    }
    let rest = name.strip_prefix("TOKITAI_")?;
    SECTIONS.iter().find_map(|&section| {
        let key = rest.strip_prefix(&section.to_ascii_uppercase())?.strip_prefix('_')?;
        Some((section, key.to_ascii_lowercase()))
    })
}

/// An environment value as TOML (`64`, `true`, `"x"`); anything else is a string.
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set(doc: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = doc
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(table) = entry {
        table.insert(key.to_string(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_mode_reads_as_octal_quoted_or_not() {
        let modes = [
            ("\"660\"", Some(0o660)),
            ("660", Some(0o660)),
            ("\"0600\"", Some(0o600)),
            ("888", None),
        ];
        for (raw, want) in modes {
            let loaded = Config::load(None, env(&[("TOKITAI_SERVER_UNIX_SOCKET_MODE", raw)]), &[]);
            match want {
                Some(bits) => {
                    let mode = loaded.expect(raw).server.unix_socket_mode;
                    assert_eq!(unix_socket_mode(&mode), Some(bits), "{raw}");
                }
                None => assert!(
                    loaded.unwrap_err().to_string().contains("server.unix_socket_mode"),
                    "{raw}"
                ),
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid_and_match_the_sidecar() {
        let c = Config::load(None, Vec::new(), &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.bind, "127.0.0.1:9100");
        assert_eq!(c.model.layernorm, LayerNormMode::Identity);
        assert_eq!(c.model.weight_precision, WeightPrecision::F32);
        let c = Config::load(None, env(&[("TOKITAI_MODEL_WEIGHT_PRECISION", "f16")]), &[]).unwrap();
        assert_eq!(c.model.weight_precision, WeightPrecision::F16);
        let c = Config::load(None, env(&[("TOKITAI_MODEL_WEIGHT_PRECISION", "bf16")]), &[]).unwrap();
        assert_eq!(c.model.weight_precision, WeightPrecision::Bf16);
    }

    /// `workers.cpu_isa`: every path this CPU has is accepted; a path it
    /// lacks is refused naming the setting and the missing feature.
    #[test]
    fn cpu_isa_accepts_what_the_cpu_has_and_names_what_it_lacks() {
        for isa in CpuIsa::ALL {
            let r = Config::load(None, env(&[("TOKITAI_WORKERS_CPU_ISA", isa.as_str())]), &[]);
            match isa.missing_feature() {
                None => assert_eq!(r.unwrap().workers.cpu_isa, isa),
                Some(f) => {
                    let e = r.unwrap_err().to_string();
                    assert!(e.contains("workers.cpu_isa") && e.contains(f), "{e}");
                }
            }
        }
    }

    #[test]
    fn precedence_is_file_then_env_then_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[batching]\nmax_batch_rows = 8\nmax_queue_rows = 9000\n[server]\nbind = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let e = env(&[
            ("TOKITAI_BATCHING_MAX_BATCH_ROWS", "16"),
            ("TOKITAI_MODEL_BIND_ADDR", "127.0.0.1:2"),
            ("PATH", "/bin"),
        ]);
        let c = Config::load(Some(&path), e.clone(), &[]).unwrap();
        assert_eq!((c.batching.max_batch_rows, c.batching.max_queue_rows), (16, 9000));
        assert_eq!(c.server.bind, "127.0.0.1:2");
        let cli = [("batching.max_batch_rows", toml::Value::Integer(32))];
        let c = Config::load(Some(&path), e, &cli).unwrap();
        assert_eq!(c.batching.max_batch_rows, 32);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_setting() {
        let err = |pairs: &[(&str, &str)]| Config::load(None, env(pairs), &[]).unwrap_err().to_string();
        assert!(err(&[("TOKITAI_BATCHING_MAX_ROWS", "3")]).contains("max_rows"));
        assert!(err(&[("TOKITAI_BATCHING_MAX_BATCH_ROWS", "lots")]).contains("max_batch_rows"));
        assert!(err(&[("TOKITAI_BATCHING_MAX_BATCH_ROWS", "0")]).contains("batching.max_batch_rows"));
        assert!(err(&[("TOKITAI_SERVER_BIND", "nowhere")]).contains("server.bind"));
        assert!(err(&[("TOKITAI_WORKERS_COUNT", "300")]).contains("workers.count"));
        assert!(err(&[("TOKITAI_SERVER_SEND_TIMEOUT_MS", "0")]).contains("server.send_timeout_ms"));
        assert!(err(&[("TOKITAI_SERVER_SEND_TIMEOUT_MS", "3600001")]).contains("server.send_timeout_ms"));
        let small = err(&[("TOKITAI_SERVER_MAX_PENDING_ANSWER_BYTES", "1000")]);
        assert!(small.contains("server.max_pending_answer_bytes"), "{small}");
        let c = Config::load(None, env(&[("TOKITAI_SERVER_SEND_TIMEOUT_MS", "250")]), &[]).unwrap();
        assert_eq!(c.send_timeout(), Duration::from_millis(250));
        assert!(err(&[("TOKITAI_MODEL_LAYERNORM", "both")]).contains("layernorm"));
        assert!(err(&[("TOKITAI_MODEL_WEIGHT_PRECISION", "bf8")]).contains("weight_precision"));
        assert!(err(&[("TOKITAI_WORKERS_CPU_ISA", "sse2")]).contains("workers.cpu_isa"));
        assert!(err(&[("TOKITAI_MODEL_ARCH", "/a.json")]).contains("model.checkpoint"));
        assert!(err(&[("TOKITAI_BATCHING_MAX_QUEUE_ROWS", "10")]).contains("batching.max_queue_rows"));
        assert!(err(&[("TOKITAI_LOGGING_FORMAT", "xml")]).contains("logging.format"));
        assert!(err(&[("TOKITAI_WORKERS_BACKEND", "cuda")]).contains("workers.backend"));
        assert!(err(&[("TOKITAI_WORKERS_GPUS", "[0, 0]")]).contains("workers.gpus"));
        assert!(err(&[("TOKITAI_WORKERS_STREAMS_PER_GPU", "0")]).contains("workers.streams_per_gpu"));
        assert!(err(&[("TOKITAI_GRPC_BIND", "nowhere")]).contains("grpc.bind"));
        assert!(err(&[("TOKITAI_GRPC_THREADS", "0")]).contains("grpc.threads"));
        assert!(err(&[("TOKITAI_GRPC_MAX_CONCURRENT_STREAMS", "0")]).contains("grpc.max_concurrent_streams"));
        let c = Config::load(None, env(&[("TOKITAI_GRPC_ENABLED", "false")]), &[]).unwrap();
        assert!(!c.grpc.enabled);
        assert_eq!(Config::default().grpc.bind, "127.0.0.1:9101");
    }

    #[test]
    fn settings_past_their_bounds_are_refused_naming_the_setting_and_the_bound() {
        let err = |k: &str, v: &str| Config::load(None, env(&[(k, v)]), &[]).unwrap_err().to_string();
        for (var, setting, bound) in [
            (
                "TOKITAI_BATCHING_MAX_REQUEST_ROWS",
                "batching.max_request_rows",
                "1..=1048576",
            ),
            (
                "TOKITAI_BATCHING_MAX_QUEUE_ROWS",
                "batching.max_queue_rows",
                "1..=4194304",
            ),
            (
                "TOKITAI_SERVER_MAX_BODY_BYTES",
                "server.max_body_bytes",
                "1024..=1073741824",
            ),
            (
                "TOKITAI_SERVER_REQUEST_TIMEOUT_MS",
                "server.request_timeout_ms",
                "1..=3600000",
            ),
            (
                "TOKITAI_SERVER_SHUTDOWN_TIMEOUT_SECS",
                "server.shutdown_timeout_secs",
                "0..=3600",
            ),
            (
                "TOKITAI_GRPC_HANDSHAKE_TIMEOUT_MS",
                "grpc.handshake_timeout_ms",
                "1..=60000",
            ),
            (
                "TOKITAI_GRPC_MAX_HANDSHAKING_CONNECTIONS",
                "grpc.max_handshaking_connections",
                "1..=65536",
            ),
            ("TOKITAI_WORKERS_COUNT", "workers.count", "0..=256"),
            ("TOKITAI_GRPC_THREADS", "grpc.threads", "1..=64"),
        ] {
            // i64::MAX: the largest integer TOML holds.
            let msg = err(var, "9223372036854775807");
            assert!(msg.contains(setting) && msg.contains(bound), "{var}: {msg}");
        }
        // The largest allowed values load (queue rows at least request rows).
        let at_bounds = env(&[
            ("TOKITAI_BATCHING_MAX_REQUEST_ROWS", "1048576"),
            ("TOKITAI_BATCHING_MAX_QUEUE_ROWS", "4194304"),
            ("TOKITAI_GRPC_HANDSHAKE_TIMEOUT_MS", "60000"),
        ]);
        let c = Config::load(None, at_bounds, &[]).unwrap();
        assert_eq!(c.batching.max_request_rows, MAX_REQUEST_ROWS);
        // A model's config.toml is validated by the same rules.
        let mut overlay = toml::Table::new();
        let mut batching = toml::Table::new();
        batching.insert("max_request_rows".into(), toml::Value::Integer(i64::MAX));
        overlay.insert("batching".into(), toml::Value::Table(batching));
        let msg = Config::default().layered(&overlay).unwrap_err().to_string();
        assert!(
            msg.contains("batching.max_request_rows") && msg.contains("1..=1048576"),
            "{msg}"
        );
    }

    #[test]
    fn browser_lists_are_toml_arrays_of_origins_and_host_names() {
        let e = env(&[
            (
                "TOKITAI_SERVER_ALLOWED_ORIGINS",
                r#"["https://app.example:8443", "http://localhost:3000"]"#,
            ),
            ("TOKITAI_SERVER_ALLOWED_HOSTS", r#"["engine.internal", "[fd00::1]"]"#),
        ]);
        let c = Config::load(None, e, &[]).unwrap();
        assert_eq!(
            c.server.allowed_origins,
            ["https://app.example:8443", "http://localhost:3000"]
        );
        assert_eq!(c.server.allowed_hosts, ["engine.internal", "[fd00::1]"]);
        let err = |k: &str, v: &str| Config::load(None, env(&[(k, v)]), &[]).unwrap_err().to_string();
        for bad in [
            r#"["*"]"#,
            r#"["https://a.example/"]"#,
            r#"["a.example"]"#,
            r#"["http://*.example"]"#,
        ] {
            let msg = err("TOKITAI_SERVER_ALLOWED_ORIGINS", bad);
            assert!(msg.contains("server.allowed_origins"), "{bad}: {msg}");
        }
        for bad in [r#"["a.example:80"]"#, r#"["http://a.example"]"#, r#"[""]"#] {
            let msg = err("TOKITAI_SERVER_ALLOWED_HOSTS", bad);
            assert!(msg.contains("server.allowed_hosts"), "{bad}: {msg}");
        }
        // A bare string is not a list: the loader names the setting.
        let msg = err("TOKITAI_SERVER_ALLOWED_ORIGINS", "https://a.example");
        assert!(msg.contains("allowed_origins"), "{msg}");
    }

    #[test]
    fn config_file_must_be_a_small_regular_file() {
        let err = |p: &std::path::Path| Config::load(Some(p), Vec::new(), &[]).unwrap_err().to_string();
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path();
        assert!(err(dir_path).contains("is a directory, not a regular file"));
        #[cfg(unix)]
        {
            let msg = err(std::path::Path::new("/dev/zero"));
            assert_eq!(msg, "config file /dev/zero: is a character device, not a regular file");
        }
        let big = dir_path.join("big.toml");
        std::fs::write(&big, vec![b'#'; (1 << 20) + 1]).unwrap();
        let msg = err(&big);
        assert!(
            msg.contains("big.toml") && msg.contains("larger than the 1 MiB limit"),
            "{msg}"
        );
        let bad = dir_path.join("bad.toml");
        std::fs::write(&bad, b"# \xff\n").unwrap();
        assert!(err(&bad).contains("not valid UTF-8"), "{}", err(&bad));
        let missing = dir_path.join("missing.toml");
        assert!(err(&missing).contains("missing.toml"));
        // Exactly at the cap is fine.
        let full = dir_path.join("full.toml");
        std::fs::write(&full, vec![b'#'; 1 << 20]).unwrap();
        assert_eq!(Config::load(Some(&full), Vec::new(), &[]).unwrap(), Config::default());
    }

    #[test]
    fn shipped_default_toml_is_the_built_in_default() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let c = Config::load(Some(&path), Vec::new(), &[]).unwrap();
        assert_eq!(c, Config::default());
    }
}
