//! `splitserve diagnose`: where the CPU budget comes from, what libtorch would do
//! on its own, and measurements that separate libtorch cost, gRPC cost, and the
//! collision of the two across a grid of thread plans, ending in a recommendation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use futures::Stream;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use tonic::{Request, Response, Status};

use crate::bench::{self, BenchConfig};
use crate::grpc::pb;
use crate::grpc::pb::compute_service_server::{ComputeService, ComputeServiceServer};
use crate::model::{Model, ModelSpec};
use crate::plan::{CgroupReader, CpuBudget};

/// Thread-related variables that change what libtorch, OpenMP or MKL do.
const THREAD_ENV: [&str; 10] = [
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TORCH_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "KMP_AFFINITY",
    "OMP_PROC_BIND",
    "CUDA_VISIBLE_DEVICES",
];

#[derive(Debug, Clone)]
pub struct DiagnoseConfig {
    /// Model to measure: a TorchScript file or a built-in spec (builtin:mlp:512x1024x512).
    pub model: String,

    /// Input shape of one request, e.g. 1x512 or 1x64x256.
    pub shape: Vec<i64>,

    /// How long each measurement runs.
    pub duration: Duration,

    /// Concurrent clients for the gRPC measurements.
    pub concurrency: usize,

    /// Plans to measure, WxT (workers x intra-op threads), comma-separated.
    /// Default: every split of the budget plus one oversubscribed plan.
    pub plans: Vec<PlanShape>,
    /// Runs of each gRPC measurement (at least 1).
    pub repeats: usize,

    /// CPU cores this process may use (as `serve --cpu-limit`).
    pub cpu_limit: Option<f64>,
}

/// A plan to measure: W workers x T intra-op threads, written `WxT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlanShape {
    pub workers: usize,
    pub intra_op_threads: usize,
}

impl std::str::FromStr for PlanShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (w, t) = s
            .split_once('x')
            .ok_or_else(|| format!("expected WxT like 2x1, got {s:?}"))?;
        match (w.trim().parse::<usize>(), t.trim().parse::<usize>()) {
            (Ok(w), Ok(t)) if w > 0 && t > 0 => Ok(PlanShape {
                workers: w,
                intra_op_threads: t,
            }),
            _ => Err(format!("expected positive WxT like 2x1, got {s:?}")),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetFacts {
    pub cores: usize,
    pub source: String,
    pub cgroup_quota_cores: Option<f64>,
    pub cpuset_cpus: Option<usize>,
    pub available_parallelism: usize,
    pub cpu_limit_flag: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TorchFacts {
    pub version: String,
    pub openmp: bool,
    pub mkl: bool,
    pub mkldnn: bool,
    pub cuda_devices: i64,
    /// What libtorch would use per forward if nobody told it: sized from the
    /// machine, not from the container's CPU limit.
    pub default_intra_op_threads: i32,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub measure: String,
    pub workers: usize,
    pub intra_op_threads: usize,
    pub oversubscribed: bool,
    pub throughput_rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Most threads the measured process had during the run.
    pub threads: u64,
    pub involuntary_ctx_switches_per_s: f64,
    pub errors: u64,
    /// Repeated runs: the lowest and highest throughput seen (`throughput_rps`
    /// is their median).
    pub throughput_min: f64,
    pub throughput_max: f64,
    pub runs: usize,
}

impl Row {
    /// The spread of the repeated runs, relative to their median.
    pub fn spread(&self) -> f64 {
        if self.throughput_rps <= 0.0 {
            return 0.0;
        }
        (self.throughput_max - self.throughput_min) / self.throughput_rps
    }
}

/// Combines repeated runs of one configuration: the median run, with the
/// throughput range of all of them.
fn combine(mut runs: Vec<Row>) -> Option<Row> {
    runs.sort_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps));
    let min = runs.first()?.throughput_rps;
    let max = runs.last()?.throughput_rps;
    let n = runs.len();
    let errors = runs.iter().map(|r| r.errors).sum();
    let mut median = runs.swap_remove(n / 2);
    median.throughput_min = min;
    median.throughput_max = max;
    median.runs = n;
    median.errors = errors;
    Some(median)
}

#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    pub workers: usize,
    pub intra_op_threads: usize,
    /// The plan as flags, as environment variables, and as Helm values.
    pub flags: String,
    pub env: String,
    pub helm: String,
    /// The plan is what `auto` already picks for this budget: nothing to set.
    pub is_auto: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiagnoseReport {
    pub budget: BudgetFacts,
    pub torch: TorchFacts,
    pub env: BTreeMap<String, Option<String>>,
    pub warnings: Vec<String>,
    pub model: String,
    pub shape: Vec<i64>,
    pub libtorch_alone: Vec<Row>,
    pub grpc_alone: Option<Row>,
    pub together: Vec<Row>,
    pub recommendation: Option<Recommendation>,
    /// Why there is no recommendation, when there is none.
    pub no_recommendation: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiagnoseError {
    #[error("{0}")]
    Invalid(String),
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Io(String),
}

/// Involuntary context switches of every thread of a process.
fn involuntary_switches(pid: u32) -> u64 {
    crate::telemetry::system::task_counter_sum(&pid.to_string(), "nonvoluntary_ctxt_switches")
        .unwrap_or(0)
}

fn threads_of(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count() as u64)
}

/// Samples a process's thread count in the background; returns the maximum.
struct ThreadSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl ThreadSampler {
    fn start(pid: u32) -> ThreadSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(threads_of(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        });
        ThreadSampler { stop, handle }
    }

    /// The maximum seen, minus the sampler itself when it samples its own process.
    fn finish(self, own_process: bool) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let max = self.handle.join().unwrap_or(0);
        if own_process {
            max.saturating_sub(1)
        } else {
            max
        }
    }
}

fn default_plans(budget: usize) -> Vec<PlanShape> {
    let mut plans: Vec<PlanShape> = (1..=budget)
        .filter(|w| budget % w == 0)
        .map(|w| PlanShape {
            workers: w,
            intra_op_threads: budget / w,
        })
        .collect();
    plans.reverse();
    // What a Python ThreadPoolExecutor(10) with PyTorch's default threads does.
    plans.push(PlanShape {
        workers: 10,
        intra_op_threads: budget,
    });
    plans
}

/// libtorch alone: W threads looping forward, no RPC. Runs on this process's own
/// threads (never a tokio thread). Each plan's threads are fresh, so they pick up
/// the intra-op count set just before they start.
fn measure_libtorch(
    model: &Arc<Model>,
    shape: &[i64],
    plan: PlanShape,
    budget: usize,
    duration: Duration,
) -> Row {
    let intra = plan.intra_op_threads as i32;
    let pid = std::process::id();
    let start_line = Arc::new(Barrier::new(plan.workers + 1));
    let end_line = Arc::new(Barrier::new(plan.workers + 1));
    let until = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let handles: Vec<_> = (0..plan.workers)
        .map(|_| {
            let (model, shape) = (model.clone(), shape.to_vec());
            let (start_line, end_line, until) =
                (start_line.clone(), end_line.clone(), until.clone());
            std::thread::spawn(move || {
                // Per thread, as the server's workers do (ThreadPlan::pin_this_thread):
                // OpenMP's and MKL's counts are thread-local.
                tch::set_num_threads(intra);
                let _g = tch::no_grad_guard();
                let x = Tensor::zeros(&shape, (Kind::Float, model.device));
                start_line.wait();
                let stop = until
                    .lock()
                    .map(|u| u.unwrap_or_else(Instant::now))
                    .unwrap_or_else(|_| Instant::now());
                let mut lat: Vec<u64> = Vec::new();
                while Instant::now() < stop {
                    let t = Instant::now();
                    if model.forward(&x).is_err() {
                        break;
                    }
                    // Nanoseconds: a forward of a small model is ~100 µs, where
                    // whole microseconds would round every percentile alike.
                    lat.push(t.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64);
                }
                end_line.wait();
                lat
            })
        })
        .collect();
    if let Ok(mut u) = until.lock() {
        *u = Some(Instant::now() + duration);
    }
    let sampler = ThreadSampler::start(pid);
    start_line.wait();
    let began = Instant::now();
    let cs_before = involuntary_switches(pid);
    end_line.wait();
    let cs_after = involuntary_switches(pid);
    let elapsed = began.elapsed().as_secs_f64().max(1e-3);
    let threads = sampler.finish(true);
    let mut lat: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let n = lat.len();
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((n as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |&ns| ns as f64 / 1e6)
    };
    let (p50, p99) = (pct(0.5), pct(0.99));
    Row {
        measure: "libtorch alone".into(),
        workers: plan.workers,
        intra_op_threads: plan.intra_op_threads,
        oversubscribed: plan.workers * plan.intra_op_threads > budget,
        throughput_rps: n as f64 / elapsed,
        p50_ms: p50,
        p99_ms: p99,
        threads,
        involuntary_ctx_switches_per_s: cs_after.saturating_sub(cs_before) as f64 / elapsed,
        errors: 0,
        throughput_min: n as f64 / elapsed,
        throughput_max: n as f64 / elapsed,
        runs: 1,
    }
}

/// gRPC alone: a ComputeService that echoes the payload, no libtorch.
#[derive(Clone, Default)]
struct Echo;

type NoStream = Pin<Box<dyn Stream<Item = Result<pb::MonitoringSnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ComputeService for Echo {
    async fn compute(
        &self,
        r: Request<pb::ComputeRequest>,
    ) -> Result<Response<pb::ComputeResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(pb::ComputeResponse {
            data: r.data,
            shape: r.shape,
            request_id: r.request_id,
            ..Default::default()
        }))
    }
    async fn compute_backward(
        &self,
        _: Request<pb::BackwardRequest>,
    ) -> Result<Response<pb::BackwardResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn health_check(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            status: "ok".into(),
            ..Default::default()
        }))
    }
    async fn get_service_info(
        &self,
        _: Request<pb::ServiceInfoRequest>,
    ) -> Result<Response<pb::ServiceInfoResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type StreamMonitoringStream = NoStream;
    async fn stream_monitoring(
        &self,
        _: Request<pb::MonitoringStreamRequest>,
    ) -> Result<Response<NoStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

fn bench_args(addr: SocketAddr, args: &DiagnoseConfig) -> BenchConfig {
    BenchConfig {
        addr: addr.to_string(),
        concurrency: args.concurrency,
        connections: 4,
        duration: args.duration,
        warmup: Duration::from_millis(500),
        shape: args.shape.clone(),
        model_id: String::new(),
        dtype: "float32".into(),
        timeout: Duration::from_secs(30),
        client_threads: 1,
    }
}

fn client_runtime() -> Result<tokio::runtime::Runtime, DiagnoseError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| DiagnoseError::Io(format!("cannot start a runtime: {e}")))
}

/// Runs the bench load against `addr` while watching process `pid`: returns the
/// report, its most threads and its involuntary context switches.
fn load_and_watch(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    args: &DiagnoseConfig,
    pid: u32,
    own_process: bool,
) -> Result<(bench::BenchReport, u64, u64), DiagnoseError> {
    let sampler = ThreadSampler::start(pid);
    let before = involuntary_switches(pid);
    let report = rt
        .block_on(bench::run(&bench_args(addr, args)))
        .map_err(|e| DiagnoseError::Io(e.to_string()))?;
    let switches = involuntary_switches(pid).saturating_sub(before);
    Ok((report, sampler.finish(own_process), switches))
}

fn row_from_bench(
    measure: &str,
    plan: PlanShape,
    budget: usize,
    r: &bench::BenchReport,
    threads: u64,
    cs: u64,
) -> Row {
    Row {
        measure: measure.into(),
        workers: plan.workers,
        intra_op_threads: plan.intra_op_threads,
        oversubscribed: plan.workers * plan.intra_op_threads > budget,
        throughput_rps: r.throughput_rps,
        p50_ms: r.latency_ms.p50,
        p99_ms: r.latency_ms.p99,
        threads,
        involuntary_ctx_switches_per_s: cs as f64 / r.duration_s.max(1e-3),
        errors: r.errors.values().sum(),
        throughput_min: r.throughput_rps,
        throughput_max: r.throughput_rps,
        runs: 1,
    }
}

fn measure_echo(args: &DiagnoseConfig, budget: usize) -> Result<Row, DiagnoseError> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DiagnoseError::Io(format!("cannot start a runtime: {e}")))?;
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .map_err(|e| DiagnoseError::Io(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| DiagnoseError::Io(e.to_string()))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    server_rt.spawn(
        tonic::transport::Server::builder()
            .add_service(ComputeServiceServer::new(Echo))
            .serve_with_incoming(incoming),
    );
    let pid = std::process::id();
    let rt = client_runtime()?;
    let (report, threads, cs) = load_and_watch(&rt, addr, args, pid, true)?;
    server_rt.shutdown_background();
    let plan = PlanShape {
        workers: 0,
        intra_op_threads: 0,
    };
    let mut row = row_from_bench("grpc alone (echo)", plan, budget, &report, threads, cs);
    row.oversubscribed = false;
    Ok(row)
}

/// Kills the child server when dropped, whatever happens.
struct ChildServer(Child);

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, DiagnoseError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DiagnoseError::Io(e.to_string()))
}

/// Both together: a real `splitserve serve` child with the plan, under load.
fn measure_together(
    args: &DiagnoseConfig,
    plan: PlanShape,
    budget: usize,
) -> Result<Row, DiagnoseError> {
    let exe = std::env::current_exe().map_err(|e| DiagnoseError::Io(e.to_string()))?;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let dims = args
        .shape
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join("x");
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--grpc-addr", &addr.to_string()])
        .args(["--model", &format!("diag={}", args.model)])
        .args(["--warmup-shape", &format!("diag={dims}")])
        .args(["--workers", &plan.workers.to_string()])
        .args(["--intra-op-threads", &plan.intra_op_threads.to_string()])
        .arg("--allow-oversubscription")
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(limit) = args.cpu_limit {
        cmd.args(["--cpu-limit", &limit.to_string()]);
    }
    let child = ChildServer(
        cmd.spawn()
            .map_err(|e| DiagnoseError::Io(format!("cannot start a server: {e}")))?,
    );
    let pid = child.0.id();
    let rt = client_runtime()?;
    let probe = crate::client::ProbeConfig {
        addr: addr.to_string(),
        service: crate::grpc::SERVICE_NAME.into(),
        timeout: Duration::from_secs(1),
        tls: None,
    };
    let ready_by = Instant::now() + Duration::from_secs(60);
    while rt.block_on(crate::client::probe(&probe)).as_deref() != Ok("SERVING") {
        if Instant::now() > ready_by {
            return Err(DiagnoseError::Io(format!(
                "the {}x{} server never became ready",
                plan.workers, plan.intra_op_threads
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (report, threads, cs) = load_and_watch(&rt, addr, args, pid, false)?;
    drop(child);
    Ok(row_from_bench(
        "libtorch + gRPC",
        plan,
        budget,
        &report,
        threads,
        cs,
    ))
}

/// The plan to run, or why there is none. Within 5% of the best throughput
/// the lowest p99 wins; no plan is recommended when the repeated runs spread
/// wider than the difference the choice rests on (a busy machine).
fn recommend(rows: &[Row], clients: usize, budget: usize) -> Result<Recommendation, String> {
    let fits: Vec<&Row> = rows
        .iter()
        .filter(|r| !r.oversubscribed && r.errors == 0)
        .collect();
    let best_rps = fits.iter().map(|r| r.throughput_rps).fold(0.0, f64::max);
    let best = fits
        .iter()
        .filter(|r| r.throughput_rps >= 0.95 * best_rps)
        .min_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
        .copied()
        .ok_or_else(|| "no plan within the budget ran cleanly".to_string())?;
    // The closest competitor: is the gap between them bigger than the noise?
    if let Some(other) = fits
        .iter()
        .filter(|r| !std::ptr::eq(**r, best))
        .max_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps))
    {
        let gap =
            (best.throughput_rps - other.throughput_rps).abs() / best.throughput_rps.max(1e-9);
        let noise = best.spread().max(other.spread());
        if best.runs > 1 && noise > gap && noise > 0.05 {
            return Err(format!(
                "runs disagree: {}x{} and {}x{} differ by {:.0}% but repeated runs spread {:.0}%; \
                 the machine is likely busy, measure again when it is quiet",
                best.workers,
                best.intra_op_threads,
                other.workers,
                other.intra_op_threads,
                gap * 100.0,
                noise * 100.0
            ));
        }
    }
    let is_auto = best.workers == budget && best.intra_op_threads == 1;
    let (w, t) = (best.workers, best.intra_op_threads);
    Ok(Recommendation {
        workers: w,
        intra_op_threads: t,
        flags: format!("--workers {w} --intra-op-threads {t}"),
        env: format!("SPLITSERVE_WORKERS={w} SPLITSERVE_INTRA_OP_THREADS={t}"),
        helm: format!("--set config.workers={w} --set config.intraOpThreads={t}"),
        is_auto,
        reason: format!(
            "{:.0} requests/s at p99 {:.2} ms with {clients} clients, within the CPU budget{}",
            best.throughput_rps,
            best.p99_ms,
            if is_auto {
                "; this is what auto already picks, so nothing needs setting"
            } else {
                ""
            }
        ),
    })
}

/// Gathers the facts and runs every measurement.
pub fn run(args: &DiagnoseConfig) -> Result<DiagnoseReport, DiagnoseError> {
    if args.concurrency == 0 {
        return Err(DiagnoseError::Invalid(
            "--concurrency must be at least 1".into(),
        ));
    }
    // Read before anything sets it: libtorch's own choice.
    let default_threads = tch::get_num_threads();
    let reader = CgroupReader::default();
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let budget = CpuBudget::detect(&reader, args.cpu_limit, available);
    let facts = BudgetFacts {
        cores: budget.cores,
        source: budget.source.to_string(),
        cgroup_quota_cores: reader.quota_cores().map(|(q, _)| q),
        cpuset_cpus: reader.cpuset_cpus(),
        available_parallelism: available,
        cpu_limit_flag: args.cpu_limit,
    };
    let torch = TorchFacts {
        version: crate::TORCH_VERSION.into(),
        openmp: tch::utils::has_openmp(),
        mkl: tch::utils::has_mkl(),
        mkldnn: tch::utils::has_mkldnn(),
        cuda_devices: tch::Cuda::device_count(),
        default_intra_op_threads: default_threads,
    };
    let env: BTreeMap<String, Option<String>> = THREAD_ENV
        .iter()
        .map(|k| ((*k).to_string(), std::env::var(k).ok()))
        .collect();
    let mut warnings = Vec::new();
    if default_threads as usize > budget.cores {
        warnings.push(format!(
            "libtorch would run {default_threads} intra-op threads per forward on a CPU budget of {} ({}): \
             every concurrent forward oversubscribes the cores",
            budget.cores, budget.source
        ));
    }
    if budget.cores < available {
        warnings.push(format!(
            "the machine shows {available} cores but this process may use {} ({})",
            budget.cores, budget.source
        ));
    }

    let mut spec: ModelSpec = format!("diag={}", args.model)
        .parse()
        .map_err(DiagnoseError::Invalid)?;
    spec.warmup = Some(vec![args.shape.clone()]);
    let model = Arc::new(Model::load(&spec, Device::Cpu)?);
    let plans = if args.plans.is_empty() {
        default_plans(budget.cores)
    } else {
        args.plans.clone()
    };

    let libtorch_alone = plans
        .iter()
        .map(|&p| measure_libtorch(&model, &args.shape, p, budget.cores, args.duration))
        .collect();
    let grpc_alone = Some(measure_echo(args, budget.cores)?);
    let repeats = args.repeats.max(1);
    let mut together = Vec::new();
    for &p in &plans {
        let runs = (0..repeats)
            .map(|_| measure_together(args, p, budget.cores))
            .collect::<Result<Vec<_>, _>>()?;
        together.extend(combine(runs));
    }
    if let (Some(fast), Some(best_fit)) = (
        together
            .iter()
            .filter(|r| r.oversubscribed)
            .max_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps)),
        together
            .iter()
            .filter(|r| !r.oversubscribed)
            .max_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps)),
    ) {
        if fast.throughput_rps > best_fit.throughput_rps {
            warnings.push(format!(
                "the oversubscribed {}x{} plan measured faster than every plan within the budget: \
                 on an idle machine oversubscription only adds contention, so other load was \
                 likely running; repeat on a quiet machine",
                fast.workers, fast.intra_op_threads
            ));
        }
    }
    let (recommendation, no_recommendation) =
        match recommend(&together, args.concurrency, budget.cores) {
            Ok(r) => (Some(r), None),
            Err(why) => (None, Some(why)),
        };
    Ok(DiagnoseReport {
        budget: facts,
        torch,
        env,
        warnings,
        model: args.model.clone(),
        shape: args.shape.clone(),
        libtorch_alone,
        grpc_alone,
        together,
        recommendation,
        no_recommendation,
    })
}

impl DiagnoseReport {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let b = &self.budget;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "none".into());
        s += &format!(
            "CPU budget     {} cores, from {} (cgroup quota {}, cpuset {}, available parallelism {}, --cpu-limit {})\n",
            b.cores,
            b.source,
            opt(b.cgroup_quota_cores.map(|q| format!("{q:.2}"))),
            opt(b.cpuset_cpus.map(|c| c.to_string())),
            b.available_parallelism,
            opt(b.cpu_limit_flag.map(|c| c.to_string())),
        );
        let t = &self.torch;
        s += &format!(
            "libtorch       {} (OpenMP {}, MKL {}, oneDNN {}), CUDA devices {}, default intra-op threads {}\n",
            t.version, t.openmp, t.mkl, t.mkldnn, t.cuda_devices, t.default_intra_op_threads
        );
        s += "environment    ";
        s += &self
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("(unset)")))
            .collect::<Vec<_>>()
            .join(" ");
        s += "\n";
        for w in &self.warnings {
            s += &format!("WARNING        {w}\n");
        }
        s += &format!("\nmodel {} shape {:?}\n", self.model, self.shape);
        s += &format!(
            "{:<20} {:>6} {:>10} {:>8} {:>9} {:>9} {:>8} {:>12} {:>7}\n",
            "measure",
            "WxT",
            "req/s",
            "spread",
            "p50 ms",
            "p99 ms",
            "threads",
            "invol cs/s",
            "errors"
        );
        let rows = self
            .libtorch_alone
            .iter()
            .chain(self.grpc_alone.iter())
            .chain(self.together.iter());
        for r in rows {
            let plan = if r.workers == 0 {
                "-".to_string()
            } else {
                format!(
                    "{}x{}{}",
                    r.workers,
                    r.intra_op_threads,
                    if r.oversubscribed { "!" } else { "" }
                )
            };
            let spread = if r.runs > 1 {
                format!("±{:.0}%", r.spread() * 50.0)
            } else {
                "-".to_string()
            };
            s += &format!(
                "{:<20} {:>6} {:>10.0} {:>8} {:>9.3} {:>9.3} {:>8} {:>12.0} {:>7}\n",
                r.measure,
                plan,
                r.throughput_rps,
                spread,
                r.p50_ms,
                r.p99_ms,
                r.threads,
                r.involuntary_ctx_switches_per_s,
                r.errors
            );
        }
        s += "(! = oversubscribed: workers x intra-op threads > CPU budget)\n";
        match &self.recommendation {
            Some(r) => {
                s += &format!("\nrecommended    {}  ({})\n", r.flags, r.reason);
                s += &format!("  environment  {}\n", r.env);
                s += &format!("  Helm         {}\n", r.helm);
            }
            None => {
                s += &format!(
                    "\nrecommended    nothing: {}\n",
                    self.no_recommendation
                        .as_deref()
                        .unwrap_or("no plan ran cleanly")
                )
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_splits_the_budget_and_shows_the_python_default() {
        let plans = default_plans(4);
        let pairs: Vec<(usize, usize)> = plans
            .iter()
            .map(|p| (p.workers, p.intra_op_threads))
            .collect();
        assert_eq!(pairs, vec![(4, 1), (2, 2), (1, 4), (10, 4)]);
    }

    fn row(w: usize, rps: f64, p99: f64, over: bool) -> Row {
        Row {
            measure: "x".into(),
            workers: w,
            intra_op_threads: 1,
            oversubscribed: over,
            throughput_rps: rps,
            p50_ms: 0.0,
            p99_ms: p99,
            threads: 0,
            involuntary_ctx_switches_per_s: 0.0,
            errors: 0,
            throughput_min: rps,
            throughput_max: rps,
            runs: 3,
        }
    }

    #[test]
    fn recommendation_ignores_oversubscribed_plans_and_prefers_low_p99_among_equals() {
        let rows = [
            row(1, 1000.0, 5.0, false),
            row(2, 990.0, 2.0, false),
            row(10, 5000.0, 1.0, true),
        ];
        let r = recommend(&rows, 16, 2).unwrap();
        assert_eq!(r.workers, 2);
        assert!(r.is_auto && r.reason.contains("auto"), "{}", r.reason);
        assert_eq!(r.env, "SPLITSERVE_WORKERS=2 SPLITSERVE_INTRA_OP_THREADS=1");
        assert!(r.helm.contains("config.workers=2"), "{}", r.helm);
    }

    #[test]
    fn no_recommendation_when_runs_spread_wider_than_the_gap() {
        let mut a = row(1, 1000.0, 2.0, false);
        let mut b = row(2, 1050.0, 1.5, false);
        // Both spread ±20% across runs; they differ by 5%.
        a.throughput_min = 800.0;
        a.throughput_max = 1200.0;
        b.throughput_min = 840.0;
        b.throughput_max = 1260.0;
        let why = recommend(&[a.clone(), b.clone()], 16, 2).unwrap_err();
        assert!(why.contains("disagree"), "{why}");
        // Tight runs: the faster plan is recommended.
        b.throughput_min = 1045.0;
        b.throughput_max = 1055.0;
        a.throughput_min = 995.0;
        a.throughput_max = 1005.0;
        assert_eq!(recommend(&[a, b], 16, 2).unwrap().workers, 2);
    }

    #[test]
    fn plans_parse() {
        assert_eq!(
            "2x3".parse::<PlanShape>().unwrap(),
            PlanShape {
                workers: 2,
                intra_op_threads: 3
            }
        );
        assert!("2x0".parse::<PlanShape>().is_err());
        assert!("two".parse::<PlanShape>().is_err());
    }
}
