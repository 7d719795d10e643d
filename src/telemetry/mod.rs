//! Telemetry: logging and traces (tracing + OpenTelemetry/OTLP), the Prometheus
//! registry, and readings of the process, cgroup and GPUs. Called from anywhere;
//! calls nothing back.

pub mod cuda_memory;
pub mod metrics;
pub mod otel;
pub mod system;
pub mod triton;

pub use metrics::Metrics;
pub use system::{
    ResourceSnapshot, Sampler, SnapshotCache, process_cpu_seconds, resident_bytes, thread_count,
};
