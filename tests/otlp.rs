//! Traces reach a real OTLP/gRPC receiver, and a caller's `traceparent` stays the
//! parent: the RPC span, its queue wait and its forward share the caller's trace.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use splitserve::grpc::pb;
use splitserve::grpc::pb::compute_service_client::ComputeServiceClient;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    /// service.name of every resource that exported spans.
    services: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            if let Some(r) = &rs.resource {
                for kv in &r.attributes {
                    if kv.key == "service.name" {
                        use opentelemetry_proto::tonic::common::v1::any_value::Value;
                        if let Some(Value::StringValue(s)) =
                            kv.value.as_ref().and_then(|v| v.value.as_ref())
                        {
                            self.services.lock().unwrap().push(s.clone());
                        }
                    }
                }
            }
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| {
            use opentelemetry_proto::tonic::common::v1::any_value::Value;
            match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                Value::IntValue(i) => Some(i.to_string()),
                other => Some(format!("{other:?}")),
            }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let grpc = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args([
            "serve",
            "--grpc-addr",
            &grpc,
            "--metrics-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(["--model", "k=builtin:scale:2"])
        // The forward span's device is asserted below: the CPU, GPU host or not.
        .args(["--device", "cpu"])
        .args(["--otlp-endpoint", &format!("http://{otlp_addr}")])
        .env("OTEL_SERVICE_NAME", "top-half")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut client = loop {
        if let Ok(mut c) = ComputeServiceClient::connect(format!("http://{grpc}")).await {
            if c.health_check(pb::HealthRequest {})
                .await
                .is_ok_and(|r| r.get_ref().status == "ok")
            {
                break c;
            }
        }
        assert!(Instant::now() < deadline, "server never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(common::request("", &[1.0, 2.0], &[1, 2]));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    client.compute(req).await.unwrap();
    // A client that cannot set gRPC headers puts traceparent in the request's
    // own metadata map: the same trace continues.
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut in_map = common::request("", &[3.0], &[1, 1]);
    in_map.metadata.insert(
        "traceparent".into(),
        format!("00-{other_trace}-b7ad6b7169203331-01"),
    );
    client.compute(in_map).await.unwrap();

    // SIGTERM: the server drains and flushes its spans before exiting.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());

    let spans = receiver.spans.lock().unwrap().clone();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && hex(&s.trace_id) == trace_id)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} span in the caller's trace: {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
            .clone()
    };
    assert!(
        spans
            .iter()
            .any(|s| s.name == "Compute" && hex(&s.trace_id) == other_trace),
        "traceparent from the request's metadata map was not followed"
    );
    let services = receiver.services.lock().unwrap().clone();
    assert!(
        !services.is_empty() && services.iter().all(|s| s == "top-half"),
        "service.name does not follow OTEL_SERVICE_NAME: {services:?}"
    );
    let rpc = find("Compute");
    assert_eq!(
        hex(&rpc.parent_span_id),
        caller_span,
        "the caller's span is the parent"
    );
    assert_eq!(attr(&rpc, "rpc.method").as_deref(), Some("Compute"));
    let queue = find("queue");
    assert_eq!(queue.parent_span_id, rpc.span_id);
    let forward = find("forward");
    assert_eq!(forward.parent_span_id, rpc.span_id);
    assert_eq!(attr(&forward, "model").as_deref(), Some("k"));
    assert_eq!(attr(&forward, "batch_size").as_deref(), Some("1"));
    assert_eq!(attr(&forward, "device").as_deref(), Some("cpu"));
    assert!(attr(&forward, "shape").unwrap().contains("[1, 2]"));
}
