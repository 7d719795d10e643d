//! Logging set-up and the process resource sampler behind `monitoring_data` and
//! StreamMonitoring. Called from anywhere; calls nothing back.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global tracing subscriber (stderr). `RUST_LOG` overrides the level.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

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
    gpu_available: bool,
}

impl Sampler {
    pub fn new(gpu_available: bool) -> Sampler {
        Sampler {
            previous: None,
            gpu_available,
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
            gpu_available: self.gpu_available,
        }
    }
}

/// The latest snapshot, refreshed in the background so requests never read /proc.
#[derive(Debug, Clone, Default)]
pub struct SnapshotCache {
    latest: Arc<RwLock<ResourceSnapshot>>,
}

impl SnapshotCache {
    pub fn get(&self) -> ResourceSnapshot {
        *self.latest.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_gpu_available(&self, available: bool) {
        self.latest
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .gpu_available = available;
    }

    /// Refreshes the cache every `every` until the token is cancelled.
    pub fn spawn_refresher(&self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let latest = self.latest.clone();
        tokio::spawn(async move {
            let mut sampler = Sampler::new(false);
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let mut s = sampler.sample();
                        let mut guard = latest.write().unwrap_or_else(|p| p.into_inner());
                        s.gpu_available = guard.gpu_available;
                        *guard = s;
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
        let mut s = Sampler::new(false);
        let a = s.sample();
        // Burn a little CPU so the second reading has something to measure.
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let b = s.sample();
        assert!(a.memory_mb > 1.0, "RSS of a running test is more than 1 MB");
        assert!(
            b.cpu_percent > 10.0,
            "a busy loop shows up as CPU: {}",
            b.cpu_percent
        );
        assert!(b.timestamp >= a.timestamp);
        assert!(thread_count().unwrap() >= 1);
    }
}
