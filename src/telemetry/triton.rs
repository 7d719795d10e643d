//! Triton Inference Server's metric families (`nv_*`), beside splitserve's own
//! in the same registry: dashboards, alerts and autoscalers written for Triton
//! read splitserve unchanged. Names, label names, types and units are
//! Triton's (its user guide, docs/user_guide/metrics.md); docs/observability.md
//! pairs each with the `splitserve_*` family it mirrors.
//!
//! Per-model families carry `model` and `version` and are updated where the
//! engine answers a request ([`TritonModel`]); the pending count, CPU and GPU
//! families are read just before each scrape.

use std::sync::Mutex;

use prometheus::{Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

/// (name, type, labels) of every family this module registers: Triton's
/// published list, less what splitserve has no reading for (power, energy,
/// response cache, summaries).
pub const FAMILIES: [(&str, &str, &[&str]); 16] = [
    (
        "nv_inference_request_success",
        "counter",
        &["model", "version"],
    ),
    (
        "nv_inference_request_failure",
        "counter",
        &["model", "version"],
    ),
    ("nv_inference_count", "counter", &["model", "version"]),
    ("nv_inference_exec_count", "counter", &["model", "version"]),
    (
        "nv_inference_request_duration_us",
        "counter",
        &["model", "version"],
    ),
    (
        "nv_inference_queue_duration_us",
        "counter",
        &["model", "version"],
    ),
    (
        "nv_inference_compute_input_duration_us",
        "counter",
        &["model", "version"],
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "counter",
        &["model", "version"],
    ),
    (
        "nv_inference_compute_output_duration_us",
        "counter",
        &["model", "version"],
    ),
    (
        "nv_inference_pending_request_count",
        "gauge",
        &["model", "version"],
    ),
    ("nv_gpu_utilization", "gauge", &["gpu_uuid"]),
    ("nv_gpu_memory_total_bytes", "gauge", &["gpu_uuid"]),
    ("nv_gpu_memory_used_bytes", "gauge", &["gpu_uuid"]),
    ("nv_cpu_utilization", "gauge", &[]),
    ("nv_cpu_memory_total_bytes", "gauge", &[]),
    ("nv_cpu_memory_used_bytes", "gauge", &[]),
];

/// The `nv_*` families.
pub struct TritonMetrics {
    pub request_success: IntCounterVec,
    pub request_failure: IntCounterVec,
    pub inference_count: IntCounterVec,
    pub exec_count: IntCounterVec,
    pub request_duration_us: IntCounterVec,
    pub queue_duration_us: IntCounterVec,
    pub compute_input_duration_us: IntCounterVec,
    pub compute_infer_duration_us: IntCounterVec,
    pub compute_output_duration_us: IntCounterVec,
    /// Requests in a model version's queue, set before each scrape.
    pub pending_request_count: IntGaugeVec,
    gpu_utilization: GaugeVec,
    gpu_memory_total: GaugeVec,
    gpu_memory_used: GaugeVec,
    cpu_utilization: Gauge,
    cpu_memory_total: IntGauge,
    cpu_memory_used: IntGauge,
    /// /proc/stat's (busy, total) jiffies at the previous scrape: utilization
    /// is over the time since then, as Triton's is over its interval.
    last_cpu: Mutex<Option<(u64, u64)>>,
}

/// One model version's handles, resolved once so workers never look labels up.
#[derive(Clone)]
pub struct TritonModel {
    pub success: IntCounter,
    pub failure: IntCounter,
    pub inferences: IntCounter,
    pub executions: IntCounter,
    pub request_us: IntCounter,
    pub queue_us: IntCounter,
    pub input_us: IntCounter,
    pub infer_us: IntCounter,
    pub output_us: IntCounter,
}

/// Where one successful request's time went, for [`TritonModel::success`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTimes {
    pub request: std::time::Duration,
    pub queue: std::time::Duration,
    pub input: std::time::Duration,
    pub infer: std::time::Duration,
    pub output: std::time::Duration,
}

impl TritonModel {
    /// A request answered with outputs: `inferences` is its batch size.
    pub fn succeeded(&self, inferences: u64, t: RequestTimes) {
        let us = |d: std::time::Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.success.inc();
        self.inferences.inc_by(inferences);
        self.request_us.inc_by(us(t.request));
        self.queue_us.inc_by(us(t.queue));
        self.input_us.inc_by(us(t.input));
        self.infer_us.inc_by(us(t.infer));
        self.output_us.inc_by(us(t.output));
    }
}

fn per_model(name: &str, help: &str) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), &["model", "version"])
}

fn per_gpu(name: &str, help: &str) -> Result<GaugeVec, prometheus::Error> {
    GaugeVec::new(Opts::new(name, help), &["gpu_uuid"])
}

impl TritonMetrics {
    pub fn new() -> Result<TritonMetrics, prometheus::Error> {
        Ok(TritonMetrics {
            request_success: per_model(
                "nv_inference_request_success",
                "Number of successful inference requests, all batch sizes",
            )?,
            request_failure: per_model(
                "nv_inference_request_failure",
                "Number of failed inference requests, all batch sizes",
            )?,
            inference_count: per_model(
                "nv_inference_count",
                "Number of inferences performed (does not include cached requests)",
            )?,
            exec_count: per_model(
                "nv_inference_exec_count",
                "Number of model executions performed (does not include cached requests)",
            )?,
            request_duration_us: per_model(
                "nv_inference_request_duration_us",
                "Cumulative inference request duration in microseconds (includes cached requests)",
            )?,
            queue_duration_us: per_model(
                "nv_inference_queue_duration_us",
                "Cumulative inference queuing duration in microseconds (includes cached requests)",
            )?,
            compute_input_duration_us: per_model(
                "nv_inference_compute_input_duration_us",
                "Cumulative compute input duration in microseconds (does not include cached requests)",
            )?,
            compute_infer_duration_us: per_model(
                "nv_inference_compute_infer_duration_us",
                "Cumulative compute inference duration in microseconds (does not include cached requests)",
            )?,
            compute_output_duration_us: per_model(
                "nv_inference_compute_output_duration_us",
                "Cumulative inference compute output duration in microseconds (does not include cached requests)",
            )?,
            pending_request_count: IntGaugeVec::new(
                Opts::new(
                    "nv_inference_pending_request_count",
                    "Instantaneous number of pending requests awaiting execution per-model.",
                ),
                &["model", "version"],
            )?,
            gpu_utilization: per_gpu("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)")?,
            gpu_memory_total: per_gpu("nv_gpu_memory_total_bytes", "GPU total memory, in bytes")?,
            gpu_memory_used: per_gpu("nv_gpu_memory_used_bytes", "GPU used memory, in bytes")?,
            cpu_utilization: Gauge::new("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]")?,
            cpu_memory_total: IntGauge::new(
                "nv_cpu_memory_total_bytes",
                "CPU total memory (RAM), in bytes",
            )?,
            cpu_memory_used: IntGauge::new(
                "nv_cpu_memory_used_bytes",
                "CPU used memory (RAM), in bytes",
            )?,
            last_cpu: Mutex::new(None),
        })
    }

    /// Registers every family in `registry`.
    pub fn register(&self, r: &prometheus::Registry) -> Result<(), prometheus::Error> {
        for c in [
            &self.request_success,
            &self.request_failure,
            &self.inference_count,
            &self.exec_count,
            &self.request_duration_us,
            &self.queue_duration_us,
            &self.compute_input_duration_us,
            &self.compute_infer_duration_us,
            &self.compute_output_duration_us,
        ] {
            r.register(Box::new(c.clone()))?;
        }
        r.register(Box::new(self.pending_request_count.clone()))?;
        for g in [
            &self.gpu_utilization,
            &self.gpu_memory_total,
            &self.gpu_memory_used,
        ] {
            r.register(Box::new(g.clone()))?;
        }
        r.register(Box::new(self.cpu_utilization.clone()))?;
        r.register(Box::new(self.cpu_memory_total.clone()))?;
        r.register(Box::new(self.cpu_memory_used.clone()))?;
        Ok(())
    }

    /// The handles of one model version.
    pub fn model(&self, model: &str, version: u64) -> TritonModel {
        let v = version.to_string();
        let l = [model, v.as_str()];
        TritonModel {
            success: self.request_success.with_label_values(&l),
            failure: self.request_failure.with_label_values(&l),
            inferences: self.inference_count.with_label_values(&l),
            executions: self.exec_count.with_label_values(&l),
            request_us: self.request_duration_us.with_label_values(&l),
            queue_us: self.queue_duration_us.with_label_values(&l),
            input_us: self.compute_input_duration_us.with_label_values(&l),
            infer_us: self.compute_infer_duration_us.with_label_values(&l),
            output_us: self.compute_output_duration_us.with_label_values(&l),
        }
    }

    /// Takes the CPU readings (/proc/stat, /proc/meminfo).
    pub fn refresh_system(&self) {
        if let Some((busy, total)) = read_cpu_jiffies() {
            let mut last = self.last_cpu.lock().unwrap_or_else(|p| p.into_inner());
            let (b0, t0) = last.unwrap_or((0, 0));
            let dt = total.saturating_sub(t0);
            if dt > 0 {
                let ratio = busy.saturating_sub(b0) as f64 / dt as f64;
                self.cpu_utilization.set(ratio.clamp(0.0, 1.0));
            }
            *last = Some((busy, total));
        }
        if let Some((total, available)) = read_meminfo() {
            self.cpu_memory_total.set(total as i64);
            self.cpu_memory_used
                .set(total.saturating_sub(available) as i64);
        }
    }

    /// Sets the GPU gauges, labelled by UUID, from the GPU sampler's readings.
    pub fn record_gpus(&self, gpus: &[super::system::GpuSample]) {
        for s in gpus {
            let g = &s.reading;
            let uuid = s
                .uuid
                .clone()
                .unwrap_or_else(|| format!("cuda:{}", g.device));
            let l = [uuid.as_str()];
            // Absent, not 0, where NVML cannot read it (a MIG instance).
            if let Some(u) = g.utilization {
                self.gpu_utilization.with_label_values(&l).set(f64::from(u));
            }
            self.gpu_memory_total
                .with_label_values(&l)
                .set(g.memory_total_bytes as f64);
            self.gpu_memory_used
                .with_label_values(&l)
                .set(g.memory_used_bytes as f64);
        }
    }
}

/// /proc/stat's first line as (busy, total) jiffies: busy is all but idle and iowait.
fn read_cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    cpu_jiffies(stat.lines().next()?)
}

fn cpu_jiffies(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// (MemTotal, MemAvailable) in bytes, as Triton reads them.
fn read_meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    Some((kb("MemTotal")?, kb("MemAvailable")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lines_are_read_as_busy_and_total() {
        assert_eq!(
            cpu_jiffies("cpu  100 5 50 800 20 3 2 0 0 0"),
            Some((160, 980))
        );
        assert_eq!(cpu_jiffies("cpu0 1 2 3 4"), None);
        assert_eq!(cpu_jiffies("cpu 1 2"), None);
    }

    /// Triton's published families (its metrics guide), as `# TYPE` lines read
    /// them: each family here has Triton's name, type and label names.
    #[test]
    fn every_family_has_tritons_name_type_and_labels() {
        let m = crate::telemetry::Metrics::new("2.13.0+cpu").unwrap();
        let t = &m.triton;
        let h = t.model("m", 3);
        h.succeeded(4, RequestTimes::default());
        h.failure.inc();
        h.executions.inc();
        t.pending_request_count
            .with_label_values(&["m", "3"])
            .set(2);
        t.gpu_utilization.with_label_values(&["GPU-0"]).set(0.5);
        t.gpu_memory_total.with_label_values(&["GPU-0"]).set(1.0);
        t.gpu_memory_used.with_label_values(&["GPU-0"]).set(1.0);
        let text = m.render();
        for (name, kind, labels) in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}\n{text}"
            );
            let line = text
                .lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
                .unwrap_or_else(|| panic!("no series of {name}"));
            let got: Vec<&str> = line
                .split_once('{')
                .map(|(_, r)| r.split_once('}').unwrap().0)
                .unwrap_or("")
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                .collect();
            assert_eq!(got, labels, "labels of {name}");
        }
        assert!(text.contains("nv_inference_count{model=\"m\",version=\"3\"} 4"));
        assert!(text.contains("nv_inference_pending_request_count{model=\"m\",version=\"3\"} 2"));
        // Every nv_ family registered is one of Triton's.
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE nv_")) {
            let name = format!("nv_{}", line.split(' ').next().unwrap());
            assert!(FAMILIES.iter().any(|(n, _, _)| *n == name), "{name}");
        }
    }

    /// docs/observability.md's table of Triton families lists exactly
    /// [`FAMILIES`], each beside the splitserve family it mirrors.
    #[test]
    fn the_triton_families_are_documented_beside_splitserves() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/observability.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let table = doc
            .split("## Triton's metric families")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("a section \"Triton's metric families\"");
        let mut documented = Vec::new();
        for row in table.lines().filter(|l| l.starts_with("| `nv_")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`');
            let (_, kind, _) = FAMILIES
                .iter()
                .find(|(n, _, _)| *n == name)
                .unwrap_or_else(|| panic!("{name} is documented but not registered"));
            assert_eq!(cells[2], *kind, "type of {name}");
            assert!(
                cells[4].contains("splitserve_") || cells[4].contains("none"),
                "{name} names the splitserve family it mirrors: {row}"
            );
            documented.push(name.to_string());
        }
        for (name, _, _) in FAMILIES {
            assert!(
                documented.iter().any(|d| d == name),
                "{name} is not documented"
            );
        }
    }
}
