//! Every RPC through the generated Rust client against the real server, and
//! every documented error: a clear status, and the server keeps serving.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::{
    TestServer, args, f16_bytes as to_f16, f16_values as from_f16, f32_bytes, f32_values, fixture,
    request, values, zlib,
};
use splitserve::grpc::pb;
use tch::{CModule, Kind, Tensor};
use tokio_stream::StreamExt;
use tonic::Code;

/// The reference: the venv's libtorch running the same TorchScript file.
fn reference(file: &str, input: &[f32], shape: &[i64]) -> Vec<f32> {
    let _g = tch::no_grad_guard();
    let m = CModule::load(fixture(file)).unwrap();
    let y = m
        .forward_ts(&[Tensor::from_slice(input).view(shape)])
        .unwrap();
    Vec::<f32>::try_from(y.flatten(0, -1)).unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "element {i}: {x} vs {y}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers() {
    let mlp = format!("ts={}", fixture("mlp.pt").display());
    let before_start = Instant::now();
    // This test reports the device: it means the CPU, GPU host or not.
    let server = TestServer::start(args(
        &[&mlp, "double=builtin:scale:2", "nap=builtin:delay:50"],
        &["--device", "cpu"],
    ))
    .await;
    let mut c = server.client().await;

    // Compute on the default model (the first one): numbers equal libtorch's.
    let x = values(3 * 16, 1);
    let mut req = request("", &x, &[3, 16]);
    req.request_id = Some(42);
    let r = c.compute(req).await.unwrap().into_inner();
    assert_eq!(r.shape, vec![3, 8]);
    assert_eq!(r.request_id, Some(42));
    assert!(r.monitoring_data.is_some());
    assert_close(
        &f32_values(&r.data),
        &reference("mlp.pt", &x, &[3, 16]),
        1e-6,
    );

    // A named model.
    let r = c
        .compute(request("double", &[1.0, -2.5, 3.0], &[3]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&r.data), vec![2.0, -5.0, 6.0]);

    // compute_time_ms covers the forward: at least the model's 50 ms, and no
    // more than the client waited.
    let sent = Instant::now();
    let r = c
        .compute(request("nap", &[1.0], &[1]))
        .await
        .unwrap()
        .into_inner();
    let waited_ms = sent.elapsed().as_secs_f32() * 1000.0;
    let ms = r.compute_time_ms.unwrap();
    assert!(
        (50.0..=waited_ms).contains(&ms),
        "compute_time_ms {ms} outside [50, {waited_ms}]"
    );

    let health = c.clone();
    let uptime = || {
        let mut c = health.clone();
        async move {
            let before = Instant::now();
            let h = c
                .health_check(pb::HealthRequest {})
                .await
                .unwrap()
                .into_inner();
            (before, h, Instant::now())
        }
    };
    let (_, h, first_done) = uptime().await;
    assert_eq!(h.status, "ok");
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    let first = f64::from(h.uptime_seconds.unwrap());
    assert!(
        first > 0.0 && first <= before_start.elapsed().as_secs_f64(),
        "uptime {first} s, but the server started {:?} ago",
        before_start.elapsed()
    );

    let info = c
        .get_service_info(pb::ServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.service_name, "ts");
    assert_eq!(info.device, "cpu");
    assert_eq!(info.total_requests, 3);
    let ci = &info.custom_info;
    assert_eq!(ci["workers"], "2");
    assert_eq!(ci["intra_op_threads"], "1");
    assert!(
        ci["torch_version"].starts_with("2.13.0"),
        "{}",
        ci["torch_version"]
    );
    assert!(ci["thread_plan"].contains("2 workers x 1 intra-op threads"));
    assert_eq!(ci["models"], "ts@cpu,double@cpu,nap@cpu");
    assert_eq!(ci["model.double.source"], "builtin:scale:2");

    // StreamMonitoring: an interval below the floor is clamped to 0.1 s.
    let started = std::time::Instant::now();
    let mut stream = c
        .stream_monitoring(pb::MonitoringStreamRequest {
            sampling_interval: Some(0.001),
        })
        .await
        .unwrap()
        .into_inner();
    let mut snaps = Vec::new();
    while snaps.len() < 3 {
        snaps.push(stream.next().await.unwrap().unwrap().snapshot.unwrap());
    }
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "clamped to 0.1 s"
    );
    assert!(snaps.iter().all(|s| s.memory_mb > 1.0 && !s.gpu_available));
    // Sampled 0.1 s apart (the clamped interval), not 1 ms.
    let spread = snaps[2].timestamp - snaps[0].timestamp;
    assert!(
        spread >= 0.19 && spread <= started.elapsed().as_secs_f64() + 0.01,
        "three snapshots {spread} s apart"
    );

    // The uptime advanced by the time between the two health checks.
    let (second_sent, h, _) = uptime().await;
    let advanced = f64::from(h.uptime_seconds.unwrap()) - first;
    let least = second_sent.duration_since(first_done).as_secs_f64();
    assert!(
        advanced >= least - 0.01,
        "uptime advanced {advanced} s in at least {least} s"
    );

    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float16_and_zlib_answer_in_kind() {
    let server = TestServer::start(args(&["triple=builtin:scale:3"], &[])).await;
    let mut c = server.client().await;
    let x = vec![0.5f32, -1.25, 2.0, 8.0];

    let mut req = request("", &[], &[2, 2]);
    req.data = to_f16(&x).into();
    let r = c.compute(req).await.unwrap().into_inner();
    assert_eq!(r.data.len(), 8, "float16 in, float16 out");
    assert_eq!(from_f16(&r.data), vec![1.5, -3.75, 6.0, 24.0]);

    let mut req = request("", &[], &[2, 2]);
    req.data = zlib(&f32_bytes(&x)).into();
    let r = c.compute(req).await.unwrap().into_inner();
    let raw = splitserve::codec::inflate(&r.data, 16).expect("reply is zlib too");
    assert_eq!(f32_values(&raw), vec![1.5, -3.75, 6.0, 24.0]);

    let mut req = request("", &[], &[2, 2]);
    req.data = zlib(&to_f16(&x)).into();
    let r = c.compute(req).await.unwrap().into_inner();
    let raw = splitserve::codec::inflate(&r.data, 8).expect("reply is zlib too");
    assert_eq!(from_f16(&raw), vec![1.5, -3.75, 6.0, 24.0]);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_dtype_opt_in_carries_token_ids() {
    let embed = format!("embed={}", fixture("embed.pt").display());
    let server = TestServer::start(args(&[&embed], &[])).await;
    let mut c = server.client().await;
    let ids: Vec<i64> = vec![1, 5, 99, 0];
    let mut req = request("", &[], &[2, 2]);
    req.data = ids
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into();
    req.metadata
        .insert("splitserve-dtype".into(), "int64".into());
    let r = c.compute(req).await.unwrap();
    assert_eq!(r.metadata().get("splitserve-dtype").unwrap(), "float32");
    let r = r.into_inner();
    assert_eq!(r.shape, vec![2, 2, 8]);
    let _g = tch::no_grad_guard();
    let m = CModule::load(fixture("embed.pt")).unwrap();
    let want = m
        .forward_ts(&[Tensor::from_slice(&ids).view([2, 2])])
        .unwrap();
    assert_close(
        &f32_values(&r.data),
        &Vec::<f32>::try_from(want.flatten(0, -1)).unwrap(),
        0.0,
    );

    // An old client never sends the key: its float32 bytes are not token ids.
    let err = c
        .compute(request("", &[1.0, 2.0], &[1, 2]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_and_the_server_keeps_serving() {
    let raiser = format!("raiser={}", fixture("raiser.pt").display());
    let pair = format!("pair={}", fixture("pair.pt").display());
    let server = TestServer::start(args(
        &["mlp=builtin:mlp:4x8x2", &raiser, &pair],
        &["--max-elements", "1000", "--max-message-bytes", "65536"],
    ))
    .await;
    let mut c = server.client().await;

    let expect =
        |r: Result<tonic::Response<pb::ComputeResponse>, tonic::Status>, code: Code, text: &str| {
            let e = r.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().contains(text),
                "message {:?} lacks {text:?}",
                e.message()
            );
        };

    // Data length fits no encoding.
    let mut req = request("", &[1.0; 4], &[1, 4]);
    req.data = vec![0u8; 7].into();
    expect(c.compute(req).await, Code::InvalidArgument, "7 bytes");
    // Negative dimension.
    expect(
        c.compute(request("", &[1.0; 4], &[1, -4])).await,
        Code::InvalidArgument,
        "dimension 1 is -4",
    );
    // Absurd dimensions: the product overflows and exceeds --max-elements.
    expect(
        c.compute(request("", &[1.0], &[i32::MAX, i32::MAX, i32::MAX]))
            .await,
        Code::InvalidArgument,
        "--max-elements",
    );
    expect(
        c.compute(request("", &[0.0; 1001], &[1001])).await,
        Code::InvalidArgument,
        "limit of 1000",
    );
    // Unknown model.
    expect(
        c.compute(request("nope", &[1.0; 4], &[1, 4])).await,
        Code::NotFound,
        "\"nope\"",
    );
    // The built-in MLP's input width is fixed: a wrong width is refused before
    // it queues, with the shape it expects (as the v2 path says it).
    expect(
        c.compute(request("mlp", &[1.0; 5], &[1, 5])).await,
        Code::InvalidArgument,
        "input shape [1, 5]; model \"mlp\" (builtin:mlp:4x8x2) expects [-1, 4]",
    );
    // The TorchScript model raises.
    expect(
        c.compute(request("raiser", &[f32::NAN, 1.0], &[2])).await,
        Code::InvalidArgument,
        "input contains NaN",
    );
    // The model returns something Compute cannot answer with.
    expect(
        c.compute(request("pair", &[1.0], &[1])).await,
        Code::Internal,
        "a tuple",
    );
    // A message over --max-message-bytes: RESOURCE_EXHAUSTED, as gRPC specifies.
    expect(
        c.compute(request("", &vec![0.0; 20_000], &[20_000])).await,
        Code::ResourceExhausted,
        "--max-message-bytes",
    );
    // Training and the KV cache answer with a status, never a wrong number:
    // both at once, a KV step on a model without the KV signature, a backward
    // for a forward_id nobody stored.
    let mut req = request("", &[1.0; 4], &[1, 4]);
    req.training_mode = Some(true);
    req.use_cache = Some(true);
    expect(c.compute(req).await, Code::Unimplemented, "KV cache");
    let mut req = request("", &[1.0; 4], &[1, 4]);
    req.use_cache = Some(true);
    expect(
        c.compute(req).await,
        Code::InvalidArgument,
        "has no KV cache",
    );
    let e = c
        .compute_backward(pb::BackwardRequest {
            forward_id: "x".into(),
            grad_output_data: f32_bytes(&[1.0, 1.0]).into(),
            grad_output_shape: vec![1, 2],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("\"x\" is unknown"), "{}", e.message());

    // Still serving, with the right numbers.
    let r = c
        .compute(request("raiser", &[1.0, 2.0], &[2]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&r.data), vec![2.0, 4.0]);
    let r = c
        .compute(request("", &[1.0; 8], &[2, 4]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.shape, vec![2, 2]);
    server.stop().await.unwrap();
}

/// gRPC's usual 4 MiB message limit does not apply: the 100 MiB default takes
/// an 8 MiB tensor each way, and the numbers are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_8_mib_tensor_is_served_under_the_default_limit() {
    let server = TestServer::start(args(&["double=builtin:scale:2"], &[])).await;
    let mut c = server.client().await;
    let (rows, cols) = (2048usize, 1024usize);
    let x = values(rows * cols, 8);
    let req = request("", &x, &[rows as i32, cols as i32]);
    assert_eq!(req.data.len(), 8 << 20);
    let r = c.compute(req).await.unwrap().into_inner();
    assert_eq!(r.shape, vec![rows as i32, cols as i32]);
    assert_eq!(r.data.len(), 8 << 20);
    let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    assert!(f32_values(&r.data) == doubled, "an 8 MiB answer differs");
    server.stop().await.unwrap();
}

/// bfloat16 and float64 by the explicit opt-in come back in their own dtype,
/// named in the response header; an unknown dtype name is INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_bfloat16_and_float64_round_trip_and_unknown_dtypes_are_refused() {
    let server = TestServer::start(args(&["double=builtin:scale:2"], &[])).await;
    let mut c = server.client().await;
    // Exactly representable in bfloat16 (8 bits of mantissa), doubled too.
    let x = [1.5f32, -0.25, 96.0, 3.0e-3];
    let explicit = |data: Vec<u8>, dtype: &str| {
        let mut req = request("", &[], &[2, 2]);
        req.data = data.into();
        req.metadata
            .insert("splitserve-dtype".into(), dtype.to_string());
        req
    };

    let bf16 = |v: &[f32]| -> Vec<u8> {
        let t = Tensor::from_slice(v).to_kind(Kind::BFloat16);
        let mut out = vec![0u8; v.len() * 2];
        t.copy_data_u8(&mut out, v.len());
        out
    };
    let r = c.compute(explicit(bf16(&x), "bfloat16")).await.unwrap();
    assert_eq!(r.metadata().get("splitserve-dtype").unwrap(), "bfloat16");
    let r = r.into_inner();
    assert_eq!(r.shape, vec![2, 2]);
    let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    assert_eq!(r.data.to_vec(), bf16(&doubled), "bfloat16 bytes of 2x");

    let x64 = [1.0f64 / 3.0, -1e300, 2.5e-310, 7.0];
    let bytes: Vec<u8> = x64.iter().flat_map(|v| v.to_le_bytes()).collect();
    let r = c.compute(explicit(bytes, "float64")).await.unwrap();
    assert_eq!(r.metadata().get("splitserve-dtype").unwrap(), "float64");
    let got: Vec<f64> = r
        .into_inner()
        .data
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let want: Vec<f64> = x64.iter().map(|v| v * 2.0).collect();
    assert_eq!(got, want, "float64 keeps every bit");

    let e = c
        .compute(explicit(f32_bytes(&x), "float8"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("float8"), "{}", e.message());
    server.stop().await.unwrap();
}
