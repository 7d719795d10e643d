//! Readings of the process, its cgroup and the GPUs: /proc, cgroup v1/v2 files,
//! and NVML loaded at run time (no NVML: no GPU readings, no error). Plus the
//! sampler and cache behind `monitoring_data` and StreamMonitoring, and the
//! GPU sampler thread: NVML is initialised and read there only, into a cache
//! that scrapes and handlers read.

use std::sync::{Arc, Mutex, OnceLock, RwLock};
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

/// One GPU's state from NVML, for the CUDA device this process knows it as.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuReading {
    /// The CUDA ordinal (`cuda:N`) in this process, under `CUDA_VISIBLE_DEVICES`.
    pub device: u32,
    /// 0..1 of the last sample period with a kernel running; None where NVML
    /// cannot say (a MIG instance or a GPU in MIG mode, an unsupported board):
    /// absent, not 0.
    pub utilization: Option<f32>,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// This process's own GPU memory, where the driver reports it (not inside
    /// a container whose PIDs the driver does not see).
    pub process_memory_bytes: Option<u64>,
    /// The CUDA caching allocator's bytes allocated to tensors and reserved
    /// from the driver (cached included), where this binary can read them
    /// (telemetry::cuda_memory): the share of the process's memory that is cache.
    pub allocated_bytes: Option<u64>,
    pub reserved_bytes: Option<u64>,
}

/// A [`GpuReading`] with the names that identify the GPU across processes
/// and hosts: what the metrics are labelled with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSample {
    /// NVML's UUID: `GPU-...`, or `MIG-...` for a MIG instance.
    pub uuid: Option<String>,
    /// `domain:bus:device.function`, as `nvidia-smi` and the kubelet show it.
    pub pci_bus_id: Option<String>,
    pub reading: GpuReading,
}

/// What NVML says about one device it sees: a whole GPU (`index` is NVML's
/// index) or a MIG instance of GPU `index`. What the sampler thread fills from
/// NVML, and tests by hand.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NvmlDevice {
    pub index: u32,
    pub uuid: Option<String>,
    pub pci_bus_id: Option<String>,
    /// A MIG instance rather than a whole GPU.
    pub mig_instance: bool,
    /// A whole GPU in MIG mode: its utilization is not any instance's.
    pub mig_mode: bool,
    pub utilization: Option<f32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub process_memory_bytes: Option<u64>,
}

/// Which device NVML shows is CUDA ordinal `ordinal` of this process:
/// `CUDA_VISIBLE_DEVICES` (`visible`) lists indices, `GPU-` UUIDs (or their
/// prefixes) or `MIG-` UUIDs, and CUDA numbers what it lists from 0, stopping
/// at the first entry it cannot read; unset, ordinal N is GPU N. (CUDA orders
/// unlisted GPUs fastest first: on a host with different GPU models set
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID`, which is NVML's order.)
pub fn nvml_device_of<'a>(
    devices: &'a [NvmlDevice],
    ordinal: u32,
    visible: Option<&str>,
) -> Option<&'a NvmlDevice> {
    let whole = |i: u32| devices.iter().find(|d| d.index == i && !d.mig_instance);
    let Some(list) = visible else {
        return whole(ordinal);
    };
    let entry = list.split(',').map(str::trim).nth(ordinal as usize)?;
    // CUDA ignores every entry from the first it cannot read.
    let readable =
        |e: &str| e.parse::<u32>().is_ok() || e.starts_with("GPU-") || e.starts_with("MIG-");
    if !list
        .split(',')
        .map(str::trim)
        .take(ordinal as usize + 1)
        .all(readable)
    {
        return None;
    }
    if let Ok(i) = entry.parse::<u32>() {
        return whole(i);
    }
    let mut matching = devices.iter().filter(|d| {
        d.uuid.as_deref().is_some_and(|u| u.starts_with(entry))
            && d.mig_instance == entry.starts_with("MIG-")
    });
    // A prefix must name one device.
    match (matching.next(), matching.next()) {
        (Some(d), None) => Some(d),
        _ => None,
    }
}

/// The samples of the CUDA devices this process uses (`ordinals`), from what
/// NVML shows: nothing for a GPU it does not use, utilization absent on MIG,
/// and a device NVML cannot read the memory of left out.
pub fn select_gpus(
    devices: &[NvmlDevice],
    ordinals: &[u32],
    visible: Option<&str>,
) -> Vec<GpuSample> {
    ordinals
        .iter()
        .filter_map(|&ordinal| {
            let d = nvml_device_of(devices, ordinal, visible)?;
            Some(GpuSample {
                uuid: d.uuid.clone(),
                pci_bus_id: d.pci_bus_id.clone(),
                reading: GpuReading {
                    device: ordinal,
                    utilization: d.utilization.filter(|_| !d.mig_instance && !d.mig_mode),
                    memory_used_bytes: d.memory_used_bytes?,
                    memory_total_bytes: d.memory_total_bytes?,
                    process_memory_bytes: d.process_memory_bytes,
                    allocated_bytes: None,
                    reserved_bytes: None,
                },
            })
        })
        .collect()
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

/// Every device NVML sees (GPUs, and the MIG instances of GPUs in MIG mode),
/// with this process's memory on each. Blocks on NVML: the sampler thread's.
fn nvml_devices() -> Vec<NvmlDevice> {
    use nvml_wrapper::enums::device::UsedGpuMemory;
    let Some(nvml) = nvml() else {
        return Vec::new();
    };
    let pid = std::process::id();
    let read = |index: u32, dev: &nvml_wrapper::Device<'_>, mig_instance: bool| {
        let mem = dev.memory_info().ok();
        let mig_mode = !mig_instance && dev.mig_mode().is_ok_and(|m| m.current == 1);
        NvmlDevice {
            index,
            uuid: dev.uuid().ok(),
            pci_bus_id: dev.pci_info().ok().map(|p| p.bus_id),
            mig_instance,
            mig_mode,
            utilization: dev.utilization_rates().ok().map(|u| u.gpu as f32 / 100.0),
            memory_used_bytes: mem.as_ref().map(|m| m.used),
            memory_total_bytes: mem.as_ref().map(|m| m.total),
            process_memory_bytes: dev.running_compute_processes().ok().and_then(|ps| {
                ps.iter()
                    .find(|p| p.pid == pid)
                    .and_then(|p| match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b),
                        UsedGpuMemory::Unavailable => None,
                    })
            }),
        }
    };
    let mut out = Vec::new();
    for index in 0..nvml.device_count().unwrap_or(0) {
        let Ok(dev) = nvml.device_by_index(index) else {
            continue;
        };
        let gpu = read(index, &dev, false);
        if gpu.mig_mode {
            for i in 0..dev.mig_device_count().unwrap_or(0) {
                if let Ok(mig) = dev.mig_device_by_index(i) {
                    let mut m = read(index, &mig, true);
                    m.pci_bus_id = gpu.pci_bus_id.clone();
                    out.push(m);
                }
            }
        }
        out.push(gpu);
    }
    out
}

/// The GPU readings scrapes and handlers see, refreshed by the sampler thread.
#[derive(Default)]
struct GpuCache {
    /// CUDA ordinals this process runs models on.
    used: Mutex<Vec<u32>>,
    samples: RwLock<Vec<GpuSample>>,
}

fn gpu_cache() -> &'static GpuCache {
    static CACHE: OnceLock<GpuCache> = OnceLock::new();
    CACHE.get_or_init(GpuCache::default)
}

/// How often the sampler thread reads NVML.
pub const GPU_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Records that this process runs models on these CUDA ordinals, and starts
/// the GPU sampler thread (once per process): it initialises NVML and reads
/// it every [`GPU_SAMPLE_EVERY`] into the cache [`gpu_samples`] reads, so no
/// I/O thread ever waits on NVML.
pub fn use_gpus(ordinals: &[u32]) {
    if ordinals.is_empty() {
        return;
    }
    {
        let mut used = gpu_cache().used.lock().unwrap_or_else(|p| p.into_inner());
        for o in ordinals {
            if !used.contains(o) {
                used.push(*o);
            }
        }
        used.sort_unstable();
    }
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("splitserve-gpu-sampler".into())
            .spawn(|| {
                let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
                loop {
                    let used = gpu_cache()
                        .used
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let mut samples = select_gpus(&nvml_devices(), &used, visible.as_deref());
                    for s in &mut samples {
                        let figures = super::cuda_memory::allocator_bytes(s.reading.device);
                        s.reading.allocated_bytes = figures.map(|(a, _)| a);
                        s.reading.reserved_bytes = figures.map(|(_, r)| r);
                    }
                    *gpu_cache()
                        .samples
                        .write()
                        .unwrap_or_else(|p| p.into_inner()) = samples;
                    std::thread::sleep(GPU_SAMPLE_EVERY);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the GPU sampler thread: no GPU metrics");
        }
    });
}

/// The latest samples of the GPUs this process uses (empty before the
/// sampler's first reading, and without NVML). Never calls NVML.
pub fn gpu_samples() -> Vec<GpuSample> {
    gpu_cache()
        .samples
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
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
            gpu: self.gpu_device.and_then(|d| {
                gpu_samples()
                    .into_iter()
                    .map(|g| g.reading)
                    .find(|g| g.device == d)
            }),
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
