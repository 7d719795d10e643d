//! Queues, batcher, inference workers, deadlines, cancellation and drain.
//!
//! io threads call [`Engine::infer`], which checks, enqueues and awaits a oneshot
//! reply. W dedicated OS threads own every libtorch call: a loader thread applies
//! the thread plan and loads the models, then the workers pop jobs (batched when a
//! model allows it), skip the ones whose deadline passed or whose client left, run
//! the forward under no_grad and reply. Readiness flows out through a `watch`.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter};
use tch::{Device, Kind, Tensor};
use tokio::sync::{oneshot, watch};

use crate::codec::{Encoding, RawTensor};
use crate::model::{self, DeviceRequest, Model, ModelError, ModelSpec};
use crate::plan::ThreadPlan;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::reason;
use crate::training::{Step, Training, TrainingConfig, TrainingError};

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
    #[error("models are still loading; retry shortly")]
    Loading,
    #[error("the server failed to start: {0}")]
    Failed(String),
    #[error("the server is shutting down and accepts no new requests")]
    Draining,
    #[error("queue for model {model:?} is full ({capacity} requests waiting); retry with backoff")]
    QueueFull { model: String, capacity: usize },
    #[error(
        "deadline exceeded after {waited_ms} ms waiting in the queue; the request was not computed"
    )]
    DeadlineExceeded { waited_ms: u128 },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Training(TrainingError),
    #[error("{0}")]
    Internal(String),
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

/// Per-model settings the engine needs.
#[derive(Debug, Clone)]
pub struct ModelSlot {
    pub spec: ModelSpec,
    /// ComputeBackward's learning_rate may update this model's parameters.
    pub trainable: bool,
    /// Most rows one batched forward joins; 1 turns batching off.
    pub max_batch: usize,
    /// How long a worker holding a partial batch waits for more requests.
    pub batch_timeout: Duration,
}

/// What the engine is started with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The models, the first being the default for an empty model_id.
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
    forwards: IntCounter,
    queue_full: IntCounter,
    deadline: IntCounter,
    cancelled: IntCounter,
    draining: IntCounter,
    queue_time: Histogram,
    inference_time: Histogram,
    batch_size: Histogram,
}

impl ModelMetrics {
    fn new(m: &Metrics, model: &str) -> ModelMetrics {
        let rejected = |r: &str| m.rejected.with_label_values(&[model, r]);
        ModelMetrics {
            computed: m.computed.with_label_values(&[model]),
            forwards: m.forwards.with_label_values(&[model]),
            queue_full: rejected(reason::QUEUE_FULL),
            deadline: rejected(reason::DEADLINE),
            cancelled: rejected(reason::CANCELLED),
            draining: rejected(reason::DRAINING),
            queue_time: m.queue_duration.with_label_values(&[model]),
            inference_time: m.inference_duration.with_label_values(&[model]),
            batch_size: m.batch_size.with_label_values(&[model]),
        }
    }
}

/// What jobs must share to be batched: trailing shape, dtype, and whether
/// they want every output.
type BatchKey<'a> = (&'a [i64], Kind, bool);

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
    enqueued: Instant,
    reply: oneshot::Sender<Result<Output, EngineError>>,
    /// The RPC's span: the forward span is its child.
    rpc_span: tracing::Span,
    /// Open while the job waits; closing it records the queue wait.
    queue_span: tracing::Span,
}

impl Job {
    /// Rows along dimension 0 and the batching key, or None if it cannot
    /// batch: steps, and requests with several inputs, run alone.
    fn batch_key(&self) -> Option<(i64, BatchKey<'_>)> {
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
            ),
        ))
    }
}

struct Queues {
    per_model: Vec<VecDeque<Job>>,
    draining: bool,
    /// Next model a worker looks at first, for fairness between models.
    next: usize,
    /// Workers blocked on the condvar: with none, a new job needs no wake-up
    /// (and its futex syscall), since a busy worker checks the queue when done.
    sleeping: usize,
}

struct Shared {
    config: EngineConfig,
    queues: Mutex<Queues>,
    work: Condvar,
    status: watch::Sender<EngineStatus>,
    models: OnceLock<Vec<Model>>,
    device: OnceLock<Device>,
    /// The plan libtorch actually runs with.
    applied_plan: OnceLock<ThreadPlan>,
    metrics: Arc<Metrics>,
    /// Per model, in model order.
    model_metrics: Vec<ModelMetrics>,
    /// Per worker: when its current job started (ns since `epoch`), 0 when idle.
    busy_since: Vec<AtomicU64>,
    epoch: Instant,
    exited_workers: AtomicUsize,
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
        let model_metrics = config
            .models
            .iter()
            .map(|m| ModelMetrics::new(&metrics, &m.spec.name))
            .collect();
        let workers = config.plan.workers;
        let training = Training::new(&config.training, config.models.len());
        let (status, _) = watch::channel(EngineStatus::Loading);
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues {
                per_model: config.models.iter().map(|_| VecDeque::new()).collect(),
                draining: false,
                next: 0,
                sleeping: 0,
            }),
            config,
            work: Condvar::new(),
            status,
            models: OnceLock::new(),
            device: OnceLock::new(),
            applied_plan: OnceLock::new(),
            model_metrics,
            metrics,
            busy_since: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            exited_workers: AtomicUsize::new(0),
            training,
        });
        let loader_shared = shared.clone();
        let loader = std::thread::Builder::new()
            .name("splitserve-loader".into())
            .spawn(move || load_then_start_workers(loader_shared));
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
    /// or None for an unknown model.
    pub fn resolve_model(&self, model_id: &str) -> Option<&str> {
        self.model_index(model_id)
            .ok()
            .map(|i| self.shared.config.models[i].spec.name.as_str())
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

    /// Names of the served models; the first is the default.
    pub fn model_names(&self) -> Vec<String> {
        self.shared
            .config
            .models
            .iter()
            .map(|m| m.spec.name.clone())
            .collect()
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

    /// The inputs and outputs of a loaded model (resolved name), when known.
    pub fn signature(&self, name: &str) -> Option<model::Signature> {
        self.shared
            .models
            .get()?
            .iter()
            .find(|m| m.name == name)?
            .signature
            .clone()
    }

    /// The settings a model was started with (resolved name).
    pub fn slot(&self, name: &str) -> Option<&ModelSlot> {
        self.shared
            .config
            .models
            .iter()
            .find(|m| m.spec.name == name)
    }

    /// (name, device, description) of each loaded model.
    pub fn loaded_models(&self) -> Vec<(String, String, String)> {
        self.shared
            .models
            .get()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            m.name.clone(),
                            model::device_name(m.device),
                            m.description.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Requests waiting in each model's queue, in model order.
    pub fn queue_depths(&self) -> Vec<usize> {
        lock(&self.shared.queues)
            .per_model
            .iter()
            .map(VecDeque::len)
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

    fn model_index(&self, name: &str) -> Result<usize, EngineError> {
        let models = &self.shared.config.models;
        if name.is_empty() {
            return Ok(0);
        }
        models
            .iter()
            .position(|m| m.spec.name == name)
            .ok_or_else(|| EngineError::UnknownModel {
                name: crate::codec::clip(name),
                known: models
                    .iter()
                    .map(|m| format!("{:?}", m.spec.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
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

    /// Queues a request with one or more inputs (explicit dtypes) and returns
    /// every output of the model: the Open Inference Protocol's inference.
    pub async fn infer_all(
        &self,
        model: &str,
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
        self.enqueue(model, input, inputs, true, enc, deadline, None)
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
        self.enqueue(model, input, Vec::new(), false, enc, deadline, step)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn enqueue(
        &self,
        model: &str,
        input: RawTensor,
        more: Vec<RawTensor>,
        all_outputs: bool,
        enc: Encoding,
        deadline: Option<Instant>,
        step: Option<Step>,
    ) -> Result<Output, EngineError> {
        let index = self.model_index(model)?;
        match &*self.shared.status.borrow() {
            EngineStatus::Ready => {}
            EngineStatus::Loading => return Err(EngineError::Loading),
            EngineStatus::Failed(m) => return Err(EngineError::Failed(m.clone())),
            EngineStatus::Draining | EngineStatus::Stopped => {
                self.shared.model_metrics[index].draining.inc();
                return Err(EngineError::Draining);
            }
        }
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let wake = {
            let mut q = lock(&self.shared.queues);
            if q.draining {
                self.shared.model_metrics[index].draining.inc();
                return Err(EngineError::Draining);
            }
            let cap = self.shared.config.queue_capacity;
            let queue = &mut q.per_model[index];
            if queue.len() >= cap {
                self.shared.model_metrics[index].queue_full.inc();
                return Err(EngineError::QueueFull {
                    model: self.shared.config.models[index].spec.name.clone(),
                    capacity: cap,
                });
            }
            let rpc_span = tracing::Span::current();
            let queue_span =
                tracing::debug_span!("queue", model = %self.shared.config.models[index].spec.name);
            queue.push_back(Job {
                input,
                more,
                all_outputs,
                enc,
                step,
                deadline,
                enqueued: now,
                reply: tx,
                rpc_span,
                queue_span,
            });
            q.sleeping > 0
        };
        if wake {
            self.shared.work.notify_one();
        }
        let received = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), rx).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(EngineError::DeadlineExceeded {
                        waited_ms: now.elapsed().as_millis(),
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
            for queue in &mut q.per_model {
                for job in queue.drain(..) {
                    let _ = job.reply.send(Err(EngineError::Draining));
                }
            }
        }
        finished
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned queue lock means a worker panicked outside catch_unwind; the
    // queue itself is still consistent (every mutation is a single push/pop).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn load_then_start_workers(shared: Arc<Shared>) {
    let plan = shared.config.plan.apply_to_libtorch();
    let _ = shared.applied_plan.set(plan);
    let loaded = (|| -> Result<Vec<Model>, ModelError> {
        let device = model::resolve_device(shared.config.device)?;
        let _ = shared.device.set(device);
        shared
            .config
            .models
            .iter()
            .map(|slot| {
                let started = Instant::now();
                let m = Model::load(&slot.spec, device)?;
                tracing::info!(
                    model = %m.name,
                    source = %m.description,
                    device = %model::device_name(device),
                    warmed_up = slot.spec.warmup.is_some() || !matches!(slot.spec.source, model::ModelSource::TorchScript(_)),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                );
                Ok(m)
            })
            .collect()
    })();
    let mut models = match loaded {
        Ok(models) => models,
        Err(e) => {
            tracing::error!(error = %e, "model loading failed");
            shared
                .status
                .send_replace(EngineStatus::Failed(e.to_string()));
            return;
        }
    };
    // Trained models continue from their newest checkpoint.
    shared.training.resume(&mut models);
    let _ = shared.models.set(models);
    for i in 0..shared.config.plan.workers {
        let s = shared.clone();
        match std::thread::Builder::new()
            .name(format!("splitserve-worker-{i}"))
            .spawn(move || worker_loop(s, i))
        {
            Ok(_) => {}
            Err(e) => {
                shared.status.send_replace(EngineStatus::Failed(format!(
                    "cannot start worker {i}: {e}"
                )));
                return;
            }
        }
    }
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
}

fn worker_loop(shared: Arc<Shared>, index: usize) {
    if let Some(plan) = shared.applied_plan.get() {
        ThreadPlan::pin_this_thread(plan);
    }
    let _grad = tch::no_grad_guard();
    while let Some((model, jobs)) = next_batch(&shared) {
        // Busy workers release expired activations too, at most once per period.
        shared.training.sweep();
        let started = Instant::now();
        let since = shared.epoch.elapsed().as_nanos().max(1) as u64;
        shared.busy_since[index].store(since, Ordering::Relaxed);
        run_batch(&shared, model, jobs, started, &shared.busy_since[index]);
    }
    // Draining and nothing left: the last worker out marks the engine stopped.
    if shared.exited_workers.fetch_add(1, Ordering::SeqCst) + 1 == shared.config.plan.workers {
        if let Some(models) = shared.models.get() {
            // Every queue is empty: save trained parameters, release activations.
            shared.training.shutdown(models);
        }
        shared.status.send_replace(EngineStatus::Stopped);
    }
}

/// Blocks until there is work. Returns None when draining and nothing is left.
fn next_batch(shared: &Shared) -> Option<(usize, Vec<Job>)> {
    let mut q = lock(&shared.queues);
    loop {
        let n = q.per_model.len();
        let start = q.next;
        let found = (0..n)
            .map(|k| (start + k) % n)
            .find(|&m| !q.per_model[m].is_empty());
        if let Some(m) = found {
            q.next = (m + 1) % n;
            let slot = &shared.config.models[m];
            let mut jobs = Vec::new();
            take_compatible(shared, m, &mut q.per_model[m], &mut jobs, slot.max_batch);
            if jobs.is_empty() {
                continue; // everything we looked at had expired or been cancelled
            }
            // Wait a little for the batch to fill, if the model allows it and no
            // other worker is idle: an idle worker would start on new arrivals at
            // once, so waiting would only add latency.
            if slot.max_batch > 1
                && !slot.batch_timeout.is_zero()
                && rows(&jobs) < slot.max_batch
                && busy_count(shared) + 1 >= shared.busy_since.len()
            {
                let until = Instant::now() + slot.batch_timeout;
                loop {
                    let now = Instant::now();
                    if now >= until || q.draining {
                        break;
                    }
                    q.sleeping += 1;
                    q = shared
                        .work
                        .wait_timeout(q, until - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    q.sleeping -= 1;
                    take_compatible(shared, m, &mut q.per_model[m], &mut jobs, slot.max_batch);
                    if rows(&jobs) >= slot.max_batch {
                        break;
                    }
                }
            }
            return Some((m, jobs));
        }
        if q.draining {
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
fn take_compatible(
    shared: &Shared,
    model: usize,
    queue: &mut VecDeque<Job>,
    jobs: &mut Vec<Job>,
    max_batch: usize,
) {
    let now = Instant::now();
    let mut i = 0;
    while i < queue.len() {
        if jobs.len() == 1 && (max_batch <= 1 || jobs[0].batch_key().is_none()) {
            return;
        }
        let job = &queue[i];
        // Deadline first: a request whose deadline passed has also lost its
        // waiting handler, and should be counted as what it is.
        if job.deadline.is_some_and(|d| d <= now) {
            shared.model_metrics[model].deadline.inc();
            if let Some(job) = queue.remove(i) {
                let _ = job.reply.send(Err(EngineError::DeadlineExceeded {
                    waited_ms: job.enqueued.elapsed().as_millis(),
                }));
            }
            continue;
        }
        if job.reply.is_closed() {
            shared.model_metrics[model].cancelled.inc();
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
fn run_batch(
    shared: &Shared,
    model_index: usize,
    mut jobs: Vec<Job>,
    started: Instant,
    busy: &AtomicU64,
) {
    let Some(models) = shared.models.get() else {
        busy.store(0, Ordering::Relaxed);
        return;
    };
    let model = &models[model_index];
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
        batch_size = jobs.len(),
        shape = ?jobs[0].input.shape,
        device = %model::device_name(model.device),
    );
    for job in &jobs[1..] {
        span.follows_from(&job.rpc_span);
    }
    let _entered = span.enter();
    // A training or KV-cache step is always alone in its batch.
    let step = match &jobs[..] {
        [job] => job.step.as_ref().map(|s| (s, job)),
        _ => None,
    };
    let computed = catch_unwind(AssertUnwindSafe(|| match step {
        Some((s, job)) => vec![
            shared
                .training
                .run(model_index, model, s, &job.input, job.enc)
                .map(|(t, present)| (vec![t], present))
                .map_err(EngineError::from),
        ],
        None => compute(model, &jobs)
            .into_iter()
            .map(|r| r.map(|ts| (ts, Vec::new())))
            .collect(),
    }));
    let compute_time = started.elapsed();
    busy.store(0, Ordering::Relaxed);
    let results = match computed {
        Ok(r) => r,
        Err(panic) => {
            let msg = model::panic_message(panic.as_ref());
            jobs.iter()
                .map(|_| {
                    Err(EngineError::Model(ModelError::Internal {
                        model: model.name.clone(),
                        message: msg.clone(),
                    }))
                })
                .collect()
        }
    };
    let batch_size = jobs.len();
    let m = &shared.model_metrics[model_index];
    m.forwards.inc();
    m.batch_size.observe(batch_size as f64);
    for (job, result) in jobs.into_iter().zip(results) {
        let queue_time = started.saturating_duration_since(job.enqueued);
        if result.is_ok() {
            m.computed.inc();
            m.queue_time.observe(queue_time.as_secs_f64());
            m.inference_time.observe(compute_time.as_secs_f64());
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

/// Runs one forward for the jobs (one, or a compatible batch) and splits the
/// outputs back. A failed batch is retried one by one, so one bad request
/// cannot fail its neighbours.
fn compute(model: &Model, jobs: &[Job]) -> Vec<Result<Vec<RawTensor>, EngineError>> {
    if jobs.len() == 1 {
        return vec![compute_one(model, &jobs[0])];
    }
    let batched = (|| -> Result<Vec<Vec<RawTensor>>, EngineError> {
        let inputs = jobs
            .iter()
            .map(|j| to_tensor(model, j))
            .collect::<Result<Vec<_>, _>>()?;
        let sizes: Vec<i64> = jobs.iter().map(|j| j.input.shape[0]).collect();
        let total: i64 = sizes.iter().sum();
        let x = Tensor::f_cat(&inputs, 0).map_err(|e| internal(model, e))?;
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
            let parts = y
                .f_split_with_sizes(&sizes, 0)
                .map_err(|e| internal(model, e))?;
            for ((p, j), out) in parts.iter().zip(jobs).zip(&mut per_job) {
                out.push(model::from_tensor(model, p, j.enc)?);
            }
        }
        Ok(per_job)
    })();
    match batched {
        Ok(outs) => outs.into_iter().map(Ok).collect(),
        Err(_) => jobs.iter().map(|j| compute_one(model, j)).collect(),
    }
}

fn compute_one(model: &Model, job: &Job) -> Result<Vec<RawTensor>, EngineError> {
    if !job.all_outputs {
        let x = to_tensor(model, job)?;
        let y = model.forward(&x)?;
        return Ok(vec![model::from_tensor(model, &y, job.enc)?]);
    }
    let mut xs = vec![to_tensor(model, job)?];
    for raw in &job.more {
        xs.push(model::raw_to_tensor(model, raw, job.enc)?);
    }
    model
        .forward_all(&xs)?
        .iter()
        .map(|y| Ok(model::from_tensor(model, y, job.enc)?))
        .collect()
}

fn internal(model: &Model, e: tch::TchError) -> EngineError {
    EngineError::Model(model::internal(model, e))
}

fn to_tensor(model: &Model, job: &Job) -> Result<Tensor, EngineError> {
    Ok(model::raw_to_tensor(model, &job.input, job.enc)?)
}
