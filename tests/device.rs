//! Device failures as a client and an orchestrator see them, on the CPU: a
//! TorchScript fixture raises libtorch's own texts for CUDA out of memory, a
//! cuBLAS failure and a device-side assert (device_fault.pt), which a GPU would
//! raise from the same forwards.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{TestServer, WAIT, args, counter, f32_values, fixture, request};
use splitserve::admin::{AdminState, router};
use splitserve::codec::{Encoding, RawTensor, WireDtype};
use splitserve::engine::{Engine, EngineError, EngineStatus};
use splitserve::grpc::inference_pb::ServerLiveRequest;
use splitserve::grpc::inference_pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use splitserve::plan::{Auto, CpuBudget, ThreadPlan};
use splitserve::telemetry::Metrics;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceExt;

fn fault_model() -> String {
    format!("fault={}", fixture("device_fault.pt").display())
}

async fn health(addr: std::net::SocketAddr, service: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Out of memory is RESOURCE_EXHAUSTED (retryable) and counted under its own
/// reason; other device errors are INTERNAL; neither touches liveness. A
/// device-side assert poisons the context: liveness and readiness go
/// NOT_SERVING (the orchestrator restarts the pod) and new requests are
/// answered UNAVAILABLE instead of failing one by one on a dead device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_failures_get_their_statuses_and_a_poisoned_device_fails_liveness() {
    let server = TestServer::start(args(&[&fault_model()], &["--stall-timeout", "1s"])).await;
    let mut c = server.client().await;

    let e = c
        .compute(request("fault", &[1.0, 0.0], &[1, 2]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("CUDA out of memory"),
        "{}",
        e.message()
    );
    assert_eq!(counter(&mut c, "rejected_out_of_memory").await, 1);
    assert_eq!(counter(&mut c, "rejected_invalid").await, 0);

    let e = c
        .compute(request("fault", &[2.0, 0.0], &[1, 2]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(
        e.message().contains("CUBLAS_STATUS_EXECUTION_FAILED"),
        "{}",
        e.message()
    );
    assert_eq!(counter(&mut c, "rejected_invalid").await, 0);

    // Recoverable: still live, still serving, right answers.
    let r = c
        .compute(request("fault", &[7.0, 0.5], &[1, 2]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&r.data), vec![14.0, 1.0]);
    assert_eq!(
        health(server.addr, "liveness").await,
        ServingStatus::Serving as i32
    );

    let e = c
        .compute(request("fault", &[3.0, 0.0], &[1, 2]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(
        e.message().contains("device-side assert triggered"),
        "{}",
        e.message()
    );
    // The next request is refused without running: the device is gone.
    let e = c
        .compute(request("fault", &[7.0, 0.5], &[1, 2]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("must restart"), "{}", e.message());
    let mut v2 = GrpcInferenceServiceClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let live = v2.server_live(ServerLiveRequest {}).await.unwrap();
    assert!(
        !live.into_inner().live,
        "ServerLive after a poisoned device"
    );
    // grpc.health.v1 follows (the watchdog's tick: a quarter of --stall-timeout).
    let deadline = Instant::now() + WAIT;
    while health(server.addr, "liveness").await != ServingStatus::NotServing as i32 {
        assert!(Instant::now() < deadline, "liveness never went NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        health(server.addr, "").await,
        ServingStatus::NotServing as i32
    );
    server.stop().await.unwrap();
}

async fn get(state: &AdminState, path: &str) -> (StatusCode, String) {
    let res = router(state.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let body = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The HTTP probes: `/livez` and `/readyz` answer 503 and say why once the
/// device is lost, from the forward's error (`infer`) or a fault injected
/// through the engine's hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_and_readyz_fail_after_a_fatal_device_error() {
    for inject in [false, true] {
        let mut a = args(&[&fault_model()], &[]);
        let plan = ThreadPlan::new(
            CpuBudget::of_this_process(None),
            2,
            Auto::Count(1),
            Auto::Count(1),
            1,
            true,
        )
        .unwrap();
        a.engine.plan = plan;
        let metrics = Metrics::new(splitserve::TORCH_VERSION).unwrap();
        let engine = Engine::start(a.engine.clone(), metrics.clone());
        let (_ready, ready_rx) = tokio::sync::watch::channel(true);
        let state = AdminState {
            engine: engine.clone(),
            metrics,
            plan,
            stall_timeout: a.stall_timeout,
            ready: ready_rx,
        };
        let mut status = engine.status();
        while *status.borrow_and_update() != EngineStatus::Ready {
            status.changed().await.unwrap();
        }
        assert_eq!(get(&state, "/livez").await.0, StatusCode::OK);
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
        let enc = Encoding {
            dtype: WireDtype::F32,
            compressed: false,
            explicit: false,
        };
        if inject {
            engine.mark_device_lost("injected: an illegal memory access was encountered");
        } else {
            let r = engine
                .infer("", RawTensor::from_f32(&[3.0], &[1]), enc, None)
                .await;
            assert!(matches!(r, Err(EngineError::Model(_))), "{r:?}");
        }
        let (code, body) = get(&state, "/livez").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("the device failed"), "{body}");
        assert_eq!(
            get(&state, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let r = engine
            .infer("", RawTensor::from_f32(&[7.0], &[1]), enc, None)
            .await;
        assert!(matches!(r, Err(EngineError::DeviceLost(_))), "{r:?}");
        assert!(engine.drain(Duration::from_secs(5)).await);
    }
}

/// Starts an engine on the CPU with `workers` single-threaded workers and its
/// own metrics; returns once it reports ready.
async fn ready_engine(
    models: &[&str],
    extra: &[&str],
    workers: usize,
) -> (Engine, std::sync::Arc<Metrics>) {
    let mut a = args(models, extra);
    a.engine.plan = ThreadPlan::new(
        CpuBudget::of_this_process(None),
        2,
        Auto::Count(workers),
        Auto::Count(1),
        1,
        true,
    )
    .unwrap();
    let metrics = Metrics::new(splitserve::TORCH_VERSION).unwrap();
    let engine = Engine::start(a.engine.clone(), metrics.clone());
    let mut status = engine.status();
    while *status.borrow_and_update() != EngineStatus::Ready {
        status.changed().await.unwrap();
    }
    (engine, metrics)
}

/// Every worker runs each start-up model once on its own thread before the
/// engine reports ready (on CUDA each worker's first forward creates its
/// cuBLAS handle and TorchScript compiles per batch size), not only the
/// loader thread. A 300 ms warm-up shows whether ready waited for them. A
/// model loaded at run time is warmed by every worker before its load answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_warms_the_models_up_before_ready() {
    const WORKERS: u64 = 3;
    let (engine, metrics) = ready_engine(
        &["slow=builtin:delay:300", "scale=builtin:scale:2"],
        &["--warmup-shape", "slow=1x2"],
        WORKERS as usize,
    )
    .await;
    // Read as soon as it is ready.
    for model in ["slow", "scale"] {
        assert_eq!(
            metrics.worker_warmups.with_label_values(&[model]).get(),
            WORKERS,
            "{model}: one warm-up per worker before ready"
        );
    }
    // Serving warms nothing again.
    let enc = Encoding {
        dtype: WireDtype::F32,
        compressed: false,
        explicit: false,
    };
    for _ in 0..4 {
        let r = engine
            .infer("scale", RawTensor::from_f32(&[1.5], &[1, 1]), enc, None)
            .await
            .unwrap();
        assert_eq!(r.tensor.data.as_ref(), 3.0f32.to_le_bytes());
    }
    assert_eq!(
        metrics.worker_warmups.with_label_values(&["scale"]).get(),
        WORKERS
    );
    // A model loaded at run time: every worker has warmed it up when its load
    // answers, and serving it warms nothing again.
    let late: splitserve::model::ModelSpec = "late=builtin:scale:3".parse().unwrap();
    engine
        .load(splitserve::engine::ModelSlot::new(late))
        .await
        .unwrap();
    assert_eq!(
        metrics.worker_warmups.with_label_values(&["late"]).get(),
        WORKERS
    );
    let r = engine
        .infer("late", RawTensor::from_f32(&[1.5], &[1, 1]), enc, None)
        .await
        .unwrap();
    assert_eq!(r.tensor.data.as_ref(), 4.5f32.to_le_bytes());
    assert_eq!(
        metrics.worker_warmups.with_label_values(&["late"]).get(),
        WORKERS
    );
    assert!(engine.drain(Duration::from_secs(5)).await);
}

/// The batch sizes a worker warms up at: once as configured on the CPU; on
/// CUDA a batching TorchScript model also at its preferred sizes and its
/// maximum, twice each (profile, then compile).
#[test]
fn workers_warm_cuda_torchscript_at_the_batch_sizes_batching_forms() {
    use splitserve::engine::warmup_rows;
    assert_eq!(warmup_rows(false, true, true, 8, &[4]), vec![None]);
    assert_eq!(warmup_rows(true, false, true, 8, &[4]), vec![None]);
    assert_eq!(warmup_rows(true, true, true, 1, &[]), vec![None, None]);
    assert_eq!(
        warmup_rows(true, true, true, 8, &[4, 8, 16, 1]),
        vec![None, None, Some(4), Some(4), Some(8), Some(8)]
    );
    assert_eq!(
        warmup_rows(true, true, false, 8, &[4]),
        vec![None, None],
        "several inputs never batch"
    );
}

/// A batch crosses to the device in one copy and its output comes back in
/// one, however many requests it joins; float16 requests stay float16 until
/// they are on the device, and each client still gets its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_copied_once_each_way() {
    const JOBS: usize = 4;
    let (engine, metrics) = ready_engine(
        &["gate=builtin:delay:2000", "scale=builtin:scale:2"],
        &["--max-batch-size", "scale=8"],
        1,
    )
    .await;
    let f16 = Encoding {
        dtype: WireDtype::F16,
        compressed: false,
        explicit: false,
    };
    let f32 = Encoding {
        dtype: WireDtype::F32,
        ..f16
    };
    let gate = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .infer("gate", RawTensor::from_f32(&[0.0], &[1]), f32, None)
                .await
        })
    };
    let deadline = Instant::now() + WAIT;
    while engine.busy_workers() == 0 {
        assert!(Instant::now() < deadline, "the gate never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let calls: Vec<_> = (0..JOBS)
        .map(|i| {
            let engine = engine.clone();
            let rows = 1 + i % 2;
            let values: Vec<f32> = (0..rows).map(|r| (10 * i + r) as f32 + 0.5).collect();
            let data: Vec<u8> = values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            let raw = RawTensor {
                data: data.into(),
                shape: vec![rows as i64, 1],
                dtype: WireDtype::F16,
            };
            let h = tokio::spawn(async move { engine.infer("scale", raw, f16, None).await });
            (h, values)
        })
        .collect();
    let depth = |e: &Engine| {
        e.queue_depths()
            .into_iter()
            .find(|(n, _)| n == "scale")
            .map_or(0, |(_, d)| d)
    };
    while depth(&engine) < JOBS {
        assert!(Instant::now() < deadline, "the requests never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.await.unwrap().unwrap();
    for (h, values) in calls {
        let out = h.await.unwrap().unwrap();
        assert_eq!(
            out.batch_size, JOBS,
            "the queued requests share one forward"
        );
        assert_eq!(out.tensor.dtype, WireDtype::F16);
        let got: Vec<f32> = out
            .tensor
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let want: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        assert_eq!(got, want);
    }
    let copies = |direction: &str| {
        metrics
            .device_copies
            .with_label_values(&["scale", direction])
            .get()
    };
    let forwards = metrics.forwards.with_label_values(&["scale"]).get();
    assert_eq!(forwards, 1);
    assert_eq!(copies("to_device"), 1, "one copy to the device per batch");
    assert_eq!(copies("to_host"), 1, "one copy back per batch");
    assert!(engine.drain(Duration::from_secs(5)).await);
}
