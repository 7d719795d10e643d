//! The gRPC surface: generated protos, the ComputeService implementation and the
//! one place where domain errors become `tonic::Status`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::codec::{self, CodecError, DTYPE_KEY, Encoding, Limits, RawTensor, WireDtype};
use crate::engine::{Engine, EngineError, EngineStatus};
use crate::model::ModelError;
use crate::plan::ThreadPlan;
use crate::telemetry::metrics::reason;
use crate::telemetry::{ResourceSnapshot, Sampler, SnapshotCache, otel};
use crate::training::{Step, TrainingError, Update};

/// Generated code for `splitlearn.comm` (kept in OUT_DIR).
#[allow(clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("splitlearn.comm");
    /// Descriptor set of the protos, for reflection and tooling.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("splitlearn_descriptor");
}

use pb::compute_service_server::ComputeService;

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
}

impl ServeError {
    /// The client sent something the server cannot compute (counted as `invalid`).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            ServeError::Codec(_)
                | ServeError::BadRequest(_)
                | ServeError::Engine(EngineError::Model(ModelError::InvalidInput { .. }))
                | ServeError::Engine(EngineError::Training(
                    TrainingError::GradShape { .. }
                        | TrainingError::WrongModel { .. }
                        | TrainingError::BadRequest(_)
                ))
        )
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        let msg = e.to_string();
        match e {
            ServeError::Codec(c) => match c {
                CodecError::NegativeDimension { .. }
                | CodecError::TooManyElements { .. }
                | CodecError::LengthMismatch { .. }
                | CodecError::ExplicitLengthMismatch { .. }
                | CodecError::UnknownDtype(_) => Status::invalid_argument(msg),
            },
            ServeError::Engine(en) => match en {
                EngineError::UnknownModel { .. } => Status::not_found(msg),
                EngineError::Loading | EngineError::Draining | EngineError::Failed(_) => {
                    Status::unavailable(msg)
                }
                EngineError::QueueFull { .. } => Status::resource_exhausted(msg),
                EngineError::DeadlineExceeded { .. } => Status::deadline_exceeded(msg),
                EngineError::Model(m) => model_status(&m, msg),
                EngineError::Training(t) => match t {
                    TrainingError::NotFound { .. } => Status::not_found(msg),
                    TrainingError::AlreadyExists { .. } => Status::already_exists(msg),
                    TrainingError::WrongModel { .. }
                    | TrainingError::GradShape { .. }
                    | TrainingError::BadRequest(_) => Status::invalid_argument(msg),
                    TrainingError::Stale { .. } => Status::aborted(msg),
                    TrainingError::TooLarge { .. } => Status::resource_exhausted(msg),
                    TrainingError::Model(m) => model_status(&m, msg),
                },
                EngineError::Internal(_) => Status::internal(msg),
            },
            ServeError::Unimplemented(_) => Status::unimplemented(msg),
            ServeError::BadRequest(_) => Status::invalid_argument(msg),
        }
    }
}

fn model_status(m: &ModelError, msg: String) -> Status {
    match m {
        ModelError::InvalidInput { .. } => Status::invalid_argument(msg),
        ModelError::Internal { .. } | ModelError::Load { .. } | ModelError::Device { .. } => {
            Status::internal(msg)
        }
    }
}

/// Facts GetServiceInfo reports that do not change after start-up.
#[derive(Debug, Clone)]
pub struct StaticInfo {
    pub version: &'static str,
    pub torch_version: &'static str,
    pub plan: ThreadPlan,
    pub max_message_bytes: usize,
    /// A worker busy on one job longer than this is stalled.
    pub stall_timeout: Duration,
}

/// The ComputeService implementation; cheap to clone.
#[derive(Clone)]
pub struct ComputeApi {
    engine: Engine,
    info: Arc<StaticInfo>,
    limits: Limits,
    snapshots: SnapshotCache,
    started: Instant,
    total_requests: Arc<AtomicI64>,
}

impl ComputeApi {
    pub fn new(engine: Engine, info: StaticInfo, limits: Limits, snapshots: SnapshotCache) -> Self {
        ComputeApi {
            engine,
            info: Arc::new(info),
            limits,
            snapshots,
            started: Instant::now(),
            total_requests: Arc::new(AtomicI64::new(0)),
        }
    }

    fn uptime(&self) -> f32 {
        self.started.elapsed().as_secs_f32()
    }

    fn device(&self) -> String {
        match self.engine.device() {
            Some(d) => crate::model::device_name(d),
            None => "loading".into(),
        }
    }

    async fn run_compute(
        &self,
        deadline: Option<Instant>,
        req: pb::ComputeRequest,
    ) -> Result<(pb::ComputeResponse, Option<&'static str>), ServeError> {
        let training = req.training_mode == Some(true);
        let kv = !req.past_key_values.is_empty() || req.use_cache == Some(true);
        if training && kv {
            return Err(ServeError::Unimplemented(
                "training_mode together with a KV cache (past_key_values, use_cache)",
            ));
        }
        let hint = req.metadata.get(DTYPE_KEY).map(String::as_str);
        let (input, enc) = codec::decode(req.data, &req.shape, hint, self.limits)?;
        // The KV tensors use splitlearn_comm's float encodings, like the input.
        let kv_enc = Encoding {
            explicit: false,
            dtype: if enc.explicit {
                WireDtype::F32
            } else {
                enc.dtype
            },
            ..enc
        };
        let forward_id = match req.forward_id {
            Some(id) if !id.is_empty() => Some(id),
            _ if training => Some(uuid::Uuid::new_v4().to_string()),
            _ => None,
        };
        let step = if training {
            forward_id
                .clone()
                .map(|forward_id| Step::Forward { forward_id })
        } else if kv {
            Some(Step::Kv {
                past: decode_past(&req.past_key_values, self.limits)?,
                kv_enc,
                want_present: req.use_cache != Some(false),
            })
        } else {
            None
        };
        let out = self
            .engine
            .submit(&req.model_id, input, enc, deadline, step)
            .await?;
        let shape = wire_shape(&out.tensor)?;
        let data = codec::encode(&out.tensor, enc);
        let present_key_values = out
            .present_key_values
            .chunks_exact(2)
            .map(|kv| {
                Ok(pb::KvCacheEntry {
                    key_data: codec::encode(&kv[0], kv_enc),
                    key_shape: wire_shape(&kv[0])?,
                    value_data: codec::encode(&kv[1], kv_enc),
                    value_shape: wire_shape(&kv[1])?,
                })
            })
            .collect::<Result<Vec<_>, ServeError>>()?;
        let response = pb::ComputeResponse {
            data,
            shape,
            request_id: req.request_id,
            compute_time_ms: Some(out.compute_time.as_secs_f32() * 1000.0),
            monitoring_data: Some(snapshot_to_pb(self.snapshots.get())),
            forward_id,
            present_key_values,
        };
        Ok((response, enc.explicit.then(|| out.tensor.dtype.name())))
    }

    /// ComputeBackward: grad_output through the graph stored for forward_id on
    /// the model that computed it; a learning_rate also trains (docs/training.md).
    async fn backward(
        &self,
        deadline: Option<Instant>,
        req: pb::BackwardRequest,
    ) -> Result<pb::BackwardResponse, ServeError> {
        if req.forward_id.is_empty() {
            return Err(ServeError::BadRequest(
                "forward_id is empty: send the one Compute with training_mode=true returned".into(),
            ));
        }
        let learning_rate = match req.learning_rate {
            None => None,
            Some(lr) if lr.is_finite() && lr >= 0.0 => Some(f64::from(lr)),
            Some(lr) => {
                return Err(ServeError::BadRequest(format!(
                    "learning_rate must be a finite number >= 0, not {lr}"
                )));
            }
        };
        let accumulation = match req.accumulation_step {
            None | Some(0) | Some(1) => 1,
            Some(n) if n > 1 && learning_rate.is_some() => n as u32,
            Some(n) if n > 1 => {
                return Err(ServeError::BadRequest(format!(
                    "accumulation_step {n} needs a learning_rate: without one ComputeBackward \
                     only returns the input gradient and accumulates nothing"
                )));
            }
            Some(n) => {
                return Err(ServeError::BadRequest(format!(
                    "accumulation_step must be >= 1, not {n}"
                )));
            }
        };
        let model = self
            .engine
            .training()
            .backward_model(&req.forward_id, req.model_id.as_deref())
            .map_err(EngineError::from)?;
        let (grad, enc) = codec::decode(
            req.grad_output_data,
            &req.grad_output_shape,
            None,
            self.limits,
        )?;
        let step = Step::Backward {
            forward_id: req.forward_id.clone(),
            update: learning_rate.map(|learning_rate| Update {
                learning_rate,
                accumulation,
            }),
        };
        let out = self
            .engine
            .submit(&model, grad, enc, deadline, Some(step))
            .await?;
        // No gradient with respect to an integer input: empty data and shape.
        let none = out.tensor.data.is_empty() && out.tensor.shape.is_empty();
        Ok(pb::BackwardResponse {
            grad_input_data: if none {
                Default::default()
            } else {
                codec::encode(&out.tensor, enc)
            },
            grad_input_shape: wire_shape(&out.tensor)?,
            forward_id: req.forward_id,
            backward_time_ms: Some(out.compute_time.as_secs_f32() * 1000.0),
            monitoring_data: Some(snapshot_to_pb(self.snapshots.get())),
        })
    }
}

/// `past_key_values` as the flat `[key_0, value_0, key_1, ...]` the model takes.
fn decode_past(entries: &[pb::KvCacheEntry], limits: Limits) -> Result<Vec<RawTensor>, ServeError> {
    let mut past = Vec::with_capacity(entries.len() * 2);
    for (i, e) in entries.iter().enumerate() {
        for (what, data, shape) in [
            ("key", &e.key_data, &e.key_shape),
            ("value", &e.value_data, &e.value_shape),
        ] {
            let (t, _) = codec::decode(data.clone(), shape, None, limits).map_err(|err| {
                ServeError::BadRequest(format!("past_key_values[{i}].{what}: {err}"))
            })?;
            past.push(t);
        }
    }
    Ok(past)
}

impl ComputeApi {
    /// Starts a tensor RPC: counts it in flight; returns its arrival and deadline.
    fn begin<T>(&self, request: &Request<T>) -> (Instant, Option<Instant>) {
        self.total_requests.fetch_add(1, Ordering::Relaxed);
        self.engine.metrics().inflight.inc();
        let arrival = request
            .extensions()
            .get::<Arrival>()
            .map_or_else(Instant::now, |a| a.0);
        (arrival, deadline_from_metadata(request.metadata(), arrival))
    }

    /// Ends a tensor RPC begun with [`ComputeApi::begin`]: counts invalid input as
    /// a rejection, the answer by code and its server time.
    fn finish<T>(
        &self,
        model: &str,
        method: &str,
        arrival: Instant,
        result: Result<T, ServeError>,
    ) -> Result<T, Status> {
        let metrics = self.engine.metrics();
        let result = result.map_err(|e| {
            tracing::debug!(error = %e, method, "request failed");
            if e.is_invalid_input() {
                metrics
                    .rejected
                    .with_label_values(&[model, reason::INVALID])
                    .inc();
            }
            Status::from(e)
        });
        metrics.inflight.dec();
        self.observe(model, method, arrival, &result);
        result
    }

    /// Counts an answered RPC and its server time.
    fn observe<T>(&self, model: &str, method: &str, arrival: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        let m = self.engine.metrics();
        m.requests
            .with_label_values(&[model, method, code_name(code)])
            .inc();
        m.request_duration
            .with_label_values(&[model, method])
            .observe(arrival.elapsed().as_secs_f64());
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
        gpu_utilization: s.gpu.map(|g| g.utilization * 100.0),
        gpu_memory_used_mb: s.gpu.map(|g| g.memory_used_bytes as f32 / MIB),
        gpu_memory_total_mb: s.gpu.map(|g| g.memory_total_bytes as f32 / MIB),
    }
}

/// When a request's headers reached the server, stamped by [`stamp_arrival`].
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

/// Records the arrival time before the body is read, so deadlines count from there.
pub fn stamp_arrival<B>(mut req: http::Request<B>) -> http::Request<B> {
    req.extensions_mut().insert(Arrival(Instant::now()));
    req
}

/// tonic's transport also enforces `grpc-timeout` and then answers CANCELLED
/// "Timeout expired" (grpc/grpc-rust#606); answering a little earlier ourselves
/// keeps the status DEADLINE_EXCEEDED, as the gRPC spec asks.
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// The deadline a client set with `grpc-timeout` (e.g. `100m` = 100 ms), counted
/// from the request's arrival.
pub fn deadline_from_metadata(
    md: &tonic::metadata::MetadataMap,
    arrival: Instant,
) -> Option<Instant> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    arrival.checked_add(d.saturating_sub(DEADLINE_MARGIN))
}

type SnapshotStream =
    Pin<Box<dyn Stream<Item = Result<pb::MonitoringSnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ComputeService for ComputeApi {
    async fn compute(
        &self,
        request: Request<pb::ComputeRequest>,
    ) -> Result<Response<pb::ComputeResponse>, Status> {
        let (arrival, deadline) = self.begin(&request);
        // Unknown model ids share one label value: clients cannot grow the series.
        let model = self
            .engine
            .resolve_model(&request.get_ref().model_id)
            .unwrap_or("unknown")
            .to_string();
        let span = tracing::debug_span!(
            "Compute",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = SERVICE_NAME,
            rpc.method = "Compute",
            model = %model,
            request_id = ?request.get_ref().request_id,
            shape = ?request.get_ref().shape,
        );
        otel::continue_trace(&span, request.metadata());
        let result = self
            .run_compute(deadline, request.into_inner())
            .instrument(span)
            .await;
        let result = result.map(|(reply, dtype)| {
            let mut response = Response::new(reply);
            if let Some(dtype) = dtype {
                response
                    .metadata_mut()
                    .insert(DTYPE_KEY, MetadataValue::from_static(dtype));
            }
            response
        });
        self.finish(&model, "Compute", arrival, result)
    }

    async fn compute_backward(
        &self,
        request: Request<pb::BackwardRequest>,
    ) -> Result<Response<pb::BackwardResponse>, Status> {
        let (arrival, deadline) = self.begin(&request);
        // The model that ran the forward; unknown ids share one label value.
        let req = request.get_ref();
        let model = self
            .engine
            .training()
            .backward_model(&req.forward_id, None)
            .ok()
            .or_else(|| {
                self.engine
                    .resolve_model(req.model_id.as_deref().unwrap_or(""))
                    .map(String::from)
            })
            .unwrap_or_else(|| "unknown".into());
        let span = tracing::debug_span!(
            "ComputeBackward",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = SERVICE_NAME,
            rpc.method = "ComputeBackward",
            model = %model,
            forward_id = %req.forward_id,
            shape = ?req.grad_output_shape,
        );
        otel::continue_trace(&span, request.metadata());
        let result = self
            .backward(deadline, request.into_inner())
            .instrument(span)
            .await;
        self.finish(
            &model,
            "ComputeBackward",
            arrival,
            result.map(Response::new),
        )
    }

    async fn health_check(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let status = self.engine.status().borrow().clone();
        let (ok, message) = match status {
            EngineStatus::Ready => (
                true,
                format!("serving {} model(s)", self.engine.model_names().len()),
            ),
            EngineStatus::Loading => (false, "loading and warming up models".to_string()),
            EngineStatus::Failed(m) => (false, format!("failed to start: {m}")),
            EngineStatus::Draining => (false, "draining: shutting down".to_string()),
            EngineStatus::Stopped => (false, "stopped".to_string()),
        };
        Ok(Response::new(pb::HealthResponse {
            status: if ok { "ok" } else { "unhealthy" }.into(),
            message,
            version: self.info.version.into(),
            uptime_seconds: Some(self.uptime()),
        }))
    }

    async fn get_service_info(
        &self,
        _request: Request<pb::ServiceInfoRequest>,
    ) -> Result<Response<pb::ServiceInfoResponse>, Status> {
        let plan = self.engine.applied_plan().unwrap_or(self.info.plan);
        let mut custom = HashMap::new();
        custom.insert("thread_plan".into(), plan.to_string());
        custom.insert("cpu_budget".into(), plan.budget.cores.to_string());
        custom.insert("cpu_budget_source".into(), plan.budget.source.to_string());
        custom.insert("workers".into(), plan.workers.to_string());
        custom.insert("intra_op_threads".into(), plan.intra_op_threads.to_string());
        custom.insert("inter_op_threads".into(), plan.inter_op_threads.to_string());
        custom.insert("io_threads".into(), plan.io_threads.to_string());
        custom.insert("oversubscribed".into(), plan.oversubscribed.to_string());
        custom.insert("torch_version".into(), self.info.torch_version.into());
        custom.insert(
            "max_message_bytes".into(),
            self.info.max_message_bytes.to_string(),
        );
        custom.insert(
            "queue_capacity".into(),
            self.engine.config().queue_capacity.to_string(),
        );
        custom.insert(
            "default_model".into(),
            self.engine
                .model_names()
                .first()
                .cloned()
                .unwrap_or_default(),
        );
        let m = self.engine.metrics();
        let total = |family, labels: &[(&str, &str)]| m.total(family, labels).to_string();
        custom.insert("requests_computed".into(), total(&m.computed, &[]));
        custom.insert("forwards".into(), total(&m.forwards, &[]));
        for r in [
            reason::QUEUE_FULL,
            reason::DEADLINE,
            reason::CANCELLED,
            reason::INVALID,
            reason::DRAINING,
        ] {
            custom.insert(
                format!("rejected_{r}"),
                total(&m.rejected, &[("reason", r)]),
            );
        }
        self.engine.training().add_service_info(&mut custom);
        custom.insert(
            "queue_depth".into(),
            self.engine.queue_depths().iter().sum::<usize>().to_string(),
        );
        custom.insert(
            "workers_busy".into(),
            self.engine.busy_workers().to_string(),
        );
        custom.insert(
            "workers_stalled".into(),
            self.engine
                .stalled_workers(self.info.stall_timeout)
                .to_string(),
        );
        if let Some(threads) = crate::telemetry::thread_count() {
            custom.insert("process_threads".into(), threads.to_string());
        }
        custom.insert("planned_threads".into(), plan.planned_threads().to_string());
        let loaded = self.engine.loaded_models();
        custom.insert(
            "models".into(),
            if loaded.is_empty() {
                self.engine.model_names().join(",")
            } else {
                loaded
                    .iter()
                    .map(|(n, d, _)| format!("{n}@{d}"))
                    .collect::<Vec<_>>()
                    .join(",")
            },
        );
        for (name, device, source) in &loaded {
            custom.insert(format!("model.{name}.device"), device.clone());
            custom.insert(format!("model.{name}.source"), source.clone());
        }
        for slot in &self.engine.config().models {
            if slot.max_batch > 1 {
                custom.insert(
                    format!("model.{}.batching", slot.spec.name),
                    format!(
                        "max {} rows, wait {} us",
                        slot.max_batch,
                        slot.batch_timeout.as_micros()
                    ),
                );
            }
        }
        Ok(Response::new(pb::ServiceInfoResponse {
            service_name: self
                .engine
                .model_names()
                .first()
                .cloned()
                .unwrap_or_default(),
            version: self.info.version.into(),
            device: self.device(),
            uptime_seconds: Some(self.uptime()),
            total_requests: self.total_requests.load(Ordering::Relaxed),
            custom_info: custom,
        }))
    }

    type StreamMonitoringStream = SnapshotStream;

    async fn stream_monitoring(
        &self,
        request: Request<pb::MonitoringStreamRequest>,
    ) -> Result<Response<Self::StreamMonitoringStream>, Status> {
        let requested = request.get_ref().sampling_interval.unwrap_or(1.0);
        let secs = if requested.is_finite() {
            requested.clamp(0.1, 5.0)
        } else {
            1.0
        };
        let gpu = self.snapshots.gpu_device();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stream = futures::stream::unfold(
            (tick, Sampler::new(gpu)),
            |(mut tick, mut sampler)| async move {
                tick.tick().await;
                let snapshot = snapshot_to_pb(sampler.sample());
                Some((
                    Ok(pb::MonitoringSnapshotResponse {
                        snapshot: Some(snapshot),
                    }),
                    (tick, sampler),
                ))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// tonic answers an over-limit request with OUT_OF_RANGE; gRPC's status table (and
/// the Python server) say RESOURCE_EXHAUSTED. Rewrites that one trailers-only answer.
pub fn message_limit_status<B>(mut res: http::Response<B>) -> http::Response<B> {
    let h = res.headers_mut();
    let is_limit = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if is_limit {
        let detail = h
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .map(|m| m.replace("%20", " ").replace("%3A", ":"))
            .unwrap_or_default();
        let sizes = detail.split("found ").nth(1).unwrap_or("").to_string();
        let text =
            format!("message too large for this server (--max-message-bytes): found {sizes}");
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
        if let Ok(v) = http::HeaderValue::from_str(&percent_encode(&text)) {
            h.insert("grpc-message", v);
        }
    }
    res
}

/// gRPC's grpc-message encoding: percent-encode everything outside printable ASCII and '%'.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("grpc-timeout", "250m".parse().unwrap());
        let d = deadline_from_metadata(&md, Instant::now()).unwrap();
        let left = d.saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_millis(250) && left > Duration::from_millis(200));
        md.insert("grpc-timeout", "junk".parse().unwrap());
        assert!(deadline_from_metadata(&md, Instant::now()).is_none());
    }

    #[test]
    fn over_limit_answers_become_resource_exhausted() {
        let res = http::Response::builder()
            .header("grpc-status", "11")
            .header(
                "grpc-message",
                "Error,%20decoded%20message%20length%20too%20large:%20found%202000%20bytes,%20the%20limit%20is:%201024%20bytes",
            )
            .body(())
            .unwrap();
        let res = message_limit_status(res);
        assert_eq!(res.headers()["grpc-status"], "8");
        let msg = res.headers()["grpc-message"].to_str().unwrap();
        assert!(msg.contains("2000 bytes") && msg.contains("1024"), "{msg}");
        let other = http::Response::builder()
            .header("grpc-status", "11")
            .body(())
            .unwrap();
        assert_eq!(message_limit_status(other).headers()["grpc-status"], "11");
    }
}
