//! Queues, batcher, inference workers, deadlines, cancellation and drain.
//!
//! io threads call [`Engine::infer`], which checks, enqueues and awaits a oneshot
//! reply. W dedicated OS threads own every libtorch call: a loader thread applies
//! the thread plan and loads the models, then the workers pop jobs (batched when a
//! model allows it), skip the ones whose deadline passed or whose client left, run
//! the forward under no_grad and reply. Readiness flows out through a `watch`.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter};
use tch::{Device, Kind, Tensor};
use tokio::sync::{oneshot, watch};

use crate::codec::{Encoding, RawTensor};
use crate::model::{self, DeviceRequest, Model, ModelError, ModelSpec};
use crate::plan::ThreadPlan;
use crate::proto::inference::ModelConfig;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::reason;
use crate::telemetry::triton::{RequestTimes, TritonModel};
use crate::training::sessions::Handle;
use crate::training::{
    Chunked, DecodeBatch, Decoders, Prefill, Step, Training, TrainingConfig, TrainingError,
};

/// Lifecycle of the engine, published to health checks.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineStatus {
    /// Models are loading and warming up.
    Loading,
    /// Every model is loaded and warmed up.
    Ready,
    /// A model failed to load; the process should exit.
    Failed(String),
    /// Shutting down: finishing queued work, refusing new work.
    Draining,
    /// Every worker has exited.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("unknown model {name:?}; this server serves {known}")]
    UnknownModel { name: String, known: String },
    #[error("model {name:?} has no version {version} loaded; loaded: {loaded}")]
    UnknownVersion {
        name: String,
        version: String,
        loaded: String,
    },
    /// The request cannot run on this model as it is served (a step on a
    /// model loaded at run time, a load over the worker budget, ...).
    #[error("{0}")]
    Unsupported(String),
    #[error("models are still loading; retry shortly")]
    Loading,
    #[error("the server failed to start: {0}")]
    Failed(String),
    #[error("the server is shutting down and accepts no new requests")]
    Draining,
    #[error("queue for model {model:?} is full ({capacity} requests waiting); retry with backoff")]
    QueueFull { model: String, capacity: usize },
    /// `computing`: a worker had taken the request when the deadline passed (its
    /// result is discarded); otherwise it was still queued and never computed.
    #[error(
        "deadline exceeded after {waited_ms} ms {}",
        if *computing {
            "while the model was computing the request (its result is discarded): allow the \
             model's run time in the deadline"
        } else {
            "waiting in the queue; the request was not computed"
        }
    )]
    DeadlineExceeded { waited_ms: u128, computing: bool },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Training(TrainingError),
    #[error("{0}")]
    Internal(String),
    /// A fatal device error (a poisoned CUDA context) earlier: nothing more
    /// can run in this process, which reports itself not live.
    #[error("the device failed ({0}); this server must restart, retry on another replica")]
    DeviceLost(String),
}

impl From<TrainingError> for EngineError {
    /// A model failure during a training step is a model failure like any other.
    fn from(e: TrainingError) -> EngineError {
        match e {
            TrainingError::Model(m) => EngineError::Model(m),
            other => EngineError::Training(other),
        }
    }
}

/// One servable model version and the settings it runs with.
#[derive(Debug, Clone)]
pub struct ModelSlot {
    pub spec: ModelSpec,
    /// Its version (1 for `--model`; the directory's number in a repository).
    pub version: u64,
    /// ComputeBackward's learning_rate may update this model's parameters.
    pub trainable: bool,
    /// Most rows one batched forward joins; 1 turns batching off.
    pub max_batch: usize,
    /// How long a worker holding a partial batch waits for more requests.
    pub batch_timeout: Duration,
    /// A partial batch of one of these sizes runs without waiting further.
    pub preferred_batch: Vec<usize>,
    /// Forwards of this version that may run at once; None: any worker.
    /// Reserved from the worker pool: the sum over loaded versions is at most W.
    pub instances: Option<usize>,
    /// Where it runs; None: the engine's device.
    pub device: Option<DeviceRequest>,
    /// Requests it may hold waiting; None: the engine's queue_capacity.
    pub queue_capacity: Option<usize>,
    /// Longest a request waits in its queue before it is rejected.
    pub queue_timeout: Option<Duration>,
    /// Its model repository configuration (config.pbtxt), when it has one.
    pub config: Option<Arc<ModelConfig>>,
}

impl ModelSlot {
    /// A `--model` slot: version 1, no batching, the engine's defaults.
    pub fn new(spec: ModelSpec) -> ModelSlot {
        ModelSlot {
            spec,
            version: 1,
            trainable: false,
            max_batch: 1,
            batch_timeout: Duration::ZERO,
            preferred_batch: Vec::new(),
            instances: None,
            device: None,
            queue_capacity: None,
            queue_timeout: None,
            config: None,
        }
    }
}

/// A loaded model version as front-ends see it.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    pub device: String,
    pub description: String,
    pub signature: Option<model::Signature>,
    /// What its metadata lists (never empty; see `Model::listed`).
    pub listed: model::Signature,
    pub slot: ModelSlot,
}

/// What the engine is started with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The models loaded at start, the first being the default for an empty
    /// model_id. Their failure to load fails the engine; the training state
    /// (split training, KV-cache steps) exists for these only.
    pub models: Vec<ModelSlot>,
    pub device: DeviceRequest,
    /// The thread plan the workers and libtorch run with.
    pub plan: ThreadPlan,
    /// Requests each model may hold waiting for a worker.
    pub queue_capacity: usize,
    /// Activation store, optimizers and checkpoints for split training.
    pub training: TrainingConfig,
}

/// A computed reply, still as plain bytes.
#[derive(Debug)]
pub struct Output {
    /// The (first) output.
    pub tensor: RawTensor,
    /// The model's further outputs, when the request asked for all of them.
    pub others: Vec<RawTensor>,
    /// Time in the model's forward (the whole batch's forward when batched).
    pub compute_time: Duration,
    /// Time from enqueue to the start of the forward.
    pub queue_time: Duration,
    /// Requests in the forward that computed this one.
    pub batch_size: usize,
    /// KV-cache steps: the model's present keys and values, flat
    /// `[key_0, value_0, key_1, ...]`; empty otherwise.
    pub present_key_values: Vec<RawTensor>,
}

/// One model's metric handles, resolved once so workers never look labels up.
struct ModelMetrics {
    computed: IntCounter,
    computed_rows: IntCounter,
    forwards: IntCounter,
    queue_full: Refusal,
    deadline: Refusal,
    cancelled: Refusal,
    draining: Refusal,
    queue_time: Histogram,
    inference_time: Histogram,
    batch_size: Histogram,
    /// KV session decode steps: rows per batched forward, rows, mixed-length batches.
    kv_decode_batch: Histogram,
    kv_decoded_tokens: IntCounter,
    kv_mixed_batches: IntCounter,
    kv_prefill_chunks: IntCounter,
    /// Triton's families of this model version.
    triton: TritonModel,
    /// Warm-ups run by workers on their own threads.
    warmups: IntCounter,
    /// Host <-> device tensor copies of plain forwards.
    to_device: IntCounter,
    to_host: IntCounter,
}

/// A request refused without an answer: counted by reason, and as one of
/// Triton's failed requests.
struct Refusal {
    reason: IntCounter,
    failure: IntCounter,
}

impl Refusal {
    fn inc(&self) {
        self.reason.inc();
        self.failure.inc();
    }
}

impl ModelMetrics {
    fn new(m: &Metrics, model: &str, version: u64) -> ModelMetrics {
        let triton = m.triton.model(model, version);
        let rejected = |r: &str| Refusal {
            reason: m.rejected.with_label_values(&[model, r]),
            failure: triton.failure.clone(),
        };
        ModelMetrics {
            triton: triton.clone(),
            computed: m.computed.with_label_values(&[model]),
            computed_rows: m.computed_rows.with_label_values(&[model]),
            forwards: m.forwards.with_label_values(&[model]),
            queue_full: rejected(reason::QUEUE_FULL),
            deadline: rejected(reason::DEADLINE),
            cancelled: rejected(reason::CANCELLED),
            draining: rejected(reason::DRAINING),
            queue_time: m.queue_duration.with_label_values(&[model]),
            inference_time: m.inference_duration.with_label_values(&[model]),
            batch_size: m.batch_size.with_label_values(&[model]),
            kv_decode_batch: m.kv_decode_batch_size.with_label_values(&[model]),
            kv_decoded_tokens: m.kv_decoded_tokens.with_label_values(&[model]),
            kv_mixed_batches: m.kv_decode_mixed_batches.with_label_values(&[model]),
            kv_prefill_chunks: m.kv_prefill_chunks.with_label_values(&[model]),
            warmups: m.worker_warmups.with_label_values(&[model]),
            to_device: m.device_copies.with_label_values(&[model, "to_device"]),
            to_host: m.device_copies.with_label_values(&[model, "to_host"]),
        }
    }
}

/// What jobs must share to be batched: trailing shape, dtype, whether they
/// want every output, and whether they are KV session decode steps.
type BatchKey<'a> = (&'a [i64], Kind, bool, bool);

struct Job {
    input: RawTensor,
    /// Further inputs, passed to `forward` after `input`, in order.
    more: Vec<RawTensor>,
    /// Reply with every output of a model that returns several (the Open
    /// Inference Protocol); otherwise such a model is an error.
    all_outputs: bool,
    enc: Encoding,
    /// A training or KV-cache step instead of a plain forward; never batched.
    step: Option<Step>,
    deadline: Option<Instant>,
    /// The model's queue timeout (config.pbtxt's default_queue_policy).
    queue_deadline: Option<Instant>,
    enqueued: Instant,
    /// Set when a worker takes the job: a deadline that passes later passed
    /// while it was being computed.
    taken: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<Output, EngineError>>,
    /// The RPC's span: the forward span is its child.
    rpc_span: tracing::Span,
    /// Open while the job waits; closing it records the queue wait.
    queue_span: tracing::Span,
    /// A KV session decode step that may join a decode batch: its session
    /// (set at enqueue).
    decode: Option<Handle>,
    /// A session prompt computed in chunks: the chunks done so far.
    prefill: Option<Box<Prefill>>,
}

impl Job {
    /// Rows along dimension 0 and the batching key, or None if it cannot
    /// batch: steps, and requests with several inputs, run alone.
    fn batch_key(&self) -> Option<(i64, BatchKey<'_>)> {
        if self.decode.is_some() {
            let rest = self.input.shape.get(1..)?;
            let kind = model::input_kind(&self.input, self.enc);
            return Some((1, (rest, kind, false, true)));
        }
        if self.step.is_some() || !self.more.is_empty() {
            return None;
        }
        let (rows, rest) = self.input.shape.split_first()?;
        Some((
            *rows,
            (
                rest,
                model::input_kind(&self.input, self.enc),
                self.all_outputs,
                false,
            ),
        ))
    }
}

/// A loaded model version: what workers compute with. Dropped (and its
/// libtorch memory freed) on a worker or the loader thread, never on an io thread.
struct Unit {
    id: u64,
    model: Model,
    /// What front-ends see of it, its settings included, built once
    /// (requests clone the Arc).
    info: Arc<LoadedModel>,
    metrics: ModelMetrics,
    /// Its index in the training state: models loaded at start only.
    training: Option<usize>,
    /// Forwards that may run at once.
    cap: usize,
    /// Workers computing a batch of it right now: raised under the queue lock,
    /// lowered without it when a batch ends (no lock per batch).
    running: AtomicUsize,
    /// Replaced or unloaded: takes no new request, finishes its queue, then goes.
    /// Set under the queue lock.
    retired: AtomicBool,
    /// Its KV sessions that are decoding: whom a decode batch waits for.
    /// Locked after the queue lock, never before it.
    decoders: Mutex<Decoders>,
    /// A worker is gathering a decode batch of it: other workers leave its
    /// decode steps to that batch. Set and cleared under the queue lock.
    forming: AtomicBool,
    /// Per worker: it has run this model's warm-up on its own thread.
    warmed: Vec<AtomicBool>,
    /// Workers whose warm-up of it has finished (run, failed or nothing to run).
    warm_ups_done: AtomicUsize,
}

/// A unit and its queue.
struct Entry {
    unit: Arc<Unit>,
    queue: VecDeque<Job>,
}

struct Queues {
    entries: Vec<Entry>,
    /// Model name -> version -> unit id: what new requests reach. Replaced
    /// under this lock, so a request sees either the old version or the new.
    routes: BTreeMap<String, BTreeMap<u64, u64>>,
    /// Served names in the order they were first loaded (start-up models in
    /// their order); listings follow it.
    order: Vec<String>,
    /// The model an empty model_id means.
    default_model: Option<String>,
    draining: bool,
    /// Next entry a worker looks at first, for fairness between models.
    next: usize,
    /// Workers blocked on the condvar: with none, a new job needs no wake-up
    /// (and its futex syscall), since a busy worker checks the queue when done.
    sleeping: usize,
}

impl Unit {
    fn slot(&self) -> &ModelSlot {
        &self.info.slot
    }
}

impl Queues {
    fn position(&self, id: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.unit.id == id)
    }

    /// Served names, the default first, then in the order they were loaded.
    fn names(&self) -> Vec<String> {
        let mut names = self.order.clone();
        if let Some(d) = &self.default_model
            && let Some(i) = names.iter().position(|n| n == d)
        {
            let d = names.remove(i);
            names.insert(0, d);
        }
        names
    }

    /// The served names as an error message lists them.
    fn known(&self) -> String {
        let names = self.names();
        if names.is_empty() {
            return "no model yet".into();
        }
        names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The entry a request for (name, version) goes to.
    fn resolve(&self, name: &str, version: Option<u64>) -> Result<usize, EngineError> {
        let name = if name.is_empty() {
            self.default_model.as_deref().unwrap_or_default()
        } else {
            name
        };
        let Some(versions) = self.routes.get(name) else {
            return Err(EngineError::UnknownModel {
                name: crate::codec::clip(name),
                known: self.known(),
            });
        };
        let id = match version {
            None => versions.values().next_back(),
            Some(v) => versions.get(&v),
        };
        match id.and_then(|&id| self.position(id)) {
            Some(i) => Ok(i),
            None => Err(EngineError::UnknownVersion {
                name: name.to_string(),
                version: version.map_or_else(|| "latest".into(), |v| v.to_string()),
                loaded: versions
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Instances reserved by loaded versions other than (name, version).
    fn reserved_except(&self, name: &str, version: u64) -> Vec<(String, u64, usize)> {
        self.entries
            .iter()
            .filter(|e| !e.unit.retired.load(Ordering::SeqCst))
            .filter(|e| !(e.unit.slot().spec.name == name && e.unit.slot().version == version))
            .filter_map(|e| {
                e.unit
                    .slot()
                    .instances
                    .map(|n| (e.unit.slot().spec.name.clone(), e.unit.slot().version, n))
            })
            .collect()
    }

    /// Retires `id`; returns its unit if it can go now (nothing queued or running).
    fn retire(&mut self, id: u64) -> Option<Arc<Unit>> {
        let i = self.position(id)?;
        self.entries[i].unit.retired.store(true, Ordering::SeqCst);
        self.remove_if_done(i)
    }

    fn remove_if_done(&mut self, i: usize) -> Option<Arc<Unit>> {
        let e = &self.entries[i];
        if e.unit.retired.load(Ordering::SeqCst)
            && e.queue.is_empty()
            && e.unit.running.load(Ordering::SeqCst) == 0
        {
            Some(self.entries.remove(i).unit)
        } else {
            None
        }
    }
}

/// Work for the loader thread: every model is built and freed there or on a worker.
enum LoaderJob {
    Load {
        slot: Box<ModelSlot>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Unload {
        name: String,
        versions: Option<Vec<u64>>,
        reply: oneshot::Sender<Vec<u64>>,
    },
}

struct Shared {
    config: EngineConfig,
    queues: Mutex<Queues>,
    work: Condvar,
    status: watch::Sender<EngineStatus>,
    loader: Mutex<Option<std::sync::mpsc::Sender<LoaderJob>>>,
    next_id: AtomicU64,
    device: OnceLock<Device>,
    /// The plan libtorch actually runs with.
    applied_plan: OnceLock<ThreadPlan>,
    metrics: Arc<Metrics>,
    /// Per worker: when its current job started (ns since `epoch`), 0 when idle.
    busy_since: Vec<AtomicU64>,
    epoch: Instant,
    exited_workers: AtomicUsize,
    /// Set once by the first fatal device error (a poisoned CUDA context): new
    /// work is refused and liveness fails, so the orchestrator restarts the process.
    device_lost: OnceLock<String>,
    /// Stored activations and optimizer state; touched by workers only, except
    /// for the plain-Rust lookups and counters io threads read.
    training: Training,
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the loader thread, which loads the models and then the workers.
    /// Returns at once; watch [`Engine::status`] for readiness.
    pub fn start(config: EngineConfig, metrics: Arc<Metrics>) -> Engine {
        let workers = config.plan.workers;
        let training = Training::new(&config.training, config.models.len());
        let (status, _) = watch::channel(EngineStatus::Loading);
        let (loader_tx, loader_rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues {
                entries: Vec::new(),
                routes: BTreeMap::new(),
                order: Vec::new(),
                default_model: config.models.first().map(|m| m.spec.name.clone()),
                draining: false,
                next: 0,
                sleeping: 0,
            }),
            config,
            work: Condvar::new(),
            status,
            loader: Mutex::new(Some(loader_tx)),
            next_id: AtomicU64::new(1),
            device: OnceLock::new(),
            applied_plan: OnceLock::new(),
            metrics,
            busy_since: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            exited_workers: AtomicUsize::new(0),
            device_lost: OnceLock::new(),
            training,
        });
        let loader_shared = shared.clone();
        let loader = std::thread::Builder::new()
            .name("splitserve-loader".into())
            .spawn(move || loader_thread(loader_shared, loader_rx));
        match loader {
            // Threads are detached: the status watch says when they are done.
            Ok(_) => {}
            Err(e) => {
                shared.status.send_replace(EngineStatus::Failed(format!(
                    "cannot start the loader thread: {e}"
                )));
            }
        }
        Engine { shared }
    }

    pub fn status(&self) -> watch::Receiver<EngineStatus> {
        self.shared.status.subscribe()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The name a request's model_id resolves to (empty = the default model),
    /// or None for a model that has no version loaded.
    pub fn resolve_model(&self, model_id: &str) -> Option<String> {
        let q = lock(&self.shared.queues);
        let i = q.resolve(model_id, None).ok()?;
        Some(q.entries[i].unit.slot().spec.name.clone())
    }

    /// The loaded version a request for (name, version) reaches: the newest
    /// when `version` is None.
    pub fn resolve_version(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Arc<LoadedModel>, EngineError> {
        let q = lock(&self.shared.queues);
        let i = q.resolve(name, version)?;
        Ok(loaded(&q.entries[i].unit))
    }

    /// Whether a model (resolved name) was started trainable.
    pub fn is_trainable(&self, name: &str) -> bool {
        self.shared
            .config
            .models
            .iter()
            .any(|m| m.spec.name == name && m.trainable)
    }

    /// The split-training state: forward_id lookups and counters.
    pub fn training(&self) -> &Training {
        &self.shared.training
    }

    /// Names of the served models (with a version loaded), the default first,
    /// then in the order they were loaded.
    pub fn model_names(&self) -> Vec<String> {
        lock(&self.shared.queues).names()
    }

    /// The served names as error messages list them ("no model yet" when none).
    pub fn known_models(&self) -> String {
        lock(&self.shared.queues).known()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// The plan libtorch runs with, once the loader applied it.
    pub fn applied_plan(&self) -> Option<ThreadPlan> {
        self.shared.applied_plan.get().copied()
    }

    /// The device the models run on, once resolved.
    pub fn device(&self) -> Option<Device> {
        self.shared.device.get().copied()
    }

    /// Every loaded version, by name then version.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let names = self.model_names();
        let q = lock(&self.shared.queues);
        names
            .iter()
            .filter_map(|n| q.routes.get(n))
            .flat_map(|versions| versions.values())
            .filter_map(|&id| q.position(id))
            .map(|i| loaded(&q.entries[i].unit))
            .collect()
    }

    /// (name, device, description) of each served model (its newest version).
    pub fn loaded_models(&self) -> Vec<(String, String, String)> {
        let names = self.model_names();
        let q = lock(&self.shared.queues);
        names
            .iter()
            .filter_map(|n| q.routes.get(n))
            .filter_map(|versions| versions.values().next_back())
            .filter_map(|&id| q.position(id))
            .map(|i| {
                let u = &q.entries[i].unit;
                (
                    u.model.name.clone(),
                    model::device_name(u.model.device),
                    u.model.description.clone(),
                )
            })
            .collect()
    }

    /// Requests waiting per model (every version of it), by name.
    pub fn queue_depths(&self) -> Vec<(String, usize)> {
        let names = self.model_names();
        let q = lock(&self.shared.queues);
        names
            .into_iter()
            .map(|n| {
                let depth = q
                    .entries
                    .iter()
                    .filter(|e| e.unit.slot().spec.name == n)
                    .map(|e| e.queue.len())
                    .sum();
                (n, depth)
            })
            .collect()
    }

    /// Why the process is not live: a worker stuck on one job past `stall_limit`,
    /// or a fatal device error. What `/livez` and the `liveness` health service report.
    pub fn not_live(&self, stall_limit: Duration) -> Option<String> {
        if let Some(m) = self.shared.device_lost.get() {
            return Some(format!("the device failed: {m}"));
        }
        match self.stalled_workers(stall_limit) {
            0 => None,
            n => Some(format!("{n} worker(s) stalled past --stall-timeout")),
        }
    }

    /// Whether a fatal device error happened: the process must restart.
    pub fn device_lost(&self) -> bool {
        self.shared.device_lost.get().is_some()
    }

    /// Marks the device lost (the first reason stays); see [`Engine::not_live`].
    /// Called by the workers on a fatal device error; public for fault-injection tests.
    pub fn mark_device_lost(&self, reason: &str) {
        mark_device_lost(&self.shared, reason);
    }

    /// Requests waiting per model version: (name, version, depth).
    pub fn queue_depths_by_version(&self) -> Vec<(String, u64, usize)> {
        let q = lock(&self.shared.queues);
        q.entries
            .iter()
            .map(|e| {
                let slot = e.unit.slot();
                (slot.spec.name.clone(), slot.version, e.queue.len())
            })
            .collect()
    }

    /// Workers in the middle of a forward right now.
    pub fn busy_workers(&self) -> usize {
        busy_count(&self.shared)
    }

    /// Workers busy on one job for longer than `limit`.
    pub fn stalled_workers(&self, limit: Duration) -> usize {
        let now = self.shared.epoch.elapsed().as_nanos() as u64;
        self.shared
            .busy_since
            .iter()
            .filter(|b| {
                let since = b.load(Ordering::Relaxed);
                since != 0 && now.saturating_sub(since) > limit.as_nanos() as u64
            })
            .count()
    }

    /// Loads (or reloads) a model version while the others serve: built and
    /// warmed up on the loader thread, then switched in atomically; a version
    /// it replaces finishes its queue before it is freed. Refused when its
    /// instances do not fit in the worker pool beside the loaded ones.
    pub async fn load(&self, slot: ModelSlot) -> Result<(), EngineError> {
        match &*self.shared.status.borrow() {
            EngineStatus::Ready | EngineStatus::Loading => {}
            EngineStatus::Failed(m) => return Err(EngineError::Failed(m.clone())),
            EngineStatus::Draining | EngineStatus::Stopped => return Err(EngineError::Draining),
        }
        check_instances(&self.shared, &slot)?;
        let (tx, rx) = oneshot::channel();
        self.send_loader(LoaderJob::Load {
            slot: Box::new(slot),
            reply: tx,
        })?;
        rx.await
            .unwrap_or_else(|_| Err(EngineError::Internal("the loader thread stopped".into())))
    }

    /// Stops routing requests to a model's versions (all, or those listed);
    /// each finishes its queue, then is freed. Returns the versions unloaded.
    pub async fn unload(&self, name: &str, versions: Option<Vec<u64>>) -> Vec<u64> {
        let (tx, rx) = oneshot::channel();
        let job = LoaderJob::Unload {
            name: name.to_string(),
            versions,
            reply: tx,
        };
        if self.send_loader(job).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    fn send_loader(&self, job: LoaderJob) -> Result<(), EngineError> {
        lock(&self.shared.loader)
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| EngineError::Internal("the loader thread stopped".into()))
    }

    /// Queues one request and waits for its reply. Runs on an io thread: no
    /// libtorch here. Dropping the returned future (the client went away) makes
    /// the worker skip the request.
    pub async fn infer(
        &self,
        model: &str,
        input: RawTensor,
        enc: Encoding,
        deadline: Option<Instant>,
    ) -> Result<Output, EngineError> {
        self.submit(model, input, enc, deadline, None).await
    }

    /// Queues a request with one or more inputs (explicit dtypes) for a model
    /// version (None: the newest) and returns every output of the model: the
    /// Open Inference Protocol's inference.
    pub async fn infer_all(
        &self,
        model: &str,
        version: Option<u64>,
        mut inputs: Vec<RawTensor>,
        deadline: Option<Instant>,
    ) -> Result<Output, EngineError> {
        if inputs.is_empty() {
            return Err(EngineError::Model(ModelError::InvalidInput {
                model: crate::codec::clip(model),
                message: "the request has no input tensor".into(),
            }));
        }
        let input = inputs.remove(0);
        let enc = Encoding {
            dtype: input.dtype,
            compressed: false,
            explicit: true,
        };
        self.enqueue((model, version), input, inputs, true, enc, deadline, None)
            .await
    }

    /// [`Engine::infer`], or with a `step`, a training or KV-cache step that goes
    /// through the same queue, limits and workers but is never batched.
    pub async fn submit(
        &self,
        model: &str,
        input: RawTensor,
        enc: Encoding,
        deadline: Option<Instant>,
        step: Option<Step>,
    ) -> Result<Output, EngineError> {
        self.enqueue((model, None), input, Vec::new(), false, enc, deadline, step)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn enqueue(
        &self,
        (model, version): (&str, Option<u64>),
        input: RawTensor,
        more: Vec<RawTensor>,
        all_outputs: bool,
        enc: Encoding,
        deadline: Option<Instant>,
        step: Option<Step>,
    ) -> Result<Output, EngineError> {
        if let Some(m) = self.shared.device_lost.get() {
            return Err(EngineError::DeviceLost(m.clone()));
        }
        match &*self.shared.status.borrow() {
            EngineStatus::Ready => {}
            EngineStatus::Loading => return Err(EngineError::Loading),
            EngineStatus::Failed(m) => return Err(EngineError::Failed(m.clone())),
            EngineStatus::Draining | EngineStatus::Stopped => {
                if let Ok(m) = self.resolve_version(model, version) {
                    self.shared
                        .metrics
                        .rejected
                        .with_label_values(&[&m.name, reason::DRAINING])
                        .inc();
                    self.shared
                        .metrics
                        .triton
                        .request_failure
                        .with_label_values(&[&m.name, &m.version.to_string()])
                        .inc();
                }
                return Err(EngineError::Draining);
            }
        }
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let taken = Arc::new(AtomicBool::new(false));
        let wake = {
            let mut q = lock(&self.shared.queues);
            let index = q.resolve(model, version)?;
            let draining = q.draining;
            let entry = &mut q.entries[index];
            let unit = entry.unit.clone();
            if draining {
                unit.metrics.draining.inc();
                return Err(EngineError::Draining);
            }
            if matches!(step, None | Some(Step::Forward { .. })) {
                // Triton counts a request its model refuses as a failed inference.
                unit.model
                    .check_input_shape(&input.shape)
                    .inspect_err(|_| unit.metrics.triton.failure.inc())?;
            }
            let needs_training = step.as_ref().is_some_and(|s| !s.is_plain_kv());
            if needs_training && unit.model.package().is_some() {
                return Err(EngineError::Unsupported(format!(
                    "model {:?} is an AOTInductor package (.pt2), which is inference-only: \
                     training_mode forwards, backward and KV sessions need its TorchScript \
                     export (torch.jit.script(model).save(path))",
                    unit.slot().spec.name
                )));
            }
            if needs_training && unit.training.is_none() {
                return Err(EngineError::Unsupported(format!(
                    "model {:?} was loaded from the model repository at run time: training_mode \
                     forwards, backward and KV-cache steps need a model loaded at start-up \
                     (--model, or splitserve.trainable in its config.pbtxt)",
                    unit.slot().spec.name
                )));
            }
            let cap = unit
                .slot()
                .queue_capacity
                .unwrap_or(self.shared.config.queue_capacity);
            if entry.queue.len() >= cap {
                unit.metrics.queue_full.inc();
                return Err(EngineError::QueueFull {
                    model: unit.slot().spec.name.clone(),
                    capacity: cap,
                });
            }
            let rpc_span = tracing::Span::current();
            let queue_span = tracing::debug_span!("queue", model = %unit.slot().spec.name);
            let decode = unit.training.zip(step.as_ref()).and_then(|(i, s)| {
                self.shared
                    .training
                    .decode_row(i, &unit.model, s, &input, enc)
                    .map(|r| r.handle)
            });
            entry.queue.push_back(Job {
                input,
                more,
                all_outputs,
                enc,
                step,
                deadline,
                queue_deadline: unit.slot().queue_timeout.map(|t| now + t),
                enqueued: now,
                taken: taken.clone(),
                reply: tx,
                rpc_span,
                queue_span,
                decode,
                prefill: None,
            });
            let forming = decode.is_some_and(|h| {
                lock(&unit.decoders).arrived(h, now);
                unit.forming.load(Ordering::Relaxed)
            });
            match q.sleeping {
                0 => Wake::None,
                // The worker gathering this decode batch may not be the one
                // notify_one would wake.
                _ if forming => Wake::All,
                _ => Wake::One,
            }
        };
        match wake {
            Wake::None => {}
            Wake::One => self.shared.work.notify_one(),
            Wake::All => self.shared.work.notify_all(),
        }
        let received = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), rx).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(EngineError::DeadlineExceeded {
                        waited_ms: now.elapsed().as_millis(),
                        computing: taken.load(Ordering::Acquire),
                    });
                }
            },
            None => rx.await,
        };
        received.unwrap_or_else(|_| {
            Err(EngineError::Internal(
                "the worker dropped the request".into(),
            ))
        })
    }

    /// Stops taking requests, lets the workers finish everything queued, and waits
    /// up to `grace` for them. Returns true when all work finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        lock(&self.shared.queues).draining = true;
        self.shared.status.send_if_modified(|s| {
            if matches!(s, EngineStatus::Ready | EngineStatus::Loading) {
                *s = EngineStatus::Draining;
                true
            } else {
                false
            }
        });
        self.shared.work.notify_all();
        let mut status = self.status();
        let finished = tokio::time::timeout(grace, async {
            loop {
                if matches!(
                    *status.borrow_and_update(),
                    EngineStatus::Stopped | EngineStatus::Failed(_)
                ) {
                    return;
                }
                if status.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok();
        if !finished {
            // Whatever is still queued will not be computed: answer it now.
            let mut q = lock(&self.shared.queues);
            for entry in &mut q.entries {
                for job in entry.queue.drain(..) {
                    let _ = job.reply.send(Err(EngineError::Draining));
                }
            }
        }
        finished
    }
}

fn loaded(u: &Unit) -> Arc<LoadedModel> {
    u.info.clone()
}

/// Refuses a version whose instances do not fit beside the loaded ones.
fn check_instances(shared: &Shared, slot: &ModelSlot) -> Result<(), EngineError> {
    let Some(wanted) = slot.instances else {
        return Ok(());
    };
    let workers = shared.config.plan.workers;
    let others = lock(&shared.queues).reserved_except(&slot.spec.name, slot.version);
    let taken: usize = others.iter().map(|(_, _, n)| n).sum();
    if wanted == 0 || taken + wanted > workers {
        let shown = others
            .iter()
            .map(|(n, v, k)| format!("{n}/{v}: {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(EngineError::Unsupported(format!(
            "model {:?} version {} asks for {wanted} instance(s), but {taken} of the {workers} \
             workers the CPU budget allows (--workers x --intra-op-threads within the budget) \
             are already reserved{}; lower instance_group count or unload a model",
            slot.spec.name,
            slot.version,
            if shown.is_empty() {
                String::new()
            } else {
                format!(" ({shown})")
            }
        )));
    }
    Ok(())
}

/// Which sleeping workers a new job wakes.
enum Wake {
    None,
    One,
    All,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned queue lock means a worker panicked outside catch_unwind; the
    // queue itself is still consistent (every mutation is a single push/pop).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds a unit on the calling (loader) thread: resolves its device, loads
/// and warms the model up.
fn build_unit(
    shared: &Shared,
    mut slot: ModelSlot,
    training: Option<usize>,
) -> Result<Unit, ModelError> {
    let device = match slot.device {
        Some(d) => model::resolve_device(d)?,
        None => match shared.device.get() {
            Some(d) => *d,
            None => model::resolve_device(shared.config.device)?,
        },
    };
    let started = Instant::now();
    let workers = shared.config.plan.workers;
    let runners = slot.instances.unwrap_or(workers).clamp(1, workers.max(1));
    let m = Model::load_with_runners(&slot.spec, device, runners)?;
    if let Some(package) = m.package() {
        fit_package(&mut slot, &m, &package)?;
    }
    tracing::info!(
        model = %m.name,
        version = slot.version,
        source = %m.description,
        device = %model::device_name(device),
        warmed_up = slot.spec.warmup.is_some() || !matches!(slot.spec.source, model::ModelSource::TorchScript(_)),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    let info = Arc::new(LoadedModel {
        name: slot.spec.name.clone(),
        version: slot.version,
        device: model::device_name(m.device),
        description: m.description.clone(),
        signature: m.signature.clone(),
        listed: m.listed.clone(),
        slot,
    });
    Ok(Unit {
        id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        cap: info
            .slot
            .instances
            .unwrap_or(workers)
            .clamp(1, workers.max(1)),
        running: AtomicUsize::new(0),
        retired: AtomicBool::new(false),
        decoders: Mutex::default(),
        forming: AtomicBool::new(false),
        warmed: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        warm_ups_done: AtomicUsize::new(0),
        metrics: ModelMetrics::new(&shared.metrics, &info.name, info.version),
        info,
        model: m,
        training,
    })
}

/// Fits an AOTInductor package's slot to the package: batching only along a
/// dynamic batch dimension and within its bounds, and its model configuration
/// (names, dtypes, dims) filled from the package where not configured.
fn fit_package(
    slot: &mut ModelSlot,
    m: &Model,
    package: &model::PackageInfo,
) -> Result<(), ModelError> {
    let max_rows = match package.batch {
        model::PackageBatch::Dynamic { max, .. } => max.unwrap_or(i64::MAX),
        model::PackageBatch::Static(_) | model::PackageBatch::Unknown => 1,
    };
    let rows = usize::try_from(max_rows).unwrap_or(usize::MAX).max(1);
    if slot.max_batch > rows {
        tracing::warn!(
            model = %slot.spec.name,
            max_batch = slot.max_batch,
            "the package takes batches of at most {rows} rows (a static or unknown batch \
             dimension takes one request at a time): batching up to {rows}"
        );
        slot.max_batch = rows;
    }
    if let model::PackageBatch::Dynamic { min, .. } = package.batch
        && min > 1
    {
        tracing::warn!(
            model = %slot.spec.name,
            "the package was compiled for batches of at least {min} rows (AOTInductor's 0/1 \
             specialisation): a smaller batch is padded with zero rows and costs {min} rows' \
             work; compile it to take one row as docs/pt2.md (\"Making a package\") says"
        );
    }
    let base = slot.config.as_deref();
    let mut cfg = model::package_config(&slot.spec.name, package, m.signature.as_ref(), base)
        .map_err(|message| ModelError::Load {
            name: slot.spec.name.clone(),
            source_desc: m.description.clone(),
            message,
        })?;
    if base.is_none() && slot.max_batch > 1 {
        cfg.scheduling_choice = Some(
            crate::proto::inference::model_config::SchedulingChoice::DynamicBatching(
                crate::proto::inference::ModelDynamicBatching {
                    max_queue_delay_microseconds: slot.batch_timeout.as_micros() as u64,
                    ..Default::default()
                },
            ),
        );
    }
    slot.config = Some(Arc::new(cfg));
    Ok(())
}

/// Routes requests for (name, version) to a new unit; retires the one it replaces.
/// Returns the units that can be freed now.
fn install(shared: &Shared, unit: Unit) -> Vec<Arc<Unit>> {
    let name = unit.slot().spec.name.clone();
    let version = unit.slot().version;
    let id = unit.id;
    let mut q = lock(&shared.queues);
    q.entries.push(Entry {
        unit: Arc::new(unit),
        queue: VecDeque::new(),
    });
    if q.default_model.is_none() {
        q.default_model = Some(name.clone());
    }
    if !q.order.contains(&name) {
        q.order.push(name.clone());
    }
    let old = q.routes.entry(name).or_default().insert(version, id);
    old.and_then(|old| q.retire(old)).into_iter().collect()
}

/// Stops routing to a model's versions (all when `versions` is None).
fn uninstall(shared: &Shared, name: &str, versions: Option<&[u64]>) -> (Vec<u64>, Vec<Arc<Unit>>) {
    let mut q = lock(&shared.queues);
    let Some(routes) = q.routes.get_mut(name) else {
        return (Vec::new(), Vec::new());
    };
    let chosen: Vec<u64> = routes
        .keys()
        .copied()
        .filter(|v| versions.is_none_or(|vs| vs.contains(v)))
        .collect();
    let ids: Vec<u64> = chosen.iter().filter_map(|v| routes.remove(v)).collect();
    if routes.is_empty() {
        q.routes.remove(name);
        q.order.retain(|n| n != name);
        if q.default_model.as_deref() == Some(name) {
            q.default_model = q.routes.keys().next().cloned();
        }
    }
    let freed = ids.into_iter().filter_map(|id| q.retire(id)).collect();
    (chosen, freed)
}

fn loader_thread(shared: Arc<Shared>, jobs: std::sync::mpsc::Receiver<LoaderJob>) {
    if !load_then_start_workers(&shared) {
        return;
    }
    // Loads and unloads at run time, one at a time, until the engine stops.
    loop {
        match jobs.recv_timeout(Duration::from_millis(200)) {
            Ok(LoaderJob::Load { slot, reply }) => {
                let _grad = tch::no_grad_guard();
                let name = slot.spec.name.clone();
                let version = slot.version;
                let result = match catch_unwind(AssertUnwindSafe(|| {
                    on_a_passing_thread(&shared, || build_unit(&shared, *slot, None))
                })) {
                    Ok(Ok(r)) => r.map_err(EngineError::Model),
                    Ok(Err(e)) => Err(EngineError::Internal(e)),
                    Err(panic) => Err(EngineError::Internal(model::panic_message(panic.as_ref()))),
                };
                let freed = match result {
                    Ok(unit) => {
                        let id = unit.id;
                        let replaced = install(&shared, unit);
                        wait_for_worker_warm_ups(&shared, id);
                        let _ = reply.send(Ok(()));
                        replaced
                    }
                    Err(e) => {
                        tracing::warn!(model = %name, version, error = %e, "model load failed; the versions already loaded keep serving");
                        let _ = reply.send(Err(e));
                        Vec::new()
                    }
                };
                // Freed here, on a libtorch thread.
                drop(freed);
            }
            Ok(LoaderJob::Unload {
                name,
                versions,
                reply,
            }) => {
                let (unloaded, freed) = uninstall(&shared, &name, versions.as_deref());
                drop(freed);
                let _ = reply.send(unloaded);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if matches!(
            *shared.status.borrow(),
            EngineStatus::Stopped | EngineStatus::Failed(_)
        ) {
            // Nobody can send any more: dropping the sender ends the channel.
            lock(&shared.loader).take();
            for job in jobs.try_iter() {
                match job {
                    LoaderJob::Load { reply, .. } => {
                        let _ = reply.send(Err(EngineError::Draining));
                    }
                    LoaderJob::Unload { reply, .. } => {
                        let _ = reply.send(Vec::new());
                    }
                }
            }
            return;
        }
    }
}

/// Runs the loader's libtorch work (loading, warming up, resuming) on a thread
/// that ends with it, under the thread plan and no_grad. An OpenMP team lives
/// as long as the thread that started it: the long-lived loader's team (its
/// intra-op helpers) would stay, outside the thread plan, and with more
/// OpenMP threads than cores libgomp stops spinning between parallel regions,
/// so every worker's forward would wake its helpers through the kernel
/// (measured on 2 cores: a GPT-2 trunk's decode step took 18.5 ms instead of
/// 10.8 ms). A panic in `f` resumes on the caller's thread.
fn on_a_passing_thread<T: Send>(
    shared: &Shared,
    f: impl FnOnce() -> T + Send,
) -> Result<T, String> {
    let plan = shared.applied_plan.get().copied();
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("splitserve-prep".into())
            .spawn_scoped(s, move || {
                if let Some(plan) = plan {
                    ThreadPlan::pin_this_thread(&plan);
                }
                let _grad = tch::no_grad_guard();
                f()
            })
            .map_err(|e| format!("cannot start a thread to load models on: {e}"))?;
        handle
            .join()
            .map_err(|panic| std::panic::resume_unwind(panic))
    })
}

/// The longest a run-time load waits for the workers to warm its version up.
const WORKER_WARM_UP_WAIT: Duration = Duration::from_secs(30);

/// Wakes the workers to warm up the version just installed (`next_batch`)
/// and waits until every one has, so that a load answers (and a repository
/// model turns READY) warmed on every worker, as start-up models are before
/// the engine is ready. Bounded: a worker stuck in a long batch, or gone,
/// leaves it to that worker's first batch of it.
fn wait_for_worker_warm_ups(shared: &Shared, id: u64) {
    let unit = {
        let q = lock(&shared.queues);
        q.position(id).map(|i| q.entries[i].unit.clone())
    };
    let Some(unit) = unit else { return };
    shared.work.notify_all();
    let started = Instant::now();
    while unit.warm_ups_done.load(Ordering::SeqCst) < unit.warmed.len() {
        if started.elapsed() > WORKER_WARM_UP_WAIT
            || matches!(
                *shared.status.borrow(),
                EngineStatus::Stopped | EngineStatus::Failed(_)
            )
        {
            tracing::warn!(
                model = %unit.info.name,
                version = unit.info.version,
                warmed = unit.warm_ups_done.load(Ordering::SeqCst),
                workers = unit.warmed.len(),
                "not every worker warmed the new version up in time; the others warm it before their first batch of it"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Loads the start-up models, then starts the workers. False if the engine failed.
fn load_then_start_workers(shared: &Arc<Shared>) -> bool {
    let plan = shared.config.plan.apply_to_libtorch();
    let _ = shared.applied_plan.set(plan);
    let loaded = on_a_passing_thread(shared, || -> Result<Vec<Unit>, ModelError> {
        let device = model::resolve_device(shared.config.device)?;
        let _ = shared.device.set(device);
        shared
            .config
            .models
            .iter()
            .enumerate()
            .map(|(i, slot)| build_unit(shared, slot.clone(), Some(i)))
            .collect()
    });
    let mut units = match loaded.and_then(|r| r.map_err(|e| e.to_string())) {
        Ok(units) => units,
        Err(e) => {
            // run() returns it as RunError::Startup, which the caller logs once.
            tracing::debug!(error = %e, "model loading failed");
            shared.status.send_replace(EngineStatus::Failed(e));
            return false;
        }
    };
    // Trained models continue from their newest checkpoint; when none of a
    // model's checkpoints loads, the server does not start.
    let resumed = on_a_passing_thread(shared, || {
        shared.training.resume(
            units
                .iter_mut()
                .filter_map(|u| u.training.map(|i| (i, &mut u.model))),
        )
    });
    if let Err(e) = resumed.and_then(|r| r) {
        tracing::error!(error = %e, "cannot resume from the checkpoints");
        shared.status.send_replace(EngineStatus::Failed(e));
        return false;
    }
    for unit in units {
        drop(install(shared, unit));
    }
    let warming = Instant::now();
    let (warmed_tx, warmed) = std::sync::mpsc::channel();
    for i in 0..shared.config.plan.workers {
        let s = shared.clone();
        let warmed_tx = warmed_tx.clone();
        match std::thread::Builder::new()
            .name(format!("splitserve-worker-{i}"))
            .spawn(move || worker_loop(s, i, warmed_tx))
        {
            Ok(_) => {}
            Err(e) => {
                shared.status.send_replace(EngineStatus::Failed(format!(
                    "cannot start worker {i}: {e}"
                )));
                return false;
            }
        }
    }
    drop(warmed_tx);
    // Ready once every worker has run every model on its own thread; a worker
    // that died meanwhile ends the wait early (recv fails once all are gone).
    for _ in 0..shared.config.plan.workers {
        if warmed.recv().is_err() {
            break;
        }
    }
    tracing::info!(
        workers = shared.config.plan.workers,
        elapsed_ms = warming.elapsed().as_millis() as u64,
        "every worker warmed the models up"
    );
    shared.status.send_if_modified(|s| {
        if *s == EngineStatus::Loading {
            *s = EngineStatus::Ready;
            true
        } else {
            false
        }
    });
    if lock(&shared.queues).draining {
        shared.work.notify_all();
    }
    true
}

fn worker_loop(shared: Arc<Shared>, index: usize, warmed: std::sync::mpsc::Sender<()>) {
    if let Some(plan) = shared.applied_plan.get() {
        ThreadPlan::pin_this_thread(plan);
    }
    let _grad = tch::no_grad_guard();
    // The start-up models, on this thread, before the engine reports ready.
    let units: Vec<Arc<Unit>> = lock(&shared.queues)
        .entries
        .iter()
        .map(|e| e.unit.clone())
        .collect();
    for unit in &units {
        warm_up_on_worker(&shared, unit, index);
    }
    drop(units);
    let _ = warmed.send(());
    drop(warmed);
    while let Some((unit, jobs)) = next_batch(&shared, index) {
        // Busy workers release expired activations too, at most once per period.
        shared.training.sweep();
        let started = Instant::now();
        let since = shared.epoch.elapsed().as_nanos().max(1) as u64;
        shared.busy_since[index].store(since, Ordering::Relaxed);
        // A model loaded at run time: this worker warms it before its first batch.
        warm_up_on_worker(&shared, &unit, index);
        run_batch(&shared, &unit, jobs, started, &shared.busy_since[index]);
        let was = unit.running.fetch_sub(1, Ordering::SeqCst);
        // The lock only when this batch's end changes something for others: a
        // version at its instance cap may have left jobs that another worker
        // skipped, and a retired one may be done.
        let capped = was == unit.cap && unit.cap < shared.busy_since.len();
        let freed = if capped || unit.retired.load(Ordering::SeqCst) {
            let mut q = lock(&shared.queues);
            match q.position(unit.id) {
                Some(i) => {
                    if capped && !q.entries[i].queue.is_empty() && q.sleeping > 0 {
                        shared.work.notify_one();
                    }
                    q.remove_if_done(i)
                }
                None => None,
            }
        } else {
            None
        };
        drop(unit);
        // The last batch of a replaced or unloaded version frees it here.
        drop(freed);
    }
    // Draining and nothing left: the last worker out marks the engine stopped.
    if shared.exited_workers.fetch_add(1, Ordering::SeqCst) + 1 == shared.config.plan.workers {
        let units: Vec<Arc<Unit>> = {
            let q = lock(&shared.queues);
            q.entries.iter().map(|e| e.unit.clone()).collect()
        };
        let models: Vec<(usize, &Model)> = units
            .iter()
            .filter_map(|u| u.training.map(|i| (i, &u.model)))
            .collect();
        // Every queue is empty: save trained parameters, release activations.
        shared.training.shutdown(&models);
        shared.status.send_replace(EngineStatus::Stopped);
    }
}

/// The batch sizes a worker warms a model up at (None: the warm-up shape as
/// configured). On the CPU once, as configured. On CUDA a TorchScript model
/// that batches also runs every size batching settles on without waiting (its
/// preferred sizes and its maximum), each twice: its executor profiles a new
/// shape on the first run and compiles the fused kernels on the second.
pub fn warmup_rows(
    cuda: bool,
    torchscript: bool,
    one_input: bool,
    max_batch: usize,
    preferred: &[usize],
) -> Vec<Option<i64>> {
    if !cuda {
        return vec![None];
    }
    if !torchscript {
        return vec![None];
    }
    let mut rows = vec![None, None];
    if one_input && max_batch > 1 {
        let mut sizes: Vec<usize> = preferred
            .iter()
            .copied()
            .filter(|&p| p > 1 && p <= max_batch)
            .chain([max_batch])
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        for n in sizes {
            rows.extend([Some(n as i64), Some(n as i64)]);
        }
    }
    rows
}

/// Runs a model's warm-up on this worker's thread, once per worker and model.
/// A failure is logged and left to the requests (which report it); a fatal
/// device error marks the device lost.
fn warm_up_on_worker(shared: &Shared, unit: &Unit, index: usize) {
    // A plain load first: after its first batch a worker only reads its flag.
    match unit.warmed.get(index) {
        Some(done) if !done.load(Ordering::Relaxed) && !done.swap(true, Ordering::Relaxed) => {}
        _ => return,
    }
    let model = &unit.model;
    let slot = unit.slot();
    let rows = warmup_rows(
        model.device.is_cuda(),
        model.is_torchscript(),
        model.warms_one_input(),
        slot.max_batch,
        &slot.preferred_batch,
    );
    let started = Instant::now();
    let result =
        catch_unwind(AssertUnwindSafe(|| model.warm_up_here(&rows))).unwrap_or_else(|panic| {
            Err(model::run_error(
                &model.name,
                &model::panic_text(panic.as_ref()),
                false,
            ))
        });
    unit.warm_ups_done.fetch_add(1, Ordering::SeqCst);
    match result {
        Ok(0) => {}
        Ok(forwards) => {
            unit.metrics.warmups.inc();
            tracing::debug!(
                worker = index,
                model = %model.name,
                version = slot.version,
                forwards,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "worker warmed up"
            );
        }
        Err(e) => {
            tracing::warn!(worker = index, model = %model.name, error = %e, "worker warm-up failed");
            if let ModelError::DeviceFailed {
                message,
                fatal: true,
                ..
            } = &e
            {
                mark_device_lost(shared, message);
            }
        }
    }
}

/// Blocks until there is work. Returns None when draining and nothing is left.
/// The unit's `running` count includes the returned batch.
fn next_batch(shared: &Shared, index: usize) -> Option<(Arc<Unit>, Vec<Job>)> {
    let mut q = lock(&shared.queues);
    loop {
        // A version loaded at run time: every worker warms it up on its own
        // thread, idle ones at once (the loader wakes them), busy ones after
        // their batch; its load answers once they all have.
        let cold = q
            .entries
            .iter()
            .find(|e| {
                e.unit
                    .warmed
                    .get(index)
                    .is_some_and(|w| !w.load(Ordering::Relaxed))
            })
            .map(|e| e.unit.clone());
        if let Some(unit) = cold {
            drop(q);
            warm_up_on_worker(shared, &unit, index);
            drop(unit);
            q = lock(&shared.queues);
            continue;
        }
        let n = q.entries.len();
        let start = q.next.min(n);
        let found = (0..n).map(|k| (start + k) % n).find(|&i| {
            let e = &q.entries[i];
            e.queue.front().is_some_and(|j| {
                // Decode steps queued while another worker gathers a decode
                // batch are that batch's.
                j.decode.is_none() || !e.unit.forming.load(Ordering::Relaxed)
            }) && e.unit.running.load(Ordering::SeqCst) < e.unit.cap
        });
        if let Some(i) = found {
            q.next = (i + 1) % n;
            let unit = q.entries[i].unit.clone();
            let slot = &unit.slot();
            let mut jobs = Vec::new();
            take_compatible(&unit, &mut q.entries[i].queue, &mut jobs, slot.max_batch);
            if jobs.is_empty() {
                if let Some(freed) = q.remove_if_done(i) {
                    drop(q);
                    drop(freed);
                    q = lock(&shared.queues);
                }
                continue; // everything we looked at had expired or been cancelled
            }
            unit.running.fetch_add(1, Ordering::SeqCst);
            if slot.max_batch > 1
                && !slot.batch_timeout.is_zero()
                && !full(slot, rows(&jobs))
                && jobs[0].decode.is_some()
            {
                // A decode batch waits for the sessions known to be decoding
                // (see Decoders), whether or not another worker is idle: one
                // forward for all of them reads the weights once.
                unit.forming.store(true, Ordering::Relaxed);
                q = gather(shared, q, &unit, &mut jobs, |now| {
                    lock(&unit.decoders).expected_until(now, slot.batch_timeout)
                });
                unit.forming.store(false, Ordering::Relaxed);
                // Steps left to another worker while this one gathered.
                if q.sleeping > 0
                    && q.position(unit.id)
                        .is_some_and(|i| !q.entries[i].queue.is_empty())
                {
                    shared.work.notify_one();
                }
            } else if slot.max_batch > 1
                && !slot.batch_timeout.is_zero()
                && jobs[0].batch_key().is_some()
                && !full(slot, rows(&jobs))
                && busy_count(shared) + 1 >= shared.busy_since.len()
            {
                // Wait a little for the batch to fill, if the model allows it and
                // no other worker is idle: an idle worker would start on new
                // arrivals at once, so waiting would only add latency.
                let until = Instant::now() + slot.batch_timeout;
                drop(gather(shared, q, &unit, &mut jobs, |_| Some(until)));
            }
            return Some((unit, jobs));
        }
        if q.draining && q.entries.iter().all(|e| e.queue.is_empty()) {
            return None;
        }
        q.sleeping += 1;
        let (guard, waited) = shared
            .work
            .wait_timeout(q, shared.training.sweep_every())
            .unwrap_or_else(|p| p.into_inner());
        q = guard;
        q.sleeping -= 1;
        if waited.timed_out() {
            // Idle: release expired activations here, on a worker, outside the lock.
            drop(q);
            shared.training.sweep();
            q = lock(&shared.queues);
        }
    }
}

/// Waits for more jobs of `unit` to join `jobs` until the batch is full, the
/// engine drains, or the time `until(now)` gives passes (None: stop now).
fn gather<'a>(
    shared: &'a Shared,
    mut q: MutexGuard<'a, Queues>,
    unit: &Unit,
    jobs: &mut Vec<Job>,
    until: impl Fn(Instant) -> Option<Instant>,
) -> MutexGuard<'a, Queues> {
    let max = unit.slot().max_batch;
    loop {
        let now = Instant::now();
        let Some(until) = until(now).filter(|&u| u > now && !q.draining) else {
            return q;
        };
        q.sleeping += 1;
        q = shared
            .work
            .wait_timeout(q, until - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        q.sleeping -= 1;
        // Entries may have come and gone meanwhile; this one stays while it
        // has a batch running.
        let Some(i) = q.position(unit.id) else {
            return q;
        };
        take_compatible(unit, &mut q.entries[i].queue, jobs, max);
        if full(unit.slot(), rows(jobs)) {
            return q;
        }
    }
}

/// Whether a batch of `rows` should run without waiting for more.
fn full(slot: &ModelSlot, rows: usize) -> bool {
    rows >= slot.max_batch || slot.preferred_batch.contains(&rows)
}

/// Workers in the middle of a forward.
fn busy_count(shared: &Shared) -> usize {
    shared
        .busy_since
        .iter()
        .filter(|b| b.load(Ordering::Relaxed) != 0)
        .count()
}

fn rows(jobs: &[Job]) -> usize {
    jobs.iter()
        .map(|j| j.batch_key().map_or(1, |(r, _)| r.max(1) as usize))
        .sum()
}

/// Moves jobs from the queue into `jobs`: the first live job, then (when batching)
/// every later job with the same trailing shape and dtype while rows fit.
/// Expired and cancelled jobs are answered and dropped without compute.
fn take_compatible(unit: &Unit, queue: &mut VecDeque<Job>, jobs: &mut Vec<Job>, max_batch: usize) {
    let now = Instant::now();
    let mut i = 0;
    while i < queue.len() {
        if jobs.len() == 1 && (max_batch <= 1 || jobs[0].batch_key().is_none()) {
            return;
        }
        let job = &queue[i];
        // Deadline first: a request whose deadline passed has also lost its
        // waiting handler, and should be counted as what it is.
        if job.deadline.is_some_and(|d| d <= now) || job.queue_deadline.is_some_and(|d| d <= now) {
            unit.metrics.deadline.inc();
            if let Some(job) = queue.remove(i) {
                let _ = job.reply.send(Err(EngineError::DeadlineExceeded {
                    waited_ms: job.enqueued.elapsed().as_millis(),
                    computing: false,
                }));
            }
            continue;
        }
        if job.reply.is_closed() {
            unit.metrics.cancelled.inc();
            queue.remove(i);
            continue;
        }
        let fits = match jobs.first() {
            None => true,
            Some(first) => match (first.batch_key(), job.batch_key()) {
                (Some((_, a)), Some((r, b))) => {
                    a == b && rows(jobs) + r.max(1) as usize <= max_batch
                }
                _ => false,
            },
        };
        if fits {
            if let Some(job) = queue.remove(i) {
                job.taken.store(true, Ordering::Release);
                jobs.push(job);
            }
        } else {
            i += 1;
        }
        if rows(jobs) >= max_batch.max(1) {
            return;
        }
    }
}

/// Computes a batch, marks the worker idle (`busy`), then replies: a client that
/// has its answer sees the worker idle, in metrics and probes alike.
fn run_batch(shared: &Shared, unit: &Unit, mut jobs: Vec<Job>, started: Instant, busy: &AtomicU64) {
    let model = &unit.model;
    // The wait is over: closing the queue spans records it.
    for job in &mut jobs {
        drop(std::mem::replace(
            &mut job.queue_span,
            tracing::Span::none(),
        ));
    }
    let span = tracing::debug_span!(
        parent: &jobs[0].rpc_span,
        "forward",
        model = %model.name,
        version = unit.slot().version,
        batch_size = jobs.len(),
        shape = ?jobs[0].input.shape,
        device = %model::device_name(model.device),
    );
    for job in &jobs[1..] {
        span.follows_from(&job.rpc_span);
    }
    let _entered = span.enter();
    // KV session decode steps batch with each other; any other training or
    // KV-cache step is alone in its batch, and a session prompt runs in chunks.
    let decode = unit.training.filter(|_| jobs[0].decode.is_some());
    let resume = match &mut jobs[..] {
        [job] => job.prefill.take(),
        _ => None,
    };
    let resumed = resume.is_some();
    let mut more: Option<Box<Prefill>> = None;
    let mut decoded = DecodeBatch::default();
    let step = match &jobs[..] {
        [job] => job.step.as_ref().map(|s| (s, job)),
        _ => None,
    };
    convert_time::reset();
    let computed = catch_unwind(AssertUnwindSafe(|| match (step, unit.training) {
        _ if decode.is_some() => {
            let index = decode.unwrap_or_default();
            let rows: Vec<_> = jobs
                .iter()
                .filter_map(|j| {
                    let s = j.step.as_ref()?;
                    shared.training.decode_row(index, model, s, &j.input, j.enc)
                })
                .collect();
            if rows.len() != jobs.len() {
                return jobs
                    .iter()
                    .map(|_| Err(EngineError::Internal("a decode batch lost a row".into())))
                    .collect();
            }
            let (results, stats) = shared.training.decode_batch(index, model, &rows);
            decoded = stats;
            results
                .into_iter()
                .map(|r| {
                    r.map(|(t, present)| (vec![t], present))
                        .map_err(EngineError::from)
                })
                .collect()
        }
        (Some((s, job)), Some(index)) => {
            match shared
                .training
                .run_chunked(index, model, s, &job.input, job.enc, resume)
            {
                Chunked::Done(r) => vec![
                    r.map(|(t, present)| (vec![t], present))
                        .map_err(EngineError::from),
                ],
                Chunked::More(p) => {
                    more = Some(p);
                    Vec::new()
                }
            }
        }
        // A model without training state still decodes with the client's cache.
        (Some((s, job)), None) => vec![
            crate::training::run_plain_kv(model, s, &job.input, job.enc)
                .map(|(t, present)| (vec![t], present))
                .map_err(EngineError::from),
        ],
        (None, _) => compute(model, &jobs, &unit.metrics)
            .into_iter()
            .map(|r| r.map(|ts| (ts, Vec::new())))
            .collect(),
    }));
    let compute_time = started.elapsed();
    let (input_time, output_time) = convert_time::take();
    busy.store(0, Ordering::Relaxed);
    let m = &unit.metrics;
    if more.is_some() || resumed {
        m.kv_prefill_chunks.inc();
    }
    if let (Some(p), Ok(_), [_]) = (more, &computed, &jobs[..]) {
        // More chunks to go: back to the end of the queue, behind the decode
        // steps that arrived meanwhile. Its deadline and cancellation apply there.
        m.forwards.inc();
        let mut job = jobs.remove(0);
        job.prefill = Some(p);
        let mut q = lock(&shared.queues);
        match q.position(unit.id) {
            Some(i) => {
                q.entries[i].queue.push_back(job);
                if q.sleeping > 0 {
                    shared.work.notify_one();
                }
            }
            None => {
                let _ = job.reply.send(Err(EngineError::Internal(
                    "the model was unloaded during a prompt".into(),
                )));
            }
        }
        return;
    }
    if decoded.rows > 0 {
        m.kv_decode_batch.observe(decoded.rows as f64);
        m.kv_decoded_tokens.inc_by(decoded.rows as u64);
        if decoded.mixed {
            m.kv_mixed_batches.inc();
        }
    }
    let results = match computed {
        Ok(r) => r,
        Err(panic) => {
            let e = model::run_error(&model.name, &model::panic_text(panic.as_ref()), false);
            jobs.iter()
                .map(|_| Err(EngineError::Model(e.clone())))
                .collect()
        }
    };
    for r in &results {
        if let Err(EngineError::Model(ModelError::DeviceFailed {
            message,
            fatal: true,
            ..
        })) = r
        {
            mark_device_lost(shared, message);
        }
    }
    let batch_size = jobs.len();
    m.forwards.inc();
    m.triton.executions.inc();
    m.batch_size.observe(batch_size as f64);
    // Triton's batch size of a request: its first dimension, unless the
    // model's config says it has none (max_batch_size 0).
    let unbatched = unit
        .slot()
        .config
        .as_ref()
        .is_some_and(|c| c.max_batch_size == 0);
    // Sessions that decoded: answered now, and whether each goes on.
    let sessions: Vec<(Handle, bool)> = jobs
        .iter()
        .zip(&results)
        .filter_map(|(job, r)| {
            let goes_on = r.as_ref().is_ok_and(|(_, present)| !present.is_empty());
            job.decode.map(|h| (h, goes_on))
        })
        .collect();
    // Before the replies: a client may send its next step the moment it has one.
    if !sessions.is_empty() {
        lock(&unit.decoders).answered(&sessions, started.elapsed(), Instant::now());
    }
    for (job, result) in jobs.into_iter().zip(results) {
        let queue_time = started.saturating_duration_since(job.enqueued);
        if result.is_ok() {
            m.computed.inc();
            m.computed_rows
                .inc_by(job.input.shape.first().map_or(1, |&r| r.max(0) as u64));
            m.queue_time.observe(queue_time.as_secs_f64());
            m.inference_time.observe(compute_time.as_secs_f64());
            let rows = match (unbatched, job.input.shape.first()) {
                (false, Some(&r)) => r.max(1) as u64,
                _ => 1,
            };
            m.triton.succeeded(
                rows,
                RequestTimes {
                    request: job.enqueued.elapsed(),
                    queue: queue_time,
                    input: input_time,
                    infer: compute_time.saturating_sub(input_time + output_time),
                    output: output_time,
                },
            );
        } else {
            m.triton.failure.inc();
        }
        let _ = job
            .reply
            .send(result.and_then(|(mut tensors, present_key_values)| {
                if tensors.is_empty() {
                    return Err(EngineError::Model(ModelError::Internal {
                        model: model.name.clone(),
                        message: "forward returned no tensor".into(),
                    }));
                }
                let tensor = tensors.remove(0);
                Ok(Output {
                    tensor,
                    others: tensors,
                    compute_time,
                    queue_time,
                    batch_size,
                    present_key_values,
                })
            }));
    }
}

fn mark_device_lost(shared: &Shared, reason: &str) {
    if shared.device_lost.set(reason.to_string()).is_ok() {
        tracing::error!(
            reason,
            "fatal device error: the CUDA context is unusable; refusing new work, \
             liveness NOT_SERVING so that the orchestrator restarts the process"
        );
    }
}

/// Runs one forward for the jobs (one, or a compatible batch) and splits the
/// outputs back. A batch is joined on the host and copied to the device once,
/// and each output copied back once and split on the host. A failed batch is
/// retried one by one, so one bad request cannot fail its neighbours.
fn compute(
    model: &Model,
    jobs: &[Job],
    m: &ModelMetrics,
) -> Vec<Result<Vec<RawTensor>, EngineError>> {
    if jobs.len() == 1 {
        return vec![compute_one(model, &jobs[0], m)];
    }
    let batched = (|| -> Result<Vec<Vec<RawTensor>>, EngineError> {
        let raws: Vec<&RawTensor> = jobs.iter().map(|j| &j.input).collect();
        let kind = model::input_kind(&jobs[0].input, jobs[0].enc);
        let x = convert_time::input(|| model::batch_to_device(model, &raws, kind))?;
        m.to_device.inc();
        let sizes: Vec<i64> = jobs.iter().map(|j| j.input.shape[0]).collect();
        let total: i64 = sizes.iter().sum();
        // Jobs batch only with jobs that want the same outputs (batch_key).
        let ys = if jobs[0].all_outputs {
            model.forward_all(std::slice::from_ref(&x))?
        } else {
            vec![model.forward(&x)?]
        };
        let mut per_job: Vec<Vec<RawTensor>> = jobs.iter().map(|_| Vec::new()).collect();
        for y in &ys {
            if y.dim() == 0 || y.size()[0] != total {
                return Err(EngineError::Model(ModelError::Internal {
                    model: model.name.clone(),
                    message: format!(
                        "output shape {:?} does not keep the batch dimension ({total} rows in); \
                         turn batching off for this model",
                        y.size()
                    ),
                }));
            }
            // One dtype for every reply: narrowed on the device when that
            // shrinks the copy; otherwise each part is converted on the host.
            let dtypes = jobs
                .iter()
                .map(|j| model::reply_dtype(model, y.kind(), j.enc))
                .collect::<Result<Vec<_>, _>>()?;
            let shared_dtype = dtypes
                .first()
                .copied()
                .filter(|d| dtypes.iter().all(|e| e == d));
            let host = convert_time::output(|| model::to_host(model, y, shared_dtype))?;
            m.to_host.inc();
            let parts = host
                .f_split_with_sizes(&sizes, 0)
                .map_err(|e| internal(model, e))?;
            for ((p, j), out) in parts.iter().zip(jobs).zip(&mut per_job) {
                out.push(from_tensor(model, p, j.enc)?);
            }
        }
        Ok(per_job)
    })();
    match batched {
        Ok(outs) => outs.into_iter().map(Ok).collect(),
        Err(_) => jobs.iter().map(|j| compute_one(model, j, m)).collect(),
    }
}

fn compute_one(model: &Model, job: &Job, m: &ModelMetrics) -> Result<Vec<RawTensor>, EngineError> {
    if !job.all_outputs {
        let x = to_tensor(model, job)?;
        m.to_device.inc();
        let y = model.forward(&x)?;
        m.to_host.inc();
        return Ok(vec![from_tensor(model, &y, job.enc)?]);
    }
    let mut xs = vec![to_tensor(model, job)?];
    for raw in &job.more {
        xs.push(convert_time::input(|| {
            model::raw_to_tensor(model, raw, job.enc)
        })?);
    }
    m.to_device.inc_by(xs.len() as u64);
    let ys = model.forward_all(&xs)?;
    m.to_host.inc_by(ys.len() as u64);
    ys.iter()
        .map(|y| Ok(from_tensor(model, y, job.enc)?))
        .collect()
}

fn internal(model: &Model, e: tch::TchError) -> EngineError {
    EngineError::Model(model::internal(model, e))
}

fn to_tensor(model: &Model, job: &Job) -> Result<Tensor, EngineError> {
    Ok(convert_time::input(|| {
        model::raw_to_tensor(model, &job.input, job.enc)
    })?)
}

/// [`model::from_tensor`], its time counted as output conversion.
fn from_tensor(model: &Model, t: &Tensor, enc: Encoding) -> Result<RawTensor, ModelError> {
    convert_time::output(|| model::from_tensor(model, t, enc))
}

/// Time a worker spent turning wire bytes into tensors and back during one
/// batch: Triton's compute input and compute output durations (the rest of
/// the batch's compute time is its infer duration).
mod convert_time {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    thread_local! {
        static SPENT: Cell<(Duration, Duration)> = const { Cell::new((Duration::ZERO, Duration::ZERO)) };
    }

    pub fn reset() {
        SPENT.set((Duration::ZERO, Duration::ZERO));
    }

    /// (input, output) since the last reset.
    pub fn take() -> (Duration, Duration) {
        SPENT.replace((Duration::ZERO, Duration::ZERO))
    }

    pub fn input<T>(f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        SPENT.set({
            let (i, o) = SPENT.get();
            (i + start.elapsed(), o)
        });
        out
    }

    pub fn output<T>(f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        SPENT.set({
            let (i, o) = SPENT.get();
            (i, o + start.elapsed())
        });
        out
    }
}
