//! The gRPC front-ends: generated protos, one file per service, the one place
//! where domain errors become `tonic::Status`, and the tower layers every
//! service shares (arrival stamps, limits, authentication).
//!
//! - [`compute`] serves `splitlearn.comm.ComputeService`.
//! - [`inference`] serves `inference.GRPCInferenceService` (the Open Inference
//!   Protocol); the HTTP front-end calls the same functions.
//! - [`layers`] holds deadlines from `grpc-timeout`, request limits (message size,
//!   memory budget, body timeout), authentication, status rewrites.

use tonic::Status;

use crate::codec::{CodecError, RawTensor};
use crate::engine::EngineError;
use crate::model::ModelError;
use crate::telemetry::{Metrics, ResourceSnapshot};
use crate::training::TrainingError;
use crate::training::sessions::SessionError;

pub mod compute;
pub mod inference;
pub mod layers;

pub use compute::{ComputeApi, StaticInfo};
pub use layers::{Arrival, deadline_from_metadata};

/// Generated code: the Open Inference Protocol (package `inference`) and
/// `splitlearn.comm`, with the descriptor set for reflection.
pub use crate::proto::{comm as pb, inference as inference_pb};

/// Full gRPC service name, as health checks and Kubernetes probes name it.
pub const SERVICE_NAME: &str = "splitlearn.comm.ComputeService";

/// Everything that can go wrong with a request, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0} is not supported by this server yet")]
    Unimplemented(&'static str),
    #[error("{0}")]
    BadRequest(String),
    /// The caller may not do this (a model that is not trainable, a token's scope).
    #[error("{0}")]
    PermissionDenied(String),
    /// A bounded queue in front of expensive work is full.
    #[error("{0}")]
    Busy(String),
    /// A reply over `--max-message-bytes`, refused before it is built.
    #[error("{0}")]
    ReplyTooLarge(String),
    /// An Open Inference Protocol request that does not fit the model.
    #[error(transparent)]
    V2(#[from] crate::v2::V2Error),
    /// A model repository request that cannot be done.
    #[error(transparent)]
    Repository(#[from] crate::repository::RepositoryError),
}

impl ServeError {
    /// The client sent something the server cannot compute (counted as `invalid`).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            ServeError::Codec(_)
                | ServeError::BadRequest(_)
                | ServeError::V2(_)
                | ServeError::Engine(EngineError::Model(ModelError::InvalidInput { .. }))
                | ServeError::Engine(EngineError::Training(
                    TrainingError::GradShape { .. }
                        | TrainingError::WrongModel { .. }
                        | TrainingError::BadRequest(_)
                        | TrainingError::StepRejected { .. }
                ))
        )
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        // Client text inside is already clipped; this bounds the whole message.
        let msg = crate::codec::cut(&e.to_string(), layers::MAX_STATUS_MESSAGE);
        match e {
            ServeError::Codec(c) => match c {
                CodecError::DecompressedTooLarge { .. } => Status::resource_exhausted(msg),
                CodecError::TooManyDims { .. }
                | CodecError::NegativeDimension { .. }
                | CodecError::TooManyElements { .. }
                | CodecError::LengthMismatch { .. }
                | CodecError::ExplicitLengthMismatch { .. }
                | CodecError::UnknownDtype(_) => Status::invalid_argument(msg),
            },
            ServeError::Engine(en) => match en {
                EngineError::UnknownModel { .. } | EngineError::UnknownVersion { .. } => {
                    Status::not_found(msg)
                }
                EngineError::Unsupported(_) => Status::failed_precondition(msg),
                EngineError::Loading
                | EngineError::Draining
                | EngineError::Failed(_)
                | EngineError::DeviceLost(_) => Status::unavailable(msg),
                EngineError::QueueFull { .. } => Status::resource_exhausted(msg),
                EngineError::DeadlineExceeded { .. } => Status::deadline_exceeded(msg),
                EngineError::Model(m) => model_status(&m, msg),
                EngineError::Training(t) => match t {
                    TrainingError::NotFound { .. } => Status::not_found(msg),
                    TrainingError::AlreadyExists { .. } => Status::already_exists(msg),
                    TrainingError::WrongModel { .. }
                    | TrainingError::GradShape { .. }
                    | TrainingError::BadRequest(_)
                    | TrainingError::StepRejected { .. } => Status::invalid_argument(msg),
                    TrainingError::Stale { .. } => Status::aborted(msg),
                    TrainingError::TooLarge { .. } => Status::resource_exhausted(msg),
                    TrainingError::Session(s) => match s {
                        SessionError::Unknown
                        | SessionError::Moved { .. }
                        | SessionError::WrongModel { .. }
                        | SessionError::NotEnabled { .. } => Status::failed_precondition(msg),
                        SessionError::Busy => Status::aborted(msg),
                        SessionError::TooLarge { .. } => Status::resource_exhausted(msg),
                    },
                    TrainingError::Model(m) => model_status(&m, msg),
                },
                EngineError::Internal(_) => Status::internal(msg),
            },
            ServeError::Unimplemented(_) => Status::unimplemented(msg),
            ServeError::Repository(r) => match r {
                crate::repository::RepositoryError::NotFound(_) => Status::not_found(msg),
                crate::repository::RepositoryError::LoadFailed { .. }
                | crate::repository::RepositoryError::NotAllowed(_) => {
                    Status::failed_precondition(msg)
                }
                crate::repository::RepositoryError::Busy(_) => Status::unavailable(msg),
            },
            ServeError::BadRequest(_) => Status::invalid_argument(msg),
            ServeError::PermissionDenied(_) => Status::permission_denied(msg),
            ServeError::Busy(_) | ServeError::ReplyTooLarge(_) => Status::resource_exhausted(msg),
            ServeError::V2(_) => Status::invalid_argument(msg),
        }
    }
}

fn model_status(m: &ModelError, msg: String) -> Status {
    match m {
        ModelError::InvalidInput { .. } => Status::invalid_argument(msg),
        ModelError::Internal { .. }
        | ModelError::Load { .. }
        | ModelError::Device { .. }
        | ModelError::DeviceFailed { .. } => Status::internal(msg),
        // Memory frees as other forwards end: worth a retry (with backoff).
        ModelError::OutOfMemory { .. } => Status::resource_exhausted(msg),
    }
}

/// Ends a request in any protocol: logs a failure (INTERNAL at warn: the
/// operator's to fix), counts invalid input as a rejection, and counts the
/// answer and its server time.
pub fn finish<T>(
    metrics: &Metrics,
    protocol: &str,
    model: &str,
    method: &str,
    arrival: std::time::Instant,
    result: Result<T, ServeError>,
) -> Result<T, Status> {
    let result = result.map_err(|e| {
        let internal = matches!(
            &e,
            ServeError::Engine(EngineError::Internal(_))
                | ServeError::Engine(EngineError::Model(
                    ModelError::Internal { .. } | ModelError::DeviceFailed { .. }
                ))
        );
        if internal {
            tracing::warn!(error = %e, method, "request failed with INTERNAL");
        } else {
            tracing::debug!(error = %e, method, "request failed");
        }
        if e.is_invalid_input() {
            metrics
                .rejected
                .with_label_values(&[model, crate::telemetry::metrics::reason::INVALID])
                .inc();
        }
        if matches!(
            &e,
            ServeError::Engine(EngineError::Model(ModelError::OutOfMemory { .. }))
        ) {
            tracing::warn!(error = %e, method, "request failed: out of memory");
            metrics
                .rejected
                .with_label_values(&[model, crate::telemetry::metrics::reason::OUT_OF_MEMORY])
                .inc();
        }
        Status::from(e)
    });
    let (code, error) = match &result {
        Ok(_) => (tonic::Code::Ok, None),
        Err(s) => (s.code(), Some(s.message())),
    };
    observe(metrics, protocol, model, method, arrival, code, error);
    result
}

/// Counts an answered request and its server time, by protocol.
pub fn observe(
    metrics: &Metrics,
    protocol: &str,
    model: &str,
    method: &str,
    arrival: std::time::Instant,
    code: tonic::Code,
    error: Option<&str>,
) {
    metrics
        .requests
        .with_label_values(&[model, protocol, method, code_name(code)])
        .inc();
    let elapsed = arrival.elapsed();
    metrics
        .request_duration
        .with_label_values(&[model, protocol, method])
        .observe(elapsed.as_secs_f64());
    // Off unless --access-log (or RUST_LOG) turns this target on.
    if tracing::enabled!(target: "splitserve::access", tracing::Level::INFO) {
        let (bytes_in, bytes_out) = layers::payload();
        // Whole microseconds: 30.995, not 30.994999999999997.
        let duration_ms = elapsed.as_micros() as f64 / 1e3;
        let trace_id =
            crate::telemetry::otel::trace_id(&tracing::Span::current()).unwrap_or_default();
        // A failed answer's message names what was wrong (the shape, the limit).
        let error = error.map(crate::codec::clip);
        tracing::info!(
            target: "splitserve::access",
            model,
            protocol,
            method,
            code = code_name(code),
            duration_ms,
            bytes_in,
            bytes_out,
            trace_id,
            error = error.as_deref(),
            "request"
        );
    }
}

/// gRPC's canonical code names, as the `code` label spells them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn wire_shape(t: &RawTensor) -> Result<Vec<i32>, ServeError> {
    t.shape
        .iter()
        .map(|&d| i32::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            ServeError::Engine(EngineError::Internal(format!(
                "output shape {:?} does not fit the protocol's int32 dimensions",
                t.shape
            )))
        })
}

const MIB: f32 = 1024.0 * 1024.0;

pub fn snapshot_to_pb(s: ResourceSnapshot) -> pb::MonitoringSnapshot {
    pb::MonitoringSnapshot {
        timestamp: s.timestamp,
        cpu_percent: s.cpu_percent,
        memory_mb: s.memory_mb,
        memory_percent: s.memory_percent,
        gpu_available: s.gpu_available,
        // Percent, like cpu_percent and memory_percent.
        gpu_utilization: s.gpu.and_then(|g| g.utilization).map(|u| u * 100.0),
        gpu_memory_used_mb: s.gpu.map(|g| g.memory_used_bytes as f32 / MIB),
        gpu_memory_total_mb: s.gpu.map(|g| g.memory_total_bytes as f32 / MIB),
    }
}
