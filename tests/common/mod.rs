//! Starts the real server in-process on 127.0.0.1:0 and hands out real clients.
#![allow(dead_code, clippy::unwrap_used)]

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
pub fn args(models: &[&str], extra: &[&str]) -> ServerConfig {
    let mut argv = vec!["splitserve".to_string(), "serve".to_string()];
    for m in models {
        argv.push("--model".into());
        argv.push((*m).into());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
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

    /// SIGTERM equivalent: drain and stop.
    pub async fn stop(self) -> Result<(), RunError> {
        self.shutdown.cancel();
        self.handle.await.unwrap()
    }
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
