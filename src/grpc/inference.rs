//! `inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2)
//! with Triton's ModelConfig and ModelStatistics. A thin front-end over the
//! same engine as ComputeService; the HTTP front-end (`http`) calls the same
//! functions, so both protocols answer alike.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::inference_pb as pb;
use super::layers::{Arrival, ReplyGuard};
use super::{ServeError, deadline_from_metadata};
use crate::auth::{Granted, Scope};
use crate::codec::{self, Limits, RawTensor};
use crate::engine::{Engine, EngineError, EngineStatus, LoadedModel};
use crate::repository::config::datatype_name;
use crate::repository::{IndexEntry, Repository, RepositoryError};
use crate::telemetry::metrics::{protocol, reason};
use crate::telemetry::otel;
use crate::v2::{self, InputTensor, Values};

/// Extensions of the protocol this server implements, as ServerMetadata lists them.
pub const EXTENSIONS: [&str; 5] = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
    "parameters",
];

/// The Open Inference Protocol's shared core; cheap to clone.
#[derive(Clone)]
pub struct InferenceApi {
    engine: Engine,
    limits: Limits,
    version: &'static str,
    /// A worker busy on one job longer than this means the server is not live.
    stall_timeout: Duration,
    /// The model repository, when the server has one.
    repository: Option<Repository>,
    /// The server's readiness (start-up models loaded, not draining); None:
    /// the engine's status alone.
    started: Option<tokio::sync::watch::Receiver<bool>>,
}

/// A v2 inference request, whichever front-end it came through.
#[derive(Clone)]
pub struct InferRequest {
    pub model: String,
    pub version: String,
    pub id: String,
    pub inputs: Vec<InputTensor>,
    /// Output names asked for; empty: all.
    pub outputs: Vec<String>,
    /// From grpc-timeout or the request's `timeout` parameter (microseconds).
    pub deadline: Option<Instant>,
}

/// Its answer: the model (and version) that computed it and the named outputs.
pub struct InferReply {
    pub model: String,
    pub version: String,
    pub id: String,
    pub outputs: Vec<(String, RawTensor)>,
}

impl InferenceApi {
    pub fn new(
        engine: Engine,
        limits: Limits,
        version: &'static str,
        stall_timeout: Duration,
        repository: Option<Repository>,
    ) -> Self {
        InferenceApi {
            engine,
            limits,
            version,
            stall_timeout,
            repository,
            started: None,
        }
    }

    /// Ready only while `ready` is true as well: the server's own signal,
    /// which waits for the repository's start-up models too.
    pub fn with_readiness(mut self, ready: tokio::sync::watch::Receiver<bool>) -> Self {
        self.started = Some(ready);
        self
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn live(&self) -> bool {
        self.engine.not_live(self.stall_timeout).is_none()
    }

    pub fn ready(&self) -> bool {
        *self.engine.status().borrow() == EngineStatus::Ready
            && !self.engine.device_lost()
            && self.started.as_ref().is_none_or(|r| *r.borrow())
    }

    /// The loaded model version a v2 name and version mean (empty version: the
    /// newest), or NOT_FOUND naming what is loaded.
    pub fn resolve(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, ServeError> {
        if name.is_empty() {
            return Err(ServeError::Engine(EngineError::UnknownModel {
                name: String::new(),
                known: self.engine.known_models(),
            }));
        }
        let wanted = if version.is_empty() {
            None
        } else {
            match version.parse::<u64>() {
                Ok(v) => Some(v),
                Err(_) => {
                    return Err(ServeError::Engine(EngineError::UnknownVersion {
                        name: codec::clip(name),
                        version: codec::clip(version),
                        loaded: self.versions_of(name).join(", "),
                    }));
                }
            }
        };
        self.engine
            .resolve_version(name, wanted)
            .map_err(|e| match e {
                // Not known yet because the models are still loading: retry, not 404.
                EngineError::UnknownModel { .. }
                    if *self.engine.status().borrow() == EngineStatus::Loading =>
                {
                    ServeError::Engine(EngineError::Loading)
                }
                EngineError::UnknownModel { .. } => {
                    let why = self
                        .repository
                        .as_ref()
                        .and_then(|r| r.failure(name))
                        .map(|f| {
                            format!(
                                " ({} failed to load: {})",
                                codec::clip(name),
                                codec::clip(&f)
                            )
                        })
                        .unwrap_or_default();
                    ServeError::Engine(EngineError::UnknownModel {
                        name: codec::clip(name),
                        known: format!("{}{why}", self.engine.known_models()),
                    })
                }
                other => ServeError::Engine(other),
            })
    }

    /// The loaded versions of a model, oldest first.
    fn versions_of(&self, name: &str) -> Vec<String> {
        self.engine
            .loaded()
            .into_iter()
            .filter(|m| m.name == name)
            .map(|m| m.version.to_string())
            .collect()
    }

    pub fn model_ready(&self, name: &str, version: &str) -> bool {
        self.resolve(name, version).is_ok() && self.ready()
    }

    pub fn server_metadata(&self) -> pb::ServerMetadataResponse {
        pb::ServerMetadataResponse {
            name: "splitserve".into(),
            version: self.version.into(),
            extensions: EXTENSIONS.iter().map(|e| (*e).into()).collect(),
        }
    }

    pub fn model_metadata(
        &self,
        name: &str,
        version: &str,
    ) -> Result<pb::ModelMetadataResponse, ServeError> {
        use pb::model_metadata_response::TensorMetadata;
        let model = self.resolve(name, version)?;
        let versions = self.versions_of(&model.name);
        if let Some(cfg) = &model.slot.config {
            // A repository model describes itself by its config: its names, and
            // the batch dimension as -1 when it batches.
            let shape = |dims: &[i64]| {
                let mut s = Vec::with_capacity(dims.len() + 1);
                if cfg.max_batch_size > 0 {
                    s.push(-1);
                }
                s.extend_from_slice(dims);
                s
            };
            return Ok(pb::ModelMetadataResponse {
                name: model.name.clone(),
                versions,
                platform: cfg.platform.clone(),
                inputs: cfg
                    .input
                    .iter()
                    .map(|i| TensorMetadata {
                        name: i.name.clone(),
                        datatype: datatype_name(i.data_type).into(),
                        shape: shape(&i.dims),
                    })
                    .collect(),
                outputs: cfg
                    .output
                    .iter()
                    .map(|o| TensorMetadata {
                        name: o.name.clone(),
                        datatype: datatype_name(o.data_type).into(),
                        shape: shape(&o.dims),
                    })
                    .collect(),
            });
        }
        // Never empty: what is known, else forward's declaration (docs/inference-protocol.md).
        let sig = &model.listed;
        let tensors = |list: &[crate::model::TensorSig], name: fn(usize) -> String| {
            list.iter()
                .enumerate()
                .map(|(i, t)| TensorMetadata {
                    name: name(i),
                    datatype: v2::datatype_name(t.dtype).into(),
                    shape: t.shape.clone(),
                })
                .collect()
        };
        Ok(pb::ModelMetadataResponse {
            name: model.name.clone(),
            versions,
            platform: "pytorch_libtorch".into(),
            inputs: tensors(&sig.inputs, v2::input_name),
            outputs: tensors(&sig.outputs, v2::output_name),
        })
    }

    /// Triton's model configuration: a repository model's config.pbtxt as
    /// loaded; for a `--model`, `max_batch_size` is its --max-batch-size and
    /// `dims` leave out the batch dimension.
    pub fn model_config(&self, name: &str, version: &str) -> Result<pb::ModelConfig, ServeError> {
        let model = self.resolve(name, version)?;
        if let Some(cfg) = &model.slot.config {
            return Ok((**cfg).clone());
        }
        let sig = &model.listed;
        let (max_batch, batch_timeout) = (model.slot.max_batch, model.slot.batch_timeout);
        let dims = |shape: &[i64]| shape.iter().skip(1).copied().collect::<Vec<_>>();
        let gpu = model.device.starts_with("cuda");
        let workers = self.engine.config().plan.workers;
        Ok(pb::ModelConfig {
            name: model.name.clone(),
            platform: "pytorch_libtorch".into(),
            backend: "pytorch".into(),
            max_batch_size: i32::try_from(max_batch).unwrap_or(i32::MAX),
            input: sig
                .inputs
                .iter()
                .enumerate()
                .map(|(i, t)| pb::ModelInput {
                    name: v2::input_name(i),
                    data_type: pb::DataType::from(t.dtype) as i32,
                    dims: dims(&t.shape),
                    ..Default::default()
                })
                .collect(),
            output: sig
                .outputs
                .iter()
                .enumerate()
                .map(|(i, t)| pb::ModelOutput {
                    name: v2::output_name(i),
                    data_type: pb::DataType::from(t.dtype) as i32,
                    dims: dims(&t.shape),
                    ..Default::default()
                })
                .collect(),
            scheduling_choice: (max_batch > 1).then(|| {
                pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
                    max_queue_delay_microseconds: batch_timeout.as_micros() as u64,
                    ..Default::default()
                })
            }),
            instance_group: vec![pb::ModelInstanceGroup {
                name: "workers".into(),
                kind: if gpu {
                    pb::model_instance_group::Kind::Gpu
                } else {
                    pb::model_instance_group::Kind::Cpu
                } as i32,
                count: i32::try_from(workers).unwrap_or(i32::MAX),
                ..Default::default()
            }],
            default_model_filename: "model.pt".into(),
            ..Default::default()
        })
    }

    /// Cumulative counts and times per model, from the same metrics Prometheus reads.
    pub fn model_statistics(
        &self,
        name: &str,
        version: &str,
    ) -> Result<pb::ModelStatisticsResponse, ServeError> {
        let models: Vec<(String, String)> = if name.is_empty() {
            self.engine
                .loaded()
                .into_iter()
                .map(|m| (m.name.clone(), m.version.to_string()))
                .collect()
        } else {
            let m = self.resolve(name, version)?;
            vec![(m.name.clone(), m.version.to_string())]
        };
        let m = self.engine.metrics();
        let duration = |h: &prometheus::HistogramVec, model: &str| {
            let h = h.with_label_values(&[model]);
            let (count, sum) = (h.get_sample_count(), h.get_sample_sum());
            pb::StatisticDuration {
                count,
                ns: (sum * 1e9) as u64,
            }
        };
        let model_stats = models
            .iter()
            .map(|(model, version)| {
                let computed = m.total(&m.computed, &[("model", model)]);
                let infer = duration(&m.inference_duration, model);
                let queue = duration(&m.queue_duration, model);
                // Input and output conversion happen inside the timed forward:
                // same count, no time of their own. perf_analyzer requires the
                // three counts to be equal.
                let inside = pb::StatisticDuration {
                    count: infer.count,
                    ns: 0,
                };
                let failed = m.total(
                    &m.rejected,
                    &[("model", model), ("reason", reason::INVALID)],
                );
                pb::ModelStatistics {
                    name: model.clone(),
                    version: version.clone(),
                    last_inference: 0,
                    // Triton's meaning: a batch of n counts n (nv_inference_count).
                    inference_count: m
                        .triton
                        .inference_count
                        .with_label_values(&[model, version])
                        .get(),
                    execution_count: m.total(&m.forwards, &[("model", model)]),
                    inference_stats: Some(pb::InferStatistics {
                        success: Some(pb::StatisticDuration {
                            count: computed,
                            ns: infer.ns + queue.ns,
                        }),
                        fail: Some(pb::StatisticDuration {
                            count: failed,
                            ns: 0,
                        }),
                        queue: Some(queue),
                        compute_input: Some(inside),
                        compute_infer: Some(infer),
                        compute_output: Some(inside),
                    }),
                    batch_stats: Vec::new(),
                }
            })
            .collect();
        Ok(pb::ModelStatisticsResponse { model_stats })
    }

    /// Checks a token's scope (when tokens are on).
    pub fn authorize(&self, granted: Option<&Granted>) -> Result<(), ServeError> {
        self.authorize_for(granted, Scope::Infer)
    }

    /// Checks a token's scope for a call that needs `scope`.
    pub fn authorize_for(&self, granted: Option<&Granted>, scope: Scope) -> Result<(), ServeError> {
        match granted {
            Some(g) if !g.allows(scope) => {
                self.engine
                    .metrics()
                    .auth_failures
                    .with_label_values(&["permission_denied"])
                    .inc();
                Err(ServeError::PermissionDenied(format!(
                    "this token lacks the {:?} scope this call needs",
                    scope.name()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Checks a request against the model and runs it through the engine.
    pub async fn infer(&self, req: InferRequest) -> Result<InferReply, ServeError> {
        // A request that names no version gets the newest: if a reload retired
        // the version it resolved to before the engine took the job, it is
        // resolved again (at most a few times) instead of failing.
        let mut tries = 0;
        loop {
            match self.infer_once(req.clone()).await {
                Err(ServeError::Engine(EngineError::UnknownVersion { .. }))
                    if req.version.is_empty() && tries < 3 =>
                {
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    async fn infer_once(&self, mut req: InferRequest) -> Result<InferReply, ServeError> {
        let model = self.resolve(&req.model, &req.version)?;
        v2::check_requested_outputs(&req.outputs)?;
        if let Some(cfg) = &model.slot.config {
            v2::check_against_config(cfg, &mut req.inputs, &mut req.outputs)?;
        }
        let inputs = v2::order_inputs(
            &model.name,
            req.inputs,
            model.signature.as_ref(),
            self.limits,
        )?;
        let out = self
            .engine
            .infer_all(&model.name, Some(model.version), inputs, req.deadline)
            .await?;
        let mut all = Vec::with_capacity(1 + out.others.len());
        all.push(out.tensor);
        all.extend(out.others);
        let mut outputs = v2::select_outputs(all, &req.outputs)?;
        if let Some(cfg) = &model.slot.config {
            v2::name_outputs(cfg, &mut outputs);
        }
        Ok(InferReply {
            model: model.name.clone(),
            version: model.version.to_string(),
            id: req.id,
            outputs,
        })
    }

    /// RepositoryIndex: the repository's models and their versions' states;
    /// without a repository, the `--model` models.
    pub async fn repository_index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let mut out: Vec<IndexEntry> = self
            .engine
            .loaded()
            .into_iter()
            .filter(|m| self.repository.as_ref().is_none_or(|r| r.is_fixed(&m.name)))
            .map(|m| IndexEntry {
                name: m.name.clone(),
                version: m.version.to_string(),
                state: "READY".into(),
                reason: String::new(),
            })
            .collect();
        if let Some(r) = &self.repository {
            out.extend(r.index(ready_only).await);
        }
        out
    }

    /// RepositoryModelLoad / Unload, whichever front-end: the "repository"
    /// scope, the request's parameter names, then the repository.
    pub async fn repository_load(
        &self,
        granted: Option<&Granted>,
        name: &str,
        params: &[String],
        load: bool,
    ) -> Result<(), ServeError> {
        self.authorize_for(granted, Scope::Repository)?;
        check_repository_parameters(params)?;
        let Some(r) = &self.repository else {
            return Err(ServeError::Repository(RepositoryError::NotAllowed(
                "this server has no model repository: its models are fixed by --model \
                 (start with --model-repository DIR --model-control-mode explicit)"
                    .into(),
            )));
        };
        let result = if load {
            r.load(name).await
        } else {
            r.unload(name).await
        };
        result.map_err(ServeError::Repository)
    }

    /// Counts a finished v2 request ([`super::finish`]).
    pub fn finish<T>(
        &self,
        protocol: &str,
        model: &str,
        method: &str,
        arrival: Instant,
        result: Result<T, ServeError>,
    ) -> Result<T, Status> {
        super::finish(
            self.engine.metrics(),
            protocol,
            model,
            method,
            arrival,
            result,
        )
    }

    /// The label a request's model gets: its name when served, else "unknown".
    pub fn model_label(&self, name: &str) -> String {
        match self.engine.resolve_model(name) {
            Some(m) if !name.is_empty() => m.to_string(),
            _ => "unknown".into(),
        }
    }
}

/// A request's `timeout` parameter (microseconds, as Triton reads it).
pub fn timeout_parameter(params: &HashMap<String, pb::InferParameter>) -> Option<Duration> {
    match params.get("timeout")?.parameter_choice {
        Some(pb::infer_parameter::ParameterChoice::Int64Param(us)) if us > 0 => {
            Some(Duration::from_micros(us as u64))
        }
        _ => None,
    }
}

/// The earlier of two deadlines.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The bytes of an input given as typed `contents`.
fn contents_bytes(
    name: &str,
    datatype: &str,
    contents: &pb::InferTensorContents,
) -> Result<Bytes, ServeError> {
    let dtype = v2::parse_datatype(name, datatype)?;
    let values = if !contents.bool_contents.is_empty() {
        Values::Bool(contents.bool_contents.clone())
    } else if !contents.int_contents.is_empty() {
        Values::Int(contents.int_contents.clone())
    } else if !contents.int64_contents.is_empty() {
        Values::Int64(contents.int64_contents.clone())
    } else if !contents.uint_contents.is_empty() {
        Values::Uint(contents.uint_contents.clone())
    } else if !contents.fp32_contents.is_empty() {
        Values::Fp32(contents.fp32_contents.clone())
    } else if !contents.fp64_contents.is_empty() {
        Values::Fp64(contents.fp64_contents.clone())
    } else {
        return Ok(Bytes::new());
    };
    v2::values_to_bytes(&values, dtype)
        .map(Bytes::from)
        .map_err(|e| {
            ServeError::V2(v2::V2Error(match e {
                v2::ValueError::Kind => format!(
                    "input {}: its contents do not fit datatype {datatype} (FP16 and BF16 need raw_input_contents)",
                    codec::clip(name)
                ),
                v2::ValueError::Range => format!(
                    "input {}: a value is out of the range of datatype {datatype}",
                    codec::clip(name)
                ),
            }))
        })
}

/// The inputs of a gRPC ModelInferRequest: raw contents in order, or typed contents.
fn grpc_inputs(req: &mut pb::ModelInferRequest) -> Result<Vec<InputTensor>, ServeError> {
    let raw = std::mem::take(&mut req.raw_input_contents);
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(ServeError::V2(v2::V2Error(format!(
            "raw_input_contents has {} entries for {} inputs",
            raw.len(),
            req.inputs.len()
        ))));
    }
    let mut raw = raw.into_iter();
    req.inputs
        .iter()
        .map(|input| {
            let data = match raw.next() {
                Some(bytes) => bytes,
                None => match &input.contents {
                    Some(c) => contents_bytes(&input.name, &input.datatype, c)?,
                    None => Bytes::new(),
                },
            };
            Ok(InputTensor {
                name: input.name.clone(),
                datatype: input.datatype.clone(),
                shape: input.shape.clone(),
                data,
            })
        })
        .collect()
}

/// The gRPC service over [`InferenceApi`].
#[derive(Clone)]
pub struct InferenceGrpc(pub Arc<InferenceApi>);

type R<T> = Result<Response<T>, Status>;

impl InferenceGrpc {
    fn start<T>(&self, request: &Request<T>) -> (Instant, Result<(), ServeError>) {
        let arrival = request
            .extensions()
            .get::<Arrival>()
            .map_or_else(Instant::now, |a| a.0);
        (
            arrival,
            self.0.authorize(request.extensions().get::<Granted>()),
        )
    }

    /// Metadata-style RPCs: authorize, run, count.
    fn simple<Q, T>(
        &self,
        request: Request<Q>,
        method: &str,
        model: Option<&str>,
        f: impl FnOnce(&InferenceApi, &Q) -> Result<T, ServeError>,
    ) -> R<T> {
        let (arrival, auth) = self.start(&request);
        let label = model.map_or_else(|| "-".to_string(), |m| self.0.model_label(m));
        let result = auth.and_then(|()| f(&self.0, request.get_ref()));
        self.0
            .finish(protocol::V2_GRPC, &label, method, arrival, result)
            .map(Response::new)
    }
}

impl InferenceGrpc {
    /// RepositoryModelLoad / Unload: the "repository" scope, then the repository.
    async fn repository_call<Q>(
        &self,
        request: Request<Q>,
        name: String,
        params: Vec<String>,
        load: bool,
    ) -> Result<(), Status> {
        let arrival = request
            .extensions()
            .get::<Arrival>()
            .map_or_else(Instant::now, |a| a.0);
        let granted = request.extensions().get::<Granted>().copied();
        let method = if load {
            "RepositoryModelLoad"
        } else {
            "RepositoryModelUnload"
        };
        let result = self
            .0
            .repository_load(granted.as_ref(), &name, &params, load)
            .await;
        self.0
            .finish(protocol::V2_GRPC, "-", method, arrival, result)
    }
}

/// Load parameters (a config override, files) are not taken: the repository
/// on disk is the only source. `unload_dependents` is: no model here has
/// dependents (there are no ensembles), so it changes nothing.
fn check_repository_parameters(params: &[String]) -> Result<(), ServeError> {
    match params.iter().find(|p| p.as_str() != "unload_dependents") {
        None => Ok(()),
        Some(p) => Err(ServeError::BadRequest(format!(
            "repository parameter {:?} is not supported: splitserve loads models only from \
             the repository directory",
            codec::clip(p)
        ))),
    }
}

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for InferenceGrpc {
    async fn server_live(
        &self,
        request: Request<pb::ServerLiveRequest>,
    ) -> R<pb::ServerLiveResponse> {
        self.simple(request, "ServerLive", None, |api, _| {
            Ok(pb::ServerLiveResponse { live: api.live() })
        })
    }

    async fn server_ready(
        &self,
        request: Request<pb::ServerReadyRequest>,
    ) -> R<pb::ServerReadyResponse> {
        self.simple(request, "ServerReady", None, |api, _| {
            Ok(pb::ServerReadyResponse { ready: api.ready() })
        })
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> R<pb::ModelReadyResponse> {
        let name = request.get_ref().name.clone();
        self.simple(request, "ModelReady", Some(&name), |api, r| {
            Ok(pb::ModelReadyResponse {
                ready: api.model_ready(&r.name, &r.version),
            })
        })
    }

    async fn server_metadata(
        &self,
        request: Request<pb::ServerMetadataRequest>,
    ) -> R<pb::ServerMetadataResponse> {
        self.simple(request, "ServerMetadata", None, |api, _| {
            Ok(api.server_metadata())
        })
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> R<pb::ModelMetadataResponse> {
        let name = request.get_ref().name.clone();
        self.simple(request, "ModelMetadata", Some(&name), |api, r| {
            api.model_metadata(&r.name, &r.version)
        })
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> R<pb::ModelConfigResponse> {
        let name = request.get_ref().name.clone();
        self.simple(request, "ModelConfig", Some(&name), |api, r| {
            Ok(pb::ModelConfigResponse {
                config: Some(api.model_config(&r.name, &r.version)?),
            })
        })
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> R<pb::ModelStatisticsResponse> {
        let name = request.get_ref().name.clone();
        self.simple(request, "ModelStatistics", Some(&name), |api, r| {
            api.model_statistics(&r.name, &r.version)
        })
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> R<pb::RepositoryIndexResponse> {
        let (arrival, auth) = self.start(&request);
        let result = match auth {
            Ok(()) => Ok(self.0.repository_index(request.get_ref().ready).await),
            Err(e) => Err(e),
        };
        let models = self
            .0
            .finish(protocol::V2_GRPC, "-", "RepositoryIndex", arrival, result)?;
        Ok(Response::new(pb::RepositoryIndexResponse {
            models: models
                .into_iter()
                .map(|m| pb::repository_index_response::ModelIndex {
                    name: m.name,
                    version: m.version,
                    state: m.state,
                    reason: m.reason,
                })
                .collect(),
        }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> R<pb::RepositoryModelLoadResponse> {
        let r = request.get_ref();
        let (name, params) = (r.model_name.clone(), r.parameters.keys().cloned().collect());
        self.repository_call(request, name, params, true)
            .await
            .map(|()| Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> R<pb::RepositoryModelUnloadResponse> {
        let r = request.get_ref();
        let (name, params) = (r.model_name.clone(), r.parameters.keys().cloned().collect());
        self.repository_call(request, name, params, false)
            .await
            .map(|()| Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> R<pb::ModelInferResponse> {
        let (arrival, auth) = self.start(&request);
        let label = self.0.model_label(&request.get_ref().model_name);
        let metrics = self.0.engine.metrics();
        metrics.inflight.inc();
        let span = tracing::debug_span!(
            "ModelInfer",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "inference.GRPCInferenceService",
            rpc.method = "ModelInfer",
            model = %label,
        );
        otel::continue_trace(&span, request.metadata());
        let grpc_deadline = deadline_from_metadata(request.metadata(), arrival);
        let reply_guard = request.extensions().get::<ReplyGuard>().cloned();
        let mut req = request.into_inner();
        let result = async {
            auth?;
            let deadline = earliest(
                grpc_deadline,
                timeout_parameter(&req.parameters).and_then(|d| arrival.checked_add(d)),
            );
            let typed = req.raw_input_contents.is_empty();
            let inputs = grpc_inputs(&mut req)?;
            let metrics = self.0.engine.metrics();
            let encoding = if typed { "typed" } else { "raw" };
            metrics
                .request_bytes
                .with_label_values(&[protocol::V2_GRPC, encoding])
                .observe(inputs.iter().map(|i| i.data.len()).sum::<usize>() as f64);
            super::layers::note_payload(
                Some(inputs.iter().map(|i| i.data.len() as u64).sum()),
                None,
            );
            let reply_guard = reply_guard.as_ref();
            let reply = self
                .0
                .infer(InferRequest {
                    model: req.model_name,
                    version: req.model_version,
                    id: req.id,
                    inputs,
                    outputs: req.outputs.into_iter().map(|o| o.name).collect(),
                    deadline,
                })
                .await?;
            let mut response = pb::ModelInferResponse {
                model_name: reply.model,
                model_version: reply.version.clone(),
                id: reply.id,
                ..Default::default()
            };
            metrics
                .response_bytes
                .with_label_values(&[protocol::V2_GRPC, "raw"])
                .observe(
                    reply
                        .outputs
                        .iter()
                        .map(|(_, t)| t.data.len())
                        .sum::<usize>() as f64,
                );
            super::layers::note_payload(
                None,
                Some(reply.outputs.iter().map(|(_, t)| t.data.len() as u64).sum()),
            );
            for (name, t) in reply.outputs {
                response
                    .outputs
                    .push(pb::model_infer_response::InferOutputTensor {
                        name,
                        datatype: v2::datatype_name(t.dtype).into(),
                        shape: t.shape.clone(),
                        ..Default::default()
                    });
                // Shares the output's bytes: nothing is copied until tonic encodes.
                response.raw_output_contents.push(t.data);
            }
            // Its exact encoded size, checked and held before tonic builds it.
            if let Some(g) = reply_guard {
                g.hold(prost::Message::encoded_len(&response) as u64)?;
            }
            Ok(response)
        }
        .instrument(span)
        .await;
        metrics.inflight.dec();
        self.0
            .finish(protocol::V2_GRPC, &label, "ModelInfer", arrival, result)
            .map(Response::new)
    }
}
