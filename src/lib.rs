//! splitserve: a gRPC compute service for split learning and model-partition
//! inference on libtorch, wire-compatible with splitlearn_comm clients.
//!
//! # Layout
//! - [`cli`]: the command line (every flag also `SPLITSERVE_*`): parses, validates
//!   and converts into the plain configuration types the modules below own. The
//!   only module that knows about argument parsing.
//! - [`server`]: [`ServerConfig`] and [`run`]: engine, gRPC services and admin
//!   sidecar on listeners the caller bound; readiness, liveness, drain.
//! - [`plan`]: the CPU budget from cgroup v1/v2, cpuset and the OS; the thread plan;
//!   libtorch's thread settings, applied once.
//! - [`codec`]: wire bytes <-> raw tensors: dtype, shape, size checks, float16 and zlib.
//! - [`model`]: TorchScript, PyTorch 2 AOTInductor packages (.pt2, through a C++
//!   shim: `model::aoti`) and built-in models: loading, device placement, warm-up, forward.
//! - [`torchscript`]: what a TorchScript file declares about `forward` (its
//!   tensors in and out), read from the file's code without libtorch, for metadata.
//! - [`engine`]: per-model-version bounded queues, batcher, dedicated inference
//!   workers (a model's instances capped from the pool), deadlines, cancellation,
//!   drain, and loads and unloads at run time on its loader thread (switched in
//!   atomically; each load's libtorch work on a thread that ends with it, so its
//!   OpenMP helpers do too). The only place libtorch computes (the GPU sampler
//!   thread only reads the caching allocator's counters).
//! - [`repository`]: Triton's model repository: config.pbtxt parsed by reflection
//!   against `proto/inference/model_config.proto`, version policies, and the
//!   none / poll / explicit control modes that load and unload through the engine.
//! - [`proto`]: the generated protobuf code (`splitlearn.comm`, `inference`) and
//!   its descriptor set, shared by the front-ends and the repository.
//! - [`training`]: split training and KV-cache steps: activations stored by forward_id,
//!   backward, optimizer steps, checkpoints, and KV sessions (decoding caches kept
//!   on the server behind a handle, `training::sessions`; decode steps of many
//!   sessions batched into one forward and long prompts run in chunks,
//!   `training::decode`). Runs on the engine's workers.
//! - [`grpc`]: generated protos (`pb`), one file per service (ComputeService), the
//!   error -> `Status` mapping, and the tower layers every service shares (limits,
//!   authentication); ComputeService and the Open Inference Protocol
//!   (`inference.GRPCInferenceService`), plus gRPC reflection.
//! - [`listen`]: accepting connections: connection limits fitted into the file
//!   descriptor limit, a separate pool and timeout for sockets in their
//!   handshake, TLS with certificates reloaded on change, idle and write-stall
//!   close, back-off when out of file descriptors; serving HTTP/2 and HTTP/1.1
//!   with requests marking their connection busy.
//! - [`auth`]: bearer tokens with scopes, reloaded on change.
//! - [`v2`]: the Open Inference Protocol's tensors (datatypes, names, checks
//!   against a model's signature), shared by its gRPC and HTTP front-ends.
//! - [`http`]: the Open Inference Protocol over HTTP/REST (axum), same engine.
//! - [`telemetry`]: the Prometheus registry, logging and OTLP traces, and the
//!   process/cgroup/GPU readings behind metrics and monitoring snapshots (NVML
//!   read on its own thread, for the GPUs the models use, with the CUDA caching
//!   allocator's figures through a C++ shim: `telemetry::cuda_memory`); Triton's
//!   `nv_*` families beside splitserve's (`telemetry::triton`).
//! - [`admin`]: the axum sidecar: `/metrics`, `/livez`, `/readyz`, `/debug/plan`.
//! - [`client`], [`bench`]: `probe` (grpc.health.v1 check) and the closed-loop
//!   load generator, from the `splitserve-client` crate (no libtorch; it also
//!   builds the small `splitserve-client` binary).
//! - [`diagnose`]: `splitserve diagnose`, the contention diagnostic.
//!
//! The thread model: tonic runs on a small tokio runtime (io threads) that decodes
//! and validates; W worker threads own every libtorch call; a oneshot carries each
//! reply back. `main.rs` only parses, sets up logging and calls [`run`].
//!
//! Dependencies point one way: `cli` builds the configs that `server`, `engine`,
//! `repository`, `model`, `training`, `plan` and `telemetry` own; the front-ends
//! (`grpc`, `http`, `admin`) call `repository` and `engine`; `repository` calls
//! `engine`, which calls `model` and `training`; `proto` and `telemetry` are
//! called from anywhere and call nothing back.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod auth;
pub mod cli;
pub mod codec;
pub mod diagnose;
pub mod engine;
pub mod grpc;
pub mod http;
pub mod listen;
pub mod model;
pub mod plan;
pub mod proto;
pub mod repository;
pub mod server;
pub mod telemetry;
pub mod torchscript;
pub mod training;
pub mod v2;

pub use server::{Listeners, RunError, ServerConfig, run};
/// `probe` and `bench` live in the libtorch-free client crate.
pub use splitserve_client::{bench, probe as client};

/// libtorch version this binary was built against.
pub const TORCH_VERSION: &str = env!("SPLITSERVE_TORCH_VERSION");
