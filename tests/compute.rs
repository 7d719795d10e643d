//! Every RPC through the generated Rust client against the real server, and
//! every documented error: a clear status, and the server keeps serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;

use common::{TestServer, args, f32_bytes, f32_values, fixture, request, values};
use splitserve::grpc::pb;
use tch::{CModule, Kind, Tensor};
use tokio_stream::StreamExt;
use tonic::Code;

fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn to_f16(values: &[f32]) -> Vec<u8> {
    let t = Tensor::from_slice(values).to_kind(Kind::Half);
    let mut out = vec![0u8; values.len() * 2];
    t.copy_data_u8(&mut out, values.len());
    out
}

fn from_f16(bytes: &[u8]) -> Vec<f32> {
    let t =
        Tensor::from_data_size(bytes, &[(bytes.len() / 2) as i64], Kind::Half).to_kind(Kind::Float);
    Vec::<f32>::try_from(t).unwrap()
}

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
    let server = TestServer::start(args(&[&mlp, "double=builtin:scale:2"], &[])).await;
    let mut c = server.client().await;

    // Compute on the default model (the first one): numbers equal libtorch's.
    let x = values(3 * 16, 1);
    let mut req = request("", &x, &[3, 16]);
    req.request_id = Some(42);
    let r = c.compute(req).await.unwrap().into_inner();
    assert_eq!(r.shape, vec![3, 8]);
    assert_eq!(r.request_id, Some(42));
    assert!(r.compute_time_ms.unwrap() >= 0.0);
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

    let h = c
        .health_check(pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, "ok");
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert!(h.uptime_seconds.unwrap() >= 0.0);

    let info = c
        .get_service_info(pb::ServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.service_name, "ts");
    assert_eq!(info.device, "cpu");
    assert_eq!(info.total_requests, 2);
    let ci = &info.custom_info;
    assert_eq!(ci["workers"], "2");
    assert_eq!(ci["intra_op_threads"], "1");
    assert!(
        ci["torch_version"].starts_with("2.13.0"),
        "{}",
        ci["torch_version"]
    );
    assert!(ci["thread_plan"].contains("2 workers x 1 intra-op threads"));
    assert_eq!(ci["models"], "ts@cpu,double@cpu");
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
        started.elapsed() >= std::time::Duration::from_millis(190),
        "clamped to 0.1 s"
    );
    assert!(snaps.iter().all(|s| s.memory_mb > 1.0 && !s.gpu_available));
    assert!(snaps[2].timestamp > snaps[0].timestamp);

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
    // libtorch rejects the input (wrong width): its message comes through.
    expect(
        c.compute(request("mlp", &[1.0; 5], &[1, 5])).await,
        Code::InvalidArgument,
        "shapes cannot be multiplied",
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
