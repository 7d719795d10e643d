//! Queue limits, deadlines, cancellation, dynamic batching and drain, proven
//! with what a client can observe: the server's counters (GetServiceInfo
//! custom_info) and `batch_probe.pt`, a model whose every output row says how
//! many forwards it has run and how many rows the forward that computed it
//! held. Never with timings.
//!
//! Where work must queue up, a `gate` request (a built-in model that holds its
//! worker for [`GATE_MS`]) occupies the only worker first, and the test waits
//! until the server reports everything queued *while* the gate still runs, so
//! a slow machine can only make a test fail, never pass without checking.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    TestServer, WAIT, args, counter, f32_values, fixture, info, num, request, values, wait_for,
    wait_until,
};
use splitserve::grpc::pb;
use splitserve::grpc::pb::compute_service_client::ComputeServiceClient;
use tch::{CModule, Tensor};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

type Client = ComputeServiceClient<Channel>;
type Reply = Result<pb::ComputeResponse, tonic::Status>;

/// How long a `gate` request holds its worker: far longer than queueing a few
/// requests takes, so the queued state is there to be observed.
const GATE_MS: u64 = 2000;

fn gate_model() -> String {
    format!("gate=builtin:delay:{GATE_MS}")
}

fn probe_model(name: &str) -> String {
    format!("{name}={}", fixture("batch_probe.pt").display())
}

/// Starts one `gate` request and returns once a worker is busy with it.
async fn close_gate(c: &mut Client) -> JoinHandle<Reply> {
    let mut c2 = c.clone();
    let gate = tokio::spawn(async move {
        c2.compute(request("gate", &[0.0], &[1]))
            .await
            .map(|r| r.into_inner())
    });
    wait_for(c, "workers_busy", 1).await;
    gate
}

/// Sends a request in the background.
fn spawn_call(c: &Client, req: pb::ComputeRequest) -> JoinHandle<Reply> {
    let mut c = c.clone();
    tokio::spawn(async move { c.compute(req).await.map(|r| r.into_inner()) })
}

/// Sends a request with its own metadata (a deadline) in the background.
fn spawn_request(c: &Client, req: tonic::Request<pb::ComputeRequest>) -> JoinHandle<Reply> {
    let mut c = c.clone();
    tokio::spawn(async move { c.compute(req).await.map(|r| r.into_inner()) })
}

/// Waits until `depth` requests are queued while exactly `busy` workers run:
/// both read from one GetServiceInfo answer.
async fn wait_queued(c: &mut Client, depth: u64, busy: u64) {
    wait_until(
        c,
        &format!("{depth} requests queued behind {busy} busy worker(s)"),
        |i| num(i, "queue_depth") == depth && num(i, "workers_busy") == busy,
    )
    .await;
}

/// A batch_probe request of `rows` x `width` (float32, or float64 by the
/// explicit dtype opt-in).
fn probe_request(
    model: &str,
    rows: i32,
    width: i32,
    float64: bool,
    seed: u32,
) -> pb::ComputeRequest {
    let x = values((rows * width) as usize, seed);
    let mut req = request(model, &x, &[rows, width]);
    if float64 {
        req.data = x
            .iter()
            .flat_map(|v| f64::from(*v).to_le_bytes())
            .collect::<Vec<u8>>()
            .into();
        req.metadata
            .insert("splitserve-dtype".into(), "float64".into());
    }
    req
}

/// What batch_probe answered for a request of `rows` rows: (the model's
/// forward count at that forward, rows in that forward). Every row agrees.
fn probe_reply(r: &pb::ComputeResponse, rows: i32, float64: bool) -> (u64, u64) {
    assert_eq!(r.shape, vec![rows, 2]);
    let v: Vec<f64> = if float64 {
        r.data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        f32_values(&r.data).into_iter().map(f64::from).collect()
    };
    let first = (v[0] as u64, v[1] as u64);
    for row in v.chunks_exact(2) {
        assert_eq!(
            (row[0] as u64, row[1] as u64),
            first,
            "rows of one reply differ"
        );
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_only_its_own_model() {
    let server = TestServer::start(args(
        &[
            &gate_model(),
            "fast=builtin:scale:1",
            "other=builtin:scale:2",
        ],
        &["--workers", "1", "--queue-capacity", "2"],
    ))
    .await;
    let mut c = server.client().await;
    let gate = close_gate(&mut c).await;

    let mut calls = Vec::new();
    for i in 0..5 {
        calls.push(spawn_call(&c, request("fast", &[i as f32], &[1])));
    }
    // Three refusals counted and two queued while the gate still runs: the
    // refusals were answered without waiting for a worker.
    wait_until(&mut c, "3 refused, 2 queued behind the gate", |i| {
        num(i, "rejected_queue_full") == 3
            && num(i, "queue_depth") == 2
            && num(i, "workers_busy") == 1
    })
    .await;
    // Another model's queue is its own: it is not refused while "fast"'s is full.
    let other = spawn_call(&c, request("other", &[4.0], &[1]));
    wait_queued(&mut c, 3, 1).await;
    assert_eq!(counter(&mut c, "rejected_queue_full").await, 3);

    let mut served = Vec::new();
    let mut refused = 0;
    for (i, h) in calls.into_iter().enumerate() {
        match h.await.unwrap() {
            Ok(r) => served.push((i, f32_values(&r.data))),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    e.message().contains("queue for model \"fast\" is full"),
                    "{}",
                    e.message()
                );
                refused += 1;
            }
        }
    }
    assert_eq!(
        (served.len(), refused),
        (2, 3),
        "capacity 2 holds two, refuses three"
    );
    for (i, y) in served {
        assert_eq!(y, vec![i as f32], "a queued request got its own answer");
    }
    assert_eq!(f32_values(&other.await.unwrap().unwrap().data), vec![8.0]);
    gate.await.unwrap().unwrap();
    let stats = info(&mut c).await;
    assert_eq!(num(&stats, "rejected_queue_full"), 3);
    assert_eq!(
        num(&stats, "requests_computed"),
        4,
        "gate, two of fast, other"
    );
    server.stop().await.unwrap();
}

/// A request whose deadline passed in the queue and one whose client left are
/// answered without a forward. batch_probe counts its own forwards, so the
/// proof does not rest on the server's counters alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_abandoned_requests_are_never_computed() {
    let server = TestServer::start(args(
        &[&gate_model(), &probe_model("probe")],
        &["--workers", "1"],
    ))
    .await;
    let mut c = server.client().await;
    // The gate carries a deadline shorter than its run: it passes while the
    // model computes, and the answer says so (not "not computed").
    let mut gate_req = tonic::Request::new(request("gate", &[0.0], &[1]));
    gate_req
        .metadata_mut()
        .insert("grpc-timeout", "1500m".parse().unwrap());
    let gate = spawn_request(&c, gate_req);
    wait_for(&mut c, "workers_busy", 1).await;

    // Queued behind the busy worker with a 100 ms gRPC deadline. The header
    // alone (no client-side timer, which would race the server's answer with
    // its own CANCELLED): the server's DEADLINE_EXCEEDED is what is checked.
    let mut req = tonic::Request::new(probe_request("probe", 1, 2, false, 1));
    req.metadata_mut()
        .insert("grpc-timeout", "100m".parse().unwrap());
    let err = c.clone().compute(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("not computed"), "{}", err.message());

    // A client that gives up (drops the call) without any deadline, once its
    // request is queued beside the expired one.
    let abandoned = spawn_call(&c, probe_request("probe", 1, 2, false, 2));
    wait_queued(&mut c, 2, 1).await;
    abandoned.abort();
    assert!(abandoned.await.unwrap_err().is_cancelled());

    let err = gate.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("while the model was computing"),
        "a request whose deadline passed during its forward: {}",
        err.message()
    );
    wait_queued(&mut c, 0, 0).await;
    // The model itself says it has run no forward before this one.
    let r = c
        .compute(probe_request("probe", 1, 2, false, 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        probe_reply(&r, 1, false),
        (1, 1),
        "the expired and the abandoned request reached the model"
    );
    let stats = info(&mut c).await;
    assert_eq!(
        num(&stats, "requests_computed"),
        2,
        "the gate and the last one"
    );
    assert_eq!(num(&stats, "rejected_deadline"), 1);
    assert_eq!(num(&stats, "rejected_cancelled"), 1);
    server.stop().await.unwrap();
}

/// With --max-batch-size N, queued requests really share forwards, never more
/// than N rows; requests of different trailing shapes or dtypes never share
/// one; with batching off every forward holds one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_form_up_to_the_limit_and_never_mix_shapes_or_dtypes() {
    const N: u64 = 4;
    let server = TestServer::start(args(
        &[&gate_model(), &probe_model("probe"), &probe_model("alone")],
        &["--workers", "1", "--max-batch-size", &format!("probe={N}")],
    ))
    .await;
    let mut c = server.client().await;

    // Requests of 1, 2 or 3 rows, same shape otherwise.
    let gate = close_gate(&mut c).await;
    let rows: Vec<i32> = (0..9).map(|i| 1 + i % 3).collect();
    let calls: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(i, &r)| spawn_call(&c, probe_request("probe", r, 3, false, i as u32)))
        .collect();
    wait_queued(&mut c, rows.len() as u64, 1).await;
    gate.await.unwrap().unwrap();
    // forward number -> (rows the model saw, rows of the requests it answered, requests)
    let mut forwards = BTreeMap::<u64, (u64, u64, usize)>::new();
    for (h, &r) in calls.into_iter().zip(&rows) {
        let (forward, batch_rows) = probe_reply(&h.await.unwrap().unwrap(), r, false);
        assert!(
            batch_rows <= N,
            "a forward held {batch_rows} rows, over --max-batch-size {N}"
        );
        let e = forwards.entry(forward).or_insert((batch_rows, 0, 0));
        assert_eq!(e.0, batch_rows, "one forward, two sizes");
        e.1 += r as u64;
        e.2 += 1;
    }
    for (forward, (seen, sent, _)) in &forwards {
        assert_eq!(
            seen, sent,
            "forward {forward}: rows seen vs rows of its requests"
        );
    }
    assert!(
        forwards.values().any(|&(_, _, n)| n > 1),
        "no two queued requests shared a forward: {forwards:?}"
    );
    assert_eq!(
        forwards.keys().copied().collect::<Vec<_>>(),
        (1..=forwards.len() as u64).collect::<Vec<_>>(),
        "the model ran exactly one forward per batch"
    );

    // Three kinds of one-row request, interleaved: width 3, width 5, and width
    // 3 in float64. Each kind fits one forward (3 <= N) and shares it with no
    // other kind. (A mixed batch would show 1 — the server's retry one by
    // one — or more than 3.)
    let gate = close_gate(&mut c).await;
    let kinds = [(3, false), (5, false), (3, true)];
    let calls: Vec<_> = (0..9)
        .map(|i| {
            let (width, f64) = kinds[i % 3];
            let h = spawn_call(&c, probe_request("probe", 1, width, f64, 100 + i as u32));
            (h, i % 3, f64)
        })
        .collect();
    wait_queued(&mut c, 9, 1).await;
    gate.await.unwrap().unwrap();
    let mut forward_of_kind = BTreeMap::<usize, u64>::new();
    for (h, kind, f64) in calls {
        let (forward, batch_rows) = probe_reply(&h.await.unwrap().unwrap(), 1, f64);
        assert_eq!(
            batch_rows, 3,
            "kind {:?} shared its forward with other kinds or was split",
            kinds[kind]
        );
        assert_eq!(*forward_of_kind.entry(kind).or_insert(forward), forward);
    }
    let mut distinct: Vec<u64> = forward_of_kind.values().copied().collect();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three kinds, three forwards");

    // Batching off (the default for "alone"): one request per forward.
    let gate = close_gate(&mut c).await;
    let rows = [1, 1, 3, 1, 2, 1];
    let calls: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(i, &r)| spawn_call(&c, probe_request("alone", r, 3, false, 200 + i as u32)))
        .collect();
    wait_queued(&mut c, rows.len() as u64, 1).await;
    gate.await.unwrap().unwrap();
    let mut seen = Vec::new();
    for (h, &r) in calls.into_iter().zip(&rows) {
        let (forward, batch_rows) = probe_reply(&h.await.unwrap().unwrap(), r, false);
        assert_eq!(
            batch_rows, r as u64,
            "batching off: a forward holds one request"
        );
        seen.push(forward);
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=rows.len() as u64).collect::<Vec<_>>());
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
                // Mixed trailing shapes on the other model.
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
        assert_eq!(num(&stats, "requests_computed"), 80);
        if max_batch == 1 {
            assert_eq!(
                num(&stats, "forwards"),
                80,
                "batching off: one forward per request"
            );
        }
        server.stop().await.unwrap();
    }
}

/// A model that does not keep the batch dimension still answers each client
/// correctly: the failed batch is retried request by request. The forward
/// count shows the batches were really formed (and failed) first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_breaks_batching_still_answers_correctly() {
    let rowsum = format!("rowsum={}", fixture("rowsum.pt").display());
    let server = TestServer::start(args(
        &[&gate_model(), &rowsum],
        &["--workers", "1", "--max-batch-size", "rowsum=8"],
    ))
    .await;
    let mut c = server.client().await;
    let gate = close_gate(&mut c).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let x = [i as f32, 1.0, 2.0 * i as f32, 3.0];
        tasks.push((x, spawn_call(&c, request("rowsum", &x, &[2, 2]))));
    }
    wait_queued(&mut c, 8, 1).await;
    gate.await.unwrap().unwrap();
    for (x, t) in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.shape, vec![1, 2]);
        assert_eq!(f32_values(&r.data), vec![x[0] + x[2], x[1] + x[3]]);
    }
    let stats = info(&mut c).await;
    assert_eq!(num(&stats, "requests_computed"), 9);
    // Eight requests of two rows under an 8-row limit: two batches of four
    // (one forward each, counted once however they end), plus the gate.
    assert_eq!(num(&stats, "forwards"), 3, "{stats:?}");
    server.stop().await.unwrap();
}

/// A request the model rejects fails alone; the requests it was batched with
/// get their answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_request_in_a_batch_does_not_fail_its_neighbours() {
    let raiser = format!("raiser={}", fixture("raiser.pt").display());
    let server = TestServer::start(args(
        &[&gate_model(), &raiser],
        &["--workers", "1", "--max-batch-size", "raiser=8"],
    ))
    .await;
    let mut c = server.client().await;
    let gate = close_gate(&mut c).await;
    let inputs = [[1.0, 2.0], [3.0, f32::NAN], [5.0, 6.0], [7.0, 8.0]];
    let calls: Vec<_> = inputs
        .iter()
        .map(|x| spawn_call(&c, request("raiser", x, &[1, 2])))
        .collect();
    wait_queued(&mut c, 4, 1).await;
    gate.await.unwrap().unwrap();
    for (x, h) in inputs.iter().zip(calls) {
        match h.await.unwrap() {
            Ok(r) => {
                assert!(!x[1].is_nan(), "the NaN request was answered");
                assert_eq!(f32_values(&r.data), vec![2.0 * x[0], 2.0 * x[1]]);
            }
            Err(e) => {
                assert!(x[1].is_nan(), "a good neighbour failed: {e:?}");
                assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
                assert!(
                    e.message().contains("input contains NaN"),
                    "{}",
                    e.message()
                );
            }
        }
    }
    let stats = info(&mut c).await;
    assert_eq!(num(&stats, "forwards"), 2, "the gate and one batch of four");
    assert_eq!(num(&stats, "requests_computed"), 4);
    assert_eq!(num(&stats, "rejected_invalid"), 1);
    server.stop().await.unwrap();
}

/// A worker holding a partial batch waits up to --batch-timeout-us for more,
/// but only when no other worker is idle: an idle worker would take the next
/// request at once, so waiting would only add latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_timeout_waits_only_when_no_worker_is_idle() {
    let server = TestServer::start(args(
        &[&gate_model(), &probe_model("probe")],
        &[
            "--workers",
            "2",
            "--max-batch-size",
            "probe=2",
            "--batch-timeout-us",
            "probe=30000000",
        ],
    ))
    .await;
    let mut c = server.client().await;

    // One worker busy, so the other is the last idle one: it takes A and waits.
    let gate = close_gate(&mut c).await;
    let a = spawn_call(&c, probe_request("probe", 1, 2, false, 1));
    let deadline = Instant::now() + WAIT;
    loop {
        let r = c
            .get_service_info(pb::ServiceInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        let i = &r.custom_info;
        // A arrived (the gate and A), left the queue, and no worker computes it.
        if r.total_requests == 2 && num(i, "queue_depth") == 0 && num(i, "workers_busy") == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "A was never taken: {i:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!a.is_finished(), "A was computed without waiting for B");
    // B arrives later and joins A's forward, which then holds the limit of 2.
    let b = spawn_call(&c, probe_request("probe", 1, 2, false, 2));
    let a = probe_reply(&a.await.unwrap().unwrap(), 1, false);
    let b = probe_reply(&b.await.unwrap().unwrap(), 1, false);
    assert_eq!(
        (a, b),
        ((1, 2), (1, 2)),
        "A waited for B: one forward of two"
    );

    // Both workers idle: a lone request is computed at once, not after 30 s.
    gate.await.unwrap().unwrap();
    wait_for(&mut c, "workers_busy", 0).await;
    let lone = tokio::time::timeout(
        Duration::from_secs(10),
        c.compute(probe_request("probe", 1, 2, false, 3)),
    )
    .await
    .expect("a lone request waited for a batch while a worker was idle")
    .unwrap()
    .into_inner();
    assert_eq!(probe_reply(&lone, 1, false), (2, 1));
    server.stop().await.unwrap();
}

/// After shutdown starts, queued and running requests finish, and new ones get
/// the draining answer (UNAVAILABLE with its own message), counted as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_requests_with_its_own_status_and_counts_them() {
    let server = TestServer::start(args(
        &[&gate_model(), "k=builtin:scale:2"],
        &["--workers", "1"],
    ))
    .await;
    let mut c = server.client().await;
    let gate = close_gate(&mut c).await;
    let queued = spawn_call(&c, request("k", &[1.5], &[1]));
    wait_queued(&mut c, 1, 1).await;

    server.begin_stop();
    let deadline = Instant::now() + WAIT;
    loop {
        let h = c
            .health_check(pb::HealthRequest {})
            .await
            .unwrap()
            .into_inner();
        if h.message == "draining: shutting down" {
            assert_eq!(h.status, "unhealthy");
            break;
        }
        assert!(Instant::now() < deadline, "never draining: {h:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = c.compute(request("k", &[2.0], &[1])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(
        e.message(),
        "the server is shutting down and accepts no new requests"
    );
    assert!(!gate.is_finished(), "the gate ended before the check");
    assert_eq!(counter(&mut c, "rejected_draining").await, 1);

    // What was running and queued when shutdown began is answered.
    gate.await.unwrap().unwrap();
    assert_eq!(f32_values(&queued.await.unwrap().unwrap().data), vec![3.0]);
    server.stop().await.unwrap();
}
