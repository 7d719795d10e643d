//! Tower layers in front of every gRPC service: the arrival stamp deadlines
//! count from, request limits, authentication, and rewrites of tonic's own
//! answers into the codes the gRPC status table names.
//!
//! [`GuardLayer`] reads each request message itself before tonic sees it: the
//! 5-byte gRPC prefix claims a length, which is checked against
//! `--max-message-bytes` and reserved from the `--max-inflight-bytes` budget
//! before a byte of it is buffered (tonic would reserve the claimed length at
//! once), and the body must arrive within `--request-body-timeout`. Its
//! [`ReplyGuard`] lets the handlers check a reply's size before it is built
//! and hold its bytes in the same budget until the response body is written.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body as HttpBody, Frame, SizeHint};
use prost::bytes::{Buf, Bytes, BytesMut};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use super::ServeError;
use crate::auth::{Refusal, Scope, Tokens};
use crate::listen::ConnInfo;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::limit;

tokio::task_local! {
    /// Payload bytes in and out of the request being served, for the access
    /// log: set by whoever decodes or encodes tensors, read when it is counted.
    static PAYLOAD: std::cell::Cell<(u64, u64)>;
}

/// Records a request's payload bytes (tensor bytes in, out) for its access log line.
pub fn note_payload(bytes_in: Option<u64>, bytes_out: Option<u64>) {
    let _ = PAYLOAD.try_with(|p| {
        let (i, o) = p.get();
        p.set((bytes_in.unwrap_or(i), bytes_out.unwrap_or(o)));
    });
}

/// The payload bytes noted for the request being served, (0, 0) if none.
pub fn payload() -> (u64, u64) {
    PAYLOAD.try_with(std::cell::Cell::get).unwrap_or((0, 0))
}

/// Runs a request's future with a place for its payload bytes.
pub fn with_payload<F: Future>(f: F) -> impl Future<Output = F::Output> {
    PAYLOAD.scope(std::cell::Cell::new((0, 0)), f)
}

/// Health checks are never refused for lack of a token or of memory budget:
/// the kubelet must always be able to ask.
fn is_health(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// gRPC server reflection, v1 and v1alpha.
fn is_reflection(path: &str) -> bool {
    path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// Bytes reserved by request messages queued or in flight, and by replies
/// until they are written, against a limit.
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    gauge: prometheus::IntGauge,
}

impl Budget {
    pub fn new(limit: u64, gauge: prometheus::IntGauge) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            gauge,
        })
    }

    /// Reserves `n` bytes, or None when they do not fit now.
    pub fn reserve(self: &Arc<Self>, n: u64) -> Option<Reservation> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(n).filter(|&t| t <= self.limit)?;
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.gauge.add(n as i64);
                    return Some(Reservation {
                        budget: self.clone(),
                        bytes: n,
                    });
                }
                Err(now) => used = now,
            }
        }
    }

    /// Reserves `n` bytes in place of `old` (of this budget), in one step:
    /// what `old` held counts as free for this reservation, so swapping a
    /// request's bytes for its reply's never fails for want of the request's
    /// own share. On success `old` is emptied; on failure it is left as it was.
    pub fn reserve_instead(
        self: &Arc<Self>,
        n: u64,
        old: &mut Vec<Reservation>,
    ) -> Option<Reservation> {
        old.retain(|r| Arc::ptr_eq(&r.budget, self));
        let freed: u64 = old.iter().map(|r| r.bytes).sum();
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used
                .checked_sub(freed)?
                .checked_add(n)
                .filter(|&t| t <= self.limit)?;
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.gauge.add(n as i64 - freed as i64);
                    for r in old.iter_mut() {
                        // Already given back above; the drop must not again.
                        r.bytes = 0;
                    }
                    old.clear();
                    return Some(Reservation {
                        budget: self.clone(),
                        bytes: n,
                    });
                }
                Err(now) => used = now,
            }
        }
    }

    /// The budget's size in bytes (`--max-inflight-bytes`).
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// Bytes of the budget held until dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    /// Grows the reservation by `n` bytes; false (and unchanged) when they do
    /// not fit now. For bodies reserved as they arrive.
    pub fn try_grow(&mut self, n: u64) -> bool {
        match self.budget.reserve(n) {
            Some(mut more) => {
                self.bytes += std::mem::take(&mut more.bytes);
                true
            }
            None => false,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.gauge.sub(self.bytes as i64);
    }
}

/// Reservations kept alive by a request and then by its reply.
type Held = Arc<Mutex<Option<Vec<Reservation>>>>;

fn lock(held: &Held) -> std::sync::MutexGuard<'_, Option<Vec<Reservation>>> {
    held.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reply's side of the limits: its size is checked against
/// `--max-message-bytes` before it is built, and its bytes are held in the
/// in-flight budget, in place of the request's, until the response body that
/// carries them has been written (or dropped, when the client goes away).
/// [`GuardLayer`] puts one in every gRPC request's extensions; the HTTP
/// front-end makes its own.
#[derive(Clone)]
pub struct ReplyGuard {
    max_message_bytes: usize,
    budget: Arc<Budget>,
    /// `splitserve_limit_rejections_total`.
    rejections: prometheus::IntCounterVec,
    /// Shared with the response body, which keeps it until written.
    held: Held,
}

impl ReplyGuard {
    pub fn new(max_message_bytes: usize, budget: Arc<Budget>, metrics: &Metrics) -> Self {
        ReplyGuard {
            max_message_bytes,
            budget,
            rejections: metrics.limit_rejections.clone(),
            held: Arc::default(),
        }
    }

    /// The largest reply allowed, in bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Refuses a reply of `bytes` bytes (`exact`), or of at least that many,
    /// over `--max-message-bytes`: RESOURCE_EXHAUSTED, counted as `reply_size`.
    pub fn check(&self, bytes: u64, exact: bool) -> Result<(), ServeError> {
        if bytes <= self.max_message_bytes as u64 {
            return Ok(());
        }
        Err(self.too_large(bytes, exact))
    }

    /// The refusal of a reply of `bytes` bytes (or at least that many), counted.
    pub fn too_large(&self, bytes: u64, exact: bool) -> ServeError {
        let max = self.max_message_bytes;
        self.rejections
            .with_label_values(&[limit::REPLY_SIZE])
            .inc();
        ServeError::ReplyTooLarge(format!(
            "reply too large for this server (--max-message-bytes): {}{bytes} bytes, the limit is \
             {max} bytes; ask for fewer outputs or a smaller batch",
            if exact { "" } else { "at least " }
        ))
    }

    /// Checks a reply of `bytes` bytes and holds them in the in-flight budget
    /// in place of what the request (or an earlier estimate of the reply) held,
    /// until the response body is done. RESOURCE_EXHAUSTED, counted as
    /// `inflight_bytes`, when the budget cannot take them now.
    pub fn hold(&self, bytes: u64) -> Result<(), ServeError> {
        self.check(bytes, true)?;
        let mut held = lock(&self.held);
        let old = held.get_or_insert_with(Vec::new);
        match self.budget.reserve_instead(bytes, old) {
            Some(r) => {
                old.push(r);
                Ok(())
            }
            None => {
                self.rejections
                    .with_label_values(&[limit::INFLIGHT_BYTES])
                    .inc();
                Err(ServeError::Busy(format!(
                    "the server's memory for requests in flight (--max-inflight-bytes {}) cannot \
                     take this {bytes}-byte reply now; retry with backoff",
                    self.budget.limit
                )))
            }
        }
    }
}

/// What [`GuardLayer`] enforces.
#[derive(Clone)]
pub struct Guard {
    pub max_message_bytes: usize,
    pub budget: Arc<Budget>,
    pub body_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// Stamps arrival, tracks the connection's activity, and wraps the request
/// body in the message-size, budget and timeout checks.
#[derive(Clone)]
pub struct GuardLayer(pub Guard);

impl<S> Layer<S> for GuardLayer {
    type Service = GuardService<S>;
    fn layer(&self, inner: S) -> GuardService<S> {
        GuardService {
            inner,
            guard: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GuardService<S> {
    inner: S,
    guard: Guard,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<Body>> for GuardService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let exempt = is_health(req.uri().path());
        req.extensions_mut().insert(Arrival(Instant::now()));
        let activity = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.activity.begin());
        let slot: Held = Arc::default();
        if !exempt {
            req.extensions_mut().insert(ReplyGuard {
                max_message_bytes: self.guard.max_message_bytes,
                budget: self.guard.budget.clone(),
                rejections: self.guard.metrics.limit_rejections.clone(),
                held: slot.clone(),
            });
        }
        let (parts, body) = req.into_parts();
        let body = Body::new(GuardedBody {
            inner: body,
            buf: BytesMut::new(),
            need: None,
            guard: self.guard.clone(),
            exempt,
            slot: slot.clone(),
            deadline: Box::pin(tokio::time::sleep(self.guard.body_timeout)),
            ended: false,
        });
        let req = http::Request::from_parts(parts, body);
        // The service that was polled ready serves this call; a clone waits.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.guard.metrics.clone();
        Box::pin(async move {
            let res = with_payload(inner.call(req)).await?;
            let res = rewrite_status(res);
            // The reservations (the request's, then the reply's) and the
            // connection's activity last until the reply has been written.
            Ok(res.map(|b| {
                Body::new(HoldBody {
                    inner: b,
                    pending: Bytes::new(),
                    metrics,
                    _hold: (slot, activity),
                })
            }))
        })
    }
}

/// The request body as tonic reads it: whole messages only, each checked and
/// reserved from its 5-byte prefix before its bytes are buffered.
struct GuardedBody {
    inner: Body,
    buf: BytesMut,
    /// Length of the message being received, prefix included, once known.
    need: Option<usize>,
    guard: Guard,
    exempt: bool,
    slot: Held,
    deadline: Pin<Box<tokio::time::Sleep>>,
    ended: bool,
}

impl GuardedBody {
    fn refuse(
        &self,
        which: &'static str,
        status: Status,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.guard
            .metrics
            .limit_rejections
            .with_label_values(&[which])
            .inc();
        Poll::Ready(Some(Err(status)))
    }

    /// Checks a message's prefix: its claimed length fits the limit and the budget.
    fn admit(&mut self, prefix: [u8; 5]) -> Result<usize, (&'static str, Status)> {
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        let max = self.guard.max_message_bytes;
        if len > max {
            return Err((
                limit::MESSAGE_SIZE,
                Status::resource_exhausted(format!(
                    "message too large for this server (--max-message-bytes): found {len} bytes, the limit is {max} bytes"
                )),
            ));
        }
        if !self.exempt {
            match self.guard.budget.reserve(len as u64 + 5) {
                Some(r) => lock(&self.slot).get_or_insert_with(Vec::new).push(r),
                None => {
                    return Err((
                        limit::INFLIGHT_BYTES,
                        Status::resource_exhausted(format!(
                            "the server's memory for requests in flight (--max-inflight-bytes {}) cannot take a {len}-byte message now; retry with backoff",
                            self.guard.budget.limit
                        )),
                    ));
                }
            }
        }
        Ok(len + 5)
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if this.need.is_none() && this.buf.len() >= 5 {
                let prefix = [
                    this.buf[0],
                    this.buf[1],
                    this.buf[2],
                    this.buf[3],
                    this.buf[4],
                ];
                match this.admit(prefix) {
                    Ok(n) => this.need = Some(n),
                    Err((which, status)) => return this.refuse(which, status),
                }
            }
            if let Some(n) = this.need {
                if this.buf.len() >= n {
                    this.need = None;
                    let message = this.buf.split_to(n).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(message))));
                }
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        // The common case: one whole message in one frame, no copy.
                        if this.buf.is_empty() && this.need.is_none() && data.len() >= 5 {
                            let prefix = [data[0], data[1], data[2], data[3], data[4]];
                            match this.admit(prefix) {
                                Ok(n) if n == data.len() => {
                                    return Poll::Ready(Some(Ok(Frame::data(data))));
                                }
                                Ok(n) => this.need = Some(n),
                                Err((which, status)) => return this.refuse(which, status),
                            }
                        }
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let n = chunk.len();
                            this.buf.extend_from_slice(chunk);
                            data.advance(n);
                        }
                    }
                    Err(frame) => {
                        if this.buf.is_empty() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                    }
                },
                Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status))),
                Poll::Ready(None) => {
                    this.ended = true;
                    if !this.buf.is_empty() {
                        let have = this.buf.len();
                        let msg = match this.need {
                            Some(n) => format!(
                                "the request body ended inside a message: {have} of its {n} bytes arrived"
                            ),
                            None => format!(
                                "the request body ended inside a message prefix ({have} of 5 bytes)"
                            ),
                        };
                        this.buf.clear();
                        return Poll::Ready(Some(Err(Status::invalid_argument(msg))));
                    }
                }
                Poll::Pending => {
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        let secs = this.guard.body_timeout.as_secs_f64();
                        this.ended = true;
                        this.buf = BytesMut::new();
                        return this.refuse(
                            limit::BODY_TIMEOUT,
                            Status::deadline_exceeded(format!(
                                "the request body did not arrive within {secs} s (--request-body-timeout)"
                            )),
                        );
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.buf.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Largest piece of a reply handed to the transport at a time. hyper asks the
/// body for its next piece only when the stream has room to send (HTTP/2 flow
/// control, HTTP/1 write buffer), so a reply cut into pieces stays here, and
/// its bytes stay counted, while a client that does not read holds it up.
pub const REPLY_CHUNK: usize = 64 * 1024;

/// The next piece of at most [`REPLY_CHUNK`] bytes of `pending` (empty when done).
pub fn next_piece(pending: &mut Bytes) -> Bytes {
    let n = pending.len().min(REPLY_CHUNK);
    pending.split_to(n)
}

/// A gRPC response body that keeps the request's and the reply's
/// reservations alive until the reply is written, hands it to the transport
/// in [`REPLY_CHUNK`] pieces, and rewrites tonic's trailers where it refuses
/// to encode a reply over the size limit.
struct HoldBody<T> {
    inner: Body,
    /// The rest of a data frame not yet handed on.
    pending: Bytes,
    metrics: Arc<Metrics>,
    _hold: T,
}

impl<T: Send + Unpin + 'static> HttpBody for HoldBody<T> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(next_piece(&mut this.pending)))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    if data.len() > REPLY_CHUNK {
                        let piece = data.split_to(REPLY_CHUNK);
                        this.pending = data;
                        data = piece;
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(mut trailers) => {
                        if rewrite_headers(&mut trailers) == Some(limit::REPLY_SIZE) {
                            this.metrics
                                .limit_rejections
                                .with_label_values(&[limit::REPLY_SIZE])
                                .inc();
                        }
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + pending);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

/// Checks `authorization: Bearer` on every RPC but health, and hands the
/// token's scopes to the handlers in the request's extensions.
#[derive(Clone)]
pub struct AuthLayer {
    pub tokens: Option<Arc<Tokens>>,
    pub metrics: Arc<Metrics>,
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S> Service<http::Request<Body>> for AuthService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(tokens) = &self.layer.tokens else {
            return Box::pin(inner.call(req));
        };
        if is_health(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match tokens.check(header) {
            // Reflection describes every service: a read-only call, the `infer` scope's.
            Ok(granted) if is_reflection(req.uri().path()) && !granted.allows(Scope::Infer) => {
                self.layer
                    .metrics
                    .auth_failures
                    .with_label_values(&["permission_denied"])
                    .inc();
                let res = Status::permission_denied(
                    "this token lacks the \"infer\" scope that reflection needs",
                )
                .into_http::<Body>();
                Box::pin(async move { Ok(res) })
            }
            Ok(granted) => {
                req.extensions_mut().insert(granted);
                Box::pin(inner.call(req))
            }
            Err(refusal) => {
                self.layer
                    .metrics
                    .auth_failures
                    .with_label_values(&["unauthenticated"])
                    .inc();
                let msg = match refusal {
                    Refusal::Missing => {
                        "this server requires a token: send metadata 'authorization: Bearer <token>'"
                    }
                    Refusal::Unknown => "the bearer token is not valid on this server",
                };
                let res = Status::unauthenticated(msg).into_http::<Body>();
                Box::pin(async move { Ok(res) })
            }
        }
    }
}

/// When a request's headers reached the server, stamped by [`GuardLayer`].
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

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

/// The longest status message sent; longer ones are cut (grpc-python refuses
/// metadata past 8 KiB by default, and nobody reads a page of error).
pub const MAX_STATUS_MESSAGE: usize = 1000;

/// Rewrites tonic's own trailers-only answers where the gRPC status table names
/// another code: a message over the size limit is RESOURCE_EXHAUSTED (tonic says
/// OUT_OF_RANGE), and a body that is not a valid protobuf message is the
/// client's INVALID_ARGUMENT (tonic says INTERNAL). Every message is cut to
/// [`MAX_STATUS_MESSAGE`] bytes.
pub fn rewrite_status<B>(mut res: http::Response<B>) -> http::Response<B> {
    rewrite_headers(res.headers_mut());
    res
}

/// [`rewrite_status`] on a header or trailer map; says which limit it
/// rewrote a refusal for, if any.
fn rewrite_headers(h: &mut http::HeaderMap) -> Option<&'static str> {
    let code = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)?;
    let message = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    let mut which = None;
    let (code, text) = match code.as_str() {
        // tonic refuses to encode a reply over --max-message-bytes with
        // OUT_OF_RANGE in the trailers; the handlers check first, so this is a
        // backstop.
        "11" if message.contains("encoded message length too large") => {
            which = Some(limit::REPLY_SIZE);
            let sizes = message.split("found ").nth(1).unwrap_or("").to_string();
            (
                "8",
                format!("reply too large for this server (--max-message-bytes): {sizes}"),
            )
        }
        "11" if message.contains("message length too large") => {
            let sizes = message.split("found ").nth(1).unwrap_or("").to_string();
            (
                "8",
                format!("message too large for this server (--max-message-bytes): found {sizes}"),
            )
        }
        "13" if message.starts_with("failed to decode Protobuf message") => (
            "3",
            format!(
                "the request is not a valid protobuf message for this RPC ({})",
                message
                    .trim_start_matches("failed to decode Protobuf message")
                    .trim_start_matches(": ")
            ),
        ),
        "13" if message.starts_with("Unexpected EOF decoding stream") => {
            ("3", "the request body ended inside a message".to_string())
        }
        _ if message.len() > MAX_STATUS_MESSAGE => (code.as_str(), message.clone()),
        _ => return None,
    };
    let text = crate::codec::cut(&text, MAX_STATUS_MESSAGE);
    if let Ok(v) = http::HeaderValue::from_str(code) {
        h.insert("grpc-status", v);
    }
    if let Ok(v) = http::HeaderValue::from_str(&percent_encode(&text)) {
        h.insert("grpc-message", v);
    }
    which
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        // Counted from the arrival stamp, not from when it is parsed, and
        // DEADLINE_MARGIN early (before tonic's own CANCELLED).
        let arrival = Instant::now();
        let mut md = tonic::metadata::MetadataMap::new();
        for (header, d) in [
            ("250m", Duration::from_millis(250)),
            ("3S", Duration::from_secs(3)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("1500u", Duration::from_micros(1500)),
            ("99999999n", Duration::from_nanos(99_999_999)),
            ("1n", Duration::ZERO),
        ] {
            md.insert("grpc-timeout", header.parse().unwrap());
            let deadline = deadline_from_metadata(&md, arrival).unwrap();
            assert_eq!(
                deadline.duration_since(arrival),
                d.saturating_sub(DEADLINE_MARGIN),
                "{header}"
            );
        }
        for junk in ["junk", "", "m", "12x", "-5m"] {
            md.insert("grpc-timeout", junk.parse().unwrap());
            assert!(deadline_from_metadata(&md, arrival).is_none(), "{junk:?}");
        }
        md.remove("grpc-timeout");
        assert!(deadline_from_metadata(&md, arrival).is_none());
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
        let res = rewrite_status(res);
        assert_eq!(res.headers()["grpc-status"], "8");
        let msg = res.headers()["grpc-message"].to_str().unwrap();
        assert!(msg.contains("2000 bytes") && msg.contains("1024"), "{msg}");
        let other = http::Response::builder()
            .header("grpc-status", "11")
            .body(())
            .unwrap();
        assert_eq!(rewrite_status(other).headers()["grpc-status"], "11");
    }

    #[test]
    fn a_reply_tonic_refuses_to_encode_becomes_resource_exhausted() {
        // tonic's trailers when a reply passes max_encoding_message_size.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "11".parse().unwrap());
        trailers.insert(
            "grpc-message",
            "Error,%20encoded%20message%20length%20too%20large:%20found%2080056%20bytes,%20the%20limit%20is:%2065536%20bytes"
                .parse()
                .unwrap(),
        );
        assert_eq!(rewrite_headers(&mut trailers), Some(limit::REPLY_SIZE));
        assert_eq!(trailers["grpc-status"], "8");
        let msg = trailers["grpc-message"].to_str().unwrap();
        assert!(msg.starts_with("reply too large"), "{msg}");
        assert!(
            msg.contains("80056 bytes") && msg.contains("65536"),
            "{msg}"
        );
    }

    #[test]
    fn a_reply_takes_the_place_of_its_request_in_the_budget() {
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        let budget = Budget::new(100, gauge.clone());
        let mut request = vec![budget.reserve(60).unwrap()];
        let other = budget.reserve(30).unwrap();
        // 60 + 30 + 70 > 100, but the request's 60 are given up for it.
        let reply = budget.reserve_instead(70, &mut request).unwrap();
        assert!(request.is_empty());
        assert_eq!(gauge.get(), 100);
        let mut none = Vec::new();
        assert!(budget.reserve_instead(1, &mut none).is_none());
        let mut reply = vec![reply];
        assert!(budget.reserve_instead(71, &mut reply).is_none());
        assert_eq!(reply.len(), 1, "a refused swap keeps what it held");
        drop((reply, other));
        assert_eq!(gauge.get(), 0);
        assert_eq!(budget.used.load(Ordering::Relaxed), 0);
    }
}
