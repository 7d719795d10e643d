//! `splitserve bench`: a closed-loop load generator for any server that speaks
//! `splitlearn.comm.ComputeService` (splitserve, or the Python servers it replaces).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::Channel;

use crate::pb::ComputeRequest;
use crate::pb::compute_service_client::ComputeServiceClient;

/// The float encodings splitlearn_comm clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WireDtype {
    F32,
    F16,
}

impl WireDtype {
    fn parse(s: &str) -> Option<WireDtype> {
        match s.trim().to_ascii_lowercase().as_str() {
            "float32" | "float" | "f32" => Some(WireDtype::F32),
            "float16" | "half" | "f16" => Some(WireDtype::F16),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "float32",
            WireDtype::F16 => "float16",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Server address, host:port.
    pub addr: String,

    /// Clients in flight at once; each sends its next request when the last returns.
    pub concurrency: usize,

    /// HTTP/2 connections the clients share (round-robin).
    pub connections: usize,

    /// How long to measure (e.g. 10s).
    pub duration: Duration,

    /// Load before measuring, not counted (e.g. 1s).
    pub warmup: Duration,

    /// Input tensor shape, e.g. 1x512 or 1x64x256.
    pub shape: Vec<i64>,

    /// model_id to send (empty: the server's default model).
    pub model_id: String,

    /// Payload encoding: float32 or float16 (what splitlearn_comm clients send).
    pub dtype: String,

    /// Per-request deadline sent as grpc-timeout.
    pub timeout: Duration,

    /// Threads of the load generator's own runtime.
    pub client_threads: usize,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub addr: String,
    pub model_id: String,
    pub shape: Vec<i64>,
    pub dtype: String,
    pub concurrency: usize,
    pub connections: usize,
    pub duration_s: f64,
    pub ok: u64,
    /// Failed requests by gRPC status code name.
    pub errors: BTreeMap<String, u64>,
    /// Failed requests by code and message (the message cut short), so the
    /// cause shows, not just the code.
    pub error_messages: BTreeMap<String, u64>,
    /// Failed requests out of all measured ones.
    pub error_rate: f64,
    pub throughput_rps: f64,
    pub latency_ms: Latency,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Address(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("{0}")]
    Invalid(String),
}

/// Percentile of sorted microsecond samples, in ms.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

pub fn summarize(mut micros: Vec<u32>) -> Latency {
    micros.sort_unstable();
    let mean = if micros.is_empty() {
        0.0
    } else {
        micros.iter().map(|&m| f64::from(m)).sum::<f64>() / micros.len() as f64 / 1000.0
    };
    Latency {
        p50: percentile(&micros, 50.0),
        p90: percentile(&micros, 90.0),
        p99: percentile(&micros, 99.0),
        max: micros.last().map_or(0.0, |&m| f64::from(m) / 1000.0),
        mean,
    }
}

fn payload(shape: &[i64], dtype: WireDtype) -> Vec<u8> {
    let n: usize = shape.iter().map(|&d| d as usize).product();
    let mut x = 0x9e3779b9u32;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect();
    match dtype {
        WireDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WireDtype::F16 => values
            .iter()
            .flat_map(|v| f32_to_f16_bits(*v).to_le_bytes())
            .collect(),
    }
}

/// IEEE half from single, round-to-nearest-even (inputs here are small and finite).
fn f32_to_f16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mant = bits & 0x7f_ffff;
    if exp <= 0 {
        if exp < -10 {
            return sign;
        }
        let m = (mant | 0x80_0000) >> (1 - exp);
        return sign | ((m + 0x1000) >> 13) as u16;
    }
    if exp >= 31 {
        return sign | 0x7c00;
    }
    let h = u32::from(sign) | ((exp as u32) << 10) | (mant >> 13);
    let round = (mant & 0x1fff) > 0x1000 || ((mant & 0x1fff) == 0x1000 && (mant >> 13) & 1 == 1);
    (h + u32::from(round)) as u16
}

/// Runs the load and returns the report. Must run inside a tokio runtime.
pub async fn run(args: &BenchConfig) -> Result<BenchReport, BenchError> {
    if args.concurrency == 0 || args.connections == 0 {
        return Err(BenchError::Invalid(
            "--concurrency and --connections must be at least 1".into(),
        ));
    }
    let dtype = match WireDtype::parse(&args.dtype) {
        Some(d) => d,
        None => {
            return Err(BenchError::Invalid(format!(
                "--dtype must be float32 or float16, not {:?}",
                args.dtype
            )));
        }
    };
    let endpoint = crate::probe::endpoint(&args.addr).map_err(BenchError::Address)?;
    let uri = endpoint.uri().to_string();
    // A connection without a client would carry nothing: at most one per client.
    let connections = args.connections.min(args.concurrency);
    let mut channels: Vec<Channel> = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(
            endpoint
                .connect()
                .await
                .map_err(|e| BenchError::Connect(uri.clone(), e.to_string()))?,
        );
    }
    let shape32: Vec<i32> = args.shape.iter().map(|&d| d as i32).collect();
    let request = ComputeRequest {
        data: payload(&args.shape, dtype).into(),
        shape: shape32,
        model_id: args.model_id.clone(),
        ..Default::default()
    };
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut tasks = Vec::with_capacity(args.concurrency);
    for i in 0..args.concurrency {
        let mut client = ComputeServiceClient::new(channels[i % channels.len()].clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let request = request.clone();
        let timeout = args.timeout;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut messages: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let mut req = tonic::Request::new(request.clone());
                req.set_timeout(timeout);
                let result = client.compute(req).await;
                let done = Instant::now();
                if sent < measure_from {
                    continue;
                }
                match result {
                    Ok(_) => latencies.push(
                        done.duration_since(sent)
                            .as_micros()
                            .min(u128::from(u32::MAX)) as u32,
                    ),
                    Err(status) => {
                        *errors.entry(format!("{:?}", status.code())).or_default() += 1;
                        let message = crate::cut(status.message(), 160);
                        *messages
                            .entry(format!("{:?}: {message}", status.code()))
                            .or_default() += 1;
                        // Don't spin on a server that refuses everything.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (latencies, errors, messages)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut error_messages: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        if let Ok((l, e, m)) = t.await {
            latencies.extend(l);
            for (k, v) in e {
                *errors.entry(k).or_default() += v;
            }
            for (k, v) in m {
                *error_messages.entry(k).or_default() += v;
            }
        }
    }
    let measured = Instant::now()
        .min(end)
        .saturating_duration_since(measure_from)
        .max(Duration::from_millis(1));
    let ok = latencies.len() as u64;
    let failed: u64 = errors.values().sum();
    let error_rate = if ok + failed == 0 {
        0.0
    } else {
        failed as f64 / (ok + failed) as f64
    };
    Ok(BenchReport {
        addr: args.addr.clone(),
        model_id: args.model_id.clone(),
        shape: args.shape.clone(),
        dtype: dtype.name().into(),
        concurrency: args.concurrency,
        connections,
        duration_s: measured.as_secs_f64(),
        ok,
        errors,
        error_messages,
        error_rate,
        throughput_rps: ok as f64 / measured.as_secs_f64(),
        latency_ms: summarize(latencies),
    })
}

impl BenchReport {
    /// The human table.
    pub fn render(&self) -> String {
        let errors = if self.error_messages.is_empty() {
            "none".to_string()
        } else {
            let lines: Vec<String> = self
                .error_messages
                .iter()
                .map(|(k, v)| format!("{v:>8} x {k}"))
                .collect();
            format!(
                "{:.1}% of requests failed\n{}",
                self.error_rate * 100.0,
                lines.join("\n")
            )
        };
        format!(
            "target       {addr} model {model:?} shape {shape:?} {dtype}\n\
             load         {c} clients on {n} connections, {d:.1} s measured\n\
             throughput   {rps:.0} requests/s ({ok} ok)\n\
             latency ms   p50 {p50:.3}  p90 {p90:.3}  p99 {p99:.3}  max {max:.3}  mean {mean:.3}\n\
             errors       {errors}\n",
            addr = self.addr,
            model = self.model_id,
            shape = self.shape,
            dtype = self.dtype,
            c = self.concurrency,
            n = self.connections,
            d = self.duration_s,
            rps = self.throughput_rps,
            ok = self.ok,
            p50 = self.latency_ms.p50,
            p90 = self.latency_ms.p90,
            p99 = self.latency_ms.p99,
            max = self.latency_ms.max,
            mean = self.latency_ms.mean,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let l = summarize((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!((l.p50, l.p90, l.p99, l.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(l.mean, 50.5);
        assert_eq!(summarize(Vec::new()).p99, 0.0);
    }

    #[test]
    fn half_conversion_matches_ieee() {
        assert_eq!(f32_to_f16_bits(1.0), 0x3c00);
        assert_eq!(f32_to_f16_bits(-2.0), 0xc000);
        assert_eq!(f32_to_f16_bits(0.5), 0x3800);
        assert_eq!(f32_to_f16_bits(0.0), 0);
        assert_eq!(f32_to_f16_bits(65504.0), 0x7bff);
    }
}
