//! The global tracing subscriber: stderr logs (text or JSON) and, when an OTLP
//! endpoint is configured, spans exported over OTLP/gRPC. Also the W3C
//! `traceparent` extraction that lets a caller's trace continue here.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt as tfmt};

/// How the process logs and where its traces go.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// One structured line per request (target `splitserve::access`).
    pub access_log: bool,
    /// OTLP/gRPC collector; None falls back to OTEL_EXPORTER_OTLP_ENDPOINT.
    pub otlp_endpoint: Option<String>,
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Keeps the trace pipeline alive; [`TelemetryGuard::shutdown`] flushes it.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports what is still buffered. Call once, after the server stopped.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("splitserve: flushing traces failed: {e}");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// The OTLP/gRPC exporter drives tonic, which needs a tokio reactor, but the
/// SDK's batch processor exports from its own plain thread
/// (open-telemetry/opentelemetry-rust#2673): give it a current-thread runtime
/// that runs on that same thread, so no extra thread appears.
struct ExporterOnOwnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
    endpoint: String,
    /// When the last failed export was logged, and how many failed since: a
    /// collector that is down or misnamed is one warning a minute, not silence.
    failures: Mutex<(Option<Instant>, u64)>,
}

impl fmt::Debug for ExporterOnOwnRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExporterOnOwnRuntime")
            .finish_non_exhaustive()
    }
}

impl SpanExporter for ExporterOnOwnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let result = self.runtime.block_on(self.inner.export(batch));
        if let Err(e) = &result {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            failures.1 += 1;
            if failures
                .0
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    failed_exports = failures.1,
                    "exporting traces over OTLP/gRPC to {} failed: {e} (check --otlp-endpoint or \
                     OTEL_EXPORTER_OTLP_ENDPOINT, and that the collector listens there); next \
                     warning in a minute at the earliest",
                    self.endpoint
                );
                *failures = (Some(Instant::now()), 0);
            }
        }
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

fn exporter(endpoint: &str) -> Result<ExporterOnOwnRuntime, TelemetryError> {
    let err = |message: String| TelemetryError::Exporter {
        endpoint: endpoint.to_string(),
        message,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(e.to_string()))?;
    // The channel's connection task belongs to this runtime.
    let inner = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| err(e.to_string()))?
    };
    Ok(ExporterOnOwnRuntime {
        inner,
        runtime,
        endpoint: endpoint.to_string(),
        failures: Mutex::new((None, 0)),
    })
}

/// The OTLP endpoint: the flag, else the standard OpenTelemetry variable.
pub fn otlp_endpoint(flag: Option<&str>) -> Option<String> {
    // An empty flag (an unset chart value) is no flag: the standard variable applies.
    flag.filter(|f| !f.trim().is_empty())
        .map(str::to_string)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.trim().is_empty())
}

/// Installs the global subscriber. Logs honour `RUST_LOG` (default info); spans
/// of this crate go to OTLP at debug level, so without an endpoint they cost
/// nothing.
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    access_log: bool,
) -> Result<TelemetryGuard, TelemetryError> {
    // The access log is its own target, off unless asked for (RUST_LOG wins).
    let default = if access_log {
        "info,splitserve::access=info"
    } else {
        "info,splitserve::access=off"
    };
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt_layer = match format {
        LogFormat::Json => tfmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
        // Colour only for a person at a terminal, never into a file or a pipe.
        LogFormat::Text => tfmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(log_filter);

    let mut provider = None;
    let otel_layer = match otlp_endpoint {
        Some(endpoint) => {
            let p = SdkTracerProvider::builder()
                .with_batch_exporter(exporter(endpoint)?)
                .with_resource(resource())
                .build();
            let tracer = p.tracer("splitserve");
            provider = Some(p);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(Targets::new().with_target("splitserve", tracing::Level::DEBUG)),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init();
    match otlp_endpoint {
        Some(endpoint) => tracing::info!(
            endpoint,
            "traces: spans are exported over OTLP/gRPC to {endpoint}; failed exports are logged"
        ),
        None => tracing::debug!("traces: off (no --otlp-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT)"),
    }
    Ok(TelemetryGuard { provider })
}

/// The service's resource: `service.name` from `OTEL_SERVICE_NAME` (and other
/// attributes from `OTEL_RESOURCE_ATTRIBUTES`, which the SDK reads), else
/// "splitserve".
fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty());
    let builder = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if named {
        builder.build()
    } else {
        builder.with_service_name("splitserve").build()
    }
}

/// The trace id of the current span, for logs; None without tracing.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Reads W3C trace context from the ComputeRequest's `metadata` map.
struct MapExtractor<'a>(&'a std::collections::HashMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Like [`continue_trace`], from a request's own `metadata` map (clients
/// that cannot set gRPC headers put `traceparent` there).
pub fn continue_trace_from_map(
    span: &tracing::Span,
    map: &std::collections::HashMap<String, String>,
) {
    if !map.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MapExtractor(map));
    let _ = span.set_parent(cx);
}

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Makes `span` a child of the caller's span when the request carries a
/// `traceparent`.
pub fn continue_trace(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if metadata.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(cx);
}
