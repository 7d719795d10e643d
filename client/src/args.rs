//! The command lines of `probe` and `bench`, shared by the small client
//! binary and `splitserve` itself: clap structs that convert into the plain
//! configs of [`crate::probe`] and [`crate::bench`].

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::bench::BenchConfig;
use crate::probe::{ProbeConfig, ProbeTls};

/// A tensor shape on the command line, `1x64x256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims(pub Vec<i64>);

impl FromStr for Dims {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_dims(s).map(Dims)
    }
}

/// Parses `1x64x256` (or `1,64,256`) into dimensions.
pub fn parse_dims(s: &str) -> Result<Vec<i64>, String> {
    s.split(['x', ','])
        .map(|d| match d.trim().parse::<i64>() {
            Ok(v) if v >= 0 => Ok(v),
            _ => Err(format!("bad dimension {d:?} in shape {s:?}")),
        })
        .collect()
}

/// Parses `30s`, `500ms`, `2m`, `1h`, `100us` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration like 30s or 500ms, got {s:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Server address, host:port.
    #[arg(long, env = "SPLITSERVE_BENCH_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,

    /// Clients in flight at once; each sends its next request when the last returns.
    #[arg(long, env = "SPLITSERVE_BENCH_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,

    /// HTTP/2 connections the clients share (round-robin); at most one per client.
    #[arg(long, env = "SPLITSERVE_BENCH_CONNECTIONS", default_value_t = 4)]
    pub connections: usize,

    /// How long to measure (e.g. 10s).
    #[arg(long, env = "SPLITSERVE_BENCH_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Load before measuring, not counted (e.g. 1s).
    #[arg(long, env = "SPLITSERVE_BENCH_WARMUP", default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Input tensor shape, e.g. 1x512 or 1x64x256.
    #[arg(long, env = "SPLITSERVE_BENCH_SHAPE", default_value = "1x512")]
    pub shape: Dims,

    /// model_id to send (empty: the server's default model).
    #[arg(long, env = "SPLITSERVE_BENCH_MODEL_ID", default_value = "")]
    pub model_id: String,

    /// Payload encoding: float32 or float16 (what splitlearn_comm clients send).
    #[arg(long, env = "SPLITSERVE_BENCH_DTYPE", default_value = "float32")]
    pub dtype: String,

    /// Per-request deadline sent as grpc-timeout.
    #[arg(long, env = "SPLITSERVE_BENCH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Threads of the load generator's own runtime.
    #[arg(long, env = "SPLITSERVE_BENCH_CLIENT_THREADS", default_value_t = 1)]
    pub client_threads: usize,

    /// Exit 1 when more than this share of the measured requests failed
    /// (0 = any failure fails the run; 1 = never).
    #[arg(long, env = "SPLITSERVE_BENCH_MAX_ERROR_RATE", default_value_t = 0.0)]
    pub max_error_rate: f64,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    pub fn into_config(self) -> BenchConfig {
        BenchConfig {
            addr: self.addr,
            concurrency: self.concurrency,
            connections: self.connections,
            duration: self.duration,
            warmup: self.warmup,
            shape: self.shape.0,
            model_id: self.model_id,
            dtype: self.dtype,
            timeout: self.timeout,
            client_threads: self.client_threads,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Server address, host:port.
    #[arg(long, env = "SPLITSERVE_PROBE_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,

    /// Health service to check: "" (the server), splitlearn.comm.ComputeService
    /// (ready to compute) or liveness (no stalled worker).
    #[arg(
        long,
        env = "SPLITSERVE_PROBE_SERVICE",
        default_value = "splitlearn.comm.ComputeService"
    )]
    pub service: String,

    /// Give up after this long (connect plus check).
    #[arg(long, env = "SPLITSERVE_PROBE_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Connect with TLS, trusting this PEM CA bundle (for a server run with --tls-cert).
    #[arg(long, env = "SPLITSERVE_PROBE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The name the server's certificate must carry (default: the host of --addr);
    /// e.g. the Service's DNS name when probing 127.0.0.1.
    #[arg(long, env = "SPLITSERVE_PROBE_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,

    /// Client certificate (PEM) to present, for a server run with --tls-client-ca.
    #[arg(long, env = "SPLITSERVE_PROBE_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "SPLITSERVE_PROBE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ProbeArgs {
    pub fn into_config(self) -> ProbeConfig {
        let identity = self.tls_cert.zip(self.tls_key);
        ProbeConfig {
            addr: self.addr,
            service: self.service,
            timeout: self.timeout,
            tls: self.tls_ca.map(|ca| ProbeTls {
                ca,
                server_name: self.tls_server_name,
                identity,
            }),
        }
    }
}
