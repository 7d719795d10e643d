//! The Prometheus registry: every `splitserve_*` family, plus the standard
//! `process_*` ones. Event metrics are updated where things happen (handlers,
//! workers); state gauges are set just before each scrape by whoever owns the
//! state; /proc, cgroup and GPU readings are taken at scrape time here
//! (`Metrics::render`).

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::system;

/// Latency buckets from 50 µs to 60 s.
pub const LATENCY_BUCKETS: [f64; 19] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Payload-size buckets, 256 B to 256 MiB by powers of 4.
pub const SIZE_BUCKETS: [f64; 11] = [
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
];

/// Batch-size buckets (requests per forward).
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Every metric family splitserve exports.
pub struct Metrics {
    registry: Registry,
    /// RPCs answered, by model, method and gRPC code name (OK, INVALID_ARGUMENT, ...).
    pub requests: IntCounterVec,
    /// Server time per RPC, from arrival to answer.
    pub request_duration: HistogramVec,
    /// Time a request waited in its model's queue before its forward started.
    pub queue_duration: HistogramVec,
    /// Time of the forward that computed a request (the whole batch's).
    pub inference_duration: HistogramVec,
    /// Requests per forward.
    pub batch_size: HistogramVec,
    /// Compute RPCs being handled right now.
    pub inflight: IntGauge,
    /// Requests refused or dropped without compute, by reason.
    pub rejected: IntCounterVec,
    /// Requests that went through a forward.
    pub computed: IntCounterVec,
    /// Forward calls (a batch counts once).
    pub forwards: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub queue_capacity: IntGaugeVec,
    /// Threads by pool: process (measured), io, inference, intra_op, inter_op (the plan).
    pub threads: IntGaugeVec,
    pub cpu_budget: IntGauge,
    /// Inference workers by state: busy, idle, stalled.
    pub workers: IntGaugeVec,
    /// Training forwards waiting for their backward, and their bytes.
    pub activations_stored: IntGauge,
    pub activations_bytes: IntGauge,
    /// KV sessions held on the server, and the bytes of their caches.
    pub kv_sessions: IntGauge,
    pub kv_cache_bytes: IntGauge,
    /// KV session events: created, evicted, expired, ended.
    pub kv_session_events: IntCounterVec,
    /// Positions computed by session steps (prefill and decode).
    pub kv_tokens: IntCounter,
    /// Decode steps (one new position) of sessions and their seconds: the ratio
    /// of their rates is the time per generated token.
    pub kv_decode_steps: IntCounter,
    pub kv_decode_seconds: prometheus::Counter,
    /// Per model: KV session decode steps per batched forward, the decode steps
    /// computed (`rate()` is tokens/s), and batches whose rows had different
    /// past lengths.
    pub kv_decode_batch_size: HistogramVec,
    pub kv_decoded_tokens: IntCounterVec,
    pub kv_decode_mixed_batches: IntCounterVec,
    /// Per model: chunks of KV session prompts computed in several chunks.
    pub kv_prefill_chunks: IntCounterVec,
    /// Split-training events: forward, backward, optimizer_step, step_rejected, grad_clipped, eviction, expiry, checkpoint.
    pub training_events: IntCounterVec,
    /// Limits that triggered, by limit (see [`limit`]): each one a refusal a
    /// client saw, or a connection closed.
    pub limit_rejections: IntCounterVec,
    /// Requests refused by token authentication, by reason
    /// (unauthenticated, permission_denied).
    pub auth_failures: IntCounterVec,
    /// TLS handshakes that failed or timed out, by port.
    pub tls_handshake_failures: IntCounterVec,
    /// Credentials re-read after their files changed, by kind (tls, tokens).
    pub credential_reloads: IntCounterVec,
    /// Connections open now, by port.
    pub open_connections: IntGaugeVec,
    /// Connections accepted since start, by port (rotation shows here).
    pub connections: IntCounterVec,
    /// Bytes of request messages reserved now (--max-inflight-bytes).
    pub inflight_bytes: IntGauge,
    /// Every served model, value 1: name, version, device and content digest
    /// (sha256 of a TorchScript file, or the built-in spec), for dashboards.
    pub model_info: IntGaugeVec,
    /// Size of request payloads (tensor bytes as sent), by protocol and encoding.
    pub request_bytes: HistogramVec,
    /// Size of reply payloads, by protocol and encoding.
    pub response_bytes: HistogramVec,
    /// Read at scrape time (`Metrics::render`): context switches of every thread.
    context_switches: IntCounterVec,
    /// cgroup CPU throttling; no label, so no series until the cgroup reports it.
    cgroup_throttled_seconds: CounterVec,
    cgroup_throttled_periods: IntCounterVec,
    /// From NVML; no series without a GPU.
    gpu_memory_used: GaugeVec,
    gpu_memory_total: GaugeVec,
    gpu_utilization: GaugeVec,
    gpu_process_memory: GaugeVec,
    /// From the CUDA caching allocator (telemetry::cuda_memory).
    gpu_allocated: GaugeVec,
    gpu_reserved: GaugeVec,
    /// Triton's `nv_*` families, beside these (docs/observability.md).
    pub triton: super::triton::TritonMetrics,
    /// Rows computed (dimension 0 of each request's input, 1 for a scalar):
    /// Triton's inference_count, which counts each row of a batch.
    pub computed_rows: IntCounterVec,
    /// Repository models whose newest load failed (unreadable directory or
    /// config.pbtxt, a version that did not load): the alert's signal while the
    /// pod stays Ready with what it already serves.
    pub repository_failed_models: IntGauge,
    /// Warm-ups the inference workers ran on their own threads, per model: each
    /// worker runs each model once before it serves it (cuBLAS handles and
    /// TorchScript's plans are per thread and per batch size on CUDA).
    pub worker_warmups: IntCounterVec,
    /// Tensor copies between host memory and the model's device issued by
    /// plain forwards, by model and direction (to_device, to_host): one each
    /// way per batch and tensor. On the CPU libtorch skips the copy; the count
    /// is the same as a GPU's.
    pub device_copies: IntCounterVec,
}

/// Names of the protocols, as the `protocol` label spells them.
pub mod protocol {
    pub const SPLITLEARN: &str = "splitlearn";
    pub const V2_GRPC: &str = "v2-grpc";
    pub const V2_HTTP: &str = "v2-http";
}

/// Names of rejection reasons, as the `reason` label spells them.
pub mod reason {
    pub const QUEUE_FULL: &str = "queue_full";
    pub const DEADLINE: &str = "deadline";
    pub const CANCELLED: &str = "cancelled";
    pub const INVALID: &str = "invalid";
    pub const DRAINING: &str = "draining";
    /// The device (or host) ran out of memory for the forward: RESOURCE_EXHAUSTED.
    pub const OUT_OF_MEMORY: &str = "out_of_memory";
}

/// Names of limits, as the `limit` label of `splitserve_limit_rejections_total`
/// spells them (docs/security.md lists the flag behind each).
pub mod limit {
    pub const CONNECTIONS: &str = "connections";
    pub const IDLE_CONNECTION: &str = "idle_connection";
    pub const FILE_DESCRIPTORS: &str = "file_descriptors";
    /// A socket closed in its TLS handshake or before its first request
    /// bytes: past --handshake-timeout, or the oldest when the pending pool was full.
    pub const HANDSHAKE: &str = "handshake";
    /// An HTTP/1.1 request head slower than --http-header-read-timeout.
    pub const HEADER_READ_TIMEOUT: &str = "header_read_timeout";
    /// A client that read nothing of its reply for --write-stall-timeout.
    pub const WRITE_STALL: &str = "write_stall";
    pub const MESSAGE_SIZE: &str = "message_size";
    /// A reply over `--max-message-bytes`, refused before it is built.
    pub const REPLY_SIZE: &str = "reply_size";
    pub const INFLIGHT_BYTES: &str = "inflight_bytes";
    pub const BODY_TIMEOUT: &str = "body_timeout";
    /// An HTTP request body slower than `--http-min-body-rate`.
    pub const BODY_RATE: &str = "body_rate";
    /// One connection's HTTP request bodies over `--max-inflight-bytes-per-connection`.
    pub const INFLIGHT_BYTES_PER_CONNECTION: &str = "inflight_bytes_per_connection";
    pub const DECOMPRESSED_SIZE: &str = "decompressed_size";
    pub const CODEC_QUEUE: &str = "codec_queue";
    pub const FORWARD_ID: &str = "forward_id";
    pub const ACCUMULATION_STEPS: &str = "accumulation_steps";
    pub const LEARNING_RATE: &str = "learning_rate";
    /// A repository load or unload of a model whose previous one has not finished.
    pub const REPOSITORY_BUSY: &str = "repository_busy";
}

#[derive(Debug, thiserror::Error)]
#[error("metrics registry: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// A gauge per GPU: `device` is the CUDA device as this process names it
/// (`cuda:N`); `gpu_uuid` and `pci_bus_id` name the GPU across processes and
/// hosts (empty where NVML does not say).
fn gauge_per_device(name: &str, help: &str) -> Result<GaugeVec, prometheus::Error> {
    GaugeVec::new(Opts::new(name, help), &["device", "gpu_uuid", "pci_bus_id"])
}

fn histogram(
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramVec, prometheus::Error> {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
}

impl Metrics {
    /// A fresh registry (one per server, so in-process tests do not share counts).
    pub fn new(torch_version: &str) -> Result<Arc<Metrics>, MetricsError> {
        let registry = Registry::new();
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "splitserve_requests_total",
                    "RPCs answered, by model, protocol (splitlearn, v2-grpc, v2-http), method and gRPC code.",
                ),
                &["model", "protocol", "method", "code"],
            )?,
            request_duration: histogram(
                "splitserve_request_duration_seconds",
                "Server time per RPC, from arrival to answer.",
                &["model", "protocol", "method"],
                &LATENCY_BUCKETS,
            )?,
            queue_duration: histogram(
                "splitserve_queue_duration_seconds",
                "Time a request waited in its model's queue before its forward started.",
                &["model"],
                &LATENCY_BUCKETS,
            )?,
            inference_duration: histogram(
                "splitserve_inference_duration_seconds",
                "Time of the forward that computed a request (the whole batch's forward).",
                &["model"],
                &LATENCY_BUCKETS,
            )?,
            batch_size: histogram(
                "splitserve_batch_size",
                "Requests per forward.",
                &["model"],
                &BATCH_BUCKETS,
            )?,
            inflight: IntGauge::new(
                "splitserve_inflight_requests",
                "Compute RPCs being handled now.",
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "splitserve_rejected_requests_total",
                    "Requests refused or dropped without an answer, by reason \
                     (queue_full, deadline, cancelled, invalid, draining, out_of_memory).",
                ),
                &["model", "reason"],
            )?,
            computed: IntCounterVec::new(
                Opts::new(
                    "splitserve_computed_requests_total",
                    "Requests that went through a forward.",
                ),
                &["model"],
            )?,
            forwards: IntCounterVec::new(
                Opts::new(
                    "splitserve_forwards_total",
                    "Forward calls; a batch counts once.",
                ),
                &["model"],
            )?,
            queue_depth: IntGaugeVec::new(
                Opts::new("splitserve_queue_depth", "Requests waiting for a worker."),
                &["model"],
            )?,
            queue_capacity: IntGaugeVec::new(
                Opts::new(
                    "splitserve_queue_capacity",
                    "Requests a model's queue holds (--queue-capacity).",
                ),
                &["model"],
            )?,
            threads: IntGaugeVec::new(
                Opts::new(
                    "splitserve_threads",
                    "Threads by pool: process (measured now); io, inference, intra_op, inter_op (the plan).",
                ),
                &["pool"],
            )?,
            cpu_budget: IntGauge::new(
                "splitserve_cpu_budget_cores",
                "Cores the thread plan may use (cgroup quota, cpuset, --cpu-limit, the OS).",
            )?,
            workers: IntGaugeVec::new(
                Opts::new(
                    "splitserve_workers",
                    "Inference workers by state (busy, idle, stalled).",
                ),
                &["state"],
            )?,
            activations_stored: IntGauge::new(
                "splitserve_activations_stored",
                "Training forwards whose activations wait for their backward.",
            )?,
            activations_bytes: IntGauge::new(
                "splitserve_activations_bytes",
                "Bytes of stored activations, as --activation-cache-bytes counts them.",
            )?,
            kv_sessions: IntGauge::new(
                "splitserve_kv_sessions",
                "KV sessions whose cache the server holds (--kv-sessions).",
            )?,
            kv_cache_bytes: IntGauge::new(
                "splitserve_kv_cache_bytes",
                "Bytes of the KV sessions' caches, as --kv-cache-bytes counts them.",
            )?,
            kv_session_events: IntCounterVec::new(
                Opts::new(
                    "splitserve_kv_session_events_total",
                    "KV session events: created, evicted, expired, ended.",
                ),
                &["event"],
            )?,
            kv_tokens: IntCounter::new(
                "splitserve_kv_tokens_total",
                "Positions computed by KV session steps (prefill and decode).",
            )?,
            kv_decode_steps: IntCounter::new(
                "splitserve_kv_decode_steps_total",
                "KV session decode steps (one new position each).",
            )?,
            kv_decode_seconds: prometheus::Counter::new(
                "splitserve_kv_decode_seconds_total",
                "Seconds spent in KV session decode steps' forwards.",
            )?,
            kv_decode_batch_size: histogram(
                "splitserve_kv_decode_batch_size",
                "KV session decode steps computed by one batched forward.",
                &["model"],
                &BATCH_BUCKETS,
            )?,
            kv_decoded_tokens: IntCounterVec::new(
                Opts::new(
                    "splitserve_kv_decoded_tokens_total",
                    "Tokens decoded by KV session decode steps (one position each), by model.",
                ),
                &["model"],
            )?,
            kv_decode_mixed_batches: IntCounterVec::new(
                Opts::new(
                    "splitserve_kv_decode_mixed_batches_total",
                    "Batched decode forwards whose sessions had different past lengths.",
                ),
                &["model"],
            )?,
            kv_prefill_chunks: IntCounterVec::new(
                Opts::new(
                    "splitserve_kv_prefill_chunks_total",
                    "Chunks of KV session prompts computed in several chunks between decode batches.",
                ),
                &["model"],
            )?,
            training_events: IntCounterVec::new(
                Opts::new(
                    "splitserve_training_events_total",
                    "Split-training events by model: forward, backward, optimizer_step, step_rejected, grad_clipped, eviction, expiry, checkpoint.",
                ),
                &["model", "event"],
            )?,
            limit_rejections: IntCounterVec::new(
                Opts::new(
                    "splitserve_limit_rejections_total",
                    "Requests refused or connections closed because a limit triggered, by limit.",
                ),
                &["limit"],
            )?,
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "splitserve_auth_failures_total",
                    "Requests refused by token authentication (unauthenticated, permission_denied).",
                ),
                &["reason"],
            )?,
            tls_handshake_failures: IntCounterVec::new(
                Opts::new(
                    "splitserve_tls_handshake_failures_total",
                    "TLS handshakes that failed or timed out, by port.",
                ),
                &["port"],
            )?,
            credential_reloads: IntCounterVec::new(
                Opts::new(
                    "splitserve_credential_reloads_total",
                    "Certificates or tokens re-read after their files changed, by kind.",
                ),
                &["kind"],
            )?,
            open_connections: IntGaugeVec::new(
                Opts::new(
                    "splitserve_open_connections",
                    "Connections open now, by port.",
                ),
                &["port"],
            )?,
            model_info: IntGaugeVec::new(
                Opts::new(
                    "splitserve_model_info",
                    "Served models: name, version, device and content digest; always 1.",
                ),
                &["model", "version", "device", "digest"],
            )?,
            request_bytes: histogram(
                "splitserve_request_bytes",
                "Size of request tensor payloads, by protocol and encoding.",
                &["protocol", "encoding"],
                &SIZE_BUCKETS,
            )?,
            response_bytes: histogram(
                "splitserve_response_bytes",
                "Size of reply tensor payloads, by protocol and encoding.",
                &["protocol", "encoding"],
                &SIZE_BUCKETS,
            )?,
            connections: IntCounterVec::new(
                Opts::new(
                    "splitserve_connections_total",
                    "Connections accepted (TLS handshake done), by port.",
                ),
                &["port"],
            )?,
            inflight_bytes: IntGauge::new(
                "splitserve_inflight_request_bytes",
                "Bytes of request messages reserved now against --max-inflight-bytes.",
            )?,
            context_switches: IntCounterVec::new(
                Opts::new(
                    "splitserve_context_switches_total",
                    "Context switches of every thread of the process.",
                ),
                &["kind"],
            )?,
            cgroup_throttled_seconds: CounterVec::new(
                Opts::new(
                    "splitserve_cgroup_cpu_throttled_seconds_total",
                    "Time the cgroup's CPU quota held the process back.",
                ),
                &[],
            )?,
            cgroup_throttled_periods: IntCounterVec::new(
                Opts::new(
                    "splitserve_cgroup_cpu_throttled_periods_total",
                    "Scheduler periods in which the cgroup was throttled.",
                ),
                &[],
            )?,
            gpu_memory_used: gauge_per_device(
                "splitserve_gpu_memory_used_bytes",
                "GPU memory in use on the device (all processes).",
            )?,
            gpu_memory_total: gauge_per_device(
                "splitserve_gpu_memory_total_bytes",
                "GPU memory of the device.",
            )?,
            gpu_utilization: gauge_per_device(
                "splitserve_gpu_utilization_ratio",
                "Share of the last sample period a kernel ran (0-1).",
            )?,
            gpu_process_memory: gauge_per_device(
                "splitserve_gpu_process_memory_bytes",
                "GPU memory this process holds on the device.",
            )?,
            gpu_allocated: gauge_per_device(
                "splitserve_gpu_allocator_allocated_bytes",
                "Bytes the CUDA caching allocator has allocated to tensors on the device.",
            )?,
            gpu_reserved: gauge_per_device(
                "splitserve_gpu_allocator_reserved_bytes",
                "Bytes the CUDA caching allocator holds from the driver on the device (cached included).",
            )?,
            triton: super::triton::TritonMetrics::new()?,
            computed_rows: IntCounterVec::new(
                Opts::new(
                    "splitserve_computed_rows_total",
                    "Rows computed (dimension 0 of each request's input).",
                ),
                &["model"],
            )?,
            repository_failed_models: IntGauge::new(
                "splitserve_repository_failed_models",
                "Model repository models whose newest load failed.",
            )?,
            worker_warmups: IntCounterVec::new(
                Opts::new(
                    "splitserve_worker_warmups_total",
                    "Warm-ups of a model run by an inference worker on its own thread.",
                ),
                &["model"],
            )?,
            device_copies: IntCounterVec::new(
                Opts::new(
                    "splitserve_device_copies_total",
                    "Tensor copies between host memory and the model's device, by direction.",
                ),
                &["model", "direction"],
            )?,
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new(
                "splitserve_build_info",
                "Versions this binary was built with; always 1.",
            ),
            &["version", "torch_version", "cuda"],
        )?;
        let cuda = torch_version.split_once('+').map_or("unknown", |(_, v)| v);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), torch_version, cuda])
            .set(1);
        let r = &m.registry;
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.request_duration.clone()))?;
        r.register(Box::new(m.queue_duration.clone()))?;
        r.register(Box::new(m.inference_duration.clone()))?;
        r.register(Box::new(m.batch_size.clone()))?;
        r.register(Box::new(m.inflight.clone()))?;
        r.register(Box::new(m.rejected.clone()))?;
        r.register(Box::new(m.computed.clone()))?;
        r.register(Box::new(m.computed_rows.clone()))?;
        r.register(Box::new(m.repository_failed_models.clone()))?;
        r.register(Box::new(m.worker_warmups.clone()))?;
        r.register(Box::new(m.device_copies.clone()))?;
        r.register(Box::new(m.forwards.clone()))?;
        r.register(Box::new(m.queue_depth.clone()))?;
        r.register(Box::new(m.queue_capacity.clone()))?;
        r.register(Box::new(m.threads.clone()))?;
        r.register(Box::new(m.cpu_budget.clone()))?;
        r.register(Box::new(m.workers.clone()))?;
        r.register(Box::new(m.activations_stored.clone()))?;
        r.register(Box::new(m.activations_bytes.clone()))?;
        r.register(Box::new(m.training_events.clone()))?;
        r.register(Box::new(m.kv_sessions.clone()))?;
        r.register(Box::new(m.kv_cache_bytes.clone()))?;
        r.register(Box::new(m.kv_session_events.clone()))?;
        r.register(Box::new(m.kv_tokens.clone()))?;
        r.register(Box::new(m.kv_decode_steps.clone()))?;
        r.register(Box::new(m.kv_decode_seconds.clone()))?;
        r.register(Box::new(m.kv_decode_batch_size.clone()))?;
        r.register(Box::new(m.kv_decoded_tokens.clone()))?;
        r.register(Box::new(m.kv_decode_mixed_batches.clone()))?;
        r.register(Box::new(m.kv_prefill_chunks.clone()))?;
        r.register(Box::new(m.limit_rejections.clone()))?;
        r.register(Box::new(m.auth_failures.clone()))?;
        r.register(Box::new(m.tls_handshake_failures.clone()))?;
        r.register(Box::new(m.credential_reloads.clone()))?;
        r.register(Box::new(m.open_connections.clone()))?;
        r.register(Box::new(m.connections.clone()))?;
        r.register(Box::new(m.model_info.clone()))?;
        r.register(Box::new(m.request_bytes.clone()))?;
        r.register(Box::new(m.response_bytes.clone()))?;
        r.register(Box::new(m.inflight_bytes.clone()))?;
        r.register(Box::new(build_info))?;
        r.register(Box::new(m.context_switches.clone()))?;
        r.register(Box::new(m.cgroup_throttled_seconds.clone()))?;
        r.register(Box::new(m.cgroup_throttled_periods.clone()))?;
        r.register(Box::new(m.gpu_memory_used.clone()))?;
        r.register(Box::new(m.gpu_memory_total.clone()))?;
        r.register(Box::new(m.gpu_utilization.clone()))?;
        r.register(Box::new(m.gpu_process_memory.clone()))?;
        r.register(Box::new(m.gpu_allocated.clone()))?;
        r.register(Box::new(m.gpu_reserved.clone()))?;
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        m.triton.register(r)?;
        Ok(Arc::new(m))
    }

    /// The text exposition format of everything registered.
    pub fn render(&self) -> String {
        self.refresh_system();
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric data, which the
        // typed constructors above rule out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Takes the /proc, cgroup and NVML readings that back the system families.
    fn refresh_system(&self) {
        for (kind, key) in [
            ("voluntary", "voluntary_ctxt_switches"),
            ("involuntary", "nonvoluntary_ctxt_switches"),
        ] {
            if let Some(total) = system::task_counter_sum("self", key) {
                catch_up(&self.context_switches.with_label_values(&[kind]), total);
            }
        }
        if let Some((seconds, periods)) = system::cgroup_throttling() {
            const NO_LABELS: &[&str] = &[];
            let s = self.cgroup_throttled_seconds.with_label_values(NO_LABELS);
            s.inc_by((seconds - s.get()).max(0.0));
            catch_up(
                &self.cgroup_throttled_periods.with_label_values(NO_LABELS),
                periods,
            );
        }
        // The GPU sampler thread's latest readings: no NVML call here.
        self.triton.refresh_system();
        self.record_gpus(&system::gpu_samples());
    }

    /// Sets the GPU gauges from NVML's readings of the GPUs this process uses;
    /// a field NVML could not read leaves its series absent rather than 0.
    /// Triton's `nv_gpu_*` too.
    pub fn record_gpus(&self, samples: &[system::GpuSample]) {
        self.triton.record_gpus(samples);
        for s in samples {
            let g = &s.reading;
            let device = format!("cuda:{}", g.device);
            let d = [
                device.as_str(),
                s.uuid.as_deref().unwrap_or_default(),
                s.pci_bus_id.as_deref().unwrap_or_default(),
            ];
            self.gpu_memory_used
                .with_label_values(&d)
                .set(g.memory_used_bytes as f64);
            self.gpu_memory_total
                .with_label_values(&d)
                .set(g.memory_total_bytes as f64);
            if let Some(u) = g.utilization {
                self.gpu_utilization.with_label_values(&d).set(f64::from(u));
            }
            if let Some(b) = g.process_memory_bytes {
                self.gpu_process_memory.with_label_values(&d).set(b as f64);
            }
            if let Some(b) = g.allocated_bytes {
                self.gpu_allocated.with_label_values(&d).set(b as f64);
            }
            if let Some(b) = g.reserved_bytes {
                self.gpu_reserved.with_label_values(&d).set(b as f64);
            }
        }
    }

    /// The sum of a counter family over the label values matching `model` (all
    /// models when None) and, for rejections, a reason.
    pub fn total(&self, family: &IntCounterVec, labels: &[(&str, &str)]) -> u64 {
        let mut sum = 0;
        for mf in family.collect() {
            for m in mf.get_metric() {
                let matches = labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                });
                if matches {
                    sum += m.get_counter().value() as u64;
                }
            }
        }
        sum
    }
}

/// Raises a counter to an absolute reading kept elsewhere (a /proc total, a
/// counter of another component); a counter never goes down, so a lower
/// reading (a thread that exited took its counts) leaves it as it is.
pub fn catch_up(counter: &IntCounter, reading: u64) {
    counter.inc_by(reading.saturating_sub(counter.get()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_with_its_unit() {
        let m = Metrics::new("2.13.0+cu130").unwrap();
        m.requests
            .with_label_values(&["mlp", "splitlearn", "Compute", "OK"])
            .inc();
        m.rejected
            .with_label_values(&["mlp", reason::DEADLINE])
            .inc_by(2);
        m.rejected
            .with_label_values(&["other", reason::DEADLINE])
            .inc();
        m.queue_duration
            .with_label_values(&["mlp"])
            .observe(0.00007);
        let text = m.render();
        for family in [
            "splitserve_requests_total{code=\"OK\",method=\"Compute\",model=\"mlp\",protocol=\"splitlearn\"} 1",
            "splitserve_queue_duration_seconds_bucket{model=\"mlp\",le=\"0.00005\"} 0",
            "splitserve_queue_duration_seconds_bucket{model=\"mlp\",le=\"0.0001\"} 1",
            "splitserve_build_info{cuda=\"cu130\",torch_version=\"2.13.0+cu130\",version=",
            "splitserve_context_switches_total{kind=\"involuntary\"}",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(family), "missing {family}\n{text}");
        }
        assert_eq!(m.total(&m.rejected, &[("reason", reason::DEADLINE)]), 3);
        assert_eq!(
            m.total(
                &m.rejected,
                &[("model", "mlp"), ("reason", reason::DEADLINE)]
            ),
            2
        );
    }

    /// (family name without the prefix, type, label names) of every row of
    /// docs/observability.md's "Metric families" table.
    fn documented_families() -> Vec<(String, String, Vec<String>)> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/observability.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let table = doc
            .split("## Metric families")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .unwrap();
        let mut out = Vec::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let labels: Vec<String> = cells[3]
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            for name in cells[1].split('`').skip(1).step_by(2) {
                out.push((name.to_string(), cells[2].to_string(), labels.clone()));
            }
        }
        out
    }

    /// Every documented family is registered, with its type and labels, and
    /// nothing undocumented is: the exposition (with one series in each) is
    /// read back against the table.
    #[test]
    fn every_documented_family_is_registered_with_its_type_and_labels() {
        let m = Metrics::new("2.13.0+cu130").unwrap();
        m.requests
            .with_label_values(&["m", "p", "Compute", "OK"])
            .inc();
        m.request_duration
            .with_label_values(&["m", "p", "Compute"])
            .observe(0.1);
        m.queue_duration.with_label_values(&["m"]).observe(0.1);
        m.inference_duration.with_label_values(&["m"]).observe(0.1);
        m.batch_size.with_label_values(&["m"]).observe(1.0);
        m.inflight.set(1);
        m.rejected.with_label_values(&["m", "r"]).inc();
        m.computed.with_label_values(&["m"]).inc();
        m.computed_rows.with_label_values(&["m"]).inc();
        m.forwards.with_label_values(&["m"]).inc();
        m.queue_depth.with_label_values(&["m"]).set(1);
        m.queue_capacity.with_label_values(&["m"]).set(1);
        m.threads.with_label_values(&["io"]).set(1);
        m.cpu_budget.set(1);
        m.workers.with_label_values(&["idle"]).set(1);
        m.activations_stored.set(1);
        m.activations_bytes.set(1);
        m.training_events.with_label_values(&["m", "forward"]).inc();
        m.kv_sessions.set(1);
        m.kv_cache_bytes.set(1);
        m.kv_session_events.with_label_values(&["created"]).inc();
        m.kv_tokens.inc();
        m.kv_decode_steps.inc();
        m.kv_decode_seconds.inc();
        m.kv_decode_batch_size
            .with_label_values(&["m"])
            .observe(1.0);
        m.kv_decoded_tokens.with_label_values(&["m"]).inc();
        m.kv_decode_mixed_batches.with_label_values(&["m"]).inc();
        m.kv_prefill_chunks.with_label_values(&["m"]).inc();
        m.limit_rejections.with_label_values(&["l"]).inc();
        m.auth_failures.with_label_values(&["r"]).inc();
        m.tls_handshake_failures.with_label_values(&["grpc"]).inc();
        m.credential_reloads.with_label_values(&["tls"]).inc();
        m.open_connections.with_label_values(&["grpc"]).set(1);
        m.connections.with_label_values(&["grpc"]).inc();
        m.inflight_bytes.set(1);
        m.model_info
            .with_label_values(&["m", "1", "cpu", "d"])
            .set(1);
        m.request_bytes.with_label_values(&["p", "e"]).observe(1.0);
        m.response_bytes.with_label_values(&["p", "e"]).observe(1.0);
        m.context_switches.with_label_values(&["voluntary"]).inc();
        m.cgroup_throttled_seconds
            .with_label_values(&[] as &[&str])
            .inc();
        m.cgroup_throttled_periods
            .with_label_values(&[] as &[&str])
            .inc();
        for g in [
            &m.gpu_memory_used,
            &m.gpu_memory_total,
            &m.gpu_utilization,
            &m.gpu_process_memory,
            &m.gpu_allocated,
            &m.gpu_reserved,
        ] {
            g.with_label_values(&["cuda:0", "GPU-0", "00000000:01:00.0"])
                .set(1.0);
        }
        m.worker_warmups.with_label_values(&["m"]).inc();
        m.device_copies.with_label_values(&["m", "to_device"]).inc();
        let text = m.render();

        let documented = documented_families();
        assert!(documented.len() >= 30, "{documented:?}");
        for (name, kind, labels) in &documented {
            let family = format!("splitserve_{name}");
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{family} is not registered as a {kind}"
            );
            // The labels of its first series ("le" is the histogram's own).
            let sample = if kind == "histogram" {
                format!("{family}_bucket")
            } else {
                family.clone()
            };
            let line = text
                .lines()
                .find(|l| l.starts_with(&sample) && l[sample.len()..].starts_with(['{', ' ']))
                .unwrap_or_else(|| panic!("no series of {family}"));
            let mut got: Vec<&str> = line
                .split_once('{')
                .map(|(_, rest)| rest.split_once('}').unwrap().0)
                .unwrap_or("")
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                .filter(|k| *k != "le")
                .collect();
            got.sort_unstable();
            let mut want: Vec<&str> = labels.iter().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(got, want, "labels of {family}");
        }
        for line in text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE splitserve_"))
        {
            let name = line.split(' ').next().unwrap();
            assert!(
                documented.iter().any(|(n, _, _)| n == name),
                "splitserve_{name} is not in docs/observability.md"
            );
        }
    }

    /// GPU series from a fake NVML reading: only the GPUs this process uses,
    /// found through CUDA_VISIBLE_DEVICES, labelled with the CUDA device, the
    /// UUID and the PCI bus id; utilization absent (not 0) on MIG, and any
    /// field NVML cannot read absent.
    #[test]
    fn gpu_series_from_a_fake_nvml_reading_are_labelled_and_leave_unreadable_fields_absent() {
        let gpu = |index: u32| system::NvmlDevice {
            index,
            uuid: Some(format!("GPU-{index}aaa-{index}")),
            pci_bus_id: Some(format!("00000000:0{index}:00.0")),
            utilization: Some(0.25 * index as f32),
            memory_used_bytes: Some(u64::from(index) << 30),
            memory_total_bytes: Some(80 << 30),
            process_memory_bytes: Some(1 << 30),
            ..Default::default()
        };
        // Four GPUs; 2 is in MIG mode with one instance; 3's memory is unreadable.
        let mut devices: Vec<_> = (0..4).map(gpu).collect();
        devices[2].mig_mode = true;
        devices[2].utilization = Some(0.0);
        devices[3].memory_used_bytes = None;
        devices.push(system::NvmlDevice {
            index: 2,
            uuid: Some("MIG-77".into()),
            pci_bus_id: Some("00000000:02:00.0".into()),
            mig_instance: true,
            utilization: Some(0.0),
            memory_used_bytes: Some(1 << 30),
            memory_total_bytes: Some(10 << 30),
            process_memory_bytes: None,
            ..Default::default()
        });

        // CUDA_VISIBLE_DEVICES=1,3: cuda:0 is GPU 1; this process uses cuda:0 only.
        // The sampler adds the caching allocator's figures where it reads them.
        let m = Metrics::new("2.13.0+cu130").unwrap();
        let mut used = system::select_gpus(&devices, &[0], Some("1,3"));
        used[0].reading.allocated_bytes = Some(3 << 20);
        used[0].reading.reserved_bytes = Some(8 << 20);
        m.record_gpus(&used);
        let text = m.render();
        let labels = r#"{device="cuda:0",gpu_uuid="GPU-1aaa-1",pci_bus_id="00000000:01:00.0"}"#;
        for line in [
            format!("splitserve_gpu_utilization_ratio{labels} 0.25"),
            format!("splitserve_gpu_memory_used_bytes{labels} 1073741824"),
            format!("splitserve_gpu_memory_total_bytes{labels} 85899345920"),
            format!("splitserve_gpu_process_memory_bytes{labels} 1073741824"),
            format!("splitserve_gpu_allocator_allocated_bytes{labels} 3145728"),
            format!("splitserve_gpu_allocator_reserved_bytes{labels} 8388608"),
            r#"nv_gpu_memory_used_bytes{gpu_uuid="GPU-1aaa-1"} 1073741824"#.to_string(),
        ] {
            assert!(text.contains(&line), "missing {line}:\n{text}");
        }
        for other in ["GPU-0aaa", "GPU-2aaa", "GPU-3aaa", "MIG-77"] {
            assert!(
                !text.contains(other),
                "a GPU this process does not use is exported: {other}:\n{text}"
            );
        }
        assert_eq!(
            text.matches("splitserve_gpu_memory_total_bytes{").count(),
            1,
            "{text}"
        );

        // Unset, cuda:N is GPU N; cuda:1 by UUID prefix; a MIG instance by UUID.
        let pick = |ordinal, visible| {
            system::select_gpus(&devices, &[ordinal], visible)
                .first()
                .and_then(|s| s.uuid.clone())
        };
        assert_eq!(pick(2, None).as_deref(), Some("GPU-2aaa-2"));
        assert_eq!(
            pick(1, Some("GPU-0aaa,GPU-1aaa")).as_deref(),
            Some("GPU-1aaa-1")
        );
        assert_eq!(pick(0, Some("GPU-")), None, "a prefix naming several GPUs");
        assert_eq!(pick(0, Some("MIG-77")).as_deref(), Some("MIG-77"));
        assert_eq!(
            pick(1, Some("0,bogus,1")),
            None,
            "CUDA stops at an unreadable entry"
        );
        assert_eq!(pick(0, Some("")), None, "an empty list hides every GPU");

        // MIG (the instance, and the whole GPU in MIG mode): utilization
        // absent, not 0; memory still read. GPU 3: its unreadable memory
        // leaves it out rather than exporting 0.
        let m = Metrics::new("2.13.0+cu130").unwrap();
        let mig = system::select_gpus(&devices, &[0], Some("MIG-77"));
        let mig_mode = system::select_gpus(&devices, &[0], Some("2"));
        let unreadable = system::select_gpus(&devices, &[0], Some("3"));
        assert!(unreadable.is_empty(), "{unreadable:?}");
        assert_eq!(mig_mode[0].reading.utilization, None);
        m.record_gpus(&mig);
        let text = m.render();
        assert!(
            text.contains(
                r#"splitserve_gpu_memory_total_bytes{device="cuda:0",gpu_uuid="MIG-77",pci_bus_id="00000000:02:00.0"} 10737418240"#
            ),
            "{text}"
        );
        assert!(
            !text.contains("splitserve_gpu_utilization_ratio{"),
            "a MIG utilization must be absent, not 0:\n{text}"
        );
        assert!(!text.contains("nv_gpu_utilization{"), "{text}");
        assert!(
            !text.contains("splitserve_gpu_process_memory_bytes{"),
            "{text}"
        );
        assert!(
            !text.contains("splitserve_gpu_allocator_reserved_bytes{"),
            "allocator figures not read must be absent, not 0:\n{text}"
        );
    }
}
