//! On a CUDA device (`--device cuda`, and `--device auto` where there is one):
//! the same answers as on the CPU, training included, and the device reported
//! where clients read it. Ignored by default, so that `cargo test` reports
//! them as ignored (not passed) on machines without a GPU; `make gpu-check`
//! runs them (`-- --ignored gpu::`), and there a missing CUDA device fails them
//! with the reason.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Instant;

use common::{
    TestServer, WAIT, args, f16_bytes, f16_values, f32_bytes, f32_values, fixture, request, values,
};
use splitserve::grpc::pb::{self, BackwardRequest, ComputeRequest};

/// Fails the test, saying why, where CUDA cannot start: run on purpose, a GPU
/// test without a GPU is a failure, not a pass.
fn require_cuda() {
    if !tch::Cuda::is_available() {
        panic!(
            "needs a CUDA device: {}",
            splitserve::telemetry::system::cuda_unavailable_reason(
                splitserve::telemetry::system::cuda_build()
            )
        );
    }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}, element {i}: cuda {a} vs cpu {b}"
        );
    }
}

fn training(model: &str, x: &[f32], shape: &[i32]) -> ComputeRequest {
    ComputeRequest {
        training_mode: Some(true),
        ..request(model, x, shape)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA device: make gpu-check runs it"]
async fn cuda_answers_equal_the_cpus() {
    require_cuda();
    let mlp = format!("mlp={}", fixture("mlp.pt").display());
    let enc = format!("enc={}", fixture("encoder.pt").display());
    let models = [mlp.as_str(), enc.as_str(), "builtin=builtin:mlp:16x32x8"];
    let flags = |device| ["--device", device, "--trainable", "builtin"];
    let cpu = TestServer::start(args(&models, &flags("cpu"))).await;
    let gpu = TestServer::start(args(&models, &flags("cuda"))).await;
    let (mut c, mut g) = (cpu.client().await, gpu.client().await);
    let info = g
        .get_service_info(pb::ServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.device, "cuda:0", "the CUDA server runs on the CPU");

    for (model, shape, tol) in [
        ("mlp", vec![4, 16], 1e-4),
        ("enc", vec![2, 3, 256], 1e-3),
        ("builtin", vec![4, 16], 1e-4),
    ] {
        let x = values(shape.iter().product::<i32>() as usize, 5);
        let a = c
            .compute(request(model, &x, &shape))
            .await
            .unwrap()
            .into_inner();
        let b = g
            .compute(request(model, &x, &shape))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(b.shape, a.shape, "{model}");
        assert_close(&f32_values(&b.data), &f32_values(&a.data), tol, model);
        // float16 on the wire: the same float16 answer, give or take a rounding.
        let mut req = request(model, &[], &shape);
        req.data = f16_bytes(&x).into();
        let a = c.compute(req.clone()).await.unwrap().into_inner();
        let b = g.compute(req).await.unwrap().into_inner();
        assert_eq!(b.data.len(), a.data.len(), "{model}: float16 out");
        assert_close(&f16_values(&b.data), &f16_values(&a.data), 2e-3, model);
    }

    // Split training: the same forward, input gradient and SGD step.
    let probe = values(2 * 16, 77);
    for round in 0..2u32 {
        let x = values(3 * 16, 10 + round);
        let grad = values(3 * 8, 20 + round);
        let mut outs = Vec::new();
        for client in [&mut c, &mut g] {
            let r = client
                .compute(training("builtin", &x, &[3, 16]))
                .await
                .unwrap()
                .into_inner();
            let back = client
                .compute_backward(BackwardRequest {
                    grad_output_data: f32_bytes(&grad).into(),
                    grad_output_shape: vec![3, 8],
                    forward_id: r.forward_id.unwrap(),
                    learning_rate: Some(0.1),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let after = client
                .compute(request("builtin", &probe, &[2, 16]))
                .await
                .unwrap()
                .into_inner();
            outs.push((
                f32_values(&r.data),
                f32_values(&back.grad_input_data),
                f32_values(&after.data),
            ));
        }
        let (cpu_out, gpu_out) = (&outs[0], &outs[1]);
        assert_close(&gpu_out.0, &cpu_out.0, 1e-4, "training forward");
        assert_close(&gpu_out.1, &cpu_out.1, 1e-4, "grad_input");
        assert_close(&gpu_out.2, &cpu_out.2, 1e-4, "after the step");
    }
    cpu.stop().await.unwrap();
    gpu.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA device: make gpu-check runs it"]
async fn the_cuda_device_is_reported_where_clients_read_it() {
    require_cuda();
    // `auto`, the default, picks the first CUDA device where there is one.
    for device in ["cuda", "cuda:0", "auto"] {
        let server = TestServer::start(args(&["k=builtin:scale:2"], &["--device", device])).await;
        let mut c = server.client().await;
        let info = c
            .get_service_info(pb::ServiceInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.device, "cuda:0", "--device {device}");
        assert_eq!(info.custom_info["models"], "k@cuda:0");
        assert_eq!(info.custom_info["model.k.device"], "cuda:0");
        // Monitoring snapshots follow the model's device once sampled (the
        // cache refreshes every second).
        let deadline = Instant::now() + WAIT;
        loop {
            let r = c
                .compute(request("", &[1.5, -2.0], &[2]))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(f32_values(&r.data), vec![3.0, -4.0]);
            let snap = r.monitoring_data.unwrap();
            if snap.gpu_available {
                assert!(
                    snap.gpu_memory_total_mb.is_some_and(|m| m > 0.0),
                    "{snap:?}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no GPU in monitoring_data: {snap:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        server.stop().await.unwrap();
    }
}
