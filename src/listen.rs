//! Accepting connections for the client-facing ports: a connection limit
//! sized from the file descriptor limit, TLS handshakes off the accept path
//! (certificates re-read when their files change, so cert-manager's in-place
//! rotation needs no restart), a separate small pool with a short timeout for
//! sockets still in their handshake or before their first request bytes, idle
//! connections closed, writes to clients that do not read timed out, and a
//! back-off instead of a busy loop when the process runs out of file
//! descriptors. [`serve`] drives HTTP/2 (and HTTP/1.1 where a port speaks it)
//! on the accepted connections, marking each connection busy while a request
//! is in flight.
//!
//! tonic's own `ServerTlsConfig` is fixed at start-up, so the server drives
//! tokio-rustls (the same rustls tonic's `tls-ring` feature uses) itself.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
    /// Established connections at most (per port); one more is closed at
    /// once. None: sized from the file descriptor limit ([`ConnectionPlan`]).
    pub max_connections: Option<usize>,
    /// Sockets in their TLS handshake or before their first request bytes, at
    /// most (per port); when full, the oldest is closed for the new one. None:
    /// sized with `max_connections`.
    pub max_pending: Option<usize>,
    /// From accept until the TLS handshake is done and the first request bytes
    /// (the HTTP/2 preface, or the start of an HTTP/1.1 request) arrived; a
    /// socket that takes longer is closed.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight for this long is closed; None: never.
    pub idle_timeout: Option<Duration>,
    /// A write to the client that makes no progress for this long closes the
    /// connection (a client that does not read its replies); None: never.
    pub write_stall_timeout: Option<Duration>,
    /// How often certificate files are checked for changes.
    pub reload_interval: Duration,
}

/// Connection slots per port, as [`ConnectionPlan::new`] fits them into the
/// process's file descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionPlan {
    /// The soft `RLIMIT_NOFILE` (`ulimit -n`); None where it cannot be read.
    pub nofile: Option<u64>,
    /// Client-facing ports that share the descriptors (gRPC, HTTP).
    pub ports: usize,
    /// Established connections per client-facing port.
    pub max_connections: usize,
    /// Sockets in their handshake per client-facing port.
    pub max_pending: usize,
    /// Descriptors kept for everything else: the admin port's own slots
    /// ([`ADMIN_CONNECTIONS`] + [`ADMIN_PENDING`]), model and repository
    /// files, libtorch, logs, exporters.
    pub reserve: u64,
}

/// Established connections the admin port takes at most (the kubelet's
/// probes and Prometheus).
pub const ADMIN_CONNECTIONS: usize = 32;
/// Sockets in their handshake the admin port holds at most.
pub const ADMIN_PENDING: usize = 16;
/// Descriptors for everything but connections: files the process keeps open
/// (libraries, logs, eventfds, the epoll set), model and repository reads,
/// the OTLP exporter.
const FD_RESERVE: u64 = 64;
/// The default limit per port where descriptors allow more.
const DEFAULT_MAX_CONNECTIONS: usize = 1024;

impl ConnectionPlan {
    /// Fits the connection slots of `ports` client-facing ports (and the admin
    /// port, when `admin`) into `nofile` descriptors. Limits the operator set
    /// are kept or refused with a sentence naming the numbers; unset ones are
    /// sized to fit: a pending pool of an eighth of a port's share (4..=128),
    /// the rest (at most 1024) for established connections.
    pub fn new(
        nofile: Option<u64>,
        ports: usize,
        admin: bool,
        max_connections: Option<usize>,
        max_pending: Option<usize>,
    ) -> Result<ConnectionPlan, String> {
        let ports = ports.max(1);
        let reserve = FD_RESERVE
            + if admin {
                (ADMIN_CONNECTIONS + ADMIN_PENDING) as u64
            } else {
                0
            };
        let Some(limit) = nofile else {
            return Ok(ConnectionPlan {
                nofile,
                ports,
                max_connections: max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                max_pending: max_pending.unwrap_or(128),
                reserve,
            });
        };
        let share = limit.saturating_sub(reserve) / ports as u64;
        let share = usize::try_from(share).unwrap_or(usize::MAX);
        let pending = max_pending.unwrap_or_else(|| (share / 8).clamp(4, 128));
        let established = max_connections
            .unwrap_or_else(|| share.saturating_sub(pending).min(DEFAULT_MAX_CONNECTIONS));
        let need = reserve + ports as u64 * (established as u64 + pending as u64);
        if established == 0 || need > limit {
            return Err(format!(
                "{ports} port(s) x ({established} connections + {pending} pending handshakes) \
                 plus a reserve of {reserve} need {need} file descriptors, but the limit \
                 (ulimit -n) is {limit}: lower --max-connections / --max-pending-connections \
                 or raise the limit"
            ));
        }
        Ok(ConnectionPlan {
            nofile,
            ports,
            max_connections: established,
            max_pending: pending,
            reserve,
        })
    }
}

/// The soft limit on open files of this process (`ulimit -n`), from
/// /proc/self/limits; None where that cannot be read.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    soft.parse().ok() // "unlimited" is None: nothing to fit into
}

/// How one port accepts, with its slots decided.
#[derive(Debug, Clone)]
pub struct PortLimits {
    pub max_connections: usize,
    pub max_pending: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub write_stall_timeout: Option<Duration>,
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
    /// Bytes arrived while no request was in flight: the start of a request
    /// head (HTTP/1.1), so a header-read timeout is a slow client, not an
    /// idle keep-alive connection.
    head_started: AtomicBool,
    /// A write waits for the client to read: busy (a reply being written).
    writing: AtomicBool,
    /// Closed to make room for a new connection (see [`Established`]):
    /// reads end from now on.
    evicted: AtomicBool,
    /// Wakes the connection's reader when it is evicted.
    waker: futures::task::AtomicWaker,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            head_started: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: futures::task::AtomicWaker::new(),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A request started on this connection; the guard marks its end.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(false, Ordering::Relaxed);
        self.touch();
        ActivityGuard(self.clone())
    }

    /// How long the connection has had nothing in flight; None while busy.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 || self.writing.load(Ordering::Relaxed) {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        Some(Duration::from_millis(
            now.saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        ))
    }

    /// Bytes arrived while idle (see `head_started`).
    fn note_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            self.head_started.store(true, Ordering::Relaxed);
        }
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

impl Stream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

/// The writes of one connection that make no progress: when they started,
/// and the bound on how long they may last.
struct WriteStall {
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    /// A write is pending: `timer` runs.
    running: bool,
    /// Counts connections closed for it (`limit="write_stall"`).
    closed: prometheus::IntCounter,
}

impl WriteStall {
    /// Called with a pending write: starts the timer, and turns the write
    /// into an error once it has run out.
    fn check<T>(
        stall: &mut Option<WriteStall>,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let Some(s) = stall else { return outcome };
        if !s.running {
            s.running = true;
            s.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + s.limit);
        }
        if s.timer.as_mut().poll(cx).is_ready() {
            s.closed.inc();
            s.running = false;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for --write-stall-timeout",
            )));
        }
        Poll::Pending
    }
}

/// One accepted connection: holds its slot of `--max-connections` until it closes.
pub struct Conn {
    stream: Stream,
    /// The first request bytes, read while the socket was pending; served
    /// to the HTTP server before the stream's own.
    prefix: Vec<u8>,
    prefix_pos: usize,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    write_stall: Option<WriteStall>,
    /// The port's established connections, which this one leaves on close.
    established: Arc<Established>,
    id: u64,
    /// `splitserve_open_connections` for this port, decremented on close.
    open: prometheus::IntGauge,
    /// Counts connections closed for idling (`limit="idle_connection"`).
    idle_closed: prometheus::IntCounter,
    /// Idle past the limit: reads end from now on.
    expired: bool,
}

impl Conn {
    /// Every write's outcome: a pending one marks the connection busy and
    /// runs the write-stall timer; progress after a wait counts as activity
    /// (a slow reader is still reading its reply).
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let activity = &self.info.activity;
        if outcome.is_ready() {
            if activity.writing.load(Ordering::Relaxed) {
                activity.writing.store(false, Ordering::Relaxed);
                activity.touch();
                if let Some(s) = &mut self.write_stall {
                    s.running = false;
                }
            }
            return outcome;
        }
        activity.writing.store(true, Ordering::Relaxed);
        WriteStall::check(&mut self.write_stall, cx, outcome)
    }

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

impl Conn {
    /// True once the connection was closed to make room for a new one.
    fn evicted(&self, cx: &mut Context<'_>) -> bool {
        let activity = &self.info.activity;
        if activity.evicted.load(Ordering::Acquire) {
            return true;
        }
        activity.waker.register(cx.waker());
        activity.evicted.load(Ordering::Acquire)
    }
}

/// A port's established connections, so that a new one can take the slot of
/// the one idle the longest when all are taken (as nginx reuses idle
/// keep-alive connections): a port full of idle sockets still admits the
/// client that has something to ask.
#[derive(Default)]
struct Established {
    conns: Mutex<std::collections::HashMap<u64, Arc<Activity>>>,
}

impl Established {
    /// Closes the connection idle the longest; false when every one is busy.
    fn evict_idlest(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let idlest = conns
            .values()
            .filter(|a| !a.evicted.load(Ordering::Relaxed))
            .filter_map(|a| a.idle_for().map(|d| (d, a)))
            .max_by_key(|(d, _)| *d);
        match idlest {
            Some((_, activity)) => {
                activity.evicted.store(true, Ordering::Release);
                activity.waker.wake();
                true
            }
            None => false,
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
        if this.idle_expired(cx) || this.evicted(cx) {
            return Poll::Ready(Ok(())); // end of stream: the server closes it
        }
        if this.prefix_pos < this.prefix.len() {
            let rest = &this.prefix[this.prefix_pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.prefix_pos += n;
            if this.prefix_pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.prefix_pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = this.stream.poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.info.activity.note_read();
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.after_write(cx, outcome)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.after_write(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        this.after_write(cx, outcome)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        };
        this.after_write(cx, outcome)
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

/// How long a new connection waits for the slot of the connection closed
/// to make room for it.
const EVICTION_WAIT: Duration = Duration::from_secs(2);

/// What every HTTP/2 connection sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first request bytes: the whole HTTP/2 preface, or,
/// for anything else (HTTP/1.1), the bytes up to where it differs from it.
async fn first_bytes(stream: &mut Stream) -> io::Result<Vec<u8>> {
    let mut got = Vec::with_capacity(H2_PREFACE.len());
    loop {
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - got.len();
        let n = std::future::poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut chunk[..want]);
            match stream.poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&chunk[..n]);
        if got.len() == H2_PREFACE.len() || !H2_PREFACE.starts_with(&got) {
            return Ok(got);
        }
    }
}

/// Sockets in their handshake: at most `cap`, the oldest closed for a new
/// one when full (a client that is really connecting sends its first bytes
/// within a round trip; one that waits is the one to go).
struct Pending {
    cap: usize,
    queue: Mutex<VecDeque<(u64, CancellationToken)>>,
    next: AtomicU64,
}

impl Pending {
    /// Admits a socket: its id and the token that closes it; the second
    /// value is true when an older socket was closed to make room.
    fn admit(&self) -> (u64, CancellationToken, bool) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let evicted = if queue.len() >= self.cap {
            queue.pop_front().map(|(_, t)| t.cancel()).is_some()
        } else {
            false
        };
        queue.push_back((id, token.clone()));
        (id, token, evicted)
    }

    /// The socket left the pool (established, failed or closed).
    fn leave(&self, id: u64) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = queue.iter().position(|(n, _)| *n == id) {
            queue.remove(i);
        }
    }
}

/// Accepts on `listener` until `stop`, yielding connections ready for HTTP
/// (TLS negotiated, first request bytes arrived). Handshakes run in their
/// own tasks, so a slow or silent client never holds up the next accept, and
/// in their own pool of `max_pending` slots, so they never hold the slot of
/// an established connection.
pub fn incoming(
    listener: TcpListener,
    limits: PortLimits,
    tls: Option<Arc<Tls>>,
    port: &'static str,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> impl futures::Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Result<Conn, io::Error>>(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let established = Arc::new(Established::default());
    let pending = Arc::new(Pending {
        cap: limits.max_pending.max(1),
        queue: Mutex::new(VecDeque::new()),
        next: AtomicU64::new(0),
    });
    let open = metrics.open_connections.with_label_values(&[port]);
    let accepted_total = metrics.connections.with_label_values(&[port]);
    let rejected = |label: &str| metrics.limit_rejections.with_label_values(&[label]);
    let (refused, handshake_closed, idle_closed, stall_closed) = (
        rejected(limit::CONNECTIONS),
        rejected(limit::HANDSHAKE),
        rejected(limit::IDLE_CONNECTION),
        rejected(limit::WRITE_STALL),
    );
    let tls_warning = Arc::new(Throttle::new(Duration::from_secs(10)));
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
            let _ = tcp.set_nodelay(true);
            let (id, evict, evicted) = pending.admit();
            if evicted {
                handshake_closed.inc();
            }
            let tls = tls.as_ref().map(|t| t.acceptor());
            let task = Handshake {
                tx: tx.clone(),
                slots: slots.clone(),
                established: established.clone(),
                pending: pending.clone(),
                limits: limits.clone(),
                port,
                metrics: metrics.clone(),
                open: open.clone(),
                accepted_total: accepted_total.clone(),
                refused: refused.clone(),
                handshake_closed: handshake_closed.clone(),
                idle_closed: idle_closed.clone(),
                stall_closed: stall_closed.clone(),
                tls_warning: tls_warning.clone(),
            };
            tokio::spawn(task.run(tcp, addr, tls, id, evict));
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One warning per `every` for a failure many clients can repeat (a misissued
/// client certificate fails every connection of that client): the first is
/// logged with its reason, the rest are counted into the next one.
struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(number suppressed since the last warning) when this one may be logged.
    fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// What a socket's handshake task needs to turn it into a [`Conn`].
struct Handshake {
    tx: mpsc::Sender<Result<Conn, io::Error>>,
    slots: Arc<Semaphore>,
    established: Arc<Established>,
    pending: Arc<Pending>,
    limits: PortLimits,
    port: &'static str,
    metrics: Arc<Metrics>,
    open: prometheus::IntGauge,
    accepted_total: prometheus::IntCounter,
    refused: prometheus::IntCounter,
    handshake_closed: prometheus::IntCounter,
    idle_closed: prometheus::IntCounter,
    stall_closed: prometheus::IntCounter,
    /// Failed TLS handshakes are warned about at most every 10 s per port.
    tls_warning: Arc<Throttle>,
}

impl Handshake {
    async fn run(
        self,
        tcp: TcpStream,
        addr: SocketAddr,
        tls: Option<TlsAcceptor>,
        id: u64,
        evict: CancellationToken,
    ) {
        let port = self.port;
        let is_tls = tls.is_some();
        let handshake = async {
            let mut stream = match tls {
                None => Stream::Plain(tcp),
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => Stream::Tls(Box::new(s)),
                    Err(e) => {
                        self.metrics
                            .tls_handshake_failures
                            .with_label_values(&[port])
                            .inc();
                        // A TCP check that connects and closes (EOF, reset) is
                        // no TLS problem; a protocol or certificate error is.
                        let warn = e.kind() == io::ErrorKind::InvalidData;
                        match warn.then(|| self.tls_warning.allow()).flatten() {
                            Some(more) => tracing::warn!(
                                port,
                                peer = %addr,
                                "TLS handshake failed: {e} (client certificates must be X.509 v3 and chain \
                                 to --tls-client-ca; clients must speak TLS and trust --tls-cert's CA); \
                                 {more} more failure(s) since the last warning, counted in \
                                 splitserve_tls_handshake_failures_total"
                            ),
                            None => {
                                tracing::debug!(port, peer = %addr, error = %e, "TLS handshake failed")
                            }
                        }
                        return None;
                    }
                },
            };
            match first_bytes(&mut stream).await {
                Ok(prefix) => Some((stream, prefix)),
                Err(e) => {
                    tracing::debug!(port, peer = %addr, error = %e, "closed before its first request");
                    None
                }
            }
        };
        let outcome = tokio::select! {
            _ = evict.cancelled() => {
                tracing::debug!(port, peer = %addr, "pending connections full: the oldest closed");
                return; // counted by the one that evicted it
            }
            r = tokio::time::timeout(self.limits.handshake_timeout, handshake) => r,
        };
        self.pending.leave(id);
        let (stream, prefix) = match outcome {
            Ok(Some(ready)) => ready,
            Ok(None) => return,
            Err(_) => {
                self.handshake_closed.inc();
                if is_tls {
                    self.metrics
                        .tls_handshake_failures
                        .with_label_values(&[port])
                        .inc();
                }
                tracing::debug!(port, peer = %addr, "handshake or first request bytes not done within --handshake-timeout");
                return;
            }
        };
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // All taken: the idlest connection makes room (counted as a
            // connection the limit closed), and its slot comes back as
            // soon as its task sees it closed.
            Err(_) if self.established.evict_idlest() => {
                self.refused.inc();
                match tokio::time::timeout(EVICTION_WAIT, self.slots.clone().acquire_owned()).await
                {
                    Ok(Ok(slot)) => slot,
                    _ => return,
                }
            }
            Err(_) => {
                self.refused.inc();
                return; // every connection busy: closed at once, the client retries
            }
        };
        let id = self.pending.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        self.established
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, activity.clone());
        self.open.inc();
        self.accepted_total.inc();
        let conn = Conn {
            stream,
            prefix,
            prefix_pos: 0,
            info: ConnInfo {
                remote_addr: Some(addr),
                activity,
            },
            _slot: slot,
            idle: self
                .limits
                .idle_timeout
                .map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            write_stall: self.limits.write_stall_timeout.map(|limit| WriteStall {
                limit,
                timer: Box::pin(tokio::time::sleep(limit)),
                running: false,
                closed: self.stall_closed.clone(),
            }),
            established: self.established,
            id,
            open: self.open,
            idle_closed: self.idle_closed,
            expired: false,
        };
        let _ = self.tx.send(Ok(conn)).await;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.established
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.open.dec();
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

/// HTTP/1.1 where a port speaks it beside HTTP/2 (the HTTP/REST and admin ports).
#[derive(Debug, Clone, PartialEq)]
pub struct Http1Settings {
    /// A request head (request line and headers) must have arrived this long
    /// after its first byte; a connection that sends it slower is closed.
    pub header_read_timeout: Duration,
}

/// A reply body that keeps its connection marked busy until it has been
/// written (or the connection dropped it).
struct ActiveBody<B> {
    inner: B,
    _active: ActivityGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for ActiveBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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

/// Serves HTTP/2 (and HTTP/1.1 where `http1` is set) on the accepted
/// connections until `stop`, then lets every connection finish its requests
/// (GOAWAY) and returns when all closed. Each request carries its
/// connection's [`ConnInfo`] in its extensions and marks the connection busy
/// (not idle) from its headers until its reply has been written.
///
/// tonic's own transport would do this, but its max_connection_age sends no
/// GOAWAY in 0.14 (it closes the connection after the grace, or panics
/// without one; grpc/grpc-rust#2449), so connections are driven here; and
/// axum's `serve` sets no timer, so hyper's header-read timeout never ran.
pub async fn serve<S, B>(
    incoming: impl futures::Stream<Item = Result<Conn, io::Error>> + Send + 'static,
    service: S,
    settings: Http2Settings,
    http1: Option<Http1Settings>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use futures::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    match &http1 {
        None => builder = builder.http2_only(),
        Some(h1) => {
            builder
                .http1()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .header_read_timeout(h1.header_read_timeout);
        }
    }
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
    let header_timeouts = metrics
        .limit_rejections
        .with_label_values(&[limit::HEADER_READ_TIMEOUT]);
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
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                let active = info.activity.begin();
                req.extensions_mut().insert(info.clone());
                let call = svc.clone().oneshot(req);
                async move {
                    let res = call.await?;
                    Ok::<_, std::convert::Infallible>(res.map(|inner| ActiveBody {
                        inner,
                        _active: active,
                    }))
                }
            });
        let builder = builder.clone();
        let stop = stop.clone();
        let age = settings.max_connection_age.map(|a| {
            let seed = seq ^ (conn.info.remote_addr.map_or(0, |a| u64::from(a.port())) << 32);
            Box::pin(tokio::time::sleep(jitter(a, seed)))
        });
        let grace_after = settings.max_connection_age_grace;
        let activity = conn.info.activity.clone();
        let header_timeouts = header_timeouts.clone();
        connections.spawn(async move {
            let served = builder.serve_connection(TokioIo::new(conn), hyper_svc);
            let mut served = std::pin::pin!(served);
            let mut age = age;
            let mut grace: Option<Pin<Box<Sleep>>> = None;
            let mut going_away = false;
            loop {
                tokio::select! {
                    result = served.as_mut() => {
                        // hyper closes a connection whose request head is late;
                        // one that sent nothing since its last reply was only idle.
                        let late_head = result.as_ref().err().is_some_and(|e| {
                            e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout)
                        });
                        if late_head && activity.head_started.load(Ordering::Relaxed) {
                            header_timeouts.inc();
                        }
                        break;
                    }
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

#[cfg(test)]
mod tests {
    use super::ConnectionPlan;

    #[test]
    fn connection_slots_fit_the_descriptor_limit() {
        // ulimit -n 256, gRPC + HTTP + admin: 256 - 112 reserved = 72 per port.
        let plan = ConnectionPlan::new(Some(256), 2, true, None, None).unwrap();
        assert_eq!((plan.max_connections, plan.max_pending), (63, 9));
        assert!(plan.reserve + 2 * (63 + 9) <= 256);
        // Plenty of descriptors: the usual 1024, pending capped at 128.
        let plan = ConnectionPlan::new(Some(1 << 20), 2, true, None, None).unwrap();
        assert_eq!((plan.max_connections, plan.max_pending), (1024, 128));
        // A limit the operator set is kept when it fits, refused when not.
        let plan = ConnectionPlan::new(Some(1 << 20), 1, false, Some(5000), None).unwrap();
        assert_eq!(plan.max_connections, 5000);
        let e = ConnectionPlan::new(Some(256), 2, true, Some(1000), None).unwrap_err();
        assert!(
            e.contains("1000 connections") && e.contains("is 256"),
            "{e}"
        );
        // Too few descriptors for even one connection per port.
        assert!(ConnectionPlan::new(Some(100), 2, true, None, None).is_err());
        // Unknown limit: the fixed defaults.
        let plan = ConnectionPlan::new(None, 2, true, None, None).unwrap();
        assert_eq!((plan.max_connections, plan.max_pending), (1024, 128));
    }
}
