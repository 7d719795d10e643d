//! Queue limits, deadlines, cancellation and dynamic batching, proven with the
//! server's own counters (GetServiceInfo custom_info), not with timings.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestServer, args, f32_values, fixture, request, values};
use splitserve::grpc::pb;
use splitserve::grpc::pb::compute_service_client::ComputeServiceClient;
use tch::{CModule, Tensor};
use tonic::Code;
use tonic::transport::Channel;

async fn info(c: &mut ComputeServiceClient<Channel>) -> HashMap<String, String> {
    c.get_service_info(pb::ServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .custom_info
}

async fn counter(c: &mut ComputeServiceClient<Channel>, key: &str) -> u64 {
    info(c).await[key].parse().unwrap()
}

/// Waits until the server reports `key` == `want`.
async fn wait_for(c: &mut ComputeServiceClient<Channel>, key: &str, want: u64) {
    for _ in 0..400 {
        if counter(c, key).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} never reached {want}: {:?}", info(c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let server = TestServer::start(args(
        &["slow=builtin:delay:600"],
        &["--workers", "1", "--queue-capacity", "2"],
    ))
    .await;
    let mut c = server.client().await;
    let order = Arc::new(AtomicUsize::new(0));

    let first = {
        let (mut c, order) = (c.clone(), order.clone());
        tokio::spawn(async move {
            let r = c.compute(request("", &[1.0], &[1])).await;
            (r.map(|_| ()), order.fetch_add(1, Ordering::SeqCst))
        })
    };
    wait_for(&mut c, "workers_busy", 1).await;

    let mut rest = Vec::new();
    for i in 0..5 {
        let (mut c, order) = (c.clone(), order.clone());
        rest.push(tokio::spawn(async move {
            let r = c.compute(request("", &[i as f32], &[1])).await;
            (r.map(|_| ()), order.fetch_add(1, Ordering::SeqCst))
        }));
    }
    let mut refused = Vec::new();
    let mut served = 0;
    for h in rest {
        match h.await.unwrap() {
            (Ok(()), _) => served += 1,
            (Err(e), seq) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("queue"), "{}", e.message());
                refused.push(seq);
            }
        }
    }
    let (first_result, first_seq) = first.await.unwrap();
    first_result.unwrap();
    assert_eq!(
        (served, refused.len()),
        (2, 3),
        "capacity 2 holds two, refuses three"
    );
    assert!(
        refused.iter().all(|&seq| seq < first_seq),
        "refusals come back before the running job finishes"
    );
    assert_eq!(counter(&mut c, "rejected_queue_full").await, 3);
    assert_eq!(counter(&mut c, "requests_computed").await, 3);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_abandoned_requests_are_never_computed() {
    let server = TestServer::start(args(&["slow=builtin:delay:400"], &["--workers", "1"])).await;
    let mut c = server.client().await;

    let busy = {
        let mut c = c.clone();
        tokio::spawn(async move { c.compute(request("", &[1.0], &[1])).await })
    };
    wait_for(&mut c, "workers_busy", 1).await;

    // Queued behind the busy worker with a 50 ms gRPC deadline.
    let mut req = tonic::Request::new(request("", &[2.0], &[1]));
    req.set_timeout(Duration::from_millis(50));
    let err = c.clone().compute(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    // A client that gives up (drops the call) without any deadline.
    let mut c2 = c.clone();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        c2.compute(request("", &[3.0], &[1])),
    )
    .await;
    assert!(gave_up.is_err(), "the call was abandoned");

    busy.await.unwrap().unwrap();
    wait_for(&mut c, "queue_depth", 0).await;
    wait_for(&mut c, "workers_busy", 0).await;
    assert_eq!(
        counter(&mut c, "requests_computed").await,
        1,
        "only the first was computed"
    );
    assert_eq!(counter(&mut c, "rejected_deadline").await, 1);
    assert_eq!(counter(&mut c, "rejected_cancelled").await, 1);
    server.stop().await.unwrap();
}

/// 40 concurrent clients with distinct inputs of 1-3 rows each get exactly their
/// own rows back, for batch limits from 1 to 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_clients_get_exactly_their_own_rows() {
    let reference = CModule::load(fixture("mlp.pt")).unwrap();
    let mlp = format!("mlp={}", fixture("mlp.pt").display());
    for max_batch in [1usize, 2, 5, 16, 64] {
        let server = TestServer::start(args(
            &[&mlp, "k=builtin:scale:3"],
            &[
                "--workers",
                "1",
                "--max-batch-size",
                &max_batch.to_string(),
                "--batch-timeout-us",
                "2000",
            ],
        ))
        .await;
        let c = server.client().await;
        let mut tasks = Vec::new();
        for i in 0..40u32 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let rows = 1 + (i % 3) as i32;
                let x = values(rows as usize * 16, 1000 * max_batch as u32 + i);
                let r = c
                    .compute(request("mlp", &x, &[rows, 16]))
                    .await
                    .unwrap()
                    .into_inner();
                // Mixed trailing shapes on the other model must never share a batch.
                let width = if i % 2 == 0 { 3 } else { 5 };
                let y = values(rows as usize * width as usize, i);
                let s = c
                    .compute(request("k", &y, &[rows, width]))
                    .await
                    .unwrap()
                    .into_inner();
                (x, rows, r, y, width, s)
            }));
        }
        let _g = tch::no_grad_guard();
        for t in tasks {
            let (x, rows, r, y, width, s) = t.await.unwrap();
            assert_eq!(r.shape, vec![rows, 8]);
            let want = reference
                .forward_ts(&[Tensor::from_slice(&x).view([rows as i64, 16])])
                .unwrap();
            let want = Vec::<f32>::try_from(want.flatten(0, -1)).unwrap();
            for (a, b) in f32_values(&r.data).iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "max_batch {max_batch}: {a} vs {b}"
                );
            }
            assert_eq!(s.shape, vec![rows, width]);
            let tripled: Vec<f32> = y.iter().map(|v| v * 3.0).collect();
            assert_eq!(f32_values(&s.data), tripled, "max_batch {max_batch}");
        }
        let mut c = c.clone();
        let stats = info(&mut c).await;
        let computed: u64 = stats["requests_computed"].parse().unwrap();
        let forwards: u64 = stats["forwards"].parse().unwrap();
        assert_eq!(computed, 80);
        if max_batch == 1 {
            assert_eq!(forwards, 80, "batching off: one forward per request");
        } else {
            assert!(
                forwards < computed,
                "max_batch {max_batch}: {forwards} forwards for {computed} requests"
            );
        }
        server.stop().await.unwrap();
    }
}

/// A model that does not keep the batch dimension still answers each client
/// correctly: the failed batch is retried request by request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_breaks_batching_still_answers_correctly() {
    let rowsum = format!("rowsum={}", fixture("rowsum.pt").display());
    let server = TestServer::start(args(
        &[&rowsum],
        &[
            "--workers",
            "1",
            "--max-batch-size",
            "8",
            "--batch-timeout-us",
            "5000",
        ],
    ))
    .await;
    let c = server.client().await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let x = [i as f32, 1.0, 2.0 * i as f32, 3.0];
            let r = c
                .compute(request("", &x, &[2, 2]))
                .await
                .unwrap()
                .into_inner();
            (x, r)
        }));
    }
    for t in tasks {
        let (x, r) = t.await.unwrap();
        assert_eq!(r.shape, vec![1, 2]);
        assert_eq!(f32_values(&r.data), vec![x[0] + x[2], x[1] + x[3]]);
    }
    server.stop().await.unwrap();
}
