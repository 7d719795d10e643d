//! The admin sidecar (axum, its own port): `/metrics` for Prometheus, `/livez`
//! and `/readyz` for HTTP probes, `/debug/plan` for people.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::sync::watch;

use crate::engine::{Engine, EngineStatus};
use crate::plan::ThreadPlan;
use crate::telemetry::metrics::catch_up;
use crate::telemetry::{Metrics, thread_count};

/// What the handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    /// The plan computed at start-up (libtorch's applied one wins once known).
    pub plan: ThreadPlan,
    pub stall_timeout: Duration,
    /// True once the models to load at start are loaded (the engine's and the
    /// repository's), until the drain: what grpc.health.v1 reports.
    pub ready: watch::Receiver<bool>,
}

impl AdminState {
    fn plan(&self) -> ThreadPlan {
        self.engine.applied_plan().unwrap_or(self.plan)
    }

    /// Sets the gauges that mirror engine state, right before a scrape.
    fn refresh_gauges(&self) {
        let m = &self.metrics;
        let cfg = self.engine.config();
        for (name, depth) in self.engine.queue_depths() {
            let capacity = self
                .engine
                .resolve_version(&name, None)
                .ok()
                .and_then(|m| m.slot.queue_capacity)
                .unwrap_or(cfg.queue_capacity);
            m.queue_depth.with_label_values(&[&name]).set(depth as i64);
            m.queue_capacity
                .with_label_values(&[&name])
                .set(capacity as i64);
        }
        for (name, version, depth) in self.engine.queue_depths_by_version() {
            m.triton
                .pending_request_count
                .with_label_values(&[&name, &version.to_string()])
                .set(depth as i64);
        }
        let plan = self.plan();
        m.cpu_budget.set(plan.budget.cores as i64);
        if let Some(n) = thread_count() {
            m.threads.with_label_values(&["process"]).set(n as i64);
        }
        m.threads
            .with_label_values(&["io"])
            .set(plan.io_threads as i64);
        m.threads
            .with_label_values(&["inference"])
            .set(plan.workers as i64);
        m.threads
            .with_label_values(&["intra_op"])
            .set((plan.workers * plan.intra_op_threads) as i64);
        m.threads
            .with_label_values(&["inter_op"])
            .set(plan.inter_op_threads as i64);
        let t = self.engine.training().stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        m.activations_stored.set(load(&t.stored) as i64);
        m.activations_bytes.set(load(&t.bytes) as i64);
        // Training state exists for the start-up models, in their order.
        for (model, events) in cfg.training.names.iter().zip(&t.per_model) {
            for (event, value) in events.events() {
                // The training side counts; the counter catches up at each scrape.
                catch_up(&m.training_events.with_label_values(&[model, event]), value);
            }
        }
        let kv = self.engine.training().sessions().stats();
        m.kv_sessions.set(load(&kv.open) as i64);
        m.kv_cache_bytes.set(load(&kv.bytes) as i64);
        for (event, value) in kv.events() {
            catch_up(&m.kv_session_events.with_label_values(&[event]), value);
        }
        catch_up(&m.kv_tokens, load(&kv.tokens));
        catch_up(&m.kv_decode_steps, load(&kv.decode_steps));
        let seconds = load(&kv.decode_micros) as f64 / 1e6;
        if seconds > m.kv_decode_seconds.get() {
            m.kv_decode_seconds
                .inc_by(seconds - m.kv_decode_seconds.get());
        }
        // Unloaded versions leave the family: it is rebuilt at each scrape.
        m.model_info.reset();
        for loaded in self.engine.loaded() {
            let description = &loaded.description;
            let digest = description
                .split("sha256:")
                .nth(1)
                .map_or_else(|| description.clone(), |d| format!("sha256:{d}"));
            m.model_info
                .with_label_values(&[
                    &loaded.name,
                    &loaded.version.to_string(),
                    &loaded.device,
                    &digest,
                ])
                .set(1);
        }
        let busy = self.engine.busy_workers();
        let stalled = self.engine.stalled_workers(self.stall_timeout);
        m.workers
            .with_label_values(&["busy"])
            .set((busy - stalled.min(busy)) as i64);
        m.workers
            .with_label_values(&["stalled"])
            .set(stalled as i64);
        m.workers
            .with_label_values(&["idle"])
            .set(plan.workers.saturating_sub(busy) as i64);
    }
}

/// The sidecar's routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/debug/plan", get(debug_plan))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> Response {
    s.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn livez(State(s): State<AdminState>) -> Response {
    match s.engine.not_live(s.stall_timeout) {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let status = s.engine.status().borrow().clone();
    match status {
        EngineStatus::Ready if s.engine.device_lost() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the device failed; waiting for a restart\n".to_string(),
        )
            .into_response(),
        EngineStatus::Ready if *s.ready.borrow() => {
            (StatusCode::OK, "ready\n".to_string()).into_response()
        }
        EngineStatus::Ready => (
            StatusCode::SERVICE_UNAVAILABLE,
            "loading the repository's models\n".to_string(),
        )
            .into_response(),
        EngineStatus::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            "loading models\n".to_string(),
        )
            .into_response(),
        EngineStatus::Failed(m) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {m}\n")).into_response()
        }
        EngineStatus::Draining | EngineStatus::Stopped => {
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string()).into_response()
        }
    }
}

#[derive(Serialize)]
struct PlanView {
    plan: ThreadPlan,
    planned_threads: usize,
    process_threads: Option<u64>,
    /// The plan libtorch runs with; null until the models start loading.
    applied: bool,
    models: Vec<ModelView>,
}

#[derive(Serialize)]
struct ModelView {
    name: String,
    device: String,
    source: String,
    queue_capacity: usize,
    max_batch_size: usize,
    batch_timeout_us: u128,
}

async fn debug_plan(State(s): State<AdminState>) -> Response {
    let plan = s.plan();
    let loaded = s.engine.loaded_models();
    let cfg = s.engine.config();
    let models = cfg
        .models
        .iter()
        .map(|slot| {
            let found = loaded.iter().find(|(n, _, _)| *n == slot.spec.name);
            ModelView {
                name: slot.spec.name.clone(),
                device: found.map_or_else(|| "loading".into(), |(_, d, _)| d.clone()),
                source: found.map_or_else(String::new, |(_, _, src)| src.clone()),
                queue_capacity: cfg.queue_capacity,
                max_batch_size: slot.max_batch,
                batch_timeout_us: slot.batch_timeout.as_micros(),
            }
        })
        .collect();
    axum::Json(PlanView {
        plan,
        planned_threads: plan.planned_threads(),
        process_threads: thread_count(),
        applied: s.engine.applied_plan().is_some(),
        models,
    })
    .into_response()
}
