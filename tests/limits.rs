//! Attacks on the HTTP/2 layer with a raw HTTP/2 client: streams that claim
//! huge messages and never send them, and streams that never send a body. The
//! server refuses or times them out with clear statuses, reserves no memory for
//! what was only claimed, and keeps answering everyone else.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{TestServer, args, f32_values, request, values};
use prost::bytes::Bytes;
use splitserve::grpc::pb::compute_service_client::ComputeServiceClient;
use tokio::net::TcpStream;

/// One raw HTTP/2 connection to the server.
async fn connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Opens a Compute stream and sends `prefix` (if any) without ending the body;
/// returns the grpc-status the server answers with.
async fn stalled_stream(
    mut client: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    prefix: Option<[u8; 5]>,
) -> String {
    client = client.ready().await.unwrap();
    let req = http::Request::post(format!(
        "http://{addr}/splitlearn.comm.ComputeService/Compute"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut body) = client.send_request(req, false).unwrap();
    if let Some(p) = prefix {
        body.send_data(Bytes::copy_from_slice(&p), false).unwrap();
    }
    let response = response.await.unwrap();
    // A refusal is a trailers-only answer: grpc-status in the headers.
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    match status {
        Some(s) => s,
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.unwrap().unwrap_or_default();
            trailers["grpc-status"].to_str().unwrap().to_string()
        }
    }
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_sizes_reserve_no_memory_and_stalled_bodies_time_out() {
    let server = TestServer::start(args(
        &["double=builtin:scale:2"],
        &[
            // Room for two 100 MiB messages at a time.
            "--max-inflight-bytes",
            "220000000",
            "--request-body-timeout",
            "1s",
        ],
    ))
    .await;
    let addr = server.addr;
    let mut c = server.client().await;
    let before = resident_bytes();

    // 400 streams on 4 connections, each claiming 100 MiB and sending nothing more.
    let claim = 100u32 * 1024 * 1024;
    let mut prefix = [0u8; 5];
    prefix[1..].copy_from_slice(&claim.to_be_bytes());
    let mut attacks = Vec::new();
    for _ in 0..4 {
        let client = connect(addr).await;
        for _ in 0..100 {
            attacks.push(tokio::spawn(stalled_stream(
                client.clone(),
                addr,
                Some(prefix),
            )));
        }
    }
    // And streams with headers and no body at all.
    let client = connect(addr).await;
    let silent: Vec<_> = (0..50)
        .map(|_| tokio::spawn(stalled_stream(client.clone(), addr, None)))
        .collect();

    // Meanwhile an ordinary client is served.
    let x = values(6, 1);
    let y = c
        .compute(request("double", &x, &[2, 3]))
        .await
        .unwrap()
        .into_inner();
    let want: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    assert_eq!(f32_values(&y.data), want);

    let started = Instant::now();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for a in attacks {
        *codes.entry(a.await.unwrap()).or_default() += 1;
    }
    // RESOURCE_EXHAUSTED (8) at once for what the budget cannot take; the two
    // admitted claims DEADLINE_EXCEEDED (4) when their body does not come.
    assert_eq!(codes.get("8"), Some(&398), "{codes:?}");
    assert_eq!(codes.get("4"), Some(&2), "{codes:?}");
    for s in silent {
        assert_eq!(s.await.unwrap(), "4", "a bodiless stream is timed out");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stalled streams were held"
    );
    // 40 GB were claimed; nothing like it was allocated.
    let grew = resident_bytes().saturating_sub(before);
    assert!(grew < 200 << 20, "resident memory grew by {grew} bytes");

    // The budget is free again: a normal request is still served.
    let y = c
        .compute(request("double", &x, &[2, 3]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&y.data), want);
    server.stop().await.unwrap();
}

/// grpc-message as sent: percent-encoded (gRPC's HTTP/2 mapping).
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends one Compute message prefix claiming `claim` bytes and no more; returns
/// the grpc-status and the (decoded) grpc-message of the answer.
async fn claim_answer(addr: SocketAddr, claim: u32) -> (String, String) {
    let mut client = connect(addr).await.ready().await.unwrap();
    let req = http::Request::post(format!(
        "http://{addr}/splitlearn.comm.ComputeService/Compute"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut body) = client.send_request(req, false).unwrap();
    let mut prefix = [0u8; 5];
    prefix[1..].copy_from_slice(&claim.to_be_bytes());
    body.send_data(Bytes::copy_from_slice(&prefix), false)
        .unwrap();
    let response = response.await.unwrap();
    let get = |h: &http::HeaderMap, k: &str| {
        h.get(k)
            .map(|v| percent_decoded(v.to_str().unwrap()))
            .unwrap_or_default()
    };
    if response.headers().contains_key("grpc-status") {
        let h = response.headers();
        return (get(h, "grpc-status"), get(h, "grpc-message"));
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    let t = body.trailers().await.unwrap().unwrap_or_default();
    (get(&t, "grpc-status"), get(&t, "grpc-message"))
}

/// The message limit and the in-flight budget are two guards with two answers:
/// a claim over --max-message-bytes (well inside the budget) is refused by the
/// first, naming it and its numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_over_the_message_limit_is_refused_before_it_is_read() {
    let server = TestServer::start(args(
        &["double=builtin:scale:2"],
        &[
            "--max-message-bytes",
            "65536",
            "--request-body-timeout",
            "2s",
        ],
    ))
    .await;
    let (code, message) = claim_answer(server.addr, 65537).await;
    assert_eq!(code, "8", "{message}");
    assert!(
        message.contains("--max-message-bytes") && message.contains("found 65537 bytes"),
        "{message}"
    );
    server.stop().await.unwrap();
}

/// A claim within the limit that fills the in-flight budget: other calls are
/// refused for the budget, health checks (never counted in it) still answer,
/// and once the stalled claim times out the budget serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_answer_while_the_budget_is_full() {
    let server = TestServer::start(args(
        &["double=builtin:scale:2"],
        &[
            "--max-message-bytes",
            "65536",
            "--max-inflight-bytes",
            "65541",
            "--request-body-timeout",
            "3s",
        ],
    ))
    .await;
    let addr = server.addr;
    // 65536 + 5 bytes: the whole budget, held until the body timeout. The claim
    // itself is refused (8) if it lands while a probe call holds its few bytes,
    // and on a loaded machine its window can pass before a call lands in it
    // (then it was timed out, 4): claim again in both cases.
    let mut holder = tokio::spawn(claim_answer(addr, 65536));
    let mut c = server.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let busy = loop {
        match c.compute(request("double", &[1.0], &[1])).await {
            Err(s) if s.message().contains("--max-inflight-bytes") => break s,
            other => assert!(
                Instant::now() < deadline,
                "the budget never filled: {other:?}"
            ),
        }
        if holder.is_finished() {
            let (code, message) = holder.await.unwrap();
            assert!(code == "4" || code == "8", "the claim: {code} {message}");
            holder = tokio::spawn(claim_answer(addr, 65536));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(busy.code(), tonic::Code::ResourceExhausted, "{busy:?}");
    assert_eq!(
        grpc_health(addr).await,
        Ok(1),
        "grpc.health.v1 while the budget is full"
    );
    // The stalled claim is timed out; then the budget is free again.
    assert_eq!(holder.await.unwrap().0, "4");
    let y = c
        .compute(request("double", &[1.0, 2.0], &[2]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&y.data), [2.0, 4.0]);
    server.stop().await.unwrap();
}

/// A client on a new connection of its own (each tonic `connect` opens one).
async fn own_connection(
    addr: SocketAddr,
) -> Result<ComputeServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(ComputeServiceClient::new(channel))
}

/// With every slot of --max-connections taken, a new connection takes the
/// slot of the connection idle the longest; when every connection has a
/// request in flight, the new one is closed at once and the busy ones finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_take_idle_slots_or_are_closed() {
    let server = TestServer::start(args(
        &["double=builtin:scale:2", "slow=builtin:delay:3000"],
        &["--max-connections", "2"],
    ))
    .await;
    let x = values(2, 3);
    let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    // Idle connections make room: five clients in turn, each keeping its
    // connection open, are all served.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut c = own_connection(server.addr).await.unwrap();
        let y = c.compute(request("double", &x, &[2])).await.unwrap();
        assert_eq!(f32_values(&y.get_ref().data), doubled);
        held.push(c);
    }
    // Two connections, each with a slow request in flight: no slot is idle.
    // Each is made busy before the next connects, so that the second takes an
    // idle slot, never the first's.
    let mut a = own_connection(server.addr).await.unwrap();
    let slow_a = tokio::spawn({
        let (mut a, x) = (a.clone(), x.clone());
        async move { a.compute(request("slow", &x, &[2])).await }
    });
    common::wait_for(&mut a, "workers_busy", 1).await;
    let mut b = own_connection(server.addr).await.unwrap();
    let slow_b = tokio::spawn({
        let (mut b, x) = (b.clone(), x.clone());
        async move { b.compute(request("slow", &x, &[2])).await }
    });
    common::wait_for(&mut a, "workers_busy", 2).await;
    // A new connection past the limit is closed before any HTTP/2 is spoken.
    let refused = async {
        let mut c = own_connection(server.addr).await?;
        c.compute(request("double", &x, &[2]))
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    assert!(
        refused.await.is_err(),
        "a connection past --max-connections 2 was served while both were busy"
    );
    // The busy connections were not touched.
    assert_eq!(
        f32_values(&slow_a.await.unwrap().unwrap().get_ref().data),
        x
    );
    assert_eq!(
        f32_values(&slow_b.await.unwrap().unwrap().get_ref().data),
        x
    );
    b.compute(request("double", &x, &[2])).await.unwrap();
    server.stop().await.unwrap();
}

/// The same attack at scale against the real binary under a 4 GiB
/// address-space limit (libtorch alone maps about 3 GiB): 10,000 streams each
/// claiming 100 MiB. Without the guard, the server reserved every claim and
/// aborted; now it refuses them and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_claims_of_100_mib_under_a_4_gib_address_space() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = std::process::Command::new("prlimit")
        .arg("--as=4294967296")
        .arg(env!("CARGO_BIN_EXE_splitserve"))
        .args(["serve", "--grpc-addr", &addr.to_string()])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(["--device", "cpu"])
        .args([
            "--model",
            "double=builtin:scale:2",
            "--request-body-timeout",
            "2s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs the server");
    let endpoint = format!("http://{addr}");
    let mut c = loop {
        if let Ok(mut c) =
            splitserve::grpc::pb::compute_service_client::ComputeServiceClient::connect(
                endpoint.clone(),
            )
            .await
        {
            if c.health_check(splitserve::grpc::pb::HealthRequest {})
                .await
                .is_ok_and(|r| r.get_ref().status == "ok")
            {
                break c;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server exited at start-up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let claim = 100u32 * 1024 * 1024;
    let mut prefix = [0u8; 5];
    prefix[1..].copy_from_slice(&claim.to_be_bytes());
    let mut attacks = Vec::new();
    for _ in 0..80 {
        let client = connect(addr).await;
        for _ in 0..125 {
            attacks.push(tokio::spawn(stalled_stream(
                client.clone(),
                addr,
                Some(prefix),
            )));
        }
    }
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for a in attacks {
        *codes.entry(a.await.unwrap()).or_default() += 1;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server died: {codes:?}"
    );
    let refused = codes.get("8").copied().unwrap_or(0);
    let timed_out = codes.get("4").copied().unwrap_or(0);
    assert_eq!(refused + timed_out, 10_000, "{codes:?}");
    let x = values(4, 9);
    let y = c
        .compute(request("double", &x, &[4]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        f32_values(&y.data),
        x.iter().map(|v| v * 2.0).collect::<Vec<_>>()
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let server = TestServer::start(args(
        &["slow=builtin:delay:1500"],
        &["--idle-connection-timeout", "500ms"],
    ))
    .await;
    // A connection that never sends a request is closed by the server.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (_client, conn) = h2::client::handshake(tcp).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(closed.is_ok(), "an idle connection stayed open");
    // A request that computes for longer than the idle limit keeps its
    // connection: it is not idle while the request is in flight.
    let mut c = server.client().await;
    let x = values(2, 5);
    let y = c
        .compute(request("slow", &x, &[2]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&y.data), x);
    server.stop().await.unwrap();
}

/// A server with its HTTP front-end and admin sidecar, on 127.0.0.1:0.
struct FullServer {
    grpc: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), splitserve::RunError>>,
}

impl FullServer {
    async fn start(mut config: splitserve::ServerConfig) -> FullServer {
        use splitserve::plan::{Auto, CpuBudget, ThreadPlan};
        config.engine.plan = ThreadPlan::new(
            CpuBudget::of_this_process(None),
            config.threads.io_threads,
            Auto::Count(2),
            Auto::Count(1),
            1,
            true,
        )
        .unwrap();
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (grpc, http, admin) = (
            bind().await.unwrap(),
            bind().await.unwrap(),
            bind().await.unwrap(),
        );
        let addrs = [
            grpc.local_addr().unwrap(),
            http.local_addr().unwrap(),
            admin.local_addr().unwrap(),
        ];
        let shutdown = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(splitserve::run(
            config,
            splitserve::Listeners {
                grpc,
                admin: Some(admin),
                http: Some(http),
            },
            shutdown.clone(),
        ));
        let deadline = Instant::now() + common::WAIT;
        while http1(addrs[1], "GET", "/v2/health/ready", b"").await.0 != 200 {
            assert!(Instant::now() < deadline, "the server never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        FullServer {
            grpc: addrs[0],
            http: addrs[1],
            admin: addrs[2],
            shutdown,
            handle,
        }
    }

    async fn client(
        &self,
    ) -> splitserve::grpc::pb::compute_service_client::ComputeServiceClient<tonic::transport::Channel>
    {
        splitserve::grpc::pb::compute_service_client::ComputeServiceClient::connect(format!(
            "http://{}",
            self.grpc
        ))
        .await
        .unwrap()
        .max_decoding_message_size(usize::MAX)
    }

    async fn v2(&self) -> V2Client {
        V2Client::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
            .max_decoding_message_size(usize::MAX)
    }

    /// A sample of the admin sidecar's /metrics, 0 when absent.
    async fn metric(&self, sample: &str) -> f64 {
        let (_, _, body) = http1(self.admin, "GET", "/metrics", b"").await;
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Polls `sample` until `ok(value)`; panics with `what` after [`common::WAIT`].
    async fn wait_metric(&self, sample: &str, what: &str, ok: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + common::WAIT;
        loop {
            let v = self.metric(sample).await;
            if ok(v) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {sample} is {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

type V2Client =
    splitserve::grpc::inference_pb::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >;

/// One HTTP/1.1 request on its own connection, read to its end: (status,
/// headers, body).
async fn http1(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return (0, String::new(), Vec::new());
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let Some(split) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, String::new(), Vec::new());
    };
    let headers = String::from_utf8_lossy(&out[..split]).to_string();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, headers, out[split + 4..].to_vec())
}

/// A v2 JSON request for `model` with a [rows, 4] FP32 input, asking for
/// `outputs` (name, binary) by name.
fn v2_json(rows: usize, outputs: &[(&str, bool)]) -> Vec<u8> {
    let outputs: Vec<_> = outputs
        .iter()
        .map(|(n, b)| serde_json::json!({"name": n, "parameters": {"binary_data": b}}))
        .collect();
    serde_json::json!({
        "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [rows, 4], "data": values(rows * 4, 7)}],
        "outputs": outputs,
    })
    .to_string()
    .into_bytes()
}

fn v2_grpc(
    model: &str,
    rows: usize,
    outputs: &[&str],
) -> splitserve::grpc::inference_pb::ModelInferRequest {
    use splitserve::grpc::inference_pb as v2;
    v2::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![v2::model_infer_request::InferInputTensor {
            name: "INPUT__0".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 4],
            ..Default::default()
        }],
        outputs: outputs
            .iter()
            .map(|n| v2::model_infer_request::InferRequestedOutputTensor {
                name: (*n).into(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: vec![common::f32_bytes(&values(rows * 4, 7)).into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_over_the_limit_are_refused_before_they_are_built_on_every_protocol() {
    // 16 bytes in, 80,000 out (wide) or 32,000 out (mid), under a 64 KiB limit.
    let server = FullServer::start(args(
        &["wide=builtin:mlp:4x8x20000", "mid=builtin:mlp:4x8x8000"],
        &["--max-message-bytes", "65536"],
    ))
    .await;
    let mut c = server.client().await;
    let mut v2 = server.v2().await;
    let too_large = |s: tonic::Status| {
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(
            s.message().contains("reply too large") && s.message().contains("65536"),
            "{s:?}"
        );
    };

    // ComputeService, plain and zlib (320 KB of noise does not shrink 5x).
    too_large(
        c.compute(request("wide", &values(4, 1), &[1, 4]))
            .await
            .unwrap_err(),
    );
    let mut zipped = request("wide", &values(16, 2), &[4, 4]);
    zipped.data = common::zlib(&zipped.data).into();
    too_large(c.compute(zipped).await.unwrap_err());
    // The Open Inference Protocol over gRPC.
    too_large(v2.model_infer(v2_grpc("wide", 1, &[])).await.unwrap_err());
    // An output asked for twice is refused, whatever its size, before computing.
    let e = v2
        .model_infer(v2_grpc("mid", 1, &["OUTPUT__0", "OUTPUT__0"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("more than once"), "{e:?}");
    let ok = v2
        .model_infer(v2_grpc("mid", 1, &["OUTPUT__0"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.raw_output_contents[0].len(), 32_000);

    // Over HTTP: binary over the limit, then JSON over it where binary fits.
    let (status, _, body) = http1(
        server.http,
        "POST",
        "/v2/models/wide/infer",
        &v2_json(1, &[("OUTPUT__0", true)]),
    )
    .await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("reply too large") && body.contains("65536"),
        "{body}"
    );
    let (status, headers, body) = http1(
        server.http,
        "POST",
        "/v2/models/mid/infer",
        &v2_json(1, &[("OUTPUT__0", true)]),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let head: usize = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("inference-header-content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    assert_eq!(body.len(), head + 32_000);
    let (status, _, body) = http1(
        server.http,
        "POST",
        "/v2/models/mid/infer",
        &v2_json(1, &[("OUTPUT__0", false)]),
    )
    .await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("reply too large") && body.contains("at least 65537"),
        "{body}"
    );
    let (status, _, body) = http1(
        server.http,
        "POST",
        "/v2/models/mid/infer",
        &v2_json(1, &[("OUTPUT__0", true), ("OUTPUT__0", true)]),
    )
    .await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("more than once"), "{body}");

    // Each refusal is counted, and the server still answers.
    let counted = server
        .metric("splitserve_limit_rejections_total{limit=\"reply_size\"}")
        .await;
    assert_eq!(counted, 5.0);
    let y = c
        .compute(request("mid", &values(4, 3), &[1, 4]))
        .await
        .unwrap();
    assert_eq!(y.into_inner().data.len(), 32_000);
    server.stop().await;
}

/// Sends one gRPC request on its own raw HTTP/2 connection and waits for the
/// reply's headers, never reading its body; aborting the task closes it.
async fn unread_grpc_reply(
    addr: SocketAddr,
    path: &str,
    msg: Vec<u8>,
) -> tokio::task::JoinHandle<()> {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let h2c = connect(addr).await;
    let req = http::Request::post(format!("http://{addr}/{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = h2c.ready().await.unwrap().send_request(req, false).unwrap();
    send.send_data(Bytes::from(framed), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("grpc-status").is_none(),
        "{response:?}"
    );
    tokio::spawn(async move {
        let _hold = (response, send);
        std::future::pending::<()>().await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_bytes_stay_in_the_budget_until_the_client_reads_them() {
    // 64 bytes in, 16 MiB out; the budget has room for one such reply.
    let server = FullServer::start(args(
        &["big=builtin:mlp:4x8x524288"],
        &[
            "--max-message-bytes",
            "17MiB",
            "--max-inflight-bytes",
            "24MiB",
        ],
    ))
    .await;
    const REPLY: f64 = 16.0 * 1024.0 * 1024.0;
    const GAUGE: &str = "splitserve_inflight_request_bytes";
    let mut c = server.client().await;
    let busy = |s: tonic::Status| {
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("--max-inflight-bytes"), "{s:?}");
    };

    // gRPC, both services: a raw HTTP/2 client that never reads its reply
    // (never opens its flow-control window past the first 64 KiB).
    let compute = prost::Message::encode_to_vec(&request("big", &values(32, 4), &[8, 4]));
    let infer = prost::Message::encode_to_vec(&v2_grpc("big", 8, &[]));
    for (path, msg) in [
        ("splitlearn.comm.ComputeService/Compute", compute),
        ("inference.GRPCInferenceService/ModelInfer", infer),
    ] {
        let unread = unread_grpc_reply(server.grpc, path, msg).await;
        server
            .wait_metric(GAUGE, "the unread gRPC reply is counted", |v| v >= REPLY)
            .await;
        busy(
            c.compute(request("big", &values(32, 5), &[8, 4]))
                .await
                .unwrap_err(),
        );
        // The client goes away: its reply's bytes are given back.
        unread.abort();
        server
            .wait_metric(GAUGE, "the gRPC reply is given back", |v| v == 0.0)
            .await;
        let y = c
            .compute(request("big", &values(32, 5), &[8, 4]))
            .await
            .unwrap();
        assert_eq!(y.into_inner().data.len() as f64, REPLY);
    }

    // HTTP: a client with a small receive buffer that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stalled = socket.connect(server.http).await.unwrap();
    let body = v2_json(8, &[("OUTPUT__0", true)]);
    let head = format!(
        "POST /v2/models/big/infer HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    use tokio::io::AsyncWriteExt;
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&body).await.unwrap();
    server
        .wait_metric(GAUGE, "the unread HTTP reply is counted", |v| v >= REPLY)
        .await;
    busy(
        c.compute(request("big", &values(32, 6), &[8, 4]))
            .await
            .unwrap_err(),
    );
    drop(stalled);
    server
        .wait_metric(GAUGE, "the HTTP reply is given back", |v| v == 0.0)
        .await;
    c.compute(request("big", &values(32, 6), &[8, 4]))
        .await
        .unwrap();
    server.stop().await;
}

/// The server with its HTTP/REST port too (the shared harness starts gRPC only).
async fn start_with_http(
    mut config: splitserve::ServerConfig,
) -> (SocketAddr, SocketAddr, tokio_util::sync::CancellationToken) {
    use splitserve::plan::{Auto, CpuBudget, ThreadPlan};
    config.engine.plan = ThreadPlan::new(
        CpuBudget::of_this_process(None),
        config.threads.io_threads,
        Auto::Count(1),
        Auto::Count(1),
        1,
        true,
    )
    .unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(splitserve::run(
        config,
        splitserve::Listeners {
            grpc,
            admin: None,
            http: Some(http),
        },
        shutdown.clone(),
    ));
    (grpc_addr, http_addr, shutdown)
}

/// Starts an HTTP/2 inference request on `client`, sends `bytes` of its body
/// without ending it, and returns the HTTP status it is answered with.
async fn unfinished_http_body(
    client: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    bytes: usize,
) -> u16 {
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!("http://{addr}/v2/models/double/infer"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(req, false).unwrap();
    body.send_data(Bytes::from(vec![b' '; bytes]), false)
        .unwrap();
    let status = response.await.unwrap().status().as_u16();
    drop(body);
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http_connection_holds_at_most_its_share_of_the_budget() {
    let (grpc, http_addr, shutdown) = start_with_http(args(
        &["double=builtin:scale:2"],
        &[
            "--max-message-bytes",
            "1MiB",
            "--max-inflight-bytes",
            "8MiB",
            "--max-inflight-bytes-per-connection",
            "1000000",
            "--http-min-body-rate",
            "0",
            "--request-body-timeout",
            "2s",
        ],
    ))
    .await;
    // Ready: the model answers over gRPC and the HTTP port accepts.
    let deadline = Instant::now() + common::WAIT;
    loop {
        let ready = async {
            let mut c =
                splitserve::grpc::pb::compute_service_client::ComputeServiceClient::connect(
                    format!("http://{grpc}"),
                )
                .await
                .ok()?;
            c.compute(request("double", &[1.0], &[1])).await.ok()?;
            TcpStream::connect(http_addr).await.ok()
        };
        if ready.await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three bodies of 400 KB on one connection: two fit its 1 MB share, one
    // does not; a body on another connection has a share of its own.
    let a = connect(http_addr).await;
    let b = connect(http_addr).await;
    let on_a: Vec<_> = (0..3)
        .map(|_| tokio::spawn(unfinished_http_body(a.clone(), http_addr, 400_000)))
        .collect();
    let on_b = tokio::spawn(unfinished_http_body(b, http_addr, 400_000));
    let mut statuses = Vec::new();
    for s in on_a {
        statuses.push(s.await.unwrap());
    }
    statuses.sort();
    // 400: the admitted bodies, cut when they did not finish in 2 s; 429: refused.
    // Which and how many are refused depends on how their chunks interleave
    // (a refused body's bytes are given back when its stream ends): at least
    // one fits, at least one is refused.
    assert!(
        statuses.first() == Some(&400) && statuses.last() == Some(&429),
        "{statuses:?}"
    );
    assert_eq!(on_b.await.unwrap(), 400, "the other connection was refused");
    shutdown.cancel();
}

/// Sockets that never send a byte are held in their own small pool, closed
/// after --handshake-timeout (or sooner, the oldest first, when the pool is
/// full), and never take the slots of established connections: with every
/// slot of --max-connections and of the pool taken by silent sockets, a real
/// client is still served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_never_take_the_slots_of_established_connections() {
    let server = TestServer::start(args(
        &["double=builtin:scale:2"],
        &[
            "--max-connections",
            "3",
            "--max-pending-connections",
            "4",
            "--handshake-timeout",
            "2s",
        ],
    ))
    .await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Both pools are full of silent sockets; a client that speaks is served,
    // well before any of them timed out.
    let x = values(2, 3);
    let started = Instant::now();
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = server.client().await;
        c.compute(request("double", &x, &[2])).await
    })
    .await;
    let y = served
        .expect("a real client was not served while silent sockets were open")
        .expect("a real client was refused while silent sockets were open")
        .into_inner();
    assert_eq!(
        f32_values(&y.data),
        x.iter().map(|v| v * 2.0).collect::<Vec<_>>()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Every silent socket is closed by the server: the oldest to make room,
    // the rest after --handshake-timeout (not the 5-minute idle timeout).
    for mut s in silent {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0) | Err(_))),
            "a silent socket stayed open: {closed:?}"
        );
    }
    server.stop().await.unwrap();
}

/// GET `path` over HTTP/1.1 on a new connection: the status line, or why not.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let call = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.map_err(|e| e.to_string())?;
        let reply = String::from_utf8_lossy(&reply).to_string();
        Ok(reply.lines().next().unwrap_or_default().to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// grpc.health.v1 over a new connection: the status, or why not.
async fn grpc_health(addr: SocketAddr) -> Result<i32, String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let call = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(reply.into_inner().status)
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Under `ulimit -n 256` with default flags, --max-connections and the
/// handshake pool are sized from the descriptor limit: hundreds of idle
/// sockets on every port leave /livez and grpc.health.v1 answering. A
/// --max-connections that cannot fit is refused at start with exit 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_past_the_descriptor_limit_leave_health_answering() {
    let port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a: SocketAddr = l.local_addr().unwrap();
        a
    };
    let (grpc, http, admin) = (port(), port(), port());
    let serve = |extra: &str| {
        let command = format!(
            "ulimit -n 256 && exec {} serve --grpc-addr {grpc} --http-addr {http} \
             --metrics-addr {admin} --device cpu --model double=builtin:scale:2 {extra}",
            env!("CARGO_BIN_EXE_splitserve")
        );
        KillOnDrop(
            std::process::Command::new("bash")
                .args(["-c", &command])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        )
    };
    let mut refused = serve("--max-connections 1000");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = refused.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "--max-connections 1000 under ulimit -n 256 was not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(refused.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("file descriptors") && stderr.contains("256"),
        "{stderr}"
    );

    let mut child = serve("");
    let deadline = Instant::now() + Duration::from_secs(60);
    while grpc_health(grpc).await != Ok(1) {
        assert!(child.0.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Silent sockets, and sockets that start their protocol and then idle
    // (established connections): the HTTP/2 preface on the gRPC port, half a
    // request head on the HTTP port.
    use tokio::io::AsyncWriteExt;
    let h2_preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let h1_start: &[u8] = b"GET /v2/health/live HTTP/1.1\r\n";
    let mut idle = Vec::new();
    for (addr, first, n) in [
        (grpc, &b""[..], 150),
        (grpc, h2_preface, 150),
        (http, &b""[..], 150),
        (http, h1_start, 150),
        (admin, &b""[..], 100),
    ] {
        for _ in 0..n {
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
                Ok(Ok(mut s)) => {
                    let _ = s.write_all(first).await;
                    idle.push(s);
                }
                _ => break, // the backlog is full: enough
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(idle.len() > 256, "only {} sockets opened", idle.len());
    assert_eq!(
        http_get(admin, "/livez").await,
        Ok("HTTP/1.1 200 OK".into())
    );
    assert_eq!(
        http_get(http, "/v2/health/live").await,
        Ok("HTTP/1.1 200 OK".into())
    );
    assert_eq!(grpc_health(grpc).await, Ok(1), "grpc.health.v1 SERVING");
    assert!(child.0.try_wait().unwrap().is_none(), "the server died");
}

/// A server process, killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/2 frame: its 9-byte header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one HTTP/2 frame: (type, flags, stream id, payload); None once the
/// server closed the connection.
async fn read_h2_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_PING: u8 = 6;
const FRAME_GOAWAY: u8 = 7;
const FLAG_ACK: u8 = 1;
const FLAG_END_HEADERS: u8 = 4;

/// A raw HTTP/2 connection that has sent its preface and an empty SETTINGS
/// frame, read the server's SETTINGS and acknowledged them; returns it and
/// the server's settings as (id, value) pairs.
async fn raw_h2(addr: SocketAddr) -> (TcpStream, Vec<(u16, u32)>) {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    s.write_all(&hello).await.unwrap();
    loop {
        let (kind, flags, _, payload) = tokio::time::timeout(common::WAIT, read_h2_frame(&mut s))
            .await
            .expect("no SETTINGS from the server")
            .expect("closed before its SETTINGS");
        if kind == FRAME_SETTINGS && flags & FLAG_ACK == 0 {
            let settings = payload
                .chunks_exact(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect();
            s.write_all(&h2_frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                .await
                .unwrap();
            return (s, settings);
        }
    }
}

/// The HPACK block of a Compute request's headers (static-table and literal
/// fields, no Huffman coding, no dynamic table).
fn compute_headers() -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    let literal = |block: &mut Vec<u8>, name: &str, value: &str| {
        block.push(0x00); // literal without indexing, new name
        for s in [name, value] {
            block.push(s.len() as u8);
            block.extend_from_slice(s.as_bytes());
        }
    };
    literal(
        &mut block,
        ":path",
        "/splitlearn.comm.ComputeService/Compute",
    );
    literal(&mut block, ":authority", "test");
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "te", "trailers");
    block
}

/// --max-concurrent-streams is what the server advertises in its SETTINGS;
/// a client that ignores it gets the stream beyond it refused
/// (REFUSED_STREAM) while the others stay open, and a client that honours it
/// (tonic) queues its extra calls: all of them are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_max_concurrent_streams_are_refused_or_queued() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(args(
        &["slow=builtin:delay:300"],
        &["--max-concurrent-streams", "2", "--workers", "3"],
    ))
    .await;
    let (mut raw, settings) = raw_h2(server.addr).await;
    // SETTINGS_MAX_CONCURRENT_STREAMS is setting 3.
    assert!(settings.contains(&(3, 2)), "{settings:?}");
    // Streams 1 and 3 open (headers, no body yet), then stream 5 beyond the limit.
    for id in [1, 3, 5] {
        raw.write_all(&h2_frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS,
            id,
            &compute_headers(),
        ))
        .await
        .unwrap();
    }
    let refused = tokio::time::timeout(common::WAIT, async {
        loop {
            match read_h2_frame(&mut raw).await {
                Some((FRAME_RST_STREAM, _, id, code)) => break Some((id, code)),
                Some(_) => continue,
                None => break None,
            }
        }
    })
    .await
    .expect("the stream beyond the limit was never answered");
    // REFUSED_STREAM is error code 7; the connection stays open.
    assert_eq!(refused, Some((5, 7u32.to_be_bytes().to_vec())));
    // Closing it ends its two open streams (else they wait out the body timeout).
    drop(raw);

    // A tonic client on one connection, three calls at once: none refused.
    // (Once it has the server's SETTINGS: streams a client opens before they
    // arrive, right after connecting, count against no limit it knows of.)
    let mut c = own_connection(server.addr).await.unwrap();
    let x = values(2, 8);
    c.compute(request("slow", &x, &[2])).await.unwrap();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (mut c, x) = (c.clone(), x.clone());
            tokio::spawn(async move { c.compute(request("slow", &x, &[2])).await })
        })
        .collect();
    for call in calls {
        let y = call.await.unwrap().expect("a queued call was refused");
        assert_eq!(f32_values(&y.get_ref().data), x);
    }
    server.stop().await.unwrap();
}

/// The server pings an idle connection every --http2-keepalive-interval and
/// closes one that does not answer within --http2-keepalive-timeout
/// (splitserve_open_connections drops); a client that answers its pings
/// keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_answer_keepalive_pings_is_closed() {
    let server = FullServer::start(args(
        &["double=builtin:scale:2"],
        &[
            "--http2-keepalive-interval",
            "200ms",
            "--http2-keepalive-timeout",
            "300ms",
        ],
    ))
    .await;
    // A client that answers pings (tonic, through h2), on its own connection.
    let mut c = own_connection(server.grpc).await.unwrap();
    let x = values(2, 9);
    c.compute(request("double", &x, &[2])).await.unwrap();
    // A client that reads the server's frames and never answers a ping.
    let (mut raw, _) = raw_h2(server.grpc).await;
    server
        .wait_metric(
            "splitserve_open_connections{port=\"grpc\"}",
            "both connections open",
            |v| v == 2.0,
        )
        .await;
    // Closed within 10 s: well past the 200 ms + 300 ms asked for, well before
    // the default timeout of 20 s.
    let (mut pinged, mut closed) = (false, false);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match read_h2_frame(&mut raw).await {
                Some((FRAME_PING, flags, _, _)) if flags & FLAG_ACK == 0 => pinged = true,
                Some((FRAME_GOAWAY, ..)) | Some(_) => continue,
                None => {
                    closed = true;
                    return;
                }
            }
        }
    })
    .await;
    assert!(pinged, "the server never pinged the idle connection");
    assert!(
        closed,
        "a connection that did not answer a ping stayed open"
    );
    server
        .wait_metric(
            "splitserve_open_connections{port=\"grpc\"}",
            "the unanswering connection is closed, the other kept",
            |v| v == 1.0,
        )
        .await;
    // The answering client's connection served on: no reconnect was needed.
    let y = c.compute(request("double", &x, &[2])).await.unwrap();
    assert_eq!(
        f32_values(&y.get_ref().data),
        x.iter().map(|v| v * 2.0).collect::<Vec<_>>()
    );
    assert_eq!(
        server
            .metric("splitserve_connections_total{port=\"grpc\"}")
            .await,
        2.0,
        "the client that answered its pings had to reconnect"
    );
    server.stop().await;
}

/// The codec thread's queue holds 256 payloads waiting to be inflated or
/// compressed: while it inflates zlib bombs (each stopped at
/// --max-decompressed-bytes), a burst of zlib requests past the queue is
/// refused at once with RESOURCE_EXHAUSTED ("retry with backoff"), counted as
/// limit="codec_queue"; the others are answered, and once the queue drains
/// zlib requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zlib_payloads_past_the_codec_queue_are_refused_and_counted() {
    let server = FullServer::start(args(
        &["double=builtin:scale:2"],
        &["--max-decompressed-bytes", "64MiB"],
    ))
    .await;
    // 80 MiB of zeros in about 80 KB: each is inflated up to the limit (twice:
    // once to read, once to tell a bomb from a stream that is not zlib).
    let bomb = Bytes::from(common::zlib(&vec![0u8; 80 << 20]));
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(own_connection(server.grpc).await.unwrap());
    }
    let x = values(4, 11);
    let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    let small = {
        let mut r = request("double", &[], &[4]);
        r.data = common::zlib(&common::f32_bytes(&x)).into();
        r
    };
    let queue_full = |s: &tonic::Status| {
        s.code() == tonic::Code::ResourceExhausted
            && s.message().contains("decompression queue is full")
            && s.message().contains("retry with backoff")
    };
    let (mut refused, mut answered) = (0usize, 0usize);
    let deadline = Instant::now() + common::WAIT;
    // The burst is sent while the bombs hold the codec thread; on a machine
    // busy enough to send it slower than the bombs inflate, it is sent again.
    while refused == 0 {
        assert!(
            Instant::now() < deadline,
            "the codec queue never filled ({answered} answered)"
        );
        let bombs: Vec<_> = (0..8)
            .map(|_| {
                let mut c = clients[0].clone();
                let mut r = request("double", &[], &[20 << 20]);
                r.data = bomb.clone();
                tokio::spawn(async move { c.compute(r).await })
            })
            .collect();
        let burst: Vec<_> = (0..300)
            .map(|i| {
                let (mut c, r) = (clients[1 + i % 3].clone(), small.clone());
                tokio::spawn(async move { c.compute(r).await })
            })
            .collect();
        for b in bombs {
            let e = b.await.unwrap().expect_err("a bomb was inflated");
            if queue_full(&e) {
                refused += 1;
            } else {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("--max-decompressed-bytes"), "{e:?}");
            }
        }
        for call in burst {
            match call.await.unwrap() {
                Ok(y) => {
                    let raw =
                        splitserve::codec::inflate(&y.get_ref().data, 16).expect("a zlib reply");
                    assert_eq!(f32_values(&raw), doubled);
                    answered += 1;
                }
                Err(e) if queue_full(&e) => refused += 1,
                Err(e) => panic!("a zlib request failed otherwise: {e:?}"),
            }
        }
    }
    assert!(answered > 0, "every zlib request of the burst was refused");
    server
        .wait_metric(
            "splitserve_limit_rejections_total{limit=\"codec_queue\"}",
            "each refusal counted",
            |v| v == refused as f64,
        )
        .await;
    let y = clients[1].compute(small.clone()).await.unwrap();
    let raw = splitserve::codec::inflate(&y.get_ref().data, 16).unwrap();
    assert_eq!(f32_values(&raw), doubled);
    server.stop().await;
}

/// Out of file descriptors, accept fails (EMFILE): the server backs off
/// 100 ms between tries instead of spinning, logs it and counts each try as
/// limit="file_descriptors"; the client meanwhile waits in the kernel's
/// backlog and is served once descriptors are free again. The real binary,
/// its descriptor limit lowered from outside (prlimit) while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_backs_off_while_out_of_file_descriptors() {
    let port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a: SocketAddr = l.local_addr().unwrap();
        a
    };
    let (grpc, admin) = (port(), port());
    let log_path =
        std::env::temp_dir().join(format!("splitserve-descriptors-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
            .args(["serve", "--grpc-addr", &grpc.to_string()])
            .args(["--metrics-addr", &admin.to_string(), "--device", "cpu"])
            .args(["--model", "double=builtin:scale:2"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while grpc_health(grpc).await != Ok(1) {
        assert!(child.0.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.0.id().to_string();
    let prlimit = |nofile: &str| {
        let mut prlimit = std::process::Command::new("prlimit");
        prlimit.args(["--pid", &pid]);
        match nofile {
            "" => prlimit.args(["--nofile", "--output=SOFT,HARD", "--noheadings"]),
            set => prlimit.arg(format!("--nofile={set}")),
        };
        let out = prlimit.output().expect("prlimit (util-linux)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let was = prlimit("");
    let (soft, hard) = was.split_once(char::is_whitespace).unwrap();
    let (soft, hard) = (soft.trim().to_string(), hard.trim().to_string());
    // Descriptors 0, 1 and 2 are open: no new one can be made.
    prlimit(&format!("3:{hard}"));
    let exhausted = Instant::now();
    let waiting = tokio::spawn(async move {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(reply.into_inner().status)
    });
    let deadline = Instant::now() + common::WAIT;
    let warning = loop {
        let text = std::fs::read_to_string(&log_path).unwrap();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("cannot accept connections"))
        {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no warning in the log:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        warning.contains("WARN") && warning.contains("backing off"),
        "{warning}"
    );
    prlimit(&format!("{soft}:{hard}"));
    let out_of_descriptors_for = exhausted.elapsed();
    // The client that connected meanwhile is served.
    let served = tokio::time::timeout(common::WAIT, waiting).await;
    assert_eq!(
        served
            .expect("the waiting client was never served")
            .unwrap(),
        Ok(1)
    );
    let (status, _, body) = http1(admin, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
    let tries: f64 = String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| {
            l.strip_prefix("splitserve_limit_rejections_total{limit=\"file_descriptors\"} ")?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    // At most one try per 100 ms back-off (a spinning loop makes thousands).
    let most = out_of_descriptors_for.as_millis() as f64 / 100.0 + 2.0;
    assert!(
        tries >= 1.0 && tries <= most,
        "{tries} failed accepts counted in {out_of_descriptors_for:?}"
    );
    assert!(child.0.try_wait().unwrap().is_none(), "the server died");
    let _ = std::fs::remove_file(&log_path);
}

/// `--max-pending-connections` is a pool of that many handshakes: one socket
/// more closes the oldest at once (long before `--handshake-timeout`), counted
/// as `limit="handshake"`, and leaves the others waiting. An established
/// connection closed by `--idle-connection-timeout` is counted as
/// `limit="idle_connection"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_pool_closes_its_oldest_socket_and_idle_closes_are_counted() {
    use tokio::io::AsyncReadExt;
    let server = FullServer::start(args(
        &["double=builtin:scale:2"],
        &[
            "--max-pending-connections",
            "2",
            "--handshake-timeout",
            "120s",
            "--idle-connection-timeout",
            "300ms",
        ],
    ))
    .await;
    let handshake = "splitserve_limit_rejections_total{limit=\"handshake\"}";
    let idle = "splitserve_limit_rejections_total{limit=\"idle_connection\"}";
    assert_eq!(server.metric(handshake).await, 0.0);
    // Two silent sockets fill the pool; the third takes the oldest's place.
    let mut oldest = TcpStream::connect(server.grpc).await.unwrap();
    let second = TcpStream::connect(server.grpc).await.unwrap();
    // The kernel hands connections to accept in the order they were made.
    let third = TcpStream::connect(server.grpc).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(30), oldest.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the oldest of 3 silent sockets stayed open under --max-pending-connections 2: {closed:?}"
    );
    server
        .wait_metric(handshake, "the pending socket closed for room", |v| {
            v >= 1.0
        })
        .await;
    assert_eq!(
        server.metric(handshake).await,
        1.0,
        "only the oldest socket is closed to make room for the third"
    );
    drop((second, third));
    // An HTTP/2 connection that sends nothing after its handshake is closed
    // as idle, and counted.
    let idle_before = server.metric(idle).await;
    let tcp = TcpStream::connect(server.grpc).await.unwrap();
    let (_client, conn) = h2::client::handshake(tcp).await.unwrap();
    let closed = tokio::time::timeout(common::WAIT, conn).await;
    assert!(closed.is_ok(), "an idle connection stayed open");
    server
        .wait_metric(idle, "the idle connection closed", |v| v > idle_before)
        .await;
    server.stop().await;
}
