//! Model specs, loading, device placement, warm-up and forward.
//!
//! Everything here calls libtorch and so runs only on the loader and worker
//! threads the engine owns, never on a tokio thread.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use tch::{CModule, Device, IValue, Kind, Tensor, nn};

use crate::config::{BuiltinArg, DeviceArg, ModelArg, ModelSpecArg};

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
}

/// Resolves `--device` against the hardware. Calls libtorch.
pub fn resolve_device(arg: DeviceArg) -> Result<Device, ModelError> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Auto => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        DeviceArg::Cuda(n) => {
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

/// A loaded model, shared by every worker thread.
pub struct Model {
    pub name: String,
    pub device: Device,
    /// Human description: the file path or the built-in spec.
    pub description: String,
    inner: Inner,
}

enum Inner {
    Script(CModule),
    Mlp(Mlp),
    Scale(f64),
    Delay(Duration),
}

/// A built-in MLP defined with `tch::nn`.
struct Mlp {
    /// (weight, bias) per linear layer; ReLU between layers.
    layers: Vec<(Tensor, Tensor)>,
    _vs: nn::VarStore,
}

// SAFETY: the MLP's tensors are written only while it is built, on the loader
// thread, before the model is shared. Afterwards workers only read them under
// no_grad (libtorch ops reading the same tensor from several threads are safe,
// as for TorchScript modules, which tch marks Sync).
#[allow(unsafe_code)]
unsafe impl Sync for Mlp {}

impl Model {
    /// Loads (or builds) a model on a device and runs the warm-up forward.
    pub fn load(
        arg: &ModelArg,
        device: Device,
        warmup: Option<&[i64]>,
    ) -> Result<Model, ModelError> {
        let load_err = |source_desc: String, message: String| ModelError::Load {
            name: arg.name.clone(),
            source_desc,
            message,
        };
        let (inner, description, default_warmup) = match &arg.spec {
            ModelSpecArg::TorchScript(path) => {
                let desc = path.display().to_string();
                if !path.is_file() {
                    return Err(load_err(desc, "no such file".into()));
                }
                let mut m = CModule::load_on_device(path, device)
                    .map_err(|e| load_err(desc.clone(), clean_torch_message(&e.to_string())))?;
                m.set_eval();
                (Inner::Script(m), desc, None)
            }
            ModelSpecArg::Builtin(BuiltinArg::Mlp(widths)) => {
                let desc = format!(
                    "builtin:mlp:{}",
                    widths
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join("x")
                );
                // Deterministic weights: the same spec gives the same model everywhere.
                tch::manual_seed(0x5eed);
                let vs = nn::VarStore::new(device);
                let root = vs.root();
                let layers = widths
                    .windows(2)
                    .enumerate()
                    .map(|(i, w)| {
                        let l = nn::linear(&root / format!("l{i}"), w[0], w[1], Default::default());
                        let bias =
                            l.bs.unwrap_or_else(|| Tensor::zeros([w[1]], (Kind::Float, device)));
                        (l.ws, bias)
                    })
                    .collect();
                let warm = vec![1, widths[0]];
                (Inner::Mlp(Mlp { layers, _vs: vs }), desc, Some(warm))
            }
            ModelSpecArg::Builtin(BuiltinArg::Scale(k)) => (
                Inner::Scale(*k),
                format!("builtin:scale:{k}"),
                Some(vec![1, 1]),
            ),
            ModelSpecArg::Builtin(BuiltinArg::Delay(d)) => (
                Inner::Delay(*d),
                format!("builtin:delay:{}", d.as_millis()),
                None,
            ),
        };
        let model = Model {
            name: arg.name.clone(),
            device,
            description,
            inner,
        };
        if let Some(shape) = warmup.map(<[i64]>::to_vec).or(default_warmup) {
            let _guard = tch::no_grad_guard();
            let input = Tensor::zeros(&shape, (Kind::Float, device));
            let _warm = model.forward(&input).map_err(|e| {
                load_err(
                    model.description.clone(),
                    format!("warm-up forward on shape {shape:?} failed: {e}"),
                )
            })?;
        }
        Ok(model)
    }

    /// Runs the model on one (possibly batched) input already on the model's device.
    /// The caller holds a no_grad guard.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor, ModelError> {
        let invalid = |e: tch::TchError| ModelError::InvalidInput {
            model: self.name.clone(),
            message: clean_torch_message(&e.to_string()),
        };
        let run = || -> Result<Tensor, ModelError> {
            match &self.inner {
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
            }
        };
        // A panic inside tch (it panics on some errors) must not kill a worker.
        catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|panic| {
            Err(ModelError::Internal {
                model: self.name.clone(),
                message: panic_message(panic.as_ref()),
            })
        })
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

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        clean_torch_message(s)
    } else if let Some(s) = panic.downcast_ref::<String>() {
        clean_torch_message(s)
    } else {
        "panic without a message".into()
    }
}

/// libtorch's messages carry C++ backtraces and TorchScript tracebacks; keep the
/// sentence a user can act on.
pub fn clean_torch_message(msg: &str) -> String {
    let head = msg.split("Exception raised from").next().unwrap_or(msg);
    let mut text = if head.contains("Traceback of TorchScript") {
        // The interpreter's traceback ends with the original error line.
        head.lines()
            .rev()
            .map(str::trim)
            .find(|l| l.contains("Error:"))
            .unwrap_or(head.trim())
            .to_string()
    } else {
        head.lines()
            .filter(|l| !l.trim_start().starts_with("frame #"))
            .collect::<Vec<_>>()
            .join(" ")
            .trim()
            .to_string()
    };
    if text.len() > 1024 {
        let mut cut = 1024;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(spec: &str) -> Model {
        let arg: ModelArg = spec.parse().unwrap();
        Model::load(&arg, Device::Cpu, None).unwrap()
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
        let arg: ModelArg = "m=/nonexistent/model.pt".parse().unwrap();
        let err = Model::load(&arg, Device::Cpu, None).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/model.pt"), "{err}");
        if !tch::Cuda::is_available() {
            let err = resolve_device(DeviceArg::Cuda(3)).unwrap_err();
            assert!(err.to_string().contains("cuda:3"), "{err}");
            assert_eq!(resolve_device(DeviceArg::Auto).unwrap(), Device::Cpu);
        }
    }

    #[test]
    fn torch_messages_lose_their_backtraces() {
        let raw = "mat1 and mat2 shapes cannot be multiplied (1x5 and 4x8)\nException raised from meta at /pytorch/aten/src/ATen/native/LinearAlgebra.cpp:190 (most recent call first):\nframe #0: c10::Error::Error";
        assert_eq!(
            clean_torch_message(raw),
            "mat1 and mat2 shapes cannot be multiplied (1x5 and 4x8)"
        );
    }
}
