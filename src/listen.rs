//! Accepting connections for the client-facing ports: a connection limit, TLS
//! handshakes off the accept path (certificates re-read when their files
//! change, so cert-manager's in-place rotation needs no restart), idle
//! connections closed, and a back-off instead of a busy loop when the process
//! runs out of file descriptors.
//!
//! tonic's own `ServerTlsConfig` is fixed at start-up, so the server drives
//! tokio-rustls (the same rustls tonic's `tls-ring` feature uses) itself.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::telemetry::Metrics;
use crate::telemetry::metrics::limit;

/// PEM files of a TLS identity, and the CA that client certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: clients must present a certificate this CA bundle verifies (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// How a port accepts connections.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ListenConfig {
    pub tls: Option<TlsFiles>,
    /// Open connections at most; one more is closed at once.
    pub max_connections: usize,
    /// A TLS handshake that takes longer is abandoned.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight for this long is closed; None: never.
    pub idle_timeout: Option<Duration>,
    /// How often certificate files are checked for changes.
    pub reload_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("TLS: cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("TLS: {0}")]
    Config(String),
}

/// A certificate set that can be swapped while connections are open: every
/// handshake takes the current one; established sessions keep theirs.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, [u8; 32])>,
    /// Label for logs and metrics ("grpc", "admin").
    port: &'static str,
}

impl Tls {
    /// Reads the files; a failure here is a configuration error.
    pub fn load(files: TlsFiles, port: &'static str) -> Result<Arc<Tls>, ListenError> {
        let (config, digest) = build_config(&files, &Pem::read(&files)?)?;
        Ok(Arc::new(Tls {
            files,
            current: RwLock::new((Arc::new(config), digest)),
            port,
        }))
    }

    fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        TlsAcceptor::from(current.0.clone())
    }

    /// Re-reads the files when their contents changed. A broken new set (a
    /// half-written Secret) keeps the old one in service and is logged.
    fn reload(&self, metrics: &Metrics) {
        let Ok(pem) = Pem::read(&self.files) else {
            return; // unreadable for a moment: try again next time
        };
        let digest = pem.digest();
        let unchanged = self.current.read().map(|c| c.1 == digest).unwrap_or(false);
        if unchanged {
            return;
        }
        match build_config(&self.files, &pem) {
            Ok((config, digest)) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                    (Arc::new(config), digest);
                metrics.credential_reloads.with_label_values(&["tls"]).inc();
                tracing::info!(port = self.port, cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(port = self.port, error = %e, "TLS files changed but do not load; keeping the previous certificate");
            }
        }
    }

    /// Checks the files every `every` until `stop`.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        every: Duration,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        let tls = self.clone();
        spawn_every(every, stop, move || tls.reload(&metrics));
    }
}

/// Runs `f` every `every` until `stop`: how credential files are re-read.
pub fn spawn_every(every: Duration, stop: CancellationToken, f: impl Fn() + Send + 'static) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => f(),
            }
        }
    });
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ListenError> {
    std::fs::read(path).map_err(|e| ListenError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The files' bytes, read once per (re)load: certificate chain, key, client CA.
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Pem {
    fn read(files: &TlsFiles) -> Result<Pem, ListenError> {
        Ok(Pem {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            client_ca: files.client_ca.as_ref().map(read).transpose()?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(&self.cert);
        h.update(&self.key);
        if let Some(ca) = &self.client_ca {
            h.update(ca);
        }
        h.finalize().into()
    }
}

fn build_config(files: &TlsFiles, pem: &Pem) -> Result<(ServerConfig, [u8; 32]), ListenError> {
    let digest = pem.digest();
    let cert_pem = &pem.cert;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ListenError::Config(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(ListenError::Config(format!(
            "{} holds no PEM certificate",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key)
        .map_err(|e| ListenError::Config(format!("{}: {e}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ListenError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let ca_pem = pem.client_ca.as_deref().unwrap_or_default();
            for cert in CertificateDer::pem_slice_iter(ca_pem) {
                let cert =
                    cert.map_err(|e| ListenError::Config(format!("{}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| ListenError::Config(format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(ListenError::Config(format!(
                    "{} holds no CA certificate",
                    ca.display()
                )));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ListenError::Config(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| ListenError::Config(format!("certificate and key: {e}")))?;
    // gRPC needs HTTP/2; HTTP/1.1 stays possible for the HTTP ports.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, digest))
}

/// What a connection is doing, shared with the request layers: requests in
/// flight and when the last one started or ended.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last request start or end.
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A request started on this connection; the guard marks its end.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ActivityGuard(self.clone())
    }

    /// How long the connection has had nothing in flight; None while busy.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        Some(Duration::from_millis(
            now.saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        ))
    }
}

/// Ends a request's activity when dropped.
#[derive(Debug)]
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// What the request layers learn about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote_addr: Option<SocketAddr>,
    pub activity: Arc<Activity>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection: holds its slot of `--max-connections` until it closes.
pub struct Conn {
    stream: Stream,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    /// `splitserve_open_connections` for this port, decremented on close.
    open: prometheus::IntGauge,
    /// Counts connections closed for idling (`limit="idle_connection"`).
    idle_closed: prometheus::IntCounter,
    /// Idle past the limit: reads end from now on.
    expired: bool,
}

impl Conn {
    /// True once the connection has been idle for its limit: reads then end,
    /// and the HTTP/2 server closes the connection.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.expired {
            return true;
        }
        let Some((limit, sleep)) = &mut self.idle else {
            return false;
        };
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            match self.info.activity.idle_for() {
                Some(idle) if idle >= *limit => {
                    self.idle_closed.inc();
                    self.expired = true;
                    return true;
                }
                Some(idle) => sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + (*limit - idle)),
                None => sleep.as_mut().reset(tokio::time::Instant::now() + *limit),
            }
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.idle_expired(cx) {
            return Poll::Ready(Ok(())); // end of stream: the server closes it
        }
        match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accept errors that mean "out of a resource", not "this one connection
/// failed": retrying at once would spin.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// errno values (Linux), without a libc dependency for four numbers.
mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}

/// Accepts on `listener` until `stop`, yielding connections ready for HTTP/2
/// (TLS already negotiated). Handshakes run in their own tasks, so a slow or
/// silent client never holds up the next accept.
pub fn incoming(
    listener: TcpListener,
    config: ListenConfig,
    tls: Option<Arc<Tls>>,
    port: &'static str,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> impl futures::Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Result<Conn, io::Error>>(64);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let open = metrics.open_connections.with_label_values(&[port]);
    let accepted_total = metrics.connections.with_label_values(&[port]);
    tokio::spawn(async move {
        let mut last_warning: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) if is_resource_error(&e) => {
                    metrics
                        .limit_rejections
                        .with_label_values(&[limit::FILE_DESCRIPTORS])
                        .inc();
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        last_warning = Some(Instant::now());
                        tracing::warn!(port, error = %e, "cannot accept connections: out of file descriptors or memory; backing off");
                    }
                    // Pending connections wait in the kernel's backlog meanwhile.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(port, error = %e, "accept failed");
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics
                    .limit_rejections
                    .with_label_values(&[limit::CONNECTIONS])
                    .inc();
                drop(tcp); // closed at once: the client retries elsewhere or later
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let info = ConnInfo {
                remote_addr: Some(addr),
                activity: Arc::new(Activity::new()),
            };
            let idle = config
                .idle_timeout
                .map(|d| (d, Box::pin(tokio::time::sleep(d))));
            let open = open.clone();
            let accepted_total = accepted_total.clone();
            let idle_closed = metrics
                .limit_rejections
                .with_label_values(&[limit::IDLE_CONNECTION]);
            match &tls {
                None => {
                    open.inc();
                    accepted_total.inc();
                    let conn = Conn {
                        stream: Stream::Plain(tcp),
                        info,
                        _slot: slot,
                        idle,
                        open,
                        idle_closed,
                        expired: false,
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.acceptor();
                    let tx = tx.clone();
                    let metrics = metrics.clone();
                    let timeout = config.handshake_timeout;
                    tokio::spawn(async move {
                        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                open.inc();
                                accepted_total.inc();
                                let conn = Conn {
                                    stream: Stream::Tls(Box::new(stream)),
                                    info,
                                    _slot: slot,
                                    idle,
                                    open,
                                    idle_closed,
                                    expired: false,
                                };
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Ok(Err(e)) => {
                                metrics
                                    .tls_handshake_failures
                                    .with_label_values(&[port])
                                    .inc();
                                tracing::debug!(port, peer = %addr, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                metrics
                                    .tls_handshake_failures
                                    .with_label_values(&[port])
                                    .inc();
                                tracing::debug!(port, peer = %addr, "TLS handshake timed out");
                            }
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The accepted connections as axum's listener, for the admin port with TLS.
pub struct ConnListener {
    conns: Pin<Box<dyn futures::Stream<Item = Result<Conn, io::Error>> + Send>>,
    local: SocketAddr,
}

impl ConnListener {
    pub fn new(
        conns: impl futures::Stream<Item = Result<Conn, io::Error>> + Send + 'static,
        local: SocketAddr,
    ) -> ConnListener {
        ConnListener {
            conns: Box::pin(conns),
            local,
        }
    }
}

/// HTTP requests carry their connection's [`ConnInfo`] (axum's `ConnectInfo`).
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, ConnListener>>
    for ConnInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, ConnListener>) -> ConnInfo {
        stream.io().info.clone()
    }
}

impl axum::serve::Listener for ConnListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        use futures::StreamExt;
        loop {
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let addr = conn.info.remote_addr.unwrap_or(self.local);
                    return (conn, addr);
                }
                Some(Err(_)) => continue,
                // Shutting down: no more connections; axum's graceful shutdown ends the loop.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// HTTP/2 settings of a port served by [`serve`].
#[derive(Debug, Clone, PartialEq)]
pub struct Http2Settings {
    /// Streams (concurrent RPCs) one connection may open.
    pub max_concurrent_streams: u32,
    /// Keepalive ping interval on idle connections; None: no pings.
    pub keepalive_interval: Option<Duration>,
    /// A connection that does not answer a ping within this is closed.
    pub keepalive_timeout: Duration,
    /// Connections older than this (±10% jitter, so they do not all reconnect
    /// at once) get a GOAWAY; None: never.
    pub max_connection_age: Option<Duration>,
    /// After that GOAWAY, in-flight requests get this long before the
    /// connection is closed.
    pub max_connection_age_grace: Duration,
}

/// Waits on an optional timer; never ready without one.
async fn maybe(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// `d` moved by up to ±10%, from a cheap per-connection seed.
fn jitter(d: Duration, seed: u64) -> Duration {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 31;
    let unit = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    d.mul_f64(0.9 + 0.2 * unit)
}

/// Serves HTTP/2 (gRPC) on the accepted connections until `stop`, then lets
/// every connection finish its requests (GOAWAY) and returns when all closed.
/// Each request carries its connection's [`ConnInfo`] in its extensions.
///
/// tonic's own transport would do this, but its max_connection_age sends no
/// GOAWAY in 0.14 (it closes the connection after the grace, or panics
/// without one; grpc/grpc-rust#2449), so connections are driven here.
pub async fn serve<S>(
    incoming: impl futures::Stream<Item = Result<Conn, io::Error>> + Send + 'static,
    service: S,
    settings: Http2Settings,
    stop: CancellationToken,
) where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use futures::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut builder =
        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http2_only();
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        // A client that resets streams as fast as it opens them (the "rapid
        // reset" attack) gets its connection closed.
        .max_pending_accept_reset_streams(64)
        .max_header_list_size(64 * 1024);
    let connections = tokio_util::task::TaskTracker::new();
    let mut incoming = std::pin::pin!(incoming);
    let mut seq: u64 = 0;
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            next = incoming.next() => match next {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        seq += 1;
        let info = conn.info.clone();
        let svc = service.clone();
        let hyper_svc =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let mut req = req.map(tonic::body::Body::new);
                req.extensions_mut().insert(info.clone());
                svc.clone().oneshot(req)
            });
        let builder = builder.clone();
        let stop = stop.clone();
        let age = settings.max_connection_age.map(|a| {
            let seed = seq ^ (conn.info.remote_addr.map_or(0, |a| u64::from(a.port())) << 32);
            Box::pin(tokio::time::sleep(jitter(a, seed)))
        });
        let grace_after = settings.max_connection_age_grace;
        connections.spawn(async move {
            let served = builder.serve_connection(TokioIo::new(conn), hyper_svc);
            let mut served = std::pin::pin!(served);
            let mut age = age;
            let mut grace: Option<Pin<Box<Sleep>>> = None;
            let mut going_away = false;
            loop {
                tokio::select! {
                    _ = served.as_mut() => break,
                    _ = maybe(&mut age) => {
                        // GOAWAY: the client opens a new connection (maybe to
                        // another pod) for new requests; these ones finish.
                        age = None;
                        if !going_away {
                            going_away = true;
                            served.as_mut().graceful_shutdown();
                            grace = Some(Box::pin(tokio::time::sleep(grace_after)));
                        }
                    }
                    _ = maybe(&mut grace) => {
                        tracing::debug!("connection past its age and grace: closed");
                        break;
                    }
                    _ = stop.cancelled(), if !going_away => {
                        going_away = true;
                        served.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}
