//! The Open Inference Protocol over HTTP/REST (axum) on `--http-addr`: the
//! routes Triton and KServe serve, JSON tensors and the binary tensor data
//! extension (`Inference-Header-Content-Length`) that `tritonclient.http`
//! uses. Every request goes through [`InferenceApi`], the same core as the
//! gRPC front-end, and so through the same engine, limits and metrics.
//!
//! Request bodies are reserved from the in-flight budget as they arrive
//! (within the connection's share and a minimum rate); JSON tensors are parsed
//! on the codec thread without a generic JSON tree, their decoded bytes
//! reserved before they are made (docs/security.md, "HTTP/REST request bodies").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prost::bytes::{Bytes, BytesMut};
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::auth::{Granted, Scope, Tokens};
use crate::codec::{self, CodecPool, MAX_DIMS};
use crate::grpc::ServeError;
use crate::grpc::inference::{InferReply, InferRequest, InferenceApi, earliest};
use crate::grpc::inference_pb as pb;
use crate::grpc::layers::{Budget, ReplyGuard, Reservation};
use crate::listen::ConnInfo;
use crate::telemetry::metrics::{limit, protocol};
use crate::telemetry::otel;
use crate::v2::{self, InputTensor};

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
    pub body_limits: BodyLimits,
    /// The bounded thread that zlib also runs on: JSON request bodies are
    /// parsed there, never on the I/O threads that answer health probes.
    pub codec_pool: Arc<CodecPool>,
    /// Bytes of the budget each connection's request bodies hold.
    pub shares: Arc<ConnShares>,
}

/// How HTTP request bodies may arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BodyLimits {
    /// Bytes a second a body must average once `rate_grace` has passed (its
    /// deadline moves by one second per `min_rate` bytes received); 0: off.
    pub min_rate: u64,
    /// Time a body gets before the minimum rate applies.
    pub rate_grace: Duration,
    /// Most bytes of the in-flight budget one connection's unfinished
    /// requests may hold for their bodies, so that a few slow clients cannot
    /// take all of it.
    pub per_connection: u64,
}

/// Bytes of the in-flight budget held for request bodies, per connection.
#[derive(Debug, Default)]
pub struct ConnShares(Mutex<HashMap<usize, u64>>);

/// One request's part of its connection's share, given back when dropped.
struct Share {
    shares: Arc<ConnShares>,
    /// The connection (its key is the address of its activity record, which
    /// this clone keeps alive and so unique); None: a request on its own.
    conn: Option<ConnInfo>,
    bytes: u64,
}

impl Share {
    fn key(&self) -> Option<usize> {
        self.conn
            .as_ref()
            .map(|c| Arc::as_ptr(&c.activity) as usize)
    }

    /// Takes `n` more bytes if the connection then holds at most `cap`.
    fn try_grow(&mut self, n: u64, cap: u64) -> bool {
        let Some(key) = self.key() else {
            let next = self.bytes.saturating_add(n);
            if next > cap {
                return false;
            }
            self.bytes = next;
            return true;
        };
        let mut map = self.shares.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.get(&key).copied().unwrap_or(0);
        let next = held.saturating_add(n);
        if next > cap {
            return false;
        }
        map.insert(key, next);
        self.bytes += n;
        true
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let Some(key) = self.key() else { return };
        let mut map = self.shares.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = map.get_mut(&key) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                map.remove(&key);
            }
        }
    }
}

/// The connection a request came on, where the listener says.
fn connection_of(ext: &axum::http::Extensions) -> Option<ConnInfo> {
    ext.get::<ConnInfo>().cloned().or_else(|| {
        ext.get::<axum::extract::ConnectInfo<ConnInfo>>()
            .map(|c| c.0.clone())
    })
}

/// A request body as it arrives: each chunk is reserved from the in-flight
/// budget and from its connection's share before it is kept (nothing is
/// reserved for what is only claimed), within `--max-message-bytes`,
/// `--request-body-timeout` and the minimum rate.
async fn read_body(
    state: &HttpState,
    headers: &HeaderMap,
    body: Body,
    conn: Option<ConnInfo>,
    max: usize,
) -> Result<(Bytes, (Reservation, Share)), ServeError> {
    let metrics = state.api.engine().metrics();
    use futures::StreamExt;
    let refuse = |which: &'static str, msg: String| {
        metrics.limit_rejections.with_label_values(&[which]).inc();
        ServeError::Busy(msg)
    };
    let max = max as u64;
    let limits = state.body_limits;
    let too_large = |n: u64| {
        refuse(
            limit::MESSAGE_SIZE,
            format!(
                "request body too large for this server: {n} bytes, the limit is {max} (--max-message-bytes for inference)"
            ),
        )
    };
    let over_share = || {
        refuse(
            limit::INFLIGHT_BYTES_PER_CONNECTION,
            format!(
                "this connection's requests hold their share of the server's memory for requests in flight (--max-inflight-bytes-per-connection {}); retry with backoff",
                limits.per_connection
            ),
        )
    };
    let claimed = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = claimed {
        if n > max {
            return Err(too_large(n));
        }
        if n > limits.per_connection {
            return Err(over_share());
        }
    }
    let mut reservation = state.budget.reserve(0).ok_or_else(|| {
        refuse(
            limit::INFLIGHT_BYTES,
            "the server's memory for requests in flight (--max-inflight-bytes) is used up; retry with backoff".into(),
        )
    })?;
    let mut share = Share {
        shares: state.shares.clone(),
        conn,
        bytes: 0,
    };
    let mut buf = BytesMut::with_capacity(claimed.unwrap_or(0).min(64 * 1024) as usize);
    let started = tokio::time::Instant::now();
    let overall = started + state.body_timeout;
    let mut chunks = body.into_data_stream();
    loop {
        // Past the grace, the body must keep up with the minimum rate.
        let slow_at = (limits.min_rate > 0).then(|| {
            started
                + limits.rate_grace
                + Duration::from_secs_f64(buf.len() as f64 / limits.min_rate as f64)
        });
        let deadline = slow_at.map_or(overall, |t| t.min(overall));
        let next = tokio::select! {
            next = chunks.next() => next,
            () = tokio::time::sleep_until(deadline) => {
                if deadline < overall {
                    metrics.limit_rejections.with_label_values(&[limit::BODY_RATE]).inc();
                    return Err(ServeError::BadRequest(format!(
                        "the request body arrived slower than {} bytes/s (--http-min-body-rate): {} bytes in {:.1} s",
                        limits.min_rate,
                        buf.len(),
                        started.elapsed().as_secs_f64()
                    )));
                }
                metrics.limit_rejections.with_label_values(&[limit::BODY_TIMEOUT]).inc();
                return Err(ServeError::BadRequest(
                    "the request body did not arrive within --request-body-timeout".into(),
                ));
            }
        };
        let chunk = match next {
            None => break,
            Some(Ok(chunk)) => chunk,
            Some(Err(_)) => {
                return Err(ServeError::BadRequest(
                    "the request body was cut off or malformed".into(),
                ));
            }
        };
        let n = chunk.len() as u64;
        let total = buf.len() as u64 + n;
        if total > max {
            return Err(too_large(total));
        }
        if !share.try_grow(n, limits.per_connection) {
            return Err(over_share());
        }
        if !reservation.try_grow(n) {
            return Err(refuse(
                limit::INFLIGHT_BYTES,
                "the server's memory for requests in flight (--max-inflight-bytes) cannot take this body now; retry with backoff".into(),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf.freeze(), (reservation, share)))
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

/// Most inputs or outputs one JSON request may list (each costs a small
/// struct, so a list of `{}` must not cost more than its bytes).
const MAX_TENSORS: usize = 1024;

/// A JSON list of at most `N` entries: one more is an error while parsing,
/// before it is stored.
struct Capped<T, const N: usize>(Vec<T>);

impl<T, const N: usize> Default for Capped<T, N> {
    fn default() -> Self {
        Capped(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Capped<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Capped<T, N>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a list of at most {N} entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if out.len() == N {
                        return Err(de::Error::custom(format_args!(
                            "a list of more than {N} entries (the most inputs or outputs a request may list is {MAX_TENSORS}, dimensions of a shape {MAX_DIMS})"
                        )));
                    }
                    out.push(item);
                }
                Ok(Capped(out))
            }
        }
        d.deserialize_seq(V::<T, N>(std::marker::PhantomData))
    }
}

/// A parameter's value, of whatever JSON type the client sent; only the
/// scalars are kept (a list or object is skipped without being stored).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scalar {
    Bool(bool),
    Int(i128),
    Float(f64),
    Other,
}

impl Scalar {
    fn as_u64(self) -> Option<u64> {
        match self {
            Scalar::Int(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    fn as_bool(self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(b),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a parameter value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(i128::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(i128::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// A request's JSON, as the protocol defines it. Unknown fields are skipped
/// unstored; each input's `data` stays the text it is in the body until its
/// datatype and shape are known.
#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: Option<RequestParams>,
    #[serde(borrow, default)]
    inputs: Option<Capped<InputJson<'a>, MAX_TENSORS>>,
    #[serde(default)]
    outputs: Option<Capped<OutputJson, MAX_TENSORS>>,
}

#[derive(Deserialize)]
struct RequestParams {
    timeout: Option<Scalar>,
    binary_data_output: Option<Scalar>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    #[serde(default)]
    name: String,
    #[serde(default)]
    datatype: String,
    shape: Option<Capped<i64, MAX_DIMS>>,
    #[serde(default)]
    parameters: Option<InputParams>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct InputParams {
    binary_data_size: Option<Scalar>,
}

#[derive(Deserialize)]
struct OutputJson {
    #[serde(default)]
    name: String,
    #[serde(default)]
    parameters: Option<OutputParams>,
}

#[derive(Deserialize)]
struct OutputParams {
    binary_data: Option<Scalar>,
}

/// What went wrong inside a `data` list (serde's own errors would quote the value).
#[derive(Debug, Clone, PartialEq)]
enum DataError {
    Value(v2::ValueError, String),
    TooMany,
}

/// Receives a `data` list's values, nested lists flattened, straight into the
/// tensor's bytes; never more than `room` values.
struct Sink {
    w: v2::TensorWriter,
    room: usize,
    failed: Option<DataError>,
}

impl Sink {
    fn put<E: de::Error>(
        &mut self,
        shown: impl std::fmt::Display,
        f: impl FnOnce(&mut v2::TensorWriter) -> Result<(), v2::ValueError>,
    ) -> Result<(), E> {
        if self.w.len() >= self.room {
            self.failed = Some(DataError::TooMany);
            return Err(E::custom("too many values"));
        }
        f(&mut self.w).map_err(|e| {
            self.failed = Some(DataError::Value(e, codec::clip(&shown.to_string())));
            E::custom("bad value")
        })
    }

    fn kind<E: de::Error>(&mut self, shown: &str) -> Result<(), E> {
        self.failed = Some(DataError::Value(v2::ValueError::Kind, shown.into()));
        Err(E::custom("bad value"))
    }
}

/// One entry of a `data` list: a value, or a nested list of them.
struct Elem<'s>(&'s mut Sink);

impl<'de> de::DeserializeSeed<'de> for Elem<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elem<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("numbers or booleans, in nested lists")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.put(v, |w| w.bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.put(v, |w| w.int(i128::from(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.put(v, |w| w.int(i128::from(v)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // Debug keeps the point: "1.0" for an integer datatype says why.
        self.0.put(format_args!("{v:?}"), |w| w.float(v))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.0.kind("a string")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.kind("null")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.0.kind("an object")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Elem(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// The bytes of one input's JSON `data`, as `dtype`, at most `elements` values.
fn decode_data(
    name: &str,
    dtype: codec::WireDtype,
    raw: &RawValue,
    elements: usize,
) -> Result<Vec<u8>, ServeError> {
    let text = raw.get();
    let mut sink = Sink {
        w: v2::TensorWriter::with_capacity(dtype, data_room(text, elements)),
        room: elements,
        failed: None,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = de::DeserializeSeed::deserialize(Elem(&mut sink), &mut de).and_then(|()| de.end());
    let name = codec::clip(name);
    let dt = v2::datatype_name(dtype);
    match (parsed, sink.failed) {
        (Ok(()), _) => Ok(sink.w.into_bytes()),
        (Err(_), Some(DataError::TooMany)) => Err(invalid(format!(
            "input {name}: data holds more values than its shape"
        ))),
        (Err(_), Some(DataError::Value(v2::ValueError::Range, v))) => Err(invalid(format!(
            "input {name}: {v} is out of the range of datatype {dt}"
        ))),
        (Err(_), Some(DataError::Value(v2::ValueError::Kind, v))) => Err(invalid(format!(
            "input {name}: data does not fit its datatype {dt} ({v})"
        ))),
        (Err(e), None) => Err(invalid(format!(
            "input {name}: data is not a list of values: {}",
            codec::clip(&e.to_string())
        ))),
    }
}

/// Values a `data` text can hold at most: each takes a digit and a separator
/// (bounds what is allocated by the bytes sent, not only by the claimed shape).
fn data_room(text: &str, elements: usize) -> usize {
    elements.min(text.len() / 2 + 1)
}

/// The length of the JSON at the front of a body (all of it, or what
/// `Inference-Header-Content-Length` says).
fn json_length(headers: &HeaderMap, body_len: usize) -> Result<usize, ServeError> {
    match headers.get(HEADER_LENGTH) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n <= body_len)
            .ok_or_else(|| {
                invalid(format!(
                    "Inference-Header-Content-Length must be a number of bytes within the {body_len}-byte body"
                ))
            }),
        None => Ok(body_len),
    }
}

/// Where an input's bytes come from.
enum Source<'a> {
    /// Its slice of the binary section.
    Binary(Bytes),
    /// Its JSON `data`, the datatype, and the elements its shape declares.
    Json(&'a RawValue, codec::WireDtype, usize),
}

/// An inference request as read from its body.
struct ParsedRequest {
    id: String,
    timeout: Option<Duration>,
    binary_default: bool,
    /// Outputs asked for, each with its own `binary_data` choice.
    requested: Vec<(String, Option<bool>)>,
    inputs: Vec<InputTensor>,
    /// The in-flight budget for the decoded JSON tensors, held until the reply.
    tensors: Option<Reservation>,
}

/// Parses a request body: its JSON, JSON tensors decoded into their bytes and
/// binary tensors sliced from the rest. Memory: the body, plus the tensors'
/// bytes, reserved from `budget` before any is decoded. CPU-heavy: runs on the
/// codec thread, not on the I/O threads.
fn parse_request(
    body: Bytes,
    json_len: usize,
    limits: codec::Limits,
    budget: &Arc<Budget>,
    refused: &prometheus::IntCounter,
) -> Result<ParsedRequest, ServeError> {
    let req: RequestJson = serde_json::from_slice(&body[..json_len]).map_err(|e| {
        invalid(format!(
            "the request is not valid JSON for this protocol: {}",
            codec::clip(&e.to_string())
        ))
    })?;
    let Some(Capped(inputs)) = req.inputs else {
        return Err(invalid("the request has no \"inputs\" list".into()));
    };
    // First what every input is and what its JSON data may decode to.
    let mut binary = body.slice(json_len..);
    let mut plan = Vec::with_capacity(inputs.len());
    let mut decoded_bytes: u64 = 0;
    for input in inputs {
        let Some(Capped(shape)) = input.shape else {
            return Err(invalid(format!(
                "input {:?} needs a \"shape\" of at most {MAX_DIMS} dimensions",
                codec::clip(&input.name)
            )));
        };
        let binary_size = input
            .parameters
            .as_ref()
            .and_then(|p| p.binary_data_size)
            .and_then(Scalar::as_u64);
        let source = match (binary_size, input.data) {
            (Some(n), _) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > binary.len() {
                    return Err(invalid(format!(
                        "input {:?}: binary_data_size {n} is more than the {} bytes left in the body",
                        codec::clip(&input.name),
                        binary.len()
                    )));
                }
                Source::Binary(binary.split_to(n))
            }
            (None, Some(raw)) => {
                let dtype = v2::parse_datatype(&input.name, &input.datatype)?;
                let elements = v2::element_count(&input.name, &shape, limits)?;
                let elements = usize::try_from(elements).unwrap_or(usize::MAX);
                decoded_bytes = decoded_bytes.saturating_add(
                    (data_room(raw.get(), elements) as u64).saturating_mul(dtype.size() as u64),
                );
                Source::Json(raw, dtype, elements)
            }
            (None, None) => {
                return Err(invalid(format!(
                    "input {:?} has neither \"data\" nor a binary_data_size parameter",
                    codec::clip(&input.name)
                )));
            }
        };
        plan.push((input.name, input.datatype, shape, source));
    }
    // The decoded tensors are charged before they are made.
    let tensors = if decoded_bytes > 0 {
        Some(budget.reserve(decoded_bytes).ok_or_else(|| {
            refused.inc();
            ServeError::Busy(format!(
                "the server's memory for requests in flight (--max-inflight-bytes) cannot take the {decoded_bytes} bytes this request's JSON tensors decode to now; retry with backoff, or send them as binary data"
            ))
        })?)
    } else {
        None
    };
    let mut out = Vec::with_capacity(plan.len());
    for (name, datatype, shape, source) in plan {
        let data = match source {
            Source::Binary(bytes) => bytes,
            Source::Json(raw, dtype, elements) => {
                Bytes::from(decode_data(&name, dtype, raw, elements)?)
            }
        };
        out.push(InputTensor {
            name,
            datatype,
            shape,
            data,
        });
    }
    let params = req.parameters;
    Ok(ParsedRequest {
        id: req.id,
        timeout: params
            .as_ref()
            .and_then(|p| p.timeout)
            .and_then(Scalar::as_u64)
            .filter(|&us| us > 0)
            .map(Duration::from_micros),
        binary_default: params
            .as_ref()
            .and_then(|p| p.binary_data_output)
            .and_then(Scalar::as_bool)
            .unwrap_or(false),
        requested: req
            .outputs
            .map(|Capped(outs)| {
                outs.into_iter()
                    .map(|o| {
                        let binary = o
                            .parameters
                            .and_then(|p| p.binary_data)
                            .and_then(Scalar::as_bool);
                        (o.name, binary)
                    })
                    .collect()
            })
            .unwrap_or_default(),
        inputs: out,
        tensors,
    })
}

async fn infer(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
    request: axum::extract::Request,
) -> Response {
    let arrival = Instant::now();
    let (parts, body) = request.into_parts();
    let conn = connection_of(&parts.extensions);
    let headers = parts.headers;
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
        // Each chunk of the body is reserved from the budget (and from the
        // connection's share of it) before it is kept.
        let (body, _body_bytes) =
            read_body(&state, &headers, body, conn, state.max_message_bytes).await?;
        let body_len = body.len();
        let binary_request = headers.contains_key(HEADER_LENGTH);
        metrics
            .request_bytes
            .with_label_values(&[
                protocol::V2_HTTP,
                if binary_request { "binary" } else { "json" },
            ])
            .observe(body_len as f64);
        crate::grpc::layers::note_payload(Some(body_len as u64), None);
        let json_len = json_length(&headers, body_len)?;
        let (budget, limits) = (state.budget.clone(), state.api_limits());
        let refused = metrics
            .limit_rejections
            .with_label_values(&[limit::INFLIGHT_BYTES]);
        let parsed = state
            .codec_pool
            .run(move || parse_request(body, json_len, limits, &budget, &refused))
            .await
            .map_err(|busy| {
                metrics
                    .limit_rejections
                    .with_label_values(&[limit::CODEC_QUEUE])
                    .inc();
                ServeError::Busy(busy.to_string())
            })??;
        let ParsedRequest {
            id,
            timeout,
            binary_default,
            requested,
            inputs,
            tensors: _tensors,
        } = parsed;
        let reply = state
            .api
            .infer(InferRequest {
                model: p.name.clone(),
                version: p.version.clone(),
                id,
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

/// A repository request's JSON body (empty is `{}`), bounded in size and
/// read like an inference body (budget, timeout, minimum rate).
async fn small_json(
    state: &HttpState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ServeError> {
    let (bytes, _held) = read_body(state, headers, body, None, MAX_REPOSITORY_BODY).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(format!(
            "the body is not JSON: {}",
            codec::clip(&e.to_string())
        ))
    })?;
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
        let ready = small_json(&state, &headers, body)
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
        let body = small_json(&state, &headers, body).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const L: codec::Limits = codec::Limits {
        max_elements: 1 << 20,
        max_decompressed_bytes: 1 << 20,
    };

    fn parse(json: &str, budget: u64) -> Result<ParsedRequest, ServeError> {
        let budget = Budget::new(budget, prometheus::IntGauge::new("b", "b").unwrap());
        let refused = prometheus::IntCounter::new("r", "r").unwrap();
        let body = Bytes::copy_from_slice(json.as_bytes());
        parse_request(body.clone(), body.len(), L, &budget, &refused)
    }

    fn message(r: Result<ParsedRequest, ServeError>) -> String {
        match r {
            Ok(_) => panic!("parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn json_data_decodes_into_the_datatypes_bytes_nested_lists_flattened() {
        let p = parse(
            r#"{"id":"7","inputs":[{"data":[[1,-2],[3,4]],"shape":[2,2],"datatype":"INT16","name":"a","extra":{"x":[1,2]}}],
                "outputs":[{"name":"o","parameters":{"binary_data":true}}],"parameters":{"timeout":5,"binary_data_output":"yes"}}"#,
            1 << 20,
        )
        .unwrap();
        assert_eq!(p.id, "7");
        assert_eq!(p.inputs[0].data.as_ref(), &[1, 0, 0xfe, 0xff, 3, 0, 4, 0]);
        assert_eq!(p.requested, vec![("o".to_string(), Some(true))]);
        assert_eq!(p.timeout, Some(Duration::from_micros(5)));
        assert!(!p.binary_default);
        // Charged exactly what it decodes to.
        assert_eq!(p.tensors.as_ref().map(|_| ()), Some(()));
    }

    #[test]
    fn bad_json_data_gets_short_messages_that_do_not_quote_it() {
        let long = "x".repeat(5000);
        let e = message(parse(
            &format!(
                r#"{{"inputs":[{{"name":"a","datatype":"FP32","shape":[2],"data":[1,"{long}"]}}]}}"#
            ),
            1 << 20,
        ));
        assert!(
            e.contains("does not fit its datatype FP32") && e.len() < 200,
            "{e}"
        );
        let e = message(parse(
            r#"{"inputs":[{"name":"a","datatype":"INT8","shape":[2],"data":[1,2,3]}]}"#,
            1 << 20,
        ));
        assert!(e.contains("more values than its shape"), "{e}");
        let e = message(parse(
            r#"{"inputs":[{"name":"a","datatype":"INT8","shape":[1],"data":[1000]}]}"#,
            1 << 20,
        ));
        assert!(
            e.contains("1000 is out of the range of datatype INT8"),
            "{e}"
        );
        let e = message(parse(
            &format!(
                r#"{{"inputs":[{}]}}"#,
                vec!["{}"; MAX_TENSORS + 1].join(",")
            ),
            1 << 20,
        ));
        assert!(e.contains("more than 1024 entries"), "{e}");
        let shape = vec!["1"; MAX_DIMS + 1].join(",");
        let e = message(parse(
            &format!(
                r#"{{"inputs":[{{"name":"a","datatype":"INT8","shape":[{shape}],"data":[1]}}]}}"#
            ),
            1 << 20,
        ));
        assert!(e.contains("more than 32 entries"), "{e}");
    }

    #[test]
    fn the_decoded_tensor_is_reserved_before_it_is_made() {
        // 100 FP64 values in 201 bytes of text: room for 101 (808 bytes) is
        // reserved, bounded by the text and not by the 2^20 values claimed.
        let zeros = vec!["0"; 100].join(",");
        let json = format!(
            r#"{{"inputs":[{{"name":"a","datatype":"FP64","shape":[1048576],"data":[{zeros}]}}]}}"#
        );
        let e = message(parse(&json, 807));
        assert!(e.contains("--max-inflight-bytes"), "{e}");
        let p = parse(&json, 808).unwrap();
        assert_eq!(p.inputs[0].data.len(), 800);
    }
}
