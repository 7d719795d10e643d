//! Starts the real server in-process on 127.0.0.1:0 and hands out real clients.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use splitserve::ServerConfig;
use splitserve::grpc::pb::compute_service_client::ComputeServiceClient;
use splitserve::grpc::pb::{self, ComputeRequest};
use splitserve::plan::{Auto, CpuBudget, ThreadPlan};
use splitserve::{Listeners, RunError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), RunError>>,
}

/// A TorchScript file written by scripts/make_fixtures.py (`make test` runs it).
pub fn fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/generated")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `make fixtures` (make test does)",
        p.display()
    );
    p
}

/// The server configuration the command line gives for the given models and
/// extra flags (the thread plan is refitted by [`TestServer::start`]).
///
/// The tests compare with libtorch on this process's CPU and assert `cpu`
/// where they report a device, so the server runs on the CPU unless `extra`
/// names a `--device` (the default, `auto`, picks a GPU where there is one).
pub fn args(models: &[&str], extra: &[&str]) -> ServerConfig {
    let mut argv = vec!["splitserve".to_string(), "serve".to_string()];
    for m in models {
        argv.push("--model".into());
        argv.push((*m).into());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    if !extra
        .iter()
        .any(|a| *a == "--device" || a.starts_with("--device="))
    {
        argv.push("--device".into());
        argv.push("cpu".into());
    }
    // The plan is refitted in TestServer::start; a test may ask for more
    // workers than this machine has cores.
    argv.push("--allow-oversubscription".into());
    use clap::Parser;
    let cli = splitserve::cli::Cli::try_parse_from(argv).unwrap();
    let splitserve::cli::Command::Serve(parsed) = cli.command else {
        panic!("not a serve command line");
    };
    parsed.into_config().unwrap()
}

impl TestServer {
    /// Starts with 2 single-threaded workers unless the args say otherwise.
    pub async fn start(mut config: ServerConfig) -> TestServer {
        let workers = match config.threads.workers {
            Auto::Count(n) => Auto::Count(n),
            Auto::Auto => Auto::Count(2),
        };
        config.engine.plan = ThreadPlan::new(
            CpuBudget::of_this_process(None),
            config.threads.io_threads,
            workers,
            Auto::Count(1),
            1,
            true,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(splitserve::run(
            config,
            Listeners {
                grpc: listener,
                admin: None,
                http: None,
            },
            shutdown.clone(),
        ));
        let server = TestServer {
            addr,
            shutdown,
            handle,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = ComputeServiceClient::connect(format!("http://{}", self.addr)).await
            {
                if let Ok(r) = c.health_check(pb::HealthRequest {}).await {
                    if r.get_ref().status == "ok" {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "server did not become ready in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn client(&self) -> ComputeServiceClient<Channel> {
        ComputeServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// SIGTERM equivalent without waiting: the server starts draining.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// SIGTERM equivalent: drain and stop.
    pub async fn stop(self) -> Result<(), RunError> {
        self.shutdown.cancel();
        self.handle.await.unwrap()
    }
}

/// GetServiceInfo's custom_info.
pub async fn info(c: &mut ComputeServiceClient<Channel>) -> HashMap<String, String> {
    c.get_service_info(pb::ServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .custom_info
}

/// One numeric entry of GetServiceInfo's custom_info.
pub async fn counter(c: &mut ComputeServiceClient<Channel>, key: &str) -> u64 {
    let info = info(c).await;
    info.get(key)
        .unwrap_or_else(|| panic!("custom_info has no {key}: {info:?}"))
        .parse()
        .unwrap()
}

/// Generous: the machine may be busy; a wait only ends early when it succeeds.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls GetServiceInfo until `ready(custom_info)` holds; panics with `what`
/// and the last custom_info after [`WAIT`].
pub async fn wait_until(
    c: &mut ComputeServiceClient<Channel>,
    what: &str,
    ready: impl Fn(&HashMap<String, String>) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = info(c).await;
        if ready(&now) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never happened: {now:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until custom_info's numeric `key` equals `want`.
pub async fn wait_for(c: &mut ComputeServiceClient<Channel>, key: &str, want: u64) {
    wait_until(c, &format!("{key} == {want}"), |i| {
        i.get(key).and_then(|v| v.parse::<u64>().ok()) == Some(want)
    })
    .await;
}

/// Reads custom_info's numeric `key` from an already fetched map.
pub fn num(info: &HashMap<String, String>, key: &str) -> u64 {
    info.get(key)
        .unwrap_or_else(|| panic!("custom_info has no {key}: {info:?}"))
        .parse()
        .unwrap()
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn request(model: &str, values: &[f32], shape: &[i32]) -> ComputeRequest {
    ComputeRequest {
        data: f32_bytes(values).into(),
        shape: shape.to_vec(),
        model_id: model.into(),
        ..Default::default()
    }
}

/// Deterministic pseudo-random inputs.
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// float16 bytes of `values` (what `TensorCodec(dtype=np.float16)` sends).
pub fn f16_bytes(values: &[f32]) -> Vec<u8> {
    let t = tch::Tensor::from_slice(values).to_kind(tch::Kind::Half);
    let mut out = vec![0u8; values.len() * 2];
    t.copy_data_u8(&mut out, values.len());
    out
}

pub fn f16_values(bytes: &[u8]) -> Vec<f32> {
    let t = tch::Tensor::from_data_size(bytes, &[(bytes.len() / 2) as i64], tch::Kind::Half)
        .to_kind(tch::Kind::Float);
    Vec::<f32>::try_from(t).unwrap()
}

/// A zlib stream of `bytes` (what `CompressedTensorCodec` sends).
pub fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// The values of f32 `bytes` rounded through float16, as a float16 client sees them.
pub fn through_f16(values: &[f32]) -> Vec<f32> {
    f16_values(&f16_bytes(values))
}
