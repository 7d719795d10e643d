//! The CPU budget (cgroup v1/v2, cpuset, the OS) and the thread plan that fits in it.
//!
//! The plan is computed once at start-up; libtorch's global thread settings are
//! applied from it exactly once, before any model loads, on a non-tokio thread.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// `auto` or an explicit positive count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auto {
    #[default]
    Auto,
    Count(usize),
}

impl std::str::FromStr for Auto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Auto::Auto);
        }
        match s.parse::<usize>() {
            Ok(0) => Err("must be at least 1 (or auto)".into()),
            Ok(n) => Ok(Auto::Count(n)),
            Err(_) => Err(format!("expected auto or a positive number, got {s:?}")),
        }
    }
}

/// What the operator asked for; [`ThreadPlan::from_request`] fits it into the
/// CPU budget.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct PlanRequest {
    /// Cores the operator grants (the pod's limits.cpu); None: what the cgroup
    /// and the OS allow.
    pub cpu_limit: Option<f64>,
    /// Threads of the tokio runtime that runs the protocols (never libtorch).
    pub io_threads: usize,
    /// Inference worker threads.
    pub workers: Auto,
    /// libtorch intra-op threads per worker.
    pub intra_op_threads: Auto,
    /// libtorch inter-op threads, shared by all workers.
    pub inter_op_threads: usize,
    /// Start even when workers x intra-op threads exceeds the budget.
    pub allow_oversubscription: bool,
    /// Models run on a CUDA device (`--device cuda`): automatic workers are
    /// at most [`CUDA_WORKERS`].
    #[serde(default)]
    pub cuda: bool,
    /// `--device auto`: the models run on CUDA where it starts, and then
    /// automatic workers are capped as for `--device cuda`.
    #[serde(default)]
    pub auto_device: bool,
}

/// Automatic workers on a CUDA device: every worker's forwards share one CUDA
/// stream, so more workers only queue there (each with its own cuBLAS
/// workspace and activations in device memory); two keep the GPU fed while
/// one worker converts and copies.
pub const CUDA_WORKERS: usize = 2;

/// Why automatic workers are capped at [`CUDA_WORKERS`], or None: with
/// `--workers auto`, `--device cuda`, or `--device auto` where CUDA starts
/// (`cuda_starts` is asked only then). What the start-up log line says.
pub fn cuda_workers_reason(
    r: &PlanRequest,
    cuda_starts: impl FnOnce() -> bool,
) -> Option<&'static str> {
    if r.workers != Auto::Auto {
        None
    } else if r.cuda {
        Some("--device cuda")
    } else if r.auto_device && cuda_starts() {
        Some("--device auto found a CUDA device")
    } else {
        None
    }
}

/// Whether libtorch can start CUDA in this process (the answer `--device
/// auto` gets).
pub fn cuda_starts() -> bool {
    tch::Cuda::is_available()
}

impl Default for PlanRequest {
    fn default() -> Self {
        PlanRequest {
            cpu_limit: None,
            io_threads: 2,
            workers: Auto::Auto,
            intra_op_threads: Auto::Auto,
            inter_op_threads: 1,
            allow_oversubscription: false,
            cuda: false,
            auto_device: false,
        }
    }
}

/// Where the binding CPU limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSource {
    /// cgroup v2 `cpu.max` quota/period.
    CgroupCpuMax,
    /// cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`.
    CgroupCfsQuota,
    /// The cpuset the process may run on.
    Cpuset,
    /// `--cpu-limit` (the pod's limits.cpu through the downward API).
    CpuLimitFlag,
    /// What the OS reports as available parallelism (affinity mask, cores).
    AvailableParallelism,
}

impl fmt::Display for BudgetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetSource::CgroupCpuMax => "cgroup cpu.max",
            BudgetSource::CgroupCfsQuota => "cgroup cpu.cfs_quota_us",
            BudgetSource::Cpuset => "cpuset",
            BudgetSource::CpuLimitFlag => "--cpu-limit",
            BudgetSource::AvailableParallelism => "available parallelism",
        })
    }
}

/// Whole cores this process may keep busy, and which limit set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CpuBudget {
    pub cores: usize,
    pub source: BudgetSource,
}

/// Reads cgroup files under a root, so tests can point it at a fake tree.
#[derive(Debug, Clone)]
pub struct CgroupReader {
    root: PathBuf,
}

impl Default for CgroupReader {
    fn default() -> Self {
        CgroupReader {
            root: PathBuf::from("/"),
        }
    }
}

impl CgroupReader {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        CgroupReader { root: root.into() }
    }

    fn read(&self, rel: impl AsRef<Path>) -> Option<String> {
        fs::read_to_string(self.root.join(rel)).ok()
    }

    /// This process's cgroup paths: (v2 path, v1 cpu path, v1 cpuset path).
    fn own_paths(&self) -> (Option<String>, Option<String>, Option<String>) {
        let (mut v2, mut cpu, mut cpuset) = (None, None, None);
        for line in self.read("proc/self/cgroup").unwrap_or_default().lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && ctrls.is_empty() {
                v2 = Some(path.to_string());
            }
            for c in ctrls.split(',') {
                match c {
                    "cpu" => cpu = Some(path.to_string()),
                    "cpuset" => cpuset = Some(path.to_string()),
                    _ => {}
                }
            }
        }
        (v2, cpu, cpuset)
    }

    /// The directory of a cgroup path under a mount, and each ancestor up to the mount.
    /// Inside a container the path is often "/" while the files sit at the mount.
    fn dirs(&self, mount: &str, path: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut p = PathBuf::from(path.trim_start_matches('/'));
        loop {
            out.push(Path::new(mount).join(&p));
            if !p.pop() {
                break;
            }
        }
        out
    }

    /// CPU quota in cores (fractional), the tightest along the hierarchy.
    pub fn quota_cores(&self) -> Option<(f64, BudgetSource)> {
        let (v2, cpu, _) = self.own_paths();
        let mut best: Option<(f64, BudgetSource)> = None;
        let mut consider = |cores: f64, src| {
            if best.is_none_or(|(b, _)| cores < b) {
                best = Some((cores, src));
            }
        };
        if let Some(path) = v2 {
            for dir in self.dirs("sys/fs/cgroup", &path) {
                if let Some(text) = self.read(dir.join("cpu.max")) {
                    let mut it = text.split_whitespace();
                    if let (Some(q), Some(p)) = (it.next(), it.next()) {
                        if let (Ok(q), Ok(p)) = (q.parse::<f64>(), p.parse::<f64>()) {
                            if q > 0.0 && p > 0.0 {
                                consider(q / p, BudgetSource::CgroupCpuMax);
                            }
                        }
                    }
                }
            }
        }
        if let Some(path) = cpu {
            for mount in ["sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpu"] {
                for dir in self.dirs(mount, &path) {
                    let q = self.read(dir.join("cpu.cfs_quota_us"));
                    let p = self.read(dir.join("cpu.cfs_period_us"));
                    if let (Some(q), Some(p)) = (q, p) {
                        if let (Ok(q), Ok(p)) = (q.trim().parse::<f64>(), p.trim().parse::<f64>()) {
                            if q > 0.0 && p > 0.0 {
                                consider(q / p, BudgetSource::CgroupCfsQuota);
                            }
                        }
                    }
                }
            }
        }
        best
    }

    /// CPUs in the effective cpuset, if a cgroup reports one.
    pub fn cpuset_cpus(&self) -> Option<usize> {
        let (v2, _, cpuset) = self.own_paths();
        let mut candidates = Vec::new();
        if let Some(path) = v2 {
            for dir in self.dirs("sys/fs/cgroup", &path) {
                candidates.push(dir.join("cpuset.cpus.effective"));
            }
        }
        if let Some(path) = cpuset {
            for dir in self.dirs("sys/fs/cgroup/cpuset", &path) {
                candidates.push(dir.join("cpuset.effective_cpus"));
                candidates.push(dir.join("cpuset.cpus"));
            }
        }
        candidates
            .into_iter()
            .filter_map(|p| self.read(p))
            .find_map(|text| count_cpu_list(text.trim()))
    }
}

/// Counts a Linux CPU list such as `0-3,8,10-11`; None when empty or malformed.
pub fn count_cpu_list(list: &str) -> Option<usize> {
    if list.is_empty() {
        return None;
    }
    let mut n = 0usize;
    for part in list.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                if b < a {
                    return None;
                }
                n += b - a + 1;
            }
            None => {
                part.parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    Some(n)
}

impl CpuBudget {
    /// The smallest of every limit that applies, rounded up to whole cores.
    pub fn detect(reader: &CgroupReader, cpu_limit: Option<f64>, available: usize) -> CpuBudget {
        let mut budget = CpuBudget {
            cores: available.max(1),
            source: BudgetSource::AvailableParallelism,
        };
        let mut consider = |cores: usize, source| {
            let cores = cores.max(1);
            if cores < budget.cores {
                budget = CpuBudget { cores, source };
            }
        };
        if let Some((q, src)) = reader.quota_cores() {
            consider(q.ceil() as usize, src);
        }
        if let Some(n) = reader.cpuset_cpus() {
            consider(n, BudgetSource::Cpuset);
        }
        if let Some(limit) = cpu_limit {
            consider(limit.ceil() as usize, BudgetSource::CpuLimitFlag);
        }
        budget
    }

    /// The budget of this process on this machine.
    pub fn of_this_process(cpu_limit: Option<f64>) -> CpuBudget {
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        CpuBudget::detect(&CgroupReader::default(), cpu_limit, available)
    }
}

/// How many threads of each kind the process runs. W x T never exceeds the budget
/// unless the operator said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ThreadPlan {
    pub budget: CpuBudget,
    /// tokio runtime threads: gRPC I/O, decode, encode.
    pub io_threads: usize,
    /// Dedicated inference threads (W).
    pub workers: usize,
    /// libtorch intra-op threads per forward (T).
    pub intra_op_threads: usize,
    /// libtorch inter-op pool, shared.
    pub inter_op_threads: usize,
    /// W x T > budget, allowed by --allow-oversubscription.
    pub oversubscribed: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error(
        "{workers} workers x {intra} intra-op threads = {total} > CPU budget {budget} ({from}); \
         lower --workers or --intra-op-threads, or pass --allow-oversubscription"
    )]
    Oversubscribed {
        workers: usize,
        intra: usize,
        total: usize,
        budget: usize,
        from: BudgetSource,
    },
}

impl ThreadPlan {
    /// Picks W and T for the budget. Both auto: one single-threaded worker per core,
    /// which keeps every core busy with independent requests (intra-op threads only
    /// pay off on large single requests; ask for them explicitly).
    pub fn new(
        budget: CpuBudget,
        io_threads: usize,
        workers: Auto,
        intra: Auto,
        inter_op_threads: usize,
        allow_oversubscription: bool,
    ) -> Result<ThreadPlan, PlanError> {
        let b = budget.cores;
        let (w, t) = match (workers, intra) {
            (Auto::Auto, Auto::Auto) => (b, 1),
            (Auto::Count(w), Auto::Auto) => (w, (b / w).max(1)),
            (Auto::Auto, Auto::Count(t)) => ((b / t).max(1), t),
            (Auto::Count(w), Auto::Count(t)) => (w, t),
        };
        let total = w.saturating_mul(t);
        let oversubscribed = total > b;
        if oversubscribed && !allow_oversubscription {
            return Err(PlanError::Oversubscribed {
                workers: w,
                intra: t,
                total,
                budget: b,
                from: budget.source,
            });
        }
        Ok(ThreadPlan {
            budget,
            io_threads,
            workers: w,
            intra_op_threads: t,
            inter_op_threads,
            oversubscribed,
        })
    }

    /// The plan for a request, in this process's CPU budget.
    pub fn from_request(r: &PlanRequest) -> Result<ThreadPlan, PlanError> {
        ThreadPlan::fit(r, CpuBudget::of_this_process(r.cpu_limit), cuda_starts)
    }

    /// The plan for a request in a given budget.
    fn fit(
        r: &PlanRequest,
        budget: CpuBudget,
        cuda_starts: impl FnOnce() -> bool,
    ) -> Result<ThreadPlan, PlanError> {
        ThreadPlan::new(
            budget,
            r.io_threads,
            match cuda_workers_reason(r, cuda_starts) {
                Some(_) => Auto::Count(CUDA_WORKERS.min(budget.cores).max(1)),
                None => r.workers,
            },
            r.intra_op_threads,
            r.inter_op_threads,
            r.allow_oversubscription,
        )
    }

    /// Threads the plan accounts for (main + io + workers with their intra-op
    /// helpers + inter-op pool).
    pub fn planned_threads(&self) -> usize {
        1 + self.io_threads + self.workers * self.intra_op_threads + self.inter_op_threads
    }

    /// Sets libtorch's global thread counts, once per process. Must run before any
    /// model loads and never on a tokio thread. Returns the plan actually in force:
    /// this plan's workers and io threads with the thread counts libtorch runs
    /// with (the first ones applied, if the process already applied a plan).
    pub fn apply_to_libtorch(&self) -> ThreadPlan {
        static APPLIED: OnceLock<ThreadPlan> = OnceLock::new();
        let applied = *APPLIED.get_or_init(|| {
            tch::set_num_threads(self.intra_op_threads as i32);
            tch::set_num_interop_threads(self.inter_op_threads as i32);
            *self
        });
        if applied.intra_op_threads != self.intra_op_threads
            || applied.inter_op_threads != self.inter_op_threads
        {
            tracing::warn!(
                applied_intra = applied.intra_op_threads,
                applied_inter = applied.inter_op_threads,
                "libtorch thread counts were already set in this process; keeping them"
            );
        }
        ThreadPlan {
            intra_op_threads: applied.intra_op_threads,
            inter_op_threads: applied.inter_op_threads,
            ..*self
        }
    }

    /// Pins this thread's OpenMP and MKL pools to the plan's intra-op count. Each
    /// inference thread calls it once before its first forward: libtorch records
    /// the count globally, but OpenMP's and MKL's counts are per thread, and an
    /// MKL GEMM (a batched forward) that runs before libtorch's own lazy per-thread
    /// set-up would size its pool from the machine and oversubscribe the budget.
    pub fn pin_this_thread(applied: &ThreadPlan) {
        tch::set_num_threads(applied.intra_op_threads as i32);
    }
}

impl fmt::Display for ThreadPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} workers x {} intra-op threads (CPU budget {} from {}), {} io threads, {} inter-op threads{}",
            self.workers,
            self.intra_op_threads,
            self.budget.cores,
            self.budget.source,
            self.io_threads,
            self.inter_op_threads,
            if self.oversubscribed {
                ", OVERSUBSCRIBED"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        for (path, text) in files {
            let p = d.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        d
    }

    /// A throwaway directory without another dependency.
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicUsize, Ordering};
        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "splitserve-plan-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn cgroup_v2_quota_rounds_up_and_wins() {
        let d = tree(&[
            ("proc/self/cgroup", "0::/kubepods/pod1/ctr\n"),
            ("sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", "150000 100000\n"),
            ("sys/fs/cgroup/kubepods/cpu.max", "max 100000\n"),
        ]);
        let b = CpuBudget::detect(&CgroupReader::at(d.path()), None, 64);
        assert_eq!(
            b,
            CpuBudget {
                cores: 2,
                source: BudgetSource::CgroupCpuMax
            }
        );
    }

    #[test]
    fn cgroup_v2_parent_limit_applies_to_children() {
        let d = tree(&[
            ("proc/self/cgroup", "0::/a/b\n"),
            ("sys/fs/cgroup/a/b/cpu.max", "max 100000\n"),
            ("sys/fs/cgroup/a/cpu.max", "300000 100000\n"),
        ]);
        let b = CpuBudget::detect(&CgroupReader::at(d.path()), None, 64);
        assert_eq!(b.cores, 3);
    }

    #[test]
    fn cgroup_v2_in_container_namespace_reads_the_mount() {
        let d = tree(&[
            ("proc/self/cgroup", "0::/\n"),
            ("sys/fs/cgroup/cpu.max", "400000 100000\n"),
            ("sys/fs/cgroup/cpuset.cpus.effective", "0-7\n"),
        ]);
        let b = CpuBudget::detect(&CgroupReader::at(d.path()), None, 64);
        assert_eq!(
            b,
            CpuBudget {
                cores: 4,
                source: BudgetSource::CgroupCpuMax
            }
        );
    }

    #[test]
    fn cgroup_v1_quota_and_cpuset() {
        let d = tree(&[
            (
                "proc/self/cgroup",
                "11:cpuset:/docker/x\n4:cpu,cpuacct:/docker/x\n1:name=systemd:/docker/x\n",
            ),
            (
                "sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_quota_us",
                "600000\n",
            ),
            (
                "sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_period_us",
                "100000\n",
            ),
            ("sys/fs/cgroup/cpuset/docker/x/cpuset.cpus", "0-1,4,6-7\n"),
        ]);
        let b = CpuBudget::detect(&CgroupReader::at(d.path()), None, 64);
        assert_eq!(
            b,
            CpuBudget {
                cores: 5,
                source: BudgetSource::Cpuset
            }
        );
    }

    #[test]
    fn cgroup_v1_unlimited_quota_is_ignored() {
        let d = tree(&[
            ("proc/self/cgroup", "4:cpu,cpuacct:/\n"),
            ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n"),
            ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
        ]);
        let b = CpuBudget::detect(&CgroupReader::at(d.path()), None, 12);
        assert_eq!(
            b,
            CpuBudget {
                cores: 12,
                source: BudgetSource::AvailableParallelism
            }
        );
    }

    #[test]
    fn cpu_limit_flag_and_no_cgroup() {
        let d = tree(&[]);
        let b = CpuBudget::detect(&CgroupReader::at(d.path()), Some(2.5), 16);
        assert_eq!(
            b,
            CpuBudget {
                cores: 3,
                source: BudgetSource::CpuLimitFlag
            }
        );
        let b = CpuBudget::detect(&CgroupReader::at(d.path()), Some(0.1), 16);
        assert_eq!(b.cores, 1);
    }

    #[test]
    fn cpu_lists_count() {
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("5"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }

    fn budget(cores: usize) -> CpuBudget {
        CpuBudget {
            cores,
            source: BudgetSource::CgroupCpuMax,
        }
    }

    #[test]
    fn auto_plans_fit_the_budget() {
        let p = ThreadPlan::new(budget(8), 2, Auto::Auto, Auto::Auto, 1, false).unwrap();
        assert_eq!((p.workers, p.intra_op_threads), (8, 1));
        let p = ThreadPlan::new(budget(8), 2, Auto::Count(2), Auto::Auto, 1, false).unwrap();
        assert_eq!((p.workers, p.intra_op_threads), (2, 4));
        let p = ThreadPlan::new(budget(8), 2, Auto::Auto, Auto::Count(3), 1, false).unwrap();
        assert_eq!((p.workers, p.intra_op_threads), (2, 3));
        let p = ThreadPlan::new(budget(1), 2, Auto::Count(4), Auto::Auto, 1, false);
        assert!(p.is_err(), "4 workers on 1 core oversubscribes even at T=1");
    }

    #[test]
    fn oversubscription_is_refused_with_the_numbers() {
        let err =
            ThreadPlan::new(budget(2), 2, Auto::Count(4), Auto::Count(8), 1, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "4 workers x 8 intra-op threads = 32 > CPU budget 2 (cgroup cpu.max); \
             lower --workers or --intra-op-threads, or pass --allow-oversubscription"
        );
        let p = ThreadPlan::new(budget(2), 2, Auto::Count(4), Auto::Count(8), 1, true).unwrap();
        assert!(p.oversubscribed);
    }

    #[test]
    fn auto_workers_on_cuda_are_few() {
        let r = |workers, cuda| PlanRequest {
            workers,
            cuda,
            ..PlanRequest::default()
        };
        let no_gpu = || false;
        let cpu = ThreadPlan::fit(&r(Auto::Auto, false), budget(8), no_gpu).unwrap();
        assert_eq!((cpu.workers, cpu.intra_op_threads), (8, 1));
        // The cores go to each worker's intra-op threads instead.
        let cuda = ThreadPlan::fit(&r(Auto::Auto, true), budget(8), no_gpu).unwrap();
        assert_eq!((cuda.workers, cuda.intra_op_threads), (CUDA_WORKERS, 4));
        let one_core = ThreadPlan::fit(&r(Auto::Auto, true), budget(1), no_gpu).unwrap();
        assert_eq!(one_core.workers, 1);
        let asked = ThreadPlan::fit(&r(Auto::Count(3), true), budget(8), no_gpu).unwrap();
        assert_eq!(asked.workers, 3, "an explicit --workers wins");
    }

    /// `--device auto` plans for the device it will get: few workers where
    /// CUDA starts, one per core where it does not; and says why.
    #[test]
    fn auto_device_on_a_cuda_host_gets_few_workers_and_a_reason() {
        let auto = |workers| PlanRequest {
            workers,
            auto_device: true,
            ..PlanRequest::default()
        };
        let gpu_host = ThreadPlan::fit(&auto(Auto::Auto), budget(16), || true).unwrap();
        assert_eq!(
            (gpu_host.workers, gpu_host.intra_op_threads),
            (CUDA_WORKERS, 8)
        );
        assert_eq!(
            cuda_workers_reason(&auto(Auto::Auto), || true),
            Some("--device auto found a CUDA device")
        );
        let cpu_host = ThreadPlan::fit(&auto(Auto::Auto), budget(16), || false).unwrap();
        assert_eq!((cpu_host.workers, cpu_host.intra_op_threads), (16, 1));
        assert_eq!(cuda_workers_reason(&auto(Auto::Auto), || false), None);
        // An explicit --workers wins, and CUDA is not even asked.
        let asked = ThreadPlan::fit(&auto(Auto::Count(6)), budget(16), || {
            panic!("CUDA asked about for an explicit --workers")
        })
        .unwrap();
        assert_eq!(asked.workers, 6);
        // --device cpu never asks either.
        let cpu = PlanRequest {
            workers: Auto::Auto,
            ..PlanRequest::default()
        };
        assert_eq!(
            cuda_workers_reason(&cpu, || panic!("CUDA asked about for --device cpu")),
            None
        );
    }
}
