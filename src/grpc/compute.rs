//! `splitlearn.comm.ComputeService`: decode, check, hand the engine a job,
//! encode. Byte-for-byte compatible with splitlearn_comm 1.0 clients.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use prost::bytes::Bytes;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::layers::{Arrival, ReplyGuard};
use super::{SERVICE_NAME, ServeError, deadline_from_metadata, pb, snapshot_to_pb, wire_shape};
use crate::auth::{Granted, Scope};
use crate::codec::{self, CodecPool, DTYPE_KEY, Encoding, Limits, RawTensor, WireDtype};
use crate::engine::{Engine, EngineError, EngineStatus};
use crate::plan::ThreadPlan;
use crate::telemetry::metrics::{limit, protocol, reason};
use crate::telemetry::{Sampler, SnapshotCache, otel};
use crate::training::sessions::{self, Handle};
use crate::training::{MAX_FORWARD_ID_BYTES, SessionRequest, Step, Update};

use pb::compute_service_server::ComputeService;

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
    /// zlib runs here, never on the I/O threads.
    codec_pool: Arc<CodecPool>,
    started: Instant,
    total_requests: Arc<AtomicI64>,
}

impl ComputeApi {
    pub fn new(
        engine: Engine,
        info: StaticInfo,
        limits: Limits,
        snapshots: SnapshotCache,
        codec_pool: Arc<CodecPool>,
    ) -> Self {
        ComputeApi {
            engine,
            info: Arc::new(info),
            limits,
            snapshots,
            codec_pool,
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
        owner: u64,
        guard: Option<&ReplyGuard>,
        req: pb::ComputeRequest,
    ) -> Result<(pb::ComputeResponse, Option<&'static str>), ServeError> {
        let training = req.training_mode == Some(true);
        let kv = !req.past_key_values.is_empty() || req.use_cache == Some(true);
        if training && kv {
            return Err(ServeError::Unimplemented(
                "training_mode together with a KV cache (past_key_values, use_cache)",
            ));
        }
        if let Some(id) = &req.forward_id {
            self.check_forward_id(id)?;
        }
        let hint = req.metadata.get(DTYPE_KEY).cloned();
        let request_bytes = req.data.len();
        let (input, enc) = self.decode(req.data, &req.shape, hint).await?;
        let encoding = encoding_label(enc);
        let m = self.engine.metrics();
        m.request_bytes
            .with_label_values(&[protocol::SPLITLEARN, &encoding])
            .observe(request_bytes as f64);
        super::layers::note_payload(Some(request_bytes as u64), None);
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
            // A handle continues a server-side session; use_cache may open one.
            // Whether the model keeps sessions is the worker's decision.
            let handle = session_handle(&req.past_key_values);
            let session = (handle.is_some() || req.use_cache == Some(true))
                .then_some(SessionRequest { handle, owner });
            Some(Step::Kv {
                past: match handle {
                    Some(_) => Vec::new(),
                    None => decode_past(&req.past_key_values, self.limits)?,
                },
                kv_enc,
                want_present: req.use_cache != Some(false),
                session,
            })
        } else {
            None
        };
        let out = self
            .engine
            .submit(&req.model_id, input, enc, deadline, step)
            .await?;
        // The reply without its tensors' bytes first: their size is known
        // (bounded, when compressed) before they are encoded.
        let mut present = out.present_key_values;
        present.truncate(present.len() / 2 * 2);
        let mut response = pb::ComputeResponse {
            data: Bytes::new(),
            shape: wire_shape(&out.tensor)?,
            request_id: req.request_id,
            compute_time_ms: Some(out.compute_time.as_secs_f32() * 1000.0),
            monitoring_data: Some(snapshot_to_pb(self.snapshots.get())),
            forward_id,
            present_key_values: present
                .chunks_exact(2)
                .map(|kv| {
                    Ok(pb::KvCacheEntry {
                        key_data: Bytes::new(),
                        key_shape: wire_shape(&kv[0])?,
                        value_data: Bytes::new(),
                        value_shape: wire_shape(&kv[1])?,
                    })
                })
                .collect::<Result<Vec<_>, ServeError>>()?,
        };
        let dtype = enc.explicit.then(|| out.tensor.dtype.name());
        let mut tensors = Vec::with_capacity(1 + present.len());
        tensors.push((out.tensor, enc));
        tensors.extend(present.into_iter().map(|t| (t, kv_enc)));
        let base = prost::Message::encoded_len(&response);
        let mut bytes = self.encode_reply(guard, base, tensors).await?.into_iter();
        response.data = bytes.next().unwrap_or_default();
        for e in &mut response.present_key_values {
            e.key_data = bytes.next().unwrap_or_default();
            e.value_data = bytes.next().unwrap_or_default();
        }
        if let Some(g) = guard {
            g.hold(prost::Message::encoded_len(&response) as u64)?;
        }
        m.response_bytes
            .with_label_values(&[protocol::SPLITLEARN, &encoding])
            .observe(response.data.len() as f64);
        super::layers::note_payload(None, Some(response.data.len() as u64));
        Ok((response, dtype))
    }

    /// ComputeBackward: grad_output through the graph stored for forward_id on
    /// the model that computed it; a learning_rate also trains (docs/training.md).
    async fn backward(
        &self,
        deadline: Option<Instant>,
        guard: Option<&ReplyGuard>,
        req: pb::BackwardRequest,
    ) -> Result<pb::BackwardResponse, ServeError> {
        if req.forward_id.is_empty() {
            return Err(ServeError::BadRequest(
                "forward_id is empty: send the one Compute with training_mode=true returned".into(),
            ));
        }
        self.check_forward_id(&req.forward_id)?;
        let model = self
            .engine
            .training()
            .backward_model(&req.forward_id, req.model_id.as_deref())
            .map_err(EngineError::from)?;
        // Asking to update a model that is not trainable is refused whatever
        // the learning rate: no value of it is allowed there.
        if req.learning_rate.is_some() && !self.engine.is_trainable(&model) {
            return Err(ServeError::PermissionDenied(format!(
                "model {model:?} is not trainable: its parameters change only when the server \
                 is started with --trainable {model}. Without learning_rate, ComputeBackward \
                 returns the input gradient and changes nothing"
            )));
        }
        let training = &self.engine.config().training;
        let max_lr = training.max_learning_rate;
        // Without one, a trainable model's --learning-rate applies (unchanged
        // splitlearn_comm clients send none).
        let server_lr = if req.learning_rate.is_none() && self.engine.is_trainable(&model) {
            self.engine.training().default_learning_rate(&model)
        } else {
            None
        };
        let learning_rate = match req.learning_rate {
            None if server_lr.is_some() => server_lr,
            None => None,
            Some(lr) if lr.is_finite() && lr >= 0.0 && f64::from(lr) <= max_lr => {
                Some(f64::from(lr))
            }
            Some(lr) if lr.is_finite() && lr >= 0.0 => {
                self.count_limit(limit::LEARNING_RATE);
                return Err(ServeError::BadRequest(format!(
                    "learning_rate {lr} is above this server's --max-learning-rate {max_lr}"
                )));
            }
            Some(lr) => {
                return Err(ServeError::BadRequest(format!(
                    "learning_rate must be a finite number >= 0, not {lr}"
                )));
            }
        };
        let max_steps = training.max_accumulation_steps;
        let accumulation = match req.accumulation_step {
            None | Some(0) | Some(1) => 1,
            Some(n) if n > 1 && n as i64 > i64::from(max_steps) => {
                self.count_limit(limit::ACCUMULATION_STEPS);
                return Err(ServeError::BadRequest(format!(
                    "accumulation_step {n} is above this server's --max-accumulation-steps {max_steps}"
                )));
            }
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
        let (grad, enc) = self
            .decode(req.grad_output_data, &req.grad_output_shape, None)
            .await?;
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
        let mut response = pb::BackwardResponse {
            grad_input_data: Bytes::new(),
            grad_input_shape: wire_shape(&out.tensor)?,
            forward_id: req.forward_id,
            backward_time_ms: Some(out.compute_time.as_secs_f32() * 1000.0),
            monitoring_data: Some(snapshot_to_pb(self.snapshots.get())),
        };
        if !none {
            let base = prost::Message::encoded_len(&response);
            let mut bytes = self
                .encode_reply(guard, base, vec![(out.tensor, enc)])
                .await?;
            response.grad_input_data = bytes.pop().unwrap_or_default();
        }
        if let Some(g) = guard {
            g.hold(prost::Message::encoded_len(&response) as u64)?;
        }
        Ok(response)
    }
}

/// The session handle `past_key_values` carries, if it is one.
fn session_handle(entries: &[pb::KvCacheEntry]) -> Option<(Handle, i64)> {
    if entries.len() != sessions::HANDLE_ENTRIES {
        return None;
    }
    let parts: Vec<(&[i32], &[i32], usize)> = entries
        .iter()
        .map(|e| {
            (
                e.key_shape.as_slice(),
                e.value_shape.as_slice(),
                e.key_data.len() + e.value_data.len(),
            )
        })
        .collect();
    Handle::parse(&parts)
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
    /// Decodes a payload; one that may inflate is decoded on the codec thread.
    async fn decode(
        &self,
        data: Bytes,
        shape: &[i32],
        hint: Option<String>,
    ) -> Result<(RawTensor, Encoding), ServeError> {
        if !codec::may_inflate(&data, shape, hint.as_deref()) {
            return Ok(codec::decode(data, shape, hint.as_deref(), self.limits)?);
        }
        let shape = shape.to_vec();
        let limits = self.limits;
        let decoded = self
            .codec_pool
            .run(move || codec::decode(data, &shape, hint.as_deref(), limits))
            .await
            .map_err(|busy| {
                self.count_limit(limit::CODEC_QUEUE);
                ServeError::Busy(busy.to_string())
            })?;
        if let Err(codec::CodecError::DecompressedTooLarge { .. }) = &decoded {
            self.count_limit(limit::DECOMPRESSED_SIZE);
        }
        Ok(decoded?)
    }

    /// Encodes a reply's tensors within `--max-message-bytes`; `base` is the
    /// reply's encoded size without their bytes. Uncompressed, they are the
    /// outputs' own bytes (nothing is copied; the caller checks the reply's
    /// exact size). Compressed, the most they can take is held in the
    /// in-flight budget first, and zlib runs on the codec thread into buffers
    /// that stop at the limit.
    async fn encode_reply(
        &self,
        guard: Option<&ReplyGuard>,
        base: usize,
        tensors: Vec<(RawTensor, Encoding)>,
    ) -> Result<Vec<Bytes>, ServeError> {
        if tensors.iter().all(|(_, e)| !e.compressed) {
            return Ok(tensors.iter().map(|(t, e)| codec::encode(t, *e)).collect());
        }
        let max = guard.map_or(usize::MAX, ReplyGuard::max_message_bytes);
        if let Some(g) = guard {
            // A bytes field adds a tag and a length (11 bytes at most), and a
            // KV entry's own length as much; zlib adds at most 5 bytes per
            // 16 KiB stored block and 6 of its own.
            let most = tensors.iter().fold(base as u64, |acc, (t, _)| {
                let n = t.data.len() as u64;
                acc.saturating_add(22 + n + 5 * (n / 16384 + 1) + 6)
            });
            g.hold(most.min(max as u64))?;
        }
        let room = max.saturating_sub(base);
        let encoded = self
            .codec_pool
            .run(move || codec::encode_within(&tensors, room))
            .await
            .map_err(|busy| {
                self.count_limit(limit::CODEC_QUEUE);
                ServeError::Busy(busy.to_string())
            })?;
        encoded.ok_or_else(|| match guard {
            Some(g) => g.too_large(max as u64 + 1, false),
            None => ServeError::ReplyTooLarge("reply too large".into()),
        })
    }

    fn check_forward_id(&self, id: &str) -> Result<(), ServeError> {
        if id.len() > MAX_FORWARD_ID_BYTES {
            self.count_limit(limit::FORWARD_ID);
            return Err(ServeError::BadRequest(format!(
                "forward_id is {} bytes; at most {MAX_FORWARD_ID_BYTES} are accepted",
                id.len()
            )));
        }
        Ok(())
    }

    fn count_limit(&self, which: &str) {
        self.engine
            .metrics()
            .limit_rejections
            .with_label_values(&[which])
            .inc();
    }

    /// With token authentication on, the request's token must carry `scope`.
    fn authorize<T>(&self, request: &Request<T>, scope: Scope) -> Result<(), ServeError> {
        match request.extensions().get::<Granted>() {
            Some(granted) if !granted.allows(scope) => {
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

    /// Ends a tensor RPC begun with [`ComputeApi::begin`]: no longer in flight,
    /// then counted like any request ([`super::finish`]).
    fn finish<T>(
        &self,
        model: &str,
        method: &str,
        arrival: Instant,
        result: Result<T, ServeError>,
    ) -> Result<T, Status> {
        let metrics = self.engine.metrics();
        metrics.inflight.dec();
        super::finish(
            metrics,
            protocol::SPLITLEARN,
            model,
            method,
            arrival,
            result,
        )
    }
}

/// The `encoding` label of a ComputeService payload: its dtype, `+zlib` when
/// compressed (a handful of values, never client text).
fn encoding_label(enc: Encoding) -> String {
    if enc.compressed {
        format!("{}+zlib", enc.dtype.name())
    } else {
        enc.dtype.name().to_string()
    }
}

/// The first dimensions of a client's shape, for spans (a shape may be long).
fn short(shape: &[i32]) -> &[i32] {
    &shape[..shape.len().min(8)]
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
            .unwrap_or_else(|| "unknown".into());
        let span = tracing::debug_span!(
            "Compute",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = SERVICE_NAME,
            rpc.method = "Compute",
            model = %model,
            request_id = ?request.get_ref().request_id,
            shape = ?short(&request.get_ref().shape),
        );
        if request.metadata().get("traceparent").is_some() {
            otel::continue_trace(&span, request.metadata());
        } else {
            otel::continue_trace_from_map(&span, &request.get_ref().metadata);
        }
        let scope = if request.get_ref().training_mode == Some(true) {
            Scope::Train
        } else {
            Scope::Infer
        };
        if let Err(e) = self.authorize(&request, scope) {
            return self.finish(&model, "Compute", arrival, Err(e));
        }
        // KV sessions are bound to the token that opened them.
        let owner = request
            .extensions()
            .get::<Granted>()
            .map_or(0, |g| g.identity);
        let guard = request.extensions().get::<ReplyGuard>().cloned();
        let result = self
            .run_compute(deadline, owner, guard.as_ref(), request.into_inner())
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
            })
            .unwrap_or_else(|| "unknown".into());
        let span = tracing::debug_span!(
            "ComputeBackward",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = SERVICE_NAME,
            rpc.method = "ComputeBackward",
            model = %model,
            forward_id = %codec::clip(&req.forward_id),
            shape = ?short(&req.grad_output_shape),
        );
        otel::continue_trace(&span, request.metadata());
        if let Err(e) = self.authorize(&request, Scope::Train) {
            return self.finish(&model, "ComputeBackward", arrival, Err(e));
        }
        let guard = request.extensions().get::<ReplyGuard>().cloned();
        let result = self
            .backward(deadline, guard.as_ref(), request.into_inner())
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
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.authorize(&request, Scope::Infer)?;
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
        request: Request<pb::ServiceInfoRequest>,
    ) -> Result<Response<pb::ServiceInfoResponse>, Status> {
        self.authorize(&request, Scope::Infer)?;
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
            reason::OUT_OF_MEMORY,
        ] {
            custom.insert(
                format!("rejected_{r}"),
                total(&m.rejected, &[("reason", r)]),
            );
        }
        self.engine.training().add_service_info(&mut custom);
        custom.insert(
            "queue_depth".into(),
            self.engine
                .queue_depths()
                .iter()
                .map(|(_, d)| d)
                .sum::<usize>()
                .to_string(),
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
        let kv = self.engine.training().sessions().stats();
        custom.insert(
            "kv_sessions".into(),
            kv.open.load(Ordering::Relaxed).to_string(),
        );
        custom.insert(
            "kv_cache_bytes".into(),
            kv.bytes.load(Ordering::Relaxed).to_string(),
        );
        custom.insert(
            "kv_sessions_evicted".into(),
            kv.evicted.load(Ordering::Relaxed).to_string(),
        );
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
        let mut versions: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for m in self.engine.loaded() {
            versions
                .entry(m.name.clone())
                .or_default()
                .push(m.version.to_string());
        }
        for (name, vs) in versions {
            custom.insert(format!("model.{name}.versions"), vs.join(","));
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
        self.authorize(&request, Scope::Infer)?;
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
