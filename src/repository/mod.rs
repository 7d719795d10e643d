//! The model repository: Triton's layout (`DIR/NAME/config.pbtxt`,
//! `DIR/NAME/VERSION/model.pt`), read ([`read_model`]) and kept loaded in the
//! engine without restarts ([`Repository`]): everything at start (`none`), plus
//! rescans (`poll`), or loads and unloads asked through the Open Inference
//! Protocol's repository extension (`explicit`).
//!
//! The repository is read, never written. Listing it runs on tokio's blocking
//! pool; reading a model (files, config parsing) runs on a short-lived thread
//! of its own, under that model's lock and a timeout, so a model whose files
//! hang holds up only itself; loading it runs on the engine's loader thread;
//! io threads only wait. Only regular files are read, each with a byte cap.

pub mod config;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tch::Kind;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineConfig, ModelSlot};
use crate::model::{ModelSource, ModelSpec};
use crate::proto::inference::{ModelConfig, model_version_policy::PolicyChoice};
pub use config::Settings;

/// Where the repository is and how its models are loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct RepositoryConfig {
    pub root: PathBuf,
    pub mode: ControlMode,
    /// How often `poll` rescans.
    pub poll_every: Duration,
    /// `explicit`: the models loaded at start (`*`: all).
    pub load_models: Vec<String>,
}

/// Triton's `--model-control-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMode {
    /// Every model at start; changes need a restart.
    None,
    /// Every model at start, then rescans load, reload and unload what changed.
    Poll,
    /// Only `load_models` at start, then what the repository API asks for.
    Explicit,
}

impl ControlMode {
    pub fn name(self) -> &'static str {
        match self {
            ControlMode::None => "none",
            ControlMode::Poll => "poll",
            ControlMode::Explicit => "explicit",
        }
    }
}

/// A version directory and the model file in it.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionDir {
    pub number: u64,
    pub file: PathBuf,
    /// Size and modification time: a changed file is a new build of the version.
    pub stamp: (u64, Option<SystemTime>),
}

/// A model directory as read: its checked config and the versions its
/// version policy selects.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub name: String,
    pub config: Arc<ModelConfig>,
    pub settings: Settings,
    /// Fields set but not applied, and other notes for the operator.
    pub warnings: Vec<String>,
    pub versions: Vec<VersionDir>,
    /// The config file's content, to tell a changed config.
    pub config_text: String,
}

impl ModelDir {
    /// What the engine runs version `v` with.
    pub fn slot(&self, v: &VersionDir) -> ModelSlot {
        let s = &self.settings;
        let (shapes, kinds): (Vec<Vec<i64>>, Vec<Kind>) =
            s.warmup.clone().unwrap_or_default().into_iter().unzip();
        ModelSlot {
            spec: ModelSpec {
                name: self.name.clone(),
                source: if self.config.platform == config::PT2_PLATFORM {
                    ModelSource::Pt2(v.file.clone())
                } else {
                    ModelSource::TorchScript(v.file.clone())
                },
                warmup: (!shapes.is_empty()).then_some(shapes),
                warmup_kinds: kinds,
                warmup_samples: s.warmup_samples.clone(),
            },
            version: v.number,
            trainable: s.trainable,
            max_batch: s.max_batch,
            batch_timeout: s.batch_timeout,
            preferred_batch: s.preferred_batch.clone(),
            instances: s.instances,
            device: s.device,
            queue_capacity: s.queue_capacity,
            queue_timeout: s.queue_timeout,
            config: Some(self.config.clone()),
        }
    }
}

/// Longest model directory name served.
const MAX_NAME: usize = 128;

/// The model directories under `root`: visible subdirectories with a usable name.
pub fn model_names(root: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !is_model_name(&name) {
            continue;
        }
        if entry.path().is_dir() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Reads and checks one model directory. The error is one sentence naming
/// what is wrong, for the operator and for RepositoryIndex.
pub fn read_model(root: &Path, name: &str) -> Result<ModelDir, String> {
    // Names come from clients too (RepositoryModelLoad): never a path out of the root.
    if !is_model_name(name) {
        return Err("not a model directory name".into());
    }
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err("no such model directory in the repository".into());
    }
    let bytes = read_capped(&dir.join("config.pbtxt"), config::MAX_CONFIG_BYTES)
        .map_err(|e| format!("config.pbtxt: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let (line, column) = config::line_column(e.as_bytes(), e.utf8_error().valid_up_to());
        format!("config.pbtxt is not UTF-8 text: line {line}, column {column}")
    })?;
    let mut parsed = config::parse(&text)?;
    let mut settings = config::check(&mut parsed.config, name)?;
    // model_warmup's data files live in the model directory's warmup/.
    for sample in &mut settings.warmup_samples {
        for input in &mut sample.inputs {
            if let crate::model::WarmupData::File(f) = &mut input.data {
                *f = dir.join("warmup").join(&*f);
            }
        }
    }
    let filename = if parsed.config.default_model_filename.is_empty() {
        config::DEFAULT_MODEL_FILENAME.to_string()
    } else {
        parsed.config.default_model_filename.clone()
    };
    if filename.contains('/') || filename.contains("..") {
        return Err(format!(
            "default_model_filename {:?} must be a file name",
            crate::codec::clip(&filename)
        ));
    }
    let mut present = BTreeMap::new();
    let mut warnings = parsed.warnings;
    warnings.extend(settings.warmup_warnings.iter().cloned());
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{name}: {e}"))? {
        let Ok(entry) = entry else { continue };
        let Some(number) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&n| n > 0)
        else {
            continue;
        };
        let model = entry.path().join(&filename);
        match std::fs::metadata(&model) {
            Ok(m) if m.is_file() => {
                present.insert(
                    number,
                    VersionDir {
                        number,
                        file: model,
                        stamp: (m.len(), m.modified().ok()),
                    },
                );
            }
            _ => warnings.push(format!("version {number} has no {filename} and is skipped")),
        }
    }
    let versions: Vec<VersionDir> = match &parsed
        .config
        .version_policy
        .as_ref()
        .and_then(|p| p.policy_choice.clone())
    {
        None => present.values().rev().take(1).cloned().collect(),
        Some(PolicyChoice::Latest(l)) => present
            .values()
            .rev()
            .take(l.num_versions.max(1) as usize)
            .cloned()
            .collect(),
        Some(PolicyChoice::All(_)) => present.values().cloned().collect(),
        Some(PolicyChoice::Specific(s)) => {
            let mut chosen = Vec::new();
            for &v in &s.versions {
                match u64::try_from(v).ok().and_then(|v| present.get(&v)) {
                    Some(d) => chosen.push(d.clone()),
                    None => {
                        return Err(format!(
                            "version_policy names version {v}, which has no {filename}"
                        ));
                    }
                }
            }
            chosen
        }
    };
    if versions.is_empty() {
        return Err(format!(
            "no version to serve: no numbered directory holds {filename}"
        ));
    }
    Ok(ModelDir {
        name: name.to_string(),
        config: Arc::new(parsed.config),
        settings,
        warnings,
        versions,
        config_text: text,
    })
}

/// Reads a whole file of at most `cap` bytes. Regular files only (symlinks
/// followed; a FIFO or a device is refused without waiting on it, see
/// [`crate::model::open_regular`]), and the cap holds whatever size the file's
/// metadata claims: a file that keeps giving bytes is refused after `cap + 1`.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let (file, meta) = crate::model::open_regular(path)?;
    let mut bytes = Vec::with_capacity(meta.len().min(cap) as usize);
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {cap} bytes; at most {cap} are read"),
        ));
    }
    Ok(bytes)
}

/// Moves the repository's trainable models, and those with KV sessions, into
/// the start-up models: their parameters and optimizer state, or their
/// sessions' caches, live in this server, so they are loaded once, trained in
/// place and never reloaded or unloaded at run time.
/// Returns their names; unreadable models are left to [`Repository::start`],
/// which reports them.
pub fn add_trainable_models(cfg: &RepositoryConfig, engine: &mut EngineConfig) -> Vec<String> {
    let Ok(names) = model_names(&cfg.root) else {
        return Vec::new();
    };
    let mut added = Vec::new();
    for name in names {
        if cfg.mode == ControlMode::Explicit && !wanted_at_start(cfg, &name) {
            continue;
        }
        if engine.models.iter().any(|m| m.spec.name == name) {
            tracing::warn!(model = %name, "the repository's model is not served: --model already serves this name");
            continue;
        }
        let Ok(dir) = read_model(&cfg.root, &name) else {
            continue;
        };
        if !dir.settings.trainable && !dir.settings.kv_sessions {
            continue;
        }
        // One set of parameters to train: the newest version selected.
        let Some(newest) = dir.versions.iter().max_by_key(|v| v.number) else {
            continue;
        };
        for w in &dir.warnings {
            tracing::warn!(model = %name, "config.pbtxt: {w}");
        }
        if dir.versions.len() > 1 {
            tracing::warn!(model = %name, version = newest.number, "a trainable model serves one version: the newest");
        }
        let t = &mut engine.training;
        t.names.push(name.clone());
        t.optimizers.push(dir.settings.optimizer);
        t.learning_rates.push(dir.settings.learning_rate);
        t.kv_sessions.push(dir.settings.kv_sessions);
        engine.models.push(dir.slot(newest));
        added.push(name);
    }
    added
}

fn wanted_at_start(cfg: &RepositoryConfig, name: &str) -> bool {
    cfg.load_models.iter().any(|m| m == "*" || m == name)
}

/// A model version's state, as RepositoryIndex reports it (Triton's names).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    /// Empty for a model that has never been loaded.
    pub version: String,
    /// "READY", "LOADING", "UNAVAILABLE", or empty when never loaded.
    pub state: String,
    pub reason: String,
}

/// What the repository API can answer besides success.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RepositoryError {
    #[error("model {0:?} is not in the model repository")]
    NotFound(String),
    /// The model's config or files are wrong, or its load failed.
    #[error("failed to load model {name:?}: {reason}")]
    LoadFailed { name: String, reason: String },
    /// Not allowed in this mode or for this model.
    #[error("{0}")]
    NotAllowed(String),
    /// Another load or unload of the model has not finished (its files may
    /// be stuck); other models are not affected. Worth a retry later.
    #[error("{0}")]
    Busy(String),
}

/// How long a load or unload waits for the model's previous operation.
const OP_WAIT: Duration = Duration::from_secs(30);
/// How long reading a model's directory (config.pbtxt, version directories)
/// may take before the load fails; the read goes on in its own thread, and the
/// model stays locked until it returns.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A lock per model name, held through a load, reload or unload, so that a
/// model whose files are stuck holds up only itself. An entry lives while
/// someone holds or waits for it: the table holds at most the names being
/// worked on, and those are directories of the repository.
#[derive(Default)]
struct OpLocks {
    held: Arc<Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// One model's operation; dropping it frees the model (and its table entry
/// when nobody waits).
struct OpGuard {
    name: String,
    table: Arc<Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut table = lock(&self.table);
        // The table's Arc and this guard's own: nobody else waits.
        if table
            .get(&self.name)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            table.remove(&self.name);
        }
    }
}

impl OpLocks {
    /// The model's lock: at once or None (`wait` None), or within `wait`
    /// (else [`RepositoryError::Busy`]).
    async fn acquire(
        &self,
        name: &str,
        wait: Option<Duration>,
    ) -> Result<Option<OpGuard>, RepositoryError> {
        let mutex = {
            let mut table = lock(&self.held);
            // Entries nobody holds or waits for any more (a waiter that gave up).
            table.retain(|_, m| Arc::strong_count(m) > 1);
            table.entry(name.to_string()).or_default().clone()
        };
        let guard = match wait {
            None => mutex.try_lock_owned().ok(),
            Some(wait) => match tokio::time::timeout(wait, mutex.lock_owned()).await {
                Ok(g) => Some(g),
                Err(_) => {
                    return Err(RepositoryError::Busy(format!(
                        "model {:?}: its previous load or unload has not finished after {}s \
                         (its files may be stuck); other models are not affected; retry later",
                        crate::codec::clip(name),
                        wait.as_secs()
                    )));
                }
            },
        };
        Ok(guard.map(|g| OpGuard {
            name: name.to_string(),
            table: self.held.clone(),
            _guard: g,
        }))
    }
}

/// Runs `read` on a thread of its own (not tokio's blocking pool, which other
/// work shares), holding `op` while it runs. After `timeout` the caller gets an
/// error and the thread keeps `op` (the model stays locked) until the read
/// returns; one thread at most per model, since the lock is needed to start one.
async fn read_off_thread<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, String> + Send + 'static,
    op: OpGuard,
    timeout: Duration,
) -> (Result<T, String>, Option<OpGuard>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("splitserve-repo".into())
        .spawn(move || {
            let result = read();
            let _ = tx.send((result, op));
        });
    if let Err(e) = spawned {
        return (
            Err(format!(
                "cannot start a thread to read the model's files: {e}"
            )),
            None,
        );
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok((result, op))) => (result, Some(op)),
        Ok(Err(_)) => (Err("reading the model's files failed".into()), None),
        Err(_) => (
            Err(format!(
                "reading the model's files did not finish within {}s; the model stays \
                 locked until the read returns",
                timeout.as_secs()
            )),
            None,
        ),
    }
}

#[derive(Debug, Default)]
struct ModelState {
    /// Loaded versions and the file stamp each was loaded from.
    loaded: BTreeMap<u64, (u64, Option<SystemTime>)>,
    /// The config text the loaded versions run with.
    config_text: String,
    /// Per version: state and reason, for the index.
    versions: BTreeMap<u64, (&'static str, String)>,
    /// Why the model itself could not be read, if it could not.
    error: Option<String>,
    /// What the last attempt loaded from, per version, and its config: a
    /// poll does not retry a failure until something changed.
    tried: BTreeMap<u64, (u64, Option<SystemTime>)>,
    tried_config: String,
}

struct Inner {
    cfg: RepositoryConfig,
    engine: Engine,
    /// Served by `--model` or loaded at start as trainable: never touched here.
    fixed: BTreeSet<String>,
    /// One load, reload or unload at a time per model; other models go on.
    ops: OpLocks,
    models: Mutex<BTreeMap<String, ModelState>>,
    /// Bumped after every change, for health and metrics.
    changed: watch::Sender<u64>,
}

/// The repository kept loaded in the engine; cheap to clone.
#[derive(Clone)]
pub struct Repository {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Repository {
    /// `fixed`: names the repository must not load or unload (`--model`, and
    /// the trainable models already among the start-up models).
    pub fn new(cfg: RepositoryConfig, engine: Engine, fixed: BTreeSet<String>) -> Repository {
        let (changed, _) = watch::channel(0);
        Repository {
            inner: Arc::new(Inner {
                cfg,
                engine,
                fixed,
                ops: OpLocks::default(),
                models: Mutex::new(BTreeMap::new()),
                changed,
            }),
        }
    }

    /// Whether `name` is fixed at start (not managed by the repository).
    pub fn is_fixed(&self, name: &str) -> bool {
        self.inner.fixed.contains(name)
    }

    pub fn mode(&self) -> ControlMode {
        self.inner.cfg.mode
    }

    /// Notified after every load, reload or unload.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// The initial load: every model (`none`, `poll`), or `--load-model` ones
    /// (`explicit`). A model that fails is reported and the others serve.
    pub async fn start(&self) {
        let names = match self.list().await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(repository = %self.inner.cfg.root.display(), error = %e, "cannot read the model repository");
                return;
            }
        };
        for name in names {
            if self.inner.fixed.contains(&name) {
                continue;
            }
            if self.inner.cfg.mode == ControlMode::Explicit
                && !wanted_at_start(&self.inner.cfg, &name)
            {
                continue;
            }
            let _ = self.load_model(&name, false).await;
        }
        if self.inner.cfg.mode == ControlMode::Explicit {
            for name in &self.inner.cfg.load_models {
                if name != "*"
                    && !lock(&self.inner.models).contains_key(name)
                    && !self.inner.fixed.contains(name)
                {
                    tracing::error!(model = %name, "--load-model names a model that is not in the repository");
                }
            }
        }
    }

    /// `poll`: rescans every interval until `stop`.
    pub fn spawn_poller(&self, stop: CancellationToken) {
        if self.inner.cfg.mode != ControlMode::Poll {
            return;
        }
        let repo = self.clone();
        let every = self.inner.cfg.poll_every;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                repo.poll_once().await;
            }
        });
    }

    /// One rescan: loads new models, reloads changed ones, unloads removed ones.
    pub async fn poll_once(&self) {
        let names: BTreeSet<String> = match self.list().await {
            Ok(n) => n.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the model repository; nothing changed");
                return;
            }
        };
        for name in &names {
            if !self.inner.fixed.contains(name) {
                let _ = self.load_model(name, true).await;
            }
        }
        let gone: Vec<String> = lock(&self.inner.models)
            .iter()
            .filter(|(n, s)| !names.contains(*n) && !s.loaded.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            tracing::info!(model = %name, "model removed from the repository: unloading");
            let _ = self.unload_model(&name).await;
        }
    }

    /// RepositoryModelLoad: loads or reloads a model (`explicit` mode only).
    pub async fn load(&self, name: &str) -> Result<(), RepositoryError> {
        self.explicit_only("load")?;
        self.load_model(name, false).await
    }

    /// RepositoryModelUnload (`explicit` mode only).
    pub async fn unload(&self, name: &str) -> Result<(), RepositoryError> {
        self.explicit_only("unload")?;
        self.unload_model(name).await
    }

    fn explicit_only(&self, what: &str) -> Result<(), RepositoryError> {
        match self.inner.cfg.mode {
            ControlMode::Explicit => Ok(()),
            mode => Err(RepositoryError::NotAllowed(format!(
                "explicit model {what} is not allowed in model control mode {}; start with \
                 --model-control-mode explicit",
                mode.name()
            ))),
        }
    }

    async fn list(&self) -> std::io::Result<Vec<String>> {
        let root = self.inner.cfg.root.clone();
        tokio::task::spawn_blocking(move || model_names(&root))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
    }

    /// Loads what the model's directory selects, reloading versions whose file
    /// or config changed, then unloads the versions no longer selected.
    /// `only_if_changed`: a poll, which does nothing for an unchanged model and
    /// does not retry a failed one until its files change.
    async fn load_model(&self, name: &str, only_if_changed: bool) -> Result<(), RepositoryError> {
        if self.inner.fixed.contains(name) {
            return Err(RepositoryError::NotAllowed(format!(
                "model {:?} is loaded at start (--model, or trainable) and cannot be loaded or \
                 unloaded at run time",
                crate::codec::clip(name)
            )));
        }
        // Names from clients: only the repository's directories get a lock.
        if !root_has(&self.inner.cfg.root, name) && !lock(&self.inner.models).contains_key(name) {
            return Err(RepositoryError::NotFound(crate::codec::clip(name)));
        }
        // A poll skips a model whose last operation has not finished; a load waits a while.
        let wait = (!only_if_changed).then_some(OP_WAIT);
        let Some(op) = self.acquire(name, wait).await? else {
            return Ok(());
        };
        let root = self.inner.cfg.root.clone();
        let owned = name.to_string();
        let (read, _op) =
            read_off_thread(move || read_model(&root, &owned), op, READ_TIMEOUT).await;
        let dir = match read {
            Ok(d) => d,
            Err(reason) => {
                if !root_has(&self.inner.cfg.root, name)
                    && !lock(&self.inner.models).contains_key(name)
                {
                    return Err(RepositoryError::NotFound(crate::codec::clip(name)));
                }
                let first = {
                    let mut models = lock(&self.inner.models);
                    let state = models.entry(name.to_string()).or_default();
                    let first = state.error.as_deref() != Some(reason.as_str());
                    state.error = Some(reason.clone());
                    first
                };
                if first || !only_if_changed {
                    tracing::error!(model = %name, reason = %reason, "model not loaded; the versions already loaded keep serving");
                }
                self.bump();
                return Err(RepositoryError::LoadFailed {
                    name: name.to_string(),
                    reason,
                });
            }
        };
        let (todo, stale) = {
            let mut models = lock(&self.inner.models);
            let state = models.entry(name.to_string()).or_default();
            let config_changed = state.config_text != dir.config_text;
            let tried_changed = state.tried_config != dir.config_text;
            let todo: Vec<VersionDir> = dir
                .versions
                .iter()
                .filter(|v| {
                    if only_if_changed {
                        // A poll retries a failed version only once its files change.
                        tried_changed || state.tried.get(&v.number) != Some(&v.stamp)
                    } else {
                        config_changed || state.loaded.get(&v.number) != Some(&v.stamp)
                    }
                })
                .cloned()
                .collect();
            let selected: BTreeSet<u64> = dir.versions.iter().map(|v| v.number).collect();
            let stale: Vec<u64> = state
                .loaded
                .keys()
                .copied()
                .filter(|v| !selected.contains(v))
                .collect();
            state.error = None;
            state.tried_config = dir.config_text.clone();
            if todo.is_empty() && stale.is_empty() {
                return Ok(());
            }
            for v in &todo {
                state.tried.insert(v.number, v.stamp);
                state.versions.insert(v.number, ("LOADING", String::new()));
            }
            (todo, stale)
        };
        if !todo.is_empty() {
            for w in &dir.warnings {
                tracing::warn!(model = %name, "config.pbtxt: {w}");
            }
        }
        self.bump();
        let mut failures = Vec::new();
        for v in &todo {
            let result = self.inner.engine.load(dir.slot(v)).await;
            let mut models = lock(&self.inner.models);
            let state = models.entry(name.to_string()).or_default();
            match result {
                Ok(()) => {
                    state.loaded.insert(v.number, v.stamp);
                    state.versions.insert(v.number, ("READY", String::new()));
                    tracing::info!(model = %name, version = v.number, "model version serving");
                }
                Err(e) => {
                    let reason = e.to_string();
                    tracing::error!(model = %name, version = v.number, reason = %reason, "model version not loaded");
                    failures.push(format!("version {}: {reason}", v.number));
                    state.versions.insert(v.number, ("UNAVAILABLE", reason));
                }
            }
        }
        {
            let mut models = lock(&self.inner.models);
            let state = models.entry(name.to_string()).or_default();
            if failures.len() < todo.len() || todo.is_empty() {
                state.config_text = dir.config_text.clone();
            }
        }
        if !stale.is_empty() {
            let unloaded = self.inner.engine.unload(name, Some(stale.clone())).await;
            let mut models = lock(&self.inner.models);
            let state = models.entry(name.to_string()).or_default();
            for v in unloaded {
                state.loaded.remove(&v);
                state.versions.insert(
                    v,
                    (
                        "UNAVAILABLE",
                        "unloaded: no longer selected by the version policy".into(),
                    ),
                );
                tracing::info!(model = %name, version = v, "model version unloaded");
            }
        }
        self.bump();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(RepositoryError::LoadFailed {
                name: name.to_string(),
                reason: failures.join("; "),
            })
        }
    }

    async fn unload_model(&self, name: &str) -> Result<(), RepositoryError> {
        if self.inner.fixed.contains(name) {
            return Err(RepositoryError::NotAllowed(format!(
                "model {:?} is loaded at start (--model, or trainable) and cannot be unloaded",
                crate::codec::clip(name)
            )));
        }
        let known = lock(&self.inner.models).contains_key(name);
        if !known && !root_has(&self.inner.cfg.root, name) {
            return Err(RepositoryError::NotFound(crate::codec::clip(name)));
        }
        let Some(_op) = self.acquire(name, Some(OP_WAIT)).await? else {
            return Ok(());
        };
        let unloaded = self.inner.engine.unload(name, None).await;
        {
            let mut models = lock(&self.inner.models);
            let state = models.entry(name.to_string()).or_default();
            for v in unloaded {
                state.versions.insert(v, ("UNAVAILABLE", "unloaded".into()));
            }
            state.loaded.clear();
            state.config_text.clear();
            state.tried.clear();
            state.tried_config.clear();
        }
        tracing::info!(model = %name, "model unloaded");
        self.bump();
        Ok(())
    }

    /// The model's operation lock ([`OpLocks::acquire`]); a refusal is counted.
    async fn acquire(
        &self,
        name: &str,
        wait: Option<Duration>,
    ) -> Result<Option<OpGuard>, RepositoryError> {
        let got = self.inner.ops.acquire(name, wait).await;
        if got.is_err() {
            self.inner
                .engine
                .metrics()
                .limit_rejections
                .with_label_values(&[crate::telemetry::metrics::limit::REPOSITORY_BUSY])
                .inc();
        }
        got
    }

    fn bump(&self) {
        let failed = lock(&self.inner.models)
            .values()
            .filter(|m| {
                m.error.is_some()
                    || m.versions
                        .values()
                        .any(|(s, r)| *s == "UNAVAILABLE" && !r.starts_with("unloaded"))
            })
            .count();
        self.inner
            .engine
            .metrics()
            .repository_failed_models
            .set(failed as i64);
        self.inner.changed.send_modify(|n| *n += 1);
    }

    /// RepositoryIndex: every model in the repository, a line per version it
    /// has been asked to serve; `ready_only` keeps the READY ones.
    pub async fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let names = self.list().await.unwrap_or_default();
        let models = lock(&self.inner.models);
        let mut out = Vec::new();
        let all: BTreeSet<&String> = names.iter().chain(models.keys()).collect();
        for name in all {
            if self.inner.fixed.contains(name) {
                continue;
            }
            match models.get(name) {
                Some(state) if !state.versions.is_empty() => {
                    for (v, (s, reason)) in &state.versions {
                        // A change that failed leaves the loaded versions serving: say so.
                        let reason = match &state.error {
                            Some(e) if *s == "READY" => {
                                format!(
                                    "serving the previous files; the repository's current ones failed: {e}"
                                )
                            }
                            _ => reason.clone(),
                        };
                        out.push(IndexEntry {
                            name: name.clone(),
                            version: v.to_string(),
                            state: (*s).to_string(),
                            reason,
                        });
                    }
                }
                Some(ModelState { error: Some(e), .. }) => out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE".into(),
                    reason: e.clone(),
                }),
                _ => out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: String::new(),
                    reason: String::new(),
                }),
            }
        }
        if ready_only {
            out.retain(|e| e.state == "READY");
        }
        out
    }

    /// Why a model that is not served is not (for error messages), if known.
    pub fn failure(&self, name: &str) -> Option<String> {
        lock(&self.inner.models)
            .get(name)
            .and_then(|s| s.error.clone())
    }
}

fn root_has(root: &Path, name: &str) -> bool {
    is_model_name(name) && root.join(name).is_dir()
}

/// A name the repository serves: one visible path component, at most
/// `MAX_NAME` bytes, no control characters (so `..`, `/x` and `a/b` are not).
fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("splitserve-repo-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_regular_files_are_read_and_never_past_the_cap() {
        let dir = temp_dir("read");
        let fifo = dir.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        // Without O_NONBLOCK the open itself waits for a writer: forever.
        let err = read_capped(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("a FIFO"), "{err}");
        // /dev/zero says it has 0 bytes and never ends.
        let zero = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let err = read_capped(&zero, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("a character device"), "{err}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'#'; 100]).unwrap();
        assert_eq!(read_capped(&big, 100).unwrap().len(), 100);
        let err = read_capped(&big, 99).unwrap_err().to_string();
        assert!(err.contains("more than 99 bytes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn one_models_operation_never_holds_up_another() {
        let locks = OpLocks::default();
        let a = locks.acquire("a", None).await.unwrap().unwrap();
        // Another model: at once.
        let b = locks.acquire("b", Some(Duration::from_millis(10))).await;
        assert!(matches!(b, Ok(Some(_))));
        // The same model: a poll skips it, a load waits, then says why.
        assert!(locks.acquire("a", None).await.unwrap().is_none());
        match locks.acquire("a", Some(Duration::from_millis(20))).await {
            Err(RepositoryError::Busy(m)) => assert!(m.contains("\"a\""), "{m}"),
            other => panic!("expected Busy, got {:?}", other.map(|g| g.is_some())),
        }
        drop(a);
        assert!(locks.acquire("a", None).await.unwrap().is_some());
        drop(b);
        // Nothing left behind.
        let _ = locks.acquire("c", None).await.unwrap();
        assert_eq!(lock(&locks.held).len(), 0);
    }

    #[tokio::test]
    async fn a_stuck_read_times_out_and_keeps_only_its_model_locked() {
        let locks = OpLocks::default();
        let op = locks.acquire("stuck", None).await.unwrap().unwrap();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let (result, op) = read_off_thread(
            move || {
                let _ = wait.recv();
                Ok(())
            },
            op,
            Duration::from_millis(100),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(result.unwrap_err().contains("did not finish"));
        assert!(op.is_none());
        // The reader thread still holds "stuck"; "other" is free.
        assert!(locks.acquire("stuck", None).await.unwrap().is_none());
        assert!(locks.acquire("other", None).await.unwrap().is_some());
        release.send(()).unwrap();
        let free = async {
            loop {
                if let Some(g) = locks.acquire("stuck", None).await.unwrap() {
                    return g;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), free)
            .await
            .expect("the model is free once its read returns");
    }
}
