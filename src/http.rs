//! The Open Inference Protocol over HTTP/REST (axum) on `--http-addr`: the
//! routes Triton and KServe serve, JSON tensors and the binary tensor data
//! extension (`Inference-Header-Content-Length`) that `tritonclient.http`
//! uses. Every request goes through [`InferenceApi`], the same core as the
//! gRPC front-end, and so through the same engine, limits and metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prost::bytes::Bytes;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::auth::{Granted, Scope, Tokens};
use crate::codec::{self, MAX_DIMS};
use crate::grpc::ServeError;
use crate::grpc::inference::{InferReply, InferRequest, InferenceApi, earliest};
use crate::grpc::inference_pb as pb;
use crate::grpc::layers::{Budget, ReplyGuard};
use crate::telemetry::metrics::{limit, protocol};
use crate::telemetry::otel;
use crate::v2::{self, InputTensor, Values};

/// The header that splits a binary-extension body: the JSON's length.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// What the HTTP routes share.
#[derive(Clone)]
pub struct HttpState {
    pub api: Arc<InferenceApi>,
    pub tokens: Option<Arc<Tokens>>,
    pub budget: Arc<Budget>,
    pub max_message_bytes: usize,
    pub body_timeout: Duration,
}

/// The `/v2` routes.
pub fn router(state: HttpState) -> Router {
    let model_routes = |prefix: &str| {
        Router::new()
            .route(prefix, get(model_metadata))
            .route(&format!("{prefix}/ready"), get(model_ready))
            .route(&format!("{prefix}/config"), get(model_config))
            .route(&format!("{prefix}/stats"), get(model_stats))
            .route(&format!("{prefix}/infer"), post(infer))
    };
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(repository_load))
        .route(
            "/v2/repository/models/{name}/unload",
            post(repository_unload),
        )
        .merge(model_routes("/v2/models/{name}"))
        .merge(model_routes("/v2/models/{name}/versions/{version}"))
        .fallback(not_found)
        .with_state(state)
}

/// An error as Triton answers it: `{"error": "..."}` with the status its code means.
fn error_response(code: tonic::Code, message: &str) -> Response {
    use tonic::Code;
    let status = match code {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    (status, axum::Json(json!({ "error": message }))).into_response()
}

fn from_status(s: tonic::Status) -> Response {
    error_response(s.code(), s.message())
}

async fn not_found() -> Response {
    error_response(tonic::Code::NotFound, "no such endpoint; see /v2")
}

/// Tokens (when on): every route but health needs `authorization: Bearer`.
fn authenticate(state: &HttpState, headers: &HeaderMap) -> Result<Option<Granted>, Box<Response>> {
    let Some(tokens) = &state.tokens else {
        return Ok(None);
    };
    let header = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    tokens.check(header).map(Some).map_err(|_| {
        Box::new({
            state
                .api
                .engine()
                .metrics()
                .auth_failures
                .with_label_values(&["unauthenticated"])
                .inc();
            error_response(
                tonic::Code::Unauthenticated,
                "this server requires a token: send 'authorization: Bearer <token>'",
            )
        })
    })
}

/// Runs a metadata-style route: authenticate, authorize, run, count.
fn simple<T>(
    state: &HttpState,
    headers: &HeaderMap,
    method: &str,
    model: Option<&str>,
    f: impl FnOnce(&InferenceApi) -> Result<T, ServeError>,
) -> Result<T, Box<Response>> {
    let arrival = Instant::now();
    let granted = authenticate(state, headers)?;
    let label = model.map_or_else(|| "-".to_string(), |m| state.api.model_label(m));
    let result = state
        .api
        .authorize(granted.as_ref())
        .and_then(|()| f(&state.api));
    state
        .api
        .finish(protocol::V2_HTTP, &label, method, arrival, result)
        .map_err(|s| Box::new(from_status(s)))
}

async fn server_metadata(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    match simple(&state, &headers, "ServerMetadata", None, |api| {
        Ok(api.server_metadata())
    }) {
        Ok(m) => axum::Json(json!({
            "name": m.name,
            "version": m.version,
            "extensions": m.extensions,
        }))
        .into_response(),
        Err(r) => *r,
    }
}

async fn live(State(state): State<HttpState>) -> StatusCode {
    if state.api.live() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn ready(State(state): State<HttpState>) -> StatusCode {
    if state.api.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `{name}` and, on the versioned routes, `{version}`.
#[derive(serde::Deserialize)]
struct ModelPath {
    name: String,
    #[serde(default)]
    version: String,
}

async fn model_metadata(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    let tensors = |list: Vec<pb::model_metadata_response::TensorMetadata>| {
        list.into_iter()
            .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
            .collect::<Vec<_>>()
    };
    match simple(&state, &headers, "ModelMetadata", Some(&p.name), |api| {
        api.model_metadata(&p.name, &p.version)
    }) {
        Ok(m) => axum::Json(json!({
            "name": m.name,
            "versions": m.versions,
            "platform": m.platform,
            "inputs": tensors(m.inputs),
            "outputs": tensors(m.outputs),
        }))
        .into_response(),
        Err(r) => *r,
    }
}

async fn model_ready(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    match simple(&state, &headers, "ModelReady", Some(&p.name), |api| {
        Ok(api.model_ready(&p.name, &p.version))
    }) {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => StatusCode::BAD_REQUEST.into_response(),
        Err(r) => *r,
    }
}

/// Triton's JSON form of a model configuration (enum names as strings).
fn config_json(c: pb::ModelConfig) -> Value {
    let dtype = |d: i32| {
        pb::DataType::try_from(d)
            .map(|d| d.as_str_name())
            .unwrap_or("TYPE_INVALID")
    };
    let mut v = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|i| json!({
            "name": i.name, "data_type": dtype(i.data_type), "dims": i.dims,
        })).collect::<Vec<_>>(),
        "output": c.output.iter().map(|o| json!({
            "name": o.name, "data_type": dtype(o.data_type), "dims": o.dims,
        })).collect::<Vec<_>>(),
        "instance_group": c.instance_group.iter().map(|g| json!({
            "name": g.name,
            "kind": pb::model_instance_group::Kind::try_from(g.kind)
                .map(|k| k.as_str_name()).unwrap_or("KIND_AUTO"),
            "count": g.count,
        })).collect::<Vec<_>>(),
        "default_model_filename": c.default_model_filename,
    });
    if let Some(pb::model_config::SchedulingChoice::DynamicBatching(d)) = c.scheduling_choice {
        v["dynamic_batching"] = json!({
            "max_queue_delay_microseconds": d.max_queue_delay_microseconds,
        });
    }
    v
}

async fn model_config(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    match simple(&state, &headers, "ModelConfig", Some(&p.name), |api| {
        api.model_config(&p.name, &p.version)
    }) {
        Ok(c) => axum::Json(config_json(c)).into_response(),
        Err(r) => *r,
    }
}

fn stats_json(s: pb::ModelStatisticsResponse) -> Value {
    let d = |d: Option<pb::StatisticDuration>| {
        let d = d.unwrap_or_default();
        json!({ "count": d.count, "ns": d.ns })
    };
    json!({
        "model_stats": s.model_stats.into_iter().map(|m| {
            let i = m.inference_stats.unwrap_or_default();
            json!({
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": {
                    "success": d(i.success), "fail": d(i.fail), "queue": d(i.queue),
                    "compute_input": d(i.compute_input), "compute_infer": d(i.compute_infer),
                    "compute_output": d(i.compute_output),
                },
                "batch_stats": [],
            })
        }).collect::<Vec<_>>(),
    })
}

async fn model_stats(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    match simple(&state, &headers, "ModelStatistics", Some(&p.name), |api| {
        api.model_statistics(&p.name, &p.version)
    }) {
        Ok(s) => axum::Json(stats_json(s)).into_response(),
        Err(r) => *r,
    }
}

async fn all_stats(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    match simple(&state, &headers, "ModelStatistics", None, |api| {
        api.model_statistics("", "")
    }) {
        Ok(s) => axum::Json(stats_json(s)).into_response(),
        Err(r) => *r,
    }
}

fn invalid(msg: String) -> ServeError {
    ServeError::V2(v2::V2Error(msg))
}

/// The flat values of a JSON `data` field (nested lists are flattened, as the
/// protocol allows).
fn flatten(v: &Value, out: &mut Vec<Value>, budget: &mut usize) -> Result<(), ServeError> {
    match v {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, budget)?;
            }
            Ok(())
        }
        other => {
            if *budget == 0 {
                return Err(invalid("data holds more values than its shape".into()));
            }
            *budget -= 1;
            out.push(other.clone());
            Ok(())
        }
    }
}

/// JSON values as the typed list a dtype takes.
fn json_values(name: &str, dtype: codec::WireDtype, flat: &[Value]) -> Result<Values, ServeError> {
    use codec::WireDtype as D;
    let wrong = || {
        invalid(format!(
            "input {}: data does not fit its datatype",
            codec::clip(name)
        ))
    };
    Ok(match dtype {
        D::Bool => Values::Bool(
            flat.iter()
                .map(|v| v.as_bool().ok_or_else(wrong))
                .collect::<Result<_, _>>()?,
        ),
        D::U8 => Values::Uint(
            flat.iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(wrong)
                })
                .collect::<Result<_, _>>()?,
        ),
        D::I8 | D::I16 | D::I32 => Values::Int(
            flat.iter()
                .map(|v| {
                    v.as_i64()
                        .and_then(|x| i32::try_from(x).ok())
                        .ok_or_else(wrong)
                })
                .collect::<Result<_, _>>()?,
        ),
        D::I64 => Values::Int64(
            flat.iter()
                .map(|v| v.as_i64().ok_or_else(wrong))
                .collect::<Result<_, _>>()?,
        ),
        D::F16 | D::BF16 | D::F32 => Values::Fp32(
            flat.iter()
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(wrong))
                .collect::<Result<_, _>>()?,
        ),
        D::F64 => Values::Fp64(
            flat.iter()
                .map(|v| v.as_f64().ok_or_else(wrong))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// A request body: the JSON, and the binary data that followed it.
fn split_body(headers: &HeaderMap, body: Bytes) -> Result<(Value, Bytes), ServeError> {
    let json_len = match headers.get(HEADER_LENGTH) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n <= body.len())
            .ok_or_else(|| {
                invalid(format!(
                    "Inference-Header-Content-Length must be a number of bytes within the {}-byte body",
                    body.len()
                ))
            })?,
        None => body.len(),
    };
    let json: Value = serde_json::from_slice(&body[..json_len]).map_err(|e| {
        invalid(format!(
            "the request is not valid JSON: {}",
            codec::clip(&e.to_string())
        ))
    })?;
    Ok((json, body.slice(json_len..)))
}

/// The request's inputs, from JSON `data` or from the binary section.
fn http_inputs(
    json: &Value,
    mut binary: Bytes,
    limits: codec::Limits,
) -> Result<Vec<InputTensor>, ServeError> {
    let Some(inputs) = json.get("inputs").and_then(Value::as_array) else {
        return Err(invalid("the request has no \"inputs\" list".into()));
    };
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        let name = input
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let datatype = input
            .get("datatype")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let shape: Vec<i64> = input
            .get("shape")
            .and_then(Value::as_array)
            .filter(|s| s.len() <= MAX_DIMS)
            .map(|s| s.iter().map(|d| d.as_i64().unwrap_or(-1)).collect())
            .ok_or_else(|| {
                invalid(format!(
                    "input {:?} needs a \"shape\" of at most {MAX_DIMS} dimensions",
                    codec::clip(&name)
                ))
            })?;
        let binary_size = input
            .get("parameters")
            .and_then(|p| p.get("binary_data_size"))
            .and_then(Value::as_u64);
        let data = match binary_size {
            Some(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > binary.len() {
                    return Err(invalid(format!(
                        "input {:?}: binary_data_size {n} is more than the {} bytes left in the body",
                        codec::clip(&name),
                        binary.len()
                    )));
                }
                binary.split_to(n)
            }
            None => {
                let dtype = v2::parse_datatype(&name, &datatype)?;
                let mut flat = Vec::new();
                let mut room = usize::try_from(limits.max_elements).unwrap_or(usize::MAX);
                flatten(
                    input.get("data").unwrap_or(&Value::Null),
                    &mut flat,
                    &mut room,
                )?;
                let values = json_values(&name, dtype, &flat)?;
                Bytes::from(v2::values_to_bytes(&values, dtype).unwrap_or_default())
            }
        };
        out.push(InputTensor {
            name,
            datatype,
            shape,
            data,
        });
    }
    Ok(out)
}

async fn infer(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let arrival = Instant::now();
    let label = state.api.model_label(&p.name);
    let span = tracing::debug_span!(
        "ModelInfer",
        otel.kind = "server",
        http.route = "/v2/models/{name}/infer",
        model = %label,
    );
    otel::continue_trace(
        &span,
        &tonic::metadata::MetadataMap::from_headers(headers.clone()),
    );
    let granted = match authenticate(&state, &headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let metrics = state.api.engine().metrics();
    metrics.inflight.inc();
    let result = async {
        state.api.authorize(granted.as_ref())?;
        state.api.resolve(&p.name, &p.version)?;
        // The body is read only after its size is reserved from the budget.
        let claimed = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(state.max_message_bytes as u64);
        if claimed > state.max_message_bytes as u64 {
            metrics.limit_rejections.with_label_values(&[limit::MESSAGE_SIZE]).inc();
            return Err(ServeError::Busy(format!(
                "request body too large for this server (--max-message-bytes): {claimed} bytes, the limit is {}",
                state.max_message_bytes
            )));
        }
        let _reservation = state.budget.reserve(claimed).ok_or_else(|| {
            metrics.limit_rejections.with_label_values(&[limit::INFLIGHT_BYTES]).inc();
            ServeError::Busy(
                "the server's memory for requests in flight (--max-inflight-bytes) cannot take this body now; retry with backoff"
                    .into(),
            )
        })?;
        let body = match tokio::time::timeout(
            state.body_timeout,
            axum::body::to_bytes(body, state.max_message_bytes),
        )
        .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => {
                return Err(ServeError::Busy(format!(
                    "request body too large for this server (--max-message-bytes {}) or cut off",
                    state.max_message_bytes
                )));
            }
            Err(_) => {
                metrics.limit_rejections.with_label_values(&[limit::BODY_TIMEOUT]).inc();
                return Err(ServeError::BadRequest(
                    "the request body did not arrive within --request-body-timeout".into(),
                ));
            }
        };
        let body_len = body.len();
        let binary_request = headers.contains_key(HEADER_LENGTH);
        metrics
            .request_bytes
            .with_label_values(&[protocol::V2_HTTP, if binary_request { "binary" } else { "json" }])
            .observe(body_len as f64);
        crate::grpc::layers::note_payload(Some(body_len as u64), None);
        let (json, binary) = split_body(&headers, body)?;
        let inputs = http_inputs(&json, binary, state.api_limits())?;
        let timeout = json
            .get("parameters")
            .and_then(|p| p.get("timeout"))
            .and_then(Value::as_u64)
            .filter(|&us| us > 0)
            .map(Duration::from_micros);
        let binary_default = json
            .get("parameters")
            .and_then(|p| p.get("binary_data_output"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let requested: Vec<(String, Option<bool>)> = json
            .get("outputs")
            .and_then(Value::as_array)
            .map(|outs| {
                outs.iter()
                    .map(|o| {
                        (
                            o.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                            o.get("parameters")
                                .and_then(|p| p.get("binary_data"))
                                .and_then(Value::as_bool),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let reply = state
            .api
            .infer(InferRequest {
                model: p.name.clone(),
                version: p.version.clone(),
                id: json.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                inputs,
                outputs: requested.iter().map(|(n, _)| n.clone()).collect(),
                deadline: earliest(None, timeout.and_then(|d| arrival.checked_add(d))),
            })
            .await?;
        Ok((reply, requested, binary_default))
    }
    .instrument(span.clone());
    // One scope for the payload bytes: noted while decoding, and the outputs
    // here, then read by the access log when the request is counted.
    let result = crate::grpc::layers::with_payload(async {
        let r = result.await;
        if let Ok((reply, _, _)) = &r {
            let out: usize = reply.outputs.iter().map(|(_, t)| t.data.len()).sum();
            crate::grpc::layers::note_payload(None, Some(out as u64));
        }
        let guard = ReplyGuard::new(state.max_message_bytes, state.budget.clone(), metrics);
        let r = match r {
            Ok((reply, requested, binary_default)) => {
                let plan = ReplyPlan::new(reply, &requested, binary_default);
                if plan.json_elements() > BLOCKING_JSON_ELEMENTS {
                    // Writing megabytes of JSON is CPU work: off the I/O threads.
                    tokio::task::spawn_blocking(move || plan.encode(guard))
                        .await
                        .unwrap_or_else(|e| {
                            Err(ServeError::Engine(crate::engine::EngineError::Internal(
                                format!("writing the reply failed: {e}"),
                            )))
                        })
                } else {
                    plan.encode(guard)
                }
            }
            Err(e) => Err(e),
        };
        metrics.inflight.dec();
        state
            .api
            .finish(protocol::V2_HTTP, &label, "ModelInfer", arrival, r)
    })
    .await;
    match result {
        Err(s) => from_status(s),
        Ok(reply) => {
            let encoding = if reply.binary.is_empty() {
                "json"
            } else {
                "binary"
            };
            metrics
                .response_bytes
                .with_label_values(&[protocol::V2_HTTP, encoding])
                .observe(reply.len() as f64);
            let head_len = reply.head.len();
            if reply.binary.is_empty() {
                return (
                    [(header::CONTENT_TYPE, "application/json")],
                    Body::new(reply.into_body()),
                )
                    .into_response();
            }
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (
                        header::HeaderName::from_static(HEADER_LENGTH),
                        head_len.to_string(),
                    ),
                ],
                Body::new(reply.into_body()),
            )
                .into_response()
        }
    }
}

/// JSON replies with more values than this are written on a blocking thread.
const BLOCKING_JSON_ELEMENTS: usize = 64 * 1024;

/// A reply's JSON head, as serialized: the outputs described, and the values
/// of those sent as JSON.
#[derive(serde::Serialize)]
struct ReplyHead<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "is_empty")]
    id: &'a str,
    outputs: Vec<OutputHead<'a>>,
}

fn is_empty(s: &&str) -> bool {
    s.is_empty()
}

#[derive(serde::Serialize)]
struct OutputHead<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    /// Last, so that the head without it differs only by `,"data":[...]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<v2::JsonData<'a>>,
}

#[derive(serde::Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// The bytes `,"data":` add to an output of the head.
const DATA_KEY_BYTES: u64 = 8;

/// An answer before it is encoded, with each output's form decided.
struct ReplyPlan {
    reply: InferReply,
    /// Per output: sent in the binary section (else as JSON values).
    binary: Vec<bool>,
}

impl ReplyPlan {
    fn new(reply: InferReply, requested: &[(String, Option<bool>)], binary_default: bool) -> Self {
        let binary = reply
            .outputs
            .iter()
            .map(|(name, _)| {
                requested
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, b)| *b)
                    .unwrap_or(binary_default)
            })
            .collect();
        ReplyPlan { reply, binary }
    }

    fn json_elements(&self) -> usize {
        self.reply
            .outputs
            .iter()
            .zip(&self.binary)
            .filter(|(_, b)| !**b)
            .map(|((_, t), _)| t.data.len() / t.dtype.size())
            .sum()
    }

    /// The head, with or without the JSON values.
    fn head(&self, with_data: bool) -> ReplyHead<'_> {
        ReplyHead {
            model_name: &self.reply.model,
            model_version: &self.reply.version,
            id: &self.reply.id,
            outputs: self
                .reply
                .outputs
                .iter()
                .zip(&self.binary)
                .map(|((name, t), &binary)| OutputHead {
                    name,
                    datatype: v2::datatype_name(t.dtype),
                    shape: &t.shape,
                    parameters: binary.then(|| BinarySize {
                        binary_data_size: t.data.len(),
                    }),
                    data: (!binary && with_data).then_some(v2::JsonData(t)),
                })
                .collect(),
        }
    }

    /// Encodes the reply within `--max-message-bytes`: its size is bounded
    /// before anything is written (the binary sections exactly, JSON values
    /// by the fewest and most bytes each can take), those bytes are held in
    /// the in-flight budget, and the JSON is written into a buffer that stops
    /// at the limit. The binary sections are the outputs' own bytes, not copied.
    fn encode(self, guard: ReplyGuard) -> Result<Reply, ServeError> {
        let max = guard.max_message_bytes() as u64;
        let binary: u64 = self
            .reply
            .outputs
            .iter()
            .zip(&self.binary)
            .filter(|(_, b)| **b)
            .map(|((_, t), _)| t.data.len() as u64)
            .sum();
        // The head without values costs what the request's names and id did.
        let skeleton = serde_json::to_vec(&self.head(false))
            .map_err(|e| ServeError::Engine(crate::engine::EngineError::Internal(e.to_string())))?;
        let (mut fewest, mut most) = (
            skeleton.len() as u64 + binary,
            skeleton.len() as u64 + binary,
        );
        for ((_, t), _) in self
            .reply
            .outputs
            .iter()
            .zip(&self.binary)
            .filter(|(_, b)| !**b)
        {
            let (lo, hi) = v2::json_data_bounds(t);
            fewest = fewest.saturating_add(DATA_KEY_BYTES + lo);
            most = most.saturating_add(DATA_KEY_BYTES + hi);
        }
        guard.check(fewest, fewest == most)?;
        guard.hold(most.min(max))?;
        let head = if fewest == most {
            skeleton
        } else {
            let room = max.saturating_sub(binary) as usize;
            let mut out = codec::Capped::new(room, (most - binary) as usize);
            if serde_json::to_writer(&mut out, &self.head(true)).is_err() {
                // Stopped at the limit: the reply is larger.
                return Err(guard.too_large(max + 1, false));
            }
            out.buf
        };
        let len = head.len() as u64 + binary;
        guard.hold(len)?;
        let sections = self
            .reply
            .outputs
            .into_iter()
            .zip(self.binary)
            .filter(|(_, b)| *b)
            .map(|((_, t), _)| t.data)
            .collect();
        Ok(Reply {
            head: Bytes::from(head),
            binary: sections,
            guard,
        })
    }
}

/// An encoded reply: its JSON head, then the binary sections, with its bytes
/// held in the in-flight budget.
struct Reply {
    head: Bytes,
    binary: Vec<Bytes>,
    guard: ReplyGuard,
}

impl Reply {
    fn len(&self) -> u64 {
        self.head.len() as u64 + self.binary.iter().map(|b| b.len() as u64).sum::<u64>()
    }

    fn into_body(self) -> ReplyBody {
        let left = self.len();
        let mut parts = std::collections::VecDeque::with_capacity(1 + self.binary.len());
        parts.push_back(self.head);
        parts.extend(self.binary);
        ReplyBody {
            parts,
            left,
            _guard: self.guard,
        }
    }
}

/// A reply's body, handed to the transport a piece at a time: hyper asks for
/// the next piece only when it can write, so the reply's bytes stay held in
/// the in-flight budget until the last piece is taken, or the connection
/// closes and the body is dropped.
struct ReplyBody {
    parts: std::collections::VecDeque<Bytes>,
    left: u64,
    /// Holds the reply's bytes in the budget until dropped.
    _guard: ReplyGuard,
}

impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        while let Some(front) = this.parts.front_mut() {
            if front.is_empty() {
                this.parts.pop_front();
                continue;
            }
            let piece = crate::grpc::layers::next_piece(front);
            this.left -= piece.len() as u64;
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

impl HttpState {
    fn api_limits(&self) -> codec::Limits {
        self.api.limits()
    }
}

/// Largest body of a repository request (a few flags), in bytes.
const MAX_REPOSITORY_BODY: usize = 64 * 1024;

/// A repository request's JSON body (empty is `{}`), bounded.
async fn small_json(body: Body) -> Result<Value, ServeError> {
    let bytes = axum::body::to_bytes(body, MAX_REPOSITORY_BODY)
        .await
        .map_err(|_| invalid(format!("the body is over {MAX_REPOSITORY_BODY} bytes")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(invalid("the body must be a JSON object".into()));
    }
    Ok(v)
}

/// POST /v2/repository/index: `[{name, version, state, reason}]`.
async fn repository_index(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let arrival = Instant::now();
    let granted = match authenticate(&state, &headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let result = async {
        state.api.authorize(granted.as_ref())?;
        let ready = small_json(body)
            .await?
            .get("ready")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(state.api.repository_index(ready).await)
    }
    .await;
    match state
        .api
        .finish(protocol::V2_HTTP, "-", "RepositoryIndex", arrival, result)
    {
        Ok(models) => axum::Json(
            models
                .into_iter()
                .map(|m| {
                    let mut o = json!({ "name": m.name });
                    for (k, v) in [
                        ("version", m.version),
                        ("state", m.state),
                        ("reason", m.reason),
                    ] {
                        if !v.is_empty() {
                            o[k] = json!(v);
                        }
                    }
                    o
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(s) => from_status(s),
    }
}

async fn repository_load(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    repository_call(state, name, headers, body, true).await
}

async fn repository_unload(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    repository_call(state, name, headers, body, false).await
}

/// POST /v2/repository/models/NAME/load|unload: 200 with an empty body, or
/// `{"error": ...}`.
async fn repository_call(
    state: HttpState,
    name: String,
    headers: HeaderMap,
    body: Body,
    load: bool,
) -> Response {
    let arrival = Instant::now();
    let granted = match authenticate(&state, &headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let method = if load {
        "RepositoryModelLoad"
    } else {
        "RepositoryModelUnload"
    };
    let result = async {
        // The scope before the body is read: a stranger's bytes cost nothing.
        state
            .api
            .authorize_for(granted.as_ref(), Scope::Repository)?;
        let body = small_json(body).await?;
        let params: Vec<String> = body
            .get("parameters")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        state
            .api
            .repository_load(granted.as_ref(), &name, &params, load)
            .await
    }
    .await;
    match state
        .api
        .finish(protocol::V2_HTTP, "-", method, arrival, result)
    {
        Ok(()) => StatusCode::OK.into_response(),
        Err(s) => from_status(s),
    }
}
