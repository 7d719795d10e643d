//! Split training and the KV cache through the generated Rust client against
//! the real server, checked against local libtorch autograd on an identical
//! model; and every documented training status, after which the server keeps
//! serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use common::{TestServer, args, f32_bytes, f32_values, fixture, request, values};
use splitserve::grpc::pb::compute_service_client::ComputeServiceClient;
use splitserve::grpc::pb::{self, BackwardRequest, ComputeRequest, KvCacheEntry};
use splitserve::model::Model;
use splitserve::model::ModelSpec;
use tch::{CModule, Device, IValue, Kind, Tensor};
use tonic::Code;
use tonic::transport::Channel;

type Client = ComputeServiceClient<Channel>;

async fn info(c: &mut Client) -> HashMap<String, String> {
    c.get_service_info(pb::ServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .custom_info
}

async fn counter(c: &mut Client, key: &str) -> u64 {
    info(c).await[key].parse().unwrap()
}

fn training_request(model: &str, x: &[f32], shape: &[i32], id: Option<&str>) -> ComputeRequest {
    ComputeRequest {
        training_mode: Some(true),
        forward_id: id.map(String::from),
        ..request(model, x, shape)
    }
}

fn backward(id: &str, grad: &[f32], shape: &[i32], lr: Option<f32>) -> BackwardRequest {
    BackwardRequest {
        grad_output_data: f32_bytes(grad).into(),
        grad_output_shape: shape.to_vec(),
        forward_id: id.into(),
        learning_rate: lr,
        ..Default::default()
    }
}

/// A training forward: (forward_id, output).
async fn train_forward(
    c: &mut Client,
    model: &str,
    x: &[f32],
    shape: &[i32],
) -> (String, Vec<f32>) {
    let r = c
        .compute(training_request(model, x, shape, None))
        .await
        .unwrap()
        .into_inner();
    (r.forward_id.unwrap(), f32_values(&r.data))
}

async fn infer(c: &mut Client, model: &str, x: &[f32], shape: &[i32]) -> Vec<f32> {
    let r = c
        .compute(request(model, x, shape))
        .await
        .unwrap()
        .into_inner();
    f32_values(&r.data)
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}, element {i}: {x} vs {y}"
        );
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.detach().flatten(0, -1)).unwrap()
}

/// The same built-in model the server builds, in this process.
fn local_model(spec: &str) -> Model {
    let spec: ModelSpec = format!("ref={spec}").parse().unwrap();
    Model::load(&spec, Device::Cpu).unwrap()
}

/// Local autograd of sum(model(x) * g): the input's gradient, and the
/// parameters' gradients are accumulated into the model's tensors.
fn local_backward(model: &Model, x: &[f32], xs: &[i64], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let x = Tensor::from_slice(x).view(xs).set_requires_grad(true);
    let (y, loss) = tch::with_grad(|| {
        let y = model.forward(&x).unwrap();
        let loss = (&y * Tensor::from_slice(g).view_as(&y)).sum(None::<Kind>);
        (y, loss)
    });
    loss.backward();
    (to_vec(&y), to_vec(&x.grad()))
}

/// p -= lr * p.grad, then zero the gradients: torch.optim.SGD's step.
fn local_sgd(model: &Model, lr: f64) {
    tch::no_grad(|| {
        for mut p in model.trainable_parameters().unwrap() {
            let step = p.grad() * lr;
            let _ = p.f_sub_(&step).unwrap();
            p.zero_grad();
        }
    });
}

fn local_forward(model: &Model, x: &[f32], xs: &[i64]) -> Vec<f32> {
    let _g = tch::no_grad_guard();
    to_vec(&model.forward(&Tensor::from_slice(x).view(xs)).unwrap())
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("splitserve-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradients_and_sgd_steps_match_local_autograd() {
    const SPEC: &str = "builtin:mlp:4x8x3";
    let server = TestServer::start(args(&[&format!("mlp={SPEC}")], &["--trainable", "mlp"])).await;
    let mut c = server.client().await;
    let reference = local_model(SPEC);
    let probe = values(2 * 4, 99);

    for round in 0..3u32 {
        let x = values(5 * 4, round);
        let g = values(5 * 3, 100 + round);
        let (id, y) = train_forward(&mut c, "", &x, &[5, 4]).await;
        let b = c
            .compute_backward(backward(&id, &g, &[5, 3], Some(0.05)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(b.forward_id, id);
        assert_eq!(b.grad_input_shape, vec![5, 4]);
        assert!(b.backward_time_ms.unwrap() >= 0.0);

        let (want_y, want_grad) = local_backward(&reference, &x, &[5, 4], &g);
        assert_close(&y, &want_y, 1e-5, "forward output");
        assert_close(
            &f32_values(&b.grad_input_data),
            &want_grad,
            1e-5,
            "grad_input",
        );
        local_sgd(&reference, f64::from(0.05f32));
        // The server's parameters took the same step: its answers follow.
        assert_close(
            &infer(&mut c, "", &probe, &[2, 4]).await,
            &local_forward(&reference, &probe, &[2, 4]),
            1e-5,
            "after the step",
        );
    }
    let stats = info(&mut c).await;
    assert_eq!(stats["optimizer_steps"], "3");
    assert_eq!(stats["model.mlp.optimizer_steps"], "3");
    assert_eq!(stats["backwards"], "3");
    assert_eq!(
        stats["activations_stored"], "0",
        "each backward released its entry"
    );
    assert_eq!(stats["activations_bytes"], "0");

    // Without a learning_rate nothing changes on the server.
    let before = infer(&mut c, "", &probe, &[2, 4]).await;
    let (id, _) = train_forward(&mut c, "", &probe, &[2, 4]).await;
    c.compute_backward(backward(&id, &[1.0; 6], &[2, 3], None))
        .await
        .unwrap();
    assert_eq!(infer(&mut c, "", &probe, &[2, 4]).await, before);
    assert_eq!(counter(&mut c, "optimizer_steps").await, 3);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accumulation_steps_once_every_n_backward_calls_with_the_summed_gradient() {
    const SPEC: &str = "builtin:mlp:4x6x2";
    let server = TestServer::start(args(&[&format!("m={SPEC}")], &["--trainable", "m"])).await;
    let mut c = server.client().await;
    let reference = local_model(SPEC);
    let probe = values(4, 7);
    let initial = infer(&mut c, "", &probe, &[1, 4]).await;

    for call in 0..3u32 {
        let x = values(3 * 4, 10 + call);
        let g = values(3 * 2, 20 + call);
        let (id, _) = train_forward(&mut c, "", &x, &[3, 4]).await;
        let mut req = backward(&id, &g, &[3, 2], Some(0.1));
        req.accumulation_step = Some(3);
        c.compute_backward(req).await.unwrap();
        local_backward(&reference, &x, &[3, 4], &g);
        if call < 2 {
            assert_eq!(
                infer(&mut c, "", &probe, &[1, 4]).await,
                initial,
                "call {call}: accumulated, not stepped"
            );
        }
    }
    // One step with the sum of the three gradients, as three .backward() calls
    // followed by one optimizer.step() would do.
    local_sgd(&reference, f64::from(0.1f32));
    assert_close(
        &infer(&mut c, "", &probe, &[1, 4]).await,
        &local_forward(&reference, &probe, &[1, 4]),
        1e-5,
        "after the accumulated step",
    );
    assert_eq!(counter(&mut c, "optimizer_steps").await, 1);
    server.stop().await.unwrap();
}

/// Concurrent clients, each with its own input and gradient, on two workers:
/// every client gets exactly the gradient of its own forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_forward_ids_never_mix() {
    const SPEC: &str = "builtin:mlp:4x16x3";
    let server = TestServer::start(args(
        &[&format!("m={SPEC}"), "k=builtin:scale:2"],
        &["--workers", "2", "--trainable", "m"],
    ))
    .await;
    let c = server.client().await;
    let mut tasks = Vec::new();
    for i in 0..24u32 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let rows = 1 + (i % 3) as i32;
            let x = values(rows as usize * 4, 500 + i);
            let g = values(rows as usize * 3, 900 + i);
            // Half choose their own forward_id, half let the server pick one.
            let own = (i % 2 == 0).then(|| format!("client-{i}"));
            let r = c
                .compute(training_request("m", &x, &[rows, 4], own.as_deref()))
                .await
                .unwrap()
                .into_inner();
            let id = r.forward_id.unwrap();
            if let Some(own) = own {
                assert_eq!(id, own);
            }
            // Inference on another model in between.
            let s = c.compute(request("k", &x, &[rows, 4])).await.unwrap();
            assert_eq!(f32_values(&s.into_inner().data)[0], 2.0 * x[0]);
            let b = c
                .compute_backward(backward(&id, &g, &[rows, 3], None))
                .await
                .unwrap()
                .into_inner();
            (x, rows, g, f32_values(&b.grad_input_data))
        }));
    }
    let reference = local_model(SPEC);
    for t in tasks {
        let (x, rows, g, got) = t.await.unwrap();
        let (_, want) = local_backward(&reference, &x, &[rows as i64, 4], &g);
        assert_close(&got, &want, 1e-5, "a client's own input gradient");
    }
    let mut c = c.clone();
    assert_eq!(counter(&mut c, "backwards").await, 24);
    assert_eq!(counter(&mut c, "activations_stored").await, 0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_training_error_has_its_status_and_the_server_keeps_serving() {
    // One forward of [2, 4] -> [2, 2] stores 32 + 16 bytes of tensors and its
    // 36-byte id: 84 bytes, so 200 hold two.
    let server = TestServer::start(args(
        &["m=builtin:mlp:4x8x2", "other=builtin:scale:1"],
        &["--activation-cache-bytes", "200", "--trainable", "m"],
    ))
    .await;
    let mut c = server.client().await;
    let x = values(8, 1);
    let expect = |r: Result<tonic::Response<pb::BackwardResponse>, tonic::Status>,
                  code: Code,
                  text: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(text),
            "{:?} lacks {text:?}",
            e.message()
        );
    };

    // Unknown forward_id.
    expect(
        c.compute_backward(backward("never-stored", &[0.0; 4], &[2, 2], None))
            .await,
        Code::NotFound,
        "is unknown",
    );
    // A gradient of the wrong shape leaves the entry for a corrected retry.
    let (id, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
    expect(
        c.compute_backward(backward(&id, &[0.0; 6], &[3, 2], None))
            .await,
        Code::InvalidArgument,
        "does not match the output",
    );
    // A backward naming another model.
    let mut req = backward(&id, &[0.0; 4], &[2, 2], None);
    req.model_id = Some("other".into());
    expect(
        c.compute_backward(req).await,
        Code::InvalidArgument,
        "was computed by model \"m\"",
    );
    c.compute_backward(backward(&id, &[1.0; 4], &[2, 2], None))
        .await
        .unwrap();
    // Reuse.
    expect(
        c.compute_backward(backward(&id, &[1.0; 4], &[2, 2], None))
            .await,
        Code::NotFound,
        "already used",
    );
    // Bad arguments.
    expect(
        c.compute_backward(backward("", &[1.0; 4], &[2, 2], None))
            .await,
        Code::InvalidArgument,
        "forward_id is empty",
    );
    let (id, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
    expect(
        c.compute_backward(backward(&id, &[1.0; 4], &[2, 2], Some(-1.0)))
            .await,
        Code::InvalidArgument,
        "learning_rate",
    );
    let mut req = backward(&id, &[1.0; 4], &[2, 2], None);
    req.accumulation_step = Some(4);
    expect(
        c.compute_backward(req).await,
        Code::InvalidArgument,
        "needs a learning_rate",
    );
    // A forward_id already waiting.
    let e = c
        .compute(training_request("", &x, &[2, 4], Some(&id)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Eviction: two more forwards push the oldest (id) out of 200 bytes.
    let (second, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
    let (third, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
    expect(
        c.compute_backward(backward(&id, &[1.0; 4], &[2, 2], None))
            .await,
        Code::NotFound,
        "evicted",
    );
    assert_eq!(counter(&mut c, "activations_evicted").await, 1);
    assert_eq!(counter(&mut c, "activations_stored").await, 2);
    assert_eq!(counter(&mut c, "activations_bytes").await, 168);
    // A forward bigger than the whole store.
    let e = c
        .compute(training_request("", &values(40, 3), &[10, 4], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--activation-cache-bytes"), "{e:?}");

    // A step after a forward makes that forward's graph stale: ABORTED.
    c.compute_backward(backward(&third, &[1.0; 4], &[2, 2], Some(0.1)))
        .await
        .unwrap();
    expect(
        c.compute_backward(backward(&second, &[1.0; 4], &[2, 2], Some(0.1)))
            .await,
        Code::Aborted,
        "took an optimizer step after",
    );
    expect(
        c.compute_backward(backward(&second, &[1.0; 4], &[2, 2], Some(0.1)))
            .await,
        Code::NotFound,
        "stale",
    );

    // Still serving, training included.
    let (id, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
    let b = c
        .compute_backward(backward(&id, &[1.0; 4], &[2, 2], Some(0.1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.grad_input_shape, vec![2, 4]);
    assert_eq!(infer(&mut c, "other", &[3.0], &[1]).await, vec![3.0]);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activations_expire_after_the_ttl() {
    let server = TestServer::start(args(
        &["m=builtin:mlp:4x8x2"],
        &["--activation-ttl", "200ms", "--trainable", "m"],
    ))
    .await;
    let mut c = server.client().await;
    let x = values(4, 5);
    let (id, _) = train_forward(&mut c, "", &x, &[1, 4]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let e = c
        .compute_backward(backward(&id, &[1.0, 1.0], &[1, 2], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("expired"), "{}", e.message());
    assert_eq!(counter(&mut c, "activations_expired").await, 1);
    // A fresh forward within the TTL still trains.
    let (id, _) = train_forward(&mut c, "", &x, &[1, 4]).await;
    c.compute_backward(backward(&id, &[1.0, 1.0], &[1, 2], Some(0.1)))
        .await
        .unwrap();
    server.stop().await.unwrap();
}

/// Token ids in, embeddings out: the embedding table trains, and there is no
/// gradient with respect to an integer input (empty data and shape).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_inputs_train_the_parameters_and_get_an_empty_input_gradient() {
    let embed = format!("embed={}", fixture("embed.pt").display());
    let server = TestServer::start(args(&[&embed], &["--trainable", "embed"])).await;
    let mut c = server.client().await;
    let ids: Vec<i64> = vec![3, 7];
    let request = |training: bool| {
        let mut r = ComputeRequest {
            data: ids
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
            shape: vec![1, 2],
            training_mode: Some(training),
            ..Default::default()
        };
        r.metadata.insert("splitserve-dtype".into(), "int64".into());
        r
    };
    let before = f32_values(&c.compute(request(false)).await.unwrap().into_inner().data);
    let r = c.compute(request(true)).await.unwrap().into_inner();
    assert_eq!(r.shape, vec![1, 2, 8]);
    let b = c
        .compute_backward(backward(
            r.forward_id.as_deref().unwrap(),
            &[1.0; 16],
            &[1, 2, 8],
            Some(0.5),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(b.grad_input_data.is_empty() && b.grad_input_shape.is_empty());
    let after = f32_values(&c.compute(request(false)).await.unwrap().into_inner().data);
    // d(sum(E[ids] * 1))/dE[id] = 1 for each looked-up row: each moves by -lr.
    let moved: Vec<f32> = before.iter().map(|v| v - 0.5).collect();
    assert_close(&after, &moved, 1e-6, "embedding rows after one SGD step");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_saved_and_serve_again() {
    const SPEC: &str = "builtin:mlp:4x8x3";
    let dir = temp_dir("ckpt");
    let server = TestServer::start(args(
        &[&format!("m={SPEC}")],
        &[
            "--trainable",
            "m",
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--checkpoint-every",
            "2",
            "--optimizer",
            "adam",
        ],
    ))
    .await;
    let mut c = server.client().await;
    let probe = values(8, 42);
    let untrained = infer(&mut c, "", &probe, &[2, 4]).await;
    let file = dir.join("m.safetensors");
    for step in 1..=3u32 {
        let x = values(8, step);
        let (id, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
        c.compute_backward(backward(&id, &values(6, 50 + step), &[2, 3], Some(0.01)))
            .await
            .unwrap();
        assert_eq!(
            file.is_file(),
            step >= 2,
            "step {step}: saved every 2 steps"
        );
    }
    assert_eq!(counter(&mut c, "checkpoints_saved").await, 1);
    let trained = infer(&mut c, "", &probe, &[2, 4]).await;
    assert_ne!(trained, untrained);
    // Shutdown saves the third step too.
    server.stop().await.unwrap();

    let reloaded = format!("m={SPEC}@{}", file.display());
    let server = TestServer::start(args(&[&reloaded], &[])).await;
    let mut c = server.client().await;
    assert_eq!(infer(&mut c, "", &probe, &[2, 4]).await, trained);
    server.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

fn kv_entries(present: &[Vec<f32>], shapes: &[Vec<i32>]) -> Vec<KvCacheEntry> {
    present
        .chunks_exact(2)
        .zip(shapes.chunks_exact(2))
        .map(|(t, s)| KvCacheEntry {
            key_data: f32_bytes(&t[0]).into(),
            key_shape: s[0].clone(),
            value_data: f32_bytes(&t[1]).into(),
            value_shape: s[1].clone(),
        })
        .collect()
}

/// (hidden, [k0, v0, k1, v1...] values, their shapes) of a KV response.
fn kv_reply(r: pb::ComputeResponse) -> (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<i32>>) {
    let mut tensors = Vec::new();
    let mut shapes = Vec::new();
    for e in &r.present_key_values {
        tensors.push(f32_values(&e.key_data));
        shapes.push(e.key_shape.clone());
        tensors.push(f32_values(&e.value_data));
        shapes.push(e.value_shape.clone());
    }
    (f32_values(&r.data), tensors, shapes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_cache_token_by_token_equals_the_full_sequence() {
    const T: usize = 6;
    const D: usize = 16;
    let attn = format!("attn={}", fixture("attn_kv.pt").display());
    let server = TestServer::start(args(&[&attn], &[])).await;
    let mut c = server.client().await;
    let hidden = values(T * D, 3);

    // The whole sequence at once, no past.
    let full = c
        .compute(ComputeRequest {
            use_cache: Some(true),
            ..request("", &hidden, &[1, T as i32, D as i32])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(full.shape, vec![1, T as i32, D as i32]);
    let (full_out, full_present, full_shapes) = kv_reply(full);
    assert_eq!(full_shapes.len(), 4, "two layers, a key and a value each");
    assert_eq!(full_shapes[0], vec![1, 2, T as i32, 8]);

    // The same model in this process, called as splitserve calls it.
    let want_out = tch::no_grad(|| {
        let local = CModule::load(fixture("attn_kv.pt")).unwrap();
        let out = local
            .forward_is(&[
                IValue::Tensor(Tensor::from_slice(&hidden).view([1, T as i64, D as i64])),
                IValue::TensorList(Vec::new()),
            ])
            .unwrap();
        match out {
            IValue::Tuple(mut parts) => match parts.swap_remove(0) {
                IValue::Tensor(t) => to_vec(&t),
                _ => panic!("the first result is not a tensor"),
            },
            _ => panic!("not a tuple"),
        }
    });
    assert_close(&full_out, &want_out, 1e-5, "full sequence vs local");

    // Token by token, feeding back the cache.
    let mut outs = Vec::new();
    let (mut past, mut shapes) = (Vec::new(), Vec::new());
    for t in 0..T {
        let r = c
            .compute(ComputeRequest {
                use_cache: Some(true),
                past_key_values: kv_entries(&past, &shapes),
                ..request("", &hidden[t * D..(t + 1) * D], &[1, 1, D as i32])
            })
            .await
            .unwrap()
            .into_inner();
        let (out, p, s) = kv_reply(r);
        assert_eq!(s[0], vec![1, 2, t as i32 + 1, 8], "the cache grows by one");
        outs.extend(out);
        (past, shapes) = (p, s);
    }
    assert_close(&outs, &full_out, 1e-5, "token by token vs full sequence");
    for (a, b) in past.iter().zip(&full_present) {
        assert_close(a, b, 1e-5, "final cache vs the full sequence's");
    }

    // use_cache=false with a past: the step runs, no present comes back.
    let r = c
        .compute(ComputeRequest {
            use_cache: Some(false),
            past_key_values: kv_entries(&past, &shapes),
            ..request("", &hidden[..D], &[1, 1, D as i32])
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.present_key_values.is_empty());
    assert_eq!(r.shape, vec![1, 1, D as i32]);

    // A key that fits no encoding of its shape.
    let mut bad = kv_entries(&past, &shapes);
    bad[1].key_data = vec![0u8; 3].into();
    let e = c
        .compute(ComputeRequest {
            past_key_values: bad,
            ..request("", &hidden[..D], &[1, 1, D as i32])
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("past_key_values[1].key"),
        "{}",
        e.message()
    );
    server.stop().await.unwrap();
}
