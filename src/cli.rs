//! The command line: every flag is also a `SPLITSERVE_*` variable. This module
//! owns every clap type; it parses, validates and converts into the plain
//! configuration types the rest of the crate owns ([`ServerConfig`],
//! [`DiagnoseConfig`]; `probe` and `bench` come from the client crate, which
//! carries its own small binary). Nothing else in the
//! library knows clap exists.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use splitserve_client::args::{BenchArgs, Dims, ProbeArgs, parse_dims, parse_duration};

use crate::codec;
use crate::diagnose::{DiagnoseConfig, PlanShape};
use crate::engine::{EngineConfig, ModelSlot};
use crate::listen::{ListenConfig, TlsFiles};
use crate::model::{DeviceRequest, ModelSpec};
use crate::plan::{Auto, PlanRequest, ThreadPlan};
use crate::repository::{ControlMode, RepositoryConfig};
use crate::server::{Http2Config, ServerConfig};
use crate::telemetry::otel::{LogFormat, TelemetryConfig};
use crate::training::sessions::SessionConfig;
use crate::training::{AdamBetas, OptimizerKind, OptimizerSettings, TrainingConfig};

/// `--version`: what this binary was built from and against.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nlibtorch ",
    env!("SPLITSERVE_TORCH_VERSION"),
    "\nCUDA ",
    env!("SPLITSERVE_CUDA"),
    "\ncommit ",
    env!("SPLITSERVE_GIT_COMMIT"),
);

/// Exit code for a configuration that cannot run (BSD `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "splitserve",
    version,
    long_version = LONG_VERSION,
    about = "gRPC compute service for split learning and model-partition inference on libtorch",
    long_about = "splitserve serves the server half of a split neural network to unchanged \
                  splitlearn_comm clients (splitlearn.comm.ComputeService), runs the model on \
                  libtorch with a thread plan that cannot oversubscribe the CPU budget, and \
                  answers grpc.health.v1 probes."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the models over gRPC until SIGTERM or SIGINT, then drain.
    Serve(Box<ServeArgs>),
    /// Load-test any server that speaks splitlearn.comm.ComputeService (closed loop).
    Bench(Box<BenchArgs>),
    /// Show the CPU budget, libtorch's thread facts and measure libtorch, gRPC and
    /// both together across thread plans; recommend a plan.
    Diagnose(Box<DiagnoseArgs>),
    /// Check a grpc.health.v1 service: exit 0 when SERVING, 1 otherwise.
    Probe(ProbeArgs),
}

/// Everything `splitserve serve` needs; passed down whole, never split into arguments.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC server listens on, HOST:PORT (a host name is resolved).
    #[arg(long, env = "SPLITSERVE_GRPC_ADDR", default_value = "0.0.0.0:50051", value_parser = parse_addr)]
    pub grpc_addr: SocketAddr,

    /// Address of the Open Inference Protocol's HTTP/REST front-end (/v2/...,
    /// what tritonclient.http and KServe's REST clients speak); off to turn it off.
    #[arg(long, env = "SPLITSERVE_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    pub http_addr: OptionalAddr,

    /// Address of the admin sidecar: /metrics (Prometheus), /livez, /readyz,
    /// /debug/plan; off to turn it off.
    #[arg(long, env = "SPLITSERVE_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: OptionalAddr,

    /// OTLP/gRPC collector for traces (e.g. http://otel-collector:4317); falls back to
    /// OTEL_EXPORTER_OTLP_ENDPOINT. Unset: no traces are exported.
    #[arg(long, env = "SPLITSERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// A model to serve, NAME=SPEC; repeatable, the first is the default model.
    /// SPEC is a TorchScript file path, or a built-in model:
    /// `builtin:mlp:INxHIDDEN...xOUT` (e.g. builtin:mlp:512x1024x512; append
    /// `@FILE` to start from weights that --checkpoint-dir saved),
    /// `builtin:scale:K` (multiplies any tensor by K),
    /// `builtin:delay:MILLIS` (identity after sleeping, for tests),
    /// `builtin:identity` (answers its input unchanged).
    /// Without any, serves `mlp=builtin:mlp:512x1024x512`. Commas separate
    /// several (`a=a.pt,b=b.pt`, also in SPLITSERVE_MODEL), so a path with a
    /// comma cannot be named: rename or symlink it.
    #[arg(
        long = "model",
        env = "SPLITSERVE_MODEL",
        value_delimiter = ',',
        value_name = "NAME=SPEC"
    )]
    pub models: Vec<ModelSpec>,

    /// A model repository in Triton's layout: DIR/NAME/config.pbtxt (protobuf
    /// text format, platform "pytorch_libtorch") and DIR/NAME/VERSION/model.pt.
    /// Read, never written. May be combined with --model (those names stay
    /// fixed); without --model, the built-in default model is not served.
    /// See docs/model-repository.md for the fields and splitserve's parameters.
    #[arg(long, env = "SPLITSERVE_MODEL_REPOSITORY", value_name = "DIR")]
    pub model_repository: Option<PathBuf>,

    /// How the repository's models are loaded (Triton's names). none: all at
    /// start, changes need a restart. poll: all at start, then every
    /// --repository-poll-secs new, changed and removed models are loaded,
    /// reloaded (the old version serves until the new one is warm) and
    /// unloaded. explicit: only --load-model at start, then what the repository
    /// API asks (gRPC RepositoryModelLoad/Unload, HTTP POST
    /// /v2/repository/models/NAME/load and /unload).
    #[arg(
        long,
        env = "SPLITSERVE_MODEL_CONTROL_MODE",
        value_enum,
        default_value = "none"
    )]
    pub model_control_mode: ControlModeArg,

    /// Seconds between rescans of the repository in poll mode.
    #[arg(
        long,
        env = "SPLITSERVE_REPOSITORY_POLL_SECS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=86400)
    )]
    pub repository_poll_secs: u64,

    /// Explicit mode: a repository model to load at start (repeatable, or
    /// comma-separated); `*` loads every model.
    #[arg(
        long = "load-model",
        env = "SPLITSERVE_LOAD_MODEL",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub load_models: Vec<String>,

    /// Input shape for a model's warm-up forward at load, NAME=DIMS (e.g. enc=1x64x256),
    /// several inputs joined with + (pair=1x4+1x4); repeatable. The warm-up also
    /// tells the Open Inference Protocol the model's inputs and outputs. Built-in
    /// models know their own; a TorchScript model without one is loaded without
    /// a warm-up forward.
    #[arg(
        long = "warmup-shape",
        env = "SPLITSERVE_WARMUP_SHAPE",
        value_delimiter = ',',
        value_name = "NAME=DIMS"
    )]
    pub warmup_shapes: Vec<WarmupShapeArg>,

    /// Where models run: auto (the first CUDA device if there is one, else the CPU),
    /// cpu, cuda (= cuda:0) or cuda:N.
    #[arg(long, env = "SPLITSERVE_DEVICE", default_value = "auto")]
    pub device: DeviceRequest,

    /// Threads of the tokio runtime that runs gRPC (decode, validate, encode; never libtorch).
    #[arg(long, env = "SPLITSERVE_IO_THREADS", default_value_t = 2)]
    pub io_threads: usize,

    /// Inference worker threads (each runs one forward at a time): auto or a number.
    #[arg(long, env = "SPLITSERVE_WORKERS", default_value = "auto")]
    pub workers: Auto,

    /// libtorch intra-op threads used by each worker's forward: auto or a number.
    /// auto fills the CPU budget: workers x intra-op threads <= budget.
    #[arg(long, env = "SPLITSERVE_INTRA_OP_THREADS", default_value = "auto")]
    pub intra_op_threads: Auto,

    /// libtorch inter-op threads (TorchScript fork/wait), shared by all workers.
    #[arg(long, env = "SPLITSERVE_INTER_OP_THREADS", default_value_t = 1)]
    pub inter_op_threads: usize,

    /// CPU cores this process may use, e.g. the pod's limits.cpu through the
    /// downward API: 2, 1.5 or 1500m. The budget is the smallest of this, the
    /// cgroup quota, the cpuset and the cores the OS gives the process.
    #[arg(long, env = "SPLITSERVE_CPU_LIMIT", value_parser = parse_cpu)]
    pub cpu_limit: Option<f64>,

    /// Start even when workers x intra-op threads exceeds the CPU budget (logs a warning).
    #[arg(long, env = "SPLITSERVE_ALLOW_OVERSUBSCRIPTION")]
    pub allow_oversubscription: bool,

    /// Requests each model may hold waiting for a worker; one more is refused
    /// with RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "SPLITSERVE_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,

    /// Dynamic batching: requests with the same trailing shape and dtype are
    /// joined along dimension 0 into one forward of at most this many rows.
    /// N for every model, or NAME=N for one; 1 turns batching off (the default).
    #[arg(
        long,
        env = "SPLITSERVE_MAX_BATCH_SIZE",
        value_delimiter = ',',
        value_name = "[NAME=]N"
    )]
    pub max_batch_size: Vec<PerModel<usize>>,

    /// How long a worker holding a partial batch waits for more requests, in
    /// microseconds; N for every model or NAME=N for one. A batch of KV
    /// session decode steps waits instead for the sessions known to be
    /// decoding, at most this long or one decode batch's time (docs/llm.md);
    /// 0 (the default) never waits.
    #[arg(
        long,
        env = "SPLITSERVE_BATCH_TIMEOUT_US",
        value_delimiter = ',',
        value_name = "[NAME=]MICROS"
    )]
    pub batch_timeout_us: Vec<PerModel<u64>>,

    /// Bytes of activations kept for ComputeBackward (input and output of every
    /// `training_mode` forward, summed; e.g. 1GiB, 512Mi, 100000000); beyond it
    /// the least recently used are evicted and their backward answers NOT_FOUND.
    #[arg(long, env = "SPLITSERVE_ACTIVATION_CACHE_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub activation_cache_bytes: u64,

    /// One model's share of --activation-cache-bytes, NAME=BYTES (e.g.
    /// top=768MiB); repeatable. Models without one split what is left equally.
    /// A model's training forwards evict only its own activations.
    #[arg(
        long,
        env = "SPLITSERVE_ACTIVATION_MODEL_BYTES",
        value_delimiter = ',',
        value_name = "NAME=BYTES",
        value_parser = parse_model_bytes
    )]
    pub activation_model_bytes: Vec<(String, u64)>,

    /// How long a `training_mode` forward's activations wait for their
    /// ComputeBackward before they are released (e.g. 60s, 500ms).
    #[arg(long, env = "SPLITSERVE_ACTIVATION_TTL", default_value = "60s", value_parser = parse_duration)]
    pub activation_ttl: Duration,

    /// A model whose KV caches stay on the server between decode steps;
    /// repeatable. A Compute with use_cache=true and no past opens a session and
    /// is answered with a small handle in present_key_values; sending the handle
    /// back as past_key_values continues it (docs/llm.md). Needs the KV signature.
    #[arg(
        long = "kv-sessions",
        env = "SPLITSERVE_KV_SESSIONS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub kv_sessions: Vec<String>,

    /// Bytes of KV caches held for all sessions together (e.g. 2GiB); beyond it
    /// the least recently used idle sessions are ended, and their next step is
    /// FAILED_PRECONDITION (restart from the prompt).
    #[arg(long, env = "SPLITSERVE_KV_CACHE_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub kv_cache_bytes: u64,

    /// A KV session with no step for this long is ended (e.g. 10m, 90s).
    #[arg(long, env = "SPLITSERVE_KV_SESSION_TTL", default_value = "5m", value_parser = parse_duration)]
    pub kv_session_ttl: Duration,

    /// Most positions of a KV session's prompt computed in one forward; longer
    /// prompts run in chunks between decode batches (while sessions decode, a
    /// chunk is also kept below one decode batch's time).
    #[arg(long, env = "SPLITSERVE_KV_PREFILL_CHUNK", default_value_t = 512, value_parser = clap::value_parser!(i64).range(1..))]
    pub kv_prefill_chunk: i64,

    /// Optimizer applied when ComputeBackward carries a learning_rate: sgd (the
    /// default) or adam, for every model or NAME=adam for one. The learning rate
    /// itself comes with each request.
    #[arg(
        long,
        env = "SPLITSERVE_OPTIMIZER",
        value_delimiter = ',',
        value_name = "[NAME=]sgd|adam"
    )]
    pub optimizer: Vec<PerModel<OptimizerKind>>,

    /// SGD momentum as PyTorch defines it (0 = plain SGD, the default); N for
    /// every model or NAME=N for one.
    #[arg(
        long,
        env = "SPLITSERVE_MOMENTUM",
        value_delimiter = ',',
        value_name = "[NAME=]F"
    )]
    pub momentum: Vec<PerModel<f64>>,

    /// L2 penalty added to the gradient before the update (SGD and Adam, as
    /// PyTorch's weight_decay; default 0); N for every model or NAME=N for one.
    #[arg(
        long,
        env = "SPLITSERVE_WEIGHT_DECAY",
        value_delimiter = ',',
        value_name = "[NAME=]F"
    )]
    pub weight_decay: Vec<PerModel<f64>>,

    /// Adam's (beta1, beta2), written B1:B2 (default 0.9:0.999); for every model
    /// or NAME=B1:B2 for one.
    #[arg(
        long,
        env = "SPLITSERVE_ADAM_BETAS",
        value_delimiter = ',',
        value_name = "[NAME=]B1:B2"
    )]
    pub adam_betas: Vec<PerModel<AdamBetas>>,

    /// Adam's epsilon, added to the denominator (default 1e-8); N or NAME=N.
    #[arg(
        long,
        env = "SPLITSERVE_ADAM_EPS",
        value_delimiter = ',',
        value_name = "[NAME=]F"
    )]
    pub adam_eps: Vec<PerModel<f64>>,

    /// Directory where trained parameters are saved, on shutdown and every
    /// --checkpoint-every steps: NAME.pt for a TorchScript model (serve it again
    /// with --model NAME=DIR/NAME.pt), NAME.safetensors for builtin:mlp (serve it
    /// again with builtin:mlp:WIDTHS@DIR/NAME.safetensors).
    #[arg(long, env = "SPLITSERVE_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,

    /// Also save a model's checkpoint after every N of its optimizer steps;
    /// 0 (the default) saves only on shutdown.
    #[arg(long, env = "SPLITSERVE_CHECKPOINT_EVERY", default_value_t = 0)]
    pub checkpoint_every: u64,

    /// Largest tensor a request may carry, in elements.
    #[arg(long, env = "SPLITSERVE_MAX_ELEMENTS", default_value_t = 1 << 26)]
    pub max_elements: u64,

    /// Largest gRPC message accepted or sent (splitlearn_comm's default is
    /// 100 MiB; units as 100MiB, 64Mi, 1000000); larger requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SPLITSERVE_MAX_MESSAGE_BYTES", default_value = "100MiB", value_parser = parse_size)]
    pub max_message_bytes: usize,

    /// A worker busy on one job for longer than this marks the process not live
    /// (e.g. 60s, 500ms, 2m).
    #[arg(long, env = "SPLITSERVE_STALL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub stall_timeout: Duration,

    /// After SIGTERM/SIGINT, how long queued and in-flight requests get to finish.
    #[arg(long, env = "SPLITSERVE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log line format on stderr.
    #[arg(long, env = "SPLITSERVE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormatArg,

    /// One structured log line per request (target splitserve::access): model,
    /// protocol, method, code, duration, payload bytes in and out, trace id.
    #[arg(long, env = "SPLITSERVE_ACCESS_LOG")]
    pub access_log: bool,

    /// A model whose parameters ComputeBackward's learning_rate may update;
    /// repeatable. Other models only answer gradients (a backward with a
    /// learning_rate is PERMISSION_DENIED), so no client can change their weights.
    #[arg(
        long = "trainable",
        env = "SPLITSERVE_TRAINABLE",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub trainable: Vec<String>,

    /// The learning rate a ComputeBackward without one uses, on trainable models
    /// only: N for every trainable model or NAME=N for one. Unchanged
    /// splitlearn_comm clients send none, so this is how they train.
    #[arg(
        long,
        env = "SPLITSERVE_LEARNING_RATE",
        value_delimiter = ',',
        value_name = "[NAME=]F"
    )]
    pub learning_rate: Vec<PerModel<f64>>,

    /// Complete checkpoints kept per model in --checkpoint-dir; older ones are removed.
    #[arg(long, env = "SPLITSERVE_CHECKPOINT_KEEP", default_value_t = 3)]
    pub checkpoint_keep: usize,

    /// When a model has checkpoints in --checkpoint-dir and none of them loads,
    /// start from the model's own weights (the unloadable ones are renamed
    /// `unloadable-step-*`) instead of refusing to start.
    #[arg(long, env = "SPLITSERVE_CHECKPOINT_START_FRESH")]
    pub checkpoint_start_fresh: bool,

    /// Connections older than this get a GOAWAY (in-flight requests finish), so
    /// clients reconnect and new pods get their share of the load; 0 = never.
    #[arg(long, env = "SPLITSERVE_MAX_CONNECTION_AGE", default_value = "0", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// How long requests on a connection past --max-connection-age may take to finish.
    #[arg(long, env = "SPLITSERVE_MAX_CONNECTION_AGE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,

    /// Largest learning_rate a ComputeBackward may ask for; larger is INVALID_ARGUMENT.
    #[arg(long, env = "SPLITSERVE_MAX_LEARNING_RATE", default_value_t = 10.0)]
    pub max_learning_rate: f64,

    /// Before each optimizer step, accumulated gradients whose total L2 norm is
    /// above this are scaled down to it (torch.nn.utils.clip_grad_norm_), so
    /// that no single request can push the weights or Adam's moments out of range.
    #[arg(long, env = "SPLITSERVE_MAX_GRAD_NORM", default_value_t = 100.0)]
    pub max_grad_norm: f64,

    /// Largest accumulation_step a ComputeBackward may ask for; larger is INVALID_ARGUMENT.
    #[arg(
        long,
        env = "SPLITSERVE_MAX_ACCUMULATION_STEPS",
        default_value_t = 1024
    )]
    pub max_accumulation_steps: u32,

    /// PEM certificate chain: the gRPC port speaks TLS only (with --tls-key).
    /// Re-read when the file changes (see --credentials-reload-interval).
    #[arg(long, env = "SPLITSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SPLITSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: clients must present a certificate it verifies (mTLS).
    #[arg(long, env = "SPLITSERVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// PEM certificate chain for the admin port (/metrics, /livez, /readyz,
    /// /debug/plan), which otherwise stays plain HTTP for the kubelet and Prometheus.
    #[arg(long, env = "SPLITSERVE_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,

    /// PEM private key of --admin-tls-cert.
    #[arg(long, env = "SPLITSERVE_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,

    /// Bearer tokens, one per line: `TOKEN SCOPE[,SCOPE]` with scopes infer and
    /// train (docs/security.md). Every RPC but grpc.health.v1 then needs
    /// `authorization: Bearer TOKEN`. Re-read when the file changes.
    #[arg(long, env = "SPLITSERVE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// How often certificate and token files are checked for changes.
    #[arg(long, env = "SPLITSERVE_CREDENTIALS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub credentials_reload_interval: Duration,

    /// Established connections per client port (gRPC, HTTP) at most; more are
    /// closed at once. Default: what the file descriptor limit (ulimit -n)
    /// leaves after a reserve for the admin port and files, split among the
    /// ports, at most 1024; a value that does not fit is refused at start.
    #[arg(long, env = "SPLITSERVE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Sockets per client port still in their TLS handshake or before their
    /// first request bytes, at most; when full, the oldest is closed for the
    /// new one. Default: an eighth of a port's descriptors (4 to 128).
    #[arg(long, env = "SPLITSERVE_MAX_PENDING_CONNECTIONS")]
    pub max_pending_connections: Option<usize>,

    /// HTTP/2 streams (concurrent RPCs) one connection may open.
    #[arg(long, env = "SPLITSERVE_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub max_concurrent_streams: u32,

    /// A request whose body has not fully arrived this long after its headers
    /// is answered DEADLINE_EXCEEDED and its stream freed.
    #[arg(long, env = "SPLITSERVE_REQUEST_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_body_timeout: Duration,

    /// Interval of HTTP/2 keepalive pings on idle connections (0 = none).
    #[arg(long, env = "SPLITSERVE_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// A connection that does not answer a keepalive ping within this is closed.
    #[arg(long, env = "SPLITSERVE_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// A connection with no request in flight for this long is closed (0 = never).
    #[arg(long, env = "SPLITSERVE_IDLE_CONNECTION_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_connection_timeout: Duration,

    /// A new socket must finish its TLS handshake and send its first request
    /// bytes (the HTTP/2 preface, or the start of an HTTP/1.1 request) within
    /// this, or it is closed.
    #[arg(long, alias = "tls-handshake-timeout", env = "SPLITSERVE_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// An HTTP/1.1 request head (request line and headers) must arrive within
    /// this after its first byte, or the connection is closed; also how long
    /// an HTTP/1.1 keep-alive connection waits for its next request.
    #[arg(long, env = "SPLITSERVE_HTTP_HEADER_READ_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub http_header_read_timeout: Duration,

    /// A connection whose client reads nothing of a reply for this long is
    /// closed and the reply's memory released.
    #[arg(long, env = "SPLITSERVE_WRITE_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_stall_timeout: Duration,

    /// Memory for request messages queued or in flight, in bytes, reserved from
    /// the size each message claims before any of it is read; beyond it new
    /// requests get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "SPLITSERVE_MAX_INFLIGHT_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub max_inflight_bytes: u64,

    /// Most bytes of --max-inflight-bytes that one HTTP connection's request
    /// bodies may hold (bodies are reserved as they arrive); default: a quarter
    /// of --max-inflight-bytes, at least --max-message-bytes.
    #[arg(long, env = "SPLITSERVE_MAX_INFLIGHT_BYTES_PER_CONNECTION", value_parser = parse_bytes)]
    pub max_inflight_bytes_per_connection: Option<u64>,

    /// Bytes a second an HTTP request body must average once
    /// --http-body-rate-grace has passed, or it is cut with 400; 0: off.
    #[arg(long, env = "SPLITSERVE_HTTP_MIN_BODY_RATE", default_value = "16KiB", value_parser = parse_bytes)]
    pub http_min_body_rate: u64,

    /// Time an HTTP request body gets before --http-min-body-rate applies.
    #[arg(long, env = "SPLITSERVE_HTTP_BODY_RATE_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub http_body_rate_grace: Duration,

    /// Most bytes a zlib payload may inflate to; default: --max-message-bytes.
    #[arg(long, env = "SPLITSERVE_MAX_DECOMPRESSED_BYTES", value_parser = parse_size)]
    pub max_decompressed_bytes: Option<usize>,
}

impl ServeArgs {
    /// Defaults for embedding and tests: what `splitserve serve` with no flags and
    /// no environment would use, with the given models.
    pub fn with_models(models: &[&str]) -> Result<Self, ConfigError> {
        let mut argv = vec!["splitserve".to_string(), "serve".to_string()];
        for m in models {
            argv.push("--model".into());
            argv.push((*m).to_string());
        }
        let cli = Cli::try_parse_from(argv).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        match cli.command {
            Command::Serve(args) => Ok(*args),
            _ => Err(ConfigError::Invalid("not a serve command line".into())),
        }
    }

    /// The models to load: the flags', or the built-in default MLP.
    pub fn model_specs(&self) -> Vec<ModelSpec> {
        if self.models.is_empty() && self.model_repository.is_none() {
            vec![ModelSpec::default_mlp()]
        } else {
            self.models.clone()
        }
    }

    /// What the telemetry set-up needs before the rest is validated, so that
    /// even a configuration error is logged in the requested format.
    pub fn telemetry_config(&self) -> TelemetryConfig {
        TelemetryConfig {
            log_format: self.log_format.into(),
            access_log: self.access_log,
            otlp_endpoint: self.otlp_endpoint.clone(),
        }
    }

    /// The thread-plan request these flags make.
    pub fn plan_request(&self) -> PlanRequest {
        PlanRequest {
            cpu_limit: self.cpu_limit,
            io_threads: self.io_threads,
            workers: self.workers,
            intra_op_threads: self.intra_op_threads,
            inter_op_threads: self.inter_op_threads,
            allow_oversubscription: self.allow_oversubscription,
            cuda: matches!(self.device, DeviceRequest::Cuda(_)),
            auto_device: matches!(self.device, DeviceRequest::Auto),
        }
    }

    /// Validates the flags and builds the server's configuration, with the
    /// thread plan fitted into this process's CPU budget.
    pub fn into_config(self) -> Result<ServerConfig, ConfigError> {
        self.validate()?;
        let threads = self.plan_request();
        let plan =
            ThreadPlan::from_request(&threads).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let specs = self.model_specs();
        for name in &self.trainable {
            if PerModel::resolve(&self.learning_rate, name).is_none() {
                tracing::warn!(
                    model = %name,
                    "model {name:?} is trainable but has no --learning-rate: a ComputeBackward \
                     without learning_rate (every unchanged splitlearn_comm client) returns \
                     gradients and never steps its parameters; set --learning-rate {name}=F \
                     to train it"
                );
            }
        }
        let training = TrainingConfig {
            names: specs.iter().map(|m| m.name.clone()).collect(),
            cache_bytes: self.activation_cache_bytes,
            ttl: self.activation_ttl,
            optimizers: specs.iter().map(|m| self.optimizer_for(&m.name)).collect(),
            checkpoint_dir: self.checkpoint_dir.clone(),
            checkpoint_every: self.checkpoint_every,
            max_learning_rate: self.max_learning_rate,
            max_accumulation_steps: self.max_accumulation_steps,
            learning_rates: specs
                .iter()
                .map(|m| {
                    self.trainable
                        .contains(&m.name)
                        .then(|| PerModel::resolve(&self.learning_rate, &m.name))
                        .flatten()
                })
                .collect(),
            checkpoint_keep: self.checkpoint_keep,
            kv_sessions: specs
                .iter()
                .map(|m| self.kv_sessions.contains(&m.name))
                .collect(),
            sessions: SessionConfig {
                max_bytes: self.kv_cache_bytes,
                ttl: self.kv_session_ttl,
                prefill_chunk: self.kv_prefill_chunk,
            },
            max_grad_norm: self.max_grad_norm,
            model_cache_bytes: self.activation_model_bytes.clone(),
            checkpoint_start_fresh: self.checkpoint_start_fresh,
        };
        let models = specs
            .into_iter()
            .map(|mut spec| {
                let (max_batch, batch_timeout) = self.batching_for(&spec.name);
                spec.warmup = self.warmup_shape_for(&spec.name);
                ModelSlot {
                    trainable: self.trainable.contains(&spec.name),
                    max_batch,
                    batch_timeout,
                    ..ModelSlot::new(spec)
                }
            })
            .collect();
        Ok(ServerConfig {
            grpc_addr: self.grpc_addr,
            metrics_addr: self.metrics_addr.0,
            http_addr: self.http_addr.0,
            telemetry: self.telemetry_config(),
            threads,
            engine: EngineConfig {
                models,
                device: self.device,
                plan,
                queue_capacity: self.queue_capacity,
                training,
            },
            limits: codec::Limits {
                max_elements: self.max_elements,
                max_decompressed_bytes: self
                    .max_decompressed_bytes
                    .unwrap_or(self.max_message_bytes),
            },
            listen: ListenConfig {
                tls: self
                    .tls_cert
                    .clone()
                    .zip(self.tls_key.clone())
                    .map(|(cert, key)| TlsFiles {
                        cert,
                        key,
                        client_ca: self.tls_client_ca.clone(),
                    }),
                max_connections: self.max_connections,
                max_pending: self.max_pending_connections,
                handshake_timeout: self.handshake_timeout,
                idle_timeout: (!self.idle_connection_timeout.is_zero())
                    .then_some(self.idle_connection_timeout),
                write_stall_timeout: Some(self.write_stall_timeout),
                reload_interval: self.credentials_reload_interval,
            },
            admin_tls: self
                .admin_tls_cert
                .clone()
                .zip(self.admin_tls_key.clone())
                .map(|(cert, key)| TlsFiles {
                    cert,
                    key,
                    client_ca: None,
                }),
            auth_token_file: self.auth_token_file.clone(),
            http2: Http2Config {
                max_concurrent_streams: self.max_concurrent_streams,
                keepalive_interval: (!self.http2_keepalive_interval.is_zero())
                    .then_some(self.http2_keepalive_interval),
                keepalive_timeout: self.http2_keepalive_timeout,
                request_body_timeout: self.request_body_timeout,
                max_connection_age: (!self.max_connection_age.is_zero())
                    .then_some(self.max_connection_age),
                max_connection_age_grace: self.max_connection_age_grace,
            },
            http_header_read_timeout: self.http_header_read_timeout,
            max_inflight_bytes: self.max_inflight_bytes,
            max_message_bytes: self.max_message_bytes,
            http_body: crate::http::BodyLimits {
                min_rate: self.http_min_body_rate,
                rate_grace: self.http_body_rate_grace,
                per_connection: self.max_inflight_bytes_per_connection.unwrap_or(
                    (self.max_inflight_bytes / 4)
                        .max(self.max_message_bytes as u64)
                        .min(self.max_inflight_bytes),
                ),
            },
            stall_timeout: self.stall_timeout,
            shutdown_grace: self.shutdown_grace,
            repository: self.model_repository.clone().map(|root| RepositoryConfig {
                root,
                mode: self.model_control_mode.into(),
                poll_every: Duration::from_secs(self.repository_poll_secs),
                load_models: self.load_models.clone(),
            }),
        })
    }

    /// Checks what clap cannot: unique names, per-model options naming real models.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.model_repository {
            Some(dir) if !dir.is_dir() => {
                return Err(ConfigError::Invalid(format!(
                    "--model-repository {}: not a directory",
                    dir.display()
                )));
            }
            None if self.model_control_mode != ControlModeArg::None => {
                return Err(ConfigError::Invalid(
                    "--model-control-mode poll or explicit needs --model-repository".into(),
                ));
            }
            _ => {}
        }
        if !self.load_models.is_empty() && self.model_control_mode != ControlModeArg::Explicit {
            return Err(ConfigError::Invalid(
                "--load-model applies to --model-control-mode explicit only (the other modes load every model)".into(),
            ));
        }
        let models = self.model_specs();
        for (i, m) in models.iter().enumerate() {
            if models[..i].iter().any(|o| o.name == m.name) {
                return Err(ConfigError::Invalid(format!(
                    "model name {:?} is given twice to --model",
                    m.name
                )));
            }
        }
        let known = |name: &str| models.iter().any(|m| m.name == name);
        for w in &self.warmup_shapes {
            if !known(&w.name) {
                return Err(ConfigError::Invalid(format!(
                    "--warmup-shape names model {:?}, which no --model defines",
                    w.name
                )));
            }
            for dims in &w.dims {
                crate::model::check_warmup_shape(dims)
                    .map_err(|e| ConfigError::Invalid(format!("--warmup-shape {}: {e}", w.name)))?;
            }
        }
        for name in self
            .max_batch_size
            .iter()
            .filter_map(|p| p.model.as_deref())
            .chain(
                self.batch_timeout_us
                    .iter()
                    .filter_map(|p| p.model.as_deref()),
            )
        {
            if !known(name) {
                return Err(ConfigError::Invalid(format!(
                    "a batching option names model {name:?}, which no --model defines"
                )));
            }
        }
        if self.max_batch_size.iter().any(|p| p.value == 0) {
            return Err(ConfigError::Invalid(
                "--max-batch-size must be at least 1".into(),
            ));
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::Invalid(
                "--queue-capacity must be at least 1".into(),
            ));
        }
        if self.io_threads == 0 {
            return Err(ConfigError::Invalid(
                "--io-threads must be at least 1".into(),
            ));
        }
        if self.inter_op_threads == 0 {
            return Err(ConfigError::Invalid(
                "--inter-op-threads must be at least 1".into(),
            ));
        }
        if let Some(limit) = self.cpu_limit {
            if !(limit > 0.0 && limit.is_finite()) {
                return Err(ConfigError::Invalid(format!(
                    "--cpu-limit must be a positive number of cores, not {limit}"
                )));
            }
        }
        for name in &self.trainable {
            if !known(name) {
                return Err(ConfigError::Invalid(format!(
                    "--trainable names model {:?}, which no --model defines",
                    codec::clip(name)
                )));
            }
        }
        for lr in &self.learning_rate {
            if let Some(name) = &lr.model {
                if !self.trainable.contains(name) {
                    return Err(ConfigError::Invalid(format!(
                        "--learning-rate names model {:?}, which --trainable does not list",
                        codec::clip(name)
                    )));
                }
            }
            if !(lr.value > 0.0 && lr.value.is_finite() && lr.value <= self.max_learning_rate) {
                return Err(ConfigError::Invalid(format!(
                    "--learning-rate must be a positive number at most --max-learning-rate {}, not {}",
                    self.max_learning_rate, lr.value
                )));
            }
        }
        if self.checkpoint_keep == 0 {
            return Err(ConfigError::Invalid(
                "--checkpoint-keep must be at least 1".into(),
            ));
        }
        if !(self.max_learning_rate > 0.0 && self.max_learning_rate.is_finite()) {
            return Err(ConfigError::Invalid(format!(
                "--max-learning-rate must be a positive number, not {}",
                self.max_learning_rate
            )));
        }
        if self.max_accumulation_steps == 0 {
            return Err(ConfigError::Invalid(
                "--max-accumulation-steps must be at least 1".into(),
            ));
        }
        if self.max_connections == Some(0)
            || self.max_pending_connections == Some(0)
            || self.max_concurrent_streams == 0
        {
            return Err(ConfigError::Invalid(
                "--max-connections, --max-pending-connections and --max-concurrent-streams must be at least 1".into(),
            ));
        }
        if self.request_body_timeout.is_zero()
            || self.credentials_reload_interval.is_zero()
            || self.handshake_timeout.is_zero()
            || self.http_header_read_timeout.is_zero()
            || self.write_stall_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "--request-body-timeout, --credentials-reload-interval, --handshake-timeout, \
                 --http-header-read-timeout and --write-stall-timeout must be longer than 0"
                    .into(),
            ));
        }
        if self.max_inflight_bytes < self.max_message_bytes as u64 + 5 {
            return Err(ConfigError::Invalid(format!(
                "--max-inflight-bytes {} cannot hold one message of --max-message-bytes {}",
                self.max_inflight_bytes, self.max_message_bytes
            )));
        }
        if self.max_inflight_bytes_per_connection == Some(0) {
            return Err(ConfigError::Invalid(
                "--max-inflight-bytes-per-connection 0 would refuse every HTTP request body".into(),
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(format!(
                "--max-message-bytes {} is below the 1024-byte minimum",
                self.max_message_bytes
            )));
        }
        self.validate_training(&known)
    }

    /// The split-training flags: model names that exist, values in range.
    fn validate_training(&self, known: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
        let named = self
            .optimizer
            .iter()
            .filter_map(|p| p.model.as_deref())
            .chain(self.momentum.iter().filter_map(|p| p.model.as_deref()))
            .chain(self.weight_decay.iter().filter_map(|p| p.model.as_deref()))
            .chain(self.adam_betas.iter().filter_map(|p| p.model.as_deref()))
            .chain(self.adam_eps.iter().filter_map(|p| p.model.as_deref()));
        for name in named {
            if !known(name) {
                return Err(ConfigError::Invalid(format!(
                    "an optimizer option names model {name:?}, which no --model defines"
                )));
            }
        }
        if let Some(m) = self
            .momentum
            .iter()
            .find(|p| !(0.0..1.0).contains(&p.value))
        {
            return Err(ConfigError::Invalid(format!(
                "--momentum must be in [0, 1), not {}",
                m.value
            )));
        }
        if let Some(w) = self
            .weight_decay
            .iter()
            .find(|p| !(p.value >= 0.0 && p.value.is_finite()))
        {
            return Err(ConfigError::Invalid(format!(
                "--weight-decay must be a finite number >= 0, not {}",
                w.value
            )));
        }
        if let Some(e) = self
            .adam_eps
            .iter()
            .find(|p| !(p.value > 0.0 && p.value.is_finite()))
        {
            return Err(ConfigError::Invalid(format!(
                "--adam-eps must be a positive number, not {}",
                e.value
            )));
        }
        if let Some(name) = self
            .kv_sessions
            .iter()
            .find(|n| !self.model_specs().iter().any(|m| &&m.name == n))
        {
            return Err(ConfigError::Invalid(format!(
                "--kv-sessions names model {name:?}, which no --model defines"
            )));
        }
        if self.kv_cache_bytes == 0 || self.kv_session_ttl.is_zero() {
            return Err(ConfigError::Invalid(
                "--kv-cache-bytes and --kv-session-ttl must be above 0".into(),
            ));
        }
        if self.activation_cache_bytes == 0 {
            return Err(ConfigError::Invalid(
                "--activation-cache-bytes must be at least 1".into(),
            ));
        }
        if !(self.max_grad_norm > 0.0 && self.max_grad_norm.is_finite()) {
            return Err(ConfigError::Invalid(format!(
                "--max-grad-norm must be a positive number, not {}",
                self.max_grad_norm
            )));
        }
        let mut shares = 0u64;
        for (name, bytes) in &self.activation_model_bytes {
            if !known(name) {
                return Err(ConfigError::Invalid(format!(
                    "--activation-model-bytes names model {:?}, which no --model defines",
                    codec::clip(name)
                )));
            }
            shares = shares.saturating_add(*bytes);
        }
        if shares > self.activation_cache_bytes {
            return Err(ConfigError::Invalid(format!(
                "--activation-model-bytes shares add up to {shares} bytes, more than \
                 --activation-cache-bytes {}",
                self.activation_cache_bytes
            )));
        }
        if self.activation_ttl.is_zero() {
            return Err(ConfigError::Invalid(
                "--activation-ttl must be longer than 0".into(),
            ));
        }
        Ok(())
    }

    /// The optimizer settings that apply to one model: its own, else the global ones.
    pub fn optimizer_for(&self, model: &str) -> OptimizerSettings {
        let defaults = OptimizerSettings::default();
        OptimizerSettings {
            kind: PerModel::resolve(&self.optimizer, model).unwrap_or(defaults.kind),
            momentum: PerModel::resolve(&self.momentum, model).unwrap_or(defaults.momentum),
            weight_decay: PerModel::resolve(&self.weight_decay, model)
                .unwrap_or(defaults.weight_decay),
            betas: PerModel::resolve(&self.adam_betas, model).unwrap_or(defaults.betas),
            eps: PerModel::resolve(&self.adam_eps, model).unwrap_or(defaults.eps),
        }
    }

    /// The batching limits that apply to one model: its own, else the global one.
    pub fn batching_for(&self, model: &str) -> (usize, Duration) {
        let max = PerModel::resolve(&self.max_batch_size, model).unwrap_or(1);
        let us = PerModel::resolve(&self.batch_timeout_us, model).unwrap_or(0);
        (max, Duration::from_micros(us))
    }

    /// The warm-up shape given for a model, if any.
    pub fn warmup_shape_for(&self, model: &str) -> Option<Vec<Vec<i64>>> {
        self.warmup_shapes
            .iter()
            .rev()
            .find(|w| w.name == model)
            .map(|w| w.dims.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One readable sentence naming the offending values.
    #[error("{0}")]
    Invalid(String),
}

/// `--model-control-mode`, as clap lists its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ControlModeArg {
    None,
    Poll,
    Explicit,
}

impl From<ControlModeArg> for ControlMode {
    fn from(m: ControlModeArg) -> ControlMode {
        match m {
            ControlModeArg::None => ControlMode::None,
            ControlModeArg::Poll => ControlMode::Poll,
            ControlModeArg::Explicit => ControlMode::Explicit,
        }
    }
}

/// `--log-format`, as clap lists its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> LogFormat {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// `NAME=DIMS` from `--warmup-shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupShapeArg {
    pub name: String,
    /// One shape per input.
    pub dims: Vec<Vec<i64>>,
}

impl FromStr for WarmupShapeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, dims) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=DIMS like enc=1x64x256, got {s:?}"))?;
        let dims = dims.split('+').map(parse_dims).collect::<Result<_, _>>()?;
        Ok(WarmupShapeArg {
            name: name.trim().to_string(),
            dims,
        })
    }
}

/// A value for every model (`N`) or for one (`NAME=N`).
#[derive(Debug, Clone, PartialEq)]
pub struct PerModel<T> {
    pub model: Option<String>,
    pub value: T,
}

impl<T: FromStr + Copy> PerModel<T> {
    /// The model's own value wins over the global one; the last flag wins among equals.
    fn resolve(list: &[PerModel<T>], model: &str) -> Option<T> {
        list.iter()
            .rev()
            .find(|p| p.model.as_deref() == Some(model))
            .or_else(|| list.iter().rev().find(|p| p.model.is_none()))
            .map(|p| p.value)
    }
}

impl<T: FromStr> FromStr for PerModel<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (model, value) = match s.split_once('=') {
            Some((m, v)) => (Some(m.trim().to_string()), v),
            None => (None, s),
        };
        let value = value
            .trim()
            .parse::<T>()
            .map_err(|_| format!("expected a value or NAME=value, got {s:?}"))?;
        Ok(PerModel { model, value })
    }
}

/// An address that may be turned off: HOST:PORT, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl FromStr for OptionalAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "" => Ok(OptionalAddr(None)),
            _ => parse_addr(s).map(|a| OptionalAddr(Some(a))),
        }
    }
}

/// HOST:PORT, the host an IP address or a name (resolved now, first address).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !s.contains(':') {
        return Err(format!("expected HOST:PORT like 0.0.0.0:50051, got {s:?}"));
    }
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// A byte count: a plain number, or with a unit: k/K/KB, M/MB, G/GB, T/TB
/// (powers of 1000) or Ki/KiB, Mi/MiB, Gi/GiB, Ti/TiB (powers of 1024), as
/// Kubernetes writes them; `B` alone is bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("expected a size like 1GiB, 512Mi or 1000000, got {s:?}"))?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "KB" | "kB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "Ti" | "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use B, K, M, G, T, Ki, Mi, Gi or Ti)"
            ));
        }
    };
    let bytes = (value * scale).round();
    if !(bytes.is_finite() && bytes >= 0.0 && bytes <= u64::MAX as f64) {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// `NAME=BYTES`, the bytes as [`parse_bytes`] reads them.
fn parse_model_bytes(s: &str) -> Result<(String, u64), String> {
    match s.split_once('=') {
        Some((name, bytes)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), parse_bytes(bytes)?))
        }
        _ => Err(format!("expected NAME=BYTES like top=512MiB, got {s:?}")),
    }
}

/// [`parse_bytes`] for sizes held in memory.
pub fn parse_size(s: &str) -> Result<usize, String> {
    parse_bytes(s)
        .and_then(|b| usize::try_from(b).map_err(|_| format!("size {s:?} is out of range")))
}

/// CPU cores as Kubernetes writes them: `2`, `1.5` or `1500m` (millicores).
pub fn parse_cpu(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let cores = match t.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().map(|m| m / 1000.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("expected CPU cores like 2, 1.5 or 1500m, got {s:?}"))?;
    if !(cores > 0.0 && cores.is_finite()) {
        return Err(format!("CPU cores must be a positive number, not {s:?}"));
    }
    Ok(cores)
}

#[derive(Debug, Clone, Args)]
pub struct DiagnoseArgs {
    /// Model to measure: a TorchScript file or a built-in spec (builtin:mlp:512x1024x512).
    #[arg(
        long,
        env = "SPLITSERVE_DIAGNOSE_MODEL",
        default_value = "builtin:mlp:512x1024x512"
    )]
    pub model: String,

    /// Input shape of one request, e.g. 1x512 or 1x64x256.
    #[arg(long, env = "SPLITSERVE_DIAGNOSE_SHAPE", default_value = "1x512")]
    pub shape: Dims,

    /// How long each measurement runs.
    #[arg(long, env = "SPLITSERVE_DIAGNOSE_DURATION", default_value = "3s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Concurrent clients for the gRPC measurements.
    #[arg(long, env = "SPLITSERVE_DIAGNOSE_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,

    /// Plans to measure, WxT (workers x intra-op threads), comma-separated.
    /// Default: every split of the budget plus one oversubscribed plan.
    #[arg(long, env = "SPLITSERVE_DIAGNOSE_PLANS", value_delimiter = ',')]
    pub plans: Vec<PlanShape>,

    /// Runs of each gRPC measurement; their spread tells a busy machine apart
    /// from a real difference between plans.
    #[arg(long, env = "SPLITSERVE_DIAGNOSE_REPEATS", default_value_t = 3)]
    pub repeats: usize,

    /// CPU cores this process may use (as `serve --cpu-limit`: 2, 1.5 or 1500m).
    #[arg(long, env = "SPLITSERVE_CPU_LIMIT", value_parser = parse_cpu)]
    pub cpu_limit: Option<f64>,

    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

impl DiagnoseArgs {
    pub fn into_config(self) -> DiagnoseConfig {
        DiagnoseConfig {
            model: self.model,
            shape: self.shape.0,
            duration: self.duration,
            concurrency: self.concurrency,
            plans: self.plans,
            repeats: self.repeats,
            cpu_limit: self.cpu_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_model_values_prefer_the_named_model() {
        let args = ServeArgs::with_models(&["a=builtin:scale:1", "b=builtin:scale:2"]).unwrap();
        let mut args = args;
        args.max_batch_size = vec!["8".parse().unwrap(), "b=32".parse().unwrap()];
        assert_eq!(args.batching_for("a").0, 8);
        assert_eq!(args.batching_for("b").0, 32);
        args.validate().unwrap();
        args.max_batch_size.push("zzz=4".parse().unwrap());
        assert!(args.validate().is_err());
    }

    #[test]
    fn optimizer_settings_prefer_the_named_model_and_check_ranges() {
        let mut args = ServeArgs::with_models(&["a=builtin:mlp:2x2", "b=builtin:mlp:2x2"]).unwrap();
        args.optimizer = vec!["b=adam".parse().unwrap()];
        args.momentum = vec!["0.9".parse().unwrap()];
        args.adam_betas = vec!["b=0.8:0.99".parse().unwrap()];
        args.validate().unwrap();
        let a = args.optimizer_for("a");
        assert_eq!((a.kind, a.momentum), (OptimizerKind::Sgd, 0.9));
        let b = args.optimizer_for("b");
        assert_eq!(
            (b.kind, b.betas, b.eps),
            (OptimizerKind::Adam, AdamBetas(0.8, 0.99), 1e-8)
        );
        assert!("rmsprop".parse::<PerModel<OptimizerKind>>().is_err());
        assert!("0.9".parse::<AdamBetas>().is_err());
        assert!("0.9:1.5".parse::<AdamBetas>().is_err());
        args.momentum = vec!["1.5".parse().unwrap()];
        assert!(
            args.validate()
                .unwrap_err()
                .to_string()
                .contains("--momentum")
        );
        args.momentum = vec!["zzz=0.5".parse().unwrap()];
        assert!(args.validate().unwrap_err().to_string().contains("zzz"));
    }

    #[test]
    fn sizes_cpus_and_addresses_take_the_units_kubernetes_writes() {
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1000000").unwrap(), 1_000_000);
        assert!(parse_bytes("2 parsecs").is_err());
        assert_eq!(parse_cpu("1000m").unwrap(), 1.0);
        assert_eq!(parse_cpu("1.5").unwrap(), 1.5);
        assert!(parse_cpu("0").is_err());
        assert!(parse_addr("localhost:50051").unwrap().ip().is_loopback());
        assert_eq!(parse_addr("0.0.0.0:1").unwrap().port(), 1);
        assert!(parse_addr("nohostport").is_err());
        assert_eq!("off".parse::<OptionalAddr>().unwrap(), OptionalAddr(None));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn every_flag_has_help_and_an_env_var() {
        use clap::CommandFactory;
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "json" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "{} --{id} has no help",
                    sub.get_name()
                );
                let env = arg.get_env().map(|e| e.to_string_lossy().to_string());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("SPLITSERVE_")),
                    "{} --{id} has no SPLITSERVE_ env var",
                    sub.get_name()
                );
            }
        }
    }

    #[test]
    fn every_subcommand_parses_a_typical_line() {
        for line in [
            "splitserve serve --model a=builtin:scale:2 --max-batch-size 8 --stall-timeout 5s",
            "splitserve bench --addr 127.0.0.1:1 --shape 1x64x256 --duration 2s --json",
            "splitserve probe --addr 127.0.0.1:1 --service liveness",
            "splitserve diagnose --model builtin:scale:2 --shape 4 --plans 2x1,1x2 --json",
        ] {
            let cli = Cli::try_parse_from(line.split(' ')).unwrap();
            if let Command::Bench(b) = cli.command {
                assert_eq!(b.shape, Dims(vec![1, 64, 256]));
            }
        }
    }

    #[test]
    fn duplicate_model_names_are_refused() {
        let args = ServeArgs::with_models(&["a=builtin:scale:1", "a=builtin:scale:2"]).unwrap();
        assert!(args.validate().unwrap_err().to_string().contains("twice"));
    }
}
