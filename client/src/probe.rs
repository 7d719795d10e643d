//! Connecting to a server and `probe`, the grpc.health.v1 check for exec
//! probes and container HEALTHCHECKs.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Server address, host:port.
    pub addr: String,

    /// Health service to check: "" (the server), splitlearn.comm.ComputeService
    /// (ready to compute) or liveness (no stalled worker).
    pub service: String,

    /// Give up after this long (connect plus check).
    pub timeout: Duration,
}

/// An endpoint for `host:port` (or a full URI), with Nagle off.
pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .map(|e| e.tcp_nodelay(true))
        .map_err(|e| format!("bad address {addr:?}: {e}"))
}

/// Connects to `host:port` (or a full URI), giving up after `timeout`; every
/// call on the channel has the same limit.
pub async fn connect(addr: &str, timeout: Duration) -> Result<Channel, String> {
    let endpoint = endpoint(addr)?;
    let uri = endpoint.uri().clone();
    endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {uri}: {e}"))
}

/// The serving status of one health service, as its name ("SERVING", ...).
pub async fn probe(args: &ProbeConfig) -> Result<String, String> {
    let channel = connect(&args.addr, args.timeout).await?;
    let mut health = HealthClient::new(channel);
    let response = health
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|s| format!("health check failed: {:?}: {}", s.code(), s.message()))?;
    let status = ServingStatus::try_from(response.into_inner().status)
        .map_or("UNKNOWN", |s| s.as_str_name());
    Ok(status.to_string())
}
