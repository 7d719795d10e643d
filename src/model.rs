//! Model specs, loading, device placement, warm-up and forward.
//!
//! Everything here calls libtorch and so runs only on the loader and worker
//! threads the engine owns, never on a tokio thread.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use serde::Deserialize;
use tch::{CModule, Device, IValue, Kind, Tensor, nn};

use crate::codec::{Encoding, RawTensor, WireDtype};

pub mod aoti;
mod pt2;
pub use pt2::{PLATFORM as PT2_PLATFORM, PackageBatch, PackageInfo, package_config};

/// Where models run, as configured; resolved against the hardware at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRequest {
    /// The first CUDA device if there is one, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceRequest::Cuda(n)),
                _ => Err(format!("expected auto, cpu, cuda or cuda:N, got {s:?}")),
            },
        }
    }
}

/// One model to serve: its name, where it comes from, and its warm-up input.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub source: ModelSource,
    /// Input shapes of the warm-up forward at load, one per input (float32
    /// zeros); built-in models know their own, a TorchScript model without
    /// them loads without a warm-up forward and without a known signature.
    pub warmup: Option<Vec<Vec<i64>>>,
    /// The warm-up inputs' dtypes, one per shape; empty: float32 for all.
    pub warmup_kinds: Vec<Kind>,
    /// config.pbtxt's model_warmup samples, each run at load after the warm-up above.
    pub warmup_samples: Vec<WarmupSample>,
}

/// One of Triton's model_warmup samples: its inputs in forward's order, run
/// `count` times at load (a failure fails the load).
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupSample {
    /// Its name in the config, for messages.
    pub name: String,
    pub inputs: Vec<WarmupInput>,
    /// Forwards of this sample (at least 1).
    pub count: u32,
}

/// One input of a [`WarmupSample`].
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupInput {
    /// Its full shape, the batch dimension (`rows`) first when the model batches.
    pub shape: Vec<i64>,
    /// Rows of the batch dimension, 1 when there is none: a data file holds one row.
    pub rows: i64,
    pub kind: Kind,
    pub data: WarmupData,
}

/// Where a warm-up input's values come from, as Triton's model_warmup defines them.
#[derive(Debug, Clone, PartialEq)]
pub enum WarmupData {
    /// `zero_data`.
    Zero,
    /// `random_data`: uniform in [0, 1) for floats, integers in [0, 100), booleans.
    Random,
    /// `input_data_file`: the file's bytes (little-endian, row-major) for one
    /// row, repeated for each row of the batch.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    TorchScript(PathBuf),
    /// A PyTorch 2 AOTInductor package (`.pt2`): inference only.
    Pt2(PathBuf),
    Builtin(Builtin),
}

/// The built-in models, defined in Rust so the service runs without any file.
#[derive(Debug, Clone, PartialEq)]
pub enum Builtin {
    /// Multiplies any tensor by K (splitlearn_comm's own test fixture does this).
    Scale(f64),
    /// Linear layers with ReLU between them: widths IN, HIDDEN..., OUT; with
    /// `@FILE`, the weights of a checkpoint (`--checkpoint-dir`) instead of the seed's.
    Mlp(Vec<i64>, Option<PathBuf>),
    /// Sleeps, then returns its input: makes queueing and drain observable in tests.
    Delay(Duration),
    /// Returns its inputs unchanged, any dtype and shape: a protocol round trip.
    Identity,
}

impl ModelSpec {
    /// The model served when none is configured.
    pub fn default_mlp() -> ModelSpec {
        ModelSpec {
            name: "mlp".into(),
            source: ModelSource::Builtin(Builtin::Mlp(vec![512, 1024, 512], None)),
            warmup: None,
            warmup_kinds: Vec::new(),
            warmup_samples: Vec::new(),
        }
    }
}

/// `NAME=SPEC`, as `--model` and `splitserve diagnose` write a model.
impl FromStr for ModelSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, source) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=SPEC, got {s:?}"))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "model name {name:?} must be non-empty letters, digits, '-', '_' or '.'"
            ));
        }
        Ok(ModelSpec {
            name: name.to_string(),
            source: source.parse()?,
            warmup: None,
            warmup_kinds: Vec::new(),
            warmup_samples: Vec::new(),
        })
    }
}

/// A TorchScript file path, or `builtin:mlp:INxHIDDENxOUT[@FILE]`,
/// `builtin:scale:K`, `builtin:delay:MILLIS`.
impl FromStr for ModelSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("builtin:") else {
            if s.is_empty() {
                return Err("empty model path".into());
            }
            if s.ends_with(".pt2") {
                return Ok(ModelSource::Pt2(PathBuf::from(s)));
            }
            return Ok(ModelSource::TorchScript(PathBuf::from(s)));
        };
        let (kind, arg) = rest.split_once(':').unwrap_or((rest, ""));
        let builtin = match kind {
            "scale" => Builtin::Scale(
                arg.parse::<f64>()
                    .ok()
                    .filter(|k| k.is_finite())
                    .ok_or_else(|| format!("builtin:scale needs a finite factor, got {arg:?}"))?,
            ),
            "mlp" => {
                let (arg, weights) = match arg.split_once('@') {
                    Some((widths, file)) if !file.is_empty() => (widths, Some(PathBuf::from(file))),
                    _ => (arg, None),
                };
                let widths: Result<Vec<i64>, _> = arg.split('x').map(str::parse::<i64>).collect();
                match widths {
                    Ok(w) if w.len() >= 2 && w.iter().all(|&d| (1..=1 << 20).contains(&d)) => {
                        Builtin::Mlp(w, weights)
                    }
                    _ => {
                        return Err(format!(
                            "builtin:mlp needs at least two positive widths like 512x1024x512, got {arg:?}"
                        ));
                    }
                }
            }
            "identity" if arg.is_empty() => Builtin::Identity,
            "delay" => {
                Builtin::Delay(Duration::from_millis(arg.parse::<u64>().map_err(|_| {
                    format!("builtin:delay needs milliseconds, got {arg:?}")
                })?))
            }
            other => {
                return Err(format!(
                    "unknown built-in model {other:?} (known: mlp, scale, delay, identity)"
                ));
            }
        };
        Ok(ModelSource::Builtin(builtin))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("model {name:?}: cannot load {source_desc}: {message}")]
    Load {
        name: String,
        source_desc: String,
        message: String,
    },
    #[error("device {requested} is not available: {reason}")]
    Device { requested: String, reason: String },
    /// libtorch refused the input (shape, dtype, values): the client's to fix.
    #[error("model {model:?} rejected the input: {message}")]
    InvalidInput { model: String, message: String },
    /// The model misbehaved on valid input: the operator's to fix.
    #[error("model {model:?} failed: {message}")]
    Internal { model: String, message: String },
    /// The device (or host) ran out of memory for this forward: retryable,
    /// perhaps with a smaller batch or on a less busy replica.
    #[error("model {model:?} ran out of memory: {message}")]
    OutOfMemory { model: String, message: String },
    /// CUDA, cuBLAS or cuDNN failed: the operator's to fix. `fatal`: the error
    /// poisons the process's CUDA context (a device-side assert, an illegal
    /// address, ...), so every later CUDA call fails and only a restart helps.
    #[error("model {model:?}: the device failed: {message}")]
    DeviceFailed {
        model: String,
        message: String,
        fatal: bool,
    },
}

/// What a libtorch error says about the device it ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFault {
    OutOfMemory,
    /// A CUDA, cuBLAS or cuDNN error that leaves the context usable.
    Error,
    /// A sticky CUDA error: the context is unusable until the process exits.
    Fatal,
}

/// Classifies libtorch's text. None: not a device failure (a shape, dtype or
/// value the model refused, or the model's own exception).
pub fn device_fault(raw: &str) -> Option<DeviceFault> {
    // CUDA's sticky errors (cudaGetErrorString's texts): the context is lost.
    const FATAL: [&str; 9] = [
        "device-side assert triggered",
        "an illegal memory access was encountered",
        "an illegal instruction was encountered",
        "misaligned address",
        "unspecified launch failure",
        "the launch timed out and was terminated",
        "uncorrectable ECC error encountered",
        "hardware stack error",
        "invalid program counter",
    ];
    const OOM: [&str; 5] = [
        "CUDA out of memory",
        "CUDA error: out of memory",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CUDNN_STATUS_ALLOC_FAILED",
        "DefaultCPUAllocator: can't allocate memory",
    ];
    const DEVICE: [&str; 8] = [
        "CUDA error",
        "CUDA driver error",
        "CUBLAS_STATUS_",
        "cuDNN error",
        "CUDNN_STATUS_",
        "NVRTC error",
        "CUFFT_",
        "cusolver",
    ];
    if FATAL.iter().any(|m| raw.contains(m)) {
        Some(DeviceFault::Fatal)
    } else if OOM.iter().any(|m| raw.contains(m)) {
        Some(DeviceFault::OutOfMemory)
    } else if DEVICE.iter().any(|m| raw.contains(m)) {
        Some(DeviceFault::Error)
    } else {
        None
    }
}

/// A libtorch error from running `model`: a device failure as such, otherwise
/// the client's input (`client`: libtorch refused what was passed) or the
/// operator's model.
pub fn run_error(model: &str, raw: &str, client: bool) -> ModelError {
    let model = model.to_string();
    match device_fault(raw) {
        Some(DeviceFault::OutOfMemory) => ModelError::OutOfMemory {
            model,
            message: torch_text(raw, true),
        },
        Some(fault) => ModelError::DeviceFailed {
            model,
            message: torch_text(raw, true),
            fatal: fault == DeviceFault::Fatal,
        },
        None if client => ModelError::InvalidInput {
            model,
            message: torch_text(raw, false),
        },
        None => ModelError::Internal {
            model,
            message: torch_text(raw, true),
        },
    }
}

/// Resolves `--device` against the hardware. Calls libtorch.
pub fn resolve_device(arg: DeviceRequest) -> Result<Device, ModelError> {
    match arg {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            // Once per process: every model resolves its device.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                let reason = crate::telemetry::system::cuda_unavailable_reason(
                    crate::telemetry::system::cuda_build(),
                );
                if crate::telemetry::system::cuda_build() {
                    tracing::warn!(%reason, "--device auto: CUDA cannot start; serving on the CPU");
                } else {
                    tracing::info!(%reason, "--device auto: serving on the CPU");
                }
            });
            Device::Cpu
        }),
        DeviceRequest::Cuda(n) if !tch::Cuda::is_available() => Err(ModelError::Device {
            requested: format!("cuda:{n}"),
            reason: format!(
                "CUDA cannot start: {}",
                crate::telemetry::system::cuda_unavailable_reason(
                    crate::telemetry::system::cuda_build()
                )
            ),
        }),
        DeviceRequest::Cuda(n) => {
            let count = tch::Cuda::device_count();
            if (n as i64) < count {
                Ok(Device::Cuda(n))
            } else {
                Err(ModelError::Device {
                    requested: format!("cuda:{n}"),
                    reason: format!("this process sees {count} CUDA device(s)"),
                })
            }
        }
    }
}

/// "cpu" or "cuda:N", as GetServiceInfo reports it.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// One tensor of a model's signature: its dtype and shape, the first
/// dimension (the batch) as -1.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSig {
    pub dtype: WireDtype,
    pub shape: Vec<i64>,
}

/// What a model takes and returns, in order, as its warm-up showed (or as
/// configured). Models without one accept any inputs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    pub inputs: Vec<TensorSig>,
    pub outputs: Vec<TensorSig>,
}

impl Signature {
    fn of(inputs: &[Tensor], outputs: &[Tensor]) -> Option<Signature> {
        let sig = |t: &Tensor| {
            let mut shape = t.size();
            if let Some(d) = shape.first_mut() {
                *d = -1;
            }
            WireDtype::from_kind(t.kind()).map(|dtype| TensorSig { dtype, shape })
        };
        Some(Signature {
            inputs: inputs.iter().map(sig).collect::<Option<_>>()?,
            outputs: outputs.iter().map(sig).collect::<Option<_>>()?,
        })
    }

    /// `inputs` and `outputs` tensors of which nothing is known yet: float32
    /// (what splitlearn_comm clients compute in), a batch dimension and one
    /// more, each -1.
    pub fn unknown(inputs: usize, outputs: usize) -> Signature {
        let any = || TensorSig {
            dtype: WireDtype::F32,
            shape: vec![-1, -1],
        };
        Signature {
            inputs: (0..inputs).map(|_| any()).collect(),
            outputs: (0..outputs).map(|_| any()).collect(),
        }
    }
}

/// A loaded model, shared by every worker thread.
pub struct Model {
    pub name: String,
    pub device: Device,
    /// Human description: the file path or the built-in spec.
    pub description: String,
    /// Inputs and outputs, learnt at warm-up; None when unknown or any.
    pub signature: Option<Signature>,
    /// What metadata lists: the signature when known, else the warm-up's
    /// tensors, else `forward`'s declaration in the file (names and counts,
    /// with [`Signature::unknown`] tensors). Never checked against requests.
    pub listed: Signature,
    /// A TorchScript model with the KV signature `forward(hidden, past)`,
    /// learnt at warm-up: a plain or training forward runs it with an empty
    /// past, so one file decodes and trains.
    pub kv: bool,
    /// The KV model also has `decode_batch(hidden, caches, lengths)`: decode
    /// steps of many sequences in one forward (learnt at warm-up, or at the
    /// first KV step of a model without one: [`Model::learn_kv_batch`]).
    kv_batch: OnceLock<bool>,
    inner: Inner,
    /// The warm-up inputs that ran at load, as (shape, dtype): each inference
    /// worker runs them again on its own thread before it serves the model
    /// ([`Model::warm_up_here`]). Empty: the model had no warm-up.
    warm: Vec<(Vec<i64>, Kind)>,
    /// The parameters' version: optimizer steps applied so far. Every forward
    /// and backward holds the read side while it uses the parameters; an
    /// optimizer step holds the write side, so nothing ever computes with
    /// half-updated parameters (docs/training.md).
    params: RwLock<u64>,
}

enum Inner {
    Script(CModule),
    Pt2(Box<pt2::Pt2>),
    Mlp(Mlp),
    Scale(f64),
    Delay(Duration),
    Identity,
}

/// SplitMix64: a small deterministic generator for built-in weights.
struct SplitMix64(u64);

impl SplitMix64 {
    /// Uniform in [0, 1).
    fn next_unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A built-in MLP defined with `tch::nn`.
struct Mlp {
    /// (weight, bias) per linear layer; ReLU between layers.
    layers: Vec<(Tensor, Tensor)>,
    /// Owns the variables (and names them for checkpoints).
    vs: nn::VarStore,
}

// SAFETY: the MLP's tensors are written while it is built, on the loader
// thread, before the model is shared, and afterwards only by an optimizer step,
// which holds the model's parameter write lock while no forward or backward
// runs. Everything else only reads them (libtorch ops reading the same tensor
// from several threads are safe, as for TorchScript modules, which tch marks
// Sync).
#[allow(unsafe_code)]
unsafe impl Sync for Mlp {}

impl Model {
    /// Loads (or builds) a model on a device and runs the warm-up forward.
    pub fn load(spec: &ModelSpec, device: Device) -> Result<Model, ModelError> {
        Model::load_with_runners(spec, device, 1)
    }

    /// [`Model::load`], for up to `runners` forwards at once: an AOTInductor
    /// package keeps one model instance per concurrent run.
    pub fn load_with_runners(
        spec: &ModelSpec,
        device: Device,
        runners: usize,
    ) -> Result<Model, ModelError> {
        let mut device = device;
        let load_err = |source_desc: String, message: String| ModelError::Load {
            name: spec.name.clone(),
            source_desc,
            message,
        };
        // forward's declaration, read from a TorchScript file's code.
        let mut declared = None;
        let (inner, description, default_warmup) = match &spec.source {
            ModelSource::TorchScript(path) => {
                let shown = path.display().to_string();
                let file = open_model_file(path).map_err(|e| load_err(shown.clone(), e))?;
                let digest =
                    file_sha256(&file).map_err(|e| load_err(shown.clone(), e.to_string()))?;
                declared = declared_forward(&file);
                // libtorch opens the file that was checked, not whatever the
                // path names by now.
                let mut m = CModule::load_on_device(opened_path(&file, path), device)
                    .map_err(|e| load_err(shown.clone(), not_torchscript_hint(&e.to_string())))?;
                m.set_eval();
                // Clients see the content's digest, never the file's path.
                (
                    Inner::Script(m),
                    format!("torchscript sha256:{digest}"),
                    None,
                )
            }
            ModelSource::Pt2(path) => {
                let shown = path.display().to_string();
                let file = open_model_file(path).map_err(|e| load_err(shown.clone(), e))?;
                let digest =
                    file_sha256(&file).map_err(|e| load_err(shown.clone(), e.to_string()))?;
                let (p, on) = pt2::load(&opened_path(&file, path), device, runners)
                    .map_err(|e| load_err(shown.clone(), e))?;
                device = on;
                (
                    Inner::Pt2(Box::new(p)),
                    format!("torch_aoti sha256:{digest}"),
                    None,
                )
            }
            ModelSource::Builtin(Builtin::Mlp(widths, weights)) => {
                let mut desc = format!(
                    "builtin:mlp:{}",
                    widths
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join("x")
                );
                // Deterministic weights: the same spec gives the same model
                // everywhere, without touching libtorch's global RNG (which other
                // threads may be using).
                let vs = nn::VarStore::new(device);
                let root = vs.root();
                let layers = widths
                    .windows(2)
                    .enumerate()
                    .map(|(i, w)| {
                        let (fan_in, fan_out) = (w[0], w[1]);
                        let mut rng = SplitMix64(0x5eed ^ (i as u64) << 32);
                        // torch.nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)).
                        let bound = 1.0 / (fan_in as f64).sqrt();
                        let mut uniform = |n: i64| -> Tensor {
                            let v: Vec<f32> = (0..n)
                                .map(|_| ((rng.next_unit() * 2.0 - 1.0) * bound) as f32)
                                .collect();
                            Tensor::from_slice(&v)
                        };
                        let weight = uniform(fan_out * fan_in).view([fan_out, fan_in]);
                        let bias = uniform(fan_out);
                        let layer = &root / format!("l{i}");
                        (
                            layer.var_copy("weight", &weight),
                            layer.var_copy("bias", &bias),
                        )
                    })
                    .collect();
                let mut vs = vs;
                if let Some(file) = weights {
                    let shown = format!("{desc}@{}", file.display());
                    let opened = open_model_file(file).map_err(|e| load_err(shown.clone(), e))?;
                    let digest =
                        file_sha256(&opened).map_err(|e| load_err(shown.clone(), e.to_string()))?;
                    // By its path: tch picks the format from the file name's extension.
                    vs.load(file)
                        .map_err(|e| load_err(shown.clone(), torch_text(&e.to_string(), true)))?;
                    desc = format!("{desc}@sha256:{digest}");
                }
                let warm = vec![vec![1, widths[0]]];
                (Inner::Mlp(Mlp { layers, vs }), desc, Some(warm))
            }
            ModelSource::Builtin(Builtin::Scale(k)) => (
                Inner::Scale(*k),
                format!("builtin:scale:{k}"),
                Some(vec![vec![1, 1]]),
            ),
            ModelSource::Builtin(Builtin::Delay(d)) => (
                Inner::Delay(*d),
                format!("builtin:delay:{}", d.as_millis()),
                None,
            ),
            ModelSource::Builtin(Builtin::Identity) => {
                (Inner::Identity, "builtin:identity".to_string(), None)
            }
        };
        let mut model = Model {
            name: spec.name.clone(),
            device,
            description,
            signature: None,
            listed: Signature::default(),
            kv: false,
            kv_batch: OnceLock::new(),
            inner,
            warm: Vec::new(),
            params: RwLock::new(0),
        };
        if let Inner::Pt2(p) = &model.inner {
            // A package warms up on the sizes it was exported for (twice, one
            // row apart, to tell which output dimensions follow the batch).
            let _guard = tch::no_grad_guard();
            if let Some(a) = p.warmup_inputs(device, 0) {
                let failed = |e: ModelError| {
                    load_err(
                        model.description.clone(),
                        format!("warm-up run failed: {e}"),
                    )
                };
                let ya = model.forward_all(&a).map_err(failed)?;
                let b = p
                    .warmup_inputs(device, 1)
                    .filter(|b| b.iter().zip(&a).any(|(x, y)| x.size() != y.size()));
                let yb = match &b {
                    Some(b) => Some(model.forward_all(b).map_err(failed)?),
                    None => None,
                };
                model.signature = p.signature(&ya, yb.as_deref());
                model.warm = a.iter().map(|t| (t.size(), t.kind())).collect();
            }
            return Ok(model);
        }
        // Warm-up failures are the operator's to fix: name the file, not its digest.
        let shown = match &spec.source {
            ModelSource::TorchScript(path) | ModelSource::Pt2(path) => path.display().to_string(),
            ModelSource::Builtin(_) => model.description.clone(),
        };
        if let Some(shapes) = spec.warmup.clone().or(default_warmup) {
            let _guard = tch::no_grad_guard();
            for shape in &shapes {
                check_warmup_shape(shape).map_err(|e| load_err(shown.clone(), e))?;
            }
            let inputs: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, shape)| {
                    let kind = spec.warmup_kinds.get(i).copied().unwrap_or(Kind::Float);
                    Tensor::f_zeros(shape, (kind, device))
                })
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    load_err(
                        shown.clone(),
                        format!(
                            "cannot allocate the warm-up input {shapes:?}: {}",
                            torch_text(&e.to_string(), true)
                        ),
                    )
                })?;
            let failed = |e: ModelError| {
                load_err(
                    shown.clone(),
                    format!("warm-up forward on shapes {shapes:?} failed: {e}"),
                )
            };
            let outputs = match model.forward_all(&inputs) {
                Ok(outputs) => outputs,
                // A model with the KV signature warms up as it serves: a prefill
                // of the warm-up shape, then one decode step on its cache.
                Err(plain) if inputs.len() == 1 && matches!(model.inner, Inner::Script(_)) => {
                    match model.warm_up_kv(&inputs[0]) {
                        Ok(outputs) => {
                            model.kv = true;
                            model.learn_kv_batch(&inputs[0]);
                            outputs
                        }
                        Err(_) => return Err(failed(plain)),
                    }
                }
                Err(e) => return Err(failed(e)),
            };
            // Only models with a fixed signature report one; the scaling and
            // test models take anything.
            if matches!(model.inner, Inner::Script(_) | Inner::Mlp(_)) {
                model.signature = Signature::of(&inputs, &outputs);
            }
            if spec.warmup.is_some() {
                model.listed = Signature::of(&inputs, &outputs).unwrap_or_default();
            }
            model.warm = inputs.iter().map(|t| (t.size(), t.kind())).collect();
        }
        for sample in &spec.warmup_samples {
            let _guard = tch::no_grad_guard();
            let failed = |e: String| {
                load_err(
                    model.description.clone(),
                    format!(
                        "model_warmup sample {:?}: {e}",
                        crate::codec::clip(&sample.name)
                    ),
                )
            };
            let inputs = sample
                .inputs
                .iter()
                .map(|i| warmup_tensor(i, device))
                .collect::<Result<Vec<_>, _>>()
                .map_err(failed)?;
            for _ in 0..sample.count.max(1) {
                model
                    .forward_all(&inputs)
                    .map_err(|e| failed(format!("forward failed: {e}")))?;
            }
        }
        model.listed = match (&model.signature, &declared) {
            (Some(sig), _) => sig.clone(),
            (None, _) if !model.listed.inputs.is_empty() => model.listed.clone(),
            (None, Some(f)) => Signature::unknown(f.tensor_inputs().max(1), f.tensor_outputs()),
            (None, None) => Signature::unknown(1, 1),
        };
        Ok(model)
    }

    /// Refuses, before any queueing, an input the model's definition cannot take:
    /// the built-in MLP's input width is fixed (the first of its widths), so a
    /// different last dimension gets the shape it expects, as the v2 path says it.
    pub fn check_input_shape(&self, shape: &[i64]) -> Result<(), ModelError> {
        if let Inner::Mlp(mlp) = &self.inner {
            let width = mlp.layers.first().map(|(w, _)| w.size()[1]);
            if let Some(width) = width {
                if shape.last() != Some(&width) {
                    return Err(ModelError::InvalidInput {
                        model: self.name.clone(),
                        message: format!(
                            "input shape {shape:?}; model {:?} ({}) expects [-1, {width}]",
                            self.name, self.description
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Runs the load-time warm-up again on the calling thread (an inference
    /// worker, before it serves the model): once per entry of `rows`, with the
    /// inputs' first dimension set to it (None: as loaded). On CUDA this
    /// creates the thread's cuBLAS handle and workspace and lets TorchScript
    /// compile its plans for those batch sizes before a client waits on them.
    /// Returns the forwards run: 0 for a model without a warm-up. The caller
    /// holds a no_grad guard.
    pub fn warm_up_here(&self, rows: &[Option<i64>]) -> Result<usize, ModelError> {
        if self.warm.is_empty() {
            return Ok(0);
        }
        for r in rows {
            let inputs = self
                .warm
                .iter()
                .map(|(shape, kind)| {
                    let mut shape = shape.clone();
                    if let (Some(r), Some(d)) = (r, shape.first_mut()) {
                        *d = *r;
                    }
                    Tensor::f_zeros(&shape, (*kind, self.device))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| internal(self, e))?;
            self.forward_all(&inputs)?;
        }
        Ok(rows.len())
    }

    /// Whether the warm-up batches along dimension 0: one input, as batched
    /// requests are.
    pub fn warms_one_input(&self) -> bool {
        self.warm.len() == 1
    }

    /// Whether the model is TorchScript, whose executor plans (and on CUDA
    /// compiles fused kernels) per input shape.
    pub fn is_torchscript(&self) -> bool {
        matches!(self.inner, Inner::Script(_))
    }

    /// Runs the model on one (possibly batched) input already on the model's device.
    /// The caller holds a no_grad guard.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor, ModelError> {
        let _params = self.read_params();
        self.forward_params_held(input)
    }

    /// [`Model::forward`] for a caller that already holds [`Model::read_params`]
    /// (a training forward, which records the graph and the parameter version).
    pub fn forward_params_held(&self, input: &Tensor) -> Result<Tensor, ModelError> {
        let invalid = |e: tch::TchError| run_error(&self.name, &e.to_string(), true);
        let run = || -> Result<Tensor, ModelError> {
            match &self.inner {
                Inner::Script(m) if self.kv => Ok(self.call_kv(m, input, Vec::new())?.0),
                Inner::Script(m) => {
                    match m
                        .forward_is(&[IValue::Tensor(input.shallow_clone())])
                        .map_err(invalid)?
                    {
                        IValue::Tensor(t) => Ok(t),
                        other => Err(ModelError::Internal {
                            model: self.name.clone(),
                            message: format!(
                                "forward returned {}, expected a single tensor",
                                ivalue_kind(&other)
                            ),
                        }),
                    }
                }
                Inner::Pt2(p) => {
                    let mut ys = p.run(&self.name, std::slice::from_ref(input))?;
                    match ys.len() {
                        1 => Ok(ys.remove(0)),
                        n => Err(ModelError::InvalidInput {
                            model: self.name.clone(),
                            message: format!(
                                "the package returns {n} outputs ({}); ask for them by name \
                                 over the Open Inference Protocol",
                                p.output_names.join(", ")
                            ),
                        }),
                    }
                }
                Inner::Mlp(mlp) => {
                    let mut x = input.f_to_kind(Kind::Float).map_err(invalid)?;
                    let last = mlp.layers.len() - 1;
                    for (i, (w, b)) in mlp.layers.iter().enumerate() {
                        x = x.f_linear(w, Some(b)).map_err(invalid)?;
                        if i < last {
                            x = x.f_relu().map_err(invalid)?;
                        }
                    }
                    Ok(x)
                }
                Inner::Scale(k) => input.f_mul_scalar(*k).map_err(invalid),
                Inner::Delay(d) => {
                    std::thread::sleep(*d);
                    Ok(input.shallow_clone())
                }
                Inner::Identity => Ok(input.shallow_clone()),
            }
        };
        // A panic inside tch (it panics on some errors) must not kill a worker.
        catch_unwind(AssertUnwindSafe(run))
            .unwrap_or_else(|panic| Err(run_error(&self.name, &panic_text(panic.as_ref()), false)))
    }
}

impl Model {
    /// Runs the model on several inputs, passed to `forward` in order, and
    /// returns every output: a tuple or list of tensors becomes several. Inputs
    /// are on the model's device; the caller holds a no_grad guard.
    pub fn forward_all(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        if let (true, [x]) = (self.kv, inputs) {
            return Ok(vec![self.forward(x)?]);
        }
        if let Inner::Pt2(p) = &self.inner {
            let run = || p.run(&self.name, inputs);
            return catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|panic| {
                Err(ModelError::Internal {
                    model: self.name.clone(),
                    message: panic_message(panic.as_ref()),
                })
            });
        }
        let Inner::Script(m) = &self.inner else {
            return match (&self.inner, inputs) {
                (Inner::Identity, _) => Ok(inputs.iter().map(Tensor::shallow_clone).collect()),
                (_, [x]) => Ok(vec![self.forward(x)?]),
                _ => Err(ModelError::InvalidInput {
                    model: self.name.clone(),
                    message: format!("{} takes one input, not {}", self.description, inputs.len()),
                }),
            };
        };
        let _params = self.read_params();
        let run = || -> Result<Vec<Tensor>, ModelError> {
            let args: Vec<IValue> = inputs
                .iter()
                .map(|t| IValue::Tensor(t.shallow_clone()))
                .collect();
            let out = m
                .forward_is(&args)
                .map_err(|e| run_error(&self.name, &e.to_string(), true))?;
            match out {
                IValue::Tensor(t) => Ok(vec![t]),
                other => {
                    let kind = ivalue_kind(&other);
                    flatten_tensors(Some(other)).ok_or_else(|| ModelError::Internal {
                        model: self.name.clone(),
                        message: format!(
                            "forward returned {kind}, expected tensors (a tensor, or a tuple or list of them)"
                        ),
                    })
                }
            }
        };
        catch_unwind(AssertUnwindSafe(run))
            .unwrap_or_else(|panic| Err(run_error(&self.name, &panic_text(panic.as_ref()), false)))
    }

    /// Shared access to the parameters, and their version (optimizer steps so far).
    pub fn read_params(&self) -> RwLockReadGuard<'_, u64> {
        // A panic while holding the lock cannot leave the version half-written.
        self.params.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Exclusive access to the parameters, for an optimizer step.
    pub fn write_params(&self) -> RwLockWriteGuard<'_, u64> {
        self.params.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The parameters an optimizer updates: those that require a gradient.
    pub fn trainable_parameters(&self) -> Result<Vec<Tensor>, ModelError> {
        let all = self.all_parameters()?;
        Ok(all.into_iter().filter(Tensor::requires_grad).collect())
    }

    /// A LoRA trunk's peft adapter: the adapter_config.json text its file
    /// carries (splitserve-export's `peft_adapter_config()` method) and its
    /// named parameters. None for a model without one.
    #[allow(clippy::type_complexity)]
    pub fn peft_adapter(&self) -> Result<Option<(String, Vec<(String, Tensor)>)>, ModelError> {
        let Inner::Script(m) = &self.inner else {
            return Ok(None);
        };
        let no_args: [IValue; 0] = [];
        // A file without the method (any other model) is simply not a LoRA trunk.
        let Ok(IValue::String(config)) = m.method_is("peft_adapter_config", &no_args) else {
            return Ok(None);
        };
        if config.is_empty() {
            return Ok(None);
        }
        let params = m.named_parameters().map_err(|e| ModelError::Internal {
            model: self.name.clone(),
            message: torch_text(&e.to_string(), true),
        })?;
        Ok(Some((config, params)))
    }

    /// Every parameter, frozen ones included: what a checkpoint replaces.
    pub fn all_parameters(&self) -> Result<Vec<Tensor>, ModelError> {
        Ok(match &self.inner {
            Inner::Script(m) => m
                .named_parameters()
                .map_err(|e| ModelError::Internal {
                    model: self.name.clone(),
                    message: torch_text(&e.to_string(), true),
                })?
                .into_iter()
                .map(|(_, t)| t)
                .collect(),
            Inner::Mlp(mlp) => mlp
                .layers
                .iter()
                .flat_map(|(w, b)| [w.shallow_clone(), b.shallow_clone()])
                .collect(),
            Inner::Pt2(_) | Inner::Scale(_) | Inner::Delay(_) | Inner::Identity => Vec::new(),
        })
    }

    /// Incremental decoding: runs a TorchScript `forward(hidden, past)` where
    /// `past` is the flat list `[key_0, value_0, key_1, value_1, ...]` and the
    /// result is `(hidden, present)` in the same layout (docs/training.md).
    /// The caller holds a no_grad guard.
    pub fn forward_kv(
        &self,
        hidden: &Tensor,
        past: Vec<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>), ModelError> {
        let Inner::Script(m) = &self.inner else {
            return Err(ModelError::InvalidInput {
                model: self.name.clone(),
                message: format!(
                    "{} has no KV cache: past_key_values and use_cache need a TorchScript \
                     model with forward(hidden: Tensor, past: List[Tensor]) -> \
                     Tuple[Tensor, List[Tensor]]",
                    self.description
                ),
            });
        };
        let run = || {
            let _params = self.read_params();
            self.call_kv(m, hidden, past)
        };
        catch_unwind(AssertUnwindSafe(run))
            .unwrap_or_else(|panic| Err(run_error(&self.name, &panic_text(panic.as_ref()), false)))
    }

    /// A KV warm-up: a prefill of `x` with an empty past, then one decode step
    /// (one position) on the cache it made. Returns the prefill's output.
    fn warm_up_kv(&self, x: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        let (y, present) = self.forward_kv(x, Vec::new())?;
        let mut step = x.size();
        if step.len() >= 2 {
            step[1] = 1;
        }
        let one =
            Tensor::f_zeros(&step, (x.kind(), x.device())).map_err(|e| ModelError::Internal {
                model: self.name.clone(),
                message: torch_text(&e.to_string(), true),
            })?;
        drop(self.forward_kv(&one, present)?);
        Ok(vec![y])
    }

    /// Whether the model decodes in batches (`decode_batch`); false until learnt.
    pub fn kv_batch(&self) -> bool {
        self.kv_batch.get().copied().unwrap_or(false)
    }

    /// Learns once whether the model runs `decode_batch`, from a KV input `x`
    /// (`[batch, positions, width]`). Worker threads only (it runs the model).
    pub fn learn_kv_batch(&self, x: &Tensor) {
        if self.kv_batch.get().is_none() {
            let _ = self.kv_batch.set(self.probe_kv_batch(x));
        }
    }

    /// Whether the model runs `decode_batch` (a warm-up call of it: two rows,
    /// past lengths 0 and 1), which also compiles it before the first request.
    fn probe_kv_batch(&self, x: &Tensor) -> bool {
        let probe = || -> Option<bool> {
            let one = x.f_narrow(0, 0, 1).ok()?.f_narrow(1, 0, 1).ok()?;
            let (_, present) = self.forward_kv(&one, Vec::new()).ok()?;
            let mut caches = Vec::new();
            for _row in 0..2 {
                for t in &present {
                    let s = t.size();
                    if s.len() != 4 {
                        return None;
                    }
                    let c = Tensor::f_zeros([1, s[1], 2, s[3]], (t.kind(), t.device())).ok()?;
                    caches.push(c);
                }
            }
            let width = *x.size().last()?;
            let hidden = Tensor::f_zeros([2, 1, width], (x.kind(), x.device())).ok()?;
            let y = self.forward_kv_batch(&hidden, caches, vec![0, 1]).ok()?;
            Some(y.size() == [2, 1, width])
        };
        probe().unwrap_or(false)
    }

    /// One decode step for many sequences: TorchScript `decode_batch(hidden
    /// [rows, 1, width], caches, lengths)`, where row b's keys and values
    /// (`[1, kv heads, capacity, head dim]`, `lengths[b]` positions valid) are
    /// `caches[b * 2 * layers ..]`. The model writes each row's new key and value
    /// at position `lengths[b]` in place and returns the rows' hidden states.
    /// The caller holds a no_grad guard.
    pub fn forward_kv_batch(
        &self,
        hidden: &Tensor,
        caches: Vec<Tensor>,
        lengths: Vec<i64>,
    ) -> Result<Tensor, ModelError> {
        let Inner::Script(m) = &self.inner else {
            return Err(ModelError::Internal {
                model: self.name.clone(),
                message: "only a TorchScript model decodes in batches".into(),
            });
        };
        let run = || {
            let _params = self.read_params();
            let out = m
                .method_is(
                    "decode_batch",
                    &[
                        IValue::Tensor(hidden.shallow_clone()),
                        IValue::TensorList(caches),
                        IValue::IntList(lengths),
                    ],
                )
                .map_err(|e| ModelError::InvalidInput {
                    model: self.name.clone(),
                    message: torch_text(&e.to_string(), false),
                })?;
            match out {
                IValue::Tuple(mut parts) if parts.len() == 2 => match parts.swap_remove(0) {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(ModelError::Internal {
                        model: self.name.clone(),
                        message: format!(
                            "decode_batch's first result is {}, not a tensor",
                            ivalue_kind(&other)
                        ),
                    }),
                },
                other => Err(ModelError::Internal {
                    model: self.name.clone(),
                    message: format!(
                        "decode_batch returned {}, expected (hidden, new key/values)",
                        ivalue_kind(&other)
                    ),
                }),
            }
        };
        catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|panic| {
            Err(ModelError::Internal {
                model: self.name.clone(),
                message: panic_message(panic.as_ref()),
            })
        })
    }

    /// `forward(hidden, past)` for a caller that holds the parameters' read
    /// side; checks the result's form.
    fn call_kv(
        &self,
        m: &CModule,
        hidden: &Tensor,
        past: Vec<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>), ModelError> {
        let internal = |message: String| ModelError::Internal {
            model: self.name.clone(),
            message,
        };
        let out = m
            .forward_is(&[
                IValue::Tensor(hidden.shallow_clone()),
                IValue::TensorList(past),
            ])
            .map_err(|e| run_error(&self.name, &e.to_string(), true))?;
        let expected = "expected (hidden, present key/values)";
        let IValue::Tuple(mut parts) = out else {
            return Err(internal(format!(
                "forward returned {}, {expected}",
                ivalue_kind(&out)
            )));
        };
        if parts.len() != 2 {
            return Err(internal(format!(
                "forward returned a tuple of {}, {expected}",
                parts.len()
            )));
        }
        let present = parts.pop();
        let hidden = match parts.pop() {
            Some(IValue::Tensor(t)) => t,
            _ => {
                return Err(internal(format!(
                    "forward's first result is not a tensor; {expected}"
                )));
            }
        };
        let present = flatten_tensors(present)
            .filter(|p| p.len() % 2 == 0)
            .ok_or_else(|| {
                internal(format!(
                    "forward's second result is not a list of key/value tensors; {expected}"
                ))
            })?;
        Ok((hidden, present))
    }

    /// The file name a checkpoint keeps this model's parameters under:
    /// `model.pt` (TorchScript, what `--model NAME=FILE` loads) or
    /// `model.safetensors` (builtin:mlp, `builtin:mlp:WIDTHS@FILE`); None for a
    /// model without parameters.
    pub fn parameters_file_name(&self) -> Option<&'static str> {
        match &self.inner {
            Inner::Script(_) => Some("model.pt"),
            Inner::Mlp(_) => Some("model.safetensors"),
            Inner::Pt2(_) | Inner::Scale(_) | Inner::Delay(_) | Inner::Identity => None,
        }
    }

    /// Writes the current parameters to `file` (see [`Model::parameters_file_name`]).
    pub fn write_parameters(&self, file: &Path) -> Result<(), ModelError> {
        let _params = self.read_params();
        match &self.inner {
            Inner::Script(m) => m.save(file),
            Inner::Mlp(mlp) => {
                let named: Vec<(String, Tensor)> = mlp
                    .vs
                    .variables()
                    .into_iter()
                    .map(|(name, t)| (name, t.detach().to_device(Device::Cpu).contiguous()))
                    .collect();
                Tensor::write_safetensors(&named, file)
            }
            Inner::Pt2(_) | Inner::Scale(_) | Inner::Delay(_) | Inner::Identity => Ok(()),
        }
        .map_err(|e| ModelError::Internal {
            model: self.name.clone(),
            message: format!(
                "cannot write {}: {}",
                file.display(),
                clean_torch_message(&e.to_string())
            ),
        })
    }

    /// Replaces the parameters with those a checkpoint file holds (written by
    /// [`Model::write_parameters`] for the same model). Runs before the model
    /// is shared.
    pub fn load_parameters(&mut self, file: &Path) -> Result<(), ModelError> {
        let fail = |message: String| ModelError::Load {
            name: self.name.clone(),
            source_desc: file.display().to_string(),
            message,
        };
        match &mut self.inner {
            Inner::Script(m) => {
                // Through the host: the saved copy never takes device memory
                // beside the live parameters; copy_ moves each one across.
                let saved = CModule::load_on_device(file, Device::Cpu)
                    .map_err(|e| fail(clean_torch_message(&e.to_string())))?;
                let saved: std::collections::HashMap<String, Tensor> = saved
                    .named_parameters()
                    .map_err(|e| fail(clean_torch_message(&e.to_string())))?
                    .into_iter()
                    .collect();
                let ours = m
                    .named_parameters()
                    .map_err(|e| fail(clean_torch_message(&e.to_string())))?;
                tch::no_grad(|| -> Result<(), ModelError> {
                    for (name, mut p) in ours {
                        let Some(v) = saved.get(&name) else {
                            return Err(fail(format!("the checkpoint has no parameter {name:?}")));
                        };
                        p.f_copy_(v)
                            .map_err(|e| fail(clean_torch_message(&e.to_string())))?;
                    }
                    Ok(())
                })
            }
            Inner::Mlp(mlp) => mlp
                .vs
                .load(file)
                .map_err(|e| fail(clean_torch_message(&e.to_string()))),
            Inner::Pt2(_) | Inner::Scale(_) | Inner::Delay(_) | Inner::Identity => Ok(()),
        }
    }

    /// The `--model` spec that serves a parameters file written by
    /// [`Model::write_parameters`] again.
    pub fn checkpoint_spec(&self, file: &Path) -> String {
        match &self.inner {
            Inner::Mlp(_) => {
                let base = self.description.split('@').next().unwrap_or_default();
                format!("{}={base}@{}", self.name, file.display())
            }
            _ => format!("{}={}", self.name, file.display()),
        }
    }
}

impl Model {
    /// What an AOTInductor package says about itself; None for other models.
    pub fn package(&self) -> Option<PackageInfo> {
        match &self.inner {
            Inner::Pt2(p) => Some(p.info()),
            _ => None,
        }
    }
}

/// The tensors of a list result: `[t, ...]` or `[(k, v), ...]` flattened in order.
fn flatten_tensors(v: Option<IValue>) -> Option<Vec<Tensor>> {
    match v? {
        IValue::TensorList(ts) => Some(ts),
        IValue::GenericList(items) | IValue::Tuple(items) => {
            let mut out = Vec::with_capacity(items.len() * 2);
            for item in items {
                match item {
                    IValue::Tensor(t) => out.push(t),
                    IValue::Tuple(pair) if pair.len() == 2 => {
                        for t in pair {
                            match t {
                                IValue::Tensor(t) => out.push(t),
                                _ => return None,
                            }
                        }
                    }
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "a tensor",
        IValue::Tuple(_) => "a tuple",
        IValue::TensorList(_) | IValue::GenericList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        _ => "a non-tensor value",
    }
}

/// libtorch's message for a file that is not TorchScript, with what to do.
/// A `torch.save` pickle or a `torch.export` (.pt2) archive fails with
/// "constants.pkl: file not found ... corrupted", which names no fix.
fn not_torchscript_hint(raw: &str) -> String {
    let msg = torch_text(raw, true);
    let looks_wrong = [
        "constants.pkl",
        "PytorchStreamReader",
        "file not found",
        "zip archive",
    ]
    .iter()
    .any(|k| raw.contains(k));
    if looks_wrong {
        format!(
            "{msg}. This file is not TorchScript: a torch.save() pickle cannot be served. \
             Save the module with torch.jit.script(model).save(path) (or \
             torch.jit.trace(model, example).save(path)), or compile a torch.export program \
             with torch._inductor.aoti_compile_and_package into a file named *.pt2"
        )
    } else {
        msg
    }
}

/// Largest model file read (TorchScript, or a built-in MLP's weights), in bytes.
pub const MAX_MODEL_FILE_BYTES: u64 = 64 << 30;

/// Most elements one warm-up input may have: the warm-up allocates it before
/// anything else runs (2^28: 1 GiB of float32).
pub const MAX_WARMUP_ELEMENTS: u64 = 1 << 28;

/// Checks a warm-up input shape before anything is allocated for it.
pub fn check_warmup_shape(shape: &[i64]) -> Result<(), String> {
    let mut elements: u64 = 1;
    for &d in shape {
        let d = u64::try_from(d)
            .map_err(|_| format!("warm-up shape {shape:?} has a negative dimension"))?;
        elements = elements.saturating_mul(d);
    }
    if shape.len() > crate::codec::MAX_DIMS || elements > MAX_WARMUP_ELEMENTS {
        return Err(format!(
            "warm-up shape {} has {} elements in {} dimensions; a warm-up input may have at \
             most {MAX_WARMUP_ELEMENTS} elements and {} dimensions",
            crate::codec::clip(&format!("{shape:?}")),
            if elements == u64::MAX {
                "more than 2^64".to_string()
            } else {
                elements.to_string()
            },
            shape.len(),
            crate::codec::MAX_DIMS
        ));
    }
    Ok(())
}

/// What a path is when it is not a regular file, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens a file the server reads (config.pbtxt, model files), following
/// symlinks, if what it opened is a regular file; refuses anything else. The
/// open never waits: a FIFO is opened non-blocking (where a plain open would
/// wait for a writer) and then refused by the opened file's own metadata, so a
/// path swapped after a check cannot slip through. Errors name the kind of
/// file, never its content.
pub fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: only regular files are read", file_kind(&meta)),
        ));
    }
    Ok((file, meta))
}

/// The tensor of a model_warmup input, on `device`.
fn warmup_tensor(i: &WarmupInput, device: Device) -> Result<Tensor, String> {
    use std::io::Read;
    check_warmup_shape(&i.shape)?;
    let torch = |e: tch::TchError| torch_text(&e.to_string(), true);
    let opts = (i.kind, device);
    match &i.data {
        WarmupData::Zero => Tensor::f_zeros(&i.shape, opts).map_err(torch),
        WarmupData::Random => match i.kind {
            Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double => {
                Tensor::f_rand(&i.shape, opts).map_err(torch)
            }
            Kind::Bool => Tensor::f_randint(2, &i.shape, (Kind::Int64, device))
                .and_then(|t| t.f_to_kind(Kind::Bool))
                .map_err(torch),
            _ => Tensor::f_randint(100, &i.shape, opts).map_err(torch),
        },
        WarmupData::File(path) => {
            let rows = i.rows.max(1);
            let numel: i64 = i.shape.iter().product();
            let need = (numel / rows) as usize * i.kind.elt_size_in_bytes();
            let shown = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let (file, _) = open_regular(path).map_err(|e| format!("warmup/{shown}: {e}"))?;
            let mut row = Vec::with_capacity(need);
            file.take(need as u64)
                .read_to_end(&mut row)
                .map_err(|e| format!("warmup/{shown}: {e}"))?;
            if row.len() < need {
                return Err(format!(
                    "warmup/{shown} holds {} bytes; the input needs {need} per row",
                    row.len()
                ));
            }
            let data = row.repeat(rows as usize);
            Tensor::f_from_data_size(&data, &i.shape, i.kind)
                .and_then(|t| t.f_to_device(device))
                .map_err(torch)
        }
    }
}

/// forward's declaration in an opened TorchScript file (read from its start
/// through a second handle; the file's offset does not matter to libtorch,
/// which opens it by path).
fn declared_forward(file: &std::fs::File) -> Option<crate::torchscript::Forward> {
    use std::io::Seek;
    let mut f = file.try_clone().ok()?;
    f.rewind().ok()?;
    crate::torchscript::read_forward(std::io::BufReader::new(f))
}

/// [`open_regular`] for a model file, with its size checked: an error for the
/// operator, naming the file's kind or size.
fn open_model_file(path: &Path) -> Result<std::fs::File, String> {
    let (file, meta) = open_regular(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    })?;
    if meta.len() > MAX_MODEL_FILE_BYTES {
        return Err(format!(
            "the file is {} bytes; model files of at most {MAX_MODEL_FILE_BYTES} bytes are read",
            meta.len()
        ));
    }
    Ok(file)
}

/// A path that opens `file` itself (`/proc/self/fd/N`), or `fallback` where
/// /proc is not mounted.
fn opened_path(file: &std::fs::File, fallback: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    if by_fd.exists() {
        by_fd
    } else {
        fallback.to_path_buf()
    }
}

/// The SHA-256 of an opened file's content, in hex: how clients see a model
/// file. Reads at most [`MAX_MODEL_FILE_BYTES`], whatever the file's size said.
fn file_sha256(file: &std::fs::File) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut reader = file.take(MAX_MODEL_FILE_BYTES + 1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    if total > MAX_MODEL_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {MAX_MODEL_FILE_BYTES} bytes; model files of at most that are read"),
        ));
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A libtorch failure on valid input: the operator's to fix.
pub fn internal(model: &Model, e: tch::TchError) -> ModelError {
    run_error(&model.name, &e.to_string(), false)
}

/// The dtype a request is computed in: splitlearn_comm's float codecs always
/// meant float32 on the model side; explicit dtypes stay as they are.
pub fn input_kind(t: &RawTensor, enc: Encoding) -> Kind {
    if enc.explicit {
        t.dtype.to_kind()
    } else {
        Kind::Float
    }
}

/// Wire bytes to a tensor on the model's device, in the dtype it is computed in:
/// copied in the wire's dtype and converted on the device ([`on_device`]).
pub fn raw_to_tensor(model: &Model, raw: &RawTensor, enc: Encoding) -> Result<Tensor, ModelError> {
    let t = Tensor::f_from_data_size(&raw.data, &raw.shape, raw.dtype.to_kind())
        .map_err(|e| internal(model, e))?;
    on_device(model, t, input_kind(raw, enc))
}

/// Host tensors at least this large cross to a GPU from pinned memory (libtorch's
/// caching host allocator keeps the pinned blocks): below it, staging through
/// pinned memory costs more than the pageable copy it saves.
pub const PIN_FROM_BYTES: usize = 1 << 20;

/// A host tensor onto the model's device in one copy (from pinned memory when
/// it is at least [`PIN_FROM_BYTES`]), then converted to `kind` there: a
/// float16 request crosses as float16, not widened first.
pub fn on_device(model: &Model, t: Tensor, kind: Kind) -> Result<Tensor, ModelError> {
    let t = if model.device == Device::Cpu {
        t
    } else {
        let pinned = t.numel() * t.kind().elt_size_in_bytes() >= PIN_FROM_BYTES;
        let t = if pinned {
            t.f_pin_memory(model.device)
                .map_err(|e| internal(model, e))?
        } else {
            t
        };
        // Non-blocking only from pinned memory, which the allocator keeps
        // until the copy on the stream is done.
        t.f_to_device_(model.device, t.kind(), pinned, false)
            .map_err(|e| internal(model, e))?
    };
    if t.kind() == kind {
        Ok(t)
    } else {
        t.f_to_kind(kind).map_err(|e| internal(model, e))
    }
}

/// Several requests' inputs as one batch on the model's device: their wire
/// bytes joined on the host, copied once ([`on_device`]) and converted to
/// `kind` (the dtype they are computed in) on the device. `raws` share their
/// trailing shape; wire dtypes that differ (float16 and float32 codecs in one
/// batch) are converted to `kind` on the host before they are joined.
pub fn batch_to_device(
    model: &Model,
    raws: &[&RawTensor],
    kind: Kind,
) -> Result<Tensor, ModelError> {
    let Some(first) = raws.first() else {
        return Err(ModelError::Internal {
            model: model.name.clone(),
            message: "an empty batch".into(),
        });
    };
    let mut shape = first.shape.clone();
    if let Some(d) = shape.first_mut() {
        *d = raws
            .iter()
            .map(|r| r.shape.first().copied().unwrap_or(1))
            .sum();
    }
    let host = if raws.iter().all(|r| r.dtype == first.dtype) {
        let mut bytes = Vec::with_capacity(raws.iter().map(|r| r.data.len()).sum());
        for r in raws {
            bytes.extend_from_slice(&r.data);
        }
        Tensor::f_from_data_size(&bytes, &shape, first.dtype.to_kind())
    } else {
        raws.iter()
            .map(|r| {
                Tensor::f_from_data_size(&r.data, &r.shape, r.dtype.to_kind())
                    .and_then(|t| t.f_to_kind(kind))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|parts| Tensor::f_cat(&parts, 0))
    }
    .map_err(|e| internal(model, e))?;
    on_device(model, host, kind)
}

/// The dtype a reply carries: the request's float encoding, or with an
/// explicit dtype, the output's own.
pub fn reply_dtype(model: &Model, kind: Kind, enc: Encoding) -> Result<WireDtype, ModelError> {
    if enc.explicit {
        WireDtype::from_kind(kind).ok_or_else(|| ModelError::Internal {
            model: model.name.clone(),
            message: format!("output dtype {kind:?} has no wire encoding"),
        })
    } else {
        Ok(enc.dtype)
    }
}

/// A model output onto the host in one copy: converted to `dtype` on the
/// device first when that makes fewer bytes cross (float32 to float16),
/// otherwise copied as it is (and converted on the host by [`from_tensor`]).
pub fn to_host(model: &Model, t: &Tensor, dtype: Option<WireDtype>) -> Result<Tensor, ModelError> {
    if t.device() == Device::Cpu {
        return Ok(t.shallow_clone());
    }
    let narrower = dtype.filter(|d| d.size() < t.kind().elt_size_in_bytes());
    match narrower {
        Some(d) => t.f_to_kind(d.to_kind()),
        None => Ok(t.shallow_clone()),
    }
    .and_then(|t| t.f_to_device(Device::Cpu))
    .map_err(|e| internal(model, e))
}

/// A tensor back to wire bytes in the reply's dtype ([`reply_dtype`]), copied
/// to the host once ([`to_host`]) if it is not there.
pub fn from_tensor(model: &Model, t: &Tensor, enc: Encoding) -> Result<RawTensor, ModelError> {
    let dtype = reply_dtype(model, t.kind(), enc)?;
    let t = to_host(model, t, Some(dtype))?
        .f_to_kind(dtype.to_kind())
        .and_then(|t| t.f_contiguous())
        .map_err(|e| internal(model, e))?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut data, numel)
        .map_err(|e| internal(model, e))?;
    Ok(RawTensor {
        data: data.into(),
        shape: t.size(),
        dtype,
    })
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    torch_text(&panic_text(panic), true)
}

/// The raw text of a panic payload (tch panics on some libtorch errors).
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic without a message".into()
    }
}

/// Longest libtorch message a client sees, in bytes.
pub const MAX_TORCH_MESSAGE: usize = 300;

/// libtorch's text for a client: [`clean_torch_message`]; when that cut
/// something, the full text is logged here, once (at warn for the operator's
/// failures, at debug for a client's bad input, which a client can repeat at will).
pub fn torch_text(raw: &str, operator: bool) -> String {
    let text = clean_torch_message(raw);
    if text != raw.trim() {
        if operator {
            tracing::warn!(
                libtorch = raw,
                "libtorch's full message (clients see: {text})"
            );
        } else {
            tracing::debug!(
                libtorch = raw,
                "libtorch's full message (clients see: {text})"
            );
        }
    }
    text
}

/// libtorch's messages carry C++ backtraces and TorchScript tracebacks, and a
/// tch panic wraps them in escaped Debug text: keep the first line, the
/// sentence a user can act on, at most [`MAX_TORCH_MESSAGE`] bytes.
pub fn clean_torch_message(msg: &str) -> String {
    // A tch panic: `called `Result::unwrap()` on an `Err` value: Torch("...")`,
    // with the message's newlines escaped.
    let mut msg = msg.trim();
    if let Some(rest) = msg.strip_prefix("called `Result::unwrap()` on an `Err` value: ") {
        msg = rest;
    }
    for wrapper in [
        "Torch(\"",
        "Shape(\"",
        "Kind(\"",
        "Convert(\"",
        "FileFormat(\"",
    ] {
        if let Some(rest) = msg.strip_prefix(wrapper) {
            msg = rest.strip_suffix("\")").unwrap_or(rest);
        }
    }
    let head = msg.split("Exception raised from").next().unwrap_or(msg);
    let lines = || {
        head.split('\n')
            .flat_map(|l| l.split("\\n"))
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("frame #"))
    };
    let text = if head.contains("Traceback of TorchScript") {
        // The interpreter's traceback ends with the original error line.
        lines()
            .filter(|l| l.contains("Error:"))
            .last()
            .or_else(|| lines().next())
    } else {
        lines().next()
    }
    .unwrap_or("libtorch failed without a message");
    // An error line may still run on into a backtrace without a newline.
    let text = text.split(" frame #").next().unwrap_or(text).trim();
    crate::codec::cut(text, MAX_TORCH_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(spec: &str) -> Model {
        let spec: ModelSpec = spec.parse().unwrap();
        Model::load(&spec, Device::Cpu).unwrap()
    }

    #[test]
    fn builtin_mlp_is_deterministic_and_checks_its_input() {
        let _g = tch::no_grad_guard();
        let a = builtin("a=builtin:mlp:4x8x3");
        let b = builtin("b=builtin:mlp:4x8x3");
        let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).view([1, 4]);
        let (ya, yb) = (a.forward(&x).unwrap(), b.forward(&x).unwrap());
        assert_eq!(ya.size(), vec![1, 3]);
        assert!(ya.allclose(&yb, 0.0, 0.0, false), "same spec, same weights");
        let bad = Tensor::zeros([1, 5], (Kind::Float, Device::Cpu));
        match a.forward(&bad) {
            Err(ModelError::InvalidInput { message, .. }) => {
                assert!(message.contains("shapes cannot be multiplied"), "{message}")
            }
            other => panic!("expected InvalidInput, got {:?}", other.map(|t| t.size())),
        }
    }

    #[test]
    fn scale_multiplies_any_shape() {
        let _g = tch::no_grad_guard();
        let m = builtin("s=builtin:scale:3");
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 1, 2]);
        let y = m.forward(&x).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(),
            vec![3.0, 6.0, 9.0, 12.0]
        );
    }

    #[test]
    fn missing_files_and_devices_are_named() {
        let spec: ModelSpec = "m=/nonexistent/model.pt".parse().unwrap();
        let err = Model::load(&spec, Device::Cpu).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/model.pt"), "{err}");
        // One past the last device this process sees, GPU host or not.
        let count = tch::Cuda::device_count();
        let err = resolve_device(DeviceRequest::Cuda(count as usize)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("cuda:{count}")), "{msg}");
        if count > 0 {
            assert!(
                msg.contains(&format!("sees {count} CUDA device(s)")),
                "{msg}"
            );
        } else {
            // Where CUDA cannot start, the refusal says why, not "0 devices".
            assert!(msg.contains("CUDA cannot start: "), "{msg}");
            assert!(
                msg.contains("driver") || msg.contains("without CUDA"),
                "{msg}"
            );
        }
        let auto = if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        };
        assert_eq!(resolve_device(DeviceRequest::Auto).unwrap(), auto);
        assert_eq!(resolve_device(DeviceRequest::Cpu).unwrap(), Device::Cpu);
    }

    #[test]
    fn model_specs_parse_builtin_and_files() {
        let m: ModelSpec = "enc=models/enc.pt".parse().unwrap();
        assert_eq!(m.source, ModelSource::TorchScript("models/enc.pt".into()));
        let m: ModelSpec = "m=builtin:mlp:4x8x2".parse().unwrap();
        assert_eq!(
            m.source,
            ModelSource::Builtin(Builtin::Mlp(vec![4, 8, 2], None))
        );
        let m: ModelSpec = "m=builtin:mlp:4x8x2@ckpt/m.safetensors".parse().unwrap();
        assert_eq!(
            m.source,
            ModelSource::Builtin(Builtin::Mlp(
                vec![4, 8, 2],
                Some("ckpt/m.safetensors".into())
            ))
        );
        let m: ModelSpec = "s=builtin:scale:2.5".parse().unwrap();
        assert_eq!(m.source, ModelSource::Builtin(Builtin::Scale(2.5)));
        assert!("noequals".parse::<ModelSpec>().is_err());
        assert!("x=builtin:mlp:4".parse::<ModelSpec>().is_err());
        assert!("x=builtin:what:4".parse::<ModelSpec>().is_err());
        assert!("bad name=builtin:scale:1".parse::<ModelSpec>().is_err());
        assert_eq!(
            "cuda:1".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(1)
        );
        assert!("tpu".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn torch_messages_are_cut_to_their_first_line_even_inside_a_panic() {
        // What a tch panic carried to clients: Debug text, newlines escaped,
        // a kilobyte of C++ frames on one line.
        let frames: String = (0..20)
            .map(|i| {
                format!("\\nframe #{i}: c10::ThrowEnforceNotMet(char const*, int) + 0x55 (0x7f)")
            })
            .collect();
        let raw = format!(
            "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at \
             alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to \
             allocate 4000000000000 bytes.{frames}\")"
        );
        assert!(raw.len() > 1000);
        let text = panic_message(&raw);
        assert_eq!(
            text,
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: \
             you tried to allocate 4000000000000 bytes."
        );
        // A real multi-line message: its first line.
        assert_eq!(
            clean_torch_message("Expected all tensors on one device\nsecond line\n  frame #0: x"),
            "Expected all tensors on one device"
        );
        // And never long.
        let long = "x".repeat(5000);
        assert!(clean_torch_message(&long).len() <= MAX_TORCH_MESSAGE);
    }

    #[test]
    fn a_huge_warm_up_shape_is_refused_before_it_is_allocated() {
        let mut spec: ModelSpec = "s=builtin:scale:2".parse().unwrap();
        spec.warmup = Some(vec![vec![1_000_000, 1_000_000]]);
        let err = Model::load(&spec, Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("at most 268435456 elements"), "{err}");
        assert!(err.len() < 400, "{err}");
        assert!(check_warmup_shape(&[i64::MAX, i64::MAX]).is_err());
        assert!(check_warmup_shape(&[-1, 4]).is_err());
        assert!(check_warmup_shape(&[16, 1024]).is_ok());
    }

    #[test]
    fn model_files_must_be_regular_files_and_never_block() {
        let dir = std::env::temp_dir().join(format!("splitserve-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.pt");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let zero = dir.join("zero.pt");
        let _ = std::fs::remove_file(&zero);
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for (file, kind) in [(&fifo, "a FIFO"), (&zero, "a character device")] {
            // Would wait for a writer forever, or read zeros forever.
            let spec: ModelSpec = format!("m={}", file.display()).parse().unwrap();
            let err = Model::load(&spec, Device::Cpu).err().unwrap().to_string();
            assert!(
                err.contains(kind) && err.contains("only regular files"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torch_messages_lose_their_backtraces() {
        let raw = "mat1 and mat2 shapes cannot be multiplied (1x5 and 4x8)\nException raised from meta at /pytorch/aten/src/ATen/native/LinearAlgebra.cpp:190 (most recent call first):\nframe #0: c10::Error::Error";
        assert_eq!(
            clean_torch_message(raw),
            "mat1 and mat2 shapes cannot be multiplied (1x5 and 4x8)"
        );
    }

    #[test]
    fn device_failures_are_told_from_bad_input() {
        // libtorch's texts as a CUDA forward raises them (c10::Error, or
        // c10::AcceleratorError in torch 2.8+), and through TorchScript.
        let cases = [
            (
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.",
                Some(DeviceFault::OutOfMemory),
            ),
            (
                "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                Some(DeviceFault::OutOfMemory),
            ),
            (
                "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc)`",
                Some(DeviceFault::Error),
            ),
            (
                "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
                Some(DeviceFault::Error),
            ),
            (
                "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent call last):\nRuntimeError: CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported at some other API call",
                Some(DeviceFault::Fatal),
            ),
            (
                "CUDA error: an illegal memory access was encountered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
                Some(DeviceFault::Fatal),
            ),
            (
                "index out of range in self\nException raised from operator() at /pytorch/aten/src/ATen/native/TensorAdvancedIndexing.cpp:1234",
                None,
            ),
            (
                "mat1 and mat2 shapes cannot be multiplied (1x5 and 4x8)",
                None,
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(device_fault(raw), want, "{raw}");
        }
        assert!(matches!(
            run_error("m", cases[0].0, true),
            ModelError::OutOfMemory { .. }
        ));
        assert!(matches!(
            run_error("m", cases[4].0, true),
            ModelError::DeviceFailed { fatal: true, ref message, .. }
                if message == "RuntimeError: CUDA error: device-side assert triggered"
        ));
        assert!(matches!(
            run_error("m", cases[7].0, true),
            ModelError::InvalidInput { .. }
        ));
        assert!(matches!(
            run_error("m", cases[7].0, false),
            ModelError::Internal { .. }
        ));
    }
}
