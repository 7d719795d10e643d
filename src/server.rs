//! The server: starts the engine, the gRPC services and the admin sidecar on
//! listeners the caller bound, follows readiness and liveness, and drains on
//! shutdown.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::auth::Tokens;
use crate::codec::{self, CodecPool};
use crate::engine::{Engine, EngineConfig, EngineStatus};
use crate::grpc::inference::{InferenceApi, InferenceGrpc};
use crate::grpc::inference_pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::grpc::layers::{AuthLayer, Budget, Guard, GuardLayer};
use crate::grpc::pb::compute_service_server::ComputeServiceServer;
use crate::grpc::{ComputeApi, SERVICE_NAME, StaticInfo};
use crate::listen::{
    self, ConnectionPlan, Http1Settings, Http2Settings, ListenConfig, PortLimits, Tls, TlsFiles,
};
use crate::plan::PlanRequest;
use crate::repository::{self, Repository, RepositoryConfig};
use crate::telemetry::otel::TelemetryConfig;
use crate::telemetry::{self, SnapshotCache};
use crate::{TORCH_VERSION, admin, grpc, http};

/// Everything `splitserve serve` runs with; built by the command line (or by an
/// embedding program or a test from plain values), passed down whole.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the gRPC server listens (the caller binds it; kept for logs).
    pub grpc_addr: SocketAddr,
    /// Where the admin sidecar listens (the caller binds it); None: off.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the Open Inference Protocol's HTTP/REST front-end listens (the
    /// caller binds it); None: off.
    pub http_addr: Option<SocketAddr>,
    pub telemetry: TelemetryConfig,
    /// The thread plan as requested; `engine.plan` is what it came to.
    pub threads: PlanRequest,
    pub engine: EngineConfig,
    /// Limits applied while decoding tensors.
    pub limits: codec::Limits,
    /// How the gRPC port accepts connections: TLS, connection limits.
    pub listen: ListenConfig,
    /// TLS for the admin port; None: plain HTTP (the kubelet and Prometheus).
    pub admin_tls: Option<TlsFiles>,
    /// Bearer tokens with scopes; None: no authentication.
    pub auth_token_file: Option<PathBuf>,
    pub http2: Http2Config,
    /// An HTTP/1.1 request head must arrive within this after its first byte
    /// (the HTTP/REST and admin ports).
    pub http_header_read_timeout: Duration,
    /// Bytes of request messages that may be queued or in flight at once.
    pub max_inflight_bytes: u64,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// How HTTP request bodies may arrive (rate, per-connection share).
    pub http_body: http::BodyLimits,
    /// A worker busy on one job longer than this marks the process not live.
    pub stall_timeout: Duration,
    /// After shutdown starts, how long queued and in-flight requests get.
    pub shutdown_grace: Duration,
    /// A model repository in Triton's layout; None: only `engine.models`.
    pub repository: Option<RepositoryConfig>,
}

/// HTTP/2 settings of the gRPC port.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Http2Config {
    /// Streams (concurrent RPCs) one connection may open.
    pub max_concurrent_streams: u32,
    /// Keepalive ping interval on idle connections; None: no pings.
    pub keepalive_interval: Option<Duration>,
    /// A connection that does not answer a ping within this is closed.
    pub keepalive_timeout: Duration,
    /// A request body must have arrived this long after its headers.
    pub request_body_timeout: Duration,
    /// Connections older than this get a GOAWAY; None: never.
    pub max_connection_age: Option<Duration>,
    /// Time in-flight requests get after that GOAWAY.
    pub max_connection_age_grace: Duration,
}

/// Sockets the caller bound, so tests can use port 0 and read the address.
pub struct Listeners {
    pub grpc: TcpListener,
    /// The admin sidecar (/metrics, /livez, /readyz, /debug/plan); None to skip it.
    pub admin: Option<TcpListener>,
    /// The Open Inference Protocol over HTTP (`/v2/...`); None to skip it.
    pub http: Option<TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Credentials that cannot be read or parsed: the operator's to fix.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the models could not be loaded: {0}")]
    Startup(String),
    #[error(transparent)]
    Metrics(#[from] telemetry::metrics::MetricsError),
}

/// Health service names and what they follow.
const READINESS_SERVICES: [&str; 2] = ["", SERVICE_NAME];
/// Health service name that follows liveness (no stalled worker).
pub const LIVENESS_SERVICE: &str = "liveness";
/// Health service names per model: `model/NAME` is SERVING while a version of
/// NAME is loaded, NOT_SERVING once it is not (unloaded, or failed to load).
pub const MODEL_SERVICE_PREFIX: &str = "model/";

/// Serves until `shutdown` is cancelled, then drains: health turns NOT_SERVING,
/// new requests get UNAVAILABLE, queued and in-flight ones finish within
/// `--shutdown-grace`. Must be called inside a tokio runtime.
pub async fn run(
    config: ServerConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let plan = config.engine.plan;
    let metrics = telemetry::Metrics::new(TORCH_VERSION)?;
    // Connection slots fit the file descriptor limit, so that the admin port
    // and health keep answering however many sockets clients open.
    let client_ports = 1 + usize::from(listeners.http.is_some());
    let connections = ConnectionPlan::new(
        listen::open_files_limit(),
        client_ports,
        listeners.admin.is_some(),
        config.listen.max_connections,
        config.listen.max_pending,
    )
    .map_err(RunError::Config)?;
    tracing::info!(
        nofile = ?connections.nofile,
        ports = connections.ports,
        max_connections = connections.max_connections,
        max_pending_connections = connections.max_pending,
        admin_connections = listen::ADMIN_CONNECTIONS,
        reserve = connections.reserve,
        "connection plan: per client port, within the file descriptor limit"
    );
    let port_limits = |max_connections, max_pending| PortLimits {
        max_connections,
        max_pending,
        handshake_timeout: config.listen.handshake_timeout,
        idle_timeout: config.listen.idle_timeout,
        write_stall_timeout: config.listen.write_stall_timeout,
    };
    let client_limits = port_limits(connections.max_connections, connections.max_pending);
    let admin_limits = port_limits(listen::ADMIN_CONNECTIONS, listen::ADMIN_PENDING);
    // Credentials first: a bad file is a configuration error, reported before
    // any model loads.
    let grpc_tls = config
        .listen
        .tls
        .clone()
        .map(|files| Tls::load(files, "grpc"))
        .transpose()
        .map_err(|e| RunError::Config(e.to_string()))?;
    let admin_tls = config
        .admin_tls
        .clone()
        .map(|files| Tls::load(files, "admin"))
        .transpose()
        .map_err(|e| RunError::Config(e.to_string()))?;
    let tokens = config
        .auth_token_file
        .clone()
        .map(Tokens::load)
        .transpose()
        .map_err(|e| RunError::Config(e.to_string()))?;
    // The repository's trainable models train in place: loaded at start, never reloaded.
    let mut engine_config = config.engine.clone();
    if let Some(repo) = &config.repository {
        let added = repository::add_trainable_models(repo, &mut engine_config);
        if !added.is_empty() {
            tracing::info!(models = ?added, "trainable repository models are loaded at start and pinned");
        }
    }
    let fixed: BTreeSet<String> = engine_config
        .models
        .iter()
        .map(|m| m.spec.name.clone())
        .collect();
    let engine = Engine::start(engine_config, metrics.clone());
    let repository = config
        .repository
        .clone()
        .map(|cfg| Repository::new(cfg, engine.clone(), fixed));
    let snapshots = SnapshotCache::default();
    let stop_background = CancellationToken::new();
    snapshots.spawn_refresher(Duration::from_secs(1), stop_background.clone());
    let reload = config.listen.reload_interval;
    for tls in grpc_tls.iter().chain(&admin_tls) {
        tls.spawn_reloader(reload, metrics.clone(), stop_background.clone());
    }
    if let Some(tokens) = &tokens {
        tokens.spawn_reloader(reload, metrics.clone(), stop_background.clone());
    }
    let codec_pool = Arc::new(CodecPool::start(256)?);

    // Ready (for /readyz and /v2/health/ready as for grpc.health.v1): the
    // engine's models and the repository's start-up models are loaded, and
    // the server is not draining.
    let (ready, ready_rx) = tokio::sync::watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in READINESS_SERVICES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;

    let api = ComputeApi::new(
        engine.clone(),
        StaticInfo {
            version: env!("CARGO_PKG_VERSION"),
            torch_version: TORCH_VERSION,
            plan,
            max_message_bytes: config.max_message_bytes,
            stall_timeout: config.stall_timeout,
        },
        config.limits,
        snapshots.clone(),
        codec_pool.clone(),
    );
    let compute = ComputeServiceServer::new(api)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let inference_api = Arc::new(
        InferenceApi::new(
            engine.clone(),
            config.limits,
            env!("CARGO_PKG_VERSION"),
            config.stall_timeout,
            repository.clone(),
        )
        .with_readiness(ready_rx.clone()),
    );
    let inference = GrpcInferenceServiceServer::new(InferenceGrpc(inference_api.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grpc::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| RunError::Config(format!("gRPC reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| RunError::Config(format!("gRPC reflection: {e}")))?;
    let budget = Budget::new(config.max_inflight_bytes, metrics.inflight_bytes.clone());

    spawn_stall_watchdog(
        engine.clone(),
        health.clone(),
        config.stall_timeout,
        stop_background.clone(),
    );

    let stop_server = CancellationToken::new();
    // The HTTP front-end speaks TLS with the same certificate as gRPC.
    let http_tls = grpc_tls.clone();
    let incoming = listen::incoming(
        listeners.grpc,
        client_limits.clone(),
        grpc_tls,
        "grpc",
        metrics.clone(),
        stop_server.clone(),
    );
    let guard = Guard {
        max_message_bytes: config.max_message_bytes,
        budget: budget.clone(),
        body_timeout: config.http2.request_body_timeout,
        metrics: metrics.clone(),
    };
    let routes = tonic::service::Routes::new(health_service)
        .add_service(inference)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(compute)
        .prepare();
    let service = tower::ServiceBuilder::new()
        .map_request(|r: ::http::Request<hyper::body::Incoming>| r.map(tonic::body::Body::new))
        .layer(GuardLayer(guard))
        .layer(AuthLayer {
            tokens: tokens.clone(),
            metrics: metrics.clone(),
        })
        .service(routes);
    let http2 = Http2Settings {
        max_concurrent_streams: config.http2.max_concurrent_streams,
        keepalive_interval: config.http2.keepalive_interval,
        keepalive_timeout: config.http2.keepalive_timeout,
        max_connection_age: config.http2.max_connection_age,
        max_connection_age_grace: config.http2.max_connection_age_grace,
    };
    let http1 = Http1Settings {
        header_read_timeout: config.http_header_read_timeout,
    };
    let server = listen::serve(
        incoming,
        service,
        http2.clone(),
        None,
        metrics.clone(),
        stop_server.clone(),
    );
    let mut server = tokio::spawn(server);

    if let Some(listener) = listeners.http {
        let state = http::HttpState {
            api: inference_api.clone(),
            tokens: tokens.clone(),
            budget: budget.clone(),
            max_message_bytes: config.max_message_bytes,
            body_timeout: config.http2.request_body_timeout,
            body_limits: config.http_body,
            codec_pool: codec_pool.clone(),
            shares: Arc::default(),
        };
        let conns = listen::incoming(
            listener,
            client_limits.clone(),
            http_tls,
            "http",
            metrics.clone(),
            stop_server.clone(),
        );
        tokio::spawn(listen::serve(
            conns,
            http::router(state),
            http2.clone(),
            Some(http1.clone()),
            metrics.clone(),
            stop_server.clone(),
        ));
    }

    if let Some(listener) = listeners.admin {
        let state = admin::AdminState {
            engine: engine.clone(),
            metrics: metrics.clone(),
            plan,
            stall_timeout: config.stall_timeout,
            ready: ready_rx.clone(),
        };
        // Its own slots, inside the descriptors' reserve: probes and scrapes
        // get through whatever the client ports hold.
        let conns = listen::incoming(
            listener,
            admin_limits,
            admin_tls,
            "admin",
            metrics.clone(),
            stop_server.clone(),
        );
        tokio::spawn(listen::serve(
            conns,
            admin::router(state),
            Http2Settings {
                max_concurrent_streams: 16,
                keepalive_interval: None,
                keepalive_timeout: config.http2.keepalive_timeout,
                max_connection_age: None,
                max_connection_age_grace: config.http2.max_connection_age_grace,
            },
            Some(http1),
            metrics.clone(),
            stop_server.clone(),
        ));
    }

    // Readiness follows the engine: NOT_SERVING until loaded, SERVING after.
    let mut status = engine.status();
    let outcome = loop {
        let current = status.borrow_and_update().clone();
        match current {
            EngineStatus::Ready => {
                // Ready once the repository's initial models are loaded (or failed).
                if let Some(repo) = &repository {
                    repo.start().await;
                    repo.spawn_poller(stop_background.clone());
                }
                spawn_model_health(
                    engine.clone(),
                    repository.clone(),
                    health.clone(),
                    stop_background.clone(),
                );
                for name in READINESS_SERVICES {
                    health
                        .set_service_status(name, ServingStatus::Serving)
                        .await;
                }
                ready.send_replace(true);
                snapshots.set_gpu_device(match engine.device() {
                    Some(tch::Device::Cuda(n)) => Some(n as u32),
                    _ => None,
                });
                // GPU metrics cover the CUDA devices the models run on.
                let cuda: Vec<u32> = engine
                    .loaded()
                    .iter()
                    .filter_map(|m| m.device.strip_prefix("cuda:")?.parse().ok())
                    .chain(match engine.device() {
                        Some(tch::Device::Cuda(n)) => Some(n as u32),
                        _ => None,
                    })
                    .collect();
                telemetry::system::use_gpus(&cuda);
                tracing::info!(addr = ?config.grpc_addr, "serving");
            }
            // Checkpoints that exist but do not load are the operator's to fix.
            EngineStatus::Failed(msg) if engine.training().refused_start() => {
                break Err(RunError::Config(msg));
            }
            EngineStatus::Failed(msg) => break Err(RunError::Startup(msg)),
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            changed = status.changed() => if changed.is_err() { break Ok(()) },
            res = &mut server => {
                stop_background.cancel();
                return match res {
                    Ok(()) => Err(RunError::Startup("the gRPC server stopped accepting connections".into())),
                    Err(e) => Err(RunError::Startup(format!("server task ended: {e}"))),
                };
            }
        }
    };

    // A failed start is logged by the caller; only a requested shutdown is news here.
    if outcome.is_ok() {
        tracing::info!(
            grace_s = config.shutdown_grace.as_secs_f64(),
            "shutdown requested (Kubernetes sends SIGTERM before removing the pod): \
             health NOT_SERVING, finishing queued and in-flight requests"
        );
    }
    ready.send_replace(false);
    for name in READINESS_SERVICES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let drained = engine.drain(config.shutdown_grace).await;
    if !drained {
        tracing::warn!("shutdown grace ran out; queued requests were answered UNAVAILABLE");
    }
    stop_server.cancel();
    // In-flight replies are written by now; give the connections a moment to flush.
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
    stop_background.cancel();
    tracing::info!(
        computed = engine.metrics().total(&engine.metrics().computed, &[]),
        "stopped"
    );
    outcome
}

/// Marks the process not live while a worker is stuck on one job for longer than
/// `--stall-timeout`, or for good after a fatal device error (then not ready
/// either), so a Kubernetes liveness probe on `liveness` restarts it.
fn spawn_stall_watchdog(
    engine: Engine,
    health: tonic_health::server::HealthReporter,
    limit: Duration,
    stop: CancellationToken,
) {
    let every = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut was_stalled = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let not_live = engine.not_live(limit);
            if not_live.is_some() != was_stalled {
                was_stalled = not_live.is_some();
                if was_stalled {
                    if engine.device_lost() {
                        tracing::error!(
                            reason = not_live.as_deref().unwrap_or_default(),
                            "the device failed for good; liveness and readiness NOT_SERVING"
                        );
                    } else {
                        tracing::error!(
                            stalled = engine.stalled_workers(limit),
                            limit_s = limit.as_secs_f64(),
                            "worker stalled: busy on one job past --stall-timeout; liveness NOT_SERVING"
                        );
                    }
                    health
                        .set_service_status(LIVENESS_SERVICE, ServingStatus::NotServing)
                        .await;
                    if engine.device_lost() {
                        // For good: no traffic until the restart.
                        for name in READINESS_SERVICES {
                            health
                                .set_service_status(name, ServingStatus::NotServing)
                                .await;
                        }
                    }
                } else {
                    tracing::warn!("stalled worker finished its job; liveness SERVING again");
                    health
                        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
                        .await;
                }
            }
        }
    });
}

/// Keeps `model/NAME` health statuses in step with what is loaded: set once
/// at start, then after every repository change, until `stop`.
fn spawn_model_health(
    engine: Engine,
    repository: Option<Repository>,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut changes = repository.as_ref().map(Repository::changes);
    tokio::spawn(async move {
        let mut known: BTreeSet<String> = BTreeSet::new();
        loop {
            let served: BTreeSet<String> = engine.model_names().into_iter().collect();
            for name in known.union(&served) {
                let status = if served.contains(name) {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health
                    .set_service_status(format!("{MODEL_SERVICE_PREFIX}{name}"), status)
                    .await;
            }
            known.extend(served);
            let Some(rx) = changes.as_mut() else { return };
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    });
}
