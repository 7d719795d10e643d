//! The admin sidecar's routes, without a socket (tower::ServiceExt::oneshot).
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::args;
use splitserve::admin::{AdminState, router};
use splitserve::codec::{Encoding, RawTensor, WireDtype};
use splitserve::engine::{Engine, EngineStatus};
use splitserve::plan::{Auto, CpuBudget, ThreadPlan};
use splitserve::telemetry::Metrics;
use tower::ServiceExt;

async fn get(state: &AdminState, path: &str) -> (StatusCode, String) {
    let res = router(state.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let body = axum::body::to_bytes(res.into_body(), 1 << 24)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_probes_and_plan() {
    let mut a = args(&["slow=builtin:delay:1500"], &["--stall-timeout", "100ms"]);
    let plan = ThreadPlan::new(
        CpuBudget::of_this_process(None),
        2,
        Auto::Count(1),
        Auto::Count(1),
        1,
        true,
    )
    .unwrap();
    let metrics = Metrics::new(splitserve::TORCH_VERSION).unwrap();
    a.engine.plan = plan;
    let engine = Engine::start(a.engine.clone(), metrics.clone());
    // The server's readiness: its start-up models (the repository's too) loaded.
    let (ready, ready_rx) = tokio::sync::watch::channel(false);
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
    // The engine's models are loaded, the repository's not yet: not ready.
    let (code, body) = get(&state, "/readyz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    ready.send_replace(true);
    assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
    assert_eq!(get(&state, "/livez").await.0, StatusCode::OK);

    // One slow job: the worker is busy past the stall timeout.
    let job = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let enc = Encoding {
                dtype: WireDtype::F32,
                compressed: false,
                explicit: false,
            };
            engine
                .infer("", RawTensor::from_f32(&[1.0], &[1]), enc, None)
                .await
        })
    };
    // Stalled from 100 ms into the job until it ends.
    let (code, body) = loop {
        let (code, body) = get(&state, "/livez").await;
        if code != StatusCode::OK || job.is_finished() {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(
        code,
        StatusCode::SERVICE_UNAVAILABLE,
        "never stalled: {body}"
    );
    assert!(body.contains("stalled"), "{body}");
    let (_, text) = get(&state, "/metrics").await;
    assert!(
        text.contains("splitserve_workers{state=\"stalled\"} 1"),
        "{text}"
    );
    job.await.unwrap().unwrap();

    let (code, text) = get(&state, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    for line in [
        "splitserve_computed_requests_total{model=\"slow\"} 1",
        "splitserve_forwards_total{model=\"slow\"} 1",
        "splitserve_batch_size_count{model=\"slow\"} 1",
        "splitserve_queue_capacity{model=\"slow\"} 1024",
        "splitserve_workers{state=\"idle\"} 1",
        "splitserve_threads{pool=\"inference\"} 1",
        "splitserve_cpu_budget_cores",
    ] {
        assert!(text.contains(line), "missing {line}");
    }
    let (code, body) = get(&state, "/debug/plan").await;
    assert_eq!(code, StatusCode::OK);
    let plan: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(plan["plan"]["workers"], 1);
    assert_eq!(plan["models"][0]["name"], "slow");
    // The process's own thread count (this test runs the engine in-process),
    // give or take a thread that tokio starts or stops meanwhile.
    let reported = plan["process_threads"].as_u64().unwrap();
    let tasks = std::fs::read_dir("/proc/self/task").unwrap().count() as u64;
    assert!(
        reported.abs_diff(tasks) <= 2,
        "process_threads {reported}, /proc/self/task lists {tasks}"
    );

    assert!(engine.drain(Duration::from_secs(5)).await);
    let (code, body) = get(&state, "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    );
}
