//! Connecting to a server and `probe`, the grpc.health.v1 check for exec
//! probes and container HEALTHCHECKs.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
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

    /// Set: the port speaks TLS (the server's --tls-cert).
    pub tls: Option<ProbeTls>,
}

/// How the probe verifies a TLS server, and the certificate it presents.
#[derive(Debug, Clone, Default)]
pub struct ProbeTls {
    /// PEM CA bundle the server's certificate must chain to.
    pub ca: PathBuf,
    /// The name the server's certificate must carry; None: the address's host.
    /// An exec probe dials 127.0.0.1 while the certificate names the Service.
    pub server_name: Option<String>,
    /// A client certificate and key (PEM), for a server with --tls-client-ca.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ProbeTls {
    fn config(&self) -> Result<ClientTlsConfig, String> {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(config)
    }
}

/// An error with its causes: tonic's own Display is only "transport error",
/// while the cause ("Connection refused", a certificate problem) is below it.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// What to do about a connect error a user can fix from the command line.
fn hint(error: &str, tls: bool) -> &'static str {
    if error.contains("onnection refused") {
        " (nothing listens there: is the server running, on this --addr?)"
    } else if !tls
        && [
            "h2 protocol error",
            "frame with invalid size",
            "broken pipe",
            "onnection reset",
        ]
        .iter()
        .any(|s| error.contains(s))
    {
        " (the server closed the connection: if the port speaks TLS, pass --tls-ca, and \
         --tls-cert/--tls-key for mTLS)"
    } else if tls && (error.contains("InvalidContentType") || error.contains("corrupt message")) {
        " (the port speaks plaintext: drop --tls-ca)"
    } else {
        ""
    }
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
        .map_err(|e| {
            let e = with_causes(&e);
            format!("cannot connect to {uri}: {e}{}", hint(&e, false))
        })
}

/// The serving status of one health service, as its name ("SERVING", ...).
pub async fn probe(args: &ProbeConfig) -> Result<String, String> {
    let channel = match &args.tls {
        None => connect(&args.addr, args.timeout).await?,
        Some(tls) => {
            let addr = args.addr.strip_prefix("http://").unwrap_or(&args.addr);
            let addr = if addr.contains("://") {
                addr.to_string()
            } else {
                format!("https://{addr}")
            };
            let endpoint = endpoint(&addr)?
                .tls_config(tls.config()?)
                .map_err(|e| format!("TLS settings: {}", with_causes(&e)))?;
            let uri = endpoint.uri().clone();
            endpoint
                .connect_timeout(args.timeout)
                .timeout(args.timeout)
                .connect()
                .await
                .map_err(|e| {
                    let e = with_causes(&e);
                    format!("cannot connect to {uri}: {e}{}", hint(&e, true))
                })?
        }
    };
    let mut health = HealthClient::new(channel);
    let response = health
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|s| {
            let causes = std::error::Error::source(&s)
                .map(with_causes)
                .unwrap_or_default();
            let detail = if causes.is_empty() {
                s.message().to_string()
            } else {
                causes
            };
            format!(
                "health check failed: {:?}: {detail}{}",
                s.code(),
                hint(&detail, args.tls.is_some())
            )
        })?;
    let status = ServingStatus::try_from(response.into_inner().status)
        .map_or("UNKNOWN", |s| s.as_str_name());
    Ok(status.to_string())
}
