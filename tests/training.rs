//! Split training and the KV cache through the generated Rust client against
//! the real server, checked against local libtorch autograd on an identical
//! model; and every documented training status, after which the server keeps
//! serving.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    TestServer, args, counter, f16_bytes, f16_values, f32_bytes, f32_values, fixture, info,
    request, through_f16, values, wait_for, zlib,
};
use splitserve::grpc::pb::compute_service_client::ComputeServiceClient;
use splitserve::grpc::pb::{self, BackwardRequest, ComputeRequest, KvCacheEntry};
use tch::{CModule, IValue, Tensor};
use tonic::Code;
use tonic::transport::Channel;

type Client = ComputeServiceClient<Channel>;

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

/// The oracle: the built-in MLP (`builtin:mlp:A x B x ... `, linear layers
/// with ReLU between them) as plain f64 arithmetic on parameters read from a
/// checkpoint the server wrote. It shares no code with the server: no
/// `splitserve::model`, no libtorch op, only its numbers.
#[derive(Clone, Debug)]
struct Oracle {
    /// Per layer: weight [out][in] and bias [out].
    layers: Vec<(Vec<Vec<f64>>, Vec<f64>)>,
}

/// Gradients of one layer's weight and bias.
type LayerGrads = (Vec<Vec<f64>>, Vec<f64>);

/// Per layer, one row of values per input row.
type Rows = Vec<Vec<Vec<f64>>>;

impl Oracle {
    /// Reads `l0.weight`, `l0.bias`, `l1.weight`, ... from a safetensors file.
    fn read(file: &Path) -> Oracle {
        let named: HashMap<String, Tensor> = Tensor::read_safetensors(file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .into_iter()
            .collect();
        let mut layers = Vec::new();
        while let (Some(w), Some(b)) = (
            named.get(&format!("l{}.weight", layers.len())),
            named.get(&format!("l{}.bias", layers.len())),
        ) {
            let (out, inp) = (w.size()[0] as usize, w.size()[1] as usize);
            let w: Vec<f64> = to_vec(w).into_iter().map(f64::from).collect();
            let b: Vec<f64> = to_vec(b).into_iter().map(f64::from).collect();
            assert_eq!(b.len(), out);
            layers.push((w.chunks_exact(inp).map(<[f64]>::to_vec).collect(), b));
        }
        assert_eq!(
            layers.len() * 2,
            named.len(),
            "unexpected tensors in {}: {:?}",
            file.display(),
            named.keys().collect::<Vec<_>>()
        );
        assert!(!layers.is_empty());
        Oracle { layers }
    }

    fn inputs(&self) -> usize {
        self.layers[0].0[0].len()
    }

    /// Every layer's input (ReLU applied) and pre-activation, row by row;
    /// the last pre-activation is the output.
    fn activations(&self, x: &[f32]) -> (Rows, Rows) {
        let rows: Vec<Vec<f64>> = x
            .chunks_exact(self.inputs())
            .map(|r| r.iter().map(|&v| f64::from(v)).collect())
            .collect();
        let mut a = vec![rows];
        let mut z = Vec::new();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let pre: Vec<Vec<f64>> = a[i]
                .iter()
                .map(|row| {
                    w.iter()
                        .zip(b)
                        .map(|(wo, bo)| bo + wo.iter().zip(row).map(|(p, q)| p * q).sum::<f64>())
                        .collect()
                })
                .collect();
            a.push(
                pre.iter()
                    .map(|r| r.iter().map(|v| v.max(0.0)).collect())
                    .collect(),
            );
            z.push(pre);
        }
        (a, z)
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let (_, z) = self.activations(x);
        z.last()
            .unwrap()
            .iter()
            .flatten()
            .map(|&v| v as f32)
            .collect()
    }

    /// Gradients of sum(forward(x) * g): with respect to x, and to each layer.
    fn backward(&self, x: &[f32], g: &[f32]) -> (Vec<f32>, Vec<LayerGrads>) {
        let (a, z) = self.activations(x);
        let outs = self.layers.last().unwrap().1.len();
        let mut d: Vec<Vec<f64>> = g
            .chunks_exact(outs)
            .map(|r| r.iter().map(|&v| f64::from(v)).collect())
            .collect();
        let mut grads = vec![(Vec::new(), Vec::new()); self.layers.len()];
        for i in (0..self.layers.len()).rev() {
            let (w, b) = &self.layers[i];
            let mut dw = vec![vec![0.0; w[0].len()]; w.len()];
            let mut db = vec![0.0; b.len()];
            for (dr, ar) in d.iter().zip(&a[i]) {
                for (o, &dro) in dr.iter().enumerate() {
                    db[o] += dro;
                    for (k, &ark) in ar.iter().enumerate() {
                        dw[o][k] += dro * ark;
                    }
                }
            }
            grads[i] = (dw, db);
            // Through the weights, then (below the first layer) the ReLU.
            d = d
                .iter()
                .enumerate()
                .map(|(r, dr)| {
                    (0..w[0].len())
                        .map(|k| {
                            let v: f64 = dr.iter().zip(w).map(|(dro, wo)| dro * wo[k]).sum();
                            if i > 0 && z[i - 1][r][k] <= 0.0 {
                                0.0
                            } else {
                                v
                            }
                        })
                        .collect()
                })
                .collect();
        }
        (d.into_iter().flatten().map(|v| v as f32).collect(), grads)
    }

    /// torch.optim.SGD's step: p -= lr * grad.
    fn sgd(&mut self, grads: &[LayerGrads], lr: f64) {
        for ((w, b), (dw, db)) in self.layers.iter_mut().zip(grads) {
            for (wo, dwo) in w.iter_mut().zip(dw) {
                for (p, g) in wo.iter_mut().zip(dwo) {
                    *p -= lr * g;
                }
            }
            for (p, g) in b.iter_mut().zip(db) {
                *p -= lr * g;
            }
        }
    }

    /// The sum of several backwards' parameter gradients.
    fn sum(grads: &[Vec<LayerGrads>]) -> Vec<LayerGrads> {
        let mut total = grads[0].clone();
        for g in &grads[1..] {
            for ((tw, tb), (w, b)) in total.iter_mut().zip(g) {
                for (tr, r) in tw.iter_mut().zip(w) {
                    for (t, v) in tr.iter_mut().zip(r) {
                        *t += v;
                    }
                }
                for (t, v) in tb.iter_mut().zip(b) {
                    *t += v;
                }
            }
        }
        total
    }

    /// Every parameter equals `other`'s within `tol` (relative).
    fn assert_close_to(&self, other: &Oracle, tol: f64, what: &str) {
        for (l, ((w, b), (ow, ob))) in self.layers.iter().zip(&other.layers).enumerate() {
            let pairs = w
                .iter()
                .flatten()
                .zip(ow.iter().flatten())
                .chain(b.iter().zip(ob));
            for (x, y) in pairs {
                assert!(
                    (x - y).abs() <= tol * (1.0 + y.abs()),
                    "{what}: layer {l}: {x} vs {y}"
                );
            }
        }
    }
}

/// Flags of a trainable built-in MLP that writes a checkpoint at every step.
fn checkpointing(model: &str, dir: &Path) -> Vec<String> {
    [
        "--trainable",
        model,
        "--checkpoint-dir",
        dir.to_str().unwrap(),
        "--checkpoint-every",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

/// The served MLP's parameters as they are now: one training step with a
/// zero gradient and learning rate 0 (which changes nothing) writes them to
/// `DIR/MODEL.safetensors`, read into an [`Oracle`].
async fn oracle_of(
    c: &mut Client,
    model: &str,
    dir: &Path,
    inputs: usize,
    outputs: usize,
) -> Oracle {
    let (id, _) = train_forward(c, model, &vec![0.5; inputs], &[1, inputs as i32]).await;
    c.compute_backward(backward(
        &id,
        &vec![0.0; outputs],
        &[1, outputs as i32],
        Some(0.0),
    ))
    .await
    .unwrap();
    Oracle::read(&dir.join(format!("{model}.safetensors")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradients_and_sgd_steps_match_an_independent_oracle() {
    let dir = temp_dir("oracle");
    let flags = checkpointing("mlp", &dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(args(&["mlp=builtin:mlp:4x8x3"], &flags)).await;
    let mut c = server.client().await;
    let mut oracle = oracle_of(&mut c, "mlp", &dir, 4, 3).await;
    let probe = values(2 * 4, 99);
    // The built-in MLP's forward is the oracle's, inference and training alike.
    assert_close(
        &infer(&mut c, "", &probe, &[2, 4]).await,
        &oracle.forward(&probe),
        1e-5,
        "inference forward",
    );

    for round in 0..3u32 {
        let x = values(5 * 4, round);
        let g = values(5 * 3, 100 + round);
        let (id, y) = train_forward(&mut c, "", &x, &[5, 4]).await;
        assert_close(&y, &oracle.forward(&x), 1e-5, "training forward");
        let sent = Instant::now();
        let b = c
            .compute_backward(backward(&id, &g, &[5, 3], Some(0.05)))
            .await
            .unwrap()
            .into_inner();
        let waited_ms = sent.elapsed().as_secs_f32() * 1000.0;
        assert_eq!(b.forward_id, id);
        assert_eq!(b.grad_input_shape, vec![5, 4]);
        let ms = b.backward_time_ms.unwrap();
        assert!(
            ms > 0.0 && ms <= waited_ms,
            "backward_time_ms {ms} of {waited_ms}"
        );

        let (want_grad, grads) = oracle.backward(&x, &g);
        assert_close(
            &f32_values(&b.grad_input_data),
            &want_grad,
            1e-5,
            "grad_input",
        );
        oracle.sgd(&grads, f64::from(0.05f32));
        // The server's parameters took the same step: its checkpoint and its
        // answers follow.
        Oracle::read(&dir.join("mlp.safetensors")).assert_close_to(
            &oracle,
            1e-5,
            "checkpointed parameters after the step",
        );
        assert_close(
            &infer(&mut c, "", &probe, &[2, 4]).await,
            &oracle.forward(&probe),
            1e-5,
            "after the step",
        );
    }
    let stats = info(&mut c).await;
    assert_eq!(stats["optimizer_steps"], "4", "the zero step and three");
    assert_eq!(stats["model.mlp.optimizer_steps"], "4");
    assert_eq!(stats["backwards"], "4");
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
    assert_eq!(counter(&mut c, "optimizer_steps").await, 4);
    server.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accumulation_steps_once_every_n_backward_calls_with_the_summed_gradient() {
    let dir = temp_dir("accumulate");
    let flags = checkpointing("m", &dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(args(&["m=builtin:mlp:4x6x2"], &flags)).await;
    let mut c = server.client().await;
    let mut oracle = oracle_of(&mut c, "m", &dir, 4, 2).await;
    let probe = values(4, 7);
    let initial = infer(&mut c, "", &probe, &[1, 4]).await;

    let mut grads = Vec::new();
    for call in 0..3u32 {
        let x = values(3 * 4, 10 + call);
        let g = values(3 * 2, 20 + call);
        let (id, _) = train_forward(&mut c, "", &x, &[3, 4]).await;
        let mut req = backward(&id, &g, &[3, 2], Some(0.1));
        req.accumulation_step = Some(3);
        c.compute_backward(req).await.unwrap();
        grads.push(oracle.backward(&x, &g).1);
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
    oracle.sgd(&Oracle::sum(&grads), f64::from(0.1f32));
    Oracle::read(&dir.join("m.safetensors")).assert_close_to(
        &oracle,
        1e-5,
        "parameters after the accumulated step",
    );
    assert_close(
        &infer(&mut c, "", &probe, &[1, 4]).await,
        &oracle.forward(&probe),
        1e-5,
        "after the accumulated step",
    );
    assert_eq!(
        counter(&mut c, "optimizer_steps").await,
        2,
        "the zero step and one"
    );
    server.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Concurrent clients, each with its own input and gradient, on two workers:
/// every client gets exactly the gradient of its own forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_forward_ids_never_mix() {
    let dir = temp_dir("concurrent");
    let mut flags = checkpointing("m", &dir);
    flags.extend(["--workers".to_string(), "2".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server =
        TestServer::start(args(&["m=builtin:mlp:4x16x3", "k=builtin:scale:2"], &flags)).await;
    let mut c = server.client().await;
    let oracle = oracle_of(&mut c, "m", &dir, 4, 3).await;
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
            (x, g, f32_values(&b.grad_input_data))
        }));
    }
    for t in tasks {
        let (x, g, got) = t.await.unwrap();
        let (want, _) = oracle.backward(&x, &g);
        assert_close(&got, &want, 1e-5, "a client's own input gradient");
    }
    assert_eq!(counter(&mut c, "backwards").await, 25);
    assert_eq!(counter(&mut c, "activations_stored").await, 0);
    server.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_training_error_has_its_status_and_the_server_keeps_serving() {
    // One forward of [2, 4] -> [2, 2] stores 32 + 16 bytes of tensors and its
    // 36-byte id: 84 bytes, so m's 200 hold two.
    let server = TestServer::start(args(
        &["m=builtin:mlp:4x8x2", "other=builtin:scale:1"],
        &[
            "--activation-cache-bytes",
            "400",
            "--activation-model-bytes",
            "m=200",
            "--trainable",
            "m",
        ],
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
    // Negative, NaN and infinite learning rates are refused before any
    // backward runs: the entry stays, and no step is taken.
    for lr in [-1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0001] {
        expect(
            c.compute_backward(backward(&id, &[1.0; 4], &[2, 2], Some(lr)))
                .await,
            Code::InvalidArgument,
            "learning_rate must be a finite number >= 0",
        );
    }
    assert_eq!(counter(&mut c, "optimizer_steps").await, 0);
    assert_eq!(counter(&mut c, "backwards").await, 1);
    assert_eq!(counter(&mut c, "activations_stored").await, 1);
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
        &["--activation-ttl", "1s", "--trainable", "m"],
    ))
    .await;
    let mut c = server.client().await;
    let x = values(4, 5);
    let stored = Instant::now();
    let (id, _) = train_forward(&mut c, "", &x, &[1, 4]).await;
    // Idle workers sweep: the entry goes without any further request.
    wait_for(&mut c, "activations_expired", 1).await;
    assert!(
        stored.elapsed() >= Duration::from_secs(1),
        "released before its TTL"
    );
    assert_eq!(counter(&mut c, "activations_stored").await, 0);
    let e = c
        .compute_backward(backward(&id, &[1.0, 1.0], &[1, 2], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("expired"), "{}", e.message());
    assert_eq!(counter(&mut c, "activations_expired").await, 1);
    // A fresh forward within the TTL (1 s is long for one round trip) still trains.
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

/// The activation store evicts the least recently used entry, not the oldest:
/// a backward that fails on its gradient's shape uses its entry (kept for a
/// corrected retry), so the next forward evicts the entry stored after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_activation_store_evicts_the_least_recently_used_entry() {
    // One forward of [2, 4] -> [2, 2] stores 32 + 16 bytes of tensors and its
    // 36-byte server-made id: 84 bytes, so 200 hold two.
    let server = TestServer::start(args(
        &["m=builtin:mlp:4x8x2"],
        &["--activation-cache-bytes", "200", "--trainable", "m"],
    ))
    .await;
    let mut c = server.client().await;
    let x = values(8, 4);
    let (oldest, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
    let (second, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
    assert_eq!(oldest.len(), 36);
    assert_eq!(counter(&mut c, "activations_bytes").await, 168);
    // Used (and kept): now the most recently used.
    let e = c
        .compute_backward(backward(&oldest, &[0.0; 6], &[3, 2], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let (third, _) = train_forward(&mut c, "", &x, &[2, 4]).await;
    assert_eq!(counter(&mut c, "activations_evicted").await, 1);
    assert_eq!(counter(&mut c, "activations_stored").await, 2);

    let e = c
        .compute_backward(backward(&second, &[1.0; 4], &[2, 2], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("evicted"), "{}", e.message());
    for id in [&oldest, &third] {
        let b = c
            .compute_backward(backward(id, &[1.0; 4], &[2, 2], None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(b.grad_input_shape, vec![2, 4]);
    }
    server.stop().await.unwrap();
}

/// Forwards computed before another client's optimizer step: of several
/// training backwards racing, exactly one steps and every other one is
/// ABORTED (its graph refers to parameters that no longer exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_training_steps_abort_every_backward_made_stale() {
    let server = TestServer::start(args(
        &["m=builtin:mlp:4x8x2"],
        &["--trainable", "m", "--workers", "2"],
    ))
    .await;
    let mut c = server.client().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            train_forward(&mut c, "", &values(8, 40 + i), &[2, 4])
                .await
                .0,
        );
    }
    let calls: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.compute_backward(backward(&id, &[1.0; 4], &[2, 2], Some(0.1)))
                    .await
            })
        })
        .collect();
    let (mut stepped, mut aborted) = (0, 0);
    for h in calls {
        match h.await.unwrap() {
            Ok(_) => stepped += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::Aborted, "{e:?}");
                assert!(
                    e.message().contains("took an optimizer step after"),
                    "{}",
                    e.message()
                );
                aborted += 1;
            }
        }
    }
    assert_eq!((stepped, aborted), (1, 5));
    assert_eq!(counter(&mut c, "optimizer_steps").await, 1);
    assert_eq!(counter(&mut c, "activations_stored").await, 0);
    server.stop().await.unwrap();
}

/// ComputeBackward answers in the encoding of its grad_output, as Compute
/// does: float16 in, float16 out; zlib in, zlib out; the numbers are the
/// oracle's (rounded to float16 where the client sent float16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_answers_float16_and_zlib_in_kind() {
    let dir = temp_dir("encodings");
    let flags = checkpointing("m", &dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(args(&["m=builtin:mlp:4x8x3"], &flags)).await;
    let mut c = server.client().await;
    let oracle = oracle_of(&mut c, "m", &dir, 4, 3).await;
    let x = values(2 * 4, 61);
    let g = values(2 * 3, 62);

    // float16 forward and backward: the server computes in float32 from the
    // float16 values the client sent.
    let (xh, gh) = (through_f16(&x), through_f16(&g));
    let mut req = training_request("", &[], &[2, 4], None);
    req.data = f16_bytes(&x).into();
    let r = c.compute(req).await.unwrap().into_inner();
    assert_eq!(r.data.len(), 2 * 3 * 2, "float16 in, float16 out");
    assert_close(
        &f16_values(&r.data),
        &oracle.forward(&xh),
        2e-3,
        "float16 forward",
    );
    let mut b = backward(r.forward_id.as_deref().unwrap(), &[], &[2, 3], None);
    b.grad_output_data = f16_bytes(&g).into();
    let back = c.compute_backward(b).await.unwrap().into_inner();
    assert_eq!(
        back.grad_input_data.len(),
        2 * 4 * 2,
        "float16 in, float16 out"
    );
    assert_close(
        &f16_values(&back.grad_input_data),
        &oracle.backward(&xh, &gh).0,
        2e-3,
        "float16 grad_input",
    );

    // zlib (float32 inside): lossless, so as close as plain float32.
    let mut req = training_request("", &[], &[2, 4], None);
    req.data = zlib(&f32_bytes(&x)).into();
    let r = c.compute(req).await.unwrap().into_inner();
    let y = splitserve::codec::inflate(&r.data, 2 * 3 * 4).expect("the forward's reply is zlib");
    assert_close(&f32_values(&y), &oracle.forward(&x), 1e-5, "zlib forward");
    let mut b = backward(r.forward_id.as_deref().unwrap(), &[], &[2, 3], None);
    b.grad_output_data = zlib(&f32_bytes(&g)).into();
    let back = c.compute_backward(b).await.unwrap().into_inner();
    let gi = splitserve::codec::inflate(&back.grad_input_data, 2 * 4 * 4)
        .expect("the backward's reply is zlib");
    assert_close(
        &f32_values(&gi),
        &oracle.backward(&x, &g).0,
        1e-5,
        "zlib grad_input",
    );

    // zlib around float16.
    let mut req = training_request("", &[], &[2, 4], None);
    req.data = zlib(&f16_bytes(&x)).into();
    let r = c.compute(req).await.unwrap().into_inner();
    let mut b = backward(r.forward_id.as_deref().unwrap(), &[], &[2, 3], None);
    b.grad_output_data = zlib(&f16_bytes(&g)).into();
    let back = c.compute_backward(b).await.unwrap().into_inner();
    let gi = splitserve::codec::inflate(&back.grad_input_data, 2 * 4 * 2)
        .expect("the backward's reply is zlib");
    assert_close(
        &f16_values(&gi),
        &oracle.backward(&xh, &gh).0,
        2e-3,
        "zlib float16 grad_input",
    );
    server.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// One KV step per token, with every tensor (hidden state and cache) in the
/// given encoding: returns the outputs and the final cache as float32 values.
async fn decode_in(
    c: &mut Client,
    hidden: &[f32],
    d: usize,
    encode: fn(&[f32]) -> Vec<u8>,
    decode: fn(&[u8], usize) -> Vec<f32>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut outs = Vec::new();
    let mut past: Vec<KvCacheEntry> = Vec::new();
    let mut last = Vec::new();
    for t in 0..hidden.len() / d {
        let mut req = ComputeRequest {
            use_cache: Some(true),
            past_key_values: past.clone(),
            ..request("", &[], &[1, 1, d as i32])
        };
        req.data = encode(&hidden[t * d..(t + 1) * d]).into();
        let r = c.compute(req).await.unwrap().into_inner();
        outs.extend(decode(&r.data, d));
        last.clear();
        for e in &r.present_key_values {
            let n = |s: &[i32]| s.iter().product::<i32>() as usize;
            assert_eq!(e.key_shape[2], t as i32 + 1, "the cache grows by one");
            last.push(decode(&e.key_data, n(&e.key_shape)));
            last.push(decode(&e.value_data, n(&e.value_shape)));
        }
        past = r.present_key_values;
    }
    (outs, last)
}

/// The KV cache travels in the request's encoding too: float16 and zlib
/// caches come back in kind and decode the same sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_caches_travel_as_float16_and_zlib() {
    const D: usize = 16;
    let attn = format!("attn={}", fixture("attn_kv.pt").display());
    let server = TestServer::start(args(&[&attn], &[])).await;
    let mut c = server.client().await;
    let hidden = values(5 * D, 8);

    fn plain(v: &[f32]) -> Vec<u8> {
        f32_bytes(v)
    }
    fn from_plain(b: &[u8], n: usize) -> Vec<f32> {
        assert_eq!(b.len(), n * 4, "float32 in, float32 out");
        f32_values(b)
    }
    fn half(v: &[f32]) -> Vec<u8> {
        f16_bytes(v)
    }
    fn from_half(b: &[u8], n: usize) -> Vec<f32> {
        assert_eq!(b.len(), n * 2, "float16 in, float16 out");
        f16_values(b)
    }
    fn zipped(v: &[f32]) -> Vec<u8> {
        zlib(&f32_bytes(v))
    }
    fn from_zipped(b: &[u8], n: usize) -> Vec<f32> {
        f32_values(&splitserve::codec::inflate(b, n * 4).expect("zlib in, zlib out"))
    }
    fn zipped_half(v: &[f32]) -> Vec<u8> {
        zlib(&f16_bytes(v))
    }
    fn from_zipped_half(b: &[u8], n: usize) -> Vec<f32> {
        f16_values(&splitserve::codec::inflate(b, n * 2).expect("zlib in, zlib out"))
    }

    let (want, want_cache) = decode_in(&mut c, &hidden, D, plain, from_plain).await;
    let (out, cache) = decode_in(&mut c, &hidden, D, zipped, from_zipped).await;
    assert_eq!(out, want, "zlib is lossless");
    assert_eq!(cache, want_cache);
    let hh = through_f16(&hidden);
    let (want_h, want_h_cache) = decode_in(&mut c, &hh, D, plain, from_plain).await;
    for (from, to) in [
        (
            half as fn(&[f32]) -> Vec<u8>,
            from_half as fn(&[u8], usize) -> Vec<f32>,
        ),
        (zipped_half, from_zipped_half),
    ] {
        let (out, cache) = decode_in(&mut c, &hidden, D, from, to).await;
        // float16 rounding of every tensor, each step: within float16 precision
        // of a float32 run on the same float16 inputs.
        assert_close(&out, &want_h, 1e-2, "float16 KV outputs");
        for (a, b) in cache.iter().zip(&want_h_cache) {
            assert_close(a, b, 1e-2, "float16 KV cache");
        }
    }
    server.stop().await.unwrap();
}

fn all_finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

/// One request within the limits cannot break a trainable model: a backward
/// with a huge but finite grad_output (1e20) at the largest allowed learning
/// rate, under SGD and Adam. With the default `--max-grad-norm` the step is
/// clipped; with clipping out of the way (`--max-grad-norm 1e30`) the step is
/// refused and rolled back, because its outputs (SGD) or Adam's second moment
/// would overflow. Either way the outputs on the warm-up input (zeros) and on
/// the batch stay finite, and a later ordinary step still changes them: the
/// optimizer is neither broken nor frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_huge_gradient_cannot_break_or_freeze_a_trainable_model() {
    let x = values(5 * 4, 3);
    let warmup = [0.0f32; 4];
    for (optimizer, clip, refused) in [
        ("sgd", "100", None),
        ("adam", "100", None),
        ("sgd", "1e30", Some("outputs NaN or infinite")),
        ("adam", "1e30", Some("optimizer state")),
    ] {
        let what = format!("{optimizer}, --max-grad-norm {clip}");
        let server = TestServer::start(args(
            &["m=builtin:mlp:4x8x3"],
            &[
                "--trainable",
                "m",
                "--optimizer",
                optimizer,
                "--max-grad-norm",
                clip,
            ],
        ))
        .await;
        let mut c = server.client().await;
        let before = infer(&mut c, "", &warmup, &[1, 4]).await;
        let (id, _) = train_forward(&mut c, "", &x, &[5, 4]).await;
        let r = c
            .compute_backward(backward(&id, &[1e20; 15], &[5, 3], Some(10.0)))
            .await;
        match refused {
            None => {
                r.unwrap_or_else(|e| panic!("{what}: {e:?}"));
                assert_eq!(
                    counter(&mut c, "optimizer_grads_clipped").await,
                    1,
                    "{what}"
                );
            }
            Some(why) => {
                let e = r.unwrap_err();
                assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
                assert!(e.message().contains(why), "{what}: {}", e.message());
                assert!(e.message().contains("unchanged"), "{what}: {}", e.message());
                assert_eq!(
                    counter(&mut c, "optimizer_steps_rejected").await,
                    1,
                    "{what}"
                );
                assert_eq!(
                    infer(&mut c, "", &warmup, &[1, 4]).await,
                    before,
                    "{what}: rolled back"
                );
            }
        }
        let probe = infer(&mut c, "", &warmup, &[1, 4]).await;
        let batch = infer(&mut c, "", &x, &[5, 4]).await;
        assert!(all_finite(&probe), "{what}: warm-up outputs {probe:?}");
        assert!(all_finite(&batch), "{what}: batch outputs {batch:?}");

        // Ordinary steps still move the outputs (Adam: several, so that a
        // frozen second moment would show).
        let mut last = probe;
        for k in 0..3u32 {
            let (id, _) = train_forward(&mut c, "", &x, &[5, 4]).await;
            c.compute_backward(backward(&id, &values(15, 20 + k), &[5, 3], Some(0.05)))
                .await
                .unwrap_or_else(|e| panic!("{what}: ordinary step {k}: {e:?}"));
            let now = infer(&mut c, "", &warmup, &[1, 4]).await;
            assert!(all_finite(&now), "{what}: step {k}: {now:?}");
            assert_ne!(now, last, "{what}: ordinary step {k} changed nothing");
            last = now;
        }
        server.stop().await.unwrap();
    }
}

/// A grad_output so large that the parameters' gradients overflow (3e38 per
/// element, summed over five rows): the step is refused, counted, and the
/// model trains on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradient_that_overflows_is_refused_and_the_model_trains_on() {
    let server = TestServer::start(args(
        &["m=builtin:mlp:4x8x3"],
        &["--trainable", "m", "--optimizer", "adam"],
    ))
    .await;
    let mut c = server.client().await;
    let x = values(5 * 4, 9);
    let before = infer(&mut c, "", &x, &[5, 4]).await;
    let (id, _) = train_forward(&mut c, "", &x, &[5, 4]).await;
    let e = c
        .compute_backward(backward(&id, &[3e38; 15], &[5, 3], Some(1.0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("gradients overflowed"),
        "{}",
        e.message()
    );
    assert_eq!(counter(&mut c, "optimizer_steps_rejected").await, 1);
    assert_eq!(counter(&mut c, "optimizer_steps").await, 0);
    assert_eq!(infer(&mut c, "", &x, &[5, 4]).await, before);
    let (id, _) = train_forward(&mut c, "", &x, &[5, 4]).await;
    c.compute_backward(backward(&id, &values(15, 1), &[5, 3], Some(0.05)))
        .await
        .unwrap();
    assert_ne!(infer(&mut c, "", &x, &[5, 4]).await, before);
    assert_eq!(counter(&mut c, "optimizer_steps").await, 1);

    // Accumulating: the backward that overflows is the one refused, at once,
    // not the one that completes the count later.
    let (id, _) = train_forward(&mut c, "", &x, &[5, 4]).await;
    let mut req = backward(&id, &[3e38; 15], &[5, 3], Some(0.05));
    req.accumulation_step = Some(2);
    let e = c.compute_backward(req).await.unwrap_err();
    assert!(
        e.message().contains("gradients overflowed"),
        "{}",
        e.message()
    );
    assert_eq!(counter(&mut c, "optimizer_steps_rejected").await, 2);
    for k in 0..2 {
        let (id, _) = train_forward(&mut c, "", &x, &[5, 4]).await;
        let mut req = backward(&id, &values(15, 2 + k), &[5, 3], Some(0.05));
        req.accumulation_step = Some(2);
        c.compute_backward(req).await.unwrap();
    }
    assert_eq!(counter(&mut c, "optimizer_steps").await, 2);
    server.stop().await.unwrap();
}

/// Each model has its own share of the activation cache: training forwards
/// on one model (here a frozen one that any client may call, for gradients
/// only) evict only that model's activations, never a trainer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_forwards_on_one_model_never_evict_another_models_activations() {
    // One forward of [2, 4] -> [2, 2] stores 84 bytes (see above). 400 bytes
    // split equally: 200 each, two forwards per model.
    let server = TestServer::start(args(
        &["m=builtin:mlp:4x8x2", "frozen=builtin:mlp:4x8x2"],
        &["--activation-cache-bytes", "400", "--trainable", "m"],
    ))
    .await;
    let mut c = server.client().await;
    let x = values(8, 6);
    let (mine, _) = train_forward(&mut c, "m", &x, &[2, 4]).await;
    let mut frozen = Vec::new();
    for _ in 0..10 {
        frozen.push(train_forward(&mut c, "frozen", &x, &[2, 4]).await.0);
    }
    // The flood evicted only its own model's entries.
    assert_eq!(counter(&mut c, "activations_evicted").await, 8);
    assert_eq!(counter(&mut c, "activations_bytes").await, 3 * 84);
    let e = c
        .compute_backward(backward(&frozen[0], &[1.0; 4], &[2, 2], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("evicted"), "{}", e.message());
    // The trainer's forward is still there and trains.
    c.compute_backward(backward(&mine, &[1.0; 4], &[2, 2], Some(0.1)))
        .await
        .unwrap();
    assert_eq!(counter(&mut c, "optimizer_steps").await, 1);
    // The frozen model's newest forwards still answer their gradient.
    c.compute_backward(backward(&frozen[9], &[1.0; 4], &[2, 2], None))
        .await
        .unwrap();
    // A forward over one model's share is refused, naming the model.
    let e = c
        .compute(training_request("frozen", &values(32, 1), &[8, 4], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("\"frozen\"'s share"),
        "{}",
        e.message()
    );
    server.stop().await.unwrap();

    // An operator can give one model most of the cache (or none: 0 refuses
    // every training forward there).
    let server = TestServer::start(args(
        &["m=builtin:mlp:4x8x2", "frozen=builtin:mlp:4x8x2"],
        &[
            "--activation-cache-bytes",
            "400",
            "--activation-model-bytes",
            "m=400",
            "--trainable",
            "m",
        ],
    ))
    .await;
    let mut c = server.client().await;
    for _ in 0..4 {
        train_forward(&mut c, "m", &x, &[2, 4]).await;
    }
    assert_eq!(counter(&mut c, "activations_evicted").await, 0);
    let e = c
        .compute(training_request("frozen", &x, &[2, 4], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    server.stop().await.unwrap();
}

/// Rewrites one tensor of a safetensors file with NaN in its first element.
fn poison(file: &Path) {
    let mut named = Tensor::read_safetensors(file).unwrap();
    let t = &mut named[0].1;
    let _ = t.get(0).fill_(f64::NAN);
    Tensor::write_safetensors(&named, file).unwrap();
}

/// Runs the binary until it exits (60 s at most): (exit code, stderr).
fn run_binary(argv: &[&str]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args(argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checkpoints that do not load never silently give way to fresh weights:
/// non-finite weights make a checkpoint as unloadable as a damaged file (the
/// next older one is resumed from); when none loads the server refuses to
/// start (exit 64, naming the directory) unless `--checkpoint-start-fresh`;
/// and a step counter at 2^64-1 saturates instead of wrapping to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_that_do_not_load_are_refused_never_silently_replaced() {
    const SPEC: &str = "m=builtin:mlp:4x8x3";
    let dir = temp_dir("unloadable");
    let ckpt = dir.join("m.ckpt");
    let mut flags = checkpointing("m", &dir);
    flags.extend(["--optimizer", "adam"].map(String::from));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let probe = values(8, 42);
    let step = |c: &mut Client, k: u32| {
        let mut c = c.clone();
        async move {
            let (id, _) = train_forward(&mut c, "", &values(8, k), &[2, 4]).await;
            c.compute_backward(backward(&id, &values(6, 60 + k), &[2, 3], Some(0.01)))
                .await
                .unwrap();
        }
    };

    let server = TestServer::start(args(&[SPEC], &flags)).await;
    let mut c = server.client().await;
    let untrained = infer(&mut c, "", &probe, &[2, 4]).await;
    step(&mut c, 1).await;
    let after_one = infer(&mut c, "", &probe, &[2, 4]).await;
    step(&mut c, 2).await;
    step(&mut c, 3).await;
    server.stop().await.unwrap();

    // The newest records another number of parameters than the model has (a
    // checkpoint of another model under this name), the one before holds NaN
    // weights: resumed from step 1, both newer ones set aside.
    let state = ckpt.join("step-0000000003/state.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    json["params"] = 7.into();
    std::fs::write(&state, serde_json::to_vec(&json).unwrap()).unwrap();
    poison(&ckpt.join("step-0000000002/model.safetensors"));
    let server = TestServer::start(args(&[SPEC], &flags)).await;
    let mut c = server.client().await;
    assert_eq!(counter(&mut c, "model.m.optimizer_steps").await, 1);
    assert_eq!(infer(&mut c, "", &probe, &[2, 4]).await, after_one);
    for newer in ["step-0000000002", "step-0000000003"] {
        assert!(ckpt.join(format!("unloadable-{newer}")).is_dir());
        assert!(!ckpt.join(newer).exists());
    }
    server.stop().await.unwrap();

    // None loads: the binary refuses to start, in one sentence naming the directory.
    std::fs::write(
        ckpt.join("step-0000000001/model.safetensors"),
        b"not tensors",
    )
    .unwrap();
    let mut argv = vec![
        "serve",
        "--model",
        SPEC,
        "--device",
        "cpu",
        "--grpc-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "off",
        "--http-addr",
        "off",
    ];
    argv.extend(&flags);
    let (code, stderr) = run_binary(&argv);
    assert_eq!(code, Some(64), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains(ckpt.to_str().unwrap()), "{last}");
    assert!(last.contains("none of them loads"), "{last}");
    assert!(last.contains("--checkpoint-start-fresh"), "{last}");
    assert!(
        ckpt.join("step-0000000001").is_dir(),
        "refusing moves nothing"
    );

    // --checkpoint-start-fresh: the model's own weights, the old ones set aside.
    let mut fresh = flags.clone();
    fresh.push("--checkpoint-start-fresh");
    let server = TestServer::start(args(&[SPEC], &fresh)).await;
    let mut c = server.client().await;
    assert_eq!(infer(&mut c, "", &probe, &[2, 4]).await, untrained);
    assert_eq!(counter(&mut c, "model.m.optimizer_steps").await, 0);
    assert!(ckpt.join("unloadable-step-0000000001").is_dir());
    step(&mut c, 1).await;
    server.stop().await.unwrap();

    // A step counter at 2^64-1 (Adam's per-parameter counts too) saturates.
    let state = ckpt.join("step-0000000001/state.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    json["steps"] = u64::MAX.into();
    for t in json["adam_steps"].as_array_mut().unwrap() {
        *t = u64::MAX.into();
    }
    std::fs::write(&state, serde_json::to_vec(&json).unwrap()).unwrap();
    let server = TestServer::start(args(&[SPEC], &flags)).await;
    let mut c = server.client().await;
    assert_eq!(counter(&mut c, "model.m.optimizer_steps").await, u64::MAX);
    let before = infer(&mut c, "", &probe, &[2, 4]).await;
    step(&mut c, 3).await;
    assert_eq!(counter(&mut c, "model.m.optimizer_steps").await, u64::MAX);
    let after = infer(&mut c, "", &probe, &[2, 4]).await;
    assert!(all_finite(&after) && after != before, "{after:?}");
    assert!(ckpt.join(format!("step-{}", u64::MAX)).is_dir());
    server.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A refused step leaves no trace: a model that took an ordinary Adam step,
/// had one refused (its second moment would overflow) and then took another
/// ordinary step answers bit for bit as one that never saw the refused step,
/// so the parameters and Adam's moments and step count were all restored
/// exactly (the moments are stepped out of place and kept only when a step
/// is accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_step_is_undone_exactly_parameters_and_optimizer_state() {
    let x = values(5 * 4, 11);
    let mut answers = Vec::new();
    for with_refusal in [true, false] {
        let server = TestServer::start(args(
            &["m=builtin:mlp:4x8x3"],
            &[
                "--trainable",
                "m",
                "--optimizer",
                "adam",
                "--max-grad-norm",
                "1e30",
            ],
        ))
        .await;
        let mut c = server.client().await;
        for k in 0..2u32 {
            if with_refusal && k == 1 {
                let (id, _) = train_forward(&mut c, "", &x, &[5, 4]).await;
                let e = c
                    .compute_backward(backward(&id, &[1e20; 15], &[5, 3], Some(10.0)))
                    .await
                    .unwrap_err();
                assert!(e.message().contains("optimizer state"), "{}", e.message());
            }
            let (id, _) = train_forward(&mut c, "", &x, &[5, 4]).await;
            c.compute_backward(backward(&id, &values(15, 30 + k), &[5, 3], Some(0.05)))
                .await
                .unwrap();
        }
        assert_eq!(
            counter(&mut c, "optimizer_steps_rejected").await,
            u64::from(with_refusal)
        );
        answers.push(infer(&mut c, "", &x, &[5, 4]).await);
        server.stop().await.unwrap();
    }
    assert_eq!(
        answers[0], answers[1],
        "a refused step changed what later steps compute"
    );
}
