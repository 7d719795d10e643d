//! Readings of the process, its cgroup and the GPUs: /proc, cgroup v1/v2 files,
//! and NVML loaded at run time (no NVML: no GPU readings, no error). Plus the
//! sampler and cache behind `monitoring_data` and StreamMonitoring.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One resource reading, in the units splitlearn_comm's MonitoringSnapshot uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResourceSnapshot {
    /// Seconds since the Unix epoch.
    pub timestamp: f64,
    /// CPU time over wall time since the previous reading, x100 (can exceed 100).
    pub cpu_percent: f32,
    pub memory_mb: f32,
    pub memory_percent: f32,
    pub gpu_available: bool,
    /// The model device's readings, where NVML reports them.
    pub gpu: Option<GpuReading>,
}

/// One GPU's state from NVML.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    /// 0..1 of the last sample period with a kernel running; None where NVML
    /// cannot say (a MIG instance, an unsupported board): absent, not 0.
    pub utilization: Option<f32>,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// This process's own GPU memory, where the driver reports it.
    pub process_memory_bytes: Option<u64>,
}

/// NVML, initialised once on first use; None where there is no NVIDIA driver.
fn nvml() -> Option<&'static nvml_wrapper::Nvml> {
    static NVML: OnceLock<Option<nvml_wrapper::Nvml>> = OnceLock::new();
    NVML.get_or_init(|| nvml_wrapper::Nvml::init().ok())
        .as_ref()
}

/// Whether libtorch's CUDA library is loaded in this process: a CUDA build
/// (libtorch's own `hasCUDA` is false on a CUDA build without a device).
pub fn cuda_build() -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|m| m.contains("libtorch_cuda"))
}

/// Why CUDA cannot start in this process, for a log line or a refusal:
/// `cuda_build` says whether libtorch was built with CUDA ([`cuda_build`]); the
/// rest comes from the environment and the NVIDIA driver as NVML sees it.
pub fn cuda_unavailable_reason(cuda_build: bool) -> String {
    if !cuda_build {
        return "this libtorch is built without CUDA (a CPU build)".into();
    }
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let hidden = match visible.as_deref() {
        Some(v) if v.trim().is_empty() || v.trim() == "-1" || v.eq_ignore_ascii_case("none") => {
            format!("; CUDA_VISIBLE_DEVICES={v:?} hides every GPU")
        }
        Some(v) => format!("; CUDA_VISIBLE_DEVICES={v:?}"),
        None => String::new(),
    };
    let Some(nvml) = nvml() else {
        return format!(
            "no NVIDIA driver is visible (NVML cannot load): not a GPU node, or the container \
             runs without the NVIDIA container runtime{hidden}"
        );
    };
    let driver = nvml.sys_driver_version().unwrap_or_else(|_| "?".into());
    let cuda = nvml.sys_cuda_driver_version().map_or_else(
        |_| "?".into(),
        |v| format!("{}.{}", v / 1000, v % 1000 / 10),
    );
    match nvml.device_count() {
        Ok(0) | Err(_) => format!("the NVIDIA driver {driver} sees no GPU{hidden}"),
        Ok(n) => format!(
            "the NVIDIA driver {driver} (CUDA {cuda} at most) sees {n} GPU(s) but CUDA does not \
             start: a driver older than this build's CUDA runtime needs (see the image's \
             requirements), or a device the container may not open{hidden}"
        ),
    }
}

/// Every GPU NVML sees, with this process's memory on each.
pub fn gpu_readings() -> Vec<GpuReading> {
    let Some(nvml) = nvml() else {
        return Vec::new();
    };
    let pid = std::process::id();
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|index| {
            let dev = nvml.device_by_index(index).ok()?;
            let mem = dev.memory_info().ok()?;
            let utilization = dev.utilization_rates().ok().map(|u| u.gpu as f32 / 100.0);
            let process_memory_bytes = dev.running_compute_processes().ok().and_then(|ps| {
                ps.iter()
                    .find(|p| p.pid == pid)
                    .and_then(|p| match p.used_gpu_memory {
                        nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                        nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                    })
            });
            Some(GpuReading {
                index,
                utilization,
                memory_used_bytes: mem.used,
                memory_total_bytes: mem.total,
                process_memory_bytes,
            })
        })
        .collect()
}

/// Sum of a `Key: value` counter over every thread of a process (`pid` is a
/// number or "self"). Threads report their own context switches; the process
/// line covers only the leader.
pub fn task_counter_sum(pid: &str, key: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim_start_matches(':').trim().parse::<u64>().ok())
            })
            .sum(),
    )
}

/// CPU throttling the cgroup reports: (throttled seconds, throttled periods).
/// None outside a cgroup that reports them.
pub fn cgroup_throttling() -> Option<(f64, u64)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut candidates = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if id == "0" && ctrls.is_empty() {
            candidates.push((format!("/sys/fs/cgroup/{rel}/cpu.stat"), true));
            candidates.push(("/sys/fs/cgroup/cpu.stat".to_string(), true));
        } else if ctrls.split(',').any(|c| c == "cpu") {
            for mount in ["cpu,cpuacct", "cpu"] {
                candidates.push((format!("/sys/fs/cgroup/{mount}/{rel}/cpu.stat"), false));
                candidates.push((format!("/sys/fs/cgroup/{mount}/cpu.stat"), false));
            }
        }
    }
    candidates.into_iter().find_map(|(path, v2)| {
        let text = std::fs::read_to_string(path).ok()?;
        let field = |k: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(k)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        };
        let periods = field("nr_throttled")?;
        let seconds = if v2 {
            field("throttled_usec")? as f64 / 1e6
        } else {
            field("throttled_time")? as f64 / 1e9
        };
        Some((seconds, periods))
    })
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux ABI splitserve targets.
    Some((utime + stime) / 100.0)
}

/// A `Key:   value kB` line of a /proc status-style file, in bytes.
fn proc_kb(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
}

/// Resident set size of this process in bytes.
pub fn resident_bytes() -> Option<u64> {
    proc_kb("/proc/self/status", "VmRSS")
}

/// Threads of this process right now.
pub fn thread_count() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

fn total_memory_bytes() -> Option<u64> {
    proc_kb("/proc/meminfo", "MemTotal")
}

/// Takes readings and remembers the previous CPU time so the next one has a rate.
#[derive(Debug)]
pub struct Sampler {
    previous: Option<(Instant, f64)>,
    /// The CUDA device the models run on, if any.
    gpu_device: Option<u32>,
}

impl Sampler {
    pub fn new(gpu_device: Option<u32>) -> Sampler {
        Sampler {
            previous: None,
            gpu_device,
        }
    }

    pub fn sample(&mut self) -> ResourceSnapshot {
        let now = Instant::now();
        let cpu = process_cpu_seconds().unwrap_or(0.0);
        let cpu_percent = match self.previous {
            Some((then, before)) if now > then => {
                ((cpu - before) / now.duration_since(then).as_secs_f64() * 100.0) as f32
            }
            _ => 0.0,
        };
        self.previous = Some((now, cpu));
        let rss = resident_bytes().unwrap_or(0);
        let total = total_memory_bytes().unwrap_or(0);
        ResourceSnapshot {
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            cpu_percent: cpu_percent.max(0.0),
            memory_mb: rss as f32 / (1024.0 * 1024.0),
            memory_percent: if total > 0 {
                rss as f32 / total as f32 * 100.0
            } else {
                0.0
            },
            gpu_available: self.gpu_device.is_some(),
            gpu: self
                .gpu_device
                .and_then(|d| gpu_readings().into_iter().find(|g| g.index == d)),
        }
    }
}

/// The latest snapshot, refreshed in the background so requests never read /proc.
#[derive(Debug, Clone, Default)]
pub struct SnapshotCache {
    latest: Arc<RwLock<ResourceSnapshot>>,
    gpu_device: Arc<RwLock<Option<u32>>>,
}

impl SnapshotCache {
    pub fn get(&self) -> ResourceSnapshot {
        *self.latest.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The CUDA device whose readings snapshots carry, once the models are placed.
    pub fn set_gpu_device(&self, device: Option<u32>) {
        *self.gpu_device.write().unwrap_or_else(|p| p.into_inner()) = device;
    }

    pub fn gpu_device(&self) -> Option<u32> {
        *self.gpu_device.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Refreshes the cache every `every` until the token is cancelled.
    pub fn spawn_refresher(&self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut sampler = Sampler::new(None);
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        sampler.gpu_device = cache.gpu_device();
                        let s = sampler.sample();
                        *cache.latest.write().unwrap_or_else(|p| p.into_inner()) = s;
                    }
                }
            }
        });
    }
}

/// The UUID NVML gives GPU `index` ("GPU-..."), as Triton labels its GPU families.
pub fn gpu_uuid(index: u32) -> Option<String> {
    nvml()?.device_by_index(index).ok()?.uuid().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_come_from_proc() {
        let mut s = Sampler::new(None);
        let started = Instant::now();
        let a = s.sample();
        let cpu_before = process_cpu_seconds().unwrap();
        // Burn 100 ms of CPU time, measured, however long that takes on a
        // busy machine, so the second reading has something to measure.
        let mut x = 0u64;
        while process_cpu_seconds().unwrap() - cpu_before < 0.1 {
            for _ in 0..10_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no CPU time in 120 s"
            );
        }
        std::hint::black_box(x);
        let b = s.sample();
        let wall = started.elapsed().as_secs_f64();
        assert!(a.memory_mb > 1.0, "RSS of a running test is more than 1 MB");
        // At least the 0.1 s burnt (less one 10 ms tick of /proc's resolution)
        // over at most the wall time that passed between the readings.
        let least = (0.09 / wall * 100.0) as f32;
        assert!(
            b.cpu_percent >= least,
            "100 ms of CPU in {wall:.3} s shows as {}%, below {least}%",
            b.cpu_percent
        );
        assert!(b.timestamp >= a.timestamp);
        assert!(thread_count().unwrap() >= 1);
        assert!(!b.gpu_available && b.gpu.is_none());
        let switches = task_counter_sum("self", "voluntary_ctxt_switches").unwrap();
        assert!(switches > 0, "a test process has switched at least once");
    }
}
