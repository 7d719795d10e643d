//! Split training and KV-cache inference: the activation store keyed by
//! forward_id, backward through the server's partition, optimizer steps and
//! checkpoints.
//!
//! Everything that touches a tensor runs on the engine's worker threads, as a
//! [`Step`] that travels through the model's queue like any request. io threads
//! only look forward_ids up and read counters, which is plain Rust. The design,
//! the accumulation rule and the checkpoint format are in docs/training.md.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use serde::Deserialize;
use tch::Tensor;

use crate::codec::{Encoding, RawTensor};
use crate::model::{self, Model, ModelError};

mod checkpoint;
mod decode;
pub mod sessions;

pub use decode::{Chunked, DecodeBatch, DecodeRow, Decoders, Prefill};

use sessions::{Handle, SessionConfig, SessionError, Sessions};

/// Forward_ids whose fate is remembered for NOT_FOUND messages.
const GONE_REMEMBERED: usize = 4096;

/// What the training side is started with.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    /// Model names in model order, for messages.
    pub names: Vec<String>,
    /// Most bytes of stored activations (`--activation-cache-bytes`).
    pub cache_bytes: u64,
    /// How long stored activations wait for their backward (`--activation-ttl`).
    pub ttl: Duration,
    /// Each model's optimizer, in model order.
    pub optimizers: Vec<OptimizerSettings>,
    pub checkpoint_dir: Option<PathBuf>,
    /// Save after every N optimizer steps of a model; 0 = only on shutdown.
    pub checkpoint_every: u64,
    /// Largest learning_rate a backward may ask for.
    pub max_learning_rate: f64,
    /// Per model, the learning rate a backward without one uses (trainable
    /// models only; `--learning-rate`).
    pub learning_rates: Vec<Option<f64>>,
    /// Complete checkpoints kept per model (`--checkpoint-keep`).
    pub checkpoint_keep: usize,
    /// Largest accumulation_step a backward may ask for.
    pub max_accumulation_steps: u32,
    /// Per model, in model order: KV caches stay on the server (`--kv-sessions`).
    pub kv_sessions: Vec<bool>,
    /// The KV session store's bounds (`--kv-cache-bytes`, `--kv-session-ttl`).
    pub sessions: SessionConfig,
    /// Accumulated gradients whose total L2 norm is above this are scaled down
    /// to it before a step, as `torch.nn.utils.clip_grad_norm_` does
    /// (`--max-grad-norm`).
    pub max_grad_norm: f64,
    /// Models given their own share of `cache_bytes` (`--activation-model-bytes
    /// NAME=BYTES`); the others split what is left equally.
    pub model_cache_bytes: Vec<(String, u64)>,
    /// When checkpoints exist and none loads, start from the model's own
    /// weights instead of refusing to start (`--checkpoint-start-fresh`).
    pub checkpoint_start_fresh: bool,
}

impl TrainingConfig {
    /// Each model's share of `cache_bytes`, in model order: its own when
    /// configured, else an equal part of what the configured ones leave.
    /// The shares never sum above `cache_bytes`, so no model's forwards ever
    /// have to evict another model's activations.
    pub fn model_budgets(&self) -> Vec<u64> {
        let own = |name: &str| {
            self.model_cache_bytes
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, b)| *b)
        };
        let claimed: u64 = self
            .names
            .iter()
            .filter_map(|n| own(n))
            .fold(0u64, u64::saturating_add);
        let rest = self.cache_bytes.saturating_sub(claimed);
        let sharing = self.names.iter().filter(|n| own(n).is_none()).count() as u64;
        self.names
            .iter()
            .map(|n| own(n).unwrap_or(rest / sharing.max(1)))
            .collect()
    }
}

/// Longest forward_id a client may choose, in bytes.
pub const MAX_FORWARD_ID_BYTES: usize = 128;

/// Which update rule ComputeBackward's learning_rate drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Sgd,
    Adam,
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            _ => Err(format!("expected sgd or adam, got {s:?}")),
        }
    }
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
        })
    }
}

/// Adam's (beta1, beta2).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct AdamBetas(pub f64, pub f64);

/// `B1:B2`, each in [0, 1).
impl std::str::FromStr for AdamBetas {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|b| (0.0..1.0).contains(b))
        };
        match s.split_once(':') {
            Some((a, b)) => match (parse(a), parse(b)) {
                (Some(a), Some(b)) => Ok(AdamBetas(a, b)),
                _ => Err(format!("Adam betas must be in [0, 1), got {s:?}")),
            },
            None => Err(format!("expected B1:B2 like 0.9:0.999, got {s:?}")),
        }
    }
}

/// A model's optimizer, as PyTorch's `torch.optim.SGD` / `Adam` define them
/// (no dampening, no Nesterov, no AMSGrad).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    pub momentum: f64,
    pub weight_decay: f64,
    pub betas: AdamBetas,
    pub eps: f64,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        OptimizerSettings {
            kind: OptimizerKind::Sgd,
            momentum: 0.0,
            weight_decay: 0.0,
            betas: AdamBetas(0.9, 0.999),
            eps: 1e-8,
        }
    }
}

impl std::fmt::Display for OptimizerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            OptimizerKind::Sgd => write!(
                f,
                "sgd momentum {} weight_decay {}",
                self.momentum, self.weight_decay
            ),
            OptimizerKind::Adam => write!(
                f,
                "adam betas {}:{} eps {} weight_decay {}",
                self.betas.0, self.betas.1, self.eps, self.weight_decay
            ),
        }
    }
}

/// A job that is not a plain forward. The job's input tensor is the forward's
/// input, the backward's grad_output, or the KV step's hidden state.
#[derive(Debug)]
pub enum Step {
    /// Forward with autograd; keep what the backward needs under `forward_id`.
    Forward { forward_id: String },
    /// Backpropagate grad_output through the graph stored for `forward_id`,
    /// then maybe update the parameters.
    Backward {
        forward_id: String,
        update: Option<Update>,
    },
    /// Incremental decoding: `past` is `[key_0, value_0, key_1, ...]`.
    Kv {
        past: Vec<RawTensor>,
        /// Encoding of the key/value tensors, read and written.
        kv_enc: Encoding,
        /// Answer with the present keys and values.
        want_present: bool,
        /// Set when the request may use a server-side session (it asked for a
        /// cache, or sent a handle); used on models with sessions on.
        session: Option<SessionRequest>,
    },
}

impl Step {
    /// A KV step that needs no state of the server's: the client's own cache,
    /// no session handle.
    pub fn is_plain_kv(&self) -> bool {
        matches!(
            self,
            Step::Kv { session, .. } if session.is_none_or(|s| s.handle.is_none())
        )
    }
}

/// Runs a KV step on a model without training state (loaded from a model
/// repository at run time): only the client's own cache; a session handle is
/// refused, never run as an empty past.
pub fn run_plain_kv(
    model: &Model,
    step: &Step,
    input: &RawTensor,
    enc: Encoding,
) -> Result<(RawTensor, Vec<RawTensor>), TrainingError> {
    match step {
        Step::Kv {
            past,
            kv_enc,
            want_present,
            session,
        } => {
            if session.is_some_and(|s| s.handle.is_some()) {
                return Err(SessionError::NotEnabled {
                    model: model.name.clone(),
                }
                .into());
            }
            kv(model, input, enc, past, *kv_enc, *want_present)
        }
        Step::Forward { .. } | Step::Backward { .. } => Err(TrainingError::BadRequest(
            "this model version takes no training steps".into(),
        )),
    }
}

/// A KV step's claim on a server-side session.
#[derive(Debug, Clone, Copy)]
pub struct SessionRequest {
    /// The handle and past length the request sent; None opens a session.
    pub handle: Option<(Handle, i64)>,
    /// The caller's token identity (0 without authentication).
    pub owner: u64,
}

/// A backward that trains: what ComputeBackward's learning_rate asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    pub learning_rate: f64,
    /// The optimizer steps on the backward call that brings the model's count
    /// of accumulated backward calls to this number (1 = every call).
    pub accumulation: u32,
}

/// Why a forward_id has no stored activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    Unknown,
    Used,
    Expired,
    Evicted,
    Stale,
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Gone::Unknown => {
                "is unknown: no Compute with training_mode=true stored it (or it was released long ago)"
            }
            Gone::Used => {
                "was already used: each training forward allows one ComputeBackward; run Compute again"
            }
            Gone::Expired => {
                "expired: its activations outlived --activation-ttl and were released; run Compute again"
            }
            Gone::Evicted => {
                "was evicted to keep its model's stored activations within its share of \
                 --activation-cache-bytes; run Compute again"
            }
            Gone::Stale => {
                "was released: an optimizer step made its graph stale; run Compute again"
            }
        })
    }
}

/// Why an optimizer step was refused and rolled back (docs/training.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The accumulated gradients hold NaN or Inf (an overflow in the backward).
    Gradient,
    /// A parameter would have become NaN or Inf.
    Parameters,
    /// The optimizer's state (momentum, Adam's moments) would have.
    OptimizerState,
    /// The model's outputs on its warm-up input or on this batch would have.
    Outputs,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Gradient => "its gradients overflowed to NaN or infinity",
            Refusal::Parameters => "it would have made parameters NaN or infinite",
            Refusal::OptimizerState => {
                "it would have made the optimizer state (momentum, Adam moments) NaN or infinite"
            }
            Refusal::Outputs => {
                "it would have made the model's outputs NaN or infinite on its warm-up input or \
                 on this batch"
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainingError {
    #[error("forward_id {forward_id:?} {why}")]
    NotFound { forward_id: String, why: Gone },
    #[error(
        "forward_id {forward_id:?} is already waiting for its ComputeBackward; use a new id for each forward"
    )]
    AlreadyExists { forward_id: String },
    #[error("forward_id {forward_id:?} was computed by model {owner:?}, not {requested:?}")]
    WrongModel {
        forward_id: String,
        owner: String,
        requested: String,
    },
    #[error(
        "grad_output shape {got:?} does not match the output of forward_id {forward_id:?}, {want:?}"
    )]
    GradShape {
        forward_id: String,
        got: Vec<i64>,
        want: Vec<i64>,
    },
    #[error(
        "model {model:?} took an optimizer step after forward_id {forward_id:?} was computed \
         (parameter version {then}, now {now}): its graph refers to parameters that no longer \
         exist. Run Compute again; to combine gradients of forwards in flight together, use \
         accumulation_step"
    )]
    Stale {
        forward_id: String,
        model: String,
        then: u64,
        now: u64,
    },
    #[error(
        "the activations of this forward take {bytes} bytes, more than model {model:?}'s share of \
         the activation cache, {limit} bytes (--activation-cache-bytes, --activation-model-bytes)"
    )]
    TooLarge {
        model: String,
        bytes: u64,
        limit: u64,
    },
    #[error(
        "the optimizer step on model {model:?} was refused: {why}. The weights and the optimizer \
         state are unchanged and the gradients accumulated for this step were dropped. Lower the \
         learning rate or check grad_output"
    )]
    StepRejected { model: String, why: Refusal },
    #[error("{0}")]
    BadRequest(String),
    /// A KV session step that cannot run.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The model itself refused or failed (bad input, a libtorch error).
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Counters GetServiceInfo reports; gauges say so.
#[derive(Debug, Default)]
pub struct TrainingStats {
    /// Gauge: forward_ids waiting for their backward.
    pub stored: AtomicU64,
    /// Gauge: their bytes, as the store counts them.
    pub bytes: AtomicU64,
    pub evicted: AtomicU64,
    pub expired: AtomicU64,
    /// Training forwards stored.
    pub forwards: AtomicU64,
    /// Backward calls answered with a gradient.
    pub backwards: AtomicU64,
    pub optimizer_steps: AtomicU64,
    /// Optimizer steps refused and rolled back (see [`Refusal`]).
    pub steps_rejected: AtomicU64,
    /// Optimizer steps whose gradients were scaled down to `--max-grad-norm`.
    pub grads_clipped: AtomicU64,
    pub checkpoints_saved: AtomicU64,
    /// The same events per model, in model order, for the `model` label.
    pub per_model: Vec<ModelEvents>,
}

/// One model's training events (see [`TrainingStats`]).
#[derive(Debug, Default)]
pub struct ModelEvents {
    pub forwards: AtomicU64,
    pub backwards: AtomicU64,
    pub optimizer_steps: AtomicU64,
    pub steps_rejected: AtomicU64,
    pub grads_clipped: AtomicU64,
    pub evicted: AtomicU64,
    pub expired: AtomicU64,
    pub checkpoints_saved: AtomicU64,
}

impl ModelEvents {
    /// (event label, count) pairs, as `splitserve_training_events_total` names them.
    pub fn events(&self) -> [(&'static str, u64); 8] {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("forward", load(&self.forwards)),
            ("backward", load(&self.backwards)),
            ("optimizer_step", load(&self.optimizer_steps)),
            ("step_rejected", load(&self.steps_rejected)),
            ("grad_clipped", load(&self.grads_clipped)),
            ("eviction", load(&self.evicted)),
            ("expiry", load(&self.expired)),
            ("checkpoint", load(&self.checkpoints_saved)),
        ]
    }
}

/// What one training forward left for its backward.
struct Entry {
    model: usize,
    /// The request's input as a leaf (requires grad when it is floating point).
    input: Tensor,
    /// The forward's output, with its autograd graph.
    output: Tensor,
    out_shape: Vec<i64>,
    /// The model's parameter version the graph was recorded with.
    version: u64,
    bytes: u64,
    created: Instant,
    /// Position in the LRU order.
    tick: u64,
}

#[derive(Default)]
struct Store {
    entries: HashMap<String, Entry>,
    /// Per model: tick -> forward_id, least recently used first. A model's
    /// forwards only ever evict its own entries.
    lru: Vec<BTreeMap<u64, String>>,
    next_tick: u64,
    /// Bytes stored, in all and per model.
    bytes: u64,
    model_bytes: Vec<u64>,
    /// Why recent forward_ids are gone, for NOT_FOUND messages; bounded.
    gone: HashMap<String, Gone>,
    gone_order: VecDeque<String>,
}

impl Store {
    fn new(models: usize) -> Store {
        Store {
            lru: (0..models).map(|_| BTreeMap::new()).collect(),
            model_bytes: vec![0; models],
            ..Store::default()
        }
    }

    fn touch(&mut self, id: &str) {
        let tick = self.next_tick;
        if let Some(e) = self.entries.get_mut(id) {
            let lru = &mut self.lru[e.model];
            lru.remove(&e.tick);
            e.tick = tick;
            lru.insert(tick, id.to_string());
            self.next_tick += 1;
        }
    }

    fn remove(&mut self, id: &str, why: Gone) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        self.lru[e.model].remove(&e.tick);
        self.bytes -= e.bytes;
        self.model_bytes[e.model] -= e.bytes;
        self.bury(id, why);
        Some(e)
    }

    fn bury(&mut self, id: &str, why: Gone) {
        if self.gone.insert(id.to_string(), why).is_none() {
            self.gone_order.push_back(id.to_string());
            while self.gone_order.len() > GONE_REMEMBERED {
                if let Some(old) = self.gone_order.pop_front() {
                    self.gone.remove(&old);
                }
            }
        }
    }

    fn why_gone(&self, id: &str) -> Gone {
        self.gone.get(id).copied().unwrap_or(Gone::Unknown)
    }

    fn not_found(&self, id: &str) -> TrainingError {
        TrainingError::NotFound {
            forward_id: id.to_string(),
            why: self.why_gone(id),
        }
    }
}

/// Per model: the optimizer's state and the accumulation count. Its mutex
/// serializes the model's training backwards and optimizer steps.
#[derive(Default)]
struct ModelState {
    /// The parameters the optimizer updates, fetched at the first step.
    params: Option<Vec<Tensor>>,
    /// SGD momentum buffers, one per parameter.
    momentum: Vec<Option<Tensor>>,
    /// Adam's (exp_avg, exp_avg_sq, steps), one per parameter.
    adam: Vec<Option<(Tensor, Tensor, u64)>>,
    /// Training backward calls accumulated since the last step.
    pending: u32,
    steps: u64,
    /// `steps` when the last checkpoint was written.
    saved_at: u64,
    /// Whether the outputs on the warm-up input were finite at the first step
    /// (None: not looked at yet); steps keep them finite when they were.
    probe_finite: Option<bool>,
}

/// The split-training state of an engine.
pub struct Training {
    config: TrainingConfig,
    /// KV caches kept between decode steps, for models with sessions on.
    sessions: Sessions,
    store: Mutex<Store>,
    /// Each model's share of `--activation-cache-bytes`, in model order.
    budgets: Vec<u64>,
    /// Set when resuming from checkpoints refused to start.
    start_refused: AtomicBool,
    models: Vec<Mutex<ModelState>>,
    /// Optimizer steps per model, readable without waiting for a training job.
    model_steps: Vec<AtomicU64>,
    stats: TrainingStats,
    /// When the next expiry sweep is due, in ms since `epoch`.
    next_sweep_ms: AtomicU64,
    epoch: Instant,
    /// Per model: how long decode batches and prefill chunks take, to size chunks.
    pacing: Vec<decode::Pacer>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent between statements;
    // a panic (caught by the worker) cannot leave it half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

fn internal(model: &Model, e: tch::TchError) -> TrainingError {
    TrainingError::Model(model::internal(model, e))
}

impl Training {
    pub fn new(config: &TrainingConfig, models: usize) -> Training {
        Training {
            config: config.clone(),
            sessions: Sessions::new(config.sessions),
            store: Mutex::new(Store::new(models)),
            budgets: config.model_budgets(),
            start_refused: AtomicBool::new(false),
            models: (0..models).map(|_| Mutex::default()).collect(),
            model_steps: (0..models).map(|_| AtomicU64::new(0)).collect(),
            stats: TrainingStats {
                per_model: (0..models).map(|_| ModelEvents::default()).collect(),
                ..Default::default()
            },
            next_sweep_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            pacing: (0..models).map(|_| decode::Pacer::default()).collect(),
        }
    }

    /// How often stored activations are checked against `--activation-ttl`.
    pub fn sweep_every(&self) -> Duration {
        (self.config.ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Releases expired activations if a sweep is due. Workers call it between
    /// jobs and when idle, so expiry does not wait for the next training request.
    /// Calls libtorch (freeing tensors): worker threads only.
    pub fn sweep(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let due = self.next_sweep_ms.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now + self.sweep_every().as_millis() as u64;
        if self
            .next_sweep_ms
            .compare_exchange(due, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.expire();
        }
    }

    pub fn stats(&self) -> &TrainingStats {
        &self.stats
    }

    /// The KV session store (its counters and gauges).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Counts one event of model `index` for the `model` label.
    fn count_event(&self, index: usize, event: fn(&ModelEvents) -> &AtomicU64) {
        if let Some(e) = self.stats.per_model.get(index) {
            event(e).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The model that must run the backward of `forward_id`. Runs on io
    /// threads: a map lookup, no libtorch.
    pub fn backward_model(
        &self,
        forward_id: &str,
        requested: Option<&str>,
    ) -> Result<String, TrainingError> {
        let owner = {
            let store = lock(&self.store);
            match store.entries.get(forward_id) {
                Some(e) => e.model,
                None => return Err(store.not_found(forward_id)),
            }
        };
        let name = &self.config.names[owner];
        match requested {
            Some(r) if !r.is_empty() && r != name => Err(TrainingError::WrongModel {
                forward_id: forward_id.to_string(),
                owner: name.clone(),
                requested: r.to_string(),
            }),
            _ => Ok(name.clone()),
        }
    }

    /// Runs one step on a worker thread; returns the reply tensor and, for
    /// KV steps, the present keys and values.
    pub fn run(
        &self,
        index: usize,
        model: &Model,
        step: &Step,
        input: &RawTensor,
        enc: Encoding,
    ) -> Result<(RawTensor, Vec<RawTensor>), TrainingError> {
        match step {
            Step::Forward { forward_id } => self
                .forward(index, model, forward_id, input, enc)
                .map(|t| (t, Vec::new())),
            Step::Backward { forward_id, update } => self
                .backward(index, model, forward_id, *update, input, enc)
                .map(|t| (t, Vec::new())),
            Step::Kv {
                past,
                kv_enc,
                want_present,
                session,
            } => match session {
                Some(s) if self.config.kv_sessions.get(index).copied().unwrap_or(false) => {
                    self.session_step(index, model, input, enc, past, *kv_enc, *s, *want_present)
                }
                // A handle where no session can be: never run it as an empty past.
                Some(SessionRequest {
                    handle: Some(_), ..
                }) => Err(SessionError::NotEnabled {
                    model: self.config.names.get(index).cloned().unwrap_or_default(),
                }
                .into()),
                _ => kv(model, input, enc, past, *kv_enc, *want_present),
            },
        }
    }

    fn forward(
        &self,
        index: usize,
        model: &Model,
        forward_id: &str,
        input: &RawTensor,
        enc: Encoding,
    ) -> Result<RawTensor, TrainingError> {
        self.expire();
        if lock(&self.store).entries.contains_key(forward_id) {
            return Err(TrainingError::AlreadyExists {
                forward_id: forward_id.to_string(),
            });
        }
        let x = model::raw_to_tensor(model, input, enc)?;
        // Integer inputs (token ids) have no gradient; the parameters still do.
        let x = if x.is_floating_point() {
            x.set_requires_grad(true)
        } else {
            x
        };
        let (y, version) = {
            let params = model.read_params();
            let y = tch::with_grad(|| model.forward_params_held(&x))?;
            (y, *params)
        };
        let reply = model::from_tensor(model, &y, enc)?;
        let entry = Entry {
            model: index,
            // The key counts too: ids are client-chosen (up to MAX_FORWARD_ID_BYTES).
            bytes: tensor_bytes(&x) + tensor_bytes(&y) + forward_id.len() as u64,
            out_shape: y.size(),
            input: x,
            output: y,
            version,
            created: Instant::now(),
            tick: 0,
        };
        self.insert(forward_id, entry)?;
        self.stats.forwards.fetch_add(1, Ordering::Relaxed);
        self.count_event(index, |e| &e.forwards);
        Ok(reply)
    }

    /// Stores an entry, evicting the least recently used ones of the same
    /// model to make room in that model's share of the cache.
    fn insert(&self, forward_id: &str, mut entry: Entry) -> Result<(), TrainingError> {
        let model = entry.model;
        let limit = self.budgets.get(model).copied().unwrap_or(0);
        if entry.bytes > limit {
            return Err(TrainingError::TooLarge {
                model: self.config.names.get(model).cloned().unwrap_or_default(),
                bytes: entry.bytes,
                limit,
            });
        }
        let mut evicted = Vec::new();
        {
            let mut store = lock(&self.store);
            if store.entries.contains_key(forward_id) {
                return Err(TrainingError::AlreadyExists {
                    forward_id: forward_id.to_string(),
                });
            }
            while store.model_bytes[model] + entry.bytes > limit {
                let Some(oldest) = store.lru[model].values().next().cloned() else {
                    break;
                };
                evicted.extend(store.remove(&oldest, Gone::Evicted));
            }
            entry.tick = store.next_tick;
            store.next_tick += 1;
            store.lru[model].insert(entry.tick, forward_id.to_string());
            store.bytes += entry.bytes;
            store.model_bytes[model] += entry.bytes;
            store.gone.remove(forward_id);
            store.entries.insert(forward_id.to_string(), entry);
            self.publish(&store);
        }
        if !evicted.is_empty() {
            tracing::debug!(
                evicted = evicted.len(),
                "activations evicted (the model's share of --activation-cache-bytes)"
            );
        }
        self.stats
            .evicted
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        for e in &evicted {
            self.count_event(e.model, |e| &e.evicted);
        }
        // The evicted graphs are freed here, outside the lock, on this worker.
        drop(evicted);
        Ok(())
    }

    /// Releases the activations older than `--activation-ttl`.
    fn expire(&self) {
        drop(self.sessions.expire());
        let now = Instant::now();
        let ttl = self.config.ttl;
        let expired: Vec<Entry> = {
            let mut store = lock(&self.store);
            let ids: Vec<String> = store
                .entries
                .iter()
                .filter(|(_, e)| now.saturating_duration_since(e.created) >= ttl)
                .map(|(id, _)| id.clone())
                .collect();
            let gone = ids
                .iter()
                .filter_map(|id| store.remove(id, Gone::Expired))
                .collect();
            self.publish(&store);
            gone
        };
        self.stats
            .expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        for e in &expired {
            self.count_event(e.model, |e| &e.expired);
        }
    }

    fn publish(&self, store: &Store) {
        self.stats
            .stored
            .store(store.entries.len() as u64, Ordering::Relaxed);
        self.stats.bytes.store(store.bytes, Ordering::Relaxed);
    }

    fn backward(
        &self,
        index: usize,
        model: &Model,
        forward_id: &str,
        update: Option<Update>,
        grad: &RawTensor,
        enc: Encoding,
    ) -> Result<RawTensor, TrainingError> {
        self.expire();
        let entry = {
            let mut store = lock(&self.store);
            let Some(e) = store.entries.get(forward_id) else {
                return Err(store.not_found(forward_id));
            };
            if e.model != index {
                return Err(TrainingError::WrongModel {
                    forward_id: forward_id.to_string(),
                    owner: self.config.names[e.model].clone(),
                    requested: self.config.names[index].clone(),
                });
            }
            if e.out_shape != grad.shape {
                // A client mistake: the entry stays for a corrected retry.
                let want = e.out_shape.clone();
                store.touch(forward_id);
                return Err(TrainingError::GradShape {
                    forward_id: forward_id.to_string(),
                    got: grad.shape.clone(),
                    want,
                });
            }
            let e = store.remove(forward_id, Gone::Used);
            self.publish(&store);
            e
        };
        let Some(entry) = entry else {
            return Err(TrainingError::NotFound {
                forward_id: forward_id.to_string(),
                why: Gone::Unknown,
            });
        };
        let g = model::raw_to_tensor(model, grad, enc)?;
        if g.is_floating_point() && !all_finite(&g).map_err(|e| internal(model, e))? {
            // The entry is spent (removed above); the client runs Compute again.
            return Err(TrainingError::BadRequest(
                "grad_output contains NaN or infinite values".into(),
            ));
        }

        // A training backward holds the model's state from its gradient
        // accumulation to the step, so steps and their counts never interleave.
        let mut state = update.map(|_| lock(&self.models[index]));
        let grad_input = {
            let params = model.read_params();
            if *params != entry.version {
                let now = *params;
                drop(params);
                lock(&self.store).bury(forward_id, Gone::Stale);
                return Err(TrainingError::Stale {
                    forward_id: forward_id.to_string(),
                    model: model.name.clone(),
                    then: entry.version,
                    now,
                });
            }
            tch::with_grad(|| -> Result<Option<Tensor>, tch::TchError> {
                if !entry.output.requires_grad() {
                    return Ok(None);
                }
                // d(sum(output * g))/d(output) is exactly g: this is
                // output.backward(g), which tch does not offer directly.
                let loss = entry.output.f_mul(&g)?.f_sum(None::<tch::Kind>)?;
                if update.is_some() {
                    loss.f_backward()?;
                    Ok(entry.input.requires_grad().then(|| entry.input.grad()))
                } else if entry.input.requires_grad() {
                    // Frozen parameters: only the input's gradient, nothing accumulates.
                    Ok(Tensor::f_run_backward(&[&loss], &[&entry.input], false, false)?.pop())
                } else {
                    Ok(None)
                }
            })
            .map_err(|e| internal(model, e))?
        };
        if let (Some(u), Some(state)) = (update, state.as_mut()) {
            state.pending = state.pending.saturating_add(1);
            // The gradients this backward added must be finite: otherwise it,
            // not a later caller, is refused, and nothing of it stays.
            let finite = (|| -> Result<bool, StepError> {
                let params = self.params_of(model, state)?;
                Ok(grads_finite(params)?)
            })()
            .map_err(|e| e.into_error(model))?;
            if !finite {
                self.refuse(index, model, state, Refusal::Gradient, u.learning_rate);
                return Err(TrainingError::StepRejected {
                    model: model.name.clone(),
                    why: Refusal::Gradient,
                });
            }
            if state.pending >= u.accumulation {
                // This batch checks the step: finite outputs before it must
                // stay finite after it.
                let batch = all_finite(&entry.output)
                    .map_err(|e| internal(model, e))?
                    .then_some(&entry.input);
                self.step(index, model, state, u.learning_rate, batch)?;
            }
        }
        drop(state);
        self.stats.backwards.fetch_add(1, Ordering::Relaxed);
        self.count_event(index, |e| &e.backwards);
        match grad_input {
            Some(gi) if gi.defined() => Ok(model::from_tensor(model, &gi, enc)?),
            // No gradient with respect to the input (integer input): empty.
            _ => Ok(RawTensor {
                data: Bytes::new(),
                shape: Vec::new(),
                dtype: enc.dtype,
            }),
        }
    }

    /// The parameters the optimizer updates, fetched at the model's first
    /// training backward (with their empty optimizer state).
    fn params_of<'s>(
        &self,
        model: &Model,
        state: &'s mut ModelState,
    ) -> Result<&'s mut [Tensor], ModelError> {
        if state.params.is_none() {
            let params = model.trainable_parameters()?;
            state.momentum = params.iter().map(|_| None).collect();
            state.adam = params.iter().map(|_| None).collect();
            state.params = Some(params);
        }
        Ok(state.params.as_deref_mut().unwrap_or_default())
    }

    /// Drops the accumulated gradients and counts a refused step.
    fn refuse(&self, index: usize, model: &Model, state: &mut ModelState, why: Refusal, lr: f64) {
        for p in state.params.iter_mut().flatten() {
            p.zero_grad();
        }
        state.pending = 0;
        self.stats.steps_rejected.fetch_add(1, Ordering::Relaxed);
        self.count_event(index, |e| &e.steps_rejected);
        tracing::warn!(model = %model.name, lr, reason = %why, "optimizer step refused and rolled back");
    }

    /// One optimizer step with the accumulated gradients, under the model's
    /// parameter write lock; then the gradients are zeroed.
    ///
    /// No step within the limits can break the model (docs/training.md): the
    /// gradients are clipped to `--max-grad-norm`, and a step after which a
    /// parameter, the optimizer state, or the outputs on the warm-up input or
    /// on `batch` (the input of the backward that steps, when its outputs were
    /// finite) would be NaN or infinite is rolled back and refused.
    fn step(
        &self,
        index: usize,
        model: &Model,
        state: &mut ModelState,
        lr: f64,
        batch: Option<&Tensor>,
    ) -> Result<(), TrainingError> {
        let settings = self.config.optimizers[index];
        let mut version = model.write_params();
        self.params_of(model, state)?;
        if state.probe_finite.is_none() {
            // Whether the warm-up input's outputs are finite now: once they
            // are, every accepted step keeps them so.
            let finite = tch::no_grad(|| probe_finite(model)).map_err(|e| e.into_error(model))?;
            state.probe_finite = Some(finite);
        }
        let check_probe = state.probe_finite == Some(true);
        let ModelState {
            params,
            momentum,
            adam,
            ..
        } = state;
        let params = params.as_mut().map(Vec::as_mut_slice).unwrap_or_default();
        let clipped = tch::no_grad(|| clip_grad_norm(params, self.config.max_grad_norm))
            .map_err(|e| internal(model, e))?;
        // What a refused step must undo: the values of the parameters it
        // writes (those with a gradient), copied only once the gradients are
        // known to be finite. The optimizer state is stepped out of place into
        // `next_*` and replaces the old only when the step is accepted, so it
        // is never copied and a refusal just drops the new.
        let mut saved = Snapshot::default();
        let mut next_momentum: Vec<Option<Tensor>> = momentum.iter().map(|_| None).collect();
        let mut next_adam: Vec<Option<(Tensor, Tensor, u64)>> = adam.iter().map(|_| None).collect();
        let stepped = tch::no_grad(|| -> Result<Option<Refusal>, StepError> {
            let Some(_) = clipped else {
                return Ok(Some(Refusal::Gradient));
            };
            saved = Snapshot::take(params)?;
            for (i, p) in params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = if settings.weight_decay != 0.0 {
                    g.f_add(&p.f_mul_scalar(settings.weight_decay)?)?
                } else {
                    g
                };
                match settings.kind {
                    OptimizerKind::Sgd => {
                        next_momentum[i] = sgd(p, g, momentum[i].as_ref(), lr, settings.momentum)?;
                    }
                    OptimizerKind::Adam => {
                        next_adam[i] = Some(adam_step(p, &g, adam[i].as_ref(), lr, &settings)?);
                    }
                }
            }
            // One reduction (one device synchronisation) for everything the
            // step wrote; which part went non-finite only on the rare refusal.
            let state = || {
                next_momentum
                    .iter()
                    .flatten()
                    .chain(next_adam.iter().flatten().flat_map(|(m, v, _)| [m, v]))
            };
            if !all_finite_each(params.iter().chain(state()))? {
                return Ok(Some(if all_finite_each(params.iter())? {
                    Refusal::OptimizerState
                } else {
                    Refusal::Parameters
                }));
            }
            if check_probe && !probe_finite(model)? {
                return Ok(Some(Refusal::Outputs));
            }
            if let Some(x) = batch {
                if !all_finite(&model.forward_params_held(x)?)? {
                    return Ok(Some(Refusal::Outputs));
                }
            }
            Ok(None)
        });
        for p in params.iter_mut() {
            p.zero_grad();
        }
        state.pending = 0;
        let refused = match stepped {
            Ok(None) => None,
            Ok(Some(why)) => Some(why),
            Err(e) => {
                // A failed update may have changed some parameters: undo it too.
                let params = state.params.as_deref_mut().unwrap_or_default();
                tch::no_grad(|| saved.restore(params)).map_err(|e| internal(model, e))?;
                return Err(e.into_error(model));
            }
        };
        if let Some(why) = refused {
            let params = state.params.as_deref_mut().unwrap_or_default();
            tch::no_grad(|| saved.restore(params)).map_err(|e| internal(model, e))?;
            drop(version);
            self.refuse(index, model, state, why, lr);
            return Err(TrainingError::StepRejected {
                model: model.name.clone(),
                why,
            });
        }
        // Accepted: the stepped optimizer state replaces the old.
        for (old, new) in state.momentum.iter_mut().zip(next_momentum) {
            if new.is_some() {
                *old = new;
            }
        }
        for (old, new) in state.adam.iter_mut().zip(next_adam) {
            if new.is_some() {
                *old = new;
            }
        }
        if clipped == Some(true) {
            self.stats.grads_clipped.fetch_add(1, Ordering::Relaxed);
            self.count_event(index, |e| &e.grads_clipped);
        }
        *version += 1;
        drop(version);
        // Saturates: a counter restored near 2^64 must never wrap to 0.
        state.steps = state.steps.saturating_add(1);
        self.stats.optimizer_steps.fetch_add(1, Ordering::Relaxed);
        self.count_event(index, |e| &e.optimizer_steps);
        self.model_steps[index].store(state.steps, Ordering::Relaxed);
        let every = self.config.checkpoint_every;
        if every > 0 && state.steps % every == 0 {
            self.save(model, state);
        }
        Ok(())
    }

    /// Writes a checkpoint when `--checkpoint-dir` is set; a failure is logged,
    /// never returned to a client.
    fn save(&self, model: &Model, state: &mut ModelState) {
        let Some(dir) = &self.config.checkpoint_dir else {
            return;
        };
        match checkpoint::write(dir, model, state, self.config.checkpoint_keep) {
            Ok(Some(file)) => {
                state.saved_at = state.steps;
                self.stats.checkpoints_saved.fetch_add(1, Ordering::Relaxed);
                if let Some(i) = self.config.names.iter().position(|n| *n == model.name) {
                    self.count_event(i, |e| &e.checkpoints_saved);
                }
                tracing::info!(
                    model = %model.name,
                    steps = state.steps,
                    file = %file.display(),
                    serve_again = %format!("--model {}", model.checkpoint_spec(&file)),
                    "checkpoint saved"
                );
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "checkpoint failed"),
        }
    }

    /// The learning rate a backward without one uses on a model, if any.
    pub fn default_learning_rate(&self, model: &str) -> Option<f64> {
        let i = self.config.names.iter().position(|n| n == model)?;
        self.config.learning_rates.get(i).copied().flatten()
    }

    /// At start, before the models are shared: removes what a crash left half
    /// written, and resumes each model from its newest checkpoint that loads
    /// (parameters, optimizer state, pending gradients, step count). When a
    /// model has checkpoints and none loads, the error says so in one sentence
    /// and the server must not start (unless `--checkpoint-start-fresh`):
    /// starting from fresh weights would silently lose the trained ones.
    pub fn resume<'a>(
        &self,
        models: impl IntoIterator<Item = (usize, &'a mut Model)>,
    ) -> Result<(), String> {
        let Some(dir) = &self.config.checkpoint_dir else {
            return Ok(());
        };
        for (i, model) in models {
            checkpoint::clean_stale(dir, &model.name);
            let restored = checkpoint::restore(dir, model, self.config.checkpoint_start_fresh)
                .inspect_err(|_| self.start_refused.store(true, Ordering::Relaxed))?;
            if let Some((state, from)) = restored {
                tracing::info!(
                    model = %model.name,
                    steps = state.steps,
                    pending = state.pending,
                    checkpoint = %from.display(),
                    "resumed from checkpoint"
                );
                self.model_steps[i].store(state.steps, Ordering::Relaxed);
                *lock(&self.models[i]) = state;
            }
        }
        Ok(())
    }

    /// True when [`Training::resume`] refused to start: a configuration
    /// problem for the operator (exit code 64), not a crash.
    pub fn refused_start(&self) -> bool {
        self.start_refused.load(Ordering::Relaxed)
    }

    /// Called by the last worker when the engine stops: saves every model that
    /// took optimizer steps since its last checkpoint, releases the activations.
    pub fn shutdown(&self, models: &[(usize, &Model)]) {
        for &(i, model) in models {
            let Some(state) = self.models.get(i) else {
                continue;
            };
            let mut state = lock(state);
            if state.steps > state.saved_at {
                if self.config.checkpoint_dir.is_some() {
                    self.save(model, &mut state);
                } else {
                    tracing::warn!(
                        model = %model.name,
                        steps = state.steps,
                        "the model was trained but --checkpoint-dir is not set: its parameters are not saved"
                    );
                }
            }
            // Optimizer buffers are freed here, on a worker thread.
            *state = ModelState::default();
        }
        let mut store = lock(&self.store);
        let entries = std::mem::take(&mut store.entries);
        store.lru.iter_mut().for_each(BTreeMap::clear);
        store.model_bytes.iter_mut().for_each(|b| *b = 0);
        store.bytes = 0;
        self.publish(&store);
        drop(store);
        drop(entries);
    }

    /// Adds the training counters and settings to GetServiceInfo's custom_info.
    pub fn add_service_info(&self, custom: &mut HashMap<String, String>) {
        let s = &self.stats;
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        custom.insert("activations_stored".into(), count(&s.stored));
        custom.insert("activations_bytes".into(), count(&s.bytes));
        custom.insert("activations_evicted".into(), count(&s.evicted));
        custom.insert("activations_expired".into(), count(&s.expired));
        custom.insert("training_forwards".into(), count(&s.forwards));
        custom.insert("backwards".into(), count(&s.backwards));
        custom.insert("optimizer_steps".into(), count(&s.optimizer_steps));
        custom.insert("optimizer_steps_rejected".into(), count(&s.steps_rejected));
        custom.insert("optimizer_grads_clipped".into(), count(&s.grads_clipped));
        custom.insert(
            "max_grad_norm".into(),
            self.config.max_grad_norm.to_string(),
        );
        custom.insert("checkpoints_saved".into(), count(&s.checkpoints_saved));
        custom.insert(
            "activation_cache_bytes".into(),
            self.config.cache_bytes.to_string(),
        );
        custom.insert(
            "activation_ttl_ms".into(),
            self.config.ttl.as_millis().to_string(),
        );
        for (i, name) in self.config.names.iter().enumerate() {
            custom.insert(
                format!("model.{name}.optimizer"),
                self.config.optimizers[i].to_string(),
            );
            custom.insert(
                format!("model.{name}.optimizer_steps"),
                count(&self.model_steps[i]),
            );
        }
    }
}

/// True when every element of `t` is finite.
fn all_finite(t: &Tensor) -> Result<bool, tch::TchError> {
    Ok(t.f_isfinite()?.f_all()?.int64_value(&[]) != 0)
}

/// A libtorch error or the model's own, inside a step.
enum StepError {
    Torch(tch::TchError),
    Model(ModelError),
}

impl From<tch::TchError> for StepError {
    fn from(e: tch::TchError) -> Self {
        StepError::Torch(e)
    }
}

impl From<ModelError> for StepError {
    fn from(e: ModelError) -> Self {
        StepError::Model(e)
    }
}

impl StepError {
    fn into_error(self, model: &Model) -> TrainingError {
        match self {
            StepError::Torch(e) => internal(model, e),
            StepError::Model(e) => TrainingError::Model(e),
        }
    }
}

/// True when every element of every tensor is finite: one reduction and one
/// device synchronisation for all of them, not one per tensor (on a GPU each
/// read of a flag waits for the device).
fn all_finite_each<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Result<bool, tch::TchError> {
    let flags = ts
        .into_iter()
        .filter(|t| t.defined())
        .map(|t| t.f_isfinite()?.f_all())
        .collect::<Result<Vec<_>, _>>()?;
    if flags.is_empty() {
        return Ok(true);
    }
    Ok(Tensor::f_stack(&flags, 0)?.f_all()?.int64_value(&[]) != 0)
}

/// True when every accumulated gradient is finite.
fn grads_finite(params: &[Tensor]) -> Result<bool, tch::TchError> {
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
    all_finite_each(&grads)
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: when the total L2 norm
/// of the gradients is above `max_norm`, scales them by
/// `max_norm / (norm + 1e-6)` in place. The norm is summed in float64, so
/// float32 gradients near their range do not overflow it. Returns whether it
/// clipped, or None when a gradient is NaN or infinite.
fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<Option<bool>, tch::TchError> {
    let mut squares = 0.0f64;
    for p in params {
        let g = p.grad();
        if g.defined() {
            squares += g
                .f_to_kind(tch::Kind::Double)?
                .f_square()?
                .f_sum(None::<tch::Kind>)?
                .f_double_value(&[])?;
        }
    }
    let norm = squares.sqrt();
    if !norm.is_finite() {
        return Ok(None);
    }
    if norm <= max_norm {
        return Ok(Some(false));
    }
    let scale = max_norm / (norm + 1e-6);
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.f_mul_scalar_(scale)?;
        }
    }
    Ok(Some(true))
}

/// Whether the model's outputs on its warm-up input (zeros of the shape its
/// warm-up showed, one row) are all finite; true for a model without a
/// single-input signature. The caller holds the parameters and no_grad.
fn probe_finite(model: &Model) -> Result<bool, StepError> {
    let Some([input]) = model.signature.as_ref().map(|s| s.inputs.as_slice()) else {
        return Ok(true);
    };
    let shape: Vec<i64> = input.shape.iter().map(|&d| d.max(1)).collect();
    let x = Tensor::f_zeros(&shape, (input.dtype.to_kind(), model.device))?;
    let y = model.forward_params_held(&x)?;
    Ok(!y.is_floating_point() || all_finite(&y)?)
}

/// Copies of the parameters one step writes (those with a gradient): all a
/// refused step needs to undo, since the optimizer state is stepped out of
/// place and kept only when the step is accepted.
#[derive(Default)]
struct Snapshot {
    /// Per parameter: its values before the step, or None when the step
    /// does not write it (no gradient).
    params: Vec<Option<Tensor>>,
}

impl Snapshot {
    fn take(params: &[Tensor]) -> Result<Snapshot, tch::TchError> {
        Ok(Snapshot {
            params: params
                .iter()
                .map(|p| {
                    if p.grad().defined() {
                        p.f_detach_copy().map(Some)
                    } else {
                        Ok(None)
                    }
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Writes the saved values back in place (the tensors the model holds).
    fn restore(self, params: &mut [Tensor]) -> Result<(), tch::TchError> {
        for (p, saved) in params.iter_mut().zip(&self.params) {
            if let Some(saved) = saved {
                p.f_copy_(saved)?;
            }
        }
        Ok(())
    }
}

/// `torch.optim.SGD` (no dampening, no Nesterov): weight decay is already in
/// `g`. Writes `p` in place; returns the new momentum buffer (computed out of
/// place from `buf`, which stays as it was), None without momentum.
fn sgd(
    p: &mut Tensor,
    g: Tensor,
    buf: Option<&Tensor>,
    lr: f64,
    momentum: f64,
) -> Result<Option<Tensor>, tch::TchError> {
    let (d, next) = if momentum != 0.0 {
        let b = match buf {
            Some(b) => b.f_mul_scalar(momentum)?.f_add(&g)?,
            None => g.f_detach_copy()?,
        };
        (b.shallow_clone(), Some(b))
    } else {
        (g, None)
    };
    let _ = p.f_sub_(&d.f_mul_scalar(lr)?)?;
    Ok(next)
}

/// `torch.optim.Adam` (no AMSGrad), as its single-tensor implementation computes
/// it; weight decay is already in `g`. Writes `p` in place; returns the new
/// moments and step count (computed out of place: `state` stays as it was).
fn adam_step(
    p: &mut Tensor,
    g: &Tensor,
    state: Option<&(Tensor, Tensor, u64)>,
    lr: f64,
    settings: &OptimizerSettings,
) -> Result<(Tensor, Tensor, u64), tch::TchError> {
    let (b1, b2) = (settings.betas.0, settings.betas.1);
    let (m0, v0, t0) = match state {
        Some((m, v, t)) => (m.shallow_clone(), v.shallow_clone(), *t),
        None => (p.f_zeros_like()?, p.f_zeros_like()?, 0),
    };
    // Saturates: a count restored near 2^64 must never wrap to 0.
    let t = t0.saturating_add(1);
    let m = m0.f_lerp(g, 1.0 - b1)?;
    let v = v0
        .f_mul_scalar(b2)?
        .f_add(&g.f_mul(g)?.f_mul_scalar(1.0 - b2)?)?;
    // b^t for b in [0, 1); past i32::MAX steps it is 0 in any float.
    let pow = |b: f64| i32::try_from(t).map_or(0.0, |t| b.powi(t));
    let bias_correction1 = 1.0 - pow(b1);
    let bias_correction2 = 1.0 - pow(b2);
    let step_size = lr / bias_correction1;
    let denom = v
        .f_sqrt()?
        .f_div_scalar(bias_correction2.sqrt())?
        .f_add_scalar(settings.eps)?;
    let _ = p.f_sub_(&m.f_div(&denom)?.f_mul_scalar(step_size)?)?;
    Ok((m, v, t))
}

/// One incremental-decoding step (no_grad, like any inference).
fn kv(
    model: &Model,
    hidden: &RawTensor,
    enc: Encoding,
    past: &[RawTensor],
    kv_enc: Encoding,
    want_present: bool,
) -> Result<(RawTensor, Vec<RawTensor>), TrainingError> {
    let x = model::raw_to_tensor(model, hidden, enc)?;
    let past = past
        .iter()
        .map(|r| model::raw_to_tensor(model, r, kv_enc))
        .collect::<Result<Vec<_>, _>>()?;
    let (y, present) = model.forward_kv(&x, past)?;
    let out = model::from_tensor(model, &y, enc)?;
    let present = if want_present {
        present
            .iter()
            .map(|t| model::from_tensor(model, t, kv_enc))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    Ok((out, present))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Tensor {
        Tensor::from_slice(&[0.5f32, -1.0, 2.0]).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &[f32]) {
        // The gradient of sum(p * g) with respect to p is g.
        let loss = tch::with_grad(|| (p * Tensor::from_slice(g)).sum(None::<tch::Kind>));
        loss.backward();
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.detach()).unwrap()
    }

    #[test]
    fn sgd_with_momentum_matches_the_pytorch_formula() {
        let _g = tch::no_grad_guard();
        let mut p = params();
        // Step 1: buf = g; p -= lr * buf.  Step 2: buf = 0.9 buf + g.
        set_grad(&p, &[1.0, 2.0, -1.0]);
        let g = p.grad().copy();
        let buf = sgd(&mut p, g, None, 0.1, 0.9).unwrap();
        p.zero_grad();
        set_grad(&p, &[1.0, 0.0, 0.0]);
        let g = p.grad().copy();
        let _ = sgd(&mut p, g, buf.as_ref(), 0.1, 0.9).unwrap();
        let want = [
            0.5 - 0.1 - 0.1 * 1.9,
            -1.0 - 0.2 - 0.1 * 1.8,
            2.0 + 0.1 + 0.1 * 0.9,
        ];
        for (a, b) in values(&p).iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn adam_first_step_moves_each_parameter_by_about_lr() {
        let _g = tch::no_grad_guard();
        let mut p = params();
        set_grad(&p, &[3.0, -0.5, 0.0]);
        let settings = OptimizerSettings {
            kind: OptimizerKind::Adam,
            betas: AdamBetas(0.9, 0.999),
            ..Default::default()
        };
        let g = p.grad().copy();
        let state = adam_step(&mut p, &g, None, 0.01, &settings).unwrap();
        // Bias-corrected first step: m/sqrt(v) = sign(g), so p -= lr * sign(g).
        let got = values(&p);
        assert!((got[0] - 0.49).abs() < 1e-6, "{got:?}");
        assert!((got[1] + 0.99).abs() < 1e-6, "{got:?}");
        assert_eq!(got[2], 2.0, "a zero gradient leaves the parameter alone");
        assert_eq!(state.2, 1);
    }

    fn training(cache_bytes: u64) -> Training {
        Training::new(
            &TrainingConfig {
                names: vec!["m".into()],
                cache_bytes,
                ttl: Duration::from_secs(3600),
                optimizers: vec![OptimizerSettings::default()],
                checkpoint_dir: None,
                checkpoint_every: 0,
                max_learning_rate: 10.0,
                learning_rates: vec![None],
                checkpoint_keep: 3,
                max_accumulation_steps: 1024,
                kv_sessions: vec![false],
                sessions: SessionConfig {
                    max_bytes: 1 << 20,
                    ttl: Duration::from_secs(60),
                    prefill_chunk: 512,
                },
                max_grad_norm: 100.0,
                model_cache_bytes: Vec::new(),
                checkpoint_start_fresh: false,
            },
            1,
        )
    }

    /// A stored forward of `bytes` bytes whose output is [1].
    fn entry(bytes: u64) -> Entry {
        Entry {
            model: 0,
            input: Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)),
            output: Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)),
            out_shape: vec![1],
            version: 0,
            bytes,
            created: Instant::now(),
            tick: 0,
        }
    }

    fn stored(t: &Training) -> Vec<String> {
        let mut ids: Vec<String> = lock(&t.store).entries.keys().cloned().collect();
        ids.sort();
        ids
    }

    #[test]
    fn the_store_evicts_least_recently_used_and_remembers_why() {
        let t = training(30);
        let model = Model::load(&"m=builtin:identity".parse().unwrap(), tch::Device::Cpu).unwrap();
        for id in ["a", "b", "c"] {
            t.insert(id, entry(10)).unwrap();
        }
        assert_eq!(t.stats.bytes.load(Ordering::Relaxed), 30);
        // "a", the oldest, is used: a backward whose gradient has the wrong
        // shape keeps its entry for a corrected retry.
        let enc = Encoding {
            dtype: crate::codec::WireDtype::F32,
            compressed: false,
            explicit: false,
        };
        let step = Step::Backward {
            forward_id: "a".into(),
            update: None,
        };
        let wrong = RawTensor::from_f32(&[1.0, 2.0], &[2]);
        let e = t.run(0, &model, &step, &wrong, enc).unwrap_err();
        assert!(matches!(e, TrainingError::GradShape { .. }), "{e:?}");

        // A new entry makes room by evicting the least recently used: "b",
        // where first-in-first-out would have taken "a".
        t.insert("d", entry(10)).unwrap();
        assert_eq!(stored(&t), ["a", "c", "d"]);
        assert_eq!(t.stats.evicted.load(Ordering::Relaxed), 1);
        assert_eq!(t.stats.bytes.load(Ordering::Relaxed), 30);
        let store = lock(&t.store);
        assert_eq!(store.why_gone("b"), Gone::Evicted);
        assert_eq!(store.why_gone("zzz"), Gone::Unknown);
        let msg = store.not_found("b").to_string();
        assert!(msg.contains("--activation-cache-bytes"), "{msg}");
        drop(store);

        // Two slots' worth evicts the two least recently used, "c" then "a".
        t.insert("e", entry(20)).unwrap();
        assert_eq!(stored(&t), ["d", "e"]);
        assert_eq!(t.stats.evicted.load(Ordering::Relaxed), 3);
        // Refusals evict nothing.
        assert!(matches!(
            t.insert("d", entry(1)),
            Err(TrainingError::AlreadyExists { .. })
        ));
        assert!(matches!(
            t.insert("f", entry(31)),
            Err(TrainingError::TooLarge {
                bytes: 31,
                limit: 30,
                ..
            })
        ));
        assert_eq!(stored(&t), ["d", "e"]);
    }

    #[test]
    fn activations_expire_once_older_than_the_ttl_and_not_before() {
        let mut t = training(1000);
        t.config.ttl = Duration::from_secs(10);
        let aged = |secs: u64| Entry {
            created: Instant::now() - Duration::from_secs(secs),
            ..entry(10)
        };
        t.insert("older", aged(15)).unwrap();
        t.insert("younger", aged(5)).unwrap();
        t.expire();
        assert_eq!(stored(&t), ["younger"]);
        assert_eq!(t.stats.expired.load(Ordering::Relaxed), 1);
    }
}
